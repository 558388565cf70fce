"""Re-chunking of byte streams to a fixed payload size (pure, no IO).

WinRM carries stdin in ``rsp:Send`` requests ([MS-WSMV] 3.1.4.13), base64-encoded in ``rsp:Stream``
elements ([MS-WSMV] 3.1.4.1.31.1), and every request must fit in the server's ``MaxEnvelopeSizekb``. The
archive producer (``winbuilder.workspace.archive``) yields chunks of its own size; :func:`chunks` turns any
such stream into pieces of exactly ``max_payload`` raw bytes (before base64), one piece per Send.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

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


_DONE = object()


def prefetch(stream: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Iterate ``stream`` in a background thread, keeping up to ``depth`` items ready.

    Lets producing the next chunk (reading workspace files) overlap with sending the current one (waiting on the
    network). Memory is bounded by ``depth`` items. An exception in the producer is re-raised here, in order; if the
    consumer stops early, the producer stops at its next item.

    Args:
        stream: any iterable, e.g. of byte chunks (iterated only in the background thread).
        depth: items buffered ahead, at least 1.

    Raises:
        ValueError: ``depth`` is smaller than 1.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    return _prefetch(stream, depth)


def _prefetch(stream: Iterable[T], depth: int) -> Iterator[T]:
    items: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in stream:
                if not put(chunk):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    thread = threading.Thread(target=produce, name="winbuilder-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5)
