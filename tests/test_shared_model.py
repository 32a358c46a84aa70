"""What every node must embed with lives in a shared store: the exported (int8: quantized) artifact and its
calibration, trained weights. A second node with its own shared_dir and cache takes them from PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from poolwatch.daemon import runtime
from poolwatch.pipeline.calibration import Calibration
from poolwatch.pipeline.config import load_config
from poolwatch.pipeline.decode import preprocess
from poolwatch.pipeline.engine import CALIBRATION_COUNT
from poolwatch.pipeline.ingest import activate_model
from poolwatch.pipeline.store import Store

from .conftest import photo
from .test_engine import TINY

pytestmark = pytest.mark.usefixtures("own_artifact_cache")  # each node's cache is its own <shared_dir>/models


def test_an_int8_artifact_made_on_one_node_is_the_other_nodes_model(tmp_path: Path, pg_url: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    pixels = np.stack([preprocess(photo(60_000 + i, (48, 40)), 32) for i in range(CALIBRATION_COUNT)])
    hashes = [f"{i:064x}" for i in range(len(pixels))]  # images only node a holds: b could not calibrate on them

    def config(node: str) -> object:
        return load_config([f"shared_dir={tmp_path / node}", f"input_dir={tmp_path / 'in'}", f"store.url={pg_url}",
                            f"node.name={node}", "embedding_precision=int8", "check.exact_decode=true", *TINY])

    with Store.connect(pg_url, "a") as store:
        a = runtime.load_engine(config("a"), calibrate=lambda _s: Calibration(pixels, hashes), store=store)  # type: ignore[arg-type]
        model_a = activate_model(store, a)
        assert any(name.startswith("artifact/") for (name,) in store.b.execute("SELECT name FROM blobs"))
    assert a.precision == "int8"
    caplog.clear()
    with Store.connect(pg_url, "b") as store, caplog.at_level("INFO"):
        b = runtime.load_engine(config("b"), calibrate=lambda _s: pytest.fail("b calibrated"), store=store)  # type: ignore[arg-type]
        model_b = activate_model(store, b)
    assert "taken from the store" in caplog.text and "built in a child" not in caplog.text
    assert (b.identity, model_b) == (a.identity, model_a)  # one model identity, one model row
    assert b.embed(pixels[:64]).tobytes() == a.embed(pixels[:64]).tobytes()


def test_trained_weights_reach_a_node_that_did_not_train(tmp_path: Path, pg_url: str) -> None:
    weights = tmp_path / "a" / "models" / "trained" / "model.ckpt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"trained weights " * 1000)
    with Store.connect(pg_url, "a") as store:
        model_id = store.register_model(weights_hash="t" * 64, input_size=32, source="trained", detail="test",
                                        arch={}, dim=16, path=str(weights))
        store.set_current_model(model_id)
        a_config = load_config([f"shared_dir={tmp_path / 'a'}", f"input_dir={tmp_path / 'in'}", f"store.url={pg_url}",
                                "node.name=a", *TINY])
        assert runtime._shared_weights(a_config, store, model_id, weights) == weights  # kept in the store
        assert store.has_blob(f"weights/model-{model_id}")
    with Store.connect(pg_url, "b") as store:
        b_config = load_config([f"shared_dir={tmp_path / 'b'}", f"input_dir={tmp_path / 'in'}", f"store.url={pg_url}",
                                "node.name=b", *TINY])
        local = runtime._shared_weights(b_config, store, model_id, weights.with_name("gone.ckpt"))
        assert local is not None and local.is_relative_to(tmp_path / "b") and local.read_bytes() == weights.read_bytes()
