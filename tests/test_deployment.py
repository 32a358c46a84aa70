"""deploy/compose.yaml, the multi-node picture (docs/DEPLOYMENT.md), read as data and checked against the real
config loader, the Dockerfile and the Prometheus configuration it mounts: every poolwatch node has its own
name, input (read-only) and shared_dir, and all of them use the one PostgreSQL store; no password is written
in the file; Prometheus scrapes every node.

`docker compose config -q` runs where a Compose v2 client is installed (it needs no engine) and `promtool
check config` where promtool is (the Debian package `prometheus`; under CI=true a missing promtool fails, as
in tests/test_monitoring.py); each is skipped with the reason otherwise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from poolwatch.pipeline.config import load_config, mask_url

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
INPUT = "/home/input_dir"
SHARED = "/home/shared_dir"
PASSWORD = "s3cretPw4test"  # what the tests put into $POSTGRES_PASSWORD
VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: $$, ${VAR}, $VAR, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3) or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op is not None and op.endswith("?") and unset:
            raise KeyError(f"{name}: {arg}")
        if op is not None and op.endswith("-") and unset:
            return arg
        return current or ""

    return VAR.sub(one, value)


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file, YAML merge keys resolved and variables substituted from `env`."""
    return interpolate(yaml.safe_load(COMPOSE.read_text()), {"POSTGRES_PASSWORD": PASSWORD} if env is None else env)


def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile_entrypoint() -> list[str]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip().upper().startswith("ENTRYPOINT ")]
    return yaml.safe_load(lines[-1].split(" ", 1)[1])  # the JSON (exec) form, which YAML reads too


def poolwatch_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from the repo's Dockerfile that run poolwatch (the Ray head runs `ray start`)."""
    out = {}
    for name, svc in doc["services"].items():
        build = svc.get("build") or {}
        ours = isinstance(build, dict) and build.get("dockerfile") == "Dockerfile" \
            and (DEPLOY / build["context"]).resolve() == ROOT
        if ours and "poolwatch" in " ".join(svc.get("entrypoint") or dockerfile_entrypoint()):
            out[name] = svc
    return out


def nodes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The watcher nodes: poolwatch services that run the image's own `poolwatch run`."""
    return {name: svc for name, svc in poolwatch_services(doc).items() if "entrypoint" not in svc}


def overrides(svc: dict[str, Any]) -> list[str]:
    """The key=value overrides a poolwatch service runs with (the image's ENTRYPOINT's, then its command's)."""
    words = ([] if "entrypoint" in svc else dockerfile_entrypoint()[2:]) + list(svc.get("command") or [])
    assert all(isinstance(w, str) for w in words), words
    return [w for w in words if "=" in w and not w.startswith("-")]


def mounts(svc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every volume entry in the long form (short `src:dst[:ro]` strings converted)."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            src, dst, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else ""
            kind = "bind" if src.startswith((".", "/", "~", "$")) else "volume"
            out.append({"type": kind, "source": src, "target": dst, "read_only": "ro" in mode.split(",")})
        else:
            out.append(v)
    return out


def mount(svc: dict[str, Any], target: str) -> dict[str, Any]:
    found = [m for m in mounts(svc) if m["target"] == target]
    assert len(found) == 1, f"{target} is mounted {len(found)} times"
    return found[0]


# ---- the services --------------------------------------------------------------------------------------
def test_the_services_of_the_picture_exist() -> None:
    services = raw()["services"]
    assert {"postgres", "node-a", "node-b", "prometheus", "grafana", "ray-head", "backlog"} <= set(services)
    doc = compose()
    for name in ("postgres", "node-a", "node-b", "prometheus"):
        assert "profiles" not in doc["services"][name], f"{name} starts with a plain `docker compose up`"
    assert doc["services"]["grafana"]["profiles"] == ["grafana"]
    assert doc["services"]["ray-head"]["profiles"] == ["ray"] and doc["services"]["backlog"]["profiles"] == ["ray"]
    assert set(nodes(doc)) == {"node-a", "node-b"}
    assert set(poolwatch_services(doc)) == {"node-a", "node-b", "backlog"}


def test_postgres_is_version_15_with_a_volume_and_a_pg_isready_healthcheck() -> None:
    pg = compose()["services"]["postgres"]
    assert pg["image"] == "postgres:15"
    data = mount(pg, "/var/lib/postgresql/data")
    assert data["type"] == "volume" and data["source"] in raw()["volumes"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])


def test_every_poolwatch_service_waits_for_a_healthy_postgres() -> None:
    for name, svc in poolwatch_services(compose()).items():
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy", name


