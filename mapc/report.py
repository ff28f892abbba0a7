"""Reports: one builder for every command's report.json (versioned), one console table, the verdict line.

report.json schema, version 2 (written down as JSON Schema in ``mapc/*_report.schema.json``,
checked by the tests). Every command's report starts with the same header
(``report_header``); all accuracies in percent, drops in points:

    schema_version   int, 2
    tool             {name, version, onnx, onnxruntime, numpy[, torch]}
    command          "compile" | "verify" | "attack"
    providers        onnxruntime execution providers that actually ran
    preprocess       {size, channels, mean, std}
    domains          {NAME: {role, path, n, rows, labels, protected_acc, protected_ci95,
                             original_acc, original_ci95, drop, st_d, probe}}   (mapc.measure)
    source_drop, max_unauthorized_acc
    gates            [{gate, limit, value, domain, passed}]; value null and not_measured (why)
                     when a requested gate had nothing to measure: it fails
    passed           bool
    timings          {..._seconds, total_seconds}

compile adds: mode, seed, model, learning_device, learned_from, synthesis, parity
{top1_agreement, max_abs_logit_diff, rows}, mask {granularity, pruned_fraction, density,
selected_step, images_per_second, processes, config, history}, latency_ms_batch256 {original,
protected, ratio, batch: 256 rows, fewer for large inputs}, passes
[{name, changed, seconds, nodes_before, nodes_after, initializer_bytes_before,
initializer_bytes_after, details}], artifact_files.
attack adds (mapc.attack): artifact {path, sha256}, baseline, importer {artifact|original:
{max_abs_logit_diff, rows, tolerance}}, settings, attacks [{attack, budget, fraction, k, data, domain,
artifact {before, after, ...}, original {...}, scratch, gain}], worst {NAME: {...}}, max_attacked_acc.
verify adds: artifact {path, sha256, metadata}, baseline, weight_density, integrity
{passed, checks: [{check, passed, detail}]}, compile (the compile report's passes and mask).

Version history: 1 had compile domains keyed ``n_test`` and ``split`` and verify domains keyed
``n`` and ``rows``; 2 gives both commands one domain schema (``n``, ``rows``, ``labels``), adds
verify's ``integrity`` and a JSON Schema for the compile report.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .gates import value_text

REPORT_SCHEMA_VERSION = 2


def _clean(o):
    if isinstance(o, float):
        return None if math.isnan(o) or math.isinf(o) else round(o, 6)
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item"):
        return _clean(o.item())
    return o


def tool_versions() -> dict:
    """Versions of mapc and the libraries that produced a report (torch only when it is loaded)."""
    import sys

    import numpy as np
    import onnx
    import onnxruntime

    from . import __version__
    out = {"name": "mapc", "version": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
           "numpy": np.__version__}
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    return out


def report_header(command: str, providers: list[str], preprocess, measurement, gates: list[dict]) -> dict:
    """The keys every command's report starts with (see the module docstring)."""
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool": tool_versions(),
        "command": command,
        "providers": providers,
        "preprocess": preprocess.to_dict(),
        "domains": measurement.domains,
        "source_drop": measurement.source_drop,
        "max_unauthorized_acc": measurement.max_unauthorized_acc,
        "gates": gates,
        "passed": all(g["passed"] for g in gates),
    }


