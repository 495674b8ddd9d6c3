"""``edge-infer record``: capture what a pipeline would feed its model, for training.

Runs the pipeline's own decoding and windowing against the live broker and
writes one row per model input: ``ts, device, pipeline, label`` and the
features (``<feature>`` for snapshots, ``<channel>@<i>`` for windows, oldest
first). Labels come from an MQTT topic (for instance a Home Assistant
``input_select`` mirrored by ``mqtt_statestream``), globally or per device.
``edge-infer train`` reads this format (CSV, or Parquet with pandas/pyarrow).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from edge.config import Config, ConfigError, PipelineConfig, WindowFeatures, load_config
from edge.decode import DecodeError, TopicPattern, compile_path
from edge.mqtt import AckToken, MqttLink
from edge.pipeline import Pipeline, WorkItem
from edge.runtime import LoadedModel, ModelLoadError, ModelSpec

log = logging.getLogger("edge.record")


def columns_for(spec: ModelSpec) -> list[str]:
    if spec.layout == "window":
        return [f"{c}@{i}" for i in range(spec.sample_shape[0]) for c in spec.features]
    return list(spec.features)


def recording_spec(name: str, cfg: PipelineConfig, config: Config) -> ModelSpec:
    """The pipeline's input spec: from its model when the file exists, else from the config alone."""
    model_cfg = config.models[cfg.model]
    if model_cfg.path.is_file():
        model = LoadedModel(cfg.model, model_cfg, config.runtime)
        model.close()
        return model.spec
    if not cfg.inputs:
        raise ConfigError(
            f"pipelines.{name}.inputs",
            f"model file {model_cfg.path} does not exist yet: name the features to record in inputs",
        )
    features = tuple(cfg.inputs)
    period = None
    shape: tuple[int, ...]
    if isinstance(cfg.features, WindowFeatures):
        period = cfg.features.resample_period_s
        if cfg.features.size is None:
            raise ConfigError(f"pipelines.{name}.features.size", "give the window size to record")
        layout, shape = "window", (cfg.features.size, len(features))
    else:
        layout, shape = "snapshot", (len(features),)
    return ModelSpec(
        name=cfg.model,
        path=model_cfg.path,
        task="classification",
        layout=layout,
        input_name="x",
        output_name="y",
        output_kind="probabilities",
        sample_shape=shape,
        features=features,
        labels=(),
        threshold=None,
        unit=None,
        version="0.0.0",
        sha256="",
        sample_period_s=period,
    )


class LabelSource:
    """The current label, from a topic (``{device}`` makes it per device), plain or a JSON field."""

    def __init__(self, topic: str, field: str | None) -> None:
        self.pattern = TopicPattern(topic)
        self.getter = compile_path(field) if field else None
        self.per_device = "device" in self.pattern.names
        self.labels: dict[str, str] = {}

    def update(self, topic: str, payload: bytes) -> bool:
        captured = self.pattern.match(topic)
        if captured is None:
            return False
        text = payload.decode(errors="replace").strip()
        if self.getter is not None:
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                text = str(self.getter(json.loads(text)))
        self.labels[captured.get("device", "") if self.per_device else ""] = text
        return True

    def label(self, device: str) -> str:
        return self.labels.get(device if self.per_device else "", "")


class Recorder:
    def __init__(self, writer: Any, handle: TextIO | None, columns: list[str], max_rows: int | None) -> None:
        self.writer = writer
        self.handle = handle
        self.columns = columns
        self.max_rows = max_rows
        self.rows = 0
        self.rows_parquet: list[list[Any]] = []

    def add(self, item: WorkItem, label: str) -> None:
        vector: npt.NDArray[np.float32] = item.vector
        ts = datetime.fromtimestamp(item.ts, UTC).isoformat(timespec="milliseconds")
        row = [
            ts,
            item.device,
            item.pipeline.name,
            label,
            *(float(f"{x:.7g}") for x in vector.reshape(-1).tolist()),
        ]
        if self.writer is not None:
            self.writer.writerow(row)
        else:
            self.rows_parquet.append(row)
        self.rows += 1

    @property
    def full(self) -> bool:
        return self.max_rows is not None and self.rows >= self.max_rows


