"""Build the bundled four-domain digits benchmark in samples/digits/.

Every domain is written as one compressed ``.npz`` with ``images`` (uint8),
``labels`` (int64, 0-9) and ``split`` (unicode, "train" or "test" per row).
Train and test rows are disjoint, and the two MNIST-derived domains share the
same split of the underlying MNIST digits, so no test digit of any domain was
seen in training by a model fitted on the mnist train rows.

Build-time tools only (not runtime dependencies of mapc): scikit-learn
(UCI digits), scikit-image (photographs), Pillow (font rendering).

    python samples/build_digits.py [--mnist ../shared/data/mnist10k.npz] [--out samples/digits]

The output is deterministic for a given seed and package versions.
"""
from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SEED = 20240301
MNIST_TEST = 2000
MNISTM_ROWS = (2800, 1200)
SYN_ROWS = (2800, 1200)
UCI_TEST = 1000
NEAR_BLACK = 20  # of 255: see is_near_black


def split_column(n_train: int, n_test: int) -> np.ndarray:
    return np.array(["train"] * n_train + ["test"] * n_test)


def build_mnist(src: Path, rng: np.random.Generator):
    """The authorized domain: 10,000 real MNIST digits, 8,000 train / 2,000 test."""
    with np.load(src) as f:
        images, labels = f["images"].astype(np.uint8), f["labels"].astype(np.int64)
    order = rng.permutation(len(images))
    test, train = order[:MNIST_TEST], order[MNIST_TEST:]
    idx = np.concatenate([train, test])
    return images[idx], labels[idx], split_column(len(train), len(test)), (train, test)


def build_uci(rng: np.random.Generator):
    """UCI optical digits (8x8, 0..16) upsampled into a 20x20 box centred in 28x28, like MNIST."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = np.zeros((len(d.images), 28, 28), np.uint8)
    for i, im in enumerate(d.images):
        small = Image.fromarray((im * (255.0 / 16.0)).astype(np.uint8))
        out[i, 4:24, 4:24] = np.asarray(small.resize((20, 20), Image.BICUBIC))
    order = rng.permutation(len(out))
    test, train = order[:UCI_TEST], order[UCI_TEST:]
    idx = np.concatenate([train, test])
    return out[idx], d.target[idx].astype(np.int64), split_column(len(train), len(test))


def photographs() -> list[np.ndarray]:
    """The real colour photographs that scikit-image and scikit-learn ship."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
             "immunohistochemistry", "retina"]
    photos = [getattr(sd, n)()[..., :3] for n in names]
    photos += list(load_sample_images().images)
    return [p.astype(np.uint8) for p in photos]


def draw_patch(photos, rng: np.random.Generator) -> np.ndarray:
    p = photos[rng.integers(len(photos))]
    y, x = rng.integers(p.shape[0] - 28), rng.integers(p.shape[1] - 28)
    return p[y:y + 28, x:x + 28].astype(np.int16)


def is_near_black(patch: np.ndarray) -> bool:
    """A patch whose median grey level is below ``NEAR_BLACK`` of 255 (the deep-field sky, the
    retina's black surround, the space behind the astronaut): |patch - digit| on it is a light
    MNIST digit on a black background, i.e. the authorized domain itself, not a photo blend."""
    return float(np.median(patch.mean(-1))) < NEAR_BLACK


def build_mnistm(mnist_images, mnist_labels, split_idx, rng: np.random.Generator):
    """MNIST-M recipe: |photo patch - digit| per channel, with the patch drawn from a real photo.

    A near-black patch (``is_near_black``) is redrawn from a second generator, so every row
    is a digit on photo texture while the main generator advances exactly as it did before
    the rule existed (the other rows of mnistm and the domains drawn after it are unchanged).
    """
    photos = photographs()
    redraw = np.random.default_rng(SEED + 1)
    train, test = split_idx

    def blend(rows):
        out = np.empty((len(rows), 28, 28, 3), np.uint8)
        for k, r in enumerate(rows):
            patch = draw_patch(photos, rng)
            while is_near_black(patch):
                patch = draw_patch(photos, redraw)
            digit = mnist_images[r].astype(np.int16)[..., None]
            out[k] = np.abs(patch - digit).astype(np.uint8)
        return out

    tr = rng.choice(train, MNISTM_ROWS[0], replace=False)
    te = rng.choice(test, MNISTM_ROWS[1], replace=False)
    images = np.concatenate([blend(tr), blend(te)])
    labels = np.concatenate([mnist_labels[tr], mnist_labels[te]])
    return images, labels, split_column(len(tr), len(te))


def fonts() -> list[str]:
    found = sorted(glob.glob("/usr/share/fonts/truetype/**/*.ttf", recursive=True))
    if not found:
        raise SystemExit("build_digits: no TrueType fonts under /usr/share/fonts/truetype")
    return found


def render_digit(digit: int, font_path: str, rng: np.random.Generator) -> np.ndarray:
    """One 32x32 colour digit: random font, size, colours, offset, rotation and blur."""
    size = 64
    bg = rng.integers(0, 256, 3)
    fg = rng.integers(0, 256, 3)
    while np.abs(fg.astype(int) - bg.astype(int)).sum() < 160:
        fg = rng.integers(0, 256, 3)
    canvas = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
    font = ImageFont.truetype(font_path, int(rng.integers(34, 50)))
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = draw.textbbox((0, 0), str(digit), font=font)
    ox = (size - (x1 - x0)) / 2 - x0 + rng.uniform(-5, 5)
    oy = (size - (y1 - y0)) / 2 - y0 + rng.uniform(-5, 5)
    draw.text((ox, oy), str(digit), font=font, fill=tuple(int(c) for c in fg))
    canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR,
                           fillcolor=tuple(int(c) for c in bg))
    canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.5))))
    return np.asarray(canvas.resize((32, 32), Image.BILINEAR))


def build_syn(rng: np.random.Generator):
    paths = fonts()
    n = sum(SYN_ROWS)
    labels = rng.integers(0, 10, n).astype(np.int64)
    images = np.stack([render_digit(int(d), paths[rng.integers(len(paths))], rng) for d in labels])
    return images, labels, split_column(*SYN_ROWS)


def save(out: Path, name: str, images, labels, split) -> None:
    path = out / f"{name}.npz"
    np.savez_compressed(path, images=images, labels=labels, split=split)
    n_test = int((split == "test").sum())
    print(f"{name:7s} {images.shape} train={len(split) - n_test} test={n_test} "
          f"{path.stat().st_size / 1e6:.2f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    ap.add_argument("--mnist", type=Path, default=here.parent.parent / "shared/data/mnist10k.npz")
    ap.add_argument("--out", type=Path, default=here / "digits")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    m_img, m_lab, m_split, split_idx = build_mnist(args.mnist, rng)
    save(args.out, "mnist", m_img, m_lab, m_split)
    # mnist-m is drawn from the raw (unpermuted) arrays with the same train/test indices
    with np.load(args.mnist) as f:
        raw_img, raw_lab = f["images"].astype(np.uint8), f["labels"].astype(np.int64)
    save(args.out, "mnistm", *build_mnistm(raw_img, raw_lab, split_idx, rng))
    save(args.out, "uci", *build_uci(rng))
    save(args.out, "syn", *build_syn(rng))


if __name__ == "__main__":
    main()
