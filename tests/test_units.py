"""Unit tests of the small functions every figure rests on: intervals, ST-D, mask selection, the margin term,
preprocessing, the atomic output folder and `mapc passes`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import passes
from mapc.atomic import staged_dir
from mapc.cli import main
from mapc.evaluate import st_d, wilson_interval
from mapc.masking import (Checkpoint, CheckpointSelector, held_out_probe, margin_loss, selection_key, standard_error,
                          within_domain_scatter)
from mapc.preprocess import Preprocess, apply


@pytest.mark.parametrize("acc,n,lo,hi", [
    (50.0, 100, 40.38, 59.62),     # textbook values for p = 0.5, n = 100
    (0.0, 10, 0.0, 27.75),         # Wilson stays inside [0, 100] where the normal interval would not
    (100.0, 10, 72.25, 100.0),
])
def test_wilson_interval_known_values(acc, n, lo, hi):
    got = wilson_interval(acc, n)
    assert got == pytest.approx((lo, hi), abs=0.01)


def test_wilson_interval_without_rows_is_uninformative():
    assert wilson_interval(30.0, 0) == (0.0, 100.0)


def test_st_d_only_where_the_target_dropped():
    assert st_d(1.0, 50.0) == pytest.approx(0.02)
    assert st_d(1.0, 0.0) is None and st_d(1.0, -3.0) is None
    assert st_d(-0.5, 20.0) == pytest.approx(-0.025)


def test_selection_key_prefers_feasible_masks_then_protection_then_drop():
    budget = 1.0
    feasible_good = selection_key(0.8, [10.0, 12.0], budget)
    feasible_worse = selection_key(0.2, [10.0, 30.0], budget)
    infeasible = selection_key(3.0, [0.0, 0.0], budget)
    assert feasible_good < feasible_worse < infeasible
    assert selection_key(0.1, [12.0], budget) < selection_key(0.5, [12.0], budget)   # tie on worst: lower drop
    assert selection_key(1.5, [50.0], budget) < selection_key(2.5, [0.0], budget)     # infeasible: lower drop first


def _selector_with(entries, budget=1.0, tie_break="top1"):
    """A CheckpointSelector fed (drop, figures, worst top-1, rows of the worst domain or of each domain)
    records directly (the worst top-1's rows: those of the worst figure's domain)."""
    from mapc.config import MaskConfig
    sel = CheckpointSelector.__new__(CheckpointSelector)
    sel.cfg = MaskConfig(source_budget=budget, tie_break=tie_break)
    sel.candidates = []
    for step, (drop, figures, top, rows) in enumerate(entries):
        worst = int(np.argmax(figures))
        n = rows[worst] if isinstance(rows, list) else rows
        sel.candidates.append(Checkpoint(selection_key(drop, figures, budget), standard_error(figures[worst], n),
                                         top, step, {}, standard_error(top, n)))
        sel.candidates = sel.still_choosable()
    return sel


def test_checkpoint_choice_does_not_depend_on_the_order_checkpoints_arrive_in():
    # B is the best; its worst domain has 199 rows, so its bar (14.9 + 2.5) takes in C, which an earlier best
    # on the 1,500-row domain (A, bar 15.0 + 0.9) had excluded: C (lowest top-1) wins in either order
    a, c, b = (0.2, [15.0, 10.0], 12.0, [1500, 199]), (0.2, [16.5, 10.0], 9.0, [1500, 199]), \
        (0.2, [10.0, 14.9], 12.0, [1500, 199])
    for order in ([a, c, b], [a, b, c], [b, c, a], [c, a, b]):
        sel = _selector_with(order)
        assert sel.best().worst_top1 == 9.0, order


def test_checkpoints_within_one_standard_error_are_chosen_by_worst_top1_then_drop():
    assert standard_error(15.0, 199) == pytest.approx(100 * (0.15 * 0.85 / 199) ** 0.5)
    assert standard_error(0.0, 10) == 0.0 and standard_error(50.0, 0) == 50.0
    # 0: best worst figure; 1: within one SE (about 2.5 points on 199 rows) with a lower top-1; 2: outside it
    sel = _selector_with([(0.2, [15.0, 12.0], 12.5, 199), (0.4, [16.5, 12.0], 10.5, 199),
                          (0.1, [19.0, 11.0], 9.0, 199)])
    assert sel.best().step == 1
    # a tie on top-1 goes to the lower drop; an infeasible checkpoint never beats a feasible one
    sel = _selector_with([(0.6, [15.0], 11.0, 199), (0.3, [16.0], 11.0, 199), (3.0, [5.0], 5.0, 199)])
    assert sel.best().step == 1
    # on many rows the standard error is small: only the best figure remains
    sel = _selector_with([(0.2, [15.0], 12.5, 100_000), (0.2, [15.5], 10.0, 100_000)])
    assert sel.best().step == 0
    # nothing feasible: the lowest drop
    sel = _selector_with([(2.5, [10.0], 10.0, 199), (1.5, [30.0], 30.0, 199), (2.0, [5.0], 5.0, 199)])
    assert sel.best().step == 1 and len(sel.candidates) == 1


def test_the_drop_tie_break_chooses_the_lowest_drop_among_tied_checkpoints():
    # 0 and 1 are tied on the worst figure (within one SE on 199 rows); 2 is not. "drop" takes 0 (drop 0.2)
    # where "top1" takes 1 (top-1 10.5); the untied 2 (drop 0.1) is chosen by neither.
    entries = [(0.2, [15.0, 12.0], 12.5, 199), (0.4, [16.5, 12.0], 10.5, 199), (0.1, [19.0, 11.0], 9.0, 199)]
    assert _selector_with(entries, tie_break="top1").best().step == 1
    assert _selector_with(entries, tie_break="drop").best().step == 0
    # equal drops fall back to the lower worst top-1
    entries = [(0.3, [15.0], 12.0, 199), (0.3, [16.0], 11.0, 199)]
    assert _selector_with(entries, tie_break="drop").best().step == 1


def test_the_top1_then_drop_tie_break_keeps_the_top1_ties_then_takes_the_lowest_drop():
    # all three tied on the worst figure (a probe at 80 % on 199 rows: SE 2.8 points). Their top-1: 12.0,
    # 20.0 and 13.0 (SE about 2.3 at 12 %): 0 and 2 are tied on it, 1 is not. "drop" takes 1 (the lowest
    # drop, the highest top-1); "top1" takes 0; "top1-then-drop" takes 2, the lower drop of the two tied.
    entries = [(0.6, [80.0, 12.0], 12.0, 199), (0.1, [81.0, 20.0], 20.0, 199), (0.3, [82.0, 13.0], 13.0, 199)]
    assert _selector_with(entries, tie_break="drop").best().step == 1
    assert _selector_with(entries, tie_break="top1").best().step == 0
    assert _selector_with(entries, tie_break="top1-then-drop").best().step == 2


def test_checkpoint_masks_round_trip_through_the_packed_bits():
    from mapc.masking import MaskedParam
    w = torch.zeros(3, 5)
    m = MaskedParam("w", torch.nn.Parameter(w.clone()), w.clone(), torch.randn(3, 5))
    packed = Checkpoint.pack([m])
    back = Checkpoint((0, 1.0, 0.0), 0.0, 0.0, 0, packed).masks([m])["w"]
    assert back.dtype == m.mask().dtype and torch.equal(back, m.mask())


def test_held_out_probe_reads_labels_from_informative_logits_and_not_from_noise():
    """Checkpoint selection's probe: logits that encode the label through a fixed permutation at tiny scale
    (top-1 far below chance) are read back almost fully; label-independent logits give about chance."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 400)
    perm = rng.permutation(10)
    informative = 5.0 + 1e-3 * np.eye(10)[perm[y]] + 1e-5 * rng.standard_normal((400, 10))
    informative[:, 0] += 1.0                      # always predicts class 0
    assert (informative.argmax(1) == y).mean() < 0.15
    assert held_out_probe(informative, y, 10) > 95.0
    assert held_out_probe(rng.standard_normal((400, 10)), y, 10) < 20.0
    assert held_out_probe(informative[:15], y[:15], 10) == 0.0   # too few rows to fit one per class


