"""The linear probe: recovers a label permutation, recovers nothing from label-free outputs."""
from __future__ import annotations

import numpy as np

from mapc.probe import probe_accuracy


def toy(n, seed, fn):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    return fn(y, rng), y


def test_permuted_labels_are_recovered():
    perm = np.random.default_rng(0).permutation(10)
    make = lambda y, rng: np.eye(10)[perm[y]] * 3 + rng.normal(0, 0.5, (len(y), 10))
    (ztr, ytr), (zte, yte) = toy(2000, 1, make), toy(1000, 2, make)
    out = probe_accuracy(ztr, ytr, zte, yte, 10, fraction=0.1)
    assert out["k"] == 200 and out["acc"] > 90
    assert probe_accuracy(ztr, ytr, zte, yte, 10, fraction=0.01)["acc"] > 75  # 20 rows already recover most


def test_label_free_outputs_recover_about_chance():
    const = lambda y, rng: np.tile(np.arange(10.0), (len(y), 1))
    noise = lambda y, rng: rng.normal(0, 1, (len(y), 10))
    for make in (const, noise):
        (ztr, ytr), (zte, yte) = toy(2000, 1, make), toy(1000, 2, make)
        out = probe_accuracy(ztr, ytr, zte, yte, 10, fraction=0.1)
        assert out["acc"] <= 20, out


def test_small_fraction_uses_at_least_one_row_per_class_and_is_deterministic():
    make = lambda y, rng: rng.normal(0, 1, (len(y), 10))
    (ztr, ytr), (zte, yte) = toy(300, 1, make), toy(100, 2, make)
    a = probe_accuracy(ztr, ytr, zte, yte, 10, fraction=0.01, seed=3)
    b = probe_accuracy(ztr, ytr, zte, yte, 10, fraction=0.01, seed=3)
    assert a["k"] == 10 and a == b
