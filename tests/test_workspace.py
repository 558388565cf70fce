"""Tests for ``winbuilder.workspace``: preflight, the streamed archive, and copy-back extraction.

Round trips go through the real ``tar`` binaries: GNU tar, and bsdtar (what Windows runs as tar.exe) when
installed (``apt-get install libarchive-tools``; the bsdtar tests skip without it).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from winbuilder.errors import ExitCode, ProtocolError, UsageError, WorkspaceError
from winbuilder.workspace import (
    ArchiveStream,
    Extractor,
    Manifest,
    PreflightError,
    archive,
    preflight,
)

MB = 1024 * 1024


def _tar_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (bsdtar: apt-get install libarchive-tools)")
    return path


TARS = [pytest.param("tar", id="gnutar"), pytest.param("bsdtar", id="bsdtar")]


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _big_file(path: Path, size: int) -> None:
    """A file whose every 64 KiB block differs (block number repeated), so misordered data shows."""
    block = 64 * 1024
    with path.open("wb") as f:
        for i in range(size // block):
            f.write(i.to_bytes(8, "big") * (block // 8))
        f.write(b"t" * (size % block))


def _rich_tree(root: Path) -> None:
    """Empty dirs, relative symlinks (to a file, to a dir), non-ASCII names, exec bits, a big file, many files."""
    _write(root / "README.md", b"# readme\n")
    _write(root / "build.sh", b"#!/bin/sh\necho build\n", 0o755)
    _write(root / "secret.txt", b"private\n", 0o600)
    _write(root / "src" / "main.c", b"int main(void) { return 0; }\n")
    _write(root / "src" / "caf\u00e9.c", "/* caf\u00e9 */\n".encode())
    _write(root / "\u65e5\u672c" / "\U0001f389 party.txt", "\U0001f389\n".encode())
    _write(root / "deep" / ("d" * 120) / ("n" * 150 + ".txt"), b"long name\n")
    (root / "empty").mkdir()
    (root / "nested" / "empty" / "dirs").mkdir(parents=True)
    (root / "private").mkdir(mode=0o700)
    (root / "private").chmod(0o700)
    _write(root / "zero.bin", b"")
    os.symlink("src/main.c", root / "link_to_file")
    os.symlink("src", root / "link_to_dir")
    os.symlink("../README.md", root / "src" / "up_link")
    _big_file(root / "big.bin", 50 * MB + 123)
    for d in range(20):
        for f in range(100):
            _write(root / "many" / f"d{d:02}" / f"f{f:03}.txt", f"file {d} {f}\n".encode() * (f % 7))


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """kind, content hash, mode, mtime (files) or target (links) of everything below ``root``."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", digest, stat.S_IMODE(st.st_mode), int(st.st_mtime))
    return out


