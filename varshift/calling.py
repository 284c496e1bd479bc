"""How varshift calls a model on a batch, and where it reads the logits in what comes back.

One place for the calling convention, used by scan, probe, recalibrate and export. The rules,
in order (the README shows examples):

1. ``call`` (``--call pkg.module:fn`` / ``file.py:fn``): ``fn(model, batch)`` returns the
   output, or ``(output, labels)`` (a pair whose second item is ``None`` or an integer tensor)
   so that metrics still work. The escape hatch that always works.
2. A dict batch whose keys name parameters of ``model.forward`` is passed as keyword
   arguments; label keys (``labels``, ``label``, ``y``, ``targets``, ``target``) are held back
   as labels unless ``forward`` names them itself. A dict whose keys name no parameter is
   read the old way: the inputs under ``inputs``/``x``/..., the labels under ``labels``/``y``.
3. A tuple/list batch goes in as positional arguments when ``forward`` takes exactly that many
   required positional parameters; with one fewer, the last item is the labels; otherwise it
   is ``(inputs, labels)``. ``labels="last"`` / ``"none"`` (``--labels``) settle ambiguous
   cases: the last item is the labels, or there are none and every item is an argument.
4. A tensor is the one positional argument.

Every tensor in the batch moves to the model's device; floating tensors take the model's
floating dtype and integer tensors (token ids, masks, labels) keep theirs, except that a lone
integer input to a model without an embedding (images stored as uint8) becomes floating.

Outputs: a tensor, tuples, lists, dicts and Hugging Face ``ModelOutput``s. Metrics read
``output_key`` when given, else ``logits`` when present, else the first tensor.

The structure of a batch (its tensors, its size, its first ``k`` samples, the dict keys of
inputs and labels) is :mod:`varshift.batches`, shared with the data readers.

A leaf module: it imports torch and varshift's leaf modules only (the user's ``call`` spec is
resolved by :mod:`varshift._usercode`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ._torch_utils import model_device, model_dtype
from ._usercode import resolve_callable
from .batches import INPUT_KEYS, batch_size, cut, input_key, label_key, map_tensors, tensors, unwrap
from .errors import CallError, DataError, StopForward, VarshiftError, one_line
from .options import Labels, choice

# --------------------------------------------------------------------------- structures


def describe(obj: Any) -> str:
    """Shapes and dtypes of a batch, short: ``(8, 3, 32, 32) float32`` or
    ``{image: (8, 3, 32, 32) float32, tabular: (8, 5) float32}``."""
    if isinstance(obj, torch.Tensor):
        return f"{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, Invocation):
        parts = [describe(a) for a in obj.args] + [f"{k}={describe(v)}" for k, v in obj.kwargs.items()]
        if obj.call is not None:
            return describe(obj.batch)
        return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"
    if isinstance(obj, Mapping):
        inner = ", ".join(f"{k}: {describe(v)}" for k, v in list(obj.items())[:6])
        return "{" + inner + "}"
    if isinstance(obj, (tuple, list)):
        if obj and all(isinstance(t, torch.Tensor) for t in obj) and isinstance(obj, list) \
                and len(obj) > 3:
            return f"[{len(obj)} tensors]"
        inner = ", ".join(describe(v) for v in list(obj)[:6])
        return ("[" + inner + "]") if isinstance(obj, list) else ("(" + inner + ")")
    return type(obj).__name__


# --------------------------------------------------------------------------- outputs


def first_tensor(out: Any, prefer: str = "logits") -> torch.Tensor | None:
    """``out[prefer]`` (or ``out.prefer``) when ``out`` is a mapping holding a tensor there,
    else the first tensor in ``out`` (None when there is none)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        value = out.get(prefer) if prefer in out else None
        if isinstance(value, torch.Tensor):
            return value
    found = tensors(out)
    return found[0] if found else None


