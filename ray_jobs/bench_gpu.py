"""``danmul bench gpu``: the GPU path's figures, one JSON line each, in one command that ends in minutes.

    python -m ray_jobs.bench_gpu                # or: danmul bench gpu; figures on stdout, progress on stderr
    python -m ray_jobs.bench_gpu --quick        # a smoke run of every part at a tiny size (CPU: seconds)

What it measures (the ``base`` preset with random weights on a GPU, the ``tiny`` one without), each figure with
its ratio to the bare figure it is measured against:

- ``bare_inference_eager``, ``bare_inference_channels_last``, ``bare_inference_compiled``: the network alone,
  bf16 autocast, inputs already on the device, the preset's GPU batch; ``vit_b16_inference``: timm's ViT-B/16
  alone, to set this GPU beside the reference figures in DESIGN.md (compile warm-up outside the timing);
- ``header_checks``: the decode step's share of GPU decoding on one core (the CPU path's header checks and
  the plan); ``decode_cpu_pil``: 512 px JPEGs decoded and preprocessed with PIL in one process per core;
  ``decode_nvjpeg``: ``torchvision.io.decode_jpeg`` alone, batched on the GPU; ``decode_gpu``: the batch
  decoder (model/gpu_decode.py: nvJPEG, then shrink, resize, pad, normalise on the GPU);
  ``gpu_decode_agreement``: the batch decoder against the CPU path on every generated image;
- ``backfill_predictor_gpu_decode`` and ``backfill_predictor_cpu_decoded``: the backfill's ``Predictor`` in a
  plain loop over blocks as the decode tasks hand them on (JPEG bytes and plans; or the CPU path's pixels);
- ``replica_batch``: the streaming replica's batch function (``deploy.batch.score_batch``) in a plain loop,
  uploads/s and per-batch p50/p99, beside ``bare_inference_bN``, the bare network at the same batch;
- ``train_step_shared`` and ``train_step_bare``: ``model.train.train_step`` (curriculum, loss, clipping,
  schedule, logging) against a bare forward/backward/AdamW step, bf16, random data on the device;
- with Ray installed: ``ray_backfill_gpu_decode`` and ``ray_backfill_cpu_decode``, the whole ``danmul
  backfill`` over an archive folder of the generated JPEGs. Without Ray one line says these were skipped.

Every part runs in a process of its own with a time limit (a hang or a crash costs that part only: it prints
an ``error`` line and the next part runs), inside one overall budget (``--budget-s``). The generated JPEGs
and the random checkpoint are made once, in a temporary folder, by the ``prepare`` part.
Runs from a source tree with only torch, torchvision, timm, pillow, numpy and pyarrow: Ray only for its part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable

# part -> its time limit on a GPU, s (the whole run is bounded by --budget-s as well); compiled comes late so a slow
# compile cannot starve the others, ray last because it is the one that is optional
PARTS = {"env": 60, "prepare": 120, "inference": 120, "decode": 120, "predictor": 150, "replica": 120,
         "train": 150, "compiled": 240, "ray": 300}  # fmt: skip
QUICK = {"images": 24, "seconds": 0.3, "train_batch": 4, "replica_batches": [8]}
TAGS_PER_IMAGE = 24  # the dataset's average: random weights put every tag near 0.5, the thresholds keep this many
JPEG_SIDE = 512  # Danbooru's 512px set


def log(msg: str) -> None:
    print(f"[bench gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- orchestration (no torch here: a part that cannot even import it fails alone) -----------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, defined once for ``python -m ray_jobs.bench_gpu`` and ``danmul bench gpu``."""
    p.add_argument("--quick", action="store_true", help="every part at a tiny size (a smoke run; CPU: seconds)")
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole run stops within this, s")
    p.add_argument("--seconds", type=float, default=6.0, help="timing per figure, s (after its warm-up)")
    p.add_argument("--images", type=int, default=256, help="distinct 512 px JPEGs generated, then cycled")
    p.add_argument("--replica-batch", type=int, action="append",
                   help="a replica batch size to measure; repeat for several (when none is given: 32, the serving "
                        "default, and 256)%(default).0s")
    p.add_argument("--train-batch", type=int, default=128, help="training batch on the GPU")
    p.add_argument("--parts", default=",".join(PARTS), help="which parts, comma-separated")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray part even where Ray is installed")
    p.add_argument("--part", help=argparse.SUPPRESS)  # a child: run this part
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.bench_gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    settle(args)
    if args.part:
        return run_part(args)
    return orchestrate(args)


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """The sizes ``--quick`` and the defaults that depend on it give."""
    if args.quick:
        args.images, args.seconds, args.train_batch = QUICK["images"], QUICK["seconds"], QUICK["train_batch"]
        args.replica_batch = args.replica_batch or QUICK["replica_batches"]
    args.replica_batch = args.replica_batch or [32, 256]
    return args


