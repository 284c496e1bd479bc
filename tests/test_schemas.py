"""The shipped JSON Schemas: valid draft 2020-12, one per report, and strict where it counts.

Every report the rest of the suite produces is validated by the hook in conftest.py; here the
schemas themselves are checked, and shown to reject what they must.
"""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import torch

import varshift
from conftest import REPO
from varshift import schema
from varshift.data import load_data

SAMPLES = REPO / "sample_models"


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> dict[str, dict]:
    """One real document of every kind, from the sample models."""
    tmp = tmp_path_factory.mktemp("docs")
    model = SAMPLES / "digits_dropout_bn.pt"
    calib = SAMPLES / "digits_calib.pt"
    torch.manual_seed(0)
    return {
        "scan": varshift.scan_file(model).to_dict(),
        "probe": varshift.probe_file(model, calib, max_batches=2, device="cpu").to_dict(),
        "recalibrate": varshift.recalibrate_file(model, calib, tmp / "r.pt", max_batches=2,
                                                 device="cpu", onnx=tmp / "r.onnx").to_dict(),
        "swap": varshift.swap_file(model, tmp / "s.pt", data=calib, max_batches=2,
                                   device="cpu").to_dict(),
        "export": varshift.export_file(model, tmp / "e.onnx", input_shape="1,1,8,8").to_dict(),
    }


@pytest.mark.parametrize("kind", schema.KINDS)
def test_schema_is_valid_draft_2020_12(kind: str) -> None:
    sch = schema.load_schema(kind)
    assert sch["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(sch)
    assert sch["properties"]["schema"] == {**sch["properties"]["schema"], "const": f"varshift.{kind}/1"}


@pytest.mark.parametrize("kind", schema.KINDS)
def test_real_documents_validate(documents, kind: str) -> None:
    doc = json.loads(json.dumps(documents[kind]))  # as a CI user parses it
    assert schema.kind_of(doc) == kind
    schema.validate(doc)


def test_nested_documents_are_checked_too(documents) -> None:
    doc = copy.deepcopy(documents["recalibrate"])
    assert doc["onnx"]["schema"] == "varshift.export/1"
    schema.validate(doc["onnx"])
    del doc["onnx"]["passed"]
    with pytest.raises(jsonschema.ValidationError, match="'passed' is a required property"):
        schema.validate(doc["onnx"])
    with pytest.raises(jsonschema.ValidationError, match="onnx"):
        schema.validate(doc)
    swap = copy.deepcopy(documents["swap"])
    swap["recalibration"]["estimator"] = "median"
    with pytest.raises(jsonschema.ValidationError, match="median"):
        schema.validate(swap)


@pytest.mark.parametrize("kind,path,value", [
    ("scan", ["findings", 0, "severity"], "fatal"),
    ("scan", ["summary", "passed"], "no"),
    ("probe", ["layers", 0, "shift"], "2.3x"),
    ("probe", ["summary", "samples"], -1),
    ("recalibrate", ["metrics", "after", "accuracy"], 99.4),  # a fraction, not a percentage
    ("export", ["checks", 0, "batch_size"], 1.5),
    ("swap", ["to"], "dropconnect"),
])
def test_wrong_values_are_rejected(documents, kind, path, value) -> None:
    doc = copy.deepcopy(documents[kind])
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        schema.validate(doc)


@pytest.mark.parametrize("kind", schema.KINDS)
def test_missing_stable_keys_are_rejected_and_new_keys_accepted(documents, kind) -> None:
    doc = copy.deepcopy(documents[kind])
    doc["added_in_a_later_version"] = {"anything": 1}
    schema.validate(doc)  # keys may be added: consumers must accept them
    for key in schema.load_schema(kind)["required"]:
        broken = {k: v for k, v in doc.items() if k != key}
        with pytest.raises(jsonschema.ValidationError, match=f"'{key}' is a required property"):
            schema.validate(broken, kind)


def test_schema_ids_are_the_shipped_ones(documents) -> None:
    """The ids CI users parse: changing them breaks pipelines."""
    assert {k: d["schema"] for k, d in documents.items()} == {
        k: f"varshift.{k}/1" for k in schema.KINDS
    }
    with pytest.raises(ValueError, match="not a varshift report"):
        schema.kind_of({"schema": "other/1"})


def test_api_reports_validate_too() -> None:
    batches = load_data(SAMPLES / "digits_calib.pt", max_batches=1)
    model = varshift.load_model(SAMPLES / "digits_dropout_bn.pt").module
    schema.validate(varshift.probe(model, batches).to_dict())
    fixed, rep = varshift.recalibrate(model, batches)
    doc = rep.to_dict()
    assert doc["output"] is None and doc["source"] is None
    schema.validate(doc)
