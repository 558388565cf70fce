"""Sans-IO parsing of WS-Management requests and building of responses and SOAP faults.

Nothing here touches a socket or a process: ``parse_request(bytes) -> Request`` and ``build_*(...) -> bytes``.
Namespaces follow [MS-WSMV] 2.2.1; the envelope header fields follow [MS-WSMV] 2.2.4 and DSP0226 (WS-Management).
"""

from __future__ import annotations

import base64
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from xml.sax.saxutils import escape, quoteattr

# [MS-WSMV] 2.2.1 Namespaces
NS_S = "http://www.w3.org/2003/05/soap-envelope"
NS_WSA = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
NS_WSMAN = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
NS_WSMV = "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd"
NS_RSP = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
NS_CFG = "http://schemas.microsoft.com/wbem/wsman/1/config"
NS_WST = "http://schemas.xmlsoap.org/ws/2004/09/transfer"
NS_FAULT = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault"

ANONYMOUS = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous"
FAULT_ACTION = "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault"

# Resource URIs
RESOURCE_CMD = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd"
RESOURCE_SHELL = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
RESOURCE_CONFIG = "http://schemas.microsoft.com/wbem/wsman/1/config"

# Actions: DSP0226 (WS-Transfer) and [MS-WSMV] 3.1.4.
_TRANSFER = "http://schemas.xmlsoap.org/ws/2004/09/transfer/"
_SHELL = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/"
ACTIONS: dict[str, str] = {
    _TRANSFER + "Get": "Get",
    _TRANSFER + "Put": "Put",
    _TRANSFER + "Create": "Create",
    _TRANSFER + "Delete": "Delete",
    "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Enumerate": "Enumerate",
    "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Pull": "Pull",
    _SHELL + "Command": "Command",
    _SHELL + "Send": "Send",
    _SHELL + "Receive": "Receive",
    _SHELL + "Signal": "Signal",
    _SHELL + "Connect": "Connect",
    _SHELL + "Disconnect": "Disconnect",
    _SHELL + "Reconnect": "Reconnect",
}
RESPONSE_ACTIONS: dict[str, str] = {
    "Get": _TRANSFER + "GetResponse",
    "Create": _TRANSFER + "CreateResponse",
    "Delete": _TRANSFER + "DeleteResponse",
    "Command": _SHELL + "CommandResponse",
    "Send": _SHELL + "SendResponse",
    "Receive": _SHELL + "ReceiveResponse",
    "Signal": _SHELL + "SignalResponse",
}

# [MS-WSMV] 2.2.4.7 CommandStateEnumeration and 2.2.4.38 Signal codes.
STATE_RUNNING = _SHELL + "CommandState/Running"
STATE_DONE = _SHELL + "CommandState/Done"
SIGNAL_TERMINATE = _SHELL + "signal/Terminate"
SIGNAL_CTRL_C = _SHELL + "signal/ctrl_c"
SIGNAL_CTRL_BREAK = _SHELL + "signal/ctrl_break"


class FaultCode(IntEnum):
    """WSManFault ``Code`` values (Windows error numbers, [MS-WSMV] 2.2.4.42 / winerror.h) the emulator returns."""

    TIMED_OUT = 2150858793  # 0x80338029 ERROR_WSMAN_OPERATION_TIMEDOUT
    ENCODING_LIMIT = 2150858817  # 0x80338041, request/response envelope too large
    SHELL_NOT_FOUND = 2150858843  # 0x8033805B ERROR_WINRS_SHELL_NOT_FOUND
    INVALID_SELECTORS = 2150858842  # 0x8033805A (approximation for an unknown CommandId)
    ACTION_NOT_SUPPORTED = 2150858771  # 0x80338013 (approximation)
    DESTINATION_UNREACHABLE = 2150858770  # 0x80338012 unknown resource URI (approximation)
    INVALID_XML = 2150858800  # 0x80338030 (approximation for a malformed envelope)
    MAX_SHELLS = 2150859173  # 0x803381A5 ERROR_WSMAN_QUOTA_MAX_SHELLS
    MAX_OPERATIONS = 2150859174  # 0x803381A6 ERROR_WSMAN_QUOTA_MAX_OPERATIONS


