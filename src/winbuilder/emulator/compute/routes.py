"""URL routing of the emulated Compute API: (verb, path) -> (method id, path parameters).

The routes are built from the ``path`` templates of the discovery document for the methods in ``COVERED``, under
the service path ``/compute/v1/``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import unquote

from winbuilder.emulator.compute import schema
from winbuilder.emulator.compute.errors import ApiError

#: Service path prefix of Compute v1 (discovery ``servicePath``).
SERVICE_PATH = "/compute/v1/"

#: Method ids the emulator implements (see COVERAGE.md).
COVERED: tuple[str, ...] = (
    "compute.instances.insert",
    "compute.instances.get",
    "compute.instances.list",
    "compute.instances.aggregatedList",
    "compute.instances.delete",
    "compute.instances.setMetadata",
    "compute.instances.getSerialPortOutput",
    "compute.instances.getGuestAttributes",
    "compute.zoneOperations.get",
    "compute.zoneOperations.wait",
    "compute.globalOperations.get",
    "compute.globalOperations.wait",
    "compute.firewalls.insert",
    "compute.firewalls.get",
    "compute.firewalls.delete",
    "compute.firewalls.list",
    "compute.images.getFromFamily",
    "compute.images.get",
    "compute.regions.get",
    "compute.zones.list",
    "compute.zones.get",
    "compute.disks.get",
    "compute.disks.list",
)


@dataclass(frozen=True)
class Route:
    """One route: an HTTP verb and a compiled discovery path template."""

    method_id: str
    verb: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class Match:
    """A routed request: the discovery method id and its decoded path parameters."""

    method_id: str
    path_params: dict[str, str]


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    regex = "".join(
        f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(regex + r"\Z")


@functools.cache
def routes() -> tuple[Route, ...]:
    """The route table, longest (most specific) templates first."""
    table = []
    for method_id in COVERED:
        entry = schema.method(method_id)
        table.append(Route(method_id, entry["httpMethod"], _compile(entry["path"])))
    table.sort(key=lambda r: -len(r.pattern.pattern))
    return tuple(table)


def match(verb: str, path: str) -> Match:
    """Routes a request.

    Args:
        verb: HTTP method (``GET``, ``POST``, ``DELETE``...).
        path: the URL path without query, starting with ``/compute/v1/``.

    Raises:
        ApiError: 404 when no template matches (as the real front end), 405 when only the verb is wrong.
    """
    if not path.startswith(SERVICE_PATH):
        raise ApiError(404, f"The requested URL {path} was not found on this server.", "notFound")
    rel = path[len(SERVICE_PATH):]
    verb_mismatch = False
    for route in routes():
        found = route.pattern.match(rel)
        if not found:
            continue
        if route.verb != verb:
            verb_mismatch = True
            continue
        return Match(route.method_id, {k: unquote(v) for k, v in found.groupdict().items()})
    if verb_mismatch:
        raise ApiError(405, f"Method {verb} is not allowed on {path}.", "httpMethodNotAllowed")
    raise ApiError(404, f"The requested URL {path} was not found on this server.", "notFound")
