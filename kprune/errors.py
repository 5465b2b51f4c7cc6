"""Errors raised by kprune."""


class KprunError(ValueError):
    """Bad input to a kprune function: the message names the layer and the reason."""
