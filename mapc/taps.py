"""Observing BatchNorm layers during forward passes: one instrumentation for synthesis and mask learning.

``BatchNormTap(module)`` is a context manager. While it is active, every
forward pass appends, for each BatchNorm layer in execution order, the triple
(input x, running_mean, running_var). Plain modules get forward hooks; a
torch.export program (an FX GraphModule whose BatchNorms are calls of
``aten.batch_norm`` and friends) gets a recording call inserted before each
BatchNorm node. Invariant: on exit the module is exactly as it was (hooks
removed, inserted nodes erased and the graph recompiled), and the recorded
tensors are the layer inputs themselves (gradients flow through them).
TorchScript archives expose neither hooks nor a graph to edit; ``found`` is
then False and callers refuse the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

BN_TARGETS = ("_native_batch_norm_legit_no_training", "batch_norm", "_native_batch_norm_legit")

Record = tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # (input, running_mean, running_var)


def _is_bn_call(node: torch.fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return node.op == "call_function" and any(t in name for t in BN_TARGETS) and len(node.args) >= 5


class BatchNormTap:
    """Records (input, running_mean, running_var) of every BatchNorm in forward passes; see the module docstring."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.records: list[Record] = []
        self._handles = []
        self._inserted: list[tuple[torch.fx.Node, torch.fx.Node]] = []

    @property
    def found(self) -> bool:
        return bool(self._handles or self._inserted)

    def __enter__(self) -> "BatchNormTap":
        bns = [m for m in self.module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
        if bns:
            self._handles = [bn.register_forward_hook(self._hook) for bn in bns]
        elif isinstance(self.module, torch.fx.GraphModule):
            self._instrument(self.module)
        return self

    def _hook(self, mod, inputs, output) -> None:
        self.records.append((inputs[0], mod.running_mean, mod.running_var))

    def _instrument(self, gm: torch.fx.GraphModule) -> None:
        tap = self

        def record(x, mean, var):
            tap.records.append((x, mean, var))
            return x

        for node in list(gm.graph.nodes):
            if _is_bn_call(node):
                x = node.args[0]
                with gm.graph.inserting_before(node):
                    rec = gm.graph.call_function(record, (x, node.args[3], node.args[4]))
                node.replace_input_with(x, rec)
                self._inserted.append((rec, x))
        if self._inserted:
            gm.recompile()

    def take(self) -> list[Record]:
        """The records since the last take, oldest first; the tap starts empty again."""
        out, self.records = self.records, []
        return out

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._inserted:
            g = self.module.graph
            for rec, x in self._inserted:   # undo: the graph (and its pytree codegen) is as loaded
                rec.replace_all_uses_with(x)
                g.erase_node(rec)
            self.module.recompile()
            self._inserted = []
        self.records = []
        return False
