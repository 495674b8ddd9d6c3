"""``edge-infer learn -c CONFIG PIPELINE``: history, table, split, train (own process), gate, deploy.

This process never imports torch: training, export, quantization and
verification run in a child process (``python -m exporters train``), niced,
with its threads bounded and stopped when its resident memory passes
``learn.train.memory_mb``. The candidate it writes is scored here, with ONNX
Runtime, on the holdout block against the trivial baseline and the deployed
model; only a candidate that beats both by ``learn.gate.margin`` is promoted.

Exit status: 0 promoted; 1 kept (the gate said no, reason printed); 2 config
or source problem; 3 the train extra is missing; 4 too little data (what is
missing printed); 5 training failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from edge.config import Config, ConfigError, LearnConfig, WindowFeatures, load_config
from edge.learn import deploy
from edge.learn.gate import NotComparable, Verdict, decide, majority_baseline, onnx_predict, scores
from edge.learn.history import HistorySource, SourceError
from edge.learn.sources import RecordTable, close_source, describe_source, open_source
from edge.learn.split import DAY, TooLittleData, check_enough, class_order, time_split, window_span_s
from edge.learn.statistics import examples_from_statistics, fill_from_statistics, statistics_entities
from edge.learn.statistics import summary as statistics_summary
from edge.learn.table import NORMAL, Table, build_table, label_entities, pipeline_for, table_from_rows
from edge.quality import learn_record, write_sidecar
from edge.runtime import ModelLoadError, file_sha256

log = logging.getLogger("edge.learn")

EXIT_PROMOTED, EXIT_KEPT, EXIT_CONFIG, EXIT_NO_TORCH, EXIT_TOO_LITTLE, EXIT_TRAIN_FAILED = 0, 1, 2, 3, 4, 5


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class LearnResult:
    status: int
    message: str
    report: dict[str, Any] = field(default_factory=dict)


def work_dir(name: str, learn: LearnConfig, config_path: Path) -> Path:
    return learn.work_dir or config_path.resolve().parent / "learn" / name


def expected_classes(learn: LearnConfig) -> list[str]:
    labels = learn.labels
    if labels is None:
        return []
    if labels.teacher is not None:
        return [labels.teacher.off, labels.teacher.on]
    if labels.map is not None:
        return list(dict.fromkeys(labels.map.values()))
    return []


def make_table(
    name: str,
    config: Config,
    now: float | None = None,
    source: HistorySource | None = None,
    *,
    keep_flagged: bool | None = None,
) -> tuple[Table, str]:
    """The labelled table, less the rows inside spans the daemon flagged (edge/watch.py) unless
    ``learn.keep_flagged`` (or ``keep_flagged``) keeps them: counted in ``stats``."""
    table, described = _make_table(name, config, now, source)
    learn = config.pipelines[name].learn
    assert learn is not None
    keep = learn.keep_flagged if keep_flagged is None else keep_flagged
    return drop_flagged(table, config, keep=keep), described


def drop_flagged(table: Table, config: Config, *, keep: bool) -> Table:
    from edge.watch import in_spans, read_spans, spans_path

    path = spans_path(config.state.file)
    if path is None or not path.is_file():
        return table
    try:
        spans = [s for s in read_spans(path)[0] if s.pipeline == table.pipeline]
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError("state.file", f"flagged spans {path}: {exc}") from None
    spec = table.spec
    reach = (
        spec.sample_shape[0] * spec.sample_period_s
        if spec.layout == "window" and spec.sample_period_s
        else 0.0
    )
    inside = [i for i in range(len(table)) if in_spans(table.devices[i], float(table.ts[i]), reach, spans)]
    if keep:
        if inside:
            table.stats["rows in flagged spans (kept: keep_flagged)"] += len(inside)
        return table
    if not inside:
        return table
    drop = set(inside)
    keep_idx = [i for i in range(len(table)) if i not in drop]
    table.stats["rows in flagged spans"] += len(inside)
    return Table(
        table.pipeline,
        spec,
        table.ts[keep_idx],
        [table.devices[i] for i in keep_idx],
        [table.labels[i] for i in keep_idx],
        table.x[keep_idx],
        table.start,
        table.end,
        table.stats,
        table.statistics,
    )


def _make_table(
    name: str, config: Config, now: float | None = None, source: HistorySource | None = None
) -> tuple[Table, str]:
    """The labelled table of pipeline ``name`` and a description of its sources (``source``
    replaces the one the config names)."""
    pcfg = config.pipelines[name]
    learn = pcfg.learn
    assert learn is not None
    key = f"pipelines.{name}.learn"
    end = learn.end.timestamp() if learn.end is not None else (now if now is not None else time.time())
    start = end - learn.days * DAY
    pipeline = pipeline_for(name, config)
    spec = pipeline.spec
    spans = [(s.start.timestamp(), s.end.timestamp()) for s in learn.exclude]
    if learn.labels is not None and learn.labels.corrections:
        from edge.corrections import corrections_dir  # where the daemon stores them
        from edge.labelstore import FILENAME, LabelStore

        folder = corrections_dir(config)
        if not (folder / FILENAME).is_file():
            raise ConfigError(f"{key}.labels.corrections", f"no label store at {folder / FILENAME} yet")
        store = LabelStore(folder / FILENAME)
        try:
            rows = [(c.ts, c.device, c.label, c.input.reshape(-1).tolist()) for c in store.corrections(name)]
        finally:
            store.close()
        rows = [r for r in rows if r[2] != "none of these"]
        return table_from_rows(
            name, spec, rows, start=start, end=end, exclude=spans
        ), f"corrections store {store.path}"
    opened = source or open_source(learn.source, f"{key}.source")
    try:
        if isinstance(opened, RecordTable):
            from edge.record import columns_for

            record_rows = opened.read(name, columns_for(spec))
            normal = learn.anomaly is not None  # no labels: every row is data marked normal
            rows = [(r.ts, r.device, NORMAL if normal else r.label, r.values) for r in record_rows]
            return table_from_rows(name, spec, rows, start=start, end=end, exclude=spans), opened.describe()
        entities: list[str] = []
        for device, mapping in learn.inputs.items():
            entities += list(mapping.values())
            if learn.labels is not None:  # none for an anomaly model
                entities += label_entities(learn.labels, device)
        stats_cfg = learn.source.statistics
        if stats_cfg is not None and stats_cfg.use == "only":  # their states are not read
            numeric_inputs, numeric_labels = statistics_entities(learn)
            entities = [e for e in entities if e not in {*numeric_inputs, *numeric_labels}]
        history = opened.states(list(dict.fromkeys(entities)), start, end)
        described = opened.describe() if source is not None and hasattr(opened, "describe") else None
        windowed = isinstance(pcfg.features, WindowFeatures)
        for_inputs, for_labels, filled = fill_from_statistics(
            opened, history, learn, start, end, windowed=windowed
        )
        table = build_table(name, config, for_inputs, start, end, pipeline=pipeline, label_history=for_labels)
        if stats_cfg is not None and stats_cfg.active:
            # a window's oldest tick is (size - 1) periods back (the config checks it is resampled)
            period_s = pcfg.features.resample_period_s if isinstance(pcfg.features, WindowFeatures) else None
            reach = (spec.sample_shape[0] - 1) * period_s if windowed and period_s else 0.0
            used = examples_from_statistics(
                table.ts.tolist(), table.devices, learn, filled, reach, windowed=windowed
            )
            table.statistics = statistics_summary(
                filled, stats_cfg, examples=len(table), from_statistics=used
            )
        return table, described or describe_source(learn.source)
    finally:
        if source is None:  # opened here: closed here
            close_source(opened)


def recipe_for(
    name: str, config: Config, table: Table, *, classes: list[str], csv: Path, sources: str
) -> dict[str, Any]:
    pcfg = config.pipelines[name]
    learn = pcfg.learn
    assert learn is not None
    spec = table.spec
    train = learn.train
    window = spec.layout == "window"
    period = pcfg.features.resample_period_s if isinstance(pcfg.features, WindowFeatures) else None
    family = train.family or ("cnn1d" if window else "mlp")
    model: dict[str, Any] = {"family": family}
    if train.hidden:
        model["hidden"] = list(train.hidden)
    if family == "cnn1d" and window:
        size = spec.sample_shape[0]
        model["kernel_sizes"] = [k for k in (7, 5, 3) if k <= size] or [1]
    units = dict(spec.manifest.input.units) if spec.manifest is not None else {}
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    data: dict[str, Any] = {
        "source": str(csv),
        "layout": spec.layout,
        "features": list(spec.features),
        "split": "column",
        "units": units,
    }
    if window:
        data["window"] = spec.sample_shape[0]
        if period:
            data["sample_period_s"] = period
    return {
        "name": re.sub(r"[^A-Za-z0-9_.-]+", "-", pcfg.model) or "model",
        "version": f"1.0.0+learn.{stamp}",
        "description": (
            f"Learned by edge-infer learn for pipeline {name} from {sources}, "
            f"{_iso(table.start)} to {_iso(table.end)}."
        ),
        "task": "classification",
        "labels": classes,
        "data": data,
        "model": model,
        "train": {
            "epochs": train.epochs,
            "batch_size": train.batch_size,
            "lr": train.lr,
            "seed": train.seed,
            "threads": train.threads,
            "patience": max(5, train.epochs // 4),
        },
    }


# ---------------------------------------------------------------------------- the training process


@dataclass
class ChildResult:
    returncode: int
    peak_rss_mb: float
    seconds: float
    killed_for_memory: bool


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def run_training(
    cmd: Sequence[str],
    *,
    threads: int,
    nice: int,
    memory_mb: int,
    stream: TextIO | None = None,
    on_line: Callable[[str], None] | None = None,
) -> ChildResult:
    """Run ``cmd`` niced with bounded threads; stop it when its RSS passes ``memory_mb``.

    With ``on_line`` the child's output goes through a pipe: each line is copied to ``stream``
    (as without it) and handed to ``on_line`` (learn's ``--events`` reads the epochs from it)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(threads)
    env["EDGE_INFER_LEARN_CHILD"] = "1"

    started = time.monotonic()
    target = stream or sys.stderr
    if on_line is None:
        proc = subprocess.Popen(list(cmd), env=env, stdout=target, stderr=target)
    else:
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with contextlib.suppress(OSError):  # lower its priority at once (it is still importing)
        os.setpriority(os.PRIO_PROCESS, proc.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    with contextlib.suppress(OSError, ValueError):
        # A hard ceiling on its address space too (torch maps ~0.75 GB before it allocates anything),
        # so an allocation burst between two RSS checks fails in the child instead of swapping.
        ceiling = (2 * memory_mb + 1024) * 1024 * 1024
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (ceiling, ceiling))
    peak = 0
    killed = False
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak, killed
        while not stop.wait(0.2):
            rss = _rss_bytes(proc.pid)
            peak = max(peak, rss)
            if rss > memory_mb * 1024 * 1024:
                killed = True
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                return

    def relay() -> None:
        out = proc.stdout
        assert out is not None
        assert on_line is not None
        for raw in iter(lambda: out.readline(65536), b""):  # a longer line comes in pieces
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            print(line, file=target, flush=True)
            with contextlib.suppress(Exception):  # a broken reader must not stop training
                on_line(line)

    watcher = threading.Thread(target=watch, name="learn-rss", daemon=True)
    watcher.start()
    relayer = threading.Thread(target=relay, name="learn-relay", daemon=True) if on_line else None
    if relayer is not None:
        relayer.start()
    try:
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        stop.set()
        watcher.join()
        if relayer is not None:
            relayer.join(5)
    peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)  # Linux: KiB
    return ChildResult(code, peak / 1024 / 1024, time.monotonic() - started, killed)


