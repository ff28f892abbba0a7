"""Streaming data: ImageFolder and .npz rows read a batch at a time, the header pass, the DataLoader's order."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mapc.cli import main
from mapc.datasets import ImageFolderImages, load_domain
from mapc.errors import UserError
from mapc.loader import Shard, step_loader
from mapc.preprocess import Preprocess, apply
from mapc.rows import ArrayRows, Concat, ImageRows, Mapped, cached
from tests.conftest import DIGITS

PRE = Preprocess(size=(16, 16), channels=3, mean=(0.5,), std=(0.5,))


def digits(name: str, n: int):
    with np.load(DIGITS / f"{name}.npz") as f:
        return f["images"][:n], f["labels"][:n]


def write_folder(root, images, labels, split=None, fmt="png"):
    for i, (im, y) in enumerate(zip(images, labels)):
        part = root if split is None else root / split[i]
        d = part / str(int(y))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i:05d}.{fmt}")
    return root


def test_image_folder_is_read_lazily_and_equals_the_in_memory_rows(tmp_path):
    images, labels = digits("mnistm", 60)
    root = write_folder(tmp_path / "f", images, labels)
    d = load_domain("m", root)
    assert isinstance(d.images, ImageFolderImages) and d.images.shape == (60, 28, 28, 3)
    order = [f.name for f in d.images.files]
    stored = images[[int(n[:5]) for n in order]]                        # folder order: by class, then name
    assert np.array_equal(d.images[np.arange(60)], stored)
    rows = ImageRows(d.images, np.arange(60), d.labels, PRE)
    assert np.array_equal(rows.take(np.array([5, 1, 33])), apply(PRE, stored[[5, 1, 33]]))
    assert np.array_equal(np.concatenate(list(rows.batches(7))), apply(PRE, stored))


def test_train_and_test_subfolders_give_a_split(tmp_path):
    images, labels = digits("mnist", 40)
    split = np.array(["train"] * 30 + ["test"] * 10)
    d = load_domain("m", write_folder(tmp_path / "f", images, labels, split))
    assert d.has_split and len(d.rows("train")) == 30 and len(d.rows("test")) == 10


def test_uncompressed_npz_is_memory_mapped(tmp_path):
    images, labels = digits("mnist", 50)
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    d = load_domain("a", tmp_path / "a.npz")
    assert isinstance(d.images, np.memmap) and np.array_equal(np.asarray(d.images), images)


@pytest.mark.parametrize("damage", ["random-bytes", "truncated-png", "truncated-jpeg", "empty-class", "huge"])
def test_a_broken_folder_is_refused_before_learning_names_the_file(tmp_path, tiny_models, damage):
    images, labels = digits("mnist", 20)
    root = write_folder(tmp_path / "f", images, labels, fmt="jpg" if damage == "truncated-jpeg" else "png")
    victim = sorted((root / str(int(labels[0]))).iterdir())[0]
    if damage == "random-bytes":
        victim.write_bytes(np.random.default_rng(0).bytes(300))
    elif damage in ("truncated-png", "truncated-jpeg"):
        victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])
    elif damage == "empty-class":
        (root / "7x").mkdir()
        victim = root / "7x"
    else:
        Image.new("L", (5000, 5000)).save(victim, format="PNG")
    with pytest.raises(UserError, match=str(victim.name)):
        load_domain("m", root)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(tiny_models["plain"]["export"]), "--authorized", f"mnist={root}",
                                  "--unauthorized", f"syn={root}", "--input-size", "16", "16", "-o", str(out), "-q"])
    assert r.exit_code == 2 and victim.name in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_cached_rows_are_the_same_values_and_large_rows_stay_streamed():
    images, labels = digits("syn", 40)
    rows = ImageRows(images, np.arange(40), labels, PRE)
    small = cached(rows)
    assert isinstance(small, ArrayRows) and np.array_equal(small.take(np.arange(40)), rows.materialize())
    assert cached(rows, budget=1000) is rows


def test_concat_and_mapped_keep_row_positions():
    a = ArrayRows(np.arange(5, dtype=np.float32)[:, None], np.arange(5))
    b = Mapped(a.subset(np.array([0, 1])), lambda x, idx: x + 100 * (idx[:, None] + 1))
    both = Concat(a, b)
    assert both.take(np.array([6, 0, 5, 4])).ravel().tolist() == [201, 0, 100, 4]
    assert both.labels.tolist() == [0, 1, 2, 3, 4, 0, 1]


def test_loader_batches_do_not_depend_on_workers_or_shards():
    x = np.random.default_rng(0).standard_normal((50, 3, 4, 4)).astype(np.float32)
    sources = [ArrayRows(x, np.arange(50) % 10), ArrayRows(x * 2, None)]

    def batches(workers, shard=Shard()):
        rng = np.random.default_rng(7)
        return list(step_loader(sources, [8, 8], 5, rng, torch.device("cpu"), workers, shard))
    serial, parallel = batches(0), batches(2)
    halves = [batches(0, Shard(r, 2)) for r in range(2)]
    for step in range(5):
        for k in range(2):
            assert torch.equal(serial[step][k][0], parallel[step][k][0])
            assert torch.equal(torch.cat([h[step][k][0] for h in halves]), serial[step][k][0])
        assert serial[step][1][1] is None and torch.equal(serial[step][0][1], parallel[step][0][1])


def test_translated_moves_content_and_repeats_the_edge():
    from mapc.loader import translated
    x = np.arange(2 * 1 * 4 * 5, dtype=np.float32).reshape(2, 1, 4, 5)
    out = translated(x, np.array([[1, -2], [0, 0]]))
    assert out.shape == x.shape and np.array_equal(out[1], x[1])
    assert np.array_equal(out[0, 0, 1:, :3], x[0, 0, :3, 2:])          # content moved down 1, left 2
    assert np.array_equal(out[0, 0, 0, :3], x[0, 0, 0, 2:])            # top row repeats the edge row
    assert np.array_equal(out[0, 0, 1:, 3], x[0, 0, :3, 4]) and np.array_equal(out[0, 0, 1:, 4], x[0, 0, :3, 4])
    assert translated(x, np.zeros((2, 2), np.int64)) is x


def test_jittered_batches_do_not_depend_on_workers_or_shards_and_jitter_zero_draws_nothing():
    x = np.random.default_rng(0).standard_normal((50, 3, 6, 6)).astype(np.float32)
    sources = [ArrayRows(x, np.arange(50) % 10), ArrayRows(x * 2, None)]

    def batches(workers, shard=Shard(), jitter=(2, 0)):
        return list(step_loader(sources, [8, 8], 4, np.random.default_rng(7), torch.device("cpu"), workers, shard,
                                jitter=list(jitter)))
    serial, parallel = batches(0), batches(2)
    halves = [batches(0, Shard(r, 2)) for r in range(2)]
    plain = batches(0, jitter=(0, 0))
    unjittered = list(step_loader(sources, [8, 8], 4, np.random.default_rng(7), torch.device("cpu")))
    for step in range(4):
        assert torch.equal(serial[step][0][0], parallel[step][0][0])
        assert torch.equal(torch.cat([h[step][0][0] for h in halves]), serial[step][0][0])
        assert torch.equal(plain[step][0][0], unjittered[step][0][0])
    rows = torch.from_numpy(x)
    assert not all(any(torch.equal(r, s) for s in rows) for r in serial[0][0][0])   # authorized rows shifted
    assert all(any(torch.equal(r, s) for s in rows * 2) for r in serial[0][1][0])   # jitter 0: rows as stored


def test_compile_streams_an_image_folder_with_workers(tmp_path, tiny_models):
    images, labels = digits("mnist", 160)
    split = np.array(["train"] * 120 + ["test"] * 40)
    auth = write_folder(tmp_path / "mnist", images, labels, split)
    images, labels = digits("syn", 160)
    unauth = write_folder(tmp_path / "syn", images, labels, split)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["compile", str(tiny_models["plain"]["export"]), "--authorized", f"mnist={auth}",
                                  "--unauthorized", f"syn={unauth}", "--input-size", "16", "16", "--steps", "20",
                                  "--no-gates", "--workers", "2", "-o", str(out), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (out / "protected.onnx").exists()


class BrokenRows(ArrayRows):
    """Rows whose file turns out unreadable when a worker decodes it."""

    def take(self, idx):
        raise UserError("data/x.png: not a readable image (OSError: truncated); remove or fix it")


def test_a_file_broken_past_its_header_is_one_error_line_even_in_a_worker():
    from mapc.loader import StepError
    rows = BrokenRows(np.zeros((8, 3, 2, 2), np.float32))
    for workers in (0, 2):
        first = next(iter(step_loader([rows], [4], 2, np.random.default_rng(0), torch.device("cpu"), workers)))
        assert isinstance(first, StepError) and first.message.startswith("data/x.png")
        with pytest.raises(UserError, match="data/x.png"):
            first.raise_()


def test_npz_member_without_the_npy_suffix_still_loads(tmp_path):
    import io
    import zipfile
    images, labels = digits("mnist", 10)
    buf = io.BytesIO()
    np.save(buf, images)
    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as z:
        z.writestr("images", buf.getvalue())
    d = load_domain("odd", tmp_path / "odd.npz")
    assert np.array_equal(np.asarray(d.images), images)
