"""Typed configuration: config.yaml defaults, a user file, then `key=value` overrides, validated.

Loading order: the packaged defaults (the project's config.yaml), an optional `--config FILE`, then
OmegaConf dotlist overrides (`stopping_condition.n_samples=0.1`, `output_image_size=[256,128]`).
OmegaConf only parses and merges; validation is pydantic's (unions, ranges, unknown keys) for
poolwatch's own keys and a comparison with lightly's own CLI config file for `lightly.*`.
Any problem raises `ConfigError` whose message is one line naming the key, the value and what
is allowed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import socket
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import UsageError
from .quality import DEFAULT_THRESHOLDS, FLAGS

MASK = "***"
LIGHTLY_MODELS = ("resnet-9", "resnet-18", "resnet-34", "resnet-50", "resnet-101", "resnet-152")
_INTERVAL_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


# lightly keys whose values are a set of choices rather than the type of lightly's default.
LIGHTLY_CHOICES: dict[str, tuple[Any, ...]] = {
    "lightly.trainer.precision": (32, 16, "32-true", "16-mixed", "bf16", "bf16-mixed"),
}


NUMBER_ERRORS = {"int_type", "int_parsing", "int_from_float", "float_type", "float_parsing"}


class ConfigError(UsageError):
    """A configuration problem; the message is one line fit for a user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # a snapshot: the daemon swaps it, never edits it


Number = StrictInt | StrictFloat


class StoppingCondition(_Section):
    n_samples: StrictInt | StrictFloat = -1
    min_distance: Number = -1.0

    @field_validator("n_samples")
    @classmethod
    def _n_samples(cls, v: int | float) -> int | float:
        if isinstance(v, int) and (v >= 0 or v == -1):
            return v
        if isinstance(v, float) and (0.0 < v <= 1.0 or v == -1.0):
            return -1 if v == -1.0 else v
        raise ValueError("allowed: an int >= 0 (count), a float in (0, 1] (fraction) or -1 (inactive)")

    @field_validator("min_distance")
    @classmethod
    def _min_distance(cls, v: float) -> float:
        if v == -1 or v >= 0:
            return float(v)
        raise ValueError("allowed: a distance >= 0 or -1 (inactive)")


class Datapool(_Section):
    name: str = ""
    keep_history: StrictBool = True
    process_all: StrictBool = False

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: Any) -> str:
        if v is None:
            return ""
        if not isinstance(v, str) or (v and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v)):
            raise ValueError("allowed: '' or a name of letters, digits, '_', '-', '.' (it names a folder)")
        return v


class CheckSettings(_Section):
    max_pixels: StrictInt = Field(178_956_970, gt=0)
    apply_exif_orientation: StrictBool = True
    decode_timeout: Number = Field(30, ge=0)
    # null: the store's recorded decode mode (new stores: exact, see engine.AUTO_EXACT_DECODE).
    # true: lightly-embed's full decode + resize (its pixels exactly); false: JPEGs decoded DCT-scaled to the
    # smallest size >= the model input (faster). The decode mode is part of the model's identity.
    exact_decode: StrictBool | None = None


class WatchSettings(_Section):
    polling: StrictBool = False
    settle_seconds: Number = Field(2.0, ge=0)
    rescan_interval: Number = Field(600, ge=0)
    max_batch_wait: Number = Field(0.2, ge=0)
    queue_size: StrictInt = Field(10_000, gt=0)
    ignore_patterns: list[str] = Field(default_factory=lambda: [".*", "*.tmp", "*.part", "~*"])


class ScheduleSettings(_Section):
    cron: str = ""
    interval: str = ""
    on_startup: StrictBool = False

    @field_validator("interval", mode="before")
    @classmethod
    def _interval(cls, v: Any) -> str:
        if v is None or v == "":
            return ""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = f"{v}s"
        if not isinstance(v, str) or not _INTERVAL_RE.match(v) or parse_interval(v) <= 0:
            raise ValueError("allowed: '' or a positive duration such as 90s, 30m, 6h, 1d")
        return v

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if v and len(v.split()) != 5:
            raise ValueError("allowed: '' or a five-field crontab string such as '0 * * * *'")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> ScheduleSettings:
        if self.cron and self.interval:
            raise ValueError("set schedule.cron or schedule.interval, not both")
        return self


