#!/usr/bin/env python3
"""gmail_classify: keep a Gmail (or any IMAP) mailbox sorted by keyword and regex rules.

One file, standard library only, CPython 3.9 or newer. Copy it anywhere and run::

    GMAIL_APP_PASSWORD=... python gmail_classify.py --user you@gmail.com          # dry run
    GMAIL_APP_PASSWORD=... python gmail_classify.py --user you@gmail.com --apply  # do it

or import it from your own scripts::

    from gmail_classify import GmailConnection
    with GmailConnection("you@gmail.com", password="abcd efgh ijkl mnop") as conn:
        conn.select("INBOX")
        uids = conn.search(["UNSEEN"])
        conn.add_labels(uids, ["Unread at 9am"])

The layers, each using only those above it (``grep -n '^# ---'`` prints this outline):
errors; the IMAP wire format (quoting, modified UTF-7, UID sets, the response parser);
the connection; messages; the rule engine; the classify pipeline; the command line.

Safety: dry run unless asked to apply; ``BODY.PEEK`` so classifying never marks mail read;
never a bare ``EXPUNGE``; TLS certificates and host names always verified; passwords and
tokens never logged.
"""

from __future__ import annotations

__all__ = [
    # errors
    "GmailClassifyError", "ImapError", "ProtocolError", "AuthenticationError",
    "CapabilityError", "UidValidityError", "TLSError", "ConnectionLostError",
    # wire format
    "encode_mailbox", "decode_mailbox", "quote", "astring", "compress_uids",
    "parse_uid_set", "chunk_uids", "imap_date", "parse_response", "Literal",
    # connection
    "GmailConnection", "Folder", "FolderStatus", "MoveResult",
]

__version__ = "0.1.0"
__license__ = "MIT"

import base64
import binascii
import datetime as _dt
import imaplib
import ipaddress
import logging
import random
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple, Union)

log = logging.getLogger("gmail_classify")


# --- Errors -----------------------------------------------------------------------------
#
# Organised around the caller's real question, "should I retry?".  ImapError and its
# children: the server refused, or sent something we cannot use; retrying the same thing
# will not help.  ConnectionLostError: the network or the server went away and our own
# reconnect attempts ran out; trying again later may well work.  imaplib's exceptions never
# escape: they are translated and chained with ``from``.

class GmailClassifyError(Exception):
    """Base of every error this module raises."""


class ImapError(GmailClassifyError):
    """The server answered NO or BAD, or we refuse to send something; do not retry.

    ``command`` is the IMAP command (``"UID MOVE"``), ``status`` ``"NO"`` or ``"BAD"``
    (empty when we refused before sending), ``code`` the response code (``"TRYCREATE"``)
    or empty, and ``text`` the server's human-readable text.
    """

    def __init__(self, message: str, *, command: str = "", status: str = "",
                 code: str = "", text: str = "") -> None:
        super().__init__(message)
        self.command = command
        self.status = status
        self.code = code
        self.text = text


class ProtocolError(ImapError):
    """The server sent something that is not valid IMAP; the message quotes it."""


class AuthenticationError(ImapError):
    """The server rejected the credentials; ``text`` holds its decoded explanation."""


class CapabilityError(ImapError):
    """The server lacks an extension an operation needs (MOVE without UIDPLUS, X-GM-RAW...)."""


class UidValidityError(ImapError):
    """A folder's UIDVALIDITY changed, so every UID remembered for it is stale."""


class TLSError(GmailClassifyError):
    """TLS could not be set up safely: untrusted certificate, wrong host, no STARTTLS."""


class ConnectionLostError(GmailClassifyError):
    """The server could not be reached or kept, even after reconnecting with backoff."""


class _Dropped(Exception):
    """Internal: the connection died (EOF, reset, timeout, BYE); reconnect and maybe retry."""


# --- Wire format: quoting, modified UTF-7, UID sets, dates ------------------------------

# RFC 3501 §9: ATOM-CHAR is any CHAR except atom-specials: ( ) { SP CTL % * " \ ]
_ATOM_RE = re.compile(r'[^(){ \x00-\x1f\x7f%*"\\\]]+\Z')
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class Literal:
    """Bytes to send as an IMAP literal (``{n}`` then the octets), e.g. a UTF-8 query."""

    data: bytes


def _refuse_controls(text: str, what: str) -> None:
    if any(c in text for c in "\r\n\x00"):
        raise ImapError(f"{what} {text!r} contains CR, LF or NUL, which cannot be sent to "
                        f"an IMAP server; remove them")


def quote(text: str) -> bytes:
    """Return ``text`` as an IMAP quoted string, e.g. ``b'"Bills \\\\"2024\\\\""'``.

    Only printable ASCII can be quoted; raises ImapError for CR, LF or NUL (they would end
    the command line and let the rest be read as a new command) and ValueError for other
    non-ASCII text, which the caller must send as a Literal or encode first.
    """
    _refuse_controls(text, "the string")
    raw = text.encode("ascii")
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def astring(text: str) -> bytes:
    """Return ``text`` as an atom when it is one, else quoted (RFC 3501 astring)."""
    _refuse_controls(text, "the string")
    if _ATOM_RE.match(text) and text.upper() != "NIL":
        return text.encode("ascii")
    return quote(text)


def _mutf7_b64(chunk: str) -> str:
    raw = chunk.encode("utf-16-be")
    return base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")


def encode_mailbox(name: str) -> str:
    """Encode a folder or label name in modified UTF-7 (RFC 3501 §5.1.3).

    ``encode_mailbox("Entwürfe") == "Entw&APw-rfe"``; ``"Tom & Jerry"`` -> ``"Tom &- Jerry"``.
    """
    out: List[str] = []
    pending: List[str] = []
    for ch in name:
        if "\x20" <= ch <= "\x7e":
            if pending:
                out.append("&" + _mutf7_b64("".join(pending)) + "-")
                pending = []
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    if pending:
        out.append("&" + _mutf7_b64("".join(pending)) + "-")
    return "".join(out)


def decode_mailbox(name: Union[str, bytes]) -> str:
    """Decode a modified UTF-7 folder or label name; malformed runs are kept as sent.

    ``decode_mailbox("&ZeVnLIqe-") == "日本語"``.
    """
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")

    def run(match: "re.Match[str]") -> str:
        body = match.group(1)
        if not body:
            return "&"
        b64 = body.replace(",", "/")
        b64 += "=" * (-len(b64) % 4)
        try:
            return base64.b64decode(b64, validate=True).decode("utf-16-be")
        except (binascii.Error, UnicodeDecodeError):
            return match.group(0)

    return re.sub(r"&([A-Za-z0-9+,]*)-", run, name)


def mailbox_arg(name: str) -> bytes:
    """A folder name ready for the wire: modified UTF-7, then atom or quoted string."""
    if name.upper() == "INBOX":
        return b"INBOX"
    return astring(encode_mailbox(name))


def _uid_runs(uids: Iterable[int]) -> Iterator[Tuple[int, int]]:
    """Yield (first, last) of each run of consecutive UIDs, in ascending order."""
    ordered = sorted(set(int(u) for u in uids))
    if not ordered:
        return
    first = last = ordered[0]
    for uid in ordered[1:]:
        if uid != last + 1:
            yield first, last
            first = uid
        last = uid
    yield first, last


def _run_text(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}:{last}"


def compress_uids(uids: Iterable[int]) -> str:
    """Return a compact IMAP sequence set: ``compress_uids([1, 2, 3, 5, 9, 10]) == "1:3,5,9:10"``."""
    text = ",".join(_run_text(a, b) for a, b in _uid_runs(uids))
    if not text:
        raise ValueError("an empty UID set cannot be sent")
    return text


def parse_uid_set(text: str, highest: Optional[int] = None) -> List[int]:
    """Expand ``"1:3,7"`` into ``[1, 2, 3, 7]``; ``*`` needs ``highest``. Raises ValueError."""
    result: List[int] = []
    for part in text.split(","):
        ends = part.split(":")
        if len(ends) > 2 or not all(ends):
            raise ValueError(f"bad UID set {text!r}")
        values = []
        for end in ends:
            if end == "*":
                if highest is None:
                    raise ValueError(f"UID set {text!r} uses * without a highest UID")
                values.append(highest)
            else:
                values.append(int(end))
        low, high = min(values), max(values)
        result.extend(range(low, high + 1))
    return result


