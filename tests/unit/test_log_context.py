"""Fields bound to a context (``edge_agent.logs.bound``) reach every line written inside it, in both
formats, and no line outside it; a field the line names itself wins."""

from __future__ import annotations

import io
import json
import logging

from edge_agent import logs


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger(f"cpn.test.context.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, stream


def test_bound_fields_reach_every_line_inside_and_none_outside() -> None:
    logger, stream = capture(logs.JsonFormatter())
    with logs.bound(request_id="r1"):
        logger.info("event=job_submitted job=%s", "job-1")
        with logs.bound(job="job-2"):
            logger.info("event=placed job=%s", "job-3")  # named by the line: it wins
        logger.info("plain text from a library")
    logger.info("event=tick")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e.get("request_id"), e.get("job")) for e in lines] == [
        ("job_submitted", "r1", "job-1"), ("placed", "r1", "job-3"), ("message", "r1", None), ("tick", None, None)]


def test_key_value_lines_carry_them_too() -> None:
    logger, stream = capture(logs.KeyValueFormatter())
    with logs.bound(request_id="r9"):
        logger.warning("event=peer_error site=%s", "sh-edge")
    assert stream.getvalue().rstrip().endswith("event=peer_error site=sh-edge request_id=r9")
