"""The package version (one place: vqprior/__init__.py and the files it writes read it)."""

__version__ = "0.1.0"
