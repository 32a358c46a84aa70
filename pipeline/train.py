"""Self-supervised SimCLR training with lightly's own building blocks, as `lightly-ssl-train` does it.

The pieces are lightly's CLI pieces: the model is `embed.build_module` (lightly's CLI `_SimCLR`, the same
module `lightly-embed` builds), the loss `lightly.loss.NTXentLoss(**criterion)`, the views those of
`lightly.transforms.SimCLRTransform(**collate)` (see `SimCLRViews`), the optimizer `torch.optim.SGD(params, **optimizer)`
(lr and weight_decay only, so momentum 0 as in lightly's CLI), the loader settings `loader.*` and
`trainer.max_epochs` / `trainer.precision`. Only the Lightning `Trainer` is replaced by a plain loop so
that the library needs no trainer, logger or callbacks, and so that unreadable files are skipped.

The result is a checkpoint in lightly's Lightning format (`{"state_dict": {"model.<key>": tensor}, "epoch",
"global_step", "pytorch-lightning_version", ...}`, plain data only) that `lightly-embed checkpoint=...`,
`lightly-ssl-train checkpoint=...` and `embed.load_model(checkpoint=...)` all load, also with
`torch.load(weights_only=True)`.

Seeding: the same seed and the same files give the same weights on CPU, and no global generator (torch's,
numpy's, Python's `random`) is used or changed, nor any other process-wide setting. Everything random is
drawn from generators of the run's own, made from the seed: the initial weights (built on the meta device,
then PyTorch's default initialisation drawn from a `torch.Generator`), the memory bank of the loss, the
order of the images (a sampler with that generator; the DataLoader's worker seeds come from it too) and
the augmentations (`SimCLRViews`: every parameter from an `np.random.Generator` seeded by (seed, epoch,
image index), so the views do not depend on which worker loads an image). On CUDA the weights can still
differ in the last bits between runs (cuDNN's algorithm choice is left to the process's settings).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .atomic import replacing
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


_Item = tuple[list[torch.Tensor] | None, int]


class _Images(Dataset[_Item]):
    """(index, epoch) → (views, index); a file that cannot be loaded gives (None, index) instead of raising.

    The views are drawn from a generator seeded by (seed, epoch, index): the same in any worker process.
    """

    def __init__(self, paths: Sequence[str], views: SimCLRViews, seed: int) -> None:
        self.paths = list(paths)
        self.views = views
        self.seed = seed % 2**63  # SeedSequence takes non-negative entropy only

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> _Item:
        index, epoch = key
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
        rng = np.random.default_rng((self.seed, epoch, index))
        return self.views(image, rng), index


class _EpochOrder(Sampler[tuple[int, int]]):
    """The dataset keys of one epoch per iteration: (index, epoch) for every index, in an order shuffled with
    `generator` when asked; the epoch counts up from 0 with each iteration."""

    def __init__(self, n: int, shuffle: bool, generator: torch.Generator) -> None:
        self.n, self.shuffle, self.generator = n, shuffle, generator
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        order = torch.randperm(self.n, generator=self.generator).tolist() if self.shuffle else range(self.n)
        return iter([(int(i), epoch) for i in order])


def _collate(batch: list[_Item]) -> tuple[list[torch.Tensor] | None, list[int], list[int]]:
    """lightly's MultiViewCollate over the loadable items: ([view0, view1], loaded indices, failed indices)."""
    ok = [(views, i) for views, i in batch if views is not None]
    failed = [i for views, i in batch if views is None]
    if not ok:
        return None, [], failed
    views = [torch.stack([v[k] for v, _ in ok]) for k in range(len(ok[0][0]))]
    return views, [i for _, i in ok], failed


def _jitter_range(value: float, center: float, clip_at_zero: bool) -> tuple[float, float] | None:
    """torchvision's ColorJitter range for one factor: center -/+ value (clipped at 0); None for no change."""
    low, high = center - value, center + value
    if clip_at_zero:
        low = max(low, 0.0)
    return None if low == high == center else (low, high)


