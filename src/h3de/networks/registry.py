"""Name -> network constructor, with what the rest of h3de needs to know about each network.

A constructor takes ``in_channels``, ``out_channels`` (the number of landmarks) and the fields of its
sub-config under ``model`` as keyword arguments, and returns a pure ``nn.Module``. ``output`` says how
its output is read: "heatmap" ((B, L, D, H, W) heatmaps or logits) or "anchor" (anchor maps decoded
by ``h3de.anchors``). ``check_input`` refuses an input size the network cannot work with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from h3de.errors import ConfigError

__all__ = [
    "NetworkSpec",
    "register_network",
    "network_spec",
    "build_network",
    "check_network_input",
    "network_params",
    "available_networks",
    "require_network",
]

OUTPUTS = ("heatmap", "anchor")


@dataclass(frozen=True)
class NetworkSpec:
    constructor: Callable[..., nn.Module]
    config_key: str  # the sub-config under ``model`` holding the constructor's arguments
    output: str  # "heatmap" | "anchor"
    check_input: Callable[[Mapping[str, Any], Sequence[int]], None] | None = None


_NETWORKS: dict[str, NetworkSpec] = {}


def register_network(
    name: str,
    config_key: str | None = None,
    output: str = "heatmap",
    check_input: Callable[[Mapping[str, Any], Sequence[int]], None] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a constructor to the registry under ``name`` (sub-config ``config_key or name``)."""
    if output not in OUTPUTS:
        raise ValueError(f"output '{output}' is not one of {OUTPUTS}")

    def add(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _NETWORKS:
            raise ValueError(f"network '{name}' is registered twice")
        _NETWORKS[name] = NetworkSpec(constructor, config_key or name, output, check_input)
        return constructor

    return add


def available_networks() -> list[str]:
    return sorted(_NETWORKS)


def require_network(name: str) -> None:
    """Raise ConfigError naming ``name`` and the known networks unless ``name`` is registered."""
    if name not in _NETWORKS:
        known = ", ".join(available_networks())
        raise ConfigError(f"model.name='{name}' is not a registered network (known: {known})")


def network_spec(name: str) -> NetworkSpec:
    require_network(name)
    return _NETWORKS[name]


def network_params(model_cfg: Any) -> Mapping[str, Any]:
    """The constructor arguments of ``model_cfg.name``: its sub-config (empty if it has none)."""
    spec = network_spec(model_cfg.name)
    params = model_cfg.get(spec.config_key) if hasattr(model_cfg, "get") else None
    return params if params is not None else {}


def build_network(name: str, in_channels: int, out_channels: int, params: Mapping[str, Any]) -> nn.Module:
    """Build the network registered as ``name`` with its sub-config ``params``.

    Raises:
        ConfigError: unknown name, or parameters the constructor refuses (the message names them).
    """
    spec = network_spec(name)
    try:
        return spec.constructor(in_channels=in_channels, out_channels=out_channels, **dict(params))
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"model.{spec.config_key}: cannot build '{name}': {e}") from None


def check_network_input(name: str, params: Mapping[str, Any], input_size: Sequence[int]) -> None:
    """Raise ConfigError when the network ``name`` with ``params`` cannot work on ``input_size`` voxels."""
    spec = network_spec(name)
    if spec.check_input is None:
        return
    try:
        spec.check_input(params, list(input_size))
    except ValueError as e:
        raise ConfigError(f"model.{spec.config_key} with data.patch_size={list(input_size)}: {e}") from None
