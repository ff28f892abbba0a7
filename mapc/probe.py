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

and, on the same k rows, the best relabelling of the outputs: each predicted
class maps to its most frequent true label among the k rows (classes never
predicted there map to the most frequent label overall). Among all maps from
predicted class to label it is the most accurate on the k rows, so it covers
every permutation (a protection that only moves each class elsewhere).

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


def budget_size(n: int, fraction: float, num_classes: int) -> int:
    """Rows an attacker with ``fraction`` of ``n`` train rows holds: at least one per class, at most n."""
    return min(n, max(num_classes, int(np.floor(fraction * n))))


def probe_draws(n: int, fraction: float, num_classes: int, seed: int = 0, draws: int = 5) -> list[np.ndarray]:
    """The train rows each draw of ``probe_accuracy`` fits on (callers run the model on these rows only)."""
    k = budget_size(n, fraction, num_classes)
    rng = np.random.default_rng(seed)
    return [rng.choice(n, size=k, replace=False) for _ in range(draws)]


def relabel_accuracy(pred_k: np.ndarray, labels_k: np.ndarray, pred_test: np.ndarray, test_labels: np.ndarray,
                     num_classes: int) -> float:
    """Top-1 (%) on the test rows of the best predicted-class -> label map fitted on k rows (see above)."""
    counts = np.zeros((max(num_classes, int(pred_k.max()) + 1, int(pred_test.max()) + 1), num_classes))
    np.add.at(counts, (pred_k, labels_k), 1)
    fallback = int(np.bincount(labels_k, minlength=num_classes).argmax())
    mapping = np.where(counts.sum(1) > 0, counts.argmax(1), fallback)
    return float((mapping[pred_test] == test_labels).mean() * 100)


def probe_accuracy(train_logits: np.ndarray, train_labels: np.ndarray, test_logits: np.ndarray,
                   test_labels: np.ndarray, num_classes: int, fraction: float, seed: int = 0,
                   draws: int = 5) -> dict:
    """Top-1 (%) of a ridge probe fitted on ``fraction`` of the labelled train rows, mean over draws
    (``acc``), and of the best relabelling on the same rows (``relabel_acc``)."""
    train_logits = np.asarray(train_logits, dtype=np.float64)
    test_logits = np.asarray(test_logits, dtype=np.float64)
    train_labels = np.asarray(train_labels).astype(np.int64)
    test_labels = np.asarray(test_labels).astype(np.int64)
    n = len(train_logits)
    k = budget_size(n, fraction, num_classes)
    eye = np.eye(num_classes)
    accs, alphas, relabels = [], [], []
    for rows in probe_draws(n, fraction, num_classes, seed, draws):
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
        relabels.append(relabel_accuracy(zk.argmax(1), train_labels[rows], test_logits.argmax(1), test_labels,
                                         num_classes))
    return {"acc": float(np.mean(accs)), "k": int(k), "draws": int(draws), "accs": accs, "alphas": alphas,
            "relabel_acc": float(np.mean(relabels))}
