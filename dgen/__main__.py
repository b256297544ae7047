"""``python -m dgen``: the ``dgen`` command (see :mod:`dgen.cli`), e.g.
``python -m dgen demo`` runs the quickstart demo."""

from __future__ import annotations

import sys

from dgen.cli import main

if __name__ == "__main__":
    sys.exit(main())
