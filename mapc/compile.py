"""The compile job: frozen model + data -> protected ONNX artifact + report.

``compile_model`` is the README's diagram as a list of stages, each timed and
each returning a small dataclass: prepare (load model and data) -> learn (the
mask, on train rows or synthesized ones) -> build_artifact (export the
original, run the pass pipeline: fold masks, optimise, strip, seal, audit,
check) -> measure (original and protected with onnxruntime on test rows, the
path verify shares; parity with the masked torch model; latency) ->
build_report -> write_outdir (OUTDIR replaced as a whole).

Invariant: the unprotected model is never written to OUTDIR; the source
model's weights are identical before and after (checked).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

import passes

from . import __version__, distributed
from .atomic import can_create, foreign_entries, nearest_existing, staged_dir
from .config import CompileConfig, MaskConfig
from .datasets import Domain, load_domain
from .distributed import Dist
from .errors import UserError
from .evaluate import run_logits, latency_pair_ms, session
from .export import export_onnx
from .gates import evaluate_gates
from .masking import MaskResult, TrainData, labelled, learn_mask, masked_forward, split_validation
from .measure import Measurement, MeasuredRows, measure_domains
from .models import LoadedModel, load_model
from .rows import ArrayRows, Concat, ImageRows, Mapped, Rows, cached, rows_per_batch
from .synthesis import to_uint8_images
from .report import REPORT_SCHEMA_VERSION, report_files, report_header, verdict

ARTIFACT = "protected.onnx"
LATENCY_BATCH = 256      # rows per latency run (fewer for large inputs; the report records the batch)
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
    """A domain's train rows (they teach the mask) and its measured test rows, both read a batch at a time."""
    train: Rows
    test: MeasuredRows


def prepare_domain(d: Domain, role: str, cfg: CompileConfig) -> Split:
    tr = d.rows("train")
    if len(tr) == 0:
        raise UserError(f"{d.path}: domain {d.name!r} has no train rows in 'split'")
    train = cached(ImageRows(d.images, tr, None if d.labels is None else d.labels[tr], cfg.preprocess))
    return Split(train, MeasuredRows.test_rows(d, role, cfg.preprocess))


