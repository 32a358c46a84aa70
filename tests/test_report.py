"""Reports: the numbers agree with the run's outputs, the PDF has its pages, memory stays bounded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lightly.utils.io import load_embeddings
from pypdf import PdfReader

from poolwatch.pipeline.report import max_points, pairwise_stats

from .conftest import FAST, encode, make_dataset, photo, run_cli


def test_report_of_a_pool_run_on_300_images(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    truth = make_dataset(inp, n_ok=300)
    first = run_cli("sample", "--json", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "datapool.name=p",
                    "stopping_condition.n_samples=30", "token=very-secret-token")
    assert first.returncode == 0, first.stderr[-2000:]
    for i in range(20):
        (inp / f"late_{i}.jpg").write_bytes(encode(photo(50_000 + i), "JPEG"))
    proc = run_cli("sample", "--json", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "datapool.name=p",
                   "stopping_condition.n_samples=5", "stopping_condition.min_distance=0.01", "n_example_images=4",
                   "token=very-secret-token")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = Path(json.loads(proc.stdout.strip().splitlines()[-1])["output_dir"])
    report = json.loads((run / "report.json").read_text())

    # numbers agree with the run's outputs
    _, _, cands = load_embeddings(str(run / "data" / "embeddings.csv"))
    _, _, selected = load_embeddings(str(run / "data" / "selected_embeddings.csv"))
    _, _, incl = load_embeddings(str(run / "data" / "selected_embeddings_including_datapool.csv"))
    assert report["candidates"] == len(cands) == 20
    assert report["selected"] == len(selected) == 5
    assert report["pool_before"] == 30 and report["pool_after"] == len(incl) == 35
    assert report["images"]["corrupt_by_reason"] == truth["corrupt"]
    assert report["images"]["duplicates"] == truth["duplicate"]
    assert report["images"]["by_status"]["ok"] == truth["ok"] + 20
    assert report["model"]["source"] == "random" and report["model"]["random_init"] is True
    assert report["min_distance"] == 0.01
    before, after = report["distances_before"], report["distances_after"]
    assert before["count"] == 20 * 19 // 2 and after["count"] == 35 * 34 // 2
    assert not before["subsampled"] and before["min"] <= before["p10"] <= before["mean"] <= before["max"]
    assert after["min"] >= 0.01 - 1e-6  # the min_distance invariant shows in the statistics
    assert len(report["examples"]["closest_removed"]) == 2 and len(report["examples"]["farthest_retained"]) == 2
    corrupt_listed = json.loads((run / "filenames" / "corrupt_filenames.json").read_text())
    assert {c["file"] for c in report["corrupt_files"]} == set(corrupt_listed)
    assert 0 <= report["compute_efficiency"] <= 1
    assert report["config"]["token"] == "***"
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".csv", ".txt", ".pdf"):
            assert b"very-secret-token" not in path.read_bytes(), path

    near = json.loads((run / "filenames" / "near_duplicate_filenames.json").read_text())
    assert report["near_duplicates"]["images"] == len(near)
    assert report["near_duplicates"]["groups"] == len({v["original"] for v in near.values()})

    # the PDF: summary, two histograms, scatter, examples, near-duplicate groups (when there are any), tables
    assert len(PdfReader(run / "report.pdf").pages) == report["pdf_pages"] == 6 + (report["near_duplicates"]["groups"] > 0)
    for name in ("distance_distr_before", "distance_distr_after", "embedding_scatter", "examples"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 5_000

    # regenerate it from the run folder + store
    (run / "report.pdf").unlink()
    again = run_cli("report", "latest", f"shared_dir={shared}")
    assert again.returncode == 0, again.stderr
    assert (run / "report.pdf").exists()
    assert run_cli("report", "999", f"shared_dir={shared}").returncode == 2


def test_pairwise_stats_subsample_when_over_budget() -> None:
    x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    full = pairwise_stats(x, memory_gb=1.0, seed=0)
    assert not full.subsampled and full.distances.size == 500 * 499 // 2
    small = pairwise_stats(x, memory_gb=1e-5, seed=0)
    assert small.subsampled and small.points == max_points(1e-5) < 500
    assert small.distances.size == small.points * (small.points - 1) // 2
    again = pairwise_stats(x, memory_gb=1e-5, seed=0)
    assert np.array_equal(small.distances, again.distances)  # seeded


SUBPROCESS = r"""
import json, resource, sys, sqlite3, time
import torch  # a sampling run on device "auto" asks torch about CUDA; its import is not the report's memory
from pathlib import Path
import numpy as np
from poolwatch.pipeline.config import load_config
from poolwatch.pipeline.store import Store
from poolwatch.pipeline.sampling import sample_run, import_embeddings
from poolwatch.pipeline.report import build_report

