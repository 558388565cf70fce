"""``set /a`` expressions of the emulated cmd.exe."""

from __future__ import annotations

import re

from winbuilder.emulator.cmd.shell import Shell, _number, _signed32


class _Arith:
    """``set /a``: integers (decimal/hex/octal), variables, ``( )``, unary ``- + ! ~``, ``* / %``, ``+ -``,
    ``<< >>``, ``&``, ``^``, ``|``, assignments ``= += -= *= /= %=`` and ``,`` (32-bit signed results)."""

    _BINARY: list[tuple[str, ...]] = [("|",), ("^",), ("&",), ("<<", ">>"), ("+", "-"), ("*", "/", "%")]

    def __init__(self, text: str, shell: Shell) -> None:
        self.toks = re.findall(r"0x[0-9a-fA-F]+|\d+|[A-Za-z_$#@.][\w$#@.]*|<<=|>>=|<<|>>|[-+*/%&|^]=|\S", text)
        self.i = 0
        self.shell = shell

    def run(self) -> int:
        value = self.assign()
        while self.i < len(self.toks) and self.toks[self.i] == ",":
            self.i += 1
            value = self.assign()
        if self.i != len(self.toks):
            raise ValueError("trailing tokens")
        return value

    def assign(self) -> int:
        tok = self.toks[self.i]
        nxt = self.toks[self.i + 1] if self.i + 1 < len(self.toks) else ""
        if re.fullmatch(r"[A-Za-z_$#@.][\w$#@.]*", tok) and nxt.endswith("=") and nxt not in ("==",):
            self.i += 2
            value = self.assign()
            if nxt != "=":
                value = self.apply(nxt[:-1], self.var(tok), value)
            self.shell.set(tok, str(value))
            return value
        return self.binary(0)

    def binary(self, level: int) -> int:
        if level == len(self._BINARY):
            return self.unary()
        value = self.binary(level + 1)
        while self.i < len(self.toks) and self.toks[self.i] in self._BINARY[level]:
            op = self.toks[self.i]
            self.i += 1
            value = self.apply(op, value, self.binary(level + 1))
        return value

    def unary(self) -> int:
        tok = self.toks[self.i]
        self.i += 1
        if tok in ("-", "+", "!", "~"):
            v = self.unary()
            return _signed32({"-": -v, "+": v, "!": int(v == 0), "~": ~v}[tok])
        if tok == "(":
            v = self.assign()
            while self.toks[self.i] == ",":
                self.i += 1
                v = self.assign()
            if self.toks[self.i] != ")":
                raise ValueError("missing )")
            self.i += 1
            return v
        num = _number(tok)
        if num is not None:
            return _signed32(num)
        if re.fullmatch(r"[A-Za-z_$#@.][\w$#@.]*", tok):
            return self.var(tok)
        raise ValueError("bad operand")

    def var(self, name: str) -> int:
        return _signed32(_number(self.shell.get(name) or "0") or 0)

    @staticmethod
    def apply(op: str, a: int, b: int) -> int:
        if op in ("/", "%") and b == 0:
            raise ZeroDivisionError
        result = {
            "+": lambda: a + b,
            "-": lambda: a - b,
            "*": lambda: a * b,
            "/": lambda: int(a / b),
            "%": lambda: a - int(a / b) * b,
            "&": lambda: a & b,
            "|": lambda: a | b,
            "^": lambda: a ^ b,
            "<<": lambda: a << (b & 31),
            ">>": lambda: a >> (b & 31),
        }[op]()
        return _signed32(result)
