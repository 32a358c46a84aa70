from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import poolwatch.pipeline.coreset as coreset
from poolwatch.pipeline.coreset import SamplingError, Selection, kcenter, random_sample, resolve_n_samples

# --- reference and data ---------------------------------------------------------------------------------


def reference(cand: np.ndarray, pool: np.ndarray | None, n_samples: int | None, min_distance: float | None,
              seed: int = 0) -> tuple[list[int], list[float], str]:
    """Brute-force greedy k-center on the full float64 distance matrix (small inputs only)."""
    x = cand.astype(np.float64)
    n = len(x)
    if n == 0:
        return [], [], "empty"
    full = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    has_pool = pool is not None and len(pool) > 0
    if has_pool:
        p = pool.astype(np.float64)
        mind = np.sqrt(((x[:, None, :] - p[None, :, :]) ** 2).sum(-1)).min(1)
    else:
        mind = np.full(n, np.inf)
    available = np.ones(n, bool)
    picks: list[int] = []
    dists: list[float] = []
    while True:
        if n_samples is not None and len(picks) >= n_samples:
            return picks, dists, "n_samples"
        if not available.any():
            return picks, dists, "exhausted"
        if not picks and not has_pool:
            j, dist = int(np.random.default_rng(seed).integers(n)), math.inf
        else:
            values = np.where(available, mind, -np.inf)
            j = int(np.argmax(values))  # first maximum = lowest index among ties
            dist = float(values[j])
            if min_distance is not None and (dist < min_distance or dist == 0.0):
                return picks, dists, "min_distance"
        picks.append(j)
        dists.append(dist)
        available[j] = False
        mind = np.minimum(mind, full[j])


def make_data(kind: str, dim: int, seed: int, with_pool: bool) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(1000 + seed)
    if kind == "gauss":
        cand = rng.standard_normal((200, dim))
        pool = rng.standard_normal((25, dim))
    elif kind == "clusters":
        centres = rng.normal(0, 10, (6, dim))
        cand = centres[rng.integers(6, size=200)] + rng.normal(0, 0.05, (200, dim))
        pool = centres[rng.integers(6, size=25)] + rng.normal(0, 0.05, (25, dim))
    elif kind == "duplicates":
        base = rng.standard_normal((120, dim))
        pool = rng.standard_normal((25, dim))
        cand = np.concatenate([base, base[rng.integers(120, size=60)], pool[rng.integers(25, size=20)]])
        cand = cand[rng.permutation(len(cand))]
    elif kind == "offset_near":
        # Far from the origin, with exact duplicates and 1-ulp neighbours: the cancellation-prone case.
        base = (1000.0 + rng.standard_normal((120, dim))).astype(np.float32)
        near = base[rng.integers(120, size=40)].copy()
        near[:, 0] = np.nextafter(near[:, 0], np.float32(np.inf))
        pool = (1000.0 + rng.standard_normal((25, dim))).astype(np.float32)
        cand = np.concatenate([base, near, base[rng.integers(120, size=30)], pool[:10]])
        cand = cand[rng.permutation(len(cand))]
    else:
        raise AssertionError(kind)
    return cand.astype(np.float32), (pool.astype(np.float32) if with_pool else None)


def threshold_at(cand: np.ndarray, pool: np.ndarray | None, position: int) -> float:
    """A min_distance that falls strictly between two consecutive pick distances near `position`."""
    _, dists, _ = reference(cand, pool, len(cand), None)
    for m in range(position, len(dists) - 1):
        hi, lo = dists[m], dists[m + 1]
        if math.isfinite(hi) and lo > 0 and hi > lo * (1 + 1e-6):
            return math.sqrt(hi * lo)
    raise AssertionError("no usable gap in the pick distances")


def assert_same(sel: Selection, expected: tuple[list[int], list[float], str]) -> None:
    picks, dists, reason = expected
    assert sel.stop_reason == reason
    assert sel.indices.tolist() == picks
    np.testing.assert_allclose(sel.distances, np.asarray(dists, np.float32), rtol=1e-6, atol=0)


# --- agreement with the brute-force reference -----------------------------------------------------------

