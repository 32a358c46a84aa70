"""Real photographs for tests, from the scikit-image and scikit-learn wheels (nothing is downloaded)."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
from PIL import Image

# Different photos (not crops of one another; the stereo pair's right image is left out: it is a near copy).
DISTINCT = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
            "motorcycle_left", "china", "flower", "camera", "coins", "clock")


@cache
def real_photo(name: str) -> Image.Image:
    """One of DISTINCT as an RGB image."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data as sk

        arr = sk.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(sk, name)()
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")


def photo_jpeg(name: str, size: tuple[int, int] = (320, 240), quality: int = 90) -> bytes:
    buf = io.BytesIO()
    real_photo(name).resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def near_copy(data: bytes, scale: float = 0.6, quality: int = 70) -> bytes:
    """What a user calls a near duplicate: the image downscaled and re-encoded at a lower JPEG quality."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    buf = io.BytesIO()
    image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR).save(buf, "JPEG",
                                                                                                      quality=quality)
    return buf.getvalue()
