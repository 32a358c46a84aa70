"""The quality rule behind `embedding_precision=auto`, measured on real photos with a trained checkpoint.

    .venv/bin/pip install scikit-image          # first: its wheel ships the photographs used here
    nice -n 10 .venv/bin/python bench/precision_quality.py
    nice -n 10 .venv/bin/python bench/precision_quality.py --checkpoint /tmp/pq.ckpt   # trains once, then reuses it
    .venv/bin/python bench/precision_quality.py --smoke                              # a minute: keeps the script working

`auto` picks the fastest CPU mode that meets this rule (pipeline/engine.py AUTO_CPU; measured here: bf16 with
exact decoding, where the CPU runs bf16, else fp32):

  (a) coreset: the greedy k-center picks made in that mode's vectors, scored in fp32 space (coverage radius =
      max over all images of the fp32 distance to the nearest pick), give a radius at most 2 % above the
      radius of the picks made in fp32 vectors (ratio <= 1.02; a smaller radius is no loss), for N = 100,
      200 and 500 picks;
  (b) 10-NN: each image's 10 nearest neighbours in that mode's vectors vs in fp32 vectors agree on average
      >= 95 % (mean |A ∩ B| / 10).

The distances are those poolwatch samples with by default (normalize_embeddings=true: every vector
L2-normalised with `pipeline.sampling.normalize`); the raw (unnormalised) figures are printed too.

Data (offline, seeded): the real photographs in scikit-image's wheel (`skimage.data`: colour astronaut,
coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry, retina, motorcycle left/right from
stereo_motorcycle; greyscale camera, coins, moon, brick, grass, gravel, clock, page, text, cell, made RGB)
and scikit-learn's `load_sample_images()` (china, flower): 21 photos. From them --crops crops (default
2,000), round-robin over the photos: area 2-60 % of the photo (log-uniform), aspect 3/4-4/3, a random
position, resized so the long side is 96-384 px (log-uniform), saved as JPEG quality 90. Overlapping crops
of one photo are near-duplicates, so the set is far more clustered than a real store.

Model: lightly's SimCLR resnet-18 (num_ftrs 32, input 64; lightly's CIFAR-style resnet: 3x3 stride-1 stem,
no max-pool) trained on the crops with poolwatch's own trainer (`pipeline.train.train_simclr`; lightly's CLI
defaults otherwise: SGD lr 1 without momentum, NT-Xent temperature 0.5, SimCLR views), batch 64, seed 1, on the
first --train-images crops (default 640, every photo's) for --epochs (default 1): 10 SGD steps, ~5 min on 2
shared cores (a step of this resnet at 64 px takes 20-60 s there, so all 2,000 crops would be ~20 min an
epoch). --checkpoint PATH keeps the checkpoint there; a rerun finds it and skips training.

Modes, each through poolwatch's own code paths (`daemon.runtime.load_engine` with an explicit
`embedding_precision`, `check.exact_decode`, a Store of its own and, for int8, a calibration of the first
300 crops by content hash via `pipeline.calibration.from_plan`, as a store calibrates): the reference torch
fp32 with exact decode (`model.runtime=torch`), then OpenVINO fp32, bf16 and int8, each with exact decode
and with scaled decode (`check.exact_decode=false`: JPEGs decoded DCT-scaled, `read_and_decode` with
`exact_decode=False`). Pixels come from `pipeline.decode.read_and_decode` with the config's `decode_settings`.
Each decode mode has an artifact cache of its own (<workdir>/shared/{exact,scaled}; $POOLWATCH_ARTIFACTS is
ignored; the calibration's hash now also covers the decode mode). Coresets:
`pipeline.coreset.kcenter(device="cpu", seed=0)`, so the first pick is the same in every mode. Context row: the
reference's own radius with other first picks (seeds 1-5), i.e. how much the greedy's radius moves for reasons
that have nothing to do with precision.

Throughput: model only (`engine.embed` on one batch of 64 decoded images), median of 5 after 2 warm-ups,
in the same run; on a shared machine these figures move with the other load (the load average is printed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

N_PICKS = (100, 200, 500)
KNN = 10
RADIUS_TOL = 1.02
KNN_MIN = 0.95
BATCH = 64
# The model measured; --smoke swaps in a tiny one (TINY in tests/test_engine.py) so that the script's run takes a minute.
ARCH = ["lightly.model.name=resnet-18", "lightly.model.num_ftrs=32", "lightly.collate.input_size=64"]
SMOKE_ARCH = ["lightly.model.name=resnet-9", "lightly.model.num_ftrs=16", "lightly.collate.input_size=32"]
CALIBRATION_IMAGES = 300  # engine.CALIBRATION_COUNT


# ---- photos and crops ------------------------------------------------------------------------------------

def source_photos() -> list[tuple[str, np.ndarray]]:
    """The real photographs shipped in the scikit-image and scikit-learn wheels (nothing is downloaded)."""
    try:
        import skimage.data as sk
    except ImportError:
        sys.exit("scikit-image is needed for its photographs: .venv/bin/pip install scikit-image")
    from sklearn.datasets import load_sample_images

    photos: list[tuple[str, np.ndarray]] = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
        photos.append((name, getattr(sk, name)()))
    left, right, _disp = sk.stereo_motorcycle()
    photos += [("motorcycle_left", left), ("motorcycle_right", right)]
    for name in ("camera", "coins", "moon", "brick", "grass", "gravel", "clock", "page", "text", "cell"):
        photos.append((name, getattr(sk, name)()))
    sample = load_sample_images()
    for fname, image in zip(sample.filenames, sample.images, strict=True):
        photos.append((Path(fname).stem, image))
    out = []
    for name, arr in photos:
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            raise SystemExit(f"{name}: unexpected dtype {arr.dtype}")
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out.append((name, np.ascontiguousarray(arr[..., :3])))
    return out


def make_crops(folder: Path, photos: list[tuple[str, np.ndarray]], n: int, seed: int = 0) -> list[Path]:
    """`n` seeded random crops (round-robin over the photos) as JPEGs; existing files are kept (same seed, same crops)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(arr, "RGB") for _name, arr in photos]
    paths = []
    for i in range(n):
        k = i % len(photos)
        img = images[k]
        w, h = img.size
        area = w * h * float(np.exp(rng.uniform(np.log(0.02), np.log(0.6))))
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(min(w, max(8, round(np.sqrt(area * aspect)))))
        ch = int(min(h, max(8, round(np.sqrt(area / aspect)))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        long_side = float(np.exp(rng.uniform(np.log(96), np.log(384))))
        scale = long_side / max(cw, ch)
        out_size = (max(16, round(cw * scale)), max(16, round(ch * scale)))
        path = folder / f"{i:05d}_{photos[k][0]}.jpg"
        if not path.exists():
            crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize(out_size, Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            crop.save(buf, "JPEG", quality=90)
            path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


# ---- model ------------------------------------------------------------------------------------------------

def lightly_overrides(epochs: int) -> list[str]:
    return [*ARCH, "lightly.loader.batch_size=64", f"lightly.trainer.max_epochs={epochs}"]


def train(paths: list[Path], checkpoint: Path, epochs: int, work: Path) -> dict:
    import torch

    from poolwatch.pipeline.config import load_config
    from poolwatch.pipeline.train import train_simclr

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(lightly_overrides(epochs)).lightly
    last = [time.monotonic()]

    def progress(epoch: int, step: int, loss: float) -> None:
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            print(f"  training: epoch {epoch}, step {step}, loss {loss:.3f}", flush=True)

    result = train_simclr(paths, cfg, out_dir=work / "train", seed=1, device="cpu", num_workers=2,
                          progress=progress, extra_checkpoint=checkpoint)
    return {"images": len(paths), "epochs": result.epochs, "losses": result.losses, "seconds": result.seconds,
            "skipped": len(result.skipped)}


# ---- modes -------------------------------------------------------------------------------------------------

@dataclass
class ModeRun:
    label: str
    runtime: str
    precision: str
    exact: bool
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    img_s: float = float("nan")
    note: str = ""


MODES = [("torch fp32 exact (reference)", "torch", "fp32", True),
         ("openvino fp32 exact", "auto", "fp32", True),
         ("openvino bf16 exact", "auto", "bf16", True),
         ("openvino int8 exact", "auto", "int8", True),
         ("openvino fp32 scaled", "auto", "fp32", False),
         ("openvino bf16 scaled", "auto", "bf16", False),
         ("openvino int8 scaled", "auto", "int8", False)]


def decode_all(config, refs: list) -> tuple[np.ndarray, list[str]]:
    from poolwatch.daemon.runtime import decode_settings
    from poolwatch.pipeline.decode import read_and_decode

    settings = decode_settings(config)
    pixels, hashes = [], []
    for ref in refs:
        d = read_and_decode(ref, settings)
        if d.verdict is None or not d.verdict.ok or d.pixels is None:
            raise SystemExit(f"{ref.relpath}: not decodable ({d.verdict})")
        pixels.append(d.pixels)
        hashes.append(d.hash)
    return np.stack(pixels), hashes


def embed_all(engine, pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([engine.embed(pixels[i:i + BATCH]) for i in range(0, len(pixels), BATCH)])


def throughput(engine, pixels: np.ndarray, repeat: int = 5) -> float:
    batch = np.ascontiguousarray(pixels[:BATCH])
    for _ in range(2):
        engine.embed(batch)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        engine.embed(batch)
        times.append(time.perf_counter() - t0)
    return len(batch) / statistics.median(times)


def run_modes(crops: Path, refs: list, shared: Path, checkpoint: Path, epochs: int, modes: list) -> list[ModeRun]:
    from poolwatch.daemon import runtime
    from poolwatch.pipeline import calibration
    from poolwatch.pipeline.config import load_config
    from poolwatch.pipeline.openvino_engine import runnable
    from poolwatch.pipeline.store import Store

    runs, decoded = [], {}
    for decode in ("exact", "scaled"):  # fresh stores; the artifact caches (models/) are kept
        shutil.rmtree(shared / decode / "stores", ignore_errors=True)
    order = None  # the refs in content-hash order: a store's calibration choice
    for label, rt, precision, exact in modes:
        slug = label.split(" (")[0].replace(" ", "-")
        # A shared_dir (artifact cache) per decode mode: int8's artifact is found by its calibration's hash, which
        # names the images, not their decode mode, so a scaled store calibrates on scaled pixels only in a cache
        # of its own (as on a machine that never ran an exact-decode store).
        decode = "exact" if exact else "scaled"
        config = load_config([f"shared_dir={shared / decode}", f"input_dir={crops}", f"checkpoint={checkpoint}",
                              f"store.path=stores/{slug}.db", f"model.runtime={rt}", f"embedding_precision={precision}",
                              f"check.exact_decode={'true' if exact else 'false'}", *lightly_overrides(epochs)])
        if exact not in decoded:
            t0 = time.monotonic()
            decoded[exact] = decode_all(config, refs)
            print(f"  decoded {len(refs)} crops ({'exact' if exact else 'scaled'}) in {time.monotonic() - t0:.1f} s", flush=True)
        pixels, hashes = decoded[exact]
        if order is None:
            order = [refs[i] for i in np.argsort(np.array(hashes), kind="stable")]
        calls = []

        def calibrate(settings, _calls=calls, _order=order):
            _calls.append(settings)
            return calibration.from_plan(_order, settings, CALIBRATION_IMAGES)

        cache = runtime.artifacts_root(config)
        before = set(cache.iterdir()) if cache.is_dir() else set()
        t0 = time.monotonic()
        with Store.open(config.store_path) as store:
            engine = runtime.load_engine(config, calibrate=calibrate, store=store)
        load_s = time.monotonic() - t0
        run = ModeRun(label, engine.runtime, engine.precision, engine.exact_decode)
        notes = [f"loaded in {load_s:.0f} s"]
        if engine.precision != precision or engine.exact_decode != exact:
            notes.append(f"ASKED {precision}/{'exact' if exact else 'scaled'}, GOT {engine.precision}/"
                         f"{'exact' if engine.exact_decode else 'scaled'}")
        if engine.runtime == "openvino" and not runnable(precision):
            notes.append(f"{precision} not native on this CPU")
        if precision == "int8":
            built = "quantized now" if set(cache.iterdir()) - before else "artifact from the cache"
            how = "exact" if calls and calls[0].exact_decode else "scaled"
            notes.append(f"calibration {engine.mode.calibration[:12]} ({CALIBRATION_IMAGES} crops by content hash, "
                         f"{how} decode; {built})" if calls else "no calibration asked")
        t0 = time.monotonic()
        run.vectors = embed_all(engine, pixels)
        embed_s = time.monotonic() - t0
        run.img_s = throughput(engine, pixels)
        notes.append(f"all {len(pixels)} embedded in {embed_s:.0f} s")
        run.note = "; ".join(notes)
        print(f"  {label}: {engine.runtime} {engine.precision} {run.note}; {run.img_s:.0f} img/s", flush=True)
        runs.append(run)
        del engine
    return runs


# ---- the rule's figures --------------------------------------------------------------------------------

def sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def knn_lists(x: np.ndarray, k: int = KNN) -> np.ndarray:
    d = sq_dists(x, x)
    np.fill_diagonal(d, np.inf)
    idx = np.argpartition(d, k, axis=1)[:, :k]
    return idx


def knn_agreement(x: np.ndarray, ref: np.ndarray, k: int = KNN) -> float:
    a, b = knn_lists(x, k), knn_lists(ref, k)
    return float(np.mean([len(set(r) & set(s)) / k for r, s in zip(a, b, strict=True)]))


def radius(space: np.ndarray, picks: np.ndarray) -> float:
    return float(np.sqrt(sq_dists(space, space[picks]).min(axis=1).max()))


def picks(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    from poolwatch.pipeline.coreset import kcenter

    return np.asarray(kcenter(x, n_samples=n, seed=seed, device="cpu").indices)


@dataclass
class Scores:
    knn: float
    ratios: dict[int, float]
    same: dict[int, float]
    cos_median: float
    cos_min: float
    shift: float  # median distance of a vector from its reference vector / median 1-NN distance of the reference

    def passes(self) -> bool:
        return self.knn >= KNN_MIN and all(r <= RADIUS_TOL for r in self.ratios.values())


def score(x: np.ndarray, ref: np.ndarray, ref_picks: dict[int, np.ndarray]) -> Scores:
    ratios, same = {}, {}
    for n in N_PICKS:
        p = picks(x, n)
        ratios[n] = radius(ref, p) / radius(ref, ref_picks[n])
        same[n] = len(set(p.tolist()) & set(ref_picks[n].tolist())) / max(len(p), 1)
    cos = (x * ref).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(ref, axis=1)
    shift = float(np.median(np.linalg.norm(x.astype(np.float64) - ref, axis=1)) / nn_distance(ref))
    return Scores(knn_agreement(x, ref), ratios, same, float(np.median(cos)), float(cos.min()), shift)


def nn_distance(x: np.ndarray) -> float:
    """The median distance from an image to its nearest other image."""
    d = sq_dists(x, x)
    np.fill_diagonal(d, np.inf)
    return float(np.median(np.sqrt(d.min(axis=1))))


def table(runs: list[ModeRun], normalise: bool) -> list[str]:
    from poolwatch.pipeline.sampling import normalize

    def prep(v: np.ndarray) -> np.ndarray:
        return normalize(v) if normalise else v.astype(np.float32)

    ref = prep(runs[0].vectors)
    ref_picks = {n: picks(ref, n) for n in N_PICKS}
    head = "normalised (normalize_embeddings=true, the rule)" if normalise else "raw vectors (normalize_embeddings=false)"
    ns = "/".join(str(n) for n in N_PICKS)
    lines = [f"### {head}", "",
             f"| mode | 10-NN agreement | radius ratio N={ns} | identical picks N={ns} | cosine to ref median / min"
             " | shift / 1-NN dist | img/s | passes rule? |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = score(prep(run.vectors), ref, ref_picks)
        verdict = "reference" if run is runs[0] else ("yes" if s.passes() else "**no**")
        lines.append(f"| {run.label} | {s.knn * 100:.1f} % | {' / '.join(f'{s.ratios[n]:.3f}' for n in N_PICKS)} | "
                     f"{' / '.join(f'{s.same[n] * 100:.0f} %' for n in N_PICKS)} | {s.cos_median:.5f} / {s.cos_min:.4f} | "
                     f"{s.shift:.3f} | {run.img_s:.0f} | {verdict} |")
    spread = {n: [radius(ref, picks(ref, n, seed)) / radius(ref, ref_picks[n]) for seed in range(1, 6)] for n in N_PICKS}
    radii = " / ".join(f"{radius(ref, ref_picks[n]):.4f}" for n in N_PICKS)
    lines.append(f"| (context) reference, first pick seeds 1-5 (its own radius {radii}) | - | "
                 f"{' / '.join(f'{min(v):.3f}-{max(v):.3f}' for v in spread.values())} | - | - | - | - | - |")
    unit = normalize(runs[0].vectors).astype(np.float64)
    pair_cos = unit @ unit.T
    off = pair_cos[~np.eye(len(unit), dtype=bool)]
    lines += ["", f"Reference spread: cosine between two different images mean {off.mean():.3f} (min {off.min():.3f}); "
              f"median 1-NN distance {nn_distance(ref):.4f} in this space. 'shift / 1-NN dist': the median distance of an "
              "image's vector from its reference vector over that median 1-NN distance."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "poolwatch-precision-quality",
                    help="crops, training output and the artifact cache (kept for reruns)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="trained checkpoint: used when it exists, else training writes it there (default: in --workdir)")
    ap.add_argument("--crops", type=int, default=2000)
    ap.add_argument("--train-images", type=int, default=640,
                    help="train on the first N crops only (round-robin: every photo's); 0 = all")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--smoke", action="store_true",
                    help="320 crops, a tiny resnet-9 (16-d, 32 px) trained on 64 for one epoch: checks the script, no figures")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.smoke:
        args.crops, args.train_images, args.epochs = 320, 64, 1
        args.workdir = args.workdir.with_name(args.workdir.name + "-smoke")
        ARCH[:] = SMOKE_ARCH
    # one artifact cache per decode mode (see run_modes), never a cache shared with other runs
    os.environ.pop("POOLWATCH_ARTIFACTS", None)
    started = time.monotonic()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    arch = ARCH[0].split("=")[1]
    checkpoint = args.checkpoint or work / f"simclr_{arch}_{args.crops}_{args.train_images}_{args.epochs}.ckpt"
    print(f"machine: {dt.date.today().isoformat()} · {cpu_model()} · {os.cpu_count()} cores · "
          f"Python {platform.python_version()} · load average {os.getloadavg()[0]:.2f}", flush=True)

    import poolwatch.pipeline

    print(f"poolwatch measured: {Path(poolwatch.pipeline.__file__).parent}", flush=True)
    photos = source_photos()
    crops = make_crops(work / "crops", photos, args.crops)
    print(f"data: {len(photos)} source photos ({', '.join(n for n, _ in photos)}) -> {len(crops)} crops in {work / 'crops'}",
          flush=True)

    if checkpoint.is_file():
        print(f"checkpoint: {checkpoint} (exists: training skipped)", flush=True)
        training = None
    else:
        subset = crops[:args.train_images] if args.train_images else crops
        print(f"training SimCLR {arch} on {len(subset)} crops, {args.epochs} epoch(s), batch 64 ...", flush=True)
        training = train(subset, checkpoint, args.epochs, work)
        print(f"checkpoint: {checkpoint}: {training['images']} images, {training['epochs']} epochs, "
              f"{training['seconds']:.0f} s, mean loss per epoch {', '.join(f'{x:.3f}' for x in training['losses'])}", flush=True)

    from poolwatch.pipeline.decode import FileRef

    refs = [FileRef(str(work / "crops"), p.name, 0, 0) for p in crops]
    runs = run_modes(work / "crops", refs, work / "shared", checkpoint, args.epochs, MODES)

    np.savez(work / "vectors.npz", **{r.label: r.vectors for r in runs})  # for a closer look afterwards
    print()
    print(f"## Precision quality rule, {dt.date.today().isoformat()}, {cpu_model()} ({os.cpu_count()} cores)")
    print()
    print(f"{len(crops)} crops of {len(photos)} real photos, SimCLR {' '.join(a.split('.')[-1] for a in ARCH)} "
          + (f"trained {training['epochs']} epoch(s) on {training['images']} crops" if training else f"from {checkpoint.name}")
          + f"; reference: torch fp32, exact decode. Rule: 10-NN >= {KNN_MIN * 100:.0f} % and radius ratio <= {RADIUS_TOL}"
          f" for every N; img/s: model only, batch {BATCH}, median of 5.")
    print()
    for normalise in (True, False):
        print("\n".join(table(runs, normalise)))
        print()
    for run in runs:
        print(f"- {run.label}: {run.runtime} {run.precision} {'exact' if run.exact else 'scaled'}; {run.note}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; whole run {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
