"""model.onnx: the user's own ONNX image embedder on OpenVINO, end to end through the CLI, and the files it refuses.

The ONNX files are written here by a minimal protobuf encoder (ONNX is plain protobuf): neither the `onnx`
package nor torch's exporter (which needs it) is a dependency of poolwatch.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poolwatch.pipeline.decode import preprocess
from poolwatch.pipeline.engine import CALIBRATION_COUNT

from .conftest import POOLWATCH, encode, photo, run_cli

SIZE = 32
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not the defaults: the preprocessing must reach the model
BASE = ["lightly.loader.num_workers=0", "check.exact_decode=true", f"model.input_size={SIZE}",
        "model.mean=[" + ",".join(map(str, MEAN)) + "]", "model.std=[" + ",".join(map(str, STD)) + "]"]

pytestmark = pytest.mark.usefixtures("own_artifact_cache")  # these tests look at the exports they cause


# ---- a minimal ONNX writer (field numbers from onnx/onnx.proto) -------------------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative int64 is ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: an int is a varint, str and bytes (strings, sub-messages) are length-delimited."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, array: np.ndarray) -> bytes:  # TensorProto, FLOAT
    return b"".join([*(_field(1, d) for d in array.shape), _field(2, 1), _field(8, name),
                     _field(9, np.ascontiguousarray(array, "<f4").tobytes())])


def _value_info(name: str, dims: list[int | str]) -> bytes:  # ValueInfoProto of a float tensor; a str dim is symbolic
    shape = b"".join(_field(1, _field(1, d) if isinstance(d, int) else _field(2, d)) for d in dims)
    return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, shape)))


def _node(op: str, inputs: list[str], outputs: list[str], **attrs: int | list[int]) -> bytes:
    parts = [*(_field(1, i) for i in inputs), *(_field(2, o) for o in outputs), _field(4, op)]
    for name, value in attrs.items():
        if isinstance(value, list):  # INTS
            attr = _field(1, name) + b"".join(_field(8, v) for v in value) + _field(20, 7)
        else:  # INT
            attr = _field(1, name) + _field(3, value) + _field(20, 2)
        parts.append(_field(5, attr))
    return b"".join(parts)


def onnx_model(nodes: list[bytes], weights: dict[str, np.ndarray], inputs: list[tuple[str, list[int | str]]],
               outputs: list[tuple[str, list[int | str]]]) -> bytes:
    graph = b"".join([*(_field(1, n) for n in nodes), _field(2, "test"),
                      *(_field(5, _tensor(k, v)) for k, v in weights.items()),
                      *(_field(11, _value_info(*i)) for i in inputs), *(_field(12, _value_info(*o)) for o in outputs)])
    # ir_version 7, opset 13 of the default domain
    return _field(1, 7) + _field(2, "poolwatch-tests") + _field(7, graph) + _field(8, _field(1, "") + _field(2, 13))


# ---- the embedder -----------------------------------------------------------------------------------
def conv_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    w = {"w": rng.normal(0, 0.3, (8, 3, 3, 3)), "b": rng.normal(0, 0.1, 8),
         "lw": rng.normal(0, 0.3, (12, 8)), "lb": rng.normal(0, 0.1, 12)}
    return {k: v.astype(np.float32) for k, v in w.items()}


def conv_net(w: dict[str, np.ndarray]) -> bytes:
    """Conv2d(3, 8, 3, stride 2) → ReLU → global average pool → flatten ('features', 8-d, the FIRST output)
    → Linear(8, 12) ('embedding'); a dynamic batch."""
    nodes = [_node("Conv", ["pixels", "w", "b"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
             _node("Relu", ["c"], ["r"]), _node("GlobalAveragePool", ["r"], ["p"]),
             _node("Flatten", ["p"], ["features"], axis=1), _node("Gemm", ["features", "lw", "lb"], ["embedding"], transB=1)]
    return onnx_model(nodes, w, [("pixels", ["n", 3, SIZE, SIZE])], [("features", ["n", 8]), ("embedding", ["n", 12])])


def conv_net_numpy(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """What conv_net computes, in numpy: proof that the file means what the test thinks."""
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
    conv = np.einsum("nchwij,ocij->nohw", windows, w["w"]) + w["b"][:, None, None]
    return np.maximum(conv, 0).mean((2, 3)) @ w["lw"].T + w["lb"]


def normalized(pixels: np.ndarray) -> np.ndarray:
    """N×s×s×3 uint8 → the model's NCHW float input, (x/255 - mean) / std."""
    x = (pixels.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def openvino_reference(path: Path, pixels: np.ndarray, output: str = "embedding") -> np.ndarray:
    """The ONNX file run by OpenVINO as it is (no poolwatch), in f32."""
    import openvino as ov

    compiled = ov.Core().compile_model(ov.Core().read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.array(compiled.create_infer_request().infer({0: normalized(pixels)})[compiled.output(output)])


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "embedder.onnx"
    path.write_bytes(conv_net(conv_weights()))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i in range(20):
        (root / f"p_{i:02d}.jpg").write_bytes(encode(photo(7_000 + i, (64, 48))))
    return root


def decoded(root: Path, relpaths: list[str]) -> np.ndarray:
    """The files as exact decoding gives them to the model (check.exact_decode=true)."""
    return np.stack([preprocess(Image.open(root / r), SIZE) for r in relpaths])


def stored_vectors(shared: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        conn.row_factory = sqlite3.Row
        model = dict(conn.execute("SELECT * FROM models WHERE is_current = 1").fetchone())
        rows = conn.execute("SELECT i.relpath, e.vector FROM embeddings e JOIN images i ON i.id = e.image_id "
                            "WHERE e.model_id = ?", (model["id"],)).fetchall()
    model["arch"] = json.loads(model["arch"])
    return model, {r["relpath"]: np.frombuffer(r["vector"], dtype=np.float32) for r in rows}


def cli(command: str, inp: Path, shared: Path, *extra: str) -> dict:
    proc = run_cli(command, "--json", f"input_dir={inp}", f"shared_dir={shared}", *BASE, *extra, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_onnx_model_end_to_end(embedder: Path, photos: Path, tmp_path: Path) -> None:
    """ingest embeds with the ONNX model's chosen output; the vectors are the model's own; sample selects and
    reports on them; status names the model; a second ingest (the file named relative to shared_dir) reuses
    the artifact and the vectors."""
    shared = tmp_path / "shared"
    first = cli("ingest", photos, shared, f"model.onnx={embedder}", "model.output=embedding", "embedding_precision=fp32")
    assert first["ok"] == 20 and first["forward_passes"] >= 1
    artifacts = sorted(p.name for p in (shared / "models" / "artifacts").iterdir())
    assert artifacts, "no artifact cached"

    model, vectors = stored_vectors(shared)
    assert model["source"] == "onnx" and model["dim"] == 12 and model["input_size"] == SIZE
    assert model["weights_hash"].startswith("onnx:")
    assert model["arch"]["precision"] == "fp32" and model["arch"]["output"] == "embedding"
    names = sorted(vectors)
    assert len(names) == 20
    got = np.stack([vectors[n] for n in names])
    pixels = decoded(photos, names)
    reference = openvino_reference(embedder, pixels)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, conv_net_numpy(conv_weights(), normalized(pixels).astype(np.float64)),
                               rtol=1e-4, atol=1e-4)

    run = cli("sample", photos, shared, f"model.onnx={embedder}", "model.output=embedding", "embedding_precision=fp32",
              "stopping_condition.n_samples=5")
    assert run["n_candidates"] == 20 and run["n_selected"] == 5
    assert run["ingest"]["forward_passes"] == 0
    out = Path(run["output_dir"])
    for name in ("data/embeddings.csv", "data/selected_embeddings.csv", "filenames/sampled_filenames.txt",
                 "report.json", "report.pdf"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")
    with open(out / "data" / "embeddings.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["filenames", *(f"embedding_{i}" for i in range(12)), "labels"]
    csv_vectors = {r[0]: np.array(r[1:13], dtype=np.float32) for r in rows[1:]}
    assert sorted(csv_vectors) == names
    unit = got / np.linalg.norm(got, axis=1, keepdims=True)  # the run's outputs are normalised (normalize_embeddings)
    np.testing.assert_allclose(np.stack([csv_vectors[n] for n in names]), unit, rtol=1e-5, atol=1e-6)
    with open(out / "data" / "selected_embeddings.csv", newline="") as fh:
        assert len(list(csv.reader(fh))) == 1 + 5
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["source"] == "onnx" and report["selected"] == 5

    status = run_cli("status", "--json", f"shared_dir={shared}", timeout=120)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["embedded"] == 20
    assert shown["model"]["source"] == "onnx" and shown["model"]["dim"] == 12
    assert shown["model"]["weights_hash"] == model["weights_hash"] and shown["model"]["arch"]["onnx"] == embedder.name

    # The same file, named relative to shared_dir: the same model, its artifact and its vectors.
    (shared / "mine").mkdir()
    (shared / "mine" / "e.onnx").write_bytes(embedder.read_bytes())
    again = cli("ingest", photos, shared, "model.onnx=mine/e.onnx", "model.output=embedding", "embedding_precision=fp32")
    assert again["forward_passes"] == 0 and again["processed"] == 0
    after, vectors_after = stored_vectors(shared)
    assert after["id"] == model["id"] and after["weights_hash"] == model["weights_hash"]
    assert all(vectors_after[n].tobytes() == vectors[n].tobytes() for n in names)
    assert sorted(p.name for p in (shared / "models" / "artifacts").iterdir()) == artifacts


def test_model_output_picks_the_embedding(embedder: Path) -> None:
    """'' keeps the first output (here the 8-d features); a name keeps that output alone."""
    from poolwatch.pipeline.openvino_engine import read_onnx

    first = read_onnx(embedder, "")
    assert [sorted(o.get_names()) for o in first.outputs] == [["features"]]
    chosen = read_onnx(embedder, "embedding")
    assert [sorted(o.get_names()) for o in chosen.outputs] == [["embedding"]]
    assert chosen.outputs[0].get_partial_shape()[1].get_length() == 12


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, (proc.returncode, stderr[-3000:])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("poolwatch: error: model.onnx"), lines[0]
    return lines[0]


def bad_model(kind: str, folder: Path) -> tuple[Path, list[str]]:
    """A model.onnx poolwatch must refuse, and the options it is run with."""
    path = folder / f"{kind}.onnx"
    w = conv_weights()
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(3).bytes(4000))
    elif kind == "truncated":  # a download cut short
        whole = conv_net(w)
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "rank-2-input":
        path.write_bytes(onnx_model([_node("Gemm", ["x", "lw", "lb"], ["embedding"], transB=1)],
                                    {"lw": np.ones((4, 12)), "lb": np.zeros(4)}, [("x", ["n", 12])], [("embedding", ["n", 4])]))
    elif kind == "no-such-output":
        path.write_bytes(conv_net(w))
        return path, ["model.output=nope"]
    elif kind == "one-channel-input":
        path.write_bytes(onnx_model([_node("Conv", ["pixels", "w", "b"], ["c"], kernel_shape=[3, 3]),
                                     _node("GlobalAveragePool", ["c"], ["p"]), _node("Flatten", ["p"], ["embedding"], axis=1)],
                                    {"w": w["w"][:, :1], "b": w["b"]}, [("pixels", ["n", 1, SIZE, SIZE])],
                                    [("embedding", ["n", 8])]))
    elif kind == "fixed-size-positional":  # like a ViT's positional embedding: shape inference refuses other sizes
        rng = np.random.default_rng(5)
        path.write_bytes(onnx_model([_node("Conv", ["pixels", "w", "b"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
                                     _node("Add", ["c", "pos"], ["a"]), _node("GlobalAveragePool", ["a"], ["p"]),
                                     _node("Flatten", ["p"], ["embedding"], axis=1)],
                                    {**w, "pos": rng.normal(0, 0.1, (1, 8, 15, 15))},
                                    [("pixels", ["n", 3, SIZE, SIZE])], [("embedding", ["n", 8])]))
        return path, ["model.input_size=48"]
    elif kind == "fixed-size-flatten":  # flattens the whole image: it compiles at other sizes, and fails to run
        rng = np.random.default_rng(5)
        path.write_bytes(onnx_model([_node("Flatten", ["pixels"], ["f"], axis=1),
                                     _node("Gemm", ["f", "lw", "lb"], ["embedding"], transB=1)],
                                    {"lw": rng.normal(0, 0.01, (12, 3 * SIZE * SIZE)), "lb": np.zeros(12)},
                                    [("pixels", ["n", 3, SIZE, SIZE])], [("embedding", ["n", 12])]))
        return path, ["model.input_size=48"]
    return path, []


@pytest.mark.parametrize("kind", ["random-bytes", "truncated", "empty", "missing", "rank-2-input", "one-channel-input",
                                  "no-such-output", "fixed-size-positional", "fixed-size-flatten"])
def test_bad_onnx_model_exits_2_with_one_line(kind: str, photos: Path, tmp_path: Path) -> None:
    path, extra = bad_model(kind, tmp_path)
    # INFO logs (the store's mode, recorded before the model loads) are not the error: WARNING and above only.
    # Not text=True: a parser that printed the file's bytes to stderr must fail the test, not its decoding.
    proc = subprocess.run([*POOLWATCH, "ingest", "--log-level", "WARNING", f"input_dir={photos}",
                           f"shared_dir={tmp_path / 'shared'}", *BASE, f"model.onnx={path}", "embedding_precision=fp32",
                           *extra], capture_output=True, timeout=120)
    line = _one_error_line(proc)
    assert str(path) in line
    expected = {"random-bytes": "not a readable ONNX model", "truncated": "not a readable ONNX model",
                "empty": "has 0 inputs", "missing": "does not exist", "rank-2-input": "rank-2",
                "one-channel-input": "takes 1-channel images", "no-such-output": "outputs: features, embedding",
                "fixed-size-positional": "does not take an Nx3x48x48 input (model.input_size)",
                "fixed-size-flatten": "does not run on a 1x3x48x48 input (model.input_size)"}[kind]
    assert expected in line, line
    with sqlite3.connect(tmp_path / "shared" / "poolwatch.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0] == 0


def test_onnx_model_in_int8(embedder: Path, tmp_path: Path) -> None:
    """embedding_precision=int8: calibrated on the pass's first images, quantized in the child; the vectors
    agree with the model's own fp32 ones."""
    inp, shared = tmp_path / "in", tmp_path / "shared"
    inp.mkdir()
    for i in range(CALIBRATION_COUNT):
        (inp / f"q_{i:03d}.jpg").write_bytes(encode(photo(20_000 + i, (40, 32))))
    result = cli("ingest", inp, shared, f"model.onnx={embedder}", "model.output=embedding", "embedding_precision=int8")
    assert result["ok"] == CALIBRATION_COUNT
    model, vectors = stored_vectors(shared)
    assert model["source"] == "onnx" and model["arch"]["precision"] == "int8" and model["dim"] == 12
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        calibration = json.loads(conn.execute("SELECT value FROM settings WHERE key LIKE 'calibration %'").fetchone()[0])
    assert len(calibration["images"]) == CALIBRATION_COUNT
    assert model["weights_hash"].startswith("onnx:") and model["weights_hash"].endswith(f"+int8.{calibration['hash'][:12]}")
    assert model["arch"]["calibration"] == calibration["hash"]
    (artifact,) = [p for p in (shared / "models" / "artifacts").iterdir() if p.name != "requests"]
    meta = json.loads((artifact / "meta.json").read_text())
    assert meta["ir"] == f"int8.{calibration['hash'][:12]}"
    assert meta["calibration"]["hash"] == calibration["hash"] and meta["calibration"]["count"] == CALIBRATION_COUNT
    assert b"FakeQuantize" in (artifact / "model.xml").read_bytes()
    names = sorted(vectors)
    assert len(names) == CALIBRATION_COUNT
    int8 = np.stack([vectors[n] for n in names])
    fp32 = openvino_reference(embedder, decoded(inp, names))
    cos = (int8 * fp32).sum(1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(fp32, axis=1)
    assert np.median(cos) > 0.99, np.percentile(cos, [0, 10, 50])
    assert not np.allclose(int8, fp32, rtol=1e-4, atol=1e-5)  # it is quantized, not fp32 under another name
