"""The conformance tests, importable as one namespace.

A backend package runs them from its own test suite the way SQLAlchemy's
dialects use ``sqlalchemy.testing.suite``::

    # tests/test_dgen_conformance.py
    import pytest
    from dgen.conformance.suite import *  # noqa: F403

    @pytest.fixture
    def dgen_url() -> str:
        return "mystore://localhost/test"

Each test takes only the ``dgen_url`` fixture (or ``--dgen-url`` with the
``dgen.conformance.plugin`` pytest plugin).
"""

from dgen.conformance.suite.test_basics import *  # noqa: F403
from dgen.conformance.suite.test_basics import __all__ as _basics
from dgen.conformance.suite.test_durability import *  # noqa: F403
from dgen.conformance.suite.test_durability import __all__ as _durability
from dgen.conformance.suite.test_isolation import *  # noqa: F403
from dgen.conformance.suite.test_isolation import __all__ as _isolation
from dgen.conformance.suite.test_ordered import *  # noqa: F403
from dgen.conformance.suite.test_ordered import __all__ as _ordered
from dgen.conformance.suite.test_snapshot import *  # noqa: F403
from dgen.conformance.suite.test_snapshot import __all__ as _snapshot
from dgen.conformance.suite.test_watches import *  # noqa: F403
from dgen.conformance.suite.test_watches import __all__ as _watches

__all__ = [*_basics, *_isolation, *_snapshot, *_ordered, *_watches, *_durability]
