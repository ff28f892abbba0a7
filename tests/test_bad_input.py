"""Bad and hostile input, tried as a user or an attacker would: every case must end in one line on stderr,
exit code 2, no traceback, nothing written, and no trace of a malicious payload having run.

Each case builds its arguments in a fresh folder. Payloads are pickles whose unpickling creates a marker file;
``test_payloads_are_live`` proves they do run when loading is explicitly trusted, so their absence elsewhere
means something.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mapc.cli import main

MARKER = "pwned"


class Payload:
    """Unpickling this creates ``marker``: the proof that code from the file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def torch_saved_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(Payload(str(marker)), buf)
    return buf.getvalue()


def rewrite_zip(src: Path, dst: Path, edit) -> Path:
    """Copy a zip archive member by member through ``edit(members: dict[name, bytes], root: str)``."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    root = next(iter(members)).split("/", 1)[0]
    edit(members, root)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for n, data in members.items():
            z.writestr(n, data)
    return dst


def _pickled_weight(members, root, marker):
    import json
    cfg_name = f"{root}/data/weights/model_weights_config.json"
    cfg = json.loads(members[cfg_name])
    first = next(iter(cfg["config"]))
    cfg["config"][first]["use_pickle"] = True
    members[cfg_name] = json.dumps(cfg).encode()
    members[f"{root}/data/weights/{cfg['config'][first]['path_name']}"] = torch_saved_payload(marker)


def _opaque_constant(members, root, marker):
    import json
    cfg_name = f"{root}/data/constants/model_constants_config.json"
    cfg = json.loads(members[cfg_name])
    cfg["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False, "tensor_meta": None}
    members[cfg_name] = json.dumps(cfg).encode()
    members[f"{root}/data/constants/opaque_obj_0"] = pickle.dumps(Payload(str(marker)))


PT2_ATTACKS = {
    "pickled_weight": _pickled_weight,
    "sample_inputs": lambda m, r, marker: m.__setitem__(f"{r}/data/sample_inputs/model.pt", torch_saved_payload(marker)),
    "aoti_library": lambda m, r, marker: m.__setitem__(f"{r}/data/aotinductor/model/model.so", b"\x7fELF"),
    "opaque_constant": _opaque_constant,
    "legacy_weights": lambda m, r, marker: m.__setitem__(f"{r}/data/weights/model.pt", torch_saved_payload(marker)),
    "importing_treespec": lambda m, r, marker: _edit_program(m, r, b'"in_spec"', b'"default_factory_module": "os", "in_spec"'),
    "escaped_enum_key": lambda m, r, marker: _edit_program(m, r, b'"in_spec"', b'"\\u005f_enum__": 1, "in_spec"'),
    "file_reading_op": lambda m, r, marker: _edit_program(m, r, b'torch.ops.aten.conv2d.default',
                                                          b'torch.ops.aten.from_file.default'),
    "guard_code": lambda m, r, marker: _edit_program(
        m, r, b'"guards_code": []', b'"guards_code": ["__import__(\'os\').system(\'touch ' + str(marker).encode()
        + b'\')"]'),
}


def _edit_program(members, root, old: bytes, new: bytes) -> None:
    name = f"{root}/models/model.json"
    assert old in members[name], old
    members[name] = members[name].replace(old, new, 1)


def crafted_pt2(clean: Path, folder: Path, attack: str) -> Path:
    return rewrite_zip(clean, folder / f"{attack}.pt2", lambda m, r: PT2_ATTACKS[attack](m, r, folder / MARKER))


def torchscript_with_setstate(clean: Path, folder: Path) -> Path:
    def edit(members, root):
        code = next(n for n in members if "/code/" in n and n.endswith(".py"))
        members[code] += b"\n  def __setstate__(self, state: Tuple[Tensor]) -> None:\n    return None\n"
    return rewrite_zip(clean, folder / "setstate.torchscript.pt", edit)


def crafted_torchscript(clean: Path, folder: Path) -> Path:
    def edit(members, root):
        members[f"{root}/data.pkl"] = pickle.dumps(Payload(str(folder / MARKER)), protocol=2)
    return rewrite_zip(clean, folder / "evil.torchscript.pt", edit)


def old_layout_pt2(folder: Path) -> Path:
    p = folder / "old.pt2"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("version", "5.0")
        z.writestr("serialized_exported_program.json", "{}")
        z.writestr("serialized_state_dict.json", torch_saved_payload(folder / MARKER))
    return p


def write(path: Path, data) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def npz_header_bomb(path: Path) -> Path:
    """An .npz whose images.npy header claims 10^6 x 4096 x 4096 bytes and holds none of them."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                               "shape": (10 ** 6, 4096, 4096)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", np.lib.format.MAGIC_PREFIX + b"\x01\x00" + buf.getvalue())
    return path


