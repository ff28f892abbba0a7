"""One measurement path for `mapc compile`, `mapc verify` (and `mapc attack`): domains through onnxruntime.

Invariant: every per-domain figure a report carries comes from here, from
onnxruntime sessions over the artifact (and over the original, when there is
one) on the domain's measured rows (test rows when the data has a split, all
rows otherwise), with one schema for every command:

    {role, path, n, rows: "test" | "all (no split)", labels: "given" | "original model's predictions",
     protected_acc, protected_ci95, original_acc, original_ci95, drop, st_d}

``original_*`` and ``drop`` appear when an original was measured; ``st_d`` on
unauthorized domains when the authorized drop is known (ST-D = ΔS / ΔT,
only where ΔT > 0). Unlabelled rows are scored against the original model's
predictions when there is an original, and are bad input otherwise.

Unauthorized domains also get ``probe``: what an attacker holding k labelled
train rows recovers from the outputs with a linear map (``mapc.probe``; the
remap attack), for k = 1 % and 10 % of the domain's train rows, on the
protected (and original) logits of the test rows:

    probe: {"protected": {"1%": acc, "10%": acc}, "original": {...}, "k": {"1%": k, "10%": k}}
           or null with "probe_skipped": why (no labelled train rows disjoint from the test rows)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import numpy as np
import onnxruntime as ort

from .datasets import Domain
from .errors import UserError
from .evaluate import accuracy, check_input_fits, run_logits, st_d, wilson_interval
from .preprocess import Preprocess
from .probe import probe_accuracy, probe_draws
from .rows import ImageRows, Rows, batches_of, row_shape

EXAMPLES_PER_DOMAIN = 6
PROBE_FRACTIONS = {"1%": 0.01, "10%": 0.10}   # labelled train rows the attacker holds; the gate reads the largest
PROBE_SEED = 0
BATCH = 512             # rows read, preprocessed and run per onnxruntime call (fewer for large rows)


@dataclass
class MeasuredRows:
    """A domain's measured rows: model input read and preprocessed a batch at a time (``mapc.rows``)."""
    name: str
    role: str                      # "authorized" | "unauthorized"
    path: str
    images: np.ndarray             # the first uint8 rows (the report's example images)
    x: Rows | np.ndarray           # float32 NCHW model input
    labels: np.ndarray | None      # None: unlabelled
    has_split: bool
    probe_x: Rows | np.ndarray | None = None   # labelled train rows an attacker could hold (unauthorized only)
    probe_y: np.ndarray | None = None

    @classmethod
    def test_rows(cls, d: Domain, role: str, pre: Preprocess) -> "MeasuredRows":
        """The domain's test rows; unauthorized labelled domains with a split also carry their train rows for the
        probe."""
        rows = d.rows("test")
        if len(rows) == 0:
            raise UserError(f"{d.path}: domain {d.name!r} has no test rows in 'split'")
        train = d.rows("train") if d.has_split else np.array([], np.int64)
        probe = role == "unauthorized" and d.labels is not None and len(train) > 0
        labels = None if d.labels is None else d.labels[rows]
        return cls(d.name, role, d.path, np.asarray(d.images[rows[:EXAMPLES_PER_DOMAIN]]),
                   ImageRows(d.images, rows, labels, pre), labels, d.has_split,
                   ImageRows(d.images, train, d.labels[train], pre) if probe else None,
                   d.labels[train] if probe else None)

    def in_memory(self) -> "MeasuredRows":
        """The same rows with the model input read into memory (``mapc attack`` trains on them repeatedly)."""
        def load(x):
            return x.materialize() if isinstance(x, Rows) else x
        return replace(self, x=load(self.x), probe_x=load(self.probe_x))


@dataclass
class Measurement:
    domains: dict[str, dict]                                  # name -> report entry (schema above)
    logits: dict[str, np.ndarray] = field(default_factory=dict)   # name -> protected logits
    examples: dict[str, dict] = field(default_factory=dict)        # name -> images, labels, predictions

    @property
    def source_drop(self) -> float | None:
        auth = [e for e in self.domains.values() if e["role"] == "authorized"]
        return auth[0].get("drop") if auth else None

    @property
    def max_unauthorized_acc(self) -> float | None:
        return max((e["protected_acc"] for e in self.domains.values() if e["role"] == "unauthorized"), default=None)


