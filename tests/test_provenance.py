"""Weight provenance: a copy (scaled, fine-tuned, transposed) is DERIVED; an independent model is not."""
from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import helper, numpy_helper

from mapc.cli import main
from mapc.provenance import correlation, log10_normal_tail, weight_provenance


def graph_of(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    return helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                               [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
                                               initializer=inits))


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv": rng.standard_normal((16, 8, 3, 3)), "fc": rng.standard_normal((10, 64))}


def test_a_copy_is_derived_and_an_independent_model_is_not():
    ref = weights(0)
    same = weight_provenance(graph_of(ref), graph_of(ref))
    assert same["derived"] and same["matched"] == 2 and same["effect"] > 0.999
    rng = np.random.default_rng(1)
    tuned = {n: w * rng.uniform(0.5, 2.0, (w.shape[0],) + (1,) * (w.ndim - 1)) + 0.3 * rng.standard_normal(w.shape)
             for n, w in ref.items()}                       # per-channel rescaled (folded BatchNorm) and moved
    assert weight_provenance(graph_of(tuned), graph_of(ref))["derived"]
    other = weight_provenance(graph_of(weights(7)), graph_of(ref))
    assert not other["derived"] and abs(other["effect"]) < 0.1 and other["log10_p"] > -3


def test_transposed_and_renamed_tensors_are_found_and_unmatched_shapes_are_not_evidence():
    ref = weights(0)
    moved = {"a": ref["conv"], "b": ref["fc"].T.copy()}
    assert weight_provenance(graph_of(moved), graph_of(ref))["matched"] == 2
    none = weight_provenance(graph_of({"z": np.ones((3, 50))}), graph_of(ref))
    assert not none["derived"] and none["matched"] == 0 and none["p_value"] == 1.0


def test_correlation_ignores_per_row_scale_and_tail_is_finite_far_out():
    a = np.random.default_rng(0).standard_normal((4, 30))
    assert abs(correlation(a, a * np.array([[1.0], [3.0], [0.2], [7.0]])) - 1.0) < 1e-12
    assert log10_normal_tail(0.0) == np.log10(0.5) and log10_normal_tail(1e4) < -1e7


def test_verify_ownership_with_a_reference_and_its_bad_input(tmp_path, tiny_models, small_domains):
    out = tmp_path / "build"
    key = tmp_path / "owner.key"
    r = CliRunner().invoke(main, ["compile", str(tiny_models["plain"]["export"]), "--authorized",
                                  f"mnist={small_domains['mnist']}", "--unauthorized", f"syn={small_domains['syn']}",
                                  "--input-size", "16", "16", "--steps", "20", "--no-gates", "--watermark", str(key),
                                  "-o", str(out), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    base = ["verify", "--ownership", str(key), "--authorized", f"mnist={small_domains['mnist']}"]
    r = CliRunner().invoke(main, [*base[:1], str(tiny_models["residual"]["export"]), *base[1:], "--input-size", "16",
                                  "16", "--reference", str(out / "protected.onnx"), "--json"])
    assert r.exit_code == 1, r.output                       # another architecture: nothing matches, not derived
    report = json.loads(r.output.splitlines()[0])
    assert report["provenance"]["derived"] is False and report["owned"] is False
    r = CliRunner().invoke(main, [*base[:1], str(tiny_models["plain"]["export"]), *base[1:], "--input-size", "16",
                                  "16", "--reference", str(out / "protected.onnx")])
    assert r.exit_code == 0 and r.output.splitlines()[-1].startswith("OWNED | p=") and "DERIVED" in r.output, r.output
    r = CliRunner().invoke(main, ["verify", str(out / "protected.onnx"), "--authorized",
                                  f"mnist={small_domains['mnist']}", "--reference", str(out / "protected.onnx")])
    assert r.exit_code == 2 and "--ownership" in r.output
    r = CliRunner().invoke(main, [*base[:1], str(out / "protected.onnx"), *base[1:], "--reference",
                                  str(tmp_path / "missing.onnx")])
    assert r.exit_code == 2 and "missing.onnx" in r.output and "Traceback" not in r.output
