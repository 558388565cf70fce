"""The build as a list of steps, each timed as a phase and each registering its undo before it acts.

``plan(spec)`` returns the steps; ``run(spec)`` executes them under one ``ExitStack`` whose callbacks (the undos)
run in reverse on success, error or signal. Undo callbacks log and record their failures instead of raising, so the
build's own error is what the user sees.

Steps for a bring-your-own server: connect -> copy-in -> run -> copy-back. (Creating the server on Compute Engine
prepends its own steps from ``winbuilder.steps.gce`` and fills ``ctx.target``.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from winbuilder import workspace
from winbuilder.errors import (
    Cancelled,
    ConnectionFailed,
    DeadlineExceeded,
    ExitCode,
    UsageError,
    WinbuilderError,
    WorkspaceError,
)
from winbuilder.output import CliXmlFilter, Utf8Sink
from winbuilder.spec import RunSpec, TargetSpec
from winbuilder.transport import Transport

log = logging.getLogger(__name__)
console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)

SCRIPT_DIR = ".winbuilder"
PS_SCRIPT = f"{SCRIPT_DIR}/run.ps1"


@dataclass
class Phase:
    """One timed phase. Times in seconds: ``start``/``end`` since the run started, ``duration`` = end - start."""

    name: str
    start: float
    end: float = 0.0
    ok: bool = False
    detail: str = ""

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)


@dataclass
class RunContext:
    """Mutable state of one run, passed to every step.

    Attributes:
        spec: what to do.
        undo: resources' undos, registered before each resource is created (kept by --keep-on-failure).
        close: connections to close whatever happens.
        kept: one line per resource, saying how to reach it and delete it, for --keep-on-failure.
        target: the server to connect to (given, or filled by the Compute Engine steps).
        transport: the open connection, once connected.
        phases: timings, in order.
        bytes_sent / bytes_received: workspace archive bytes each way.
        remote_exit: the command's exit code as the server reported it.
        notes: extra facts for the report (e.g. the instance name).
    """

    spec: RunSpec
    undo: ExitStack
    close: ExitStack = field(default_factory=ExitStack)
    kept: list[str] = field(default_factory=list)
    target: TargetSpec | None = None
    transport: Transport | None = None
    phases: list[Phase] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    remote_exit: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    undo_failures: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    manifest: workspace.Manifest | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0


Step = Callable[[RunContext], None]


@dataclass(frozen=True)
class NamedStep:
    """A step and the phase name it is timed under."""

    name: str
    fn: Step


@dataclass(frozen=True)
class RunResult:
    """What a run produced: the process exit code for winbuilder, the remote code, and the timings."""

    exit_code: int
    remote_exit: int | None
    phases: tuple[Phase, ...]
    bytes_sent: int
    bytes_received: int
    error: str | None = None
    error_details: tuple[str, ...] = ()


def status(message: str) -> None:
    """Print one of winbuilder's own status lines to stderr (never remote text through markup)."""
    console.print(f"winbuilder: {message}")


# -- the steps ----------------------------------------------------------------------------------------------------


def make_transport(target: TargetSpec, connect_timeout: float) -> Transport:
    """Build the transport for ``target`` (not yet connected)."""
    if target.transport == "ssh":
        from winbuilder.transport.ssh import SshTarget, SshTransport

        ssh: Transport = SshTransport(SshTarget(
            host=target.host, port=target.effective_port, user=target.user, password=target.password,
            key_path=target.ssh.key_path, known_hosts=target.ssh.known_hosts, host_key=target.ssh.host_key,
            connect_timeout=connect_timeout))
        return ssh
    from winbuilder.transport.winrm import WinRMTarget, WinRMTransport

    if target.password is None:
        raise UsageError("WinRM needs a password", "set WINBUILDER_PASSWORD or pass --password-file")
    return WinRMTransport(WinRMTarget(
        host=target.host, port=target.effective_port, user=target.user, password=target.password,
        https=not target.winrm_http, ca_bundle=target.tls.ca_bundle, cert_fingerprint=target.tls.cert_fingerprint,
        insecure_skip_verify=target.tls.insecure_skip_verify, connect_timeout=min(30.0, connect_timeout),
        operation_timeout=target.operation_timeout))


def step_preflight(ctx: RunContext) -> None:
    """Check the workspace for names Windows cannot hold, before anything connects or moves."""
    if ctx.spec.copy_in:
        ctx.manifest = workspace.preflight(ctx.spec.workspace, ctx.spec.excludes)
        status(f"workspace: {_count(ctx.manifest.files, 'file')}, {_size(ctx.manifest.bytes)}")


