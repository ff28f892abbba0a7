"""`mapc attack`: what an adversary who holds the shipped artifact recovers on the unauthorized domains.

The artifact's ONNX graph is imported back into torch (``mapc.onnx_import``,
checked against onnxruntime before any attack) and nothing else of the
compile is used. Each attack gets a data budget, a fraction f of a domain's
labelled *train* rows (k = max(classes, floor(f * n_train)) rows, a seeded
draw; ``mapc.probe.budget_size``), and a fixed step budget; every figure is
top-1 on the domain's *test* rows, measured by onnxruntime: trained weights
are written back into the graph (``write_back``), a learned input transform
runs before the unchanged artifact.

    remap            outputs read through the best class relabelling (each predicted class -> its most
                     frequent true label on the k rows; covers every permutation) or a ridge linear probe on
                     the logits (``mapc.probe``, the figure compile and verify report); the better of the two
    target-finetune  every weight trained with cross-entropy on the k labelled unauthorized rows; beside it the
                     same graph with freshly initialised weights trained on the same rows and steps
                     ("scratch"). Protection holds where fine-tuning is no better than scratch
    source-finetune  every weight trained on k labelled *authorized* rows only; unauthorized domains measured;
                     beside it the same graph trained from scratch on those rows ("scratch")
    input-disguise   weights frozen; a 1x1 colour map (per-channel affine included) plus a residual two-layer
                     3x3 conv net in front of the artifact, trained with cross-entropy on the k labelled rows
    self-training    the k rows unlabelled: SHOT-style information maximisation (mean prediction entropy minus
                     the entropy of the mean prediction) on every weight but the classifier head

With an original model (``--baseline``) every attack also runs on it, so a
report shows what the protection costs the attacker. With the owner's watermark
key (``--ownership``) every attacked copy of the artifact (and the artifact behind
a learned input transform) is also tested for the watermark (``mapc.watermark``)
on the authorized test rows. Gates:

    max_attacked_acc   every unauthorized domain's best accuracy over all attacks but target-finetune,
                       every budget, on the artifact, and never below the artifact as shipped <= limit (percent)
    max_finetune_gain  every unauthorized domain's target-finetune accuracy minus scratch's, every budget
                       <= limit (points): no protection stops an attacker with enough labels to train a model
                       of their own, so fine-tuning is gated against that reference, not an absolute figure
Fail closed: a requested gate with nothing measured fails.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from .datasets import load_domain
from .disguise import Disguise
from .errors import UserError
from .evaluate import accuracy, run_logits, session
from .measure import MeasuredRows, measure_domains
from .onnx_import import OnnxModule, import_onnx, write_back
from .preprocess import Preprocess, apply
from .probe import budget_size, probe_accuracy

ATTACKS = ("remap", "target-finetune", "source-finetune", "input-disguise", "self-training")
DEFAULT_BUDGETS = (0.01, 0.10)
IMPORT_TOLERANCE = 1e-4       # max |logit difference| importer vs onnxruntime, relative to max(1, max |logit|)
IMPORT_CHECK_ROWS = 256       # per domain


@dataclass(frozen=True)
class AttackSettings:
    """The fixed step budget and optimiser of the trained attacks (Adam, batches drawn with replacement)."""
    steps: int = 200
    batch: int = 64
    finetune_lr: float = 1e-3      # target-finetune, source-finetune and scratch
    disguise_lr: float = 1e-2
    selftrain_lr: float = 1e-4
    seed: int = 0


@dataclass
class AttackGates:
    max_attacked_acc: float | None = None    # percent
    max_finetune_gain: float | None = None   # points over scratch


@dataclass
class AttackRequest:
    artifact: str
    authorized: dict[str, str]
    unauthorized: dict[str, str]
    baseline: str | None = None
    attacks: tuple[str, ...] = ATTACKS
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    gates: AttackGates = field(default_factory=AttackGates)
    settings: AttackSettings = field(default_factory=AttackSettings)
    provider: str = "auto"
    preprocess: Preprocess | None = None
    arch: str | None = None
    trust_pickle: bool = False
    ownership_key: str | None = None    # KEYFILE: test every attacked copy of the artifact for the watermark


@dataclass
class AttackDomain:
    """A domain's attacker-visible train rows and its measured test rows, preprocessed once."""
    name: str
    role: str
    train_x: np.ndarray
    train_y: np.ndarray
    rows: MeasuredRows


@dataclass
class Victim:
    """A model under attack: its ONNX graph and an onnxruntime session over it."""
    label: str                      # "artifact" | "original"
    model: onnx.ModelProto
    sess: object
    provider: str = "cpu"
    owner: "Owner | None" = None    # the artifact's watermark test, with --ownership

    def fresh(self) -> OnnxModule:
        return import_onnx(self.model, self.label)

    def accuracy_of(self, net: OnnxModule, domains: list[AttackDomain]) -> dict[str, float | None]:
        """Top-1 of trained weights on each domain's test rows, by onnxruntime over the written-back graph;
        None where the attacked model's logits are not finite (the attack diverged)."""
        attacked = write_back(self.model, net)
        s = session(attacked, self.provider)
        out = {d.name: finite_accuracy(run_logits(s, d.rows.x), d.rows.labels) for d in domains}
        if self.owner is not None:
            out[OWNERSHIP] = self.owner.test(lambda x: run_logits(s, x), attacked, self.model)
        return out


@dataclass
class Owner:
    """The owner's key and labelled authorized test rows: is an attacked copy still provably the owner's?

    Two tests (README, "Ownership"): the watermark, queried through the copy's outputs, and weight provenance
    (``mapc.provenance``), the copy's weights against the artifact's. OWNED when either holds (each at its
    alpha, 1e-6; together at most 2e-6)."""
    key: bytes
    x: np.ndarray
    labels: np.ndarray
    pre: Preprocess

    def test(self, logits, weights: onnx.ModelProto, reference: onnx.ModelProto) -> dict:
        from .provenance import weight_provenance
        from .watermark import measure_ownership
        o = measure_ownership(logits, self.x, self.labels, self.key, self.pre)
        w = weight_provenance(weights, reference)
        out = {k: o[k] for k in ("p_value", "log10_p", "effect", "key_acc", "control_acc", "clean_acc")}
        return {**out, "watermark_owned": o["owned"], "owned": bool(o["owned"] or w["derived"]),
                "provenance": {k: w[k] for k in ("derived", "p_value", "log10_p", "effect", "matched", "tensors")}}


OWNERSHIP = "_ownership"


def finite_accuracy(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """Top-1 (%), or None when any logit is NaN or infinite (argmax would silently read class 0)."""
    return accuracy(logits, labels) if np.isfinite(logits).all() else None


def log(msg: str) -> None:
    print(f"[mapc] {msg}", file=sys.stderr, flush=True)


def pct(v: float | None) -> str:
    return "diverged" if v is None else f"{v:.1f} %"


def run_seed(seed: int, budget_index: int, domain_index: int) -> int:
    """A distinct seed per (attack seed, budget, domain): no two runs share one."""
    return int(np.random.SeedSequence([seed, budget_index, domain_index]).generate_state(1)[0])


def budget_label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


# ---------------------------------------------------------------- training helpers

def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def train_steps(params: list[torch.Tensor], loss_fn, n: int, lr: float, s: AttackSettings, seed: int) -> None:
    """``s.steps`` Adam steps of ``loss_fn(index)`` over batches of row indices drawn from range(n)."""
    if not params:      # nothing to train (e.g. self-training a model whose only weights are its head)
        return
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    b = min(s.batch, n)
    for _ in range(s.steps):
        idx = torch.randint(n, (b,), generator=g)
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def trainable(net: OnnxModule, exclude: set[str] = frozenset()) -> list[torch.Tensor]:
    return [p for k, p in net.params.items() if k not in exclude and k not in net.statistics]


def supervised(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda idx: F.cross_entropy(net(x[idx]), y[idx])


def information_maximisation(net: nn.Module, x: torch.Tensor):
    """SHOT's IM loss: confident per-row predictions (low entropy), diverse over the batch (high marginal entropy)."""
    def loss(idx):
        p = torch.softmax(net(x[idx]), dim=1)
        entropy = -(p * torch.log(p + 1e-8)).sum(1).mean()
        mean = p.mean(0)
        diversity = -(mean * torch.log(mean + 1e-8)).sum()
        return entropy - diversity
    return loss


def reinitialise(net: OnnxModule, seed: int) -> OnnxModule:
    """Fresh weights for the same graph, as torch initialises its layers: Conv/Gemm/MatMul weights
    Kaiming-uniform (a=sqrt(5)) over their fan-in, normalisation scales 1, statistics (0, 1), every other
    1-D tensor 0, other tensors (embeddings) N(0, 0.02^2)."""
    g = torch.Generator().manual_seed(seed)
    roles = net.parameter_roles()
    with torch.no_grad():
        for k, p in net.params.items():
            role, fan_in = roles.get(k, ("other", None))
            if role == "weight" and fan_in:
                bound = math.sqrt(1.0 / fan_in)    # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), ..)
                p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=g))
            elif role in ("scale", "variance"):
                p.fill_(1.0)
            elif p.dim() <= 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net


# ---------------------------------------------------------------- the attacks

def attacker_rows(d: AttackDomain, fraction: float, num_classes: int, seed: int) -> np.ndarray:
    k = budget_size(len(d.train_x), fraction, num_classes)
    return np.random.default_rng(seed).choice(len(d.train_x), size=k, replace=False)


def run_remap(train_logits: np.ndarray, test_logits: np.ndarray, d: AttackDomain, fraction: float,
              num_classes: int, seed: int) -> dict:
    """The better of the ridge probe and the best relabelling (``mapc.probe``) on the victim's logits."""
    r = probe_accuracy(train_logits, d.train_y, test_logits, d.rows.labels, num_classes, fraction, seed=seed)
    return {"after": max(r["acc"], r["relabel_acc"]), "linear_probe": r["acc"], "relabel": r["relabel_acc"]}


def run_finetune(victim: Victim, net: OnnxModule, d: AttackDomain, rows: np.ndarray, s: AttackSettings,
                 seed: int, measured: list[AttackDomain]) -> dict[str, float]:
    x, y = _tensor(d.train_x[rows]), torch.from_numpy(d.train_y[rows]).long()
    net.train()
    train_steps(trainable(net), supervised(net, x, y), len(rows), s.finetune_lr, s, seed)
    net.eval()
    return victim.accuracy_of(net, measured)


