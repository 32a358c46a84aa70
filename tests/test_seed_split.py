"""`seed` seeds sampling only; the random-init weights have their own `model.init_seed`.

The bug this guards against: `poolwatch sample method=random seed=2` on a store made with the default
seed built a new random model, re-embedded every image and deleted the old vectors, only to change which
images a random draw picks. Now no sampling option reaches the model, and `model.init_seed: null` (the
default) keeps the store's own random model, also in a store made when `seed` still seeded the weights.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from poolwatch.pipeline.config import ConfigError, load_config
from poolwatch.pipeline.embed import ModelSpec, random_init_seed
from poolwatch.pipeline.store import ModelRecord

from .conftest import FAST, encode, photo, run_cli, status_json

N_IMAGES = 40


def add_images(folder: Path, n: int = N_IMAGES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img_{i:04d}.jpg").write_bytes(encode(photo(i, (48, 40)), "JPEG"))


def cli_json(command: str, inp: Path, shared: Path, *extra: str) -> dict:
    proc = run_cli(command, "--json", f"input_dir={inp}", f"shared_dir={shared}", *FAST, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def vectors(shared: Path) -> list[tuple]:
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        return conn.execute("SELECT image_id, model_id, vector FROM embeddings ORDER BY image_id, model_id").fetchall()


def models(shared: Path) -> list[tuple]:
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        return conn.execute("SELECT id, source, detail, weights_hash, is_current FROM models ORDER BY id").fetchall()


def run_stats(shared: Path, run_id: int) -> dict:
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        return json.loads(conn.execute("SELECT stats FROM runs WHERE id = ?", (run_id,)).fetchone()[0])


def model_files(shared: Path) -> dict[str, bytes]:
    """Every file under models/: the weights and the exported artifacts."""
    root = shared / "models"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def picks(run: dict) -> list[str]:
    path = Path(run["output_dir"]) / "filenames" / "sampled_filenames.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_a_sampling_seed_never_touches_the_model_or_the_vectors(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    add_images(inp)
    first = cli_json("ingest", inp, shared)  # the default seed and model.init_seed
    assert first["processed"] == N_IMAGES and first["forward_passes"] > 0
    before = status_json(shared)
    model = before["model"]
    assert model["source"] == "random" and model["detail"] == "seed 1"
    assert before["embedded"] == N_IMAGES
    vectors_before, files_before = vectors(shared), model_files(shared)
    assert len(vectors_before) == N_IMAGES

    # the user's command: another sampling seed for a random draw of 10
    two = cli_json("sample", inp, shared, "method=random", "stopping_condition.n_samples=10", "seed=2")
    assert two["n_selected"] == 10 and two["model_id"] == model["id"]
    ingest_part = two.get("ingest") or run_stats(shared, two["id"])["ingest"]
    assert ingest_part["processed"] == 0
    assert ingest_part.get("forward_passes", 0) == 0
    after = status_json(shared)
    assert after["model"]["id"] == model["id"] and after["model"]["weights_hash"] == model["weights_hash"]
    assert vectors(shared) == vectors_before  # every vector kept, byte for byte, and no other model's added
    assert model_files(shared) == files_before  # no new random weights file

    # the seed still works: another sampling seed draws other images, the model stays
    three = cli_json("sample", inp, shared, "method=random", "stopping_condition.n_samples=10", "seed=3")
    assert three["model_id"] == model["id"]
    assert sorted(picks(two)) != sorted(picks(three))
    # an ingest with a sampling seed set does no forward pass either
    again = cli_json("ingest", inp, shared, "seed=2")
    assert again["processed"] == 0 and again["forward_passes"] == 0
    assert vectors(shared) == vectors_before and model_files(shared) == files_before
    assert [m[0] for m in models(shared)] == [model["id"]]


def test_a_store_made_before_init_seed_keeps_its_model_until_init_seed_asks_for_another(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    add_images(inp)
    # A store "from before the change": its random model was made with another seed (then `seed=5`;
    # the same weights file, `random-<arch>-seed5.pt`, and the same "seed 5" in the store).
    cli_json("ingest", inp, shared, "model.init_seed=5")
    old = status_json(shared)["model"]
    assert old["source"] == "random" and old["detail"] == "seed 5"
    vectors_before = vectors(shared)

    # the default (null) reads the store's model: nothing re-embedded, no seed-1 model made
    kept = cli_json("ingest", inp, shared)
    assert kept["processed"] == 0 and kept["forward_passes"] == 0
    assert vectors(shared) == vectors_before
    assert not any("seed1" in name for name in model_files(shared))
    assert [(m[0], m[2], m[4]) for m in models(shared)] == [(old["id"], "seed 5", 1)]

    # an explicit init seed is another model: the store is re-embedded with it, the old vectors go
    forced = cli_json("ingest", inp, shared, "model.init_seed=7")
    assert forced["processed"] == N_IMAGES and forced["forward_passes"] > 0
    new = status_json(shared)["model"]
    assert new["id"] != old["id"] and new["detail"] == "seed 7" and new["weights_hash"] != old["weights_hash"]
    assert {row[1] for row in vectors(shared)} == {new["id"]} and len(vectors(shared)) == N_IMAGES

    # and null keeps that one from now on
    vectors_seven = vectors(shared)
    kept = cli_json("ingest", inp, shared)
    assert kept["processed"] == 0 and kept["forward_passes"] == 0
    assert vectors(shared) == vectors_seven


# ---- the pieces, without subprocesses -----------------------------------------------------------
SPEC = ModelSpec(input_size=32)


def record(id: int, source: str = "random", detail: str | None = "seed 4", *, current: bool = False,
           input_size: int = 32, **arch: object) -> ModelRecord:
    return ModelRecord(id=id, weights_hash=f"h{id}", input_size=input_size, source=source, detail=detail,
                       arch={**SPEC.arch(), "precision": "fp32", **arch}, dim=SPEC.num_ftrs, path=None,
                       is_current=current)


def test_random_init_seed_reads_the_stores_random_model() -> None:
    assert random_init_seed([], SPEC) is None
    assert random_init_seed([record(1, "checkpoint", "/x.ckpt", current=True), record(2, "trained", "/t.ckpt")],
                            SPEC) is None
    assert random_init_seed([record(1, detail="seed 4")], SPEC) == 4
    # the current one wins over a newer one; then one at this input size; then the newest
    assert random_init_seed([record(1, detail="seed 4", current=True), record(2, detail="seed 9")], SPEC) == 4
    assert random_init_seed([record(1, detail="seed 4"), record(2, detail="seed 9", input_size=64)], SPEC) == 4
    assert random_init_seed([record(1, detail="seed 4"), record(2, detail="seed 9")], SPEC) == 9
    # another architecture's random model, or a detail that is not "seed N", does not count
    assert random_init_seed([record(1, detail="seed 4", name="resnet-9")], SPEC) is None
    assert random_init_seed([record(1, detail="seed 4", num_ftrs=64)], SPEC) is None
    assert random_init_seed([record(1, detail="weird")], SPEC) is None
    # the precision does not change the weights
    assert random_init_seed([record(1, detail="seed 4", precision="bf16")], SPEC) == 4


def test_init_seed_option() -> None:
    assert load_config([]).model.init_seed is None
    assert load_config(["model.init_seed=7"]).model.init_seed == 7
    assert load_config(["model.init_seed=null"]).model.init_seed is None
    cfg = load_config(["seed=2"])
    assert cfg.seed == 2 and cfg.model.init_seed is None  # the sampling seed does not reach the model
    assert load_config(["lightly.model.num_ftrs=64"]).lightly["model"]["num_ftrs"] == 64  # lightly.model stays
    for bad in ("model.init_seed=-1", "model.init_seed=abc", "model.init_seed=1.5", "model.init_seed=true", "model.seed=3"):
        with pytest.raises(ConfigError) as err:
            load_config([bad])
        assert str(err.value).startswith("model.") and "allowed" in str(err.value)
