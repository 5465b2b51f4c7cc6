"""Small image data sets for examples and tests.

`digits` runs offline: it reads scikit-learn's bundled 8x8 handwritten digits
(1,797 images, 10 classes) and upsamples them to a conv-net friendly size.
`digits_folds` splits the same images into k folds so that every image is
tested once. `mnist1d` generates the MNIST-1D sequences offline with the
`mnist1d` package (`pip install mnist1d`). `cifar10` downloads CIFAR-10
through `keras.datasets` for users with network.
"""

from __future__ import annotations

import numpy as np

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _split(x: np.ndarray, y: np.ndarray, test_size: float, seed: int) -> Arrays:
    """Stratified-free shuffled split; the order depends only on `seed`."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_size))
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def _resize(images: np.ndarray, image_size: int) -> np.ndarray:
    """Bilinear resize of an NHW1 float batch to `image_size` squares."""
    import tensorflow as tf

    if images.shape[1] == image_size:
        return images
    out = tf.image.resize(images, (image_size, image_size), method="bilinear")
    return np.clip(out.numpy(), 0.0, 1.0)


def digits(image_size: int = 16, channels: int = 3, test_size: float = 0.2,
           seed: int = 0) -> Arrays:
    """scikit-learn's bundled handwritten digits as small NHWC images.

    Needs no network: the 8x8 images ship with scikit-learn. They are scaled
    to [0, 1], upsampled bilinearly to `image_size` and the grey channel is
    repeated `channels` times, so ImageNet-style models accept them.

    Args:
        image_size: Height and width of the returned images (>= 8).
        channels: Number of (identical) channels, usually 1 or 3.
        test_size: Share of the 1,797 images held out, in (0, 1).
        seed: Seed of the shuffle before the split.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: float32 images of shape
        `(n, image_size, image_size, channels)` in [0, 1] and int32 labels 0-9.

    Raises:
        ValueError: for an `image_size` below 8, `channels` below 1 or a
            `test_size` outside (0, 1).

    Example:

    >>> (x_train, y_train), (x_test, y_test) = digits(image_size=24)
    >>> x_train.shape[1:]
    (24, 24, 3)
    """
    if int(image_size) < 8:
        raise ValueError(f"digits: image_size must be at least 8 (the source size), got {image_size}.")
    if int(channels) < 1:
        raise ValueError(f"digits: channels must be at least 1, got {channels}.")
    if not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"digits: test_size must be in (0, 1), got {test_size}.")
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype("float32")[..., None]
    images = _resize(images, int(image_size))
    images = np.repeat(images, int(channels), axis=-1).astype("float32")
    labels = data.target.astype("int32")
    return _split(images, labels, float(test_size), int(seed))


def digits_folds(k: int = 5, image_size: int = 16, channels: int = 3, seed: int = 0) -> list:
    """`digits` as `k` train/test splits in which every image is tested exactly once.

    The 1,797 images are shuffled once with `seed` and cut into `k` folds of
    (almost) equal size; split `i` tests on fold `i` and trains on the rest.

    Args:
        k: Number of folds, at least 2.
        image_size: Height and width of the images (>= 8), as in `digits`.
        channels: Number of (identical) channels, as in `digits`.
        seed: Seed of the shuffle.

    Returns:
        A list of `k` `((x_train, y_train), (x_test, y_test))` tuples.

    Raises:
        ValueError: for `k` below 2 or above the number of images, or the
            arguments `digits` rejects.

    Example:

    >>> folds = digits_folds(5)
    >>> sum(len(test[1]) for _, test in folds)
    1797
    """
    if isinstance(k, bool) or int(k) != k or int(k) < 2:
        raise ValueError(f"digits_folds: k must be an int >= 2, got {k!r}.")
    (x, y), (xt, yt) = digits(image_size=image_size, channels=channels, test_size=0.5, seed=0)
    images, labels = np.concatenate([x, xt]), np.concatenate([y, yt])
    if int(k) > len(images):
        raise ValueError(f"digits_folds: k={k} exceeds the {len(images)} images.")
    order = np.random.default_rng(seed).permutation(len(images))
    folds = np.array_split(order, int(k))
    out = []
    for i, test in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != i])
        out.append(((images[train], labels[train]), (images[test], labels[test])))
    return out


def mnist1d(n: int = 5000, seed: int = 0, test_size: float = 0.2) -> Arrays:
    """MNIST-1D (Greydanus, 2020), generated offline, shaped for Conv1D.

    The `mnist1d` package builds the 40-step sequences from its ten digit
    templates with random padding, translation, shear, scaling and noise;
    nothing is downloaded. Sequences are returned channels last, normalised
    as the package does (zero mean, unit standard deviation overall).

    Args:
        n: Number of sequences in all (train + test), at least 20; rounded
            down to a multiple of 10 (the same number per class).
        seed: Seed of the generator (the package's own `seed` argument; the
            global NumPy random state is restored afterwards).
        test_size: Share of the sequences held out, in (0, 1).

    Returns:
        `((x_train, y_train), (x_test, y_test))`: float32 arrays of shape
        `(n, 40, 1)` and int32 labels 0-9.

    Raises:
        KprunError: when the `mnist1d` package is not installed.
        ValueError: for `n` below 20 or a `test_size` outside (0, 1).

    Example:

    >>> (x_train, y_train), (x_test, y_test) = mnist1d(n=4000)
    >>> x_train.shape
    (3200, 40, 1)
    """
    if isinstance(n, bool) or int(n) != n or int(n) < 20:
        raise ValueError(f"mnist1d: n must be an int >= 20, got {n!r}.")
    if not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"mnist1d: test_size must be in (0, 1), got {test_size}.")
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        from kprune.errors import KprunError

        raise KprunError("mnist1d: the `mnist1d` package is needed to generate MNIST-1D "
                         "offline; pip install mnist1d") from exc
    args = get_dataset_args()
    args.num_samples = int(n)
    args.train_split = 1.0 - float(test_size)
    args.seed = int(seed)
    state = np.random.get_state()  # make_dataset seeds NumPy's global generator
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    x, xt = (np.asarray(data[k], "float32")[..., None] for k in ("x", "x_test"))
    y, yt = (np.asarray(data[k]).astype("int32") for k in ("y", "y_test"))
    return (x, y), (xt, yt)


def cifar10() -> Arrays:
    """CIFAR-10 through `keras.datasets` (downloads about 170 MB once).

    Images are float32, scaled to [0, 1] and normalised per channel with the
    training set's mean and standard deviation.

    Returns:
        `((x_train, y_train), (x_test, y_test))` with images of shape
        `(n, 32, 32, 3)` and int32 labels of shape `(n,)`.

    Example:

    >>> (x_train, y_train), (x_test, y_test) = cifar10()
    >>> x_train.shape
    (50000, 32, 32, 3)
    """
    import keras

    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    x_train = x_train.astype("float32") / 255.0
    x_test = x_test.astype("float32") / 255.0
    mean = x_train.mean(axis=(0, 1, 2))
    std = x_train.std(axis=(0, 1, 2))
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return ((x_train, y_train.reshape(-1).astype("int32")),
            (x_test, y_test.reshape(-1).astype("int32")))


def as_dataset(x: np.ndarray, y: np.ndarray, batch_size: int = 64, shuffle: bool = True,
               seed: int = 0):
    """Batch arrays into a `tf.data.Dataset` of `(x, y)` pairs.

    Args:
        x: Inputs, first axis is the sample axis.
        y: Targets with as many samples as `x`.
        batch_size: Samples per batch (the last batch may be smaller).
        shuffle: Reshuffle the samples every epoch.
        seed: Seed of the shuffle.

    Returns:
        A prefetched `tf.data.Dataset`.

    Raises:
        ValueError: when `x` and `y` hold different numbers of samples.

    Example:

    >>> (x, y), _ = digits()
    >>> model.fit(as_dataset(x, y, batch_size=32), epochs=2)
    """
    import tensorflow as tf

    if len(x) != len(y):
        raise ValueError(f"as_dataset: x has {len(x)} samples but y has {len(y)}.")
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)


__all__ = ["as_dataset", "cifar10", "digits", "digits_folds", "mnist1d"]
