"""Near-duplicates on arrival, in-process: real photos, the real default engine, a real store, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tqdm

from poolwatch.daemon.cli import ingest_once, main
from poolwatch.pipeline.config import load_config
from poolwatch.pipeline.near_duplicates import NearDuplicates, index_folder, recorded_calibration
from poolwatch.pipeline.sampling import candidate_filter
from poolwatch.pipeline.store import Store
from poolwatch.pipeline.vector_index import VectorIndex

from .conftest import FAST
from .photos import DISTINCT, near_copy, photo_jpeg

BASE = DISTINCT[:10]


@pytest.fixture(autouse=True)
def no_tqdm_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    """ingest_once in-process: tqdm's monitor thread would outlive the test."""
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)


def config_for(tmp_path: Path, *extra: str):
    return load_config([f"input_dir={tmp_path / 'in'}", f"shared_dir={tmp_path / 'shared'}", *FAST, *extra])


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    inp = tmp_path / "in"
    inp.mkdir()
    for name in BASE:
        (inp / f"{name}.jpg").write_bytes(photo_jpeg(name))
    return inp


def ids_by_name(store: Store, root: Path) -> dict[str, int]:
    return store.ids_by_path(str(root.resolve()))


def test_a_near_copy_is_linked_to_its_original_and_left_out_of_candidates(tmp_path: Path, photos: Path, capsys) -> None:
    config = config_for(tmp_path)
    summary = ingest_once(config)
    assert summary.ok == len(BASE) and summary.near_duplicate == 0
    with Store.open(config.store_path) as store:
        model = store.current_model()
        assert model is not None
        calibration = recorded_calibration(store, model.id, normalized=True)
        assert calibration is not None and calibration.threshold > 0, "auto calibrated on the first pass"
        assert store.near_duplicate_groups() == [], "distinct photos are not linked"

    original = (photos / "chelsea.jpg").read_bytes()
    (photos / "chelsea_small.jpg").write_bytes(near_copy(original))
    (photos / "chelsea_small_again.jpg").write_bytes(near_copy(near_copy(original), scale=0.8, quality=60))
    summary = ingest_once(config)
    assert summary.near_duplicate == 2
    with Store.open(config.store_path) as store:
        ids = ids_by_name(store, photos)
        rows = {name: store.image(i) for name, i in ids.items()}
        for copy in ("chelsea_small.jpg", "chelsea_small_again.jpg"):
            row = rows[copy]
            assert row is not None and row["status"] == "ok"
            assert row["near_duplicate_of"] == ids["chelsea.jpg"], "linked to the group's earliest image"
            assert 0 < row["near_distance"] <= calibration.threshold
        assert all(r["near_duplicate_of"] is None for n, r in rows.items() if not n.startswith("chelsea_small"))
        model_id = store.current_model().id  # type: ignore[union-attr]
        candidates = set(store.candidate_ids(model_id, None, False, candidate_filter(config)))
        assert ids["chelsea.jpg"] in candidates
        assert ids["chelsea_small.jpg"] not in candidates and ids["chelsea_small_again.jpg"] not in candidates
        keep = config_for(tmp_path, "near_duplicate.exclude_from_candidates=false")
        assert ids["chelsea_small.jpg"] in set(store.candidate_ids(model_id, None, False, candidate_filter(keep)))

    capsys.readouterr()
    assert main(["near-duplicates", "--json", f"input_dir={photos}", f"shared_dir={tmp_path / 'shared'}", *FAST]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert [g["original"] for g in groups] == ["chelsea.jpg"]
    assert sorted(d["path"] for d in groups[0]["duplicates"]) == ["chelsea_small.jpg", "chelsea_small_again.jpg"]
    assert all(0 < d["distance"] <= calibration.threshold for d in groups[0]["duplicates"])

    assert main(["status", "--json", f"input_dir={photos}", f"shared_dir={tmp_path / 'shared'}", *FAST]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["near_duplicates"]["images"] == 2 and status["near_duplicates"]["groups"] == 1
    assert status["near_duplicates"]["threshold"] == pytest.approx(calibration.threshold)
    assert set(status["quality"]) == {"blurry", "dark", "bright", "low_information", "odd_aspect"}


def test_a_given_threshold_overrides_auto_and_minus_one_turns_the_check_off(tmp_path: Path, photos: Path) -> None:
    (photos / "coffee_copy.jpg").write_bytes(near_copy((photos / "coffee.jpg").read_bytes()))
    off = config_for(tmp_path, "near_duplicate.threshold=-1")
    assert ingest_once(off).near_duplicate == 0
    assert not (tmp_path / "shared" / "index").exists(), "no index is kept with the check off"
    huge = config_for(tmp_path, "near_duplicate.threshold=1000")  # every image is a copy of the first one seen
    (photos / "rocket_copy.jpg").write_bytes(near_copy((photos / "rocket.jpg").read_bytes()))
    assert ingest_once(huge).near_duplicate == 1  # only the new file is looked up


def test_the_index_is_a_cache_repaired_or_rebuilt_from_the_store(tmp_path: Path, photos: Path) -> None:
    config = config_for(tmp_path)
    ingest_once(config)
    shared = config.shared_path
    with Store.open(config.store_path) as store:
        model_id = store.current_model().id  # type: ignore[union-attr]
        want_ids, want_tags = store.embedding_tags(model_id)
        folder = index_folder(shared, model_id)
        assert folder.is_dir()

        def holds_the_store(near: NearDuplicates) -> bool:
            ids, tags = near.index.keys_and_tags()
            want = dict(zip(want_ids.tolist(), want_tags.tolist(), strict=True))
            return dict(zip(ids.tolist(), tags.tolist(), strict=True)) == want

        near = NearDuplicates.open(store, model_id, shared, normalize=True)
        assert not near.rebuilt and near.repaired == 0 and holds_the_store(near)

        # A crash after a commit and before the index was saved: the store has a vector the index lacks.
        loaded = VectorIndex.load(folder, near.dim)
        assert loaded is not None
        index, meta = loaded
        index.remove(want_ids[:3])
        index.save(folder, meta)
        near = NearDuplicates.open(store, model_id, shared, normalize=True)
        assert near.repaired == 3 and holds_the_store(near)

        # Lost or garbled: rebuilt.
        for path in folder.iterdir():
            path.write_bytes(b"\0garbage")
        near = NearDuplicates.open(store, model_id, shared, normalize=True)
        assert near.rebuilt and holds_the_store(near)

        # Its lookups agree with brute force over the store's (normalised) vectors.
        ids, vectors = store.vectors(model_id)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        keys, dists = near.index.search(unit, 2)
        brute = np.linalg.norm(unit[:, None, :] - unit[None, :, :], axis=2)
        np.fill_diagonal(brute, np.inf)
        assert (keys[:, 1] == ids[brute.argmin(axis=1)]).all()
        assert np.allclose(dists[:, 1], brute.min(axis=1), atol=1e-5)

    # A model switch: the new model gets its index, the old one's is removed.
    other = config_for(tmp_path, "check.exact_decode=false")  # another model identity, the same exported network
    ingest_once(other)
    with Store.open(config.store_path) as store:
        new_id = store.current_model().id  # type: ignore[union-attr]
    assert new_id != model_id
    assert index_folder(shared, new_id).is_dir() and not folder.exists()
