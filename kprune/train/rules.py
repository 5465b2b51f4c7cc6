"""Update rules: small gradient transformations applied before an optimizer step.

An update rule maps the gradients of a training step to new gradients,
`rule(grads, variables) -> grads`, much like an optax transformation. A
rule is built for some variables (a ResRep compactor kernel, a
BatchNormalization gamma) and leaves every other gradient unchanged, so
rules compose with `chain` and apply to the whole list of a model's
trainable variables. Both training paths apply them in one place:
`kprune.Trainer(..., rules=[...])` and the `model.fit` optimizer wrapper
`kprune.train.RuleOptimizer`.

Every rule here is affine in the gradient: `g' = factor * g + penalty`,
where `factor` and `penalty` depend on the variables only. Under
`tf.distribute`, gradients are summed over replicas after the rules run, so
a rule adds `penalty / replicas` on each replica and the summed result is
exactly the rule applied to the summed gradient.

Rules refer to their variables by object while bound, and by variable path
in their config. A rule restored from a config (for example inside an
optimizer loaded from a `.keras` file) is unbound until `bind(model)` finds
its variables again.

Example:

>>> rule = chain(ResRepRule.from_model(rr, lam=1e-4), SlimmingRule.from_layers(bns, s=1e-4))
>>> grads = rule(grads, model.trainable_variables)
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import keras
from keras import ops

from kprune.errors import KprunError

_EPSILON = 1e-12


# ---------------------------------------------------------------------------
# Finding variables
# ---------------------------------------------------------------------------
def _is_variable(value) -> bool:
    return hasattr(value, "path") and hasattr(value, "shape") and hasattr(value, "assign")


def _variables_of(source) -> list:
    """The variables of a model, a layer, or a list of variables."""
    if isinstance(source, (keras.layers.Layer, keras.Model)):
        return list(source.variables)
    try:
        found = list(source)
    except TypeError:
        raise KprunError(f"Cannot bind rules to {source!r}: pass a model, a layer or a list "
                         "of variables.") from None
    for v in found:
        if not _is_variable(v):
            raise KprunError(f"Cannot bind rules to {v!r}: it is not a Keras variable.")
    return found


def find_variable(path: str, variables: Sequence):
    """The variable of `variables` whose path is `path`, or None.

    An exact path wins. Otherwise the one variable whose path and `path`
    agree on their last components is taken (a model nested in another one
    records `outer/inner/dense/kernel`, and `inner/dense/kernel` or
    `dense/kernel` after a `.keras` reload, depending on how it was built).

    Args:
        path: A variable path, such as `"conv_compactor/kernel"`.
        variables: Candidate variables.

    Returns:
        The variable, or None if none or several match.

    Example:

    >>> find_variable("dense/kernel", model.variables).path
    'dense/kernel'
    """
    for v in variables:
        if v.path == path:
            return v
    parts = path.split("/")
    best, found = 0, []
    for v in variables:
        other = v.path.split("/")
        common = 0
        while common < min(len(parts), len(other)) and parts[-1 - common] == other[-1 - common]:
            common += 1
        if common >= 2 or (common == 1 and min(len(parts), len(other)) == 1):
            if common > best:
                best, found = common, [v]
            elif common == best:
                found.append(v)
    return found[0] if len(found) == 1 else None


def _replicas() -> int:
    """Replicas a gradient is summed over after the rules run (1 outside tf.distribute)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def _check_number(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(float(value)) or value < 0:
        raise KprunError(f"{owner}: `{name}` must be a finite number >= 0, got {value!r}.")
    return float(value)


def _lasso_gradient(x, axis: int):
    """`x / ||x_j||_2` for every slice `j` of `axis` (norm over the other axes), 0 at 0."""
    rank = len(x.shape)
    other = tuple(i for i in range(rank) if i != axis % rank)
    norms = ops.sqrt(ops.sum(ops.square(x), axis=other, keepdims=True))
    return x / ops.maximum(norms, _EPSILON)


def _check_axis(owner: str, axis) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise KprunError(f"{owner}: `axis` must be an int, got {axis!r}.")
    return int(axis)


def _along(vector, rank: int, axis: int):
    """Reshape a per-channel vector to broadcast along `axis` of a rank-`rank` tensor."""
    shape = [1] * rank
    shape[axis % rank] = -1
    return ops.reshape(vector, shape)


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------

def _unique(items) -> list:
    """`items` in order, each object once (by identity: variables are not hashable by value)."""
    seen, out = set(), []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out

class Rule:
    """Base class of update rules: `rule(grads, variables) -> grads`.

    Subclasses are built for *slots*: tuples whose first entry is the
    trainable variable the rule changes the gradient of, followed by helper
    variables (such as a mask). They implement `factor(*slot)` and
    `penalty(*slot)`; the rule maps the gradient `g` of a slot's variable to
    `factor * g + penalty` (either may be None, meaning 1 and 0). Gradients
    of every other variable pass unchanged.

    Slots may hold variables or variable paths. A rule with paths (restored
    from its config) is unbound until `bind` finds the variables. Rules
    whose slots hold one variable also take a predicate `fn(variable) ->
    bool` instead of a list: it picks among the variables the rule is
    called with, and `bind` (done by `RuleOptimizer` when it is built)
    fixes the choice, so that the rule can be saved.

    Args:
        slots: A list of tuples of variables or paths, all of one length,
            or a predicate (one-variable slots only).
        slot_names: What each position of a slot holds (for messages).
    """

    slot_names: tuple = ("variable",)

    def __init__(self, slots):
        self._predicate = None
        if callable(slots) and not isinstance(slots, (list, tuple)) and not _is_variable(slots):
            if len(self.slot_names) != 1:
                raise KprunError(f"{self._name()}: give a list of "
                                 f"({', '.join(self.slot_names)}) entries, not a predicate.")
            self._predicate, self._paths, self._slots = slots, None, None
            return
        if isinstance(slots, (str, bytes)) or _is_variable(slots):
            raise KprunError(f"{self._name()}: expected a list of "
                             f"{' and '.join(self.slot_names)} entries, got {slots!r}.")
        try:
            slots = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in slots]
        except TypeError:
            raise KprunError(f"{self._name()}: expected a list of "
                             f"{' and '.join(self.slot_names)} entries, got {slots!r}.") from None
        for slot in slots:
            if len(slot) != len(self.slot_names):
                raise KprunError(f"{self._name()}: every entry must hold "
                                 f"{' and '.join(self.slot_names)}, got {slot!r}.")
            for item in slot:
                if not (isinstance(item, str) or _is_variable(item)):
                    raise KprunError(f"{self._name()}: {item!r} is neither a Keras variable "
                                     "nor a variable path.")
        self._paths = [tuple(item if isinstance(item, str) else item.path for item in slot)
                       for slot in slots]
        bound = all(not isinstance(item, str) for slot in slots for item in slot)
        self._slots = slots if bound else None
        if bound:
            for slot in slots:
                self.check_slot(*slot)

    def _name(self) -> str:
        return type(self).__name__

    @property
    def bound(self) -> bool:
        """Whether the rule holds its variables (not only their paths or a predicate)."""
        return self._slots is not None

    @property
    def variables(self) -> list:
        """The variables whose gradients the rule changes (the first of each slot)."""
        self._check_bound()
        return [slot[0] for slot in self._slots]

    @property
    def paths(self) -> list:
        """The paths of the variables whose gradients the rule changes."""
        if self._paths is None:
            raise KprunError(f"{self._name()} selects its variables with a predicate and is not "
                             "bound yet: call `bind(model)` (a RuleOptimizer does it when it is "
                             "built) before saving it.")
        return [slot[0] for slot in self._paths]

    def check_slot(self, *slot) -> None:
        """Raise KprunError if a slot's variables do not fit together."""

    def factor(self, *slot):
        """What the gradient of `slot[0]` is multiplied by, or None."""
        return None

    def penalty(self, *slot):
        """What is added to the gradient of `slot[0]`, or None."""
        return None

    def bind(self, source, strict: bool = True) -> "Rule":
        """Find the rule's variables in `source`: by path, or with the rule's predicate.

        Args:
            source: A model, a layer or a list of variables.
            strict: Raise if a variable is missing; otherwise leave the rule
                as it was and return it.

        Returns:
            The rule itself.

        Raises:
            KprunError: if `strict` and a path matches no variable of `source`.

        Example:

        >>> restored = ResRepRule.from_config(rule.get_config()).bind(loaded_model)
        """
        candidates = _variables_of(source)
        if self._predicate is not None:
            slots = [(v,) for v in candidates if self._predicate(v)]
            for slot in slots:
                self.check_slot(*slot)
            self._slots = slots
            self._paths = [(v.path,) for (v,) in slots]
            self._predicate = None
            return self
        slots = []
        for paths in self._paths:
            slot = tuple(find_variable(p, candidates) for p in paths)
            missing = [p for p, v in zip(paths, slot) if v is None]
            if missing:
                if strict:
                    raise KprunError(f"{self._name()}: no variable (or several) at path "
                                     f"'{missing[0]}' in {getattr(source, 'name', 'the variables')}.")
                return self
            slots.append(slot)
        for slot in slots:
            self.check_slot(*slot)
        self._slots = slots
        return self

    def _check_bound(self) -> None:
        if self._slots is None:
            how = ("selects its variables with a predicate" if self._predicate is not None
                   else "was restored from a config")
            raise KprunError(f"{self._name()} is not bound to its variables (it {how}): call "
                             "`bind(model)` first, or `kprune.train.bind(model)` for a "
                             "compiled model.")

    def _current_slots(self, variables: list) -> list:
        if self._slots is None and self._predicate is not None:
            slots = [(v,) for v in variables if self._predicate(v)]
            for slot in slots:
                self.check_slot(*slot)
            return slots
        self._check_bound()
        return self._slots

    def helpers(self) -> list:
        """The helper variables of the bound slots (a mask...), each once."""
        if self._slots is None:
            return []
        return _unique(item for slot in self._slots for item in slot[1:])

    def __call__(self, grads: Sequence, variables: Sequence, substitutes: dict | None = None
                 ) -> list:
        """Transform `grads`, the gradients of `variables` (matched one to one).

        Args:
            grads: Gradients (tensors or None), one per variable.
            variables: The variables they belong to.
            substitutes: `{id(helper variable): what to read instead}`: on JAX,
                `RuleOptimizer` reads a helper (a mask) through its own copy,
                which the jitted training step holds as state.

        Returns:
            A new list of gradients.
        """
        grads, variables = list(grads), list(variables)
        if len(grads) != len(variables):
            raise KprunError(f"{self._name()}: got {len(grads)} gradients for "
                             f"{len(variables)} variables.")
        where = {id(slot[0]): slot for slot in self._current_slots(variables)}
        replicas = _replicas()
        out = []
        for grad, variable in zip(grads, variables):
            slot = where.get(id(variable))
            if slot is not None and substitutes:
                slot = slot[:1] + tuple(substitutes.get(id(item), item) for item in slot[1:])
            out.append(grad if slot is None or grad is None else self._update(grad, slot, replicas))
        return out

    def _update(self, grad, slot, replicas: int):
        grad = ops.convert_to_tensor(grad)
        factor = self.factor(*slot)
        if factor is not None:
            grad = grad * ops.cast(factor, grad.dtype)
        penalty = self.penalty(*slot)
        if penalty is not None:
            penalty = ops.cast(penalty, grad.dtype)
            grad = grad + (penalty if replicas == 1 else penalty / replicas)
        return grad

    def get_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> "Rule":
        return cls(**config)


