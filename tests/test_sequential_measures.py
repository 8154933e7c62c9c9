"""ptf/measures/sequential.py: per run, per strategy x order and per strategy pooled over orders,
on a hand-made sequential.json whose answers are worked out in comments."""
from __future__ import annotations

import pytest

from ptf.common.cli import StageError
from ptf.measures import sequential as sq
from tests.sequential_fixtures import fake_sequential


def _run(order, seed, matrix, correct):
    return {"order": order, "strategy": "full", "seed": seed, "matrix": matrix, "correct": correct}


# Two tasks a, b (majority 0.5 and 0.6), two orders, one strategy, two seeds; 2 test examples each.
OBJ = {
    "tasks": ["a", "b"], "orders": [["a", "b"], ["b", "a"]], "strategies": ["full"], "seeds": [0, 1],
    "n_classes": {"a": 2, "b": 2}, "majority": {"a": 0.5, "b": 0.6},
    "random_init": {"0": {"a": 0.5, "b": 0.4}, "1": {"a": 0.5, "b": 0.6}},
    "runs": [
        # a then b, seed 0: a learned to 1.0, falls to 0.5 (one example forgotten); b 0.5 before, 1.0 after
        _run(["a", "b"], 0, [[0.5, 0.5], [1.0, 0.5], [0.5, 1.0]], [["01", "10"], ["11", "10"], ["10", "11"]]),
        # seed 1: a stays at 1.0 (nothing forgotten); b 0.5 before, 1.0 after
        _run(["a", "b"], 1, [[0.5, 0.5], [1.0, 0.5], [1.0, 1.0]], [["01", "10"], ["11", "01"], ["11", "11"]]),
        # b then a, seed 0: b learned to 1.0, falls to 0.0 (both forgotten); a 0.5 before it, 1.0 after
        _run(["b", "a"], 0, [[0.5, 0.5], [1.0, 0.5], [0.0, 1.0]], [["10", "01"], ["11", "01"], ["00", "11"]]),
        _run(["b", "a"], 1, [[0.5, 0.5], [1.0, 0.5], [1.0, 1.0]], [["10", "01"], ["11", "10"], ["11", "11"]]),
    ]}


def test_one_run_uses_the_random_init_reference_and_the_majority_rates():
    m = sq.sequential_block(OBJ)["runs"]["full/a-b/seed0"]
    # BWT = 0.5 - 1.0 = -0.5; FWT = R[1][1] - b_b(seed 0) = 0.5 - 0.4 = +0.1 (row 0 would give 0)
    assert m["raw"]["bwt"] == pytest.approx(-0.5) and m["raw"]["fwt"] == pytest.approx(0.1)
    assert m["random_init"] == [0.5, 0.4] and m["majority"] == [0.5, 0.6] and m["fwt_baseline"] == "random init"
    # adjusted with a' = (a - m) / (1 - m): a's 1.0 -> 1, 0.5 -> 0: BWT -1; FWT (0.5-0.6)/0.4 - (0.4-0.6)/0.4 = 0.25
    assert m["majority_adjusted"]["bwt"] == pytest.approx(-1.0)
    assert m["majority_adjusted"]["fwt"] == pytest.approx(0.25)
    # events on a: rows 1..2 = 11 -> 10: one event, one example forgotten, half never forgotten; b last: none
    assert m["events"] == {"a": {"events": 1, "forgotten": 1, "never_forgotten": 0.5, "n": 2}, "b": None}
    assert m["scalars"]["events.a"] == 1 and m["scalars"]["events.b"] is None
    # learned above majority: a 1.0 - 0.5 = 0.5; b 1.0 - 0.6 = 0.4
    assert m["scalars"]["learned_above_majority.a"] == pytest.approx(0.5)
    assert m["scalars"]["learned_above_majority.b"] == pytest.approx(0.4)


def test_groups_are_mean_and_std_over_seeds():
    g = sq.sequential_block(OBJ)["groups"]
    assert list(g) == ["full/a-b", "full/b-a"]
    ab = g["full/a-b"]
    assert ab["seeds"] == [0, 1]
    # BWT per seed -0.5 and 0: mean -0.25, sample std sqrt(0.125) = 0.35355
    assert ab["mean_std"]["bwt"] == {"mean": pytest.approx(-0.25), "std": pytest.approx(0.125 ** 0.5), "n": 2}
    # FWT: seed 0 0.5 - 0.4 = 0.1, seed 1 0.5 - 0.6 = -0.1: mean 0
    assert ab["mean_std"]["fwt"]["mean"] == pytest.approx(0.0)
    assert ab["mean_std"]["events.a"] == {"mean": 0.5, "std": pytest.approx(0.5 ** 0.5), "n": 2}
    assert ab["mean_std"]["events.b"] == {"mean": None, "std": None, "n": 0}
    assert ab["matrix"] == [[0.5, 0.5], [1.0, 0.5], [0.75, 1.0]]
    # mean adjusted matrix: a column (a - 0.5) / 0.5, b column (b - 0.6) / 0.4
    assert ab["matrix_majority_adjusted"][2] == pytest.approx([0.5, 1.0])


