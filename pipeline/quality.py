"""Per-image quality signals, measured on the decoded image before it is squashed to the model's input.

No torch, no second decode: one small working copy made with Pillow's C paths (an integer box reduce, a luma
conversion, a box resize, a histogram) and a numpy Laplacian. Measured on 2 shared cores: ~2 ms on a full
640x480 decode and ~5 ms on a 1920x1080 one (+60 % / +26 % on read_and_decode's 4 / 18 ms), 0.2-1 ms on the
DCT-scaled decodes of the default mode (+14 % / +15 %); bench/quality_thresholds.py, docs/BENCHMARKS.md
"Quality signals".

* sharpness: variance of the 3x3 (4-neighbour) Laplacian of luma, 0-255 scale, with the image box-resized so
  that its long side is WORKING_SIDE (512 px); an image that is smaller is measured as it is. The fixed scale
  keeps the figure comparable across sizes (a 4000x3000 photo and its 1920x1080 copy are both measured at
  512 px) and resolves the blur a user calls blurry: measured on real photos at their own size, 640x480 and
  1920x1080, every Gaussian blur of 0.5 % of the long side (3.2 px at 640) reads below 15 and every ordinary
  original above 28. Smaller working sizes lose it (at 256 px a third of those blurs read sharper than the
  least sharp original; at 64 px nearly all); so do larger ones or none, where small photos are measured at
  a coarser scale than large ones (2 of 54 overlap at 768 px, 30 at the photos' own size).
  It scales with contrast squared: a low-contrast photo reads softer, and a photo darkened to a quarter or
  washed out may read blurry as well as dark or bright. Images under 3x3 pixels get 0.
* brightness: mean luma (ITU-R 601 weights, as Pillow's "L"), 0-255.
* contrast: standard deviation of luma, 0-255.
* entropy: Shannon entropy of the 256-bin luma histogram, bits: 0 for a flat image, at most 8 (photos 4.6-7.8).
* colorfulness (how far from grayscale): RMS distance of the chroma from neutral grey,
  sqrt(mean((Cb - 128)^2 + (Cr - 128)^2)) in Pillow's (JPEG's full-range) YCbCr, 0 to ~180: 0 for a grey
  image, also when it is stored as a colour JPEG; colour photos 5-65. Sampled on every n-th pixel (nearest)
  of a ~CHROMA_SIDE px grid: a mean needs no resolution.
* aspect: max(w, h) / min(w, h) of the image as given, >= 1.

brightness, contrast and entropy are read from the same working copy as sharpness (the box filter keeps the
mean and smooths the histogram of a large image a little).
"""


from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType

import numpy as np
from PIL import Image

WORKING_SIDE = 512  # px: the long side sharpness is measured at (images that are smaller: as they are)
CHROMA_SIDE = 128  # px: about the long side colorfulness is sampled at


@dataclass(frozen=True)
class Quality:
    sharpness: float  # variance of the Laplacian of luma at <= WORKING_SIDE px (0-255 scale)
    brightness: float  # mean luma, 0-255
    contrast: float  # std of luma, 0-255
    entropy: float  # bits of the 256-bin luma histogram, 0-8
    colorfulness: float  # RMS chroma distance from grey (YCbCr), 0 for a grey image
    aspect: float  # long side / short side, >= 1

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# flag -> (Quality field, "<" or ">"): an image is flagged when its signal is beyond the flag's threshold.
FLAGS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "blurry": ("sharpness", "<"),
    "dark": ("brightness", "<"),
    "bright": ("brightness", ">"),
    "low_information": ("entropy", "<"),
    "odd_aspect": ("aspect", ">"),
})

# Measured by bench/quality_thresholds.py on the real photos of scikit-image and scikit-learn at their own
# size, 640x480 and 1920x1080 against blurred, darkened, washed-out and flat copies of them (docs/BENCHMARKS.md,
# "Quality signals"): each sits between the worst original and the least degraded copy a user would flag.
DEFAULT_THRESHOLDS: Mapping[str, float] = MappingProxyType({
    "blurry": 20.0,
    "dark": 50.0,
    "bright": 185.0,
    "low_information": 3.0,
    "odd_aspect": 3.0,
})


def measure(image: Image.Image, *, working_side: int = WORKING_SIDE) -> Quality:
    """The quality signals of `image` (the upright decoded image, any mode; RGB is what the decoder gives).

    `working_side`: the long side sharpness (and the luma histogram) is measured at; the thresholds are
    measured at WORKING_SIDE, other values are for the bench."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    long_side = max(width, height)
    factor = long_side // working_side
    # reduced before the conversion: no full-size copy (a 100 Mpx photo's luma alone is 100 MB)
    luma = (image.reduce(factor) if factor > 1 else image).convert("L")
    if max(luma.size) > working_side:
        scale = working_side / max(luma.size)
        luma = luma.resize((max(1, round(luma.width * scale)), max(1, round(luma.height * scale))), Image.Resampling.BOX)
    levels = np.arange(256, dtype=np.float64)
    p = np.asarray(luma.histogram(), dtype=np.float64)
    p /= p.sum()
    brightness = float(p @ levels)
    contrast = math.sqrt(max(0.0, float(p @ (levels - brightness) ** 2)))
    nonzero = p[p > 0]
    entropy = max(0.0, float(-(nonzero @ np.log2(nonzero))))
    return Quality(_laplacian_variance(luma), brightness, contrast, entropy, _colorfulness(image, levels),
                   long_side / max(1, min(width, height)))


def _laplacian_variance(luma: Image.Image) -> float:
    if luma.width < 3 or luma.height < 3:
        return 0.0
    a = np.asarray(luma, dtype=np.int16)
    lap = a[:-2, 1:-1] + a[2:, 1:-1]
    lap += a[1:-1, :-2]
    lap += a[1:-1, 2:]
    lap -= 4 * a[1:-1, 1:-1]
    f = lap.astype(np.float32).ravel()
    mean = float(f.sum(dtype=np.float64)) / f.size
    return max(0.0, float(np.dot(f, f)) / f.size - mean * mean)


def _colorfulness(image: Image.Image, levels: np.ndarray) -> float:
    # nearest: every step-th pixel of each axis, the others never read
    step = max(1, max(image.size) // CHROMA_SIDE)
    if step > 1:
        image = image.resize((max(1, image.width // step), max(1, image.height // step)), Image.Resampling.NEAREST)
    hist = np.asarray(image.convert("YCbCr").histogram(), dtype=np.float64).reshape(3, 256)
    p = hist[1:] / hist[0].sum()
    return math.sqrt(max(0.0, float(p[0] @ (levels - 128.0) ** 2 + p[1] @ (levels - 128.0) ** 2)))


def flags_of(q: Quality, thresholds: Mapping[str, float | None]) -> list[str]:
    """The flags (in FLAGS order) whose rule `q` meets. A flag is off when `thresholds` lacks it or gives it
    None or a negative value (-1, as the configuration writes it: every signal is >= 0)."""
    out = []
    for flag, (field, op) in FLAGS.items():
        threshold = thresholds.get(flag)
        if threshold is None or threshold < 0:
            continue
        value = getattr(q, field)
        if (value < threshold) if op == "<" else (value > threshold):
            out.append(flag)
    return out
