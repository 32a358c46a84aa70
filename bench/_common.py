"""Shared bench helpers: seeded photo-like JPEGs, the machine's description, child RSS."""

from __future__ import annotations

import datetime as dt
import io
import os
import platform
import resource
from pathlib import Path

import numpy as np
from PIL import Image


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like image (smooth colour fields, shapes, sensor noise), different for every seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.2) * w
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r**2
        base[mask] = base[mask] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    base += rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def make_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0, quality: int = 90) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:05d}.jpg"
        if not p.exists():
            buf = io.BytesIO()
            photo(seed * 1_000_003 + i, size).save(buf, "JPEG", quality=quality)
            p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine() -> str:
    model = cpu_model()
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return (f"{dt.date.today().isoformat()} · {platform.node()} · {model} · {os.cpu_count()} cores · {gpu} · "
            f"Python {platform.python_version()}")


def children_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
