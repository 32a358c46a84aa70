"""The bench scripts keep working: a tiny run of each (seconds). Figures come from full runs, never from here."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

SCRIPTS = ["ingest.py", "decode.py", "startup.py", "latency.py", "store.py", "coreset.py", "soak.py", "load.py",
           "profile_embed.py", "quality_thresholds.py", "near_duplicates.py", "multinode.py", "ray_ingest.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_smoke(script: str, tmp_path: Path) -> None:
    if script == "ray_ingest.py" and importlib.util.find_spec("ray") is None and os.environ.get("CI") != "true":
        pytest.skip("ray is not installed (pip install 'poolwatch[ray]')")
    args = [sys.executable, str(ROOT / "bench" / script), "--smoke"]
    if script == "ingest.py":
        args.append("--skip-lightly")
    if script == "load.py":
        args += ["--cache", str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "machine:" in proc.stdout or "Machine" in proc.stdout
