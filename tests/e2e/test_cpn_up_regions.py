"""``cpn up --regions N`` as a user runs it: a real subprocess, a super-cluster of nats-servers, a gateway
per region printed on the banner, each answering from its own city, SIGTERM stops every part."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from controlplane import cli
from tests.support.cpnup import banner, call, children_of, cpn_up, stops_cleanly
from topology import loader


def monitor_ports(data: Path) -> dict[str, int]:
    """The monitoring port of every node, from the configs ``cpn up --regions`` wrote."""
    out = {}
    for conf in sorted((data / "nats").glob("*.conf")):
        m = re.search(r'^http: "127\.0\.0\.1:(\d+)"', conf.read_text(), re.M)
        assert m, conf
        out[conf.stem] = int(m.group(1))
    return out


def gatewayz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/gatewayz", timeout=2) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def chat_until_served(url: str, key: str, origin: str, timeout_s: float
                      ) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The demo model's answer to ``origin`` once a site has loaded it (4xx/5xx until then)."""
    deadline = time.monotonic() + timeout_s
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}
    while True:
        status, answer, headers = call("POST", url + "/v1/chat/completions", key, body, {"X-CPN-Origin": origin})
        if status == 200:
            return status, answer, headers
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} {origin}: no answer: {status} {answer!r}")
        time.sleep(0.2)


def test_bad_region_count_is_refused_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # cli.main, what the process runs (a refusal as a process of its own: tests/adapters/test_key_lifecycle.py)
    assert cli.main(["up", "--data-dir", str(tmp_path), "--regions", "9"]) == 2
    assert "--regions 9: the layout names 6 region(s)" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_cpn_up_regions_runs_a_supercluster_with_a_gateway_per_region(tmp_path: Path) -> None:
    data = tmp_path / "cpn"
    layout = loader.load_default()
    started = time.monotonic()
    with cpn_up("--regions", "3", "--data-dir", str(data), "--port", "0", "--nats-port", "0") as proc:
        gateways: dict[str, tuple[str, str]] = {}
        for line in banner(proc, 180):
            if m := re.search(r"region (\w+): gateway at (http://127\.0\.0\.1:\d+) \(city ([\w-]+),", line):
                gateways[m.group(1)] = (m.group(2), m.group(3))
        assert list(gateways) == [r.id for r in layout.regions[:3]], gateways
        for rid, (_, city) in gateways.items():
            assert city == next(r for r in layout.regions if r.id == rid).gateways[0]
        print(f"cpn up --regions 3 ready in {time.monotonic() - started:.1f} s")
        creds = json.loads((data / "demo-credentials.json").read_text())

        # The super-cluster: every node has gateway connections to both other regions.
        ports = monitor_ports(data)
        assert len(ports) == 3 + 1 + 1  # the home region (the record's 3 replicas) and one node each
        for node, port in ports.items():
            outbound = set(gatewayz(port).get("outbound_gateways") or {})
            assert outbound == {r for r in gateways if not node.startswith(r + "-")}, (node, outbound)

        # Each region's gateway answers its own city from a site of its own region, within budget.
        for rid, (url, city) in gateways.items():
            status, body, headers = chat_until_served(url, creds["tenant_key"], city, 30)
            assert status == 200 and body["choices"][0]["message"]["content"]
            assert headers["X-CPN-Ingress"] == city
            assert float(headers["X-CPN-RTT-Ms"]) <= 10, headers
            assert layout.region_of_site(headers["X-CPN-Site"]) == rid, (rid, headers["X-CPN-Site"])

        kids = children_of(proc.pid)
        assert len(kids) >= 5, "the five nats-servers should be children"
        stops_cleanly(proc, kids)


def test_leaf_sites_without_regions_is_refused_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["up", "--data-dir", str(tmp_path), "--leaf-sites"]) == 2
    assert "--leaf-sites needs --regions N" in capsys.readouterr().err