# RFC 2683 §3.2.1.5 asks servers to accept lines of 8,000 octets and RFC 7162 §4 repeats
# it; Gmail rejects longer ones.  Leave room for the tag, the command and its arguments.
MAX_UID_SET_CHARS = 7000


def chunk_uids(uids: Iterable[int], max_chars: int = MAX_UID_SET_CHARS) -> Iterator[List[int]]:
    """Split UIDs (sorted, deduplicated) into groups whose compressed set fits ``max_chars``.

    ``list(chunk_uids([1, 3, 5, 7], max_chars=3)) == [[1, 3], [5, 7]]``
    """
    group: List[int] = []
    length = -1  # the comma before the first run is not sent
    for first, last in _uid_runs(uids):
        width = len(_run_text(first, last)) + 1
        if group and length + width > max_chars:
            yield group
            group, length = [], -1
        group.extend(range(first, last + 1))
        length += width
    if group:
        yield group


def imap_date(day: Union[_dt.date, _dt.datetime]) -> str:
    """Format a date for SEARCH SINCE/BEFORE, independent of the locale: ``"05-Mar-2024"``."""
    return f"{day.day:02d}-{_MONTHS[day.month - 1]}-{day.year:04d}"


def parse_internaldate(text: str) -> Optional[_dt.datetime]:
    """Parse an INTERNALDATE such as ``"17-Jul-1996 02:44:25 -0700"``; None if malformed."""
    match = re.match(r"\s*(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([-+])(\d\d)(\d\d)",
                     text)
    if not match:
        return None
    day, mon, year, hh, mm, ss, sign, zh, zm = match.groups()
    try:
        month = [m.lower() for m in _MONTHS].index(mon.lower()) + 1
        offset = _dt.timedelta(hours=int(zh), minutes=int(zm))
        tz = _dt.timezone(-offset if sign == "-" else offset)
        return _dt.datetime(int(year), month, int(day), int(hh), int(mm), int(ss), tzinfo=tz)
    except ValueError:
        return None


# --- Wire format: the response parser ---------------------------------------------------
#
# Responses are parsed by a small recursive-descent reader over the raw bytes, literals
# included inline as ``{n}\r\n`` followed by n octets.  Values come back as Python values:
# atoms as str, numbers as int, NIL as None, quoted strings as str, literals as bytes,
# parenthesised lists as lists.  A fetch item such as ``BODY[HEADER.FIELDS (FROM)]<0>``
# stays one atom even though it holds spaces and parentheses (RFC 3501 §7.4.2).

_ATOM_STOP = b" ()\"{\r\n"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, why: str) -> ProtocolError:
        start = max(0, self.pos - 20)
        fragment = self.data[start:self.pos + 40]
        return ProtocolError(f"malformed server response ({why}) near {fragment!r}")

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def skip_spaces(self) -> None:
        while self.pos < len(self.data) and self.data[self.pos] == 0x20:
            self.pos += 1

    def value(self) -> Any:
        """value = list / quoted / literal / number / NIL / atom"""
        if self.at_end():
            raise self.fail("unexpected end")
        ch = self.data[self.pos:self.pos + 1]
        if ch == b"(":
            return self.list_()
        if ch == b'"':
            return self.quoted()
        if ch == b"{" or self.data.startswith(b"~{", self.pos):
            return self.literal()
        if ch in (b")", b" "):
            raise self.fail(f"unexpected {ch.decode()!r}")
        return self.atom()

    def list_(self) -> List[Any]:
        """list = "(" [value *(SP value)] ")" """
        self.pos += 1
        items: List[Any] = []
        while True:
            self.skip_spaces()
            if self.at_end():
                raise self.fail("unterminated list")
            if self.data[self.pos] == 0x29:  # ")"
                self.pos += 1
                return items
            items.append(self.value())

    def quoted(self) -> str:
        """quoted = DQUOTE *(QUOTED-CHAR / "\\" quoted-specials) DQUOTE"""
        self.pos += 1
        out = bytearray()
        while True:
            if self.at_end():
                raise self.fail("unterminated quoted string")
            byte = self.data[self.pos]
            if byte == 0x22:
                self.pos += 1
                return out.decode("utf-8", "surrogateescape")
            if byte == 0x5C:
                self.pos += 1
                if self.at_end():
                    raise self.fail("unterminated quoted string")
                byte = self.data[self.pos]
            elif byte in (0x0D, 0x0A):
                raise self.fail("line break inside a quoted string")
            out.append(byte)
            self.pos += 1

    def literal(self) -> bytes:
        """literal = ["~"] "{" number ["+"] "}" CRLF *OCTET"""
        match = re.compile(rb"~?\{(\d+)\+?\}\r\n").match(self.data, self.pos)
        if not match:
            raise self.fail("bad literal header")
        size = int(match.group(1))
        start = match.end()
        if start + size > len(self.data):
            raise self.fail("literal shorter than announced")
        self.pos = start + size
        return self.data[start:self.pos]

    def atom(self) -> Any:
        """atom, with a [section] and <partial> kept together; NIL and numbers converted"""
        start = self.pos
        depth = 0
        while self.pos < len(self.data):
            byte = self.data[self.pos:self.pos + 1]
            if byte == b"[":
                depth += 1
            elif byte == b"]" and depth:
                depth -= 1
            elif depth == 0 and byte in _ATOM_STOP:
                break
            elif depth and byte in b"\r\n":
                break
            self.pos += 1
        if depth:
            raise self.fail("unterminated [section]")
        text = self.data[start:self.pos].decode("utf-8", "surrogateescape")
        if not text:
            raise self.fail("empty atom")
        if text.isdigit() and text.isascii():
            return int(text)
        if text.upper() == "NIL":
            return None
        return text


def parse_response(data: bytes) -> List[Any]:
    """Parse one untagged response (without the leading ``* ``) into Python values.

    ``parse_response(b'3 FETCH (UID 7 FLAGS (\\\\Seen) BODY[HEADER.FIELDS (FROM)] {4}\\r\\nab\\r\\n)')``
    returns ``[3, "FETCH", ["UID", 7, "FLAGS", ["\\\\Seen"], "BODY[HEADER.FIELDS (FROM)]", b"ab\\r\\n"]]``.
    Raises ProtocolError, quoting the fragment, for malformed input.
    """
    reader = _Reader(data)
    values: List[Any] = []
    while True:
        reader.skip_spaces()
        if reader.at_end():
            return values
        values.append(reader.value())


def parse_status_text(text: bytes) -> Tuple[str, List[Any], str]:
    """Split ``[CODE args] text`` of an OK/NO/BAD line: ``(code, args, text)``.

    ``parse_status_text(b"[COPYUID 9 1:2 5:6] Done") == ("COPYUID", [9, "1:2", "5:6"], "Done")``.
    Gmail flags may contain ``]``, so only a ``]`` outside lists and quotes ends the code.
    """
    if not text.startswith(b"["):
        return "", [], text.decode("utf-8", "replace")
    reader = _Reader(text)
    reader.pos = 1
    values: List[Any] = []
    while True:
        reader.skip_spaces()
        if reader.at_end():
            return "", [], text.decode("utf-8", "replace")
        if text[reader.pos:reader.pos + 1] == b"]":
            reader.pos += 1
            break
        if text[reader.pos:reader.pos + 1] == b"(":
            values.append(reader.list_())
        elif text[reader.pos:reader.pos + 1] == b'"':
            values.append(reader.quoted())
        else:
            start = reader.pos
            while reader.pos < len(text) and text[reader.pos:reader.pos + 1] not in b" ]":
                reader.pos += 1
            word = text[start:reader.pos].decode("utf-8", "replace")
            values.append(int(word) if word.isdigit() else word)
    code = str(values[0]).upper() if values else ""
    return code, values[1:], text[reader.pos:].decode("utf-8", "replace").strip()


def _pairs(items: Sequence[Any]) -> Dict[str, Any]:
    """Turn a FETCH attribute list ``["UID", 7, "FLAGS", [...]]`` into a dict (keys upper)."""
    if len(items) % 2:
        raise ProtocolError(f"FETCH attributes do not pair up: {items!r:.200}")
    return {str(items[i]).upper(): items[i + 1] for i in range(0, len(items), 2)}


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


