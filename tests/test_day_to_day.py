"""Day-to-day use: several datasets in one run, stable ids across rebuilds, no silent no-ops,
and messages that name the problem (never a traceback or an object repr)."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mmae.schemas.config import ConfigError, TrainConfig
from mmae.schemas.loading import load_config, packaged_configs
from mmae.trainer.loader import MixedLoader
from mmae.trainer.data_plan import TokenizerMismatch

from tests.datasets import write_dataset
from tests.test_train import train_command

ROOT = Path(__file__).resolve().parent.parent


def with_tokenizer(root: Path, sha256: str = "t" * 64, vocab: int = 100) -> Path:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tokenizer"] = {"path": "tokenizer.model", "sha256": sha256, "vocab_size": vocab, "special_ids": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("two")
    photos = with_tokenizer(write_dataset(base / "photos" / "shards", {"paired": [40], "image": [30]}, 8))
    texts = with_tokenizer(write_dataset(base / "texts" / "shards", {"paired": [20], "text": [50]}, 8))
    return photos, texts


def loader_config(data, **overrides) -> TrainConfig:
    settings = {"data": data, "batch_size": 12, "num_workers": 0, "image_size": 16, "shuffle_window": 8, "seed": 1}
    settings.update(overrides)
    return TrainConfig(**settings)


def ids_of(loader: MixedLoader, steps: int) -> list[list[str]]:
    return [list(batch.ids) for batch in loader.batches(steps)]


# -- several datasets ------------------------------------------------------------------------


def test_train_data_takes_a_list_from_yaml_and_from_set(two, tmp_path):
    photos, texts = two
    config = load_config(None, [f"train.data=[{photos}, {{path: {texts}, weight: 2.0}}]"]).train
    assert [entry.path for entry in config.datasets] == [str(photos), str(texts)]
    assert [entry.name for entry in config.datasets] == ["photos/shards", "texts/shards"]
    assert [entry.weight for entry in config.datasets] == [1.0, 2.0]
    assert load_config(None, [f"train.data={photos}"]).train.data_paths == [str(photos)]  # one path stays valid
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(None, [f"train.data=[{photos}, {photos}]"])


def test_several_datasets_join_the_mix_with_unique_ids(two):
    photos, texts = two
    loader = MixedLoader(loader_config([str(photos), str(texts)]))
    names = {stream.name: stream for stream in loader.streams}
    assert set(names) == {"paired[photos/shards]", "paired[texts/shards]", "image[photos/shards]",
                          "text[texts/shards]"}
    # paired share 0.5 split by rows (40 : 20); image and text each from their one dataset
    assert names["paired[photos/shards]"].share == pytest.approx(0.5 * 40 / 60)
    assert names["paired[texts/shards]"].share == pytest.approx(0.5 * 20 / 60)
    seen = [sample for batch in ids_of(loader, 12) for sample in batch]
    assert any(sample.startswith("photos/shards:p") for sample in seen)
    assert any(sample.startswith("texts/shards:p") for sample in seen)  # the same raw ids, kept apart
    assert any(sample.startswith("texts/shards:t") for sample in seen)
    first_epoch = [sample for sample in seen if sample.startswith("texts/shards:p")][:20]
    assert len(set(first_epoch)) == len(first_epoch)


def test_a_dataset_weight_multiplies_its_rows(two):
    photos, texts = two
    loader = MixedLoader(loader_config([str(photos), {"path": str(texts), "weight": 4.0}]))
    shares = {stream.name: stream.share for stream in loader.streams}
    assert shares["paired[texts/shards]"] / shares["paired[photos/shards]"] == pytest.approx(4 * 20 / 40)


def test_several_datasets_resume_exactly_and_hold_out_the_same_rows(two):
    photos, texts = two
    data = [str(photos), str(texts)]
    straight = ids_of(MixedLoader(loader_config(data)), 8)
    first = MixedLoader(loader_config(data))
    ids_of(first, 5)
    resumed = MixedLoader(loader_config(data))
    resumed.load_state_dict(first.state_dict())
    assert ids_of(resumed, 3) == straight[5:]
    validation = {"holdout": 0.3}
    train_ids = {sample for batch in ids_of(MixedLoader(loader_config(data, validation=validation)), 20)
                 for sample in batch}
    held = {sample for batch in ids_of(MixedLoader(loader_config(data, validation=validation), split="validation"),
                                       20) for sample in batch}
    assert held and train_ids and not (held & train_ids)


def test_datasets_with_different_tokenizers_are_refused_naming_both_and_the_fix(two, tmp_path):
    photos, _ = two
    other = with_tokenizer(write_dataset(tmp_path / "other", {"text": [20]}, 8), sha256="o" * 64)
    with pytest.raises(TokenizerMismatch) as error:
        MixedLoader(loader_config([str(photos), str(other)]))
    message = str(error.value)
    assert str(photos) in message and str(other) in message
    assert f"data.tokenizer.model={photos}" in message


def test_a_changed_dataset_is_named_with_how_many_shards_differ(two, tmp_path):
    import shutil

    photos, texts = two
    copy = tmp_path / "texts"
    shutil.copytree(texts, copy)
    first = MixedLoader(loader_config([str(photos), str(copy)]))
    ids_of(first, 2)
    state = first.state_dict()
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64  # a rebuild with other rows in its first shard
    (copy / "manifest.json").write_text(json.dumps(manifest))
    again = MixedLoader(loader_config([str(photos), str(copy)]))
    with pytest.raises(ValueError) as error:
        again.load_state_dict(state)
    message = str(error.value)
    assert f"the dataset at {copy} is not the one this run was trained on: 1 of 2 shard hashes differ" in message
    assert "train.out" in message and "train.init_from" in message


def test_the_content_hash_not_the_file_hash_decides_whether_data_changed(two, tmp_path):
    import shutil

    _, texts = two
    copy = tmp_path / "texts"
    shutil.copytree(texts, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry["content_sha256"] = "c" + entry["sha256"][1:]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    no_images = {"paired": 1, "image": 0, "text": 1}
    state = MixedLoader(loader_config(str(copy), mix=no_images)).state_dict()
    for entry in manifest["shards"]:
        entry["sha256"] = "f" * 64  # the file changed (another url column), what the trainer reads did not
    (copy / "manifest.json").write_text(json.dumps(manifest))
    MixedLoader(loader_config(str(copy), mix=no_images)).load_state_dict(state)
    for entry in manifest["shards"]:
        entry["content_sha256"] = "d" * 64  # and now the rows changed
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="2 of 2 shard hashes differ"):
        MixedLoader(loader_config(str(copy), mix=no_images)).load_state_dict(state)


# -- no silent no-ops ------------------------------------------------------------------------


def test_steps_under_stages_is_refused_naming_the_stages():
    with pytest.raises(ConfigError) as error:
        load_config("momo", ["train.steps=60"])
    message = str(error.value)
    assert "train.steps is 60" in message and "train.stages.0.steps=1000" in message
    assert load_config("momo").train.steps == 3000


def test_a_complete_run_says_so_and_lower_steps_is_an_error(tmp_path):
    root = with_tokenizer(write_dataset(tmp_path / "ds", {"paired": [40], "image": [20], "text": [30]}, 16))
    run = tmp_path / "run"
    subprocess.run(train_command(root, run, "--set", "train.steps=4"), check=True, capture_output=True, timeout=300)
    again = subprocess.run(train_command(root, run, "--set", "train.steps=4"), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "run complete at step 4 of 4; nothing to do" in again.stderr
    lower = subprocess.run(train_command(root, run, "--set", "train.steps=2"), capture_output=True, text=True,
                           timeout=300)
    assert lower.returncode == 2
    assert "is at step 4, past train.steps 2" in lower.stderr and "Traceback" not in lower.stderr


def test_progress_lines_carry_the_total_rate_and_eta(caplog):
    from mmae.trainer.metrics import Progress, eta_text

    assert (eta_text(5), eta_text(185), eta_text(7440)) == ("5s", "3m05s", "2h04m")
    progress = Progress(total=100, start=10)
    metrics = {"loss": 1.0, "image_loss": 1.0, "text_loss": 1.0, "unpaired_text_loss": 1.0, "lr": 1e-3,
               "samples_per_s": 50.0}
    with caplog.at_level(logging.INFO, logger="mmae.train"):
        progress.update(20, metrics)
    line = caplog.records[-1].getMessage()
    assert line.startswith("step 20/100 ") and "steps/s" in line and "ETA " in line


# -- messages -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", packaged_configs())
def test_mmae_config_output_is_a_config_that_round_trips(name, tmp_path):
    printed = subprocess.run([sys.executable, "-m", "mmae.cli", "config", name], capture_output=True, text=True,
                             check=True).stdout
    path = tmp_path / "my.yaml"
    path.write_text(printed)
    assert load_config(path).model_dump() == load_config(name).model_dump()
    assert yaml.safe_load(printed)  # plain YAML too


def _actions(parser: argparse.ArgumentParser, where: str = "mmae"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{where} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield where, action


def test_every_cli_flag_has_help_text():
    from mmae.cli import _parser

    missing = [f"{where} {'/'.join(action.option_strings) or action.dest}" for where, action in _actions(_parser())
               if not action.help]
    assert not missing


def test_the_python_api_speaks_python(tmp_path):
    from mmae import api
    from mmae.pipelines.builder.pipeline import BuildError

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "t.txt").write_text("one text\nanother text here\n")
    out = tmp_path / "out"
    sets = [f"data.output={out}", "data.sources=[{name: t, kind: text, path: " + str(raw / "t.txt") + "}]"]
    api.build(None, sets)
    with pytest.raises(BuildError) as error:
        api.build(None, sets)
    assert "overwrite=True" in str(error.value) and "--overwrite" not in str(error.value)


def test_stats_on_a_damaged_shard_is_one_line_naming_it(tmp_path):
    root = write_dataset(tmp_path / "ds", {"paired": [20], "text": [10]}, 8)
    shard = root / "paired" / "part-00000-of-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    result = subprocess.run([sys.executable, "-m", "mmae.cli", "stats", str(root)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "part-00000-of-00001.parquet" in result.stderr and "mmae validate" in result.stderr


def test_validate_counts_rows_and_rejects_apart(tmp_path):
    from mmae import api

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "t.txt").write_text("one text\n\nanother text here\none text\n")
    out = tmp_path / "out"
    api.build(None, [f"data.output={out}", "data.sources=[{name: t, kind: text, path: " + str(raw / "t.txt") + "}]"])
    result = subprocess.run([sys.executable, "-m", "mmae.cli", "validate", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "2 rows, plus 1 rejected in rejects/" in result.stdout


def test_the_beam_apitools_warning_is_silenced():
    from mmae.pipelines import _OptionalGcpNoise

    quiet = subprocess.run([sys.executable, "-c", "import mmae.pipelines.builder.pipeline, apache_beam as beam; "
                            "p = beam.Pipeline(); p | beam.Create([1]); p.run().wait_until_finish()"],
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and "apitools" not in quiet.stderr, quiet.stderr[-1000:]

    noise = logging.LogRecord("root", logging.WARNING, __file__, 1, "apitools not found, and bigquery client "
                              "libraries are not available despite the import not raising an ImportError.", (), None)
    other = logging.LogRecord("root", logging.WARNING, __file__, 1, "something else", (), None)
    assert not _OptionalGcpNoise().filter(noise) and _OptionalGcpNoise().filter(other)


# -- the build side: a shared tokenizer, ids that do not depend on the server ---------------------


def _paired_source(folder: Path, name: str = "pairs", **extra) -> dict:
    from tests.conftest import write_jsonl

    write_jsonl(folder / "pairs.jsonl", [
        {"url": "img/red.jpg", "caption": "a red square", "key": "r"},
        {"url": "img/blue.jpg", "caption": "a blue square on a plain ground", "key": "b"},
        {"url": "img/large.jpg", "caption": "a purple field", "key": "l"},
    ])
    return {"name": name, "kind": "paired", "path": str(folder / "pairs.jsonl"), **extra}


def _build(output: Path, sources: list[dict], *sets: str, overwrite: bool = False) -> dict:
    from mmae import api

    base = [f"data.output={output}", f"data.sources={json.dumps(sources)}",
            "data.download.allowed_networks=[127.0.0.1/32]", "data.image.size=32", "data.tokenizer.vocab_size=40",
            "data.text.max_tokens=16"]
    return api.build(None, [*base, *sets], overwrite=overwrite)


def test_id_from_url_path_makes_a_rebuild_from_another_port_the_same_dataset(http_server, tmp_path):
    from mmae.schemas.manifest import read_manifest

    import pyarrow.parquet as pq

    folder = tmp_path / "raw"
    folder.mkdir()
    port = http_server.rsplit(":", 1)[1]
    out = tmp_path / "out"
    source = _paired_source(folder, id_from="url_path", base_url=f"{http_server}/")
    _build(out, [source])
    first = read_manifest(str(out))
    ids = sorted(pq.read_table(out / first.shards[0].path).column("id").to_pylist())
    _build(out, [{**source, "base_url": f"http://localhost:{port}/"}], overwrite=True)
    second = read_manifest(str(out))
    assert sorted(pq.read_table(out / second.shards[0].path).column("id").to_pylist()) == ids
    assert first.shards[0].sha256 != second.shards[0].sha256  # the url column changed...
    assert first.shards[0].content_sha256 == second.shards[0].content_sha256  # ...what a run reads did not

    by_url = tmp_path / "by-url"
    _build(by_url, [{**source, "id_from": "url"}])
    by_column = tmp_path / "by-column"
    _build(by_column, [{**source, "id_from": "column", "id_column": "key"}])
    id_sets = [set(pq.read_table(root / read_manifest(str(root)).shards[0].path).column("id").to_pylist())
               for root in (out, by_url, by_column)]
    assert len(id_sets[0] | id_sets[1] | id_sets[2]) == 3 * len(ids)  # three different keys


def test_id_from_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(ConfigError, match="id_from: column needs id_column"):
        load_config(None, ["data.sources=[{name: a, kind: paired, path: a.jsonl, id_from: column}]"])
    with pytest.raises(ConfigError, match="needs an image url column"):
        load_config(None, ["data.sources=[{name: a, kind: text, path: a.jsonl, id_from: url}]"])
    (tmp_path / "t.txt").write_text("a text\n")
    from mmae.pipelines.builder.pipeline import BuildError

    with pytest.raises(BuildError, match="applies to table files"):
        _build(tmp_path / "out", [{"name": "t", "kind": "text", "path": str(tmp_path / "t.txt"), "id_from": "column",
                                   "id_column": "k"}])


def test_a_build_reuses_another_datasets_tokenizer_and_the_two_train_together(http_server, tmp_path):
    from mmae.schemas.manifest import read_manifest

    folder = tmp_path / "raw"
    folder.mkdir()
    photos = tmp_path / "photos"
    _build(photos, [_paired_source(folder, base_url=f"{http_server}/")])
    (folder / "t.txt").write_text("\n".join(f"a text about squares number {n}" for n in range(30)) + "\n")
    texts = tmp_path / "texts"
    _build(texts, [{"name": "t", "kind": "text", "path": str(folder / "t.txt")}], f"data.tokenizer.model={photos}")
    assert read_manifest(str(texts)).tokenizer.sha256 == read_manifest(str(photos)).tokenizer.sha256
    loader = MixedLoader(loader_config([str(photos), str(texts)], mix={"paired": 1, "image": 0, "text": 1},
                                       batch_size=4))
    assert {stream.name for stream in loader.streams} == {"paired[photos]", "text[texts]"}
    own = tmp_path / "own"
    _build(own, [{"name": "t", "kind": "text", "path": str(folder / "t.txt")}])
    with pytest.raises(TokenizerMismatch):
        MixedLoader(loader_config([str(photos), str(own)], mix={"paired": 1, "image": 0, "text": 1}))
    from mmae.pipelines.builder.pipeline import BuildError

    with pytest.raises(BuildError, match="not a built dataset"):
        _build(tmp_path / "x", [{"name": "t", "kind": "text", "path": str(folder / "t.txt")}],
               f"data.tokenizer.model={folder}")


# -- a checkpoint and a dataset that do not belong together ---------------------------------------


def _with_image_size(root: Path, size: int) -> Path:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["config"]["image"] = {"size": size}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("trained")
    root = _with_image_size(with_tokenizer(write_dataset(base / "ds", {"paired": [40], "image": [20], "text": [30]},
                                                         16)), 16)
    run = base / "run"
    subprocess.run(train_command(root, run, "--set", "train.steps=2"), check=True, capture_output=True, timeout=300)
    return root, run


def test_eval_and_embed_refuse_a_dataset_with_another_tokenizer_unless_told(trained, tmp_path):
    root, run = trained
    other = _with_image_size(with_tokenizer(write_dataset(tmp_path / "other", {"paired": [40]}, 16), sha256="o" * 64),
                             16)
    command = [sys.executable, "-m", "mmae.cli", "embed", "--checkpoint", str(run), "--data", str(other),
               "--out", str(tmp_path / "e.parquet")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"does not belong with {other}: its tokenizer (tttttttttttt) is not" in refused.stderr
    assert "--allow-mismatch" in refused.stderr and str(root) in refused.stderr
    allowed = subprocess.run([*command, "--allow-mismatch"], capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    same = subprocess.run([sys.executable, "-m", "mmae.cli", "embed", "--checkpoint", str(run), "--data", str(root),
                           "--out", str(tmp_path / "same.parquet")], capture_output=True, text=True, timeout=300)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "embed: rows 90/90, " in same.stderr and "ETA" in same.stderr  # progress without a terminal


def test_export_refuses_another_datasets_tokenizer_unless_told(trained, tmp_path):
    _, run = trained
    other = with_tokenizer(write_dataset(tmp_path / "other", {"paired": [20]}, 16), sha256="o" * 64)
    command = [sys.executable, "-m", "mmae.cli", "export", "--checkpoint", str(run), "--format", "safetensors",
               "--out", str(tmp_path / "export"), "--tokenizer-from", str(other)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "does not belong with" in refused.stderr and "Traceback" not in refused.stderr
    assert subprocess.run([*command, "--allow-mismatch"], capture_output=True, timeout=300).returncode == 0


def test_the_probe_refuses_images_of_another_stored_size(trained, tmp_path):
    from mmae.trainer.load import Mismatch
    from mmae.trainer.evaluate import probe

    root, run = trained
    bigger = _with_image_size(with_tokenizer(write_dataset(tmp_path / "big", {"paired": [40]}, 16)), 64)
    with pytest.raises(Mismatch, match="trained on 16px images, .* holds 64px ones"):
        probe(str(run), str(bigger), epochs=1)
    assert probe(str(run), str(bigger), epochs=1, allow_mismatch=True)["n_test"] > 0
    assert probe(str(run), str(root), epochs=1)["n_test"] > 0


def test_init_from_with_another_tokenizer_is_refused_in_words(trained, tmp_path):
    _, run = trained
    other = with_tokenizer(write_dataset(tmp_path / "other", {"paired": [40], "image": [20], "text": [30]}, 16),
                           sha256="o" * 64)
    command = train_command(other, tmp_path / "new", "--set", "train.steps=2", "--set", f"train.init_from={run}")
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "its tokenizer (tttttttttttt) is not" in refused.stderr and "train.allow_mismatch: true" in refused.stderr
    smaller = with_tokenizer(write_dataset(tmp_path / "small", {"paired": [40], "image": [20], "text": [30]}, 16),
                             vocab=50)
    command = train_command(smaller, tmp_path / "new2", "--set", "train.steps=2", "--set", f"train.init_from={run}")
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert "vocabulary (the dataset's tokenizer): 100 there, 50 here" in refused.stderr
    assert "{'preset'" not in refused.stderr  # no raw dict
    allowed = subprocess.run([*train_command(other, tmp_path / "new3", "--set", "train.steps=2", "--set",
                                             f"train.init_from={run}"), "--set", "train.allow_mismatch=true"],
                             capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-2000:]


@pytest.mark.parametrize("command", [
    ["eval", "probe", "--epochs", "1"], ["eval", "reconstruct", "--out", "{tmp}/grid.png"],
    ["embed", "--out", "{tmp}/e.parquet"], ["stats"]])
def test_a_damaged_shard_is_one_line_naming_it_in_every_command(trained, tmp_path, command):
    import shutil

    root, run = trained
    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    shard = copy / "paired" / "part-00000-of-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:300])
    args = [part.replace("{tmp}", str(tmp_path)) for part in command]
    args += [str(copy)] if command == ["stats"] else ["--checkpoint", str(run), "--data", str(copy)]
    result = subprocess.run([sys.executable, "-m", "mmae.cli", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if " WARNING " not in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "part-00000-of-00001.parquet" in lines[0] and "mmae validate" in lines[0]
