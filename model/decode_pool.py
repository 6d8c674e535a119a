"""Decoding with a hard budget per image: a small pool of worker processes that are killed and replaced.

    pool = DecodePool(workers=2, image_size=224, mean=cfg.mean, std=cfg.std)
    pixels = await pool.preprocess_async(data)   # (3, S, S) float32, as Preprocessor.array; or ImageError
    pixels = pool.preprocess(data)               # the same, blocking (the backfill's decode tasks)
    w, h = await pool.check_async(data)          # what the header declares, as preprocess.declared_size
    pool.close()

Why processes: a decode is C code (libjpeg, zlib, libwebp) or Pillow's Python, and neither can be stopped
from another thread; a timeout that stops waiting leaves it running. So each image is decoded in a worker
process (``python -m model.decode_pool``, started with ``subprocess``: not a fork of a Ray worker with its
threads, not multiprocessing's spawn, which would re-import the caller's ``__main__``). The worker imports
Pillow and numpy only, and limits itself: RLIMIT_AS at its own size at start plus
:data:`~model.preprocess.DECODE_MEMORY_MB`, and before each image RLIMIT_CPU at the CPU time it has used
plus :data:`~model.preprocess.DECODE_CPU_S`, so an image that runs over kills it (SIGXCPU) in the kernel,
whatever it is doing. The parent waits :data:`~model.preprocess.DECODE_WALL_S` at most, then kills it.
A worker that died, ran over or ran out of memory is replaced (on the next image), and the image answers
``ImageError("too_costly")``. When the coroutine awaiting an image is cancelled (Serve cancels a replica's
request when its caller gives up), the worker doing that image is killed at once: no abandoned decode
keeps a core busy.

The protocol, on the worker's stdin and stdout: a job is ``kind (1 byte) + length (4 bytes, big-endian) +
payload``; an answer is ``kind + length + payload``: ``A`` the float32 array's bytes, ``C`` a check's
JSON ``{"width", "height"}``, ``E`` an error's JSON ``{"reason", "detail", "declared", "exit"}``; ``R``
(empty) says the worker is ready. Its own stdout is moved to stderr, so nothing a library prints can
break the framing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from model.preprocess import DECODE_CPU_S, DECODE_MEMORY_MB, DECODE_WALL_S, ImageError

log = logging.getLogger("danmul.decode")

_HEADER = struct.Struct(">cI")
PREPROCESS, CHECK, SPIN = b"P", b"C", b"S"  # SPIN burns CPU until the budget stops it: the pool's tests use it
_ARRAY, _CHECKED, _ERROR, _READY = b"A", b"C", b"E", b"R"
PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size for an unprivileged process
START_TIMEOUT_S = 60.0  # a worker imports Pillow and numpy (~0.3 s); far slower means the machine is stuck
# the worker's libraries single-threaded: a decode is one image's work, and OpenBLAS threads would reserve
# address space against RLIMIT_AS for nothing
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class _Lost(Exception):
    """The worker did not answer: it died, ran over its budget or was killed."""


class _Worker:
    """One worker process and the two pipe ends the parent uses."""

    def __init__(self, config: dict):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder that holds model/
        env = {**os.environ, **_WORKER_ENV,
               "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-m", "model.decode_pool", json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
        self.pid = self.proc.pid
        self.to, self.back = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        for fd in (self.to, self.back):  # an answer (3 x 448 x 448 floats: 2.4 MB) in a few writes, not 37
            with contextlib.suppress(OSError):  # over /proc/sys/fs/pipe-max-size: the default 64 KiB
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        os.set_blocking(self.to, False)
        try:
            kind, _ = self._answer(time.monotonic() + START_TIMEOUT_S)
        except _Lost:
            kind = b""
        if kind != _READY:
            raise RuntimeError(f"a decode worker did not start: it {self.kill()} (its stderr is in this log)")

    def call(self, kind: bytes, payload: bytes, wall_s: float) -> tuple[bytes, memoryview]:
        deadline = time.monotonic() + wall_s
        self._send(_HEADER.pack(kind, len(payload)), deadline)
        self._send(payload, deadline)
        return self._answer(deadline)

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            _wait(self.to, select.POLLOUT, deadline)
            try:
                view = view[os.write(self.to, view) :]
            except BlockingIOError:
                continue
            except OSError:  # EPIPE: the worker is gone
                raise _Lost("died") from None

    def _answer(self, deadline: float) -> tuple[bytes, memoryview]:
        kind, length = _HEADER.unpack(self._read(_HEADER.size, deadline))
        return kind, self._read(length, deadline)

    def _read(self, n: int, deadline: float) -> memoryview:
        out = np.empty(n, dtype=np.uint8)  # writable (torch takes the array made on it as is), not zeroed
        view, got = memoryview(out), 0
        while got < n:
            _wait(self.back, select.POLLIN, deadline)
            read = os.readv(self.back, [view[got : got + (1 << 20)]])
            if not read:
                raise _Lost("died")
            got += read
        return view

    def kill(self) -> str:
        """Kill (if alive) and reap; returns how it ended, for the error's detail."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):  # a pipe the dead worker left half-written
                f.close()
        if code == -signal.SIGXCPU:
            return "ran over its CPU budget (SIGXCPU)"
        return f"ended by signal {-code}" if code < 0 else f"exited with status {code}"


