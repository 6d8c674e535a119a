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
