"""ptf/measures/representation_arms.py without models, in milliseconds: the bookkeeping around
the measures (which probes a model gets, what is compared with what, the per-arm table, bits per
byte from the forgetting stage's numbers) on hand-made inputs with hand-derived results, so that
`make mutate GROUPS=representation` kills its mutants without building tiny saved models per
mutant (tests/test_representation_arms.py does the same on real models, slowly).

measure_models is run with its model-facing parts replaced (the backbones, `features`,
`cka_per_layer`, `probe_score`) by stand-ins that tag what they were handed, so each number of a
record can be traced to where it must come from.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ptf.common.cli import StageError
from ptf.data.tasks import Split, TaskData
from ptf.measures import representation_arms as ra

P = Path("m")


# ----------------------------------------------------------------------------- small helpers
def test_applicable_only_when_starting_from_the_pretrained_backbone():
    assert ra.applicable("full") is True and ra.applicable("lora") is True
    assert ra.applicable("scratch") is False


def test_block_batches_in_order_without_padding():
    ids = torch.arange(15).reshape(5, 3)
    got = ra.block_batches(ids, 2)
    assert [b[0].tolist() for b in got] == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]], [[12, 13, 14]]]
    assert [b[1].tolist() for b in got] == [[[1] * 3] * 2, [[1] * 3] * 2, [[1] * 3]]


def test_padded_batches_right_padded_with_the_pad_id():
    got = ra.padded_batches([[5, 6, 7], [8], [9, 4]], pad_id=0, batch_size=2)
    assert len(got) == 2
    assert got[0][0].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert got[0][1].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert got[1][0].tolist() == [[9, 4]] and got[1][1].tolist() == [[1, 1]]
    assert ra.padded_batches([[1], [2, 3]], pad_id=7, batch_size=5)[0][0].tolist() == [[1, 7], [2, 3]]


def test_by_length_is_a_stable_sort_that_carries_the_labels():
    ids = [[1, 2, 3], [4], [5, 6], [7]]
    assert ra.by_length(ids, [0, 1, 2, 3]) == ([[4], [7], [5, 6], [1, 2, 3]], [1, 3, 2, 0])


def test_probe_set_from_task_needs_both_splits():
    tr, va = Split([[1], [2, 3]], [0, 1]), Split([[4]], [1])
    p = ra.ProbeSet.from_task(TaskData("movies", ["neg", "pos", "mid"], tr, va, Split([[9]], [2])))
    assert p == ra.ProbeSet("movies", 3, [[1], [2, 3]], [0, 1], [[4]], [1])
    for a, b in ((Split([], []), va), (tr, Split([], []))):
        with pytest.raises(StageError, match=r"^task movies: the probe needs non-empty train and validation splits$"):
            ra.ProbeSet.from_task(TaskData("movies", ["neg", "pos"], a, b, None))


@pytest.mark.parametrize("archs, head", [
    (["BertForMaskedLM"], "BertForMaskedLM"), (["LlamaForCausalLM"], "LlamaForCausalLM"),
    (["GPT2LMHeadModel"], "GPT2LMHeadModel"), (["BertModel"], None), (["BertModel", "BertForMaskedLM"], None),
    ([], None), (None, None), ("absent", None)])
def test_lm_head_of_reads_the_first_architecture(tmp_path, archs, head):
    cfg = {"model_type": "bert"} if archs == "absent" else {"architectures": archs}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ra.lm_head_of(tmp_path) == head
    assert ra.lm_head_of(str(tmp_path)) == head


class Tok:
    """A tokenizer stand-in: ids 0 and 1 special, the others decode to fixed pieces."""
    all_special_ids = [0, 1]
    pieces = {0: "<s>", 1: "</s>", 5: "ab", 6: "é", 7: "c"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i in self.all_special_ids))


def test_tokens_per_byte_counts_non_special_tokens_and_their_bytes():
    # tokens 5, 6, 7 (0 and 1 special); text "abé" (4 bytes: é is 2) + "c" (1 byte)
    assert ra.tokens_per_byte(Tok(), [[0, 5, 6, 1], [7, 1]]) == (3, 5)
    assert ra.tokens_per_byte(Tok(), [[0, 1]]) == (0, 0)


# ----------------------------------------------------------------------------- lm_bits
FG = {"tasks": {"movies": {"full": {"seeds": {"seed0": {"loss_pretrained": 2.0, "loss_finetuned": 3.0},
                                              "seed1": {"loss_pretrained": "1.5", "loss_finetuned": 1}}},
                           "lora": {"seeds": {"seed0": {"loss_pretrained": "x", "loss_finetuned": 1.0},
                                             "seed1": None}}}}}


def test_lm_bits_per_job_from_the_forgetting_numbers():
    # scratch between the two: not applicable, and the jobs after it are still measured
    jobs = [ra.Job("movies", "full", "seed1", P), ra.Job("movies", "scratch", "seed0", P),
            ra.Job("movies", "full", "seed0", P)]
    out = ra.lm_bits(FG, jobs, n_tokens=3, n_bytes=6)
    assert list(out) == jobs
    # nats/token x tokens/byte / ln 2: 1.5 x 0.5 / ln 2 and 1 x 0.5 / ln 2
    assert out[jobs[0]] == pytest.approx({
        "loss_pretrained": 1.5, "loss_finetuned": 1.0, "delta_loss": -0.5,
        "bpb_pretrained": 0.75 / math.log(2), "bpb_finetuned": 0.5 / math.log(2),
        "delta_bpb": -0.25 / math.log(2)})
    assert out[jobs[2]]["delta_loss"] == 1.0 and out[jobs[2]]["delta_bpb"] == pytest.approx(0.5 / math.log(2))
    assert out[jobs[1]] == dict.fromkeys(ra.LM_KEYS)
    assert all(type(v) is float for v in out[jobs[0]].values())


@pytest.mark.parametrize("job", [ra.Job("movies", "lora", "seed0", P), ra.Job("movies", "lora", "seed1", P),
                                 ra.Job("movies", "full", "seed9", P), ra.Job("other", "full", "seed0", P)])
def test_lm_bits_refuses_a_missing_or_unreadable_loss_in_one_line(job):
    with pytest.raises(StageError) as e:
        ra.lm_bits(FG, [job], 3, 6, where="data/metrics/forgetting.json")
    assert str(e.value) == (f"data/metrics/forgetting.json: no held-out LM loss of {job.task}/{job.strategy} "
                            f"{job.seed}; run `dvc repro forgetting`")
    assert e.value.__cause__ is None and e.value.__suppress_context__


@pytest.mark.parametrize("fg", [{}, {"tasks": None}, {"tasks": []}, [], None])
def test_lm_bits_needs_a_tasks_table(fg):
    with pytest.raises(StageError, match=r"^f.json: no `tasks` table; run `dvc repro forgetting`$"):
        ra.lm_bits(fg, [], 3, 6, where="f.json")
    with pytest.raises(StageError, match=r"^forgetting.json: no `tasks` table"):
        ra.lm_bits(fg, [], 3, 6)


def test_lm_bits_default_where_names_forgetting_json():
    with pytest.raises(StageError, match=r"^forgetting.json: no held-out LM loss of movies/full seed9;"):
        ra.lm_bits(FG, [ra.Job("movies", "full", "seed9", P)], 3, 6)


# ----------------------------------------------------------------------------- arm_table
def test_scalars_flattens_what_is_a_number():
    rec = {"applicable": True, "cka": [1.0, 0.5], "cka_last": 0.5, "n": 3, "flag": False,
           "nan": float("nan"), "none": None, "note": "text",
           "probe": {"a": {"before": 0.9, "after": 0.6, "lost": 0.3}},
           "lm": {"delta_loss": 0.25, "k": 2, "missing": None, "note": "x"}}
    assert ra._scalars(rec) == {"cka.layer0": 1.0, "cka.layer1": 0.5, "cka_last": 0.5, "n": 3,
                                "nan": None, "none": None, "probe_lost.a": 0.3, "probe_after.a": 0.6,
                                "lm.delta_loss": 0.25, "lm.k": 2, "lm.missing": None}
    # not a list / not a dict: kept only as a plain value would be
    assert ra._scalars({"cka": None, "probe": None, "lm": 1.5}) == {"cka": None, "probe": None, "lm": 1.5}


def test_arm_table_mean_std_over_seeds_sorted():
    recs = {
        ra.Job("b", "full", "seed1", P): {"applicable": True, "cka": [1.0, 0.4], "x": 1.0,
                                          "probe": {"a": {"before": 0.8, "after": 0.5, "lost": 0.3}}},
        ra.Job("b", "full", "seed0", P): {"applicable": True, "cka": [1.0, 0.8], "x": None,
                                          "probe": {"a": {"before": 0.8, "after": 0.7, "lost": 0.1}}},
        ra.Job("a", "scratch", "seed0", P): {"applicable": False, "note": ra.NOT_FROM_PRETRAINED},
        ra.Job("a", "full", "seed0", P): {"cka_last": 0.5},
    }
    t = ra.arm_table(recs)
    assert list(t) == ["a", "b"] and list(t["a"]) == ["full", "scratch"]
    full = t["b"]["full"]
    assert list(full["seeds"]) == ["seed0", "seed1"]
    assert full["seeds"]["seed1"] is recs[ra.Job("b", "full", "seed1", P)]
    assert list(full["mean_std"]) == ["cka.layer0", "cka.layer1", "probe_after.a", "probe_lost.a", "x"]
    ms = full["mean_std"]
    assert ms["cka.layer0"] == {"mean": 1.0, "std": 0.0, "n": 2}
    assert ms["cka.layer1"] == pytest.approx({"mean": 0.6, "std": 0.4 / math.sqrt(2), "n": 2})
    assert ms["probe_lost.a"] == pytest.approx({"mean": 0.2, "std": 0.2 / math.sqrt(2), "n": 2})
    assert ms["probe_after.a"] == pytest.approx({"mean": 0.6, "std": 0.2 / math.sqrt(2), "n": 2})
    assert ms["x"] == {"mean": 1.0, "std": 0.0, "n": 1}          # the None seed is left out
    assert full["applicable"] is True
    assert t["a"]["scratch"] == {"seeds": {"seed0": recs[ra.Job("a", "scratch", "seed0", P)]},
                                 "mean_std": {}, "applicable": False}
    assert t["a"]["full"]["applicable"] is True          # no `applicable` key: applicable
    assert t["a"]["full"]["mean_std"] == {"cka_last": {"mean": 0.5, "std": 0.0, "n": 1}}


def test_arm_table_an_arm_is_applicable_only_if_every_seed_is():
    recs = {ra.Job("a", "full", "seed0", P): {"applicable": True},
            ra.Job("a", "full", "seed1", P): {"applicable": False}}
    assert ra.arm_table(recs)["a"]["full"]["applicable"] is False


def test_mean_of_nothing_is_none():
    assert ra._mean([]) is None
    assert ra._mean([0.25, 0.75, 0.5]) == 0.5 and type(ra._mean([1, 2])) is float


# ----------------------------------------------------------------------------- features, probe_score
def test_features_pools_and_takes_the_probe_layer(monkeypatch):
    calls = []

    def fake_layer_features(backbone, batches, pooling):
        calls.append((backbone, batches, pooling))
        tag = len(calls)
        return [np.full((2, 1), 10 * tag + i) for i in range(3)]

    monkeypatch.setattr(ra, "layer_features", fake_layer_features)
    probes = {"a": ra.ProbeSet("a", 2, [[1, 2], [3]], [0, 1], [[4]], [1])}
    held = [(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))]
    s = ra.Settings(batch_size=1, cka_pooling="mean", probe_layer=1)
    f = ra.features("bb", held, probes, 9, s)
    assert [c[0] for c in calls] == ["bb"] * 3
    assert calls[0][1] is held and calls[0][2] == "mean"
    assert [c[2] for c in calls[1:]] == ["mean", "mean"]
    # train rows then validation rows, padded with the pad id, batch_size 1
    assert [b[0].tolist() for b in calls[1][1]] == [[[1, 2]], [[3]]]
    assert [b[0].tolist() for b in calls[2][1]] == [[[4]]]
    assert [x[0, 0] for x in f.held_out] == [10, 11, 12]
    assert (f.probe["a"][0][0, 0], f.probe["a"][1][0, 0]) == (21, 31)     # layer 1 of each
    f = ra.features("bb", held, probes, 9, ra.Settings(batch_size=2, cka_pooling="tokens"))
    assert calls[3][2] == "tokens" and (f.probe["a"][0][0, 0], f.probe["a"][1][0, 0]) == (52, 62)   # layer -1
    assert [b[0].tolist() for b in calls[4][1]] == [[[1, 2], [3, 9]]]


def test_probe_score_trains_on_train_and_scores_validation():
    # 1-d features: train at -1 (class 0) and +1 (class 1); validation at -2, -1.5 (0) and 3 (1),
    # one of them labelled against the line: 2 of 3
    p = ra.ProbeSet("a", 2, [[0], [0]], [0, 1], [[0]] * 3, [0, 1, 1])
    x = (np.array([[-1.0], [1.0]]), np.array([[-2.0], [-1.5], [3.0]]))
    assert ra.probe_score(p, x, ra.Settings()) == pytest.approx(2 / 3)
    p3 = ra.ProbeSet("a", 3, [[0]] * 3, [0, 1, 2], [[0]] * 3, [2, 0, 1])
    x3 = (np.array([[-1.0], [0.0], [1.0]]), np.array([[1.1], [-1.1], [0.05]]))
    assert ra.probe_score(p3, x3, ra.Settings(l2=1e-4, max_iter=100)) == 1.0


# ----------------------------------------------------------------------------- measure_models
BEFORE = {"movies": 0.8, "source": 0.6, "topic": 0.5}
AFTER = {"movies": 0.7, "source": 0.45, "topic": 0.5}


@pytest.fixture
def fake_models(monkeypatch):
    """Backbones as tags; `features` returns `layers` held-out layers of 5 rows and per probe a
    (backbone kind, task) tag that probe_score turns into BEFORE/AFTER accuracies."""
    calls = {"features": [], "cka": [], "score": [], "layers": {"pre": 3, "ft": 3}}

    def features(backbone, held, probes, pad_id, settings):
        calls["features"].append((backbone, held, {k: v for k, v in probes.items()}, pad_id, settings))
        kind = backbone[0]
        return ra.Features([np.full((5, 2), float(i)) for i in range(calls["layers"][kind])],
                           {t: (kind, t) for t in probes})

    def cka(a, b):
        calls["cka"].append((a, b))
        return [0.9, 0.4, 0.7]

    def score(p, x, settings):
        calls["score"].append((p, x, settings))
        assert p.name == x[1]
        return (BEFORE if x[0] == "pre" else AFTER)[x[1]]

    monkeypatch.setattr(ra, "pretrained_backbone", lambda d: ("pre", d))
    monkeypatch.setattr(ra, "finetuned_backbone", lambda d: ("ft", d))
    monkeypatch.setattr(ra, "features", features)
    monkeypatch.setattr(ra, "cka_per_layer", cka)
    monkeypatch.setattr(ra, "probe_score", score)
    return calls


def probes():
    return [ra.ProbeSet("source", 3, [[1, 2, 3], [4]], [2, 0], [[5, 6], [7]], [1, 0]),
            ra.ProbeSet("movies", 2, [[8]], [1], [[9]], [0]),
            ra.ProbeSet("topic", 4, [[1]], [3], [[2]], [3])]


def test_measure_models_records(fake_models):
    jobs = [ra.Job("movies", "full", "seed0", Path("ft/a")), ra.Job("movies", "scratch", "seed0", Path("ft/b")),
            ra.Job("other", "lora", "seed1", Path("ft/c"))]
    ids = torch.arange(12).reshape(4, 3)
    s = ra.Settings(batch_size=3)
    seen = []
    ref, recs = ra.measure_models(jobs, Path("pre"), ids, probes(), 7, s, progress=seen.append)
    assert seen == jobs and list(recs) == jobs
    assert ref == {"probe_before": BEFORE, "layers": 3, "held_out_examples": 5}
    assert list(ref["probe_before"]) == ["movies", "source", "topic"]

    pre_call, ft_a, ft_c = fake_models["features"]
    assert pre_call[0] == ("pre", Path("pre")) and ft_a[0] == ("ft", Path("ft/a")) and ft_c[0] == ("ft", Path("ft/c"))
    assert all(c[3] == 7 and c[4] is s for c in fake_models["features"])
    # the held-out blocks in batches of 3, the same batches for every model
    assert [b[0].tolist() for b in pre_call[1]] == [ids[:3].tolist(), ids[3:].tolist()]
    assert ft_a[1] is pre_call[1] and ft_c[1] is pre_call[1]
    # every probe for the backbone; the other tasks only for a fine-tuned model; sorted by length
    assert set(pre_call[2]) == {"source", "movies", "topic"} and set(ft_a[2]) == {"source", "topic"}
    assert set(ft_c[2]) == {"source", "movies", "topic"}
    src = pre_call[2]["source"]
    assert (src.train_ids, src.train_y, src.val_ids, src.val_y) == ([[4], [1, 2, 3]], [0, 2], [[7], [5, 6]], [0, 1])
    assert (src.name, src.n_classes) == ("source", 3)
    assert ft_a[2]["source"] == src

    pre_feats = [np.full((5, 2), float(i)) for i in range(3)]
    for a, b in fake_models["cka"]:
        assert len(a) == len(b) == 3 and all(np.array_equal(x, y) for x, y in zip(a, pre_feats))

    r = recs[jobs[0]]
    assert r == {"applicable": True, "cka": [0.9, 0.4, 0.7], "cka_last": 0.7, "cka_min": 0.4,
                 "probe": {"source": {"before": 0.6, "after": 0.45, "lost": 0.6 - 0.45},
                           "topic": {"before": 0.5, "after": 0.5, "lost": 0.0}},
                 "probe_lost_mean": pytest.approx(0.075), "probe_after_mean": pytest.approx(0.475)}
    assert list(r["probe"]) == ["source", "topic"]
    assert recs[jobs[1]] == {"applicable": False, "note": ra.NOT_FROM_PRETRAINED}
    c = recs[jobs[2]]
    assert list(c["probe"]) == ["movies", "source", "topic"]
    assert c["probe"]["movies"] == {"before": 0.8, "after": 0.7, "lost": pytest.approx(0.1)}
    assert c["probe_after_mean"] == pytest.approx((0.7 + 0.45 + 0.5) / 3)
    # the scores: the pretrained backbone's once per task, then each fine-tuned model's
    assert [(x[0], x[1]) for _, x, _ in fake_models["score"]] == [
        ("pre", "movies"), ("pre", "source"), ("pre", "topic"), ("ft", "source"), ("ft", "topic"),
        ("ft", "movies"), ("ft", "source"), ("ft", "topic")]
    assert all(st is s for _, _, st in fake_models["score"])
    assert fake_models["score"][1][0] == src


def test_measure_models_no_other_task_and_no_progress(fake_models):
    jobs = [ra.Job("movies", "full", "seed0", Path("ft/a"))]
    ref, recs = ra.measure_models(jobs, Path("pre"), torch.zeros(2, 3, dtype=torch.long), [probes()[1]], 0)
    assert recs[jobs[0]]["probe"] == {} and recs[jobs[0]]["probe_lost_mean"] is None
    assert recs[jobs[0]]["probe_after_mean"] is None
    assert ref["probe_before"] == {"movies": 0.8}
    # the default settings
    assert fake_models["features"][0][4] == ra.Settings()
    assert [b[0].shape[0] for b in fake_models["features"][0][1]] == [2]


def test_measure_models_refuses_a_model_with_other_layers(fake_models):
    fake_models["layers"]["ft"] = 2
    with pytest.raises(StageError, match=r"^ft/a: 2 hidden-state layers, the pretrained backbone has 3$"):
        ra.measure_models([ra.Job("movies", "full", "seed0", Path("ft/a"))], Path("pre"),
                          torch.zeros(2, 3, dtype=torch.long), probes(), 0)


# ----------------------------------------------------------------------------- representation.probe_retention
def test_probe_retention_is_after_over_before():
    from ptf.measures.representation import probe_retention

    x, y = np.array([[-2.0], [-1.0], [1.0], [2.0]]), [0, 0, 1, 1]        # class = sign
    # before: right on 1 of 2 test examples; after: right on 1 of 4 -> retention 0.25 / 0.5
    r = probe_retention((x, y, np.array([[-1.5], [1.5]]), [0, 0]),
                        (x, y, np.array([[-1.5], [1.5], [1.6], [1.7]]), [0, 0, 0, 0]), 2)
    assert r == {"before": 0.5, "after": 0.25, "lost": 0.25, "retention": 0.5}


def test_probe_retention_passes_its_penalty_on():
    from ptf.measures.representation import probe_retention

    # one example of class 1 among six: a light penalty separates it (threshold between 1 and 3),
    # a heavy one shrinks the weight to ~0 and leaves the prior (class 0) for every input
    x, y = np.array([[-3.0], [-2.0], [-1.0], [0.0], [1.0], [3.0]]), [0, 0, 0, 0, 0, 1]
    part = (x, y, np.array([[3.0]]), [1])
    assert probe_retention(part, part, 2)["before"] == 1.0
    assert probe_retention(part, part, 2, l2=100.0) == {"before": 0.0, "after": 0.0, "lost": 0.0,
                                                         "retention": pytest.approx(math.nan, nan_ok=True)}


def test_probe_score_hands_its_settings_to_the_probe(monkeypatch):
    seen = []
    real = ra.fit_probe

    def spy(x, y, n_classes, l2=1e-3, max_iter=200):
        seen.append((x.tolist(), list(y), n_classes, l2, max_iter))
        return real(x, y, n_classes, l2, max_iter)

    monkeypatch.setattr(ra, "fit_probe", spy)
    p = ra.ProbeSet("a", 2, [[0], [0]], [0, 1], [[0]], [1])
    x = (np.array([[-1.0], [1.0]]), np.array([[2.0]]))
    assert ra.probe_score(p, x, ra.Settings(l2=0.5, max_iter=7)) == 1.0
    assert seen == [([[-1.0], [1.0]], [0, 1], 2, 0.5, 7)]


def test_linear_cka_computes_in_float64_whatever_it_is_given():
    from ptf.measures.representation import linear_cka

    rng = np.random.default_rng(5)
    x32, y32 = rng.normal(size=(40, 6)).astype(np.float32), rng.normal(size=(40, 6)).astype(np.float32)
    want = linear_cka(x32.astype(np.float64), y32.astype(np.float64))
    assert linear_cka(x32, y32) == want                               # not float32 arithmetic
    assert linear_cka(x32, y32.astype(np.float64)) == want
    assert linear_cka(x32.astype(np.float64), y32) == want


def test_linear_cka_of_no_variance_is_nan_without_dividing_by_zero():
    from ptf.measures.representation import linear_cka

    x = np.array([[1.0, 2.0], [3.0, 5.0], [4.0, 4.0]])
    with np.errstate(all="raise"):                       # 0 / 0 would raise here
        assert math.isnan(linear_cka(np.ones((3, 2)), x))
        assert math.isnan(linear_cka(x, np.zeros((3, 1))))
        assert math.isnan(linear_cka(np.ones((2, 3)), np.ones((2, 3))))   # the Gram form too


def test_probe_predicts_on_standardised_features():
    from ptf.measures.representation import Probe

    # z = (x - 3) / 10; logits (-z + 0.5, z): class 1 where z > 0.25, i.e. x > 5.5
    p = Probe(mean=np.array([3.0]), std=np.array([10.0]),
              weight=torch.tensor([[-1.0, 1.0]], dtype=torch.float64), bias=torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert p.predict(np.array([[5.0], [8.0], [2.0], [0.0]])).tolist() == [0, 1, 0, 0]
    assert p.predict([[5], [6]]).tolist() == [0, 1]                     # a list of ints works too


# ----------------------------------------------------------------------------- representation.fit_probe
def test_fit_probe_standardises_small_spreads_and_offsets():
    from ptf.measures.representation import fit_probe, probe_accuracy

    # std 0.5 (below 1, above the 1e-12 floor): divided by 0.5, not left alone
    p = fit_probe(np.array([[-0.5], [0.5]]), [0, 1], 2)
    assert p.std.tolist() == [0.5] and p.mean.tolist() == [0.0]
    # far from 0: trained on x - mean, as predict standardises; every training example right
    x = np.array([[9.0], [10.0], [11.0], [12.0]])
    q = fit_probe(x, [0, 0, 1, 1], 2)
    assert q.mean.tolist() == [10.5] and probe_accuracy(q, x, [0, 0, 1, 1]) == 1.0


def test_fit_probe_is_float64_for_any_input():
    from ptf.measures.representation import fit_probe

    rng = np.random.default_rng(2)
    x32 = rng.normal(size=(12, 3)).astype(np.float32)
    y = [0, 1, 2] * 4
    p = fit_probe(x32, y, 3)
    assert p.weight.dtype == torch.float64 and p.bias.dtype == torch.float64
    q = fit_probe(x32.astype(np.float64), y, 3)
    assert torch.equal(p.weight, q.weight) and torch.equal(p.bias, q.bias)


def test_fit_probe_runs_lbfgs_with_its_iterations_and_a_line_search(monkeypatch):
    from ptf.measures.representation import fit_probe

    made = []
    real = torch.optim.LBFGS

    def spy(params, **kw):
        made.append(kw)
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "LBFGS", spy)
    fit_probe(np.array([[-1.0], [1.0]]), [0, 1], 2, max_iter=17)
    fit_probe(np.array([[-1.0], [1.0]]), [0, 1], 2)
    assert made == [{"max_iter": 17, "tolerance_grad": 1e-10, "line_search_fn": "strong_wolfe"},
                    {"max_iter": 200, "tolerance_grad": 1e-10, "line_search_fn": "strong_wolfe"}]
