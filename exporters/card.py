"""The model card: a markdown rendering of a verify report and the model's manifest."""

from __future__ import annotations

from typing import Any

from edge.manifest import Manifest
from exporters import plots


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _plot(alt: str, name: str) -> str:
    """A plot beside the card, or why it is not there (matplotlib is optional: exporters/plots.py)."""
    return f"![{alt}]({name})" if plots.available() else f"_{alt}: {plots.MISSING_NOTE}_"


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def render_card(report: dict[str, Any], manifest: Manifest) -> str:
    task = report["task"]
    lines = [f"# Model card: {manifest.name} {manifest.version}", ""]
    if manifest.description:
        lines += [manifest.description, ""]
    files = report["files"]
    recommended = report["recommended"]
    lines += [
        f"- **Task**: {task}",
        "- **Files**: " + ", ".join(f"`{f['path']}` ({_size(f['size_bytes'])})" for f in files.values()),
        f"- **Recommended file on the measuring machine**: `{files[recommended]['path']}` ({recommended})",
        f"- **Created**: {report['created']} with edge-infer {report['tools']['edge_infer']}, "
        f"torch {report['tools']['torch']}, onnxruntime {report['tools']['onnxruntime']}",
        "",
        "## Input and output",
        "",
    ]
    inp = manifest.input
    lines.append(
        f"- Input `{inp.name}`: layout **{inp.layout}**, shape `{_shape(manifest)}` (batch axis dynamic)"
    )
    if inp.features:
        units = ", ".join(f"{f} [{inp.units.get(f, '?')}]" for f in inp.features)
        lines.append(f"- Features, in tensor order: {units}")
    if inp.window:
        period = f", one every {inp.sample_period_s:g} s" if inp.sample_period_s else ""
        lines.append(f"- Window: the last {inp.window} samples, oldest first{period}")
    if inp.grid:
        lines.append(f"- Grid: {inp.grid[0]} x {inp.grid[1]} frame, units {inp.units}")
    norm = (
        "each window z-normalised by its own mean and std"
        if manifest.normalisation.per_window
        else ("per-feature z-score with training-set statistics")
    )
    if (manifest.provenance.get("graph_normalisation") or {}).get("kind") == "per_window_level":
        norm += ", plus each channel's log level as a second channel"
    lines.append(f"- Normalisation: inside the graph ({norm}); feed raw readings")
    out = manifest.output
    if task == "classification":
        lines.append(f"- Output `{out.name}`: {out.kind}, index i = class i:")
        lines += [f"  {i}. `{name}`" for i, name in enumerate(manifest.labels)]
    else:
        lines.append(f"- Output `{out.name}`: {out.kind}" + (f" in {out.unit}" if out.unit else ""))
    ds = report["dataset"]
    lines += ["", "## Data", ""]
    lines.append(f"- Data set: **{ds.get('name')}** ({ds.get('source', '')})")
    lines.append(f"- Split: {ds.get('split')}; sizes {ds.get('sizes')}")
    for key in ("note", "simulator", "test_groups"):
        if key in ds:
            lines.append(f"- {key.replace('_', ' ').capitalize()}: {ds[key]}")
    lines += ["", "## Results on the test split", ""]
    metrics = report["metrics"]
    order = [k for k in ("pytorch", "fp32", "int8") if k in metrics]
    if task == "classification":
        lines += ["| model | accuracy | macro-F1 | ECE | NLL | n |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {k} | {_fmt(metrics[k]['accuracy'])} | {_fmt(metrics[k]['macro_f1'])} | "
            f"{_fmt(metrics[k].get('ece', ''))} | {_fmt(metrics[k].get('nll', ''))} | {metrics[k]['n']} |"
            for k in order
        ]
        if "baseline" in report:
            b = report["baseline"]
            lines.append(f"| baseline: {b['name']} | {_fmt(b['accuracy'])} | | | | {metrics['fp32']['n']} |")
    else:
        lines += ["| model | MAE | RMSE | n |", "|---|---|---|---|"]
        lines += [
            f"| {k} | {_fmt(metrics[k]['mae'])} | {_fmt(metrics[k]['rmse'])} | {metrics[k]['n']} |"
            for k in order
        ]
    if "window_sweep" in report:
        sweep = report["window_sweep"]
        lines += ["", "### Window length (last T samples of each test series)", "", sweep["note"] + ".", ""]
        lines += ["| T | minutes | fp32 | int8 | MiniRocket |", "|---|---|---|---|---|"]
        for row in sweep["rows"]:
            lines.append(
                f"| {row['window']} | {row.get('minutes', '')} | {_fmt(row['fp32'], 2)} | "
                f"{_fmt(row.get('int8', ''), 2)} | {_fmt(row.get('minirocket', ''), 2)} |"
            )
    if "int8_loss_points" in report:
        lines += [
            "",
            f"int8 vs fp32: {report['int8_loss_points']:+.2f} "
            + ("accuracy points lost" if task == "classification" else "MAE added"),
        ]
    best = "int8" if "int8" in metrics else "fp32"
    if task == "classification":
        lines += [
            "",
            f"### Per class ({best})",
            "",
            "| class | precision | recall | support |",
            "|---|---|---|---|",
        ]
        for name, c in metrics[best]["per_class"].items():
            lines.append(f"| {name} | {_fmt(c['precision'], 3)} | {_fmt(c['recall'], 3)} | {c['support']} |")
        lines += ["", _plot("confusion matrix", "confusion_matrix.png"), ""]
    if "calibration" in report:
        lines += _calibration(report["calibration"])
    if "ood" in report:
        from exporters.ood import served_ood_markdown

        lines += served_ood_markdown(report["ood"])
    if "resamples" in report:
        from exporters.resamples import markdown

        lines += ["", markdown(report["resamples"])]
    lines += ["", "## Parity", "", "| check | max abs diff | argmax agreement | |", "|---|---|---|---|"]
    for key, p in report["parity"].items():
        note = p.get("method", "")
        lines.append(
            f"| {key.replace('_', ' ')} | {p['max_abs_diff']:.2e} | "
            f"{_fmt(p.get('argmax_agreement', ''))} | {note} |"
        )
    if report.get("batch_independence"):
        lines += [
            "",
            "Batch independence (a row alone vs the same row inside batches of "
            + " and ".join(str(b) for b in next(iter(report["batch_independence"].values()))["batches"])
            + " other test rows):",
            "",
            "| file | rows x batches | max abs diff | argmax changes | independent |",
            "|---|---|---|---|---|",
        ]
        for key, bi in report["batch_independence"].items():
            lines.append(
                f"| {key} | {bi['checks']} | {bi['max_abs_diff']:.2e} | {bi['argmax_changes']} | "
                f"{'yes' if bi['independent'] else 'NO'} (tolerance {bi['tolerance']:g}) |"
            )
    lines += ["", "## Size and latency (single thread, this machine)", ""]
    lines += ["| file | size | batch 1 median | batch 32 median |", "|---|---|---|---|"]
    lat = report["latency_single_thread"]
    for key, f in files.items():
        lines.append(
            f"| {key} | {_size(f['size_bytes'])} | {lat[key]['batch_1']['median_ms']:.3f} ms | "
            f"{lat[key]['batch_32']['median_ms']:.3f} ms |"
        )
    if "int8" in files:
        ratio = files["int8"]["size_bytes"] / files["fp32"]["size_bytes"]
        lines += ["", f"int8 file is {100 * ratio:.0f} % of fp32."]
        q = files["int8"].get("quantization", {})
        if q:
            lines += [
                "",
                "Quantization: "
                + ", ".join(
                    f"{k}={v}"
                    for k, v in q.items()
                    if k
                    in ("mode", "format", "per_channel", "reduce_range", "activation_type", "weight_type")
                ),
            ]
    if "int8_dynamic" in report:
        lines += _dynamic(report)
    lines.append(f"\nMachine: {report['machine']['processor']} ({report['machine']['platform']}).")
    imp = report["importance"]
    lines += [
        "",
        "## Why it predicts what it does",
        "",
        f"Permutation importance on the test split (fp32): drop of {imp['metric']} when one input "
        f"group is shuffled across samples ({imp['repeats']} repeats; baseline {imp['baseline']:.4f}).",
        "",
    ]
    for kind, drops in imp.items():
        if not isinstance(drops, dict):
            continue
        ranked = sorted(drops.items(), key=lambda kv: -kv[1])
        lines += [f"| {kind.replace('_', ' ')} | drop |", "|---|---|"]
        lines += [f"| {name} | {drop:+.4f} |" for name, drop in ranked[:16]]
        lines.append("")
    lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]]
    for key in ("limitations", "rebuild"):
        if key in report:
            lines += ["", f"## {key.capitalize()}", "", str(report[key])]
    lines += ["", _plot("training curves", "training_curves.png"), ""]
    return "\n".join(lines)


