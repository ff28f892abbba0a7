"""``samples/mask_spread.py``: an artifact's mask read back from its zeros, and votes over read-back masks."""
import json

import pytest


def test_mask_read_back_matches_the_compile(artifact):
    from samples.mask_spread import spread
    d = artifact.parent
    report = json.loads((d / "report.json").read_text())
    s = spread([d, d], "syn")
    pruned = report["mask"]["pruned_fraction"]
    assert 0 < pruned < 1
    assert s.pruned_read_back == [pytest.approx(pruned, abs=5.1e-5)] * 2   # the report keeps 4 decimals
    # measured like the compile measured it (its report rounds to 0.1)
    assert s.top1[0]["syn"] == pytest.approx(report["domains"]["syn"]["protected_acc"], abs=0.051)
    assert s.top1[0]["mnist"] == pytest.approx(report["domains"]["mnist"]["protected_acc"], abs=0.051)
    # one mask twice: every vote is that mask, and each row is read alike under both
    assert s.at_least[1] == s.top1[0] and s.at_least[2] == s.top1[0]
    assert s.correct_under[1] == 0 and sum(s.correct_under) == sum(s.histogram[0])
    assert not s.triples
