"""``python -m collector.training --csv FILE --label-column COL --out BUNDLE ...``: ``fleet-collector train``."""

from __future__ import annotations

import argparse
import logging
import sys

from collector.training import add_arguments


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and train."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = add_arguments(argparse.ArgumentParser(prog="python -m collector.training", description=__doc__))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
