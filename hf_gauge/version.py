"""The package version (one place; ``hf_gauge.__version__`` re-exports it)."""
__version__ = "0.1.0"
