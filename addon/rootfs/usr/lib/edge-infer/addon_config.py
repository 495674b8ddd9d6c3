"""Write edge-infer's config from the add-on's options and the Supervisor's MQTT service, and
validate it with edge-infer's own start-up check.

Called by the add-on's start script (``/etc/s6-overlay/s6-rc.d/edge-infer/run``) with the add-on's
Python (the venv edge-infer is installed in)::

    addon_config.py --options /data/options.json --config-dir /config --out /data/edge-infer.yaml

The broker comes from the environment the start script fills from ``bashio::services mqtt``
(``EDGE_INFER_MQTT_HOST``, ``_PORT``, ``_USERNAME``, ``_SSL``); the password is referenced through
``mqtt.password_env`` and so never lands on disk. With ``config_file`` set, that file (relative to
the add-on's config folder) is the base and only the broker and discovery settings are overlaid.

An invalid config is an error naming the ADD-ON option (``pipelines[0].window_size``), not the
key of the generated file, and the add-on stops (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PASSWORD_ENV = "EDGE_INFER_MQTT_PASSWORD"
# The option that names each family's topic root (edge/family_profiles/<family>.yaml).
PREFIX_OPTION = {
    "zigbee2mqtt": "base_topic",
    "tasmota": "tele_prefix",
    "shelly": "prefix",
    "esphome": "prefix",
    "statestream": "base_topic",
}
# Pipeline options that are settings of the json profile only (edge.config.JsonSource); with any
# other profile they are dropped with a warning.
JSON_ONLY_OPTIONS = ("topics", "device_field", "timestamp_field", "availability_topic")
# pipeline option -> (section, key) of the generated pipeline
OUTPUT_OPTIONS = {
    "publish": "publish",
    "heartbeat_s": "heartbeat_s",
    "min_interval_s": "min_interval_s",
    "debounce": "debounce",
    "min_confidence": "min_confidence",
    "top_k": "top_k",
}
WINDOW_OPTIONS = {
    "window_size": "size",
    "window_hop": "hop",
    "resample_period_s": "resample_period_s",
    "max_gap_s": "max_gap_s",
}
ENTITY_OPTIONS = {"entity_name": "name", "device_class": "device_class", "icon": "icon"}


class AddonConfigError(ValueError):
    """An option the add-on cannot turn into a config; ``option`` names it as the user sees it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"option {option}: {message}" if option else message)
        self.option = option


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def mqtt_section(env: Mapping[str, str], base_topic: str) -> dict[str, Any]:
    host = env.get("EDGE_INFER_MQTT_HOST", "").strip()
    if not host:
        raise AddonConfigError(
            "", "no MQTT broker: EDGE_INFER_MQTT_HOST is empty (is the Mosquitto add-on running?)"
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


def _resolve_learn(learn: dict[str, Any], base: Path) -> None:
    """The relative paths of a pipeline's ``learn:`` section, against the user's config file's
    folder: the daemon runs with the generated config in /data, and its Retrain hands that file
    to ``edge-infer learn``, which would otherwise look for them in /data."""
    source = learn.get("source")
    if isinstance(source, dict):
        for key in ("record", "recorder_db"):
            if isinstance(source.get(key), str):
                source[key] = _resolve(source[key], base)
        ha = source.get("ha")
        if isinstance(ha, dict) and isinstance(ha.get("token_file"), str):
            ha["token_file"] = _resolve(ha["token_file"], base)
    if isinstance(learn.get("work_dir"), str):
        learn["work_dir"] = _resolve(learn["work_dir"], base)


def _load_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise AddonConfigError("config_file", f"{path}: {exc.strerror}") from None
    try:
        import yaml  # installed with edge-infer

        data = yaml.safe_load(text)
    except ImportError:
        data = json.loads(text)
    except yaml.YAMLError as exc:
        raise AddonConfigError("config_file", f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise AddonConfigError("config_file", f"{path}: not a YAML mapping")
    return data


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _pairs(text: str, option: str) -> dict[str, str]:
    """``feature=reading, feature=reading`` -> a mapping."""
    pairs: dict[str, str] = {}
    for part in _split(text):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise AddonConfigError(option, f"{part!r} is not FEATURE=READING (e.g. power=power)")
        pairs[key.strip()] = value.strip()
    return pairs


def _model_layout(path: str) -> str | None:
    """``window`` / ``snapshot`` from a model's manifest (None when it cannot be read here)."""
    try:
        from edge import zoo
        from edge.manifest import read_manifest

        if zoo.is_zoo_ref(path):
            layout = zoo.summary(zoo.resolve(path).name).get("layout")
            return str(layout) if layout else None
        manifest = read_manifest(path)
        return manifest.input.layout if manifest is not None else None
    except Exception:  # a wrong name or file: edge-infer's own check says what is wrong
        return None


class Generated:
    """The generated config and, for each generated key, the add-on option it came from."""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self.origin: dict[str, str] = {}
        self.warnings: list[str] = []  # options left out of the config, each naming the option

    def option_for(self, key: str) -> str:
        """The add-on option behind a dotted key of the generated config (longest prefix)."""
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            found = self.origin.get(".".join(parts[:n]))
            if found is not None:
                return found
        return ""


def _pipeline(gen: Generated, index: int, pipe: Mapping[str, Any], models: dict[str, Any]) -> None:
    where = f"pipelines[{index}]"
    name = str(pipe.get("name") or "")
    if not name:
        raise AddonConfigError(f"{where}.name", "required")
    if name in gen.config["pipelines"]:
        raise AddonConfigError(f"{where}.name", f"{name!r} is used by another pipeline")
    key = f"pipelines.{name}"
    gen.origin[key] = where
    model_ref = str(pipe.get("model") or "")
    if not model_ref:
        raise AddonConfigError(
            f"{where}.model", "required: zoo:NAME (a bundled model) or a name under models"
        )
    if model_ref.startswith("zoo:"):
        model_name = model_ref[len("zoo:") :].replace(".", "_") or "zoo"
        entry = models.setdefault(model_name, {"path": model_ref})
        if entry["path"] != model_ref:
            model_name = f"{model_name}_{index}"
            models[model_name] = {"path": model_ref}
        gen.origin[f"models.{model_name}"] = f"{where}.model"
    elif model_ref in models:
        model_name = model_ref
    else:
        known = ", ".join(sorted(models)) or "none"
        raise AddonConfigError(
            f"{where}.model", f"{model_ref!r} is neither zoo:NAME nor a name under models (models: {known})"
        )
    gen.origin[f"{key}.model"] = f"{where}.model"

    profile = str(pipe.get("profile") or "json")
    source: dict[str, Any] = {"profile": profile}
    gen.origin[f"{key}.source"] = f"{where}.profile"
    gen.origin[f"{key}.source.profile"] = f"{where}.profile"
    if pipe.get("prefix"):
        if profile not in PREFIX_OPTION:
            raise AddonConfigError(f"{where}.prefix", "the json profile takes topics, not a prefix")
        source["options"] = {PREFIX_OPTION[profile]: str(pipe["prefix"])}
        gen.origin[f"{key}.source.options"] = f"{where}.prefix"
    for option in JSON_ONLY_OPTIONS:
        value = pipe.get(option)
        if value in (None, ""):
            continue
        if profile != "json":
            # edge-infer refuses json source keys on a family source (the family finds its own
            # topics); the add-on's form offers them for every profile, so they are left out here
            gen.warnings.append(
                f"option {where}.{option}: ignored, it is a setting of the json profile and "
                f"{name!r} uses the {profile} profile (clear it to silence this warning)"
            )
            continue
        source[option] = _split(str(value)) if option == "topics" else str(value)
        gen.origin[f"{key}.source.{option}"] = f"{where}.{option}"
    entry_cfg: dict[str, Any] = {"model": model_name, "source": source}

    if pipe.get("inputs"):
        entry_cfg["inputs"] = _pairs(str(pipe["inputs"]), f"{where}.inputs")
        gen.origin[f"{key}.inputs"] = f"{where}.inputs"
    if pipe.get("devices"):
        entry_cfg["devices"] = _split(str(pipe["devices"]))
        gen.origin[f"{key}.devices"] = f"{where}.devices"

    features_type = pipe.get("features")
    window = {WINDOW_OPTIONS[k]: pipe[k] for k in WINDOW_OPTIONS if pipe.get(k) is not None}
    if features_type is None:
        layout = _model_layout(models[model_name]["path"])
        features_type = "window" if window or layout == "window" else "snapshot"
    features: dict[str, Any] = {"type": features_type}
    gen.origin[f"{key}.features"] = f"{where}.features"
    gen.origin[f"{key}.features.type"] = f"{where}.features"
    if features_type == "window":
        features.update(window)
        for option, generated in WINDOW_OPTIONS.items():
            gen.origin[f"{key}.features.{generated}"] = f"{where}.{option}"
    elif window:
        raise AddonConfigError(
            f"{where}.{next(iter(k for k in WINDOW_OPTIONS if pipe.get(k) is not None))}",
            "window options need features: window",
        )
    if features_type == "snapshot" and pipe.get("max_age_s") is not None:
        features["max_age_s"] = pipe["max_age_s"]
        gen.origin[f"{key}.features.max_age_s"] = f"{where}.max_age_s"
    entry_cfg["features"] = features

    output = {OUTPUT_OPTIONS[k]: pipe[k] for k in OUTPUT_OPTIONS if pipe.get(k) is not None}
    for option, generated in OUTPUT_OPTIONS.items():
        gen.origin[f"{key}.output.{generated}"] = f"{where}.{option}"
    if output:
        entry_cfg["output"] = output
    entity = {ENTITY_OPTIONS[k]: pipe[k] for k in ENTITY_OPTIONS if pipe.get(k)}
    for option, generated in ENTITY_OPTIONS.items():
        gen.origin[f"{key}.homeassistant.{generated}"] = f"{where}.{option}"
    if entity:
        entry_cfg["homeassistant"] = entity
    gen.config["pipelines"][name] = entry_cfg


def build(options: Mapping[str, Any], env: Mapping[str, str], config_dir: Path) -> Generated:
    """The edge-infer config for the add-on's ``options`` and the broker in ``env``."""
    gen = Generated()
    base_topic = str(options.get("base_topic") or "edge-infer")
    config_file = options.get("config_file")
    if config_file:
        path = Path(_resolve(str(config_file), config_dir))
        config = _load_file(path)
        for model in (config.get("models") or {}).values():
            if isinstance(model, dict) and "path" in model and not str(model["path"]).startswith("zoo:"):
                model["path"] = _resolve(str(model["path"]), path.parent)
        for pipeline in (config.get("pipelines") or {}).values():
            if isinstance(pipeline, dict) and isinstance(pipeline.get("learn"), dict):
                _resolve_learn(pipeline["learn"], path.parent)
        gen.config = config
        gen.origin[""] = "config_file"
        for top in config:
            gen.origin[str(top)] = f"config_file ({path.name}: {top})"
    else:
        models: dict[str, Any] = {}
        gen.config = {"models": models, "pipelines": {}}
        for index, model in enumerate(options.get("models") or []):
            name = str(model.get("name") or "")
            if not name:
                raise AddonConfigError(f"models[{index}].name", "required")
            models[name] = {"path": _resolve(str(model.get("file") or ""), config_dir)}
            gen.origin[f"models.{name}"] = f"models[{index}].file"
        for index, pipe in enumerate(options.get("pipelines") or []):
            _pipeline(gen, index, pipe, models)
        if not gen.config["pipelines"]:
            raise AddonConfigError(
                "pipelines",
                "no pipelines: add at least one in the add-on's configuration "
                "(or point 'config_file' to a full edge-infer config in the add-on's config folder)",
            )
    config = gen.config
    mqtt = dict(config.get("mqtt") or {})
    for key in ("url", "username", "password", "password_file", "password_env", "base_topic"):
        mqtt.pop(key, None)
    mqtt.update(mqtt_section(env, base_topic))
    config["mqtt"] = mqtt
    gen.origin["mqtt.base_topic"] = "base_topic"
    homeassistant = dict(config.get("homeassistant") or {})
    homeassistant["enabled"] = bool(options.get("discovery", True))
    homeassistant["discovery_prefix"] = str(options.get("discovery_prefix") or "homeassistant")
    config["homeassistant"] = homeassistant
    gen.origin["homeassistant.discovery_prefix"] = "discovery_prefix"
    gen.origin["homeassistant.enabled"] = "discovery"
    return gen


def build_config(options: Mapping[str, Any], env: Mapping[str, str], config_dir: Path) -> dict[str, Any]:
    return build(options, env, config_dir).config


def validate(gen: Generated, path: Path) -> None:
    """edge-infer's own start-up check (the one `check` and `run` use) on the written file;
    an error names the add-on option."""
    from edge.config import ConfigError
    from edge.daemon import prepare
    from edge.runtime import ModelLoadError

    try:
        _config, models, _pipelines = prepare(str(path), None, None)
    except ConfigError as exc:
        option = gen.option_for(exc.key)
        generated = f" (generated key {exc.key})" if exc.key else ""
        raise AddonConfigError(option, f"{exc.message}{generated}") from None
    except ModelLoadError as exc:
        # "model 'appliance': pipelines.appliance.features.size is 512 but ...": name the option
        text = str(exc)
        found = re.search(r"\b(?:pipelines|models)\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_]+)*", text)
        option = gen.option_for(found.group(0)) if found else ""
        raise AddonConfigError(option, text) from None
    for model in models.values():
        model.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--options", type=Path, default=Path("/data/options.json"))
    parser.add_argument("--config-dir", type=Path, default=Path("/config"))
    parser.add_argument("--out", type=Path, default=Path("/data/edge-infer.yaml"))
    parser.add_argument("--no-validate", action="store_true", help="write without edge-infer's check")
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.options.read_text())
        gen = build(options, os.environ, args.config_dir)
        for warning in gen.warnings:
            print(f"edge-infer add-on: warning: {warning}", file=sys.stderr)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(gen.config, indent=2, sort_keys=True) + "\n")
        if not args.no_validate:
            validate(gen, tmp)
        tmp.replace(args.out)
    except AddonConfigError as exc:
        print(f"edge-infer add-on: invalid configuration: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"edge-infer add-on: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
