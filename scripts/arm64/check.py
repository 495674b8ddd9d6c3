#!/usr/bin/env python3
"""arm64 checks under qemu user emulation, driven from the x86 host; writes a JSON report.

Run by ``scripts/arm64/test.sh`` (``make test-arm64``) once the cache exists. Checks:

1. ``import``: the aarch64 interpreter imports ``edge`` and its modules; versions are recorded.
2. ``check``: ``edge-infer check`` under emulation on every ``examples/*.yaml`` and on a test
   config whose models are built on the host (tests/onnx_models.py).
3. ``daemon``: ``edge-infer run`` under emulation against a Mosquitto on the host; readings are
   published with paho from the host and the predictions must equal the host's ONNX Runtime.
4. ``zoo``: every ``models/*/*.int8.onnx`` on its committed test split (an .npz beside it), x86
   against arm64 (and an emulated AVX2 x86): class agreement, accuracy within 1 point.
5. ``matmulinteger``: the uint8 x int8 saturation of x86 kernels without VNNI, on a tiny
   MatMulInteger model (exact integers known), and the exporter's quantization settings.

Emulated timings are recorded to size CI, never as performance figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GUEST = HERE / "guest.py"
RUN_SH = HERE / "run.sh"
#: modules the daemon cannot run without; others (demo, record) may need extras
CORE_MODULES = ["edge.cli", "edge.daemon", "edge.config", "edge.runtime", "edge.mqtt", "edge.pipeline"]
#: x86 CPU without VNNI for the AVX2 comparison (TCG implements AVX2 since QEMU 7.2)
AVX2_CPU = "Haswell"
QEMU_NOISE = "TCG doesn't support requested feature"


def cache_dir() -> Path:
    value = Path(os.environ.get("ARM64_CACHE", ".cache/arm64"))
    return value if value.is_absolute() else REPO / value


def find_qemu(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in (Path("/usr/bin") / name, cache_dir() / "tools/usr/bin" / name):
        if candidate.exists():
            return str(candidate)
    return None


def _clean(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if QEMU_NOISE not in line)


class Platforms:
    """Commands that run a Python program on each platform: x86 (native), x86-avx2, arm64."""

    def __init__(self, avx2: bool = True) -> None:
        self.qemu_x86 = find_qemu("qemu-x86_64-static") if avx2 else None

    def names(self) -> list[str]:
        return ["x86", *(["x86-avx2"] if self.qemu_x86 else []), "arm64"]

    def command(self, name: str, *args: str) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if name == "arm64":
            return [str(RUN_SH), *args], env
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        if name == "x86-avx2":
            assert self.qemu_x86 is not None
            return [self.qemu_x86, "-cpu", AVX2_CPU, sys.executable, *args], env
        return [sys.executable, *args], env

    def run(self, name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        cmd, env = self.command(name, *args)
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
        )
        proc.stderr = _clean(proc.stderr)
        return proc

    def infer(self, name: str, jobs: list[dict[str, Any]], workdir: Path) -> list[dict[str, np.ndarray]]:
        """Run guest.py infer on ``name``; one dict of outputs per job."""
        tag = f"{name}-{uuid.uuid4().hex[:6]}"
        jobs = [{**job, "output": str(workdir / f"{tag}-{i}.npz")} for i, job in enumerate(jobs)]
        jobs_file = workdir / f"{tag}.json"
        jobs_file.write_text(json.dumps(jobs))
        proc = self.run(name, str(GUEST), "infer", str(jobs_file), timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} inference failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
        results = []
        for job in jobs:
            with np.load(job["output"]) as data:
                results.append({k: data[k] for k in data.files})
        return results


def timed(report: dict[str, Any], name: str, func: Callable[[], dict[str, Any]]) -> None:
    print(f"arm64 check: {name} ...", flush=True)
    start = time.monotonic()
    try:
        result = func()
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["seconds"] = round(time.monotonic() - start, 1)
    report["checks"][name] = result
    status = "ok" if result.get("ok") else "FAILED"
    print(f"arm64 check: {name} {status} ({result['seconds']} s)", flush=True)
    if not result.get("ok"):
        print(json.dumps({k: v for k, v in result.items() if k != "traceback"}, indent=1)[:3000])
        if "traceback" in result:
            print(result["traceback"][-3000:])


# ---------------------------------------------------------------------- 1. import


def check_import(plat: Platforms) -> dict[str, Any]:
    proc = plat.run("arm64", str(GUEST), "info", timeout=300)
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-2000:]}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    code = (
        "import importlib, json, pkgutil, edge\n"
        "res = {}\n"
        "for m in pkgutil.iter_modules(edge.__path__):\n"
        "    try:\n"
        "        importlib.import_module('edge.' + m.name); res[m.name] = 'ok'\n"
        "    except Exception as exc:\n"
        "        res[m.name] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(res))\n"
    )
    start = time.monotonic()
    proc = plat.run("arm64", "-c", code, timeout=600)
    if proc.returncode != 0:
        return {"ok": False, "versions": info, "error": proc.stderr[-2000:]}
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    core_failed = {m: modules.get(m.split(".", 1)[1], "missing") for m in CORE_MODULES}
    core_failed = {m: e for m, e in core_failed.items() if e != "ok"}
    return {
        "ok": info.get("machine") == "aarch64" and "edge" in info and not core_failed,
        "versions": info,
        "modules": modules,
        "core_failed": core_failed,
        "import_all_seconds": round(time.monotonic() - start, 1),
    }


# ---------------------------------------------------------------------- 2./3. check and daemon

FEATURES = ["temperature", "humidity", "co2"]
LABELS = ["empty", "one", "many"]
PLUG_LABELS = ["off", "fridge", "kettle"]


def test_config(tmp: Path, url: str, prefix: str) -> Path:
    import yaml

    from tests.onnx_models import snapshot_classifier, window_classifier

    snapshot_classifier(tmp / "snap.onnx", FEATURES, LABELS)
    window_classifier(tmp / "win.onnx", ["power"], 6, PLUG_LABELS)
    config = {
        "mqtt": {
            "url": url,
            "base_topic": f"{prefix}/ei",
            "client_id": f"ei-{prefix}",
            "keepalive": 10,
            "reconnect_min_s": 0.5,
            "reconnect_max_s": 2.0,
        },
        "models": {"snap": {"path": "snap.onnx"}, "win": {"path": "win.onnx"}},
        "pipelines": {
            "room": {
                "model": "snap",
                "source": {"topics": [f"{prefix}/z2m/{{device}}"]},
                "features": {"type": "snapshot", "max_age_s": 600},
            },
            "plug": {
                "model": "win",
                "source": {"topics": [f"{prefix}/tele/{{device}}/SENSOR"], "timestamp_field": "t"},
                "inputs": {"power": "ENERGY.Power"},
                "features": {"type": "window", "hop": 2},
            },
        },
        "homeassistant": {"enabled": False},
    }
    path = tmp / "arm64-test.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def check_configs(plat: Platforms, tmp: Path) -> dict[str, Any]:
    test = test_config(tmp / "cfg", "mqtt://127.0.0.1:1883", "arm64")
    configs = [*sorted((REPO / "examples").glob("*.yaml")), test]
    results = []
    for config in configs:
        start = time.monotonic()
        proc = plat.run("arm64", "-m", "edge.cli", "check", "-c", str(config), timeout=600)
        results.append(
            {
                "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else config.name,
                "rc": proc.returncode,
                "ok": proc.returncode == 0 and "config OK" in proc.stdout,
                "seconds": round(time.monotonic() - start, 1),
                "plan": proc.stdout[-1500:],
                **({"stderr": proc.stderr[-1500:]} if proc.returncode else {}),
            }
        )
    return {
        "ok": all(r["ok"] for r in results),
        "examples_found": len(configs) - 1,
        "configs": results,
    }


def _host_ort(path: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": batch.astype(np.float32)})[0])


def check_daemon(plat: Platforms, tmp: Path, run_seconds: float) -> dict[str, Any]:
    from tests.broker import Mosquitto, find_mosquitto
    from tests.harness import Collector, Publisher

    if find_mosquitto() is None:
        return {"ok": False, "error": "mosquitto is not installed (make mosquitto)"}
    prefix = f"a{uuid.uuid4().hex[:8]}"
    work = tmp / "daemon"
    work.mkdir()
    broker = Mosquitto(work / "mosquitto").start()
    out = pub = None
    proc: subprocess.Popen[str] | None = None
    log_path = work / "daemon.log"
    try:
        config = test_config(work, broker.url, prefix)
        out = Collector(broker.url, f"{prefix}/ei/#")
        pub = Publisher(broker.url)
        cmd, env = plat.command("arm64", "-m", "edge.cli", "run", "-c", str(config))
        started = time.monotonic()
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
            )
        status = f"{prefix}/ei/status"
        out.wait(lambda m: any(x.topic == status and x.payload == b"online" for x in m), timeout=300)
        ready_s = time.monotonic() - started
        rng = np.random.default_rng(3)
        rooms = {
            "kitchen": rng.normal(size=(5, 3)) * [5, 10, 300] + [21, 45, 600],
            "bedroom": rng.normal(size=(5, 3)) * [5, 10, 300] + [18, 55, 900],
        }
        plugs = {"p1": np.arange(10, dtype=float) * 10.0, "p2": 1000.0 - np.arange(10, dtype=float) * 7}
        for i in range(5):
            for device, rows in rooms.items():
                pub.send(f"{prefix}/z2m/{device}", dict(zip(FEATURES, rows[i].tolist(), strict=True)))
        for i in range(10):
            for device, series in plugs.items():
                pub.send(
                    f"{prefix}/tele/{device}/SENSOR",
                    {"t": 1_700_000_000 + i, "ENERGY": {"Power": float(series[i])}},
                )
        for device in rooms:
            out.wait_count(f"{prefix}/ei/room/{device}", 5, timeout=300)
        for device in plugs:
            topic = f"{prefix}/ei/plug/{device}"
            out.wait(lambda m, t=topic: sum(x.topic == t for x in m) >= 3, timeout=300)
        # keep it running a few seconds (bridge info, no crash), then SIGTERM as systemd would
        deadline = started + ready_s + run_seconds
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        with contextlib.suppress(AssertionError):
            out.wait(lambda m: [x.payload for x in m if x.topic == status][-1:] == [b"offline"], timeout=20)
        ran_s = time.monotonic() - started
        # compare with ONNX Runtime on the host
        diffs: list[float] = []
        mismatches: list[str] = []
        count = 0
        for device, rows in rooms.items():
            expected = _host_ort(work / "snap.onnx", rows)
            got = [m.json() for m in out.on(f"{prefix}/ei/room/{device}")]
            for row, message in zip(expected, got, strict=False):
                count += 1
                diffs.append(abs(message["confidence"] - float(row.max())))
                if message["label"] != LABELS[int(np.argmax(row))]:
                    mismatches.append(f"room/{device}: {message['label']}")
            if len(got) != len(expected):
                mismatches.append(f"room/{device}: {len(got)} predictions, expected {len(expected)}")
        for device, series in plugs.items():
            windows = np.stack([series[i - 5 : i + 1] for i in (5, 7, 9)])[:, :, None]
            expected = _host_ort(work / "win.onnx", windows)
            got = [m.json() for m in out.on(f"{prefix}/ei/plug/{device}")]
            for row, message in zip(expected, got, strict=False):
                count += 1
                probs = {alt["label"]: alt["p"] for alt in message["top_k"]}
                diffs.extend(abs(probs[label] - float(row[i])) for i, label in enumerate(PLUG_LABELS))
                if message["label"] != PLUG_LABELS[int(np.argmax(row))]:
                    mismatches.append(f"plug/{device}: {message['label']}")
            if len(got) != len(expected):
                mismatches.append(f"plug/{device}: {len(got)} predictions, expected {len(expected)}")
        statuses = [m.payload.decode() for m in out.on(status)]
        bridge = [m.json() for m in out.on(f"{prefix}/ei/bridge/info")]
        providers = bridge[-1]["models"]["snap"]["providers"] if bridge else None
        max_diff = max(diffs) if diffs else None
        return {
            "ok": alive
            and rc == 0
            and not mismatches
            and count == 16
            and max_diff is not None
            and max_diff <= 1e-4
            and statuses[-1:] == ["offline"],
            "predictions": count,
            "label_mismatches": mismatches,
            "max_abs_diff_vs_host_ort": max_diff,
            "tolerance": 1e-4,
            "ready_seconds": round(ready_s, 1),
            "ran_seconds": round(ran_s, 1),
            "alive_until_sigterm": alive,
            "exit_code": rc,
            "status_messages": statuses,
            "providers": providers,
            "log_tail": log_path.read_text(errors="replace")[-1500:],
        }
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for client in (out, pub):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        broker.stop()


def check_daemon_zoo(plat: Platforms, tmp: Path, windows: int = 4) -> dict[str, Any]:
    """The daemon under emulation with the smallest zoo model, fed its test split through MQTT."""
    from tests.broker import Mosquitto
    from tests.harness import Collector, Publisher

    candidates = []
    for entry in discover_zoo(REPO / "models"):
        if entry["split"] is None:
            continue
        manifest, input_name = _manifest(entry["model"])
        if manifest is None or manifest.input.layout not in ("window", "snapshot"):
            continue
        size = (manifest.input.window or 1) * len(manifest.input.features)
        candidates.append((size, entry["model"], entry["split"], manifest, input_name))
    if not candidates:
        return {"ok": True, "note": "no zoo model with a window/snapshot layout and a test split yet"}
    _, model, split, manifest, input_name = min(candidates, key=lambda c: c[0])
    x, _ = load_split(split)
    x = x[: windows * 37 : 37]  # a few windows spread over the split
    features = list(manifest.input.features)
    window = manifest.input.window if manifest.input.layout == "window" else 1
    period = manifest.input.sample_period_s or 1.0
    prefix = f"z{uuid.uuid4().hex[:8]}"
    work = tmp / "daemon-zoo"
    work.mkdir()
    import yaml

    features_cfg: dict[str, Any] = (
        {"type": "window", "hop": window} if manifest.input.layout == "window" else {"type": "snapshot"}
    )
    config = {
        "mqtt": {"url": "", "base_topic": f"{prefix}/ei", "client_id": f"ei-{prefix}"},
        # max_batch 1: one window per run, compared with the host one by one (the zoo int8 is static
        # QDQ and batch-independent; dynamic int8 would also need the same batching on both sides)
        "models": {"zoo": {"path": str(model), "max_batch": 1}},
        "pipelines": {
            "zoo": {
                "model": "zoo",
                "source": {"topics": [f"{prefix}/sensors/{{device}}"], "timestamp_field": "t"},
                "features": features_cfg,
            }
        },
        "homeassistant": {"enabled": False},
    }
    broker = Mosquitto(work / "mosquitto").start()
    out = pub = None
    proc: subprocess.Popen[str] | None = None
    log_path = work / "daemon.log"
    try:
        config["mqtt"]["url"] = broker.url
        cfg_path = work / "zoo.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        out = Collector(broker.url, f"{prefix}/ei/#")
        pub = Publisher(broker.url)
        cmd, env = plat.command("arm64", "-m", "edge.cli", "run", "-c", str(cfg_path))
        started = time.monotonic()
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
            )
        status = f"{prefix}/ei/status"
        out.wait(lambda m: any(x.topic == status and x.payload == b"online" for x in m), timeout=300)
        t = 1_700_000_000.0
        rows = x.reshape(len(x), window, len(features))
        for sample in rows.reshape(-1, len(features)):
            pub.send(f"{prefix}/sensors/room1", {"t": t, **dict(zip(features, sample.tolist(), strict=True))})
            t += period
        topic = f"{prefix}/ei/zoo/room1"
        out.wait(lambda m: sum(msg.topic == topic for msg in m) >= len(x), timeout=300)
        got = [m.json() for m in out.on(topic)]
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        import onnxruntime as ort

        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        expected = np.concatenate([session.run(None, {input_name: x[i : i + 1]})[0] for i in range(len(x))])
        labels = list(manifest.labels)
        mismatches = [
            i
            for i, (row, msg) in enumerate(zip(expected, got, strict=False))
            if msg["label"] != labels[int(np.argmax(row))]
        ]
        diffs = [abs(msg["confidence"] - float(row.max())) for row, msg in zip(expected, got, strict=False)]
        max_diff = max(diffs) if diffs else None
        return {
            "ok": rc == 0
            and len(got) == len(x)
            and not mismatches
            and max_diff is not None
            and max_diff <= 1e-3,
            "model": str(model.relative_to(REPO)),
            "windows": len(x),
            "predictions": len(got),
            "label_mismatches": mismatches,
            "max_abs_diff_vs_host_ort": max_diff,
            "tolerance": 1e-3,
            "exit_code": rc,
            "ran_seconds": round(time.monotonic() - started, 1),
            "log_tail": log_path.read_text(errors="replace")[-1200:],
        }
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for client in (out, pub):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        broker.stop()


# ---------------------------------------------------------------------- 4. zoo

SPLIT_KEYS = [("x", "y"), ("x_test", "y_test"), ("X_test", "y_test"), ("inputs", "labels"), ("x", None)]


def _manifest(path: Path) -> Any:
    import onnxruntime as ort

    from edge.manifest import manifest_from_metadata

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    return manifest_from_metadata(meta, str(path)), session.get_inputs()[0].name


def load_split(npz: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(npz, allow_pickle=False) as data:
        for xk, yk in SPLIT_KEYS:
            if xk in data.files and (yk is None or yk in data.files):
                return np.asarray(data[xk], dtype=np.float32), (np.asarray(data[yk]) if yk else None)
        raise ValueError(f"{npz.name} has {data.files}; expected x and y (or x_test and y_test)")


def _labels_to_index(y: np.ndarray, labels: list[str]) -> np.ndarray:
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    lookup = {str(label): i for i, label in enumerate(labels)}
    return np.array([lookup.get(str(v), -1) for v in y], dtype=np.int64)


def discover_zoo(models_dir: Path) -> list[dict[str, Any]]:
    found = []
    for model in sorted(models_dir.glob("*/*.int8.onnx")):
        splits = sorted(model.parent.glob("*test*.npz")) or sorted(model.parent.glob("*.npz"))
        found.append({"model": model, "split": splits[0] if splits else None})
    return found


def compare_outputs(
    task: str, outs: dict[str, np.ndarray], y: np.ndarray | None, labels: list[str]
) -> dict[str, Any]:
    base = outs["x86"]
    result: dict[str, Any] = {"platforms": {}}
    y_idx = _labels_to_index(y, labels) if (y is not None and task == "classification") else None
    for name, out in outs.items():
        entry: dict[str, Any] = {"max_abs_diff_vs_x86": float(np.abs(out - base).max()) if out.size else 0.0}
        if task == "classification":
            entry["class_agreement_vs_x86"] = float((out.argmax(-1) == base.argmax(-1)).mean())
            if y_idx is not None:
                entry["accuracy"] = float((out.argmax(-1) == y_idx).mean())
        elif y is not None:
            entry["mae"] = float(np.abs(out.reshape(len(y), -1)[:, 0] - y.astype(np.float64)).mean())
        result["platforms"][name] = entry
    arm = result["platforms"]["arm64"]
    x86 = result["platforms"]["x86"]
    if task == "classification":
        result["accuracy_diff_points"] = (
            round(100.0 * abs(arm["accuracy"] - x86["accuracy"]), 3) if "accuracy" in arm else None
        )
        result["ok"] = (
            arm["class_agreement_vs_x86"] >= 0.99 and (result["accuracy_diff_points"] or 0.0) <= 1.0
        )
    else:
        scale = max(float(np.abs(base).max()), 1e-9)
        result["ok"] = arm["max_abs_diff_vs_x86"] <= 0.01 * scale
    return result


def check_zoo(plat: Platforms, tmp: Path, require: bool) -> dict[str, Any]:
    zoo = discover_zoo(REPO / "models")
    if not zoo:
        return {
            "ok": not require,
            "models": [],
            "note": "no models/*/*.int8.onnx in the tree yet" + (" (required)" if require else ""),
        }
    results = []
    work = tmp / "zoo"
    work.mkdir()
    for entry in zoo:
        model: Path = entry["model"]
        name = str(model.relative_to(REPO))
        if entry["split"] is None:
            results.append({"model": name, "ok": False, "error": "no test split (.npz) beside the model"})
            continue
        try:
            manifest, input_name = _manifest(model)
            x, y = load_split(entry["split"])
            task = manifest.task if manifest else "classification"
            labels = list(manifest.labels) if manifest else []
            npz = work / f"{model.parent.name}-input.npz"
            np.savez(npz, x=x)
            job = {"model": str(model), "input": str(npz), "feeds": {input_name: "x"}, "batch": 64}
            outs: dict[str, np.ndarray] = {}
            seconds: dict[str, float] = {}
            for name_p in plat.names():
                start = time.monotonic()
                result = plat.infer(name_p, [job], work)[0]
                seconds[name_p] = round(time.monotonic() - start, 1)
                out_name = manifest.output.name if manifest else next(iter(result))
                outs[name_p] = np.asarray(result[out_name], dtype=np.float64)
            comparison = compare_outputs(task, outs, y, labels)
            results.append(
                {
                    "model": name,
                    "split": str(entry["split"].relative_to(REPO)),
                    "rows": len(x),
                    "task": task,
                    "quantization": (
                        manifest.model_dump(mode="json").get("quantization") if manifest else None
                    ),
                    "seconds": seconds,
                    **comparison,
                }
            )
        except Exception as exc:
            results.append({"model": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return {"ok": all(r["ok"] for r in results), "models": results}


# ---------------------------------------------------------------------- 5. MatMulInteger


def _matmulinteger_model(path: Path, b: np.ndarray, rows: int) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = b.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "saturation",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, n])],
        [numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _float_mlp(path: Path, features: int, hidden: int, seed: int) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.uniform(-1, 1, size=(features, hidden)).astype(np.float32)
    b1 = rng.uniform(-1, 1, size=(hidden,)).astype(np.float32)
    w2 = rng.uniform(-1, 1, size=(hidden, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["logits"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _quantize_like_exporter(fp32: Path, out: Path, reduce_range: bool) -> dict[str, Any]:
    """The exporter's own quantize_model with its default QuantizeSpec (dynamic: MatMulInteger)."""
    from exporters.quantize import quantize_model
    from exporters.recipe import QuantizeSpec

    spec = QuantizeSpec()
    exporter_default = spec.reduce_range
    spec = spec.model_copy(update={"reduce_range": reduce_range})
    settings = quantize_model(fp32, out, spec, np.zeros((1, 1), np.float32), mode="dynamic")
    return {
        "source": "exporters.quantize.quantize_model",
        "exporter_default_reduce_range": exporter_default,
        **settings,
    }


