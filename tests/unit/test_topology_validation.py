"""Layout validation: one test per rejection reason, each checking the message names file, entry and why."""

from __future__ import annotations

import pytest

from edge_agent import wire
from topology import layout, loader

BASE = """
name = "t"
auto_links = {auto}

[accelerators.A800]
vendor = "nvidia"
units = 1.0
kw_per_card = 0.4
memory_gb = 80

[tariffs.flat]
flat_cny_per_kwh = 0.6
peak_cny_per_kwh = 0.9
valley_cny_per_kwh = 0.3
peak_hours = [9, 10]
valley_hours = [1, 2]

[defaults.edge]
provider = "op"
tariff = "flat"
pue = 1.4
failure_rate_per_card_hour = 2e-5

[[sites]]
id = "sh-hub"
name = "hub"
city = "shanghai"
lat = 31.15
lon = 121.12
tier = "hub"
provider = "op"
accelerators = {{ A800 = 100 }}
tariff = "flat"
pue = 1.25
failure_rate_per_card_hour = 2e-5

[[sites]]
id = "hz-edge"
name = "edge"
city = "hangzhou"
lat = 30.27
lon = 120.16
tier = "edge"
accelerators = {{ A800 = 8 }}

[[origins]]
id = "shanghai"
name = "Shanghai"
region = "shanghai"
lat = 31.23
lon = 121.47
weight = 24.9

[[origins]]
id = "hangzhou"
name = "Hangzhou"
region = "zhejiang"
lat = 30.27
lon = 120.16
weight = 11.9
"""


def text(extra: str = "", auto: str = "true", **replace: str) -> str:
    t = BASE.format(auto=auto)
    for old, new in replace.items():
        old = old.replace("__", " = ")
        assert old in t, old
        t = t.replace(old, new, 1)
    return t + extra


def errors_of(toml_text: str) -> list[str]:
    with pytest.raises(layout.LayoutError) as info:
        loader.loads(toml_text, "net.toml")
    return info.value.errors


def line_of(toml_text: str, needle: str, occurrence: int = 1) -> int:
    n = 0
    for i, line in enumerate(toml_text.splitlines(), start=1):
        if needle in line:
            n += 1
            if n == occurrence:
                return i
    raise AssertionError(needle)


def test_base_is_valid_and_id_rule_matches_wire() -> None:
    lay = loader.loads(text(), "net.toml")
    assert [s.id for s in lay.sites] == ["sh-hub", "hz-edge"]
    assert lay.site("hz-edge").region == "zhejiang"  # from its city
    assert [l.kind for l in lay.links] == ["edge-uplink"]
    assert layout.ID_PATTERN == wire.ID_PATTERN


def test_unknown_key_in_a_site_names_site_line_and_key() -> None:
    t = text(**{'id = "hz-edge"': 'id = "hz-edge"\ncolour = "red"'})
    (msg,) = errors_of(t)
    assert msg.startswith(f"net.toml:{line_of(t, '[[sites]]', 2)}: sites[1] 'hz-edge': ")
    assert "colour" in msg


def test_unknown_top_level_key() -> None:
    (msg,) = errors_of(text().replace('name = "t"', 'name = "t"\nfoo = 1', 1))
    assert msg.startswith("net.toml: layout: ") and "foo" in msg


def test_duplicate_site_id() -> None:
    t = text(**{'id = "hz-edge"': 'id = "sh-hub"'})
    msgs = errors_of(t)
    assert any(m.startswith(f"net.toml:{line_of(t, '[[sites]]', 2)}: sites[1] 'sh-hub': duplicate site id") for m in msgs)


@pytest.mark.parametrize("bad", ["HZ-edge", "hz.edge", "hz edge", "-hz", "x" * 64])
def test_invalid_id_is_not_a_nats_token(bad: str) -> None:
    (msg,) = errors_of(text(**{'id = "hz-edge"': f'id = "{bad}"'}))
    assert f"sites[1] '{bad}': id '{bad}' is not one NATS token" in msg


@pytest.mark.parametrize(("field", "value"), [("lat", "91.0"), ("lat", "-90.5"), ("lon", "180.5"), ("lon", "nan")])
def test_coordinates_out_of_range(field: str, value: str) -> None:
    old = "lat = 30.27" if field == "lat" else "lon = 120.16"
    msgs = errors_of(text(**{old: f"{field} = {value}"}))
    assert any(f"sites[1] 'hz-edge': {field} = {value} is out of range" in m for m in msgs), msgs


