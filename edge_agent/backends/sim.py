"""The ``sim`` backend: deterministic answers with configured timing, for demos, tests and ``cpn up``.

The answer is ``"<site>: w1 w2 ... wN"`` with N = ``max_tokens`` words chosen by hashing the
model, the prompt (or messages) and the site id, so the same request gets the same answer from the
same site and a test can tell which site answered. Timing: ``ttft_ms`` before the first token,
``per_token_ms`` between later ones (zero allowed: then no sleeping at all).
"""

from __future__ import annotations

import hashlib

from edge_agent import wire
from edge_agent.clock import WALL, Clock
from edge_agent.backends import Completion, OnText, prompt_words
from edge_agent.config import SimBackendConfig

_VOCAB = (
    "compute power network edge hub pool card token route budget fibre latency site region city "
    "train infer model replica checkpoint attempt tariff valley peak east west data centre cloud "
    "river mountain light signal packet stream batch queue slot grid green wind solar"
).split()


def sim_words(site: str, request: wire.InferRequest) -> list[str]:
    """The ``max_tokens`` words the sim backend answers ``request`` with at ``site``."""
    if request.messages:
        text = "\x1e".join(f"{m.role}\x1f{m.content}" for m in request.messages)
    else:
        text = request.prompt
    digest = hashlib.blake2b(f"{site}\x00{request.model}\x00{text}".encode(), digest_size=64).digest()
    words = [_VOCAB[b % len(_VOCAB)] for b in digest[: max(0, request.max_tokens)]]
    block = 0
    while len(words) < request.max_tokens:  # beyond 64 words: chain further digests off the first
        block += 1
        more = hashlib.blake2b(block.to_bytes(4, "big"), key=digest, digest_size=64).digest()
        words.extend(_VOCAB[b % len(_VOCAB)] for b in more[: request.max_tokens - len(words)])
    return words


class SimBackend:
    """Deterministic text, ``max_tokens`` words, configured time to first token and per token."""

    name = "sim"

    def __init__(self, config: SimBackendConfig, *, site: str, clock: Clock = WALL) -> None:
        self.site = site
        self.clock = clock
        self.default_slots = config.slots
        self.load_time_s = config.load_time_s
        self._ttft_s = config.ttft_ms / 1000.0
        self._per_token_s = config.per_token_ms / 1000.0
        self._answer_words = config.answer_words

    def _answer(self, request: wire.InferRequest) -> tuple[list[str], Completion]:
        words = sim_words(self.site, request)
        natural = 0 < self._answer_words < len(words)
        if natural:
            words = words[: self._answer_words]
        completion = Completion(
            output=f"{self.site}: {' '.join(words)}" if words else f"{self.site}:",
            prompt_tokens=prompt_words(request),
            completion_tokens=len(words),
            finish_reason="stop" if natural or not words else "length",
        )
        return words, completion

    def generate_now(self, request: wire.InferRequest) -> Completion | None:
        if self._ttft_s > 0 or self._per_token_s > 0:
            return None
        return self._answer(request)[1]

    async def generate(self, request: wire.InferRequest, on_text: OnText | None) -> Completion:
        words, completion = self._answer(request)
        if on_text is not None or self._ttft_s > 0 or self._per_token_s > 0:  # token by token
            pieces = [f"{self.site}:"] if not words else [f"{self.site}: {words[0]}"] + [f" {w}" for w in words[1:]]
            for i, piece in enumerate(pieces):
                delay = self._ttft_s if i == 0 else self._per_token_s
                if delay > 0:
                    await self.clock.sleep(delay)
                if on_text is not None:
                    await on_text(piece)
        return completion

    async def close(self) -> None:
        return None
