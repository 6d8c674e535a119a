"""The model checkpoint (DESIGN.md, "Model checkpoint"): a folder of four files.

- ``model.safetensors``: the weights (never a pickle);
- ``config.json``: ``{"format", "version", "model": ModelConfig}``: architecture and preprocessing;
- ``labels.json``: characters, tags, per-character abstention thresholds (image-only, and optionally
  for uploads with tags), per-tag thresholds;
- ``metrics.json``: the evaluation that came with it.

The model version is the first 12 hex digits of the SHA-256 of ``model.safetensors``.

``model/`` does no I/O beyond the local disk: the destination or source is a local folder, or any
object with ``write_bytes(rel, data)`` / ``read_bytes(rel)`` (``ingest.storage.Storage`` is one),
which the caller creates for object storage.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model.config import ModelConfig
from model.network import DanmulNet

FORMAT = 1
WEIGHTS, CONFIG, LABELS, METRICS = "model.safetensors", "config.json", "labels.json", "metrics.json"
DEFAULT_TAG_THRESHOLD = 0.35
NEVER_ANSWER = 1.01  # the highest threshold there is: above any probability, even a rounded 1.0


class Reader(Protocol):
    def read_bytes(self, rel: str) -> bytes: ...


class Writer(Protocol):
    def write_bytes(self, rel: str, data: bytes) -> None: ...


class _LocalDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read_bytes(self, rel: str) -> bytes:
        p = self.path / rel
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: is {self.path} a danmul checkpoint?")
        return p.read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{rel}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.path / rel)


def _io(where: str | os.PathLike | Reader | Writer):
    """A local folder path becomes a reader/writer; anything else already is one."""
    return _LocalDir(where) if isinstance(where, str | os.PathLike) else where


@dataclass
class Labels:
    characters: list[str]
    tags: list[str]
    character_thresholds: list[float] = field(default_factory=list)  # abstain below; per class
    tag_thresholds: list[float] = field(default_factory=list)  # per tag
    abstain_precision: float | None = None  # the precision the character thresholds target
    # for uploads that came with tags (the model is surer then); empty: the image-only ones serve both
    character_thresholds_with_tags: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_names("characters", self.characters)
        _check_names("tags", self.tags)
        for name in ("character_thresholds", "character_thresholds_with_tags", "tag_thresholds"):
            _check_probabilities(name, getattr(self, name), top=NEVER_ANSWER)
        if self.abstain_precision is not None:
            _check_probabilities("abstain_precision", [self.abstain_precision])
        if not self.character_thresholds:
            self.character_thresholds = [0.0] * len(self.characters)
        if not self.character_thresholds_with_tags:
            self.character_thresholds_with_tags = list(self.character_thresholds)
        if not self.tag_thresholds:
            self.tag_thresholds = [DEFAULT_TAG_THRESHOLD] * len(self.tags)
        for name, names in (("character_thresholds", "characters"), ("character_thresholds_with_tags", "characters"),
                            ("tag_thresholds", "tags")):
            values, labels = getattr(self, name), getattr(self, names)
            if len(values) != len(labels):
                raise ValueError(f"labels.json: {name} has {len(values)} entries for {len(labels)} {names}")

    @classmethod
    def from_json(cls, data: bytes) -> Labels:
        """Read ``labels.json``. Fields this danmul does not know are ignored (a newer writer may add
        some; an incompatible change bumps ``config.json``'s format instead); every known field is
        checked, so a hand-edited file fails here with its name, not at the first upload."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"labels.json is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError("labels.json must be a JSON object")
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("characters", "tags") if name not in raw]
        if missing:
            raise ValueError(f"labels.json: missing {', '.join(missing)}")
        return cls(**{k: v for k, v in raw.items() if k in known})


def _check_names(name: str, values: Any) -> None:
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"labels.json: {name} must be a list of non-empty strings")
    if len(set(values)) != len(values):
        raise ValueError(f"labels.json: {name} has duplicates")


