"""The pure parts of the gateway benchmarks: wrk's script and output, CPU arithmetic, the streaming
reader, and the peers table's medians and verdicts."""

from __future__ import annotations

import math

import pytest

from bench import cpu, peers, ttfc, wrk

WRK_OUT = """Running 2s test @ http://127.0.0.1:8000/v1/chat/completions
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.36ms    3.45ms  90.00ms   96.12%
  137178 requests in 3.01s, 44.22MB read
Requests/sec:  45649.34
WRK_JSON {"requests":137178,"duration_us":3005038,"bytes":46366164,"connect":0,"read":0,"write":0,"status":178,"timeout":2,"p50_us":485,"p90_us":1406,"p99_us":21295,"mean_us":1362.6,"max_us":90005}
"""


def test_wrk_summary_counts_non_2xx_as_errors_not_throughput() -> None:
    s = wrk.summarise(wrk.parse(WRK_OUT))
    assert s["requests"] == 137_000 and s["errors"] == 180
    assert s["rps"] == pytest.approx(137_000 / 3.005038)
    assert (s["p50_ms"], s["p99_ms"]) == (0.485, 21.295)


def test_wrk_output_without_the_json_line_names_what_wrk_said() -> None:
    with pytest.raises(ValueError, match="unable to connect"):
        wrk.parse("unable to connect to 127.0.0.1:9 Connection refused\n")


def test_lua_script_quotes_bodies_that_contain_closing_brackets() -> None:
    script = wrk.lua_script('{"a":[[1]]}', {"Authorization": "Bearer k"})
    assert "wrk.body = [=[{\"a\":[[1]]}]=]" in script
    assert "wrk.headers[ [[Authorization]] ] = [[Bearer k]]" in script  # "[[[" would not parse
    assert 'wrk.method = "POST"' in script and "function done(" in script


@pytest.mark.parametrize(("conns", "threads"), [(1, 1), (2, 2), (32, 2)])
def test_wrk_threads(conns: int, threads: int) -> None:
    assert wrk.threads_for(conns) == threads


def test_parse_stat_reads_fields_after_a_command_name_with_spaces_and_parens() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    text = "4242 (sglang::router (x)) S 17 4242 4242 0 -1 4194560 900 0 0 0 250 40 0 0 20 0 9 0 77 0 0"
    assert cpu.parse_stat(text) == (17, 290)


def test_descendants_follow_parent_links_only_from_the_roots() -> None:
    stats = {1: (0, 5), 10: (1, 1), 11: (10, 1), 12: (11, 1), 20: (1, 1), 21: (20, 1)}
    assert cpu.descendants([10], stats) == {10, 11, 12}
    assert cpu.descendants([99], stats) == set()


def test_cpu_seconds_count_new_processes_from_zero_and_keep_gone_ones_out() -> None:
    before = {10: 100, 11: 50, 12: 30}
    after = {10: 160, 11: 50, 13: 20}  # 12 exited, 13 started
    assert cpu.seconds_used(before, after, ticks_per_s=100) == pytest.approx(0.8)
    assert cpu.per_1000(0.8, 4000) == pytest.approx(0.2)
    assert math.isnan(cpu.per_1000(0.8, 0))


def test_response_reader_sees_the_first_sse_chunk_before_the_end() -> None:
    r = ttfc.ResponseReader()
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert r.status == 200 and not r.first_data
    r.feed(b"e\r\ndata: {\"a\":1}\n\n\r\n")
    assert r.first_data and not r.done
    r.feed(b"10\r\ndata: [DONE]\r\n\r\n\r\n0\r")  # a payload holding "\r\n\r\n" is not the end
    assert not r.done
    r.feed(b"\n\r\n")
    assert r.done


def test_response_reader_with_content_length_waits_for_the_whole_body() -> None:
    r = ttfc.ResponseReader()
    r.feed(b"HTTP/1.1 429 Too Many\r\nContent-Length: 10\r\n\r\n01234")
    assert r.status == 429 and r.first_data and not r.done
    r.feed(b"56789")
    assert r.done


def _cell(system: str, cell: str, rnd: int, rps: float, p50: float, cpu_s: dict[str, float], **extra: float) -> dict[str, object]:
    return {"system": system, "cell": cell, "round": rnd, "rps": rps, "requests": rps * 10, "errors": 0,
            "p50_ms": p50, "p99_ms": p50 * 3, "cpu_s": cpu_s, **extra}


