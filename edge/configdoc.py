"""Generates the key-by-key reference of docs/configuration.md from the config models.

``python -m edge.configdoc > /dev/null`` checks nothing; ``python -m edge.configdoc --write`` rewrites
the generated part of docs/configuration.md, and a test fails when the file is out of date.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from edge import config as c

BEGIN = "<!-- BEGIN GENERATED REFERENCE (python -m edge.configdoc --write) -->"
END = "<!-- END GENERATED REFERENCE -->"

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("(top level)", c.Config),
    ("mqtt", c.MqttConfig),
    ("mqtt.tls", c.TlsConfig),
    ("runtime", c.RuntimeConfig),
    ("models.<name>", c.ModelConfig),
    ("pipelines.<name>", c.PipelineConfig),
    *[
        section
        for profile, source in c.FAMILY_SOURCES.items()
        for section in (
            (f"pipelines.<name>.source (profile: {profile})", source),
            *(
                [(f"pipelines.<name>.source.options (profile: {profile})", c.FAMILY_OPTIONS[profile])]
                if profile != "json"
                else []
            ),
        )
    ],
    ("pipelines.<name>.features (type: snapshot)", c.SnapshotFeatures),
    ("pipelines.<name>.features (type: window)", c.WindowFeatures),
    ("pipelines.<name>.output", c.OutputConfig),
    ("pipelines.<name>.output.explain", c.ExplainConfig),
    ("pipelines.<name>.homeassistant", c.EntityConfig),
    ("pipelines.<name>.learn", c.LearnConfig),
    ("pipelines.<name>.learn.source", c.LearnSource),
    ("pipelines.<name>.learn.source.ha", c.LearnHaSource),
    ("pipelines.<name>.learn.source.statistics", c.LearnStatistics),
    ("pipelines.<name>.learn.labels", c.LearnLabels),
    ("pipelines.<name>.learn.labels.teacher", c.TeacherRule),
    ("pipelines.<name>.learn.exclude[]", c.ExcludeSpan),
    ("pipelines.<name>.learn.gate", c.LearnGate),
    ("pipelines.<name>.learn.train", c.LearnTrain),
    ("pipelines.<name>.learn.anomaly", c.LearnAnomaly),
    ("pipelines.<name>.learn.schedule", c.LearnSchedule),
    ("limits", c.LimitsConfig),
    ("dead_letter", c.DeadLetterConfig),
    ("homeassistant", c.HomeAssistantConfig),
    ("metrics", c.MetricsConfig),
    ("cluster", c.ClusterConfig),
    ("reload", c.ReloadConfig),
    ("state", c.StateConfig),
    ("corrections", c.CorrectionsConfig),
]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {_type_name(args[1])}" if len(args) == 2 else "map"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    name = getattr(annotation, "__name__", str(annotation))
    return {
        "SecretStr": "secret",
        "Path": "path",
        "str": "string",
        "int": "integer",
        "float": "number",
        "bool": "boolean",
    }.get(name, name)


def _default(info: FieldInfo) -> str:
    if info.default is not PydanticUndefined:
        value = info.default
        if value is None:
            return "—"
        if hasattr(value, "value"):
            value = value.value
        return f"`{value}`"
    if info.default_factory is not None:
        if isinstance(info.default_factory, type):
            return "(section defaults)"
        made = info.default_factory()  # type: ignore[call-arg]
        return f"`{made}`" if isinstance(made, list) and made else "`{}`"
    return "**required**"


def reference() -> str:
    parts = []
    for title, model in SECTIONS:
        parts.append(f"### `{title}`\n")
        doc = next(iter((model.__doc__ or "").strip().splitlines()), "")
        if doc:
            parts.append(f"{doc}\n")
        parts.append("| key | type | default | meaning |\n| --- | --- | --- | --- |")
        for name, info in model.model_fields.items():
            meaning = (info.description or "").replace("|", "\\|")
            parts.append(f"| `{name}` | {_type_name(info.annotation)} | {_default(info)} | {meaning} |")
        parts.append("")
    return "\n".join(parts)


def render(existing: str) -> str:
    head, _, rest = existing.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n\n{reference()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    path = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    current = path.read_text()
    updated = render(current)
    if "--write" in argv:
        path.write_text(updated)
        return 0
    if updated != current:
        print("docs/configuration.md is out of date: run python -m edge.configdoc --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
