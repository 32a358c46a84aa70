"""Self-supervised SimCLR training with lightly's own building blocks, as `lightly-ssl-train` does it.

The pieces are lightly's CLI pieces: the model is `embed.build_module` (lightly's CLI `_SimCLR`, the same
module `lightly-embed` builds), the loss `lightly.loss.NTXentLoss(**criterion)`, the views
`lightly.transforms.SimCLRTransform(**collate)`, the optimizer `torch.optim.SGD(params, **optimizer)`
(lr and weight_decay only, so momentum 0 as in lightly's CLI), the loader settings `loader.*` and
`trainer.max_epochs` / `trainer.precision`. Only the Lightning `Trainer` is replaced by a plain loop so
that the library needs no trainer, logger or callbacks, and so that unreadable files are skipped.

The result is a checkpoint in lightly's Lightning format (`{"state_dict": {"model.<key>": tensor}, "epoch",
"global_step", "pytorch-lightning_version", ...}`, plain data only) that `lightly-embed checkpoint=...`,
`lightly-ssl-train checkpoint=...` and `embed.load_model(checkpoint=...)` all load, also with
`torch.load(weights_only=True)`.

Seeding: the same seed and the same files give the same weights on CPU. torchvision's and lightly's
random transforms draw from torch's and numpy's global generators, so while training runs those
generators (and Python's `random`) are seeded and afterwards restored to their previous state; other
threads that draw random numbers at the same time would see the seeded streams.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .check import inspect_image
from .embed import ModelSpec, build_module
from .errors import UsageError

PRECISIONS = "32, 16, 16-mixed, bf16, bf16-mixed"


class TrainError(UsageError):
    """Training cannot run or produced nothing usable; the message is one line."""


@dataclass
class TrainResult:
    checkpoint: Path  # <out_dir>/lightly_epoch_<n>.ckpt (lightly's format)
    epochs: int
    losses: list[float]  # mean loss per epoch
    seconds: float
    skipped: list[Path] = field(default_factory=list)  # files that could not be loaded (left out)


class _Images(Dataset):
    """Files → (views, index); a file that cannot be loaded gives (None, index) instead of raising."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Image.Image], list[torch.Tensor]]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor] | None, int]:
        path = self.paths[index]
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:  # vanished or unreadable since it was listed
            return None, index
        # ingest's decoding (first frame, upright by EXIF, RGB), permissive as lightly's loader is
        _verdict, image = inspect_image(data, os.path.basename(path), check_corruptness=False, apply_exif=True)
        if image is None:
            return None, index
        return self.transform(image), index


def _collate(batch: list[tuple[list[torch.Tensor] | None, int]]) -> tuple[list[torch.Tensor] | None, list[int], list[int]]:
    """lightly's MultiViewCollate over the loadable items: ([view0, view1], loaded indices, failed indices)."""
    ok = [(views, i) for views, i in batch if views is not None]
    failed = [i for views, i in batch if views is None]
    if not ok:
        return None, [], failed
    views = [torch.stack([v[k] for v, _ in ok]) for k in range(len(ok[0][0]))]
    return views, [i for _, i in ok], failed


def simclr_transform(collate: dict[str, Any]) -> Any:
    """`SimCLRTransform(**collate)`, exactly as lightly's train CLI builds it from the `collate` keys."""
    from lightly.transforms import SimCLRTransform

    kwargs = dict(collate)
    if isinstance(kwargs.get("sigmas"), list):
        kwargs["sigmas"] = tuple(kwargs["sigmas"])
    if isinstance(kwargs.get("rr_degrees"), list):
        kwargs["rr_degrees"] = tuple(kwargs["rr_degrees"])
    try:
        return SimCLRTransform(**kwargs)
    except TypeError as exc:
        raise TrainError(f"lightly.collate: {exc}") from None


