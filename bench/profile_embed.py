"""Where the model's time goes: cProfile of `Embedder.embed` (fp32 and bf16) on random 64-image batches.

    python bench/profile_embed.py                 # resnet-18, input 64, batch 64, 3 batches after a warm-up
    python bench/profile_embed.py --smoke         # seconds, for CI
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
from pathlib import Path

import numpy as np
from _common import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.batches, args.input_size = 4, 1, 16
    import torch

    from poolwatch.pipeline.config import load_config
    from poolwatch.pipeline.embed import Embedder, ModelSpec, load_model

    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    cfg = load_config(["lightly.pre_trained=false", f"lightly.collate.input_size={args.input_size}"])
    spec = ModelSpec.from_lightly(cfg.lightly)
    with tempfile.TemporaryDirectory() as models:
        model = load_model(spec, models_dir=Path(models), pretrained=False, seed=0)
    x = np.random.default_rng(0).integers(0, 255, (args.batch, args.input_size, args.input_size, 3), dtype=np.uint8)
    for precision in ("fp32", "bf16"):
        embedder = Embedder(model, "cpu", precision)
        embedder.embed(x)  # warm-up: oneDNN picks and caches its kernels
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.batches):
            embedder.embed(x)
        profile.disable()
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        images = args.batch * args.batches
        print(f"\n{precision}: {stats.total_tt:.2f} s for {images} images ({stats.total_tt / images * 1000:.1f} ms/image)")
        stats.sort_stats("tottime").print_stats(args.top)
        print("\n".join(line for line in out.getvalue().splitlines() if "{" in line or "ncalls" in line))


if __name__ == "__main__":
    main()
