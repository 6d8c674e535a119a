"""The tests' local Ray: the size every test cluster has, and a cluster of a test's own.

``conftest.ray_cluster`` shares one local Ray between the modules that use it (each start and stop
costs seconds of both cores); :func:`own_ray` is for the few tests that cannot share it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

RAY_CPUS = 4  # logical CPUs on the 2 cores: Serve's controller, proxy and replicas share them


@contextlib.contextmanager
def own_ray(num_cpus: int = RAY_CPUS) -> Iterator[None]:
    """A local Ray of the caller's own, for a test that needs what the shared one cannot give (workers
    that inherit an environment variable set now, a cluster of another size): stops the shared one first
    (the next module that needs it starts it again), and its own at the end."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_until_gone(names: tuple[str, ...], timeout: float = 120) -> None:
    """Wait until this process's Ray runs none of ``names`` (actor classes or task functions, as Ray titles
    its worker processes ``ray::Name...``) and every CPU is free again: what a driver that was killed or
    interrupted started dies some time after the driver, and until then it may still write."""
    import time

    import psutil
    import ray

    deadline = time.monotonic() + timeout
    while True:
        left = []
        for p in psutil.Process().children(recursive=True):
            try:
                title = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::") and any(n in title for n in names):
                left.append(title[:80])
        free = ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU", 0)
        if not left and free:
            return
        assert time.monotonic() < deadline, f"still running after {timeout:g} s: {left or 'CPUs held'}"
        time.sleep(0.25)
