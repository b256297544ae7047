"""``python -m dgen.conformance URL [-k EXPR] [-x]``: check a backend."""

from __future__ import annotations

import argparse
import sys

from dgen.conformance.runner import run_suite


def main(argv: list[str] | None = None) -> int:
    """Run the suite; the exit status is 0 only if no test failed."""
    parser = argparse.ArgumentParser(
        prog="python -m dgen.conformance",
        description="Run DGen's storage conformance suite against one backend URL. "
        "Tests keep to a random key prefix and clear only that prefix, so the "
        "store may hold other data.",
    )
    parser.add_argument("url", help="backend URL, e.g. sqlite:///tmp/x.db or memory://check")
    parser.add_argument("-k", dest="keyword", metavar="EXPR", help="run tests matching EXPR")
    parser.add_argument("-x", dest="exitfirst", action="store_true", help="stop at first failure")
    args = parser.parse_args(argv)
    result = run_suite(args.url, keyword=args.keyword, exitfirst=args.exitfirst)
    if not result.outcomes:
        print("no tests ran", file=sys.stderr)
        return 1 if result.exit_code == 0 else result.exit_code
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
