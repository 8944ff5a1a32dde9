"""Training and the tools on hostile files and at bad moments: nothing hangs, nothing a user owns
is written into, and no number comes from weights that are not finite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from mmae.trainer.checkpoint import Checkpointer, CheckpointNotFound, NonFiniteWeights, resolve_checkpoint
from mmae.trainer.load import load_model
from mmae.pipelines.outputs import OutputError, check_output
from mmae.trainer.run_folder import RunFolder
from safetensors.torch import save_file

from tests.conftest import jpeg_bytes
from tests.test_export import ROOT, a_checkpoint, mmae
from tests.test_train import dataset, losses, train_command  # noqa: F401 - the module's dataset fixture


def _stderr_of(process: subprocess.Popen, timeout: float, hang: str) -> str:
    """The process's stderr once it exits; killed (and the test failed with `hang`) if it does not."""
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(hang)


def _poisoned(path: Path, target: Path) -> Path:
    state = torch.load(path, weights_only=True)
    name = next(key for key, value in state["model"].items() if value.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, target)
    return target


def test_non_finite_weights_are_refused_by_eval_export_and_embed(tmp_path):
    checkpoint = _poisoned(a_checkpoint(tmp_path), tmp_path / "step-0000008.pt")
    with pytest.raises(NonFiniteWeights, match="step-0000008.pt: the weight .* NaN or inf"):
        load_model(str(checkpoint))
    result = mmae("export", "--checkpoint", str(checkpoint), "--format", "timm", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "NaN or inf" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg_bytes())
    result = mmae("embed", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "img"),
                  "--out", str(tmp_path / "e.parquet"))
    assert result.returncode == 2 and "NaN or inf" in result.stderr and not (tmp_path / "e.parquet").exists()


