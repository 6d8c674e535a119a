"""Joining a Ray cluster, or starting a local one sized for the job, the same way for every command."""

from __future__ import annotations

import os
import sys


def ensure_ray(address: str | None, cpus_needed: float = 0, dashboard: bool = False) -> None:
    """Connect to ``address`` (else ``RAY_ADDRESS``, as ``ray job submit`` and KubeRay set it), or start a
    local Ray with at least ``cpus_needed`` logical CPUs (on a small machine the job's actors and tasks
    share the cores). ``dashboard`` also starts the State API (Ray Train's clean-up needs it). Ray Data's
    per-execution INFO lines go to its log file in the session folder rather than the console (unless
    ``RAY_DATA_LOGGING_CONFIG`` says otherwise)."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    quiet_data = os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml")
    env = {"RAY_DATA_LOGGING_CONFIG": os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", quiet_data)}
    ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)), include_dashboard=dashboard,
             dashboard_host="127.0.0.1", log_to_driver=True, runtime_env={"env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
