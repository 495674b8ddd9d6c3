"""Smoke test of the fault soak (``python -m bench.faultsoak``): 400 numbered QoS 1 messages,
a daemon SIGKILLed and restarted mid-stream, and every message accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.faultsoak import BAD_KINDS, Plan, faultsoak

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_tiny_fault_soak_accounts_for_every_message(tmp_path: Path) -> None:
    plan = Plan(
        messages=400,
        devices=40,
        rate=100.0,
        seed=3,
        bad_fraction=0.05,
        faults=["daemon_kill"],
        first_fault_s=1.0,
        warmup_s=1.0,
        settle_s=8.0,
    )
    result = faultsoak(plan, tmp_path, log=lambda _line: None)
    a = result["accounting"]
    assert a["messages"] == 400
    assert a["bad"] > 0
    # Every number answered, or dead-lettered with the daemon's reason: nothing unaccounted (no
    # broker kill here, so nothing may be lost by design either).
    assert a["unaccounted"] == 0, a["unaccounted_first"]
    assert a["answered"] + a["dead_lettered_not_answered"] == 400
    assert a["answered_bad"] == 0
    assert not a["bad_with_wrong_reason"]
    for row in a["bad_kinds"].values():
        assert row["dead_lettered_with_reason"] == row["sent"]
    # The daemon's own counters say the same (summed over both lifetimes).
    for name, row in a["bad_kinds"].items():
        assert a["daemon_counted_drops_by_reason"].get(BAD_KINDS[name], 0) >= row["sent"]
    [fault] = result["faults"]
    assert fault["kind"] == "daemon_kill"
    assert fault["answers_again_s"] is not None
    assert len(result["lifetimes"]) == 2
    assert result["lifetimes"][0]["how"] == "SIGKILL"
    assert result["samples"], "RSS and fds were sampled"
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert ".json" in written
    assert ".md" in written
    data = json.loads(next(tmp_path.glob("*-faultsoak.json")).read_text())
    assert data["accounting"] == json.loads(json.dumps(a))
