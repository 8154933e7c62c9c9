"""Pipeline stages. Each `stages.<name>` module is one DVC stage: `python -m stages.<name>`.

Only stage entry points live here (Config, run, main); none imports another. What several
stages share is the library `ptf/`, which has no CLI.
Nothing in this package imports Prefect: scheduling lives in `flows/`.
"""
