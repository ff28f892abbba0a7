"""Learning a binary mask over frozen weights (MAP).

For every maskable weight W0 (Conv/Linear weights: parameters named
``*.weight`` with two or more dimensions, minus the excluded ones) we keep a
real score tensor S of the mask's shape (W0's shape per weight, ``[out, 1, ...]``
per output channel) and use the binary mask M = 1[S > 0]:

    forward:   W_eff = W0 * M                         (exactly binary, always)
    backward:  dL/dS = sum_broadcast(dL/dW_eff * W0) * sigmoid'(S / T) / T

(a straight-through estimator whose surrogate is a sigmoid of temperature T).
The effective weight is written into the module's own parameter before each
forward, so one mechanism serves plain modules, TorchScript archives and
torch.export programs alike; W0 is restored when learning ends. Nothing but
S is optimised: BatchNorm statistics, biases and the weights themselves never
change (modules stay in eval mode).

Objective on a step with an authorized batch (xa, ya) and unauthorized
batches xu_k (labels yu_k, or the frozen model's predictions without them):

    L = CE(f_M(xa), ya) + KL(f_s(xa) || f_M(xa))
      + lambda(t) * mean_k w_k [ u * (CE(f_M(xu_k), uniform) - log C)
                                 + beta * softplus(z_y - max_{j != y} z_j + m)
                                 + rho * R2_k + gamma * B_k ]

R2_k (``probe_weight`` rho, default 2) is an adversarial linear probe inside
the loss: on the batch's logits z standardised per column (batch mean/std) plus
a bias column X, the closed-form ridge map W = (X^T X + a I)^-1 X^T Y to the
one-hot labels Y (``probe_alpha`` a, a differentiable torch.linalg.solve) and
its in-sample R^2 = ||X W - mean(Y)||^2 / ||Y - mean(Y)||^2. The mask
minimises what the probe explains, so the outputs lose label information an
attacker with a few labelled rows could read back (a margin alone leaves the
true class systematically low, which is itself a label). B_k
(``independence_weight`` gamma, default 0) is the between-class scatter of the
log-probabilities over their total scatter. With 10 classes and 32 rows both
have a floor above 0 from chance alone; only their gradient matters.

lambda ramps linearly from 0 to ``target_weight`` over ``ramp_steps`` (at most a third of the steps). The
uniform term drives outputs toward chance; the margin term makes sure the
true class does not stay on top of a near-uniform output (what accuracy
measures); u is ``uniform_weight`` (default 1). Without authorized labels the CE term is dropped. With
``adaptive_domains`` (default) each unauthorized domain's term is weighted by
its current batch accuracy (+1/C), normalised to mean 1 (w_k), so the domain still
recognised gets the push. Optional: ``feature_weight`` adds the normalised
squared distance between masked and frozen BatchNorm inputs on authorized
batches (meant for synthesized data).

Saliency lock (``keep_salient`` = f): before learning, every maskable weight
gets the saliency s = sum_batches (dL/dW * W0)^2 of the frozen model on the
authorized (or synthesized pseudo-authorized) train rows, L = CE(f_s(x), y)
(summed over the output channel for per-channel masks). In each tensor the
fraction f with the highest saliency is locked: kept whatever its score, and
its score gets no gradient. This bounds what the mask can take from the
authorized domain when the keep-side data only approximates it (synthesized
images); f = 0 locks nothing.

Optimiser: momentum SGD on per-tensor RMS-normalised score gradients (Adam
moves every score at the same rate and flips most of a layer at once).
The returned mask is the one, among checkpoints every ``eval_every`` steps,
with the lowest worst unauthorized validation accuracy whose validation
source drop stays within ``source_budget`` points (validation rows are held
out of the train rows, never the test rows).
"""
from __future__ import annotations

import fnmatch
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .config import MaskConfig


SALIENCY_ROWS = 2048  # authorized rows the saliency is summed over


@dataclass
class MaskedParam:
    name: str
    param: torch.nn.Parameter
    original: torch.Tensor      # W0, a private copy
    score: torch.Tensor         # the optimised leaf tensor
    lock: torch.Tensor | None = None   # bool, score's shape: entries kept whatever the score

    def mask(self) -> torch.Tensor:
        keep = self.score > 0
        if self.lock is not None:
            keep = keep | self.lock
        return keep.to(self.original.dtype)


