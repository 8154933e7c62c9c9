"""ptf/common/config.py: strict sections, one message naming section.key, the value and the expectation."""
import pytest
from pydantic import Field

from ptf.common.config import ConfigError, StrictModel, load_section, parse_section


class Inner(StrictModel):
    rate: float = Field(gt=0, le=1)


class Cfg(StrictModel):
    steps: int = Field(ge=1)
    name: str
    inner: Inner


GOOD = {"steps": 3, "name": "x", "inner": {"rate": 0.5}}


def test_valid_section_builds_a_frozen_model():
    cfg = parse_section("s", GOOD, Cfg)
    assert cfg.inner.rate == 0.5
    with pytest.raises(Exception):
        cfg.steps = 4


@pytest.mark.parametrize("raw, needles", [
    ({**GOOD, "stepz": 3}, ["s.stepz", "unknown key"]),
    ({"name": "x", "inner": {"rate": 0.5}}, ["s.steps", "missing"]),
    ({**GOOD, "steps": "3"}, ["s.steps", "'3'", "integer"]),
    ({**GOOD, "steps": 0}, ["s.steps", "0", "greater than or equal to 1"]),
    ({**GOOD, "inner": {"rate": 1.5}}, ["s.inner.rate", "1.5", "less than or equal to 1"]),
])
def test_each_kind_of_bad_value_names_key_value_and_expectation(raw, needles):
    with pytest.raises(ConfigError) as e:
        parse_section("s", raw, Cfg)
    for needle in needles:
        assert needle in str(e.value)


def test_missing_section_and_missing_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("other: {}\n")
    with pytest.raises(ConfigError, match="s: missing section"):
        load_section("s", Cfg, p)
    with pytest.raises(ConfigError, match="not found"):
        load_section("s", Cfg, tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("s: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_section("s", Cfg, p)


def test_params_rewritten_by_dvc_exp_run_keep_their_strings(tmp_path):
    """`dvc exp run -S` writes YAML 1.2, where `no` is a string; read as YAML 1.1 it was False."""
    class Precision(StrictModel):
        mixed_precision: str
        lr: float

    p = tmp_path / "params.yaml"
    p.write_text("s:\n  mixed_precision: no\n  lr: 1e-4\n")
    cfg = load_section("s", Precision, p)
    assert cfg.mixed_precision == "no" and cfg.lr == 1e-4
