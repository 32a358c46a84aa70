"""Coreset selection: greedy k-center (farthest point) against a fixed pool, and a random baseline.

Pure library: no logging set-up, no threads, no global state (the pruned k-center limits numpy's BLAS to
one thread while it picks and restores the limit afterwards; see `_one_blas_thread`). device="auto" imports
torch only where it could find a GPU (see `_select_backend`). Bad arguments raise `SamplingError`.

Numerics (why the k-center code looks the way it does):

* Distances are computed in float64 with the norm trick ||x||^2 - 2 x.c + ||c||^2, on a working copy of
  the candidates shifted by their mean (distances are translation invariant; the shift shrinks the norms
  and with them the cancellation error). float64 costs 2x the time of float32 here (1.46 vs 0.72 ms per
  pick at N=200k, d=32) but keeps the approximate distances within ~1e-10 relative of the exact ones,
  which is what makes ties, `min_distance` decisions and CPU/CUDA agreement dependable.
* Pairs so close that the norm trick would cancel badly (squared distance below 1e-4 of the squared norms)
  are recomputed directly as sum((x - c)^2). An exact duplicate of a centre therefore has distance exactly
  0, and a near duplicate its true, small, non-zero distance.
* Values within a relative 1e-8 of the largest one count as tied (far above the float64 error, far below
  any gap that means something), and ties go to the lowest index. Both backends run the same code, so CPU
  and CUDA make the same picks.

Memory is O(N*d): the float64 working copy (8*N*d bytes), a few length-N vectors, and tiles of at most
4 MiB (CPU) / 64 MiB (CUDA) while the pool is folded in; no N x N, N x k or N x P matrix is ever built.
Time is O((P + k) * N * d) for the plain greedy.

Two implementations of the same greedy (`kcenter(..., algorithm=...)`): "plain" (`_kcenter`, numpy or
torch) updates every candidate after every pick; "pruned" (`_Pruned`, numpy only) rules out, with bounds
that allow for every rounding error, the candidates a new centre cannot get closer to (triangle
inequality over the clusters of the centres, then a float32 screen, computed for several likely next
centres at once), and computes the rest with the plain formula. Both make the same picks with the same
distances and stop reasons; "pruned" is many times faster for many picks from large data (see
docs/BENCHMARKS.md, "k-center") and keeps no float64 copy: a float32 copy (4*N*d bytes), float32 columns
for up to 16 predicted centres (at most 2*N*d bytes) and ~40 bytes per candidate.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from .devices import gpu_possible
from .errors import UsageError

__all__ = ["SamplingError", "Selection", "kcenter", "random_sample", "resolve_n_samples"]

_STOP_REASONS = ("n_samples", "min_distance", "exhausted", "empty")
_ALGORITHMS = ("auto", "plain", "pruned")

# Upper bounds for the temporaries of one tile (rows x pool centres, gathered rows).
_CPU_TILE_BYTES = 4 * 2**20
# The pruned algorithm converts rows to float64 in chunks of at most this size (they stay in L2).
_PASS_BYTES = 256 * 2**10
_GPU_TILE_BYTES = 64 * 2**20
# Pool centres per block.
_POOL_COLUMNS = 512
# Squared distances below _NEAR * (||x||^2 + ||c||^2) are recomputed directly (see module docstring).
# Above it the float64 norm-trick error is at most ~d * 1.1e-16 / _NEAR relative, i.e. <1e-9 for d <= 1024.
_NEAR = 1e-4
# Relative band (on squared distances) within which two values are treated as a tie.
_TIE_RTOL = 2e-8
# A product fraction * n within this relative distance of an integer is taken as that integer (0.1 * 30 = 3).
_FRACTION_RTOL = 1e-9
# The pruned algorithm does one pass over all candidates (instead of gathering clusters) above this share.
_DENSE_FRACTION = 0.3
# Speculative batches of the pruned algorithm: at most this many columns, predicted from this many candidates.
_SPEC_BATCH = 16
_SPEC_CANDIDATES = 1024
# Fewer candidates than this go straight to float64 (the float32 screen would not pay for itself).
_SCREEN_MIN = 256
# ... and more than this share of all candidates are computed in one float64 pass over all of them.
_FULL_FRACTION = 0.25
# algorithm="auto" uses the pruned algorithm from these sizes on (see `_prefer_pruned`).
_AUTO_MIN_CANDIDATES = 50_000
_AUTO_MIN_DIM = 32
_AUTO_MIN_PICKS = 1024
# device="auto" asks torch for a GPU only when torch is loaded or one of these exists: NVIDIA's driver
# (host or container), ROCm's kernel driver (torch's HIP builds), WSL2's GPU device.
class SamplingError(UsageError):
    """An argument to a sampling function is invalid."""


@dataclass(frozen=True)
class Selection:
    """The outcome of a sampling run.

    indices: int64 indices into the candidates, in pick order (rank = position).
    distances: float32, same length; the distance of each pick to (pool ∪ earlier picks) at pick time.
        +inf for the first pick of a k-center run with an empty pool; NaN for every pick of `random_sample`.
    stop_reason: "n_samples" (the requested count was reached), "min_distance" (the largest remaining
        distance fell below min_distance), "exhausted" (every candidate was picked before either rule
        applied) or "empty" (there were no candidates).

    The arrays are made read-only; copy them to modify.
    """

    indices: np.ndarray
    distances: np.ndarray
    stop_reason: str

    def __post_init__(self) -> None:
        indices = np.array(self.indices, dtype=np.int64).reshape(-1)
        distances = np.array(self.distances, dtype=np.float32).reshape(-1)
        if indices.shape != distances.shape:
            raise ValueError(f"indices ({indices.size}) and distances ({distances.size}) differ in length")
        if self.stop_reason not in _STOP_REASONS:
            raise ValueError(f"stop_reason must be one of {_STOP_REASONS}, got {self.stop_reason!r}")
        indices.flags.writeable = False
        distances.flags.writeable = False
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "distances", distances)


def resolve_n_samples(n_samples: int | float, n_candidates: int) -> int | None:
    """Turn the configured `n_samples` into a count of candidates, or None when inactive.

    * int -1: inactive, returns None.
    * int >= 0: that count, capped at `n_candidates`.
    * float in (0, 1]: the fraction ceil(n_samples * n_candidates), capped at `n_candidates`; 1.0 = all.
      A product within 1e-9 relative of an integer counts as that integer, so 0.1 of 30 is 3, not 4.

    Anything else (other negative ints, 0.0, floats above 1, non-finite floats, bools, other types) raises
    SamplingError.
    """
    _check_count_arg(n_candidates, "n_candidates")
    if isinstance(n_samples, (bool, np.bool_)):
        raise SamplingError(f"n_samples must be an int or a float fraction, not a bool ({n_samples!r})")
    if isinstance(n_samples, Integral):
        count = int(n_samples)
        if count == -1:
            return None
        if count < 0:
            raise SamplingError(f"n_samples must be -1 (inactive) or a count >= 0, got {count}")
        return min(count, n_candidates)
    if isinstance(n_samples, Real):
        fraction = float(n_samples)
        if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise SamplingError(
                f"a float n_samples is a fraction of the candidates and must lie in (0, 1], got {fraction!r}"
            )
        product = fraction * n_candidates
        nearest = round(product)
        if abs(product - nearest) <= _FRACTION_RTOL * max(1.0, product):
            return min(int(nearest), n_candidates)
        return min(math.ceil(product), n_candidates)
    raise SamplingError(f"n_samples must be an int or a float fraction, got {type(n_samples).__name__}")


def random_sample(n_candidates: int, *, n_samples: int, seed: int = 0) -> Selection:
    """The random baseline: the first `n_samples` entries of a seeded permutation of range(n_candidates).

    Deterministic: `np.random.default_rng(seed).permutation(n_candidates)[:n_samples]`. Distances are NaN.
    stop_reason is "empty" without candidates, "n_samples" when n_samples <= n_candidates, else "exhausted".
    """
    _check_count_arg(n_candidates, "n_candidates")
    _check_count_arg(n_samples, "n_samples")
    _check_seed(seed)
    if n_candidates == 0:
        return Selection(np.empty(0, np.int64), np.empty(0, np.float32), "empty")
    indices = np.random.default_rng(seed).permutation(n_candidates)[:n_samples]
    reason = "n_samples" if n_samples <= n_candidates else "exhausted"
    return Selection(indices, np.full(indices.size, np.nan, np.float32), reason)


def kcenter(
    candidates: np.ndarray,
    pool: np.ndarray | None = None,
    *,
    n_samples: int | None = None,
    min_distance: float | None = None,
    seed: int = 0,
    device: str = "auto",
    algorithm: str = "auto",
) -> Selection:
    """Greedy k-center (farthest point) selection of `candidates` with the `pool` as fixed initial centres.

    candidates: N x d real array; pool: P x d real array, or None / 0 rows for no pool. Both are used as
    given (normalise beforehand if wanted); distances are Euclidean. The inputs are not modified. With no
    candidates the result is "empty" whatever the pool's width.

    Each step picks the candidate farthest from its nearest centre (pool ∪ earlier picks); ties, i.e.
    values within 1e-8 relative of each other, go to the lowest index. Before each pick the run stops when
    `n_samples` picks have been made ("n_samples"), when every candidate is picked ("exhausted"), or, when
    `min_distance` is set, when the largest remaining distance is below it or is 0 ("min_distance").
    A pick at exactly `min_distance` is allowed; with `min_distance` set, an exact duplicate of a centre is
    never picked (even with min_distance=0), with `n_samples` alone it may be, after every other candidate.

    n_samples: a count >= 0 (see `resolve_n_samples`) or None for inactive. min_distance: a finite number
    >= 0 or None for inactive. At least one of them must be set.
    seed: with an empty pool the first pick is `np.random.default_rng(seed).integers(N)` and gets distance
    +inf; same seed and inputs give the same picks. With a non-empty pool the seed has no effect.
    device: "cpu" (numpy), "cuda" / "cuda:<i>" (torch), or "auto" (CUDA when torch sees a GPU, else CPU;
    torch is not imported for it unless it is loaded already or a GPU driver is installed).
    Both backends make the same picks.
    algorithm: "plain" (every distance to every new centre; numpy or torch), "pruned" (the same greedy,
    computing only the distances that can change a pick; numpy, CPU only: device "auto" then means the
    CPU and "cuda" is an error), or "auto": "pruned" on the CPU for large inputs (N >= 50,000, d >= 32
    and n_samples >= 1,024, or only min_distance set), else "plain". All make the
    same picks with the same distances and stop reasons; "pruned" is much faster for many picks from large
    data (most on clustered data) and needs less memory than "plain" (see docs/BENCHMARKS.md, "k-center").
    """
    cand = _as_matrix(candidates, "candidates")
    n, dim = cand.shape
    pool_arr = None if pool is None else _as_matrix(pool, "pool")
    if pool_arr is not None and pool_arr.shape[0] == 0:
        pool_arr = None
    if pool_arr is not None and n > 0 and pool_arr.shape[1] != dim:
        raise SamplingError(f"pool has {pool_arr.shape[1]} columns but candidates have {dim}")
    if n_samples is not None:
        _check_count_arg(n_samples, "n_samples")
        n_samples = int(n_samples)
    if min_distance is not None:
        if isinstance(min_distance, (bool, np.bool_)) or not isinstance(min_distance, Real):
            raise SamplingError(f"min_distance must be a number or None, got {type(min_distance).__name__}")
        min_distance = float(min_distance)
        if not (math.isfinite(min_distance) and min_distance >= 0.0):
            raise SamplingError(f"min_distance must be a finite number >= 0 (None = inactive), got {min_distance!r}")
    if n_samples is None and min_distance is None:
        raise SamplingError("kcenter needs n_samples or min_distance; with neither it would select everything")
    _check_seed(seed)
    _check_device(device)
    if algorithm not in _ALGORITHMS:
        raise SamplingError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")
    if algorithm == "pruned" and device.startswith("cuda"):
        raise SamplingError("algorithm='pruned' runs on the CPU only; use device='cpu' or 'auto'")

    if n == 0:
        return Selection(np.empty(0, np.int64), np.empty(0, np.float32), "empty")
    rng = np.random.default_rng(seed)
    be = _Backend(np) if algorithm == "pruned" else _select_backend(device)
    limit = n if n_samples is None else min(n_samples, n)
    if algorithm == "pruned" or (algorithm == "auto" and be.device is None and _prefer_pruned(n, dim, limit)):
        indices, distances, reason = _kcenter_pruned(cand, pool_arr, n_samples, min_distance, rng)
    else:
        indices, distances, reason = _kcenter(be, cand, pool_arr, n_samples, min_distance, rng)
    return Selection(np.asarray(indices, np.int64), np.asarray(distances, np.float32), reason)


# --- algorithm --------------------------------------------------------------------------------------------


class _Backend:
    """Array creation and transfer for one array library.

    Everything else in `_kcenter` is written in syntax numpy and torch share (`@`, in-place arithmetic,
    comparisons, fancy indexing, xp.where/minimum/amin/einsum/isfinite), so both backends run the same code.
    """

    def __init__(self, xp: Any, device: Any = None) -> None:
        self.xp = xp
        self.device = device
        # Size of the temporaries of one tile: cache-sized on the CPU, large enough to keep a GPU busy.
        self.tile_bytes = _CPU_TILE_BYTES if device is None else _GPU_TILE_BYTES

    def array(self, a: np.ndarray) -> Any:
        """A float64, C-contiguous copy of `a` on this backend's device (never aliasing `a`)."""
        if self.device is None:
            return np.array(a, dtype=np.float64, order="C")
        src = np.ascontiguousarray(a)
        # as_tensor shares memory (no host copy) but warns on read-only arrays; tensor() copies quietly.
        tensor = self.xp.as_tensor(src) if src.flags.writeable else self.xp.tensor(src)
        return tensor.to(device=self.device, dtype=self.xp.float64, copy=True)

    def full(self, n: int, value: float) -> Any:
        if self.device is None:
            return np.full(n, value, dtype=np.float64)
        return self.xp.full((n,), value, dtype=self.xp.float64, device=self.device)