def _wait(fd: int, event: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(fd, event)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Lost("timeout")
        if poller.poll(min(left, 1.0) * 1000):
            return  # ready, or hung up (the read or write then says which)


class _Ticket:
    """One job's link to the worker doing it, so a cancelled caller can kill that worker."""

    def __init__(self):
        self.lock = threading.Lock()
        self.worker: _Worker | None = None
        self.cancelled = False

    def start(self, worker: _Worker) -> bool:
        with self.lock:
            if self.cancelled:
                return False
            self.worker = worker
            return True

    def finish(self) -> None:
        with self.lock:
            self.worker = None

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            if self.worker is not None and self.worker.proc.poll() is None:
                self.worker.proc.kill()  # the job's thread reaps it and starts no other job on it


class DecodePool:
    """``workers`` decode processes for one model's preprocessing (``image_size``, ``mean``, ``std``; with
    ``image_size`` None, only :meth:`check` jobs). At most ``workers`` images are decoded at once; more wait
    for a worker. The budgets default to :mod:`model.preprocess`'s."""

    def __init__(self, workers: int, image_size: int | None = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), cpu_s: int = DECODE_CPU_S,
                 memory_mb: int = DECODE_MEMORY_MB, wall_s: float = DECODE_WALL_S):
        if workers < 1 or cpu_s < 1 or memory_mb < 1 or wall_s <= 0:
            raise ValueError("a decode pool needs at least one worker and positive budgets")
        self.image_size, self.wall_s = image_size, wall_s
        self.config = {"image_size": image_size, "mean": list(mean), "std": list(std), "cpu_s": int(cpu_s),
                       "memory_mb": int(memory_mb)}  # fmt: skip
        self.closed = False
        self.idle: queue.Queue[_Worker | None] = queue.Queue()
        self.live: set[_Worker] = set()
        self.lock = threading.Lock()
        for _ in range(workers):  # started now: a worker that cannot start fails the caller's start-up
            self.idle.put(self._start())
        self.threads = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode")

    @classmethod
    def for_config(cls, cfg, workers: int, **budgets) -> DecodePool:
        """A pool for a checkpoint's ``config`` (its input size, mean and std)."""
        return cls(workers, cfg.image_size, cfg.mean, cfg.std, **budgets)

    # -- the jobs ------------------------------------------------------------------------------------------
    def preprocess(self, data: bytes) -> np.ndarray:
        """``Preprocessor.array(data)`` in a worker: (3, S, S) float32, or :class:`ImageError`."""
        return self._run(PREPROCESS, data, _Ticket())

    async def preprocess_async(self, data: bytes) -> np.ndarray:
        return await self._run_async(PREPROCESS, data)

    def check(self, data: bytes) -> tuple[int, int]:
        """``preprocess.declared_size(data)`` in a worker: the declared (width, height), or :class:`ImageError`
        (with ``declared`` when the header was read)."""
        return self._run(CHECK, data, _Ticket())

    async def check_async(self, data: bytes) -> tuple[int, int]:
        return await self._run_async(CHECK, data)

    async def _run_async(self, kind: bytes, data: bytes):
        ticket = _Ticket()
        job = asyncio.get_running_loop().run_in_executor(self.threads, self._run, kind, data, ticket)
        try:
            return await job
        except asyncio.CancelledError:  # the caller gave up: stop the work, not only the wait
            ticket.cancel()
            raise

    # -- one job ---------------------------------------------------------------------------------------------
    def _run(self, kind: bytes, data: bytes, ticket: _Ticket):
        if kind == PREPROCESS and self.image_size is None:
            raise ValueError("this pool was made without an image size: it only checks")
        worker = self.idle.get()  # a worker, or None for a slot whose worker was killed
        try:
            if self.closed:
                raise RuntimeError("the decode pool is closed")
            if worker is None:
                worker = self._start()
            if not ticket.start(worker):
                raise ImageError("too_costly", "cancelled before it started")
            try:
                answer, payload = worker.call(kind, bytes(data), self.wall_s)
            except _Lost as e:
                pid, how = worker.pid, self._retire(worker)
                worker = None
                if ticket.cancelled:
                    raise ImageError("too_costly", "cancelled: its caller gave up") from None
                over = f"gave no answer within {self.wall_s:g} s" if str(e) == "timeout" else how
                log.warning("decode worker %d stopped (%s); it is replaced", pid, over)
                raise ImageError("too_costly", f"decoding stopped: the worker {over} (budget {self.config['cpu_s']} "
                                               f"s of CPU, {self.config['memory_mb']} MB)") from None
            finally:
                ticket.finish()
            if answer == _ERROR and json.loads(bytes(payload)).get("exit"):  # it exits after answering (memory spent)
                self._retire(worker)
                worker = None
            return self._result(answer, payload)
        finally:
            self.idle.put(worker)

    def _result(self, answer: bytes, payload: memoryview):
        if answer == _ARRAY:
            s = self.image_size
            return np.frombuffer(payload, dtype=np.float32).reshape(3, s, s)
        if answer == _CHECKED:
            size = json.loads(bytes(payload))
            return size["width"], size["height"]
        if answer == _ERROR:
            err = json.loads(bytes(payload))
            raise ImageError(err["reason"], err["detail"], tuple(err["declared"]) if err["declared"] else None)
        raise RuntimeError(f"a decode worker answered {answer!r}")

    def _start(self) -> _Worker:
        worker = _Worker(self.config)
        with self.lock:
            self.live.add(worker)
        return worker

    def _retire(self, worker: _Worker) -> str:
        with self.lock:
            self.live.discard(worker)
        return worker.kill()

    def pids(self) -> list[int]:
        """The live workers' process ids (tests, operators)."""
        with self.lock:
            return sorted(w.pid for w in self.live)

    def close(self) -> None:
        """Kill every worker (jobs in progress answer ``too_costly``); the pool takes no more jobs."""
        self.closed = True
        with self.lock:
            workers = list(self.live)
        for w in workers:
            self._retire(w)
        for _ in workers:
            self.idle.put(None)  # wakes jobs waiting for a worker: they see the pool closed
        self.threads.shutdown(wait=False, cancel_futures=True)


