"""The scale benchmark at a small size (``pytest -m slow``; minutes, not in the default suite).

Runs ``samples/scale_bench.py`` end to end (generated 224x224 ImageFolder, ResNet-18, compile and
verify under /usr/bin/time) on two sizes and checks that peak memory does not grow with the data.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("/usr/bin/time") is None, reason="needs GNU time for peak memory")
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    r = subprocess.run([sys.executable, "samples/scale_bench.py", "--sizes", "1000", "3000", "--steps", "6",
                        "--train-steps", "4", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "scale.json").read_text())
    small, large = rows[0]["compile_peak_rss_mib"], rows[1]["compile_peak_rss_mib"]
    print(f"peak RSS {small:.0f} MiB (1,000 images) vs {large:.0f} MiB (3,000 images)")
    assert large <= small * 1.2
    assert all(row["verify_exit"] == 0 and row["mask_images_per_s"] > 0 for row in rows)
