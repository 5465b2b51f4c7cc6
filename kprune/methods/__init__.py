"""Training-time pruning recipes built on the graph, surgeon, selection and training layers."""

from kprune.methods import agp, condense, lowrank, repr, resrep, sfp, slimming  # noqa: F401
