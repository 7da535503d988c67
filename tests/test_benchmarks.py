"""The benchmark scripts are not run by the test suite (they train for minutes to hours), but they must at least
compile: a broken script is otherwise found only when a long run is started."""

from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_compiles(script):
    compile(script.read_text(), str(script), "exec")  # raises SyntaxError (and IndentationError) naming the line
