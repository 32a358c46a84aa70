"""The ingest pipeline as a library: a real store file, real images, a real (small) model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from poolwatch.pipeline.decode import DecodeSettings
from poolwatch.pipeline.embed import Embedder, ModelSpec, load_model
from poolwatch.pipeline.ingest import activate_model, embed_resilient, ingest_pass
from poolwatch.pipeline.store import Store

from .conftest import encode, photo

SPEC = ModelSpec(name="resnet-9", width=0.125, num_ftrs=16, input_size=32)


class FlakyEmbedder(Embedder):
    """A real embedder whose model fails on batches larger than `max_batch` and on one poisoned image
    (the faults a GPU out-of-memory or a bad input cause)."""

    def __init__(self, *args, max_batch: int = 4, poison: int | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.max_batch, self.poison = max_batch, poison

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) > self.max_batch:
            raise RuntimeError("out of memory (injected)")
        if self.poison is not None and any(int(p[0, 0, 0]) == self.poison for p in pixels):
            raise RuntimeError("bad input (injected)")
        return super().embed(pixels)


@pytest.fixture
def model(tmp_path: Path):
    return load_model(SPEC, models_dir=tmp_path / "models", pretrained=False)


def test_embed_resilient_splits_down_to_single_images(model) -> None:
    pixels = {i: np.full((32, 32, 3), i, np.uint8) for i in range(10)}
    embedder = FlakyEmbedder(model, max_batch=3, poison=7)
    vectors, failed = embed_resilient(embedder, pixels)
    assert set(failed) == {7} and "bad input" in failed[7]
    assert set(vectors) == set(range(10)) - {7}
    plain = Embedder(model)
    for k, v in vectors.items():
        assert np.allclose(v, plain.embed(pixels[k][None])[0], atol=1e-5)


def test_a_failing_model_leaves_images_pending_and_the_next_pass_retries(model, tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(12):
        (root / f"{i:02d}.png").write_bytes(encode(photo(i), "PNG"))
    with Store.open(tmp_path / "db.sqlite") as store:
        flaky = FlakyEmbedder(model, max_batch=2)
        model_id = activate_model(store, flaky)
        settings = DecodeSettings(input_size=32)
        summary = ingest_pass(store, flaky, model_id, [root], settings, batch_size=8)
        assert summary.ok == 12 and store.counts_by_status()["ok"] == 12  # split batches, nothing lost

        (root / "later.png").write_bytes(encode(photo(99), "PNG"))
        broken = FlakyEmbedder(model, max_batch=0)
        summary = ingest_pass(store, broken, model_id, [root], settings, batch_size=8)
        row = store.image_by_path(str(root), "later.png")
        assert row["status"] == "pending" and row["reason"] == "embed_error"
        healthy = Embedder(model)
        summary = ingest_pass(store, healthy, model_id, [root], settings, batch_size=8)
        assert summary.processed == 1 and store.image_by_path(str(root), "later.png")["status"] == "ok"
        assert store.count_embeddings(model_id) == 13
        assert store.integrity_check() == "ok"


def test_duplicates_by_content_and_by_embedding(model, tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.png").write_bytes(encode(photo(1), "PNG"))
    (root / "b.png").write_bytes(encode(photo(1), "PNG"))  # same bytes
    img = photo(2)
    (root / "c.png").write_bytes(encode(img, "PNG"))
    (root / "d.bmp").write_bytes(encode(img, "BMP"))  # same pixels, other bytes: same embedding
    with Store.open(tmp_path / "db.sqlite") as store:
        embedder = Embedder(model)
        model_id = activate_model(store, embedder)
        ingest_pass(store, embedder, model_id, [root], DecodeSettings(input_size=32), batch_size=8)
        rows = {r["relpath"]: r for r in store.images()}
        assert rows["a.png"]["status"] == "ok" and rows["c.png"]["status"] == "ok"
        assert rows["b.png"]["status"] == "duplicate" and rows["b.png"]["duplicate_of"] == rows["a.png"]["id"]
        assert rows["b.png"]["reason"] == "same_content"
        assert rows["d.bmp"]["status"] == "duplicate" and rows["d.bmp"]["duplicate_of"] == rows["c.png"]["id"]
        assert rows["d.bmp"]["reason"] == "same_embedding"
        assert store.count_embeddings(model_id) == 2


def test_bf16_vectors_are_a_model_of_their_own(model, tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.png").write_bytes(encode(photo(i), "PNG"))
    with Store.open(tmp_path / "db.sqlite") as store:
        fp32, bf16 = Embedder(model), Embedder(model, precision="bf16")
        id32 = activate_model(store, fp32)
        ingest_pass(store, fp32, id32, [root], DecodeSettings(input_size=32), batch_size=8)
        id16 = activate_model(store, bf16)
        assert id16 != id32 and store.current_model().arch["precision"] == "bf16"
        summary = ingest_pass(store, bf16, id16, [root], DecodeSettings(input_size=32), batch_size=8)
        assert summary.processed == 4  # re-embedded: never mixed with the fp32 vectors
        _, a = store.vectors(id32)
        _, b = store.vectors(id16)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert (cos > 0.99).all() and not np.array_equal(a, b)
