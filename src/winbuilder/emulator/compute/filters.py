"""The ``filter`` expression of Compute ``list`` methods (pure; no state).

Supported (the subset of the documented syntax that list callers use): ``field = value``, ``!=``, ``>``, ``<``,
``>=``, ``<=``, ``:`` (has; ``labels.k:*`` tests presence), dotted fields (``labels.winbuilder``,
``scheduling.provisioningModel``), quoted or bare values, ``*`` wildcards, ``AND``, ``OR``, ``NOT``/``-``,
parentheses, and juxtaposition as AND (``(labels.a = x) (status = RUNNING)``). As in AIP-160, OR binds tighter than
AND. The legacy ``name eq 'regex'`` form is supported for ``eq``/``ne``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any

from winbuilder.emulator.compute.errors import ApiError

Predicate = Callable[[dict[str, Any]], bool]

_TOKEN = re.compile(r"""\s*(?:(?P<lp>\()|(?P<rp>\))|(?P<op>!=|>=|<=|=|>|<|:|~|!~)|(?P<q>"(?:[^"\\]|\\.)*"|'[^']*')
                        |(?P<w>[^\s()=!<>:~"']+))""", re.VERBOSE)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ApiError(400, f"Invalid list filter expression '{text}'.")
        pos = m.end()
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "q":
            value = value[1:-1].replace('\\"', '"')
        out.append((kind, value))
    return out


def _lookup(resource: Any, path: list[str]) -> list[Any]:
    if not path:
        return resource if isinstance(resource, list) else [resource]
    if isinstance(resource, list):
        return [v for item in resource for v in _lookup(item, path)]
    if isinstance(resource, dict) and path[0] in resource:
        return _lookup(resource[path[0]], path[1:])
    return []


def _compare(actual: Any, op: str, expected: str) -> bool:
    if isinstance(actual, bool):
        actual = "true" if actual else "false"
    if isinstance(actual, (dict, list)):
        return False
    text = str(actual)
    if op in ("=", ":"):
        if op == ":" and expected == "*":
            return True
        if "*" in expected:
            return fnmatch.fnmatchcase(text, expected)
        return text == expected if op == "=" else expected.lower() in text.lower()
    if op == "!=":
        return not _compare(actual, "=", expected)
    if op in ("~", "eq"):
        return re.fullmatch(expected, text) is not None
    if op in ("!~", "ne"):
        return re.fullmatch(expected, text) is None
    try:
        number, bound = float(text), float(expected)
    except ValueError:
        return {">": text > expected, "<": text < expected, ">=": text >= expected, "<=": text <= expected}[op]
    return {">": number > bound, "<": number < bound, ">=": number >= bound, "<=": number <= bound}[op]


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], source: str) -> None:
        self.toks = tokens
        self.i = 0
        self.source = source

    def fail(self) -> ApiError:
        return ApiError(400, f"Invalid list filter expression '{self.source}'.")

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise self.fail()
        self.i += 1
        return tok

    def conjunction(self) -> Predicate:
        parts = [self.disjunction()]
        while (tok := self.peek()) is not None and tok[0] != "rp":
            if tok == ("w", "AND"):
                self.i += 1
            parts.append(self.disjunction())
        return lambda r: all(p(r) for p in parts)

    def disjunction(self) -> Predicate:
        parts = [self.term()]
        while self.peek() == ("w", "OR"):
            self.i += 1
            parts.append(self.term())
        return lambda r: any(p(r) for p in parts)

    def term(self) -> Predicate:
        kind, value = self.take()
        if kind == "w" and value in ("NOT", "-"):
            inner = self.term()
            return lambda r: not inner(r)
        if kind == "w" and value.startswith("-") and len(value) > 1:
            self.toks.insert(self.i, ("w", value[1:]))
            inner = self.term()
            return lambda r: not inner(r)
        if kind == "lp":
            group = self.conjunction()
            if self.take()[0] != "rp":
                raise self.fail()
            return group
        if kind != "w":
            raise self.fail()
        path = value.split(".")
        op_kind, op = self.take()
        if op_kind == "w" and op in ("eq", "ne"):
            pass
        elif op_kind != "op":
            raise self.fail()
        val_kind, expected = self.take()
        if val_kind not in ("w", "q"):
            raise self.fail()

        def pred(resource: dict[str, Any]) -> bool:
            values = _lookup(resource, path)
            if op in ("!=", "ne", "!~"):
                return all(_compare(v, op, expected) for v in values)
            return any(_compare(v, op, expected) for v in values)

        return pred


def compile_filter(text: str | None) -> Predicate:
    """Compiles a list ``filter`` into a predicate over resource dicts.

    Args:
        text: the filter expression, or None/empty for "everything".

    Raises:
        ApiError: 400 "Invalid list filter expression" for syntax the emulator cannot parse.
    """
    if not text or not text.strip():
        return lambda r: True
    parser = _Parser(_tokens(text), text)
    pred = parser.conjunction()
    if parser.peek() is not None:
        raise parser.fail()
    return pred