def test_a_strategy_pools_its_orders_per_seed_then_takes_mean_and_std_over_seeds():
    s = sq.sequential_block(OBJ)["strategies"]["full"]
    # BWT: seed 0 mean over orders (-0.5 + -1.0) / 2 = -0.75; seed 1 (0 + 0) / 2 = 0 -> mean -0.375, n 2 seeds
    assert s["mean_std"]["bwt"]["mean"] == pytest.approx(-0.375) and s["mean_std"]["bwt"]["n"] == 2
    assert s["mean_std"]["bwt"]["std"] == pytest.approx(0.75 / 2 ** 0.5)
    # events on b: only the b -> a order measures it (seed 0: 2, seed 1: 0) -> mean 1
    assert s["mean_std"]["events.b"]["mean"] == pytest.approx(1.0)
    assert s["orders"] == OBJ["orders"] and s["seeds"] == [0, 1]


def test_no_run_and_a_bad_matrix():
    assert sq.sequential_block(None) == {}
    bad = {**OBJ, "runs": [{**OBJ["runs"][0], "matrix": [[0.5, 0.5]]}]}
    with pytest.raises(StageError, match=r"sequential run 'full/a-b/seed0': accuracy matrix must have T\+1 rows"):
        sq.sequential_block(bad)


def test_the_fixture_matrices_agree_with_their_correctness():
    obj = fake_sequential()
    for r in obj["runs"]:
        assert r["matrix"] == [[c.count("1") / len(c) for c in row] for row in r["correct"]]
    b = sq.sequential_block(obj)
    assert set(b["groups"]) == {"full/movies-tweets", "full/tweets-movies", "replay/movies-tweets",
                                "replay/tweets-movies"}


def test_the_block_keys_and_every_per_task_scalar():
    """The exact shape forgetting.json's `sequential` has, which the report reads key by key."""
    b = sq.sequential_block(OBJ)
    assert set(b) == {"fwt_reference", "adjustment", "tasks", "majority", "runs", "groups", "strategies"}
    assert b["fwt_reference"] == sq.FWT_REFERENCE and b["adjustment"] == sq.ADJUSTMENT
    assert b["tasks"] == ["a", "b"] and b["majority"] == {"a": 0.5, "b": 0.6}
    m = b["runs"]["full/a-b/seed0"]
    assert m["strategy"] == "full" and m["order"] == ["a", "b"] and m["seed"] == 0 and m["n_classes"] == [2, 2]
    # a: 11 -> 10, one event, 1 of 2 examples forgotten, half never forgotten; b is last: nothing measured
    assert {k: m["scalars"][f"{k}.a"] for k in sq.PER_TASK[:3]} == {"events": 1, "forgotten": 1,
                                                                    "never_forgotten": 0.5}
    assert [m["scalars"][f"{k}.b"] for k in sq.PER_TASK[:3]] == [None, None, None]
    g = b["groups"]["full/b-a"]
    assert g["strategy"] == "full" and g["order"] == ["b", "a"]


def test_a_strategy_missing_in_one_order_still_gets_its_other_groups():
    # replay ran only in the b -> a order: its a -> b group is absent, the next ones are still built
    obj = {**OBJ, "strategies": ["replay", "full"],
           "runs": OBJ["runs"] + [{**OBJ["runs"][2], "strategy": "replay"}]}
    assert list(sq.sequential_block(obj)["groups"]) == ["replay/b-a", "full/a-b", "full/b-a"]


def test_the_pooled_spread_is_over_each_seeds_own_runs():
    # three seeds (with two, any pairing of a seed with the other's runs gives the same numbers)
    from ptf.measures.stats import mean_std

    b = sq.sequential_block(fake_sequential(seeds=(0, 1, 2)))
    for s in ("full", "replay"):
        per_seed = [sum(b["runs"][f"{s}/{o}/seed{k}"]["scalars"]["bwt"] for o in ("movies-tweets", "tweets-movies")) / 2
                    for k in (0, 1, 2)]
        assert b["strategies"][s]["strategy"] == s
        assert b["strategies"][s]["mean_std"]["bwt"] == pytest.approx(mean_std(per_seed))
