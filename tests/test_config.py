"""Typed config: one clear message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from mmae.schemas.config import ConfigError
from mmae.schemas.loading import apply_override, load_config

MINIMAL = "data:\n  sources:\n    - {name: s, kind: paired, path: x.jsonl}\n"


def write(tmp_path, text: str):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path, text: str, overrides=None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), overrides)
    return str(caught.value)


def test_shipped_pipeline_yaml_is_valid():
    config = load_config("pipeline.yaml")
    assert [source.kind for source in config.data.sources] == ["paired", "image", "text"]
    assert config.data.image.size == 64 and config.data.tokenizer.vocab_size == 4000


def test_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.data.download.allow_private_addresses is False
    assert config.data.shards.rows_per_shard == 5000


def test_unknown_key_is_named(tmp_path):
    message = error_of(tmp_path, MINIMAL + "  imagee: {size: 3}\n")
    assert "data.imagee" in message and "unknown key" in message


def test_bad_value_is_named(tmp_path):
    message = error_of(tmp_path, MINIMAL.replace("kind: paired", "kind: video"))
    assert "data.sources.0.kind" in message


def test_bad_number_is_named(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["data.download.timeout_s=-1"])
    assert "data.download.timeout_s" in message


def test_duplicate_source_names(tmp_path):
    text = MINIMAL + "    - {name: s, kind: text, path: y.jsonl}\n"
    assert "repeated: s" in error_of(tmp_path, text)


def test_overrides_reach_lists_and_parse_yaml(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL),
        ["data.sources.0.base_url=http://mirror/", "data.image.size=128", "data.download.allowed_networks=[10.1.0.0/16]"],
    )
    assert config.data.sources[0].base_url == "http://mirror/"
    assert config.data.image.size == 128
    assert config.data.download.allowed_networks == ["10.1.0.0/16"]


def test_bad_overrides():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_override({}, "novalue")
    with pytest.raises(ConfigError, match="not an index"):
        apply_override({"data": {"sources": []}}, "data.sources.3.name=x")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    assert "not valid YAML" in error_of(tmp_path, "data: [unclosed")


@pytest.mark.parametrize("name", ["m3ae", "mae", "maskvlm", "momo"])
def test_shipped_recipe_configs_are_valid(name):
    config = load_config(f"configs/{name}.yaml")
    assert config.train is not None and config.train.use_text == (name != "mae") and config.train.steps == 3000


@pytest.mark.parametrize("override, suggestion", [
    ("data.image.sise=3", "'size'"), ("train.optimizer.base_lrr=1", "'base_lr'"),
    ("data.sources.0.url_colum=x", "'url_column'"), ("train.stepss=3", "'steps'"),
])
def test_unknown_keys_get_a_did_you_mean(override, suggestion):
    with pytest.raises(ConfigError) as error:
        load_config(Path(__file__).resolve().parent.parent / "pipeline.yaml", [override])
    assert f"unknown key; did you mean {suggestion}?" in str(error.value)
