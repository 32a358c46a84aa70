"""A daemon that receives a new `checkpoint=` via SIGHUP: new files keep flowing (embedded with the new
model at once), the store is re-embedded in the background, runs during that use the old model only,
runs after it the new one, and the old vectors go once the switch is done."""

from __future__ import annotations

import signal
from pathlib import Path

from poolwatch.pipeline.embed import ModelSpec, load_model

from .test_daemon import Daemon, query, wait_for, write_images


def test_sighup_with_a_new_checkpoint_reembeds_in_the_background(tmp_path: Path, daemons: list[Daemon]) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    write_images(inp, [(f"old_{i:03d}.jpg", i) for i in range(300)])
    # Another set of weights for the same architecture, in lightly's checkpoint format.
    spec = ModelSpec(input_size=16)
    other = load_model(spec, models_dir=tmp_path / "other", pretrained=False, seed=7)
    config = tmp_path / "config.yaml"
    config.write_text("stopping_condition:\n  n_samples: 5\n")
    d = Daemon(tmp_path, [inp], shared, "lightly.loader.batch_size=8", config_file=config)
    daemons.append(d)
    d.start()
    wait_for(lambda: query(shared, "SELECT COUNT(*) FROM embeddings")[0][0] == 300, 120, "the first ingest", d)
    old_model = query(shared, "SELECT id FROM models WHERE is_current = 1")[0][0]

    config.write_text(f"stopping_condition:\n  n_samples: 5\ncheckpoint: {other.path}\n")
    d.send(signal.SIGHUP)
    wait_for(lambda: query(shared, "SELECT COUNT(*) FROM models WHERE is_current = 1 AND source = 'checkpoint'")[0][0],
             60, "the new model to become current", d)
    new_model = query(shared, "SELECT id FROM models WHERE is_current = 1")[0][0]
    assert new_model != old_model

    # a sampling run while the store is being re-embedded uses the old model's vectors only
    d.send(signal.SIGUSR1)
    wait_for(lambda: query(shared, "SELECT model_id FROM runs WHERE status = 'ok'"), 120, "the first run", d)
    first_run_model = query(shared, "SELECT model_id FROM runs WHERE status = 'ok' ORDER BY id")[0][0]
    done = query(shared, f"SELECT COUNT(*) FROM embeddings WHERE model_id = {new_model}")[0][0]
    assert first_run_model == old_model or done >= 300, "a run used the new model before re-embedding finished"

    # new files keep flowing during re-embedding, embedded with the new model right away
    write_images(inp, [(f"new_{i:02d}.jpg", 10_000 + i) for i in range(5)])
    wait_for(lambda: query(shared, "SELECT COUNT(*) FROM images i JOIN embeddings e ON e.image_id = i.id "
                                   f"WHERE i.relpath LIKE 'new_%' AND e.model_id = {new_model}")[0][0] == 5,
             60, "new files embedded with the new model", d)
    backlog = 300 - query(shared, f"SELECT COUNT(*) FROM embeddings WHERE model_id = {new_model} "
                                  "AND image_id IN (SELECT id FROM images WHERE relpath LIKE 'old_%')")[0][0]
    print(f"\nnew files were embedded while {backlog} of 300 images still waited for re-embedding")

    # after re-embedding: old vectors removed, runs use the new model
    wait_for(lambda: query(shared, "SELECT DISTINCT model_id FROM embeddings") == [(new_model,)], 180,
             "re-embedding to finish and the old vectors to go", d)
    assert query(shared, "SELECT COUNT(*) FROM embeddings")[0][0] == 305
    runs_before = len(query(shared, "SELECT id FROM runs WHERE status = 'ok'"))
    d.send(signal.SIGUSR1)
    wait_for(lambda: len(query(shared, "SELECT id FROM runs WHERE status = 'ok'")) > runs_before, 120, "the next run", d)
    assert query(shared, "SELECT model_id FROM runs WHERE status = 'ok' ORDER BY id DESC LIMIT 1")[0][0] == new_model
    assert d.metric("poolwatch_reembedding_progress_ratio") == 1.0
    assert d.stop() == 0
