"""Replacing a finished build (--overwrite, --retry-transient) never loses it and never touches
what mmae did not write: interrupted after every single step, a rerun finds the old build whole
(in place or set aside) and finishes or undoes the phase."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from mmae.pipelines.builder import replace
from mmae.pipelines.builder.output import BuildError
from mmae.pipelines.builder.pipeline import run

from tests.conftest import jpeg_bytes, write_jsonl
from tests.test_build_hostile import config_for

OLD = {
    "manifest.json": json.dumps({"schema_version": "1", "config": {}, "shards": [
        {"path": "paired/part-00000-of-00002.parquet"}, {"path": "paired/part-00001-of-00002.parquet"}],
        "rejects": [{"path": "rejects/part-00000-of-00001.parquet"}]}),
    "paired/part-00000-of-00002.parquet": "old shard 0",
    "paired/part-00001-of-00002.parquet": "old shard 1",
    "rejects/part-00000-of-00001.parquet": "old rejects",
    "build_report.json": "old report",
    "tokenizer.model": "old tokenizer",
    "staging/build.json": '{"fingerprint": "old"}',
    "staging/chunks/p/00000-000000.parquet": "old chunk",
}
NEW = {
    "paired/part-00000-of-00001.parquet": "new shard",
    "rejects/part-00000-of-00001.parquet": "new rejects",
    "build_report.json": "new report",
    "tokenizer.model": "new tokenizer",
    "staging/build.json": '{"fingerprint": "new"}',
}
NEW_MANIFEST = {"manifest.json": json.dumps({"shards": [{"path": "paired/part-00000-of-00001.parquet"}], "rejects": []})}
USER = {"paired/README.txt": "my notes", "image/notes.txt": "more notes", "mine.txt": "mine",
        "paired/part-9.parquet": "not an mmae name"}


class Killed(BaseException):
    """What a SIGKILL between two steps leaves, without killing the test."""


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


def _files(root: Path, under: str = "") -> dict[str, str]:
    base = root / under if under else root
    return {str(path.relative_to(base)): path.read_text() for path in base.rglob("*")
            if path.is_file() and replace.PREVIOUS not in path.relative_to(base).parts and
            replace.JOURNAL != path.name}


def _old_build_is_whole(root: Path) -> str:
    """Where the old build is: "in place" (all of it in OUT), else "recoverable" (each of its
    files in OUT or set aside); fails if any of its files is lost."""
    here, aside = _files(root), _files(root / replace.PREVIOUS) if (root / replace.PREVIOUS).exists() else {}
    for relative, text in USER.items():
        assert here[relative] == text, f"{relative}, which mmae did not write, was changed or removed"
    if all(here.get(relative) == text for relative, text in OLD.items()):
        return "in place"
    lost = [relative for relative, text in OLD.items() if text not in (here.get(relative), aside.get(relative))]
    assert not lost, f"lost {lost}"
    assert (root / replace.PREVIOUS / replace.JOURNAL).exists(), "files set aside without a journal"
    return "recoverable"


def _interrupt_at(monkeypatch, step: int) -> list[int]:
    """Make the `step`-th action (move, delete, journal write) raise Killed; count them all."""
    count = [0]
    for name in ("_move", "_delete", "_save_journal"):
        original = getattr(replace, name)

        def counted(*args, _original=original, **kwargs):
            count[0] += 1
            if count[0] == step:
                raise Killed
            return _original(*args, **kwargs)
        monkeypatch.setattr(replace, name, counted)
    return count


def _replace_then(fs, root: Path, purpose: str, succeeds: bool) -> None:
    """One replacement: set aside, the new build writes, then discard (success) or restore."""
    replace.set_aside(fs, str(root), purpose)
    if purpose == "overwrite":
        replace.remove_unfinished(fs, str(root))
    _write(root, NEW if purpose == "overwrite" else {k: v for k, v in NEW.items() if not k.startswith("staging/")})
    if succeeds:
        _write(root, NEW_MANIFEST)
        replace.discard(fs, str(root))
    else:
        replace.restore(fs, str(root))


def _steps(tmp_path, monkeypatch, purpose, succeeds) -> int:
    root = tmp_path / "count"
    _write(root, {**OLD, **USER})
    with monkeypatch.context() as patch:
        count = _interrupt_at(patch, 0)
        _replace_then(fsspec.filesystem("file"), root, purpose, succeeds)
    return count[0]


@pytest.mark.parametrize("purpose,succeeds", [("overwrite", True), ("overwrite", False), ("retry", True),
                                              ("retry", False)])
def test_a_replacement_interrupted_at_any_step_loses_nothing(tmp_path, monkeypatch, purpose, succeeds):
    fs = fsspec.filesystem("file")
    steps = _steps(tmp_path, monkeypatch, purpose, succeeds)
    assert steps > 8
    for step in range(1, steps + 1):
        root = tmp_path / f"{purpose}-{succeeds}-{step}"
        _write(root, {**OLD, **USER})
        with monkeypatch.context() as patch:
            _interrupt_at(patch, step)
            try:
                _replace_then(fs, root, purpose, succeeds)
            except Killed:
                pass
        new_finished = (root / "manifest.json").exists() and \
            (root / "manifest.json").read_text() == NEW_MANIFEST["manifest.json"]
        if not new_finished:
            _old_build_is_whole(root)
        replace.recover(fs, str(root))  # what any rerun does first
        here = _files(root)
        if new_finished:
            assert not (root / replace.PREVIOUS).exists(), f"step {step}: the replaced build was not discarded"
            assert all(here[relative] == text for relative, text in {**NEW_MANIFEST, **USER}.items())
            continue
        where = _old_build_is_whole(root)
        if purpose == "retry" or where == "in place":
            assert where == "in place", f"step {step}: an interrupted retry must give the finished build back"
            assert not (root / replace.PREVIOUS).exists()
        else:  # an unfinished --overwrite: the old build waits aside until the rerun succeeds or fails
            replace.restore(fs, str(root))
            assert _old_build_is_whole(root) == "in place"
            assert not (root / replace.PREVIOUS).exists()


def test_overwrite_keeps_files_mmae_did_not_write(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jpg").write_bytes(jpeg_bytes())
    write_jsonl(tmp_path / "corpus" / "list.jsonl", [{"url": "a.jpg", "caption": "a red square"}])
    output = tmp_path / "out"
    config = config_for(tmp_path, output, [{"name": "p", "kind": "paired", "path": str(tmp_path / "corpus/list.jsonl")}])
    run(config)
    (output / "paired" / "README.txt").write_text("about these shards")
    (output / "image").mkdir()
    (output / "image" / "notes.txt").write_text("notes")
    report = run(config, overwrite=True)
    assert report["written"]["paired"] == 1
    assert (output / "paired" / "README.txt").read_text() == "about these shards"
    assert (output / "image" / "notes.txt").read_text() == "notes"
    assert not (output / replace.PREVIOUS).exists()


def test_a_killed_retry_does_not_look_finished(tmp_path):
    fs = fsspec.filesystem("file")
    root = tmp_path / "out"
    _write(root, {**OLD, **USER})
    replace.set_aside(fs, str(root), "retry")
    _write(root, {"paired/part-00000-of-00001.parquet": "new shard"})  # killed while writing shards
    assert not (root / "manifest.json").exists()  # nothing reads a half-retried dataset as finished
    assert (root / "staging" / "build.json").exists()  # the retry keeps its staging
    replace.recover(fs, str(root))
    assert _old_build_is_whole(root) == "in place"
    assert not (root / "paired" / "part-00000-of-00001.parquet").exists()


def test_an_output_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "list.jsonl", [{"url": "a.jpg", "caption": "a red square"}])
    (tmp_path / "out").write_text("a file")
    config = config_for(tmp_path, tmp_path / "out", [{"name": "p", "kind": "paired",
                                                      "path": str(tmp_path / "corpus/list.jsonl")}])
    with pytest.raises(BuildError, match="is a file, not a folder"):
        run(config)
    assert (tmp_path / "out").read_text() == "a file"


def test_a_full_disk_stops_the_build_with_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    import errno

    from mmae import cli
    from mmae.pipelines.builder import staging

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    listing = []
    for index in range(6):
        (corpus / f"{index}.jpg").write_bytes(jpeg_bytes(colour=(40 * index, 10, 10)))
        listing.append({"url": f"{index}.jpg", "caption": f"square number {index}"})
    write_jsonl(corpus / "list.jsonl", listing)
    config = config_for(tmp_path, tmp_path / "out", [{"name": "p", "kind": "paired", "path": str(corpus / "list.jsonl")}],
                        chunk_rows=2)
    written = []
    original = staging.write_chunk

    def fills_up(url, *args, **kwargs):
        if len(written) >= 1:
            raise OSError(errno.ENOSPC, "No space left on device", url)
        written.append(url)
        return original(url, *args, **kwargs)

    monkeypatch.setattr(staging, "write_chunk", fills_up)
    config_path = tmp_path / "pipeline.yaml"
    assert cli.main(["build", "--config", str(config_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no space left on the device writing" in error[0] and "Traceback" not in error[0]
    assert "staging" in error[0]
    monkeypatch.setattr(staging, "write_chunk", original)
    assert cli.main(["build", "--config", str(config_path)]) == 0
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["mode"] == "resume" and report["written"]["paired"] == 6
    config.data.output = str(tmp_path / "clean")
    run(config)
    shards = [json.loads((tmp_path / name / "manifest.json").read_text())["shards"] for name in ("out", "clean")]
    assert [entry["sha256"] for entry in shards[0]] == [entry["sha256"] for entry in shards[1]]


def test_an_output_under_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "list.jsonl", [{"url": "a.jpg", "caption": "a red square"}])
    (tmp_path / "notes.txt").write_text("mine")
    config = config_for(tmp_path, tmp_path / "notes.txt" / "out", [{"name": "p", "kind": "paired",
                                                                    "path": str(tmp_path / "corpus/list.jsonl")}])
    with pytest.raises(BuildError, match="notes.txt is a file, not a folder"):
        run(config)
    assert (tmp_path / "notes.txt").read_text() == "mine"