def cli_record(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edge-infer record", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("-c", "--config", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="output file: .csv or .parquet")
    parser.add_argument("--pipeline", help="pipeline to record (default: the only one, else required)")
    parser.add_argument(
        "--label-topic", help="topic carrying the current label; {device} for per-device labels"
    )
    parser.add_argument("--label-field", help="JSON field of the label payload (default: the whole payload)")
    parser.add_argument("--max-rows", type=int, help="stop after this many rows")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--unlabelled", action="store_true", help="also keep rows while no label is known")
    parser.add_argument("--mqtt-url")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.mqtt_url)
        names = [n for n, p in config.pipelines.items() if p.enabled]
        name = args.pipeline or (names[0] if len(names) == 1 else None)
        if name is None or name not in config.pipelines:
            raise ConfigError("pipelines", f"choose one with --pipeline: {', '.join(names)}")
        pcfg = config.pipelines[name]
        spec = recording_spec(name, pcfg, config)
        pipeline = Pipeline(name, pcfg, spec, config)
    except (ConfigError, ModelLoadError, ValueError) as exc:
        print(f"edge-infer record: {exc}", file=sys.stderr)
        return 2
    parquet = args.out.suffix == ".parquet"
    columns = ["ts", "device", "pipeline", "label", *columns_for(spec)]
    labels = LabelSource(args.label_topic, args.label_field) if args.label_topic else None
    handle: TextIO | None = None
    writer = None
    if not parquet:
        handle = args.out.open("w", newline="")
        writer = csv.writer(handle)
        writer.writerow(columns)
    recorder = Recorder(writer, handle, columns, args.max_rows)
    stats = {"dropped": 0, "unlabelled": 0}
    asyncio.run(_record(config, pipeline, labels, recorder, args, stats))
    if parquet:
        try:
            import pandas as pd
        except ImportError:
            print(
                "edge-infer record: Parquet needs pandas and pyarrow (pip install 'edge-infer[train]')",
                file=sys.stderr,
            )
            return 3
        pd.DataFrame(recorder.rows_parquet, columns=columns).to_parquet(args.out, index=False)
    elif handle is not None:
        handle.close()
    print(
        f"recorded {recorder.rows} rows of {len(columns) - 4} features to {args.out} "
        f"({stats['unlabelled']} skipped without a label, {stats['dropped']} rejected)",
        file=sys.stderr,
    )
    return 0


async def _record(  # noqa: PLR0917
    config: Config,
    pipeline: Pipeline,
    labels: LabelSource | None,
    recorder: Recorder,
    args: argparse.Namespace,
    stats: dict[str, int],
) -> None:
    done = asyncio.Event()

    def on_message(topic: str, payload: bytes, ack: AckToken | None = None) -> None:
        link.ack(ack)
        if labels is not None and labels.update(topic, payload):
            return
        try:
            items = pipeline.handle(topic, payload, time.perf_counter(), lambda *_: None)
        except DecodeError as exc:
            stats["dropped"] += 1
            log.debug("dropped: %s", exc)
            return
        for item in items:
            label = labels.label(item.device) if labels is not None else ""
            if labels is not None and not label and not args.unlabelled:
                stats["unlabelled"] += 1
                continue
            recorder.add(item, label)
            if recorder.full:
                done.set()

    def subscriptions() -> list[tuple[str, int]]:
        subs = [(f, 1) for f in pipeline.filters]
        if labels is not None:
            subs.append((labels.pattern.filter, 1))
        return subs

    # Its own client id and a clean session, so recording never disturbs a running daemon.
    mqtt_cfg = config.mqtt.model_copy(
        update={
            "client_id": f"{config.mqtt.resolved_client_id()}-record-{os.getpid()}",
            "persistent_session": False,
        }
    )
    link = MqttLink(
        mqtt_cfg,
        subscriptions=subscriptions,
        on_message=on_message,
        status_topic=f"{config.mqtt.base_topic}/record/status",
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    started = time.monotonic()
    try:
        async with link:
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 1.0)
                elapsed = time.monotonic() - started
                if args.duration is not None and elapsed >= args.duration:
                    break
                if not args.quiet and sys.stderr.isatty():
                    target = f"/{args.max_rows}" if args.max_rows else ""
                    print(
                        f"\rrecording {pipeline.name}: {recorder.rows}{target} rows, {elapsed:.0f}s",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        if not args.quiet and sys.stderr.isatty():
            print(file=sys.stderr)
