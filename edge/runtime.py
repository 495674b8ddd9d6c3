"""ONNX Runtime sessions: loading, provider fallback, validation, warm-up, threaded inference.

Inference runs in one worker thread per model (ONNX Runtime releases the GIL),
never on the event loop. A model is described by a :class:`ModelSpec`, the
manifest merged with the config's overrides, so the rest of the daemon never
reads the ONNX file again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edge.alarm import AlarmRule, AlarmRuleError
from edge.config import ModelConfig, RuntimeConfig
from edge.manifest import Manifest, ManifestError, Task, manifest_from_metadata

log = logging.getLogger("edge.runtime")
_T = TypeVar("_T")

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}
AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelLoadError(RuntimeError):
    """A model that cannot serve: unreadable, wrong hash, inputs that do not fit its pipelines."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model!r}: {reason}")
        self.model = model
        self.reason = reason


@dataclass(frozen=True)
class ModelSpec:
    """What the daemon needs to know about a model (manifest + config overrides)."""

    name: str
    path: Path
    task: Task
    layout: str
    input_name: str
    output_name: str
    output_kind: str
    sample_shape: tuple[int, ...]
    features: tuple[str, ...]
    labels: tuple[str, ...]
    threshold: float | None
    unit: str | None
    version: str
    sha256: str
    sample_period_s: float | None
    manifest: Manifest | None = field(default=None, compare=False)
    #: open set: the graph output with the out-of-distribution score and the threshold above
    #: which a classification is published as ``unknown`` (manifest ``provenance.ood``)
    ood_output: str | None = None
    ood_threshold: float | None = None
    #: anomaly: the alarm's persistence rule (manifest ``provenance.alarm``, edge/alarm.py);
    #: None: every window at or over the threshold is an alarm window, as before
    alarm: AlarmRule | None = None


