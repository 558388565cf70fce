"""Request parsing and validation for the emulated Compute API. No state lives here (moto's ``responses.py``).

A request becomes a ``Request``: the discovery method id, typed parameters (path and query, by their discovery
types) and the validated JSON body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from winbuilder.emulator.compute import schema
from winbuilder.emulator.compute.errors import ApiError
from winbuilder.emulator.compute.routes import Match

#: Query parameters every Google API accepts (discovery top-level ``parameters``), plus the ``$``-prefixed
#: system parameters the generated clients send (``$alt=json;enum-encoding=int``).
_SYSTEM_PREFIX = "$"


@dataclass(frozen=True)
class Request:
    """A parsed, validated API request.

    Attributes:
        method_id: e.g. ``compute.instances.insert``.
        params: path and query parameters, converted by discovery type (``integer`` and int64 ``string`` ->
            ``int``, ``boolean`` -> ``bool``, the rest ``str``).
        body: the request body (validated against the method's request schema) or None.
    """

    method_id: str
    params: dict[str, Any]
    body: dict[str, Any] | None = field(default=None)

    def param(self, name: str, default: Any = None) -> Any:
        """A parameter value, or ``default`` when absent."""
        return self.params.get(name, default)


def _convert(name: str, spec: dict[str, Any], raw: str) -> Any:
    kind, fmt = spec.get("type"), spec.get("format")
    if kind == "integer" or (kind == "string" and fmt in ("int64", "uint64")):
        try:
            return int(raw)
        except ValueError:
            proto = {"int32": "TYPE_INT32", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64"}.get(
                fmt or "", "TYPE_INT64")
            raise ApiError(400, f"Invalid value at '{schema.snake(name)}' ({proto}), \"{raw}\"") from None
    if kind == "boolean":
        if raw not in ("true", "false"):
            raise ApiError(400, f"Invalid value at '{schema.snake(name)}' (TYPE_BOOL), \"{raw}\"")
        return raw == "true"
    if "enum" in spec and raw not in spec["enum"]:
        raise ApiError(400, f"Invalid value at '{schema.snake(name)}', \"{raw}\"")
    return raw


def parse(routed: Match, query: dict[str, list[str]], raw_body: bytes) -> Request:
    """Parses and validates one request.

    Args:
        routed: the route match (method id and path parameters).
        query: the decoded query string (``urllib.parse.parse_qs`` shape).
        raw_body: the request body bytes (may be empty).

    Returns:
        The parsed request.

    Raises:
        ApiError: 400 for an unknown query parameter, a badly typed parameter, a missing required parameter,
            malformed JSON, or a body that does not match the discovery schema; 400 when a body is sent to a
            method that takes none is tolerated only if it is empty or ``{}``.
    """
    entry = schema.method(routed.method_id)
    specs: dict[str, Any] = entry.get("parameters", {})
    globals_: dict[str, Any] = schema.discovery().get("parameters", {})
    params: dict[str, Any] = {}
    for name, value in routed.path_params.items():
        params[name] = _convert(name, specs.get(name, {}), value)
    for name, values in query.items():
        if name.startswith(_SYSTEM_PREFIX) or name in globals_:
            continue
        if name not in specs or specs[name].get("location") != "query":
            raise ApiError(
                400, f"Invalid JSON payload received. Unknown name \"{name}\": Cannot bind query parameter. "
                     f"Field '{name}' could not be found in request message.")
        params[name] = _convert(name, specs[name], values[-1])
    for name in entry.get("parameterOrder", []):
        if name not in params:
            raise ApiError(400, f"Required parameter '{name}' is missing.", "required")
    body: dict[str, Any] | None = None
    request_schema = entry.get("request", {}).get("$ref")
    if raw_body.strip():
        try:
            parsed = json.loads(raw_body)
        except ValueError:
            raise ApiError(400, "Invalid JSON payload received. Unexpected token.", "parseError") from None
        if request_schema is None:
            if parsed not in ({}, None):
                raise ApiError(400, "Invalid JSON payload received. Unknown name: Cannot find field.")
        else:
            schema.validate_body(request_schema, parsed)
            body = parsed
    elif request_schema is not None:
        raise ApiError(400, f"Required field '{schema.request_field(request_schema)}' not specified", "required")
    return Request(routed.method_id, params, body)
