"""Saved fine-tuned models used by plain Hugging Face clients (ptf.models.artifacts).

For every strategy of the registry and of configs/smoke.yaml, on each architecture the pretrain
stage builds (Llama, BERT; pooling `last`, the only one their HF heads implement) and on
ModernBERT with `mean` (its HF head implements it; the strategies of issue 14, dora, adapter and
osf, on Llama only, to keep the suite short): the saved directory loaded with the bare
`AutoModelForSequenceClassification`, with `pipeline("text-classification")` and, for peft
adapters, with `AutoPeftModelForSequenceClassification`; the bottleneck adapter (`adapter`) with
`trust_remote_code=True`, its documented way, as no library carries it: predicts exactly the test predictions
the pipeline recorded, text by text. Also: the card's front matter, the saved tokenizer, and one
clear error for an incomplete or unknown model directory."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from finetune_fixtures import cfg_of, make_root
from test_registry import params
from ptf.common import paths
from ptf.common.cli import StageError
from ptf.data.tasks import load_task
from ptf.models import strategies as S
from ptf.models.artifacts import load_classifier, read_meta
from ptf.common.config import read_params
from stages.finetune import Config, run

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 6          # short enough that most fixture texts are truncated
NEW = ("dora", "adapter", "osf")          # issue 14: on one architecture only (suite time)
OLD = tuple(s for s in S.STRATEGIES if s not in NEW)
ARCHS = {               # arch -> (pooling, strategies)
    "llama": ("last", S.STRATEGIES),
    "bert": ("last", OLD),
    "modernbert": ("mean", OLD),
}
TRANSFORMERS_LOADS_ADAPTER = ("lora", "dora")   # transformers' own PEFT integration loads these
REMOTE_CODE = ("adapter",)      # the one strategy whose documented load is trust_remote_code=True


def split_texts(root: Path, cfg) -> tuple[list[str], list[int]]:
    """The raw test texts in the order of the pipeline's test split (and its token ids), taken
    from the texts the task loader tokenizes."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / paths.PRETRAINED)
    seen: list[list[str]] = []

    class Recording:
        pad_token_id = tok.pad_token_id

        def __call__(self, texts, **kw):
            seen.append(list(texts))
            return tok(texts, **kw)

    data = load_task(root, "movies", Recording(), cfg.data)
    assert [len(t) for t in seen] == [len(data.train), len(data.validation), len(data.test)]
    return seen[2], data.test.ids


def train_all(root: Path, cfg, strategies) -> dict[str, dict]:
    return {s: run(cfg, "movies", s, root=root) for s in strategies}


@pytest.fixture(scope="module", params=list(ARCHS))
def trained(request, tmp_path_factory):
    """Every strategy of `ARCHS[arch]`, one seed. BERT runs from its root with `root="."`, as
    DVC runs the stage, so its adapters name their base by a relative path."""
    arch = request.param
    pooling, strategies = ARCHS[arch]
    root = make_root(tmp_path_factory.mktemp(arch), arch)
    p = params(arch, pooling=pooling)
    p["data"]["max_length"] = MAX_LENGTH
    cfg = cfg_of(p, Config)
    mp = pytest.MonkeyPatch()
    if arch == "bert":
        mp.chdir(root)
        runs = train_all(Path("."), cfg, strategies)
    else:
        runs = train_all(root, cfg, strategies)
    texts, ids = split_texts(root, cfg)
    yield {"arch": arch, "root": root, "runs": runs, "texts": texts, "ids": ids}
    mp.undo()


def recorded(root: Path, strategy: str) -> list[int]:
    m = json.loads((root / f"data/metrics/finetune/movies/{strategy}.json").read_text())
    return m["seeds"][0]["test_predictions"]


