"""Headline ratios, goals, the markdown table, the plots and the files of one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GOALS = {
    "saturation_vs_ceiling": 0.8,
    "saturation_vs_naive": 3.0,
    "p50_at_1000_ms": 2.0,
    "p99_at_1000_ms": 10.0,
    "rss_3_models_mb": 150.0,
    "ready_s": 3.0,
}


def _sat(result: dict[str, Any], name: str) -> float | None:
    system = result["systems"].get(name)
    if not system or "saturation" not in system["loads"]:
        return None
    value = system["loads"]["saturation"]["throughput_msg_s"]
    return float(value) if value else None


def headline(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ratios to the ceiling measured in the same run, and the issue's goals, met or not."""
    ceiling = _sat(result, "paho-echo")
    naive = _sat(result, "aiomqtt-naive")
    daemon = _sat(result, "edge-snapshot")
    snap = result["systems"].get("edge-snapshot", {})
    at_1000 = snap.get("loads", {}).get("1000", {}).get("latency_ms", {})
    mem = result.get("memory_3_models") or {}
    head = {
        "ceiling_msg_s": ceiling,
        "naive_msg_s": naive,
        "torch_msg_s": _sat(result, "paho-torch"),
        "edge_snapshot_msg_s": daemon,
        "edge_window_msg_s": _sat(result, "edge-window"),
        "ratio_to_ceiling": round(daemon / ceiling, 3) if daemon and ceiling else None,
        "ratio_to_naive": round(daemon / naive, 2) if daemon and naive else None,
        "c_pipe_msg_s": (physical := _sat(result, "c-pipe")),  # the broker with C clients
        "ratio_to_c_pipe": round(daemon / physical, 3) if daemon and physical else None,
        "edge_snapshot_busy_cores": snap.get("loads", {}).get("saturation", {}).get("busy_cores"),
        "p50_at_1000_ms": at_1000.get("p50"),
        "p99_at_1000_ms": at_1000.get("p99"),
        "ready_s": snap.get("ready_s"),
        "rss_3_models_mb": mem.get("peak_rss_mb"),
        "ready_3_models_s": mem.get("ready_s"),
        "daemon_loaded_torch": any(
            s.get("loaded_torch") for s in result["systems"].values() if s.get("kind") == "edge-infer"
        )
        or bool(mem.get("loaded_torch")),
    }

    def check(value: Any, ok: bool) -> dict[str, Any]:
        return {"value": value, "met": None if value is None else ok}

    r_ceiling, r_naive = head["ratio_to_ceiling"], head["ratio_to_naive"]
    p50, p99, rss = head["p50_at_1000_ms"], head["p99_at_1000_ms"], head["rss_3_models_mb"]
    ready = max(x for x in (head["ready_s"], head["ready_3_models_s"], 0.0) if x is not None)
    goals = {
        "saturation >= 0.8 x ceiling": check(r_ceiling, r_ceiling is not None and r_ceiling >= 0.8),
        "saturation >= 3 x naive": check(r_naive, r_naive is not None and r_naive >= 3.0),
        "p50 at 1000 msg/s <= 2 ms": check(p50, p50 is not None and p50 <= 2.0),
        "p99 at 1000 msg/s <= 10 ms": check(p99, p99 is not None and p99 <= 10.0),
        "RSS with the zoo models <= 150 MB": check(rss, rss is not None and rss <= 150.0),
        "start to ready <= 3 s": check(ready or None, 0 < ready <= 3.0),
        "daemon never loads torch": check(not head["daemon_loaded_torch"], not head["daemon_loaded_torch"]),
    }
    return head, goals


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _cell(text: str) -> str:
    """A table cell: a ``|`` in a label (the C-client pipe) would split the row."""
    return text.replace("|", "\\|")


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    head = result["headline"]
    ceiling = head.get("ceiling_msg_s")
    lines = [
        f"# edge-infer benchmark, {result['date']} ({result['mode']})",
        "",
        f"Command: `{result['command']}`. Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, "
        f"{m['memory_gb']} GB, Python {m['python']}, {m['mosquitto']}; load average at start "
        f"{m['loadavg_start']}, at end {m.get('loadavg_end')}. Duration {result.get('duration_s')} s.",
        "",
        "| system | saturation msg/s | busy cores @sat (process / machine) | × ceiling "
        "| p50 / p99 ms @100/s | p50 / p99 ms @1000/s "
        "| p50 / p99 ms @sat | CPU s /1000 msg @sat | peak RSS MB | ready s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system in result["systems"].values():
        loads = system["loads"]
        sat = loads.get("saturation", {})
        rate = sat.get("throughput_msg_s")

        def lat(key: str, loads: dict[str, Any] = loads) -> str:
            p = loads.get(key, {}).get("latency_ms") or {}
            return f"{_fmt(p.get('p50'), 2)} / {_fmt(p.get('p99'), 2)}" if p.get("n") else "–"

        lines.append(
            f"| {_cell(system['label'])} | {_fmt(rate, 0)} | "
            f"{_fmt(sat.get('busy_cores'), 2)} / {_fmt(sat.get('machine_busy_cores'), 2)} | "
            f"{_fmt(rate / ceiling, 2) if rate and ceiling else '–'} | {lat('100')} | {lat('1000')} | "
            f"{lat('saturation')} | {_fmt(sat.get('cpu_s_per_1000'), 3)} | {_fmt(system.get('peak_rss_mb'))} "
            f"| {_fmt(system.get('ready_s'), 2)} |"
        )
    split_rows = [
        (system, system["loads"].get("saturation", {}))
        for system in result["systems"].values()
        if system["loads"].get("saturation", {}).get("cores_by_process")
    ]
    if split_rows:
        usable = m.get("usable_cpus")
        lines += [
            "",
            f"Where the {usable} usable CPUs went at saturation (each process's CPU seconds per wall "
            "second from the first send to the last answer, median of the repetitions; a sum near "
            "the usable CPUs says the machine, not the system, is the bound):",
            "",
            "| system | system cores | broker cores | publishers cores | subscriber cores | sum "
            "| broker µs /msg |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for system, sat in split_rows:
            c = sat["cores_by_process"]
            lines.append(
                f"| {_cell(system['label'])} | {_fmt(c.get('system'), 2)} | {_fmt(c.get('broker'), 2)} "
                f"| {_fmt(c.get('publishers'), 2)} | {_fmt(c.get('subscriber'), 2)} "
                f"| {_fmt(sum(c.values()), 2)} | {_fmt(sat.get('broker_us_per_msg'), 1)} |"
            )
    if result["scaling"]["devices"]:
        lines += [
            "",
            "| devices | msg/s | p50 / p99 ms | CPU s /1000 | RSS MB | peak RSS MB |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in result["scaling"]["devices"]:
            p = row["latency_ms"]
            lines.append(
                f"| {row['devices']:,} | {_fmt(row['throughput_msg_s'], 0)} | {_fmt(p.get('p50'), 2)} / "
                f"{_fmt(p.get('p99'), 2)} | {_fmt(row['cpu_s_per_1000'], 3)} | {_fmt(row['rss_mb'])} "
                f"| {_fmt(row['peak_rss_mb'])} |"
            )
    if result["scaling"]["pipelines"]:
        lines += [
            "",
            "| pipelines (a model each) | msg/s | CPU s /1000 | peak RSS MB | ready s |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in result["scaling"]["pipelines"]:
            lines.append(
                f"| {row['pipelines']} | {_fmt(row['throughput_msg_s'], 0)} "
                f"| {_fmt(row['cpu_s_per_1000'], 3)} | {_fmt(row['peak_rss_mb'])} "
                f"| {_fmt(row['ready_s'], 2)} |"
            )
    mem = result.get("memory_3_models")
    if mem:
        lines += [
            "",
            f"With the zoo models {', '.join(mem['models'])} loaded: peak RSS {_fmt(mem['peak_rss_mb'])} MB, "
            f"start to ready {_fmt(mem['ready_s'], 2)} s, torch loaded: {mem['loaded_torch']}.",
        ]
    cost = result.get("explain_cost")
    if cost and cost.get("cases"):
        from bench.explain_cost import markdown as explain_markdown

        lines += ["", *explain_markdown(cost)]
    lines += ["", "| goal | value | met |", "|---|---:|---|"]
    for goal, g in result["goals"].items():
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {goal} | {_fmt(g['value'], 2)} | {met} |")
    for note in result.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def make_plots(result: dict[str, Any], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in result["systems"].values():
        cdf = system["loads"].get("1000", {}).get("cdf_ms")
        if cdf:
            quantiles = [i / (len(cdf) - 1) for i in range(len(cdf))]
            ax.plot(cdf, quantiles, label=system["label"])
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency at 1,000 msg/s offered (ms, log)")
    ax.set_ylabel("fraction of messages")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Latency CDF")
    fig.tight_layout()
    path = stem.with_name(stem.name + "-latency-cdf.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    rows = result["scaling"]["devices"]
    if rows:
        fig, ax1 = plt.subplots(figsize=(7, 4.5))
        xs = [r["devices"] for r in rows]
        ax1.plot(xs, [r["throughput_msg_s"] or 0 for r in rows], "o-", label="throughput (msg/s)")
        ax1.set_xscale("log")
        ax1.set_xlabel("devices")
        ax1.set_ylabel("saturation throughput (msg/s)")
        ceiling = result["headline"].get("ceiling_msg_s")
        if ceiling:
            ax1.axhline(ceiling, color="grey", ls="--", label="paho echo ceiling")
        ax2 = ax1.twinx()
        ax2.plot(xs, [r["peak_rss_mb"] for r in rows], "s:", color="tab:red", label="peak RSS (MB)")
        ax2.set_ylabel("peak RSS (MB)")
        handles = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax1.legend(handles, [str(h.get_label()) for h in handles], fontsize=8, loc="lower left")
        ax1.set_title("edge-infer, snapshot pipeline: throughput and memory vs devices")
        fig.tight_layout()
        path = stem.with_name(stem.name + "-devices.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(result: dict[str, Any], out_dir: Path, *, plots: bool = True) -> list[Path]:
    """``<date>.json`` (the ``-quick`` or ``-tiny`` mode in the name), ``.md`` and the PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    day = result["date"][:19].replace(":", "")
    stem = out_dir / (day + ("" if result["mode"] == "full" else f"-{result['mode']}"))
    written = []
    if plots:
        try:
            written += make_plots(result, stem)
            result["plots"] = [p.name for p in written]
        except ImportError:
            result["notes"].append("plots skipped: matplotlib is not installed")
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown(result))
    return [json_path, md_path, *written]
