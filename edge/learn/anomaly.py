"""``edge-infer learn`` for an anomaly model: learned from the device's own normal windows, no labels.

The table is built as for a classifier (edge/learn/table.py: the same sources, the daemon's own
feature code, excluded spans and flagged spans left out), every window in it taken as normal.
It is split by time like a classifier's (edge/learn/split.py, purge gaps of one window): the
oldest block is trained on, the validation block is where the threshold is set for
``learn.anomaly.false_alarms_per_day`` (exporters/anomaly.py: alarm episodes under the alarm
rule, a Poisson allowance), the newest (test) block judges it. Training runs in a separate
process (``python -m exporters.learn_anomaly``), niced and bounded as for a classifier.

The gate, on the test block's normal windows, scored with ONNX Runtime here: the new model's
false alarms (episodes of its alarm, per device) must be consistent with the target: the
target rate times the test days is not below the one-sided Poisson lower bound, at
``learn.anomaly.confidence``, of the alarms seen; and, when a comparable anomaly model is
deployed and is itself consistent with the target on this home's test block, the new model
must not raise more false alarms than it there. Without labels only false alarms are measured
on the home's data; how soon a fault is found is measured on injected faults
(tests/test_learn_anomaly.py, the zoo's cards).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edge.alarm import AlarmRule, AlarmRuleError, episodes, gate
from edge.config import Config, ConfigError, LearnAnomaly, WindowFeatures
from edge.learn import deploy
from edge.learn.split import DAY, Split, TooLittleData, time_split, window_span_s
from edge.learn.table import NORMAL, Table
from edge.manifest import manifest_from_metadata

__all__ = ["NORMAL", "learn_anomaly"]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def poisson_lower(count: int, confidence: float) -> float:
    """One-sided lower confidence bound on a Poisson mean from ``count`` events: the mean at which
    seeing ``count`` or more has probability ``1 - confidence`` (0 for no event)."""
    if count <= 0:
        return 0.0

    def at_least(mean: float) -> float:  # P(X >= count)
        term = total = math.exp(-mean)
        for i in range(1, count):
            term *= mean / i
            total += term
        return 1.0 - total

    lo, hi = 0.0, float(count)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if at_least(mid) < 1.0 - confidence else (lo, mid)
    return lo


def sample_period(name: str, config: Config, table: Table) -> float:
    features = config.pipelines[name].features
    period = features.resample_period_s if isinstance(features, WindowFeatures) else None
    period = period or table.spec.sample_period_s
    if table.spec.layout != "window" or not isinstance(features, WindowFeatures):
        raise ConfigError(f"pipelines.{name}.features", "an anomaly model learns from windows: type: window")
    if not period:
        raise ConfigError(
            f"pipelines.{name}.features.resample_period_s",
            "false alarms are counted per day: give the window's sample period (resample_period_s)",
        )
    return float(period)


def sequences(table: Table, index: npt.NDArray[np.intp]) -> list[npt.NDArray[np.intp]]:
    """``index`` split per device, each in time order (one trace per device: its alarm)."""
    devices = np.array(table.devices, dtype=object)[index]
    out = []
    for device in sorted(set(devices.tolist())):
        own = index[devices == device]
        out.append(own[np.argsort(table.ts[own], kind="stable")])
    return out


def check_enough_normal(table: Table, split: Split, minimum: int, per_day: float) -> None:
    span_days = max((table.end - table.start) / DAY, 1e-9)
    if len(table) == 0:
        raise TooLittleData(
            f"no windows in {span_days:.1f} days of history: check learn.inputs names entities with "
            "history"
            + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(table.stats.items()))})" if table.stats else "")
        )
    problems = []
    for block, what in (("train", "train on"), ("val", "set the threshold on"), ("test", "judge it on")):
        have = len(split.indices(block))
        if have < minimum:
            problems.append(
                f"the {block} block has {have} normal windows to {what} (about {have / per_day:.1f} days)"
            )
    if problems:
        rate = len(table) / span_days  # windows a day
        smallest = max(1, min(len(split.indices(b)) for b in ("train", "val", "test")))
        needed = minimum * len(table) / smallest  # windows in all for the smallest block to hold enough
        more = max(1, math.ceil((needed - len(table)) / max(rate, 1e-9)))
        raise TooLittleData(
            "; ".join(problems)
            + f" (at least learn.min_examples_per_class={minimum} each; about {more} more days of history, "
            "or raise learn.days)"
        )


def recipe_for(name: str, config: Config, table: Table, period: float, sources: str) -> dict[str, Any]:
    pcfg = config.pipelines[name]
    learn = pcfg.learn
    assert learn is not None
    assert learn.anomaly is not None
    a: LearnAnomaly = learn.anomaly
    spec = table.spec
    hop = pcfg.features.hop if isinstance(pcfg.features, WindowFeatures) else 1
    units = dict(spec.manifest.input.units) if spec.manifest is not None else {}
    return {
        "name": re.sub(r"[^A-Za-z0-9_.-]+", "-", pcfg.model) or "model",
        "features": list(spec.features),
        "units": units,
        "sample_period_s": period,
        "window": spec.sample_shape[0],
        "hop": hop,
        "false_alarms_per_day": a.false_alarms_per_day,
        "hidden": list(a.hidden),
        "epochs": a.epochs,
        "lr": learn.train.lr,
        "batch_size": learn.train.batch_size,
        "seed": learn.train.seed,
        "description": (
            f"Learned by edge-infer learn for pipeline {name} from {sources}, {_iso(table.start)} to "
            f"{_iso(table.end)}, from normal behaviour (no labels)."
        ),
        "view": a.view,
        "log1p": a.log1p,
        "persist": a.persist,
        "clear": a.clear,
        "confidence": a.confidence,
    }


class NotComparable(ValueError):
    """A deployed file that cannot be judged on these windows as an anomaly model."""


def model_scores(
    path: Path, x: npt.NDArray[np.float32], threshold: float | None = None
) -> tuple[npt.NDArray[np.float32], float, AlarmRule]:
    """An anomaly model's scores for ``x`` (ONNX Runtime), its threshold (``threshold`` overrides
    the manifest's, as models.NAME.threshold does in the daemon) and its alarm rule."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    manifest = manifest_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))
    if manifest is None:
        raise NotComparable(f"{path} has no edge-infer manifest")
    if manifest.task != "anomaly":
        raise NotComparable(f"{path} is a {manifest.task} model, not an anomaly model")
    shape = tuple(manifest.input.sample_shape())
    if shape != tuple(x.shape[1:]):
        raise NotComparable(
            f"{path} takes inputs of shape {list(shape)}, the holdout has {list(x.shape[1:])}"
        )
    thr = threshold if threshold is not None else manifest.threshold
    if thr is None:
        raise NotComparable(f"{path} states no threshold")
    try:
        rule = AlarmRule.from_record(manifest.provenance.get("alarm"), "provenance.alarm")
    except AlarmRuleError as exc:
        raise NotComparable(f"{path}: {exc}") from None
    name = session.get_inputs()[0].name
    out = [
        np.asarray(
            session.run([manifest.output.name], {name: np.ascontiguousarray(x[i : i + 512])})[0]
        ).reshape(-1)
        for i in range(0, len(x), 512)
    ]
    scores = np.concatenate(out) if out else np.zeros(0, np.float32)
    return scores.astype(np.float32), float(thr), rule