def orchestrate(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.budget_s
    workdir = tempfile.mkdtemp(prefix="danmul-bench-gpu-")
    figures: dict[str, float] = {}
    env: dict = {}
    wanted = [p for p in args.parts.split(",") if p]
    unknown = set(wanted) - set(PARTS)
    if unknown:
        print(f"danmul bench gpu: unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    try:
        for part in [p for p in PARTS if p in wanted or p in ("env", "prepare")]:
            if part == "ray" and args.no_ray:
                emit({"figure": "ray", "skipped": "--no-ray", **env}, figures)
                continue
            left = deadline - time.monotonic()
            limit = min(PARTS[part] * (0.5 if args.quick else 1.0), left)
            if limit < 10:
                emit({"figure": part, "skipped": f"the run's budget of {args.budget_s:.0f} s is spent", **env}, figures)
                continue
            log(f"{part}: up to {limit:.0f} s")
            for line in run_child(part, args, workdir, env.get("preset"), limit):
                if part == "env" and "device" in line:
                    env = {k: line.get(k) for k in ("gpu", "torch", "cuda", "device")}
                    env["preset"] = "base" if line.get("device") == "cuda" and not args.quick else "tiny"
                emit({**line, **({} if part == "env" else {k: v for k, v in env.items() if k not in line})}, figures)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def emit(line: dict, figures: dict[str, float]) -> None:
    """Print a figure line, its ratio filled in from an earlier figure if the part could not know it."""
    ref = line.get("ratio_to")
    if line.get("value") is not None and ref and line.get("ratio") is None and figures.get(ref):
        line["ratio"] = round(line["value"] / figures[ref], 3)
    if isinstance(line.get("value"), int | float):
        figures[line["figure"]] = line["value"]
    print(json.dumps(line), flush=True)


def run_child(part: str, args: argparse.Namespace, workdir: str, preset: str | None, limit: float):
    """Run one part in a process of its own; yields its JSON lines; a part that runs over ``limit`` is killed
    with everything it started, one that crashes or prints no figure gets an ``error`` line."""
    cmd = [sys.executable, "-m", "ray_jobs.bench_gpu", "--part", part, "--workdir", workdir,
           "--seconds", str(args.seconds), "--images", str(args.images), "--train-batch", str(args.train_batch),
           *[a for b in args.replica_batch for a in ("--replica-batch", str(b))]]
    if preset:
        cmd += ["--preset", preset]
    if args.quick:
        cmd.append("--quick")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for raw in proc.stdout:
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    end, printed, finished = time.monotonic() + limit, 0, False
    while True:
        try:
            raw = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            break
        if raw is None:
            finished = True
            break
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            print(raw, end="", file=sys.stderr)  # a library wrote to stdout: keep it out of the figures
            continue
        printed += 1
        yield line
    if finished:  # its output is closed; a process stuck on its way out is still stopped at the limit
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, end - time.monotonic()) + 5)
    rc = proc.poll()
    if rc is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        yield {"figure": part, "error": f"timed out after {limit:.0f} s (killed); figures before this line stand"
               if not finished else "its process did not exit after its last figure (killed)"}
        return
    with contextlib.suppress(ProcessLookupError):  # nothing it started outlives it (decode pools, compile workers)
        os.killpg(proc.pid, signal.SIGKILL)
    if rc is not None and rc != 0:
        yield {"figure": part, "error": f"the part's process exited with {rc} (see stderr)"}
    elif not printed:
        yield {"figure": part, "error": "the part printed no figure"}


