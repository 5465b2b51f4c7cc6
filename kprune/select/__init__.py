"""Choosing what to cut: per-channel importance (`criteria`) and which channels go (`pruners`)."""

from kprune.select import criteria, pruners  # noqa: F401
