"""The emulated cmd.exe: the real ``python -m winbuilder.emulator.cmd`` subprocess against a temporary sandbox,
plus unit tests of the pure parts (drive mapping, parser, argv splitting)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path, PurePath

import pytest

from winbuilder.emulator import cmd, paths

NOT_RECOGNIZED = (
    b"'{}' is not recognized as an internal or external command,\r\noperable program or batch file.\r\n"
)


def run(
    root: Path,
    line: str | None,
    stdin: bytes = b"",
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 20,
) -> subprocess.CompletedProcess[bytes]:
    """Run one command line through the interpreter, as the WS-Man server does."""
    argv = [sys.executable, "-m", "winbuilder.emulator.cmd", "--root", str(root), *(extra or [])]
    if line is not None:
        argv += ["-c", line]
    base = {k: v for k, v in os.environ.items() if k != "SSH_ORIGINAL_COMMAND"}
    base["USERNAME"] = "builder"
    base.update(env or {})
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, env=base, check=False)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    return sandbox


# --------------------------------------------------------------------------------------------------------------------
# paths.py


ROOT = Path("/sb")


@pytest.mark.parametrize(
    ("win", "cwd", "host"),
    [
        ("C:\\", "C:\\Users\\me", "/sb/C"),
        ("c:\\ws\\a.txt", "C:\\Users\\me", "/sb/C/ws/a.txt"),
        ("C:/ws/b", "C:\\", "/sb/C/ws/b"),
        ("D:\\x", "C:\\Users\\me", "/sb/D/x"),
        ("d:x", "C:\\Users\\me", "/sb/D/x"),
        ("C:x", "C:\\Users\\me", "/sb/C/Users/me/x"),
        ("sub\\f.txt", "C:\\Users\\me", "/sb/C/Users/me/sub/f.txt"),
        (".\\a\\.\\b", "C:\\w", "/sb/C/w/a/b"),
        ("..\\other", "C:\\Users\\me", "/sb/C/Users/other"),
        ("\\tmp\\x", "D:\\deep\\dir", "/sb/D/tmp/x"),
        ("/tmp", "C:\\w", "/sb/C/tmp"),
        ("..\\..\\..\\..\\etc\\passwd", "C:\\Users\\me", "/sb/C/etc/passwd"),
        ("C:\\..\\..\\x", "C:\\", "/sb/C/x"),
        ("C:\\a\\..\\..\\..", "C:\\w", "/sb/C"),
    ],
)
def test_to_host(win: str, cwd: str, host: str) -> None:
    assert paths.to_host(win, cwd, ROOT) == Path(host)


def test_to_host_never_escapes_root() -> None:
    for win in ("..", "..\\..", "C:..\\..", "\\..\\..\\..", "a/../../../../..", "Z:\\..\\.."):
        assert ROOT in paths.to_host(win, "C:\\Users\\me", ROOT).parents


def test_normalize_and_back() -> None:
    assert paths.normalize("c:/A//b/./c/..\\", "D:\\") == "C:\\A\\b"
    assert paths.normalize("..", "C:\\") == "C:\\"
    assert paths.to_windows(PurePath("/sb/C/ws/x.txt"), ROOT) == "C:\\ws\\x.txt"
    assert paths.to_windows(PurePath("/sb/d"), ROOT) == "D:\\"
    assert paths.to_windows(paths.to_host("C:\\Users\\me", "C:\\", ROOT), ROOT) == "C:\\Users\\me"
    with pytest.raises(ValueError):
        paths.to_windows(PurePath("/elsewhere/C/x"), ROOT)
    with pytest.raises(ValueError):
        paths.to_windows(PurePath("/sb/notadrive/x"), ROOT)
    with pytest.raises(ValueError):
        paths.normalize("x", "relative")


def test_default_cwd_and_drive_detection() -> None:
    assert paths.default_cwd("bob") == "C:\\Users\\bob"
    assert paths.is_drive_path("C:\\ws") and paths.is_drive_path("d:/x")
    assert not paths.is_drive_path("C:") and not paths.is_drive_path("http://x") and not paths.is_drive_path("ws")


# --------------------------------------------------------------------------------------------------------------------
# Pure parts of cmd.py


def test_split_args_msvcrt_rules() -> None:
    assert cmd.split_args('tar -C "C:\\my ws" -xf -') == ["tar", "-C", "C:\\my ws", "-xf", "-"]
    assert cmd.split_args('"C:\\Program Files\\x.exe" a\\\\"b c" d\\"e') == [
        "C:\\Program Files\\x.exe",
        "a\\b c",
        'd"e',
    ]
    assert cmd.split_args('p "C:\\ws\\"') == ["p", 'C:\\ws"']
    assert cmd.split_args('p "" "a""b"') == ["p", "", 'a"b']


def test_parse_tree() -> None:
    tree = cmd.parse('a && b || c & (d | e) 2>nul')
    assert isinstance(tree, cmd.Binary) and tree.op == "&"
    assert isinstance(tree.left, cmd.Binary) and tree.left.op == "||"
    assert isinstance(tree.right, cmd.Group)
    assert tree.right.redirects == (cmd.Redirect(2, ">", "nul"),)
    simple = cmd.parse('echo "a & b" ^& c 1>>"x y.txt" 2>&1')
    assert simple == cmd.Simple('echo "a & b" & c  ', (cmd.Redirect(1, ">>", "x y.txt"), cmd.Redirect(2, ">&", "1")))
    assert cmd.parse("  ") is None
    assert cmd.parse("echo a2>x") == cmd.Simple("echo a2", (cmd.Redirect(1, ">", "x"),))
    for bad in ("& echo", "echo a &&", "echo a | ", "(echo a", "echo >"):
        with pytest.raises(cmd.CmdSyntaxError):
            cmd.parse(bad)


def test_strip_slash_c_quotes() -> None:
    def is_prog(name: str) -> bool:
        return name == "C:\\Program Files\\x.exe"

    assert cmd.strip_slash_c_quotes('"echo a" & "b"', False, is_prog) == "echo a\" & \"b"
    assert cmd.strip_slash_c_quotes('"C:\\Program Files\\x.exe" arg', False, is_prog) == (
        '"C:\\Program Files\\x.exe" arg'
    )
    assert cmd.strip_slash_c_quotes('"C:\\Program Files\\x.exe" arg', True, is_prog) == "C:\\Program Files\\x.exe arg"
    assert cmd.strip_slash_c_quotes("echo a", False, is_prog) == "echo a"


# --------------------------------------------------------------------------------------------------------------------
# The interpreter process


@pytest.mark.parametrize("code", [0, 1, 3, 42, 255])
def test_exit_codes(root: Path, code: int) -> None:
    res = run(root, f"exit /b {code}")
    assert (res.returncode, res.stdout, res.stderr) == (code, b"", b"")


def test_big_exit_code_goes_to_the_exit_code_file(root: Path, tmp_path: Path) -> None:
    code_file = tmp_path / "code"
    res = run(root, "exit /b 3221225477", extra=["--exit-code-file", str(code_file)])
    assert res.returncode == 3221225477 & 0xFF
    assert code_file.read_text().strip() == "3221225477"
    run(root, "exit -1", extra=["--exit-code-file", str(code_file)])
    assert code_file.read_text().strip() == "4294967295"
    res = run(root, "echo hi", extra=["--exit-code-file", str(code_file)])
    assert res.stdout == b"hi\r\n" and code_file.read_text().strip() == "0"


def test_exit_code_of_last_command_and_signal_killed_child(root: Path) -> None:
    assert run(root, 'python3 -c "import sys; sys.exit(300)"').returncode == 300 & 0xFF
    assert run(root, "sh -c \"kill -9 $$\"").returncode == 1
    assert run(root, "exit /b 5 & echo not reached").stdout == b""
    assert run(root, "sh -c \"exit 4\" & echo still").returncode == 4  # echo leaves ERRORLEVEL alone


def test_and_or_sequence(root: Path) -> None:
    res = run(root, "sh -c false && echo A || echo B & echo C")
    assert res.stdout == b"B \r\nC\r\n"
    res = run(root, "echo 1&& echo 2|| echo 3")
    assert res.stdout == b"1\r\n2\r\n"
    res = run(root, "(echo a & echo b) > C:\\out.txt & type C:\\out.txt")
    assert res.stdout == b"a \r\nb\r\n"
    assert run(root, "& echo x").returncode == 255
    assert run(root, "& echo x").stderr == b"& was unexpected at this time.\r\n"


def test_redirections_and_type(root: Path) -> None:
    res = run(root, "echo text> C:\\f.txt& echo more>>C:\\f.txt& echo spaced >> C:\\f.txt&type C:\\f.txt")
    assert res.stdout == b"text\r\nmore\r\nspaced \r\n"  # cmd keeps the space before the redirection
    assert (root / "C" / "f.txt").read_bytes() == b"text\r\nmore\r\nspaced \r\n"
    res = run(root, "type C:\\missing.txt 2>nul || echo gone")
    assert (res.stdout, res.stderr) == (b"gone\r\n", b"")
    res = run(root, "type C:\\missing.txt")
    assert (res.returncode, res.stderr) == (1, b"The system cannot find the file specified.\r\n")
    res = run(root, "type C:\\missing.txt > C:\\both.txt 2>&1 & type C:\\both.txt")
    assert res.stdout == b"The system cannot find the file specified.\r\n"
    res = run(root, "echo quiet >nul & echo NUL works> NUL")
    assert res.stdout == b""
    res = run(root, "sort < C:\\f.txt", env={"LC_ALL": "C"})
    assert res.stdout == b"more\r\nspaced \r\ntext\r\n"
    res = run(root, "echo x > C:\\no\\such\\dir\\f.txt")
    assert (res.returncode, res.stderr) == (1, b"The system cannot find the path specified.\r\n")


def test_percent_expansion(root: Path) -> None:
    res = run(root, "echo %USERNAME%-%username%-%CD%-%NOT_DEFINED%-%COMPUTERNAME%-100%%")
    assert res.stdout == b"builder-builder-C:\\Users\\builder-%NOT_DEFINED%-WINBUILDER-EMU-100%%\r\n"
    res = run(root, "echo %USERPROFILE% %SystemRoot% %TEMP%")
    assert res.stdout == b"C:\\Users\\builder C:\\Windows C:\\Users\\builder\\AppData\\Local\\Temp\r\n"
    # Like cmd /c, the whole line is expanded before it runs; `call` expands again.
    res = run(root, "set X=abcdef& echo %X% & call echo %^X:~1,3%-%^X:cd=CD%")
    assert res.stdout == b"%X% \r\nbcd-abCDef\r\n"


def test_errorlevel(root: Path) -> None:
    res = run(root, "echo %ERRORLEVEL%")
    assert res.stdout == b"0\r\n"
    res = run(root, 'python3 -c "raise SystemExit(7)" & call echo %^ERRORLEVEL%')
    assert res.stdout == b"7\r\n"
    res = run(root, "cmd /c exit 3 & if errorlevel 3 echo ge3 & if errorlevel 4 (echo ge4) else (echo lt4)")
    assert res.stdout == b"ge3 \r\nlt4\r\n"
    res = run(root, "cmd /c exit -1073741819 & call echo %^ERRORLEVEL%")
    assert res.stdout == b"-1073741819\r\n"


def test_if_forms(root: Path) -> None:
    (root / "C" / "present").mkdir(parents=True)
    res = run(
        root,
        'if "a"=="b" (echo same) else (echo differ) & if not "a"=="b" echo not-same & '
        'if /i "A"=="a" echo ci & if exist C:\\present echo exists & if not exist C:\\absent echo absent & '
        "if defined USERNAME echo defined & if 10 GTR 9 echo numeric & if 10 LSS 9 (echo bad)",
    )
    assert res.stdout == b"differ\r\nnot-same \r\nci \r\nexists \r\nabsent \r\ndefined \r\nnumeric \r\n"


def test_builtins_files(root: Path) -> None:
    res = run(
        root,
        "md C:\\ws\\a\\b && cd C:\\ws\\a && (echo hi)>b\\f.txt && copy b\\f.txt g.txt && type g.txt && "
        "del g.txt && if not exist g.txt echo deleted && cd .. && rd /s /q a && if not exist a echo removed & cd",
    )
    assert res.stdout == b"        1 file(s) copied.\r\nhi\r\ndeleted \r\nremoved \r\nC:\\ws\r\n"
    res = run(root, "md C:\\ws")
    assert (res.returncode, res.stderr) == (1, b"A subdirectory or file C:\\ws already exists.\r\n")
    res = run(root, "cd C:\\nowhere")
    assert (res.returncode, res.stderr) == (1, b"The system cannot find the path specified.\r\n")
    res = run(root, "md D:\\x & cd D:\\x & cd & cd /d D:\\x & cd & cd ..\\..\\.. & cd")
    assert res.stdout == b"C:\\Users\\builder\r\nD:\\x\r\nD:\\\r\n"


def test_set_listing_and_arith(root: Path) -> None:
    res = run(root, "set WB_B=2& set WB_A=1& set WB_&set WB_B=&set WB_")
    assert res.stdout == b"WB_A=1\r\nWB_B=2\r\nWB_A=1\r\n"
    res = run(root, "set WB_NOPE")
    assert (res.returncode, res.stderr) == (1, b"Environment variable WB_NOPE not defined\r\n")
    res = run(root, 'set /a "x=(7+3)*2, x/=3" & call echo  %^x%')
    assert res.stdout == b"6 6\r\n"


def test_misc_programs(root: Path) -> None:
    res = run(root, "ver & hostname & whoami & timeout /t 0 /nobreak >nul & rem & echo skipped")
    assert res.stdout == (
        b"\r\nMicrosoft Windows [Version 10.0.20348.2340]\r\nWINBUILDER-EMU\r\nwinbuilder-emu\\builder\r\n"
    )
    started = time.monotonic()
    assert run(root, "timeout /t 1 /nobreak > nul").stdout == b""
    assert time.monotonic() - started >= 1


@pytest.mark.parametrize("name", ["powershell", "powershell.exe", "pwsh", "no-such-program-xyz"])
def test_unknown_programs_9009(root: Path, name: str) -> None:
    res = run(root, f"{name} -NoProfile -Command Get-Date")
    assert res.returncode == 9009 & 0xFF
    assert res.stderr == NOT_RECOGNIZED.replace(b"{}", name.encode())
    assert res.stdout == b""


def test_exe_suffix_and_path_mapping(root: Path) -> None:
    (root / "C" / "ws").mkdir(parents=True)
    (root / "C" / "ws" / "in.txt").write_bytes(b"data")
    res = run(root, 'cat.exe C:\\ws\\in.txt "c:/ws/in.txt" & C:\\Windows\\System32\\sh.exe -c "pwd" & '
                    'python3 -c "import sys; print(sys.argv[1])" --file=C:\\ws\\in.txt')
    assert res.stdout == (b"datadata" + str(root / "C" / "Users" / "builder").encode() + b"\n"
                          + b"--file=" + str(root / "C" / "ws" / "in.txt").encode() + b"\n")
    res = run(root, "cd /d C:\\ws && sh -c \"pwd; echo $HOME\"")
    assert res.stdout == f"{root}/C/ws\n{root}/C/Users/builder\n".encode()


def test_stdin_passthrough_tar_roundtrip(root: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("a.txt", b"alpha\n"), ("sub/b.bin", bytes(range(256)) * 1000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    res = run(root, "mkdir C:\\ws && tar.exe -xf - -C C:\\ws", stdin=buf.getvalue())
    assert res.returncode == 0, res.stderr
    assert (root / "C" / "ws" / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 1000
    res = run(root, "tar -cf - -C C:\\ws .")
    assert res.returncode == 0
    with tarfile.open(fileobj=io.BytesIO(res.stdout)) as tar:
        names = sorted(n.lstrip("./") for n in tar.getnames())
        assert "a.txt" in names and "sub/b.bin" in names
        member = tar.extractfile("./a.txt")
        assert member is not None and member.read() == b"alpha\n"


def test_utf8_bytes_exact(root: Path) -> None:
    res = run(root, "echo é 日本> C:\\u.txt& type C:\\u.txt & echo é日本")
    assert res.stdout == "é 日本\r\né日本\r\n".encode()
    assert (root / "C" / "u.txt").read_bytes() == "é 日本\r\n".encode()


def test_long_lines_truncated_at_8191(root: Path) -> None:
    prefix = "echo "
    line = prefix + "x" * 9000
    res = run(root, line)
    assert res.stdout == b"x" * (8191 - len(prefix)) + b"\r\n"
    # The truncation can cut off a failing tail: the line then "succeeds", as on Windows.
    res = run(root, "rem " + "y" * 8187 + "& exit /b 9")
    assert res.returncode == 0


def test_pipes(root: Path) -> None:
    res = run(root, "echo hello| tr a-z A-Z | sed s/L/_/g")
    assert res.stdout == b"HE__O\r\n"
    res = run(root, "type C:\\nothing 2>nul | cat & echo done")
    assert res.stdout == b"done\r\n"


def test_certutil_decode(root: Path) -> None:
    payload = bytes(range(256)) * 40
    import base64

    b64 = base64.b64encode(payload).decode()
    chunks = [b64[i : i + 3000] for i in range(0, len(b64), 3000)]
    for chunk in chunks:  # one command per chunk, as Packer and windows-builder do
        assert run(root, f"echo {chunk} >> C:\\up.b64").returncode == 0
    res = run(root, "certutil -f -decode C:\\up.b64 C:\\up.bin")
    assert res.returncode == 0
    assert b"CertUtil: -decode command completed successfully." in res.stdout
    assert (root / "C" / "up.bin").read_bytes() == payload
    # BEGIN/END armour, and the refusal to overwrite without -f.
    (root / "C" / "armoured.txt").write_text("-----BEGIN CERTIFICATE-----\r\naGVsbG8=\r\n-----END CERTIFICATE-----\r\n")
    assert run(root, "certutil -decode C:\\armoured.txt C:\\hello.txt").returncode == 0
    assert (root / "C" / "hello.txt").read_bytes() == b"hello"
    res = run(root, "certutil -decode C:\\armoured.txt C:\\hello.txt", extra=["--exit-code-file", str(root / "rc")])
    assert (root / "rc").read_text().strip() == str(0x80070050)
    assert b"ERROR_FILE_EXISTS" in res.stdout
    res = run(root, "certutil -hashfile C:\\hello.txt SHA256")
    assert b"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" in res.stdout


def test_batch_file(root: Path) -> None:
    (root / "C" / "ws").mkdir(parents=True)
    script = (
        "@echo off\r\n"
        "setlocal EnableDelayedExpansion\r\n"
        "set N=0\r\n"
        ":loop\r\n"
        "set /a N+=1\r\n"
        "if !N! LSS 3 goto loop\r\n"
        "echo n=%N% arg1=%~1 all=%* self=%~nx0 dir=%~dp0\r\n"
        "call :sub x\r\n"
        "if exist C:\\ws (\r\n"
        "  echo block\r\n"
        ") else (\r\n"
        "  echo never\r\n"
        ")\r\n"
        "exit /b 12\r\n"
        ":sub\r\n"
        "echo sub %1 100%%\r\n"
        "exit /b 0\r\n"
    )
    (root / "C" / "ws" / "build.cmd").write_text(script)
    res = run(root, 'cd /d C:\\ws && build "first arg" two')
    assert res.stdout == (b"n=3 arg1=first arg all=\"first arg\" two self=build.cmd dir=C:\\ws\\\r\n"
                          b"sub x 100%\r\nblock\r\n")
    assert res.returncode == 12
    res = run(root, "C:\\ws\\build.cmd & echo after %ERRORLEVEL%")
    assert res.stdout.endswith(b"block\r\nafter 0\r\n")


def test_batch_exit_and_echo(root: Path) -> None:
    (root / "C" / "ws").mkdir(parents=True)
    (root / "C" / "ws" / "b1.bat").write_bytes(b"echo in %1\r\nexit 7\r\necho never\r\n")
    res = run(root, "C:\\ws\\b1.bat hi & echo not reached")  # `exit` without /b ends cmd itself
    assert res.stdout == b"\r\nC:\\Users\\builder>echo in hi\r\nin hi\r\n\r\nC:\\Users\\builder>exit 7\r\n"
    assert res.returncode == 7
    res = run(root, "cmd /c exit 7 & cmd /c \"exit /b 8\" || echo nested-failed %ERRORLEVEL%")
    assert (res.stdout, res.returncode) == (b"nested-failed 0\r\n", 8)
    res = run(root, "set /a 1/0")
    assert (res.stderr, res.returncode) == (b"Divide by zero error.\r\n", 1073750993 & 0xFF)


def test_ssh_original_command(root: Path) -> None:
    # Windows OpenSSH runs `cmd.exe /c <command>`: the leading and the last quote go.
    res = run(root, None, env={"SSH_ORIGINAL_COMMAND": '"echo a" & "exit" /b 4'})
    assert (res.stdout, res.returncode) == (b'a" & "exit /b 4\r\n', 0)
    res = run(root, None, env={"SSH_ORIGINAL_COMMAND": "echo %USERNAME% & exit /b 4"})
    assert (res.stdout, res.returncode) == (b"builder \r\n", 4)
    res = run(root, None)
    assert (res.stdout, res.stderr, res.returncode) == (b"", b"", 0)
    assert (root / "C" / "Users" / "builder").is_dir()


def test_cwd_option(root: Path) -> None:
    res = run(root, "cd", extra=["--cwd", "C:\\work", "--user", "alice"])
    assert res.stdout == b"C:\\work\r\n"
    assert (root / "C" / "work").is_dir()
    assert run(root, "whoami", extra=["--user", "alice"]).stdout == b"winbuilder-emu\\alice\r\n"


def _wait_gone(pid: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("whole_group", [True, False])
def test_sigterm_kills_children(root: Path, tmp_path: Path, whole_group: bool) -> None:
    pidfile = tmp_path / "pid"
    # The child ignores SIGTERM, so only the interpreter's SIGKILL can end it.
    line = f"sh -c \"trap '' TERM; echo $$ > {pidfile}; sleep 30 & wait\""
    proc = subprocess.Popen(
        [sys.executable, "-m", "winbuilder.emulator.cmd", "--root", str(root), "-c", line],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        child = int(pidfile.read_text())
        started = time.monotonic()
        if whole_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=5) == cmd.SIGTERM_CODE
        assert _wait_gone(child, time.monotonic() + 5)
        assert time.monotonic() - started < 3
        assert _live_group_members(proc.pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _live_group_members(pgid: int) -> list[int]:
    """Processes of a group that are not zombies (PID 1 of a container may not reap orphans)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != b"Z":
                members.append(int(entry))
    return members