@keras.saving.register_keras_serializable(package="kprune")
class Chain(Rule):
    """Rules applied one after the other (the result of `chain`).

    Args:
        rules: The rules, applied in order.

    Example:

    >>> rule = Chain([MaskRule(pairs), GroupLassoRule(1e-4, kernels)])
    """

    def __init__(self, rules: Sequence):
        flat = []
        for rule in rules:
            if isinstance(rule, dict):
                rule = keras.saving.deserialize_keras_object(rule)
            if not isinstance(rule, Rule):
                raise KprunError(f"chain: {rule!r} is not a kprune.rules.Rule.")
            flat.extend(rule.rules if isinstance(rule, Chain) else [rule])
        self.rules = flat
        self._paths = []

    @property
    def bound(self) -> bool:
        return all(rule.bound for rule in self.rules)

    @property
    def variables(self) -> list:
        seen, out = set(), []
        for rule in self.rules:
            for v in rule.variables:
                if id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
        return out

    @property
    def paths(self) -> list:
        return list(dict.fromkeys(p for rule in self.rules for p in rule.paths))

    def bind(self, source, strict: bool = True) -> "Chain":
        for rule in self.rules:
            rule.bind(source, strict=strict)
        return self

    def helpers(self) -> list:
        return _unique(v for rule in self.rules for v in rule.helpers())

    def __call__(self, grads: Sequence, variables: Sequence, substitutes: dict | None = None
                 ) -> list:
        grads = list(grads)
        for rule in self.rules:
            grads = rule(grads, variables, substitutes)
        return grads

    def get_config(self) -> dict:
        return {"rules": [keras.saving.serialize_keras_object(r) for r in self.rules]}


