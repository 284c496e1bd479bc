"""The library's words -> the command line's: one table.

The library names its parameters in backticks (```labels``, ```batch_size=2``,
```all_norms=True``); a Python user reads them as written. Before the command line prints
an error or renders a report, :func:`flags` rewrites each such name that is one of its
options into the flag (``--labels``, ``--batch-size 2``, ``--all-norms``), so that a message
always speaks the language of whoever reads it. Names that are not options stay as they are.

No torch import here.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

#: Library parameter -> the command line's flag. Every option of every command is here (a
#: test checks it against the commands' declarations).
FLAGS: dict[str, str] = {
    "all_norms": "--all-norms",
    "arch": "--arch",
    "arch_args": "--arch-args",
    "atol": "--atol",
    "backend": "--backend",
    "batch_size": "--batch-size",
    "beta": "--beta",
    "cache_mb": "--cache-mb",
    "call": "--call",
    "data": "--data",
    "device": "--device",
    "eval_data": "--eval-data",
    "exact": "--exact",
    "fail_above": "--fail-above",
    "fail_on": "--fail-on",
    "format": "--format",
    "include_frozen": "--include-frozen",
    "input_shape": "--input-shape",
    "labels": "--labels",
    "max_accuracy_drop": "--max-accuracy-drop",
    "max_batches": "--max-batches",
    "max_samples": "--max-samples",
    "onnx": "--onnx",
    "output": "--output",
    "output_key": "--output-key",
    "quiet": "--quiet",
    "report": "--report",
    "rtol": "--rtol",
    "seed": "--seed",
    "to": "--to",
    "trust": "--trust",
}

#: Library parameters that have no flag of their own, and the words the command line uses
#: for them instead.
ALIASES: dict[str, str] = {
    "eval_batches": "--eval-data",
    "example_input": "--input-shape or --data",
}

_NAME = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`\n]*))?`")


def _flag(match: re.Match) -> str:
    name, value = match.group(1), match.group(2)
    flag = FLAGS.get(name) or ALIASES.get(name)
    if flag is None:
        return match.group(0)
    if value is None or value == "True":
        return flag
    return f"{flag} {value.strip(chr(39) + chr(34))}"


#: Library functions that are commands: ```varshift.recalibrate(exact=True)``` is the command
#: line's ```varshift recalibrate --exact``` (keyword arguments become flags; positional ones,
#: the model and its data, are left out).
COMMANDS: dict[str, str] = {"scan": "scan", "probe": "probe", "recalibrate": "recalibrate",
                            "swap": "swap", "export_onnx": "export"}

_CALL = re.compile(r"`varshift\.([a-z][a-z0-9_]*)(?:\(([^`()\n]*)\))?`")


def _command(match: re.Match) -> str:
    command = COMMANDS.get(match.group(1))
    if command is None:
        return match.group(0)
    words = ["varshift", command]
    for arg in (a.strip() for a in (match.group(2) or "").split(",")):
        if "=" not in arg:
            continue
        word = _NAME.sub(_flag, f"`{arg}`")
        words.append(arg if word == f"`{arg}`" else word)
    return "`" + " ".join(words) + "`"


def flags(text: str) -> str:
    """``text`` with every backticked library parameter written as its flag, and every
    backticked call of a command's library function as the command."""
    return _NAME.sub(_flag, _CALL.sub(_command, text)) if "`" in text else text


#: The fields of report objects that hold prose (notes, remedies, reasons); other strings
#: (layer names, paths) are data and are never rewritten.
PROSE = frozenset({"notes", "warnings", "remedy", "reason", "error"})


def localize(report: Any) -> Any:
    """A copy of ``report`` (a report dataclass) whose prose speaks in flags; the report
    itself is not changed."""
    if not dataclasses.is_dataclass(report) or isinstance(report, type):
        return report
    out = copy.copy(report)
    for f in dataclasses.fields(report):
        value = getattr(report, f.name)
        if f.name in PROSE:
            value = _words(value)
        elif dataclasses.is_dataclass(value):
            value = localize(value)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            value = [localize(v) for v in value]
        else:
            continue
        object.__setattr__(out, f.name, value)
    return out


def _words(value: Any) -> Any:
    if isinstance(value, str):
        return flags(value)
    if isinstance(value, list):
        return [flags(v) if isinstance(v, str) else v for v in value]
    return value
