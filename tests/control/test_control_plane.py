"""The control plane as a real process: registry queries and the breaker view of sidecars."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agentmesh import Mesh, MeshUnavailable
from tests.control.control_process import control_process, control_tls
from tests.flaky import flaky_endpoint


@pytest.fixture
def control_url(nats_url: str, bucket: str, tmp_path: Path) -> Iterator[str]:
    with control_process(nats_url, bucket, tmp_path) as url:
        yield url


async def test_sidecars_report_ejections_to_the_control_plane(
    control_url: str, mesh: Mesh, wait_until, tmp_path: Path
):
    admin = {"authorization": f"Bearer {(tmp_path / 'admin-token').read_text().strip()}"}
    async with (
        flaky_endpoint(mesh) as (flaky, flaky_id),
        httpx.AsyncClient(headers=admin, verify=control_tls(tmp_path)) as http,
    ):
        await wait_until(lambda: bool(mesh.sidecar.index.targets("work")))

        async def endpoints() -> list[dict[str, object]]:
            resp = await http.get(f"{control_url}/v1/endpoints")
            assert resp.status_code == 200
            return list(resp.json())

        async def listed() -> bool:
            return any(item["instance_id"] == flaky_id for item in await endpoints())

        await wait_until(listed, timeout=5)
        for _ in range(5):
            with pytest.raises(MeshUnavailable):
                await mesh.call("work", retries=0)
        assert mesh.sidecar.outbound.endpoints.get(flaky_id).breaker.state == "open"

        async def ejected() -> bool:
            for item in await endpoints():
                if item["instance_id"] == flaky_id:
                    return item["ejected_by"] == [mesh.sidecar.name]
            return False

        await wait_until(ejected, timeout=5)
        flaky.failing = False
