"""Shared by the benchmark scripts: write a result markdown next to the script and print it."""

from __future__ import annotations

from pathlib import Path


def write_report(script: str, lines: list[str], out: str | None = None) -> None:
    """Write ``lines`` to ``out``, by default the ``.md`` file beside ``script`` (a benchmark's ``__file__``), and print
    them."""
    text = "\n".join(lines)
    Path(out or Path(script).with_suffix(".md")).write_text(text)
    print(text)