def chain(*rules: Rule) -> Chain:
    """Compose rules: `chain(a, b)(grads, variables) == b(a(grads, variables), variables)`.

    Args:
        *rules: Rules (chains are flattened).

    Returns:
        A `Chain`.

    Example:

    >>> rule = chain(ResRepRule.from_model(rr), SlimmingRule.from_layers(bns))
    """
    return Chain(list(rules))


@keras.saving.register_keras_serializable(package="kprune")
class MaskRule(Rule):
    """Multiply gradients by a per-output-channel mask.

    For every `(variable, mask)` pair the gradient of `variable` becomes
    `mask * grad`, the mask broadcast along the variable's output-channel
    axis `axis`. Masked channels (0) stop learning.

    Args:
        pairs: `[(variable, mask_variable), ...]`; masks have one entry per
            output channel. Paths are accepted instead of variables (then
            call `bind`).
        axis: The output-channel axis of every variable (-1 fits Keras
            kernels and biases).

    Example:

    >>> rule = MaskRule([(conv.kernel, mask)])
    >>> grads = rule(grads, model.trainable_variables)
    """

    slot_names = ("variable", "mask")

    def __init__(self, pairs: Sequence, axis: int = -1):
        self.axis = _check_axis(type(self).__name__, axis)
        super().__init__(pairs)

    def check_slot(self, variable, mask) -> None:
        rank = len(variable.shape)
        if not -rank <= self.axis < rank:
            raise KprunError(f"{self._name()}: axis {self.axis} is out of range for "
                             f"'{variable.path}' of shape {tuple(variable.shape)}.")
        if tuple(mask.shape) != (variable.shape[self.axis],):
            raise KprunError(f"{self._name()}: mask '{mask.path}' has shape "
                             f"{tuple(mask.shape)}; '{variable.path}' has "
                             f"{variable.shape[self.axis]} output channels.")

    def factor(self, variable, mask):
        return _along(ops.convert_to_tensor(mask), len(variable.shape), self.axis)

    def get_config(self) -> dict:
        return {"pairs": [list(p) for p in self._paths], "axis": self.axis}


