"""Storage backends. Import none of them directly: :func:`dgen.connect`
picks one by URL scheme (see :mod:`dgen.urls`)."""
