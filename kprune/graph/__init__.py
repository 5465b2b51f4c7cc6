"""The channel-dependency graph of a Keras model."""

from kprune.graph.dependency import DependencyGraph, Group, Member  # noqa: F401
from kprune.graph.rules import ChannelParamRule, LayerRule, get_rule, register_rule  # noqa: F401
from kprune.graph.walk import FlatGraph, walk  # noqa: F401
from kprune.graph.ops import OpCall  # noqa: F401,E402  (registers the keras.ops rules)
from kprune.graph import attention  # noqa: F401,E402  (registers the attention rules)
from kprune.graph import norms  # noqa: F401,E402  (registers the normalisation rules)
