"""The README's quick start and every Python block, run as written in an empty folder (made
smaller by the substitutions below, each of which must still apply), so they cannot go stale."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

# Smaller corpus and runs; nothing else about a command changes.
SHELL_SMALLER = {
    "mmae demo-data build/demo/raw": "mmae demo-data build/demo/raw --pairs 80 --images 30 --texts 80",
    "--set train.steps=200": "--set train.steps=3 --set train.batch_size=16 --set train.num_workers=0",
    "mmae eval probe --checkpoint build/demo/run --data build/demo/shards":
        "mmae eval probe --checkpoint build/demo/run --data build/demo/shards --epochs 5",
}
PYTHON_SMALLER = {"train.steps=50": "train.steps=2", "steps=100": "steps=2"}


def quick_start() -> list[str]:
    block = re.search(r"<!-- quick-start -->\n```bash\n(.*?)```", README, re.S)
    assert block, "README.md lost its quick-start block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def smaller(text: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        text = text.replace(old, new)
    return text


def test_the_substitutions_still_apply():
    shell = "\n".join(quick_start())
    assert all(old in shell for old in SHELL_SMALLER), "a quick-start command changed: update SHELL_SMALLER"
    code = "\n".join(python_blocks())
    assert all(old in code for old in PYTHON_SMALLER), "a Python example changed: update PYTHON_SMALLER"


def test_readme_quick_start_and_python_examples_run_as_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    for line in quick_start():
        command = shlex.split(smaller(line, SHELL_SMALLER))
        assert command[0] == "mmae"
        result = subprocess.run([sys.executable, "-m", "mmae.cli", *command[1:]], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{line}\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, line
    assert (tmp_path / "build" / "demo" / "grid.png").stat().st_size > 0
    assert (tmp_path / "build" / "emb.parquet").stat().st_size > 0
    blocks = python_blocks()
    assert len(blocks) >= 2
    for number, block in enumerate(blocks):
        script = tmp_path / f"readme_{number}.py"
        script.write_text(smaller(block, PYTHON_SMALLER))
        result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"README Python block {number + 1}:\n{block}\n{result.stderr[-3000:]}"
