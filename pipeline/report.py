"""The report of a sampling run: report.pdf, report.json (every number the PDF shows) and plots/*.png.

Built from the run folder (its CSVs hold the vectors exactly as the run used them) and the store (the
run's row and decisions), so `poolwatch report RUN` can rebuild it at any time. Memory: pairwise
distance statistics use at most `memory_requirement_in_GB`; beyond it they are computed on a seeded
random subsample, and the report says so.

Figures are drawn with matplotlib's object API (a `Figure` on its own Agg canvas, `PdfPages` for the PDF):
no pyplot, no backend switch, no figure registry, so building a report touches no process-wide state and
may run in any thread.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import replacing, replacing_path
from .errors import UsageError
from .export import Naming, StoreNaming, read_embeddings_csv
from .store import Store

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MATRIX_OVERHEAD = 1  # n x n float32s: the condensed distances (half) and the copy a percentile makes (half)
BLOCK_BYTES = 32 * 1024**2  # the row block of distances computed at a time
PAGE = (8.27, 11.69)  # A4 portrait, inches
NEAR_GROUPS_SHOWN = 8  # near-duplicate groups on their page: the largest, then those with the closest copy
NEAR_COPIES_SHOWN = 5  # copies beside each original, closest first
NEAR_THUMB = 160  # px: the near-duplicate page holds up to 8 x 6 thumbnails


class ReportError(UsageError):
    """The report cannot be built (run unknown, run folder gone, ...)."""


@dataclass
class DistanceStats:
    points: int  # points the statistics cover
    of_points: int  # points there were
    subsampled: bool
    distances: np.ndarray  # condensed pairwise distances (for the histogram)

    def summary(self) -> dict[str, Any]:
        d = self.distances
        out: dict[str, Any] = {"points": self.points, "of_points": self.of_points, "subsampled": self.subsampled,
                               "count": int(d.size)}
        if d.size:
            p10, p90 = np.percentile(d, [10, 90])  # one copy of d, not two
            out.update(mean=float(d.mean(dtype=np.float64)), min=float(d.min()), max=float(d.max()),
                       p10=float(p10), p90=float(p90))
        else:
            out.update(mean=None, min=None, max=None, p10=None, p90=None)
        return out


def max_points(memory_gb: float) -> int:
    """Largest n whose n×n float32 distance work fits in the memory budget."""
    return max(2, int(math.sqrt(memory_gb * 1024**3 / (4 * MATRIX_OVERHEAD))))


def pairwise_stats(vectors: np.ndarray, memory_gb: float, seed: int) -> DistanceStats:
    n = len(vectors)
    limit = max_points(memory_gb)
    subsampled = n > limit
    if subsampled:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
        vectors = vectors[idx]
    x = vectors.astype(np.float32, copy=False)
    if len(x) < 2:
        return DistanceStats(len(x), n, subsampled, np.zeros(0, np.float32))
    return DistanceStats(len(x), n, subsampled, condensed_distances(x))


def condensed_distances(x: np.ndarray) -> np.ndarray:
    """The upper triangle of the pairwise L2 distances, row by row (scipy's `pdist` order), in float32,
    computed in row blocks of BLOCK_BYTES: the only n^2 memory is the result itself."""
    m = len(x)
    sq = np.einsum("ij,ij->i", x, x)
    out = np.empty(m * (m - 1) // 2, np.float32)
    rows = max(1, BLOCK_BYTES // (4 * m))
    pos = 0
    for r0 in range(0, m - 1, rows):
        r1 = min(m - 1, r0 + rows)
        d = x[r0:r1] @ x[r0 + 1:].T  # column j is point r0 + 1 + j: only the upper triangle is computed
        d *= -2
        d += sq[r0:r1, None]
        d += sq[None, r0 + 1:]
        np.maximum(d, 0, out=d)
        np.sqrt(d, out=d)
        for i in range(r1 - r0):
            seg = d[i, i:]
            out[pos:pos + seg.size] = seg
            pos += seg.size
    return out


def nearest(queries: np.ndarray, refs: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each query its nearest ref (index, distance), in blocks (never a full Q×R matrix)."""
    idx = np.zeros(len(queries), np.int64)
    dist = np.full(len(queries), np.inf, np.float32)
    if len(refs) == 0:
        return idx, dist
    rsq = np.einsum("ij,ij->i", refs, refs)
    for s in range(0, len(queries), block):
        q = queries[s:s + block]
        d2 = np.einsum("ij,ij->i", q, q)[:, None] + rsq[None, :] - 2 * (q @ refs.T)
        j = d2.argmin(axis=1)
        idx[s:s + block] = j
        dist[s:s + block] = np.sqrt(np.maximum(d2[np.arange(len(q)), j], 0))
    return idx, dist


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    if len(vectors) < 2:
        return np.zeros((len(vectors), 2), np.float32)
    centered = vectors - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    comps = vt[:2] if vt.shape[0] >= 2 else np.vstack([vt, np.zeros_like(vt)])
    projected: np.ndarray = centered @ comps.T
    return projected


def _load_csv(path: Path) -> tuple[list[str], np.ndarray]:
    if not path.exists():
        return [], np.zeros((0, 0), np.float32)
    data = read_embeddings_csv(path)
    return data.filenames, data.vectors


def build_report(store: Store, run_id: int, *, memory_gb: float | None = None, n_examples: int | None = None,
                 seed: int = 0, roots: list[str] | None = None) -> dict[str, Any]:
    """Write report.pdf, report.json and plots/ into the run's folder; returns the JSON data."""
    run = store.run(run_id)
    if run is None:
        raise ReportError(f"no run {run_id} in the store")
    if run["status"] != "ok" or not run["output_dir"] or not Path(run["output_dir"]).is_dir():
        raise ReportError(f"run {run_id} has no output folder (status {run['status']})")
    out = Path(run["output_dir"])
    config = json.loads(run["config"])
    stats = json.loads(run["stats"] or "{}")
    memory_gb = float(memory_gb if memory_gb is not None else config.get("memory_requirement_in_GB", 2))
    n_examples = int(n_examples if n_examples is not None else config.get("n_example_images", 6))
    roots = roots if roots is not None else config.get("input_dir", [])
    roots = [str(Path(r).expanduser().resolve()) for r in roots]

    cand_names, cand = _load_csv(out / "data" / "embeddings.csv")
    sel_names, sel = _load_csv(out / "data" / "selected_embeddings.csv")
    incl_names, incl = _load_csv(out / "data" / "selected_embeddings_including_datapool.csv")
    if not incl_names:
        incl_names, incl = sel_names, sel
    sel_set = set(sel_names)
    pool_mask = np.array([n not in sel_set for n in incl_names], bool)
    removed_mask = np.array([n not in sel_set for n in cand_names], bool)
    corrupt = json.loads((out / "filenames" / "corrupt_filenames.json").read_text(encoding="utf-8"))
    duplicates = json.loads((out / "filenames" / "duplicate_filenames.json").read_text(encoding="utf-8"))
    near = _near_duplicates(out, config)
    model = store.model(run["model_id"]) if run["model_id"] else None
    decisions = [d for d in store.decisions(run_id) if d["selected"]]

    before = pairwise_stats(cand, memory_gb, seed)
    after = pairwise_stats(incl, memory_gb, seed + 1)
    removed_vecs = cand[removed_mask] if len(cand) else cand
    removed_names = [n for n, r in zip(cand_names, removed_mask, strict=True) if r]
    nn_idx, nn_dist = nearest(removed_vecs, incl) if len(removed_vecs) and len(incl) else (np.zeros(0, int), np.zeros(0))
    order = np.argsort(nn_dist, kind="stable")[: n_examples // 2]
    pairs = [{"removed": removed_names[i], "retained": incl_names[int(nn_idx[i])], "distance": float(nn_dist[i])}
             for i in order]
    farthest = [{"retained": sel_names[i], "rank": i,
                 "distance_at_pick": decisions[i]["distance"] if i < len(decisions) else None}
                for i in range(min(n_examples // 2, len(sel_names)))]

    min_distance = config.get("stopping_condition", {}).get("min_distance", -1)
    started, finished = run["started"], run["finished"]
    data: dict[str, Any] = {
        "run": {"id": run_id, "trigger": run["trigger"], "method": run["method"], "pool": run["pool"],
                "started": _iso(started), "finished": _iso(finished),
                "duration_seconds": (finished - started) if finished else None, "stop_reason": run["stop_reason"],
                "output_dir": str(out)},
        "stages_seconds": {**({"ingest": stats["ingest"]["seconds"]} if "ingest" in stats else {}), **stats.get("stages", {})},
        "images": {"seen": sum(store.counts_by_status().values()), "by_status": store.counts_by_status(),
                   "corrupt_by_reason": _count_reasons(corrupt), "duplicates": len(duplicates)},
        "candidates": run["n_candidates"], "selected": run["n_selected"],
        "pool_before": int(pool_mask.sum()), "pool_after": len(incl_names) if run["pool"] else None,
        "preselected": stats.get("preselected", 0),
        "model": None if model is None else {"source": model.source, "detail": model.detail, "dim": model.dim,
                                             "input_size": model.input_size, "arch": model.arch,
                                             "random_init": model.source == "random"},
        "compute_efficiency": stats.get("compute_efficiency"),
        "normalized": stats.get("normalized"),
        "min_distance": None if min_distance in (-1, None) else float(min_distance),
        "distances_before": before.summary(),
        "distances_after": after.summary(),
        "memory_requirement_in_GB": memory_gb,
        "examples": {"closest_removed": pairs, "farthest_retained": farthest},
        "corrupt_files": [{"file": k, **v} for k, v in corrupt.items()],
        "duplicate_groups": _groups(duplicates),
        "near_duplicates": near,
        "config": config,
    }
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    _render(data, before, after, cand, incl, removed_mask, pool_mask, cand_names, incl_names, sel_set, out,
            _naming(store, run, roots), roots)
    with replacing(out / "report.json", "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=1, ensure_ascii=False, default=str))
    return data


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts).isoformat(timespec="seconds") if ts else None


def _count_reasons(corrupt: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in corrupt.values():
        counts[v.get("reason") or "unknown"] = counts.get(v.get("reason") or "unknown", 0) + 1
    return dict(sorted(counts.items()))


def _groups(duplicates: dict[str, str]) -> dict[str, Any]:
    groups: dict[str, list[str]] = {}
    for dup, original in duplicates.items():
        groups.setdefault(original, []).append(dup)
    first = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:10]
    return {"count": len(groups), "first": [{"original": o, "duplicates": sorted(d)} for o, d in first]}


def _near_duplicates(out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The near-duplicate groups as the run recorded them (filenames/near_duplicate_filenames.json: the state at
    the run, not the store's now): totals, and the groups the report shows - the largest first, then those with
    the closest copy - each with its closest copies. A run folder from before near-duplicate detection has no
    such file: `recorded` is false and the counts are 0."""
    settings = config.get("near_duplicate") or {}
    path = out / "filenames" / "near_duplicate_filenames.json"
    recorded = path.is_file()
    links: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if recorded else {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for copy, link in links.items():
        groups.setdefault(str(link["original"]), []).append({"path": copy, "distance": link.get("distance")})

    def closest(copy: dict[str, Any]) -> float:
        d = copy["distance"]
        return math.inf if d is None else float(d)

    for copies in groups.values():
        copies.sort(key=lambda c: (closest(c), c["path"]))
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), closest(kv[1][0]), kv[0]))
    return {"groups": len(groups), "images": sum(len(c) for c in groups.values()), "recorded": recorded,
            "threshold": settings.get("threshold"), "exclude_from_candidates": settings.get("exclude_from_candidates"),
            "first": [{"original": o, "copies": len(c), "duplicates": c[:NEAR_COPIES_SHOWN]}
                      for o, c in ordered[:NEAR_GROUPS_SHOWN]]}


# ---- rendering -----------------------------------------------------------------------------------
def _render(data: dict[str, Any], before: DistanceStats, after: DistanceStats, cand: np.ndarray, incl: np.ndarray,
            removed_mask: np.ndarray, pool_mask: np.ndarray, cand_names: list[str], incl_names: list[str],
            sel_set: set[str], out: Path, naming: StoreNaming, roots: list[str]) -> None:
    from matplotlib.backends.backend_pdf import PdfPages

    figs = {
        "distance_distr_before": _histogram(before, data["min_distance"], "Pairwise distances of the candidates (before)"),
        "distance_distr_after": _histogram(after, data["min_distance"], "Pairwise distances of pool ∪ selected (after)"),
        "embedding_scatter": _scatter(cand, incl, removed_mask, pool_mask),
    }
    for name, fig in figs.items():
        fig.savefig(out / "plots" / f"{name}.png", dpi=110)
    examples = _examples(data, naming, roots)
    if examples is not None:
        examples.savefig(out / "plots" / "examples.png", dpi=110)
    near = _near_page(data["near_duplicates"], naming, roots)
    if near is not None:
        near.savefig(out / "plots" / "near_duplicates.png", dpi=110)
    pages = [_summary_page(data), figs["distance_distr_before"], figs["distance_distr_after"],
             figs["embedding_scatter"]]
    if examples is not None:
        pages.append(examples)
    if near is not None:
        pages.append(near)
    pages.append(_tables_page(data))
    with replacing_path(out / "report.pdf") as tmp, PdfPages(tmp) as pdf:
        for fig in pages:
            pdf.savefig(fig)
        info = pdf.infodict()
        info["Title"] = f"poolwatch sampling run {data['run']['id']}"
        info["Creator"] = "poolwatch"
    data["pdf_pages"] = len(pages)


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas: nothing registered with pyplot, freed with its last reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _text_page(title: str, lines: list[str], size: float = 9.0) -> Figure:
    fig = _figure(PAGE)
    fig.text(0.07, 0.95, title, fontsize=15, weight="bold", va="top")
    fig.text(0.07, 0.91, "\n".join(lines), fontsize=size, va="top", family="monospace")
    return fig


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _summary_page(data: dict[str, Any]) -> Figure:
    r, img, m = data["run"], data["images"], data["model"]
    lines = [
        f"run {r['id']}  trigger {r['trigger']}  method {r['method']}  pool {r['pool'] or '(none: standalone)'}",
        f"started {r['started']}   finished {r['finished']}   duration {_fmt(r['duration_seconds'])} s",
        "stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in data["stages_seconds"].items()),
        "",
        f"images seen        {img['seen']}   ({', '.join(f'{k} {v}' for k, v in img['by_status'].items())})",
        f"corrupt by reason  {', '.join(f'{k} {v}' for k, v in img['corrupt_by_reason'].items()) or 'none'}",
        f"exact duplicates   {img['duplicates']}",
        f"near duplicates    {_near_summary(data['near_duplicates'])}",
        f"candidates         {data['candidates']}",
        f"selected           {data['selected']}   (stopped by {r['stop_reason']})",
        f"pool before/after  {data['pool_before']} -> {data['pool_after'] if data['pool_after'] is not None else '-'}",
        f"compute efficiency {_fmt(data['compute_efficiency'], 3)}",
        "",
    ]
    if m:
        lines.append(f"model              {m['arch'].get('name')} d{m['dim']} @{m['input_size']}px, source {m['source']}")
        lines.append(f"                   {textwrap.shorten(str(m['detail']), 70)}")
    for key, label in (("distances_before", "before"), ("distances_after", "after")):
        s = data[key]
        lines.append(f"L2 distances {label:<6} n={s['count']} mean={_fmt(s['mean'])} min={_fmt(s['min'])} "
                     f"max={_fmt(s['max'])} p10={_fmt(s['p10'])} p90={_fmt(s['p90'])}")
        if s["subsampled"]:
            lines.append(f"   subsampled: {s['points']} of {s['of_points']} points "
                         f"(memory_requirement_in_GB={data['memory_requirement_in_GB']})")
    lines += ["", "resolved configuration (token masked):"]
    cfg = {k: v for k, v in data["config"].items() if k != "lightly"}
    lines += [textwrap.shorten(f"  {k}: {json.dumps(v)}", 95) for k, v in cfg.items()]
    fig = _text_page(f"poolwatch sampling run {r['id']}", lines, 8.0)
    if m and m["random_init"]:
        fig.text(0.07, 0.035, "WARNING: embeddings come from RANDOM weights - distances carry little meaning.\n"
                 "Give checkpoint=PATH, lightly's pretrained weights, or enable_training=true.",
                 color="darkred", fontsize=10, weight="bold")
    return fig


def _histogram(stats: DistanceStats, min_distance: float | None, title: str) -> Figure:
    fig = _figure((8.27, 5.5))
    ax = fig.subplots()
    d = stats.distances
    if d.size:
        counts, edges = np.histogram(d, bins=min(100, max(10, int(math.sqrt(d.size)))))  # no copy of d
        ax.hist(edges[:-1], bins=edges.tolist(), weights=counts, color="steelblue", log=True)
    else:
        ax.text(0.5, 0.5, "fewer than 2 points: no pairwise distances", ha="center", va="center", transform=ax.transAxes)
    if min_distance is not None:
        ax.axvline(min_distance, color="crimson", linestyle="--", label=f"min_distance = {min_distance:g}")
        ax.legend()
    note = f" (subsample of {stats.points} of {stats.of_points} points)" if stats.subsampled else ""
    ax.set_title(title + note, fontsize=11)
    ax.set_xlabel("L2 distance")
    ax.set_ylabel("pairs (log scale)")
    fig.tight_layout()
    return fig


def _scatter(cand: np.ndarray, incl: np.ndarray, removed_mask: np.ndarray, pool_mask: np.ndarray,
             limit: int = 20_000) -> Figure:
    fig = _figure((8.27, 6.5))
    ax = fig.subplots()
    # Drawn in this order so the selected points stay visible on top.
    parts = [(cand[removed_mask] if len(cand) else cand, "removed", "#1f77b4"),
             (incl[pool_mask] if len(incl) else incl, "pool", "#999999"),
             (incl[~pool_mask] if len(incl) else incl, "newly selected", "#d62728")]
    parts = [(v, label, c) for v, label, c in parts if len(v)]
    if parts:
        rng = np.random.default_rng(0)
        proj = pca_2d(np.vstack([v for v, _, _ in parts]))
        offsets = np.cumsum([0] + [len(v) for v, _, _ in parts[:-1]])
        for (v, label, color), s in zip(parts, offsets, strict=True):
            pts = proj[s:s + len(v)]
            if len(pts) > limit:
                pts = pts[rng.choice(len(pts), limit, replace=False)]
            ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.7, label=f"{label} ({len(v)})", color=color)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no embeddings", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Embeddings, first two principal components", fontsize=11)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    return fig


def _naming(store: Store, run: dict[str, Any], roots: list[str]) -> StoreNaming:
    """The run's output names (export.StoreNaming): its node's input dirs from the run's configuration."""
    own = str(run.get("node") or store.node)
    nodes = {node: Naming.for_roots(node_roots) for node, node_roots in store.node_roots().items()}
    nodes[own] = Naming.for_roots(roots)
    return StoreNaming(own, nodes)


def _thumb(naming: StoreNaming, roots: list[str], name: str, size: int = 256) -> np.ndarray | None:
    """A thumbnail of an image this node holds (another node's files are not readable here: None)."""
    from PIL import Image, ImageOps

    try:
        parsed = naming.parse(name)
        if parsed is None or parsed[0] != naming.own:
            return None
        with Image.open(Path(parsed[1]) / parsed[2]) as source:
            source.draft("RGB", (size, size))
            im = ImageOps.exif_transpose(source).convert("RGB")
            im.thumbnail((size, size))
            return np.asarray(im)
    except Exception:  # noqa: BLE001 - a thumbnail that cannot be made is shown as missing
        return None


def _examples(data: dict[str, Any], naming: StoreNaming, roots: list[str]) -> Figure | None:
    pairs = data["examples"]["closest_removed"]
    picks = data["examples"]["farthest_retained"]
    if not pairs and not picks:
        return None
    rows = len(pairs) + math.ceil(len(picks) / 2)
    fig = _figure(PAGE)
    axes = fig.subplots(rows, 2, squeeze=False)
    fig.suptitle("Removed images beside their nearest retained image (closest first),\nthen the first picks "
                 "(farthest from everything before them)", fontsize=11)
    for r, pair in enumerate(pairs):
        _show(axes[r][0], _thumb(naming, roots, pair["removed"]),
              f"removed: {textwrap.shorten(pair['removed'], 45)}\ndistance to nearest retained {pair['distance']:.4g}")
        _show(axes[r][1], _thumb(naming, roots, pair["retained"]), f"retained: {textwrap.shorten(pair['retained'], 45)}")
    for k, pick in enumerate(picks):
        dist = pick["distance_at_pick"]
        _show(axes[len(pairs) + k // 2][k % 2], _thumb(naming, roots, pick["retained"]),
              f"pick {pick['rank'] + 1}: {textwrap.shorten(pick['retained'], 40)}\n"
              + ("first pick (seeded)" if dist is None else f"distance at pick {dist:.4g}"))
    if len(picks) % 2:
        axes[-1][1].axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def _near_summary(near: dict[str, Any]) -> str:
    if not near["recorded"]:
        return "not recorded by this run"
    if near["threshold"] == -1 and not near["images"]:
        return "check off (near_duplicate.threshold=-1)"
    kept = "left out of the candidates" if _near_excluded(near) else "kept as candidates"
    return f"{near['images']} in {_plural(near['groups'], 'group')}" + (f" ({kept})" if near["images"] else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _near_excluded(near: dict[str, Any]) -> bool:
    """Whether the run kept near copies out of its candidates (as pipeline/sampling.candidate_filter decides)."""
    return bool(near["exclude_from_candidates"]) and near["threshold"] != -1


def _short(name: str, width: int) -> str:
    """A file name cut to `width` characters keeping its end (the file's own name), not its folders."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _near_page(near: dict[str, Any], naming: StoreNaming, roots: list[str]) -> Figure | None:
    """One row per group: the original (green frame), then its closest copies (orange) with their distance."""
    groups = near["first"]
    if not groups:
        return None
    fig = _figure(PAGE)
    fig.text(0.04, 0.975, "Near-duplicate groups", fontsize=15, weight="bold", va="top")
    shown = f"; the {len(groups)} largest shown" if near["groups"] > len(groups) else ""
    if near["threshold"] == -1:
        rule = "near_duplicate.threshold = -1 (check off): the near copies stayed candidates of this run."
    elif _near_excluded(near):
        rule = ("near_duplicate.exclude_from_candidates = true: the near copies were left out of this run's candidates,\n"
                "the originals stayed candidates.")
    else:
        rule = "near_duplicate.exclude_from_candidates = false: the near copies stayed candidates of this run."
    copies = "1 near copy" if near["images"] == 1 else f"{near['images']} near copies"
    lines = [f"{_plural(near['groups'], 'group')}, {copies} in total{shown} "
             "(all of them: filenames/near_duplicate_filenames.json).",
             f"Each row: the original (earliest-seen image, green) and its near copies (orange), closest first; "
             f"d = L2 distance\nto the neighbour found (threshold: near_duplicate.threshold = {near['threshold']}).",
             rule]
    fig.text(0.04, 0.945, "\n".join(lines), fontsize=8, va="top", linespacing=1.4)
    cols = 1 + NEAR_COPIES_SHOWN
    grid = fig.add_gridspec(NEAR_GROUPS_SHOWN, cols, left=0.03, right=0.985, top=0.835, bottom=0.02,
                            wspace=0.15, hspace=0.6)
    for r, group in enumerate(groups):
        n = group["copies"]
        ax = fig.add_subplot(grid[r, 0])
        _show(ax, _thumb(naming, roots, group["original"], NEAR_THUMB),
              f"{_short(group['original'], 20)}\noriginal, {n} cop{'y' if n == 1 else 'ies'}")
        _frame(ax, "seagreen")
        for c, copy in enumerate(group["duplicates"], start=1):
            d = copy["distance"]
            ax = fig.add_subplot(grid[r, c])
            _show(ax, _thumb(naming, roots, copy["path"], NEAR_THUMB),
                  f"{_short(copy['path'], 20)}\nd = {'-' if d is None else f'{d:.4g}'}")
            _frame(ax, "darkorange")
    return fig


def _frame(ax: Axes, color: str) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(1.5)


def _show(ax: Axes, image: np.ndarray | None, title: str) -> None:
    if image is not None:
        ax.imshow(image)
    else:
        ax.text(0.5, 0.5, "(image not\navailable)", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _tables_page(data: dict[str, Any], limit: int = 45) -> Figure:
    corrupt = data["corrupt_files"]
    lines = [f"corrupt files: {len(corrupt)}"]
    lines += [f"  {textwrap.shorten(c['file'], 55):<56} {c['reason']}" for c in corrupt[:limit]]
    if len(corrupt) > limit:
        lines.append(f"  ... and {len(corrupt) - limit} more (filenames/corrupt_filenames.json)")
    groups = data["duplicate_groups"]
    lines += ["", f"duplicate groups: {groups['count']} (first {len(groups['first'])})"]
    for g in groups["first"]:
        lines.append(f"  {textwrap.shorten(g['original'], 50)} <- {len(g['duplicates'])}: "
                     + textwrap.shorten(", ".join(g["duplicates"]), 50))
    return _text_page("Corrupt files and exact duplicates", lines, 8.0)
