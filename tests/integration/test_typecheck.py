"""The library type-checks under mypy --strict (pyproject's [tool.mypy]); a regression fails here."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_broker_passes_mypy_strict() -> None:
    res = subprocess.run([sys.executable, "-m", "mypy", "broker"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "Success" in res.stdout
