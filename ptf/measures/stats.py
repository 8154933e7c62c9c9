"""Statistics over seeds (no CLI): the one mean/std helper of the pipeline.

In:  a sequence of numbers (None values are ignored: a measure that does not apply).
Out: {"mean", "std" (sample, ddof=1; 0.0 for one value), "n"}; mean and std are None when
     no value is left.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0.0 for one value) of the non-None values."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(v.size)}

