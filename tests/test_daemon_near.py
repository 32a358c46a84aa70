"""Verdicts on arrival in the real daemon: real inotify events, real photos, a real scrape of /metrics, kill -9."""

from __future__ import annotations

import csv
import io
import signal
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter

from .photos import DISTINCT, near_copy, photo_jpeg
from .test_daemon import Daemon, query, run_folders, wait_for


def links(shared: Path) -> dict[str, tuple[str | None, float | None]]:
    """relpath -> (relpath of its near original, distance) for every image."""
    rows = query(shared, "SELECT i.relpath, o.relpath, i.near_distance FROM images i"
                         " LEFT JOIN images o ON o.id = i.near_duplicate_of")
    return {r[0]: (r[1], r[2]) for r in rows}


def calibrated(shared: Path) -> bool:
    return bool(query(shared, "SELECT 1 FROM settings WHERE key LIKE 'near_duplicate.threshold %'"))


def degraded(data: bytes, how: str) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = image.filter(ImageFilter.GaussianBlur(4)) if how == "blurred" else ImageEnhance.Brightness(image).enhance(0.2)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_copies_dropped_later_are_linked_counted_per_source_and_kept_out_of_the_run(tmp_path: Path,
                                                                                    daemons: list[Daemon]) -> None:
    inp, shared = (tmp_path / "input").resolve(), (tmp_path / "shared").resolve()
    cam_a, cam_b = inp / "cam_a", inp / "cam_b"
    cam_a.mkdir(parents=True)
    cam_b.mkdir()
    daemon = Daemon(tmp_path, [inp], shared, "source.depth=1", "quality.exclude=[blurry]", "stopping_condition.n_samples=5",
                    name="near")
    daemons.append(daemon)
    daemon.start()

    originals = {name: photo_jpeg(name) for name in DISTINCT[:10]}
    for name, data in originals.items():
        (cam_a / f"{name}.jpg").write_bytes(data)
    wait_for(lambda: calibrated(shared), 60, "the near-duplicate threshold to be calibrated", daemon)
    wait_for(lambda: len(links(shared)) == 10, 30, "the 10 photos in the store", daemon)
    assert all(of is None for of, _d in links(shared).values()), "distinct photos are not linked"

    # Later, from another camera: a resized, recompressed copy; a blurred and a darkened copy of other photos.
    (cam_b / "chelsea_small.jpg").write_bytes(near_copy(originals["chelsea"]))
    (cam_b / "coffee_blurred.jpg").write_bytes(degraded(originals["coffee"], "blurred"))
    (cam_b / "rocket_dark.jpg").write_bytes(degraded(originals["rocket"], "dark"))
    wait_for(lambda: len(links(shared)) == 13, 30, "the copies in the store", daemon)
    found = links(shared)
    assert found["cam_b/chelsea_small.jpg"][0] == "cam_a/chelsea.jpg" and found["cam_b/chelsea_small.jpg"][1] > 0
    assert all(of is None for rel, (of, _d) in found.items() if rel.startswith("cam_a/"))
    # A blurred or darkened copy may be a near copy too (of its own original only); its flags say what it is.
    assert {found[f"cam_b/{n}"][0] for n in ("coffee_blurred.jpg", "rocket_dark.jpg")} <= {None, "cam_a/coffee.jpg",
                                                                                           "cam_a/rocket.jpg"}
    linked_b = sum(1 for rel, (of, _d) in found.items() if rel.startswith("cam_b/") and of is not None)
    sharpness = dict(query(shared, "SELECT relpath, sharpness FROM images"))
    assert sharpness["cam_b/coffee_blurred.jpg"] < 20 <= sharpness["cam_a/coffee.jpg"]

    source_b = str(cam_b)
    wait_for(lambda: daemon.metric("poolwatch_source_images_total", source=source_b, verdict="near_duplicate") == linked_b,
             10, "the copy counted as a near duplicate of source cam_b", daemon)
    assert daemon.metric("poolwatch_source_images_total", source=str(cam_a), verdict="ok") == 10
    assert daemon.metric("poolwatch_source_quality_flags_total", source=source_b, flag="blurry") >= 1
    assert daemon.metric("poolwatch_source_quality_flags_total", source=source_b, flag="dark") >= 1
    assert daemon.metric("poolwatch_source_novelty_distance_count", source=source_b) == 3
    assert daemon.metric("poolwatch_near_duplicate_threshold") > 0

    daemon.send(signal.SIGUSR1)
    wait_for(lambda: run_folders(shared), 60, "a sampling run", daemon)
    run = shared / "runs" / run_folders(shared)[-1]
    wait_for(lambda: (run / "data" / "embeddings.csv").exists(), 30, "the run's outputs", daemon)
    with open(run / "data" / "embeddings.csv", newline="") as fh:
        candidates = {row["filenames"] for row in csv.DictReader(fh)}
    assert "cam_b/chelsea_small.jpg" not in candidates, "a near copy is not a candidate"
    assert "cam_b/coffee_blurred.jpg" not in candidates, "quality.exclude=[blurry]"
    assert {f"cam_a/{name}.jpg" for name in originals} <= candidates
    assert "cam_b/chelsea_small.jpg" in (run / "filenames" / "near_duplicate_filenames.txt").read_text().split()

    # kill -9, then a start that finds the index as the dead process left it: links kept, index repaired.
    before = links(shared)
    daemon.send(signal.SIGKILL)
    daemon.proc.wait(30)  # type: ignore[union-attr]
    daemon.start()
    assert links(shared) == before, "0 lost links"
    (cam_b / "flower_small.jpg").write_bytes(near_copy(originals["flower"], scale=0.5))
    wait_for(lambda: links(shared).get("cam_b/flower_small.jpg", (None,))[0] == "cam_a/flower.jpg", 30,
             "a copy dropped after the restart linked", daemon)
    assert daemon.count_log("near-duplicate index of model") == 1