def _logits_pair(protected: ort.InferenceSession | None, original: ort.InferenceSession | None,
                 m: MeasuredRows, progress: bool = False) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Both sessions' logits on ``m.x``, each batch read once (``None`` for a session not given); a progress bar
    in images/s on stderr with ``progress``."""
    from tqdm import tqdm
    shape = row_shape(m.x)
    sessions = {"": protected, "original": original}
    for what, sess in sessions.items():
        if sess is not None:
            check_input_fits(sess, shape, f"{m.path} (domain {m.name!r}{', ' + what if what else ''})")
    outs = {what: [] for what, sess in sessions.items() if sess is not None}
    with tqdm(total=len(m.x), desc=f"measure {m.name}", unit="img", file=sys.stderr, leave=False,
              disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 10.0) as bar:
        for xb in batches_of(m.x, BATCH):
            for what in outs:
                outs[what].append(run_logits(sessions[what], xb))
            bar.update(len(xb))
    result = {}
    for what, parts in outs.items():
        out = np.concatenate(parts)
        if not np.isfinite(out).all():
            raise UserError(f"the {what or 'artifact'} outputs NaN or infinite logits on {m.path}; it is unusable on "
                            f"these rows (check the model and its preprocessing)")
        result[what] = out
    return result.get(""), result.get("original")


def measure_domains(protected: ort.InferenceSession, rows: list[MeasuredRows],
                    original: ort.InferenceSession | None = None, progress: bool = False) -> Measurement:
    """Top-1 of ``protected`` (and ``original``) on every domain's rows; see the module docstring."""
    out = Measurement({})
    for m in rows:
        lp, lo = _logits_pair(protected, original, m, progress)
        if m.labels is not None:
            labels, label_source = m.labels, "given"
        elif lo is not None:
            labels, label_source = lo.argmax(1), "original model's predictions"
        else:
            raise UserError(f"{m.path}: domain {m.name!r} has no labels; measuring accuracy needs them "
                            f"(or an original model whose predictions stand in)")
        ap = accuracy(lp, labels)
        entry = {"role": m.role, "path": m.path, "n": int(len(labels)),
                 "rows": "test" if m.has_split else "all (no split)", "labels": label_source,
                 "protected_acc": ap, "protected_ci95": wilson_interval(ap, len(labels))}
        if lo is not None:
            ao = accuracy(lo, labels)
            entry.update(original_acc=ao, original_ci95=wilson_interval(ao, len(labels)), drop=ao - ap)
        if m.role == "unauthorized":
            entry.update(probe_entry(m, labels, lp, protected, original, lo, progress))
        out.domains[m.name] = entry
        out.logits[m.name] = lp
        k = min(EXAMPLES_PER_DOMAIN, len(labels))
        out.examples[m.name] = {"images": m.images[:k], "labels": labels[:k].tolist(),
                                "predictions": lp[:k].argmax(1).tolist()}
    source_drop = out.source_drop
    for e in out.domains.values():
        if e["role"] == "unauthorized" and source_drop is not None and "drop" in e:
            e["st_d"] = st_d(source_drop, e["drop"])
    return out


def probe_entry(m: MeasuredRows, labels: np.ndarray, lp: np.ndarray, protected: ort.InferenceSession,
                original: ort.InferenceSession | None, lo: np.ndarray | None, progress: bool = False) -> dict:
    """The linear-probe (remap) figures of one unauthorized domain; see the module docstring."""
    if m.probe_x is None or m.labels is None:
        why = ("the domain has no labels" if m.labels is None else
               "the domain has no train rows apart from its test rows (no 'split')")
        return {"probe": None, "probe_skipped": why}
    num_classes = lp.shape[1]
    figures = {"protected": {}, "k": {}}
    n = len(m.probe_y)
    needed = np.unique(np.concatenate([rows for f in PROBE_FRACTIONS.values()
                                       for rows in probe_draws(n, f, num_classes, PROBE_SEED)]))
    view = _train_view(m, needed)           # only the rows some draw fits on are run (10 % of a large domain)
    lpt, lot = _logits_pair(protected, original, view, progress)
    train = {"protected": _scatter(lpt, needed, n)}
    if original is not None:
        figures["original"] = {}
        train["original"] = _scatter(lot, needed, n)
    test = {"protected": lp, "original": lo}
    for label, fraction in PROBE_FRACTIONS.items():
        for which, z in train.items():
            r = probe_accuracy(z, m.probe_y, test[which], labels, num_classes, fraction, seed=PROBE_SEED)
            figures[which][label] = r["acc"]
            figures["k"][label] = r["k"]
    return {"probe": figures}


def _train_view(m: MeasuredRows, rows: np.ndarray) -> MeasuredRows:
    x = m.probe_x.subset(rows) if isinstance(m.probe_x, Rows) else m.probe_x[rows]
    return MeasuredRows(m.name, m.role, m.path, m.images[:0], x, m.probe_y[rows], m.has_split)


def _scatter(z: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Logits of ``rows`` placed in an ``n``-row array (NaN where no probe draw looks)."""
    out = np.full((n, z.shape[1]), np.nan, z.dtype)
    out[rows] = z
    return out
