"""Training step of the default model under each optimizer setting, as JSON.

    python benchmarks/optimizer_step.py [--rounds N] [training options]

Three settings of the same model: AdamW for every weight (`--muon-step 0 --muon-rms 0`),
Muon for the conv kernels (`--muon-rms 0`), and Muon for the ViT's and the head's matrices too
(`--muon-rms 0.2` unless the options give another). The Newton-Schulz iterations add few FLOPs
but many small ops. The steps alternate, one timing of each per round, so a shared host's
drifting speed hits all alike; the figures are medians over the rounds.
"""

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import cifar_hybrid_classifier as chc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timings of each setting (default 5)")
    args, training_options = parser.parse_known_args(argv)
    config = chc.parse_config(training_options)
    step = config.muon_step or chc.Config.muon_step
    settings = {"adamw": dataclasses.replace(config, muon_step=0.0, muon_rms=0.0),
                "muon_convs": dataclasses.replace(config, muon_step=step, muon_rms=0.0),
                "muon_all": dataclasses.replace(config, muon_step=step, muon_rms=config.muon_rms or 0.2)}
    seconds = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, setting in settings.items():
            seconds[name].append(chc.time_training_step(setting, repeats=7))
    median = {name: float(np.median(times)) for name, times in seconds.items()}
    print(json.dumps({
        "batch_size": config.batch_size,
        "model_size": config.model_size,
        **{f"step_ms_{name}": round(1000 * t, 1) for name, t in median.items()},
        **{f"{name}_over_adamw": round(t / median["adamw"], 3) for name, t in median.items() if name != "adamw"},
        "rounds_ms": {name: [round(1000 * t) for t in times] for name, times in seconds.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