def test_peers_aggregate_takes_medians_and_sums_a_systems_processes() -> None:
    cells = [_cell("cpn", "c32", r, rps, 8.0, {"hub": 1.0, "agent": 0.5, "nats-server": 0.1})
             for r, rps in enumerate([3000.0, 3600.0, 3300.0])]
    agg = peers.aggregate(cells)["cpn"]["c32"]
    assert agg["rps"] == 3300.0 and agg["rounds"] == 3 and agg["rounds_rps"] == [3000, 3600, 3300]
    # 1.6 CPU-s over 33,000 requests is 0.0485 s per 1,000 (the median round's)
    assert agg["cpu_per_1000"] == pytest.approx(1.6 * 1000 / 33_000, abs=1e-4)
    assert agg["cpu_per_1000_by_process"]["hub"] == pytest.approx(1.0 * 1000 / 33_000, abs=1e-4)


def test_peers_verdicts_against_vllm_router() -> None:
    cells = [
        _cell("vllm-router", "c32", 0, 14_000, 2.0, {"vllm-router": 8.0}),
        _cell("cpn", "c32", 0, 6_000, 5.0, {"hub": 30.0, "agent": 10.0}),
        _cell("vllm-router", "c1", 0, 3000, 0.32, {"vllm-router": 1.0}),
        _cell("cpn", "c1", 0, 900, 1.12, {"hub": 1.0}),
        _cell("vllm-router", "ttfc8", 0, 2000, 0, {"vllm-router": 1.0}, ttfc_p50_ms=1.83, ttfc_p99_ms=5.0),
        _cell("cpn", "ttfc8", 0, 500, 0, {"hub": 1.0}, ttfc_p50_ms=3.0, ttfc_p99_ms=9.0),
    ]
    v = peers.verdicts(peers.aggregate(cells))
    assert v["rps_c32_ratio"]["value"] == pytest.approx(0.429, abs=1e-3) and not v["rps_c32_ratio"]["ok"]
    # cpn 40 CPU-s / 60,000 req vs vllm-router 8 / 140,000: 11.7x
    assert v["cpu_per_1000_ratio"]["value"] == pytest.approx(11.667, abs=1e-3) and not v["cpu_per_1000_ratio"]["ok"]
    assert v["p50_c1_extra_ms"]["value"] == pytest.approx(0.8) and not v["p50_c1_extra_ms"]["ok"]
    assert v["ttfc_ratio"]["ok"]
    assert peers.verdicts(peers.aggregate(cells[1::2])) == {}  # no baseline, no verdict


def test_peers_verdicts_are_medians_of_each_rounds_own_ratio() -> None:
    # The machine slowed down in round 1 for both systems: each round's own ratio is 0.5, though the
    # medians over rounds (cpn 5,000 of round 2, vllm-router 12,000 of round 0) would say 0.42.
    cells = []
    for rnd, (vllm, cpn_rps) in enumerate([(12_000, 6_000), (6_000, 3_000), (14_000, 7_000)]):
        cells.append(_cell("vllm-router", "c32", rnd, vllm, 2.0, {"vllm-router": vllm / 1000}))
        cells.append(_cell("cpn", "c32", rnd, cpn_rps if rnd != 2 else 5_000, 5.0, {"hub": cpn_rps / 100}))
        cells.append(_cell("vllm-router", "ttfc8", rnd, 2000, 0, {"vllm-router": 1.0}, ttfc_p50_ms=1.0 + rnd, ttfc_p99_ms=5.0))
        cells.append(_cell("cpn", "ttfc8", rnd, 500, 0, {"hub": 1.0}, ttfc_p50_ms=2.0 * (1.0 + rnd), ttfc_p99_ms=9.0))
    cells.append(_cell("cpn", "c1", 0, 900, 1.0, {"hub": 1.0}))  # no vllm-router c=1 cell in round 0 ...
    cells.append(_cell("vllm-router", "c1", 1, 3000, 0.3, {"vllm-router": 1.0}))  # ... nor cpn's in round 1
    agg = peers.aggregate(cells)
    v = peers.verdicts(agg, cells=cells)
    rps = v["rps_c32_ratio"]
    assert rps["rounds"] == [0.5, 0.5, pytest.approx(0.357, abs=1e-3)] and rps["value"] == 0.5 and rps["ok"]
    assert rps["of_medians"] == pytest.approx(5_000 / 12_000, abs=1e-3)  # what the old verdict said
    assert v["ttfc_ratio"]["rounds"] == [2.0, 2.0, 2.0] and v["ttfc_ratio"]["ok"]
    # no round with both: the difference of the medians, without rounds
    assert "rounds" not in v["p50_c1_extra_ms"] and v["p50_c1_extra_ms"]["value"] == pytest.approx(0.7)
    text = peers.render_verdicts({"verdicts": v})
    assert "median of the rounds' own" in text and "| 0.5, 0.5, 0.357 |" in text


def test_peers_refuses_an_unknown_cell_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert peers.main(["--cells", "c32,c64"]) == 2
    assert "unknown cell(s) c64" in capsys.readouterr().out
    assert peers.main(["--cells", ""]) == 2
