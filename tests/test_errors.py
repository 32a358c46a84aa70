"""Every error a user can meet derives from PoolwatchError and carries its exit code; the CLI turns
each one into exactly one line and that code (DESIGN §8)."""

from __future__ import annotations

import errno
import importlib
import pkgutil
from pathlib import Path

import pytest

import poolwatch.daemon
import poolwatch.pipeline
from poolwatch.daemon import cli
from poolwatch.pipeline.errors import PoolwatchError

from .conftest import FAST, encode, photo, run_cli

# The code each error must map to. A new subclass fails the walk below until it is given its code here.
EXPECTED = {
    "PoolwatchError": 1,
    "UsageError": 2,
    "ConfigError": 2,
    "ModelError": 2,
    "SamplingError": 2,
    "ExportError": 2,
    "ReportError": 2,
    "TrainError": 2,
    "StateError": 1,
    "StoreError": 1,
    "LockedError": 1,
    "InputDirError": 1,
    "StartError": 1,
    "BuildError": 1,
}


def all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *all_subclasses(sub)}
    return out


def import_everything() -> None:
    for pkg in (poolwatch.pipeline, poolwatch.daemon):
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def make(cls: type[PoolwatchError]) -> PoolwatchError:
    if issubclass(cls, OSError):
        return cls(errno.ENOENT, "input directory is missing", "/data/in")
    return cls(f"{cls.__name__} says what went wrong")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_domain_error_is_one_line_and_its_code(name: str, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import_everything()
    classes = {c.__name__: c for c in all_subclasses(PoolwatchError)} | {"PoolwatchError": PoolwatchError}
    exc = make(classes[name])
    assert exc.exit_code == EXPECTED[name]

    def raises(args: object) -> int:
        raise exc

    monkeypatch.setattr(cli, "_dispatch", raises)
    code = cli.main(["status"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXPECTED[name]
    assert err == [f"poolwatch: error: {exc}"], err


def test_no_domain_error_is_left_without_a_code() -> None:
    import_everything()
    names = {c.__name__ for c in all_subclasses(PoolwatchError)}
    assert names <= set(EXPECTED), f"give these an exit code in EXPECTED: {sorted(names - set(EXPECTED))}"


def test_train_with_one_image_is_one_line_and_exit_2(tmp_path: Path) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    inp.mkdir()
    (inp / "only.jpg").write_bytes(encode(photo(1)))
    proc = run_cli("train", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "lightly.trainer.max_epochs=1",
                   timeout=240)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("poolwatch: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
