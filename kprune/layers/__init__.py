"""Custom Keras layers used by kprune's training-time methods."""

from kprune.layers.compactor import Compactor  # noqa: F401
