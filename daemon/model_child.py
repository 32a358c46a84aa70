"""The model builder's child process: everything that needs torch (loading lightly weights, exporting to
OpenVINO, NNCF quantization) runs in `python -m poolwatch.daemon.model_child`, so the daemon and
`poolwatch ingest` import only OpenVINO once a model's artifact is cached.

The parent writes the request as JSON to a file, the child writes its result (or the error, with its
exit code) to another; the child's own output (torch's and NNCF's warnings and progress bars) is captured
and logged at DEBUG, or shown when the child dies.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from poolwatch.pipeline.errors import EXIT_USAGE, BuildError, ModelError, PoolwatchError

log = logging.getLogger(__name__)


def build_in_child(request: dict[str, Any], cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run `model_build.build(request)` in a child process; its ModelError comes back as a ModelError. Setting
    `cancel` (a daemon stopping) kills the child at once: what it wrote is a temp dir, never a half artifact."""
    with tempfile.TemporaryDirectory(prefix="poolwatch-build-") as tmp:
        req, res, out = Path(tmp) / "request.json", Path(tmp) / "result.json", Path(tmp) / "output.txt"
        req.write_text(json.dumps(request))
        started = time.monotonic()
        log.debug("building the model's artifact in a child process (%s, %s)", request["kind"], request["ir"])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(out, "wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "poolwatch.daemon.model_child", str(req), str(res)],
                                    stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if cancel is not None and cancel.is_set():
                        raise BuildError("building the model's artifact was cancelled (stopping)") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output = out.read_text(errors="replace").strip()
        if output:
            log.debug("model builder output:\n%s", output)
        try:
            result: dict[str, Any] = json.loads(res.read_text())
        except (OSError, ValueError):
            tail = " / ".join(output.splitlines()[-3:])
            raise BuildError(f"the model builder died (exit {proc.returncode}) without a result: {tail}") from None
    if "error" in result:
        raise (ModelError if result.get("exit_code") == EXIT_USAGE else BuildError)(result["error"])
    log.info("model artifact built in a child process in %.1fs: %s", time.monotonic() - started, result["artifact"])
    return result


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    request = json.loads(Path(argv[0]).read_text())
    result: dict[str, Any]
    try:
        from poolwatch.pipeline.model_build import build

        result = build(request, log=lambda line: log.info("%s", line))
    except PoolwatchError as exc:
        result = {"error": str(exc), "exit_code": exc.exit_code}
    except OSError as exc:  # the machine's, not the model's: a full disk, a read-only models dir
        result = {"error": f"building the model's artifact failed: {exc}", "exit_code": 1}
    except Exception as exc:  # any other failure is the model's: one line for the parent's error
        log.exception("the model builder failed")
        result = {"error": f"building the model failed: {type(exc).__name__}: {exc}"[:500], "exit_code": 2}
    from poolwatch.pipeline.atomic import replacing

    with replacing(Path(argv[1]), "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
