"""Pipeline stages. Each `stages.<name>` module is one DVC stage: `python -m stages.<name>`.

Shared modules beside the stages (config, atomic, paths, shards, ...) have no CLI.
Nothing in this package imports Prefect: scheduling lives in `flows/`.
"""