def png_bomb(path: Path) -> Path:
    """A tiny PNG whose header claims 60000x60000 pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def image_folder(folder: Path, bad: str) -> Path:
    from PIL import Image
    (folder / "0").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "0" / "ok.png")
    if bad == "bomb":
        png_bomb(folder / "0" / "bomb.png")
    else:
        (folder / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return folder


def module_file(folder: Path, name: str, body: str) -> str:
    (folder / f"{name}.py").write_text(body)
    return f"{name}:build"


class Case:
    """Everything a case may need: a fresh folder, the tiny models, the small domains, an artifact."""

    def __init__(self, tmp: Path, models, domains, artifact):
        self.tmp, self.models, self.domains, self.artifact = tmp, models, domains, artifact
        self.out = tmp / "out"
        self.model = str(models["plain"]["export"])

    def data(self, extra=()):
        return ["--authorized", f"mnist={self.domains['mnist']}", "--unauthorized", f"syn={self.domains['syn']}",
                *extra]

    def compile(self, model=None, data=None, extra=()):
        return ["compile", model or self.model, *(self.data() if data is None else data), "--input-size", "16", "16",
                "--steps", "5", "-o", str(self.out), "-q", *extra]

    def config(self, text: str, extra=()):
        cfg = self.tmp / "c.toml"
        cfg.write_text(text)
        return ["compile", "--config", str(cfg), self.model, *self.data(), "--input-size", "16", "16",
                "-o", str(self.out), "-q", *extra]

    def verify(self, *args, artifact=None):
        return ["verify", str(artifact or self.artifact), *map(str, args)]

    def state_dict(self, tensors=None) -> str:
        p = self.tmp / "sd.pt"
        from tests.tiny_models import plain
        torch.save(tensors if tensors is not None else plain().state_dict(), p)
        return str(p)


def _nan_state_dict(c: Case):
    from tests.tiny_models import plain
    sd = plain().state_dict()
    sd["fc1.weight"][0, 0] = float("nan")
    return c.compile(c.state_dict(sd), extra=["--arch", "tests.tiny_models:plain"])


def _wrong_output_model(c: Case):
    spec = module_file(c.tmp, "flatout", "import torch\nclass M(torch.nn.Module):\n"
                       "    def __init__(self):\n        super().__init__(); self.l = torch.nn.Linear(3, 1)\n"
                       "    def forward(self, x):\n        return self.l(x.mean((2, 3))).squeeze(1)\n"
                       "def build():\n    return M()\n")
    sd = c.tmp / "flat.pt"
    torch.save(torch.nn.Linear(3, 1).state_dict(), sd)
    fixed = {f"l.{k}": v for k, v in torch.load(sd).items()}
    torch.save(fixed, sd)
    return c.compile(str(sd), extra=["--arch", spec])


def _unreadable_onnx_external(c: Case):
    import onnx
    from onnx import helper, numpy_helper
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.data_location = onnx.TensorProto.EXTERNAL
    del w.float_data[:]
    w.ClearField("raw_data")
    w.external_data.add(key="location", value="../../etc/passwd")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4])], [w])
    p = c.tmp / "escape.onnx"
    p.write_bytes(helper.make_model(g).SerializeToString())
    return c.verify("--unauthorized", f"syn={c.domains['syn']}", "--baseline", p, "--max-source-drop", "1",
                    "--authorized", f"mnist={c.domains['mnist']}")


def _malformed_metadata(c: Case):
    import onnx
    m = onnx.load(c.artifact)
    for p in m.metadata_props:
        if p.key == "mapc.preprocess":
            p.value = '{"size": "big", "channels": 3}'
    path = c.tmp / "meta.onnx"
    onnx.save(m, path)
    return c.verify("--unauthorized", f"syn={c.domains['syn']}", artifact=path)


def _split_all_train(c: Case):
    with np.load(c.domains["syn"]) as f:
        p = npz(c.tmp / "train_only.npz", images=f["images"], labels=f["labels"],
                split=np.array(["train"] * len(f["images"])))
    return c.compile(data=["--authorized", f"mnist={c.domains['mnist']}", "--unauthorized", f"syn={p}"])


def _foreign_outdir(c: Case):
    c.out.mkdir()
    (c.out / "thesis.tex").write_text("precious")
    return c.compile()


CASES = {
    # --- model files ---
    "model_missing": lambda c: c.compile(str(c.tmp / "nope.pt2")),
    "model_empty": lambda c: c.compile(str(write(c.tmp / "empty.pt2", b""))),
    "model_random_bytes": lambda c: c.compile(str(write(c.tmp / "r.pt", os.urandom(4096)))),
    "model_is_onnx": lambda c: c.compile(str(c.artifact)),
    "model_raw_pickle": lambda c: c.compile(str(write(c.tmp / "p.pt", pickle.dumps(Payload(str(c.tmp / MARKER)))))),
    "model_torch_save_pickle": lambda c: c.compile(str(write(c.tmp / "t.pt", torch_saved_payload(c.tmp / MARKER)))),
    **{f"pt2_{a}": (lambda a: lambda c: c.compile(str(crafted_pt2(Path(c.models["plain"]["export"]), c.tmp, a))))(a)
       for a in PT2_ATTACKS},
    "pt2_old_layout": lambda c: c.compile(str(old_layout_pt2(c.tmp))),
    "torchscript_python_pickle": lambda c: c.compile(str(crafted_torchscript(Path(c.models["plain"]["torchscript"]),
                                                                             c.tmp))),
    "torchscript_setstate": lambda c: c.compile(str(torchscript_with_setstate(Path(c.models["plain"]["torchscript"]),
                                                                              c.tmp))),
    "state_dict_without_arch": lambda c: c.compile(c.state_dict()),
    "arch_missing_module": lambda c: c.compile(c.state_dict(), extra=["--arch", "no_such_module:build"]),
    "arch_syntax_error": lambda c: c.compile(c.state_dict(), extra=["--arch", module_file(c.tmp, "broken_syntax",
                                                                                          "def build(:\n")]),
    "arch_import_raises": lambda c: c.compile(c.state_dict(), extra=["--arch", module_file(
        c.tmp, "raises_on_import", "raise RuntimeError('boom')\n")]),
    "arch_factory_raises": lambda c: c.compile(c.state_dict(), extra=["--arch", module_file(
        c.tmp, "factory_raises", "def build():\n    raise ValueError('no')\n")]),
    "arch_factory_not_module": lambda c: c.compile(c.state_dict(), extra=["--arch", module_file(
        c.tmp, "factory_int", "def build():\n    return 3\n")]),
    "arch_bad_spec": lambda c: c.compile(c.state_dict(), extra=["--arch", "nocolon"]),
    "state_dict_does_not_fit": lambda c: c.compile(c.state_dict(), extra=["--arch", "tests.tiny_models:residual"]),
    "state_dict_not_tensors": lambda c: c.compile(c.state_dict({"a": [1, 2]}), extra=["--arch", "tests.tiny_models:plain"]),
    "weights_nan": _nan_state_dict,
    "model_output_not_logits": _wrong_output_model,
    # --- data ---
    "data_missing": lambda c: c.compile(data=["--authorized", f"mnist={c.tmp / 'none.npz'}",
                                              "--unauthorized", f"syn={c.domains['syn']}"]),
    "data_float_images": lambda c: c.compile(data=c.data(["--unauthorized", f"f={npz(c.tmp / 'f.npz', images=np.zeros((4, 8, 8)))}"])),
    "data_no_images": lambda c: c.compile(data=c.data(["--unauthorized", f"f={npz(c.tmp / 'f.npz', labels=np.zeros(3, int))}"])),
    "data_2d_images": lambda c: c.compile(data=c.data(["--unauthorized", f"f={npz(c.tmp / 'f.npz', images=np.zeros((4, 8), np.uint8))}"])),
    "data_zero_size_images": lambda c: c.compile(data=c.data(["--unauthorized", f"f={npz(c.tmp / 'f.npz', images=np.zeros((4, 0, 0), np.uint8))}"])),
    "data_no_rows": lambda c: c.compile(data=c.data(["--unauthorized", f"f={npz(c.tmp / 'f.npz', images=np.zeros((0, 8, 8), np.uint8))}"])),
    "data_labels_out_of_range": lambda c: c.compile(data=c.data(["--unauthorized", f"f={npz(c.tmp / 'f.npz', images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0, 1, 10]))}"])),
    "data_labels_wrong_length": lambda c: c.compile(data=c.data(["--unauthorized", f"f={npz(c.tmp / 'f.npz', images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0, 1]))}"])),
    "data_labels_float": lambda c: c.compile(data=c.data(["--unauthorized", f"f={npz(c.tmp / 'f.npz', images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(3))}"])),
    "data_bad_split": lambda c: c.compile(data=c.data(["--unauthorized", f"f={npz(c.tmp / 'f.npz', images=np.zeros((3, 8, 8), np.uint8), split=np.array(['train', 'val', 'test']))}"])),
    "data_object_array_pickle": lambda c: c.compile(data=c.data(["--unauthorized", f"f={npz(c.tmp / 'f.npz', images=np.array([Payload(str(c.tmp / MARKER)), None], dtype=object))}"])),
    "data_random_bytes_npz": lambda c: c.compile(data=c.data(["--unauthorized", f"f={write(c.tmp / 'r.npz', os.urandom(512))}"])),
    "data_wrong_suffix": lambda c: c.compile(data=c.data(["--unauthorized", f"f={write(c.tmp / 'd.txt', 'x')}"])),
    "data_folder_without_classes": lambda c: c.compile(data=c.data(["--unauthorized", f"f={(c.tmp / 'empty').mkdir() or c.tmp / 'empty'}"])),
    "data_folder_corrupt_image": lambda c: c.compile(data=c.data(["--unauthorized", f"f={image_folder(c.tmp / 'imgs', 'corrupt')}"])),
    "data_folder_decompression_bomb": lambda c: c.compile(data=c.data(["--unauthorized", f"f={image_folder(c.tmp / 'imgs', 'bomb')}"])),
    "data_no_test_rows": _split_all_train,
    "data_npz_header_claims_terabytes": lambda c: c.compile(data=c.data(["--unauthorized", f"f={npz_header_bomb(c.tmp / 'b.npz')}"])),
    "data_duplicate_name": lambda c: c.compile(data=c.data(["--unauthorized", f"syn={c.domains['mnistm']}"])),
    "data_name_in_both_roles": lambda c: c.compile(data=c.data(["--unauthorized", f"mnist={c.domains['mnistm']}"])),
    "data_spec_without_name": lambda c: c.compile(data=["--authorized", str(c.domains["mnist"]),
                                                        "--unauthorized", f"syn={c.domains['syn']}"]),
    "data_two_authorized": lambda c: c.compile(data=c.data(["--authorized", f"other={c.domains['mnistm']}"])),
    # --- config file ---
    "config_missing": lambda c: ["compile", "--config", str(c.tmp / "none.toml"), "-o", str(c.out)],
    "config_not_toml": lambda c: c.config("model = \n"),
    "config_unknown_key": lambda c: c.config("modle = 'x.pt2'\n"),
    "config_trust_pickle_string": lambda c: c.config("trust_pickle = \"false\"\n"),
    "config_seed_string": lambda c: c.config("seed = \"abc\"\n"),
    "config_seed_bool": lambda c: c.config("seed = true\n"),
    "config_size_string": lambda c: c.config("[preprocess]\nsize = \"abc\"\n"),
    "config_mean_string": lambda c: c.config("[preprocess]\nmean = \"x\"\n"),
    "config_channels_float": lambda c: c.config("[preprocess]\nchannels = 3.5\n"),
    "config_steps_zero": lambda c: c.config("[mask]\nsteps = 0\n"),
    "config_steps_string": lambda c: c.config("[mask]\nsteps = \"many\"\n"),
    "config_val_rows_negative": lambda c: c.config("[mask]\nval_rows = -3\n"),
    "config_lr_nan": lambda c: c.config("[mask]\nlr = nan\n"),
    "config_granularity_unknown": lambda c: c.config("[mask]\ngranularity = \"bogus\"\n"),
    "config_tie_break_unknown": lambda c: c.config("[mask]\ntie_break = \"worst\"\n"),
    "config_tie_break_number": lambda c: c.config("[mask]\ntie_break = 1\n"),
    "config_feature_weight_negative": lambda c: c.config("[mask]\nfeature_weight = -1.0\n"),
    "config_feature_weight_without_batchnorm": lambda c: c.config("[mask]\nfeature_weight = 1.0\nsteps = 5\n"),
    "config_source_budget_nan": lambda c: c.config("[mask]\nsource_budget = nan\n"),
    "config_probe_weight_negative": lambda c: c.config("[mask]\nprobe_weight = -1.0\n"),
    "config_gate_200": lambda c: c.config("[gates]\nmax_target_acc = 200\n"),
    "config_gate_negative": lambda c: c.config("[gates]\nmax_source_drop = -5\n"),
    "config_gate_inf": lambda c: c.config("[gates]\nmax_target_acc = inf\n"),
    "config_table_not_table": lambda c: c.config("mask = 3\n"),
    "config_device_unknown": lambda c: c.config("device = \"tpu\"\n"),
    "config_mode_unknown": lambda c: c.config("mode = \"weird\"\n"),
    "config_skip_audit": lambda c: c.config("skip_passes = [\"audit\"]\n"),
    "config_synthesis_images_zero": lambda c: c.config("[synthesis]\nimages = 0\n"),
    "config_synthesis_generators_zero": lambda c: c.config("[synthesis]\ngenerators = 0\n"),
    "config_synthesis_generators_float": lambda c: c.config("[synthesis]\ngenerators = 1.5\n"),
    "config_synthesis_generators_string": lambda c: c.config("[synthesis]\ngenerators = \"two\"\n"),
    "config_synthesis_generators_pixels": lambda c: c.config("[synthesis]\nmethod = \"pixels\"\ngenerators = 2\n"),
    # --- command-line flags ---
    "flag_steps_zero": lambda c: c.compile(extra=["--steps", "0"]),
    "flag_std_nan": lambda c: c.compile(extra=["--std", "nan"]),
    "flag_std_zero": lambda c: c.compile(extra=["--std", "0"]),
    "flag_mean_not_numbers": lambda c: c.compile(extra=["--mean", "0.5,abc"]),
    "flag_skip_fold_masks": lambda c: c.compile(extra=["--skip-pass", "fold_masks"]),
    "flag_skip_fold_masks_and_audit": lambda c: c.compile(extra=["--skip-pass", "fold_masks", "--skip-pass", "audit"]),
    "flag_skip_audit": lambda c: c.compile(extra=["--skip-pass", "audit"]),
    "flag_skip_check": lambda c: c.compile(extra=["--skip-pass", "check"]),
    "flag_skip_seal": lambda c: c.compile(extra=["--skip-pass", "seal"]),
    "flag_skip_unknown": lambda c: c.compile(extra=["--skip-pass", "nope"]),
    "flag_gate_200": lambda c: c.compile(extra=["--max-target-acc", "200"]),
    "flag_gate_nan": lambda c: c.compile(extra=["--max-source-drop", "nan"]),
    "flag_keep_salient_1_5": lambda c: c.compile(extra=["--keep-salient", "1.5"]),
    "flag_seed_negative": lambda c: c.compile(extra=["--seed", "-1"]),
    "flag_input_size_zero": lambda c: c.compile(extra=["--input-size", "0", "16"]),
    # --- output folder ---
    "out_is_a_file": lambda c: c.compile(extra=["-o", str(write(c.tmp / "f", "x"))]),
    "out_holds_foreign_files": _foreign_outdir,
    # --- verify ---
    "verify_artifact_missing": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}", artifact=c.tmp / "n.onnx"),
    "verify_artifact_empty": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}",
                                                artifact=write(c.tmp / "e.onnx", b"")),
    "verify_artifact_garbage": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}",
                                                  artifact=write(c.tmp / "g.onnx", os.urandom(999))),
    "verify_artifact_is_pt2": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}",
                                                 artifact=c.models["plain"]["export"]),
    "verify_malformed_metadata": _malformed_metadata,
    "verify_data_does_not_fit_graph": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}",
                                                         "--input-size", "20", "20"),
    "verify_report_unwritable": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}", "--report",
                                                   (c.tmp / "dir").mkdir() or c.tmp / "dir"),
    "verify_baseline_empty": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}", "--max-target-acc", "50",
                                                "--baseline", write(c.tmp / "b.onnx", b"")),
    "verify_baseline_garbage": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}", "--baseline",
                                                  write(c.tmp / "b.onnx", os.urandom(777))),
    "verify_baseline_external_data_escapes": _unreadable_onnx_external,
    "verify_baseline_crafted_pt2": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}", "--baseline",
                                                      crafted_pt2(Path(c.models["plain"]["export"]), c.tmp, "sample_inputs")),
    "verify_gate_200": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}", "--max-target-acc", "200"),
    "verify_gate_negative": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}", "--min-target-drop", "-5"),
    "verify_duplicate_name": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}",
                                                "--unauthorized", f"syn={c.domains['mnistm']}"),
    "verify_unlabelled_data": lambda c: c.verify("--unauthorized", f"u={npz(c.tmp / 'u.npz', images=np.zeros((4, 8, 8), np.uint8))}"),
    "verify_no_data": lambda c: c.verify(),
    "verify_report_not_json": lambda c: c.verify("--unauthorized", f"syn={c.domains['syn']}", "--report",
                                                 c.tmp / "notes.md"),
    "verify_source_gate_without_baseline": lambda c: c.verify("--authorized", f"mnist={c.domains['mnist']}",
                                                              "--max-source-drop", "1"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path, tiny_models, small_domains, artifact,
                                                         monkeypatch):
    c = Case(tmp_path, tiny_models, small_domains, artifact)
    args = CASES[name](c)
    before = {p.name for p in tmp_path.iterdir()}
    monkeypatch.chdir(tmp_path)                      # --arch modules written by a case are importable from here
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mapc: error:"), err
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / MARKER).exists(), "a payload ran"
    after = {p.name for p in tmp_path.iterdir()} - {"__pycache__"}
    assert after <= before | {"out"} and (not c.out.exists() or name == "out_holds_foreign_files"), sorted(after - before)
    if name == "out_holds_foreign_files":
        assert sorted(p.name for p in c.out.iterdir()) == ["thesis.tex"]


def test_enough_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("attack", ["sample_inputs", "pickled_weight", "legacy_weights"])
def test_payloads_are_live(tmp_path, tiny_models, attack):
    """The crafted archives do run code when the user explicitly trusts them: the battery tests something."""
    from mapc.models import load_model
    p = crafted_pt2(Path(tiny_models["plain"]["export"]), tmp_path, attack)
    if attack == "legacy_weights":   # torch reads a legacy weights file only when it is the archive's weights
        with torch.serialization.safe_globals([]):
            torch.load(io.BytesIO(zipfile.ZipFile(p).read(next(n for n in zipfile.ZipFile(p).namelist()
                                                                 if n.endswith("weights/model.pt")))),
                       weights_only=False)
    else:
        try:
            load_model(p, trust_pickle=True)
        except Exception:   # the payload may break loading after it ran; what matters is that it ran
            pass
    assert (tmp_path / MARKER).exists()


def test_restricted_load_alone_stops_a_payload(tmp_path, tiny_models, monkeypatch):
    """Defence in depth: with the archive inspection switched off, torch.export.load still cannot unpickle."""
    import mapc.archive_check as ac
    from mapc.errors import UserError
    from mapc.models import load_model
    monkeypatch.setattr(ac, "check_pt2", lambda path: None)
    p = crafted_pt2(Path(tiny_models["plain"]["export"]), tmp_path, "sample_inputs")
    with pytest.raises(UserError):
        load_model(p)
    assert not (tmp_path / MARKER).exists()


def test_clean_archive_round_trips_through_the_rewriter(tmp_path, tiny_models):
    from mapc.models import load_model
    p = rewrite_zip(Path(tiny_models["plain"]["export"]), tmp_path / "same.pt2", lambda m, r: None)
    assert load_model(p).format == "export"


def test_config_bool_true_is_accepted_and_typed(tmp_path):
    from mapc.config import load_config
    cfg = tmp_path / "c.toml"
    cfg.write_text("trust_pickle = false\nseed = 3\n[preprocess]\nsize = 16\nmean = 0.5\n[mask]\nlr = 1\n")
    c = load_config(cfg)
    assert c.trust_pickle is False and c.seed == 3 and c.preprocess.size == (16, 16)
    assert c.preprocess.mean == (0.5, 0.5, 0.5) and isinstance(c.mask.lr, float)


def test_provider_cuda_without_cuda_is_an_error(artifact, small_domains):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            from mapc.evaluate import session
            if "CUDAExecutionProvider" in session(str(artifact), "auto").get_providers():
                pytest.skip("CUDA really runs here")
        except Exception:
            pass
    r = CliRunner().invoke(main, ["verify", str(artifact), "--unauthorized", f"syn={small_domains['syn']}",
                                  "--provider", "cuda"])
    assert r.exit_code == 2 and r.stderr.startswith("mapc: error:") and "CUDA" in r.stderr, r.stderr
