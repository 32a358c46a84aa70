"""Models and checkpoints against lightly's own CLIs: `lightly-ssl-train` checkpoints embed the same in
`lightly-embed` and in poolwatch, `train_simclr` checkpoints load in both, bad checkpoints are refused
with one line, and POOLWATCH_WEIGHTS is honoured.

The lightly CLIs run as real subprocesses (hydra's output pointed into tmp, CUDA hidden so every
program computes on the CPU). Images are written without EXIF orientation, so lightly's loader (no
EXIF handling) and poolwatch's decode see the same pixels.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from poolwatch.pipeline.config import load_config
from poolwatch.pipeline.decode import preprocess
from poolwatch.pipeline.embed import Embedder, ModelSpec, load_model, weights_hash
from poolwatch.pipeline.train import TrainError, TrainResult, train_simclr

from .conftest import encode, photo, run_cli

BIN = Path(sys.executable).parent
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
# Small batches gain little from a second thread, and on a busy 2-core machine two spinning OpenMP
# threads are several times slower than one: the training in this file runs single-threaded.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SIZE = 32  # collate.input_size everywhere: small and fast, the CIFAR-style resnets work at any size
N_IMAGES = 30
LIGHTLY_CLI_TIMEOUT = 300


# ---- helpers --------------------------------------------------------------------------------------
def lightly_cfg(*overrides: str, precision: int | str | None = None) -> dict:
    """lightly's full CLI config as poolwatch resolves it (resnet-18, num_ftrs 32 unless overridden)."""
    base = [f"lightly.collate.input_size={SIZE}", "lightly.loader.batch_size=8", "lightly.trainer.max_epochs=1"]
    cfg = load_config([*base, *overrides]).lightly
    if precision is not None:  # set directly: lightly's/Lightning's string values ("bf16") as well
        cfg["trainer"]["precision"] = precision
    return cfg


