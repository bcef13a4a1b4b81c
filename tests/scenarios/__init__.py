"""Fault scenarios run in their own processes (they start and kill their own Ray clusters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ENV = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


def run(name: str, *args: object, timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python -m tests.scenarios.NAME ARGS...`` from the repository root, output captured."""
    cmd = [sys.executable, "-m", f"tests.scenarios.{name}", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout, **kwargs)


def report(proc: subprocess.CompletedProcess[str], starts: str = "{") -> dict[str, Any]:
    """The scenario's JSON report: its last stdout line starting with ``starts``."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith(starts))
    return json.loads(line)
