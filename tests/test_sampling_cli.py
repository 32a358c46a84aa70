"""`poolwatch sample` end to end: datapool, outputs lightly reads back, dump, atomicity under SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from lightly.utils.io import load_embeddings
from PIL import Image

from .conftest import FAST, POOLWATCH, encode, make_dataset, photo, run_cli


def sample(inp: Path, shared: Path, *extra: str, expect: int = 0) -> dict:
    proc = run_cli("sample", "--json", f"input_dir={inp}", f"shared_dir={shared}", *FAST, *extra)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]) if expect == 0 else {"stderr": proc.stderr}


def add_images(folder: Path, start: int, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (folder / f"img_{i:04d}.jpg").write_bytes(encode(photo(i), "JPEG"))


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_growing_folder_pool_history_and_restore(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    inp, shared = dirs
    add_images(inp, 0, 40)
    first = sample(inp, shared, "datapool.name=p", "stopping_condition.n_samples=10")
    assert first["n_candidates"] == 40 and first["n_selected"] == 10 and first["pool_after"] == 10
    run1 = Path(first["output_dir"])
    history = sorted((shared / "p" / "history").glob("datapool_*.csv"))
    assert [h.name for h in history] == [f"datapool_{run1.name}.csv"]

    add_images(inp, 1000, 25)
    second = sample(inp, shared, "datapool.name=p", "stopping_condition.n_samples=10")
    # only the 25 new images are candidates; the pool now has 20 members
    assert second["n_candidates"] == 25 and second["n_selected"] == 10
    assert second["pool_before"] == 10 and second["pool_after"] == 20
    run2 = Path(second["output_dir"])
    new_names = {f"img_{i:04d}.jpg" for i in range(1000, 1025)}
    assert set(lines(run2 / "filenames" / "sampled_filenames.txt")) <= new_names
    assert len(lines(run2 / "filenames" / "removed_filenames.txt")) == 15
    assert (shared / "runs" / "latest").resolve() == run2.resolve()
    _, _, pool_names = load_embeddings(str(shared / "p" / "datapool_latest.csv"))
    assert len(pool_names) == 20
    _, _, incl = load_embeddings(str(run2 / "data" / "selected_embeddings_including_datapool.csv"))
    assert sorted(incl) == sorted(pool_names)

    # restore the first state
    first_state = shared / "p" / "history" / f"datapool_{run1.name}.csv"
    proc = run_cli("datapool", "restore", "p", str(first_state), f"input_dir={inp}", f"shared_dir={shared}")
    assert proc.returncode == 0, proc.stderr
    _, _, restored = load_embeddings(str(shared / "p" / "datapool_latest.csv"))
    _, _, original = load_embeddings(str(first_state))
    assert sorted(restored) == sorted(original) and len(restored) == 10
    listing = run_cli("datapool", "list", f"shared_dir={shared}")
    assert listing.stdout.split() == ["p", "10"]
    # export round-trips, import adds
    out = tmp_path / "export.csv"
    assert run_cli("datapool", "export", "p", str(out), f"input_dir={inp}", f"shared_dir={shared}").returncode == 0
    _, _, exported = load_embeddings(str(out))
    assert sorted(exported) == sorted(original)
    proc = run_cli("datapool", "import", "q", str(out), f"input_dir={inp}", f"shared_dir={shared}")
    assert proc.returncode == 0 and "q: 10 members" in proc.stdout


def test_outputs_are_lightly_compatible_with_awkward_names(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    add_images(inp / "sub", 0, 12)
    awkward = 'a,b "c" é.png'
    (inp / awkward).write_bytes(encode(photo(777), "PNG"))
    truth = make_dataset(inp / "mixed", n_ok=0)  # corrupt files only
    result = sample(inp, shared, "stopping_condition.n_samples=1.0")
    run = Path(result["output_dir"])
    emb, labels, names = load_embeddings(str(run / "data" / "embeddings.csv"))
    assert awkward in names and len(names) == 13 and emb.shape == (13, 32)
    # n_samples=1.0 keeps every candidate
    _, _, selected = load_embeddings(str(run / "data" / "selected_embeddings.csv"))
    assert sorted(selected) == sorted(names)
    assert lines(run / "filenames" / "removed_filenames.txt") == []
    # labels: index of the top-level sub-folder (mixed=0, sub=1), 0 at the top
    label_of = dict(zip(names, labels, strict=True))
    assert label_of[awkward] == 0 and label_of["sub/img_0000.jpg"] == 1
    # normalised vectors (normalize_embeddings=true)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    corrupt = json.loads((run / "filenames" / "corrupt_filenames.json").read_text())
    assert len(corrupt) == sum(truth["corrupt"].values())
    assert corrupt["mixed/cut_with_eoi.jpg"]["reason"] == "truncated"
    assert "hidden" not in (run / "config" / "config.yaml").read_text()


def test_min_distance_invariants_on_a_real_run(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    add_images(inp, 0, 60)
    first = sample(inp, shared, "datapool.name=p", "stopping_condition.n_samples=5")
    add_images(inp, 500, 40)
    emb_all, _, names_all = load_embeddings(str(Path(first["output_dir"]) / "data" / "embeddings.csv"))
    d = np.linalg.norm(emb_all[:, None] - emb_all[None], axis=-1)
    min_distance = float(np.quantile(d[np.triu_indices(len(d), 1)], 0.05))
    second = sample(inp, shared, "datapool.name=p", f"stopping_condition.min_distance={min_distance}")
    run = Path(second["output_dir"])
    kept, _, kept_names = load_embeddings(str(run / "data" / "selected_embeddings_including_datapool.csv"))
    cands, _, cand_names = load_embeddings(str(run / "data" / "embeddings.csv"))
    pair = np.linalg.norm(kept[:, None] - kept[None], axis=-1)
    assert pair[np.triu_indices(len(kept), 1)].min() >= min_distance - 1e-6
    removed = set(lines(run / "filenames" / "removed_filenames.txt"))
    assert removed, "expected some near images to be removed"
    for vec, name in zip(cands, cand_names, strict=True):
        if name in removed:
            assert np.linalg.norm(kept - vec, axis=1).min() < min_distance + 1e-6
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        stop = conn.execute("SELECT stop_reason FROM runs ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert stop in ("min_distance", "exhausted")


def test_dump_dataset_sizes_formats_and_exif(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    add_images(inp / "a", 0, 6)
    # a landscape image stored sideways with EXIF orientation 6 (rotate 90° clockwise to view)
    upright = photo(99, (60, 90))  # portrait when upright: 60 wide, 90 tall
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 90 wide, 60 tall on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    (inp / "a" / "rotated.jpg").write_bytes(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    result = sample(inp, shared, "stopping_condition.n_samples=1.0", "dump_dataset=true",
                    "output_image_size=[64,32]", "output_image_format=jpg")
    run = Path(result["output_dir"])
    dumped = sorted(p.relative_to(run / "sampled").as_posix() for p in (run / "sampled").rglob("*") if p.is_file())
    assert dumped == sorted(n.rsplit(".", 1)[0] + ".jpg" for n in lines(run / "filenames" / "sampled_filenames.txt"))
    for p in (run / "sampled").rglob("*.jpg"):
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size == (64, 32)

    shared2 = shared.parent / "shared2"
    result = sample(inp, shared2, "stopping_condition.n_samples=1.0", "dump_dataset=true", "output_image_size=100")
    run = Path(result["output_dir"])
    with Image.open(run / "sampled" / "a" / "rotated.png") as im:
        assert im.size == (100, 150)  # upright portrait, shortest edge 100
    with Image.open(run / "sampled" / "a" / "img_0000.png") as im:
        assert min(im.size) == 100 and im.format == "PNG"


def test_pool_dataset_is_kept_in_sync(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    add_images(inp, 0, 12)
    sample(inp, shared, "datapool.name=p", "stopping_condition.n_samples=4", "dump_dataset=true")
    add_images(inp, 100, 8)
    sample(inp, shared, "datapool.name=p", "stopping_condition.n_samples=4", "dump_dataset=true")
    files = sorted(p.name for p in (shared / "p" / "dataset").iterdir())
    _, _, pool = load_embeddings(str(shared / "p" / "datapool_latest.csv"))
    assert files == sorted(n.rsplit(".", 1)[0] + ".png" for n in pool) and len(files) == 8


@pytest.mark.parametrize(
    "extra, key",
    [
        ((), "stopping_condition"),
        (("method=random", "stopping_condition.min_distance=0.3"), "min_distance"),
        (("n_example_images=3", "stopping_condition.n_samples=2"), "n_example_images"),
    ],
)
def test_usage_errors_exit_2(dirs: tuple[Path, Path], extra: tuple[str, ...], key: str) -> None:
    inp, shared = dirs
    out = sample(inp, shared, *extra, expect=2)
    assert key in out["stderr"] and len(out["stderr"].strip().splitlines()) == 1


def test_random_method_is_seeded(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    add_images(inp, 0, 30)
    picks = []
    for _ in range(2):
        r = sample(inp, shared, "method=random", "stopping_condition.n_samples=0.2")
        assert r["n_selected"] == 6
        picks.append(lines(Path(r["output_dir"]) / "filenames" / "sampled_filenames.txt"))
    assert picks[0] == picks[1]


def test_sampling_imported_embeddings_with_masked_and_selected(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    with open(shared / "emb.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filenames", *[f"embedding_{i}" for i in range(8)], "masked", "selected", "labels"])
        for i, v in enumerate(vectors):
            w.writerow([f"f{i}.png", *v.tolist(), int(i < 5), int(5 <= i < 8), 0])
    proc = run_cli("sample", "--json", "embeddings=emb.csv", f"shared_dir={shared}", f"input_dir={tmp_path / 'none'}",
                   "stopping_condition.n_samples=10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n_candidates"] == 42 and result["n_selected"] == 10  # 50 - 5 masked - 3 pre-selected
    run = Path(result["output_dir"])
    _, _, names = load_embeddings(str(run / "data" / "selected_embeddings.csv"))
    assert not {f"f{i}.png" for i in range(8)} & set(names)
    _, _, incl = load_embeddings(str(run / "data" / "selected_embeddings_including_datapool.csv"))
    assert {f"f{i}.png" for i in range(5, 8)} <= set(incl)


def test_sigkill_midway_leaves_nothing_half_done(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    add_images(inp, 0, 150)
    assert run_cli("ingest", f"input_dir={inp}", f"shared_dir={shared}", *FAST).returncode == 0
    runs = shared / "runs"
    # The dump of 150 large PNGs keeps the run in its write phase long enough to be caught there.
    proc = subprocess.Popen([*POOLWATCH, "sample", f"input_dir={inp}", f"shared_dir={shared}", *FAST,
                             "stopping_condition.n_samples=1.0", "dump_dataset=true", "output_image_size=[512,512]"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if runs.is_dir() and any(p.name.startswith(".tmp-") for p in runs.iterdir()):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        else:
            pytest.fail("the run never reached its write phase (or finished before it could be killed)")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not [p for p in runs.iterdir() if not p.name.startswith(".")]  # no run folder
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 0
        assert conn.execute("SELECT status FROM runs").fetchall() == [("running",)]
    result = sample(inp, shared, "stopping_condition.n_samples=10")
    assert result["n_selected"] == 10 and Path(result["output_dir"]).is_dir()
    assert not any(p.name.startswith(".tmp-") for p in runs.iterdir())
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        statuses = [r[0] for r in conn.execute("SELECT status FROM runs ORDER BY id")]
        assert statuses == ["interrupted", "ok"]
        assert conn.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 150
