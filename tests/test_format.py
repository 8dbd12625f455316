"""The Model Zoo's format rules: black and isort at 120 columns, flake8, and JSON pretty-printed with 4 spaces."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

PYTHON_TREES = ["bundle", "scripts", "tests", "apps"]


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "command",
    [
        ["black", "--check", "--quiet", *PYTHON_TREES],
        ["isort", "--check-only", "--quiet", *PYTHON_TREES],
        ["flake8", *PYTHON_TREES],
    ],
    ids=["black", "isort", "flake8"],
)
def test_python_is_formatted_and_lint_free(command: list[str]) -> None:
    result = _tool(*command)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def test_json_is_pretty_printed_with_four_spaces_in_key_order() -> None:
    """What pre-commit's ``pretty-format-json --no-sort-keys --indent=4`` writes, byte for byte."""
    files = sorted(ROOT.glob("configs/*.json")) + sorted(ROOT.glob("apps/**/*.json")) + sorted(ROOT.glob("docs/*.json"))
    assert files
    for path in files:
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{path.relative_to(ROOT)} is not pretty-printed"
