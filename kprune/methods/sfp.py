"""Soft Filter Pruning: zero the weakest filters every epoch and let them train.

Soft Filter Pruning (He et al., "Soft Filter Pruning for Accelerating Deep
Convolutional Neural Networks", IJCAI 2018): at the end of every epoch, the
filters with the smallest L2 norm in each layer are set to zero, but they
stay in the model and keep training during the next epoch, so a filter
zeroed too early can grow back and take the place of another. After the
last epoch the zeroed filters are removed for real (`finalize`).

kprune zeroes a channel as `kprune.masking.ChannelMasker` defines it
(producer kernels and biases, BatchNormalization beta and moving mean; gamma
is kept so the filter can still learn), so at every epoch end the model
computes exactly what the pruned model will. Layers are dependency groups:
the filters of a residual stream are scored and zeroed together.

`finalize` is exact (it returns what the masked model computes); the
accuracy cost is in the epoch-end zeroing itself. With BatchNormalization
after them, zeroed filters grow back to a working scale within one epoch,
and the moving statistics of the layers after them lag behind (Keras'
default momentum is 0.99; PyTorch's default equals 0.9), so on short epochs
the model right after the last zeroing can be far below its training
accuracy. `finalize(data=x_train)` re-estimates the BatchNormalization
statistics on training batches (`kprune.train.recalibrate`); measured on
MNIST-1D (`bench/accuracy.py --quick`, 25% of the MACs) that lifts the model
right after `finalize` from 18.9% to 73.3%; a few epochs of fine-tuning do
the rest.

Example:

>>> sfp = kprune.sfp.SoftFilterPruning(ratio=0.3)
>>> model.fit(x, y, epochs=20, callbacks=[sfp])
>>> small = sfp.finalize(data=x[:4096])   # BatchNormalization statistics re-estimated
"""

from __future__ import annotations

from typing import Mapping

import keras
import numpy as np

from kprune.select import criteria, pruners
from kprune.errors import KprunError
from kprune.train.batchnorm import recalibrate
from kprune.train.masking import ChannelMasker


class SoftFilterPruning(ChannelMasker):
    """Zero the lowest-norm filters of every group each epoch; prune at the end.

    Args:
        ratio: Share of every group's channels to zero, in [0, 1); or a dict
            `{producer layer name: ratio}` (groups not named are left whole).
        criterion: A filter criterion of `kprune.criteria` ("l2" as in the
            paper, or "l1", "fpgm", ...).
        start_epoch: First epoch (0-based) at whose end filters are zeroed.
        interval: Epochs between two updates of the zeroed set.
        exclude: Layer names, class names or classes whose groups stay whole.
        min_channels: Channels every group keeps.
        round_to: Keep a multiple of this many channels where possible.
        verbose: 1 prints a line per update.

    Attributes:
        history: One plan `{group id: channels}` per update, in order.

    Example:

    >>> sfp = SoftFilterPruning(0.3)
    >>> model.fit(x, y, epochs=10, callbacks=[sfp])
    >>> small = sfp.finalize()
    """

    def __init__(self, ratio: float | Mapping = 0.3, criterion: str = "l2", start_epoch: int = 0,
                 interval: int = 1, exclude=(), min_channels: int = 1, round_to: int = 1,
                 verbose: int = 0):
        super().__init__(mode="soft", exclude=exclude, min_channels=min_channels, verbose=verbose)
        _check_ratio(ratio)
        crit = criteria.get_criterion(criterion)
        if crit.kind != "filters":
            raise KprunError(f"SoftFilterPruning: criterion {criterion!r} does not score "
                             "filters; use 'l2', 'l1', 'fpgm' or another weight criterion.")
        for name, value, low in (("start_epoch", start_epoch, 0), ("interval", interval, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise KprunError(f"SoftFilterPruning: `{name}` must be an int >= {low}, "
                                 f"got {value!r}.")
        pruners.check_guards(1.0, min_channels, round_to)
        self.ratio = ratio
        self.criterion = criterion
        self.start_epoch = int(start_epoch)
        self.interval = int(interval)
        self.round_to = int(round_to)
        self.history: list = []

    def _ratios(self):
        if not isinstance(self.ratio, Mapping):
            return float(self.ratio)
        out = {}
        for name, value in self.ratio.items():
            group = self.group(name)
            out[group.id] = float(value)
        return out

    def select(self) -> dict:
        """Score the filters now and choose the channels to zero (does not write them).

        Returns:
            The plan `{group id: channels}` now held in `masks`.
        """
        self._require_model()
        groups = self.groups
        scores = criteria.score_groups(self.model, groups, self.criterion, graph=self.graph)
        chosen = pruners.local_plan(groups, scores, self._ratios(), max_ratio=1.0,
                                    min_channels=self.min_channels, round_to=self.round_to)
        self.set_plan(chosen)
        self.history.append(self.plan())
        return self.plan()

    def finalize(self, model: keras.Model | None = None, data=None, steps: int | None = None,
                 batch_size: int = 64) -> keras.Model:
        """Remove the zeroed filters; with `data`, re-estimate the normalisation statistics.

        Args:
            model: The model to prune (default: the one being trained); left
                untouched.
            data: Training inputs (an array, `(x, y)`, a dataset or batches):
                when given, the pruned model's BatchNormalization statistics
                are replaced by their average over these batches
                (`kprune.train.recalibrate`), which undoes the lag of the
                moving statistics behind the last epochs' regrowth.
            steps: Most batches of `data` to use (default: all).
            batch_size: Batch size when `data` is an array.

        Returns:
            A new, smaller model of plain Keras layers.

        Example:

        >>> small = sfp.finalize(data=x_train[:4096])
        """
        small = super().finalize(model)
        if data is not None:
            recalibrate(small, data, batch_size=batch_size, steps=steps)
        return small

    def on_epoch_end(self, epoch, logs=None) -> None:
        if epoch >= self.start_epoch and (epoch - self.start_epoch) % self.interval == 0:
            self.select()
            self._report(f"epoch {epoch + 1}")
        super().on_epoch_end(epoch, logs)


def _check_ratio(ratio) -> None:
    values = ratio.values() if isinstance(ratio, Mapping) else [ratio]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise KprunError(f"SoftFilterPruning: ratios must be numbers in [0, 1), got {value!r}.")


__all__ = ["SoftFilterPruning"]