def false_alarms(
    path: Path, table: Table, seqs: list[npt.NDArray[np.intp]], per_day: float, threshold: float | None = None
) -> dict[str, Any]:
    """Alarm episodes of the model at ``path`` over the normal windows of ``seqs`` (one trace each)."""
    order = np.concatenate(seqs)
    scores, thr, rule = model_scores(path, table.x[order], threshold)
    count, at = 0, 0
    on = 0
    for seq in seqs:
        flags = gate(scores[at : at + len(seq)], thr, rule)
        count += episodes(flags)
        on += int(flags.sum())
        at += len(seq)
    days = len(order) / per_day
    return {
        "threshold": thr,
        "alarm": rule.record(),
        "windows": len(order),
        "days": days,
        "false_alarms": count,
        "false_alarms_per_day": count / days if days else 0.0,
        "windows_flagged": on / len(order) if len(order) else 0.0,
    }


def judge(
    new: dict[str, Any], deployed: dict[str, Any] | None, deployed_note: str, settings: LearnAnomaly
) -> tuple[bool, str]:
    """The gate: ``new`` consistent with the target (its alarm episodes, and the share of the time
    its alarm is on), and no worse than a deployed model that is."""
    target, confidence, share = settings.false_alarms_per_day, settings.confidence, settings.max_alarm_share
    days = new["days"]
    lower = poisson_lower(new["false_alarms"], confidence)
    seen = (
        f"{new['false_alarms']} false alarms in {days:.3g} held-out normal days "
        f"({new['false_alarms_per_day']:.3f} a day)"
    )
    if lower > target * days:
        return False, (
            f"the new model's {seen}: above the target of {target:g} a day (their {confidence:.0%} "
            f"Poisson lower bound {lower / days:.3f} a day): the deployed model is kept"
        )
    if new["windows_flagged"] > share:
        return False, (
            f"the new model's alarm is on for {new['windows_flagged']:.1%} of {days:.3g} held-out normal "
            f"days, more than learn.anomaly.max_alarm_share={share:g}: the deployed model is kept"
        )
    if deployed is not None:
        d_ok = (
            poisson_lower(deployed["false_alarms"], confidence) <= target * deployed["days"]
            and deployed["windows_flagged"] <= share
        )
        if d_ok and new["false_alarms"] > deployed["false_alarms"]:
            return False, (
                f"the new model's {seen} are more than the deployed model's {deployed['false_alarms']} "
                "on the same days: the deployed model is kept"
            )
        against = f"the deployed model's {deployed['false_alarms']} there" + (
            "" if d_ok else f" (above the target for this home: {deployed['false_alarms_per_day']:.3f} a day)"
        )
    else:
        against = f"no deployed model to compare ({deployed_note})"
    return True, f"{seen}: within the target of {target:g} a day, beside {against}: promoted"


