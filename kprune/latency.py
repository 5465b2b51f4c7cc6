"""Measured latency: end-to-end timing, per-layer tables, and a model that predicts a plan's.

Three pieces, each on the runtime a model is deployed with (`"keras"`: the
model called in a `tf.function`, as `kprune.profile.latency` does;
`"tflite"`: the model converted to a float32 flatbuffer and run by the
`ai_edge_litert` interpreter), at a batch size and a thread count:

* `measure(model)`: median seconds of one inference on random inputs.
* `LatencyTable`: the latency of one layer, measured once on a model made of
  that layer alone and cached on disk (JSON under `~/.cache/kprune/latency`,
  or `$KPRUNE_CACHE`), keyed by everything that sets its cost: the layer's
  class and config (kernel size, strides, groups, padding, activation...),
  its input and output shapes, the runtime, batch, threads, TensorFlow version
  and host. A signature is measured once per machine.
* `LatencyModel`: the latency of `apply_plan(model, plan)` predicted without
  surgery, as the sum of the table's latency of every timed layer at its
  planned widths plus a fixed remainder (everything else the model does:
  normalisation, activations, pooling, merges, the runtime's own overhead).

The TFLite conversion and interpreter helpers (`tflite_bytes`,
`tflite_interpreter`) live here, below `kprune.tools.export`, which
re-exports them.

The module is callable: `kprune.latency(model, batch_size=1)` is
`kprune.profile.latency`, as it was before this module existed.

Example:

>>> lm = kprune.latency.LatencyModel(model, runtime="tflite", threads=2)
>>> lm.ratio({graph.group_of("conv1").id: list(range(16))})   # predicted share of lm.base
0.83
>>> kprune.latency.measure(model, runtime="tflite", threads=2)
0.0041
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import types
import warnings
from typing import Mapping, Sequence

import keras
import numpy as np

from kprune.errors import KprunError
from kprune.graph.dependency import DependencyGraph
from kprune.graph.rules import get_rule
from kprune.graph.walk import is_tensor
from kprune.profile import latency as _profile_latency
from kprune.surgeon.plan import apply_plan, drop_masks
from kprune.surgeon.rebuild import _names, clone_layer

RUNTIMES = ("keras", "tflite")

_CALIBRATION_SAMPLES = 100


# --------------------------------------------------------------------------
# TFLite conversion and interpreter (kprune.tools.export re-exports these)
# --------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """Silence C++ and Python output on stdout/stderr; replay its tail on error.

    The TFLite converter logs MLIR passes straight to file descriptors 1 and
    2, which `contextlib.redirect_stdout` alone cannot catch.
    """
    import io

    with tempfile.TemporaryFile(mode="w+b") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        text = io.StringIO()
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        except Exception:
            _restore(saved)
            log.seek(0)
            output = text.getvalue() + log.read().decode("utf-8", "replace")
            tail = output.strip().splitlines()[-20:]
            if tail:
                print("\n".join(tail), file=sys.stderr)
            raise
        else:
            _restore(saved)


def _restore(saved) -> None:
    for fd, dup in zip((1, 2), saved):
        os.dup2(dup, fd)
        os.close(dup)


def _input_shape(model: keras.Model) -> tuple:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise KprunError(f"Model '{model.name}': export checks need one input and one output "
                         f"(it has {len(model.inputs)} and {len(model.outputs)}); pass check=False.")
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise KprunError(f"Model '{model.name}': input shape {shape} has unknown sizes; TFLite "
                         "and the checks need a fixed input shape.")
    return shape


def _samples(model: keras.Model, data, limit: int) -> np.ndarray:
    """Up to `limit` float32 input samples from `data` (array, dataset or iterable)."""
    shape = _input_shape(model)
    if data is None:
        rng = np.random.default_rng(0)
        return rng.uniform(0.0, 1.0, size=(min(limit, 4),) + shape).astype("float32")
    if hasattr(data, "shape"):
        x = np.asarray(data, dtype="float32")
    else:
        parts, count = [], 0
        for item in data:
            batch = item[0] if isinstance(item, (tuple, list)) else item
            batch = np.asarray(batch, dtype="float32")
            parts.append(batch)
            count += len(batch)
            if count >= limit:
                break
        if not parts:
            raise KprunError(f"Model '{model.name}': representative_data yielded no samples.")
        x = np.concatenate(parts)
    if x.shape[1:] != shape:
        raise KprunError(f"Model '{model.name}': representative_data has samples of shape "
                         f"{x.shape[1:]}, the model's input is {shape}.")
    return x[:limit]


def tflite_bytes(model: keras.Model, representative_data=None) -> bytes:
    """Convert `model` to a TFLite flatbuffer.

    Args:
        model: A model with a fixed input shape.
        representative_data: Calibration inputs (an array of samples, a
            `tf.data.Dataset` or an iterable of batches, `(x, y)` pairs
            allowed). When given, the model is fully integer-quantised: int8
            weights and activations, float32 input and output.

    Returns:
        The flatbuffer bytes.

    Example:

    >>> open("small.tflite", "wb").write(tflite_bytes(small))
    """
    import tensorflow as tf

    with _quiet():  # builds a temporary SavedModel and prints its endpoints
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if representative_data is not None:
        calibration = _samples(model, representative_data, _CALIBRATION_SAMPLES)

        def gen():
            for sample in calibration:
                yield [sample[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = gen
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with _quiet(), warnings.catch_warnings():
        # Float input/output on an int8 model is intended: no input statistics.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


def tflite_interpreter(path: str | None = None, *, model_content: bytes | None = None,
                       num_threads: int | None = None):
    """A TFLite interpreter: `ai_edge_litert` if installed, else `tf.lite`.

    Args:
        path: A `.tflite` file.
        model_content: Flatbuffer bytes instead of a file.
        num_threads: Interpreter threads (None: the runtime's default).

    Example:

    >>> interpreter = tflite_interpreter(model_content=tflite_bytes(small), num_threads=2)
    """
    if (path is None) == (model_content is None):
        raise KprunError("tflite_interpreter needs a path or model_content (one of them).")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - depends on the environment
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    source = {"model_path": str(path)} if path is not None else {"model_content": model_content}
    with _quiet():  # the runtime announces its CPU delegate on stderr
        return Interpreter(**source, num_threads=num_threads)


# --------------------------------------------------------------------------
# Settings and end-to-end timing
# --------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_settings(runtime: str, batch_size: int, threads: int | None) -> None:
    """Raise a clear `KprunError` for an unknown runtime, a bad batch size or thread count."""
    if runtime not in RUNTIMES:
        raise KprunError(f"Unknown runtime {runtime!r}; valid runtimes: "
                         + ", ".join(repr(r) for r in RUNTIMES) + ".")
    if not (_is_int(batch_size) and batch_size >= 1):
        raise KprunError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if threads is not None and not (_is_int(threads) and threads >= 1):
        raise KprunError(f"`threads` must be None (the runtime's default) or a positive int, "
                         f"got {threads!r}.")


def _keras_threads(threads: int | None) -> None:
    """Give TF's intra-op pool `threads` threads, or say why it cannot be done."""
    if threads is None:
        return
    import tensorflow as tf

    if tf.config.threading.get_intra_op_parallelism_threads() == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        raise KprunError(f"runtime='keras' with threads={threads}: TensorFlow's thread pool is "
                         "fixed once it has run; call "
                         "`tf.config.threading.set_intra_op_parallelism_threads` at start-up, "
                         "or pass threads=None.") from None


def _random(shape, dtype, rng) -> np.ndarray:
    dtype = np.dtype(keras.backend.standardize_dtype(dtype))
    if np.issubdtype(dtype, np.floating):
        return rng.normal(size=shape).astype(dtype)
    return np.ones(shape, dtype=dtype)  # token ids, masks: 1 is valid for either


def _static(model: keras.Model, batch_size: int) -> list:
    shapes = []
    for t in model.inputs:
        shape = tuple(t.shape[1:])
        if any(d is None for d in shape):
            raise KprunError(f"Model '{model.name}': input '{t.name}' has unknown sizes {shape}; "
                             "latency is measured at a fixed input shape.")
        shapes.append((batch_size,) + shape)
    return shapes


def _keras_runner(model: keras.Model, batch_size: int, threads: int | None):
    import tensorflow as tf

    _keras_threads(threads)
    rng = np.random.default_rng(0)
    xs = [tf.constant(_random(s, t.dtype, rng)) for s, t in zip(_static(model, batch_size),
                                                                model.inputs)]
    struct = getattr(model, "_inputs_struct", None)
    if len(xs) == 1:
        args = xs[0]
    elif struct is not None:
        args = keras.tree.pack_sequence_as(struct, xs)
    else:
        args = xs
    def first(o):  # one element: waits for the whole output without copying it out
        return tf.reshape(o, [-1])[:1]

    fn = tf.function(lambda a: [first(o) for o in keras.tree.flatten(model(a, training=False))],
                     jit_compile=False)

    def run():
        for o in fn(args):
            o.numpy()

    return run


def _tflite_runner(model: keras.Model, batch_size: int, threads: int | None):
    _static(model, batch_size)
    try:
        content = tflite_bytes(model)
    except Exception as exc:
        raise KprunError(f"Model '{model.name}' does not convert to TFLite: "
                         f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
                         ) from None
    interpreter = tflite_interpreter(model_content=content, num_threads=threads)
    rng = np.random.default_rng(0)
    inputs = interpreter.get_input_details()
    for d in inputs:
        if int(d["shape"][0]) != batch_size:
            interpreter.resize_tensor_input(d["index"], (batch_size,) + tuple(d["shape"][1:]))
    with _quiet():
        interpreter.allocate_tensors()
    for d in interpreter.get_input_details():
        interpreter.set_tensor(d["index"], _random(tuple(d["shape"]), d["dtype"], rng))

    def run():
        interpreter.invoke()  # synchronous; the outputs are not copied out

    return run


def _check_counts(warmup, runs) -> None:
    if not (_is_int(runs) and runs >= 1) or not (_is_int(warmup) and warmup >= 0):
        raise KprunError(f"`runs` must be >= 1 and `warmup` >= 0, got runs={runs!r}, "
                         f"warmup={warmup!r}.")


def check_backend(what: str = "Measured latency") -> None:
    """KprunError unless Keras runs on TensorFlow, where kprune times models.

    Runtime "keras" times a `tf.function` and "tflite" converts through
    TensorFlow; neither exists on the JAX or PyTorch backends.
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise KprunError(f"{what} is timed on the TensorFlow backend (runtime 'keras' runs a "
                         f"tf.function, 'tflite' converts through TensorFlow); Keras runs on "
                         f"'{backend}'. Run this under KERAS_BACKEND=tensorflow, or prune to "
                         "`flops_target` / `params_target`, which work on every backend.")


def _runner(model, runtime, batch_size, threads):
    check_backend()
    if runtime == "keras":
        return _keras_runner(model, batch_size, threads)
    return _tflite_runner(model, batch_size, threads)


def measure_interleaved(models: Sequence[keras.Model], runtime: str = "keras",
                        batch_size: int = 1, threads: int | None = None, warmup: int = 3,
                        runs: int = 20, *, prepared: dict | None = None) -> list:
    """Median seconds of one inference of each model, timed in alternating rounds.

    Each model is prepared (traced or converted) and warmed up, then every
    round times one call of each, in a shuffled order, so that a change of
    machine load touches every model alike. `measure` is this for one model.

    Args:
        models: Keras models with fixed input sizes.
        runtime, batch_size, threads, warmup, runs: As for `measure` (`runs`
            rounds).
        prepared: A dict the caller keeps, `{id(model): runner}`, for these
            settings: runners found there are reused (no second conversion
            of a model timed again), new ones are added.

    Returns:
        One median per model, in order.

    Example:

    >>> base, small_s = measure_interleaved([model, small], runtime="tflite")
    """
    check_settings(runtime, batch_size, threads)
    _check_counts(warmup, runs)
    prepared = {} if prepared is None else prepared
    runners = []
    for m in models:
        if id(m) not in prepared:
            prepared[id(m)] = _runner(m, runtime, batch_size, threads)
        runners.append(prepared[id(m)])
    for run in runners:
        for _ in range(max(1, warmup) if runtime == "keras" else warmup):
            run()
    rng = np.random.default_rng(0)
    times = [[] for _ in runners]
    for _ in range(runs):
        for i in (rng.permutation(len(runners)) if len(runners) > 1 else [0]):
            t0 = time.perf_counter()
            runners[i]()
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def measure(model: keras.Model, runtime: str = "keras", batch_size: int = 1,
            threads: int | None = None, warmup: int = 3, runs: int = 20) -> float:
    """Median seconds of one inference of `model` on a batch of random inputs.

    Float inputs are drawn from a normal distribution; integer and boolean
    inputs (token ids, masks) are ones.

    Args:
        model: A Keras model with fixed input sizes (the batch axis aside).
        runtime: `"keras"`: the model in a compiled `tf.function` (as
            `model.predict` runs it, no XLA), one element of each output
            fetched with `.numpy()`; `"tflite"`: converted to a float32
            flatbuffer (`tflite_bytes`) and `invoke()`d by the
            `ai_edge_litert` interpreter (XNNPACK on CPU), its inputs resized
            to the batch. Outputs are not copied out: a single layer's
            output is a whole feature map, and copying it would count as
            the layer's cost.
        batch_size: Batch of every timed call.
        threads: TFLite interpreter threads, or TF's intra-op threads for
            `"keras"` (which TF fixes once it has run); None leaves the
            runtime's default.
        warmup: Untimed calls before timing (at least 1 for `"keras"`, which
            traces on its first call).
        runs: Timed calls; the median is returned.

    Raises:
        KprunError: for a bad setting, unknown input sizes, or a model that
            does not convert to TFLite.

    Example:

    >>> measure(small, runtime="tflite", threads=2)
    0.0021
    """
    return measure_interleaved([model], runtime, batch_size, threads, warmup, runs)[0]


# --------------------------------------------------------------------------
# Per-layer table
# --------------------------------------------------------------------------
_IGNORED_KEYS = ("name", "trainable")
_IGNORED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")


def _cache_dir(cache_dir) -> str:
    if cache_dir is not None:
        return os.fspath(cache_dir)
    return os.environ.get("KPRUNE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "kprune", "latency")


def _is_shape(x) -> bool:
    return isinstance(x, (tuple, list)) and all(d is None or _is_int(d) for d in x)


def _shapes(shape_or_shapes) -> list:
    """A list of shapes, batch axis dropped, from one shape or a list of them."""
    if _is_shape(shape_or_shapes):
        shape_or_shapes = [shape_or_shapes]
    out = []
    for s in shape_or_shapes:
        if not _is_shape(s) or len(s) < 1:
            raise KprunError(f"Expected shapes with their batch axis first, got {s!r}.")
        out.append(tuple(None if d is None else int(d) for d in s[1:]))
    return out


def _layer_config(layer) -> dict:
    config = layer.get_config()
    return {k: v for k, v in config.items()
            if k not in _IGNORED_KEYS and not k.endswith(_IGNORED_SUFFIXES)}


def _single_layer_model(layer, in_shapes: list, call=None, dtypes=None) -> keras.Model:
    """`layer` alone, called on new inputs of `in_shapes` as `call` called its original."""
    dtypes = dtypes or ["float32"] * len(in_shapes)
    inputs = [keras.Input(shape=s, dtype=d) for s, d in zip(in_shapes, dtypes)]
    if call is None:
        out = layer(inputs[0]) if len(inputs) == 1 else layer(*inputs)
    else:
        if len(call.inputs) != len(inputs):
            raise KprunError(f"Layer '{call.layer.name}' reads {len(call.inputs)} tensors, got "
                             f"{len(inputs)} shapes.")
        by_id, used = {}, []
        for t, new in zip(call.inputs, inputs):
            if id(t) not in by_id:
                by_id[id(t)] = new
                used.append(new)
        inputs = used

        def swap(x):
            return by_id[id(x)] if is_tensor(x) else x

        args = keras.tree.map_structure(swap, call.args)
        kwargs = keras.tree.map_structure(swap, call.kwargs)
        out = layer(*args, **kwargs)
    return keras.Model(inputs, out)


class LatencyTable:
    """Per-layer latency, measured on single-layer models and cached on disk.

    A layer's latency is measured on a model made of that layer alone (its
    inputs are random), with `measure`, and saved in a JSON file under
    `cache_dir`. The key, `signature()`, names everything that sets the cost:
    the layer's class and config (kernel size, strides, groups, padding,
    activation, widths...; not its name or initialisers), the input and
    output shapes (batch aside), the runtime, batch size, threads,
    TensorFlow and Keras versions and the host. A signature is measured once
    per machine; other processes' entries are merged on every save.

    Args:
        runtime: `"keras"` or `"tflite"` (see `measure`).
        batch_size: Batch of the timed calls.
        threads: Runtime threads (None: its default).
        cache_dir: Folder of the JSON files; default `$KPRUNE_CACHE`, else
            `~/.cache/kprune/latency`.
        runs, warmup: Timed and untimed calls per measurement.

    Attributes:
        measured: How many layers this table has measured (cache misses).
        seconds: Wall time spent measuring them.
        path: The JSON file of this runtime, batch and thread setting.

    Example:

    >>> table = LatencyTable(runtime="tflite", threads=2)
    >>> table.layer(keras.layers.Conv2D(64, 3, padding="same"), (None, 56, 56, 64),
    ...             (None, 56, 56, 64))
    0.00081
    """

    def __init__(self, runtime: str = "keras", batch_size: int = 1, threads: int | None = None,
                 cache_dir=None, runs: int = 10, warmup: int = 2):
        check_settings(runtime, batch_size, threads)
        _check_counts(warmup, runs)
        import tensorflow as tf

        self.runtime, self.batch_size, self.threads = runtime, int(batch_size), threads
        self.runs, self.warmup = int(runs), int(warmup)
        self.cache_dir = _cache_dir(cache_dir)
        self.context = {"runtime": runtime, "batch": self.batch_size, "threads": threads,
                        "tf": tf.__version__, "keras": keras.__version__,
                        "host": f"{platform.machine()}-{os.cpu_count()}cpu"}
        tag = hashlib.sha1(json.dumps(self.context, sort_keys=True).encode()).hexdigest()[:10]
        self.path = os.path.join(self.cache_dir, f"{runtime}-b{self.batch_size}-"
                                                 f"t{threads or 'auto'}-{tag}.json")
        self.measured, self.seconds = 0, 0.0
        self._entries = self._load()

    def _load(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return {k: float(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _save(self) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        merged = self._load()
        merged.update(self._entries)
        self._entries = merged
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(tmp, self.path)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, signature: str) -> bool:
        return signature in self._entries

    def signature(self, layer, in_shape, out_shape) -> str:
        """The cache key of `layer` called on `in_shape` giving `out_shape` (a JSON string).

        Shapes are Keras's, batch axis first (`tuple(tensor.shape)`); a list
        of shapes for a layer with several inputs or outputs.
        """
        key = {"class": f"{type(layer).__module__}.{type(layer).__qualname__}",
               "config": _layer_config(layer), "in": _shapes(in_shape),
               "out": _shapes(out_shape), **self.context}
        return json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))

    def layer(self, layer, in_shape, out_shape, *, call=None, dtypes=None) -> float:
        """Seconds of one call of `layer` on `in_shape`; measured on a cache miss.

        Args:
            layer: A layer configured as it will run (its weights are not
                used: a fresh copy is built from its config).
            in_shape: The input shape, batch axis first, or a list of them.
            out_shape: The output shape(s), part of the key.
            call: The `kprune.graph.walk.Call` whose arguments the layer
                takes (several inputs, keyword arguments); by default the
                layer is called on its inputs in order.
            dtypes: The inputs' dtypes (default float32).
        """
        return self.fill([(layer, in_shape, out_shape, call, dtypes)])[0]

    def fill(self, items: Sequence) -> list:
        """Seconds of each `(layer, in_shape, out_shape, call, dtypes)`, as `layer()` gives them.

        The missing signatures are measured together, interleaved
        (`measure_interleaved`), so that a change of machine load between
        them does not pass for a difference of width.
        """
        sigs = [self.signature(item[0], item[1], item[2]) for item in items]
        todo: dict = {}
        for sig, item in zip(sigs, items):
            if sig not in self._entries and sig not in todo:
                todo[sig] = item
        if todo:
            t0 = time.perf_counter()
            models = []
            for layer, in_shape, _, call, dtypes in todo.values():
                shapes = _shapes(in_shape)
                if any(d is None for s in shapes for d in s):
                    raise KprunError(f"Layer '{layer.name}': input shapes {shapes} have unknown "
                                     "sizes; latency is measured at fixed shapes.")
                models.append(_single_layer_model(clone_layer(layer), shapes, call, dtypes))
            times = measure_interleaved(models, self.runtime, self.batch_size, self.threads,
                                        self.warmup, self.runs)
            self._entries.update(zip(todo, times))
            self.measured += len(todo)
            self.seconds += time.perf_counter() - t0
            self._save()
        return [self._entries[sig] for sig in sigs]


# --------------------------------------------------------------------------
# Latency model
# --------------------------------------------------------------------------
L = keras.layers
TIMED = [L.Conv1D, L.Conv2D, L.Conv3D, L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose,
         L.DepthwiseConv1D, L.DepthwiseConv2D, L.SeparableConv1D, L.SeparableConv2D, L.Dense,
         L.EinsumDense, L.MultiHeadAttention, L.GroupQueryAttention]
del L

_MAX_DIMS = 3


def register_timed(layer_class) -> None:
    """Time `layer_class` in `LatencyModel` tables (instead of leaving it in the remainder)."""
    if layer_class not in TIMED:
        TIMED.append(layer_class)


def _fake_weights(layer) -> dict:
    """Weight name -> a zero-stride array of the weight's shape: rules slice shapes, not values."""
    return {n: np.broadcast_to(np.zeros((), keras.backend.standardize_dtype(v.dtype)),
                               tuple(v.shape))
            for n, v in zip(_names(layer.weights), layer.weights)}