class MetricsSettings(_Section):
    enabled: StrictBool = True
    host: str = "127.0.0.1"
    port: StrictInt = Field(9464, ge=0, le=65535)


class StoreSettings(_Section):
    url: SecretStr = SecretStr("")  # postgresql://...; empty: SQLite at `path`. $POOLWATCH_STORE_URL when unset
    path: str = ""
    busy_timeout: Number = Field(30, ge=0)

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, v: Any) -> Any:
        text = "" if v is None else str(v)
        if text and not text.startswith(("postgresql://", "postgres://")):
            raise ValueError("allowed: '' (SQLite at store.path) or a postgresql://user:password@host:port/dbname URL")
        return text


class NodeSettings(_Section):
    name: str = ""  # '' = this machine's host name

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):
            raise ValueError("allowed: '' (the host name) or 1-63 letters, digits, '.', '_' or '-' (a letter or digit first)")
        return v


class RaySettings(_Section):
    address: str = ""  # '' = start a local cluster with this machine's cores; else e.g. ray://head:10001 or auto
    num_actors: StrictInt = Field(0, ge=0)  # 0 = as many as the cluster's CPUs (or GPUs) allow
    num_cpus_per_actor: Number = Field(1, gt=0)
    num_gpus_per_actor: Number = Field(0, ge=0)
    shard_size: StrictInt = Field(64, gt=0)  # files an actor turns into verdicts and vectors per call


class NearDuplicateSettings(_Section):
    # auto: calibrated per model on the store's own images (pipeline/near_threshold.py); a distance >= 0 overrides
    # it; -1: no near-duplicate check.
    threshold: Literal["auto"] | Number = "auto"
    exclude_from_candidates: StrictBool = True

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: str | float) -> str | float:
        if v == "auto" or v == -1 or (not isinstance(v, str) and v >= 0):
            return v
        raise ValueError("allowed: auto, a distance >= 0, or -1 (off)")


class QualityThresholds(_Section):
    """The flag thresholds (pipeline/quality.FLAGS says which signal and which side; -1 turns a flag off)."""

    blurry: Number = DEFAULT_THRESHOLDS["blurry"]
    dark: Number = DEFAULT_THRESHOLDS["dark"]
    bright: Number = DEFAULT_THRESHOLDS["bright"]
    low_information: Number = DEFAULT_THRESHOLDS["low_information"]
    odd_aspect: Number = DEFAULT_THRESHOLDS["odd_aspect"]


QualityFlag = Literal["blurry", "dark", "bright", "low_information", "odd_aspect"]


class QualitySettings(_Section):
    measure: StrictBool = True
    flag: QualityThresholds = Field(default_factory=QualityThresholds)
    exclude: list[QualityFlag] = Field(default_factory=list)

    def rules(self) -> dict[str, tuple[str, str, float]]:
        """flag -> (signal, "<" or ">", threshold) for every flag that is on."""
        thresholds = self.flag.model_dump()
        return {flag: (column, op, float(thresholds[flag])) for flag, (column, op) in FLAGS.items()
                if thresholds[flag] != -1}


class SourceSettings(_Section):
    depth: Literal[0, 1] = 0
    max_sources: StrictInt = Field(64, gt=0)


