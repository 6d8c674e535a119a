"""The decode pool (``model.decode_pool``): worker processes that decode exactly as the in-process
preprocessing does, and that are killed and replaced when an image runs over its CPU, memory or wall-clock
budget or its caller gives up. The CPU overrun uses the pool's test job (SPIN: burns CPU until stopped) with
a 1 s budget; the memory overrun a real image under a small address-space budget. No assertion is on
wall-clock time: a budget overrun is told by the answer (``too_costly``) and the replaced process."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
from hostile_images import corpus, encode
from PIL import Image

from model.decode_pool import SPIN, DecodePool, _Ticket
from model.preprocess import ImageError, Preprocessor, declared_size

S = 48
MEAN, STD = (0.48, 0.45, 0.41), (0.23, 0.22, 0.22)
PRE = Preprocessor(S, MEAN, STD)
CORPUS = corpus()


def outcome(fn, data):
    try:
        return fn(data)
    except ImageError as e:
        return e.reason


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"worker {pid} still alive"
        time.sleep(0.05)


@pytest.fixture
def pool():
    p = DecodePool(2, S, MEAN, STD, cpu_s=1)
    yield p
    p.close()


def test_the_pool_decodes_the_corpus_as_the_process_itself_does(pool):
    for name, (data, expected) in CORPUS.items():
        got, want = outcome(pool.preprocess, data), outcome(PRE.array, data)
        if isinstance(want, str):
            assert got == want == expected, name
        else:
            assert expected == "ok" and got.dtype == np.float32 and np.array_equal(got, want), name


def test_checks_answer_the_declared_size_or_the_reason_with_it(pool):
    for name in ("photo.jpg", "strip_600x40000.png", "bomb_1bit_9000x6000.png", "dot_1x1.png", "random_bytes",
                 "png_2.5M_empty_chunks.png", "postscript_8MB.eps", "zero_bytes"):  # fmt: skip
        data = CORPUS[name][0]
        try:
            want = declared_size(data)
        except ImageError as e:
            want = (e.reason, e.declared)
        try:
            got = pool.check(data)
        except ImageError as e:
            got = (e.reason, e.declared)
        assert got == want, name


def test_concurrent_jobs_each_get_their_own_answer(pool):
    items = [(n, d) for n, (d, _) in CORPUS.items() if len(d) < (2 << 20)][:24]

    async def run_all():
        return await asyncio.gather(*[pool.preprocess_async(d) for _, d in items], return_exceptions=True)

    answers = asyncio.run(run_all())
    for (name, data), got in zip(items, answers, strict=True):
        want = outcome(PRE.array, data)
        if isinstance(want, str):
            assert isinstance(got, ImageError) and got.reason == want, name
        else:
            assert np.array_equal(got, want), name
    assert len(pool.pids()) == 2  # nobody was replaced


def test_a_job_over_its_cpu_budget_is_killed_the_worker_replaced_and_the_next_image_decodes(pool):
    before = pool.pids()
    with pytest.raises(ImageError) as over:
        pool._run(SPIN, b"", _Ticket())
    assert over.value.reason == "too_costly" and "CPU budget" in over.value.detail, over.value
    gone = set(before) - set(pool.pids())
    assert len(gone) == 1 and not alive(gone.pop())  # killed by the kernel (SIGXCPU), and reaped
    photo = CORPUS["photo.jpg"][0]
    assert np.array_equal(pool.preprocess(photo), PRE.array(photo))
    assert np.array_equal(pool.preprocess(photo), PRE.array(photo))  # both slots work (one restarted)
    assert len(pool.pids()) == 2 and set(pool.pids()) != set(before)


def test_the_wall_clock_backstop_kills_a_worker_the_cpu_budget_has_not():
    p = DecodePool(1, S, MEAN, STD, cpu_s=3600, wall_s=1.0)
    try:
        [pid] = p.pids()
        with pytest.raises(ImageError) as over:
            p._run(SPIN, b"", _Ticket())
        assert over.value.reason == "too_costly" and "no answer within 1 s" in over.value.detail
        assert not alive(pid)
        assert p.preprocess(CORPUS["photo.bmp"][0]).shape == (3, S, S)
    finally:
        p.close()


def test_an_image_over_the_memory_budget_answers_an_error_and_the_next_one_decodes():
    big = encode(Image.new("RGB", (4000, 3000), (10, 200, 30)), "PNG")  # 12 Mpx: 36 MB decoded, at least
    p = DecodePool(1, S, MEAN, STD, memory_mb=24)
    try:
        assert PRE.array(big).shape == (3, S, S)  # fine in this process, with no budget
        with pytest.raises(ImageError) as over:
            p.preprocess(big)
        assert over.value.reason == "too_costly" and "memory" in over.value.detail
        small = CORPUS["photo.jpg"][0]
        assert np.array_equal(p.preprocess(small), PRE.array(small))
    finally:
        p.close()


def test_a_cancelled_caller_kills_the_worker_doing_its_image_at_once():
    p = DecodePool(1, S, MEAN, STD, cpu_s=3600, wall_s=3600)
    try:
        [pid] = p.pids()

        async def give_up() -> None:
            job = asyncio.ensure_future(p._run_async(SPIN, b""))
            await asyncio.sleep(0.5)  # the worker is spinning on it
            assert alive(pid) and not job.done()
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job

        asyncio.run(give_up())
        wait_gone(pid)  # well before any budget (an hour here) would have stopped it
        photo = CORPUS["photo.jpg"][0]
        assert np.array_equal(p.preprocess(photo), PRE.array(photo))  # a fresh worker took its place
        assert p.pids() != [pid]
    finally:
        p.close()


def test_a_job_cancelled_while_it_waits_for_a_worker_never_runs():
    p = DecodePool(1, S, MEAN, STD, cpu_s=3600, wall_s=3600)
    try:
        [pid] = p.pids()

        async def main() -> None:
            first = asyncio.ensure_future(p._run_async(SPIN, b""))
            waiting = asyncio.ensure_future(p.preprocess_async(CORPUS["photo.jpg"][0]))
            await asyncio.sleep(0.3)
            waiting.cancel()
            first.cancel()
            for job in (first, waiting):
                with pytest.raises(asyncio.CancelledError):
                    await job

        asyncio.run(main())
        wait_gone(pid)
        assert p.check(CORPUS["photo.jpg"][0]) == (64, 48)
    finally:
        p.close()


def test_a_closed_pool_takes_no_jobs_and_leaves_no_workers():
    p = DecodePool(2, S, MEAN, STD)
    pids = p.pids()
    p.close()
    assert p.pids() == [] and not any(alive(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="closed"):
        p.preprocess(CORPUS["photo.jpg"][0])


def test_a_check_only_pool_refuses_to_preprocess():
    p = DecodePool(1)
    try:
        assert p.check(CORPUS["photo.jpg"][0]) == (64, 48)
        with pytest.raises(ValueError, match="image size"):
            p.preprocess(CORPUS["photo.jpg"][0])
    finally:
        p.close()
