"""What a model's holdout said, shown in Home Assistant: the quality record and its entities.

A **quality record** describes one model file: the holdout metric it was judged on (name,
value, ``n``; accuracy and macro-F1 for a classifier, MAE for a regression), the training
examples per class, the holdout confusion matrix (labels and counts, rows true, columns
predicted), when it was trained (UTC ISO) and the span of the data it learned from. Where a
figure is not known it is left out, never made up.

* ``edge-infer learn`` writes it (:func:`learn_record`) as the sidecar ``NAME.onnx.quality.json``
  beside the model it deploys (edge/learn/deploy.py keeps the previous one beside
  ``NAME.onnx.previous`` and swaps it back on rollback, as it does the card).
* A bundled zoo model's record comes from the ``report.json`` shipped beside it
  (:func:`zoo_record`): its holdout metrics and confusion matrix for that variant, its creation
  time; the zoo reports carry no per-class training counts, so those are left out.

A record whose ``model_sha256`` is not the file's (a model copied over by hand beside an old
sidecar) is not used: it describes another model.

:class:`QualityBook` loads the records of the loaded models (at start and after every reload,
off the event loop), renders each confusion matrix once per model file (edge/png.py), and gives
bridge/info's ``models`` map its quality fields. :func:`quality_components` are the bridge
device's entities per model: "<model> training examples", "<model> trained" (a timestamp: Home
Assistant shows the age) and the MQTT ``image`` "<model> confusion matrix" (the retained PNG on
:func:`confusion_topic`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge.png import render_confusion

log = logging.getLogger("edge.quality")

SIDECAR_SUFFIX = ".quality.json"
FORMAT = 1
METRICS = ("accuracy", "macro_f1", "mae")
MAX_RECORD_BYTES = 1 << 20
KINDS = ("examples", "trained", "confusion")  # the quality entities per model


class QualityError(ValueError):
    """A quality record that cannot be used (the message names the file and the key)."""


def sidecar_path(model: Path) -> Path:
    return model.with_name(model.name + SIDECAR_SUFFIX)


def utc_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Confusion:
    labels: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted class

    @property
    def n(self) -> int:
        return sum(sum(row) for row in self.counts)


@dataclass(frozen=True)
class QualityRecord:
    source: str  # "learn" or "zoo"
    metric: str | None = None  # the metric the model was judged on (one of METRICS)
    value: float | None = None
    n: int | None = None  # holdout examples
    scores: Mapping[str, float] = field(default_factory=dict)  # accuracy, macro_f1 or mae
    examples: int | None = None  # training examples
    examples_per_class: Mapping[str, int] | None = None
    confusion: Confusion | None = None
    trained_at: str | None = None
    span: Mapping[str, str] | None = None  # {"start", "end"} of the data learned from
    model_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "source": self.source}
        if self.metric is not None:
            out["metric"] = {"name": self.metric, "value": self.value, "n": self.n}
        if self.scores:
            out["scores"] = dict(self.scores)
        if self.examples is not None:
            out["examples"] = self.examples
        if self.examples_per_class is not None:
            out["examples_per_class"] = dict(self.examples_per_class)
        if self.confusion is not None:
            out["confusion"] = {
                "labels": list(self.confusion.labels),
                "counts": [list(r) for r in self.confusion.counts],
            }
        if self.trained_at is not None:
            out["trained_at"] = self.trained_at
        if self.span is not None:
            out["span"] = dict(self.span)
        if self.model_sha256 is not None:
            out["model_sha256"] = self.model_sha256
        return out

    def info(self) -> dict[str, Any]:
        """The quality fields of this model in bridge/info's ``models`` map."""
        return {
            "metric": {"name": self.metric, "value": self.value, "n": self.n} if self.metric else None,
            "examples": self.examples,
            "examples_per_class": dict(self.examples_per_class) if self.examples_per_class else None,
            "trained_at": self.trained_at,
            "data_span": dict(self.span) if self.span else None,
            "confusion": self.confusion is not None,
            "quality_source": self.source,
        }


