"""Registers the broken toy schemes of tests/conformance_broken.py.

Only conformance worker processes import this (named in the
``DGEN_CONFORMANCE_WORKER_IMPORTS`` environment variable), so that a URL
such as ``earlysqlite:///...`` resolves there too; the test process itself
registers the schemes with pytest's monkeypatch.
"""

from conformance_broken import SCHEMES

from dgen import urls

for _scheme in SCHEMES:
    urls._BUILTIN[_scheme] = ("conformance_broken", None)