@keras.saving.register_keras_serializable(package="kprune")
class GroupLassoRule(Rule):
    """Add the group-lasso gradient `lam * K / ||K_j||_2` over output channels.

    Each output channel `j` (index `j` of `axis`) of a variable `K` is one
    group. This is the gradient of `lam * sum_j ||K_j||_2`; a channel whose
    weights are all zero gets zero.

    Args:
        lam: Strength, a finite number >= 0.
        variables: Variables (or paths) to penalise, or a predicate
            `fn(variable) -> bool`.
        axis: The output-channel axis.

    Example:

    >>> rule = GroupLassoRule(1e-4, [layer.kernel for layer in convs])
    >>> rule = GroupLassoRule(1e-4, lambda v: v.path.endswith("_compactor/kernel"))
    """

    def __init__(self, lam: float, variables, axis: int = -1):
        self.lam = _check_number(type(self).__name__, "lam", lam)
        self.axis = _check_axis(type(self).__name__, axis)
        super().__init__(variables)

    def check_slot(self, variable) -> None:
        rank = len(variable.shape)
        if not -rank <= self.axis < rank:
            raise KprunError(f"{self._name()}: axis {self.axis} is out of range for "
                             f"'{variable.path}' of shape {tuple(variable.shape)}.")

    def penalty(self, variable):
        return self.lam * _lasso_gradient(ops.convert_to_tensor(variable), self.axis)

    def get_config(self) -> dict:
        return {"lam": self.lam, "variables": self.paths, "axis": self.axis}