def _kcenter(
    be: _Backend,
    cand: np.ndarray,
    pool: np.ndarray | None,
    n_samples: int | None,
    min_distance: float | None,
    rng: np.random.Generator,
) -> tuple[list[int], list[float], str]:
    xp = be.xp
    n = cand.shape[0]
    # Non-finite inputs are reported below as a SamplingError, not as numpy warnings on the way there.
    with np.errstate(over="ignore", invalid="ignore"):
        mean = be.array(cand.mean(axis=0, dtype=np.float64))
        x = be.array(cand)
        x -= mean
        sqn = xp.einsum("ij,ij->i", x, x)
        if not bool(xp.isfinite(sqn).all()):
            raise SamplingError("candidates contain NaN or infinite values (or values too large to square)")
        max_sqn = float(sqn.max())

        # mind2[i]: squared distance of candidate i to its nearest centre; -inf once picked.
        mind2 = be.full(n, math.inf)
        if pool is not None:
            _fold_pool(be, x, sqn, max_sqn, mean, pool, mind2)

    picks: list[int] = []
    dists: list[float] = []
    limit = n if n_samples is None else min(n_samples, n)
    while True:
        if n_samples is not None and len(picks) >= n_samples:
            return picks, dists, "n_samples"
        if len(picks) == n:
            return picks, dists, "exhausted"
        if pool is None and not picks:
            j, dist = int(rng.integers(n)), math.inf
        else:
            j = int(mind2.argmax())
            top2 = float(mind2[j])
            if min_distance is not None and (top2 == 0.0 or math.sqrt(top2) < min_distance):
                return picks, dists, "min_distance"
            if top2 == 0.0:
                # Everything left duplicates a centre: all tie at 0, so they follow in index order.
                rest = xp.where(mind2 >= 0.0)[0][: limit - len(picks)]
                picks.extend(int(i) for i in rest.tolist())
                dists.extend([0.0] * len(rest))
                continue
            # argmax returns the first maximum; near-ties with a lower index must win too.
            threshold = top2 * (1.0 - _TIE_RTOL)
            if min_distance is not None:
                threshold = max(threshold, min_distance * min_distance)
            lower = xp.where(mind2[:j] >= threshold)[0]
            if len(lower):
                j = int(lower[0])
            dist = math.sqrt(float(mind2[j]))
        picks.append(j)
        dists.append(dist)
        mind2[j] = -math.inf
        if len(picks) == limit:
            continue  # no further pick will need the update

        centre = x[j]
        cn = float(sqn[j])
        d2 = x @ (-2.0 * centre)  # scaling by -2 is exact, so this equals -2 * (x @ centre)
        d2 += sqn
        d2 += cn
        near = xp.where(d2 < _NEAR * (max_sqn + cn))[0]
        _refine(be, d2, (near,), x, near, centre, None)
        xp.minimum(mind2, d2, out=mind2)


