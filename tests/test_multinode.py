"""Many nodes, one PostgreSQL store: real daemons (subprocesses) against the session's real PostgreSQL server,
real inotify, real signals, kill -9."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from poolwatch.pipeline.store import Store

from .conftest import POOLWATCH
from .photos import DISTINCT, near_copy, photo_jpeg
from .test_daemon import DAEMON_FAST, Daemon, wait_for, write_images

PASSWORD = "n0t-in-any-log"


def observer(url: str) -> Store:
    return Store.connect(url, "observer")


def ok_per_node(url: str) -> dict[str, int]:
    with observer(url) as store:
        return {node: store.counts_by_status(node)["ok"] for node in store.nodes()}


def runs(url: str) -> list[dict[str, Any]]:
    with observer(url) as store:
        return sorted(store.runs(100), key=lambda r: r["id"])


def node(tmp: Path, name: str, url: str, *extra: str) -> Daemon:
    inp = (tmp / name / "input").resolve()
    inp.mkdir(parents=True)
    return Daemon(tmp / name, [inp], (tmp / name / "shared").resolve(), f"node.name={name}", *extra, name=name,
                  env={"POOLWATCH_STORE_URL": url})


def test_two_nodes_share_one_store_one_run_at_a_time_and_find_each_others_copies(
        tmp_path: Path, postgres_server: Any, daemons: list[Daemon]) -> None:
    db = postgres_server.database()
    url = postgres_server.url(db, password=PASSWORD)  # trust auth here: the password is only carried, never needed
    a = node(tmp_path, "a", url, "dump_dataset=true", "stopping_condition.n_samples=6")
    b = node(tmp_path, "b", url, "dump_dataset=true", "stopping_condition.n_samples=6")
    daemons += [a, b]
    a.start()
    b.start()
    originals = {name: photo_jpeg(name) for name in DISTINCT[:10]}
    for name, data in originals.items():
        (a.inputs[0] / f"{name}.jpg").write_bytes(data)
    write_images(b.inputs[0], [(f"b_{i}.jpg", 700 + i) for i in range(6)])
    wait_for(lambda: ok_per_node(url) == {"a": 10, "b": 6}, 90, "both nodes' files in the store", a)

    # A copy at node b of a photo first seen at node a: b's index caught up on a's commits.
    (b.inputs[0] / "chelsea_copy.jpg").write_bytes(near_copy(originals["chelsea"]))

    def copy_link() -> Any:
        with observer(url) as store:
            row = store.image_by_path(str(b.inputs[0]), "chelsea_copy.jpg", node="b")
            return row and row["near_duplicate_of"] and store.locations([row["near_duplicate_of"]])[row["near_duplicate_of"]]
    original = wait_for(copy_link, 90, "the copy at b linked to a's photo", b)
    assert (original.node, original.relpath) == ("a", "chelsea.jpg")

    # One SIGUSR1: one run, on a, over both nodes' candidates; names carry the node (more than one contributed).
    a.send(signal.SIGUSR1)
    first = wait_for(lambda: [r for r in runs(url) if r["status"] == "ok"], 90, "a's run", a)[0]
    assert first["node"] == "a" and first["n_candidates"] == 16  # the near copy is not a candidate
    out = Path(first["output_dir"])
    assert out.is_relative_to(a.shared)
    with open(out / "data" / "embeddings.csv", newline="") as fh:
        names = [row["filenames"] for row in csv.DictReader(fh)]
    assert {n.split("/", 1)[0] for n in names} == {"a", "b"} and "a/chelsea.jpg" in names
    by_node = json.loads((out / "filenames" / "sampled_by_node.json").read_text())
    assert sum(len(v) for v in by_node.values()) == first["n_selected"] == 6

    # dump_dataset: each node writes the selected images it holds, into its own shared_dir, once.
    def dumped(d: Daemon) -> list[str]:
        folder = d.shared / "runs" / out.name / "sampled"
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    wait_for(lambda: len(dumped(b)) == len(by_node.get("b", [])), 60, "b's part of the dump", b)
    assert len(dumped(a)) == len(by_node.get("a", [])) and all(p.startswith("a/") for p in dumped(a))
    assert all(p.startswith("b/") for p in dumped(b))
    with observer(url) as store:
        assert {d["node"]: d["n_files"] for d in store.dumps(first["id"])} == {n: len(v) for n, v in by_node.items()}

    # Both nodes triggered at once: two runs, one after the other, never overlapping.
    before = len(runs(url))
    a.send(signal.SIGUSR1)
    b.send(signal.SIGUSR1)
    both = wait_for(lambda: len([r for r in runs(url)[before:] if r["status"] == "ok"]) == 2 and runs(url)[before:],
                    120, "two more runs", a)
    assert sorted(r["node"] for r in both) == ["a", "b"]
    (s1, f1), (s2, f2) = sorted((r["started"], r["finished"]) for r in both)
    assert f1 <= s2, f"runs overlapped: {both}"

    # The password is in no log line and no output file.
    for d in (a, b):
        assert PASSWORD not in d.log()
        for path in d.shared.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".yaml", ".txt", ".csv"):
                assert PASSWORD not in path.read_text(errors="replace"), path


def test_a_node_killed_mid_burst_loses_nothing_and_duplicates_nothing(
        tmp_path: Path, pg_url: str, daemons: list[Daemon]) -> None:
    a = node(tmp_path, "a", pg_url)
    b = node(tmp_path, "b", pg_url, "lightly.loader.batch_size=8")
    daemons += [a, b]
    a.start()
    b.start()
    write_images(b.inputs[0], [(f"burst_{i:03d}.jpg", 1000 + i) for i in range(160)])
    wait_for(lambda: ok_per_node(pg_url).get("b", 0) >= 16, 90, "some of b's burst committed", b)
    b.send(signal.SIGKILL)
    b.proc.wait(30)  # type: ignore[union-attr]
    # The other node carries on while b is down.
    write_images(a.inputs[0], [(f"a_{i}.jpg", 3000 + i) for i in range(8)])
    wait_for(lambda: ok_per_node(pg_url).get("a", 0) == 8, 60, "a ingesting while b is down", a)

    b.start()
    wait_for(lambda: ok_per_node(pg_url) == {"a": 8, "b": 160}, 120, "every file once after b's restart", b)
    with observer(pg_url) as store:
        counts = store.counts_by_status()
        assert counts["ok"] == 168 and counts["pending"] == 0 and counts["duplicate"] == 0
        assert store.row_problems() == [] and store.integrity_check() == "ok"
        relpaths = [(r["node"], r["relpath"]) for r in store.images()]
        assert len(relpaths) == len(set(relpaths)) == 168
        model = store.current_model()
        assert model is not None and store.count_embeddings(model.id) == 168


def test_a_one_shot_sample_waits_for_another_nodes_run(tmp_path: Path, pg_url: str) -> None:
    inp = tmp_path / "in"
    write_images(inp, [(f"s_{i}.jpg", 5000 + i) for i in range(6)])
    holder = Store.connect(pg_url, "other")
    assert holder.try_sampling_lock()  # another node's run in progress
    log = tmp_path / "sample.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*POOLWATCH, "sample", f"input_dir={inp}", f"shared_dir={tmp_path / 'shared'}",
                                 f"store.url={pg_url}", "node.name=c", "stopping_condition.n_samples=3", *DAEMON_FAST],
                                stdout=out, stderr=out)
    try:
        wait_for(lambda: "waits for another node's run" in log.read_text(), 120, "the sample to wait for the lock")
        assert proc.poll() is None and not runs(pg_url)
        holder.release_sampling_lock()
        assert proc.wait(120) == 0, log.read_text()[-2000:]
        assert [r["node"] for r in runs(pg_url)] == ["c"]
    finally:
        holder.close()
        if proc.poll() is None:
            proc.kill()