def test_the_builds_install_extras_that_exist() -> None:
    """Each build's EXTRAS (the Dockerfile's build arg) names optional dependencies pyproject.toml has; the
    nodes get the PostgreSQL driver, the Ray services Ray."""
    tomllib = pytest.importorskip("tomllib")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert re.search(r"^ARG EXTRAS=", (ROOT / "Dockerfile").read_text(), re.M)
    doc = compose()
    for name, svc in doc["services"].items():
        if isinstance(svc.get("build"), dict):
            wanted = set(svc["build"]["args"]["EXTRAS"].split(","))
            assert wanted <= extras, f"{name}: no such extra {sorted(wanted - extras)}"
            assert "postgres" in wanted, name
    assert "ray" in doc["services"]["ray-head"]["build"]["args"]["EXTRAS"].split(",")
    assert doc["services"]["ray-head"]["image"] == doc["services"]["backlog"]["image"] != doc["services"]["node-a"]["image"]


# ---- one store, one name per node -----------------------------------------------------------------------
def test_every_node_has_its_own_name_input_and_shared_dir() -> None:
    doc = compose()
    names, inputs, shared = [], [], []
    for svc in poolwatch_services(doc).values():
        config = load_config(overrides(svc))
        names.append(config.node.name)
        inputs.append(mount(svc, INPUT)["source"])
        shared.append(mount(svc, SHARED)["source"])
    assert "" not in names, "set node.name explicitly: a container's host name changes"
    assert len(set(names)) == len(names), names
    assert len(set(shared)) == len(shared), f"one shared_dir volume each (it holds the node's lock): {shared}"
    assert len(set(inputs)) == len(inputs), f"each node ingests only its own input: {inputs}"
    for name, svc in nodes(doc).items():
        assert load_config(overrides(svc)).node.name == name


def test_every_node_uses_the_same_store() -> None:
    doc = compose()
    pg_env = doc["services"]["postgres"]["environment"]
    urls = {}
    for name, svc in poolwatch_services(doc).items():
        assert not [o for o in overrides(svc) if o.startswith("store.")], f"{name}: the store comes from the environment"
        urls[name] = svc["environment"]["POOLWATCH_STORE_URL"]
        url = urlsplit(urls[name])
        where = (url.scheme, url.hostname, url.port, url.path)
        assert where == ("postgresql", "postgres", 5432, "/" + pg_env["POSTGRES_DB"]), name
        assert (url.username, url.password) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"]), name
        # The real loader takes it as a store URL, and masks its password.
        config = load_config([f"store.url={urls[name]}"])
        assert config.store_url == urls[name] and PASSWORD not in mask_url(config.store_url)
    assert len(set(urls.values())) == 1, urls
    # ... and it is built from the same variable as the server's password, not written down.
    for name, svc in poolwatch_services(raw()).items():
        assert "${POSTGRES_PASSWORD" in (svc.get("environment") or {}).get("POOLWATCH_STORE_URL", ""), name


def test_inputs_are_mounted_read_only() -> None:
    doc = compose()
    for name, svc in doc["services"].items():
        for m in mounts(svc):
            if m["target"] == INPUT:
                assert m["type"] == "bind" and m.get("read_only") is True, f"{name}: {m}"
    for name in poolwatch_services(doc):
        assert mount(doc["services"][name], INPUT)["read_only"] is True
    # Ray's actors read the backlog's files themselves: the head mounts the backlog's input at the same path.
    assert mount(doc["services"]["ray-head"], INPUT)["source"] == mount(doc["services"]["backlog"], INPUT)["source"]


def test_no_password_is_written_in_the_file() -> None:
    text = COMPOSE.read_text()
    with_password = 0
    for m in re.finditer(r"://[^:/@\s]+:", text):  # scheme://user: (or scheme://host:port)
        rest = text[m.end():]
        if rest.startswith("${"):
            with_password += 1
        else:
            netloc = re.match(r"[^/\s]*", rest).group(0)
            assert "@" not in netloc, f"a literal password in a URL: {m.group(0)}{netloc}"
    assert with_password, "the store URL's password is a variable"
    for m in re.finditer(r"(?im)^\s*-?\s*([A-Z0-9_]*(PASSWORD|SECRET|TOKEN)[A-Z0-9_]*)\s*[:=]\s*(\S.*)$", text):
        assert m.group(3).startswith("${"), f"{m.group(1)} is set to a literal"
    assert not re.search(r"(?i)\btoken=", text)
    # A missing password is an error, not an empty password.
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        compose({})
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        compose({"POSTGRES_PASSWORD": ""})
    # The example env file leaves it to be filled in.
    assert re.search(r"(?m)^POSTGRES_PASSWORD=$", ENV_EXAMPLE.read_text())
    assert "deploy/.env" in (ROOT / ".gitignore").read_text().split()


