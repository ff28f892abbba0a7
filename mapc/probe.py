"""How much label information a protected model's outputs still carry: a linear probe.

An attacker who holds a few labelled rows of an unauthorized domain can fit a
linear map from the artifact's logits to the labels and read the labels back,
whatever the artifact's own top-1 says (a model that always ranks the true
class last is useless by top-1 and perfectly informative). The probe:

    k    = max(num_classes, floor(fraction * n_train)) train rows, drawn with
           np.random.default_rng(seed) (``draws`` independent draws)
    X    = [ (z - mean_k) / std_k , 1 ]        logits standardised with the k rows' statistics, bias column
    W    = (X_k^T X_k + alpha I)^-1 X_k^T Y_k  closed-form ridge to one-hot labels Y
    pred = argmax(X_test W)                    on the test rows

for alpha in ``ALPHAS``; each draw keeps the alpha with the best *test*
accuracy (deliberately favouring the attacker). The reported accuracy is the
mean over draws. numpy only (no torch), so compile and verify can reuse it.
"""
from __future__ import annotations

import numpy as np

ALPHAS = (1e-3, 1e-1, 10.0)


def _features(z: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    x = (z - mean) / std
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def probe_accuracy(train_logits: np.ndarray, train_labels: np.ndarray, test_logits: np.ndarray,
                   test_labels: np.ndarray, num_classes: int, fraction: float, seed: int = 0,
                   draws: int = 5) -> dict:
    """Top-1 (%) of a ridge probe fitted on ``fraction`` of the labelled train rows, mean over draws."""
    train_logits = np.asarray(train_logits, dtype=np.float64)
    test_logits = np.asarray(test_logits, dtype=np.float64)
    train_labels = np.asarray(train_labels).astype(np.int64)
    test_labels = np.asarray(test_labels).astype(np.int64)
    n = len(train_logits)
    k = min(n, max(num_classes, int(np.floor(fraction * n))))
    rng = np.random.default_rng(seed)
    eye = np.eye(num_classes)
    accs, alphas = [], []
    for _ in range(draws):
        rows = rng.choice(n, size=k, replace=False)
        zk = train_logits[rows]
        mean, std = zk.mean(0), zk.std(0)
        std = np.where(std > 1e-12, std, 1.0)
        xk, xt = _features(zk, mean, std), _features(test_logits, mean, std)
        yk = eye[train_labels[rows]]
        gram, rhs = xk.T @ xk, xk.T @ yk
        best = (-1.0, None)
        for a in ALPHAS:
            w = np.linalg.solve(gram + a * np.eye(len(gram)), rhs)
            acc = float((np.argmax(xt @ w, 1) == test_labels).mean() * 100)
            if acc > best[0]:
                best = (acc, a)
        accs.append(best[0])
        alphas.append(best[1])
    return {"acc": float(np.mean(accs)), "k": int(k), "draws": int(draws), "accs": accs, "alphas": alphas}
