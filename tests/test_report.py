"""The realism report: its pass/fail logic on constructed numbers, and a small real run end to end."""

from __future__ import annotations

import numpy as np
from PIL import Image

from reefcap.models.reefscenes.realism import FIGURE_NAME, REPORT_NAME, realism_checks, write_report


def sets(raw, enhanced, uw, air):
    def block(rows):
        return {m: np.array([r[i] for r in rows]) for i, m in enumerate(("uiqm", "uciqe", "r_g", "b_g"))}

    return {"raw": block(raw), "enhanced": block(enhanced), "underwater": block(uw), "in air": block(air)}


RAW = [(2.0, 0.30, 0.2, 0.8), (3.0, 0.45, 0.6, 1.4)]
ENHANCED = [(2.5, 0.35, 0.5, 1.0), (3.2, 0.47, 0.9, 1.0)]


def test_realism_checks_pass_only_when_every_condition_holds():
    good = realism_checks(sets(RAW, ENHANCED, [(2.5, 0.4, 0.4, 1.0)] * 3, [(2.5, 0.4, 1.0, 1.0)] * 3))
    assert good["passed"] and good["joint_share_inside"] == {"underwater": 1.0, "in air": 0.0}
    # Underwater too red: its R/G mean leaves the real range.
    assert not realism_checks(sets(RAW, ENHANCED, [(2.5, 0.4, 0.9, 1.0)] * 3, [(2.5, 0.4, 1.0, 1.0)] * 3))["passed"]
    # In air indistinguishable from the real photos.
    assert not realism_checks(sets(RAW, ENHANCED, [(2.5, 0.4, 0.4, 1.0)] * 3, [(2.5, 0.4, 0.4, 1.0)] * 3))["passed"]
    # Enhancement rated below raw by UCIQE.
    worse = [(2.5, 0.2, 0.5, 1.0), (3.2, 0.3, 0.9, 1.0)]
    assert not realism_checks(sets(RAW, worse, [(2.5, 0.4, 0.4, 1.0)] * 3, [(2.5, 0.4, 1.0, 1.0)] * 3))["passed"]


def test_small_report_run_writes_markdown_and_figure(tmp_path, euvp_images):
    result = write_report(tmp_path, euvp=euvp_images[0].parent.parent, scenes=4, seed=1, size=96, workers=1)
    text = (tmp_path / REPORT_NAME).read_text()
    assert "| EUVP raw (real) | 23 |" in text and "| ReefScenes underwater | 4 |" in text
    assert "## At 96 px" in text and "## At 128 px" in text and FIGURE_NAME in text
    assert Image.open(tmp_path / FIGURE_NAME).size[1] == 3 * (128 + 4)
    checks = result["checks"]["96"]
    assert checks["enhanced_above_raw"] == {"uiqm": True, "uciqe": True}
