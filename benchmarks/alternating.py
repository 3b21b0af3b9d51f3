"""Timings of several variants taken in turn, so a shared host's drifting speed hits all alike."""

import json

import numpy as np


def time_in_turn(timers, rounds):
    """{name: [seconds per round]} from calling each timer once per round, in turn."""
    seconds = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            seconds[name].append(timer())
    return seconds


def print_step_figures(batch_size, seconds, baseline, **extra):
    """One JSON object: each variant's median step in ms, its ratio to `baseline`'s, and every round."""
    median = {name: float(np.median(times)) for name, times in seconds.items()}
    print(json.dumps({
        "batch_size": batch_size,
        **extra,
        **{f"step_ms_{name}": round(1000 * t, 1) for name, t in median.items()},
        **{f"{name}_over_{baseline}": round(t / median[baseline], 3) for name, t in median.items() if name != baseline},
        "rounds_ms": {name: [round(1000 * t) for t in times] for name, times in seconds.items()},
    }, indent=2))