def resolve_providers(requested: list[str] | str, available: list[str]) -> tuple[list[str], list[str]]:
    """Providers to use (CPU always last) and a note for each requested one that is missing."""
    notes: list[str] = []
    if requested == "auto":
        chosen = [p for p in AUTO_ORDER if p in available]
        skipped = [p for p in AUTO_ORDER if p not in available]
        notes += [f"{p} not available in this onnxruntime build" for p in skipped]
    else:
        chosen = []
        for name in requested:
            full = PROVIDER_ALIASES.get(name.lower(), name)
            if full in available:
                chosen.append(full)
            else:
                notes.append(f"{full} requested but not available; falling back")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen, notes


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _session_options(runtime: RuntimeConfig, model: ModelConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = (
        model.intra_op_threads if model.intra_op_threads is not None else (runtime.intra_op_threads)
    )
    options.inter_op_num_threads = runtime.inter_op_threads
    options.graph_optimization_level = _OPT_LEVELS[runtime.graph_optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # The arena keeps what the largest batch needed (and grows in powers of two). Off, a call's
    # buffers go back to malloc, and those of 256 KiB or more to the system (edge/memory.py), so
    # the next call faults them in again: ~9 MB less peak RSS with examples/home.yaml, but the
    # appliance CNN's batches of 5 ~6x slower per call (docs/performance.md, Memory).
    options.enable_cpu_mem_arena = runtime.cpu_mem_arena
    # Spinning worker threads burn a Pi's cores while idle; we batch instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _provider_options(providers: list[str], runtime: RuntimeConfig) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for provider in providers:
        opts: dict[str, Any] = {}
        if provider == "TensorrtExecutionProvider":
            if runtime.trt_cache_dir is not None:
                opts["trt_engine_cache_enable"] = True
                opts["trt_engine_cache_path"] = str(runtime.trt_cache_dir)
            opts["trt_fp16_enable"] = runtime.trt_fp16
        result.append(opts)
    return result


def _dim(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


class LoadedModel:
    """An ONNX Runtime session with its spec and a dedicated worker thread."""

    def __init__(self, name: str, config: ModelConfig, runtime: RuntimeConfig) -> None:
        self.name = name
        self.config = config
        path = config.path
        if not path.is_file():
            raise ModelLoadError(name, f"file {path} does not exist (models.{name}.path)")
        sha = file_sha256(path)
        if config.sha256 is not None and sha != config.sha256:
            raise ModelLoadError(
                name, f"sha256 of {path} is {sha}, not the pinned {config.sha256} (models.{name}.sha256)"
            )
        requested = config.providers if config.providers is not None else runtime.providers
        providers, notes = resolve_providers(requested, ort.get_available_providers())
        for note in notes:
            (log.warning if requested != "auto" else log.info)("model=%s %s", name, note)
        try:
            self.session = ort.InferenceSession(
                str(path),
                _session_options(runtime, config),
                providers=providers,
                provider_options=_provider_options(providers, runtime),
            )
        except Exception as exc:
            raise ModelLoadError(name, f"ONNX Runtime cannot load {path}: {exc}") from None
        self.providers = self.session.get_providers()
        log.info("model=%s loaded %s on %s", name, path.name, ",".join(self.providers))
        try:
            manifest = manifest_from_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        except ManifestError as exc:
            raise ModelLoadError(name, str(exc)) from None
        self.spec = self._spec(manifest, sha)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")
        self.last_progress = time.monotonic()
        self.busy_since: float | None = None
        self.warm_up()

    def _spec(self, manifest: Manifest | None, sha: str) -> ModelSpec:
        cfg = self.config
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise ModelLoadError(
                self.name, f"has {len(inputs)} inputs ({names}); edge-infer feeds exactly one"
            )
        graph_input = inputs[0]
        if manifest is not None and manifest.input.name != graph_input.name:
            raise ModelLoadError(
                self.name,
                f"manifest names input {manifest.input.name!r} but the graph's is {graph_input.name!r}",
            )
        dims = list(graph_input.shape)
        if not dims:
            raise ModelLoadError(self.name, f"input {graph_input.name!r} is a scalar")
        item_dims = [_dim(d) for d in dims[1:]]
        output_name = manifest.output.name if manifest is not None else outputs[0].name
        if output_name not in [o.name for o in outputs]:
            raise ModelLoadError(
                self.name, f"manifest output {output_name!r} is not among the graph's outputs"
            )
        features = tuple(cfg.features or (manifest.input.features if manifest else []))
        layout = manifest.input.layout if manifest else ("snapshot" if len(item_dims) == 1 else "window")
        window = cfg.window or (manifest.input.window if manifest else None)
        if layout == "snapshot":
            sample: tuple[int | None, ...] = (len(features) if features else item_dims[0],)
        elif layout == "window":
            sample = (window or item_dims[0], len(features) if features else item_dims[-1])
        else:
            grid = manifest.input.grid if manifest and manifest.input.grid else tuple(item_dims)
            sample = tuple(grid)
        if any(s is None for s in sample):
            raise ModelLoadError(
                self.name,
                f"cannot tell the input size of {graph_input.name!r} {dims}: "
                f"give models.{self.name}.features{' and window' if layout == 'window' else ''}",
            )
        sample_shape = tuple(int(s) for s in sample if s is not None)
        if len(item_dims) != len(sample_shape) or any(
            d is not None and d != s for d, s in zip(item_dims, sample_shape, strict=False)
        ):
            raise ModelLoadError(
                self.name,
                f"input {graph_input.name!r} has shape {dims} but the pipeline feeds "
                f"[batch, {', '.join(map(str, sample_shape))}] ({layout}, features {list(features)})",
            )
        if not features:
            features = tuple(f"f{i}" for i in range(sample_shape[-1] if layout != "grid" else 0))
        task: Task
        if cfg.task is not None:
            task = cfg.task
        elif manifest is not None:
            task = manifest.task
        else:  # never guessed: a classifier served as a regression publishes nonsense
            raise ModelLoadError(
                self.name,
                f"{self.config.path} has no edge-infer manifest: say what it predicts in "
                f"models.{self.name}.task (classification, regression or anomaly)",
            )
        labels = tuple(cfg.labels or (manifest.labels if manifest else []))
        kind = manifest.output.kind if manifest else ("logits" if task == "classification" else "value")
        out_shape = next(o.shape for o in outputs if o.name == output_name)
        out_width = _dim(out_shape[-1]) if len(out_shape) > 1 else 1
        if task == "classification":
            if not labels:
                raise ModelLoadError(
                    self.name, f"classification needs labels: give models.{self.name}.labels"
                )
            if out_width is not None and out_width != len(labels):
                raise ModelLoadError(
                    self.name, f"output {output_name!r} has {out_width} classes but {len(labels)} labels"
                )
        ood_output, ood_threshold = self._ood(manifest, task, [o.name for o in outputs])
        return ModelSpec(
            name=self.name,
            path=self.config.path,
            task=task,
            layout=layout,
            input_name=graph_input.name,
            output_name=output_name,
            output_kind=kind,
            sample_shape=sample_shape,
            features=features,
            labels=labels,
            threshold=cfg.threshold
            if cfg.threshold is not None
            else (manifest.threshold if manifest else None),
            unit=cfg.unit or (manifest.output.unit if manifest else None),
            version=manifest.version if manifest else "0.0.0",
            sha256=sha,
            sample_period_s=manifest.input.sample_period_s if manifest else None,
            manifest=manifest,
            ood_output=ood_output,
            ood_threshold=ood_threshold,
            alarm=self._alarm(manifest, task),
        )

    def _alarm(self, manifest: Manifest | None, task: str) -> AlarmRule | None:
        """An anomaly model's persistence rule (``provenance.alarm``), checked."""
        record = manifest.provenance.get("alarm") if manifest is not None else None
        if record is None or task != "anomaly":
            return None
        try:
            return AlarmRule.from_record(record, f"model {self.name!r} manifest provenance.alarm")
        except AlarmRuleError as exc:
            raise ModelLoadError(self.name, str(exc)) from None

    def _ood(
        self, manifest: Manifest | None, task: str, outputs: list[str]
    ) -> tuple[str | None, float | None]:
        """The OOD output and threshold a classifier's manifest names (``provenance.ood``), checked."""
        record = manifest.provenance.get("ood") if manifest is not None else None
        if record is None or task != "classification":
            return None, None
        where = f"model {self.name!r} manifest provenance.ood"
        if not isinstance(record, dict):
            raise ModelLoadError(self.name, f"{where} is not an object")
        output, threshold = record.get("output"), record.get("threshold")
        if not isinstance(output, str) or output not in outputs:
            raise ModelLoadError(
                self.name, f"{where}.output {output!r} is not among the graph's outputs {outputs}"
            )
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not np.isfinite(threshold)
        ):
            raise ModelLoadError(self.name, f"{where}.threshold {threshold!r} is not a finite number")
        return output, float(threshold)

    def warm_up(self) -> None:
        """One zero-tensor run at batch 1, so the first real message is not slow and errors show now."""
        zeros = np.zeros((1, *self.spec.sample_shape), dtype=np.float32)
        try:
            self.run_sync(zeros)
        except Exception as exc:
            raise ModelLoadError(self.name, f"warm-up inference failed: {exc}") from None

    def run_sync(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The model's output for ``batch``, ``[batch, width]``; with an OOD output its score is
        one more column at the end (what :class:`edge.outputs.PostProcessor` splits off)."""
        spec = self.spec
        names = [spec.output_name] if spec.ood_output is None else [spec.output_name, spec.ood_output]
        self.busy_since = time.monotonic()
        try:
            results = self.session.run(names, {spec.input_name: batch})
        finally:
            self.busy_since = None
            self.last_progress = time.monotonic()
        out = np.asarray(results[0], dtype=np.float32)
        if out.ndim == 1:
            out = out.reshape(-1, 1)
        if spec.ood_output is not None:
            score = np.asarray(results[1], dtype=np.float32).reshape(len(out), 1)
            out = np.concatenate([out, score], axis=1)
        return out

    async def run(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_sync, batch)

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in this model's worker thread, after (never beside) its inference calls:
        work that runs the session again, e.g. the occluded rows of explained answers (edge/explain.py)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def stalled_for(self) -> float:
        """Seconds the current inference call has been running (0 when idle)."""
        busy = self.busy_since
        return 0.0 if busy is None else time.monotonic() - busy

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
