"""See the package docstring of ``common``."""
