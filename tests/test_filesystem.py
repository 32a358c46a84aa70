"""Filesystem reality: awkward names, undecodable bytes, symlinks (files followed, dirs not), loops,
files vanishing between discovery and reading, nothing written under the input dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lightly.utils.io import load_embeddings

from poolwatch.pipeline.config import load_config
from poolwatch.pipeline.decode import DecodeSettings
from poolwatch.pipeline.discover import discover
from poolwatch.pipeline.embed import Embedder, ModelSpec, load_model
from poolwatch.pipeline.ingest import activate_model, ingest_pass
from poolwatch.pipeline.sampling import sample_run
from poolwatch.pipeline.store import Store

from .conftest import encode, photo, snapshot

SPEC = ModelSpec(name="resnet-9", width=0.125, num_ftrs=16, input_size=32)
NAMES = ["with space.jpg", 'comma,quote".jpg', "new\nline.jpg", "ünï €.jpg", "UPPER.JPG", "a.b.c.png"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(NAMES):
        (root / name).write_bytes(encode(photo(i), "PNG" if name.endswith("png") else "JPEG"))
    with open(os.fsencode(root) + b"/raw\xff\xfe.jpg", "wb") as fh:  # not valid UTF-8
        fh.write(encode(photo(20), "JPEG"))
    (root / "sub" / "deep.jpg").write_bytes(encode(photo(21), "JPEG"))
    os.symlink(root / "sub" / "deep.jpg", root / "link_to_file.jpg")
    os.symlink(root / "sub", root / "link_to_dir")
    os.symlink(root, root / "sub" / "loop")
    os.symlink(root / "nowhere.jpg", root / "dangling.jpg")
    (root / ".hidden.jpg").write_bytes(encode(photo(22), "JPEG"))
    (root / "upload.jpg.part").write_bytes(b"partial")
    return root


def test_discovery_rules(tree: Path) -> None:
    found = {r.relpath for r in discover(tree, [".*", "*.part"])}
    assert found == {*NAMES, os.fsdecode(b"raw\xff\xfe.jpg"), "sub/deep.jpg", "link_to_file.jpg"}


def test_awkward_names_ingest_and_round_trip_through_outputs(tree: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    before = snapshot(tree)
    model = load_model(SPEC, models_dir=shared / "models", pretrained=False)
    cfg = load_config([f"input_dir={tree}", f"shared_dir={shared}", "stopping_condition.n_samples=1.0",
                       "watch.ignore_patterns=['.*','*.part']"])
    with Store.open(cfg.store_path) as store:
        embedder = Embedder(model)
        model_id = activate_model(store, embedder)
        summary = ingest_pass(store, embedder, model_id, [tree], DecodeSettings(input_size=32), 4,
                              ignore_patterns=cfg.watch.ignore_patterns)
        assert summary.processed == 9
        statuses = {r["relpath"]: r["status"] for r in store.images()}
        assert statuses[os.fsdecode(b"raw\xff\xfe.jpg")] == "ok"
        # a symlinked file is followed: same bytes as its target, so the later name is the duplicate
        assert sorted([statuses["link_to_file.jpg"], statuses["sub/deep.jpg"]]) == ["duplicate", "ok"]
        result = sample_run(store, cfg, trigger="cli")
        # identity survives a second pass: nothing is re-read
        again = ingest_pass(store, embedder, model_id, [tree], DecodeSettings(input_size=32), 4,
                            ignore_patterns=cfg.watch.ignore_patterns)
        assert again.processed == 0
    _, _, names = load_embeddings(str(result.output_dir / "data" / "embeddings.csv"))
    assert set(NAMES) <= set(names)
    assert "raw\\xff\\xfe.jpg" in names  # undecodable bytes are shown escaped in text outputs
    assert snapshot(tree) == before


def test_file_vanishing_before_it_is_read(tree: Path, tmp_path: Path) -> None:
    from poolwatch.pipeline.decode import FileRef, read_and_decode

    ref = FileRef(str(tree), "with space.jpg", 1, 1)
    (tree / "with space.jpg").unlink()
    decoded = read_and_decode(ref, DecodeSettings(input_size=32))
    assert decoded.verdict is None  # vanished: the caller marks it missing, nothing crashes


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_gets_a_verdict(tree: Path) -> None:
    from poolwatch.pipeline.decode import FileRef, read_and_decode

    target = tree / "with space.jpg"
    target.chmod(0)
    decoded = read_and_decode(FileRef(str(tree), target.name, 1, 1), DecodeSettings(input_size=32))
    assert decoded.verdict is not None and decoded.verdict.reason == "unreadable"
