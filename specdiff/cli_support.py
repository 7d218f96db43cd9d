"""What every `specdiff` command job shares (the image, masked and text jobs): the one-line user
error, quiet loading bars, and one sampler's figures combined over batches and processes."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path


class CLIError(SystemExit):
    """A user error: one clear line on stderr (printed by :func:`main`), exit status 2, no traceback."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


@contextmanager
def loading_bars(shown: bool):
    """diffusers' and transformers' loading bars ("Loading pipeline components", "Loading weights"): off
    inside unless ``shown``."""
    from importlib.util import find_spec

    from diffusers.utils import logging as diffusers_logging

    libraries = [diffusers_logging]
    if find_spec("transformers") is not None:
        from transformers.utils import logging as transformers_logging

        libraries.append(transformers_logging)
    states = [(lib, lib.is_progress_bar_enabled()) for lib in libraries]
    if not shown:
        for lib, _ in states:
            lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was_on in states:
            if was_on:
                lib.enable_progress_bar()


def combine_records(records: list[dict], ranks: list[int]) -> dict:
    """One sampler's figures over every batch: processes run in parallel, a process's batches in turn."""
    per_rank = {}
    for record, rank in zip(records, ranks):
        calls, wall = per_rank.get(rank, (0, 0.0))
        per_rank[rank] = (calls + record["stats"]["target_calls"], wall + record["wall_clock_s"])
    stats = [r["stats"] for r in records]
    out = {
        "target_calls": max(c for c, _ in per_rank.values()),
        "target_rows": sum(s["target_rows"] for s in stats),
        "wall_clock_s": max(w for _, w in per_rank.values()),
    }
    if "proposed" in stats[0]:
        proposed, accepted = sum(s["proposed"] for s in stats), sum(s["accepted"] for s in stats)
        out.update(draft_calls=max(sum(s["draft_calls"] for s, r in zip(stats, ranks) if r == k) for k in per_rank),
                   proposed=proposed, accepted=accepted, acceptance_rate=accepted / proposed if proposed else 1.0)
    out["batches"] = [dict(s, seeds=r["seeds"], process=k, wall_clock_s=r["wall_clock_s"])
                      for s, r, k in zip(stats, records, ranks)]
    return out


def replayed_windows(args, seeds) -> int | str | list[int]:
    """The window of a batch: ``--window``, or with ``--replay`` the schedule that batch ran (its stats)."""
    if not getattr(args, "replay", None):
        return args.window
    try:
        report = json.loads(Path(args.replay).read_text())
        schedules = {tuple(b["seeds"]): b["chosen_windows"] for b in report["speculative"]["batches"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CLIError(f"--replay {args.replay}: not a stats.json written by specdiff generate ({err})") from None
    if tuple(seeds) not in schedules:
        raise CLIError(f"--replay {args.replay}: it has no batch of seeds {list(seeds)}; pass the --seed, --num-images "
                       "and --batch-size of the run that wrote it")
    return schedules[tuple(seeds)]