def pick_output(out: Any, key: str | None) -> torch.Tensor | None:
    """The output the metrics read: ``key`` when given (a mapping key, an attribute or a
    tuple index), else :func:`first_tensor`.

    Raises:
        DataError: ``key`` is not in the output, or holds no tensor.
    """
    if key is None:
        return first_tensor(out)
    value: Any = None
    found = False
    if isinstance(out, Mapping) and key in out:
        value, found = out[key], True
    elif isinstance(out, (tuple, list)) and key.lstrip("-").isdigit() \
            and -len(out) <= int(key) < len(out):
        value, found = out[int(key)], True
    elif not isinstance(out, (torch.Tensor, Mapping, tuple, list)) and hasattr(out, key):
        value, found = getattr(out, key), True
    if not found:
        raise DataError(f"`output_key` {key!r} is not in the model's output ({_output_keys(out)})")
    tensor = first_tensor(value)
    if tensor is None:
        raise DataError(f"`output_key` {key!r} holds a {type(value).__name__}, not a tensor")
    return tensor


def _output_keys(out: Any) -> str:
    if isinstance(out, Mapping):
        return "keys: " + ", ".join(map(str, list(out)[:12]))
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}: use an index 0..{len(out) - 1}"
    return f"a {type(out).__name__}"


# --------------------------------------------------------------------------- calling


@dataclass
class Invocation:
    """One batch, ready to run: positional and keyword arguments on the model's device (or,
    with ``call``, the whole batch for ``call(model, batch)``), and the labels if any.

    ``labels`` of a ``call`` invocation are filled in by :meth:`run` when ``call`` returns
    ``(output, labels)``.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    labels: Any = None
    call: Callable | None = None
    batch: Any = None
    call_name: str = "`call`"
    index: int = 0

    @property
    def samples(self) -> int:
        n = batch_size(self.batch if self.call is not None else (self.args, self.kwargs))
        return n or 0

    def inputs(self) -> Any:
        """The structure whose tensors are the model's inputs (for the dynamic trace)."""
        return self.batch if self.call is not None else (self.args, self.kwargs)

    def run(self, model: nn.Module) -> Any:
        """Run ``model`` on this batch and return its output."""
        if self.call is None:
            return model(*self.args, **self.kwargs)
        try:
            result = self.call(model, self.batch)
        except VarshiftError:
            raise
        except Exception as exc:  # the user's function failed on this batch
            raise CallError(f"{self.call_name} raised on batch {self.index} ({type(exc).__name__}: "
                            f"{_first_line(exc)})") from exc
        if (isinstance(result, tuple) and not hasattr(result, "_fields") and len(result) == 2
                and _looks_like_labels(result[1])):
            result, labels = result
            if labels is not None:
                self.labels = labels
        if result is None:
            raise CallError(f"{self.call_name} returned None on batch {self.index}; it must "
                            "return the model's output (or (output, labels))")
        if not tensors(result):
            raise CallError(f"{self.call_name} returned a {type(result).__name__} with no tensor "
                            f"in it on batch {self.index}; return the model's output")
        return result


def _looks_like_labels(value: Any) -> bool:
    return value is None or (isinstance(value, torch.Tensor) and not value.is_floating_point()
                             and not value.is_complex())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:240] if text else type(exc).__name__


@dataclass
class _Signature:
    names: frozenset  # parameters that can be passed by keyword
    required: int  # required positional parameters
    positional: int  # positional parameters (required or not)
    var_positional: bool
    var_keyword: bool
    text: str


