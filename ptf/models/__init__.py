"""ptf.models: see ptf/__init__.py."""