# --- Connection -------------------------------------------------------------------------
#
# imaplib opens the socket, does TLS and STARTTLS, and runs LOGIN / AUTHENTICATE.  Every
# other command goes through GmailConnection._execute, which builds the line itself (so
# quoting is ours and consistent on every Python version), sends literals, and reads the
# answer in order, literals inline, for the parser above.  Reading goes through our own
# buffer rather than imaplib's ``file``: on Python <= 3.13 a socket timeout leaves
# ``socket.makefile`` objects unusable, and IDLE needs "wait up to N seconds for a line",
# which a buffered file cannot answer without blocking.

IMAP_PORT = 143
IMAPS_PORT = 993
GMAIL_HOST = "imap.gmail.com"
DEFAULT_TIMEOUT = 60.0          # seconds a read or write may stall before we reconnect
DEFAULT_KEEPALIVE = 600.0       # NOOP after this many idle seconds; Gmail drops at ~30 min
DEFAULT_RETRIES = 5             # reconnect attempts for one command before giving up
DEFAULT_BACKOFF = 1.0           # first backoff delay in seconds, doubled per attempt
MAX_BACKOFF = 60.0
IDLE_MAX_SECONDS = 29 * 60      # RFC 2177: re-issue IDLE at least every 29 minutes
MAX_RESPONSE_LINE = 64 * 1024 * 1024   # one response line, literals excluded
NONSYNC_LITERAL_MAX = 4096      # RFC 7888: LITERAL- allows {n+} up to 4096 octets

# Special-use attributes (RFC 6154) plus Gmail's \Important, in the order we look for them.
SPECIAL_USES = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Important",
                "\\Junk", "\\Sent", "\\Trash")

# Gmail system labels travel as atoms such as \Inbox; anything else is a user label.
GMAIL_SYSTEM_LABELS = ("\\Inbox", "\\Important", "\\Starred", "\\Sent", "\\Draft",
                       "\\Drafts", "\\Trash", "\\Spam")

_DROPPED_ERRORS = (OSError, imaplib.IMAP4.abort, EOFError)


class _BufferedWire:
    """Mixin for imaplib.IMAP4 classes: our own read buffer with timeouts that recover."""

    _rbuf: bytearray

    def _reset_buffer(self) -> None:
        self._rbuf = bytearray()

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)  # type: ignore[attr-defined]
        if not chunk:
            return False
        self._rbuf += chunk
        return True

    def read(self, size: int) -> bytes:
        if not hasattr(self, "_rbuf"):
            self._reset_buffer()
        while len(self._rbuf) < size:
            if not self._fill():
                raise EOFError("connection closed by the server in the middle of a literal")
        data = bytes(self._rbuf[:size])
        del self._rbuf[:size]
        return data

    def readline(self) -> bytes:
        if not hasattr(self, "_rbuf"):
            self._reset_buffer()
        scanned = 0
        while True:
            end = self._rbuf.find(b"\n", scanned)
            if end >= 0:
                line = bytes(self._rbuf[:end + 1])
                del self._rbuf[:end + 1]
                return line
            scanned = len(self._rbuf)
            if scanned > MAX_RESPONSE_LINE:
                raise ProtocolError(f"server sent a line longer than {MAX_RESPONSE_LINE} bytes")
            if not self._fill():
                line = bytes(self._rbuf)
                self._rbuf.clear()
                return line

    def wait_readable(self, timeout: float) -> bool:
        """True when a read would not block: data buffered here or in TLS, or on the socket."""
        if getattr(self, "_rbuf", None):
            return True
        sock = self.sock  # type: ignore[attr-defined]
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        readable, _, _ = select.select([sock], [], [], max(0.0, timeout))
        return bool(readable)


class _PlainWire(_BufferedWire, imaplib.IMAP4):
    def open(self, host: str = "", port: int = IMAP_PORT, timeout: Optional[float] = None) -> None:
        self._reset_buffer()
        super().open(host, port, timeout)

    def starttls(self, ssl_context: Optional[ssl.SSLContext] = None) -> Any:
        result = super().starttls(ssl_context)
        self._reset_buffer()
        return result


class _TLSWire(_BufferedWire, imaplib.IMAP4_SSL):
    def open(self, host: str = "", port: int = IMAPS_PORT, timeout: Optional[float] = None) -> None:
        self._reset_buffer()
        super().open(host, port, timeout)


@dataclass(frozen=True)
class Folder:
    """One folder (or Gmail label) as LIST reports it.

    ``Folder(name="[Gmail]/Trash", delimiter="/", flags=frozenset({"\\\\HasNoChildren", "\\\\Trash"}))``
    """

    name: str
    delimiter: Optional[str]
    flags: frozenset

    @property
    def special_use(self) -> Optional[str]:
        """The RFC 6154 attribute such as ``"\\\\Trash"``, or None."""
        for use in SPECIAL_USES:
            if any(flag.lower() == use.lower() for flag in self.flags):
                return use
        return None

    @property
    def selectable(self) -> bool:
        return not any(flag.lower() in ("\\noselect", "\\nonexistent") for flag in self.flags)


@dataclass(frozen=True)
class FolderStatus:
    """What SELECT or EXAMINE reported: ``FolderStatus("INBOX", 1, 812, 640, False)``."""

    name: str
    uidvalidity: int
    uidnext: Optional[int]
    exists: int
    readonly: bool


@dataclass(frozen=True)
class MoveResult:
    """The outcome of a move: ``moved`` maps each source UID to its new UID (None if unknown).

    ``missing`` holds the UIDs that were no longer in the source folder when we looked.
    """

    moved: Mapping[int, Optional[int]]
    missing: Tuple[int, ...] = ()


@dataclass
class _Response:
    status: str
    code: str
    code_args: List[Any]
    text: str
    untagged: List[List[Any]]


# A retry policy says what to do when the connection drops during a command: "safe" retry
# as is (reads, +/- STOREs, CREATE, UID EXPUNGE of a fixed set); "never" give up at once.
# MOVE and COPY carry their own recovery in move() and copy().
_SAFE, _NEVER = "safe", "never"

CredentialSource = Union[str, Callable[[], str], None]


def _credential(source: CredentialSource) -> Optional[str]:
    return source() if callable(source) else source


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_APP_PASSWORD_RE = re.compile(r"[a-zA-Z]{4}( ?[a-zA-Z]{4}){3}\Z")


def _clean_password(password: str) -> str:
    """Strip the spaces Google shows inside a 16-letter app password; leave others alone."""
    stripped = password.strip()
    return stripped.replace(" ", "") if _APP_PASSWORD_RE.match(stripped) else password


def _decode_server_text(error: BaseException) -> str:
    """imaplib raises with bytes inside (``"b'[AUTHENTICATIONFAILED] ...'"``); decode it."""
    text = error.args[0] if error.args else str(error)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = str(text)
    match = re.fullmatch(r"b(['\"])(.*)\1", text, re.S)
    return match.group(2) if match else text