# -- the parts (each in its own process) ---------------------------------------------------------------------
def run_part(args: argparse.Namespace) -> int:
    part = {"env": part_env, "prepare": part_prepare, "inference": part_inference, "decode": part_decode,
            "predictor": part_predictor, "replica": part_replica, "train": part_train,
            "compiled": part_compiled, "ray": part_ray}[args.part]  # fmt: skip
    try:
        part(args)
    except Exception as e:  # the part's figures so far stand; this one says what went wrong
        traceback.print_exc(file=sys.stderr)
        out(args.part, error=f"{type(e).__name__}: {str(e)[:300]}")
    return 0


def out(figure: str, value: float | None = None, unit: str | None = None, ratio_to: str | None = None,
        ratio: float | None = None, **extra) -> None:
    """One figure as a JSON line on stdout, with the GPU's name and the torch and CUDA versions."""
    import torch

    line = {"figure": figure, "value": None if value is None else round(float(value), 4), "unit": unit,
            "ratio_to": ratio_to, "ratio": None if ratio is None else round(float(ratio), 3)}
    if value is None:
        line = {"figure": figure}
    line.update(extra)
    line.update(gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, torch=torch.__version__,
                cuda=torch.version.cuda)
    print(json.dumps(line), flush=True)


def measure(step: Callable[[], int], seconds: float, device, warmup: int = 2) -> float:
    """Items per second of ``step`` (which returns how many items it did), run for ``seconds`` after ``warmup``
    calls; the device is synchronised before the clock starts and before it stops (work is asynchronous)."""
    for _ in range(warmup):
        step()
    sync(device)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += step()
    sync(device)
    return done / (time.perf_counter() - t0)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_of(args) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_config(args):
    from model.config import preset

    return preset(args.preset or "tiny")


def batch_of(args, cfg) -> int:
    from model.config import default_batch_size

    return 16 if args.quick else default_batch_size(cfg, device_of(args))