MODES = ["n", "md", "md0", "both_n_first", "both_md_first"]


@pytest.mark.parametrize("algorithm", ["plain", "pruned"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_pool", [False, True], ids=["nopool", "pool"])
@pytest.mark.parametrize("dim", [2, 32])
@pytest.mark.parametrize("kind", ["gauss", "clusters", "duplicates", "offset_near"])
def test_matches_brute_force(kind: str, dim: int, with_pool: bool, mode: str, seed: int, algorithm: str) -> None:
    cand, pool = make_data(kind, dim, seed, with_pool)
    n = len(cand)
    n_samples: int | None
    min_distance: float | None
    if mode == "n":
        n_samples, min_distance = n // 3, None
    elif mode == "md":
        n_samples, min_distance = None, threshold_at(cand, pool, n // 5)
    elif mode == "md0":
        n_samples, min_distance = None, 0.0
    elif mode == "both_n_first":
        n_samples, min_distance = 7, threshold_at(cand, pool, n // 2)
    else:
        n_samples, min_distance = n // 2, threshold_at(cand, pool, n // 5)
    expected = reference(cand, pool, n_samples, min_distance, seed)
    sel = kcenter(cand, pool, n_samples=n_samples, min_distance=min_distance, seed=seed, device="cpu",
                  algorithm=algorithm)
    assert_same(sel, expected)
    assert sel.indices.dtype == np.int64 and sel.distances.dtype == np.float32
    if mode == "both_n_first":
        assert sel.stop_reason == "n_samples"
    if mode in ("md", "both_md_first"):
        assert sel.stop_reason == "min_distance"


def test_hand_checked_line_and_pick_at_exactly_min_distance() -> None:
    cand = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]], np.float32)
    pool = np.array([[0.0]], np.float32)
    # 5 is farthest (5); then 2 and 3 tie at 2 -> lower index; then everything is at exactly 1.
    sel = kcenter(cand, pool, min_distance=1.0, device="cpu")
    assert sel.indices.tolist() == [4, 1, 0, 2, 3]
    assert sel.distances.tolist() == [5.0, 2.0, 1.0, 1.0, 1.0]
    assert sel.stop_reason == "exhausted"
    sel = kcenter(cand, pool, min_distance=float(np.nextafter(1.0, 2.0)), device="cpu")
    assert sel.indices.tolist() == [4, 1] and sel.stop_reason == "min_distance"
    sel = kcenter(cand, pool, n_samples=3, min_distance=1.0, device="cpu")
    assert sel.indices.tolist() == [4, 1, 0] and sel.stop_reason == "n_samples"


@pytest.mark.parametrize("seed", [1, 4, 16])
def test_rounding_level_ties_go_to_the_lowest_index(seed: int) -> None:
    # Cyclic shifts of one vector are all exactly ||v|| from the origin, but their computed distances differ
    # in the last bits (a plain argmax picks e.g. index 11 for seed 1): the tie must still go to index 0.
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(32) * 10.0 ** rng.uniform(-3, 3, 32)
    cand = np.stack([np.roll(v, k) for k in range(32)])
    sel = kcenter(cand, np.zeros((1, 32)), n_samples=1, device="cpu")
    assert sel.indices.tolist() == [0]
    assert sel.distances[0] == pytest.approx(np.linalg.norm(v), rel=1e-6)


def test_duplicates_of_centres() -> None:
    rng = np.random.default_rng(3)
    pool = rng.standard_normal((4, 5)).astype(np.float32)
    cand = pool[[2, 0, 2, 1, 3, 3]]
    # Only duplicates of the pool: nothing qualifies under min_distance, even 0 ...
    sel = kcenter(cand, pool, min_distance=0.0, device="cpu")
    assert sel.indices.size == 0 and sel.stop_reason == "min_distance"
    # ... with n_samples alone they are all at distance 0 and follow in index order.
    sel = kcenter(cand, pool, n_samples=4, device="cpu")
    assert sel.indices.tolist() == [0, 1, 2, 3] and sel.distances.tolist() == [0.0] * 4
    assert sel.stop_reason == "n_samples"
    # Candidate duplicates of each other: the lowest index of each group is kept under min_distance=0
    # (with a pool, so that the first pick is not the seeded random one).
    uniq = rng.standard_normal((5, 5)).astype(np.float32)
    cand = uniq[[3, 1, 3, 0, 4, 4, 2, 1, 0]]
    sel = kcenter(cand, np.full((1, 5), 9.0, np.float32), min_distance=0.0, device="cpu")
    assert sorted(sel.indices.tolist()) == [0, 1, 3, 4, 6] and sel.stop_reason == "min_distance"


def test_near_duplicate_is_kept_exact_duplicate_is_not() -> None:
    pool = np.full((1, 16), 500.0, np.float32)
    near = pool.copy()
    near[0, 3] = np.nextafter(near[0, 3], np.float32(0))  # about 3e-5 away, at |x| ~ 2000
    cand = np.concatenate([pool, near, pool])
    sel = kcenter(cand, pool, min_distance=1e-6, device="cpu")
    assert sel.indices.tolist() == [1] and sel.stop_reason == "min_distance"
    assert sel.distances[0] == pytest.approx(500.0 - float(near[0, 3]), rel=1e-6)


# --- invariants -----------------------------------------------------------------------------------------


def pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0))


