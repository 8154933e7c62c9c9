"""ptf.models.backbones: the seed keys and the per-backbone reference (no torch)."""
import json

import pytest

from ptf.models.backbones import seed_key, seed_number


def test_seed_keys_round_trip():
    assert seed_key(3) == "seed3" and seed_key("12") == "seed12"
    assert seed_number("seed3") == 3 and seed_number("3") == 3 and seed_number(5) == 5
    assert all(seed_number(seed_key(k)) == k for k in range(20))


@pytest.mark.parametrize("bad", ["s0", "seed", "seedx", "seed-1", "", "3seed", "seed 3"])
def test_malformed_seed_key_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="not a seed key"):
        seed_number(bad)


def test_per_backbone_makes_each_reference_once(tmp_path):
    """Seed k starts from backbone k mod N; `make` runs once per backbone, whatever the seeds."""
    from ptf.models.backbones import per_backbone

    (tmp_path / "backbones.json").write_text(json.dumps({"seeds": [0, 7]}))
    made = []
    ref_of = per_backbone(tmp_path, lambda d: made.append(d) or f"ref of {d.name}")
    assert [ref_of(k) for k in ("seed0", "seed1", 2, "3")] == [f"ref of {tmp_path.name}", "ref of 7"] * 2
    assert made == [tmp_path, tmp_path / "backbones" / "7"]
    one = per_backbone(tmp_path / "backbones" / "7", lambda d: d)      # no backbones.json: one backbone
    assert one("seed5") == tmp_path / "backbones" / "7"


def test_context_for_seed_indexes_the_backbones_read_once(tmp_path, monkeypatch):
    """`Context.for_seed` picks backbone seed mod N from the directories `create` stored: it reads
    no backbones.json (there is none here); one backbone (no `backbones`): the context itself."""
    from ptf.training import finetuning

    monkeypatch.setattr(finetuning, "backbone_dirs", None)     # any read would fail
    first, other = tmp_path / "pretrained", tmp_path / "pretrained/backbones/7"
    ctx = finetuning.Context(tmp_path, None, first, None, False, (first, other))
    assert ctx.for_seed(4) is ctx and ctx.for_seed(5).pretrained == other
    assert ctx.for_seed(5).for_seed(2).pretrained == first and ctx.for_seed(5)._fisher is ctx._fisher
    one = finetuning.Context(tmp_path, None, first, None, False)
    assert one.for_seed(3) is one
