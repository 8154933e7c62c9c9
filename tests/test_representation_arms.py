"""ptf/measures/representation_arms.py on tiny saved models (2-layer BERT and Llama, hidden 32):
an untouched backbone keeps CKA 1 and loses nothing, a perturbed or LoRA-merged one drifts,
scratch is not applicable, a model is probed on the OTHER tasks only (train -> validation, the
test split never touched), bits per byte from the forgetting stage's numbers, mean ± std per arm."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ptf.common.cli import StageError
from ptf.data.tasks import DataCfg, load_task
from ptf.measures import representation_arms as ra
from tests.finetune_fixtures import make_root

LABELS = {"movies": ["negative", "positive"], "source": ["sport", "money", "science"]}
DATA = DataCfg(max_train=48, max_eval=24, max_length=16, seed=0)
SETTINGS = ra.Settings(batch_size=8, max_iter=50)


def save(pre: Path, dest: Path, strategy: str, task: str = "movies", noise: float = 0.0,
         scratch: bool = False, lora_targets: list[str] | None = None, seed: int = 0) -> Path:
    """A classifier on the pretrained backbone in the finetune stage's layout."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from ptf.models.artifacts import save_classifier
    from ptf.models.strategies import labels_kwargs

    names = LABELS[task]
    torch.manual_seed(seed)
    if scratch:
        model = AutoModelForSequenceClassification.from_config(
            AutoConfig.from_pretrained(pre, **labels_kwargs(names)))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(pre, **labels_kwargs(names))
    if noise:
        with torch.no_grad():
            for p in model.base_model.parameters():
                p.add_(noise * torch.randn_like(p))
    if lora_targets:
        from peft import LoraConfig, TaskType, get_peft_model
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4,
                                                 target_modules=lora_targets))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    tok = AutoTokenizer.from_pretrained(pre)
    meta = {"strategy": strategy, "task": task, "label_names": names, "pooling": "last",
            "pretrained_dir": str(pre), "max_length": 16, "padding_side": "right", "seed": seed,
            "lr": 1e-3}
    save_classifier(model, tok, dest, meta, None, None)
    return dest


def setup(root: Path, arch: str):
    make_root(root, arch)
    pre = root / "data" / "models" / "pretrained"
    ft = root / "data" / "models" / "finetuned"
    targets = ["query", "value"] if arch == "bert" else ["q_proj", "v_proj"]
    jobs = [
        ra.Job("movies", "linear_probe", "seed0", save(pre, ft / "movies/linear_probe/seed0", "linear_probe")),
        ra.Job("movies", "full", "seed0", save(pre, ft / "movies/full/seed0", "full", noise=0.3, seed=1)),
        ra.Job("movies", "full", "seed1", save(pre, ft / "movies/full/seed1", "full", noise=0.3, seed=2)),
        ra.Job("movies", "lora", "seed0", save(pre, ft / "movies/lora/seed0", "lora", lora_targets=targets, seed=3)),
        ra.Job("source", "full", "seed0", save(pre, ft / "source/full/seed0", "full", task="source", noise=0.3, seed=4)),
        ra.Job("movies", "scratch", "seed0", save(pre, ft / "movies/scratch/seed0", "scratch", scratch=True, seed=5)),
    ]
    return pre, jobs


