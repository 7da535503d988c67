"""``trainer.precision`` checked against the device before any work starts.

- ``32-true`` (also ``32``) and ``64-true``: every device.
- ``bf16-mixed`` and ``bf16-true``: the CPU, and CUDA GPUs with bfloat16 support (Ampere and later).
- ``16-mixed``: CUDA GPUs only. On the CPU Lightning would silently train in bf16-mixed instead: refused, so that a
  run is what its config says.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from h3de.distributed import resolve_accelerator
from h3de.errors import ConfigError

__all__ = ["check_precision"]


def check_precision(trainer: DictConfig) -> None:
    """Refuse a ``trainer.precision`` that the device of ``trainer.accelerator`` cannot run.

    Raises:
        ConfigError: naming the precision, the device and the precisions it can run.
    """
    precision, kind = str(trainer.precision), resolve_accelerator(trainer.accelerator)
    if kind == "cpu" and precision == "16-mixed":
        raise ConfigError(
            "trainer.precision=16-mixed needs a CUDA GPU (float16 autocast); on the CPU use bf16-mixed or 32-true"
        )
    bf16 = precision.startswith("bf16")
    if kind == "cuda" and bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(False):
        raise ConfigError(
            f"trainer.precision={precision} needs a GPU with bfloat16 support, and {torch.cuda.get_device_name()} "
            "has none: use 16-mixed or 32-true"
        )
