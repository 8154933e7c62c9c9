"""ptf.data: see ptf/__init__.py."""
