"""The library's version, recorded with what it produces (score sets, benchmark results)."""

__version__ = "0.1.0"