# ---------------------------------------------------------------------------- card


def learn_card(report: dict[str, Any]) -> str:
    d = report
    lines = ["", "## Learned from this home (edge-infer learn)", ""]
    lines.append(f"- **Pipeline**: `{d['pipeline']}`; **source**: {d['source']}")
    lines.append(
        f"- **Data span**: {d['span']['start']} to {d['span']['end']} ({d['span']['days']:.1f} days)"
    )
    if d.get("labels"):
        lines.append(f"- **Labels**: {d['labels']}")
    if d.get("exclude"):
        lines.append("- **Excluded spans**: " + ", ".join(f"{a} to {b}" for a, b in d["exclude"]))
    lines += statistics_card(d.get("statistics"))
    lines.append(
        f"- **Split**: contiguous time blocks (oldest train, then validation, newest test) with a "
        f"purge gap of {d['split']['purge_s']:.0f} s (at least one window) before each boundary"
    )
    for block, (a, b) in d["split"]["bounds"].items():
        lines.append(f"  - {block}: {a} to {b}")
    lines += ["", "| class | " + " | ".join(d["split"]["counts"]) + " |"]
    lines.append("|---|" + "---|" * len(d["split"]["counts"]))
    for cls in d["classes"]:
        lines.append(
            f"| `{cls}` | " + " | ".join(str(c.get(cls, 0)) for c in d["split"]["counts"].values()) + " |"
        )
    if d.get("table_stats"):
        lines.append("")
        lines.append("- Left out: " + ", ".join(f"{k}: {v}" for k, v in sorted(d["table_stats"].items())))
    lines += ["", f"### Holdout ({d['holdout']['n']} examples, the newest block)", ""]
    lines += ["| model | accuracy | macro-F1 |", "|---|---|---|"]
    for key, title in (
        ("candidate", "this model"),
        ("baseline", "trivial baseline"),
        ("deployed", "deployed"),
    ):
        m = d["holdout"].get(key)
        if m is not None:
            lines.append(f"| {title}{m.get('note', '')} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |")
    if d["holdout"].get("deployed_note"):
        lines.append(f"\nDeployed model: {d['holdout']['deployed_note']}")
    lines += [
        "",
        f"**Gate** ({d['gate']['metric']}, margin {d['gate']['margin']:g}): {d['gate']['reason']}",
        "",
    ]
    return "\n".join(lines)


