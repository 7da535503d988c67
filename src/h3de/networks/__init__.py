"""Networks: pure ``nn.Module``s (NCDHW in, one heatmap channel per landmark out), chosen by name."""

from h3de.networks import baselines, h3de_net  # noqa: F401  (register the networks)
from h3de.networks.conditioned import LandmarkConditioned
from h3de.networks.registry import (
    available_networks,
    build_network,
    check_network_input,
    network_params,
    network_spec,
    register_network,
    require_network,
)

__all__ = [
    "LandmarkConditioned",
    "available_networks",
    "build_network",
    "check_network_input",
    "network_params",
    "network_spec",
    "register_network",
    "require_network",
]
