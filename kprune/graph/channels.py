"""Channel atoms: the bookkeeping under the dependency graph.

Every position on the channel axis of every tensor is an *atom*. Atoms that must
be removed together (the same channel seen by a producer, a BatchNormalization,
both branches of an `Add`, the rows of a `Dense` after `Flatten`) are joined in
a union-find; each resulting class is one removable channel. Atoms created
together by one producer are also joined, more loosely, into a *group*: the set
of channels a criterion ranks against each other.
"""

from __future__ import annotations

import dataclasses

import numpy as np


class UnionFind:
    """A growable union-find over integer ids."""

    def __init__(self):
        self._parent: list[int] = []

    def add(self, n: int) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self._parent[rb] = ra
            else:
                self._parent[ra] = rb

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(i)) for i in ids), dtype=np.int64, count=len(ids))


@dataclasses.dataclass
class ChannelSpec:
    """The channel layout of one tensor.

    Attributes:
        axis: Channel axis of the tensor, counted with the batch axis (>= 1).
        atoms: One atom id per position of the channel axis. After `Flatten`
            the axis is the flattened one and several positions share a channel.
    """

    axis: int
    atoms: np.ndarray

    @property
    def size(self) -> int:
        return len(self.atoms)


class AtomTable:
    """Creates atoms and keeps the two union-finds (channels and groups)."""

    def __init__(self):
        self.channels = UnionFind()
        self.groups = UnionFind()

    def new(self, n: int) -> np.ndarray:
        """`n` fresh atoms that form one new group (one producer's output)."""
        ids = self.channels.add(n)
        self.groups.add(n)
        for i in ids[1:]:
            self.groups.union(int(ids[0]), int(i))
        return ids

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join `a[i]` with `b[i]`: they are one channel and must go together."""
        for x, y in zip(a, b):
            self.channels.union(int(x), int(y))
            self.groups.union(int(x), int(y))

    def tie_groups(self, a: np.ndarray, b: np.ndarray) -> None:
        """Put the channels of `a` and `b` in one group without tying channels."""
        if len(a) and len(b):
            self.groups.union(int(a[0]), int(b[0]))
