"""Tests for ``winbuilder.staging.chunks``: exact piece sizes, no data change, edge cases."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from winbuilder.staging import chunks


def _sizes(pieces: list[bytes]) -> list[int]:
    return [len(p) for p in pieces]


def _check(stream: list[bytes], size: int) -> list[bytes]:
    out = list(chunks(stream, size))
    data = b"".join(stream)
    assert b"".join(out) == data
    assert all(isinstance(p, bytes) for p in out)
    assert all(len(p) == size for p in out[:-1])
    if out:
        assert 1 <= len(out[-1]) <= size
    assert len(out) == -(-len(data) // size)
    return out


@pytest.mark.parametrize(
    ("stream", "size", "expected"),
    [
        ([], 4, []),
        ([b""], 4, []),
        ([b"", b"", b""], 1, []),
        ([b"abcd"], 4, [4]),
        ([b"abcdefgh"], 4, [4, 4]),
        ([b"abcdefghi"], 4, [4, 4, 1]),
        ([b"ab", b"cd"], 4, [4]),
        ([b"a", b"", b"bc", b"", b"d", b"e"], 4, [4, 1]),
        ([b"abc", b"defgh", b"ijklmnop"], 4, [4, 4, 4, 4]),
        ([b"x" * 10], 1, [1] * 10),
        ([b"x" * 3], 100, [3]),
        ([b"ab", b"cdefghijkl", b"m"], 4, [4, 4, 4, 1]),
    ],
)
def test_edge_cases(stream: list[bytes], size: int, expected: list[int]) -> None:
    assert _sizes(_check(stream, size)) == expected


def test_exact_piece_on_boundary_is_passed_through_without_copy() -> None:
    piece = b"y" * 8
    out = list(chunks([piece, piece], 8))
    assert out[0] is piece and out[1] is piece


def test_accepts_bytearray_and_memoryview() -> None:
    stream: list[bytes] = [bytearray(b"abc"), memoryview(b"defgh"), b"ij"]  # type: ignore[list-item]
    assert list(chunks(stream, 4)) == [b"abcd", b"efgh", b"ij"]


def test_output_does_not_alias_a_reused_input_buffer() -> None:
    buf = bytearray(b"0123456")

    def gen() -> Iterator[bytes]:
        for _ in range(3):
            yield buf  # type: ignore[misc]
            buf[:] = b"abcdefg"

    assert b"".join(chunks(gen(), 5)) == b"0123456" + b"abcdefg" * 2


@pytest.mark.parametrize("size", [0, -1])
def test_rejects_nonpositive_size(size: int) -> None:
    with pytest.raises(ValueError, match="max_payload"):
        chunks([b"a"], size)


def test_is_lazy() -> None:
    seen: list[int] = []

    def gen() -> Iterator[bytes]:
        for i in range(1000):
            seen.append(i)
            yield b"z" * 100

    it = chunks(gen(), 250)
    assert next(it) == b"z" * 250
    assert len(seen) == 3


@pytest.mark.parametrize("seed", range(30))
def test_random_streams(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([1, 2, 3, 7, 512, 4096])
    stream = [rng.randbytes(rng.choice([0, 0, 1, size - 1, size, size + 1, 3 * size, rng.randrange(10000)]))
              for _ in range(rng.randrange(0, 40))]
    _check([s for s in stream], size)


def test_prefetch_keeps_order_and_raises_in_order() -> None:
    from winbuilder.staging import prefetch

    assert list(prefetch(iter([b"a", b"b", b"c"]), depth=1)) == [b"a", b"b", b"c"]

    def broken() -> Iterator[bytes]:
        yield b"x"
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(broken()):
            got.append(item)
    assert got == [b"x"]


def test_prefetch_stops_the_producer_when_the_consumer_stops() -> None:
    import itertools

    from winbuilder.staging import prefetch

    produced = []

    def endless() -> Iterator[bytes]:
        for i in itertools.count():
            produced.append(i)
            yield b"."

    it = prefetch(endless(), depth=2)
    assert next(it) == b"."
    it.close()  # type: ignore[attr-defined]
    n = len(produced)
    assert n <= 5
    import time

    time.sleep(0.3)
    assert len(produced) == n
