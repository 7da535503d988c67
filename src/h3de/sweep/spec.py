"""A sweep file in W&B's sweep format, read and checked for ``h3de sweep``.

The same file serves ``wandb sweep`` / ``wandb agent`` (with a W&B server) and ``h3de sweep`` (Optuna, no
server). Its ``command`` runs ``h3de train EXPERIMENT.yaml [key=value ...] ${args_no_hyphens}``: W&B
appends every swept parameter as ``key=value`` (``str`` of the value, so ``[8, 16]`` for a list), which
h3de reads as plain config overrides. :func:`load_sweep` reads the file and refuses, before any training,
an unknown method or distribution, and a parameter that is not a config key or whose values the config
does not accept (each value, or the ends of a range, is loaded with the experiment).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from h3de.errors import ConfigError

__all__ = ["Parameter", "SweepSpec", "load_sweep", "override"]

METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "log_uniform_values", "log_uniform")
_ARGS_MACRO = "${args_no_hyphens}"
_TOP_KEYS = {"method", "metric", "parameters", "command", "early_terminate", "name", "description", "program",
             "project", "entity", "run_cap"}  # fmt: skip


@dataclass(frozen=True)
class Parameter:
    """One swept config key: a constant, a list of values, or a range (``low``, ``high``)."""

    key: str
    distribution: str  # one of DISTRIBUTIONS
    values: tuple = ()  # constant (one) or categorical
    low: float | None = None  # ranges: uniform, int_uniform, log_uniform_values (value bounds)
    high: float | None = None

    def candidates(self) -> list:
        """Values checked against the config before any work: every value, or both ends of the range."""
        return list(self.values) if self.values else [self.low, self.high]

    def choices(self) -> list:
        """Optuna's categorical choices: scalars as they are, other values (lists) as the text W&B writes."""
        return [v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for v in self.values]


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    name: str  # the file's `name`, else its stem: the default Optuna study name
    method: str  # grid | random | bayes
    metric: str  # e.g. val/mre_mm
    goal: str  # minimize | maximize
    experiment: str | None  # the experiment YAML of the command (relative to the working directory)
    fixed: tuple[str, ...]  # key=value overrides written in the command itself
    parameters: tuple[Parameter, ...]
    hyperband: dict[str, Any] | None = None  # early_terminate (type: hyperband)
    run_cap: int | None = None  # most trials in the whole sweep
    raw: dict = field(default_factory=dict, repr=False)

    def grid(self) -> dict[str, list]:
        """The grid's values per key (grid method: every parameter is a constant or a list)."""
        return {p.key: list(p.values) for p in self.parameters}


def override(key: str, value: Any) -> str:
    """The ``key=value`` text W&B's ``${args_no_hyphens}`` writes for a value (Python ``str`` of it)."""
    return f"{key}={value}"


