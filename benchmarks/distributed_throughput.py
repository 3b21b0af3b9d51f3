"""Training images/s on one device against MirroredStrategy over two logical CPU devices.

    python benchmarks/distributed_throughput.py [--global-batch 128]

Runs each case in its own process (logical devices must be set before TensorFlow
starts) with the same global batch, random uint8 images, and the median of several
timed windows after warm-up; prints one JSON object. On a CPU the two logical
devices share the same cores, so this measures the cost of the replication, not a
speed-up: the point of the mirrored path on a CPU is that it is correct.
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import cifar_hybrid_classifier as chc  # first: it sets TensorFlow's environment before TensorFlow loads
    import tensorflow as tf
    devices, global_batch = int(sys.argv[1]), int(sys.argv[2])
    if devices > 1:  # before TensorFlow's runtime starts, which importing does not do
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(devices)]) if devices > 1 \\
        else tf.distribute.get_strategy()
    rng = np.random.default_rng(0)
    n = global_batch * 4
    data = chc.CifarData(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 100, np.arange(n) % 20,
                         rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), np.arange(100), np.arange(100) % 20,
                         [str(i) for i in range(100)], [str(i) for i in range(20)])
    config = chc.parse_config(["--batch-size", str(global_batch // devices), "--validation-split", "0.2",
                               "--checkpoint-dir", "unused"])
    trainer = chc.Trainer(config, data, strategy=strategy, log=lambda *_: None)
    batches = strategy.experimental_distribute_dataset(trainer.train_pipeline.train_dataset(0).repeat())
    batches = iter(batches)
    step = lambda: float(trainer._train_step(*next(batches))[0])
    for _ in range(5):
        step()
    rates = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(6):
            step()
        rates.append(6 * global_batch / (time.perf_counter() - started))
    print(json.dumps({"devices": devices, "replicas": trainer.replicas, "images_per_s": float(np.median(rates))}))
""")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=128)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": ROOT}
    results = {}
    for devices in (1, 2):
        out = subprocess.run([sys.executable, "-c", CASE, str(devices), str(args.global_batch)],
                             capture_output=True, text=True, env=env, check=False)
        if out.returncode:
            sys.exit(f"error: the {devices}-device case failed:\n{out.stderr[-2000:]}")
        results[f"{devices}_device"] = json.loads(out.stdout.strip().splitlines()[-1])
    one, two = results["1_device"]["images_per_s"], results["2_device"]["images_per_s"]
    results["global_batch"] = args.global_batch
    results["speedup_2_over_1"] = two / one
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
