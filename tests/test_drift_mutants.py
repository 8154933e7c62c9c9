"""The held-out LM loss behind every drift number (ptf/measures/drift.py), worked out by hand:
which tokens are scored (pads and masked positions), the blocks read from the shards, the
per-block sums of the pretrained LM, and the errors for a workspace without those blocks. What
tests/test_forgetting.py leaves open (it compares models with each other, so a rule applied the
same wrong way to both passes there), found by `make mutate GROUPS=forgetting`; tiny models, a
few seconds in all, so they run first in the group."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ptf.common.cli import StageError
from ptf.measures import drift as dr
from tests.finetune_fixtures import make_pretrained, make_tokenizer


class Tok:
    """The tokenizer attributes `eval_targets` reads."""

    def __init__(self, pad=0, eos=3, bos=2, mask=None, special=(0, 1, 2, 3), size=40):
        self.pad_token_id, self.eos_token_id, self.bos_token_id = pad, eos, bos
        self.mask_token_id, self.all_special_ids, self.size = mask, list(special), size

    def __len__(self):
        return self.size


def write_shards(root: Path, blocks: list[list[int]]) -> None:
    from ptf.data.shards import write_shards as write

    out = root / "data" / "shards" / "validation"
    out.mkdir(parents=True)
    entry = write(blocks, out, block_size=len(blocks[0]), shard_blocks=2)
    (root / "data" / "shards" / "manifest.json").write_text(json.dumps({"validation": entry}))


def by_hand(pre: Path, blocks: list[list[int]], pad: int) -> tuple[list[float], list[int]]:
    """Per-block summed next-token NLL of the saved LM, pads not scored, one block at a time."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(pre).eval()
    sums, counts = [], []
    with torch.no_grad():
        for b in blocks:
            logp = torch.log_softmax(lm(input_ids=torch.tensor([b])).logits[0].double(), -1)
            scored = [t for t in range(1, len(b)) if b[t] != pad]
            sums.append(-sum(float(logp[t - 1, b[t]]) for t in scored))
            counts.append(len(scored))
    return sums, counts


# ---------------------------------------------------------------- eval_targets

def test_clm_labels_hide_pads_unless_the_pad_is_the_eos_or_bos():
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 8, 9]])
    inputs, labels = dr.eval_targets(ids, "clm", Tok(pad=0), 0.5, 0)
    assert torch.equal(inputs, ids)
    assert labels.tolist() == [[5, 6, -100, -100], [7, -100, 8, 9]]
    # a pad that doubles as eos (3) or bos (2) is a real token to predict: nothing hidden
    for pad, shared in ((3, dict(pad=3, eos=3)), (2, dict(pad=2, bos=2))):
        with_pad = torch.tensor([[5, pad, 6, pad]])
        assert dr.eval_targets(with_pad, "clm", Tok(**shared), 0.5, 0)[1].tolist() == with_pad.tolist()
    assert dr.eval_targets(ids, "clm", Tok(pad=None), 0.5, 0)[1].tolist() == ids.tolist()
    assert dr.eval_targets(ids, "clm", Tok(pad=0), 0.5, 0)[1].dtype == torch.int64


def test_mlm_targets_never_mask_special_tokens_and_follow_the_rate():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (64, 32), generator=g)          # ids 0..3 special, ~10 % of them
    inputs, labels = dr.eval_targets(ids, "mlm", Tok(mask=3), 0.5, 11)
    special = ids < 4
    assert (labels[special] == -100).all() and torch.equal(inputs[special], ids[special])
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])
    rate = chosen.sum().item() / (~special).sum().item()
    assert 0.45 < rate < 0.55                                    # the mask_prob given, not a default
    assert (inputs[chosen] == 3).float().mean().item() > 0.7     # 80 % of the chosen become the mask
    assert not torch.equal(labels, dr.eval_targets(ids, "mlm", Tok(mask=3), 0.5, 12)[1])
    with pytest.raises(StageError) as e:
        dr.eval_targets(ids, "mlm", Tok(mask=None), 0.5, 0)
    assert str(e.value) == "masked-LM checkpoint whose tokenizer has no mask token"


# ---------------------------------------------------------------- load_eval_blocks

def test_load_eval_blocks_reads_the_selected_blocks_as_int64(tmp_path):
    blocks = [[4 + i, 5 + i, 6 + i] for i in range(5)]
    write_shards(tmp_path, blocks)
    ids, idx = dr.load_eval_blocks(tmp_path, 3)
    assert idx == [0, 1, 3] and ids.dtype == torch.int64
    assert ids.tolist() == [blocks[0], blocks[1], blocks[3]]
    one = tmp_path / "one"
    write_shards(one, [[4, 5, 6]])
    assert dr.load_eval_blocks(one, 3)[0].tolist() == [[4, 5, 6]]    # a single block is enough


