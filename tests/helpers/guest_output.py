"""Reading what a guest script printed, and the data patterns the guest tests write."""

from __future__ import annotations

import collections
import hashlib
import json
import random
from pathlib import Path

#: This directory: the guest scripts live here (they are copied into the guest).
HELPERS = Path(__file__).resolve().parent
KiB = 1024
MiB = 1024 * KiB


def guest_steps(output: str) -> dict[str, list[dict[str, object]]]:
    """The guest script's JSON lines, by step."""
    steps: dict[str, list[dict[str, object]]] = collections.defaultdict(list)
    for line in output.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            steps[record.pop("step")].append(record)
    return steps


def seeded(seed: int, length: int) -> bytes:
    """The bytes ``guest_blkcheck.py`` writes for ``seed`` (same generator)."""
    return random.Random(seed).randbytes(length)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
