"""Synthetic layouts for scale tests and benchmarks (e.g. 3,000 sites, 300 origins).

Promises:

- :func:`generate` is deterministic: the same arguments give the same layout, on every platform
  (its generator is a SplitMix64 of its own, so ``topology`` never imports ``random``).
- The result is a valid :class:`layout.Layout`: it goes through the same :func:`fileformat.from_dict`
  as a file, so the backbone follows the same shape rules (hubs meshed, regional pools to their two
  nearest hubs, edge pools to their nearest regional pool or hub).
- Shape: origins spread over eastern and central China's latitude/longitude box, weights heavy-tailed;
  ``n_sites`` counts every tier: ``min(10, max(1, n_sites // 300))`` hubs, ``n_sites // 30`` regional
  pools, the rest edge pools, each placed near an origin chosen in proportion to its weight.
"""

from __future__ import annotations

import bisect
from typing import Any

from . import fileformat
from .layout import Layout

_MASK = (1 << 64) - 1
LAT_RANGE = (21.0, 46.0)
LON_RANGE = (100.0, 124.0)


class SplitMix64:
    """A tiny deterministic PRNG (Steele, Lea and Flood 2014); good enough for synthetic layouts."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def next_u64(self) -> int:
        """The next 64-bit output."""
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        """A float in [0, 1)."""
        return (self.next_u64() >> 11) / float(1 << 53)

    def uniform(self, lo: float, hi: float) -> float:
        """A float in [lo, hi)."""
        return lo + (hi - lo) * self.random()


def generate(n_sites: int = 3000, n_origins: int = 300, seed: int = 0) -> Layout:
    """A synthetic, valid layout with ``n_sites`` sites and ``n_origins`` origins.

    Raises:
        ValueError: ``n_sites`` or ``n_origins`` below 1.
    """
    return fileformat.from_dict(document(n_sites, n_origins, seed), f"<synth {n_sites}x{n_origins} seed={seed}>")


def document(n_sites: int = 3000, n_origins: int = 300, seed: int = 0) -> dict[str, Any]:
    """The layout document :func:`generate` validates (same shape as a parsed TOML file)."""
    if n_sites < 1 or n_origins < 1:
        raise ValueError(f"need n_sites >= 1 and n_origins >= 1, got {n_sites} and {n_origins}")
    rng = SplitMix64(seed)
    origins: list[dict[str, Any]] = []
    for i in range(n_origins):
        u = rng.random()
        origins.append(
            {
                "id": f"o{i:04d}",
                "name": f"City {i}",
                "region": f"r{i % 31:02d}",
                "lat": round(rng.uniform(*LAT_RANGE), 4),
                "lon": round(rng.uniform(*LON_RANGE), 4),
                "weight": round(0.2 + 20.0 * u**4, 4),  # a few large cities, many small ones
            }
        )
    by_weight = sorted(origins, key=lambda o: (-o["weight"], o["id"]))
    cumulative: list[float] = []
    total = 0.0
    for o in origins:
        total += o["weight"]
        cumulative.append(total)

    def pick_city() -> dict[str, Any]:
        return origins[min(len(origins) - 1, bisect.bisect_right(cumulative, rng.random() * total))]

    n_hubs = min(10, max(1, n_sites // 300))
    n_regional = min(n_sites - n_hubs, n_sites // 30)
    sites = []
    for i in range(n_sites):
        if i < n_hubs:
            tier, city, jitter = "hub", by_weight[i % len(by_weight)], 0.2
            acc = {"A800": 6000, "910B": 4000}
        elif i < n_hubs + n_regional:
            tier, city, jitter = "regional", pick_city(), 0.1
            acc = {"910B": 768, "H20": 256}
        else:
            tier, city, jitter = "edge", pick_city(), 0.1
            acc = {"H20": 16, "L20": 16}
        sites.append(
            {
                "id": f"{tier[0]}{i:05d}",
                "name": f"synthetic {tier} {i}",
                "city": city["id"],
                "lat": round(city["lat"] + rng.uniform(-jitter, jitter), 4),
                "lon": round(city["lon"] + rng.uniform(-jitter, jitter), 4),
                "tier": tier,
                "provider": ("cpn-operator", "westgrid", "deltacompute")[i % 3],
                "accelerators": acc,
                "tariff": "synthetic",
                "pue": 1.25 if tier == "hub" else 1.3 if tier == "regional" else 1.42,
                "failure_rate_per_card_hour": 2.0e-5,
                "tee": tier == "hub",
            }
        )
    return {
        "name": f"synth-{n_sites}x{n_origins}-s{seed}",
        "description": "synthetic layout for scale tests (topology.synth)",
        "max_access_km": 10000.0,  # every origin attaches somewhere, however sparse the sites (one site, far corner)
        "illustrative": ["everything: synthetic"],
        "accelerators": {
            "A800": {"vendor": "nvidia", "units": 1.0, "kw_per_card": 0.4, "memory_gb": 80.0},
            "910B": {"vendor": "huawei", "units": 1.0, "kw_per_card": 0.4, "memory_gb": 64.0},
            "H20": {"vendor": "nvidia", "units": 0.47, "kw_per_card": 0.4, "memory_gb": 96.0},
            "L20": {"vendor": "nvidia", "units": 0.38, "kw_per_card": 0.275, "memory_gb": 48.0},
        },
        "tariffs": {
            "synthetic": {
                "flat_cny_per_kwh": 0.6, "peak_cny_per_kwh": 0.9, "valley_cny_per_kwh": 0.3,
                "peak_hours": [8, 9, 10, 17, 18, 19, 20], "valley_hours": [23, 0, 1, 2, 3, 4, 5, 6],
                "source": "synthetic",
            }
        },
        "sites": sites,
        "origins": origins,
    }
