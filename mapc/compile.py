"""The compile job: frozen model + data -> protected ONNX artifact + report.

Steps (each timed): load model and data -> learn the mask on train rows ->
export the original model -> run the pass pipeline (fold masks, optimise,
strip, seal, audit, check) -> measure original and protected with
onnxruntime on test rows -> parity of artifact vs masked torch model ->
write OUTDIR/protected.onnx and OUTDIR/report.json atomically.

Invariant: the unprotected model is never written to OUTDIR; the source
model's weights are identical before and after (checked).
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import passes

from . import __version__
from .atomic import foreign_entries, staged_dir
from .config import CompileConfig
from .datasets import Domain, load_domain
from .errors import UserError
from .evaluate import accuracy, latency_pair_ms, run_logits, session, st_d, wilson_interval
from .export import export_onnx
from .gates import evaluate_gates
from .masking import TrainData, learn_mask, masked_forward, split_validation
from .models import load_model
from .preprocess import apply
from .synthesis import to_uint8_images
from .report import REPORT_SCHEMA_VERSION, report_files, tool_versions, verdict

ARTIFACT = "protected.onnx"
REPORT = "report.json"


def log(msg: str) -> None:
    print(f"[mapc] {msg}", file=sys.stderr, flush=True)


def torch_device(device: str) -> torch.device:
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device; install a CUDA build of torch or use --device cpu")
        return torch.device("cuda")
    if device == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def probe_classes(module: torch.nn.Module, input_shape: tuple[int, ...], model_path: str) -> int:
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *input_shape))
    except Exception as e:
        raise UserError(f"{model_path}: the model does not run on a {(2, *input_shape)} input "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); set preprocess.size/channels")
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] < 2:
        raise UserError(f"{model_path}: expected class logits of shape (batch, classes), got "
                        f"{getattr(out, 'shape', type(out).__name__)}")
    if not bool(torch.isfinite(out).all()):
        raise UserError(f"{model_path}: the model's outputs are NaN or infinite on a zero input; fix the model")
    return int(out.shape[1])


def weights_fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for n, t in sorted(module.state_dict().items()):
        h.update(n.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None


def prepare_domain(d: Domain, cfg: CompileConfig) -> Split:
    tr, te = d.rows("train"), d.rows("test")
    if len(tr) == 0 or len(te) == 0:
        raise UserError(f"{d.path}: domain {d.name!r} has no {'train' if len(tr) == 0 else 'test'} rows in 'split'")
    lab = d.labels
    return Split(apply(cfg.preprocess, d.images[tr]), None if lab is None else lab[tr],
                 apply(cfg.preprocess, d.images[te]), None if lab is None else lab[te])


def predict(module: torch.nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(x[i:i + batch]) for i in range(0, len(x), batch)])


def compile_model(cfg: CompileConfig, outdir: str | Path, progress: bool = True,
                  external_threshold: int = passes.PROTOBUF_LIMIT) -> dict:
    timings: dict[str, float] = {}
    say = log if progress else (lambda _msg: None)  # -q: neither progress bars nor log lines
    t_all = time.perf_counter()
    mode = cfg.resolved_mode()
    check_mode_data(mode, cfg)
    check_output_dir(Path(outdir))
    if cfg.model is None:
        raise UserError("no model given: pass MODEL or set model = \"...\" in the config")
    device = torch_device(cfg.device)

    t0 = time.perf_counter()
    loaded = load_model(cfg.model, cfg.arch, cfg.trust_pickle)
    module = loaded.module
    num_classes = probe_classes(module, cfg.preprocess.input_shape, cfg.model)
    fingerprint = weights_fingerprint(module)
    domains = {n: load_domain(n, p, num_classes) for n, p in {**cfg.authorized, **cfg.unauthorized}.items()}
    auth_name = next(iter(cfg.authorized), None)
    splits = {n: prepare_domain(d, cfg) for n, d in domains.items()}
    timings["load_seconds"] = time.perf_counter() - t0
    say(f"model {Path(cfg.model).name} ({loaded.format}), {num_classes} classes; mode {mode}; "
        f"authorized {auth_name or '-'}, unauthorized {', '.join(cfg.unauthorized) or '-'}; device {device}")

    # --- the data the mask learns from: real train rows, or synthesized (a validation slice selects the mask) ---
    module.to(device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    synthesis_stats, synthetic_preview = None, None

    def tensors(s: Split):
        x = torch.from_numpy(s.x_train).to(device)
        y = torch.from_numpy(s.y_train).to(device) if s.y_train is not None else predict(module, x).argmax(1)
        return split_validation(x, y, cfg.mask.val_rows, rng)

    synthesized = mode != "source-available"
    if not synthesized:
        (ax, ay), va = tensors(splits[auth_name])
        has_auth_labels = splits[auth_name].y_train is not None
    else:
        from .synthesis import invert
        say(f"synthesizing {cfg.synthesis.images} pseudo-authorized images by model inversion")
        sx, sy, synthesis_stats = invert(module, loaded.format, cfg.preprocess.input_shape, num_classes,
                                         cfg.synthesis, cfg.seed, device, progress=progress)
        timings["synthesis_seconds"] = synthesis_stats["seconds"]
        say(f"synthesis: {synthesis_stats['seconds']:.1f} s; BN-statistics mismatch {synthesis_stats['bn_mismatch_synthetic']:.3f} "
            f"(Gaussian noise: {synthesis_stats['bn_mismatch_noise']:.3f})")
        synthetic_preview = sx[:32].cpu()
        (ax, ay), va = split_validation(sx, sy, cfg.mask.val_rows, rng)
        has_auth_labels = True
    t0 = time.perf_counter()
    teacher = F.log_softmax(predict(module, ax), 1)
    unauth, vunauth = [], []
    if mode == "data-free":
        from .synthesis import neighbor_domains
        pseudo_labels = ay  # the shifts keep the class content
        for shifted in neighbor_domains(ax, cfg.seed, cfg.preprocess.mean, cfg.preprocess.std):
            unauth.append((shifted, pseudo_labels))
        for shifted in neighbor_domains(va[0], cfg.seed + 1, cfg.preprocess.mean, cfg.preprocess.std):
            vunauth.append((shifted, va[1]))
    else:
        for n in cfg.unauthorized:
            tr, vv = tensors(splits[n])
            unauth.append(tr)
            vunauth.append(vv)
    data = TrainData(ax, ay if has_auth_labels else None, teacher, unauth, va, vunauth)
    mask_cfg = cfg.mask.resolved_for(synthesized_authorized=synthesized)
    result = learn_mask(module, data, num_classes, mask_cfg, cfg.seed, device, progress=progress)
    module.to("cpu")
    timings["mask_seconds"] = time.perf_counter() - t0
    if weights_fingerprint(module) != fingerprint:
        raise RuntimeError("internal error: mask learning changed the frozen weights")
    say(f"mask: {result.pruned_fraction() * 100:.1f} % of masked weights pruned "
        f"(step {result.selected_step} selected) in {result.seconds:.1f} s")

    # --- export the original, compile the protected artifact ---
    original_onnx, timings["export_seconds"] = export_onnx(module, loaded.format, cfg.preprocess.input_shape)
    params = dict(module.named_parameters())
    originals = {n: params[n].detach().cpu().numpy().copy() for n in result.masks}
    learned_from = {"authorized": "synthesized" if synthesized else "real train rows",
                    "unauthorized": "synthesized neighbor domains" if mode == "data-free" else "real train rows"}
    metadata = {
        "version": __version__, "mode": mode,
        "authorized": list(cfg.authorized), "unauthorized": list(cfg.unauthorized), "learned_from": learned_from,
        "preprocess": cfg.preprocess.to_dict(), "granularity": result.granularity,
        "mask_sha256": passes.digest_arrays(result.masks),
        "original_weights_sha256": fingerprint, "report_schema": REPORT_SCHEMA_VERSION,
    }
    # the baseline is the original graph optimised like the artifact, minus the mask:
    # accuracy and latency ratios then measure the protection, not the optimiser
    baseline, _ = passes.run_pipeline(original_onnx, [passes.FoldConstants(), passes.FoldBatchNorm()])
    t0 = time.perf_counter()
    # skip names were validated with the config (unknown or mandatory passes are refused there)
    protected, records = passes.run_pipeline(original_onnx, passes.default_pipeline(result.masks, originals, metadata),
                                             skip=cfg.skip_passes)
    timings["passes_seconds"] = time.perf_counter() - t0

    # --- validate with onnxruntime on test rows ---
    t0 = time.perf_counter()
    ort_device = "cuda" if device.type == "cuda" else "cpu"
    s_orig, s_prot = session(baseline, ort_device), session(protected, ort_device)
    domain_rows, examples = {}, {}
    agree, max_diff, parity_n = 0, 0.0, 0
    for n, s in splits.items():
        lo, lp = run_logits(s_orig, s.x_test), run_logits(s_prot, s.x_test)
        if not (np.isfinite(lo).all() and np.isfinite(lp).all()):
            raise UserError(f"{cfg.model}: the model outputs NaN or infinite logits on {domains[n].path}; fix the "
                            f"model or its preprocessing")
        labels = s.y_test if s.y_test is not None else lo.argmax(1)
        ref = masked_forward(module, result.masks, s.x_test)
        agree += int((ref.argmax(1) == lp.argmax(1)).sum())
        max_diff = max(max_diff, float(np.abs(ref - lp).max()))
        parity_n += len(lp)
        ao, ap = accuracy(lo, labels), accuracy(lp, labels)
        te_rows = domains[n].rows("test")[:6]
        examples[n] = {"images": domains[n].images[te_rows], "labels": labels[:6].tolist(),
                       "predictions": lp[:6].argmax(1).tolist()}
        domain_rows[n] = {
            "role": "authorized" if n == auth_name else "unauthorized",
            "path": domains[n].path, "n_test": int(len(labels)), "labels": "given" if s.y_test is not None else "original model's predictions",
            "split": "train/test" if domains[n].has_split else "none (train and test rows coincide)",
            "original_acc": ao, "protected_acc": ap,
            "original_ci95": wilson_interval(ao, len(labels)), "protected_ci95": wilson_interval(ap, len(labels)),
            "drop": ao - ap,
        }
    src_drop = domain_rows[auth_name]["drop"] if auth_name else None
    for n in cfg.unauthorized:
        domain_rows[n]["st_d"] = st_d(src_drop, domain_rows[n]["drop"]) if src_drop is not None else None
    timings["validate_seconds"] = time.perf_counter() - t0
    shape = (256, *cfg.preprocess.input_shape)
    lat_o, lat_p = latency_pair_ms(s_orig, s_prot, shape)

    gates = evaluate_gates(cfg.gates, domain_rows, auth_name)
    timings["total_seconds"] = time.perf_counter() - t_all
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool": tool_versions(),
        "command": "compile", "mode": mode, "seed": cfg.seed,
        "model": {"path": str(cfg.model), "format": loaded.format, "num_classes": num_classes,
                  "weights_sha256": fingerprint},
        "preprocess": cfg.preprocess.to_dict(),
        "providers": s_prot.get_providers(), "learning_device": str(device),
        "domains": domain_rows, "source_drop": src_drop,
        "max_unauthorized_acc": max((domain_rows[n]["protected_acc"] for n in cfg.unauthorized), default=None),
        "learned_from": learned_from,
        "synthesis": synthesis_stats,
        "parity": {"top1_agreement": agree / max(parity_n, 1) * 100, "max_abs_logit_diff": max_diff, "rows": parity_n},
        "mask": {"granularity": result.granularity, "pruned_fraction": result.pruned_fraction(),
                 "density": result.density(), "selected_step": result.selected_step, "config": vars(mask_cfg),
                 "history": result.history},
        "latency_ms_batch256": {"original": lat_o, "protected": lat_p, "ratio": lat_p / lat_o},
        "passes": [r.to_dict() for r in records],
        "timings": timings, "gates": gates, "passed": all(g["passed"] for g in gates),
    }
    outdir = Path(outdir)
    try:
        with staged_dir(outdir) as stage:
            written = passes.save_model(protected, stage / ARTIFACT, external_threshold)
            report["artifact_files"] = [p.name for p in written]
            preview = None if synthetic_preview is None else to_uint8_images(synthetic_preview, cfg.preprocess)
            for suffix, data in report_files(report, verdict(report), examples, preview).items():
                (stage / REPORT).with_suffix(suffix).write_bytes(data)
    except OSError as e:
        raise UserError(f"{outdir}: cannot write the output folder ({e.strerror or e}); nothing was changed there; "
                        f"pick a writable -o")
    report["artifact"] = str(outdir / ARTIFACT)
    return report


def check_output_dir(outdir: Path) -> None:
    """Fail before any work if OUTDIR cannot be written (nothing is created here)."""
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"{outdir}: exists and is not a folder; pick another -o")
    foreign = foreign_entries(outdir)
    if foreign:
        raise UserError(f"{outdir}: holds files mapc did not write (e.g. {foreign[0]!r}) and would be replaced as a "
                        f"whole; pick an empty or new folder, or a previous mapc output folder")
    probe = outdir
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{outdir}: {probe} is not writable; pick a writable -o")


def check_mode_data(mode: str, cfg: CompileConfig) -> None:
    """Which data each mode learns from; data a mode does not learn from is used only to measure."""
    if mode == "source-available" and (not cfg.authorized or not cfg.unauthorized):
        raise UserError("--mode source-available needs --authorized NAME=PATH and at least one --unauthorized NAME=PATH")
    if mode == "source-free" and not cfg.unauthorized:
        raise UserError("--mode source-free needs at least one --unauthorized NAME=PATH (authorized data is "
                        "synthesized; --authorized is then used only to measure)")
