"""ptf.measures: see ptf/__init__.py."""