def _fail(path: Path, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def _parameter(path: Path, key: str, body: Any) -> Parameter:
    where = f"parameters.{key}"
    if not isinstance(body, dict):
        raise _fail(path, f"{where} must be a mapping (value:, values:, or min:/max:), got {body!r}")
    if "parameters" in body:
        raise _fail(path, f"{where}: nested parameters are not supported; name the config key with dots")
    distribution = body.get("distribution")
    if distribution is None:  # W&B infers it
        if "value" in body:
            distribution = "constant"
        elif "values" in body:
            distribution = "categorical"
        elif "min" in body and "max" in body:
            ints = isinstance(body["min"], int) and isinstance(body["max"], int)
            distribution = "int_uniform" if ints else "uniform"
    if distribution not in DISTRIBUTIONS:
        raise _fail(
            path,
            f"{where}: distribution {distribution!r} is not one h3de sweep runs ({', '.join(DISTRIBUTIONS)}); "
            "give value:, values: or min:/max:",
        )
    unknown = set(body) - {"distribution", "value", "values", "min", "max"}
    if unknown:
        raise _fail(path, f"{where}: unsupported field(s) {', '.join(sorted(unknown))}")
    if distribution == "constant":
        if "value" not in body:
            raise _fail(path, f"{where}: a constant needs value:")
        return Parameter(key, distribution, values=(body["value"],))
    if distribution == "categorical":
        values = body.get("values")
        if not isinstance(values, list) or not values:
            raise _fail(path, f"{where}: values must be a non-empty list, got {values!r}")
        return Parameter(key, distribution, values=tuple(values))
    low, high = body.get("min"), body.get("max")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers or not low < high:
        raise _fail(path, f"{where}: min and max must be numbers with min < max, got {low!r} and {high!r}")
    if distribution == "int_uniform" and not (isinstance(low, int) and isinstance(high, int)):
        raise _fail(path, f"{where}: int_uniform needs integer min and max, got {low!r} and {high!r}")
    if distribution == "log_uniform":  # W&B: min/max are natural logs of the bounds
        return Parameter(key, "log_uniform_values", low=math.exp(low), high=math.exp(high))
    if distribution == "log_uniform_values" and low <= 0:
        raise _fail(path, f"{where}: log_uniform_values needs min > 0, got {low!r}")
    return Parameter(key, distribution, low=low, high=high)


def _command(path: Path, command: Any) -> tuple[str | None, tuple[str, ...]]:
    """The experiment file and fixed overrides of ``[${env}, h3de, train, EXP.yaml, k=v..., ${args_no_hyphens}]``."""
    expected = f"[${{env}}, h3de, train, EXPERIMENT.yaml, {_ARGS_MACRO}]"
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise _fail(path, f"command must be a list of strings like {expected}, got {command!r}")
    words = [c for c in command if c != "${env}"]
    if len(words) < 2 or Path(words[0]).name != "h3de" or words[1] != "train" or _ARGS_MACRO not in words:
        raise _fail(path, f"command must run h3de train with {_ARGS_MACRO}, like {expected}; got {command}")
    rest = [w for w in words[2:] if w != _ARGS_MACRO]
    macros = [w for w in rest if w.startswith("${")]
    if macros:
        raise _fail(path, f"command: {', '.join(macros)} cannot be used by h3de sweep (only ${{env}}, {_ARGS_MACRO})")
    experiment = rest.pop(0) if rest and "=" not in rest[0] else None
    bad = [w for w in rest if "=" not in w]
    if bad:
        raise _fail(path, f"command: {bad[0]!r} is not a key=value override (the experiment YAML comes first)")
    return experiment, tuple(rest)


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Read and check a W&B-format sweep file; every parameter value is loaded against the experiment's config.

    Raises:
        ConfigError: an unreadable file, an unknown method, distribution or top-level field, a command that
            does not run ``h3de train ... ${args_no_hyphens}``, or a parameter that is not a config key or
            whose value the config refuses.
    """
    from h3de.config import load_config

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _fail(path, f"not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise _fail(path, "the top level must be a mapping (method, metric, parameters, command)")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise _fail(path, f"unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_TOP_KEYS))})")
    method = raw.get("method")
    if method not in METHODS:
        raise _fail(path, f"method {method!r} is not one of {', '.join(METHODS)}")
    metric = raw.get("metric") or {}
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise _fail(path, "metric must be a mapping with a name, e.g. {name: val/mre_mm, goal: minimize}")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise _fail(path, f"metric.goal {goal!r} is not minimize or maximize")
    body = raw.get("parameters")
    if not isinstance(body, dict) or not body:
        raise _fail(path, "parameters must be a non-empty mapping of config keys")
    parameters = tuple(_parameter(path, str(key), value) for key, value in body.items())
    if method == "grid":
        ranges = [p.key for p in parameters if not p.values]
        if ranges:
            raise _fail(path, f"method grid needs values: for every parameter; {', '.join(ranges)} is a range")
    hyperband = raw.get("early_terminate")
    if hyperband is not None:
        if not isinstance(hyperband, dict) or hyperband.get("type") != "hyperband":
            raise _fail(path, f"early_terminate must be {{type: hyperband, min_iter: N}}, got {hyperband!r}")
        if "min_iter" not in hyperband and not {"max_iter", "s"} <= set(hyperband):
            raise _fail(path, "early_terminate: give min_iter, or max_iter and s")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        raise _fail(path, f"run_cap must be a positive integer, got {run_cap!r}")
    experiment, fixed = _command(path, raw.get("command"))
    try:
        load_config(experiment, list(fixed))
    except ConfigError as e:
        raise _fail(path, f"command: {e}") from None
    for parameter in parameters:
        for value in parameter.candidates():
            try:
                load_config(experiment, [*fixed, override(parameter.key, value)])
            except ConfigError as e:
                raise _fail(path, f"parameter {parameter.key}={value!r}: {e}") from None
    name = raw.get("name") or path.stem
    return SweepSpec(
        path, str(name), method, metric["name"], goal, experiment, fixed, parameters, hyperband, run_cap, raw
    )
