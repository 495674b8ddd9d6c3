"""Home Assistant WebSocket API commands for tests/test_ha_real.py, run with the Home Assistant
venv's Python (it has aiohttp; edge-infer's venv does not need it).

    python ws.py ws://127.0.0.1:PORT/api/websocket TOKEN < commands.json  ->  results.json

``commands.json`` is a list of command objects without ``id`` (e.g.
``{"type": "config/entity_registry/update", "entity_id": ..., "name": ...}``); the output is the
list of result messages in the same order. Registry edits (entity names, device areas) exist only
in the WebSocket API, not in the REST API.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp


async def run(url: str, token: str, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        hello = await ws.receive_json()
        if hello.get("type") != "auth_required":
            raise SystemExit(f"unexpected greeting {hello}")
        await ws.send_json({"type": "auth", "access_token": token})
        auth = await ws.receive_json()
        if auth.get("type") != "auth_ok":
            raise SystemExit(f"authentication failed: {auth}")
        results = []
        for number, command in enumerate(commands, 1):
            await ws.send_json({**command, "id": number})
            while True:
                message = await asyncio.wait_for(ws.receive_json(), 30)
                if message.get("id") == number and message.get("type") == "result":
                    break
            results.append(message)
        return results


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(sys.argv[1], sys.argv[2], json.load(sys.stdin)))))
