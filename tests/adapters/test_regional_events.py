"""Regional event streams: where a site's events are stored, and the streams' shape (the behaviour
across a cut is in tests/e2e/test_regions.py)."""

from __future__ import annotations

from controlplane.compose import _bus
from controlplane.config import HubConfig
from controlplane.nats import bus as hubbus
from controlplane.runtime import BackgroundTasks
from topology import loader


def test_a_regional_stream_is_placed_in_its_region_and_shares_the_events_budget() -> None:
    bus = hubbus.HubBus("nats://127.0.0.1:1", on_register=lambda m: None, on_heartbeat=lambda m: None)  # type: ignore[arg-type,return-value]
    home = bus.event_stream_config(3, shares=3)
    east = bus.event_stream_config(1, "east", shares=3)
    assert (home.name, home.subjects, home.placement) == ("CPN_EVENTS", ["cpn.v1.events.*"], None)
    assert east.name == "CPN_EVENTS_east" and east.subjects == ["cpn.v1.events.east.*"]
    assert east.placement is not None and east.placement.tags == ["region:east"]
    assert east.num_replicas == 1
    budget = bus.site_limits.stream_max_bytes
    assert home.max_bytes == east.max_bytes == budget // 3
    assert bus.event_stream_config(3).max_bytes == budget  # no regional streams: the whole budget


def test_stored_subjects_name_their_site() -> None:
    assert hubbus.stored_event_subject("hz-edge") == "cpn.v1.events.hz-edge"
    assert hubbus.stored_event_subject("hz-edge", "east") == "cpn.v1.events.east.hz-edge"
    assert hubbus.site_of_stored("cpn.v1.events.hz-edge") == "hz-edge"
    assert hubbus.site_of_stored("cpn.v1.events.east.hz-edge") == "hz-edge"
    assert hubbus.site_of_stored("cpn.v1.events.East!.hz-edge") is None
    assert hubbus.site_of_stored("cpn.v1.events.a.b.c") is None


def test_a_site_of_a_listed_region_goes_to_its_regions_stream() -> None:
    layout = loader.load_default()
    east = next(r for r in layout.regions if r.id == "east")
    site = next(s.id for s in layout.sites if layout.region_of_site(s.id) == "east")
    other = next(s.id for s in layout.sites if layout.region_of_site(s.id) != "east")
    config = HubConfig(event_regions={east.id: 3})
    bus = _bus(config, [], BackgroundTasks("t").scope("bus"), layout)
    assert bus.event_region_of(site) == "east"
    assert bus.event_region_of(other) is None  # its region has no stream listed: CPN_EVENTS
    assert bus.event_region_of("not-in-the-layout") is None


def test_a_site_is_behind_while_its_regions_stream_has_a_backlog() -> None:
    layout = loader.load_default()
    site = next(s.id for s in layout.sites if layout.region_of_site(s.id) == "east")
    other = next(s.id for s in layout.sites if layout.region_of_site(s.id) == "north")
    bus = _bus(HubConfig(event_regions={"east": 1, "north": 1}), [], BackgroundTasks("t").scope("bus"), layout)
    assert not bus.events_behind(site)  # nothing seen yet: nothing known to wait for
    bus.events_backlog["CPN_EVENTS_east"] = 3
    assert bus.events_behind(site) and not bus.events_behind(other)
    bus.events_backlog["CPN_EVENTS_east"] = 0
    assert not bus.events_behind(site)
