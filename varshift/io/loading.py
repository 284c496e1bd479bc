"""Loading models safely.

A file is read with ``torch.load(weights_only=True)`` plus an allow-list of torch.nn (and
varshift) classes, so a whole module built from standard layers loads with no flag and no
code runs. A pickle that needs any other class is refused, naming the classes; ``trust=True``
is the only path to ``weights_only=False``.

A state dict, or a training checkpoint holding one, is loaded into the module that ``arch``
builds. The :class:`LoadedModel` remembers the file's layout so that fixed statistics can be
written back in the same form (see :func:`save_like`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .._usercode import resolve_callable
from ..errors import ArchError, ConstructorCall, LoadError, RefusedPickleError, StateDictMismatch, one_line

#: Checkpoint keys that hold the model's state dict, in order of preference.
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "net",
    "network",
    "module",
    "weights",
    "params",
    "state",
)

#: Prefixes that wrappers add to every key: DataParallel/DDP and torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")

SUPPORTED = (
    "varshift reads torch.save files: a whole module (torch.save(model, path)), or a state dict "
    "or training checkpoint with `arch='pkg.module:fn'`"
)


@dataclass
class LoadedModel:
    """A model and where it came from.

    Attributes:
        module: the model, in the mode it was saved in.
        path: the file it was read from.
        form: ``module`` (a whole pickled module), ``checkpoint`` (a state dict, alone or
            inside a checkpoint dict, loaded into ``arch``'s module), or ``checkpoint-module``
            (a whole module stored inside a checkpoint dict).
        container: what ``torch.load`` returned, for writing back in the same layout.
        state_path: the keys leading from ``container`` to the state dict (``()``: itself).
        key_map: module state-dict key -> the key in the file (prefixes the file had).
        notes: things worth telling the user (an ignored ``arch``, ...).
    """

    module: Any
    path: Path
    form: str
    container: Any = None
    state_path: tuple[str, ...] = ()
    key_map: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    trusted: bool = False


# --------------------------------------------------------------------------- allow-list


def safe_classes() -> list[type]:
    """Every ``torch.nn`` module class plus varshift's own, for ``torch.serialization``."""
    import torch.nn as nn

    from ..uout import Uout

    found: set[type] = {Uout, nn.Parameter}
    stack = [nn.Module]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                stack.append(sub)
                mod = sub.__module__
                if mod.startswith("torch.nn.") or mod.startswith("torch.ao.nn."):
                    found.add(sub)
    found.add(nn.Module)
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


def _safe_names() -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in safe_classes()}


class _NoConstructor:
    """Stands in for an allow-listed class in the safe unpickler.

    ``torch.save(module)`` pickles each module as ``cls.__new__(cls)`` plus its saved
    ``__dict__``: no constructor runs and nothing is allocated beyond the file's own tensors.
    A crafted file could instead *call* the class (``nn.Linear(200000, 200000)``: 160 GB),
    which torch's weights-only unpickler allows for any allow-listed global. This proxy
    keeps the first path (its ``__new__`` makes a bare instance of the real class) and
    refuses the second.
    """

    def __init__(self, cls: type) -> None:
        self.cls = cls
        # Instance attributes win over the class's (non-data) __new__: the unpickler's
        # NEWOBJ runs ``proxy.__new__(proxy, *args)``.
        real: Any = cls  # the class's own __new__ (object's, for torch.nn modules)
        self.__dict__["__new__"] = lambda _proxy, *args: real.__new__(real)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        shown = ", ".join(repr(a)[:40] for a in args[:4]) + (", ..." if len(args) > 4 else "")
        raise ConstructorCall(
            f"it calls the constructor {self.cls.__module__}.{self.cls.__qualname__}({shown}) "
            "instead of restoring a saved instance (torch.save never writes that)"
        )


def safe_globals(classes: list[type] | None = None) -> list:
    """The allow-list for ``torch.serialization.safe_globals``: each safe class under its own
    name resolves to a :class:`_NoConstructor`; the real class is listed under a name no
    pickle can spell (GLOBAL names are read line by line, so one with a newline is
    unreachable), so that the unpickler may BUILD (restore the state of) its instances.

    Args:
        classes: the classes to allow (default: :func:`safe_classes`).
    """
    out: list = []
    for cls in safe_classes() if classes is None else classes:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if cls is _nn_parameter():  # torch handles Parameter itself (rebuilds tensors)
            out.append(cls)
            continue
        out.append((_NoConstructor(cls), name))
        out.append((cls, f"\nvarshift-build-only\n{name}"))
    return out


def _nn_parameter() -> type:
    import torch.nn as nn

    return nn.Parameter


# --------------------------------------------------------------------------- sniffing


def _sniff(path: Path) -> str:
    """``zip``, ``legacy`` (old torch.save pickle), or raise LoadError for what we don't read."""
    with path.open("rb") as f:
        head = f.read(32)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except Exception:  # BadZipFile, OSError, and whatever a damaged directory raises
            raise LoadError(f"{path} is truncated or corrupt (a damaged zip archive); {SUPPORTED}")
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise LoadError(
                f"{path} is a TorchScript archive (torch.jit.save), which varshift does not read "
                f"yet; {SUPPORTED}"
            )
        if not any(n.endswith("data.pkl") for n in names):
            raise LoadError(f"{path} is a zip archive but not a torch.save file; {SUPPORTED}")
        return "zip"
    if head[:1] == b"\x80":
        # A legacy torch.save file starts with its pickled magic number; anything else is a
        # plain pickle.dump, which torch.load cannot read (and would run before saying so).
        if _LEGACY_MAGIC not in head:
            raise LoadError(
                f"{path} is not a torch.save file (a plain pickle.dump, or damaged); load it in "
                "Python and torch.save the model or its state_dict"
            )
        return "legacy"
    if _looks_like_onnx(path, head):
        raise LoadError(
            f"{path} is an ONNX model; varshift works on the PyTorch model before export "
            f"({SUPPORTED})"
        )
    if _looks_like_safetensors(head):
        raise LoadError(
            f"{path} is a safetensors file, which varshift does not read yet; load it into your "
            "model and torch.save(model.state_dict(), ...) first"
        )
    raise LoadError(f"{path} is not a PyTorch file (unrecognized format); {SUPPORTED}")


#: torch.save's legacy (pre-zip) magic number 0x1950a86a20f9469cfc6c as pickle's LONG1 opcode.
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _looks_like_onnx(path: Path, head: bytes) -> bool:
    if path.suffix.lower() == ".onnx":
        return True
    # ModelProto starts with field 1 (ir_version, varint): tag byte 0x08.
    if head[:1] != b"\x08":
        return False
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return model.ir_version > 0 and len(model.graph.node) > 0
    except Exception:  # not ONNX after all
        return False


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"


# --------------------------------------------------------------------------- torch.load


def _torch_load(path: Path, trust: bool) -> Any:
    """``torch.load`` on CPU, weights-only with the allow-list unless ``trust``."""
    import torch

    try:
        with warnings.catch_warnings():
            # torch warns on stderr about pickle protocols > 2 before failing or succeeding;
            # the outcome is reported in one line instead.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if trust:
                return torch.load(path, map_location="cpu", weights_only=False)
            with torch.serialization.safe_globals(safe_globals()), memory_bound(path):
                return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise _too_big(path) from None
    except pickle.UnpicklingError as exc:
        marker = re.search(r"it calls the constructor (.+?\)) instead", str(exc))
        if marker:
            raise RefusedPickleError(
                f"refused to unpickle {path}: it calls the constructor {marker.group(1)} instead "
                "of restoring a saved layer, which torch.save never writes (a crafted file?); "
                "nothing was allocated or run",
                [],
            ) from None
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise _refusal(path, exc) from None
        raise LoadError(f"{path} is truncated or corrupt (unpickling failed: {one_line(exc)})")
    except (EOFError, RuntimeError, ValueError, OSError, AttributeError, ModuleNotFoundError,
            ImportError, TypeError, IndexError, KeyError) as exc:
        text = one_line(exc)
        if not trust and "can't allocate memory" in text:  # torch's allocator under the bound
            raise _too_big(path) from None
        if ("central directory" in text or "zip archive" in text or "unexpected EOF" in text
                or isinstance(exc, EOFError)):
            raise LoadError(f"{path} is truncated or corrupt ({text})")
        if trust and isinstance(exc, (AttributeError, ModuleNotFoundError, ImportError)):
            raise LoadError(
                f"{path} needs code that is not importable here ({text}); make the model's "
                "package importable, or save a state dict and pass `arch`"
            )
        raise LoadError(f"{path} could not be loaded ({type(exc).__name__}: {text})")