def part_env(args) -> None:
    import platform

    versions = {}
    for name in ("torchvision", "timm", "pyarrow", "PIL", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as e:
            versions[name] = f"missing: {type(e).__name__}"
    try:
        import ray

        versions["ray"] = ray.__version__
    except Exception:
        versions["ray"] = None
    from model.gpu_decode import device_decode_available

    device = device_of(args)
    out("environment", device=device, cpus=os.cpu_count(), python=platform.python_version(),
        nvjpeg=device_decode_available("cuda") if device == "cuda" else None, **versions)
    if device != "cuda":
        out("gpu", skipped="no CUDA GPU here: the parts below run on the CPU with the tiny preset, as a check that "
                           "the code runs, not as figures")


def part_prepare(args) -> None:
    """The generated JPEGs (cycled by the other parts) and a random checkpoint of the preset."""
    import torch

    from model.checkpoint import Labels, save
    from model.network import DanmulNet
    from ray_jobs.samples import sample_jpegs

    t0 = time.perf_counter()
    images = sample_jpegs(args.images, long_side=JPEG_SIDE, seed=0)
    write_images(os.path.join(args.workdir, "jpegs.bin"), images)
    cfg = model_config(args)
    torch.manual_seed(0)
    save(os.path.join(args.workdir, "model"), DanmulNet(cfg),
         Labels([f"character_{i}" for i in range(cfg.num_characters)], [f"tag_{i}" for i in range(cfg.num_tags)]))
    out("prepared", args.images, "images", preset=args.preset, image_size=cfg.image_size,
        jpeg_kb=round(sum(map(len, images)) / len(images) / 1024, 1), seconds=round(time.perf_counter() - t0, 1))


def write_images(path: str, images: list[bytes]) -> None:
    with open(path, "wb") as f:
        for data in images:
            f.write(struct.pack(">I", len(data)) + data)


def read_images(args) -> list[bytes]:
    with open(os.path.join(args.workdir, "jpegs.bin"), "rb") as f:
        blob = f.read()
    images, pos = [], 0
    while pos < len(blob):
        (n,) = struct.unpack_from(">I", blob, pos)
        images.append(blob[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return images


def bare_forward(net, cfg, batch: int, device: str, channels_last: bool = False):
    """A step of the bare network on inputs already on the device (image only), bf16 on a GPU."""
    import torch

    from model.curriculum import no_text

    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    text = no_text(batch, cfg.max_tags + 2, device)
    on_gpu = device == "cuda"

    @torch.inference_mode()
    def step() -> int:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu):
            net(pixels, text)
        return batch

    return step


def part_inference(args) -> None:
    import torch

    from model.network import DanmulNet

    cfg, device = model_config(args), device_of(args)
    batch = batch_of(args, cfg)
    torch.manual_seed(0)
    net = DanmulNet(cfg).to(device).eval()
    step = bare_forward(net, cfg, batch, device)
    eager = measure(step, args.seconds, device)
    out("bare_inference_eager", eager, "images/s", batch=batch, preset=args.preset, dtype="bf16" if device == "cuda"
        else "fp32")
    net.image_encoder.to(memory_format=torch.channels_last)
    step = bare_forward(net, cfg, batch, device, channels_last=True)
    out("bare_inference_channels_last", measure(step, args.seconds, device), "images/s", "bare_inference_eager",
        batch=batch)
    if device == "cuda" and not args.quick:  # the reference model of DESIGN.md's figures
        import timm

        vit = timm.create_model("vit_base_patch16_224", pretrained=False).to(device).eval()
        x = torch.randn(256, 3, 224, 224, device=device)

        @torch.inference_mode()
        def vit_step() -> int:
            with torch.autocast(device, dtype=torch.bfloat16):
                vit(x)
            return 256

        out("vit_b16_inference", measure(vit_step, args.seconds, device), "images/s", batch=256,
            reference="8,739 images/s on one H100 (DESIGN.md)")


def part_compiled(args) -> None:
    import torch

    from model.network import DanmulNet

    cfg, device = model_config(args), device_of(args)
    if device != "cuda":
        out("bare_inference_compiled", skipped="torch.compile is measured on a GPU only")
        return
    batch = batch_of(args, cfg)
    torch.manual_seed(0)
    net = DanmulNet(cfg).to(device).eval()
    step = bare_forward(torch.compile(net, dynamic=False), cfg, batch, device)
    t0 = time.perf_counter()
    step()  # compiles: outside the timing
    sync(device)
    compile_s = time.perf_counter() - t0
    out("bare_inference_compiled", measure(step, args.seconds, device), "images/s", "bare_inference_eager",
        batch=batch, compile_s=round(compile_s, 1))


def part_decode(args) -> None:
    import multiprocessing

    import numpy as np

    images = read_images(args)
    cfg, device = model_config(args), device_of(args)
    size = cfg.image_size
    cores = os.cpu_count() or 1
    # PIL in one process per core, forked before this process touches CUDA
    seconds = max(args.seconds, 1.0)
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        rates = pool.starmap(_pil_worker, [(args.workdir, size, seconds, k) for k in range(cores)])
    out("decode_cpu_pil", sum(rates), "images/s", processes=cores, image_size=size, jpeg_side=JPEG_SIDE,
        per_process=round(sum(rates) / cores, 1))

    import torch

    from model.gpu_decode import BatchDecoder, device_decode_available, disagreement, plan
    from model.preprocess import Preprocessor

    k = [0]

    def plans_step() -> int:
        plan(images[k[0] % len(images)], size)
        k[0] += 1
        return 1

    plans = [plan(b, size) for b in images]
    out("header_checks", measure(plans_step, args.seconds, "cpu"), "images/s", processes=1,
        note="the decode tasks' share of GPU decoding: the CPU path's header checks and the plan, one core")
    on = device if device_decode_available(device) else None
    if on is None:
        out("decode_gpu", skipped=f"torchvision cannot decode JPEGs on {device} here")
        return
    batch = batch_of(args, cfg)
    chunks = [[images[(s + i) % len(images)] for i in range(batch)] for s in range(0, len(images), batch)]
    chunk_plans = [[plans[(s + i) % len(images)] for i in range(batch)] for s in range(0, len(images), batch)]
    if device == "cuda":
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [[torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in c] for c in chunks]
        j = [0]

        def raw_step() -> int:
            decode_jpeg(encoded[j[0] % len(encoded)], mode=ImageReadMode.RGB, device=device)
            j[0] += 1
            return batch

        out("decode_nvjpeg", measure(raw_step, args.seconds, device), "images/s", batch=batch,
            note="torchvision.io.decode_jpeg alone, batched, to uint8 RGB at full size")
    decoder = BatchDecoder.for_config(cfg, device)
    j = [0]

    def batch_step() -> int:
        i = j[0] % len(chunks)
        decoder(chunks[i], chunk_plans[i])
        j[0] += 1
        return batch

    out("decode_gpu" if device == "cuda" else "decode_batch_cpu", measure(batch_step, args.seconds, device),
        "images/s", "decode_cpu_pil", batch=batch, device=device, image_size=size,
        note="model.gpu_decode.BatchDecoder with the plans given: decode, shrink, resize, pad, normalise")
    pre = Preprocessor.from_config(cfg)
    cpu = torch.stack([torch.from_numpy(pre.array(b)) for b in images])
    got = torch.cat([decoder(images[s : s + batch]).pixels.cpu() for s in range(0, len(images), batch)])
    mean, outliers = disagreement(got, cpu)
    from model.gpu_decode import MEAN_ABS_TOLERANCE, OUTLIER_SHARE

    out("gpu_decode_agreement", float(mean.max()), "normalised |diff|, worst image", device=device,
        images=len(images), mean_abs=round(float(mean.mean()), 5), worst_outlier_share=round(float(outliers.max()), 5),
        max_abs=round(float((got - cpu).abs().max()), 4),
        within_tolerance=bool(float(mean.max()) <= MEAN_ABS_TOLERANCE and float(outliers.max()) <= OUTLIER_SHARE),
        tolerance={"mean_abs": MEAN_ABS_TOLERANCE, "outlier_share": OUTLIER_SHARE}, gpu_path=int(np.sum(
            [p is not None for p in plans])))  # fmt: skip


def _pil_worker(workdir: str, size: int, seconds: float, offset: int) -> float:
    from model.preprocess import Preprocessor

    ns = argparse.Namespace(workdir=workdir)
    images = read_images(ns)
    pre = Preprocessor(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pre.array(images[(offset * 7 + done) % len(images)])
        done += 1
    return done / (time.perf_counter() - t0)


def realistic_thresholds(tagger, pixels) -> None:
    """Random weights put every tag's probability near 0.5: keep about :data:`TAGS_PER_IMAGE` per image (as a
    trained model's calibrated thresholds do), else the rows hold 10,000 tags and measure nothing real."""
    import numpy as np

    _, tag_probs = tagger.scores(pixels, [None] * len(pixels))
    keep = min(1.0, TAGS_PER_IMAGE / tag_probs.shape[1])
    tagger.set_thresholds(tag_threshold=float(np.quantile(tag_probs, 1.0 - keep)), character_threshold=0.0)


def part_predictor(args) -> None:
    import numpy as np
    import torch

    from model.gpu_decode import PLAN_FIELDS, plan, plan_row
    from model.preprocess import Preprocessor
    from ray_jobs.backfill import Predictor

    images = read_images(args)
    device = device_of(args)
    predictor = Predictor(os.path.join(args.workdir, "model"), None, top_k=5, batch_size=None)
    tagger = predictor.tagger
    cfg, batch = tagger.config, tagger.batch_size if not args.quick else 16
    tagger.batch_size = batch
    pre = Preprocessor.from_config(cfg)
    pixels = np.stack([pre.array(b) for b in images])
    realistic_thresholds(tagger, torch.from_numpy(pixels[: min(len(pixels), batch)]))
    rows = batch * (1 if args.quick else 4)  # as the backfill's blocks on a GPU: --in-flight 4
    plans = [plan_row(plan(b, cfg.image_size)) for b in images]
    common = {"post_id": np.arange(rows), "image_uri": np.array([""] * rows, dtype=object),
              "tags": np.array([""] * rows, dtype=object), "reason": np.array([""] * rows, dtype=object),
              "detail": np.array([""] * rows, dtype=object), "retry": np.zeros(rows, dtype=bool)}  # fmt: skip
    blocks = []
    for start in range(0, len(images), rows):
        idx = [(start + i) % len(images) for i in range(rows)]
        blocks.append({**common, "data": np.array([images[i] for i in idx], dtype=object),
                       "plan": np.stack([plans[i] for i in idx]).astype(np.int32).reshape(rows, PLAN_FIELDS)})
    def cycling(over: list) -> Callable[[], int]:
        """A step that feeds the predictor the next of ``over``'s blocks, round and round."""
        k = [0]

        def step() -> int:
            predictor(over[k[0] % len(over)])
            k[0] += 1
            return rows

        return step

    out("backfill_predictor_gpu_decode", measure(cycling(blocks), args.seconds, device, warmup=1), "images/s",
        "bare_inference_eager", batch=batch, block=rows, device=device,
        note="ray_jobs.backfill.Predictor on blocks of JPEG bytes and plans (the decode tasks' output), plain loop")
    pix_blocks = [{**common, "pixels": pixels[[(start + i) % len(images) for i in range(rows)]]}
                  for start in range(0, len(images), rows)]

    out("backfill_predictor_cpu_decoded", measure(cycling(pix_blocks), args.seconds, device, warmup=1), "images/s",
        "bare_inference_eager", batch=batch, block=rows, device=device,
        note="the same Predictor on blocks of float pixels the CPU path made (decoding itself: decode_cpu_pil)")


def part_replica(args) -> None:
    import numpy as np
    import torch

    from deploy.batch import Item, score_batch
    from model.network import DanmulNet
    from model.preprocess import Preprocessor
    from model.tagger import Tagger

    images = read_images(args)
    device = device_of(args)
    tagger = Tagger.from_checkpoint(os.path.join(args.workdir, "model"))
    cfg = tagger.config
    pre = Preprocessor.from_config(cfg)
    pixels = [torch.from_numpy(pre.array(b)) for b in images]
    realistic_thresholds(tagger, torch.stack(pixels[:16]))
    rng = np.random.default_rng(0)
    vocab = tagger.labels.tags
    tags = [None if i % 2 else [vocab[int(t)] for t in rng.integers(0, len(vocab), 20)] for i in range(len(images))]
    torch.manual_seed(0)
    bare_net = DanmulNet(cfg).to(device).eval()
    for batch in args.replica_batch:
        tagger.batch_size = batch
        step = bare_forward(bare_net, cfg, batch, device)
        bare = measure(step, args.seconds, device)
        out(f"bare_inference_b{batch}", bare, "images/s", batch=batch)
        batches = [[Item(pixels[(s + i) % len(images)], tags[(s + i) % len(images)], 5, None) for i in range(batch)]
                   for s in range(0, len(images), batch)]
        times: list[float] = []
        k = [0]

        def replica_step(batches=batches, times=times, batch=batch, k=k) -> int:
            t0 = time.perf_counter()
            score_batch(tagger, batches[k[0] % len(batches)])
            times.append(time.perf_counter() - t0)
            k[0] += 1
            return batch

        rate = measure(replica_step, args.seconds, device)
        lat = np.array(times[2:] or times) * 1000
        out("replica_batch", rate, "uploads/s", f"bare_inference_b{batch}", rate / bare, batch=batch,
            p50_ms=round(float(np.percentile(lat, 50)), 2), p99_ms=round(float(np.percentile(lat, 99)), 2),
            note="deploy.batch.score_batch (the replica's batch function) on CPU tensors from its decode workers, "
                 "half the uploads with tags; plain loop, no Serve")


def part_train(args) -> None:
    import torch
    import torch.nn.functional as F

    from model import train as training
    from model.curriculum import CurriculumConfig
    from model.network import DanmulNet

    cfg, device = model_config(args), device_of(args)
    batch = args.train_batch
    dtype = torch.bfloat16 if device == "cuda" else None
    data = {
        "images": torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device),
        "tag_ids": torch.randint(5, cfg.text_vocab_size, (batch, cfg.max_tags + 2), device=device),
        "characters": torch.randint(0, cfg.num_characters, (batch,), device=device),
        "tag_targets": (torch.rand(batch, cfg.num_tags, device=device) < 0.002).float(),
    }
    data["tag_ids"][:, 0], data["tag_ids"][:, -1] = 1, 2
    optim, curriculum = training.OptimConfig(), CurriculumConfig()
    total = 10_000  # the shared step runs from mid-schedule, where the curriculum masks and drops tags
    figures = {}
    for name in ("train_step_bare", "train_step_bare_synced", "train_step_shared"):
        torch.manual_seed(0)
        net = DanmulNet(cfg).to(device).train()
        opt = training.make_optimizer(net, optim)
        step_no = [total // 2]

        def shared(net=net, opt=opt, step_no=step_no) -> int:
            training.train_step(net, opt, data, step_no[0], total, optim, curriculum, autocast_dtype=dtype)
            step_no[0] += 1
            return batch

        def bare(net=net, opt=opt, synced=name == "train_step_bare_synced") -> int:
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                o = net(data["images"], data["tag_ids"])
            loss = F.cross_entropy(o["characters"].float(), data["characters"]) + \
                F.binary_cross_entropy_with_logits(o["tags"].float(), data["tag_targets"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if synced:  # what reading the loss every step costs: the host waits for the device
                loss.item()
            return batch

        figures[name] = measure(shared if name == "train_step_shared" else bare, args.seconds, device, warmup=3)
        del net, opt
        if device == "cuda":
            torch.cuda.empty_cache()
    out("train_step_bare", figures["train_step_bare"], "samples/s", batch=batch, preset=args.preset,
        note=f"forward, cross-entropy + BCE, backward, AdamW step; {'bf16 autocast' if dtype else 'fp32'}; random "
             "data on the device")
    out("train_step_bare_synced", figures["train_step_bare_synced"], "samples/s", "train_step_bare",
        figures["train_step_bare_synced"] / figures["train_step_bare"], batch=batch,
        note="the bare step reading its loss (one host-device sync a step, as logging does)")
    out("train_step_shared", figures["train_step_shared"], "samples/s", "train_step_bare",
        figures["train_step_shared"] / figures["train_step_bare"], batch=batch,
        note="model.train.train_step mid-schedule: curriculum masking, the losses, gradient clipping, LR schedule, "
             "logged values")


def part_ray(args) -> None:
    try:
        import ray
    except ImportError:
        out("ray", skipped="Ray is not installed: the Ray Data backfill, Serve replica and Ray Train figures were "
                           "skipped; the same per-batch code (Predictor, score_batch, train_step) was measured in "
                           "plain loops above")
        return
    from ray_jobs.backfill import BackfillConfig, read_results, run
    from ray_jobs.bench_backfill import steady_rate

    images = read_images(args)
    n = 200 if args.quick else 40_000
    archive = os.path.join(args.workdir, "archive")
    for i in range(len(images)):
        with open(os.path.join(args.workdir, f"src-{i}.jpg"), "wb") as f:
            f.write(images[i])
    for i in range(n):  # one file per post, hard links to the generated images: no disk for the copies
        folder = os.path.join(archive, f"{i % 100:04d}")
        os.makedirs(folder, exist_ok=True)
        os.link(os.path.join(args.workdir, f"src-{i % len(images)}.jpg"), os.path.join(folder, f"{i + 1}.jpg"))
    try:
        for mode in ("auto", "off"):
            out_dir = os.path.join(args.workdir, f"out-{mode}")
            result = run(BackfillConfig(input=archive, checkpoint=os.path.join(args.workdir, "model"), out=out_dir,
                                        gpu_decode=mode, progress=False), log=lambda s: log(s))
            steady = len(os.listdir(os.path.join(out_dir, "results"))) > 1  # else the whole run's rate
            rate = steady_rate(out_dir) if steady else result.images_per_s
            read_results(out_dir)
            out("ray_backfill_gpu_decode" if mode == "auto" else "ray_backfill_cpu_decode", rate, "images/s",
                "bare_inference_eager", images=n, gpu_decode=mode, processed=result.processed,
                note="danmul backfill over an archive folder of the generated JPEGs, steady state")
    finally:
        ray.shutdown()
    out("ray_serve_replica", skipped="not measured by bench gpu yet: danmul bench stream measures the Serve replica")
    out("ray_train", skipped="not measured by bench gpu yet: danmul bench train measures Ray Train + Ray Data")


if __name__ == "__main__":
    sys.exit(main())
