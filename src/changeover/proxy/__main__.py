"""`python -m changeover.proxy -c FILE [--workers N] [--take-over]`: serve the embedded balancer."""

from __future__ import annotations

import argparse
import sys

from changeover.config import DEFAULT_CONFIG, ConfigError, load
from changeover.proxy.server import EXIT_BAD_INPUT, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m changeover.proxy", description=__doc__)
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="topology file")
    parser.add_argument("--workers", type=int, help="worker processes (default: balancer.workers)")
    parser.add_argument(
        "--take-over",
        action="store_true",
        help="take the listening sockets and pool state over from the running balancer "
        "(a binary upgrade: it drains and exits)",
    )
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be 1 or more")
    try:
        topology = load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    return run(topology, args.workers, take_over=args.take_over)


if __name__ == "__main__":
    sys.exit(main())
