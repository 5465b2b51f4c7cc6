"""RuleOptimizer: apply update rules, then step each variable's own optimizer."""

from __future__ import annotations

from typing import Sequence

import keras

from kprune.errors import KprunError
from kprune.train.rules import Rule, find_variable


def _as_rules(rules) -> list:
    if rules is None:
        return []
    if isinstance(rules, (Rule, dict)):
        rules = [rules]
    out = []
    for rule in rules:
        if isinstance(rule, dict):
            rule = keras.saving.deserialize_keras_object(rule)
        if not isinstance(rule, Rule):
            raise KprunError(f"RuleOptimizer: {rule!r} is not a kprune.rules.Rule.")
        out.append(rule)
    return out


class _Selector:
    """Which variables an extra optimizer owns: variables, paths, a rule's, or a predicate."""

    def __init__(self, spec):
        self.predicate = None
        self.paths = None
        self.rule = None
        if isinstance(spec, dict):
            spec = spec["variables"]
        if isinstance(spec, Rule):
            self.rule = spec
        elif callable(spec) and not isinstance(spec, (list, tuple)):
            self.predicate = spec
        else:
            try:
                items = list(spec)
            except TypeError:
                raise KprunError(f"RuleOptimizer: an extra optimizer's selector must be variables, "
                                 f"paths, a Rule or a predicate, got {spec!r}.") from None
            self.paths = [item if isinstance(item, str) else getattr(item, "path", None)
                          for item in items]
            if any(p is None for p in self.paths):
                raise KprunError(f"RuleOptimizer: selector {spec!r} holds something that is "
                                 "neither a Keras variable nor a variable path.")

    def select(self, variables: list) -> list:
        if self.rule is not None and self.rule.bound:
            known = {id(v) for v in variables}
            chosen = [v for v in self.rule.variables if id(v) in known]
            self.paths = [v.path for v in chosen]
            return chosen
        if self.rule is not None:
            self.paths = list(self.rule.paths)
        if self.predicate is not None:
            chosen = [v for v in variables if self.predicate(v)]
            self.paths = [v.path for v in chosen]
            return chosen
        chosen = []
        for path in self.paths:
            variable = find_variable(path, variables)
            if variable is None:
                raise KprunError(f"RuleOptimizer: no trainable variable (or several) at path "
                                 f"'{path}' for an extra optimizer.")
            chosen.append(variable)
        return chosen

    def get_config(self) -> list:
        if self.paths is None and self.rule is not None:
            return list(self.rule.paths)
        if self.paths is None:
            raise KprunError("RuleOptimizer: an extra optimizer chosen by a predicate can be "
                             "saved only once the optimizer is built (after the first step); "
                             "select it by variables or paths instead.")
        return list(self.paths)


