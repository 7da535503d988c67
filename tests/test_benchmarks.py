"""The benchmark scripts are not run by the test suite (they train for minutes to hours), but they must at least
parse, and each must say how to rerun it: a broken script is otherwise found only when a long run is started."""

import ast
from pathlib import Path

import pytest

HELPERS = ("report.py", "epoch_clock.py")  # modules the scripts share, not scripts
SCRIPTS = sorted(p for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py") if p.name not in HELPERS)


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_parses_and_gives_its_command(script):
    tree = ast.parse(script.read_text(), filename=str(script))  # SyntaxError / IndentationError name the line
    assert f"benchmarks/{script.name}" in (ast.get_docstring(tree) or ""), "the docstring gives the command to rerun"
    assert any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
