"""PNG plots of a ``cpn sim`` report (matplotlib, the optional extra ``cpn[map]``).

``write(report, out_dir) -> [paths]`` draws ``utilisation.png`` (cards busy by tier, hour by hour),
``inference.png`` (share served within budget per hour, each policy and the oracle bound),
``training.png`` (energy cost per unit of work and on the jobs every policy completed, vs the
oracle), ``training-busy.png`` (each policy's training cards busy by tier, hour by hour, 0-100%)
and ``report.png``, all of them on one page. Raises ``ImportError`` if matplotlib is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"cpn": "#1f77b4", "cpn-fixed": "#17becf", "random": "#ff7f0e", "round-robin": "#2ca02c", "nearest-hub": "#d62728",
           "oracle": "#7f7f7f", "hub": "#1f77b4", "regional": "#9467bd", "edge": "#2ca02c"}


def _utilisation(ax: Any, rep: dict[str, Any]) -> None:
    u = rep["utilisation"]
    for tier, vals in u["hourly_by_tier"].items():
        if u["cards"].get(tier):
            ax.plot(range(len(vals)), [100 * v for v in vals], label=f"{tier} ({u['cards'][tier]:,} cards)",
                    color=COLOURS.get(tier))
    ax.set_title(f"cards busy by tier (cpn), overall mean {100 * u['overall_mean']:.1f}%")
    ax.set_xlabel("hour of run")
    ax.set_ylabel("% of cards busy")
    ax.set_ylim(0, 100)  # a share: the whole axis, so small differences look small
    ax.legend(fontsize=8)


def _inference(ax: Any, rep: dict[str, Any]) -> None:
    inf = rep["inference"]
    for name, p in inf["policies"].items():
        ax.plot([100 * v for v in p["hourly_within_share"]], label=f"{name} ({100 * p['within_budget_share']:.1f}%, "
                f"RTT×{p['rtt_ratio_mean']:.2f})", color=COLOURS.get(name))
    orc = inf["oracle"]
    ax.plot([100 * v for v in orc["hourly_feasible_share"]], "--",
            label=f"bound: physically feasible ({100 * orc['feasible_share']:.1f}%)", color=COLOURS["oracle"])
    ax.set_title(f"inference served within budget, {inf['requests']:,} requests")
    ax.set_xlabel("hour of run")
    ax.set_ylabel("% of requests")
    ax.set_ylim(0, 100)  # shares on the whole axis; the differences are written out below
    cpn = inf["policies"].get("cpn")
    if cpn:
        lines = [f"{name} − bound: {100 * (p['within_budget_share'] - orc['feasible_share']):+.2f} pp over the day, "
                 f"worst hour {min(100 * (a - b) for a, b in zip(p['hourly_within_share'], orc['hourly_feasible_share'])):+.2f} pp"
                 for name, p in inf["policies"].items()]
        ax.text(0.02, 0.04, "\n".join(lines), transform=ax.transAxes, fontsize=7, va="bottom")
    ax.legend(fontsize=8, loc="center right")


def _training(ax: Any, rep: dict[str, Any]) -> None:
    tr = rep["training"]
    names = list(tr["policies"])
    common = [tr["policies"][n]["completed_in_common_cny"] for n in names] + [tr["oracle"]["completed_in_common_cny"]]
    labels = names + ["oracle"]
    bars = ax.bar(labels, common, color=[COLOURS.get(n, "#333333") for n in labels])
    for b, n in zip(bars, names):
        p = tr["policies"][n]
        floor = p.get("hourly_floor_cny_per_a800_card_hour")
        ax.annotate(f"{p['cny_per_a800_card_hour']:.3f} CNY/A800-h" + (f" (floor {floor:.3f})" if floor else "")
                    + f"\n{p['completed']:,} jobs done\n"
                    f"wait p50/p95 {p['queue_delay_h']['p50']:.2f}/{p['queue_delay_h']['p95']:.2f} h",
                    (b.get_x() + b.get_width() / 2,
                    b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, max(common, default=1.0) * 1.35)
    ax.set_title(f"training energy on the {tr['completed_by_every_policy']:,} jobs every policy completed")
    ax.set_ylabel("CNY")


def _training_busy(ax: Any, rep: dict[str, Any]) -> None:
    tr = rep["training"]
    styles = {"hub": "-", "regional": "--", "edge": ":"}
    for name, p in tr["policies"].items():
        for tier, vals in p.get("training_busy_hourly_by_tier", {}).items():
            ax.plot(range(len(vals)), [100 * v for v in vals], styles.get(tier, "-"), color=COLOURS.get(name),
                    label=f"{name} {tier} ({tr.get('training_cards_by_tier', {}).get(tier, 0):,} cards)")
    ax.set_title("training cards busy by tier, each policy")
    ax.set_xlabel("hour of run")
    ax.set_ylabel("% of the tier's training cards")
    ax.set_ylim(0, 100)  # a share: the whole axis
    lines = [f"{n}: idle while jobs wait {100 * p.get('idle_while_waiting_share', 0.0):.1f}% of waiting card-hours"
             for n, p in tr["policies"].items()]
    ax.text(0.02, 0.04, "\n".join(lines), transform=ax.transAxes, fontsize=7, va="bottom")
    ax.legend(fontsize=7, loc="upper right", ncol=2)


def write(rep: dict[str, Any], out: Path) -> list[Path]:
    """Write the PNGs into ``out`` (created if needed); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    panels = [("utilisation", _utilisation), ("inference", _inference), ("training", _training),
              ("training-busy", _training_busy)]
    active = [(n, f) for n, f in panels
              if not (n == "inference" and not rep["inference"]["requests"])
              and not (n.startswith("training") and not rep["training"]["jobs"])]
    for name, draw in active:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        draw(ax, rep)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, axes = plt.subplots(len(active), 1, figsize=(9, 4.2 * len(active)), squeeze=False)
    for ax, (_, draw) in zip(axes[:, 0], active):
        draw(ax, rep)
    fig.suptitle(f"cpn sim: {rep['scenario']} on {rep['layout']}, {rep['hours']:g} h, seed {rep.get('seed', 0)}")
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths
