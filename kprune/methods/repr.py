"""RePr: drop the least orthogonal filters for a while, bring them back orthogonal.

RePr (Prakash et al., "RePr: Improved Training of Convolutional Filters",
CVPR 2019) is a training schedule, not a compression method: train the full
network for S1 iterations; rank every filter of the network by how much it
overlaps the other filters of its layer (`kprune.criteria.orthogonality`,
ranked globally) and drop the least orthogonal share `ratio` for S2
iterations, training the sub-network; then bring the dropped filters back,
re-initialised orthogonal to the filters that were kept (and, where the
filter space leaves room, to their own values before the drop); repeat N
times, then keep training the full network. With `prune_at_end=True` the
filters dropped in the last cycle stay dropped and `finalize()` removes them.

The paper reports gains of one to a few points on CIFAR-10 for small
networks; independent reimplementations did not reproduce them
consistently. kprune implements the schedule as described so it can be
measured.

Dropped filters are masked as `kprune.masking.ChannelMasker` defines it, in
"hard" mode (the zeros are rewritten after every batch). The optimizer's
slot variables (momentum, Adam moments) of re-initialised filters are not
reset.

Example:

>>> repr_ = kprune.repr.RePr(s1=200, s2=100, cycles=3, ratio=0.3)
>>> model.fit(x, y, epochs=30, callbacks=[repr_])
"""

from __future__ import annotations

import keras
import numpy as np

from kprune.select import criteria
from kprune.errors import KprunError
from kprune.train.masking import ChannelMasker, count_for, lowest_global, producer_variables

UNITS = ("step", "epoch")


def orthogonal_filters(kept: np.ndarray, count: int, avoid: np.ndarray | None = None,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """`count` random unit filters orthogonal to each other and to the rows of `kept`.

    The filters are drawn from the null space of `kept` (and of `avoid` as
    well when the null space of both still has `count` dimensions). When
    even the null space of `kept` is too small (more filters than weights
    per filter), the rows are made orthogonal to as many kept filters as
    the space allows: each new filter is projected off the kept filters'
    leading principal directions.

    Args:
        kept: `(m, d)` filters (rows) the new ones must be orthogonal to.
        count: Number of new filters.
        avoid: `(k, d)` further rows to be orthogonal to where possible
            (RePr: the dropped filters' values before the drop).
        rng: Random generator.

    Returns:
        Array `(count, d)` of unit-norm rows.

    Example:

    >>> new = orthogonal_filters(np.eye(4)[:2], 2)
    >>> np.allclose(new @ np.eye(4)[:2].T, 0)
    True
    """
    rng = rng or np.random.default_rng()
    kept = np.asarray(kept, dtype=np.float64)
    d = kept.shape[1]
    if count <= 0:
        return np.zeros((0, d))
    candidates = [kept] if avoid is None else [np.concatenate([kept, avoid]), kept]
    for rows in candidates:
        basis = _null_space(rows, d)
        if basis.shape[1] >= count:
            coeffs = rng.normal(size=(basis.shape[1], count))
            q, _ = np.linalg.qr(coeffs)  # orthonormal columns in coefficient space
            return (basis @ q).T
    # Not enough room: orthogonal to the d - count leading directions of `kept`.
    _, _, vt = np.linalg.svd(kept, full_matrices=True)
    free = vt[max(d - count, 0):].T  # the count least used directions
    q, _ = np.linalg.qr(rng.normal(size=(free.shape[1], count)))
    return (free @ q).T


def _null_space(rows: np.ndarray, d: int) -> np.ndarray:
    """Orthonormal basis `(d, d - rank)` of the vectors orthogonal to every row."""
    if len(rows) == 0:
        return np.eye(d)
    _, s, vt = np.linalg.svd(rows, full_matrices=True)
    tol = max(rows.shape) * np.finfo(np.float64).eps * (s[0] if len(s) else 0.0)
    rank = int((s > tol).sum())
    return vt[rank:].T


def _matrix(value: np.ndarray, axis: int) -> np.ndarray:
    """A kernel as `(positions, weights per filter)`, positions on `axis`."""
    moved = np.moveaxis(value, axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _unmatrix(matrix: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    moved_shape = np.moveaxis(like, axis, 0).shape
    return np.moveaxis(matrix.reshape(moved_shape), 0, axis)


class RePr(ChannelMasker):
    """The RePr training schedule as a Keras callback.

    Timeline, in `unit`s (training steps by default), for cycle k = 0..N-1:
    train the full network until `k * (s1 + s2) + s1`, then drop; train the
    sub-network until `(k + 1) * (s1 + s2)`, then re-initialise the dropped
    filters; after the N cycles the full network trains on.

    Args:
        s1: Units of full-network training before each drop.
        s2: Units the dropped filters stay dropped.
        cycles: N, the number of drop/re-initialise cycles.
        ratio: Share of all filters dropped each cycle (p), ranked globally.
        criterion: Ranking criterion (default "orthogonality", RePr's
            metric; any filter criterion of `kprune.criteria` works).
        unit: "step" (training batches) or "epoch".
        prune_at_end: Keep the last cycle's filters dropped (not
            re-initialised), so `finalize()` removes them.
        exclude: Layer names, class names or classes whose groups are never
            dropped.
        min_channels: Channels every group keeps.
        seed: Seed of the re-initialisation.
        verbose: 1 prints a line per drop and re-initialisation.

    Attributes:
        history: `(unit count, "drop" | "reinit", plan)` per event.

    Example:

    >>> cb = RePr(s1=100, s2=50, cycles=2, ratio=0.3)
    >>> model.fit(x, y, epochs=10, callbacks=[cb])
    """

    def __init__(self, s1: int = 1000, s2: int = 500, cycles: int = 3, ratio: float = 0.3,
                 criterion: str = "orthogonality", unit: str = "step",
                 prune_at_end: bool = False, exclude=(), min_channels: int = 1,
                 seed: int | None = None, verbose: int = 0):
        super().__init__(mode="hard", exclude=exclude, min_channels=min_channels, verbose=verbose)
        for name, value, low in (("s1", s1, 1), ("s2", s2, 1), ("cycles", cycles, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise KprunError(f"RePr: `{name}` must be an int >= {low}, got {value!r}.")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise KprunError(f"RePr: `ratio` must be in (0, 1), got {ratio!r}.")
        if unit not in UNITS:
            raise KprunError(f"RePr: `unit` must be 'step' or 'epoch', got {unit!r}.")
        if criteria.get_criterion(criterion).kind != "filters":
            raise KprunError(f"RePr: criterion {criterion!r} does not score filters.")
        self.s1, self.s2, self.cycles = int(s1), int(s2), int(cycles)
        self.ratio = float(ratio)
        self.criterion = criterion
        self.unit = unit
        self.prune_at_end = bool(prune_at_end)
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.history: list = []
        self._before: dict = {}

    # Schedule ---------------------------------------------------------------
    def event(self, count: int) -> str | None:
        """What happens once `count` units are done: "drop", "reinit" or None."""
        period = self.s1 + self.s2
        cycle, pos = divmod(count, period)
        if pos == self.s1 and cycle < self.cycles:
            return "drop"
        if pos == 0 and 1 <= cycle <= self.cycles:
            if self.prune_at_end and cycle == self.cycles:
                return None
            return "reinit"
        return None

    def _tick(self) -> None:
        self.count += 1
        what = self.event(self.count)
        if what == "drop":
            self.drop()
        elif what == "reinit":
            self.reinitialize()

    def on_train_batch_end(self, batch, logs=None) -> None:
        if self.unit == "step":
            self._tick()
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None) -> None:
        if self.unit == "epoch":
            self._tick()
            self.apply()
        super().on_epoch_end(epoch, logs)

    # Events -----------------------------------------------------------------
    def drop(self) -> dict:
        """Mask the `ratio` least orthogonal filters of the network now.

        Returns:
            The plan `{group id: channels}` now masked.
        """
        self._require_model()
        self.sync_state()
        groups = self.groups
        scores = criteria.score_groups(self.model, groups, self.criterion, graph=self.graph)
        total = sum(g.size for g in groups if g.id in scores)
        chosen = lowest_global(groups, scores, count_for(self.ratio, total), self.min_channels)
        self.set_plan(chosen)
        self._before = self._snapshot()
        self.apply()
        self.history.append((self.count, "drop", self.plan()))
        self._report(f"drop at {self.unit} {self.count}")
        return self.plan()

    def _snapshot(self) -> dict:
        """Kernel values of the producers of masked groups, before they are zeroed."""
        out = {}
        for gid in self.plan():
            for member in self.graph.groups[gid].producers:
                kernel, axis = producer_variables(member.layer)[0]
                out[id(kernel)] = np.array(keras.ops.convert_to_numpy(kernel), dtype=np.float64)
        return out

    def reinitialize(self) -> dict:
        """Bring every dropped filter back, orthogonal to the kept ones, and unmask it.

        For each producer kernel of a masked group, the masked filters get
        new random unit directions orthogonal to every other filter of that
        kernel (and to their own pre-drop values where there is room; see
        `orthogonal_filters`), scaled to the mean norm of the kept filters.
        Biases and BatchNormalization beta of those channels stay zero.

        Returns:
            The plan `{group id: channels}` that was re-initialised.
        """
        self._require_model()
        self.sync_state()
        done = self.plan()
        for gid, channels in done.items():
            masked = np.zeros(self.graph.groups[gid].size, dtype=bool)
            masked[channels] = True
            for member in self.graph.groups[gid].producers:
                self._reinit_member(member, masked)
        self.clear()
        self._before = {}
        self.history.append((self.count, "reinit", done))
        self._report(f"re-initialised at {self.unit} {self.count}")
        return done

    def _reinit_member(self, member, masked: np.ndarray) -> None:
        kernel, axis = producer_variables(member.layer)[0]
        value = np.array(keras.ops.convert_to_numpy(kernel), dtype=np.float64)
        w = _matrix(value, axis)
        index = np.asarray(member.index)
        new_rows = (index >= 0) & masked[np.where(index >= 0, index, 0)]
        if not new_rows.any():
            return
        before = self._before.get(id(kernel))
        avoid = None if before is None else _matrix(before, axis)[new_rows]
        kept = w[~new_rows]
        fresh = orthogonal_filters(kept, int(new_rows.sum()), avoid, self.rng)
        w[new_rows] = fresh * _scale(kept, avoid)
        kernel.assign(_unmatrix(w, value, axis).astype(kernel.dtype))


def _scale(kept: np.ndarray, before: np.ndarray | None) -> float:
    """Mean norm of the kept filters (else of the pre-drop values, else 1)."""
    for rows in (kept, before):
        if rows is not None and len(rows):
            norm = float(np.linalg.norm(rows, axis=1).mean())
            if norm > 0:
                return norm
    return 1.0


__all__ = ["RePr", "orthogonal_filters"]
