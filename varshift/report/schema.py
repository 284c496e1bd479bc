"""The JSON Schemas (draft 2020-12) of the reports, shipped in ``varshift/schemas/``.

One schema per report: ``scan``, ``probe``, ``recalibrate``, ``swap``, ``export``. Each JSON
document names its schema in its ``"schema"`` key (``"varshift.probe/1"``); the number changes
only when a key is removed or changes meaning, and keys may be added at any time, so the
schemas accept unknown keys. See docs/json.md.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

KINDS = ("scan", "probe", "recalibrate", "swap", "export")


@lru_cache(maxsize=None)
def load_schema(kind: str) -> dict[str, Any]:
    """The schema of one report kind (``scan``, ``probe``, ...), as a dict."""
    if kind not in KINDS:
        raise ValueError(f"no schema {kind!r}; choose one of: {', '.join(KINDS)}")
    text = resources.files("varshift").joinpath(f"schemas/{kind}.json").read_text("utf-8")
    return json.loads(text)


def kind_of(document: dict[str, Any]) -> str:
    """``{"schema": "varshift.probe/1", ...}`` -> ``"probe"``."""
    name = str(document.get("schema", ""))
    kind = name.removeprefix("varshift.").split("/")[0]
    if not name.startswith("varshift.") or kind not in KINDS:
        raise ValueError(f"not a varshift report: schema {name!r}")
    return kind


def validate(document: dict[str, Any], kind: str | None = None) -> None:
    """Check a report document (``report.to_dict()`` or parsed JSON) against its schema:
    ``kind``'s, or by default the one its ``"schema"`` key names.

    Needs the ``jsonschema`` package (``pip install 'varshift[test]'``).

    Raises:
        ValueError: the document names no varshift schema.
        jsonschema.ValidationError: the document does not match it.
    """
    import jsonschema
    from referencing import Registry, Resource

    registry: Registry = Registry().with_resources(
        (load_schema(k)["$id"], Resource.from_contents(load_schema(k))) for k in KINDS
    )
    validator = jsonschema.Draft202012Validator(load_schema(kind or kind_of(document)), registry=registry)
    validator.validate(document)
