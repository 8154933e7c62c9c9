"""ptf.common: see ptf/__init__.py."""
