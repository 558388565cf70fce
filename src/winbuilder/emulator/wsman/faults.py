"""Test hook: a schedule of injected failures for the emulated WS-Management server (``--faults FILE``).

JSON shape (every key but ``kind`` optional)::

    {"rules": [
        {"kind": "wsman_fault", "action": "Receive", "nth": 3, "code": 2150859174},
        {"kind": "drop", "action": "Send", "nth": 2, "after": true},
        {"kind": "http_status", "nth": 5, "status": 503, "times": 2}
    ]}

``nth`` counts (from 1) the parsed WS-Man requests whose action matches ``action`` (``null``/absent: any action);
the rule fires for requests ``nth`` .. ``nth + times - 1``. Kinds:

* ``wsman_fault``: answer HTTP 500 with a SOAP fault carrying WSManFault ``code`` (default 2150859174, the
  operations quota) without performing the request.
* ``http_status``: answer ``status`` (default 503) with an empty body, without performing the request.
* ``drop``: close the TCP connection without answering; with ``"after": true`` the request is performed first (the
  client cannot know whether it happened).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["wsman_fault", "http_status", "drop"]


@dataclass(frozen=True)
class FaultRule:
    """One injected failure (see the module docstring)."""

    kind: Kind
    action: str | None = None
    nth: int = 1
    times: int = 1
    code: int = 2150859174
    status: int = 503
    after: bool = False


@dataclass(frozen=True)
class FaultSchedule:
    """A list of rules; the first rule that fires wins."""

    rules: tuple[FaultRule, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultSchedule:
        """Build from the JSON shape above.

        Raises:
            ValueError: unknown kind or key, or a bad value.
        """
        rules = []
        for raw in data.get("rules", []):
            if raw.get("kind") not in ("wsman_fault", "http_status", "drop"):
                raise ValueError(f"unknown fault kind {raw.get('kind')!r}")
            unknown = set(raw) - {"kind", "action", "nth", "times", "code", "status", "after"}
            if unknown:
                raise ValueError(f"unknown fault rule keys: {sorted(unknown)}")
            rule = FaultRule(**raw)
            if rule.nth < 1 or rule.times < 1:
                raise ValueError("nth and times must be >= 1")
            rules.append(rule)
        return cls(tuple(rules))

    @classmethod
    def load(cls, path: str | Path) -> FaultSchedule:
        """Read a JSON schedule file.

        Raises:
            OSError: the file cannot be read.
            ValueError: invalid JSON or rule.
        """
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class FaultCounter:
    """Counts requests per action and decides which rule (if any) fires. Thread-safe."""

    def __init__(self, schedule: FaultSchedule | None) -> None:
        self._rules = schedule.rules if schedule else ()
        self._counts: dict[str | None, int] = {}
        self._lock = threading.Lock()

    def next(self, action: str) -> FaultRule | None:
        """Count one request of ``action`` and return the rule that fires for it, if any."""
        if not self._rules:
            return None
        with self._lock:
            for key in {action, None}:
                self._counts[key] = self._counts.get(key, 0) + 1
            for rule in self._rules:
                if rule.action is not None and rule.action != action:
                    continue
                n = self._counts[rule.action]
                if rule.nth <= n < rule.nth + rule.times:
                    return rule
        return None