# ---- each command line is a valid configuration ------------------------------------------------------------
def test_each_command_line_is_accepted_by_the_config_loader() -> None:
    doc = compose()
    for name, svc in poolwatch_services(doc).items():
        config = load_config(overrides(svc))
        assert (str(config.input_paths[0]), str(config.shared_path)) == (INPUT, SHARED), name
    graceful = load_config([]).graceful_timeout
    for name, svc in nodes(doc).items():
        config = load_config(overrides(svc))
        assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", 9464), name
        seconds = float(re.fullmatch(r"(\d+)s", svc["stop_grace_period"]).group(1))
        assert seconds > graceful, f"{name}: docker stop must wait out graceful_timeout ({graceful} s)"
    sampling = [n for n, s in nodes(doc).items() if any(o.startswith("schedule.") for o in overrides(s))]
    assert sampling, "some node samples on a schedule"
    backlog = doc["services"]["backlog"]
    assert "poolwatch ingest --ray" in " ".join(backlog["entrypoint"])
    assert load_config(overrides(backlog)).ray.address


def test_the_ray_head_runs_ray() -> None:
    head = compose()["services"]["ray-head"]
    assert head["entrypoint"][:4] == ["ray", "start", "--head", "--block"]
    assert "ray" in " ".join(head["healthcheck"]["test"]), "not the image's poolwatch /healthz"


# ---- monitoring -------------------------------------------------------------------------------------------
def mounted_file(svc: dict[str, Any], target: str) -> Path:
    m = mount(svc, target)
    assert m["type"] == "bind" and m["read_only"] is True
    path = (DEPLOY / m["source"]).resolve()
    assert path.is_file(), path
    return path


def prometheus_config() -> Path:
    return mounted_file(compose()["services"]["prometheus"], "/etc/prometheus/prometheus.yml")


def test_prometheus_scrapes_every_node_and_loads_the_alerts() -> None:
    doc = compose()
    prom = doc["services"]["prometheus"]
    path = prometheus_config()
    config = yaml.safe_load(path.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {t for sc in jobs["poolwatch"]["static_configs"] for t in sc["targets"]}
    wanted = {f"{name}:{load_config(overrides(svc)).metrics.port}" for name, svc in nodes(doc).items()}
    assert targets == wanted
    # Its rule files are mounted beside it, as the files the repo has.
    for rule_file in config["rule_files"]:
        assert mounted_file(prom, f"/etc/prometheus/{rule_file}") == (path.parent / rule_file).resolve()


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    assert mounted_file(grafana, "/etc/grafana/dashboards/poolwatch.json") == DEPLOY / "grafana" / "poolwatch.json"
    provisioning = (DEPLOY / mount(grafana, "/etc/grafana/provisioning")["source"]).resolve()
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [s["url"] for s in sources] == ["http://prometheus:9090"]
    providers = yaml.safe_load((provisioning / "dashboards" / "poolwatch.yml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/etc/grafana/dashboards"]


def test_promtool_checks_the_mounted_prometheus_config(promtool: str) -> None:
    path = prometheus_config()
    proc = subprocess.run([promtool, "check", "config", path.name], capture_output=True, text=True, timeout=60,
                          cwd=path.parent, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout + proc.stderr


# ---- Compose itself ---------------------------------------------------------------------------------------
def _compose_v2() -> list[str] | None:
    """A Compose v2 client: the docker CLI plugin, else a standalone docker-compose of version 2 (v1 does not
    know the file's top-level `name`)."""
    candidates = [[exe, "compose"] for exe in [shutil.which("docker")] if exe]
    candidates += [[exe] for exe in [shutil.which("docker-compose")] if exe]
    for cmd in candidates:
        try:
            proc = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0 and re.match(r"v?[2-9]\.", proc.stdout.strip()):
            return cmd
    return None


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    cmd = _compose_v2()
    if cmd is None:
        pytest.skip("no Compose v2 client here (`docker compose version` fails and no docker-compose 2.x); "
                    "the file is checked as data by the tests above")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "NODE_", "BACKLOG_", "COMPOSE_"))}
    for var in ("NODE_A_INPUT", "NODE_B_INPUT", "BACKLOG_INPUT"):
        (tmp_path / var).mkdir()
        env[var] = str(tmp_path / var)
    args = [*cmd, "--project-directory", str(DEPLOY), "--env-file", os.devnull, "-f", str(COMPOSE),
            "--profile", "ray", "--profile", "grafana", "config", "-q"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env={**env, "POSTGRES_PASSWORD": PASSWORD})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and "POSTGRES_PASSWORD" in proc.stdout + proc.stderr, "a missing password must fail"
