"""Every layer: output shapes, config round trip, and the model's regularization terms."""

import json
import os
import sys

import numpy as np
import pytest
import keras
import tensorflow as tf

import cifar_hybrid_classifier as chc
from conftest import TINY_ARGS

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(3, 32, 32, 3)).astype("float32")


def round_trip(layer, *inputs):
    """Rebuild `layer` from its serialized config, copy the weights, and compare outputs."""
    out = layer(*inputs)
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is type(layer)
    assert clone.get_config() == layer.get_config()
    clone(*inputs)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(clone(*inputs)), np.asarray(out), atol=1e-6)
    return out


def test_image_standardization_accepts_uint8_and_float():
    layer = chc.ImageStandardization()
    out_float = round_trip(layer, IMAGES)
    out_uint8 = layer(IMAGES.astype("uint8"))
    assert out_float.shape == IMAGES.shape
    np.testing.assert_allclose(np.asarray(out_uint8), np.asarray(out_float), atol=1e-6)
    expected = (IMAGES - np.array(chc.CIFAR100_MEAN)) / np.array(chc.CIFAR100_STD)
    np.testing.assert_allclose(np.asarray(out_float), expected, atol=1e-5)


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_patch_embedding_shape(patch_size):
    out = round_trip(chc.PatchEmbedding(patch_size, 24), IMAGES)
    assert tuple(out.shape) == (3, (32 // patch_size) ** 2, 24)


def test_patch_embedding_is_the_strided_convolution_of_its_weights():
    # The layer multiplies flattened patches by the conv kernel; saved models hold that kernel.
    layer = chc.PatchEmbedding(4, 24)
    out = np.asarray(layer(IMAGES))
    conv = np.asarray(layer.projection(IMAGES))
    np.testing.assert_allclose(out, conv.reshape(3, 64, 24), rtol=1e-4, atol=1e-2)
    assert layer.projection.kernel.shape == (4, 4, 3, 24)


def test_class_token_and_position_embedding():
    tokens = RNG.normal(size=(3, 16, 24)).astype("float32")
    with_cls = round_trip(chc.ClassToken(), tokens)
    assert tuple(with_cls.shape) == (3, 17, 24)
    np.testing.assert_allclose(np.asarray(with_cls)[:, 1:], tokens)
    # The same learned token is prepended to every image.
    np.testing.assert_allclose(np.asarray(with_cls)[0, 0], np.asarray(with_cls)[2, 0])
    positioned = round_trip(chc.PositionEmbedding(), np.asarray(with_cls))
    assert tuple(positioned.shape) == (3, 17, 24)


def test_transformer_block_shape_and_residual():
    tokens = RNG.normal(size=(2, 17, 32)).astype("float32")
    block = chc.TransformerEncoderBlock(32, 4, mlp_ratio=2.0, dropout=0.1)
    out = round_trip(block, tokens)
    assert tuple(out.shape) == tokens.shape
    # Zero the two output projections: both residual branches add nothing, so the block is the identity.
    block.attention._output_dense.kernel.assign(np.zeros(block.attention._output_dense.kernel.shape))
    block.attention._output_dense.bias.assign(np.zeros(block.attention._output_dense.bias.shape))
    block.mlp_out.kernel.assign(np.zeros(block.mlp_out.kernel.shape))
    block.mlp_out.bias.assign(np.zeros(block.mlp_out.bias.shape))
    np.testing.assert_allclose(np.asarray(block(tokens)), tokens, atol=1e-6)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_transformer_block_attention_is_keras_multi_head_attention(policy):
    # The block computes attention from the Keras layer's variables in its own way (faster on a CPU); it must
    # give what that layer gives, weights included, so saved models keep their predictions.
    tokens = RNG.normal(size=(3, 17, 64)).astype("float32")
    block = chc.TransformerEncoderBlock(64, 4, dtype=policy)
    block.build(tokens.shape)
    for variable in block.attention.weights:  # non-zero biases too, so each lands where Keras puts it
        variable.assign(RNG.normal(scale=0.2, size=variable.shape))
    normed = block.norm1(tokens)
    expected, expected_scores = block.attention(normed, normed, return_attention_scores=True)
    attended, scores = block.self_attention(normed)
    assert attended.dtype == expected.dtype and tuple(scores.shape) == (3, 4, 17, 17)
    tolerance = 1e-5 if policy == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(attended, "float32"), np.asarray(expected, "float32"), atol=tolerance)
    np.testing.assert_allclose(np.asarray(scores, "float32"), np.asarray(expected_scores, "float32"), atol=tolerance)
    np.testing.assert_allclose(np.asarray(scores, "float32").sum(-1), 1.0, atol=tolerance)
    if policy != "float32":
        return  # bf16 rounds the two orders of operations apart; the gradients' agreement is float32's to show
    # The same gradients too, for the tokens and every variable: training takes its own path backwards.
    upstream = tf.constant(RNG.normal(size=tokens.shape), expected.dtype)
    gradients = []
    for attend in (lambda x: block.attention(x, x), lambda x: block.self_attention(x)[0]):
        x = tf.constant(normed)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(attend(x) * upstream, "float32"))
        gradients.append(tape.gradient(loss, [x, *block.attention.trainable_variables]))
    for keras_gradient, block_gradient in zip(*gradients):
        np.testing.assert_allclose(np.asarray(block_gradient, "float32"), np.asarray(keras_gradient, "float32"),
                                   atol=1e-4)