@dataclass(frozen=True)
class SimCLRViews:
    """The two views of lightly's `SimCLRTransform`, every random parameter drawn from a generator passed in.

    lightly's and torchvision's random transforms draw from torch's and numpy's global generators; this
    draws from the `np.random.Generator` given to each call and applies the same operations in the same
    order with torchvision's functional transforms, per view: random resized crop (scale (min_scale, 1),
    aspect ratio 3/4-4/3, 10 tries then a central crop; bilinear, antialiased), horizontal flip, vertical
    flip, rotation (90 degrees, or an angle uniform in rr_degrees; nearest, not expanded), colour jitter with
    probability cj_prob (brightness, contrast, saturation, hue, in random order), grayscale, PIL Gaussian
    blur (sigma uniform in sigmas), to a float tensor, normalisation. Build it with `simclr_views`.
    """

    input_size: int
    min_scale: float
    hf_prob: float
    vf_prob: float
    rr_prob: float
    rr_degrees: tuple[float, float] | None  # None: by 90 degrees
    cj_prob: float
    brightness: tuple[float, float] | None
    contrast: tuple[float, float] | None
    saturation: tuple[float, float] | None
    hue: tuple[float, float] | None
    gray_prob: float
    blur_prob: float
    sigmas: tuple[float, float]
    normalize: tuple[list[float], list[float]] | None  # (mean, std)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> list[torch.Tensor]:
        return [self.view(image, rng), self.view(image, rng)]

    def view(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        top, left, height, width = self._crop_box(image.height, image.width, rng)
        size = [self.input_size, self.input_size]
        img = F.resized_crop(image, top, left, height, width, size, InterpolationMode.BILINEAR, antialias=True)
        if rng.random() < self.hf_prob:
            img = F.hflip(img)
        if rng.random() < self.vf_prob:
            img = F.vflip(img)
        if rng.random() < self.rr_prob:
            angle = 90.0 if self.rr_degrees is None else float(rng.uniform(*self.rr_degrees))
            img = F.rotate(img, angle)
        if rng.random() < self.cj_prob:
            adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
            ranges = (self.brightness, self.contrast, self.saturation, self.hue)
            factors = [None if r is None else float(rng.uniform(*r)) for r in ranges]
            for k in rng.permutation(4).tolist():
                if factors[k] is not None:
                    img = adjust[k](img, factors[k])
        if rng.random() < self.gray_prob:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        if rng.random() < self.blur_prob:
            img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*self.sigmas))))
        tensor: torch.Tensor = F.to_tensor(img)
        if self.normalize is not None:
            tensor = F.normalize(tensor, *self.normalize)
        return tensor

    def _crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params: (top, left, height, width)."""
        area = height * width
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target_area = area * float(rng.uniform(self.min_scale, 1.0))
            aspect = math.exp(float(rng.uniform(*log_ratio)))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        ratio = width / height  # fall back to a central crop
        if ratio < 3 / 4:
            w, h = width, round(width / (3 / 4))
        elif ratio > 4 / 3:
            h, w = height, round(height * (4 / 3))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def simclr_views(collate: dict[str, Any]) -> SimCLRViews:
    """The views of `SimCLRTransform(**collate)`, as lightly's train CLI builds it from the `collate` keys.

    lightly's own transform is built too, for its checks of the values (and its defaults); it draws nothing.
    """
    from lightly.transforms.simclr_transform import SimCLRTransform

    kwargs = dict(collate)
    if isinstance(kwargs.get("sigmas"), list):
        kwargs["sigmas"] = tuple(kwargs["sigmas"])
    if isinstance(kwargs.get("rr_degrees"), list):
        kwargs["rr_degrees"] = tuple(kwargs["rr_degrees"])
    try:
        SimCLRTransform(**kwargs)
        bound = inspect.signature(SimCLRTransform).bind(**kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainError(f"lightly.collate: {exc}") from None
    bound.apply_defaults()
    a = bound.arguments
    strength = float(a["cj_strength"])
    degrees = a["rr_degrees"]
    if degrees is not None:
        degrees = (-float(degrees), float(degrees)) if isinstance(degrees, (int, float)) else tuple(map(float, degrees))
    norm = a["normalize"]
    return SimCLRViews(
        input_size=int(a["input_size"]), min_scale=float(a["min_scale"]), hf_prob=float(a["hf_prob"]),
        vf_prob=float(a["vf_prob"]), rr_prob=float(a["rr_prob"]), rr_degrees=degrees, cj_prob=float(a["cj_prob"]),
        brightness=_jitter_range(strength * a["cj_bright"], 1.0, True),
        contrast=_jitter_range(strength * a["cj_contrast"], 1.0, True),
        saturation=_jitter_range(strength * a["cj_sat"], 1.0, True),
        hue=_jitter_range(strength * a["cj_hue"], 0.0, False),
        gray_prob=float(a["random_gray_scale"]), blur_prob=float(a["gaussian_blur"]),
        sigmas=(float(a["sigmas"][0]), float(a["sigmas"][1])),
        normalize=None if not norm else (list(norm["mean"]), list(norm["std"])),
    )


def _autocast(precision: Any, device: torch.device) -> tuple[contextlib.AbstractContextManager[Any], bool]:
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


_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _seeded_module(spec: ModelSpec, generator: torch.Generator) -> nn.Module:
    """`build_module(spec)` with PyTorch's default initialisation drawn from `generator`, not the global one.

    The module is built on the meta device (no memory, nothing drawn), then given CPU storage, and every
    layer is initialised as its own `reset_parameters` does it: weights kaiming-uniform (a = sqrt 5), biases
    uniform in +-1/sqrt(fan_in), norm layers ones and zeros with fresh running statistics. (`torch.device`
    as a context is a torch-function mode of this thread only; torch also notes the device in a module
    variable that only torch.compile's guards read.)
    """
    with torch.device("meta"):
        model = build_module(spec)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, _WEIGHT_LAYERS):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                if layer.bias is not None:
                    fan_in = layer.weight[0].numel()
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
            elif isinstance(layer, _NORM_LAYERS):
                layer.reset_parameters()
            elif any(True for _ in layer.parameters(recurse=False)) or any(True for _ in layer.buffers(recurse=False)):
                raise TrainError(f"lightly.model {spec.slug}: no seeded initialisation for its {type(layer).__name__} layers")
    return model


def _seeded_criterion(criterion_cfg: dict[str, Any], device: torch.device, generator: torch.Generator) -> nn.Module:
    """`NTXentLoss(**criterion)` whose memory bank (if any) starts from `generator`'s normal vectors."""
    from lightly.loss import NTXentLoss

    try:
        with torch.device("meta"):  # its memory bank would be drawn from the global generator
            criterion = NTXentLoss(temperature=criterion_cfg["temperature"],
                                   memory_bank_size=criterion_cfg["memory_bank_size"])
    except ValueError as exc:
        raise TrainError(f"lightly.criterion: {exc}") from None
    criterion = criterion.to_empty(device=device)
    bank = criterion.memory_bank
    with torch.no_grad():
        bank.bank_ptr.zero_()
        if len(bank.size) > 1:
            vectors = nn.functional.normalize(torch.randn(bank.size, generator=generator), dim=-1)
            bank.bank = vectors.to(device)
    criterion_module: nn.Module = criterion
    return criterion_module


def _lightning_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("pytorch-lightning", "lightning"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _save_atomic(payload: dict[str, Any], dest: Path) -> None:
    with replacing(dest, durable=True) as fh:
        torch.save(payload, fh)


def train_simclr(paths: Sequence[Path], lightly_cfg: dict[str, Any], *, out_dir: Path, init: nn.Module | None = None,
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
    views = simclr_views(lightly_cfg["collate"])
    workers = (os.cpu_count() or 1) if num_workers < 0 else num_workers

    skipped: set[int] = set()
    loaded: set[int] = set()
    losses: list[float] = []
    global_step = 0
    # The run's own generators (see the module docstring): weights and memory bank, then the image order
    # (and the DataLoader's worker seeds); the augmentations seed theirs per image (`_Images`).
    init_generator = torch.Generator().manual_seed(seed)
    model = _seeded_module(spec, init_generator)
    if init is not None:
        try:
            model.load_state_dict(init.state_dict())
        except RuntimeError as exc:
            raise TrainError(f"init: the current model does not match lightly.model {spec.slug}: "
                             f"{str(exc).strip().splitlines()[0][:200]}") from None
    model.to(dev).train()
    criterion = _seeded_criterion(lightly_cfg["criterion"], dev, init_generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lightly_cfg["optimizer"]["lr"],
                                weight_decay=lightly_cfg["optimizer"]["weight_decay"])
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    order_generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        _Images(files, views, seed), batch_size=min(batch_size, len(files)),
        sampler=_EpochOrder(len(files), bool(loader_cfg["shuffle"]), order_generator),
        drop_last=bool(loader_cfg["drop_last"]), num_workers=workers, collate_fn=_collate, generator=order_generator,
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