def report_files(report: dict, verdict_line: str, examples: dict | None = None, synthetic=None) -> dict[str, bytes]:
    """The three report files by suffix: .json (with the verdict), .md and a one-file .html."""
    from .human_report import html_report, markdown

    payload = dict(report, verdict=verdict_line)
    return {".json": (json.dumps(_clean(payload), indent=2) + "\n").encode(),
            ".md": markdown(report, verdict_line).encode(),
            ".html": html_report(report, verdict_line, examples, synthetic).encode()}


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as columns padded to width (first two left-aligned), with a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def table(report: dict) -> str:
    """The console table of any report: one row per domain, then what the command measured besides."""
    from .human_report import probe_text
    rows = [("domain", "role", "n", "original", "protected", "95 % CI", "drop", "ST-D", "probe 1%/10% (orig)")]
    for name, d in report["domains"].items():
        lo, hi = d["protected_ci95"]
        std = d.get("st_d")
        rows.append((name, d["role"], str(d["n"]),
                     "-" if d.get("original_acc") is None else f"{d['original_acc']:.1f} %",
                     f"{d['protected_acc']:.1f} %", f"{lo:.1f}-{hi:.1f}",
                     "-" if d.get("drop") is None else f"{d['drop']:+.1f}", "-" if std is None else f"{std:.3f}",
                     probe_text(d)))
    lines = _aligned(rows) + [""]
    if "parity" in report:
        p, lat = report["parity"], report["latency_ms_batch256"]
        lines.append(f"parity (artifact vs masked torch): top-1 agreement {p['top1_agreement']:.2f} %, "
                     f"max |logit diff| {p['max_abs_logit_diff']:.2e} over {p['rows']} test rows")
        lines.append(f"mask: {report['mask']['granularity']}, {report['mask']['pruned_fraction'] * 100:.1f} % pruned; "
                     f"latency batch {lat.get('batch', 256)}: {lat['original']:.1f} -> {lat['protected']:.1f} ms (ratio {lat['ratio']:.2f})")
    if "attacks" in report:
        from .human_report import ATTACK_HEADER, WORST_HEADER, attack_rows, worst_rows
        lines += _aligned([ATTACK_HEADER[:-1]] + [r[:-1] for r in attack_rows(report)]) + [""]
        lines += _aligned([WORST_HEADER] + worst_rows(report)) + [""]
        own = report.get("ownership_after_attacks")
        if own:
            w = own.get("weakest")
            lines.append(f"ownership after attacks: {own['owned']} of {own['attacked_copies']} attacked copies test as "
                         f"OWNED (watermark {own['watermark_owned']}, weight provenance {own['derived']})"
                         + (f"; weakest watermark: {w['attack']} {w['budget']} {w['domain']}, p={w['p_value']} "
                            f"(key {w['key_acc']:.1f} % vs control {w['control_acc']:.1f} %), weights r="
                            f"{w['provenance']['effect']:.2f}" if w else ""))
        imp = report["importer"]
        lines.append("importer vs onnxruntime: " + ", ".join(
            f"{k} max |logit diff| {v['max_abs_logit_diff']:.1e} over {v['rows']} rows" for k, v in imp.items()))
    if "artifact" in report and isinstance(report["artifact"], dict):
        lines.append(f"artifact sha256 {report['artifact']['sha256'][:16]}...")
    for g in report["gates"]:
        lines.append(f"gate {g['gate']}[{g['domain']}]: {value_text(g)} vs {g['limit']:g} -> "
                     f"{'pass' if g['passed'] else 'FAIL'}")
    for c in report.get("integrity", {}).get("checks", []):
        lines.append(f"integrity {c['check']}: {c['detail']} -> {'pass' if c['passed'] else 'FAIL'}")
    t = report["timings"]
    stages = ", ".join(f"{k.removesuffix('_seconds').replace('_', ' ')} {v:.1f} s" for k, v in t.items())
    lines.append(f"time: {stages}; providers {','.join(report['providers'])}")
    return "\n".join(lines)


def verdict(report: dict) -> str:
    """One line: ``PASSED | summary`` or ``FAILED | <failed gates> | summary``."""
    failed = [f"{g['gate']}[{g['domain']}]={value_text(g, '.1f')} (limit {g['limit']:g})"
              for g in report["gates"] if not g["passed"]]
    failed += [f"integrity[{c['check']}]" for c in (report.get("integrity") or {}).get("checks", [])
               if not c["passed"]]
    parts = []
    if report.get("source_drop") is not None:
        parts.append(f"source drop {report['source_drop']:+.1f} pts")
    if report.get("max_unauthorized_acc") is not None:
        parts.append(f"max unauthorized acc {report['max_unauthorized_acc']:.1f} %")
    if report.get("max_attacked_acc") is not None:
        parts.append(f"max attacked acc {report['max_attacked_acc']:.1f} %")
    parts.append(report.get("mode") or report["command"])
    if not report["gates"]:
        parts.append("no gates requested: nothing about protection was checked")
    summary = " | ".join(parts)
    if failed:
        return f"FAILED | {', '.join(failed)} | {summary}"
    return f"PASSED | {summary}"


def write_reports(json_path, report: dict, verdict_line: str, examples: dict | None = None) -> None:
    """report.json at ``json_path``; report.md and report.html beside it; each written atomically."""
    from .atomic import write_bytes_atomic

    json_path = Path(json_path)
    for suffix, data in report_files(report, verdict_line, examples).items():
        write_bytes_atomic(json_path.with_suffix(suffix), data)
