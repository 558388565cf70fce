"""Windows path <-> sandbox path mapping for the emulated Windows host. Pure functions, no IO.

The sandbox directory ``ROOT`` holds one folder per drive letter: ``C:\\`` is ``ROOT/C/``, ``D:\\x`` is
``ROOT/D/x``. The drive letter is case-insensitive (always upper-cased), both ``\\`` and ``/`` separate components,
and ``..`` is clamped at the drive root exactly as Windows clamps ``C:\\..`` to ``C:\\`` — a path can therefore
never leave the sandbox through ``..`` (symlinks created inside the sandbox are not checked).

Supported Windows path forms (Microsoft "File path formats on Windows systems"):

* ``C:\\a\\b`` / ``c:/a/b`` — fully qualified;
* ``C:`` / ``C:a`` — drive-relative: against the current directory when it is on that drive, else the drive root
  (Windows keeps one current directory per drive; we keep only one);
* ``\\a`` / ``/a`` — rooted: the root of the current drive;
* ``a\\b``, ``.\\a``, ``..\\a`` — relative to the current directory.

UNC (``\\\\server\\share``) and device paths (``\\\\?\\``) are not supported: they map like rooted paths.
Component case is preserved; the host file system is case-sensitive, unlike NTFS.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath

_DRIVE = re.compile(r"^([A-Za-z]):")
_DRIVE_ABS = re.compile(r"^[A-Za-z]:[\\/]")


def default_cwd(user: str) -> str:
    """The initial current directory of a user's shell: ``C:\\Users\\<user>``.

    Args:
        user: the Windows user name, e.g. ``"builder"``.

    Returns:
        The Windows path, e.g. ``"C:\\Users\\builder"``.
    """
    return "C:\\Users\\" + user


def is_drive_path(text: str) -> bool:
    """Whether ``text`` starts like a fully qualified Windows drive path (``C:\\``, ``c:/``).

    Args:
        text: any string, e.g. a command-line argument.

    Returns:
        True for ``"C:\\ws"``, ``"d:/x"``; False for ``"C:"``, ``"http://x"``, ``"ws"``.
    """
    return _DRIVE_ABS.match(text) is not None


def normalize(win_path: str, cwd: str) -> str:
    """Resolve a Windows path against a current directory into a canonical fully qualified Windows path.

    ``.`` and empty components are dropped, ``..`` removes the previous component and is clamped at the drive root.
    The result uses ``\\`` separators, an upper-case drive letter, and no trailing separator except for a drive
    root (``"C:\\"``).

    Args:
        win_path: the path as written, e.g. ``"..\\x"``, ``"c:/a/b"``, ``"\\tmp"``.
        cwd: the current directory, a fully qualified Windows path such as ``"C:\\Users\\me"``.

    Returns:
        The canonical path, e.g. ``"C:\\Users\\x"``.

    Raises:
        ValueError: if ``cwd`` is not a fully qualified drive path.
    """
    m = _DRIVE.match(cwd)
    if m is None:
        raise ValueError("current directory is not a drive path")
    cwd_drive = m.group(1).upper()
    cwd_parts = _split(cwd[2:])
    d = _DRIVE.match(win_path)
    if d is not None:
        drive = d.group(1).upper()
        rest = win_path[2:]
        if rest[:1] in ("\\", "/"):
            parts: list[str] = []
        else:
            parts = list(cwd_parts) if drive == cwd_drive else []
    else:
        drive = cwd_drive
        rest = win_path
        parts = [] if rest[:1] in ("\\", "/") else list(cwd_parts)
    for comp in _split(rest):
        if comp == "..":
            if parts:
                parts.pop()
        else:
            parts.append(comp)
    return drive + ":\\" + "\\".join(parts)


def to_host(win_path: str, cwd: str, root: Path) -> Path:
    """Map a Windows path to the host path inside the sandbox.

    Args:
        win_path: the path as written (see ``normalize``), e.g. ``"C:\\ws\\a.txt"``.
        cwd: the current Windows directory, e.g. ``"C:\\Users\\me"``.
        root: the sandbox directory that holds the drive folders.

    Returns:
        ``root / DRIVE / components``, e.g. ``root/"C"/"ws"/"a.txt"``. Always inside ``root``.

    Raises:
        ValueError: if ``cwd`` is not a fully qualified drive path.
    """
    full = normalize(win_path, cwd)
    parts = [p for p in full[3:].split("\\") if p]
    return root.joinpath(full[0], *parts)


def to_windows(host_path: PurePath, root: Path) -> str:
    """Map a host path inside the sandbox back to its Windows path (inverse of ``to_host``).

    Args:
        host_path: an absolute host path, e.g. ``root/"C"/"ws"``.
        root: the sandbox directory.

    Returns:
        The Windows path, e.g. ``"C:\\ws"``; a drive folder itself maps to ``"C:\\"``.

    Raises:
        ValueError: if ``host_path`` is not under ``root/<drive letter>``.
    """
    rel = PurePath(host_path).relative_to(root)
    if not rel.parts or len(rel.parts[0]) != 1 or not rel.parts[0].isalpha():
        raise ValueError("path is not inside a sandbox drive")
    return rel.parts[0].upper() + ":\\" + "\\".join(p for p in rel.parts[1:] if p != ".")


def _split(path: str) -> list[str]:
    """Split on both separators, dropping empty and ``.`` components."""
    return [c for c in re.split(r"[\\/]", path) if c and c != "."]
