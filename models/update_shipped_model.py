"""Replace the shipped model with a finished run of the default command, in one change with its provenance and
the probabilities the compatibility test compares against.

    python cifar_hybrid_classifier.py --data cifar-100-python.tar.gz      # in a clean checkout of COMMIT
    python models/update_shipped_model.py RUN_FOLDER COMMIT "CPU model, class, cores" WALL_MINUTES

RUN_FOLDER holds the run's cifar_hybrid.keras and cifar_hybrid.metrics.json; WALL_MINUTES is the command's
wall time as measured outside it (the metrics file's own figure ends before the model is written).
"""

import hashlib
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402

import cifar_hybrid_classifier as chc  # noqa: E402
from test_shipped_model import PROVENANCE, STORED_PROBS, fixed_images  # noqa: E402


def main(run, commit, machine, wall_minutes):
    with open(os.path.join(run, "cifar_hybrid.metrics.json")) as f:
        metrics = json.load(f)
    if metrics["config"]["model_size"] != "base" or metrics["config"]["dataset"] != "cifar100":
        sys.exit("error: not a run of the default command (base size, CIFAR-100)")
    shutil.copyfile(os.path.join(run, "cifar_hybrid.keras"), chc.SHIPPED_MODEL)
    with open(chc.SHIPPED_MODEL, "rb") as f:
        raw = f.read()
    model = chc.load_model(chc.SHIPPED_MODEL)
    np.save(STORED_PROBS, model.predict(fixed_images().astype(np.float32), verbose=0))
    test = metrics["test"]
    provenance = {
        "model": "the hybrid CNN + ViT, base size, float32 weights, CIFAR-100's 100 fine classes",
        "command": "python cifar_hybrid_classifier.py --data cifar-100-python.tar.gz",
        "seed": metrics["seed"], "commit": commit, "machine": machine, "precision": metrics["precision"],
        "versions": metrics["versions"], "epochs": metrics["epochs_trained"], "wall_time_minutes": wall_minutes,
        "validation_top1": {"kept_epoch_in_training": metrics["best_validation_top1"],
                            "tta": metrics["validation_top1_with_tta"]},
        "test_top1": {"plain": test["top1_without_tta"], "tta": test["top1"]},
        "test_top5_tta": test["top5"], "test_superclass_top1_tta": test["superclass_top1"],
        "parameters": model.count_params(), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    with open(PROVENANCE, "w") as f:
        f.write(json.dumps(provenance, indent=1) + "\n")
    print(json.dumps(provenance, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
