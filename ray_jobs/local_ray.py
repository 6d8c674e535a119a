"""Joining a Ray cluster, or starting a local one sized for the job, the same way for every command.

The console is danmul's: by default Ray's own lines (its INFO and WARNING logs, the raylet's notices,
everything the workers and actors print) go only to the session's log folder, and danmul prints its own
lines (the driver's progress, one line per training epoch). ``danmul --verbose`` (or
``DANMUL_LOG_LEVEL=debug``) shows Ray's lines too. A real error still reaches the console: the exception
that ends the command, with where the full logs are.

Ray's C++ core in the driver process writes its own error lines (advice about actor restarts, workers
that exited) straight to file descriptor 2, past Python's logging. For the ``danmul`` command, once it
has started a local Ray, descriptor 2 goes to ``danmul-driver-PID.err`` in the session's log folder and
Python's ``sys.stderr`` (danmul's errors, tracebacks, progress bars) keeps the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

LOG_LEVEL_ENV = "DANMUL_LOG_LEVEL"
_native_stderr = {"to_logs": False, "done": False}


def native_stderr_to_logs() -> None:
    """Called by the ``danmul`` command: a local Ray started later sends the driver's C++ lines to the logs."""
    _native_stderr["to_logs"] = True


def verbose() -> bool:
    return os.environ.get(LOG_LEVEL_ENV, "").lower() in ("debug", "verbose")


def logs_folder() -> str:
    """Where the local Ray session keeps every process's log (its latest session)."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), "ray", "session_latest", "logs")


def quiet_libraries() -> None:
    """Unless verbose: the driver's own Ray libraries log warnings and errors only (Serve configures its
    logger at INFO when it is imported, so it is imported here first), and Ray's Python warnings (advice
    about concurrency and deprecations) stay out of the console."""
    if verbose():
        return
    import warnings

    with contextlib.suppress(ImportError):  # Serve's extras may be missing where only Ray Data runs
        import ray.serve  # noqa: F401  (its import sets its logger up; then the level below holds)

    for name in ("ray", "ray.serve", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")


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
    loud = verbose()
    quiet = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.ERROR}
    quiet_libraries()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
        return
    quiet_data = os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml")
    env = {"RAY_DATA_LOGGING_CONFIG": os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", quiet_data),
           # Ray Train re-routes a worker's print() through logging *and* the console: every line twice
           "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")}
    ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)), include_dashboard=dashboard,
             dashboard_host="127.0.0.1", runtime_env={"env_vars": env}, **quiet)
    _split_native_stderr()
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def _split_native_stderr() -> None:
    """Descriptor 2 to a file in the session's log folder; ``sys.stderr`` to a copy of the console."""
    if not _native_stderr["to_logs"] or _native_stderr["done"] or verbose():
        return
    try:
        fd = os.open(os.path.join(logs_folder(), f"danmul-driver-{os.getpid()}.err"),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return  # no log folder to write to: the console keeps everything
    sys.stderr.flush()
    console = os.dup(2)
    sys.stderr = os.fdopen(console, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                           errors="backslashreplace")
    os.dup2(fd, 2)
    os.close(fd)
    _native_stderr["done"] = True
