"""Workspace transfer, client side: check the tree, stream it out as tar, extract what comes back.

The workspace goes to the Windows server as a tar archive written into the stdin of ``tar -xf - -C <dir>``
(Windows Server 2019+ ships bsdtar as ``tar.exe``) and comes back as the stdout of ``tar -cf - -C <dir> .``.
The transports only move bytes; this module produces and consumes them:

* :func:`preflight` walks the workspace, applies ``--exclude`` patterns and refuses, in one
  :class:`PreflightError`, every path that Windows cannot hold. It returns a :class:`Manifest`.
* :func:`archive` streams a PAX tar of the manifest in bounded chunks (no temp file, no whole file in memory).
* :class:`Extractor` consumes a tar stream pushed in chunks and extracts it into the local workspace with
  ``filter="data"`` safety plus the copy-back rules documented on the class.

Exclude patterns (``--exclude GLOB``, repeatable) use :func:`fnmatch.fnmatchcase` (case-sensitive; ``*`` and
``?`` also match ``/``; ``[...]`` classes work) against POSIX paths relative to the workspace root:

* a pattern without ``/`` is matched against every component of the path, so ``*.o`` drops every object
  file and ``node_modules`` drops every directory (or file) of that name, with everything below it;
* a pattern with ``/`` is matched against the path and each of its leading directories, from the root:
  ``build/**`` drops everything inside the top-level ``build`` (the then empty ``build`` stays; write
  ``build`` to drop it too), ``src/*.gen.c`` drops matching files anywhere below ``src``;
* a leading ``./`` or ``/`` is ignored; a trailing ``/`` makes the pattern match directories only.

Excluding a directory excludes everything below it, and nothing below it is checked.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import posixpath
import re
import secrets
import shutil
import stat
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Literal

from winbuilder.errors import DeadlineExceeded, ProtocolError, UsageError, WinbuilderError, WorkspaceError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_REMOTE_ROOT",
    "ArchiveStream",
    "Entry",
    "ExtractResult",
    "Extractor",
    "Manifest",
    "PreflightError",
    "Problem",
    "archive",
    "preflight",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 512 * 1024
"""Size in bytes of the chunks :func:`archive` yields (the last one may be shorter)."""

DEFAULT_REMOTE_ROOT = "C:\\workspace"
"""Where the workspace lands on the server; only used to warn about paths longer than ``MAX_PATH``."""

MAX_PATH = 260
"""Windows ``MAX_PATH`` in UTF-16 code units, terminating NUL included (so 259 usable characters)."""

_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"{dev}{n}" for dev in ("COM", "LPT") for n in [*"123456789", "\u00b9", "\u00b2", "\u00b3"]]
)
_FORBIDDEN = frozenset('<>:"|?*\\') | frozenset(chr(c) for c in range(32))
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_SYMLINK_TYPE_KEY = "LIBARCHIVE.symlinktype"

Kind = Literal["file", "dir", "symlink"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of the workspace.

    Attributes:
        path: POSIX path relative to the workspace root, e.g. ``"src/main.c"`` (never ``.`` or absolute).
        kind: ``"file"``, ``"dir"`` or ``"symlink"``.
        size: size in bytes at preflight time (0 for dirs and symlinks).
        mode: permission bits (``stat.S_IMODE``), e.g. ``0o755``.
        mtime: modification time, seconds since the epoch.
        target: the symlink's target as stored (relative POSIX); ``""`` for files and dirs.
        target_is_dir: for symlinks, whether the target is a directory (Windows needs to know).
    """

    path: str
    kind: Kind
    size: int
    mode: int
    mtime: float
    target: str = ""
    target_is_dir: bool = False


@dataclass(frozen=True, slots=True)
class Problem:
    """A path Windows cannot hold.

    Attributes:
        path: POSIX path relative to the workspace root.
        reason: why, in a few words, e.g. ``'reserved device name "AUX"'``.
    """

    path: str
    reason: str


@dataclass(frozen=True)
class Manifest:
    """What :func:`preflight` found: the entries to send, in archive order (a directory before its contents).

    Attributes:
        root: the workspace root.
        entries: every kept file, directory and symlink.
        files: number of regular files.
        bytes: total size of the regular files, in bytes.
        dirs: number of directories (the root not counted).
        symlinks: number of symlinks.
        excluded: number of paths dropped by exclude patterns (an excluded directory counts once).
        warnings: non-fatal findings (long paths, skipped special files), also logged.
    """

    root: Path
    entries: tuple[Entry, ...]
    files: int
    bytes: int
    dirs: int
    symlinks: int
    excluded: int
    warnings: tuple[str, ...] = ()


