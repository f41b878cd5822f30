"""`python -m streamkv.server [serve] ...`: the server without going through streamkv.cli."""
import argparse
import sys

from .commands import register


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        argv.insert(0, "serve")
    parser = argparse.ArgumentParser(prog="python -m streamkv.server")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
