"""The systemd unit passes `systemd-analyze verify` and keeps its hardening (exposure <= 2.0), alone and with
each example drop-in of systemd/poolwatch.service.d/ (paths.conf, node.conf: a node of a shared store)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

UNIT = ROOT / "systemd" / "poolwatch.service"
DROPINS = sorted((ROOT / "systemd" / "poolwatch.service.d").glob("*.conf.example"))
NODE_DROPIN = ROOT / "systemd" / "poolwatch.service.d" / "node.conf.example"
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def local_unit(tmp_path: Path, dropins: tuple[Path, ...] = (), exe: str | None = None) -> Path:
    """The unit (+ drop-ins, in poolwatch.service.d/ beside it, where systemd-analyze finds them) with ExecStart
    pointing at this checkout's poolwatch (verify checks the binary exists)."""
    exe = exe or str(Path(sys.executable).with_name("poolwatch"))
    out = tmp_path / "poolwatch.service"
    out.write_text(UNIT.read_text().replace("/opt/poolwatch/.venv/bin/poolwatch", exe))
    for dropin in dropins:
        d = tmp_path / "poolwatch.service.d"
        d.mkdir(exist_ok=True)
        text = dropin.read_text().replace("/opt/poolwatch/.venv/bin/poolwatch", exe)
        (d / dropin.name.removesuffix(".example")).write_text(text)
    return out


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every setting line, in order (comments and blank lines dropped)."""
    out, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        else:
            key, _, value = line.partition("=")
            out.append((section, key.strip(), value.strip()))
    return out


def verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


def test_unit_declares_the_protocol() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "WatchdogSec=",
                 "ProtectSystem=strict", "ReadWritePaths=", "ReadOnlyPaths=", "NoNewPrivileges=true", "PrivateTmp=true",
                 "ProtectHome=true", "User=poolwatch", "--config /etc/poolwatch/config.yaml"):
        assert line in text, line


def test_node_dropin_keeps_the_store_password_out_of_the_unit() -> None:
    settings = directives(NODE_DROPIN)
    assert ("Unit", "After", "network-online.target") in settings
    assert ("Unit", "Wants", "network-online.target") in settings
    env_files = [v for sec, k, v in settings if sec == "Service" and k == "EnvironmentFile"]
    assert env_files == ["/etc/poolwatch/store.env"]  # no leading '-': a missing file stops the start
    assert not [v for _, k, v in settings if k == "Environment"], "the store URL belongs in the EnvironmentFile"
    assert "postgresql://" not in "".join(v for _, _, v in settings), "no store URL in a setting"
    # ExecStart is reset, then replaced by one that names the node.
    exec_starts = [v for sec, k, v in settings if sec == "Service" and k == "ExecStart"]
    assert exec_starts[0] == "" and len(exec_starts) == 2
    assert "node.name=" in exec_starts[1] and "--config /etc/poolwatch/config.yaml" in exec_starts[1]


@pytest.mark.parametrize("dropin", DROPINS, ids=lambda p: p.name)
def test_dropin_command_line_is_a_valid_configuration(dropin: Path) -> None:
    """Every key=value of the drop-in's ExecStart is one the real config loader accepts."""
    from poolwatch.pipeline.config import load_config

    command = [v for sec, k, v in directives(dropin) if sec == "Service" and k == "ExecStart" and v][-1].split()
    assert command[:2] == ["/opt/poolwatch/.venv/bin/poolwatch", "run"]
    overrides = [word for word in command[2:] if "=" in word and not word.startswith("-")]
    config = load_config(overrides)
    if dropin == NODE_DROPIN:
        assert config.node_name == "node-a" and config.metrics.host == "0.0.0.0"


@needs_systemd_analyze
@pytest.mark.parametrize("dropins", [(), *((d,) for d in DROPINS), tuple(DROPINS)],
                         ids=lambda ds: "+".join(d.name for d in ds) or "unit")
def test_systemd_analyze_verify(tmp_path: Path, dropins: tuple[Path, ...]) -> None:
    proc = verify(local_unit(tmp_path, dropins))
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if "poolwatch.service" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


@needs_systemd_analyze
def test_verify_reads_the_dropin(tmp_path: Path) -> None:
    """Control: the same check fails when only the drop-in's ExecStart names a missing binary, so the
    verification above did check the drop-in (and its ExecStart replaced the unit's)."""
    unit = local_unit(tmp_path, (NODE_DROPIN,))
    dropin = tmp_path / "poolwatch.service.d" / "node.conf"
    exe = str(Path(sys.executable).with_name("poolwatch"))
    dropin.write_text(dropin.read_text().replace(f"ExecStart={exe}", "ExecStart=/nonexistent/poolwatch"))
    proc = verify(unit)
    assert proc.returncode != 0 and "/nonexistent/poolwatch" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("dropins", [(), (NODE_DROPIN,), tuple(DROPINS)], ids=lambda ds: "+".join(d.name for d in ds) or "unit")
def test_security_exposure_at_most_2(tmp_path: Path, dropins: tuple[Path, ...]) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(local_unit(tmp_path, dropins))],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for poolwatch.service: ([\d.]+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0
