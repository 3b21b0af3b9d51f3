"""Training step of the default model under each optimizer setting, as JSON.

    python benchmarks/optimizer_step.py [--rounds N] [training options]

Two settings of the same model: AdamW for every weight (`--muon-step 0`) and Muon for the conv
kernels (the default). The Newton-Schulz iterations' cost grows with the cube of a kernel's
filters, so it is the large size (`--model-size large`) where Muon shows in the step. The steps
alternate, one timing of each per round, so a shared host's drifting speed hits all alike; the
figures are medians over the rounds.
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cifar_hybrid_classifier as chc
from alternating import print_step_figures, time_in_turn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timings of each setting (default 5)")
    args, training_options = parser.parse_known_args(argv)
    config = chc.parse_config(training_options)
    step = config.muon_step or chc.Config.muon_step
    settings = {"adamw": dataclasses.replace(config, muon_step=0.0),
                "muon_convs": dataclasses.replace(config, muon_step=step)}
    timers = {name: (lambda setting=setting: chc.time_training_step(setting, repeats=7))
              for name, setting in settings.items()}
    seconds = time_in_turn(timers, args.rounds)
    print_step_figures(config.batch_size, seconds, baseline="adamw", model_size=config.model_size)


if __name__ == "__main__":
    main()
