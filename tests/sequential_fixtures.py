"""A fabricated data/metrics/sequential.json in the shape `stages.sequential` writes: every order x
strategy x seed, each matrix cell the mean of its per-example correctness (so the forgetting
events and the accuracies agree). Earlier tasks lose accuracy after later ones, less with the
second strategy, so BWT < 0 and the events are not all zero."""
from __future__ import annotations

import random


def fake_sequential(tasks=("movies", "tweets"), strategies=("full", "replay"), seeds=(0, 1, 2),
                    n_test: int = 20, seed: int = 0) -> dict:
    rng = random.Random(seed)
    tasks = list(tasks)
    orders = [tasks, list(reversed(tasks))]
    T = len(tasks)
    runs = []
    for order in orders:
        for k, s in enumerate(strategies):
            for sd in seeds:
                def p(i: int, j: int) -> float:
                    if j >= i:                        # not trained yet
                        return 0.5
                    return 0.9 if j == i - 1 else 0.6 + 0.15 * k   # just learned, then partly forgotten
                correct = [["".join("1" if rng.random() < p(i, j) else "0" for _ in range(n_test))
                            for j in range(T)] for i in range(T + 1)]
                matrix = [[c.count("1") / n_test for c in row] for row in correct]
                runs.append({"order": order, "strategy": s, "seed": sd, "matrix": matrix,
                             "correct": correct, "wall_time_s": 1.0})
    return {"tasks": tasks, "orders": orders, "strategies": list(strategies), "seeds": list(seeds),
            "max_steps": 5, "n_classes": {t: 2 for t in tasks},
            "majority": {t: 0.55 + 0.05 * i for i, t in enumerate(tasks)},
            "test_size": {t: n_test for t in tasks},
            "random_init": {str(sd): {t: 0.45 + 0.01 * sd for t in tasks} for sd in seeds},
            "runs": runs, "wall_time_s": 10.0}
