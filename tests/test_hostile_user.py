"""Faults a hostile but realistic user finds (issue 17, in part): a reload with a config file that is not
UTF-8, idle connections to the metrics port, a shared_dir inside an input dir, absurd decode worker counts."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client import CollectorRegistry

from poolwatch.daemon.metrics import Metrics, MetricsServer

from .conftest import FAST, encode, photo, run_cli
from .test_daemon import Daemon, wait_for


def images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img_{i:03d}.jpg").write_bytes(encode(photo(9000 + i)))


def daemon_with(tmp_path: Path, daemons: list[Daemon], inp: Path, shared: Path, n: int) -> Daemon:
    """A running daemon over `n` fresh images in `inp`, once it has ingested them."""
    images(inp, n)
    d = Daemon(tmp_path, [inp], shared)
    daemons.append(d)
    d.start()
    wait_for(lambda: d.ingested_total() == n, 60, "the first images", d)
    return d


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("poolwatch: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_a_config_that_is_not_utf8_fails_a_reload_not_the_daemon(tmp_path: Path, daemons: list[Daemon]) -> None:
    inp, shared, cfg = tmp_path / "in", tmp_path / "shared", tmp_path / "cfg.yaml"
    images(inp, 3)
    cfg.write_text("stopping_condition:\n  n_samples: 2\n")
    d = Daemon(tmp_path, [inp], shared, config_file=cfg)
    daemons.append(d)
    d.start()
    cfg.write_bytes(b"\xff\xfe\x00")
    d.send(signal.SIGHUP)
    wait_for(lambda: d.metric("poolwatch_config_reloads_total", outcome="failed") == 1, 30, "the failed reload", d)
    assert d.proc is not None and d.proc.poll() is None
    assert d.ready(), d.tail()
    assert "is not UTF-8 text" in d.log() and "Traceback" not in d.log(), d.tail()
    # The same file on the command line: one line, exit 2; a directory is named as one.
    proc = run_cli("config", "--config", str(cfg), timeout=60)
    assert proc.returncode == 2 and "is not UTF-8 text" in one_error_line(proc.stderr)
    proc = run_cli("config", "--config", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "is a directory" in one_error_line(proc.stderr)


def test_idle_connections_do_not_blind_the_health_check() -> None:
    server = MetricsServer(Metrics(CollectorRegistry()), "127.0.0.1", 0, lambda: (True, "all parts alive"))
    server.start()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(30)]  # connect, send nothing
    try:
        def get(path: str, method: str = "GET") -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            try:
                conn.request(method, path)
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda _: get("/healthz"), range(100)))
        assert results == [(200, b"ok: all parts alive\n")] * 100
        assert get("/nope")[0] == 404
        status, body = get("/metrics", "HEAD")
        assert status == 200 and body == b""
        status, body = get("/metrics")
        assert status == 200 and b"poolwatch_build_info" in body
        assert get("/healthz", "POST")[0] == 405
    finally:
        for s in idle:
            s.close()
        assert server.stop(5.0)


def test_a_shared_dir_inside_an_input_dir_is_refused(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    images(inp, 1)
    for shared in (inp / "shared", inp):
        proc = run_cli("ingest", f"input_dir={inp}", f"shared_dir={shared}", *FAST, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "shared_dir" in one_error_line(proc.stderr)
        assert not (inp / "shared").exists()
    # Overlapping input dirs stay allowed (de-duplication handles them).
    proc = run_cli("config", f"input_dir=[{inp},{inp / 'sub'}]", f"shared_dir={tmp_path / 'shared'}", timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_an_absurd_decode_worker_count_is_capped(tmp_path: Path) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    images(inp, 3)
    proc = run_cli("ingest", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "lightly.loader.num_workers=1000",
                   "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lightly.loader.num_workers=1000 is more than 4 per core" in proc.stderr
    assert '"ok": 3' in proc.stdout


def test_a_store_deleted_under_the_daemon_stops_it(tmp_path: Path, daemons: list[Daemon]) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    d = daemon_with(tmp_path, daemons, inp, shared, 3)
    for f in shared.glob("poolwatch.db*"):
        f.unlink()
    images(inp / "later", 3)
    assert d.proc is not None
    code = d.proc.wait(60)
    assert code == 1, d.tail()
    assert "was removed or replaced while running" in d.log(), d.tail()
    assert not (shared / "poolwatch.pid").exists()


def test_a_report_cut_short_is_completed_at_the_next_start(tmp_path: Path, daemons: list[Daemon]) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    images(inp, 8)
    proc = run_cli("sample", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "stopping_condition.n_samples=3",
                   "--json", timeout=240)
    assert proc.returncode == 0, proc.stderr
    run = shared / "runs" / "latest"
    # What a kill -9 during the report leaves: the run committed and renamed, no report, a temp file.
    (run / "report.pdf").unlink()
    (run / "report.json").unlink()
    (run / ".report.pdf-1a2b3c4d").write_bytes(b"%PDF-1.4 partial")
    d = Daemon(tmp_path, [inp], shared)
    daemons.append(d)
    d.start()
    wait_for(lambda: (run / "report.pdf").is_file() and (run / "report.json").is_file(), 120, "the report", d)
    assert not (run / ".report.pdf-1a2b3c4d").exists()
    assert "has no complete report; building it" in d.log()
    assert d.stop() == 0


def test_small_ones_input_file_number_options_and_bad_pool_files(tmp_path: Path) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    images(inp, 6)
    a_file = tmp_path / "not_a_dir.jpg"
    a_file.write_bytes(b"x")
    proc = run_cli("ingest", f"input_dir={a_file}", f"shared_dir={shared}", *FAST, timeout=120)
    assert proc.returncode == 1 and "is not a directory" in proc.stderr, proc.stderr
    proc = run_cli("config", "stopping_condition.min_distance=abc", timeout=60)
    assert proc.returncode == 2 and one_error_line(proc.stderr).endswith("allowed: a number")

    base = [f"input_dir={inp}", f"shared_dir={shared}", *FAST]
    proc = run_cli("sample", *base, "datapool.name=p", "stopping_condition.n_samples=3", timeout=240)
    assert proc.returncode == 0, proc.stderr
    export = tmp_path / "p.csv"
    assert run_cli("datapool", "export", "p", str(export), *base, timeout=60).returncode == 0
    header, *rows = export.read_text().splitlines()
    cells = [r.split(",") for r in rows]
    bad = {
        "dim.csv": [",".join(header.split(",")[:1] + header.split(",")[2:])]
                   + [",".join(c[:1] + c[2:]) for c in cells],  # one embedding column fewer
        "nan.csv": [header] + [",".join([c[0], "nan", *c[2:]]) for c in cells],
    }
    for name, lines in bad.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        proc = run_cli("datapool", "import", "p", str(tmp_path / name), *base, timeout=60)
        assert proc.returncode == 2, (name, proc.stderr)
        one_error_line(proc.stderr)
    (tmp_path / "empty.csv").write_text(header + "\n")
    proc = run_cli("datapool", "restore", "p", str(tmp_path / "empty.csv"), *base, timeout=60)
    assert proc.returncode == 2 and "--allow-empty" in one_error_line(proc.stderr)
    assert run_cli("datapool", "list", *base, timeout=60).stdout.split() == ["p", "3"]
    proc = run_cli("datapool", "restore", "p", str(tmp_path / "empty.csv"), "--allow-empty", *base, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_pool_with_undecodable_and_backslash_names_round_trips(tmp_path: Path) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    images(inp, 2)
    with open(os.fsencode(inp) + b"/raw\xff.jpg", "wb") as fh:  # not valid UTF-8
        fh.write(encode(photo(9100)))
    (inp / "lit\\xff.jpg").write_bytes(encode(photo(9101)))  # literally backslash, x, f, f
    base = [f"input_dir={inp}", f"shared_dir={shared}", *FAST]
    proc = run_cli("sample", *base, "datapool.name=p", "stopping_condition.n_samples=1.0", timeout=240)
    assert proc.returncode == 0, proc.stderr
    names = [line.split(",", 1)[0] for line in (shared / "p" / "datapool_latest.csv").read_text().splitlines()[1:]]
    assert {"raw\\xff.jpg", "lit\\\\xff.jpg"} <= set(names), names  # distinct texts for distinct names
    export = tmp_path / "p.csv"
    assert run_cli("datapool", "export", "p", str(export), *base, timeout=60).returncode == 0
    history = next((shared / "p" / "history").glob("datapool_*.csv"))
    for source in (export, history):
        proc = run_cli("datapool", "restore", "p", str(source), *base, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert run_cli("datapool", "list", *base, timeout=60).stdout.split() == ["p", "4"]


def test_files_back_after_their_dir_was_replaced_are_ok_again_without_re_embedding(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    d = daemon_with(tmp_path, daemons, inp, shared, 5)

    def statuses() -> dict[str, str]:
        out = run_cli("status", "--json", f"shared_dir={shared}", timeout=60)
        return json.loads(out.stdout)["images"]

    # mv in in.bak; mkdir in; mv in.bak/*.jpg in/ — and one file renamed on the way in.
    backup = tmp_path / "in.bak"
    os.rename(inp, backup)
    inp.mkdir()
    for p in sorted(backup.glob("*.jpg")):
        os.rename(p, inp / (p.name if p.name != "img_004.jpg" else "renamed.jpg"))
    wait_for(lambda: statuses().get("ok") == 5 and statuses().get("missing") == 1, 30,
             "4 files ok again, the renamed one ok under its new name, its old name missing", d)
    # The 4 came back without a read (no new ingest); the renamed one is its old bytes: a duplicate check,
    # it is ingested once under the new name.
    wait_for(lambda: d.ingested_total() == 6, 30, "the renamed file", d)
    assert d.stop() == 0
