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


def write_between(path: Path, markers: tuple[str, str], body: str) -> None:
    """Put ``body`` between the two ``markers`` lines of the page ``path`` (appended with them if absent):
    how the benchmarks keep their tables in the docs equal to their saved results."""
    start, end = markers
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
