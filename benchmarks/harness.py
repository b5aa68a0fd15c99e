"""The harness every benchmark times with: warm-up, interleaved rounds, load, result files.

A shared machine drifts (other processes, thermal limits), so no time is compared
with one measured at another moment. Every benchmark therefore

1. warms each candidate up (tracing, compilation, first allocations) untimed
   (`warm_up`);
2. runs **interleaved rounds** (`interleave`): in each round every candidate runs its
   steps in turn, so a drift hits all of them alike, and the machine's load average
   is recorded at the start of each round;
3. reports a candidate's cost as a **ratio to its base** (`ratio_to`): per round,
   the candidate's mean step time over its base's mean in the same round; the median
   over rounds, with the interquartile range of the per-round ratios as its spread
   (a mean within a round, so that a periodic method such as LookSAM pays for its
   occasional expensive step);
4. records the load at the start and end (`machine_load`) and flags a run whose
   load average exceeded the cores' count: its absolute times are not comparable,
   its ratios less so (`load_note` says so in the markdown); ``--max-load`` refuses
   to start above a given load;
5. writes ``<stem>.json`` (everything, machine included), ``<stem>.md`` and
   optionally ``<stem>.png`` (`write_results`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: A candidate's timed step: runs one step (blocking until it is done), returns seconds.
Step = Callable[[], float]


def timed(run: Callable[[], Any], block: Callable[[Any], Any] = lambda out: out) -> Step:
    """A `Step` that times ``block(run())`` (``block`` waits for asynchronous work)."""

    def step() -> float:
        start = time.perf_counter()
        block(run())
        return time.perf_counter() - start

    return step


def warm_up(steps: dict[str, Step], count: int) -> dict[str, float]:
    """Runs each step ``count`` times, untimed for the results; returns the seconds
    each warm-up took (compilation included)."""
    seconds = {}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(count):
            step()
        seconds[name] = time.perf_counter() - start
    return seconds


@dataclasses.dataclass
class Rounds:
    """What `interleave` measured."""

    #: every timed step, per candidate (seconds)
    times: dict[str, list[float]]
    #: per candidate, the mean step time of each round
    round_means: dict[str, list[float]]
    #: the 1/5/15-minute load averages at the start of each round
    loads: list

    def summary(self, name: str) -> dict:
        """Median and interquartile range of ``name``'s step times."""
        q1, median, q3 = quartiles(self.times[name])
        count = len(self.times[name])
        return {"median_step_s": median, "iqr_step_s": [q1, q3], "steps_timed": count}


def interleave(
    steps: dict[str, Step], rounds: int, steps_per_round: int | dict[str, int]
) -> Rounds:
    """``rounds`` rounds; in each, every candidate runs its steps in turn."""
    counts = (
        steps_per_round if isinstance(steps_per_round, dict)
        else dict.fromkeys(steps, steps_per_round)
    )
    result = Rounds({n: [] for n in steps}, {n: [] for n in steps}, [])
    for _ in range(rounds):
        result.loads.append(load_now())
        for name, step in steps.items():
            times = [step() for _ in range(counts[name])]
            result.times[name].extend(times)
            result.round_means[name].append(float(np.mean(times)))
    return result


def steps_within(steps: dict[str, Step], wanted: int, budget_s: float) -> dict[str, int]:
    """Steps per round: ``wanted``, fewer (at least 1) for a candidate whose step is so
    slow that ``wanted`` would take more than ``budget_s`` (one probe step each)."""
    return {n: int(min(wanted, max(1, budget_s // max(s(), 1e-6)))) for n, s in steps.items()}


def ratio_to(rounds: Rounds, name: str, base: str) -> dict:
    """``name``'s cost relative to ``base``: the median over rounds of the per-round
    ratios of mean step times, their interquartile range and the ratios themselves."""
    ratios = [a / b for a, b in zip(rounds.round_means[name], rounds.round_means[base])]
    q1, _, q3 = quartiles(ratios)
    return {"ratio": float(np.median(ratios)), "round_ratio_iqr": [q1, q3],
            "round_ratios": ratios}


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q1, median, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q1), float(median), float(q3)


# ---------------------------------------------------------------------- load
def add_load_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-load", type=float, default=None,
        help="refuse to start when the 1-minute load average is above this (default: "
        "run, and flag the results when it exceeds the number of cores)",
    )


def load_now() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def check_load(max_load: float | None, parser: argparse.ArgumentParser) -> None:
    """Exits with a clear message when the load is above ``max_load``."""
    load = load_now()
    if max_load is not None and load is not None and load[0] > max_load:
        parser.error(f"--max-load {max_load}: the 1-minute load average is {load[0]}; "
                     "wait for the machine to quieten, or raise --max-load.")


def machine_load(start: list | None, rounds: Sequence[list | None] = ()) -> dict:
    """The load at start, during rounds and now, and whether it was high (above the
    number of logical cores at any of those moments)."""
    end = load_now()
    seen = [load[0] for load in (start, *rounds, end) if load]
    cores = os.cpu_count() or 1
    return {"load_at_start": start, "load_at_end": end, "max_load_1min": max(seen, default=None),
            "logical_cores": cores, "high_load": bool(seen) and max(seen) > cores}


def provenance(machine: dict) -> str:
    """A report's first line: the command that wrote it, when, and on what device."""
    return f"`{machine['command']}` — {machine['date']}, {machine['device']}"


def load_note(load: dict) -> str:
    """A markdown line on the machine's load (a warning when it was high)."""
    text = (f"Load average (1 min) {load['load_at_start'] and load['load_at_start'][0]} at "
            f"start, {load['max_load_1min']} at most, on {load['logical_cores']} logical cores.")
    if load.get("high_load"):
        text = ("**Warning: the machine was loaded beyond its cores during this run; "
                "absolute times are inflated and ratios noisier than usual.** " + text)
    return text


# ---------------------------------------------------------------------- result files
def write_results(
    out: str | os.PathLike,
    stem: str,
    report: dict,
    markdown: str,
    plot: Callable[[dict, Path], None] | None = None,
) -> Path:
    """Writes ``<stem>.json``, ``<stem>.md`` (and ``<stem>.png`` with ``plot``) under
    ``out``; removes a ``<stem>.partial.json`` left by `write_partial`."""
    folder = ensure_dir(out)
    write_json(folder / f"{stem}.json", report)
    (folder / f"{stem}.partial.json").unlink(missing_ok=True)
    (folder / f"{stem}.md").write_text(markdown + "\n")
    if plot is not None:
        plot(report, folder / f"{stem}.png")
    return folder


def write_partial(out: str | os.PathLike, stem: str, report: dict) -> None:
    """The report so far, as ``<stem>.partial.json`` (a long run that dies keeps it)."""
    write_json(ensure_dir(out) / f"{stem}.partial.json", report)


def ensure_dir(path: str | os.PathLike) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=True) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def human_bytes(count: float | None) -> str:
    if count is None or (isinstance(count, float) and not math.isfinite(count)):
        return "n/a"
    sign = "-" if count < 0 else ""
    count = abs(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{sign}{count:.0f} {unit}" if unit == "B" else f"{sign}{count:.1f} {unit}"
        count /= 1024
    return f"{sign}{count:.1f} GiB"