@dataclass
class MaskResult:
    masks: dict[str, np.ndarray]         # torch parameter name -> {0,1} array of the weight's shape
    granularity: str
    history: list[dict]
    seconds: float
    selected_step: int = -1

    def density(self) -> dict[str, float]:
        return {k: float(m.mean()) for k, m in self.masks.items()}

    def pruned_fraction(self) -> float:
        total = sum(m.size for m in self.masks.values())
        return float(sum(m.size - m.sum() for m in self.masks.values()) / max(total, 1))


def maskable_names(module: torch.nn.Module, num_classes: int, cfg: MaskConfig) -> list[str]:
    """Conv/Linear weights selected by include/exclude; the final classifier is excluded by default.

    The classifier is the last registered weight whose first dimension equals
    the number of classes.
    """
    from .errors import UserError
    weights = [n for n, p in module.named_parameters() if n.endswith("weight") and p.ndim >= 2]
    if not weights:
        raise UserError("the model has no Conv or Linear weights to mask")
    shapes = dict((n, p.shape) for n, p in module.named_parameters())
    classifier = [n for n in weights if shapes[n][0] == num_classes]
    excluded = set()
    if classifier and not cfg.mask_classifier:
        excluded.add(classifier[-1])
    chosen = [n for n in weights
              if any(fnmatch.fnmatchcase(n, pat) for pat in cfg.include)
              and not any(fnmatch.fnmatchcase(n, pat) for pat in cfg.exclude)
              and n not in excluded]
    if not chosen:
        raise UserError(f"mask.include/exclude select no layer; maskable weights are {weights}")
    return chosen


def prepare(module: torch.nn.Module, names: list[str], cfg: MaskConfig, device: torch.device) -> list[MaskedParam]:
    params = dict(module.named_parameters())
    for p in module.parameters():
        p.requires_grad_(False)
    out = []
    for n in names:
        p = params[n]
        p.requires_grad_(True)
        shape = p.shape if cfg.granularity == "weight" else (p.shape[0],) + (1,) * (p.ndim - 1)
        score = torch.full(shape, cfg.score_init, dtype=torch.float32, device=device, requires_grad=True)
        out.append(MaskedParam(n, p, p.detach().clone(), score))
    return out


def apply_masks(masked: list[MaskedParam]) -> None:
    with torch.no_grad():
        for m in masked:
            m.param.copy_(m.original * m.mask())


def restore_values(masked: list[MaskedParam]) -> None:
    with torch.no_grad():
        for m in masked:
            m.param.copy_(m.original)


def restore(masked: list[MaskedParam]) -> None:
    restore_values(masked)
    for m in masked:
        m.param.requires_grad_(False)