class GmailConnection:
    """One IMAP connection that survives drops: ``with GmailConnection(user, ...) as conn:``.

    Credentials: ``password`` (an app password; spaces are stripped) or ``token`` (an OAuth2
    access token for XOAUTH2).  Either may be a callable returning the current value; it is
    called on every (re)connect, so a token provider can refresh an expired token.

    ``security`` is ``"tls"`` (implicit TLS, port 993), ``"starttls"`` (port 143, refused if
    the server does not offer it) or ``"plaintext"`` (loopback hosts only, for tests and
    local servers).  ``cafile`` adds a trusted CA.  ``timeout`` bounds every socket read and
    write.  ``keepalive`` is the idle time after which a background thread sends NOOP.
    On a dropped connection the command is retried after reconnecting, up to ``retries``
    times with exponential backoff and jitter; ``sleep`` and ``rng`` are injectable.

    Raises AuthenticationError, TLSError, ConnectionLostError, ImapError and subclasses.
    """

    def __init__(self, user: str, *, password: CredentialSource = None,
                 token: CredentialSource = None, host: str = GMAIL_HOST,
                 port: Optional[int] = None, security: str = "tls",
                 cafile: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                 keepalive: Optional[float] = DEFAULT_KEEPALIVE,
                 retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        if security not in ("tls", "starttls", "plaintext"):
            raise ValueError(f"security must be 'tls', 'starttls' or 'plaintext', not {security!r}")
        if security == "plaintext" and not _is_loopback(host):
            raise TLSError(f"refusing to connect to {host} without TLS: plaintext is only "
                           f"allowed to a loopback address; use TLS or STARTTLS")
        if (password is None) == (token is None):
            raise ValueError("give exactly one of password= or token=")
        self.user = user
        self.host = host
        self.port = port or (IMAPS_PORT if security == "tls" else IMAP_PORT)
        self.security = security
        self.cafile = cafile
        self.timeout = timeout
        self.keepalive = keepalive
        self.retries = retries
        self.backoff = backoff
        self._password = password
        self._token = token
        self._sleep = sleep
        self._rng = rng
        self._imap: Optional[imaplib.IMAP4] = None
        self._lock = threading.RLock()
        self._idling = False
        self._last_activity = time.monotonic()
        self._background_error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._keepalive_thread: Optional[threading.Thread] = None
        self._selected: Optional[FolderStatus] = None
        self._folders: Optional[List[Folder]] = None
        self.capabilities: frozenset = frozenset()
        self.reconnects = 0
        self.commands_sent = 0
        self.bytes_received = 0
        self.backoff_delays: List[float] = []

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> "GmailConnection":
        self.connect()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def connect(self) -> None:
        """Connect and authenticate, retrying network failures with backoff.

        Raises AuthenticationError (never retried), TLSError, ConnectionLostError.
        """
        with self._lock:
            self._connect_with_retries(first_error=None)
        self._start_keepalive()

    def close(self) -> None:
        """Leave the folder without expunging, LOG OUT, stop the keepalive; never raises.

        CLOSE would expunge every message flagged \\Deleted by anyone in a read-write
        folder (RFC 3501 §6.4.2), so we UNSELECT when the server has it, CLOSE only after
        EXAMINE, and otherwise go straight to LOGOUT, which expunges nothing.
        """
        self._stop.set()
        thread = self._keepalive_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._keepalive_thread = None
        with self._lock:
            imap, self._imap = self._imap, None
            if imap is None:
                return
            try:
                if self._selected is not None:
                    if self.has("UNSELECT"):
                        self._execute_on(imap, "UNSELECT")
                    elif self._selected.readonly:
                        self._execute_on(imap, "CLOSE")
                self._execute_on(imap, "LOGOUT", expect_bye=True)
            except (_Dropped, ImapError, ProtocolError):
                pass
            finally:
                self._selected = None
                self._shutdown(imap)

    @property
    def connected(self) -> bool:
        return self._imap is not None

    def has(self, capability: str) -> bool:
        """True if the server announced ``capability`` (after login), e.g. ``has("MOVE")``."""
        return capability.upper() in self.capabilities

    @property
    def is_gmail(self) -> bool:
        """True for servers with Gmail's extensions (labels, X-GM-RAW, message ids)."""
        return self.has("X-GM-EXT-1")

    @property
    def selected(self) -> Optional[FolderStatus]:
        return self._selected

    # -- connecting and authenticating -------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.cafile)
        return context

    def _open(self) -> imaplib.IMAP4:
        """One attempt: TCP, TLS, greeting, authentication, capabilities."""
        where = f"{self.host}:{self.port}"
        try:
            if self.security == "tls":
                imap: imaplib.IMAP4 = _TLSWire(self.host, self.port,
                                               ssl_context=self._ssl_context(),
                                               timeout=self.timeout)
            else:
                imap = _PlainWire(self.host, self.port, timeout=self.timeout)
        except ssl.SSLCertVerificationError as exc:
            raise TLSError(f"cannot trust the TLS certificate of {where}: "
                           f"{exc.verify_message or exc.reason}; if the server uses a "
                           f"private CA, pass its certificate with --cafile") from exc
        except (ssl.SSLError, imaplib.IMAP4.error, OSError) as exc:
            raise _Dropped(f"cannot connect to {where}: {_decode_server_text(exc)}") from exc
        try:
            if self.security == "starttls":
                self._starttls(imap, where)
            self._authenticate(imap)
            # imaplib read the capabilities once, before login; Gmail adds MOVE, UIDPLUS and
            # more only afterwards, so ask again.
            untagged = self._execute_on(imap, "CAPABILITY").untagged
            self.capabilities = self._capabilities_from(untagged, imap)
        except BaseException:
            self._shutdown(imap)
            raise
        self._imap = imap
        return imap

    def _starttls(self, imap: imaplib.IMAP4, where: str) -> None:
        if "STARTTLS" not in imap.capabilities:
            raise TLSError(f"{where} does not offer STARTTLS; refusing to continue in "
                           f"plaintext. Use implicit TLS (port 993) if the server has it")
        try:
            imap.starttls(self._ssl_context())
        except ssl.SSLCertVerificationError as exc:
            raise TLSError(f"cannot trust the TLS certificate of {where}: "
                           f"{exc.verify_message or exc.reason}; if the server uses a "
                           f"private CA, pass its certificate with --cafile") from exc
        except imaplib.IMAP4.abort as exc:
            raise _Dropped(f"STARTTLS failed: {_decode_server_text(exc)}") from exc
        except imaplib.IMAP4.error as exc:
            raise TLSError(f"{where} refused STARTTLS: {_decode_server_text(exc)}") from exc
        except (ssl.SSLError, OSError) as exc:
            raise _Dropped(f"STARTTLS failed: {exc}") from exc

    def _authenticate(self, imap: imaplib.IMAP4) -> None:
        """LOGIN with the password, or AUTHENTICATE XOAUTH2 with the token; never logged."""
        try:
            if self._token is not None:
                self._xoauth2(imap)
            else:
                password = _credential(self._password) or ""
                imap.login(self.user, _clean_password(password))
        except AuthenticationError:
            raise
        except imaplib.IMAP4.abort as exc:
            raise _Dropped(f"connection lost while signing in: {_decode_server_text(exc)}") from exc
        except imaplib.IMAP4.error as exc:
            text = _decode_server_text(exc)
            raise AuthenticationError(f"{self.host} rejected the sign-in for {self.user}: "
                                      f"{text}", command="LOGIN", status="NO", text=text) from exc
        except OSError as exc:
            raise _Dropped(f"connection lost while signing in: {exc}") from exc
        log.info("signed in to %s as %s", self.host, self.user)

    def _xoauth2(self, imap: imaplib.IMAP4) -> None:
        token = _credential(self._token) or ""
        initial = f"user={self.user}\x01auth=Bearer {token}\x01\x01".encode()
        challenges: List[bytes] = []

        # Gmail answers a bad token with a JSON challenge and waits for an empty response
        # before it sends the tagged NO; resending the token there gets a BAD instead.
        def answer(challenge: bytes) -> bytes:
            if challenges or challenge:
                challenges.append(challenge)
                return b""
            challenges.append(b"")
            return initial

        try:
            imap.authenticate("XOAUTH2", answer)
        except imaplib.IMAP4.error as exc:
            if isinstance(exc, imaplib.IMAP4.abort):
                raise
            detail = ""
            for challenge in challenges:
                if challenge:
                    detail = " (" + challenge.decode("utf-8", "replace") + ")"
            text = _decode_server_text(exc) + detail
            raise AuthenticationError(f"{self.host} rejected the OAuth2 token for "
                                      f"{self.user}: {text}", command="AUTHENTICATE",
                                      status="NO", text=text) from exc

    @staticmethod
    def _capabilities_from(untagged: List[List[Any]], imap: imaplib.IMAP4) -> frozenset:
        caps = set()
        for response in untagged:
            if response and str(response[0]).upper() == "CAPABILITY":
                caps.update(str(word).upper() for word in response[1:])
        return frozenset(caps or imap.capabilities)

    def _connect_with_retries(self, first_error: Optional[BaseException]) -> None:
        """Open a connection, sleeping with backoff between failed attempts."""
        error = first_error
        attempt = 0 if first_error is None else 1
        while True:
            if error is not None:
                if attempt > self.retries:
                    raise ConnectionLostError(
                        f"lost the connection to {self.host}:{self.port} and could not get "
                        f"it back after {self.retries} attempts: {error}; check the network "
                        f"and try again later") from error
                delay = min(MAX_BACKOFF, self.backoff * 2 ** (attempt - 1))
                delay *= 0.5 + 0.5 * self._rng()
                self.backoff_delays.append(delay)
                log.warning("connection problem (%s); reconnecting in %.1f s (attempt %d of %d)",
                            error, delay, attempt, self.retries)
                self._sleep(delay)
            try:
                self._open()
                if error is not None:
                    self.reconnects += 1
                self._background_error = None
                self._last_activity = time.monotonic()
                return
            except _Dropped as exc:
                error = exc
                attempt += 1

    def _reconnect(self, cause: BaseException) -> None:
        """Replace a dead connection and restore the selected folder; raises if impossible."""
        dead, self._imap = self._imap, None
        if dead is not None:
            self._shutdown(dead)
        previous = self._selected
        self._selected = None
        self._connect_with_retries(first_error=cause)
        if previous is not None:
            status = self._select_now(previous.name, previous.readonly)
            if status.uidvalidity != previous.uidvalidity:
                raise UidValidityError(
                    f"UIDVALIDITY of {previous.name} changed from {previous.uidvalidity} "
                    f"to {status.uidvalidity} while reconnecting: the server renumbered the "
                    f"folder, so the UIDs in hand are stale; run again",
                    command="SELECT")

    @staticmethod
    def _shutdown(imap: imaplib.IMAP4) -> None:
        try:
            imap.shutdown()
        except (OSError, AttributeError, ValueError):
            pass

    # -- sending commands ----------------------------------------------------------------

    def _execute_on(self, imap: imaplib.IMAP4, command: str, *args: Any,
                    expect_bye: bool = False,
                    on_untagged: Optional[Callable[[List[Any]], None]] = None) -> _Response:
        """Send one command on ``imap`` and read its whole answer; the caller holds the lock.

        ``args`` are bytes (sent as they are), str (sent as they are: callers build them
        with quote/astring/compress_uids), int, or Literal.  Raises _Dropped when the
        connection dies, ImapError on NO/BAD, ProtocolError on garbage.
        """
        tag = imap._new_tag()  # type: ignore[attr-defined]
        parts: List[Union[bytes, Literal]] = [tag + b" " + command.encode("ascii")]
        for arg in args:
            if isinstance(arg, Literal):
                parts.append(arg)
            elif isinstance(arg, bytes):
                parts.append(arg)
            else:
                text = str(arg)
                _refuse_controls(text, "the argument")
                parts.append(text.encode("utf-8"))
        self._log_command(tag, command, args)
        try:
            self._send(imap, tag, parts)
            response = self._read_response(imap, tag, command, expect_bye, on_untagged)
        except ProtocolError:
            # The rest of the answer is still unread, so the stream is out of step: start
            # afresh on the next command rather than misread what follows.
            if imap is self._imap:
                self._mark_dead()
            raise
        except _DROPPED_ERRORS as exc:
            raise _Dropped(f"{command} failed: {_decode_server_text(exc) or type(exc).__name__}") from exc
        finally:
            self.commands_sent += 1
            self._last_activity = time.monotonic()
        if response.status not in ("OK",) and not (expect_bye and response.status == "BYE"):
            raise ImapError(f"the server answered {response.status} to {command}: "
                            f"{response.text}", command=command, status=response.status,
                            code=response.code, text=response.text)
        return response

    @staticmethod
    def _log_command(tag: bytes, command: str, args: Sequence[Any]) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        shown = []
        for arg in args:
            if isinstance(arg, Literal):
                shown.append(f"{{{len(arg.data)} bytes}}")
            else:
                text = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
                shown.append(text if len(text) < 200 else text[:200] + "...")
        log.debug("C: %s %s %s", tag.decode(), command, " ".join(shown))

    def _send(self, imap: imaplib.IMAP4, tag: bytes, parts: List[Union[bytes, Literal]]) -> None:
        nonsync = self.has("LITERAL+") or self.has("LITERAL-")
        line = b""
        for index, part in enumerate(parts):
            if index:
                line += b" "
            if not isinstance(part, Literal):
                line += part
                continue
            size = len(part.data)
            if nonsync and size <= NONSYNC_LITERAL_MAX:
                line += b"{%d+}\r\n" % size + part.data
                continue
            imap.send(line + b"{%d}\r\n" % size)
            line = b""
            self._wait_continuation(imap, tag)
            line = part.data
        imap.send(line + b"\r\n")

    def _wait_continuation(self, imap: imaplib.IMAP4, tag: bytes) -> None:
        while True:
            raw = self._read_line(imap)
            if raw.startswith(b"+"):
                return
            if raw.startswith(tag + b" "):
                code, _, text = parse_status_text(raw[len(tag) + 1:].split(b" ", 1)[-1])
                raise ImapError(f"the server refused a literal: {text}", status="NO",
                                code=code, text=text)
            if raw.startswith(b"* BYE"):
                raise _Dropped("server said BYE: " + raw[6:].decode("utf-8", "replace"))

    def _read_line(self, imap: imaplib.IMAP4) -> bytes:
        """One response line with any literals it announces inlined, CRLF stripped."""
        line = imap.readline()
        if not line:
            raise EOFError("connection closed by the server")
        data = bytearray()
        while True:
            self.bytes_received += len(line)
            if not line.endswith(b"\r\n"):
                if not line.endswith(b"\n"):
                    raise EOFError("connection closed in the middle of a line")
            match = re.search(rb"\{(\d+)\+?\}\r?\n\Z", line)
            if not match:
                data += line.rstrip(b"\r\n")
                return bytes(data)
            size = int(match.group(1))
            data += line[:match.start()] + b"{%d}\r\n" % size
            data += imap.read(size)
            self.bytes_received += size
            line = imap.readline()
            if not line:
                raise EOFError("connection closed after a literal")

    def _read_response(self, imap: imaplib.IMAP4, tag: bytes, command: str, expect_bye: bool,
                       on_untagged: Optional[Callable[[List[Any]], None]]) -> _Response:
        untagged: List[List[Any]] = []
        while True:
            raw = self._read_line(imap)
            if raw.startswith(b"* "):
                body = raw[2:]
                head = body.split(b" ", 1)
                kind = head[0].upper()
                if kind in (b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"):
                    code, args, text = parse_status_text(head[1] if len(head) > 1 else b"")
                    if kind == b"BYE":
                        if expect_bye:
                            continue
                        raise _Dropped(f"server said BYE: {text}")
                    if kind in (b"NO", b"BAD") or code == "ALERT":
                        log.warning("server: %s %s", kind.decode(), text)
                    untagged.append([kind.decode(), code, args, text])
                    continue
                parsed = parse_response(body)
                self._note_untagged(parsed)
                if on_untagged is not None:
                    on_untagged(parsed)
                untagged.append(parsed)
            elif raw.startswith(tag + b" "):
                rest = raw[len(tag) + 1:]
                status, _, text = rest.partition(b" ")
                code, args, message = parse_status_text(text)
                if "THROTTLED" in message.upper() or code == "THROTTLED":
                    log.warning("the server is throttling this account (%s)", message)
                return _Response(status.decode("ascii", "replace").upper(), code, args,
                                 message, untagged)
            elif raw.startswith(b"+"):
                raise ProtocolError(f"unexpected continuation request to {command}: {raw[:80]!r}")
            else:
                raise ProtocolError(f"unexpected line in the answer to {command}: {raw[:80]!r}")

    def _note_untagged(self, parsed: List[Any]) -> None:
        """Keep the selected folder's message count current from EXISTS."""
        if len(parsed) >= 2 and str(parsed[1]).upper() == "EXISTS" and self._selected:
            selected = self._selected
            self._selected = FolderStatus(selected.name, selected.uidvalidity,
                                          selected.uidnext, int(parsed[0]), selected.readonly)

    def _call(self, command: str, *args: Any, policy: str = _SAFE) -> _Response:
        """Run a command, reconnecting and retrying per ``policy`` when the link drops."""
        with self._lock:
            self._check_background()
            try:
                return self._execute_on(self._live(), command, *args)
            except _Dropped as exc:
                if policy == _NEVER:
                    self._mark_dead()
                    raise ConnectionLostError(f"the connection dropped during {command}, "
                                              f"which is not safe to repeat: {exc}") from exc
                cause: BaseException = exc
            # Retrying: each reconnect gets the full backoff schedule, and the command gets
            # as many tries as there are attempts.
            for _ in range(self.retries):
                self._reconnect(cause)
                try:
                    return self._execute_on(self._live(), command, *args)
                except _Dropped as exc:
                    cause = exc
            self._mark_dead()
            raise ConnectionLostError(f"{command} kept failing after {self.retries} "
                                      f"reconnects: {cause}") from cause

    def _live(self) -> imaplib.IMAP4:
        if self._imap is None:
            raise _Dropped("not connected")
        return self._imap

    def _mark_dead(self) -> None:
        imap, self._imap = self._imap, None
        if imap is not None:
            self._shutdown(imap)

    def _check_background(self) -> None:
        """Turn a failure the keepalive thread recorded into a reconnect, here and now."""
        error, self._background_error = self._background_error, None
        if error is not None or self._imap is None:
            self._reconnect(error or _Dropped("not connected"))

    # -- keepalive ---------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        if not self.keepalive or self._keepalive_thread is not None:
            return
        self._stop.clear()
        thread = threading.Thread(target=self._keepalive_loop, name="gmail_classify-keepalive",
                                  daemon=True)
        self._keepalive_thread = thread
        thread.start()

    def _keepalive_loop(self) -> None:
        """Send NOOP after ``keepalive`` idle seconds; record failures for the foreground."""
        interval = float(self.keepalive or 0)
        while not self._stop.is_set():
            wait = self._last_activity + interval - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            # Never wait behind a foreground command: it resets the idle clock anyway.
            if not self._lock.acquire(timeout=min(interval, 0.5)):
                continue
            try:
                if self._stop.is_set() or self._idling or self._imap is None:
                    self._last_activity = time.monotonic()
                    continue
                if time.monotonic() - self._last_activity < interval:
                    continue
                try:
                    self._execute_on(self._imap, "NOOP")
                except (_Dropped, ImapError) as exc:
                    log.info("keepalive NOOP failed (%s); will reconnect on the next command", exc)
                    self._background_error = exc
                    self._mark_dead()
                    self._last_activity = time.monotonic()
            finally:
                self._lock.release()

    # -- operations: folders -----------------------------------------------------------

    def noop(self) -> None:
        """Send NOOP (also collects pending EXISTS/EXPUNGE updates)."""
        self._call("NOOP")

    def list_folders(self, refresh: bool = False) -> List[Folder]:
        """Every folder (and Gmail label), names decoded from modified UTF-7."""
        if self._folders is not None and not refresh:
            return list(self._folders)
        response = self._call("LIST", quote(""), quote("*"))
        folders = []
        for item in response.untagged:
            if len(item) >= 4 and str(item[0]).upper() == "LIST":
                flags, delimiter, name = item[1], item[2], item[3]
                if isinstance(name, int):
                    name = str(name)
                folders.append(Folder(decode_mailbox(_as_text(name)),
                                      None if delimiter is None else _as_text(delimiter),
                                      frozenset(str(f) for f in (flags or []))))
        self._folders = folders
        return list(folders)

    def special_folder(self, use: str) -> Optional[Folder]:
        """The folder with special-use ``use`` (``"\\\\Trash"``, ``"\\\\All"`` ...), or None.

        Gmail localises folder names ("[Google Mail]/Papierkorb"), so find them by
        attribute, never by name (RFC 6154).
        """
        for folder in self.list_folders():
            if folder.special_use and folder.special_use.lower() == use.lower():
                return folder
        return None

    def create_folder(self, name: str) -> bool:
        """Create a folder (a label on Gmail). Returns False if it already existed."""
        try:
            self._call("CREATE", mailbox_arg(name))
        except ImapError as exc:
            if exc.code == "ALREADYEXISTS" or "exist" in exc.text.lower():
                return False
            raise
        self._folders = None
        return True

    def select(self, folder: str, readonly: bool = False) -> FolderStatus:
        """SELECT (or EXAMINE when ``readonly``) a folder and return its status."""
        with self._lock:
            self._check_background()
            for attempt in range(self.retries + 1):
                try:
                    return self._select_now(folder, readonly)
                except _Dropped as exc:
                    if attempt == self.retries:
                        raise ConnectionLostError(f"could not open {folder}: {exc}") from exc
                    self._selected = None
                    self._reconnect(exc)
        raise AssertionError("unreachable")

    def examine(self, folder: str) -> FolderStatus:
        """Open a folder read-only: nothing, not even \\Seen, can change."""
        return self.select(folder, readonly=True)

    def _select_now(self, folder: str, readonly: bool) -> FolderStatus:
        response = self._execute_on(self._live(), "EXAMINE" if readonly else "SELECT",
                                    mailbox_arg(folder))
        uidvalidity = uidnext = None
        exists = 0
        for item in response.untagged:
            if item and item[0] == "OK":
                if item[1] == "UIDVALIDITY" and item[2]:
                    uidvalidity = int(item[2][0])
                elif item[1] == "UIDNEXT" and item[2]:
                    uidnext = int(item[2][0])
            elif len(item) >= 2 and str(item[1]).upper() == "EXISTS":
                exists = int(item[0])
        if uidvalidity is None:
            raise ProtocolError(f"the server did not report UIDVALIDITY for {folder}",
                                command="SELECT")
        status = FolderStatus(folder, uidvalidity, uidnext, exists,
                              readonly or response.code == "READ-ONLY")
        self._selected = status
        return status

    # -- operations: search and fetch ---------------------------------------------------

    def search(self, criteria: Sequence[Any] = ("ALL",), *, gmail_raw: Optional[str] = None,
               uids: Optional[Iterable[int]] = None) -> List[int]:
        """UID SEARCH in the selected folder; returns ascending UIDs like ``[4, 9, 10]``.

        ``criteria`` is a sequence of search keys and their arguments, e.g.
        ``["UNSEEN", "SINCE", date(2024, 1, 1), "FROM", "bob@example.com"]``; arguments are
        quoted (or sent as literals) here.  ``gmail_raw`` adds a Gmail query
        (X-GM-RAW, Gmail only).  ``uids`` limits the search to those UIDs.
        """
        args: List[Any] = _encode_search(criteria)
        if uids is not None:
            uid_list = sorted(set(uids))
            if not uid_list:
                return []
            args = ["UID", compress_uids(uid_list)] + args
        if gmail_raw is not None:
            if not self.is_gmail:
                raise CapabilityError(f"{self.host} is not Gmail: Gmail queries (X-GM-RAW "
                                      f"{gmail_raw!r}) need Gmail's IMAP extensions")
            args += ["X-GM-RAW", _string_arg(gmail_raw)]
        if any(isinstance(a, Literal) for a in args):
            args = ["CHARSET", "UTF-8"] + args
        response = self._call("UID SEARCH", *args)
        found = set()
        for item in response.untagged:
            if item and str(item[0]).upper() == "SEARCH":
                found.update(int(v) for v in item[1:] if isinstance(v, int))
        return sorted(found)

    def fetch(self, uids: Iterable[int], items: Sequence[str]) -> Dict[int, Dict[str, Any]]:
        """UID FETCH ``items`` for ``uids``; returns ``{uid: {item: value}}`` keyed by UID.

        Keys are the items as requested (``"BODY.PEEK[HEADER]"`` returns under that name);
        values: FLAGS -> tuple of str, X-GM-LABELS -> tuple of decoded str, INTERNALDATE ->
        aware datetime, RFC822.SIZE / X-GM-MSGID / X-GM-THRID -> int, body sections ->
        bytes, BODYSTRUCTURE -> nested lists.  UIDs the server no longer has are absent.
        Unsolicited FETCHes for other messages are ignored.
        """
        for item in items:
            _refuse_controls(item, "the fetch item")
            if re.match(r"(?i)(BODY\[|RFC822(\.TEXT|\.HEADER)?\Z)", item):
                raise ImapError(f"refusing to FETCH {item}: it would mark messages read; "
                                f"use BODY.PEEK[...] instead")
        by_key = {_fetch_key(item): item for item in items}
        wanted = set(int(u) for u in uids)
        result: Dict[int, Dict[str, Any]] = {}
        for chunk in chunk_uids(wanted):
            response = self._call("UID FETCH", compress_uids(chunk),
                                  "(UID " + " ".join(items) + ")")
            for item in response.untagged:
                if len(item) < 3 or str(item[1]).upper() != "FETCH" or not isinstance(item[2], list):
                    continue
                attrs = _pairs(item[2])
                uid = attrs.get("UID")
                if not isinstance(uid, int) or uid not in wanted:
                    continue
                values = result.setdefault(uid, {})
                for key, value in attrs.items():
                    if key == "UID":
                        continue
                    values[by_key.get(_fetch_key(key), key)] = _convert_fetch_value(key, value)
        return result

    # -- operations: changing messages ---------------------------------------------------

    def _store(self, uids: Iterable[int], item: str, values: Sequence[bytes]) -> None:
        # +FLAGS.SILENT spares the echo of every message's flags (RFC 3501 §6.4.6); Gmail
        # documents no .SILENT form of X-GM-LABELS, so labels are stored loudly.
        if item.endswith("FLAGS"):
            item += ".SILENT"
        for chunk in chunk_uids(uids):
            self._call("UID STORE", compress_uids(chunk), item, b"(" + b" ".join(values) + b")")

    def add_flags(self, uids: Iterable[int], flags: Sequence[str]) -> None:
        """``UID STORE +FLAGS.SILENT``, e.g. ``add_flags([5], ["\\\\Seen"])``."""
        self._store(uids, "+FLAGS", [_flag_arg(f) for f in flags])

    def remove_flags(self, uids: Iterable[int], flags: Sequence[str]) -> None:
        """``UID STORE -FLAGS.SILENT``."""
        self._store(uids, "-FLAGS", [_flag_arg(f) for f in flags])

    def add_labels(self, uids: Iterable[int], labels: Sequence[str]) -> None:
        """Add Gmail labels (``+X-GM-LABELS``; never the bare form, which replaces them all)."""
        self._require_gmail("labels")
        self._store(uids, "+X-GM-LABELS", [_label_arg(label) for label in labels])

    def remove_labels(self, uids: Iterable[int], labels: Sequence[str]) -> None:
        """Remove Gmail labels; removing ``\\\\Inbox`` from INBOX messages archives them."""
        self._require_gmail("labels")
        self._store(uids, "-X-GM-LABELS", [_label_arg(label) for label in labels])

    def _require_gmail(self, what: str) -> None:
        if not self.is_gmail:
            raise CapabilityError(f"{self.host} has no Gmail {what} (no X-GM-EXT-1); "
                                  f"use folders instead")

    def uid_expunge(self, uids: Iterable[int]) -> None:
        """Expunge exactly these UIDs (UIDPLUS); a bare EXPUNGE is never sent."""
        if not self.has("UIDPLUS"):
            raise CapabilityError(f"{self.host} lacks UIDPLUS, so it cannot expunge only "
                                  f"chosen messages; refusing to send a bare EXPUNGE")
        for chunk in chunk_uids(uids):
            self._call("UID EXPUNGE", compress_uids(chunk))

    def move(self, uids: Iterable[int], destination: str) -> MoveResult:
        """Move messages from the selected folder to ``destination``.

        Uses UID MOVE (RFC 6851) where the server has it, else UID COPY, +FLAGS \\Deleted
        and UID EXPUNGE of exactly those UIDs (needs UIDPLUS; without it this refuses with
        CapabilityError rather than expunge more than asked).  If the connection drops
        mid-way, the source folder is searched after reconnecting, and only the messages
        still there are moved again: nothing moves twice and every UID is accounted for.
        """
        if not self.has("MOVE") and not self.has("UIDPLUS"):
            raise CapabilityError(f"{self.host} has neither MOVE nor UIDPLUS: moving would "
                                  f"need a bare EXPUNGE, which could delete other messages "
                                  f"flagged \\Deleted; refusing")
        moved: Dict[int, Optional[int]] = {}
        missing: List[int] = []
        for chunk in chunk_uids(uids):
            if self.has("MOVE"):
                self._move_chunk(chunk, destination, moved, missing)
            else:
                self._copy_delete_chunk(chunk, destination, moved, missing)
        return MoveResult(moved, tuple(missing))

    def _move_chunk(self, chunk: List[int], destination: str,
                    moved: Dict[int, Optional[int]], missing: List[int]) -> None:
        pending = list(chunk)
        cause: Optional[BaseException] = None
        for attempt in range(self.retries + 1):
            with self._lock:
                try:
                    if attempt == 0:
                        self._check_background()
                    else:
                        self._reconnect(cause or _Dropped("not connected"))
                        # Did the last attempt happen before the link died?  What is still
                        # in the source folder was not moved; what is gone was.
                        still_here = set(self._search_now(pending))
                        for uid in pending:
                            if uid not in still_here:
                                moved.setdefault(uid, None)
                        pending = [uid for uid in pending if uid in still_here]
                        if not pending:
                            return
                    response = self._execute_on(self._live(), "UID MOVE", compress_uids(pending),
                                                mailbox_arg(destination))
                except _Dropped as exc:
                    cause = exc
                    continue
            mapping = _copyuid_map(response)
            for uid in pending:
                moved[uid] = mapping.get(uid)
            return
        raise ConnectionLostError(f"UID MOVE to {destination} kept failing after "
                                  f"{self.retries} reconnects: {cause}") from cause

    def _search_now(self, uids: Sequence[int]) -> List[int]:
        response = self._execute_on(self._live(), "UID SEARCH", "UID", compress_uids(uids))
        found: List[int] = []
        for item in response.untagged:
            if item and str(item[0]).upper() == "SEARCH":
                found.extend(int(v) for v in item[1:] if isinstance(v, int))
        return found

    def _copy_delete_chunk(self, chunk: List[int], destination: str,
                           moved: Dict[int, Optional[int]], missing: List[int]) -> None:
        """MOVE without MOVE: COPY, then \\Deleted + UID EXPUNGE of exactly these UIDs.

        COPY is not idempotent on ordinary servers, so before it we note the destination's
        UIDNEXT: if the link drops during COPY and UIDNEXT has moved since, the copy
        happened and only the deletion is left to do.
        """
        before = self._uidnext(destination)
        mapping: Dict[int, int] = {}
        try:
            with self._lock:
                self._check_background()
                response = self._execute_on(self._live(), "UID COPY", compress_uids(chunk),
                                            mailbox_arg(destination))
            mapping = _copyuid_map(response)
        except _Dropped as exc:
            with self._lock:
                self._reconnect(exc)
            if self._uidnext(destination) == before:
                response = self._call("UID COPY", compress_uids(chunk), mailbox_arg(destination))
                mapping = _copyuid_map(response)
        present = set(self.search(uids=chunk))
        missing.extend(uid for uid in chunk if uid not in present)
        if present:
            self.add_flags(present, ["\\Deleted"])
            self.uid_expunge(present)
        for uid in present:
            moved[uid] = mapping.get(uid)

    def _uidnext(self, folder: str) -> Optional[int]:
        response = self._call("STATUS", mailbox_arg(folder), "(UIDNEXT)")
        for item in response.untagged:
            if item and str(item[0]).upper() == "STATUS" and len(item) >= 3:
                attrs = _pairs(item[2]) if isinstance(item[2], list) else {}
                value = attrs.get("UIDNEXT")
                return int(value) if isinstance(value, int) else None
        return None

    def copy(self, uids: Iterable[int], destination: str) -> Dict[int, Optional[int]]:
        """Copy messages to ``destination`` (on Gmail: add that label); returns the COPYUID map."""
        result: Dict[int, Optional[int]] = {}
        for chunk in chunk_uids(uids):
            policy = _SAFE if self.is_gmail else _NEVER  # Gmail's COPY only adds a label
            response = self._call("UID COPY", compress_uids(chunk), mailbox_arg(destination),
                                  policy=policy)
            mapping = _copyuid_map(response)
            result.update({uid: mapping.get(uid) for uid in chunk})
        return result

    # -- IDLE ------------------------------------------------------------------------

    def idle(self, timeout: float) -> List[List[Any]]:
        """Wait in IDLE (RFC 2177) up to ``timeout`` seconds for the selected folder to change.

        Returns the untagged updates that arrived, e.g. ``[[12, "EXISTS"]]``, as soon as
        there is at least one, or ``[]`` on timeout.  IDLE is left (DONE) before returning,
        so other commands may follow.  Works the same on every Python version: imaplib's
        own ``idle()`` exists only from 3.14.
        """
        if not self.has("IDLE"):
            raise CapabilityError(f"{self.host} does not support IDLE")
        timeout = min(timeout, IDLE_MAX_SECONDS)
        for attempt in range(self.retries + 1):
            with self._lock:
                self._check_background()
                try:
                    return self._idle_now(self._live(), timeout)
                except _Dropped as exc:
                    if attempt == self.retries:
                        raise ConnectionLostError(f"IDLE kept failing: {exc}") from exc
                    self._reconnect(exc)
        raise AssertionError("unreachable")

    def _idle_now(self, imap: imaplib.IMAP4, timeout: float) -> List[List[Any]]:
        tag = imap._new_tag()  # type: ignore[attr-defined]
        events: List[List[Any]] = []
        self._idling = True
        try:
            try:
                log.debug("C: %s IDLE", tag.decode())
                imap.send(tag + b" IDLE\r\n")
                self.commands_sent += 1
                while True:
                    raw = self._read_line(imap)
                    if raw.startswith(b"+"):
                        break
                    if raw.startswith(tag + b" "):
                        raise ImapError(f"the server refused IDLE: {raw.decode('utf-8', 'replace')}",
                                        command="IDLE", status="NO")
                    if raw.startswith(b"* "):
                        events.append(parse_response(raw[2:]))
                deadline = time.monotonic() + timeout
                while not events:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not imap.wait_readable(remaining):  # type: ignore[attr-defined]
                        break
                    raw = self._read_line(imap)
                    if raw.startswith(b"* BYE"):
                        raise _Dropped("server said BYE during IDLE")
                    if raw.startswith(b"* "):
                        parsed = parse_response(raw[2:])
                        if parsed and str(parsed[0]).upper() != "OK":
                            self._note_untagged(parsed)
                            events.append(parsed)
                imap.send(b"DONE\r\n")
                response = self._read_response(imap, tag, "IDLE", False, None)
            except _DROPPED_ERRORS as exc:
                if isinstance(exc, ProtocolError):
                    raise
                raise _Dropped(f"IDLE failed: {exc}") from exc
        finally:
            self._idling = False
            self._last_activity = time.monotonic()
        events.extend(item for item in response.untagged if item and item[0] != "OK")
        if response.status != "OK":
            raise ImapError(f"the server answered {response.status} to IDLE: {response.text}",
                            command="IDLE", status=response.status, text=response.text)
        return events


def _copyuid_map(response: _Response) -> Dict[int, int]:
    """Source UID -> destination UID from a COPYUID code (RFC 4315), tagged or untagged."""
    codes = [(response.code, response.code_args)]
    codes += [(item[1], item[2]) for item in response.untagged
              if item and item[0] == "OK" and len(item) >= 3]
    for code, args in codes:
        if code == "COPYUID" and len(args) >= 3:
            try:
                source = parse_uid_set(str(args[1]))
                target = parse_uid_set(str(args[2]))
            except ValueError:
                return {}
            return dict(zip(source, target)) if len(source) == len(target) else {}
    return {}


def _fetch_key(item: str) -> str:
    """Canonical name of a fetch item: ``BODY.PEEK[TEXT]<0.100>`` and its answer
    ``BODY[TEXT]<0>`` both become ``BODY[TEXT]<0>``; header field lists are upper-cased."""
    key = item.upper().replace("BODY.PEEK[", "BODY[")
    key = re.sub(r"<(\d+)\.\d+>$", r"<\1>", key)
    return re.sub(r"\s+", " ", key)


def _convert_fetch_value(key: str, value: Any) -> Any:
    if key == "FLAGS":
        return tuple(str(flag) for flag in (value or []))
    if key == "X-GM-LABELS":
        return tuple(decode_mailbox(_as_text(label)) for label in (value or []))
    if key == "INTERNALDATE":
        return parse_internaldate(_as_text(value))
    if key in ("RFC822.SIZE", "X-GM-MSGID", "X-GM-THRID", "MODSEQ"):
        if isinstance(value, list) and value:
            value = value[0]
        return int(value) if isinstance(value, int) or str(value).isdigit() else None
    if key.startswith("BODY[") or key.startswith("RFC822"):
        if isinstance(value, str):
            return value.encode("utf-8", "surrogateescape")
        return value if value is not None else b""
    return value


def _string_arg(text: str) -> Union[bytes, Literal]:
    """A string argument: quoted when it is printable ASCII, otherwise a UTF-8 literal."""
    _refuse_controls(text, "the string")
    if text.isascii():
        return quote(text)
    return Literal(text.encode("utf-8"))


def _flag_arg(flag: str) -> bytes:
    _refuse_controls(flag, "the flag")
    if not re.fullmatch(r"\\?[^(){ \x00-\x1f\x7f%*\"\\\]]+", flag):
        raise ImapError(f"{flag!r} is not a valid IMAP flag or keyword")
    return flag.encode("ascii")


def _label_arg(label: str) -> bytes:
    """A Gmail label on the wire: system labels as atoms, others modified UTF-7 astrings."""
    for system in GMAIL_SYSTEM_LABELS:
        if label.lower() == system.lower():
            return system.encode("ascii")
    encoded = encode_mailbox(label)
    # Gmail misreads some unquoted label atoms (those with * or brackets); quote always.
    return quote(encoded)


# Search keys and the kind of argument each takes (RFC 3501 §6.4.4).
_SEARCH_KEYS = {
    "ALL": (), "ANSWERED": (), "DELETED": (), "DRAFT": (), "FLAGGED": (), "NEW": (),
    "OLD": (), "RECENT": (), "SEEN": (), "UNANSWERED": (), "UNDELETED": (), "UNDRAFT": (),
    "UNFLAGGED": (), "UNSEEN": (), "NOT": (), "OR": (),
    "BCC": ("str",), "BODY": ("str",), "CC": ("str",), "FROM": ("str",), "SUBJECT": ("str",),
    "TEXT": ("str",), "TO": ("str",), "KEYWORD": ("flag",), "UNKEYWORD": ("flag",),
    "HEADER": ("str", "str"), "BEFORE": ("date",), "ON": ("date",), "SINCE": ("date",),
    "SENTBEFORE": ("date",), "SENTON": ("date",), "SENTSINCE": ("date",),
    "LARGER": ("int",), "SMALLER": ("int",), "UID": ("set",), "X-GM-RAW": ("str",),
    "X-GM-MSGID": ("int",), "X-GM-THRID": ("int",), "X-GM-LABELS": ("str",),
    "(": (), ")": (),
}


def _encode_search(criteria: Sequence[Any]) -> List[Any]:
    """Check and encode search criteria: keys as atoms, arguments quoted or literal."""
    if isinstance(criteria, str):
        criteria = [criteria]
    out: List[Any] = []
    items = list(criteria)
    index = 0
    while index < len(items):
        key = str(items[index]).upper()
        if key not in _SEARCH_KEYS:
            raise ImapError(f"unknown search key {items[index]!r}; known keys: "
                            f"{', '.join(sorted(k for k in _SEARCH_KEYS if k.isalpha()))}")
        out.append(key)
        for kind in _SEARCH_KEYS[key]:
            index += 1
            if index >= len(items):
                raise ImapError(f"search key {key} needs a {kind} argument")
            value = items[index]
            if kind == "str":
                out.append(_string_arg(str(value)))
            elif kind == "date":
                if not isinstance(value, _dt.date):
                    raise ImapError(f"search key {key} needs a date, not {value!r}")
                out.append(imap_date(value))
            elif kind == "int":
                out.append(str(int(value)))
            elif kind == "set":
                out.append(value if isinstance(value, str) and re.fullmatch(r"[\d:,*]+", value)
                           else compress_uids(value))
            else:
                out.append(_flag_arg(str(value)))
        index += 1
    return out
