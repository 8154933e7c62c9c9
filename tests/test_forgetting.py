"""Stage `forgetting` on tiny hand-made fixtures: a 2-layer Llama (hidden 32) as the pretrained
model, classifiers derived from it (identical backbone, perturbed backbone, LoRA, scratch),
hand-made fine-tune metrics (in the format `stages.finetune` writes, with per-seed test
predictions for some arms), curves and a sequential accuracy matrix. The stage reads exactly the
declared arms (`finetune.runs`), and the WiSE-FT points of wise_ft.json beside them."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ptf.common.cli import StageError
from ptf.common.config import ConfigError, parse_section
from ptf.measures import arms as am
from ptf.measures import claims as cm
from ptf.measures import cl_metrics as cl
from ptf.measures import drift as dr
from ptf.measures import outputs as out
from stages import forgetting as fg
from tests.finetune_fixtures import make_pretrained, make_tokenizer

PARAMS = {
    "max_blocks": 16, "batch_size": 4, "mask_prob": 0.15, "mask_seed": 0, "worse_margin": 0.0,
    "reference_strategy": "full", "scratch_strategy": "scratch",
    "few_label_strategies": ["full", "linear_probe"], "forget_less_strategies": [],
    "alpha": 0.05, "bootstrap_resamples": 500, "bootstrap_seed": 0,
    "tradeoff_gain": "chance", "experiment": "pretrain-finetune-forgetting",
}
LABELS = ["negative", "positive"]
MATRIX = out.Matrix.grid(["movies"], ["full", "linear_probe", "lora", "scratch"])
N_TEST = 50


def cfg(**over) -> fg.Config:
    return parse_section("forgetting", {**PARAMS, **over}, fg.Config)


# ---------------------------------------------------------------- fixtures

def store(pre: Path, model, dest: Path, strategy: str, seed: int = 0, task: str = "movies") -> None:
    """Save `model` in the layout the finetune stage writes (`ptf.models.artifacts.save_classifier`:
    weights or adapter + base, tokenizer, model card, finetune_meta.json)."""
    from ptf.models.artifacts import save_classifier as save_artifact

    tok = make_tokenizer()
    meta = {"strategy": strategy, "task": task, "label_names": LABELS, "pooling": "last",
            "pretrained_dir": str(pre), "max_length": 16, "padding_side": tok.padding_side,
            "seed": seed, "lr": 1e-3}
    results = {"val_accuracy": 0.5, "val_macro_f1": 0.5, "test_accuracy": 0.5, "test_macro_f1": 0.5,
               "n_validation": 10, "n_test": 10}
    save_artifact(model, tok, dest, meta, results, {"seed": seed})


def save_classifier(pre: Path, dest: Path, strategy: str, noise: float = 0.0, scratch: bool = False,
                    seed: int = 0) -> None:
    """A seq-classification model from the pretrained LM (backbone untouched unless `noise`)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    kw = {"num_labels": 2, "id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
    if scratch:
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(pre, **kw))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(pre, **kw)
    if noise:
        with torch.no_grad():
            for p in model.base_model.parameters():
                p.add_(noise * torch.randn_like(p))
    store(pre, model, dest, strategy, seed)


def save_lora(pre: Path, dest: Path, seed: int = 0) -> None:
    """A peft LoRA adapter whose B matrices are non-zero (so merging changes the backbone)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(pre, num_labels=2)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4,
                                            target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    store(pre, model, dest, "lora", seed)


def validation_blocks(block_size: int = 16, n_blocks: int = 20) -> list[list[int]]:
    """Learnable blocks: ids cycling through 4..13 from a seeded start (next token predictable)."""
    rng = random.Random(3)
    starts = [rng.randrange(10) for _ in range(n_blocks)]
    return [[4 + (s + t) % 10 for t in range(block_size)] for s in starts]


def pretrain_briefly(pre: Path, blocks: list[list[int]], steps: int = 40) -> None:
    """Fit the tiny LM to the blocks, so that moving its backbone raises the held-out loss."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(pre)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    x = torch.tensor(blocks)
    for _ in range(steps):
        opt.zero_grad()
        lm(input_ids=x, labels=x).loss.backward()
        opt.step()
    lm.save_pretrained(pre)


def write_validation_shards(root: Path, blocks: list[list[int]]) -> None:
    from ptf.data.shards import write_shards

    block_size = len(blocks[0])
    out = root / "data" / "shards" / "validation"
    out.mkdir(parents=True)
    entry = write_shards(blocks, out, block_size=block_size, shard_blocks=8)
    (root / "data" / "shards" / "manifest.json").write_text(json.dumps({"validation": entry}))


def make_test_labels() -> list[int]:
    return [i % 2 for i in range(N_TEST)]


def predictions(acc: float, seed: int) -> list[int]:
    """Test predictions with exactly `round(acc * N_TEST)` correct ones."""
    rng = random.Random(seed)
    right = set(rng.sample(range(N_TEST), round(acc * N_TEST)))
    return [y if i in right else 1 - y for i, y in enumerate(make_test_labels())]


