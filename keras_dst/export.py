"""Deployment: export a sparse model to LiteRT (TensorFlow Lite) or a TF SavedModel.

`export(model, "model.tflite")` strips the wrappers (`convert.strip`), writes the
plain model as a SavedModel (Keras's public ``model.export``), converts it with
the TensorFlow Lite converter (weights frozen to constants, builtin ops only)
with its sparsity optimisation (``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``),
optionally with full int8 quantisation, and returns an `ExportReport`: for
every sparsified weight, how the converter stored it and why, and the file size
against the same model converted without the sparsity optimisation.

What the converter does (TensorFlow 2.21, checked by tests/test_export.py):

* Only rank-2 FULLY_CONNECTED weights (Dense, EinsumDense and the projections
  of MultiHeadAttention) and rank-4 convolution filters (CONV_2D, DEPTHWISE_CONV_2D,
  TRANSPOSE_CONV; Conv1D runs as CONV_2D) are candidates. A weight with fewer
  than 30 % zeros stays dense.
* FULLY_CONNECTED has sparse kernels for blocks of 1x4 (float32) and 1x16
  (int8) consecutive entries along the input axis (TFLite stores the weight
  transposed, ``[out, in]``: the blocks run along its inner dimension, which is
  the Keras kernel's axis -2, keras_dst's ``"1xB"`` axis). When at least 90 %
  (int8: 80 %) of the zeros fall in all-zero blocks, the weight is stored
  block-sparse and the op runs the sparse kernel: faster, and smaller.
* Anything else (unstructured, N:M, fan-in, 1x4 under int8, every convolution)
  is stored compressed (CSR) and expanded to a dense tensor when the model
  loads (a DENSIFY op): smaller file, dense speed.
* Embedding (GATHER), CONV_3D and CONV_3D_TRANSPOSE weights are never compressed.
* Recurrent layers (SimpleRNN, GRU, LSTM, ConvLSTM) do not convert: their loop
  needs TensorList ops outside the builtin set (the error names the layer).

Storage is read back from the .tflite flatbuffer itself (the tensors'
``sparsity`` parameters and the DENSIFY ops), not predicted.

Converter / runtime defects handled (TF 2.21, ai-edge-litert 2.3):

* A very sparse weight whose blocked axis is not a multiple of the block (6
  inputs at density 0.02; an int8 weight whose input axis is not a multiple of
  16) is block-encoded as if padded and loses values: `_repair` stores such
  tensors dense, taken from the dense conversion (the report says so).
* XNNPACK (LiteRT's default CPU delegate) refuses int8 models with DENSIFY ops:
  `LiteRTModel` falls back to the builtin kernels, and the report notes it.
* Weight-only ("dynamic range") int8 with sparse weights computes wrong
  outputs: not offered (``quantize`` is None or "int8", full integer).

The runtime (`LiteRTModel`, `interpreter`) is the LiteRT interpreter of the
``ai-edge-litert`` package (``pip install "keras-dst[litert]"``): exporting
needs only TensorFlow; running and timing an export needs that package.
"""

import collections
import contextlib
import dataclasses
import math
import os
import re
import tempfile
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from keras_dst import compat, convert, distributions, patterns, user_warnings
from keras_dst import layers as sparse_layers
from keras_dst import masks as masks_lib
from keras_dst.validation import check_bool, check_choice, check_path, check_positive_int, errors_named

FORMATS = ("litert", "tf_saved_model")
QUANTIZE = (None, "int8")
# Ops whose constant weights the converter may compress, and the block each sparse kernel
# needs (float32, int8); None: no sparse kernel (the weight is densified at load).
_COMPRESSIBLE_OPS = {"FULLY_CONNECTED": (4, 16), "CONV_2D": None, "DEPTHWISE_CONV_2D": None,
                     "TRANSPOSE_CONV": None}
