"""What a Prometheus server scrapes from a running network, checked by Prometheus' own promtool.

A ``cpn up`` network on the 3-site demo layout serves chat requests (plain and streamed) and a
training job; its ``/metrics`` then passes ``promtool check metrics`` and carries the families the
shipped dashboard and alert rules use, with the values this traffic must have produced.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_foundation import until
from tests.support.engines import needs
from tests.support.hubrig import running_network
from topology import loader

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in got.items() if n == name and labels.items() <= dict(ls).items())


@needs("promtool", package="prometheus")
async def test_live_exposition_passes_promtool_and_counts_what_was_served(tmp_path: Path) -> None:
    async with running_network(tmp_path) as net:
        assert net.hub is not None
        hub = net.hub
        base = f"http://127.0.0.1:{hub.http_port}"
        # nearest: this test counts what was served; the budget on the promise is tested elsewhere
        tenant = {"Authorization": f"Bearer {net.credentials['tenant_key']}", "X-CPN-Budget-Policy": "nearest"}
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(base + "/v1/chat/completions", json=CHAT, headers=tenant) as resp:
                    assert resp.status == 200, await resp.text()
            async with session.post(base + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=tenant) as resp:
                assert resp.status == 200
                await resp.read()
            job = {"name": "ft", "cards": 2, "accelerators": ["A800", "910B"], "est_hours": 1}
            async with session.post(base + "/v1/jobs", json=job, headers={**tenant, "Idempotency-Key": "m1"}) as resp:
                assert resp.status in (200, 201, 202), await resp.text()
            async with session.get(base + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()

        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        got = samples(text)
        assert total(got, "process_resident_memory_bytes") > 0 and total(got, "python_info") == 1
        assert total(got, "cpn_tenant_requests_total", tenant="demo", model="demo-chat") == 4
        assert total(got, "cpn_tokens_total", tenant="demo", model="demo-chat", kind="completion") > 0
        assert total(got, "cpn_inference_seconds_count", model="demo-chat") == 3
        assert total(got, "cpn_inference_ttft_seconds_count", model="demo-chat") == 1
        assert total(got, "cpn_site_up") == len(net.agents) and total(got, "cpn_ready") == 1
        assert total(got, "cpn_cards", state="free") + total(got, "cpn_cards", state="busy") == sum(
            sum(s.accelerators.values()) for s in loader.load(loader.data_path("demo-3")).sites)
        assert total(got, "cpn_replicas", model="demo-chat", state="ready") >= 2
        assert total(got, "cpn_deployments") >= 1
        assert total(got, "cpn_jobs") == 1
        assert ("cpn_nats_errors_total", (("kind", "timeout"),)) in got
        assert not any(n == "cpn_route_decisions_total" and dict(ls).get("reason") == "none" for n, ls in got)
        # Every family the shipped alerts and dashboard query is one this hub exports.
        exported = {n for n, _ in got}
        queries = (DEPLOY / "prometheus" / "alerts.yml").read_text() + " ".join(
            t["expr"] for p in json.loads((DEPLOY / "grafana" / "cpn.json").read_text())["panels"] for t in p.get("targets", []))
        used = set(re.findall(r"\b((?:cpn|process)_[a-z_]+)", queries))
        assert len(used) > 15 and not used - exported, sorted(used - exported)

        # A site killed (not stopped): its cards and replicas go, and the loss is counted.
        victim = next(a for a in net.agents if a.config.site != "sh-edge")
        await victim.bus.close()
        await until(lambda: hub.registry.get(victim.config.site).state == "lost", 10, "site lost")  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/metrics") as resp:
                got = samples(await resp.text())
        assert total(got, "cpn_site_up", site=victim.config.site) == 0
        assert total(got, "cpn_site_losses_total") == 1 and total(got, "cpn_site_departures_total") == 0
        assert total(got, "cpn_cards", site=victim.config.site) == 0
