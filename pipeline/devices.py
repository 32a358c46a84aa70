"""Whether a GPU could be used, asked without importing torch (seconds and hundreds of MB)."""

from __future__ import annotations

import os
import sys

GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def gpu_possible() -> bool:
    """Whether device="auto" has to ask torch for a GPU: only when torch is loaded already (asking costs
    nothing then) or a GPU driver is installed and not hidden by CUDA_VISIBLE_DEVICES."""
    if "torch" in sys.modules:
        return True
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(os.path.exists(path) for path in GPU_DRIVER_FILES)