def _even_drop(group, keep: float) -> np.ndarray:
    """Drop mask keeping about `keep` of `group`, the same number in every conv-group cell."""
    size = group.size
    mask = np.zeros(size, dtype=bool)
    if group.partitions:
        keys = np.stack(group.partitions, axis=1)
        free_mask = (keys < 0).all(axis=1)
        constrained = np.flatnonzero(~free_mask)
        _, inverse = np.unique(keys[~free_mask], axis=0, return_inverse=True)
        cells = [constrained[inverse.reshape(-1) == i] for i in range(int(inverse.max()) + 1)] \
            if len(constrained) else []
        free = np.flatnonzero(free_mask)
    else:
        cells, free = [np.arange(size)], np.zeros(0, dtype=np.int64)
    for cell in cells:
        mask[cell[min(len(cell), max(1, int(round(keep * len(cell))))):]] = True
    if len(free):
        mask[free[min(len(free), max(0 if cells else 1, int(round(keep * len(free))))):]] = True
    return mask


def _bracket(coords: np.ndarray, x: float):
    """[(index, weight)] of the linear interpolation of `x` on `coords`, held at the ends."""
    n = len(coords)
    if n == 1 or x <= coords[0]:
        return [(0, 1.0)]  # below the grid: the smallest measured width (never extrapolated)
    if x >= coords[-1]:
        return [(n - 1, 1.0)]
    j = int(np.searchsorted(coords, x, side="right") - 1)
    t = (x - coords[j]) / (coords[j + 1] - coords[j])
    return [(j, 1.0 - t), (j + 1, t)]


