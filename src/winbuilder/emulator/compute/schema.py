"""The Compute Engine v1 discovery document, and request-body validation against it.

The document is the one that ships inside google-api-python-client
(``googleapiclient/discovery_cache/documents/compute.v1.json``). Bodies are proto3 JSON: int64/uint64 fields are
strings (numbers are accepted too, as the real front end does), ``byte`` fields are base64 strings.

Error messages copy the shape of the real front end (ESF), which reports proto field paths in snake_case rooted at
the request field, e.g. ``instance_resource.network_interfaces[0]``:

* unknown field: ``Invalid JSON payload received. Unknown name "nmae" at 'instance_resource': Cannot find field.``
* wrong type: ``Invalid value at 'instance_resource.can_ip_forward' (TYPE_BOOL), "yes"``
* list for a singular field: ``Invalid JSON payload received. Proto field is not repeating, cannot start list.``
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

from winbuilder.emulator.compute.errors import ApiError

#: Relative location of the discovery document inside the ``googleapiclient`` package.
DISCOVERY_RELPATH = Path("discovery_cache/documents/compute.v1.json")


@functools.cache
def discovery() -> dict[str, Any]:
    """Loads (once) the Compute v1 discovery document.

    Returns:
        The parsed document (``resources``, ``schemas``, ``parameters``, ...).

    Raises:
        RuntimeError: google-api-python-client (the ``emulator`` extra) is not installed.
    """
    spec = importlib_util.find_spec("googleapiclient")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the GCE emulator needs google-api-python-client (pip install winbuilder[emulator])")
    path = Path(next(iter(spec.submodule_search_locations))) / DISCOVERY_RELPATH
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


def method(method_id: str) -> dict[str, Any]:
    """Returns the discovery entry of a method.

    Args:
        method_id: e.g. ``compute.instances.insert``.

    Raises:
        KeyError: no such method.
    """
    _, resource, name = method_id.split(".")
    entry: dict[str, Any] = discovery()["resources"][resource]["methods"][name]
    return entry


def snake(name: str) -> str:
    """``networkInterfaces`` -> ``network_interfaces``; ``IPProtocol`` -> ``i_p_protocol`` (as protoc does)."""
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name).lstrip("_")


def request_field(schema_name: str) -> str:
    """The proto request field that carries a body of this schema: ``Instance`` -> ``instance_resource``."""
    return snake(schema_name) + "_resource"


_PROTO_TYPE = {
    ("string", None): "TYPE_STRING",
    ("string", "int64"): "TYPE_INT64",
    ("string", "uint64"): "TYPE_UINT64",
    ("string", "byte"): "TYPE_BYTES",
    ("integer", "int32"): "TYPE_INT32",
    ("integer", "uint32"): "TYPE_UINT32",
    ("number", "double"): "TYPE_DOUBLE",
    ("number", "float"): "TYPE_FLOAT",
    ("boolean", None): "TYPE_BOOL",
}

_INT_RE = re.compile(r"-?\d+\Z")


def _type_error(path: str, prop: dict[str, Any], value: Any, ref: str | None = None) -> str:
    if ref is not None:
        kind = f"type.googleapis.com/google.cloud.compute.v1.{ref}"
    else:
        kind = _PROTO_TYPE.get((prop.get("type", ""), prop.get("format")), "TYPE_STRING")
    return f"Invalid value at '{path}' ({kind}), {json.dumps(value)}"


def _check_scalar(prop: dict[str, Any], value: Any) -> bool:
    kind, fmt = prop.get("type"), prop.get("format")
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer" or (kind == "string" and fmt in ("int64", "uint64")):
        if isinstance(value, bool):
            return False
        if isinstance(value, int):
            number = value
        elif (isinstance(value, float) and value.is_integer()) or (
                isinstance(value, str) and _INT_RE.match(value.strip())):
            number = int(value)
        else:
            return False
        return not (fmt in ("uint32", "uint64") and number < 0)
    if kind == "number":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"))
    if kind == "string" and fmt == "byte":
        if not isinstance(value, str):
            return False
        try:
            base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_" if "-" in value or "_" in value
                             else None, validate=True)
        except (binascii.Error, ValueError):
            return False
        return True
    if kind == "string":
        return isinstance(value, str)
    return True  # "any"


def _walk(schema: dict[str, Any], value: Any, path: str, ref: str | None, out: list[str]) -> None:
    schemas = discovery()["schemas"]
    if "$ref" in schema:
        ref = schema["$ref"]
        schema = schemas[ref]
    kind = schema.get("type")
    if value is None:
        return  # JSON null means "unset" in proto3 JSON
    if kind == "array":
        if not isinstance(value, list):
            out.append(_type_error(path, schema.get("items", {}), value))
            return
        for i, item in enumerate(value):
            _walk(schema.get("items", {}), item, f"{path}[{i}]", None, out)
        return
    if kind == "object" or "properties" in schema:
        if isinstance(value, list):
            out.append("Invalid JSON payload received. Proto field is not repeating, cannot start list.")
            return
        if not isinstance(value, dict):
            out.append(_type_error(path, schema, value, ref or "Struct"))
            return
        if "additionalProperties" in schema and "properties" not in schema:
            for key, item in value.items():
                _walk(schema["additionalProperties"], item, f"{path}[{key}]", None, out)
            return
        props: dict[str, Any] = schema.get("properties", {})
        for key, item in value.items():
            if key not in props:
                out.append(f"Invalid JSON payload received. Unknown name {json.dumps(key)} at '{path}': "
                           "Cannot find field.")
                continue
            _walk(props[key], item, f"{path}.{snake(key)}", None, out)
        return
    if isinstance(value, (dict, list)):
        if isinstance(value, list):
            out.append("Invalid JSON payload received. Proto field is not repeating, cannot start list.")
        else:
            out.append(f"Invalid JSON payload received. Unknown name at '{path}': "
                       "Proto field is not a message, cannot start object.")
        return
    if not _check_scalar(schema, value):
        out.append(_type_error(path, schema, value))


def violations(schema_name: str, body: Any) -> list[str]:
    """Lists what is wrong with a request body, in the real front end's words (empty if valid).

    Args:
        schema_name: the discovery schema of the body, e.g. ``Instance``, ``Metadata``, ``Firewall``.
        body: the parsed JSON body.
    """
    out: list[str] = []
    root = request_field(schema_name)
    if not isinstance(body, dict):
        return [f"Invalid JSON payload received. Expected an object at '{root}'."]
    _walk({"$ref": schema_name}, body, root, None, out)
    return out


def validate_body(schema_name: str, body: Any) -> None:
    """Validates a request body against a discovery schema.

    Args:
        schema_name: the discovery schema, e.g. ``Instance``.
        body: the parsed JSON body.

    Raises:
        ApiError: 400 ``invalid`` (status INVALID_ARGUMENT) with one ``fieldViolations`` entry per problem;
            the message is the first problem, as the real API reports it.
    """
    problems = violations(schema_name, body)
    if problems:
        root = request_field(schema_name)
        details = ({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": root, "description": p} for p in problems],
        },)
        raise ApiError(400, problems[0], "invalid", details=details)


def enum_values(schema_name: str, *field_path: str) -> list[str]:
    """The allowed values of an enum-like string field, e.g. ``enum_values("Scheduling",
    "instanceTerminationAction")``. Empty when the field has no enum."""
    schemas = discovery()["schemas"]
    node: dict[str, Any] = schemas[schema_name]
    for name in field_path:
        node = node["properties"][name]
        if "$ref" in node:
            node = schemas[node["$ref"]]
    values: list[str] = node.get("enum", [])
    return values