def test_resume_skips_a_non_finite_checkpoint_for_the_newest_finite_one(dataset, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    subprocess.run(train_command(dataset, run, "--set", "train.steps=8"), check=True, capture_output=True,
                   timeout=300)
    newest = run / "checkpoints" / "step-0000008.pt"
    _poisoned(newest, newest)
    path, state = Checkpointer(RunFolder(str(run))).load_latest()
    assert Path(path).name == "step-0000004.pt" and state["step"] == 4
    result = subprocess.run(train_command(dataset, run, "--set", "train.steps=8"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "at step 4" in result.stderr and "NaN or inf" in result.stderr


def test_rotation_keeps_loadable_checkpoints_whatever_lies_beside_them(dataset, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    keep = ("--set", "train.keep_checkpoints=2")
    subprocess.run(train_command(dataset, run, "--set", "train.steps=8", *keep), check=True, capture_output=True,
                   timeout=300)
    folder = run / "checkpoints"
    for step in (5, 6, 7, 9, 10, 11):  # whole zips that are not checkpoints, between and after the good ones
        with zipfile.ZipFile(folder / f"step-{step:07d}.pt", "w") as archive:
            archive.writestr("archive/data.pkl", b"not a pickle")
    (folder / "last").write_bytes(os.urandom(10 << 20))  # a `last` of random bytes
    result = subprocess.run(train_command(dataset, run, "--set", "train.steps=16", *keep), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "at step 8" in result.stderr
    good = sorted(path.name for path in folder.glob("step-*.pt") if path.stat().st_size > 1000)
    assert good == ["step-0000012.pt", "step-0000016.pt"]
    assert (folder / "last").read_text().strip() == "step-0000016.pt"
    assert Path(resolve_checkpoint(str(run))).name == "step-0000016.pt"
    assert load_model(str(run))[1]["step"] == 16


def test_a_second_ctrl_c_during_a_save_exits_at_once(dataset, tmp_path):  # noqa: F811
    script = tmp_path / "two_interrupts.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from mmae.trainer import checkpoint\n"
        "original = checkpoint.Checkpointer.save\n"
        "def save(self, step, state):\n"
        "    if step == 4:  # two Ctrl-C 20 ms apart, as a terminal sends them to the group, during the save\n"
        "        os.killpg(os.getpgrp(), signal.SIGINT); time.sleep(0.02); os.killpg(os.getpgrp(), signal.SIGINT)\n"
        "    return original(self, step, state)\n"
        "checkpoint.Checkpointer.save = save\n"
        "from mmae.cli import entry\n"
        "sys.argv = ['mmae'] + sys.argv[1:]\n"
        "entry()\n")
    run = tmp_path / "run"
    command = train_command(dataset, run)
    command = [sys.executable, str(script), "train"] + command[command.index("--config"):]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    stderr = _stderr_of(process, 120, "the process hung after a second Ctrl-C")
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted at once" in stderr and "Traceback" not in stderr
    assert not list((run / "checkpoints").glob(".tmp-*"))  # no half-written save left behind
    result = subprocess.run(train_command(dataset, run), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _exported(tmp_path: Path) -> Path:
    out = tmp_path / "exported"
    result = mmae("export", "--checkpoint", str(a_checkpoint(tmp_path)), "--format", "safetensors", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("damage", ["not json", "no spec", "wrong shapes", "huge vocab", "nan"])
def test_a_damaged_export_folder_is_one_clear_error(tmp_path, damage):
    out = _exported(tmp_path)
    meta = json.loads((out / "mmae.json").read_text())
    if damage == "not json":
        (out / "mmae.json").write_text("{not json")
    elif damage == "no spec":
        (out / "mmae.json").write_text(json.dumps({"step": 7}))
    elif damage == "wrong shapes":
        meta["model_spec"]["preset"] = "small"  # other widths than the tensors
        (out / "mmae.json").write_text(json.dumps(meta))
    elif damage == "huge vocab":
        meta["model_spec"]["vocab_size"] = 10 ** 8  # would be gigabytes if it were allocated
        (out / "mmae.json").write_text(json.dumps(meta))
    else:
        from safetensors.torch import load_file

        tensors = load_file(out / "model.safetensors")
        name = sorted(tensors)[0]
        tensors[name] = torch.full_like(tensors[name], float("inf"))
        save_file(tensors, out / "model.safetensors")
    with pytest.raises(CheckpointNotFound) as caught:
        load_model(str(out))
    assert str(out) in str(caught.value)
    result = mmae("export", "--checkpoint", str(out / "model.safetensors"), "--format", "timm",
                  "--out", str(tmp_path / "again"))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_outputs_may_not_land_in_a_dataset_or_on_an_input(tmp_path, dataset):  # noqa: F811
    with pytest.raises(OutputError, match="inside the dataset"):
        check_output(str(dataset), "train.out")
    with pytest.raises(OutputError, match="inside the dataset"):
        check_output(str(dataset / "runs" / "one"), "train.out")
    link = tmp_path / "innocent"
    link.symlink_to(dataset)
    with pytest.raises(OutputError, match="inside the dataset"):
        check_output(str(link / "export"), "--out")  # through a link
    checkpoint = a_checkpoint(tmp_path)
    with pytest.raises(OutputError, match="is or holds the input"):
        check_output(str(tmp_path), "--out", inputs=[str(checkpoint)])
    check_output(str(tmp_path / "elsewhere"), "--out", inputs=[str(checkpoint)], folders=[str(dataset)])

    result = subprocess.run(train_command(dataset, dataset, "--set", "train.steps=2"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "inside the dataset" in result.stderr and "Traceback" not in result.stderr
    assert not (dataset / "checkpoints").exists() and not (dataset / "metrics.jsonl").exists()
    tokenizer = (dataset / "tokenizer.model")
    before = tokenizer.read_bytes() if tokenizer.exists() else None
    (tmp_path / "ck").mkdir()
    trained = a_checkpoint(tmp_path / "ck", data=str(dataset))
    result = mmae("export", "--checkpoint", str(trained), "--format", "safetensors", "--out", str(link))
    assert result.returncode == 2 and "inside the dataset" in result.stderr
    assert (tokenizer.read_bytes() if tokenizer.exists() else None) == before


def test_embed_never_waits_on_a_fifo_and_counts_empty_images(tmp_path):
    checkpoint = a_checkpoint(tmp_path)
    images = tmp_path / "img"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes())
    (images / "empty.jpg").write_bytes(b"")
    os.mkfifo(images / "pipe.jpg")
    emb = tmp_path / "e.parquet"
    result = subprocess.run([sys.executable, "-m", "mmae.cli", "embed", "--checkpoint", str(checkpoint), "--images",
                             str(images), "--out", str(emb)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["rows"] == 3 and summary["undecodable_images"] == 2


def test_embed_reads_only_what_a_long_text_line_can_use(tmp_path):
    from mmae.trainer.embed import text_file_rows

    class Tokenizer:
        def encode(self, text):
            return [len(word) for word in text.split()]

    path = tmp_path / "texts.txt"
    with open(path, "w") as handle:
        handle.write("first line\n" + "word " * 10_000_000 + "\nlast line")
    import tracemalloc

    tracemalloc.start()
    count, batches = text_file_rows(str(path), Tokenizer(), batch_size=2, max_tokens=16)
    rows = [row for batch in batches for row in batch]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 3 and [row["id"] for row in rows] == ["line-1", "line-2", "line-3"]
    assert len(rows[1]["tokens"]) == 16
    assert peak < 8 << 20, f"{peak / 1e6:.0f} MB for one 50 MB line"


# --- data that is not what the manifest says ---------------------------------------------------


def _dataset_copy(dataset, tmp_path: Path) -> Path:  # noqa: F811
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    return copy


def _rewrite_shard(path: Path, change) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(change(table), path, row_group_size=16)


@pytest.mark.parametrize("ids", [[7, 10_000], [-3, 5]])
def test_token_ids_outside_the_vocabulary_are_bad_data_not_an_index_error(dataset, tmp_path, ids):  # noqa: F811
    import pyarrow as pa
    from mmae.trainer.parallel import Distributed
    from mmae.trainer.streams import DataError
    from mmae.trainer.train import Trainer

    from tests.test_train import train_config

    copy = _dataset_copy(dataset, tmp_path)
    shard = sorted((copy / "text").glob("*.parquet"))[0]

    def poison(table):
        tokens = [ids for _ in range(table.num_rows)]  # every row group of the shard
        return table.set_column(table.column_names.index("tokens"), "tokens", pa.array(tokens, pa.list_(pa.int32())))

    _rewrite_shard(shard, poison)
    with pytest.raises(DataError, match=r"text/part-.*row group \d+ .*outside the tokenizer"):
        Trainer(train_config(copy, tmp_path / "run", steps=12), Distributed()).fit()
    last = Trainer(train_config(copy, tmp_path / "skip", steps=12, data_errors="skip"), Distributed()).fit()
    metrics = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert last["step"] == 12 and sum(m["skipped_samples"] for m in metrics) > 0


def test_a_tokens_column_of_strings_is_named(dataset, tmp_path):  # noqa: F811
    import pyarrow as pa
    from mmae.trainer.data_plan import build_streams
    from mmae.trainer.streams import DataError

    from tests.test_train import train_config

    copy = _dataset_copy(dataset, tmp_path)
    shard = sorted((copy / "text").glob("*.parquet"))[0]
    _rewrite_shard(shard, lambda table: table.set_column(
        table.column_names.index("tokens"), "tokens", pa.array([str(value) for value in table.column("tokens")])))
    with pytest.raises(DataError, match=r"column 'tokens' is string"):
        build_streams(train_config(copy, tmp_path / "run"))


@pytest.mark.parametrize("change", ["version", "outside", "absolute", "nested"])
def test_a_manifest_is_refused_before_anything_it_names_is_opened(dataset, tmp_path, change):  # noqa: F811
    from mmae.schemas.manifest import ManifestError, read_manifest

    copy = _dataset_copy(dataset, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    if change == "version":
        manifest["schema_version"] = "99"
    elif change == "outside":
        manifest["shards"][0]["path"] = "../../../../../../etc/passwd"
    elif change == "absolute":
        manifest["tokenizer"]["path"] = "/etc/passwd"
    text = json.dumps(manifest) if change != "nested" else "[" * 100_000 + "]" * 100_000
    (copy / "manifest.json").write_text(text)
    with pytest.raises(ManifestError) as caught:
        read_manifest(str(copy))
    assert "manifest.json" in str(caught.value)
    result = mmae("stats", str(copy))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "root:" not in result.stdout


# --- configs, terminals, validate ----------------------------------------------------------------


def test_patch_sizes_the_config_checks_are_the_models():
    from mmae.schemas.config import PATCH_SIZES
    from mmae.trainer.model import PRESETS

    assert PATCH_SIZES == {name: size.patch_size for name, size in PRESETS.items()}


def test_a_patch_size_override_builds_that_model_and_its_spec_rebuilds_it():
    from mmae.schemas.config import ConfigError
    from mmae.schemas.loading import load_config
    from mmae.trainer.load import build_checked
    from mmae.trainer.model import ModelSpec

    config = load_config(None, ["train.model.preset=mini", "train.image_size=32", "train.model.patch_size=4"]).train
    spec = ModelSpec.of(config, vocab_size=100, alignment=False)
    model = spec.build()
    assert (model.patch_size, model.num_patches) == (4, 64) and model.patch_embed.in_features == 48
    saved = spec.to_dict()
    assert saved["patch_size"] == 4
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    assert build_checked(saved, shapes, "here").num_patches == 64
    # a spec without the key (every checkpoint saved before it existed) is the preset's patch
    assert "patch_size" not in ModelSpec.of(load_config(None, ["train.model.preset=mini"]).train, 100, False).to_dict()
    own = load_config(None, ["train.model.preset=mini", "train.model.patch_size=8"]).train  # the preset's own side
    assert ModelSpec.of(own, 100, False).to_dict() == ModelSpec.of(load_config(None, ["train.model.preset=mini"]).train,
                                                                   100, False).to_dict()
    with pytest.raises(Exception, match="weights do not match"):
        build_checked({**saved, "patch_size": 8}, shapes, "here")
    with pytest.raises(ConfigError, match="train.model.patch_size"):
        load_config(None, ["train.image_size=30", "train.model.patch_size=4"])


@pytest.mark.parametrize("override, named", [
    ("train.image_size=100000", "train.image_size"), ("train.grad_accum=1000000", "train.grad_accum"),
    ("train.image_size=12", "patches"), ("train.optimizer.lr=.inf", "train.optimizer.lr"),
    ("train.steps=[1", "not valid YAML"), ("train.loss_weights.itc=.nan", "train.loss_weights.itc")])
def test_configs_the_trainer_cannot_use_are_one_message_naming_the_key(override, named):
    from mmae.schemas.config import ConfigError
    from mmae.schemas.loading import load_config

    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_duplicate_keys_and_alias_bombs_are_refused(tmp_path):
    from mmae.schemas.config import ConfigError
    from mmae.schemas.loading import load_config

    (tmp_path / "twice.yaml").write_text("train:\n  steps: 10\n  steps: 20\n")
    with pytest.raises(ConfigError, match="'steps' is given twice"):
        load_config(tmp_path / "twice.yaml")
    bomb = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        bomb.append(f"{level}: &{level} [{', '.join(['*' + previous] * 10)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    with pytest.raises(ConfigError, match="alias bomb"):
        load_config(tmp_path / "bomb.yaml")


def test_source_weights_naming_no_source_is_refused(dataset, tmp_path):  # noqa: F811
    from mmae.trainer.data_plan import build_streams
    from mmae.trainer.streams import DataError

    from tests.test_train import train_config

    with pytest.raises(DataError, match="source_weights names nowhere"):
        build_streams(train_config(dataset, tmp_path / "run", source_weights={"nowhere": 2.0}))


def test_stats_escapes_control_characters_from_the_data(tmp_path):
    from tests.datasets import write_dataset

    root = write_dataset(tmp_path / "ds", {"paired": [6]}, sources={"paired": ["evil\x1b]52;c;aGVsbG8=\x07name"]})
    result = mmae("stats", str(root))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b]52" in result.stdout


def test_validate_reads_every_column_of_every_row_group(dataset, tmp_path):  # noqa: F811
    from tests.datasets import corrupt_row_group

    copy = _dataset_copy(dataset, tmp_path)
    shard = sorted((copy / "paired").glob("*.parquet"))[0]
    corrupt_row_group(shard, 1, "source")  # a column the trainer reads and the old check did not
    manifest = json.loads((copy / "manifest.json").read_text())
    import hashlib

    for entry in manifest["shards"]:  # the manifest agrees with the file: only the row group is bad
        if entry["path"].endswith(shard.name) and entry["kind"] == "paired":
            entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = mmae("validate", str(copy), "--no-decode")
    assert result.returncode == 1 and "row group 1 cannot be read" in result.stdout


@pytest.mark.parametrize("to", ["command", "group"])
def test_sigterm_to_a_two_process_run_stops_both_ranks_with_a_checkpoint(dataset, tmp_path, to):  # noqa: F811
    import time

    run = tmp_path / "run"
    sets = train_command(dataset, run, "--set", "train.steps=400", "--set", "train.checkpoint_every=1000")[5:]
    process = subprocess.Popen([sys.executable, "-m", "mmae.cli", "train", "--config", str(ROOT / "pipeline.yaml"),
                                "--nproc", "2", *sets], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.2)
    if to == "command":
        process.send_signal(signal.SIGTERM)  # what a scheduler sends to the command it started
    else:
        os.killpg(process.pid, signal.SIGTERM)  # what a terminal or SLURM sends to the whole group
    stderr = _stderr_of(process, 180, "the ranks did not stop")
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr
    stopped = max(losses(run))
    assert stopped < 400 and (run / "checkpoints" / f"step-{stopped:07d}.pt").exists()
    leftover = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.split()
    assert not leftover, "ranks left running"


def test_fifos_where_files_belong_are_never_opened(dataset, tmp_path):  # noqa: F811
    """Each of these would block its reader forever; each is refused naming it (with a deadline)."""
    copy = _dataset_copy(dataset, tmp_path)
    shard = sorted((copy / "image").glob("*.parquet"))[0]
    shard.unlink()
    os.mkfifo(shard)
    result = subprocess.run([sys.executable, "-m", "mmae.cli", "stats", str(copy)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "not a regular file" in result.stderr and shard.name in result.stderr
    result = subprocess.run([sys.executable, "-m", "mmae.cli", "validate", str(copy), "--no-decode"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1 and "not a regular file" in result.stdout

    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    good = a_checkpoint(run)
    os.mkfifo(run / "step-0000100.pt")
    os.mkfifo(run / "last")
    code = ("import sys; from mmae.trainer.checkpoint import Checkpointer, resolve_checkpoint; "
            "from mmae.trainer.run_folder import RunFolder; print(resolve_checkpoint(sys.argv[1])); "
            "print(Checkpointer(RunFolder(sys.argv[1])).load_latest()[0])")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(good), str(good)]


def test_stats_html_may_not_be_written_into_the_dataset(dataset, tmp_path):  # noqa: F811
    copy = _dataset_copy(dataset, tmp_path)
    result = mmae("stats", str(copy), "--html", str(copy / "report.html"))
    assert result.returncode == 2 and "inside the dataset" in result.stderr and not (copy / "report.html").exists()


def test_a_resume_after_a_shard_became_unreadable_is_refused_naming_it(dataset, tmp_path):  # noqa: F811
    copy = _dataset_copy(dataset, tmp_path)
    run = tmp_path / "run"
    skip = ("--set", "train.data_errors=skip")
    subprocess.run(train_command(copy, run, "--set", "train.steps=4", *skip), check=True, capture_output=True,
                   timeout=300)
    shard = sorted((copy / "paired").glob("*.parquet"))[-1]  # one of two: the paired stream goes on without it
    shard.write_bytes(b"not parquet any more")
    result = subprocess.run(train_command(copy, run, "--set", "train.steps=8", *skip), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not the data this checkpoint trained on" in result.stderr and shard.name in result.stderr
    assert max(losses(run)) == 4  # nothing trained on a different plan
