"""The embedding model: lightly's CLI architecture, where its weights come from, batched inference.

Architecture (as `lightly-embed` builds it): BatchNorm2d(3) → lightly `ResNetGenerator(name, width)`
without its last layer → 1×1 conv to `num_ftrs` → global average pool, wrapped in lightly's CLI
SimCLR module so lightly's checkpoints load unchanged. Input: `Resize((s, s))` (PIL bilinear) →
[0, 1] → ImageNet normalisation, exactly as `lightly-embed`.

Where the weights come from, first match wins:
1. `checkpoint=PATH` (lightly .ckpt or zoo .pth), loaded with `torch.load(weights_only=True)`;
   then the store's own trained model (`trained`), when training made one for this architecture;
2. a local copy of lightly's pretrained file (`weights_file`, e.g. from $POOLWATCH_WEIGHTS);
3. lightly's pretrained weights for the architecture (when `lightly.pre_trained`): a copy saved in
   `<shared_dir>/models/`, torch hub's cache, else lightly's URL (short timeout), saved in both;
4. random weights, seeded, saved as `<shared_dir>/models/random-<arch>-seed<seed>.pt` on first use
   and reused on every later start so vectors never change across restarts.

The random-init seed is the model's own (`model.init_seed`), never the sampling `seed`: with
`model.init_seed: null` the caller asks `random_init_seed` for the seed of the store's own random
model (a store made when `seed` still seeded the weights keeps the model it has), else 1.
A model's identity (`Embedder.identity`) is its weights hash (and precision): no seed enters it.
"""

from __future__ import annotations

import hashlib
import io
import re
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .atomic import replacing
from .engine import Mode
from .errors import ModelError
from .modelspec import DEFAULT_INIT_SEED, IMAGENET_MEAN, IMAGENET_STD, ModelInfo, ModelSpec, random_init_seed, random_weights_path

__all__ = ["DEFAULT_INIT_SEED", "IMAGENET_MEAN", "IMAGENET_STD", "Embedder", "LoadedModel", "ModelSpec", "load_model",
           "random_init_seed"]

if TYPE_CHECKING:
    pass

DOWNLOAD_TIMEOUT_S = 10.0


@dataclass
class LoadedModel:
    """A built model with its provenance; `weights_hash` identifies the weights."""

    module: nn.Module
    spec: ModelSpec
    source: str  # checkpoint | pretrained | random | trained
    detail: str  # path, URL or seed
    weights_hash: str
    path: str | None = None
    notes: list[str] = field(default_factory=list)  # things the caller should log (fallbacks)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.spec.slug, self.source, self.detail, self.weights_hash, self.spec.arch(), self.spec.num_ftrs,
                         self.spec.input_size, self.path, list(self.notes))


def build_module(spec: ModelSpec) -> nn.Module:
    """lightly-embed's model: `_SimCLR(features)` so state-dict keys match lightly's checkpoints."""
    from lightly.cli._cli_simclr import _SimCLR
    from lightly.models import ResNetGenerator
    from lightly.models.batchnorm import get_norm_layer

    resnet = ResNetGenerator(spec.name, spec.width)
    last_channels = list(resnet.children())[-1].in_features
    features = nn.Sequential(
        get_norm_layer(3, 0),
        *list(resnet.children())[:-1],
        nn.Conv2d(last_channels, spec.num_ftrs, 1),
        nn.AdaptiveAvgPool2d(1),
    )
    module: nn.Module = _SimCLR(features, num_ftrs=spec.num_ftrs, out_dim=spec.out_dim)
    return module


def weights_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# torch's weights-only error text around the one line that says what was wrong
_TORCH_LOAD_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # a plain pickle.dump'ed file makes torch warn about its protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint: file {str(path)!r} does not exist") from None
    except Exception as exc:  # any unpickling failure means "not a checkpoint we load"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        useful = [line for line in lines if not line.startswith(_TORCH_LOAD_BOILERPLATE)]
        first = (useful or lines or [type(exc).__name__])[0]
        raise ModelError(f"checkpoint: {str(path)!r} is not a loadable weights-only checkpoint ({first[:200]})") from None


def _checkpoint_num_ftrs(state: dict[str, Any]) -> int | None:
    """The num_ftrs a lightly state dict was made for: the out-channels of the backbone's 1x1 conv.

    The CLI backbone is BatchNorm2d(3), the resnet's six feature children, then that conv: index 7.
    Old checkpoints call the backbone "features".
    """
    for key, tensor in state.items():
        if key.split(".")[-3:] in (["backbone", "7", "weight"], ["features", "7", "weight"]) \
                and tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1):
            return int(tensor.shape[0])
    return None