class PreflightError(WorkspaceError):
    """The workspace holds paths that Windows cannot hold. ``problems`` lists every one of them.

    Args:
        problems: each bad path and why; ``details`` has one line per problem, the message names the first few.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        shown = sorted({_show(p.path) for p in problems})
        names = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
        noun = "path" if len(shown) == 1 else "paths"
        super().__init__(
            f"{len(shown)} workspace {noun} cannot be copied to Windows ({names}; reasons listed above)",
            "rename them, or leave them out with --exclude GLOB (e.g. --exclude 'aux.c' --exclude 'tmp/**')",
        )
        self.details = tuple(f"{_show(p.path)}: {p.reason}" for p in problems)
        self.problems: tuple[Problem, ...] = tuple(problems)


# --------------------------------------------------------------------------------------------------------------
# Exclude patterns
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    regex: re.Pattern[str]
    anchored: bool  # pattern has a "/": match the path (and its leading dirs) instead of each component
    dir_only: bool


def _compile_excludes(patterns: Sequence[str]) -> tuple[_Rule, ...]:
    rules = []
    for raw in patterns:
        pat = raw.strip()
        while pat.startswith("./"):
            pat = pat[2:]
        pat = pat.lstrip("/")
        dir_only = pat.endswith("/")
        pat = pat.rstrip("/")
        if not pat:
            raise UsageError(f"--exclude pattern {raw!r} matches nothing", "give a glob such as '*.o' or 'build/**'")
        rules.append(_Rule(re.compile(fnmatch.translate(pat)), "/" in pat, dir_only))
    return tuple(rules)


def _excluded(rel: str, is_dir: bool, rules: Sequence[_Rule]) -> bool:
    """Whether ``rel`` (relative POSIX path; ``is_dir`` for its last component) matches an exclude rule."""
    if not rules:
        return False
    parts = rel.split("/")
    last = len(parts) - 1
    for i, part in enumerate(parts):
        part_is_dir = i < last or is_dir
        prefix = "/".join(parts[: i + 1]) if i < last else rel
        for rule in rules:
            if rule.dir_only and not part_is_dir:
                continue
            subject = prefix if rule.anchored else part
            if rule.regex.match(subject):
                return True
    return False


# --------------------------------------------------------------------------------------------------------------
# Preflight
# --------------------------------------------------------------------------------------------------------------


def _show(path: str) -> str:
    """``path`` with control characters and undecodable bytes escaped, safe for one log/error line."""
    return "".join(c if c.isprintable() else f"\\x{ord(c) & 0xFF:02x}" for c in path)


def _fold(name: str) -> str:
    """Case-fold roughly like NTFS' upcase table: per character, and only where it maps to one character."""
    if name.isascii():
        return name.upper()
    out = []
    for c in name:
        up = c.upper()
        out.append(up if len(up) == 1 else c)
    return "".join(out)


def _name_problems(name: str) -> list[str]:
    """Why Windows cannot hold a file or directory called ``name`` (empty list if it can)."""
    reasons = []
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        reasons.append("name is not valid UTF-8")
    base = name.split(".", 1)[0].rstrip(" ").upper()
    if base in _RESERVED:
        reasons.append(f'reserved device name "{base}" (reserved with any extension, in any case)')
    if name.endswith((".", " ")):
        reasons.append("name ends in a dot or a space")
    bad = sorted({c for c in name if c in _FORBIDDEN})
    if bad:
        shown = " ".join(repr(c) if c.isprintable() else f"\\x{ord(c):02x}" for c in bad)
        reasons.append(f"character(s) not allowed in Windows names: {shown}")
    if len(name.encode("utf-16-le", "surrogatepass")) // 2 > 255:
        reasons.append("name longer than 255 UTF-16 code units")
    return reasons


def _symlink_problem(root_real: str, rel: str, target: str) -> str:
    """Why a symlink at ``rel`` pointing to ``target`` cannot be sent ('' if it can)."""
    if not target:
        return "symlink with an empty target"
    if target.startswith("/"):
        return f"symlink to an absolute path ({_show(target)})"
    if "\\" in target or re.match(r"^[A-Za-z]:", target):
        return f"symlink target with a backslash or drive letter ({_show(target)}; Windows reads it as a path)"
    lexical = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    if lexical == ".." or lexical.startswith("../"):
        return f"symlink points outside the workspace ({_show(target)})"
    resolved = os.path.realpath(os.path.join(root_real, rel))
    if os.path.commonpath([resolved, root_real]) != root_real:
        return f"symlink resolves outside the workspace ({_show(target)}, through another link)"
    return ""