def client_predictions(model_dir: Path, texts: list[str], peft: bool, lora: bool,
                       remote_code: bool = False) -> dict[str, list[int]]:
    """What clients that know nothing of this project predict, one text per call. `remote_code`:
    the bottleneck adapter, whose model class ships in the directory: loaded, as its card says,
    with `trust_remote_code=True` (the one exception)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}

    def one_by_one(model) -> list[int]:
        model.eval()
        with torch.no_grad():
            return [int(model(**tok([t], truncation=True, return_tensors="pt")).logits.argmax(-1))
                    for t in texts]

    def by_pipeline(**kw) -> list[int]:
        clf = pipeline("text-classification", truncation=True, **kw)
        label2id = clf.model.config.label2id
        return [label2id[r["label"]] for r in clf(texts)]

    if peft:
        from peft import AutoPeftModelForSequenceClassification
        model = AutoPeftModelForSequenceClassification.from_pretrained(model_dir)
        out["AutoPeftModelForSequenceClassification"] = one_by_one(model)
        out["pipeline(peft model)"] = by_pipeline(model=model, tokenizer=tok)
    kw = {"trust_remote_code": True} if remote_code else {}
    if not peft or lora:      # transformers' own PEFT integration loads LoRA, not prompt tuning
        out["AutoModelForSequenceClassification"] = one_by_one(
            AutoModelForSequenceClassification.from_pretrained(model_dir, **kw))
        out["pipeline(dir)"] = by_pipeline(model=str(model_dir), **kw)
    return out


def test_every_client_agrees_with_the_recorded_test_predictions(trained):
    root, texts = trained["root"], trained["texts"]
    disagreements = {}
    for strategy in trained["runs"]:
        entry = S.REGISTRY[strategy]
        d = root / f"data/models/finetuned/movies/{strategy}/seed0"
        want = recorded(root, strategy)
        assert len(want) == len(texts) == 24
        dirs = [(d, entry.peft is not None)] + ([(d / "merged", False)] if entry.merge else [])
        for model_dir, peft in dirs:
            got = client_predictions(model_dir, texts, peft,
                                     strategy in TRANSFORMERS_LOADS_ADAPTER,
                                     strategy in REMOTE_CODE and not peft)
            assert got, model_dir
            for client, pred in got.items():
                if pred != want:
                    disagreements[f"{model_dir.relative_to(root)} {client}"] = sum(
                        p != w for p, w in zip(pred, want))
    assert not disagreements, f"{trained['arch']}: texts predicted differently: {disagreements}"


def test_prompt_tuning_is_not_silently_loaded_without_peft(trained):
    from transformers import AutoModelForSequenceClassification
    d = trained["root"] / "data/models/finetuned/movies/prompt_tuning/seed0"
    with pytest.raises(ValueError, match="prompt learning"):
        AutoModelForSequenceClassification.from_pretrained(d)


def test_saved_tokenizer_truncates_and_pads_as_the_pipeline_did(trained):
    """`model_max_length` is `finetune.data.max_length` (so `truncation=True` cuts where the
    pipeline cut); the padding side is the one it trained with. The transformers 5
    text-classification pipeline does not truncate unless asked (hence the card's
    `truncation=True`)."""
    from transformers import AutoTokenizer, pipeline

    root = trained["root"]
    d = root / "data/models/finetuned/movies/full/seed0"
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.model_max_length == MAX_LENGTH
    assert tok.padding_side == ("left" if trained["arch"] == "llama" else "right")
    ids = [tok(t, truncation=True)["input_ids"] for t in trained["texts"]]
    assert ids == [x or [tok.pad_token_id] for x in trained["ids"]]
    long = max(trained["texts"], key=lambda t: len(tok(t)["input_ids"]))
    assert len(tok(long)["input_ids"]) > MAX_LENGTH
    clf = pipeline("text-classification", model=str(d))
    assert clf.preprocess(long)["input_ids"].shape[1] > MAX_LENGTH            # default: whole text
    assert clf.preprocess(long, truncation=True)["input_ids"].shape[1] == MAX_LENGTH


def test_model_card_has_the_hub_front_matter(trained):
    from huggingface_hub import ModelCard

    root = trained["root"]
    for strategy in ("full", "lora", "scratch"):
        if strategy not in trained["runs"]:
            continue
        d = root / f"data/models/finetuned/movies/{strategy}/seed0"
        card = ModelCard.load(d / "README.md")
        data = card.data
        peft = S.REGISTRY[strategy].peft is not None
        assert data.pipeline_tag == "text-classification"
        assert data.library_name == ("peft" if peft else "transformers")
        assert data.base_model is None          # a local directory is no Hub id
        assert str(trained["root"]) in card.text or "data/models/pretrained" in card.text
        assert strategy in data.tags and "movies" in data.tags
        seed0 = trained["runs"][strategy]["seeds"][0]
        results = {(r.metric_type, r.dataset_split): r for r in data.eval_results}
        assert results[("accuracy", "test")].metric_value == seed0["test_accuracy"]
        assert "(seed 0)" in results[("accuracy", "test")].metric_name
        assert results[("f1", "test")].metric_value == seed0["test_macro_f1"]
        body = card.text
        assert "| 0 | negative |" in body and "| 1 | positive |" in body
        assert "truncation=True" in body and f"finetune.arms.{strategy}" in body
        assert "trust_remote_code" not in body
        if strategy == "lora":
            merged = ModelCard.load(d / "merged" / "README.md").data
            assert merged.library_name == "transformers" and "merged-lora" in merged.tags


def test_model_card_names_a_hub_base_model_and_none_for_scratch():
    from huggingface_hub import ModelCard

    from ptf.models.card import model_card
    meta = {"strategy": "lora", "task": "movies", "label_names": ["negative", "positive"],
            "pooling": "last", "peft": True, "artifact": "adapter", "pretrained_dir": "org/tiny-lm",
            "max_length": 8, "padding_side": "left", "seed": 3}
    results = {"val_accuracy": 0.5, "val_macro_f1": 0.4, "test_accuracy": 0.75,
               "test_macro_f1": 0.7, "n_validation": 4, "n_test": 4}
    card = ModelCard(model_card(meta, S.REGISTRY["lora"], results, {"lr": 0.1}, Path("x/seed3")))
    assert card.data.base_model == "org/tiny-lm" and card.data.library_name == "peft"
    assert {r.metric_name for r in card.data.eval_results} >= {"Test accuracy (seed 3)"}
    scratch = ModelCard(model_card({**meta, "strategy": "scratch", "peft": False, "artifact": "model"},
                                   S.REGISTRY["scratch"], results, {}, Path("x")))
    assert scratch.data.base_model is None and scratch.data.library_name == "transformers"


def test_save_classifier_alone_writes_a_complete_directory(tmp_path):
    """What test fixtures and other callers need: a model, its tokenizer and the meta fields
    give a directory every loader accepts (results and training parameters are optional)."""
    from huggingface_hub import ModelCard

    from finetune_fixtures import make_pretrained, make_tokenizer
    from ptf.models.artifacts import save_classifier
    tok = make_tokenizer()
    pre = make_pretrained(tmp_path / "pre", tok)
    clf = S.build_classifier(pre, ["negative", "positive"], "full", S.Arm(lrs=[1.0], weight_decay=0.0),
                             seed=0)
    d = tmp_path / "model"
    save_classifier(clf, tok, d, {"strategy": "full", "task": "movies", "pooling": "last",
                                  "label_names": ["negative", "positive"], "pretrained_dir": str(pre),
                                  "max_length": 8, "padding_side": "left"})
    assert read_meta(d)["artifact"] == "model"
    assert type(load_classifier(d)).__name__ == "LlamaForSequenceClassification"
    assert ModelCard.load(d / "README.md").data.pipeline_tag == "text-classification"
    assert "Not recorded." in (d / "README.md").read_text()


# ---------------------------------------------------------------- the smoke run's strategies

def test_smoke_config_strategies_agree_with_plain_clients(tmp_path):
    """configs/smoke.yaml's finetune section as it is (its pooling, lengths, arms), on the
    Llama fixture: every strategy it runs is faithful in plain clients."""
    smoke = read_params(REPO / "configs" / "smoke.yaml")["finetune"]
    cfg = cfg_of(smoke, Config)
    root = make_root(tmp_path)
    strategies = [s for t, s in cfg.declared_arms() if t == "movies"]
    train_all(root, cfg, strategies)
    texts, _ = split_texts(root, cfg)
    for strategy in strategies:
        d = root / f"data/models/finetuned/movies/{strategy}/seed0"
        peft = S.REGISTRY[strategy].peft is not None
        for client, pred in client_predictions(d, texts, peft, strategy in TRANSFORMERS_LOADS_ADAPTER,
                                               strategy in REMOTE_CODE).items():
            assert pred == recorded(root, strategy), (strategy, client)


# ---------------------------------------------------------------- bad input

@pytest.fixture()
def model_copy(trained, tmp_path):
    """A copy of a saved model at .../finetuned/movies/full/seed0 under tmp_path."""
    src = trained["root"] / "data/models/finetuned/movies/full/seed0"
    d = tmp_path / "data/models/finetuned/movies/full/seed0"
    shutil.copytree(src, d)
    return d


REMEDY = r"dvc checkout .*data/models/finetuned/movies/full` or rebuild it with " \
         r"`dvc repro -f finetune@movies-full`"


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "finetune_meta.json").unlink(), r"finetune_meta\.json: missing"),
    (lambda d: (d / "README.md").unlink(), r"README\.md: missing"),
    (lambda d: _edit_meta(d, strategy="dropout"), r"finetune_meta\.json: unknown strategy 'dropout'"),
    (lambda d: _edit_meta(d, pooling="max"), r"finetune_meta\.json: unknown pooling 'max'"),
    (lambda d: _edit_meta(d, label_names=None), r"finetune_meta\.json: invalid \(label_names"),
    (lambda d: (d / "finetune_meta.json").write_text("{"), r"finetune_meta\.json: invalid"),
])
def test_incomplete_or_unknown_model_dir_is_one_error_with_the_remedy(model_copy, damage, match):
    damage(model_copy)
    for load in (read_meta, load_classifier):
        with pytest.raises(StageError, match=match + ".*" + REMEDY):
            load(model_copy)


def test_adapter_without_its_base_is_named(trained, tmp_path):
    src = trained["root"] / "data/models/finetuned/movies/lora/seed0"
    d = tmp_path / "data/models/finetuned/movies/lora/seed0"
    shutil.copytree(src, d)
    shutil.rmtree(d / "base")
    with pytest.raises(StageError, match=r"seed0/base: no \*\.safetensors weights.*"
                                         r"dvc repro -f finetune@movies-lora"):
        load_classifier(d)


def _edit_meta(d: Path, **change) -> None:
    f = d / "finetune_meta.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **change}))


# ---------------------------------------------------------------- issue 14's strategies

def test_forgetting_sees_the_adapted_backbone_of_the_new_strategies(trained):
    """`load_backbone_as_lm` (what the forgetting stage scores): for dora / osf the merged
    backbone, for the bottleneck adapter the pretrained LM with the trained adapters inserted
    (`load_adapters(pretrained_lm, dir, head=False)`); either way the classifier's own backbone,
    which fine-tuning moved away from the pretrained one."""
    from ptf.models.artifacts import load_backbone_as_lm
    from ptf.models.lm import pretrained_lm

    if trained["arch"] != "llama":
        pytest.skip("issue 14's strategies run on Llama only")
    root = trained["root"]
    pre = root / paths.PRETRAINED
    x = torch.tensor([max(trained["ids"], key=len)])
    with torch.no_grad():
        before = pretrained_lm(pre).model(x).last_hidden_state
        for strategy in NEW:
            d = root / f"data/models/finetuned/movies/{strategy}/seed0"
            lm = load_backbone_as_lm(d, pre)
            clf = S.unwrap_hf(load_classifier(d, merge=True)).eval()
            got, want = lm.model(x).last_hidden_state, clf.model(x).last_hidden_state
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=strategy)
            assert not torch.allclose(got, before), strategy
            card = (d / "README.md").read_text()
            assert ("trust_remote_code=True" in card) == (strategy in REMOTE_CODE), strategy
            assert f"finetune.arms.{strategy}" in card