@keras.saving.register_keras_serializable(package="kprune")
class ResRepRule(Rule):
    """ResRep's Res rule on compactor kernels: `mask * dL/dK + lam * K / ||K[..., j]||_2`.

    For every `(kernel, mask)` pair (a `kprune.layers.Compactor`'s kernel of
    shape `(C, C)` or `(1, 1, C, C)`, output channel on the last axis, and
    its `(C,)` mask), the task gradient is masked per output channel and the
    group-lasso gradient of the kernel's output channels (norm over all the
    other axes) is added (Ding et al., ICCV 2021). The penalty acts on
    masked channels too, so they decay towards zero.

    ResRep trains compactors with their own optimizer settings (the official
    code: SGD, momentum 0.99, no weight decay); give them to
    `RuleOptimizer` or `Trainer` as `extra_optimizers=[(rule, optimizer)]`.

    Args:
        lam: Strength of the group-lasso term, a finite number >= 0.
        pairs: `[(kernel, mask), ...]` variables, or their paths (then call
            `bind`).

    Example:

    >>> rule = ResRepRule.from_model(kprune.resrep.attach(model), lam=1e-4)
    >>> rule = ResRepRule(1e-4, pairs=[(compactor.kernel, compactor.mask)])
    >>> optimizer = kprune.train.RuleOptimizer(
    ...     "sgd", [rule], extra_optimizers=[(rule, keras.optimizers.SGD(0.01, momentum=0.99))])
    """

    slot_names = ("kernel", "mask")

    def __init__(self, lam: float = 1e-4, pairs: Sequence | None = None):
        self.lam = _check_number(type(self).__name__, "lam", lam)
        if pairs is None:
            raise KprunError("ResRepRule: `pairs` of (kernel, mask) variables are required; "
                             "ResRepRule.from_model(model) finds a model's compactors.")
        super().__init__(pairs)

    @classmethod
    def from_model(cls, model: keras.Model, lam: float = 1e-4) -> "ResRepRule":
        """The rule for every `kprune.layers.Compactor` of `model` (nested models included).

        Args:
            model: A model with compactors.
            lam: Strength of the group-lasso term.

        Returns:
            A bound `ResRepRule`.

        Raises:
            KprunError: if `model` has no built compactor.
        """
        from kprune.layers.compactor import Compactor

        found = [layer for layer in _layers(model) if isinstance(layer, Compactor)]
        if not found or any(layer.kernel is None for layer in found):
            raise KprunError(f"ResRepRule: model '{model.name}' has no built Compactor layers; "
                             "call kprune.resrep.attach first.")
        return cls(lam, pairs=[(layer.kernel, layer.mask) for layer in found])

    def check_slot(self, kernel, mask) -> None:
        if len(kernel.shape) < 2 or tuple(mask.shape) != (kernel.shape[-1],):
            raise KprunError(f"{self._name()}: kernel '{kernel.path}' {tuple(kernel.shape)} and "
                             f"mask '{mask.path}' {tuple(mask.shape)} do not form a compactor "
                             "(a kernel with C output channels on its last axis and a (C,) "
                             "mask).")

    def factor(self, kernel, mask):
        return _along(ops.convert_to_tensor(mask), len(kernel.shape), -1)

    def penalty(self, kernel, mask):
        return self.lam * _lasso_gradient(ops.convert_to_tensor(kernel), -1)

    def get_config(self) -> dict:
        return {"lam": self.lam, "pairs": [list(p) for p in self._paths]}