def preflight(
    root: Path,
    excludes: Sequence[str] = (),
    *,
    remote_root: str = DEFAULT_REMOTE_ROOT,
) -> Manifest:
    """Walk the workspace, apply exclude patterns, and check that Windows can hold every path.

    The name rules follow Microsoft's "Naming Files, Paths, and Namespaces" (Win32 file namespace, as
    bsdtar's ``tar.exe`` creates files through it).
    Symlinks are recorded as links, never followed (a symlink to a directory is one entry). Errors (all
    collected, then raised together):

    * two names in one directory that differ only in case (``README`` and ``readme``);
    * reserved device names, with any extension and in any case: CON PRN AUX NUL COM1-9 LPT1-9 and
      COM/LPT with superscript 1-3 (``aux.c``, ``Nul.txt``);
    * names ending in a dot or a space; names with ``<>:"|?*\\`` or control characters 0-31; names that
      are not valid UTF-8 or longer than 255 UTF-16 code units;
    * symlinks that are absolute, empty, have a backslash or drive letter in the target, or point
      (lexically or through other links) outside the workspace: these are errors, not skipped, so
      nothing silently goes missing on the server;
    * files or directories that cannot be read.

    Warnings only (logged and returned in ``Manifest.warnings``): paths longer than ``MAX_PATH`` once put
    under ``remote_root``, symlinks whose target does not exist, and sockets/FIFOs/devices (skipped).
    Hard links are sent as independent copies.

    Args:
        root: the workspace directory.
        excludes: ``--exclude`` glob patterns, semantics in the module docstring.
        remote_root: the Windows directory the workspace is extracted into; used for the length warning.

    Returns:
        The manifest: entries in archive order (sorted by name, a directory before its contents) and totals.

    Raises:
        PreflightError: (a ``WorkspaceError``) listing every bad path with its reason.
        WorkspaceError: ``root`` is not a readable directory.
        UsageError: an exclude pattern is empty.
    """
    rules = _compile_excludes(excludes)
    root = Path(root)
    if not root.is_dir():
        raise WorkspaceError(f"workspace {_show(str(root))} is not a directory", "check the workspace path")
    root_real = os.path.realpath(root)
    prefix_len = len(remote_root.rstrip("\\")) + 1

    entries: list[Entry] = []
    problems: list[Problem] = []
    warnings: list[str] = []
    files = total = dirs = links = excluded = 0

    def warn(msg: str) -> None:
        warnings.append(msg)
        log.warning("%s", msg)

    pending = [""]
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as it:
                items = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            problems.append(Problem(rel_dir or ".", f"cannot list directory ({exc.strerror})"))
            continue

        kept: list[tuple[os.DirEntry[str], str, os.stat_result]] = []
        for de in items:
            rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
            try:
                st = de.stat(follow_symlinks=False)
            except OSError as exc:
                problems.append(Problem(rel, f"cannot stat ({exc.strerror})"))
                continue
            if _excluded(rel, stat.S_ISDIR(st.st_mode), rules):
                excluded += 1
                continue
            kept.append((de, rel, st))

        twins: dict[str, list[str]] = {}
        for de, _rel, _st in kept:
            twins.setdefault(_fold(de.name), []).append(de.name)
        clashing = {key: names for key, names in twins.items() if len(names) > 1}

        subdirs: list[str] = []
        for de, rel, st in kept:
            for reason in _name_problems(de.name):
                problems.append(Problem(rel, reason))
            group = clashing.get(_fold(de.name)) if clashing else None
            if group:
                others = ", ".join(_show(n) for n in group if n != de.name)
                problems.append(Problem(rel, f"differs only in case from {others} (Windows names ignore case)"))
            if prefix_len + len(rel.encode("utf-16-le", "surrogatepass")) // 2 >= MAX_PATH:
                warn(f"{_show(rel)}: longer than {MAX_PATH - 1} characters under {remote_root} "
                     "(needs long path support on the server)")
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                dirs += 1
                entries.append(Entry(rel, "dir", 0, mode, st.st_mtime))
                subdirs.append(rel)
            elif stat.S_ISREG(st.st_mode):
                if not os.access(de.path, os.R_OK):
                    problems.append(Problem(rel, "file is not readable"))
                files += 1
                total += st.st_size
                entries.append(Entry(rel, "file", st.st_size, mode, st.st_mtime))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(de.path)
                reason = _symlink_problem(root_real, rel, target)
                if reason:
                    problems.append(Problem(rel, reason))
                    continue
                if not os.path.exists(de.path):
                    warn(f"{_show(rel)}: symlink target {_show(target)} does not exist")
                links += 1
                entries.append(Entry(rel, "symlink", 0, mode, st.st_mtime, target, os.path.isdir(de.path)))
            else:
                warn(f"{_show(rel)}: skipped (socket, FIFO or device file; tar cannot send it to Windows)")
        pending.extend(reversed(subdirs))

    if problems:
        raise PreflightError(problems)
    return Manifest(root, tuple(entries), files, total, dirs, links, excluded, tuple(warnings))


