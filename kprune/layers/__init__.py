"""Custom Keras layers used by kprune's training-time methods."""

from kprune.layers.compactor import Compactor  # noqa: F401
from kprune.layers.channel_shuffle import ChannelShuffle  # noqa: F401
from kprune.layers.index_select import IndexSelect  # noqa: F401
from kprune.layers.learned_group_conv import LearnedDense, LearnedGroupConv  # noqa: F401
from kprune.layers.tokens import ClassToken, PositionEmbedding  # noqa: F401
