"""`python -m mmae.trainer` / `torchrun ... -m mmae.trainer`: the training entry point (same flags as `mmae train`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmae.trainer", description="train a multimodal MAE")
    parser.add_argument("--config", default="pipeline.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from mmae.schemas.config import ConfigError
    from mmae.schemas.loading import load_config
    from mmae.schemas.manifest import ManifestError
    from .preemption import Preempted
    from .streams import DataError
    from .train import TrainError, run_training

    try:
        last = run_training(load_config(args.config, args.set))
    except Preempted as stop:
        print(f"mmae train: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("mmae train: interrupted at once (a second Ctrl-C); run the same command to resume from the "
              "newest checkpoint", file=sys.stderr)
        return 130
    except (ConfigError, TrainError, DataError, ManifestError) as error:
        print(f"mmae train: error: {error}", file=sys.stderr)
        return 2
    if last:
        print(json.dumps(last))
    return 0


if __name__ == "__main__":
    # As `mmae`'s entry point: leave without interpreter teardown once output is flushed, so
    # Arrow's native thread pools cannot abort a finished run (apache/arrow#34314).
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    import os

    os._exit(code)
