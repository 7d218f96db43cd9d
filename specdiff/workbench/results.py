"""What every benchmark writes beside its numbers: the machine it ran on, and the JSON file."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def environment() -> dict:
    """torch version, threads, machine and date: the context a result is read in."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
