"""Helpers shared by the tests that run `megacore train` from its command line."""

from __future__ import annotations

import json


def train_argv(options: dict) -> list[str]:
    """The command line of ``megacore train`` for a dict of TrainConfig options (booleans as --flag /
    --no-flag, dicts as JSON)."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv
