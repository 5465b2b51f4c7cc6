"""kprune: remove channels from Keras 3 convolutional networks for real.

The top level holds what most users need: `profile`, `prune`, `export`,
the dependency graph and the surgeon. Each method has its own module:
`kprune.resrep`, `kprune.slimming`, `kprune.condense`, `kprune.sfp`,
`kprune.agp` and `kprune.repr` (RePr), all ending in the same surgery.
"""

__version__ = "0.1.0"

from kprune.errors import KprunError  # noqa: F401
from kprune.graph import DependencyGraph, register_rule  # noqa: F401
from kprune import surgeon  # noqa: F401
from kprune.surgeon import apply_plan, delete_channels  # noqa: F401
from kprune import criteria  # noqa: F401
from kprune.profile import latency, profile  # noqa: F401
from kprune.pruning import prune  # noqa: F401
from kprune import layers  # noqa: F401
from kprune import models  # noqa: F401
from kprune import regularizers  # noqa: F401
from kprune import rules  # noqa: F401
from kprune import resrep  # noqa: F401
from kprune import slimming  # noqa: F401
from kprune import condense  # noqa: F401
from kprune import masking  # noqa: F401
from kprune import sfp  # noqa: F401
from kprune import agp  # noqa: F401
from kprune import datasets  # noqa: F401
from kprune.export import export  # noqa: F401
from kprune.train import Trainer  # noqa: F401