def statistics_card(stats: dict[str, Any] | None) -> list[str]:
    """The card's lines on what long-term statistics fed (none when they were not used)."""
    if not stats:
        return []
    lines = [
        f"- **Long-term statistics** (`learn.source.statistics`: use {stats['use']}, "
        f"{stats['period']} rows, their {stats['value']}): {stats['examples']} of "
        f"{stats['of_examples']} examples hold a value or a label from them"
    ]
    for entity, info in stats["entities"].items():
        spans = ", ".join(f"{a} to {b} ({n} rows)" for a, b, n in info["spans"]) or "no rows"
        extra = (
            f"; {info['rows_without_value']} rows without a {stats['value']} (gaps)"
            if info["rows_without_value"]
            else ""
        )
        lines.append(f"  - `{entity}`: {spans}{extra}")
    return lines


# ---------------------------------------------------------------------------- the whole run


def learn(
    config_path: Path,
    name: str,
    *,
    deploy_model: bool = True,
    now: float | None = None,
    out: TextIO | None = None,
    source: HistorySource | None = None,
    keep_flagged: bool | None = None,
    events: Callable[[dict[str, Any]], None] | None = None,
) -> LearnResult:
    """One learn run. ``events`` (``--events``) gets one dict per stage: ``collecting``,
    ``table``, ``training`` (at its start and at each epoch line of the training process),
    ``evaluating``; :func:`verdict_event` makes the last one from the result."""
    say = out or sys.stderr

    def note(text: str) -> None:
        print(text, file=say, flush=True)

    def emit(stage: str, **fields: Any) -> None:
        if events is not None:
            events({"event": stage, "pipeline": name, "ts": round(time.time(), 3), **fields})

    try:
        config = load_config(config_path)
        if name not in config.pipelines:
            raise ConfigError("pipelines", f"no pipeline {name!r} (pipelines: {', '.join(config.pipelines)})")
        pcfg = config.pipelines[name]
        learn_cfg = pcfg.learn
        if learn_cfg is None:
            raise ConfigError(f"pipelines.{name}.learn", "add a learn section (docs/learning.md)")
        started = time.monotonic()
        emit(
            "collecting",
            source=describe_source(learn_cfg.source) if source is None else "given",
            days=learn_cfg.days,
        )
        table, sources = make_table(name, config, now, source, keep_flagged=keep_flagged)
    except (ConfigError, ModelLoadError, ValueError, OSError, SourceError) as exc:
        return LearnResult(EXIT_CONFIG, f"{exc}")
    table_s = time.monotonic() - started
    note(
        f"learn {name}: {len(table)} labelled examples from {sources}, "
        f"{_iso(table.start)} to {_iso(table.end)} ({table_s:.1f} s)"
    )
    if table.statistics:
        st = table.statistics
        note(
            f"  long-term statistics ({st['period']} {st['value']}, use {st['use']}): "
            f"{st['examples']} of {st['of_examples']} examples hold a value or a label from them"
        )
    flagged = table.stats.get("rows in flagged spans", 0)
    kept = table.stats.get("rows in flagged spans (kept: keep_flagged)", 0)
    if flagged or kept:
        note(
            f"  inputs unlike training: {flagged} row(s) in flagged spans left out"
            if flagged
            else f"  inputs unlike training: {kept} row(s) in flagged spans kept (keep_flagged)"
        )
    anomaly_model = table.spec.task == "anomaly" and config.models[pcfg.model].path.is_file()
    if learn_cfg.anomaly is None and anomaly_model:
        return LearnResult(
            EXIT_CONFIG,
            f"pipelines.{name}.learn: models.{pcfg.model} is an anomaly model: it learns from normal data "
            "without labels (replace labels with `anomaly: {}`, docs/learning.md)",
        )
    if learn_cfg.anomaly is not None:
        if table.spec.task != "anomaly" and config.models[pcfg.model].path.is_file():
            return LearnResult(
                EXIT_CONFIG,
                f"pipelines.{name}.learn.anomaly: models.{pcfg.model} is a {table.spec.task} model; an "
                "anomaly model is learned for a pipeline whose model is one, or has no file yet",
            )
        from edge.learn.anomaly import learn_anomaly

        result: LearnResult = learn_anomaly(
            config_path,
            name,
            config,
            table,
            sources,
            table_s=table_s,
            deploy_model=deploy_model,
            note=note,
            emit=emit,
        )
        return result
    classes = class_order(table, expected_classes(learn_cfg))
    period = pcfg.features.resample_period_s if isinstance(pcfg.features, WindowFeatures) else None
    hop = pcfg.features.hop if isinstance(pcfg.features, WindowFeatures) else 1
    purge = window_span_s(table, period, hop)
    split = time_split(table, learn_cfg.test_fraction, learn_cfg.val_fraction, purge)
    counts = split.counts(table)
    note("  class counts: " + ", ".join(f"{b}: {c}" for b, c in counts.items()))
    emit("table", examples=len(table), seconds=round(table_s, 3), source=sources, counts=counts)
    try:
        check_enough(table, split, classes, learn_cfg.min_examples_per_class)
    except TooLittleData as exc:
        return LearnResult(EXIT_TOO_LITTLE, f"not enough data to learn {name}: {exc}", {"counts": counts})
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnx") is None:
        from edge.cli import INSTALL_HINT

        return LearnResult(EXIT_NO_TORCH, f"training needs the train extra; {INSTALL_HINT['train']}")
    work = work_dir(name, learn_cfg, config_path)
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / "table.csv"
    table.write_csv(csv_path, split.blocks)
    recipe = recipe_for(name, config, table, classes=classes, csv=csv_path, sources=sources)
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    build = work / "build"
    cmd = [sys.executable, "-m", "exporters", "train", str(recipe_path), "--out", str(build)]
    cmd.append("--quantize" if learn_cfg.train.quantize else "--export")
    note(
        f"  training in a separate process (nice {learn_cfg.train.nice}, "
        f"{learn_cfg.train.threads} thread(s), at most {learn_cfg.train.memory_mb} MB): {' '.join(cmd[1:])}"
    )
    epochs = learn_cfg.train.epochs
    emit("training", epoch=0, epochs=epochs, progress=0)

    def epoch_line(line: str) -> None:
        found = EPOCH_LINE.match(line)
        if found is not None:
            step, total = int(found.group(1)), max(1, int(found.group(2)))
            emit("training", epoch=step, epochs=total, progress=min(100, round(100 * step / total)))

    child = run_training(
        cmd,
        threads=learn_cfg.train.threads,
        nice=learn_cfg.train.nice,
        memory_mb=learn_cfg.train.memory_mb,
        on_line=epoch_line if events is not None else None,
    )
    note(
        f"  training process: exit {child.returncode}, {child.seconds:.1f} s, "
        f"peak RSS {child.peak_rss_mb:.0f} MB"
    )
    report_path = build / "report.json"
    if child.killed_for_memory:
        return LearnResult(
            EXIT_TRAIN_FAILED,
            f"training stopped: its memory passed learn.train.memory_mb={learn_cfg.train.memory_mb} MB "
            "(lower learn.days or learn.train.batch_size)",
        )
    # exit 1 is the int8 refusal: fp32 is still there and recommended
    if child.returncode not in (0, 1) or not report_path.is_file():
        return LearnResult(
            EXIT_TRAIN_FAILED, f"training failed (exit {child.returncode}); see its output above"
        )
    emit("evaluating", seconds=round(child.seconds, 3), peak_rss_mb=round(child.peak_rss_mb, 1))
    build_report = json.loads(report_path.read_text())
    recommended = build_report.get("recommended", "fp32")
    candidate = build / Path(build_report["files"][recommended]["path"]).name
    if not candidate.is_file():
        candidate = build / f"{recipe['name']}.fp32.onnx"

    test = split.indices("test")
    truth = [table.labels[i] for i in test]
    x_test = table.x[test]
    metric, margin = learn_cfg.gate.metric, learn_cfg.gate.margin
    predicted = onnx_predict(candidate, x_test)
    new = scores(truth, predicted, classes)
    train_labels = [table.labels[i] for i in split.indices("train")]
    top, base_pred = majority_baseline(train_labels, len(truth))
    base = scores(truth, base_pred, classes) | {"note": f" (always `{top}`)"}
    target = config.models[pcfg.model].path
    deployed: dict[str, Any] | None = None
    deployed_note = ""
    if target.is_file():
        try:
            deployed = scores(truth, onnx_predict(target, x_test), classes)
        except NotComparable as exc:
            deployed_note = f"not comparable: {exc}"
        except Exception as exc:  # an unloadable deployed file must not stop learning
            deployed_note = f"cannot be run: {exc}"
    else:
        deployed_note = f"none yet at {target}"
    verdict: Verdict = decide(
        metric,
        margin,
        new=new[metric],
        baseline=base[metric],
        deployed=deployed[metric] if deployed is not None else None,
        deployed_note=deployed_note,
    )
    report: dict[str, Any] = {
        "pipeline": name,
        "source": sources,
        "labels": _labels_text(learn_cfg),
        "exclude": [
            [_iso(a), _iso(b)]
            for a, b in ((s.start.timestamp(), s.end.timestamp()) for s in learn_cfg.exclude)
        ],
        "span": {"start": _iso(table.start), "end": _iso(table.end), "days": (table.end - table.start) / DAY},
        "classes": classes,
        "examples": len(table),
        "table_stats": dict(table.stats),
        "statistics": table.statistics or None,
        "split": {
            "purge_s": purge,
            "counts": counts,
            "bounds": {k: [_iso(a), _iso(b)] for k, (a, b) in split.bounds.items()},
        },
        "holdout": {
            "n": len(truth),
            "candidate": new,
            "baseline": base,
            "deployed": deployed,
            "deployed_note": deployed_note,
        },
        "gate": {"metric": metric, "margin": margin, "promote": verdict.promote, "reason": verdict.reason},
        "candidate": str(candidate),
        "training": {"seconds": child.seconds, "peak_rss_mb": child.peak_rss_mb, "table_seconds": table_s},
    }
    card = build / "card.md"
    card_text = (card.read_text() if card.is_file() else "") + learn_card(report)
    card.write_text(card_text)
    quality = write_sidecar(  # edge/quality.py: what Home Assistant shows of this model
        build / "quality.json",
        learn_record(
            metric=metric,
            scores=new,
            truth=truth,
            predicted=predicted,
            classes=classes,
            train_counts=counts.get("train", {}),
            span=report["span"],
            model_sha256=file_sha256(candidate),
            trained_at=time.time(),
        ),
    )
    note(
        f"  holdout {metric}: new {new[metric]:.4f}, baseline {base[metric]:.4f}, deployed "
        + (f"{deployed[metric]:.4f}" if deployed is not None else f"- ({deployed_note})")
    )
    status = EXIT_KEPT
    if verdict.promote and deploy_model:
        try:
            previous = deploy.install(candidate, target, card, {deploy.QUALITY_SUFFIX: quality})
        except (deploy.DeployError, OSError) as exc:
            report["gate"]["reason"] = f"{verdict.reason}, but not deployed: {exc}"
            (work / "learn_report.json").write_text(json.dumps(report, indent=2, default=str))
            return LearnResult(EXIT_CONFIG, report["gate"]["reason"], report)
        report["deployed_to"] = str(target)
        report["previous"] = str(previous) if previous else None
        status = EXIT_PROMOTED
    (work / "learn_report.json").write_text(json.dumps(report, indent=2, default=str))
    message = verdict.reason
    if status == EXIT_PROMOTED:
        message += f"; written to {target}" + (
            f" (previous kept as {report['previous']}; edge-infer models rollback -c {config_path} {name})"
            if report.get("previous")
            else ""
        )
    message += f"; card {card}"
    return LearnResult(status, message, report)


