"""The quality signals (pipeline/quality.py) on real photos vs degraded copies of them: the flag defaults and the cost.

    .venv/bin/pip install scikit-image scikit-learn     # first: their wheels ship the photographs used here
    nice -n 10 .venv/bin/python bench/quality_thresholds.py
    .venv/bin/python bench/quality_thresholds.py --smoke                # seconds: keeps the script working

Photos: bench/precision_quality.py's `source_photos()` (skimage.data's colour and grey photographs, grey ones
made RGB, and scikit-learn's two sample images: 21; nothing is downloaded), each at its own size and fitted
(centre-cropped to the aspect, LANCZOS) to 640x480 and 1920x1080 (portrait for a portrait photo). Copies:
Gaussian blur of 0.25 / 0.5 / 1 % of the long side (1.6 / 3.2 / 6.4 px at 640), ImageEnhance.Brightness 0.5
and 0.25 (darkened), 2.5 and 4 (over-exposed, clipping), a haze (75 % white blended in: the mirror of
brightness 0.25), a flat image (the photo's mean colour with sensor noise of sigma 2), and a centre strip
cropped to 5:1. Every image is saved as a JPEG (quality 90) and read back through
`pipeline.decode.read_and_decode` at input 64 in two modes: `exact` (check.exact_decode=true, the default of
new stores: measured on the full decode) and `scaled` (exact_decode=false: JPEGs DCT-scaled to >= 64 px a side
before they are measured).

Known exceptions among the originals (each is flagged, rightly, and is left out of the margins): clock
("Motion blurred clock", skimage's docstring) and cell (a phase image of a cell in saline: smooth) are
blurry; hubble_deep_field (the night sky, mean luma 20) is dark.

Rule for a default: the geometric mean of the worst ordinary original and the least degraded copy that must be
flagged (blurry: the 0.5 % and 1 % blurs; dark: brightness 0.25; bright: the haze, the rule applied to
255 - brightness, the mirror of dark; low_information: the flat copies), over every size, exact decoding;
printed next to the module's DEFAULT_THRESHOLDS with their margins (original / threshold, threshold / copy).
The over-exposed copies are reported only: over-exposing a night photo does not make it bright. odd_aspect is
geometry, not measured: 3 sits above 21:9 (2.33) and the photos (text: 2.6) and below a 3:1 panorama.

Also printed: how well sharpness separates the 0.5 % blurs from the originals at other working sizes (the
issue: at 64x64 it does not), and the cost per image of `read_and_decode` with and without the measurement,
per mode, at 640x480, 1920x1080 and 4000x3000: medians of alternated repeats over five colour photos.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from precision_quality import source_photos  # noqa: E402

from poolwatch.pipeline.check import inspect_image  # noqa: E402
from poolwatch.pipeline.decode import DecodeSettings, FileRef, preprocess, read_and_decode  # noqa: E402
from poolwatch.pipeline.quality import DEFAULT_THRESHOLDS, FLAGS, WORKING_SIDE, Quality, flags_of, measure  # noqa: E402

SIZES: dict[str, tuple[int, int] | None] = {"native": None, "640x480": (640, 480), "1920x1080": (1920, 1080)}
MODES = {"exact": DecodeSettings(input_size=64, exact_decode=True),
         "scaled": DecodeSettings(input_size=64, exact_decode=False)}
EXPECTED = {"clock": "blurry", "cell": "blurry", "hubble_deep_field": "dark"}  # originals rightly flagged


def blur(fraction: float) -> Callable[[Image.Image], Image.Image]:
    return lambda im: im.filter(ImageFilter.GaussianBlur(fraction * max(im.size)))


def brightness(factor: float) -> Callable[[Image.Image], Image.Image]:
    return lambda im: ImageEnhance.Brightness(im).enhance(factor)


def haze(im: Image.Image) -> Image.Image:
    """The mirror of brightness 0.25: each value a quarter of its distance from white (75 % white blended in)."""
    return Image.blend(im, Image.new("RGB", im.size, (255, 255, 255)), 0.75)


def flat(im: Image.Image) -> Image.Image:
    mean = np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(axis=0)
    noise = np.random.default_rng(0).normal(0, 2, (im.height, im.width, 3))
    return Image.fromarray(np.clip(mean + noise, 0, 255).astype(np.uint8), "RGB")


def panorama(im: Image.Image) -> Image.Image:
    w, h = im.size
    strip = max(1, round(w / 5))
    return im.crop((0, (h - strip) // 2, w, (h - strip) // 2 + strip))


# copy -> (how it is made, the flag it must get; None: reported only)
VARIANTS: dict[str, tuple[Callable[[Image.Image], Image.Image], str | None]] = {
    "original": (lambda im: im, None),
    "blur 0.25 %": (blur(0.0025), None),
    "blur 0.5 %": (blur(0.005), "blurry"),
    "blur 1 %": (blur(0.01), "blurry"),
    "brightness 0.5": (brightness(0.5), None),
    "brightness 0.25": (brightness(0.25), "dark"),
    "brightness 2.5": (brightness(2.5), None),
    "brightness 4": (brightness(4.0), None),
    "haze 75 %": (haze, "bright"),
    "flat + noise": (flat, "low_information"),
    "5:1 strip": (panorama, "odd_aspect"),
}


@dataclass(frozen=True)
class Sample:
    photo: str
    size: str
    variant: str
    mode: str
    quality: Quality


def fitted(im: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    if size is None:
        return im
    return ImageOps.fit(im, size if im.width >= im.height else size[::-1], Image.Resampling.LANCZOS)


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def collect(photos: list[tuple[str, np.ndarray]], work: Path, sizes: dict[str, tuple[int, int] | None]) -> list[Sample]:
    samples = []
    for name, arr in photos:
        base = Image.fromarray(arr, "RGB")
        for size_label, size in sizes.items():
            img = fitted(base, size)
            for variant, (make, _flag) in VARIANTS.items():
                path = work / f"{name}_{size_label}_{variant.replace(' ', '_').replace('%', 'pc').replace(':', '-')}.jpg"
                path.write_bytes(jpeg(make(img)))
                for mode, settings in MODES.items():
                    d = read_and_decode(FileRef(str(work), path.name, 0, 0), settings)
                    if d.quality is None:
                        raise SystemExit(f"{path.name}: no quality measured ({d.verdict})")
                    samples.append(Sample(name, size_label, variant, mode, d.quality))
    return samples


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.3g} / {statistics.median(values):.3g} / {max(values):.3g}"


def signal_table(samples: list[Sample], mode: str, sizes: list[str], flags: list[str]) -> list[str]:
    """Per flag's signal: min / median / max per copy and size, and how many the defaults flag."""
    lines = [f"### Signals, {mode} decode (min / median / max; flagged by the defaults)", ""]
    for flag in flags:
        field, op = FLAGS[flag]
        lines += [f"`{flag}`: {field} {op} {DEFAULT_THRESHOLDS[flag]:g}", "",
                  "| copy | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
        for variant, (_make, must) in VARIANTS.items():
            if variant != "original" and must != flag and not (flag == "blurry" and variant.startswith("blur")) \
                    and not (flag in ("dark", "bright") and variant.startswith(("brightness", "haze"))):
                continue
            cells = []
            for size in sizes:
                rows = [s for s in samples if s.mode == mode and s.size == size and s.variant == variant]
                hit = sum(flag in flags_of(s.quality, DEFAULT_THRESHOLDS) for s in rows)
                cells.append(f"{spread([getattr(s.quality, field) for s in rows])} ({hit}/{len(rows)})")
            lines.append(f"| {variant}{' (must flag)' if must == flag else ''} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def defaults_table(samples: list[Sample]) -> list[str]:
    lines = ["### Defaults (exact decode, every size)", "",
             "| flag | worst ordinary original | least degraded copy to flag | geometric mean | default | margins |",
             "|---|---|---|---|---|---|"]
    exact = [s for s in samples if s.mode == "exact"]
    for flag, (field, op) in FLAGS.items():
        originals = [s for s in exact if s.variant == "original" and EXPECTED.get(s.photo) != flag]
        copies = [s for s in exact if VARIANTS[s.variant][1] == flag]
        if not originals or not copies:
            continue
        # each signal on a scale where the flag is "value < threshold", so that ratios are margins: bright on
        # 255 - brightness (the mirror of dark), odd_aspect on 1 / aspect
        def side(v: float, flag: str = flag) -> float:
            return 255.0 - v if flag == "bright" else 1.0 / v if flag == "odd_aspect" else v

        def value(s: Sample, field: str = field) -> float:
            return side(float(getattr(s.quality, field)))

        worst, least = min(originals, key=value), max(copies, key=value)
        a, b, default = value(worst), value(least), side(DEFAULT_THRESHOLDS[flag])
        geo = side(math.sqrt(max(a, 0) * max(b, 0)))  # side() is its own inverse
        margins = f"{a / default:.2f}x / {default / b:.2f}x" if min(a, b, default) > 0 else "-"
        rule = " (geometry)" if flag == "odd_aspect" else ""
        lines.append(f"| {flag} ({field} {op}) | {side(a):.3g} ({worst.photo}, {worst.size}) | {side(b):.3g} ({least.photo}, "
                     f"{least.size}, {least.variant}) | {geo:.3g} | {DEFAULT_THRESHOLDS[flag]:g}{rule} | {margins} |")
    lines += ["", "margins: worst original vs the default, the default vs the least degraded copy, as ratios on the "
              "flag's side (bright: of 255 - brightness; odd_aspect: of 1 / aspect); > 1x on both: separated", ""]
    for mode in MODES:
        flagged = sorted({(s.photo, s.size, f) for s in samples if s.mode == mode and s.variant == "original"
                          for f in flags_of(s.quality, DEFAULT_THRESHOLDS)})
        lines.append(f"originals the defaults flag, {mode} decode: "
                     + (", ".join(f"{p} {z} {f}{'' if EXPECTED.get(p) == f else ' (UNEXPECTED)'}" for p, z, f in flagged)
                        or "none"))
        missed = [s for s in samples if s.mode == mode and (must := VARIANTS[s.variant][1]) is not None
                  and must not in flags_of(s.quality, DEFAULT_THRESHOLDS)]
        total = sum(1 for s in samples if s.mode == mode and VARIANTS[s.variant][1] is not None)
        by_variant: dict[str, int] = {}
        for s in missed:
            by_variant[s.variant] = by_variant.get(s.variant, 0) + 1
        lines.append(f"copies that must be flagged but are not, {mode} decode: {len(missed)}/{total}"
                     + (f" ({', '.join(f'{v}: {n}' for v, n in by_variant.items())})" if missed else ""))
    greys = [s.quality.colorfulness for s in exact if s.variant == "original" and is_grey(s.photo)]
    colours = [s.quality.colorfulness for s in exact if s.variant == "original" and not is_grey(s.photo)]
    lines.append(f"colorfulness of the originals: grey photos (stored as colour JPEGs) max {max(greys):.2f}; "
                 f"colour photos min {min(colours):.1f}, median {statistics.median(colours):.1f}")
    return lines


GREY: set[str] = set()


def is_grey(name: str) -> bool:
    return name in GREY


def sweep(photos: list[tuple[str, np.ndarray]], sizes: dict[str, tuple[int, int] | None]) -> list[str]:
    """Sharpness of originals vs 0.5 % blurs at other working sizes (exact decode of the JPEGs)."""
    sides: list[int | str] = ["64x64 input", 64, 128, 256, 384, WORKING_SIDE, 768, "native"]
    pairs = []
    for name, arr in photos:
        if name in EXPECTED:
            continue
        for size in sizes.values():
            img = fitted(Image.fromarray(arr, "RGB"), size)
            pairs.append(tuple(inspect_image(jpeg(x), "x.jpg")[1] for x in (img, blur(0.005)(img))))
    lines = ["### Sharpness at other working sizes: originals vs 0.5 % blurs (exact decode, ordinary photos, all sizes)", "",
             "| working long side | worst original | sharpest blurred copy | ratio | blurred copies above the worst original |",
             "|---|---|---|---|---|"]
    for side in sides:
        values = []
        for pair in pairs:
            row = []
            for im in pair:
                if side == "64x64 input":
                    q = measure(Image.fromarray(preprocess(im, 64)))
                else:
                    q = measure(im, working_side=10**9 if side == "native" else int(side))
                row.append(q.sharpness)
            values.append(row)
        worst = min(v[0] for v in values)
        best = max(v[1] for v in values)
        above = sum(v[1] > worst for v in values)
        label = f"{side}{' (the default)' if side == WORKING_SIDE else ''}"
        lines.append(f"| {label} | {worst:.3g} | {best:.3g} | {worst / best:.2f} | {above}/{len(values)} |")
    return lines


def timing(photos: list[tuple[str, np.ndarray]], rounds: int, work: Path) -> list[str]:
    """read_and_decode per image, with and without the measurement, per mode; the order rotates every round."""
    runs = {f"{mode}{'' if on else ', no quality'}": replace(settings, measure_quality=on)
            for mode, settings in MODES.items() for on in (False, True)}
    lines = ["### Cost per image (ms: read_and_decode, input 64, check on; median of alternated repeats over 5 photos)", "",
             "| size | " + " | ".join(runs) + " | measure's share, exact | measure's share, scaled |",
             "|---|" + "---|" * (len(runs) + 2)]
    chosen = [p for p in photos if not is_grey(p[0])][:5]
    for w, h in ((640, 480), (1920, 1080), (4000, 3000)):
        refs = []
        for name, arr in chosen:
            path = work / f"timing_{name}_{w}x{h}.jpg"
            path.write_bytes(jpeg(fitted(Image.fromarray(arr, "RGB"), (w, h))))
            refs.append(FileRef(str(work), path.name, 0, 0))
        times: dict[str, list[float]] = {label: [] for label in runs}
        labels = list(runs)
        for r in range(-1, rounds):  # round -1 warms up and is not counted
            for ref in refs:
                for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                    start = time.perf_counter()
                    read_and_decode(ref, runs[label])
                    if r >= 0:
                        times[label].append(time.perf_counter() - start)
        med = {label: statistics.median(v) * 1e3 for label, v in times.items()}
        share = [f"{(med[m] - med[m + ', no quality']) / med[m + ', no quality'] * 100:+.0f} %" for m in ("exact", "scaled")]
        lines.append(f"| {w}x{h} | " + " | ".join(f"{med[label]:.2f}" for label in runs) + " | " + " | ".join(share) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="timing repeats per photo and size")
    ap.add_argument("--timing-only", action="store_true", help="only the cost table")
    ap.add_argument("--smoke", action="store_true", help="three photos, two sizes, two rounds: checks the script, no figures")
    args = ap.parse_args()
    photos = source_photos()
    GREY.update(name for name, arr in photos if (arr == arr[..., :1]).all())
    sizes = dict(SIZES)
    if args.smoke:
        photos = [p for p in photos if p[0] in ("astronaut", "camera", "clock")]
        sizes.pop("1920x1080")
        args.rounds = 2
    print(f"machine: {machine()} · load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"photos: {len(photos)} ({', '.join(n for n, _ in photos)}); sizes: {', '.join(sizes)}; "
          f"{len(VARIANTS)} copies each; working side {WORKING_SIDE} px", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="poolwatch-quality-") as tmp:
        if args.timing_only:
            print("\n".join(timing(photos, args.rounds, Path(tmp))))
            return
        samples = collect(photos, Path(tmp), sizes)
        print(f"measured {len(samples)} decodes in {time.monotonic() - started:.0f} s", flush=True)
        print()
        for mode in MODES:
            print("\n".join(signal_table(samples, mode, list(sizes), list(FLAGS) if mode == "exact" else ["blurry"])))
        print("\n".join(defaults_table(samples)))
        print()
        print("\n".join(sweep(photos, sizes)))
        print()
        print("\n".join(timing(photos, args.rounds, Path(tmp))))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; whole run {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
