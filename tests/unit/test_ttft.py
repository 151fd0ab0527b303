"""ttft: the predictor and admission by SLO, known answers."""

from __future__ import annotations

import pytest

from controlplane.core import ttft

PROFILES = {"A800": ttft.Profile(accelerator="A800", prefill_tokens_per_s=4000.0, base_ms=20.0)}


def cand(site: str, rtt_ms: float, *, busy: int = 0, queue: int = 0, slots: int = 4, service_ms: float = 2000.0):
    return ttft.Candidate(site=site, rtt_ms=rtt_ms, accelerator="A800", slots=slots, busy=busy, queue_depth=queue,
                          service_ms=service_ms)


def test_prediction_is_rtt_plus_queue_plus_prefill() -> None:
    p = ttft.predict(cand("a", 2.0, busy=4, queue=3), 800, PROFILES["A800"])
    # 3 queued + 4 busy - 4 slots + 1 = 4 places behind, 4 slots each 2 s: 2 s; prefill 20 + 200 ms.
    assert (p.rtt_ms, p.queue_ms, p.prefill_ms) == (2.0, 2000.0, 220.0)
    assert p.ttft_ms == pytest.approx(2222.0)
    assert ttft.predict(cand("b", 2.0, busy=3), 800, PROFILES["A800"]).queue_ms == 0.0


def test_a_site_with_a_long_queue_loses_to_a_farther_idle_one() -> None:
    near_busy = cand("near", 1.0, busy=4, queue=12)
    far_idle = cand("far", 8.0)
    out = ttft.admit([near_busy, far_idle], 400, slo_ms=500.0, profiles=PROFILES)
    assert isinstance(out, ttft.Admit) and out.prediction.site == "far"
    assert out.prediction.ttft_ms == pytest.approx(8.0 + 20.0 + 100.0)
    # With an idle near site, the near one wins.
    out = ttft.admit([cand("near", 1.0), far_idle], 400, slo_ms=500.0, profiles=PROFILES)
    assert isinstance(out, ttft.Admit) and out.prediction.site == "near"


def test_refused_at_once_with_retry_after_when_every_site_is_saturated() -> None:
    out = ttft.admit([cand("a", 1.0, busy=4, queue=8), cand("b", 4.0, busy=4, queue=4)], 400, slo_ms=300.0,
                     profiles=PROFILES)
    assert isinstance(out, ttft.Refuse)
    assert out.best is not None and out.best.site == "b"  # (4 + 1) / 4 × 2 s = 2.5 s behind
    assert out.retry_after_s == 3.0 and "exceeds the SLO of 300 ms" in out.reason


def test_calibration_moves_towards_reports() -> None:
    p = PROFILES["A800"]
    for _ in range(200):
        p = ttft.calibrate(p, 1000, 20.0 + 500.0)  # sites report 2,000 tokens/s
    assert p.prefill_tokens_per_s == pytest.approx(2000.0, rel=1e-3)