# -- the worker process ----------------------------------------------------------------------------------------
def _vm_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def _limit_self(memory_mb: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a budget kill (SIGXCPU) dumps no core
    cap = _vm_size() + (memory_mb << 20)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))


def _cpu_budget(cpu_s: int) -> None:
    """RLIMIT_CPU at the CPU this process has used, rounded up, plus the budget: the kernel sends SIGXCPU
    (whose default action ends the process) when the next image runs over."""
    import math
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(used.ru_utime + used.ru_stime) + cpu_s
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _read_exact(fd: int, n: int) -> bytes | None:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, min(n - len(out), 1 << 20))
        if not chunk:
            return None
        out += chunk
    return bytes(out)


def _write(fd: int, kind: bytes, payload) -> None:
    """``payload``: bytes, or an array, written from its own memory (no copy)."""
    view = memoryview(payload).cast("B")
    parts = [memoryview(_HEADER.pack(kind, len(view))), view]
    while parts:
        sent = os.writev(fd, parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts.pop(0))
        if parts:
            parts[0] = parts[0][sent:]


def _worker_main(config: dict) -> None:
    from PIL import Image

    from model.preprocess import Preprocessor, declared_size

    jobs_in, answers = os.dup(0), os.dup(1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the answers
    sys.stdout = sys.stderr
    Image.init()  # every plugin imported now, so their memory is part of the base the budget adds to
    pre = Preprocessor(config["image_size"], config["mean"], config["std"]) if config["image_size"] else None
    _limit_self(config["memory_mb"])
    _write(answers, _READY, b"")
    while True:
        head = _read_exact(jobs_in, _HEADER.size)
        if head is None:
            return  # the parent closed the pipe (or died): nothing more to do
        kind, length = _HEADER.unpack(head)
        data = _read_exact(jobs_in, length)
        if data is None:
            return
        _cpu_budget(config["cpu_s"])
        try:
            if kind == SPIN:
                while True:
                    pass
            if kind == CHECK:
                w, h = declared_size(data)
                _write(answers, _CHECKED, json.dumps({"width": w, "height": h}).encode())
                continue
            _write(answers, _ARRAY, pre.array(data))
        except ImageError as e:
            # out of memory (the address-space budget): answer, then make way for a fresh process
            spent = e.reason == "undecodable" and e.detail.startswith("MemoryError")
            reason, detail = ("too_costly", f"over the memory budget of {config['memory_mb']} MB") if spent else (
                e.reason, e.detail)
            _write(answers, _ERROR, json.dumps({"reason": reason, "detail": detail[:300], "exit": spent,
                                                "declared": e.declared}).encode())  # fmt: skip
            if spent:
                return
        except Exception as e:  # a bug, not the image: answered as the image's, the worker goes on
            _write(answers, _ERROR, json.dumps({"reason": "undecodable", "detail": f"{type(e).__name__}: {e}"[:300],
                                                "exit": False, "declared": None}).encode())  # fmt: skip


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
