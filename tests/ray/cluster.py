"""A real local Ray cluster for the tests: a head with no CPUs (nothing runs there) and two
worker nodes with one CPU each, every one its own raylet process, all on loopback."""

import os
import signal

from tests.conftest import unavailable

WORKER_NODES = ("gpu-host-a", "gpu-host-b")  # custom resources: each node's own name


def require_ray() -> None:
    """Skip without Ray (``pip install .[ray]``), or fail in CI, where the test extra brings it."""
    try:
        import ray  # noqa: F401
    except ImportError:
        unavailable("ray is not installed: pip install '.[ray]' (the test extra brings it)")


class LocalCluster:
    """``ray.cluster_utils.Cluster`` on a chosen GCS port, so a node can be pointed at it before it
    starts. The test process never connects to it as a driver."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cluster = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.cluster is not None

    def start(self) -> "LocalCluster":
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "gcs_server_port": self.port, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        for name in WORKER_NODES:
            self.cluster.add_node(num_cpus=1, resources={name: 1}, node_ip_address="127.0.0.1")
        self.cluster.wait_for_nodes()
        return self

    def kill_head(self) -> None:
        """SIGKILL the head's processes (its GCS and raylet), as when the head host dies; the
        worker nodes are left to :meth:`shutdown`."""
        assert self.cluster is not None
        self.cluster.head_node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)

    def shutdown(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


def kill(pid: int) -> None:
    """SIGKILL one process of the cluster (a Ray worker hosting an actor)."""
    os.kill(pid, signal.SIGKILL)

