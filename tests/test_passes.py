"""Each pass on tiny graphs written in ONNX text, checked numerically in onnxruntime.

Tolerances are explicit: fp32 rtol 1e-5, atol 1e-6 for passes that keep the
function; passes that change it on purpose (fold_masks) are compared with a
numpy reference of the intended function.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper, parser

import passes
from passes import (Audit, Check, FoldBatchNorm, FoldConstants, FoldMasks, PassError, Seal, StripDebugInfo,
                    read_metadata, run_pipeline)

RTOL, ATOL = 1e-5, 1e-6
rng = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Every test draws its data from a generator seeded afresh: results do not depend on test order."""
    global rng
    rng = np.random.default_rng(0)


def make(text: str, **inits: np.ndarray) -> onnx.ModelProto:
    model = parser.parse_model(text)
    for name, value in inits.items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def inits(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

GEMM = HEADER + """
g (float[N, 4] x) => (float[N, 3] y) {
    h = Gemm <transB = 1> (x, fc1_weight, fc1_bias)
    r = Relu (h)
    y = Gemm <transB = 1> (r, fc2_weight, fc2_bias)
}"""


def gemm_model():
    return make(GEMM, **{"fc1_weight": rng.standard_normal((5, 4)).astype(np.float32),
                         "fc1_bias": rng.standard_normal(5).astype(np.float32),
                         "fc2_weight": rng.standard_normal((3, 5)).astype(np.float32),
                         "fc2_bias": rng.standard_normal(3).astype(np.float32)})


def test_fold_masks_by_name_zeroes_exactly_and_matches_reference():
    m = gemm_model()
    w = inits(m)
    mask = (rng.random((5, 4)) > 0.5).astype(np.uint8)
    out = FoldMasks({"fc1_weight": mask}, {"fc1_weight": w["fc1_weight"]})(m)
    got = inits(out.model)["fc1_weight"]
    assert got.dtype == np.float32
    assert np.all(got[mask == 0] == 0) and not np.signbit(got[mask == 0]).any()
    np.testing.assert_array_equal(got[mask == 1], w["fc1_weight"][mask == 1])
    x = rng.standard_normal((7, 4)).astype(np.float32)
    h = np.maximum(x @ (w["fc1_weight"] * mask).T + w["fc1_bias"], 0)
    ref = h @ w["fc2_weight"].T + w["fc2_bias"]
    np.testing.assert_allclose(run(out.model, x=x)[0], ref, rtol=RTOL, atol=ATOL)
    assert len(out.model.graph.node) == 3 and len(out.model.graph.initializer) == 4  # no Mul, no mask tensor


MATMUL = HEADER + """
g (float[N, 4] x) => (float[N, 5] y, float[N, 5] z) {
    y = MatMul (x, onnx__MatMul_7)
    z = MatMul (x, onnx__MatMul_7)
}"""


def test_fold_masks_finds_renamed_transposed_shared_weight_by_value():
    w = rng.standard_normal((5, 4)).astype(np.float32)          # torch Linear weight [out, in]
    m = make(MATMUL, onnx__MatMul_7=np.ascontiguousarray(w.T))   # exporter stored W^T under another name
    mask = (rng.random((5, 4)) > 0.3).astype(np.uint8)
    res = FoldMasks({"lin.weight": mask}, {"lin.weight": w})(m)
    assert res.details["masks"]["lin.weight"]["transposed"] == [True]
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y, z = run(res.model, x=x)
    np.testing.assert_allclose(y, x @ (w * mask).T, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(y, z)  # the shared weight is masked once, for both users


def test_fold_masks_preserves_fp16_dtype():
    w = rng.standard_normal((5, 4)).astype(np.float16)
    m = make(HEADER + "g (float16[N, 4] x) => (float16[N, 5] y) { y = Gemm <transB = 1> (x, fc_weight) }",
             **{"fc_weight": w})
    mask = np.zeros((5, 4), np.uint8)
    mask[:, :2] = 1
    got = inits(FoldMasks({"fc_weight": mask})(m).model)["fc_weight"]
    assert got.dtype == np.float16 and np.all(got[:, 2:] == 0)


def test_fold_masks_refuses_unknown_weight_and_non_binary_mask():
    m = gemm_model()
    with pytest.raises(PassError, match="no initializer holds"):
        FoldMasks({"other.weight": np.ones((5, 4), np.uint8)})(m)
    with pytest.raises(PassError, match="not binary"):
        FoldMasks({"fc1_weight": np.full((5, 4), 2, np.uint8)})(m)


CONV_BN = HEADER + """
g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, conv_weight, conv_bias)
    y = BatchNormalization <epsilon = 0.001> (c, bn_weight, bn_bias, bn_mean, bn_var)
}"""


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_is_equivalent(bias):
    text = CONV_BN if bias else CONV_BN.replace("(x, conv_weight, conv_bias)", "(x, conv_weight)")
    arrays = {"conv_weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
              "bn_weight": rng.uniform(0.5, 2, 4).astype(np.float32), "bn_bias": rng.standard_normal(4).astype(np.float32),
              "bn_mean": rng.standard_normal(4).astype(np.float32), "bn_var": rng.uniform(0.5, 2, 4).astype(np.float32)}
    arrays["conv_weight"][0, 0] = 0.0
    if bias:
        arrays["conv_bias"] = rng.standard_normal(4).astype(np.float32)
    m = make(text, **arrays)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    before = run(m, x=x)[0]
    res = FoldBatchNorm()(m)
    assert res.changed and [n.op_type for n in res.model.graph.node] == ["Conv"]
    np.testing.assert_allclose(run(res.model, x=x)[0], before, rtol=RTOL, atol=ATOL)
    w = inits(res.model)["conv_weight"]
    assert np.all(w[0, 0] == 0) and not np.signbit(w[0, 0]).any()  # masked zeros stay +0.0


def test_fold_batchnorm_skips_conv_with_two_consumers():
    text = CONV_BN.replace("=> (float[N, 4, 6, 6] y)", "=> (float[N, 4, 6, 6] y, float[N, 4, 6, 6] c)")
    arrays = {"conv_weight": np.ones((4, 3, 3, 3), np.float32), "conv_bias": np.zeros(4, np.float32),
              "bn_weight": np.ones(4, np.float32), "bn_bias": np.zeros(4, np.float32),
              "bn_mean": np.zeros(4, np.float32), "bn_var": np.ones(4, np.float32)}
    assert not FoldBatchNorm()(make(text, **arrays)).changed


def test_fold_constants_turns_expand_scaffolding_into_initializers():
    text = HEADER + """
g (float[N, 2, 4, 4] x) => (float[N, 3, 4, 4] y) {
    s = Shape (w)
    n = Slice (s, zero, one)
    z = Constant <value = float {0.0}> ()
    b = Expand (z, n)
    y = Conv (x, w, b)
}"""
    m = make(text, w=rng.standard_normal((3, 2, 1, 1)).astype(np.float32), zero=np.array([0], np.int64),
             one=np.array([1], np.int64))
    x = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    res = FoldConstants()(m)
    assert [n.op_type for n in res.model.graph.node] == ["Conv"]
    assert "w" in inits(res.model)
    np.testing.assert_allclose(run(res.model, x=x)[0], run(m, x=x)[0], rtol=RTOL, atol=ATOL)


def test_strip_debug_info_removes_paths_and_metadata():
    m = gemm_model()
    m.doc_string = "built on /home/alice/project"
    m.graph.node[0].doc_string = 'File "/home/alice/train.py", line 3'
    m.graph.node[0].metadata_props.append(onnx.StringStringEntryProto(key="pkg.torch.onnx.stack_trace",
                                                                     value="/root/x.py:1"))
    m.metadata_props.append(onnx.StringStringEntryProto(key="source", value="/tmp/build"))
    x = rng.standard_normal((2, 4)).astype(np.float32)
    before = run(m, x=x)[0]
    original = m.SerializeToString()
    res = StripDebugInfo()(gemm_model_from(m))
    text = res.model.SerializeToString()
    assert b"/home/alice" in original and b"/root/" in original and b"/tmp/build" in original
    assert b"/home/alice" not in text and b"/root/" not in text and b"/tmp/build" not in text
    assert res.changed and len(res.model.graph.node) == len(m.graph.node)
    np.testing.assert_array_equal(run(res.model, x=x)[0], before)


def gemm_model_from(m):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def test_seal_writes_metadata_and_digests_only():
    m = gemm_model()
    meta = {"version": "0.1.0", "mode": "source-available", "preprocess": {"size": [32, 32]},
            "mask_sha256": passes.digest_arrays({"a": np.ones(3, np.uint8)})}
    res = Seal(meta)(m)
    got = read_metadata(res.model)
    assert got["mapc.mode"] == "source-available" and got["mapc.preprocess"] == {"size": [32, 32]}
    assert len(got["mapc.mask_sha256"]) == 64


def test_audit_catches_unmasked_weight_mask_tensor_and_leaks():
    m = gemm_model()
    w = inits(m)["fc1_weight"]
    mask = np.ones((5, 4), np.uint8)
    mask[0] = 0
    with pytest.raises(PassError, match="audit"):
        Audit({"fc1_weight": mask}, {"fc1_weight": w}, require_seal=False)(m)            # mask never folded
    folded = FoldMasks({"fc1_weight": mask}, {"fc1_weight": w})(gemm_model_from(m)).model
    Audit({"fc1_weight": mask}, {"fc1_weight": w}, require_seal=False)(folded)           # passes
    leaked = gemm_model_from(folded)
    leaked.graph.initializer.append(numpy_helper.from_array(w, "backup"))
    with pytest.raises(PassError, match="equals the unmasked original"):
        Audit({"fc1_weight": mask}, {"fc1_weight": w}, require_seal=False)(leaked)
    masked_copy = gemm_model_from(folded)
    masked_copy.graph.initializer.append(numpy_helper.from_array(mask.astype(np.float32), "fc1_weight_mask"))
    with pytest.raises(PassError, match="mask-like tensors"):
        Audit({"fc1_weight": mask}, {"fc1_weight": w}, require_seal=False)(masked_copy)
    pathy = gemm_model_from(folded)
    pathy.graph.node[0].doc_string = 'Traceback (most recent call last): File "/home/u/x.py"'
    with pytest.raises(PassError, match="leaks"):
        Audit({"fc1_weight": mask}, {"fc1_weight": w}, require_seal=False)(pathy)


def test_check_rejects_broken_graph():
    m = gemm_model()
    m.graph.node[1].input[0] = "missing"
    with pytest.raises(PassError, match="check"):
        Check()(m)


def test_run_pipeline_records_and_skips_and_leaves_input_untouched():
    m = gemm_model()
    before = m.SerializeToString()
    w = inits(m)
    mask = np.ones((5, 4), np.uint8)
    mask[:, 0] = 0
    pipeline = passes.default_pipeline({"fc1_weight": mask}, {"fc1_weight": w["fc1_weight"]}, {"mode": "test"})
    out, records = run_pipeline(m, pipeline)
    assert m.SerializeToString() == before
    assert [r.name for r in records] == passes.DEFAULT_ORDER
    fm = records[0]
    assert fm.changed and fm.nodes_before == fm.nodes_after and fm.seconds > 0
    assert fm.initializer_bytes_before == fm.initializer_bytes_after == sum(a.nbytes for a in w.values())
    _, skipped = run_pipeline(m, pipeline, skip=["strip_debug_info"])
    assert "strip_debug_info" not in [r.name for r in skipped] and len(skipped) == len(records) - 1
    with pytest.raises(ValueError, match="cannot skip"):
        run_pipeline(m, pipeline, skip=["nope"])


@pytest.mark.parametrize("name", sorted(passes.MANDATORY))
def test_mandatory_passes_cannot_be_skipped(name):
    m = gemm_model()
    mask = np.ones((5, 4), np.uint8)
    mask[:, 0] = 0
    pipeline = passes.default_pipeline({"fc1_weight": mask}, {"fc1_weight": inits(m)["fc1_weight"]}, {"mode": "test"})
    with pytest.raises(ValueError, match=f"cannot skip \\['{name}'\\]"):
        run_pipeline(m, pipeline, skip=[name])


def test_artifact_checks_catch_weights_edited_after_sealing():
    m = gemm_model()
    w = inits(m)
    mask = np.ones((5, 4), np.uint8)
    mask[:, 0] = 0
    out, _ = run_pipeline(m, passes.default_pipeline({"fc1_weight": mask}, {"fc1_weight": w["fc1_weight"]},
                                                     {"mode": "test", "version": "0"}))
    assert all(c["passed"] for c in passes.artifact_checks(out))
    for t in out.graph.initializer:   # restore the unmasked weight in place, as a tamperer would
        if t.name == "fc1_weight":
            t.CopyFrom(numpy_helper.from_array(w["fc1_weight"], "fc1_weight"))
    failed = {c["check"] for c in passes.artifact_checks(out) if not c["passed"]}
    assert "zero_pattern" in failed
    with pytest.raises(passes.PassError, match="zero_pattern"):
        passes.Audit({"fc1_weight": mask}, {"fc1_weight": w["fc1_weight"]})(out)


from passes import StripDeadChannels  # noqa: E402

CONV_CHAIN = HEADER + """
g (float[N, 2, 8, 8] x) => (float[N, 5] y) {
    a = Conv <pads = [PADS]> (x, c1_weight, c1_bias)
    r = Relu (a)
    p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
    b = Conv <pads = [PADS2]> (p, c2_weight, c2_bias)
    r2 = Relu (b)
    f = Flatten <axis = 1> (r2)
    y = Gemm <transB = 1> (f, fc_weight, fc_bias)
}"""


def chain_model(pads, pads2, dead1, dead2, bias_sign=1.0):
    size2 = 4 if pads2 == "1, 1, 1, 1" else 2
    w1 = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    w1[dead1] = 0
    w2 = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    w2[dead2] = 0
    text = CONV_CHAIN.replace("[PADS]", f"[{pads}]").replace("[PADS2]", f"[{pads2}]")
    return make(text, c1_weight=w1, c1_bias=(bias_sign * np.abs(rng.standard_normal(4))).astype(np.float32),
                c2_weight=w2, c2_bias=rng.standard_normal(3).astype(np.float32),
                fc_weight=rng.standard_normal((5, 3 * size2 * size2)).astype(np.float32),
                fc_bias=rng.standard_normal(5).astype(np.float32))


@pytest.mark.parametrize("pads2,bias_sign,expect_c1", [
    ("0, 0, 0, 0", 1.0, 2),    # unpadded consumer absorbs the dead channels' non-zero constants
    ("1, 1, 1, 1", 1.0, 0),    # padded consumer: non-zero constants cannot be absorbed, channels kept
    ("1, 1, 1, 1", -1.0, 2),   # relu(negative bias) = 0: removable even before a padded Conv
])
def test_strip_dead_channels_is_equivalent(pads2, bias_sign, expect_c1):
    m = chain_model("1, 1, 1, 1", pads2, dead1=[1, 3], dead2=[2], bias_sign=bias_sign)
    x = rng.standard_normal((3, 2, 8, 8)).astype(np.float32)
    before = run(m, x=x)[0]
    fc_width = inits(m)["fc_weight"].shape[1]
    res = StripDeadChannels(align=1)(m)
    arrays = inits(res.model)
    assert arrays["c1_weight"].shape[0] == 4 - expect_c1
    assert arrays["c2_weight"].shape == (2, 4 - expect_c1, 3, 3)   # dead channel 2 of c2 stripped too
    assert arrays["fc_weight"].shape[1] == fc_width // 3 * 2   # c2 keeps 2 of its 3 channels
    np.testing.assert_allclose(run(res.model, x=x)[0], before, rtol=RTOL, atol=1e-5)
    Check()(res.model)


def test_strip_dead_channels_keeps_channels_that_reach_a_residual_add():
    text = HEADER + """
g (float[N, 2, 4, 4] x) => (float[N, 2, 4, 4] y) {
    a = Conv (x, c_weight, c_bias)
    y = Add (a, x)
}"""
    w = rng.standard_normal((2, 2, 1, 1)).astype(np.float32)
    w[0] = 0
    m = make(text, c_weight=w, c_bias=np.ones(2, np.float32))
    assert not StripDeadChannels()(m).changed


def test_strip_dead_channels_then_audit_accepts_shrunk_weights():
    m = chain_model("1, 1, 1, 1", "0, 0, 0, 0", dead1=[], dead2=[])
    w = inits(m)
    mask1 = np.ones((4, 2, 3, 3), np.uint8)
    mask1[[0, 2]] = 0
    masks = {"c1_weight": mask1}
    originals = {"c1_weight": w["c1_weight"]}
    out, records = run_pipeline(m, [FoldMasks(masks, originals), StripDeadChannels(align=1),
                                    Audit(masks, originals, require_seal=False),
                                    Check()])
    assert records[1].changed and records[1].initializer_bytes_after < records[1].initializer_bytes_before
    assert inits(out)["c1_weight"].shape[0] == 2


def test_save_model_uses_external_data_past_the_threshold(tmp_path):
    m = make(HEADER + "g (float[N, 64] x) => (float[N, 32] y) { y = Gemm <transB = 1> (x, w) }",
             w=rng.standard_normal((32, 64)).astype(np.float32))
    small = passes.save_model(m, tmp_path / "a.onnx")
    assert [p.name for p in small] == ["a.onnx"]
    files = passes.save_model(m, tmp_path / "b.onnx", external_threshold=64)
    assert [p.name for p in files] == ["b.onnx", "b.onnx.data"]
    assert (tmp_path / "b.onnx").stat().st_size < m.ByteSize()
    x = rng.standard_normal((2, 64)).astype(np.float32)
    s = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(s.run(None, {"x": x})[0], run(m, x=x)[0])


def test_strip_dead_channels_keeps_channel_counts_aligned():
    m = chain_model("1, 1, 1, 1", "0, 0, 0, 0", dead1=[1, 3], dead2=[])
    assert not StripDeadChannels(align=4)(gemm_model_from(m)).changed       # 4 -> 2 would break alignment
    assert inits(StripDeadChannels(align=2)(gemm_model_from(m)).model)["c1_weight"].shape[0] == 2
