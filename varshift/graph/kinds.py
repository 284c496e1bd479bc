"""What varshift recognizes, as plain data, and the few functions that match against it.

Regularizers and norms are recognized by class (or function) *name*, looking through the
class's MRO, so third-party layers (torchvision's ``StochasticDepth``, timm's ``DropPath`` and
``DropBlock2d``, timm's ``BatchNormAct2d``) are found without importing their libraries.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

# Regularizer kinds. The predicted variance shift of each is in ``predicted_shift``.
DROPOUT = "dropout"
CHANNEL_DROPOUT = "channel_dropout"
ALPHA_DROPOUT = "alpha_dropout"
DROP_PATH = "drop_path"
DROPBLOCK = "dropblock"
UOUT = "uout"
#: found by what it does, not by name: a value drawn at random only in training that
#: multiplies, masks or shifts the data path (inline drop-path / drop-connect), or random
#: control flow in training (LayerDrop)
STOCHASTIC = "stochastic"

#: Module class name -> (kind, attribute that holds the drop probability / noise width).
REGULARIZER_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Dropout": (DROPOUT, ("p",)),
    "Dropout1d": (CHANNEL_DROPOUT, ("p",)),
    "Dropout2d": (CHANNEL_DROPOUT, ("p",)),
    "Dropout3d": (CHANNEL_DROPOUT, ("p",)),
    "AlphaDropout": (ALPHA_DROPOUT, ("p",)),
    "FeatureAlphaDropout": (ALPHA_DROPOUT, ("p",)),
    "StochasticDepth": (DROP_PATH, ("p", "drop_prob")),  # torchvision.ops
    "DropPath": (DROP_PATH, ("drop_prob", "p", "drop_rate")),  # timm.layers
    "DropBlock2d": (DROPBLOCK, ("drop_prob", "p")),  # timm.layers
    "DropBlock2D": (DROPBLOCK, ("drop_prob", "p")),  # dropblock (pip)
    "DropBlock": (DROPBLOCK, ("drop_prob", "p")),
    "Uout": (UOUT, ("beta",)),  # varshift.Uout
}

#: torch layers that apply dropout internally through an attribute rather than a submodule:
#: class name -> (attribute holding p, kind). Seen as ``<layer>:dropout``. (RNNs apply it
#: between stacked layers, in training only.)
ATTRIBUTE_REGULARIZERS: dict[str, tuple[str, str]] = {
    "MultiheadAttention": ("dropout", DROPOUT),
    "LSTM": ("dropout", DROPOUT),
    "GRU": ("dropout", DROPOUT),
    "RNN": ("dropout", DROPOUT),
}

def attribute_applies(module: Any) -> bool:
    """Whether a layer's dropout argument acts at all: an RNN applies it only between stacked
    layers (torch ignores it, with a warning, for ``num_layers=1``)."""
    if type(module).__name__ in ("LSTM", "GRU", "RNN"):
        return getattr(module, "num_layers", 1) > 1
    return True


#: Ops that draw random numbers (sources of a ``stochastic`` regularizer).
RANDOM_OPS = frozenset({
    "rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "randperm",
    "bernoulli", "bernoulli_", "multinomial", "normal", "normal_", "uniform_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "random_", "poisson",
})

#: Ops through which a random value scales, masks or shifts the data path.
MIXING_OPS = frozenset({
    "mul", "mul_", "__mul__", "__rmul__", "imul", "__imul__", "div", "div_", "truediv",
    "__truediv__", "__rtruediv__", "itruediv", "__itruediv__", "where", "masked_fill",
    "masked_fill_", "add", "add_", "__add__", "__radd__", "iadd", "__iadd__", "sub", "sub_",
    "__sub__", "__rsub__", "addcmul", "addcmul_",
})

#: Ops whose Python truth value decides control flow (``if torch.rand(1) < p:``).
CONTROL_OPS = frozenset({"__bool__", "item", "tolist", "__int__", "__float__"})

#: Function name -> (kind, parameter names for p, parameter names for the training flag).
#: Covers torch.nn.functional, the torch.* ATen bindings, torchvision.ops.stochastic_depth,
#: and timm's drop_path / drop_block_2d.
REGULARIZER_FUNCTIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "dropout": (DROPOUT, ("p",), ("training", "train")),
    "dropout_": (DROPOUT, ("p",), ("training", "train")),
    "dropout1d": (CHANNEL_DROPOUT, ("p",), ("training", "train")),
    "dropout2d": (CHANNEL_DROPOUT, ("p",), ("training", "train")),
    "dropout3d": (CHANNEL_DROPOUT, ("p",), ("training", "train")),
    "feature_dropout": (CHANNEL_DROPOUT, ("p",), ("training", "train")),
    "feature_dropout_": (CHANNEL_DROPOUT, ("p",), ("training", "train")),
    "alpha_dropout": (ALPHA_DROPOUT, ("p",), ("training", "train")),
    "alpha_dropout_": (ALPHA_DROPOUT, ("p",), ("training", "train")),
    "feature_alpha_dropout": (ALPHA_DROPOUT, ("p",), ("training", "train")),
    "feature_alpha_dropout_": (ALPHA_DROPOUT, ("p",), ("training", "train")),
    "stochastic_depth": (DROP_PATH, ("p",), ("training",)),
    "drop_path": (DROP_PATH, ("drop_prob", "p"), ("training",)),
    "drop_block_2d": (DROPBLOCK, ("drop_prob",), ()),
    "drop_block_fast_2d": (DROPBLOCK, ("drop_prob",), ()),
    # attention with its own dropout: no training flag, callers pass dropout_p=0.0 in eval
    "scaled_dot_product_attention": (DROPOUT, ("dropout_p",), ()),
}

#: Functions whose dropout is one argument of a larger op (not ``x -> dropout(x)``): swap
#: cannot replace them with Uout. Function name -> the argument that holds p.
ARGUMENT_REGULARIZERS = {"scaled_dot_product_attention": "dropout_p"}

#: Positional layout of functions whose signatures ``inspect`` cannot read, beyond the
#: dropout ATen bindings.
_POSITIONAL = {
    "scaled_dot_product_attention": ("query", "key", "value", "attn_mask", "dropout_p"),
}

#: Positional layout of the ATen bindings, whose signatures ``inspect`` cannot read:
#: ``torch.dropout(input, p, train)``.
_ATEN_POSITIONAL = ("input", "p", "train")

#: Norm class names recognized without ``isinstance`` (third-party BatchNorms that do not
#: subclass torch's). torch's own ``_BatchNorm`` family is matched by ``isinstance``.
NORM_CLASS_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "BatchNorm")

#: Ops whose output carries no values of their tensor inputs (only shape, dtype or device),
#: so dataflow does not pass through them.
META_OPS = frozenset(
    {
        "size", "dim", "numel", "shape", "dtype", "device", "ndim", "ndimension", "len",
        "is_contiguous", "is_floating_point", "element_size", "nelement", "stride",
        "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
        "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
        "get_device", "data_ptr",
    }
)

#: Ops whose value flows from the first argument only; the others give shape or dtype.
FIRST_ARG_ONLY_OPS = frozenset({"type_as", "view_as", "reshape_as", "expand_as", "to"})

#: Ops that write into their first argument (Python's augmented assignments: ``__iadd__``,
#: and ``operator.iadd`` as fx records them ...). A name ending in ``_`` (``add_``, ``relu_``) or an
#: ``inplace=True`` argument (``F.dropout(x, p, training, inplace=True)``) means the same.
INPLACE_OPS = frozenset(
    {
        "__setitem__", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow",
        "imatmul", "iand", "ior", "ixor", "ilshift", "irshift",
        *(f"__{op}__" for op in (
            "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
            "iand", "ior", "ixor", "ilshift", "irshift",
        )),
    }
)

#: Ops whose output is always a view of (shares memory with) their first argument, so an
#: in-place write into the output is a write into the argument too.
VIEW_OPS = frozenset(
    {
        "getitem", "__getitem__", "view", "view_as", "narrow", "select", "transpose",
        "permute", "unsqueeze", "squeeze", "expand", "expand_as", "t", "T", "mT", "split",
        "chunk", "unbind", "tensor_split", "movedim", "moveaxis", "swapaxes", "unflatten",
        "diagonal", "as_strided", "detach", "unfold",
    }
)


@dataclass(frozen=True)
class RegularizerInfo:
    """A recognized regularizer call: its kind, drop probability and training flag."""

    kind: str
    p: float | None
    training: bool | None  # functional only: the value of the ``training`` argument


def class_names(obj_type: type) -> list[str]:
    """The names of ``obj_type`` and its bases, most derived first."""
    return [c.__name__ for c in obj_type.__mro__]


def regularizer_of_module(module: Any) -> RegularizerInfo | None:
    """Recognize a regularizer module by its class name (or a base's), also by suffix
    (``SomethingDropPath``, ``MyDropout``); None if it is not one."""
    names = class_names(type(module))
    for name in names:
        if name in REGULARIZER_CLASSES:
            return _regularizer_info(module, name)
    # by suffix only for a layer without submodules: a model class called "SharedDropout"
    # is a container, not a regularizer
    if next(iter(getattr(module, "_modules", {}) or {}), None) is None:
        for name in names:
            key = _suffix_match(name)
            if key is not None:
                return _regularizer_info(module, key)
    return None


def _regularizer_info(module: Any, key: str) -> RegularizerInfo:
    kind, attrs = REGULARIZER_CLASSES[key]
    return RegularizerInfo(kind=kind, p=_first_number(module, attrs), training=None)


def _suffix_match(name: str) -> str | None:
    """The longest known class name that ``name`` ends with (not equal to it)."""
    keys = sorted((k for k in REGULARIZER_CLASSES if name.endswith(k) and name != k),
                  key=len, reverse=True)
    return keys[0] if keys else None


def is_norm(module: Any) -> bool:
    """True for a norm that normalizes with stored running statistics at inference.

    BatchNorm-family layers (torch's ``_BatchNorm`` and any subclass, SyncBatchNorm, lazy
    variants, third-party ``*BatchNorm*d`` classes by name, also frozen ones such as
    torchvision's ``FrozenBatchNorm2d``) that hold running statistics.
    LayerNorm, GroupNorm, RMSNorm and InstanceNorm are never norms in this sense.
    """
    import torch.nn as nn

    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return bool(module.track_running_stats) and getattr(module, "running_var", None) is not None
    names = class_names(type(module))
    if any(n in NORM_CLASS_NAMES or _frozen_name(n) for n in names):
        return getattr(module, "running_var", None) is not None
    return False


#: Class names of BatchNorms whose statistics training never updates (torchvision's
#: ``FrozenBatchNorm2d``, detectron2's ``FrozenBatchNorm2d``, ...), matched by name.
FROZEN_NORM_MARK = "Frozen"


def _frozen_name(name: str) -> bool:
    return FROZEN_NORM_MARK in name and "BatchNorm" in name


def is_frozen_norm(module: Any) -> bool:
    """A norm whose running statistics training never updates: a ``Frozen*BatchNorm*`` class
    (no train-mode behaviour at all), or a BatchNorm with ``momentum=0``."""
    if not is_norm(module):
        return False
    if any(_frozen_name(n) for n in class_names(type(module))):
        return True
    return getattr(module, "momentum", None) == 0


def is_batch_stats_norm(module: Any) -> bool:
    """A BatchNorm without running statistics (``track_running_stats=False``): it normalizes
    with the statistics of each batch at inference too."""
    import torch.nn as nn

    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        not module.track_running_stats or getattr(module, "running_var", None) is None)


def function_name(fn: Any) -> str:
    """The bare name of a callable (``torch.nn.functional.dropout`` -> ``dropout``)."""
    if isinstance(fn, str):
        return fn
    return getattr(fn, "__name__", None) or type(fn).__name__


def regularizer_of_call(fn: Any, args: tuple, kwargs: dict) -> RegularizerInfo | None:
    """Recognize a functional regularizer call and read its p and training flag."""
    name = function_name(fn)
    if name not in REGULARIZER_FUNCTIONS:
        return None
    kind, p_names, train_names = REGULARIZER_FUNCTIONS[name]
    bound = _bind(fn, args, kwargs, _POSITIONAL.get(name, _ATEN_POSITIONAL))
    p = next((bound[n] for n in p_names if n in bound), None)
    training: Any = next((bound[n] for n in train_names if n in bound), None)
    if not train_names:
        training = True  # drop_block_2d has no flag: callers only call it in training
    return RegularizerInfo(
        kind=kind,
        p=float(p) if isinstance(p, (int, float)) else None,
        training=training if isinstance(training, bool) else None,
    )


def is_inplace(fn: Any, args: tuple, kwargs: dict) -> bool:
    """True when the call writes into its first argument (``x.add_(y)``, ``x += y``,
    ``F.relu(x, inplace=True)``, ``x[i] = y``)."""
    name = function_name(fn)
    if name in INPLACE_OPS or (name.endswith("_") and not name.startswith("__")):
        return True
    if kwargs.get("inplace") is True:
        return True
    if isinstance(fn, str) or len(args) < 2:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "inplace" in params and _bind(fn, args, kwargs).get("inplace") is True


def predicted_shift(kind: str, p: float | None) -> float | None:
    """The variance shift a regularizer predicts at a norm it feeds directly.

    The paper's zero-mean estimate: inverted dropout (and drop-path, DropBlock) with drop
    probability p scales the variance by 1/(1-p); Uout with width beta by 1 + beta^2/3.
    AlphaDropout keeps mean and variance for standardized (SELU) inputs: 1.0.
    """
    if p is None:
        return None
    if kind == STOCHASTIC and not 0 <= p < 1:
        return None
    if kind == UOUT:
        return 1.0 + p * p / 3.0
    if kind == ALPHA_DROPOUT:
        return 1.0
    if p >= 1.0:
        return float("inf")
    return 1.0 / (1.0 - p)


def _first_number(obj: Any, attrs: tuple[str, ...]) -> float | None:
    for attr in attrs:
        value = getattr(obj, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if value is not None and hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
            return float(value.item())
    return None


def _bind(fn: Callable, args: tuple, kwargs: dict,
          positional: tuple[str, ...] = _ATEN_POSITIONAL) -> dict[str, Any]:
    """Map a call's arguments to parameter names, defaults included."""
    try:
        sig = inspect.signature(fn)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    except (TypeError, ValueError):
        merged = dict(zip(positional, args))
        merged.update(kwargs)
        return merged
