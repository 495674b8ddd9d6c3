"""``python -m bench.rss_profile CONFIG``: the daemon's import and model-loading cost, step by step.

A fresh interpreter imports what ``edge-infer run`` imports, one major dependency at a time, then
the rest of edge/, loads the config and each model session as the daemon does
(``edge.runtime.LoadedModel``) and builds the pipelines; after each step it notes its RSS
(``VmRSS``). Prints one JSON line. Each step's cost is what it adds to the steps before it (numpy
is counted under numpy, not again under onnxruntime). Only the standard library is imported before
the first step, so the interpreter's own size is the baseline. Used by ``bench/rss.py``.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

# major imports, in this order
PROFILE_IMPORTS = (
    "numpy",
    "onnxruntime",
    "pydantic",
    "yaml",
    "ssl",
    "prometheus_client",
    "paho.mqtt.client",
    "aiomqtt",
    "uvloop",
)


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def profile(config_path: Path, mqtt_url: str = "mqtt://127.0.0.1:1") -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    seen = {m.split(".")[0] for m in sys.modules}

    def step(name: str, kind: str) -> None:
        rss = rss_mb()
        now = {m.split(".")[0] for m in sys.modules}
        before = steps[-1]["rss_mb"] if steps else rss
        steps.append(
            {
                "step": name,
                "kind": kind,
                "rss_mb": round(rss, 1),
                "delta_mb": round(rss - before, 1),
                "new_packages": sorted(now - seen - {"__main__"}),
            }
        )
        seen.update(now)

    step("python", "interpreter")
    for module in PROFILE_IMPORTS:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        step(module, "import")
    cli = importlib.import_module("edge.cli")
    daemon = importlib.import_module("edge.daemon")
    cli.event_loop()  # as `edge-infer run` does before the daemon starts
    step("edge (the daemon's own modules)", "import")
    from edge.config import load_config
    from edge.runtime import LoadedModel

    config = load_config(config_path, mqtt_url)
    step("config loaded", "config")
    models = {}
    for name in sorted({p.model for p in config.pipelines.values() if p.enabled}):
        cfg = config.models[name]
        models[name] = LoadedModel(name, cfg, config.runtime)
        step(f"model {name} ({cfg.path.name})", "model")
    daemon.build_pipelines(config, models)
    step("pipelines built", "pipelines")
    return {"steps": steps}


if __name__ == "__main__":
    print(json.dumps(profile(Path(sys.argv[1]))))