def load_state(module: nn.Module, state: Any, spec: ModelSpec, origin: str) -> None:
    """Load a lightly checkpoint/zoo state into `module`, with lightly's own key fix-ups."""
    from lightly.cli._helpers import load_from_state_dict

    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint: {origin!r} holds no state_dict of tensors")
    try:
        load_from_state_dict(module, dict(state))
    except RuntimeError as exc:
        text = str(exc)
        missing = re.search(r'Missing key\(s\) in state_dict: ([^\n]*)', text)
        sizes = re.search(r'size mismatch for ([^:]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) from checkpoint,'
                          r' the shape in current model is (torch.Size\(\[[^\]]*\]\))', text)
        ftrs = _checkpoint_num_ftrs(state)
        if ftrs is not None and ftrs != spec.num_ftrs:
            why = f"it was made for num_ftrs={ftrs} ({ftrs}-d embeddings); set lightly.model.num_ftrs={ftrs} to use it"
        elif sizes:
            why = f"{sizes.group(1)} has shape {sizes.group(2)[11:-1]} but {spec.slug} expects {sizes.group(3)[11:-1]}"
        elif missing:
            keys = missing.group(1).split(", ")
            why = f"missing keys {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)} in all)"
        else:
            why = text.strip().splitlines()[0][:200]
        raise ModelError(
            f"checkpoint: {origin!r} does not match lightly.model {spec.slug} (num_ftrs={spec.num_ftrs}): {why}"
        ) from None


def _finish(module: nn.Module, spec: ModelSpec, source: str, detail: str, path: Path | None, notes: list[str]) -> LoadedModel:
    module.eval()
    return LoadedModel(module, spec, source, detail, weights_hash(module), str(path) if path else None, notes)