def step_connect(ctx: RunContext) -> None:
    """Connect and authenticate; the transport's close is registered before it opens."""
    if ctx.target is None:
        raise UsageError("no server to connect to", "pass --host, or let winbuilder create one on Compute Engine")
    transport = make_transport(ctx.target, ctx.spec.connect_timeout)
    ctx.close.callback(quietly, "close the connection", transport.close, ctx)
    t = ctx.target
    if t.transport == "winrm" and t.tls.insecure_skip_verify and not t.winrm_http:
        status("WARNING: --insecure-skip-verify: the server's certificate is NOT checked; the password may go to "
               "an impostor")
    transport.connect(time.monotonic() + ctx.spec.connect_timeout)
    ctx.transport = transport
    status(f"connected to {t.user}@{t.host}:{t.effective_port} over {_transport_label(t)}")


def step_copy_in(ctx: RunContext) -> None:
    """Stream a tar of the workspace into ``tar -xf -`` on the server (plus the PowerShell script, if any)."""
    spec = ctx.spec
    extra = _extra_files(spec)
    if not spec.copy_in and not extra:
        return
    rd = spec.remote_dir
    prefix = f'(if exist "{rd}\\" rmdir /s /q "{rd}") & ' if spec.clean_remote and spec.copy_in else ""
    if ctx.manifest is None:
        ctx.manifest = workspace.Manifest(root=spec.workspace, entries=(), files=0, bytes=0, dirs=0, symlinks=0,
                                          excluded=0)
    stream = workspace.archive(ctx.manifest, spec.workspace, extra=extra)
    errors = _Tail()
    rc = _transport(ctx).run(f'{prefix}(if not exist "{rd}\\" mkdir "{rd}") & tar -xf - -C "{rd}"',
                             stdin=stream, on_stdout=errors.feed, on_stderr=errors.feed,
                             deadline=time.monotonic() + spec.transfer_timeout)
    ctx.bytes_sent = stream.bytes_out
    if rc != 0:
        raise WorkspaceError(f"unpacking the workspace on the server failed (tar exit {rc}): {errors.text()}",
                             f"check that tar.exe exists (Windows Server 2019+) and {rd} is writable")


def step_run(ctx: RunContext) -> None:
    """Run the user's command in ``remote_dir`` with live output; records the exact exit code."""
    spec = ctx.spec
    stdout = Utf8Sink(sys.stdout.buffer)
    stderr = Utf8Sink(sys.stderr.buffer)
    clixml = CliXmlFilter()
    try:
        ctx.remote_exit = _transport(ctx).run(
            command_line(spec), on_stdout=stdout.write, on_stderr=lambda b: stderr.write(clixml.feed(b)),
            deadline=time.monotonic() + spec.timeout)
    finally:
        stderr.write(clixml.flush())
        stdout.close()
        stderr.close()


def step_copy_back(ctx: RunContext) -> None:
    """Stream ``tar -cf -`` of ``remote_dir`` back into the local workspace (new and changed files land)."""
    spec = ctx.spec
    rd = spec.remote_dir
    extractor = workspace.Extractor(spec.workspace, excludes=(SCRIPT_DIR,))
    errors = _Tail()
    try:
        rc = _transport(ctx).run(f'tar -cf - --exclude "{SCRIPT_DIR}" -C "{rd}" .', on_stdout=extractor.feed,
                                 on_stderr=errors.feed, deadline=time.monotonic() + spec.transfer_timeout)
    except BaseException:
        extractor.abort()
        raise
    if rc != 0:
        extractor.abort()
        raise WorkspaceError(f"packing the workspace on the server failed (tar exit {rc}): {errors.text()}",
                             f"check that {rd} exists and is readable")
    result = extractor.close()
    ctx.bytes_received = result.stream_bytes
    status(f"copied back {_count(result.files, 'file')}, {_size(result.bytes)}")


