"""Output decoding: UTF-8 split across reads stays whole; CLIXML becomes text; nothing is lost at the end."""

from __future__ import annotations

import io

import pytest

from winbuilder.output import CLIXML_MARKER, CliXmlFilter, Utf8Sink

TEXT = "é 日本 😀 plain\r\n".encode()


@pytest.mark.parametrize("split", range(1, len(TEXT)))
def test_utf8_split_anywhere_is_byte_exact(split: int) -> None:
    out = io.BytesIO()
    sink = Utf8Sink(out)
    sink.write(TEXT[:split])
    # nothing half-written: what is out so far decodes cleanly
    out.getvalue().decode("utf-8")
    sink.write(TEXT[split:])
    sink.close()
    assert out.getvalue() == TEXT


def test_utf8_one_byte_at_a_time() -> None:
    out = io.BytesIO()
    sink = Utf8Sink(out)
    for b in TEXT:
        sink.write(bytes([b]))
    sink.close()
    assert out.getvalue() == TEXT


def test_utf8_truncated_tail_is_not_lost() -> None:
    out = io.BytesIO()
    sink = Utf8Sink(out)
    sink.write(b"ok" + "日".encode()[:2])
    sink.close()
    assert out.getvalue() == "ok\ufffd".encode()


CLIXML = (
    b'#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
    b'<Obj S="progress" RefId="0"><TN RefId="0"><T>System.Management.Automation.PSCustomObject</T></TN>'
    b'<MS><I64 N="SourceId">1</I64><PR N="Record"><AV>Preparing modules for first use.</AV></PR></MS></Obj>'
    b'<S S="Error">docker: not found [internal]_x000D__x000A_</S>'
    b'<S S="Warning">caf\xc3\xa9_x000A_</S></Objs>'
)


@pytest.mark.parametrize("split", [1, 5, 9, 10, 50, len(CLIXML) - 3])
def test_clixml_becomes_text_and_progress_is_dropped(split: int) -> None:
    f = CliXmlFilter()
    data = b"before\n" + CLIXML + b"after\n"
    out = f.feed(data[:split]) + f.feed(data[split:]) + f.flush()
    assert out == "before\ndocker: not found [internal]\r\ncafé\nafter\n".encode()
    assert b"Preparing modules" not in out


def test_text_that_only_resembles_the_marker_passes_through() -> None:
    f = CliXmlFilter()
    out = f.feed(b"#< CLI") + f.feed(b"ent says hi\n") + f.flush()
    assert out == b"#< CLIent says hi\n"


def test_unterminated_block_is_returned_raw_at_the_end() -> None:
    f = CliXmlFilter()
    out = f.feed(CLIXML_MARKER + b"\r\n<Objs><S S=\"Error\">x") + f.flush()
    assert out == CLIXML_MARKER + b"\r\n<Objs><S S=\"Error\">x"


def test_malformed_block_passes_through() -> None:
    f = CliXmlFilter()
    out = f.feed(CLIXML_MARKER + b"<Objs><broken></Objs>") + f.flush()
    assert out == CLIXML_MARKER + b"<Objs><broken></Objs>"
