"""pipeline/ is a pure library: importing it and sampling needs no torch, a coreset run leaves the BLAS thread
limits as it found them, and training leaves every global random generator alone."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from poolwatch.pipeline import coreset
from poolwatch.pipeline.config import load_config
from poolwatch.pipeline.coreset import kcenter
from poolwatch.pipeline.devices import GPU_DRIVER_FILES
from poolwatch.pipeline.train import train_simclr

from .conftest import ROOT, encode, photo

# The pipeline modules that neither embed nor train: none of them may need torch.
TORCH_FREE = ["check", "decode", "store", "sampling", "report", "export", "coreset", "config", "ingest", "discover",
              "modelspec", "engine", "artifacts", "calibration", "openvino_engine", "devices"]

PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, io, json, sys, threading
    import numpy as np

    names = [n for n in sys.argv[1].split(",") if importlib.util.find_spec(f"poolwatch.pipeline.{n}") is not None]
    for name in names:
        importlib.import_module(f"poolwatch.pipeline.{name}")
    out = {"modules": names, "torch_after_import": [m for m in ("torch", "torchvision", "lightly") if m in sys.modules]}

    from poolwatch.pipeline.coreset import kcenter, random_sample
    from poolwatch.pipeline.report import DistanceStats, _histogram, pairwise_stats

    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    pool = x[:5] + 0.5
    picks = kcenter(x, pool, n_samples=10, device="auto")  # the default configuration's device
    assert len(picks.indices) == 10 and picks.stop_reason == "n_samples"
    assert len(random_sample(300, n_samples=7, seed=1).indices) == 7
    stats: DistanceStats = pairwise_stats(x[:40], memory_gb=0.01, seed=0)
    buf = io.BytesIO()
    _histogram(stats, 1.5, "tiny").savefig(buf, format="png", dpi=30)
    assert buf.getvalue().startswith(b"\\x89PNG")
    out.update(torch_after_run=[m for m in ("torch", "torchvision", "lightly") if m in sys.modules],
               pyplot="matplotlib.pyplot" in sys.modules, threads=threading.active_count())
    print(json.dumps(out))
    """
)


def test_pipeline_imports_and_samples_without_torch() -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, ",".join(TORCH_FREE)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"check", "coreset", "report", "sampling"} <= set(out["modules"])
    assert out["torch_after_import"] == [], f"importing {out['modules']} loaded {out['torch_after_import']}"
    assert out["pyplot"] is False  # the report draws through matplotlib's object API
    assert out["threads"] == 1  # nothing in the library starts a thread
    if any(os.path.exists(path) for path in GPU_DRIVER_FILES):
        pytest.skip("a GPU driver is installed here: device='auto' rightly asks torch for the GPU")
    assert out["torch_after_run"] == [], f"device='auto' sampling loaded {out['torch_after_run']}"


def _blas_threads() -> list[tuple[str, int]]:
    return [(lib["filepath"], lib["num_threads"]) for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_coreset_restores_the_blas_thread_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _blas_threads()
    if not before:
        pytest.skip("threadpoolctl finds no BLAS library in this process")
    during: list[list[tuple[str, int]]] = []
    real_loop = coreset._pick_loop

    def watched(*args: Any) -> Any:
        during.append(_blas_threads())
        return real_loop(*args)

    monkeypatch.setattr(coreset, "_pick_loop", watched)
    x = np.random.default_rng(1).standard_normal((2000, 16)).astype(np.float32)
    picks = kcenter(x, x[:3] + 0.1, n_samples=50, device="cpu", algorithm="pruned")
    assert len(picks.indices) == 50
    assert during and all(count == 1 for _, count in during[0]), during  # one thread while it picks
    assert _blas_threads() == before  # and the previous limits afterwards

    with coreset._one_blas_thread():
        with coreset._one_blas_thread():  # nested: each level restores what it found
            assert all(count == 1 for _, count in _blas_threads())
        assert all(count == 1 for _, count in _blas_threads())
    assert _blas_threads() == before


def test_training_leaves_the_global_generators_alone(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        path = tmp_path / f"img_{i}.jpg"
        path.write_bytes(encode(photo(300 + i, (40, 36)), "JPEG"))
        paths.append(path)
    cfg = load_config(["lightly.collate.input_size=32", "lightly.loader.batch_size=4", "lightly.trainer.max_epochs=1",
                       "lightly.model.num_ftrs=16"]).lightly
    torch_state, np_state, py_state = torch.random.get_rng_state().clone(), np.random.get_state(), random.getstate()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)

    result = train_simclr(paths, cfg, out_dir=tmp_path / "out", seed=5, num_workers=0)

    assert len(result.losses) == 1 and np.isfinite(result.losses[0])
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert random.getstate() == py_state
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == cudnn
