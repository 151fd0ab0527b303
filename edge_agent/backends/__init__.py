"""Inference backends: where a site's tokens come from.

A backend turns one :class:`~edge_agent.wire.InferRequest` into a :class:`Completion`, calling
``on_text`` with each piece of text as it is produced (the agent relays those as ``InferChunk``s
when the request streams). Concurrency limits (slots) and cancellation are the agent's business:
cancelling the task that awaits :meth:`Backend.generate` stops generation. A backend reports
failure only as :class:`~edge_agent.errors.BackendError` (code ``backend`` or ``timeout``).

- ``sim``: deterministic text derived from the input and the site id, with configured timing.
- ``openai-http``: a site-local OpenAI-compatible server (vLLM, SGLang) over HTTP.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from edge_agent import wire
from edge_agent.clock import WALL, Clock
from edge_agent.config import AgentConfig

OnText = Callable[[str], Awaitable[None]]


class Completion(msgspec.Struct, frozen=True):
    """A backend's answer (a frozen msgspec Struct: built per request, cheaper than a frozen dataclass)."""

    output: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    tail: str = ""
    """Streamed text not handed to ``on_text`` (only when the request says ``tail_ok``): the last
    pieces, which came together with the end of the answer."""


class Backend(Protocol):
    name: str
    default_slots: int
    load_time_s: float

    async def generate(self, request: wire.InferRequest, on_text: OnText | None) -> Completion:
        """Produce the answer; call ``on_text`` with each new piece when given."""
        ...

    def generate_now(self, request: wire.InferRequest) -> Completion | None:
        """The answer to a non-streaming request if it can be given without waiting, else None.

        The agent tries this first: an answer that needs no waiting skips the task, the timer and
        the bookkeeping of a request in flight. A backend that always waits returns None.
        """
        ...

    async def close(self) -> None:
        """Release connections (idempotent)."""
        ...


def make_backend(config: AgentConfig, clock: Clock = WALL) -> Backend:
    """The backend ``config.backend.kind`` names (the ``sim`` one passes time on ``clock``)."""
    if config.backend.kind == "openai-http":
        from edge_agent.backends.openai_http import OpenAIHttpBackend

        return OpenAIHttpBackend(config.backend.openai_http)
    from edge_agent.backends.sim import SimBackend

    return SimBackend(config.backend.sim, site=config.site, clock=clock)


def prompt_words(request: wire.InferRequest) -> int:
    """A rough prompt token count (words), for backends that do not report usage."""
    if request.messages:
        return sum(len(m.content.split()) for m in request.messages)
    return len(request.prompt.split())