# --------------------------------------------------------------------------------------------------------------
# Archive (producer)
# --------------------------------------------------------------------------------------------------------------


def _header(name: str, kind: bytes, *, size: int = 0, mode: int = 0o644, mtime: float = 0.0,
            linkname: str = "", pax: Mapping[str, str] | None = None) -> bytes:
    """One tar header (PAX format: UTF-8 and long names get an extended header) for ``name``."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = int(mtime)  # whole seconds: a float would add a 1 KiB PAX header to every member
    info.linkname = linkname
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if pax:
        info.pax_headers = dict(pax)
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


def _check_extra_path(path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise WorkspaceError(f"generated file path {_show(path)} is not a plain relative POSIX path",
                             "this is a bug in winbuilder")
    for part in parts:
        reasons = _name_problems(part)
        if reasons:
            raise WorkspaceError(f"generated file path {_show(path)}: {reasons[0]}", "this is a bug in winbuilder")
    return path


class ArchiveStream(Iterator[bytes]):
    """The chunks of a PAX tar archive, produced lazily; counters grow as it is consumed.

    Create it with :func:`archive`. Attributes (bytes unless stated):

    Attributes:
        bytes_out: archive bytes yielded so far.
        files: regular files written so far (generated ``extra`` files included).
        file_bytes: file content bytes written so far (without headers and padding).
        members: archive members written so far (files, directories, symlinks).
    """

    def __init__(self, manifest: Manifest, root: Path, extra: Mapping[str, bytes], chunk_size: int) -> None:
        if chunk_size < _BLOCK:
            raise ValueError(f"chunk_size must be at least {_BLOCK} bytes")
        self.bytes_out = 0
        self.files = 0
        self.file_bytes = 0
        self.members = 0
        self._chunk = chunk_size
        self._buf = bytearray()
        self._gen = self._produce(manifest, Path(root), {_check_extra_path(k): v for k, v in extra.items()})

    def __next__(self) -> bytes:
        chunk = next(self._gen)
        self.bytes_out += len(chunk)
        return chunk

    def __iter__(self) -> ArchiveStream:
        return self

    def _flush(self, final: bool = False) -> Iterator[bytes]:
        while len(self._buf) >= self._chunk:
            with memoryview(self._buf) as view:
                out = bytes(view[: self._chunk])
            del self._buf[: self._chunk]
            yield out
        if final and self._buf:
            out = bytes(self._buf)
            self._buf.clear()
            yield out

    def _produce(self, manifest: Manifest, root: Path, extra: dict[str, bytes]) -> Iterator[bytes]:
        known_dirs: set[str] = set()
        for entry in manifest.entries:
            if entry.path in extra:
                if entry.kind == "dir":
                    raise WorkspaceError(f"generated file {_show(entry.path)} collides with a workspace directory",
                                         "rename or exclude that directory")
                continue  # the generated file replaces the workspace's own copy
            if entry.kind == "dir":
                known_dirs.add(entry.path)
                self._buf += _header(entry.path, tarfile.DIRTYPE, mode=entry.mode, mtime=entry.mtime)
            elif entry.kind == "symlink":
                pax = {_SYMLINK_TYPE_KEY: "dir" if entry.target_is_dir else "file"}
                self._buf += _header(entry.path, tarfile.SYMTYPE, mode=entry.mode, mtime=entry.mtime,
                                     linkname=entry.target, pax=pax)
            else:
                yield from self._file(root, entry)
                continue
            self.members += 1
            yield from self._flush()

        now = time.time()
        for path, data in sorted(extra.items()):
            parts = path.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent not in known_dirs:
                    known_dirs.add(parent)
                    self._buf += _header(parent, tarfile.DIRTYPE, mode=0o755, mtime=now)
                    self.members += 1
            self._buf += _header(path, tarfile.REGTYPE, size=len(data), mode=0o644, mtime=now)
            self._buf += data
            self._buf += _padding(len(data))
            self.members += 1
            self.files += 1
            self.file_bytes += len(data)
            yield from self._flush()

        self._buf += b"\0" * (2 * _BLOCK)
        self._buf += b"\0" * (-(self.bytes_out + len(self._buf)) % _RECORD)
        yield from self._flush(final=True)

    def _file(self, root: Path, entry: Entry) -> Iterator[bytes]:
        path = root / entry.path
        shown = _show(entry.path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise WorkspaceError(f"cannot read {shown}: {exc.strerror}",
                                 "the workspace changed during the copy; retry") from exc
        with open(fd, "rb", buffering=0) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise WorkspaceError(f"{shown} is no longer a regular file", "the workspace changed during the copy")
            size = st.st_size
            self._buf += _header(entry.path, tarfile.REGTYPE, size=size, mode=stat.S_IMODE(st.st_mode),
                                 mtime=st.st_mtime)
            remaining = size
            while remaining:
                want = min(remaining, max(self._chunk - len(self._buf), _BLOCK))
                try:
                    data = f.read(want)
                except OSError as exc:
                    raise WorkspaceError(f"cannot read {shown}: {exc.strerror}", "check the disk") from exc
                if not data:
                    raise WorkspaceError(
                        f"{shown} shrank while it was being copied ({size - remaining} of {size} bytes read)",
                        "stop whatever writes to the workspace during the copy, then retry")
                self._buf += data
                remaining -= len(data)
                self.file_bytes += len(data)
                yield from self._flush()
            if f.read(1):
                raise WorkspaceError(f"{shown} grew while it was being copied (beyond {size} bytes)",
                                     "stop whatever writes to the workspace during the copy, then retry")
        self._buf += _padding(size)
        self.members += 1
        self.files += 1
        yield from self._flush()


def archive(
    manifest: Manifest,
    root: Path,
    extra: Mapping[str, bytes] = MappingProxyType({}),
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ArchiveStream:
    """Stream the workspace as a PAX tar archive, for ``tar -xf - -C <dir>`` (bsdtar or GNU tar).

    The format is the POSIX.1-2001 pax interchange format (ustar headers plus extended headers), written
    with :meth:`tarfile.TarInfo.tobuf`; file bodies are streamed here, padded to 512-byte blocks.

    Members come in manifest order (a directory before its contents), then ``extra``. Each keeps its
    UTF-8 name (long and non-ASCII names go in PAX extended headers), permission bits and mtime (whole
    seconds); uid/gid are 0 and owner names empty. Empty directories are kept. Symlinks are stored as
    links with a ``LIBARCHIVE.symlinktype`` PAX key (``file``/``dir``) so bsdtar on Windows creates the
    right kind of link (GNU tar warns about the unknown key and ignores it). The archive ends with two
    zero blocks and is padded to a 10240-byte record.

    Memory stays bounded by about two chunks: file bodies are read ``chunk_size`` at a time, nothing is
    written to disk. A file is read through ``O_NOFOLLOW`` and its header uses its size when opened; if the
    file then shrinks or grows while it is read, :class:`WorkspaceError` is raised rather than letting a
    padded or truncated copy reach the server (the remote tar then sees a truncated stream and fails).

    Args:
        manifest: from :func:`preflight`.
        root: the workspace root the manifest was made from.
        extra: generated files to add, relative POSIX path -> content (e.g. ``".winbuilder/run.ps1"``),
            mode 0644; missing parent directories are added. An extra file replaces a workspace file of
            the same path.
        chunk_size: size of each yielded chunk in bytes (the last may be shorter); at least 512.

    Returns:
        An iterator of ``bytes`` chunks with running counters (``bytes_out``, ``files``, ``file_bytes``).

    Raises:
        WorkspaceError: (while iterating) a file vanished, became unreadable or changed size; an ``extra``
            path is not a valid relative path.
        ValueError: ``chunk_size`` is below 512.
    """
    return ArchiveStream(manifest, root, extra, chunk_size)


# --------------------------------------------------------------------------------------------------------------
# Extractor (consumer)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractResult:
    """What a copy-back extracted. Sizes in bytes.

    Attributes:
        files: regular files written (new or replaced).
        bytes: file content bytes written.
        dirs: directories created (existing ones not counted).
        symlinks: symlinks created or replaced.
        skipped: members left out by exclude patterns.
        stream_bytes: archive bytes consumed.
    """

    files: int
    bytes: int
    dirs: int
    symlinks: int
    skipped: int
    stream_bytes: int


class _Aborted(Exception):
    pass


class _Refused(Exception):
    pass


class _Pipe:
    """Bounded FIFO of byte chunks from the transport's thread to the extraction thread."""

    def __init__(self, limit: int, keep: int) -> None:
        self._limit = limit
        self._keep = keep
        self._chunks: deque[bytes] = deque()
        self._head = 0  # bytes of _chunks[0] already read
        self._size = 0
        self._eof = False
        self._aborted = False
        self._reader_done = False
        self._cond = threading.Condition()
        self.position = 0  # bytes handed to the reader so far
        self.recent: deque[tuple[int, bytes]] = deque()  # (stream offset, piece) of the last ``keep`` bytes

    def put(self, data: bytes) -> bool:
        """Queue ``data``, waiting while the pipe is full. False if the reader has stopped."""
        with self._cond:
            while self._size >= self._limit and not (self._reader_done or self._aborted):
                self._cond.wait(1.0)
            if self._reader_done or self._aborted:
                return False
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify_all()
            return True

    def end(self, *, abort: bool = False) -> None:
        with self._cond:
            self._eof = True
            self._aborted = self._aborted or abort
            self._cond.notify_all()

    def reader_done(self) -> None:
        with self._cond:
            self._reader_done = True
            self._chunks.clear()
            self._size = 0
            self._cond.notify_all()

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (fewer if less is queued); b"" at end of stream. Raises _Aborted."""
        with self._cond:
            while not self._chunks and not self._eof and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise _Aborted
            if not self._chunks:
                return b""
            chunk = self._chunks[0]
            avail = len(chunk) - self._head
            n = avail if size < 0 else min(size, avail)
            piece = chunk[self._head : self._head + n] if (self._head or n < len(chunk)) else chunk
            self._head += n
            if self._head == len(chunk):
                self._chunks.popleft()
                self._head = 0
            self._size -= n
            self._cond.notify_all()
        self.recent.append((self.position, piece))
        self.position += n
        while self.recent and self.recent[0][0] + len(self.recent[0][1]) < self.position - self._keep:
            self.recent.popleft()
        return piece

    def window(self, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of the stream, from what was kept of the recent reads."""
        out = bytearray()
        for offset, piece in self.recent:
            lo = max(start, offset)
            hi = min(start + length, offset + len(piece))
            if lo < hi:
                out += piece[lo - offset : hi - offset]
        return bytes(out)


