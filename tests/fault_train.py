"""``danmul train`` with one training worker killed mid-run, for the fault-tolerance test.

    python -m tests.fault_train --kill-rank R --kill-epoch E --marker FILE -- <danmul train arguments>

runs ``danmul train`` as the command does, except that each training worker's train shard is wrapped:
worker ``R`` exits (``os._exit``, as a crash or an OOM kill would) after the first step of epoch ``E``
(0-based), once. ``FILE`` records that it happened, so the restarted group trains on. The product holds
no hook for it: this script hands Ray's TorchTrainer a wrapper of the worker function it is given; the
wrapper is defined here in ``__main__`` and so travels to the workers by value.

The kill waits until Ray has recorded the previous epoch's checkpoint: a kill in the moment between a
report and its record would restart the run one epoch further back, which is not what the test asks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def _wait_for_recorded_checkpoint(run_dir: str, endpoint_url: str | None, epoch: int) -> None:
    from ingest.storage import Storage

    runs = Storage(run_dir, endpoint_url)
    deadline = time.monotonic() + 120
    while epoch > 0 and time.monotonic() < deadline:
        try:
            snapshot = json.loads(runs.read_text("checkpoint_manager_snapshot.json"))
            if (snapshot.get("latest_checkpoint_result") or {}).get("metrics", {}).get("epoch", 0) >= epoch:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


class _KillingShard:
    """A train shard whose pass ``at_pass`` ends this process when its second batch is asked for (its first
    step done); every other attribute is the real shard's."""

    def __init__(self, shard, at_pass: int, kill) -> None:
        self._shard, self._at_pass, self._kill, self._passes = shard, at_pass, kill, 0

    def __getattr__(self, name: str):
        return getattr(self._shard, name)

    def iter_torch_batches(self, *args, **kwargs):
        this_pass, self._passes = self._passes, self._passes + 1
        for n, batch in enumerate(self._shard.iter_torch_batches(*args, **kwargs)):
            if this_pass == self._at_pass and n == 1:
                self._kill()
            yield batch


def killing_loop(real_loop, rank: int, epoch: int, marker: str):
    """``real_loop`` on every worker, with worker ``rank`` killed after the first step of ``epoch``."""

    def loop(config: dict[str, Any]) -> None:
        import ray.train

        if ray.train.get_context().get_world_rank() == rank and not os.path.exists(marker):
            get_shard = ray.train.get_dataset_shard

            def kill() -> None:
                _wait_for_recorded_checkpoint(config["run_dir"], config["train"].get("endpoint_url"), epoch)
                with open(marker, "w") as f:
                    f.write(f"killed rank {rank} at epoch {epoch}\n")
                os._exit(1)

            def shard(name: str):
                real = get_shard(name)
                return _KillingShard(real, epoch, kill) if name == "train" else real

            ray.train.get_dataset_shard = shard  # this worker process only
        real_loop(config)

    return loop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill-rank", type=int, required=True)
    parser.add_argument("--kill-epoch", type=int, required=True, help="0-based, after a fresh start")
    parser.add_argument("--marker", required=True)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args

    import ray.train.torch

    from ray_jobs import cli

    trainer, marker = ray.train.torch.TorchTrainer, os.path.abspath(args.marker)

    def killing_trainer(train_loop_per_worker, *a, **kw):
        return trainer(killing_loop(train_loop_per_worker, args.kill_rank, args.kill_epoch, marker), *a, **kw)

    ray.train.torch.TorchTrainer = killing_trainer  # ray_jobs.train imports it when it runs
    return cli.main(["train", *train_args])


if __name__ == "__main__":
    sys.exit(main())
