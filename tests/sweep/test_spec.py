"""Sweep files: W&B's own schema and command expansion accept them; h3de refuses bad ones before any work."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from wandb.apis.public.sweeps import _validate_config_and_fill_distribution
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from h3de.cli import main
from h3de.errors import ConfigError
from h3de.sweep import load_sweep, override

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
SCHEMA = json.loads((Path(__file__).parent / "wandb_sweep_schema.json").read_text())


def wandb_violations(config: dict) -> list[str]:
    """Violations of W&B's sweep schema (sweeps==0.3.0), checked as W&B's sweep engine does (Draft 7, formats)."""
    formats = jsonschema.FormatChecker()
    formats.checks("float")(lambda v: isinstance(v, float))
    formats.checks("integer")(lambda v: isinstance(v, int))
    validator = jsonschema.Draft7Validator(SCHEMA, format_checker=formats)
    return [e.message for e in validator.iter_errors(config)]


def agent_command(config: dict, values: dict) -> list[str]:
    """The command line ``wandb agent`` runs for a sweep run with ``values``, expanded as its _command_run does."""
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros["env"] = ["/usr/bin/env"]
    line = []
    for word in config["command"]:
        line += macros[word[2:-1]] if word.startswith("${") else [word]
    return line


def test_the_shipped_sweep_files_exist():
    assert {p.stem for p in SWEEPS} >= {"phantom_h3de_grid", "phantom_h3de_bayes", "phantom_unet_random"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweep_files_are_valid_for_wandb_and_h3de(path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the command's experiment path is relative to where the agent runs
    config = yaml.safe_load(path.read_text())
    assert wandb_violations(config) == []
    _validate_config_and_fill_distribution(config)  # W&B's client-side check: no ambiguous min/max
    spec = load_sweep(path)
    assert spec.metric == "val/mre_mm" and spec.goal == "minimize"
    # the agent's command line for one point of the sweep is a valid `h3de train` that loads these overrides
    values = {p.key: p.candidates()[-1] for p in spec.parameters}
    line = agent_command(config, values)
    assert line[:3] == ["/usr/bin/env", "h3de", "train"]
    assert line[-len(values) :] == [override(k, v) for k, v in values.items()]
    assert main([*line[2:], "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in values.items():
        node = printed
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_wandb_schema_check_can_fail():
    config = yaml.safe_load(SWEEPS[0].read_text())
    assert wandb_violations({**config, "method": "hillclimb"})
    assert wandb_violations({**config, "parameters": {"optim.lr": {"min": 1, "max": 0.5, "q": "x"}}})


def write_sweep(tmp_path: Path, **changes) -> Path:
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("model:\n  unet:\n    channels: [8, 16, 32]\n    strides: [2, 2]\n")
    body = {
        "method": "grid",
        "metric": {"name": "val/mre_mm", "goal": "minimize"},
        "parameters": {"optim.lr": {"values": [0.001, 0.01]}},
        "command": ["${env}", "h3de", "train", str(experiment), "trainer.max_epochs=2", "${args_no_hyphens}"],
    }
    body.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_a_small_sweep_file_is_read(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, parameters={"model.unet.channels": {"values": [[8, 16, 32]]},
                                                        "optim.lr": {"min": 0.001, "max": 0.01}},
                                  method="random"))  # fmt: skip
    assert spec.experiment.endswith("exp.yaml") and spec.fixed == ("trainer.max_epochs=2",)
    channels, lr = spec.parameters
    assert channels.choices() == ["[8, 16, 32]"]  # W&B's text for a list, what ${args_no_hyphens} writes
    assert (lr.distribution, lr.low, lr.high) == ("uniform", 0.001, 0.01)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"parameters": {"optim.learning_rate": {"values": [0.1]}}},
            "parameter optim.learning_rate=0.1: .*invalid config key",
        ),
        ({"parameters": {"optim.lr": {"values": ["fast"]}}}, "parameter optim.lr='fast'"),
        ({"parameters": {"optim.name": {"values": ["adamw", "lion"]}}}, "optim.name='lion' is not one of"),
        ({"method": "hillclimb"}, "method 'hillclimb' is not one of grid, random, bayes"),
        ({"method": None}, "method None is not one of"),
        ({"parameters": {"optim.lr": {"distribution": "normal", "mu": 0, "sigma": 1}}}, "distribution 'normal'"),
        ({"parameters": {"optim.lr": {"min": 0.001, "max": 0.01}}}, "method grid needs values: for every parameter"),
        ({"parameters": {"optim.lr": {"min": 0.01, "max": 0.001}}, "method": "random"}, "min < max"),
        ({"command": ["${env}", "python", "train.py", "${args}"]}, "command must run h3de train with"),
        ({"command": ["h3de", "train", "${args}", "${args_no_hyphens}"]}, r"\$\{args\} cannot be used"),
        ({"command": ["h3de", "train", "missing.yaml", "${args_no_hyphens}"]}, "config file not found: missing.yaml"),
        ({"early_terminate": {"type": "median"}}, "early_terminate must be"),
        ({"metrics": [{"name": "val/mre_mm"}]}, "unknown field"),
    ],
)
def test_bad_sweep_files_are_refused_with_the_reason(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_sweep(write_sweep(tmp_path, **changes))
    assert str(tmp_path / "sweep.yaml") in str(error.value)


def test_a_missing_sweep_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep(tmp_path / "nope.yaml")
