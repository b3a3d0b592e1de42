"""``promtool``, Prometheus's own checker, for the tests of our metrics and dashboard.

Not installed everywhere (Debian's ``prometheus`` package has it): a developer without it skips
these checks, CI (``CI`` set; ``.ci/run`` installs it) fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["check_metrics", "check_rules"]

_TIMEOUT = 60  # generous: a loaded machine


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus); CI runs this check")
    return found


def _run(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run(
        [_promtool(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def check_metrics(exposition: str) -> None:
    """``promtool check metrics``: the exposition parses and follows Prometheus's naming rules."""
    _run("check", "metrics", stdin=exposition)


def check_rules(path: Path) -> None:
    """``promtool check rules``: every expression of the rule file parses."""
    _run("check", "rules", str(path))
