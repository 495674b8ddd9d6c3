"""How long learn's history sources take on 14 days x 10 entities held by a real Home Assistant.

    EDGE_INFER_HA_VENV=/work/cache/ha-venv python -m bench.ha_history_read [--days 14] [--entities 10]

Boots Home Assistant Core once (``recorder:`` on SQLite) so that it creates its full schema,
stops it, writes ``days`` of states for ``entities`` power sensors (one every 10 s, as a plug
reports) into its database the way the recorder stores them (``states_meta``, one shared
``state_attributes`` row per sensor), boots it again on that database, then reads the whole span
with :class:`edge.learn.ha_ws.HaWebSocketSource` and, from a copy made with SQLite's backup,
with :class:`edge.learn.recorder_db.RecorderDbSource`, each in its own process so its wall time
and peak RSS are its own. Prints one JSON line; asserts the two histories are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READER = r"""
import hashlib, json, resource, sys, time
kind, target, token = sys.argv[1:4]
start, end, ids = float(sys.argv[4]), float(sys.argv[5]), sys.argv[6].split(",")
t = time.perf_counter()
if kind == "ws":
    from edge.learn.ha_ws import HaWebSocketSource
    with HaWebSocketSource(url=target, token=token) as src:
        history = src.states(ids, start, end)
        requests = src.requests
else:
    from edge.learn.recorder_db import RecorderDbSource
    with RecorderDbSource(path=target) as src:
        history = src.states(ids, start, end)
        requests = 0
seconds = time.perf_counter() - t
digest = hashlib.sha256()
for eid in ids:
    for c in history[eid]:
        digest.update(f"{eid}|{c.ts!r}|{c.state}|{json.dumps(dict(c.attributes), sort_keys=True)}\n".encode())
print(json.dumps({"seconds": seconds, "states": sum(map(len, history.values())), "requests": requests,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "sha256": digest.hexdigest()}))
"""


def fill(db_path: Path, entities: int, days: float, end: float) -> tuple[list[str], float]:
    db = sqlite3.connect(db_path)
    start = end - days * 86400
    n = int(days * 8640)
    ids = []
    for e in range(entities):
        entity_id = f"sensor.bench_plug_{e:02d}_power"
        ids.append(entity_id)
        attrs = json.dumps(
            {
                "state_class": "measurement",
                "unit_of_measurement": "W",
                "device_class": "power",
                "friendly_name": f"Bench plug {e:02d} Power",
            },
            separators=(",", ":"),
        )
        meta = db.execute("INSERT INTO states_meta (entity_id) VALUES (?)", (entity_id,)).lastrowid
        attr = db.execute(
            "INSERT INTO state_attributes (hash, shared_attrs) VALUES (?, ?)", (e, attrs)
        ).lastrowid
        db.executemany(
            "INSERT INTO states (state, last_updated_ts, metadata_id, attributes_id, origin_idx) "
            "VALUES (?, ?, ?, ?, 0)",
            (
                (
                    f"{(i * 7919 + e * 131) % 20000 / 10:.1f}",
                    start + 10.0 * i + 0.013 * e + 0.000001 * i,
                    meta,
                    attr,
                )
                for i in range(n)
            ),
        )
    db.commit()
    db.close()
    return ids, start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=float, default=14.0)
    parser.add_argument("--entities", type=int, default=10)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from edge.learn.recorder_db import copy_recorder_db
    from tests.test_ha_real import HomeAssistant, _hass_binary

    work = Path(tempfile.mkdtemp(prefix="ha-history-read-"))
    ha = HomeAssistant(
        _hass_binary(),
        work / "ha",
        extra_config=(
            "recorder:\n  commit_interval: 1\n  auto_purge: false\n  purge_keep_days: 60\nhistory:\n"
        ),
    )
    result: dict[str, Any] = {"days": args.days, "entities": args.entities}
    try:
        ha.start()
        ha.onboard()
        ha.stop()
        end = time.time() - 60
        t = time.perf_counter()
        ids, start = fill(work / "ha" / "home-assistant_v2.db", args.entities, args.days, end)
        result["fill_s"] = round(time.perf_counter() - t, 1)
        result["db_mb"] = round((work / "ha" / "home-assistant_v2.db").stat().st_size / 1e6, 1)
        # the token outlives the restart (refresh tokens are stored); a fresh login is simpler
        ha.start()
        ha.token = None
        token = _login(ha)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        span = [str(start - 1), str(end + 1), ",".join(ids)]
        ws = subprocess.run(
            [sys.executable, "-c", READER, "ws", f"http://127.0.0.1:{ha.port}", token, *span],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
            check=True,
        )
        copy = copy_recorder_db(work / "ha" / "home-assistant_v2.db", work / "copy.db")
        db = subprocess.run(
            [sys.executable, "-c", READER, "db", str(copy), "-", *span],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
            check=True,
        )
        result["ws"] = json.loads(ws.stdout)
        result["recorder_db"] = json.loads(db.stdout)
        result["identical"] = result["ws"]["sha256"] == result["recorder_db"]["sha256"]
        result["host_load"] = os.getloadavg()[0]
    finally:
        ha.stop()
    print(json.dumps(result))
    return 0 if result.get("identical") else 1


def _login(ha: Any) -> str:
    """A new access token for the onboarded user (login flow with the test password)."""
    client_id = f"http://127.0.0.1:{ha.port}/"
    flow = ha._request(
        "POST",
        "/auth/login_flow",
        {"client_id": client_id, "handler": ["homeassistant", None], "redirect_uri": client_id},
        auth=False,
    )
    done = ha._request(
        "POST",
        f"/auth/login_flow/{flow['flow_id']}",
        {"client_id": client_id, "username": "test", "password": "test-pass-1234"},
        auth=False,
    )
    token = ha._request(
        "POST",
        "/auth/token",
        {"grant_type": "authorization_code", "code": done["result"], "client_id": client_id},
        auth=False,
        form=True,
    )
    return str(token["access_token"])


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    raise SystemExit(main())