@pytest.mark.parametrize("n_samples", [None, 40, 5000])
@pytest.mark.parametrize("with_pool", [False, True], ids=["nopool", "pool"])
def test_separation_and_coverage(with_pool: bool, n_samples: int | None) -> None:
    rng = np.random.default_rng(7)
    cand = rng.uniform(-1, 1, (2000, 6)).astype(np.float32)
    cand[1500:] = cand[rng.integers(1500, size=500)]  # plenty of exact duplicates
    pool = rng.uniform(-1, 1, (60, 6)).astype(np.float32) if with_pool else np.empty((0, 6), np.float32)
    md = 0.45
    sel = kcenter(cand, pool, n_samples=n_samples, min_distance=md, device="cpu")
    chosen = cand[sel.indices]
    centres = np.concatenate([pool, chosen])
    dist = pairwise(centres, centres)
    np.fill_diagonal(dist, np.inf)
    assert dist[len(pool):].min() >= md  # selected vs pool and vs each other (pool vs pool is not ours)
    assert np.all(sel.distances[1 if not with_pool else 0:] >= np.float32(md))
    assert np.all(np.diff(sel.distances.astype(np.float64)) <= 0)  # greedy radii never grow
    rest = np.setdiff1d(np.arange(len(cand)), sel.indices)
    coverage = pairwise(cand[rest], centres).min(1)
    if sel.stop_reason == "n_samples":
        assert n_samples == 40 and len(sel.indices) == 40 and coverage.max() >= md
    else:
        assert sel.stop_reason == "min_distance"
        assert coverage.max() < md


def test_n_samples_equal_to_n_keeps_everything() -> None:
    cand = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    sel = kcenter(cand, n_samples=50, device="cpu")
    assert sorted(sel.indices.tolist()) == list(range(50)) and sel.stop_reason == "n_samples"
    sel = kcenter(cand, n_samples=80, device="cpu")
    assert len(sel.indices) == 50 and sel.stop_reason == "exhausted"
    sel = kcenter(cand, min_distance=0.0, device="cpu")
    assert len(sel.indices) == 50 and sel.stop_reason == "exhausted"
    assert kcenter(cand, n_samples=0, device="cpu").stop_reason == "n_samples"


@pytest.mark.parametrize("shape", [(0, 8), (0, 0)])
def test_empty_candidates(shape: tuple[int, int]) -> None:
    sel = kcenter(np.empty(shape, np.float32), np.ones((3, 8), np.float32), n_samples=5, device="cpu")
    assert sel.indices.size == 0 and sel.distances.size == 0 and sel.stop_reason == "empty"


