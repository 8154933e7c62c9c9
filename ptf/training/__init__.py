"""ptf.training: see ptf/__init__.py."""
