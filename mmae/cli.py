"""The `mmae` command. Subcommands import their heavy dependencies lazily, so `mmae --help`
is instant and the data side never imports torch.

    mmae demo-data OUT_DIR                       write the synthetic demo corpus
    mmae build [--config F] [--set k=v]... [--overwrite | --retry-transient | --append] [-- BEAM_OPTIONS...]
    mmae demo [--out build/demo]                 corpus -> loopback HTTP -> build -> report
    mmae stats DATASET [--json] [--html F] [--samples N]
    mmae validate DATASET [--no-decode]
    mmae train [--config F] [--set k=v]... [--nproc N]
    mmae eval probe --checkpoint CKPT --data DATASET [--json]
    mmae eval retrieval --checkpoint CKPT --data DATASET [--holdout F] [--json]
    mmae eval reconstruct --checkpoint CKPT --data DATASET --out grid.png
    mmae config [NAME]                           a config with every key documented (NAME: pipeline, m3ae, ...)
    mmae export --checkpoint CKPT --format timm|safetensors --out DIR
    mmae embed --checkpoint CKPT (--data DATASET | --images FOLDER | --texts FILE) --out emb.parquet
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional


# Control characters a terminal acts on (ESC, BEL, C1 such as CSI; everything but tab, newline
# and the carriage return progress bars use): names and labels come from strangers, and an
# OSC 52 sequence in a source name must not write the user's clipboard.
_CONTROL = {code: f"\\x{code:02x}" for code in [*range(0, 9), 11, 12, *range(14, 32), 127, *range(128, 160)]}


class _Printable:
    """A text stream that writes control characters as visible escapes (\\x1b)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(text.translate(_CONTROL))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _escape_terminal_output() -> None:
    if not isinstance(sys.stdout, _Printable):
        sys.stdout = _Printable(sys.stdout)
    if not isinstance(sys.stderr, _Printable):
        sys.stderr = _Printable(sys.stderr)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # (Beam's warning about optional GCP client libraries is dropped by mmae.pipelines itself.)
    for noisy in ("apache_beam", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _split_beam_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1 :]
    return argv, []


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from mmae.pipelines.demo.corpus import generate

    counts = generate(args.out_dir, pairs=args.pairs, images=args.images, texts=args.texts, seed=args.seed)
    print(json.dumps({"out_dir": args.out_dir, **counts}))
    return 0


