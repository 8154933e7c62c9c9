"""Number formatting and Markdown tables shared by the forgetting summary and the results page."""
from __future__ import annotations

import math
from typing import Any


def is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any, digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    if not is_num(x):
        return "n/a"
    return f"{x * scale:{'+' if sign else ''}.{digits}f}"


def pm(stats: dict[str, Any] | None, digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    """`mean ± std` of a {mean, std, n} block (the std only with 2 or more seeds)."""
    if not isinstance(stats, dict) or not is_num(stats.get("mean")):
        return "n/a"
    m = num(stats["mean"], digits, scale, sign)
    if (stats.get("n") or 0) < 2 or not is_num(stats.get("std")):
        return m
    return f"{m} ± {num(stats['std'], digits, scale)}"


def pct_digits(fraction: Any) -> int:
    """Decimals for a share shown in %: small shares (linear probe, LoRA) keep 3 significant."""
    if not is_num(fraction) or fraction == 0 or abs(fraction) >= 0.01:
        return 2
    return min(6, 2 - int(math.floor(math.log10(abs(fraction) * 100))))


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in [header, *rows]]
    return (["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def names(items: list[str], code: bool = True) -> str:
    """`a`, `b` and `c` (an English list)."""
    q = [f"`{x}`" if code else str(x) for x in items]
    if len(q) < 2:
        return q[0] if q else "none"
    return ", ".join(q[:-1]) + " and " + q[-1]


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"