def command_line(spec: RunSpec) -> str:
    """The cmd.exe line that runs the user's command in ``remote_dir`` (created if missing).

    ``(if not exist "<dir>\\" mkdir "<dir>") & cd /d "<dir>" || exit /b 1 & <command>``: ``&`` binds loosest in
    cmd.exe, so the user's own ``&``/``&&``/``||`` keep their meaning, and a failed ``cd`` stops the line.
    ``powershell``: the command was written to ``.winbuilder\\run.ps1`` and runs with ``-File`` so its exit code
    passes through (see ``powershell_script``).
    """
    rd = spec.remote_dir
    prefix = f'(if not exist "{rd}\\" mkdir "{rd}") & cd /d "{rd}" || exit /b 1 & '
    if spec.shell == "powershell":
        script = f"{rd}\\{PS_SCRIPT.replace('/', chr(92))}"
        return (f'{prefix}powershell.exe -NoLogo -NoProfile -NonInteractive -ExecutionPolicy Bypass '
                f'-File "{script}"')
    return prefix + spec.command


def powershell_script(command: str) -> bytes:
    """A PowerShell script that runs ``command`` and exits with ``$LASTEXITCODE`` (1 on a terminating error).

    UTF-8 with BOM, so Windows PowerShell 5.1 reads non-ASCII text correctly; output encoding set to UTF-8.
    """
    body = (
        "$ErrorActionPreference = 'Stop'\r\n"
        "[Console]::OutputEncoding = [System.Text.Encoding]::UTF8\r\n"
        "$global:LASTEXITCODE = 0\r\n"
        "try {\r\n"
        f"{command}\r\n"
        "} catch {\r\n"
        "  [Console]::Error.WriteLine(($_ | Out-String))\r\n"
        "  exit 1\r\n"
        "}\r\n"
        "exit $LASTEXITCODE\r\n"
    )
    return b"\xef\xbb\xbf" + body.encode("utf-8")


def _extra_files(spec: RunSpec) -> dict[str, bytes]:
    return {PS_SCRIPT: powershell_script(spec.command)} if spec.shell == "powershell" else {}


def plan(spec: RunSpec) -> list[NamedStep]:
    """The steps for ``spec``, in order."""
    steps = [NamedStep("preflight", step_preflight), NamedStep("connect", step_connect),
             NamedStep("copy-in", step_copy_in), NamedStep("run", step_run)]
    if spec.copy_back:
        steps.append(NamedStep("copy-back", step_copy_back))
    if spec.gce is not None:
        from winbuilder import provision

        steps[1:1] = provision.steps(spec)
    return steps