class Clock:
    """Named stage timings in seconds: ``with clock("mask_seconds"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] = time.perf_counter() - t0

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total_seconds": time.perf_counter() - self.started}


@dataclass
class Prepared:
    """Stage 1: the frozen model and the domains, loaded and checked."""
    loaded: LoadedModel
    num_classes: int
    fingerprint: str
    mode: str
    device: torch.device
    splits: dict[str, Split]
    auth_name: str | None
    watermark_key: bytes | None = None
    dist: Dist | None = None               # data-parallel learning across processes (``mapc.distributed``)


@dataclass
class Learned:
    """Stage 2: the mask, and what it learned from."""
    result: MaskResult
    mask_cfg: MaskConfig
    learned_from: dict[str, str]
    synthesis_stats: dict | None = None
    synthetic_preview: torch.Tensor | None = None


@dataclass
class Built:
    """Stage 3: the protected artifact and the unmasked baseline optimised alike."""
    protected: onnx.ModelProto
    baseline: onnx.ModelProto
    records: list


@dataclass
class Measured:
    """Stage 4: per-domain figures, artifact/torch parity and latency."""
    measurement: Measurement
    providers: list[str]
    parity: dict
    latency: dict
    ownership: dict | None = None    # the watermark's ownership test on the authorized test rows


def compile_model(cfg: CompileConfig, outdir: str | Path, progress: bool = True,
                  external_threshold: int = passes.PROTOBUF_LIMIT) -> dict | None:
    """load -> learn the mask -> export and run the passes -> measure -> report -> write OUTDIR.

    Started by torchrun (``mapc.distributed``), every process learns the same mask and only rank 0 goes on
    (the others return None)."""
    dist = distributed.init(torch_device(cfg.device))
    progress = progress and (dist is None or dist.is_main)
    say = log if progress else (lambda _msg: None)  # -q: neither progress bars nor log lines
    clock = Clock()
    check_output_dir(Path(outdir))
    prepared = prepare(cfg, clock, say, dist)
    learned = learn(cfg, prepared, clock, say, progress)
    if dist is not None:        # every collective is behind us
        distributed.shutdown()
        if not dist.is_main:
            return None
    built = build_artifact(cfg, prepared, learned, clock)
    measured = measure(cfg, prepared, learned, built, clock, progress)
    report = build_report(cfg, prepared, learned, built, measured, clock)
    return write_outdir(Path(outdir), report, built, measured, learned, cfg, external_threshold)


def prepare(cfg: CompileConfig, clock: Clock, say, dist: Dist | None = None) -> Prepared:
    mode = cfg.resolved_mode()
    check_mode_data(mode, cfg)
    if cfg.model is None:
        raise UserError("no model given: pass MODEL or set model = \"...\" in the config")
    device = torch_device(cfg.device)
    if dist is not None and device.type == "cuda":     # one GPU per process
        device = torch.device("cuda", dist.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    with clock("load_seconds"):
        loaded = load_model(cfg.model, cfg.arch, cfg.trust_pickle)
        num_classes = probe_classes(loaded.module, cfg.preprocess.input_shape, cfg.model)
        fingerprint = weights_fingerprint(loaded.module)
        roles = {**{n: ("authorized", p) for n, p in cfg.authorized.items()},
                 **{n: ("unauthorized", p) for n, p in cfg.unauthorized.items()}}
        splits = {n: prepare_domain(load_domain(n, p, num_classes), role, cfg) for n, (role, p) in roles.items()}
    auth_name = next(iter(cfg.authorized), None)
    if dist is not None and not dist.is_main:
        dist.barrier()            # rank 0 creates a missing key file first
    key = watermark_key(cfg, mode, splits, auth_name, say)
    if dist is not None and dist.is_main:
        dist.barrier()
    say(f"model {Path(cfg.model).name} ({loaded.format}), {num_classes} classes; mode {mode}; "
        f"authorized {auth_name or '-'}, unauthorized {', '.join(cfg.unauthorized) or '-'}; device {device}"
        + (f"; {dist.world} processes" if dist is not None else ""))
    return Prepared(loaded, num_classes, fingerprint, mode, device, splits, auth_name, key, dist)


def watermark_key(cfg: CompileConfig, mode: str, splits: dict[str, Split], auth_name: str | None, say):
    """The owner's key when --watermark is given (created when its file does not exist); it needs labelled
    authorized train rows to stamp."""
    if cfg.watermark is None:
        return None
    from .watermark import load_or_create_key
    if mode != "source-available" or auth_name is None or splits[auth_name].train.labels is None:
        raise UserError(f"--watermark {cfg.watermark}: the watermark is learned on labelled authorized train rows; "
                        f"give --authorized NAME=PATH with labels (source-available mode)")
    key, created = load_or_create_key(cfg.watermark)
    if created:
        say(f"watermark: created a new key in {cfg.watermark}; keep it secret and safe: it proves ownership")
    return key


def learn(cfg: CompileConfig, p: Prepared, clock: Clock, say, progress: bool) -> Learned:
    """The mask, learned on real train rows or synthesized ones (a validation slice selects it)."""
    module = p.loaded.module
    module.to(p.device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    synthesized = p.mode != "source-available"
    learned_from = {"authorized": "synthesized" if synthesized else "real train rows",
                    "unauthorized": "synthesized neighbor domains" if p.mode == "data-free" else "real train rows"}
    stats, preview = None, None

    def selection_split(rows: Rows) -> tuple[Rows, Rows]:
        train, val = split_validation(rows, cfg.mask.val_rows, rng)
        return train, labelled(val, module, p.device)

    if not synthesized:
        auth, val_auth = selection_split(p.splits[p.auth_name].train)
    else:
        from .synthesis import invert, spread
        syn = cfg.synthesis              # generators > 1 only with method "generator" (SynthesisConfig)
        say(f"synthesizing {syn.images * syn.generators} pseudo-authorized images by model inversion "
            f"({syn.method}" + (f", {syn.generators} generators)" if syn.generators > 1 else ")"))
        sx, sy, stats = invert(module, p.loaded.format, cfg.preprocess.input_shape, p.num_classes, syn,
                               cfg.seed, p.device, cfg.preprocess.mean, cfg.preprocess.std, progress=progress)
        clock.seconds["synthesis_seconds"] = stats["seconds"]
        say(f"synthesis: {stats['seconds']:.1f} s; BN-statistics mismatch {stats['bn_mismatch_synthetic']:.3f} "
            f"(Gaussian noise: {stats['bn_mismatch_noise']:.3f})")
        stats["feasibility"] = feasibility(cfg, p, stats)
        preview = spread(sx, 32).cpu()
        auth, val_auth = selection_split(ArrayRows(sx.cpu().numpy(), sy.cpu().numpy()))
    with clock("mask_seconds"):
        unauth, val_unauth = unauthorized_rows(cfg, p, auth, val_auth, selection_split)
        weights = None
        if p.watermark_key is not None:
            from .watermark import DOMAIN_WEIGHT
            unauth.append(stamped(cfg, p.watermark_key, auth))
            val_unauth.append(stamped(cfg, p.watermark_key, val_auth))
            auth = with_control_patterns(cfg, p.watermark_key, auth)
            weights = [1.0] * (len(unauth) - 1) + [DOMAIN_WEIGHT]
        data = TrainData(auth, unauth, val_auth, val_unauth, weights)
        mask_cfg = cfg.mask.resolved_for(p.mode)
        check_distributed(mask_cfg, p.dist)
        result = learn_mask(module, data, p.num_classes, mask_cfg, cfg.seed, p.device, progress=progress,
                            workers=loader_workers(cfg, p), dist=p.dist)
        module.to("cpu")
    if weights_fingerprint(module) != p.fingerprint:
        raise RuntimeError("internal error: mask learning changed the frozen weights")
    say(f"mask: {result.pruned_fraction() * 100:.1f} % of masked weights pruned "
        f"(step {result.selected_step} selected) in {result.seconds:.1f} s, {result.images_per_second:.0f} images/s")
    return Learned(result, mask_cfg, learned_from, stats, preview)


def loader_workers(cfg: CompileConfig, p: Prepared) -> int:
    """DataLoader worker processes: as configured; by default 2 when a domain is an ImageFolder (files to decode
    while the model learns), none for in-memory arrays."""
    if cfg.workers is not None:
        return cfg.workers
    folders = any(Path(path).is_dir() for path in (*cfg.authorized.values(), *cfg.unauthorized.values()))
    return 2 if folders else 0


def check_distributed(mask_cfg: MaskConfig, dist) -> None:
    if dist is not None:
        distributed.check_batch_split(mask_cfg.batch_size, dist.world)


def with_control_patterns(cfg: CompileConfig, key: bytes, auth: Rows) -> Rows:
    """The authorized rows followed by a copy of the first of them stamped with other patterns
    (``watermark.TRAIN_CONTROLS``), all to keep: the mask then breaks the key's pattern, not sparse noise in
    general."""
    from .watermark import CONTROL_SHARE, TRAIN_CONTROLS, controls, stamp_with_controls
    pre = cfg.preprocess
    patterns = controls(key, "train", TRAIN_CONTROLS, pre.input_shape)
    n = max(1, int(len(auth) * CONTROL_SHARE))
    # partial of a module-level function, not a lambda: DataLoader workers may pickle it (spawn start method)
    stamp_controls = functools.partial(_stamp_at, stamp_with_controls, patterns, pre.mean, pre.std)
    return Concat(auth, Mapped(auth.subset(np.arange(n)), stamp_controls))


def stamped(cfg: CompileConfig, key: bytes, rows: Rows) -> Rows:
    """The hidden unauthorized domain: rows stamped with the key's trigger, same labels."""
    from .watermark import stamp, trigger
    pre = cfg.preprocess
    return Mapped(rows, functools.partial(_stamp_all, stamp, trigger(key, pre.input_shape), pre.mean, pre.std))


