"""Using a saved model: `predict` on image files, `evaluate` on the test set, class names, other backends."""

import base64
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import tensorflow as tf

import cifar_hybrid_classifier as chc
from conftest import FINE_NAMES, ROOT


# -- image files written by hand: TensorFlow encodes only PNG and JPEG --

def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def palette_png(indices, palette):
    """An 8-bit palette PNG (colour type 3)."""
    h, w = indices.shape
    rows = b"".join(b"\0" + row.astype(np.uint8).tobytes() for row in indices)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
            + png_chunk(b"PLTE", bytes(np.asarray(palette, np.uint8).ravel()))
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def bmp_24bit(rgb):
    """An uncompressed 24-bit BMP: bottom-up BGR rows padded to four bytes."""
    h, w, _ = rgb.shape
    pad = b"\0" * ((4 - w * 3 % 4) % 4)
    body = b"".join(rgb[r, :, ::-1].tobytes() + pad for r in range(h - 1, -1, -1))
    return (b"BM" + struct.pack("<IHHI", 54 + len(body), 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(body), 2835, 2835, 0, 0) + body)


ONE_PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")


def write_images(folder, data):
    """Test images of many sizes and modes; returns their paths, the last two unreadable."""
    rng = np.random.default_rng(0)
    test_image = data.x_test[7]
    files = {
        "rgb_60x40.png": tf.io.encode_png(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)),
        "gray_17x9.png": tf.io.encode_png(rng.integers(0, 256, (17, 9, 1), dtype=np.uint8)),
        "rgba_200x300.png": tf.io.encode_png(rng.integers(0, 256, (300, 200, 4), dtype=np.uint8)),
        "gray16_32x32.png": tf.io.encode_png(rng.integers(0, 65536, (32, 32, 1), dtype=np.uint16)),
        "class7_32x32.png": tf.io.encode_png(test_image),
        "photo_640x480.jpg": tf.io.encode_jpeg(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)),
        "gray_5x5.jpg": tf.io.encode_jpeg(rng.integers(0, 256, (5, 5, 1), dtype=np.uint8)),
        "palette_8x6.png": palette_png(rng.integers(0, 4, (6, 8)), [[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]]),
        "image_5x3.bmp": bmp_24bit(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)),
        "pixel.gif": ONE_PIXEL_GIF,
        "truncated.png": tf.io.encode_png(test_image).numpy()[:60],
        "noise.jpg": rng.bytes(300),
    }
    paths = []
    for name, content in files.items():
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.numpy())
        paths.append(path)
    return paths


def test_read_image_converts_any_mode_and_size_to_32x32_rgb(tmp_path):
    def read(name, content):
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.numpy())
        image = chc.read_image(str(tmp_path / name))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        return image.astype(int)

    transparent = np.zeros((10, 10, 4), np.uint8)
    assert (read("clear.png", tf.io.encode_png(transparent)) == 255).all()  # composited over white
    assert (read("gray.png", tf.io.encode_png(np.full((50, 50, 1), 100, np.uint8))) == 100).all()
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, :32] = wide[:, 96:] = (255, 0, 0)
    wide[:, 32:96] = (0, 0, 255)
    assert (read("wide.png", tf.io.encode_png(wide)) == (0, 0, 255)).all()  # the central square only
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: shrinking must average them, not pick every other column
    assert np.abs(read("stripes.png", tf.io.encode_png(stripes)) - 127.5).max() <= 1
    palette = read("palette.png", palette_png(np.zeros((4, 4), int), [[10, 200, 30]]))
    assert (palette == (10, 200, 30)).all()
    assert (read("pixel.gif", ONE_PIXEL_GIF) == read("pixel.gif", ONE_PIXEL_GIF)[0, 0]).all()
    if hasattr(tf.io, "decode_webp"):  # TensorFlow 2.18 and later
        for webp in (LOSSLESS_WEBP, LOSSY_WEBP):
            assert (read("pixel.webp", webp) == read("pixel.webp", webp)[0, 0]).all()
    with pytest.raises(chc.InputError, match="not a readable"):
        read("bad.png", b"\x89PNG\r\n\x1a\n not really")


LOSSLESS_WEBP = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")  # one pixel each
LOSSY_WEBP = base64.b64decode("UklGRiIAAABXRUJQVlA4IBYAAAAwAQCdASoBAAEADsD+JaQAA3AAAAAA")
# An extended WebP's canvas (3000 x 2000, stored less one) and two empty animation frames.
ANIMATED_WEBP = (b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\x02\0\0\0" + (2999).to_bytes(3, "little")
                 + (1999).to_bytes(3, "little") + b"ANMF\0\0\0\0" * 2)


