"""Rules for attention and einsum projections.

`keras.layers.MultiHeadAttention` holds channels of its own: its heads and, in
every head, the query/key width (`key_dim`) and the value width (`value_dim`).
They live on no tensor of the model, so the rule declares them as *inner*
channels (`RuleContext.inner`), each in a group of its own:

* `heads`: removing head `h` drops its query, key and value projections and
  its rows of the output projection (`num_heads` shrinks);
* `key_dim`: removing dimension `d` of head `h` drops column `(h, d)` of the
  query and key projections together (scores are `q . k`); the same number is
  removed from every head, and the query is rescaled so that the attention
  scale `1 / sqrt(key_dim)` of the smaller layer gives the original scores;
* `value_dim`: removing dimension `d` of head `h` drops column `(h, d)` of the
  value projection and the matching rows of the output projection.

All three are exact: the pruned layer computes what the original computes
with the removed heads' (or dimensions') contributions zeroed.
`GroupQueryAttention` removes whole key/value heads, each with the query
heads that share it.

Example:

>>> x = keras.Input((16, 32))
>>> y = keras.layers.MultiHeadAttention(4, 8, name="mha")(x, x)
>>> graph = DependencyGraph(keras.Model(x, keras.layers.Dense(2)(y)))
>>> [m.slot for g in graph.prunable_groups() for m in g.producers]
['heads', 'key_dim', 'value_dim', 'output']
"""

from __future__ import annotations

import math

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.channels import ChannelSpec
from kprune.graph.rules import LayerRule, _idx, register_rule

_ROLES = ("query", "value", "key")


def _roles(call) -> dict:
    """Index in `call.inputs` of the query, value and key tensors (key defaults to value)."""
    args, kwargs = call.args, call.kwargs
    found = {}
    for i, role in enumerate(_ROLES):
        tensor = args[i] if len(args) > i else kwargs.get(role)
        if tensor is None:
            continue
        for j, t in enumerate(call.inputs):
            if t is tensor:
                found[role] = j
                break
    if "key" not in found and "value" in found:
        found["key"] = found["value"]
    return found


def _block_masks(ctx, roles: dict) -> None:
    """Tensors an attention layer reads other than its query, key and value (masks) stay whole."""
    used = {id(ctx.call.inputs[i]) for i in roles.values()}
    for tensor, spec in zip(ctx.call.inputs, ctx.inputs):
        if spec is not None and id(tensor) not in used:
            ctx.block(spec.atoms, f"'{ctx.layer.name}' reads this tensor as a mask")


def _mask(keep: dict, slot: str, n: int) -> np.ndarray:
    return keep.get(slot, np.ones(n, dtype=bool))


def _dropped(drop: dict, slot: str, n: int) -> np.ndarray:
    return drop.get(slot, np.zeros(n, dtype=bool))


def _per_head(keep: np.ndarray, heads: np.ndarray, width: int, layer, what: str) -> list:
    """Kept dimension indices of every kept head (the same count in each)."""
    grid = keep.reshape(-1, width)
    picks = [_idx(grid[h]) for h in heads]
    counts = {len(p) for p in picks}
    if len(counts) > 1:
        raise KprunError(f"Layer '{layer.name}': remove the same number of {what} from every "
                         f"head (kept per head: {sorted(counts)}).")
    if 0 in counts:
        raise KprunError(f"Layer '{layer.name}': removal would leave a head with no {what}.")
    return picks


def _take_heads(array: np.ndarray, heads, picks) -> np.ndarray:
    """(..., H, d) -> (..., kept H, kept d), a different set of d per head."""
    return np.stack([array[..., h, p] for h, p in zip(heads, picks)], axis=-2)


