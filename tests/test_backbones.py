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
