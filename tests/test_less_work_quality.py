"""The digits quality bar for the documented recommended reduced-work settings (docs/less-work.md): against full work
from the same seeds, class accuracy (the project's digits classifier) within 1 point and within-class spread no lower;
feature reuse alone stays >= 30 dB PSNR from full work."""

from __future__ import annotations

from experiments.less_work import OPTIONS, RECOMMENDED, evaluate


def test_recommended_settings_keep_the_digits_quality_bar():
    res = evaluate(n_per_class=6, options=(OPTIONS[0], RECOMMENDED, ("cache 2", None, 2)))
    full, rec, cache2 = res["rows"]
    assert full["option"] == "full" and full["accuracy"] >= 0.9  # the classifier sees real digits in full work
    assert rec["accuracy"] >= full["accuracy"] - 0.01
    assert rec["spread_std_ratio"] >= full["spread_std_ratio"] and rec["spread_l2_ratio"] >= full["spread_l2_ratio"]
    assert rec["gmac_saved"] > 0.5  # the work really went down: 59% fewer multiply-adds at DDIM 50
    assert cache2["psnr_vs_full_db"] >= 30.0 and cache2["accuracy"] >= full["accuracy"] - 0.01
