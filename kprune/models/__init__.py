"""Reference models for kprune's methods, built as Keras functional models."""

from kprune.models.cifar_resnet import cifar_resnet  # noqa: F401
from kprune.models.vgg import vgg, vgg_cfg  # noqa: F401
from kprune.models.condensenet import condensenet  # noqa: F401
