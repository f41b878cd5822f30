"""`python -m streamkv.evaluation eval ppl ...` == `streamkv eval ppl ...` (works without streamkv/cli.py)."""
import argparse
import sys

from .commands import register


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="streamkv")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
