"""The YAML CRDs and the pydantic models in lorafleet/crds.py describe the same fields, types, required-ness, enums,
bounds and defaults; and the API server's defaulting produces exactly what the models produce."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from lorafleet import crds
from lorafleet.controlplane import ControlPlane

_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "pattern", "enum")
_CEL_MATCHES = re.compile(r'^self\.matches\(r"(.*)"\)$')
_CEL_IN = re.compile(r"^self in \[(.*)\]$")  # an enum whose refusal message says why (placement)


def crd_doc(kind: str) -> dict[str, Any]:
    return yaml.safe_load(crds.CRD_FILES[kind].read_text())


def crd_schema(kind: str) -> dict[str, Any]:
    (version,) = crd_doc(kind)["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def norm_crd(node: dict[str, Any]) -> dict[str, Any]:
    """Canonical form of a structural-schema node (descriptions, formats and CEL combination rules dropped)."""
    if node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in node:
        return {"type": "open-object"}
    out: dict[str, Any] = {"type": node["type"]}
    out.update({k: node[k] for k in _BOUNDS if k in node})
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if bound in node:
            out[exclusive if node.get(exclusive) else bound] = node[bound]
    for rule in node.get("x-kubernetes-validations", []):
        if m := _CEL_MATCHES.match(rule["rule"]):
            out["pattern"] = m.group(1)
        elif m := _CEL_IN.match(rule["rule"]):
            out["enum"] = [v.strip().strip("'") for v in m.group(1).split(",")]
    if "default" in node and node["type"] != "object":
        out["default"] = node["default"]
    if node["type"] == "object":
        out["properties"] = {k: norm_crd(v) for k, v in node.get("properties", {}).items()}
        out["required"] = sorted(node.get("required", []))
        if "additionalProperties" in node:
            out["additionalProperties"] = norm_crd(node["additionalProperties"])
    if node["type"] == "array":
        out["items"] = norm_crd(node["items"])
    return out


def norm_py(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Canonical form of a pydantic JSON-schema node (Optional unwrapped, $ref resolved)."""
    if "$ref" in node:
        node = {**defs[node["$ref"].split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    if "anyOf" in node:
        (inner,) = [n for n in node["anyOf"] if n.get("type") != "null"]
        node = {**inner, **{k: v for k, v in node.items() if k != "anyOf"}}
        return norm_py(node, defs)
    if node.get("type") == "object" and node.get("additionalProperties") is True and "properties" not in node:
        return {"type": "open-object"}
    if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
        return {"type": "open-object"}
    out: dict[str, Any] = {"type": node["type"]}
    out.update({k: node[k] for k in _BOUNDS if k in node})
    out.update({k: node[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in node})
    if node.get("default") is not None and node["type"] != "object":
        out["default"] = node["default"]
    if node["type"] == "object":
        out["properties"] = {k: norm_py(v, defs) for k, v in node.get("properties", {}).items()}
        out["required"] = sorted(node.get("required", []))
        if isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = norm_py(node["additionalProperties"], defs)
    if node["type"] == "array":
        out["items"] = norm_py(node["items"], defs)
    return out


def py_schema(model: type) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True)  # type: ignore[attr-defined]
    return norm_py(schema, schema.get("$defs", {}))


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in {'CRD' if key in a else 'Python'}")
            else:
                out += diff(a[key], b[key], f"{path}.{key}")
        return out
    return [] if a == b else [f"{path}: CRD {a!r} != Python {b!r}"]


@pytest.mark.parametrize("kind", crds.KINDS)
@pytest.mark.parametrize("part", ["spec", "status"])
def test_yaml_schema_equals_python_model(kind: str, part: str) -> None:
    models = crds.SPEC_MODELS if part == "spec" else crds.STATUS_MODELS
    yaml_side = norm_crd(crd_schema(kind)["properties"][part])
    py_side = py_schema(models[kind])
    assert diff(yaml_side, py_side) == []
    assert len(yaml_side["properties"]) >= 4  # the comparison really walked fields


@pytest.mark.parametrize("kind", crds.KINDS)
def test_names_and_constants_agree(kind: str) -> None:
    doc = crd_doc(kind)
    spec = doc["spec"]
    assert doc["metadata"]["name"] == f"{crds.PLURALS[kind]}.{crds.GROUP}"
    assert spec["group"] == crds.GROUP
    assert [v["name"] for v in spec["versions"]] == [crds.VERSION]
    assert spec["names"]["kind"] == kind
    assert spec["names"]["plural"] == crds.PLURALS[kind]
    assert spec["names"]["singular"] == crds.SINGULARS[kind]
    assert spec["names"]["shortNames"] == crds.SHORT_NAMES[kind]
    assert spec["names"]["categories"] == [crds.CATEGORY]
    (version,) = spec["versions"]
    assert "status" in version["subresources"]
    assert crd_schema(kind)["required"] == ["spec"]


@pytest.mark.parametrize("kind", crds.KINDS)
def test_printer_columns_point_at_schema_fields(kind: str) -> None:
    (version,) = crd_doc(kind)["spec"]["versions"]
    schema = crd_schema(kind)
    for column in version["additionalPrinterColumns"]:
        node = schema
        for part in column["jsonPath"].lstrip(".").split("."):
            node = node["properties"][part] if part != "metadata" else {"type": "object", "properties": {}}
            if part == "metadata":
                break
        else:
            assert {"integer": "integer", "number": "number", "string": "string"}.get(node["type"]) == column[
                "type"
            ] or (node["type"] == "string" and column["type"] == "date"), column


def test_source_uri_rule_is_the_python_pattern() -> None:
    for kind in ("BaseModel", "LoRAAdapter"):
        uri = crd_schema(kind)["properties"]["spec"]["properties"]["source"]["properties"]["uri"]
        rules = [r["rule"] for r in uri["x-kubernetes-validations"]]
        assert rules == [f'self.matches(r"{crds.SOURCE_URI_PATTERN}")']
    good = [
        "/models/llama",
        "file:///data/m",
        "s3://bucket/key/x",
        "hf://org/repo",
        "hf://org/repo@v1",
        "pvc://claim/a/b",
    ]
    bad = ["ftp://x/y", "relative/path", "hf://only-org", "pvc://Bad_Claim/x", "s3://", "file://relative", ""]
    assert all(re.match(crds.SOURCE_URI_PATTERN, u) for u in good)
    assert not any(re.match(crds.SOURCE_URI_PATTERN, u) for u in bad)


MINIMAL = {
    "BaseModel": {"source": {"uri": "hf://HuggingFaceTB/SmolLM2-135M"}},
    "LoRAAdapter": {"baseModel": "smollm2", "source": {"uri": "/adapters/a"}},
    "ContinualLearningJob": {"adapter": "a"},
}


@pytest.mark.cluster
@pytest.mark.parametrize("kind", crds.KINDS)
def test_api_server_defaults_equal_python_defaults(crds_installed: ControlPlane, namespace: str, kind: str) -> None:
    """Create a minimal object: every default the API server fills in, at every level, is the model's default."""
    body = {"apiVersion": crds.API_VERSION, "kind": kind, "metadata": {"name": "minimal"}, "spec": MINIMAL[kind]}
    path = f"/apis/{crds.GROUP}/{crds.VERSION}/namespaces/{namespace}/{crds.PLURALS[kind]}"
    created = crds_installed.request("POST", path, body)
    expected = crds.SPEC_MODELS[kind].model_validate(MINIMAL[kind]).model_dump(by_alias=True, exclude_none=True)
    assert created["spec"] == expected
    assert len(str(expected)) > len(str(MINIMAL[kind]))  # defaults were really added
