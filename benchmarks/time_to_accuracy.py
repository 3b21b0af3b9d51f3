"""Run the default recipe on the real data and record accuracy against wall time.

    python benchmarks/time_to_accuracy.py --data cifar-100-python.tar.gz [--csv time_to_accuracy.csv]
                                          [any training option, e.g. --seed 1 --epochs 14]

Writes one CSV row per epoch (epoch, elapsed seconds since start, learning rate,
train loss, validation top-1) and a final row with the test top-1 and top-5.
"""

import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cifar_hybrid_classifier as chc


def main():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--csv", default="time_to_accuracy.csv")
    known, rest = parser.parse_known_args()
    config = chc.parse_config(rest)
    sys.stdout.reconfigure(line_buffering=True)
    started = time.time()
    try:
        results, trainer = chc.run(config)
    except (chc.InputError, chc.TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, chc.TrainingDiverged) else 2
    except chc.TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    fields = ["epoch", "elapsed_s", "learning_rate", "train_loss", "val_top1", "test_top1", "test_top5"]
    with open(known.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for h in trainer.history:
            writer.writerow([h["epoch"], f"{h['elapsed']:.1f}", f"{h['learning_rate']:.6g}",
                             f"{h['train_loss']:.4f}", f"{h['val_accuracy']:.4f}", "", ""])
        writer.writerow(["final", f"{time.time() - started:.1f}", "", "", "",
                         f"{results['top1']:.4f}", f"{results['top5']:.4f}"])
    print(f"wrote {known.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
