"""The Flower app `flwr run .` submits (pyproject.toml [tool.flwr.app]) and the one `fedrec simulate`
generates: their run config cannot drift from the config defaults, their components exist."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest
from fedrec.common.config import Config, from_run_config
from fedrec.common.errors import ConfigError
from fedrec.common.rundir import FlowerDir
from fedrec.simulations.federated import COMPONENTS, write_app

REPO = Path(__file__).resolve().parents[2]
APP_ONLY = {"name": "federated", "output": "runs/flwr", "resume": False, "num-clients": 0}


def flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flower's view of [tool.flwr.app.config]: nested tables as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def defaults(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every setting of Config() with its default, dotted (None included, unlike to_run_config)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out |= defaults(value, f"{prefix}{f.name}.")
        else:
            out[prefix + f.name] = value
    return out


def pyproject_app() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]


def test_run_config_of_flwr_run_equals_the_config_defaults() -> None:
    run_config = flat(pyproject_app()["config"])
    expected = defaults(Config())

    settings = {k: v for k, v in run_config.items() if k not in APP_ONLY}

    assert {k: run_config[k] for k in APP_ONLY} == APP_ONLY  # name: `fedrec simulate`'s default too
    unknown = sorted(set(settings) - set(expected))
    assert not unknown, f"[tool.flwr.app.config] keys that are not settings: {unknown}"
    for key, value in settings.items():
        assert (None if value == "" else value) == expected[key], f"{key} = {value!r} is not the default"
    # the same through the parser the ServerApp and ClientApp use
    assert from_run_config(run_config) == dataclasses.replace(Config(), name="federated")


def test_every_scalar_setting_can_be_set_with_flwr_run() -> None:
    run_config = flat(pyproject_app()["config"])
    # lists and tables (train.methods, eval.ks, fed.client_budgets, ...) are not run-config values
    scalars = {k for k, v in defaults(Config()).items() if not isinstance(v, tuple | list | dict)}

    missing = sorted(scalars - set(run_config) - {"name"})

    assert not missing, f"settings missing from [tool.flwr.app.config]: {missing}"


def test_flwr_run_bundle_leaves_out_tests_and_benchmarks() -> None:
    app = pyproject_app()

    assert app["components"] == {"serverapp": "fedrec.server.app:app", "clientapp": "fedrec.client.app:app"}
    assert {"benchmarks/**", "tests/**"} <= set(app["fab-exclude"])
    assert "federations" not in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]


def test_generated_app_names_the_simulation_components(tmp_path: Path) -> None:
    flower = FlowerDir(tmp_path / "flower")

    write_app(flower)

    doc = tomllib.loads(flower.app_pyproject.read_text())
    assert doc["project"]["dependencies"] == []  # Flower installs nothing per run
    assert doc["tool"]["flwr"]["app"]["components"] == {"serverapp": f"{COMPONENTS}:server",
                                                         "clientapp": f"{COMPONENTS}:client"}
    assert "config" not in doc["tool"]["flwr"]["app"]  # nothing reaches the components by run config
    assert sorted(p.name for p in flower.app.iterdir()) == ["pyproject.toml"]


def test_simulation_components_refuse_to_load_outside_fedrec_simulate(monkeypatch) -> None:
    import importlib
    import sys

    monkeypatch.delenv("FEDREC_SIMULATION", raising=False)
    monkeypatch.delitem(sys.modules, COMPONENTS, raising=False)

    with pytest.raises(ConfigError, match="FEDREC_SIMULATION is not set"):
        importlib.import_module(COMPONENTS)