EPOCH_LINE = re.compile(r"^\s*epoch\s+(\d+)/(\d+)\b")  # exporters/train.py's Progress lines
OUTCOMES = {
    EXIT_PROMOTED: "promoted",
    EXIT_KEPT: "kept",
    EXIT_CONFIG: "failed",
    EXIT_NO_TORCH: "failed",
    EXIT_TOO_LITTLE: "kept",
    EXIT_TRAIN_FAILED: "failed",
}


def verdict_event(name: str, result: LearnResult) -> dict[str, Any]:
    """The last ``--events`` line: the exit status, ``promoted`` / ``kept`` (the gate said no,
    or too little data: the deployed model stays) / ``failed``, the reason and the gate's
    numbers (None where learn did not get that far)."""
    report = result.report
    gate = report.get("gate") or {}
    holdout = report.get("holdout") or {}
    metric = gate.get("metric")

    def score(key: str) -> float | None:
        entry = holdout.get(key)
        value = entry.get(metric) if isinstance(entry, dict) and metric else None
        return round(float(value), 4) if isinstance(value, int | float) else None

    numbers = {
        "metric": metric,
        "margin": gate.get("margin"),
        "new": score("candidate"),
        "baseline": score("baseline"),
        "deployed": score("deployed"),
        "promote": gate.get("promote"),
    }
    return {
        "event": "verdict",
        "pipeline": name,
        "ts": round(time.time(), 3),
        "status": result.status,
        "outcome": OUTCOMES.get(result.status, "failed"),
        "reason": gate.get("reason") or result.message,
        "message": result.message,
        "gate": numbers if gate else None,
        "examples": report.get("examples"),
        "counts": report.get("counts") or (report.get("split") or {}).get("counts"),
        "training_s": (report.get("training") or {}).get("seconds"),
        "deployed_to": report.get("deployed_to"),
    }


