"""Building a model's artifact: load the weights (torch), convert to OpenVINO IR with the input's
preprocessing, quantize to int8 on calibration images (NNCF), publish it in the artifact cache.

This is the only module besides `embed` and `train` that imports torch, and it runs in a child process
(`daemon/model_child.py`), so the daemon never carries torch on a CPU machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import artifacts
from .artifacts import lightly_request
from .modelspec import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, ModelSpec, find_weights


def _torch_to_openvino(info_module: Any, spec: ModelSpec) -> Any:
    import openvino as ov
    import torch
    from torch import nn

    class Backbone(nn.Module):
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.flatten(self.backbone(x), start_dim=1)

    module = Backbone(info_module.backbone).eval()
    with torch.inference_mode():
        return ov.convert_model(module, example_input=torch.zeros(2, 3, spec.input_size, spec.input_size))


def quantize(model: Any, pixels: np.ndarray) -> Any:
    """NNCF post-training quantization on `pixels` (N×s×s×3 uint8, the calibration set), one image a step.

    Activation ranges from the calibration set's min and max, mixed preset (calibration.QUANTIZATION): on
    real photos with a trained checkpoint NNCF's defaults (averaged extremes) clipped the largest activations,
    10-NN agreement with fp32 66.7 %, coreset radius 1.28-2.47x; min-max + mixed 74.1 %, 1.07-1.50x. Still
    short of the quality rule (docs/BENCHMARKS.md, Precisions)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    data = nncf.Dataset([pixels[i:i + 1] for i in range(len(pixels))])
    params = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    return nncf.quantize(model, data, subset_size=len(pixels), preset=nncf.QuantizationPreset.MIXED,
                         advanced_parameters=params)


def build(request: dict[str, Any], log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Build (or find) the artifact `request` asks for; returns {"artifact": dir, "meta": ...}.

    request: kind (lightly | onnx), models_dir (weights), artifacts (the cache), ir (f32 | int8.<calibration
    hash>), and for lightly spec + weights arguments
    (checkpoint, trained, weights_file, pretrained, seed), for onnx path + input_size, mean, std, output;
    int8 also calibration = {"pixels": .npy path, "hash": ...}.
    """
    import openvino as ov

    from .openvino_engine import read_onnx, with_uint8_input

    models_dir, root = Path(request["models_dir"]), Path(request["artifacts"])
    ir = request["ir"]
    started = time.perf_counter()
    if request["kind"] == "lightly":
        from .embed import load_model

        spec = ModelSpec(**request["spec"])
        paths: dict[str, Any] = {k: Path(request[k]) if request.get(k) else None
                                 for k in ("checkpoint", "trained", "weights_file")}
        loaded = load_model(spec, models_dir=models_dir, pretrained=bool(request["pretrained"]), seed=int(request["seed"]),
                            **paths)
        info = loaded.info
        model = _torch_to_openvino(loaded.module, spec)
        model = with_uint8_input(model, spec.input_size, IMAGENET_MEAN, IMAGENET_STD)
        # The weights this resolved to: a file downloaded or made just now is what later starts will find.
        after = find_weights(spec, models_dir=models_dir, pretrained=bool(request["pretrained"]),
                             seed=int(request["seed"]), **paths)
        keys = list(dict.fromkeys([request["key"], artifacts.request_key(lightly_request(spec, after, ir))]))
    else:
        path = Path(request["path"])
        info = ModelInfo.from_json(request["info"])
        model = with_uint8_input(read_onnx(path, request["output"]), int(request["input_size"]),
                                 request["mean"], request["std"])
        keys = [request["key"]]
    calibration: dict[str, Any] | None = None
    if ir.startswith("int8"):
        calib = request["calibration"]
        pixels = np.load(calib["pixels"])
        log(f"quantizing to int8 on {len(pixels)} calibration images")
        model = quantize(model, pixels)
        calibration = {"hash": calib["hash"], "count": int(len(pixels)), "images": calib.get("images", [])}
    meta = {"info": info.to_json(), "ir": ir, "calibration": calibration, "openvino": ov.__version__,
            "built_seconds": round(time.perf_counter() - started, 2), "created": time.time()}

    def save(directory: Path) -> None:
        ov.save_model(model, str(directory / "model.xml"), compress_to_fp16=False)

    artifact = artifacts.publish(root, artifacts.artifact_name(info, ir), save, meta)
    for key in keys:
        artifacts.remember(root, key, artifact, info)
    found = artifacts.lookup(root, keys[0])
    if found is None:
        raise RuntimeError(f"the artifact {artifact} vanished right after it was built")
    return {"artifact": str(found[0]), "meta": found[1]}