@keras.saving.register_keras_serializable(package="kprune")
class RuleOptimizer(keras.optimizers.Optimizer):
    """An optimizer wrapper that applies update rules to the gradients first.

    Every step, the gradients pass through `rules` (see `kprune.rules`),
    then each variable is updated by its own optimizer: the first of
    `extra_optimizers` whose selector holds it, or `optimizer`. This is how
    `model.fit` trains with kprune's rules, and `kprune.Trainer` uses the
    same class, so both paths compute the same updates.

    The wrapper is saved with the model (`.keras`, `safe_mode=True` works)
    with its inner optimizers' state. Rules refer to variables by path in
    the saved config; on load, rules whose variables are all trainable bind
    themselves when the optimizer is built, and rules that also need other
    variables (ResRep's masks) are bound by `bind(model)`
    (`kprune.train.bind(model)`); an unbound rule raises a `KprunError` at
    the first step rather than being skipped.

    Args:
        optimizer: The optimizer for every variable not selected by
            `extra_optimizers`: an instance or a name such as `"sgd"`.
        rules: A `kprune.rules.Rule` or a list of them, applied in order.
        extra_optimizers: `[(selector, optimizer), ...]`, where `selector`
            is a list of variables or variable paths, a `Rule` (its
            variables), or a predicate `fn(variable) -> bool`.
        name: The optimizer's name.

    Example:

    >>> rule = kprune.rules.ResRepRule.from_model(rr, lam=1e-4)
    >>> optimizer = RuleOptimizer(
    ...     keras.optimizers.SGD(0.01, momentum=0.9, weight_decay=1e-4), [rule],
    ...     extra_optimizers=[(rule, keras.optimizers.SGD(0.01, momentum=0.99))])
    >>> rr.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    >>> rr.fit(x, y, epochs=1)
    """

    def __init__(self, optimizer="sgd", rules: Sequence | Rule = (),
                 extra_optimizers: Sequence | None = None, name: str | None = None, **kwargs):
        kwargs.pop("learning_rate", None)
        if kwargs:
            raise KprunError(f"RuleOptimizer does not take `{'`, `'.join(kwargs)}`; set them on "
                             "the inner optimizer.")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = self._optimizer(optimizer)
        self.rules = _as_rules(rules)
        self._extras = []
        for entry in extra_optimizers or ():
            if isinstance(entry, dict):
                entry = (entry, entry["optimizer"])
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise KprunError("RuleOptimizer: `extra_optimizers` must be a list of "
                                 f"(selector, optimizer) pairs, got {entry!r}.")
            self._extras.append((_Selector(entry[0]), self._optimizer(entry[1])))
        self.extra_optimizers = [opt for _, opt in self._extras]
        self._owner = None

    @staticmethod
    def _optimizer(value):
        if isinstance(value, dict):
            value = keras.saving.deserialize_keras_object(value)
        optimizer = keras.optimizers.get(value)
        if isinstance(optimizer, RuleOptimizer):
            raise KprunError("RuleOptimizer: the inner optimizer is already a RuleOptimizer; "
                             "give its rules to one wrapper.")
        if getattr(optimizer, "loss_scale_factor", None) is not None:
            # The rules need unscaled gradients: scaling belongs outside the wrapper.
            raise KprunError(f"RuleOptimizer: inner optimizer '{optimizer.name}' has "
                             "`loss_scale_factor` set; wrap the RuleOptimizer in a "
                             "keras.optimizers.LossScaleOptimizer instead.")
        return optimizer

    @property
    def optimizers(self) -> list:
        """The main optimizer, then the extra ones."""
        return [self.inner_optimizer] + self.extra_optimizers

    def build(self, var_list: Sequence) -> None:
        var_list = list(var_list)
        for rule in self.rules:
            if not rule.bound:
                rule.bind(var_list, strict=False)
        owner = {}
        for k, (selector, _) in enumerate(self._extras, start=1):
            for variable in selector.select(var_list):
                owner.setdefault(id(variable), k)
        groups = [[] for _ in self.optimizers]
        for variable in var_list:
            groups[owner.get(id(variable), 0)].append(variable)
        if _in_strategy_scope():
            self._recreate_in_scope()
        for optimizer, group in zip(self.optimizers, groups):
            if not optimizer.built:
                optimizer.build(group)
        # Only ids are kept: an attribute holding variables would be tracked as the wrapper's own.
        self._owner = {id(v): k for k, group in enumerate(groups) for v in group}
        super().build(var_list)
        self._mirror_helpers(var_list)

    def _mirror_helpers(self, var_list: Sequence | None = None) -> None:
        """On JAX, give every rule helper (a mask) a copy among the optimizer's variables.

        JAX's jitted `fit` step hands the optimizer only its own variables and
        the trainable ones; a helper such as ResRep's mask is another model
        variable, unreadable there. Its copy is refreshed from it whenever the
        trainer collects the optimizer's state (`variables`), so a mask a
        callback changes reaches the next step. Copies are not saved.
        """
        if keras.backend.backend() != "jax" or not self.built and var_list is None:
            return
        trainable = {id(v) for v in (var_list if var_list is not None
                                     else self._trainable_variables)}
        if "_mirrors" not in self.__dict__:
            # Kept out of Keras's tracking: the helpers are the model's variables, not ours.
            self.__dict__["_mirrors"] = {}
        for rule in self.rules:
            if not rule.bound:
                continue
            for helper in rule.helpers():
                if id(helper) in trainable or id(helper) in self._mirrors:
                    continue
                with keras.name_scope(self.name, caller=self):
                    mirror = self.add_variable(tuple(helper.shape), dtype=helper.dtype,
                                               name=f"mirror_{len(self._mirrors)}")
                mirror.assign(keras.ops.copy(helper.value))
                self._mirrors[id(helper)] = (helper, mirror)

    def _refresh_mirrors(self) -> None:
        from keras.src.backend.common.stateless_scope import in_stateless_scope

        if in_stateless_scope():
            return
        for helper, mirror in getattr(self, "_mirrors", {}).values():
            if getattr(helper, "_value", None) is not None:  # not purged by JAX's fit
                mirror.assign(keras.ops.copy(helper.value))  # its own buffer: JAX donates both

    def _mirror_ids(self) -> set:
        return {id(m) for _, m in getattr(self, "_mirrors", {}).values()}

    def save_own_variables(self, store) -> None:
        mirrors = self._mirror_ids()
        for i, variable in enumerate(v for v in self.variables if id(v) not in mirrors):
            store[str(i)] = keras.ops.convert_to_numpy(variable)

    def load_own_variables(self, store) -> None:
        mirrors = self._mirror_ids()
        own = [v for v in self.variables if id(v) not in mirrors]
        if len(store.keys()) != len(own):
            super().load_own_variables(store)  # Keras's warning about the mismatch
            return
        for i, variable in enumerate(own):
            variable.assign(store[str(i)])

    def _recreate_in_scope(self) -> None:
        """Re-create the inner optimizers not built yet, so their state is made in this scope.

        A TensorFlow optimizer keeps the strategy it was created under, and
        its variables must be created in that strategy's scope.
        """
        def fresh(optimizer):
            if optimizer.built:
                return optimizer
            return keras.saving.deserialize_keras_object(
                keras.saving.serialize_keras_object(optimizer))

        self.inner_optimizer = fresh(self.inner_optimizer)
        self._extras = [(selector, fresh(optimizer)) for selector, optimizer in self._extras]
        self.extra_optimizers = [optimizer for _, optimizer in self._extras]

    @property
    def variables(self) -> list:
        if getattr(self, "_mirrors", None):
            self._refresh_mirrors()
        out = self._variables[:]
        for optimizer in self.optimizers:
            out.extend(optimizer.variables)
        return out

    def bind(self, source) -> "RuleOptimizer":
        """Bind every rule to the variables of `source` (a model, a layer or variables).

        Call it after loading a model whose rules need variables the
        optimizer does not update (ResRep's masks).

        Returns:
            The optimizer itself.
        """
        for rule in self.rules:
            rule.bind(source)
        self._mirror_helpers()
        return self

    def transform(self, grads: Sequence, variables: Sequence) -> list:
        """The gradients after every rule, in order.

        Args:
            grads: Gradients, one per variable.
            variables: The variables.

        Returns:
            A list of gradients.
        """
        grads = list(grads)
        mirrors = getattr(self, "_mirrors", None)
        substitutes = {key: mirror for key, (_, mirror) in mirrors.items()} if mirrors else None
        for rule in self.rules:
            grads = rule(grads, variables, substitutes)
        return grads

    def apply(self, grads, trainable_variables=None) -> None:
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                raise KprunError("RuleOptimizer: pass the variables on the first step "
                                 "(or call `build(variables)` first).")
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        grads = self.transform(grads, trainable_variables)
        split = [([], []) for _ in self.optimizers]
        for grad, variable in zip(grads, trainable_variables):
            k = self._owner.get(id(variable))
            if k is None:
                raise KprunError(f"RuleOptimizer: variable '{variable.path}' was not among "
                                 "the variables the optimizer was built with.")
            split[k][0].append(grad)
            split[k][1].append(variable)
        for optimizer, (group_grads, group_vars) in zip(self.optimizers, split):
            if group_vars:
                optimizer.apply(group_grads, group_vars)
            else:
                optimizer.iterations.assign_add(1)

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def finalize_variable_values(self, var_list) -> None:
        if self._owner is None:
            return
        for k, optimizer in enumerate(self.optimizers):
            group = [v for v in var_list if self._owner.get(id(v)) == k]
            if group:
                optimizer.finalize_variable_values(group)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "rules": [keras.saving.serialize_keras_object(r) for r in self.rules],
            "extra_optimizers": [
                {"variables": selector.get_config(),
                 "optimizer": keras.saving.serialize_keras_object(optimizer)}
                for selector, optimizer in self._extras],
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> "RuleOptimizer":
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(config.pop("optimizer"),
                                                          custom_objects=custom_objects)
        rules = [keras.saving.deserialize_keras_object(r, custom_objects=custom_objects)
                 for r in config.pop("rules", [])]
        extras = [(e["variables"], keras.saving.deserialize_keras_object(
            e["optimizer"], custom_objects=custom_objects))
            for e in config.pop("extra_optimizers", [])]
        return cls(optimizer, rules, extras, **config)