def _autocast(precision: Any, device: torch.device) -> tuple[contextlib.AbstractContextManager, bool]:
    """(autocast context, use a GradScaler) for `trainer.precision`; fp16 only on CUDA, bf16 anywhere."""
    value = str(precision).strip().lower()
    if value in ("32", "32-true"):
        return contextlib.nullcontext(), False
    if value in ("16", "16-mixed"):
        if device.type != "cuda":
            return contextlib.nullcontext(), False
        return torch.autocast("cuda", dtype=torch.float16), True
    if value in ("bf16", "bf16-mixed"):
        return torch.autocast(device.type, dtype=torch.bfloat16), False
    raise TrainError(f"lightly.trainer.precision: invalid value {precision!r}; allowed: {PRECISIONS}")


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("device: invalid value 'cuda'; CUDA is not available on this machine (allowed: auto, cpu)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's (CPU and this CUDA device's), numpy's and Python's global generators; restore them after.

    `torch.manual_seed` is avoided on purpose: it also seeds (or, before CUDA is initialised, queues a
    seed for) every CUDA device, a change `fork_rng` would not undo.
    """
    devices = [device.index] if device.type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            if devices:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def _lightning_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("pytorch-lightning", "lightning"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _save_atomic(payload: dict[str, Any], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}-")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def train_simclr(paths: Sequence[Path], lightly_cfg: dict, *, out_dir: Path, init: nn.Module | None = None,
                 seed: int = 1, device: str | torch.device = "cpu", num_workers: int = 0,
                 progress: Callable[[int, int, float], None] | None = None,
                 extra_checkpoint: Path | None = None) -> TrainResult:
    """Train lightly's CLI SimCLR model on `paths`; save `out_dir/lightly_epoch_<max_epochs>.ckpt`.

    - `lightly_cfg` is lightly's full CLI config (`model`, `criterion`, `optimizer`, `collate`, `loader`,
      `trainer`); `loader.num_workers` is ignored in favour of `num_workers` (-1 = all cores).
    - `init`: a `_SimCLR` module whose weights training starts from (it is copied, never modified).
    - The batch size is `min(loader.batch_size, len(paths))`, as lightly's train CLI does it, so with
      `loader.drop_last` and fewer images than a batch the whole set is one batch instead of nothing.
    - Files that cannot be loaded are left out of their batch (listed in `TrainResult.skipped`); a batch
      left with fewer than 2 images is skipped. Fewer than 2 loadable images, a batch size below 2, an
      epoch without a single step or a loss that is not finite raise `TrainError`.
    - `progress(epoch, step, loss)` is called after every optimiser step (epoch and step count from 1,
      step over the whole run).
    - The checkpoint is written atomically (temp file + rename) and, when given, also to
      `extra_checkpoint` the same way.
    """
    start = time.monotonic()
    spec = ModelSpec.from_lightly(lightly_cfg)
    loader_cfg, trainer_cfg = lightly_cfg["loader"], lightly_cfg["trainer"]
    max_epochs = int(trainer_cfg["max_epochs"])
    batch_size = int(loader_cfg["batch_size"])
    files = [str(p) for p in paths]
    if batch_size < 2:
        raise TrainError(f"lightly.loader.batch_size: invalid value {batch_size!r} for training; allowed: an integer >= 2")
    if len(files) < 2:
        raise TrainError(f"training needs at least 2 images, got {len(files)}")
    dev = _device(device)
    autocast, use_scaler = _autocast(trainer_cfg.get("precision", 32), dev)
    transform = simclr_transform(lightly_cfg["collate"])
    workers = (os.cpu_count() or 1) if num_workers < 0 else num_workers
    from lightly.loss import NTXentLoss

    skipped: set[int] = set()
    loaded: set[int] = set()
    losses: list[float] = []
    global_step = 0
    with _seeded(seed, dev):
        model = build_module(spec)
        if init is not None:
            try:
                model.load_state_dict(init.state_dict())
            except RuntimeError as exc:
                raise TrainError(f"init: the current model does not match lightly.model {spec.slug}: "
                                 f"{str(exc).strip().splitlines()[0][:200]}") from None
        model.to(dev).train()
        criterion = NTXentLoss(temperature=lightly_cfg["criterion"]["temperature"],
                               memory_bank_size=lightly_cfg["criterion"]["memory_bank_size"]).to(dev)
        optimizer = torch.optim.SGD(model.parameters(), lr=lightly_cfg["optimizer"]["lr"],
                                    weight_decay=lightly_cfg["optimizer"]["weight_decay"])
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            _Images(files, transform), batch_size=min(batch_size, len(files)),
            shuffle=bool(loader_cfg["shuffle"]), drop_last=bool(loader_cfg["drop_last"]),
            num_workers=workers, collate_fn=_collate, generator=generator,
            pin_memory=dev.type == "cuda", persistent_workers=workers > 0,
            # never fork a process that may run other threads (the daemon's watcher, scheduler, ...)
            multiprocessing_context="forkserver" if workers > 0 else None,
        )
        try:
            for epoch in range(1, max_epochs + 1):
                total, steps = 0.0, 0
                for views, ok, failed in loader:
                    skipped.update(failed)
                    loaded.update(ok)
                    if views is None or len(ok) < 2:
                        continue
                    x0, x1 = (v.to(dev, non_blocking=True) for v in views)
                    optimizer.zero_grad(set_to_none=True)
                    with autocast:
                        y0, y1 = model(x0, x1)
                        loss = criterion(y0, y1)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    value = float(loss.detach())
                    global_step += 1
                    if not math.isfinite(value):
                        raise TrainError(f"training diverged: loss {value} at epoch {epoch}, step {global_step}; "
                                         f"try a lower lightly.optimizer.lr (now {lightly_cfg['optimizer']['lr']})")
                    total += value
                    steps += 1
                    if progress is not None:
                        progress(epoch, global_step, value)
                if len(loaded) < 2:
                    example = f" (not loadable: {files[min(skipped)]!r}, ...)" if skipped else ""
                    raise TrainError(f"training needs at least 2 loadable images; {len(loaded)} of {len(files)} "
                                     f"could be loaded{example}")
                if steps == 0:
                    raise TrainError(f"epoch {epoch} had no batch with 2 loadable images ({len(skipped)} of "
                                     f"{len(files)} files could not be loaded)")
                losses.append(total / steps)
        finally:
            del loader  # stops persistent workers now, not at garbage collection

    state = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {
        "epoch": max(max_epochs - 1, 0),  # Lightning's meaning: index of the last epoch (0-based)
        "global_step": global_step,
        "state_dict": state,
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "poolwatch": {"arch": spec.arch(), "input_size": spec.input_size, "seed": int(seed), "images": len(files),
                      "skipped": len(skipped), "losses": [float(x) for x in losses]},
    }
    version = _lightning_version()
    if version:
        payload["pytorch-lightning_version"] = version
    out_dir = Path(out_dir)
    checkpoint = out_dir / f"lightly_epoch_{max_epochs}.ckpt"
    _save_atomic(payload, checkpoint)
    if extra_checkpoint is not None:
        _save_atomic(payload, Path(extra_checkpoint))
    return TrainResult(checkpoint, max_epochs, losses, time.monotonic() - start, [Path(files[i]) for i in sorted(skipped)])
