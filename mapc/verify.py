"""`mapc verify`: measure an artifact with onnxruntime and gate a release on it.

Invariant: every number comes from onnxruntime sessions over the artifact (and
the baseline) on the test rows when the data has a split, all rows otherwise,
through ``mapc.measure``, the path compile uses; unlabelled rows are scored
against the baseline's predictions, and need a baseline. Preprocessing comes from the artifact's sealed metadata
unless overridden. Gates that compare against the original (source drop,
target drop) need ``--baseline``; asking for them without one is bad input.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from passes import artifact_checks

from .datasets import load_domain
from .errors import UserError
from .gates import Gates as VerifyGates, evaluate_gates
from .evaluate import session
from .measure import MeasuredRows, measure_domains
from .preprocess import Preprocess, preprocess_from
from .report import report_header


@dataclass
class VerifyRequest:
    artifact: str
    authorized: dict[str, str]
    unauthorized: dict[str, str]
    baseline: str | None = None
    gates: VerifyGates = field(default_factory=VerifyGates)
    provider: str = "auto"
    preprocess: Preprocess | None = None   # None: from the artifact's metadata
    arch: str | None = None
    trust_pickle: bool = False


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_artifact(path: str, what: str = "artifact") -> onnx.ModelProto:
    """An ONNX file with its external data, which must lie inside the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such {what}; pass the protected .onnx written by mapc compile")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: the {what} file is empty")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise UserError(f"{p}: the {what} is not a readable ONNX model ({type(e).__name__})")
    if len(model.graph.node) == 0 or len(model.graph.input) == 0 or len(model.graph.output) == 0:
        raise UserError(f"{p}: not an ONNX model (no graph inputs, outputs or nodes); pass a .onnx artifact")
    check_external_data(model, p)
    try:
        from onnx.external_data_helper import load_external_data_for_model
        load_external_data_for_model(model, str(p.parent))
    except Exception as e:
        raise UserError(f"{p}: cannot read its external data ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
    return model


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external-data location is a relative path inside the model's folder, and exists."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data
    folder = path.resolve().parent
    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or folder not in target.parents:
            raise UserError(f"{path}: tensor {t.name!r} keeps its data at {location!r}, outside the model's folder; "
                            f"refusing to read it")
        if not target.is_file():
            raise UserError(f"{path}: tensor {t.name!r} needs {location!r} beside the model; it is missing")


def sealed_metadata(model: onnx.ModelProto) -> dict:
    from passes import read_metadata
    return read_metadata(model)


def weight_density(model: onnx.ModelProto) -> dict[str, float]:
    """Fraction of non-zero entries of every weight tensor (2+ dims): the mask density the artifact carries."""
    out = {}
    for t in model.graph.initializer:
        if len(t.dims) >= 2:
            a = numpy_helper.to_array(t)
            out[t.name] = float(np.count_nonzero(a) / max(a.size, 1))
    return out


def baseline_model(path: str, pre: Preprocess, arch: str | None, trust_pickle: bool) -> tuple[onnx.ModelProto, str]:
    """The baseline as an ONNX graph: an ONNX file, or any model format mapc compile accepts, exported."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: the baseline is a folder; pass the model file (.onnx, .pt2, TorchScript or state_dict)")
    if not p.is_file():
        raise UserError(f"{p}: no such baseline model")
    if p.suffix == ".onnx":
        return load_artifact(str(p), "baseline"), "onnx"
    from .export import export_onnx
    from .models import load_model
    loaded = load_model(p, arch, trust_pickle)
    model, _ = export_onnx(loaded.module, loaded.format, pre.input_shape)
    return model, loaded.format


def baseline_session(req: VerifyRequest, pre: Preprocess, provider: str):
    """onnxruntime session for the baseline: an ONNX file, or any model format mapc compile accepts."""
    p = Path(req.baseline)
    if p.suffix == ".onnx" and p.is_file():
        load_artifact(str(p), "baseline")   # validated (external data inside its folder) before onnxruntime reads it
        return session(str(p), provider, source=str(p)), "onnx"
    model, fmt = baseline_model(req.baseline, pre, req.arch, req.trust_pickle)
    return session(model, provider), fmt


def artifact_preprocess(model: onnx.ModelProto, path: str, override: Preprocess | None) -> Preprocess:
    """The preprocessing to measure with: ``override`` when given, else the artifact's sealed metadata."""
    if override is not None:
        return override
    meta = sealed_metadata(model)
    if "mapc.preprocess" in meta:
        return preprocess_from(meta["mapc.preprocess"], f"{path}: sealed mapc.preprocess")
    raise UserError(f"{path}: carries no mapc.preprocess metadata; pass --input-size/--channels/--mean/--std")


def verify(req: VerifyRequest) -> dict:
    t_all = time.perf_counter()
    model = load_artifact(req.artifact)
    meta = sealed_metadata(model)
    pre = artifact_preprocess(model, req.artifact, req.preprocess)
    if not req.authorized and not req.unauthorized:
        raise UserError("give data to measure: --authorized NAME=PATH and/or --unauthorized NAME=PATH")
    if len(req.authorized) > 1:
        raise UserError("one --authorized domain at most")
    needs_baseline = [g for g in ("max_source_drop", "min_target_drop") if getattr(req.gates, g) is not None]
    if needs_baseline and req.baseline is None:
        raise UserError(f"--{needs_baseline[0].replace('_', '-')} compares with the original: pass --baseline ORIGINAL")
    if req.gates.max_source_drop is not None and not req.authorized:
        raise UserError("--max-source-drop needs --authorized data")

    # by path: onnxruntime reads external data (>2 GB artifacts) itself; load_artifact has checked its locations
    s_prot = session(str(req.artifact), req.provider, source=str(req.artifact))
    num_classes = int(s_prot.get_outputs()[0].shape[-1]) if isinstance(s_prot.get_outputs()[0].shape[-1], int) else None
    s_base, base_format = (baseline_session(req, pre, req.provider) if req.baseline else (None, None))

    roles = {**{n: ("authorized", p) for n, p in req.authorized.items()},
             **{n: ("unauthorized", p) for n, p in req.unauthorized.items()}}
    rows = [MeasuredRows.test_rows(load_domain(n, p, num_classes), role, pre) for n, (role, p) in roles.items()]
    measurement = measure_domains(s_prot, rows, original=s_base)
    gates = evaluate_gates(req.gates, measurement.domains, next(iter(req.authorized), None))
    checks = artifact_checks(model)
    integrity = {"passed": all(c["passed"] for c in checks), "checks": checks}
    report = report_header("verify", s_prot.get_providers(), pre, measurement, gates) | {
        "artifact": {"path": str(req.artifact), "sha256": sha256_file(req.artifact), "metadata": meta},
        "baseline": None if req.baseline is None else {"path": str(req.baseline), "sha256": sha256_file(req.baseline),
                                                       "format": base_format},
        "weight_density": weight_density(model),
        "integrity": integrity,
        "timings": {"total_seconds": time.perf_counter() - t_all},
    }
    report["passed"] = report["passed"] and integrity["passed"]
    compile_report = Path(req.artifact).with_name("report.json")
    if compile_report.is_file():
        import json
        try:
            c = json.loads(compile_report.read_text())
            if c.get("command") == "compile":
                report["compile"] = {"passes": c.get("passes"), "timings": c.get("timings"), "mask": {
                    k: c.get("mask", {}).get(k) for k in ("granularity", "pruned_fraction", "density")}}
        except ValueError:
            pass
    report["_examples"] = measurement.examples  # for the human reports only; not part of report.json
    return report