def _rows_in(array: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Slice the input axis (axis 0) when `keep` covers it."""
    return array[_idx(keep)] if len(keep) == array.shape[0] else array


class MultiHeadAttentionRule(LayerRule):
    """`keras.layers.MultiHeadAttention`: heads, per-head widths and its inputs and output.

    Args:
        heads: Whether whole heads may be removed.
        head_dims: Whether `key_dim` and `value_dim` may shrink (evenly per head).

    Example:

    >>> register_rule(keras.layers.MultiHeadAttention,
    ...               MultiHeadAttentionRule(head_dims=False))   # heads only
    """

    def __init__(self, heads: bool = True, head_dims: bool = True):
        self.heads = heads
        self.head_dims = head_dims

    # Sizes --------------------------------------------------------------------
    @staticmethod
    def _sizes(layer) -> tuple:
        heads, key_dim = int(layer.num_heads), int(layer.key_dim)
        return heads, key_dim, int(layer.value_dim or key_dim)

    def _unsupported(self, ctx) -> str | None:
        layer = ctx.layer
        if getattr(layer, "_use_gate", False) or getattr(layer, "use_gate", False):
            return "its gated output is not handled"
        shapes = [tuple(v.shape) for v in (layer._query_dense.kernel, layer._output_dense.kernel)]
        if len(shapes[0]) != 3 or len(shapes[1]) != 3:
            return "its projections act on more than one feature axis"
        return None

    # Graph --------------------------------------------------------------------
    def propagate(self, ctx):
        layer, call = ctx.layer, ctx.call
        roles = _roles(call)
        for index in sorted(set(roles.values())):
            spec = ctx.inputs[index]
            if spec is None:
                continue
            if spec.axis != len(ctx.shapes[index]) - 1:
                ctx.block(spec.atoms, f"'{layer.name}' projects the last axis but the channels of "
                                      f"its input are on axis {spec.axis}")
            else:
                ctx.consumer(spec.atoms, input_index=index)
        _block_masks(ctx, roles)
        heads, key_dim, value_dim = self._sizes(layer)
        atoms = {"heads": ctx.inner("heads", heads),
                 "key_dim": ctx.inner("key_dim", heads * key_dim),
                 "value_dim": ctx.inner("value_dim", heads * value_dim)}
        ctx.partition(atoms["key_dim"], heads)
        ctx.partition(atoms["value_dim"], heads)
        self._block_inner(ctx, atoms, heads)
        return self._outputs(ctx)

    def _block_inner(self, ctx, atoms, heads):
        name = ctx.layer.name
        why = self._unsupported(ctx)
        if why:
            for a in atoms.values():
                ctx.block(a, f"'{name}' (MultiHeadAttention): {why}")
            return
        if not self.heads:
            ctx.block(atoms["heads"], f"head removal is turned off for '{name}'")
        elif heads == 1:
            ctx.block(atoms["heads"], f"'{name}' has a single head")
        if len(ctx.call.outputs) > 1:
            ctx.block(atoms["heads"], f"'{name}' returns its attention scores, one per head")
        if not self.head_dims:
            ctx.block(atoms["key_dim"], f"head widths are kept whole for '{name}'")
            ctx.block(atoms["value_dim"], f"head widths are kept whole for '{name}'")

    def _outputs(self, ctx):
        layer = ctx.layer
        shape = ctx.out_shapes[0]
        out = ctx.fresh(int(shape[-1]))
        ctx.producer(out, slot="output")
        declared = getattr(layer, "_output_shape", None)
        if declared is not None and len(tuple(np.atleast_1d(declared))) > 1:
            ctx.block(out, f"'{layer.name}' has a multi-axis output_shape")
        specs = [ChannelSpec(len(shape) - 1, out)]
        return specs + [None] * (len(ctx.out_shapes) - 1)

    # Surgery ------------------------------------------------------------------
    def slice_for(self, call, weights, keep_in, keep_out, keep_inner):
        layer = call.layer
        heads, key_dim, value_dim = self._sizes(layer)
        roles = _roles(call)
        kept_heads = _idx(_mask(keep_inner, "heads", heads))
        qk = _per_head(_mask(keep_inner, "key_dim", heads * key_dim), kept_heads, key_dim,
                       layer, "key dimensions")
        vo = _per_head(_mask(keep_inner, "value_dim", heads * value_dim), kept_heads, value_dim,
                       layer, "value dimensions")
        new_key, new_value = len(qk[0]), len(vo[0])
        scale = math.sqrt(new_key / key_dim)  # the smaller layer divides by sqrt(new_key)
        w = dict(weights)
        for part, picks, role, factor in (("query", qk, "query", scale), ("key", qk, "key", 1.0),
                                          ("value", vo, "value", 1.0)):
            kernel = _rows_in(w[f"{part}/kernel"], keep_in[roles[role]])
            w[f"{part}/kernel"] = _take_heads(kernel, kept_heads, picks) * factor
            if f"{part}/bias" in w:
                w[f"{part}/bias"] = _take_heads(w[f"{part}/bias"], kept_heads, picks) * factor
        out_kernel = w["attention_output/kernel"]
        out_kernel = np.stack([out_kernel[h][p] for h, p in zip(kept_heads, vo)])
        keep = keep_out[0] if len(keep_out[0]) else np.ones(out_kernel.shape[-1], bool)
        w["attention_output/kernel"] = out_kernel[..., _idx(keep)]
        if "attention_output/bias" in w:
            w["attention_output/bias"] = w["attention_output/bias"][_idx(keep)]
        config = layer.get_config()
        config.update(num_heads=len(kept_heads), key_dim=new_key, value_dim=new_value)
        query_in = keep_in[roles["query"]]
        query_dim = int(query_in.sum()) if len(query_in) else int(w["query/kernel"].shape[0])
        if config.get("output_shape") is not None or int(keep.sum()) != query_dim:
            config["output_shape"] = int(keep.sum())
        return config, w

    def zero_for(self, call, weights, drop_in, drop_inner):
        layer = call.layer
        heads, key_dim, value_dim = self._sizes(layer)
        roles = _roles(call)
        w = {name: value.copy() for name, value in weights.items()}
        for part in _ROLES:
            drop = drop_in[roles[part]]
            if len(drop) == w[f"{part}/kernel"].shape[0]:
                w[f"{part}/kernel"][_idx(drop)] = 0
        grid = _dropped(drop_inner, "key_dim", heads * key_dim).reshape(heads, key_dim)
        w["query/kernel"][:, grid] = 0  # q . k loses the dropped terms
        if "query/bias" in w:
            w["query/bias"][grid] = 0
        grid = _dropped(drop_inner, "value_dim", heads * value_dim).reshape(heads, value_dim)
        w["attention_output/kernel"][grid] = 0
        dropped = _idx(_dropped(drop_inner, "heads", heads))
        w["attention_output/kernel"][dropped] = 0
        return w

    # Criteria and costs ---------------------------------------------------------
    def rows(self, layer, slot, weights):
        heads, key_dim, value_dim = self._sizes(layer)
        q, k, v = (weights[f"{p}/kernel"] for p in _ROLES[:1] + ("key", "value"))
        o = weights["attention_output/kernel"]
        if slot == "heads":
            parts = [np.moveaxis(a, 1, 0).reshape(heads, -1) for a in (q, k, v)]
            return np.concatenate(parts + [o.reshape(heads, -1)], axis=1)
        if slot == "key_dim":
            return np.concatenate([np.moveaxis(a, 0, -1).reshape(heads * key_dim, -1)
                                   for a in (q, k)], axis=1)
        if slot == "value_dim":
            return np.concatenate([np.moveaxis(v, 0, -1).reshape(heads * value_dim, -1),
                                   o.reshape(heads * value_dim, -1)], axis=1)
        if slot == "output":
            return np.moveaxis(o, -1, 0).reshape(o.shape[-1], -1)
        return None

    def inner_attrs(self, layer, keep_inner):
        heads, key_dim, value_dim = self._sizes(layer)
        kept = _idx(_mask(keep_inner, "heads", heads))  # never empty: a group keeps a channel
        per = {slot: int(_mask(keep_inner, slot, heads * width).reshape(heads, width)[kept[0]].sum())
               for slot, width in (("key_dim", key_dim), ("value_dim", value_dim))}
        return {"num_heads": len(kept), **per}


class GroupedQueryAttentionRule(LayerRule):
    """`keras.layers.GroupQueryAttention`: whole key/value heads, with their query heads.

    Removing key/value head `j` removes its key and value projections and the
    `num_query_heads / num_key_value_heads` query heads that read it, with
    their rows of the output projection. Exact.
    """

    def propagate(self, ctx):
        layer = ctx.layer
        roles = _roles(ctx.call)
        for index in sorted(set(roles.values())):
            spec = ctx.inputs[index]
            if spec is not None:
                if spec.axis != len(ctx.shapes[index]) - 1:
                    ctx.block(spec.atoms, f"'{layer.name}' projects the last axis")
                else:
                    ctx.consumer(spec.atoms, input_index=index)
        _block_masks(ctx, roles)
        kv_heads = int(layer.num_key_value_heads)
        atoms = ctx.inner("kv_heads", kv_heads)
        if kv_heads == 1:
            ctx.block(atoms, f"'{layer.name}' has a single key/value head")
        if len(ctx.call.outputs) > 1:
            ctx.block(atoms, f"'{layer.name}' returns its attention scores, one per head")
        if getattr(layer, "use_gate", False) or getattr(layer, "_use_gate", False):
            ctx.block(atoms, f"'{layer.name}' (GroupQueryAttention): its gated output is not "
                             "handled")
        # The output projection writes as many channels as the query has: they are one set.
        query = ctx.inputs[roles["query"]] if "query" in roles else None
        out = query.atoms if query is not None and query.axis == len(ctx.shapes[0]) - 1 \
            else ctx.fresh(int(ctx.out_shapes[0][-1]))
        ctx.producer(out, slot="output")
        return [ChannelSpec(len(ctx.out_shapes[0]) - 1, out)] + [None] * (len(ctx.out_shapes) - 1)

    @staticmethod
    def _names(weights) -> dict:
        """Weight name of each projection's kernel and bias."""
        found = {}
        for name in weights:
            for part in ("query", "key", "value", "attention_output"):
                if name.startswith(part + "/"):
                    found[(part, name.split("/")[-1])] = name
        return found

    def slice_for(self, call, weights, keep_in, keep_out, keep_inner):
        layer = call.layer
        kv, q = int(layer.num_key_value_heads), int(layer.num_query_heads)
        kept_kv = _idx(_mask(keep_inner, "kv_heads", kv))
        kept_q = np.concatenate([np.arange(j * (q // kv), (j + 1) * (q // kv)) for j in kept_kv])
        roles, names, w = _roles(call), self._names(weights), dict(weights)
        for part, heads in (("query", kept_q), ("key", kept_kv), ("value", kept_kv)):
            kernel = _rows_in(w[names[(part, "kernel")]], keep_in[roles[part]])
            w[names[(part, "kernel")]] = kernel[:, heads]
            if (part, "bias") in names:
                w[names[(part, "bias")]] = w[names[(part, "bias")]][heads]
        out_name = names[("attention_output", "kernel")]
        keep = keep_out[0] if len(keep_out[0]) else np.ones(w[out_name].shape[-1], bool)
        w[out_name] = w[out_name][kept_q][..., _idx(keep)]
        if ("attention_output", "bias") in names:
            bias = names[("attention_output", "bias")]
            w[bias] = w[bias][_idx(keep)]
        config = layer.get_config()
        config.update(num_query_heads=len(kept_q), num_key_value_heads=len(kept_kv))
        return config, w

    def zero_for(self, call, weights, drop_in, drop_inner):
        layer = call.layer
        kv, q = int(layer.num_key_value_heads), int(layer.num_query_heads)
        roles, names = _roles(call), self._names(weights)
        w = {name: value.copy() for name, value in weights.items()}
        for part in _ROLES:
            kernel = w[names[(part, "kernel")]]
            if len(drop_in[roles[part]]) == kernel.shape[0]:
                kernel[_idx(drop_in[roles[part]])] = 0
        for j in _idx(_dropped(drop_inner, "kv_heads", kv)):
            w[names[("attention_output", "kernel")]][j * (q // kv):(j + 1) * (q // kv)] = 0
        return w

    def rows(self, layer, slot, weights):
        names = self._names(weights)
        kv, q = int(layer.num_key_value_heads), int(layer.num_query_heads)
        if slot == "kv_heads":
            per = q // kv
            qk = weights[names[("query", "kernel")]]
            parts = [np.moveaxis(qk, 1, 0).reshape(kv, -1)]
            for part in ("key", "value"):
                parts.append(np.moveaxis(weights[names[(part, "kernel")]], 1, 0).reshape(kv, -1))
            parts.append(weights[names[("attention_output", "kernel")]].reshape(kv, per, -1)
                         .reshape(kv, -1))
            return np.concatenate(parts, axis=1)
        if slot == "output":
            o = weights[names[("attention_output", "kernel")]]
            return np.moveaxis(o, -1, 0).reshape(o.shape[-1], -1)
        return None

    def inner_attrs(self, layer, keep_inner):
        kv, q = int(layer.num_key_value_heads), int(layer.num_query_heads)
        kept = int(_mask(keep_inner, "kv_heads", kv).sum())
        return {"num_key_value_heads": kept, "num_query_heads": kept * (q // kv)}


def _einsum_letters(equation: str):
    lhs, out = equation.replace(" ", "").split("->")
    source, kernel = lhs.split(",")
    return source, kernel, out


class EinsumDenseRule(LayerRule):
    """`keras.layers.EinsumDense` that reads the channels on its input's last axis.

    The input's last letter must be summed over (it is a kernel axis); the
    output's last letter must be a kernel axis that the input lacks, so its
    positions are the layer's filters, e.g. `'abc,cd->abd'` (a Dense) or
    `'abc,cde->abde'` (a projection to heads: `e` is the channel axis).
    Anything else keeps its groups whole with the equation as the reason.
    """

    def propagate(self, ctx):
        layer = ctx.layer
        spec = ctx.inputs[0] if ctx.inputs else None
        parsed = self._parse(layer)
        if parsed is None or spec is None or spec.axis != len(ctx.shapes[0]) - 1:
            reason = (f"'{layer.name}' (EinsumDense '{layer.equation}') does not read and write "
                      "the last axis as channels")
            if spec is not None:
                ctx.block(spec.atoms, reason)
            return ctx.unknown_outputs(reason)
        ctx.consumer(spec.atoms)
        out = ctx.fresh(int(ctx.out_shapes[0][-1]))
        ctx.producer(out)
        return [ChannelSpec(len(ctx.out_shapes[0]) - 1, out)]

    @staticmethod
    def _parse(layer):
        """(kernel axis of the input channels, kernel axis of the output channels) or None."""
        source, kernel, out = _einsum_letters(layer.equation)
        if "." in source + kernel + out or not source or not out:
            return None
        c_in, c_out = source[-1], out[-1]
        if c_in not in kernel or c_in in out or c_out not in kernel or c_out in source:
            return None
        if kernel.count(c_in) != 1 or kernel.count(c_out) != 1:
            return None
        return kernel.index(c_in), kernel.index(c_out)

    def slice(self, layer, weights, keep_in, keep_out):
        ax_in, ax_out = self._parse(layer)
        w = dict(weights)
        kernel = w["kernel"]
        if len(keep_in[0]) == kernel.shape[ax_in]:
            kernel = np.take(kernel, _idx(keep_in[0]), axis=ax_in)
        keep = keep_out[0]
        if len(keep) == kernel.shape[ax_out]:
            kernel = np.take(kernel, _idx(keep), axis=ax_out)
            if "bias" in w and w["bias"].shape[-1] == len(keep) and \
                    (layer.bias_axes or "").endswith(_einsum_letters(layer.equation)[2][-1]):
                w["bias"] = w["bias"][..., _idx(keep)]
        w["kernel"] = kernel
        config = layer.get_config()
        shape = list(np.atleast_1d(config["output_shape"]))
        if len(keep):
            shape[-1] = int(keep.sum())
        config["output_shape"] = [int(s) if s is not None else None for s in shape]
        return config, w

    def zero(self, layer, weights, drop_in):
        ax_in, _ = self._parse(layer)
        w = dict(weights)
        kernel = np.moveaxis(w["kernel"].copy(), ax_in, 0)
        kernel[_idx(drop_in[0])] = 0
        w["kernel"] = np.moveaxis(kernel, 0, ax_in)
        return w

    def rows(self, layer, slot, weights):
        _, ax_out = self._parse(layer)
        kernel = np.moveaxis(weights["kernel"], ax_out, 0)
        return kernel.reshape(kernel.shape[0], -1)


register_rule(keras.layers.MultiHeadAttention, MultiHeadAttentionRule())
register_rule(keras.layers.GroupQueryAttention, GroupedQueryAttentionRule())
register_rule(keras.layers.EinsumDense, EinsumDenseRule())

__all__ = ["EinsumDenseRule", "GroupedQueryAttentionRule", "MultiHeadAttentionRule"]