def _monotone(values: np.ndarray) -> np.ndarray:
    """`values` made non-decreasing along every axis (narrower never slower).

    Along each axis in turn: the mean of the running maximum from the
    narrow end and the running minimum from the wide end, a cheap isotonic
    fit that leaves a monotone grid unchanged. Both maps preserve order, so
    an axis done stays monotone while the next is fitted.
    """
    out = np.array(values, dtype=np.float64)
    for axis in range(out.ndim):
        up = np.maximum.accumulate(out, axis=axis)
        down = np.flip(np.minimum.accumulate(np.flip(out, axis), axis=axis), axis)
        out = (up + down) / 2.0
    return out


@dataclasses.dataclass
class TimedCall:
    """One layer call of a `LatencyModel`, with its measured grid.

    Attributes:
        call: The `kprune.graph.walk.Call`.
        dims: Per dimension of the grid, the ids of the groups that set it
            (coupled groups, such as a depthwise conv's input and output,
            share a dimension).
        coords: Per dimension, the kept share of those groups' channels at
            each grid point (ascending, the last 1.0).
        values: Seconds at every grid point, shape `[len(c) for c in coords]`,
            made non-decreasing in every dimension (noise aside, a narrower
            layer is not slower), which keeps predictions monotone in a
            plan's ratio.
        measured: The table's seconds before that fit.
    """

    call: object
    dims: list
    coords: list
    values: np.ndarray
    drops: list = dataclasses.field(default_factory=list, repr=False)
    measured: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.call.layer.name

    @property
    def full(self) -> float:
        """Seconds at full width."""
        return float(self.values[tuple(len(c) - 1 for c in self.coords)])

    def predict(self, drop: dict, sizes: dict) -> float:
        """Seconds at the widths `drop` (group id -> drop mask) leaves, interpolated."""
        brackets = []
        for gids, coords in zip(self.dims, self.coords):
            kept = sum(sizes[g] - int(drop[g].sum()) if g in drop else sizes[g] for g in gids)
            brackets.append(_bracket(coords, kept / sum(sizes[g] for g in gids)))
        total = 0.0
        for corner in itertools.product(*brackets):
            weight = float(np.prod([w for _, w in corner]))
            if weight:
                total += weight * float(self.values[tuple(i for i, _ in corner)])
        return max(total, 0.0)