# ------------------------------------------------------------------------------ reading records


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise QualityError(f"{where}: a count must be a whole number >= 0, not {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise QualityError(f"{where}: must be a finite number, not {value!r}")
    return float(value)


def _timestamp(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise QualityError(f"{where}: must be an ISO 8601 time, not {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise QualityError(f"{where}: {value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise QualityError(f"{where}: {value!r} has no time zone")
    return parsed.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_confusion(data: Any, where: str) -> Confusion:
    if not isinstance(data, dict):
        raise QualityError(f"{where}: must be an object with labels and counts")
    labels = data.get("labels")
    counts = data.get("counts")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise QualityError(f"{where}.labels: must be a list of class names")
    if not isinstance(counts, list) or len(counts) != len(labels):
        raise QualityError(f"{where}.counts: must be {len(labels)} rows (one per label)")
    rows = []
    for i, row in enumerate(counts):
        if not isinstance(row, list) or len(row) != len(labels):
            raise QualityError(f"{where}.counts[{i}]: must hold {len(labels)} counts")
        rows.append(tuple(_count(c, f"{where}.counts[{i}]") for c in row))
    return Confusion(tuple(labels), tuple(rows))


def parse_record(data: Any, where: str) -> QualityRecord:
    """A record from its JSON form; :class:`QualityError` names ``where`` and the key."""
    if not isinstance(data, dict):
        raise QualityError(f"{where}: a quality record is a JSON object")
    if data.get("format") != FORMAT:
        raise QualityError(f"{where}.format: {data.get('format')!r} is not a known format ({FORMAT})")
    source = data.get("source")
    if not isinstance(source, str):
        raise QualityError(f"{where}.source: must be a string")
    metric = value = n = None
    if (m := data.get("metric")) is not None:
        if not isinstance(m, dict) or m.get("name") not in METRICS:
            raise QualityError(f"{where}.metric.name: must be one of {', '.join(METRICS)}")
        metric = str(m["name"])
        value = _number(m.get("value"), f"{where}.metric.value")
        n = _count(m.get("n"), f"{where}.metric.n") if m.get("n") is not None else None
    scores_in = data.get("scores") or {}
    if not isinstance(scores_in, dict):
        raise QualityError(f"{where}.scores: must be an object")
    scores = {k: _number(v, f"{where}.scores.{k}") for k, v in scores_in.items() if k in METRICS}
    per_class = None
    if (epc := data.get("examples_per_class")) is not None:
        if not isinstance(epc, dict):
            raise QualityError(f"{where}.examples_per_class: must map class names to counts")
        per_class = {str(k): _count(v, f"{where}.examples_per_class.{k}") for k, v in epc.items()}
    examples = data.get("examples")
    examples = _count(examples, f"{where}.examples") if examples is not None else None
    confusion = parse_confusion(data["confusion"], f"{where}.confusion") if data.get("confusion") else None
    trained = _timestamp(data["trained_at"], f"{where}.trained_at") if data.get("trained_at") else None
    span = None
    if (s := data.get("span")) is not None:
        if not isinstance(s, dict):
            raise QualityError(f"{where}.span: must be an object with start and end")
        span = {k: _timestamp(s.get(k), f"{where}.span.{k}") for k in ("start", "end")}
    sha = data.get("model_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise QualityError(f"{where}.model_sha256: must be 64 hex digits")
    return QualityRecord(source, metric, value, n, scores, examples, per_class, confusion, trained, span, sha)


def read_sidecar(path: Path) -> QualityRecord:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_RECORD_BYTES + 1)
    except OSError as exc:
        raise QualityError(f"{path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECORD_BYTES:
        raise QualityError(f"{path}: larger than {MAX_RECORD_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise QualityError(f"{path}: not JSON ({exc})") from None
    return parse_record(data, str(path))


def write_sidecar(path: Path, record: QualityRecord) -> Path:
    path.write_text(json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def zoo_record(model: Path) -> QualityRecord | None:
    """The record of a bundled zoo file (``models/NAME/NAME.VARIANT.onnx``) from the
    ``report.json`` beside it, or ``None`` when ``model`` is not one or the report says nothing
    about that variant's holdout."""
    from edge import zoo

    try:
        root = zoo.models_dir().resolve()
        folder = model.parent.resolve()  # the file itself may be a link (zoo:appliance_open_set)
    except OSError:
        return None
    if folder.parent != root:
        return None
    name = folder.name
    variant = model.name.removeprefix(name + ".").removesuffix(".onnx")
    if model.name != f"{name}.{variant}.onnx":
        return None
    where = f"{folder / 'report.json'}"
    try:
        report = zoo.report(name)
    except (OSError, ValueError):
        return None
    metrics = (report.get("metrics") or {}).get(variant)
    if not isinstance(metrics, dict):
        return None
    files = (report.get("files") or {}).get(variant) or {}
    sha = files.get("sha256") if isinstance(files, dict) else None
    scores = {
        k: _number(metrics[k], f"{where}.metrics.{variant}.{k}")
        for k in METRICS
        if metrics.get(k) is not None
    }
    n = metrics.get("n")
    metric = "accuracy" if "accuracy" in scores else ("mae" if "mae" in scores else None)
    confusion = None
    labels = report.get("labels")
    if metrics.get("confusion_matrix") is not None and isinstance(labels, list):
        confusion = parse_confusion(
            {"labels": labels, "counts": metrics["confusion_matrix"]}, f"{where}.metrics.{variant}"
        )
    sizes = (report.get("dataset") or {}).get("sizes") or {}
    examples = sizes.get("train") if isinstance(sizes, dict) else None
    created = report.get("created")
    if metric is None and confusion is None and not created:
        return None  # nothing honest to show (an anomaly model's report: false alarms per day)
    return QualityRecord(
        "zoo",
        metric,
        scores.get(metric) if metric else None,
        _count(n, f"{where}.metrics.{variant}.n") if n is not None else None,
        scores,
        _count(examples, f"{where}.dataset.sizes.train") if examples is not None else None,
        None,  # the zoo's reports give no per-class training counts
        confusion,
        _timestamp(created, f"{where}.created") if created else None,
        None,
        sha if isinstance(sha, str) else None,
    )


def load_record(model: Path, sha256: str | None = None) -> QualityRecord | None:
    """The record of the model file ``model``: its sidecar, else (a bundled model) its zoo
    report, else ``None``. :class:`QualityError` for a sidecar that cannot be used, or one that
    describes another file than the one with ``sha256``."""
    side = sidecar_path(model)
    record = read_sidecar(side) if side.is_file() else zoo_record(model)
    if record is None:
        return None
    if sha256 is not None and record.model_sha256 is not None and record.model_sha256 != sha256:
        raise QualityError(
            f"{side if side.is_file() else model}: the quality record describes the model with sha256 "
            f"{record.model_sha256[:12]}, not {model} ({sha256[:12]}): not used"
        )
    return record


# ------------------------------------------------------------------------------ learn's record


def confusion_counts(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> Confusion:
    index = {c: i for i, c in enumerate(classes)}
    counts = [[0] * len(classes) for _ in classes]
    for t, p in zip(truth, predicted, strict=True):
        if t in index and p in index:
            counts[index[t]][index[p]] += 1
    return Confusion(tuple(classes), tuple(tuple(r) for r in counts))


def learn_record(
    *,
    metric: str,
    scores: Mapping[str, Any],
    truth: Sequence[str],
    predicted: Sequence[str],
    classes: Sequence[str],
    train_counts: Mapping[str, int],
    span: Mapping[str, str],
    model_sha256: str | None,
    trained_at: float,
) -> QualityRecord:
    """The record ``learn`` writes beside a model it deploys: the holdout it was judged on."""
    chosen = {k: float(scores[k]) for k in METRICS if isinstance(scores.get(k), int | float)}
    per_class = {c: int(train_counts.get(c, 0)) for c in classes}
    return QualityRecord(
        "learn",
        metric,
        chosen.get(metric),
        len(truth),
        chosen,
        sum(per_class.values()),
        per_class,
        confusion_counts(truth, predicted, classes),
        utc_iso(trained_at),
        {"start": _timestamp(span["start"], "span.start"), "end": _timestamp(span["end"], "span.end")},
        model_sha256,
    )


# ------------------------------------------------------------------------------ in the daemon


def segment(model: str) -> str:
    """A model name as one topic segment and id part."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", model) or "_"


def confusion_topic(info_topic: str, model: str) -> str:
    """``<base>/bridge/models/<model>/confusion`` beside ``<base>/bridge/info``."""
    return info_topic.removesuffix("/info") + f"/models/{segment(model)}/confusion"


def confusion_title(model: str, record: QualityRecord) -> str:
    n = record.confusion.n if record.confusion is not None else 0
    return f"{model} holdout (n={n})"


@dataclass
class _Entry:
    key: tuple[str, str]  # (path, sha256) of the model file it describes
    record: QualityRecord | None
    png: bytes | None


class QualityBook:
    """The quality records of the loaded models and their rendered confusion matrices."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.errors = 0  # records that could not be used (logged with the file and the key)

    def refresh(self, models: Mapping[str, tuple[Path, str]]) -> list[str]:
        """Load the records of ``models`` (name -> (path, sha256)); a model whose file did not
        change keeps what it had. Returns the models whose image changed (gone ones included).
        File reads and rendering: call it off the event loop."""
        changed: list[str] = []
        entries: dict[str, _Entry] = {}
        for name, (path, sha) in models.items():
            key = (str(path), sha)
            old = self._entries.get(name)
            if old is not None and old.key == key:
                entries[name] = old
                continue
            record: QualityRecord | None = None
            png = None
            try:
                record = load_record(path, sha)
                if record is not None and record.confusion is not None:
                    png = render_confusion(
                        record.confusion.labels, record.confusion.counts, confusion_title(name, record)
                    )
            except (QualityError, ValueError, OSError) as exc:
                self.errors += 1
                record = png = None
                log.warning("model %s: quality record not used: %s", name, exc)
            entries[name] = _Entry(key, record, png)
            if old is None or old.png != png:
                changed.append(name)
        changed += [name for name, e in self._entries.items() if name not in entries and e.png is not None]
        self._entries = entries
        return changed

    def record(self, name: str) -> QualityRecord | None:
        entry = self._entries.get(name)
        return entry.record if entry is not None else None

    def png(self, name: str) -> bytes | None:
        entry = self._entries.get(name)
        return entry.png if entry is not None else None

    def info(self, name: str) -> dict[str, Any]:
        record = self.record(name)
        if record is None:
            return {"examples_per_class": None, "trained_at": None, "metric": None}
        return record.info()

    def entities(self) -> dict[str, tuple[str, ...]]:
        """Model -> the quality entities its record has something for (:data:`KINDS`); a model
        whose record gives none of them is left out."""
        out: dict[str, tuple[str, ...]] = {}
        for name, e in self._entries.items():
            r = e.record
            if r is None:
                continue
            has = {"examples": r.examples is not None, "trained": r.trained_at is not None,
                   "confusion": e.png is not None}  # fmt: skip
            kinds = tuple(k for k in KINDS if has[k])
            if kinds:
                out[name] = kinds
        return out


def quality_components(
    uid: str,
    eid: str,
    info_topic: str,
    model: str,
    kinds: Sequence[str] = KINDS,
    *,
    key: str | None = None,
) -> dict[str, Any]:
    """The bridge device's quality entities of one model, those of ``kinds``: "examples" (the
    sensor "training examples": the total, per class as attributes), "trained" (a timestamp
    sensor) and "confusion" (the "confusion matrix" MQTT ``image``: raw PNG bytes on
    :func:`confusion_topic`). ``key`` prefixes their component keys (default ``model_<model>``,
    as the bridge's version and accuracy sensors)."""
    key = key or f"model_{segment(model)}"
    entry = "value_json.get('models', {}).get(" + json.dumps(model) + ", {})"
    words = re.sub(r"[_\-.]+", " ", model).strip()
    label = words[:1].upper() + words[1:] if words else model
    common = {"state_topic": info_topic, "entity_category": "diagnostic"}
    cmps: dict[str, Any] = {}
    if "examples" in kinds:
        cmps[f"{key}_examples"] = {
            "platform": "sensor",
            "name": f"{label} training examples",
            "unique_id": f"{uid}_{key}_examples",
            "default_entity_id": f"sensor.{eid}_{key}_examples",
            "unit_of_measurement": "examples",
            "state_class": "measurement",
            "icon": "mdi:database-outline",
            "value_template": "{% set e = " + entry + ".get('examples') %}{{ e if e is number else 'None' }}",
            "json_attributes_topic": info_topic,
            "json_attributes_template": "{{ (" + entry + ".get('examples_per_class') or {}) | tojson }}",
            **common,
        }
    if "trained" in kinds:
        cmps[f"{key}_trained"] = {
            "platform": "sensor",
            "name": f"{label} trained",
            "unique_id": f"{uid}_{key}_trained",
            "default_entity_id": f"sensor.{eid}_{key}_trained",
            "device_class": "timestamp",
            "icon": "mdi:school-outline",
            "value_template": "{{ " + entry + ".get('trained_at') or 'None' }}",
            **common,
        }
    if "confusion" in kinds:
        cmps[f"{key}_confusion"] = {
            "platform": "image",
            "name": f"{label} confusion matrix",
            "unique_id": f"{uid}_{key}_confusion",
            "default_entity_id": f"image.{eid}_{key}_confusion",
            "image_topic": confusion_topic(info_topic, model),
            "content_type": "image/png",
            "entity_category": "diagnostic",
        }
    return cmps