class ModelSettings(_Section):
    """poolwatch's own model options (lightly's architecture keys stay under `lightly.model`).

    Nothing a sampling option sets reaches the model: `seed` seeds sampling only.
    """

    # None: the store's own random-init model (its seed read from the store), else 1. See
    # daemon/runtime.load_embedder and pipeline/embed.random_init_seed.
    init_seed: StrictInt | None = None
    # auto: OpenVINO on the CPU (torch when it cannot load), torch on a GPU; torch: always torch.
    runtime: Literal["auto", "torch"] = "auto"
    # Your own ONNX image-embedding model (relative to shared_dir unless absolute) instead of lightly's resnet:
    # NCHW float input of input_size x input_size, normalised as (x/255 - mean) / std; `output` names the
    # embedding output ("" = the model's first output).
    onnx: str = ""
    input_size: StrictInt = Field(224, gt=0)
    mean: list[Number] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[Number] = Field(default_factory=lambda: [0.229, 0.224, 0.225])
    output: str = ""

    @field_validator("mean", "std")
    @classmethod
    def _three(cls, v: list[float]) -> list[float]:
        if len(v) != 3:
            raise ValueError("allowed: a list of three numbers, one per RGB channel")
        return v

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError("allowed: three numbers > 0")
        return v

    @field_validator("init_seed", mode="before")
    @classmethod
    def _init_seed(cls, v: Any) -> Any:
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63):
            return v
        raise ValueError("allowed: null (the store's random-init model, else seed 1) or an int >= 0")


