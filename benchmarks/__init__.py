"""DGen benchmarks: run ``python -m benchmarks --help``; see benchmarks/README.md."""
