"""The inference engines (issue 14): OpenVINO on the CPU vs torch, precisions and their agreement, the
artifact cache, the store's recorded mode, and a daemon that does not carry torch."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from poolwatch.daemon import runtime
from poolwatch.pipeline.calibration import Calibration
from poolwatch.pipeline.config import load_config
from poolwatch.pipeline.decode import preprocess
from poolwatch.pipeline.engine import CALIBRATION_COUNT, choose_mode
from poolwatch.pipeline.store import Store

from .conftest import encode, photo, run_cli

# A small lightly model, so that exports and quantizations take seconds.
TINY = ["lightly.pre_trained=false", "lightly.model.name=resnet-9",
        "lightly.model.num_ftrs=16", "lightly.collate.input_size=32", "lightly.loader.num_workers=0",
        "lightly.loader.batch_size=32"]

pytestmark = pytest.mark.usefixtures("own_artifact_cache")  # these tests look at the exports they cause


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Photo-like images at the model's input: the fixed set every mode is compared on (and int8's calibration)."""
    return np.stack([preprocess(photo(40_000 + i, (48, 40)), 32) for i in range(CALIBRATION_COUNT)])


def test_each_mode_agrees_with_torch_fp32_within_its_documented_bound(tmp_path: Path, pixels: np.ndarray) -> None:
    """fp32 on OpenVINO gives torch's vectors to float32 resolution; bf16 and int8 stay within the agreement
    docs/BENCHMARKS.md records (cosine to fp32); every mode is an identity of its own; int8's artifact is
    reused, so its vectors do not change across loads."""
    shared = tmp_path / "shared"
    base = [f"shared_dir={shared}", f"input_dir={tmp_path / 'in'}", *TINY]
    torch_fp32 = runtime.load_engine(load_config([*base, "model.runtime=torch", "embedding_precision=fp32",
                                                  "check.exact_decode=true"]))
    assert torch_fp32.runtime == "torch"
    reference = torch_fp32.embed(pixels)
    hashes = [f"{i:064x}" for i in range(len(pixels))]
    engines = {}
    for precision in ("fp32", "bf16", "int8"):
        config = load_config([*base, f"embedding_precision={precision}", "check.exact_decode=true"])
        with Store.open(config.store_path) as store:
            engines[precision] = runtime.load_engine(config, calibrate=lambda _s: Calibration(pixels, hashes), store=store)
    assert {e.runtime for e in engines.values()} == {"openvino"}
    assert engines["int8"].precision == "int8"
    fp32 = engines["fp32"].embed(pixels)
    np.testing.assert_allclose(fp32, reference, rtol=1e-5, atol=1e-4)
    assert engines["fp32"].identity == torch_fp32.identity  # one fp32 identity whatever the runtime
    assert cosines(engines["bf16"].embed(pixels), reference).min() > 0.999
    int8 = engines["int8"].embed(pixels)
    assert np.median(cosines(int8, reference)) > 0.99
    identities = {e.identity for e in engines.values()}
    assert len(identities) == 3 and all(i.startswith(torch_fp32.info.weights_hash) for i in identities)

    # A second load finds the quantized artifact: the same identity and byte-identical vectors.
    config = load_config([*base, "embedding_precision=int8", "check.exact_decode=true"])
    with Store.open(config.store_path) as store:
        again = runtime.load_engine(config, calibrate=lambda _s: pytest.fail("calibrated twice"), store=store)  # type: ignore[arg-type,return-value]
    assert again.identity == engines["int8"].identity
    assert again.embed(pixels).tobytes() == int8.tobytes()


@pytest.mark.parametrize(("stored", "current", "configured", "runs", "expected"), [
    (None, None, "auto", {"fp32", "bf16", "int8"}, ("bf16", True)),  # a new store decides once
    (None, None, "auto", {"fp32", "int8"}, ("fp32", True)),  # int8 fails the quality rule: never auto's
    (None, {"name": "resnet-18"}, "auto", {"fp32", "bf16", "int8"}, ("fp32", True)),  # a store made before modes
    (None, {"name": "resnet-18", "precision": "bf16"}, "auto", {"fp32", "bf16", "int8"}, ("bf16", True)),
    ({"precision": "int8", "exact_decode": False}, None, "auto", {"fp32", "bf16", "int8"}, ("int8", False)),
    ({"precision": "bf16", "exact_decode": False}, None, "auto", {"fp32", "int8"}, ("fp32", False)),  # moved: no bf16
    ({"precision": "int8", "exact_decode": False}, None, "fp32", {"fp32", "bf16", "int8"}, ("fp32", False)),  # explicit
])
def test_the_store_keeps_its_mode(stored: dict | None, current: dict | None, configured: str, runs: set[str],
                                  expected: tuple[str, bool]) -> None:
    choice = choose_mode(configured, None, stored, current, runs.__contains__, gpu=False)
    assert (choice.precision, choice.exact_decode) == expected
    # what was chosen is recorded, and `auto` keeps it from then on
    again = choose_mode("auto", None, choice.record, current, runs.__contains__, gpu=False)
    assert (again.precision, again.exact_decode, again.changed) == (*expected, False)
    assert choice.changed == (choice.record != stored)


