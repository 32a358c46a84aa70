"""The systemd unit passes `systemd-analyze verify` and keeps its hardening (exposure <= 2.0)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

UNIT = ROOT / "systemd" / "poolwatch.service"
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's poolwatch (verify checks the binary exists)."""
    exe = Path(sys.executable).with_name("poolwatch")
    text = UNIT.read_text().replace("/opt/poolwatch/.venv/bin/poolwatch", str(exe))
    out = tmp_path / "poolwatch.service"
    out.write_text(text)
    return out


def test_unit_declares_the_protocol() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "WatchdogSec=",
                 "ProtectSystem=strict", "ReadWritePaths=", "ReadOnlyPaths=", "NoNewPrivileges=true", "PrivateTmp=true",
                 "ProtectHome=true", "User=poolwatch", "--config /etc/poolwatch/config.yaml"):
        assert line in text, line


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(local_unit(tmp_path))], capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if "poolwatch.service" in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


@needs_systemd_analyze
def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(local_unit(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for poolwatch.service: ([\d.]+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0
