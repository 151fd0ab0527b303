"""cpn sim as a whole: deterministic reports, seeds matter, scenarios decode, the core is shared."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.support import pyast

from controlplane.tools.sim import core_scenario, report, runner
from topology import loader

ROOT = Path(__file__).resolve().parents[2]

SMALL = """
name = "small"
hours = 3
sample_s = 300
[inference]
requests = 6000
[[inference.models]]
name = "m7b"
share = 0.7
[[inference.models]]
name = "m72b"
share = 0.3
cards_per_replica = 2.0
slots_per_replica = 2
per_token_ms = 40
[training]
jobs = 40
[[faults.outages]]
city = "shanghai"
tiers = ["edge"]
at_hour = 1.0
duration_h = 0.5
"""


@pytest.fixture(scope="module")
def national():
    return loader.load_default()


def run(seed: int, lay) -> runner.Result:
    return runner.simulate(core_scenario.decode(SMALL, "small"), layout=lay, seed=seed)


def test_same_seed_same_report_to_the_byte(national) -> None:
    a, b = run(3, national), run(3, national)
    # The compared JSON leaves out `timing` (wall-clock figures); docs/sim.md says so.
    assert report.to_json(a.report) == report.to_json(b.report)
    assert "timing" in json.loads(report.to_json(a.report, a.timing))
    rep = a.report
    assert rep["inference"]["requests"] > 5000
    assert rep["training"]["jobs"] > 20
    assert set(rep["inference"]["policies"]) == {"cpn", "random", "round-robin"}
    assert set(rep["training"]["policies"]) == {"cpn", "nearest-hub", "random"}
    assert rep["inference"]["outages"][0]["site"] == "sh-edge"


def test_different_seeds_differ(national) -> None:
    a, b = run(1, national), run(2, national)
    assert report.to_json(a.report) != report.to_json(b.report)
    assert a.report["inference"]["requests"] != b.report["inference"]["requests"]


def test_cpn_beats_random_routing_on_rtt_and_text_names_every_policy(national) -> None:
    res = run(5, national)
    pols = res.report["inference"]["policies"]
    assert pols["cpn"]["rtt_ratio_mean"] < pols["random"]["rtt_ratio_mean"]
    assert pols["cpn"]["within_budget_share"] <= res.report["inference"]["oracle"]["feasible_share"]
    txt = report.text(res.report, res.timing)
    for name in ("cpn", "random", "round-robin", "nearest-hub", "oracle", "run time"):
        assert name in txt


@pytest.mark.parametrize("name", ["national-day", "edge-outage", "tidal-lending"])
def test_shipped_scenarios_decode(name: str) -> None:
    s = runner.load_scenario(name)
    assert s.name == name
    assert name in runner.shipped_scenarios()


def test_national_day_is_the_speed_target_workload() -> None:
    s = runner.load_scenario("national-day")
    assert s.hours == 24 and s.inference.requests >= 1_000_000 and s.training.jobs >= 2000


@pytest.mark.parametrize("text, field", [
    ('name = "x"\nbogus = 1\n', "bogus"),
    ('name = "x"\n[inference]\nbudget_shares = [1.0]\n', "inference.budget_shares"),
    ('name = "x"\n[[inference.models]]\nname = "m"\nshare = -1\n', "inference.models[0].share"),
    ('name = "x"\n[training]\nhours = [5.0, 1.0]\n', "training.hours"),
    ('name = "x"\nstart = "yesterday"\n', "start"),
    ('name = "x"\n[[training.accelerators]]\naccelerators = ["L20"]\nshare = 1\nsizes = [{cards = [8, 1], share = 1}]\n',
     "training.accelerators[0].sizes[0].cards"),
    ('name = "x"\n[[faults.outages]]\nat_hour = 1.0\n', "faults.outages[0]"),
])
def test_bad_scenarios_name_the_field(text: str, field: str) -> None:
    with pytest.raises(core_scenario.ScenarioError) as exc:
        core_scenario.decode(text, "bad.toml")
    assert field in str(exc.value) and str(exc.value).startswith("bad.toml")


def test_unknown_scenario_lists_the_shipped_ones() -> None:
    with pytest.raises(core_scenario.ScenarioError, match="national-day"):
        runner.load_scenario("no-such-scenario")


def calls(path: Path) -> set[str]:
    tree = pyast.parse(path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            out.add(f"{node.value.id}.{node.attr}")
    return out


def test_the_simulator_uses_the_hub_core_and_no_second_implementation() -> None:
    sim = ROOT / "controlplane" / "tools" / "sim"
    inference = (sim / "core_inference.py").read_text()
    assert "from controlplane.core.router import Route, Router, RouteRequest" in inference
    assert "self.routers[p].route(" in inference
    assert "rep_mod.plan_replicas" in calls(sim / "core_inference.py")
    # Replicas are what the hub's deployments reconcile decides (its LoadModels), not a copy of its rules.
    assert "decide.reconcile" in calls(sim / "core_inference.py")
    # cpn's replica scaling is the hub's pure autoscaler, not the simulator's own.
    assert "autoscale.decide" in calls(sim / "core_engine.py")
    assert "decide.autoscaler_asks" in calls(sim / "core_engine.py")  # carried out by the deployments rule
    training = calls(sim / "core_training.py")
    assert {"scheduler.plan", "placement.pool_from_site", "lifecycle.place", "lifecycle.apply_event",
            "lifecycle.infra_failure", "placement.metered_energy_cny"} <= training
    # No module of the simulator defines its own router or scheduler.
    for path in sim.glob("*.py"):
        tree = pyast.parse(path)
        names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        assert not names & {"Router", "plan_replicas", "score_priced", "decide"}, path.name


SCALED = SMALL.replace('name = "m7b"\nshare = 0.7\n', 'name = "m7b"\nshare = 0.7\nmax_replicas = 120\nmax_replicas_per_site = 4\n'
                        ).replace('requests = 6000', 'requests = 40000')


def test_cpn_scales_replicas_and_the_bound_is_physical(national) -> None:
    res = runner.simulate(core_scenario.decode(SCALED, "scaled"), layout=national, seed=4)
    inf = res.report["inference"]
    pols = inf["policies"]
    assert set(pols) == {"cpn", "cpn-fixed", "random", "round-robin"}
    bound = inf["oracle"]["feasible_share"]
    # Nobody beats the physical bound; it is at least the fixed replicas' reach.
    assert all(p["within_budget_share"] <= bound for p in pols.values())
    assert bound >= inf["oracle"]["replica_feasible_share"]
    # Scaling adds capacity where demand needs it: cpn serves more within budget than today's cpn.
    scaled = inf["scaling"]["m7b"]
    assert sum(scaled["scale_outs_by_tier"].values()) > 0 and scaled["first_reasons"]
    assert pols["cpn"]["within_budget_share"] > pols["cpn-fixed"]["within_budget_share"]
    assert pols["cpn"]["failed"] < pols["cpn-fixed"]["failed"]
    # Training figures the issue asks for, per policy.
    for p in res.report["training"]["policies"].values():
        assert {"p50", "p95", "p99"} <= set(p["queue_delay_h"])
        assert 0.0 <= p["idle_while_waiting_share"] <= 1.0
        assert p["idle_while_waiting_card_hours"] <= p["waiting_card_hours"] + 1e-9
    again = runner.simulate(core_scenario.decode(SCALED, "scaled"), layout=national, seed=4)
    assert report.to_json(again.report) == report.to_json(res.report)
    txt = report.text(res.report)
    assert "cpn-fixed" in txt and "bound" in txt and "scaling m7b" in txt


def test_turning_the_baselines_off_keeps_cpns_scaling(national) -> None:
    """``[inference] baselines = false`` skips the baseline runs only: cpn still scales, and its
    figures are those of the run with baselines (each policy has its own random stream)."""
    text = SCALED.replace("[inference]\n", "[inference]\nbaselines = false\n", 1)
    alone = runner.simulate(core_scenario.decode(text, "alone"), layout=national, seed=4).report["inference"]
    both = runner.simulate(core_scenario.decode(SCALED, "scaled"), layout=national, seed=4).report["inference"]
    assert set(alone["policies"]) == {"cpn"}
    assert sum(alone["scaling"]["m7b"]["scale_outs_by_tier"].values()) > 0
    assert alone["scaling"] == both["scaling"]
    assert alone["policies"]["cpn"] == both["policies"]["cpn"]
