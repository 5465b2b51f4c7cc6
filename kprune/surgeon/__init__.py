"""Model surgery: remove channels and layers, insert and replace layers."""

from kprune.surgeon.operations import (  # noqa: F401
    Surgeon,
    channel_plan,
    delete_channels,
    delete_layer,
    insert_layer,
    replace_layer,
)
from kprune.surgeon.plan import apply_plan, copy_model, drop_masks, zero_plan  # noqa: F401
