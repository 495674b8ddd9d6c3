"""``python -m exporters train|export|quantize|verify|stats ...``: the training steps as a process of
their own (``edge-infer learn`` runs training this way, never in its own process)."""

from __future__ import annotations

import sys

from exporters.cli import cli_export, cli_quantize, cli_train, cli_verify
from exporters.stats import cli_stats

COMMANDS = {
    "train": cli_train,
    "export": cli_export,
    "quantize": cli_quantize,
    "verify": cli_verify,
    "stats": cli_stats,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m exporters {{{','.join(COMMANDS)}}} ARGS...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
