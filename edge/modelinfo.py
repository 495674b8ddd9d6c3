"""``edge-infer models list`` (the bundled zoo) and ``edge-infer models show FILE|zoo:NAME`` (a model's
manifest and IO signature), with ONNX Runtime only."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge import zoo
from edge.manifest import ManifestError, manifest_from_metadata
from edge.runtime import file_sha256


def describe(path: Path) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta()
    manifest = manifest_from_metadata(meta.custom_metadata_map, str(path))
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "producer": meta.producer_name,
        "inputs": [{"name": i.name, "shape": i.shape, "type": i.type} for i in session.get_inputs()],
        "outputs": [{"name": o.name, "shape": o.shape, "type": o.type} for o in session.get_outputs()],
        "manifest": json.loads(manifest.to_json()) if manifest else None,
    }


def _text(info: dict[str, Any]) -> str:
    lines = [f"{info['file']}  ({info['size_bytes'] / 1024:.1f} KiB, sha256 {info['sha256'][:16]}…)"]
    for kind in ("inputs", "outputs"):
        for item in info[kind]:
            lines.append(f"  {kind[:-1]:<6} {item['name']}: {item['type']} {item['shape']}")
    manifest = info["manifest"]
    if manifest is None:
        lines.append("  no edge-infer manifest: a pipeline must give features/labels in models.<name>")
        return "\n".join(lines)
    inp = manifest["input"]
    lines.append(f"  model   {manifest['name']} v{manifest.get('version', '?')} ({manifest['task']})")
    lines.append(f"  layout  {inp['layout']}" + (f", window {inp['window']}" if inp.get("window") else ""))
    if inp.get("sample_period_s"):
        lines.append(f"  period  {inp['sample_period_s']} s")
    if inp.get("features"):
        units = inp.get("units", {})
        lines.append(
            "  features " + ", ".join(f"{f} [{units[f]}]" if f in units else f for f in inp["features"])
        )
    if manifest.get("labels"):
        lines.append("  labels  " + ", ".join(manifest["labels"]))
    for key in ("metrics", "dataset", "quantization"):
        if manifest.get(key):
            lines.append(f"  {key:<8}{json.dumps(manifest[key])}")
    return "\n".join(lines)


def _list_text(items: list[dict[str, Any]]) -> str:
    if not items:
        return "no bundled models found (the zoo is not installed)"
    lines = []
    for m in items:
        acc = ", ".join(f"{v} {a:.3f}" for v, a in m["accuracy"].items())
        shape = f"{m['layout']}"
        if m.get("window"):
            shape += f" of {m['window']}"
            if m.get("sample_period_s"):
                shape += f" x {m['sample_period_s']:g} s"
        lines.append(
            f"{m['ref']}  ({m['task']}; default variant {m['recommended']}, also "
            + ", ".join(f"{m['ref']}.{v}" for v in m["variants"])
            + ")"
        )
        lines.append(f"  inputs   {', '.join(m['features'] or [])}  [{shape}]")
        lines.append(f"  labels   {', '.join(str(x) for x in m['labels'] or [])}")
        lines.append(f"  accuracy {acc}  ({m['dataset']}, {m['split']} split)")
        lines.append(f"  card     {m['card']}")
    return "\n".join(lines)


def cli_models(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-infer models", description="Inspect model files.")
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="the bundled models (use them in a config as path: zoo:NAME)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    show = sub.add_parser("show", help="print a model's manifest and IO signature (a file or zoo:NAME)")
    show.add_argument("files", nargs="+")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    rollback = sub.add_parser(
        "rollback", help="put a pipeline's previous model back (the one edge-infer learn replaced)"
    )
    rollback.add_argument("-c", "--config", required=True, type=Path)
    rollback.add_argument("pipeline")
    args = parser.parse_args(argv)
    if args.action == "rollback":
        return _rollback(args.config, args.pipeline)
    if args.action == "list":
        items = [zoo.summary(name) for name in zoo.names()]
        print(json.dumps(items, indent=2) if args.json else _list_text(items))
        return 0
    status = 0
    results = []
    for ref in args.files:
        try:
            path = zoo.resolve(ref).path if zoo.is_zoo_ref(ref) else Path(ref)
        except zoo.ZooError as exc:
            print(f"edge-infer models: {exc}", file=sys.stderr)
            status = 2
            continue
        try:
            info = describe(path)
        except ManifestError as exc:
            print(f"edge-infer models: {exc}", file=sys.stderr)
            status = 2
            continue
        except Exception as exc:
            print(f"edge-infer models: {path}: cannot load: {exc}", file=sys.stderr)
            status = 2
            continue
        results.append(info)
        if not args.json:
            print(_text(info))
    if args.json:
        print(json.dumps(results if len(results) != 1 else results[0], indent=2))
    return status


def _rollback(config_path: Path, pipeline: str) -> int:
    """Swap the pipeline's model file with the version ``edge-infer learn`` kept; a running daemon
    reloads it (a second rollback undoes the first)."""
    from edge.config import ConfigError, load_config
    from edge.learn.deploy import DeployError, rollback

    try:
        config = load_config(config_path)
        if pipeline not in config.pipelines:
            raise ConfigError("pipelines", f"no pipeline {pipeline!r}")
        target = config.models[config.pipelines[pipeline].model].path
        kept = rollback(target)
    except (ConfigError, DeployError, OSError) as exc:
        print(f"edge-infer models rollback: {exc}", file=sys.stderr)
        return 2
    print(f"rolled back {target} (the replaced version is now {kept}; roll back again to undo)")
    return 0
