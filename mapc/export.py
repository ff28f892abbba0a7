"""Export the *original* (unmasked) model to ONNX with a dynamic batch axis.

Invariant: every torch parameter keeps its name and exact value as an
initializer, so ``passes.fold_masks`` can find each masked weight by name
(value matching remains the fallback). That is why the exporter's own
optimizer is off (it would fold BatchNorm into Conv weights under the Conv's
name) and constant folding is off for the TorchScript path; ``fold_constants``
and ``fold_batchnorm`` do that work later, after the masks are folded.

Plain modules and torch.export programs go through the dynamo exporter
(opset 20); TorchScript archives, which it cannot trace, through the
TorchScript exporter (opset 17). The exporter's console chatter goes to stderr.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
import warnings

import onnx
import torch

from .errors import UserError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(module: torch.nn.Module, fmt: str, input_shape: tuple[int, int, int]) -> tuple[onnx.ModelProto, float]:
    """(model, seconds). ``module`` must be on the CPU and in eval mode."""
    example = torch.zeros(2, *input_shape)
    t0 = time.perf_counter()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if fmt == "torchscript":
                buf = io.BytesIO()
                torch.onnx.export(module, (example,), buf, dynamo=False, do_constant_folding=False,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=17,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
                model = onnx.load_from_string(buf.getvalue())
            else:
                program = torch.onnx.export(module, (example,), dynamo=True, optimize=False, external_data=False,
                                            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
                model = program.model_proto
        except Exception as e:  # the exporter's errors are long; keep the first line
            first = " ".join(str(e).split())[:300]
            raise UserError(f"ONNX export of the model failed ({type(e).__name__}: {first}); "
                            f"check that it runs on a {tuple(example.shape)} input")
        finally:
            onnx_logger.setLevel(level)
    return model, time.perf_counter() - t0
