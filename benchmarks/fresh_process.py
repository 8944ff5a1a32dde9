"""Run a measurement snippet in a fresh Python process (own imports, own peak RSS)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def last_line(code: str) -> str:
    """The snippet's last stdout line; on failure, exit with the end of its stderr."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    return result.stdout.strip().splitlines()[-1]