def run_disguise(victim: Victim, d: AttackDomain, rows: np.ndarray, s: AttackSettings, seed: int) -> dict:
    net = victim.fresh()
    for p in net.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    t = Disguise(d.train_x.shape[1])
    x, y = _tensor(d.train_x[rows]), torch.from_numpy(d.train_y[rows]).long()
    train_steps(list(t.parameters()), lambda idx: F.cross_entropy(net(t(x[idx])), y[idx]), len(rows),
                s.disguise_lr, s, seed)
    def through_disguise(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            moved = np.concatenate([t(_tensor(x[i:i + 512])).numpy() for i in range(0, len(x), 512)])
        return run_logits(victim.sess, moved.astype(np.float32))
    out = {"after": finite_accuracy(through_disguise(d.rows.x), d.rows.labels)}
    if victim.owner is not None:       # the thief deploys transform + model (its weights untouched); the owner queries that
        out["ownership"] = victim.owner.test(through_disguise, victim.model, victim.model)
    return out


def run_selftraining(victim: Victim, d: AttackDomain, rows: np.ndarray, s: AttackSettings, seed: int,
                     measured: list[AttackDomain]) -> dict[str, float]:
    net = victim.fresh()
    x = _tensor(d.train_x[rows])
    train_steps(trainable(net, set(net.head_keys())), information_maximisation(net, x), len(rows),
                s.selftrain_lr, s, seed)
    return victim.accuracy_of(net, measured)


# ---------------------------------------------------------------- orchestration

def attack_domains(req: AttackRequest, pre: Preprocess, num_classes: int | None) -> list[AttackDomain]:
    """Every domain labelled and split: the attacker draws from train rows, figures come from test rows."""
    out = []
    roles = {**{n: ("authorized", p) for n, p in req.authorized.items()},
             **{n: ("unauthorized", p) for n, p in req.unauthorized.items()}}
    for name, (role, path) in roles.items():
        d = load_domain(name, path, num_classes)
        if d.labels is None or not d.has_split:
            raise UserError(f"{path}: domain {name!r} needs labels and a train/test split for mapc attack "
                            f"(the attacker draws train rows, figures come from test rows)")
        train = d.rows("train")
        if len(train) == 0:
            raise UserError(f"{path}: domain {name!r} has no train rows in 'split'; the attacker needs some")
        rows = MeasuredRows.test_rows(d, role, pre).in_memory()   # attacks train on these rows repeatedly
        train_x = rows.probe_x if rows.probe_x is not None else apply(pre, d.images[train])
        out.append(AttackDomain(name, role, train_x, d.labels[train].astype(np.int64), rows))
    return out


def check_import(victim: Victim, domains: list[AttackDomain]) -> dict:
    """The imported graph reproduces onnxruntime's logits, or attack figures would describe another model."""
    net = victim.fresh()
    worst, scale, n = 0.0, 1.0, 0
    with torch.no_grad():
        for d in domains:
            x = d.rows.x[:IMPORT_CHECK_ROWS]
            ref = run_logits(victim.sess, x)
            got = net(_tensor(x)).numpy()
            worst = max(worst, float(np.abs(ref - got).max()))
            scale = max(scale, float(np.abs(ref).max()))
            n += len(x)
    if not worst <= IMPORT_TOLERANCE * scale:    # NaN fails too
        raise UserError(f"the {victim.label}'s graph imported into torch differs from onnxruntime by {worst:.2e} "
                        f"(tolerance {IMPORT_TOLERANCE * scale:.1e}); attack figures would not describe it")
    return {"max_abs_logit_diff": worst, "rows": n, "tolerance": IMPORT_TOLERANCE * scale}


def run_attacks(req: AttackRequest, victims: list[Victim], domains: list[AttackDomain], num_classes: int,
                measured: dict[str, dict], progress: bool) -> list[dict]:
    """One row per (attack, budget, unauthorized domain): before/after per victim, scratch for both fine-tunes.
    ``measured``: the report's domain entries (mapc.measure), where the before figures come from."""
    s = req.settings
    unauth = [d for d in domains if d.role == "unauthorized"]
    auth = [d for d in domains if d.role == "authorized"]
    rows = []

    def add(attack, fraction, k, d, data, per_victim, before, **extra):
        row = {"attack": attack, "budget": budget_label(fraction), "fraction": fraction, "k": int(k),
               "data": data, "domain": d.name}
        for label, entry in per_victim.items():
            row[label] = {"before": before[label][d.name], **entry}
        row.update(extra)
        rows.append(row)
        if progress:
            a = row["artifact"]
            ref = f", scratch {pct(extra['scratch'])}" if "scratch" in extra else ""
            orig = f" (original {pct(row['original']['after'])})" if "original" in row else ""
            log(f"attack {attack} {row['budget']} ({k} rows) {d.name}: {a['before']:.1f} -> {pct(a['after'])}"
                f"{orig}{ref}")

    before = {"artifact": {n: e["protected_acc"] for n, e in measured.items()},
              "original": {n: e.get("original_acc") for n, e in measured.items()}}
    reference = replace(victims[0], owner=None)    # scratch runs: measured like the artifact, no watermark test
    logits: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}   # (victim, domain) -> train, test logits
    for bi, fraction in enumerate(req.budgets):
        for di, d in enumerate(unauth):
            seed = run_seed(s.seed, bi, di)
            picked = attacker_rows(d, fraction, num_classes, seed)
            k = len(picked)
            if "remap" in req.attacks:
                per = {}
                for v in victims:
                    if (v.label, d.name) not in logits:
                        logits[v.label, d.name] = (run_logits(v.sess, d.train_x), run_logits(v.sess, d.rows.x))
                    r = run_remap(*logits[v.label, d.name], d, fraction, num_classes, seed)
                    per[v.label] = {"after": r["after"], "linear_probe": r["linear_probe"], "relabel": r["relabel"]}
                add("remap", fraction, k, d, "labelled unauthorized", per, before)
            if "target-finetune" in req.attacks:
                per = {}
                for v in victims:
                    acc = run_finetune(v, v.fresh(), d, picked, s, seed, [d] + auth)
                    per[v.label] = attacked_entry(acc, d, auth)
                scratch_net = reinitialise(reference.fresh(), seed)
                scratch = run_finetune(reference, scratch_net, d, picked, s, seed, [d])[d.name]
                ok = per["artifact"]["after"] is not None and scratch is not None
                add("target-finetune", fraction, k, d, "labelled unauthorized", per, before, scratch=scratch,
                    gain=per["artifact"]["after"] - scratch if ok else None)
            if "input-disguise" in req.attacks:
                per = {v.label: run_disguise(v, d, picked, s, seed) for v in victims}
                add("input-disguise", fraction, k, d, "labelled unauthorized", per, before)
            if "self-training" in req.attacks:
                per = {}
                for v in victims:
                    acc = run_selftraining(v, d, picked, s, seed, [d] + auth)
                    per[v.label] = attacked_entry(acc, d, auth)
                add("self-training", fraction, k, d, "unlabelled unauthorized", per, before)
        if "source-finetune" in req.attacks and auth:
            a = auth[0]
            seed = run_seed(s.seed, bi, len(unauth))
            picked = attacker_rows(a, fraction, num_classes, seed)
            results = {v.label: run_finetune(v, v.fresh(), a, picked, s, seed, domains) for v in victims}
            scratch = run_finetune(reference, reinitialise(reference.fresh(), seed), a, picked, s, seed, domains)
            for d in unauth:
                per = {label: attacked_entry(acc, d, auth) for label, acc in results.items()}
                add("source-finetune", fraction, len(picked), d, f"labelled authorized ({a.name})", per, before,
                    scratch=scratch[d.name])
    return rows