def _cmd_build(args: argparse.Namespace, beam_args: list[str]) -> int:
    from mmae.pipelines.builder.pipeline import BuildError, run
    from mmae.schemas.config import ConfigError
    from mmae.schemas.loading import load_config

    try:
        config = load_config(args.config, args.set)
        report = run(config, beam_args, overwrite=args.overwrite, retry_transient=args.retry_transient,
                     append=args.append)
    except (ConfigError, BuildError) as error:
        print(f"mmae build: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the output cannot be written (permissions, a file where a folder belongs...)
        where = f": {error.filename}" if error.filename else ""
        print(f"mmae build: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from mmae.pipelines.inspect.dataset import Dataset, DatasetError
    from mmae.pipelines.inspect.stats import compute_stats, print_tables

    from mmae.pipelines.outputs import OutputError, check_output

    dataset = None
    try:
        if args.html:
            check_output(args.html, "--html", folders=[args.dataset])
        dataset = Dataset.open(args.dataset)
        stats = compute_stats(dataset)
    except (DatasetError, OutputError) as error:
        print(f"mmae stats: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file the manifest names is missing or unreadable
        print(f"mmae stats: error: {error.filename or args.dataset}: {error.strerror or error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - polars/Arrow on a damaged file: name the file, no traceback
        damaged = dataset.first_damaged() if dataset is not None else None
        what = damaged or f"{args.dataset}: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
        print(f"mmae stats: error: cannot read {what} (`mmae validate {args.dataset}` lists every problem)",
              file=sys.stderr)
        return 2
    if args.html:
        import fsspec

        from mmae.pipelines.inspect.report_html import render_html, sample_rows

        page = render_html(stats, sample_rows(dataset, args.samples, seed=args.seed), dataset.tokenizer_model())
        with fsspec.open(args.html, "w", encoding="utf-8") as handle:
            handle.write(page)
        print(f"wrote {args.html} ({len(page) / 1e6:.1f} MB)", file=sys.stderr)
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
    else:
        print_tables(stats)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from mmae.pipelines.inspect.validate import validate

    report = validate(args.dataset, decode_images=not args.no_decode)
    if report.problems:
        print(f"{args.dataset}: {len(report.problems)} problem(s)")
        for problem in report.problems:
            print(f"  {problem}")
        return 1
    print(f"{args.dataset}: OK ({report.shards} files: {report.rows} rows, plus {report.rejects} rejected in "
          f"rejects/; {report.images} images decoded)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = [item for pair in (("--set", value) for value in args.set) for item in pair]
    if args.nproc > 1:
        from mmae.trainer.launch import launch

        # One process per rank, DDP over gloo (CPU) or nccl (CUDA); signals forwarded to each.
        return launch(args.nproc, ["--config", args.config, *overrides])
    from mmae.trainer.__main__ import main as train_main

    return train_main(["--config", args.config, *overrides])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmae")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _cmd_eval(args: argparse.Namespace) -> int:
    from mmae.schemas.manifest import ManifestError
    from mmae.trainer.load import Mismatch
    from mmae.trainer.evaluate import probe, reconstruct, retrieval
    from mmae.trainer.streams import DataError

    try:
        if args.evaluation == "reconstruct":
            result = reconstruct(args.checkpoint, args.data, args.out, count=args.samples, seed=args.seed,
                                 allow_mismatch=args.allow_mismatch)
            print(f"wrote {result['out']} ({result['samples']} samples: original | masked | reconstruction)")
            return 0
        if args.evaluation == "retrieval":
            result = retrieval(args.checkpoint, args.data, limit=args.limit, split=args.split, holdout=args.holdout,
                               allow_mismatch=args.allow_mismatch)
        else:
            result = probe(args.checkpoint, args.data, pool=args.pool, epochs=args.epochs, seed=args.seed,
                           allow_mismatch=args.allow_mismatch, test_data=args.test_data, of=args.features)
    except (DataError, ManifestError, Mismatch, FileNotFoundError) as error:
        print(f"mmae eval: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif args.evaluation == "retrieval":
        print(f"retrieval over {result['n']} pairs: image->text R@1 {result['image_to_text']['r1']:.2%} "
              f"R@5 {result['image_to_text']['r5']:.2%}; text->image R@1 {result['text_to_image']['r1']:.2%} "
              f"R@5 {result['text_to_image']['r5']:.2%}")
    else:
        what = "images" if args.features == "image" else "texts"
        print(f"linear probe top-1 {result['top1']:.2%} ({result['classes']} classes; "
              f"{result['n_train']} train / {result['n_test']} test {what})")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from mmae.schemas.config import ConfigError
    from mmae.schemas.loading import documented_yaml, load_config, packaged_configs, resolve_config_path

    try:
        name = args.name or args.config_file or "pipeline.yaml"
        if args.name and args.config_file:
            raise ConfigError("give the config once: as NAME or as --config NAME")
        path = resolve_config_path(name)
        config = load_config(path, args.set)
    except ConfigError as error:
        print(f"mmae config: error: {error}", file=sys.stderr)
        return 2
    print(f"# {name} ({path}); packaged configs: {', '.join(packaged_configs())}")
    print("# every key with its type and meaning; pass a file or a packaged name to --config, override with --set")
    print(documented_yaml(config))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mmae.trainer.checkpoint import CheckpointNotFound
    from mmae.trainer.export import ExportError, export

    try:
        result = export(args.checkpoint, args.out, format=args.format, overwrite=args.overwrite,
                        tokenizer_from=args.tokenizer_from, allow_mismatch=args.allow_mismatch)
    except (ExportError, CheckpointNotFound) as error:
        print(f"mmae export: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else
          f"wrote {result['out']} ({args.format}: {', '.join(result['files'])}) from {result['checkpoint']}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from mmae.schemas.manifest import ManifestError
    from mmae.trainer.checkpoint import CheckpointNotFound
    from mmae.trainer.load import Mismatch
    from mmae.trainer.embed import EmbedError, embed
    from mmae.trainer.streams import DataError

    try:
        result = embed(args.checkpoint, args.out, data=args.data, images=args.images, texts=args.texts,
                       pool=args.pool, batch_size=args.batch_size, tokenizer_path=args.tokenizer,
                       progress=sys.stderr.isatty(), allow_mismatch=args.allow_mismatch)
    except (EmbedError, CheckpointNotFound, ManifestError, Mismatch, DataError, OSError) as error:
        print(f"mmae embed: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def _cmd_demo(args: argparse.Namespace, beam_args: list[str]) -> int:
    from mmae.pipelines.demo.run import run_demo

    return run_demo(args.out, config_path=args.config, beam_args=beam_args, pairs=args.pairs,
                    train_steps=args.train_steps)


SET_HELP = "override a config key (repeatable), e.g. train.steps=200 or 'train.data=[A, B]'"
ALLOW_MISMATCH = ("go on when the dataset's tokenizer or stored image size is not the checkpoint's (default: "
                  "refused, naming both)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"mmae {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    _data_commands(commands)
    _training_commands(commands)
    _model_commands(commands)
    return parser


def _data_commands(commands) -> None:
    """demo-data, build, demo, stats, validate: making and inspecting datasets."""
    demo_data = commands.add_parser("demo-data", help="write the synthetic demo corpus")
    demo_data.add_argument("out_dir", help="the folder to write it to")
    demo_data.add_argument("--pairs", type=int, default=3000, help="image+caption pairs (default 3000)")
    demo_data.add_argument("--images", type=int, default=1000, help="images without captions (default 1000)")
    demo_data.add_argument("--texts", type=int, default=3000, help="texts without images (default 3000)")
    demo_data.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")

    build = commands.add_parser(
        "build",
        help="build Parquet shards from the sources in the config",
        description="Options after `--` go to Beam's PipelineOptions unchanged "
        "(e.g. -- --direct_num_workers=2 --direct_running_mode=multi_processing).",
    )
    build.add_argument("--config", default="pipeline.yaml", help="pipeline YAML (default: pipeline.yaml)")
    build.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. data.image.size=128 or data.sources.0.base_url=...")
    build.add_argument("--overwrite", action="store_true",
                       help="replace an earlier build in data.output (an unfinished one resumes without it)")
    build.add_argument("--retry-transient", action="store_true",
                       help="on a finished build: fetch again only its timeouts, connection errors, 5xx and 429, "
                       "and rewrite the shards with the new successes")
    build.add_argument("--append", action="store_true",
                       help="on a finished build: read and fetch only what is new in the sources (new sources, new "
                       "files, rows added at the end of .jsonl/.txt/.csv/.tsv files), dedup it against the dataset, "
                       "and add it as new shards; old shards stay as they are")

    demo = commands.add_parser("demo", help="generate the demo corpus, serve it on loopback HTTP, build, inspect "
                               "and train on it")
    demo.add_argument("--out", default="build/demo", help="the demo's folder (default build/demo)")
    demo.add_argument("--config", default="pipeline.yaml", help="pipeline YAML (default: pipeline.yaml)")
    demo.add_argument("--pairs", type=int, default=3000, help="image+caption pairs to generate (default 3000)")
    demo.add_argument("--train-steps", type=int, default=None,
                      help="training steps (default: the config's train.steps; 0 = build and inspect only)")
    stats = commands.add_parser("stats", help="what is in a built dataset (tables, JSON, HTML report)")
    stats.add_argument("dataset", help="a build output folder or URL (holds manifest.json)")
    stats.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")
    stats.add_argument("--html", metavar="REPORT.html", help="also write a self-contained HTML report")
    stats.add_argument("--samples", type=int, default=24, help="rows in the HTML gallery (default 24)")
    stats.add_argument("--seed", type=int, default=0, help="gallery sampling seed")

    validate = commands.add_parser("validate", help="check every shard against schema v1 and the manifest")
    validate.add_argument("dataset", help="a build output folder or URL (holds manifest.json)")
    validate.add_argument("--no-decode", action="store_true", help="skip decoding images (faster)")


def _training_commands(commands) -> None:
    """train and eval."""
    train = commands.add_parser("train", help="train a multimodal masked autoencoder on built datasets")
    train.add_argument("--config", default="pipeline.yaml",
                       help="a config file or packaged recipe: pipeline (default), m3ae, mae, maskvlm, momo")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    train.add_argument("--nproc", type=int, default=1,
                       help="processes on this machine, DDP (gloo on CPU, nccl on CUDA); default 1")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint")
    evaluations = evaluate.add_subparsers(dest="evaluation", required=True)
    probe = evaluations.add_parser("probe", help="linear probe on frozen image features (MAE protocol)")
    rebuild = evaluations.add_parser("reconstruct", help="a PNG of original | masked | reconstruction + captions")
    retrieve = evaluations.add_parser("retrieval", help="image<->text recall@1/5 (checkpoints trained with ITC)")
    for command in (probe, rebuild, retrieve):
        command.add_argument("--checkpoint", required=True,
                             help="a checkpoint file, `last` pointer, run folder or exported safetensors folder")
        command.add_argument("--allow-mismatch", action="store_true", help=ALLOW_MISMATCH)
    probe.add_argument("--data", required=True, help="a built dataset with a label column")
    probe.add_argument("--test-data", metavar="DATASET",
                       help="score on this dataset's labelled rows and train the probe on all of --data's "
                            "(default: the deterministic 80/20 split by id of --data)")
    probe.add_argument("--features", choices=["image", "text"], default="image",
                       help="probe image features (default) or text-only features of each row's caption/text")
    probe.add_argument("--pool", choices=["cls", "mean"], default="cls",
                       help="features: the CLS token (default) or the mean of the patch tokens")
    probe.add_argument("--epochs", type=int, default=100, help="epochs of the linear classifier (default 100)")
    probe.add_argument("--seed", type=int, default=0, help="the classifier's seed")
    probe.add_argument("--json", action="store_true", help="one JSON object on stdout")
    rebuild.add_argument("--data", required=True, help="a built dataset with paired rows")
    rebuild.add_argument("--out", required=True, help="the PNG to write")
    rebuild.add_argument("--samples", type=int, default=6, help="rows of the sheet (default 6)")
    rebuild.add_argument("--seed", type=int, default=0, help="the masks' seed")
    retrieve.add_argument("--data", required=True, help="a built dataset with paired rows")
    retrieve.add_argument("--limit", type=int, default=1000, help="paired rows scored (first by id)")
    retrieve.add_argument("--split", choices=["test", "all"], default="test",
                          help="test (default): the test side of the deterministic 80/20 split by id; all: every "
                               "paired row (a held-out dataset the run never trained on)")
    retrieve.add_argument("--holdout", type=float, default=0.0, metavar="F",
                          help="score the rows a run with train.validation.holdout: F never trained on "
                               "(default: the test side of the deterministic 80/20 split by id)")
    retrieve.add_argument("--json", action="store_true", help="one JSON object on stdout")



def _model_commands(commands) -> None:
    """config, export, embed."""
    configuring = commands.add_parser("config", help="print a config (default or packaged recipe) with every key "
                                      "documented; the output is a config file (`mmae config m3ae > my.yaml`)")
    configuring.add_argument("name", nargs="?", default=None,
                             help="a config file or a packaged name: pipeline (default), m3ae, mae, maskvlm, momo")
    configuring.add_argument("--config", dest="config_file", metavar="NAME", help="the same as NAME")
    configuring.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             help="override a key before printing")

    exporting = commands.add_parser("export", help="write a checkpoint's model for other tools (timm, safetensors)")
    exporting.add_argument("--checkpoint", required=True, help="a checkpoint file, a `last` pointer or a run folder")
    exporting.add_argument("--format", choices=["timm", "safetensors"], default="timm",
                           help="timm: the image encoder as a VisionTransformer folder (timm.create_model("
                           "'local-dir:OUT', pretrained=True)); safetensors: the whole model with its tokenizer")
    exporting.add_argument("--out", required=True, help="the folder to write")
    exporting.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    exporting.add_argument("--tokenizer-from", metavar="DATASET",
                           help="safetensors: copy this dataset's tokenizer (default: the run's train.data)")
    exporting.add_argument("--allow-mismatch", action="store_true", help=ALLOW_MISMATCH)
    exporting.add_argument("--json", action="store_true", help="one JSON object on stdout")

    embedding = commands.add_parser("embed", help="image/text embeddings of a dataset, image folder or text file")
    embedding.add_argument("--checkpoint", required=True,
                           help="a checkpoint file, `last` pointer, run folder or exported safetensors folder")
    source = embedding.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a built dataset (every row: its image and/or text)")
    source.add_argument("--images", metavar="FOLDER", help="a folder of image files (ids: relative paths)")
    source.add_argument("--texts", metavar="FILE", help="a text file, one text per line (ids: line-N)")
    embedding.add_argument("--out", required=True, help="the Parquet file to write")
    embedding.add_argument("--pool", choices=["cls", "mean"], default="cls",
                           help="the CLS token (default) or the mean of the output tokens")
    embedding.add_argument("--batch-size", type=int, default=64, help="rows per forward pass (default 64)")
    embedding.add_argument("--tokenizer", help="tokenizer.model for --texts (default: the checkpoint's)")
    embedding.add_argument("--allow-mismatch", action="store_true", help=ALLOW_MISMATCH)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own_args, beam_args = _split_beam_args(argv)
    args = _parser().parse_args(own_args)
    _escape_terminal_output()  # before logging takes its handle on stderr
    _configure_logging(args.verbose)
    if args.command in ("build", "demo"):  # the two that run a Beam pipeline
        return {"build": _cmd_build, "demo": _cmd_demo}[args.command](args, beam_args)
    handlers = {"demo-data": _cmd_demo_data, "stats": _cmd_stats, "validate": _cmd_validate, "train": _cmd_train,
                "eval": _cmd_eval, "export": _cmd_export, "config": _cmd_config, "embed": _cmd_embed}
    return handlers[args.command](args)


def entry() -> None:
    """Console-script entry point. Once the command has finished and its output is flushed,
    leave without interpreter teardown: Arrow's native thread pools can abort the process while
    being torn down at exit (apache/arrow#34314), turning a finished command into exit 134."""
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C while a command starts up (imports) or outside its own handling
        print("mmae: interrupted", file=sys.stderr)
        code = 130
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
