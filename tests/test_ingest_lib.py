"""The ingest pipeline as a library: a real store file, real images, a real (small) model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poolwatch.pipeline.decode import DecodeSettings, read_and_decode
from poolwatch.pipeline.embed import Embedder, ModelSpec, load_model
from poolwatch.pipeline.ingest import Made, activate_model, embed_resilient, ingest_pass, made_elsewhere
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


def made_by_workers(engine: Embedder, settings: DecodeSettings, shard: int):
    """What workers elsewhere (Ray actors) hand back: each shard decoded and embedded there, pixels dropped."""
    def source(todo, batch_size: int):
        def made():
            for i in range(0, len(todo), shard):
                decoded = [read_and_decode(r, settings) for r in todo[i:i + shard]]
                pixels = {k: d.pixels for k, d in enumerate(decoded) if d.pixels is not None}
                before = engine.forward_passes
                vectors, failed = embed_resilient(engine, pixels)
                for k, d in enumerate(decoded):
                    passes = engine.forward_passes - before if k == 0 else 0
                    yield Made(replace(d, pixels=None), vectors.get(k), failed.get(k), 0.001, passes)
        return made_elsewhere(made(), batch_size, workers=2)
    return source


def test_a_pass_fed_by_workers_elsewhere_stores_what_a_local_pass_does(model, tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(11):
        (root / f"{i:02d}.png").write_bytes(encode(photo(i), "PNG"))
    (root / "copy.png").write_bytes((root / "03.png").read_bytes())  # same bytes, in another shard and batch
    (root / "poisoned.png").write_bytes(encode(Image.new("RGB", (40, 30), (7, 7, 7)), "PNG"))  # the model fails
    (root / "broken.png").write_bytes(b"not an image")
    settings = DecodeSettings(input_size=32)
    stored = []
    for name, elsewhere in (("local", False), ("elsewhere", True)):
        with Store.open(tmp_path / f"{name}.sqlite") as store:
            embedder = FlakyEmbedder(model, max_batch=64, poison=7)
            model_id = activate_model(store, embedder)
            worker = FlakyEmbedder(model, max_batch=64, poison=7)  # the same model, in another process
            source = made_by_workers(worker, settings, shard=3) if elsewhere else None
            summary = ingest_pass(store, embedder, model_id, [root], settings, batch_size=4, source=source)
            assert summary.processed == 14 and summary.ok == 11 and summary.duplicate == 1 and summary.corrupt == 1
            rows = {r["relpath"]: (r["status"], r["reason"], r["duplicate_of"], r["attempts"]) for r in store.images()}
            ids, vectors = store.vectors(model_id)
            stored.append((rows, dict(zip(ids, vectors.tolist(), strict=True))))
            if elsewhere:
                assert summary.forward_passes == worker.forward_passes > 0 and embedder.forward_passes == 0
    (local, local_vectors), (made, made_vectors) = stored
    assert made == local  # the same rows and links
    assert made_vectors.keys() == local_vectors.keys()  # other batches: equal to float rounding (bitwise here)
    assert np.allclose([made_vectors[i] for i in local_vectors], list(local_vectors.values()), rtol=1e-5, atol=1e-6)
    # the only image its batch embedded: a failure that is not counted against it (the model may fail on everything)
    assert made["poisoned.png"] == ("pending", "embed_error", None, 0)