def _stamp_at(fn, patterns, mean, std, x, idx):
    return fn(x, patterns, mean, std, positions=idx)


def _stamp_all(fn, delta, mean, std, x, idx):
    return fn(x, delta, mean, std)


def feasibility(cfg: CompileConfig, p: Prepared, synthesis_stats: dict) -> dict:
    """Which given unauthorized domains a mask learned from synthesized data can separate at all
    (``synthesis.separability``); one warning line on stderr per domain that it cannot (never muted)."""
    from .synthesis import REFERENCE_ROWS, separability
    rng = np.random.default_rng(cfg.seed)     # a random sample: the rows may be sorted by class

    def sample(rows: Rows) -> torch.Tensor:
        idx = np.sort(rng.choice(len(rows), min(len(rows), REFERENCE_ROWS), replace=False))
        return torch.from_numpy(rows.take(idx)).to(p.device)

    domains = {n: sample(p.splits[n].train) for n in cfg.unauthorized}
    out = separability(p.loaded.module, p.loaded.format, domains, synthesis_stats)
    for name, d in out.items():
        if not d["separable"]:
            d["warning"] = (f"unauthorized domain {name!r} looks like the model's training data (BatchNorm-statistics "
                            f"mismatch {d['bn_mismatch']:.3f}, {d['of_noise']:.3f} of Gaussian noise's; synthesized data "
                            f"{d['bn_mismatch_synthetic']:.3f}): {p.mode} protection cannot separate it from the "
                            f"authorized domain; give authorized data (--authorized NAME=PATH)")
            print(f"[mapc] warning: {d['warning']}", file=sys.stderr)
    return out