def _in_strategy_scope() -> bool:
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy()


def bind(model: keras.Model) -> keras.Model:
    """Bind the rules of `model.optimizer` (a RuleOptimizer) to `model`'s variables.

    Needed after `keras.saving.load_model` when a rule refers to variables
    the optimizer does not update, such as ResRep's compactor masks.

    Args:
        model: A compiled model whose optimizer is a `RuleOptimizer`.

    Returns:
        `model`.

    Raises:
        KprunError: if the model's optimizer is not a `RuleOptimizer`.

    Example:

    >>> model = kprune.train.bind(keras.saving.load_model("rr.keras"))
    >>> model.fit(x, y)
    """
    optimizer = rule_optimizer(model)
    if optimizer is None:
        raise KprunError(f"Model '{model.name}' has no RuleOptimizer to bind "
                         f"(its optimizer is {type(getattr(model, 'optimizer', None)).__name__}).")
    optimizer.bind(model)
    return model


def rule_optimizer(model: keras.Model) -> RuleOptimizer | None:
    """`model`'s RuleOptimizer (inside the LossScaleOptimizer of mixed precision), or None.

    Args:
        model: A Keras model, compiled or not.

    Returns:
        The `RuleOptimizer`, or None if the model's optimizer is another one.
    """
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer if isinstance(optimizer, RuleOptimizer) else None

