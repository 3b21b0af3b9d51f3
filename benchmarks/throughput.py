"""Throughput of the default model on this machine, printed as one JSON object.

    python benchmarks/throughput.py [--batch-size N] [--precision P] [other training options]
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/throughput.py   # an AVX-512 CPU timed as an AVX2-only one

Measures, with random uint8 images (speed does not depend on pixel values):
training images/s (median of several windows after warm-up), forward FLOPs per
image counted from the traced graph, achieved training GFLOP/s (training taken
as 3x the forward pass: forward, input gradients, weight gradients) against
this machine's measured float32 and bfloat16 matmul peaks, the input
pipeline's images/s on its own, inference images/s and peak resident memory.
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cifar_hybrid_classifier as chc  # first: it sets TensorFlow's environment before TensorFlow loads
import numpy as np
import tensorflow as tf


def _einsum_flops(op):
    """2 x the product of every index size: exact for the contractions attention layers use."""
    equation = op.get_attr("equation").decode()
    inputs, _ = equation.split("->")
    sizes = {}
    for spec, tensor in zip(inputs.split(","), op.inputs):
        for letter, size in zip(spec, tensor.shape.as_list()):
            sizes[letter] = size
    return 2 * int(np.prod(list(sizes.values())))


def forward_flops_per_image(model):
    """Multiply-adds x 2 of every MatMul, BatchMatMul, Conv2D and Einsum in the traced forward graph."""
    forward = tf.function(lambda x: model(x, training=False))
    graph = forward.get_concrete_function(tf.TensorSpec((1, *chc.IMAGE_SHAPE), tf.float32)).graph
    total = 0

    def walk(graph):
        nonlocal total
        for op in graph.get_operations():
            if op.type in ("MatMul", "BatchMatMulV2", "BatchMatMulV3"):
                a, b = (t.shape.as_list() for t in op.inputs[:2])
                adj_a = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
                m, k = (a[-1], a[-2]) if adj_a else (a[-2], a[-1])
                n = b[-2] if op.get_attr("transpose_b" if op.type == "MatMul" else "adj_y") else b[-1]
                total += 2 * int(np.prod(a[:-2] or [1])) * m * k * n
            elif op.type == "Conv2D":
                out = op.outputs[0].shape.as_list()
                kh, kw, cin, _ = op.inputs[1].shape.as_list()
                total += 2 * int(np.prod(out)) * kh * kw * cin
            elif op.type == "Einsum":
                total += _einsum_flops(op)
        for function in getattr(graph, "_functions", {}).values():  # bodies of nested functions (while loops, conds)
            walk(function.graph)

    walk(graph)
    return total


def median_rate(step, batch_size, warmup=5, windows=5, window_steps=8):
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(windows):
        started = time.perf_counter()
        for _ in range(window_steps):
            step()
        rates.append(batch_size * window_steps / (time.perf_counter() - started))
    return float(np.median(rates))


def main(argv=None):
    config = chc.parse_config(argv)
    chc.set_seeds(config.seed)
    rng = np.random.default_rng(0)
    n = 50_000
    data = chc.CifarData(
        rng.integers(0, 256, (n, *chc.IMAGE_SHAPE), dtype=np.uint8), np.arange(n) % 100, np.arange(n) % 20,
        rng.integers(0, 256, (1000, *chc.IMAGE_SHAPE), dtype=np.uint8), np.arange(1000) % 100,
        np.arange(1000) % 20, [f"c{i}" for i in range(100)], [f"s{i}" for i in range(20)])
    trainer = chc.Trainer(config, data, log=lambda *_: None)

    batches = iter(trainer.train_pipeline.train_dataset(epoch=0).repeat())
    train = median_rate(lambda: float(trainer._train_step(*next(batches))[0]), config.batch_size)

    pipeline_batches = iter(trainer.train_pipeline.train_dataset(epoch=1).repeat())
    pipeline = median_rate(lambda: next(pipeline_batches), config.batch_size, window_steps=40)

    images = tf.constant(data.x_test[:500])
    inference = median_rate(lambda: trainer._predict_step(images).numpy(), 500, warmup=2, windows=3,
                            window_steps=2)

    flops = forward_flops_per_image(trainer.model)
    # Under ONEDNN_MAX_CPU_ISA=AVX2 (an AVX-512 machine timed as the slow class B) a bf16 matmul would
    # abort the process, so that peak is left out.
    peak_bf16 = chc.matmul_gflops(tf.bfloat16) if chc.onednn_allows_bf16() else None
    peak_fp32 = chc.matmul_gflops(tf.float32)
    achieved = train * 3 * flops / 1e9
    print(json.dumps({
        "precision": trainer.precision,
        "batch_size": config.batch_size,
        "parameters": trainer.model.count_params(),
        "train_images_per_s": round(train, 1),
        "flops_per_image": flops,
        "train_gflops": round(achieved, 2),
        "peak_gflops_bf16": peak_bf16 and round(peak_bf16, 1),
        "peak_gflops_fp32": round(peak_fp32, 1),
        "fraction_of_peak_bf16": peak_bf16 and round(achieved / peak_bf16, 3),
        "fraction_of_peak_fp32": round(achieved / peak_fp32, 3),
        "pipeline_images_per_s": round(pipeline, 1),
        "pipeline_to_train_ratio": round(pipeline / train, 1),
        "inference_images_per_s": round(inference, 1),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
