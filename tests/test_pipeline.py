"""The tf.data pipeline: shapes, dtypes, label safety, determinism, untouched evaluation batches."""

import numpy as np

import cifar_hybrid_classifier as chc

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(100, 32, 32, 3), dtype=np.uint8)
LABELS = np.arange(100) % 100


def collect(dataset):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    return np.concatenate(xs), np.concatenate(ys)


def test_train_batches_have_static_shapes_and_uint8_pixels():
    pipeline = chc.AugmentationPipeline(IMAGES, LABELS, batch_size=32, seed=1)
    batches = list(pipeline.train_dataset(epoch=0))
    assert len(batches) == pipeline.steps_per_epoch() == 3  # the partial batch is dropped
    for x, y in batches:
        assert x.shape == (32, 32, 32, 3) and x.dtype.name == "uint8"
        assert y.shape == (32,) and y.dtype.name == "int32"


def test_augmentation_changes_pixels_but_never_labels():
    # Uniform images stay uniform under reflect-padded crops and flips, so each pixel
    # still tells which image (and so which label) it came from.
    uniform = np.repeat(LABELS.astype(np.uint8), 32 * 32 * 3).reshape(100, 32, 32, 3)
    x, y = collect(chc.AugmentationPipeline(uniform, LABELS, 10, seed=3).train_dataset(epoch=0))
    np.testing.assert_array_equal(x[:, 5, 9, 1], y)
    np.testing.assert_array_equal(np.sort(y), np.sort(LABELS))  # each image once per epoch

    x, y = collect(chc.AugmentationPipeline(IMAGES, LABELS, 10, seed=3).train_dataset(epoch=0))
    changed = [not np.array_equal(x[i], IMAGES[y[i]]) for i in range(len(y))]
    assert np.mean(changed) > 0.5


def test_flip_only_pipeline_is_an_exact_mirror_or_identity():
    x, y = collect(chc.AugmentationPipeline(IMAGES, LABELS, 10, seed=4, crop_padding=0).train_dataset(0))
    for image, label in zip(x, y):
        assert np.array_equal(image, IMAGES[label]) or np.array_equal(image, IMAGES[label][:, ::-1])


def test_crops_are_windows_of_the_reflect_padded_image_at_varied_offsets():
    x, y = collect(chc.AugmentationPipeline(IMAGES, LABELS, 10, seed=4, flip=False).train_dataset(0))
    offsets = set()
    for image, label in zip(x, y):
        padded = np.pad(IMAGES[label], ((4, 4), (4, 4), (0, 0)), mode="reflect")
        found = [(i, j) for i in range(9) for j in range(9) if np.array_equal(padded[i:i + 32, j:j + 32], image)]
        assert found, "a crop that is no window of the padded image"
        offsets.add(found[0])
    assert len(offsets) > 20


def test_same_seed_and_epoch_repeat_and_epochs_differ():
    pipeline = chc.AugmentationPipeline(IMAGES, LABELS, 10, seed=5)
    first, again = collect(pipeline.train_dataset(0)), collect(pipeline.train_dataset(0))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    other_epoch = collect(pipeline.train_dataset(1))
    assert not np.array_equal(first[1], other_epoch[1])
    other_seed = collect(chc.AugmentationPipeline(IMAGES, LABELS, 10, seed=6).train_dataset(0))
    assert not np.array_equal(first[1], other_seed[1])


def test_evaluation_batches_are_unchanged_and_complete():
    pipeline = chc.AugmentationPipeline(IMAGES, LABELS, batch_size=32, seed=1)
    x, y = collect(pipeline.eval_dataset())
    np.testing.assert_array_equal(x, IMAGES)  # includes the final partial batch of 4
    np.testing.assert_array_equal(y, LABELS)


def test_pipelines_run_without_the_autotuning_thread_whose_end_stalls_each_epoch():
    pipeline = chc.AugmentationPipeline(IMAGES, LABELS, batch_size=32, seed=1)
    for dataset in (pipeline.train_dataset(epoch=0), pipeline.eval_dataset()):
        assert dataset.options().autotune.enabled is False


def test_cutmix_pastes_a_box_of_the_next_image_and_mixes_the_labels_by_its_area():
    plain = chc.AugmentationPipeline(IMAGES, LABELS, 20, seed=7)
    mixed = chc.AugmentationPipeline(IMAGES, LABELS, 20, seed=7, cutmix=0.5)
    boxes = 0
    for (x0, y0), (x1, y1) in zip(plain.train_dataset(0), mixed.train_dataset(0)):
        x0, y0, x1, y1 = x0.numpy(), y0.numpy(), x1.numpy(), y1.numpy()
        changed = np.any(x1 != x0, axis=-1)  # random images: a pasted pixel differs from the one beneath
        np.testing.assert_array_equal(x1[changed], np.roll(x0, 1, axis=0)[changed])
        rows, columns = changed.any(axis=2), changed.any(axis=1)
        np.testing.assert_array_equal(changed, rows[:, :, None] & columns[:, None, :])  # one rectangle each
        area = changed.mean(axis=(1, 2))[:, None]
        one_hot = np.eye(100)[y0]
        np.testing.assert_allclose(y1, (1 - area) * one_hot + area * np.roll(one_hot, 1, axis=0), atol=1e-6)
        boxes += int(changed.any(axis=(1, 2)).sum())
    assert 20 <= boxes <= 80  # about half of the 100 images
