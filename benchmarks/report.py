"""Shared by the benchmark scripts: write a result markdown next to the script and print it."""

from __future__ import annotations

from pathlib import Path


def write_report(script: str, lines: list[str]) -> None:
    """Write ``lines`` to the ``.md`` file beside ``script`` (a benchmark's ``__file__``) and print them."""
    text = "\n".join(lines)
    Path(script).with_suffix(".md").write_text(text)
    print(text)
