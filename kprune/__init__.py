"""kprune: remove channels from Keras 3 convolutional networks for real."""

__version__ = "0.1.0"

from kprune.errors import KprunError  # noqa: F401