@keras.saving.register_keras_serializable(package="kprune")
class SlimmingRule(Rule):
    """Network Slimming's L1 rule on BatchNormalization scales: `grad += s * sign(gamma)`.

    Args:
        s: Sparsity strength, a finite number >= 0.
        variables: The gamma variables (or their paths, then call `bind`),
            or a predicate `fn(variable) -> bool`.

    Example:

    >>> rule = SlimmingRule(1e-4, [bn.gamma for bn in bns])
    >>> rule = SlimmingRule.from_layers([l for l in model.layers
    ...                                  if isinstance(l, keras.layers.BatchNormalization)])
    """

    def __init__(self, s: float = 1e-4, variables=None):
        self.s = _check_number(type(self).__name__, "s", s)
        if variables is None:
            raise KprunError("SlimmingRule: `variables` (the BatchNormalization gammas) are "
                             "required; SlimmingRule.from_layers(layers) collects them.")
        super().__init__(variables)

    @classmethod
    def from_layers(cls, layers: Sequence, s: float = 1e-4) -> "SlimmingRule":
        """The rule for the gammas of `layers` (built BatchNormalization layers).

        Args:
            layers: BatchNormalization layers with `scale=True`.
            s: Sparsity strength.

        Returns:
            A bound `SlimmingRule`.

        Raises:
            KprunError: if a layer has no gamma.
        """
        gammas = []
        for layer in layers:
            gamma = getattr(layer, "gamma", None)
            if gamma is None:
                raise KprunError(f"SlimmingRule: layer '{getattr(layer, 'name', layer)}' has no "
                                 "gamma (not a built BatchNormalization with scale=True).")
            gammas.append(gamma)
        return cls(s, gammas)

    def penalty(self, gamma):
        return self.s * ops.sign(ops.convert_to_tensor(gamma))

    def get_config(self) -> dict:
        return {"s": self.s, "variables": self.paths}


def _layers(model) -> list:
    """Every layer of `model`, nested models included, each once."""
    seen, out = set(), []

    def visit(layer):
        for sub in getattr(layer, "layers", None) or []:
            if id(sub) not in seen:
                seen.add(id(sub))
                out.append(sub)
                visit(sub)

    visit(model)
    return out


def bind(rules: Iterable[Rule], source, strict: bool = True) -> list:
    """Bind every rule of `rules` to the variables of `source`.

    Args:
        rules: Rules (bound ones are re-bound).
        source: A model, a layer or a list of variables.
        strict: Raise KprunError when a rule's variable is missing.

    Returns:
        The rules, as a list.
    """
    rules = list(rules)
    for rule in rules:
        rule.bind(source, strict=strict)
    return rules


__all__ = ["Rule", "Chain", "chain", "MaskRule", "GroupLassoRule", "ResRepRule", "SlimmingRule",
           "bind", "find_variable"]
