"""A fast mock OpenAI-compatible server for the gateway benchmarks: a raw asyncio ``Protocol`` on uvloop.

aiohttp is too slow to stand behind a fast router (it would be the bottleneck of the direct path),
so this is a minimal HTTP/1.1 keep-alive responder: it reads the request line, headers and a
``Content-Length`` body, and answers from pre-built bytes.

- ``POST /v1/chat/completions`` and ``/v1/completions``: one fixed JSON answer; with
  ``"stream": true`` in the body, an SSE stream (chunked) of ``--chunks`` deltas, a final chunk
  with ``finish_reason``, a usage chunk and ``data: [DONE]``, all written at once (no model time:
  time to first chunk is the path's own).
- ``GET`` anything (``/health``, ``/v1/models``, ``/get_server_info``, ...): a small JSON 200, which
  is what the routers' health and discovery probes want.

``python -m bench.mockopenai [--port N] [--shared-port N]`` prints ``port=N shared=M`` when
serving. ``--shared-port`` also listens on a port bound with ``SO_REUSEPORT`` (0: pick one), so two
replicas can stand behind one URL, the kernel spreading connections between them (the direct path
and cpn's agent use that URL; the routers are given each replica's own port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys

from bench import common

MODEL = "mock"


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def build_answers(chunks: int = 4) -> dict[str, bytes]:
    """The pre-built answers: ``json`` (non-streaming completion), ``sse`` (a whole chunked SSE
    response), ``get`` (probe answer), ``404``."""
    words = [f"w{i}" for i in range(chunks)]
    completion = {
        "id": "cmpl-mock", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": " ".join(words)}}],
        "usage": {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks},
    }
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
    events = []
    for i, word in enumerate(words):
        delta = {"id": "cmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                 "choices": [{"index": 0, "finish_reason": None, "delta": {"content": word if i == 0 else " " + word}}]}
        events.append(delta)
    events.append({"id": "cmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                   "choices": [{"index": 0, "finish_reason": "stop", "delta": {}}]})
    events.append({"id": "cmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": [],
                   "usage": completion["usage"]})
    sse = head + b"".join(_chunk(b"data: " + json.dumps(e).encode() + b"\n\n") for e in events)
    sse += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    models = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}],
              "model_path": MODEL, "status": "ok"}
    return {
        "json": _response("200 OK", json.dumps(completion).encode()),
        "sse": sse,
        "get": _response("200 OK", json.dumps(models).encode()),
        "404": _response("404 Not Found", b'{"error":"not found"}'),
    }


class _Http(asyncio.Protocol):
    """One connection: requests are parsed from a byte buffer; answers are written whole."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        self._answers = answers
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            length = 0
            i = head.lower().find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17: j if j >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                break
            body = buf[end + 4: total]
            buf = buf[total:]
            if head.startswith(b"POST "):
                path = head[5: head.find(b" ", 5)]
                if path.endswith(b"/completions"):
                    stream = b'"stream":true' in body.replace(b" ", b"")
                    out.append(self._answers["sse" if stream else "json"])
                else:
                    out.append(self._answers["404"])
            else:
                out.append(self._answers["get"])
        self._buf = buf
        if out and self._transport is not None:
            self._transport.write(b"".join(out))


async def serve(port: int, shared_port: int | None, chunks: int) -> None:
    answers = build_answers(chunks)
    loop = asyncio.get_running_loop()
    own = await loop.create_server(lambda: _Http(answers), "127.0.0.1", port, backlog=1024)
    own_port = own.sockets[0].getsockname()[1]
    shared = None
    if shared_port is not None:
        shared = await loop.create_server(lambda: _Http(answers), "127.0.0.1", shared_port, reuse_port=True, backlog=1024)
        shared_port = shared.sockets[0].getsockname()[1]
    print(f"port={own_port} shared={shared_port or ''}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.mockopenai")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--shared-port", type=int, default=None, help="also listen here with SO_REUSEPORT (0: pick one)")
    p.add_argument("--chunks", type=int, default=4, help="content deltas in a streamed answer")
    a = p.parse_args(argv)
    common.install_uvloop()
    try:
        asyncio.run(serve(a.port, a.shared_port, a.chunks))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
