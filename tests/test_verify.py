"""`mapc verify`: exit codes, the documented report schema, single-file HTML, gates that must fail."""
from __future__ import annotations

import base64
import html.parser
import json

import jsonschema
from click.testing import CliRunner

from mapc.cli import main
from tests.conftest import ROOT

SCHEMA = json.loads((ROOT / "mapc" / "report.schema.json").read_text())


def verify(*args):
    return CliRunner().invoke(main, ["verify", *map(str, args)], catch_exceptions=False)


def test_passing_gates_exit_0_and_report_follows_schema(tmp_path, artifact, tiny_models, small_domains):
    rep = tmp_path / "v" / "report.json"
    r = verify(artifact, "--authorized", f"mnist={small_domains['mnist']}", "--unauthorized",
               f"syn={small_domains['syn']}", "--baseline", tiny_models["plain"]["export"],
               "--max-source-drop", "99", "--max-target-acc", "99", "--report", rep)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1].startswith("PASSED | ")
    report = json.loads(rep.read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["providers"] == ["CPUExecutionProvider"]
    assert report["baseline"]["format"] == "export" and report["domains"]["mnist"]["n"] == 128
    assert report["compile"]["passes"][0]["name"] == "fold_masks"   # the compile report beside the artifact
    assert (tmp_path / "v" / "report.md").read_text().startswith("# mapc verify report")


def test_unprotected_original_fails_a_max_target_acc_gate(tmp_path, tiny_models, small_domains):
    """A gate that must fail does fail: the sample's original model is far above 20 % on syn."""
    from mapc.export import export_onnx
    from mapc.models import load_model
    import passes
    m = load_model(ROOT / "samples/models/digits_cnn.pt2")
    model, _ = export_onnx(m.module, m.format, (3, 32, 32))
    model, _ = passes.run_pipeline(model, [passes.Seal({"preprocess": {"size": [32, 32], "channels": 3,
                                                                       "mean": [0.5] * 3, "std": [0.5] * 3}})])
    original = tmp_path / "original.onnx"
    original.write_bytes(model.SerializeToString())
    r = verify(original, "--unauthorized", f"syn={small_domains['syn']}", "--max-target-acc", "20")
    assert r.exit_code == 1
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED | max_target_acc[syn]=")


def test_bad_input_exits_2(tmp_path, artifact, small_domains):
    cases = [
        [tmp_path / "none.onnx", "--unauthorized", f"syn={small_domains['syn']}"],
        [artifact],                                                     # no data at all
        [artifact, "--unauthorized", f"syn={small_domains['syn']}", "--max-source-drop", "1"],  # needs --baseline
        [artifact, "--unauthorized", f"syn={tmp_path / 'missing.npz'}"],
    ]
    for args in cases:
        r = verify(*args)
        assert r.exit_code == 2, (args, r.output)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("mapc: error:")


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.external = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if tag in ("link", "script") and (a.get("href") or a.get("src")):
            self.external.append(a)


def test_html_report_is_one_file_with_embedded_images(tmp_path, artifact, small_domains):
    rep = tmp_path / "report.json"
    r = verify(artifact, "--authorized", f"mnist={small_domains['mnist']}", "--unauthorized",
               f"syn={small_domains['syn']}", "--report", rep)
    assert r.exit_code == 0
    p = _Collect()
    p.feed((tmp_path / "report.html").read_text())
    assert len(p.srcs) >= 3 and not p.external
    for src in p.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_writes_the_same_human_reports(artifact):
    folder = artifact.parent
    assert (folder / "report.md").exists() and "data:image/png;base64," in (folder / "report.html").read_text()


def test_a_gate_with_nothing_to_measure_fails_closed(tmp_path, artifact, small_domains):
    """--max-target-acc with only authorized data: the gate is recorded as not measured and fails."""
    rep = tmp_path / "v" / "report.json"
    r = verify(artifact, "--authorized", f"mnist={small_domains['mnist']}", "--max-target-acc", "99",
               "--report", rep)
    assert r.exit_code == 1, r.output
    assert "max_target_acc[-]=not measured" in r.stdout.strip().splitlines()[-1]
    report = json.loads(rep.read_text())
    jsonschema.validate(report, SCHEMA)
    gate = report["gates"][0]
    assert gate["value"] is None and gate["passed"] is False and "--unauthorized" in gate["not_measured"]
    assert "not measured" in (tmp_path / "v" / "report.md").read_text()


def test_probe_is_reported_and_gated_and_fails_closed_without_a_split(tmp_path, artifact, small_domains):
    import numpy as np
    r = verify(artifact, "--unauthorized", f"syn={small_domains['syn']}", "--max-probe-acc", "99", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout.splitlines()[0])
    probe = report["domains"]["syn"]["probe"]
    assert set(probe["protected"]) == {"1%", "10%"} and probe["k"]["10%"] == 25   # 10 % of 256 train rows
    assert [g["gate"] for g in report["gates"]] == ["max_probe_acc"] and report["gates"][0]["value"] is not None
    with np.load(small_domains["syn"]) as f:                       # no split: train rows = test rows, no probe
        np.savez(tmp_path / "nosplit.npz", images=f["images"], labels=f["labels"])
    r = verify(artifact, "--unauthorized", f"syn={tmp_path / 'nosplit.npz'}", "--max-probe-acc", "99")
    assert r.exit_code == 1
    assert r.stdout.strip().splitlines()[-1].startswith("FAILED | max_probe_acc[syn]=not measured")
