"""The operator dashboard in a real headless Chromium (Debian ``chromium``) against a running network.

The page loads with no network access beyond the gateway (the province outlines are served by the
hub), shows every site of the running network, and shows a killed site as lost on its next poll.
Without a key, or with a tenant key, the page shows no data: ``/v1/dashboard`` is admin only.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.test_foundation import until
from tests.support.engines import needs
from tests.support.hubrig import running_network
from topology import loader

CHROMIUM = shutil.which("chromium") or "chromium"


async def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (virtual time lets the first polls finish)."""
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
        "--virtual-time-budget=5000", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


def site_states(dom: str) -> dict[str, str]:
    """site id -> state, from the map's site symbols."""
    return dict(re.findall(r'<g class="site" data-site="([^"]+)" data-state="([^"]+)"', dom))


@needs("chromium", package="chromium")
@pytest.mark.timeout(180)
async def test_the_dashboard_shows_the_running_network_and_a_killed_site(tmp_path: Path) -> None:
    async with running_network(tmp_path) as net:
        assert net.hub is not None
        hub = net.hub
        base = f"http://127.0.0.1:{hub.http_port}"
        admin = net.credentials["admin_key"]
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/v1/dashboard", headers={"Authorization": f"Bearer {net.credentials['tenant_key']}"}) as resp:
                assert resp.status == 403
            async with session.get(base + "/dashboard/static/hub.db") as resp:  # only the page's own assets
                assert resp.status == 404

        dom = await dump_dom(f"{base}/dashboard#key={admin}", tmp_path / "profile1")
        states = site_states(dom)
        assert states == {s.id: "up" for s in loader.load(loader.data_path("demo-3")).sites}, states
        assert dom.count('class="province"') >= 30  # the outlines, from the hub itself
        assert "demo-chat" in dom and 'data-loaded="yes"' in dom

        victim = next(a for a in net.agents if a.config.site == "hz-edge")
        await victim.bus.close()  # killed, not stopped: no goodbye
        await until(lambda: hub.registry.get("hz-edge").state == "lost", 10, "site lost")  # type: ignore[union-attr]
        dom = await dump_dom(f"{base}/dashboard#key={admin}", tmp_path / "profile2")
        states = site_states(dom)
        assert states["hz-edge"] == "lost" and all(v == "up" for k, v in states.items() if k != "hz-edge"), states
        assert "hz-edge LOST" in dom  # labelled on the map
        assert re.search(r'<span class="lost">lost</span> hz-edge', dom)  # and listed under recent faults

        dom = await dump_dom(f"{base}/dashboard", tmp_path / "profile3")  # no key: a form, no data
        assert site_states(dom) == {} and "Admin key" in dom
