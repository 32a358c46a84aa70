"""pipeline.vector_index: exact and ANN lookups against numpy brute force, add/replace/remove, the switch between
modes, and the saved folder (roundtrip, and None for anything that is not a complete save of this format)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from poolwatch.pipeline import vector_index as vi
from poolwatch.pipeline.vector_index import FORMAT, VectorIndex


def data(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def brute(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((q.astype(np.float64)[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


def filled(n: int, d: int = 32, exact_below: int = vi.EXACT_BELOW, seed: int = 0) -> tuple[VectorIndex, np.ndarray]:
    x = data(n, d, seed)
    index = VectorIndex(d, exact_below=exact_below)
    index.add(np.arange(n) * 10, x, np.arange(n) + 1000)
    return index, x


def test_wide_vectors_stay_exact_longer() -> None:
    assert VectorIndex(32).exact_below == vi.EXACT_BELOW == vi.exact_below_for(vi.WIDE)
    assert VectorIndex(384).exact_below == vi.EXACT_BELOW_WIDE > vi.EXACT_BELOW
    assert VectorIndex(384, exact_below=10).exact_below == 10


def test_exact_matches_brute_force() -> None:
    index, x = filled(3000)
    q = np.concatenate([data(50, seed=1), x[:50] + 0.01])
    keys, dist = index.search(q, k=5)
    want, want_d = brute(x, q, 5)
    assert index.exact
    assert keys.dtype == np.int64 and dist.dtype == np.float32 and keys.shape == dist.shape == (100, 5)
    np.testing.assert_array_equal(keys, want * 10)
    np.testing.assert_allclose(dist, want_d, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_exact_near_duplicates_get_exact_distances() -> None:
    """The ||q||² - 2q·x + ||x||² trick alone loses a tiny distance next to large norms: the answer is recomputed."""
    x = data(2000) * 30
    index = VectorIndex(32)
    index.add(np.arange(2000), x, np.zeros(2000, np.int64))
    q = x[:20] + 1e-3
    keys, dist = index.search(q)
    np.testing.assert_array_equal(keys[:, 0], np.arange(20))
    np.testing.assert_allclose(dist[:, 0], np.sqrt(32) * 1e-3, rtol=1e-2)


def test_ann_recall_against_brute_force() -> None:
    n = 20_000
    index, x = filled(n, exact_below=1000)
    assert not index.exact and len(index) == n
    rng = np.random.default_rng(2)
    fresh = data(300, seed=3)
    near = x[rng.integers(0, n, 300)] + 0.05 * data(300, seed=4)
    for q in (fresh, near):
        keys, dist = index.search(q)
        want, want_d = brute(x, q, 1)
        assert (keys[:, 0] == want[:, 0] * 10).mean() >= 0.99
        # the distances are those of the keys found, exactly
        found = x[keys[:, 0] // 10]
        np.testing.assert_allclose(dist[:, 0], np.linalg.norm(found - q, axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exact_below", [10**9, 100])
def test_add_replace_remove(exact_below: int) -> None:
    index, x = filled(500, exact_below=exact_below)
    assert index.exact == (exact_below > 500)
    # replacing key 0 (and giving key 7 twice: the last row wins)
    new = data(3, seed=9) + 100
    index.add(np.array([0, 70, 70]), new, np.array([1, 2, 3]))
    assert len(index) == 500
    keys, dist = index.search(new, k=2)
    assert keys[:, 0].tolist() == [0, 70, 70]
    assert dist[0, 0] == 0 and dist[2, 0] == 0 and dist[1, 0] > 0
    k, t = index.keys_and_tags()
    tags = dict(zip(k.tolist(), t.tolist(), strict=True))
    assert tags[0] == 1 and tags[70] == 3 and tags[10] == 1001 and len(tags) == 500
    # removal; unknown keys ignored
    index.remove(np.array([0, 70, 123456, 0]))
    assert len(index) == 498
    keys, _ = index.search(new, k=1)
    assert not {0, 70} & set(keys[:, 0].tolist())
    rest = np.setdiff1d(np.arange(1, 400), [7])
    keys, _ = index.search(x[rest], k=1)
    np.testing.assert_array_equal(keys[:, 0], rest * 10)
    assert sorted(index.keys_and_tags()[0].tolist()) == sorted(set(range(0, 5000, 10)) - {0, 70})


def test_missing_slots_and_empty() -> None:
    index = VectorIndex(8)
    keys, dist = index.search(data(2, 8), k=3)
    assert keys.tolist() == [[-1] * 3] * 2 and np.isinf(dist).all()
    x = data(2, 8)
    index.add(np.array([5, 6]), x, np.array([0, 0]))
    keys, dist = index.search(x[:1], k=4)
    assert keys[0].tolist()[:2] == [5, 6] and keys[0].tolist()[2:] == [-1, -1]
    assert np.isfinite(dist[0, :2]).all() and np.isinf(dist[0, 2:]).all()
    with pytest.raises(ValueError):
        index.add(np.array([-1]), x[:1], np.array([0]))
    with pytest.raises(ValueError):
        index.add(np.array([1, 2]), data(2, 9), np.array([0, 0]))
    with pytest.raises(ValueError):
        index.search(data(1, 9))


def test_switches_to_ann_and_back() -> None:
    index = VectorIndex(16, exact_below=400)
    x = data(1000, 16)
    for start in range(0, 1000, 100):
        index.add(np.arange(start, start + 100), x[start:start + 100], np.zeros(100, np.int64))
        assert index.exact == (start + 100 < 400)
    keys, _ = index.search(x[:5] + 1e-3)
    assert keys[:, 0].tolist() == [0, 1, 2, 3, 4]
    index.remove(np.arange(700))  # 300 left: still ANN (the graph stays down to exact_below // 2)
    assert not index.exact and len(index) == 300
    index.remove(np.arange(700, 850))
    assert index.exact and len(index) == 150
    keys, _ = index.search(x[850:860])
    assert keys[:, 0].tolist() == list(range(850, 860))
    index.add(np.arange(2000, 2300), data(300, 16, seed=5), np.zeros(300, np.int64))
    assert not index.exact and len(index) == 450
    keys, _ = index.search(x[900:910])
    assert keys[:, 0].tolist() == list(range(900, 910))


@pytest.mark.parametrize("exact_below", [10**9, 500])
def test_save_load_roundtrip(tmp_path: Path, exact_below: int) -> None:
    index, x = filled(2000, exact_below=exact_below)
    index.remove(np.array([30, 40]))
    folder = tmp_path / "index" / "model-a"
    index.save(folder, {"model": "a", "store_version": 7})
    index.save(folder, {"model": "a", "store_version": 8})  # over an existing save
    loaded = VectorIndex.load(folder, 32, exact_below=exact_below)
    assert loaded is not None
    again, meta = loaded
    assert meta == {"model": "a", "store_version": 8}
    assert len(again) == 1998 and again.exact == index.exact
    for a, b in zip(again.keys_and_tags(), index.keys_and_tags(), strict=True):
        np.testing.assert_array_equal(np.sort(a), np.sort(b))
    q = x[:100] + 0.01
    np.testing.assert_array_equal(again.search(q, 3)[0], index.search(q, 3)[0])
    again.add(np.array([30]), x[3:4] + 0.5, np.array([1]))  # still usable after load
    assert len(again) == 1999
    assert [p.name for p in folder.parent.iterdir()] == ["model-a"]  # no temp folders left


def test_load_refuses_anything_else(tmp_path: Path) -> None:
    index, _ = filled(1500, exact_below=1000)
    folder = tmp_path / "m"
    assert VectorIndex.load(folder, 32) is None  # missing
    index.save(folder, {})
    assert VectorIndex.load(folder, 32, exact_below=1000) is not None
    assert VectorIndex.load(folder, 16) is None  # another dim

    def broken(edit) -> bool:  # type: ignore[no-untyped-def]
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        index.save(copy, {})
        edit(copy)
        return VectorIndex.load(copy, 32, exact_below=1000) is None

    def truncate(name: str):  # type: ignore[no-untyped-def]
        return lambda f: (f / name).write_bytes((f / name).read_bytes()[:100])

    def other_format(f: Path) -> None:
        info = json.loads((f / "meta.json").read_text())
        info["format"] = FORMAT + 1
        (f / "meta.json").write_text(json.dumps(info))

    assert broken(truncate("vectors.npy"))
    assert broken(truncate("graph.usearch"))
    assert broken(truncate("meta.json"))
    assert broken(lambda f: (f / "keys.npy").write_bytes(b"\x93NUMPY garbage" * 50))
    assert broken(lambda f: (f / "tags.npy").unlink())
    assert broken(other_format)


def test_interrupted_save_leaves_the_old_one(tmp_path: Path) -> None:
    index, x = filled(800)
    folder = tmp_path / "m"
    index.save(folder, {"v": 1})
    stray = tmp_path / ".m.tmp-deadbeef"  # a save killed half-way
    stray.mkdir()
    (stray / "vectors.npy").write_bytes(b"half")
    (tmp_path / ".m.old-cafe0000").write_bytes(b"")  # killed between its two renames: the old one, moved aside
    loaded = VectorIndex.load(folder, 32)
    assert loaded is not None and loaded[1] == {"v": 1} and len(loaded[0]) == 800
    index.save(folder, {"v": 2})  # the next save clears it away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded = VectorIndex.load(folder, 32)
    assert loaded is not None and loaded[1] == {"v": 2}