class Fault(Exception):
    """A SOAP fault to send back ([MS-WSMV] 2.2.4.42, DSP0226 14).

    Args:
        code: WSManFault Code (Windows error number).
        subcode: the ``w:`` subcode local name, e.g. ``TimedOut``.
        reason: human-readable text (never contains secrets).
        sender: True for an ``s:Sender`` fault (client's fault), False for ``s:Receiver``.
        http_status: the HTTP status Windows uses for it (500 for all WS-Man faults).
    """

    def __init__(self, code: int, subcode: str, reason: str, sender: bool = False, http_status: int = 500) -> None:
        super().__init__(f"{subcode} ({code}): {reason}")
        self.code = code
        self.subcode = subcode
        self.reason = reason
        self.sender = sender
        self.http_status = http_status


def timed_out() -> Fault:
    """The fault for "no output within OperationTimeout" ([MS-WSMV] 3.1.4.14.2)."""
    return Fault(FaultCode.TIMED_OUT, "TimedOut",
                 "The WS-Management service cannot complete the operation within the time specified in "
                 "OperationTimeout.")


@dataclass(frozen=True)
class Request:
    """One parsed WS-Management request.

    Attributes:
        action: the short action name (``Create``, ``Receive``, ...), or the full URI when unknown.
        action_uri: the full ``wsa:Action`` URI.
        message_id: ``wsa:MessageID`` (echoed as ``wsa:RelatesTo``).
        resource_uri: ``wsman:ResourceURI``.
        selectors: ``wsman:SelectorSet`` as a name -> value dict.
        options: ``wsman:OptionSet`` as a name -> value dict.
        operation_timeout: ``wsman:OperationTimeout`` in seconds, None when absent.
        max_envelope_size: ``wsman:MaxEnvelopeSize`` in bytes (the biggest response the client accepts), or None.
        body: the first child of ``s:Body``, or None.
        size: the envelope size in bytes.
    """

    action: str
    action_uri: str
    message_id: str
    resource_uri: str
    selectors: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    operation_timeout: float | None = None
    max_envelope_size: int | None = None
    body: ET.Element | None = None
    size: int = 0


_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$")


def parse_duration(text: str) -> float:
    """Parse an xs:duration like ``PT20S``, ``PT20.000S``, ``P0DT1H2M3S`` into seconds.

    Raises:
        ValueError: the text is not a supported duration.
    """
    match = _DURATION.match(text.strip())
    if not match or text.strip() in ("P", "PT"):
        raise ValueError(f"bad duration {text!r}")
    parts = {k: float(v) if v else 0.0 for k, v in match.groupdict().items()}
    return parts["d"] * 86400 + parts["h"] * 3600 + parts["m"] * 60 + parts["s"]


def format_duration(seconds: float) -> str:
    """Format seconds as Windows does in shell fields, e.g. ``PT7200.000S``."""
    return f"PT{seconds:.3f}S"


