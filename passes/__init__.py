"""ONNX graph passes of the mapc protection compiler (onnx, onnx-graphsurgeon, onnxscript/onnx-ir; never torch).

The default pipeline, in order, and why:

1. ``fold_masks``        first, while initializers still carry the torch parameter names
                         and values the masks are keyed by;
2. ``fold_constants``    turns exporter scaffolding (Shape/Expand zero biases) into
                         initializers so later passes see plain Conv/Gemm inputs;
3. ``fold_batchnorm``    after masking: (W*M)*s = (W*s)*M, so masked zeros survive the
                         per-channel scale; merges each BN into its Conv;
4. ``strip_dead_channels`` after BN folding, so a dead channel's constant is the Conv bias
                         and only Conv/Gemm consumers remain to absorb it; before the audit,
                         which checks the shrunk weights against their masks;
5. ``strip_debug_info``  removes exporter stack traces and paths before anything is sealed;
6. ``seal``              writes mapc.* metadata onto the clean model;
7. ``audit``             proves the final tensors carry the mask and no unmasked copy;
8. ``check``             onnx.checker and strict shape inference, last, on what ships.
"""
from __future__ import annotations

from .audit import Audit, artifact_checks
from .base import MANDATORY, Pass, PassError, PassRecord, PassResult, run_pipeline
from .check import Check
from .fold_batchnorm import FoldBatchNorm
from .fold_constants import FoldConstants
from .fold_masks import FoldMasks
from .seal import Seal, digest_arrays, read_metadata
from .serialize import PROTOBUF_LIMIT, save_model
from .strip_dead_channels import StripDeadChannels
from .strip_debug_info import StripDebugInfo

REGISTRY = {cls.name: cls for cls in (FoldMasks, FoldConstants, FoldBatchNorm, StripDeadChannels, StripDebugInfo, Seal,
                                      Audit, Check)}
DEFAULT_ORDER = ["fold_masks", "fold_constants", "fold_batchnorm", "strip_dead_channels", "strip_debug_info", "seal",
                 "audit", "check"]


def default_pipeline(masks, originals, metadata) -> list[Pass]:
    """The compile pipeline for ``masks`` (torch parameter name -> {0,1} array)."""
    return [FoldMasks(masks, originals), FoldConstants(), FoldBatchNorm(), StripDeadChannels(), StripDebugInfo(),
            Seal(metadata), Audit(masks, originals), Check()]


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered pass in default order."""
    return [(n, REGISTRY[n].description) for n in DEFAULT_ORDER]


__all__ = ["artifact_checks", "MANDATORY", "Pass", "PassError", "PassRecord", "PassResult", "run_pipeline", "default_pipeline", "describe",
           "REGISTRY", "DEFAULT_ORDER", "save_model", "PROTOBUF_LIMIT", "digest_arrays", "read_metadata", "FoldMasks", "FoldConstants",
           "FoldBatchNorm", "StripDeadChannels", "StripDebugInfo", "Seal", "Audit", "Check"]
