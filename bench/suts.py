"""The baselines, each run as its own process: ``python -m bench.suts KIND --port P --prefix PFX ...``.

* ``echo``: the ceiling, a raw paho-mqtt callback that parses the JSON and publishes it back.
* ``naive``: what one writes with aiomqtt: ``async for`` + one ONNX Runtime call + ``await publish``.
* ``torch``: a paho-mqtt callback with the same network in PyTorch eager mode.
* ``cpipe``: the physical reference, Mosquitto's C clients relaying through the broker:
  ``mosquitto_sub -t PFX/in/+ | mosquitto_pub -l -t PFX/out/x/all`` (payloads untouched, so
  the echoed ``t`` still gives the latency; one answer topic for every device).

Each subscribes to ``PFX/in/+``, answers on ``PFX/out/x/<device>`` with the input's send time ``t``
echoed (so the subscriber measures latency exactly), and publishes a retained ``online`` on
``--status`` once subscribed (the harness waits for it: start to ready).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.models import FF_FEATURES, LABELS


def _paho(port: int, client_id: str) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", port, keepalive=60)
    return client


def _ready_on_subscribe(client: Any, status: str) -> None:
    def on_subscribe(c: Any, *_: Any) -> None:
        c.publish(status, b"online", qos=1, retain=True)

    client.on_subscribe = on_subscribe


def run_echo(args: argparse.Namespace) -> None:
    client = _paho(args.port, args.client_id)
    out = f"{args.prefix}/out/x/"
    loads, dumps = json.loads, json.dumps

    def on_message(c: Any, _u: Any, message: Any) -> None:
        data = loads(message.payload)
        c.publish(out + message.topic.rpartition("/")[2], dumps(data))

    client.on_message = on_message
    _ready_on_subscribe(client, args.status)
    client.subscribe(f"{args.prefix}/in/+", 0)
    client.loop_forever()


def run_torch(args: argparse.Namespace) -> None:
    import torch

    weights = np.load(args.weights)
    model = torch.nn.Sequential(
        torch.nn.Linear(len(FF_FEATURES), weights["W1"].shape[1]),
        torch.nn.ReLU(),
        torch.nn.Linear(weights["W1"].shape[1], len(LABELS)),
    )
    first, second = model[0], model[2]
    assert isinstance(first, torch.nn.Linear)
    assert isinstance(second, torch.nn.Linear)
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(weights["W1"].T))
        first.bias.copy_(torch.from_numpy(weights["b1"]))
        second.weight.copy_(torch.from_numpy(weights["W2"].T))
        second.bias.copy_(torch.from_numpy(weights["b2"]))
    model.eval()
    client = _paho(args.port, args.client_id)
    out = f"{args.prefix}/out/x/"

    def on_message(c: Any, _u: Any, message: Any) -> None:
        data = json.loads(message.payload)
        x = torch.tensor([[float(data[f]) for f in FF_FEATURES]], dtype=torch.float32)
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=-1)[0]
        best = int(probs.argmax())
        body = {"t": data["t"], "label": LABELS[best], "confidence": round(float(probs[best]), 4)}
        c.publish(out + message.topic.rpartition("/")[2], json.dumps(body))

    client.on_message = on_message
    _ready_on_subscribe(client, args.status)
    client.subscribe(f"{args.prefix}/in/+", 0)
    client.loop_forever()


async def _naive(args: argparse.Namespace) -> None:
    import aiomqtt
    import onnxruntime as ort

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    out = f"{args.prefix}/out/x/"
    async with aiomqtt.Client("127.0.0.1", args.port, identifier=args.client_id) as client:
        await client.subscribe(f"{args.prefix}/in/+", qos=0)
        await client.publish(args.status, b"online", qos=1, retain=True)
        async for message in client.messages:
            data = json.loads(message.payload)
            x = np.array([[data[f] for f in FF_FEATURES]], dtype=np.float32)
            probs = session.run(None, {"x": x})[0][0]
            best = int(probs.argmax())
            body = {"t": data["t"], "label": LABELS[best], "confidence": round(float(probs[best]), 4)}
            await client.publish(out + message.topic.value.rpartition("/")[2], json.dumps(body), qos=0)


def run_cpipe(args: argparse.Namespace) -> None:
    import signal
    import subprocess
    import time

    host = ["-h", "127.0.0.1", "-p", str(args.port)]
    sub = subprocess.Popen(
        ["mosquitto_sub", *host, "-i", f"{args.client_id}-sub", "-t", f"{args.prefix}/in/+"],
        stdout=subprocess.PIPE,
    )
    pub = subprocess.Popen(
        ["mosquitto_pub", *host, "-i", f"{args.client_id}-pub", "-l", "-t", f"{args.prefix}/out/x/all"],
        stdin=sub.stdout,
    )
    assert sub.stdout is not None
    sub.stdout.close()  # the pipe is the two clients' now

    def stop(*_: Any) -> None:
        for proc in (sub, pub):
            proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    time.sleep(0.5)  # mosquitto_sub says nothing once subscribed; the warm-up checks the path
    subprocess.run(["mosquitto_pub", *host, "-t", args.status, "-m", "online", "-r", "-q", "1"], check=True)
    sub.wait()
    pub.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suts")
    parser.add_argument("kind", choices=["echo", "naive", "torch", "cpipe"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--status", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--model", help="ONNX model (naive)")
    parser.add_argument("--weights", help=".npz weights (torch)")
    args = parser.parse_args(argv)
    try:
        if args.kind == "echo":
            run_echo(args)
        elif args.kind == "torch":
            run_torch(args)
        elif args.kind == "cpipe":
            run_cpipe(args)
        else:
            assert args.model
            assert Path(args.model).is_file()
            asyncio.run(_naive(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