class EventWriter:
    """``--events PATH`` (``-``: standard output): one JSON object a line, flushed, from any
    thread (the training process's relay thread writes the epochs)."""

    def __init__(self, target: str) -> None:
        self._lock = threading.Lock()
        self._own = target != "-"
        self._file: TextIO = open(target, "a", encoding="utf-8") if self._own else sys.stdout  # noqa: SIM115

    def __call__(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=str, separators=(",", ":"))
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._own:
            self._file.close()


def _labels_text(learn_cfg: LearnConfig) -> str:
    labels = learn_cfg.labels
    if labels is None:
        return "the record file's label column"
    if labels.corrections:
        return "the corrections store"
    if labels.entity is not None:
        return f"label entity `{labels.entity}`" + (f" mapped {labels.map}" if labels.map else "")
    t = labels.teacher
    assert t is not None
    if t.entity is not None:
        cmp = f"above {t.above:g}" if t.above is not None else f"below {t.below:g}"
        return f"teacher `{t.entity}` {cmp} -> `{t.on}`, else `{t.off}`"
    return f"teacher: any of {t.any_on} on within {t.within_s:g} s -> `{t.on}`, else `{t.off}`"


LEARN_NICE = 10


def be_nice(increment: int = LEARN_NICE) -> None:
    """Lower this process's priority: reading history and building the table are batch work too,
    and must not take CPU from a daemon serving on the same machine (the training process is
    niced again, by ``learn.train.nice``, on top)."""
    with contextlib.suppress(OSError):
        os.nice(increment)


