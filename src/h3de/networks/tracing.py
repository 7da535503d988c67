"""Whether a network is being recorded as a graph for export, rather than run.

Some forward passes take shortcuts that depend on a shape or on the data: skipping a padding of zero voxels,
a cheaper attention kernel when a mask is all true or when several regions share one routed region. They give
the same result, but a recorded graph keeps only the branch taken by the example input, so a graph recorded
with a shortcut would be wrong for other inputs. While exporting (``torch.export``, on which the ONNX exporter
is built, or ``torch.jit.trace``) the networks take the general path, whose graph holds for every input.
"""

from __future__ import annotations

import torch

__all__ = ["is_tracing"]


def is_tracing() -> bool:
    """True inside ``torch.export`` / ``torch.onnx.export`` and ``torch.jit.trace``."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
