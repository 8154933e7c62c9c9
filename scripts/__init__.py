"""Commands run after the pipeline (no DVC stage): `python -m scripts.results` writes docs/results.md."""