@pytest.mark.serial
@pytest.mark.timeout(240)
def test_cpn_up_regions_leaf_sites_puts_each_site_behind_a_leaf_node_of_its_own_region(tmp_path: Path) -> None:
    from tests.e2e.test_regions import three_region_layout

    data = tmp_path / "cpn"
    path = three_region_layout(tmp_path)
    layout = loader.load(path)
    with cpn_up("--regions", "3", "--leaf-sites", "--layout", str(path), "--data-dir", str(data),
                "--port", "0") as proc:
        gateways: dict[str, tuple[str, str]] = {}
        for line in banner(proc, 180):
            m = re.search(r"region (\w+): gateway at (http://127\.0\.0\.1:\d+) \(city ([\w-]+),.*leaf nodes", line)
            if m:
                gateways[m.group(1)] = (m.group(2), m.group(3))
        assert sorted(gateways) == ["js", "sh", "zj"], gateways
        creds = json.loads((data / "demo-credentials.json").read_text())
        # Each region's nodes hold one leaf connection per site of that region, and no other.
        seen: dict[str, list[str]] = {rid: [] for rid in gateways}
        for node, port in monitor_ports(data).items():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/leafz", timeout=2) as resp:
                seen[node.split("-node-")[0]] += [leaf["name"] for leaf in json.loads(resp.read()).get("leafs") or []]
        for rid, names in seen.items():
            assert sorted(names) == sorted(f"cpn-leaf-{s.id}" for s in layout.sites
                                           if layout.region_of_site(s.id) == rid), (rid, names)
        leaf_confs = sorted(p.stem for p in (data / "nats" / "leaf").glob("*.conf"))
        assert leaf_confs == sorted(s.id for s in layout.sites)
        # The agents behind them answer: each region's gateway serves its own city (the demo model
        # is deployed for 10 ms in two cities: not necessarily in each region of this small layout).
        for rid, (url, city) in gateways.items():
            status, _, headers = chat_until_served(url, creds["tenant_key"], city, 60)
            assert status == 200 and headers["X-CPN-Ingress"] == city, (rid, headers)
        kids = children_of(proc.pid)
        assert len(kids) >= 5 + len(layout.sites), "five cluster nodes and a leaf server per site"
        stops_cleanly(proc, kids)


FAR_REGIONS = """
[[origins]]
id = "faraway"
name = "Far-away Zhejiang town (test)"
region = "zhejiang"
lat = 30.3
lon = 111.0
weight = 1.0

[regions.sh]
name = "Shanghai and Jiangsu"
cluster = "shanghai"
gateways = ["shanghai"]
provinces = ["shanghai", "jiangsu"]

[regions.zj]
name = "Zhejiang, entered ~900 km from its pools"
cluster = "hangzhou"
gateways = ["faraway"]
provinces = ["zhejiang"]
"""


def far_gateway_layout(tmp: Path) -> Path:
    """demo-3 in two regions; Zhejiang's gateway stands in a town ~880 km from every pool (over 10 ms)."""
    from tests.support.hubrig import DEMO3

    text = Path(DEMO3).read_text()
    text = text[: text.index("[regions.east]")]
    text = text.replace("metro_km = 30 ", "max_access_km = 1500\nmetro_km = 30 ", 1)
    at = text.index('id = "hz-edge"')  # a regional cluster stands at a hub or regional pool
    tier = text.index('tier = "edge"', at)
    regional = ('tier = "regional"\nprovider = "cpn-operator"\ntariff = "east"\npue = 1.3\n'
                'failure_rate_per_card_hour = 2.0e-5\nrestart_s = 300\negress_gbps = 10')
    text = text[:tier] + regional + text[tier + len('tier = "edge"'):]
    text = text.replace("[cidrs]", FAR_REGIONS + "\n[cidrs]", 1)
    path = tmp / "far-gateway.toml"
    path.write_text(text)
    return path


@pytest.mark.timeout(180)
def test_cpn_up_regions_does_not_hang_on_a_region_with_no_site_within_budget(tmp_path: Path) -> None:
    """The national layout's north-west enters at Xi'an, whose nearest site is 16.3 ms away through the
    region's cluster at Zhongwei: `cpn up --regions 6` (and the bench) waited forever for it. Now the
    region is named on the log and the banner, and the rest comes up."""
    path = far_gateway_layout(tmp_path)
    layout = loader.load(path)
    assert [r.id for r in layout.regions] == ["sh", "zj"]
    data = tmp_path / "cpn"
    started = time.monotonic()
    with cpn_up("--regions", "2", "--layout", str(path), "--data-dir", str(data), "--port", "0") as proc:
        lines = banner(proc, 170)
        print(f"cpn up --regions 2 with a far gateway ready in {time.monotonic() - started:.1f} s")
        text = "".join(lines)
        assert re.search(r"region zj: gateway at http://127\.0\.0\.1:\d+ \(city faraway,", text), text
        m = re.search(r"not served within budget: no in-region site within 10 ms of its gateway city faraway "
                      r"\(nearest: hz-edge at (\d+\.\d) ms\)", text)
        assert m and float(m.group(1)) > 10, text
        assert text.count("not served within budget") == 1, text  # the Shanghai region is served
        stops_cleanly(proc, children_of(proc.pid))
        assert proc.stderr is not None and "event=region_not_served region=zj" in proc.stderr.read()
