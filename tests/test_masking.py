"""Mask learning: binary masks, frozen weights, determinism, granularity, every model format."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mapc.config import MaskConfig
from mapc.masking import TrainData, learn_mask, maskable_names, masked_forward
from mapc.models import load_model
from mapc.rows import ArrayRows
from tests.tiny_models import plain, residual

CFG = MaskConfig(steps=40, batch_size=16, eval_every=10, val_rows=32)


def toy_data(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(96, 3, 16, 16, generator=g)
    xu = torch.randn(96, 3, 16, 16, generator=g) * 2 + 1
    with torch.no_grad():
        ta = F.log_softmax(module(xa), 1)
        yu = module(xu).argmax(1)
    ya = ta.argmax(1)
    return TrainData(rows(xa[:64], ya[:64]), [rows(xu[:64], yu[:64])], rows(xa[64:], ya[64:]), [rows(xu[64:], yu[64:])])


def rows(x, y=None):
    return ArrayRows(x.numpy(), None if y is None else y.numpy())


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("factory", [residual, plain])
def test_mask_is_binary_and_frozen_weights_unchanged(factory):
    m = factory()
    before = snapshot(m)
    res = learn_mask(m, toy_data(m), 10, CFG, seed=0, device=torch.device("cpu"), progress=False)
    after = snapshot(m)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"
    assert all(not p.requires_grad for p in m.parameters())
    for name, mask in res.masks.items():
        assert set(np.unique(mask)) <= {0, 1} and mask.dtype == np.uint8
        assert mask.shape == dict(m.named_parameters())[name].shape
    assert res.pruned_fraction() > 0, "the target term never pruned anything"


def test_classifier_is_excluded_by_default_and_include_exclude_work():
    m = plain()
    assert maskable_names(m, 10, MaskConfig()) == ["conv.weight", "fc1.weight"]
    assert "fc2.weight" in maskable_names(m, 10, MaskConfig(mask_classifier=True))
    assert maskable_names(m, 10, MaskConfig(exclude=["conv.*"])) == ["fc1.weight"]


def test_deterministic_for_a_seed_on_cpu():
    runs = []
    for _ in range(2):
        m = residual()
        runs.append(learn_mask(m, toy_data(m), 10, CFG, seed=3, device=torch.device("cpu"), progress=False).masks)
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])


def test_channel_granularity_masks_whole_output_channels():
    m = residual()
    cfg = MaskConfig(**{**CFG.__dict__, "granularity": "channel", "lr": 0.3})
    res = learn_mask(m, toy_data(m), 10, cfg, seed=0, device=torch.device("cpu"), progress=False)
    for mask in res.masks.values():
        per_channel = mask.reshape(mask.shape[0], -1)
        assert np.all(per_channel.min(1) == per_channel.max(1))


@pytest.mark.parametrize("fmt", ["export", "torchscript", "state_dict"])
def test_every_model_format_learns_and_masked_forward_matches_manual_masking(tiny_models, fmt):
    loaded = load_model(tiny_models["residual"][fmt], arch="tests.tiny_models:residual")
    m = loaded.module
    cfg = MaskConfig(**{**vars(CFG), "keep_salient": 0.3})   # the saliency lock needs gradients in every format
    res = learn_mask(m, toy_data(m), 10, cfg, seed=0, device=torch.device("cpu"), progress=False)
    assert res.pruned_fraction() > 0
    x = np.random.default_rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32)
    got = masked_forward(m, res.masks, x)
    ref_model = residual()
    with torch.no_grad():
        for n, p in ref_model.named_parameters():
            if n in res.masks:
                p.mul_(torch.from_numpy(res.masks[n]).float())
        ref = ref_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_tiny_data_without_validation_rows_still_learns():
    m = plain()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    y = torch.tensor([0, 1, 2])
    empty = rows(x[:0], y[:0])
    res = learn_mask(m, TrainData(rows(x, y), [rows(x + 1, y)], empty, [empty]), 10, MaskConfig(steps=10), 0,
                     torch.device("cpu"), progress=False)
    assert res.selected_step == 9 and all(set(np.unique(v)) <= {0, 1} for v in res.masks.values())


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_salient_weights_are_locked_and_never_pruned(granularity):
    from mapc.masking import prepare, restore, saliency, top_fraction
    m = residual()
    data = toy_data(m)
    names = maskable_names(m, 10, CFG)
    cfg = MaskConfig(steps=40, batch_size=16, eval_every=10, val_rows=32, granularity=granularity)
    masked = prepare(m, names, cfg, torch.device("cpu"))
    try:
        sal = saliency(m, masked, data.auth, np.arange(len(data.auth)), torch.device("cpu"))
    finally:
        restore(masked)
    locks = {mp.name: top_fraction(s, 0.5) for mp, s in zip(masked, sal)}
    for name, s in zip(names, sal):
        assert s.shape == masked[names.index(name)].score.shape and bool((s >= 0).all())
        lock = locks[name]
        assert int(lock.sum()) == int(np.ceil(0.5 * lock.numel()))
        if (~lock).any():  # the locked entries are the most salient ones
            assert float(s[lock].min()) >= float(s[~lock].max())

    free = learn_mask(m, data, 10, cfg, seed=0, device=torch.device("cpu"), progress=False)
    held = learn_mask(m, data, 10, MaskConfig(**{**vars(cfg), "keep_salient": 0.5}), seed=0,
                      device=torch.device("cpu"), progress=False)
    assert free.pruned_fraction() > 0 and held.pruned_fraction() > 0   # the unlocked half still learns
    for name, lock in locks.items():
        full = lock.expand(dict(m.named_parameters())[name].shape).numpy()
        assert held.masks[name][full].all(), f"{name}: a locked weight was pruned"
        assert 1 - held.masks[name].mean() <= 0.5 + 1e-9


def test_keep_salient_resolves_by_where_the_authorized_rows_come_from():
    from mapc.errors import UserError
    from mapc.config import FEATURE_WEIGHT, KEEP_SALIENT
    assert MaskConfig().resolved_for("source-available").keep_salient == 0.0
    assert MaskConfig().resolved_for("source-free").keep_salient == KEEP_SALIENT["source-free"] > 0
    assert MaskConfig().resolved_for("data-free").keep_salient == KEEP_SALIENT["data-free"] > 0
    assert MaskConfig().resolved_for("source-free").hard_keep == 8 and MaskConfig().resolved_for("data-free").hard_keep == 1
    assert MaskConfig(hard_keep=3).resolved_for("source-available").hard_keep == 3
    assert MaskConfig(keep_salient=0.2).resolved_for("data-free").keep_salient == 0.2
    assert MaskConfig().resolved_for("source-available").jitter == 0
    assert MaskConfig().resolved_for("source-free").jitter == MaskConfig().resolved_for("data-free").jitter == 2
    assert MaskConfig(jitter=0).resolved_for("source-free").jitter == 0
    sa, sf, df = (MaskConfig().resolved_for(m) for m in ("source-available", "source-free", "data-free"))
    assert sa.probe_weight == sf.probe_weight == 2.0 and df.probe_weight == 0.0
    assert MaskConfig(probe_weight=1.5).resolved_for("data-free").probe_weight == 1.5
    assert sf.steps == 1500 and sa.steps == df.steps == 1000
    assert MaskConfig(steps=7).resolved_for("source-free").steps == 7
    assert sa.source_budget == sf.source_budget == 1.0 and df.source_budget == 5.0
    assert MaskConfig(source_budget=0.5).resolved_for("data-free").source_budget == 0.5
    assert sa.tie_break == "top1" and sf.tie_break == df.tie_break == "drop"
    assert MaskConfig(tie_break="top1-then-drop").resolved_for("source-free").tie_break == "top1-then-drop"
    assert sa.feature_weight == df.feature_weight == 0.0 and sf.feature_weight == FEATURE_WEIGHT["source-free"] > 0
    assert MaskConfig(feature_weight=0.0).resolved_for("source-free").feature_weight == 0.0
    with pytest.raises(UserError, match="mask.tie_break"):
        MaskConfig(tie_break="worst")
    with pytest.raises(UserError, match="mask.source_budget"):
        MaskConfig(source_budget=float("nan"))
    with pytest.raises(UserError, match="mask.probe_weight"):
        MaskConfig(probe_weight=-1.0)
    with pytest.raises(UserError, match="mask.jitter"):
        MaskConfig(jitter=-1)
    with pytest.raises(UserError, match="keep_salient"):
        MaskConfig(keep_salient=1.0)


def test_hardest_authorized_keeps_the_rows_the_mask_changes_most():
    from mapc.masking import Batch, hardest_authorized, prepare, restore
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    masked = prepare(m, ["weight"], MaskConfig(), torch.device("cpu"))
    with torch.no_grad():
        masked[0].score[:, :2] = -1.0               # the mask removes the inputs 0 and 1
    x = torch.zeros(6, 4)
    x[[1, 4], 0] = 5.0                              # only rows 1 and 4 use a pruned input
    with torch.no_grad():
        teacher = torch.log_softmax(m(x), 1)
    batch = Batch(x, teacher.argmax(1), None, teacher, [x[:2]], [teacher.argmax(1)[:2]])
    hard = hardest_authorized(m, masked, batch, 2)
    assert sorted(hard.auth_x[:, 0].tolist()) == [5.0, 5.0] and hard.unauth_x[0] is batch.unauth_x[0]
    restore(masked)
