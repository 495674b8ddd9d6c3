"""Every config in README.md and docs/ marked as a complete example passes ``edge-infer check``,
and the docs name only keys the code has."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- complete example -->"
BLOCK = re.compile(r"^" + re.escape(MARKER) + r"[ \t]*\n```ya?ml\n(.*?)\n```", re.S | re.M)
LINE = re.compile(r"^" + re.escape(MARKER) + r"[ \t]*$", re.M)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def complete_examples() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        blocks = BLOCK.findall(text)
        # a marker must be followed by a yaml fence (a typo would silently skip a block)
        assert len(blocks) == len(LINE.findall(text)), f"{doc.name}: a {MARKER} not before a yaml fence"
        found += [(f"{doc.relative_to(ROOT)}#{i + 1}", block) for i, block in enumerate(blocks)]
    return found


EXAMPLES = complete_examples()


def test_the_docs_have_complete_examples() -> None:
    names = {name.split("#")[0] for name, _ in EXAMPLES}
    assert {"README.md", "docs/configuration.md"} <= names


@pytest.mark.parametrize(("name", "text"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_complete_example_passes_check(name: str, text: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text + "\n")
    env = {k: v for k, v in os.environ.items() if k != "EDGE_INFER_MQTT_URL"}
    env["EDGE_INFER_MQTT_PASSWORD"] = "example"  # the examples that name password_env
    result = subprocess.run(
        [sys.executable, "-m", "edge.cli", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
    assert "config OK" in result.stdout


def test_docs_name_the_source_keys_the_code_has() -> None:
    from edge.config import JsonSource

    keys = set(JsonSource.model_fields)
    for doc in DOCS:
        text = doc.read_text()
        for stale in ("device_path", "timestamp_path"):
            assert stale not in text, f"{doc.name} names {stale!r}; the source keys are {sorted(keys)}"
    assert {"device_field", "timestamp_field"} <= keys
