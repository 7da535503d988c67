"""Name -> network constructor. Each registered name has a sub-config of the same name under ``model``.

A constructor takes ``in_channels``, ``out_channels`` and the fields of its sub-config as keyword
arguments, and returns a pure ``nn.Module`` mapping (B, in_channels, D, H, W) to
(B, out_channels, D, H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from h3de.errors import ConfigError

__all__ = ["register_network", "build_network", "available_networks", "require_network"]

_NETWORKS: dict[str, Callable[..., nn.Module]] = {}


def register_network(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a constructor to the registry under ``name``."""

    def add(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _NETWORKS:
            raise ValueError(f"network '{name}' is registered twice")
        _NETWORKS[name] = constructor
        return constructor

    return add


def available_networks() -> list[str]:
    return sorted(_NETWORKS)


def require_network(name: str) -> None:
    """Raise ConfigError naming ``name`` and the known networks unless ``name`` is registered."""
    if name not in _NETWORKS:
        known = ", ".join(available_networks())
        raise ConfigError(f"model.name='{name}' is not a registered network (known: {known})")


def build_network(name: str, in_channels: int, out_channels: int, params: Mapping[str, Any]) -> nn.Module:
    """Build the network registered as ``name`` with its sub-config ``params``.

    Raises:
        ConfigError: unknown name, or parameters the constructor refuses.
    """
    require_network(name)
    try:
        return _NETWORKS[name](in_channels=in_channels, out_channels=out_channels, **dict(params))
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"model.{name}: cannot build the network: {e}") from None
