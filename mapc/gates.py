"""Release gates shared by `mapc compile` and `mapc verify`.

A gate compares one measured figure with a limit and passes or fails:
    max_source_drop  authorized accuracy drop vs the original    <= limit (points)
    max_target_acc   every unauthorized protected accuracy        <= limit (percent)
    min_target_drop  every unauthorized drop vs the original      >= limit (points)
    max_probe_acc    every unauthorized accuracy a linear probe on the artifact's logits recovers with
                     10 % of the domain's labelled train rows      <= limit (percent; mapc.measure)
Domains are dicts with ``role``, ``protected_acc`` and, when an original was measured, ``drop``.

Fail closed: a requested gate whose figure was not measured (no authorized domain for
max_source_drop, no unauthorized domain for the others) is recorded with ``value`` None
and fails, so a verdict never reads PASSED for something nobody measured.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Gates:
    max_source_drop: float | None = None    # points
    max_target_acc: float | None = None     # percent, every unauthorized domain
    min_target_drop: float | None = None    # points, every unauthorized domain
    max_probe_acc: float | None = None      # percent, every unauthorized domain, probe with 10 % of train rows


GATES = ("max_source_drop", "max_target_acc", "min_target_drop", "max_probe_acc")
LIMIT_RANGE = (0.0, 100.0)   # points or percent; a limit outside makes a gate that cannot fail or cannot pass
PROBE_GATE_FRACTION = "10%"


def validate_gates(g, where: str = "command line", names: tuple[str, ...] = GATES) -> None:
    """Every limit finite and inside its range; max limits strictly below 100 (100 % always passes)."""
    import math
    from .errors import UserError
    lo, hi = LIMIT_RANGE
    for name in names:
        v = getattr(g, name)
        if v is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi \
                or (name.startswith("max") and v >= hi):
            raise UserError(f"{where}: {flag} {v!r} is not a usable limit; give a number in [{lo:g}, {hi:g}"
                            f"{')' if name.startswith('max') else ']'}")


def evaluate_gates(g: Gates, domains: dict[str, dict], source: str | None) -> list[dict]:
    out = []
    if g.max_source_drop is not None:
        v = domains[source].get("drop") if source is not None else None
        out.append(_gate("max_source_drop", g.max_source_drop, v, source or "-",
                         v is not None and v <= g.max_source_drop, "no authorized data; give --authorized NAME=PATH"))
    unauth = {n: e for n, e in domains.items() if e["role"] == "unauthorized"}
    for name, limit in (("max_target_acc", g.max_target_acc), ("min_target_drop", g.min_target_drop),
                        ("max_probe_acc", g.max_probe_acc)):
        if limit is not None and not unauth:
            out.append(_gate(name, limit, None, "-", False, "no unauthorized data; give --unauthorized NAME=PATH"))
    for n, e in unauth.items():
        if g.max_target_acc is not None:
            out.append(_gate("max_target_acc", g.max_target_acc, e["protected_acc"], n,
                             e["protected_acc"] <= g.max_target_acc))
        if g.min_target_drop is not None:
            out.append(_gate("min_target_drop", g.min_target_drop, e["drop"], n, e["drop"] >= g.min_target_drop))
        if g.max_probe_acc is not None:
            v = (e.get("probe") or {}).get("protected", {}).get(PROBE_GATE_FRACTION)
            out.append(_gate("max_probe_acc", g.max_probe_acc, v, n, v is not None and v <= g.max_probe_acc,
                             f"no probe: {e.get('probe_skipped', 'not measured')}"))
    return out


def _gate(name: str, limit: float, value: float | None, domain: str, passed: bool, missing: str = "") -> dict:
    entry = {"gate": name, "limit": limit, "value": value, "domain": domain, "passed": bool(passed)}
    if value is None:
        entry["not_measured"] = missing
    return entry


def value_text(gate: dict, fmt: str = ".2f") -> str:
    """The gate's measured figure, or "not measured (why)"."""
    if gate["value"] is None:
        return f"not measured ({gate.get('not_measured', 'no data')})"
    return format(gate["value"], fmt)