def card(report: dict[str, Any]) -> str:
    d = report
    lines = ["", "## Learned from this home (edge-infer learn, anomaly: no labels)", ""]
    lines.append(f"- **Pipeline**: `{d['pipeline']}`; **source**: {d['source']}")
    lines.append(
        f"- **Data span**: {d['span']['start']} to {d['span']['end']} ({d['span']['days']:.1f} days), "
        "every window taken as normal"
    )
    if d.get("exclude"):
        lines.append("- **Excluded spans**: " + ", ".join(f"{a} to {b}" for a, b in d["exclude"]))
    if d.get("table_stats"):
        lines.append("- Left out: " + ", ".join(f"{k}: {v}" for k, v in sorted(d["table_stats"].items())))
    lines.append(
        f"- **Split**: contiguous time blocks (oldest train, then the threshold's, newest test) with a "
        f"purge gap of {d['split']['purge_s']:.0f} s before each boundary"
    )
    for block, (a, b) in d["split"]["bounds"].items():
        n = d["split"]["windows"].get(block, 0)
        lines.append(f"  - {block}: {a} to {b} ({n} windows)")
    thr = d["threshold"]
    lines += [
        f"- **Target**: {thr['target_false_alarms_per_day']:g} false alarms a day; threshold "
        f"{thr['threshold']:.4g} set on the validation block ({thr['method']})",
        "",
        f"### Test block ({d['holdout']['candidate']['days']:.3g} normal days, the newest)",
        "",
        "| model | threshold | false alarms | a day | alarm on (share of windows) |",
        "|---|---|---|---|---|",
    ]
    for key, title in (("candidate", "this model"), ("deployed", "deployed")):
        m = d["holdout"].get(key)
        if m is not None:
            lines.append(
                f"| {title} | {m['threshold']:.4g} | {m['false_alarms']} | {m['false_alarms_per_day']:.3f} "
                f"| {m['windows_flagged']:.4f} |"
            )
    if d["holdout"].get("deployed_note"):
        lines.append(f"\nDeployed model: {d['holdout']['deployed_note']}")
    lines += [
        "",
        f"**Gate** (false alarms within a Poisson bound of the target, alarm on for at most "
        f"{d['max_alarm_share']:g} of the test windows): {d['gate']['reason']}",
        "",
    ]
    return "\n".join(lines)