def check_matmulinteger(plat: Platforms, tmp: Path) -> dict[str, Any]:
    work = tmp / "mmi"
    work.mkdir()
    rng = np.random.default_rng(7)
    rows, k, n = 16, 64, 16
    a = rng.integers(128, 256, size=(rows, k)).astype(np.uint8)  # large activations, as after a ReLU
    full = rng.integers(-128, 128, size=(k, n)).astype(np.int8)  # 8-bit weights, full range
    seven = (full.astype(np.int16) // 2).astype(np.int8)  # 7-bit weights (reduce_range): [-64, 63]
    np.savez(work / "a.npz", a=a)
    raw: dict[str, Any] = {}
    for label, b in (("int8_full_range", full), ("int8_7bit_reduce_range", seven)):
        model = _matmulinteger_model(work / f"{label}.onnx", b, rows)
        exact = a.astype(np.int64) @ b.astype(np.int64)
        job = {"model": str(model), "input": str(work / "a.npz"), "feeds": {"a": "a"}}
        per: dict[str, Any] = {}
        for name in plat.names():
            y = plat.infer(name, [job], work)[0]["y"].astype(np.int64)
            wrong = y != exact
            per[name] = {
                "wrong": int(wrong.sum()),
                "of": int(y.size),
                "max_abs_error": int(np.abs(y - exact).max()),
            }
        raw[label] = per
    # The exporter's settings on a float MLP whose first layer sees large positive activations.
    x = rng.uniform(0.0, 8.0, size=(256, 32)).astype(np.float32)
    np.savez(work / "x.npz", x=x)
    fp32 = _float_mlp(work / "mlp.onnx", 32, 32, seed=11)
    exporter: dict[str, Any] = {}
    for label, reduce_range in (("exporter_settings", True), ("without_reduce_range", False)):
        int8 = work / f"mlp-{label}.int8.onnx"
        try:
            settings = _quantize_like_exporter(fp32, int8, reduce_range)
        except Exception as exc:  # exporters not importable: same call, settings replicated here
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(fp32),
                str(int8),
                per_channel=True,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
            )
            settings = {
                "source": f"replicated (exporters.quantize failed: {type(exc).__name__}: {exc})",
                "per_channel": True,
                "reduce_range": reduce_range,
                "weight_type": "int8",
            }
        job = {"model": str(int8), "input": str(work / "x.npz"), "feeds": {"x": "x"}}
        outs = {name: plat.infer(name, [job], work)[0]["logits"].astype(np.float64) for name in plat.names()}
        scale = float(np.abs(outs["arm64"]).max())
        exporter[label] = {
            "settings": {
                k: settings.get(k)
                for k in (
                    "source",
                    "mode",
                    "per_channel",
                    "reduce_range",
                    "weight_type",
                    "activation_type",
                    "int8_ops",
                    "exporter_default_reduce_range",
                )
                if k in settings
            },
            "max_abs_diff_vs_arm64": {
                name: float(np.abs(out - outs["arm64"]).max())
                for name, out in outs.items()
                if name != "arm64"
            },
            "class_agreement_vs_arm64": {
                name: float((out.argmax(-1) == outs["arm64"].argmax(-1)).mean())
                for name, out in outs.items()
                if name != "arm64"
            },
            "output_scale": scale,
        }
    arm_exact = all(per["arm64"]["wrong"] == 0 for per in raw.values())
    seven_exact = all(p["wrong"] == 0 for p in raw["int8_7bit_reduce_range"].values())
    ours = exporter["exporter_settings"]
    exporter_agrees = all(
        d <= 1e-4 * max(ours["output_scale"], 1.0) for d in ours["max_abs_diff_vs_arm64"].values()
    )
    avx2 = raw["int8_full_range"].get("x86-avx2")
    return {
        "ok": arm_exact and seven_exact and exporter_agrees,
        "arm64_exact": arm_exact,
        "reduce_range_exact_everywhere": seven_exact,
        "exporter_settings_agree_across_platforms": exporter_agrees,
        "avx2_saturation_reproduced": None if avx2 is None else avx2["wrong"] > 0,
        "host_cpu_vnni": host_vnni(),
        "shape": {"a": [rows, k], "b": [k, n]},
        "raw_matmulinteger": raw,
        "quantized_mlp": exporter,
    }


