"""Domain data: ``NAME=PATH`` specs, ``.npz`` files and ImageFolder directories.

A domain is a set of uint8 images, optional integer labels and a per-row
split. Invariant: rows used to learn a mask (``train``) and rows used to
measure it (``test``) never overlap when the source gives a split; without a
split every row is both, and reports say so (``split: "none"``).

``.npz`` layout: ``images`` uint8 NxHxW (grey) or NxHxWxC (C = 1, 3 or 4),
``labels`` integer N (optional), ``split`` N strings "train"/"test"
(optional). Object arrays are refused (``allow_pickle=False``).

ImageFolder: ``PATH/<class>/<image>``; class folders named 0..K-1 map to those
labels, otherwise sorted folder names map to 0..K-1.
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

MAX_PIXELS = 4096 * 4096   # per image; larger files are refused before they are decoded (decompression bombs)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Domain:
    name: str
    path: str
    images: np.ndarray          # uint8 NxHxW or NxHxWxC
    labels: np.ndarray | None   # int64 N, or None when unlabelled
    split: np.ndarray | None    # "train"/"test" per row, or None

    def rows(self, part: str) -> np.ndarray:
        """Row indices for ``train`` or ``test``; all rows when there is no split."""
        if self.split is None:
            return np.arange(len(self.images))
        return np.flatnonzero(self.split == part)

    @property
    def has_split(self) -> bool:
        return self.split is not None


def parse_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH)."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise UserError(f"data spec {spec!r} is not NAME=PATH; write e.g. --unauthorized svhn=data/svhn.npz")
    return name.strip(), path.strip()


def parse_specs(specs, flag: str) -> dict[str, str]:
    """Repeated ``NAME=PATH`` flags -> {NAME: PATH}; a NAME given twice is an error, never a silent overwrite."""
    out: dict[str, str] = {}
    for spec in specs:
        name, path = parse_spec(spec)
        if name in out:
            raise UserError(f"{flag} {name}=...: the name {name!r} is given twice ({out[name]} and {path}); "
                            f"give each domain its own name")
        out[name] = path
    return out


def load_domain(name: str, path: str | Path, num_classes: int | None = None) -> Domain:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory (domain {name!r}); check the path")
    if p.is_dir():
        images, labels, split = _load_image_folder(p)
    elif p.suffix == ".npz":
        images, labels, split = _load_npz(p)
    else:
        raise UserError(f"{p}: domain {name!r} must be an .npz file or an ImageFolder directory")
    if len(images) == 0:
        raise UserError(f"{p}: domain {name!r} has no images")
    if labels is not None and num_classes is not None:
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            raise UserError(f"{p}: {int(bad.sum())} labels lie outside the model's classes 0..{num_classes - 1} "
                            f"(e.g. {int(labels[bad][0])}); relabel the data or pick the right model")
    return Domain(name, str(p), images, labels, split)


MAX_ARRAY_BYTES = 16 << 30   # per array in an .npz; the header is read before any data


def _check_npz_headers(p: Path) -> None:
    """Refuse arrays whose declared size is implausible before numpy allocates them (a 10-byte header can
    claim terabytes)."""
    with zipfile.ZipFile(p) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if nbytes > MAX_ARRAY_BYTES:
                raise UserError(f"{p}: array {info.filename[:-4]!r} declares shape {shape} ({nbytes / 2**30:.0f} GiB), "
                                f"more than mapc loads ({MAX_ARRAY_BYTES >> 30} GiB); split the data")


def _load_npz(p: Path):
    if not zipfile.is_zipfile(p):
        raise UserError(f"{p}: not an .npz archive (np.savez writes one); rebuild or re-download it")
    try:
        _check_npz_headers(p)
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k in ("images", "labels", "split")}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{p}: not a readable .npz file ({type(e).__name__}); rebuild or re-download it")
    except ValueError as e:
        raise UserError(f"{p}: holds object arrays, which mapc refuses to unpickle; "
                        f"store images as uint8 and labels as integers ({e})")
    if "images" not in arrays:
        raise UserError(f"{p}: no 'images' array (found {sorted(arrays)}); save images=... with np.savez")
    images = arrays["images"]
    if images.dtype != np.uint8:
        raise UserError(f"{p}: 'images' has dtype {images.dtype}, expected uint8 (0-255); "
                        f"convert with (x*255).round().astype('uint8')")
    if images.ndim == 4 and images.shape[-1] not in (1, 3, 4) or images.ndim not in (3, 4):
        raise UserError(f"{p}: 'images' has shape {images.shape}, expected NxHxW or NxHxWxC with C in 1, 3, 4")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise UserError(f"{p}: 'images' has shape {images.shape}: images of zero height or width")
    n = len(images)
    labels = arrays.get("labels")
    if labels is not None:
        if labels.dtype.kind not in "iu":
            raise UserError(f"{p}: 'labels' has dtype {labels.dtype}, expected integers")
        if labels.shape != (n,):
            raise UserError(f"{p}: 'labels' has shape {labels.shape}, expected ({n},) to match 'images'")
        labels = labels.astype(np.int64)
    split = arrays.get("split")
    if split is not None:
        if split.shape != (n,) or split.dtype.kind not in "US":
            raise UserError(f"{p}: 'split' must be {n} strings 'train' or 'test', "
                            f"got dtype {split.dtype} shape {split.shape}")
        split = split.astype(str)
        odd = set(np.unique(split)) - {"train", "test"}
        if odd:
            raise UserError(f"{p}: 'split' holds {sorted(odd)}; only 'train' and 'test' are allowed")
    return images, labels, split


def _load_image_folder(p: Path):
    from PIL import Image, UnidentifiedImageError

    classes = sorted(d for d in p.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{p}: an ImageFolder needs one subfolder per class; none found")
    names = [d.name for d in classes]
    if all(n.isdigit() for n in names):
        label_of = {n: int(n) for n in names}
    else:
        label_of = {n: i for i, n in enumerate(names)}
    images, labels = [], []
    for d in classes:
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(f) as im:
                        w, h = im.size
                        if w * h > MAX_PIXELS or w == 0 or h == 0:
                            raise UserError(f"{f}: {w}x{h} pixels is not a plausible training image (limit "
                                            f"{MAX_PIXELS:,} pixels); remove it or resize it")
                        arr = np.asarray(im.convert("L") if im.mode in ("L", "1", "P", "I", "I;16")
                                         else im.convert("RGB"))
            except UserError:
                raise
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning) as e:
                raise UserError(f"{f}: not a readable image ({type(e).__name__}); remove or fix it")
            images.append(arr)
            labels.append(label_of[d.name])
    if not images:
        raise UserError(f"{p}: no images found under its class folders")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        # mixed sizes or modes: bring everything to the first image's layout
        from .preprocess import resize, to_channels
        ch = 3 if any(a.ndim == 3 for a in images) else 1
        h, w = images[0].shape[:2]
        images = [resize(to_channels(a[None], ch), (h, w))[0] for a in images]
        images = [a[..., 0] if ch == 1 else a for a in images]
    return np.stack(images).astype(np.uint8), np.asarray(labels, np.int64), None
