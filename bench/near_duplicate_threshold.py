"""The rule behind `near_duplicate.threshold=auto`, measured on real photos under several models.

    .venv/bin/pip install scikit-image           # first: its wheel ships the photographs used here
    nice -n 10 .venv/bin/python bench/near_duplicate_threshold.py
    nice -n 10 .venv/bin/python bench/near_duplicate_threshold.py --checkpoint /tmp/pq.ckpt   # + a trained SimCLR
    .venv/bin/python bench/near_duplicate_threshold.py --smoke                               # seconds: the script works

Data (offline): the 21 real photographs of bench/precision_quality.py's `source_photos()` (scikit-image's and
scikit-learn's wheels), each centre-cropped to 4:3 and resized (bicubic) to 640x480, saved as JPEG quality 90: the
"originals", 21 different photos. Two of them, motorcycle_left/right, are the two views of a stereo pair (the same
scene a few centimetres apart, like a burst): reported on their own, not among the distinct pairs (209 of 210).

Per original:
  - its copies from `pipeline.near_threshold.copies_of` (the ones a calibration makes);
  - held-out copies a calibration never makes: 33 % (bilinear) + JPEG q50, JPEG q35, 50 % (bicubic) + PNG:
    resized / recompressed near-duplicates a little further than the calibration's own, which the margin is
    there to catch;
  - edits (for information): brightness +10 % (q85), 4 % border trimmed (q85);
  - crops of the same photo (for information: near-duplicates by construction): 80 %, 50 % and 25 % of the
    area, aspect kept, a seeded position, resized back to 640x480, JPEG q90.
Distances: L2 between the vectors lookups use (normalised: `pipeline.sampling.normalize`, the default
normalize_embeddings=true; raw: false). "Distinct": the distance from a photo to the nearest other photo, and
every pair of different photos.

Models, each through the path a store would use (pixels from `check.inspect_image` + `decode.preprocess` with
the engine's decode mode and input size, as `read_and_decode` makes them):
  (a) poolwatch's default offline model: lightly's resnet-18 (num_ftrs 32, input 64) with seeded random-init
      weights, OpenVINO, `embedding_precision=auto` (what a new store picks on this CPU) and fp32;
  (b) with --checkpoint: a SimCLR resnet-18 (bench/precision_quality.py's ARCH) trained by poolwatch's trainer
      (trained there first, ~5 min, when the file does not exist);
  (c) torchvision's resnet18, random init (seed 0), 512-d pooled features, 224 input, ImageNet mean/std, torch:
      the scale of a user's own model (model.onnx), which differs from lightly's.

Thresholds: `pipeline.near_threshold.calibrate` on --samples random samples (seeded) of 10 of the 21 originals
with their copies, as a store of 10 images would calibrate; each threshold is scored on all 21 photos: copies
caught (distance < threshold), held-out copies caught, crops caught, distinct pairs wrongly linked.
Calibration cost: a store's calibration of SAMPLE_IMAGES 640x480 JPEGs with the default engine (read, copies_of,
decode, embed, calibrate), median of 3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402
from precision_quality import ARCH, make_crops, source_photos, train  # noqa: E402

SIZE = (640, 480)
SAMPLE = 10
BATCH = 64
STEREO = ("motorcycle_left", "motorcycle_right")
CROP_AREAS = (0.8, 0.5, 0.25)
HELD_OUT = ("33% q50", "q35", "50% png")
EDITS = ("bright+10% q85", "trim 4% q85")

Embed = Callable[[list[bytes]], np.ndarray]


# ---- images ----------------------------------------------------------------------------------------------

def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def camera_size(arr: np.ndarray) -> Image.Image:
    """The photo centre-cropped to 4:3 and resized to 640x480."""
    img = Image.fromarray(arr, "RGB")
    w, h = img.size
    if w * 3 > h * 4:
        cw, ch = h * 4 // 3, h
    else:
        cw, ch = w, w * 3 // 4
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img.crop((x0, y0, x0 + cw, y0 + ch)).resize(SIZE, Image.Resampling.BICUBIC)


def held_out(img: Image.Image) -> list[bytes]:
    w, h = img.size
    buf = io.BytesIO()
    img.resize((w // 2, h // 2), Image.Resampling.BICUBIC).save(buf, "PNG")
    return [jpeg(img.resize((round(w / 3), round(h / 3)), Image.Resampling.BILINEAR), 50), jpeg(img, 35), buf.getvalue()]


def edits(img: Image.Image) -> list[bytes]:
    w, h = img.size
    dx, dy = round(w * 0.04), round(h * 0.04)
    return [jpeg(ImageEnhance.Brightness(img).enhance(1.1), 85), jpeg(img.crop((dx, dy, w - dx, h - dy)), 85)]


def crops(img: Image.Image, rng: np.random.Generator) -> list[bytes]:
    w, h = img.size
    out = []
    for area in CROP_AREAS:
        cw, ch = round(w * area**0.5), round(h * area**0.5)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out.append(jpeg(img.crop((x0, y0, x0 + cw, y0 + ch)).resize(SIZE, Image.Resampling.BICUBIC)))
    return out


@dataclass
class Data:
    names: list[str]
    originals: list[bytes]
    copies: list[list[bytes]]  # per original: copies_of
    held: list[list[bytes]]
    edits: list[list[bytes]]
    crops: list[list[bytes]]


def make_data(smoke: bool) -> Data:
    from poolwatch.pipeline.near_threshold import copies_of

    photos = source_photos()
    if smoke:
        photos = photos[:12]
    rng = np.random.default_rng(0)
    data = Data([], [], [], [], [], [])
    for name, arr in photos:
        img = camera_size(arr)
        original = jpeg(img)
        data.names.append(name)
        data.originals.append(original)
        data.copies.append(copies_of(original))
        decoded = Image.open(io.BytesIO(original)).convert("RGB")  # copies are made from the file, as a store makes them
        data.held.append(held_out(decoded))
        data.edits.append(edits(decoded))
        data.crops.append(crops(decoded, rng))
    return data


# ---- models ---------------------------------------------------------------------------------------------

def poolwatch_embedder(work: Path, label: str, overrides: list[str]) -> tuple[Embed, str]:
    from poolwatch.daemon import runtime
    from poolwatch.pipeline.check import inspect_image
    from poolwatch.pipeline.config import load_config
    from poolwatch.pipeline.decode import preprocess
    from poolwatch.pipeline.store import Store

    slug = label.replace(" ", "-")
    config = load_config([f"shared_dir={work / 'shared'}", f"input_dir={work / 'in'}", f"store.path=stores/{slug}.db",
                          "lightly.pre_trained=false", *overrides])
    with Store.open(config.store_path) as store:
        engine = runtime.load_engine(config, store=store)

    def pixels(data: bytes) -> np.ndarray:
        verdict, image = inspect_image(data, "x.jpg" if data[:2] == b"\xff\xd8" else "x.png",
                                       scale_to=None if engine.exact_decode else engine.input_size)
        if image is None or not verdict.ok:
            raise SystemExit(f"{label}: an image did not decode: {verdict}")
        return preprocess(image, engine.input_size)

    def embed(files: list[bytes]) -> np.ndarray:
        x = np.stack([pixels(f) for f in files])
        return np.concatenate([engine.embed(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]).astype(np.float32)

    how = (f"{engine.runtime} {engine.precision}, {'exact' if engine.exact_decode else 'scaled'} decode, "
           f"input {engine.input_size}, {engine.dim}-d")
    return embed, how


def torchvision_embedder() -> tuple[Embed, str]:
    import torch
    import torchvision

    from poolwatch.pipeline.check import inspect_image
    from poolwatch.pipeline.decode import preprocess

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def embed(files: list[bytes]) -> np.ndarray:
        out = []
        for i in range(0, len(files), 32):
            px = []
            for data in files[i:i + 32]:
                _verdict, image = inspect_image(data, "x.jpg" if data[:2] == b"\xff\xd8" else "x.png")
                assert image is not None
                px.append(preprocess(image, 224))
            x = torch.from_numpy(np.stack(px)).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                out.append(net((x - mean) / std).numpy())
        return np.concatenate(out).astype(np.float32)

    return embed, "torch fp32, input 224, 512-d"


# ---- figures ------------------------------------------------------------------------------------------

@dataclass
class Vectors:
    originals: np.ndarray  # (P, d)
    copies: np.ndarray  # (P, C, d)
    held: np.ndarray  # (P, H, d)
    edits: np.ndarray  # (P, E, d)
    crops: np.ndarray  # (P, K, d)


def embed_data(embed: Embed, data: Data) -> Vectors:
    groups = [data.copies, data.held, data.edits, data.crops]
    flat = [*data.originals, *(x for g in groups for xs in g for x in xs)]
    v = embed(flat)
    p, d = len(data.originals), v.shape[1]
    parts, at = [v[:p]], p
    for g in groups:
        n = len(g[0])
        parts.append(v[at:at + p * n].reshape(p, n, d))
        at += p * n
    return Vectors(*parts)


def normalised(v: Vectors) -> Vectors:
    from poolwatch.pipeline.sampling import normalize

    def n(x: np.ndarray) -> np.ndarray:
        return normalize(x.reshape(-1, x.shape[-1])).reshape(x.shape)

    return Vectors(n(v.originals), n(v.copies), n(v.held), n(v.edits), n(v.crops))


def to_owner(x: np.ndarray, originals: np.ndarray) -> np.ndarray:
    """(P, C) distances of each photo's variants to the photo."""
    return np.linalg.norm(x.astype(np.float64) - originals[:, None, :].astype(np.float64), axis=-1)


