"""What a model is, without building it: lightly's architecture keys, where its weights come from, and
what identifies its vectors. Torch-free, so the daemon can find a cached artifact without importing torch.

Where the weights come from, first match wins (`find_weights`, mirrored by `embed.load_model`, which
loads them):
1. `checkpoint=PATH`; then the store's own trained model (`trained`);
2. a local copy of lightly's pretrained file (`weights_file`, e.g. from $POOLWATCH_WEIGHTS);
3. lightly's pretrained weights (when `lightly.pre_trained`): a copy in `<shared_dir>/models/`, torch
   hub's cache, else lightly's URL (downloaded by the model builder, which falls back to 4 offline);
4. random weights, seeded by `model.init_seed`, saved as `<shared_dir>/models/random-<arch>-seed<seed>.pt`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store import ModelRecord

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INIT_SEED = 1
_RANDOM_DETAIL_RE = re.compile(r"^seed (\d+)$")


@dataclass(frozen=True)
class ModelSpec:
    name: str = "resnet-18"
    width: float = 1.0
    num_ftrs: int = 32
    out_dim: int = 128
    input_size: int = 64

    @classmethod
    def from_lightly(cls, lightly: dict[str, Any]) -> ModelSpec:
        m = lightly["model"]
        return cls(m["name"], float(m["width"]), int(m["num_ftrs"]), int(m["out_dim"]), int(lightly["collate"]["input_size"]))

    @property
    def zoo_key(self) -> str:
        return f"{self.name}/simclr/d{self.num_ftrs}/w{float(self.width)}"

    @property
    def slug(self) -> str:
        return f"{self.name}-w{self.width:g}-d{self.num_ftrs}"

    def arch(self) -> dict[str, Any]:
        return {"name": self.name, "width": self.width, "num_ftrs": self.num_ftrs, "out_dim": self.out_dim}


@dataclass
class ModelInfo:
    """A model's provenance, as the store records it; `weights_hash` identifies the weights."""

    name: str  # what the log and the metrics call it: the lightly slug, or onnx:<file name>
    source: str  # checkpoint | pretrained | random | trained | onnx
    detail: str  # path, URL or seed
    weights_hash: str
    arch: dict[str, Any]
    dim: int
    input_size: int
    path: str | None = None
    notes: list[str] = field(default_factory=list)  # things the caller should log (fallbacks)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "detail": self.detail, "weights_hash": self.weights_hash,
                "arch": self.arch, "dim": self.dim, "input_size": self.input_size, "path": self.path, "notes": self.notes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(data["name"], data["source"], data["detail"], data["weights_hash"], dict(data["arch"]), int(data["dim"]),
                   int(data["input_size"]), data.get("path"), list(data.get("notes", [])))


@dataclass(frozen=True)
class WeightsRef:
    """Which weights a configuration asks for, before any are loaded."""

    source: str  # checkpoint | trained | pretrained | random
    detail: str  # path, URL or "seed N"
    path: Path | None  # the file that holds them; None: not on disk (a download to try, random ones to make)
    file_hash: str | None = None  # sha256 of that file's bytes (None for random: the seed makes them)

    def key(self) -> dict[str, Any]:
        """What identifies the weights before loading them (part of an artifact's cache key)."""
        if self.source == "random":
            return {"source": "random", "detail": self.detail}
        return {"source": self.source, "detail": self.detail if self.file_hash is None else "", "file": self.file_hash}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@cache
def lightly_zoo() -> dict[str, str]:
    """lightly's model zoo URLs, read from its `models/zoo.py` without importing lightly (which imports torch)."""
    spec = importlib.util.find_spec("lightly")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "zoo.py"
    loader_spec = importlib.util.spec_from_file_location("_lightly_zoo", path)
    if loader_spec is None or loader_spec.loader is None:
        return {}
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return dict(module.ZOO)


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub."""
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home).expanduser() / "torch" / "hub"


def random_weights_path(models_dir: Path, spec: ModelSpec, seed: int) -> Path:
    return models_dir / f"random-{spec.slug}-seed{seed}.pt"


def find_weights(spec: ModelSpec, *, models_dir: Path, checkpoint: Path | None = None, trained: Path | None = None,
                 weights_file: Path | None = None, pretrained: bool = True, seed: int = 1,
                 hub_dir: Path | None = None) -> WeightsRef:
    """The weights the configuration asks for (the module docstring's order), hashed where they are a file.
    A named file that does not exist is returned as is: loading it gives the error."""
    for source, given in (("checkpoint", checkpoint), ("trained", trained), ("pretrained", weights_file)):
        if given is not None:
            return WeightsRef(source, str(given), given, file_sha256(given) if given.is_file() else None)
    url = lightly_zoo().get(spec.zoo_key)
    if pretrained and url:
        filename = Path(url).name
        hub = hub_dir if hub_dir is not None else torch_hub_dir()
        for candidate in (models_dir / filename, hub / "checkpoints" / filename):
            if candidate.is_file():
                return WeightsRef("pretrained", url, candidate, file_sha256(candidate))
        return WeightsRef("pretrained", url, None)
    return WeightsRef("random", f"seed {seed}", random_weights_path(models_dir, spec, seed))


def random_init_seed(models: Iterable[ModelRecord], spec: ModelSpec) -> int | None:
    """The seed of the store's own random-init model for this architecture, or None when it has none.

    `models` are the store's model rows. Candidates are the `random` rows whose detail is "seed N" and
    whose architecture is `spec`'s (precision and decode mode aside: they do not change the weights); the current
    one wins, then one at `spec`'s input size, then the newest. The weights file need not exist: the
    seed rebuilds the same weights. This is how `model.init_seed: null` keeps the model of a store
    made when the sampling `seed` also seeded the weights.
    """
    best: tuple[tuple[bool, bool, int], int] | None = None
    for record in models:
        match = _RANDOM_DETAIL_RE.match(record.detail or "")
        if record.source != "random" or match is None:
            continue
        if {k: v for k, v in record.arch.items() if k in spec.arch()} != spec.arch():
            continue
        rank = (record.is_current, record.input_size == spec.input_size, record.id)
        if best is None or rank > best[0]:
            best = (rank, int(match.group(1)))
    return None if best is None else best[1]
