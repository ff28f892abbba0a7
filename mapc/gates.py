"""Release gates shared by `mapc compile` and `mapc verify`.

A gate compares one measured figure with a limit and passes or fails:
    max_source_drop  authorized accuracy drop vs the original    <= limit (points)
    max_target_acc   every unauthorized protected accuracy        <= limit (percent)
    min_target_drop  every unauthorized drop vs the original      >= limit (points)
Domains are dicts with ``role``, ``protected_acc`` and, when an original was measured, ``drop``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Gates:
    max_source_drop: float | None = None    # points
    max_target_acc: float | None = None     # percent, every unauthorized domain
    min_target_drop: float | None = None    # points, every unauthorized domain


def evaluate_gates(g: Gates, domains: dict[str, dict], source: str | None) -> list[dict]:
    out = []
    if g.max_source_drop is not None and source is not None:
        v = domains[source]["drop"]
        out.append({"gate": "max_source_drop", "limit": g.max_source_drop, "value": v, "domain": source,
                    "passed": v <= g.max_source_drop})
    for n, e in domains.items():
        if e["role"] != "unauthorized":
            continue
        if g.max_target_acc is not None:
            out.append({"gate": "max_target_acc", "limit": g.max_target_acc, "value": e["protected_acc"],
                        "domain": n, "passed": e["protected_acc"] <= g.max_target_acc})
        if g.min_target_drop is not None:
            out.append({"gate": "min_target_drop", "limit": g.min_target_drop, "value": e["drop"], "domain": n,
                        "passed": e["drop"] >= g.min_target_drop})
    return out
