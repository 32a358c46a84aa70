from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from poolwatch.pipeline.config import ConfigError, lightly_cli_defaults, load_config

from .conftest import ROOT, run_cli

SEED_DEFAULTS = {
    "token": "", "sanity_check": False, "enable_corruptness_check": True, "remove_exact_duplicates": True,
    "dump_dataset": False, "output_image_size": -1, "output_image_format": "png", "checkpoint": "",
    "embeddings": "", "enable_training": False, "normalize_embeddings": True, "method": "coreset",
    "n_example_images": 6, "memory_requirement_in_GB": 2,
}


def test_seed_keys_first_with_seed_defaults() -> None:
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    seed_order = [*list(SEED_DEFAULTS)[:12], "stopping_condition", "datapool", *list(SEED_DEFAULTS)[12:]]
    assert list(data)[: len(seed_order)] == seed_order
    for key, value in SEED_DEFAULTS.items():
        assert data[key] == value, key
    assert data["stopping_condition"] == {"n_samples": -1, "min_distance": -1.0}
    assert data["datapool"]["keep_history"] is True


def test_every_option_has_a_comment() -> None:
    for line in (ROOT / "config.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue
        if stripped.startswith("lightly_last_"):
            continue  # lightly's env-var names, copied verbatim
        assert "#" in line, f"option without a comment: {line!r}"


def test_lightly_section_is_lightlys_defaults() -> None:
    ours = yaml.safe_load((ROOT / "config.yaml").read_text())["lightly"]
    theirs = lightly_cli_defaults()
    assert ours == theirs


def test_defaults_load() -> None:
    cfg = load_config([])
    assert cfg.lightly["model"]["name"] == "resnet-18"
    assert cfg.batch_size == 16 and cfg.input_size == 64
    assert cfg.n_samples is None and cfg.min_distance is None


@pytest.mark.parametrize(
    "override, attr, expected",
    [
        ("stopping_condition.n_samples=0.1", "n_samples", 0.1),
        ("stopping_condition.n_samples=10", "n_samples", 10),
        ("stopping_condition.min_distance=0.5", "min_distance", 0.5),
        ("output_image_size=[256,128]", "output_image_size", [256, 128]),
        ("output_image_size=100", "output_image_size", 100),
        ("input_dir=[a,b]", "input_dir", ["a", "b"]),
        ("input_dir=a", "input_dir", ["a"]),
        ("method=random", "method", "random"),
        ("output_image_format=JPG", "output_image_format", "jpg"),
    ],
)
def test_overrides(override: str, attr: str, expected: object) -> None:
    assert getattr(load_config([override]), attr) == expected


def test_lightly_passthrough() -> None:
    cfg = load_config(["lightly.loader.batch_size=512", "lightly.collate.input_size=32"])
    assert cfg.batch_size == 512 and cfg.input_size == 32
    assert cfg.lightly["model"]["num_ftrs"] == 32  # untouched keys keep lightly's defaults


@pytest.mark.parametrize(
    "override, key",
    [
        ("stopping_condition.n_sampels=3", "stopping_condition.n_sampels"),
        ("lightly.loader.batch_size=abc", "lightly.loader.batch_size"),
        ("lightly.loader.batch_sze=8", "lightly.loader.batch_sze"),
        ("lightly.modle.name=resnet-18", "lightly.modle"),
        ("stopping_condition.n_samples=1.5", "stopping_condition.n_samples"),
        ("stopping_condition.n_samples=-3", "stopping_condition.n_samples"),
        ("stopping_condition.min_distance=-0.5", "stopping_condition.min_distance"),
        ("method=kmeans", "method"),
        ("n_example_images=5", "n_example_images"),
        ("output_image_size=[1,2,3]", "output_image_size"),
        ("output_image_format=nope", "output_image_format"),
        ("enable_training=maybe", "enable_training"),
        ("datapool.name=../escape", "datapool.name"),
        ("schedule.interval=soon", "schedule.interval"),
        ("lightly.model.name=resnet-7", "lightly.model.name"),
        ("metrics.port=70000", "metrics.port"),
        ("unknown_key=1", "unknown_key"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config([override])
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(key), msg
    assert "allowed" in msg


def test_config_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("method: random\nstopping_condition:\n  n_samples: 5\n")
    cfg = load_config(["stopping_condition.n_samples=7"], f)
    assert cfg.method == "random" and cfg.n_samples == 7
    with pytest.raises(ConfigError, match="--config"):
        load_config([], tmp_path / "absent.yaml")
    f.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError):
        load_config([], f)


def test_token_is_masked() -> None:
    cfg = load_config(["token=s3cr3t-value"])
    assert cfg.token.get_secret_value() == "s3cr3t-value"
    for text in (cfg.to_yaml(), cfg.to_json(), repr(cfg), str(cfg)):
        assert "s3cr3t-value" not in text


@pytest.mark.parametrize(
    "override, key",
    [("stopping_condition.n_sampels=3", "stopping_condition.n_sampels"),
     ("lightly.loader.batch_size=abc", "lightly.loader.batch_size")],
)
def test_cli_exit_2_one_line(override: str, key: str, tmp_path: Path) -> None:
    proc = run_cli("ingest", f"shared_dir={tmp_path}", override, "token=hidden-token-123", timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert key in lines[0]
    assert "hidden-token-123" not in proc.stderr + proc.stdout
    assert not (tmp_path / "poolwatch.db").exists()


def test_readme_reference_matches_config_yaml() -> None:
    from poolwatch.pipeline.config import reference_table

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    assert block.strip() == reference_table().strip(), "regenerate with: poolwatch config --reference"


@pytest.mark.parametrize("path", ["../elsewhere.db", "/tmp/outside.db", "sub/../../x.db"])
def test_store_path_stays_inside_shared_dir(path: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="store.path"):
        load_config([f"shared_dir={tmp_path}", f"store.path={path}"])
    assert load_config([f"shared_dir={tmp_path}", "store.path=db/pw.db"]).store_path == tmp_path / "db" / "pw.db"


@pytest.mark.parametrize("value, ok", [("32", True), ("16", True), ("bf16", True), ("16-mixed", True), ("8", False),
                                       ("fp8", False)])
def test_trainer_precision_choices(value: str, ok: bool) -> None:
    if ok:
        assert load_config([f"lightly.trainer.precision={value}"]).lightly["trainer"]["precision"] in (32, 16, value)
    else:
        with pytest.raises(ConfigError, match="lightly.trainer.precision"):
            load_config([f"lightly.trainer.precision={value}"])


def test_the_store_password_is_masked_everywhere_the_configuration_is_shown(tmp_path: Path) -> None:
    url = "postgresql://poolwatch:pw-s3cret@db.example:5432/pool?sslmode=require&password=pw-s3cret"
    shown = run_cli("config", f"shared_dir={tmp_path}", f"store.url={url}")
    assert shown.returncode == 0 and "pw-s3cret" not in shown.stdout
    assert "postgresql://poolwatch:***@db.example:5432/pool?sslmode=require&password=***" in shown.stdout
    bad = run_cli("config", f"shared_dir={tmp_path}", "store.url=mysql://u:pw-s3cret@h/db")
    assert bad.returncode == 2 and "pw-s3cret" not in bad.stderr and "store.url" in bad.stderr
    env = run_cli("status", f"shared_dir={tmp_path}", "store.busy_timeout=1", env={"POOLWATCH_STORE_URL": url})
    assert env.returncode != 0 and "pw-s3cret" not in env.stdout + env.stderr and "***" in env.stderr