def forward_signature(model: nn.Module) -> _Signature | None:
    """What ``model.forward`` takes; None when Python cannot tell."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    P = inspect.Parameter
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    return _Signature(
        names=frozenset(p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)),
        required=sum(p.default is P.empty for p in positional),
        positional=len(positional),
        var_positional=any(p.kind is P.VAR_POSITIONAL for p in params),
        var_keyword=any(p.kind is P.VAR_KEYWORD for p in params),
        text=f"{type(model).__name__}.forward({', '.join(_param_text(p) for p in params)})",
    )


def _param_text(p: inspect.Parameter) -> str:
    """A parameter as written, without its annotation: ``x``, ``mask=None``, ``*args``."""
    prefix = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
    default = "" if p.default is p.empty else f"={p.default!r}"[:20]
    return f"{prefix}{p.name}{default}"


def resolve_call(spec: str) -> Callable:
    """Import the ``call`` spec ``pkg.module:fn`` / ``file.py:fn``.

    Raises:
        CallError: the spec does not name a callable.
    """
    return resolve_callable(spec, "call", CallError)


class Caller:
    """Turns batches into :class:`Invocation`s for ``model`` and reads its outputs.

    Args:
        model: the model (its ``forward`` signature, device and dtype are read once).
        call: ``fn(model, batch) -> output or (output, labels)``; or a ``pkg.module:fn`` /
            ``file.py:fn`` string naming one. Default: the rules in the module docstring.
        labels: ``"auto"`` (default), ``"none"`` or ``"last"`` (a :class:`~varshift.options.Labels`
            value), for tuple batches.
        output_key: which output the metrics read (default: ``logits``, else the first tensor).
        device: where batches go (default: the model's device).
    """

    def __init__(self, model: nn.Module, call: Callable | str | None = None,
                 labels: Labels | str = Labels.AUTO, output_key: str | None = None,
                 device: torch.device | str | None = None) -> None:
        self.labels = choice(Labels, labels, "labels", DataError)
        self.call_name = "`call`"
        if isinstance(call, str):
            self.call_name = f"`call` {call!r}"
            call = resolve_call(call)
        elif call is not None and not callable(call):
            raise CallError(f"`call` must be a callable fn(model, batch), got {type(call).__name__}")
        self.model_name = type(model).__name__
        self.call = call
        self.output_key = output_key
        self.device = torch.device(device) if device is not None else model_device(model)
        self.dtype = model_dtype(model)
        self.keep_ints = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())
        self.signature = forward_signature(model)

    # ----------------------------------------------------------------- batches

    def move(self, obj: Any) -> Any:
        """Every tensor to the device; floating ones to the model's dtype."""
        def to(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                return t.to(device=self.device, dtype=self.dtype)
            return t.to(self.device)

        return map_tensors(obj, to)

    def prepare(self, batch: Any, index: int = 0, limit: int | None = None) -> Invocation:
        """An :class:`Invocation` for ``batch`` (cut to ``limit`` samples when given).

        Raises:
            DataError: the batch fits none of the rules (a dict whose keys name no parameter
                of ``forward`` and no inputs key, a type that is not a batch).
        """
        raw = unwrap(batch)
        if limit is not None:
            raw = cut(raw, limit)
        raw = self.move(raw)
        if self.call is not None:
            labels = None
            try:
                labels = self.split(raw, index)[2]
            except DataError:
                pass
            return Invocation(labels=labels, call=self.call, batch=raw, call_name=self.call_name,
                              index=index)
        args, kwargs, labels = self.split(raw, index)
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) \
                and not args[0].is_floating_point() and not self.keep_ints:
            # a lone integer input to a model without embeddings is an image stored as ints
            args = (args[0].to(self.dtype),)
        return Invocation(args=tuple(args), kwargs=kwargs, labels=labels, index=index)

    def split(self, raw: Any, index: int = 0) -> tuple[tuple, dict, Any]:
        """``(args, kwargs, labels)`` for one (unwrapped) batch by the rules above."""
        if isinstance(raw, torch.Tensor):
            return (raw,), {}, None
        if isinstance(raw, Mapping):
            return self._split_dict(raw, index)
        if isinstance(raw, (tuple, list)) and raw:
            return self._split_sequence(list(raw))
        raise DataError(
            f"batch {index} is a {type(raw).__name__}; a batch is a tensor, a tuple/list or a "
            "dict of them (or pass `call` to say how to call the model)"
        )

    def _split_dict(self, d: Mapping, index: int) -> tuple[tuple, dict, Any]:
        sig = self.signature
        names = sig.names if sig is not None else frozenset()
        passed = {k: v for k, v in d.items() if k in names}
        y_key = label_key(d)
        labels = None if self.labels == Labels.NONE or y_key is None else d[y_key]
        if passed:
            if sig is not None and sig.var_keyword:  # forward(**kwargs) takes the rest too
                passed.update({k: v for k, v in d.items() if k not in passed and k != y_key})
            return (), passed, labels
        x_key = input_key(d)
        if x_key is None:
            takes = sig.text if sig is not None else f"{self.model_name}.forward"
            raise DataError(
                f"batch {index} is a dict with keys {', '.join(map(str, list(d)[:8]))}: none names "
                f"a parameter of {takes} and none is one of {', '.join(INPUT_KEYS)}; rename the "
                "keys or pass `call`"
            )
        return (d[x_key],), {}, labels

    def _split_sequence(self, items: list) -> tuple[tuple, dict, Any]:
        while len(items) > 1 and items[-1] is None:  # (inputs, None): data without labels
            items = items[:-1]
        n = len(items)
        if self.labels == Labels.LAST and n > 1:
            return tuple(items[:-1]), {}, items[-1]
        if self.labels == Labels.NONE:
            return tuple(items), {}, None
        sig = self.signature
        if n == 2 and self._nested_inputs(items[0]):
            # ((inputs...), labels) or ({keyword inputs}, labels): the first item holds the inputs
            args, kwargs, _ = self.split(items[0])
            return args, kwargs, items[1]
        if n == 2 and items[1] is None:
            return (items[0],), {}, None
        if n == 1:
            return (items[0],), {}, None
        if sig is not None and sig.required == n:
            return tuple(items), {}, None
        if sig is not None and sig.required == n - 1 and n > 2:
            return tuple(items[:-1]), {}, items[-1]
        return (items[0],), {}, items[1]

    def _nested_inputs(self, first: Any) -> bool:
        """Whether the first item of a pair is itself the model's inputs (a tuple or dict of
        them; a list only when ``forward`` takes that many arguments, since a list is also
        how per-sample images are passed)."""
        if isinstance(first, (tuple, Mapping)) and not isinstance(first, torch.Tensor):
            return bool(first)
        sig = self.signature
        return (isinstance(first, list) and len(first) > 1 and sig is not None
                and sig.required == len(first))

    # ----------------------------------------------------------------- outputs

    def logits(self, out: Any) -> torch.Tensor | None:
        """The output the metrics read (``output_key``, else ``logits``, else the first tensor)."""
        return pick_output(out, self.output_key)


def forward(model: nn.Module, x: "torch.Tensor | Invocation", index: int) -> Any:
    """Run the model on a tensor or an :class:`Invocation`; its errors become a DataError
    that names the inputs (the estimators' one way of running the user's model)."""
    try:
        return x.run(model) if isinstance(x, Invocation) else model(x)
    except (DataError, StopForward):
        raise
    except Exception as exc:  # the user's model rejected the batch
        if "more than 1 value per channel" in str(exc):
            raise DataError(
                f"batch {index} has {_samples(x)} sample(s): a train-mode BatchNorm needs more "
                "than one value per channel; use `batch_size=2` or more"
            ) from exc
        raise fit_error(model, x, exc, where="DATA" if index == 0 else f"batch {index} of DATA")


def _samples(x: "torch.Tensor | Invocation") -> int:
    return x.samples if isinstance(x, Invocation) else int(x.shape[0])


# --------------------------------------------------------------------------- inputs that do not fit


def fit_error(model: nn.Module, x: Any, exc: BaseException, where: str = "DATA") -> DataError:
    """A one-line DataError for inputs (a tensor or an Invocation) that do not fit ``model``."""
    detail = one_line(exc, 240)
    expected = expected_input(model)
    hint = f"; {expected}" if expected else ""
    return DataError(
        f"{where} does not fit the model: {_what(x)}{hint} ({type(exc).__name__}: {detail})"
    )


def _what(x: Any) -> str:
    if isinstance(x, Invocation) and x.call is None and len(x.args) == 1 and not x.kwargs \
            and isinstance(x.args[0], torch.Tensor):
        x = x.args[0]
    if isinstance(x, torch.Tensor):
        return f"inputs of shape {tuple(x.shape)} ({str(x.dtype).replace('torch.', '')})"
    return f"inputs {describe(x)}"


def expected_input(model: nn.Module) -> str | None:
    """What the model's first weighted layer expects, e.g. ``features.0 (Conv2d) expects
    (N, 3, H, W)``; None when it cannot tell. A heuristic for error messages."""
    spatial = {1: "L", 2: "H, W", 3: "D, H, W"}
    for name, m in model.named_modules():
        desc = None
        if isinstance(m, nn.modules.conv._ConvNd):
            dims = len(m.kernel_size)
            desc = f"(N, {m.in_channels}, {spatial.get(dims, '...')})"
        elif isinstance(m, nn.Linear):
            desc = f"(N, {m.in_features}) or (N, ..., {m.in_features})"
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            desc = f"integer token ids < {m.num_embeddings}"
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and hasattr(m, "num_features"):
            desc = f"(N, {m.num_features}, ...)"
        if desc:
            return f"the first layer {name or '(root)'} ({type(m).__name__}) expects {desc}"
    return None