def _check_probabilities(name: str, values: Any, top: float = 1.0) -> None:
    """Thresholds and precisions are numbers in [0, 1] (a threshold may be up to 1.01: never answer,
    as with ``danmul serve --character-threshold``): NaN would never abstain, 2.0 always would."""
    if not isinstance(values, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= top for v in values):
        raise ValueError(f"labels.json: {name} must be a list of numbers from 0 to {top:g}")


@dataclass
class Checkpoint:
    net: DanmulNet
    config: ModelConfig
    labels: Labels
    metrics: dict[str, Any]
    version: str


def weights_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def save(dest: str | os.PathLike | Writer, net: DanmulNet, labels: Labels,
         metrics: dict[str, Any] | None = None) -> str:
    """Write the four files; returns the model version."""
    writer = _io(dest)
    cfg = net.cfg
    if (len(labels.characters), len(labels.tags)) != (cfg.num_characters, cfg.num_tags):
        raise ValueError("labels do not match the network's heads")
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    weights = save_safetensors(state, metadata={"format": str(FORMAT)})
    version = weights_version(weights)
    config = {"format": FORMAT, "version": version, "model": cfg.to_dict()}
    writer.write_bytes(WEIGHTS, weights)
    writer.write_bytes(LABELS, json.dumps(asdict(labels)).encode())
    writer.write_bytes(METRICS, json.dumps(metrics or {}, indent=1).encode())
    writer.write_bytes(CONFIG, json.dumps(config, indent=1).encode())  # last: marks it complete
    return version


def _read_config(reader) -> dict[str, Any]:
    config = json.loads(reader.read_bytes(CONFIG))
    if config.get("format", 0) > FORMAT:
        raise ValueError(f"checkpoint format {config['format']} is newer than this danmul ({FORMAT})")
    return config


def read_config(src: str | os.PathLike | Reader) -> ModelConfig:
    """The architecture and preprocessing alone, without the weights (what a front end that only
    preprocesses needs)."""
    return ModelConfig.from_dict(_read_config(_io(src))["model"])


def load(src: str | os.PathLike | Reader, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the network from ``config.json`` and load the weights; nothing is unpickled."""
    reader = _io(src)
    config = _read_config(reader)
    cfg = ModelConfig.from_dict(config["model"])
    weights = reader.read_bytes(WEIGHTS)
    version = weights_version(weights)
    if config.get("version") and config["version"] != version:
        raise ValueError(f"weights do not match config.json (version {version} != {config['version']})")
    net = DanmulNet(cfg)
    net.load_state_dict(load_safetensors(weights), strict=True)
    net.to(device).eval()
    labels = Labels.from_json(reader.read_bytes(LABELS))
    try:
        metrics = json.loads(reader.read_bytes(METRICS))
    except FileNotFoundError:
        metrics = {}
    return Checkpoint(net=net, config=cfg, labels=labels, metrics=metrics, version=version)


# -- training state (for resuming; also without pickle) ------------------------------------------------
TRAIN_STATE_TENSORS, TRAIN_STATE_JSON = "optimizer.safetensors", "train_state.json"


def save_train_state(dest: str | os.PathLike | Writer, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Optimizer tensors to safetensors, everything else (param groups, ``state`` such as epoch and
    global step) to JSON, next to the model files of a checkpoint."""
    writer = _io(dest)
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    writer.write_bytes(TRAIN_STATE_TENSORS, save_safetensors(tensors))
    writer.write_bytes(TRAIN_STATE_JSON, json.dumps(
        {"param_groups": sd["param_groups"], "scalars": scalars, "state": state}).encode())


def load_train_state(src: str | os.PathLike | Reader, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer saved by :func:`save_train_state`; returns its ``state`` dict."""
    reader = _io(src)
    meta = json.loads(reader.read_bytes(TRAIN_STATE_JSON))
    tensors = load_safetensors(reader.read_bytes(TRAIN_STATE_TENSORS))
    slots: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        slots.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    return meta["state"]
