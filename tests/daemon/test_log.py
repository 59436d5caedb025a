from __future__ import annotations

import logging

from xen_vhost_master.log import RateLimit, device_logger


def test_prefix_names_domain_and_device(caplog):
    caplog.set_level(logging.INFO)
    device_logger("xvm.test", 7, "blk0").info("ready")
    device_logger("xvm.test", 7).info("attached")
    assert [r.getMessage() for r in caplog.records] == ["dom7/blk0: ready", "dom7: attached"]


def test_rate_limit_bounds_a_storm_and_reports_suppressed_count():
    now = [0.0]
    rl = RateLimit(lambda: now[0], burst=3, window=10)
    results = [rl.allow("notify")[0] for _ in range(1000)]
    assert results.count(True) == 3
    assert rl.allow("other")[0]  # keys are independent
    now[0] = 10.0
    allowed, suppressed = rl.allow("notify")
    assert allowed and suppressed == 997