_MIN_ZEROS = 0.3  # the converter keeps weights with fewer zeros dense
_INSTALL_HINT = 'pip install "keras-dst[litert]" (the ai-edge-litert package)'

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- #
# The report
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class WeightExport:
    """How one weight was stored in an export.

    Attributes:
      layer: the Keras layer's name.
      weight: the weight's key in `keras_dst.masks` (its ``variable.path``, or its place in
        the model where two sparsified weights share a path).
      shape: the Keras weight's shape.
      pattern: its sparsity pattern ("unstructured", "1x4", ...; "dense" for a
        weight of a model without masks).
      density: fraction of non-zero entries of the exported weight.
      stored: "sparse (block 1xB)" (runs a sparse kernel), "densified (CSR)"
        (compressed in the file, expanded to dense at load), "dense", or
        "not found" (the converter changed its values beyond recognition).
      op: the TFLite op that computes with it ("" when not found / SavedModel).
      why: the reason, in words.
      stored_bytes: bytes of this weight in the file (values + index arrays);
        0 when not found.
    """

    layer: str
    weight: str
    shape: tuple
    pattern: str
    density: float
    stored: str
    op: str
    why: str
    stored_bytes: int = 0

    @property
    def sparse_kernel(self) -> bool:
        """True when the op runs a sparse kernel on this weight (block-sparse, not densified)."""
        return self.stored.startswith("sparse")


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export` wrote: the file, every sparsified weight's storage, and the sizes.

    Attributes:
      path: the written file (.tflite) or directory (SavedModel).
      format: "litert" or "tf_saved_model".
      quantize: None (float32) or "int8".
      weights: one `WeightExport` per sparsified weight (every prunable weight
        for a model without masks), in model order.
      file_bytes: size of the export (a SavedModel: the whole directory).
      dense_file_bytes: size of the same stripped model converted the same way
        without the sparsity optimisation (None when not measured / SavedModel).
      densify_ops: DENSIFY ops in the .tflite model (weights expanded at load).
      input_names: the exported model's input names in the Keras model's order
        (LiteRT: the .tflite signature's names, what `LiteRTModel.predict` takes in
        a dict; a list of inputs maps to them in this order).
      notes: things a deployment should know (printed under the table).
    """

    path: str
    format: str
    quantize: Optional[str]
    weights: List[WeightExport]
    file_bytes: int
    dense_file_bytes: Optional[int] = None
    densify_ops: int = 0
    input_names: List[str] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def size_ratio(self) -> Optional[float]:
        """file_bytes / dense_file_bytes (None without a dense export)."""
        return self.file_bytes / self.dense_file_bytes if self.dense_file_bytes else None

    @property
    def sparse_kernels(self) -> int:
        """How many weights run on a sparse kernel."""
        return sum(w.sparse_kernel for w in self.weights)

    def load(self, num_threads: Optional[int] = None,
             xnnpack: Optional[bool] = None) -> "LiteRTModel":
        """The exported .tflite model in the LiteRT interpreter (needs ai-edge-litert)."""
        if self.format != "litert":
            raise ValueError(f"ExportReport.load() runs LiteRT exports; this one is "
                             f"{self.format!r} (load it with tf.saved_model.load).")
        return LiteRTModel(self.path, input_names=self.input_names, num_threads=num_threads,
                           xnnpack=xnnpack)

    def __str__(self) -> str:
        kind = {None: "float32", "int8": "int8 weights and activations"}[self.quantize]
        title = (f"LiteRT export ({kind}): {self.path}" if self.format == "litert"
                 else f"TF SavedModel export: {self.path}")
        # (columns as wide as their longest entry: a nested layer's keys are long)
        wide = {name: max([least] + [len(str(getattr(w, name))) for w in self.weights])
                for name, least in (("layer", 22), ("weight", 30), ("shape", 18),
                                    ("pattern", 12), ("stored", 18), ("op", 18))}
        header = (f"{'layer':<{wide['layer']}} {'weight':<{wide['weight']}} "
                  f"{'shape':<{wide['shape']}} {'pattern':<{wide['pattern']}} {'density':>7} "
                  f"{'stored':<{wide['stored']}} {'op':<{wide['op']}} {'KB':>8}  why")
        lines = [title, header, "-" * len(header)]
        for w in self.weights:
            lines.append(f"{w.layer:<{wide['layer']}} {w.weight:<{wide['weight']}} "
                         f"{str(w.shape):<{wide['shape']}} {w.pattern:<{wide['pattern']}} "
                         f"{w.density:>7.4f} {w.stored:<{wide['stored']}} {w.op:<{wide['op']}} "
                         f"{w.stored_bytes / 1024:>8.1f}  {w.why}")
        lines.append("-" * len(header))
        size = f"file {_mb(self.file_bytes)}"
        if self.dense_file_bytes:
            size += (f", dense export {_mb(self.dense_file_bytes)} "
                     f"({self.size_ratio:.3f} x dense)")
        if self.format == "litert":
            size += (f"; {self.sparse_kernels} of {len(self.weights)} weights on sparse kernels, "
                     f"{self.densify_ops} DENSIFY ops")
        lines.append(size)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #


def export(model: keras.Model, filepath: PathLike, format: str = "litert", *,
           quantize: Optional[str] = None, representative_data: Any = None,
           calibration_steps: int = 100, compare_dense: bool = True, sparsity: bool = True,
           input_signature: Any = None) -> ExportReport:
    """Exports a (sparse) Keras model for deployment and reports what was stored sparse.

    The wrappers are stripped first (`keras_dst.strip`: every sparsified weight
    is written as kernel ⊙ mask). A subclassed model (its layers made with
    ``keras_dst.prunable(layer)``) cannot be stripped; it is exported as it is,
    after `keras_dst.apply_masks` (its wrappers compute with the stored kernel).

    * ``format="litert"``: a .tflite file, converted with the sparsity
      optimisation (``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``) and TFLite
      builtin ops only. Fast sparse kernels exist for FULLY_CONNECTED weights
      whose zeros come in 1x4 blocks along the input axis (``pattern="1x4"``;
      with ``quantize="int8"``: ``"1x16"``); other sparse weights make the file
      smaller but are expanded to dense when the model loads. See the module
      docstring and `ExportReport`.
      A mixed-precision model (``"mixed_float16"``, ``"mixed_bfloat16"``: float32
      variables, 16-bit computation) is converted computing in float32, with its
      float32 variables (LiteRT has no 16-bit float kernels for its layers); the
      report notes it, and the model keeps its policies.
    * ``format="tf_saved_model"``: a SavedModel directory (Keras's
      ``model.export(..., format="tf_saved_model")`` of the stripped model) for
      TensorFlow Serving; it stores and computes every weight dense.

    Args:
      model: a built Sequential, functional or subclassed `keras.Model`, with or
        without `SparseWrapper` layers.
      filepath: the .tflite file (litert; parent directories are created) or the
        SavedModel directory (tf_saved_model).
      format: "litert" or "tf_saved_model".
      quantize: None (float32) or "int8" (litert only: int8 weights and
        activations, float32 inputs and outputs; needs `representative_data`).
        Its outputs differ from the float model's by quantisation error: see
        README "Deploying a sparse model" for the tolerance.
      representative_data: calibration inputs for int8: an array (one input), a
        list/tuple of arrays (in the model's input order), a dict {input name:
        array}, or a `tf.data.Dataset` of such batches (or of (x, y) pairs).
      calibration_steps: how many single samples calibrate int8 (default 100).
      compare_dense: also convert the stripped model without the sparsity
        optimisation (same quantisation) to report the dense file size.
      sparsity: False writes that dense conversion itself (every weight
        stored dense; the baseline of a size or latency comparison).
      input_signature: passed to Keras's ``model.export`` (needed for a model whose
        input shapes or dtypes Keras cannot infer: a subclassed model taking int token
        ids is otherwise served with float32 inputs).

    Returns:
      An `ExportReport` (``print(report)`` gives the per-weight table).

    Raises:
      TypeError: `model` is not a Keras model, `filepath` is not a path, wrong
        argument types.
      ValueError: unknown `format` / `quantize`, a litert path not ending in
        ".tflite", int8 without `representative_data` (or it without int8, or of
        another shape than the model's inputs), quantize with
        tf_saved_model, an unbuilt model, a `filepath` that cannot be written (a
        directory for litert, a file for tf_saved_model, a path below a file: checked
        before converting), or a model the converter cannot convert (the message
        names the model and gives the converter's reason).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"export() needs a keras.Model, got model={type(model).__name__}.")
    with errors_named("export()"):
        filepath = check_path(filepath, "filepath")
    format = check_choice(format, FORMATS, "format")
    if quantize is not None:
        try:
            quantize = check_choice(quantize, [q for q in QUANTIZE if q is not None], "quantize")
        except ValueError:
            raise ValueError(f"quantize must be one of {list(QUANTIZE)}, got "
                             f"quantize={quantize!r}.") from None
    calibration_steps = check_positive_int(calibration_steps, "calibration_steps")
    compare_dense = check_bool(compare_dense, "compare_dense")
    sparsity = check_bool(sparsity, "sparsity")
    if format == "litert" and not filepath.endswith(".tflite"):
        raise ValueError(f"export(format='litert'): filepath must end with '.tflite', got "
                         f"filepath={filepath!r}.")
    if format == "tf_saved_model" and quantize is not None:
        raise ValueError(f"export(format='tf_saved_model') stores float32 weights; "
                         f"quantize={quantize!r} applies to format='litert'.")
    if quantize == "int8" and representative_data is None:
        raise ValueError("export(quantize='int8') needs representative_data: a few hundred "
                         "typical inputs to calibrate the activations' int8 ranges.")
    if quantize is None and representative_data is not None:
        raise ValueError("export(): representative_data calibrates quantize='int8'; without "
                         "quantize the export is float32 and would ignore it.")
    if not model.built:
        raise ValueError(f"export(): model '{model.name}' is not built; call it on data or "
                         "build it first.")
    _check_destination(filepath, format)

    plain, weights = _plain_model(model)
    input_names = [t.name for t in getattr(plain, "inputs", None) or []]
    if format == "tf_saved_model":
        _save(plain, filepath, input_signature)
        rows = [_row(w, "dense", "", "a SavedModel stores and computes every weight dense", 0)
                for w in weights]
        return ExportReport(filepath, format, None, rows, _saved_model_bytes(filepath),
                            input_names=input_names)

    with tempfile.TemporaryDirectory(prefix="keras_dst_export_") as saved:
        with _computing_in_float32(plain) as (mixed, hints):
            _save(plain, saved, input_signature)
        calibration = None
        if quantize == "int8":
            calibration = _calibration(representative_data, saved, input_names,
                                       calibration_steps)
        content = _convert(saved, model.name, sparsity, calibration, hints,
                           tied=_tied_tables(plain, weights))
        parsed = _parse(content)
        broken = _padded_block_tensors(parsed) if sparsity else {}
        dense = content if not sparsity else (
            _convert(saved, model.name, False, calibration, hints)
            if compare_dense or broken else None)
    repaired = {}
    if broken:
        content, repaired = _repair(parsed, _parse(dense), broken, model.name)
        parsed = _parse(content)
    dense_bytes = len(dense) if compare_dense else None
    exported = _signature_inputs(parsed)
    if sorted(input_names) != sorted(exported):  # the .tflite's names are what it takes
        input_names = exported
    constants, densify = _read_constants(parsed)  # read back before anything is written
    rows = _match(weights, constants, quantize, repaired, sparsity)
    os.makedirs(os.path.dirname(os.path.abspath(filepath)), exist_ok=True)
    with open(filepath, "wb") as f:
        f.write(content)
    notes = []
    if mixed:
        notes.append(f"computes in float32: the layers of mixed precision ({', '.join(mixed)}) "
                     "were exported with a float32 policy (LiteRT has no 16-bit float kernels "
                     "for them); their weights were float32 already")
    if not sparsity:
        notes.append("written without the sparsity optimisation (sparsity=False): every weight "
                     "is stored dense")
    if quantize == "int8" and densify:
        notes.append("an int8 model with DENSIFY ops: LiteRT's default XNNPACK delegate may "
                     "refuse it (it does for FULLY_CONNECTED weights); run it with the builtin "
                     "kernels (LiteRTModel falls back to them by itself; elsewhere: "
                     "OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)")
    return ExportReport(filepath, format, quantize, rows, len(content), dense_bytes, densify,
                        input_names, notes)


@dataclasses.dataclass
class _Weight:
    layer: str
    path: str
    pattern: patterns.Pattern
    value: np.ndarray
    has_mask: bool


def _plain_model(model):
    """(the model to export, [_Weight]): the stripped model and the values it exports."""
    targets = masks_lib.sparse_targets(model, caller="export()")
    if targets:
        weights = [_Weight(t.state.layer.name, t.key, t.pattern,
                           np.where(t.mask.numpy(), t.weight.numpy(), 0), True) for t in targets]
    else:
        weights = []
        for layer in _leaf_layers(model):
            if sparse_layers.needs_no_wrapping(layer) or not sparse_layers.is_supported(layer):
                continue
            weights += [_Weight(layer.name, w.path, patterns.UNSTRUCTURED, w.numpy(), False)
                        for w in sparse_layers.prunable_weights(layer)]
    if any(sparse_layers.attached_state(t.state.layer) is not None for t in targets):
        # masks attached in place: the layers compute with their (masked) kernels, and
        # `strip` would detach the caller's masks
        masks_lib.apply_masks(model)
        return model, weights
    try:
        plain = convert.strip(model)
    except TypeError:  # a subclassed model: its wrappers compute with the (masked) kernels
        if targets:
            masks_lib.apply_masks(model)
        plain = model
    return plain, weights


def _leaf_layers(model):
    return [layer for layer in compat.flatten_layers(model) if not isinstance(layer, keras.Model)]


def _save(model, directory, input_signature):
    if input_signature is None and not getattr(model, "inputs", None):
        input_signature = _named_dict_signature(model)
    try:
        model.export(directory, format="tf_saved_model", verbose=False,
                     input_signature=input_signature)
    except Exception as e:  # noqa: BLE001 - Keras raises many types; name the model
        raise ValueError(f"export(): Keras cannot export model '{model.name}' as a SavedModel "
                         f"(the first step of every format): {type(e).__name__}: "
                         f"{_first_lines(e)}") from e


def _named_dict_signature(model):
    """For a subclassed model called on one dict of tensors, the signature Keras infers
    with each input named by its key (Keras leaves them unnamed, and the .tflite inputs
    read ``args_0``, ``args_0_1``, ...); None (Keras infers it) for any other model."""
    try:
        inferred = compat.inferred_input_signature(model)
    except Exception:  # noqa: BLE001 - Keras's own export names the problem
        return None
    if len(inferred) != 1 or not isinstance(inferred[0], dict) or not all(
            isinstance(spec, keras.InputSpec) for spec in inferred[0].values()):
        return None
    return [{key: tf.TensorSpec(spec.shape, spec.dtype, name=key)
             for key, spec in inferred[0].items()}]


@contextlib.contextmanager
def _computing_in_float32(model):
    """Gives every layer of `model` with a mixed-precision policy (float32 variables,
    16-bit computation: "mixed_float16", "mixed_bfloat16") the "float32" policy while
    the block runs, then its own again. Yields ``(mixed, hints)``: the sorted names of
    the policies changed, and the text the converter's error adds about the layers
    LiteRT may have no kernels for (empty if none): those left computing in
    float16/bfloat16 (16-bit variables, or a DTypePolicyMap) and those quantized by
    Keras (``model.quantize``: its "int8" and "float8" layers do not convert).

    The LiteRT converter refuses float16/bfloat16 MatMul, BiasAdd, Relu, ... (no
    builtin kernel), and mixed precision is a way of training: the float32 variables
    are the model, so the export computes with them in float32.
    """
    changed, sixteen, quantized = [], [], []
    for layer in compat.flatten_layers(model, include_self=True):
        policy = layer.dtype_policy  # (a DTypePolicyMap, of a quantized model: left as it is)
        mode = getattr(policy, "quantization_mode", None)
        if mode is not None:
            quantized.append(f"'{layer.name}' ({mode})")
        elif (policy.variable_dtype == "float32" and policy.compute_dtype != "float32"
                and not isinstance(policy, keras.dtype_policies.DTypePolicyMap)):
            changed.append((layer, policy))
            layer.dtype_policy = "float32"
        elif layer.compute_dtype in ("float16", "bfloat16"):
            sixteen.append(f"'{layer.name}' ({policy.name})")
    hints = ""
    if sixteen:
        hints += (f". These layers compute in a 16-bit float type with 16-bit variables, "
                  f"which LiteRT has no kernels for: {', '.join(sorted(sixteen))}; build the "
                  "model in float32 or with a mixed policy (\"mixed_float16\": exported "
                  "computing in float32)")
    if quantized:
        hints += (f". These layers were quantized by Keras (model.quantize), whose int8 and "
                  f"float8 layers LiteRT cannot take: {', '.join(sorted(quantized))}; export "
                  "the float model instead, with export(..., quantize='int8', "
                  "representative_data=...) for an int8 LiteRT model")
    try:
        yield sorted({policy.name for _, policy in changed}), hints
    finally:
        for layer, policy in reversed(changed):
            layer.dtype_policy = policy


def _first_lines(error, n=6):
    lines = [line for line in str(error).splitlines() if line.strip()]
    return "\n".join(lines[:n]) + ("\n..." if len(lines) > n else "")


def _tied_tables(model, weights):
    """The names of `model`'s layers that read a sparse table twice: a `ReversibleEmbedding`
    with ``tie_weights=True`` (a language model's token embedding, also its output
    projection; keras-hub's GPT-2, OPT, Gemma, ...), whose table the LiteRT sparsity pass
    fails to encode (a gather and a fully connected op share the constant)."""
    tied = {layer.name for layer in compat.flatten_layers(model, include_self=True)
            if getattr(layer, "tie_weights", False) is True}
    return sorted({w.layer for w in weights
                   if w.layer in tied and w.has_mask and not np.all(w.value)})


def _convert(saved_model_dir, name, sparse, calibration, hints="", tied=()):
    """The .tflite bytes of the SavedModel; a converter failure is a ValueError naming the
    ops it could not convert, their layers, and `hints` (see `_computing_in_float32`);
    a failure of the sparsity optimisation alone names the `tied` layers (`_tied_tables`)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else []
    if calibration is not None:
        optimizations.append(tf.lite.Optimize.DEFAULT)
        converter.representative_dataset = calibration
    converter.optimizations = optimizations
    try:
        with warnings.catch_warnings():  # int8 calibration runs the deprecated tf.lite.Interpreter
            warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
            return converter.convert()
    except Exception as e:  # noqa: BLE001 - ConverterError and friends
        ops = sorted(set(re.findall(r"'tf\.(\w+)'", str(e))))
        where = {}  # op -> Keras layer names, from the converter's locations
        for op, scope in re.findall(r'fused\["(\w+):", "[^"/]+/([^"/]+)/', str(e)):
            where.setdefault(op, set()).add(re.sub(r"_\d+$", "", scope))
        named = [f"{op} (layer {', '.join(repr(n) for n in sorted(where[op]))})"
                 if op in where else op for op in ops]
        detail = (f"TensorFlow ops without a LiteRT builtin: {', '.join(named)}" if ops else
                  f"{type(e).__name__}: {_first_lines(e) or '(no message)'}")
        remedy = "Export it with format='tf_saved_model', or replace those layers."
        if sparse and not ops and _converts(saved_model_dir, name, calibration):
            detail = f"its sparsity optimisation fails ({detail})"
            remedy = ("Without it the model converts: export(..., sparsity=False) stores every "
                      "weight dense (or export it with format='tf_saved_model').")
            if tied:
                names = ", ".join(repr(n) for n in tied)
                detail += (f"; layer {names} reads its sparse table twice (tie_weights=True: "
                           "the embedding lookup and the output projection), which that pass "
                           "cannot encode")
                remedy += (f" For a sparse file, train with that table dense: "
                           f"keras_dst.prunable(..., keep_dense=[{names}]).")
        raise ValueError(f"export(format='litert'): the LiteRT converter cannot convert model "
                         f"'{name}': {detail}{hints}. {remedy}") from e


def _converts(saved_model_dir, name, calibration) -> bool:
    """Whether the SavedModel converts without the sparsity optimisation."""
    try:
        _convert(saved_model_dir, name, False, calibration)
    except ValueError:
        return False
    return True


def _calibration(data, saved_model_dir, input_names, steps):
    """A representative-dataset generator of `steps` single samples, keyed by input name
    (the converter's: the model's own names, which the SavedModel signature's keys make
    identifiers of, ``img-in`` → ``img_in``; its specs keep them)."""
    specs = tf.saved_model.load(saved_model_dir).signatures["serving_default"] \
        .structured_input_signature[1]
    specs = {spec.name or key: spec for key, spec in specs.items()}
    keys = list(specs)
    dtypes = {k: spec.dtype.as_numpy_dtype for k, spec in specs.items()}
    if isinstance(data, tf.data.Dataset):
        data = data.unbatch() if _is_batched(data) else data
        samples = [_inputs_only(s, len(keys)) for s in data.take(steps).as_numpy_iterator()]
        samples = [_keyed(s, keys, input_names, batched=False) for s in samples]
    else:
        keyed = _keyed(data, keys, input_names, batched=True)
        n = min(len(v) for v in keyed.values())
        samples = [{k: v[i] for k, v in keyed.items()} for i in range(min(n, steps))]
    if not samples:
        raise ValueError("export(): representative_data is empty.")
    for key, spec in specs.items():  # (a sample of another shape calibrated nothing, silently)
        for sample in samples:  # (converted once: the checks below and the generator)
            try:
                sample[key] = np.asarray(sample[key], dtypes[key])
            except (TypeError, ValueError):
                raise ValueError(
                    f"export(): representative_data for input '{key}' holds values of type "
                    f"{np.asarray(sample[key]).dtype} that are not "
                    f"{np.dtype(dtypes[key]).name}, the input's dtype.") from None
        shape = np.shape(samples[0][key])
        if not spec.shape[1:].is_compatible_with(shape):
            raise ValueError(
                f"export(): representative_data for input '{key}' has samples of shape "
                f"{shape}; the model takes inputs of shape {tuple(spec.shape)} (a batch of "
                f"samples of shape {tuple(spec.shape[1:])}).")
        if np.issubdtype(dtypes[key], np.floating):
            # (the converter's scales come from these ranges: an inf aborts the process,
            # a NaN leaves the model float32 without a word)
            bad = sum(not np.all(np.isfinite(s[key])) for s in samples)
            if bad:
                raise ValueError(
                    f"export(): representative_data for input '{key}' holds NaN or inf in "
                    f"{bad} of the {len(samples)} calibration samples; int8 calibration needs "
                    "finite inputs.")
    return _generator(samples)


def _inputs_only(element, n_inputs):
    """The inputs of a dataset element that may be (x, y) or (x, y, sample_weight)."""
    if isinstance(element, tuple) and len(element) in (2, 3) and (
            n_inputs == 1 or isinstance(element[0], (tuple, list, dict))):
        return element[0]
    return element


def _is_batched(dataset):
    spec = dataset.element_spec
    first = tf.nest.flatten(spec)[0]
    return first.shape.rank is not None and first.shape.rank >= 1 and first.shape[0] is None


def _generator(samples):
    """The converter's representative dataset: `samples` (arrays of the inputs' dtypes),
    each a batch of one."""
    def generate():
        for sample in samples:
            yield {k: v[None] for k, v in sample.items()}
    return generate


def _keyed(data, keys, input_names, batched):
    """{signature input name: array} from an array, a list (model input order) or a dict."""
    names = input_names if sorted(input_names) == sorted(keys) else keys  # the model's order
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(keys))
        if unknown or len(data) != len(keys):
            raise ValueError(f"export(): representative_data keys {sorted(data)} must be the "
                             f"model's input names {names}.")
        return {k: np.asarray(data[k]) for k in keys}
    if isinstance(data, (list, tuple)) and len(keys) > 1:
        if len(data) != len(keys):
            raise ValueError(f"export(): representative_data has {len(data)} arrays; the model "
                             f"has {len(keys)} inputs {names}.")
        return {name: np.asarray(v) for name, v in zip(names, data)}
    if len(keys) != 1:
        raise ValueError(f"export(): the model has {len(keys)} inputs {keys}; pass "
                         "representative_data as a list or dict of arrays.")
    array = np.asarray(data)
    if batched and array.ndim == 0:
        raise ValueError("export(): representative_data must be a batch of inputs (an array "
                         f"with a leading sample axis), got shape {array.shape}.")
    return {keys[0]: array}


def _check_destination(filepath, format):
    """Raises ValueError, before any conversion, where `filepath` cannot be written: a
    .tflite path that is a directory, a SavedModel path that is a file, a path below
    a file, or one the file system refuses (`_check_writable`)."""
    if format == "litert" and os.path.isdir(filepath):
        raise ValueError(f"export(): filepath={filepath!r} is a directory; give the .tflite "
                         "file's path.")
    if format == "tf_saved_model" and os.path.isfile(filepath):
        raise ValueError(f"export(format='tf_saved_model'): filepath={filepath!r} is a file; "
                         "a SavedModel is a directory.")
    path = os.path.abspath(filepath)
    directory = format == "tf_saved_model"  # (a SavedModel's path is a folder it makes)
    missing, above = [], path if directory else os.path.dirname(path)
    while not os.path.exists(above):
        missing.append(above)
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ValueError(f"export(): filepath={filepath!r} lies below {above!r}, a file.")
    _check_writable(filepath, directory, missing)


def _check_writable(filepath, directory: bool, missing):
    """Raises ValueError naming `filepath` where the file system refuses to write it (no
    permission, a name too long, a read-only or virtual file system), by making what an
    export makes there (the `missing` folders, listed deepest first, then the file, or a file in
    the SavedModel's directory) and removing it again: the disk is left as it was."""
    path = os.path.abspath(filepath)
    made = []
    try:
        for folder in reversed(missing):
            os.mkdir(folder)
            made.append(folder)
        if directory:
            fd, probe = tempfile.mkstemp(dir=path)
            os.close(fd)
            os.remove(probe)
        elif os.path.exists(path):
            with open(path, "ab"):  # (an existing file keeps its bytes)
                pass
        elif not os.path.lexists(path):  # (a dangling link: nothing made through it here)
            with open(path, "xb"):
                pass
            os.remove(path)
    except OSError as e:
        raise ValueError(f"export(): filepath={filepath!r} cannot be written: "
                         f"{e.strerror or e}.") from None
    finally:
        for folder in reversed(made):
            try:
                os.rmdir(folder)
            except OSError:
                pass


def _saved_model_bytes(path):
    """The bytes of the SavedModel in directory `path`: its own files (``saved_model.pb``,
    ``fingerprint.pb``, ``variables/``, ``assets/``, ``assets.extra/``), not the others a
    directory that existed before may hold."""
    total = 0
    for entry in ("saved_model.pb", "fingerprint.pb", "variables", "assets", "assets.extra"):
        entry = os.path.join(path, entry)
        if os.path.isfile(entry):
            total += os.path.getsize(entry)
        for root, _, files in os.walk(entry):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


# --------------------------------------------------------------------------- #
# Reading the flatbuffer
# --------------------------------------------------------------------------- #


def _parse(content: bytes):
    """The .tflite flatbuffer `content` as the schema's object tree (`ModelT`), which the
    readers below take: parsed once per file."""
    return compat.tflite_schema().ModelT.InitFromPackedBuf(content, 0)


_DTYPES = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT8": np.int8, "UINT8": np.uint8,
           "INT16": np.int16, "INT32": np.int32, "INT64": np.int64}


@dataclasses.dataclass
class _Constant:
    graph: int
    index: int
    name: str
    shape: tuple
    ops: List[str]
    densified: bool
    block: int  # block size of a block-sparse encoding, 1 for CSR, 0 for dense
    values: np.ndarray  # dense, dequantised, in TFLite's layout
    scale: float  # largest quantisation step (0 for float)
    nbytes: int


def _read_constants(model):
    """([_Constant] of every constant operator input, number of DENSIFY ops) of a parsed
    .tflite `model` (`_parse`)."""
    schema = compat.tflite_schema()
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    codes = [op_names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "CUSTOM")
             for c in model.operatorCodes]
    constants, densify = [], 0
    for g, graph in enumerate(model.subgraphs):
        consumers = {}
        for op in graph.operators:
            for i in (op.inputs if op.inputs is not None else []):
                consumers.setdefault(int(i), []).append((codes[op.opcodeIndex], op))
        seen = set()
        for op in graph.operators:
            if codes[op.opcodeIndex] == "DENSIFY":
                densify += 1
            for i in (op.inputs if op.inputs is not None else []):
                i = int(i)
                if i < 0 or i in seen:
                    continue
                tensor = graph.tensors[i]
                buffer = model.buffers[tensor.buffer] if tensor.buffer else None
                empty = buffer is None or buffer.data is None or len(buffer.data) == 0
                if empty and tensor.sparsity is None:  # not a constant
                    continue
                seen.add(i)
                dtype = _DTYPES.get(type_names.get(tensor.type))
                if dtype is None:
                    continue
                ops, densified = [], False
                for code, user in consumers.get(i, []):
                    if code == "DENSIFY":
                        densified = True
                        ops += [c for c, _ in consumers.get(int(user.outputs[0]), [])]
                    else:
                        ops.append(code)
                data = b"" if empty else bytes(buffer.data)  # a sparse all-zero weight: empty
                constants.append(_decode(tensor, np.frombuffer(data, dtype=dtype),
                                         g, i, ops, densified))
    return constants, densify


def _signature_inputs(model):
    """The input names of a parsed .tflite `model`'s signature, in the order of its
    graph's inputs (the Keras model's order; the signature itself lists them sorted)."""
    if not model.signatureDefs:
        return []
    signature = model.signatureDefs[0]
    graph_inputs = [int(i) for i in model.subgraphs[signature.subgraphIndex].inputs]
    named = [(graph_inputs.index(int(t.tensorIndex)) if int(t.tensorIndex) in graph_inputs
              else len(graph_inputs), t.name.decode() if isinstance(t.name, bytes) else t.name)
             for t in signature.inputs or []]
    return [name for _, name in sorted(named)]


def _decode(tensor, stored, graph, index, ops, densified):
    shape = tuple(int(d) for d in tensor.shape)
    sparsity = tensor.sparsity
    nbytes = stored.nbytes
    block = 0
    if sparsity is None:
        dense = stored.reshape(shape)
    else:
        coords, order, index_bytes, block = _sparse_positions(shape, sparsity)
        nbytes += index_bytes
        dense = np.zeros(shape, stored.dtype)
        dense[coords] = stored[order]
    values, scale = _dequantize(dense, tensor.quantization)
    return _Constant(graph, index, _name(tensor), shape, ops, densified, block, values, scale,
                     int(nbytes))


def _vector(v):
    return np.zeros(0, np.int64) if v is None or v.values is None else \
        np.asarray(v.values, dtype=np.int64)


def _sparse_positions(shape, sparsity):
    """(coordinates, value index, index bytes, block size) of a sparse tensor's stored values.

    The TFLite sparse format: the dimensions, with one block dimension per
    entry of `blockMap` appended, are traversed in `traversalOrder`; the
    metadata of each level (in traversal order) is DENSE (``denseSize``
    entries) or SPARSE_CSR (``arraySegments`` / ``arrayIndices`` over the
    previous level's positions); block dimension k splits dimension
    ``blockMap[k]``. Returns a tuple of index arrays (one per dimension) of the
    stored values, the index into the stored values of each, the bytes of the
    index arrays, and the block size (1 without blocks).
    """
    order = [int(d) for d in sparsity.traversalOrder]
    block_map = [int(d) for d in (sparsity.blockMap if sparsity.blockMap is not None else [])]
    meta = sparsity.dimMetadata
    rank = len(shape)
    pos = np.zeros(1, np.int64)  # position in the current level (the last: in the values)
    coords = np.zeros((1, len(order)), np.int64)
    index_bytes = 0
    for level, dim in enumerate(order):
        m = meta[level]
        if m.format == 0:  # DENSE
            k = int(m.denseSize)
            count = len(pos)
            pos = (pos[:, None] * k + np.arange(k)).ravel()
            coords = np.repeat(coords, k, axis=0)
            coords[:, dim] = np.tile(np.arange(k), count)
        else:  # SPARSE_CSR
            segments, indices = _vector(m.arraySegments), _vector(m.arrayIndices)
            index_bytes += _vector_bytes(m.arraySegments) + _vector_bytes(m.arrayIndices)
            starts, counts = segments[pos], segments[pos + 1] - segments[pos]
            pos = np.arange(int(counts.sum())) + np.repeat(starts - (np.cumsum(counts) - counts),
                                                          counts)
            coords = np.repeat(coords, counts, axis=0)
            coords[:, dim] = indices[pos]
    sizes = {rank + k: int(meta[order.index(rank + k)].denseSize) for k in range(len(block_map))}
    out = [coords[:, d] for d in range(rank)]
    for k, d in enumerate(block_map):
        out[d] = out[d] * sizes[rank + k] + coords[:, rank + k]
    block = sizes[rank] if block_map else 1
    # a dimension that is not a multiple of its block is padded (with zeros) up to one
    inside = np.all([c < n for c, n in zip(out, shape)], axis=0) if rank else np.ones(1, bool)
    return tuple(c[inside] for c in out), pos[inside], index_bytes, block


def _vector_bytes(v):
    if v is None or v.values is None:
        return 0
    return int(np.asarray(v.values).nbytes)


def _dequantize(values, quantization):
    if values.dtype.kind == "f":
        return values.astype(np.float32), 0.0
    scale = None if quantization is None else quantization.scale
    if scale is None or len(scale) == 0:
        return values.astype(np.float32), 0.0
    scale = np.asarray(scale, np.float32)
    zero = np.asarray(quantization.zeroPoint if quantization.zeroPoint is not None else [0],
                      np.float32)
    if scale.size > 1:
        axis = int(quantization.quantizedDimension)
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.size > 1 else zero
    return ((values.astype(np.float32) - zero) * scale).astype(np.float32), float(np.max(scale))


def _padded_block_tensors(model):
    """{(subgraph, tensor index): (dimension, block)} of the block-sparse tensors whose
    blocked dimension is not a multiple of the block.

    The converter (TF 2.21) block-encodes such a weight as if the dimension were
    padded but stores only part of its values: the model computes wrong
    outputs (seen for FULLY_CONNECTED weights with 6 inputs at density 0.02, 22
    inputs at 0.01, and int8 weights whose input axis is not a multiple of 16).
    `_repair` stores them dense. `model`: the parsed .tflite (`_parse`).
    """
    broken = {}
    for g, graph in enumerate(model.subgraphs):
        for i, tensor in enumerate(graph.tensors):
            sparsity = tensor.sparsity
            if sparsity is None or sparsity.blockMap is None or not len(sparsity.blockMap):
                continue
            order = [int(d) for d in sparsity.traversalOrder]
            rank = len(tensor.shape)
            for k, d in enumerate(int(d) for d in sparsity.blockMap):
                block = int(sparsity.dimMetadata[order.index(rank + k)].denseSize)
                if int(tensor.shape[d]) % block:
                    broken[(g, i)] = (int(tensor.shape[d]), block)
    return broken


def _name(tensor):
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def _repair(model, dense, broken, model_name):
    """The .tflite content of `model` (parsed, `_parse`; changed in place) with every
    tensor of `broken` replaced by the same weight of `dense` (the model converted
    without sparsity, parsed), and `broken` itself.

    The dense twin of a broken tensor is the constant of the dense model with
    the same subgraph, shape and type (tensor names differ between the two
    conversions); among several, the one that holds every value the broken
    encoding kept.
    """
    import flatbuffers  # a TensorFlow dependency

    schema = compat.tflite_schema()
    kept = {(c.graph, c.index): c for c in _read_constants(model)[0]}
    twins = _read_constants(dense)[0]
    shared = collections.Counter(t.buffer for graph in model.subgraphs for t in graph.tensors)
    for (g, i), (dim, block) in broken.items():
        tensor, part = model.subgraphs[g].tensors[i], kept.get((g, i))
        shape = tuple(int(d) for d in tensor.shape)
        found = [c for c in twins if c.graph == g and c.shape == shape and
                 dense.subgraphs[g].tensors[c.index].type == tensor.type]
        if len(found) > 1 and part is not None:  # the one holding the values it kept
            values = part.values[part.values != 0]
            found = [c for c in found if np.isin(values, c.values).all()]
        if len(found) != 1:
            raise ValueError(
                f"export(format='litert'): the converter block-encoded weight '{_name(tensor)}' "
                f"of model '{model_name}' across an axis of {dim} entries, not a multiple of its "
                f"block ({block}), which loses values, and keras_dst could not find it in the "
                "dense conversion to store it dense instead. Keep that layer dense "
                "(prunable(..., keep_dense=[...])) or give it a 1x4 pattern.")
        source = dense.subgraphs[g].tensors[found[0].index]
        tensor.sparsity = None
        tensor.quantization = source.quantization
        data = dense.buffers[source.buffer].data
        if shared[tensor.buffer] > 1:  # e.g. two all-zero weights, one empty buffer
            shared[tensor.buffer] -= 1
            buffer = schema.BufferT()
            buffer.data = data
            model.buffers.append(buffer)
            tensor.buffer = len(model.buffers) - 1
        else:
            model.buffers[tensor.buffer].data = data
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), dict(broken)


# --------------------------------------------------------------------------- #
# Matching Keras weights to the converted constants
# --------------------------------------------------------------------------- #


def _match(weights, constants, quantize, repaired=None, sparsity=True):
    """A `WeightExport` per weight, from the constant that holds its values.

    The converter transposes and reshapes weights (a Dense kernel [in, out]
    becomes FULLY_CONNECTED's [out, in], a Conv2D kernel [h, w, in, out] becomes
    [out, h, w, in]), so the match is layout-free: same number of entries and
    the same sorted values (int8: within half a quantisation step). A weight
    the converter also rescaled (a BatchNormalization folded into a
    convolution) is matched by its number of entries and of zeros instead.
    """
    repaired = repaired or {}
    by_size = {}
    for c in constants:
        by_size.setdefault(c.values.size, []).append(c)
    used, rows, unmatched = set(), [None] * len(weights), []
    for k, w in enumerate(weights):
        flat = np.sort(w.value.astype(np.float32).ravel())
        tol = 1e-6 * max(1.0, float(np.max(np.abs(flat)))) if flat.size else 0.0
        for c in by_size.get(w.value.size, []):
            if (c.graph, c.index) in used:
                continue
            limit = tol + 0.5001 * c.scale
            if np.max(np.abs(np.sort(c.values.ravel()) - flat), initial=0.0) <= limit:
                used.add((c.graph, c.index))
                rows[k] = _describe(w, c, quantize, False, repaired.get((c.graph, c.index)),
                                    sparsity)
                break
        else:
            unmatched.append(k)
    for k in unmatched:
        w = weights[k]
        zeros = int(np.count_nonzero(w.value == 0))
        for c in by_size.get(w.value.size, []):
            if (c.graph, c.index) not in used and int(np.count_nonzero(c.values == 0)) == zeros:
                used.add((c.graph, c.index))
                rows[k] = _describe(w, c, quantize, True, repaired.get((c.graph, c.index)),
                                    sparsity)
                break
        else:
            rows[k] = _row(w, "not found", "", "no constant of the converted model holds its "
                           "values (the converter rescaled or split them)", 0)
    return rows


def _row(w, stored, op, why, nbytes):
    total = w.value.size
    density = distributions.density_of(np.count_nonzero(w.value), total)
    return WeightExport(w.layer, w.path, tuple(w.value.shape),
                        str(w.pattern) if w.has_mask else "dense", density, stored, op, why,
                        int(nbytes))


def _percent_down(fraction: float) -> str:
    """`fraction` as a percentage rounded down to 0.1 (0.297 -> "29.7%", never "30%" for a
    weight under the converter's 30 % threshold)."""
    return f"{math.floor(fraction * 1000 + 1e-9) / 10:g}%"


def _describe(w, c, quantize, folded, repaired, sparsity):
    op = "/".join(sorted(set(c.ops))) or "?"
    kind = "int8" if quantize == "int8" else "float32"
    blocks = _COMPRESSIBLE_OPS.get(op)
    need = None if blocks is None else blocks[quantize == "int8"]
    zeros = 1.0 - np.count_nonzero(c.values) / max(c.values.size, 1)
    note = " (values rescaled by the converter, e.g. a folded BatchNormalization)" if folded else ""
    if c.block > 1 and not c.densified:
        stored = f"sparse (block 1x{c.block})"
        if w.pattern.kind == "block" and w.pattern.block % c.block == 0:
            why = (f"its 1x{w.pattern.block} blocks along the input axis are whole 1x{c.block} "
                   f"blocks: {op} runs its sparse kernel")
        else:
            nonzero = int(np.count_nonzero(c.values))
            share = 80 if quantize == "int8" else 90
            why = (f"its zeros fill >= {share} % of the 1x{c.block} blocks, so the converter "
                   f"block-encoded it (zeros inside active blocks stored; {nonzero} non-zeros): "
                   f"{op} runs its sparse kernel")
    elif c.block > 0:
        stored = "densified (CSR)" if c.block == 1 else f"densified (block 1x{c.block})"
        if need is None:
            why = (f"{op} has no sparse kernel: compressed in the file, expanded to dense when "
                   "the model loads (DENSIFY): smaller, dense speed")
        elif w.pattern.kind == "block" and w.pattern.block % 4 == 0 and w.pattern.block % need:
            why = (f"the {kind} sparse {op} kernel needs 1x{need} blocks; 1x{w.pattern.block} "
                   "are not: compressed, expanded to dense at load (DENSIFY): smaller, dense "
                   "speed")
        else:
            zeros = _block_zeros(c.values, need)
            threshold = 80 if quantize == "int8" else 90
            if zeros is None and c.values.ndim == 2 and c.values.shape[1] % need:
                detail = (f"its input axis of {c.values.shape[1]} is not a multiple of {need}, "
                          "so it holds no such blocks")
            elif zeros is None:
                detail = "its zeros are not in such blocks"
            else:
                in_blocks, outside = zeros
                detail = (f"only {_percent_down(in_blocks / (in_blocks + outside))} of its "
                          "zeros fill such "
                          f"blocks (the converter needs > {threshold} %")
                if w.pattern.kind == "block" and w.pattern.block % need == 0:
                    # the masks' zeros fill whole blocks: the others are active weights
                    detail += (f"; {outside} active weights are 0: int8 rounding set small ones "
                               "to 0" if quantize == "int8" else
                               f"; {outside} active weights are exactly 0, e.g. regrown at 0 and "
                               "given no gradient since (an input that stays 0)")
                detail += ")"
            why = (f"the {kind} sparse {op} kernel runs on all-zero 1x{need} blocks, but "
                   f"{detail}: compressed, expanded to dense at load (DENSIFY): smaller, "
                   "dense speed")
    else:
        stored = "dense"
        if not sparsity:
            why = "written without the sparsity optimisation (sparsity=False)"
        elif repaired:
            why = (f"the converter block-encoded it with 1x{repaired[1]} blocks across an axis of "
                   f"{repaired[0]} (not a multiple), which loses values; keras_dst stored it "
                   "dense instead")
        elif not any(o in _COMPRESSIBLE_OPS for o in set(c.ops)):
            why = (f"{op} weights are never compressed (only FULLY_CONNECTED and 2-D "
                   "convolution weights are)")
        elif zeros < _MIN_ZEROS:
            why = (f"{_percent_down(zeros)} zeros: the converter keeps weights with < 30 % "
                   "zeros dense")
        elif op not in _COMPRESSIBLE_OPS:  # (read by several ops: a tied table)
            never = "/".join(o for o in sorted(set(c.ops)) if o not in _COMPRESSIBLE_OPS)
            why = (f"read by {op.replace('/', ' and ')}: " + (
                f"{never} weights are never compressed (only FULLY_CONNECTED and 2-D "
                "convolution weights are)" if never else "kept dense by the converter"))
        else:
            why = "kept dense by the converter"
    return _row(w, stored, op, why + note, c.nbytes)


def _block_zeros(values, block):
    """``(in blocks, outside)``: how many zeros of a rank-2 [out, in] weight lie in all-zero
    1x`block` blocks along `in`, and how many do not (their ratio to all zeros is the
    converter's block-over-random sparsity ratio); None when it does not apply (another
    rank, `in` not a multiple of `block`, no zeros)."""
    if values.ndim != 2 or values.shape[1] % block:
        return None
    zeros = np.count_nonzero(values == 0)
    if not zeros:
        return None
    blocks = values.reshape(values.shape[0], -1, block)
    in_blocks = int(np.count_nonzero(np.all(blocks == 0, axis=-1))) * block
    return in_blocks, zeros - in_blocks


# --------------------------------------------------------------------------- #
# The runtime
# --------------------------------------------------------------------------- #


def interpreter(model_path: Optional[PathLike] = None, *, model_content: Optional[bytes] = None,
                num_threads: Optional[int] = None, xnnpack: bool = True):
    """A LiteRT interpreter (``ai_edge_litert.interpreter.Interpreter``) for a .tflite model.

    The one place that picks the runtime. LiteRT (the ``ai-edge-litert``
    package, the ``litert`` extra) rather than ``tf.lite.Interpreter``: the
    latter is deprecated (it warns at every construction and is scheduled for
    removal from TensorFlow), while LiteRT is the runtime that ships on devices,
    has no TensorFlow dependency, and runs the same kernels (both give the same
    outputs and the same speed on these models).

    Args:
      model_path: a .tflite file (or `model_content`: its bytes).
      num_threads: CPU threads (None: the runtime's default).
      xnnpack: apply the default XNNPACK delegate (the runtime's default; it
        runs dense float ops faster and leaves block-sparse FULLY_CONNECTED ops
        to the builtin sparse kernels). False: builtin kernels only.

    Raises:
      ImportError: ai-edge-litert is not installed (the message says how to install it).
    """
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError as e:
        raise ImportError(f"Running a LiteRT model needs the LiteRT runtime: {_INSTALL_HINT}.") \
            from e
    resolver = (litert.OpResolverType.AUTO if xnnpack
                else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return litert.Interpreter(model_path=None if model_path is None else os.fspath(model_path),
                              model_content=model_content, num_threads=num_threads,
                              experimental_op_resolver_type=resolver)


def _fits(signature: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether `shape` fits a LiteRT tensor's shape signature (-1: any size)."""
    return len(shape) == len(signature) and all(s < 0 or s == d for s, d in zip(signature, shape))


class LiteRTModel:
    """An exported .tflite model in the LiteRT interpreter, with `predict` and timing.

    Args:
      model: a .tflite path or its bytes.
      input_names: the model's input names in the order a list of inputs maps
        to; by default the order of the .tflite graph's inputs, which is the Keras
        model's (`ExportReport.input_names`). They must name the file's inputs.
      num_threads: see `interpreter` (``from keras_dst.export import interpreter``).
      xnnpack: True: the XNNPACK delegate (an error if it refuses the model);
        False: builtin kernels only; None (default): XNNPACK unless it refuses
        the model (it cannot run int8 models with DENSIFY ops), then builtin
        kernels with a warning. `xnnpack` (attribute) says which ran.
    """

    def __init__(self, model: Union[PathLike, bytes, bytearray], input_names: Optional[Sequence[str]] = None,
                 num_threads: Optional[int] = None, xnnpack: Optional[bool] = None):
        content = bytes(model) if isinstance(model, (bytes, bytearray)) else None
        with errors_named("LiteRTModel"):
            path = None if content is not None else check_path(model, "model")
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(
                    f"LiteRTModel: model={path!r} is " + ("a directory" if os.path.isdir(path)
                                                          else "no file") +
                    "; it takes a .tflite file, or its bytes.")
            if (path is not None and not os.path.getsize(path)) or content == b"":
                shown = repr(path) if path is not None else "b''"
                raise ValueError(f"model={shown} is empty (a .tflite file, or its bytes).")
            if num_threads is not None:
                num_threads = check_positive_int(num_threads, "num_threads")
            if xnnpack is not None:
                xnnpack = check_bool(xnnpack, "xnnpack")
        self._source = (path, content, num_threads)
        self._automatic = xnnpack is None
        self.interpreter = interpreter(path, model_content=content, num_threads=num_threads,
                                       xnnpack=xnnpack is not False)
        self.xnnpack = xnnpack is not False
        self._on_builtin_kernels_if_refused(lambda: self.interpreter.allocate_tensors())
        # A signature runner holds a reference to the interpreter's core, which makes the
        # interpreter refuse to resize (see `prepare`): one is made per `predict` call.
        runner = self.interpreter.get_signature_runner()
        details = runner.get_input_details()
        # The signature lists its inputs by name; the graph's inputs keep the model's order.
        position = {d["index"]: k for k, d in enumerate(self.interpreter.get_input_details())}
        in_order = sorted(details, key=lambda name: position.get(details[name]["index"], 0))
        if input_names is None:
            self.input_names = in_order
        else:
            if isinstance(input_names, str) or sorted(input_names) != sorted(details):
                raise ValueError(f"LiteRTModel: input_names={input_names!r} does not name the "
                                 f"model's inputs {in_order} (in the model's order).")
            self.input_names = list(input_names)
        self._inputs = details
        names = list(runner.get_output_details())
        # Keras names a list's outputs output_0, output_1, ... and a dict's by their keys.
        self._outputs_by_name = not all(re.fullmatch(r"output_\d+", n) for n in names)
        self.output_names = sorted(names) if self._outputs_by_name else sorted(
            names, key=lambda n: int(n[len("output_"):]))
        del runner

    def _feed(self, x) -> Dict[str, np.ndarray]:
        if isinstance(x, dict):
            missing = sorted(set(self.input_names) - set(x))
            if missing:
                raise ValueError(f"LiteRTModel: inputs {missing} are missing.")
            extra = sorted(set(x) - set(self.input_names), key=str)
            if extra:  # (as Keras's predict: a warning, the rest is computed)
                user_warnings.warn(f"LiteRTModel: inputs {extra} are not the model's "
                                   f"({self.input_names}) and are ignored.")
            items = {k: x[k] for k in self.input_names}
        elif isinstance(x, (list, tuple)) and len(self.input_names) > 1:
            if len(x) != len(self.input_names):
                raise ValueError(f"LiteRTModel: {len(x)} inputs given, the model has "
                                 f"{len(self.input_names)} ({self.input_names}).")
            items = dict(zip(self.input_names, x))
        else:
            if len(self.input_names) != 1:
                raise ValueError(f"LiteRTModel: the model has inputs {self.input_names}; pass a "
                                 "list (in that order) or a dict.")
            if isinstance(x, (list, tuple)) and len(x) == 1:  # as Keras: [x] is x
                x = x[0]
            items = {self.input_names[0]: x}
        feed = {}
        for name, value in items.items():
            detail = self._inputs[name]
            try:
                array = np.asarray(value, dtype=detail["dtype"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"LiteRTModel: input '{name}' is not an array of numbers: "
                                 f"{e}") from e
            expected = [int(d) for d in detail["shape_signature"]]  # -1: any size (the batch)
            if not _fits([-1] + expected[1:], array.shape):
                shown = tuple(None if e < 0 else e for e in expected)
                raise ValueError(f"LiteRTModel: input '{name}' has shape {array.shape}; the model "
                                 f"takes a batch of shape {shown}.")
            feed[name] = array
        sizes = {name: len(array) for name, array in feed.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"LiteRTModel: the inputs hold different numbers of samples: {sizes}.")
        if not next(iter(sizes.values())):
            shapes = {name: array.shape for name, array in feed.items()}
            raise ValueError(f"LiteRTModel: no samples (inputs of shapes {shapes}).")
        return feed

    def predict(self, x: Any, batch_size: int = 32
                ) -> Union[np.ndarray, List[np.ndarray], Dict[str, np.ndarray]]:
        """Outputs for a batch of inputs (array, list or dict), computed `batch_size` at a time.

        Returns what Keras's ``predict`` returns: one array for a single output, a list
        in the model's order for a list of outputs, a dict by output name for a model
        whose outputs are a dict.
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        feed = self._feed(x)
        joined = self._on_builtin_kernels_if_refused(self._run, feed, batch_size)
        if self._outputs_by_name:
            return joined
        return joined[self.output_names[0]] if len(joined) == 1 else list(joined.values())

    def _run(self, feed, batch_size):
        """{output name: outputs for `feed`}, `batch_size` samples per invocation."""
        n = len(next(iter(feed.values())))
        outputs = {name: [] for name in self.output_names}
        runner = self.interpreter.get_signature_runner()
        for start in range(0, n, batch_size):
            result = runner(**{k: v[start:start + batch_size] for k, v in feed.items()})
            for name in self.output_names:
                outputs[name].append(np.array(result[name], copy=True))
        del runner, result
        return {name: np.concatenate(arrays) for name, arrays in outputs.items()}

    def _on_builtin_kernels_if_refused(self, run, *args):
        """``run(*args)``; with ``xnnpack=None``, where the XNNPACK delegate refuses the
        model (at allocation, or at the first invocation of a shape: int8 models with
        DENSIFY ops), the interpreter switches to the builtin kernels, with a warning, and
        `run` runs again."""
        try:
            return run(*args)
        except RuntimeError as e:
            if not (self._automatic and self.xnnpack and "XNNPack" in str(e)):
                raise
            user_warnings.warn(f"LiteRTModel: the XNNPACK delegate refused this model ({e}); "
                               "running it with the builtin kernels.")
            path, content, num_threads = self._source
            self.interpreter = interpreter(path, model_content=content, num_threads=num_threads,
                                           xnnpack=False)
            self.xnnpack = False
            return run(*args)  # reads self.interpreter again

    def prepare(self, batch_size: int = 1, seed: int = 0,
                shapes: Optional[Mapping[str, Sequence[int]]] = None) -> None:
        """Resizes the inputs to `batch_size`, fills them with random data, runs once.

        Call it before `time_invoke` (which times the inputs set here).

        Args:
          batch_size: samples per invocation.
          seed: seed of the random inputs (integer inputs are zeros).
          shapes: ``{input name: shape of one sample}`` for inputs with dimensions
            of unknown size besides the batch (a sequence length:
            ``{"tokens": (128,)}``); their other dimensions must match the model's.
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        if shapes is None:
            shapes = {}
        if not isinstance(shapes, Mapping):
            raise TypeError(f"LiteRTModel.prepare: shapes must be a dict {{input name: shape}}, "
                            f"got shapes={shapes!r}.")
        unknown = sorted(set(shapes) - set(self.input_names))
        if unknown:
            raise ValueError(f"LiteRTModel.prepare: shapes names unknown inputs {unknown}; the "
                             f"inputs are {self.input_names}.")
        sizes, unsized = {}, {}  # input tensor index -> shape, all checked before any change
        for name in self.input_names:
            detail = self._inputs[name]
            signature = [int(s) for s in detail["shape_signature"][1:]]
            shown = tuple(None if s < 0 else s for s in signature)
            sample = signature
            if name in shapes:
                given = shapes[name]
                if not isinstance(given, (tuple, list)) or not _fits(signature, given):
                    raise ValueError(f"LiteRTModel.prepare: shapes['{name}'] = {given!r}; a "
                                     f"sample of input '{name}' has shape {shown}.")
                sample = [check_positive_int(g, f"shapes['{name}'][{i}]")
                          for i, g in enumerate(given)]
            if any(s < 0 for s in sample):
                unsized[name] = shown
            sizes[detail["index"]] = [batch_size] + sample
        if unsized:
            shown = ", ".join(f"'{name}' {shape}" for name, shape in unsized.items())
            example = ", ".join(f"'{name}': (...)" for name in unsized)
            raise ValueError(f"LiteRTModel.prepare: samples of inputs {shown} have sizes unknown "
                             f"besides the batch; give them with shapes={{{example}}}.")
        self._on_builtin_kernels_if_refused(self._fill_and_invoke, sizes, seed)

    def _fill_and_invoke(self, sizes, seed):
        """Resizes the inputs (tensor index -> shape), fills them randomly, invokes once."""
        rng = np.random.default_rng(seed)
        it = self.interpreter
        for index, shape in sizes.items():
            it.resize_tensor_input(index, shape)
        it.allocate_tensors()
        for d in it.get_input_details():
            if np.issubdtype(d["dtype"], np.floating):
                value = rng.normal(size=d["shape"]).astype(d["dtype"])
            else:
                value = np.zeros(d["shape"], d["dtype"])
            it.set_tensor(d["index"], value)
        it.invoke()  # first run: DENSIFY and delegate set-up happen here

    def time_invoke(self, runs: int = 100) -> float:
        """Mean wall time (s) of `runs` invocations on the inputs of the last `prepare`."""
        runs = check_positive_int(runs, "runs")
        invoke = self.interpreter.invoke
        start = time.perf_counter()
        for _ in range(runs):
            invoke()
        return (time.perf_counter() - start) / runs