def _q(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


def _malformed(reason: str) -> Fault:
    return Fault(FaultCode.INVALID_XML, "SchemaValidationError", reason, sender=True)


def parse_request(data: bytes) -> Request:
    """Parse a SOAP 1.2 WS-Management request envelope (DSP0226 5, [MS-WSMV] 2.2.4).

    Args:
        data: the (decrypted) envelope bytes, UTF-8 XML.

    Returns:
        The parsed request.

    Raises:
        Fault: the XML is malformed or lacks ``wsa:Action`` / ``wsa:MessageID``.
    """
    try:
        root = ET.fromstring(data)  # noqa: S314 - stdlib expat does not resolve external entities
    except ET.ParseError as exc:
        raise _malformed(f"The request XML is not well formed: {exc}") from exc
    if root.tag != _q(NS_S, "Envelope"):
        raise _malformed("The request is not a SOAP 1.2 envelope.")
    header = root.find(_q(NS_S, "Header"))
    body = root.find(_q(NS_S, "Body"))
    if header is None:
        raise _malformed("The request has no SOAP header.")

    def text(ns: str, local: str) -> str:
        el = header.find(_q(ns, local)) if header is not None else None
        return (el.text or "").strip() if el is not None else ""

    action_uri = text(NS_WSA, "Action")
    message_id = text(NS_WSA, "MessageID")
    if not action_uri or not message_id:
        raise _malformed("The request lacks wsa:Action or wsa:MessageID.")
    selectors: dict[str, str] = {}
    sel_set = header.find(_q(NS_WSMAN, "SelectorSet"))
    if sel_set is not None:
        for sel in sel_set.findall(_q(NS_WSMAN, "Selector")):
            selectors[sel.attrib.get("Name", "")] = (sel.text or "").strip()
    options: dict[str, str] = {}
    opt_set = header.find(_q(NS_WSMAN, "OptionSet"))
    if opt_set is not None:
        for opt in opt_set.findall(_q(NS_WSMAN, "Option")):
            options[opt.attrib.get("Name", "")] = (opt.text or "").strip()
    timeout: float | None = None
    timeout_text = text(NS_WSMAN, "OperationTimeout")
    if timeout_text:
        try:
            timeout = parse_duration(timeout_text)
        except ValueError as exc:
            raise _malformed("The OperationTimeout is not a valid xs:duration.") from exc
    max_env: int | None = None
    max_env_text = text(NS_WSMAN, "MaxEnvelopeSize")
    if max_env_text.isdigit():
        max_env = int(max_env_text)
    first = body[0] if body is not None and len(body) else None
    return Request(action=ACTIONS.get(action_uri, action_uri), action_uri=action_uri, message_id=message_id,
                   resource_uri=text(NS_WSMAN, "ResourceURI"), selectors=selectors, options=options,
                   operation_timeout=timeout, max_envelope_size=max_env, body=first, size=len(data))


# ---------------------------------------------------------------------------------------------------------------
# Request bodies ([MS-WSMV] 2.2.4.x)


@dataclass(frozen=True)
class ShellSpec:
    """The ``rsp:Shell`` body of a Create request ([MS-WSMV] 2.2.4.37)."""

    shell_id: str | None
    input_streams: tuple[str, ...]
    output_streams: tuple[str, ...]
    working_directory: str | None
    environment: dict[str, str]
    idle_timeout: float | None
    name: str | None


def parse_shell(body: ET.Element | None) -> ShellSpec:
    """Parse the Create body.

    Raises:
        Fault: the body is not an ``rsp:Shell``.
    """
    if body is None or body.tag != _q(NS_RSP, "Shell"):
        raise _malformed("The Create body must be an rsp:Shell element.")

    def child(local: str) -> str | None:
        el = body.find(_q(NS_RSP, local))
        return (el.text or "").strip() if el is not None else None

    env: dict[str, str] = {}
    env_el = body.find(_q(NS_RSP, "Environment"))
    if env_el is not None:
        for var in env_el.findall(_q(NS_RSP, "Variable")):
            env[var.attrib.get("Name", "")] = var.text or ""
    idle = child("IdleTimeOut")
    idle_s: float | None = None
    if idle:
        try:
            idle_s = parse_duration(idle)
        except ValueError as exc:
            raise _malformed("IdleTimeOut is not a valid xs:duration.") from exc
    return ShellSpec(shell_id=body.attrib.get("ShellId"),
                     input_streams=tuple((child("InputStreams") or "stdin").split()),
                     output_streams=tuple((child("OutputStreams") or "stdout stderr").split()),
                     working_directory=child("WorkingDirectory") or None, environment=env,
                     idle_timeout=idle_s, name=child("Name"))


@dataclass(frozen=True)
class CommandSpec:
    """The ``rsp:CommandLine`` body of a Command request ([MS-WSMV] 2.2.4.6)."""

    command_id: str | None
    line: str


def parse_command(body: ET.Element | None) -> CommandSpec:
    """Parse the Command body: ``Command`` and each ``Arguments`` joined by single spaces.

    Raises:
        Fault: the body is not an ``rsp:CommandLine``.
    """
    if body is None or body.tag != _q(NS_RSP, "CommandLine"):
        raise _malformed("The Command body must be an rsp:CommandLine element.")
    parts = [(el.text or "") for el in body if el.tag in (_q(NS_RSP, "Command"), _q(NS_RSP, "Arguments"))]
    return CommandSpec(command_id=body.attrib.get("CommandId"), line=" ".join(p for p in parts if p != ""))


@dataclass(frozen=True)
class SendChunk:
    """One ``rsp:Stream`` of a Send request ([MS-WSMV] 2.2.4.36)."""

    stream: str
    command_id: str | None
    data: bytes
    end: bool


def parse_send(body: ET.Element | None) -> list[SendChunk]:
    """Parse the Send body.

    Raises:
        Fault: not an ``rsp:Send``, or a stream is not valid base64.
    """
    if body is None or body.tag != _q(NS_RSP, "Send"):
        raise _malformed("The Send body must be an rsp:Send element.")
    chunks: list[SendChunk] = []
    for st in body.findall(_q(NS_RSP, "Stream")):
        try:
            data = base64.b64decode(st.text or "", validate=False)
        except ValueError as exc:
            raise _malformed("A Send stream is not valid base64.") from exc
        chunks.append(SendChunk(stream=st.attrib.get("Name", "stdin"), command_id=st.attrib.get("CommandId"),
                                data=data, end=st.attrib.get("End", "false").lower() == "true"))
    return chunks


@dataclass(frozen=True)
class ReceiveSpec:
    """The ``rsp:Receive`` body ([MS-WSMV] 2.2.4.26)."""

    streams: tuple[str, ...]
    command_id: str | None


def parse_receive(body: ET.Element | None) -> ReceiveSpec:
    """Parse the Receive body.

    Raises:
        Fault: the body is not an ``rsp:Receive``.
    """
    if body is None or body.tag != _q(NS_RSP, "Receive"):
        raise _malformed("The Receive body must be an rsp:Receive element.")
    desired = body.find(_q(NS_RSP, "DesiredStream"))
    if desired is None:
        return ReceiveSpec(("stdout", "stderr"), None)
    return ReceiveSpec(tuple((desired.text or "stdout stderr").split()), desired.attrib.get("CommandId"))


def parse_signal(body: ET.Element | None) -> tuple[str | None, str]:
    """Parse the Signal body ([MS-WSMV] 2.2.4.38): returns ``(command_id, code_uri)``.

    Raises:
        Fault: the body is not an ``rsp:Signal``.
    """
    if body is None or body.tag != _q(NS_RSP, "Signal"):
        raise _malformed("The Signal body must be an rsp:Signal element.")
    code = body.find(_q(NS_RSP, "Code"))
    return body.attrib.get("CommandId"), (code.text or "").strip() if code is not None else ""


# ---------------------------------------------------------------------------------------------------------------
# Responses

_ENVELOPE_OPEN = (
    '<s:Envelope xml:lang="en-US" xmlns:s="' + NS_S + '" xmlns:a="' + NS_WSA + '" xmlns:x="' + NS_WST
    + '" xmlns:w="' + NS_WSMAN + '" xmlns:rsp="' + NS_RSP + '" xmlns:p="' + NS_WSMV + '">'
)


def new_id() -> str:
    """A fresh upper-case GUID (Windows' ShellId/CommandId style)."""
    return str(uuid.uuid4()).upper()


def envelope(action_uri: str, relates_to: str, body: str) -> bytes:
    """Wrap a body in a response envelope carrying ``wsa:RelatesTo`` = the request's MessageID (DSP0226 5.4.2).

    Args:
        action_uri: the response ``wsa:Action``.
        relates_to: the request ``wsa:MessageID``.
        body: the inner XML of ``s:Body`` (already escaped).
    """
    return (
        _ENVELOPE_OPEN + "<s:Header><a:Action>" + escape(action_uri) + "</a:Action><a:MessageID>uuid:" + new_id()
        + "</a:MessageID><a:To>" + ANONYMOUS + "</a:To><a:RelatesTo>" + escape(relates_to)
        + "</a:RelatesTo></s:Header><s:Body>" + body + "</s:Body></s:Envelope>"
    ).encode("utf-8")


def build_fault(fault: Fault, relates_to: str, machine: str) -> bytes:
    """A SOAP fault envelope with the ``f:WSManFault`` detail Windows sends ([MS-WSMV] 2.2.4.42).

    Args:
        fault: what to report.
        relates_to: the request MessageID ("" when the request could not be parsed).
        machine: the ``Machine`` attribute (the server's name).
    """
    value = "s:Sender" if fault.sender else "s:Receiver"
    reason = escape(fault.reason)
    body = (
        "<s:Fault><s:Code><s:Value>" + value + "</s:Value><s:Subcode><s:Value>w:" + fault.subcode
        + '</s:Value></s:Subcode></s:Code><s:Reason><s:Text xml:lang="en-US">' + reason
        + '</s:Text></s:Reason><s:Detail><f:WSManFault xmlns:f="' + NS_FAULT + '" Code="' + str(int(fault.code))
        + '" Machine=' + quoteattr(machine) + "><f:Message>" + reason
        + "</f:Message></f:WSManFault></s:Detail></s:Fault>"
    )
    return envelope(FAULT_ACTION, relates_to, body)


def build_create_response(relates_to: str, address: str, shell_id: str, owner: str, client_ip: str,
                          spec: ShellSpec, idle_timeout: float) -> bytes:
    """The CreateResponse: the shell id both as a ``ResourceCreated`` selector and as ``rsp:Shell/rsp:ShellId``
    ([MS-WSMV] 3.1.4.1)."""
    body = (
        "<x:ResourceCreated><a:Address>" + escape(address) + "</a:Address><a:ReferenceParameters><w:ResourceURI>"
        + RESOURCE_CMD + '</w:ResourceURI><w:SelectorSet><w:Selector Name="ShellId">' + shell_id
        + "</w:Selector></w:SelectorSet></a:ReferenceParameters></x:ResourceCreated>"
        + shell_fields(shell_id, owner, client_ip, spec, idle_timeout)
    )
    return envelope(RESPONSE_ACTIONS["Create"], relates_to, body)


def shell_fields(shell_id: str, owner: str, client_ip: str, spec: ShellSpec, idle_timeout: float) -> str:
    """The ``rsp:Shell`` element describing a shell (Create and Get responses, [MS-WSMV] 2.2.4.37)."""
    return (
        "<rsp:Shell><rsp:ShellId>" + shell_id + "</rsp:ShellId><rsp:ResourceUri>" + RESOURCE_CMD
        + "</rsp:ResourceUri><rsp:Owner>" + escape(owner) + "</rsp:Owner><rsp:ClientIP>" + escape(client_ip)
        + "</rsp:ClientIP><rsp:IdleTimeOut>" + format_duration(idle_timeout) + "</rsp:IdleTimeOut>"
        + "<rsp:InputStreams>" + escape(" ".join(spec.input_streams)) + "</rsp:InputStreams><rsp:OutputStreams>"
        + escape(" ".join(spec.output_streams)) + "</rsp:OutputStreams><rsp:ShellRunTime>P0DT0H0M0S"
        + "</rsp:ShellRunTime><rsp:ShellInactivity>P0DT0H0M0S</rsp:ShellInactivity></rsp:Shell>"
    )


def build_command_response(relates_to: str, command_id: str) -> bytes:
    """The CommandResponse ([MS-WSMV] 3.1.4.11)."""
    return envelope(RESPONSE_ACTIONS["Command"], relates_to,
                    "<rsp:CommandResponse><rsp:CommandId>" + command_id + "</rsp:CommandId></rsp:CommandResponse>")


def build_empty_response(action: str, relates_to: str) -> bytes:
    """Send/Signal/Delete responses ([MS-WSMV] 3.1.4.13, 3.1.4.12, 3.1.4.2)."""
    body = {"Send": "<rsp:SendResponse/>", "Signal": "<rsp:SignalResponse/>"}.get(action, "")
    return envelope(RESPONSE_ACTIONS[action], relates_to, body)


def receive_overhead(command_id: str) -> int:
    """Bytes a ReceiveResponse takes besides the base64 stream text (a safe upper bound)."""
    return 1400 + 3 * (len(command_id) + 80)


def build_receive_response(relates_to: str, command_id: str, chunks: Iterable[tuple[str, bytes]],
                           done: bool, exit_code: int | None, streams: tuple[str, ...]) -> bytes:
    """The ReceiveResponse ([MS-WSMV] 3.1.4.14): base64 ``rsp:Stream`` elements, then ``rsp:CommandState``.

    Args:
        relates_to: the request MessageID.
        command_id: the command the output belongs to.
        chunks: ``(stream_name, data)`` in output order; adjacent chunks of one stream should be merged already.
        done: whether the command finished and this response carries its last output.
        exit_code: the 32-bit unsigned exit code (only when ``done``).
        streams: the requested stream names; each gets an ``End="true"`` element when ``done``.
    """
    cid = quoteattr(command_id)
    parts = ["<rsp:ReceiveResponse>"]
    for name, data in chunks:
        parts.append("<rsp:Stream Name=" + quoteattr(name) + " CommandId=" + cid + ">"
                     + base64.b64encode(data).decode("ascii") + "</rsp:Stream>")
    if done:
        for name in streams:
            parts.append("<rsp:Stream Name=" + quoteattr(name) + " CommandId=" + cid + ' End="true"></rsp:Stream>')
        parts.append("<rsp:CommandState CommandId=" + cid + ' State="' + STATE_DONE + '"><rsp:ExitCode>'
                     + str(exit_code if exit_code is not None else 0) + "</rsp:ExitCode></rsp:CommandState>")
    else:
        parts.append("<rsp:CommandState CommandId=" + cid + ' State="' + STATE_RUNNING + '"/>')
    parts.append("</rsp:ReceiveResponse>")
    return envelope(RESPONSE_ACTIONS["Receive"], relates_to, "".join(parts))


@dataclass(frozen=True)
class ServerConfig:
    """The values the emulated ``winrm/config`` resource reports (``winrm get winrm/config``)."""

    max_envelope_kb: int
    max_timeout_ms: int
    max_shells: int
    max_ops: int
    basic: bool
    allow_unencrypted: bool = False


def build_config_response(relates_to: str, cfg: ServerConfig) -> bytes:
    """The GetResponse for the config resource (``cfg:Config``), as ``WSMan.update_max_payload_size`` reads it."""
    def b(v: bool) -> str:
        return "true" if v else "false"

    body = (
        '<cfg:Config xmlns:cfg="' + NS_CFG + '"><cfg:MaxEnvelopeSizekb>' + str(cfg.max_envelope_kb)
        + "</cfg:MaxEnvelopeSizekb><cfg:MaxTimeoutms>" + str(cfg.max_timeout_ms) + "</cfg:MaxTimeoutms>"
        + "<cfg:MaxBatchItems>32000</cfg:MaxBatchItems><cfg:MaxProviderRequests>4294967295"
        + "</cfg:MaxProviderRequests><cfg:Service><cfg:MaxConcurrentOperations>4294967295"
        + "</cfg:MaxConcurrentOperations><cfg:MaxConcurrentOperationsPerUser>" + str(cfg.max_ops)
        + "</cfg:MaxConcurrentOperationsPerUser><cfg:AllowUnencrypted>" + b(cfg.allow_unencrypted)
        + "</cfg:AllowUnencrypted><cfg:Auth><cfg:Basic>" + b(cfg.basic) + "</cfg:Basic><cfg:Kerberos>false"
        + "</cfg:Kerberos><cfg:Negotiate>true</cfg:Negotiate><cfg:Certificate>false</cfg:Certificate>"
        + "<cfg:CredSSP>false</cfg:CredSSP></cfg:Auth></cfg:Service><cfg:Winrs><cfg:AllowRemoteShellAccess>true"
        + "</cfg:AllowRemoteShellAccess><cfg:IdleTimeout>7200000</cfg:IdleTimeout><cfg:MaxShellsPerUser>"
        + str(cfg.max_shells) + "</cfg:MaxShellsPerUser><cfg:MaxMemoryPerShellMB>1024</cfg:MaxMemoryPerShellMB>"
        + "</cfg:Winrs></cfg:Config>"
    )
    return envelope(RESPONSE_ACTIONS["Get"], relates_to, body)


def build_shell_get_response(relates_to: str, fields: str) -> bytes:
    """The GetResponse for a shell resource (``rsp:Shell`` fields)."""
    return envelope(RESPONSE_ACTIONS["Get"], relates_to, fields)