def test_margin_loss_pushes_the_true_class_off_the_top():
    y = torch.tensor([0, 1])
    on_top = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    off_top = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    assert margin_loss(on_top, y, 1.0) > margin_loss(off_top, y, 1.0) > 0      # softplus keeps a small push
    assert margin_loss(off_top, y, 1.0, "hinge") == 0                         # hinge: done once 1 below
    assert margin_loss(off_top, y, 1.0, "top") == 0                           # top: done once off the top
    assert margin_loss(on_top, y, 1.0, "top") == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(6.0))))
    z = on_top.clone().requires_grad_(True)
    margin_loss(z, y, 1.0).backward()
    assert z.grad[0, 0] > 0 and z.grad[1, 1] > 0      # gradient descent lowers the true-class logit


def test_within_domain_scatter_is_zero_for_one_common_output_and_pulls_the_outlier_in():
    common = torch.tensor([[3.0, 0.0, 1.0]] * 4)
    assert float(within_domain_scatter(common)) == pytest.approx(0.0, abs=1e-12)
    assert float(within_domain_scatter(common + torch.tensor([[0.0], [1.0], [2.0], [-5.0]]))) == pytest.approx(
        0.0, abs=1e-12)                                   # a shift of all logits is the same output
    z = common.clone()
    z[3] = torch.tensor([0.0, 4.0, 0.0])                  # one row still stands out (a let-through row)
    z.requires_grad_(True)
    loss = within_domain_scatter(z)
    lp = torch.log_softmax(z.detach(), 1)
    assert float(loss) == pytest.approx(float((lp - lp.mean(0)).pow(2).sum(1).mean()))
    loss.backward()
    assert z.grad[3, 1] > 0 and z.grad[3].abs().sum() > z.grad[0].abs().sum()   # descent pulls the outlier in most


