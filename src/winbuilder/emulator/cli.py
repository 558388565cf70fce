"""``winbuilder emulator ...``: the emulator's command line. Its output is a contract that scripts rely on.

* ``winbuilder emulator host --listen HOST:PORT --user USER [--transport winrm|ssh] [--http] [--root DIR]``
  serves an emulated Windows host in the foreground until SIGTERM. The password comes from ``WINBUILDER_PASSWORD``.
  Once it serves it prints exactly one line to stdout: ``ready <url> cert-sha256=<hex>`` (WinRM) or
  ``ready <url> host-key=<fingerprint>`` (SSH).
* ``winbuilder emulator gce --listen HOST:PORT`` serves the Compute Engine API and the metadata server on one port
  and prints ``ready compute=<url> metadata=<host:port>``.
"""

from __future__ import annotations

import click


@click.group(name="emulator")
def emulator() -> None:
    """Run the local emulators used by the tests and `make demo`."""


@emulator.command()
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT to serve on (port 0 picks one).")
@click.option("--user", required=True, help="The Windows user name to accept.")
@click.option("--transport", type=click.Choice(["winrm", "ssh"]), default="winrm", show_default=True)
@click.option("--http", "http", is_flag=True, help="WinRM: plain HTTP (5985 style) with NTLM message encryption.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Sandbox directory that holds the drive letters (C:\\ is ROOT/C). Default: a new temp dir.")
@click.option("--basic", is_flag=True, help="WinRM: also accept Basic auth (off, as on GCE images).")
@click.option("--max-envelope-kb", type=int, default=500, show_default=True, help="WinRM MaxEnvelopeSizekb.")
@click.option("--max-shells", type=int, default=30, show_default=True, help="WinRM MaxShellsPerUser.")
@click.option("--max-ops", type=int, default=1500, show_default=True,
              help="WinRM MaxConcurrentOperationsPerUser.")
@click.option("--rtt-ms", type=float, default=0.0, show_default=True, help="Injected round-trip time per request.")
@click.option("--faults", type=click.Path(dir_okay=False, exists=True), default=None,
              help="WinRM: JSON fault schedule (see emulator/COVERAGE.md).")
@click.option("--authorized-keys", type=click.Path(dir_okay=False, exists=True), default=None,
              help="SSH: authorized_keys file for the user.")
def host(listen: str, user: str, transport: str, http: bool, root: str | None, basic: bool,
         max_envelope_kb: int, max_shells: int, max_ops: int, rtt_ms: float, faults: str | None,
         authorized_keys: str | None) -> None:
    """Serve an emulated Windows host until SIGTERM."""
    if transport == "ssh":
        from winbuilder.emulator import sshd

        sshd.main(listen=listen, user=user, root=root, authorized_keys=authorized_keys)
    else:
        from winbuilder.emulator.wsman import server

        server.main(listen=listen, user=user, http=http, root=root, basic=basic,
                    max_envelope_kb=max_envelope_kb, max_shells=max_shells, max_ops=max_ops,
                    rtt_ms=rtt_ms, faults=faults)


@emulator.command()
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT to serve on (port 0 picks one).")
@click.option("--faults", type=click.Path(dir_okay=False, exists=True), default=None,
              help="JSON fault schedule (see emulator/COVERAGE.md).")
@click.option("--boot-seconds", type=float, default=2.0, show_default=True, help="Emulated boot delay.")
def gce(listen: str, faults: str | None, boot_seconds: float) -> None:
    """Serve the Compute Engine API and a metadata server until SIGTERM."""
    from winbuilder.emulator.compute import server

    server.main(listen=listen, faults=faults, boot_seconds=boot_seconds)
