"""monarch-skypilot."""

__version__ = "0.1.0"
