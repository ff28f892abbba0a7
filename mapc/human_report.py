"""Human-readable reports: report.md (tables) and a single-file report.html.

The HTML embeds every plot and image as a base64 PNG data URI, so the one
file carries everything (no external assets, no network). Plots (matplotlib,
Agg backend): accuracy per domain before and after, weight density per layer,
and a few example images per domain with their label and prediction.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np

from .gates import value_text


def _fmt(v, spec=".1f", suffix=""):
    return "-" if v is None else f"{v:{spec}}{suffix}"


def domain_rows(report: dict) -> list[dict]:
    rows = []
    for name, d in report["domains"].items():
        rows.append({"domain": name, "role": d["role"], "n": d["n"],
                     "original": d.get("original_acc"), "protected": d["protected_acc"],
                     "ci": d.get("protected_ci95"), "drop": d.get("drop"), "st_d": d.get("st_d"),
                     "probe": probe_text(d)})
    return rows


def probe_text(d: dict) -> str:
    """Linear-probe accuracy with 1 % / 10 % of the labelled train rows: protected (original), or '-'."""
    p = d.get("probe")
    if not p:
        return "-"
    prot = "/".join(f"{p['protected'][k]:.1f}" for k in ("1%", "10%"))
    orig = "/".join(f"{p['original'][k]:.1f}" for k in ("1%", "10%")) if "original" in p else None
    return f"{prot} %" + (f" ({orig})" if orig else "")


def markdown(report: dict, verdict_line: str) -> str:
    lines = [f"# mapc {report['command']} report", "", f"**{verdict_line}**", "",
             "| domain | role | n | original | protected (95 % CI) | drop (pts) | ST-D | probe 1 %/10 % (original) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in domain_rows(report):
        ci = r["ci"]
        lines.append(f"| {r['domain']} | {r['role']} | {r['n']} | {_fmt(r['original'], '.1f', ' %')} | "
                     f"{r['protected']:.1f} % ({ci[0]:.1f}-{ci[1]:.1f}) | {_fmt(r['drop'], '+.1f')} | "
                     f"{_fmt(r['st_d'], '.3f')} | {r['probe']} |")
    lines += ["", "## Gates", "", "| gate | domain | value | limit | outcome |", "|---|---|---|---|---|"]
    for g in report["gates"]:
        lines.append(f"| {g['gate']} | {g['domain']} | {value_text(g)} | {g['limit']:g} | "
                     f"{'pass' if g['passed'] else '**FAIL**'} |")
    if not report["gates"]:
        lines.append("| (none requested) | | | | |")
    lines += synthesis_lines(report.get("synthesis"))
    lines += attack_lines(report)
    dens = density_of(report)
    if dens:
        lines += ["", "## Weight density per layer", "", "| layer | kept (non-zero) |", "|---|---|"]
        lines += [f"| {k} | {v * 100:.1f} % |" for k, v in dens.items()]
    passes = pass_records(report)
    if passes:
        lines += ["", "## Compiler passes", "", "| pass | changed | seconds | nodes | initializer bytes |",
                  "|---|---|---|---|---|"]
        for p in passes:
            lines.append(f"| {p['name']} | {p['changed']} | {p['seconds']:.3f} | {p['nodes_before']} -> "
                         f"{p['nodes_after']} | {p['initializer_bytes_before']} -> {p['initializer_bytes_after']} |")
    lines += ["", f"Execution providers: {', '.join(report.get('providers', []))}", ""]
    return "\n".join(lines)


def synthesis_lines(syn: dict | None) -> list[str]:
    """The synthesized data (source-free/data-free compiles): method, cost, and which unauthorized domains
    it can be separated from, with the warnings."""
    if not syn:
        return []
    lines = ["", "## Synthesized authorized data", "",
             f"{syn['images']} images by {syn.get('method', 'pixels')} inversion"
             + (f" ({syn['generators']} generators)" if syn.get("generators", 1) > 1 else "")
             + f" in {syn['seconds']:.1f} s; "
             f"BN-statistics mismatch {syn['bn_mismatch_synthetic']:.3f} (Gaussian noise: "
             f"{syn['bn_mismatch_noise']:.3f})."]
    feas = syn.get("feasibility") or {}
    if feas:
        lines += ["", "| unauthorized domain | BN mismatch | synthesized | Gaussian noise | of noise | separable |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {d['bn_mismatch']:.3f} | {d['bn_mismatch_synthetic']:.3f} | {d['bn_mismatch_noise']:.3f} | "
                  f"{d['of_noise']:.3f} | "
                  f"{'yes' if d['separable'] else '**no**'} |" for n, d in feas.items()]
        lines += ["", *(f"**Warning:** {d['warning']}." for d in feas.values() if "warning" in d)]
    return lines


ATTACK_HEADER = ("attack", "budget", "k", "domain", "data", "before", "after", "original after", "scratch",
                 "detail")


def attack_rows(report: dict) -> list[tuple[str, ...]]:
    """One row per attack, budget and domain (`mapc attack`): accuracy before/after on the test rows."""
    out = []
    for r in report.get("attacks", []):
        a, o = r["artifact"], r.get("original")
        detail = []
        if a["after"] is None:
            detail.append("diverged: non-finite logits")
        if "linear_probe" in a:
            detail.append(f"probe {a['linear_probe']:.1f} / relabel {a['relabel']:.1f}")
        if "authorized_after" in a:
            detail.append(f"authorized after {a['authorized_after']:.1f} %")
        if r.get("gain") is not None:
            detail.append(f"gain over scratch {r['gain']:+.1f}")
        if "ownership" in a:
            w = a["ownership"]
            detail.append(f"{'OWNED' if w['owned'] else 'NOT OWNED'}: watermark p={w['p_value']} (key "
                          f"{w['key_acc']:.1f} / control {w['control_acc']:.1f} %), weights r="
                          f"{w['provenance']['effect']:.2f} p={w['provenance']['p_value']}")
        out.append((r["attack"], r["budget"], str(r["k"]), r["domain"], r["data"], f"{a['before']:.1f} %",
                    _fmt(a["after"], ".1f", " %"), "-" if o is None else _fmt(o["after"], ".1f", " %"),
                    _fmt(r.get("scratch"), ".1f", " %"), "; ".join(detail) or "-"))
    return out


WORST_HEADER = ("domain", "protected", "best attack on the artifact", "same attacks on the original",
                "fine-tune vs scratch")


def worst_rows(report: dict) -> list[tuple[str, ...]]:
    out = []
    for name, w in (report.get("worst") or {}).items():
        best = (f"{w['attacked_acc']:.1f} % ({w['attack']}, {w['budget']})" if w.get("attacked_acc") is not None
                else "-")
        ft = (f"{w['finetune_acc']:.1f} vs {w['scratch_acc']:.1f} % ({w['finetune_gain']:+.1f}, "
              f"{w['finetune_budget']})" if w.get("finetune_gain") is not None else "-")
        out.append((name, _fmt(w.get("before"), ".1f", " %"), best, _fmt(w.get("original_attacked_acc"), ".1f", " %"),
                    ft))
    return out


def attack_lines(report: dict) -> list[str]:
    if "attacks" not in report:
        return []
    lines = ["", "## Worst case per unauthorized domain", "", "| " + " | ".join(WORST_HEADER) + " |",
             "|" + "---|" * len(WORST_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in worst_rows(report)]
    lines += ["", "## Attacks", "", "| " + " | ".join(ATTACK_HEADER) + " |", "|" + "---|" * len(ATTACK_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in attack_rows(report)]
    st = report.get("settings", {})
    lines += ["", f"Step budget: {st.get('steps')} Adam steps, batch {st.get('batch')}; learning rates: fine-tune "
                  f"{st.get('finetune_lr')}, disguise {st.get('disguise_lr')}, self-training {st.get('selftrain_lr')}; "
                  f"seed {st.get('seed')}. k = labelled (or, for self-training, unlabelled) train rows the attacker "
                  f"holds; accuracies on the test rows, by onnxruntime."]
    return lines


def density_of(report: dict) -> dict[str, float]:
    if "weight_density" in report:
        return report["weight_density"]
    return report.get("mask", {}).get("density", {})


def pass_records(report: dict) -> list[dict]:
    if "passes" in report:
        return report["passes"]
    return (report.get("compile") or {}).get("passes") or []


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(report: dict, examples: dict | None, synthetic: np.ndarray | None = None) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    if report.get("attacks"):
        out["attacks vs budget"] = attack_plot(report)
    rows = domain_rows(report)
    fig, ax = plt.subplots(figsize=(6, 3))
    x = np.arange(len(rows))
    if any(r["original"] is not None for r in rows):
        ax.bar(x - 0.2, [r["original"] or 0 for r in rows], 0.4, label="original", color="#9aa5b1")
    ax.bar(x + 0.2, [r["protected"] for r in rows], 0.4, label="protected", color="#c0392b")
    ax.set_xticks(x, [f"{r['domain']}\n({r['role']})" for r in rows], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    out["accuracy"] = _png(fig)

    dens = density_of(report)
    if dens:
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(dens) + 1))
        names = list(dens)
        ax.barh(np.arange(len(names)), [dens[n] * 100 for n in names], color="#2e86de")
        ax.set_yticks(np.arange(len(names)), names, fontsize=7)
        ax.set_xlabel("weights kept (%)")
        ax.set_xlim(0, 100)
        ax.invert_yaxis()
        out["density"] = _png(fig)

    if examples:
        k = max(len(e["labels"]) for e in examples.values())
        fig, axes = plt.subplots(len(examples), k, figsize=(1.1 * k, 1.25 * len(examples)), squeeze=False)
        for i, (name, e) in enumerate(examples.items()):
            for j in range(k):
                a = axes[i][j]
                a.axis("off")
                if j < len(e["labels"]):
                    img = np.asarray(e["images"][j])
                    a.imshow(img, cmap="gray" if img.ndim == 2 else None)
                    ok = e["labels"][j] == e["predictions"][j]
                    a.set_title(f"{e['labels'][j]}->{e['predictions'][j]}", fontsize=7, color="green" if ok else "red")
            axes[i][0].text(-0.3, 0.5, name, transform=axes[i][0].transAxes, ha="right", va="center", fontsize=8)
        out["examples"] = _png(fig)
    if synthetic is not None and len(synthetic):
        k = len(synthetic)
        cols = min(8, k)
        rows_ = (k + cols - 1) // cols
        fig, axes = plt.subplots(rows_, cols, figsize=(cols, rows_), squeeze=False)
        for i in range(rows_ * cols):
            a = axes[i // cols][i % cols]
            a.axis("off")
            if i < k:
                a.imshow(synthetic[i], cmap="gray" if synthetic[i].ndim == 2 else None)
        fig.suptitle("synthesized pseudo-authorized images", fontsize=9)
        out["synthesized"] = _png(fig)
    return out


def attack_plot(report: dict) -> str:
    """Unauthorized accuracy against the attacker's budget, per domain: one line per attack on the artifact
    (solid), the same attack on the original (dashed), training from scratch (dotted)."""
    import matplotlib.pyplot as plt

    rows = report["attacks"]
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    colours = dict(zip(attacks, ["#c0392b", "#2e86de", "#27ae60", "#8e44ad", "#e67e22", "#7f8c8d"]))
    fig, axes = plt.subplots(1, len(domains), figsize=(3.6 * len(domains), 3.2), squeeze=False)
    for ax, dom in zip(axes[0], domains):
        for att in attacks:
            mine = sorted((r for r in rows if r["domain"] == dom and r["attack"] == att), key=lambda r: r["fraction"])
            if not mine:
                continue
            x = [r["fraction"] * 100 for r in mine]
            ax.plot(x, [r["artifact"]["after"] for r in mine], "-o", color=colours[att], label=att, ms=4)
            if all("original" in r for r in mine):
                ax.plot(x, [r["original"]["after"] for r in mine], "--", color=colours[att], alpha=0.6)
            if all("scratch" in r for r in mine):
                ax.plot(x, [r["scratch"] for r in mine], ":", color="black", label="scratch")
        before = report["domains"][dom]["protected_acc"]
        ax.axhline(before, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.set_title(f"{dom} (protected {before:.1f} %)", fontsize=9)
        ax.set_xlabel("attacker's rows (% of train)", fontsize=8)
    axes[0][0].set_ylabel("accuracy on test rows (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(labels), fontsize=7,
               title="solid: the artifact, dashed: the same attack on the original, grey: protected before attack",
               title_fontsize=7)
    return _png(fig)


def attack_html(report: dict) -> str:
    if "attacks" not in report:
        return ""
    esc = html.escape

    def table_of(header, rows):
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"
    return ("<h2>Worst case per unauthorized domain</h2>" + table_of(WORST_HEADER, worst_rows(report)) +
            "<h2>Attacks</h2>" + table_of(ATTACK_HEADER, attack_rows(report)))


def html_report(report: dict, verdict_line: str, examples: dict | None = None,
                synthetic: np.ndarray | None = None) -> str:
    imgs = plots(report, examples, synthetic)
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(r['domain'])}</td><td>{r['role']}</td><td>{r['n']}</td><td>{_fmt(r['original'], '.1f', ' %')}</td>"
        f"<td>{r['protected']:.1f} %</td><td>{_fmt(r['drop'], '+.1f')}</td><td>{_fmt(r['st_d'], '.3f')}</td>"
        f"<td>{esc(r['probe'])}</td></tr>"
        for r in domain_rows(report))
    gates = "".join(
        f"<tr><td>{g['gate']}</td><td>{esc(g['domain'])}</td><td>{esc(value_text(g))}</td><td>{g['limit']:g}</td>"
        f"<td class='{'ok' if g['passed'] else 'bad'}'>{'pass' if g['passed'] else 'FAIL'}</td></tr>"
        for g in report["gates"]) or "<tr><td colspan=5>(none requested)</td></tr>"
    figures = "".join(f"<figure><img alt='{k}' src='{v}'><figcaption>{k}</figcaption></figure>" for k, v in imgs.items())
    status = "ok" if verdict_line.startswith("PASSED") else "bad"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mapc {report['command']} report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}}.ok{{color:#1e8449}}.bad{{color:#c0392b;font-weight:bold}}
figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>mapc {report['command']} report</h1>
<p class="{status}">{esc(verdict_line)}</p>
<table><tr><th>domain</th><th>role</th><th>n</th><th>original</th><th>protected</th><th>drop</th><th>ST-D</th><th>probe 1 %/10 % (original)</th></tr>{rows}</table>
{attack_html(report)}
<h2>Gates</h2><table><tr><th>gate</th><th>domain</th><th>value</th><th>limit</th><th>outcome</th></tr>{gates}</table>
<h2>Plots</h2>{figures}
<p>Execution providers: {esc(', '.join(report.get('providers', [])))}</p>
</body></html>
"""
