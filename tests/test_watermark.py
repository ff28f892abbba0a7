"""Ownership watermark: the trigger, the test statistic, the key file, compile --watermark, verify --ownership,
attack --ownership."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from click.testing import CliRunner

from mapc.cli import main
from mapc.errors import UserError
from mapc.watermark import (AMPLITUDE, KEY_BYTES, load_or_create_key, log10_binomial_tail, ownership_test, p_text,
                            stamp, trigger)


def test_trigger_is_a_pure_function_of_key_and_shape():
    k1, k2 = b"a" * KEY_BYTES, b"b" * KEY_BYTES
    t = trigger(k1, (3, 32, 32))
    assert t.shape == (3, 32, 32) and t.dtype == np.float32
    assert np.array_equal(t, trigger(k1, (3, 32, 32)))
    assert not np.array_equal(t, trigger(k2, (3, 32, 32)))
    assert not np.array_equal(trigger(k1, (1, 32, 32))[0], t[0])
    assert set(np.unique(np.round(t / AMPLITUDE).astype(int))) <= {-1, 0, 1}
    assert 0.4 < np.mean(t != 0) < 0.9


def test_stamp_adds_the_offsets_in_pixel_space_and_clips():
    delta = np.full((1, 2, 2), 0.5, np.float32)
    x = np.array([[[[-1.0, 0.0], [0.8, 1.0]]]], np.float32)        # normalised with mean 0.5, std 0.5
    out = stamp(x, delta, (0.5,), (0.5,))
    assert np.allclose(out, [[[[0.0, 1.0], [1.0, 1.0]]]])


@pytest.mark.parametrize("key_right,control_right,owned,log10_p", [
    ([False] * 100, [True] * 100, True, -100 * math.log10(2)),     # b = 100, c = 0
    ([True, False] * 50, [False, True] * 50, False, None),        # b = c = 50: no evidence
    ([True] * 100, [True] * 100, False, 0.0),                     # no discordant rows
    ([False] * 3 + [True] * 97, [True] * 100, False, math.log10(1 / 8)),   # b = 3, c = 0: p = 1/8
    ([False] * 30 + [True] * 970, [True] * 1000, False, -30 * math.log10(2)),  # significant, but a 3 % effect
])
def test_ownership_statistic_on_constructed_outcome_tables(key_right, control_right, owned, log10_p):
    r = ownership_test(np.array(key_right), np.array(control_right))
    assert r["owned"] is owned
    assert r["effect"] == pytest.approx(1 - np.mean(key_right) / np.mean(control_right))
    if log10_p is not None:
        assert r["log10_p"] == pytest.approx(log10_p, abs=1e-9)
    else:
        assert 10 ** r["log10_p"] > 0.4


def test_binomial_tail_and_p_text():
    assert log10_binomial_tail(0, 10) == 0.0
    assert 10 ** log10_binomial_tail(10, 10) == pytest.approx(2 ** -10)
    assert 10 ** log10_binomial_tail(6, 10) == pytest.approx(sum(math.comb(10, i) for i in range(6, 11)) / 1024)
    assert p_text(-2.0) == "1.00e-02" and p_text(-500.5).endswith("e-501")


def test_key_file_is_created_private_and_checked(tmp_path):
    key, created = load_or_create_key(tmp_path / "k")
    assert created and len(key) == KEY_BYTES and os.stat(tmp_path / "k").st_mode & 0o777 == 0o600
    assert load_or_create_key(tmp_path / "k") == (key, False)
    (tmp_path / "short").write_bytes(b"x" * 5)
    with pytest.raises(UserError, match="32 bytes"):
        load_or_create_key(tmp_path / "short")
    with pytest.raises(UserError, match="does not exist"):
        load_or_create_key(tmp_path / "missing" / "k")


@pytest.fixture(scope="module")
def watermarked(tmp_path_factory, tiny_models, small_domains):
    out = tmp_path_factory.mktemp("wm")
    key = out / "owner.key"
    r = CliRunner().invoke(main, ["compile", str(tiny_models["plain"]["export"]), "--authorized",
                                  f"mnist={small_domains['mnist']}", "--unauthorized", f"syn={small_domains['syn']}",
                                  "--input-size", "16", "16", "--steps", "60", "--no-gates", "--watermark", str(key),
                                  "-o", str(out / "build"), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out / "build", key


def test_compile_records_the_watermark_but_never_the_key(watermarked):
    build, key = watermarked
    secret = key.read_bytes()
    report = json.loads((build / "report.json").read_text())
    assert report["watermark"]["used"] is True
    assert set(report["watermark"]["ownership"]) >= {"key_acc", "control_acc", "p_value", "owned"}
    for f in build.iterdir():
        data = f.read_bytes()
        assert secret not in data and secret.hex().encode() not in data and b"owner.key" not in data, f


def test_verify_ownership_gives_a_verdict_and_refuses_bad_input(watermarked, small_domains, tmp_path):
    build, key = watermarked
    args = ["verify", str(build / "protected.onnx"), "--ownership", str(key), "--authorized",
            f"mnist={small_domains['mnist']}"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code in (0, 1), r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("OWNED | p=" if r.exit_code == 0 else "NOT OWNED | p=")
    # the suspect's input does not match the rows
    r = CliRunner().invoke(main, args + ["--input-size", "32", "32"])
    assert r.exit_code == 2 and "mapc: error" in r.output and "Traceback" not in r.output
    # a key of the wrong size, ownership mixed with gates, no authorized rows
    (tmp_path / "bad.key").write_bytes(b"123")
    for extra in (["--ownership", str(tmp_path / "bad.key")], ["--max-target-acc", "20"]):
        r = CliRunner().invoke(main, args[:2] + extra + args[2:] if extra[0] != "--ownership" else
                               ["verify", str(build / "protected.onnx"), *extra, "--authorized",
                                f"mnist={small_domains['mnist']}"])
        assert r.exit_code == 2, r.output
    r = CliRunner().invoke(main, ["verify", str(build / "protected.onnx"), "--ownership", str(key)])
    assert r.exit_code == 2 and "--authorized" in r.output


def test_watermark_needs_labelled_authorized_rows(tmp_path, tiny_models, small_domains):
    r = CliRunner().invoke(main, ["compile", str(tiny_models["residual"]["export"]), "--unauthorized",
                                  f"syn={small_domains['syn']}", "--input-size", "16", "16", "--steps", "5",
                                  "--no-gates", "--watermark", str(tmp_path / "k"), "-o", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 2 and "--watermark" in r.output
    assert not (tmp_path / "k").exists() and not (tmp_path / "o").exists()


def test_attack_tests_every_attacked_copy_for_ownership(watermarked, small_domains):
    build, key = watermarked
    r = CliRunner().invoke(main, ["attack", str(build / "protected.onnx"), "--authorized",
                                  f"mnist={small_domains['mnist']}", "--unauthorized", f"syn={small_domains['syn']}",
                                  "--attack", "target-finetune", "--attack", "input-disguise", "--budget", "0.1",
                                  "--steps", "5", "--ownership", str(key), "--json", "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output.splitlines()[0])
    own = report["ownership_after_attacks"]
    assert own["attacked_copies"] == 2 and "weakest" in own
    assert all("ownership" in row["artifact"] for row in report["attacks"])
    r = CliRunner().invoke(main, ["attack", str(build / "protected.onnx"), "--authorized",
                                  f"mnist={small_domains['mnist']}", "--unauthorized", f"syn={small_domains['syn']}",
                                  "--attack", "input-disguise", "--budget", "0.1", "--steps", "5", "--ownership",
                                  str(key), "-q"])
    assert r.exit_code == 0 and "ownership after attacks:" in r.output and "of 1 attacked copies" in r.output, r.output
