"""The fault schedule of the GCE emulator: a small frozen dataclass, loadable from JSON, settable in-process.

JSON shape (every key optional)::

    {
      "http": [{"method": "instances.insert", "call": 1, "status": 429, "times": 1}],
      "operations": [{"method": "instances.insert", "code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                      "zone": "us-central1-a", "times": null}],
      "agent_delay": 0.0,
      "agent_error": "The user account is disabled.",
      "metadata_conflicts": 1,
      "winrm_late": 0.0,
      "winrm_drop_after": null
    }

* ``http``: answer HTTP ``status`` (429 or 503) instead of serving calls ``call`` .. ``call + times - 1``
  (1-based, counted per method) of ``method`` (``instances.insert`` or ``compute.instances.insert``).
* ``operations``: the operation of ``method`` ends DONE with ``error.errors[0].code = code`` (and the real API's
  message for it). ``zone`` limits it to one zone; ``times`` to that many operations (null = every time).
  ``code: "STALL"`` keeps the operation RUNNING forever instead.
* ``agent_delay``: extra seconds before the password agent reacts to ``windows-keys`` (a slow agent).
* ``agent_error``: the agent answers every key with ``passwordFound: false`` and this ``errorMessage``.
* ``metadata_conflicts``: that many ``setMetadata`` calls first find that "someone else" changed the metadata
  (an unrelated key is added, the fingerprint moves) and fail with 412 ``conditionNotMet``.
* ``winrm_late``: WinRM starts accepting this many seconds after "Instance setup finished".
* ``winrm_drop_after``: WinRM stops accepting (the guest's listeners close) this many seconds after it started.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _short(method: str) -> str:
    return method.removeprefix("compute.")


@dataclass(frozen=True)
class HttpFault:
    """Answer ``status`` to calls number ``call`` .. ``call + times - 1`` (1-based) of ``method``."""

    method: str
    status: int = 429
    call: int = 1
    times: int = 1

    def hits(self, method_id: str, number: int) -> bool:
        """Whether call ``number`` (1-based) of ``method_id`` gets this fault."""
        return _short(self.method) == _short(method_id) and self.call <= number < self.call + self.times


@dataclass(frozen=True)
class OperationFault:
    """End the operation of ``method`` (optionally only in ``zone``) with error ``code``; ``times`` None = always.

    ``code`` ``"STALL"`` is special: the operation stays RUNNING forever (``wait`` returns it RUNNING after the
    emulator's ``wait_timeout``), to exercise a client's own deadline.
    """

    method: str
    code: str
    zone: str | None = None
    times: int | None = None


@dataclass(frozen=True)
class FaultSchedule:
    """Faults to inject; see the module docstring for the meaning of each field. Times are seconds."""

    http: tuple[HttpFault, ...] = ()
    operations: tuple[OperationFault, ...] = ()
    agent_delay: float = 0.0
    agent_error: str | None = None
    metadata_conflicts: int = 0
    winrm_late: float = 0.0
    winrm_drop_after: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultSchedule:
        """Builds a schedule from its JSON shape.

        Raises:
            ValueError: unknown keys or badly shaped entries.
        """
        known = {"http", "operations", "agent_delay", "agent_error", "metadata_conflicts", "winrm_late",
                 "winrm_drop_after"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        try:
            return cls(
                http=tuple(HttpFault(**h) for h in data.get("http", [])),
                operations=tuple(OperationFault(**o) for o in data.get("operations", [])),
                agent_delay=float(data.get("agent_delay", 0.0)),
                agent_error=data.get("agent_error"),
                metadata_conflicts=int(data.get("metadata_conflicts", 0)),
                winrm_late=float(data.get("winrm_late", 0.0)),
                winrm_drop_after=(None if data.get("winrm_drop_after") is None
                                  else float(data["winrm_drop_after"])),
            )
        except TypeError as exc:
            raise ValueError(f"bad fault entry: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> FaultSchedule:
        """Reads a schedule from a JSON file.

        Raises:
            ValueError: malformed JSON or schedule.
            OSError: the file cannot be read.
        """
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


#: Real-looking messages of operation error codes ({zone}, {region} and {project} are filled in).
OPERATION_ERROR_MESSAGES = {
    "ZONE_RESOURCE_POOL_EXHAUSTED": (
        "The zone 'projects/{project}/zones/{zone}' does not have enough resources available to fulfill the "
        "request.  Try a different zone, or try again later."),
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS": (
        "The zone 'projects/{project}/zones/{zone}' does not have enough resources available to fulfill the "
        "request.  '(resource type:compute)'."),
    "QUOTA_EXCEEDED": "Quota 'CPUS' exceeded.  Limit: 24.0 in region {region}.",
    "RESOURCE_NOT_FOUND": "The resource 'projects/{project}/zones/{zone}' was not found",
}
