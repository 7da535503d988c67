"""Checkpoint files: written atomically, read without unpickling arbitrary objects, truncation named clearly.

Lightning's own writer (``TorchCheckpointIO`` through an fsspec transaction) writes the file in the system temp
folder and moves it into place: a move across filesystems (``/tmp`` on a node, checkpoints on shared storage) is a
copy onto the final name, which a killed job leaves half-written. :class:`AtomicCheckpointIO` writes beside the
target and renames, and reads every checkpoint with ``torch.load(weights_only=True)``, for resume as well.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from h3de.errors import H3deError
from h3de.io_utils import atomic_path

__all__ = ["AtomicCheckpointIO", "read_checkpoint", "save_checkpoint", "newest_run", "RUN_NAME"]

RUN_NAME = re.compile(r"(\d{8}-\d{6})(?:-(\d+))?")  # train.make_run_dir: <timestamp>[-n]
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed onto ``path``.

    A reader (or a run resumed after a crash) sees the old file or the new one, never a part of one.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain values only, nothing executed).

    Raises:
        H3deError: naming the file: missing, truncated (an interrupted write or copy), not a checkpoint, or
            holding objects other than tensors and plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise H3deError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(len(_ZIP_MAGIC))
    if magic != _ZIP_MAGIC:
        raise H3deError(f"{path}: not a loadable h3de checkpoint (not a PyTorch checkpoint file)")
    if not zipfile.is_zipfile(path):
        raise H3deError(
            f"{path}: not a loadable h3de checkpoint: the file is truncated ({path.stat().st_size} bytes, it ends "
            "before its index; an interrupted write or copy): use another checkpoint of the run or copy it again"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise H3deError(
            f"{path}: not a loadable h3de checkpoint: it holds objects other than tensors and plain values, which "
            f"h3de never unpickles ({first})"
        ) from None
    except Exception as e:
        raise H3deError(f"{path}: not a loadable h3de checkpoint ({type(e).__name__}: {e})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: :func:`save_checkpoint` and :func:`read_checkpoint` on local paths."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Callable | Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("h3de loads checkpoints with weights_only=True only")
        return read_checkpoint(path, map_location)


def newest_run(folder: Path, needs: str) -> Path | None:
    """The newest run directory in ``folder`` (by the ``<timestamp>[-n]`` names of ``h3de train``) holding ``needs``."""
    runs = []
    if folder.is_dir():
        for run in folder.iterdir():
            match = RUN_NAME.fullmatch(run.name)
            if match and (run / needs).is_file():
                runs.append(((match[1], int(match[2] or 0)), run))
    return max(runs)[1] if runs else None