class _Rows:
    """Rows of the shifted float64 candidates, made on demand from the caller's array.

    `rows[key]` (a slice or an index array) is a new float64 array equal, bit for bit, to the same rows
    of `_kcenter`'s working copy (float64(value) - mean, element by element), so no N x d float64 copy
    has to be kept.
    """

    def __init__(self, cand: np.ndarray, mean: np.ndarray) -> None:
        self.cand, self.mean = cand, mean
        self.shape = cand.shape

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.take(key, None)

    def take(self, key: Any, buffer: np.ndarray | None) -> np.ndarray:
        """The rows `key`, written into the start of `buffer` (float64, enough rows) when one is given.

        Reusing a buffer matters: fresh multi-megabyte arrays are fresh pages, and faulting them in costs
        more than the conversion itself.
        """
        part = self.cand[key]
        out: np.ndarray = np.empty(part.shape, np.float64) if buffer is None else buffer[: len(part)]
        out[...] = part  # float64(value), exactly as np.array(cand, dtype=np.float64)
        out -= self.mean
        return out


class _Pruned:
    """The greedy of `_kcenter` (numpy only), computing only the distances that can change. Exact.

    After each pick `_kcenter` lowers every candidate's `mind2` to its distance to the new centre c where
    that is smaller. This class performs the same update but first rules out, with certainty, the
    candidates that c cannot get closer to, and computes the distances of the others with exactly
    `_kcenter`'s formula (float64 norm trick in the same order of operations, near pairs recomputed
    directly). Every skip allows for all rounding errors (`_margins`), so `mind2` takes the same values as
    in `_kcenter` and the picks, read off per-cluster maxima with the same tie rule, are the same. (Only
    the summation order inside BLAS may differ for the candidates that are computed, by a few units in
    the last place: far inside the 2e-8 tie band.)

    * Clusters and the triangle inequality. Every candidate belongs to the cluster of the centre (pool
      member or pick) whose distance is its `mind2`. c can lower the value of a member x of cluster a only
      if |c - a| < 2 |x - a|, so clusters with |c - a| >= 2 * radius are skipped without being touched,
      and in the others each member is tested on its own. Once the clusters are small and tight (after
      the first picks on clustered data) a pick touches a small fraction of the candidates.
    * float32 screen. Where many candidates remain (wide clusters early on, or data without structure),
      their distances to c are first computed in float32 from a float32 copy of the candidates (half the
      memory traffic of float64); a candidate is dropped when even its float32 value, less a rigorous
      bound on the float32 and float64 rounding errors, is at least its `mind2`. The float64 distance is
      then computed only for the few that are left. (The first few picks, which move a large share of
      the candidates, go straight to one float64 pass over all of them.)
    * Speculation. While every pick screens every candidate, the screen of the next few picks is
      computed at once, as one float32 matrix product with a column per predicted pick (`_speculate`):
      memory traffic for one column, not 16. A column is used only if its candidate really is picked,
      with the bounds of that moment; a wrong guess costs time, never exactness.
    * Picks. The largest `mind2` is the largest cluster radius. Members that leave a cluster are removed
      lazily: a cluster's radius stays an upper bound (exact when the cluster is clean), and clusters are
      cleaned when a pick or a sparse update needs them.

    Cost: ~N * d per pick while the clusters are wide (at float32 and batched speed), then roughly the
    members of the nearby clusters plus O(k * d) for the centre-to-centre bounds; see docs/BENCHMARKS.md.

    Memory: a float32 copy of the candidates (4 * N * d bytes; float64 rows are made from the caller's
    array when needed, see `_Rows`), float32 columns for up to 16 speculated centres (at most 2 * N * d
    bytes), a few length-N vectors (values, float32 bounds, cluster indices, member lists), the centres,
    and tiles of at most 4 MiB: less than `_kcenter`'s float64 working copy for d >= 16.
    """

    def __init__(self, cand: np.ndarray, pool: np.ndarray | None, capacity: int) -> None:
        be = self.be = _Backend(np)
        n, dim = cand.shape
        height = max(1, min(be.tile_bytes, _PASS_BYTES) // (8 * dim))
        with np.errstate(over="ignore", invalid="ignore"):
            mean = be.array(cand.mean(axis=0, dtype=np.float64))
            x = _Rows(cand, mean)
            self.pass_step = pass_step = max(1, _PASS_BYTES // (8 * dim))
            self.buffer = np.empty((min(n, max(height, pass_step)), dim), np.float64)  # see `_Rows.take`
            sqn = np.empty(n, np.float64)
            x32 = np.empty((n, dim), np.float32)
            for r0 in range(0, n, pass_step):
                rows = x.take(slice(r0, r0 + pass_step), self.buffer)
                sqn[r0 : r0 + pass_step] = np.einsum("ij,ij->i", rows, rows)
                x32[r0 : r0 + pass_step] = rows
            if not bool(np.isfinite(sqn).all()):
                raise SamplingError("candidates contain NaN or infinite values (or values too large to square)")
            self.max_sqn = max_sqn = float(sqn.max())
            self.x, self.sqn, self.n, self.dim = x, sqn, n, dim
            self.mind2 = mind2 = np.full(n, math.inf)
            self.assign = assign = np.full(n, -1, np.intp)  # cluster of each candidate, -1 once picked
            self.k = 0
            capacity = max(16, min(capacity, 4096))  # the per-centre arrays grow by doubling
            self.ctr = np.empty((capacity, dim), np.float64)
            self.ctrn = np.empty(capacity, np.float64)
            self.rad2 = np.empty(capacity, np.float64)  # largest member value; an upper bound while dirty
            self.size = np.empty(capacity, np.int64)  # len(members[a]); an upper bound while dirty
            self.dirty = np.empty(capacity, bool)  # members[a] may still list candidates that left
            self.members: list[np.ndarray] = []
            if pool is not None:
                _fold_pool(be, x, sqn, max_sqn, mean, pool, mind2, assign)
                order = np.argsort(assign, kind="stable")
                rows = assign[order]
                starts = np.flatnonzero(np.concatenate(([True], rows[1:] != rows[:-1])))
                used = rows[starts]
                centres = be.array(pool[used])
                centres -= mean  # the very values `_fold_pool` measured against
                renumber = np.empty(pool.shape[0], np.intp)
                renumber[used] = np.arange(len(used))
                self.assign = renumber[assign]
                self._add(centres, np.einsum("ij,ij->i", centres, centres), np.split(order, starts[1:]),
                          np.maximum.reduceat(mind2[order], starts))
        self.factor, self.cc_rel, self.keep32, slack_rel = _margins(dim)
        self.step = height
        # The float32 screen's error analysis assumes no overflow or underflow; outside this (very wide)
        # range of scales the candidates that the triangle test leaves are all computed in float64.
        self.screen = 1e-20 <= max_sqn <= 1e20
        self.x32 = x32  # also the source of the speculation's float32 products
        if self.screen:
            self.slack = slack_rel * max_sqn
            self.bound = np.empty(n, np.float32)
            self._set_bound(np.arange(n))
        # Speculative float32 columns (see `_speculate`): worth it from about 8 dimensions on.
        self.spec = self.screen and dim >= 8 and n >= 4 * _SPEC_CANDIDATES
        if not self.screen:
            del self.x32
        self.spec_width = max(4, min(_SPEC_BATCH, dim // 2))
        self.spec_cols: dict[int, int] = {}
        self.columns: np.ndarray | None = None
        self.crowded = False  # the last update moved more than _FULL_FRACTION of the candidates
        self.evaluated = 0  # float64 distances computed
        self.screened = 0  # float32 distances computed
        self.batches = 0  # speculative batches

    def _add(self, ctr: np.ndarray, ctrn: np.ndarray | float, members: list[np.ndarray], rad2: np.ndarray | float) -> None:
        """New centres (rows of ctr, shifted; ctrn their squared norms), each with its (clean) members and
        their largest value (scalars for one centre)."""
        need = self.k + len(members)
        if need > len(self.ctrn):
            cap = max(need, 2 * len(self.ctrn))
            for name in ("ctr", "ctrn", "rad2", "size", "dirty"):
                old = getattr(self, name)
                new = np.empty((cap,) + old.shape[1:], old.dtype)
                new[: self.k] = old[: self.k]
                setattr(self, name, new)
        rows = slice(self.k, need)
        self.ctr[rows] = ctr
        self.ctrn[rows] = ctrn
        self.rad2[rows] = rad2
        self.size[rows] = [len(m) for m in members]
        self.dirty[rows] = False
        self.members.extend(members)
        self.k = need

    def _clean(self, a: int) -> None:
        m = self.members[a]
        m = m[self.assign[m] == a]
        self.members[a] = m
        self.size[a] = len(m)
        self.rad2[a] = self.mind2[m].max() if len(m) else -math.inf
        self.dirty[a] = False

    def pick(self, limit_left: int, min_distance: float | None) -> tuple[list[int], list[float], str | None]:
        """The next pick(s), as `_kcenter` makes them; (picks, distances, None) or ([], [], "min_distance")."""
        mind2 = self.mind2
        while True:
            a = int(self.rad2[: self.k].argmax())
            if not self.dirty[a]:
                break
            self._clean(a)
        # a's radius is exact and every other one bounds its cluster's values: it is the largest mind2.
        top2 = float(self.rad2[a])
        if min_distance is not None and (top2 == 0.0 or math.sqrt(top2) < min_distance):
            return [], [], "min_distance"
        if top2 == 0.0:
            rest = np.flatnonzero(mind2 >= 0.0)[:limit_left].tolist()
            return rest, [0.0] * len(rest), None
        threshold = top2 * (1.0 - _TIE_RTOL)
        if min_distance is not None:
            threshold = max(threshold, min_distance * min_distance)
        # `_kcenter` takes the lowest index whose value reaches `threshold` or, when none does (the
        # min_distance bound can exceed top2 by a rounding), the first maximum: in both cases the lowest
        # index whose value reaches min(threshold, top2). Only clusters whose radius reaches it hold one.
        bar = min(threshold, top2)
        while True:
            reach = np.flatnonzero(self.rad2[: self.k] >= bar)
            stale = reach[self.dirty[reach]]
            if not len(stale):
                break
            for b in stale.tolist():
                self._clean(b)
        j = self.n
        for b in reach.tolist():
            m = self.members[b]
            hit = m[mind2[m] >= bar]
            if len(hit):
                j = min(j, int(hit.min()))
        return [j], [math.sqrt(float(mind2[j]))], None

    def add_centre(self, j: int, picks_left: int) -> None:
        """Make candidate j (just picked) a centre: lower `mind2` where it is closer, as `_kcenter` does.

        picks_left: how many more picks may follow (it caps the speculation).
        """
        x, sqn, mind2, assign = self.x, self.sqn, self.mind2, self.assign
        n, k = self.n, self.k
        centre = x[j]
        cn = float(sqn[j])
        scaled = centre * -2.0  # scaling by -2 is exact, as in `_kcenter`
        home = int(assign[j])
        assign[j] = -1
        mind2[j] = -math.inf
        if self.screen:
            self.bound[j] = -np.inf
        idx: np.ndarray | None = None  # the candidates to compute in float64; None: all of them
        if k:
            self.dirty[home] = True
            # Lower bounds on the squared distances from c to the centres (norm trick less its error bound)
            low = self.ctr[:k] @ scaled
            low += self.ctrn[:k]
            low += cn
            low -= self.cc_rel * (self.ctrn[:k] + cn)
            # A cluster needs a look only if that is below factor (~4) times its squared radius.
            hit = np.flatnonzero(low < self.factor * self.rad2[:k])
            if int(self.size[hit].sum()) > _DENSE_FRACTION * n:
                # Screen everything, unless the last such pick moved so many candidates that the float64
                # pass over all of them (contiguous, no gathering) is cheaper: the first few picks.
                if not self.crowded:
                    if self.spec and j not in self.spec_cols and picks_left >= 4:
                        self._speculate(j, picks_left)
                    if j in self.spec_cols:
                        idx = self._apply(j)
                    elif self.screen:
                        idx = self._screen(None, j, cn)
                    if idx is not None and len(idx) > _FULL_FRACTION * n:
                        idx = None
            else:
                for a in hit[self.dirty[hit]].tolist():
                    self._clean(a)
                sizes = self.size[hit]
                idx = np.concatenate([self.members[a] for a in hit.tolist()]) if len(hit) else np.empty(0, np.intp)
                # The same test per member: x can get closer only if |c - a|^2 < 4 |x - a|^2.
                idx = idx[self.factor * mind2[idx] > np.repeat(low[hit], sizes)]
                if self.screen and len(idx) > _SCREEN_MIN:
                    idx = self._screen(idx, j, cn)
        d2 = self._exact(idx, centre, scaled, cn)
        if idx is None:
            lower = d2 < mind2
            moved = np.flatnonzero(lower)
        else:
            lower = d2 < mind2[idx]
            moved = idx[lower]
        values = d2[lower]
        mind2[moved] = values
        self.crowded = len(moved) > _FULL_FRACTION * n
        if self.screen:
            self._set_bound(moved)
        if k:
            self.dirty[assign[moved]] = True
        assign[moved] = k
        self._add(centre[None, :], cn, [moved], float(values.max()) if len(values) else -math.inf)

    def _exact(self, idx: np.ndarray | None, centre: np.ndarray, scaled: np.ndarray, cn: float) -> np.ndarray:
        """Squared distances of the candidates `idx` (None: all) to the centre, exactly as `_kcenter` does."""
        x, sqn = self.x, self.sqn
        near = _NEAR * (self.max_sqn + cn)
        count = self.n if idx is None else len(idx)
        self.evaluated += count
        d2 = np.empty(count, np.float64)
        step = self.pass_step if idx is None else self.step  # a pass converts rows in cache-sized chunks
        for s in range(0, count, step):
            rows = slice(s, s + step) if idx is None else idx[s : s + step]
            xs = x.take(rows, self.buffer)
            part = xs @ scaled
            part += sqn[rows]
            part += cn
            close = np.flatnonzero(part < near)
            _refine(self.be, part, (close,), xs, close, centre, None)
            d2[s : s + step] = part
        return d2

    def _screen(self, idx: np.ndarray | None, j: int, cn: float) -> np.ndarray:
        """The candidates of `idx` (None: all) that the new centre j may get closer to, by the float32 test.

        With g = fl32(x32 . (-2 c32)) a candidate is dropped when g + keep32 * |c|^2 >= bound[x], where
        bound[x] >= mind2[x] - keep32 * |x|^2 + slack (see `_margins` and `_set_bound`).
        """
        scaled = self.x32[j] * np.float32(-2.0)
        cc32 = self._cc32(cn)
        if idx is None:
            self.screened += self.n
            g = np.matmul(self.x32, scaled, out=self._scratch32())
            g += cc32
            return np.flatnonzero(np.less(g, self.bound, out=self._scratch_mask()))
        self.screened += len(idx)
        step = 2 * self.step
        keep = []
        for s in range(0, len(idx), step):
            rows = idx[s : s + step]
            g = self.x32[rows] @ scaled
            g += cc32
            keep.append(rows[g < self.bound[rows]])
        return keep[0] if len(keep) == 1 else np.concatenate(keep)

    def _cc32(self, cn: float) -> np.float32:
        """keep32 * |c|^2 rounded down to float32 (rounding down only makes the screen stricter)."""
        cc = cn * self.keep32
        cc32 = np.float32(cc)
        if float(cc32) > cc:
            return np.float32(np.nextafter(cc32, np.float32(-np.inf)))
        return cc32

    def _speculate(self, j: int, picks_left: int) -> None:
        """Screen all candidates against j and its likely successors at once (one float32 matrix product).

        While the clusters are wide every pick screens every candidate, and one matrix-vector product per
        pick is limited by memory bandwidth; a matrix product with a few columns costs little more than
        one of them. The next picks are predicted by running the greedy on the candidates with the largest
        values (exact distances among them, approximate otherwise); a column is used only if its point
        is really picked later, and is then applied with the bounds of that moment, so the prediction
        affects the speed only, never the result.
        """
        mind2, x = self.mind2, self.x
        top = np.argpartition(mind2, self.n - _SPEC_CANDIDATES)[-_SPEC_CANDIDATES:]
        top = top[(mind2[top] > -np.inf) & (top != j)]
        rows = x[top]
        rows -= x[j]
        value = np.minimum(mind2[top], np.einsum("ij,ij->i", rows, rows))
        batch = [j]
        width = min(self.spec_width, picks_left)
        while len(batch) < width and len(top):
            i = int(value.argmax())
            if not value[i] > 0.0:
                break
            batch.append(int(top[i]))
            diff = rows - rows[i]
            np.minimum(value, np.einsum("ij,ij->i", diff, diff), out=value)
            value[i] = -np.inf
        if self.columns is None:
            self.columns = np.empty((self.spec_width, self.n), np.float32)
        scaled = self.x32[batch] * np.float32(-2.0)  # exact
        cc32 = np.array([self._cc32(float(self.sqn[p])) for p in batch], np.float32)
        height = max(1, self.be.tile_bytes // (4 * (self.dim + len(batch))))
        for r0 in range(0, self.n, height):
            tile = self.x32[r0 : r0 + height] @ scaled.T
            tile += cc32  # the same float32 addition as in `_screen`
            self.columns[: len(batch), r0 : r0 + height] = tile.T
        self.spec_cols = {p: s for s, p in enumerate(batch)}
        self.screened += self.n * len(batch)
        self.batches += 1

    def _apply(self, j: int) -> np.ndarray:
        """The float32 screen of all candidates against j, from its precomputed column."""
        assert self.columns is not None, "a column is applied only after `_speculate` made it"
        column = self.columns[self.spec_cols.pop(j)]
        return np.flatnonzero(np.less(column, self.bound, out=self._scratch_mask()))

    def _scratch32(self) -> np.ndarray:
        """A float32 vector of length N, kept between picks (fresh pages cost more than the work)."""
        if getattr(self, "scratch32", None) is None:
            self.scratch32 = np.empty(self.n, np.float32)
        return self.scratch32

    def _scratch_mask(self) -> np.ndarray:
        if getattr(self, "scratch_mask", None) is None:
            self.scratch_mask = np.empty(self.n, bool)
        return self.scratch_mask

    def _set_bound(self, rows: np.ndarray) -> None:
        b = self.mind2[rows] - self.keep32 * self.sqn[rows]
        b += self.slack
        b32 = b.astype(np.float32)
        up = b32 < b
        b32[up] = np.nextafter(b32[up], np.float32(np.inf))  # round up: the test only gets stricter
        self.bound[rows] = b32


def _prefer_pruned(n: int, dim: int, limit: int) -> bool:
    """algorithm="auto" on the CPU: "pruned" where it was measured to win even on unstructured data.

    Measured single-threaded against the plain vectorised greedy (docs/BENCHMARKS.md, "k-center"): at
    N=50k it is 1.4-3.4x faster from d=32 and 1,024 picks on, but can lose with fewer picks (its set-up
    and its first, wide-cluster picks are not repaid) or fewer dimensions (d=8-16 on Gaussian data).
    """
    return n >= _AUTO_MIN_CANDIDATES and dim >= _AUTO_MIN_DIM and limit >= _AUTO_MIN_PICKS


def _margins(dim: int) -> tuple[float, float, float, float]:
    """Safety margins of the pruned algorithm's skip tests: (factor, cc_rel, keep32, slack_rel).

    Notation: eps64 = 2^-52, u32 = 2^-24; S = |x|^2 + |c|^2 for a candidate x and a centre c (both the
    shifted float64 vectors); "value" = a squared distance as `_kcenter` computes it.

    * float64 values. The norm trick's absolute error is below e64 * S with e64 = 4 (dim + 8) eps64 (the
      dot product's (dim + 2) u64 * 2|x||c| plus the norms' and the additions' roundings, with room to
      spare). A value that is not refined is >= _NEAR * S, so its relative error is below
      rel = e64 / _NEAR; refined ones are far more accurate.
    * Triangle test, skip iff low >= factor * rad2. With r^2 <= rad2 (1 + rel) the true squared radius and
      |c - a| >= (2 + h) r for h = 2 rel, every member x has |x - c| >= (1 + h) |x - a|, hence a computed
      value for c above its stored value for a. (2 + h)^2 (1 + rel) < 4 (1 + 4 rel): factor uses
      4 (1 + 16 rel + 1e-6). `low` is the norm trick for |c - a|^2 less cc_rel * (|a|^2 + |c|^2), cc_rel = e64,
      so low <= |c - a|^2.
    * float32 screen, skip iff fl32(g + cc32) >= bound, with g the float32 product x32 . (-2 c32) of the
      rounded vectors, cc32 <= keep32 |c|^2 and bound >= mind2 - keep32 |x|^2 + slack, keep32 = 1 - e.
      The product's error against -2 x . c (rounding the vectors: 2.02 u32 S; the float32 dot product:
      (dim + 2) u32 * 1.01 S; the final addition: 2 u32 S) is below e32 S, e32 = 1.1 (dim + 8) u32. Then
      |x - c|^2 >= |x|^2 + |c|^2 + g - e32 S - e64 S >= mind2 + (e - e32 - e64) S + slack, and the float64
      value is at least that less another e64 S: with e = e32 + 2 e64 it is >= mind2, so it would not
      have lowered mind2. Forming bound and cc32 in float64 rounds too, by a few eps64 * (mind2 + S); a
      skip is only possible where mind2 is below about 2 S, so another 2 e64 covers it: e = e32 + 4 e64.
      slack (1e-12 of the largest squared norm) covers float32 underflow, which the relative analysis
      ignores; the screen is off for data scales where float32 could overflow (see `_Pruned`).
    """
    eps64 = float(np.finfo(np.float64).eps)
    u32 = 2.0**-24
    e64 = 4.0 * (dim + 8) * eps64
    rel = e64 / _NEAR
    e32 = 1.1 * (dim + 8) * u32
    return 4.0 * (1.0 + 16.0 * rel + 1e-6), e64, 1.0 - (e32 + 4.0 * e64), 1e-12


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the body with the process's BLAS (numpy's OpenBLAS) on one thread; the previous limits are restored.

    The pruned algorithm makes many small BLAS calls (a few thousand rows each). OpenBLAS runs them on
    all cores, and on a machine whose cores are busy, waking its threads costs milliseconds per call
    (measured: a 16k x 32 float32 product 8 ms instead of 0.3 ms), far more than the work. threadpoolctl
    finds the BLAS libraries loaded in the process, sets their thread counts to 1 and puts the previous
    counts back on exit (nested calls restore in order). The setting is process-wide: two sampling runs
    in different threads of one process would share it (the daemon runs one at a time).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _kcenter_pruned(
    cand: np.ndarray,
    pool: np.ndarray | None,
    n_samples: int | None,
    min_distance: float | None,
    rng: np.random.Generator,
    stats: dict[str, int] | None = None,
) -> tuple[list[int], list[float], str]:
    """`_kcenter` with the numpy backend, computing only the distances that can matter (see `_Pruned`).

    The pool is folded in as in `_kcenter` (same code, same BLAS threading); the picks run with BLAS on
    one thread (see `_one_blas_thread`).
    """
    n = cand.shape[0]
    limit = n if n_samples is None else min(n_samples, n)
    state = _Pruned(cand, pool, limit + 1)
    picks: list[int] = []
    dists: list[float] = []
    try:
        with _one_blas_thread():
            return _pick_loop(state, picks, dists, n_samples, min_distance, rng, n, limit)
    finally:
        if stats is not None:
            stats.update(picks=len(picks), n=n, evaluated=state.evaluated, screened=state.screened,
                         clusters=state.k, batches=state.batches)


def _pick_loop(
    state: _Pruned, picks: list[int], dists: list[float], n_samples: int | None, min_distance: float | None,
    rng: np.random.Generator, n: int, limit: int,
) -> tuple[list[int], list[float], str]:
    """The loop of `_kcenter`, with `_Pruned` doing the picking and the updates."""
    while True:
        if n_samples is not None and len(picks) >= n_samples:
            return picks, dists, "n_samples"
        if len(picks) == n:
            return picks, dists, "exhausted"
        if state.k == 0:
            new, dist, stop = [int(rng.integers(n))], [math.inf], None
        else:
            new, dist, stop = state.pick(limit - len(picks), min_distance)
            if stop is not None:
                return picks, dists, stop
        picks.extend(new)
        dists.extend(dist)
        if len(new) == 1 and dist[0] > 0.0 and len(picks) < limit:  # no update after the 0-ties
            state.add_centre(new[0], limit - len(picks))


def _fold_pool(
    be: _Backend, x: Any, sqn: Any, max_sqn: float, mean: Any, pool: np.ndarray, mind2: Any, assign: Any = None
) -> None:
    """Lower mind2 to each candidate's squared distance to its nearest pool member.

    Works tile by tile (candidate rows x pool columns, at most `be.tile_bytes`), so memory stays bounded
    whatever P is; small tiles also keep the element-wise passes in cache, which on the CPU is 4-5x faster
    than one N x block matrix. Only the row minima are needed, so near pairs are looked for (and recomputed
    directly) only in rows whose approximate minimum is small.

    With `assign` (an int array of length N, numpy only) it also records for each candidate the pool row
    that gave its minimum (the first such row in the block that lowered it); `mind2` is the same either way.
    """
    xp = be.xp
    n = x.shape[0]
    width = min(pool.shape[0], _POOL_COLUMNS)
    height = max(1, be.tile_bytes // (8 * width))
    for c0 in range(0, pool.shape[0], width):
        centres = be.array(pool[c0 : c0 + width])
        centres -= mean
        cn = xp.einsum("ij,ij->i", centres, centres)
        if not bool(xp.isfinite(cn).all()):
            raise SamplingError("pool contains NaN or infinite values (or values too large to square)")
        near = _NEAR * (max_sqn + float(cn.max()))  # bounds _NEAR * (||x||^2 + ||c||^2) for every pair
        scaled = centres * -2.0
        for r0 in range(0, n, height):
            rows = slice(r0, min(n, r0 + height))
            d2 = x[rows] @ scaled.T  # + ||x||^2 is added to the row minima only
            d2 += cn[None, :]
            best = xp.amin(d2, 1)
            if assign is not None:
                # fl(a + s) is monotonic in a, so the row of the smallest d2 also gives the smallest d2 + s.
                arg = d2.argmin(1)
            best += sqn[rows]
            close = xp.where(best < near)[0]
            if len(close):
                sub = d2[close]
                sub += sqn[rows][close][:, None]
                ri, ci = xp.where(sub < near)
                _refine(be, sub, (ri, ci), x[rows][close], ri, centres, ci)
                best[close] = xp.amin(sub, 1)
                if assign is not None:
                    arg[close] = sub.argmin(1)
            seg = mind2[rows]
            if assign is not None:
                lower = best < seg
                assign[rows][lower] = arg[lower] + c0
            xp.minimum(seg, best, out=seg)


def _refine(be: _Backend, out: Any, at: tuple[Any, ...], a: Any, ai: Any, b: Any, bi: Any | None) -> None:
    """out[at] = ||a[ai] - b[bi]||^2 computed directly, row by row (b itself when bi is None).

    Works in chunks so that the gathered rows stay within `be.tile_bytes`.
    """
    step = max(1, be.tile_bytes // (8 * max(1, a.shape[1])))
    for s in range(0, len(ai), step):
        diff = a[ai[s : s + step]]
        diff -= b if bi is None else b[bi[s : s + step]]
        out[tuple(i[s : s + step] for i in at)] = be.xp.einsum("ij,ij->i", diff, diff)


# --- argument checks and backend choice -------------------------------------------------------------------


def _as_matrix(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise SamplingError(f"{name} must be a 2-D array (rows x dimensions), got shape {arr.shape}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise SamplingError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr


def _check_count_arg(value: Any, name: str) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral) or value < 0:
        raise SamplingError(f"{name} must be an int >= 0, got {value!r}")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, Integral) or seed < 0:
        raise SamplingError(f"seed must be an int >= 0, got {seed!r}")


def _check_device(device: Any) -> None:
    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise SamplingError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")


def _select_backend(device: str) -> _Backend:
    # numpy, not torch, on the CPU. The per-pick loop (gemv, norm trick, running min, argmax) measured on a
    # 2-core x86 box, numpy 2.4 / OpenBLAS vs torch 2.14, N=200k, d=32, k=1000 picks: float64 numpy 1.46 s,
    # torch 1.98 s (float32: numpy 0.72 s, torch 1.54 s).
    if device == "cpu" or (device == "auto" and not gpu_possible()):
        return _Backend(np)
    import torch  # lazily: only CUDA, and "auto" where a GPU could be found, need it

    if device == "auto":
        return _Backend(torch, torch.device("cuda")) if torch.cuda.is_available() else _Backend(np)
    if not torch.cuda.is_available():
        raise SamplingError(f"device={device!r} was requested but torch sees no CUDA device")
    dev = torch.device(device)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SamplingError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return _Backend(torch, dev)
