"""Write edge-infer's YAML config from the add-on's options and the Supervisor's MQTT service.

Called by the add-on's start script (``/etc/s6-overlay/s6-rc.d/edge-infer/run``)::

    addon_config.py --options /data/options.json --config-dir /config --out /data/edge-infer.yaml

The broker comes from the environment the start script fills from ``bashio::services mqtt``
(``EDGE_INFER_MQTT_HOST``, ``_PORT``, ``_USERNAME``, ``_SSL``); the password is referenced through
``mqtt.password_env`` and so never lands on disk. With ``config_file`` set, that file (relative to
the add-on's config folder) is the base and only the broker and discovery settings are overlaid.

The output is JSON, which is valid YAML; standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PASSWORD_ENV = "EDGE_INFER_MQTT_PASSWORD"


class AddonConfigError(ValueError):
    pass


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def mqtt_section(env: Mapping[str, str], base_topic: str) -> dict[str, Any]:
    host = env.get("EDGE_INFER_MQTT_HOST", "").strip()
    if not host:
        raise AddonConfigError(
            "no MQTT broker: EDGE_INFER_MQTT_HOST is empty (is the Mosquitto add-on running?)"
        )
    port = env.get("EDGE_INFER_MQTT_PORT", "").strip() or (
        "8883" if _truthy(env.get("EDGE_INFER_MQTT_SSL")) else "1883"
    )
    scheme = "mqtts" if _truthy(env.get("EDGE_INFER_MQTT_SSL")) else "mqtt"
    host_part = f"[{host}]" if ":" in host else host
    section: dict[str, Any] = {"url": f"{scheme}://{host_part}:{int(port)}", "base_topic": base_topic}
    username = env.get("EDGE_INFER_MQTT_USERNAME", "").strip()
    if username and username != "null":
        section["username"] = username
    password = env.get(PASSWORD_ENV, "")
    if password and password != "null":
        section["password_env"] = PASSWORD_ENV
    return section


def _resolve(path: str, config_dir: Path) -> str:
    candidate = Path(path)
    return str(candidate if candidate.is_absolute() else config_dir / candidate)


def _load_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise AddonConfigError(f"config_file {path}: {exc.strerror}") from None
    try:
        import yaml  # installed with edge-infer

        data = yaml.safe_load(text)
    except ImportError:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise AddonConfigError(f"config_file {path}: not a YAML mapping")
    return data


def build_config(options: Mapping[str, Any], env: Mapping[str, str], config_dir: Path) -> dict[str, Any]:
    """The edge-infer config (a dict) for the add-on's ``options`` and the broker in ``env``."""
    base_topic = str(options.get("base_topic") or "edge-infer")
    config_file = options.get("config_file")
    if config_file:
        config = _load_file(Path(_resolve(str(config_file), config_dir)))
        models = config.get("models") or {}
        for model in models.values():
            if isinstance(model, dict) and "path" in model:
                model["path"] = _resolve(str(model["path"]), config_dir)
    else:
        config = {"models": {}, "pipelines": {}}
        for model in options.get("models") or []:
            config["models"][model["name"]] = {"path": _resolve(model["file"], config_dir)}
        for pipe in options.get("pipelines") or []:
            if pipe["model"] not in config["models"]:
                raise AddonConfigError(
                    f"pipeline {pipe['name']!r}: no model named {pipe['model']!r} under models"
                )
            source: dict[str, Any] = {"profile": pipe["profile"], "topics": [pipe["topic"]]}
            if pipe.get("availability_topic"):
                source["availability_topic"] = pipe["availability_topic"]
            output: dict[str, Any] = {}
            for key in ("publish", "heartbeat_s", "min_confidence"):
                if pipe.get(key) is not None:
                    output[key] = pipe[key]
            entry: dict[str, Any] = {"model": pipe["model"], "source": source}
            if output:
                entry["output"] = output
            config["pipelines"][pipe["name"]] = entry
        if not config["pipelines"]:
            raise AddonConfigError(
                "no pipelines: add at least one under 'pipelines' in the add-on's configuration "
                "(or point 'config_file' to a full edge-infer config in the add-on's config folder)"
            )
    mqtt = dict(config.get("mqtt") or {})
    for key in ("url", "username", "password", "password_file", "password_env", "base_topic"):
        mqtt.pop(key, None)
    mqtt.update(mqtt_section(env, base_topic))
    config["mqtt"] = mqtt
    homeassistant = dict(config.get("homeassistant") or {})
    homeassistant["enabled"] = bool(options.get("discovery", True))
    homeassistant["discovery_prefix"] = str(options.get("discovery_prefix") or "homeassistant")
    config["homeassistant"] = homeassistant
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--options", type=Path, default=Path("/data/options.json"))
    parser.add_argument("--config-dir", type=Path, default=Path("/config"))
    parser.add_argument("--out", type=Path, default=Path("/data/edge-infer.yaml"))
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.options.read_text())
        config = build_config(options, os.environ, args.config_dir)
    except (OSError, ValueError, KeyError) as exc:
        print(f"edge-infer add-on: {exc}", file=sys.stderr)
        return 1
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