class Config(_Section):
    token: SecretStr = SecretStr("")
    sanity_check: StrictBool = False
    enable_corruptness_check: StrictBool = True
    remove_exact_duplicates: StrictBool = True
    dump_dataset: StrictBool = False
    output_image_size: StrictInt | list[StrictInt] = -1
    output_image_format: str = "png"
    checkpoint: str = ""
    embeddings: str = ""
    enable_training: StrictBool = False
    normalize_embeddings: StrictBool = True
    method: Literal["coreset", "random"] = "coreset"
    stopping_condition: StoppingCondition = Field(default_factory=StoppingCondition)
    datapool: Datapool = Field(default_factory=Datapool)
    n_example_images: StrictInt = Field(6, ge=0)
    memory_requirement_in_GB: Number = Field(2, gt=0)

    input_dir: list[str] = Field(default_factory=lambda: ["./data/input"])
    shared_dir: str = "./data/shared"
    seed: StrictInt = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    embedding_precision: Literal["auto", "fp32", "bf16", "int8", "fp16"] = "auto"
    graceful_timeout: Number = Field(30, gt=0)
    model: ModelSettings = Field(default_factory=ModelSettings)
    check: CheckSettings = Field(default_factory=CheckSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    node: NodeSettings = Field(default_factory=NodeSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    dump_dir: str = ""
    near_duplicate: NearDuplicateSettings = Field(default_factory=NearDuplicateSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    source: SourceSettings = Field(default_factory=SourceSettings)
    lightly: dict[str, Any] = Field(default_factory=dict)

    @field_validator("token", mode="before")
    @classmethod
    def _token(cls, v: Any) -> Any:
        return "" if v is None else str(v) if isinstance(v, (int, float)) else v

    @field_validator("input_dir", mode="before")
    @classmethod
    def _input_dir(cls, v: Any) -> list[str]:
        dirs = [v] if isinstance(v, str) else v
        if not isinstance(dirs, list) or not dirs or not all(isinstance(d, str) and d for d in dirs):
            raise ValueError("allowed: a directory path or a non-empty list of them")
        return dirs

    @field_validator("output_image_size")
    @classmethod
    def _output_image_size(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and (v == -1 or v > 0):
            return v
        if isinstance(v, list) and len(v) == 2 and all(x > 0 for x in v):
            return v
        raise ValueError("allowed: -1 (keep size), x > 0 (shortest edge) or [x, y] with x, y > 0")

    @field_validator("output_image_format")
    @classmethod
    def _output_image_format(cls, v: str) -> str:
        from PIL import Image

        fmt = v.lower().lstrip(".")
        if Image.registered_extensions().get("." + fmt) not in Image.SAVE:
            raise ValueError("allowed: an image format Pillow can write, e.g. png, jpg, webp, bmp, tiff")
        return fmt

    @field_validator("n_example_images")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("allowed: an even number (removed images are shown in pairs)")
        return v

    # ---- derived values -------------------------------------------------------------------
    @property
    def shared_path(self) -> Path:
        return Path(self.shared_dir).expanduser().resolve()

    @property
    def input_paths(self) -> list[Path]:
        return [Path(d).expanduser().resolve() for d in self.input_dir]

    @property
    def store_path(self) -> Path:
        return self.resolve_shared(self.store.path) if self.store.path else self.shared_path / "poolwatch.db"

    @property
    def store_url(self) -> str:
        """The PostgreSQL URL of a shared store ('' for SQLite): store.url, else $POOLWATCH_STORE_URL."""
        return self.store.url.get_secret_value() or os.environ.get("POOLWATCH_STORE_URL", "")

    @property
    def store_label(self) -> str:
        """The store for a log line or an output: the SQLite file, or the URL with its password masked."""
        return mask_url(self.store_url) if self.store_url else str(self.store_path)

    def has_store(self) -> bool:
        """A shared store always exists (its server is asked when opened); a SQLite one once its file does."""
        return bool(self.store_url) or self.store_path.exists()

    @property
    def node_name(self) -> str:
        return self.node.name or socket.gethostname()

    @property
    def dump_path(self) -> Path | None:
        """Where this node writes the selected images it holds (dump_dir); None: into the run's own folder."""
        return Path(self.dump_dir).expanduser().resolve() if self.dump_dir else None

    def resolve_shared(self, path: str) -> Path:
        """A path from the configuration, relative to shared_dir unless absolute."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.shared_path / p

    @property
    def n_samples(self) -> int | float | None:
        v = self.stopping_condition.n_samples
        return None if v == -1 else v

    @property
    def min_distance(self) -> float | None:
        v = self.stopping_condition.min_distance
        return None if v == -1 else float(v)

    def lightly_get(self, dotted: str) -> Any:
        node: Any = self.lightly
        for part in dotted.split("."):
            node = node[part]
        return node

    @property
    def batch_size(self) -> int:
        return int(self.lightly_get("loader.batch_size"))

    @property
    def input_size(self) -> int:
        """The model's input side: model.input_size for your own ONNX model, else lightly.collate.input_size."""
        return self.model.input_size if self.model.onnx else int(self.lightly_get("collate.input_size"))

    def resolved(self, mask: bool = True) -> dict[str, Any]:
        """The full configuration as plain data; the token is masked unless asked otherwise."""
        data = self.model_dump(mode="json")
        secret = self.token.get_secret_value()
        data["token"] = (MASK if secret else "") if mask else secret
        url = self.store.url.get_secret_value()
        data["store"]["url"] = mask_url(url) if mask else url
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(mask=True), sort_keys=False, allow_unicode=True)

    def to_json(self) -> str:
        return json.dumps(self.resolved(mask=True), sort_keys=True)


def mask_url(url: str) -> str:
    """A store URL fit for a log line or an output file: its password (and a password= parameter) masked."""
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    query = re.sub(r"(?i)(password=)[^&]*", rf"\g<1>{MASK}", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# ---- loading ---------------------------------------------------------------------------------
def default_config_text() -> str:
    return resources.files("poolwatch.pipeline").joinpath("config.yaml").read_text(encoding="utf-8")


def lightly_cli_defaults() -> dict[str, Any]:
    """lightly's own CLI config (lightly/cli/config/config.yaml): the schema of `lightly.*`.

    Found through the package's location, without importing lightly (which imports torch: seconds).
    """
    spec = importlib.util.find_spec("lightly")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("lightly: the lightly package is not installed (pip install lightly)")
    path = Path(list(spec.submodule_search_locations)[0]) / "cli" / "config" / "config.yaml"
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    # i/o keys are poolwatch's own top-level keys; hydra's block configures hydra itself.
    for key in ("input_dir", "output_dir", "embeddings", "checkpoint", "label_dir", "label_names_file", "hydra"):
        data.pop(key, None)
    if not isinstance(data, dict):
        raise ConfigError(f"lightly: {str(path)!r} is not a mapping; reinstall lightly")
    return data


def _check_lightly(values: Any, schema: dict[str, Any], prefix: str = "lightly") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: invalid value {values!r}; allowed: a mapping of lightly's CLI keys")
    for key, value in values.items():
        full = f"{prefix}.{key}"
        if key not in schema:
            allowed = ", ".join(sorted(schema))
            raise ConfigError(f"{full}: unknown key (value {value!r}); allowed under {prefix}: {allowed}")
        default = schema[key]
        if isinstance(default, dict):
            _check_lightly(value, default, full)
            continue
        if full in LIGHTLY_CHOICES:
            if value not in LIGHTLY_CHOICES[full]:
                allowed = ", ".join(map(str, LIGHTLY_CHOICES[full]))
                raise ConfigError(f"{full}: invalid value {value!r}; allowed: {allowed}")
            continue
        if not _same_kind(value, default):
            raise ConfigError(f"{full}: invalid value {value!r}; allowed: {_kind_name(default)}"
                              f" (lightly's default is {default!r})")


def _same_kind(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    return True


def _kind_name(default: Any) -> str:
    for kind, name in ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list")):
        if isinstance(default, kind):
            return name
    return "any value"


def _validate_lightly_values(lightly: dict[str, Any]) -> None:
    name = lightly["model"]["name"]
    if name not in LIGHTLY_MODELS:
        raise ConfigError(f"lightly.model.name: invalid value {name!r}; allowed: {', '.join(LIGHTLY_MODELS)}")
    checks: dict[str, Callable[[Any], bool]] = {
        "model.num_ftrs": lambda v: v > 0,
        "model.width": lambda v: v > 0,
        "collate.input_size": lambda v: v >= 16,
        "loader.batch_size": lambda v: v > 0,
        "loader.num_workers": lambda v: v >= -1,
        "trainer.max_epochs": lambda v: v >= 0,
    }
    allowed = {
        "model.num_ftrs": "an integer > 0",
        "model.width": "a number > 0",
        "collate.input_size": "an integer >= 16",
        "loader.batch_size": "an integer > 0",
        "loader.num_workers": "an integer >= 0, or -1 for all cores",
        "trainer.max_epochs": "an integer >= 0",
    }
    for dotted, ok in checks.items():
        node: Any = lightly
        for part in dotted.split("."):
            node = node[part]
        if not ok(node):
            raise ConfigError(f"lightly.{dotted}: invalid value {node!r}; allowed: {allowed[dotted]}")


def _merge_lightly(schema: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(schema)
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_lightly(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_validation_error(err: ValidationError, data: dict[str, Any]) -> str:
    errors = err.errors()
    first = errors[0]
    # Union members add their type name to the location ("n_samples.int"): keep only real keys.
    key_parts: list[str] = []
    node: Any = data
    for part in (str(p) for p in first["loc"] if not isinstance(p, int)):
        if isinstance(node, dict) and part in node:
            key_parts.append(part)
            node = node[part]
        elif first["type"] == "extra_forbidden":
            key_parts.append(part)
        else:
            break
    key = ".".join(key_parts) or "config"
    value = MASK if key in ("token", "store.url") else first.get("input")
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key (value {value!r}); allowed: {_allowed_keys(key_parts[:-1])}"
    if first["type"] == "literal_error":
        return f"{key}: invalid value {value!r}; allowed: {first['ctx']['expected']}"
    # A validator's own message already says what is allowed; prefer it over pydantic's type errors.
    own = next((e for e in errors if e["type"] == "value_error"), None)
    msg = own["msg"].removeprefix("Value error, ") if own else first["msg"]
    kinds = {e["type"] for e in errors}
    if own is None and kinds & {"float_type", "float_parsing"} and kinds <= NUMBER_ERRORS:
        msg = "allowed: a number"  # an int-or-float field: not "a valid integer" for 0.5-able options
    if not msg.startswith("allowed") and "allowed" not in msg:
        msg = f"allowed: {msg[0].lower()}{msg[1:]}"
    return f"{key}: invalid value {value!r}; {msg}"


def _allowed_keys(path: list[str]) -> str:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return ", ".join(model.model_fields)


def load_config(overrides: list[str] | None = None, config_file: str | Path | None = None) -> Config:
    """Defaults < config_file < overrides (`key=value` strings), validated into a `Config`."""
    try:
        layers = [OmegaConf.create(default_config_text())]
        if config_file is not None:
            path = Path(config_file)
            if path.is_dir():
                raise ConfigError(f"--config: {str(path)!r} is a directory; allowed: a YAML file")
            if not path.is_file():
                raise ConfigError(f"--config: file {str(path)!r} does not exist")
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"--config: cannot read {str(path)!r}: {exc.strerror}") from None
            except UnicodeDecodeError as exc:
                raise ConfigError(f"--config: {str(path)!r} is not UTF-8 text (byte {exc.start}: "
                                  f"{exc.object[exc.start:exc.start + 1]!r}); allowed: a UTF-8 YAML file") from None
            file_layer = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
            if not isinstance(yaml.safe_load(text) or {}, dict):
                raise ConfigError(f"--config: {str(path)!r} is not a YAML mapping")
            layers.append(file_layer)
        for item in overrides or []:
            if "=" not in item or item.startswith("="):
                raise ConfigError(f"{item}: not a key=value override; write e.g. stopping_condition.n_samples=0.1")
            layers.append(OmegaConf.from_dotlist([item]))
        merged = OmegaConf.to_container(OmegaConf.merge(*layers), resolve=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{getattr(exc, 'full_key', None) or 'config'}: cannot parse ({str(exc).splitlines()[0]})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: not valid YAML ({str(exc).splitlines()[0]})") from None
    assert isinstance(merged, dict)
    return validate({str(k): v for k, v in merged.items()})


def validate(data: dict[str, Any]) -> Config:
    schema = lightly_cli_defaults()
    lightly_values = data.get("lightly") or {}
    _check_lightly(lightly_values, schema)
    try:
        config = Config.model_validate({**data, "lightly": _merge_lightly(schema, lightly_values)})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, data)) from None
    _validate_lightly_values(config.lightly)
    if config.store.path:
        inside = config.resolve_shared(config.store.path).resolve()
        if not inside.is_relative_to(config.shared_path):
            raise ConfigError(f"store.path: invalid value {config.store.path!r}; allowed: a path inside shared_dir "
                              f"({config.shared_path}) - poolwatch writes nowhere else")
    for root in config.input_paths:
        if config.shared_path.is_relative_to(root):
            # Everything poolwatch writes (store, runs, reports, dumps) is under shared_dir; inside an
            # input dir it would be written there and ingested as images.
            raise ConfigError(f"shared_dir: invalid value {config.shared_dir!r}; allowed: a directory outside every "
                              f"input_dir (it is inside {str(root)!r}, and input dirs are read-only)")
    return config


def parse_interval(text: str) -> float:
    """'90s' / '30m' / '6h' / '1d' / '45' (seconds) -> seconds."""
    m = _INTERVAL_RE.match(text)
    if not m:
        raise ConfigError(f"schedule.interval: invalid value {text!r}; allowed: a duration such as 90s, 30m, 6h, 1d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def reference_table(text: str | None = None) -> str:
    """A markdown table of every option in config.yaml: dotted key, default, comment."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    path: list[tuple[int, str]] = []
    for line in (text if text is not None else default_config_text()).splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w]*):\s*(.*)$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while path and path[-1][0] >= indent:
            path.pop()
        value, _, comment = rest.partition("#")
        if not value.strip():
            path.append((indent, key))
            continue
        dotted = ".".join([p for _, p in path] + [key])
        default = value.strip().replace("|", "\\|")
        rows.append(f"| `{dotted}` | `{default}` | {comment.strip().replace('|', '/')} |")
    return "\n".join(rows)