def attacked_entry(acc: dict, d: AttackDomain, auth: list[AttackDomain]) -> dict:
    """A victim's figures after a weight-changing attack: the domain, the authorized domain, ownership."""
    entry = {"after": acc[d.name]}
    if auth:
        entry["authorized_after"] = acc[auth[0].name]
    if OWNERSHIP in acc:
        entry["ownership"] = acc[OWNERSHIP]
    return entry


def worst_cases(rows: list[dict], before: dict[str, float]) -> dict:
    """Per unauthorized domain: the best accuracy the holder of the artifact gets without fine-tuning on the
    domain's labels, the unattacked artifact included (an attack never makes it lower), and the largest
    target-finetune gain over scratch. A diverged attack (non-finite logits) leaves its figure unmeasured."""
    out = {}
    for name, acc in before.items():
        mine = [r for r in rows if r["domain"] == name]
        attacked = [r for r in mine if r["attack"] != "target-finetune"]
        ft = [r for r in mine if r["attack"] == "target-finetune"]
        entry = {"before": acc}
        diverged = [f"{r['attack']} {r['budget']}" for r in mine if r["artifact"]["after"] is None]
        if diverged:
            entry["diverged"] = diverged
        if attacked and not any(r["artifact"]["after"] is None for r in attacked):
            top = max(attacked, key=lambda r: r["artifact"]["after"])
            if top["artifact"]["after"] >= acc:
                entry.update(attacked_acc=top["artifact"]["after"], attack=top["attack"], budget=top["budget"])
            else:
                entry.update(attacked_acc=acc, attack="none (no attack beat the artifact as shipped)",
                             budget="-")
            originals = [r["original"]["after"] for r in attacked if "original" in r]
            if originals and None not in originals:
                entry["original_attacked_acc"] = max(originals)
        if ft and not any(r.get("gain") is None for r in ft):
            top = max(ft, key=lambda r: r["gain"])
            entry.update(finetune_gain=top["gain"], finetune_budget=top["budget"],
                         finetune_acc=top["artifact"]["after"], scratch_acc=top["scratch"])
        out[name] = entry
    return out


