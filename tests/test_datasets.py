"""Data helpers: bundled digits and tf.data batching."""

import numpy as np
import pytest

from kprune import datasets


def test_digits_shapes_types_and_range():
    (x_train, y_train), (x_test, y_test) = datasets.digits(image_size=12, channels=3, test_size=0.25)
    assert x_train.shape == (1348, 12, 12, 3) and x_test.shape == (449, 12, 12, 3)
    assert y_train.shape == (1348,) and y_test.shape == (449,)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0 and x_train.max() > 0.9
    assert set(np.unique(np.concatenate([y_train, y_test]))) == set(range(10))


def test_digits_channels_are_copies_of_one_grey_image():
    (x, _), _ = datasets.digits(image_size=10, channels=3)
    np.testing.assert_array_equal(x[..., 0], x[..., 1])
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    (grey, _), _ = datasets.digits(image_size=10, channels=1)
    np.testing.assert_array_equal(grey[..., 0], x[..., 0])


def test_digits_at_source_size_equals_sklearn_images():
    from sklearn.datasets import load_digits

    (x_train, y_train), (x_test, y_test) = datasets.digits(image_size=8, channels=1, test_size=0.5)
    x = np.concatenate([x_train, x_test])[..., 0]
    y = np.concatenate([y_train, y_test])
    source = load_digits()
    ref = (source.images / 16.0).astype("float32")

    def rows(images, labels):  # every (image, label) pair in a canonical order
        keys = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
        return keys[np.lexsort(keys.T[::-1])]

    np.testing.assert_allclose(rows(x, y), rows(ref, source.target), rtol=0, atol=1e-6)


def test_digits_is_deterministic_per_seed():
    a = datasets.digits(image_size=16, seed=1)
    b = datasets.digits(image_size=16, seed=1)
    c = datasets.digits(image_size=16, seed=2)
    np.testing.assert_array_equal(a[0][0], b[0][0])
    np.testing.assert_array_equal(a[1][1], b[1][1])
    assert not np.array_equal(a[1][1], c[1][1])


@pytest.mark.parametrize("kwargs", [dict(image_size=4), dict(channels=0), dict(test_size=1.0)])
def test_digits_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="digits"):
        datasets.digits(**kwargs)


def test_as_dataset_batches_every_sample_once():
    x = np.arange(10, dtype="float32").reshape(10, 1)
    y = np.arange(10, dtype="int32")
    ds = datasets.as_dataset(x, y, batch_size=4, shuffle=True, seed=0)
    batches = list(ds.as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    xs = np.concatenate([b[0][:, 0] for b in batches])
    ys = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(np.sort(xs), x[:, 0])
    np.testing.assert_array_equal(xs.astype("int32"), ys)


def test_as_dataset_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 samples"):
        datasets.as_dataset(np.zeros((3, 2)), np.zeros(4))