def run_lightly(tool: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """A lightly CLI (`lightly-ssl-train`, `lightly-embed`) in `cwd`, hydra's run dir inside it."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [str(BIN / tool), *args, f"hydra.run.dir={cwd / 'hydra'}", "loader.num_workers=0", f"collate.input_size={SIZE}"],
        cwd=cwd, capture_output=True, text=True, timeout=LIGHTLY_CLI_TIMEOUT, env={**os.environ, **CPU_ONLY, **ONE_THREAD},
    )
    assert proc.returncode == 0, f"{tool} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def lightly_embed(images: Path, checkpoint: Path, cwd: Path) -> dict[str, np.ndarray]:
    """Embeddings by the real `lightly-embed checkpoint=...`, read back with lightly's own reader."""
    from lightly.utils.io import load_embeddings

    run_lightly("lightly-embed", cwd, f"input_dir={images}", f"checkpoint={checkpoint}")
    found = sorted(cwd.rglob("embeddings.csv"))
    assert len(found) == 1, f"lightly-embed wrote {found}"
    vectors, _labels, filenames = load_embeddings(str(found[0]))
    return dict(zip(filenames, np.asarray(vectors, dtype=np.float64), strict=True))


def store_vectors(shared: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Vectors of the current model by relpath, and the current model's row, from the SQLite store."""
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        conn.row_factory = sqlite3.Row
        model = dict(conn.execute("SELECT * FROM models WHERE is_current = 1").fetchone())
        rows = conn.execute(
            "SELECT images.relpath, embeddings.vector FROM embeddings JOIN images ON images.id = embeddings.image_id"
            " WHERE embeddings.model_id = ?", (model["id"],),
        ).fetchall()
    return {r["relpath"]: np.frombuffer(r["vector"], dtype=np.float32).astype(np.float64) for r in rows}, model


def assert_same_vectors(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    """Equal to 1e-4, or to float32's own resolution (rtol 1e-5) for large values: a briefly trained model
    in eval mode (BatchNorm running statistics of a few steps) can give components in the thousands."""
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-4, rtol=1e-5, err_msg=name)
    # not vacuous: the vectors carry information (they differ between images)
    stacked = np.stack([theirs[n] for n in sorted(theirs)])
    assert float(stacked.std(axis=0).mean()) > 1e-3


def ingest(inp: Path, shared: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(
        "ingest", "--json", f"input_dir={inp}", f"shared_dir={shared}", "device=cpu", "lightly.pre_trained=false",
        f"lightly.collate.input_size={SIZE}", "lightly.loader.num_workers=0", "lightly.loader.batch_size=16",
        "remove_exact_duplicates=false", *extra, env={**CPU_ONLY, **(env or {})}, timeout=240,
    )


def state_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photo-like JPEGs and PNGs without EXIF orientation, of different sizes (Resize really works)."""
    root = tmp_path_factory.mktemp("images")
    for i in range(N_IMAGES):
        fmt, ext = ("PNG", "png") if i % 3 == 0 else ("JPEG", "jpg")
        (root / f"img_{i:03d}.{ext}").write_bytes(encode(photo(7000 + i, (96 + 4 * i, 72)), fmt))
    return root


@pytest.fixture(scope="module")
def lightly_checkpoint(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint written by the real `lightly-ssl-train` (resnet-18, num_ftrs 32, one epoch, offline)."""
    cwd = tmp_path_factory.mktemp("lightly-train")
    run_lightly("lightly-ssl-train", cwd, f"input_dir={images}", "trainer.max_epochs=1", "pre_trained=False",
                "loader.batch_size=8", "trainer.enable_model_summary=False")
    found = sorted(cwd.rglob("lightly_epoch_*.ckpt"))
    assert len(found) == 1, f"lightly-ssl-train wrote {found}"
    return found[0]


# ---- 1. equivalence with lightly's CLIs -----------------------------------------------------------
def test_lightly_trained_checkpoint_embeds_like_lightly_embed(images: Path, lightly_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = torch.load(lightly_checkpoint, map_location="cpu", weights_only=True)
    assert all(k.startswith("model.") for k in ckpt["state_dict"])  # lightly's Lightning format

    theirs = lightly_embed(images, lightly_checkpoint, tmp_path / "embed")
    assert len(theirs) == N_IMAGES

    shared = tmp_path / "shared"
    # lightly-embed's vectors: fp32 with its full decode + resize (the defaults trade exactness for speed)
    proc = ingest(images, shared, f"checkpoint={lightly_checkpoint.resolve()}", "embedding_precision=fp32",
                  "check.exact_decode=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] == N_IMAGES
    ours, model = store_vectors(shared)
    assert model["source"] == "checkpoint"
    assert model["detail"] == str(lightly_checkpoint.resolve())
    assert model["dim"] == 32
    assert_same_vectors(ours, theirs)


# ---- 2. training round trip -----------------------------------------------------------------------
def test_train_simclr_round_trip(images: Path, tmp_path: Path) -> None:
    paths = sorted(images.iterdir())[:24]
    cfg = lightly_cfg("lightly.trainer.max_epochs=2")  # resnet-18, d32, batch 8: 3 steps an epoch
    rng_before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    seen: list[tuple[int, int, float]] = []
    extra = tmp_path / "shared" / "pool" / "checkpoint_latest.ckpt"
    result = train_simclr(paths, cfg, out_dir=tmp_path / "a", seed=3, extra_checkpoint=extra,
                          progress=lambda e, s, loss: seen.append((e, s, loss)))

    # global random state is left as it was
    assert torch.equal(torch.get_rng_state(), rng_before[0])
    assert np.array_equal(np.random.get_state()[1], rng_before[1]) and random.getstate() == rng_before[2]

    assert isinstance(result, TrainResult)
    assert result.checkpoint == tmp_path / "a" / "lightly_epoch_2.ckpt" and result.checkpoint.is_file()
    assert result.epochs == 2 and len(result.losses) == 2 and result.seconds > 0 and result.skipped == []
    assert all(math.isfinite(x) and x > 0 for x in result.losses)
    assert [(e, s) for e, s, _ in seen] == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (2, 6)]
    assert result.losses[0] == pytest.approx(sum(x for e, _, x in seen if e == 1) / 3)

    raw = torch.load(result.checkpoint, map_location="cpu", weights_only=True)  # plain data only
    assert raw["global_step"] == 6 and raw["epoch"] == 1 and "pytorch-lightning_version" in raw
    assert raw["state_dict"] and all(k.startswith("model.") for k in raw["state_dict"])
    assert not any(k.startswith(".") for k in os.listdir(tmp_path / "a"))  # no temp file left behind
    assert same_state(state_of(extra), raw["state_dict"])

    # poolwatch loads it; training changed the seeded initial weights
    spec = ModelSpec.from_lightly(cfg)
    loaded = load_model(spec, models_dir=tmp_path / "models", checkpoint=result.checkpoint)
    assert loaded.source == "checkpoint" and loaded.detail == str(result.checkpoint)
    initial = load_model(spec, models_dir=tmp_path / "models", pretrained=False, seed=3)
    assert initial.source == "random" and initial.weights_hash != loaded.weights_hash

    # lightly-embed loads it too, and embeds exactly as poolwatch's Embedder
    subset = tmp_path / "subset"
    subset.mkdir()
    for p in paths:
        (subset / p.name).write_bytes(p.read_bytes())
    theirs = lightly_embed(subset, result.checkpoint, tmp_path / "embed")
    from PIL import Image

    pixels = np.stack([preprocess(Image.open(p), SIZE) for p in paths])
    vectors = Embedder(loaded, "cpu").embed(pixels)
    assert_same_vectors({p.name: v.astype(np.float64) for p, v in zip(paths, vectors, strict=True)}, theirs)

    # same seed, same data: same weights; another seed: other weights
    again = train_simclr(paths, cfg, out_dir=tmp_path / "b", seed=3)
    assert again.losses == result.losses
    assert same_state(state_of(again.checkpoint), raw["state_dict"])
    other = train_simclr(paths, cfg, out_dir=tmp_path / "c", seed=4)
    assert not same_state(state_of(other.checkpoint), raw["state_dict"])


def test_training_continues_from_init_without_changing_it(images: Path, tmp_path: Path) -> None:
    paths = sorted(images.iterdir())[:8]
    cfg = lightly_cfg("lightly.loader.batch_size=4", "lightly.trainer.max_epochs=0")
    current = load_model(ModelSpec.from_lightly(cfg), models_dir=tmp_path / "models", pretrained=False, seed=9)
    before = weights_hash(current.module)
    zero = train_simclr(paths, cfg, out_dir=tmp_path / "zero", init=current.module)
    assert zero.losses == [] and zero.checkpoint.name == "lightly_epoch_0.ckpt"
    assert same_state(state_of(zero.checkpoint), {f"model.{k}": v for k, v in current.module.state_dict().items()})

    one = train_simclr(paths, lightly_cfg("lightly.loader.batch_size=4"), out_dir=tmp_path / "one", init=current.module)
    assert weights_hash(current.module) == before  # the caller's model is never trained in place
    assert not same_state(state_of(one.checkpoint), state_of(zero.checkpoint))

    wrong = load_model(ModelSpec(num_ftrs=16, input_size=SIZE), models_dir=tmp_path / "models", pretrained=False)
    with pytest.raises(TrainError, match="init"):
        train_simclr(paths, cfg, out_dir=tmp_path / "wrong", init=wrong.module)


def test_unloadable_files_are_skipped_and_too_few_images_refused(images: Path, tmp_path: Path) -> None:
    good = sorted(images.iterdir())[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    gone = tmp_path / "gone.jpg"
    # 5 files, batch 8 with drop_last: the whole set is one batch (as lightly's CLI: min(batch, n))
    result = train_simclr([good[0], broken, good[1], gone, good[2]], lightly_cfg(), out_dir=tmp_path / "ok")
    assert result.skipped == [broken, gone]
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])
    assert torch.load(result.checkpoint, weights_only=True)["global_step"] == 1

    with pytest.raises(TrainError, match="at least 2"):
        train_simclr([good[0]], lightly_cfg(), out_dir=tmp_path / "one")
    with pytest.raises(TrainError, match="1 of 3 could be loaded"):
        train_simclr([broken, good[0], gone], lightly_cfg(), out_dir=tmp_path / "two")
    assert not (tmp_path / "two").exists()
    with pytest.raises(TrainError, match="lightly.trainer.precision"):
        train_simclr(good, lightly_cfg(precision=64), out_dir=tmp_path / "p")


def test_precision_on_cpu(images: Path, tmp_path: Path) -> None:
    paths = sorted(images.iterdir())[:4]
    batch = "lightly.loader.batch_size=4"
    full = train_simclr(paths, lightly_cfg(batch), out_dir=tmp_path / "32")
    # no fp16 on the CPU: precision 16 trains in float32, exactly as 32 does
    for value in (16, "16-mixed"):
        half = train_simclr(paths, lightly_cfg(batch, precision=value), out_dir=tmp_path / f"{value}")
        assert half.losses == full.losses
        assert same_state(state_of(half.checkpoint), state_of(full.checkpoint))
    # bf16 is asked for explicitly: autocast on the CPU, a different (finite) result
    bf16 = train_simclr(paths, lightly_cfg(batch, precision="bf16-mixed"), out_dir=tmp_path / "bf16")
    assert math.isfinite(bf16.losses[0]) and bf16.losses != full.losses
    assert all(v.dtype != torch.bfloat16 for v in state_of(bf16.checkpoint).values())


# ---- 3. bad checkpoints through the CLI -----------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def small_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    for i in range(4):
        (root / f"s_{i}.jpg").write_bytes(encode(photo(100 + i)))
    return root


def _one_error_line(proc: subprocess.CompletedProcess, path: Path) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and lines[0].startswith("poolwatch: error: checkpoint")
    return lines[0]


@pytest.mark.parametrize("kind", ["random-bytes", "torch-save-payload", "pickle-payload", "missing"])
def test_bad_checkpoint_exits_2_with_one_line(kind: str, small_input: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"{kind}.ckpt"
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(20_000))
    elif kind == "torch-save-payload":
        torch.save({"state_dict": {"model.x": _Payload(marker)}}, path)
    elif kind == "pickle-payload":
        with open(path, "wb") as fh:
            pickle.dump({"state_dict": _Payload(marker)}, fh)
    line = _one_error_line(ingest(small_input, tmp_path / "shared", f"checkpoint={path}"), path)
    assert not marker.exists()
    if kind == "missing":
        assert "does not exist" in line
    else:
        assert "not a loadable weights-only checkpoint" in line
    if kind.endswith("payload"):  # control: the payload is real, an unsafe load would have run it
        if kind == "pickle-payload":
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
        assert marker.exists()


def test_checkpoint_for_other_num_ftrs_names_the_dimension(images: Path, small_input: Path, tmp_path: Path) -> None:
    d16 = train_simclr(sorted(images.iterdir())[:4], lightly_cfg("lightly.model.num_ftrs=16", "lightly.loader.batch_size=4"),
                       out_dir=tmp_path / "d16")
    line = _one_error_line(ingest(small_input, tmp_path / "shared", f"checkpoint={d16.checkpoint}",
                                  "lightly.model.num_ftrs=32"), d16.checkpoint)
    assert "num_ftrs=16" in line and "num_ftrs=32" in line


# ---- 4. POOLWATCH_WEIGHTS -------------------------------------------------------------------------
def test_poolwatch_weights_env_is_the_pretrained_file(small_input: Path, lightly_checkpoint: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    weights = lightly_checkpoint.resolve()
    proc = ingest(small_input, shared, "lightly.pre_trained=true", env={"POOLWATCH_WEIGHTS": str(weights)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = run_cli("status", "--json", f"shared_dir={shared}", timeout=120)
    assert status.returncode == 0, status.stderr
    model = json.loads(status.stdout)["model"]
    assert model["source"] == "pretrained" and model["detail"] == str(weights)
    ours, _ = store_vectors(shared)
    assert len(ours) == 4
