"""Train CondenseNet-86 with learned group convolutions, then convert it.

CondenseNet (Huang et al., CVPR 2018) trains 1x1 learned group
convolutions that decide, during the first half of training, which input
channels each group keeps; the second half optimises the sparse network.
`kprune.condense.convert` then rebuilds it with index-select + grouped
convolution + channel shuffle, which computes the same function for a
quarter of the 1x1 convolutions' cost (G = C = 4).

Usage:

    # CIFAR-10 through keras.datasets (downloads it), the paper's recipe:
    # 300 epochs, batch 64, SGD + Nesterov, cosine learning rate from 0.1
    python examples/condensenet_cifar10.py

    # offline, on scikit-learn's bundled digits (8x8 upsampled to 16x16 RGB)
    python examples/condensenet_cifar10.py --data digits --epochs 30

    # a smaller CondenseNet, for a quick look on a CPU
    python examples/condensenet_cifar10.py --data digits --stages 4-4-4 --groups-3x3 1 --epochs 20

On a CPU, TensorFlow computes grouped convolutions through XLA, and their
gradients there are slow: `--groups-3x3 1` (dense 3x3 convolutions; the
learned 1x1 group convolutions are unchanged) trains many times faster.

The script prints the accuracy of the trained model and of the converted
one, their MACs and parameters (`kprune.profile`), and saves the converted
model as a `.keras` file.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kprune.methods.condense  # noqa: E402
from kprune.models import condensenet  # noqa: E402
from kprune.profile import format_count, profile  # noqa: E402

CIFAR_MEAN = np.array([0.4914, 0.4824, 0.4467], dtype="float32")
CIFAR_STD = np.array([0.2471, 0.2435, 0.2616], dtype="float32")


def load_data(name: str, image_size: int, seed: int) -> tuple:
    """`((x_train, y_train), (x_test, y_test))`, images normalised to zero mean."""
    if name == "cifar10":
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        x_train = (x_train.astype("float32") / 255.0 - CIFAR_MEAN) / CIFAR_STD
        x_test = (x_test.astype("float32") / 255.0 - CIFAR_MEAN) / CIFAR_STD
        return (x_train, y_train.ravel()), (x_test, y_test.ravel())
    from kprune.tools.datasets import digits

    (x_train, y_train), (x_test, y_test) = digits(image_size=image_size, channels=3, seed=seed)
    mean, std = x_train.mean(), x_train.std() + 1e-7
    return ((x_train - mean) / std, y_train), ((x_test - mean) / std, y_test)


def train_dataset(x, y, batch_size: int, augment: bool, seed: int) -> tf.data.Dataset:
    """Shuffled batches; for CIFAR-10, random 4-pixel shifts and horizontal flips."""
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
    if augment:
        height, width = x.shape[1:3]

        def shift_and_flip(image, label):
            image = tf.image.pad_to_bounding_box(image, 4, 4, height + 8, width + 8)
            image = tf.image.random_crop(image, (height, width, image.shape[-1]))
            return tf.image.random_flip_left_right(image), label

        data = data.map(shift_and_flip, num_parallel_calls=tf.data.AUTOTUNE)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def accuracy(model: keras.Model, x, y, batch_size: int = 256) -> float:
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("cifar10", "digits"), default="cifar10")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: 300 for cifar10, 30 for digits)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate (cosine)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--group-lasso", type=float, default=0.0,
                        help="group-lasso weight of the learned group convolutions")
    parser.add_argument("--stages", default="14-14-14", help="dense layers per block")
    parser.add_argument("--growth", default="8-16-32", help="growth rate per block")
    parser.add_argument("--groups", type=int, default=4, help="G = C of the learned convs")
    parser.add_argument("--groups-3x3", type=int, default=None,
                        help="groups of the 3x3 convolutions (default: --groups)")
    parser.add_argument("--image-size", type=int, default=16, help="digits image size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="condensenet_converted.keras",
                        help="where the converted model is saved")
    args = parser.parse_args(argv)
    epochs = args.epochs or (300 if args.data == "cifar10" else 30)
    keras.utils.set_random_seed(args.seed)

    (x_train, y_train), (x_test, y_test) = load_data(args.data, args.image_size, args.seed)
    num_classes = int(y_train.max()) + 1
    model = condensenet(
        "cifar",
        stages=[int(s) for s in args.stages.split("-")],
        growth=[int(g) for g in args.growth.split("-")],
        num_classes=num_classes,
        input_shape=x_train.shape[1:],
        groups=args.groups,
        groups_3x3=args.groups_3x3,
        group_lasso=args.group_lasso,
        classifier_activation=None,
    )
    data = train_dataset(x_train, y_train, args.batch_size, args.data == "cifar10", args.seed)
    steps = epochs * len(data)
    model.compile(
        optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(args.lr, steps), momentum=0.9,
            nesterov=True, weight_decay=args.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(f"{model.name}: {format_count(profile(model).macs)} MACs while training, "
          f"{len(x_train)} training images of shape {x_train.shape[1:]}, {epochs} epochs")
    start = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=2,
              callbacks=[kprune.condense.CondenseScheduler(verbose=1)])
    seconds = time.perf_counter() - start

    small = kprune.condense.convert(model)
    trained, converted = profile(model), profile(small)
    gap = float(np.max(np.abs(small.predict(x_test, verbose=0) - model.predict(x_test, verbose=0))))
    results = {
        "trained_accuracy": accuracy(model, x_test, y_test),
        "converted_accuracy": accuracy(small, x_test, y_test),
        "max_logit_difference": gap,
        "trained_macs": trained.macs, "converted_macs": converted.macs,
        "trained_params": trained.params, "converted_params": converted.params,
        "train_seconds": seconds,
    }
    print(f"test accuracy: trained {results['trained_accuracy']:.4f}, "
          f"converted {results['converted_accuracy']:.4f} (largest logit difference {gap:.2e})")
    print(f"MACs: {format_count(trained.macs)} -> {format_count(converted.macs)}; "
          f"parameters: {format_count(trained.params)} -> {format_count(converted.params)}")
    small.save(args.out)
    print(f"converted model saved to {args.out} ({seconds:.0f} s of training)")
    return results


if __name__ == "__main__":
    main()