def test_determinism_and_seed() -> None:
    cand = np.random.default_rng(1).standard_normal((300, 4)).astype(np.float32)
    runs = [kcenter(cand, n_samples=10, seed=s, device="cpu") for s in range(8)]
    again = kcenter(cand, n_samples=10, seed=3, device="cpu")
    assert again.indices.tolist() == runs[3].indices.tolist()
    assert np.array_equal(again.distances, runs[3].distances)
    assert len({r.indices[0] for r in runs}) > 1
    for s, r in enumerate(runs):
        assert r.indices[0] == np.random.default_rng(s).integers(300) and r.distances[0] == np.inf
    pool = cand[:2] + 0.5
    with_pool = {tuple(kcenter(cand, pool, n_samples=10, seed=s, device="cpu").indices) for s in range(4)}
    assert len(with_pool) == 1


def test_inputs_not_modified_and_dtypes_accepted() -> None:
    cand64 = np.random.default_rng(2).standard_normal((100, 5))
    before = cand64.copy()
    sel64 = kcenter(cand64, cand64[:3] + 1, n_samples=10, device="cpu")
    assert np.array_equal(cand64, before)
    sel32 = kcenter(cand64.astype(np.float32), (cand64[:3] + 1).astype(np.float32), n_samples=10, device="cpu")
    assert sel32.indices.tolist() == sel64.indices.tolist()
    grid = np.array([[0, 0], [3, 4], [1, 1]], np.int32)
    sel = kcenter(grid, np.zeros((1, 2), np.int64), n_samples=1, device="cpu")
    assert sel.indices.tolist() == [1] and sel.distances.tolist() == [5.0]
    with pytest.raises(ValueError):
        sel.indices[0] = 2  # read-only


def test_tiling_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    cand, pool = make_data("duplicates", 8, 0, True)
    pool = np.concatenate([pool, cand[:40]])
    expected = kcenter(cand, pool, n_samples=100, device="cpu")
    monkeypatch.setattr(coreset, "_CPU_TILE_BYTES", 8 * 7 * 5)  # tiles of 5 rows x 7 columns, 7-row chunks
    monkeypatch.setattr(coreset, "_POOL_COLUMNS", 7)
    tiled = kcenter(cand, pool, n_samples=100, device="cpu")
    assert tiled.indices.tolist() == expected.indices.tolist()
    np.testing.assert_allclose(tiled.distances, expected.distances, rtol=1e-6)
    assert_same(tiled, reference(cand, pool, 100, None))


@pytest.mark.parametrize("kind", ["duplicates", "offset_near", "clusters"])
def test_torch_backend_makes_the_same_picks(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    # The CUDA path is the torch backend; run that code on the CPU to check it against numpy.
    torch = pytest.importorskip("torch")
    cand, pool = make_data(kind, 16, 1, True)
    for md, n in [(None, 150), (0.0, None)]:
        expected = kcenter(cand, pool, n_samples=n, min_distance=md, device="cpu")
        with monkeypatch.context() as m:
            m.setattr(coreset, "_select_backend", lambda device: coreset._Backend(torch, torch.device("cpu")))
            got = kcenter(cand, pool, n_samples=n, min_distance=md, device="cuda")
            got_nopool = kcenter(cand, None, n_samples=20, seed=5, device="cuda")
        assert got.indices.tolist() == expected.indices.tolist() and got.stop_reason == expected.stop_reason
        np.testing.assert_allclose(got.distances, expected.distances, rtol=1e-6)
        assert_same(got_nopool, reference(cand, None, 20, None, seed=5))


def test_auto_device_matches_cpu() -> None:
    cand, pool = make_data("gauss", 8, 0, True)
    auto = kcenter(cand, pool, n_samples=30)
    cpu = kcenter(cand, pool, n_samples=30, device="cpu")
    assert auto.indices.tolist() == cpu.indices.tolist()


def test_memory_stays_linear() -> None:
    n, dim, p = 200_000, 32, 1_000
    rng = np.random.default_rng(0)
    cand = rng.standard_normal((n, dim), dtype=np.float32)
    pool = rng.standard_normal((p, dim), dtype=np.float32)
    tracemalloc.start()
    try:
        sel = kcenter(cand, pool, n_samples=5, min_distance=0.1, device="cpu", algorithm="plain")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sel.indices) == 5
    working_copy = 8 * n * dim  # the float64 copy of the candidates: 51 MB
    assert peak < 1.6 * working_copy  # ~82 MB; N x P float32 alone would be 800 MB, N x 64 columns 51 MB
    assert peak > working_copy  # tracemalloc does see numpy's buffers, so the bound above means something


