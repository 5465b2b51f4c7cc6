"""Channel rules for the `keras.ops` operations of functional models.

A functional model built with `keras.ops` calls on symbolic tensors
(`keras.ops.pad(x, ...)`, `x[..., :8]`, `x / 6.0`, `keras.ops.split(x, 2, -1)`)
holds one graph node per call, whose operation is a Keras `Operation` rather
than a layer. The rules here say how channels pass through the operations
that vision models use. They sit in the same table as the layer rules, so
`register_rule(OperationClass, rule)` adds or replaces one, and an operation
with no rule blocks the groups it reads, like an unknown layer.

Operations hold no weights. When channels are removed the surgeon calls the
rule's `slice_call` with an `OpCall`; a rule whose call depends on the number
of channels (a split or a slice on the channel axis, a per-channel constant,
a reshape naming the channel count) makes the call with new arguments or a
new operation.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras.src.ops import core as kcore
from keras.src.ops import image as kimage
from keras.src.ops import math as kmath
from keras.src.ops import nn as knn
from keras.src.ops import numpy as knp

from kprune.errors import KprunError
from kprune.graph.channels import ChannelSpec
from kprune.graph.rules import (ConcatenateRule, LayerRule, MergeRule, PassThroughRule,
                                _flat_positions, _idx, norm_axis, register_rule)


@dataclasses.dataclass
class OpCall:
    """One call of an operation, to be made again on pruned tensors.

    Handed to `LayerRule.slice_call` by `kprune.surgeon.apply_plan`.

    Attributes:
        op: The source operation.
        source: The source `Call` (its tensors have the unpruned shapes).
        args, kwargs: The call's arguments in the new model.
        keep_in, keep_out: For each input / output tensor of the source call,
            the boolean mask of its kept channel positions, or None when the
            tensor has no channels.
        axes_in, axes_out: The channel axis of each of those tensors, or None.
        name: A name free in the new model, for a new operation made in
            place of `op`.
    """

    op: object
    source: object
    args: tuple
    kwargs: dict
    keep_in: list
    keep_out: list
    axes_in: list
    axes_out: list
    name: str

    def run(self, op=None, args=None, kwargs=None):
        """Call `op` (default: a copy of the source operation) on `args` and `kwargs`.

        Args:
            op: The operation to call; default `self.copy_op()`.
            args, kwargs: Its arguments; default the call's new arguments.

        Returns:
            The operation's outputs.
        """
        op = self.copy_op() if op is None else op
        args = self.args if args is None else args
        kwargs = self.kwargs if kwargs is None else kwargs
        return op(*args, **kwargs)

    def copy_op(self):
        """A copy of the source operation named `self.name`, or the operation itself.

        A copy keeps the new model's summary and saved file free of the source
        model's shapes; an operation whose config does not round-trip is reused.
        """
        try:
            return type(self.op).from_config({**self.op.get_config(), "name": self.name})
        except Exception:  # any failure: reusing a stateless operation is still correct
            return self.op


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _is_tensor(x) -> bool:
    return isinstance(x, keras.KerasTensor)


def _what(ctx) -> str:
    return f"operation '{ctx.layer.name}' ({type(ctx.layer).__name__})"


def _refuse(ctx, why: str) -> list:
    """Block the groups of every input for `why` and give the outputs fresh, blocked channels."""
    reason = f"{_what(ctx)} {why}"
    ctx.block_all(reason)
    return ctx.unknown_outputs(reason)


def _axis_list(axis, rank: int) -> list | None:
    """`axis` (an int, a sequence or None) as sorted non-negative axes; None stays None."""
    if axis is None:
        return None
    if isinstance(axis, (int, np.integer)):
        axis = [axis]
    return sorted(norm_axis(int(a), rank) for a in axis)


def _prod(dims) -> int | None:
    """Product of `dims`, or None if one of them is unknown."""
    if any(d is None for d in dims):
        return None
    return int(np.prod([int(d) for d in dims], dtype=np.int64))


def _shape_of(value) -> tuple:
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(value))


def _aligned(shape: tuple, from_end: int):
    """Size of `shape` on the axis `from_end` places from its end (1 when it has none)."""
    return shape[len(shape) - from_end] if len(shape) >= from_end else 1


def _arg(call, index: int, name: str):
    """Positional argument `index` of a call, or its keyword `name`."""
    if len(call.args) > index:
        return call.args[index]
    return call.kwargs.get(name)


class OpRule(LayerRule):
    """A rule for an operation whose first input carries the channels.

    Subclasses implement `propagate_spec(ctx, spec)`; an input without known
    channels gives fresh, blocked outputs.
    """

    def propagate(self, ctx):
        spec = ctx.inputs[0] if ctx.inputs else None
        if spec is None:
            return ctx.unknown_outputs(f"input of {_what(ctx)} has unknown channels")
        return self.propagate_spec(ctx, spec)

    def propagate_spec(self, ctx, spec) -> list:
        raise NotImplementedError


# --------------------------------------------------------------------------
# Element-wise
# --------------------------------------------------------------------------
class CouplingRule(PassThroughRule):
    """Softmax, log-softmax, normalize: element-wise except along `op.axis`.

    Over the channel axis every output depends on every channel: blocked.
    """

    def propagate(self, ctx):
        spec = ctx.inputs[0] if ctx.inputs else None
        axes = _axis_list(getattr(ctx.layer, "axis", None), len(ctx.shapes[0]))
        if spec is not None and (axes is None or spec.axis in axes):
            ctx.block(spec.atoms, f"{_what(ctx)} normalises over the channel axis; removing "
                                  "one channel changes all the others")
        return super().propagate(ctx)


class ClipRule(PassThroughRule):
    """`keras.ops.clip` with scalar bounds is element-wise."""

    def propagate(self, ctx):
        spec = ctx.inputs[0] if ctx.inputs else None
        bounds = (ctx.layer.x_min, ctx.layer.x_max)
        if spec is not None and any(np.size(b) > 1 for b in bounds):
            ctx.block(spec.atoms, f"{_what(ctx)} clips with bounds that are not scalars")
        return super().propagate(ctx)


class ElementwiseRule(LayerRule):
    """Element-wise operations of several operands: `x / 6.0`, `x * w`, `a + b`, `x ** 2`.

    Operands broadcast against each other. The output's channels are those of
    the first graph tensor whose channels lie on the output's channel axis;
    every other graph tensor with the same channels is tied to it (like the
    `Add` layer). A Python scalar, or any operand of size 1 on that axis,
    passes. A constant array with one value per channel is sliced with the
    channels. A graph tensor with a single channel broadcast over many is
    blocked (removing its channel would leave nothing to broadcast).
    """

    def propagate(self, ctx):
        if any(_is_tensor(v) for v in keras.tree.flatten(ctx.call.kwargs)):
            return _refuse(ctx, "takes tensors as keyword arguments")
        operands = self._operands(ctx)
        if operands is None:
            return _refuse(ctx, "takes nested structures of tensors")
        out_shape = ctx.out_shapes[0]
        ref = self._reference(operands, out_shape)
        if ref is None:
            return _refuse(ctx, "broadcasts its operands so that no input's channels "
                                "are the output's")
        spec, from_end = ref
        for value, other, shape in operands:
            if other is spec:
                continue
            problem = self._join(ctx, spec, from_end, value, other, shape)
            if problem:
                reason = f"{_what(ctx)} {problem}"
                ctx.block(spec.atoms, reason)
                if other is not None:
                    ctx.block(other.atoms, reason)
        return [ChannelSpec(len(out_shape) - from_end, spec.atoms)]

    @staticmethod
    def _operands(ctx):
        """(value, spec or None, shape) for every positional argument, or None."""
        operands, k = [], 0
        for value in ctx.call.args:
            if _is_tensor(value):
                operands.append((value, ctx.inputs[k], ctx.shapes[k]))
                k += 1
            elif any(_is_tensor(v) for v in keras.tree.flatten(value)):
                return None
            else:
                operands.append((value, None, _shape_of(value)))
        return operands

    @staticmethod
    def _reference(operands, out_shape):
        """(spec, channel axis counted from the end) of the operand giving the output channels."""
        for _, spec, shape in operands:
            if spec is None:
                continue
            from_end = len(shape) - spec.axis
            if from_end <= len(out_shape) and out_shape[len(out_shape) - from_end] == spec.size:
                return spec, from_end
        return None

    @staticmethod
    def _join(ctx, spec, from_end, value, other, shape) -> str | None:
        """Tie `other` to the output channels, or say why it cannot be (None: fine)."""
        if other is not None and len(shape) - other.axis == from_end and other.size == spec.size:
            ctx.tie(spec.atoms, other.atoms)
            return None
        dim = _aligned(shape, from_end)
        if dim == 1:
            if other is not None:
                how = "this single channel over many" if other.size == 1 else \
                    "these channels along another axis of its output"
                ctx.block(other.atoms, f"{_what(ctx)} broadcasts {how}")
            return None
        if other is None and not _is_tensor(value) and dim == spec.size:
            if _sliceable(value):
                return None  # a per-channel constant: slice_call slices it
            return "uses a per-channel value that is not a constant array"
        return "combines the channels with an operand whose channels are unknown or differ"

    def slice_call(self, call):
        keep, axis = call.keep_out[0], call.axes_out[0]
        if keep is None or len(keep) < 2:
            return call.run()
        from_end = len(call.source.outputs[0].shape) - axis
        args = tuple(_slice_constant(a, keep, from_end) for a in call.args)
        return call.run(args=args)


def _sliceable(value) -> bool:
    """A NumPy array or a backend tensor (not a variable: it would stop being trained)."""
    if isinstance(value, keras.Variable):
        return False
    return isinstance(value, np.ndarray) or keras.ops.is_tensor(value)


def _slice_constant(value, keep: np.ndarray, from_end: int):
    """`value` with only the kept channels, if it is a constant with one value per channel.

    A backend tensor becomes a NumPy array (which a saved model can hold).
    """
    if _is_tensor(value) or not _sliceable(value):
        return value
    if _aligned(_shape_of(value), from_end) != len(keep):
        return value
    array = np.asarray(keras.ops.convert_to_numpy(value))
    return np.take(array, _idx(keep), axis=array.ndim - from_end)


class MergeOpRule(ElementwiseRule, MergeRule):
    """`keras.ops` add, subtract, multiply, maximum, minimum: element-wise (see `ElementwiseRule`).

    Also a `MergeRule`, so code that asks (ResRep's tracking of masked
    channels) treats them like the merge layers of the same names.
    """


class WhereRule(ElementwiseRule):
    """`keras.ops.where(condition, x1, x2)`: element-wise over its three operands."""

    def propagate(self, ctx):
        if len(ctx.call.args) < 3 or any(a is None for a in ctx.call.args[:3]):
            return _refuse(ctx, "returns indices (called without x1 and x2)")
        return super().propagate(ctx)


class ConcatOpRule(ConcatenateRule):
    """`keras.ops.concatenate`: like the Concatenate layer, when every part is a graph tensor."""

    def propagate(self, ctx):
        xs = _arg(ctx.call, 0, "xs")
        if not isinstance(xs, (list, tuple)) or not all(_is_tensor(x) for x in xs):
            return _refuse(ctx, "concatenates constants with graph tensors")
        return super().propagate(ctx)


# --------------------------------------------------------------------------
# Spatial
# --------------------------------------------------------------------------
class PadRule(OpRule):
    """`keras.ops.pad`: padding other axes passes the channels; padding the channels blocks."""

    def propagate_spec(self, ctx, spec):
        widths = ctx.layer.pad_width
        pair = widths[0] if len(widths) == 1 else widths[spec.axis]
        if any(int(p) for p in np.ravel(pair)):
            return _refuse(ctx, f"pads the channel axis {spec.axis}")
        return [spec]


class SpatialOpRule(OpRule):
    """Pooling and resizing operations: the channels stay on their `data_format` axis."""

    def propagate_spec(self, ctx, spec):
        fmt = getattr(ctx.layer, "data_format", None) or keras.config.image_data_format()
        axis = 1 if fmt == "channels_first" else len(ctx.shapes[0]) - 1
        if spec.axis != axis:
            return _refuse(ctx, f"works on channels on axis {axis} ({fmt}) but they are on "
                                f"axis {spec.axis}")
        return [spec]


class ReduceRule(OpRule):
    """Mean, Sum, Max, Min, ... over axes other than the channels; keepdims either way."""

    def propagate_spec(self, ctx, spec):
        axes = _axis_list(ctx.layer.axis, len(ctx.shapes[0]))
        if axes is None or spec.axis in axes:
            return _refuse(ctx, "reduces over the channel axis")
        out_axis = spec.axis if ctx.layer.keepdims else spec.axis - sum(a < spec.axis for a in axes)
        if out_axis < 1:
            return _refuse(ctx, "reduces the batch axis and leaves the channels first")
        return [ChannelSpec(out_axis, spec.atoms)]


# --------------------------------------------------------------------------
# Splitting and slicing
# --------------------------------------------------------------------------
def _split_edges(sections, size: int) -> list | None:
    """[0, b1, ..., size]: the bounds of every part of a split, or None if not understood."""
    if isinstance(sections, (int, np.integer)):
        n = int(sections)
        if n < 1 or size % n:
            return None
        return [size // n * i for i in range(n + 1)]
    bounds = [int(b) for b in sections]
    edges = [0] + bounds + [size]
    if any(b < a for a, b in zip(edges, edges[1:])):
        return None
    return edges


class SplitRule(OpRule):
    """`keras.ops.split`: on the channel axis each part carries its slice of the channels.

    Like a Concatenate in reverse: the parts stay channels of the producer's
    group. On another axis every part carries all the channels.
    """

    def propagate_spec(self, ctx, spec):
        op = ctx.layer
        if norm_axis(int(op.axis), len(ctx.shapes[0])) != spec.axis:
            return [spec for _ in ctx.out_shapes]
        edges = _split_edges(op.indices_or_sections, spec.size)
        if edges is None:
            return _refuse(ctx, "splits the channels at indices out of order or range")
        return [ChannelSpec(spec.axis, spec.atoms[a:b]) for a, b in zip(edges, edges[1:])]

    def slice_call(self, call):
        op, keep = call.op, call.keep_in[0]
        rank = len(call.source.inputs[0].shape)
        if keep is None or norm_axis(int(op.axis), rank) != call.axes_in[0]:
            return call.run()
        edges = _split_edges(op.indices_or_sections, len(keep))
        sizes = [int(keep[a:b].sum()) for a, b in zip(edges, edges[1:])]
        if 0 in sizes:
            raise KprunError(
                f"Operation '{op.name}' (Split) would get an empty part: keep at least one "
                f"channel of each of its {len(sizes)} parts (kept {sizes})."
            )
        if len(set(sizes)) == 1:
            new = len(sizes)
        else:
            new = [int(b) for b in np.cumsum(sizes)[:-1]]
        return call.run(knp.Split(new, axis=op.axis, name=call.name))


def _expand_key(key, rank: int) -> list | None:
    """An index key as a list of None (new axis), int or slice, one int/slice per input axis.

    Returns None for keys this does not follow: arrays, tensors, booleans,
    slices with tensor bounds, too many indices.
    """
    items = list(key) if isinstance(key, (tuple, list)) else [key]

    def simple(k):
        if k is None or k is Ellipsis:
            return True
        if isinstance(k, slice):
            return all(v is None or (isinstance(v, (int, np.integer)) and not isinstance(v, bool))
                       for v in (k.start, k.stop, k.step))
        return isinstance(k, (int, np.integer)) and not isinstance(k, bool)

    if not all(simple(k) for k in items):
        return None
    ellipses = sum(k is Ellipsis for k in items)
    if ellipses > 1:
        return None
    if ellipses == 0:
        items.append(Ellipsis)
    used = sum(k is not None and k is not Ellipsis for k in items)
    if used > rank:
        return None
    entries = []
    for k in items:
        if k is Ellipsis:
            entries.extend([slice(None)] * (rank - used))
        else:
            entries.append(int(k) if isinstance(k, np.integer) else k)
    return entries


def _locate(entries: list, axis: int) -> tuple:
    """(index in `entries`, output axis) of the entry that indexes input axis `axis`."""
    in_axis = out_axis = 0
    for i, e in enumerate(entries):
        if e is None:
            out_axis += 1
            continue
        if in_axis == axis:
            return i, out_axis
        if isinstance(e, slice):
            out_axis += 1
        in_axis += 1
    raise KprunError(f"Index key {entries} has no entry for axis {axis}.")


def _new_slice(entry: slice, keep: np.ndarray, what: str) -> slice:
    """The slice selecting, among the kept channels, what `entry` selected among all of them."""
    selected = np.arange(len(keep))[entry]
    position = np.cumsum(keep) - 1  # index of each kept channel after pruning
    kept = position[selected[keep[selected]]]
    if not len(kept):
        raise KprunError(f"{what} would select no channel: keep at least one of the "
                         f"channels {selected.tolist()} it reads.")
    if (entry.step or 1) > 0:
        return slice(int(kept[0]), int(kept[-1]) + 1)
    stop = int(kept[-1]) - 1
    return slice(int(kept[0]), stop if stop >= 0 else None, -1)


class GetItemRule(OpRule):
    """Indexing `x[...]`: other axes pass the channels; a channel slice carries its part.

    Integer indexing of the channel axis (it disappears), slices of the
    channels with a step other than 1 or -1, and array or tensor keys block.
    """

    def propagate_spec(self, ctx, spec):
        if len(ctx.inputs) > 1:
            return _refuse(ctx, "indexes with tensors")
        entries = _expand_key(_arg(ctx.call, 1, "key"), len(ctx.shapes[0]))
        if entries is None:
            return _refuse(ctx, "indexes with arrays, tensors or booleans")
        i, out_axis = _locate(entries, spec.axis)
        entry = entries[i]
        if not isinstance(entry, slice):
            return _refuse(ctx, f"takes channel {entry} with an integer index, which removes "
                                "the channel axis")
        if entry.step not in (None, 1, -1):
            return _refuse(ctx, f"takes every {abs(entry.step)}th channel")
        if out_axis < 1:
            return _refuse(ctx, "indexes the batch axis away and leaves the channels first")
        return [ChannelSpec(out_axis, spec.atoms[np.arange(spec.size)[entry]])]

    def slice_call(self, call):
        keep = call.keep_in[0]
        rank = len(call.source.inputs[0].shape)
        entries = _expand_key(_arg(call, 1, "key"), rank)
        i, _ = _locate(entries, call.axes_in[0])
        entries[i] = _new_slice(entries[i], keep, f"Operation '{call.op.name}' (GetItem)")
        return call.run(args=(call.args[0], tuple(entries)), kwargs={})


class SliceRule(OpRule):
    """`keras.ops.slice(x, start_indices, shape)`: a channel range carries its part."""

    def propagate_spec(self, ctx, spec):
        start = _arg(ctx.call, 1, "start_indices")
        if len(ctx.inputs) > 1 or not isinstance(start, (list, tuple)):
            return _refuse(ctx, "slices at positions given by a tensor")
        s, n = self._range(start, ctx.layer.shape, spec.axis, spec.size)
        return [ChannelSpec(spec.axis, spec.atoms[s:s + n])]

    @staticmethod
    def _range(start, shape, axis: int, size: int) -> tuple:
        s, n = int(start[axis]), int(shape[axis])
        return s, (size - s if n < 0 else n)

    def slice_call(self, call):
        keep, axis, op = call.keep_in[0], call.axes_in[0], call.op
        start = list(_arg(call, 1, "start_indices"))
        s, n = self._range(start, op.shape, axis, len(keep))
        shape = list(op.shape)
        start[axis] = int(keep[:s].sum())
        kept = int(keep[s:s + n].sum())
        if kept == 0:
            raise KprunError(f"Operation '{op.name}' (Slice) would select no channel: keep at "
                             f"least one of the channels {s}..{s + n - 1} it reads.")
        if shape[axis] >= 0:
            shape[axis] = kept
        return call.run(kcore.Slice(shape, name=call.name), args=(call.args[0], start), kwargs={})


# --------------------------------------------------------------------------
# Moving axes and reshaping
# --------------------------------------------------------------------------
class PermuteRule(OpRule):
    """Transpose, Moveaxis, Swapaxes: the channels move with their axis.

    A permutation that moves the batch axis blocks.
    """

    def propagate_spec(self, ctx, spec):
        perm = self.permutation(ctx.layer, len(ctx.shapes[0]))
        if perm[0] != 0:
            return _refuse(ctx, "moves the batch axis")
        return [ChannelSpec(perm.index(spec.axis), spec.atoms)]

    @staticmethod
    def permutation(op, rank: int) -> list:
        """For each output axis, the input axis it comes from."""
        if isinstance(op, knp.Transpose):
            if op.axes is None:
                return list(range(rank))[::-1]
            return [norm_axis(int(a), rank) for a in op.axes]
        if isinstance(op, knp.Swapaxes):
            perm = list(range(rank))
            a, b = norm_axis(int(op.axis1), rank), norm_axis(int(op.axis2), rank)
            perm[a], perm[b] = perm[b], perm[a]
            return perm
        source = [norm_axis(int(a), rank) for a in op.source]
        dest = [norm_axis(int(a), rank) for a in op.destination]
        perm = [a for a in range(rank) if a not in source]
        for d, s in sorted(zip(dest, source)):
            perm.insert(d, s)
        return perm


class ExpandDimsRule(OpRule):
    """`keras.ops.expand_dims`: the channel axis shifts past the new axes."""

    def propagate_spec(self, ctx, spec):
        out_rank = len(ctx.out_shapes[0])
        new = _axis_list(ctx.layer.axis, out_rank)
        old = [p for p in range(out_rank) if p not in new]
        if old[0] != 0:
            return _refuse(ctx, "puts a new axis before the batch axis")
        return [ChannelSpec(old[spec.axis], spec.atoms)]


class SqueezeRule(OpRule):
    """`keras.ops.squeeze` of axes other than the channels and the batch."""

    def propagate_spec(self, ctx, spec):
        shape = ctx.shapes[0]
        axes = _axis_list(ctx.layer.axis, len(shape))
        if axes is None:
            axes = [i for i, d in enumerate(shape) if d == 1]
        if spec.axis in axes:
            return _refuse(ctx, "squeezes the channel axis")
        if 0 in axes:
            return _refuse(ctx, "squeezes the batch axis")
        return [ChannelSpec(spec.axis - sum(a < spec.axis for a in axes), spec.atoms)]


class ReshapeOpRule(OpRule):
    """`keras.ops.reshape` that keeps the channel axis whole, or flattens to (batch, features).

    The channel axis is kept whole when some output axis has the channel
    count and the same number of elements after it as the channel axis had:
    every element then keeps its channel index. Any other reshape mixes the
    channels with other axes and blocks.
    """

    def propagate_spec(self, ctx, spec):
        shape, out = ctx.shapes[0], ctx.out_shapes[0]
        inner = _prod(shape[spec.axis + 1:])
        for b in range(1, len(out)):
            if inner is not None and out[b] == spec.size and _prod(out[b + 1:]) == inner:
                return [ChannelSpec(b, spec.atoms)]
        total = _prod(shape[1:])
        if len(out) == 2 and total is not None and out[1] == total and out[0] == shape[0]:
            return [ChannelSpec(1, spec.atoms[_flat_positions(spec, shape, False)])]
        return _refuse(ctx, "reshapes across the channel axis")

    def slice_call(self, call):
        keep, axis = call.keep_out[0], call.axes_out[0]
        newshape = list(call.op.newshape)
        if keep is None or newshape[axis] in (-1, None):
            return call.run()
        newshape[axis] = int(keep.sum())
        return call.run(knp.Reshape(tuple(newshape), name=call.name))


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------
_UNARY = {
    knn: ("Relu", "Relu6", "Sigmoid", "SparseSigmoid", "Softplus", "Softsign", "SoftShrink",
          "SparsePlus", "Silu", "Squareplus", "LogSigmoid", "LeakyRelu", "HardSigmoid",
          "HardSilu", "Elu", "Selu", "Gelu", "Celu", "TanhShrink", "HardTanh", "HardShrink",
          "Threshold"),
    knp: ("Absolute", "Abs", "Fabs", "Negative", "Exp", "Exp2", "Expm1", "Log", "Log1p",
          "Log2", "Log10", "Sqrt", "Square", "Reciprocal", "Sign", "Tanh", "Sinh", "Cosh",
          "Sin", "Cos", "Tan", "Arctan", "Arcsinh", "Floor", "Ceil", "Round", "Trunc", "Cbrt",
          "Copy", "NanToNum", "LogicalNot"),
    kcore: ("Cast", "SaturateCast", "StopGradient"),
    kmath: ("Erf", "Erfc", "Rsqrt"),
}

_MERGES = ("Add", "Subtract", "Multiply", "Maximum", "Minimum")

_BINARY = ("Divide", "TrueDivide", "DivideNoNan", "FloorDivide", "Mod", "Fmod", "Power",
           "Fmax", "Fmin", "Arctan2", "Hypot", "Logaddexp", "Greater", "GreaterEqual", "Less",
           "LessEqual", "Equal", "NotEqual", "LogicalAnd", "LogicalOr", "LogicalXor")

_REDUCE = {
    knp: ("Mean", "Sum", "Max", "Min", "Amax", "Amin", "Prod", "Std", "Var"),
    kmath: ("Logsumexp",),
}


def _classes(module, names) -> list:
    """The classes among `names` that `module` has (Keras versions differ)."""
    return [getattr(module, n) for n in names if hasattr(module, n)]


def _register_ops():
    for module, names in _UNARY.items():
        for cls in _classes(module, names):
            register_rule(cls, PassThroughRule())
    for cls in _classes(knn, ("Softmax", "LogSoftmax", "Normalize")):
        register_rule(cls, CouplingRule())
    register_rule(knp.Clip, ClipRule())
    for cls in _classes(knp, _MERGES):
        register_rule(cls, MergeOpRule())
    for cls in _classes(knp, _BINARY):
        register_rule(cls, ElementwiseRule())
    register_rule(knp.Where, WhereRule())
    register_rule(knp.Concatenate, ConcatOpRule())
    register_rule(knp.Pad, PadRule())
    for cls in _classes(knn, ("MaxPool", "AveragePool")) + _classes(kimage, ("Resize",)):
        register_rule(cls, SpatialOpRule())
    for module, names in _REDUCE.items():
        for cls in _classes(module, names):
            register_rule(cls, ReduceRule())
    register_rule(knp.Split, SplitRule())
    register_rule(knp.GetItem, GetItemRule())
    register_rule(kcore.Slice, SliceRule())
    for cls in (knp.Transpose, knp.Moveaxis, knp.Swapaxes):
        register_rule(cls, PermuteRule())
    register_rule(knp.ExpandDims, ExpandDimsRule())
    register_rule(knp.Squeeze, SqueezeRule())
    register_rule(knp.Reshape, ReshapeOpRule())


_register_ops()
