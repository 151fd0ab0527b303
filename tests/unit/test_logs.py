"""One log format for hub and agent: both message styles parse to the same fields, JSON lines carry
them, and a repeated warning is written once per window (lines naming a request or job never held)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from edge_agent import logs


@pytest.mark.parametrize(("message", "fields"), [
    ("event=site_lost site=sh-edge silent_for_s=3.00", {"event": "site_lost", "site": "sh-edge", "silent_for_s": "3.00"}),
    ("registered site=cli-site tier=edge", {"event": "registered", "site": "cli-site", "tier": "edge"}),
    ('event=x reason="two words" b=1', {"event": "x", "reason": "two words", "b": "1"}),
    ('event=x error="a=b c" next=2', {"event": "x", "error": "a=b c", "next": "2"}),
    ("event=site_unplaced site=s reason=unknown city and no coordinates",
     {"event": "site_unplaced", "site": "s", "reason": "unknown city and no coordinates"}),
    ("Unclosed client session", {"event": "message", "msg": "Unclosed client session"}),
])
def test_hub_and_agent_messages_parse_to_the_same_fields(message: str, fields: dict[str, str]) -> None:
    assert logs.parse(message) == fields


def record(msg: str, level: int = logging.WARNING, name: str = "cpn.hub", *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_key_value_and_json_lines_say_the_same() -> None:
    rec = record("event=nats_error error=%r", logging.WARNING, "cpn.bus", OSError("refused"))
    text = logs.KeyValueFormatter().format(rec)
    assert text.split(" ", 3)[1:] == ["WARNING", "cpn.bus", "event=nats_error error=OSError('refused')"]
    obj = json.loads(logs.JsonFormatter().format(rec))
    assert obj["level"] == "WARNING" and obj["logger"] == "cpn.bus" and obj["event"] == "nats_error"
    assert obj["error"] == "OSError('refused')" and obj["ts"].endswith("Z")
    assert logs.kv("agent_stopped", site="x", pending_events=0) == "event=agent_stopped site=x pending_events=0"


def test_a_repeated_warning_is_written_once_per_window_with_the_count() -> None:
    now = [0.0]
    f = logs.RepeatFilter(window_s=60, clock=lambda: now[0])
    passed = []
    for _ in range(120):  # NATS down: an error twice a second for a minute
        rec = record("event=nats_error error=x")
        if f.filter(rec):
            passed.append(rec)
        now[0] += 0.5
    rec = record("event=nats_error error=x")
    assert f.filter(rec)
    assert len(passed) == 1 and getattr(rec, "cpn_repeated") == 119
    assert "repeated=119" in logs.KeyValueFormatter().format(rec)
    # Other sites, INFO lines and lines about one request are never held back.
    assert f.filter(record("event=site_lost site=a")) and f.filter(record("event=site_lost site=b"))
    assert f.filter(record("event=x", logging.INFO)) and f.filter(record("event=x", logging.INFO))
    assert f.filter(record("event=peer_error request_id=r1")) and f.filter(record("event=peer_error request_id=r2"))


def test_setup_json_lines_from_the_flag() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers = []
        stream = io.StringIO()
        logs.setup("INFO", json_lines=True, stream=stream)
        logs.log(logging.INFO, "agent_started", site="s1", cards=8)
        logging.getLogger("cpn.hub").info("event=hub_started hub=%s", "h1")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [(x["event"], x.get("site") or x.get("hub")) for x in lines] == [("agent_started", "s1"), ("hub_started", "h1")]
        assert lines[0]["cards"] == 8
    finally:
        for h in root.handlers:
            h.close()
        root.handlers, _ = saved[0], root.setLevel(saved[1])


def test_warnings_about_different_things_all_pass() -> None:
    f = logs.RepeatFilter(window_s=60, clock=lambda: 0.0)
    assert f.filter(record("event=tightened_mode path=/a from=644 to=600"))
    assert f.filter(record("event=tightened_mode path=/b from=755 to=700"))
    assert f.filter(record("event=demo_not_ready waited_s=20"))
    assert not f.filter(record("event=demo_not_ready waited_s=40"))  # the same warning, a later count