def evaluate_attack_gates(g: AttackGates, worst: dict) -> list[dict]:
    from .gates import _gate
    out = []
    for name, key, limit, missing in (
            ("max_attacked_acc", "attacked_acc", g.max_attacked_acc,
             "no attack other than target-finetune ran, or one diverged"),
            ("max_finetune_gain", "finetune_gain", g.max_finetune_gain, "target-finetune did not run, or diverged")):
        if limit is None:
            continue
        if not worst:
            out.append(_gate(name, limit, None, "-", False, "no unauthorized data; give --unauthorized NAME=PATH"))
        for domain, e in worst.items():
            v = e.get(key)
            out.append(_gate(name, limit, v, domain, v is not None and v <= limit, missing))
    return out


def attack(req: AttackRequest, progress: bool = True) -> dict:
    from .report import report_header
    from .verify import artifact_preprocess, baseline_model, load_artifact, sha256_file

    t_all = time.perf_counter()
    validate_request(req)
    model = load_artifact(req.artifact)
    pre = artifact_preprocess(model, req.artifact, req.preprocess)
    s_prot = session(str(req.artifact), req.provider, source=str(req.artifact))
    out_dim = s_prot.get_outputs()[0].shape[-1]
    num_classes = int(out_dim) if isinstance(out_dim, int) else None
    domains = attack_domains(req, pre, num_classes)
    num_classes = num_classes or int(max(int(d.train_y.max()) for d in domains) + 1)
    check_classifier(s_prot, req.artifact)
    victims = [Victim("artifact", model, s_prot, req.provider, owner_of(req, domains, pre))]
    baseline = None
    if req.baseline:
        base_model, base_format = baseline_model(req.baseline, pre, req.arch, req.trust_pickle)
        s_base = session(base_model, req.provider, source=str(req.baseline))
        check_classifier(s_base, req.baseline)
        if s_base.get_inputs()[0].shape[1:] != s_prot.get_inputs()[0].shape[1:] or \
                s_base.get_outputs()[0].shape[-1] != s_prot.get_outputs()[0].shape[-1]:
            raise UserError(f"{req.baseline}: the baseline takes {s_base.get_inputs()[0].shape} and gives "
                            f"{s_base.get_outputs()[0].shape}, the artifact {s_prot.get_inputs()[0].shape} and "
                            f"{s_prot.get_outputs()[0].shape}; pass the model the artifact was compiled from")
        victims.append(Victim("original", base_model, s_base, req.provider))
        baseline = {"path": str(req.baseline), "sha256": sha256_file(req.baseline), "format": base_format}
    t_load = time.perf_counter() - t_all

    measurement = measure_domains(s_prot, [d.rows for d in domains],
                                  original=victims[1].sess if len(victims) > 1 else None)
    importer = {v.label: check_import(v, domains) for v in victims}
    t0 = time.perf_counter()
    torch.manual_seed(req.settings.seed)
    rows = run_attacks(req, victims, domains, num_classes, measurement.domains, progress)
    t_attacks = time.perf_counter() - t0
    worst = worst_cases(rows, {n: e["protected_acc"] for n, e in measurement.domains.items()
                               if e["role"] == "unauthorized"})
    gates = evaluate_attack_gates(req.gates, worst)
    report = report_header("attack", s_prot.get_providers(), pre, measurement, gates) | {
        "artifact": {"path": str(req.artifact), "sha256": sha256_file(req.artifact)},
        "baseline": baseline,
        "importer": importer,
        "settings": {"attacks": list(req.attacks), "budgets": list(req.budgets),
                     **{k: getattr(req.settings, k) for k in req.settings.__dataclass_fields__}},
        "attacks": rows,
        "worst": worst,
        "timings": {"load_seconds": t_load, "attacks_seconds": t_attacks,
                    "total_seconds": time.perf_counter() - t_all},
    }
    if victims[0].owner is not None:
        report["ownership_after_attacks"] = ownership_summary(rows)
    attacked = [e["attacked_acc"] for e in worst.values() if e.get("attacked_acc") is not None]
    report["max_attacked_acc"] = max(attacked) if attacked else None
    report["_examples"] = measurement.examples
    return report