# -- running ------------------------------------------------------------------------------------------------------


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGINT into ``Cancelled`` so undos run. Call before the first resource exists."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Cancelled(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _shield_signals() -> Callable[[], None]:
    """Defer SIGTERM/SIGINT while undos run (a second Ctrl-C must not leave a VM behind). Returns a restorer."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, lambda signum, frame: log.warning("signal %s deferred until cleanup finishes", signum))

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def run(spec: RunSpec, steps: list[NamedStep] | None = None, target: TargetSpec | None = None) -> RunResult:
    """Execute ``steps`` (default ``plan(spec)``), then run every undo; never leaves a resource behind.

    With ``spec.keep_on_failure`` and a failed run, resource undos (``ctx.undo``) are skipped and listed; connections
    (``ctx.close``) are always closed.

    Returns:
        RunResult whose ``exit_code`` is the remote code (0-255), 1 for a remote code outside that range, or the
        ``exit_code`` of the winbuilder error that stopped the run.
    """
    ctx = RunContext(spec=spec, undo=ExitStack(), target=target or spec.target)
    steps = plan(spec) if steps is None else steps
    error: WinbuilderError | None = None
    timed_out = False
    try:
        try:
            for step in steps:
                try:
                    _timed(ctx, step)
                except DeadlineExceeded as exc:
                    if step.name != "run":
                        raise
                    error, timed_out = exc, True  # still copy back what the command produced
        finally:
            failed = sys.exc_info()[0] is not None or error is not None or ctx.remote_exit not in (0, None)
            _unwind(ctx, failed)
    except WinbuilderError as exc:
        error = exc
    except KeyboardInterrupt:
        error = Cancelled(signal.SIGINT)
    except Exception as exc:  # a bug: still one line, after the undos ran
        log.debug("internal error", exc_info=True)
        error = WinbuilderError(f"internal error: {type(exc).__name__}: {exc}", "report this as a bug")
    result = _result(ctx, error, timed_out)
    if spec.report is not None:
        write_report(spec.report, ctx, result)
    return result


def _unwind(ctx: RunContext, failed: bool) -> None:
    """Close connections, then undo resources in reverse (or keep them for --keep-on-failure), signals deferred.

    Timed as the ``cleanup`` phase, which is ok when every undo succeeded.
    """
    restore = _shield_signals()
    phase = Phase("cleanup", ctx.now())
    ctx.phases.append(phase)
    try:
        ctx.close.close()
        if failed and ctx.spec.keep_on_failure and ctx.kept:
            ctx.undo.pop_all()
            for line in ctx.kept:
                status(f"kept for debugging (--keep-on-failure): {line}")
        else:
            ctx.undo.close()
    finally:
        phase.end = ctx.now()
        phase.ok = not ctx.undo_failures
        restore()


def _timed(ctx: RunContext, step: NamedStep) -> None:
    phase = Phase(step.name, ctx.now())
    ctx.phases.append(phase)
    try:
        step.fn(ctx)
        phase.ok = True
    finally:
        phase.end = ctx.now()


def _result(ctx: RunContext, error: WinbuilderError | None, timed_out: bool) -> RunResult:
    if error is not None and not timed_out:
        code = error.exit_code
    elif timed_out:
        code = ExitCode.TIMEOUT
    else:
        code = exit_status(ctx.remote_exit)
    return RunResult(int(code), ctx.remote_exit, tuple(ctx.phases), ctx.bytes_sent, ctx.bytes_received,
                     str(error) if error is not None else None, error.details if error is not None else ())


def exit_status(remote: int | None) -> int:
    """winbuilder's exit code for the remote exit code: itself for 0-255, else 1 (the full value is printed).

    A missing code (the command never finished) is a connection failure, never success.
    """
    if remote is None:
        return int(ExitCode.CONNECTION)
    if 0 <= remote <= 255:
        return remote
    status(f"the remote command exited with {remote} (0x{remote:08X}), outside 0-255: exiting 1")
    return int(ExitCode.REMOTE_OUT_OF_RANGE)


def quietly(what: str, fn: Callable[[], Any], ctx: RunContext) -> None:
    """Run an undo; log and record a failure instead of raising."""
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - an undo must never replace the build's error
        ctx.undo_failures.append(f"{what}: {exc}")
        log.warning("could not %s: %s", what, exc)


def write_report(path: Path, ctx: RunContext, result: RunResult) -> None:
    """Write the JSON report: target, phases (seconds), bytes each way, exit codes, error line."""
    target = ctx.target
    doc = {
        "target": None if target is None else {
            "host": target.host, "port": target.effective_port, "user": target.user, "transport": target.transport},
        "phases": [{"name": p.name, "start": round(p.start, 4), "end": round(p.end, 4),
                    "duration": round(p.duration, 4), "ok": p.ok} for p in result.phases],
        "bytes": {"sent": result.bytes_sent, "received": result.bytes_received},
        "remote_exit_code": result.remote_exit,
        "exit_code": result.exit_code,
        "error": result.error,
        "undo_failures": ctx.undo_failures,
        "notes": {k: v for k, v in ctx.notes.items() if not k.startswith("_")},
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def print_timings(result: RunResult) -> None:
    """Print the phase timing table to stderr."""
    table = Table(title="winbuilder phases", title_justify="left")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("")
    for p in result.phases:
        table.add_row(p.name, f"{p.duration:.2f}", "ok" if p.ok else "failed")
    total = sum(p.duration for p in result.phases)
    table.add_row("total", f"{total:.2f}", "")
    console.print(table)
    console.print(f"bytes sent {result.bytes_sent:,}, received {result.bytes_received:,}")


def new_run_id() -> str:
    """A short random id for names and labels (``[a-z0-9]{8}``)."""
    return uuid.uuid4().hex[:8]


class _Tail:
    """Keep the last few KiB of a stream, for error messages."""

    def __init__(self, limit: int = 4096) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> None:
        self._buf += data
        del self._buf[: max(0, len(self._buf) - self._limit)]

    def text(self) -> str:
        return " ".join(self._buf.decode("utf-8", "replace").split())[-500:] or "(no output)"


def _transport(ctx: RunContext) -> Transport:
    if ctx.transport is None:
        raise ConnectionFailed("not connected", "this is a bug")
    return ctx.transport


def _transport_label(t: TargetSpec) -> str:
    if t.transport == "ssh":
        return "SSH"
    return "WinRM HTTP (NTLM-encrypted)" if t.winrm_http else "WinRM HTTPS"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n:,} bytes"


__all__ = ["RunContext", "RunResult", "NamedStep", "Phase", "plan", "run", "exit_status", "install_signal_handlers",
           "print_timings", "write_report", "command_line", "powershell_script", "status", "new_run_id"]
