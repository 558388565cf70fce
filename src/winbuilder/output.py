"""Turning the remote command's raw output bytes into what the user sees, live and without loss.

* ``Utf8Sink`` decodes incrementally (the shell runs with code page 65001), so a character split across two
  Receives is held back until it is whole, then written to a binary stream and flushed at once.
* ``CliXmlFilter`` turns PowerShell's ``#< CLIXML`` stderr records (what PowerShell writes to stderr when its host is
  not a console, e.g. over WinRM) into plain text and drops progress records.

Both keep memory bounded: only an incomplete character, a possible marker prefix, or one CLIXML block (capped at
``CliXmlFilter.max_block`` bytes, past which it is passed through raw) is held.
"""

from __future__ import annotations

import codecs
import re
import xml.etree.ElementTree as ET
from typing import BinaryIO

from defusedxml.ElementTree import fromstring as safe_fromstring

CLIXML_MARKER = b"#< CLIXML"
_END = b"</Objs>"
_PS_NS = "{http://schemas.microsoft.com/powershell/2004/04}"
_ESCAPE = re.compile(r"_x([0-9A-Fa-f]{4})_")
_TEXT_STREAMS = {"Error", "Warning", "Verbose", "Debug", "Information"}


class Utf8Sink:
    """Write UTF-8 output to ``stream`` as it arrives, never splitting a character.

    Args:
        stream: a binary stream (e.g. ``sys.stdout.buffer``); flushed after every write.

    Invalid UTF-8 is replaced with U+FFFD, so the output is always valid UTF-8; valid input comes out byte-exact.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.bytes_in = 0

    def write(self, data: bytes) -> None:
        """Decode ``data`` (any split) and write every complete character."""
        self.bytes_in += len(data)
        text = self._decoder.decode(data)
        if text:
            self._stream.write(text.encode("utf-8"))
            self._stream.flush()

    def close(self) -> None:
        """Write what is left (an incomplete trailing sequence becomes U+FFFD) and flush."""
        text = self._decoder.decode(b"", final=True)
        if text:
            self._stream.write(text.encode("utf-8"))
        self._stream.flush()


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def clixml_to_text(block: bytes) -> bytes:
    """Render one ``<Objs>...</Objs>`` CLIXML document as plain UTF-8 text.

    String records of the error, warning, verbose, debug and information streams are kept (``_xHHHH_`` escapes
    decoded); progress records and other objects are dropped. Raises ``ET.ParseError`` on malformed XML.
    """
    root = safe_fromstring(block)
    out: list[str] = []
    for elem in root:
        if elem.tag == f"{_PS_NS}S" and elem.get("S") in _TEXT_STREAMS:
            out.append(_unescape(elem.text or ""))
    return "".join(out).encode("utf-8")


class CliXmlFilter:
    """Streaming filter for stderr: passes ordinary bytes through, converts CLIXML blocks to plain text.

    ``feed`` returns what can be written now; ``flush`` returns the rest at the end of the stream.
    """

    max_block = 16 * 1024 * 1024

    def __init__(self) -> None:
        self._buf = bytearray()
        self._in_block = False

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return the bytes ready to be shown."""
        self._buf += data
        out = bytearray()
        while True:
            if self._in_block:
                end = self._buf.find(_END)
                if end < 0:
                    if len(self._buf) > self.max_block:  # not CLIXML after all, or absurdly large: give it up raw
                        out += self._buf
                        self._buf.clear()
                        self._in_block = False
                    break
                block = bytes(self._buf[: end + len(_END)])
                del self._buf[: end + len(_END)]
                self._in_block = False
                out += self._render(block)
                continue
            start = self._buf.find(CLIXML_MARKER)
            if start >= 0:
                out += self._buf[:start]
                del self._buf[: start + len(CLIXML_MARKER)]
                self._in_block = True
                continue
            keep = _partial_marker_len(self._buf)
            out += self._buf[: len(self._buf) - keep]
            del self._buf[: len(self._buf) - keep]
            break
        return bytes(out)

    def flush(self) -> bytes:
        """Return everything still held (an unterminated block is returned raw, with its marker)."""
        rest = (CLIXML_MARKER if self._in_block else b"") + bytes(self._buf)
        self._buf.clear()
        self._in_block = False
        return rest

    @staticmethod
    def _render(block: bytes) -> bytes:
        body = block.lstrip(b"\r\n")
        try:
            return clixml_to_text(body)
        except ET.ParseError:
            return CLIXML_MARKER + block


def _partial_marker_len(buf: bytearray) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of the CLIXML marker."""
    for n in range(min(len(buf), len(CLIXML_MARKER) - 1), 0, -1):
        if buf.endswith(CLIXML_MARKER[:n]):
            return n
    return 0
