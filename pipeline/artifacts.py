"""The artifact cache (`<shared_dir>/models/artifacts/`, or $POOLWATCH_ARTIFACTS): a model exported once
(OpenVINO IR with its preprocessing, or its int8 quantization), reused on every start without torch.

    artifacts/<name>/{model.xml, model.bin, meta.json}   one per weights hash and IR kind (f32 | int8.<calib>)
    artifacts/requests/<key>.json                        {"artifact": <name>}: what a configuration resolved to

An artifact directory is built beside its final name and renamed into place, so one that exists is
complete; two builders racing both succeed and one result is kept. A request key hashes what the
configuration asks for before anything is loaded (`modelspec.WeightsRef.key`, the architecture, the IR
kind), so a start finds its artifact by hashing the weights file alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from .atomic import replacing
from .modelspec import ModelInfo, ModelSpec, WeightsRef

FORMAT = 2  # bump when the artifacts' layout or their preprocessing changes
ARTIFACT_FILES = ("model.xml", "model.bin", "meta.json")


def lightly_request(spec: ModelSpec, ref: WeightsRef, ir: str) -> dict[str, Any]:
    """What identifies a lightly model's artifact before it is loaded (its cache key's input); `ir` is
    f32 or int8.<calibration hash>."""
    return {"kind": "lightly", "arch": spec.arch(), "input_size": spec.input_size, "weights": ref.key(), "ir": ir}


def onnx_request(file_hash: str, input_size: int, mean: list[float], std: list[float], output: str, ir: str) -> dict[str, Any]:
    return {"kind": "onnx", "file": file_hash, "input_size": input_size, "mean": mean, "std": std, "output": output, "ir": ir}


def request_key(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **request}, sort_keys=True).encode()).hexdigest()[:32]


def artifact_name(info: ModelInfo, ir: str) -> str:
    """One per weights, input size (the IR's input shape) and IR kind."""
    return f"{info.name.replace('/', '_').replace(':', '_')}-{info.weights_hash[:16]}-{info.input_size}px-{ir}"


def lookup(root: Path, key: str) -> tuple[Path, dict[str, Any]] | None:
    """The artifact a request resolved to and its meta, or None (never built, or removed since). The meta's
    `info` is the request's own: one artifact serves every request for the same weights (a checkpoint named
    by checkpoint= and by $POOLWATCH_WEIGHTS), each with its provenance."""
    try:
        alias = json.loads((root / "requests" / f"{key}.json").read_text())
        path = root / alias["artifact"]
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ((path / "model.xml").is_file() and (path / "model.bin").is_file()):
        return None
    if isinstance(alias.get("info"), dict):
        meta["info"] = alias["info"]
    return path, meta


def remember(root: Path, key: str, artifact: Path, info: ModelInfo) -> None:
    with replacing(root / "requests" / f"{key}.json", "w") as fh:
        json.dump({"artifact": artifact.name, "info": info.to_json()}, fh)


def pack(root: Path, key: str) -> bytes | None:
    """The artifact a request resolved to and its alias as one tar, for a shared store (None: not cached here)."""
    found = lookup(root, key)
    if found is None:
        return None
    path, _meta = found
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ARTIFACT_FILES:
            tar.add(path / name, arcname=f"{path.name}/{name}")
        alias = (root / "requests" / f"{key}.json").read_bytes()
        info = tarfile.TarInfo("request.json")
        info.size = len(alias)
        tar.addfile(info, io.BytesIO(alias))
    return buf.getvalue()


def unpack(root: Path, key: str, data: bytes) -> tuple[Path, dict[str, Any]] | None:
    """Cache an artifact `pack` made (on another node) under `root`, as a build would; returns `lookup`'s answer.
    Only the members it names are read, so a tar cannot write anywhere else."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        def member(name: str) -> bytes:
            fh = tar.extractfile(name)
            if fh is None:
                raise ValueError(f"{name} is not a file")
            return fh.read()

        alias = json.loads(member("request.json"))
        name = str(alias["artifact"])
        if "/" in name or name.startswith("."):
            raise ValueError(f"not an artifact name: {name!r}")
        files = {f: member(f"{name}/{f}") for f in ARTIFACT_FILES}

    def save(directory: Path) -> None:
        for f in ("model.xml", "model.bin"):
            (directory / f).write_bytes(files[f])

    publish(root, name, save, json.loads(files["meta.json"]))
    with replacing(root / "requests" / f"{key}.json", "w") as fh:
        json.dump(alias, fh)
    return lookup(root, key)


def _remove_orphans(root: Path) -> None:
    """Temp dirs of builders that died (killed mid-build): `.<name>.<pid>.<random>` whose pid is gone."""
    for path in root.glob(".*.*.*"):
        pid = path.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


def publish(root: Path, name: str, save: Any, meta: dict[str, Any]) -> Path:
    """Build an artifact with `save(dir)` (it writes model.xml and model.bin) and rename it into place."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if (final / "meta.json").is_file():
        return final
    _remove_orphans(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", dir=root))
    try:
        save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            # another builder published the same artifact first: keep theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return final