def gif_with_frame(screen, frame):
    """A GIF whose logical screen and one frame declare these (width, height), with one pixel of data."""
    return (b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0) + b"\x02\x02\x44\x01\x00" + b"\x3b")


def zero_png(width, height):
    """A grey PNG of zeros, deflated: a real decompression bomb when large (it decodes to width x height bytes)."""
    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b""))


def test_image_sizes_come_from_the_headers_alone():
    rng = np.random.default_rng(0)
    jpeg = tf.io.encode_jpeg(rng.integers(0, 256, (600, 700, 3), dtype=np.uint8)).numpy()
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 5000) + b"Exif\0" + bytes(4995)  # metadata before the frame
    progressive = tf.io.encode_jpeg(np.zeros((40, 50, 1), np.uint8), progressive=True).numpy()
    top_down = bytearray(bmp_24bit(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)))
    top_down[22:26] = struct.pack("<i", -3)
    cases = {  # what image_size says, and for the real files what the decoder makes of them
        tf.io.encode_png(np.zeros((30, 40, 4), np.uint8)).numpy(): ("PNG", 40, 30, 1200),
        jpeg: ("JPEG", 700, 600, 350 * 300),  # 600 >= 2 x 256 rows: decoded at half scale
        jpeg[:2] + app1 + jpeg[2:]: ("JPEG", 700, 600, 350 * 300),
        progressive: ("JPEG", 50, 40, 2000),
        bmp_24bit(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)): ("BMP", 5, 3, 15),
        bytes(top_down): ("BMP", 5, 3, 15),
        ONE_PIXEL_GIF: ("GIF", 1, 1, 2),  # the canvas, and the frame the decoder also holds
        gif_with_frame((1, 1), (20000, 20000)): ("GIF", 20000, 20000, 2 * 20000 * 20000),  # canvas = largest frame
        zero_png(20000, 3): ("PNG", 20000, 3, 60000),
        LOSSLESS_WEBP: ("WebP", 1, 1, 1),
        LOSSY_WEBP: ("WebP", 1, 1, 1),
        ANIMATED_WEBP: ("WebP", 3000, 2000, 2 * 3000 * 2000),  # the canvas for each frame
    }
    for raw, expected in cases.items():
        assert chc.image_size(raw) == expected
    for raw in (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00", rng.bytes(300), b"RIFF....WEBPVP8 ", b"GIF89a\1"):
        assert chc.image_size(raw) is None
    assert [chc.jpeg_ratio(w, h) for w, h in [(255, 4000), (600, 511), (600, 512), (5000, 1100), (12248, 8165)]] \
        == [1, 1, 2, 4, 8]


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(zero_png(3000, 2000))  # 6 megapixels from 10 kB
    assert bomb.stat().st_size < 20_000
    decoded = []
    monkeypatch.setattr(tf.io, "decode_image", lambda *a, **k: decoded.append(1))
    with pytest.raises(chc.InputError) as error:
        chc.read_image(str(bomb), max_megapixels=5)
    assert str(error.value) == (f"{bomb}: a 3000 x 2000 PNG image decodes to 6 megapixels, over the limit of 5; "
                                "give --max-megapixels 6 to read it")
    assert decoded == []
    monkeypatch.undo()
    assert (chc.read_image(str(bomb), max_megapixels=6) == 0).all()


def test_a_large_jpeg_decoded_at_reduced_scale_looks_like_the_full_decode(tmp_path):
    y, x = np.mgrid[0:1200, 0:1700] / 1000.0
    smooth = np.stack([128 + 100 * np.sin(5 * x + 3 * y), 255 * x / 1.7, 255 * y / 1.2], -1).astype(np.uint8)
    (tmp_path / "big.jpg").write_bytes(tf.io.encode_jpeg(smooth, quality=95).numpy())
    reduced = chc.read_image(str(tmp_path / "big.jpg"))  # 1200 rows: decoded at 1/4 scale
    full = chc.shrink_to_cifar(tf.io.decode_jpeg((tmp_path / "big.jpg").read_bytes()).numpy())
    difference = np.abs(reduced.astype(int) - full)  # out of 255: the scaled IDCT rounds its own way
    assert difference.max() <= 4 and difference.mean() <= 1.5, (difference.max(), difference.mean())


def test_the_strip_by_strip_box_filter_equals_a_whole_image_area_resize():
    rng = np.random.default_rng(1)
    for shape in [(32, 32, 3), (33, 47, 3), (300, 100, 4), (200, 300, 1), (641, 480, 2)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        image = chc.as_rgb(pixels)
        side = min(shape[:2])
        square = tf.image.resize_with_crop_or_pad(image, side, side)
        expected = np.clip(np.round(tf.image.resize(square, (32, 32), method="area").numpy()), 0, 255)
        np.testing.assert_array_equal(chc.shrink_to_cifar(pixels, strip_bytes=5000), expected)


def test_predict_json_for_many_formats_with_a_corrupt_file_among_them(tmp_path, model_path, cifar_folder, capfd):
    data = chc.load_cifar(cifar_folder)
    paths = write_images(str(tmp_path), data)
    # In this process (the script's own process is test_cli's and the end-to-end test's); capfd reads the
    # file descriptors, so what TensorFlow's C++ side writes would show too.
    assert chc.main(["predict", *paths, "--model", model_path, "--top", "3", "--json"]) == 2  # some files failed
    result = capfd.readouterr()
    assert "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "truncated.png" in errors[0] and "noise.jpg" in errors[1]
    entries = json.loads(result.out)  # stdout is the JSON and nothing else
    assert [e["file"] for e in entries] == paths
    assert "error" in entries[-1] and "error" in entries[-2]
    model = chc.load_model(model_path)
    images = np.stack([chc.read_image(p) for p in paths[:-2]])
    expected = model.predict(images.astype(np.float32), verbose=0)
    for entry, probs in zip(entries[:-2], expected):
        top = entry["predictions"]
        assert len(top) == 3 and [p["index"] for p in top] == list(np.argsort(-probs, kind="stable")[:3])
        assert [p["class"] for p in top] == [FINE_NAMES[p["index"]] for p in top]
        assert [p["probability"] for p in top] == pytest.approx([float(probs[p["index"]]) for p in top], abs=1e-5)
        assert top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    # A CIFAR-sized file passes unchanged: its prediction is the model's for the original array.
    np.testing.assert_array_equal(images[4], data.x_test[7])
    assert entries[4]["predictions"][0]["index"] == int(model.predict(data.x_test[7:8], verbose=0).argmax())


def test_predict_refuses_an_image_over_the_limit_in_one_line_and_predicts_the_others(tmp_path, model_path, capsys):
    (tmp_path / "bomb.png").write_bytes(zero_png(3000, 2000))
    paths = [str(tmp_path / name) for name in ("a.png", "bomb.png", "b.jpg")]
    (tmp_path / "a.png").write_bytes(tf.io.encode_png(np.full((40, 30, 3), 7, np.uint8)).numpy())
    (tmp_path / "b.jpg").write_bytes(tf.io.encode_jpeg(np.full((900, 600, 3), 200, np.uint8)).numpy())
    assert chc.main(["predict", *paths, "--model", model_path, "--json", "--max-megapixels", "5"]) == 2
    printed = capsys.readouterr()
    assert printed.err.strip().splitlines() == [
        f"error: {paths[1]}: a 3000 x 2000 PNG image decodes to 6 megapixels, over the limit of 5; give "
        "--max-megapixels 6 to read it"]
    entries = json.loads(printed.out)
    assert [e["file"] for e in entries] == paths and "error" in entries[1]
    assert all(len(entries[i]["predictions"]) == 5 for i in (0, 2))
    with pytest.raises(SystemExit) as exited:
        chc.main(["predict", paths[0], "--max-megapixels", "0"])
    assert exited.value.code == 2 and "--max-megapixels: must be a number > 0, got 0" in capsys.readouterr().err


def test_predict_text_output(tmp_path, model_path, capsys):
    image = tmp_path / "gray.png"
    image.write_bytes(tf.io.encode_png(np.full((20, 30, 1), 90, np.uint8)).numpy())
    assert chc.main(["predict", str(image), "--model", model_path]) == 0  # in-process: the JSON test runs the script
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(image) and len(lines) == 6  # the file, then the default top 5
    assert all(re.fullmatch(r"\s+\d+\.\d\d%  fine_\d\d", line) for line in lines[1:])


def test_evaluate_matches_a_direct_computation(model_path, cifar_tarball, capsys):
    assert chc.main(["evaluate", "--model", model_path, "--data", cifar_tarball]) == 0
    stdout = capsys.readouterr().out
    data = chc.load_cifar(cifar_tarball)
    probs = chc.load_model(model_path).predict(data.x_test.astype(np.float32), verbose=0)
    top1 = np.mean(probs.argmax(1) == data.y_test)
    top5 = np.mean([label in np.argsort(-p)[:5] for p, label in zip(probs, data.y_test)])
    superclass = np.mean(probs.argmax(1) // 5 == data.y_test // 5)  # the synthetic superclass of class c is c // 5
    assert (f"test top-1 {100 * top1:.2f}%  top-5 {100 * top5:.2f}%  superclass top-1 {100 * superclass:.2f}%"
            in stdout)
    assert "f1-score" in stdout and FINE_NAMES[99] in stdout
    confused = stdout.split("Most confused classes (true -> predicted: test images):\n")[1].splitlines()
    counts = [int(line.rsplit(": ", 1)[1]) for line in confused[:10] if "->" in line]
    assert 0 < len(counts) <= 10 and counts == sorted(counts, reverse=True)


def test_evaluate_figures_on_a_hand_made_example():
    names = list("abcdefgh")
    labels = np.array([0, 0, 1, 1, 2, 3])
    predicted = [0, 1, 1, 2, 2, 0]  # right: images 0, 2, 4; wrong: a->b, b->c, d->a
    probs = np.tile(np.linspace(0.01, 0.08, 8), (6, 1))  # distinct low scores
    probs[np.arange(6), predicted] = 1.0
    probs[1, 0] = probs[3, 1] = 0.5  # the right class second: inside the top 5
    probs[5, 3] = 0.0  # the right class last: outside the top 5
    results = chc.evaluate(probs, labels, names, fine_to_coarse=np.array([0, 0, 1, 1, 2, 2, 3, 3]),
                           coarse_labels=np.array([0, 0, 0, 0, 1, 1]))
    assert results["top1"] == pytest.approx(3 / 6)
    assert results["top5"] == pytest.approx(5 / 6)
    assert results["superclass_top1"] == pytest.approx(4 / 6)  # predicted superclasses 0, 0, 0, 1, 1, 0
    pairs = {(p["true"], p["predicted"]): p["count"] for p in results["most_confused"]}
    assert pairs == {("a", "b"): 1, ("b", "c"): 1, ("d", "a"): 1}
    assert results["confusion"].sum() == 6
    assert results["per_class"]["c"]["recall"] == 1.0 and results["per_class"]["b"]["precision"] == 0.5


def test_class_names_travel_inside_the_saved_model(model_path):
    model = chc.load_model(model_path)
    assert list(model.class_names) == FINE_NAMES
    head = model.get_layer("fusion_head")
    assert head.get_config()["class_names"] == FINE_NAMES
    assert chc.FusionHead.from_config(head.get_config()).class_names == FINE_NAMES
    with pytest.raises(ValueError, match="3 class names for 100 classes"):
        chc.FusionHead(class_names=["a", "b", "c"])


@pytest.mark.parametrize("name, has_stem", [
    ("previous_version", False),     # saved by 09306a9, before the shared stem (ViT on raw pixel patches)
    ("shared_stem_version", True),   # saved by 093f023: the shared stem's conv3x3 at 32x32, then max-pool
])
def test_a_model_saved_by_an_earlier_version_loads_and_predicts_as_it_did(name, has_stem):
    folder = os.path.join(ROOT, "tests", "data")
    model = chc.load_model(os.path.join(folder, f"{name}.keras"))
    assert any(isinstance(layer, chc.ConvStem) for layer in model.layers) == has_stem
    assert model.class_names[:2] == ["class_0", "class_1"]
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    expected = np.load(os.path.join(folder, f"{name}_probs.npy"))
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, atol=1e-5)


BACKEND_PREDICT = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    import cifar_hybrid_classifier as chc
    model = chc.load_model(sys.argv[1])
    probs = keras.ops.convert_to_numpy(model.predict(np.load(sys.argv[2]).astype("float32"), verbose=0))
    print(keras.backend.backend(), list(model.class_names)[:2], ",".join(map(str, probs.argmax(-1))))
""")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_the_saved_model_predicts_the_same_classes_under_another_backend(backend, tmp_path, model_path,
                                                                         cifar_folder):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (.ci/run installs torch)")
    batch = chc.load_cifar(cifar_folder).x_test[:64]
    np.save(tmp_path / "batch.npy", batch)
    expected = chc.load_model(model_path).predict(batch.astype(np.float32), verbose=0).argmax(-1)
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", BACKEND_PREDICT, model_path, str(tmp_path / "batch.npy")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{backend} ['fine_00', 'fine_01'] ")
    assert line.rsplit(" ", 1)[1] == ",".join(map(str, expected))