def _download(url: str, dest: Path, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # lightly's fixed https URL
        data = response.read()
    expected = re.search(r"-([a-f0-9]{8,})\.", Path(url).name)
    if expected and not hashlib.sha256(data).hexdigest().startswith(expected.group(1)):
        raise OSError(f"downloaded file does not match the hash in its name ({expected.group(1)})")
    _write_atomic(dest, data)


def _write_atomic(dest: Path, data: bytes) -> None:
    with replacing(dest) as fh:
        fh.write(data)


def load_model(spec: ModelSpec, *, models_dir: Path, checkpoint: Path | None = None, trained: Path | None = None,
               weights_file: Path | None = None,
               pretrained: bool = True, seed: int = 1, hub_dir: Path | None = None,
               timeout: float = DOWNLOAD_TIMEOUT_S) -> LoadedModel:
    """Build the model and load its weights (see the module docstring for the order).

    `seed` seeds the random-init weights only (step 4): the resolved `model.init_seed`, never the
    sampling `seed`.
    """
    from lightly.models import ZOO

    try:
        module = build_module(spec)
    except Exception as exc:
        raise ModelError(f"lightly.model: cannot build {spec.slug}: {exc}") from None
    notes: list[str] = []
    if checkpoint is not None:
        load_state(module, _torch_load(checkpoint), spec, str(checkpoint))
        return _finish(module, spec, "checkpoint", str(checkpoint), checkpoint, notes)
    if trained is not None:
        load_state(module, _torch_load(trained), spec, str(trained))
        return _finish(module, spec, "trained", str(trained), trained, notes)
    if weights_file is not None:
        load_state(module, _torch_load(weights_file), spec, str(weights_file))
        return _finish(module, spec, "pretrained", str(weights_file), weights_file, notes)

    url = ZOO.get(spec.zoo_key)
    if pretrained and url:
        filename = Path(url).name
        hub = hub_dir if hub_dir is not None else Path(torch.hub.get_dir())
        local, cached = models_dir / filename, hub / "checkpoints" / filename
        for candidate in (local, cached):
            if candidate.is_file():
                load_state(module, _torch_load(candidate), spec, str(candidate))
                return _finish(module, spec, "pretrained", url, candidate, notes)
        try:
            _download(url, local, timeout)
        except Exception as exc:  # offline, proxy, DNS, hash: all mean "no pretrained weights"
            notes.append(f"could not download lightly's pretrained weights for {spec.zoo_key} from {url}: {exc}")
        else:
            load_state(module, _torch_load(local), spec, str(local))
            return _finish(module, spec, "pretrained", url, local, notes)
    elif pretrained:
        notes.append(f"lightly has no pretrained weights for {spec.zoo_key}")

    path = random_weights_path(models_dir, spec, seed)
    if path.is_file():
        load_state(module, _torch_load(path), spec, str(path))
    else:
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (the weights are made on the CPU): torch.manual_seed would also
            # seed every CUDA device, which fork_rng(devices=[]) does not restore.
            torch.default_generator.manual_seed(seed)
            module = build_module(spec)
        buf = io.BytesIO()
        # The "model." prefix makes it a lightly-style checkpoint that lightly-embed can load too.
        torch.save({"state_dict": {f"model.{k}": v for k, v in module.state_dict().items()}}, buf)
        _write_atomic(path, buf.getvalue())
    notes.append(
        f"embeddings come from RANDOM weights (saved in {path} and reused); for meaningful embeddings give "
        f"checkpoint=PATH, place lightly's pretrained file in {models_dir} (or point POOLWATCH_WEIGHTS at it), "
        "or set enable_training=true"
    )
    return _finish(module, spec, "random", f"seed {seed}", path, notes)


def resolve_device(device: str) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("device: invalid value 'cuda'; CUDA is not available on this machine (allowed: auto, cpu)")
        return torch.device("cuda")
    return torch.device("cpu")


PRECISIONS = ("fp32", "bf16", "fp16")


def _cpu_backbone(backbone: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy for CPU inference in channels_last with weights in `dtype`, so that oneDNN runs its blocked
    (for bf16 its AMX / AVX-512-BF16) kernels without per-op layout changes or autocast's casts; for bf16
    the batch norms are also folded into their convolutions. Measured at 64 px, batch 64, 2 cores: fp32
    1.17x the plain module (differences ~1e-7, lightly-embed's vectors to float32 resolution), bf16 2.1x
    autocast. fp32 is not folded: that moves vectors 6e-5 (relative) off lightly-embed's."""
    import copy

    from torch.fx.experimental.optimization import fuse

    if dtype == torch.float32:
        module = copy.deepcopy(backbone)  # folding would move fp32 vectors off lightly-embed's (6e-5 relative)
    else:
        try:
            module = fuse(backbone)  # a traced copy; the original (and its training) is untouched
        except Exception:  # a backbone fx cannot trace still gets the layout and dtype
            module = copy.deepcopy(backbone)
    return module.to(dtype).to(memory_format=torch.channels_last).eval()


class Embedder:
    """Batched inference with the backbone of a loaded model. Counts its forward passes.

    On the CPU it runs a folded, channels_last copy of the backbone (`_cpu_backbone`), in bf16 weights
    for `precision=bf16` (CPUs with AMX/AVX-512-BF16); on a GPU the module itself, under autocast for
    bf16/fp16 (fp16: GPUs only). bf16/fp16 vectors differ slightly from fp32 ones, so the precision is part
    of the model's identity in the store (`identity`) and vectors of two precisions never mix.
    """

    runtime = "torch"

    def __init__(self, model: LoadedModel, device: torch.device | str = "cpu", precision: str = "fp32",
                 exact_decode: bool = True) -> None:
        if precision not in PRECISIONS:
            raise ModelError(f"embedding_precision: {precision!r} needs OpenVINO; torch runs {', '.join(PRECISIONS)}")
        self.model = model
        self.info = model.info
        self.exact_decode = exact_decode
        self.torch_device = torch.device(device)
        self.device = self.torch_device.type
        if precision == "fp16" and self.device != "cuda":
            raise ModelError("embedding_precision: invalid value 'fp16'; fp16 needs a CUDA device (use bf16 or fp32)")
        self.precision = precision
        backbone = model.module.backbone
        assert isinstance(backbone, nn.Module)
        self.backbone: nn.Module = backbone.to(self.torch_device).eval()
        self._cpu: torch.nn.Module | None = None
        self._cpu_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if self.device == "cpu":
            self._cpu = _cpu_backbone(self.backbone, self._cpu_dtype)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.torch_device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.torch_device).view(1, 3, 1, 1)
        self.forward_passes = 0
        self.images_embedded = 0

    @property
    def mode(self) -> Mode:
        return Mode(self.precision, self.exact_decode)

    @property
    def identity(self) -> str:
        """What makes vectors comparable: the weights, the precision and the decode mode (engine.Mode)."""
        return self.mode.identity(self.model.weights_hash)

    @property
    def dim(self) -> int:
        return self.model.spec.num_ftrs

    @property
    def input_size(self) -> int:
        return self.model.spec.input_size

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """N×s×s×3 uint8 → N×num_ftrs float32 (the operations of ToTensor + Normalize, batched)."""
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.torch_device)
            x = x.permute(0, 3, 1, 2).float().div(255)
            x = (x - self.mean) / self.std
            if self._cpu is not None:
                out = self._cpu(x.to(self._cpu_dtype).contiguous(memory_format=torch.channels_last))
            elif self.precision == "fp32":
                out = self.backbone(x)
            else:
                dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
                with torch.autocast(self.device, dtype=dtype):
                    out = self.backbone(x)
            out = out.flatten(start_dim=1)
            self.forward_passes += 1
            self.images_embedded += len(pixels)
            return np.asarray(out.float().cpu().numpy(), dtype=np.float32)
