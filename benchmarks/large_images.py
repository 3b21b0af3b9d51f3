"""Wall time and peak memory of `predict` on large images and a decompression bomb, printed as JSON.

    python benchmarks/large_images.py [--model PATH]   # default: an untrained base-size model

Each case is one `predict` process, timed from its start (Python and TensorFlow's import included) to
its exit, its peak resident memory read by its parent. The images are written into a temporary folder:
an ordinary photo-sized JPEG; a 1.2 MB PNG that declares 20,000 x 20,000 pixels (zeros, deflated); a
100-megapixel JPEG and a 100-megapixel PNG (the default limit); and all of them in one command.
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cifar_hybrid_classifier as chc  # first: it sets TensorFlow's environment before TensorFlow loads
import numpy as np
import tensorflow as tf

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cifar_hybrid_classifier.py")
# Run in a child so that its peak memory is the only one RUSAGE_CHILDREN sees.
MEASURE = """
import json, resource, subprocess, sys, time
started = time.time()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
print(json.dumps({"exit": done.returncode, "seconds": round(time.time() - started, 2),
                  "peak MB": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
                  "errors": [line for line in done.stderr.splitlines() if line.startswith("error:")]}))
"""


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width, height):
    """An RGB PNG of zeros: a thousandth of its decoded size on disk."""
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b""))


def photo(height, width):
    """Smooth colour gradients with a little noise: compresses like a photograph."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = 255 * y * x
    image[..., 1] = 255 * (1 - y) * x
    image[..., 2] = 128 + 100 * np.sin(20 * x + 10 * y)
    image += np.random.default_rng(0).integers(0, 20, image.shape, dtype=np.uint8)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved .keras model (default: an untrained base-size one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            config = chc.parse_config([])
            chc.apply_model_size(config, "base")
            model = os.path.join(folder, "base.keras")
            chc.save_model_atomically(chc.build_model(config, "float32"), model)
        files = {"ordinary 4000x3000 JPEG": ("ordinary.jpg", lambda: tf.io.encode_jpeg(photo(3000, 4000))),
                 "20000x20000 PNG bomb": ("bomb.png", lambda: png_bomb(20000, 20000)),
                 "100-megapixel JPEG": ("photo.jpg", lambda: tf.io.encode_jpeg(photo(8165, 12248), quality=90)),
                 "100-megapixel PNG": ("photo.png", lambda: tf.io.encode_png(photo(10000, 10000)))}
        paths = {}
        for case, (name, make) in files.items():
            content = make()
            paths[case] = os.path.join(folder, name)
            with open(paths[case], "wb") as f:
                f.write(content if isinstance(content, bytes) else content.numpy())
        paths["all four in one command"] = list(paths.values())
        results = {"cpu": chc.describe_environment()["hardware"]["cpu"], "tensorflow": tf.__version__}
        for case, path in paths.items():
            images = path if isinstance(path, list) else [path]
            measured = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, SCRIPT, "predict", *images,
                                       "--model", model], capture_output=True, text=True, check=True).stdout
            results[case] = {"file MB": round(sum(os.path.getsize(p) for p in images) / 1e6, 1),
                             **json.loads(measured)}
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