def pair_distances(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    sq = (x * x).sum(1)
    return np.sqrt(np.maximum(sq[:, None] - 2 * x @ x.T + sq[None, :], 0.0))


def q(values: np.ndarray, p: float) -> float:
    return float(np.quantile(values, p))


def fmt(x: float) -> str:
    return f"{x:.3g}" if x >= 1e-3 else f"{x:.2e}"


@dataclass
class Row:
    label: str
    copy: dict[str, float]
    held: dict[str, float]
    edits: dict[str, float]
    distinct_nn: dict[str, float]
    pairs_min: float
    stereo: float
    crops: dict[float, float]  # area -> median distance
    thresholds: list[float]
    caught_copies: list[float]
    caught_held: list[float]
    caught_edits: list[float]
    caught_crops: dict[float, list[float]]
    wrong_pairs: list[int]
    stereo_linked: int
    rules: list[str]


def measure(label: str, v: Vectors, names: list[str], samples: int, seed: int = 0) -> Row:
    from poolwatch.pipeline.near_threshold import calibrate

    p = len(names)
    copy_d = to_owner(v.copies, v.originals)
    held_d = to_owner(v.held, v.originals)
    edit_d = to_owner(v.edits, v.originals)
    crop_d = to_owner(v.crops, v.originals)
    pairs = pair_distances(v.originals)
    stereo_ij = tuple(names.index(s) for s in STEREO) if all(s in names for s in STEREO) else None
    distinct = pairs.copy()
    np.fill_diagonal(distinct, np.inf)
    if stereo_ij is not None:
        i, j = stereo_ij
        distinct[i, j] = distinct[j, i] = np.inf
    nn = distinct.min(axis=1)
    upper = distinct[np.triu_indices(p, 1)]
    upper = upper[np.isfinite(upper)]
    rng = np.random.default_rng(seed)
    row = Row(label, {"p50": q(copy_d, 0.5), "p95": q(copy_d, 0.95), "max": float(copy_d.max())},
              {"p50": q(held_d, 0.5), "max": float(held_d.max())}, {"p50": q(edit_d, 0.5), "max": float(edit_d.max())},
              {"min": float(nn.min()), "p05": q(nn, 0.05), "p50": q(nn, 0.5)}, float(upper.min()),
              float(pairs[stereo_ij]) if stereo_ij is not None else float("nan"),
              {a: q(crop_d[:, k], 0.5) for k, a in enumerate(CROP_AREAS)}, [], [], [], [], {a: [] for a in CROP_AREAS}, [], 0,
              [])
    c = v.copies.shape[1]
    for _ in range(samples):
        pick = np.sort(rng.choice(p, size=min(SAMPLE, p), replace=False))
        cal = calibrate(v.originals[pick], v.copies[pick].reshape(-1, v.copies.shape[-1]), np.repeat(np.arange(len(pick)), c))
        t = cal.threshold
        row.thresholds.append(t)
        row.rules.append(cal.rule)
        row.caught_copies.append(float((copy_d < t).mean()))
        row.caught_held.append(float((held_d < t).mean()))
        row.caught_edits.append(float((edit_d < t).mean()))
        for k, a in enumerate(CROP_AREAS):
            row.caught_crops[a].append(float((crop_d[:, k] < t).mean()))
        row.wrong_pairs.append(int((upper < t).sum()))
        row.stereo_linked += int(stereo_ij is not None and pairs[stereo_ij] < t)
    return row


def report(rows: list[Row], samples: int, pairs: int) -> list[str]:
    lines = ["| model, vectors | copy p50 / p95 / max | held-out copy p50 / max | edit p50 / max | distinct: nearest other"
             " min / p05 / p50 | distinct min / copy p95, / copy max | stereo pair | crop 80 / 50 / 25 % (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.label} | {' / '.join(fmt(x) for x in r.copy.values())} | "
                     f"{' / '.join(fmt(x) for x in r.held.values())} | {' / '.join(fmt(x) for x in r.edits.values())} | "
                     f"{' / '.join(fmt(x) for x in r.distinct_nn.values())} | "
                     f"{r.distinct_nn['min'] / r.copy['p95']:.1f}x, {r.distinct_nn['min'] / r.copy['max']:.1f}x | "
                     f"{fmt(r.stereo)} | {' / '.join(fmt(x) for x in r.crops.values())} |")
    lines += ["", f"Thresholds from {samples} random samples of {SAMPLE} photos (`calibrate`), each scored on all photos"
              " (caught / linked: distance < threshold):", "",
              "| model, vectors | threshold min / median / max | copies caught | held-out copies caught median (min)"
              f" | edits caught | distinct pairs linked (of {pairs}) max (mean) | stereo pair linked"
              " | crops 80 / 50 / 25 % caught |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.thresholds
        lines.append(f"| {r.label} | {fmt(min(t))} / {fmt(statistics.median(t))} / {fmt(max(t))} | "
                     f"{min(r.caught_copies) * 100:.0f}-{max(r.caught_copies) * 100:.0f} % | "
                     f"{statistics.median(r.caught_held) * 100:.0f} % ({min(r.caught_held) * 100:.0f} %) | "
                     f"{statistics.median(r.caught_edits) * 100:.0f} % | "
                     f"{max(r.wrong_pairs)} ({statistics.mean(r.wrong_pairs):.2f}) | {r.stereo_linked}/{len(t)} | "
                     f"{' / '.join(f'{statistics.median(r.caught_crops[a]) * 100:.0f} %' for a in CROP_AREAS)} |")
    return lines


# ---- the cost of a calibration -------------------------------------------------------------------------

def calibration_cost(work: Path, data: Data, rounds: int = 3) -> str:
    """A store's calibration as the daemon runs it: SAMPLE_IMAGES files read, copied, decoded, embedded."""
    from poolwatch.daemon import runtime
    from poolwatch.pipeline.config import load_config
    from poolwatch.pipeline.decode import FileRef, read_and_decode
    from poolwatch.pipeline.near_threshold import SAMPLE_IMAGES, calibrate, copies_of
    from poolwatch.pipeline.sampling import normalize
    from poolwatch.pipeline.store import Store

    folder = work / "cost"
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(SAMPLE_IMAGES):  # the photos cycled: a 640x480 JPEG each
        (folder / f"{i:03d}.jpg").write_bytes(data.originals[i % len(data.originals)])
        refs.append(FileRef(str(folder), f"{i:03d}.jpg", 0, 0))
    config = load_config([f"shared_dir={work / 'shared'}", f"input_dir={folder}", "store.path=stores/cost.db",
                          "lightly.pre_trained=false"])
    with Store.open(config.store_path) as store:
        engine = runtime.load_engine(config, store=store)
    settings = runtime.decode_settings(config, engine)
    times: dict[str, list[float]] = {"read+decode originals": [], "copies_of": [], "decode copies": [], "embed": [],
                                     "calibrate": []}
    totals = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        stamp = t0
        px, blobs = [], []
        for ref in refs:
            d = read_and_decode(ref, settings)
            assert d.pixels is not None
            px.append(d.pixels)
            blobs.append(ref.path.read_bytes())
        times["read+decode originals"].append(time.perf_counter() - stamp)
        stamp = time.perf_counter()
        made = [copies_of(b) for b in blobs]
        times["copies_of"].append(time.perf_counter() - stamp)
        stamp = time.perf_counter()
        from poolwatch.pipeline.check import inspect_image
        from poolwatch.pipeline.decode import preprocess

        owner, cpx = [], []
        for i, cs in enumerate(made):
            for c in cs:
                _verdict, image = inspect_image(c, "c.jpg", scale_to=None if settings.exact_decode else settings.input_size)
                assert image is not None
                cpx.append(preprocess(image, settings.input_size))
                owner.append(i)
        times["decode copies"].append(time.perf_counter() - stamp)
        stamp = time.perf_counter()
        x = np.stack(px + cpx)
        v = np.concatenate([engine.embed(x[i:i + BATCH]) for i in range(0, len(x), BATCH)])
        times["embed"].append(time.perf_counter() - stamp)
        stamp = time.perf_counter()
        calibrate(normalize(v[:len(px)]), normalize(v[len(px):]), np.array(owner))
        times["calibrate"].append(time.perf_counter() - stamp)
        totals.append(time.perf_counter() - t0)
    parts = ", ".join(f"{k} {statistics.median(t):.2f} s" for k, t in times.items())
    return (f"{SAMPLE_IMAGES} 640x480 JPEGs ({len(made[0])} copies each, {len(x)} images embedded; {engine.precision}, "
            f"{'exact' if settings.exact_decode else 'scaled'} decode): {statistics.median(totals):.2f} s (median of {rounds}): "
            f"{parts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "poolwatch-near-threshold",
                    help="the stores and artifact cache of the models (kept for reruns)")
    ap.add_argument("--checkpoint", type=Path, action="append", default=[],
                    help="a SimCLR checkpoint of bench/precision_quality.py's ARCH (trained first when missing); repeatable")
    ap.add_argument("--samples", type=int, default=20, help="random samples of 10 photos to calibrate on")
    ap.add_argument("--no-torchvision", action="store_true", help="skip torchvision's resnet18 (the torch import)")
    ap.add_argument("--smoke", action="store_true", help="12 photos, the default model only, 3 samples: checks the script")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.pop("POOLWATCH_ARTIFACTS", None)  # the workdir's own cache
    if args.smoke:
        args.samples, args.no_torchvision, args.checkpoint = 3, True, []
        args.workdir = args.workdir.with_name(args.workdir.name + "-smoke")
    started = time.monotonic()
    work = args.workdir
    (work / "in").mkdir(parents=True, exist_ok=True)
    print(f"machine: {dt.date.today().isoformat()} · {cpu_model()} · {os.cpu_count()} cores · "
          f"Python {platform.python_version()} · load average {os.getloadavg()[0]:.2f}", flush=True)

    from poolwatch.pipeline.near_threshold import CAP, COPIES, MARGIN, MIN_IMAGES, SAMPLE_IMAGES

    data = make_data(args.smoke)
    print(f"data: {len(data.names)} photos at {SIZE[0]}x{SIZE[1]} ({', '.join(data.names)}); copies_of: "
          f"{', '.join(f'{s:.0%} q{qq}' for s, qq in COPIES)}; held-out: {', '.join(HELD_OUT)}; "
          f"edits: {', '.join(EDITS)}; crops {', '.join(f'{a:.0%}' for a in CROP_AREAS)} of the area",
          flush=True)

    models: list[tuple[str, Callable[[], tuple[Embed, str]]]] = [
        ("default (auto)", lambda: poolwatch_embedder(work, "default auto", [])),
        ("default fp32", lambda: poolwatch_embedder(work, "default fp32", ["embedding_precision=fp32"])),
    ]
    if args.smoke:
        models = models[:1]
    for checkpoint in args.checkpoint:
        if not checkpoint.is_file():
            paths = make_crops(work / "train-crops", source_photos(), 640)
            print(f"training SimCLR on {len(paths)} crops (bench/precision_quality.py's trainer, ~5 min) ...", flush=True)
            info = train(paths, checkpoint, 1, work)
            print(f"  trained in {info['seconds']:.0f} s, losses {info['losses']}", flush=True)
        models.append((f"SimCLR trained ({checkpoint.name}, auto)",
                       lambda c=checkpoint: poolwatch_embedder(work, f"simclr-{c.stem}", [f"checkpoint={c}", *ARCH])))
    if not args.no_torchvision:
        models.append(("torchvision resnet18 random", torchvision_embedder))

    rows, saved = [], {}
    for label, make in models:
        t0 = time.monotonic()
        embed, how = make()
        v = embed_data(embed, data)
        print(f"  {label}: {how}; embedded in {time.monotonic() - t0:.0f} s", flush=True)
        saved.update({f"{label}|{k}": getattr(v, k) for k in ("originals", "copies", "held", "edits", "crops")})
        for norm in (True, False):
            vv = normalised(v) if norm else v
            rows.append(measure(f"{label}, {'normalised' if norm else 'raw'}", vv, data.names, args.samples))

    np.savez(work / "vectors.npz", names=np.array(data.names), **saved)  # for a closer look afterwards
    cost = calibration_cost(work, data)
    p = len(data.names)
    pairs = p * (p - 1) // 2 - (1 if all(s in data.names for s in STEREO) else 0)
    print()
    print(f"## Near-duplicate threshold (`near_duplicate.threshold=auto`), {dt.date.today().isoformat()}, "
          f"{cpu_model()} ({os.cpu_count()} cores)")
    print()
    print(f"{p} photos at {SIZE[0]}x{SIZE[1]}; L2 distances. Rule (MIN_IMAGES {MIN_IMAGES}, SAMPLE_IMAGES {SAMPLE_IMAGES}): "
          f"threshold = max(copy p95, min({MARGIN:g} x copy p95, {CAP:g} x distinct p05)); copies: copies_of "
          f"({', '.join(f'{s:.0%} q{qq}' for s, qq in COPIES)}); held-out copies: {', '.join(HELD_OUT)}; edits: "
          f"{', '.join(EDITS)}; distinct: different photos (not the stereo pair).")
    print()
    print("\n".join(report(rows, args.samples, pairs)))
    print()
    print(f"Calibration cost: {cost}")
    for r in rows:
        print(f"- {r.label}: e.g. {r.rules[0]}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; whole run {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
