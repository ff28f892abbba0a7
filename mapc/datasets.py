"""Domain data: ``NAME=PATH`` specs, ``.npz`` files and ImageFolder directories.

A domain is a set of uint8 images, optional integer labels and a per-row
split. Invariant: rows used to learn a mask (``train``) and rows used to
measure it (``test``) never overlap when the source gives a split; without a
split every row is both, and reports say so (``split: "none"``).

``.npz`` layout: ``images`` uint8 NxHxW (grey) or NxHxWxC (C = 1, 3 or 4),
``labels`` integer N (optional), ``split`` N strings "train"/"test"
(optional). Object arrays are refused (``allow_pickle=False``).

ImageFolder: ``PATH/<class>/<image>``, or ``PATH/train/<class>/<image>`` and
``PATH/test/<class>/<image>`` for a split; class folders named 0..K-1 map to
those labels, otherwise sorted folder names map to 0..K-1.

Nothing is decoded up front: an ImageFolder is checked in one pass over file
headers (size, format, truncation) and read a batch at a time; an
uncompressed ``.npz`` (``np.savez``) is memory-mapped, a compressed one read
as uint8. Preprocessing to float happens per batch (``mapc.rows``).
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


def _memory_map(p: Path, member: str) -> np.ndarray | None:
    """A read-only memory map of an uncompressed (``np.savez``) member, or None when it is compressed or not a
    plain C-ordered array: then it is read into memory."""
    with zipfile.ZipFile(p) as z:
        try:
            info = z.getinfo(member)
        except KeyError:        # the member is stored under another name (np.load still finds it)
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with z.open(info) as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            header = f.tell()
    if fortran or dtype.hasobject:
        return None
    with open(p, "rb") as fh:       # the member's data starts after its local header (30 bytes + name + extra)
        fh.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(fh.read(4), "<u2")
    offset = info.header_offset + 30 + int(name_len) + int(extra_len) + header
    return np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))


def _load_npz(p: Path):
    if not zipfile.is_zipfile(p):
        raise UserError(f"{p}: not an .npz archive (np.savez writes one); rebuild or re-download it")
    try:
        _check_npz_headers(p)
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k in ("labels", "split")}
            if "images" in f.files:
                arrays["images"] = _memory_map(p, "images.npy")
                if arrays["images"] is None:
                    arrays["images"] = f["images"]
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


GREY_MODES = ("L", "1", "P", "I", "I;16")


class ImageFolderImages:
    """An ImageFolder's images, decoded when indexed: ``images[idx]`` -> uint8 array of the folder's layout.

    The layout is the first image's size, with 3 channels if any file is colour (grey files are then
    replicated) and 1 otherwise; a file of another size or mode is brought to it as it is read
    (bilinear resize), as an in-memory load would. Holds only paths, so it pickles cheaply into
    DataLoader workers.
    """

    def __init__(self, files: list[Path], height: int, width: int, channels: int):
        self.files, self.height, self.width, self.channels = files, height, width, channels

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), self.height, self.width) + ((3,) if self.channels == 3 else ())

    @property
    def ndim(self) -> int:
        return len(self.shape)

    dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self._read(self.files[int(idx)])
        rows = np.arange(len(self.files))[idx]
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        for i, r in enumerate(rows):
            out[i] = self._read(self.files[int(r)])
        return out

    def _read(self, f: Path) -> np.ndarray:
        from PIL import Image
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("L") if im.mode in GREY_MODES else im.convert("RGB"))
        except Exception as e:   # decoded after the header pass: a file broken past its header, or changed since
            raise UserError(f"{f}: not a readable image ({type(e).__name__}: {' '.join(str(e).split())[:120]}); "
                            f"remove or fix it")
        if arr.shape != self.shape[1:]:
            from .preprocess import resize, to_channels
            arr = resize(to_channels(arr[None], self.channels), (self.height, self.width))[0]
            arr = arr[..., 0] if self.channels == 1 else arr
        return arr


def _class_folders(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir())


def _load_image_folder(p: Path):
    """Header pass over ``p/<class>/<image>`` (or ``p/train/<class>`` and ``p/test/<class>``): every file is
    opened, its size checked and its data checked for truncation without decoding; pixels are read later,
    one batch at a time (``ImageFolderImages``)."""
    parts = {d.name: d for d in _class_folders(p)}
    if set(parts) == {"train", "test"}:
        groups = [("train", parts["train"]), ("test", parts["test"])]
    else:
        groups = [(None, p)]
    class_names = sorted({d.name for _, g in groups for d in _class_folders(g)})
    if not class_names:
        raise UserError(f"{p}: an ImageFolder needs one subfolder per class; none found")
    if all(n.isdigit() for n in class_names):
        label_of = {n: int(n) for n in class_names}
    else:
        label_of = {n: i for i, n in enumerate(class_names)}
    files, labels, split, layout = [], [], [], None
    colour = False
    for part, folder in groups:
        for d in _class_folders(folder):
            found = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{d}: class folder {d.name!r} holds no images; add images or remove the folder")
            for f in found:
                size, mode = _check_header(f)
                layout = layout or size
                colour = colour or mode not in GREY_MODES
                files.append(f)
                labels.append(label_of[d.name])
                split.append(part)
    images = ImageFolderImages(files, layout[1], layout[0], 3 if colour else 1)
    return images, np.asarray(labels, np.int64), None if groups[0][0] is None else np.asarray(split)


def _check_header(f: Path) -> tuple[tuple[int, int], str]:
    """(width, height), mode of an image file, from its header; refuses implausible sizes and files whose data
    is truncated or corrupt where that shows without decoding (PNG chunk checksums, JPEG end marker)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                w, h = im.size
                mode, fmt = im.mode, im.format
                if w * h > MAX_PIXELS or w == 0 or h == 0:
                    raise UserError(f"{f}: {w}x{h} pixels is not a plausible training image (limit "
                                    f"{MAX_PIXELS:,} pixels); remove it or resize it")
                if fmt == "PNG":
                    im.verify()
        if fmt == "JPEG" and not _jpeg_has_end(f):
            raise UserError(f"{f}: truncated JPEG (no end-of-image marker); remove or re-encode it")
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise UserError(f"{f}: not a readable image ({type(e).__name__}); remove or fix it")
    return (w, h), mode


def _jpeg_has_end(f: Path, tail: int = 4096) -> bool:
    with open(f, "rb") as fh:
        fh.seek(0, 2)
        n = fh.tell()
        fh.seek(max(0, n - tail))
        return b"\xff\xd9" in fh.read()
