"""The input dirs are only ever read: an input dir on a read-only mount works end to end (CLI and daemon),
and a system-call audit (strace) of ingest, a sampling run with a dump and a report shows no path under
the input dir opened for writing, created, renamed, removed or changed."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import FAST, POOLWATCH, encode, photo, run_cli, status_json
from .test_daemon import Daemon, query, wait_for

N = 24
MUTATING = {"creat", "mkdir", "mkdirat", "rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir",
            "truncate", "chmod", "fchmodat", "chown", "fchownat", "lchown", "utime", "utimes", "utimensat",
            "link", "linkat", "symlink", "symlinkat", "setxattr", "lsetxattr", "removexattr", "lremovexattr",
            "mknod", "mknodat"}
WRITE_FLAGS = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND")


def fill(folder: Path) -> None:
    (folder / "sub").mkdir(parents=True)
    for i in range(N):
        (folder / ("sub" if i % 3 == 0 else ".") / f"img{i:02d}.jpg").write_bytes(encode(photo(400 + i)))


@pytest.fixture
def read_only_input(tmp_path: Path) -> Iterator[Path]:
    """A folder of images, seen through a read-only bind mount (needs root and mount rights; else skipped)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    fill(src)
    ro.mkdir()
    bind = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.strip() or bind.returncode}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.strip()}")
        probe = ro / ".write-probe"
        with pytest.raises(OSError):
            probe.write_bytes(b"x")
        yield ro
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_input_on_a_read_only_mount_cli(read_only_input: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    ingest = run_cli("ingest", f"input_dir={read_only_input}", f"shared_dir={shared}", *FAST)
    assert ingest.returncode == 0, ingest.stderr
    assert status_json(shared)["images"]["ok"] == N
    sample = run_cli("sample", f"input_dir={read_only_input}", f"shared_dir={shared}", *FAST,
                     "stopping_condition.n_samples=5", "dump_dataset=true")
    assert sample.returncode == 0, sample.stderr
    assert len([p for p in (shared / "runs" / "latest" / "sampled").rglob("*") if p.is_file()]) == 5
    assert "Read-only file system" not in ingest.stderr + sample.stderr


def test_input_on_a_read_only_mount_daemon(read_only_input: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    d = Daemon(tmp_path, [read_only_input], shared, "stopping_condition.n_samples=5").start()
    wait_for(lambda: query(shared, "SELECT count(*) FROM images WHERE status = 'ok'") == [(N,)], 120,
             "the read-only input ingested", d)
    d.send(signal.SIGUSR1)
    wait_for(lambda: d.metric("poolwatch_sampling_runs_total", trigger="signal", outcome="ok") == 1, 120,
             "a sampling run", d)
    assert d.stop() == 0
    assert "Read-only file system" not in d.log() and "Traceback" not in d.log()


def writes_under(trace: str, root: str) -> list[str]:
    """strace lines that create, change or open for writing anything at or below `root`."""
    bad = []
    for line in trace.splitlines():
        m = re.match(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)", line)
        if not m or root not in line:
            continue
        call, rest = m.groups()
        if call in MUTATING or (call in ("open", "openat", "openat2") and WRITE_FLAGS.search(rest)):
            bad.append(line)
    return bad


def test_strace_audit_nothing_under_the_input_dir_is_opened_for_writing(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (scripts/system-deps.sh installs it)")
    inp, shared = tmp_path / "in", tmp_path / "shared"
    fill(inp)
    trace = tmp_path / "trace"
    probe = subprocess.run([strace, "-f", "-o", str(trace), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()}")
    lines = []
    for i, args in enumerate([
        ["ingest", f"input_dir={inp}", f"shared_dir={shared}", *FAST],
        ["sample", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "stopping_condition.n_samples=6",
         "dump_dataset=true", "output_image_size=[48,48]"],
        ["report", "latest", f"shared_dir={shared}"],
    ]):
        out = tmp_path / f"trace{i}"
        proc = subprocess.run([strace, "-f", "-qq", "-s", "4096", "-o", str(out), *POOLWATCH, *args],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = out.read_text(errors="replace")
        assert str(inp) in text  # the trace does see the input files being read
        lines += writes_under(text, str(inp))
    assert lines == [], "\n".join(lines[:20])
    # the control: the same audit flags a write under the input dir
    control = tmp_path / "control"
    subprocess.run([strace, "-f", "-qq", "-o", str(control), "touch", str(inp / "new.jpg")], check=True)
    assert writes_under(control.read_text(), str(inp))