def bound_memory(megabytes: int) -> None:
    """Cap this process's address space (``--max-memory-mb``, what the daemon's Retrainer passes):
    an allocation past it fails here (MemoryError, learn exits 5) instead of swapping the daemon
    out. Only the soft limit is lowered, so the training process it starts can still be given its
    own ceiling (``run_training``: ``learn.train.memory_mb``)."""
    ceiling = megabytes * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        ceiling = min(ceiling, hard)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))


def _stop_on_sigterm() -> None:
    """SIGTERM (the daemon stopping a retrain) unwinds learn like Ctrl-C: run_training kills its
    training process before learn exits, so no training outlives it."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def cli_learn(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edge-infer learn",
        description="Train a pipeline's model on the home's own history (its learn: section), "
        "judge it on a held-out time block and deploy it when it beats the baseline and the deployed model.",
    )
    parser.add_argument("-c", "--config", required=True, type=Path)
    parser.add_argument("pipeline")
    parser.add_argument("--no-deploy", action="store_true", help="train and judge, but never deploy")
    parser.add_argument("--json", action="store_true", help="print the learn report as JSON")
    parser.add_argument(
        "--keep-flagged",
        action="store_true",
        default=None,
        help="keep rows inside spans the daemon flagged as inputs unlike training (learn.keep_flagged)",
    )
    parser.add_argument(
        "--events",
        metavar="PATH",
        help="write one JSON line per stage (collecting, table, training with epochs, evaluating, "
        "verdict) to PATH ('-': standard output); the human output is unchanged",
    )
    parser.add_argument(
        "--nice", type=int, default=LEARN_NICE, help=f"niceness added to learn's own (default {LEARN_NICE})"
    )
    parser.add_argument(
        "--max-memory-mb",
        type=int,
        metavar="MB",
        help="cap learn's own address space (the training process keeps learn.train.memory_mb)",
    )
    parser.add_argument(
        "--suggest",
        action="store_true",
        help="propose learn.inputs from Home Assistant's entity and device registries (reads only "
        "learn.source; prints YAML to review and paste) instead of learning",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.suggest:
        from edge.learn.suggest import suggest_for_pipeline

        try:
            print(suggest_for_pipeline(args.config, args.pipeline))
        except (ConfigError, ModelLoadError, SourceError, OSError) as exc:
            print(f"edge-infer learn --suggest: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        return 0
    be_nice(max(0, args.nice))
    _stop_on_sigterm()
    if args.max_memory_mb is not None:
        if args.max_memory_mb < 256:
            print("edge-infer learn: --max-memory-mb must be at least 256", file=sys.stderr)
            return EXIT_CONFIG
        bound_memory(args.max_memory_mb)
    writer = EventWriter(args.events) if args.events else None
    try:
        try:
            result = learn(
                args.config,
                args.pipeline,
                deploy_model=not args.no_deploy,
                keep_flagged=args.keep_flagged,
                events=writer,
            )
        except MemoryError:
            result = LearnResult(
                EXIT_TRAIN_FAILED, f"learn itself passed --max-memory-mb={args.max_memory_mb} MB"
            )
        if writer is not None:
            writer(verdict_event(args.pipeline, result))
    finally:
        if writer is not None:
            writer.close()
    if args.json and result.report:
        print(json.dumps(result.report, indent=2, default=str))
    print(f"edge-infer learn: {result.message}", file=sys.stderr if result.status else sys.stdout)
    return result.status
