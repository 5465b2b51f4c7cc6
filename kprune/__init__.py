"""kprune: remove channels from Keras 3 convolutional networks for real."""

__version__ = "0.1.0"

from kprune.errors import KprunError  # noqa: F401
from kprune.graph import DependencyGraph, register_rule  # noqa: F401
from kprune import surgeon  # noqa: F401
from kprune.surgeon import apply_plan, delete_channels  # noqa: F401
from kprune import criteria  # noqa: F401
from kprune.profile import latency, profile  # noqa: F401
from kprune.pruning import prune  # noqa: F401
from kprune import resrep  # noqa: F401
from kprune import datasets  # noqa: F401
from kprune.export import export  # noqa: F401
from kprune.train import Trainer  # noqa: F401
