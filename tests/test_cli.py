"""The real `mmae` command, end to end, as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent


def mmae(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmae.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_commands():
    result = mmae("--help")
    assert result.returncode == 0
    listed = set(re.search(r"\{([a-z,-]+)\}", result.stdout).group(1).split(","))
    assert listed == {"demo-data", "build", "demo", "stats", "train", "eval", "validate", "export", "embed",
                      "config"}
    for command in listed:  # each one answers its own --help
        assert mmae(command, "--help").returncode == 0, command


def test_bad_config_is_one_clear_error(tmp_path):
    result = mmae("build", "--config", str(ROOT / "pipeline.yaml"), "--set", "data.image.sise=3")
    assert result.returncode == 2
    assert "data.image.sise: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_source_file_is_named(tmp_path):
    result = mmae("build", "--config", str(ROOT / "pipeline.yaml"), "--set", f"data.output={tmp_path / 'out'}",
                  "--set", f"data.sources.0.path={tmp_path / 'nope.jsonl'}")
    assert result.returncode == 2
    assert "nope.jsonl does not exist" in result.stderr and "demo-paired" in result.stderr
    assert not (tmp_path / "out").exists()


def _check_demo_output(out: Path, pairs: int) -> dict:
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    report = json.loads((out / "shards" / "build_report.json").read_text())
    assert manifest["rows"]["paired"] == pairs
    assert manifest["rows"]["image"] == pairs // 3
    assert report["balanced"] and report["read"] == pairs + pairs // 3 + pairs
    for source in report["sources"].values():
        assert source["read"] == source["written"] + source["rejected"]
    table = pq.read_table(out / "shards" / manifest["shards"][0]["path"], columns=["url", "tokens"])
    assert table.column("url")[0].as_py().startswith("http://127.0.0.1:")  # went through the HTTP server
    return manifest


def test_demo_end_to_end_over_loopback_http(tmp_path):
    result = mmae("demo", "--out", str(tmp_path / "demo"), "--pairs", "60", "--config", str(ROOT / "pipeline.yaml"),
                  "--train-steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "balanced (read = written + rejected per source): True" in result.stdout
    _check_demo_output(tmp_path / "demo", 60)
    assert (tmp_path / "demo" / "report.html").exists()
    metrics = (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 3
    assert "[demo] trained to step 3: loss " in result.stdout
    next_steps = result.stdout.split("[demo] next, try:")[1].strip().splitlines()
    assert [line.split()[:3] for line in next_steps] == [["mmae", "eval", "probe"], ["mmae", "eval", "reconstruct"],
                                                         ["mmae", "export", "--checkpoint"]]
    assert "apitools" not in result.stderr and "Traceback" not in result.stderr
    assert "fallback deterministic coder" not in result.stderr  # Beam's note about our own typed records


def test_a_demo_says_which_earlier_run_it_replaces(tmp_path, capsys):
    from mmae.pipelines.demo.run import _replace_earlier_run

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in (100, 200):
        (run / "checkpoints" / f"step-{step:07d}.pt").write_bytes(b"x")
    _replace_earlier_run(run)
    said = capsys.readouterr().out
    assert f"replacing the earlier demo run in {run} (2 checkpoint(s), newest checkpoint step-0000200.pt)" in said
    assert not run.exists()


@pytest.mark.slow
def test_multi_processing_runner_gives_identical_shards(tmp_path):
    """DoFns must pickle into worker processes, and the output must not depend on the runner mode."""
    single = mmae("demo", "--out", str(tmp_path / "a"), "--pairs", "30", "--config", str(ROOT / "pipeline.yaml"),
                  "--train-steps", "0")
    assert single.returncode == 0, single.stderr[-3000:]
    multi = mmae("demo", "--out", str(tmp_path / "b"), "--pairs", "30", "--config", str(ROOT / "pipeline.yaml"),
                 "--train-steps", "0", "--", "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    assert multi.returncode == 0, multi.stderr[-3000:]
    first, second = _check_demo_output(tmp_path / "a", 30), _check_demo_output(tmp_path / "b", 30)
    # Same corpus; URLs differ only by the server's port, which is part of the row.
    assert [s["rows"] for s in first["shards"]] == [s["rows"] for s in second["shards"]]
    # ...but not of the ids (id_from: url_path) nor of what the trainer reads: the same dataset to a run.
    assert [s["content_sha256"] for s in first["shards"]] == [s["content_sha256"] for s in second["shards"]]
    assert first["tokenizer"]["sha256"] == second["tokenizer"]["sha256"]
    for entry in first["shards"]:
        a = pq.read_table(tmp_path / "a" / "shards" / entry["path"]).drop(["url"])
        b = pq.read_table(tmp_path / "b" / "shards" / entry["path"]).drop(["url"])
        assert a.equals(b), entry["path"]


def test_version():
    import subprocess
    import sys
    from importlib.metadata import version

    cli = subprocess.run([sys.executable, "-m", "mmae.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and cli.stdout.strip() == f"mmae {version('mmae')}"


def test_an_installed_mmae_works_outside_its_checkout(tmp_path):
    """From an empty folder: packaged configs by name, every key documented, the version."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mmae.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)

    assert run("--version").stdout.startswith("mmae ")
    shown = run("config")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "# rows_per_row_group (int): the streaming unit of the trainer" in shown.stdout
    assert "# holdout (float): or: this fraction" in shown.stdout and "base_lr: 0.0015" in shown.stdout
    recipe = run("config", "m3ae", "--set", "train.steps=7")
    assert recipe.returncode == 0 and "steps: 7" in recipe.stdout and "schemas/configs/m3ae.yaml" in recipe.stdout
    missing = run("config", "nope")
    assert missing.returncode == 2 and "packaged configs, usable by name: m3ae, mae, maskvlm, momo, pipeline" in \
        missing.stderr
    # `mmae train --config m3ae` finds the recipe (and then says what is missing: the demo shards here).
    train = run("train", "--config", "m3ae", "--set", "train.steps=1")
    assert train.returncode == 2 and "no manifest.json" in train.stderr and "config file not found" not in train.stderr
