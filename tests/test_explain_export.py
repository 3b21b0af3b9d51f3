"""`explain` (attention rollout and Grad-CAM pictures) and `export` (SavedModel and TFLite) of a saved model."""

import errno
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np
import pytest
import tensorflow as tf

import cifar_hybrid_classifier as chc
from conftest import main_error

rng = np.random.default_rng(0)
IMAGES = {  # colour modes and sizes a user may pass; read_image turns each into 32x32 RGB
    "rgb.png": rng.integers(0, 256, (40, 60, 3), dtype=np.uint8),
    "gray.png": rng.integers(0, 256, (17, 9, 1), dtype=np.uint8),
    "rgba.png": rng.integers(0, 256, (300, 200, 4), dtype=np.uint8),
}


def write_images(folder):
    paths = []
    for name, pixels in IMAGES.items():
        paths.append(os.path.join(folder, name))
        with open(paths[-1], "wb") as f:
            f.write(tf.io.encode_png(pixels).numpy())
    corrupt = os.path.join(folder, "corrupt.png")
    with open(corrupt, "wb") as f:
        f.write(tf.io.encode_png(IMAGES["rgb.png"]).numpy()[:50])
    return paths, corrupt


@pytest.mark.parametrize("matplotlib", ["absent", "present"])
def test_explain_writes_a_picture_per_image_and_reports_a_corrupt_one(matplotlib, tmp_path, model_path, capsys,
                                                                      monkeypatch):
    if matplotlib == "absent":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    elif importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    paths, corrupt = write_images(str(tmp_path))
    out = tmp_path / "pictures"
    assert chc.main(["explain", paths[0], corrupt, *paths[1:], "--model", model_path,
                     "--output-dir", str(out), "--json"]) == 2
    printed = capsys.readouterr()
    errors = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt.png" in errors[0] and "Traceback" not in printed.err
    results = json.loads(printed.out)
    assert [r["file"] for r in results] == [paths[0], corrupt, *paths[1:]] and "error" in results[1]
    for result in results[:1] + results[2:]:
        assert len(result["predictions"]) == 3  # the top-3 classes are in the output in any case
        assert result["picture"] == str(out / (os.path.splitext(os.path.basename(result["file"]))[0]
                                               + ".explain.png"))
        picture = tf.io.decode_png(open(result["picture"], "rb").read()).numpy()
        if matplotlib == "absent":  # three 256x256 panels, 8 white pixels apart
            assert picture.shape == (256, 3 * 256 + 2 * 8, 3)
            assert (picture[:, 256:264] == 255).all() and picture[:, :256].std() > 0
        else:  # the same panels with titles, and a fourth with the top-3 classes: 3 inches each at 100 dpi
            assert picture.shape[:2] == (340, 1200)
    assert sorted(os.listdir(out)) == ["gray.explain.png", "rgb.explain.png", "rgba.explain.png"]


def test_explain_maps_are_normalised_and_its_probabilities_are_the_models(tmp_path, model_path):
    model = chc.load_model(model_path)
    paths, _ = write_images(str(tmp_path))
    images = np.stack([chc.read_image(path) for path in paths])
    probs, rollout, gradcam = chc.explain_images(model, images)
    np.testing.assert_allclose(probs, model.predict(images.astype(np.float32), verbose=0), atol=1e-5)
    patches = model.get_layer("vit_branch").position_embedding.position_embedding.shape[1] - 1  # CLS first
    side = int(np.sqrt(patches))
    assert side * side == patches and rollout.shape == (len(images), side, side)
    assert (rollout >= 0).all()
    np.testing.assert_allclose(rollout.sum(axis=(1, 2)), 1.0, atol=1e-9)
    assert gradcam.ndim == 3 and len(gradcam) == len(images)
    assert (gradcam >= 0).all() and (gradcam <= 1).all()
    assert all(np.isclose(cam.max(), 1.0) or cam.max() == 0 for cam in gradcam)


def test_attention_rollout_of_hand_made_attention():
    tokens = 5  # the CLS token and a 2x2 grid of patches
    uniform = np.full((1, 2, tokens, tokens), 1 / tokens)
    np.testing.assert_allclose(chc.attention_rollout([uniform, uniform]), np.full((1, 2, 2), 0.25))
    # Every head of the one block sends the CLS token's attention to patch 3 (row 1, column 0): after
    # the residual's identity, the rollout puts all patch weight there.
    focused = np.zeros((1, 2, tokens, tokens))
    focused[:, :, :, 3] = 1.0
    np.testing.assert_allclose(chc.attention_rollout([focused]), [[[0, 0], [1, 0]]])


# A model's exports loaded in a fresh process: test_shipped_model.py.


def test_export_errors_are_one_line(tmp_path, model_path, capsys, monkeypatch):
    assert "no such model file" in main_error(["export", "--model", str(tmp_path / "missing.keras")], capsys)
    missing = str(tmp_path / "missing" / "served")
    assert "does not exist" in main_error(["export", "--model", model_path, "--output", missing], capsys)

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "NamedTemporaryFile", refuse)
        assert "not writable" in main_error(["export", "--model", model_path, "--output",
                                             str(tmp_path / "served")], capsys)
    # An export that differs by more than the tolerance (here: a tolerance below any difference) is
    # refused, and nothing is written.
    monkeypatch.setattr(chc, "EXPORT_TOLERANCE", -1.0)
    assert "broken export" in main_error(["export", "--model", model_path, "--format", "savedmodel", "--output",
                                          str(tmp_path / "served")], capsys)
    assert os.listdir(tmp_path) == []
