"""The ``danmul`` command line. Each subcommand is a thin front end over ``ingest/``, ``model/`` or a
Ray job; heavy imports happen inside the command that needs them, so ``danmul --help`` is instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ray_jobs import config as cfgmod


def _data_build(args: argparse.Namespace) -> int:
    from ingest.build import BuildConfig, build
    from ingest.stats import format_stats

    cfg = cfgmod.resolve(BuildConfig, args, args.config)
    result = build(cfg, progress=args.progress)
    print(format_stats(result.info))
    rate = result.lines / result.seconds if result.seconds else 0.0
    print(f"\n{result.lines:,} metadata lines in {result.seconds:.1f} s ({rate:,.0f} lines/s) -> {cfg.out}")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from ingest.stats import format_stats
    from ingest.synth import SynthConfig, synthesize

    cfg = cfgmod.resolve(SynthConfig, args, args.config)
    info = synthesize(cfg, progress=args.progress)
    print(format_stats(info))
    print(f"\nwritten to {cfg.out}")
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    from ingest.shards import load_info
    from ingest.stats import format_stats
    from ingest.storage import Storage

    info = load_info(Storage(args.uri, args.endpoint_url))
    print(format_stats(info))
    return 0


def _bench_build(args: argparse.Namespace) -> int:
    from ray_jobs.bench_build import main as bench_main

    return bench_main(args.lines or [100_000, 1_000_000], workdir=args.workdir, keep=args.keep)


def _train(args: argparse.Namespace) -> int:
    from ray_jobs.train import run
    from ray_jobs.train_config import TrainConfig

    cfg = cfgmod.resolve(TrainConfig, args, args.config)
    try:
        run(cfg)
    finally:
        import ray

        if ray.is_initialized() and not cfg.address:
            ray.shutdown()
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ray_jobs.train import evaluate_checkpoint, format_eval

    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.endpoint_url)
    print(format_eval(metrics, f"{args.split} split"))
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from ray_jobs.bench_train import main as bench_main

    return bench_main(epochs=args.epochs, workers=args.workers, image_size=args.image_size)


def _bench_stream(args: argparse.Namespace) -> int:
    from ray_jobs.bench_stream import main as bench_main

    return bench_main(uploads=args.uploads, image_size=args.image_size, max_batch_size=args.max_batch_size,
                      latency_s=args.latency_s, consumers=args.consumers)


def _bench_backfill(args: argparse.Namespace) -> int:
    from ray_jobs.bench_backfill import main as bench_main

    return bench_main(args.images or [10_000, 50_000], batch_size=args.batch_size, image_size=args.image_size)


def _bench_gpu(args: argparse.Namespace) -> int:
    from ray_jobs.bench_gpu import run

    return run(args)


def _bench_paper(args: argparse.Namespace) -> int:
    from ray_jobs.paper_claim import ordering_checks, run

    try:
        results = run(args.data, epochs=args.epochs, steps=args.steps, seed=args.seed, out=args.out,
                      characters=args.characters, images=args.images, image_size=args.image_size, workers=args.workers)
    finally:
        if args.workers:
            import ray

            ray.shutdown()
    return 0 if all(ok for _, ok in ordering_checks(results)) else 1  # a failed ordering check fails the run


def _tag(args: argparse.Namespace) -> int:
    import json

    from ingest.storage import Storage
    from ingest.tags import parse_tag_string
    from model.preprocess import ImageError
    from model.tagger import Tagger

    tagger = Tagger.from_checkpoint(Storage(args.checkpoint, args.endpoint_url), device=args.device)
    tagger.set_thresholds(tag_threshold=args.threshold)
    given = parse_tag_string(args.tags) if args.tags else None
    failures = 0
    for uri in args.images:
        try:
            storage = Storage(uri, args.endpoint_url)
            [pred] = tagger.predict([storage.read_bytes()], tags=[given], top_k=args.top_k)
            print(json.dumps({"image": uri, **pred.to_dict()}))
        except (ImageError, OSError) as e:
            failures += 1
            print(json.dumps({"image": uri, "error": str(e)}))
    return 1 if failures else 0


def _serve(args: argparse.Namespace) -> int:
    from deploy.settings import ServeSettings
    from ray_jobs.stream import serve_forever

    settings = cfgmod.resolve(ServeSettings, args, args.config)
    if args.write_config:
        import yaml

        from deploy.app import serve_config
        from ingest.queue import without_password

        with open(args.write_config, "w") as f:
            yaml.safe_dump(serve_config(settings), f, sort_keys=False)
        print(f"wrote {args.write_config}: deploy it with `serve deploy {args.write_config}` or in a RayService")
        if without_password(settings.redis) != settings.redis:
            print("  the Redis password was not written: set REDIS_PASSWORD (or DANMUL_REDIS_URL) where the tagger "
                  "runs, e.g. from a Kubernetes Secret")
        return 0
    serve_forever(settings, log=lambda line: print(line, flush=True))
    return 0


def _enqueue(args: argparse.Namespace) -> int:
    from ingest.queue import redact
    from ray_jobs.stream import EnqueueSettings, enqueue_all

    cfg = cfgmod.resolve(EnqueueSettings, args, args.config)
    if not args.sources and not cfg.data:
        raise ValueError("nothing to enqueue: give image files or URIs, or --data")
    done = enqueue_all(cfg, args.sources)
    print(f"enqueued {done.count:,} uploads on {redact(cfg.redis)} {cfg.prefix}uploads (entries {done.first} .. "
          f"{done.last})")
    for why in done.refused:
        print(f"danmul: refused: {why}", file=sys.stderr)
    return 1 if done.refused else 0


def _backfill(args: argparse.Namespace) -> int:
    import ray

    from ray_jobs.backfill import BackfillConfig, run

    cfg = cfgmod.resolve(BackfillConfig, args, args.config)
    try:
        result = run(cfg, log=lambda line: print(line, flush=True))
    finally:
        if not cfg.address:
            ray.shutdown()
    return EXIT_TEMPFAIL if result.retry else 0


EXIT_TEMPFAIL = 75  # sysexits' EX_TEMPFAIL: finished, but some work failed for reasons that may pass (run again)


def _demo(args: argparse.Namespace) -> int:
    from ray_jobs.demo import run_demo

    return run_demo(args.out, quick=args.quick, keep_serving=args.keep_serving)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="settings file; flags override it")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")


def _settings_command(sub, name: str, helptext: str, cls: type, func: Callable) -> argparse.ArgumentParser:
    """A subcommand whose options are a settings dataclass's fields, plus ``--config FILE.yaml``."""
    p = sub.add_parser(name, help=helptext)
    cfgmod.add_arguments(p, cls)
    p.add_argument("--config", metavar="FILE.yaml", help="settings file; flags override it")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    from ingest.build import BuildConfig
    from ingest.synth import SynthConfig

    parser = argparse.ArgumentParser(
        prog="danmul",
        description="Anime character identification and Danbooru tag prediction (Dan:mul).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own log lines (else they go to the session's log folder only; "
                             "the same as DANMUL_LOG_LEVEL=debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="build, generate and inspect Dan:mul datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("build", help="build Dan:mul from Danbooru2021 metadata and 512px images")
    cfgmod.add_arguments(p, BuildConfig)
    _add_common(p)
    p.set_defaults(func=_data_build)
    p = data_sub.add_parser("synth", help="generate a synthetic Dan:mul-like dataset")
    cfgmod.add_arguments(p, SynthConfig)
    _add_common(p)
    p.set_defaults(func=_data_synth)
    p = data_sub.add_parser("stats", help="print the statistics table of a dataset")
    p.add_argument("uri", help="dataset URI (local folder or s3://bucket/prefix)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.set_defaults(func=_data_stats)

    p = sub.add_parser("train", help="train with Ray Train (DDP) fed by Ray Data; resumes the same OUT/NAME")
    from ray_jobs.train_config import TrainConfig

    cfgmod.add_arguments(p, TrainConfig)
    p.add_argument("--config", metavar="FILE.yaml", help="settings file; flags override it")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split, image-only and with tags")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or s3:// URI")
    p.add_argument("--data", required=True, help="dataset URI")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (default: test)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.set_defaults(func=_eval)

    bench = sub.add_parser("bench", help="benchmarks (figures go in the README)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    p = bench_sub.add_parser("build", help="Dan:mul build on generated metadata: lines/s and peak memory")
    p.add_argument("--lines", type=int, action="append",
                   help="metadata lines per run; repeat to compare sizes (default: 100000 and 1000000)")
    p.add_argument("--workdir", default=None, help="where to generate inputs (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated inputs and outputs")
    p.set_defaults(func=_bench_build)

    p = bench_sub.add_parser("train", help="Ray Train + Ray Data input pipeline vs. in-memory tensors")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is excluded (default: 4)")
    p.add_argument("--workers", type=int, default=2, help="training workers (default: 2)")
    p.add_argument("--image-size", type=int, default=64, help="image side, px (default: 64)")
    p.set_defaults(func=_bench_train)

    p = bench_sub.add_parser("stream", help="streaming tagger vs. the bare model: uploads/s and latency")
    p.add_argument("--uploads", type=int, default=3000, help="uploads in the throughput run (default: 3000)")
    p.add_argument("--image-size", type=int, default=64, help="image side and model input, px (default: 64)")
    p.add_argument("--max-batch-size", type=int, default=32, help="dynamic batching limit (default: 32)")
    p.add_argument("--latency-s", type=float, default=20.0, help="length of the half-load run, s (default: 20)")
    p.add_argument("--consumers", type=int, default=1, help="queue consumers (default: 1)")
    p.set_defaults(func=_bench_stream)

    p = bench_sub.add_parser("backfill", help="backfill vs. the bare model: images/s, peak memory by archive size")
    p.add_argument("--images", type=int, action="append",
                   help="archive size; repeat to compare (default: 10000 and 50000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model batch (default: 64)")
    p.add_argument("--image-size", type=int, default=64, help="image side and model input, px (default: 64)")
    p.set_defaults(func=_bench_backfill)

    p = bench_sub.add_parser("gpu", help="the GPU path (base preset): bare model eager and compiled, GPU vs CPU "
                             "decoding, backfill predictor, replica batch and training step against the bare model; "
                             "one JSON line per figure, in minutes; without a GPU the CPU-side parts at a tiny size",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from ray_jobs.bench_gpu import add_arguments as bench_gpu_arguments

    bench_gpu_arguments(p)
    p.set_defaults(func=_bench_gpu)

    p = bench_sub.add_parser("paper", help="the paper's claim on any Dan:mul dataset (default: a synthetic one): "
                             "image-only vs multimodal, with and without curriculum, and its ordering checks")
    p.add_argument("--data", default=None, help="dataset URI (default: generate a synthetic one)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs per model (default: from the step budget, as danmul train)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per model (default: the larger of 10 epochs and 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of training (default: 0)")
    p.add_argument("--characters", type=int, default=24, help="synthetic characters (default: 24)")
    p.add_argument("--images", type=int, default=2400, help="synthetic images (default: 2400)")
    p.add_argument("--image-size", type=int, default=None,
                   help="synthetic images' side and the model's input, px (default: synthetic images of 64 px, the "
                        "input chosen from the train images as danmul train does)")
    p.add_argument("--out", default=None, help="where to save the three checkpoints (default: not saved)")
    p.add_argument("--workers", type=int, default=0,
                   help="train each model with danmul train on this many Ray workers (default: 0, one process)")
    p.set_defaults(func=_bench_paper)

    p = sub.add_parser("tag", help="tag image files with a checkpoint (one JSON line per image)")
    p.add_argument("images", nargs="+", help="image paths or s3:// URIs")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or s3:// URI")
    p.add_argument("--tags", default=None, help='tags that came with the images, e.g. "1girl solo"')
    p.add_argument("--threshold", type=float, default=None,
                   help="tag threshold for every tag (default: the checkpoint's calibrated ones)")
    p.add_argument("--top-k", type=int, default=5, help="characters to list (default: 5)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.set_defaults(func=_tag)

    from deploy.settings import ServeSettings
    from ray_jobs.backfill import BackfillConfig
    from ray_jobs.stream import EnqueueSettings

    p = _settings_command(sub, "serve", "run the streaming tagger: Redis uploads in, tags back, HTTP API, metrics",
                          ServeSettings, _serve)
    p.add_argument("--write-config", metavar="FILE.yaml",
                   help="write these settings as a Serve config file (serve deploy, KubeRay) and exit")
    p = _settings_command(sub, "enqueue", "put uploads on the stream (image files, s3:// URIs or a dataset split)",
                          EnqueueSettings, _enqueue)
    p.add_argument("sources", nargs="*", help="image files or s3:// URIs (post id from a numeric file name)")
    _settings_command(sub, "backfill", "tag an archive with Ray Data: results as Parquet, resumable",
                      BackfillConfig, _backfill)

    p = sub.add_parser("demo", help="run the whole system end to end on embedded defaults")
    p.add_argument("--out", default="demo-out", help="folder for the demo's data, model and results")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (used by the tests)")
    p.add_argument("--keep-serving", action="store_true",
                   help="leave the streaming tagger running at the end (HTTP 8000, metrics 9500) until Ctrl-C")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from ray_jobs.local_ray import LOG_LEVEL_ENV, logs_folder, native_stderr_to_logs

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[LOG_LEVEL_ENV] = "debug"
    native_stderr_to_logs()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"danmul: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        import ray

        if ray.is_initialized() or os.path.isdir(logs_folder()):
            print(f"danmul: the full logs of Ray's processes are in {logs_folder()} (or run with --verbose)",
                  file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
