"""Writing a fixed model back in the input's own form, atomically.

* a whole-module pickle stays a whole-module pickle (safe-loadable if the input was);
* a checkpoint stays a checkpoint with the same keys and layout: only the named state-dict
  entries (the recalibrated BatchNorm buffers) change, under their original key names
  (``module.`` prefixes and all), so the user's training code loads it unchanged;
* a checkpoint holding a whole module keeps its other entries and gets the new module.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterable

import torch
import torch.nn as nn

from .atomic import write_with
from .loading import LoadedModel


def _replace_at(container: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of ``container`` with ``value`` at key path ``path`` (the rest shared)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    new = copy.copy(container)
    new[head] = _replace_at(container[head], rest, value)
    return new


def _get_at(container: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        container = container[key]
    return container


def updated_state_dict(loaded: LoadedModel, module: nn.Module, keys: Iterable[str]) -> dict:
    """The file's state dict with ``keys`` (module key names) taken from ``module``.

    Keys the file does not have (``num_batches_tracked`` in checkpoints from before PyTorch
    0.4.1, which loading tolerates) are not added: the file keeps its own set of keys.
    """
    original = _get_at(loaded.container, loaded.state_path)
    new = copy.copy(original)  # keeps OrderedDict and its _metadata
    current = module.state_dict()
    for key in keys:
        file_key = loaded.key_map.get(key, key)
        if file_key not in original:
            continue
        old = original[file_key]
        new[file_key] = current[key].detach().to(dtype=old.dtype, device=old.device).clone()
    return new


def save_like(
    loaded: LoadedModel, module: nn.Module, out: str | os.PathLike, changed: Iterable[str] = ()
) -> str:
    """Save ``module`` to ``out`` in the form ``loaded`` came in; returns the form written.

    Args:
        loaded: where the original came from (form, container, key names).
        module: the fixed module.
        changed: state-dict keys (module names) that changed; used for checkpoints.
    """
    if loaded.form == "checkpoint":
        obj = _replace_at(loaded.container, loaded.state_path,
                          updated_state_dict(loaded, module, changed))
        form = "checkpoint"
    elif loaded.form == "checkpoint-module":
        obj = _replace_at(loaded.container, loaded.state_path, module)
        form = "checkpoint-module"
    else:
        obj = module
        form = "module"
    write_with(out, lambda tmp: torch.save(obj, tmp))
    return form


def norm_buffer_keys(names: Iterable[str], module: nn.Module) -> list[str]:
    """State-dict keys of the running statistics of the norms ``names``."""
    keys = set(module.state_dict())
    out = []
    for name in names:
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{name}.{buf}" if name else buf
            if key in keys:
                out.append(key)
    return out