shared = Path(sys.argv[1])
rng = np.random.default_rng(0)
with open(shared / "emb.csv", "w") as fh:
    fh.write("filenames," + ",".join(f"embedding_{i}" for i in range(32)) + ",labels\n")
    for i in range(5000):
        fh.write(f"f{i}.png," + ",".join(f"{v:.6f}" for v in rng.normal(size=32)) + ",0\n")
cfg = load_config([f"shared_dir={shared}", "embeddings=emb.csv", "stopping_condition.n_samples=100",
                   "memory_requirement_in_GB=0.0001", f"input_dir={shared / 'none'}"])
with Store.open(cfg.store_path) as store:
    model_id, pre = import_embeddings(store, cfg.resolve_shared(cfg.embeddings))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = sample_run(store, cfg, trigger="cli", model_id=model_id)
    data = build_report(store, result.run_id)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before": data["distances_before"], "base_kb": base, "peak_kb": peak}))
"""


def test_report_on_5000_vectors_with_a_tiny_memory_budget(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    before = out["before"]
    assert before["subsampled"] and before["of_points"] == 5000 and before["points"] == max_points(0.0001)
    # A full 5000×5000 float32 matrix alone would be 100 MB; the whole report adds far less.
    assert out["peak_kb"] - out["base_kb"] < 80_000, out


@pytest.mark.parametrize("n, block_bytes", [(2, 4), (3, 4), (97, 4), (97, 1000), (500, 64 * 1024**2)])
def test_condensed_distances_match_brute_force_across_blocks(n: int, block_bytes: int, monkeypatch) -> None:
    from poolwatch.pipeline import report

    monkeypatch.setattr(report, "BLOCK_BYTES", block_bytes)
    x = np.random.default_rng(n).normal(size=(n, 8)).astype(np.float32)
    i, j = np.triu_indices(n, 1)
    brute = np.linalg.norm(x[i].astype(np.float64) - x[j], axis=1)
    got = report.condensed_distances(x)
    assert got.dtype == np.float32 and got.shape == brute.shape
    np.testing.assert_allclose(got, brute, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_near", [True, False])
def test_report_shows_near_duplicate_groups(tmp_path: Path, with_near: bool) -> None:
    from PIL import ImageFilter

    from poolwatch.pipeline.config import load_config
    from poolwatch.pipeline.report import build_report
    from poolwatch.pipeline.sampling import sample_run
    from poolwatch.pipeline.store import ImageRecord, Store

    inp, shared = tmp_path / "input", tmp_path / "shared"
    inp.mkdir()
    originals = {f"img_{i:02d}.jpg": photo(7_000 + i) for i in range(12)}
    copies = {"img_00_copy.jpg": ("img_00.jpg", 0.0123), "img_00_blur.jpg": ("img_00.jpg", 0.0456),
              "img_05_copy.jpg": ("img_05.jpg", 0.0078)}
    images = {**originals, **{c: originals[o].filter(ImageFilter.BLUR) for c, (o, _d) in copies.items()}}
    cfg = load_config([f"shared_dir={shared}", f"input_dir={inp}", "stopping_condition.n_samples=4", "device=cpu"])
    root = str(cfg.input_paths[0])
    rng = np.random.default_rng(0)
    with Store.open(cfg.store_path) as store:
        model_id = store.register_model(weights_hash="test", input_size=32, source="checkpoint", detail="test weights",
                                        arch={"name": "test"}, dim=8, path=None)
        with store.transaction():
            ids, vectors = {}, {}
            for k, (name, image) in enumerate(images.items()):
                (inp / name).write_bytes(encode(image, "JPEG"))
                st = (inp / name).stat()
                ids[name] = store.upsert_image(ImageRecord(root, name, st.st_size, st.st_mtime_ns, f"{k:064x}", "ok",
                                                           width=image.width, height=image.height, format="JPEG"))
                o = copies[name][0] if name in copies else None
                vectors[name] = vectors[o] + rng.normal(0, 0.005, 8) if o else rng.normal(size=8)
                store.put_embedding(ids[name], model_id, vectors[name])
            if with_near:
                store.set_near_duplicates([(ids[c], ids[o], d, model_id) for c, (o, d) in copies.items()])
        result = sample_run(store, cfg, trigger="cli", model_id=model_id)
        (inp / "img_05_copy.jpg").unlink()  # gone since the run: its thumbnail is a placeholder, no exception
        data = build_report(store, result.run_id)

        run = result.output_dir
        report = json.loads((run / "report.json").read_text())
        pdf = PdfReader(run / "report.pdf")
        texts = [page.extract_text() for page in pdf.pages]
        assert len(texts) == report["pdf_pages"] == data["pdf_pages"]
        near_pages = [t for t in texts if "Near-duplicate groups" in t]
        summary = texts[0]
        if not with_near:
            assert report["near_duplicates"]["groups"] == report["near_duplicates"]["images"] == 0
            assert report["near_duplicates"]["recorded"] is True
            assert not near_pages and len(texts) == 6 and not (run / "plots" / "near_duplicates.png").exists()
            assert "near duplicates    0 in 0 groups" in summary
            # a run folder from before near-duplicate detection (no such file) still gets its report
            (run / "filenames" / "near_duplicate_filenames.json").unlink()
            again = build_report(store, result.run_id)
            assert again["near_duplicates"]["recorded"] is False and again["near_duplicates"]["groups"] == 0
            assert "not recorded by this run" in PdfReader(run / "report.pdf").pages[0].extract_text()
            return

    near = report["near_duplicates"]
    assert (near["groups"], near["images"]) == (2, 3)
    assert near["exclude_from_candidates"] is True and near["threshold"] == "auto"
    # the largest group first, its copies closest first
    assert [g["original"] for g in near["first"]] == ["img_00.jpg", "img_05.jpg"]
    assert [(c["path"], c["distance"]) for c in near["first"][0]["duplicates"]] == [("img_00_copy.jpg", 0.0123),
                                                                                   ("img_00_blur.jpg", 0.0456)]
    # near copies were left out of the candidates (exclude_from_candidates defaults to true)
    _, _, cand_names = load_embeddings(str(run / "data" / "embeddings.csv"))
    assert report["candidates"] == len(cand_names) == 12 and not set(cand_names) & set(copies)

    assert len(texts) == 7 and len(near_pages) == 1
    page = near_pages[0]
    assert "2 groups, 3 near copies in total" in page and "original, 2 copies" in page and "original, 1 copy" in page
    assert "exclude_from_candidates = true" in page and "left out" in page
    for name in ("img_00.jpg", "img_00_copy.jpg", "img_00_blur.jpg", "img_05_copy.jpg"):
        assert name in page, name
    assert "d = 0.0123" in page and "d = 0.0456" in page and "d = 0.0078" in page
    assert page.count("(image not\navailable)") == 1  # img_05_copy.jpg, deleted after the run
    assert "near duplicates    3 in 2 groups (left out of the candidates)" in summary
    assert (run / "plots" / "near_duplicates.png").stat().st_size > 5_000
