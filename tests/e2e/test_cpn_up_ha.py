"""``cpn up --ha`` as a user runs it: a real subprocess starting a 3-node nats-server cluster and three
``cpn hub --record nats`` processes; every gateway on the banner lists the three processes, one
leader with its epoch and the three NATS nodes, and answers the demo model; SIGINT stops every part."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from controlplane import cli
from controlplane.nats.natsserver import default_gomaxprocs
from tests.support.cpnup import banner, call, children_of, command_of, cpn_up, environ_of, stops_cleanly
from tests.support.hubrig import DEMO3


def test_ha_and_regions_together_are_refused_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # cli.main, what the process runs (a refusal as a process of its own: tests/adapters/test_key_lifecycle.py)
    assert cli.main(["up", "--data-dir", str(tmp_path), "--ha", "--regions", "2"]) == 2
    assert "--ha and --regions" in capsys.readouterr().err


@pytest.mark.serial
@pytest.mark.timeout(240)
def test_cpn_up_ha_runs_three_hub_processes_one_leading_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    data = tmp_path / "cpn"
    started = time.monotonic()
    with cpn_up("--ha", "--data-dir", str(data), "--port", "0", "--layout", str(DEMO3)) as proc:
        gateways: dict[str, tuple[str, int]] = {}
        leader_line = ""
        for line in banner(proc, 180):
            if m := re.search(r"hub (hub-\d): gateway at (http://127\.0\.0\.1:\d+) pid (\d+)", line):
                gateways[m.group(1)] = (m.group(2), int(m.group(3)))
            if m := re.search(r"leader: +(hub-\d) epoch (\d+)", line):
                leader_line = m.group(0)
                banner_leader, banner_epoch = m.group(1), int(m.group(2))
        assert sorted(gateways) == ["hub-1", "hub-2", "hub-3"] and leader_line, (gateways, leader_line)
        print(f"cpn up --ha ready in {time.monotonic() - started:.1f} s; {leader_line}")
        creds = json.loads((data / "demo-credentials.json").read_text())

        kids = children_of(proc.pid)
        hub_pids = {pid for _, pid in gateways.values()}
        assert hub_pids <= kids, "the hub processes are children of cpn up"
        assert len(kids - hub_pids) >= 3, "and so are the three nats-servers"
        servers = [pid for pid in kids - hub_pids if command_of(pid) == "nats-server"]
        assert len(servers) == 3, (kids, hub_pids)
        # one processor each on a small host, as cpn up's own server (natsserver.default_gomaxprocs)
        wanted = os.environ.get("GOMAXPROCS") or (str(default_gomaxprocs()) if default_gomaxprocs() else None)
        assert [environ_of(pid).get("GOMAXPROCS") for pid in servers] == [wanted] * 3

        for hub_id, (url, pid) in gateways.items():
            status, view, _ = call("GET", url + "/v1/cluster", creds["admin_key"])
            assert status == 200, (hub_id, view)
            assert sorted(p["hub_id"] for p in view["processes"]) == ["hub-1", "hub-2", "hub-3"], view
            assert {p["pid"] for p in view["processes"]} == hub_pids, view
            assert all(p["state"] == "up" for p in view["processes"]), view
            leading = [p["hub_id"] for p in view["processes"] if p["leading"]]
            assert leading == [banner_leader] == [view["leader"]["hub_id"]], view
            assert view["leader"]["epoch"] >= banner_epoch >= 1, view
            assert len(view["nats_nodes"]) == 3, view

            body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}
            status, answer, _ = call("POST", url + "/v1/chat/completions", creds["tenant_key"], body)
            assert status == 200 and answer["choices"][0]["message"]["content"], (hub_id, status, answer)

        stops_cleanly(proc, kids, signal.SIGINT, timeout_s=90)

