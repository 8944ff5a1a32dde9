"""The `mmae` command. Subcommands import their heavy dependencies lazily, so `mmae --help`
is instant and the data side never imports torch.

    mmae demo-data OUT_DIR                       write the synthetic demo corpus
    mmae build [--config F] [--set k=v]... [--overwrite] [-- BEAM_OPTIONS...]
    mmae demo [--out build/demo]                 corpus -> loopback HTTP -> build -> report
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Beam logs a warning about optional GCP client libraries on import; it is noise here.
    logging.getLogger("root").setLevel(logging.INFO)
    for noisy in ("apache_beam", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _split_beam_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1 :]
    return argv, []


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from pipelines.demo_data import generate

    counts = generate(args.out_dir, pairs=args.pairs, images=args.images, texts=args.texts, seed=args.seed)
    print(json.dumps({"out_dir": args.out_dir, **counts}))
    return 0


def _cmd_build(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipelines.build import BuildError, run
    from schemas.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
        report = run(config, beam_args, overwrite=args.overwrite)
    except (ConfigError, BuildError) as error:
        print(f"mmae build: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def _cmd_demo(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipelines.demo import run_demo

    return run_demo(args.out, config_path=args.config, beam_args=beam_args, pairs=args.pairs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    demo_data = commands.add_parser("demo-data", help="write the synthetic demo corpus")
    demo_data.add_argument("out_dir")
    demo_data.add_argument("--pairs", type=int, default=3000)
    demo_data.add_argument("--images", type=int, default=1000)
    demo_data.add_argument("--texts", type=int, default=3000)
    demo_data.add_argument("--seed", type=int, default=0)

    build = commands.add_parser(
        "build",
        help="build Parquet shards from the sources in the config",
        description="Options after `--` go to Beam's PipelineOptions unchanged "
        "(e.g. -- --direct_num_workers=2 --direct_running_mode=multi_processing).",
    )
    build.add_argument("--config", default="pipeline.yaml", help="pipeline YAML (default: pipeline.yaml)")
    build.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. data.image.size=128 or data.sources.0.base_url=...")
    build.add_argument("--overwrite", action="store_true", help="replace an earlier build in data.output")

    demo = commands.add_parser("demo", help="generate the demo corpus, serve it on loopback HTTP, build it")
    demo.add_argument("--out", default="build/demo")
    demo.add_argument("--config", default="pipeline.yaml")
    demo.add_argument("--pairs", type=int, default=3000)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own_args, beam_args = _split_beam_args(argv)
    args = _parser().parse_args(own_args)
    _configure_logging(args.verbose)
    if args.command == "demo-data":
        return _cmd_demo_data(args)
    if args.command == "build":
        return _cmd_build(args, beam_args)
    if args.command == "demo":
        return _cmd_demo(args, beam_args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
