"""``edge-infer learn --suggest``: propose which Home Assistant entities feed a pipeline's inputs.

From Home Assistant's entity and device registries (``config/entity_registry/list``,
``config/device_registry/list``) and the current states (``device_class``,
``unit_of_measurement``, ``state_class``), every HA device that has an entity fitting each of the
pipeline's inputs is proposed as one ``learn.inputs`` entry, ranked, each pick with its reasons.
The result is YAML for the user to read, trim and paste: nothing is applied by itself.

Scoring of one entity for one input (the reasons say which applied):

* the unit: the input's own unit +3; another unit of the same quantity (kW for W) +1;
  another quantity: not a candidate;
* the device class the unit implies (``power`` for W): +2, a different one -2;
* the input's name in the entity id or name: +1; ``state_class: measurement``: +0.5;
  a numeric current state: +0.5; a diagnostic or config entity: -2;
* disabled or hidden entities, and domains other than sensor/number/input_number, are skipped.

A device's score is the sum over its inputs; devices with every input come first.
:func:`suggest_yaml` is pure (registries in, text out); :func:`suggest_from_ha` reads the
registries through an :class:`edge.learn.ha_ws.HaWebSocketSource`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

#: unit -> (quantity, the device class HA uses for it)
UNITS: dict[str, tuple[str, str | None]] = {
    "W": ("power", "power"),
    "kW": ("power", "power"),
    "mW": ("power", "power"),
    "Wh": ("energy", "energy"),
    "kWh": ("energy", "energy"),
    "MWh": ("energy", "energy"),
    "V": ("voltage", "voltage"),
    "mV": ("voltage", "voltage"),
    "A": ("current", "current"),
    "mA": ("current", "current"),
    "°C": ("temperature", "temperature"),
    "°F": ("temperature", "temperature"),
    "K": ("temperature", "temperature"),
    "%": ("ratio", "humidity"),
    "lx": ("illuminance", "illuminance"),
    "ppm": ("concentration", "carbon_dioxide"),
    "hPa": ("pressure", "pressure"),
    "Pa": ("pressure", "pressure"),
    "mbar": ("pressure", "pressure"),
    "Hz": ("frequency", "frequency"),
    "VA": ("apparent_power", "apparent_power"),
    "var": ("reactive_power", "reactive_power"),
    "m/s²": ("acceleration", None),
    "g": ("acceleration", None),
    "°/s": ("angular_velocity", None),
}
#: the unit an input most likely has when the model's manifest does not say (by its name)
UNIT_BY_NAME = {
    "power": "W",
    "apower": "W",
    "energy": "kWh",
    "voltage": "V",
    "current": "A",
    "temperature": "°C",
    "humidity": "%",
    "illuminance": "lx",
    "co2": "ppm",
    "pressure": "hPa",
}
NUMERIC_DOMAINS = ("sensor", "number", "input_number")
SKIP_CATEGORIES = ("diagnostic", "config")
_SLUG = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class InputWanted:
    """What one pipeline input needs: its unit (from the model's manifest) and, optionally, a
    device class when the unit alone does not say (``%``: humidity or battery)."""

    unit: str | None = None
    device_class: str | None = None


@dataclass
class Pick:
    entity_id: str
    score: float
    reasons: list[str]


@dataclass
class DeviceSuggestion:
    key: str  # the learn.inputs key proposed (a slug of the device's name)
    device_name: str
    device_id: str | None
    description: str  # manufacturer, model, area
    picks: dict[str, Pick] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return round(sum(p.score for p in self.picks.values()), 2)

    @property
    def complete(self) -> bool:
        return not self.missing


class RegistrySource(Protocol):
    def entity_registry(self) -> list[dict[str, Any]]: ...
    def device_registry(self) -> list[dict[str, Any]]: ...
    def current_states(self) -> list[dict[str, Any]]: ...


def slug(text: str) -> str:
    return _SLUG.sub("_", text.lower()).strip("_") or "device"


def wanted_from_manifest_input(features: Sequence[str], units: Mapping[str, str]) -> dict[str, InputWanted]:
    """The inputs of a manifest's ``input`` (its features and their units); a feature without a
    unit gets the one its name suggests (``power``: W), if any."""
    return {name: InputWanted(unit=units.get(name) or UNIT_BY_NAME.get(name.lower())) for name in features}


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def score_entity(
    name: str, wanted: InputWanted, entity: Mapping[str, Any], state: Mapping[str, Any] | None
) -> Pick | None:
    """How well ``entity`` fits input ``name``; ``None`` when it cannot feed it."""
    entity_id = str(entity.get("entity_id", ""))
    domain = entity_id.split(".", 1)[0]
    if domain not in NUMERIC_DOMAINS or entity.get("disabled_by") or entity.get("hidden_by"):
        return None
    attributes: Mapping[str, Any] = (state or {}).get("attributes") or {}
    unit = attributes.get("unit_of_measurement")
    device_class = attributes.get("device_class") or entity.get("original_device_class")
    score = 0.0
    reasons: list[str] = []
    if wanted.unit:
        if unit == wanted.unit:
            score += 3
            reasons.append(f"unit {unit}")
        elif unit in UNITS and wanted.unit in UNITS and UNITS[unit][0] == UNITS[wanted.unit][0]:
            score += 1
            reasons.append(f"unit {unit} (convert to {wanted.unit})")
        else:
            return None
    expected = wanted.device_class or (UNITS.get(wanted.unit or "", ("", None))[1])
    if expected:
        if device_class == expected:
            score += 2
            reasons.append(f"device_class {device_class}")
        elif device_class:
            score -= 2
            reasons.append(f"device_class {device_class}, not {expected}")
    words = f"{entity_id} {entity.get('name') or ''} {entity.get('original_name') or ''}".lower()
    if name.lower() in words:
        score += 1
        reasons.append(f"name has {name!r}")
    if attributes.get("state_class") == "measurement":
        score += 0.5
        reasons.append("state_class measurement")
    current = (state or {}).get("state")
    if _is_number(current):
        score += 0.5
        reasons.append(f"now {current}")
    elif current is not None:
        reasons.append(f"now {current}")
    if entity.get("entity_category") in SKIP_CATEGORIES:
        score -= 2
        reasons.append(f"{entity.get('entity_category')} entity")
    return Pick(entity_id, round(score, 2), reasons)


def rank(
    wanted: Mapping[str, InputWanted],
    entities: Sequence[Mapping[str, Any]],
    devices: Sequence[Mapping[str, Any]],
    states: Sequence[Mapping[str, Any]],
) -> list[DeviceSuggestion]:
    """Per HA device, the best entity for each input, ranked (complete devices first)."""
    by_state = {str(s.get("entity_id")): s for s in states}
    by_device = {str(d.get("id")): d for d in devices if not d.get("disabled_by")}
    groups: dict[str, list[Mapping[str, Any]]] = {}
    known = {str(e.get("entity_id")) for e in entities}
    # states without a registry entry (YAML sensors): each its own group
    rows: list[Mapping[str, Any]] = list(entities) + [
        {"entity_id": eid} for eid in by_state if eid not in known
    ]
    for entity in rows:
        device_id = entity.get("device_id")
        if device_id is not None and str(device_id) not in by_device:
            continue  # a disabled device
        groups.setdefault(str(device_id) if device_id else f"entity:{entity['entity_id']}", []).append(entity)
    out: list[DeviceSuggestion] = []
    used_keys: dict[str, int] = {}
    for group, members in groups.items():
        device = by_device.get(group)
        if device is not None:
            name = str(device.get("name_by_user") or device.get("name") or group)
            parts = [str(device[k]) for k in ("manufacturer", "model") if device.get(k)]
            if device.get("area_id"):
                parts.append(f"area {device['area_id']}")
        else:
            entity_id = str(members[0]["entity_id"])
            state = by_state.get(entity_id) or {}
            name = str((state.get("attributes") or {}).get("friendly_name") or entity_id.split(".", 1)[-1])
            parts = ["no device"]
        device_id = str(device.get("id")) if device is not None else None
        suggestion = DeviceSuggestion(slug(name), name, device_id, ", ".join(parts))
        taken: set[str] = set()
        for input_name, spec in wanted.items():
            picks = [
                p
                for e in members
                if (p := score_entity(input_name, spec, e, by_state.get(str(e.get("entity_id"))))) is not None
                and p.entity_id not in taken
            ]
            if not picks:
                suggestion.missing.append(input_name)
                continue
            best = max(picks, key=lambda p: (p.score, -len(p.entity_id)))
            suggestion.picks[input_name] = best
            taken.add(best.entity_id)
        if not suggestion.picks:
            continue
        n = used_keys.get(suggestion.key, 0)
        used_keys[suggestion.key] = n + 1
        if n:
            suggestion.key = f"{suggestion.key}_{n + 1}"
        out.append(suggestion)
    out.sort(key=lambda s: (not s.complete, -s.score, s.device_name.lower()))
    return out


def _comment(text: str) -> str:
    return " ".join(text.split())


def suggest_yaml(
    wanted: Mapping[str, InputWanted],
    ranked: Sequence[DeviceSuggestion],
    *,
    pipeline: str | None = None,
    limit: int = 20,
) -> str:
    """The ``learn.inputs`` section for the complete suggestions (best first), the partial ones as
    comments, every pick with its score and reasons."""
    what = ", ".join(f"{n} [{w.unit or w.device_class or 'any'}]" for n, w in wanted.items())
    lines = [
        f"# edge-infer learn --suggest{f' for pipeline {pipeline}' if pipeline else ''}: inputs {what}",
        "# Ranked by fit, from Home Assistant's entity and device registries. Keep the devices this",
        "# pipeline should learn from and delete the rest; each key must be the device id the",
        "# pipeline serves (its MQTT device name), which is often but not always the name shown here.",
        "learn:",
        "  inputs:",
    ]
    complete = [s for s in ranked if s.complete][:limit]
    if not complete:
        lines[-1] = "  inputs: {}  # no Home Assistant device has an entity for every input"
    for s in complete:
        lines.append(
            f"    {s.key}:  # {_comment(s.device_name)} ({_comment(s.description)}), score {s.score:g}"
        )
        for input_name, pick in s.picks.items():
            reasons = _comment("; ".join(pick.reasons))
            lines.append(f"      {json.dumps(input_name)}: {pick.entity_id}  # {pick.score:g}: {reasons}")
    partial = [s for s in ranked if not s.complete][:limit]
    if partial:
        lines.append("# Devices with some inputs only:")
        for s in partial:
            have = ", ".join(f"{n}: {p.entity_id}" for n, p in s.picks.items())
            lines.append(f"#   {s.key} ({_comment(s.device_name)}): {have}; missing {', '.join(s.missing)}")
    return "\n".join(lines) + "\n"


def suggest_from_ha(
    source: RegistrySource, wanted: Mapping[str, InputWanted], *, pipeline: str | None = None, limit: int = 20
) -> tuple[str, list[DeviceSuggestion]]:
    """Read the registries and states from Home Assistant and return (YAML, ranked suggestions)."""
    ranked = rank(wanted, source.entity_registry(), source.device_registry(), source.current_states())
    return suggest_yaml(wanted, ranked, pipeline=pipeline, limit=limit), ranked


def suggest_for_pipeline(
    config_path: str | Path, pipeline: str, *, source: RegistrySource | None = None, limit: int = 20
) -> str:
    """``edge-infer learn --suggest -c CONFIG PIPELINE``: the YAML proposal for the pipeline's
    ``learn.inputs``, from the Home Assistant its ``learn.source.ha`` names (inside the add-on,
    without a ``learn`` section: the Supervisor's). Only ``learn.source`` is read, so it works
    before ``learn.inputs`` and ``learn.labels`` are written. The inputs and their units come
    from the pipeline's model (its manifest), or from the config when the model file does not
    exist yet. Raises :class:`edge.config.ConfigError` or :class:`edge.learn.ha_ws.HaSourceError`."""
    from edge.config import MAX_CONFIG_BYTES, ConfigError, LearnSource, parse_config, parse_yaml, read_limited
    from edge.learn.ha_ws import HaWebSocketSource, from_settings
    from edge.learn.sources import read_token
    from edge.record import recording_spec

    path = Path(config_path)
    text = read_limited(path, "", MAX_CONFIG_BYTES, "the config file").decode("utf-8", errors="replace")
    data = parse_yaml(text, str(path))
    pipes = data.get("pipelines") if isinstance(data, dict) else None
    if not isinstance(pipes, dict) or not isinstance(pipes.get(pipeline), dict):
        raise ConfigError("pipelines", f"no pipeline {pipeline!r} in {path}")
    learn_raw = pipes[pipeline].pop("learn", None)
    config = parse_config(data, str(path), path.resolve().parent, identity=str(path.resolve()))
    pcfg = config.pipelines[pipeline]
    spec = recording_spec(pipeline, pcfg, config)
    units = dict(spec.manifest.input.units) if spec.manifest is not None else {}
    wanted = wanted_from_manifest_input(list(spec.features), units)
    if source is not None:
        return suggest_from_ha(source, wanted, pipeline=pipeline, limit=limit)[0]
    key = f"pipelines.{pipeline}.learn.source"
    raw_source = learn_raw.get("source") if isinstance(learn_raw, dict) else None
    if raw_source is None:  # inside the add-on: the Supervisor's proxy and token
        with from_settings(where=key + ".ha") as supervisor:
            return suggest_from_ha(supervisor, wanted, pipeline=pipeline, limit=limit)[0]
    try:
        learn_source = LearnSource.model_validate(raw_source)
    except ValueError as exc:
        raise ConfigError(key, str(exc).splitlines()[-1] if str(exc) else "invalid") from None
    if learn_source.ha is None:
        raise ConfigError(key, "--suggest reads Home Assistant's registries: give learn.source.ha")
    if learn_source.ha.url is None:  # inside the add-on: the Supervisor's proxy and token
        with from_settings(where=key + ".ha") as supervisor:
            return suggest_from_ha(supervisor, wanted, pipeline=pipeline, limit=limit)[0]
    token = read_token(learn_source, key + ".ha")
    with HaWebSocketSource(url=learn_source.ha.url, token=token) as ha:
        return suggest_from_ha(ha, wanted, pipeline=pipeline, limit=limit)[0]