def metrics_json(accs: list[float], frac: float, with_predictions: bool) -> dict:
    """The format `stages.finetune` writes (+ per-seed test predictions where given)."""
    seeds = [{"seed": i, "test_accuracy": a, "test_macro_f1": a - 0.05, "trainable_params": 100,
              "trainable_fraction": frac, "train_time_s": 1.0, "val_accuracy": a - 0.1}
             for i, a in enumerate(accs)]
    if with_predictions:
        for r in seeds:
            r["test_predictions"] = predictions(r["test_accuracy"], r["seed"])
    return {"strategy": "x", "seeds": seeds, **({"test_labels": make_test_labels()} if with_predictions else {})}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("forgetting")
    tok = make_tokenizer()
    pre = make_pretrained(root / "data" / "models" / "pretrained", tok)
    blocks = validation_blocks()
    pretrain_briefly(pre, blocks)
    write_validation_shards(root, blocks)
    ft = root / "data" / "models" / "finetuned" / "movies"
    save_classifier(pre, ft / "full" / "seed0", "full", noise=0.2, seed=0)
    save_classifier(pre, ft / "full" / "seed1", "full", noise=0.2, seed=1)
    save_classifier(pre, ft / "linear_probe" / "seed0", "linear_probe", seed=2)
    save_classifier(pre, ft / "linear_probe" / "seed1", "linear_probe", seed=3)
    save_lora(pre, ft / "lora" / "seed0", seed=4)
    save_classifier(pre, ft / "scratch" / "seed0", "scratch", scratch=True, seed=5)
    save_classifier(pre, ft / "scratch" / "seed1", "scratch", scratch=True, seed=6)
    m = root / "data" / "metrics" / "finetune" / "movies"
    m.mkdir(parents=True)
    for s, accs, frac, preds in [("full", [0.90, 0.92], 1.0, True), ("linear_probe", [0.80, 0.82], 0.01, True),
                                 ("lora", [0.88], 0.05, False), ("scratch", [0.60, 0.62], 1.0, False)]:
        (m / f"{s}.json").write_text(json.dumps(metrics_json(accs, frac, preds)))
    # left over from another params set: never read (not declared), though broken
    (m / "ewc.json").write_text("{not json")
    (root / "data/metrics/finetune/oldtask").mkdir()
    (root / "data/metrics/finetune/oldtask/full.json").write_text(json.dumps(metrics_json([0.5], 1.0, False)))
    curves = ["strategy,fraction,n_labels,seed,test_accuracy"]
    for s, lo, hi in [("full", (0.80, 0.82, 0.84), 0.9), ("linear_probe", (0.70, 0.72, 0.74), 0.8),
                      ("scratch", (0.50, 0.52, 0.54), 0.6)]:
        curves += [f"{s},0.1,4,{k},{a}" for k, a in enumerate(lo)]
        curves += [f"{s},1.0,48,{k},{hi}" for k in range(3)]
    (root / "data" / "plots").mkdir(parents=True)
    (root / "data" / "plots" / "curves.csv").write_text("\n".join(curves) + "\n")
    (root / "data" / "metrics" / "curves.json").write_text(json.dumps({"task": "movies"}))
    # one run: R = [[.5,.34],[.9,.4],[.7,.85]] over 10 movies / 20 source test examples
    correct = [["1" * 5 + "0" * 5, "1" * 7 + "0" * 13], ["1" * 9 + "0", "1" * 8 + "0" * 12],
               ["0" * 2 + "1" * 7 + "0", "1" * 17 + "0" * 3]]
    (root / "data" / "metrics" / "sequential.json").write_text(json.dumps({
        "tasks": ["movies", "source"], "orders": [["movies", "source"]], "strategies": ["full"], "seeds": [0],
        "runs": [{"order": ["movies", "source"], "strategy": "full", "seed": 0,
                  "matrix": [[0.5, 0.35], [0.9, 0.40], [0.7, 0.85]], "correct": correct}],
        "n_classes": {"movies": 2, "source": 3}, "majority": {"movies": 0.5, "source": 0.45},
        "random_init": {"0": {"movies": 0.5, "source": 0.3}}, "max_steps": 5}))
    return root


@pytest.fixture(scope="module")
def eval_blocks(root):
    from transformers import AutoTokenizer

    pre = root / "data" / "models" / "pretrained"
    ids, _ = dr.load_eval_blocks(root, 16)
    return dr.eval_targets(ids, "clm", AutoTokenizer.from_pretrained(pre), 0.15, 0)


def lm_drift(root: Path, inputs, labels, ft_dir: Path) -> dict:
    from ptf.models.artifacts import load_backbone_as_lm
    from ptf.models.lm import pretrained_lm

    pre = root / "data" / "models" / "pretrained"
    base, counts = dr.block_nll(pretrained_lm(pre), inputs, labels, "clm", 4)
    ft, counts2 = dr.block_nll(load_backbone_as_lm(ft_dir, pre), inputs, labels, "clm", 4)
    assert (counts == counts2).all()
    return cl.drift(base, ft, counts)


