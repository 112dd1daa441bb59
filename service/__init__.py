"""Everything with I/O or time: settings, rules, decoding, the daemon, metrics, CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sinkwatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
