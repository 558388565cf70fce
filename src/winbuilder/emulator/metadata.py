"""A fake GCE metadata server: what google-auth's Application Default Credentials read on Compute Engine.

Served on the same port as the emulated Compute API (``winbuilder.emulator.compute.server``). Point google-auth at
it with ``GCE_METADATA_HOST=host:port`` and ``GCE_METADATA_IP=host:port`` (set before ``google.auth`` is imported:
``google.auth.compute_engine._metadata`` reads ``GCE_METADATA_HOST`` at import time).

Paths (public doc "About VM metadata"; every answer carries ``Metadata-Flavor: Google``, and every request must
carry it too, else 403, as on GCE):

* ``GET /`` -- the ping google-auth uses to detect GCE.
* ``/computeMetadata/v1/project/project-id``, ``project/numeric-project-id``.
* ``/computeMetadata/v1/instance/service-accounts/default/?recursive=true`` -- ``{email, scopes, aliases}``.
* ``/computeMetadata/v1/instance/service-accounts/{default|email}/email``, ``/scopes``, ``/token`` --
  the token is ``{access_token, expires_in, token_type}`` and is what the emulated API accepts as a bearer token.
* ``/computeMetadata/v1/universe/universe-domain`` -- ``googleapis.com``.
* ``/computeMetadata/v1/instance/zone``, ``instance/id``, ``instance/hostname``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass

FLAVOR_HEADER = "Metadata-Flavor"
FLAVOR = "Google"
ROOT = "/computeMetadata/v1/"


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, content type, body bytes and extra headers."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class MetadataIdentity:
    """What the metadata server says about "this VM" (the CI runner the tool pretends to run on).

    Attributes:
        project: project id.
        email: the default service account's email.
        scopes: the default service account's scopes.
        zone: the runner's zone.
        issue_token: returns ``(token, expires_in_seconds)``; tokens must be accepted by the emulated API.
    """

    project: str
    email: str
    scopes: tuple[str, ...]
    zone: str
    issue_token: Callable[[], tuple[str, int]]


def _text(status: int, text: str) -> Reply:
    return Reply(status, "application/text", text.encode("utf-8"), ((FLAVOR_HEADER, FLAVOR),))


def _json(value: object) -> Reply:
    return Reply(200, "application/json", json.dumps(value).encode("utf-8"), ((FLAVOR_HEADER, FLAVOR),))


def is_metadata_path(path: str) -> bool:
    """Whether a request path belongs to the metadata server (``/`` or ``/computeMetadata/...``)."""
    return path in ("", "/") or path.startswith("/computeMetadata/")


def handle(method: str, path: str, query: dict[str, list[str]], flavor: str | None,
           identity: MetadataIdentity) -> Reply:
    """Answers one metadata request.

    Args:
        method: HTTP verb (GET, or POST for bound-token requests).
        path: URL path without the query.
        query: decoded query (``parse_qs`` shape); ``recursive=true`` is honoured for service accounts.
        flavor: the request's ``Metadata-Flavor`` header value (None when absent).
        identity: what to report.

    Returns:
        The reply (never raises for bad input: 403/404/405 replies instead).
    """
    if path in ("", "/"):
        return _text(200, "computeMetadata/\n")
    if flavor != FLAVOR:
        return _text(403, "Missing required header \"Metadata-Flavor\": \"Google\"\n")
    if method not in ("GET", "POST"):
        return _text(405, "Method not allowed\n")
    rel = path[len(ROOT):] if path.startswith(ROOT) else None
    if rel is None:
        return _text(404, "Not Found\n")
    recursive = query.get("recursive", ["false"])[-1].lower() == "true"
    numeric = str(zlib.crc32(identity.project.encode()) % 10**12)
    simple = {
        "project/project-id": identity.project,
        "project/numeric-project-id": numeric,
        "universe/universe-domain": "googleapis.com",
        "instance/zone": f"projects/{numeric}/zones/{identity.zone}",
        "instance/id": str(zlib.crc32(b"runner") * 1000003),
        "instance/hostname": f"ci-runner.{identity.zone}.c.{identity.project}.internal",
        "instance/service-accounts/": "default/\n" + identity.email + "/\n",
    }
    if rel in simple:
        return _text(200, simple[rel])
    prefix = "instance/service-accounts/"
    if rel.startswith(prefix):
        account, _, leaf = rel[len(prefix):].partition("/")
        if account not in ("default", identity.email):
            return _text(404, "Not Found\n")
        info = {"aliases": ["default"], "email": identity.email, "scopes": list(identity.scopes)}
        if leaf == "" and recursive:
            return _json(info)
        if leaf == "":
            return _text(200, "aliases\nemail\nidentity\nscopes\ntoken\n")
        if leaf == "email":
            return _text(200, identity.email)
        if leaf == "scopes":
            return _text(200, "\n".join(identity.scopes) + "\n")
        if leaf == "aliases":
            return _text(200, "default\n")
        if leaf == "token":
            token, expires_in = identity.issue_token()
            return _json({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"})
    return _text(404, "Not Found\n")