# ---------------------------------------------------------------- drift

def test_identical_backbone_has_exactly_zero_drift(root, eval_blocks):
    # linear_probe: a classifier built from the pretrained LM, backbone never trained
    d = lm_drift(root, *eval_blocks, root / "data/models/finetuned/movies/linear_probe/seed0")
    assert d["delta_loss"] == 0.0
    assert d["share_worse"] == 0.0
    assert d["rel_delta_pct"] == 0.0
    assert d["loss_pretrained"] > 0 and d["blocks"] == 16 and d["tokens"] == 16 * 15


def test_perturbed_backbone_drifts_upwards(root, eval_blocks):
    d = lm_drift(root, *eval_blocks, root / "data/models/finetuned/movies/full/seed0")
    assert d["delta_loss"] > 0
    assert d["rel_delta_pct"] > 0
    assert d["share_worse"] > 0.5


def test_merged_lora_drifts(root, eval_blocks):
    d = lm_drift(root, *eval_blocks, root / "data/models/finetuned/movies/lora/seed0")
    assert d["delta_loss"] != 0.0


def test_select_blocks_is_even_and_capped():
    assert dr.select_blocks(10, 4) == [0, 2, 5, 7]
    assert dr.select_blocks(3, 10) == [0, 1, 2]


def test_mlm_masking_is_fixed_by_the_seed():
    import torch

    class Tok:
        mask_token_id, pad_token_id = 3, 0
        all_special_ids = [0, 1, 2, 3]

        def __len__(self):
            return 50

    ids = torch.randint(4, 50, (6, 32), generator=torch.Generator().manual_seed(0))
    a = dr.eval_targets(ids, "mlm", Tok(), 0.15, 7)
    b = dr.eval_targets(ids, "mlm", Tok(), 0.15, 7)
    c = dr.eval_targets(ids, "mlm", Tok(), 0.15, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert (a[1] != -100).any()


def test_mlm_identical_backbone_zero_drift_and_perturbed_positive(tmp_path):
    """The masked-LM path: BertForMaskedLM pretrained, classifiers derived from it, one fixed
    seeded masking shared by both models."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from ptf.models.artifacts import load_backbone_as_lm
    from ptf.models.lm import pretrained_lm

    class Tok:
        mask_token_id, pad_token_id = 3, 0
        all_special_ids = [0, 1, 2, 3]

        def __len__(self):
            return 40

    torch.manual_seed(0)
    pre = tmp_path / "pretrained"
    BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
                    ).save_pretrained(pre)
    save_classifier(pre, tmp_path / "same", "linear_probe", seed=1)
    save_classifier(pre, tmp_path / "moved", "full", noise=0.5, seed=2)
    ids = torch.randint(4, 40, (12, 16), generator=torch.Generator().manual_seed(1))
    inputs, labels = dr.eval_targets(ids, "mlm", Tok(), 0.3, 0)
    keep = (labels != -100).any(1)
    inputs, labels = inputs[keep], labels[keep]
    base, counts = dr.block_nll(pretrained_lm(pre), inputs, labels, "mlm", 5)
    same, _ = dr.block_nll(load_backbone_as_lm(tmp_path / "same", pre), inputs, labels, "mlm", 5)
    moved, _ = dr.block_nll(load_backbone_as_lm(tmp_path / "moved", pre), inputs, labels, "mlm", 5)
    assert counts.sum() == (labels != -100).sum()
    d0 = cl.drift(base, same, counts)
    assert d0["delta_loss"] == 0.0 and d0["share_worse"] == 0.0
    assert cl.drift(base, moved, counts)["delta_loss"] != 0.0


def test_objective_of_each_head_and_a_body_without_one_is_refused(tmp_path):
    """A bare encoder (a released foundation such as all-MiniLM's BertModel) has no LM head: the
    drift would be measured under a random head that AutoModelForCausalLM adds, so it is refused."""
    from transformers import BertConfig, BertForMaskedLM, BertModel, LlamaConfig, LlamaForCausalLM

    small = dict(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=32)
    BertForMaskedLM(BertConfig(**small)).save_pretrained(tmp_path / "mlm")
    LlamaForCausalLM(LlamaConfig(**small)).save_pretrained(tmp_path / "clm")
    BertModel(BertConfig(**small)).save_pretrained(tmp_path / "body")
    assert (dr.objective_of(tmp_path / "mlm"), dr.objective_of(tmp_path / "clm")) == ("mlm", "clm")
    with pytest.raises(StageError, match=r"body/config.json: architecture BertModel has no LM head, so the "
                                         r"held-out LM-loss drift is not applicable"):
        dr.objective_of(tmp_path / "body")
    assert dr.lm_objective(tmp_path / "body") is None and dr.lm_objective(tmp_path / "mlm") == "mlm"


# ---------------------------------------------------------------- verdicts

def _curves(pre_accs, scratch_accs):
    rows = [{"task": "movies", "strategy": "full", "fraction": 0.1, "n_labels": 4, "seed": f"seed{i}",
             "test_accuracy": a} for i, a in enumerate(pre_accs)]
    rows += [{"task": "movies", "strategy": "scratch", "fraction": 0.1, "n_labels": 4, "seed": f"seed{i}",
              "test_accuracy": a} for i, a in enumerate(scratch_accs)]
    # a larger fraction where scratch wins: must not matter (only the smallest fraction counts)
    rows += [{"task": "movies", "strategy": s, "fraction": 1.0, "n_labels": 40, "seed": "seed0",
              "test_accuracy": a} for s, a in (("full", 0.1), ("scratch", 0.9))]
    return rows


def test_claim_few_labels_verdicts():
    c = cfg(few_label_strategies=["full"])
    # every paired seed 0.30 better: no spread at all, decisive
    r = cm.claim_few_labels(_curves([0.80, 0.81, 0.82], [0.50, 0.51, 0.52]), c)
    assert r["verdict"] == cm.REPRODUCED
    comp = r["comparisons"]["movies/full"]
    assert comp["diff"] == pytest.approx(0.30) and comp["resampled"].startswith("seeds only")
    assert cm.claim_few_labels(_curves([0.50, 0.51, 0.52], [0.80, 0.81, 0.82]), c)["verdict"] == cm.NOT_REPRODUCED
    # paired differences -0.1, +0.2, -0.09: the 95 % t interval (2 df) contains 0
    r = cm.claim_few_labels(_curves([0.5, 0.7, 0.6], [0.6, 0.5, 0.69]), c)
    assert r["verdict"] == cm.INCONCLUSIVE
    comp = r["comparisons"]["movies/full"]
    assert comp["diff"] == pytest.approx(0.01 / 3)
    assert comp["ci"][0] < 0 < comp["ci"][1] and comp["reason"] == "the corrected interval contains 0"


def _arm(delta, acc, n=3, std=0.01):
    ms = {k: {"mean": None, "std": None, "n": 0} for k in ("delta_loss", "test_accuracy")}
    ms["delta_loss"] = {"mean": delta, "std": std, "n": n}
    ms["test_accuracy"] = {"mean": acc, "std": std, "n": n}
    return {"mean_std": ms, "drift_applicable": True, "seeds": {}}


def _samples(values: dict[str, tuple[list[float], list[float]]]) -> dict:
    return {("t", s): {"delta": cm.seed_sample({f"seed{i}": v for i, v in enumerate(d)}),
                       "accuracy": cm.seed_sample({f"seed{i}": v for i, v in enumerate(a)})}
            for s, (d, a) in values.items()}


def test_claim_forget_less_verdicts():
    vals = {"full": ([0.50, 0.52, 0.48], [0.90, 0.91, 0.89]),
            "lora": ([0.10, 0.11, 0.09], [0.85, 0.86, 0.84]),      # forgets less, every seed by 0.4
            "replay": ([0.49, 0.55, 0.44], [0.90, 0.91, 0.89]),    # differences -0.01, +0.03, -0.04
            "l2sp": ([0.90, 0.92, 0.88], [0.90, 0.91, 0.89]),      # forgets more
            "scratch": ([0.0] * 3, [0.5] * 3)}
    tasks = {"t": {s: _arm(sum(d) / 3, sum(a) / 3) for s, (d, a) in vals.items()}}
    r = cm.claim_forget_less(tasks, _samples(vals), cfg())
    comps = r["comparisons"]
    assert sorted(comps) == ["t/l2sp", "t/lora", "t/replay"]  # scratch and the reference left out
    assert comps["t/lora"]["verdict"] == cm.REPRODUCED
    assert comps["t/lora"]["accuracy_cost"]["diff"] == pytest.approx(-0.05)
    assert comps["t/lora"]["accuracy_cost"]["verdict_lower_accuracy"] == cm.REPRODUCED
    assert comps["t/replay"]["verdict"] == cm.INCONCLUSIVE
    assert comps["t/l2sp"]["verdict"] == cm.NOT_REPRODUCED
    assert r["verdict"] == cm.NOT_REPRODUCED
    assert r["counts"] == {cm.REPRODUCED: 1, cm.NOT_REPRODUCED: 1, cm.INCONCLUSIVE: 1, "total": 3}
    assert "l2sp, lora, replay forget less than full" in r["claim"]
    only = cm.claim_forget_less(tasks, _samples(vals), cfg(forget_less_strategies=["lora"]))
    assert only["verdict"] == cm.REPRODUCED and list(only["comparisons"]) == ["t/lora"]


def test_claim_with_one_seed_is_inconclusive():
    vals = {"full": ([0.5], [0.9]), "lora": ([0.1], [0.85])}
    tasks = {"t": {s: _arm(d[0], a[0], n=1, std=0.0) for s, (d, a) in vals.items()}}
    r = cm.claim_forget_less(tasks, _samples(vals), cfg())
    assert r["verdict"] == cm.INCONCLUSIVE
    assert r["comparisons"]["t/lora"]["reason"] == "fewer than 2 seeds"
    assert r["comparisons"]["t/lora"]["ci"] is None


def test_claim_without_the_reference_says_what_is_missing():
    vals = {"lora": ([0.1, 0.2], [0.85, 0.8]), "scratch": ([0.0, 0.0], [0.5, 0.5])}
    tasks = {"t": {s: _arm(0.1, 0.8) for s in vals}}
    r = cm.claim_forget_less(tasks, _samples(vals), cfg())
    assert r["verdict"] == cm.INCONCLUSIVE and r["comparisons"] == {}
    assert "not in the declared matrix" in r["missing"]


# ---------------------------------------------------------------- reading the stage outputs

def test_only_the_finetune_format_is_read():
    good = metrics_json([0.9], 1.0, True)
    parsed = out.parse_finetune(good, "f.json")
    assert list(parsed["seeds"]) == ["seed0"] and parsed["test_labels"] == make_test_labels()
    for bad in [{"seeds": {"0": {"test_accuracy": 0.9}}},              # mapping of seeds
                {"per_seed": [{"seed": 0, "test_accuracy": 0.9}]},     # another key
                {"seeds": [{"seed": 0, "test": {"accuracy": 0.9}}]}]:  # nested test metrics
        with pytest.raises(StageError, match="f.json"):
            out.parse_finetune(bad, "f.json")
    wrong = metrics_json([0.9], 1.0, True)
    wrong["seeds"][0]["test_accuracy"] = 0.5
    with pytest.raises(StageError, match="do not give its test_accuracy"):
        out.parse_finetune(wrong, "f.json")


def test_predictions_are_paired_only_on_one_test_set():
    import numpy as np

    def arm(labels):
        return {"seeds": {"seed0": {"test_accuracy": 1.0, "test_predictions": labels}}, "test_labels": labels}

    same = am.claim_samples({"t": {"full": arm([0, 1]), "lora": arm([0, 1])}}, {}, lambda _k: np.zeros(1), np.ones(1))
    assert same[("t", "lora")]["accuracy"].units == "test examples" and same[("t", "lora")]["delta"] is None
    with pytest.raises(StageError, match="task t: .* record different test_labels"):
        am.claim_samples({"t": {"full": arm([0, 1]), "lora": arm([1, 0])}}, {}, lambda _k: np.zeros(1), np.ones(1))


def test_matrix_params():
    """A ragged set of arms; each bad declaration names its key."""
    ok = parse_section("finetune", {"runs": {"movies-full": {"task": "movies", "strategy": "full"},
                                             "source-lora": {"task": "source", "strategy": "lora"}}}, out.Matrix)
    assert ok.arms() == [("movies", "full"), ("source", "lora")] and ok.tasks == ["movies", "source"]
    with pytest.raises(ConfigError, match=r"finetune\.runs\.movies-nope\.strategy: .*unknown strategy 'nope'"):
        parse_section("finetune", {"runs": {"movies-nope": {"task": "movies", "strategy": "nope"}}}, out.Matrix)
    with pytest.raises(ConfigError, match=r"finetune\.runs: .*key 'movies-lora' must be '<task>-<strategy>'.*movies-full"):
        parse_section("finetune", {"runs": {"movies-lora": {"task": "movies", "strategy": "full"}}}, out.Matrix)
    with pytest.raises(ConfigError, match=r"finetune\.runs: .*at least one arm"):
        parse_section("finetune", {"runs": {}}, out.Matrix)
    with pytest.raises(ConfigError, match=r"finetune\.runs\.movies-full\.task: missing"):
        parse_section("finetune", {"runs": {"movies-full": {"strategy": "full"}}}, out.Matrix)
    with pytest.raises(ConfigError, match=r"finetune\.runs: missing"):
        parse_section("finetune", {}, out.Matrix)


# ---------------------------------------------------------------- params

@pytest.mark.parametrize("over, key", [
    ({"max_blocks": 0}, "forgetting.max_blocks"),
    ({"mask_prob": 1.5}, "forgetting.mask_prob"),
    ({"reference_strategy": "fulll"}, "forgetting.reference_strategy"),
    ({"few_label_strategies": ["full", "nope"]}, "forgetting.few_label_strategies"),
    ({"tradeoff_gain": "random"}, "forgetting.tradeoff_gain"),
    ({"batch_size": "8"}, "forgetting.batch_size"),
    ({"extra": 1}, "forgetting.extra"),
])
def test_invalid_params_name_the_key(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg(**over)


def test_params_cross_checks():
    with pytest.raises(ConfigError, match="must differ"):
        cfg(reference_strategy="scratch")
    with pytest.raises(ConfigError, match="reference_strategy"):
        cfg(forget_less_strategies=["full"])
    with pytest.raises(ConfigError, match="missing key"):
        parse_section("forgetting", {k: v for k, v in PARAMS.items() if k != "mask_seed"}, fg.Config)


# ---------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def ran(root, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI",
                              f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    result = fg.run(cfg(), MATRIX, root)
    return root, result


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_run_writes_every_output(ran):
    root, _ = ran
    for rel in [fg.METRICS_JSON, fg.SUMMARY_MD, fg.TRADEOFF_CSV, fg.CURVES_OUT_CSV, fg.MATRIX_CSV,
                *fg.PNGS.values()]:
        assert (root / rel).is_file() and (root / rel).stat().st_size > 0, rel
    assert not list((root / "data").rglob(".*.tmp-*"))


def test_run_metrics(ran):
    root, _ = ran
    m = json.loads((root / fg.METRICS_JSON).read_text())
    assert m["matrix"] == {"runs": ["movies-full", "movies-linear_probe", "movies-lora", "movies-scratch"],
                           "tasks": ["movies"]}
    assert list(m["tasks"]) == ["movies"]     # not `oldtask`, whose metrics lie beside
    movies = m["tasks"]["movies"]
    assert sorted(movies) == ["full", "linear_probe", "lora", "scratch"]   # not the stale ewc.json
    # the frozen backbone did not move; the perturbed one did; scratch is not applicable
    assert movies["linear_probe"]["mean_std"]["delta_loss"] == {"mean": 0.0, "std": 0.0, "n": 2}
    assert movies["full"]["mean_std"]["delta_loss"]["mean"] > 0
    sc = movies["scratch"]
    assert sc["drift_applicable"] is False and sc["mean_std"]["delta_loss"]["n"] == 0
    assert sc["seeds"]["seed0"]["delta_loss"] is None and "not applicable" in sc["seeds"]["seed0"]["drift_note"]
    # gains: chance 1/2 from the saved label names; scratch mean 0.61
    full = movies["full"]["mean_std"]
    assert full["gain_over_chance"]["mean"] == pytest.approx(0.91 - 0.5)
    assert full["gain_over_scratch"]["mean"] == pytest.approx(0.91 - 0.61)
    assert movies["full"]["seeds"]["seed1"]["test_accuracy"] == 0.92
    assert "test_predictions" not in movies["full"]["seeds"]["seed1"]
    # claim 1: at fraction 0.1, full and linear_probe beat scratch by 0.30 / 0.20 on every paired seed
    c1 = m["claims"]["few_labels"]
    assert c1["verdict"] == cm.REPRODUCED and c1["counts"]["total"] == 2
    assert sorted(c1["comparisons"]) == ["movies/full", "movies/linear_probe"]
    assert "per-seed accuracies only" in c1["comparisons"]["movies/full"]["resampled"]
    # claim 2: linear_probe's delta is exactly 0 on every block: the difference is -full's delta
    fl = m["claims"]["forget_less"]["comparisons"]
    lp = fl["movies/linear_probe"]
    assert lp["diff"] == pytest.approx(-full["delta_loss"]["mean"])
    assert lp["resampled"] == "seeds and held-out blocks" and lp["paired_seeds"] is True
    assert lp["ci"][0] <= lp["diff"] <= lp["ci"][1] and lp["ci_level"] == pytest.approx(0.95)
    assert lp["verdict"] in cm.VERDICTS
    cost = lp["accuracy_cost"]                  # both arms hold test predictions: examples resampled
    assert cost["resampled"] == "seeds and test examples"
    assert cost["diff"] == pytest.approx(0.81 - 0.91)
    assert fl["movies/lora"]["verdict"] == cm.INCONCLUSIVE and fl["movies/lora"]["reason"] == "fewer than 2 seeds"
    assert "no test_predictions" in fl["movies/lora"]["accuracy_cost"]["resampled"]
    assert "Holm" in m["claims"]["forget_less"]["rule"] and "500 resamples" in m["claims"]["forget_less"]["rule"]
    seq = m["sequential"]["runs"]["full/movies-source/seed0"]
    # R = [[.5,.35],[.9,.4],[.7,.85]]: BWT = .7 - .9 = -.2; forgetting [.2]; FWT = .4 - .3 (random init)
    assert seq["raw"]["bwt"] == pytest.approx(-0.2)
    assert seq["raw"]["forgetting"] == pytest.approx([0.2])
    assert seq["raw"]["fwt"] == pytest.approx(0.1)
    # majority-adjusted: movies (a - .5) / .5: BWT (.4 - .8) = -.4
    assert seq["majority_adjusted"]["bwt"] == pytest.approx(-0.4)
    # movies after movies 1111111110 -> after source 0011111110: examples 0 and 1 forgotten
    assert seq["events"]["movies"] == {"events": 2, "forgotten": 2, "never_forgotten": 0.8, "n": 10}
    grp = m["sequential"]["groups"]["full/movies-source"]["mean_std"]
    assert grp["bwt"] == {"mean": pytest.approx(-0.2), "std": 0.0, "n": 1}
    assert m["eval"]["blocks"] == 16


def test_run_plot_data_and_summary(ran):
    root, _ = ran
    trade = (root / fg.TRADEOFF_CSV).read_text().splitlines()
    assert trade[0].startswith("task,strategy,delta_loss,delta_loss_std,gain,gain_std")
    assert {r.split(",")[1] for r in trade[1:]} == {"full", "linear_probe", "lora"}  # no scratch
    curves = (root / fg.CURVES_OUT_CSV).read_text().splitlines()
    assert len(curves) == 1 + 6
    matrix = (root / fg.MATRIX_CSV).read_text().splitlines()
    assert len(matrix) == 1 + 6 and "0 before" in matrix[1]
    md = (root / fg.SUMMARY_MD).read_text()
    assert "| movies | scratch |" in md and "n/a (no pretrained backbone)" in md
    assert "**reproduced**. Of 2 comparisons, 2 are reproduced, 0 not reproduced and 0 inconclusive." in md
    assert "Rule: Each difference gets a paired bootstrap interval" in md
    assert "## Sequential fine-tuning (GEM" in md and "`full`, movies → source: BWT -0.200 (1 seed): on average, earlier tasks lost accuracy" in md


def test_run_is_deterministic(ran):
    root, _ = ran
    before = {p: (root / p).read_bytes() for p in [fg.METRICS_JSON, fg.SUMMARY_MD, fg.TRADEOFF_CSV,
                                                    fg.MATRIX_CSV, *fg.PNGS.values()]}
    fg.run(cfg(), MATRIX, root)
    after = {p: (root / p).read_bytes() for p in before}
    assert before == after


def test_run_logs_to_mlflow(ran):
    import os

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("pretrain-finetune-forgetting")
    runs = client.search_runs([exp.experiment_id], "tags.`dvc.stage` = 'forgetting'")
    assert runs
    r = runs[0]
    assert r.data.metrics["movies.full.delta_loss"] > 0
    assert r.data.tags["claim.few_labels"] == cm.REPRODUCED
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "forgetting")}
    assert "forgetting/tradeoff.png" in arts and "forgetting/tradeoff_table.json" in arts


def test_a_subset_of_the_matrix_reads_only_its_arms(ran, tmp_path):
    import shutil

    root = shutil.copytree(ran[0], tmp_path / "root")   # the module's other tests read ran's outputs
    sub = fg.run(cfg(), out.Matrix.grid(["movies"], ["full", "scratch"]), root)
    assert sorted(sub["tasks"]["movies"]) == ["full", "scratch"]
    assert sub["claims"]["forget_less"]["comparisons"] == {}
    assert "| movies | lora |" not in (root / fg.SUMMARY_MD).read_text()


def test_a_declared_arm_without_metrics_is_named(ran):
    root, _ = ran
    with pytest.raises(StageError, match=r"movies/freeze_bottom is declared by params.yaml.*"
                                         r"dvc repro finetune@movies-freeze_bottom"):
        fg.run(cfg(), out.Matrix.grid(["movies"], ["full", "freeze_bottom"]), root)
    with pytest.raises(StageError, match=r"finetune/tweets/full.json: missing"):
        fg.run(cfg(), out.Matrix.grid(["movies", "tweets"], ["full"]), root)


def test_a_declared_arm_without_its_model_is_named(ran, tmp_path):
    import shutil

    root, _ = ran
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "data/models/finetuned/movies/lora/seed0")
    with pytest.raises(StageError, match=r"lora/seed0: the fine-tuned model of movies/lora seed0 .* is "
                                         r"missing.*dvc repro finetune@movies-lora"):
        fg.run(cfg(), MATRIX, copy)
    assert (copy / fg.METRICS_JSON).read_bytes() == (root / fg.METRICS_JSON).read_bytes()   # nothing written


def test_missing_pretrained_model_is_a_stage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(StageError, match="no pretrained model"):
        fg.run(cfg(), MATRIX, tmp_path)


# ---------------------------------------------------------------- WiSE-FT points (stage wise_ft)

def wise_ft_json(root: Path, alphas=(0.0, 1.0), chosen=1.0) -> dict:
    """wise_ft.json as the stage writes it, for the full arm's two seeds, with alpha 0 measured
    as the pretrained backbone and alpha 1 as the saved full model (what interpolation gives
    exactly at the ends: tests/test_interpolation.py)."""
    ev = dr.EvalSet.build(root, root / "data/models/pretrained", PARAMS["max_blocks"], PARAMS["batch_size"],
                          PARAMS["mask_prob"], PARAMS["mask_seed"])
    points = {}
    for a in alphas:
        seeds = []
        for k in (0, 1):
            sums = ev.base_sums if a == 0 else ev.measure(root / f"data/models/finetuned/movies/full/seed{k}")
            acc = 0.5 if a == 0 else [0.90, 0.92][k]
            seeds.append({"seed": k, "val_accuracy": acc - 0.1, "test_accuracy": acc, "test_macro_f1": acc,
                          "test_predictions": predictions(acc, k), "block_sums": [float(x) for x in sums]})
        points[f"{a:g}"] = {"alpha": a, "seeds": seeds}
    return {"task": "movies", "source": "full", "alphas": list(alphas), "n_classes": 2,
            "test_labels": make_test_labels(), "trainable_fraction": 1.0,
            "eval": {"block_indices": ev.indices, "block_counts": [int(c) for c in ev.counts],
                     "loss_pretrained": cl.pooled_loss(ev.base_sums, ev.counts)},
            "points": points, "chosen_alpha": {"alpha": chosen, "rule": "validation"}}


@pytest.fixture(scope="module")
def ran_wise(ran, tmp_path_factory):
    import shutil

    root = shutil.copytree(ran[0], tmp_path_factory.mktemp("wise") / "root")
    (root / out.WISE_FT_JSON).write_text(json.dumps(wise_ft_json(root)))
    return root, fg.run(cfg(), MATRIX, root)


def test_wise_ft_points_sit_beside_the_arms(ran_wise):
    root, res = ran_wise
    full = res["tasks"]["movies"]["full"]["mean_std"]["delta_loss"]
    pts = {p["alpha"]: p["mean_std"] for p in res["wise_ft"]["points"].values()}
    assert pts[0.0]["delta_loss"] == {"mean": 0.0, "std": 0.0, "n": 2}       # the pretrained backbone
    assert pts[1.0]["delta_loss"] == full                                    # the full model, exactly
    arm = res["tasks"]["movies"]["wise_ft"]
    assert arm["alpha"] == 1.0 and arm["mean_std"]["delta_loss"] == full
    assert "movies/wise_ft" in res["claims"]["forget_less"]["comparisons"]
    assert set(res["claims"]["forget_less"]["by_task"]) == {"movies"}
    rows = (root / fg.TRADEOFF_CSV).read_text().splitlines()
    labels = [r.split(",")[1] for r in rows[1:]]
    assert "wise_ft a=0" in labels and "wise_ft a=1*" in labels and "wise_ft" not in labels


def test_wise_ft_on_other_blocks_or_an_undeclared_arm_is_refused(ran_wise, tmp_path):
    import shutil

    root = shutil.copytree(ran_wise[0], tmp_path / "root")
    w = json.loads((root / out.WISE_FT_JSON).read_text())
    w["eval"]["block_indices"] = w["eval"]["block_indices"][:-1]
    (root / out.WISE_FT_JSON).write_text(json.dumps(w))
    with pytest.raises(StageError, match=r"wise_ft.json: measured on other held-out blocks.*dvc repro wise_ft"):
        fg.run(cfg(), MATRIX, root)
    with pytest.raises(StageError, match=r"wise_ft.json: mixes the arm movies-full, which finetune.runs does not declare"):
        fg.run(cfg(), out.Matrix.grid(["movies"], ["lora", "scratch"]), root)



def headless(root: Path) -> None:
    """The pretrained model as a released encoder ships it: the same weights, declared as the
    bare body (no LM head), which is all `lm_objective` reads."""
    f = root / "data/models/pretrained/config.json"
    conf = json.loads(f.read_text())
    f.write_text(json.dumps({**conf, "architectures": ["LlamaModel"]}))


def test_a_foundation_without_an_lm_head_gets_null_drift_and_claim_2_not_measured(ran_wise, tmp_path):
    import shutil

    root = shutil.copytree(ran_wise[0], tmp_path / "root")
    headless(root)
    w = json.loads((root / out.WISE_FT_JSON).read_text())
    for p in w["points"].values():
        for r in p["seeds"]:
            r["block_sums"] = None            # what stage wise_ft writes without an LM head
    w["eval"] = {"applicable": False, "objective": None, "note": dr.NO_LM_HEAD}
    (root / out.WISE_FT_JSON).write_text(json.dumps(w))
    res = fg.run(cfg(), MATRIX, root)
    assert res["eval"] == {"applicable": False, "objective": None, "note": dr.NO_LM_HEAD}
    for s, arm in res["tasks"]["movies"].items():
        assert arm["drift_applicable"] is False and arm["mean_std"]["delta_loss"]["n"] == 0, s
        note = arm["seeds"]["seed0"]["drift_note"]
        assert ("no LM head" in note) == (s != "scratch"), (s, note)
        assert arm["mean_std"]["test_accuracy"] == ran_wise[1]["tasks"]["movies"][s]["mean_std"]["test_accuracy"]
    c2 = res["claims"]["forget_less"]
    assert c2["comparisons"] == {} and c2["applicable"] is False and c2["verdict"] == cm.INCONCLUSIVE
    assert c2["missing"].startswith("not measured on LM drift: not applicable: the pretrained model has no LM head")
    assert res["claims"]["few_labels"] == ran_wise[1]["claims"]["few_labels"]   # claim 1 needs no head
    summary = (root / fg.SUMMARY_MD).read_text()
    assert "no LM head" in summary