def _tar_extract(tar: str, chunks: Iterable[bytes], dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([tar, "-xf", "-", "-C", str(dst)], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    for chunk in chunks:
        proc.stdin.write(chunk)
    proc.stdin.close()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert proc.wait() == 0, err
    assert "Error" not in err


def _tar_create_into(tar: str, src: Path, extractor: Extractor, read_size: int = 65536) -> None:
    proc = subprocess.Popen([tar, "-cf", "-", "-C", str(src), "."], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    while chunk := proc.stdout.read(read_size):
        extractor.feed(chunk)
    assert proc.wait() == 0


def _tar_bytes(build: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        build(tf)
    return buf.getvalue()


def _add_file(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644, mtime: int = 1_600_000_000) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = mtime
    tf.addfile(info, io.BytesIO(data))


def _add_special(tf: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755
    tf.addfile(info)


def _extract_bytes(dest: Path, data: bytes, piece: int = 4096, **kwargs: object) -> object:
    ex = Extractor(dest, **kwargs)  # type: ignore[arg-type]
    try:
        for i in range(0, len(data), piece):
            ex.feed(data[i : i + piece])
    except (WorkspaceError, ProtocolError):
        pass  # feed re-raises an early failure; close() reports it again
    return ex.close()


# --------------------------------------------------------------------------------------------------------------
# round trips through real tar
# --------------------------------------------------------------------------------------------------------------


def _ram_dir(fallback: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: the big trees then cost RAM, not contended disk I/O."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield fallback
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="wb-test-") as tmp:
        yield Path(tmp)


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    yield from _ram_dir(tmp_path)


@pytest.fixture(scope="module")
def rich_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    for base in _ram_dir(tmp_path_factory.mktemp("rich")):
        root = base / "ws"
        root.mkdir()
        _rich_tree(root)
        yield root


@pytest.mark.parametrize("tar", TARS)
def test_round_trip_through_real_tar(tar: str, rich_tree: Path, fast_tmp: Path) -> None:
    tar = _tar_binary(tar)
    manifest = preflight(rich_tree)
    assert manifest.files == 2000 + 9
    assert manifest.symlinks == 3
    assert manifest.bytes == sum(e.size for e in manifest.entries)
    extra = {".winbuilder/run.ps1": b"Write-Output 'hi'\r\n"}

    stream = archive(manifest, rich_tree, extra)
    remote = fast_tmp / "remote"
    _tar_extract(tar, stream, remote)
    assert stream.files == manifest.files + 1
    assert stream.file_bytes == manifest.bytes + len(extra[".winbuilder/run.ps1"])
    assert stream.bytes_out % tarfile.RECORDSIZE == 0

    expected = _snapshot(rich_tree)
    got = _snapshot(remote)
    assert got.pop(".winbuilder/run.ps1")[0] == "file"
    assert got.pop(".winbuilder")[0] == "dir"
    assert got == expected
    assert (remote / "link_to_dir" / "main.c").read_bytes() == (rich_tree / "src" / "main.c").read_bytes()

    back = fast_tmp / "back"
    with Extractor(back) as ex:
        _tar_create_into(tar, remote, ex)
        result = ex.close()
    assert result.files == manifest.files + 1
    assert result.symlinks == 3
    assert result.bytes == stream.file_bytes
    got_back = _snapshot(back)
    got_back.pop(".winbuilder/run.ps1")
    got_back.pop(".winbuilder")
    assert got_back == expected


def test_chunks_are_bounded_and_exact(rich_tree: Path) -> None:
    manifest = preflight(rich_tree)
    stream = archive(manifest, rich_tree, chunk_size=256 * 1024)
    sizes = [len(c) for c in stream]
    assert all(s == 256 * 1024 for s in sizes[:-1])
    assert 0 < sizes[-1] <= 256 * 1024
    assert sum(sizes) == stream.bytes_out


def test_archive_is_readable_by_python_tarfile_with_pax_names(tmp_path: Path) -> None:
    name = "\u65e5\u672c/" + "\u00e9" * 120 + ".txt"
    _write(tmp_path / "ws" / name, b"x", 0o755)
    stream = archive(preflight(tmp_path / "ws"), tmp_path / "ws")
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream)), mode="r:") as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert members[name].mode == 0o755
    assert members[name].size == 1
    assert members["\u65e5\u672c"].isdir()


def test_extra_files_replace_workspace_copy_and_get_parents(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    _write(ws / "run.ps1", b"old")
    data = b"".join(archive(preflight(ws), ws, {"run.ps1": b"new", "a/b/c.txt": b"c"}))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = tf.getnames()
        run = tf.extractfile("run.ps1")
        assert run is not None and run.read() == b"new"
    assert names.count("run.ps1") == 1
    assert names.index("a") < names.index("a/b") < names.index("a/b/c.txt")


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../b", "aux.txt", "a//b", "x:y"])
def test_extra_paths_are_validated(tmp_path: Path, bad: str) -> None:
    (tmp_path / "ws").mkdir()
    with pytest.raises(WorkspaceError):
        list(archive(preflight(tmp_path / "ws"), tmp_path / "ws", {bad: b""}))


# --------------------------------------------------------------------------------------------------------------
# archive: memory and files that change
# --------------------------------------------------------------------------------------------------------------


def test_archive_memory_is_bounded_for_200_mb_file(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    with (ws / "huge.bin").open("wb") as f:
        f.truncate(200 * MB)  # sparse: generated without using 200 MB of disk
    manifest = preflight(ws)
    tracemalloc.start()
    try:
        stream = archive(manifest, ws, chunk_size=MB)
        total = 0
        for chunk in stream:
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == stream.bytes_out >= 200 * MB + 512
    assert peak < 10 * MB, f"peak {peak / MB:.1f} MB"


@pytest.mark.parametrize("change", ["shrink", "grow"])
def test_file_changing_size_while_read_raises(tmp_path: Path, change: str) -> None:
    ws = tmp_path / "ws"
    _write(ws / "log.txt", b"a" * (3 * MB))
    stream = archive(preflight(ws), ws, chunk_size=MB)
    next(stream)
    with (ws / "log.txt").open("r+b") as f:
        if change == "shrink":
            f.truncate(MB)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"more")
    with pytest.raises(WorkspaceError, match=r"log\.txt (shrank|grew)"):
        list(stream)


def test_file_vanishing_before_archive_raises(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    _write(ws / "gone.txt", b"x")
    manifest = preflight(ws)
    (ws / "gone.txt").unlink()
    with pytest.raises(WorkspaceError, match="gone.txt"):
        list(archive(manifest, ws))


def test_file_replaced_by_symlink_is_not_followed(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    _write(ws / "f.txt", b"x")
    _write(tmp_path / "outside.txt", b"secret")
    manifest = preflight(ws)
    (ws / "f.txt").unlink()
    os.symlink(tmp_path / "outside.txt", ws / "f.txt")
    with pytest.raises(WorkspaceError, match=r"f\.txt"):
        list(archive(manifest, ws))


def test_archive_is_lazy(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    _write(ws / "a.bin", b"a" * (2 * MB))
    stream = archive(preflight(ws), ws, chunk_size=MB)
    assert isinstance(stream, ArchiveStream)
    assert stream.bytes_out == 0
    next(stream)
    assert stream.bytes_out == MB


# --------------------------------------------------------------------------------------------------------------
# preflight
# --------------------------------------------------------------------------------------------------------------


BAD_NAMES = {
    "aux.c": "AUX",
    "con": "CON",
    "Nul.txt": "NUL",
    "com1.log": "COM1",
    "LPT9": "LPT9",
    "COM\u00b9.txt": "COM\u00b9",
    "lpt\u00b3": "LPT\u00b3",
    "prn.tar.gz": "PRN",
    "trailing.": "dot or a space",
    "trailing ": "dot or a space",
    "a<b": "not allowed",
    "a>b": "not allowed",
    "a:b": "not allowed",
    'a"b': "not allowed",
    "a|b": "not allowed",
    "a?b": "not allowed",
    "a*b": "not allowed",
    "a\\b": "not allowed",
    "tab\there": "not allowed",
    "ctl\x01": "not allowed",
}


def test_preflight_reports_every_bad_path_at_once(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in BAD_NAMES:
        _write(ws / "sub" / name, b"x")
    _write(ws / "README", b"1")
    _write(ws / "readme", b"2")
    (ws / "Docs").mkdir()
    (ws / "docs").mkdir()
    os.symlink("/etc/passwd", ws / "abs_link")
    os.symlink("../../outside", ws / "sub" / "escape")
    os.symlink("..", ws / "up")
    os.symlink("..\\..\\Windows", ws / "backslash_link")
    _write(ws / "fine" / "ok.txt", b"ok")
    (ws / "aux").mkdir()
    _write(ws / "aux" / "inside.txt", b"inside a reserved dir")

    with pytest.raises(PreflightError) as caught:
        preflight(ws)
    err = caught.value
    assert isinstance(err, WorkspaceError) and err.exit_code == ExitCode.WORKSPACE
    found = {(p.path, p.reason) for p in err.problems}
    paths = {p for p, _ in found}

    for name, needle in BAD_NAMES.items():
        reasons = [r for p, r in found if p == f"sub/{name}"]
        assert reasons, f"{name!r} not reported"
        assert any(needle in r for r in reasons), (name, reasons)
    for twin in ("README", "readme", "Docs", "docs"):
        assert any("only in case" in r for p, r in found if p == twin), twin
    assert any("absolute" in r for p, r in found if p == "abs_link")
    assert any("outside" in r for p, r in found if p == "sub/escape")
    assert any("outside" in r for p, r in found if p == "up")
    assert any("backslash" in r for p, r in found if p == "backslash_link")
    assert "aux" in paths and "fine/ok.txt" not in paths and "fine" not in paths

    message = "\n".join(err.details) + "\n" + str(err)
    assert "\n" not in str(err)  # the error itself is one line; the reasons are its details
    assert "--exclude" in message
    assert "\\x01" in message and "\x01" not in message  # control characters are escaped in the message
    for p in err.problems:
        assert p.path.replace("\x01", "\\x01").replace("\t", "\\x09") in message


def test_preflight_exclusions_silence_bad_names(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    _write(ws / "aux.c", b"x")
    _write(ws / "out" / "con", b"x")
    _write(ws / "ok.c", b"x")
    manifest = preflight(ws, ["aux.c", "out"])
    assert [e.path for e in manifest.entries] == ["ok.c"]
    assert manifest.excluded == 2


def test_preflight_rejects_non_utf8_names(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    with open(os.path.join(os.fsencode(ws), b"bad\xff.txt"), "wb") as f:
        f.write(b"x")
    with pytest.raises(PreflightError) as caught:
        preflight(ws)
    assert any("UTF-8" in p.reason for p in caught.value.problems)
    assert "\\xff" in str(caught.value)


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["*.o"], {"src", "src/a.c", "build", "build/x.txt", "build/sub", "build/sub/y.txt", "node_modules",
                   "node_modules/m.js", "src/node_modules", "src/node_modules/n.js", "logs", "logs/l.txt",
                   "logsfile"}),
        (["node_modules"], {"src", "src/a.c", "src/a.o", "build", "build/x.txt", "build/sub", "build/sub/y.txt",
                            "build/z.o", "logs", "logs/l.txt", "logsfile"}),
        (["build/**"], {"src", "src/a.c", "src/a.o", "build", "node_modules", "node_modules/m.js",
                        "src/node_modules", "src/node_modules/n.js", "logs", "logs/l.txt", "logsfile"}),
        (["build", "src/*"], {"src", "node_modules", "node_modules/m.js", "logs", "logs/l.txt", "logsfile"}),
        (["./build/sub/", "/logs*/"], {"src", "src/a.c", "src/a.o", "build", "build/x.txt", "build/z.o",
                                       "node_modules", "node_modules/m.js", "src/node_modules",
                                       "src/node_modules/n.js", "logsfile"}),
    ],
)
def test_exclude_patterns(tmp_path: Path, patterns: list[str], expected: set[str]) -> None:
    ws = tmp_path / "ws"
    for rel in ["src/a.c", "src/a.o", "build/x.txt", "build/sub/y.txt", "build/z.o", "node_modules/m.js",
                "src/node_modules/n.js", "logs/l.txt", "logsfile"]:
        _write(ws / rel, b"x")
    manifest = preflight(ws, patterns)
    assert {e.path for e in manifest.entries} == expected


def test_empty_exclude_pattern_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    with pytest.raises(UsageError):
        preflight(tmp_path / "ws", ["/"])


def test_preflight_order_totals_and_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ws = tmp_path / "ws"
    _write(ws / "b" / "x.txt", b"12345")
    _write(ws / "a.txt", b"1", 0o755)
    long_rel = "/".join(["p" * 50] * 5) + "/f.txt"
    _write(ws / long_rel, b"")
    os.symlink("missing", ws / "dangling")
    os.mkfifo(ws / "fifo")
    manifest = preflight(ws)
    assert isinstance(manifest, Manifest)
    paths = [e.path for e in manifest.entries]
    for i, e in enumerate(manifest.entries):
        parent = e.path.rpartition("/")[0]
        assert not parent or paths.index(parent) < i
    assert "fifo" not in paths
    assert manifest.files == 3 and manifest.bytes == 6 and manifest.symlinks == 1
    assert next(e for e in manifest.entries if e.path == "a.txt").mode == 0o755
    assert any("longer than 259" in w for w in manifest.warnings)
    assert any("dangling" in w and "does not exist" in w for w in manifest.warnings)
    assert any("fifo" in w for w in manifest.warnings)
    assert "fifo" in caplog.text


def test_preflight_does_not_follow_symlinked_dirs(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    _write(ws / "real" / "f.txt", b"x")
    os.symlink("real", ws / "alias")
    manifest = preflight(ws)
    assert {e.path for e in manifest.entries} == {"real", "real/f.txt", "alias"}
    alias = next(e for e in manifest.entries if e.path == "alias")
    assert alias.kind == "symlink" and alias.target == "real" and alias.target_is_dir


def test_preflight_benchmark_10k_files(fast_tmp: Path) -> None:
    ws = fast_tmp / "ws"
    for d in range(100):
        sub = ws / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(100):
            os.close(os.open(sub / f"f{f}.c", os.O_CREAT | os.O_WRONLY, 0o644))
    manifest = preflight(ws, ["*.o", "node_modules"])
    assert manifest.files == 10_000


# --------------------------------------------------------------------------------------------------------------
# Extractor: copy-back semantics
# --------------------------------------------------------------------------------------------------------------


def test_copy_back_modes_and_no_deletion(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    _write(ws / "script.sh", b"old script", 0o755)
    _write(ws / "data.txt", b"old data", 0o644)
    _write(ws / "local_only.txt", b"keep me", 0o644)

    def build(tf: tarfile.TarFile) -> None:
        _add_special(tf, ".", tarfile.DIRTYPE)
        _add_file(tf, "./script.sh", b"new script", 0o644)  # Windows tar says 0644 for everything
        _add_file(tf, "./data.txt", b"new data", 0o755)  # the archive marks it executable
        _add_file(tf, "./new.txt", b"new", 0o640)
        _add_file(tf, "./new_tool", b"#!", 0o775)
        _add_special(tf, "./newdir", tarfile.DIRTYPE)
        _add_file(tf, "./newdir/inner.txt", b"in")

    result = _extract_bytes(ws, _tar_bytes(build), piece=7)
    assert (ws / "script.sh").read_bytes() == b"new script"
    assert stat.S_IMODE((ws / "script.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((ws / "data.txt").stat().st_mode) == 0o755
    assert stat.S_IMODE((ws / "new.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((ws / "new_tool").stat().st_mode) == 0o755  # group write dropped ("data" filter)
    assert (ws / "local_only.txt").read_bytes() == b"keep me"
    assert int((ws / "new.txt").stat().st_mtime) == 1_600_000_000
    assert (ws / "newdir" / "inner.txt").read_bytes() == b"in"
    assert result.files == 5 and result.dirs == 1  # type: ignore[attr-defined]
    assert not [p for p in ws.iterdir() if p.name.startswith(".wb-")]


def test_copy_back_excludes(tmp_path: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        _add_file(tf, ".winbuilder/run.ps1", b"x")
        _add_file(tf, "out/app.exe", b"MZ")

    result = _extract_bytes(tmp_path / "ws", _tar_bytes(build), excludes=[".winbuilder"])
    assert not (tmp_path / "ws" / ".winbuilder").exists()
    assert (tmp_path / "ws" / "out" / "app.exe").read_bytes() == b"MZ"
    assert result.skipped == 1  # type: ignore[attr-defined]


def test_copy_back_directory_conflict_is_an_error(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "thing").mkdir(parents=True)
    _write(ws / "thing" / "keep.txt", b"keep")
    data = _tar_bytes(lambda tf: _add_file(tf, "thing", b"now a file"))
    with pytest.raises(WorkspaceError, match="directory locally"):
        _extract_bytes(ws, data)
    assert (ws / "thing" / "keep.txt").read_bytes() == b"keep"


def test_copy_back_replaces_local_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    _write(ws / "target.txt", b"target")
    os.symlink("target.txt", ws / "link")
    _extract_bytes(ws, _tar_bytes(lambda tf: _add_file(tf, "link", b"regular now")))
    assert not (ws / "link").is_symlink()
    assert (ws / "link").read_bytes() == b"regular now"
    assert (ws / "target.txt").read_bytes() == b"target"


def test_copy_back_hard_link_becomes_a_copy(tmp_path: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        _add_file(tf, "a.txt", b"shared")
        _add_special(tf, "b.txt", tarfile.LNKTYPE, "a.txt")

    _extract_bytes(tmp_path / "ws", _tar_bytes(build))
    assert (tmp_path / "ws" / "b.txt").read_bytes() == b"shared"


def test_copy_back_feed_in_tiny_pieces(tmp_path: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        _add_file(tf, "x/\u00e9.txt", b"abc" * 1000)

    result = _extract_bytes(tmp_path / "ws", _tar_bytes(build), piece=3)
    assert (tmp_path / "ws" / "x" / "\u00e9.txt").read_bytes() == b"abc" * 1000
    assert result.bytes == 3000  # type: ignore[attr-defined]


def test_copy_back_feed_blocks_with_bounded_buffer(tmp_path: Path) -> None:
    data = _tar_bytes(lambda tf: _add_file(tf, "big.bin", b"z" * (8 * MB)))
    ex = Extractor(tmp_path / "ws", max_buffer=64 * 1024)
    for i in range(0, len(data), 256 * 1024):
        ex.feed(data[i : i + 256 * 1024])
    assert ex.close().bytes == 8 * MB
    assert ex.bytes_in == len(data)


def test_copy_back_memory_is_bounded(fast_tmp: Path) -> None:
    tmp_path = fast_tmp
    ws = tmp_path / "ws"
    ws.mkdir()
    with (ws / "huge.bin").open("wb") as f:
        f.truncate(64 * MB)
    stream = archive(preflight(ws), ws)
    tracemalloc.start()
    try:
        ex = Extractor(tmp_path / "back")
        for chunk in stream:
            ex.feed(chunk)
        ex.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "back" / "huge.bin").stat().st_size == 64 * MB
    assert peak < 16 * MB, f"peak {peak / MB:.1f} MB"


# --------------------------------------------------------------------------------------------------------------
# Extractor: truncated and malicious archives
# --------------------------------------------------------------------------------------------------------------


def _cut_points(data: bytes) -> Iterator[tuple[str, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    last = members[-1]
    end_of_data = last.offset_data + last.size
    yield "empty", 0
    yield "mid header", 100
    yield "mid first body", members[0].offset_data + 10
    yield "at member boundary", last.offset
    yield "mid pax header", last.offset + 700
    yield "mid last body", end_of_data - 5
    yield "before padding end", end_of_data + 1
    yield "no end blocks", -(-end_of_data // 512) * 512
    yield "one end block", -(-end_of_data // 512) * 512 + 512


def test_truncated_archive_is_an_error(tmp_path: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        _add_file(tf, "first.txt", b"1" * 3000)
        _add_file(tf, "\u00e9" * 80 + ".txt", b"2" * 3001)  # PAX header for the long UTF-8 name

    data = _tar_bytes(build)
    ws0 = tmp_path / "whole"
    assert _extract_bytes(ws0, data).files == 2  # type: ignore[attr-defined]
    for label, cut in _cut_points(data):
        ws = tmp_path / label.replace(" ", "_")
        _write(ws / "first.txt", b"local original")
        with pytest.raises(ProtocolError, match="truncated|malformed|empty"):
            _extract_bytes(ws, data[:cut], piece=1000)
        assert (ws / "first.txt").read_bytes() in (b"local original", b"1" * 3000), label
        assert not [p for p in ws.iterdir() if p.name.startswith(".wb-")], label


def test_truncated_output_of_real_tar_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write(src / "a.bin", os.urandom(100_000))
    data = subprocess.run(["tar", "-cf", "-", "-C", str(src), "."], capture_output=True, check=True).stdout
    with pytest.raises(ProtocolError):
        _extract_bytes(tmp_path / "ws", data[: len(data) // 2])
    with pytest.raises(ProtocolError):
        _extract_bytes(tmp_path / "ws2", data[:1536])  # "./" header plus part of a.bin's header... and no end


def test_not_a_tar_stream_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError):
        _extract_bytes(tmp_path / "ws", b"this is not tar output\r\n" * 100)


def _evil(kind: str, outside: Path) -> Callable[[tarfile.TarFile], None]:
    def build(tf: tarfile.TarFile) -> None:
        _add_file(tf, "ok.txt", b"fine")
        if kind == "absolute":
            _add_file(tf, str(outside / "x.txt"), b"pwned")
        elif kind == "local symlink out":  # the local workspace has a link out (e.g. excluded from the upload)
            _add_file(tf, "out_link/x.txt", b"pwned")
        elif kind == "dotdot":
            _add_file(tf, "../outside/x.txt", b"pwned")
        elif kind == "nested dotdot":
            _add_file(tf, "a/../../outside/x.txt", b"pwned")
        elif kind == "abs symlink":
            _add_special(tf, "evil", tarfile.SYMTYPE, "/etc")
            _add_file(tf, "evil/x.txt", b"pwned")
        elif kind == "escaping symlink":
            _add_special(tf, "evil", tarfile.SYMTYPE, "../outside")
            _add_file(tf, "evil/x.txt", b"pwned")
        elif kind == "hardlink outside":
            _add_special(tf, "evil", tarfile.LNKTYPE, "/etc/passwd")
        elif kind == "hardlink unknown":
            _add_special(tf, "evil", tarfile.LNKTYPE, "not_extracted.txt")
        elif kind == "device":
            _add_special(tf, "dev", tarfile.CHRTYPE)
        elif kind == "fifo":
            _add_special(tf, "fifo", tarfile.FIFOTYPE)
        _add_file(tf, "after.txt", b"never")

    return build


@pytest.mark.parametrize(
    "kind",
    ["dotdot", "nested dotdot", "absolute", "abs symlink", "escaping symlink", "hardlink outside",
     "hardlink unknown", "device", "fifo", "local symlink out"],
)
def test_malicious_archive_is_refused(tmp_path: Path, kind: str) -> None:
    ws = tmp_path / "ws"
    outside = tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    if kind == "local symlink out":
        os.symlink(outside, ws / "out_link")
    build = _evil(kind, outside)
    with pytest.raises(WorkspaceError, match="refused") as caught:
        _extract_bytes(ws, _tar_bytes(build))
    assert caught.value.exit_code == ExitCode.WORKSPACE
    assert list(outside.iterdir()) == []
    assert not (ws / "after.txt").exists()
    assert not (ws / "evil").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "ws"]


def test_feed_raises_early_after_refusal_and_close_raises_too(tmp_path: Path) -> None:
    data = _tar_bytes(_evil("dotdot", tmp_path / "outside")) + b"\0" * (2 * MB)
    ex = Extractor(tmp_path / "ws", max_buffer=4096)
    with pytest.raises(WorkspaceError, match="refused"):
        for i in range(0, len(data), 1024):
            ex.feed(data[i : i + 1024])
    with pytest.raises(WorkspaceError, match="refused"):
        ex.close()


def test_abort_and_context_manager(tmp_path: Path) -> None:
    data = _tar_bytes(lambda tf: _add_file(tf, "big.bin", b"q" * MB))
    with pytest.raises(RuntimeError, match="transport died"), Extractor(tmp_path / "ws") as ex:
        ex.feed(data[: len(data) // 2])
        raise RuntimeError("transport died")
    assert not (tmp_path / "ws" / "big.bin").exists()
    assert not list((tmp_path / "ws").iterdir())
    with pytest.raises(ProtocolError, match="aborted"):
        ex.close()
    ex.abort()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        ex.feed(b"x")


def test_abort_unblocks_a_feeding_transport(tmp_path: Path) -> None:
    ex = Extractor(tmp_path / "ws", max_buffer=1024)
    info = tarfile.TarInfo("big.bin")
    info.size = 64 * MB
    header = info.tobuf(tarfile.PAX_FORMAT)
    errors: list[BaseException] = []

    def feeder() -> None:
        try:
            ex.feed(header)
            while True:
                ex.feed(b"q" * 4096)
        except (RuntimeError, ProtocolError) as exc:
            errors.append(exc)

    t = threading.Thread(target=feeder)
    t.start()
    t.join(0.2)
    ex.abort()
    t.join(5)
    assert not t.is_alive()
    assert errors
    assert not list((tmp_path / "ws").iterdir())
