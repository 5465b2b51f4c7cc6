"""Errors and warnings raised by kprune."""


class KprunError(ValueError):
    """Bad input to a kprune function: the message names the layer and the reason."""


class KprunWarning(UserWarning):
    """kprune did less than asked (groups blocked, layers not counted); the message says why."""
