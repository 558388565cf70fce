"""Re-chunking of byte streams to a fixed payload size (pure, no IO).

WinRM carries stdin in ``rsp:Send`` requests ([MS-WSMV] 3.1.4.13), base64-encoded in ``rsp:Stream``
elements ([MS-WSMV] 3.1.4.1.31.1), and every request must fit in the server's ``MaxEnvelopeSizekb``. The
archive producer (``winbuilder.workspace.archive``) yields chunks of its own size; :func:`chunks` turns any
such stream into pieces of exactly ``max_payload`` raw bytes (before base64), one piece per Send.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["chunks"]


def chunks(stream: Iterable[bytes], max_payload: int) -> Iterator[bytes]:
    """Re-chunk ``stream`` into pieces of exactly ``max_payload`` bytes; only the last piece may be shorter.

    Empty input chunks are skipped and an empty stream yields nothing (never an empty piece). An input
    ``bytes`` chunk that has exactly the right size and arrives on a piece boundary is passed through as is;
    larger chunks are sliced through a ``memoryview`` (one copy per output piece), and only the leftovers that
    straddle a piece boundary are gathered in one reusable ``bytearray``. Output pieces never alias a mutable
    input buffer. The concatenation of the output always equals the concatenation of the input.

    Args:
        stream: byte chunks of any sizes (``bytes``, ``bytearray`` or ``memoryview`` of bytes).
        max_payload: size of each piece in bytes, at least 1.

    Yields:
        ``bytes`` pieces, all but the last exactly ``max_payload`` bytes long, the last 1..``max_payload``.

    Raises:
        ValueError: ``max_payload`` is smaller than 1.
    """
    if max_payload < 1:
        raise ValueError(f"max_payload must be at least 1 byte, got {max_payload}")
    return _chunks(stream, max_payload)


def _chunks(stream: Iterable[bytes], size: int) -> Iterator[bytes]:
    pending = bytearray()
    for chunk in stream:
        if not chunk:
            continue
        view = memoryview(chunk).cast("B")
        pos = 0
        if pending:
            take = min(size - len(pending), len(view))
            pending += view[:take]
            pos = take
            if len(pending) < size:
                continue
            yield bytes(pending)
            pending.clear()
        remaining = len(view) - pos
        if pos == 0 and remaining == size and isinstance(chunk, bytes):
            yield chunk
            continue
        while remaining >= size:
            yield bytes(view[pos : pos + size])
            pos += size
            remaining -= size
        if remaining:
            pending += view[pos:]
    if pending:
        yield bytes(pending)
