"""Launch an experiment: python -m train --config experiments/NAME.py[:arg] --workdir DIR [--config.a.b=v ...]"""

from __future__ import annotations

import argparse
import sys

from train.config_lib import ConfigError, apply_overrides, load_config_script, split_cli_overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides, rest = split_cli_overrides(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", required=True, help="config script, optionally path.py:arg")
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics)")
    parser.add_argument("--print_config", action="store_true", help="print the config and exit")
    args = parser.parse_args(rest)
    try:
        config = load_config_script(args.config)
        apply_overrides(config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config)
        return 0
    from train.trainer import train_and_evaluate  # heavy imports after the config is valid

    train_and_evaluate(config, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
