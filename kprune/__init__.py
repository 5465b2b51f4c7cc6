"""kprune: remove channels from Keras 3 convolutional networks for real.

The top level holds what most users need: `profile`, `prune`, `export`,
`search` (per-layer ratios against a budget), the dependency graph and the
surgeon. Each method has its own module:
`kprune.resrep`, `kprune.slimming`, `kprune.condense`, `kprune.sfp`,
`kprune.agp` and `kprune.repr` (RePr), all ending in the same surgery;
`kprune.autocompress` (annealing, ADMM training with `kprune.admm`, then the cut);
`kprune.lowrank` decomposes layers by truncated SVD with ENC rank selection.

The package is layered (see README.md, "Layout"); each folder imports only
from the folders below it:

    errors
    layers/   custom layers and the regularizers they use
    models/   reference models
    graph/    channel-dependency graph
    surgeon/  rebuild a model with a plan applied
    profile   MACs, parameters, latency
    latency   per-layer latency tables and the latency model
    select/   criteria and pruners
    pruning   one-shot `prune`
    search/   per-layer ratios against a budget: sensitivity, NetAdapt, annealing, AMC
    train/    update rules, RuleOptimizer, Trainer, channel masks
    methods/  ResRep, Slimming, CondenseNet, SFP, RePr, AGP, low-rank (ENC), AutoCompress
    tools/    export, cli, demo, datasets, verify, plot
"""

import sys as _sys

__version__ = "0.1.0"

from kprune.errors import KprunError, KprunWarning  # noqa: F401,E402
from kprune import layers, models  # noqa: F401,E402
from kprune.layers import regularizers  # noqa: F401,E402
from kprune.graph import DependencyGraph, register_rule  # noqa: F401,E402
from kprune import surgeon  # noqa: F401,E402
from kprune.surgeon import apply_plan, delete_channels  # noqa: F401,E402
from kprune.profile import profile  # noqa: F401,E402
from kprune import latency  # noqa: F401,E402  (callable: kprune.latency(model) times a model)
from kprune.select import criteria, pruners  # noqa: F401,E402
from kprune.pruning import prune  # noqa: F401,E402
from kprune import search  # noqa: F401,E402
from kprune import train  # noqa: F401,E402
from kprune.train import Trainer, masking, rules  # noqa: F401,E402
from kprune.methods import agp, condense, lowrank, repr, resrep, sfp, slimming  # noqa: F401,E402
from kprune.methods.autocompress import autocompress  # noqa: F401,E402
from kprune.train import admm  # noqa: F401,E402
from kprune.tools import cli, datasets, demo, hub_rules, plot, verify  # noqa: F401,E402
from kprune.tools.export import export  # noqa: F401,E402


def _keep_module_paths():
    """Let `import kprune.resrep` and `from kprune.criteria import ...` keep working.

    The modules moved into layer folders; their old dotted paths stay valid
    as aliases of the same module objects.
    """
    moved = {"criteria": criteria, "pruners": pruners, "regularizers": regularizers,
             "masking": masking, "rules": rules, "agp": agp, "condense": condense,
             "lowrank": lowrank, "repr": repr, "resrep": resrep, "sfp": sfp, "slimming": slimming,
             "cli": cli, "datasets": datasets, "demo": demo, "plot": plot,
             "verify": verify}
    for name, module in moved.items():
        _sys.modules.setdefault(f"{__name__}.{name}", module)
    _sys.modules.setdefault(f"{__name__}.export", _sys.modules["kprune.tools.export"])


_keep_module_paths()