# --- the pruned algorithm: the same picks as the plain one -----------------------------------------------


def pruning_data(kind: str, seed: int, with_pool: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Seeded data sets for plain-vs-pruned comparisons (float32, 16 dimensions unless noted)."""
    rng = np.random.default_rng(2000 + seed)
    dim = 16
    if kind == "gauss":
        cand = rng.standard_normal((200, dim))
        pool = rng.standard_normal((12, dim))
    elif kind == "gauss3":  # few dimensions: no speculation, float32 screen on very short rows
        dim = 3
        cand = rng.standard_normal((200, dim))
        pool = rng.standard_normal((12, dim))
    elif kind == "mixture":  # clusters of very different spreads and sizes
        centres = rng.normal(0, 3, (12, dim))
        spread = np.exp(rng.uniform(np.log(0.005), np.log(1.0), 12))
        label = rng.choice(12, 200, p=rng.dirichlet(np.ones(12)))
        cand = centres[label] + rng.standard_normal((200, dim)) * spread[label, None]
        pool = centres[:4] + rng.standard_normal((4, dim)) * 0.1
    elif kind == "duplicates":  # exact duplicates among the candidates and of pool members
        base = rng.normal(0, 2, (20, dim))[rng.integers(20, size=120)] + rng.normal(0, 0.3, (120, dim))
        pool = rng.normal(0, 2, (10, dim))
        cand = np.concatenate([base, base[rng.integers(120, size=50)], pool[rng.integers(10, size=25)]])
        cand = cand[rng.permutation(len(cand))]
    elif kind == "near":  # far from the origin, exact duplicates and 1-ulp neighbours (cancellation-prone)
        base = (1000.0 + rng.standard_normal((120, dim))).astype(np.float32)
        near = base[rng.integers(120, size=40)].copy()
        near[:, 0] = np.nextafter(near[:, 0], np.float32(np.inf))
        pool = (1000.0 + rng.standard_normal((10, dim))).astype(np.float32)
        cand = np.concatenate([base, near, base[rng.integers(120, size=25)], pool[:5]])
        cand = cand[rng.permutation(len(cand))]
    elif kind == "lattice":  # small integer grid: exact ties everywhere, and duplicates
        dim = 6
        cand = rng.integers(-1, 2, (200, dim)).astype(np.float64)
        pool = rng.integers(-1, 2, (6, dim)).astype(np.float64)
    elif kind == "shells":  # signed cyclic shifts of one vector at three scales: many equal distances
        v = rng.standard_normal(dim)
        shifts = np.stack([np.roll(v, r) for r in range(dim)])
        signs = np.where(rng.random((4, 1, dim)) < 0.5, -1.0, 1.0)
        one = (signs * shifts[None]).reshape(-1, dim)
        cand = np.concatenate([one, 0.5 * one, 2.0 * one])
        pool = np.zeros((1, dim))
    else:
        raise AssertionError(kind)
    return cand.astype(np.float32), (pool.astype(np.float32) if with_pool else None)


# Module constants that steer the pruned algorithm onto each of its code paths on small inputs.
PATHS = {
    "default": {},
    # every update screens all candidates, from speculated float32 columns where the guess was right
    "speculate": {"_SPEC_CANDIDATES": 16, "_DENSE_FRACTION": 0.0, "_FULL_FRACTION": 2.0},
    # every update goes through the clusters (triangle test), then the float32 screen
    "sparse": {"_DENSE_FRACTION": 2.0, "_SCREEN_MIN": 0},
    # ... then straight to float64
    "sparse_f64": {"_DENSE_FRACTION": 2.0, "_SCREEN_MIN": 10**9},
    # tiny tiles everywhere (pool fold, float64 chunks, speculation), speculation with tiny candidate sets
    "tiles": {"_CPU_TILE_BYTES": 8 * 7 * 12, "_POOL_COLUMNS": 7, "_SPEC_CANDIDATES": 8, "_DENSE_FRACTION": 0.0},
}


def assert_identical(got: Selection, want: Selection) -> None:
    assert got.stop_reason == want.stop_reason
    assert got.indices.tolist() == want.indices.tolist()
    assert np.array_equal(got.distances, want.distances)  # float32: rounding-level differences vanish


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("with_pool", [False, True], ids=["nopool", "pool"])
@pytest.mark.parametrize("kind", ["gauss", "gauss3", "mixture", "duplicates", "near", "lattice", "shells"])
def test_pruned_matches_plain(monkeypatch: pytest.MonkeyPatch, kind: str, with_pool: bool, path: str) -> None:
    cand, pool = pruning_data(kind, list(PATHS).index(path), with_pool)  # another draw for every path
    n = len(cand)
    plain = kcenter(cand, pool, min_distance=0.0, seed=3, device="cpu", algorithm="plain")
    finite = plain.distances[np.isfinite(plain.distances)]
    md = float(finite[len(finite) // 3])  # a distance that is picked: the pick at exactly min_distance
    runs: list[dict] = [
        {"n_samples": n // 2},  # includes the rounds where several candidates tie
        {"min_distance": 0.0},  # to the end: every duplicate of a centre is left out
        {"min_distance": md},
        {"n_samples": n, "min_distance": float(np.nextafter(np.float32(md), np.float32(np.inf)))},
        {"n_samples": n},  # everything: duplicates of centres at distance 0 last, in index order
    ]
    for key, value in PATHS[path].items():
        monkeypatch.setattr(coreset, key, value)
    for kwargs in runs:
        want = kcenter(cand, pool, seed=3, device="cpu", algorithm="plain", **kwargs)
        got = kcenter(cand, pool, seed=3, device="cpu", algorithm="pruned", **kwargs)
        assert_identical(got, want)
    if kind in ("duplicates", "near", "lattice"):
        assert plain.stop_reason == "min_distance"  # the data do hold duplicates


def test_pruned_paths_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not a speed test: checks that the comparisons above exercise what they claim to.
    cand, pool = pruning_data("mixture", 1, True)
    stats: dict = {}
    coreset._kcenter_pruned(cand, pool, 200, None, np.random.default_rng(0), stats)
    assert stats["evaluated"] < 0.5 * stats["picks"] * len(cand)  # the triangle test skips most distances
    with monkeypatch.context() as m:
        for key, value in PATHS["speculate"].items():
            m.setattr(coreset, key, value)
        stats = {}
        coreset._kcenter_pruned(cand, pool, 200, None, np.random.default_rng(0), stats)
        assert stats["batches"] >= 1 and stats["screened"] > stats["evaluated"]
    with monkeypatch.context() as m:
        for key, value in PATHS["sparse"].items():
            m.setattr(coreset, key, value)
        stats = {}
        coreset._kcenter_pruned(cand, pool, 200, None, np.random.default_rng(0), stats)
        assert stats["batches"] == 0 and 0 < stats["screened"] < stats["picks"] * len(cand)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_matches_plain_larger_clustered(seed: int) -> None:
    # Enough candidates for the default settings to speculate, and clusters that get tight.
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, 24)) * 2
    spread = np.exp(rng.uniform(np.log(0.02), np.log(0.5), 40))
    label = rng.integers(40, size=6000)
    cand = (centres[label] + rng.standard_normal((6000, 24)) * spread[label, None]).astype(np.float32)
    pool = cand[rng.integers(6000, size=30)] + np.float32(0.01)
    for p in (None, pool):
        want = kcenter(cand, p, n_samples=400, seed=seed, device="cpu", algorithm="plain")
        stats: dict = {}
        got = coreset._kcenter_pruned(cand, p, 400, None, np.random.default_rng(seed), stats)
        assert got[0] == want.indices.tolist() and got[2] == want.stop_reason
        assert np.array_equal(np.asarray(got[1], np.float32), want.distances)
        assert stats["batches"] >= 1 and stats["evaluated"] < 0.1 * 400 * 6000


@pytest.mark.parametrize("scale", [1e-13, 1e13])
def test_pruned_at_extreme_scales(scale: float) -> None:
    # The float32 screen turns itself off where float32 could underflow or overflow; picks stay the same.
    cand, pool = pruning_data("mixture", 2, True)
    cand64, pool64 = cand.astype(np.float64) * scale, pool.astype(np.float64) * scale
    for kwargs in ({"n_samples": 150}, {"min_distance": 0.0}):
        want = kcenter(cand64, pool64, device="cpu", algorithm="plain", **kwargs)
        assert_identical(kcenter(cand64, pool64, device="cpu", algorithm="pruned", **kwargs), want)


def test_pruned_leaves_inputs_and_blas_threads_alone() -> None:
    cand, pool = pruning_data("gauss", 3, True)
    cand64 = cand.astype(np.float64)  # float64 input: rows are read from it directly, never written
    before, pool_before = cand64.copy(), pool.copy()
    def blas_threads() -> list[int]:
        return [int(info["num_threads"]) for info in threadpool_info() if info["user_api"] == "blas"]

    threads = blas_threads()
    assert threads, "no BLAS library found by threadpoolctl"
    kcenter(cand64, pool, n_samples=100, device="cpu", algorithm="pruned")
    assert np.array_equal(cand64, before) and np.array_equal(pool, pool_before)
    assert blas_threads() == threads
    with coreset._one_blas_thread():
        assert all(n == 1 for n in blas_threads())
        with coreset._one_blas_thread():  # nested: one limit, restored by the outermost
            assert all(n == 1 for n in blas_threads())
        assert all(n == 1 for n in blas_threads())
    assert blas_threads() == threads


def test_auto_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    assert coreset._prefer_pruned(1_000_000, 32, 10_000)
    assert coreset._prefer_pruned(50_000, 32, 1024) and coreset._prefer_pruned(60_000, 128, 60_000)
    assert not coreset._prefer_pruned(49_999, 32, 10_000)  # small inputs: set-up not repaid
    assert not coreset._prefer_pruned(1_000_000, 16, 10_000)  # few dimensions
    assert not coreset._prefer_pruned(1_000_000, 32, 1023)  # few picks
    cand, pool = pruning_data("mixture", 4, True)
    calls: list[str] = []
    real_pruned, real_plain = coreset._kcenter_pruned, coreset._kcenter
    monkeypatch.setattr(coreset, "_kcenter_pruned", lambda *a: calls.append("pruned") or real_pruned(*a))
    monkeypatch.setattr(coreset, "_kcenter", lambda *a: calls.append("plain") or real_plain(*a))
    small = kcenter(cand, pool, n_samples=100, device="cpu")
    monkeypatch.setattr(coreset, "_AUTO_MIN_CANDIDATES", 100)
    monkeypatch.setattr(coreset, "_AUTO_MIN_DIM", 16)
    monkeypatch.setattr(coreset, "_AUTO_MIN_PICKS", 100)
    large = kcenter(cand, pool, n_samples=100, device="cpu")
    assert calls == ["plain", "pruned"]
    assert_identical(large, small)


def test_pruned_argument_checks() -> None:
    cand = np.zeros((4, 2), np.float32)
    with pytest.raises(SamplingError, match="algorithm"):
        kcenter(cand, n_samples=2, algorithm="fast")
    with pytest.raises(SamplingError, match="CPU"):
        kcenter(cand, n_samples=2, device="cuda", algorithm="pruned")
    sel = kcenter(cand, n_samples=2, device="auto", algorithm="pruned")  # "auto" means the CPU here
    assert sel.indices.tolist() == kcenter(cand, n_samples=2, device="cpu", algorithm="plain").indices.tolist()
    assert kcenter(np.empty((0, 3)), n_samples=2, algorithm="pruned").stop_reason == "empty"
    assert kcenter(np.ones((1, 3)), n_samples=5, algorithm="pruned").indices.tolist() == [0]


def test_pruned_memory_stays_below_the_plain_working_copy() -> None:
    n, dim, p = 200_000, 32, 500
    rng = np.random.default_rng(0)
    cand = rng.standard_normal((n, dim), dtype=np.float32)
    pool = rng.standard_normal((p, dim), dtype=np.float32)
    tracemalloc.start()
    try:
        sel = kcenter(cand, pool, n_samples=48, device="cpu", algorithm="pruned")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sel.indices) == 48
    # float32 copy (N*d*4) + 16 speculated float32 columns (N*64) + vectors, no float64 copy (N*d*8).
    assert 4 * n * dim < peak < 8 * n * dim


# --- argument checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, n, expected", [
    (-1, 100, None),
    (0, 100, 0),
    (7, 100, 7),
    (500, 100, 100),
    (np.int64(3), 10, 3),
    (0.1, 30, 3),        # 0.1 * 30 is 3.0000000000000004 in floats; still 3
    (0.25, 10, 3),       # 2.5 rounds up
    (0.01, 10, 1),
    (1e-9, 10, 1),
    (0.5, 0, 0),
    (1.0, 37, 37),
    (np.float32(0.5), 9, 5),
])
def test_resolve_n_samples(value: int | float, n: int, expected: int | None) -> None:
    assert resolve_n_samples(value, n) == expected


@pytest.mark.parametrize("value", [-2, 0.0, 1.5, -1.0, -0.5, math.nan, math.inf, True, False, "10", None])
def test_resolve_n_samples_rejects(value: object) -> None:
    with pytest.raises(SamplingError):
        resolve_n_samples(value, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [
    {},
    {"n_samples": None, "min_distance": None},
    {"n_samples": -1},
    {"n_samples": True},
    {"n_samples": 0.5},
    {"min_distance": -0.1},
    {"min_distance": math.nan},
    {"min_distance": math.inf},
    {"min_distance": True},
    {"n_samples": 3, "seed": -1},
    {"n_samples": 3, "seed": 1.5},
    {"n_samples": 3, "device": "tpu"},
    {"n_samples": 3, "device": "cuda:x"},
])
def test_kcenter_rejects_arguments(kwargs: dict) -> None:
    with pytest.raises(SamplingError):
        kcenter(np.zeros((4, 2), np.float32), **kwargs)


@pytest.mark.parametrize("cand, pool", [
    (np.zeros(4, np.float32), None),
    (np.zeros((4, 2), np.float32), np.zeros((3, 5), np.float32)),
    (np.array([[0.0, np.nan], [1.0, 1.0]], np.float32), None),
    (np.array([[0.0, np.inf], [1.0, 1.0]], np.float32), None),
    (np.zeros((4, 2), np.float32), np.array([[np.nan, 0.0]], np.float32)),
    (np.zeros((4, 2), bool), None),
    (np.array([["a", "b"]]), None),
])
def test_kcenter_rejects_inputs(cand: np.ndarray, pool: np.ndarray | None) -> None:
    with pytest.raises(SamplingError):
        kcenter(cand, pool, n_samples=2, device="cpu")


def test_cuda_requested_without_cuda() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SamplingError, match="CUDA"):
        kcenter(np.zeros((4, 2), np.float32), n_samples=2, device="cuda")


# --- random baseline ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k, reason", [(10, 3, "n_samples"), (10, 10, "n_samples"), (10, 25, "exhausted"),
                                          (10, 0, "n_samples"), (0, 5, "empty")])
def test_random_sample(n: int, k: int, reason: str) -> None:
    sel = random_sample(n, n_samples=k, seed=4)
    assert sel.stop_reason == reason
    assert sel.indices.tolist() == np.random.default_rng(4).permutation(n)[:k].tolist()
    assert len(set(sel.indices.tolist())) == len(sel.indices) == min(n, k)
    assert sel.indices.dtype == np.int64 and np.isnan(sel.distances).all()
    assert random_sample(n, n_samples=k, seed=4).indices.tolist() == sel.indices.tolist()


@pytest.mark.parametrize("n, k, seed", [(-1, 2, 0), (5, -1, 0), (5, 2.0, 0), (5, True, 0), (5, 2, -3), (5.0, 2, 0)])
def test_random_sample_rejects(n: object, k: object, seed: object) -> None:
    with pytest.raises(SamplingError):
        random_sample(n, n_samples=k, seed=seed)  # type: ignore[arg-type]


def test_selection_validates() -> None:
    with pytest.raises(ValueError):
        Selection(np.arange(3), np.zeros(2), "n_samples")
    with pytest.raises(ValueError):
        Selection(np.arange(2), np.zeros(2), "done")
