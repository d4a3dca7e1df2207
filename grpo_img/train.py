"""Entry point: `accelerate launch grpo_img/train.py --config configs/NAME.yaml [--key value ...] [--resume]`, or,
installed, `accelerate launch -m grpo_img.train --config NAME` / `grpo-img --config NAME` (a shipped config by name).

With no --config it runs the tiny offline demo (configs/demo_tiny.yaml). Any config key can be overridden on the
command line, e.g. `--output_dir runs/x --max_steps 20 --beta 0.02`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from grpo_img.config import config_help, load_config
from grpo_img.trainer import SetupError, train


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=config_help())
    parser.add_argument("--config", default=None, help="YAML config file, or a shipped config's name (default: the "
                        "tiny demo)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the newest checkpoint in output_dir, or from the given checkpoint folder")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    while rest:
        key = rest.pop(0)
        if not key.startswith("--"):
            parser.error(f"expected --key value, got {key!r}")
        key = key[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif rest and not rest[0].startswith("--"):
            value = rest.pop(0)
        else:
            parser.error(f"--{key} needs a value")
        overrides[key.replace("-", "_")] = value
    return args, overrides


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(argv)
    try:
        config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"config error: {error}")
    try:
        train(config, resume=args.resume)
    except SetupError as error:  # found before any model was built
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
