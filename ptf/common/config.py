"""Typed, strict loading of one `params.yaml` section per stage.

In:  the path of `params.yaml` (default: the one in the working directory), a section name,
     and the pydantic model of that section.
Out: a validated, frozen config object, or `ConfigError` whose single message names
     `section.key`, the offending value and what was expected.

Every stage model derives from `StrictModel`: unknown keys, missing keys, wrong types and
out-of-range values are all errors, raised before the stage does any work.

The file is read as YAML 1.2, as DVC reads and writes it: `dvc exp run -S` rewrites params.yaml
with a YAML 1.2 writer, which leaves strings such as `no` unquoted, and a YAML 1.1 reader
(PyYAML) would turn those into booleans.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from ruamel.yaml import YAML, YAMLError

PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    """A params problem; the message names the key, the value and what was expected."""


class StrictModel(BaseModel):
    """Base of every params model: no extra keys, no coercion of strings into numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


M = TypeVar("M", bound=StrictModel)


def _describe(section: str, err: ValidationError, raw: Any) -> str:
    lines = []
    for e in err.errors():
        key = ".".join([section, *(str(p) for p in e["loc"])])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (value {e['input']!r}); remove it or fix its spelling")
        elif e["type"] == "missing":
            lines.append(f"{key}: missing key; expected {e['msg'].lower()}")
        else:
            lines.append(f"{key}: got {e['input']!r}; expected: {e['msg']}")
    return "invalid params: " + "; ".join(lines)


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole parsed params file, or `ConfigError` naming the file."""
    try:
        data = YAML(typ="safe", pure=True).load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: params file not found") from e
    except YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def parse_section(section: str, raw: Any, model: type[M]) -> M:
    """Validate `raw` (the section's mapping) as `model`, naming `section.key` on failure."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid params: {section}: expected a mapping, got {raw!r}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(section, e, raw)) from None


def load_section(section: str, model: type[M], path: Path = PARAMS_FILE) -> M:
    """Load only `section` of the params file into `model`."""
    params = read_params(path)
    if section not in params:
        raise ConfigError(f"invalid params: {section}: missing section in {path}")
    return parse_section(section, params[section], model)