_FILTER_REASONS: tuple[tuple[type[tarfile.FilterError], str], ...] = (
    (tarfile.AbsoluteLinkError, "link to an absolute path"),
    (tarfile.LinkOutsideDestinationError, "link pointing outside the workspace"),
    (tarfile.SpecialFileError, "device file or FIFO"),
    (tarfile.OutsideDestinationError, "path leads outside the workspace (through a symlink)"),
    (tarfile.AbsolutePathError, "absolute path"),
)


class Extractor:
    """Extract a tar stream pushed in chunks into the local workspace (copy-back).

    The transport calls :meth:`feed` with each stdout chunk of ``tar -cf - -C <dir> .``; a background
    thread parses it with :mod:`tarfile` in stream mode (``r|``) and writes files as they arrive. Memory
    is bounded: :meth:`feed` blocks while ``max_buffer`` bytes are queued. Call :meth:`close` at end of
    stream for the result, or :meth:`abort` when the transfer failed. As a context manager, leaving the
    block with an exception, or without calling :meth:`close`, aborts.

    Copy-back semantics:

    * New and changed files land locally; each file is written to a temporary name and renamed into
      place, so a local file is never left half-written. mtimes come from the archive.
    * Nothing is ever deleted: files deleted remotely stay locally. A local directory is never replaced
      by a file or link (and vice versa): that conflict is an error.
    * Mode bits: a new file gets the archive's bits with ``filter="data"`` rules (group/other write and
      setuid/setgid/sticky cleared, owner read+write added). A file that existed locally keeps its local
      mode, plus the execute bits the archive sets (Windows tar may report 0644 for everything, so a
      local script never loses its ``+x``). New directories get the archive's bits plus owner rwx
      (applied at the end); existing directories keep theirs.
    * Refused, and the whole copy-back fails with :class:`WorkspaceError`: absolute names, names with
      ``..``, anything that would land outside the workspace (also through an existing local symlink),
      symlinks that are absolute or point outside the workspace, hard links to anything but a file
      extracted earlier from the same archive (those become copies), device files and FIFOs.
    * A stream that ends early (mid-member, or without the two zero blocks that end a tar archive)
      raises :class:`ProtocolError`, never success. Files completed before the failure stay.
    * Members matching ``excludes`` (same patterns as :func:`preflight`) are skipped.
    * Memory: the queue holds at most ``max_buffer`` bytes (plus one chunk) and tar parsing a few
      records; the only state kept per member is the set of extracted file names (for hard links).

    Args:
        dest: the local workspace root (created if missing).
        excludes: exclude patterns for members that must not come back, e.g. ``".winbuilder"``.
        max_buffer: bytes that may be queued between :meth:`feed` and the extraction thread.
    """

    def __init__(self, dest: Path, *, excludes: Sequence[str] = (), max_buffer: int = 4 * 1024 * 1024) -> None:
        self._dest = Path(dest)
        self._dest.mkdir(parents=True, exist_ok=True)
        self._dest_real = os.path.realpath(self._dest)
        self._rules = _compile_excludes(excludes)
        self._pipe = _Pipe(max_buffer, keep=4 * _RECORD)
        self._error: BaseException | None = None
        self._result: ExtractResult | None = None
        self._closed = False
        self._files = self._bytes = self._dirs = self._links = self._skipped = 0
        self._extracted_files: set[str] = set()
        self._new_dirs: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._run, name="winbuilder-extract", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Queue one chunk of the tar stream; blocks while the buffer is full.

        Args:
            chunk: the next bytes of the stream, any size (empty chunks are ignored).

        Raises:
            WorkspaceError, ProtocolError: extraction already failed (the same error :meth:`close` raises),
                so the transport can stop the remote command early.
            RuntimeError: called after :meth:`close` or :meth:`abort`.
        """
        if self._closed:
            raise RuntimeError("Extractor.feed() after close() or abort()")
        if not chunk:
            return
        if not self._pipe.put(bytes(chunk)):
            self._thread.join()
            if self._error is not None:
                raise self._error
            raise ProtocolError("copy-back archive ended, but more data followed", "")

    @property
    def bytes_in(self) -> int:
        """Archive bytes the extraction has consumed so far (for progress display)."""
        return self._pipe.position

    def close(self, timeout: float | None = None) -> ExtractResult:
        """Signal end of stream, wait for the extraction to finish, and return its counts.

        Args:
            timeout: seconds to wait for the extraction thread; ``None`` waits as long as it takes.

        Returns:
            Counts of what was written.

        Raises:
            ProtocolError: the stream was truncated or is not a tar archive, or :meth:`abort` was called.
            WorkspaceError: a member was refused, or a local file could not be written.
            DeadlineExceeded: not finished within ``timeout``.
        """
        if not self._closed:
            self._closed = True
            self._pipe.end()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.abort()
            raise DeadlineExceeded("copy-back extraction did not finish in time", "")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def abort(self) -> None:
        """Stop extracting and discard the rest of the stream. Idempotent; never raises.

        Files already completed stay; a file being written is discarded.
        """
        self._closed = True
        self._pipe.end(abort=True)
        self._thread.join()
        if self._error is None and self._result is None:
            self._error = ProtocolError("copy-back was aborted", "")

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None or self._result is None:
            self.abort()

    # -- extraction thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._extract_all()
        except _Aborted:
            self._error = ProtocolError("copy-back was aborted", "")
        except _Refused as exc:
            self._error = WorkspaceError(f"copy-back refused: {exc}",
                                         "the server sent a path that would escape the workspace; nothing was "
                                         "written outside it")
        except (tarfile.TarError, EOFError) as exc:
            self._error = ProtocolError(f"copy-back archive is truncated or malformed ({exc})",
                                        "the remote tar stopped early; see its error output")
        except WinbuilderError as exc:
            self._error = exc
        except OSError as exc:
            self._error = WorkspaceError(f"copy-back cannot write {_show(exc.filename or '')}: {exc.strerror}",
                                         "check free space and permissions of the workspace")
        except BaseException as exc:  # a bug: keep it for close(), never lose it in the thread
            self._error = exc
        finally:
            self._pipe.reader_done()

    def _extract_all(self) -> None:
        pipe = self._pipe
        with tarfile.open(fileobj=pipe, mode="r|") as tf:  # type: ignore[call-overload]
            while True:
                member = tf.next()
                tf.members.clear()  # stream mode would keep every TarInfo otherwise
                if member is None:
                    break
                self._member(tf, member)
            end = tf.offset
        # tarfile treats a stream cut at a header boundary as a normal end: insist on the end-of-archive blocks.
        marker = pipe.window(end, 2 * _BLOCK)
        while len(marker) < 2 * _BLOCK and pipe.read(2 * _BLOCK):
            marker = pipe.window(end, 2 * _BLOCK)
        if marker != b"\0" * (2 * _BLOCK):
            raise ProtocolError(f"copy-back archive is truncated (no end-of-archive marker at byte {end})",
                                "the remote tar stopped early; see its error output")
        while pipe.read(_RECORD):
            pass  # drain trailing record padding so the transport never blocks
        for rel, mode in reversed(self._new_dirs):
            path = os.path.join(self._dest_real, rel)
            if not os.path.islink(path):
                os.chmod(path, mode)
        self._result = ExtractResult(self._files, self._bytes, self._dirs, self._links, self._skipped,
                                     pipe.position)

    def _member(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            raise _Refused(f"{_show(name)}: absolute path")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise _Refused(f"{_show(name)}: path contains '..'")
        if not parts:
            return  # the archive's "./" root entry: the workspace itself, left as it is
        rel = "/".join(parts)
        if _excluded(rel, member.isdir(), self._rules):
            self._skipped += 1
            return
        member = member.replace(name=rel, deep=False)
        try:
            filtered = tarfile.data_filter(member, str(self._dest_real))
        except tarfile.FilterError as exc:
            reason = next((text for cls, text in _FILTER_REASONS if isinstance(exc, cls)), "refused")
            raise _Refused(f"{_show(name)}: {reason}") from exc
        path = os.path.join(self._dest_real, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            local = os.lstat(path)
        except FileNotFoundError:
            local = None
        local_is_dir = local is not None and stat.S_ISDIR(local.st_mode)

        if member.isdir():
            if local is None:
                os.mkdir(path, 0o700)
                self._dirs += 1
                self._new_dirs.append((rel, (member.mode & 0o777) | 0o700))
            elif not local_is_dir and not os.path.isdir(path):
                raise WorkspaceError(f"copy-back: {_show(rel)} is a directory on the server but not locally",
                                     "move the local file away, then copy back again")
            return
        if local_is_dir:
            raise WorkspaceError(f"copy-back: {_show(rel)} is a directory locally but not on the server",
                                 "copy-back never replaces a local directory; move it away and retry")
        if member.issym():
            self._replace(path, lambda tmp: os.symlink(member.linkname, tmp))
            self._links += 1
        elif member.isreg():
            mode = filtered.mode if filtered.mode is not None else 0o644
            if local is not None and stat.S_ISREG(local.st_mode):
                mode = stat.S_IMODE(local.st_mode) | (member.mode & 0o111)
            self._write_file(tf, member, path, mode)
            self._extracted_files.add(rel)
        elif member.islnk():
            target = "/".join(p for p in member.linkname.split("/") if p not in ("", "."))
            if target not in self._extracted_files:
                raise _Refused(f"{_show(name)}: hard link to {_show(member.linkname)}, which this archive did "
                               "not extract as a file")
            source = os.path.join(self._dest_real, target)
            self._replace(path, lambda tmp: shutil.copy2(source, tmp))
            self._files += 1
            self._extracted_files.add(rel)
        else:
            raise _Refused(f"{_show(name)}: unsupported member type {member.type!r}")

    def _replace(self, path: str, make: Callable[[str], object]) -> None:
        """Create a temporary sibling of ``path`` with ``make(tmp)``, then rename it over ``path``."""
        tmp = os.path.join(os.path.dirname(path), f".wb-{secrets.token_hex(8)}.part")
        try:
            make(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _write_file(self, tf: tarfile.TarFile, member: tarfile.TarInfo, path: str, mode: int) -> None:
        source = tf.extractfile(member)
        assert source is not None
        tmp = os.path.join(os.path.dirname(path), f".wb-{secrets.token_hex(8)}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "wb", buffering=0) as out:
                while data := source.read(1024 * 1024):
                    out.write(data)
                    self._bytes += len(data)
                os.fchmod(out.fileno(), mode)
            os.utime(tmp, (member.mtime, member.mtime))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._files += 1


