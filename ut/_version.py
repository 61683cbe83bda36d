"""The one place the version lives (setup, CLI and metrics read it from here)."""

__version__ = "0.1.0"