def held_out(tok, n: int = 6, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    specials = set(tok.all_special_ids)
    ok = [i for i in range(len(tok)) if i not in specials]
    return torch.tensor(ok)[torch.randint(0, len(ok), (n, length), generator=g)]


@pytest.fixture(scope="module", params=["bert", "llama"])
def measured(request, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp(request.param)
    pre, jobs = setup(root, request.param)
    tok = AutoTokenizer.from_pretrained(pre)
    probes = [ra.ProbeSet.from_task(load_task(root, t, tok, DATA)) for t in ("movies", "source")]
    seen = []
    ref, recs = ra.measure_models(jobs, pre, held_out(tok), probes, tok.pad_token_id, SETTINGS,
                                  progress=seen.append)
    return {"root": root, "pre": pre, "jobs": jobs, "ref": ref, "recs": recs, "seen": seen,
            "probes": probes, "tok": tok}


def test_untouched_backbone_keeps_everything(measured):
    r = measured["recs"][measured["jobs"][0]]
    assert r["applicable"] and len(r["cka"]) == 3 == measured["ref"]["layers"]   # embeddings + 2 layers
    assert r["cka"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-9)
    assert r["probe"]["source"]["lost"] == 0.0 and r["probe_lost_mean"] == 0.0
    assert r["probe"]["source"]["before"] == measured["ref"]["probe_before"]["source"]


def test_moved_backbones_drift_and_probes_are_the_other_tasks(measured):
    recs, jobs = measured["recs"], measured["jobs"]
    for job in jobs[1:5]:
        r = recs[job]
        assert r["cka_last"] < (1 - 1e-6 if job.strategy == "lora" else 0.999), job
        assert r["cka_min"] == min(r["cka"]) and 0.0 <= r["cka_min"] <= 1.0
        assert set(r["probe"]) == ({"source"} if job.task == "movies" else {"movies"})
        p = next(iter(r["probe"].values()))
        assert p["lost"] == pytest.approx(p["before"] - p["after"]) and 0.0 <= p["after"] <= 1.0
    # LoRA leaves the embeddings alone (it adapts attention q/v only)
    assert recs[jobs[3]]["cka"][0] == pytest.approx(1.0, abs=1e-9)
    assert measured["seen"] == jobs


def test_scratch_is_not_applicable(measured):
    r = measured["recs"][measured["jobs"][5]]
    assert r == {"applicable": False, "note": ra.NOT_FROM_PRETRAINED}


def test_probe_reads_train_and_validation_only(measured):
    from ptf.data.tasks import Split, TaskData

    data = load_task(measured["root"], "movies", measured["tok"], DATA)
    no_test = TaskData(data.name, data.label_names, data.train, data.validation, test=None)
    p = ra.ProbeSet.from_task(no_test)
    assert (p.train_y, p.val_y) == (data.train.labels, data.validation.labels)
    with pytest.raises(StageError, match="movies: the probe needs non-empty train and validation"):
        ra.ProbeSet.from_task(TaskData("movies", data.label_names, data.train, Split([], []), None))


def test_arm_table_mean_and_std_over_seeds(measured):
    t = ra.arm_table(measured["recs"])
    full = t["movies"]["full"]
    a, b = (measured["recs"][j]["cka_last"] for j in measured["jobs"][1:3])
    assert full["mean_std"]["cka_last"] == pytest.approx(
        {"mean": (a + b) / 2, "std": abs(a - b) / math.sqrt(2), "n": 2})
    assert full["mean_std"]["cka.layer0"]["n"] == 2 and "probe_lost.source" in full["mean_std"]
    assert set(full["seeds"]) == {"seed0", "seed1"} and full["applicable"]
    assert t["movies"]["scratch"]["applicable"] is False and t["movies"]["scratch"]["mean_std"] == {}
    assert set(t) == {"movies", "source"}


def test_deterministic(measured):
    tok = measured["tok"]
    _, again = ra.measure_models(measured["jobs"][1:2], measured["pre"], held_out(tok),
                                 measured["probes"], tok.pad_token_id, SETTINGS)
    assert again[measured["jobs"][1]] == measured["recs"][measured["jobs"][1]]


def test_lm_head_of(measured):
    arch = "BertForMaskedLM" if "bert" in measured["root"].name else "LlamaForCausalLM"
    assert ra.lm_head_of(measured["pre"]) == arch


def test_lm_head_of_a_bare_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(tmp_path)
    assert ra.lm_head_of(tmp_path) is None


# ----------------------------------------------------------------------------- bits per byte
def test_lm_bits_hand_case():
    jobs = [ra.Job("movies", "full", "seed0", Path("x")), ra.Job("movies", "scratch", "seed0", Path("y"))]
    fg = {"tasks": {"movies": {"full": {"seeds": {"seed0": {"loss_pretrained": 2.0, "loss_finetuned": 2.5}}}}}}
    # 2 nats/token at 1 token per 4 bytes: 2 / (4 ln 2) bits/byte
    out = ra.lm_bits(fg, jobs, n_tokens=100, n_bytes=400)
    assert out[jobs[0]] == pytest.approx({
        "loss_pretrained": 2.0, "loss_finetuned": 2.5, "delta_loss": 0.5,
        "bpb_pretrained": 0.5 / math.log(2), "bpb_finetuned": 0.625 / math.log(2),
        "delta_bpb": 0.125 / math.log(2)})
    assert out[jobs[1]] == {k: None for k in ra.LM_KEYS}
    with pytest.raises(StageError, match=r"forgetting.json: no held-out LM loss of movies/full seed1"):
        ra.lm_bits(fg, [ra.Job("movies", "full", "seed1", Path("z"))], 100, 400)
    with pytest.raises(StageError, match="no `tasks` table"):
        ra.lm_bits({}, jobs, 100, 400)


def test_tokens_per_byte_leaves_special_tokens_out(measured):
    tok = measured["tok"]
    words = "good bad plot"
    rows = [tok(words)["input_ids"]]
    n_tok, n_bytes = ra.tokens_per_byte(tok, rows)
    assert n_bytes == len(tok.decode(rows[0], skip_special_tokens=True).encode())
    assert n_tok == len([t for t in rows[0] if t not in set(tok.all_special_ids)]) >= 3
    assert np.isfinite(n_tok / n_bytes)
