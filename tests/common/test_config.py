"""Settings: TOML parsing, --set overrides, validation messages that name the key."""

from pathlib import Path

import pytest
from fedrec.common.config import Config, load_config, to_dict
from fedrec.common.errors import ConfigError


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('name = "x"\n[train]\nlr = 0.01\nmethods = ["popularity"]\n')

    cfg = load_config(path, ["lora.rank=4", "data.max_users=50", "model.name=/some/dir"])

    assert cfg.name == "x"
    assert cfg.train.lr == 0.01 and cfg.train.methods == ("popularity",)
    assert cfg.lora.rank == 4 and cfg.data.max_users == 50
    assert cfg.model.name == "/some/dir"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("lora.variant=\"qlora\"", "lora.variant"),
        ("train.methods=[\"magic\"]", "train.methods"),
        ("train.lr=-1", "train.lr"),
        ("train.batch_size=\"many\"", "train.batch_size must be int"),
        ("nosuch.key=1", "unknown setting nosuch"),
        ("train.nosuch=1", "unknown setting train.nosuch"),
        ("privacy.delta=2.0", "privacy.delta"),
    ],
)
def test_invalid_settings_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_round_trip_through_dict() -> None:
    cfg = load_config(None, ["lora.target_modules=[\"q_proj\"]"])
    import tomllib

    import tomli_w

    again = load_config(None, [])
    text = tomli_w.dumps(to_dict(cfg))
    from fedrec.common.config import from_dict

    assert from_dict(Config, tomllib.loads(text)) == cfg
    assert again != cfg


@pytest.mark.parametrize("override", [
    "privacy.target_epsilon=inf", "privacy.target_epsilon=nan", "privacy.delta=nan",
    "privacy.noise_multiplier=nan", "privacy.noise_multiplier=inf", "fed.client_budgets={client-0=inf}",
    "fed.client_budgets={client-0=nan}", "prior.noise_multiplier=inf", "prior.weight=nan",
    "train.sample_rate=0", "train.sample_rate=1.5",
])
def test_non_finite_budgets_and_noise_are_config_errors(override: str) -> None:
    key = override.partition("=")[0].split("{")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_infinite_budget_is_one_clean_line_and_exit_2(tmp_path: Path, capsys) -> None:
    from fedrec.cli import main

    code = main(["simulate", "--output", str(tmp_path / "run"), "--set", "privacy.target_epsilon=inf"])

    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fedrec: error:") and err.count("\n") == 1
    assert "privacy.target_epsilon=inf must be a finite number" in err
    assert not (tmp_path / "run").exists()
