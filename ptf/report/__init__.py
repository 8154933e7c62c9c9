"""ptf.report: see ptf/__init__.py."""