def test_batch_norm_trains_with_the_fused_kernel_like_keras_batch_norm():
    """Same output, gradients and moving statistics as Keras's layer, whose weights it shares."""
    x = tf.constant(RNG.normal(1.0, 3.0, size=(4, 5, 5, 6)), "float32")
    upstream = tf.constant(RNG.normal(size=x.shape), "float32")
    results = []
    for layer in (keras.layers.BatchNormalization(momentum=0.9), chc.BatchNormalization(momentum=0.9)):
        layer.build(x.shape)
        layer.set_weights([np.linspace(0.5, 2.0, 6), np.linspace(-1.0, 1.0, 6), np.zeros(6), np.ones(6)])
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * upstream)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([layer(x, training=True), *grads, layer.moving_mean, layer.moving_variance,
                        layer(x, training=False)])
    for keras_value, fused_value in zip(*results):
        np.testing.assert_allclose(np.asarray(fused_value), np.asarray(keras_value), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(results[1][4]), 0.0)  # the moving mean moved
    assert isinstance(chc.ConvStem(8).stack.layers[2], chc.BatchNormalization)
    round_trip(chc.BatchNormalization(), IMAGES)


def test_batch_norm_benchmark_times_both_layers_and_restores_the_fused_one(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import batch_norm
    batch_norm.main(["--rounds", "1", *TINY_ARGS])
    figures = json.loads(capsys.readouterr().out)
    assert figures["step_ms_keras"] > 0 and figures["step_ms_fused"] > 0 and figures["batch_size"] == 32
    assert [len(times) for times in figures["rounds_ms"].values()] == [1, 1]
    assert chc.BatchNormalization is not keras.layers.BatchNormalization


def test_cnn_branch_output_is_a_vector():
    out = round_trip(chc.CNNBranch((8, 16, 24)), IMAGES)
    assert tuple(out.shape) == (3, 24)
    assert len(chc.CNNBranch((8, 16), stem=False).stack.layers) == len(chc.CNNBranch((8, 16)).stack.layers) - 3


def test_the_stem_is_conv_pool_conv_and_reads_the_configs_of_earlier_versions():
    stem = chc.ConvStem(8)
    assert tuple(round_trip(stem, IMAGES).shape) == (3, 16, 16, 8)
    assert [(layer.kernel_size, layer.strides) for layer in stem.stack.layers
            if isinstance(layer, keras.layers.Conv2D)] == [((3, 3), (1, 1))] * 2
    # Configs saved by earlier versions name the stem's kind, or before that the full-resolution conv.
    for legacy in ({"kind": "pool"}, {"full_resolution_conv": False}):
        assert chc.ConvStem.from_config({**stem.get_config(), **legacy}).get_config() == stem.get_config()
    for dropped in ({"kind": "patch"}, {"kind": "full"}, {"full_resolution_conv": True}):
        with pytest.raises((ValueError, TypeError), match="no longer built"):  # Keras wraps it in a TypeError
            chc.ConvStem.from_config({**stem.get_config(), **dropped})


def test_conv_stem_halves_the_image_and_both_branches_read_it():
    stem = chc.ConvStem(8)
    features = round_trip(stem, IMAGES)
    assert tuple(features.shape) == (3, 16, 16, 8)
    assert tuple(round_trip(chc.CNNBranch((16, 24), stem=False), features).shape) == (3, 24)
    assert tuple(round_trip(chc.ViTBranch(patch_size=2, embed_dim=16, depth=1, num_heads=2), features).shape) \
        == (3, 16)
    model = chc.build_model(chc.parse_config(TINY_ARGS))
    assert [type(layer).__name__ for layer in model.layers[1:]] == \
        ["ImageStandardization", "ConvStem", "CNNBranch", "ViTBranch", "FusionHead"]
    for branches, kept in [("cnn", "CNNBranch"), ("vit", "ViTBranch")]:
        alone = chc.build_model(chc.parse_config(TINY_ARGS + ["--branches", branches]))
        names = [type(layer).__name__ for layer in alone.layers]
        assert kept in names and len(names) == 5, names


def test_vit_branch_sequence_is_patches_plus_cls():
    branch = chc.ViTBranch(patch_size=8, embed_dim=16, depth=2, num_heads=2)
    out = round_trip(branch, IMAGES)
    assert tuple(out.shape) == (3, 16)
    tokens = branch.tokens(IMAGES)
    assert tuple(tokens.shape) == (3, (32 // 8) ** 2 + 1, 16)
    np.testing.assert_allclose(np.asarray(tokens)[:, 0], np.asarray(out), atol=1e-6)
    assert len(branch.blocks) == 2


def test_fusion_head_softmax_in_float32():
    cnn = RNG.normal(size=(3, 24)).astype("float32")
    vit = RNG.normal(size=(3, 16)).astype("float32")
    head = chc.FusionHead(100, units=32, dropout=0.2, l2=1e-3, dtype="mixed_bfloat16")
    out = head([cnn, vit])
    assert tuple(out.shape) == (3, 100)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, atol=1e-5)
    plain = chc.FusionHead(100, units=32, dropout=0.2, l2=1e-3)
    round_trip(plain, [cnn, vit])
    assert plain.get_config()["l2"] == 1e-3 and plain.get_config()["dropout"] == 0.2


def test_model_losses_are_the_l2_terms_of_the_fusion_head():
    config = chc.parse_config(TINY_ARGS + ["--l2", "0.01"])
    model = chc.build_model(config)
    head = model.get_layer("fusion_head")
    expected = sorted(0.01 * float(np.sum(np.square(k))) for k in (head.hidden.kernel, head.classifier.kernel))
    actual = sorted(float(loss) for loss in model.losses)
    assert len(actual) == 2
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    no_l2 = chc.build_model(chc.parse_config(TINY_ARGS + ["--l2", "0"]))
    assert sum(float(loss) for loss in no_l2.losses) == 0.0


def test_model_maps_raw_images_to_probabilities():
    model = chc.build_model(chc.parse_config(TINY_ARGS))
    probs = model.predict(IMAGES.astype("uint8"), verbose=0)
    assert probs.shape == (3, 100)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(model.predict(IMAGES, verbose=0), probs, atol=1e-6)


def test_whitened_stem_decorrelates_training_patches_and_is_frozen():
    config = chc.parse_config(TINY_ARGS)
    model = chc.build_model(config)
    rng = np.random.default_rng(1)
    # Smooth random images: neighbouring pixels and channels correlate, as in photographs.
    images = np.clip(128 + np.cumsum(rng.normal(0, 12, (64, 32, 32, 3)), axis=2), 0, 255).astype("uint8")
    conv = model.get_layer("stem").stack.layers[0]
    trainable_before = len(model.trainable_variables)
    chc.whiten_stem(model, images)
    assert not conv.trainable and len(model.trainable_variables) == trainable_before - 1
    x = np.asarray(model.get_layer("standardize")(images))
    valid = np.asarray(keras.ops.conv(x, conv.kernel, padding="valid"))
    pairs = conv.filters // 2
    features = valid[..., :pairs].reshape(-1, pairs)
    covariance = features.T @ features / len(features)
    np.testing.assert_allclose(covariance, np.eye(pairs), atol=0.05)
    np.testing.assert_allclose(valid[..., pairs:2 * pairs], -valid[..., :pairs], atol=1e-4)


def test_identity_init_passes_channels_through_every_later_conv():
    model = chc.build_model(chc.parse_config(TINY_ARGS))
    convs = [layer for name in ("stem", "cnn_branch") for layer in model.get_layer(name).stack.layers
             if isinstance(layer, keras.layers.Conv2D)]
    first_before = np.asarray(convs[0].kernel).copy()
    chc.identity_init(model)
    np.testing.assert_array_equal(np.asarray(convs[0].kernel), first_before)  # the stem's first conv is left
    x = RNG.normal(size=(2, 8, 8, 1)).astype("float32")
    for conv in convs[1:]:
        channels, filters = conv.kernel.shape[2:]
        n = min(channels, filters)
        inputs = np.repeat(x, channels, axis=-1) * np.arange(1, channels + 1, dtype="float32")
        out = np.asarray(keras.ops.conv(inputs, conv.kernel, padding="same"))
        np.testing.assert_allclose(out[..., :n], inputs[..., :n], atol=1e-6)
        if filters > n:  # the filters beyond the identity keep their random start
            assert np.abs(np.asarray(conv.kernel)[..., n:]).sum() > 0