class LatencyModel:
    """Predict the latency of `apply_plan(model, plan)` from per-layer measurements.

    Every timed layer call (Conv, ConvTranspose, Depthwise and Separable
    convolutions, Dense, EinsumDense, MultiHeadAttention, GroupQueryAttention;
    more with `register_timed`) whose widths a plan can change is measured by
    `table` on a single-layer model at every point of a grid: each dimension
    (a set of coupled groups: the layer's input channels, its output
    channels, its heads) at the kept shares `grid`, the points of one layer
    timed interleaved. Each layer's grid is made non-decreasing in every
    dimension (`TimedCall.values`), so that timing noise cannot make a more
    pruned plan look slower. A plan's latency is then interpolated
    (multilinear between grid points; below the smallest share, the value
    there: never extrapolated) at the shares the plan keeps, summed over
    these calls, plus the fixed remainder `base - sum(calls at full width)`:
    every other layer, the timed layers no plan can change, and the
    runtime's own overhead. Widths are never measured on demand: `predict`
    is arithmetic, so a search may call it often. The grid is filled when
    the model is made (the table's cache makes that cheap the second time).

    Layers alone do not run as they do inside the model (a runtime fuses a
    convolution with its activation, caches warm differently), so the sum
    of their savings is off by a factor. The model is therefore calibrated
    on `anchors`: the model pruned evenly to each of these kept shares is
    built and timed beside the original, and `scale` is the least-squares
    factor that maps the tables' savings onto the measured ones
    (`predict(plan) = base - scale * (sum at full width - sum at plan)`).
    The original stays predicted exactly.

    Args:
        model: A functional or Sequential model with fixed input sizes.
        table: A `LatencyTable` to read and fill; by default one for
            `runtime`, `batch_size`, `threads` and `cache_dir`. When given,
            its runtime, batch size and threads are used.
        runtime: `"keras"` or `"tflite"` (see `measure`).
        batch_size: Batch of every timed call.
        threads: Runtime threads (None: its default).
        grid: Kept shares measured per dimension, in (0, 1]; 1.0 is added.
        cache_dir: Folder of the table's cache (see `LatencyTable`).
        graph: The model's `DependencyGraph`, if already built.
        groups: Ids of the groups plans may touch (default: every prunable
            group); the others stay at full width and cost no measurement.
        runs, warmup: Timed and untimed calls of the end-to-end measurements.
        anchors: Kept shares of the evenly pruned models that calibrate
            `scale` (None or empty: `scale` is 1, the tables' sum as it is).
        verbose: Show a progress bar while the table is filled (0: silent).

    Attributes:
        base: Measured end-to-end seconds of `model`.
        calls: The `TimedCall`s.
        remainder: `base - sum(c.full for c in calls)` (negative when the
            single-layer models' overhead exceeds what the rest costs).
        scale: Factor from the tables' savings to measured ones (see above).
        calibration: One dict per anchor: `share`, `predicted` (seconds,
            uncalibrated), `measured` (seconds); an anchor the surgeon
            could not build has `error` instead.
        untimed: "name (Class): reason" of timed layers that could not be
            measured alone; they stay in the remainder.
        seconds: Wall time spent filling the table for this model.

    Example:

    >>> lm = LatencyModel(model, runtime="keras")
    >>> lm.predict() == pytest.approx(lm.base)
    True
    >>> lm.ratio(prune_plan(model, ratio=0.5))
    0.41
    """

    def __init__(self, model: keras.Model, table: LatencyTable | None = None,
                 runtime: str = "keras", batch_size: int = 1, threads: int | None = None,
                 grid: Sequence[float] = (0.25, 0.5, 0.75, 1.0), cache_dir=None, *,
                 graph: DependencyGraph | None = None, groups: Sequence[int] | None = None,
                 runs: int = 20, warmup: int = 3,
                 anchors: Sequence[float] | None = (0.75, 0.5), verbose: int = 1):
        check_settings(runtime, batch_size, threads)
        check_backend("A LatencyModel")
        anchors = _check_anchors(anchors)
        if table is None:
            table = LatencyTable(runtime, batch_size, threads, cache_dir)
        elif (runtime, batch_size, threads) != ("keras", 1, None) and \
                (runtime, batch_size, threads) != (table.runtime, table.batch_size, table.threads):
            raise KprunError(f"The table times runtime={table.runtime!r}, batch_size="
                             f"{table.batch_size}, threads={table.threads}; got runtime="
                             f"{runtime!r}, batch_size={batch_size}, threads={threads}.")
        shares = sorted({float(g) for g in grid} | {1.0}) if grid is not None else None
        if not shares or any(not (0.0 < g <= 1.0) for g in shares):
            raise KprunError(f"`grid` holds kept shares in (0, 1]; got {grid!r}.")
        self.model, self.table = model, table
        self.runtime, self.batch_size, self.threads = table.runtime, table.batch_size, table.threads
        self.runs, self.warmup = runs, warmup
        self.grid = tuple(shares)
        self.graph = graph or DependencyGraph(model)
        allowed = {g.id for g in self.graph.prunable_groups()}
        if groups is not None:
            allowed &= {int(getattr(g, "id", g)) for g in groups}
        self._sizes = {g.id: g.size for g in self.graph.groups}
        self.untimed: list = []
        self.calls: list = []
        t0, before = time.perf_counter(), table.measured
        jobs = [job for call in self.graph.flat.calls if _is_timed(call.layer)
                for job in [self._plan_call(call, allowed)] if job is not None]
        self._fill(jobs, verbose)
        self.seconds = time.perf_counter() - t0
        self.measurements = table.measured - before
        self._prepared: dict = {}
        self.scale = 1.0
        self.base = self._calibrate(anchors)
        self.remainder = self.base - sum(c.full for c in self.calls)

    # Building ---------------------------------------------------------------------
    def _slots(self, call) -> tuple:
        """(the set of group ids of each channel slot of `call`, inputs first; how many inputs)."""
        g = self.graph
        slots = []
        for t in list(call.inputs) + list(call.outputs):
            spec = g.specs.get(id(t))
            slots.append(set() if spec is None else
                         {int(x) for x in np.unique(g.atom_group[spec.atoms])})
        for (lid, _), atoms in g.inner.items():
            if lid == id(call.layer):
                slots.append({int(x) for x in np.unique(g.atom_group[atoms])})
        return slots, len(call.inputs)

    def _plan_call(self, call, allowed):
        slots, n_in = self._slots(call)
        slots = [s & allowed for s in slots]
        dims = _components(slots)
        if len(dims) > _MAX_DIMS:  # a conv reading a wide concatenation: inputs as one share
            every = set().union(*dims)
            inputs = set().union(*slots[:n_in]) & every
            dims = [d for d in (inputs, every - inputs) if d]
        if not dims:
            return None  # no plan changes this call: its cost stays in the remainder
        dims = [sorted(d) for d in dims]
        coords, drops = [], []
        for gids in dims:
            points = {}
            for share in self.grid:
                drop = {g: _even_drop(self.graph.groups[g], share) for g in gids}
                kept = sum(self._sizes[g] - int(m.sum()) for g, m in drop.items())
                points.setdefault(kept / sum(self._sizes[g] for g in gids), drop)
            coords.append(np.array(sorted(points)))
            drops.append([points[c] for c in sorted(points)])
        return TimedCall(call, dims, coords, np.zeros([len(c) for c in coords]), drops)

    def _point(self, timed, index):
        """(layer, input shapes, output shapes, dtypes) of `timed` at grid `index`."""
        drop = {}
        for d, i in enumerate(index):
            drop.update(timed.drops[d][i])
        return self._at(timed.call, drop)

    def _at(self, call, drop: dict):
        """(layer, input shapes, output shapes, dtypes) of `call` at the widths `drop` leaves."""
        g = self.graph
        keep_in = [g.keep_mask(t, drop) for t in call.inputs]
        keep_out = [g.keep_mask(t, drop) for t in call.outputs]
        keep_inner = g.inner_keep(call.layer, drop)

        def shape(t, keep):
            dims = list(t.shape)
            if keep is not None:
                dims[g.specs[id(t)].axis] = int(keep.sum())
            return tuple(dims)

        config = None
        if keep_inner or any(k is not None and not k.all() for k in keep_in + keep_out):
            full_in = [k if k is not None else np.ones(0, bool) for k in keep_in]
            full_out = [k if k is not None else np.ones(0, bool) for k in keep_out]
            config, _ = get_rule(call.layer).slice_for(call, _fake_weights(call.layer), full_in,
                                                       full_out, keep_inner)
        layer = clone_layer(call.layer, config)
        return (layer, [shape(t, k) for t, k in zip(call.inputs, keep_in)],
                [shape(t, k) for t, k in zip(call.outputs, keep_out)],
                [t.dtype for t in call.inputs])

    def _fill(self, jobs, verbose):
        points = {}
        for timed in jobs:
            try:
                points[id(timed)] = [
                    (index,) + self._point(timed, index)
                    for index in itertools.product(*[range(len(c)) for c in timed.coords])]
            except Exception as exc:  # a layer that cannot stand alone at these widths
                self._untime(timed, exc)
        missing = {self.table.signature(layer, ins, outs) for todo in points.values()
                   for _, layer, ins, outs, _ in todo}
        missing = {sig for sig in missing if sig not in self.table}
        bar = keras.utils.Progbar(len(missing), unit_name="layer") if verbose and missing \
            else None
        self.calls = []
        for timed in jobs:
            if id(timed) not in points:
                continue
            before = self.table.measured
            try:
                seconds = self.table.fill([(layer, ins, outs, timed.call, dtypes)
                                           for _, layer, ins, outs, dtypes in points[id(timed)]])
            except Exception as exc:
                self._untime(timed, exc)
                continue
            for (index, *_), value in zip(points[id(timed)], seconds):
                timed.values[index] = value
            timed.measured = timed.values.copy()
            timed.values = _monotone(timed.values)
            self.calls.append(timed)
            if bar is not None and self.table.measured > before:
                bar.add(self.table.measured - before)

    def _anchor_plan(self, share: float) -> dict:
        """`{group id: channels}` dropping about `1 - share` of every group the calls touch."""
        gids = sorted({g for c in self.calls for d in c.dims for g in d})
        plan = {g: np.flatnonzero(_even_drop(self.graph.groups[g], share)).tolist()
                for g in gids}
        return {g: ch for g, ch in plan.items() if ch}

    def _calibrate(self, anchors) -> float:
        """Time the original beside its anchors; set `scale`; return the original's seconds."""
        self.calibration, models, sums = [], [], []
        for share in anchors:
            plan = self._anchor_plan(share)
            if not plan:
                continue
            try:
                models.append(apply_plan(self.model, plan, self.graph))
            except KprunError as exc:
                self.calibration.append({"share": share, "error": str(exc)})
                continue
            sums.append(self._sum(plan))
            self.calibration.append({"share": share, "predicted": None, "measured": None})
        seconds = self._time([self.model] + models)
        base, full = seconds[0], self._sum({})
        done = [c for c in self.calibration if "error" not in c]
        for c, raw, measured in zip(done, sums, seconds[1:]):
            c["predicted"], c["measured"] = base - full + raw, measured
        saved = np.array([full - raw for raw in sums])
        if len(saved) and float(saved @ saved) > 0:
            fit = float(saved @ (base - np.array(seconds[1:]))) / float(saved @ saved)
            self.scale = float(np.clip(fit, _SCALE_RANGE[0], _SCALE_RANGE[1]))
        return base

    def _sum(self, plan: dict) -> float:
        drop = drop_masks(self.graph, plan) if plan else {}
        return sum(c.predict(drop, self._sizes) for c in self.calls)

    def _untime(self, timed, exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        note = f"{timed.name} ({type(timed.call.layer).__name__}): {first}"
        if note not in self.untimed:
            self.untimed.append(note)

    # Queries ----------------------------------------------------------------------
    def predict(self, plan: dict | None = None) -> float:
        """Predicted seconds of `apply_plan(model, plan)` (of `model` when no plan).

        Args:
            plan: `{group id: channels to drop}`, as `prune_plan` returns.

        Raises:
            KprunError: for an invalid plan (see `kprune.surgeon.drop_masks`).
        """
        full = self.base - self.remainder
        return max(self.base - self.scale * (full - self._sum(plan or {})), 0.0)

    def ratio(self, plan: dict | None = None) -> float:
        """`predict(plan) / base`."""
        return self.predict(plan) / self.base

    def group_seconds(self, gid: int, plans: Sequence[dict]) -> list:
        """Seconds of the timed calls group `gid` touches, at each plan's exact widths.

        Unlike `predict`, nothing is interpolated: every call that reads or
        writes the group's channels is timed (or read from the table) at
        the widths each plan leaves, all of them in one interleaved fill, so
        the plans compare on the same load. This is where latency steps
        show: runtimes tile channels (XNNPACK, oneDNN), and a layer a few
        channels wider can take no longer, or even less.

        Args:
            gid: A group id of `graph`.
            plans: Plans `{group id: channels to drop}`.

        Returns:
            One sum of seconds per plan.

        Example:

        >>> narrow, wide = lm.group_seconds(gid, [plan, {**plan, gid: plan[gid][:-8]}])
        """
        calls = [c for c in self.calls if any(gid in d for d in c.dims)]
        items, owners = [], []
        for i, plan in enumerate(plans):
            drop = drop_masks(self.graph, plan) if plan else {}
            for c in calls:
                layer, ins, outs, dtypes = self._at(c.call, drop)
                items.append((layer, ins, outs, c.call, dtypes))
                owners.append(i)
        seconds = self.table.fill(items) if items else []
        out = [0.0] * len(plans)
        for i, value in zip(owners, seconds):
            out[i] += value
        return out

    def snap(self, plan: dict, scores: Mapping, step: int = 8, span: int = 32,
             tolerance: float = 0.02, verbose: int = 0) -> dict:
        """`plan` with every group widened to the top of its latency step.

        For each group the plan narrows to `k` channels, the widths above
        `k` that are multiples of `step`, up to the next multiple of `span`
        (and the full width when that is within it), are timed with
        `group_seconds`; the group keeps the widest whose seconds are at
        most `(1 + tolerance)` times those at `k`. The channels given back
        are the dropped ones with the highest `scores`. Groups are snapped
        one after another, each on the plan the earlier ones left. Groups of
        grouped convolutions (whose removals must stay even per block) are
        left as they are.

        Args:
            plan: `{group id: channels to drop}`.
            scores: `{group id: per-channel importance}` (higher is kept first).
            step: Widths tried are multiples of this.
            span: How far above `k` to look: up to the next multiple of `span`.
            tolerance: Share of the group's seconds a wider choice may add
                (timing noise).
            verbose: 1 shows a progress bar over the groups.

        Returns:
            A new plan that drops no more channels than `plan` in any group.

        Example:

        >>> wider = lm.snap(prune_plan(model, latency_target=0.5), scores)
        """
        for name, value in (("step", step), ("span", span)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise KprunError(f"snap: `{name}` must be an int >= 1, got {value!r}.")
        out = {gid: list(ch) for gid, ch in plan.items()}
        bar = keras.utils.Progbar(len(plan), unit_name="group") if verbose else None
        for gid in sorted(plan):
            size, dropped = self._sizes[gid], list(out[gid])
            kept = size - len(dropped)
            top = min(size, -(-(kept + 1) // span) * span)
            widths = [w for w in range(kept + 1, top + 1) if w % step == 0 or w == size]
            if widths and dropped and gid in scores and not self.graph.groups[gid].partitions:
                order = sorted(dropped, key=lambda c: -float(scores[gid][c]))
                trials = [{**out, gid: sorted(order[w - kept:])} for w in widths]
                seconds = self.group_seconds(gid, [out] + trials)
                best = [i for i, t in enumerate(seconds[1:]) if t <= seconds[0] * (1 + tolerance)]
                if best:
                    out[gid] = trials[best[-1]][gid]
            if not out[gid]:
                del out[gid]
            if bar is not None:
                bar.add(1)
        return out

    def _time(self, models: list) -> list:
        """`measure_interleaved(models)`, keeping the original's prepared runner for next time."""
        out = measure_interleaved(models, self.runtime, self.batch_size, self.threads,
                                  self.warmup, self.runs, prepared=self._prepared)
        for key in [k for k in self._prepared if k != id(self.model)]:
            del self._prepared[key]
        return out

    def measure(self, model: keras.Model | None = None) -> float:
        """Measured end-to-end seconds of `model` (default: the original) on this runtime."""
        return self._time([self.model if model is None else model])[0]

    def compare(self, model: keras.Model) -> float:
        """Measured seconds of `model` over the original's, the two timed interleaved.

        A ratio taken in one run is steadier than two measurements taken
        apart on a loaded machine; `kprune.prune(latency_target=...)` checks
        its result with it.
        """
        mine, theirs = self._time([self.model, model])
        return theirs / mine

    def layers(self) -> dict:
        """`{layer name: seconds at full width}` of the timed calls (summed over shared calls)."""
        out: dict = {}
        for c in self.calls:
            out[c.name] = out.get(c.name, 0.0) + c.full
        return out


# A calibrated `scale` is held within this range: beyond it the anchors' timings are noise.
_SCALE_RANGE = (0.25, 4.0)


def _check_anchors(anchors) -> tuple:
    if anchors is None:
        return ()
    try:
        shares = tuple(float(a) for a in anchors)
    except (TypeError, ValueError):
        raise KprunError(f"`anchors` holds kept shares in (0, 1); got {anchors!r}.") from None
    if any(not (0.0 < a < 1.0) for a in shares):
        raise KprunError(f"`anchors` holds kept shares in (0, 1); got {anchors!r}.")
    return shares


def _is_timed(layer) -> bool:
    return isinstance(layer, tuple(TIMED))


def _components(slots: list) -> list:
    """Connected sets of group ids: groups sharing a slot belong together."""
    comps: list = []
    for slot in slots:
        if not slot:
            continue
        touching = [c for c in comps if c & slot]
        merged = set(slot).union(*touching)
        comps = [c for c in comps if not (c & slot)] + [merged]
    return comps


# --------------------------------------------------------------------------
# `kprune.latency(model)` keeps timing a model, as `kprune.profile.latency`
# --------------------------------------------------------------------------
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _profile_latency(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["LatencyModel", "LatencyTable", "RUNTIMES", "TIMED", "TimedCall", "check_backend",
           "check_settings",
           "measure", "measure_interleaved", "register_timed", "tflite_bytes",
           "tflite_interpreter"]
