"""The Ray test harness's port choice (tests/servers.py): collision-free by construction.

A fresh-clone CI run once failed at ``ray start`` with "Ray component worker_ports is trying to use a port number
... that is used by other components": the harness's ports came from the ephemeral range and could land in the
worker range it gave Ray. These checks run Ray's own validation (``RayParams.update_pre_selected_port``, the code
that raised) on the flags the harness passes, many times, and check the blocks' placement.
"""

from __future__ import annotations

import itertools
import random

import pytest

from tests import servers
from tests.servers import RayCluster, port_block

ray_parameter = pytest.importorskip("ray._private.parameter")

_FLAG_TO_PARAM = {
    "--node-manager-port": "node_manager_port",
    "--object-manager-port": "object_manager_port",
    "--dashboard-agent-listen-port": "dashboard_agent_listen_port",
    "--dashboard-agent-grpc-port": "metrics_agent_port",
    "--metrics-export-port": "metrics_export_port",
    "--runtime-env-agent-port": "runtime_env_agent_port",
    "--min-worker-port": "min_worker_port",
    "--max-worker-port": "max_worker_port",
}


def _params(flags: list[str]) -> dict[str, int]:
    return {_FLAG_TO_PARAM[k]: int(v) for k, v in zip(flags[::2], flags[1::2])}


def test_ray_accepts_the_harness_ports_for_every_node() -> None:
    eph_lo, eph_hi = servers._ephemeral_range()
    rng = random.Random(0)
    blocks = []
    for _ in range(30):
        head = port_block(RayCluster._BLOCK, rng)
        worker = port_block(RayCluster._BLOCK, rng)
        blocks += [head, worker]
        gcs, dashboard, client = head[6:9]
        head_params = ray_parameter.RayParams(
            redis_port=gcs,
            dashboard_port=dashboard,
            ray_client_server_port=client,
            **_params(RayCluster._node_ports(head)),
        )
        head_params.update_pre_selected_port()  # raises on any clash between components and worker ports
        ray_parameter.RayParams(**_params(RayCluster._node_ports(worker))).update_pre_selected_port()
        assert len(head_params.reserved_ports) == 9 + RayCluster.WORKER_PORTS
    for b in blocks:
        # Never handed out by the kernel (bind(0), outgoing connections, free_port()), never a local ray.init()'s.
        assert b.stop <= eph_lo or b.start > eph_hi, (b, eph_lo, eph_hi)
        assert b.start > 19999
    spans = sorted(blocks, key=lambda r: r.start)
    assert all(a.stop <= b.start for a, b in itertools.pairwise(spans)), "two blocks overlap"


def test_free_port_never_inside_a_ray_block() -> None:
    blocks = [port_block(RayCluster._BLOCK) for _ in range(5)]
    for _ in range(50):
        p = servers.free_port()
        assert not any(p in b for b in blocks)
