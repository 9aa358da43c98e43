"""Validate a custom resource against its CustomResourceDefinition's ``openAPIV3Schema`` with ``jsonschema``.

``validate(obj, crd_path)`` checks that ``obj``'s apiVersion and kind are served by the CRD, then validates it
against that version's schema made strict the way ``kubectl apply --validate=strict`` is: a field the schema
does not declare is an error, unless the schema keeps unknown fields there
(``x-kubernetes-preserve-unknown-fields: true``) or declares a map (``additionalProperties``). The OpenAPI
extensions are translated to JSON Schema (``nullable``, ``x-kubernetes-int-or-string``,
``x-kubernetes-embedded-resource``) and the root ``metadata`` gets ObjectMeta's common fields. CEL rules
(``x-kubernetes-validations``) and formats are not checked: a pass means the fields and types are right,
not a full apiserver admission.

Usable for any CRD (KServe, KEDA, Prometheus Operator, Kubeflow Trainer)::

    from crd_schema import validate
    validate(yaml.safe_load(text), CRDS / "kserve" / "serving.kserve.io_servingruntimes.yaml")
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

PRESERVE = "x-kubernetes-preserve-unknown-fields"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# ObjectMeta's fields a manifest sets (the server fills the rest); strict like the rest of the object
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}
EMBEDDED = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}


class CRDValidationError(AssertionError):
    """``obj`` does not fit the CRD; the message lists every failing path."""


@functools.lru_cache(maxsize=16)
def load_crd(crd_path: Path) -> dict[str, Any]:
    """The parsed CRD (cached: the InferenceService CRD is 2 MB of YAML; treat the result as read-only)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(crd_path, encoding="utf-8") as f:
        crd = yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{crd_path} is not a CustomResourceDefinition")
    return crd


def openapi_schema(crd_path: Path, version: str | None = None) -> dict[str, Any]:
    """The ``openAPIV3Schema`` of ``version`` (default: the storage version), as the CRD states it."""
    versions = load_crd(Path(crd_path))["spec"]["versions"]
    chosen = [v for v in versions if v["name"] == version] if version else [v for v in versions if v.get("storage")]
    if not chosen:
        served = ", ".join(v["name"] for v in versions)
        raise ValueError(f"{crd_path} has no version {version!r} (it has {served})")
    return chosen[0]["schema"]["openAPIV3Schema"]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema (draft 4, as OpenAPI 3.0) of ``schema`` that refuses undeclared fields (a deep copy)."""
    out = copy.deepcopy(schema)
    _tighten(out)
    return out


def _tighten(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _tighten(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        node.setdefault("properties", {})
        for key, value in EMBEDDED.items():
            node["properties"].setdefault(key, value)
    # declared fields only; a bare `type: object` (no properties) keeps anything, as the apiserver does
    if "properties" in node and "additionalProperties" not in node and not node.get(PRESERVE):
        node["additionalProperties"] = False
    for key in ("properties", "patternProperties", "definitions"):
        for child in node.get(key, {}).values():
            _tighten(child)
    for key in ("items", "additionalProperties", "not"):
        _tighten(node.get(key))
    for key in ("anyOf", "allOf", "oneOf"):
        _tighten(node.get(key))


@functools.lru_cache(maxsize=16)
def crd_validator(crd_path: Path, version: str | None = None) -> jsonschema.Draft4Validator:
    """A validator for objects of ``version`` (cached, like the CRD it comes from)."""
    schema = strict(openapi_schema(crd_path, version))
    schema["properties"]["metadata"] = OBJECT_META
    return jsonschema.Draft4Validator(schema)


CRDS = Path(__file__).resolve().parent / "crds"


def crd_path(project: str, file_name: str) -> Path:
    """A vendored CRD: ``crd_path("keda", "keda.sh_scaledobjects.yaml")``."""
    return CRDS / project / file_name


def errors(obj: dict[str, Any], crd_path: Path) -> list[str]:
    """Every violation of ``obj`` against its CRD, each as "<path>: <message>" (empty: valid)."""
    crd = load_crd(Path(crd_path))["spec"]
    group, kind = crd["group"], crd["names"]["kind"]
    served = {f"{group}/{v['name']}": v["name"] for v in crd["versions"] if v.get("served")}
    api_version = obj.get("apiVersion")
    if obj.get("kind") != kind or api_version not in served:
        return [f"{obj.get('kind')} {api_version} is not served by {Path(crd_path).name} ({kind} {', '.join(served)})"]
    found = sorted(crd_validator(Path(crd_path), served[api_version]).iter_errors(obj), key=lambda e: list(e.path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


def validate(obj: dict[str, Any], crd_path: Path) -> None:
    """Raise :class:`CRDValidationError` unless ``obj`` is a valid, strictly typed object of the CRD's kind."""
    found = errors(obj, crd_path)
    if found:
        name = obj.get("metadata", {}).get("name", "?")
        lines = [f"  {line}" for line in found[:20]]
        more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
        raise CRDValidationError(f"{obj.get('kind')}/{name} fails {Path(crd_path).name}:\n" + "\n".join(lines) + more)