def _calibration(cal: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Calibration",
        "",
        f"{cal['method']}. Held-out data: {cal['fitted_on']}. Test split figures (ECE: "
        f"{cal['bins']} equal-width bins of the top-class confidence):",
        "",
        "| file | temperature | ECE before | ECE after | NLL before | NLL after "
        "| mean confidence before / after | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, c in cal["files"].items():
        b, a = c["test_before"], c["test_after"]
        lines.append(
            f"| {key} | {c['temperature']:.3f} | {b['ece']:.4f} | {a['ece']:.4f} | {b['nll']:.4f} | "
            f"{a['nll']:.4f} | {b['mean_confidence']:.3f} / {a['mean_confidence']:.3f} | "
            f"{a['accuracy']:.4f} |"
        )
    lines += [
        "",
        "On the held-out data the temperature was fitted on: "
        + "; ".join(
            f"{key} ECE {c['held_out_before']['ece']:.4f} -> {c['held_out_after']['ece']:.4f}, "
            f"NLL {c['held_out_before']['nll']:.4f} -> {c['held_out_after']['nll']:.4f}"
            for key, c in cal["files"].items()
        )
        + ".",
    ]
    lines += [
        "",
        "Sampling noise: a perfectly calibrated model with these confidences would show on this test "
        "split an ECE of "
        + "; ".join(
            f"{key} {c['ece_if_perfectly_calibrated']['mean']:.4f} on average "
            f"(90th percentile {c['ece_if_perfectly_calibrated']['p90']:.4f})"
            for key, c in cal["files"].items()
        )
        + " (each sample right with probability equal to its confidence, "
        f"{next(iter(cal['files'].values()))['ece_if_perfectly_calibrated']['draws']} draws).",
    ]
    for key, c in cal["files"].items():
        if "not_applied" in c:
            na = c["not_applied"]
            lines += [
                "",
                f"{key}: the temperature fitted on the held-out data, {na['temperature']:.3f}, is not "
                f"applied; applied, the test ECE would be {na['test_ece_if_applied']:.4f} and the NLL "
                f"{na['test_nll_if_applied']:.4f}.",
            ]
    if cal.get("note"):
        lines += ["", cal["note"]]
    lines += ["", _plot("reliability diagram", "reliability.png")]
    return lines


def _dynamic(report: dict[str, Any]) -> list[str]:
    d = report["int8_dynamic"]
    lat = report["latency_single_thread"]
    files, metrics, bi = report["files"], report["metrics"], report.get("batch_independence", {})
    lines = [
        "",
        "### int8: static (this file) vs dynamic (the scheme it replaces)",
        "",
        "Same fp32 weights, same latency run. Dynamic int8 picks activation scales from each batch, "
        "so its answers depend on batch mates; accuracy at batch 1 (one device alone).",
        "",
        "| int8 scheme | accuracy | size | batch 1 median | batch 32 median | batch-independent |",
        "|---|---|---|---|---|---|",
    ]
    key = "int8_dynamic"
    rows = [
        (
            "static QDQ (served)",
            "int8",
            metrics["int8"]["accuracy"],
            files["int8"]["size_bytes"],
            bi.get("int8"),
        ),
        ("dynamic", key, d["accuracy"], d["size_bytes"], d.get("batch_independence")),
    ]
    for label, lk, acc, size, ind in rows:
        ind_txt = (
            ""
            if ind is None
            else (
                f"{'yes' if ind['independent'] else 'no'} (max diff {ind['max_abs_diff']:.2e}, "
                f"{ind['argmax_changes']} label changes)"
            )
        )
        lines.append(
            f"| {label} | {_fmt(acc)} | {_size(size)} | {lat[lk]['batch_1']['median_ms']:.3f} ms | "
            f"{lat[lk]['batch_32']['median_ms']:.3f} ms | {ind_txt} |"
        )
    if d.get("note"):
        lines += ["", d["note"]]
    return lines


def _shape(manifest: Manifest) -> str:
    dims = ["batch", *[str(d) for d in manifest.input.sample_shape()]]
    return "[" + ", ".join(dims) + "]"