def host_vnni() -> dict[str, bool]:
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return {}
    return {f: f in flags for f in ("avx2", "avx512bw", "avx512_vnni", "avx_vnni")}


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report", type=Path, help="JSON report (default: $ARM64_CACHE/report.json)")
    parser.add_argument(
        "--only", nargs="*", choices=["import", "check", "daemon", "daemon_zoo", "zoo", "matmulinteger"]
    )
    parser.add_argument("--run-seconds", type=float, default=5.0, help="how long the emulated daemon runs")
    parser.add_argument("--require-zoo", action="store_true", help="fail when models/ holds no int8 model")
    parser.add_argument("--no-avx2", action="store_true", help="skip the emulated AVX2 x86 comparisons")
    args = parser.parse_args(argv)
    report_path = args.report or cache_dir() / "report.json"
    plat = Platforms(avx2=not args.no_avx2)
    only = set(args.only or ["import", "check", "daemon", "daemon_zoo", "zoo", "matmulinteger"])
    qemu = find_qemu("qemu-aarch64-static")
    qemu_version = (
        subprocess.run([qemu, "--version"], check=False, capture_output=True, text=True).stdout.splitlines()[
            0
        ]
        if qemu
        else None
    )
    report: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpu_flags": host_vnni(),
        },
        "emulation": {
            "qemu": qemu_version,
            "cpu": os.environ.get("ARM64_CPU", "cortex-a72"),
            "platforms": plat.names(),
            "avx2_cpu": AVX2_CPU if plat.qemu_x86 else None,
            "note": "emulated timings are for sizing CI only; a real Pi is hundreds of times faster",
        },
        "checks": {},
    }
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edge-arm64-") as tmp_name:
        tmp = Path(tmp_name)
        if "import" in only:
            timed(report, "import", lambda: check_import(plat))
        if "check" in only:
            timed(report, "check", lambda: check_configs(plat, tmp))
        if "daemon" in only:
            timed(report, "daemon", lambda: check_daemon(plat, tmp, args.run_seconds))
        if "daemon_zoo" in only:
            timed(report, "daemon_zoo", lambda: check_daemon_zoo(plat, tmp))
        if "zoo" in only:
            timed(report, "zoo", lambda: check_zoo(plat, tmp, args.require_zoo))
        if "matmulinteger" in only:
            timed(report, "matmulinteger", lambda: check_matmulinteger(plat, tmp))
    report["seconds"] = round(time.monotonic() - start, 1)
    report["ok"] = all(c.get("ok") for c in report["checks"].values())
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    verdict = "passed" if report["ok"] else "FAILED"
    print(f"arm64 checks {verdict} in {report['seconds']} s; report: {report_path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