def unauthorized_rows(cfg: CompileConfig, p: Prepared, auth: Rows, val_auth: Rows, selection_split):
    """(train, validation) unauthorized rows: the given domains, or synthesized neighbor domains (data-free)."""
    unauth, val_unauth = [], []
    if p.mode == "data-free":
        from .synthesis import neighbor_domains
        pre, syn = cfg.preprocess, cfg.synthesis
        return neighbor_domains(auth, val_auth, cfg.seed, syn.neighbor_min_strength, syn.neighbor_compose,
                                pre.mean, pre.std)
    for n in cfg.unauthorized:
        train, val = selection_split(p.splits[n].train)
        unauth.append(train)
        val_unauth.append(val)
    return unauth, val_unauth


def build_artifact(cfg: CompileConfig, p: Prepared, learned: Learned, clock: Clock) -> Built:
    """Export the original, fold the mask in through the pass pipeline; the baseline gets the same
    optimisation minus the mask, so accuracy and latency ratios measure the protection, not the optimiser."""
    module, result = p.loaded.module, learned.result
    original_onnx, clock.seconds["export_seconds"] = export_onnx(module, p.loaded.format, cfg.preprocess.input_shape)
    params = dict(module.named_parameters())
    originals = {n: params[n].detach().cpu().numpy().copy() for n in result.masks}
    metadata = {
        "version": __version__, "mode": p.mode,
        "authorized": list(cfg.authorized), "unauthorized": list(cfg.unauthorized),
        "learned_from": learned.learned_from,
        "preprocess": cfg.preprocess.to_dict(), "granularity": result.granularity,
        "mask_sha256": passes.digest_arrays(result.masks),
        "original_weights_sha256": p.fingerprint, "report_schema": REPORT_SCHEMA_VERSION,
    }
    baseline, _ = passes.run_pipeline(original_onnx, [passes.FoldConstants(), passes.FoldBatchNorm()])
    with clock("passes_seconds"):
        # skip names were validated with the config (unknown or mandatory passes are refused there)
        protected, records = passes.run_pipeline(original_onnx,
                                                 passes.default_pipeline(result.masks, originals, metadata),
                                                 skip=cfg.skip_passes)
    return Built(protected, baseline, records)


