"""Networks: pure ``nn.Module``s (NCDHW in, one heatmap channel per landmark out), chosen by name."""

from h3de.networks import baselines  # noqa: F401  (registers the baseline networks)
from h3de.networks.registry import available_networks, build_network, register_network, require_network

__all__ = ["available_networks", "build_network", "register_network", "require_network"]
