"""``python -m dgen demo``: run the quickstart demo (see :mod:`dgen.demo`)."""

from __future__ import annotations

import sys

from dgen import demo


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "demo":
        print("usage: python -m dgen demo [--help]", file=sys.stderr)
        return 2
    return demo.main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