def measure(cfg: CompileConfig, p: Prepared, learned: Learned, built: Built, clock: Clock,
            progress: bool = False) -> Measured:
    """Test rows through onnxruntime (one path with verify), parity with the masked torch model, latency."""
    ort_device = "cuda" if p.device.type == "cuda" else "cpu"
    with clock("validate_seconds"):
        s_orig, s_prot = session(built.baseline, ort_device), session(built.protected, ort_device)
        measurement = measure_domains(s_prot, [s.test for s in p.splits.values()], original=s_orig,
                                      progress=progress)
        ownership = None
        if p.watermark_key is not None:
            from .watermark import measure_ownership
            auth = p.splits[p.auth_name].test.in_memory()
            ownership = measure_ownership(lambda x: run_logits(s_prot, x), auth.x, auth.labels, p.watermark_key,
                                          cfg.preprocess)
        parity = torch_parity(p.loaded.module, learned.result.masks, p.splits, measurement)
    batch = rows_per_batch(cfg.preprocess.input_shape, LATENCY_BATCH)
    lat_o, lat_p = latency_pair_ms(s_orig, s_prot, (batch, *cfg.preprocess.input_shape))
    return Measured(measurement, s_prot.get_providers(), parity,
                    {"original": lat_o, "protected": lat_p, "ratio": lat_p / lat_o, "batch": batch}, ownership)


def torch_parity(module: torch.nn.Module, masks: dict[str, np.ndarray], splits: dict[str, Split],
                 measurement: Measurement) -> dict:
    """Top-1 agreement and max |logit difference| of the artifact vs the masked torch model, all test rows."""
    agree, max_diff, rows = 0, 0.0, 0
    for n, s in splits.items():
        ref, got = masked_forward(module, masks, s.test.x), measurement.logits[n]
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
        rows += len(got)
    return {"top1_agreement": agree / max(rows, 1) * 100, "max_abs_logit_diff": max_diff, "rows": rows}


def build_report(cfg: CompileConfig, p: Prepared, learned: Learned, built: Built, measured: Measured,
                 clock: Clock) -> dict:
    m, result = measured.measurement, learned.result
    gates = evaluate_gates(cfg.gates, m.domains, p.auth_name)
    return report_header("compile", measured.providers, cfg.preprocess, m, gates) | {
        "mode": p.mode, "seed": cfg.seed,
        "model": {"path": str(cfg.model), "format": p.loaded.format, "num_classes": p.num_classes,
                  "weights_sha256": p.fingerprint},
        "learning_device": str(p.device),
        "learned_from": learned.learned_from,
        "synthesis": learned.synthesis_stats,
        "parity": measured.parity,
        "mask": {"granularity": result.granularity, "pruned_fraction": result.pruned_fraction(),
                 "density": result.density(), "selected_step": result.selected_step,
                 "images_per_second": result.images_per_second,
                 "processes": 1 if p.dist is None else p.dist.world,
                 "config": vars(learned.mask_cfg), "history": result.history},
        "latency_ms_batch256": measured.latency,
        "watermark": {"used": measured.ownership is not None, "ownership": measured.ownership},
        "passes": [r.to_dict() for r in built.records],
        "timings": clock.total(),
    }


def write_outdir(outdir: Path, report: dict, built: Built, measured: Measured, learned: Learned,
                 cfg: CompileConfig, external_threshold: int) -> dict:
    """OUTDIR replaced as a whole: the artifact and the three reports, or nothing."""
    try:
        with staged_dir(outdir) as stage:
            written = passes.save_model(built.protected, stage / ARTIFACT, external_threshold)
            report["artifact_files"] = [f.name for f in written]
            preview = (None if learned.synthetic_preview is None
                       else to_uint8_images(learned.synthetic_preview, cfg.preprocess))
            for suffix, data in report_files(report, verdict(report), measured.measurement.examples, preview).items():
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
    if not can_create(outdir):
        raise UserError(f"{outdir}: {nearest_existing(outdir.absolute().parent)} is not writable; pick a writable -o")


def check_mode_data(mode: str, cfg: CompileConfig) -> None:
    """Which data each mode learns from; data a mode does not learn from is used only to measure."""
    if mode == "source-available" and (not cfg.authorized or not cfg.unauthorized):
        raise UserError("--mode source-available needs --authorized NAME=PATH and at least one --unauthorized NAME=PATH")
    if mode == "source-free" and not cfg.unauthorized:
        raise UserError("--mode source-free needs at least one --unauthorized NAME=PATH (authorized data is "
                        "synthesized; --authorized is then used only to measure)")
