"""Read back what a W&B run logged offline: the records of its ``run-<id>.wandb`` file, decoded with wandb's own
protobuf messages (``wandb.proto``).

The file is wandb's LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of
chunks, each ``<checksum u32><length u16><type u8>`` + data; a record too long for its block is split into
FIRST/MIDDLE/LAST chunks, and a block tail shorter than a chunk header is zero padding. The checksum is CRC-32 of
the type byte and the data, as wandb writes it.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

__all__ = ["OfflineRun", "read_offline_run", "read_records"]

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[pb.Record]:
    """Every record of a ``.wandb`` file, in order (checksums verified)."""
    data = Path(path).read_bytes()
    assert data[: len(_HEADER)] == _HEADER, f"{path}: not a W&B transaction log"
    records, parts, pos = [], [], len(_HEADER)
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:
            pos += left
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # unwritten tail
            break
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at byte {pos}"
        pos += _CHUNK_HEADER + length
        parts.append(chunk)
        if kind in (_FULL, _LAST):
            records.append(pb.Record.FromString(b"".join(parts)))
            parts = []
    return records


def _value(item: Any) -> Any:
    return json.loads(item.value_json)


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What an offline run recorded: its run record, config, history rows, final summary, metric definitions and
    artifacts."""

    run: pb.RunRecord
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, pb.MetricRecord] = field(default_factory=dict)
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)
    exit_code: int | None = None


def read_offline_run(run_dir: str | Path, wait_s: float = 30.0) -> OfflineRun:
    """The records of the one ``offline-run-*/run-*.wandb`` under ``<run_dir>/wandb``, gathered, once its exit
    record is on disk (wandb-core writes the log from its own process and may flush it after ``run.finish()``
    returned; waits up to ``wait_s``)."""
    files = sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {run_dir}/wandb, found {files}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not any(r.HasField("exit") for r in read_records(files[0])):
        time.sleep(0.2)
    out: OfflineRun | None = None
    config: dict[str, Any] = {}
    history, summary, metrics, artifacts, exit_code = [], {}, {}, [], None
    for record in read_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out = OfflineRun(record.run)
            config.update({_key(i): _value(i) for i in record.run.config.update})
        elif kind == "config":
            config.update({_key(i): _value(i) for i in record.config.update})
        elif kind == "history":
            history.append({_key(i): _value(i) for i in record.history.item})
        elif kind == "summary":
            summary.update({_key(i): _value(i) for i in record.summary.update})
        elif kind == "metric":
            metrics[record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "artifact":
            artifacts.append(record.artifact)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    assert out is not None, f"{files[0]}: no run record"
    out.config, out.history, out.summary, out.metrics = config, history, summary, metrics
    out.artifacts, out.exit_code = artifacts, exit_code
    return out
