"""``winbuilder``: the command line. Thin: arguments -> ``RunSpec`` -> ``flow.run`` -> exit code.

Every failure of the tool itself ends with one stderr line ``winbuilder: error: <what> — <what to do>`` and the
exit code of its class (``winbuilder.errors.ExitCode``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from winbuilder import flow, redact
from winbuilder.errors import ExitCode, UsageError, WinbuilderError
from winbuilder.spec import GceSpec, RunSpec, SshSpec, TargetSpec, TlsSpec, parse_duration

SECRET_ENV = ("WINBUILDER_PASSWORD", "PASSWORD")
_NEEDS_QUOTES = re.compile(r"\s")
_CREATED_USER = re.compile(r"[A-Za-z0-9._-]{1,20}")
"""A Windows account name the guest agent can create that also fits an ``ssh-keys`` line (``USER:KEY``)."""


class _DashDashCommand(click.Command):
    """A click command whose positional words are only taken after ``--``.

    Anything positional before ``--`` is an error, so ``--no-copy false --command x`` fails loudly instead of
    silently dropping what follows (a flaw of earlier tools).
    """

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [*super().collect_usage_pieces(ctx), "(--command CMD | -- CMD WORDS...)"]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            ctx.meta["command_words"] = args[i + 1:]
            args = args[:i]
        return super().parse_args(ctx, args)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="winbuilder")
def cli() -> None:
    """Run a build on a Windows server from a Linux CI job: the workspace goes over, output streams back live,
    the exact exit code comes back, the workspace comes back, nothing is left running."""


_GCE_ONLY = ("project", "zone", "region", "image", "machine_type", "boot_disk_size", "boot_disk_type", "spot",
             "service_account", "scopes", "labels", "tags", "network", "subnetwork", "internal_ip", "allow_from",
             "max_run_duration", "boot_timeout")


def _gce_options(fn: Any) -> Any:
    """The Compute Engine options of ``run`` (used only without --host)."""
    options = [
        click.option("--project", help="Project for the VM [default: $PROJECT_ID, else the ADC project]."),
        click.option("--zone", help="Zone for the VM (else a zone of --region, falling back on no capacity)."),
        click.option("--region", help="Region whose zones are tried in turn [default: us-central1]."),
        click.option("--image", help="Image family, ltsc2019/ltsc2022/ltsc2025, or image URL [default: ltsc2022]."),
        click.option("--machine-type", help="Machine type [default: e2-standard-4]."),
        click.option("--boot-disk-size", type=click.IntRange(32, 65536), help="Boot disk GB [default: 128]."),
        click.option("--boot-disk-type", help="Boot disk type [default: pd-balanced]."),
        click.option("--spot", is_flag=True, help="Use a Spot VM."),
        click.option("--service-account", help="Service account email for the VM [default: none]."),
        click.option("--scopes", help="Comma-separated OAuth scopes for --service-account [default: cloud-platform]."),
        click.option("--labels", help="Extra labels: k=v,k2=v2."),
        click.option("--tags", help="Extra network tags: a,b."),
        click.option("--network", help="VPC network name or URL (Shared VPC) [default: default]."),
        click.option("--subnetwork", help="Subnetwork name or URL (Shared VPC)."),
        click.option("--internal-ip", is_flag=True,
                     help="No external IP, no firewall rule: connect to the internal IP."),
        click.option("--allow-from", multiple=True,
                     help="Source CIDR of the per-run firewall rule (repeatable) "
                          "[default: this machine's egress IP]."),
        click.option("--egress-ip-url", default="https://checkip.amazonaws.com", show_default=True,
                     help="URL that answers this machine's public IP as text (for the default --allow-from)."),
        click.option("--max-run-duration",
                     help="Compute Engine deletes the VM after this long, even if winbuilder is killed "
                          "[default: --timeout + --boot-timeout + 2 x --transfer-timeout + 30m]."),
        click.option("--boot-timeout",
                     help="Limit for the VM to boot, hand out the password and accept WinRM [default: 25m]."),
        click.option("--compute-endpoint", envvar="WINBUILDER_COMPUTE_ENDPOINT",
                     help="Compute API endpoint (an emulator) [env WINBUILDER_COMPUTE_ENDPOINT]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command(cls=_DashDashCommand, context_settings={"ignore_unknown_options": False})
@click.option("--host", help="The Windows server (name or IP). Without it, winbuilder creates one on Compute Engine.")
@click.option("--port", type=click.IntRange(1, 65535), help="Port [default: 5986 HTTPS, 5985 --winrm-http, 22 SSH].")
@click.option("--user", help="Windows user name (without --host: the account created on the VM [winbuilder]).")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File holding the password (first line). Else $WINBUILDER_PASSWORD, else $PASSWORD.")
@click.option("--password", "password_arg", help="The password (visible in build history: prefer the env/file).")
@click.option("--transport", type=click.Choice(["winrm", "ssh"]), default="winrm", show_default=True)
@click.option("--winrm-http", is_flag=True, help="WinRM over HTTP (5985) with NTLM message encryption.")
@click.option("--operation-timeout", type=click.IntRange(1, 60), default=20, show_default=True,
              help="WinRM: seconds a Receive waits for output before polling again.")
@click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Verify the WinRM certificate against these CAs (PEM).")
@click.option("--cert-sha256", help="Pin the WinRM certificate: hex SHA-256 of its DER encoding.")
@click.option("--cert-thumbprint", help="Pin the WinRM certificate: its Windows thumbprint (hex SHA-1).")
@click.option("--insecure-skip-verify", is_flag=True, help="Do not verify the WinRM certificate (warns every run).")
@click.option("--ssh-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="SSH private key.")
@click.option("--known-hosts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="SSH known_hosts file to check the host key against.")
@click.option("--host-key", help="SSH host key fingerprint, e.g. SHA256:abc... (as ssh-keygen -lf prints).")
@click.option("--command", "command_opt", help="The command (cmd.exe syntax), or give it after --.")
@click.option("--shell", type=click.Choice(["cmd", "powershell"]), default="cmd", show_default=True,
              help="powershell runs the command as a script file (-File) and passes $LASTEXITCODE on.")
@click.option("--workspace", type=click.Path(file_okay=False, path_type=Path),
              help="Local directory to copy [default: /workspace if it exists, else the current directory].")
@click.option("--remote-dir", default="C:\\workspace", show_default=True, help="Where the workspace goes.")
@click.option("--exclude", multiple=True, help="Glob left out of the copy in (repeatable), e.g. '*.o', 'node_modules'.")
@click.option("--no-copy", is_flag=True, help="Do not copy the workspace in.")
@click.option("--no-copy-back", is_flag=True, help="Do not copy the workspace back.")
@click.option("--clean-remote/--keep-remote", default=True, show_default=True,
              help="Empty --remote-dir on the server before copying in, so files of earlier runs neither affect "
                   "the build nor come back (not with --no-copy).")
@click.option("--timeout", default="4h", show_default=True, help="Limit for the command; then terminate, exit 124.")
@click.option("--connect-timeout", default="2m", show_default=True, help="Limit to connect and authenticate.")
@click.option("--transfer-timeout", default="1h", show_default=True, help="Limit for each copy (in, back).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write a JSON report here.")
@click.option("--keep-on-failure", is_flag=True, help="Keep created resources when the build fails.")
@click.option("--debug", is_flag=True, help="Debug logging (secrets are never logged).")
@_gce_options
@click.pass_context
def run(ctx: click.Context, /, **opts: Any) -> None:
    """Run a command on a Windows server with the workspace copied over and back.

    \b
    Examples:
      WINBUILDER_PASSWORD=... winbuilder run --host 10.0.0.5 --user builder \\
          --cert-thumbprint 3F9A... -- docker build -t IMAGE .
      winbuilder run --host win --user builder --transport ssh --ssh-key key \\
          --host-key SHA256:... --command "build.cmd"
    """
    spec = _spec(opts, ctx.meta.get("command_words"))
    _configure_logging(opts["debug"], spec)
    flow.install_signal_handlers()
    result = flow.run(spec)
    flow.print_timings(result)
    if result.error:
        _fail_line(result.error, result.error_details)
    sys.exit(result.exit_code)


def _spec(opts: dict[str, Any], words: list[str] | None) -> RunSpec:
    command = _command(opts["command_opt"], words)
    if not opts["host"]:
        return _create_spec(opts, command)
    given = [f"--{k.replace('_', '-')}" for k in _GCE_ONLY if opts.get(k) not in (None, False, (), "")]
    if given:
        one = len(given) == 1
        raise UsageError(f"{', '.join(given)} {'applies' if one else 'apply'} only when winbuilder creates the "
                         "server (no --host)", f"drop {'it' if one else 'them'}, or drop --host")
    if not opts["user"]:
        raise UsageError("--user is required with --host", "pass --user USER")
    password = _password(opts)
    if opts["transport"] == "winrm" and password is None:
        raise UsageError("no password for WinRM", "set WINBUILDER_PASSWORD or pass --password-file FILE")
    if opts["transport"] == "ssh" and password is None and opts["ssh_key"] is None:
        raise UsageError("no SSH credential", "pass --ssh-key FILE, or set WINBUILDER_PASSWORD")
    pins = [p for p in (opts["cert_sha256"], opts["cert_thumbprint"]) if p]
    if len(pins) > 1:
        raise UsageError("--cert-sha256 and --cert-thumbprint both given", "pin one fingerprint")
    if pins:
        from winbuilder.transport.winrm import normalize_fingerprint

        try:
            normalize_fingerprint(pins[0])
        except ValueError as exc:
            raise UsageError(f"bad certificate fingerprint {pins[0]!r}", str(exc)) from None
    if opts["winrm_http"] and opts["transport"] != "winrm":
        raise UsageError("--winrm-http goes with --transport winrm", "drop --winrm-http")
    tls_flags = [f for f, k in (("--cert-sha256", "cert_sha256"), ("--cert-thumbprint", "cert_thumbprint"),
                                ("--ca-bundle", "ca_bundle"), ("--insecure-skip-verify", "insecure_skip_verify"))
                 if opts[k]]
    if opts["winrm_http"] and tls_flags:
        raise UsageError(f"{', '.join(tls_flags)} concern HTTPS, but --winrm-http has no certificate",
                         "drop --winrm-http to use HTTPS (recommended), or drop the certificate options")
    target = TargetSpec(
        host=opts["host"], port=opts["port"], user=opts["user"], password=password, transport=opts["transport"],
        winrm_http=opts["winrm_http"], operation_timeout=opts["operation_timeout"],
        tls=TlsSpec(cert_fingerprint=pins[0] if pins else None, ca_bundle=opts["ca_bundle"],
                    insecure_skip_verify=opts["insecure_skip_verify"]),
        ssh=SshSpec(key_path=opts["ssh_key"], known_hosts=opts["known_hosts"], host_key=opts["host_key"]))
    return RunSpec(
        command=command, workspace=_workspace(opts["workspace"]), target=target, shell=opts["shell"],
        remote_dir=opts["remote_dir"], excludes=tuple(opts["exclude"]), copy_in=not opts["no_copy"],
        copy_back=not opts["no_copy_back"], clean_remote=opts["clean_remote"],
        timeout=parse_duration(opts["timeout"], "--timeout"),
        connect_timeout=parse_duration(opts["connect_timeout"], "--connect-timeout"),
        transfer_timeout=parse_duration(opts["transfer_timeout"], "--transfer-timeout"),
        report=opts["report"], keep_on_failure=opts["keep_on_failure"], run_id=flow.new_run_id())


def _command(command_opt: str | None, words: list[str] | None) -> str:
    if command_opt is not None and words:
        raise UsageError("the command is given twice (--command and after --)", "use one of them")
    if words:
        # Words are joined with spaces; a word with white space (or an empty word) is double-quoted. cmd.exe
        # operators such as && stay operators, as if typed at a prompt.
        return " ".join(f'"{w}"' if (_NEEDS_QUOTES.search(w) or not w) and '"' not in w else w for w in words)
    if command_opt is None:
        raise UsageError("no command given", "pass --command 'build.cmd' or the words after --")
    return str(command_opt)


def _password(opts: dict[str, Any]) -> str | None:
    if opts["password_file"] is not None:
        lines = opts["password_file"].read_text(encoding="utf-8").splitlines()
        if not lines or not lines[0]:
            raise UsageError(f"--password-file {opts['password_file']} is empty", "write the password on line 1")
        return str(lines[0])
    if opts["password_arg"] is not None:
        flow.status("WARNING: --password is visible in build history and process lists; use WINBUILDER_PASSWORD "
                    "or --password-file")
        return str(opts["password_arg"])
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _workspace(path: Path | None) -> Path:
    if path is None:
        path = Path("/workspace") if Path("/workspace").is_dir() else Path.cwd()
    if not path.is_dir():
        raise UsageError(f"workspace {path} is not a directory", "pass --workspace DIR")
    return path.resolve()


def _configure_logging(debug: bool, spec: RunSpec) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("winbuilder: %(levelname)s %(name)s: %(message)s"))
    redact.add_secret(spec.target.password if spec.target else None)
    handler.addFilter(redact.RedactFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    for noisy in ("pypsrp", "spnego", "urllib3", "asyncssh", "requests_ntlm", "google", "charset_normalizer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail_line(message: str, details: tuple[str, ...] = ()) -> None:
    """Print the details (if any), then the one-line error that is always the last line on stderr."""
    for line in details:
        sys.stderr.write(f"winbuilder:   {line}\n")
    sys.stderr.write(f"winbuilder: error: {message}\n")
    sys.stderr.flush()


# -- creating the server on Compute Engine (no --host) ------------------------------------------------------------

def _create_spec(opts: dict[str, Any], command: str) -> RunSpec:
    """The spec of a run that creates its server on Compute Engine (no --host)."""
    given = [flag for flag, key in (("--password", "password_arg"),
                                     ("--password-file", "password_file"), ("--port", "port"),
                                     ("--cert-sha256", "cert_sha256"), ("--cert-thumbprint", "cert_thumbprint"),
                                     ("--ca-bundle", "ca_bundle"), ("--ssh-key", "ssh_key"),
                                     ("--known-hosts", "known_hosts"), ("--host-key", "host_key"))
             if opts.get(key) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} given without --host",
                         f"pass --host to use your own server, or drop {'it' if len(given) == 1 else 'them'} to let "
                         "winbuilder create one")
    if opts["winrm_http"]:
        raise UsageError("a created server is reached over WinRM HTTPS or SSH, not WinRM HTTP",
                         "drop --winrm-http, or pass --host")
    if opts["transport"] == "ssh" and opts["insecure_skip_verify"]:
        raise UsageError("--insecure-skip-verify does not apply to --transport ssh on a created server",
                         "drop it: the SSH host key is always pinned from the instance's guest attributes")
    if opts["user"] is not None and not _CREATED_USER.fullmatch(opts["user"]):
        raise UsageError(f"--user {opts['user']!r} cannot name the account the guest agent creates",
                         "use 1-20 letters, digits, '.', '_' or '-'")
    if opts["zone"] and opts["region"]:
        raise UsageError("--zone and --region both given", "pass one of them")
    from winbuilder import gce

    timeout = parse_duration(opts["timeout"], "--timeout")
    transfer = parse_duration(opts["transfer_timeout"], "--transfer-timeout")
    boot = parse_duration(opts["boot_timeout"] or "25m", "--boot-timeout")
    floor = timeout + boot
    if opts["max_run_duration"]:
        max_run = parse_duration(opts["max_run_duration"], "--max-run-duration")
        if max_run <= floor:
            raise UsageError(f"--max-run-duration ({max_run:.0f} s) must exceed --timeout + --boot-timeout "
                             f"({floor:.0f} s), or the VM is deleted mid-build", "raise --max-run-duration")
    else:
        max_run = floor + 2 * transfer + 1800
    if opts["image"]:
        gce.image_source(opts["image"])
    if opts["allow_from"]:
        from winbuilder.provision import check_source_ranges

        check_source_ranges(_split(opts["allow_from"]))
    defaults = GceSpec(project="")
    spec = GceSpec(
        project=gce.resolve_project(opts["project"]), zone=opts["zone"],
        region=opts["region"] or (None if opts["zone"] else defaults.region),
        image=opts["image"] or defaults.image, machine_type=opts["machine_type"] or defaults.machine_type,
        boot_disk_gb=opts["boot_disk_size"] or defaults.boot_disk_gb,
        boot_disk_type=opts["boot_disk_type"] or defaults.boot_disk_type, spot=opts["spot"],
        service_account=opts["service_account"],
        scopes=_split((opts["scopes"],)) if opts["scopes"] else defaults.scopes,
        labels=_labels(opts["labels"]), tags=_split((opts["tags"],)) if opts["tags"] else (),
        network=opts["network"], subnetwork=opts["subnetwork"], internal_ip=opts["internal_ip"],
        allow_from=_split(opts["allow_from"]), egress_ip_url=opts["egress_ip_url"], max_run_duration=max_run,
        boot_timeout=boot, compute_endpoint=opts["compute_endpoint"] or None, user=opts["user"] or defaults.user)
    target = TargetSpec(host="", user=spec.user, transport=opts["transport"],
                        operation_timeout=opts["operation_timeout"],
                        tls=TlsSpec(insecure_skip_verify=opts["insecure_skip_verify"]))
    return RunSpec(
        command=command, workspace=_workspace(opts["workspace"]), target=target, shell=opts["shell"],
        remote_dir=opts["remote_dir"], excludes=tuple(opts["exclude"]), copy_in=not opts["no_copy"],
        copy_back=not opts["no_copy_back"], clean_remote=opts["clean_remote"], timeout=timeout,
        connect_timeout=parse_duration(opts["connect_timeout"], "--connect-timeout"), transfer_timeout=transfer,
        report=opts["report"], keep_on_failure=opts["keep_on_failure"], run_id=flow.new_run_id(), gce=spec)


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p.strip() for v in values for p in v.split(",") if p.strip())


def _labels(text: str | None) -> tuple[tuple[str, str], ...]:
    out = []
    for part in _split((text,)) if text else ():
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise UsageError(f"--labels {part!r} is not key=value", "e.g. --labels team=ci,env=test")
        out.append((key.strip(), value.strip()))
    return tuple(out)


@cli.command()
@click.option("--project", help="Project [default: $PROJECT_ID, else the ADC project].")
@click.option("--zone", help="Only this zone.")
@click.option("--region", help="Only the zones of this region.")
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@click.option("--grace", default="10m", show_default=True,
              help="A per-run firewall rule without a VM is deleted only when older than this.")
@click.option("--compute-endpoint", envvar="WINBUILDER_COMPUTE_ENDPOINT",
              help="Compute API endpoint (an emulator) [env WINBUILDER_COMPUTE_ENDPOINT].")
@click.option("--debug", is_flag=True, help="Debug logging.")
def gc(project: str | None, zone: str | None, region: str | None, dry_run: bool, grace: str,
       compute_endpoint: str | None, debug: bool) -> None:
    """Delete winbuilder VMs whose expiry label has passed, and per-run firewall rules whose VMs are gone."""
    import time

    from winbuilder import gce, provision

    if zone and region:
        raise UsageError("--zone and --region both given", "pass one of them")
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="winbuilder: %(message)s")
    compute = gce.connect(gce.resolve_project(project), compute_endpoint or None)
    zones = [zone] if zone else gce.region_zones(compute, region, time.monotonic() + 120) if region else None
    result = provision.gc(compute, zones, dry_run=dry_run, grace=parse_duration(grace, "--grace"))
    verb = "would delete" if dry_run else "deleted"
    for name in result.instances:
        click.echo(f"{verb} instance {name} (expired)")
    for name in result.rules:
        click.echo(f"{verb} firewall rule {name} (its VM is gone)")
    click.echo(f"gc: {len(result.instances)} instances, {len(result.rules)} firewall rules"
               f"{' (dry run)' if dry_run else ''}")


def _add_emulator() -> None:
    from winbuilder.emulator.cli import emulator

    cli.add_command(emulator)


_add_emulator()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; maps usage errors to exit 64 with one line."""
    try:
        cli.main(args=argv, prog_name="winbuilder", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        _fail_line("cancelled — nothing was left running")
        sys.exit(ExitCode.SIGINT)
    except click.UsageError as exc:
        message = exc.format_message()
        if message.startswith("Got unexpected extra argument"):
            _fail_line(f"{message}: a flag takes no value (--no-copy, not --no-copy true) — put the command in "
                       "--command or after --")
        else:
            _fail_line(f"{message} — see 'winbuilder {_sub(argv)}--help'")
        sys.exit(ExitCode.USAGE)
    except click.ClickException as exc:
        _fail_line(exc.format_message())
        sys.exit(ExitCode.USAGE)
    except WinbuilderError as exc:
        _fail_line(str(exc), exc.details)
        sys.exit(exc.exit_code)


def _sub(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return f"{args[0]} " if args and not args[0].startswith("-") else ""