#: What the safe loader may allocate beyond the file's own size: its tensors are read into
#: memory once (plus copies for dtype/device handling), and torch's and Python's own
#: allocations during a load stay well under this.
_BUDGET_FIXED = 2 * 2**30
_BUDGET_PER_BYTE = 4


def _too_big(path: Path) -> LoadError:
    return LoadError(
        f"refused to load {path}: it asks for more memory than a file of its size can hold "
        f"(over {_budget(path) / 2**30:.1f} GiB for {path.stat().st_size} bytes); it is "
        "damaged or crafted"
    )


def _budget(path: Path) -> int:
    return _BUDGET_FIXED + _BUDGET_PER_BYTE * path.stat().st_size


@contextlib.contextmanager
def memory_bound(path: Path) -> Iterator[None]:
    """Bound the address space the safe loader may add to the process (Linux), relative to the
    file's size, for the duration of the load.

    The allow-list closes the constructor path for torch.nn classes, but torch's own default
    allow-list still lets a pickle call ``bytearray(n)`` or ``torch.FloatTensor(n, n)``: a
    1 KB file could ask for hundreds of GB. With this bound such a request fails at once with
    MemoryError (reported as a refusal) instead of exhausting the machine. A no-op where
    RLIMIT_AS is not available or the process already runs under a tighter limit.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        yield
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            in_use = int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, AttributeError):
        yield
        return
    limit = in_use + _budget(path)
    if (soft != resource.RLIM_INFINITY and soft <= limit) or (
            hard != resource.RLIM_INFINITY and hard < limit):
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _refusal(path: Path, exc: Exception) -> RefusedPickleError:
    import torch

    classes: list[str] = []
    try:
        classes = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy format: read the names from the message
        pass
    if not classes:
        # torch's message: "Unsupported global: GLOBAL io.open was not an allowed global ..."
        classes = re.findall(r"Unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", str(exc))
    safe = _safe_names()
    needed = sorted({c for c in classes if c not in safe}) or classes
    advice = (
        "pass `arch='pkg.module:fn'` with a state dict, or `trust=True` if you trust this file "
        "(unpickling can run arbitrary code)"
    )
    if not needed:
        # Not a class the allow-list lacks: an opcode or record the safe unpickler does not
        # read (a legacy whole-module save stores source code; protocol > 2), or damage.
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        detail = reason.group(1).strip() if reason else one_line(exc)
        return RefusedPickleError(
            f"refused to unpickle {path}: the safe loader cannot read it ({detail[:200]}); it is "
            "damaged, or a legacy whole-module save or pickle protocol that only full unpickling "
            f"reads; {advice}",
            [],
        )
    shown = ", ".join(needed[:6]) + (f" (+{len(needed) - 6} more)" if len(needed) > 6 else "")
    return RefusedPickleError(
        f"refused to unpickle {path}: it needs {shown} outside varshift's safe list "
        f"(torch.nn and varshift); {advice}",
        needed,
    )


# --------------------------------------------------------------------------- arch


def parse_arch_args(text: str | None) -> dict:
    """Parse ``arch_args`` given as text: a JSON object (None or empty: ``{}``)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArchError(f"`arch_args` is not valid JSON ({exc.msg} at char {exc.pos}): {text!r}")
    if not isinstance(value, dict):
        raise ArchError(
            f"`arch_args` must be a JSON object such as '{{\"drop_rate\": 0.2}}', got {text!r}"
        )
    return value


