"""Training step of the default model with the fused batch norm against Keras's own, as JSON.

    python benchmarks/batch_norm.py [--rounds N] [training options]

The two layers share weights and results (tests/test_layers.py); only the time
differs. The steps alternate, one timing of each per round, so a shared host's
drifting speed hits both alike; the figures are medians over the rounds.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cifar_hybrid_classifier as chc  # first: it sets TensorFlow's environment before TensorFlow loads
import keras
from alternating import print_step_figures, time_in_turn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timings of each layer (default 5)")
    args, training_options = parser.parse_known_args(argv)
    config = chc.parse_config(training_options)
    layers = {"keras": keras.layers.BatchNormalization, "fused": chc.BatchNormalization}

    def timer(layer):
        def time_step():
            chc.BatchNormalization = layer  # what the model's conv stages build
            return chc.time_training_step(config, repeats=7)
        return time_step

    try:
        seconds = time_in_turn({name: timer(layer) for name, layer in layers.items()}, args.rounds)
    finally:
        chc.BatchNormalization = layers["fused"]
    print_step_figures(config.batch_size, seconds, baseline="keras")


if __name__ == "__main__":
    main()
