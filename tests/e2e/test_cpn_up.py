"""``cpn up`` as a user runs it: a real subprocess, its printed banner and credentials file, SIGTERM."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.support.cpnup import banner, call, children_of, cpn_up, stops_cleanly
from tests.support.waiting import until_blocking
from topology import loader


def test_cpn_up_serves_the_printed_curl_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "cpn"
    layout = loader.default_path()
    started = time.monotonic()
    with cpn_up("--data-dir", str(data), "--port", "0", "--nats-port", "0", "--layout", str(layout)) as proc:
        m = re.search(r"hub gateway at (http://127\.0\.0\.1:\d+)", "".join(banner(proc, 60)))
        assert m, "the banner names no gateway"
        url = m.group(1)
        ready_s = time.monotonic() - started
        creds = json.loads((data / "demo-credentials.json").read_text())
        assert set(creds) == {"admin_key", "tenant_key"}
        assert (data / "demo-credentials.json").stat().st_mode & 0o077 == 0

        status, health, _ = call("GET", url + "/healthz")
        assert status == 200 and health["sites"]["up"] >= 40
        answer: list[object] = []

        def answered() -> bool:  # the demo model loads on the edge pools (sim load time 1 s)
            answer[:] = call("POST", url + "/v1/chat/completions", creds["tenant_key"],
                             {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]})
            return answer[0] == 200

        until_blocking(answered, 15, "an answer", interval_s=0.2, last=lambda: answer)
        status, body, headers = answer  # type: ignore[misc]
        assert status == 200 and body["choices"][0]["message"]["content"]
        assert headers["X-CPN-Site"] and float(headers["X-CPN-RTT-Ms"]) <= 10
        print(f"cpn up ready in {ready_s:.1f} s")

        kids = children_of(proc.pid)
        assert kids, "the embedded nats-server should be a child"
        stops_cleanly(proc, kids, timeout_s=30)
