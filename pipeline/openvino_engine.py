"""The CPU inference runtime: OpenVINO running a model's artifact (an IR with the input's preprocessing built in).

Chosen over ONNX Runtime by measurement (2 cores, AMD EPYC Zen 4, lightly's resnet-18 at 64 px, batch 64):
both run fp32 at ~50 img/s (torch eager: ~34), but only OpenVINO has a bf16 path on the CPU (102 img/s) and
an int8 one through NNCF's post-training quantization (~190 img/s); see docs/BENCHMARKS.md. Torch-free: the
daemon runs a cached artifact with this module and numpy alone (~165 MB RSS with the model compiled).

The artifact takes the decoder's batch as it is, N×s×s×3 uint8 RGB: conversion to float, x/255, the
per-channel mean and std and NHWC→NCHW are steps of OpenVINO's PrePostProcessor, saved with the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Mode
from .errors import ModelError
from .modelspec import ModelInfo


@cache
def _core() -> Any:
    import openvino as ov

    return ov.Core()


@cache
def cpu_capabilities() -> frozenset[str]:
    """OpenVINO's optimisation capabilities of this CPU (e.g. FP32, BF16, INT8); empty when it cannot load."""
    try:
        return frozenset(str(c) for c in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 - no OpenVINO (or no CPU plugin) means no capabilities
        return frozenset()


def cpu_name() -> str:
    try:
        return str(_core().get_property("CPU", "FULL_DEVICE_NAME"))
    except Exception:  # noqa: BLE001
        return "unknown CPU"


def runnable(precision: str) -> bool:
    """Whether this machine's OpenVINO runs `precision` natively (bf16 needs AVX-512 BF16 or AMX)."""
    caps = cpu_capabilities()
    return {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}.get(precision, "-") in caps


def with_uint8_input(model: Any, input_size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    """`model` (one NCHW float input) taking N×s×s×3 uint8 RGB instead, normalised as (x/255 - mean) / std
    like torchvision's ToTensor + Normalize, with a dynamic batch."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    model.reshape({model.inputs[0]: ov.PartialShape([-1, 3, input_size, input_size])})
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(255.0).mean(list(mean)).scale(list(std))
    ppp.output().tensor().set_element_type(ov.Type.f32)
    return ppp.build()


def read_onnx(path: Path, output: str) -> Any:
    """An ONNX image embedder reduced to one image input and the embedding output; a file that is not one
    is a ModelError naming what is wrong."""
    import openvino as ov
    from openvino.frontend import FrontEndManager

    try:
        # The ONNX frontend alone: Core.read_model tries every frontend on a file ONNX cannot parse, and
        # TensorFlow's prints its parse errors (with the file's bytes) straight to stderr.
        frontend = FrontEndManager().load_by_framework("onnx")
        model = frontend.convert(frontend.load(str(path)))
    except Exception as exc:  # noqa: BLE001 - OpenVINO's parser errors are long; their last line says what failed
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise ModelError(f"model.onnx: {str(path)!r} is not a readable ONNX model ({last[:200]})") from None
    if len(model.inputs) != 1:
        raise ModelError(f"model.onnx: {str(path)!r} has {len(model.inputs)} inputs; an image embedder has one")
    rank = model.inputs[0].get_partial_shape().rank
    if rank.is_dynamic or rank.get_length() != 4:
        raise ModelError(f"model.onnx: {str(path)!r} takes a rank-{rank} input; an image embedder takes N×3×H×W (rank 4)")
    channels = model.inputs[0].get_partial_shape()[1]
    if channels.is_static and channels.get_length() != 3:
        raise ModelError(f"model.onnx: {str(path)!r} takes {channels.get_length()}-channel images; "
                         "poolwatch gives it RGB (N×3×H×W)")
    names = [sorted(o.get_names()) for o in model.outputs]
    if output:
        chosen = [i for i, n in enumerate(names) if output in n]
        if not chosen:
            found = ", ".join(n[0] for n in names if n)
            raise ModelError(f"model.onnx: {str(path)!r} has no output {output!r} (outputs: {found}); set model.output")
        keep = model.outputs[chosen[0]]
    else:
        keep = model.outputs[0]
    if len(model.outputs) > 1:
        model = ov.Model([keep], model.get_parameters(), "embedder")
    return model


class OpenVINOEngine:
    """An artifact compiled for this CPU: fp32 and bf16 are inference-precision hints on the f32 IR, int8 is
    its own (quantized) IR. Every core runs the model; decoding only borrows them for moments."""

    runtime = "openvino"
    device = "cpu"

    def __init__(self, artifact: Path, info: ModelInfo, mode: Mode, threads: int | None = None) -> None:
        if mode.precision not in ("fp32", "bf16", "int8"):
            raise ModelError(f"embedding_precision: {mode.precision} is not a CPU precision (allowed: fp32, bf16, int8)")
        self.info, self.precision, self.exact_decode, self._mode = info, mode.precision, mode.exact_decode, mode
        self.artifact = artifact  # its files (model.xml, model.bin): what another process needs to run the same model
        config = {
            # f32 for int8's non-quantized layers too, so one artifact gives the same vectors on every CPU
            # (OpenVINO's own default is bf16 on AMX machines)
            "INFERENCE_PRECISION_HINT": "bf16" if mode.precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads or os.cpu_count() or 1,
            "PERFORMANCE_HINT": "LATENCY",
        }
        try:
            self._compiled = _core().compile_model(str(artifact / "model.xml"), "CPU", config)
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"OpenVINO cannot load {artifact}: {first[:200]}") from None
        self._request = self._compiled.create_infer_request()
        self.forward_passes = 0
        self.images_embedded = 0

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def identity(self) -> str:
        return self._mode.identity(self.info.weights_hash)

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def input_size(self) -> int:
        return self.info.input_size

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._request.infer({0: np.ascontiguousarray(pixels, dtype=np.uint8)})
        self.forward_passes += 1
        self.images_embedded += len(pixels)
        # the request reuses its output buffer: copy
        return np.array(out[0], dtype=np.float32).reshape(len(pixels), -1)
