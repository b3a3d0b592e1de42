"""``bench/tls_floor.py``, S3's floor, run as a real process: it completes every way (plain,
memory BIOs, ``SSLSocket``) with certificates of a throwaway mesh CA and prints one row per
work size. Its timings are never asserted (shared machines); that it runs is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "tls_floor.py"
ROW = re.compile(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+[+-][\d.]+\s+[\d.]+×$")


def test_every_way_completes_and_prints_a_row_per_work_size() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--calls", "400", "--rounds", "1", "--work-kb", "0,64"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [m for line in done.stdout.splitlines() if (m := ROW.match(line))]
    assert [int(m[1]) for m in rows] == [0, 64], done.stdout
    assert all(float(m[k]) > 0 for m in rows for k in (2, 3, 4)), done.stdout


def test_a_bad_argument_exits_2() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--calls", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--calls" in done.stderr