def _ingest(inp: Path, shared: Path, *extra: str) -> dict:
    proc = run_cli("ingest", "--json", f"input_dir={inp}", f"shared_dir={shared}", *TINY, *extra, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_store_made_before_modes_is_not_reembedded_and_a_cached_start_imports_no_torch(tmp_path: Path) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    inp.mkdir()
    for i in range(6):
        (inp / f"p{i}.jpg").write_bytes(encode(photo(900 + i, (80, 60))))
    # a store as the last release made it: torch, fp32, full decode, no recorded mode
    first = _ingest(inp, shared, "model.runtime=torch", "embedding_precision=fp32", "check.exact_decode=true")
    assert first["ok"] == 6
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        conn.execute("DELETE FROM settings")
        before = conn.execute("SELECT id, weights_hash FROM models WHERE is_current = 1").fetchone()
    # the defaults (auto, decode mode null) keep its model: nothing is embedded again
    code = ("import json, sys; from poolwatch.daemon.cli import main; rc = main(sys.argv[1:]);"
            " print(json.dumps({'torch': 'torch' in sys.modules, 'rc': rc}))")
    args = ["ingest", f"input_dir={inp}", f"shared_dir={shared}", *TINY]
    for _ in range(2):  # the first builds the OpenVINO artifact (in a child), the second finds it cached
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out == {"torch": False, "rc": 0}, proc.stderr[-3000:]
        assert "0 forward passes" in proc.stdout
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        assert conn.execute("SELECT id, weights_hash FROM models WHERE is_current = 1").fetchone() == before
        assert json.loads(conn.execute("SELECT value FROM settings WHERE key = 'embedding'").fetchone()[0])["precision"] == "fp32"
    # an explicit precision is a model change like any other
    assert _ingest(inp, shared, "embedding_precision=bf16")["ok"] == 6


def test_a_daemon_on_a_fresh_store_switches_to_int8_once_it_can_calibrate_and_never_loads_torch(
        tmp_path: Path, daemons: list) -> None:
    """int8 on a fresh store: the daemon embeds in the best mode that needs no calibration (bf16 here, when
    the CPU runs it), and once it holds CALIBRATION_COUNT ok images it calibrates int8 on them and switches,
    re-embedding what it stored so far in the background. Exports and the quantization run in the model
    builder's child: the daemon process itself never maps libtorch."""
    from poolwatch.pipeline.openvino_engine import runnable

    from .test_daemon import Daemon, query, wait_for, write_images

    if not runnable("int8"):
        pytest.skip("this CPU's OpenVINO has no int8")
    inp, shared = tmp_path / "in", tmp_path / "shared"
    inp.mkdir()
    d = Daemon(tmp_path, [inp], shared, *TINY, "lightly.loader.num_workers=1", "embedding_precision=int8")
    daemons.append(d)
    d.start()
    write_images(inp, [(f"a_{i:03d}.jpg", 50_000 + i) for i in range(CALIBRATION_COUNT + 20)], size=(48, 40))

    def current_precision() -> str | None:
        rows = query(shared, "SELECT arch FROM models WHERE is_current = 1")
        return json.loads(rows[0][0])["precision"] if rows else None

    wait_for(lambda: current_precision() == "int8", 240, "the switch to int8", d)
    int8_model = query(shared, "SELECT id, arch FROM models WHERE is_current = 1")[0]
    assert json.loads(int8_model[1])["calibration"]
    wait_for(lambda: query(shared, f"SELECT COUNT(*) FROM embeddings WHERE model_id = {int8_model[0]}")[0][0]
             == CALIBRATION_COUNT + 20, 240, "re-embedding with the int8 model", d)
    assert query(shared, "SELECT COUNT(*) FROM images WHERE status = 'ok'")[0][0] == CALIBRATION_COUNT + 20
    maps = Path(f"/proc/{d.pid}/maps").read_text()
    assert "libtorch" not in maps and "openvino" in maps


def test_a_cancelled_build_stops_the_child_at_once_and_leaves_no_artifact(tmp_path: Path) -> None:
    """A daemon stopping while it builds (int8's calibration can take a minute) does not wait for the child."""
    import threading
    import time

    from poolwatch.daemon.model_child import build_in_child
    from poolwatch.pipeline.errors import BuildError

    root = tmp_path / "artifacts"
    request = {"kind": "lightly", "key": "k", "models_dir": str(tmp_path / "models"), "artifacts": str(root),
               "ir": "f32", "spec": {"name": "resnet-9", "width": 1.0, "num_ftrs": 16, "out_dim": 128, "input_size": 32},
               "checkpoint": None, "trained": None, "weights_file": None, "pretrained": False, "seed": 1}
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(BuildError, match="cancelled"):
        build_in_child(request, cancel)
    assert time.monotonic() - started < 5
    assert not root.exists() or not [p for p in root.iterdir() if not p.name.startswith(".")]


def test_one_cache_keeps_the_same_weights_at_two_input_sizes_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights of a resnet do not depend on the input size, its artifact does (the IR's input shape)."""
    monkeypatch.setenv("POOLWATCH_ARTIFACTS", str(tmp_path / "cache"))
    engines = {}
    for size in (32, 48):
        config = load_config([f"shared_dir={tmp_path / f'shared{size}'}", f"input_dir={tmp_path / 'in'}", *TINY,
                              f"lightly.collate.input_size={size}", "embedding_precision=fp32"])
        engines[size] = runtime.load_engine(config)
        out = engines[size].embed(np.zeros((2, size, size, 3), dtype=np.uint8))
        assert out.shape == (2, 16)
    assert engines[32].info.weights_hash == engines[48].info.weights_hash
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name != "requests"]) == 2
