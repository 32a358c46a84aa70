"""The engine interface: what embeds, and the identity that keeps vectors of different engines apart.

An engine turns an N×s×s×3 uint8 batch (the decoder's output) into N×dim float32 vectors. Two exist:
`openvino_engine.OpenVINOEngine` (the CPU runtime, running an artifact exported once per model) and
`embed.Embedder` (torch: on a GPU, and on the CPU only when OpenVINO cannot load). Torch-free.

A model's identity in the store is its weights hash plus whatever changes its vectors beyond float32
rounding: the precision (bf16, fp16, int8 with its calibration) and the decode mode (scaled JPEG decoding
changes the pixels). fp32 with exact decoding is the bare weights hash, as every store made before
precisions and decode modes existed records it, so such a store keeps its model. fp32 on OpenVINO and on
torch agree to float32 resolution (relative 2e-7 measured): one identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .modelspec import ModelInfo

PRECISIONS = ("fp32", "bf16", "int8", "fp16")
# Images an int8 model is calibrated on: the store's first `ok` images by content hash (a deterministic
# choice that does not depend on the order files arrived in).
CALIBRATION_COUNT = 300


class Engine(Protocol):
    info: ModelInfo
    precision: str
    exact_decode: bool
    runtime: str  # openvino | torch
    device: str  # cpu | cuda
    forward_passes: int
    images_embedded: int

    @property
    def mode(self) -> Mode: ...

    @property
    def identity(self) -> str: ...

    @property
    def dim(self) -> int: ...

    @property
    def input_size(self) -> int: ...

    def embed(self, pixels: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Mode:
    """How vectors are made, beyond the weights: precision, the int8 calibration, decode mode."""

    precision: str = "fp32"
    exact_decode: bool = True
    calibration: str | None = None  # int8 only: the hash of its calibration set

    def suffix(self) -> str:
        parts = []
        if self.precision == "int8":
            parts.append(f"int8.{(self.calibration or '')[:12]}")
        elif self.precision != "fp32":
            parts.append(self.precision)
        if not self.exact_decode:
            parts.append("scaled")
        return "".join(f"+{p}" for p in parts)

    def identity(self, weights_hash: str) -> str:
        return weights_hash + self.suffix()

    def arch(self) -> dict[str, object]:
        """What the store's model row records besides the architecture."""
        out: dict[str, object] = {"precision": self.precision, "decode": "exact" if self.exact_decode else "scaled"}
        if self.calibration:
            out["calibration"] = self.calibration
        return out


def recorded_mode(arch: dict[str, object]) -> Mode:
    """The mode of a stored model (rows made before modes existed: fp32 or their precision, exact decode)."""
    calibration = arch.get("calibration")
    return Mode(str(arch.get("precision", "fp32")), arch.get("decode", "exact") == "exact",
                str(calibration) if calibration else None)


# `auto`: the fastest mode that meets the quality rule, measured on real photos with a trained checkpoint
# (bench/precision_quality.py, docs/BENCHMARKS.md "Precisions": 10-NN lists >= 95 % the same as fp32's, the
# coverage radius of a coreset, scored in fp32 space, within 2 % of fp32's). bf16 passed (98.5 %, radius
# ratios 1.000/0.991/1.018 at 100/200/500 picks); int8 did not (66.7 %, radius 1.28-2.47; NNCF's min-max
# ranges: 72.8 %), nor did scaled decoding at any precision (88.9 % with fp32): `auto` runs bf16 where the
# machine has it, else fp32, on exact decoding. int8 and scaled decoding are there to be asked for.
AUTO_CPU = ("bf16", "fp32")
AUTO_GPU = ("bf16", "fp32")
AUTO_EXACT_DECODE = True


@dataclass(frozen=True)
class ModeChoice:
    precision: str  # the store's precision (auto's choice, or an explicit one)
    exact_decode: bool
    record: dict[str, object]  # what the store keeps (the key "embedding" of its settings)
    changed: bool  # the record differs from the store's


def choose_mode(precision: str, exact_decode: bool | None, stored: dict[str, object] | None,
                current_arch: dict[str, object] | None, runnable: Callable[[str], bool], gpu: bool,
                machine: str = "") -> ModeChoice:
    """The store's embedding mode: `auto` keeps the one the store records; a store that records none keeps
    what its current model was made with (a store made before modes existed), a new store decides here,
    once; an explicit value switches and is recorded. A recorded precision this machine cannot run is
    decided again (the one case where moving a store re-embeds it)."""
    record = dict(stored or {})
    if stored is None and current_arch is not None:
        legacy = recorded_mode(current_arch)
        record = {"precision": legacy.precision, "exact_decode": legacy.exact_decode, "decided": "kept from the store's model"}
    if precision != "auto":
        if record.get("precision") != precision:
            record.update(precision=precision, decided="set explicitly")
    elif not record.get("precision") or not runnable(str(record["precision"])):
        order = AUTO_GPU if gpu else AUTO_CPU
        chosen = next((p for p in order if runnable(p)), "fp32")
        why = "auto" if not record.get("precision") else f"auto ({record['precision']} cannot run here)"
        record.update(precision=chosen, decided=f"{why}{' on ' + machine if machine else ''}")
    if exact_decode is not None:
        record["exact_decode"] = exact_decode
    record.setdefault("exact_decode", AUTO_EXACT_DECODE)
    return ModeChoice(str(record["precision"]), bool(record["exact_decode"]), record, record != (stored or {}))


def interim_precision(runnable: Callable[[str], bool]) -> str:
    """What runs while an int8 store has too few images to calibrate on: the best mode needing no calibration."""
    return "bf16" if runnable("bf16") else "fp32"
