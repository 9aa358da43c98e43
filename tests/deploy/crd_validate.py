"""Validate a custom resource against its CRD's openAPIV3Schema, with the apiserver's strict field validation.

The CRDs under tests/deploy/crds/ are the upstream files. Their schemas are Kubernetes *structural* schemas, which
never say `additionalProperties: false`: the apiserver instead prunes every field a schema does not declare, and
with strict field validation (kubectl's default, `--validate=strict`) refuses the object instead. This helper does
the same by closing every object schema that lists `properties` (unless it sets
`x-kubernetes-preserve-unknown-fields` or an `additionalProperties` schema of its own), then validates with the
`jsonschema` package (Draft 4, the dialect OpenAPI v3 schemas are written in). `nullable: true` becomes a null type.
Not checked: CEL rules (`x-kubernetes-validations`), `format`, and defaulting. So a pass means "the fields, types,
enums, patterns and required keys are right", not a full admission.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parent / "crds"
EMBEDDED_KEYS = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
OBJECT_META = {
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "finalizers",
    "ownerReferences",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


LOGIC = ("anyOf", "allOf", "oneOf")


def _strict(node: dict, close: bool = True) -> dict:
    """A copy of a structural schema in which undeclared fields are errors (see the module docstring). Branches of
    anyOf/allOf/oneOf/not stay open: a structural schema declares every field on the node itself."""
    out = dict(node)
    if "properties" in node:
        out["properties"] = {name: _strict(sub) for name, sub in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        out["items"] = _strict(node["items"])
    for key in LOGIC:
        if key in node:
            out[key] = [_strict(branch, close=False) for branch in node[key]]
    if "not" in node:
        out["not"] = _strict(node["not"], close=False)
    if node.get("x-kubernetes-embedded-resource"):
        out["properties"] = {**EMBEDDED_KEYS, **out.get("properties", {})}
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if close and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=16)
def _load(crd_path: Path) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(crd_path.read_text(), Loader=loader)


@functools.lru_cache(maxsize=32)
def _schema(crd_path: Path, version: str) -> dict:
    crd = _load(crd_path)
    for served in crd["spec"]["versions"]:
        if served["name"] == version and served.get("served", True):
            schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])
            schema.setdefault("properties", {})["metadata"] = {
                "type": "object",
                "properties": {"labels": STRING_MAP, "annotations": STRING_MAP}
                | {key: {} for key in OBJECT_META - {"labels", "annotations"}},
                "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
            }
            return _strict(schema)
    names = [v["name"] for v in crd["spec"]["versions"]]
    raise jsonschema.ValidationError(f"{crd_path.name} serves no version {version!r} (it has {names})")


def crd_path(project: str, plural_file: str) -> Path:
    """A vendored CRD: crd_path("keda", "keda.sh_scaledobjects.yaml")."""
    return CRDS / project / plural_file


def schema_for(obj: dict, crd_path: Path) -> dict:
    """The strict schema of ``obj``'s version; its apiVersion and kind must be the CRD's."""
    crd = _load(Path(crd_path))
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    kind = crd["spec"]["names"]["kind"]
    if group != crd["spec"]["group"] or obj.get("kind") != kind:
        raise jsonschema.ValidationError(
            f"{obj.get('apiVersion')}/{obj.get('kind')} is not {crd['spec']['group']}/{kind} of {Path(crd_path).name}"
        )
    return _schema(Path(crd_path), version)


def errors(obj: dict, crd_path: Path) -> list[str]:
    """Every violation, each as "<path>: <message>" (empty: valid)."""
    try:
        schema = schema_for(obj, crd_path)
    except jsonschema.ValidationError as exc:
        return [exc.message]
    validator = jsonschema.Draft4Validator(schema)
    found = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


def validate(obj: dict, crd_path: Path) -> None:
    """Raise jsonschema.ValidationError listing every violation of ``obj`` against its CRD."""
    found = errors(obj, crd_path)
    if found:
        raise jsonschema.ValidationError("\n".join(found))