def test_load_eval_blocks_names_what_is_missing(tmp_path):
    manifest = tmp_path / "data" / "shards" / "manifest.json"
    with pytest.raises(StageError) as e:
        dr.load_eval_blocks(tmp_path, 3)
    assert str(e.value) == f"{manifest}: missing; run `dvc repro tokenize`"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"train": {}}))
    with pytest.raises(StageError) as e:
        dr.load_eval_blocks(tmp_path, 3)
    assert str(e.value) == f"{manifest}: no 'validation' entry"
    empty = tmp_path / "empty"
    (empty / "data" / "shards" / "validation").mkdir(parents=True)
    from ptf.data.shards import write_shards as write
    entry = write([], empty / "data" / "shards" / "validation", block_size=3, shard_blocks=2)
    (empty / "data" / "shards" / "manifest.json").write_text(json.dumps({"validation": entry}))
    with pytest.raises(StageError) as e:
        dr.load_eval_blocks(empty, 3)
    # an empty split is refused by the shard reader already (drift's own "no blocks" check is a
    # second line that write_shards, which never writes an empty shard, cannot reach)
    assert str(e.value) == f"{empty / 'data' / 'shards' / 'validation'}: the manifest lists no shards"


# ---------------------------------------------------------------- EvalSet

@pytest.fixture(scope="module")
def clm(tmp_path_factory):
    """A tiny causal LM and 6 validation blocks: block 3 is all pads after its first token (nothing
    to predict), block 5's one target is its second token."""
    root = tmp_path_factory.mktemp("drift")
    tok = make_tokenizer()
    pre = make_pretrained(root / "pretrained", tok)
    pad = tok.pad_token_id
    blocks = [[10, 11, 12, 13, 14, 15], [20, 21, pad, pad, 22, 23], [30, 31, 32, 33, 34, 35],
              [40, pad, pad, pad, pad, pad], [50, 51, 52, 53, pad, pad], [60, 61, pad, pad, pad, pad]]
    write_shards(root, blocks)
    return root, pre, blocks, pad


def test_eval_set_scores_every_kept_block_by_hand(clm):
    root, pre, blocks, pad = clm
    es = dr.EvalSet.build(root, pre, max_blocks=6, batch_size=2, mask_prob=0.15, mask_seed=0)
    # block 3 has no token to predict after position 0 (all pads): left out; block 5 kept
    kept = [blocks[i] for i in (0, 1, 2, 4, 5)]
    assert es.objective == "clm" and es.indices == [0, 1, 2, 3, 4, 5] and es.batch_size == 2
    assert es.inputs.tolist() == kept
    assert es.labels.tolist() == [[t if t != pad else -100 for t in b] for b in kept]
    sums, counts = by_hand(pre, kept, pad)
    assert es.counts.tolist() == counts == [5, 3, 5, 3, 1]
    assert es.base_sums.tolist() == pytest.approx(sums, rel=1e-5)
    # a classifier whose backbone is the pretrained one (a linear probe) scores the same sums
    from tests.test_forgetting import save_classifier
    save_classifier(pre, root / "probe", "linear_probe", seed=1)
    assert es.measure(root / "probe").tolist() == pytest.approx(sums, rel=1e-5)


def test_eval_set_without_a_target_token_is_refused(tmp_path):
    tok = make_tokenizer()
    pre = make_pretrained(tmp_path / "pretrained", tok)
    pad = tok.pad_token_id
    write_shards(tmp_path, [[10, pad, pad], [11, pad, pad]])
    with pytest.raises(StageError) as e:
        dr.EvalSet.build(tmp_path, pre, max_blocks=2, batch_size=2, mask_prob=0.15, mask_seed=0)
    assert str(e.value) == "no validation block has a target token to score"


def test_eval_set_of_a_masked_lm_uses_the_seeded_masking(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from tests.finetune_fixtures import make_wordpiece_tokenizer

    tok = make_wordpiece_tokenizer()
    pre = tmp_path / "pretrained"
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=32, pad_token_id=tok.pad_token_id)
                    ).save_pretrained(pre)
    tok.save_pretrained(pre)
    # short blocks, so that some have their only masked token at position 0 (kept: a masked LM has
    # no shift) and some have none (left out)
    blocks = torch.randint(5, len(tok), (12, 3), generator=torch.Generator().manual_seed(2)).tolist()
    write_shards(tmp_path, blocks)
    es = dr.EvalSet.build(tmp_path, pre, max_blocks=12, batch_size=3, mask_prob=0.4, mask_seed=5)
    inputs, labels = dr.eval_targets(torch.tensor(blocks), "mlm", AutoTokenizer.from_pretrained(pre), 0.4, 5)
    keep = (labels != -100).any(1)
    masked = labels != -100
    assert (masked[:, 0] & ~masked[:, 1:].any(1)).any() and not keep.all()   # both cases occur
    assert es.objective == "mlm"
    assert torch.equal(es.inputs, inputs[keep]) and torch.equal(es.labels, labels[keep])
    assert es.counts.tolist() == (labels[keep] != -100).sum(1).tolist()
    # by hand: the summed NLL of the masked positions only (no shift)
    lm = BertForMaskedLM.from_pretrained(pre).eval()
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=es.inputs).logits.double(), -1)
    want = [-sum(float(logp[i, t, int(es.labels[i, t])]) for t in range(3) if es.labels[i, t] != -100)
            for i in range(es.inputs.shape[0])]
    assert es.base_sums.tolist() == pytest.approx(want, rel=1e-5)
    from tests.test_forgetting import save_classifier
    save_classifier(pre, tmp_path / "probe", "linear_probe", seed=1)
    assert es.measure(tmp_path / "probe").tolist() == pytest.approx(want, rel=1e-5)
