"""The model catalogue and the public-service filing rule (controlplane/market/catalogue.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from controlplane.market import catalogue as cat

# 2024-05-01 00:00 China time = 2024-04-30 16:00 UTC
MAY1_CN = dt.datetime(2024, 5, 1, tzinfo=dt.timezone(dt.timedelta(hours=8))).timestamp()


def model(**kw: object) -> cat.ModelRecord:
    base: dict[str, object] = dict(id="qwen2-7b", owner="acme", version="2", accelerators=("910B",), memory_gb=16.0,
                                   input_fen_per_mtok=200, output_fen_per_mtok=600)
    base.update(kw)
    return cat.ModelRecord(**base)  # type: ignore[arg-type]


PUBLIC = cat.Filing(number="Beijing-QW-202405010001", scope="public", filed_on="2024-05-01", covers_version="2")


def test_public_facing_tenant_is_served_a_filed_model_with_its_number() -> None:
    verdict = cat.may_call(model(filing=PUBLIC), public_facing=True, now=MAY1_CN)
    assert verdict == cat.Allowed(header="Beijing-QW-202405010001")
    assert cat.FILING_HEADER == "X-CPN-Model-Filing"


@pytest.mark.parametrize(("filing", "now", "missing"), [
    (None, MAY1_CN, "no filing"),
    (cat.Filing(number="N-1", scope="internal", filed_on="2024-01-01"), MAY1_CN, "internal use only"),
    (PUBLIC, MAY1_CN - 1, "in force only from 2024-05-01"),   # 23:59:59 on 30 April in Beijing
    (cat.Filing(number="N-2", scope="public", filed_on="2024-01-01", covers_version="1"), MAY1_CN,
     "covers version 1, the model is at version 2"),
])
def test_public_facing_tenant_is_refused_naming_the_missing_filing(
        filing: cat.Filing | None, now: float, missing: str) -> None:
    verdict = cat.may_call(model(filing=filing), public_facing=True, now=now)
    assert isinstance(verdict, cat.Refused)
    assert verdict.code == "model_not_filed" and verdict.model == "qwen2-7b"
    assert missing in verdict.missing and missing in verdict.message
    assert "public service" in verdict.message


def test_internal_tenants_may_call_unfiled_models() -> None:
    assert cat.may_call(model(), public_facing=False, now=MAY1_CN) == cat.Allowed(header=None)
    internal = cat.Filing(number="N-1", scope="internal", filed_on="2024-01-01")
    assert cat.may_call(model(filing=internal), public_facing=False, now=MAY1_CN) == cat.Allowed(header="N-1")


def test_record_problems_name_the_field() -> None:
    assert cat.record_problem(model()) is None
    assert "input_fen_per_mtok" in (cat.record_problem(model(input_fen_per_mtok=1.5)) or "")
    assert "owner" in (cat.record_problem(model(owner="")) or "")
    assert "filed_on" in (cat.record_problem(model(filing=cat.Filing(number="x", scope="public",
                                                                      filed_on="May 1"))) or "")


def test_prices_and_request_estimate() -> None:
    m = model()
    assert cat.price_usage(m, 1_000_000, 500_000) == 200 + 300
    assert cat.estimate_request_fen(m, 2_000, 1_000) == 1   # 0.4 + 0.6 fen = 1.0
