"""The trained model that ships in models/: it loads as it did (in a fresh process, beside a model saved
now and that model's exports), its provenance describes this very file, and the commands that use a model
fall back to it."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import cifar_hybrid_classifier as chc
from conftest import ROOT, TINY_ARGS

PROVENANCE = os.path.splitext(chc.SHIPPED_MODEL)[0] + ".json"
STORED_PROBS = os.path.join(ROOT, "tests", "data", "shipped_model_probs.npy")


def fixed_images():
    """Eight images that never change: four of noise and four smooth colour fields."""
    noise = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3))
    y, x = np.mgrid[0:32, 0:32]
    fields = [np.stack([x * 8, y * 8, np.full_like(x, c)], -1) for c in (0, 80, 160, 240)]
    return np.concatenate([noise, np.stack(fields)]).astype(np.uint8)


# One interpreter for everything below: TensorFlow's start costs seconds. The exports load first, before
# anything imports the script (serving needs none of its code); then each Keras model loads as a user's code
# would load it, with safe_mode on, the script imported only to register its layers.
FRESH_PROCESS_PREDICT = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    savedmodel, tflite, images, exported = sys.argv[1:5]
    images = np.load(images)
    served = tf.saved_model.load(savedmodel)
    runner = tf.lite.Interpreter(model_path=tflite).get_signature_runner("serve_uint8")
    np.savez(exported, savedmodel=served.serve_uint8(tf.constant(images)).numpy(),
             float=served.serve(tf.constant(images, tf.float32)).numpy(), tflite=runner(images=images)["output_0"])
    import keras
    import cifar_hybrid_classifier  # registers the layers
    for model_path, images, probs in zip(*[iter(sys.argv[5:])] * 3):
        model = keras.models.load_model(model_path, safe_mode=True)
        np.save(probs, keras.ops.convert_to_numpy(model.predict(np.load(images), verbose=0)))
""")


def test_a_model_saved_now_its_exports_and_the_shipped_model_load_in_a_fresh_process_and_predict_as_they_did(
        tmp_path, capsys):
    # A model saved here, every weight moved off its initial value (batch-norm statistics included), so a
    # weight that the file lost or a layer that rebuilt itself on loading would change the predictions (by
    # over 5e-4 for each weight but the attention's key bias, which softmax ignores).
    model = chc.build_model(chc.parse_config(TINY_ARGS))
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in model.get_weights()])
    batch = np.random.default_rng(1).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    expected = model.predict(batch, verbose=0)
    chc.save_model_atomically(model, str(tmp_path / "m.keras"))
    np.save(tmp_path / "batch.npy", batch)
    # Its exports, each checked against it by the command before it is moved into place.
    assert chc.main(["export", "--model", str(tmp_path / "m.keras"), "--output", str(tmp_path / "served")]) == 0
    out = capsys.readouterr().out
    assert "savedmodel: max difference" in out and "tflite: max difference" in out
    assert sorted(os.listdir(tmp_path)) == ["batch.npy", "m.keras", "served.savedmodel", "served.tflite"]
    # The shipped model's probabilities on fixed images were stored when it was trained: a change to a
    # layer that breaks the saved model, or a replaced file, fails here.
    np.save(tmp_path / "images.npy", fixed_images())
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_PREDICT, str(tmp_path / "served.savedmodel"),
                             str(tmp_path / "served.tflite"), str(tmp_path / "batch.npy"), str(tmp_path / "served.npz"),
                             str(tmp_path / "m.keras"), str(tmp_path / "batch.npy"), str(tmp_path / "saved.npy"),
                             chc.SHIPPED_MODEL, str(tmp_path / "images.npy"), str(tmp_path / "shipped.npy")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "saved.npy"), expected, atol=1e-5)
    served = np.load(tmp_path / "served.npz")
    for name in ("savedmodel", "float", "tflite"):
        np.testing.assert_allclose(served[name], expected, atol=1e-4, err_msg=name)
    probs, stored = np.load(tmp_path / "shipped.npy"), np.load(STORED_PROBS)
    np.testing.assert_array_equal(probs.argmax(-1), stored.argmax(-1))
    np.testing.assert_allclose(probs, stored, atol=1e-4)


def test_the_provenance_describes_the_shipped_file():
    with open(PROVENANCE) as f:
        provenance = json.load(f)
    with open(chc.SHIPPED_MODEL, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == provenance["sha256"]
    assert os.path.getsize(chc.SHIPPED_MODEL) < 8e6
    model = chc.load_model(chc.SHIPPED_MODEL)
    assert model.count_params() == provenance["parameters"]
    assert model.class_names[:3] == ["apple", "aquarium_fish", "baby"]  # CIFAR-100's own classes
    for key in ("command", "seed", "machine", "commit", "wall_time_minutes", "validation_top1", "test_top1"):
        assert key in provenance, key


def one_image(folder):
    path = os.path.join(folder, "photo.jpg")
    with open(path, "wb") as f:
        f.write(tf.io.encode_jpeg(fixed_images()[4]).numpy())
    return path


def test_predict_explain_and_export_fall_back_to_the_shipped_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no cifar_hybrid.keras here
    image = one_image(str(tmp_path))
    assert chc.main(["predict", image, "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("using the shipped model") == 1 and "python cifar_hybrid_classifier.py" in captured.err
    predictions = json.loads(captured.out)[0]["predictions"]  # stdout stays pure JSON
    expected = chc.load_model(chc.SHIPPED_MODEL).predict(fixed_images()[4:5].astype(np.float32), verbose=0)[0]
    assert predictions[0]["index"] == int(expected.argmax())  # the JPEG round trip may move the figures a little
    assert chc.main(["explain", image, "--output-dir", "pictures"]) == 0
    assert os.path.isfile(tmp_path / "pictures" / "photo.explain.png")
    assert chc.main(["export", "--format", "savedmodel"]) == 0
    assert os.path.isdir(tmp_path / "cifar100-hybrid-base.savedmodel")  # here, not in the checkout's models/
    assert not [name for name in os.listdir(os.path.dirname(chc.SHIPPED_MODEL)) if name.endswith(".savedmodel")]


def test_a_model_trained_here_comes_before_the_shipped_one(tmp_path, monkeypatch, capsys, model_path):
    shutil.copy(model_path, tmp_path / "cifar_hybrid.keras")  # trained on the synthetic classes fine_00..
    monkeypatch.chdir(tmp_path)
    assert chc.main(["predict", one_image(str(tmp_path)), "--json"]) == 0
    captured = capsys.readouterr()
    assert "shipped" not in captured.err
    assert json.loads(captured.out)[0]["predictions"][0]["class"].startswith("fine_")


@pytest.mark.parametrize("command", [["predict", "x.png"], ["evaluate"], ["export"]])
def test_a_missing_model_names_the_shipped_one_and_the_training_command(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the shipped model lies outside it: named by its whole path
    missing = str(tmp_path / "none.keras")
    assert chc.main([*command, "--model", missing]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {missing}: no such model file; train one with: python cifar_hybrid_classifier.py, or leave out "
        f"--model to use the shipped {chc.SHIPPED_MODEL}"]
