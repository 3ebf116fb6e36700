"""The encoding actor's memory report: this process's own resident memory now and at its peak (VmRSS / VmHWM)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lancer_dist.retrieval.encode import _rss_mb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_rss_now_and_peak_follow_an_allocation():
    rss0, peak0 = _rss_mb()
    assert 0 < rss0 <= peak0
    a = np.ones(200 * 2**20 // 8)  # 200 MB, touched
    rss1, peak1 = _rss_mb()
    assert rss1 - rss0 > 150 and peak1 >= rss1
    del a
    rss2, peak2 = _rss_mb()
    assert rss1 - rss2 > 150  # freed: the current figure falls ...
    assert (
        peak2 - rss2 > 150
    )  # ... the peak does not (the kernel's counters are approximate: no exact equality)
