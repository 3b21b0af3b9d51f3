"""Training step of the default model with the fused batch norm against Keras's own, as JSON.

    python benchmarks/batch_norm.py [--rounds N] [training options]

The two layers share weights and results (tests/test_layers.py); only the time
differs. The steps alternate, one timing of each per round, so a shared host's
drifting speed hits both alike; the figures are medians over the rounds.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np

import cifar_hybrid_classifier as chc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timings of each layer (default 5)")
    args, training_options = parser.parse_known_args(argv)
    config = chc.parse_config(training_options)
    layers = {"keras": keras.layers.BatchNormalization, "fused": chc.BatchNormalization}
    seconds = {name: [] for name in layers}
    try:
        for _ in range(args.rounds):
            for name, layer in layers.items():
                chc.BatchNormalization = layer  # what the model's conv stages build
                seconds[name].append(chc.time_training_step(config, repeats=7))
    finally:
        chc.BatchNormalization = layers["fused"]
    median = {name: float(np.median(times)) for name, times in seconds.items()}
    print(json.dumps({
        "batch_size": config.batch_size,
        "step_ms_keras": round(1000 * median["keras"], 1),
        "step_ms_fused": round(1000 * median["fused"], 1),
        "fused_time_fraction": round(median["fused"] / median["keras"], 3),
        "rounds_ms": {name: [round(1000 * t) for t in times] for name, times in seconds.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