def owner_of(req: AttackRequest, domains: list[AttackDomain], pre: Preprocess) -> Owner | None:
    if req.ownership_key is None:
        return None
    from .watermark import read_key
    key = read_key(req.ownership_key)
    auth = [d for d in domains if d.role == "authorized"]
    if not auth:
        raise UserError("--ownership tests attacked copies on the owner's rows: give --authorized NAME=PATH")
    return Owner(key, auth[0].rows.x, auth[0].rows.labels, pre)


def ownership_summary(rows: list[dict]) -> dict:
    """How many attacked copies of the artifact still test as owned, and the weakest one."""
    tested = [(r, r["artifact"]["ownership"]) for r in rows if "ownership" in r["artifact"]]
    out = {"attacked_copies": len(tested), "owned": sum(o["owned"] for _, o in tested),
           "watermark_owned": sum(o["watermark_owned"] for _, o in tested),
           "derived": sum(o["provenance"]["derived"] for _, o in tested)}
    if tested:
        r, o = max(tested, key=lambda t: t[1]["log10_p"])
        out["weakest"] = {"attack": r["attack"], "budget": r["budget"], "domain": r["domain"], **o}
    return out


def check_classifier(sess, path: str) -> None:
    """One input, and a first output of shape (batch, classes)."""
    ins, out = sess.get_inputs(), sess.get_outputs()[0]
    if len(ins) != 1 or len(out.shape) != 2:
        raise UserError(f"{path}: mapc attacks classifiers with one input and (batch, classes) logits; this model has "
                        f"{len(ins)} inputs and output shape {out.shape}")


def validate_request(req: AttackRequest) -> None:
    if not req.unauthorized:
        raise UserError("give the unauthorized domains to attack: --unauthorized NAME=PATH (repeatable)")
    if len(req.authorized) > 1:
        raise UserError("one --authorized domain at most")
    overlap = set(req.authorized) & set(req.unauthorized)
    if overlap:
        raise UserError(f"domain names used as both authorized and unauthorized: {sorted(overlap)}")
    unknown = [a for a in req.attacks if a not in ATTACKS]
    if unknown:
        raise UserError(f"--attack {unknown[0]!r} is not an attack; choose from {', '.join(ATTACKS)}")
    if "source-finetune" in req.attacks and not req.authorized:
        raise UserError("the source-finetune attack trains on authorized rows: give --authorized NAME=PATH, or "
                        "leave it out with --attack")
    for b in req.budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not 0 < b <= 1:
            raise UserError(f"--budget {b!r}: give a fraction of the train rows in (0, 1], e.g. 0.01 or 0.1")
    labels = [budget_label(b) for b in req.budgets]
    if len(set(labels)) != len(labels):
        raise UserError(f"--budget given twice (as {', '.join(labels)}); give distinct fractions")