def learn_anomaly(
    config_path: Path,
    name: str,
    config: Config,
    table: Table,
    sources: str,
    *,
    table_s: float,
    deploy_model: bool,
    note: Callable[[str], None],
    emit: Callable[..., None],
) -> Any:
    """The anomaly half of :func:`edge.learn.run.learn`, from the table on."""
    from edge.learn import run

    pcfg = config.pipelines[name]
    learn_cfg = pcfg.learn
    assert learn_cfg is not None
    assert learn_cfg.anomaly is not None
    target_cfg = learn_cfg.anomaly
    try:
        period = sample_period(name, config, table)
    except ConfigError as exc:
        return run.LearnResult(run.EXIT_CONFIG, f"{exc}")
    hop = pcfg.features.hop if isinstance(pcfg.features, WindowFeatures) else 1
    per_day = DAY / (period * hop)
    purge = window_span_s(table, period, hop)
    if learn_cfg.val_fraction <= 0:
        return run.LearnResult(
            run.EXIT_CONFIG,
            f"pipelines.{name}.learn.val_fraction: an anomaly model's threshold is set on the validation "
            "block: give it a share (e.g. 0.25)",
        )
    split = time_split(table, learn_cfg.test_fraction, learn_cfg.val_fraction, purge)
    windows = {b: len(split.indices(b)) for b in ("train", "val", "test", "purged")}
    note("  normal windows: " + ", ".join(f"{b}: {n}" for b, n in windows.items()))
    emit("table", examples=len(table), seconds=round(table_s, 3), source=sources, counts={"windows": windows})
    try:
        check_enough_normal(table, split, learn_cfg.min_examples_per_class, per_day)
    except TooLittleData as exc:
        return run.LearnResult(
            run.EXIT_TOO_LITTLE, f"not enough data to learn {name}: {exc}", {"counts": windows}
        )
    import importlib.util

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnx") is None:
        from edge.cli import INSTALL_HINT

        return run.LearnResult(run.EXIT_NO_TORCH, f"training needs the train extra; {INSTALL_HINT['train']}")
    work = run.work_dir(name, learn_cfg, config_path)
    work.mkdir(parents=True, exist_ok=True)
    train_seq = sequences(table, split.indices("train"))
    cal_seq = sequences(table, split.indices("val"))
    test_seq = sequences(table, split.indices("test"))
    data = work / "normal_windows.npz"
    np.savez(data, train=table.x[np.concatenate(train_seq)], calibration=table.x[np.concatenate(cal_seq)])
    recipe = recipe_for(name, config, table, period, sources)
    spec_path = work / "anomaly_spec.json"
    spec_path.write_text(json.dumps({"recipe": recipe, "data": str(data)}, indent=2))
    build = work / "build"
    cmd = [sys.executable, "-m", "exporters.learn_anomaly", str(spec_path), "--out", str(build)]
    note(
        f"  training in a separate process (nice {learn_cfg.train.nice}, "
        f"{learn_cfg.train.threads} thread(s), at most {learn_cfg.train.memory_mb} MB): {' '.join(cmd[1:])}"
    )
    emit("training", epoch=0, epochs=target_cfg.epochs, progress=0)
    report_path = build / "report.json"
    report_path.unlink(missing_ok=True)
    child = run.run_training(
        cmd, threads=learn_cfg.train.threads, nice=learn_cfg.train.nice, memory_mb=learn_cfg.train.memory_mb
    )
    note(
        f"  training process: exit {child.returncode}, {child.seconds:.1f} s, "
        f"peak RSS {child.peak_rss_mb:.0f} MB"
    )
    if child.killed_for_memory:
        return run.LearnResult(
            run.EXIT_TRAIN_FAILED,
            f"training stopped: its memory passed learn.train.memory_mb={learn_cfg.train.memory_mb} MB "
            "(lower learn.days)",
        )
    if child.returncode != 0 or not report_path.is_file():
        return run.LearnResult(
            run.EXIT_TRAIN_FAILED, f"training failed (exit {child.returncode}); see its output above"
        )
    emit("evaluating", seconds=round(child.seconds, 3), peak_rss_mb=round(child.peak_rss_mb, 1))
    built = json.loads(report_path.read_text())
    candidate = build / built["files"]["fp32"]["path"]
    target_rate = target_cfg.false_alarms_per_day
    new = false_alarms(candidate, table, test_seq, per_day)
    target = config.models[pcfg.model].path
    deployed: dict[str, Any] | None = None
    deployed_note = ""
    if target.is_file():
        try:
            deployed = false_alarms(target, table, test_seq, per_day, config.models[pcfg.model].threshold)
        except NotComparable as exc:
            deployed_note = f"not comparable: {exc}"
        except Exception as exc:  # an unloadable deployed file must not stop learning
            deployed_note = f"cannot be run: {exc}"
    else:
        deployed_note = f"none yet at {target}"
    promote, reason = judge(new, deployed, deployed_note, target_cfg)
    report: dict[str, Any] = {
        "pipeline": name,
        "task": "anomaly",
        "source": sources,
        "labels": "none: every window taken as normal",
        "exclude": [[_iso(s.start.timestamp()), _iso(s.end.timestamp())] for s in learn_cfg.exclude],
        "span": {"start": _iso(table.start), "end": _iso(table.end), "days": (table.end - table.start) / DAY},
        "examples": len(table),
        "table_stats": dict(table.stats),
        "split": {
            "purge_s": purge,
            "windows": windows,
            "bounds": {k: [_iso(a), _iso(b)] for k, (a, b) in split.bounds.items()},
        },
        "threshold": built["threshold"],
        "target_false_alarms_per_day": target_rate,
        "max_alarm_share": target_cfg.max_alarm_share,
        "holdout": {
            "n": new["windows"],
            "candidate": new,
            "deployed": deployed,
            "deployed_note": deployed_note,
        },
        "gate": {"metric": "false_alarms_per_day", "margin": 0.0, "promote": promote, "reason": reason},
        "candidate": str(candidate),
        "training": {"seconds": child.seconds, "peak_rss_mb": child.peak_rss_mb, "table_seconds": table_s},
    }
    card_path = build / "card.md"
    card_path.write_text((card_path.read_text() if card_path.is_file() else "") + card(report))
    note(
        f"  test block: new {new['false_alarms']} false alarms in {new['days']:.3g} days "
        f"({new['false_alarms_per_day']:.3f} a day, target {target_rate:g}); deployed "
        + (
            f"{deployed['false_alarms']} ({deployed['false_alarms_per_day']:.3f} a day)"
            if deployed
            else f"- ({deployed_note})"
        )
    )
    status = run.EXIT_KEPT
    if promote and deploy_model:
        try:
            previous = deploy.install(candidate, target, card_path)
        except (deploy.DeployError, OSError) as exc:
            report["gate"]["reason"] = f"{reason}, but not deployed: {exc}"
            (work / "learn_report.json").write_text(json.dumps(report, indent=2, default=str))
            return run.LearnResult(run.EXIT_CONFIG, report["gate"]["reason"], report)
        report["deployed_to"] = str(target)
        report["previous"] = str(previous) if previous else None
        status = run.EXIT_PROMOTED
    (work / "learn_report.json").write_text(json.dumps(report, indent=2, default=str))
    message = reason
    if status == run.EXIT_PROMOTED:
        message += f"; written to {target}" + (
            f" (previous kept as {report['previous']}; edge-infer models rollback -c {config_path} {name})"
            if report.get("previous")
            else ""
        )
    message += f"; card {card_path}"
    return run.LearnResult(status, message, report)