def test_disconnected_graph_names_the_stray_site() -> None:
    (msg,) = errors_of(text(auto="false"))
    assert msg.startswith("net.toml: backbone: disconnected: site(s) ")
    assert "hz-edge" in msg or "sh-hub" in msg


def test_link_faster_than_light_names_the_line() -> None:
    # Shanghai hub - Hangzhou is ~100 km great circle: >= 0.49 ms one way on straight fibre
    link = '\n[[links]]\na = "sh-hub"\nb = "hz-edge"\none_way_ms = 0.3\n'
    t = text(link)
    (msg,) = errors_of(t)
    assert msg.startswith(f"net.toml:{line_of(t, '[[links]]')}: links[0] sh-hub--hz-edge: one_way_ms = 0.3 is below the speed-of-light floor")


def test_link_fibre_shorter_than_great_circle() -> None:
    (msg,) = errors_of(text('\n[[links]]\na = "sh-hub"\nb = "hz-edge"\nfibre_km = 50\n'))
    assert "links[0] sh-hub--hz-edge: fibre_km = 50 is shorter than the great-circle distance" in msg


def test_link_to_unknown_site() -> None:
    (msg,) = errors_of(text('\n[[links]]\na = "sh-hub"\nb = "nowhere"\n'))
    assert "links[0] sh-hub--nowhere: b = 'nowhere' is not a site id" in msg


def test_origin_without_attachment() -> None:
    far = '\n[[origins]]\nid = "lhasa"\nname = "Lhasa"\nregion = "tibet"\nlat = 29.65\nlon = 91.17\nweight = 0.9\n'
    t = text(far)
    (msg,) = errors_of(t)
    assert msg.startswith(f"net.toml:{line_of(t, '[[origins]]', 3)}: origins[2] 'lhasa': no attachment")
    # the same origin with an explicit attach list is fine
    assert loader.loads(text(far.replace("weight = 0.9", 'weight = 0.9\nattach = ["sh-hub"]')), "net.toml")


def test_origin_attach_to_unknown_site() -> None:
    (msg,) = errors_of(text(**{"weight = 11.9": 'weight = 11.9\nattach = ["ghost"]'}))
    assert "origins[1] 'hangzhou': attach names unknown site 'ghost'" in msg


def test_site_in_unknown_city_and_unknown_accelerator() -> None:
    msgs = errors_of(text(**{'city = "hangzhou"': 'city = "atlantis"', "A800 = 8": "B200 = 8"}))
    assert any("sites[1] 'hz-edge': city 'atlantis' is not an origin id" in m for m in msgs)
    assert any("sites[1] 'hz-edge': accelerator 'B200' is not defined" in m for m in msgs)


def test_bad_tariff_names_the_table_and_its_line() -> None:
    t = text(**{"valley_hours = [1, 2]": "valley_hours = [9, 24]"})
    msgs = errors_of(t)
    where = f"net.toml:{line_of(t, '[tariffs.flat]')}: tariffs.flat: "
    assert where + "valley_hours has hours outside 0..23: [24]" in msgs
    assert where + "hours [9] are both peak and valley" in msgs


def test_duplicate_origin_and_bad_weight() -> None:
    msgs = errors_of(text(**{'id = "hangzhou"': 'id = "shanghai"', "weight = 11.9": "weight = 0"}))
    assert any("origins[1] 'shanghai': duplicate origin id 'shanghai'" in m for m in msgs)
    assert any("origins[1] 'shanghai': weight = 0.0 must be > 0" in m for m in msgs)


def test_bad_cidr_and_unknown_cidr_origin() -> None:
    msgs = errors_of(text('\n[cidrs]\n"10.0.0.1/8" = "shanghai"\n"10.1.0.0/16" = "paris"\n'))
    assert any(m.startswith("net.toml: cidrs['10.0.0.1/8']: not a network") for m in msgs)
    assert any("cidrs['10.1.0.0/16']: origin 'paris' is not an origin id" in m for m in msgs)


def test_wrong_type_names_the_field() -> None:
    (msg,) = errors_of(text(**{"pue = 1.25": 'pue = "low"'}))
    assert "sites[0] 'sh-hub'" in msg and "`pue`" in msg


def test_bad_toml_and_missing_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (msg,) = errors_of("name = ")
    assert msg.startswith("net.toml: not valid TOML")
    with pytest.raises(layout.LayoutError, match="cannot read"):
        loader.load(tmp_path / "missing.toml")


def test_every_error_is_reported_at_once() -> None:
    t = text(**{'id = "hz-edge"': 'id = "HZ"', "lat = 31.15": "lat = 99"})
    assert len(errors_of(t)) == 2
