"""Search per-group pruning ratios against a budget, judged by your evaluator.

One core (`kprune.search.core.Search`) holds the model, its dependency graph,
the channel scores and the guards; it turns per-group ratios into a plan,
prunes with the surgeon, calls your `evaluate(model) -> float` (and optional
`finetune`), and keeps a history and the best so far. Strategies differ only
in how they propose ratios:

* `sensitivity`: every group pruned alone at every ratio (a table);
* `netadapt`: NetAdapt (Yang et al., ECCV 2018), one group a step until the
  budget is met;
* `simulated_annealing`: NNI 2.x's simulated annealing over sparsity
  distributions scaled to the budget;
* `amc`: AMC (He et al., ECCV 2018), a DDPG agent choosing each group's ratio
  in turn, its actions clipped so that the budget stays reachable.

AutoCompress (annealing, then ADMM training, each iteration) trains, so it
lives above, in `kprune.autocompress`.

Budgets are one type for MACs, parameters and measured latency: `macs(t)`,
`params(t)`, `latency(t, runtime="keras", batch_size=1, threads=None)`.
Results come back as NNI-style config lists that `kprune.prune` accepts.

Example:

>>> result = kprune.search.netadapt(model, evaluate=val_accuracy,
...                                 budget=kprune.search.macs(0.5), finetune=short_finetune)
>>> small = result.model
>>> again = kprune.prune(model, config_list=result.config_list, **result.prune_kwargs)
"""

from kprune.search.amc import DDPGAgent, amc  # noqa: F401
from kprune.search.anneal import acceptance_probability, simulated_annealing  # noqa: F401
from kprune.search.budget import Budget, BoundBudget, latency, macs, params  # noqa: F401
from kprune.search.core import Search, SearchResult, Trial  # noqa: F401
from kprune.search.netadapt import netadapt  # noqa: F401
from kprune.search.sensitivity import SensitivityResult, sensitivity  # noqa: F401

__all__ = ["Budget", "BoundBudget", "DDPGAgent", "Search", "SearchResult", "SensitivityResult",
           "Trial", "acceptance_probability", "amc", "latency", "macs", "netadapt", "params",
           "sensitivity", "simulated_annealing"]