def resolve_arch(spec: str) -> Callable:
    """Import the ``arch`` spec ``pkg.module:callable`` or ``path/to/file.py:callable`` (see
    :func:`varshift._usercode.resolve_callable`).

    Raises:
        ArchError: the spec does not name a callable.
    """
    return resolve_callable(spec, "arch", ArchError)


def build_arch(spec: str, arch_args: dict) -> Any:
    """Call the ``arch`` callable with ``arch_args`` and check it returns an nn.Module."""
    import torch.nn as nn

    fn = resolve_arch(spec)
    try:
        module = fn(**arch_args)
    except (Exception, SystemExit) as exc:  # user code that calls sys.exit() too
        raise ArchError(f"`arch` {spec!r}: calling it with {json.dumps(arch_args)} failed "
                        f"({type(exc).__name__}: {one_line(exc)})")
    if not isinstance(module, nn.Module):
        raise ArchError(f"`arch` {spec!r} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


# --------------------------------------------------------------------------- state dicts


def _is_state_dict(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def find_state_dict(obj: Any) -> tuple[tuple[str, ...], Any] | None:
    """Locate a state dict (or a whole module) in a checkpoint: (key path, value) or None."""
    import torch.nn as nn

    if _is_state_dict(obj) or isinstance(obj, nn.Module):
        return (), obj
    if not isinstance(obj, dict):
        return None
    for key in STATE_DICT_KEYS:
        if key in obj:
            found = find_state_dict(obj[key])
            if found is not None:
                return (key, *found[0]), found[1]
    return None


def strip_prefixes(keys: list[str]) -> dict[str, str]:
    """Map stripped key -> original key, removing ``module.`` / ``_orig_mod.`` prefixes."""
    out = {}
    for key in keys:
        new = key
        while new.startswith(STRIP_PREFIXES):
            new = new.split(".", 1)[1]
        out[new] = key
    return out


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def load_state_into(module: Any, state: dict, source: str) -> dict[str, str]:
    """``load_state_dict`` with prefixes stripped; on mismatch, a message with the keys."""
    key_map = strip_prefixes(list(state))
    stripped = {k: state[v] for k, v in key_map.items()}
    expected = module.state_dict()
    missing = [k for k in expected if k not in stripped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in stripped if k not in expected]
    shapes = [
        f"{k} {tuple(stripped[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in stripped and tuple(stripped[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (file vs model): {_few(shapes, 3)}")
        raise StateDictMismatch(
            f"the state dict in {source} does not fit the module `arch` built: " + "; ".join(parts)
        )
    module.load_state_dict(stripped, strict=False)
    return key_map


# --------------------------------------------------------------------------- entry point


def check_readable(path: Path, what: str = "MODEL") -> None:
    """Refuse an input that is missing, not a regular file, unreadable or empty.

    FIFOs, devices and sockets are refused before anything opens them (reading a FIFO would
    block, a device never ends); pseudo-files that report 0 bytes but have content (``/proc``,
    ``/sys``) are named as such rather than called empty.
    """
    if not path.exists():
        raise LoadError(f"{what} {path}: no such file")
    if path.is_dir():
        raise LoadError(f"{what} {path} is a directory, not a file")
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise LoadError(f"{what} {path} is {_file_kind(st.st_mode)}, not a regular file")
    if not os.access(path, os.R_OK):
        raise LoadError(f"{what} {path} is not readable (permission denied)")
    if st.st_size == 0:
        try:
            with path.open("rb") as f:
                has_content = bool(f.read(1))
        except OSError as exc:
            raise LoadError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
        if has_content:
            raise LoadError(f"{what} {path} is a pseudo-file that reports 0 bytes (a /proc or "
                            "/sys file?), not a saved file; copy it to a regular file first")
        raise LoadError(f"{what} {path} is empty (0 bytes)")


def _file_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a character device', ... for a stat mode."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def load_model(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_args: dict | None = None,
    trust: bool = False,
) -> LoadedModel:
    """Load a model file safely.

    Args:
        path: a ``torch.save`` file: a whole module, a state dict, or a checkpoint dict.
        arch: ``pkg.module:fn`` or ``file.py:fn`` building the module for a state dict.
        arch_args: keyword arguments for ``arch``.
        trust: allow arbitrary unpickling (``weights_only=False``). Only for trusted files.

    Returns:
        A :class:`LoadedModel`. The module is on CPU, in the mode it was saved in.

    Raises:
        LoadError (and subclasses): with a one-line message naming the problem.
    """
    import torch.nn as nn

    path = Path(path)
    check_readable(path)
    _sniff(path)
    arch_module = None
    if arch:
        # fail early on a bad `arch`; its classes may be in the pickle
        arch_module = getattr(resolve_arch(arch), "__module__", None)
    obj = _torch_load(path, trust)
    found = find_state_dict(obj)
    if found is None:
        raise LoadError(
            f"{path} holds a {type(obj).__name__}, not a model, a state dict or a checkpoint "
            f"with one of the keys {', '.join(STATE_DICT_KEYS[:4])}, ...; {SUPPORTED}"
        )
    state_path, value = found
    if isinstance(value, nn.Module):
        loaded = LoadedModel(
            value, path, "module" if not state_path else "checkpoint-module", obj, state_path,
            trusted=trust,
        )
        if arch:
            uses = arch_module is not None and any(
                type(m).__module__ == arch_module for m in value.modules())
            loaded.notes.append(
                f"{path} holds a whole module; `arch={arch!r}` was used only to import its classes"
                if uses else f"{path} holds a whole module; `arch={arch!r}` was not needed")
        return loaded
    if not arch:
        raise LoadError(
            f"{path} is a state dict ({len(value)} tensors) without the code that builds the "
            "model; pass `arch='pkg.module:fn'` or `arch='path/to/file.py:fn'` (and `arch_args` "
            "'{...}' for its arguments)"
        )
    module = build_arch(arch, arch_args or {})
    weights, note = weight_averaged(value)
    key_map = load_state_into(module, weights, str(path))
    loaded = LoadedModel(module, path, "checkpoint", obj, state_path, key_map, trusted=trust)
    if note:
        loaded.notes.append(note)
    return loaded


#: Entries that weight-averaging wrappers add to the wrapped model's state dict:
#: ``torch.optim.swa_utils.AveragedModel`` counts the averaged models in ``n_averaged``.
AVERAGING_KEYS = ("n_averaged",)


def weight_averaged(state: dict) -> tuple[dict, str | None]:
    """The wrapped model's part of a weight-averaged state dict, and a note saying what it is.

    ``AveragedModel`` (SWA, or EMA through ``multi_avg_fn``) saves ``module.<key>`` plus
    ``n_averaged``; timm's ``ModelEmaV2``/``ModelEmaV3`` save ``module.<key>``. The
    ``module.`` prefix is stripped by :func:`load_state_into`; the averaging entries are left
    out of loading here and kept in the file when it is written back (only the recalibrated
    statistics change).
    """
    extra = [k for k in AVERAGING_KEYS if k in state]
    if not extra:
        return state, None
    weights = {k: v for k, v in state.items() if k not in extra}
    count = state["n_averaged"]
    count = int(count.item()) if hasattr(count, "item") and count.numel() == 1 else count
    return weights, (f"a weight-averaged (AveragedModel: SWA/EMA) state, n_averaged={count}; "
                     "written back in the same layout")