def to_score_shape(t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor in the score's shape: summed over each output channel for channel masks."""
    return t if t.shape == score.shape else t.sum(dim=tuple(range(1, t.ndim)), keepdim=True)


@torch.no_grad()
def backprop_scores(masked: list[MaskedParam], temperature: float) -> None:
    """Chain dL/dW_eff to the scores through the sigmoid surrogate; locked entries get none."""
    for m in masked:
        g = m.param.grad
        if g is None:
            m.score.grad = torch.zeros_like(m.score)
            continue
        s = torch.sigmoid(m.score / temperature)
        surrogate = s * (1 - s) / temperature
        m.score.grad = to_score_shape(g * m.original, m.score) * surrogate
        if m.lock is not None:
            m.score.grad[m.lock] = 0.0
        m.param.grad = None


def saliency(module: torch.nn.Module, masked: list[MaskedParam], x: torch.Tensor, y: torch.Tensor,
             batch: int = 256) -> list[torch.Tensor]:
    """Per masked parameter, sum over batches of (dCE/dW * W0)^2, in the score's shape.

    Computed with the frozen (unmasked) weights in place; torch.autograd.grad leaves ``.grad`` untouched.
    """
    restore_values(masked)
    total = [torch.zeros_like(m.score) for m in masked]
    for i in range(0, len(x), batch):
        loss = F.cross_entropy(module(x[i:i + batch]), y[i:i + batch], reduction="sum")
        grads = torch.autograd.grad(loss, [m.param for m in masked], allow_unused=True)
        with torch.no_grad():
            for k, (m, g) in enumerate(zip(masked, grads)):
                if g is None:
                    continue
                total[k] += to_score_shape((g * m.original).pow(2), m.score)
    return total


def top_fraction(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean tensor marking the ``ceil(fraction * n)`` largest entries (ties as torch.topk picks them)."""
    flat = values.flatten()
    k = math.ceil(fraction * flat.numel())
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=values.device)
    if k > 0:
        out[torch.topk(flat, k, sorted=False).indices] = True
    return out.view(values.shape)


def uniform_ce(logits: torch.Tensor) -> torch.Tensor:
    return -F.log_softmax(logits, 1).mean(1).mean()


def margin_loss(logits: torch.Tensor, y: torch.Tensor, margin: float, fn: str = "softplus") -> torch.Tensor:
    """softplus (or hinge) of z_y - max_{j != y} z_j + margin: pushes the true class off the top."""
    zy = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    gap = zy - others + margin
    if fn == "hinge":
        return F.relu(gap).mean()
    if fn == "top":  # only rows whose true class is still on top: no push below chance
        return (F.softplus(gap) * (zy >= others).float()).mean()
    return F.softplus(gap).mean()


def between_class_ratio(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """sum_c n_c ||mu_c - mu||^2 / sum_i ||p_i - mu||^2 of the log-probabilities p (0: no label in the mean)."""
    p = F.log_softmax(logits, 1)
    mu = p.mean(0, keepdim=True)
    onehot = F.one_hot(y, num_classes).to(p.dtype)                 # n x C
    counts = onehot.sum(0)                                         # C
    sums = onehot.T @ (p - mu)                                     # C x C: per-class sum of centred rows
    between = (sums.pow(2).sum(1) / counts.clamp(min=1)).sum()
    total = (p - mu).pow(2).sum()
    return between / (total + 1e-8)


def probe_r2(logits: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float) -> torch.Tensor:
    """In-sample R^2 of a closed-form ridge map from the batch's standardised logits (+ bias) to one-hot labels."""
    z = logits.double()
    x = (z - z.mean(0, keepdim=True)) / (z.std(0, keepdim=True) + 1e-6)
    x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    yy = F.one_hot(y, num_classes).to(x.dtype)
    yc = yy - yy.mean(0, keepdim=True)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(x.T @ x + alpha * eye, x.T @ yy)
    fit = x @ w - yy.mean(0, keepdim=True)
    return (fit.pow(2).sum() / (yc.pow(2).sum() + 1e-8)).float()


@dataclass
class TrainData:
    """Preprocessed train rows on the learning device."""
    auth_x: torch.Tensor
    auth_y: torch.Tensor | None
    auth_teacher: torch.Tensor           # frozen model's log-probabilities on auth_x
    unauth: list[tuple[torch.Tensor, torch.Tensor]]  # (x, labels or pseudo-labels)
    val_auth: tuple[torch.Tensor, torch.Tensor] | None = None      # (x, labels or teacher labels)
    val_unauth: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def split_validation(x: torch.Tensor, y: torch.Tensor, n_val: int, rng: np.random.Generator):
    """Hold ``n_val`` rows (at most a quarter) out of the train rows for mask selection."""
    n_val = min(n_val, len(x) // 4)
    order = torch.from_numpy(rng.permutation(len(x)))
    va, tr = order[:n_val], order[n_val:]
    return (x[tr], y[tr]), (x[va], y[va])


def _accuracy(module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024, tap=None) -> float:
    if len(x) == 0:
        return 0.0
    with torch.no_grad():
        pred = []
        for i in range(0, len(x), batch):
            pred.append(module(x[i:i + batch]).argmax(1))
            if tap is not None:
                tap.take()
        pred = torch.cat(pred)
    return float((pred == y).float().mean() * 100)


def selection_key(src_drop: float, unauth_acc: list[float], budget: float) -> tuple:
    """Lower is better: feasible masks (drop within budget) by worst unauthorized accuracy, then by drop."""
    worst = max(unauth_acc) if unauth_acc else 0.0
    if src_drop <= budget:
        return (0, worst, src_drop)
    return (1, src_drop, worst)


def feature_loss(masked_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], n: int) -> torch.Tensor:
    """Mean over layers of the normalised squared distance of the first ``n`` rows' features."""
    total = 0.0
    for fm, ft in zip(masked_feats, teacher_feats):
        fm, ft = fm[:n], ft[:n]
        total = total + (fm - ft).pow(2).mean() / (ft.pow(2).mean() + 1e-8)
    return total / max(len(teacher_feats), 1)


def learn_mask(module: torch.nn.Module, data: TrainData, num_classes: int, cfg: MaskConfig,
               seed: int, device: torch.device, progress: bool = True) -> MaskResult:
    import contextlib

    from tqdm import tqdm

    from .taps import BatchNormTap

    tap_ctx = BatchNormTap(module) if cfg.feature_weight > 0 else contextlib.nullcontext()
    with tap_ctx as tap:
        return _learn(module, data, num_classes, cfg, seed, device, progress, tap, tqdm)


def _learn(module, data, num_classes, cfg, seed, device, progress, tap, tqdm) -> MaskResult:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    names = maskable_names(module, num_classes, cfg)
    masked = prepare(module, names, cfg, device)
    if cfg.keep_salient:
        rows = torch.from_numpy(rng.permutation(len(data.auth_x))[:SALIENCY_ROWS]).to(device)
        labels = data.auth_y if data.auth_y is not None else data.auth_teacher.argmax(1)
        for m, sal in zip(masked, saliency(module, masked, data.auth_x[rows], labels[rows])):
            m.lock = top_fraction(sal, cfg.keep_salient)
    scores = [m.score for m in masked]
    opt = (torch.optim.Adam(scores, lr=cfg.lr) if cfg.optimizer == "adam"
           else torch.optim.SGD(scores, lr=cfg.lr, momentum=0.9))
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.05)
             if cfg.cosine_lr else None)
    history: list[dict] = []
    selected = None  # (key, step, masks)
    base_val = None
    if data.val_auth is not None and len(data.val_auth[0]) > 0:  # tiny data: no selection, last mask
        base_val = _accuracy(module, *data.val_auth, tap=tap)
    t0 = time.perf_counter()
    bs = cfg.batch_size
    ramp = max(1, min(cfg.ramp_steps, cfg.steps // 3))
    try:
        bar = tqdm(range(cfg.steps), desc="mask", file=sys.stderr, disable=not progress, leave=False,
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
        for step in bar:
            lam = cfg.target_weight * min(1.0, (step + 1) / ramp)
            ia = torch.from_numpy(rng.integers(0, len(data.auth_x), bs)).to(device)
            xa = data.auth_x[ia]
            teacher = data.auth_teacher[ia]
            teacher_feats = None
            if tap is not None:
                with torch.no_grad():
                    restore_values(masked)
                    tap.take()
                    module(xa)
                    teacher_feats = [x.detach() for x, _, _ in tap.take()]
            xs = [xa]
            ys = []
            for ux, uy in data.unauth:
                iu = torch.from_numpy(rng.integers(0, len(ux), bs)).to(device)
                xs.append(ux[iu])
                ys.append(uy[iu])
            apply_masks(masked)
            logits = module(torch.cat(xs))
            masked_feats = [x for x, _, _ in tap.take()] if tap is not None else None
            za = logits[:bs]
            logp = F.log_softmax(za, 1)
            loss_src = cfg.kl_weight * F.kl_div(logp, teacher, log_target=True, reduction="batchmean")
            if data.auth_y is not None:
                loss_src = loss_src + F.cross_entropy(za, data.auth_y[ia])
            if teacher_feats is not None:
                loss_src = loss_src + cfg.feature_weight * feature_loss(masked_feats, teacher_feats, bs)
            loss_tgt = torch.zeros((), device=device)
            per_domain = []
            for k, yk in enumerate(ys):
                zu = logits[bs * (k + 1): bs * (k + 2)]
                lk = cfg.uniform_weight * (uniform_ce(zu) - math.log(num_classes))
                if cfg.independence_weight > 0:
                    lk = lk + cfg.independence_weight * between_class_ratio(zu, yk, num_classes)
                if cfg.probe_weight > 0:
                    lk = lk + cfg.probe_weight * probe_r2(zu, yk, num_classes, cfg.probe_alpha)
                if cfg.margin_weight > 0:
                    lk = lk + cfg.margin_weight * margin_loss(zu, yk, cfg.margin, cfg.margin_fn)
                per_domain.append(lk)
            if per_domain:
                weights = torch.ones(len(per_domain), device=device)
                if cfg.adaptive_domains:
                    with torch.no_grad():
                        accs = torch.stack([(logits[bs * (k + 1): bs * (k + 2)].argmax(1) == yk).float().mean()
                                            for k, yk in enumerate(ys)]) + 1.0 / num_classes
                        weights = accs / accs.mean()
                loss_tgt = (torch.stack(per_domain) * weights).mean()
            loss = cfg.source_weight * loss_src + lam * loss_tgt
            opt.zero_grad(set_to_none=True)
            loss.backward()
            backprop_scores(masked, cfg.temperature)
            if cfg.optimizer == "sgd":
                for sc in scores:
                    sc.grad /= sc.grad.pow(2).mean().sqrt() + 1e-12
            opt.step()
            if sched is not None:
                sched.step()
            last = step == cfg.steps - 1
            if base_val is not None and step >= ramp and (step % cfg.eval_every == 0 or last):
                apply_masks(masked)
                drop = base_val - _accuracy(module, *data.val_auth, tap=tap)
                accs = [_accuracy(module, x, y, tap=tap) for x, y in data.val_unauth]
                key = selection_key(drop, accs, cfg.source_budget)
                history.append({"step": step, "val_source_drop": drop, "val_unauthorized_acc": accs})
                if selected is None or key < selected[0]:
                    selected = (key, step, {m.name: m.mask().clone() for m in masked})
            if step % 20 == 0 or step == cfg.steps - 1:
                with torch.no_grad():
                    kept = sum(float(m.mask().sum()) for m in masked) / sum(m.original.numel() if cfg.granularity == "weight" else m.score.numel() for m in masked)
                    acc_a = float((za.argmax(1) == (data.auth_y[ia] if data.auth_y is not None else data.auth_teacher[ia].argmax(1))).float().mean())
                    acc_u = [float((logits[bs * (k + 1): bs * (k + 2)].argmax(1) == yk).float().mean()) for k, yk in enumerate(ys)]
                history.append({"step": step, "loss_source": loss_src.item(), "loss_target": loss_tgt.item(),
                                "lambda": lam, "kept": kept, "batch_acc_authorized": acc_a,
                                "batch_acc_unauthorized": acc_u})
                bar.set_postfix(src=f"{loss_src.item():.3f}", tgt=f"{loss_tgt.item():.3f}", kept=f"{kept:.3f}",
                                refresh=False)
        with torch.no_grad():
            masks = {}
            chosen = selected[2] if selected is not None else {m.name: m.mask() for m in masked}
            for m in masked:
                full = chosen[m.name].expand_as(m.original) if cfg.granularity == "channel" else chosen[m.name]
                masks[m.name] = full.detach().cpu().numpy().astype(np.uint8).copy()
    finally:
        restore(masked)
    return MaskResult(masks, cfg.granularity, history, time.perf_counter() - t0,
                      selected_step=selected[1] if selected is not None else cfg.steps - 1)


def masked_forward(module: torch.nn.Module, masks: dict[str, np.ndarray], x: np.ndarray,
                   batch: int = 512) -> np.ndarray:
    """Logits of the masked model (parity reference for the artifact); weights restored afterwards."""
    params = dict(module.named_parameters())
    saved = {n: params[n].detach().clone() for n in masks}
    try:
        with torch.no_grad():
            for n, m in masks.items():
                params[n].copy_(saved[n] * torch.from_numpy(m).to(saved[n].dtype).to(saved[n].device))
            dev = next(module.parameters()).device
            out = [module(torch.from_numpy(x[i:i + batch]).to(dev)).cpu() for i in range(0, len(x), batch)]
    finally:
        with torch.no_grad():
            for n in masks:
                params[n].copy_(saved[n])
    return torch.cat(out).numpy()