def test_mask_config_refuses_a_negative_collapse_weight():
    from mapc.config import MaskConfig
    from mapc.errors import UserError
    with pytest.raises(UserError, match="collapse_weight"):
        MaskConfig(collapse_weight=-1.0)


def test_mask_config_refuses_a_negative_feature_weight():
    from mapc.config import MaskConfig
    from mapc.errors import UserError
    with pytest.raises(UserError, match="feature_weight"):
        MaskConfig(feature_weight=-0.5)


def test_feature_loss_is_the_relative_squared_distance_of_the_authorized_rows():
    from mapc.masking import feature_loss
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 6, generator=g)]
    masked = [torch.cat([t + 0.1 * torch.randn(t.shape, generator=g), 9 * torch.ones_like(t)]) for t in teacher]
    for m in masked:                                    # unauthorized rows follow the authorized ones: ignored
        m.requires_grad_(True)
    loss = feature_loss(masked, teacher)
    want = sum(((m[:4] - t).pow(2).mean() / t.pow(2).mean()).item() for m, t in zip(masked, teacher)) / 2
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(feature_loss([t.clone() for t in teacher], teacher)) == 0.0
    loss.backward()
    assert masked[0].grad[:4].abs().sum() > 0 and masked[0].grad[4:].abs().sum() == 0


def test_feature_loss_split_over_processes_sums_to_the_single_process_gradient():
    from mapc.masking import feature_loss
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 5, generator=g)]
    masked = [(t + 0.3 * torch.randn(t.shape, generator=g)).requires_grad_(True) for t in teacher]
    feature_loss(masked, teacher).backward()

    class TwoRanks:      # all_reduce of the denominators: adds what the other rank holds
        def __init__(self, other):
            self.other = other

        def sum_(self, tensors):
            (t,) = tensors
            t += self.other

    for r in (0, 1):
        rows, others = slice(4 * r, 4 * r + 4), slice(4 - 4 * r, 8 - 4 * r)
        dens = torch.stack([torch.stack([t[others].pow(2).sum(), torch.tensor(float(t[others].numel()))])
                            for t in teacher])
        part = [m.detach()[rows].clone().requires_grad_(True) for m in masked]
        feature_loss(part, [t[rows] for t in teacher], TwoRanks(dens)).backward()
        for p, m in zip(part, masked):
            torch.testing.assert_close(p.grad, m.grad[rows], rtol=1e-5, atol=1e-7)


def test_preprocess_apply_is_the_documented_formula():
    grey = np.array([[[0, 255], [51, 102]]], np.uint8)                 # 1x2x2 grey
    pre = Preprocess(size=(2, 2), channels=3, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    x = apply(pre, grey)
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    v = grey[0] / 255.0
    np.testing.assert_allclose(x[0, 0], (v - 0.5) / 0.5, rtol=1e-6)
    np.testing.assert_allclose(x[0, 1], (v - 0.25) / 0.25, rtol=1e-6)
    np.testing.assert_allclose(x[0, 2], v, rtol=1e-6)
    colour = np.zeros((1, 2, 2, 3), np.uint8)
    colour[..., 1] = 255                                                 # pure green
    one = apply(Preprocess(size=(2, 2), channels=1, mean=(0.0,), std=(1.0,)), colour)
    np.testing.assert_allclose(one, np.full((1, 1, 2, 2), round(0.587 * 255) / 255, np.float32), rtol=1e-6)
    resized = apply(Preprocess(size=(4, 6), channels=1, mean=(0.0,), std=(1.0,)), grey)
    assert resized.shape == (1, 1, 4, 6)


def test_staged_dir_replaces_the_folder_whole_and_rolls_back_on_error(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target) as stage:
        (stage / "report.json").write_text("1")
        (stage / "protected.onnx.data").write_text("old data")
    with staged_dir(target) as stage:
        (stage / "report.json").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == [".mapc-output", "report.json"]
    assert (target / "report.json").read_text() == "2"
    with pytest.raises(RuntimeError):
        with staged_dir(target) as stage:
            (stage / "report.json").write_text("3")
            raise RuntimeError("disk full")
    assert (target / "report.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_without_the_marker_is_never_mapc_s(tmp_path):
    from mapc.atomic import foreign_entries
    target = tmp_path / "out"
    target.mkdir()
    assert foreign_entries(target) == []                           # empty: fine
    (target / "report.md").write_text("my own notes")               # a name mapc uses, but no marker
    assert foreign_entries(target) == ["report.md"]


def test_staged_dir_never_replaces_foreign_files(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        with staged_dir(target) as stage:
            (stage / "report.json").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_mapc_passes_lists_the_pipeline_in_order():
    r = CliRunner().invoke(main, ["passes"])
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()
    assert [ln.split()[1] for ln in lines] == passes.DEFAULT_ORDER
    js = CliRunner().invoke(main, ["passes", "--json"])
    assert [p["name"] for p in json.loads(js.stdout)] == passes.DEFAULT_ORDER


def test_config_loads_without_torch():
    import subprocess
    import sys
    code = "import mapc.config, sys; assert 'torch' not in sys.modules, 'mapc.config imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
