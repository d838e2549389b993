"""Tests for gmail_classify: the wire format, the connection against a fake Gmail IMAP
server on loopback (no network, no Google account), the rule engine, the pipeline and the
command line.  Run with ``python -m unittest -v test_gmail_classify``.

The fake server (FakeGmail, first section) models Gmail's folders as views over labels,
and can also act as a plain RFC 3501 server; it records every command it receives and
injects faults (BYE, drops, resets, delays, NO/BAD, garbage) at a named or n-th command.
"""

from __future__ import annotations

import atexit
import base64
import bisect
import codecs
import collections
import contextlib
import dataclasses
import email
import email.parser
import email.policy
import email.utils
import errno
import hashlib
import http.server
import imaplib
import io
import itertools
import json
import logging
import mailbox
import os
import pathlib
import random
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
import types
import unittest
import urllib.error
import urllib.parse
import urllib.request
import uuid
from unittest import mock
import datetime as _dtm
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import gmail_classify as gc
from gmail_classify import (
    Actions, Decision, GmailClassifyError, MessageInfo, Needs, RulesError,
    STARTER_RULES_JSON, STARTER_RULES_TOML, body_text, builtin_rules, header_addresses,
    header_text, iter_message_files, load_rules, message_info_from_bytes, parse_headers,
    parse_rules,
)

try:
    import tomllib
except ImportError:
    tomllib = None

# The suite starts some fifty Python processes that import the module (signals, closed
# pipes, locks held by another process).  Where no bytecode is written
# (PYTHONDONTWRITEBYTECODE, as on CI) each would compile the module's 16,000 lines again,
# a quarter of a second apiece; they share one compiled copy in a private temporary cache
# instead (PYTHONPYCACHEPREFIX), never in the working tree, removed when the suite ends.
_CHILD_PYCACHE = tempfile.mkdtemp(prefix="gmail-classify-tests-pycache-")
atexit.register(shutil.rmtree, _CHILD_PYCACHE, True)
os.environ["PYTHONPYCACHEPREFIX"] = _CHILD_PYCACHE
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# --- Fake Gmail IMAP server --------------------------------------------------------------
#
# Fake Gmail IMAP server with a real mailbox model, for the gmail_classify tests.
#
# A threaded IMAP4rev1 server on 127.0.0.1 (ephemeral port). In Gmail mode folders are
# views over labels, as on Gmail (INBOX, "[Gmail]/All Mail", "[Gmail]/Trash", one folder per
# user label, each with its own UIDVALIDITY/UIDNEXT); in plain mode (gmail=False) it is an
# RFC 3501 server where each message lives in exactly one folder. It speaks LOGIN,
# AUTHENTICATE XOAUTH2/PLAIN/OAUTHBEARER, implicit TLS and STARTTLS, SEARCH incl. X-GM-RAW,
# FETCH with sections/partials/BODYSTRUCTURE, STORE of flags and X-GM-LABELS, COPY/MOVE
# with COPYUID, EXPUNGE, APPEND, IDLE; it records every byte the client sent and injects
# faults on demand (BYE, drop, reset, delay, NO, BAD, garbage, unsolicited responses).
#
#     with FakeGmail() as server:
#         msgid = server.add_message(b"From: a@example.com\\r\\nSubject: hi\\r\\n\\r\\nbody\\r\\n")
#         imap = imaplib.IMAP4(server.host, server.port)
#         imap.login("user@example.com", "abcdabcdabcdabcd")
#         ...
#         assert server.count("EXPUNGE") == 0
#         assert server.uids("INBOX") == [1]
#
# Standard library only, Python 3.9+, no side effects at import.


# --- Test certificates -------------------------------------------------------------------
#
# EC P-256 test CA and two server certificates signed by it, valid 2000-01-01 .. 2126-01-01
# (notBefore is back-dated so a machine with a slow clock still accepts them). "good" has
# CN=localhost, SAN DNS:localhost, IP:127.0.0.1; "wrong_host" has only SAN DNS:wrong.example.
# The extensions satisfy Python 3.13's VERIFY_X509_STRICT (CA: critical basicConstraints,
# keyUsage, SKI; leaves: AKI, SKI). Produced with OpenSSL 3.0 by exactly these commands
# (`openssl ca` is used only because `openssl x509 -req` in 3.0 cannot set notBefore):
#
#   mkdir -p db && : > db/index.txt && echo 1000 > db/serial
#   cat > ca.cnf <<'CNF'
#   [ca]
#   default_ca = fake
#   [fake]
#   database = db/index.txt
#   serial = db/serial
#   new_certs_dir = db
#   default_md = sha256
#   policy = anything
#   unique_subject = no
#   copy_extensions = none
#   [anything]
#   commonName = supplied
#   [v3_ca]
#   basicConstraints = critical,CA:TRUE
#   keyUsage = critical,keyCertSign,cRLSign
#   subjectKeyIdentifier = hash
#   [good]
#   basicConstraints = critical,CA:FALSE
#   keyUsage = critical,digitalSignature
#   extendedKeyUsage = serverAuth
#   subjectAltName = DNS:localhost,IP:127.0.0.1
#   subjectKeyIdentifier = hash
#   authorityKeyIdentifier = keyid
#   [wrong_host]
#   basicConstraints = critical,CA:FALSE
#   keyUsage = critical,digitalSignature
#   extendedKeyUsage = serverAuth
#   subjectAltName = DNS:wrong.example
#   subjectKeyIdentifier = hash
#   authorityKeyIdentifier = keyid
#   CNF
#   openssl ecparam -name prime256v1 -genkey -noout -out ca.key
#   openssl req -new -key ca.key -subj "/CN=fake_gmail test CA" -out ca.csr
#   openssl ca -batch -config ca.cnf -selfsign -keyfile ca.key -in ca.csr -extensions v3_ca \
#       -startdate 20000101000000Z -enddate 21260101000000Z -notext -out ca.pem
#   openssl ecparam -name prime256v1 -genkey -noout -out good.key
#   openssl req -new -key good.key -subj "/CN=localhost" -out good.csr
#   openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca.key -in good.csr -extensions good \
#       -startdate 20000101000000Z -enddate 21260101000000Z -notext -out good.pem
#   openssl ecparam -name prime256v1 -genkey -noout -out wrong_host.key
#   openssl req -new -key wrong_host.key -subj "/CN=wrong.example" -out wrong_host.csr
#   openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca.key -in wrong_host.csr \
#       -extensions wrong_host -startdate 20000101000000Z -enddate 21260101000000Z -notext \
#       -out wrong_host.pem
#
# CA_CERT_PEM = ca.pem, GOOD_CERT_PEM = good.pem, GOOD_KEY_PEM = good.key,
# WRONG_HOST_CERT_PEM = wrong_host.pem, WRONG_HOST_KEY_PEM = wrong_host.key.

CA_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBbTCCARSgAwIBAgICEAAwCgYIKoZIzj0EAwIwHTEbMBkGA1UEAwwSZmFrZV9n
bWFpbCB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMjYwMTAxMDAwMDAwWjAd
MRswGQYDVQQDDBJmYWtlX2dtYWlsIHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAS9dnJ1/nI5pxu/4ms9mekLipZkkQ3cRCmrCZAduvwta2GxyXT1pFfP
PkhrLKJ4oljMp+k8tCYAJtnGwgeYmEJ1o0IwQDAPBgNVHRMBAf8EBTADAQH/MA4G
A1UdDwEB/wQEAwIBBjAdBgNVHQ4EFgQUd+gBrqoVbfQCusQbuq5c3Q0IvOEwCgYI
KoZIzj0EAwIDRwAwRAIgcTPqojoTuXNOnvpQOQUnskTY1YAlYTv+XI9j7pVR4x0C
IBzTcGn0Wkh6jbGwGv6MYRCbDcOS2RVbvekTARcLC/SU
-----END CERTIFICATE-----
"""

GOOD_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBtzCCAVygAwIBAgICEAEwCgYIKoZIzj0EAwIwHTEbMBkGA1UEAwwSZmFrZV9n
bWFpbCB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMjYwMTAxMDAwMDAwWjAU
MRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATV
ajlDjuelQ9nAaLSdV6v4ptGlps7hHFVdyxK1HlqDENTy2loTKAGYLppu99M9z653
Ua6sX6p7mHrxjjI0ToW0o4GSMIGPMAwGA1UdEwEB/wQCMAAwDgYDVR0PAQH/BAQD
AgeAMBMGA1UdJQQMMAoGCCsGAQUFBwMBMBoGA1UdEQQTMBGCCWxvY2FsaG9zdIcE
fwAAATAdBgNVHQ4EFgQUHOX9rSRguHFhke1/0MFTibB/Us8wHwYDVR0jBBgwFoAU
d+gBrqoVbfQCusQbuq5c3Q0IvOEwCgYIKoZIzj0EAwIDSQAwRgIhALYph11kq9yp
w0856L0pvMb+pkzIqNV84gO/JaLuM61aAiEA9o7V715pcrIZaWuL0McinhcYp9OO
xJi5E5y/+MoZNEA=
-----END CERTIFICATE-----
"""

GOOD_KEY_PEM = """\
-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIB6Zb912aluqpGfEWYJJSBzzkQMDptgKIAFLFeZK8uSWoAoGCCqGSM49
AwEHoUQDQgAE1Wo5Q47npUPZwGi0nVer+KbRpabO4RxVXcsStR5agxDU8tpaEygB
mC6abvfTPc+ud1GurF+qe5h68Y4yNE6FtA==
-----END EC PRIVATE KEY-----
"""

WRONG_HOST_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBuDCCAV6gAwIBAgICEAIwCgYIKoZIzj0EAwIwHTEbMBkGA1UEAwwSZmFrZV9n
bWFpbCB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMjYwMTAxMDAwMDAwWjAY
MRYwFAYDVQQDDA13cm9uZy5leGFtcGxlMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcD
QgAEFIioCXLvGYggtYfrIII6+d2z7J5bIWz12/hGc9EjuY/C+U/PzpanoGIff02w
/Semcqv3HtWjxbqCCWChHy/NJ6OBkDCBjTAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB
/wQEAwIHgDATBgNVHSUEDDAKBggrBgEFBQcDATAYBgNVHREEETAPgg13cm9uZy5l
eGFtcGxlMB0GA1UdDgQWBBRn8Vt/3npqZz8FhRTEVnzLaKPCezAfBgNVHSMEGDAW
gBR36AGuqhVt9AK6xBu6rlzdDQi84TAKBggqhkjOPQQDAgNIADBFAiEAoa1HbiOx
LmTs1nwhvY/5jzgLK7Q8HEhgTRhgkXZ3Zt0CIEf2E/6T1dX6hWROBZ5xGK2QlXpw
dYbruDLwLV8LJMpY
-----END CERTIFICATE-----
"""

WRONG_HOST_KEY_PEM = """\
-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIJ38TZJvnqVHlRXKMU8eoFm/0Q2upUJ5ZUPzzDaWUfCxoAoGCCqGSM49
AwEHoUQDQgAEFIioCXLvGYggtYfrIII6+d2z7J5bIWz12/hGc9EjuY/C+U/Pzpan
oGIff02w/Semcqv3HtWjxbqCCWChHy/NJw==
-----END EC PRIVATE KEY-----
"""

# Server certificate choices for FakeGmail(cert=...): name -> (certificate PEM, key PEM).
SERVER_CERTS: Dict[str, Tuple[str, str]] = {
    "good": (GOOD_CERT_PEM, GOOD_KEY_PEM),
    "wrong_host": (WRONG_HOST_CERT_PEM, WRONG_HOST_KEY_PEM),
}


def write_ca_file(tmpdir: str) -> str:
    """Write CA_CERT_PEM into tmpdir and return the path (for cafile=...)."""
    path = os.path.join(tmpdir, "fake_gmail_ca.pem")
    with open(path, "w", encoding="ascii") as f:
        f.write(CA_CERT_PEM)
    return path


def _server_context(cert: str) -> ssl.SSLContext:
    """A server-side SSLContext holding the named certificate (via a short-lived temp file)."""
    cert_pem, key_pem = SERVER_CERTS[cert]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    fd, path = tempfile.mkstemp(prefix="fake_gmail_", suffix=".pem")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(cert_pem + key_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
    return ctx


# --- Small helpers -----------------------------------------------------------------------

def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.005,
               message: str = "") -> Any:
    """Poll predicate() until it returns something truthy; return that value.

    Raises AssertionError after timeout seconds. Use instead of sleeping in tests.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(message or "condition not met within %.1fs: %r" % (timeout, predicate))
        time.sleep(interval)


def start_raw_server(test: unittest.TestCase, handle: Callable[[socket.socket], None]) -> int:
    """Listen on an ephemeral loopback port and pass each connection to ``handle(client)``,
    one at a time, in one thread; returns the port.  For servers too broken for FakeGmail.

    Only that thread accepts on the listener and closes it, and every client socket, once
    the test's cleanup has told it to stop; the cleanup then joins it.  A thread left in
    accept() on a listener closed under it is not harmless: its descriptor number goes to
    a later test's FakeGmail listener, and once the process has run a child (a
    password_command) that accept() was seen to come back on that number and take the
    FakeGmail's next connection, whose client then saw EOF when the stray socket died.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    stop = threading.Event()
    clients: List[socket.socket] = []

    def serve() -> None:
        try:
            with listener:
                while not stop.is_set():
                    if select.select([listener], [], [], 0.01)[0]:
                        client, _ = listener.accept()
                        clients.append(client)
                        try:
                            handle(client)
                        except OSError:   # the client went away: the test sees that
                            pass
        finally:
            for client in clients:
                client.close()

    thread = threading.Thread(target=serve, name="raw-server:%d" % port, daemon=True)
    thread.start()

    def finish() -> None:
        stop.set()
        thread.join(10)
        test.assertFalse(thread.is_alive(), "the raw test server on port %d did not stop" % port)
    test.addCleanup(finish)
    return port


def imap_utf7_encode(text: str) -> str:
    """Encode a mailbox/label name in modified UTF-7 (RFC 3501 5.1.3): 'Entwürfe' -> 'Entw&APw-rfe'."""
    out: List[str] = []
    pending: List[str] = []

    def flush() -> None:
        if pending:
            b64 = base64.b64encode("".join(pending).encode("utf-16-be")).decode("ascii")
            out.append("&" + b64.rstrip("=").replace("/", ",") + "-")
            del pending[:]

    for ch in text:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def imap_utf7_decode(text: str) -> str:
    """Decode modified UTF-7; raises ValueError on anything malformed (bare '&', non-ASCII...)."""
    out: List[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "&":
            if not 0x20 <= ord(ch) <= 0x7E:
                raise ValueError("non-ASCII character in modified UTF-7: %r" % text)
            out.append(ch)
            i += 1
            continue
        j = text.find("-", i + 1)
        if j < 0:
            raise ValueError("unterminated '&' in modified UTF-7: %r" % text)
        chunk = text[i + 1:j]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            if "=" in b64:
                raise ValueError("padding in modified UTF-7: %r" % text)
            raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
            if len(raw) % 2:
                raise ValueError("odd UTF-16 length in modified UTF-7: %r" % text)
            out.append(raw.decode("utf-16-be"))
        i = j + 1
    return "".join(out)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UTC = _dtm.timezone.utc


def _internaldate(dt: _dtm.datetime) -> str:
    """'17-Jul-1996 02:44:25 -0700' (English month names whatever the locale)."""
    off = dt.utcoffset() or _dtm.timedelta(0)
    minutes = int(off.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return "%02d-%s-%04d %02d:%02d:%02d %s%02d%02d" % (
        dt.day, _MONTHS[dt.month - 1], dt.year, dt.hour, dt.minute, dt.second,
        sign, minutes // 60, minutes % 60)


def _parse_search_date(text: str) -> _dtm.date:
    m = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", text)
    if not m or m.group(2).title() not in _MONTHS:
        raise _Bad("Invalid date %r (want DD-Mon-YYYY)" % text)
    try:
        return _dtm.date(int(m.group(3)), _MONTHS.index(m.group(2).title()) + 1, int(m.group(1)))
    except ValueError:
        raise _Bad("Invalid date %r" % text) from None


def _parse_internaldate(text: str) -> _dtm.datetime:
    m = re.fullmatch(r" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)", text)
    if not m or m.group(2).title() not in _MONTHS:
        raise _Bad("Invalid date-time %r" % text)
    off = _dtm.timedelta(hours=int(m.group(8)), minutes=int(m.group(9)))
    tz = _dtm.timezone(-off if m.group(7) == "-" else off)
    return _dtm.datetime(int(m.group(3)), _MONTHS.index(m.group(2).title()) + 1, int(m.group(1)),
                             int(m.group(4)), int(m.group(5)), int(m.group(6)), tzinfo=tz)


def _crlf(raw: bytes) -> bytes:
    """Normalise bare LF line ends to CRLF, as Gmail stores messages."""
    return re.sub(rb"\r?\n", b"\r\n", raw)


def _compress_uids(nums: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> '1:3,7' (order kept, so COPYUID source and destination correspond)."""
    parts: List[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else "%d:%d" % (nums[i], nums[j]))
        i = j + 1
    return ",".join(parts)


class _NumSet:
    """An IMAP sequence-set ('1:5,7,9:*') as merged ranges; `n in s` is a bisect."""

    def __init__(self, text: str, star: int) -> None:
        if not re.fullmatch(r"(\d+|\*)(:(\d+|\*))?(,(\d+|\*)(:(\d+|\*))?)*", text):
            raise _Bad("Invalid sequence set %r" % text)
        ranges: List[Tuple[int, int]] = []
        for part in text.split(","):
            a, _, b = part.partition(":")
            lo = self._num(a, star)
            hi = self._num(b, star) if b else lo
            ranges.append((min(lo, hi), max(lo, hi)))
        ranges.sort()
        merged: List[Tuple[int, int]] = []
        for lo, hi in ranges:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        self._ranges = merged
        self._los = [lo for lo, _ in merged]

    @staticmethod
    def _num(text: str, star: int) -> int:
        if text == "*":
            return star
        n = int(text)
        if n == 0 or n > 0xFFFFFFFF:
            raise _Bad("Invalid number %s in sequence set" % text)
        return n

    def __contains__(self, n: int) -> bool:
        i = bisect.bisect_right(self._los, n) - 1
        return i >= 0 and n <= self._ranges[i][1]


# --- Wire syntax -------------------------------------------------------------------------
#
# The command line (after tag and name) is parsed into: Atom (str subclass) for atoms,
# bytes for quoted strings and literals, list for parenthesised lists. An atom keeps
# "[...]" together with its spaces and parentheses, so BODY.PEEK[HEADER.FIELDS (FROM)]<0.9>
# and [Gmail]/Trash are one token each. Strictness matters where a client bug would:
# unbalanced quotes/parens, CR/LF/NUL inside a quoted string, bad escapes -> BAD.

class _Bad(Exception):
    """Answer the command with BAD <text>."""


class _No(Exception):
    """Answer the command with NO <text>."""


class _Closed(Exception):
    """The connection is gone (closed by the client, by a fault or by stop())."""


class Atom(str):
    """An IMAP atom as sent by the client (quoted strings and literals are bytes)."""


def _parse_args(data: bytes) -> list:
    items, _ = _parse_items(data, 0, nested=False)
    return items


def _parse_items(data: bytes, pos: int, nested: bool) -> Tuple[list, int]:
    items: list = []
    n = len(data)
    while pos < n:
        c = data[pos]
        if c == 0x20:
            pos += 1
            continue
        if c == 0x28:  # (
            sub, pos = _parse_items(data, pos + 1, nested=True)
            items.append(sub)
        elif c == 0x29:  # )
            if not nested:
                raise _Bad("Unbalanced ')'")
            return items, pos + 1
        elif c == 0x22:  # "
            s, pos = _parse_quoted(data, pos)
            items.append(s)
        elif c == 0x7B:  # {
            s, pos = _parse_literal(data, pos)
            items.append(s)
        elif c in (0x0D, 0x0A, 0x00):
            raise _Bad("Bare CR, LF or NUL in command")
        else:
            a, pos = _parse_atom(data, pos)
            items.append(a)
            continue
        if pos < n and data[pos] not in (0x20, 0x29):
            raise _Bad("Missing space after string or list")
    if nested:
        raise _Bad("Unbalanced '('")
    return items, pos


def _parse_quoted(data: bytes, pos: int) -> Tuple[bytes, int]:
    out = bytearray()
    i = pos + 1
    while True:
        if i >= len(data):
            raise _Bad("Unbalanced quote")
        c = data[i]
        if c == 0x22:
            return bytes(out), i + 1
        if c == 0x5C:
            if i + 1 < len(data) and data[i + 1] in (0x22, 0x5C):
                out.append(data[i + 1])
                i += 2
                continue
            raise _Bad("Invalid escape in quoted string")
        if c in (0x0D, 0x0A, 0x00):
            raise _Bad("CR, LF or NUL inside quoted string")
        out.append(c)
        i += 1


_LITERAL_RE = re.compile(rb"\{(\d+)(\+?)\}\r\n")


def _parse_literal(data: bytes, pos: int) -> Tuple[bytes, int]:
    m = _LITERAL_RE.match(data, pos)
    if not m:
        raise _Bad("Invalid literal")
    end = m.end() + int(m.group(1))
    if end > len(data):
        raise _Bad("Truncated literal")
    return bytes(data[m.end():end]), end


def _parse_atom(data: bytes, pos: int) -> Tuple[Atom, int]:
    i = pos
    depth = 0
    while i < len(data):
        c = data[i]
        if depth == 0 and c in (0x20, 0x28, 0x29):
            break
        if c in (0x0D, 0x0A, 0x00):
            raise _Bad("Bare CR, LF or NUL in command")
        if c == 0x22 and depth == 0:
            raise _Bad("Quote inside atom")
        if c == 0x5B:
            depth += 1
        elif c == 0x5D and depth:
            depth -= 1
        i += 1
    if depth:
        raise _Bad("Unbalanced '['")
    return Atom(data[pos:i].decode("utf-8", "surrogateescape")), i


def _text(tok: Any) -> str:
    """An astring/nstring argument as str (UTF-8)."""
    if isinstance(tok, list):
        raise _Bad("Expected a string, got a list")
    if isinstance(tok, bytes):
        try:
            return tok.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad("String is not valid UTF-8") from None
    return str(tok)


def _quoted(s: str) -> bytes:
    """A quoted string, or a literal when it cannot be quoted (CR/LF/NUL/8-bit)."""
    b = s.encode("utf-8", "surrogateescape")
    if re.search(rb"[\r\n\x00\x80-\xff]", b):
        return b"{%d}\r\n" % len(b) + b
    return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _nstring(s: Optional[str]) -> bytes:
    return b"NIL" if s is None else _quoted(s)


_ATOM_OK = re.compile(r"[^(){ %*\"\\\]\x00-\x1f\x7f-\U0010ffff]+")


def _astring(s: str) -> bytes:
    if _ATOM_OK.fullmatch(s) and s.upper() != "NIL":
        return s.encode("ascii")
    return _quoted(s)


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


# --- MIME structure ----------------------------------------------------------------------
#
# FETCH sections and BODYSTRUCTURE need the exact octets of each part, which the email
# package does not keep; _Part splits the raw bytes itself and uses the email package
# only to read the header fields of each part.

def _split_header(raw: bytes) -> Tuple[bytes, bytes]:
    """(header incl. the blank line, body)."""
    if raw.startswith(b"\r\n"):
        return b"\r\n", raw[2:]
    i = raw.find(b"\r\n\r\n")
    if i < 0:
        return raw, b""
    return raw[:i + 4], raw[i + 4:]


def _header_fields(header: bytes) -> List[Tuple[str, bytes]]:
    """[(lowercase name, raw field bytes incl. folded lines and CRLF)]."""
    fields: List[Tuple[str, bytes]] = []
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + line)
        else:
            name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
            fields.append((name, line))
    return fields


def _split_multipart(body: bytes, boundary: str) -> List[bytes]:
    delim = b"--" + boundary.encode("ascii", "replace")
    parts: List[bytes] = []
    current: Optional[List[bytes]] = None
    for line in body.splitlines(keepends=True):
        stripped = line.rstrip(b" \t\r\n")
        if stripped == delim or stripped == delim + b"--":
            if current is not None:
                chunk = b"".join(current)
                parts.append(chunk[:-2] if chunk.endswith(b"\r\n") else chunk)
            if stripped != delim:
                return parts
            current = []
        elif current is not None:
            current.append(line)
    if current is not None:
        parts.append(b"".join(current))
    return parts


class _Part:
    """One MIME entity: raw header and body octets, parsed header, children."""

    def __init__(self, raw: bytes, default_type: str = "text/plain") -> None:
        self.header, self.body = _split_header(raw)
        self.fields = _header_fields(self.header)
        self.msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(self.header)
        ctype = self.msg.get_content_type() if self.msg.get("Content-Type") else default_type
        self.maintype, _, self.subtype = ctype.partition("/")
        self.children: List[_Part] = []
        self.encapsulated: Optional[_Part] = None
        if self.maintype == "multipart":
            boundary = self.msg.get_boundary()
            child_type = "message/rfc822" if self.subtype == "digest" else "text/plain"
            if boundary:
                self.children = [_Part(p, child_type) for p in _split_multipart(self.body, boundary)]
            if not self.children:
                self.maintype, self.subtype = "text", "plain"
        elif ctype == "message/rfc822":
            self.encapsulated = _Part(self.body)

    def raw_header(self, name: str) -> Optional[str]:
        for fname, field in self.fields:
            if fname == name.lower():
                value = field.split(b":", 1)[1] if b":" in field else b""
                return re.sub(rb"\r?\n", b"", value).strip().decode("utf-8", "replace")
        return None

    def lines(self) -> int:
        return self.body.count(b"\n") + (1 if self.body and not self.body.endswith(b"\n") else 0)


def _params(part: _Part, header: str = "content-type") -> List[Tuple[str, str]]:
    try:
        params = part.msg.get_params(header=header) or []
    except Exception:
        return []
    return [(k, email.utils.collapse_rfc2231_value(v)) for k, v in params[1:] if k]


def _param_list(pairs: List[Tuple[str, str]], upper: bool = True) -> bytes:
    if not pairs:
        return b"NIL"
    return b"(" + b" ".join(_quoted(k.upper() if upper else k.lower()) + b" " + _quoted(v)
                            for k, v in pairs) + b")"


def _disposition(part: _Part) -> bytes:
    value = part.msg.get("Content-Disposition")
    if not value:
        return b"NIL"
    kind = str(value).split(";", 1)[0].strip().lower() or "attachment"
    return b"(" + _quoted(kind) + b" " + _param_list(_params(part, "content-disposition"), upper=False) + b")"


def _address_list(value: Optional[str]) -> bytes:
    if not value:
        return b"NIL"
    addrs = [(n, a) for n, a in email.utils.getaddresses([value]) if a]
    if not addrs:
        return b"NIL"
    out = []
    for name, addr in addrs:
        mailbox, _, host = addr.partition("@")
        out.append(b"(" + _nstring(name or None) + b" NIL " + _nstring(mailbox) + b" "
                   + _nstring(host or None) + b")")
    return b"(" + b"".join(out) + b")"


def _envelope(part: _Part) -> bytes:
    h = part.raw_header
    frm = h("from")
    return b"(" + b" ".join([
        _nstring(h("date")), _nstring(h("subject")), _address_list(frm),
        _address_list(h("sender") or frm), _address_list(h("reply-to") or frm),
        _address_list(h("to")), _address_list(h("cc")), _address_list(h("bcc")),
        _nstring(h("in-reply-to")), _nstring(h("message-id")),
    ]) + b")"


def _bodystructure(part: _Part, extended: bool = True) -> bytes:
    """BODYSTRUCTURE (extended) or BODY (not extended) of a part, RFC 3501 7.4.2."""
    if part.children:
        s = b"(" + b"".join(_bodystructure(c, extended) for c in part.children)
        s += b" " + _quoted(part.subtype.upper())
        if extended:
            s += b" " + _param_list(_params(part)) + b" " + _disposition(part) + b" NIL NIL"
        return s + b")"
    params = _params(part)
    if part.maintype == "text" and not any(k.lower() == "charset" for k, _ in params):
        params.insert(0, ("charset", "us-ascii"))
    fields = [
        _quoted(part.maintype.upper()), _quoted(part.subtype.upper()), _param_list(params),
        _nstring(part.raw_header("content-id")), _nstring(part.raw_header("content-description")),
        _quoted((part.raw_header("content-transfer-encoding") or "7bit").upper()),
        str(len(part.body)).encode(),
    ]
    if part.maintype == "text":
        fields.append(str(part.lines()).encode())
    elif part.encapsulated is not None:
        fields += [_envelope(part.encapsulated), _bodystructure(part.encapsulated, extended),
                   str(part.lines()).encode()]
    if extended:
        fields += [b"NIL", _disposition(part), b"NIL", b"NIL"]
    return b"(" + b" ".join(fields) + b")"


def _navigate(part: _Part, nums: List[int]) -> _Part:
    """The part named by a section part number like [2, 1]; raises IndexError."""
    for n in nums:
        if part.encapsulated is not None:
            part = part.encapsulated
        if part.children:
            if not 1 <= n <= len(part.children):
                raise IndexError(n)
            part = part.children[n - 1]
        elif n != 1:
            raise IndexError(n)
    return part


def _parse_section(spec: str) -> Tuple[List[int], str, List[str], str]:
    """'1.HEADER.FIELDS (from subject)' -> ([1], 'HEADER.FIELDS', ['FROM', 'SUBJECT'], echo)."""
    spec = re.sub(r"\s+", " ", spec.strip().upper())
    nums: List[int] = []
    rest = spec
    m = re.match(r"(\d+(?:\.\d+)*)(\.|$)", rest)
    if m:
        nums = [int(x) for x in m.group(1).split(".")]
        if 0 in nums or (m.group(2) == "." and m.end() == len(rest)):
            raise _Bad("Invalid section %r" % spec)
        rest = rest[m.end():]
    fields: List[str] = []
    m2 = re.fullmatch(r"(HEADER\.FIELDS(?:\.NOT)?) ?\(([^()]*)\)", rest)
    if m2:
        kind = m2.group(1)
        fields = [f.strip('"') for f in m2.group(2).split()]
        if not fields:
            raise _Bad("Empty header field list")
        rest_echo = "%s (%s)" % (kind, " ".join(fields))
    elif rest in ("", "HEADER", "TEXT", "MIME"):
        kind = rest
        rest_echo = rest
        if kind == "MIME" and not nums:
            raise _Bad("MIME needs a part number")
    else:
        raise _Bad("Invalid section %r" % spec)
    echo = ".".join(str(n) for n in nums)
    if echo and rest_echo:
        echo += "."
    return nums, kind, fields, echo + rest_echo


def _section_bytes(root: _Part, raw: bytes, nums: List[int], kind: str, fields: List[str]) -> bytes:
    try:
        part = _navigate(root, nums) if nums else root
    except IndexError:
        return b""
    if kind == "":
        return part.body if nums else raw
    if kind == "MIME":
        return part.header
    target = part.encapsulated if nums else root
    if target is None:
        return b""
    if kind == "HEADER":
        return target.header
    if kind == "TEXT":
        return target.body
    wanted = {f.lower() for f in fields}
    keep = kind == "HEADER.FIELDS"
    return b"".join(field for name, field in target.fields if (name in wanted) == keep) + b"\r\n"


# --- Mailbox model -----------------------------------------------------------------------

@dataclasses.dataclass
class FakeMessage:
    """One stored message. Public accessors hand out copies; mutate through IMAP or the API."""

    msgid: int                      # X-GM-MSGID (also used internally in plain mode)
    thrid: int                      # X-GM-THRID (threads by In-Reply-To/References)
    raw: bytes                      # the message, line ends normalised to CRLF
    date: _dtm.datetime         # INTERNALDATE, tz-aware
    flags: set = dataclasses.field(default_factory=set)    # {"\\Seen", "$label1", ...}
    labels: set = dataclasses.field(default_factory=set)   # gmail mode: {"\\Inbox", "Receipts"}
    folder: Optional[str] = None    # plain mode: the one folder holding it
    modseq: int = 1


@dataclasses.dataclass(frozen=True)
class LogEntry:
    """One client command as received: session number, tag, command name, raw bytes."""

    session: int
    tag: str
    command: str      # "LOGIN", "UID FETCH", ...
    line: bytes       # the full command incl. CRLF and literal octets inline


@dataclasses.dataclass
class _Folder:
    name: str
    kind: str              # inbox all trash spam sent drafts starred important label plain noselect
    special: str = ""      # SPECIAL-USE attribute, e.g. "\\Trash"
    label: str = ""        # kind == "label": the label it shows
    uidvalidity: int = 0
    uidnext: int = 1
    uids: "collections.OrderedDict[int, int]" = dataclasses.field(default_factory=collections.OrderedDict)
    by_msgid: Dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def selectable(self) -> bool:
        return self.kind != "noselect"


# Gmail's special folders: kind, SPECIAL-USE attribute, English name, German name.
_GMAIL_SPECIAL = (
    ("all", "\\All", "All Mail", "Alle Nachrichten"),
    ("drafts", "\\Drafts", "Drafts", "Entw\u00fcrfe"),
    ("important", "\\Important", "Important", "Wichtig"),
    ("sent", "\\Sent", "Sent Mail", "Gesendet"),
    ("spam", "\\Junk", "Spam", "Spam"),
    ("starred", "\\Flagged", "Starred", "Markiert"),
    ("trash", "\\Trash", "Trash", "Papierkorb"),
)
# Plain mode folders: name, SPECIAL-USE attribute.
_PLAIN_FOLDERS = (("INBOX", ""), ("Archive", "\\Archive"), ("Drafts", "\\Drafts"),
                  ("Junk", "\\Junk"), ("Sent", "\\Sent"), ("Trash", "\\Trash"))
# Server kinds the fake can play (FakeGmail(kind=...)): one row per kind of server seen in
# the wild, as the FakeGmail options that make it.  Tests loop over this table, so a new
# kind is one line here.  Plain kinds are RFC 3501 servers: one folder per message.
SERVER_KINDS: Dict[str, Dict[str, Any]] = {
    # Gmail: labels, X-GM-EXT-1, MOVE, UIDPLUS, SPECIAL-USE.
    "gmail": dict(gmail=True),
    # Dovecot, Cyrus 3, Fastmail: MOVE, UIDPLUS, SPECIAL-USE, ("" "/").
    "move": dict(gmail=False, move=True, uidplus=True),
    # Older Dovecot/Cyrus and many hosting providers: UIDPLUS without MOVE.
    "uidplus": dict(gmail=False, move=False, uidplus=True),
    # Old or minimal servers: neither MOVE nor UIDPLUS (only a plain EXPUNGE removes mail).
    "neither": dict(gmail=False, move=False, uidplus=False),
    # No SPECIAL-USE: trash and archive only by name (Exchange-style names here).
    "no-special-use": dict(gmail=False, special_use=False, folders=(
        ("INBOX", ""), ("Archives", ""), ("Deleted Items", ""), ("Drafts", ""),
        ("Junk E-mail", ""), ("Sent Items", ""))),
    # Courier, classic Cyrus, many hosted Dovecots: personal namespace "INBOX." with ".".
    "inbox-prefix": dict(gmail=False, prefix="INBOX.", delimiter="."),
}

# Ways a legal (or common but non-compliant) server answers differently; FakeGmail(quirks=...).
# FETCH quirks hit every message, or only those in FakeGmail.quirk_msgids when it is set.
FAKE_QUIRKS = {
    "quoted-header-fields": "echo BODY[HEADER.FIELDS (...)] with quoted, lower-case, reordered names",
    "nil-header": "answer a HEADER.FIELDS section with NIL",
    "omit-header": "leave a requested HEADER.FIELDS section out of the FETCH answer",
    "omit-flags": "leave FLAGS out of the FETCH answer",
    "omit-body": "leave a requested BODY[]<...> partial out of the FETCH answer",
    "omit-labels": "leave X-GM-LABELS out of the FETCH answer (Gmail)",
    "status-other-first": "send an untagged STATUS for another folder before the asked one's",
    "raw-utf8-names": "list folder names as raw UTF-8 and take names literally (no modified UTF-7)",
    "8bit-greeting": "greet in Latin-1 and list a capability atom with an 8-bit byte before sign-in",
}

# XLIST (Gmail's pre-SPECIAL-USE extension) spells some attributes differently.
_XLIST_ATTR = {"\\All": "\\AllMail", "\\Junk": "\\Spam", "\\Flagged": "\\Starred"}

_SYSTEM_FLAGS = {f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")}
_SYSTEM_LABELS = {
    "\\inbox": "\\Inbox", "\\trash": "\\Trash", "\\spam": "\\Spam",
    "\\sent": "\\Sent", "\\draft": "\\Draft", "\\drafts": "\\Draft", "\\important": "\\Important",
    "\\starred": "\\Starred",
}
_FOLDER_LABEL = {"inbox": "\\Inbox", "sent": "\\Sent", "drafts": "\\Draft", "important": "\\Important"}
_GMAIL_FLAGS = "\\Answered \\Flagged \\Draft \\Deleted \\Seen $NotPhishing $Phishing"


def _canon_flag(flag: str) -> str:
    if flag.startswith("\\"):
        canon = _SYSTEM_FLAGS.get(flag.lower())
        if canon is None:
            raise ValueError("unknown system flag %r" % flag)
        return canon
    if not flag or not _ATOM_OK.fullmatch(flag):
        raise ValueError("invalid keyword %r" % flag)
    return flag


def _canon_label(label: str) -> str:
    canon = _SYSTEM_LABELS.get(label.lower())
    if canon:
        return canon
    if label.startswith("\\") or not label.strip():
        raise ValueError("invalid label %r" % label)
    if label.lower() == "inbox":   # the system label is \Inbox; a client must say so
        raise ValueError("label %r is reserved; the inbox is \\Inbox" % label)
    return label


def _flag_key(flag: str) -> Tuple[int, str]:
    order = ("\\Answered", "\\Flagged", "\\Draft", "\\Deleted", "\\Seen")
    return (order.index(flag), "") if flag in order else (len(order), flag)


def _flags_bytes(flags: Iterable[str]) -> bytes:
    return b"(" + " ".join(sorted(flags, key=_flag_key)).encode("utf-8") + b")"


def _labels_bytes(labels: Iterable[str]) -> bytes:
    out = []
    for label in sorted(labels, key=lambda s: (not s.startswith("\\"), s)):
        if label.startswith("\\"):
            out.append(_quoted(label))
        else:
            out.append(_astring(imap_utf7_encode(label)))
    return b"(" + b" ".join(out) + b")"


# --- Search ------------------------------------------------------------------------------

def _decoded_header(parsed: email.message.Message, name: str) -> str:
    try:
        return " ".join(str(v) for v in (parsed.get_all(name) or []))
    except Exception:
        return ""


def _body_text(parsed: email.message.Message) -> str:
    texts = []
    for part in parsed.walk():
        if part.get_content_maintype() != "text" or part.get_content_disposition() == "attachment":
            continue
        payload = part.get_payload(decode=True) or b""
        charset = part.get_content_charset() or "utf-8"
        try:
            codecs.lookup(charset)
        except LookupError:
            charset = "utf-8"
        texts.append(payload.decode(charset, "replace"))
    return "\n".join(texts)


def _has_attachment(parsed: email.message.Message) -> bool:
    return parsed.is_multipart() and any(
        p.get_content_disposition() == "attachment" for p in parsed.walk())


def _sent_date(parsed: email.message.Message, fallback: _dtm.datetime) -> _dtm.date:
    try:
        dt = email.utils.parsedate_to_datetime(str(parsed["Date"]))
        return dt.date() if dt else fallback.date()
    except Exception:
        return fallback.date()


def _label_key(label: str) -> str:
    """Gmail's search spelling of a label: case-insensitive, ' ' and '/' as '-'."""
    return re.sub(r"[\s/]", "-", label.lstrip("\\").casefold())


_GM_TOKEN = re.compile(r'\(|\)|[^\s()"]*"[^"]*"|[^\s()"]+')
_GM_SIZE = re.compile(r"(\d+)([kKmM]?)")
_GM_AGE = re.compile(r"(\d+)([dDwWmMyY])")


# --- Session (one per connection) --------------------------------------------------------

_PRE_AUTH = {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "LOGIN", "AUTHENTICATE", "ID"}
_SELECTED = {"FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE", "CLOSE", "UNSELECT", "CHECK",
             "UID FETCH", "UID STORE", "UID SEARCH", "UID COPY", "UID MOVE", "UID EXPUNGE"}
_MESSAGE_CMDS = _SELECTED - {"CLOSE", "UNSELECT", "CHECK"}
# Commands that talk to the client themselves (continuations) and must not hold the model lock.
_INTERACTIVE = {"IDLE", "AUTHENTICATE", "LOGOUT", "STARTTLS"}
# Command -> capability that must be advertised (after authentication) for it to exist.
_NEEDS_CAP = {"UNSELECT": "UNSELECT", "IDLE": "IDLE", "MOVE": "MOVE", "UID MOVE": "MOVE",
              "UID EXPUNGE": "UIDPLUS", "ENABLE": "ENABLE", "XLIST": "XLIST", "ID": "ID",
              "NAMESPACE": "NAMESPACE", "COMPRESS": "COMPRESS=DEFLATE"}
_FETCH_MACROS = {"ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
                 "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
                 "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]}
_FETCH_SIMPLE = {"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY",
                 "RFC822", "RFC822.HEADER", "RFC822.TEXT", "MODSEQ",
                 "X-GM-MSGID", "X-GM-THRID", "X-GM-LABELS"}
_FETCH_SECTION = re.compile(r"(BODY|BODY\.PEEK)\[(.*)\](?:<(\d+)(?:\.(\d+))?>)?", re.S)


class _Session(socketserver.BaseRequestHandler):
    """One client connection: reads commands, dispatches to cmd_<NAME>, writes answers."""

    server: "_TCPServer"

    def setup(self) -> None:
        self.fake: FakeGmail = self.server.fake
        self.sock: socket.socket = self.request
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.thread = threading.current_thread()
        self._buf = bytearray()
        self.user: Optional[str] = None
        self.tls = False
        self.selected: Optional[str] = None
        self.readonly = False
        self.known: List[int] = []             # UIDs of the selected folder as the client knows them
        self.known_flags: Dict[int, frozenset] = {}
        self.enabled: set = set()
        self.out: List[bytes] = []
        self._after: Optional[str] = None      # "close" / "starttls" once the answer is sent
        self.killed = threading.Event()        # set by drop_all_connections()/stop(): ends delays
        # Held while this thread closes the socket and while another thread shuts it down:
        # a shutdown() racing a close() could hit whatever socket reuses the fd number.
        self.sock_lock = threading.Lock()
        self.id = self.fake._register(self)

    def finish(self) -> None:
        self.fake._unregister(self)
        with self.sock_lock:
            try:
                self.sock.close()
            except OSError:
                pass

    # -- I/O --

    def handle(self) -> None:
        try:
            if self.fake.tls:
                self.sock.settimeout(10)
                self._start_tls()
                self.sock.settimeout(None)
                self.tls = True
            if "8bit-greeting" in self.fake.quirks:
                self._send("* OK Gimap prêt à servir 127.0.0.1\r\n".encode("latin-1"))
            else:
                self._send(b"* OK Gimap ready for requests from 127.0.0.1\r\n")
            while True:
                cmd = self._read_command()
                if cmd is None:
                    return
                self._dispatch(*cmd)
        except (_Closed, OSError, ValueError):
            return

    def _readline(self) -> Optional[bytes]:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i + 1])
                del self._buf[:i + 1]
                return line
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buf += data

    def _readexact(self, n: int) -> Optional[bytes]:
        while len(self._buf) < n:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _read_command(self) -> Optional[Tuple[bytes, int]]:
        """(full command bytes with literals inline, length without literal octets) or None at EOF."""
        parts: List[bytes] = []
        length = 0
        while True:
            line = self._readline()
            if line is None:
                return None
            self.fake._raw(line)
            parts.append(line)
            length += len(line)
            m = re.search(rb"\{(\d+)(\+?)\}\r\n\Z", line)
            if not m:
                return b"".join(parts), length
            if not m.group(2):
                self._send(b"+ go ahead\r\n")
            data = self._readexact(int(m.group(1)))
            if data is None:
                return None
            self.fake._raw(data)
            parts.append(data)

    def _read_continuation(self) -> bytes:
        line = self._readline()
        if line is None:
            raise _Closed()
        self.fake._raw(line)
        return line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _u(self, line: Any) -> None:
        """Queue an untagged response line (str or bytes, without CRLF)."""
        self.out.append((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")

    def _flush(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out = []
            self._send(data)

    def _close(self, how: str) -> None:
        """End the connection: "drop" (FIN), "reset" (RST via SO_LINGER 0)."""
        with self.sock_lock:
            try:
                if how == "reset":
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                self.sock.close()
            except OSError:
                pass
        raise _Closed()

    # -- dispatch --

    def _dispatch(self, line: bytes, length: int) -> None:
        fake = self.fake
        body = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\r\n")
        tag_b, _, rest = body.partition(b" ")
        words = rest.split(b" ", 2)
        name = words[0].decode("ascii", "replace").upper()
        argbytes = rest[len(words[0]) + 1:]
        if name == "UID" and len(words) > 1:
            name = "UID " + words[1].decode("ascii", "replace").upper()
            argbytes = words[2] if len(words) > 2 else b""
        tag = tag_b.decode("ascii", "replace")
        fake._record(LogEntry(self.id, tag, name, line), length)
        self.out = []
        if not line.endswith(b"\r\n") or not re.fullmatch(r"[!#$&',./0-9:;<=>?@A-Z^_`a-z|}~-]+", tag) or not name:
            self._send(("%s BAD Invalid command line\r\n" % (tag if tag else "*")).encode())
            return
        if length > GMAIL_MAX_LINE:   # recorded in long_lines, then refused as Gmail does
            self._send(("%s BAD [TOOBIG] Command line too long\r\n" % tag).encode())
            return
        fault = fake._take_fault(name)
        if fault is not None and fault.action == "call" and fault.when != "after":
            fault.callback()
            fault = None
        if fault is not None and fault.action in _OTHER_CLIENT_ACTIONS:
            self._other_client(fault)
            fault = None
        if fault is not None and fault.action == "renumber":
            if self.selected is not None:
                fake.bump_uidvalidity(self.selected)
            self._close("drop")
        if fault is not None and fault.action == "echo":
            self._echo(tag, name, argbytes)
            return
        if fault is not None and fault.action in _HOSTILE_ACTIONS:
            self._hostile(fault, tag, self._execute(tag, name, argbytes))
            self._after_answer()
            return
        if fault is not None and fault.when == "before" and fault.action not in ("delay", "unsolicited"):
            self._apply_fault(fault, tag)
            return
        if fault is not None and fault.when == "before" and fault.action == "delay":
            self.killed.wait(fault.delay)
        snapshot = (list(self.known), dict(self.known_flags))
        tagged = self._execute(tag, name, argbytes)
        if fault is not None and fault.action == "unsolicited":
            inject = [b"* 1 FETCH (FLAGS (\\Seen))\r\n", b"* %d EXISTS\r\n" % len(self.known)]
            if fault.text:
                inject = [line.encode() + b"\r\n" for line in fault.text.split("\r\n")]
            at = {"before": 0, "mid": max(1, len(self.out) // 2) if self.out else 0}.get(fault.when, len(self.out))
            self.out[at:at] = inject
            fault = None
        if fault is None or (fault.when == "before"):
            self.out.append(tagged)
            self._flush()
        elif fault.when == "after":
            if fault.action == "call":      # answered first, then the callback
                self.out.append(tagged)
                self._flush()
                fault.callback()
            elif fault.action == "delay":
                self.killed.wait(fault.delay)
                self.out.append(tagged)
                self._flush()
            else:
                self.out = []
                self.known, self.known_flags = snapshot
                self._apply_fault(fault, tag)
        else:  # mid
            half = max(1, len(self.out) // 2) if self.out else 0
            first, self.out = self.out[:half], self.out[half:]
            self._send(b"".join(first))
            if fault.action == "delay":
                self.killed.wait(fault.delay)
                self.out.append(tagged)
                self._flush()
            else:
                self.out = []
                self.known, self.known_flags = snapshot
                self._apply_fault(fault, tag)
        self._after_answer()

    def _other_client(self, fault: "_Fault") -> None:
        """Another client's STORE in this session's folder, just before the command runs:
        \\Deleted set (mark_deleted) or cleared (unmark_deleted) on the message with UID
        ``fault.size``, or on the first one without (with) the flag when ``size`` is 0."""
        fake = self.fake
        on = fault.action == "mark_deleted"
        with fake._cond:
            folder = fake._folders[fake._folder_key(self.selected)]
            for uid, mid in folder.uids.items():
                flags = fake._msgs[mid].flags
                if (uid == fault.size) if fault.size else (("\\Deleted" in flags) != on):
                    if on:
                        flags.add("\\Deleted")
                    else:
                        flags.discard("\\Deleted")
                    fake._changed([mid])
                    fake.other_client.append((fault.action, self.selected, uid))
                    return

    def _after_answer(self) -> None:
        after, self._after = self._after, None
        if after == "close":
            self._close("drop")
        elif after == "starttls":
            self._buf = bytearray()  # RFC 3501 6.2.1: discard anything sent before the handshake
            self._start_tls()
            self.tls = True

    def _start_tls(self) -> None:
        """Swap self.sock for its TLS wrapper under sock_lock, then shake hands outside it
        (drop_all_connections must still be able to cut a handshake short).  A failed
        handshake leaves the wrapper open in self.sock, for finish() to close under the lock,
        instead of ssl closing the descriptor behind drop_all_connections' back."""
        with self.sock_lock:
            self.sock = self.fake._ssl_context.wrap_socket(self.sock, server_side=True,
                                                           do_handshake_on_connect=False)
        self.sock.do_handshake()

    def _execute(self, tag: str, name: str, argbytes: bytes) -> bytes:
        """Run one command; leaves untagged answers in self.out, returns the tagged line."""
        fake = self.fake
        status = "BAD"
        try:
            method = None
            if re.fullmatch(r"[A-Z][A-Z0-9-]*( [A-Z][A-Z0-9-]*)?", name):
                method = getattr(self, "cmd_" + name.replace(" ", "_").replace("-", "_"), None)
            cap = _NEEDS_CAP.get(name)
            if method is None or (cap and cap not in self._capabilities(authenticated=True)):
                raise _Bad("Unknown command %s" % name)
            if self.user is None and name not in _PRE_AUTH:
                raise _Bad("Command received in Invalid state.")
            if name in _SELECTED and self.selected is None:
                raise _Bad("Command received in Invalid state.")
            args = _parse_args(argbytes)
            if name in _INTERACTIVE:
                text = method(tag, args)
            else:
                with fake._cond:
                    if name in _MESSAGE_CMDS:
                        self._announce(expunge=False)
                    text = method(tag, args)
            status = "OK"
        except _Bad as e:
            text = "BAD " + str(e)
        except _No as e:
            text = "NO " + str(e)
            status = "NO"
        except _Closed:
            raise
        except OSError as e:  # the client went away during a continuation
            raise _Closed() from e
        except Exception as e:  # a bug in the fake: say so on the wire and in server.errors
            fake.errors.append(traceback.format_exc())
            text = "BAD [SERVERBUG] fake_gmail: %r" % e
        if status in ("OK", "NO") and self.selected is not None:
            with fake._cond:
                self._announce(expunge=name not in ("FETCH", "STORE", "SEARCH"))
        return ("%s %s\r\n" % (tag, text)).encode("utf-8")

    def _apply_fault(self, fault: "_Fault", tag: str) -> None:
        a = fault.action
        if a == "bye":
            self._send(b"* BYE fake server going away\r\n")
            self._close("drop")
        elif a in ("drop", "reset"):
            self._close(a)
        elif a == "no":
            self._send(("%s NO %s\r\n" % (tag, fault.text or "[UNAVAILABLE] fake failure")).encode())
        elif a == "bad":
            self._send(("%s BAD %s\r\n" % (tag, fault.text or "fake protocol error")).encode())
        elif a == "garbage":
            self._send(b"* 1 FETCH (UID 7 FLAGS (\\Seen\r\n" + ("%s OK done\r\n" % tag).encode())

    def _hostile(self, fault: "_Fault", tag: str, tagged: bytes) -> None:
        """Answer the command just executed the way a broken or hostile server would."""
        a, out = fault.action, self.out
        self.out = []
        fetches = [i for i, line in enumerate(out) if re.match(rb"\* \d+ FETCH \(", line)]
        uid_of = lambda line: re.search(rb"UID (\d+)", line).group(1)  # noqa: E731
        if a == "huge_literal" and fetches:
            i = fetches[0]
            self._send(b"".join(out[:i]))
            seq = out[i].split(b" ")[1]
            self._send(b"* %s FETCH (UID %s BODY[] {%d}\r\n" % (seq, uid_of(out[i]), fault.size))
            chunk = b"x" * 65536
            left = fault.size
            while left:
                self._send(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
            self._send(b")\r\n" + b"".join(out[i:]) + tagged)
            return
        if a == "nesting_bomb" and fetches:
            i = fetches[0]
            depth = fault.size or 5000
            out[i] = b"* %s FETCH (UID %s BODYSTRUCTURE %s%s)\r\n" % (
                out[i].split(b" ")[1], uid_of(out[i]), b"(" * depth, b")" * depth)
        elif a == "huge_copyuid":
            tagged = ("%s OK [COPYUID 1 1:4294967295 1:4294967295] (Success)\r\n" % tag).encode()
        elif a == "huge_search":
            out = [line for line in out if not line.startswith(b"* SEARCH")]
            out.append(b"* SEARCH" + b" 1" * (fault.size or 100000) + b"\r\n")
        elif a == "exists_flood":
            out = [b"* %d EXISTS\r\n" % (len(self.known) + n) for n in range(fault.size)] + out
        elif a == "flood":
            line = (fault.text or "* OK still thinking").encode() + b"\r\n"
            self._send(b"".join(out))
            block, left = line * 1000, fault.size
            while fault.size == 0 or left > 0:
                self._send(block if fault.size == 0 else line * min(left, 1000))
                left -= 1000
                if self.killed.is_set():
                    raise _Closed()
            out = []
        elif a == "big_list":
            name = b"x" * (fault.burst or 1024 * 1024)
            out += [b'* LIST (\\HasNoChildren) "/" "%s%d"\r\n' % (name, n) for n in range(fault.size)]
        elif a == "repeat_fetch" and fetches:
            self._send(b"".join(out[:fetches[0]]))
            for _ in range(fault.size):     # one copy at a time: the fake keeps only one
                self._send(out[fetches[0]])
            out = out[fetches[0]:]
        elif a == "lying_exists":
            out.insert(0, b"* 4294967295 EXISTS\r\n")
        elif a == "starttls_inject":
            tagged += b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected before the handshake\r\n"
        data = b"".join(out) + tagged
        if a != "dribble":
            self._send(data)
            return
        step = fault.size or 1
        self._send(data[:fault.burst])
        for start in range(fault.burst, len(data), step):
            self._send(data[start:start + step])
            if self.killed.wait(fault.delay):
                raise _Closed()

    def _echo(self, tag: str, name: str, argbytes: bytes) -> None:
        """The "echo" fault: quote the command back, secrets and all, and refuse it."""
        said = b"%s %s" % (name.encode(), argbytes)
        if name == "AUTHENTICATE":
            words = argbytes.split(b" ")
            sent = words[1] if len(words) > 1 else b""
            if not sent:
                self._send(b"+ \r\n")
                sent = self._read_continuation()
            decoded = base64.b64decode(sent + b"=" * (-len(sent) % 4))
            self._send(b"+ " + base64.b64encode(b'{"you sent": "' + sent + b'", "decoded": "'
                                                  + decoded.replace(b"\x01", b" ") + b'"}') + b"\r\n")
            self._read_continuation()
        self._send(b"* NO [ALERT] we did not like " + said + b"\r\n"
                   + tag.encode() + b" NO your command was " + said + b"\r\n")

    def _announce(self, expunge: bool = True) -> None:
        """Queue EXPUNGE / EXISTS / FETCH FLAGS for changes the client has not been told about."""
        if self.selected is None:
            return
        folder = self.fake._folders.get(self.selected)
        current = folder.uids if folder is not None else collections.OrderedDict()
        msgs = self.fake._msgs
        if expunge:
            for i in range(len(self.known) - 1, -1, -1):
                if self.known[i] not in current:
                    self._u("* %d EXPUNGE" % (i + 1))
                    self.known_flags.pop(self.known[i], None)
                    del self.known[i]
        knownset = set(self.known)
        new = [u for u in current if u not in knownset]
        if new:
            self.known.extend(new)
            for u in new:
                self.known_flags[u] = frozenset(msgs[current[u]].flags)
            self._u("* %d EXISTS" % len(self.known))
        for seq, u in enumerate(self.known, 1):
            mid = current.get(u)
            if mid is None:
                continue
            flags = frozenset(msgs[mid].flags)
            if self.known_flags.get(u) != flags:
                self.known_flags[u] = flags
                self._u(b"* %d FETCH (UID %d FLAGS %s)" % (seq, u, _flags_bytes(flags)))

    # -- helpers --

    def _capabilities(self, authenticated: Optional[bool] = None) -> List[str]:
        fake = self.fake
        auth = self.user is not None if authenticated is None else authenticated
        starttls = fake.starttls and not self.tls and not auth
        if fake.gmail:
            caps = ["IMAP4rev1", "UNSELECT"] + (["IDLE"] if fake.idle else []) + [
                "NAMESPACE", "QUOTA", "ID", "XLIST", "CHILDREN", "X-GM-EXT-1"]
            if not auth:
                caps += ["XYZZY", "SASL-IR", "AUTH=XOAUTH2", "AUTH=PLAIN", "AUTH=PLAIN-CLIENTTOKEN",
                         "AUTH=OAUTHBEARER"]
            else:
                caps += (["UIDPLUS"] if fake.uidplus else []) + ["COMPRESS=DEFLATE", "ENABLE"] + (
                    ["MOVE"] if fake.move else []) + [
                    "CONDSTORE", "ESEARCH", "UTF8=ACCEPT", "LIST-EXTENDED", "LIST-STATUS",
                    "LITERAL-", "SPECIAL-USE", "APPENDLIMIT=35651584"]
        else:
            caps = ["IMAP4rev1", "LITERAL+", "NAMESPACE"] + (
                ["SPECIAL-USE"] if fake.special_use else []) + (["MOVE"] if fake.move else []) + (
                ["UIDPLUS"] if fake.uidplus else []) + (["IDLE"] if fake.idle else [])
            if not auth:
                caps.append("AUTH=PLAIN")
        if starttls:
            caps.append("STARTTLS")
        return caps

    def _mailbox(self, tok: Any) -> str:
        if "raw-utf8-names" in self.fake.quirks:   # a non-compliant server: names as sent
            s = tok.decode("utf-8", "surrogateescape") if isinstance(tok, bytes) else _text(tok)
            return "INBOX" if s.upper() == "INBOX" else s
        s = _text(tok)
        if s.upper() == "INBOX":
            return "INBOX"
        if s.isascii():
            try:
                s = imap_utf7_decode(s)
            except ValueError:
                raise _Bad("Invalid mailbox name %r (modified UTF-7 expected)" % s) from None
        return "INBOX" if s.upper() == "INBOX" else s

    def _folder(self) -> _Folder:
        folder = self.fake._folders.get(self.selected or "")
        if folder is None:
            raise _No("[CLOSED] Mailbox no longer exists")
        return folder

    def _targets(self, setspec: Any, by_uid: bool) -> List[Tuple[int, int, FakeMessage]]:
        """[(seq, uid, message)] in the selected folder for a UID or sequence set."""
        if not isinstance(setspec, Atom):
            raise _Bad("Expected a sequence set")
        current = self._folder().uids
        if by_uid:
            ns = _NumSet(setspec, star=max(current) if current else 0)
        else:
            ns = _NumSet(setspec, star=len(self.known))
        out = []
        for seq, uid in enumerate(self.known, 1):
            mid = current.get(uid)
            if mid is not None and ((uid in ns) if by_uid else (seq in ns)):
                out.append((seq, uid, self.fake._msgs[mid]))
        return out

    def _require_rw(self, what: str) -> None:
        if self.readonly:
            raise _No("[READ-ONLY] %s attempt on READ-ONLY folder (Failure)" % what)

    def _require_gmail(self, what: str) -> None:
        if not self.fake.gmail:
            raise _Bad("%s is not supported (no X-GM-EXT-1)" % what)

    # -- any state --

    def cmd_CAPABILITY(self, tag: str, args: list) -> str:
        line = ("* CAPABILITY " + " ".join(self._capabilities())).encode()
        if "8bit-greeting" in self.fake.quirks and self.user is None:
            line += " X-CAFÉ".encode("latin-1")
        self._u(line)
        return "OK Thats all she wrote! (Success)"

    def cmd_NOOP(self, tag: str, args: list) -> str:
        return "OK Success"

    def cmd_CHECK(self, tag: str, args: list) -> str:
        return "OK Success"

    def cmd_LOGOUT(self, tag: str, args: list) -> str:
        self._u("* BYE LOGOUT Requested")
        self._after = "close"
        return "OK 73 good day (Success)"

    def cmd_ID(self, tag: str, args: list) -> str:
        self._u('* ID ("name" "GImap" "vendor" "Google, Inc." "support-url" "https://support.google.com/mail")')
        return "OK Success"

    def cmd_STARTTLS(self, tag: str, args: list) -> str:
        if not self.fake.starttls or self.tls or self.user is not None:
            raise _Bad("STARTTLS not available")
        self._after = "starttls"
        return "OK Begin TLS negotiation now"

    # -- authentication --

    def cmd_LOGIN(self, tag: str, args: list) -> str:
        if self.user is not None:
            raise _Bad("Already authenticated")
        if len(args) != 2:
            raise _Bad("LOGIN needs user and password")
        user, password = _text(args[0]), _text(args[1])
        if self.fake.users.get(user) == password:
            self.user = user
            return "OK %s authenticated (Success)" % user
        raise _No("[AUTHENTICATIONFAILED] Invalid credentials (Failure)")

    def cmd_AUTHENTICATE(self, tag: str, args: list) -> str:
        # SASL as Gmail does it (RFC 4959 SASL-IR; XOAUTH2 per Google's documentation): on a bad
        # token the server sends a JSON challenge and the client MUST answer with an empty line,
        # after which the server says NO. Anything else in that answer is a client bug.
        fake = self.fake
        if self.user is not None:
            raise _Bad("Already authenticated")
        if not args or not isinstance(args[0], Atom) or len(args) > 2:
            raise _Bad("AUTHENTICATE needs a mechanism")
        mech = args[0].upper()
        allowed = ("XOAUTH2", "PLAIN", "OAUTHBEARER") if fake.gmail else ("PLAIN",)
        if mech not in allowed:
            raise _No("Unsupported authentication mechanism")
        if len(args) == 2:
            if not fake.gmail:
                raise _Bad("SASL-IR not supported")
            initial = _text(args[1]).encode("ascii", "replace")
            initial = b"" if initial == b"=" else initial
        else:
            self._flush()
            self._send(b"+ \r\n")
            initial = self._read_continuation()
        if initial == b"*":
            raise _Bad("AUTHENTICATE cancelled")
        try:
            data = base64.b64decode(initial, validate=True)
        except ValueError:
            fake.sasl_errors.append(initial)
            raise _Bad("Invalid SASL argument") from None
        user, ok = self._check_sasl(mech, data)
        if ok:
            self.user = user
            return "OK %s authenticated (Success)" % user
        if mech == "PLAIN":
            raise _No("[AUTHENTICATIONFAILED] Invalid credentials (Failure)")
        challenge = json.dumps({"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"},
                               separators=(",", ":")).encode("ascii")
        self._send(b"+ " + base64.b64encode(challenge) + b"\r\n")
        answer = self._read_continuation()
        if answer == b"":
            raise _No("[AUTHENTICATIONFAILED] Invalid credentials (Failure)")
        fake.sasl_errors.append(answer)
        raise _Bad("Invalid SASL argument")

    def _check_sasl(self, mech: str, data: bytes) -> Tuple[str, bool]:
        fake = self.fake
        text = data.decode("utf-8", "replace")
        if mech == "PLAIN":
            parts = text.split("\0")
            if len(parts) != 3:
                return "", False
            return parts[1], fake.users.get(parts[1]) == parts[2] and parts[1] != ""
        if mech == "XOAUTH2":
            if not text.endswith("\x01\x01"):
                return "", False
            kv = dict(p.split("=", 1) for p in text[:-2].split("\x01") if "=" in p)
            user = kv.get("user", "")
        else:  # OAUTHBEARER (RFC 7628): "n,a=user,\x01auth=Bearer tok\x01\x01"
            gs2, _, rest = text.partition("\x01")
            m = re.search(r"(?:^|,)a=([^,]*)", gs2)
            user = m.group(1).replace("=2C", ",").replace("=3D", "=") if m else ""
            kv = dict(p.split("=", 1) for p in rest.rstrip("\x01").split("\x01") if "=" in p)
        auth = kv.get("auth", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        return user, token is not None and fake.tokens.get(user) == token

    # -- authenticated state --

    def cmd_ENABLE(self, tag: str, args: list) -> str:
        if not args:
            raise _Bad("ENABLE needs arguments")
        names = [_text(a).upper() for a in args]
        new = [n for n in names if n in ("UTF8=ACCEPT", "CONDSTORE") and n not in self.enabled]
        self.enabled.update(new)
        self._u("* ENABLED" + "".join(" " + n for n in new))
        return "OK Success"

    def cmd_NAMESPACE(self, tag: str, args: list) -> str:
        self._u(b"* NAMESPACE ((" + _quoted(self.fake.prefix) + b" " + _quoted(self.fake.delimiter)
                + b")) NIL NIL")
        return "OK Success"

    def cmd_COMPRESS(self, tag: str, args: list) -> str:
        raise _No("[CANNOT] COMPRESS is not implemented by the fake")

    def cmd_SUBSCRIBE(self, tag: str, args: list) -> str:
        return "OK Success"

    def cmd_UNSUBSCRIBE(self, tag: str, args: list) -> str:
        return "OK Success"

    def cmd_LIST(self, tag: str, args: list) -> str:
        return self._list(args, "LIST")

    def cmd_XLIST(self, tag: str, args: list) -> str:
        return self._list(args, "XLIST")

    def cmd_LSUB(self, tag: str, args: list) -> str:
        return self._list(args, "LSUB")

    def _list(self, args: list, verb: str) -> str:
        fake = self.fake
        toks = list(args)
        select_opts: List[str] = []
        if toks and isinstance(toks[0], list):
            if verb != "LIST":
                raise _Bad("Selection options only with LIST")
            select_opts = [_text(o).upper() for o in toks[0]]
            toks = toks[1:]
        if len(toks) < 2:
            raise _Bad("%s needs reference and mailbox" % verb)
        ref = self._mailbox(toks[0]) if _text(toks[0]) else ""
        pats = toks[1] if isinstance(toks[1], list) else [toks[1]]
        status_items: List[str] = []
        if len(toks) > 2:
            if len(toks) != 4 or _text(toks[2]).upper() != "RETURN" or not isinstance(toks[3], list):
                raise _Bad("Invalid LIST arguments")
            opts = toks[3]
            for i, o in enumerate(opts):
                if isinstance(o, Atom) and o.upper() == "STATUS" and i + 1 < len(opts) and isinstance(opts[i + 1], list):
                    status_items = [_text(x).upper() for x in opts[i + 1]]
        patterns = [ref + self._mailbox(p) for p in pats]
        delim = fake.delimiter
        if len(patterns) == 1 and patterns[0] == "":
            self._u(b"* %s (\\Noselect) %s \"\"" % (verb.encode(), _quoted(delim)))
            return "OK Success"
        names = fake._sorted_folder_names()
        for name in names:
            folder = fake._folders[name]
            if not any(self._list_match(p, name, delim) for p in patterns):
                continue
            special = folder.special if fake.special_use else ""
            if "SPECIAL-USE" in select_opts and not special:
                continue
            has_children = any(n.startswith(name + delim) for n in names)
            attrs = ["\\HasChildren" if has_children else "\\HasNoChildren"]
            if not folder.selectable:
                attrs.append("\\Noselect")
            if special:
                attrs.append(_XLIST_ATTR.get(special, special) if verb == "XLIST" else special)
            if verb == "XLIST" and name == "INBOX":
                attrs.append("\\Inbox")
            shown = name if "raw-utf8-names" in fake.quirks else imap_utf7_encode(name)
            if "raw-utf8-names" in fake.quirks and not shown.isascii():
                wire = b'"' + shown.encode("utf-8", "surrogateescape") + b'"'   # not even a literal
            else:
                wire = _quoted(shown)
            self._u(b"* %s (%s) %s %s" % (verb.encode(), " ".join(attrs).encode(), _quoted(delim), wire))
            if status_items and folder.selectable:
                self._u(self._status_line(folder, status_items))
        return "OK Success"

    @staticmethod
    def _list_match(pattern: str, name: str, delim: str = "/") -> bool:
        rx = "".join(".*" if c == "*" else "[^%s]*" % re.escape(delim) if c == "%" else re.escape(c)
                     for c in pattern)
        if re.fullmatch(rx, name, re.S):
            return True
        return name == "INBOX" and re.fullmatch(rx, name, re.S | re.I) is not None

    def _status_line(self, folder: _Folder, items: List[str]) -> bytes:
        msgs = self.fake._msgs
        vals = []
        for item in items:
            if item == "MESSAGES":
                v = len(folder.uids)
            elif item == "RECENT":
                v = 0
            elif item == "UIDNEXT":
                v = folder.uidnext
            elif item == "UIDVALIDITY":
                v = folder.uidvalidity
            elif item == "UNSEEN":
                v = sum(1 for mid in folder.uids.values() if "\\Seen" not in msgs[mid].flags)
            elif item == "HIGHESTMODSEQ":
                v = self.fake._modseq
            else:
                raise _Bad("Unknown STATUS item %s" % item)
            vals.append("%s %d" % (item, v))
        name = folder.name if "raw-utf8-names" in self.fake.quirks else imap_utf7_encode(folder.name)
        return b"* STATUS " + _quoted(name) + b" (" + " ".join(vals).encode() + b")"

    def cmd_STATUS(self, tag: str, args: list) -> str:
        if len(args) != 2 or not isinstance(args[1], list) or not args[1]:
            raise _Bad("STATUS needs a mailbox and a list of items")
        name = self._mailbox(args[0])
        folder = self.fake._folders.get(name)
        if folder is None or not folder.selectable:
            raise _No("[NONEXISTENT] Unknown Mailbox: %s (Failure)" % name)
        items = [_text(x).upper() for x in args[1]]
        if "status-other-first" in self.fake.quirks:
            # Any untagged response may come at any time (RFC 3501 §7): here a STATUS for
            # another folder whose numbers never change.
            self._u(b'* STATUS "Elsewhere" (' + " ".join("%s 1" % i for i in items).encode() + b")")
        self._u(self._status_line(folder, items))
        return "OK Success"

    def cmd_CREATE(self, tag: str, args: list) -> str:
        fake = self.fake
        if len(args) != 1:
            raise _Bad("CREATE needs a mailbox name")
        name = self._mailbox(args[0]).rstrip(fake.delimiter)
        if not name:
            raise _Bad("Empty mailbox name")
        if name in fake._folders:
            raise _No("[ALREADYEXISTS] Folder name conflicts with existing folder name. (Failure)")
        if fake.prefix and not name.startswith(fake.prefix):
            raise _No("Invalid mailbox name.")     # what Courier says: no folder, no cause
        if fake.gmail and (name.startswith(fake._special_root + "/") or name.startswith("\\")):
            raise _No("[CANNOT] Folder name is not allowed. (Failure)")
        fake._ensure_folder(name)
        return "OK Success"

    def cmd_DELETE(self, tag: str, args: list) -> str:
        fake = self.fake
        if len(args) != 1:
            raise _Bad("DELETE needs a mailbox name")
        name = self._mailbox(args[0])
        folder = fake._folders.get(name)
        if folder is None:
            raise _No("[NONEXISTENT] Unknown Mailbox: %s (Failure)" % name)
        if folder.kind not in ("label", "plain") or name == "INBOX":
            raise _No("[CANNOT] Cannot delete system folder (Failure)")
        fake._delete_folder(name)
        return "OK Success"

    def cmd_SELECT(self, tag: str, args: list) -> str:
        return self._select(args, readonly=False)

    def cmd_EXAMINE(self, tag: str, args: list) -> str:
        return self._select(args, readonly=True)

    def _select(self, args: list, readonly: bool) -> str:
        fake = self.fake
        self.selected, self.known, self.known_flags = None, [], {}
        if not args or len(args) > 2:
            raise _Bad("SELECT needs a mailbox name")
        name = self._mailbox(args[0])
        folder = fake._folders.get(name)
        if folder is None or not folder.selectable:
            raise _No("[NONEXISTENT] Unknown Mailbox: %s (Failure)" % name)
        self.selected, self.readonly = name, readonly
        self.known = list(folder.uids)
        self.known_flags = {u: frozenset(fake._msgs[m].flags) for u, m in folder.uids.items()}
        keywords = sorted({f for m in folder.uids.values() for f in fake._msgs[m].flags if not f.startswith("\\")}
                          - {"$NotPhishing", "$Phishing"})
        flags = _GMAIL_FLAGS + "".join(" " + k for k in keywords)
        self._u("* FLAGS (%s)" % flags)
        self._u("* OK [PERMANENTFLAGS (%s)] Flags permitted." % ("" if readonly else flags + " \\*"))
        self._u("* OK [UIDVALIDITY %d] UIDs valid." % folder.uidvalidity)
        self._u("* %d EXISTS" % len(self.known))
        self._u("* 0 RECENT")
        self._u("* OK [UIDNEXT %d] Predicted next UID." % folder.uidnext)
        if fake.gmail:
            self._u("* OK [HIGHESTMODSEQ %d]" % fake._modseq)
        shown = "Mailbox" if "raw-utf8-names" in fake.quirks else imap_utf7_encode(name)
        return "OK [%s] %s selected. (Success)" % ("READ-ONLY" if readonly else "READ-WRITE", shown)

    def cmd_APPEND(self, tag: str, args: list) -> str:
        fake = self.fake
        if len(args) < 2 or not isinstance(args[-1], bytes):
            raise _Bad("APPEND needs a mailbox and a message literal")
        name = self._mailbox(args[0])
        flags: List[str] = []
        date = None
        for extra in args[1:-1]:
            if isinstance(extra, list):
                flags = [self._flag(f) for f in extra]
            else:
                date = _parse_internaldate(_text(extra))
        folder = fake._folders.get(name)
        if folder is None or not folder.selectable:
            raise _No("[TRYCREATE] Folder doesn't exist. (Failure)")
        if len(args[-1]) > 35651584:
            raise _No("[TOOBIG] Message too large. (Failure)")
        msgid = fake._add(args[-1], labels=(), flags=flags, date=date, folder=name)
        uid = folder.by_msgid.get(msgid)
        if fake.uidplus and uid is not None:
            return "OK [APPENDUID %d %d] (Success)" % (folder.uidvalidity, uid)
        return "OK (Success)"

    def cmd_IDLE(self, tag: str, args: list) -> str:
        # RFC 2177: "+ idling", then push updates until the client sends DONE.
        fake = self.fake
        if args:
            raise _Bad("IDLE takes no arguments")
        self._flush()
        self._send(b"+ idling\r\n")
        seen = -1
        while True:
            ready = b"\n" in self._buf or (self.tls and self.sock.pending())
            if not ready:
                ready = bool(select.select([self.sock], [], [], 0.02)[0])
            if ready:
                line = self._read_continuation()
                if line.upper() == b"DONE":
                    return "OK IDLE terminated (Success)"
                raise _Bad("Expected DONE while idling")
            with fake._cond:
                fake._cond.wait_for(lambda: fake._version != seen, timeout=0.02)
                seen = fake._version
                self._announce(expunge=True)
            self._flush()

    # -- selected state --

    def cmd_CLOSE(self, tag: str, args: list) -> str:
        fake = self.fake
        folder = fake._folders.get(self.selected or "")
        if folder is not None and not self.readonly and not fake.gmail:
            doomed = [mid for mid in folder.uids.values() if "\\Deleted" in fake._msgs[mid].flags]
            fake._expunge(folder, doomed)
        self.selected, self.known, self.known_flags = None, [], {}
        return "OK Returned to authenticated state. (Success)"

    def cmd_UNSELECT(self, tag: str, args: list) -> str:
        self.selected, self.known, self.known_flags = None, [], {}
        return "OK Returned to authenticated state. (Success)"

    def cmd_FETCH(self, tag: str, args: list) -> str:
        return self._fetch(args, by_uid=False)

    def cmd_UID_FETCH(self, tag: str, args: list) -> str:
        return self._fetch(args, by_uid=True)

    def _fetch_items(self, tok: Any) -> List[str]:
        raw = tok if isinstance(tok, list) else [tok]
        if not raw or not all(isinstance(t, Atom) for t in raw):
            raise _Bad("Invalid FETCH items")
        items = [t.upper() for t in raw]
        if len(items) == 1 and items[0] in _FETCH_MACROS and not isinstance(tok, list):
            items = list(_FETCH_MACROS[items[0]])
        for item in items:
            if item in _FETCH_SIMPLE:
                if item.startswith("X-GM-"):
                    self._require_gmail(item)
                continue
            m = _FETCH_SECTION.fullmatch(item)
            if not m:
                raise _Bad("Unknown FETCH item %s" % item)
            _parse_section(m.group(2))
        return items

    def _fetch(self, args: list, by_uid: bool) -> str:
        fake = self.fake
        if len(args) not in (2, 3):
            raise _Bad("FETCH needs a set and items")
        items = self._fetch_items(args[1])
        changedsince = None
        if len(args) == 3:
            mods = args[2]
            if (not isinstance(mods, list) or len(mods) != 2 or _text(mods[0]).upper() != "CHANGEDSINCE"
                    or not _text(mods[1]).isdigit()):
                raise _Bad("Invalid FETCH modifier")
            changedsince = int(_text(mods[1]))
        targets = self._targets(args[0], by_uid)
        changed = []
        quirky = fake.quirks if fake.quirk_msgids is None else set()
        viewed = self._folder()
        own_label = viewed.label if viewed.kind == "label" else _FOLDER_LABEL.get(viewed.kind)
        for seq, uid, msg in targets:
            if changedsince is not None and msg.modseq <= changedsince:
                continue
            if fake.quirk_msgids is not None:
                quirky = fake.quirks if msg.msgid in fake.quirk_msgids else set()
            parts: List[bytes] = []
            sets_seen = False
            if by_uid and "UID" not in items:
                parts.append(b"UID %d" % uid)
            root = _Part(msg.raw) if any(i.startswith(("BODY", "ENVELOPE")) for i in items) else None
            for item in items:
                if item == "UID":
                    parts.append(b"UID %d" % uid)
                elif item == "FLAGS":
                    if "omit-flags" not in quirky:
                        parts.append(None)  # filled below, after \Seen may have been set
                elif item == "INTERNALDATE":
                    parts.append(b'INTERNALDATE "%s"' % _internaldate(msg.date).encode())
                elif item == "RFC822.SIZE":
                    parts.append(b"RFC822.SIZE %d" % len(msg.raw))
                elif item == "ENVELOPE":
                    parts.append(b"ENVELOPE " + _envelope(root))
                elif item == "BODYSTRUCTURE":
                    parts.append(b"BODYSTRUCTURE " + _bodystructure(root, True))
                elif item == "BODY":
                    parts.append(b"BODY " + _bodystructure(root, False))
                elif item == "RFC822":
                    parts.append(b"RFC822 " + _literal(msg.raw))
                    sets_seen = True
                elif item == "RFC822.HEADER":
                    parts.append(b"RFC822.HEADER " + _literal(_split_header(msg.raw)[0]))
                elif item == "RFC822.TEXT":
                    parts.append(b"RFC822.TEXT " + _literal(_split_header(msg.raw)[1]))
                    sets_seen = True
                elif item == "MODSEQ":
                    parts.append(b"MODSEQ (%d)" % msg.modseq)
                elif item == "X-GM-MSGID":
                    parts.append(b"X-GM-MSGID %d" % msg.msgid)
                elif item == "X-GM-THRID":
                    parts.append(b"X-GM-THRID %d" % msg.thrid)
                elif item == "X-GM-LABELS":
                    if "omit-labels" not in quirky:
                        # Gmail leaves out the label of the folder being viewed (\Inbox in INBOX).
                        parts.append(b"X-GM-LABELS " + _labels_bytes(fake._labels_of(msg) - {own_label}))
                else:
                    m = _FETCH_SECTION.fullmatch(item)
                    nums, kind, fields, echo = _parse_section(m.group(2))
                    data = _section_bytes(root, msg.raw, nums, kind, fields)
                    origin = ""
                    if m.group(3) is not None:
                        start = int(m.group(3))
                        length = int(m.group(4)) if m.group(4) is not None else len(data)
                        data = data[start:start + length]
                        origin = "<%d>" % start
                        if "omit-body" in quirky:
                            continue
                    if kind == "HEADER.FIELDS":
                        if "omit-header" in quirky:
                            continue
                        if "quoted-header-fields" in quirky:
                            echo = echo.replace("HEADER.FIELDS (%s)" % " ".join(fields), "header.fields (%s)" % " ".join(
                                '"%s"' % f.lower() for f in reversed(fields)))
                        if "nil-header" in quirky:
                            parts.append(("BODY[%s]%s NIL" % (echo, origin)).encode())
                            continue
                    parts.append(("BODY[%s]%s " % (echo, origin)).encode() + _literal(data))
                    if m.group(1) == "BODY":
                        sets_seen = True
            if sets_seen and not self.readonly and "\\Seen" not in msg.flags:
                msg.flags.add("\\Seen")
                changed.append(msg.msgid)
                if "FLAGS" not in items:
                    parts.append(None)
            if None in parts:
                self.known_flags[uid] = frozenset(msg.flags)
                parts = [b"FLAGS " + _flags_bytes(msg.flags) if p is None else p for p in parts]
            self._u(b"* %d FETCH (" % seq + b" ".join(parts) + b")")
        if changed:
            fake._changed(changed)
        return "OK Success"

    def cmd_STORE(self, tag: str, args: list) -> str:
        return self._store(args, by_uid=False)

    def cmd_UID_STORE(self, tag: str, args: list) -> str:
        return self._store(args, by_uid=True)

    def _flag(self, tok: Any) -> str:
        if not isinstance(tok, Atom):
            raise _Bad("Flags must be atoms")
        try:
            return _canon_flag(str(tok))
        except ValueError as e:
            raise _Bad(str(e)) from None

    def _label(self, tok: Any) -> str:
        if isinstance(tok, Atom) and not tok.startswith("\\") and re.search(r"[\[\]*%&]", tok):
            # Gmail misreads such atoms (a * or brackets unquoted): a client must quote them.
            raise _Bad("Label %r must be quoted" % str(tok))
        text = _text(tok)
        if text.isascii():
            try:
                text = imap_utf7_decode(text)
            except ValueError:
                raise _Bad("Invalid label %r (modified UTF-7 expected)" % text) from None
        try:
            return _canon_label(text)
        except ValueError as e:
            raise _Bad(str(e)) from None

    def _store(self, args: list, by_uid: bool) -> str:
        fake = self.fake
        if len(args) < 3 or not isinstance(args[1], Atom):
            raise _Bad("STORE needs a set, an item and values")
        m = re.fullmatch(r"([+-]?)(FLAGS|X-GM-LABELS)(\.SILENT)?", args[1].upper())
        if not m:
            raise _Bad("Unknown STORE item %s" % args[1])
        op, what, silent = m.group(1), m.group(2), bool(m.group(3))
        values = args[2] if len(args) == 3 and isinstance(args[2], list) else args[2:]
        if what == "X-GM-LABELS":
            self._require_gmail("X-GM-LABELS")
            new = [self._label(v) for v in values]
        else:
            new = [self._flag(v) for v in values]
        self._require_rw("STORE")
        targets = self._targets(args[0], by_uid)
        for seq, uid, msg in targets:
            if what == "FLAGS":
                if op == "+":
                    msg.flags.update(new)
                elif op == "-":
                    msg.flags.difference_update(new)
                else:
                    msg.flags = set(new)
            else:
                if op == "":
                    for label in list(msg.labels):
                        if label not in new:
                            fake._apply_label(msg, label, add=False)
                for label in new:
                    fake._apply_label(msg, label, add=op != "-")
        if targets:
            fake._changed([msg.msgid for _, _, msg in targets])
        for seq, uid, msg in targets:
            if what == "FLAGS":
                self.known_flags[uid] = frozenset(msg.flags)
            if silent:
                continue
            item = (b"FLAGS " + _flags_bytes(msg.flags)) if what == "FLAGS" else (
                b"X-GM-LABELS " + _labels_bytes(fake._labels_of(msg)))
            self._u(b"* %d FETCH (" % seq + (b"UID %d " % uid if by_uid else b"") + item + b")")
        return "OK Success"

    def cmd_COPY(self, tag: str, args: list) -> str:
        return self._copy(args, by_uid=False, move=False)

    def cmd_UID_COPY(self, tag: str, args: list) -> str:
        return self._copy(args, by_uid=True, move=False)

    def cmd_MOVE(self, tag: str, args: list) -> str:
        return self._copy(args, by_uid=False, move=True)

    def cmd_UID_MOVE(self, tag: str, args: list) -> str:
        return self._copy(args, by_uid=True, move=True)

    def _copy(self, args: list, by_uid: bool, move: bool) -> str:
        # RFC 4315 (COPYUID) and RFC 6851 (MOVE: "* OK [COPYUID ...]", EXPUNGEs, tagged OK).
        fake = self.fake
        if len(args) != 2:
            raise _Bad("%s needs a set and a mailbox" % ("MOVE" if move else "COPY"))
        dest = fake._folders.get(self._mailbox(args[1]))
        if dest is None or not dest.selectable:
            raise _No("[TRYCREATE] Folder doesn't exist. (Failure)")
        if move:
            self._require_rw("MOVE")
        source = self._folder()
        targets = self._targets(args[0], by_uid)
        pairs = fake._copy_messages(source, dest, [msg for _, _, msg in targets], move)
        src_uids = [uid for (_, uid, msg), ok in zip(targets, pairs) if ok is not None]
        dst_uids = [p for p in pairs if p is not None]
        code = ""
        if fake.uidplus and src_uids:
            code = "[COPYUID %d %s %s] " % (dest.uidvalidity, _compress_uids(src_uids), _compress_uids(dst_uids))
        if move:
            if code:
                self._u("* OK %s(Success)" % code)
            return "OK Done"
        return "OK %sDone" % code

    def cmd_EXPUNGE(self, tag: str, args: list) -> str:
        if args:
            raise _Bad("EXPUNGE takes no arguments")
        return self._expunge(None)

    def cmd_UID_EXPUNGE(self, tag: str, args: list) -> str:
        if len(args) != 1:
            raise _Bad("UID EXPUNGE needs a UID set")
        return self._expunge(args[0])

    def _expunge(self, setspec: Any) -> str:
        self._require_rw("EXPUNGE")
        folder = self._folder()
        if setspec is None:
            msgs = [self.fake._msgs[mid] for mid in folder.uids.values()]
        else:
            msgs = [msg for _, _, msg in self._targets(setspec, by_uid=True)]
        self.fake._expunge(folder, [m.msgid for m in msgs if "\\Deleted" in m.flags])
        return "OK Success"

    def cmd_SEARCH(self, tag: str, args: list) -> str:
        return self._search(tag, args, by_uid=False)

    def cmd_UID_SEARCH(self, tag: str, args: list) -> str:
        return self._search(tag, args, by_uid=True)

    def _search(self, tag: str, args: list, by_uid: bool) -> str:
        fake = self.fake
        toks = list(args)
        returns: Optional[List[str]] = None
        if toks and isinstance(toks[0], Atom) and toks[0].upper() == "RETURN":
            if "ESEARCH" not in self._capabilities(authenticated=True):
                raise _Bad("SEARCH RETURN needs ESEARCH")
            if len(toks) < 2 or not isinstance(toks[1], list):
                raise _Bad("RETURN needs a list")
            returns = [_text(o).upper() for o in toks[1]] or ["ALL"]
            if not set(returns) <= {"MIN", "MAX", "COUNT", "ALL"}:
                raise _Bad("Unknown RETURN option")
            toks = toks[2:]
        charset = "utf-8"
        if toks and isinstance(toks[0], Atom) and toks[0].upper() == "CHARSET":
            if len(toks) < 2:
                raise _Bad("CHARSET needs a name")
            charset = _text(toks[1]).lower()
            if charset not in ("utf-8", "us-ascii"):
                raise _No("[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset (Failure)")
            toks = toks[2:]
        if not toks:
            raise _Bad("SEARCH needs criteria")
        folder = self._folder()
        self._search_ctx = (folder, charset)
        pred = self._compile_all(toks)
        found = []
        for seq, uid in enumerate(self.known, 1):
            mid = folder.uids.get(uid)
            if mid is not None and pred(fake._msgs[mid], uid, seq):
                found.append(uid if by_uid else seq)
        if returns is None:
            self._u("* SEARCH" + "".join(" %d" % n for n in found))
            return "OK SEARCH completed (Success)"
        out = '* ESEARCH (TAG "%s")%s' % (tag, " UID" if by_uid else "")
        if found and "MIN" in returns:
            out += " MIN %d" % min(found)
        if found and "MAX" in returns:
            out += " MAX %d" % max(found)
        if "COUNT" in returns:
            out += " COUNT %d" % len(found)
        if found and "ALL" in returns:
            out += " ALL " + _compress_uids(sorted(found))
        self._u(out)
        return "OK SEARCH completed (Success)"

    def _compile_all(self, toks: list) -> Callable[[FakeMessage, int, int], bool]:
        preds = []
        i = 0
        while i < len(toks):
            p, i = self._search_key(toks, i)
            preds.append(p)
        return lambda m, u, s: all(p(m, u, s) for p in preds)

    def _search_key(self, toks: list, i: int) -> Tuple[Callable[[FakeMessage, int, int], bool], int]:
        # RFC 3501 6.4.4 search keys, plus Gmail's X-GM-RAW / X-GM-MSGID / X-GM-THRID / X-GM-LABELS.
        fake = self.fake
        folder, charset = self._search_ctx
        tok = toks[i]
        i += 1
        if isinstance(tok, list):
            if not tok:
                raise _Bad("Empty search group")
            return self._compile_all(tok), i
        if not isinstance(tok, Atom):
            raise _Bad("Unexpected string in SEARCH")
        key = tok.upper()

        def arg() -> Any:
            nonlocal i
            if i >= len(toks):
                raise _Bad("Missing argument for %s" % key)
            i += 1
            return toks[i - 1]

        def sarg() -> str:
            v = arg()
            if isinstance(v, list):
                raise _Bad("Expected a string for %s" % key)
            if isinstance(v, bytes):
                try:
                    return v.decode(charset)
                except UnicodeDecodeError:
                    raise _Bad("String not in %s" % charset) from None
            return str(v)

        flag_keys = {"ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
                     "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
                     "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
                     "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
                     "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False), "NEW": ("\\Seen", False)}
        if key in flag_keys:
            flag, want = flag_keys[key]
            return (lambda m, u, s: (flag in m.flags) == want), i
        if key in ("ALL", "OLD"):
            return (lambda m, u, s: True), i
        if key == "RECENT":
            return (lambda m, u, s: False), i
        if key in ("KEYWORD", "UNKEYWORD"):
            kw = sarg()
            want = key == "KEYWORD"
            return (lambda m, u, s: (kw in m.flags) == want), i
        if key == "UID":
            ns = _NumSet(sarg(), star=max(folder.uids) if folder.uids else 0)
            return (lambda m, u, s: u in ns), i
        if re.fullmatch(r"[0-9*:,]+", key):
            ns = _NumSet(key, star=len(self.known))
            return (lambda m, u, s: s in ns), i
        if key in ("SINCE", "BEFORE", "ON", "SENTSINCE", "SENTBEFORE", "SENTON"):
            day = _parse_search_date(sarg())
            sent = key.startswith("SENT")
            cmp = {"SINCE": lambda d: d >= day, "BEFORE": lambda d: d < day, "ON": lambda d: d == day}[key[4:] if sent else key]
            if sent:
                return (lambda m, u, s: cmp(_sent_date(fake._parsed(m), m.date))), i
            return (lambda m, u, s: cmp(m.date.date())), i
        if key in ("LARGER", "SMALLER"):
            n = sarg()
            if not n.isdigit():
                raise _Bad("%s needs a number" % key)
            size = int(n)
            if key == "LARGER":
                return (lambda m, u, s: len(m.raw) > size), i
            return (lambda m, u, s: len(m.raw) < size), i
        if key in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
            needle = sarg().casefold()
            return (lambda m, u, s: needle in _decoded_header(fake._parsed(m), key).casefold()), i
        if key == "HEADER":
            hname, needle = sarg(), sarg().casefold()
            return (lambda m, u, s: fake._parsed(m).get(hname) is not None
                    and needle in _decoded_header(fake._parsed(m), hname).casefold()), i
        if key == "BODY":
            needle = sarg().casefold()
            return (lambda m, u, s: needle in _body_text(fake._parsed(m)).casefold()), i
        if key == "TEXT":
            needle = sarg().casefold()
            return (lambda m, u, s: needle in (_split_header(m.raw)[0].decode("utf-8", "replace") + " "
                                               + fake._search_text(m)).casefold()), i
        if key == "NOT":
            p, i = self._search_key(toks, i)
            return (lambda m, u, s: not p(m, u, s)), i
        if key == "OR":
            p1, i = self._search_key(toks, i)
            p2, i = self._search_key(toks, i)
            return (lambda m, u, s: p1(m, u, s) or p2(m, u, s)), i
        if key in ("X-GM-RAW", "X-GM-MSGID", "X-GM-THRID", "X-GM-LABELS"):
            self._require_gmail(key)
            value = sarg()
            if key == "X-GM-RAW":
                return self._gmail_raw(value), i
            if key == "X-GM-LABELS":
                label = self._label(value.encode("utf-8"))
                return (lambda m, u, s: label in fake._labels_of(m)), i
            if not value.isdigit():
                raise _Bad("%s needs a number" % key)
            n = int(value)
            attr = "msgid" if key == "X-GM-MSGID" else "thrid"
            return (lambda m, u, s: getattr(m, attr) == n), i
        raise _Bad("Unknown search key %s" % key)

    def _gmail_raw(self, query: str) -> Callable[[FakeMessage, int, int], bool]:
        """Compile a Gmail search query (a useful subset) into a predicate.

        Grammar: query := and+ ; and := unary ("OR" unary)* ; unary := "-" unary | "(" query ")" | term.
        """
        tokens = _GM_TOKEN.findall(query)
        pos = 0

        def parse_query(stop: Optional[str]) -> Callable:
            nonlocal pos
            preds = []
            while pos < len(tokens) and tokens[pos] != stop:
                preds.append(parse_or())
            if stop is not None:
                if pos >= len(tokens):
                    raise _Bad("Unbalanced '(' in X-GM-RAW")
                pos += 1
            return lambda m: all(p(m) for p in preds)

        def parse_or() -> Callable:
            nonlocal pos
            preds = [parse_unary()]
            while pos + 1 < len(tokens) and tokens[pos] == "OR":
                pos += 1
                preds.append(parse_unary())
            return preds[0] if len(preds) == 1 else (lambda m: any(p(m) for p in preds))

        def parse_unary() -> Callable:
            nonlocal pos
            tok = tokens[pos]
            pos += 1
            if tok == "(":
                return parse_query(")")
            if tok == ")":
                raise _Bad("Unbalanced ')' in X-GM-RAW")
            if tok == "-" and pos < len(tokens) and tokens[pos] == "(":     # -(a b): not both
                inner = parse_unary()
                return lambda m: not inner(m)
            if tok.startswith("-") and len(tok) > 1:
                tokens[pos - 1] = tok[1:]
                pos -= 1
                inner = parse_unary()
                return lambda m: not inner(m)
            return self._gmail_term(tok)

        pred = parse_query(None)
        return lambda m, u, s: pred(m)

    def _gmail_term(self, tok: str) -> Callable[[FakeMessage], bool]:
        fake = self.fake
        op, _, value = tok.partition(":")
        op = op.lower()
        known_ops = {"from", "to", "cc", "bcc", "subject", "label", "in", "has", "is", "older_than",
                     "newer_than", "larger", "smaller", "size", "after", "before", "rfc822msgid"}
        if not value or op not in known_ops or tok.startswith('"'):
            word = tok.strip('"').casefold()
            return lambda m: word in fake._search_text(m).casefold()
        value = value.strip('"')
        v = value.casefold()
        parsed = fake._parsed
        if op in ("from", "to", "cc", "bcc", "subject"):
            headers = {"from": ("From",), "to": ("To", "Cc", "Bcc"), "cc": ("Cc",), "bcc": ("Bcc",),
                       "subject": ("Subject",)}[op]
            return lambda m: any(v in _decoded_header(parsed(m), h).casefold() for h in headers)
        if op == "rfc822msgid":
            return lambda m: v.strip("<>") in _decoded_header(parsed(m), "Message-ID").casefold()
        if op in ("label", "in"):
            key = _label_key(value)
            system = {"inbox": "\\Inbox", "trash": "\\Trash", "spam": "\\Spam", "sent": "\\Sent",
                      "draft": "\\Draft", "drafts": "\\Draft", "important": "\\Important",
                      "starred": "\\Starred"}
            if key == "anywhere":
                return lambda m: True
            if key in system:
                label = system[key]
                if label in ("\\Trash", "\\Spam"):
                    return lambda m: label in m.labels
                return lambda m: label in fake._labels_of(m) and not m.labels & {"\\Trash", "\\Spam"}
            return lambda m: any(_label_key(l) == key for l in m.labels if not l.startswith("\\"))
        if op == "is":
            checks = {"unread": lambda m: "\\Seen" not in m.flags, "read": lambda m: "\\Seen" in m.flags,
                      "starred": lambda m: "\\Flagged" in m.flags, "flagged": lambda m: "\\Flagged" in m.flags,
                      "important": lambda m: "\\Important" in m.labels}
            if v not in checks:
                raise _Bad("Unsupported X-GM-RAW term %s" % tok)
            return checks[v]
        if op == "has":
            if v == "attachment":
                return lambda m: _has_attachment(parsed(m))
            if v == "userlabels":
                return lambda m: any(not l.startswith("\\") for l in m.labels)
            if v == "nouserlabels":
                return lambda m: all(l.startswith("\\") for l in m.labels)
            raise _Bad("Unsupported X-GM-RAW term %s" % tok)
        if op in ("older_than", "newer_than"):
            mm = _GM_AGE.fullmatch(value)
            if not mm:
                raise _Bad("Invalid X-GM-RAW term %s" % tok)
            days = int(mm.group(1)) * {"d": 1, "w": 7, "m": 30, "y": 365}[mm.group(2).lower()]
            limit = _dtm.datetime.now(_UTC) - _dtm.timedelta(days=days)
            if op == "older_than":
                return lambda m: m.date < limit
            return lambda m: m.date >= limit
        if op in ("larger", "smaller", "size"):
            mm = _GM_SIZE.fullmatch(value)
            if not mm:
                raise _Bad("Invalid X-GM-RAW term %s" % tok)
            n = int(mm.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[mm.group(2).lower()]
            if op == "larger":
                return lambda m: len(m.raw) > n
            if op == "smaller":
                return lambda m: len(m.raw) < n
            return lambda m: len(m.raw) == n
        # after: / before: YYYY/MM/DD
        mm = re.fullmatch(r"(\d{4})[/-](\d{1,2})[/-](\d{1,2})", value)
        if not mm:
            raise _Bad("Invalid X-GM-RAW term %s" % tok)
        day = _dtm.date(int(mm.group(1)), int(mm.group(2)), int(mm.group(3)))
        if op == "after":
            return lambda m: m.date.date() >= day
        return lambda m: m.date.date() < day


# --- Server ------------------------------------------------------------------------------

@dataclasses.dataclass
class _Fault:
    command: Optional[str]
    nth: int
    action: str
    when: str
    count: int
    delay: float
    text: Optional[str]
    size: int = 0
    burst: int = 0
    seen: int = 0
    callback: Optional[Callable[[], None]] = None


# Hostile behaviours (issue "Hostile input"), each a fault that composes with any server
# mode; ``size`` and ``delay`` tune them:
#   dribble         the whole answer, ``size`` bytes (default 1) every ``delay`` seconds,
#                   after the first ``burst`` bytes at once
#   huge_literal    before the first FETCH answer, one for the same message whose body is a
#                   literal of ``size`` bytes
#   nesting_bomb    the first FETCH answer gets a BODYSTRUCTURE nested ``size`` deep
#   huge_copyuid    a COPY/MOVE answers OK [COPYUID v 1:4294967295 1:4294967295]
#   huge_search     a SEARCH answers ``size`` UIDs whatever the folder holds
#   exists_flood    ``size`` "* n EXISTS" lines before the tagged answer
#   renumber        the selected folder gets a new UIDVALIDITY, then the connection drops
#   starttls_inject plaintext "* OK" sent in the same packet as the STARTTLS OK
#   flood           ``size`` untagged lines (``text``, default "* OK still thinking") before
#                   the tagged answer; size 0: endless, until the client goes away
#   big_list        ``size`` extra LIST answers, each naming a folder of ``burst`` bytes
#   repeat_fetch    the first FETCH answer sent ``size`` times over
#   lying_exists    "* 4294967295 EXISTS" before the answer
# and "unsolicited" injects ``text`` (lines separated by CRLF) when given.  "echo" answers
# without executing: the command line quoted back in an untagged "* NO [ALERT]" and in the
# tagged NO; an AUTHENTICATE first gets a challenge carrying what it sent.
_HOSTILE_ACTIONS = ("dribble", "huge_literal", "nesting_bomb", "huge_copyuid", "huge_search",
                    "exists_flood", "renumber", "starttls_inject", "flood", "big_list",
                    "repeat_fetch", "lying_exists")
# Another client at work in the same folder, just before the command runs (then the command
# runs normally): mark_deleted / unmark_deleted set or clear \Deleted on the message with
# UID ``size`` (0: the first message without / with the flag).  FakeGmail.other_client
# lists what they did: (action, folder, UID).
_OTHER_CLIENT_ACTIONS = ("mark_deleted", "unmark_deleted")
_FAULT_ACTIONS = ("bye", "drop", "reset", "delay", "no", "bad", "garbage",
                  "unsolicited", "call", "echo") + _HOSTILE_ACTIONS + _OTHER_CLIENT_ACTIONS
_FAULT_WHEN = ("before", "after", "mid")


GMAIL_MAX_LINE = 8192   # Gmail refuses longer command lines (literals excluded)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    fake: "FakeGmail"

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.fake.errors.append(traceback.format_exc())  # never print: tests assert on errors


class _OutOfOrderSession(_Session):
    """A server that runs pipelined commands side by side and answers them out of order,
    as Dovecot does: the tagged line of a command named in ``hold`` waits, when the next
    command arrives within ``patience`` seconds, until that one is answered in full (its
    own untagged lines go at once), so a later command's data and OK come first.  The
    fake's ``held`` Counter (if the test gave it one) counts those, per command."""

    hold: Tuple[str, ...] = ()
    patience = 0.3
    _held: Optional[bytes] = None
    _current = ""

    def _dispatch(self, line: bytes, length: int) -> None:
        words = line.split(b" ", 3)
        name = words[1].decode("ascii", "replace").upper() if len(words) > 1 else ""
        if name == "UID" and len(words) > 2:
            name += " " + words[2].decode("ascii", "replace").strip().upper()
        self._current = name
        super()._dispatch(line, length)

    def _next_arrived(self) -> bool:
        if b"\n" in self._buf:
            return True
        ready = select.select([self.sock], [], [], self.patience)[0]
        if ready:
            data = self.sock.recv(65536)
            self._buf += data
            return bool(data)
        return False

    def _send(self, data: bytes) -> None:
        held, self._held = self._held, None
        if held is None and self._current in self.hold and self._next_arrived():
            body = data[:-2]
            cut = body.rfind(b"\r\n") + 2 if b"\r\n" in body else 0
            data, self._held = data[:cut], data[cut:]
            counter = getattr(self.fake, "held", None)
            if counter is not None:
                counter[self._current] += 1
        super()._send(data + (held or b""))


class FakeGmail:
    """A fake Gmail (or plain RFC 3501) IMAP server; see the module docstring.

    Everything the tests read (log, raw_lines, fired, ...) is appended to under one lock.
    """

    CA_PEM = CA_CERT_PEM

    def __init__(self, *, gmail: bool = True, move: bool = True, uidplus: bool = True, idle: bool = True,
                 tls: bool = False, starttls: bool = False, cert: str = "good", localized: bool = False,
                 users: Optional[Dict[str, str]] = None, tokens: Optional[Dict[str, str]] = None,
                 kind: Optional[str] = None, special_use: bool = True, prefix: str = "",
                 delimiter: str = "/", folders: Optional[Sequence[Tuple[str, str]]] = None,
                 quirks: Iterable[str] = (), handler: Optional[type] = None) -> None:
        """Options as named; ``kind`` (a key of SERVER_KINDS) sets several at once, and
        options given beside it with a non-default value override its row (``kind="move",
        delimiter="."``); ``quirks`` are keys of FAKE_QUIRKS;
        ``folders`` replaces the plain-mode folders as (name, special-use) pairs; ``prefix``
        and ``delimiter`` are the personal namespace (plain mode); ``handler`` a subclass
        of _Session that changes one behaviour for one test (see ``use_handler``)."""
        self.handler = handler or _Session
        if kind is not None:
            if kind not in SERVER_KINDS:
                raise ValueError("kind must be one of %s" % ", ".join(SERVER_KINDS))
            given = dict(gmail=gmail, move=move, uidplus=uidplus, special_use=special_use,
                         prefix=prefix, delimiter=delimiter, folders=folders)
            defaults = dict(gmail=True, move=True, uidplus=True, special_use=True, prefix="",
                            delimiter="/", folders=None)
            chosen = dict(defaults, **SERVER_KINDS[kind])
            chosen.update({k: v for k, v in given.items() if v != defaults[k]})
            gmail, move, uidplus = chosen["gmail"], chosen["move"], chosen["uidplus"]
            special_use, prefix, delimiter = chosen["special_use"], chosen["prefix"], chosen["delimiter"]
            folders = chosen["folders"]
        unknown = set(quirks) - set(FAKE_QUIRKS)
        if unknown:
            raise ValueError("unknown quirks %s; known: %s" % (sorted(unknown), ", ".join(FAKE_QUIRKS)))
        if gmail and (prefix or delimiter != "/"):
            raise ValueError("Gmail's namespace is always (\"\" \"/\")")
        self.kind = kind
        self.special_use, self.prefix, self.delimiter = special_use, prefix, delimiter
        self.quirks = set(quirks)
        self.quirk_msgids: Optional[set] = None   # FETCH quirks only for these messages, if set
        if cert not in SERVER_CERTS:
            raise ValueError("cert must be one of %s" % ", ".join(SERVER_CERTS))
        if tls and starttls:
            raise ValueError("choose implicit tls=True or starttls=True, not both")
        self.gmail, self.move, self.uidplus, self.idle = gmail, move, uidplus, idle
        self.tls, self.starttls, self.cert, self.localized = tls, starttls, cert, localized
        self.users = dict(users) if users is not None else {"user@example.com": "abcdabcdabcdabcd"}
        self.tokens = dict(tokens) if tokens is not None else {"user@example.com": "ya29.good-token"}
        self.host = "127.0.0.1"
        self.port = 0
        self.log: List[LogEntry] = []
        self.raw_lines: List[bytes] = []       # every line (and literal) received, in order
        self.long_lines: List[bytes] = []      # commands longer than 8192 octets (excl. literals)
        self.fired: List[Tuple[Optional[str], str, str]] = []
        self.other_client: List[Tuple[str, Optional[str], int]] = []   # see _OTHER_CLIENT_ACTIONS
        self.sasl_errors: List[bytes] = []     # non-empty answers to a SASL failure challenge etc.
        self.errors: List[str] = []            # tracebacks of bugs in the fake (should stay empty)
        self._cond = threading.Condition(threading.RLock())
        self._version = 0
        self._modseq = 1
        self._msgs: Dict[int, FakeMessage] = {}
        self._folders: Dict[str, _Folder] = {}
        self._parsed_cache: Dict[int, email.message.Message] = {}
        self._thread_ids: Dict[str, int] = {}
        self._faults: List[_Fault] = []
        self._sessions: Dict[int, _Session] = {}
        self._next_session = 1
        self._next_msgid = 1700000000000000001
        self._next_uidvalidity = 11
        self._server: Optional[_TCPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._ssl_context: Optional[ssl.SSLContext] = None
        self._special_root = "[Google Mail]" if localized else "[Gmail]"
        with self._cond:
            if gmail:
                self._new_folder("INBOX", "inbox")
                self._new_folder(self._special_root, "noselect")
                for kind, special, english, german in _GMAIL_SPECIAL:
                    self._new_folder("%s/%s" % (self._special_root, german if localized else english),
                                     kind, special)
            else:
                for name, special in (folders if folders is not None else _PLAIN_FOLDERS):
                    if prefix and name != "INBOX" and not name.startswith(prefix):
                        name = prefix + name
                    self._new_folder(name, "plain", special)

    # -- lifecycle --

    def start(self) -> "FakeGmail":
        """Listen on 127.0.0.1:<ephemeral> and serve in a daemon thread; returns self."""
        if self.tls or self.starttls:
            self._ssl_context = _server_context(self.cert)
        self._server = _TCPServer(("127.0.0.1", 0), self.handler)
        self._server.fake = self
        self.host, self.port = self._server.server_address[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, args=(self._server, self._wake_r),
                                        name="FakeGmail:%d" % self.port, daemon=True)
        self._thread.start()
        return self

    def use_handler(self, handler: type) -> None:
        """Serve the connections from now on with ``handler``, a _Session subclass written
        for one test (test_imaplib's way), instead of patching _Session for everyone."""
        self.handler = handler
        if self._server is not None:
            self._server.RequestHandlerClass = handler

    def _serve(self, server: "_TCPServer", wake: socket.socket) -> None:
        """Accept until stop() writes to ``wake``: no polling, so a stop never waits for a
        poll interval (socketserver's serve_forever would, at every stop)."""
        with selectors.DefaultSelector() as selector:
            selector.register(server, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while not self._stopping:
                ready = [key.fileobj for key, _ in selector.select()]
                if server in ready and not self._stopping:
                    server._handle_request_noblock()

    def stop(self) -> None:
        """Stop accepting, close every client connection, join the threads."""
        if self._server is None:
            return
        self._stopping = True
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(5)
        self._server.server_close()
        self._wake_r.close()
        self._wake_w.close()
        self.drop_all_connections()
        self._server = None

    def __enter__(self) -> "FakeGmail":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def drop_all_connections(self) -> None:
        """Abruptly close every live client connection (the client sees EOF)."""
        with self._cond:
            sessions = list(self._sessions.values())
        for s in sessions:
            with s.sock_lock:   # not while its own thread closes it (see _Session.setup)
                try:
                    socket.socket.shutdown(s.sock, socket.SHUT_RDWR)
                except (OSError, ValueError):
                    pass
            s.killed.set()  # after the shutdown, so a delayed answer can no longer get out
        for s in sessions:
            s.thread.join(2)

    # -- what the server saw --

    def commands(self, session: Optional[int] = None) -> List[str]:
        """Command names in order, e.g. ['CAPABILITY', 'LOGIN', 'SELECT', 'UID FETCH']."""
        with self._cond:
            return [e.command for e in self.log if session is None or e.session == session]

    def count(self, command: str) -> int:
        """How many times a command (e.g. 'UID MOVE') was received."""
        command = command.upper()
        with self._cond:
            return sum(1 for e in self.log if e.command == command)

    @property
    def sessions(self) -> List[int]:
        """Numbers of the sessions currently connected."""
        with self._cond:
            return sorted(self._sessions)

    def add_fault(self, command: Optional[str] = None, *, nth: int = 1, action: str = "drop",
                  when: str = "before", count: int = 1, delay: float = 0.0, text: Optional[str] = None,
                  size: int = 0, burst: int = 0, callback: Optional[Callable[[], None]] = None) -> None:
        """Misbehave on the nth (1-based) matching command from now on, for count commands.

        command: 'UID MOVE', 'NOOP', ... or None for any. action: one of bye, drop, reset, delay,
        no, bad, garbage, unsolicited, call (run ``callback``, e.g. a change by "another
        client", then execute the command normally; when="after": execute and answer it,
        then call), or a hostile one (see _HOSTILE_ACTIONS).
        when: before (instead of executing), after (execute, then misbehave instead of
        answering), mid (send half of the untagged answers, then misbehave); hostile actions
        ignore ``when``.
        """
        if (action == "call") != (callback is not None):
            raise ValueError("action 'call' needs a callback, and only it takes one")
        if action not in _FAULT_ACTIONS:
            raise ValueError("action must be one of %s" % ", ".join(_FAULT_ACTIONS))
        if when not in _FAULT_WHEN:
            raise ValueError("when must be one of %s" % ", ".join(_FAULT_WHEN))
        if nth < 1 or count < 1:
            raise ValueError("nth and count start at 1")
        with self._cond:
            self._faults.append(_Fault(command.upper() if command else None, nth, action, when, count,
                                       delay, text, size, burst, callback=callback))

    # -- mailbox model, public --

    def add_message(self, raw: bytes, *, labels: Iterable[str] = ("\\Inbox",), flags: Iterable[str] = (),
                    date: Optional[_dtm.datetime] = None, folder: Optional[str] = None) -> int:
        """Store a message and return its X-GM-MSGID.

        Gmail mode: labels (system labels with backslash, e.g. "\\Inbox", user labels by name;
        missing label folders are created); folder, if given, also puts it in that folder view.
        Plain mode: folder (default "INBOX", created if missing). date: INTERNALDATE (default now).
        """
        with self._cond:
            return self._add(raw, labels=labels, flags=flags, date=date, folder=folder)

    def deliver(self, raw: bytes, **kw: Any) -> int:
        """add_message() for a message arriving while clients are connected (IDLE sessions are woken)."""
        return self.add_message(raw, **kw)

    def uids(self, folder: str) -> List[int]:
        with self._cond:
            return list(self._folders[self._folder_key(folder)].uids)

    def messages(self, folder: str) -> List[FakeMessage]:
        """Copies of the messages in a folder view, in UID order."""
        with self._cond:
            f = self._folders[self._folder_key(folder)]
            return [self._copy_of(self._msgs[mid]) for mid in f.uids.values()]

    def message(self, msgid: int) -> FakeMessage:
        """A copy of one message by X-GM-MSGID; KeyError once it is deleted for good."""
        with self._cond:
            return self._copy_of(self._msgs[msgid])

    def folder_names(self) -> List[str]:
        """All folders in LIST order (decoded names, incl. the \\Noselect "[Gmail]")."""
        with self._cond:
            return self._sorted_folder_names()

    def uidvalidity(self, folder: str) -> int:
        with self._cond:
            return self._folders[self._folder_key(folder)].uidvalidity

    def bump_uidvalidity(self, folder: str) -> None:
        """Give a folder a new UIDVALIDITY and renumber its messages from UID 1."""
        with self._cond:
            f = self._folders[self._folder_key(folder)]
            mids = list(f.uids.values())
            f.uidvalidity = self._next_uidvalidity
            self._next_uidvalidity += 1
            f.uids.clear()
            f.by_msgid.clear()
            for uid, mid in enumerate(mids, 1):
                f.uids[uid] = mid
                f.by_msgid[mid] = uid
            f.uidnext = len(mids) + 1
            self._version += 1
            self._cond.notify_all()

    # -- internals (callers hold self._cond) --

    @staticmethod
    def _copy_of(m: FakeMessage) -> FakeMessage:
        return dataclasses.replace(m, flags=set(m.flags), labels=set(m.labels))

    @staticmethod
    def _folder_key(name: str) -> str:
        return "INBOX" if name.upper() == "INBOX" else name

    def _register(self, session: _Session) -> int:
        with self._cond:
            n = self._next_session
            self._next_session += 1
            self._sessions[n] = session
            return n

    def _unregister(self, session: _Session) -> None:
        with self._cond:
            self._sessions.pop(session.id, None)

    def _raw(self, data: bytes) -> None:
        with self._cond:
            self.raw_lines.append(data)

    def _record(self, entry: LogEntry, length: int) -> None:
        with self._cond:
            self.log.append(entry)
            if length > 8192:
                self.long_lines.append(entry.line)

    def _take_fault(self, name: str) -> Optional[_Fault]:
        chosen = None
        with self._cond:
            for f in self._faults:
                if f.command is not None and f.command != name:
                    continue
                f.seen += 1
                if chosen is None and f.nth <= f.seen < f.nth + f.count:
                    chosen = f
            if chosen is not None:
                self.fired.append((name, chosen.action, chosen.when))
        return chosen

    def _sorted_folder_names(self) -> List[str]:
        return sorted(self._folders, key=lambda n: (n != "INBOX", n))

    def _new_folder(self, name: str, kind: str, special: str = "", label: str = "") -> _Folder:
        f = _Folder(name=name, kind=kind, special=special, label=label, uidvalidity=self._next_uidvalidity)
        self._next_uidvalidity += 1
        self._folders[name] = f
        self._changed(list(self._msgs), folders=[f])
        return f

    def _ensure_folder(self, name: str) -> _Folder:
        """The folder for a user label (gmail) or a plain folder, created with its parents."""
        name = self._folder_key(name)
        if name in self._folders:
            return self._folders[name]
        parts = name.split(self.delimiter)
        for i in range(1, len(parts)):
            parent = self.delimiter.join(parts[:i])
            if parent == "INBOX" or parent + self.delimiter == self.prefix:
                continue
            if parent and parent not in self._folders:
                self._new_folder(parent, "label" if self.gmail else "plain", label=parent)
        return self._new_folder(name, "label" if self.gmail else "plain", label=name)

    def _delete_folder(self, name: str) -> None:
        f = self._folders.pop(name)
        mids = list(f.uids.values())
        if self.gmail:
            for mid in mids:
                self._msgs[mid].labels.discard(f.label)
            self._changed(mids)
        else:
            self._expunge(f, mids)

    def _parsed(self, msg: FakeMessage) -> email.message.Message:
        p = self._parsed_cache.get(msg.msgid)
        if p is None:
            p = email.message_from_bytes(msg.raw, policy=email.policy.default)
            self._parsed_cache[msg.msgid] = p
        return p

    def _search_text(self, msg: FakeMessage) -> str:
        """Decoded Subject + From + text body: what a bare X-GM-RAW word and TEXT look at."""
        p = self._parsed(msg)
        return "\n".join([_decoded_header(p, "Subject"), _decoded_header(p, "From"), _body_text(p)])

    def _labels_of(self, msg: FakeMessage) -> set:
        labels = set(msg.labels)
        if "\\Flagged" in msg.flags:
            labels.add("\\Starred")
        return labels

    def _member(self, f: _Folder, m: FakeMessage) -> bool:
        if f.kind == "plain":
            return m.folder == f.name
        live = "\\Trash" not in m.labels and "\\Spam" not in m.labels
        k = f.kind
        if k == "all":
            return live
        if k == "trash":
            return "\\Trash" in m.labels
        if k == "spam":
            return "\\Spam" in m.labels and "\\Trash" not in m.labels
        if k == "starred":
            return live and "\\Flagged" in m.flags
        if k in _FOLDER_LABEL:
            return live and _FOLDER_LABEL[k] in m.labels
        if k == "label":
            return live and f.label in m.labels
        return False

    def _changed(self, mids: Iterable[int], folders: Optional[Iterable[_Folder]] = None) -> None:
        """Recompute folder membership of these messages (new UIDs on entry), wake IDLE sessions."""
        mids = sorted(set(mids))
        self._modseq += 1
        for mid in mids:
            if mid in self._msgs:
                self._msgs[mid].modseq = self._modseq
        for f in (self._folders.values() if folders is None else folders):
            if not f.selectable:
                continue
            for mid in mids:
                m = self._msgs.get(mid)
                inside = m is not None and self._member(f, m)
                uid = f.by_msgid.get(mid)
                if inside and uid is None:
                    f.uids[f.uidnext] = mid
                    f.by_msgid[mid] = f.uidnext
                    f.uidnext += 1
                elif not inside and uid is not None:
                    del f.uids[uid]
                    del f.by_msgid[mid]
        self._version += 1
        self._cond.notify_all()

    def _thread_for(self, raw: bytes) -> Tuple[Optional[str], List[str]]:
        header = _split_header(raw)[0]
        h = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(header)
        own = re.findall(r"<[^>]+>", str(h.get("Message-ID", "")))
        refs = re.findall(r"<[^>]+>", str(h.get("In-Reply-To", "")) + " " + str(h.get("References", "")))
        return (own[0] if own else None), refs

    def _add(self, raw: bytes, labels: Iterable[str], flags: Iterable[str], date: Optional[_dtm.datetime],
             folder: Optional[str]) -> int:
        raw = _crlf(bytes(raw))
        if date is None:
            date = _dtm.datetime.now(_UTC).replace(microsecond=0)
        elif date.tzinfo is None:
            date = date.replace(tzinfo=_UTC)
        msgid = self._next_msgid
        self._next_msgid += 1
        own, refs = self._thread_for(raw)
        thrid = next((self._thread_ids[r] for r in refs if r in self._thread_ids), msgid)
        if own:
            self._thread_ids.setdefault(own, thrid)
        msg = FakeMessage(msgid=msgid, thrid=thrid, raw=raw, date=date, flags={_canon_flag(f) for f in flags})
        if self.gmail:
            if isinstance(labels, str):
                raise TypeError("labels must be an iterable of label names, not a str")
            for label in labels:
                self._apply_label(msg, _canon_label(label), add=True)
            if folder is not None:
                f = self._folders.get(self._folder_key(folder))
                if f is None:
                    raise KeyError("no folder %r" % folder)
                self._enter(msg, f)
        else:
            msg.folder = self._ensure_folder(folder or "INBOX").name
        self._msgs[msgid] = msg
        self._changed([msgid])
        return msgid

    def _apply_label(self, msg: FakeMessage, label: str, add: bool) -> None:
        """Gmail label semantics: \\Trash/\\Spam take a message out of every other view."""
        if label == "\\Starred":
            (msg.flags.add if add else msg.flags.discard)("\\Flagged")
        elif not add:
            msg.labels.discard(label)
        elif label == "\\Trash":
            msg.labels.difference_update({"\\Inbox", "\\Spam"})
            msg.labels.add(label)
        elif label == "\\Spam":
            msg.labels.difference_update({"\\Inbox", "\\Trash"})
            msg.labels.add(label)
        else:
            if not label.startswith("\\"):
                self._ensure_folder(label)
            msg.labels.add(label)

    def _enter(self, msg: FakeMessage, f: _Folder) -> None:
        """Gmail: make msg appear in folder view f (COPY/MOVE destination, APPEND)."""
        if f.kind == "trash":
            self._apply_label(msg, "\\Trash", True)
            return
        if f.kind == "spam":
            self._apply_label(msg, "\\Spam", True)
            return
        msg.labels.difference_update({"\\Trash", "\\Spam"})
        if f.kind == "starred":
            msg.flags.add("\\Flagged")
        elif f.kind in _FOLDER_LABEL:
            msg.labels.add(_FOLDER_LABEL[f.kind])
        elif f.kind == "label":
            msg.labels.add(f.label)

    def _leave(self, msg: FakeMessage, f: _Folder, expunge: bool) -> bool:
        """Gmail: take msg out of view f (MOVE source, EXPUNGE). True = delete it for good."""
        msg.flags.discard("\\Deleted")
        k = f.kind
        if k in ("trash", "spam"):
            if expunge:
                return True
            msg.labels.discard("\\Trash" if k == "trash" else "\\Spam")
        elif k == "all":
            if expunge:
                self._apply_label(msg, "\\Trash", True)
        elif k == "starred":
            msg.flags.discard("\\Flagged")
        elif k in _FOLDER_LABEL:
            msg.labels.discard(_FOLDER_LABEL[k])
        elif k == "label":
            msg.labels.discard(f.label)
        return False

    def _copy_messages(self, source: _Folder, dest: _Folder, msgs: List[FakeMessage],
                       move: bool) -> List[Optional[int]]:
        """COPY/MOVE; returns each message's UID in dest (None if it is not there)."""
        if not msgs:
            return []
        if source is dest:
            return [dest.by_msgid.get(m.msgid) for m in msgs]
        if not self.gmail:
            new_ids = []
            for m in msgs:
                if move:
                    m.folder = dest.name
                    new_ids.append(m.msgid)
                else:
                    mid = self._next_msgid
                    self._next_msgid += 1
                    self._msgs[mid] = FakeMessage(msgid=mid, thrid=mid, raw=m.raw, date=m.date,
                                                  flags=set(m.flags), folder=dest.name)
                    new_ids.append(mid)
            self._changed([m.msgid for m in msgs] + new_ids)
            return [dest.by_msgid.get(mid) for mid in new_ids]
        for m in msgs:
            self._enter(m, dest)
        self._changed([m.msgid for m in msgs], folders=[dest])
        result = [dest.by_msgid.get(m.msgid) for m in msgs]
        if move and not (source.kind == "all" and dest.kind not in ("trash", "spam")):
            for m in msgs:
                self._leave(m, source, expunge=False)
        self._changed([m.msgid for m in msgs])
        return result

    def _expunge(self, f: _Folder, mids: List[int]) -> None:
        doomed = []
        for mid in mids:
            msg = self._msgs[mid]
            if not self.gmail or self._leave(msg, f, expunge=True):
                doomed.append(mid)
        for mid in doomed:
            del self._msgs[mid]
            self._parsed_cache.pop(mid, None)
        self._changed(mids)


# --- The fake server itself, checked with the stdlib imaplib client ----------------------


PLAIN_MSG = (b"From: Alice Example <alice@example.com>\r\nTo: bob@example.com\r\n"
             b"Subject: Invoice 42\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n"
             b"\r\nPlease find the invoice for March.\r\n")
UNICODE_MSG = ("From: =?utf-8?q?J=C3=BCrgen?= <juergen@example.de>\r\nTo: bob@example.com\r\n"
               "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=\r\n"
               "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
               "Schöne Grüße, das Frühstück war gut.\r\n").encode("utf-8")
MULTIPART_MSG = (b"From: Carol <carol@example.org>\r\nTo: bob@example.com\r\nSubject: Report attached\r\n"
                 b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XYZ\"\r\n\r\n"
                 b"preamble\r\n--XYZ\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSee the report.\r\n"
                 b"--XYZ\r\nContent-Type: application/pdf; name=\"r.pdf\"\r\n"
                 b"Content-Disposition: attachment; filename=\"r.pdf\"\r\nContent-Transfer-Encoding: base64\r\n"
                 b"\r\nJVBERi0xLjQK\r\n--XYZ--\r\n")


def imaplib_connect(server: FakeGmail, login: bool = True, timeout: float = 5) -> imaplib.IMAP4:
    m = imaplib.IMAP4(server.host, server.port, timeout=timeout)
    if login:
        m.login(USER, PASSWORD)
    return m


class RawClient:
    """A minimal line-level IMAP client for exchanges imaplib cannot make (or would hide)."""

    def __init__(self, server: FakeGmail, timeout: float = 5) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self.f = self.sock.makefile("rb")
        self.greeting = self.readline()
        self.n = 0

    def readline(self) -> bytes:
        line = self.f.readline()
        if not line:
            raise EOFError("server closed the connection")
        return line

    def read_response(self) -> bytes:
        """One response line with any literals inline."""
        data = self.readline()
        while True:
            m = re.search(rb"\{(\d+)\}\r\n\Z", data)
            if not m:
                return data
            data += self.f.read(int(m.group(1)))
            data += self.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, text: bytes) -> tuple:
        """Send 'TAG text' and return (tagged line, [untagged responses])."""
        self.n += 1
        tag = b"R%d" % self.n
        self.send(tag + b" " + text + b"\r\n")
        untagged = []
        while True:
            line = self.read_response()
            if line.startswith(tag + b" "):
                return line, untagged
            untagged.append(line)

    def login(self) -> None:
        tagged, _ = self.command(b"LOGIN " + USER.encode() + b" " + PASSWORD.encode())
        assert b" OK " in tagged, tagged

    def close(self) -> None:
        self.f.close()
        self.sock.close()


class FakeGmailTestCase(unittest.TestCase):
    def start(self, **kw) -> FakeGmail:
        server = FakeGmail(**kw).start()
        self.addCleanup(self.assertEqual, server.errors, [])
        self.addCleanup(server.stop)
        return server

    def imap(self, server: FakeGmail, **kw) -> imaplib.IMAP4:
        m = imaplib_connect(server, **kw)
        self.addCleanup(self._quietly_close, m)
        return m

    def raw(self, server: FakeGmail, **kw) -> RawClient:
        c = RawClient(server, **kw)
        self.addCleanup(c.close)
        return c

    @staticmethod
    def _quietly_close(m: imaplib.IMAP4) -> None:
        try:
            m.shutdown()
        except OSError:
            pass


class FakeServerHelpersTest(unittest.TestCase):
    VECTORS = [("Entwürfe", "Entw&APw-rfe"), ("日本語", "&ZeVnLIqe-"), ("Tom & Jerry", "Tom &- Jerry"),
               ("~peter/mail/日本語/台北", "~peter/mail/&ZeVnLIqe-/&U,BTFw-"),
               ("Корзина", "&BBoEPgRABDcEOAQ9BDA-"), ("😀", "&2D3eAA-"), ("INBOX", "INBOX")]

    def test_modified_utf7_vectors_both_ways(self):
        for text, wire in self.VECTORS:
            with self.subTest(text=text):
                self.assertEqual(imap_utf7_encode(text), wire)
                self.assertEqual(imap_utf7_decode(wire), text)

    def test_modified_utf7_rejects_malformed(self):
        for bad in ("a&b", "&AOk", "été", "&AO=-"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                imap_utf7_decode(bad)

    def test_wait_until_raises_assertion_on_timeout(self):
        with self.assertRaises(AssertionError):
            wait_until(lambda: False, timeout=0.05)
        self.assertEqual(wait_until(lambda: 42), 42)


class FakeServerAuthenticationTest(FakeGmailTestCase):
    def test_login_ok_and_capabilities_grow_after_login(self):
        server = self.start()
        m = self.imap(server, login=False)
        self.assertIn("X-GM-EXT-1", m.capabilities)
        self.assertNotIn("MOVE", m.capabilities)
        typ, data = m.login(USER, PASSWORD)
        self.assertEqual(typ, "OK")
        self.assertNotIn(b"CAPABILITY", data[0])  # the client must ask again
        typ, data = m.capability()
        caps = data[0].split()
        for cap in (b"MOVE", b"UIDPLUS", b"ENABLE", b"UTF8=ACCEPT", b"SPECIAL-USE", b"LITERAL-"):
            self.assertIn(cap, caps)
        self.assertNotIn(b"AUTH=XOAUTH2", caps)
        self.assertEqual(server.commands(), ["CAPABILITY", "LOGIN", "CAPABILITY"])

    def test_login_wrong_password_fails_with_authenticationfailed(self):
        server = self.start()
        m = self.imap(server, login=False)
        with self.assertRaises(imaplib.IMAP4.error) as cm:
            m.login(USER, "wrong")
        self.assertIn("[AUTHENTICATIONFAILED] Invalid credentials (Failure)", str(cm.exception))

    def test_login_password_with_quote_backslash_and_as_literal(self):
        password = 'pa"ss\\wörd'
        server = self.start(users={USER: password})
        m = self.imap(server, login=False)
        server.users["plain@example.com"] = 'pa"ss\\word'  # imaplib quotes: "pa\"ss\\word"
        self.assertEqual(m.login("plain@example.com", 'pa"ss\\word')[0], "OK")
        self.assertIn(b'"pa\\"ss\\\\word"', server.log[-1].line)
        c = self.raw(server)
        pw = password.encode("utf-8")
        c.send(b"L1 LOGIN " + USER.encode() + b" {%d}\r\n" % len(pw))
        self.assertTrue(c.readline().startswith(b"+"))
        c.send(pw + b"\r\n")
        self.assertTrue(c.readline().startswith(b"L1 OK"))
        self.assertEqual(server.log[-1].line, b"L1 LOGIN user@example.com {%d}\r\n" % len(pw) + pw + b"\r\n")

    def test_commands_before_authentication_are_bad(self):
        server = self.start()
        c = self.raw(server)
        for cmd in (b"SELECT INBOX", b"LIST \"\" *", b"ENABLE UTF8=ACCEPT"):
            with self.subTest(cmd=cmd):
                tagged, _ = c.command(cmd)
                self.assertIn(b" BAD ", tagged)
        self.assertIn(b" OK ", c.command(b"NOOP")[0])

    def test_xoauth2_good_token(self):
        server = self.start()
        m = self.imap(server, login=False)
        auth = ("user=%s\x01auth=Bearer %s\x01\x01" % (USER, TOKEN)).encode()
        typ, data = m.authenticate("XOAUTH2", lambda challenge: auth)
        self.assertEqual((typ, data), ("OK", [b"user@example.com authenticated (Success)"]))
        self.assertEqual(base64.b64decode(server.raw_lines[2].strip()), auth)

    def test_xoauth2_bad_token_answered_with_empty_line_gives_no(self):
        server = self.start()
        m = self.imap(server, login=False)
        answers = [("user=%s\x01auth=Bearer expired\x01\x01" % USER).encode(), b""]
        challenges = []

        def callback(challenge):
            challenges.append(challenge)
            return answers.pop(0)

        with self.assertRaises(imaplib.IMAP4.error) as cm:
            m.authenticate("XOAUTH2", callback)
        self.assertIn("[AUTHENTICATIONFAILED]", str(cm.exception))
        self.assertIn(b'"status":"400"', challenges[1])
        self.assertEqual(server.sasl_errors, [])

    def test_xoauth2_bad_token_resent_is_a_protocol_error(self):
        server = self.start()
        c = self.raw(server)
        auth = base64.b64encode(("user=%s\x01auth=Bearer expired\x01\x01" % USER).encode())
        c.send(b"A1 AUTHENTICATE XOAUTH2 " + auth + b"\r\n")  # SASL-IR
        challenge = c.readline()
        self.assertTrue(challenge.startswith(b"+ "))
        self.assertEqual(base64.b64decode(challenge[2:].strip()),
                         b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}')
        c.send(auth + b"\r\n")  # the classic bug: `lambda _: auth`
        self.assertEqual(c.readline(), b"A1 BAD Invalid SASL argument\r\n")
        self.assertEqual(server.sasl_errors, [auth])

    def test_authenticate_plain(self):
        server = self.start()
        m = self.imap(server, login=False)
        typ, _ = m.authenticate("PLAIN", lambda _: ("\0%s\0%s" % (USER, PASSWORD)).encode())
        self.assertEqual(typ, "OK")


class FakeServerFoldersTest(FakeGmailTestCase):
    def test_list_marks_special_use_folders(self):
        server = self.start()
        server.add_message(PLAIN_MSG, labels=("\\Inbox", "Dev/Notifications"))
        m = self.imap(server)
        typ, data = m.list('""', "*")
        self.assertIn(b'(\\HasNoChildren \\Trash) "/" "[Gmail]/Trash"', data)
        self.assertIn(b'(\\HasNoChildren \\All) "/" "[Gmail]/All Mail"', data)
        self.assertIn(b'(\\HasChildren \\Noselect) "/" "[Gmail]"', data)
        self.assertIn(b'(\\HasChildren) "/" "Dev"', data)
        self.assertIn(b'(\\HasNoChildren) "/" "Dev/Notifications"', data)
        typ, data = m.list('""', "%")
        self.assertNotIn(b'(\\HasNoChildren) "/" "Dev/Notifications"', data)
        c = self.raw(server)
        c.login()
        _, untagged = c.command(b'LIST (SPECIAL-USE) "" "*"')
        self.assertEqual(len(untagged), 7)
        _, untagged = c.command(b'XLIST "" "*"')
        self.assertIn(b'* XLIST (\\HasNoChildren \\AllMail) "/" "[Gmail]/All Mail"\r\n', untagged)
        self.assertIn(b'* XLIST (\\HasNoChildren \\Inbox) "/" "INBOX"\r\n', untagged)

    def test_localized_folder_names_are_modified_utf7_on_the_wire(self):
        server = self.start(localized=True)
        m = self.imap(server)
        data = m.list()[1]
        self.assertIn(b'(\\HasNoChildren \\Trash) "/" "[Google Mail]/Papierkorb"', data)
        self.assertIn(b'(\\HasNoChildren \\Drafts) "/" "[Google Mail]/Entw&APw-rfe"', data)
        self.assertIn("[Google Mail]/Entwürfe", server.folder_names())
        self.assertEqual(m.select('"[Google Mail]/Entw&APw-rfe"')[0], "OK")

    def test_select_and_examine_answers(self):
        server = self.start()
        server.add_message(PLAIN_MSG)
        server.add_message(PLAIN_MSG, flags=("\\Seen",))
        m = self.imap(server)
        typ, data = m.select("INBOX")
        self.assertEqual((typ, data), ("OK", [b"2"]))
        self.assertEqual(m.response("UIDVALIDITY")[1], [str(server.uidvalidity("INBOX")).encode()])
        self.assertEqual(m.response("UIDNEXT")[1], [b"3"])
        self.assertEqual(m.response("READ-WRITE")[0], "READ-WRITE")
        typ, data = m.select('"[Gmail]/Trash"', readonly=True)
        self.assertEqual((typ, data), ("OK", [b"0"]))
        self.assertNotEqual(server.uidvalidity("[Gmail]/Trash"), server.uidvalidity("INBOX"))
        m.select("INBOX", readonly=True)
        self.assertEqual(m.uid("STORE", "1", "+FLAGS", "(\\Seen)")[0], "NO")
        self.assertEqual(m.status("INBOX", "(MESSAGES UNSEEN UIDNEXT)"),
                         ("OK", [b'"INBOX" (MESSAGES 2 UNSEEN 1 UIDNEXT 3)']))
        self.assertEqual(m.select('"[Gmail]"')[0], "NO")
        self.assertEqual(m.select("Nope")[0], "NO")

    def test_create_and_already_exists(self):
        server = self.start()
        m = self.imap(server)
        self.assertEqual(m.create('"Projects/2024"')[0], "OK")
        self.assertIn("Projects/2024", server.folder_names())
        typ, data = m.create('"Projects/2024"')
        self.assertEqual(typ, "NO")
        self.assertIn(b"[ALREADYEXISTS]", data[0])

    def test_bump_uidvalidity_renumbers(self):
        server = self.start()
        for _ in range(3):
            server.add_message(PLAIN_MSG)
        server.add_message(PLAIN_MSG, labels=())
        self.assertEqual(server.uids("[Gmail]/All Mail"), [1, 2, 3, 4])
        old = server.uidvalidity("INBOX")
        m = self.imap(server)
        m.select("INBOX")
        m.uid("STORE", "1", "-X-GM-LABELS", "(\\Inbox)")
        server.bump_uidvalidity("INBOX")
        self.assertEqual(server.uids("INBOX"), [1, 2])
        self.assertNotEqual(server.uidvalidity("INBOX"), old)


class FakeServerSearchTest(FakeGmailTestCase):
    def setUp(self):
        self.server = self.start()
        s = self.server
        old = _dtm.datetime(2020, 5, 17, 12, 0, tzinfo=_dtm.timezone.utc)
        self.u1 = s.add_message(PLAIN_MSG, date=old, flags=("\\Seen",))
        self.u2 = s.add_message(UNICODE_MSG, labels=("\\Inbox", "Receipts"))
        self.u3 = s.add_message(MULTIPART_MSG, flags=("\\Flagged",))
        self.m = self.imap(s)
        self.m.select("INBOX")

    def search(self, *criteria):
        typ, data = self.m.uid("SEARCH", *criteria)
        self.assertEqual(typ, "OK")
        return [int(x) for x in data[0].split()]

    def test_rfc3501_criteria(self):
        cases = [
            (("ALL",), [1, 2, 3]), (("UNSEEN",), [2, 3]), (("SEEN",), [1]), (("FLAGGED",), [3]),
            (("UID", "2:*"), [2, 3]), (("UID", "9:*"), [3]), (("2,3",), [2, 3]),
            (("FROM", "alice"), [1]), (("SUBJECT", '"invoice 42"'), [1]), (("TO", "BOB"), [1, 2, 3]),
            (("SINCE", "01-Jan-2021"), [2, 3]), (("BEFORE", "1-Jan-2021"), [1]), (("ON", "17-May-2020"), [1]),
            (("SENTBEFORE", "02-Jan-2024"), [1]), (("LARGER", "200"), [2, 3]), (("SMALLER", "200"), [1]),
            (("NOT", "SEEN"), [2, 3]), (("OR", "FLAGGED", "SEEN"), [1, 3]),
            (("(FROM carol FLAGGED)",), [3]),
            (("HEADER", "Message-ID", "m1@"), [1]), (("BODY", "MARCH"), [1]), (("TEXT", "carol"), [3]),
            (("KEYWORD", "$Work"), []), (("SUBJECT", '"Grüße"'.encode("utf-8")), [2]),
        ]
        for criteria, expected in cases:
            with self.subTest(criteria=criteria):
                self.assertEqual(self.search(*criteria), expected)

    def test_x_gm_raw_queries(self):
        cases = [
            ('"has:attachment"', [3]), ('"is:unread -has:attachment"', [2]), ('"older_than:1y"', [1]),
            ('"newer_than:2d"', [2, 3]), ('"label:receipts"', [2]), ('"from:alice OR from:carol"', [1, 3]),
            ('"subject:(report)"', []), ('"subject:report"', [3]), ('"\\"invoice for march\\""', [1]),
            ('"is:starred"', [3]), ('"larger:1K"', []), ('"in:inbox"', [1, 2, 3]), ('"in:trash"', []),
            ('"fruhstuck"', []), ('"FRÜHSTÜCK"'.encode("utf-8"), [2]),
        ]
        for query, expected in cases:
            with self.subTest(query=query):
                self.assertEqual(self.search("X-GM-RAW", query), expected)

    def test_charset_utf8_literal(self):
        self.m.literal = "Grüße aus Köln".encode("utf-8")
        self.assertEqual(self.search("CHARSET", "UTF-8", "SUBJECT"), [2])
        self.m.literal = "frühstück".encode("utf-8")
        self.assertEqual(self.search("CHARSET", "UTF-8", "X-GM-RAW"), [2])
        line = self.server.log[-1].line
        self.assertTrue(line.endswith(b"X-GM-RAW {11}\r\nfr\xc3\xbchst\xc3\xbcck\r\n"), line)

    def test_esearch_return(self):
        c = self.raw(self.server)
        c.login()
        c.command(b"SELECT INBOX")
        tagged, untagged = c.command(b"UID SEARCH RETURN (MIN MAX COUNT) UNSEEN")
        self.assertEqual(untagged, [b'* ESEARCH (TAG "R3") UID MIN 2 MAX 3 COUNT 2\r\n'])

    def test_unknown_key_and_bad_charset(self):
        self.assertRaises(imaplib.IMAP4.error, self.m.uid, "SEARCH", "FOO")
        self.assertEqual(self.m.uid("SEARCH", "CHARSET", "KOI8-R", "ALL")[0], "NO")


class FakeServerFetchStoreTest(FakeGmailTestCase):
    def setUp(self):
        self.server = self.start()
        self.mid1 = self.server.add_message(PLAIN_MSG, labels=("\\Inbox", "\\Important", "Receipts"))
        self.mid2 = self.server.add_message(MULTIPART_MSG)
        self.m = self.imap(self.server)
        self.m.select("INBOX")

    def test_header_fields_labels_and_peek_does_not_set_seen(self):
        typ, data = self.m.uid("FETCH", "1", "(X-GM-MSGID X-GM-LABELS BODY.PEEK[HEADER.FIELDS (from subject)])")
        head, body = data[0]
        self.assertIn(b"X-GM-MSGID %d" % self.mid1, head)
        # As Gmail does, the viewed folder's own label (\Inbox here) is left out.
        self.assertIn(b'X-GM-LABELS ("\\\\Important" Receipts)', head)
        self.assertTrue(head.endswith(b"BODY[HEADER.FIELDS (FROM SUBJECT)] {64}"), head)
        self.assertEqual(body, b"From: Alice Example <alice@example.com>\r\nSubject: Invoice 42\r\n\r\n")
        self.assertNotIn("\\Seen", self.server.message(self.mid1).flags)

    def test_partial_body_peek_then_body_sets_seen(self):
        typ, data = self.m.uid("FETCH", "1", "(BODY.PEEK[]<0.10>)")
        self.assertEqual(data[0], (b"1 (UID 1 BODY[]<0> {10}", PLAIN_MSG[:10]))
        self.assertNotIn("\\Seen", self.server.message(self.mid1).flags)
        typ, data = self.m.uid("FETCH", "1", "(BODY[TEXT])")
        self.assertEqual(data[0][1], b"Please find the invoice for March.\r\n")
        self.assertIn(b"FLAGS (\\Seen)", data[1])
        self.assertIn("\\Seen", self.server.message(self.mid1).flags)

    def test_bodystructure_and_parts_of_multipart(self):
        typ, data = self.m.uid("FETCH", "2", "(BODYSTRUCTURE BODY.PEEK[2] BODY.PEEK[2.MIME] RFC822.SIZE)")
        flat = b"".join(x if isinstance(x, bytes) else b"".join(x) for x in data)
        self.assertIn(b'BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 15 1 NIL NIL NIL NIL)'
                      b'("APPLICATION" "PDF" ("NAME" "r.pdf") NIL NIL "BASE64" 12 NIL ("attachment" ("filename" "r.pdf"))'
                      b' NIL NIL) "MIXED" ("BOUNDARY" "XYZ") NIL NIL NIL)', flat)
        self.assertIn(b"BODY[2] {12}\r\nJVBERi0xLjQK", flat.replace(b"{12}J", b"{12}\r\nJ"))
        self.assertIn(b"RFC822.SIZE %d" % len(MULTIPART_MSG), flat)

    def test_fetch_matching_nothing_is_just_ok(self):
        self.assertEqual(self.m.uid("FETCH", "99", "(FLAGS)"), ("OK", [None]))

    def test_store_labels_with_spaces_non_ascii_and_star(self):
        typ, data = self.m.uid("STORE", "1", "+X-GM-LABELS", '("two words" "Entw&APw-rfe" "*" "(foo)")')
        self.assertEqual(typ, "OK")
        self.assertEqual(self.server.message(self.mid1).labels,
                         {"\\Inbox", "\\Important", "Receipts", "two words", "Entwürfe", "*", "(foo)"})
        self.assertIn(b'"two words"', data[0])
        self.assertIn(b'"*"', data[0])
        self.assertIn(b'"(foo)"', data[0])
        self.assertIn("Entwürfe", self.server.folder_names())
        self.m.uid("STORE", "1", "-X-GM-LABELS.SILENT", '("two words")')
        self.assertNotIn("two words", self.server.message(self.mid1).labels)
        self.m.uid("STORE", "1", "X-GM-LABELS", "(\\Inbox Only)")
        self.assertEqual(self.server.message(self.mid1).labels, {"\\Inbox", "Only"})

    def test_archive_by_removing_inbox_label_announces_expunge(self):
        typ, data = self.m.uid("STORE", "1", "-X-GM-LABELS", "(\\Inbox)")
        self.assertEqual(self.m.response("EXPUNGE")[1], [b"1"])
        self.assertEqual(self.server.uids("INBOX"), [2])
        self.assertEqual(len(self.server.uids("[Gmail]/All Mail")), 2)
        self.assertEqual(self.server.uids("Receipts"), [1])

    def test_flags_and_starred_view(self):
        self.m.uid("STORE", "2", "+FLAGS.SILENT", "(\\Flagged $Work)")
        self.assertEqual(self.server.uids("[Gmail]/Starred"), [1])
        typ, data = self.m.uid("FETCH", "2", "(X-GM-LABELS FLAGS)")
        self.assertIn(b'"\\\\Starred"', data[0])
        self.assertIn(b"FLAGS (\\Flagged $Work)", data[0])
        self.assertRaises(imaplib.IMAP4.error, self.m.uid, "STORE", "2", "+FLAGS", "(\\Bogus)")


class FakeServerCopyMoveTest(FakeGmailTestCase):
    def test_move_to_trash_with_copyuid_and_views(self):
        server = self.start()
        mids = [server.add_message(PLAIN_MSG, labels=("\\Inbox", "Receipts")) for _ in range(3)]
        m = self.imap(server)
        m.select("INBOX")
        typ, data = m.uid("MOVE", "1,3", '"[Gmail]/Trash"')
        self.assertEqual(typ, "OK")
        self.assertEqual(m.response("COPYUID")[1], [b"%d 1,3 1:2" % server.uidvalidity("[Gmail]/Trash")])
        self.assertEqual(server.uids("INBOX"), [2])
        self.assertEqual(server.uids("[Gmail]/Trash"), [1, 2])
        self.assertEqual(server.uids("[Gmail]/All Mail"), [2])
        self.assertEqual(server.uids("Receipts"), [2])
        self.assertIn("\\Trash", server.message(mids[0]).labels)
        c_line = [e.line for e in server.log if e.command == "UID MOVE"][0]
        self.assertEqual(c_line.split(b" ", 1)[1], b'UID MOVE 1,3 "[Gmail]/Trash"\r\n')
        # back to INBOX: a new UID there
        m.select('"[Gmail]/Trash"')
        m.uid("MOVE", "1", "INBOX")
        self.assertEqual(server.uids("INBOX"), [2, 4])

    def test_move_sends_expunges_after_copyuid(self):
        server = self.start()
        for _ in range(3):
            server.add_message(PLAIN_MSG)
        c = self.raw(server)
        c.login()
        c.command(b"SELECT INBOX")
        tagged, untagged = c.command(b'UID MOVE 2:3 "[Gmail]/Trash"')
        self.assertEqual(untagged[0], b"* OK [COPYUID %d 2:3 1:2] (Success)\r\n" % server.uidvalidity("[Gmail]/Trash"))
        self.assertEqual(untagged[1:], [b"* 3 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"])
        self.assertEqual(tagged, b"R3 OK Done\r\n")

    def test_copy_to_label_and_from_all_mail(self):
        server = self.start()
        server.add_message(PLAIN_MSG)
        m = self.imap(server)
        m.select("INBOX")
        typ, data = m.uid("COPY", "1", "Receipts")
        self.assertEqual(typ, "NO")
        self.assertIn(b"[TRYCREATE]", data[0])
        m.create("Receipts")
        self.assertEqual(m.uid("COPY", "1", "Receipts")[0], "OK")
        self.assertEqual(m.response("COPYUID")[1], [b"%d 1 1" % server.uidvalidity("Receipts")])
        self.assertTrue(server.log[-1].line.endswith(b" UID COPY 1 Receipts\r\n"))
        m.select('"[Gmail]/All Mail"')
        m.uid("MOVE", "1", "Work")  # no such folder
        m.create("Work")
        m.uid("MOVE", "1", "Work")  # from All Mail: just adds the label
        self.assertEqual(server.uids("[Gmail]/All Mail"), [1])
        self.assertEqual(server.uids("Work"), [1])
        self.assertEqual(server.uids("INBOX"), [1])

    def test_expunge_in_gmail_inbox_removes_inbox_label(self):
        server = self.start()
        mid = server.add_message(PLAIN_MSG)
        m = self.imap(server)
        m.select("INBOX")
        m.uid("STORE", "1", "+FLAGS.SILENT", "(\\Deleted)")
        self.assertEqual(m.uid("EXPUNGE", "1")[0], "OK")
        self.assertEqual(server.uids("INBOX"), [])
        self.assertEqual(server.message(mid).labels, set())
        self.assertEqual(server.count("UID EXPUNGE"), 1)
        self.assertEqual(server.count("EXPUNGE"), 0)


class FakeServerPlainModeTest(FakeGmailTestCase):
    def test_plain_server_capabilities_and_no_gmail_extensions(self):
        server = self.start(gmail=False)
        server.add_message(PLAIN_MSG)
        m = self.imap(server, login=False)
        self.assertNotIn("X-GM-EXT-1", m.capabilities)
        self.assertIn("AUTH=PLAIN", m.capabilities)
        m.login(USER, PASSWORD)
        caps = m.capability()[1][0].split()
        self.assertEqual(caps, [b"IMAP4rev1", b"LITERAL+", b"NAMESPACE", b"SPECIAL-USE", b"MOVE", b"UIDPLUS",
                                b"IDLE"])
        m.select("INBOX")
        self.assertRaises(imaplib.IMAP4.error, m.uid, "FETCH", "1", "(X-GM-LABELS)")
        self.assertRaises(imaplib.IMAP4.error, m.uid, "SEARCH", "X-GM-RAW", '"foo"')
        self.assertIn(b'(\\HasNoChildren \\Archive) "/" "Archive"', m.list()[1])

    def test_plain_copy_delete_and_uid_expunge(self):
        server = self.start(gmail=False)
        for _ in range(3):
            server.add_message(PLAIN_MSG)
        m = self.imap(server)
        m.select("INBOX")
        m.uid("COPY", "1:2", "Archive")
        self.assertEqual(m.response("COPYUID")[1], [b"%d 1:2 1:2" % server.uidvalidity("Archive")])
        self.assertEqual(server.uids("Archive"), [1, 2])
        m.uid("STORE", "1:3", "+FLAGS.SILENT", "(\\Deleted)")
        m.uid("EXPUNGE", "2")
        self.assertEqual(m.response("EXPUNGE")[1], [b"2"])
        self.assertEqual(server.uids("INBOX"), [1, 3])
        self.assertEqual(m.expunge(), ("OK", [b"2", b"1"]))
        self.assertEqual(server.uids("INBOX"), [])
        self.assertEqual(server.uids("Archive"), [1, 2])
        self.assertEqual(server.count("EXPUNGE"), 1)
        m.select("Archive")
        m.uid("MOVE", "1", "Trash")
        self.assertEqual((server.uids("Archive"), server.uids("Trash")), ([2], [1]))


class FakeServerSwitchesTest(FakeGmailTestCase):
    def test_move_uidplus_idle_switched_off(self):
        server = self.start(move=False, uidplus=False, idle=False)
        server.add_message(PLAIN_MSG)
        m = self.imap(server)
        caps = m.capability()[1][0].split()
        for cap in (b"MOVE", b"UIDPLUS", b"IDLE"):
            self.assertNotIn(cap, caps)
        m.select("INBOX")
        self.assertRaises(imaplib.IMAP4.error, m.uid, "MOVE", "1", '"[Gmail]/Trash"')
        self.assertRaises(imaplib.IMAP4.error, m.uid, "EXPUNGE", "1")
        self.assertEqual(m.uid("COPY", "1", '"[Gmail]/Trash"')[0], "OK")
        self.assertEqual(m.response("COPYUID"), ("COPYUID", [None]))
        c = self.raw(server)
        c.login()
        self.assertIn(b" BAD ", c.command(b"IDLE")[0])


class FakeServerUpdatesAndIdleTest(FakeGmailTestCase):
    def test_idle_receives_exists_fetch_and_expunge(self):
        server = self.start()
        server.add_message(PLAIN_MSG)
        c = self.raw(server)
        c.login()
        c.command(b"SELECT INBOX")
        c.send(b"I1 IDLE\r\n")
        self.assertEqual(c.readline(), b"+ idling\r\n")
        server.deliver(UNICODE_MSG)
        self.assertEqual(c.readline(), b"* 2 EXISTS\r\n")
        other = self.imap(server)
        other.select("INBOX")
        other.uid("STORE", "1", "+FLAGS.SILENT", "(\\Seen)")
        self.assertEqual(c.readline(), b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n")
        other.uid("MOVE", "1", '"[Gmail]/Trash"')
        self.assertEqual(c.readline(), b"* 1 EXPUNGE\r\n")
        c.send(b"DONE\r\n")
        self.assertEqual(c.readline(), b"I1 OK IDLE terminated (Success)\r\n")
        self.assertIn(b"DONE\r\n", server.raw_lines)
        self.assertIn("IDLE", server.commands())

    def test_idle_rejects_anything_but_done(self):
        server = self.start()
        c = self.raw(server)
        c.login()
        c.send(b"I1 IDLE\r\n")
        c.readline()
        c.send(b"I2 NOOP\r\n")
        self.assertTrue(c.readline().startswith(b"I1 BAD"))

    def test_other_session_changes_are_announced_before_tagged_ok(self):
        server = self.start()
        server.add_message(PLAIN_MSG)
        server.add_message(PLAIN_MSG)
        a, b = self.imap(server), self.imap(server)
        a.select("INBOX")
        a.response("EXISTS")  # imaplib leaves SELECT's EXISTS in place
        b.select("INBOX")
        b.uid("STORE", "1", "-X-GM-LABELS", "(\\Inbox)")
        server.deliver(MULTIPART_MSG)
        a.noop()
        self.assertEqual(a.response("EXPUNGE")[1], [b"1"])
        self.assertEqual(a.response("EXISTS")[1], [b"2"])

    def test_drop_all_connections(self):
        server = self.start()
        m = self.imap(server)
        server.drop_all_connections()
        self.assertRaises((imaplib.IMAP4.abort, OSError), m.noop)
        self.assertEqual(server.sessions, [])
        self.assertEqual(self.imap(server).noop()[0], "OK")


class FakeServerFaultsTest(FakeGmailTestCase):
    def setUp(self):
        self.server = self.start()
        self.server.add_message(PLAIN_MSG)
        self.server.add_message(PLAIN_MSG)

    def test_bye_drop_reset(self):
        for action, errors in (("bye", imaplib.IMAP4.abort), ("drop", imaplib.IMAP4.abort),
                               ("reset", (ConnectionResetError, imaplib.IMAP4.abort))):
            with self.subTest(action=action):
                m = self.imap(self.server)
                self.server.add_fault("NOOP", action=action)
                with self.assertRaises(errors):
                    m.noop()
        self.assertEqual(self.server.fired, [("NOOP", "bye", "before"), ("NOOP", "drop", "before"),
                                             ("NOOP", "reset", "before")])

    def test_delay_exceeds_client_timeout(self):
        m = self.imap(self.server, timeout=0.2)
        self.server.add_fault("NOOP", action="delay", delay=2)
        with self.assertRaises(OSError):  # socket.timeout on 3.9, TimeoutError later
            m.noop()

    def test_no_and_bad_with_nth_and_count(self):
        m = self.imap(self.server)
        self.server.add_fault("NOOP", nth=2, count=2, action="no")
        results = [m.noop()[0] for _ in range(4)]
        self.assertEqual(results, ["OK", "NO", "NO", "OK"])
        self.server.add_fault(None, action="bad", text="[CLIENTBUG] nope")
        with self.assertRaises(imaplib.IMAP4.error) as cm:
            m.noop()
        self.assertIn("[CLIENTBUG] nope", str(cm.exception))

    def test_garbage_and_unsolicited(self):
        c = self.raw(self.server)
        c.login()
        c.command(b"SELECT INBOX")
        self.server.add_fault("UID FETCH", action="garbage")
        tagged, untagged = c.command(b"UID FETCH 1 (FLAGS)")
        self.assertEqual(untagged, [b"* 1 FETCH (UID 7 FLAGS (\\Seen\r\n"])
        self.assertEqual(tagged, b"R3 OK done\r\n")
        self.server.add_fault("UID FETCH", action="unsolicited")
        tagged, untagged = c.command(b"UID FETCH 1:* (FLAGS)")
        self.assertEqual(untagged, [b"* 1 FETCH (FLAGS (\\Seen))\r\n", b"* 2 EXISTS\r\n",
                                    b"* 1 FETCH (UID 1 FLAGS ())\r\n", b"* 2 FETCH (UID 2 FLAGS ())\r\n"])

    def test_move_executed_but_connection_dropped_after(self):
        m = self.imap(self.server)
        m.select("INBOX")
        self.server.add_fault("UID MOVE", action="drop", when="after")
        with self.assertRaises(imaplib.IMAP4.abort):
            m.uid("MOVE", "1", '"[Gmail]/Trash"')
        self.assertEqual(self.server.uids("INBOX"), [2])
        self.assertEqual(self.server.fired, [("UID MOVE", "drop", "after")])

    def test_move_refused_before_changes_nothing(self):
        m = self.imap(self.server)
        m.select("INBOX")
        self.server.add_fault("UID MOVE", action="no")
        self.assertEqual(m.uid("MOVE", "1", '"[Gmail]/Trash"')[0], "NO")
        self.assertEqual(self.server.uids("INBOX"), [1, 2])

    def test_fetch_mid_sends_half_then_drops(self):
        c = self.raw(self.server)
        c.login()
        c.command(b"SELECT INBOX")
        self.server.add_fault("UID FETCH", action="drop", when="mid")
        c.send(b"F1 UID FETCH 1:* (FLAGS)\r\n")
        self.assertEqual(c.readline(), b"* 1 FETCH (UID 1 FLAGS ())\r\n")
        self.assertRaises(EOFError, c.readline)

    def test_drop_all_connections_interrupts_delay_and_idle(self):
        c = self.raw(self.server)
        c.login()
        idler = self.raw(self.server)
        idler.login()
        idler.send(b"I1 IDLE\r\n")
        self.assertEqual(idler.readline(), b"+ idling\r\n")
        self.server.add_fault("NOOP", action="delay", delay=30)
        c.send(b"N1 NOOP\r\n")
        wait_until(lambda: self.server.fired)
        started = time.monotonic()
        self.server.drop_all_connections()
        self.assertLess(time.monotonic() - started, 1)
        self.assertRaises(EOFError, c.readline)
        self.assertRaises(EOFError, idler.readline)
        self.assertEqual(self.server.sessions, [])

    def test_add_fault_validates(self):
        self.assertRaises(ValueError, self.server.add_fault, "NOOP", action="explode")
        self.assertRaises(ValueError, self.server.add_fault, "NOOP", when="later")


class FakeServerTLSTest(FakeGmailTestCase):
    def client_context(self) -> ssl.SSLContext:
        tmp = tempfile.mkdtemp()
        self.addCleanup(lambda: (os.remove(os.path.join(tmp, "fake_gmail_ca.pem")), os.rmdir(tmp)))
        return ssl.create_default_context(cafile=write_ca_file(tmp))

    def test_implicit_tls_verifies_against_ca(self):
        server = self.start(tls=True)
        ctx = self.client_context()
        self.assertTrue(ctx.check_hostname)
        m = imaplib.IMAP4_SSL("localhost", server.port, ssl_context=ctx, timeout=5)
        self.addCleanup(self._quietly_close, m)
        self.assertEqual(m.login(USER, PASSWORD)[0], "OK")

    def test_wrong_host_and_untrusted_ca_fail(self):
        server = self.start(tls=True, cert="wrong_host")
        with self.assertRaises(ssl.SSLCertVerificationError):
            imaplib.IMAP4_SSL("localhost", server.port, ssl_context=self.client_context(), timeout=5)
        server = self.start(tls=True)
        with self.assertRaises(ssl.SSLCertVerificationError):
            imaplib.IMAP4_SSL("localhost", server.port, ssl_context=ssl.create_default_context(), timeout=5)

    def test_starttls(self):
        server = self.start(starttls=True)
        m = self.imap(server, login=False)
        self.assertIn("STARTTLS", m.capabilities)
        self.assertEqual(m.starttls(ssl_context=self.client_context())[0], "OK")
        self.assertNotIn("STARTTLS", m.capabilities)
        self.assertEqual(m.login(USER, PASSWORD)[0], "OK")
        self.assertEqual(server.commands()[:3], ["CAPABILITY", "STARTTLS", "CAPABILITY"])

    def test_starttls_refused_when_not_offered(self):
        server = self.start()
        m = self.imap(server, login=False)
        self.assertNotIn("STARTTLS", m.capabilities)
        c = self.raw(server)
        self.assertIn(b" BAD ", c.command(b"STARTTLS")[0])


class FakeServerWireTest(FakeGmailTestCase):
    def test_append_literal_is_logged_inline(self):
        server = self.start()
        m = self.imap(server)
        typ, data = m.append("INBOX", "(\\Seen)", None, PLAIN_MSG)
        self.assertEqual(typ, "OK")
        self.assertIn(b"[APPENDUID %d 1]" % server.uidvalidity("INBOX"), data[0])
        entry = server.log[-1]
        self.assertIsInstance(entry, LogEntry)
        self.assertEqual(entry.command, "APPEND")
        self.assertTrue(entry.line.endswith(b"{%d}\r\n" % len(PLAIN_MSG) + PLAIN_MSG + b"\r\n"))
        self.assertEqual(server.messages("INBOX")[0].flags, {"\\Seen"})

    def test_strict_syntax(self):
        server = self.start()
        c = self.raw(server)
        c.login()
        for line in (b'LIST "" "*', b'SELECT "IN\rBOX"', b"UID FETCH (1", b"FOO BAR"):
            with self.subTest(line=line):
                self.assertIn(b" BAD ", c.command(line)[0])
        c.send(b"X1 NOOP\n")
        self.assertIn(b"BAD", c.readline())
        self.assertEqual(server.log[-1].line, b"X1 NOOP\n")

    def test_long_lines_are_recorded_and_refused_as_gmail_does(self):
        server = self.start()
        server.add_message(PLAIN_MSG)
        m = self.imap(server)
        m.select("INBOX")
        m.uid("FETCH", "1:3", "(FLAGS)")
        self.assertEqual(server.long_lines, [])
        with self.assertRaisesRegex(imaplib.IMAP4.error, "TOOBIG"):
            m.uid("FETCH", ",".join(str(n) for n in range(1, 4000, 2)), "(FLAGS)")
        self.assertEqual(len(server.long_lines), 1)

    def test_logout(self):
        server = self.start()
        m = self.imap(server)
        self.assertEqual(m.logout(), ("BYE", [b"LOGOUT Requested"]))


class FakeServerMiscCommandsTest(FakeGmailTestCase):
    def test_enable_id_namespace_list_status(self):
        server = self.start()
        server.add_message(PLAIN_MSG)
        c = self.raw(server)
        c.login()
        self.assertEqual(c.command(b"ENABLE UTF8=ACCEPT CONDSTORE")[1], [b"* ENABLED UTF8=ACCEPT CONDSTORE\r\n"])
        self.assertTrue(c.command(b'ID ("name" "test")')[1][0].startswith(b'* ID ("name" "GImap"'))
        self.assertEqual(c.command(b"NAMESPACE")[1], [b'* NAMESPACE (("" "/")) NIL NIL\r\n'])
        _, untagged = c.command(b'LIST "" "INBOX" RETURN (STATUS (MESSAGES UNSEEN))')
        self.assertEqual(untagged, [b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n',
                                    b'* STATUS "INBOX" (MESSAGES 1 UNSEEN 1)\r\n'])
        self.assertEqual(c.command(b'LSUB "" "[Gmail]/%"')[1][0],
                         b'* LSUB (\\HasNoChildren \\All) "/" "[Gmail]/All Mail"\r\n')

    def test_oauthbearer(self):
        server = self.start()
        c = self.raw(server)
        ir = base64.b64encode(("n,a=%s,\x01auth=Bearer %s\x01\x01" % (USER, TOKEN)).encode())
        tagged, _ = c.command(b"AUTHENTICATE OAUTHBEARER " + ir)
        self.assertEqual(tagged, b"R1 OK user@example.com authenticated (Success)\r\n")

    def test_sequence_number_commands(self):
        server = self.start()
        for flags in ((), ("\\Seen",), ()):
            server.add_message(PLAIN_MSG, flags=flags)
        m = self.imap(server)
        m.select("INBOX")
        self.assertEqual(m.search(None, "UNSEEN"), ("OK", [b"1 3"]))
        self.assertEqual(m.fetch("2", "(UID FLAGS)"), ("OK", [b"2 (UID 2 FLAGS (\\Seen))"]))
        self.assertEqual(m.store("3", "+FLAGS", "(\\Answered)"), ("OK", [b"3 (FLAGS (\\Answered))"]))
        typ, data = m.fetch("1", "(RFC822)")
        self.assertEqual(data[0], (b"1 (RFC822 {%d}" % len(PLAIN_MSG), PLAIN_MSG))
        self.assertIn(b"FLAGS (\\Seen)", data[1])

    def test_examine_refuses_changes(self):
        server = self.start()
        server.add_message(PLAIN_MSG)
        m = self.imap(server)
        m.select("INBOX", readonly=True)
        for args in (("MOVE", "1", '"[Gmail]/Trash"'), ("EXPUNGE", "1"), ("STORE", "1", "+FLAGS", "(\\Seen)")):
            with self.subTest(args=args):
                self.assertEqual(m.uid(*args)[0], "NO")
        m.uid("FETCH", "1", "(BODY[])")  # read-only: does not set \\Seen
        self.assertEqual(server.messages("INBOX")[0].flags, set())
        self.assertEqual(server.uids("INBOX"), [1])

    def test_append_with_date_to_label_and_threading(self):
        server = self.start()
        first = server.add_message(PLAIN_MSG)
        m = self.imap(server)
        m.create("Receipts")
        reply = b"From: bob@example.com\r\nSubject: Re: Invoice 42\r\nIn-Reply-To: <m1@example.com>\r\n\r\nok\r\n"
        when = imaplib.Time2Internaldate(_dtm.datetime(2023, 3, 4, 5, 6, 7, tzinfo=_dtm.timezone.utc))
        self.assertEqual(m.append("Receipts", None, when, reply)[0], "OK")
        msg = server.messages("Receipts")[0]
        self.assertEqual(msg.labels, {"Receipts"})
        self.assertEqual(msg.thrid, server.message(first).thrid)
        self.assertEqual(msg.date, _dtm.datetime(2023, 3, 4, 5, 6, 7, tzinfo=_dtm.timezone.utc))
        m.select("Receipts")
        typ, data = m.uid("FETCH", "1", "(INTERNALDATE X-GM-THRID)")
        self.assertIn(b'INTERNALDATE "04-Mar-2023 05:06:07 +0000"', data[0])
        self.assertEqual(m.append("Nope", None, None, reply)[0], "NO")


class FakeGmailStrictnessTest(FakeGmailTestCase):
    def setUp(self):
        self.server = self.start()
        self.server.add_message(PLAIN_MSG, labels=("\\Inbox", "Receipts"))
        self.client = self.raw(self.server)
        self.client.login()
        self.client.command(b"SELECT INBOX")

    def test_unquoted_labels_gmail_misreads_are_refused(self):
        for label in (b"a*b", b"[x]", b"x%"):
            with self.subTest(label=label):
                tagged, _ = self.client.command(b"UID STORE 1 +X-GM-LABELS (" + label + b")")
                self.assertIn(b" BAD ", tagged)
                tagged, _ = self.client.command(b'UID STORE 1 +X-GM-LABELS ("' + label + b'")')
                self.assertIn(b" OK ", tagged)

    def test_inbox_without_backslash_is_not_taken_for_the_system_label(self):
        tagged, _ = self.client.command(b'UID STORE 1 -X-GM-LABELS ("Inbox")')
        self.assertIn(b" BAD ", tagged)
        self.assertEqual(self.server.uids("INBOX"), [1])
        tagged, _ = self.client.command(b"UID STORE 1 -X-GM-LABELS (\\Inbox)")
        self.assertIn(b" OK ", tagged)
        self.assertEqual(self.server.uids("INBOX"), [])

    def test_the_viewed_folders_own_label_is_left_out(self):
        _, untagged = self.client.command(b"UID FETCH 1 (X-GM-LABELS)")
        self.assertEqual(untagged, [b'* 1 FETCH (UID 1 X-GM-LABELS (Receipts))\r\n'])
        self.client.command(b"SELECT Receipts")
        _, untagged = self.client.command(b"UID FETCH 1 (X-GM-LABELS)")
        self.assertEqual(untagged, [b'* 1 FETCH (UID 1 X-GM-LABELS ("\\\\Inbox"))\r\n'])

    def test_hostile_faults_do_what_they_say(self):
        self.server.add_fault("UID SEARCH", action="huge_search", size=5)
        _, untagged = self.client.command(b"UID SEARCH ALL")
        self.assertEqual(untagged, [b"* SEARCH 1 1 1 1 1\r\n"])
        self.server.add_fault("UID FETCH", action="nesting_bomb", size=3)
        _, untagged = self.client.command(b"UID FETCH 1 (FLAGS)")
        self.assertEqual(untagged, [b"* 1 FETCH (UID 1 BODYSTRUCTURE ((())))\r\n"])
        self.server.add_fault("UID FETCH", action="huge_literal", size=5)
        _, untagged = self.client.command(b"UID FETCH 1 (FLAGS)")
        self.assertEqual(untagged, [b"* 1 FETCH (UID 1 BODY[] {5}\r\nxxxxx)\r\n",
                                    b"* 1 FETCH (UID 1 FLAGS ())\r\n"])
        self.server.add_fault("NOOP", action="exists_flood", size=2)
        _, untagged = self.client.command(b"NOOP")
        self.assertEqual(untagged, [b"* 1 EXISTS\r\n", b"* 2 EXISTS\r\n"])
        self.server.add_fault("UID COPY", action="huge_copyuid")
        tagged, _ = self.client.command(b'UID COPY 1 "[Gmail]/Trash"')
        self.assertIn(b"[COPYUID 1 1:4294967295 1:4294967295]", tagged)
        self.server.add_fault("NOOP", action="dribble", size=4, delay=0.001)
        tagged, _ = self.client.command(b"NOOP")
        self.assertTrue(tagged.endswith(b" OK Success\r\n"))
        before = self.server.uidvalidity("INBOX")
        self.server.add_fault("NOOP", action="renumber")
        self.assertRaises(EOFError, self.client.command, b"NOOP")
        self.assertNotEqual(self.server.uidvalidity("INBOX"), before)

    def test_round_two_faults_do_what_they_say(self):
        self.server.add_fault("NOOP", action="flood", size=3, text="* OK hm")
        _, untagged = self.client.command(b"NOOP")
        self.assertEqual(untagged, [b"* OK hm\r\n"] * 3)
        self.server.add_fault("NOOP", action="lying_exists")
        _, untagged = self.client.command(b"NOOP")
        self.assertEqual(untagged, [b"* 4294967295 EXISTS\r\n"])
        self.server.add_fault("LIST", action="big_list", size=2, burst=3)
        _, untagged = self.client.command(b'LIST "" "nothing"')
        self.assertEqual(untagged, [b'* LIST (\\HasNoChildren) "/" "xxx0"\r\n',
                                    b'* LIST (\\HasNoChildren) "/" "xxx1"\r\n'])
        self.server.add_fault("UID FETCH", action="repeat_fetch", size=2)
        _, untagged = self.client.command(b"UID FETCH 1 (FLAGS)")
        self.assertEqual(untagged, [b"* 1 FETCH (UID 1 FLAGS ())\r\n"] * 3)
        self.server.add_fault("NOOP", action="echo")
        tagged, untagged = self.client.command(b'NOOP "secret"')
        self.assertEqual(untagged, [b'* NO [ALERT] we did not like NOOP "secret"\r\n'])
        self.assertTrue(tagged.endswith(b' NO your command was NOOP "secret"\r\n'))


# --- Helpers shared by the tests ---------------------------------------------------------

NOW = datetime(2024, 3, 31, 12, 0, tzinfo=timezone.utc)

EXAMPLE_TOML = r'''
[[rule]]
name = "Receipts"
subject = ["receipt", "invoice", "/order #?\\d{5,}/i"]   # any of; plain = case-insensitive substring
label = "Receipts"
archive = true

[[rule]]
name = "Newsletters"
header = { "List-Unsubscribe" = true }                  # true = header present
label = "Newsletters"
mark_read = true

[[rule]]
name = "GitHub"
from = "notifications@github.com"
label = ["GitHub", "Dev/Notifications"]

[[rule]]
name = "Bank"
any = [ { from = "@mybank.example" }, { subject = "/account alert/i" } ]
star = true
continue = true

[[rule]]
name = "Old and big"
larger_than = "5M"
older_than = "1y"
not = { has_label = "Keep" }
trash = true
'''

EXAMPLE_DOC = {
    "rule": [
        {"name": "Receipts", "subject": ["receipt", "invoice", "/order #?\\d{5,}/i"],
         "label": "Receipts", "archive": True},
        {"name": "Newsletters", "header": {"List-Unsubscribe": True},
         "label": "Newsletters", "mark_read": True},
        {"name": "GitHub", "from": "notifications@github.com",
         "label": ["GitHub", "Dev/Notifications"]},
        {"name": "Bank", "any": [{"from": "@mybank.example"}, {"subject": "/account alert/i"}],
         "star": True, "continue": True},
        {"name": "Old and big", "larger_than": "5M", "older_than": "1y",
         "not": {"has_label": "Keep"}, "trash": True},
    ],
}


def info(headers: str = "", **fields) -> MessageInfo:
    """A MessageInfo from header lines given as text ('\\n' line ends)."""
    raw = headers.strip("\n").replace("\n", "\r\n").encode("utf-8") + b"\r\n\r\n"
    return MessageInfo(headers=parse_headers(raw), **fields)


def one_rule(**rule) -> gc.Ruleset:
    """A ruleset of one rule that labels 'hit'."""
    rule.setdefault("label", "hit")
    return parse_rules({"rule": [dict(name="r", **rule)]}, "t.toml")


def hit(ruleset: gc.Ruleset, msg: MessageInfo, final: bool = True):
    """True / False for a decided message, None when undecided."""
    decision = ruleset.classify(msg, final=final, now=NOW)
    return None if decision is None else bool(decision.matches)


class TempDirMixin:
    def make_dir(self) -> str:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        return tmp.name

_STATE_ROOT = tempfile.TemporaryDirectory(prefix="gmail_classify_state_")


def while_driven(script: Callable[[], None],
                 command: Callable[[], Tuple[int, str, str]]) -> Tuple[int, str, str]:
    """``command()`` (a `watch`, which must run in the main thread for its signals) while
    ``script`` drives it from another thread; then SIGTERM ends it, as systemd would.  An
    assertion that failed in ``script`` is raised here."""
    problems: List[BaseException] = []

    def drive() -> None:
        try:
            script()
        except BaseException as exc:
            problems.append(exc)
        finally:
            wait_until(lambda: signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None),
                       timeout=15, message="watch installed no SIGTERM handler")
            os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    result = command()
    driver.join(20)
    if problems:
        raise problems[0]
    return result


def run_cli(*argv: str, env: Optional[dict] = None) -> Tuple[int, str, str]:
    """Run gc.main in-process; returns (exit code, stdout, stderr).

    Unless ``env`` names an XDG_STATE_HOME, each call gets a fresh empty one, so no test
    reads or writes the real ~/.local/state and every run starts without state.
    """
    out, err = io.StringIO(), io.StringIO()
    environ = {k: v for k, v in os.environ.items()
               if k not in ("GMAIL_APP_PASSWORD", "GMAIL_USER", "GMAIL_OAUTH_TOKEN",
                            "IMAP_USER", "IMAP_PASSWORD")}
    environ["XDG_STATE_HOME"] = tempfile.mkdtemp(dir=_STATE_ROOT.name)
    environ.update(env or {})
    logger = logging.getLogger("gmail_classify")
    handlers = list(logger.handlers)
    with mock.patch.dict(os.environ, environ, clear=True), \
            mock.patch("sys.stdout", out), mock.patch("sys.stderr", err), \
            mock.patch("sys.stdin", io.StringIO()):
        try:
            code = gc.main(list(argv), out=out)
        except SystemExit as exc:   # argparse
            code = exc.code if isinstance(exc.code, int) else 2
        finally:
            for handler in list(logger.handlers):
                if handler not in handlers:
                    logger.removeHandler(handler)
    return code, out.getvalue(), err.getvalue()

PASSWORD = "abcdabcdabcdabcd"

TOKEN = "ya29.good-token"

USER = "user@example.com"


def make_message(subject: str = "Hello", sender: str = "Alice <alice@example.com>",
                 body: str = "Hi there.\n", extra: str = "", to: str = USER) -> bytes:
    text = (f"From: {sender}\nTo: {to}\nSubject: {subject}\n"
            f"Message-ID: <{abs(hash((subject, sender, body)))}@example.com>\n"
            f"Date: Mon, 04 Mar 2024 10:00:00 +0000\n{extra}\n{body}")
    return text.replace("\n", "\r\n").encode("utf-8")


class Recorder:
    """An injectable sleep that records the backoff delays instead of waiting."""

    def __init__(self):
        self.delays: List[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class FakeServerTest(unittest.TestCase):
    """Starts a FakeGmail per test; ``connect()`` opens a GmailConnection to it."""

    server_options: Dict[str, Any] = {}

    def setUp(self):
        self.server = FakeGmail(**self.server_options).start()
        self.addCleanup(self.check_fake_had_no_bugs)
        self.addCleanup(self.server.stop)
        self.sleep = Recorder()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def check_fake_had_no_bugs(self) -> None:
        self.assertEqual(self.server.errors, [], "the fake server itself failed")

    def connect(self, **overrides: Any) -> gc.GmailConnection:
        options: Dict[str, Any] = dict(host="127.0.0.1", port=self.server.port,
                                       security="plaintext", password=PASSWORD, timeout=5,
                                       keepalive=None, retries=3, sleep=self.sleep,
                                       rng=lambda: 1.0)
        options.update(overrides)
        if "token" in overrides:
            options.pop("password")
        conn = gc.GmailConnection(USER, **options)
        conn.connect()
        self.addCleanup(conn.close)
        return conn

    def commands(self) -> List[str]:
        return self.server.commands()

WRITE_COMMANDS = {"UID STORE", "STORE", "UID MOVE", "MOVE", "UID COPY", "COPY", "CREATE",
                  "EXPUNGE", "UID EXPUNGE", "APPEND", "DELETE", "RENAME", "SELECT"}

# Issue 6.  Every test names the server kind it runs against (SERVER_KINDS); the matrix
# test runs the same rules against each kind and checks the final mailboxes.

KIND_RULES = {"rule": [
    {"name": "Receipts", "subject": "receipt", "label": "Receipts/2024", "archive": True},
    {"name": "Lists", "header": {"List-Id": True}, "move": "Lists"},
    {"name": "Spam", "from": "@spam.example", "trash": True},
    {"name": "Bank", "from": "@mybank.example", "star": True},
]}


def errors(stderr: str) -> List[str]:
    """The error lines of a run's stderr (an --apply also says how many changes it made)."""
    return [line for line in stderr.splitlines() if line.startswith("gmail_classify: ")]


class AnyServerTest(FakeServerTest):
    """FakeServerTest with helpers to start servers of a given kind."""

    def serve(self, kind: Optional[str] = None, **options: Any) -> FakeGmail:
        server = FakeGmail(kind=kind, **options).start()
        self.addCleanup(lambda: self.assertEqual(server.errors, [], "the fake server failed"))
        self.addCleanup(server.stop)
        self.server = server
        return server

    def seed(self) -> Dict[str, int]:
        add = self.server.add_message
        return {"receipt": add(make_message("Your receipt #1")),
                "list": add(make_message("Digest", extra="List-Id: <dev.lists.example>\n")),
                "spam": add(make_message("Win!", sender="x@spam.example")),
                "bank": add(make_message("Statement", sender="Bank <b@mybank.example>")),
                "other": add(make_message("Lunch?"))}

    def subjects(self, folder: str) -> List[str]:
        return sorted(str(email.message_from_bytes(m.raw)["Subject"])
                      for m in self.server.messages(folder))

    def lines(self, command: str) -> List[bytes]:
        return [e.line for e in self.server.log if e.command == command]

    def writes(self) -> set:
        return set(self.commands()) & (WRITE_COMMANDS - {"SELECT"})

    def cli(self, *extra: str) -> Tuple[int, str, str]:
        path = os.path.join(self.tmp, "rules.json")
        if not os.path.exists(path):
            with open(path, "w") as handle:
                json.dump(self.rules_doc, handle)
        return run_cli("--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                       "--plaintext", "--retries", "1", "--rules", path, *extra,
                       env={"GMAIL_APP_PASSWORD": PASSWORD})

    rules_doc: Dict[str, Any] = KIND_RULES

SWEEP_DOC = {"rule": [
    {"name": "Receipts", "subject": "receipt", "label": "Receipts", "archive": True},
    {"name": "News", "header": {"List-Unsubscribe": True}, "label": "News", "mark_read": True},
    {"name": "Digests", "subject": "digest", "move": "Lists"},
    {"name": "Spam", "from": "@spam.example", "trash": True},
    {"name": "Boss", "from": "boss@", "star": True, "label": ["Work", "Two words"]},
]}


def seed_mailbox(server: FakeGmail, n: int) -> None:
    """n messages that between them need every kind of change SWEEP_DOC makes, some of
    them already partly done (read, labelled) so that only what is missing is changed."""
    for index in range(n):
        kind = index % 6
        subject, sender, extra = f"hello {index}", "Alice <alice@example.com>", ""
        if kind == 0:
            subject = f"receipt {index}"
        elif kind == 1:
            subject, extra = f"news {index}", "List-Unsubscribe: <mailto:u@x>\n"
        elif kind == 2:
            subject = f"weekly digest {index}"
        elif kind == 3:
            sender = f"Deal <offer{index}@spam.example>"
        elif kind == 4:
            sender = "The Boss <boss@example.com>"
        flags = ("\\Seen",) if index % 7 == 0 else ()
        options: Dict[str, Any] = {"flags": flags}
        if server.gmail and index % 11 == 0:
            options["labels"] = ("\\Inbox", "Receipts")
        server.add_message(make_message(subject, sender=sender, body=f"text {index}\n",
                                        extra=extra), **options)


def _message_id_of(raw: bytes) -> str:
    found = re.search(rb"(?im)^Message-ID:\s*(<[^>]*>)", raw)
    return found.group(1).decode() if found else ""


def mailbox_snapshot(server: FakeGmail) -> Dict[str, List[Tuple[str, Tuple[str, ...], Tuple[str, ...]]]]:
    """Every folder's messages as (Message-ID, flags, labels), UIDs left out."""
    result = {}
    for name in server.folder_names():
        if name in ("[Gmail]", "[Google Mail]"):
            continue
        result[name] = sorted((_message_id_of(m.raw), tuple(sorted(m.flags)),
                               tuple(sorted(m.labels)) if server.gmail else ())
                              for m in server.messages(name))
    return result


def state_snapshot(state_dir: str) -> Dict[str, Any]:
    """The state file without what legitimately differs between runs (times, bytes)."""
    with open(os.path.join(state_dir, "state.json"), encoding="utf-8") as handle:
        data = json.load(handle)
    for account in data["accounts"].values():
        account.pop("downloads", None)
        for folder in account.get("folders", {}).values():
            folder.pop("updated", None)
    return data


class Clock:
    """An injectable now() for StateStore; ``advance`` moves it on."""

    def __init__(self, start: datetime = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class StateTestCase(FakeServerTest):
    """Runs through gc.Run against the fake server, with a state directory per test."""

    def setUp(self):
        super().setUp()
        self.state_dir = os.path.join(self.tmp, "state")
        self.clock = Clock()

    def store(self, state_dir: Optional[str] = None) -> gc.StateStore:
        store = gc.StateStore(state_dir or self.state_dir, now=self.clock)
        store.load()
        return store

    def run_once(self, rules: Optional[gc.Ruleset] = None, *, apply: bool = True,
                 folders: Sequence[str] = ("INBOX",), server: Optional[FakeGmail] = None,
                 state_dir: Optional[str] = None, retries: int = 3, batch_size: int = 1000,
                 apply_every: int = gc.DEFAULT_APPLY_EVERY, records: Optional[list] = None,
                 **options: Any) -> gc.Run:
        """One run; on an error the run is finished as 'failed' and the error re-raised."""
        server = server or self.server
        store = self.store(state_dir)
        rules = rules or gc.parse_rules(SWEEP_DOC, "rules.json")
        classify_options = {k: options.pop(k) for k in ("since", "limit") if k in options}
        run = gc.Run(store, rules, USER, "127.0.0.1", server.port, apply=apply,
                     on_record=None if records is None else records.append, **options)
        conn = gc.GmailConnection(USER, host="127.0.0.1", port=server.port,
                                  security="plaintext", password=PASSWORD, timeout=5,
                                  keepalive=None, retries=retries, sleep=lambda s: None)
        try:
            with (store.lock(run.account) if apply else contextlib.nullcontext()):
                conn.connect()
                for folder in folders:
                    run.classify(conn, folder, batch_size=batch_size, apply_every=apply_every,
                                 **classify_options)
        except BaseException as exc:
            run.finish("failed", str(exc))
            raise
        finally:
            conn.close()
        run.finish()
        return run

    def mark(self, folder: str = "INBOX", state_dir: Optional[str] = None) -> Optional[gc.FolderState]:
        store = self.store(state_dir)
        return store.folder(gc.account_key(USER, "127.0.0.1", self.server.port), folder)

    def fetch_lines(self, since: int = 0) -> List[bytes]:
        return [e.line for e in self.server.log[since:] if e.command == "UID FETCH"]

UNWRITABLE = "/proc/nope"    # no one can create a folder here, not even root

# Nothing a server, a sender or a typo can do makes gmail_classify leak a secret, hang or
# crash.  The hostile servers are FakeGmail faults (see _HOSTILE_ACTIONS).

_real_getaddrinfo = socket.getaddrinfo


def fake_resolver(answers: Dict[str, List[Any]]) -> Callable[..., Any]:
    """A getaddrinfo that answers the names in ``answers`` (one answer per call, in order:
    an address string, or an exception to raise) and resolves everything else for real."""
    calls: Dict[str, int] = collections.defaultdict(int)

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return _real_getaddrinfo(host, port, *args, **kwargs)
        index = min(calls[host], len(answers[host]) - 1)
        calls[host] += 1
        answer = answers[host][index]
        if isinstance(answer, BaseException):
            raise answer
        family = socket.AF_INET6 if ":" in answer else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (answer, port or 0))]

    resolve.calls = calls   # type: ignore[attr-defined]
    return resolve

README_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")

BENCH_RULES = {
    "rule": [r for r in gc._BUILTIN_DOC["rule"]] + [
        {"name": "GitHub", "from": "notifications@github.com", "label": ["GitHub", "Dev/Notifications"]},
        {"name": "Bank", "any": [{"from": "@mybank.example"}, {"subject": "/account alert/i"}],
         "star": True, "continue": True},
        {"name": "Team", "recipient": ["team@example.com", "/^staff@/"], "label": "Team"},
        {"name": "Old attachments", "has_attachment": True, "older_than": "2y",
         "larger_than": "20K", "move": "Old attachments"},
        {"name": "Friends", "from": ["müller", "françois", "山田"], "subject": "/\\S/",
         "label": "Friends", "archive": True},
    ],
}

_BENCH_SENDERS = (
    "Alice Example <alice@example.com>", '"Doe, John" <john.doe@corp.example>',
    "=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <joerg@example.de>",
    "=?ISO-8859-1?Q?Fran=E7ois_Dupont?= <francois@example.fr>",
    "=?UTF-8?B?5bGx55Sw5aSq6YOO?= <yamada@example.jp>", "no-reply@accounts.example.com",
    "GitHub <notifications@github.com>", "Amazon.com <auto-confirm@amazon.com>",
    "Bank <alerts@mybank.example>", "old.style@example.net (Old Style)",
    "newsletter@shop.example", "Weekly Digest <digest@news.example>",
    '"=?utf-8?q?Caf=C3=A9?= Team" <cafe@example.org>', "<bare@example.com>",
    "Support Team <support@service.example>", "Mr. Smith <smith@example.co.uk>",
)

_BENCH_RECIPIENTS = (
    "user@example.com", "User <user@example.com>", "Team: team@example.com, ann@example.com;",
    "undisclosed-recipients:;", "staff@example.com, user@example.com",
    '"Example, User" <user@example.com>, =?UTF-8?Q?B=C3=A9a?= <bea@example.com>',
)

_BENCH_SUBJECTS = (
    "Your receipt #{n}", "Invitation: Standup @ Mon {n}", "Security alert: new sign-in",
    "=?UTF-8?B?SWhyZSBCZXN0ZWxsYmVzdMOkdGlndW5nIE5yLiB7bn0=?=", "[repo] Issue #{n}: fix the parser",
    "Weekly digest {n}", "Re: lunch on day {n}?", "=?UTF-8?Q?Caf=C3=A9_ol=C3=A9_{n}?=",
    "Account alert: statement {n} is ready", "Order confirmation {n} and a much longer subject line\r\n"
    " that is folded onto a second line", "=?iso-8859-1?q?R=E9union_{n}?=", "hello {n}",
    "=?utf-8?b?broken {n}?=", "Meeting notes {n}", "=?koi8-r?b?8NLJ18XU?= {n}",
    "FW: quarterly numbers {n}",
)


def bench_corpus(count: int, seed: int = 8) -> Iterator[Tuple[bytes, _dtm.datetime]]:
    """A varied, reproducible mailbox: (raw message, INTERNALDATE) pairs."""
    import random
    rng = random.Random(seed)
    now = _dtm.datetime(2026, 11, 30, 12, 0, tzinfo=_UTC)
    filler = "The quick brown fox jumps over the lazy dog. " * 4 + "\r\n"
    for n in range(1, count + 1):
        date = now - _dtm.timedelta(seconds=rng.randrange(3 * 365 * 86400))
        sender = rng.choice(_BENCH_SENDERS)
        subject = rng.choice(_BENCH_SUBJECTS).replace("{n}", str(n))
        if "=?UTF-8?B?SWhy" in subject:
            subject = "=?UTF-8?B?%s?=" % base64.b64encode(
                ("Ihre Bestellbestätigung Nr. %d" % n).encode()).decode()
        lines = ["From: " + sender, "To: " + rng.choice(_BENCH_RECIPIENTS), "Subject: " + subject,
                 "Date: " + email.utils.format_datetime(date),
                 "Message-ID: <%d.%d@bench.example>" % (n, seed), "MIME-Version: 1.0"]
        if "digest" in sender or "newsletter" in sender or rng.random() < 0.15:
            lines += ["List-Id: Weekly news <news.example.com>",
                      "List-Unsubscribe: <mailto:unsubscribe@news.example>"]
        if rng.random() < 0.3:
            lines.append("Received: from mx.example.net (mx.example.net [192.0.2.%d]) by mx.google.com"
                         "\r\n\twith ESMTPS id %d; %s" % (n % 250, n, email.utils.format_datetime(date)))
        body = filler * rng.randrange(1, 12)
        if rng.random() < 0.1:
            blob = base64.encodebytes(rng.getrandbits(8 * 1024 * rng.randrange(4, 40)).to_bytes(
                1024 * 40, "little")[:1024 * rng.randrange(4, 40)]).decode().replace("\n", "\r\n")
            lines.append('Content-Type: multipart/mixed; boundary="b%d"' % n)
            text = ("--b{0}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{1}\r\n--b{0}\r\n"
                    "Content-Type: application/pdf; name=\"r{0}.pdf\"\r\nContent-Disposition: attachment; "
                    "filename=\"r{0}.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{2}--b{0}--\r\n"
                    ).format(n, body, blob)
        else:
            lines.append("Content-Type: text/plain; charset=utf-8")
            text = body
        yield ("\r\n".join(lines) + "\r\n\r\n" + text).encode("utf-8"), date


# --- Wire format: quoting, modified UTF-7, UID sets, dates -------------------------------


class WireFormatTest(unittest.TestCase):
    UTF7_VECTORS = [
        ("INBOX", "INBOX"),
        ("Entwürfe", "Entw&APw-rfe"),
        ("日本語", "&ZeVnLIqe-"),
        ("Tom & Jerry", "Tom &- Jerry"),
        ("~peter/mail/日本語/台北", "~peter/mail/&ZeVnLIqe-/&U,BTFw-"),
        ("Корзина", "&BBoEPgRABDcEOAQ9BDA-"),
        ("😀", "&2D3eAA-"),
        ("&", "&-"),
    ]

    def test_modified_utf7_round_trips_both_ways(self):
        for text, wire in self.UTF7_VECTORS:
            with self.subTest(text=text):
                self.assertEqual(gc.encode_mailbox(text), wire)
                self.assertEqual(gc.decode_mailbox(wire), text)
                self.assertEqual(gc.decode_mailbox(wire.encode()), text)

    def test_decode_mailbox_keeps_malformed_runs(self):
        self.assertEqual(gc.decode_mailbox("a&Ze-b"), "a&Ze-b")   # one byte of UTF-16

    def test_quote_escapes_quotes_and_backslashes(self):
        self.assertEqual(gc.quote('Bills "2024"'), b'"Bills \\"2024\\""')
        self.assertEqual(gc.quote("a\\b"), b'"a\\\\b"')

    def test_quote_refuses_line_breaks_and_nul(self):
        for bad in ['Bills "2024"\r\nA1 LOGOUT', "a\nb", "a\rb", "a\x00b"]:
            with self.subTest(bad=bad), self.assertRaises(gc.ImapError) as ctx:
                gc.quote(bad)
            self.assertIn("CR, LF or NUL", str(ctx.exception))

    def test_astring_uses_atoms_only_when_safe(self):
        table = [("Receipts", b"Receipts"), ("two words", b'"two words"'),
                 ("a*b", b'"a*b"'), ("(foo)", b'"(foo)"'), ("[bar]", b'"[bar]"'),
                 ("NIL", b'"NIL"'), ("", b'""')]
        for text, wire in table:
            with self.subTest(text=text):
                self.assertEqual(gc.astring(text), wire)

    def test_compress_uids_makes_ranges(self):
        table = [([1], "1"), ([3, 1, 2], "1:3"), ([1, 2, 3, 5, 9, 10], "1:3,5,9:10"),
                 ([7, 7, 7], "7")]
        for uids, text in table:
            with self.subTest(uids=uids):
                self.assertEqual(gc.compress_uids(uids), text)
                self.assertEqual(gc.parse_uid_set(text), sorted(set(uids)))
        with self.assertRaises(ValueError):
            gc.compress_uids([])

    def test_parse_uid_set_star_needs_highest(self):
        self.assertEqual(gc.parse_uid_set("5:*", highest=7), [5, 6, 7])
        self.assertEqual(gc.parse_uid_set("9:*", highest=7), [7, 8, 9])
        with self.assertRaises(ValueError):
            gc.parse_uid_set("1:*")

    def test_chunk_uids_keeps_every_set_under_the_limit(self):
        uids = list(range(1, 40000, 2))   # no runs: the worst case
        chunks = list(gc.chunk_uids(uids))
        self.assertGreater(len(chunks), 1)
        self.assertEqual([u for chunk in chunks for u in chunk], uids)
        for chunk in chunks:
            self.assertLessEqual(len(gc.compress_uids(chunk)), gc.MAX_UID_SET_CHARS)
        self.assertEqual(list(gc.chunk_uids(range(1, 100001))), [list(range(1, 100001))])

    def test_imap_date_ignores_locale(self):
        self.assertEqual(gc.imap_date(date(2024, 3, 5)), "05-Mar-2024")
        parsed = gc.parse_internaldate("17-Jul-1996 02:44:25 -0700")
        self.assertEqual(parsed, datetime(1996, 7, 17, 9, 44, 25, tzinfo=timezone.utc))
        self.assertIsNone(gc.parse_internaldate("yesterday"))


class OneDateGrammarTest(unittest.TestCase):
    """The same dates are valid on every Python (fromisoformat grew on 3.11)."""

    UTC = timezone.utc

    def rule_test_date(self, value: str) -> Any:
        doc = {"rule": [{"name": "R", "subject": "x", "star": True}],
               "test": [{"subject": "x", "date": value, "expect_rules": ["R"]}]}
        return gc.parse_rules(doc, "r.json").tests[0].message.date

    def test_rule_test_dates(self):
        plus1 = timezone(timedelta(hours=1))
        table = [
            ("2024-03-04", datetime(2024, 3, 4, tzinfo=self.UTC)),
            ("2024-03-04T10:00:00Z", datetime(2024, 3, 4, 10, tzinfo=self.UTC)),
            ("2024-03-04T10:00Z", datetime(2024, 3, 4, 10, tzinfo=self.UTC)),
            ("2024-03-04T10:00:00+01:00", datetime(2024, 3, 4, 10, tzinfo=plus1)),
            ("2024-03-04T10:00:00-05:30", datetime(2024, 3, 4, 15, 30, tzinfo=self.UTC)),
            ("2024-03-04 10:00:00.5+01:00", datetime(2024, 3, 4, 10, tzinfo=plus1)),
            ("2024-03-04T10:00:00", datetime(2024, 3, 4, 10, tzinfo=self.UTC)),
            (" 2024-03-04 ", datetime(2024, 3, 4, tzinfo=self.UTC)),
            ("Mon, 04 Mar 2024 10:00:00 +0000", datetime(2024, 3, 4, 10, tzinfo=self.UTC)),
        ]
        for text, expected in table:
            with self.subTest(text):
                self.assertEqual(self.rule_test_date(text), expected)
        for text in ("20240304", "2024-03-04T10", "2024-3-4", "2024-02-30", "2024-03-04T25:00",
                     "2024-03-04T10:00:00+24:00", "2024-03-04T10:00:00+0100", "2024-W10-1",
                     "2024-03-04T10:00:00.1234567", "tomorrow", "２０２４-03-04"):
            with self.subTest(text):
                with self.assertRaises(gc.RulesError) as caught:
                    self.rule_test_date(text)
                self.assertIn('expected a date like "2024-03-04"', str(caught.exception))

    def test_the_one_parser(self):
        self.assertEqual(gc._parse_iso_date("2024-03-04 10:00:00.5+01:00", with_time=True),
                         datetime(2024, 3, 4, 10, 0, 0, 500000, timezone(timedelta(hours=1))))
        self.assertEqual(gc._parse_iso_date("2024-03-04"), datetime(2024, 3, 4))
        self.assertIsNone(gc._parse_iso_date("2024-03-04T10:00"))

    def test_since(self):
        self.assertEqual(gc._parse_since("2024-03-04"), date(2024, 3, 4))
        for text in ("20240304", "2024-03-04T10:00:00Z", "2024-03-04T10:00", "2024-02-30",
                     "2024-3-4", "2024-W10"):
            with self.subTest(text):
                with self.assertRaises(gc.argparse.ArgumentTypeError):
                    gc._parse_since(text)
        code, out, err = run_cli("--user", USER, "--since", "20240304", "run")
        self.assertEqual(code, gc.EXIT_USAGE, err)
        self.assertIn("expected a date as YYYY-MM-DD", err)


# --- Wire format: the response parser ----------------------------------------------------


class ParserTest(unittest.TestCase):
    def test_parse_response_table(self):
        table = [
            (b"5 EXISTS", [5, "EXISTS"]),
            (b"SEARCH 1 5 9", ["SEARCH", 1, 5, 9]),
            (b"SEARCH", ["SEARCH"]),
            (b'LIST (\\HasNoChildren \\Trash) "/" "[Gmail]/Trash"',
             ["LIST", ["\\HasNoChildren", "\\Trash"], "/", "[Gmail]/Trash"]),
            (b'LIST (\\Noselect) NIL INBOX', ["LIST", ["\\Noselect"], None, "INBOX"]),
            (b'1 FETCH (UID 10 BODY[HEADER.FIELDS (FROM SUBJECT)] {7}\r\nFrom: a)',
             [1, "FETCH", ["UID", 10, "BODY[HEADER.FIELDS (FROM SUBJECT)]", b"From: a"]]),
            (b'2 FETCH (UID 3 BODY[TEXT]<0> {3}\r\n)x) FLAGS ())',
             [2, "FETCH", ["UID", 3, "BODY[TEXT]<0>", b")x)", "FLAGS", []]]),
            (b'3 FETCH (X-GM-LABELS ("\\\\Important" "\\\\Starred" "(foo)" "[bar]" fav "two words" "a*b"))',
             [3, "FETCH", ["X-GM-LABELS", ["\\Important", "\\Starred", "(foo)", "[bar]", "fav",
                                           "two words", "a*b"]]]),
            (b'4 FETCH (X-GM-MSGID 18446744073709551615 FLAGS (\\Seen $Junk))',
             [4, "FETCH", ["X-GM-MSGID", 18446744073709551615, "FLAGS", ["\\Seen", "$Junk"]]]),
            (b'5 FETCH (BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 3 1)'
             b' "mixed"))',
             [5, "FETCH", ["BODYSTRUCTURE", [["text", "plain", ["charset", "utf-8"], None, None,
                                              "7bit", 3, 1], "mixed"]]]),
            (b'6 FETCH (ENVELOPE ("quoted \\"x\\" \\\\ y"))',
             [6, "FETCH", ["ENVELOPE", ['quoted "x" \\ y']]]),
        ]
        for data, expected in table:
            with self.subTest(data=data):
                self.assertEqual(gc.parse_response(data), expected)

    def test_parse_response_rejects_malformed_input_quoting_it(self):
        table = [b'1 FETCH (UID 7 FLAGS (\\Seen', b'1 FETCH (UID "open',
                 b'1 FETCH (BODY[TEXT {5}\r\nab)', b'1 FETCH (X {10}\r\nshort)',
                 b'1 FETCH (X "a\r\nb")', b'1 FETCH )']
        for data in table:
            with self.subTest(data=data), self.assertRaises(gc.ProtocolError) as ctx:
                gc.parse_response(data)
            self.assertIn("near b'", str(ctx.exception))

    def test_parse_status_text_reads_codes(self):
        table = [
            (b"[COPYUID 9 1:2 5:6] Done", ("COPYUID", [9, "1:2", "5:6"], "Done")),
            (b"[UIDVALIDITY 3857529045] UIDs valid", ("UIDVALIDITY", [3857529045], "UIDs valid")),
            (b"[PERMANENTFLAGS (\\Seen foo]bar \\*)] Flags",
             ("PERMANENTFLAGS", [["\\Seen", "foo]bar", "\\*"]], "Flags")),
            (b"[AUTHENTICATIONFAILED] Invalid credentials (Failure)",
             ("AUTHENTICATIONFAILED", [], "Invalid credentials (Failure)")),
            (b"Success", ("", [], "Success")),
        ]
        for data, expected in table:
            with self.subTest(data=data):
                self.assertEqual(gc.parse_status_text(data), expected)


class ParserFaultsTest(AnyServerTest):
    def test_all_digit_atoms_stay_text_where_the_grammar_says_astring(self):
        parsed = gc.parse_response(b'LIST (\\HasNoChildren) "/" 0123')
        self.assertEqual(str(parsed[3]), "0123")
        exists = gc.parse_response(b"0012 EXISTS")[0]
        self.assertEqual((exists, exists + 1), (12, 13))
        self.assertEqual(gc.parse_status_text(b"[UIDNEXT 0042] x")[1][0] + 0, 42)
        self.serve("gmail")
        self.server.add_message(make_message("x"), labels=("\\Inbox", "007"), flags=("0123",))
        conn = self.connect()
        conn.select("INBOX")
        values = conn.fetch([1], ["FLAGS", "X-GM-LABELS"])[1]
        self.assertIn("0123", values["FLAGS"])
        self.assertIn("007", values["X-GM-LABELS"])
        rules = gc.parse_rules({"rule": [{"has_label": "007", "star": True}]}, "r.json")
        report = gc.classify_folder(conn, rules, "INBOX")
        self.assertEqual(report.changes, {"star": 1})


def _reference_weight(value: Any, depth: int = 0) -> int:
    """_weight as first written (one call per value): what the flood limits were set by."""
    if isinstance(value, (bytes, str)):
        return len(value) + 8
    if isinstance(value, list) and depth < gc.MAX_NESTING:
        return 16 + sum(_reference_weight(item, depth + 1) for item in value)
    return 8


class HotPathEquivalenceTest(unittest.TestCase):
    """Each shortcut on the hot path gives exactly what the plain way gives."""

    def test_weight_is_the_recursive_definition(self):
        import random
        rng = random.Random(17)
        leaves = [b"", b"abc", "", "\\Seen", 0, 7, gc.Number("0123"), None, b"x" * 300, True]

        def value(depth: int) -> Any:
            if depth < 4 and rng.random() < 0.3:
                return [value(depth + 1) for _ in range(rng.randrange(0, 6))]
            return rng.choice(leaves)
        samples = [value(0) for _ in range(2000)]
        deep: List[Any] = [b"end"]
        for _ in range(gc.MAX_NESTING + 5):     # past the nesting limit: counted as 8 there
            deep = [deep, "x"]
        samples += [deep, deep[0][0], [], [[]], b"literal", "atom", 12]
        for sample in samples:
            self.assertEqual(gc._weight(sample), _reference_weight(sample), sample)

    def test_numbers_do_not_crowd_the_words_out_of_the_atom_table(self):
        # A SEARCH answer of many UIDs came first and filled the table: every FETCH, UID
        # and NIL after it was converted again, for every message.
        with mock.patch.dict(gc._ATOM_VALUES, clear=True):
            gc.parse_response(b"SEARCH " + b" ".join(b"%d" % n for n in range(1, 6001)))
            gc._parse_plain(b"SEARCH 0123 4567")
            self.assertFalse([v for v in gc._ATOM_VALUES.values() if isinstance(v, int)])
            line = b"1 FETCH (UID 5 FLAGS (\\Seen) X-GM-LABELS NIL)"
            gc.parse_response(line)
            with mock.patch.object(gc, "_convert_atom", wraps=gc._convert_atom) as convert:
                self.assertEqual(gc.parse_response(line),
                                 [1, "FETCH", ["UID", 5, "FLAGS", ["\\Seen"], "X-GM-LABELS", None]])
            self.assertEqual(convert.call_count, 0)
            self.assertEqual(gc._parse_plain(line), gc.parse_response(line))

    def test_digit_atoms_read_alike_on_both_paths(self):
        def shape(value: Any) -> Any:
            if isinstance(value, list):
                return [shape(item) for item in value]
            return (type(value).__name__, value if isinstance(value, bytes) else str(value))

        def outcome(parse: Callable[[bytes], Any], data: bytes) -> Any:
            try:
                return shape(parse(data))
            except gc.ProtocolError as exc:
                return "error: %s" % exc
        cases = [b"123", b"0123", b"00", b"123[", b"123[a]", b"123[a]<0>", b"123]", b"12a", b"a12",
                 b"12{3}\r\nabc", b'12"x"', b"12(", b"(12)", b"12)", b"12 34", b"12~", b"12\\",
                 "\u0661\u0662".encode(), b"1\xff", b"12\r", b"12\n", b"12.5", b"-1", b"+1",
                 b"4294967296 18446744073709551615", b"1 FETCH (UID 0007 RFC822.SIZE 12)"]
        for data in cases:
            with self.subTest(data=data):
                self.assertEqual(outcome(gc.parse_response, data), outcome(gc._parse_plain, data))
        self.assertEqual(str(gc.parse_response(b"LIST () \"/\" 0123")[3]), "0123")
        self.assertIs(type(gc.parse_response(b"7")[0]), gc.Number)

    def test_tokenizer_runs_between_literals_read_as_the_plain_parser(self):
        import random
        rng = random.Random(1717)
        pieces = [b"(", b")", b" ", b"  ", b'"a b"', b'"a\\"b"', b'""', b'"a\\\r\nb"', b'"x\\\\"',
                  b"{3}\r\nabc", b"{3}\r\n\r\n ", b"{2}\r\n  ", b"{0}\r\n", b"~{2}\r\n{}", b"{9}\r\nab",
                  b"\r\n", b"\r", b"\n", b"NIL", b"12", b"12[", b"0x", b"BODY[HEADER.FIELDS (FROM)]",
                  b"BODY[a", b"]", b"[", b"{", b"{3+}\r\nab)", b"\\Seen", b"FETCH", b"\xff", b'"\xc3\xa9"']
        samples = [b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 14)))
                   for _ in range(4000)]
        samples += [b"1 FETCH (UID 7 BODY[HEADER] {6}\r\nab\r\n\r\n FLAGS (\\Seen))   ",
                    b"2 FETCH (BODY[1] {2}\r\n\r\n BODY[2] {3}\r\n{1} UID 8)", b"  ", b"",
                    b'3 FETCH (UID 9 X-GM-LABELS ("a\\\r\nb"))']

        def outcome(parse: Callable[[bytes], Any], data: bytes) -> Any:
            try:
                return repr([parse(data)])
            except gc.ProtocolError as exc:
                return "error: %s" % exc
        fast = 0
        for data in samples:
            with self.subTest(data=data):
                self.assertEqual(outcome(gc.parse_response, data), outcome(gc._parse_plain, data))
            try:
                got = gc._parse_fast(data)
            except gc._NotSimple:
                continue
            fast += 1
            self.assertEqual(repr(got), repr(gc._parse_plain(data)))
        self.assertGreater(fast, 400)
        for data in samples[-5:-1]:     # these the fast path reads itself
            gc._parse_fast(data)

    def test_each_pair_of_actions_is_merged_once_with_the_same_decisions(self):
        rules = gc.parse_rules({"rule": [
            {"name": "star", "from": "@bank.example", "star": True, "continue": True},
            {"name": "tag", "subject": "statement", "label": ["Bank", "Paper"], "continue": True},
            {"name": "more", "subject": "/statement/i", "label": ["Paper", "Later"],
             "mark_read": True, "continue": True},
            {"name": "move", "subject": "statement", "move": "Archive/Bank"},
            {"name": "never", "subject": "statement", "trash": True}]}, "r.json")
        messages = [info("From: x@bank.example\nSubject: statement %d" % n) for n in range(20)]
        messages += [info("From: y@shop.example\nSubject: Statement %d" % n) for n in range(20)]
        messages += [info("From: x@bank.example\nSubject: hello")]
        calls = []
        merged = gc.Actions.merged

        def counted(earlier: gc.Actions, later: gc.Actions) -> gc.Actions:
            calls.append((earlier, later))
            return merged(earlier, later)
        with mock.patch.dict(gc._MERGES, clear=True), \
                mock.patch.object(gc.Actions, "merged", counted):
            decisions = [rules.classify(msg, now=NOW) for msg in messages]
        self.assertEqual(len(calls), len(set((id(a), id(b)) for a, b in calls)))
        self.assertLessEqual(len(calls), 8)         # not once per message and rule
        by_rule = {rule.name: rule.actions for rule in rules.rules}
        for msg, decision in zip(messages, decisions):
            want = gc.Actions()
            for name, _reason in decision.matches:
                want = want.merged(by_rule[name])
            self.assertEqual(decision.actions, want)
        self.assertEqual(decisions[0].actions, gc.Actions(
            labels=("Bank", "Paper", "Later"), move="Archive/Bank", star=True, mark_read=True))
        self.assertEqual(decisions[-1].actions, gc.Actions(star=True))
        self.assertEqual(rules.classify(info("Subject: none"), now=NOW).actions, gc.Actions())

    def test_header_values_are_what_each_header_reads(self):
        names = [("from",), ("to", "cc"), ("subject",), ("list-id",), ("message-id",),
                 ("missing",), ("from", "subject", "from"), ("x-custom", "delivered-to")]
        for raw in tricky_header_blocks():
            plain = parse_headers(raw)      # read header by header (FastPathTest: as the
            fast = parse_headers(raw)       # email package reads them)
            seen: Dict[bool, Dict[str, List[str]]] = {}
            for addresses in (False, True):
                read = header_addresses if addresses else header_text
                each = seen[addresses] = {name: read(plain, name) for name in set(sum(names, ()))}
                for wanted in names:
                    values = [v for name in wanted for v in each[name]]
                    want = (values, [gc._normalise(v) for v in values])
                    with self.subTest(raw=raw, names=wanted, addresses=addresses):
                        self.assertEqual(gc._header_values(fast, addresses, wanted), want)
                        self.assertEqual(gc._header_values(fast, addresses, wanted), want)
            # Read through the cache first, then as a rule: the same values either way.
            again = parse_headers(raw)
            gc._header_cache(again)
            self.assertEqual(header_text(again, "subject"), seen[False]["subject"])
            self.assertEqual(gc._header_values(again, True, ("subject",))[0], seen[True]["subject"])
            self.assertEqual(gc._header_values(again, False, ("subject",))[0], seen[False]["subject"])

    def test_audit_records_are_the_bytes_json_dumps_writes(self):
        records = [{"type": "message", "subject": "Grüße \u65e5\u672c \"q\" \\ \u2028",
                    "changes": [{"after": {"folder": "Receipts/2025", "uid": None}, "action": "move"}],
                    "uid": 7, "applied": True, "actions": {}, "rules": [], "z": 1.5, "a": None}]
        with tempfile.TemporaryDirectory() as tmp:
            audit = gc.AuditLog(Path(tmp) / "audit.jsonl")
            audit.append(records)
            written = (Path(tmp) / "audit.jsonl").read_bytes()
        self.assertEqual(written, (json.dumps(records[0], ensure_ascii=False, sort_keys=True)
                                   + "\n").encode("utf-8"))


# --- Connection --------------------------------------------------------------------------


class TLSTest(unittest.TestCase):
    def start(self, **options: Any) -> FakeGmail:
        server = FakeGmail(**options).start()
        self.addCleanup(server.stop)
        return server

    def ca_file(self) -> str:
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        return write_ca_file(tmp)

    def open(self, server: FakeGmail, **options: Any) -> gc.GmailConnection:
        conn = gc.GmailConnection(USER, password=PASSWORD, host="localhost", port=server.port,
                                  keepalive=None, retries=0, timeout=5, **options)
        conn.connect()
        self.addCleanup(conn.close)
        return conn

    def test_untrusted_certificate_is_refused_naming_host_and_fix(self):
        server = self.start(tls=True)
        with self.assertRaises(gc.TLSError) as ctx:
            self.open(server)
        message = str(ctx.exception)
        self.assertIn(f"localhost:{server.port}", message)
        self.assertIn("--cafile", message)
        self.assertNotIn("LOGIN", server.commands())

    def test_certificate_accepted_with_the_ca_file(self):
        server = self.start(tls=True)
        conn = self.open(server, cafile=self.ca_file())
        self.assertTrue(conn.has("MOVE"))
        names = server.commands()
        self.assertEqual(names[names.index("LOGIN") + 1], "CAPABILITY")

    def test_wrong_host_name_is_refused_even_with_the_ca_file(self):
        server = self.start(tls=True, cert="wrong_host")
        with self.assertRaises(gc.TLSError) as ctx:
            self.open(server, cafile=self.ca_file())
        self.assertIn("localhost", str(ctx.exception))

    def test_starttls_upgrades_before_login(self):
        server = self.start(starttls=True)
        conn = self.open(server, security="starttls", cafile=self.ca_file())
        self.assertTrue(conn.is_gmail)
        names = server.commands()
        self.assertLess(names.index("STARTTLS"), names.index("LOGIN"))

    def test_starttls_missing_is_refused_without_sending_credentials(self):
        server = self.start(starttls=False)
        with self.assertRaises(gc.TLSError) as ctx:
            self.open(server, security="starttls", cafile=self.ca_file())
        self.assertIn("does not offer STARTTLS", str(ctx.exception))
        self.assertNotIn("LOGIN", server.commands())
        self.assertFalse(any(PASSWORD.encode() in line for line in server.raw_lines))

    def test_plaintext_refused_to_a_remote_host(self):
        with self.assertRaises(gc.TLSError) as ctx:
            gc.GmailConnection(USER, password=PASSWORD, host="imap.gmail.com",
                               security="plaintext")
        self.assertIn("loopback", str(ctx.exception))


class AuthenticationTest(FakeServerTest):
    def test_app_password_spaces_are_stripped(self):
        conn = self.connect(password="abcd abcd abcd abcd")
        self.assertTrue(conn.connected)

    def test_wrong_password_raises_once_with_server_text(self):
        with self.assertRaises(gc.AuthenticationError) as ctx:
            self.connect(password="wrong password")
        self.assertIn("[AUTHENTICATIONFAILED] Invalid credentials", str(ctx.exception))
        self.assertNotIn("b'", str(ctx.exception))
        self.assertEqual(self.server.count("LOGIN"), 1)
        self.assertEqual(self.sleep.delays, [])

    def test_xoauth2_with_token_provider_called_per_connect(self):
        calls = []

        def provider() -> str:
            calls.append(1)
            return TOKEN

        conn = self.connect(token=provider)
        self.assertEqual(self.server.count("AUTHENTICATE"), 1)
        self.server.add_fault("NOOP", action="drop")
        conn.noop()
        self.assertEqual(len(calls), 2)
        self.assertEqual(self.server.count("AUTHENTICATE"), 2)

    def test_bad_token_answers_the_error_challenge_with_an_empty_line(self):
        with self.assertRaises(gc.AuthenticationError) as ctx:
            self.connect(token="ya29.expired")
        self.assertIn("AUTHENTICATIONFAILED", str(ctx.exception))
        self.assertIn("400", str(ctx.exception))   # the decoded JSON challenge
        self.assertEqual(self.server.raw_lines[-1], b"\r\n")
        self.assertFalse(any(b"BAD" in line for line in self.server.raw_lines))
        self.assertEqual(self.server.count("AUTHENTICATE"), 1)

    def test_capabilities_are_read_again_after_login(self):
        conn = self.connect()
        for cap in ("X-GM-EXT-1", "MOVE", "UIDPLUS", "IDLE", "SPECIAL-USE", "ENABLE",
                    "UTF8=ACCEPT", "CONDSTORE"):
            with self.subTest(cap=cap):
                self.assertTrue(conn.has(cap))
        self.assertTrue(conn.is_gmail)

    def test_secrets_never_reach_the_log_at_debug(self):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        logger = logging.getLogger("gmail_classify")
        old_level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        self.addCleanup(logger.removeHandler, handler)
        self.addCleanup(logger.setLevel, old_level)
        self.server.add_message(make_message())
        conn = self.connect()
        conn.select("INBOX")
        conn.fetch(conn.search(), ["FLAGS"])
        with self.assertRaises(gc.AuthenticationError):
            self.connect(password="wrong secret")
        token_conn = self.connect(token=TOKEN)
        token_conn.noop()
        with self.assertRaises(gc.AuthenticationError):
            self.connect(token="ya29.leaked-bad-token")
        text = stream.getvalue()
        self.assertIn("UID FETCH", text)   # the log did record the conversation
        sasl = base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode()).decode()
        for secret in (PASSWORD, "wrong secret", TOKEN, "ya29.leaked-bad-token", sasl):
            with self.subTest(secret=secret):
                self.assertNotIn(secret, text)


class PlainWrongPasswordTest(FakeServerTest):
    server_options = {"gmail": False}

    def test_wrong_password_off_gmail_has_no_gmail_hint(self):
        with self.assertRaises(gc.AuthenticationError) as caught:
            self.connect(password="wrong")
        self.assertNotIn("app password", str(caught.exception))


class XOAuthRedactionTest(FakeServerTest):
    def test_minus_vv_never_shows_the_token(self):
        self.server.add_fault("NOOP", action="no", text=f"token {TOKEN} rejected")
        with self.assertLogs("gmail_classify", "DEBUG") as logs:
            conn = self.connect(token=TOKEN)
            with self.assertRaises(gc.ImapError):
                conn.noop()
        self.assertIn("S: ", "\n".join(logs.output))
        self.assertNotIn(TOKEN, "\n".join(logs.output))


class CredentialSafetyTest(FakeServerTest):
    INJECTION = "x\r\nA1 DELETE INBOX"

    def assert_nothing_sent(self):
        self.assertNotIn("LOGIN", self.commands())
        self.assertNotIn("DELETE", self.commands())
        self.assertFalse(any(b"DELETE" in line for line in self.server.raw_lines))

    def test_library_refuses_cr_lf_nul_in_every_credential(self):
        cases = [dict(user="a\r\nb", password=PASSWORD), dict(user="a\x00b", password=PASSWORD),
                 dict(user=USER, password=self.INJECTION), dict(user=USER, password="p\x00w"),
                 dict(user=USER, token="ya29.x\nA1 DELETE INBOX")]
        for case in cases:
            with self.subTest(case=case):
                user = case.pop("user")
                with self.assertRaises(gc.CredentialError) as ctx:
                    gc.GmailConnection(user, host="127.0.0.1", port=self.server.port,
                                       security="plaintext", **case)
                self.assertNotIn("DELETE", str(ctx.exception))
        for source in (dict(password=lambda: self.INJECTION),
                       dict(token=lambda: "ya29.x\rA1 DELETE INBOX")):
            with self.subTest(source=source):
                with self.assertRaises(gc.CredentialError):
                    self.connect(**source)
        self.assert_nothing_sent()

    def test_command_line_refuses_them_from_every_source_with_exit_2(self):
        argv = ["--host", "127.0.0.1", "--port", str(self.server.port), "--plaintext",
                "--retries", "0"]
        home = os.path.join(self.tmp, "home")
        os.mkdir(home)
        with open(os.path.join(home, ".netrc"), "w") as handle:
            handle.write(f"machine 127.0.0.1 login {USER} password pa\x00ss\n")
        os.chmod(os.path.join(home, ".netrc"), 0o600)
        script = os.path.join(self.tmp, "secret.sh")
        with open(script, "w") as handle:
            handle.write("#!/bin/sh\nprintf 'pa\\000ss\\n'\n")
        os.chmod(script, 0o700)
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump({"rule": EXAMPLE_DOC["rule"], "account": {"user": "a\nb"}}, handle)
        cases = {
            "option": (["--user", "a\r\nb"], {"GMAIL_APP_PASSWORD": PASSWORD}),
            "environment": (["--user", USER], {"GMAIL_APP_PASSWORD": self.INJECTION}),
            "netrc": (["--user", USER], {"HOME": home}),
            "command": (["--user", USER, "--password-command", "/bin/sh " + script], {}),
            "token environment": (["--user", USER, "--auth", "xoauth2"],
                                  {"GMAIL_OAUTH_TOKEN": "ya29.x\r\nA1 DELETE INBOX"}),
            "token command": (["--user", USER, "--auth", "xoauth2", "--password-command",
                               "/bin/sh " + script], {}),
            "rules file": (["--rules", rules], {"GMAIL_APP_PASSWORD": PASSWORD}),
        }
        for name, (extra, env) in cases.items():
            with self.subTest(source=name):
                code, out, err = run_cli(*argv, *extra, env=env)
                self.assertEqual(code, gc.EXIT_USAGE, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertNotIn("DELETE", err)
        self.assert_nothing_sent()

    def test_user_name_goes_out_quoted(self):
        self.server.users['we"ird user\\x'] = PASSWORD
        conn = gc.GmailConnection('we"ird user\\x', password=PASSWORD, host="127.0.0.1",
                                  port=self.server.port, security="plaintext", keepalive=None)
        conn.connect()
        self.addCleanup(conn.close)
        login = [e.line for e in self.server.log if e.command == "LOGIN"]
        self.assertEqual(login, [b'%s LOGIN "we\\"ird user\\\\x" "%s"\r\n'
                                 % (login[0].split(b" ")[0], PASSWORD.encode())])

    def test_non_ascii_credentials_use_authenticate_plain_in_utf8(self):
        for options in ({}, {"gmail": False}):
            with self.subTest(server=options):
                server = FakeGmail(users={"jörg@example.com": "pässwörd 1"}, **options).start()
                self.addCleanup(server.stop)
                conn = gc.GmailConnection("jörg@example.com", password="pässwörd 1",
                                          host="127.0.0.1", port=server.port,
                                          security="plaintext", keepalive=None)
                conn.connect()
                self.addCleanup(conn.close)
                self.assertEqual(server.commands()[:3], ["CAPABILITY", "AUTHENTICATE", "CAPABILITY"])
                encoded = base64.b64encode("\0jörg@example.com\0pässwörd 1".encode("utf-8"))
                self.assertTrue(any(encoded in line for line in server.raw_lines))

    def test_non_ascii_credentials_go_as_literals_without_auth_plain(self):
        self.server.users["jörg@example.com"] = "pässwörd"

        class WithoutPlain(_Session):
            def _capabilities(self, authenticated=None):
                return [c for c in super()._capabilities(authenticated) if c != "AUTH=PLAIN"]

        self.server.use_handler(WithoutPlain)
        conn = gc.GmailConnection("jörg@example.com", password="pässwörd",
                                  host="127.0.0.1", port=self.server.port,
                                  security="plaintext", keepalive=None)
        conn.connect()
        self.addCleanup(conn.close)
        login = [e.line for e in self.server.log if e.command == "LOGIN"][0]
        self.assertIn(b"LOGIN {17}\r\nj\xc3\xb6rg@example.com {10}\r\np\xc3\xa4ssw\xc3\xb6rd\r\n",
                      login)

    def test_xoauth2_sends_the_initial_response_on_the_first_line_with_sasl_ir(self):
        self.connect(token=TOKEN)
        initial = base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode())
        line = [e.line for e in self.server.log if e.command == "AUTHENTICATE"][0]
        self.assertTrue(line.endswith(b" AUTHENTICATE XOAUTH2 " + initial + b"\r\n"), line)

    def test_xoauth2_waits_for_the_continuation_without_sasl_ir(self):
        class WithoutSaslIr(_Session):
            def _capabilities(self, authenticated=None):
                return [c for c in super()._capabilities(authenticated) if c != "SASL-IR"]

        initial = base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode())
        self.server.use_handler(WithoutSaslIr)
        self.connect(token=TOKEN)
        line = [e.line for e in self.server.log if e.command == "AUTHENTICATE"][0]
        self.assertTrue(line.endswith(b" AUTHENTICATE XOAUTH2\r\n"), line)
        self.assertIn(initial + b"\r\n", self.server.raw_lines)

    def test_sasl_secrets_never_reach_the_debug_log(self):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        logger = logging.getLogger("gmail_classify")
        old_level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        self.addCleanup(logger.removeHandler, handler)
        self.addCleanup(logger.setLevel, old_level)
        self.server.users["jörg@example.com"] = "pässwörd"
        conn = gc.GmailConnection("jörg@example.com", password="pässwörd", host="127.0.0.1",
                                  port=self.server.port, security="plaintext", keepalive=None)
        conn.connect()
        self.addCleanup(conn.close)
        self.connect(token=TOKEN)
        text = stream.getvalue()
        self.assertIn("AUTHENTICATE", text)
        for secret in ("pässwörd", TOKEN,
                       base64.b64encode("\0jörg@example.com\0pässwörd".encode()).decode()[:12],
                       base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}".encode()).decode()[:12]):
            with self.subTest(secret=secret):
                self.assertNotIn(secret, text)

    def test_garbage_in_answer_to_login_is_a_protocol_error_not_a_refusal(self):
        self.server.add_fault("LOGIN", action="garbage")
        with self.assertRaises(gc.ProtocolError) as ctx:
            self.connect(retries=0)
        self.assertNotIsInstance(ctx.exception, gc.AuthenticationError)

    def test_a_preauth_greeting_is_refused_without_sending_the_password(self):
        class Preauth(_Session):
            def _send(self, data):
                super()._send(data.replace(b"* OK Gimap ready", b"* PREAUTH Gimap ready"))

        self.server.use_handler(Preauth)
        with self.assertRaises(gc.AuthenticationError) as ctx:
            self.connect(retries=0)
        self.assertIn("PREAUTH", str(ctx.exception))
        self.assertFalse(any(PASSWORD.encode() in line for line in self.server.raw_lines))


class PlaintextOnlyToLoopbackTest(FakeServerTest):
    def test_a_name_that_resolves_elsewhere_is_refused(self):
        resolver = fake_resolver({"localhost": ["10.1.2.3"]})
        with mock.patch("socket.getaddrinfo", resolver):
            with self.assertRaises(gc.TLSError) as ctx:
                gc.GmailConnection(USER, password=PASSWORD, host="localhost",
                                   port=self.server.port, security="plaintext")
            code, _, err = run_cli("--user", USER, "--host", "localhost", "--port",
                                   str(self.server.port), "--plaintext",
                                   env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertIn("loopback", str(ctx.exception))
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("loopback", err)
        self.assertEqual(self.server.log, [])

    def test_one_non_loopback_address_among_several_is_refused(self):
        def resolve(host, port, *args, **kwargs):
            if host == "mixed.test":
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
                        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", port))]
            return _real_getaddrinfo(host, port, *args, **kwargs)

        with mock.patch("socket.getaddrinfo", resolve):
            with self.assertRaises(gc.TLSError):
                gc.GmailConnection(USER, password=PASSWORD, host="mixed.test",
                                   security="plaintext")

    def test_connects_to_the_address_that_was_checked(self):
        # The first two lookups (constructor, then connect) say loopback; a third lookup,
        # as a connection by name would make, fails: only the checked address may be used.
        resolver = fake_resolver({"imap.loopback.test": ["127.0.0.1", "127.0.0.1",
                                                         socket.gaierror("rebound")]})
        with mock.patch("socket.getaddrinfo", resolver):
            conn = self.connect(host="imap.loopback.test", retries=0)
        self.assertTrue(conn.connected)
        self.assertEqual(resolver.calls["imap.loopback.test"], 2)
        self.assertEqual(self.commands()[:3], ["CAPABILITY", "LOGIN", "CAPABILITY"])

    def test_private_and_public_addresses_are_not_loopback(self):
        for host in ("10.0.0.1", "192.168.1.10", "172.16.0.1", "169.254.1.1", "100.64.0.1",
                     "fd00::1", "8.8.8.8"):
            with self.subTest(host=host):
                with self.assertRaises(gc.TLSError):
                    gc.GmailConnection(USER, password=PASSWORD, host=host, security="plaintext")
        for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]"):
            with self.subTest(host=host):
                gc.GmailConnection(USER, password=PASSWORD, host=host, security="plaintext")


class FailFastTest(unittest.TestCase):
    def connect(self, port: int, **options: Any) -> Tuple[gc.GmailConnection, Recorder]:
        sleep = Recorder()
        conn = gc.GmailConnection(USER, password=PASSWORD, host="127.0.0.1", port=port,
                                  timeout=5, keepalive=None, retries=5, sleep=sleep, **options)
        return conn, sleep

    def closed_port(self) -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]     # nothing listens once it is closed

    def test_refused_connection_fails_at_once_with_a_hint(self):
        port = self.closed_port()
        conn, sleep = self.connect(port, security="plaintext")
        with self.assertRaises(gc.ConnectionLostError) as caught:
            conn.connect()
        self.assertEqual(sleep.delays, [])
        self.assertEqual(str(caught.exception),
                         f"cannot connect to 127.0.0.1:{port}: connection refused: nothing "
                         "listens on that port; check --host and --port (IMAP uses 993 with "
                         "TLS, 143 with --starttls)")

    def test_tls_spoken_to_a_plain_port_fails_at_once_with_a_hint(self):
        server = FakeGmail().start()
        self.addCleanup(server.stop)
        conn, sleep = self.connect(server.port, security="tls")
        with self.assertRaises(gc.ConnectionLostError) as caught:
            conn.connect()
        self.assertEqual(sleep.delays, [])
        self.assertIn(f"is {server.port} a plain IMAP port? try --starttls, or port 993",
                      str(caught.exception))
        self.assertEqual(server.count("LOGIN"), 0)

    def test_plain_imap_spoken_to_a_tls_port_fails_after_one_timeout_with_a_hint(self):
        server = FakeGmail(tls=True).start()
        self.addCleanup(server.stop)
        for security in ("plaintext", "starttls"):
            with self.subTest(security):
                conn, sleep = self.connect(server.port, security=security)
                conn.timeout = 0.5
                with self.assertRaises(gc.ConnectionLostError) as caught:
                    conn.connect()
                self.assertEqual(sleep.delays, [])
                self.assertEqual(str(caught.exception),
                                 f"cannot connect to 127.0.0.1:{server.port}: no IMAP greeting "
                                 f"within 0.5 s: is {server.port} a TLS port? connect without "
                                 "--starttls or --plaintext (TLS from the first byte, port 993), "
                                 "or use --starttls on port 143")

    def test_a_server_that_greets_then_stalls_is_retried(self):
        def greet_then_stall(client: socket.socket) -> None:
            client.sendall(b"* OK ready\r\n")    # then never answers CAPABILITY

        conn, sleep = self.connect(start_raw_server(self, greet_then_stall), security="plaintext")
        conn.timeout, conn.retries = 0.2, 2
        with self.assertRaises(gc.ConnectionLostError):
            with self.assertLogs("gmail_classify", "WARNING"):
                conn.connect()
        self.assertEqual(len(sleep.delays), 2)

    def test_no_common_tls_version_fails_at_once(self):
        def refuse_the_version(client: socket.socket) -> None:
            client.settimeout(10)
            client.recv(4096)                                  # the ClientHello
            client.sendall(b"\x15\x03\x03\x00\x02\x02\x46")     # fatal alert: protocol_version

        conn, sleep = self.connect(start_raw_server(self, refuse_the_version), security="tls")
        with self.assertRaises(gc.ConnectionLostError) as caught:
            conn.connect()
        self.assertEqual(sleep.delays, [])
        self.assertIn("no TLS version in common (tlsv1 alert protocol version)", str(caught.exception))

    def test_unknown_host_fails_at_once(self):
        error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        conn, sleep = self.connect(993, security="tls")
        conn.host = "imap.gmial.com"
        with mock.patch("socket.getaddrinfo", side_effect=error), \
                mock.patch("socket.create_connection", side_effect=error):
            with self.assertRaises(gc.ConnectionLostError) as caught:
                conn.connect()
        self.assertEqual(sleep.delays, [])
        self.assertIn("no such host 'imap.gmial.com'", str(caught.exception))

    def test_command_line_reports_a_closed_port_in_one_line_without_retrying(self):
        port = self.closed_port()
        started = time.monotonic()
        code, _, err = run_cli("--user", USER, "--host", "127.0.0.1", "--port", str(port),
                               "--plaintext", env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertLess(time.monotonic() - started, 5)   # the default 5 retries would sleep 31 s
        self.assertEqual(code, gc.EXIT_CONNECTION)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("connection refused", err)

    def test_a_refused_reconnect_mid_run_is_still_retried(self):
        server = FakeGmail().start()
        conn, sleep = self.connect(server.port, security="plaintext")
        conn.connect()
        self.addCleanup(conn.close)
        server.stop()
        with self.assertRaises(gc.ConnectionLostError):
            with self.assertLogs("gmail_classify", "WARNING"):
                conn.noop()
        self.assertEqual(len(sleep.delays), 5)


class OperationsTest(FakeServerTest):
    def test_list_folders_finds_special_use_by_attribute(self):
        conn = self.connect()
        names = {f.name for f in conn.list_folders()}
        self.assertIn("[Gmail]/All Mail", names)
        self.assertEqual(conn.special_folder("\\Trash").name, "[Gmail]/Trash")
        self.assertEqual(conn.special_folder("\\All").name, "[Gmail]/All Mail")
        self.assertEqual(conn.special_folder("\\Junk").name, "[Gmail]/Spam")
        self.assertIsNone(conn.special_folder("\\Archive"))

    def test_select_and_examine_report_status(self):
        for _ in range(3):
            self.server.add_message(make_message())
        conn = self.connect()
        status = conn.examine("INBOX")
        self.assertEqual((status.exists, status.readonly), (3, True))
        self.assertGreater(status.uidvalidity, 0)
        self.assertEqual(status.uidnext, max(self.server.uids("INBOX")) + 1)
        self.assertFalse(conn.select("INBOX").readonly)
        self.assertEqual(self.commands()[-2:], ["EXAMINE", "SELECT"])

    def test_fetch_returns_values_keyed_by_uid_without_marking_read(self):
        self.server.add_message(make_message("=?UTF-8?B?w6nDqQ==?= first"),
                                labels=("\\Inbox", "\\Important", "two words", "(foo)", "[bar]",
                                        "a*b", "Entwürfe"))
        self.server.add_message(make_message("second"))
        conn = self.connect()
        conn.select("INBOX")
        uids = conn.search()
        item = "BODY.PEEK[HEADER.FIELDS (From Subject)]"
        result = conn.fetch(uids, ["FLAGS", "RFC822.SIZE", "INTERNALDATE", "X-GM-LABELS",
                                   "X-GM-MSGID", item, "BODY.PEEK[]<0.20>"])
        self.assertEqual(sorted(result), uids)
        first = result[uids[0]]
        self.assertEqual(set(first["X-GM-LABELS"]),     # Gmail leaves out INBOX's own \Inbox
                         {"\\Important", "two words", "(foo)", "[bar]", "a*b", "Entwürfe"})
        self.assertIn(b"Subject: =?UTF-8?B?w6nDqQ==?= first", first[item])
        self.assertEqual(len(first["BODY.PEEK[]<0.20>"]), 20)
        self.assertIsInstance(first["RFC822.SIZE"], int)
        self.assertIsNotNone(first["INTERNALDATE"].tzinfo)
        for message in self.server.messages("INBOX"):
            self.assertNotIn("\\Seen", message.flags)

    def test_fetch_refuses_items_that_would_mark_read(self):
        conn = self.connect()
        conn.select("INBOX")
        for item in ("BODY[]", "RFC822", "BODY[TEXT]"):
            with self.subTest(item=item), self.assertRaises(gc.ImapError):
                conn.fetch([1], [item])

    def test_search_with_gmail_query_and_non_ascii_literal(self):
        self.server.add_message(make_message("Grüße aus Köln"))
        self.server.add_message(make_message("plain hello"))
        conn = self.connect()
        conn.select("INBOX")
        self.assertEqual(len(conn.search(gmail_raw="subject:hello")), 1)
        found = conn.search(gmail_raw="Grüße")
        self.assertEqual(len(found), 1)
        line = self.server.log[-1].line
        self.assertIn(b"CHARSET UTF-8", line)
        self.assertIn("Grüße".encode("utf-8"), line)
        self.assertEqual(conn.search(["SUBJECT", "Köln"]), found)

    def test_labels_with_spaces_non_ascii_and_star_round_trip(self):
        self.server.add_message(make_message())
        conn = self.connect()
        conn.select("INBOX")
        uids = conn.search()
        labels = ["two words", "Entwürfe", "a*b", 'Bills "2024"', "(foo)", "Dev/Notifications"]
        conn.add_labels(uids, labels)
        stored = self.server.messages("INBOX")[0].labels
        for label in labels:
            self.assertIn(label, stored)
        conn.remove_labels(uids, ["two words"])
        self.assertNotIn("two words", self.server.messages("INBOX")[0].labels)
        self.assertIn("\\Inbox", self.server.messages("INBOX")[0].labels)

    def test_label_with_line_break_cannot_inject_a_command(self):
        self.server.add_message(make_message())
        conn = self.connect()
        conn.select("INBOX")
        uids = conn.search()
        before = len(self.server.log)
        with self.assertRaises(gc.ImapError) as ctx:
            conn.add_labels(uids, ['Bills "2024"\r\nA1 LOGOUT'])
        self.assertIn("CR, LF or NUL", str(ctx.exception))
        self.assertEqual(len(self.server.log), before)
        for name in ('evil\r\nA1 DELETE INBOX', "x\x00y"):
            with self.subTest(name=name), self.assertRaises(gc.ImapError):
                conn.create_folder(name)
        self.assertNotIn("LOGOUT", self.commands())
        self.assertNotIn("DELETE", self.commands())

    def test_create_folder_reports_existing(self):
        conn = self.connect()
        self.assertTrue(conn.create_folder("Receipts/2024"))
        self.assertFalse(conn.create_folder("Receipts/2024"))
        self.assertIn("Receipts/2024", self.server.folder_names())

    def test_move_to_a_missing_folder_is_refused_with_trycreate(self):
        self.server.add_message(make_message())
        conn = self.connect()
        conn.select("INBOX")
        with self.assertRaises(gc.ImapError) as ctx:
            conn.move([1], "Nowhere")
        self.assertEqual(self.server.uids("INBOX"), [1])
        self.assertEqual(ctx.exception.status, "NO")

    def test_move_uses_uid_move_and_reports_new_uids(self):
        for _ in range(3):
            self.server.add_message(make_message())
        conn = self.connect()
        conn.create_folder("Receipts")
        conn.select("INBOX")
        uids = conn.search()
        result = conn.move(uids[:2] + [99], "Receipts")
        self.assertEqual(sorted(result.moved), uids[:2])
        self.assertEqual(result.missing, (99,))   # never there: accounted for, not "moved"
        self.assertEqual(sorted(result.moved.values()), self.server.uids("Receipts"))
        self.assertEqual(len(self.server.uids("INBOX")), 1)
        self.assertEqual(self.server.count("UID MOVE"), 1)

    def test_long_uid_sets_are_split_under_the_line_limit(self):
        for _ in range(600):
            self.server.add_message(make_message())
        conn = self.connect()
        conn.select("INBOX")
        odd = conn.search()[::2]
        with mock.patch.object(gc, "MAX_UID_SET_CHARS", 300):
            result = conn.fetch(odd, ["FLAGS"])
            conn.add_flags(odd, ["$Odd"])
        self.assertEqual(sorted(result), odd)
        self.assertGreater(self.server.count("UID FETCH"), 1)
        self.assertEqual(self.server.count("UID FETCH"), self.server.count("UID STORE"))
        self.assertTrue(all(len(e.line) < 400 for e in self.server.log))
        self.assertEqual(len([m for m in self.server.messages("INBOX") if "$Odd" in m.flags]), 300)
        self.assertEqual(self.server.long_lines, [])

    def test_close_unselects_without_expunging(self):
        conn = self.connect()
        conn.select("INBOX")
        conn.close()
        self.assertEqual(self.commands()[-2:], ["UNSELECT", "LOGOUT"])
        self.assertNotIn("CLOSE", self.commands())
        self.assertNotIn("EXPUNGE", self.commands())
        conn.close()   # twice is fine

    def test_ctrl_c_inside_with_still_logs_out(self):
        conn = gc.GmailConnection(USER, password=PASSWORD, host="127.0.0.1",
                                  port=self.server.port, security="plaintext", keepalive=60)
        with self.assertRaises(KeyboardInterrupt):
            with conn:
                conn.select("INBOX")
                raise KeyboardInterrupt
        self.assertEqual(self.commands()[-2:], ["UNSELECT", "LOGOUT"])
        self.assertIsNone(conn._keepalive_thread)

    def test_close_after_the_connection_died_does_not_raise(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.drop_all_connections()
        conn.close()
        self.assertFalse(conn.connected)

    def test_server_no_raises_imap_error_without_retry(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID SEARCH", action="no", text="[UNAVAILABLE] try later")
        with self.assertRaises(gc.ImapError) as ctx:
            conn.search()
        self.assertEqual((ctx.exception.status, ctx.exception.code), ("NO", "UNAVAILABLE"))
        self.assertEqual(self.server.count("UID SEARCH"), 1)

    def test_garbage_raises_protocol_error_then_recovers(self):
        self.server.add_message(make_message())
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID FETCH", action="garbage")
        with self.assertRaises(gc.ProtocolError) as ctx:
            conn.fetch([1], ["FLAGS"])
        self.assertIn("near b'", str(ctx.exception))
        self.assertEqual(sorted(conn.fetch([1], ["FLAGS"])), [1])

    def test_unsolicited_responses_are_ignored_in_results(self):
        for _ in range(3):
            self.server.add_message(make_message())
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID FETCH", action="unsolicited", when="after")
        result = conn.fetch([2, 3], ["FLAGS"])
        self.assertEqual(sorted(result), [2, 3])


class PlainServerTest(FakeServerTest):
    server_options = {"gmail": False, "move": False}

    def test_move_without_move_copies_deletes_and_expunges_only_those(self):
        for _ in range(3):
            self.server.add_message(make_message())
        other = self.server.add_message(make_message("keep me"), flags=("\\Deleted",))
        conn = self.connect()
        self.assertFalse(conn.is_gmail)
        conn.select("INBOX")
        uids = conn.search()
        result = conn.move(uids[:2], "Archive")
        self.assertEqual(sorted(result.moved), uids[:2])
        self.assertEqual(len(self.server.uids("Archive")), 2)
        self.assertIn(other, [m.msgid for m in self.server.messages("INBOX")])
        self.assertNotIn("EXPUNGE", self.commands())
        self.assertIn("UID EXPUNGE", self.commands())

    def test_labels_and_gmail_queries_refused_off_gmail(self):
        conn = self.connect()
        conn.select("INBOX")
        with self.assertRaises(gc.CapabilityError):
            conn.add_labels([1], ["x"])
        with self.assertRaises(gc.CapabilityError):
            conn.search(gmail_raw="is:unread")

    def test_close_after_select_without_unselect_sends_no_close(self):
        conn = self.connect()
        conn.select("INBOX")
        conn.close()
        self.assertNotIn("CLOSE", self.commands())
        self.assertEqual(self.commands()[-1], "LOGOUT")


class NoUidplusServerTest(FakeServerTest):
    server_options = {"gmail": False, "move": False, "uidplus": False}

    def test_move_refuses_rather_than_bare_expunge(self):
        self.server.add_message(make_message())
        conn = self.connect()
        conn.select("INBOX")
        with self.assertRaises(gc.CapabilityError) as ctx:
            conn.move([1], "Archive")
        self.assertIn("plain EXPUNGE", str(ctx.exception))
        self.assertIn("--allow-expunge", str(ctx.exception))
        with self.assertRaises(gc.CapabilityError):
            conn.uid_expunge([1])
        self.assertEqual(self.server.uids("INBOX"), [1])
        self.assertFalse(any(c in self.commands() for c in ("EXPUNGE", "UID COPY", "UID STORE")))


class LocalizedGmailTest(FakeServerTest):
    server_options = {"localized": True}

    def test_trash_found_by_attribute_not_name(self):
        conn = self.connect()
        self.assertEqual(conn.special_folder("\\Trash").name, "[Google Mail]/Papierkorb")


class NamespaceTest(AnyServerTest):
    def test_rule_names_map_to_the_prefix_and_delimiter(self):
        self.serve("inbox-prefix")
        self.server.add_message(make_message("receipt 1"))
        self.server.add_message(make_message("done 1"))
        rules = gc.parse_rules({"rule": [
            {"subject": "receipt", "move": "Receipts/2024"},
            {"subject": "done", "move": "INBOX.Done"}]}, "r.json")
        conn = self.connect()
        dry = gc.classify_folder(conn, rules, "INBOX")
        self.assertEqual(dry.created, ["INBOX.Receipts.2024", "INBOX.Done"])
        self.assertEqual(self.server.count("LIST"), 1)       # the folder list is kept
        self.assertEqual([conn.server_name(n) for n in ("inbox", "INBOX", "Inbox.Done")],
                         ["INBOX", "INBOX", "Inbox.Done"])
        gc.classify_folder(conn, rules, "INBOX", apply=True)
        creates = b"".join(self.lines("CREATE"))
        self.assertIn(b"CREATE INBOX.Receipts.2024\r\n", creates)
        self.assertIn(b"CREATE INBOX.Done\r\n", creates)
        self.assertNotIn(b"INBOX.INBOX", creates)
        self.assertEqual(self.subjects("INBOX.Receipts.2024"), ["receipt 1"])
        self.assertEqual(self.subjects("INBOX.Done"), ["done 1"])
        report = gc.classify_folder(conn, rules, "Receipts/2024")     # a source folder too
        self.assertEqual(report.examined, 1)
        self.assertIn(b"EXAMINE INBOX.Receipts.2024\r\n", b"".join(self.lines("EXAMINE")))

    def test_refused_create_names_the_folder_and_the_answer(self):
        self.serve("inbox-prefix")
        conn = self.connect()
        with self.assertRaises(gc.ImapError) as ctx:
            conn.create_folder("Outside")
        self.assertIn("'Outside'", str(ctx.exception))
        self.assertIn("Invalid mailbox name", str(ctx.exception))

    def test_refused_move_names_the_folder_and_the_answer(self):
        self.serve("move")
        self.server.add_message(make_message("m"))
        conn = self.connect()
        conn.select("INBOX")
        with self.assertRaises(gc.ImapError) as ctx:
            conn.move([1], "Nowhere")
        self.assertIn("move messages to 'Nowhere'", str(ctx.exception))
        self.assertIn("TRYCREATE", str(ctx.exception) + ctx.exception.code)

    def test_a_prefix_that_is_not_inbox(self):
        self.serve("move", prefix="Mail/")
        conn = self.connect()
        self.assertEqual(conn.namespace(), ("Mail/", "/"))
        self.assertEqual(conn.server_name("Mail/Foo"), "Mail/Foo")
        self.assertEqual(conn.server_name("Foo/Bar"), "Mail/Foo/Bar")
        self.assertTrue(conn.create_folder(conn.server_name("Foo")))
        self.assertIn("Mail/Foo", self.server.folder_names())
        self.assertEqual(self.server.count("CREATE"), 1)

    def test_without_namespace_the_delimiter_comes_from_list(self):
        self.serve("move", delimiter=".")
        self.server.add_message(make_message("receipt 1"))
        conn = self.connect()
        self.assertEqual(conn.namespace(), ("", "."))
        self.assertEqual(conn.server_name("A/B"), "A.B")


class SpecialUseFallbackTest(AnyServerTest):
    rules_doc = {"rule": [{"name": "Spam", "from": "@spam.example", "trash": True},
                          {"name": "Bank", "from": "@mybank.example", "star": True},
                          {"name": "Receipts", "subject": "receipt", "archive": True}]}

    def test_trash_and_archive_found_by_name_and_the_report_says_which(self):
        self.serve("no-special-use")
        self.seed()
        code, out, err = self.cli("--apply")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("note: trash goes to 'Deleted Items'", out)
        self.assertIn("note: archive goes to 'Archives'", out)
        self.assertEqual(self.subjects("Deleted Items"), ["Win!"])
        self.assertEqual(self.subjects("Archives"), ["Your receipt #1"])

    def test_names_match_case_insensitively_under_the_prefix(self):
        self.serve("inbox-prefix", special_use=False,
                   folders=(("INBOX", ""), ("deleted messages", ""), ("ARCHIVE", "")))
        conn = self.connect()
        self.assertEqual(conn.special_folder("\\Trash").name, "INBOX.deleted messages")
        self.assertEqual(conn.special_folder("\\Archive").name, "INBOX.ARCHIVE")
        self.assertIsNone(conn.special_folder("\\Junk"))

    def test_no_trash_folder_refuses_before_any_change_and_the_dry_run_alike(self):
        self.serve("move", special_use=False, folders=(("INBOX", ""), ("Sent", "")))
        self.seed()
        results = [self.cli("--apply"), self.cli()]
        for code, _, err in results:
            self.assertEqual(code, gc.EXIT_SERVER)
            self.assertIn("no folder marked \\Trash", err)
            self.assertIn("nothing was changed", err)
        self.assertEqual(errors(results[0][2]), errors(results[1][2]))
        self.assertEqual(self.writes(), set())


class WireNamesTest(AnyServerTest):
    def test_raw_utf8_names_go_back_as_listed(self):
        self.serve("move", quirks=["raw-utf8-names"])
        self.server.add_message(make_message("old"), folder="Entwürfe")
        self.server.add_message(make_message("receipt 1"))
        rules = gc.parse_rules({"rule": [{"subject": "receipt", "move": "Entwürfe"}]}, "r.json")
        report = gc.classify_folder(self.connect(), rules, "INBOX", apply=True)
        self.assertEqual(report.created, [])
        self.assertEqual(self.subjects("Entwürfe"), ["old", "receipt 1"])
        self.assertNotIn("Entw&APw-rfe", self.server.folder_names())
        self.assertIn("Entwürfe".encode(), b"".join(self.lines("UID MOVE")))

    def test_invalid_utf8_name_is_neither_renamed_nor_a_crash(self):
        self.serve("move", quirks=["raw-utf8-names"])
        self.server.add_message(make_message("café"), folder="Caf\udce9")
        conn = self.connect()
        names = [f.name for f in conn.list_folders()]
        self.assertIn("Caf\ufffd", names)
        status = conn.examine("Caf\ufffd")
        self.assertEqual(status.exists, 1)
        self.assertIn(b"Caf\xe9", b"".join(self.lines("EXAMINE")))
        code, out, err = run_cli("labels", "--user", USER, "--host", "127.0.0.1", "--port",
                                 str(self.server.port), "--plaintext",
                                 env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Caf\ufffd", out)


# A SELECT answer we cannot use must not leave the EXAMINE before it standing: close() would
# then CLOSE a read-write folder, expunging every \\Deleted message in it.  Numbers that are
# not unsigned 32-bit numbers are a ProtocolError (exit 5), never a ValueError (exit 1).

class ServerNumbersTest(AnyServerTest):
    BAD_SELECT_LINES = ("* OK [UIDVALIDITY abc] bad", "* OK [UIDVALIDITY 0] zero",
                        "* OK [UIDVALIDITY 4294967296] too big", "* OK [UIDNEXT (1 2)] list",
                        "* OK [UIDNEXT abc] bad", "* OK [UIDNEXT 0] zero",
                        "* 4294967296 EXISTS")

    def test_a_refused_select_answer_leaves_no_folder_to_close(self):
        for line in self.BAD_SELECT_LINES:
            with self.subTest(line=line):
                server = self.serve("neither")
                self.seed()
                conn = self.connect()
                conn.examine("INBOX")
                conn.search()
                server.add_fault("SELECT", action="unsolicited", when="after", text=line)
                with self.assertRaises(gc.ProtocolError) as ctx:
                    conn.select("INBOX")
                self.assertIn("unusable", str(ctx.exception))
                self.assertIsNone(conn.selected)
                conn.close()
                # The server holds INBOX read-write now: CLOSE would expunge it.
                self.assertEqual(self.commands()[-4:],
                                 ["EXAMINE", "UID SEARCH", "SELECT", "LOGOUT"])

    def test_a_select_without_uidvalidity_leaves_no_folder_to_close(self):
        class WithoutUidvalidity(_Session):
            drop = False            # from the SELECT on, no UIDVALIDITY in any answer

            def _u(self, line):
                if not (self.drop and "UIDVALIDITY" in str(line)):
                    super()._u(line)

        server = self.serve("neither")
        server.use_handler(WithoutUidvalidity)
        conn = self.connect()
        conn.examine("INBOX")
        WithoutUidvalidity.drop = True
        with self.assertRaises(gc.ProtocolError) as ctx:
            conn.select("INBOX")
        self.assertIn("did not report UIDVALIDITY", str(ctx.exception))
        conn.close()
        self.assertNotIn("CLOSE", self.commands())
        self.assertEqual(self.commands()[-2:], ["SELECT", "LOGOUT"])

    def test_a_select_answered_no_leaves_no_folder_either(self):
        server = self.serve("neither")
        conn = self.connect()
        conn.examine("INBOX")
        server.add_fault("SELECT", action="no")
        with self.assertRaises(gc.ImapError):
            conn.select("INBOX")
        self.assertIsNone(conn.selected)
        conn.close()
        self.assertEqual(self.commands()[-3:], ["EXAMINE", "SELECT", "LOGOUT"])

    def test_unselect_still_ends_a_select_the_server_accepted(self):
        server = self.serve("uidplus")
        conn = self.connect()
        conn.examine("INBOX")
        server.add_fault("SELECT", action="unsolicited", when="after",
                         text="* OK [UIDVALIDITY abc] bad")
        with self.assertRaises(gc.ProtocolError):
            conn.select("INBOX")
        conn.close()
        self.assertEqual(self.commands()[-2:], ["SELECT", "LOGOUT"])

    def test_status_and_search_numbers_are_checked(self):
        cases = [("STATUS", '* STATUS INBOX (MESSAGES abc UIDNEXT 5 UIDVALIDITY 1)',
                  lambda conn: conn.status("INBOX")),
                 ("STATUS", '* STATUS INBOX (MESSAGES 1 UIDNEXT 0 UIDVALIDITY 1)',
                  lambda conn: conn.status("INBOX")),
                 ("UID SEARCH", "* SEARCH 1 abc 3", lambda conn: conn.search()),
                 ("UID SEARCH", "* SEARCH 1 0", lambda conn: conn.search()),
                 ("UID SEARCH", "* SEARCH 4294967296", lambda conn: conn.search())]
        for command, line, call in cases:
            with self.subTest(line=line):
                server = self.serve()
                self.seed()
                conn = self.connect()
                if command != "STATUS":
                    conn.select("INBOX")
                # status() reads the first STATUS line: put the bad one first.
                server.add_fault(command, action="unsolicited", text=line,
                                 when="before" if command == "STATUS" else "after")
                with self.assertRaises(gc.ProtocolError) as ctx:
                    call(conn)
                self.assertIn("not a valid", str(ctx.exception))

    def test_good_numbers_still_read(self):
        server = self.serve()
        self.seed()
        conn = self.connect()
        server.add_fault("UID SEARCH", action="unsolicited", when="after",
                         text="* SEARCH 4294967295 (MODSEQ 12)")
        self.assertEqual(conn.status("INBOX").get("MESSAGES"), 5)
        status = conn.select("INBOX")
        self.assertGreater(status.uidvalidity, 0)
        self.assertEqual(status.exists, 5)
        self.assertIn(4294967295, conn.search())

    def test_cli_exits_5_with_one_line_and_no_close(self):
        for line in ("* OK [UIDVALIDITY abc] bad", "* OK [UIDNEXT (1 2)] list"):
            with self.subTest(line=line):
                server = self.serve("neither")
                self.seed()
                for command in ("EXAMINE", "SELECT"):
                    server.add_fault(command, action="unsolicited", when="after", text=line,
                                     count=5)
                code, out, err = self.cli("run", "--apply", "--allow-expunge")
                self.assertEqual(code, 5, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn("not a valid", err)
                self.assertNotIn("Traceback", err)
                self.assertNotIn("CLOSE", self.commands())
                self.assertEqual(self.commands()[-1], "LOGOUT")
                self.assertEqual(len(server.messages("INBOX")), 5)


class PipeliningTest(FakeServerTest):
    """fetch_batches(): the next UID FETCH goes out before the current answer is used."""

    ITEMS = ["FLAGS", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"]
    BATCHES = [[1, 2], [3, 4], [5, 6]]


    def test_pipelined_commands_are_not_held_back_by_nagle(self):
        # Several small writes in a row: with Nagle's algorithm each after the first would
        # wait for the server's delayed ACK (40 ms on Linux), on plain TCP and under TLS.
        for server in (self.server, FakeGmail(tls=True).start()):
            self.addCleanup(server.stop)
            conn = gc.GmailConnection(USER, password=PASSWORD, host="localhost",
                                      port=server.port, keepalive=None,
                                      security="tls" if server.tls else "plaintext",
                                      cafile=write_ca_file(self.tmp) if server.tls else None)
            conn.connect()
            self.addCleanup(conn.close)
            sock = conn._proto.imap.sock
            self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    def setUp(self):
        super().setUp()
        for index in range(1, 7):
            self.server.add_message(make_message(f"message {index}"))
        self.conn = self.connect()
        self.conn.examine("INBOX")

    def fetch_lines(self) -> List[bytes]:
        return [e.line.split(b" ", 3)[3] for e in self.server.log if e.command == "UID FETCH"]

    def subjects(self, result: Dict[int, Dict[str, Any]]) -> Dict[int, bytes]:
        return {uid: values[self.ITEMS[1]].strip() for uid, values in result.items()}

    def test_next_fetch_is_on_the_wire_before_the_first_answer_is_used(self):
        batches = gc.GmailConnection.fetch_batches(self.conn, self.BATCHES, self.ITEMS)
        batch, result = next(batches)
        self.assertEqual(batch, [1, 2])
        self.assertEqual(self.subjects(result), {1: b"Subject: message 1", 2: b"Subject: message 2"})
        wait_until(lambda: self.server.count("UID FETCH") == 2)
        self.assertEqual(self.fetch_lines(), [b"1:2 (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n",
                                              b"3:4 (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"])
        rest = list(batches)
        self.assertEqual([b for b, _ in rest], [[3, 4], [5, 6]])
        self.assertEqual(self.subjects(rest[1][1]), {5: b"Subject: message 5", 6: b"Subject: message 6"})
        self.assertEqual(self.server.count("UID FETCH"), 3)

    def test_a_command_between_batches_reads_the_answer_in_flight_first(self):
        batches = self.conn.fetch_batches(self.BATCHES, self.ITEMS)
        next(batches)
        self.assertEqual(self.conn.search(["ALL"]), [1, 2, 3, 4, 5, 6])
        batch, result = next(batches)
        self.assertEqual(self.subjects(result), {3: b"Subject: message 3", 4: b"Subject: message 4"})
        wait_until(lambda: self.server.count("UID FETCH") == 3)
        self.assertEqual(self.commands()[-4:], ["UID FETCH", "UID FETCH", "UID SEARCH", "UID FETCH"])
        self.assertEqual(len(list(batches)), 1)

    def test_fetches_in_flight_are_sent_again_after_a_drop(self):
        self.server.add_fault("UID FETCH", nth=2, action="drop")   # the one sent ahead
        results = {tuple(b): self.subjects(r) for b, r in self.conn.fetch_batches(self.BATCHES, self.ITEMS)}
        self.assertEqual(results[(3, 4)], {3: b"Subject: message 3", 4: b"Subject: message 4"})
        self.assertEqual(sorted(results), [(1, 2), (3, 4), (5, 6)])
        self.assertEqual(self.conn.reconnects, 1)
        sets = [line.split(b" ")[0] for line in self.fetch_lines()]
        self.assertEqual(sets, [b"1:2", b"3:4", b"3:4", b"5:6"])  # the complete answer is not asked again

    def test_an_answer_cut_short_is_asked_again_with_the_one_behind_it(self):
        self.server.add_fault("UID FETCH", nth=1, action="drop", when="mid")
        results = {tuple(b): self.subjects(r) for b, r in self.conn.fetch_batches(self.BATCHES, self.ITEMS)}
        self.assertEqual(results[(1, 2)], {1: b"Subject: message 1", 2: b"Subject: message 2"})
        self.assertEqual(len(results), 3)
        # the server dropped the link before it read the FETCH sent ahead: both go again
        sets = [line.split(b" ")[0] for line in self.fetch_lines()]
        self.assertEqual(sets, [b"1:2", b"1:2", b"3:4", b"5:6"])
        self.assertEqual(self.conn.reconnects, 1)

    def test_before_each_approves_every_fetch_before_it_is_sent(self):
        calls = []

        def approve(conn):
            calls.append(self.server.count("UID FETCH"))
            if len(calls) == 2:
                raise gc.RunStopped("budget reached")
        batches = self.conn.fetch_batches(self.BATCHES, self.ITEMS, before_each=approve)
        batch, result = next(batches)
        self.assertEqual(sorted(result), [1, 2])
        with self.assertRaises(gc.RunStopped):
            next(batches)
        self.assertEqual(calls, [0, 1])      # asked before the first and before the second
        self.assertEqual(self.server.count("UID FETCH"), 1)   # the refused one never went out
        self.assertEqual(self.conn.search(["ALL"]), [1, 2, 3, 4, 5, 6])   # the wire is clean

    def test_a_refused_fetch_in_flight_raises_when_its_batch_is_asked_for(self):
        self.server.add_fault("UID FETCH", nth=2, action="no", text="[UNAVAILABLE] try later")
        batches = self.conn.fetch_batches(self.BATCHES, self.ITEMS)
        self.assertEqual(sorted(next(batches)[1]), [1, 2])
        with self.assertRaises(gc.ImapError) as caught:
            next(batches)
        self.assertEqual((caught.exception.command, caught.exception.status), ("UID FETCH", "NO"))
        self.assertEqual(self.conn.search(["ALL"]), [1, 2, 3, 4, 5, 6])   # the third answer was read first

    def test_items_that_would_mark_mail_read_are_refused_before_anything_is_sent(self):
        with self.assertRaises(gc.ImapError):
            next(self.conn.fetch_batches(self.BATCHES, ["FLAGS", "BODY[HEADER]"]))
        self.assertEqual(self.server.count("UID FETCH"), 0)

    def test_classify_gives_the_same_report_in_small_batches(self):
        rules = gc.parse_rules({"rule": [{"name": "odd", "subject": ["/[135]$/"], "label": "Odd"}]}, "r.json")
        whole = gc.classify_folder(self.conn, rules, "INBOX")
        small = gc.classify_folder(self.conn, rules, "INBOX", batch_size=2)
        self.assertEqual((small.examined, small.matched, small.changes), (6, {"odd": 3}, {"label Odd": 3}))
        self.assertEqual((whole.examined, whole.matched, whole.changes),
                         (small.examined, small.matched, small.changes))


class KeepaliveTest(FakeServerTest):
    def test_noop_sent_only_after_idle_interval(self):
        conn = self.connect(keepalive=0.05)
        wait_until(lambda: self.server.count("NOOP") >= 2)
        self.assertTrue(conn.connected)

    def test_keepalive_never_interleaves_with_commands(self):
        for _ in range(20):
            self.server.add_message(make_message())
        conn = self.connect(keepalive=0.001)
        conn.select("INBOX")
        errors: List[BaseException] = []

        def worker() -> None:
            try:
                for _ in range(40):
                    self.assertEqual(len(conn.fetch(range(1, 21), ["FLAGS", "X-GM-LABELS"])), 20)
                    wait_until(lambda: self.server.count("NOOP") > 0)
            except BaseException as exc:   # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertGreater(self.server.count("NOOP"), 0)
        self.assertEqual(self.server.count("UID FETCH"), 120)
        self.assertEqual(conn.reconnects, 0)

    def test_keepalive_failure_is_handled_by_the_next_command(self):
        conn = self.connect(keepalive=0.02)
        conn.select("INBOX")
        self.server.add_fault("NOOP", action="drop")
        wait_until(lambda: self.server.fired)
        wait_until(lambda: not conn.connected)
        conn.search()
        self.assertEqual(conn.reconnects, 1)
        self.assertEqual(self.commands()[-2:], ["SELECT", "UID SEARCH"])

    def test_keepalive_thread_stops_promptly_on_close(self):
        conn = self.connect(keepalive=0.01)
        thread = conn._keepalive_thread
        conn.close()
        self.assertFalse(thread.is_alive())


class ReconnectTest(FakeServerTest):
    def setUp(self):
        super().setUp()
        for index in range(5):
            self.server.add_message(make_message(f"message {index}"))

    def test_bye_during_fetch_reconnects_with_backoff(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID FETCH", action="bye")
        self.assertEqual(sorted(conn.fetch([1, 2], ["FLAGS"])), [1, 2])
        self.assertEqual(self.sleep.delays, [1.0])
        self.assertEqual(conn.reconnects, 1)
        self.assertEqual(self.commands()[-3:], ["CAPABILITY", "SELECT", "UID FETCH"])

    def test_drop_mid_fetch_retries(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID FETCH", action="drop", when="mid")
        result = conn.fetch(range(1, 6), ["FLAGS", "BODY.PEEK[HEADER]"])
        self.assertEqual(sorted(result), [1, 2, 3, 4, 5])

    def test_reset_and_timeout_are_retried(self):
        for action, extra in (("reset", {}), ("delay", {"delay": 1.0})):
            with self.subTest(action=action):
                conn = self.connect(timeout=0.3)
                conn.select("INBOX")
                self.server.add_fault("UID SEARCH", action=action, **extra)
                self.assertEqual(conn.search(), [1, 2, 3, 4, 5])
                self.assertEqual(conn.reconnects, 1)

    def test_drop_after_store_retries_and_flags_are_right(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID STORE", action="drop", when="after")
        conn.add_flags([1, 2], ["\\Flagged"])
        flagged = [m for m in self.server.messages("INBOX") if "\\Flagged" in m.flags]
        self.assertEqual(len(flagged), 2)
        self.assertEqual(self.server.count("UID STORE"), 2)

    def test_drop_after_move_does_not_move_twice(self):
        conn = self.connect()
        conn.create_folder("Receipts")
        conn.select("INBOX")
        self.server.add_fault("UID MOVE", action="drop", when="after")
        result = conn.move([1, 2], "Receipts")
        self.assertEqual(sorted(result.moved), [1, 2])
        self.assertEqual(self.server.count("UID MOVE"), 1)
        self.assertEqual(len(self.server.uids("Receipts")), 2)
        self.assertEqual(len(self.server.uids("INBOX")), 3)
        self.assertEqual(len(self.server.uids("[Gmail]/All Mail")), 5)

    def test_drop_before_move_moves_once_after_reconnect(self):
        conn = self.connect()
        conn.create_folder("Receipts")
        conn.select("INBOX")
        self.server.add_fault("UID MOVE", action="drop", when="before")
        result = conn.move([1, 2], "Receipts")
        self.assertEqual(sorted(result.moved), [1, 2])
        self.assertEqual(self.server.count("UID MOVE"), 2)
        self.assertEqual(len(self.server.uids("Receipts")), 2)
        self.assertEqual(self.sleep.delays, [1.0])

    def test_a_move_whose_last_answer_was_lost_is_settled_not_failed(self):
        conn = self.connect(retries=1)
        conn.create_folder("Receipts")
        conn.select("INBOX")
        self.server.add_fault("UID MOVE", action="drop", when="before")
        self.server.add_fault("UID MOVE", nth=2, action="drop", when="after")
        result = conn.move([1, 2], "Receipts")
        self.assertEqual(dict(result.moved), {1: None, 2: None})
        self.assertEqual(self.server.count("UID MOVE"), 2)      # never a third
        self.assertEqual(len(self.server.uids("Receipts")), 2)
        self.assertEqual(len(self.server.uids("INBOX")), 3)
        self.assertEqual(conn.reconnects, 2)
        self.assertTrue(conn.connected)

    def test_a_command_that_keeps_dropping_gives_up_naming_it_with_the_link_dead(self):
        cases = [("UID SEARCH", "UID SEARCH", lambda conn: conn.search()),
                 ("UID FETCH", "UID FETCH", lambda conn: list(conn.fetch_batches([[1]], ["FLAGS"]))),
                 ("IDLE", "IDLE", lambda conn: conn.idle(5)),
                 ("SELECT", "SELECT INBOX", lambda conn: conn.select("INBOX")),
                 ("EXAMINE", "EXAMINE INBOX", lambda conn: conn.examine("INBOX"))]
        for command, named, call in cases:      # in this order: each fault stays
            with self.subTest(command):
                conn = self.connect(retries=2)
                if command not in ("SELECT", "EXAMINE"):
                    conn.select("INBOX")
                before = self.server.count(command)
                self.server.add_fault(command, action="drop", count=100)
                with self.assertRaises(gc.ConnectionLostError) as ctx:
                    call(conn)
                self.assertTrue(str(ctx.exception).startswith(
                    f"{named} kept failing after 2 reconnects: "), str(ctx.exception))
                self.assertEqual(self.server.count(command) - before, 3)
                self.assertFalse(conn.connected)

    def test_backoff_grows_and_gives_up_with_the_cause(self):
        conn = self.connect(retries=3)
        conn.select("INBOX")
        self.server.add_fault("UID SEARCH", action="drop", count=100)
        with self.assertRaises(gc.ConnectionLostError) as ctx:
            conn.search()
        self.assertIsNotNone(ctx.exception.__cause__)
        self.assertEqual(self.server.count("UID SEARCH"), 4)
        self.assertEqual(self.sleep.delays, [1.0, 1.0, 1.0])

    def test_reconnect_backoff_doubles_while_the_server_is_down(self):
        conn = self.connect(retries=3)
        self.server.add_fault("LOGIN", action="drop", count=2)
        self.server.drop_all_connections()
        conn.noop()
        self.assertEqual(self.sleep.delays, [1.0, 2.0, 4.0])

    def test_auth_failure_on_reconnect_is_not_retried(self):
        conn = self.connect()
        self.server.users[USER] = "changed password"
        self.server.drop_all_connections()
        with self.assertRaises(gc.AuthenticationError):
            conn.noop()
        self.assertEqual(self.server.count("LOGIN"), 2)

    def test_uidvalidity_change_on_reconnect_raises(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.bump_uidvalidity("INBOX")
        self.server.drop_all_connections()
        with self.assertRaises(gc.UidValidityError) as ctx:
            conn.fetch([1], ["FLAGS"])
        self.assertIn("UIDVALIDITY of INBOX changed", str(ctx.exception))
        self.assertNotIn("UID FETCH", self.commands())


class IdleTest(FakeServerTest):
    def test_idle_returns_when_mail_arrives(self):
        conn = self.connect(keepalive=0.01)
        conn.select("INBOX")

        def deliver_when_idling() -> None:
            wait_until(lambda: "IDLE" in self.server.commands())
            self.server.deliver(make_message("new mail"))

        thread = threading.Thread(target=deliver_when_idling)
        thread.start()
        started = time.monotonic()
        events = conn.idle(10)
        thread.join()
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn([1, "EXISTS"], events)
        self.assertIn(b"DONE", [line.strip() for line in self.server.raw_lines])
        names = self.commands()
        self.assertEqual(names[names.index("IDLE"):], ["IDLE"])   # no NOOP while idling
        self.assertEqual(conn.search(), [1])

    def test_idle_times_out_quietly(self):
        conn = self.connect()
        conn.select("INBOX")
        self.assertEqual(conn.idle(0.2), [])
        self.assertEqual(self.commands()[-1], "IDLE")

    def test_idle_refused_without_the_capability(self):
        server = FakeGmail(idle=False).start()
        self.addCleanup(server.stop)
        conn = gc.GmailConnection(USER, password=PASSWORD, host="127.0.0.1", port=server.port,
                                  security="plaintext", keepalive=None)
        with conn:
            conn.select("INBOX")
            with self.assertRaises(gc.CapabilityError):
                conn.idle(0.1)


class StallTest(FakeServerTest):
    def test_a_server_that_dribbles_is_a_stall_even_though_each_read_succeeds(self):
        self.server.add_message(make_message())
        conn = self.connect(timeout=0.3, retries=0)
        conn.select("INBOX")
        self.server.add_fault("UID SEARCH", action="dribble", size=1, delay=0.02)
        started = time.monotonic()
        with self.assertRaises(gc.ConnectionLostError) as ctx:
            conn.search()
        self.assertLess(time.monotonic() - started, 3)
        self.assertIn("stalled", str(ctx.exception))

    def test_a_fast_start_does_not_excuse_a_dribble_later(self):
        self.server.add_message(make_message(body="x" * 4000))
        conn = self.connect(timeout=0.3, retries=0)
        conn.select("INBOX")
        self.server.add_fault("UID FETCH", action="dribble", burst=2048, size=1, delay=0.005)
        with self.assertRaisesRegex(gc.ConnectionLostError, "stalled"):
            conn.fetch([1], ["BODY.PEEK[]"])

    def test_the_command_line_gives_up_on_a_dribbling_server_with_exit_4(self):
        self.server.add_fault("EXAMINE", action="dribble", size=1, delay=0.02, count=5)
        started = time.monotonic()
        code, _, err = run_cli("--user", USER, "--host", "127.0.0.1", "--port",
                               str(self.server.port), "--plaintext", "--retries", "0",
                               "--timeout", "0.3", env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_CONNECTION, err)
        self.assertLess(time.monotonic() - started, 5)

    def test_a_slow_but_working_link_still_completes_a_large_fetch(self):
        body = "".join(f"line {n} of a long message\n" for n in range(4000))   # ~110 KB
        self.server.add_message(make_message(body=body))
        conn = self.connect(timeout=0.3, retries=0)
        conn.select("INBOX")
        self.server.add_fault("UID FETCH", action="dribble", size=4096, delay=0.02)
        started = time.monotonic()
        result = conn.fetch([1], ["BODY.PEEK[]"])
        self.assertGreater(time.monotonic() - started, 0.3)   # longer than one window
        self.assertIn(b"line 3999 of a long message", result[1]["BODY.PEEK[]"])
        self.assertEqual(conn.reconnects, 0)

    def test_idle_is_exempt(self):
        conn = self.connect(timeout=0.2)
        conn.select("INBOX")
        time.sleep(0.3)   # longer than a window since the last answer
        self.assertEqual(conn.idle(0.5), [])
        threading.Timer(0.3, self.server.deliver, [make_message("late")]).start()
        events = conn.idle(3)
        self.assertIn("EXISTS", [str(e[1]) for e in events])
        self.assertEqual(conn.reconnects, 0)


class LineLimitTest(FakeServerTest):
    def test_lines_are_bounded_and_only_search_may_be_long_in_proportion(self):
        self.server.add_message(make_message())
        conn = self.connect()
        conn.select("INBOX")
        with mock.patch.object(gc, "MAX_RESPONSE_LINE", 2000):
            self.server.add_fault("UID SEARCH", action="huge_search", size=1500)   # ~3 KB
            self.assertEqual(conn.search(), [1])
            self.server.add_fault("NOOP", action="unsolicited",
                                  text="* 1 FETCH (UID 1 X-JUNK (" + "1 " * 1500 + "))")
            with self.assertRaisesRegex(gc.ProtocolError, "longer than 2000"):
                conn.noop()
        self.assertFalse(conn.connected)
        conn.noop()
        self.assertEqual(conn.reconnects, 1)

    def test_a_flood_while_imaplib_reads_the_greeting_ends_the_connection(self):
        class FloodedGreeting(_Session):
            def _send(self, data):
                super()._send(data + b"* OK flood\r\n" * 1500
                              if data.startswith(b"* OK Gimap") else data)

        self.server.use_handler(FloodedGreeting)
        with self.assertRaisesRegex(gc.ProtocolError, "far more lines"):
            self.connect(retries=0)
        self.assertNotIn("LOGIN", self.commands())


class ResourceLimitsTest(FakeServerTest):
    def setUp(self):
        super().setUp()
        for n in range(3):
            self.server.add_message(make_message(f"message {n}", body=f"body {n} invoice\n"))

    def test_an_oversized_literal_is_discarded_and_only_that_message_skipped(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID FETCH", action="huge_literal", size=8 * 1024 * 1024)
        skipped: List[int] = []
        tracemalloc.start()
        try:
            result = conn.fetch([1, 2, 3], ["BODY.PEEK[]<0.16384>"], skipped=skipped)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(skipped, [1])
        self.assertEqual(sorted(result), [2, 3])
        self.assertLess(peak, 2 * 1024 * 1024)   # the 8 MiB were never kept
        self.assertTrue(conn.connected)
        self.assertEqual(sorted(conn.fetch([1], ["FLAGS"])), [1])   # still in step

    def test_the_run_skips_that_message_acts_on_the_others_and_exits_6(self):
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            # Matches an empty body too: a skipped message must not be judged without one.
            json.dump({"rule": [{"name": "Bodies", "not": {"body": "zzz"}, "star": True}]},
                      handle)
        self.server.add_fault("UID FETCH", nth=2, action="huge_literal", size=3 * 1024 * 1024)
        argv = ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--rules", rules, "--apply"]
        code, out, err = run_cli(*argv, env={"GMAIL_APP_PASSWORD": PASSWORD, "XDG_STATE_HOME": self.tmp})
        self.assertEqual(code, gc.EXIT_INCOMPLETE, err)
        self.assertIn("1 message skipped", err)
        self.assertIn("run again", err)
        flags = [m.flags for m in self.server.messages("INBOX")]
        self.assertEqual(flags, [set(), {"\\Flagged"}, {"\\Flagged"}])
        # Running again, the skipped message is looked at (the mark stopped before it).
        code, out, err = run_cli(*argv, env={"GMAIL_APP_PASSWORD": PASSWORD, "XDG_STATE_HOME": self.tmp})
        self.assertEqual(code, 0, err)
        self.assertEqual([m.flags for m in self.server.messages("INBOX")], [{"\\Flagged"}] * 3)

    def test_an_oversized_header_answer_in_the_pipelined_fetch_skips_only_that_message(self):
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump({"rule": [{"name": "All", "subject": "message", "star": True}]}, handle)
        self.server.add_fault("UID FETCH", action="huge_literal", size=3 * 1024 * 1024)
        code, out, err = run_cli("--user", USER, "--host", "127.0.0.1", "--port",
                                 str(self.server.port), "--plaintext", "--rules", rules,
                                 "--apply", env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_INCOMPLETE, err)
        self.assertIn("INBOX: 1 message skipped", err)
        self.assertEqual([m.flags for m in self.server.messages("INBOX")],
                         [set(), {"\\Flagged"}, {"\\Flagged"}])

    def test_a_huge_copyuid_is_ignored_not_expanded(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID MOVE", action="huge_copyuid")
        tracemalloc.start()
        try:
            result = conn.move([1], "[Gmail]/Trash")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(dict(result.moved), {1: None})
        self.assertLess(peak, 5 * 1024 * 1024)
        self.assertEqual(self.server.uids("INBOX"), [2, 3])

    def test_copyuid_naming_uids_that_were_not_sent_is_unusable(self):
        response = gc._Response("OK", "COPYUID", [9, "1:2", "5:6"], "done", [])
        self.assertEqual(gc._copyuid_map(response, [1, 2]), {1: 5, 2: 6})
        self.assertEqual(gc._copyuid_map(response, [1]), {})
        self.assertEqual(gc._copyuid_map(response, [1, 3]), {})
        with self.assertRaises(ValueError):
            gc.parse_uid_set("1:4294967295", limit=1000)
        self.assertEqual(gc.parse_uid_set("3:1,7", limit=4), [1, 2, 3, 7])

    def test_a_search_naming_more_uids_than_the_folder_holds_is_a_protocol_error(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID SEARCH", action="huge_search", size=50000)
        with self.assertRaises(gc.ProtocolError) as ctx:
            conn.search()
        self.assertIn("far more than the folder holds", str(ctx.exception))
        self.assertFalse(conn.connected)   # out of step: never read from again
        self.assertEqual(conn.search(), [1, 2, 3])
        self.assertEqual(self.server.count("LOGIN"), 2)

    def test_an_exists_flood_updates_state_and_is_not_kept(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID SEARCH", action="exists_flood", size=3000)
        with mock.patch.object(gc, "MAX_KEPT_UNTAGGED", 1000):
            self.assertEqual(conn.search(), [1, 2, 3])
        self.assertEqual(conn.selected.exists, 3 + 2999)

    def test_too_many_needed_answers_are_a_protocol_error(self):
        conn = self.connect()
        lines = "\r\n".join(f'* LIST (\\HasNoChildren) "/" "folder {n}"' for n in range(50))
        self.server.add_fault("LIST", action="unsolicited", text=lines)
        with mock.patch.object(gc, "MAX_KEPT_UNTAGGED", 20):
            with self.assertRaises(gc.ProtocolError):
                conn.list_folders()

    def test_a_nesting_bomb_is_a_protocol_error_exit_5_not_a_crash(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID FETCH", action="nesting_bomb", size=5000)
        with self.assertRaises(gc.ProtocolError) as ctx:
            conn.fetch([1], ["BODYSTRUCTURE"])
        self.assertIn("nested deeper", str(ctx.exception))
        self.assertFalse(conn.connected)
        self.server.add_fault("UID FETCH", action="nesting_bomb", size=5000)
        code, _, err = run_cli("--user", USER, "--host", "127.0.0.1", "--port",
                               str(self.server.port), "--plaintext", "--retries", "0",
                               env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_SERVER, err)
        self.assertNotIn("Traceback", err)

    def test_nonsense_values_are_protocol_errors_and_the_connection_is_dropped(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("NOOP", action="unsolicited", text="* OK [UIDNEXT \u00b2] hm")
        conn.noop()   # a superscript digit is not a number: kept as text, no crash
        self.server.add_fault("UID FETCH", action="garbage")
        with self.assertRaises(gc.ProtocolError):
            conn.fetch([1], ["FLAGS"])
        self.assertFalse(conn.connected)
        self.assertEqual(sorted(conn.fetch([1], ["FLAGS"])), [1])
        self.assertEqual(conn.reconnects, 1)

    def test_literal_limits_follow_what_was_asked(self):
        table = [(["BODY.PEEK[]<0.16384>"], 16384),
                 (["FLAGS", "BODY.PEEK[HEADER.FIELDS (FROM)]"], gc.MAX_HEADER_LITERAL),
                 (["BODY.PEEK[]"], gc.MAX_MESSAGE_LITERAL),
                 (["FLAGS", "X-GM-LABELS"], gc.MAX_SMALL_LITERAL),
                 (["BODYSTRUCTURE", "BODY.PEEK[1]<0.100>"], gc.MAX_SMALL_LITERAL)]
        for items, limit in table:
            with self.subTest(items=items):
                self.assertEqual(gc._fetch_literal_limit(items), limit)


# Each fault is a FakeGmail fault (flood, big_list, repeat_fetch, lying_exists, echo) or
# quirk (8bit-greeting).  What is asserted: the one-line refusal and its exit code, that
# the time or memory stays bounded, and that nothing changed on the server.

class FloodTest(FakeServerTest):
    def setUp(self):
        super().setUp()
        for n in range(3):
            self.server.add_message(make_message(f"message {n}"))

    def argv(self, rules: str, *extra: str) -> List[str]:
        return ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--rules", rules, *extra]

    def star_all(self) -> str:
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump({"rule": [{"name": "All", "subject": "message", "star": True}]}, handle)
        return rules

    def test_a_flood_of_lines_nobody_asked_for_is_a_protocol_error(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID SEARCH", action="flood", size=50000)
        started = time.monotonic()
        with self.assertRaises(gc.ProtocolError) as ctx:
            conn.search()
        self.assertLess(time.monotonic() - started, 3)
        self.assertIn("UID SEARCH", str(ctx.exception))
        self.assertIn(f"more than {gc.MAX_UNREQUESTED_ANSWERS} untagged answers", str(ctx.exception))
        self.assertFalse(conn.connected)          # out of step: never read from again
        self.assertEqual(conn.search(), [1, 2, 3])

    def test_a_thousand_lines_nobody_asked_for_are_still_fine(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID SEARCH", action="flood", size=gc.MAX_UNREQUESTED_ANSWERS)
        self.assertEqual(conn.search(), [1, 2, 3])
        self.assertTrue(conn.connected)

    def test_state_updates_are_fine_in_number_but_not_in_bytes(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID SEARCH", action="flood", size=5000,
                              text="* 1 FETCH (FLAGS (\\Seen))")
        self.assertEqual(conn.search(), [1, 2, 3])       # 5,000 updates: legitimate
        self.server.add_fault("UID SEARCH", action="flood", size=5000,
                              text="* 1 FETCH (FLAGS (\\Seen))")
        with mock.patch.object(gc, "MAX_UNREQUESTED_BYTES", 50_000):
            with self.assertRaisesRegex(gc.ProtocolError, "more than 50000 bytes"):
                conn.search()

    def test_a_flood_after_done_ends_idle_with_a_protocol_error(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("IDLE", action="flood", size=20000, text="* OK still here")
        started = time.monotonic()
        with self.assertRaisesRegex(gc.ProtocolError, "IDLE"):
            conn.idle(0.2)
        self.assertLess(time.monotonic() - started, 3)
        self.assertFalse(conn.connected)

    def test_the_command_line_refuses_a_flooding_server_with_exit_5_and_changes_nothing(self):
        rules = self.star_all()
        before = mailbox_snapshot(self.server)
        self.server.add_fault("SELECT", action="flood", size=300000, count=5)
        started = time.monotonic()
        code, out, err = run_cli(*self.argv(rules, "--apply", "--timeout", "5", "--retries", "1"),
                                 env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_SERVER, err)
        self.assertLess(time.monotonic() - started, 10)
        self.assertNotIn("Traceback", err)
        self.assertEqual(len([l for l in errors(err) if "untagged answers" in l]), 1, err)
        self.assertEqual(mailbox_snapshot(self.server), before)


class StopWhileReadingTest(FakeServerTest):
    def setUp(self):
        super().setUp()
        self.server.add_message(make_message())
        self.stop = gc.Stop()
        patcher = mock.patch.object(gc, "STOP_GRACE", 0.5)
        patcher.start()
        self.addCleanup(patcher.stop)

    def stop_soon(self, after: float = 0.2) -> None:
        timer = threading.Timer(after, self.stop.request, [signal.SIGTERM])
        timer.start()
        self.addCleanup(timer.cancel)

    def test_a_stop_ends_the_read_of_a_server_that_floods_within_the_grace(self):
        conn = self.connect(stop=self.stop, timeout=30)
        conn.select("INBOX")
        # Updates are legitimate in any number: without a stop this read goes on for long.
        self.server.add_fault("UID SEARCH", action="flood", size=2_000_000, text="* 1 EXISTS")
        self.stop_soon()
        started = time.monotonic()
        with mock.patch.object(gc, "MAX_UNREQUESTED_BYTES", 10 ** 12):
            with self.assertRaises(gc.StopRequested) as ctx:
                conn.search()
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertEqual(ctx.exception.signum, signal.SIGTERM)
        self.assertFalse(conn.connected)

    def test_the_grace_never_exceeds_the_timeout(self):
        conn = self.connect(stop=self.stop, timeout=0.4)
        conn.select("INBOX")
        self.server.add_fault("UID SEARCH", action="flood", size=2_000_000, text="* 1 EXISTS")
        self.stop_soon(0.1)
        started = time.monotonic()
        with mock.patch.object(gc, "MAX_UNREQUESTED_BYTES", 10 ** 12), \
                mock.patch.object(gc, "STOP_GRACE", 30):
            with self.assertRaises(gc.StopRequested):
                conn.search()
        self.assertLess(time.monotonic() - started, 2)

    def test_a_stop_ends_a_read_that_waits_for_a_silent_server(self):
        conn = self.connect(stop=self.stop, timeout=30)
        self.server.add_fault("NOOP", action="delay", delay=10)
        self.stop_soon()
        started = time.monotonic()
        with self.assertRaises(gc.StopRequested):
            conn.noop()
        self.assertLess(time.monotonic() - started, 2.5)

    def test_an_answer_already_coming_still_completes_within_the_grace(self):
        conn = self.connect(stop=self.stop)
        self.stop.request()
        self.assertEqual(conn.noop(), [])       # the answer came at once: no need to cut it
        conn.close()
        self.assertEqual(self.server.count("LOGOUT"), 1)

    def test_a_stop_ends_the_backoff_between_reconnects(self):
        conn = self.connect(stop=self.stop, retries=3, backoff=4, sleep=time.sleep)
        self.server.stop()
        self.stop_soon(0.3)
        started = time.monotonic()
        with self.assertRaises(gc.StopRequested):
            conn.noop()
        self.assertLess(time.monotonic() - started, 2)

    def test_a_stop_ends_idle_cleanly(self):
        conn = self.connect(stop=self.stop)
        conn.select("INBOX")
        self.stop_soon(0.3)
        started = time.monotonic()
        self.assertEqual(conn.idle(20), [])
        self.assertLess(time.monotonic() - started, 2)
        self.assertTrue(conn.connected)          # DONE was sent and answered


class KeptBytesTest(FakeServerTest):
    def setUp(self):
        super().setUp()
        body = "".join(f"line {n} of a long message\n" for n in range(4000))   # ~110 KB
        self.server.add_message(make_message("big", body=body))
        self.server.add_message(make_message("small"))

    def test_a_list_of_huge_names_stops_at_the_cap(self):
        conn = self.connect()
        self.server.add_fault("LIST", action="big_list", size=40, burst=512 * 1024)
        started = time.monotonic()
        with mock.patch.object(gc, "MAX_KEPT_BYTES", 4 * 1024 * 1024):
            with self.assertRaises(gc.ProtocolError) as ctx:
                conn.list_folders()
        self.assertLess(time.monotonic() - started, 10)   # 20 MB sent: it stopped at 4
        self.assertIn("LIST", str(ctx.exception))
        self.assertIn(f"more than {4 * 1024 * 1024} bytes", str(ctx.exception))
        self.assertLess(self.server.count("LIST"), 2)

    def test_the_same_fetch_repeated_is_kept_once_latest_wins(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID FETCH", action="repeat_fetch", size=100)
        tracemalloc.start()
        try:
            result = conn.fetch([1, 2], ["FLAGS", "BODY.PEEK[]"])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertIn(b"line 3999 of a long message", result[1]["BODY.PEEK[]"])
        self.assertEqual(sorted(result), [1, 2])
        self.assertLess(peak, 3 * 1024 * 1024)   # 100 copies of 110 KB were never all kept

    def test_fetch_answers_for_one_uid_merge_latest_wins(self):
        budget = gc._AnswerBudget("UID FETCH")
        kept: List[List[Any]] = []
        budget.kept(kept, [1, "FETCH", ["UID", 7, "FLAGS", [], "BODY[]", b"abc"]], 40)
        budget.kept(kept, [1, "FETCH", ["FLAGS", ["\\Seen"], "UID", 7]], 30)
        budget.kept(kept, [2, "FETCH", ["UID", 8, "FLAGS", []]], 20)
        self.assertEqual(kept, [[1, "FETCH", ["UID", 7, "FLAGS", ["\\Seen"], "BODY[]", b"abc"]],
                                [2, "FETCH", ["UID", 8, "FLAGS", []]]])
        self.assertLess(budget.kept_bytes, 200)
        with mock.patch.object(gc, "MAX_KEPT_BYTES", 1000):
            with self.assertRaisesRegex(gc.ProtocolError, "more than 1000 bytes.*UID FETCH"):
                budget.kept(kept, [3, "FETCH", ["UID", 9, "BODY[]", b"x" * 1000]], 1030)

    def test_a_lying_exists_does_not_lift_the_search_limit(self):
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("NOOP", action="lying_exists")
        conn.noop()
        self.assertEqual(conn.selected.exists, 4294967295)
        self.server.add_fault("UID SEARCH", action="huge_search",
                              size=gc.MAX_FOLDER_MESSAGES * 2 + 10001)
        with self.assertRaisesRegex(gc.ProtocolError, "far more than the folder holds"):
            conn.search()
        self.assertLessEqual(conn._proto.search_line_limit(), 11 * (gc.MAX_FOLDER_MESSAGES * 2 + 10000))


class EightBitGreetingTest(FakeServerTest):
    server_options = {"quirks": ["8bit-greeting"]}

    def test_an_8bit_greeting_and_capability_are_tolerated(self):
        conn = self.connect()
        self.assertIn("IMAP4REV1", conn.capabilities)
        self.assertTrue(all(cap.isascii() for cap in conn.capabilities))
        self.server.add_message(make_message())
        code, out, err = run_cli("--user", USER, "--host", "127.0.0.1", "--port",
                                 str(self.server.port), "--plaintext",
                                 env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 0, err)
        self.assertNotIn("UnicodeDecodeError", err)


class RepeatedSecretTest(FakeServerTest):
    """A server that quotes back what we sent must not make us print a credential."""

    def secret_forms(self, secret: str, sasl: bytes) -> List[str]:
        return [secret, base64.b64encode(secret.encode()).decode(),
                base64.b64encode(sasl).decode()]

    def run_both_verbosities(self, env: Dict[str, str], forms: List[str], expected: int,
                             *extra: str) -> None:
        for verbosity in (extra, (*extra, "-vv")):
            with self.subTest(verbosity=verbosity):
                code, out, err = run_cli("--user", USER, "--host", "127.0.0.1", "--port",
                                         str(self.server.port), "--plaintext", "--retries",
                                         "0", *verbosity, env=env)
                self.assertEqual(code, expected, err)
                self.assertIn("<redacted>", err)
                for form in forms:
                    self.assertNotIn(form, out + err)

    def test_a_login_quoted_back_in_the_refusal_is_redacted(self):
        self.server.add_fault("LOGIN", action="echo", count=2)
        forms = self.secret_forms(PASSWORD, f"\0{USER}\0{PASSWORD}".encode())
        self.run_both_verbosities({"GMAIL_APP_PASSWORD": PASSWORD}, forms, gc.EXIT_AUTH)

    def test_an_xoauth2_string_in_a_challenge_is_redacted(self):
        self.server.add_fault("AUTHENTICATE", action="echo", count=2)
        forms = self.secret_forms(TOKEN, f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode())
        self.run_both_verbosities({"GMAIL_OAUTH_TOKEN": TOKEN}, forms, gc.EXIT_AUTH,
                                  "--auth", "xoauth2")

    def test_an_untagged_alert_repeating_the_password_is_redacted(self):
        self.server.add_message(make_message())
        self.server.add_fault("EXAMINE", action="unsolicited", count=2,
                              text=f"* NO [ALERT] someone signed in with {PASSWORD}")
        self.run_both_verbosities({"GMAIL_APP_PASSWORD": PASSWORD}, [PASSWORD], 0)

    def test_redact_blanks_every_form_of_every_secret(self):
        conn = gc.GmailConnection(USER, password="x", host="127.0.0.1", security="plaintext")
        conn._proto.remember_secret('pa"ss\\word')
        conn._proto.remember_secret("dG9rZW4=")
        text = conn.redact('LOGIN "pa\\"ss\\\\word" ' + base64.b64encode(b'pa"ss\\word').decode()
                           + ' pa"ss\\word dG9rZW4=')
        self.assertEqual(text, "LOGIN \"<redacted>\" <redacted> <redacted> <redacted>")


class _TurnCounter:
    """Records each chunk the client sends with the round trip it belongs to (a send
    after a receive starts the next one)."""

    def __init__(self) -> None:
        self.turn, self.last, self.sent = 0, "recv", []

    def wire(self) -> type:
        counter = self

        class Socket:
            def __init__(self, sock: socket.socket) -> None:
                self._sock = sock

            def __getattr__(self, name: str) -> Any:
                return getattr(self._sock, name)

            def sendall(self, data: bytes) -> None:
                if counter.last == "recv":
                    counter.turn += 1
                counter.last = "send"
                counter.sent.append((counter.turn, bytes(data)))
                self._sock.sendall(data)

            def recv(self, size: int) -> bytes:
                counter.last = "recv"
                return self._sock.recv(size)

        class Wire(gc._PlainWire):
            def _create_socket(self, timeout: Optional[float] = None) -> Any:
                return Socket(super()._create_socket(timeout))
        return Wire

    def turns_of(self, needle: bytes) -> List[int]:
        return [turn for turn, data in self.sent if needle in data]


class StatusPipelineTest(StateTestCase):
    """The STATUS of a step's destinations goes out in one round trip."""

    server_options = {"gmail": False}

    def test_destination_statuses_of_a_step_share_one_round_trip(self):
        seed_mailbox(self.server, 12)
        rules = gc.parse_rules({"rule": [
            {"name": "a", "subject": "/[02468]$/", "label": "Even"},
            {"name": "b", "subject": "/[13579]$/", "label": "Odd", "continue": True},
            {"name": "c", "subject": "/./", "label": "All"}]}, "rules.json")
        counter = _TurnCounter()
        with mock.patch.object(gc, "_PlainWire", counter.wire()):
            self.run_once(rules)
        turns = counter.turns_of(b" (MESSAGES UIDNEXT UIDVALIDITY)")
        self.assertEqual(len(turns), 3)                 # Even, Odd, All
        self.assertEqual(len(set(turns)), 1, counter.sent)
        snapshot = mailbox_snapshot(self.server)
        self.assertEqual([len(snapshot[name]) for name in ("Even", "Odd", "All")], [6, 6, 6])

    def test_statuses_answers_each_folder_and_names_the_one_refused(self):
        self.server.add_message(make_message("one"), folder="Lists")
        conn = self.connect()
        conn.list_folders()
        found = conn.statuses(["Lists", "Nowhere", "INBOX"])
        self.assertEqual(found["Lists"], conn.status("Lists"))
        self.assertEqual(found["INBOX"], conn.status("INBOX"))
        self.assertIsInstance(found["Nowhere"], gc.ImapError)
        self.assertEqual(found["Nowhere"].status, "NO")
        self.assertEqual(conn.statuses([]), {})

    def test_statuses_are_asked_again_after_a_drop(self):
        self.server.add_message(make_message("one"), folder="Lists")
        self.server.add_message(make_message("two"), folder="Other")
        conn = self.connect()
        self.server.add_fault("STATUS", nth=2, action="drop")
        found = conn.statuses(["Lists", "Other"])
        self.assertEqual(found["Lists"]["MESSAGES"], 1)
        self.assertEqual(found["Other"]["MESSAGES"], 1)
        self.assertEqual(conn.reconnects, 1)


class StatusesOnAnyServerTest(unittest.TestCase):
    """GmailConnection.statuses where names go raw and answers go wrong."""

    def connect(self, **options: Any) -> gc.GmailConnection:
        server = FakeGmail(**options).start()
        self.addCleanup(server.stop)
        self.server = server
        conn = gc.GmailConnection(USER, host="127.0.0.1", port=server.port, security="plaintext",
                                  password=PASSWORD, timeout=5, keepalive=None, retries=1,
                                  sleep=lambda s: None)
        self.addCleanup(conn.close)
        return conn

    def test_a_name_that_goes_as_a_literal_is_asked_on_its_own(self):
        conn = self.connect(kind="move", quirks=["raw-utf8-names"])
        self.server.add_message(make_message("old"), folder="Entwürfe")
        self.server.add_message(make_message("list"), folder="Lists")
        conn.connect()
        conn.list_folders()
        found = conn.statuses(["Entwürfe", "Lists"])
        self.assertEqual((found["Entwürfe"]["MESSAGES"], found["Lists"]["MESSAGES"]), (1, 1))

    def test_an_answer_that_makes_no_sense_is_raised_not_kept(self):
        conn = self.connect(gmail=False)
        self.server.add_message(make_message("list"), folder="Lists")
        conn.connect()
        self.server.add_fault("STATUS", nth=1, action="garbage")
        with self.assertRaises(gc.ProtocolError):
            conn.statuses(["Lists", "INBOX"])


#
# A step's writes go out in flights (_WriteFlight): one wait for the server per flight, the
# moves' answers read while the next batch is classified; a server that answers pipelined
# commands out of order (Dovecot) has each answer kept for its own command.


def _out_of_order(*hold: str, patience: float = 0.3) -> type:
    return type("OutOfOrder", (_OutOfOrderSession,), {"hold": hold, "patience": patience})


class OutOfOrderAnswersTest(FakeServerTest):
    """Pipelined answers that come out of order are each kept for their own command."""

    ITEMS = ["FLAGS", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"]

    def setUp(self):
        super().setUp()
        self.server.held = collections.Counter()
        for index in range(1, 7):
            self.server.add_message(make_message(f"message {index}"))
        setup = self.connect()
        for name in ("A", "B"):
            setup.create_folder(name)
        setup.close()

    def test_statuses_answered_out_of_order_each_keep_their_own_numbers(self):
        self.server.add_message(make_message("in B"), folder="B")
        self.server.use_handler(_out_of_order("STATUS"))
        conn = self.connect()
        found = conn.statuses(["A", "B", "INBOX"])
        self.assertGreaterEqual(self.server.held["STATUS"], 1)
        self.assertEqual({name: values["MESSAGES"] for name, values in found.items()},
                         {"A": 0, "B": 1, "INBOX": 7})

    def test_a_later_fetch_answered_before_a_flight_of_writes_is_kept_for_it(self):
        # The MOVE's tagged line waits: the FETCH sent behind it is answered first, data
        # and OK, while the client reads the MOVE's answer.
        self.server.use_handler(_out_of_order("UID MOVE"))
        conn = self.connect()
        conn.select("INBOX")
        flight = gc._WriteFlight(conn)
        flight.store(("flag+", "\\Flagged"), [1, 2], "+FLAGS", [b"\\Flagged"])
        flight.move(("move", "A"), [1, 2], "A")
        flight.send()
        batches = conn.fetch_batches([[3, 4], [5, 6]], self.ITEMS)
        batch, result = next(batches)
        writes = flight.land()
        self.assertEqual(self.server.held["UID MOVE"], 1)
        self.assertEqual({uid: values[self.ITEMS[1]].strip() for uid, values in result.items()},
                         {3: b"Subject: message 3", 4: b"Subject: message 4"})
        self.assertEqual([w.error for w in writes], [None, None])
        self.assertEqual(writes[0].result, {1: None, 2: None})
        moved = writes[1].result
        self.assertEqual(sorted(moved), [1, 2])
        self.assertEqual(sorted(moved.values()), self.server.uids("A"))
        self.assertEqual(len(list(batches)), 1)
        self.assertEqual([m.flags & {"\\Flagged"} for m in self.server.messages("A")],
                         [{"\\Flagged"}] * 2)

    def test_each_move_gets_the_copyuid_that_names_its_own_uids(self):
        self.server.use_handler(_out_of_order("UID MOVE"))
        conn = self.connect()
        conn.select("INBOX")
        flight = gc._WriteFlight(conn)
        flight.move(("move", "A"), [1, 3], "A")
        flight.move(("move", "B"), [2, 4, 5], "B")
        flight.send()
        first, second = flight.land()
        self.assertGreaterEqual(self.server.held["UID MOVE"], 1)
        self.assertEqual(sorted(first.result.values()), self.server.uids("A"))
        self.assertEqual(sorted(second.result.values()), self.server.uids("B"))
        subjects = dict(zip(self.server.uids("B"), (m.raw for m in self.server.messages("B"))))
        for uid, new in second.result.items():
            self.assertIn(f"Subject: message {uid}".encode(), subjects[new])

    def test_a_run_against_a_server_that_answers_out_of_order_ends_like_an_in_order_one(self):
        for options in ({}, {"gmail": False}):
            with self.subTest(**options):
                expected = FakeGmail(**options).start()
                self.addCleanup(expected.stop)
                seed_mailbox(expected, 12)
                server = FakeGmail(**options).start()
                self.addCleanup(server.stop)
                seed_mailbox(server, 12)
                server.held = collections.Counter()
                server.use_handler(_out_of_order("UID STORE", "UID COPY", "UID MOVE",
                                                 "UID FETCH", "CREATE", "STATUS",
                                                 patience=0.02))
                rules = gc.parse_rules(SWEEP_DOC, "rules.json")
                for target in (expected, server):
                    conn = gc.GmailConnection(USER, host="127.0.0.1", port=target.port,
                                              security="plaintext", password=PASSWORD,
                                              timeout=5, keepalive=None)
                    with conn:
                        report = gc.classify_folder(conn, rules, "INBOX", apply=True,
                                                    batch_size=3)
                    self.assertEqual((report.skipped, report.changes_not_made), ([], 0))
                self.assertEqual(mailbox_snapshot(server), mailbox_snapshot(expected))
                self.assertGreaterEqual(sum(server.held.values()), 3)


# --- Messages: what the rule engine sees -------------------------------------------------


class HeaderTest(unittest.TestCase):
    def test_header_text_repairs_raw_8bit(self):
        cases = [
            ("latin-1", b"Subject: Caf\xe9 cr\xe8me\r\n\r\n", "Café crème"),
            ("cp1252 quotes", b"Subject: \x93quoted\x94 \x80 5\r\n\r\n", "\u201cquoted\u201d \u20ac 5"),
            ("raw utf-8", "Subject: Grüße aus Köln\r\n\r\n".encode("utf-8"), "Grüße aus Köln"),
            ("encoded word", b"Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\n\r\n", "Grüße"),
            ("folded", b"Subject: one\r\n two\r\n\r\n", "one two"),
            ("raw 8-bit beside encoded words", "Subject: Jérôme =?utf-8?q?G=C3=BC?= =?utf-8?q?=C3=9Fe?= x\r\n\r\n"
             .encode("latin-1"), "Jérôme Güße x"),
            ("bad charset in encoded word kept", b"Subject: caf\xe9 =?x-bogus?q?a?=\r\n\r\n",
             "café =?x-bogus?q?a?="),
        ]
        for label, raw, expected in cases:
            with self.subTest(label):
                self.assertEqual(header_text(parse_headers(raw), "subject"), [expected])

    def test_header_text_returns_every_value_or_none(self):
        msg = parse_headers(b"Received: a\r\nReceived: b\r\nSubject: x\r\n\r\n")
        self.assertEqual(header_text(msg, "received"), ["a", "b"])
        self.assertEqual(header_text(msg, "X-Missing"), [])

    def test_header_addresses_formats_and_decodes(self):
        cases = [
            ("quoted name", b'From: "Amazon.com" <auto-confirm@amazon.com>',
             ["Amazon.com <auto-confirm@amazon.com>"]),
            ("bare address", b"From: user@example.com", ["user@example.com"]),
            ("encoded name", b"From: =?iso-8859-1?Q?Andr=E9?= <a@b.fr>", ["André <a@b.fr>"]),
            ("raw latin-1 name", b"From: J\xe9r\xf4me <j@x.fr>", ["Jérôme <j@x.fr>"]),
            ("list", b"To: A <a@x.y>, b@x.y", ["A <a@x.y>", "b@x.y"]),
            ("group", b"To: team: a@x.y, b@x.y;", ["a@x.y", "b@x.y"]),
            ("garbage kept as text", b"From: Amazon", ["Amazon"]),
            ("broken address keeps good one", b"To: =?iso-8859-1?Q?Andr=E9?= <a@b.c>, bad<<@@",
             ["André <a@b.c>"]),
        ]
        for label, raw, expected in cases:
            with self.subTest(label):
                name = raw.split(b":", 1)[0].decode()
                self.assertEqual(header_addresses(parse_headers(raw + b"\r\n\r\n"), name), expected)

    def test_parse_headers_never_raises(self):
        for raw in (b"", b"\xff\xfe\x00garbage", b"no colon here\r\n\r\nbody", b":\r\n"):
            with self.subTest(raw=raw):
                msg = parse_headers(raw)
                self.assertEqual(header_text(msg, "subject"), [])


PLAIN = b"From: a@b.c\r\nSubject: hi\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello  world\r\n"
HTML_ONLY = (b"Content-Type: text/html; charset=iso-8859-1\r\n\r\n"
             b"<html><head><style>p {color: red}</style><title>T</title></head>"
             b"<body><p>Caf\xe9 &amp; cr&egrave;me</p><script>var x = 1;</script><p>Bye</p></body></html>")
ALTERNATIVE = b"""MIME-Version: 1.0\r
Content-Type: multipart/alternative; boundary="b1"\r
\r
--b1\r
Content-Type: text/html; charset=utf-8\r
\r
<p>HTML version</p>\r
--b1\r
Content-Type: text/plain; charset=utf-8\r
Content-Transfer-Encoding: quoted-printable\r
\r
Plain version =C3=BC\r
--b1--\r
"""
TRUNCATED_BASE64 = (b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n--XX\r\n'
                    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                    + base64.encodebytes("Your receipt for order 12345, thank you".encode())[:-12])
UNKNOWN_CHARSET = b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nna\xc3\xafve text\r\n"
NON_TEXT_CODEC = b"Content-Type: text/plain; charset=base64\r\n\r\nplain words\r\n"
WITH_ATTACHMENT = b"""MIME-Version: 1.0\r
Content-Type: multipart/mixed; boundary="m"\r
\r
--m\r
Content-Type: text/plain\r
\r
See attached.\r
--m\r
Content-Type: application/pdf; name="invoice.pdf"\r
Content-Disposition: attachment; filename="invoice.pdf"\r
Content-Transfer-Encoding: base64\r
\r
JVBERi0xLjQK\r
--m--\r
"""


class HostileSenderTest(unittest.TestCase):
    """Header values a sender crafts cost linear time, and a sender domain is the address's."""

    RULES = {"rule": [{"name": "Evil", "from": "@evil.example", "label": "Evil"},
                      {"name": "Orders", "subject": "order", "label": "V/{sender_domain}"}]}

    def classify_timed(self, raw: bytes) -> Tuple[float, Any, str]:
        rules = parse_rules(self.RULES, "r.json")
        started = time.perf_counter()
        msg = MessageInfo(headers=parse_headers(raw))
        decision = rules.classify(msg, now=NOW)
        name = gc.expand_template("V/{sender_domain}", msg)
        texts = [header_text(msg.headers, name) for name in ("to", "cc", "reply-to", "sender", "list-id")]
        gc._drop_header_cache(msg.headers)
        header_addresses(msg.headers, "from"), gc._plain_header_addresses(msg.headers, "from")
        gc._plain_header_text(msg.headers, "to")
        return time.perf_counter() - started, decision, name if texts else ""

    def test_a_crafted_from_header_costs_linear_time_and_the_message_is_classified(self):
        # '"\"' repeated: an obsolete local part the email package parses in quadratic time
        # (30 s for this 60 KB header before; hours near the 2 MiB header limit).
        import email._header_value_parser as hvp
        for size in (60 * 1024, 2 * 1024 * 1024):
            crafted = '"\\"' * (size // 3)
            raw = ("From: %s\r\nTo: %s\r\nCc: %s\r\nReply-To: %s\r\nSender: %s\r\nList-Id: %s\r\n"
                   "Subject: your order\r\n\r\n" % ((crafted,) * 6)).encode()
            handed = []

            def refuse(value, *args):
                handed.append(len(value))
                raise AssertionError("the quadratic parser got %d characters" % len(value))
            with self.subTest(size=size), \
                    mock.patch.object(hvp, "get_address_list", side_effect=refuse), \
                    mock.patch.object(hvp, "get_unstructured", side_effect=refuse):
                spent, decision, name = self.classify_timed(raw)
                self.assertEqual(handed, [])
                self.assertEqual([rule for rule, _ in decision.matches], ["Orders"])
                self.assertEqual(name, "V/unknown")
                self.assertLess(spent, 5.0)

    def test_cost_does_not_grow_with_the_square_of_the_header(self):
        costs = []
        for size in (64 * 1024, 256 * 1024):
            raw = b"From: " + b'(\\"' * (size // 3) + b" <a@evil.example>\r\nSubject: order\r\n\r\n"
            best = min(self.classify_timed(raw)[0] for _ in range(2))
            costs.append(best)
        self.assertLess(costs[1], 6 * costs[0] + 0.05)

    def test_encoded_word_runs_cost_linear_time(self):
        for size in (64 * 1024, 2 * 1024 * 1024):
            run = "=?utf-8?q?a=C3=A9?= " * (size // 20)
            raw = ("Subject: %s\r\nFrom: %s <x@shop.example>\r\n\r\n" % (run + "order =?x", run)).encode()
            with self.subTest(size=size):
                spent, decision, name = self.classify_timed(raw)
                self.assertEqual([rule for rule, _ in decision.matches], [])   # the cut subject has no "order"
                self.assertEqual(name, "V/shop.example" if size < gc.HEADER_VALUE_LIMIT else "V/unknown")
                self.assertLess(spent, 5.0)

    def test_crafted_mime_headers_cost_linear_time(self):
        # The parser asks for Content-Type while it reads the parts; policy.default's
        # header classes took 43 s for 12 KB of '"\\"' (the wire's 16 KiB body prefix).
        crafted = b'"\\"' * 4000
        raw = (b"From: a@shop.example\r\nSubject: order\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b; x=" + crafted +
               b"\r\n\r\n--b\r\nContent-Type: text/plain; charset=" + crafted +
               b"\r\nContent-Disposition: inline; filename=" + crafted +
               b"\r\n\r\nYour order shipped\r\n--b\r\nContent-Type: " + crafted +
               b"\r\nContent-Disposition: attachment; filename=" + crafted + b"\r\n\r\nxx\r\n--b--\r\n")
        handed = []

        def refuse(value, *args):
            handed.append(len(value))
            raise AssertionError("the quadratic parser got %d characters" % len(value))
        import email.headerregistry as registry
        with mock.patch.object(registry.ContentTypeHeader, "value_parser", staticmethod(refuse)), \
                mock.patch.object(registry.ContentDispositionHeader, "value_parser", staticmethod(refuse)):
            started = time.perf_counter()
            msg = gc.message_info_from_bytes(raw)
            text = gc.body_text(raw[:gc.BODY_PREFIX_BYTES + 30000])
            spent = time.perf_counter() - started
        self.assertEqual(handed, [])
        self.assertLess(spent, 5.0)
        self.assertEqual((msg.body, text, msg.has_attachment), ("Your order shipped",) * 2 + (True,))
        self.assertEqual(header_text(msg.headers, "subject"), ["order"])

    def test_sender_domain_comes_from_the_address_never_the_display_name(self):
        cases = [
            ('"support@paypal.com" <phisher@evil.example>', "evil.example"),
            ('support@paypal.com <phisher@evil.example>', "evil.example"),
            ('"Smith, support@paypal.com" <phisher@evil.example>', "evil.example"),
            ('=?utf-8?q?support=40paypal=2Ecom?= <phisher@evil.example>', "evil.example"),
            ('"support@paypal.com" <>', "unknown"),
            ('"support@paypal.com"', "unknown"),
            ('"support@paypal.com" (a@paypal.com) <phisher@evil.example> (b@paypal.com)', "evil.example"),
            ('"a\\"b@paypal.com" <phisher@evil.example>', "evil.example"),
            ('Group: "x@paypal.com" <phisher@evil.example>;', "evil.example"),
            ('"' + "\\" * 3000 + '@paypal.com" <phisher@evil.example>', "evil.example"),
            ('"x@paypal.com' + "(" * 5000 + '" <phisher@evil.example>', "evil.example"),
        ]
        for sender, expected in cases:
            raw = ("From: %s\r\nSubject: order\r\n\r\n" % sender).encode()
            with self.subTest(sender=sender[:80]):
                msg = MessageInfo(headers=parse_headers(raw))
                self.assertEqual(gc.expand_template("V/{sender_domain}", msg), "V/" + expected)
                plain = MessageInfo(headers=email.parser.BytesParser(policy=email.policy.default)
                                    .parsebytes(raw, headersonly=True))
                self.assertEqual(gc.expand_template("V/{sender_domain}", plain), "V/" + expected)

    def test_the_linear_address_reader_finds_what_the_header_classes_find(self):
        cases = ['a@b.example', 'Name <a@b.example>', '"Q, R" <a@b.example>, c@d.example',
                 'G: a@b.example, "x" <c@d.example>;, e@f.example', '(c) N (d) <a@b.example> (e)',
                 '<@r1,@r2:a@b.example>', '"a\\"b" <a@b.example>', 'a @ b.example']
        for value in cases:
            with self.subTest(value=value):
                msg = parse_headers(("To: %s\r\n\r\n" % value).encode())
                want = [(" ".join(a.display_name.split()), a.addr_spec) for a in msg["to"].addresses]
                self.assertEqual(gc._address_pairs(value), want)


# --- Messages: the fast path -------------------------------------------------------------


# Header values in every shape the fast decoder accepts or must refuse: encoded display
# names and subjects (Q and B, several charsets), groups, comments, quoted pairs, broken
# encodings, unknown and non-UTF-8 charsets, raw 8-bit bytes, folding, odd spacing.
TRICKY_ADDRESSES = [
    b"Alice Example <alice@example.com>", b'"Doe, John" <john.doe@corp.example>',
    b"=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <joerg@example.de>",
    b"=?UTF-8?Q?J=C3=B6rg?= =?UTF-8?Q?M=C3=BCller?= <j@example.de>",
    b"=?ISO-8859-1?Q?Fran=E7ois_Dupont?= <francois@example.fr>",
    b"=?UTF-8?Q?Fran=E7ois?= <bad-utf8@example.fr>", b"=?UTF-8?B?5bGx55Sw5aSq6YOO?= <yamada@example.jp>",
    b"=?utf-8?b?5bGx55Sw5aSq6YO?= <badpad@example.jp>", b"=?x-unknown?q?abc?= <unknown@example.com>",
    b"=?utf-8?q?a_?= b <space@example.com>", b"=?koi8-r?b?8NLJ18XU?= <koi@example.ru>",
    b'"=?utf-8?q?Caf=C3=A9?= Team" <cafe@example.org>', b"Name=?utf-8?q?x?= <glued@example.com>",
    b"old.style@example.net (Old Style)", b"(comment) a@example.com", b"<bare@example.com>",
    b"no-reply@accounts.example.com", b"Mr. Smith <smith@example.co.uk>", b"A  B\t C <abc@example.com>",
    b"Team: team@example.com, ann@example.com;", b"undisclosed-recipients:;",
    b"Team: a@example.com;, b@example.com", b"staff@example.com, User <user@example.com>",
    b'"Example, User" <user@example.com>, =?UTF-8?Q?B=C3=A9a?= <bea@example.com>',
    b'"quoted \\"pair\\"" <qp@example.com>', b'"unterminated <x@example.com>', b"a@b@example.com",
    b"<@route:user@example.com>", b"Name <user@[192.0.2.1]>", b"user@localhost", b"just text, no address",
    b"M\xfcller <raw8bit@example.de>", b"M\xc3\xbcller <rawutf8@example.de>", b"a@example.com,,b@example.com",
    b"a@example.com,", b"Name <a@example.com> trailing", b'"" <empty@example.com>',
    b".dot <dot@example.com>", b"x <a.b@c.d>, y@z.example", b"Group : a@example.com ;",
    b"Very\r\n Folded\r\n\t<folded@example.com>", b"=?utf-8?Q?=41bc?= <hack@example.com>",
    b'"a b" c <mixed@example.com>', b"Bob's Shop <shop@example.com>", b"=?utf-8?b??= <emptyword@example.com>",
    b"First.Last@Example.COM", b"IDN <user@xn--bcher-kva.example>", b"a@example.com (c), d@example.com (f g)",
    b"a@example.com (c (nested))", b"a@example.com(c)", b"Name <a@example.com>(c)", b"Name <a@example.com> (c)",
    b'"=?utf-8?q?Caf=C3=A9?=  =?utf-8?q?Ol=C3=A9?=" <c@example.com>', b'"A =?utf-8?q?Caf=C3=A9?=" <c@example.com>',
    b'"x=?utf-8?q?Caf=C3=A9?=" <c@example.com>', b'"=?utf-8?q?Caf=C3=A9?=x" <c@example.com>',
    b'"=?utf-8?q?Caf=E9?=" <c@example.com>', b"Name (comment) <a@example.com>", b"",
]
TRICKY_SUBJECTS = [
    b"Your receipt #1", b"=?UTF-8?B?SWhyZSBCZXN0ZWxsYmVzdMOkdGlndW5n?=", b"=?UTF-8?Q?Caf=C3=A9_ol=C3=A9?= 5",
    b"=?iso-8859-1?q?R=E9union?=", b"=?utf-8?b?broken 1?=", b"=?koi8-r?b?8NLJ18XU?= 5",
    b"=?utf-8?q?a?= =?utf-8?q?b?=", b"x =?utf-8?q?a?=  y", b"=?utf-8?q?a?=\t=?utf-8?q?b?= c ", b"a  b ",
    b"=?utf-8?q?a?=b", b"x=?utf-8?q?a?=", b"=?x-unknown?q?abc?=", b"=?utf-8?q?=E9?=",
    b"=?utf-8?q?=zz?=", b"Order confirmation\r\n that is folded", b"Caf\xe9 latin-1 raw",
    b"Caf\xc3\xa9 utf-8 raw", b"=?utf-8*en?q?lang?=", b"=?utf-8?Q?=41bc?=", b"=?utf-8?q?a?==?utf-8?q?b?=",
    b"", b"   leading", b"trailing   ", b"=?UTF-8?B?8J+YgA==?= emoji", b"=?utf-16?b?AGEAYg==?=",
    b"=?base64?b?YWJj?=", b"=?utf-8?b?YWJj?=?", b"a =?utf-8?q?x?= =?utf-8?q?_y?= z",
]


def tricky_header_blocks() -> List[bytes]:
    blocks = []
    for i, address in enumerate(TRICKY_ADDRESSES):
        subject = TRICKY_SUBJECTS[i % len(TRICKY_SUBJECTS)]
        blocks.append(b"From: " + address + b"\r\nTo: " + TRICKY_ADDRESSES[-1 - i] + b"\r\nCc: "
                      + TRICKY_ADDRESSES[(i * 7) % len(TRICKY_ADDRESSES)] + b"\r\nSubject: " + subject
                      + b"\r\nList-Id: " + subject + b"\r\nDelivered-To: " + address
                      + b"\r\nX-Custom: " + address + b"\r\nMessage-ID: <%d.x@example.com>\r\n"
                      b"Date: Mon, 04 Mar 2024 10:00:0%d +0000\r\n\r\n" % (i, i % 10))
    for subject in TRICKY_SUBJECTS:
        blocks.append(b"Subject: " + subject + b"\r\nSubject: second\r\n\r\n")
    for msgid in (b" <a@b> ", b"<a@b> (c)", b"<a b@c>", b"<a@[1.2.3.4]>", b"abc", b"<a@b><c@d>", b'<"q"@b>',
                  b"<a.b=?x@c.d>", b"<@b>", b"<a@b>\r\n <c@d>"):
        blocks.append(b"Message-ID: " + msgid + b"\r\nMessage-ID: <ok@example.com>\r\n\r\n")
    blocks += [b"From nobody Mon Jan 1\r\nSubject: unix from\r\n\r\n", b"Subject: no end",
               b"Bad line\r\nSubject: x\r\n\r\n", b" Subject: leading space\r\n\r\n",
               b"Subject: with body\r\n\r\nbody text", b"Subject: bare\nlf\r\n\r\n",
               b"Subject:\r\n folded-empty\r\n\r\n", b"Subject:x\r\n\r\n", b""]
    return blocks


class FastPathTest(unittest.TestCase):
    """The optimised header path gives exactly what the email package's header classes give."""

    NAMES = ("from", "to", "cc", "subject", "list-id", "delivered-to", "x-custom", "message-id",
             "date", "bcc", "missing")

    def plain(self, raw: bytes) -> email.message.EmailMessage:
        return email.parser.BytesParser(policy=email.policy.default).parsebytes(raw, headersonly=True)

    def test_header_split_matches_the_feed_parser(self):
        for raw in tricky_header_blocks():
            with self.subTest(raw=raw):
                self.assertEqual(list(parse_headers(raw).raw_items()), list(self.plain(raw).raw_items()))

    def test_decoded_headers_match_the_plain_path(self):
        for raw in tricky_header_blocks():
            fast, plain = parse_headers(raw), self.plain(raw)
            for name in self.NAMES:
                want = (gc._plain_header_text(plain, name), gc._plain_header_addresses(plain, name))
                got = (header_text(fast, name), header_addresses(fast, name))
                header_text(fast, name).append("x")    # asked again: a copy of the cached answer
                if got != want or header_text(fast, name) != want[0]:
                    self.fail("%r, %s: fast %r, plain %r" % (raw, name, got, want))

    def test_fast_decoder_handles_the_common_shapes_itself(self):
        with mock.patch.object(gc, "_plain_header_addresses", side_effect=AssertionError), \
                mock.patch.object(gc, "_plain_header_text", side_effect=AssertionError):
            msg = parse_headers(b"From: =?UTF-8?Q?J=C3=B6rg?= <j@example.de>\r\nTo: Team: a@example.com,"
                                b" \"B, C\" <b@example.com>;, undisclosed-recipients:;\r\n"
                                b"Subject: =?UTF-8?B?SWhyZSBCZXN0ZWxsYmVzdMOkdGlndW5n?= 5\r\n\r\n")
            self.assertEqual(header_addresses(msg, "from"), ["Jörg <j@example.de>"])
            self.assertEqual(header_addresses(msg, "to"), ["a@example.com", "B, C <b@example.com>"])
            self.assertEqual(header_text(msg, "subject"), ["Ihre Bestellbestätigung 5"])

    def test_rules_decode_each_header_once_and_free_it_after(self):
        rules = parse_rules({"rule": [{"name": "a", "from": "x@", "label": "A"},
                                      {"name": "b", "from": "/bob/", "subject": "hi", "label": "B"},
                                      {"name": "c", "any": [{"from": "y@"}, {"subject": "no"}], "label": "C"}]},
                            "r.json")
        msg = info("From: Bob <bob@example.com>\nSubject: hi there")
        with mock.patch.object(gc, "_decode_header", wraps=gc._decode_header) as decode:
            self.assertEqual([name for name, _ in rules.classify(msg, now=NOW).matches], ["b"])
        self.assertEqual(sorted(call.args[2:] for call in decode.call_args_list),
                         [("addresses", "from"), ("text", "subject")])
        self.assertNotIn("_gmail_classify_cache", msg.headers.__dict__)

    def test_changed_headers_are_decoded_again(self):
        msg = parse_headers(b"Subject: old\r\n\r\n")
        self.assertEqual(gc._header_values(msg, False, ("subject",)), (["old"], ["old"]))
        msg.replace_header("Subject", "New")
        self.assertEqual(gc._header_values(msg, False, ("subject",)), (["New"], ["new"]))
        del msg["Subject"]
        self.assertEqual(gc._header_values(msg, False, ("subject",)), ([], []))
        self.assertEqual(header_text(msg, "subject"), [])

    def test_tokenizer_matches_the_plain_parser(self):
        import random
        rng = random.Random(8)
        pieces = [b"(", b")", b" ", b" ", b'"a b"', b'"a\\"b"', b'""', b"{3}\r\nabc", b"{5}\r\nab", b"NIL",
                  b"nil", b"123", b"0", b"BODY[HEADER.FIELDS (FROM TO)]", b"BODY[TEXT]<0>", b"]", b"[", b"\r",
                  b"\n", b"~{2}\r\nxy", b"\\Seen", b"x", b"a]b", b"[Gmail]/Sent", b"BODY[a[b]]", b"{", b"~",
                  b'"\xc3\xa9"', b"\xff", b"{0}\r\n", b"{2+}\r\nab", b'"unterminated', b"UID", b"FETCH"]
        samples = [b"1 FETCH (UID 5 FLAGS (\\Seen $Label) BODY[HEADER.FIELDS (FROM)] {4}\r\nab\r\n)",
                   b'3 FETCH (X-GM-LABELS ("\\\\Important" "(foo)" "[bar]" fav) UID 9)', b"", b"  ", b"NIL",
                   b'1 FETCH (BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 12 1 NIL NIL'
                   b' NIL NIL) "MIXED" ("BOUNDARY" "b") NIL NIL NIL))']
        for _ in range(3000):
            samples.append(b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12))))
        for raw, _ in bench_corpus(30):
            samples.append(b"1 FETCH (UID 1 BODY[HEADER] {%d}\r\n%s)" % (len(raw), raw))

        def outcome(parse, data):
            try:
                return parse(data)
            except gc.ProtocolError as exc:
                return "error: %s" % exc
        fast_used = 0
        for data in samples:
            with self.subTest(data=data):
                self.assertEqual(outcome(gc.parse_response, data), outcome(gc._parse_plain, data))
            try:
                gc._parse_fast(data)
                fast_used += 1
            except gc._NotSimple:
                pass
        self.assertGreater(fast_used, 500)   # the fast path did the work, not the fallback

    def test_classification_matches_the_plain_path_on_the_bench_corpus(self):
        rules = gc.parse_rules(BENCH_RULES, "bench rules")
        now = datetime(2026, 11, 30, tzinfo=timezone.utc)
        corpus = [raw.split(b"\r\n\r\n")[0] + b"\r\n\r\n" for raw, _ in bench_corpus(200)]
        corpus += tricky_header_blocks()

        def info(raw):
            return MessageInfo(headers=parse_headers(raw), size=len(raw), date=now - timedelta(days=len(raw)),
                               has_attachment=len(raw) % 3 == 0)
        fast_results, plain_results = [], []
        for raw in corpus:
            fast_results.append(rules.classify(info(raw), final=True, now=now))
        with mock.patch.object(gc, "header_text", gc._plain_header_text), \
                mock.patch.object(gc, "header_addresses", gc._plain_header_addresses), \
                mock.patch.object(gc, "_split_header_block", lambda raw: None):
            for raw in corpus:
                plain_results.append(rules.classify(info(raw), final=True, now=now))
        self.assertEqual(fast_results, plain_results)
        self.assertGreater(sum(bool(d.matches) for d in fast_results), 100)


# --- Messages: bodies, attachments and the data fetched beside the headers ---------------


class BodyTextTest(unittest.TestCase):
    def test_body_text_decodes_each_shape(self):
        cases = [
            ("plain", PLAIN, "Hello world"),
            ("html only, script and style skipped", HTML_ONLY, "Café & crème\n\nBye"),
            ("alternative prefers plain", ALTERNATIVE, "Plain version ü"),
            ("truncated base64", TRUNCATED_BASE64, "Your receipt for order 12345,"),
            ("unknown charset", UNKNOWN_CHARSET, "naïve text"),
            ("non-text codec name", NON_TEXT_CODEC, "plain words"),
            ("attachment not used as body", WITH_ATTACHMENT, "See attached."),
            ("headers only", b"Subject: x\r\n\r\n", ""),
            ("cut inside headers", b"Content-Type: multipart/mixed; bound", ""),
            ("empty", b"", ""),
        ]
        for label, raw, expected in cases:
            with self.subTest(label):
                self.assertEqual(body_text(raw), expected)

    def test_body_text_truncated_base64_every_cut(self):
        text = "abcdefghijklmnopqrstuvwxyz0123456789"
        encoded = base64.b64encode(text.encode())
        for cut in range(len(encoded) + 1):
            with self.subTest(cut=cut):
                raw = b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded[:cut]
                self.assertEqual(body_text(raw), text[:cut * 3 // 4])

    def test_body_text_respects_limit(self):
        self.assertEqual(body_text(PLAIN, limit=5), "Hello")


class MessageFilesTest(TempDirMixin, unittest.TestCase):
    def test_message_info_from_bytes_fills_offline_fields(self):
        raw = WITH_ATTACHMENT.replace(b"MIME-Version", b"Date: Tue, 05 Mar 2024 10:00:00 +0100\r\nMIME-Version")
        msg = message_info_from_bytes(raw)
        self.assertEqual(msg.size, len(raw))
        self.assertEqual(msg.date, datetime(2024, 3, 5, 9, 0, tzinfo=timezone.utc))
        self.assertIs(msg.has_attachment, True)
        self.assertEqual(msg.body, "See attached.")
        self.assertEqual((msg.flags, msg.labels, msg.queries, msg.uid), (frozenset(), None, None, 0))

    def test_message_info_date_variants(self):
        cases = [
            (b"Date: Tue, 05 Mar 2024 10:00:00 -0000", datetime(2024, 3, 5, 10, tzinfo=timezone.utc)),
            (b"Date: not a date", None),
            (b"X-No-Date: 1", None),
        ]
        for header, expected in cases:
            with self.subTest(header=header):
                self.assertEqual(message_info_from_bytes(header + b"\r\n\r\nx").date, expected)
        self.assertIs(message_info_from_bytes(PLAIN).has_attachment, False)

    def test_iter_message_files_reads_eml(self):
        path = os.path.join(self.make_dir(), "one.eml")
        with open(path, "wb") as fh:
            fh.write(PLAIN)
        [(name, msg)] = list(iter_message_files([path]))
        self.assertEqual(name, path)
        self.assertEqual(header_text(msg.headers, "subject"), ["hi"])
        self.assertEqual(msg.body, "Hello world")

    def test_iter_message_files_reads_takeout_mbox_labels(self):
        path = os.path.join(self.make_dir(), "Takeout.mbox")
        box = mailbox.mbox(path)
        box.add(b"X-Gmail-Labels: Inbox,Important,Opened,Receipts,\"Clients, old\"\r\n"
                b"From: shop@example.com\r\nSubject: Receipt\r\n\r\nThanks\r\n")
        box.add(b"X-Gmail-Labels: Archived,Unread,Starred,Category Promotions,Drafts\r\n"
                b"Subject: Sale\r\n\r\nBuy\r\n")
        box.add(b"Subject: no labels\r\n\r\nhi\r\n")
        box.flush()
        box.close()
        items = list(iter_message_files([path]))
        self.assertEqual([name for name, _ in items], [f"{path}#1", f"{path}#2", f"{path}#3"])
        first, second, third = (msg for _, msg in items)
        self.assertEqual(first.labels, frozenset({"\\Inbox", "\\Important", "Receipts", "Clients, old"}))
        self.assertEqual(first.flags, frozenset({"\\Seen"}))
        self.assertEqual(second.labels, frozenset({"Archived", "\\Starred", "Category Promotions", "\\Draft"}))
        self.assertEqual(second.flags, frozenset({"\\Flagged"}))
        self.assertIsNone(third.labels)
        self.assertEqual(first.body, "Thanks")
        self.assertIs(hit(one_rule(has_label="Inbox"), first), True)

    def test_iter_message_files_detects_mbox_by_from_line(self):
        path = os.path.join(self.make_dir(), "export")
        with open(path, "wb") as fh:
            fh.write(b"From MAILER-DAEMON Thu Jan  1 00:00:00 2024\nSubject: one\n\nbody\n\n"
                     b"From MAILER-DAEMON Thu Jan  1 00:00:00 2024\nSubject: two\nStatus: RO\n\nbody\n")
        items = list(iter_message_files([path]))
        self.assertEqual([header_text(m.headers, "subject") for _, m in items], [["one"], ["two"]])
        self.assertEqual(items[1][1].flags, frozenset({"\\Seen"}))

    def test_iter_message_files_reads_maildir_flags(self):
        root = os.path.join(self.make_dir(), "Maildir")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(root, sub))
        files = {
            os.path.join("new", "1.host"): frozenset(),
            os.path.join("cur", "2.host:2,FRS"): frozenset({"\\Flagged", "\\Answered", "\\Seen"}),
            os.path.join("cur", "3.host:2,"): frozenset(),
        }
        for name in files:
            with open(os.path.join(root, name), "wb") as fh:
                fh.write(PLAIN)
        items = dict(iter_message_files([root]))
        self.assertEqual({name: msg.flags for name, msg in items.items()},
                         {os.path.join(root, name): flags for name, flags in files.items()})

    def test_a_large_message_is_read_only_up_to_the_limit_and_keeps_its_size(self):
        # The text part and the attachment's part header come first, then 100 KB of the
        # attachment: what the rules read lies in the first bytes; the rest is never read.
        big = (b"From: a@example.com\r\nSubject: big\r\nStatus: RO\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
               b"--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n--b\r\n"
               b"Content-Type: application/pdf\r\nContent-Disposition: attachment; "
               b"filename=a.pdf\r\n\r\n" + b"JVBERi0x" * 12800 + b"\r\n--b--\r\n")
        folder = self.make_dir()
        path = os.path.join(folder, "All mail.mbox")
        box = mailbox.mbox(path)
        box.add(big)
        box.add(PLAIN)
        box.flush()
        sizes = [len(box.get_bytes(key)) for key in box.iterkeys()]
        box.close()
        root = os.path.join(folder, "Maildir")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(root, sub))
        with open(os.path.join(root, "cur", "1.host:2,S"), "wb") as fh:
            fh.write(big)
        (_, first), (_, second), (_, filed) = iter_message_files([path, root], limit=4096)
        for msg, size in ((first, sizes[0]), (filed, len(big))):
            self.assertEqual(len(msg.source), 4096)
            self.assertEqual(msg.size, size)
            self.assertGreater(size, 100_000)
            self.assertEqual((msg.has_attachment, msg.body), (True, "See attached."))
            self.assertEqual(msg.flags, frozenset({"\\Seen"}))
            self.assertEqual(header_text(msg.headers, "subject"), ["big"])
        self.assertEqual((second.size, len(second.source), second.body),
                         (sizes[1], sizes[1], "Hello world"))     # the next one, whole
        (_, whole), = iter_message_files([root])                 # by default: 10 MiB
        self.assertEqual(whole.source, big)

    def test_a_program_reading_whole_messages_raises_the_limit_to_its_own(self):
        doc = {"rule": [{"name": "p", "program": ["/bin/true"], "program_input": "message",
                         "program_max_size": "20M", "label": "X"}]}
        self.assertEqual(gc.offline_read_limit(gc.parse_rules(doc, "r.json")), 20 * 1024 * 1024)
        doc["rule"][0]["program_max_size"] = "1M"
        self.assertEqual(gc.offline_read_limit(gc.parse_rules(doc, "r.json")),
                         gc.MAX_OFFLINE_BYTES)
        self.assertEqual(gc.offline_read_limit(gc.builtin_rules()), 10 * 1024 * 1024)

    def test_error_for_path_of_unknown_kind(self):
        folder = self.make_dir()
        text_file = os.path.join(folder, "notes.txt")
        with open(text_file, "wb") as fh:
            fh.write(b"Subject: x\r\n\r\n")
        cases = [
            (text_file, f"{text_file}: not an .eml file, mbox or Maildir"),
            (folder, f"{folder}: not an .eml file, mbox or Maildir"),
            (os.path.join(folder, "gone.eml"), f"{os.path.join(folder, 'gone.eml')}: no such file or directory"),
        ]
        for path, expected in cases:
            with self.subTest(path=path):
                with self.assertRaises(GmailClassifyError) as caught:
                    list(iter_message_files([path]))
                self.assertEqual(str(caught.exception), expected)


class MessageDataTest(unittest.TestCase):
    """_MESSAGE_DATA, one row per piece of data beside the headers: each is fetched when its
    Needs flag asks for it (and on every --apply when the records carry it), read from the
    answer into its MessageInfo field, worked out offline, and named when an answer lacks it."""

    WHEN = datetime(2024, 5, 1, 9, 30, tzinfo=timezone.utc)
    # What a server answers for each row's item, and what its field must then hold.  A new
    # row needs its sample here (the first test fails without one), so it is tested too.
    SAMPLES = {
        "RFC822.SIZE": (1234, 1234),
        "INTERNALDATE": (WHEN, WHEN),
        "BODYSTRUCTURE": (["application", "pdf", ["name", "a.pdf"], None, None, "base64", 10],
                          True),
    }
    HEADERS = "BODY.PEEK[HEADER.FIELDS (FROM)]"

    def test_every_row_has_a_sample(self):
        self.assertEqual(sorted(d.item for d in gc._MESSAGE_DATA), sorted(self.SAMPLES))

    def test_an_item_is_fetched_when_its_need_asks_or_an_apply_records_it(self):
        bare = gc._fetch_items(gc.Needs(headers=frozenset({"from"})), gmail=False)
        self.assertEqual(bare, ["FLAGS", self.HEADERS])
        for datum in gc._MESSAGE_DATA:
            with self.subTest(datum.item):
                needs = gc.Needs(headers=frozenset({"from"}), **{datum.need: True})
                self.assertEqual(gc._fetch_items(needs, gmail=False),
                                 ["FLAGS", self.HEADERS, datum.item])
                applying = gc._fetch_items(gc.Needs(headers=frozenset({"from"})), gmail=False,
                                           apply=True)
                self.assertEqual(datum.item in applying, datum.recorded)
        self.assertEqual(gc._fetch_items(gc.Needs(headers=frozenset({"from"})), gmail=False,
                                         apply=True),
                         ["FLAGS", self.HEADERS, "RFC822.SIZE", "INTERNALDATE"])

    def test_an_answer_fills_its_field_and_only_that_one(self):
        for datum in gc._MESSAGE_DATA:
            with self.subTest(datum.item):
                answer, expected = self.SAMPLES[datum.item]
                values = {"FLAGS": ("\\Seen",), self.HEADERS: b"From: a@example.com\r\n\r\n",
                          datum.item: answer}
                info = gc._message_info(7, values, self.HEADERS, None, "INBOX")
                self.assertEqual(getattr(info, datum.field), expected)
                self.assertEqual(header_text(info.headers, "from"), ["a@example.com"])
                for other in gc._MESSAGE_DATA:
                    if other is not datum:
                        self.assertIsNone(getattr(info, other.field), other.field)
        plain = ["text", "plain", ["charset", "utf-8"], None, None, "7bit", 10, 1]
        info = gc._message_info(7, {"BODYSTRUCTURE": plain}, self.HEADERS, None, "INBOX")
        self.assertIs(info.has_attachment, False)

    def test_a_lacking_answer_names_what_it_lacked(self):
        for datum in gc._MESSAGE_DATA:
            with self.subTest(datum.item):
                items = ["FLAGS", self.HEADERS, datum.item]
                values = {"FLAGS": (), self.HEADERS: b""}
                self.assertEqual(gc._lacking(items, values),
                                 f"the server's answer lacked its {datum.lacked}")

    def test_offline_every_field_is_worked_out_from_the_message(self):
        raw = (b"From: a@example.com\r\nDate: Wed, 01 May 2024 09:30:00 +0000\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\n"
               b"Content-Type: application/pdf\r\n"
               b"Content-Disposition: attachment; filename=a.pdf\r\n\r\nJVBER\r\n--b--\r\n")
        info = message_info_from_bytes(raw)
        self.assertEqual((info.size, info.date, info.has_attachment),
                         (len(raw), self.WHEN, True))
        self.assertEqual(info.body, "hello")

    def test_offline_a_message_the_parser_cannot_read_has_no_attachment(self):
        with mock.patch.object(gc.email, "message_from_bytes", side_effect=ValueError("bad")):
            info = message_info_from_bytes(b"From: a@example.com\r\n\r\nhi")
        self.assertIs(info.has_attachment, False)
        self.assertEqual(info.size, 25)


# --- Rule engine -------------------------------------------------------------------------


AMAZON = info('From: "Amazon.com" <auto-confirm@amazon.com>\nSubject: Your order\nTo: me@example.com')


class MatchingTest(unittest.TestCase):
    def test_match_decodes_rfc2047_subjects_and_names(self):
        encoded_subject = "=?UTF-8?B?" + base64.b64encode("Ihre Bestellbestätigung".encode()).decode() + "?="
        cases = [
            ("utf-8 B subject", {"subject": "bestellbestätigung"}, f"Subject: {encoded_subject}", True),
            ("latin-1 Q subject", {"subject": "café crème"},
             "Subject: =?iso-8859-1?Q?Caf=E9_cr=E8me?=", True),
            ("encoded display name", {"from": "José García"},
             "From: =?UTF-8?Q?Jos=C3=A9_Garc=C3=ADa?= <jg@example.es>", True),
            ("encoded name does not match other name", {"from": "Maria"},
             "From: =?UTF-8?Q?Jos=C3=A9_Garc=C3=ADa?= <jg@example.es>", False),
            ("raw encoded word text is not what matches", {"subject": "=?iso"},
             "Subject: =?iso-8859-1?Q?Caf=E9?=", False),
        ]
        for label, rule, headers, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(one_rule(**rule), info(headers)), expected)

    def test_match_is_caseless_and_normalised_for_plain_text(self):
        cases = [
            ("STRASSE finds straße", "STRASSE", "Subject: Hauptstraße 5", True),
            ("straße finds STRASSE", "straße", "Subject: HAUPTSTRASSE 5", True),
            ("upper pattern", "RECEIPT", "Subject: your receipt", True),
            ("NFKC ligature", "office", "Subject: The O\ufb03ce party", True),
            ("folded whitespace", "order confirmation", "Subject: Order\n confirmation", True),
            ("substring absent", "invoice", "Subject: receipt", False),
        ]
        for label, pattern, headers, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(one_rule(subject=pattern), info(headers)), expected)

    def test_match_regex_respects_flags(self):
        cases = [
            ("case-sensitive without i", "/Receipt/", "Subject: receipt", False),
            ("i flag", "/Receipt/i", "Subject: receipt", True),
            ("search not match", r"/order #?\d{5,}/i", "Subject: Re: ORDER #123456 shipped", True),
            ("too few digits", r"/order #?\d{5,}/i", "Subject: order #1234", False),
            ("anchored", "/^invitation:/i", "Subject: Fwd: Invitation: lunch", False),
            ("x flag", "/ re ceipt /x", "Subject: receipt", True),
        ]
        for label, pattern, headers, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(one_rule(subject=pattern), info(headers)), expected)

    def test_match_addresses_by_domain_name_or_regex(self):
        cases = [
            ("domain", {"from": "@amazon.com"}, True),
            ("display name", {"from": "Amazon"}, True),
            ("regex on formatted address", {"from": r"/^Amazon\.com <auto-confirm@/"}, True),
            ("other domain", {"from": "@ebay.com"}, False),
            ("to", {"to": "me@example.com"}, True),
            ("recipient via to", {"recipient": "me@"}, True),
            ("cc absent", {"cc": "me@"}, False),
            ("list means any of", {"from": ["@ebay.com", "@amazon.com"]}, True),
        ]
        for label, rule, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(one_rule(**rule), AMAZON), expected)

    def test_match_recipient_covers_cc_delivered_to_and_bcc(self):
        for header in ("Cc", "Delivered-To", "Bcc", "To"):
            with self.subTest(header):
                msg = info(f"From: a@b.c\n{header}: Team <team@corp.example>")
                self.assertIs(hit(one_rule(recipient="team@corp.example"), msg), True)
        self.assertIs(hit(one_rule(recipient="team@"), info("From: team@corp.example")), False)

    def test_match_header_present_absent_or_text(self):
        newsletter = info("From: news@shop.example\nList-Unsubscribe: <mailto:u@shop.example>\n"
                          "List-Id: Shop news <news.shop.example>")
        plain = info("From: friend@example.com")
        cases = [
            ("present", {"header": {"List-Unsubscribe": True}}, newsletter, True),
            ("present, case-insensitive name", {"header": {"list-unsubscribe": True}}, newsletter, True),
            ("present but missing", {"header": {"List-Unsubscribe": True}}, plain, False),
            ("absent", {"header": {"List-Unsubscribe": False}}, plain, True),
            ("absent but present", {"header": {"List-Unsubscribe": False}}, newsletter, False),
            ("text", {"header": {"List-Id": "news.shop"}}, newsletter, True),
            ("two headers must both hold", {"header": {"List-Id": True, "X-Spam": True}}, newsletter, False),
            ("list_id key", {"list_id": "/<news\\.shop\\.example>/"}, newsletter, True),
        ]
        for label, rule, msg, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(one_rule(**rule), msg), expected)

    def test_match_nested_any_all_not(self):
        msg = info("From: alerts@mybank.example\nSubject: Statement ready")
        cases = [
            ("any: one holds", {"any": [{"from": "@other"}, {"from": "@mybank.example"}]}, True),
            ("any: none holds", {"any": [{"from": "@other"}, {"subject": "alert"}]}, False),
            ("all: both hold", {"all": [{"from": "@mybank"}, {"subject": "statement"}]}, True),
            ("all: one fails", {"all": [{"from": "@mybank"}, {"subject": "alert"}]}, False),
            ("not", {"not": {"subject": "alert"}}, True),
            ("not of true", {"not": {"subject": "statement"}}, False),
            ("not any", {"not": {"any": [{"subject": "x"}, {"from": "mybank"}]}}, False),
            ("keys in one table are and-ed", {"from": "mybank", "subject": "alert"}, False),
            ("nested all inside any", {"any": [{"all": [{"from": "mybank"}, {"subject": "ready"}]}]}, True),
        ]
        for label, rule, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(one_rule(**rule), msg), expected)

    def test_match_size_units(self):
        cases = [
            ("5M above", {"larger_than": "5M"}, 5 * 1024 * 1024 + 1, True),
            ("5M equal is not larger", {"larger_than": "5M"}, 5 * 1024 * 1024, False),
            ("K is 1024", {"larger_than": "10K"}, 10241, True),
            ("lower-case k", {"larger_than": "10k"}, 10240, False),
            ("1G", {"larger_than": "1G"}, 1024 ** 3 + 1, True),
            ("plain bytes", {"smaller_than": 1000}, 999, True),
            ("smaller_than equal", {"smaller_than": "1K"}, 1024, False),
        ]
        for label, rule, size, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(one_rule(**rule), info("From: a@b.c", size=size)), expected)

    def test_match_age_units_against_fixed_now(self):
        # NOW is 2024-03-31 12:00 UTC: one month back clamps to 2024-02-29.
        def at(*args):
            return datetime(*args, tzinfo=timezone.utc)
        cases = [
            ("3d older", {"older_than": "3d"}, at(2024, 3, 28, 11), True),
            ("3d not older", {"older_than": "3d"}, at(2024, 3, 28, 13), False),
            ("2w", {"older_than": "2w"}, at(2024, 3, 17, 11), True),
            ("1m clamps to Feb 29", {"older_than": "1m"}, at(2024, 2, 29, 11), True),
            ("1m clamps to Feb 29, after", {"older_than": "1m"}, at(2024, 2, 29, 13), False),
            ("1y", {"older_than": "1y"}, at(2023, 3, 31, 11), True),
            ("1y not yet", {"older_than": "1y"}, at(2023, 4, 1), False),
            ("13m crosses a year", {"older_than": "13m"}, at(2023, 2, 28, 11), True),
            ("newer_than 2d", {"newer_than": "2d"}, at(2024, 3, 30), True),
            ("newer_than 2d old", {"newer_than": "2d"}, at(2024, 3, 1), False),
            ("other timezone", {"newer_than": "1d"},
             datetime(2024, 3, 31, 1, 0, tzinfo=timezone(timedelta(hours=-5))), True),
            ("absurd age still works", {"newer_than": "99999y"}, at(2000, 1, 1), True),
        ]
        for label, rule, when, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(one_rule(**rule), info("From: a@b.c", date=when)), expected)

    def test_months_back_clamps_day(self):
        cases = [
            (datetime(2024, 3, 31), 1, datetime(2024, 2, 29)),
            (datetime(2023, 3, 31), 1, datetime(2023, 2, 28)),
            (datetime(2024, 2, 29), 12, datetime(2023, 2, 28)),
            (datetime(2024, 1, 15), 1, datetime(2023, 12, 15)),
            (datetime(2024, 5, 31), 3, datetime(2024, 2, 29)),
        ]
        for now, months, expected in cases:
            with self.subTest(now=now, months=months):
                self.assertEqual(gc._months_back(now, months), expected)

    def test_match_labels_with_system_names(self):
        msg = info("From: a@b.c", labels=frozenset({"\\Inbox", "\\Important", "Receipts", "Work/Clients"}))
        cases = [
            ("Inbox", True), ("INBOX", True), ("\\Inbox", True), ("important", True),
            ("Receipts", True), ("receipts", True), ("Work", False), ("Keep", False),
            ("/^Work\\//", True), ("\\Starred", False),
        ]
        for label, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(one_rule(has_label=label), msg), expected)
        drafts = info("From: a@b.c", labels=frozenset({"\\Draft"}))
        self.assertIs(hit(one_rule(has_label="Drafts"), drafts), True)

    def test_match_flags_and_attachment(self):
        cases = [
            ("unread when no Seen", {"unread": True}, frozenset(), True),
            ("read", {"unread": False}, frozenset({"\\Seen"}), True),
            ("unread but seen", {"unread": True}, frozenset({"\\Seen"}), False),
            ("starred", {"starred": True}, frozenset({"\\Flagged"}), True),
            ("not starred", {"starred": False}, frozenset({"\\Flagged"}), False),
            ("flags unknown", {"starred": True}, None, None),
        ]
        for label, rule, flags, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(one_rule(**rule), info("From: a@b.c", flags=flags), final=False), expected)
        self.assertIs(hit(one_rule(has_attachment=True), info("From: a@b.c", has_attachment=True)), True)
        self.assertIs(hit(one_rule(has_attachment=False), info("From: a@b.c", has_attachment=True)), False)
        self.assertIs(hit(one_rule(has_attachment=True), info("From: a@b.c"), final=False), None)

    def test_unknown_body_undecided_until_final(self):
        ruleset = parse_rules({"rule": [
            {"name": "Promo", "body": "unsubscribe", "label": "Promo"},
            {"name": "Rest", "from": "@", "label": "Rest"},
        ]})
        msg = info("From: a@b.c")
        self.assertIsNone(ruleset.classify(msg, now=NOW))
        final = ruleset.classify(msg, final=True, now=NOW)
        self.assertEqual(final.matches, (("Rest", 'from contains "@"'),))
        fetched = dataclasses.replace(msg, body="Click to Unsubscribe.")
        self.assertEqual(ruleset.classify(fetched, now=NOW).matches,
                         (("Promo", 'body contains "unsubscribe"'),))

    def test_unknown_decided_by_kleene_logic(self):
        msg = info("From: a@b.c\nSubject: hello")  # body, size unknown
        cases = [
            ("all with a false part is false", {"all": [{"body": "x"}, {"subject": "nope"}]}, False),
            ("all with unknown part is unknown", {"all": [{"body": "x"}, {"subject": "hello"}]}, None),
            ("any with a true part is true", {"any": [{"body": "x"}, {"subject": "hello"}]}, True),
            ("any with unknown part is unknown", {"any": [{"body": "x"}, {"subject": "nope"}]}, None),
            ("not unknown is unknown", {"not": {"larger_than": "1M"}}, None),
            ("implicit and with false", {"body": "x", "subject": "nope"}, False),
        ]
        for label, rule, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(one_rule(**rule), msg, final=False), expected)

    def test_unknown_after_earlier_match_keeps_continue_chain_undecided(self):
        ruleset = parse_rules({"rule": [
            {"name": "A", "subject": "hello", "label": "A", "continue": True},
            {"name": "B", "body": "x", "label": "B"},
        ]})
        msg = info("Subject: hello")
        self.assertIsNone(ruleset.classify(msg, now=NOW))
        self.assertEqual(ruleset.classify(msg, final=True, now=NOW).actions.labels, ("A",))

    def test_unknown_after_final_match_is_decided(self):
        ruleset = parse_rules({"rule": [
            {"name": "A", "subject": "hello", "label": "A"},
            {"name": "B", "body": "x", "label": "B"},
        ]})
        decision = ruleset.classify(info("Subject: hello"), now=NOW)
        self.assertEqual(decision, Decision(matches=(("A", 'subject contains "hello"'),),
                                            actions=Actions(labels=("A",))))

    def test_gmail_query_depends_on_server_results(self):
        ruleset = one_rule(gmail_query="category:promotions")
        cases = [
            ("unknown offline", None, False, None),
            ("unknown final", None, True, False),
            ("matched", frozenset({"category:promotions"}), False, True),
            ("other query matched", frozenset({"has:attachment"}), False, False),
        ]
        for label, queries, final, expected in cases:
            with self.subTest(label):
                self.assertIs(hit(ruleset, info("From: a@b.c", queries=queries), final=final), expected)

    def test_classify_defaults_now_to_current_time(self):
        ruleset = one_rule(newer_than="1d")
        recent = info("From: a@b.c", date=datetime.now(timezone.utc) - timedelta(hours=1))
        self.assertTrue(ruleset.classify(recent).matches)


class ExplanationTest(unittest.TestCase):
    def test_reason_describes_what_matched(self):
        msg = info('From: Alerts <alerts@mybank.example>\nSubject: Your receipt\n'
                   'List-Unsubscribe: <mailto:x@y>', size=int(7.3 * 1024 * 1024),
                   date=datetime(2020, 1, 5, tzinfo=timezone.utc), labels=frozenset({"\\Inbox"}),
                   flags=frozenset())
        cases = [
            ({"subject": ["invoice", "receipt"]}, 'subject contains "receipt"'),
            ({"from": "/@mybank\\.example/"}, "from matches /@mybank\\.example/"),
            ({"header": {"List-Unsubscribe": True}}, "header List-Unsubscribe present"),
            ({"header": {"X-Spam": False}}, "header X-Spam absent"),
            ({"larger_than": "5M"}, "size 7.3 MB > 5M"),
            ({"older_than": "1y"}, "date 2020-01-05 older than 1y"),
            ({"all": [{"subject": "receipt"}, {"unread": True}]},
             'all of (subject contains "receipt"; unread)'),
            ({"any": [{"subject": "nope"}, {"has_label": "inbox"}]}, 'any of (has label "inbox")'),
            ({"not": {"subject": "nope"}}, 'not (subject contains "nope")'),
            ({"subject": "receipt", "from": "Alerts"}, 'subject contains "receipt" and from contains "Alerts"'),
        ]
        for rule, expected in cases:
            with self.subTest(rule=rule):
                decision = one_rule(**rule).classify(msg, now=NOW)
                self.assertEqual(decision.matches, (("r", expected),))


class ActionsTest(unittest.TestCase):
    def test_merged_keeps_first_destination_and_flag_choices(self):
        cases = [
            ("labels accumulate without duplicates",
             Actions(labels=("A", "B")), Actions(labels=("B", "C")), Actions(labels=("A", "B", "C"))),
            ("first destination wins",
             Actions(trash=True), Actions(move="Old"), Actions(trash=True)),
            ("later destination used when none yet",
             Actions(labels=("A",)), Actions(archive=True), Actions(labels=("A",), archive=True)),
            ("read conflict: earlier wins",
             Actions(mark_unread=True), Actions(mark_read=True), Actions(mark_unread=True)),
            ("star conflict: earlier wins",
             Actions(star=True), Actions(unstar=True, mark_read=True), Actions(star=True, mark_read=True)),
            ("flags accumulate",
             Actions(star=True), Actions(mark_read=True), Actions(star=True, mark_read=True)),
        ]
        for label, first, later, expected in cases:
            with self.subTest(label):
                self.assertEqual(first.merged(later), expected)

    def test_describe_lists_actions(self):
        cases = [
            (Actions(labels=("Receipts",), archive=True), "label Receipts, archive"),
            (Actions(labels=("GitHub", "Dev/Notifications")), "label GitHub, label Dev/Notifications"),
            (Actions(move="Old", mark_read=True, star=True), "move to Old, mark read, star"),
            (Actions(trash=True, unstar=True, mark_unread=True), "trash, mark unread, unstar"),
            (Actions(), "no action"),
        ]
        for actions, expected in cases:
            with self.subTest(expected):
                self.assertEqual(actions.describe(), expected)
        self.assertTrue(Actions().is_empty())
        self.assertFalse(Actions(star=True).is_empty())


class ExampleRulesTest(unittest.TestCase):
    """The example rules from the design brief, on sample messages."""

    def check(self, ruleset) -> None:
        big_old = info("From: someone@example.com\nSubject: photos", size=8 * 1024 * 1024,
                       date=datetime(2022, 6, 1, tzinfo=timezone.utc),
                       labels=frozenset({"\\Inbox"}))
        cases = [
            ("receipt", info("From: shop@example.com\nSubject: Your Receipt #1"),
             [("Receipts", 'subject contains "receipt"')], Actions(labels=("Receipts",), archive=True)),
            ("order regex", info("From: shop@example.com\nSubject: Order 1234567 shipped"),
             [("Receipts", "subject matches /order #?\\d{5,}/i")],
             Actions(labels=("Receipts",), archive=True)),
            ("newsletter", info("From: n@news.example\nSubject: Weekly\nList-Unsubscribe: <https://u>"),
             [("Newsletters", "header List-Unsubscribe present")],
             Actions(labels=("Newsletters",), mark_read=True)),
            ("github", info("From: Jane <notifications@github.com>\nSubject: [repo] PR #5"),
             [("GitHub", 'from contains "notifications@github.com"')],
             Actions(labels=("GitHub", "Dev/Notifications"))),
            ("bank continues into receipts",
             info("From: MyBank <service@mybank.example>\nSubject: Your invoice"),
             [("Receipts", 'subject contains "invoice"')], Actions(labels=("Receipts",), archive=True)),
            ("bank then old and big",
             dataclasses.replace(big_old, headers=parse_headers(
                 b"From: x@y.z\r\nSubject: Account alert: login\r\n\r\n")),
             [("Bank", "any of (subject matches /account alert/i)"),
              ("Old and big", "size 8.0 MB > 5M and date 2022-06-01 older than 1y and "
                              'not (has label "Keep")')],
             Actions(star=True, trash=True)),
            ("old and big kept", dataclasses.replace(big_old, labels=frozenset({"Keep"})), [], Actions()),
            ("old and big", big_old,
             [("Old and big", 'size 8.0 MB > 5M and date 2022-06-01 older than 1y and '
                              'not (has label "Keep")')], Actions(trash=True)),
            ("nothing", info("From: friend@example.com\nSubject: lunch?", size=100,
                             date=NOW, labels=frozenset()), [], Actions()),
        ]
        for label, msg, matches, actions in cases:
            with self.subTest(label):
                decision = ruleset.classify(msg, final=True, now=NOW)
                self.assertEqual(list(decision.matches), matches)
                self.assertEqual(decision.actions, actions)

    def test_example_rules_classify_from_json(self):
        self.check(parse_rules(json.loads(json.dumps(EXAMPLE_DOC)), "rules.json"))

    def test_example_rules_classify_from_toml(self):
        self.check(parse_rules(gc.parse_toml(EXAMPLE_TOML), "rules.toml"))

    def test_needs_lists_what_to_fetch(self):
        doc = {"rule": EXAMPLE_DOC["rule"] + [
            {"body": "x", "recipient": "me", "has_attachment": True, "unread": True,
             "gmail_query": "category:social", "header": {"X-Priority": "1"}, "label": "x"}]}
        needs = parse_rules(doc).needs
        self.assertEqual(needs, Needs(
            headers=frozenset({"from", "subject", "message-id", "date", "list-unsubscribe",
                               "to", "cc", "delivered-to", "bcc", "x-priority"}),
            body=True, attachment=True, labels=True, flags=True, size=True, date=True,
            queries=frozenset({"category:social"})))
        self.assertEqual(parse_rules({"rule": [{"subject": "a", "label": "x"}]}).needs,
                         Needs(headers=frozenset({"from", "subject", "message-id", "date"})))


class BuiltinRulesTest(unittest.TestCase):
    def test_starter_toml_equals_builtin_rules(self):
        parsed = parse_rules(gc.parse_toml(STARTER_RULES_TOML), "built-in rules")
        self.assertEqual(parsed, builtin_rules())

    def test_starter_json_equals_builtin_rules(self):
        parsed = parse_rules(json.loads(STARTER_RULES_JSON), "built-in rules")
        self.assertEqual(parsed, builtin_rules())

    def test_starter_toml_documents_every_key(self):
        for key in gc.RULE_KEYS + gc.ACCOUNT_KEYS:
            with self.subTest(key):
                self.assertRegex(STARTER_RULES_TOML, rf"#.*\b{key}\b")

    def test_builtin_rules_only_label(self):
        for rule in builtin_rules().rules:
            with self.subTest(rule.name):
                self.assertEqual(rule.actions, Actions(labels=rule.actions.labels))
                self.assertTrue(rule.actions.labels)

    def test_builtin_rules_classify_common_mail(self):
        cases = [
            ("Invitation: Team sync @ Tue Mar 5", "calendar-notification@google.com", "", "Calendar"),
            ("Updated invitation: Team sync", "calendar-notification@google.com", "", "Calendar"),
            ("Accepted: Team sync", "bob@example.com", "", "Calendar"),
            ("Security alert", "no-reply@accounts.google.com", "", "Security"),
            ("Your receipt from Apple", "no_reply@email.apple.com", "", "Receipts"),
            ("Ihre Bestellbestätigung", "shop@example.de", "List-Unsubscribe: <x>", "Receipts"),
            ("Votre commande n°123", "shop@example.fr", "", "Receipts"),
            ("[repo] Issue opened", "notifications@github.com", "List-Id: repo", "Notifications"),
            ("Weekly digest", "news@substack.com", "List-Unsubscribe: <x>", "Newsletters"),
            ("lunch?", "friend@example.com", "", None),
        ]
        ruleset = builtin_rules()
        self.assertEqual(ruleset.source, "built-in rules")
        for subject, sender, extra, expected in cases:
            with self.subTest(subject):
                msg = info(f"From: {sender}\nSubject: {subject}\n{extra}")
                decision = ruleset.classify(msg, now=NOW)
                self.assertIsNotNone(decision)
                names = [name for name, _ in decision.matches]
                self.assertEqual(names, [expected] if expected else [])


class ConditionTableTest(unittest.TestCase):
    """One table of condition kinds: each class reads its value, says what it needs and
    explains its verdict; the validation, CONDITION_KEYS and Ruleset.needs follow the table."""

    def rule(self, **keys: Any) -> gc.Condition:
        return parse_rules({"rule": [dict(name="R", label="L", **keys)]}, "r.json").rules[0].condition

    def test_condition_keys_are_the_table_in_order(self):
        self.assertEqual(gc.CONDITION_KEYS, tuple(gc._CONDITION_KINDS))
        self.assertEqual(gc.CONDITION_KEYS[:8], ("from", "to", "cc", "recipient", "subject", "body",
                                                 "list_id", "header"))
        self.assertEqual(gc.ACTION_KEYS, ("label", "move", "archive", "mark_read", "mark_unread",
                                          "star", "unstar", "trash"))

    def test_each_kind_explains_the_value_it_saw(self):
        msg = info("From: GitHub <notifications@github.com>\nSubject: Hello there\nTo: a@x.example, "
                   "b@x.example, c@x.example, d@x.example\nList-Unsubscribe: <mailto:u@x>",
                   size=6 * 1024 * 1024, date=datetime(2023, 1, 2, tzinfo=timezone.utc),
                   flags=frozenset({"\\Seen"}), labels=frozenset({"\\Inbox", "Receipts"}),
                   has_attachment=False, body="Dear customer,\nyour invoice 42 is attached.",
                   queries=frozenset({"has:attachment"}))
        cases = [
            ({"from": "notifications@github.com"},
             (True, 'from: "GitHub <notifications@github.com>" contains "notifications@github.com"')),
            ({"subject": "/invoice/i"}, (False, 'subject: "Hello there": no match for /invoice/i')),
            ({"to": ["zzz", "/^d@/"]}, (True, 'to: "d@x.example" matches /^d@/')),
            ({"cc": "x"}, (False, 'cc: (none): no match for "x"')),
            ({"recipient": "nobody"}, (False, 'recipient: "a@x.example", "b@x.example", "c@x.example" '
                                              'and 1 more: no match for "nobody"')),
            ({"header": {"List-Unsubscribe": True}}, (True, "header List-Unsubscribe: present")),
            ({"header": {"X-Spam": True}}, (False, "header X-Spam: absent, wanted present")),
            ({"header": {"List-Unsubscribe": "/mailto/"}},
             (True, 'header List-Unsubscribe: "<mailto:u@x>" matches /mailto/')),
            ({"body": "INVOICE 42"}, (True, 'body: "dear customer, your invoice 42 is attached." contains "INVOICE 42"')),
            ({"body": "/refund/"}, (False, "body (43 characters read): no match for /refund/")),
            ({"larger_than": "5M"}, (True, "size: 6.0 MB > 5M")),
            ({"smaller_than": "5M"}, (False, "size: 6.0 MB, not < 5M")),
            ({"older_than": "1y"}, (True, "date: 2023-01-02 older than 1y (cutoff 2023-03-31)")),
            ({"newer_than": "2w"}, (False, "date: 2023-01-02, not newer than 2w (cutoff 2024-03-17)")),
            ({"unread": True}, (False, "unread: read, wanted unread")),
            ({"starred": False}, (True, "starred: not starred")),
            ({"has_attachment": False}, (True, "has_attachment: no attachment")),
            ({"has_label": "receipts"}, (True, 'labels: "Receipts", "\\\\Inbox": has label "receipts"')),
            ({"has_label": "Keep"}, (False, 'labels: "Receipts", "\\\\Inbox": none is "Keep"')),
            ({"gmail_query": "has:attachment"}, (True, 'gmail query "has:attachment": found by the server')),
            ({"not": {"subject": "hello"}}, (False, 'not (subject: "Hello there" contains "hello")')),
            ({"any": [{"subject": "x"}, {"unread": False}]},
             (True, 'any of (subject: "Hello there": no match for "x"; unread: read)')),
            ({"all": [{"subject": "hello"}, {"starred": True}]},
             (False, 'all of (subject: "Hello there" contains "hello"; starred: not starred, wanted starred)')),
            ({"subject": "hello", "larger_than": 10},
             (True, 'subject: "Hello there" contains "hello" and size: 6.0 MB > 10')),
        ]
        for keys, want in cases:
            with self.subTest(keys=keys):
                condition = self.rule(**keys)
                self.assertEqual(condition.explain(msg, NOW), want)
                self.assertEqual(condition.evaluate(msg, NOW)[0], want[0])

    def test_unknown_data_is_explained_as_unknown(self):
        msg = info("Subject: x", flags=None)
        cases = [({"body": "x"}, "body: not fetched yet"), ({"larger_than": 5}, "size: unknown"),
                 ({"older_than": "1d"}, "date: unknown"), ({"unread": True}, "unread: unknown"),
                 ({"has_attachment": True}, "has_attachment: unknown"), ({"has_label": "x"}, "labels: unknown"),
                 ({"gmail_query": "in:x"}, 'gmail query "in:x": cannot be asked here (Gmail only)'),
                 ({"not": {"body": "x"}}, "not (body: not fetched yet)")]
        for keys, text in cases:
            with self.subTest(keys=keys):
                self.assertEqual(self.rule(**keys).explain(msg, NOW), (None, text))
                self.assertIsNone(self.rule(**keys).evaluate(msg, NOW)[0])
        both = self.rule(any=[{"body": "x"}, {"subject": "x"}])
        self.assertEqual(both.explain(msg, NOW)[0], True)     # Kleene: True beats unknown
        both = self.rule(all=[{"body": "x"}, {"subject": "y"}])
        self.assertEqual(both.explain(msg, NOW)[0], False)    # Kleene: False beats unknown
        self.assertEqual(self.rule(all=[{"body": "x"}, {"subject": "x"}]).explain(msg, NOW)[0], None)

    def test_needs_and_cost_come_from_the_classes(self):
        rules = parse_rules({"rule": [
            {"name": "a", "from": "x", "header": {"X-A": True, "X-B": "b"}, "label": "L"},
            {"name": "b", "not": {"any": [{"body": "x"}, {"larger_than": 1}]}, "label": "L"},
            {"name": "c", "older_than": "1d", "has_label": "x", "unread": True, "label": "L"},
            {"name": "d", "has_attachment": True, "gmail_query": "in:x", "label": "L"},
        ]}, "r.json")
        self.assertEqual(rules.needs, gc.Needs(
            headers=gc.DISPLAY_HEADERS | {"from", "x-a", "x-b"}, body=True, attachment=True,
            labels=True, flags=True, size=True, date=True, queries=frozenset({"in:x"})))
        costs = [gc._cost(c) for c in (self.rule(body="x"), self.rule(subject="x"),
                                        self.rule(header={"X": True}), self.rule(unread=True),
                                        self.rule(any=[{"unread": True}, {"body": "x"}]))]
        self.assertEqual(costs, [3, 2, 1, 0, 3])
        self.assertEqual(parse_rules({"rule": [{"name": "t", "unread": True, "move": "A/{year}"}]},
                                     "r.json").needs, gc.Needs(headers=gc.DISPLAY_HEADERS, flags=True, date=True))

    def test_the_rules_hash_of_existing_files_is_unchanged(self):
        # the state file and audit log keep this fingerprint: the tables must not move it
        self.assertEqual(gc.rules_hash(parse_rules(EXAMPLE_DOC, "r.json")), "e29e14870439df25")
        self.assertEqual(gc.rules_hash(gc.builtin_rules()), "99247fd915e3aee0")

    def test_a_flag_row_added_to_the_table_is_recorded_and_undone_like_a_field(self):
        with mock.patch.dict(gc._FLAG_ACTION_ROWS):
            gc._FLAG_ACTION_ROWS["important"] = gc.FlagAction("important", "$Important", True,
                                                              "unimportant", "mark important")
            gc._FLAG_ACTION_ROWS["unimportant"] = gc.FlagAction("unimportant", "$Important", False,
                                                                "important", "mark unimportant")
            first = parse_rules({"rule": [{"name": "a", "subject": "x", "important": True,
                                           "continue": True},
                                          {"name": "b", "subject": "x", "unimportant": True,
                                           "star": True}]}, "r.json")
            actions = first.classify(info("Subject: x"), now=NOW).actions
            self.assertEqual(actions, gc.Actions(star=True, more_flags=("important",)))
            self.assertEqual(actions.describe(), "star, mark important")
            self.assertEqual(actions.as_record(), {
                "labels": [], "move": None, "archive": False, "mark_read": False,
                "mark_unread": False, "star": True, "unstar": False, "trash": False,
                "important": True})
            inverse = gc._inverse_change({"action": "mark important", "flag": "$Important",
                                          "before": False, "after": True})
            self.assertEqual(inverse, {"action": "mark unimportant", "flag": "$Important",
                                       "before": True, "after": False})
            self.assertEqual(gc.ACTION_KEYS[-1], "trash")
            self.assertIn("important", gc._action_keys())
        self.assertEqual(gc.Actions(star=True).as_record(),      # the record's shape as before
                         {"labels": [], "move": None, "archive": False, "mark_read": False,
                          "mark_unread": False, "star": True, "unstar": False, "trash": False})
        self.assertEqual(gc._inverse_change({"action": "unstar"})["action"], "star")
        self.assertEqual(gc._inverse_change({"action": "mark read"})["action"], "mark unread")
        self.assertEqual(gc._inverse_change({"action": "archive"})["action"], "unarchive")
        self.assertEqual(gc._inverse_change({"action": "odd"})["action"], "undo odd")

    def test_add_condition_refuses_taken_and_odd_keys(self):
        for key in ("from", "label", "mark_read", "Bad-Key", "", "continue"):
            with self.subTest(key=key), self.assertRaises(ValueError):
                gc.Ruleset.add_condition(key, lambda msg: True)
        with self.assertRaises(ValueError):
            gc.Ruleset.add_condition("fine_name", "not callable")
        with self.assertRaises(ValueError):     # cannot read a value from a rules file
            gc.Ruleset.add_condition("fine_name", gc.HeaderPresent)
        self.assertNotIn("fine_name", gc._CONDITION_KINDS)
        with mock.patch.dict(gc._CONDITION_KINDS):
            gc.Ruleset.add_condition("fine_name2", gc.HasLabel)
            rules = parse_rules({"rule": [{"name": "r", "fine_name2": "Keep", "label": "L"}]}, "r.json")
            self.assertEqual(rules.rules[0].condition, gc.HasLabel(gc.Matcher((gc.Pattern("Keep", "keep"),))))
            self.assertTrue(rules.needs.labels)
        self.assertNotIn("fine_name2", gc._CONDITION_KINDS)


# Rules for the explain/evaluate sweep: every kind, plain and regex, nested, unknowns.
EXPLAIN_RULES = {"rule": [
    {"name": "a", "from": ["müller", "/@example\\.(com|de)$/", "github"], "label": "A"},
    {"name": "b", "recipient": ["team@", "/^staff@/i"], "subject": ["receipt", "/\\d{3}/"], "label": "B"},
    {"name": "c", "any": [{"subject": "café"}, {"list_id": "/./"}, {"body": "unsubscribe"}], "label": "C"},
    {"name": "d", "not": {"header": {"X-Custom": True, "Delivered-To": "/example/"}}, "label": "D"},
    {"name": "e", "all": [{"larger_than": "1K"}, {"older_than": "30d"}, {"cc": "/a/"}], "label": "E"},
    {"name": "f", "has_attachment": True, "newer_than": "2y", "unread": False, "starred": False,
     "has_label": ["/^Rec/", "Keep"], "label": "F"},
    {"name": "g", "not": {"any": [{"to": "ann"}, {"all": [{"smaller_than": 500}, {"subject": "/^re:/i"}]}]},
     "gmail_query": "x", "label": "G"},
]}


class ExplainFastPathTest(unittest.TestCase):
    """explain() (the plain walk `why` will print) agrees with evaluate() (the short-cut
    matcher, the cost order, the header cache) on every condition of every message, and
    gives the same text whichever header decoder ran."""

    def messages(self) -> List[Tuple[bytes, Dict[str, Any]]]:
        now = datetime(2026, 11, 30, tzinfo=timezone.utc)
        corpus = [raw.split(b"\r\n\r\n")[0] + b"\r\n\r\n" for raw, _ in bench_corpus(120)]
        corpus += tricky_header_blocks()
        out = []
        for i, raw in enumerate(corpus):
            fields = dict(size=len(raw) * (i % 5), date=now - timedelta(days=len(raw) * (i % 4)),
                          has_attachment=[True, False, None][i % 3],
                          flags=[frozenset(), frozenset({"\\Seen"}), None, frozenset({"\\Flagged"})][i % 4],
                          labels=[None, frozenset({"Receipts"}), frozenset({"keep", "\\Inbox"})][i % 3],
                          body=[None, "please Unsubscribe here", "nothing"][i % 3],
                          queries=[None, frozenset({"x"}), frozenset()][(i // 3) % 3])
            out.append((raw, fields))
        return out

    def verdicts(self, rules: gc.Ruleset, corpus, now) -> List[Any]:
        results = []
        for raw, fields in corpus:
            msg = MessageInfo(headers=parse_headers(raw), **fields)
            for rule in rules.rules:
                for condition in gc._walk(rule.condition):
                    fast, plain = condition.evaluate(msg, now), condition.explain(msg, now)
                    if fast[0] != plain[0]:
                        self.fail(f"{raw!r}: {condition.describe()}: evaluate {fast}, explain {plain}")
                    results.append(plain)
        return results

    def test_explain_and_evaluate_agree_and_the_text_does_not_depend_on_the_decoder(self):
        rules = gc.parse_rules(EXPLAIN_RULES, "explain rules")
        now = datetime(2026, 11, 30, tzinfo=timezone.utc)
        corpus = self.messages()
        fast = self.verdicts(rules, corpus, now)
        with mock.patch.object(gc, "header_text", gc._plain_header_text), \
                mock.patch.object(gc, "header_addresses", gc._plain_header_addresses), \
                mock.patch.object(gc, "_split_header_block", lambda raw: None):
            plain = self.verdicts(rules, corpus, now)
        self.assertEqual(fast, plain)
        self.assertEqual({v for v, _ in fast}, {True, False, None})
        self.assertGreater(sum(v is True for v, _ in fast), 300)

    def test_a_hit_names_the_pattern_evaluate_names(self):
        rules = gc.parse_rules(EXPLAIN_RULES, "explain rules")
        now = datetime(2026, 11, 30, tzinfo=timezone.utc)
        checked = 0
        for raw, fields in self.messages():
            msg = MessageInfo(headers=parse_headers(raw), **fields)
            for rule in rules.rules:
                for condition in gc._walk(rule.condition):
                    if isinstance(condition, (gc.HeaderMatch, gc.BodyMatch)):
                        value, reason = condition.evaluate(msg, now)
                        if value:
                            verb_and_pattern = reason.split(" ", 1)[1] if isinstance(condition, gc.BodyMatch) \
                                else reason[len(condition.key) + 1:]
                            self.assertTrue(condition.explain(msg, now)[1].endswith(verb_and_pattern),
                                            (raw, reason, condition.explain(msg, now)))
                            checked += 1
        self.assertGreater(checked, 200)


class ExtensionPointTest(FakeServerTest):
    """A new condition kind and a new flag action are one class / one row each: a rules
    file uses them and a run against the server sends what they say."""

    def setUp(self):
        super().setUp()
        for table in (gc._CONDITION_KINDS, gc._FLAG_ACTION_ROWS):
            patcher = mock.patch.dict(table)
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_a_condition_class_a_python_condition_and_a_flag_row_run_against_the_server(self):
        @dataclasses.dataclass(frozen=True)
        class SubjectLength(gc.Condition):
            """`subject_longer_than = N`: the subject has more than N characters."""

            limit: int
            cost = 2

            @classmethod
            def from_rules(cls, key, value, read):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise read.error(f"expected a number, got {value!r}")
                return cls(value)

            def evaluate(self, msg, now):
                return self.explain(msg, now)[0], self.describe()

            def explain(self, msg, now):
                subject = (header_text(msg.headers, "subject") or [""])[0]
                return len(subject) > self.limit, f"subject: {len(subject)} characters"

            def needs(self):
                return gc.Needs(headers=frozenset({"subject"}))

            def describe(self):
                return f"subject longer than {self.limit}"

        gc.Ruleset.add_condition("subject_longer_than", SubjectLength)
        gc.Ruleset.add_condition("from_a_robot", lambda msg: "robot" in str(msg.headers["X-Sender-Kind"]),
                                 needs=gc.Needs(headers=frozenset({"x-sender-kind"})))
        gc._FLAG_ACTION_ROWS["flag_answered"] = gc.FlagAction(
            "flag_answered", "\\Answered", True, "unflag_answered", "flag answered")
        gc._FLAG_ACTION_ROWS["unflag_answered"] = gc.FlagAction(
            "unflag_answered", "\\Answered", False, "flag_answered", "unflag answered")

        long_id = self.server.add_message(make_message("a subject well over twenty characters"))
        short_id = self.server.add_message(make_message("short"))
        robot_id = self.server.add_message(make_message("beep", extra="X-Sender-Kind: robot\n"),
                                           flags=("\\Answered",))
        path = os.path.join(self.tmp, "rules.toml")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write('[[rule]]\nname = "Long"\nsubject_longer_than = 20\nflag_answered = true\n'
                     'star = true\n\n[[rule]]\nname = "Robots"\nany = [{ from_a_robot = true }]\n'
                     'unflag_answered = true\nlabel = "Robots"\n')
        rules = gc.load_rules(path)
        self.assertEqual(rules.rules[0].actions.describe(), "star, flag answered")
        self.assertIn("x-sender-kind", rules.needs.headers)
        report = gc.classify_folder(self.connect(), rules, "INBOX", apply=True)
        self.assertEqual(report.matched, {"Long": 1, "Robots": 1})
        self.assertEqual(report.changes, {"flag answered": 1, "star": 1, "unflag answered": 1,
                                          "label Robots": 1})
        stores = sorted(e.line.split(b" ", 3)[3] for e in self.server.log if e.command == "UID STORE")
        self.assertEqual(stores, [b"1 +FLAGS.SILENT (\\Answered)\r\n", b"1 +FLAGS.SILENT (\\Flagged)\r\n",
                                  b'3 +X-GM-LABELS ("Robots")\r\n', b"3 -FLAGS.SILENT (\\Answered)\r\n"])
        self.assertEqual(self.server.message(long_id).flags, {"\\Answered", "\\Flagged"})
        self.assertEqual(self.server.message(short_id).flags, set())
        self.assertEqual(self.server.message(robot_id).flags, set())
        # a misspelt new key is offered the registered one; a conflicting pair is refused
        with self.assertRaises(gc.RulesError) as caught:
            gc.parse_rules({"rule": [{"name": "x", "subject_longer_then": 3, "star": True}]}, "r.json")
        self.assertIn("did you mean 'subject_longer_than'?", str(caught.exception))
        with self.assertRaises(gc.RulesError) as caught:
            gc.parse_rules({"rule": [{"name": "x", "from_a_robot": True, "flag_answered": True,
                                      "unflag_answered": True}]}, "r.json")
        self.assertIn("'flag_answered' and 'unflag_answered' contradict each other", str(caught.exception))
        # `check` knows the new key, [[test]] tables included
        with open(path, "a", encoding="utf-8") as fh:
            fh.write('\n[[test]]\nheaders = { "X-Sender-Kind" = "robot" }\nexpect_rules = ["Robots"]\n'
                     '\n[[test]]\nsubject = "a subject well over twenty characters"\nexpect_rules = ["Long"]\n'
                     'expect_actions = { flag_answered = true, star = true }\n')
        code, out, err = run_cli("check", path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("1. Long: star, flag answered\n", out)
        self.assertIn("tests: 2 of 2 passed", out)


class TemplateTest(unittest.TestCase):
    def test_split_template(self):
        self.assertEqual(gc.split_template("Archive/{year}-{month}"),
                         ((False, "Archive/"), (True, "year"), (False, "-"), (True, "month")))
        self.assertEqual(gc.split_template("{{literal}}/{sender_domain}"),
                         ((False, "{literal}/"), (True, "sender_domain")))
        for bad, expected in [("A/{yaer}", "did you mean {year}"), ("A/{", "lone '{'"),
                              ("A}", "lone '}'"), ("{}", "unknown field {}")]:
            with self.subTest(bad):
                with self.assertRaises(ValueError) as ctx:
                    gc.split_template(bad)
                self.assertIn(expected, str(ctx.exception))

    def test_hostile_sender_domains_are_cleaned(self):
        cases = [
            ("x <a@evil.example/../INBOX>", "/", "evil.example.inbox"),
            ("a@[Gmail].Trash", "/", "gmail.trash"),
            ("=?utf-8?q?J=C3=BCrgen?= <a@München.DE>", "/", "xn--mnchen-3ya.de"),
            ("a@EXAMPLE.COM.", "/", "example.com"),
            ("a@EXAMPLE.COM.", ".", "example-com"),
            ("a@-..-.", "/", "unknown"),
            ("no address here", "/", "unknown"),
            ("bob@" + "x" * 100 + ".com", "/", "x" * 63),
            ('"a" <a@"quoted/dom">', "/", "quoteddom"),
            ("a@exa%mple.com", "/", "example.com"),
            ("a@ＥＸＡＭＰＬＥ.com", "/", "example.com"),
        ]
        for sender, separator, expected in cases:
            with self.subTest(sender):
                raw = f"From: {sender}\r\n\r\n".encode("utf-8")
                msg = MessageInfo(headers=parse_headers(raw))
                name = gc.expand_template("V/{sender_domain}", msg, separator)
                self.assertEqual(name, "V/" + expected)
                self.assertRegex(name[2:], r"\A[a-z0-9][a-z0-9.-]{0,62}\Z")
                self.assertNotIn(separator, name[2:])

    def test_year_and_month_come_from_the_message_date(self):
        msg = info("From: a@b.example", date=datetime(2023, 2, 5, tzinfo=timezone.utc))
        self.assertEqual(gc.expand_template("A/{year}/{month}", msg), "A/2023/02")
        self.assertEqual(gc.expand_template("A/{year}", info("From: a@b.example")), "A/unknown")
        self.assertEqual(gc.parse_rules({"rule": [{"subject": "x", "move": "A/{year}"}]}).needs.date, True)
        self.assertEqual(gc.parse_rules({"rule": [{"subject": "x", "move": "A/{{year}}"}]}).needs.date, False)

    def test_check_refuses_a_bad_template_in_one_line(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "rules.json")
        with open(path, "w") as handle:
            json.dump({"rule": [{"name": "V", "subject": "x", "label": ["ok", "V/{domain}"]}]}, handle)
        code, out, err = run_cli("check", path)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn('rule 1 ("V"): label: unknown field {domain}', err)
        self.assertEqual(len(err.strip().splitlines()), 1)


class ActionRecordTest(unittest.TestCase):
    def test_as_record_holds_every_field_as_the_dataclass_has_them(self):
        for actions in (gc.Actions(), gc.Actions(labels=("A", "B/C"), move="X", star=True),
                        gc.Actions(archive=True, mark_read=True, trash=True, unstar=True),
                        gc.Actions(labels=("L",), more_flags=("mark_important",))):
            with self.subTest(actions=actions):
                want = dataclasses.asdict(actions)
                del want["more_flags"]
                want.update(dict.fromkeys(actions.more_flags, True))
                want["labels"] = list(actions.labels)
                self.assertEqual(actions.as_record(), want)
                self.assertEqual(list(actions.as_record()), list(want))


# The floor (issue 17): a client that already knows where every message goes.  The bench
# works the answers out before any timing, from the corpus as it was written (the
# generated corpus for the fake server; for a lab Dovecot the Maildir files and their
# ground-truth list, --truth), with the plain path: whole messages, email's own parser,
# no fast path.  The floor then only fetches each message's Message-ID, groups the UIDs by
# command and sends every write in one go (one round trip), so what is left is the
# server's own work.  Both clients start from the same mailbox, and after each the bench
# compares the final mailboxes: a difference is a wrong answer of ours (or of the floor).

_FLOOR_ORDER = {"create": 0, "label": 1, "flag+": 2, "flag-": 3, "archive": 4, "move": 5,
                "trash": 5}


# A classifier for the tests: a script with its own #! line, so that it is the program the
# trust check looks at.  Its answer comes from the message it reads: SPAM prints a label and
# exits 0, CRASH is killed by a signal, HANG never answers, STATUS3 exits 3, WAIT waits until
# two messages are in hand at once; anything else exits 1.  Each run appends its environment
# and what it read to the log named by its first argument.
_CLASSIFIER = r'''#!%s -IS
import json, os, signal, sys, time
data = sys.stdin.buffer.read()
with open(sys.argv[1], "a") as log:
    log.write(json.dumps({"env": dict(os.environ), "stdin": data.decode("utf-8", "replace")}) + "\n")
if b"HANG" in data:
    time.sleep(30)
if b"CRASH" in data:
    os.kill(os.getpid(), signal.SIGKILL)
if b"STATUS3" in data:
    sys.exit(3)
if b"WAIT" in data:
    mark = os.path.join(os.path.dirname(sys.argv[1]), "arrived-" + os.environ["GMAIL_CLASSIFY_UID"])
    open(mark, "w").close()
    deadline = time.time() + 3
    while time.time() < deadline:
        if len([n for n in os.listdir(os.path.dirname(mark)) if n.startswith("arrived-")]) >= 2:
            sys.exit(0)
        time.sleep(0.01)
    sys.exit(1)
if b"SPAM" in data:
    print(" Spam/../Pharma Deals \n second line")
    sys.exit(0)
sys.exit(1)
'''


class ProgramConditionTest(FakeServerTest):
    """`program = [...]`: a rule asks a program, fail closed, in parallel, never past a rule
    that decided, in a small fixed environment, only after the trust check."""

    def setUp(self):
        super().setUp()
        os.chmod(self.tmp, 0o700)
        self.script = os.path.join(self.tmp, "classify.py")
        with open(self.script, "w") as handle:
            handle.write(_CLASSIFIER % sys.executable)
        os.chmod(self.script, 0o700)
        self.log = os.path.join(self.tmp, "log", "runs.jsonl")
        os.mkdir(os.path.dirname(self.log), 0o700)

    def rules_file(self, program_keys: Optional[Dict[str, Any]] = None, tests: Sequence[dict] = ()) -> str:
        keys = {"program": [self.script, self.log], "program_timeout": 20, "label_from": "program"}
        keys.update(program_keys or {})
        doc = {"rule": [{"name": "News", "subject": "newsletter", "label": "News"},
                        dict(name="Classifier", **keys),
                        {"name": "Rest", "from": "example.com", "label": "Rest"}],
               "test": list(tests)}
        path = os.path.join(self.tmp, "rules.json")
        with open(path, "w") as handle:
            json.dump(doc, handle)
        os.chmod(path, 0o600)
        return path

    def runs(self) -> List[dict]:
        if not os.path.exists(self.log):
            return []
        with open(self.log) as handle:
            return [json.loads(line) for line in handle]

    def classify(self, rules: gc.Ruleset, **kw: Any) -> Tuple[gc.FolderReport, Dict[str, Tuple[str, ...]]]:
        outcomes: Dict[str, Tuple[str, ...]] = {}

        def seen(outcome: gc.Outcome) -> None:
            outcomes[outcome.subject] = tuple(f"{c['action']} {c.get('label', '')}".strip()
                                              for c in outcome.changes)
        report = gc.classify_folder(self.connect(), rules, "INBOX", on_message=seen, **kw)
        return report, outcomes

    def test_match_no_match_label_crash_hang_and_status_in_one_dry_run(self):
        for subject in ("newsletter SPAM", "buy SPAM now", "plain", "CRASH me", "STATUS3"):
            self.server.add_message(make_message(subject))
        with mock.patch.dict(os.environ, {"GMAIL_APP_PASSWORD": "secret-1"}):
            report, outcomes = self.classify(gc.load_rules(self.rules_file({"program_timeout": 20})),
                                             jobs=3)
        # the first rule decided the newsletter: its program never ran
        self.assertEqual(sorted(run["env"]["GMAIL_CLASSIFY_SUBJECT"] for run in self.runs()),
                         ["CRASH me", "STATUS3", "buy SPAM now", "plain"])
        self.assertEqual(report.matched, {"News": 1, "Classifier": 1, "Rest": 1})
        self.assertEqual(outcomes["newsletter SPAM"], ("label News",))
        # the label is the first line, each part cleaned, its case kept
        self.assertEqual(outcomes["buy SPAM now"], ("label Spam/PharmaDeals",))
        self.assertEqual(outcomes["plain"], ("label Rest",))
        # fail closed: neither a match nor handed on to the rules after it; run again (exit 6)
        self.assertEqual(sorted(report.why_skipped.values()), [
            "program classify.py exited with status 3",
            "program classify.py was killed by signal 9"])
        self.assertNotIn("CRASH me", outcomes)
        # a small fixed environment: no credential, no variable of ours but these
        env = self.runs()[0]["env"]
        self.assertEqual(sorted(k for k in env if k not in ("PWD", "SHLVL", "_", "LC_CTYPE")),
                         ["GMAIL_CLASSIFY_FOLDER", "GMAIL_CLASSIFY_FROM", "GMAIL_CLASSIFY_MESSAGE_ID",
                          "GMAIL_CLASSIFY_SUBJECT", "GMAIL_CLASSIFY_UID", "HOME", "LANG", "PATH"])
        self.assertEqual((env["PATH"], env["LANG"], env["GMAIL_CLASSIFY_FOLDER"]),
                         ("/usr/bin:/bin", "C.UTF-8", "INBOX"))
        # the input: the header block and the body prefix the rules fetch
        stdin = self.runs()[0]["stdin"]
        self.assertIn("Subject: ", stdin)
        self.assertTrue(stdin.endswith("Hi there.\r\n"))
        fetches = [e.line for e in self.server.log if b"BODY.PEEK[]<0.16384>" in e.line]
        self.assertEqual(len(fetches), 1)

    def test_a_program_that_hangs_is_cut_off_and_the_message_skipped(self):
        self.server.add_message(make_message("HANG me"))
        report, outcomes = self.classify(gc.load_rules(self.rules_file({"program_timeout": 0.3})))
        self.assertEqual(list(report.why_skipped.values()),
                         ["program classify.py gave no answer within 0.3 s"])
        self.assertEqual(outcomes, {})

    def test_programs_run_in_parallel_across_messages(self):
        for subject in ("WAIT one", "WAIT two"):
            self.server.add_message(make_message(subject))
        report, outcomes = self.classify(self.parallel_rules(), jobs=2)
        self.assertEqual(report.matched, {"Classifier": 2})

    def parallel_rules(self) -> gc.Ruleset:
        return gc.parse_rules({"rule": [{"name": "Classifier", "program": [self.script, self.log],
                                         "program_timeout": 5, "label": "Both"}]},
                              os.path.join(self.tmp, "r.json"))

    def test_a_message_over_program_max_size_is_left_alone_for_its_content(self):
        self.server.add_message(make_message("SPAM big", body="x" * 3000))
        self.server.add_message(make_message("SPAM small"))
        rules = gc.load_rules(self.rules_file({"program_input": "message", "program_max_size": 2000}))
        report, outcomes = self.classify(rules)
        self.assertEqual(list(report.content_skipped.values()),
                         ["larger than program_max_size (2.0 KB) for program classify.py"])
        self.assertEqual(outcomes, {"SPAM small": ("label Spam/PharmaDeals",)})
        self.assertEqual([run["env"]["GMAIL_CLASSIFY_SUBJECT"] for run in self.runs()], ["SPAM small"])
        self.assertEqual(rules.needs.whole, frozenset({2000}))
        self.assertTrue(rules.needs.size)       # RFC822.SIZE decides before any program runs
        # a program reading whole messages gets them up to its program_max_size
        rules = gc.load_rules(self.rules_file({"program_input": "message", "program_max_size": "20K"}))
        report, outcomes = self.classify(rules)
        # (both fit in the body prefix, whose FETCH brought them whole: none is fetched again)
        self.assertFalse(any(b"BODY.PEEK[]<0.20480>" in e.line for e in self.server.log))
        (big,) = [run for run in self.runs() if run["env"]["GMAIL_CLASSIFY_SUBJECT"] == "SPAM big"]
        self.assertEqual(len(big["stdin"]), len(make_message("SPAM big", body="x" * 3000)))

    def cli(self, *argv: str) -> Tuple[int, str, str]:
        return run_cli(*argv, "--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                       "--plaintext", env={"GMAIL_APP_PASSWORD": PASSWORD})

    def test_run_exits_6_when_a_program_fails_and_never_moves_the_mark_past_it(self):
        self.server.add_message(make_message("CRASH me"))
        code, out, err = self.cli("run", "--rules", self.rules_file(), "--jobs", "1")
        self.assertEqual(code, 6, err)
        self.assertIn("skipped (program classify.py was killed by signal 9): UID 1; run again", out)

    def test_trust_check_names_the_path_and_runs_nothing(self):
        self.server.add_message(make_message("SPAM"))
        path = self.rules_file(tests=[{"subject": "SPAM", "expect_rules": ["Classifier"]}])
        for target in (path, self.script, self.tmp):
            with self.subTest(target=target):
                mode = os.stat(target).st_mode & 0o777
                os.chmod(target, mode | 0o020)
                try:
                    code, out, err = self.cli("run", "--rules", path)
                    self.assertEqual(code, 2)
                    self.assertIn(f"{target} can be changed by other users" if target != self.tmp
                                  else f"lies in {target}, which other users can write", err)
                    self.assertIn("refusing to run", err)
                    code, out, err = run_cli("test", path, os.devnull)
                    self.assertEqual(code, 2)
                finally:
                    os.chmod(target, mode)
        self.assertEqual(self.runs(), [])
        code, out, err = self.cli("run", "--rules", path)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.runs()), 2)        # the [[test]] table, then the message

    def test_check_and_demo_list_programs_and_run_them_only_when_asked(self):
        path = self.rules_file(tests=[{"subject": "buy SPAM", "expect_rules": ["Classifier"],
                                       "expect_actions": {"label": "Spam/PharmaDeals"}}])
        code, out, err = run_cli("check", path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("2. Classifier: label from program\n", out)
        self.assertIn(f"program: rule 2 (Classifier): program {self.script} {self.log}  [{self.script}]", out)
        self.assertIn("tests: 1 not run", out)
        code, out, err = run_cli("demo", "--rules", path, "--summary")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Programs not run", out)
        self.assertEqual(self.runs(), [])
        code, out, err = run_cli("check", "--run-programs", path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("tests: 1 of 1 passed", out)
        self.assertEqual(len(self.runs()), 1)
        # a program that fails on a test's message fails that test (exit 8)
        path = self.rules_file(tests=[{"subject": "STATUS3", "expect_rules": []}])
        code, out, err = run_cli("check", "--run-programs", path)
        self.assertEqual(code, 8)
        self.assertIn("fetches: headers", out)
        self.assertIn("test 1: could not be decided: program classify.py exited with status 3", err)
        os.chmod(self.script, 0o720)
        code, out, err = run_cli("check", "--run-programs", path)
        self.assertEqual(code, 2)
        self.assertIn("refusing to run program classify.py", err)

    def test_test_command_runs_programs_and_reports_a_failure_as_incomplete(self):
        path = self.rules_file()
        spam, crash = os.path.join(self.tmp, "spam.eml"), os.path.join(self.tmp, "crash.eml")
        for name, subject in ((spam, "buy SPAM"), (crash, "STATUS3")):
            with open(name, "wb") as handle:
                handle.write(make_message(subject))
        code, out, err = run_cli("test", path, spam, crash)
        self.assertEqual(code, 6)
        self.assertIn("spam.eml: Classifier: program classify.py said yes (label \"Spam/PharmaDeals\")", out)
        self.assertIn("crash.eml: skipped: program classify.py exited with status 3", out)

    def test_offline_a_program_reading_whole_messages_gets_all_of_a_large_one(self):
        # Offline reading stops at MAX_OFFLINE_BYTES (here 4 KB), but never short of what a
        # program that reads whole messages is allowed (its program_max_size).
        root = os.path.join(self.tmp, "Maildir")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(root, sub))
        big = make_message("buy SPAM", body="x" * 60_000)
        with open(os.path.join(root, "cur", "1.host:2,S"), "wb") as handle:
            handle.write(big)
        with mock.patch.object(gc, "MAX_OFFLINE_BYTES", 4096):
            path = self.rules_file({"program_input": "message", "program_max_size": "100K"})
            code, out, err = run_cli("test", path, root)
            self.assertEqual(code, 0, err)
            self.assertEqual(self.runs()[-1]["stdin"].encode(), big)
            self.assertIn('said yes (label "Spam/PharmaDeals")', out)
            plain = os.path.join(self.tmp, "plain.json")
            with open(plain, "w") as handle:
                json.dump({"rule": [{"name": "Rest", "from": "example.com", "label": "Rest"}]},
                          handle)
            code, out, err = run_cli("diff", plain, path, root)
            self.assertEqual(code, 0, err)
            self.assertEqual(len(self.runs()), 2)
            self.assertEqual(self.runs()[-1]["stdin"].encode(), big)     # diff reads as far
            path = self.rules_file({"program_input": "message", "program_max_size": "50K"})
            code, out, err = run_cli("test", path, root)
        self.assertEqual(code, 6, err)                      # too large for it: skipped
        self.assertIn("skipped: larger than program_max_size", out)
        self.assertEqual(len(self.runs()), 2)

    def test_rules_file_errors_for_program_keys(self):
        cases = [
            ({"program": "bogofilter -e", "label": "x"}, "program: expected a list of strings"),
            ({"program": [], "label": "x"}, "program: expected a list of strings"),
            ({"program_timeout": 3, "subject": "x", "label": "x"},
             "program_timeout: goes with 'program' in the same table"),
            ({"program": ["x"], "program_timeout": 0, "label": "x"}, "program_timeout: expected seconds"),
            ({"program": ["x"], "program_input": "body", "label": "x"},
             'program_input: expected "headers" or "message"'),
            ({"program": ["x"], "label_from": "subject"}, 'label_from: expected "program"'),
            ({"program": ["x"], "program_max_size": "lots", "label": "x"}, "program_max_size: expected a size"),
            ({"any": [{"program": ["x"], "program_tmeout": 1}], "label": "x"}, "unknown key 'program_tmeout'"),
            ({"subject": "x", "label_from": "program"}, "label_from: goes with 'program'"),
        ]
        for rule, want in cases:
            with self.subTest(rule=rule):
                with self.assertRaises(gc.RulesError) as caught:
                    parse_rules({"rule": [dict(name="R", **rule)]}, "r.json")
                self.assertIn(want, str(caught.exception))
        nested = parse_rules({"rule": [{"name": "R", "label": "x", "any": [
            {"program": ["x", "y"], "program_timeout": 2.5, "program_input": "message",
             "program_path": "/opt/bin", "program_max_size": "2K"}]}]}, "r.json").rules[0].condition
        (program,) = [c for c in gc._walk(nested) if isinstance(c, gc.ProgramCondition)]
        self.assertEqual((program.argv, program.timeout, program.input, program.path, program.max_size),
                         (("x", "y"), 2.5, "message", "/opt/bin", 2048))
        self.assertEqual(program.cost, 5)

    def test_environment_is_printable_and_cut_at_1_kib(self):
        condition = gc.ProgramCondition(("x",))
        msg = info("Subject: " + "\u00e9" * 2000 + "\nFrom: a\x1b[2J@evil.example", folder="Lists/x")
        env = condition.environment(msg)
        self.assertLessEqual(len(env["GMAIL_CLASSIFY_SUBJECT"].encode("utf-8")), 1024)
        self.assertTrue(env["GMAIL_CLASSIFY_SUBJECT"].startswith("\u00e9\u00e9"))
        self.assertNotIn("\x1b", env["GMAIL_CLASSIFY_FROM"])
        self.assertEqual(env["GMAIL_CLASSIFY_FOLDER"], "Lists/x")

    def test_clean_label_keeps_case_and_drops_traversal(self):
        for given, want in (("Spam/../Pharma Deals", "Spam/PharmaDeals"), ("/Work//Urgent/", "Work/Urgent"),
                            ("..", ""), ("Caf\u00e9", "xn--caf-dma")):
            with self.subTest(given=given):
                self.assertEqual(gc.clean_label(given), want)


# --- Rules files: validation -------------------------------------------------------------


class ValidationTest(unittest.TestCase):
    def assert_error(self, doc, expected: str, source: str = "rules.toml") -> None:
        with self.assertRaises(RulesError) as caught:
            parse_rules(doc, source)
        self.assertEqual(str(caught.exception), expected)
        self.assertNotIn("\n", str(caught.exception))

    def test_error_names_file_rule_and_key_for_each_kind(self):
        cases = [
            ("unknown key with suggestion",
             {"rule": [{"name": "Receipts", "subject": "x", "label": "R"},
                       {"name": "Newsletters", "list_id": "x", "lable": "N"}]},
             'rules.toml: rule 2 ("Newsletters"): unknown key \'lable\'; did you mean \'label\'?'),
            ("bad regex",
             {"rule": [{"name": "Receipts", "subject": "/order #?(\\d{5,}/", "label": "R"}]},
             'rules.toml: rule 1 ("Receipts"): subject: bad regex /order #?(\\d{5,}/: '
             "missing ), unterminated subpattern at position 8"),
            ("bad regex inside a list names the item",
             {"rule": [{"name": "R", "subject": ["ok", "/a(/"], "label": "R"}]},
             'rules.toml: rule 1 ("R"): subject[2]: bad regex /a(/: '
             "missing ), unterminated subpattern at position 1"),
            ("unknown regex flag",
             {"rule": [{"name": "R", "subject": "/receipt/g", "label": "R"}]},
             'rules.toml: rule 1 ("R"): subject: unknown regex flag \'g\' in /receipt/g; '
             "use i, m, s or x (to match a slash literally, write it inside a regex as \\/)"),
            ("size with a unit that is not one",
             {"rule": [{"name": "R", "subject": "a", "label": "x"}] * 4
              + [{"name": "Old and big", "larger_than": "5 TB", "trash": True}]},
             'rules.toml: rule 5 ("Old and big"): larger_than: expected a size like 500K, '
             '5M, 5 MB or 1G, got "5 TB"'),
            ("age unit, unnamed rule",
             {"rule": [{"subject": "a", "label": "x"}, {"subject": "a", "label": "x"},
                       {"older_than": "1yr", "trash": True}]},
             'rules.toml: rule 3: older_than: expected a number and unit d, w, m or y '
             '(e.g. "1y"), got "1yr"'),
            ("label wrong type",
             {"rule": [{"name": "R", "subject": "a", "label": 3}]},
             'rules.toml: rule 1 ("R"): label: expected a string or a list of strings, got 3'),
            ("label with a line break",
             {"rule": [{"name": "R", "subject": "a", "label": ["ok", "a\nb"]}]},
             'rules.toml: rule 1 ("R"): label[2]: "a\\nb" contains a line break or NUL character'),
            ("empty label list",
             {"rule": [{"name": "R", "subject": "a", "label": []}]},
             'rules.toml: rule 1 ("R"): label: expected a string or a list of strings, '
             "got an empty list"),
            ("missing rule list", {"account": {}},
             'rules.toml: no rules; add at least one [[rule]] table (TOML) or a "rule" list (JSON)'),
            ("empty rule list", {"rule": []},
             "rules.toml: rule: the list is empty; add at least one rule"),
            ("single [rule] table", {"rule": {"subject": "a", "label": "x"}},
             "rules.toml: rule: expected a list of rule tables; in TOML write [[rule]] "
             "with double brackets"),
            ("rule is not a table", {"rule": ["Receipts"]},
             'rules.toml: rule 1: expected a table, got "Receipts"'),
            ("unknown top-level key", {"rules": []},
             "rules.toml: unknown key 'rules'; did you mean 'rule'?"),
            ("continue not bool",
             {"rule": [{"name": "Bank", "from": "a", "star": True, "continue": "yes"}]},
             'rules.toml: rule 1 ("Bank"): continue: expected true or false, got "yes"'),
            ("nested wrong type",
             {"rule": [{"name": "Bank", "any": [{"subject": "a"}, {"from": 5}], "star": True}]},
             'rules.toml: rule 1 ("Bank"): any[2].from: expected a string or a list of '
             "strings, got 5"),
            ("nested unknown key",
             {"rule": [{"name": "Bank", "all": [{"subject": "a"}, {"form": "x"}], "star": True}]},
             'rules.toml: rule 1 ("Bank"): all[2]: unknown key \'form\'; did you mean \'from\'?'),
            ("action inside not",
             {"rule": [{"name": "R", "subject": "a", "not": {"label": "x"}, "star": True}]},
             'rules.toml: rule 1 ("R"): not: \'label\' is not a condition; put it at the top '
             "level of the rule (only conditions go inside any / all / not)"),
            ("deeply nested bad size",
             {"rule": [{"name": "R", "not": {"any": [{"larger_than": "big"}]}, "star": True}]},
             'rules.toml: rule 1 ("R"): not.any[1].larger_than: expected a size like 500K, '
             '5M, 5 MB or 1G, got "big"'),
            ("empty any",
             {"rule": [{"name": "R", "any": [], "star": True}]},
             'rules.toml: rule 1 ("R"): any: expected a non-empty list of condition tables, got []'),
            ("no condition",
             {"rule": [{"name": "R", "label": "x"}]},
             'rules.toml: rule 1 ("R"): no condition; add at least one of '
             + ", ".join(gc.CONDITION_KEYS)),
            ("no action",
             {"rule": [{"name": "R", "subject": "x", "archive": False}]},
             'rules.toml: rule 1 ("R"): no action; add at least one of '
             + ", ".join(gc.ACTION_KEYS) + " (set to a label, a folder or true)"),
            ("move and trash",
             {"rule": [{"name": "R", "subject": "x", "move": "Old", "trash": True}]},
             'rules.toml: rule 1 ("R"): \'move\' and \'trash\' contradict each other; keep one, '
             "or split them into two rules"),
            ("move and archive",
             {"rule": [{"name": "R", "subject": "x", "move": "Old", "archive": True}]},
             'rules.toml: rule 1 ("R"): \'move\' and \'archive\' contradict each other; keep one, '
             "or split them into two rules"),
            ("bool condition",
             {"rule": [{"name": "R", "has_attachment": "yes", "star": True}]},
             'rules.toml: rule 1 ("R"): has_attachment: expected true or false, got "yes"'),
            ("header value type",
             {"rule": [{"name": "R", "header": {"X-Spam": 1}, "star": True}]},
             'rules.toml: rule 1 ("R"): header.X-Spam: expected true (present), false (absent), '
             "a string or a list of strings, got 1"),
            ("header name with space",
             {"rule": [{"name": "R", "header": {"List Id": True}, "star": True}]},
             'rules.toml: rule 1 ("R"): header.List Id: "List Id" is not a header name '
             "(letters, digits and - _ . and the like; no spaces, ':' or brackets)"),
            ("empty plain matcher",
             {"rule": [{"name": "R", "subject": "", "star": True}]},
             'rules.toml: rule 1 ("R"): subject: expected a string or a list of strings, '
             "got an empty string"),
            ("name not a string",
             {"rule": [{"name": 7, "subject": "a", "star": True}]},
             "rules.toml: rule 1: name: expected a string, got 7"),
            ("top level not a table", ["rule"],
             'rules.toml: expected a table with a \'rule\' list at the top level, got ["rule"]'),
        ]
        for label, doc, expected in cases:
            with self.subTest(label):
                self.assert_error(doc, expected)

    def test_error_reports_account_key_and_expectation(self):
        rule = [{"subject": "a", "label": "x"}]
        cases = [
            ({"port": 0}, "rules.json: account.port: expected a whole number from 1 to 65535, got 0"),
            ({"port": True}, "rules.json: account.port: expected a whole number from 1 to 65535, got true"),
            ({"tls": "ssl"}, 'rules.json: account.tls: expected one of "implicit", "starttls", '
                             '"plaintext", got "ssl"'),
            ({"auth": "oauth"}, 'rules.json: account.auth: expected one of "password", "xoauth2", '
                                'got "oauth"'),
            ({"usr": "me"}, "rules.json: account: unknown key 'usr'; did you mean 'user'?"),
            ({"folders": "INBOX"}, 'rules.json: account.folders: expected a non-empty list of '
                                   'folder names, got "INBOX"'),
            ({"password_command": ["pass", 3]},
             "rules.json: account.password_command[2]: expected a string, got 3"),
            ({"user": 5}, "rules.json: account.user: expected a string, got 5"),
        ]
        for account, expected in cases:
            with self.subTest(account=account):
                self.assert_error({"rule": rule, "account": account}, expected, "rules.json")

    def test_account_returned_as_plain_dict_when_valid(self):
        account = {"user": "me@gmail.com", "host": "imap.gmail.com", "port": 993,
                   "tls": "implicit", "auth": "xoauth2", "password_command": ["pass", "gmail"],
                   "cafile": "/etc/ca.pem", "folders": ["INBOX", "Work"]}
        ruleset = parse_rules({"rule": [{"subject": "a", "label": "x"}], "account": account}, "r.json")
        self.assertEqual(ruleset.account, account)
        self.assertEqual(parse_rules({"rule": [{"subject": "a", "label": "x"}]}).account, {})


class HeaderNameValidationTest(TempDirMixin, unittest.TestCase):
    def test_only_names_that_are_safe_imap_atoms_pass_check(self):
        tmp = self.make_dir()
        for name, ok in (("X-Foo)", False), ("X{3}", False), ("X[1]", False), ('X"y', False),
                         ("X*", False), ("X%", False), ("X\\y", False), ("List Id", False),
                         ("X-Mailer", True), ("List-Unsubscribe", True), ("X_Spam.Flag", True),
                         ("DKIM-Signature", True)):
            with self.subTest(name=name):
                path = os.path.join(tmp, "rules.json")
                with open(path, "w") as handle:
                    json.dump({"rule": [{"name": "R", "header": {name: True}, "star": True}]},
                              handle)
                code, out, err = run_cli("check", path)
                self.assertEqual(code, 0 if ok else gc.EXIT_USAGE, err)
                if not ok:
                    self.assertIn("is not a header name", err)


class AllRuleErrorsAtOnceTest(unittest.TestCase):
    SEVEN_MISTAKES = {
        "rules": [],
        "rule": [
            {"name": "Receipts", "subject": "receipt", "lable": "Receipts"},
            {"name": "Big", "larger_than": "5 TB", "trash": "yes"},
            {"name": "Bad regex", "subject": "/a(b/", "star": True, "continue": 1},
            {"name": "", "from": "x", "label": "X"},
            {"name": "Fine", "from": "y", "label": "Y"},
        ],
        "account": {"usr": "me", "port": 99999},
    }

    def test_every_problem_of_the_file_in_one_error_one_line_each(self):
        with self.assertRaises(RulesError) as caught:
            parse_rules(self.SEVEN_MISTAKES, "rules.toml")
        self.assertEqual(str(caught.exception).splitlines(), [
            "rules.toml: unknown key 'rules'; did you mean 'rule'?",
            'rules.toml: rule 1 ("Receipts"): unknown key \'lable\'; did you mean \'label\'?',
            'rules.toml: rule 2 ("Big"): larger_than: expected a size like 500K, 5M, 5 MB or 1G, '
            'got "5 TB"',
            'rules.toml: rule 2 ("Big"): trash: expected true or false, got "yes"',
            'rules.toml: rule 3 ("Bad regex"): subject: bad regex /a(b/: missing ), unterminated '
            'subpattern at position 1',
            'rules.toml: rule 3 ("Bad regex"): continue: expected true or false, got 1',
            "rules.toml: rule 4: name: expected a string, got an empty string",
            "rules.toml: account: unknown key 'usr'; did you mean 'user'?",
            "rules.toml: account.port: expected a whole number from 1 to 65535, got 99999",
        ])

    def test_unknown_key_without_a_close_match_lists_the_keys(self):
        with self.assertRaises(RulesError) as caught:
            parse_rules({"rule": [{"subject": "a", "label": "x", "zzzzzz": 1}]}, "r.json")
        self.assertEqual(str(caught.exception), "r.json: rule 1: unknown key 'zzzzzz' (known "
                                                "keys: " + ", ".join(gc.RULE_KEYS) + ")")

    def test_check_prints_each_problem_on_its_own_line_and_exits_2(self):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "rules.json")
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(self.SEVEN_MISTAKES, fh)
            code, out, err = run_cli("check", path)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertEqual(out, "")
        lines = err.splitlines()
        self.assertEqual(len(lines), 9, err)
        for line in lines:
            self.assertTrue(line.startswith(f"gmail_classify: {path}: "), line)


class DeepRulesTest(TempDirMixin, unittest.TestCase):
    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.make_dir(), name)
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_deep_or_huge_rules_exit_2_with_line_and_column(self):
        cases = [("rules.toml", 'x = ' + "[" * 100000 + "]" * 100000 + "\n",
                  "line 1, column 69", "nested more than 64 levels"),
                 ("rules.toml", '[[rule]]\nname = "a"\nx = ' + "{a=" * 5000 + "1" + "}" * 5000 + "\n",
                  "line 3, column ", "nested more than 64 levels"),
                 ("rules.toml", "[" + ".".join(["a"] * 5000) + "]\n", "line 1, column 1", "nested"),
                 ("rules.toml", "a." * 5000 + "b = 1\n", "line 1, column 1", "nested"),
                 ("rules.toml", "[[rule]]\nolder_than_days = " + "9" * 5000 + "\n",
                  "line 2, column 19", "more than 40 digits"),
                 ("rules.json", '{"rule": ' + "[" * 100000 + "]" * 100000 + "}",
                  "line 1, column ", "nested more than 64 levels"),
                 ("rules.json", '{"rule": [{"name": "x", "older_than_days": ' + "9" * 5000 + "}]}",
                  "line 1, column 44", "more than 40 digits"),
                 ("rules.json", '{"rule": [{"larger_than": Infinity}]}', "line 1, column 27",
                  "Infinity")]
        for name, text, where, message in cases:
            with self.subTest(text=text[:40]):
                path = self.write(name, text)
                code, out, err = run_cli("check", path)
                self.assertEqual(code, gc.EXIT_USAGE, err)
                self.assertEqual(err.count("\n"), 1, err[:300])
                self.assertIn("%s: %s" % (path, where), err)
                self.assertIn(message, err)

    def test_honest_nesting_still_loads(self):
        doc = {"rule": [{"name": "deep", "label": "D", "any": [{"all": [{"not": {"any": [
            {"subject": "x"}, {"from": "y"}]}}]}]}]}
        path = self.write("rules.json", json.dumps(doc))
        self.assertEqual(len(gc.load_rules(path).rules), 1)

    def test_watch_keeps_the_old_rules_when_the_new_file_is_too_deep(self):
        path = self.write("rules.json", json.dumps({"rule": [{"name": "a", "subject": "x",
                                                               "label": "A"}]}))
        reloader = gc._RulesReloader(path, gc.load_rules(path))
        with open(path, "w") as handle:
            handle.write('{"rule": ' + "[" * 100000 + "]" * 100000 + "}")
        with self.assertLogs("gmail_classify", "ERROR") as logs:
            reloader.reload()
        self.assertEqual([rule.name for rule in reloader.rules.rules], ["a"])
        self.assertIn("old rules stay", logs.output[0])
        self.assertIn("nested more than 64 levels", logs.output[0])

    def test_tokens_and_the_client_file_are_bounded_too(self):
        path = self.write("client.json", '{"installed": ' + "[" * 100000 + "]" * 100000 + "}")
        with self.assertRaises(gc.RulesError) as caught:
            gc.load_client_secret_file(path)
        self.assertIn("nested more than 64 levels", str(caught.exception))


class UntrustedFilesTest(FakeServerTest):
    """A rules file that names a program to run must be the user's alone to change."""

    def rules_file(self, directory: str, mode: int) -> Tuple[str, str]:
        os.makedirs(directory, exist_ok=True)
        marker = os.path.join(self.tmp, "pwned")
        path = os.path.join(directory, "rules.toml")
        with open(path, "w") as handle:
            handle.write('[account]\npassword_command = ["/bin/sh", "-c", "touch %s; echo %s"]\n'
                         '[[rule]]\nsubject = "x"\nlabel = "X"\n' % (marker, PASSWORD))
        os.chmod(path, mode)
        return path, marker

    def run_with(self, path: str) -> Tuple[int, str, str]:
        return run_cli("run", "--rules", path, "--user", USER, "--host", "127.0.0.1",
                       "--port", str(self.server.port), "--plaintext", "--retries", "0")

    def test_a_rules_file_others_can_write_does_not_run_its_password_command(self):
        for mode in (0o666, 0o620, 0o602):
            with self.subTest(mode=oct(mode)):
                path, marker = self.rules_file(os.path.join(self.tmp, "r%o" % mode), mode)
                code, out, err = self.run_with(path)
                self.assertEqual(code, gc.EXIT_USAGE)
                self.assertEqual(err, "gmail_classify: %s can be changed by other users (group or "
                                 "others may write it); run 'chmod go-w %s'; refusing a rules "
                                 "file that holds password_command\n" % (path, path))
                self.assertFalse(os.path.exists(marker))
        path, marker = self.rules_file(os.path.join(self.tmp, "fine"), 0o644)
        self.assertEqual(self.run_with(path)[0], 0)
        self.assertTrue(os.path.exists(marker))

    def test_a_directory_above_it_that_others_can_write_is_refused_unless_sticky(self):
        shared = os.path.join(self.tmp, "shared")
        path, marker = self.rules_file(os.path.join(shared, "mine"), 0o600)
        os.chmod(shared, 0o777)
        code, _, err = self.run_with(path)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("%s lies in %s, which other users can write" % (path, shared), err)
        self.assertEqual(err.count("\n"), 1)
        self.assertFalse(os.path.exists(marker))
        os.chmod(shared, 0o1777)      # like /tmp: others cannot rename what is not theirs
        self.assertEqual(self.run_with(path)[0], 0)
        self.assertTrue(os.path.exists(marker))

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0, "needs root to chown")
    def test_a_file_or_directory_of_another_user_is_refused(self):
        path, marker = self.rules_file(os.path.join(self.tmp, "theirs"), 0o644)
        os.chown(path, 65534, -1)
        code, _, err = self.run_with(path)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("%s belongs to another user (uid 65534)" % path, err)
        os.chown(path, 0, -1)
        os.chown(os.path.dirname(path), 65534, -1)
        code, _, err = self.run_with(path)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("which belongs to another user (uid 65534)", err)
        self.assertFalse(os.path.exists(marker))

    def test_a_symlink_is_judged_by_where_it_points(self):
        shared = os.path.join(self.tmp, "open")
        target, marker = self.rules_file(shared, 0o644)
        os.chmod(shared, 0o777)
        link = os.path.join(self.tmp, "rules.toml")
        os.symlink(target, link)
        code, _, err = self.run_with(link)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("which other users can write", err)
        self.assertFalse(os.path.exists(marker))


# --- Rules files: a small TOML reader, the same on every Python --------------------------


# parse_toml is what reads every .toml rules file, on every Python. Each valid document
# below has its expected value written out, so the table means something on 3.9 too;
# where tomllib exists it must agree exactly, and must reject what parse_toml rejects.

TOML_VALID = [
    ("scalars", 'a = 1\nb = -17\nc = +0\nd = 1_000\ne = true\nf = false\n'
                'h = 0x1F\no = 0o17\nbi = 0b101\n',
     {"a": 1, "b": -17, "c": 0, "d": 1000, "e": True, "f": False, "h": 31, "o": 15, "bi": 5}),
    ("basic string escapes", 'a = "tab\\there \\"q\\" \\\\ \\u00e9\\U0001F600 \\b\\f\\r\\n"',
     {"a": 'tab\there "q" \\ \u00e9\U0001F600 \b\f\r\n'}),
    ("literal string keeps backslashes", "a = '/order #?\\d{5}/i'", {"a": "/order #?\\d{5}/i"}),
    ("empty strings", "a = \"\"\nb = ''", {"a": "", "b": ""}),
    ("multi-line basic", 'a = """\nline one\n  line two\\\n     joined"""',
     {"a": "line one\n  line two" "joined"}),
    ("multi-line basic keeps quotes", 'a = """say ""hi"" """""', {"a": 'say ""hi"" ""'}),
    ("multi-line literal", "a = '''\nno \\escapes\n'here''''", {"a": "no \\escapes\n'here'"}),
    ("CRLF line ends", 'a = 1\r\nb = """x\r\ny"""\r\n# c\r\n', {"a": 1, "b": "x\ny"}),
    ("quoted and dotted keys", '"List-Unsubscribe" = true\n\'lit.key\' = 1\n'
                               'a . b."c d" = 2\n"" = 3\n',
     {"List-Unsubscribe": True, "lit.key": 1, "a": {"b": {"c d": 2}}, "": 3}),
    ("arrays over lines with comments", 'a = [\n  "x", # first\n  "y",\n\n]\nb = []\n'
                                        'c = [[1, 2], ["m", {k = 1}]]',
     {"a": ["x", "y"], "b": [], "c": [[1, 2], ["m", {"k": 1}]]}),
    ("inline tables", 'h = { "List-Id" = true, x.y = "z" }\ne = {}\n'
                      'n = { a = { b = [1,\n 2] } }',
     {"h": {"List-Id": True, "x": {"y": "z"}}, "e": {}, "n": {"a": {"b": [1, 2]}}}),
    ("tables and sub-tables", '[account]\nuser = "me"\n[a.b]\nc = 1\n[a]\nd = 2\n',
     {"account": {"user": "me"}, "a": {"b": {"c": 1}, "d": 2}}),
    ("sub-table under a dotted key", '[a]\nb.c = 1\n[a.b.d]\ne = 2\n',
     {"a": {"b": {"c": 1, "d": {"e": 2}}}}),
    ("arrays of tables", '[[rule]]\nname = "A"\n[rule.not]\nfrom = "x"\n[[rule]]\nname = "B"\n'
                         '[[rule.any]]\nsubject = "s"\n',
     {"rule": [{"name": "A", "not": {"from": "x"}}, {"name": "B", "any": [{"subject": "s"}]}]}),
    ("comments and blank lines", "# top\n\n   a = 1   # trailing\n\t[t] # header\n",
     {"a": 1, "t": {}}),
    ("unicode everywhere", '"Prüfung" = "Bestellbestätigung ✓"\nλ = 1\n'.replace("λ", '"λ"'),
     {"Prüfung": "Bestellbestätigung ✓", "λ": 1}),
]

TOML_INVALID = [
    # (document, message, line, column)
    ('a = 1\na = 2', "duplicate key 'a'", 2, 1),
    ('[a]\n[a]', "[a]: this table is already defined", 2, 1),
    ('a.b = 1\n[a]', "[a]: this table is already defined", 2, 1),
    ('[a.b]\nx = 1\n[a]\nb.y = 2', "'b' is already defined; a dotted key cannot add to it", 4, 1),
    ('a = { x = 1 }\na.y = 2', "'a' is already defined; a dotted key cannot add to it", 2, 1),
    ('a = { x = 1 }\n[a]', "[a]: this table is already defined", 2, 1),
    ('a = [1]\n[[a]]', "[[a]]: 'a' is already defined as something other than an array of "
                       "tables", 2, 1),
    ('[[a]]\n[a]', "[a]: this table is already defined", 2, 1),
    ('a = 1\n[a.b]', "[a.b]: 'a' is already defined as a value", 2, 1),
    ('a = { b = 1, }', "expected a key (letters, digits, '_' and '-', or a quoted string), "
                       "found '}'", 1, 14),
    ('a = { b = 1\n}', "expected ',' or '}' in the inline table (which must fit on one line), "
                       "found the end of the line", 1, 12),
    ('label = Receipts', 'expected a value, found Receipts; text needs quotes: "Receipts"', 1, 9),
    ('larger_than = 5M', 'expected a value, found 5M; text needs quotes: "5M"', 1, 15),
    ('star = True', "expected a value, found True; TOML writes true in lower case", 1, 8),
    ('subject =', "expected a value, found the end of the file", 1, 10),
    ('a = 01', "invalid integer 01 (no leading zeros; '_' only between digits)", 1, 5),
    ('a = 1__0', "invalid integer 1__0 (no leading zeros; '_' only between digits)", 1, 5),
    ('a = "\\d+"', "unknown escape \\d; in a regex write the string in 'single quotes' so "
                   "backslashes stay as typed", 1, 6),
    ('a = "\\uD800"', "\\u must be followed by 4 hex digits of a Unicode scalar value", 1, 6),
    ('a = "\\u12"', "\\u must be followed by 4 hex digits of a Unicode scalar value", 1, 6),
    ('a = "open\nb = 1', "unterminated string", 1, 5),
    ("a = 'open", "unterminated string", 1, 5),
    ('x = 1\na = """never closed', "unterminated multi-line string", 2, 5),
    ("a = '''x''''''", "too many quotes at the end of a multi-line string", 1, 9),
    ('a = "tab\x01"', "control character in a string; write it as an escape such as \\t or "
                      "\\u0001", 1, 9),
    ('# bell \x07', "control character in a comment", 1, 8),
    ('a = 1 2', "expected the end of the line after a value, found '2'; text with spaces "
                "needs quotes: \"1 2\"", 1, 7),
    ('larger_than = 5 MB # big', "expected the end of the line after a value, found 'M'; "
                                 "text with spaces needs quotes: \"5 MB\"", 1, 17),
    ('a = "x" y', "expected the end of the line after a value, found 'y'", 1, 9),
    ('a = [1 2]', "expected ',' or ']' in the array, found '2'", 1, 8),
    ('[a', "expected ']' to close the table header, found the end of the file", 1, 3),
    ('[[a]\nx = 1', "expected ']]' to close the table header, found ']'", 1, 4),
    ('[a] x = 1', "expected the end of the line after a table header, found 'x'", 1, 5),
    ('a b = 1', "expected '=' after the key 'a', found 'b'", 1, 3),
    ('= 1', "expected a key (letters, digits, '_' and '-', or a quoted string), found '='", 1, 1),
    ('"""k""" = 1', "expected a key (letters, digits, '_' and '-', or a quoted string), "
                    "found '\"'", 1, 1),
    ('a = 1\r', "expected the end of the line after a value, found '\\r'", 1, 6),
]

TOML_UNSUPPORTED = [
    # tomllib accepts these; a rules file never needs them, so the reader refuses by name.
    ('d = 2024-01-31', 'dates and times are not supported here; write 2024-01-31 as a '
                       'string: "2024-01-31"', 1, 5, _dtm.date),
    ('d = 1979-05-27T07:32:00Z', 'dates and times are not supported here; write '
                                 '1979-05-27T07:32:00Z as a string: "1979-05-27T07:32:00Z"',
     1, 5, _dtm.datetime),
    ('t = 07:32:00', 'dates and times are not supported here; write 07:32:00 as a string: '
                     '"07:32:00"', 1, 5, _dtm.time),
    ('f = 1.5', 'floating-point numbers are not supported here; use a whole number, or a '
                'string such as "1.5"', 1, 5, float),
    ('f = 5e3', 'floating-point numbers are not supported here; use a whole number, or a '
                'string such as "5e3"', 1, 5, float),
    ('f = -inf', 'floating-point numbers are not supported here; use a whole number, or a '
                 'string such as "-inf"', 1, 5, float),
]


class TomlReaderTest(unittest.TestCase):
    def test_valid_documents_read_as_expected(self):
        for label, text, expected in TOML_VALID:
            with self.subTest(label):
                self.assertEqual(gc.parse_toml(text), expected)
                if tomllib is not None:
                    self.assertEqual(tomllib.loads(text), expected)

    def test_invalid_documents_name_line_and_column(self):
        for text, message, line, column in TOML_INVALID:
            with self.subTest(text):
                with self.assertRaises(gc.TOMLError) as caught:
                    gc.parse_toml(text)
                error = caught.exception
                self.assertEqual((error.msg, error.lineno, error.colno), (message, line, column))
                self.assertEqual(str(error), f"{message} (at line {line}, column {column})")
                self.assertIsInstance(error, ValueError)
                if tomllib is not None:
                    with self.assertRaises(tomllib.TOMLDecodeError):
                        tomllib.loads(text)

    def test_dates_times_and_floats_are_refused_by_name(self):
        for text, message, line, column, tomllib_type in TOML_UNSUPPORTED:
            with self.subTest(text):
                with self.assertRaises(gc.TOMLError) as caught:
                    gc.parse_toml(text)
                error = caught.exception
                self.assertEqual((error.msg, error.lineno, error.colno), (message, line, column))
                if tomllib is not None:
                    self.assertIsInstance(next(iter(tomllib.loads(text).values())), tomllib_type)

    @unittest.skipIf(tomllib is None, "tomllib needs Python 3.11+")
    def test_agrees_with_tomllib_on_mutated_documents(self):
        # Every valid document above, plus the starter and example rules, damaged one
        # character at a time (deleted, duplicated, or replaced by a character TOML gives
        # meaning to). Whatever tomllib makes of each, parse_toml must agree: reject
        # what it rejects, and read the same value from the rest, except for the floats
        # and dates it refuses on purpose.
        corpus = [text for _, text, _ in TOML_VALID] + [EXAMPLE_TOML, STARTER_RULES_TOML[-1500:]]
        rng = random.Random(11)
        alphabet = "\"'[]{}=.,#\n \\tf01_-+:e"
        checked = 0
        for _ in range(1500):
            text = rng.choice(corpus)
            at = rng.randrange(len(text))
            change = rng.randrange(3)
            if change == 0:
                text = text[:at] + text[at + 1:]
            elif change == 1:
                text = text[:at] + text[at] + text[at:]
            else:
                text = text[:at] + rng.choice(alphabet) + text[at + 1:]
            try:
                expected = tomllib.loads(text)
            except tomllib.TOMLDecodeError:
                with self.assertRaises(gc.TOMLError, msg=repr(text)):
                    gc.parse_toml(text)
                checked += 1
                continue
            if _has_float_or_date(expected):
                with self.assertRaises(gc.TOMLError, msg=repr(text)):
                    gc.parse_toml(text)
                continue
            self.assertEqual(gc.parse_toml(text), expected, msg=repr(text))
            checked += 1
        self.assertGreater(checked, 1250)

    def test_rules_files_agree_with_tomllib(self):
        self.assertEqual(gc.parse_toml(EXAMPLE_TOML), EXAMPLE_DOC)
        self.assertEqual(gc.parse_toml(STARTER_RULES_TOML), json.loads(STARTER_RULES_JSON))
        if tomllib is not None:
            self.assertEqual(tomllib.loads(STARTER_RULES_TOML), json.loads(STARTER_RULES_JSON))

    def test_a_rules_file_error_names_the_file_line_and_column(self):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "rules.toml")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write('[[rule]]\nname = "Old"\nolder_than = 2024-01-01\ntrash = true\n')
            with self.assertRaises(RulesError) as caught:
                load_rules(path)
        self.assertEqual(str(caught.exception),
                         f'{path}: line 3, column 14: invalid TOML: dates and times are not '
                         'supported here; write 2024-01-01 as a string: "2024-01-01"')

    def test_module_reads_toml_and_init_writes_it_without_tomllib(self):
        # What a Python 3.9 or 3.10 user runs, wherever the suite runs: tomllib blocked.
        with tempfile.TemporaryDirectory() as folder:
            script = ("import sys; sys.modules['tomllib'] = None\n"
                      "import gmail_classify as gc\n"
                      "sys.exit(gc.main(['init']) or gc.main(['check', sys.argv[1]]))\n")
            env = dict(os.environ, XDG_CONFIG_HOME=folder)
            done = subprocess.run([sys.executable, "-c", script,
                                   os.path.join(folder, "gmail_classify", "rules.toml")],
                                  cwd=os.path.dirname(os.path.abspath(gc.__file__)), env=env,
                                  capture_output=True, text=True, timeout=60)
            self.assertEqual(done.returncode, 0, done.stderr)
            with open(os.path.join(folder, "gmail_classify", "rules.toml"), encoding="utf-8") as fh:
                self.assertEqual(fh.read(), STARTER_RULES_TOML)
        self.assertIn("5 rules", done.stdout)


def _has_float_or_date(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_float_or_date(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float_or_date(v) for v in value)
    return isinstance(value, (float, _dtm.date, _dtm.time))


# --- Rules files: loading and the built-in rules -----------------------------------------


class LoadRulesTest(TempDirMixin, unittest.TestCase):
    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.make_dir(), name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path

    def test_error_gives_line_and_column_for_invalid_toml(self):
        path = self.write("rules.toml", '[[rule]]\nname = "x"\nsubject = \n')
        with self.assertRaises(RulesError) as caught:
            load_rules(path)
        self.assertEqual(str(caught.exception), f"{path}: line 3, column 11: invalid TOML: "
                                                "expected a value, found the end of the line")

    def test_error_gives_line_and_column_for_invalid_json(self):
        path = self.write("rules.json", '{"rule": [\n  {"name": "x" "label": 1}\n]}')
        with self.assertRaises(RulesError) as caught:
            load_rules(path)
        self.assertEqual(str(caught.exception),
                         f"{path}: line 2, column 16: invalid JSON: Expecting ',' delimiter")

    def test_error_names_file_when_missing_or_wrong_type(self):
        folder = self.make_dir()
        cases = [
            (os.path.join(folder, "nope.json"), "no such file"),
            (os.path.join(folder, "rules.yaml"), "unknown rules file type; name it *.toml or *.json"),
            (folder + os.sep + "dir.json", "no such file"),
        ]
        for path, expected in cases:
            with self.subTest(path=path):
                with self.assertRaises(RulesError) as caught:
                    load_rules(path)
                self.assertEqual(str(caught.exception), f"{path}: {expected}")

    def test_error_when_rules_file_is_a_directory(self):
        path = os.path.join(self.make_dir(), "rules.json")
        os.mkdir(path)
        with self.assertRaises(RulesError) as caught:
            load_rules(path)
        self.assertTrue(str(caught.exception).startswith(f"{path}: cannot read: "))

    def test_validation_error_names_the_file_path(self):
        doc = {"rule": [{"name": "Bad", "subject": "a", "lable": "x"}]}
        path = self.write("rules.json", json.dumps(doc))
        with self.assertRaises(RulesError) as caught:
            load_rules(path)
        self.assertTrue(str(caught.exception).startswith(f'{path}: rule 1 ("Bad"): unknown key \'lable\''))

    def test_example_rules_load_from_json(self):
        path = self.write("rules.json", json.dumps(EXAMPLE_DOC))
        ruleset = load_rules(path)
        self.assertEqual(ruleset.source, path)
        self.assertEqual([r.name for r in ruleset.rules],
                         ["Receipts", "Newsletters", "GitHub", "Bank", "Old and big"])
        self.assertEqual([r.position for r in ruleset.rules], [1, 2, 3, 4, 5])
        self.assertEqual(ruleset.rules, parse_rules(EXAMPLE_DOC).rules)

    def test_example_rules_same_from_toml_and_json(self):
        path = self.write("rules.toml", EXAMPLE_TOML)
        self.assertEqual(load_rules(path).rules, parse_rules(EXAMPLE_DOC).rules)


def accounts_doc(*tables: Dict[str, Any], rules: Optional[list] = None) -> Dict[str, Any]:
    """A rules document with [[account]] tables (EXAMPLE_DOC's rules unless given)."""
    return {"rule": rules or EXAMPLE_DOC["rule"], "account": list(tables)}


class AccountTablesTest(TempDirMixin, unittest.TestCase):
    """[[account]] tables: what each account runs, and the tables that are refused."""

    def setUp(self):
        self.tmp = self.make_dir()

    def test_each_account_runs_its_own_rules_with_its_table_as_account(self):
        rules = parse_rules(accounts_doc(
            {"name": "home", "user": "a@example.com", "rules": ["GitHub", "Receipts"]},
            {"name": "work", "user": "b@example.com", "folders": ["INBOX", "Work"]}), "r.json")
        self.assertEqual(rules.account, {})
        home = rules.for_account("home")
        self.assertEqual([r.name for r in home.rules], ["Receipts", "GitHub"])   # file order
        self.assertEqual(home.account["user"], "a@example.com")
        work = rules.for_account("work")
        self.assertEqual([r.name for r in work.rules], [r["name"] for r in EXAMPLE_DOC["rule"]])
        self.assertEqual(work.account["folders"], ["INBOX", "Work"])
        self.assertEqual((home.accounts, work.tests), ((), ()))
        with self.assertRaises(gc.RulesError):
            rules.for_account("nope")

    def test_a_single_account_table_works_as_today(self):
        rules = parse_rules({"rule": EXAMPLE_DOC["rule"], "account": {"user": "a@example.com"}})
        self.assertEqual((rules.account, rules.accounts), ({"user": "a@example.com"}, ()))

    def test_an_account_may_name_another_rules_file_relative_to_this_one(self):
        other = os.path.join(self.tmp, "other.json")
        with open(other, "w") as handle:
            json.dump({"rule": [{"name": "Only", "subject": "x", "label": "X"}]}, handle)
        main = os.path.join(self.tmp, "main.json")
        with open(main, "w") as handle:
            json.dump(accounts_doc({"name": "a", "user": "a@x", "rules": "other.json"},
                                   {"name": "b", "user": "b@x"}), handle)
        rules = gc.load_rules(main)
        self.assertEqual([r.name for r in rules.for_account("a").rules], ["Only"])
        self.assertEqual(rules.for_account("a").account["user"], "a@x")
        with open(other, "w") as handle:
            json.dump(accounts_doc({"name": "c", "user": "c@x"}), handle)
        with self.assertRaisesRegex(gc.RulesError, "may not hold"):
            gc.load_rules(main)

    def test_bad_tables_are_each_one_line_and_exit_2(self):
        cases = {
            "no name": [{"user": "a@x"}],
            "two tables with one name": [{"name": "a", "user": "a@x"}, {"name": "a", "user": "b@x"}],
            "both read IMAP_PASSWORD_WORK_MAIL": [{"name": "work mail", "user": "a@x"},
                                                  {"name": "Work-Mail", "user": "b@x"}],
            "both are A@x on IMAP.gmail.com": [{"name": "a", "user": "a@x"},
                                               {"name": "b", "user": "A@x", "port": 993,
                                                "host": "IMAP.gmail.com"}],
            "no rule named \"Nope\"": [{"name": "a", "user": "a@x", "rules": ["Nope"]}],
            "unknown key 'pasword_command'": [{"name": "a", "pasword_command": "x"}],
            "not a rules file": [{"name": "a", "rules": "other.txt"}],
        }
        for expected, tables in cases.items():
            with self.subTest(expected=expected):
                with self.assertRaises(gc.RulesError) as caught:
                    parse_rules(accounts_doc(*tables), "r.json")
                self.assertIn(expected, str(caught.exception))
                self.assertEqual(caught.exception.exit_code, gc.EXIT_USAGE)
        # Another port is another mailbox.
        parse_rules(accounts_doc({"name": "a", "user": "a@x", "host": "h"},
                                 {"name": "b", "user": "a@x", "host": "h", "port": 1143}))

    def test_variable_suffix(self):
        for name, suffix in (("work", "WORK"), ("Work mail", "WORK_MAIL"), ("a.b-c", "A_B_C"),
                             ("größe", "GR_SSE")):
            with self.subTest(name=name):
                self.assertEqual(gc.account_variable_suffix(name), suffix)


RULES_WITH_TESTS = {
    "rule": [
        {"name": "Receipts", "subject": "receipt", "label": "Receipts", "archive": True},
        {"name": "Lists", "list_id": "/./", "label": "Lists", "continue": True},
        {"name": "Query", "gmail_query": "category:social", "star": True},
        {"name": "Vendors", "from": "@", "label": "Vendors/{sender_domain}", "move": "Mail/{year}-{month}"},
    ],
    "test": [
        {"name": "receipt", "from": "shop@shop.example", "subject": "Your receipt",
         "expect_rules": ["Receipts"], "expect_actions": {"label": "Receipts", "archive": True}},
        {"list_id": "<dev.example.org>", "from": "Dev <dev@Lists.Example.ORG>",
         "date": "2023-05-02T10:00:00+00:00",
         "expect_rules": ["Lists", "Vendors"],
         "expect_actions": {"label": ["Lists", "Vendors/lists.example.org"],
                            "move": "Mail/2023-05"}},
        {"name": "nothing", "subject": "hi", "expect_rules": []},
    ],
}


class RuleTestTablesTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def write(self, doc: dict, name: str = "rules.json") -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(doc, handle)
        return path

    def failing_doc(self) -> dict:
        doc = json.loads(json.dumps(RULES_WITH_TESTS))
        doc["test"][0]["expect_rules"] = ["Lists"]
        doc["test"][1]["expect_actions"]["move"] = "Mail/2024-05"
        doc["test"].append({"name": "social", "subject": "x", "expect_rules": ["Query"]})
        return doc

    def test_passing_tests_pass_check(self):
        self.assertEqual(gc.run_rule_tests(gc.parse_rules(RULES_WITH_TESTS, "r.json")), [])
        code, out, err = run_cli("check", self.write(RULES_WITH_TESTS))
        self.assertEqual((code, err), (0, ""))
        self.assertIn("tests: 3 of 3 passed", out)

    def test_each_failure_is_one_line_and_check_exits_8(self):
        path = self.write(self.failing_doc())
        code, out, err = run_cli("check", path)
        self.assertEqual(code, gc.EXIT_RULE_TESTS)
        self.assertEqual(gc.EXIT_RULE_TESTS, 8)
        self.assertIn("tests: 1 of 4 passed", out)
        self.assertEqual(err.splitlines(), [
            f'gmail_classify: {path}: test 1 ("receipt"): expected rules [Lists], got [Receipts]',
            f"gmail_classify: {path}: test 2: expected actions: label Lists, label "
            f"Vendors/lists.example.org, move to Mail/2024-05; got: label Lists, label "
            f"Vendors/lists.example.org, move to Mail/2023-05",
            f'gmail_classify: {path}: test 4 ("social"): expected rules [Query], got []',
        ])

    def test_tests_from_an_eml_file_and_message_state(self):
        with open(os.path.join(self.tmp, "sample.eml"), "wb") as handle:
            handle.write(WITH_ATTACHMENT)
        doc = {"rule": [{"name": "Att", "has_attachment": True, "unread": True, "label": "A"},
                        {"name": "Keep", "has_label": "Keep", "starred": True, "size": None,
                         "label": "K"}],
               "test": [{"eml": "sample.eml", "unread": True, "expect_rules": ["Att"]},
                        {"eml": "sample.eml", "expect_rules": []},
                        {"subject": "x", "labels": ["Keep"], "starred": True, "size": "2M",
                         "expect_rules": ["Keep"]}]}
        del doc["rule"][1]["size"]
        doc["rule"][1]["larger_than"] = "1M"
        path = self.write(doc)
        code, out, err = run_cli("check", path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("tests: 3 of 3 passed", out)

    def test_bad_test_tables_are_rules_errors(self):
        table = [
            ({"subject": "x"}, 'test 1: no expect_rules'),
            ({"subject": "x", "expect_rules": ["Recipts"]},
             "test 1: expect_rules[1]: no rule named 'Recipts'; did you mean 'Receipts'?"),
            ({"subjcet": "x", "expect_rules": []}, "unknown key 'subjcet'; did you mean 'subject'?"),
            ({"eml": "a.eml", "subject": "x", "expect_rules": []}, "drop subject (or drop eml)"),
            ({"eml": "missing.eml", "expect_rules": []}, "cannot read"),
            ({"date": "last tuesday", "expect_rules": []}, "expected a date like"),
            ({"expect_rules": [], "expect_actions": {"lable": "x"}}, "unknown key 'lable'"),
            ({"name": "N", "subject": "a\nb", "expect_rules": []}, 'test 1 ("N"): subject:'),
        ]
        for test, expected in table:
            with self.subTest(expected):
                doc = {"rule": [{"name": "Receipts", "subject": "r", "label": "R"}], "test": [test]}
                with self.assertRaises(RulesError) as ctx:
                    gc.parse_rules(doc, "rules.json")
                self.assertIn(expected, str(ctx.exception))
                self.assertTrue(str(ctx.exception).startswith("rules.json: "))
        with self.assertRaises(RulesError):
            gc.parse_rules({"rule": [{"subject": "r", "label": "R"}], "test": {"x": 1}})

    def test_every_problem_is_reported_at_once_without_spurious_names(self):
        doc = {"rule": [{"name": "Good", "subject": "x", "label": "{yaer}"},
                        {"name": "Other", "subject": "y", "star": True}],
               "test": [{"subject": "x", "expect_rules": ["Good"]},
                        {"subject": "x", "expect_rules": [], "size": "big"},
                        {"expect_rules": ["Nope"]}]}
        with self.assertRaises(RulesError) as ctx:
            gc.parse_rules(doc, "rules.json")
        lines = str(ctx.exception).splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn('rule 1 ("Good"): label: unknown field {yaer}', lines[0])
        self.assertIn("test 2: size:", lines[1])
        doc["rule"][0]["label"] = "{year}"
        with self.assertRaises(RulesError) as ctx:
            gc.parse_rules(doc, "rules.json")
        lines = str(ctx.exception).splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("test 3: expect_rules[1]: no rule named 'Nope'", lines[1])

    def test_the_starter_file_shows_a_passing_test(self):
        self.assertIn("[[test]]", STARTER_RULES_TOML)
        self.assertEqual(len(builtin_rules().tests), 1)
        self.assertEqual(gc.run_rule_tests(builtin_rules()), [])
        path = os.path.join(self.tmp, "rules.json")
        code, _, err = run_cli("init", path)
        self.assertEqual((code, err), (0, ""))
        code, out, err = run_cli("check", path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("tests: 1 of 1 passed", out)


class TestMessageFilesTest(unittest.TestCase):
    """[[test]] eml reads regular files of a bounded size only."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def check_with(self, eml: str) -> Tuple[int, str, str]:
        path = os.path.join(self.tmp, "rules.json")
        with open(path, "w") as handle:
            json.dump({"rule": [{"name": "R", "subject": "x", "label": "X"}],
                       "test": [{"eml": eml, "expect_rules": []}]}, handle)
        return run_cli("check", path)

    def test_eml_that_is_not_a_regular_file_or_too_big_exits_2_naming_it(self):
        big = os.path.join(self.tmp, "big.eml")
        with open(big, "wb") as handle:
            handle.write(b"Subject: y\r\n\r\n")
            handle.truncate(gc.MAX_EML_BYTES + 1)       # sparse: costs no disk
        fifo = os.path.join(self.tmp, "pipe.eml")
        os.mkfifo(fifo)
        cases = [("/dev/zero", "/dev/zero: not a regular file"),
                 (fifo, fifo + ": not a regular file"),
                 (big, big + ": larger than 10 MiB")]
        for eml, message in cases:
            with self.subTest(eml=eml):
                started = time.monotonic()
                code, out, err = self.check_with(eml)
                self.assertEqual(code, gc.EXIT_USAGE)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn('test 1: eml: ' + message, err)
                self.assertLess(time.monotonic() - started, 5)
        with open(big, "r+b") as handle:
            handle.truncate(gc.MAX_EML_BYTES)
        self.assertEqual(self.check_with(big)[0], 0)

    def test_the_test_command_refuses_the_same_files(self):
        fifo = os.path.join(self.tmp, "pipe.eml")
        os.mkfifo(fifo)
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump({"rule": [{"name": "R", "subject": "x", "label": "X"}]}, handle)
        code, out, err = run_cli("test", rules, fifo)
        self.assertNotEqual(code, 0)
        self.assertIn(fifo + ": not a regular file", err)


# --- Rules files: writing ----------------------------------------------------------------


from xml.sax.saxutils import quoteattr


def filter_export(*filters: Sequence[Tuple[str, str]]) -> bytes:
    """A mailFilters.xml as Gmail's Settings -> Filters -> Export writes it."""
    entries = []
    for number, props in enumerate(filters, 1):
        lines = "".join(f"<apps:property name={quoteattr(name)} value={quoteattr(value)}/>\n"
                        for name, value in props)
        entries.append(f"<entry><category term='filter'></category><title>Mail Filter</title>"
                       f"<id>tag:mail.google.com,2008:filter:{number}</id>"
                       f"<updated>2024-03-01T10:00:00Z</updated><content></content>\n"
                       f"{lines}</entry>\n")
    return ("<?xml version='1.0' encoding='UTF-8'?><feed xmlns='http://www.w3.org/2005/Atom' "
            "xmlns:apps='http://schemas.google.com/apps/2006'>\n<title>Mail Filters</title>\n"
            "<id>tag:mail.google.com,2008:filters:1</id><updated>2024-03-01T10:00:00Z</updated>\n"
            "<author><name>Me</name><email>me@gmail.com</email></author>\n"
            + "".join(entries) + "</feed>\n").encode("utf-8")


# Every property Gmail exports, with the rule each filter must become.
SAMPLE_FILTERS = filter_export(
    [("from", "alerts@bank.example"), ("label", "Finanzen/Kontoauszüge"),
     ("shouldArchive", "true"), ("shouldMarkAsRead", "true"),
     ("sizeOperator", "s_sl"), ("sizeUnit", "s_smb")],                    # no size: ignored
    [("from", "alice@example.com OR bob@example.com"), ("to", "me+lists@gmail.com"),
     ("shouldStar", "true")],
    [("subject", '"Your order" OR Rechnung'), ("hasAttachment", "true"),
     ("label", "Receipts"), ("shouldTrash", "true"), ("shouldArchive", "true")],
    [("hasTheWord", "list:dev.example.org filename:pdf {invoice receipt} larger:2M"),
     ("doesNotHaveTheWord", 'spam OR "do not"'), ("excludeChats", "true"),
     ("label", "Work/Dev & Ops")],
    [("size", "5"), ("sizeOperator", "s_sl"), ("sizeUnit", "s_smb"), ("label", "Big")],
    [("from", "@newsletter.example"), ("size", "100"), ("sizeOperator", "s_ss"),
     ("sizeUnit", "s_skb"), ("label", "Small"), ("shouldNeverSpam", "true"),
     ("shouldAlwaysMarkAsImportant", "true")],
    [("from", "promo@shop.example"), ("smartLabelToApply", "^smartlabel_promo"),
     ("forwardTo", "me@elsewhere.example"), ("shouldNeverMarkAsImportant", "true")],
    [("subject", "-(café) <b>"), ("label", "{curly} \"quoted\"")],
    [("from", "x@y.example"), ("unknownThing", "1"), ("label", "X")],
)

SAMPLE_RULES = [
    {"name": "Gmail filter 1", "gmail_query": "from:alerts@bank.example",
     "from": "/(?<![\\w.+-])alerts@bank\\.example(?![\\w.-])/i",
     "label": "Finanzen/Kontoauszüge", "archive": True, "mark_read": True, "continue": True},
    {"name": "Gmail filter 2",
     "gmail_query": "from:(alice@example.com OR bob@example.com) to:me+lists@gmail.com",
     "star": True, "continue": True},
    {"name": "Gmail filter 3", "gmail_query": 'subject:("Your order" OR Rechnung) has:attachment',
     "subject": ["/(?<!\\w)Your\\s+order(?!\\w)/i", "/(?<!\\w)Rechnung(?!\\w)/i"],
     "has_attachment": True, "label": "Receipts", "trash": True, "continue": True},
    {"name": "Gmail filter 4",
     "gmail_query": '(list:dev.example.org filename:pdf {invoice receipt} larger:2M) '
                    '-{spam OR "do not"} -in:chats',
     "label": "Work/Dev & Ops", "continue": True},
    {"name": "Gmail filter 5", "gmail_query": "larger:5M", "larger_than": "5M",
     "label": "Big", "continue": True},
    {"name": "Gmail filter 6", "gmail_query": "from:@newsletter.example smaller:100K",
     "from": "/@newsletter\\.example(?![\\w.-])/i", "smaller_than": "100K",
     "label": "Small", "continue": True},
    {"name": "Gmail filter 8", "gmail_query": "subject:(-(café) <b>)",
     "label": "{{curly}} \"quoted\"", "continue": True},
]

SAMPLE_NOTES = [
    "filter 3: archive left out: it also trashes, which wins",
    "filter 6: left out shouldAlwaysMarkAsImportant (mark as important)",
    "filter 6: left out shouldNeverSpam (never send to spam)",
    "filter 7: left out forwardTo (forwarding; keep it as a filter in Gmail)",
    "filter 7: left out smartLabelToApply (a category; Gmail's tabs are not visible over IMAP)",
    "filter 7: left out shouldNeverMarkAsImportant (never mark as important)",
    "filter 7: skipped: none of its actions can be done over IMAP",
    "filter 9: skipped: unknown property unknownThing; left out whole so that it never acts "
    "on more mail than it does in Gmail",
]


class RulesWriterTest(unittest.TestCase):
    DOC = {
        "account": {"user": "me@example.com", "folders": ["INBOX", "Entwürfe"]},
        "rule": [
            {"name": 'Quotes " and \' and \\ back', "subject": ["/order #?\\d{5,}/i", "it's"],
             "label": ["A/B", "Ünïcödé ✓"], "continue": True},
            {"name": "Tables", "header": {"List-Id": True, "X-Odd.Header": "tab\there"},
             "any": [{"from": "@x.example"}, {"not": {"has_label": "Keep"}}],
             "larger_than": 5000, "star": True},
            {"name": "Long list", "subject": [f"word number {i}" for i in range(12)],
             "move": "Archive/{year}"},
            {"name": "Control \x01 chars\x7f", "body": "line\nbreak? no: \u2028", "trash": True},
        ],
        "test": [{"name": "t", "subject": "it's", "expect_rules": ["Quotes \" and ' and \\ back"],
                  "expect_actions": {"label": ["A/B", "Ünïcödé ✓"]}}],
    }

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def doc(self) -> dict:
        doc = json.loads(json.dumps(self.DOC))
        del doc["rule"][3]["body"]          # a rule may not hold a line break...
        doc["rule"][3]["body"] = "no break \u2028 here"
        return doc

    def test_toml_round_trips_through_the_reader_and_tomllib(self):
        text = gc.format_rules(self.DOC, "toml", ["header", "two\nlines"], [["first rule"]])
        self.assertEqual(gc.parse_toml(text), self.DOC)
        if tomllib is not None:
            self.assertEqual(tomllib.loads(text), self.DOC)
        self.assertTrue(text.startswith("# header\n# two\n# lines\n"))
        self.assertIn("# first rule\n[[rule]]\n", text)
        self.assertIn("subject = ['/order #?\\d{5,}/i', \"it's\"]", text)   # literal string

    def test_both_formats_round_trip_through_load_rules(self):
        doc = self.doc()
        for fmt in ("json", "toml"):
            with self.subTest(fmt):
                path = os.path.join(self.tmp, f"rules.{fmt}")
                gc.write_rules_file(path, gc.format_rules(doc, fmt, ["c"], [["x"]]))
                self.assertEqual(gc.load_rules(path), gc.parse_rules(doc, path))
                self.assertEqual(gc.load_rules(path).account, doc["account"])
                self.assertEqual(len(gc.load_rules(path).tests), 1)

    def test_json_has_no_comments(self):
        text = gc.format_rules(self.DOC, "json", ["top comment"], [["first rule"]])
        self.assertEqual(json.loads(text), self.DOC)
        self.assertNotIn("top comment", text)
        self.assertNotIn("first rule", text)

    def test_never_overwrites_without_force(self):
        path = os.path.join(self.tmp, "rules.toml")
        gc.write_rules_file(path, "first")
        with self.assertRaises(gc.RulesError) as ctx:
            gc.write_rules_file(path, "second")
        self.assertIn("--force", str(ctx.exception))
        gc.write_rules_file(path, "third", force=True)
        with open(path, encoding="utf-8") as fh:
            self.assertEqual(fh.read(), "third")

    def write_past_a_size_limit(self, path: str, force: bool) -> str:
        """write_rules_file in a child whose file-size limit makes every write past 4 KiB
        fail (EFBIG), as a full disk would; returns the RulesError it printed."""
        if os.name != "posix" or not hasattr(signal, "SIGXFSZ"):
            self.skipTest("needs RLIMIT_FSIZE")
        script = ("import resource, signal, sys, gmail_classify as gc\n"
                  "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                  "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
                  "try:\n"
                  "    gc.write_rules_file(sys.argv[1], 'x' * 100000, force=sys.argv[2] == '1')\n"
                  "except gc.RulesError as exc:\n"
                  "    print(exc)\n")
        done = subprocess.run([sys.executable, "-c", script, path, "1" if force else "0"],
                              capture_output=True, text=True, timeout=60,
                              cwd=os.path.dirname(os.path.abspath(gc.__file__)))
        self.assertEqual(done.stderr, "")
        return done.stdout

    def test_a_forced_write_that_fills_the_disk_leaves_the_old_file_whole(self):
        # `init --force` / `import-filters -o --force` must keep the user's old rules.
        path = os.path.join(self.tmp, "rules.toml")
        gc.write_rules_file(path, "# my old rules\n")
        self.assertTrue(self.write_past_a_size_limit(path, True).startswith(f"cannot write {path}: "))
        with open(path, encoding="utf-8") as fh:
            self.assertEqual(fh.read(), "# my old rules\n")
        self.assertEqual(os.listdir(self.tmp), ["rules.toml"])      # no temporary file left
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_a_new_file_that_fills_the_disk_is_not_left_half_written(self):
        path = os.path.join(self.tmp, "rules.toml")
        self.assertTrue(self.write_past_a_size_limit(path, False).startswith(f"cannot write {path}: "))
        self.assertEqual(os.listdir(self.tmp), [])

    def test_a_forced_write_failing_half_way_keeps_the_old_file_and_cleans_up(self):
        path = os.path.join(self.tmp, "rules.toml")
        gc.write_rules_file(path, "old")
        real_write = os.write

        def half_then_full(fd, data):
            if len(data) > 4:
                return real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(28, "No space left on device")
        with mock.patch.object(gc.os, "write", side_effect=half_then_full):
            with self.assertRaises(gc.RulesError) as caught:
                gc.write_rules_file(path, "new rules, longer than the old", force=True)
        self.assertEqual(str(caught.exception),
                         f"cannot write {path}: No space left on device; choose another place")
        with open(path, encoding="utf-8") as fh:
            self.assertEqual(fh.read(), "old")
        self.assertEqual(os.listdir(self.tmp), ["rules.toml"])

    def test_short_writes_are_carried_on_until_the_whole_text_is_written(self):
        path = os.path.join(self.tmp, "rules.toml")
        gc.write_rules_file(path, "old")
        real_write = os.write
        with mock.patch.object(gc.os, "write",
                               side_effect=lambda fd, data: real_write(fd, bytes(data[:3]))) as write:
            gc.write_rules_file(path, "ünïcödé rules", force=True)
        with open(path, encoding="utf-8") as fh:
            self.assertEqual(fh.read(), "ünïcödé rules")
        self.assertEqual(write.call_count, 6)   # 17 bytes, three at a time

    def test_unknown_values_and_formats_are_refused(self):
        with self.assertRaises(TypeError):
            gc.format_rules({"rule": [{"x": 1.5}]})
        with self.assertRaises(ValueError):
            gc.format_rules({"rule": []}, "yaml")


class RulesFileWritingTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)

    def assert_one_line(self, code: int, err: str, path: str) -> None:
        self.assertEqual(code, gc.EXIT_USAGE, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn(path, err)
        self.assertNotIn("Traceback", err)
        self.assertNotIn("unexpected", err)

    def test_init_to_an_unwritable_place_is_one_line_exit_2(self):
        for name in ("r.toml", "r.json"):
            with self.subTest(name):
                path = os.path.join(UNWRITABLE, name)
                code, out, err = run_cli("init", path)
                self.assert_one_line(code, err, path)

    def test_import_filters_to_an_unwritable_place_is_one_line_exit_2(self):
        filters = os.path.join(self.tmp, "mailFilters.xml")
        with open(filters, "wb") as handle:
            handle.write(filter_export([("from", "a@b.example"), ("label", "A")]))
        path = os.path.join(UNWRITABLE, "x.toml")
        code, out, err = run_cli("import-filters", filters, "-o", path)
        self.assert_one_line(code, err, path)
        with self.assertRaises(gc.RulesError):
            gc.write_rules_file(path, "")

    def test_wrote_one_rule_is_singular(self):
        filters = os.path.join(self.tmp, "mailFilters.xml")
        with open(filters, "wb") as handle:
            handle.write(filter_export([("from", "a@b.example"), ("label", "A")]))
        path = os.path.join(self.tmp, "one.toml")
        code, out, err = run_cli("import-filters", filters, "-o", path)
        self.assertEqual(code, 0, err)
        self.assertIn(f"wrote {path}: 1 rule; next", err)

    @unittest.skipUnless(os.name == "posix", "file modes")
    def test_init_and_import_write_files_only_their_owner_can_read(self):
        filters = os.path.join(self.tmp, "mailFilters.xml")
        with open(filters, "wb") as handle:
            handle.write(SAMPLE_FILTERS)
        for argv in (["init", "{}"], ["init", "{}", "--force"],
                     ["import-filters", filters, "-o", "{}", "--force"]):
            for name in ("rules.toml", "rules.json"):
                with self.subTest(argv=argv, name=name):
                    path = os.path.join(self.tmp, name)
                    if "--force" in argv:
                        with open(path, "w") as handle:    # an old file others could read
                            handle.write("# old\n")
                        os.chmod(path, 0o644)
                    code, out, err = run_cli(*[a.format(path) for a in argv])
                    self.assertEqual(code, 0, err)
                    self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
                    if "--force" not in argv:
                        os.unlink(path)


@unittest.skipUnless(os.name == "posix", "file modes")
class SecretRulesFileModeTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def rules(self, account: Dict[str, Any], mode: int, name: str = "rules.json") -> str:
        path = os.path.join(self.tmp, name)
        doc = {"account": account, "rule": [{"name": "R", "subject": "x", "star": True}]}
        with open(path, "w") as handle:
            if name.endswith(".json"):
                json.dump(doc, handle)
            else:
                handle.write("[account]\n"
                             + "".join(f'{k} = "{v}"\n' for k, v in account.items())
                             + '[[rule]]\nname = "R"\nsubject = "x"\nstar = true\n')
        os.chmod(path, mode)
        return path

    def test_a_client_secret_in_a_file_others_can_read_is_refused(self):
        secret = {"oauth_client_id": CLIENT_ID, "oauth_client_secret": CLIENT_SECRET}
        table = [(secret, 0o644, "rules.json", True), (secret, 0o640, "rules.toml", True),
                 (secret, 0o604, "rules.json", True), (secret, 0o600, "rules.json", False),
                 (secret, 0o400, "rules.toml", False),
                 ({"oauth_client_id": CLIENT_ID}, 0o644, "rules.json", False),
                 ({"user": USER}, 0o644, "rules.toml", False)]
        for account, mode, name, refused in table:
            with self.subTest(account=sorted(account), mode=oct(mode), name=name):
                path = self.rules(account, mode, name)
                code, out, err = run_cli("check", path)
                if refused:
                    self.assertEqual(code, gc.EXIT_USAGE, err)
                    self.assertEqual(err.strip().splitlines(), [
                        f"gmail_classify: {path} holds oauth_client_secret and is readable by "
                        f"other users; run 'chmod 600 {path}'"])
                    self.assertNotIn(CLIENT_SECRET, err)
                    with self.assertRaises(gc.RulesError):
                        gc.load_rules(path)
                else:
                    self.assertEqual(code, 0, err)
                os.unlink(path)


# --- Classify pipeline -------------------------------------------------------------------


class PipelineTest(FakeServerTest):
    def seed_examples(self) -> Dict[str, int]:
        old = datetime.now(timezone.utc) - timedelta(days=800)
        big = "x" * 80 + "\n"
        big_body = big * (6 * 1024 * 1024 // len(big))
        add = self.server.add_message
        return {
            "receipt": add(make_message("Your =?UTF-8?Q?Rechnung_/_receipt?= #1")),
            "order": add(make_message("Order 123456 shipped", sender="shop@example.com")),
            "newsletter": add(make_message("Weekly news", extra="List-Unsubscribe: <mailto:u@x>\n")),
            "github": add(make_message("[repo] PR", sender="GitHub <notifications@github.com>")),
            "bank": add(make_message("Account alert: login", sender="Bank <alerts@mybank.example>")),
            "old_big": add(make_message("holiday photos", body=big_body), date=old),
            "old_big_keep": add(make_message("keep photos", body=big_body), date=old,
                                labels=("\\Inbox", "Keep")),
            "lunch": add(make_message("Lunch?", sender="Bob <bob@example.com>")),
        }

    def snapshot(self) -> Dict[int, Tuple[frozenset, frozenset]]:
        return {m.msgid: (frozenset(m.labels), frozenset(m.flags))
                for m in self.server.messages("[Gmail]/All Mail") + self.server.messages("[Gmail]/Trash")}

    def rules(self, doc: Optional[dict] = None) -> gc.Ruleset:
        return gc.parse_rules(doc or EXAMPLE_DOC, "rules.json")

    def test_dry_run_changes_nothing_and_sends_no_write(self):
        self.seed_examples()
        before = self.snapshot()
        conn = self.connect()
        report = gc.classify_folder(conn, self.rules(), "INBOX")
        self.assertEqual(report.matched, {"Receipts": 2, "Newsletters": 1, "GitHub": 1,
                                          "Bank": 1, "Old and big": 1})
        self.assertEqual(report.changes["trash"], 1)
        self.assertEqual(report.created, ["Receipts", "Newsletters", "GitHub", "Dev/Notifications"])
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(set(self.commands()) & WRITE_COMMANDS, set())
        self.assertIn("EXAMINE", self.commands())

    def test_apply_sorts_the_mailbox(self):
        ids = self.seed_examples()
        conn = self.connect()
        gc.classify_folder(conn, self.rules(), "INBOX", apply=True)
        msg = self.server.message
        self.assertEqual(msg(ids["receipt"]).labels, {"Receipts"})       # archived
        self.assertEqual(msg(ids["order"]).labels, {"Receipts"})
        self.assertEqual(msg(ids["newsletter"]).labels, {"\\Inbox", "Newsletters"})
        self.assertIn("\\Seen", msg(ids["newsletter"]).flags)
        self.assertEqual(msg(ids["github"]).labels, {"\\Inbox", "GitHub", "Dev/Notifications"})
        self.assertIn("\\Flagged", msg(ids["bank"]).flags)
        self.assertIn("\\Trash", msg(ids["old_big"]).labels)
        self.assertEqual(msg(ids["old_big_keep"]).labels, {"\\Inbox", "Keep"})
        self.assertEqual(msg(ids["lunch"]).labels, {"\\Inbox"})
        for name in ("receipt", "order", "github", "bank", "lunch", "old_big_keep"):
            self.assertNotIn("\\Seen", msg(ids[name]).flags, name)
        self.assertIn("Dev/Notifications", self.server.folder_names())

    def test_second_apply_sends_no_changes(self):
        self.seed_examples()
        gc.classify_folder(self.connect(), self.rules(), "INBOX", apply=True)
        before = self.snapshot()
        start = len(self.server.log)
        report = gc.classify_folder(self.connect(), self.rules(), "INBOX", apply=True)
        later = [entry.command for entry in self.server.log[start:]]
        self.assertEqual(set(later) & (WRITE_COMMANDS - {"SELECT"}), set())
        self.assertEqual(report.changes, {})
        self.assertEqual(self.snapshot(), before)

    def test_labels_with_spaces_non_ascii_and_star_are_created_and_applied(self):
        msgid = self.server.add_message(make_message("hello"))
        labels = ["Two words", "Entwürfe/Rechnungen", "a*b"]
        rules = self.rules({"rule": [{"name": "All", "subject": "hello", "label": labels}]})
        gc.classify_folder(self.connect(), rules, "INBOX", apply=True)
        self.assertEqual(self.server.message(msgid).labels, {"\\Inbox", *labels})
        for label in labels:
            self.assertIn(label, self.server.folder_names())

    def test_body_is_fetched_only_for_undecided_messages(self):
        self.server.add_message(make_message("invoice 1"))
        self.server.add_message(make_message("other", body="please unsubscribe here\n"))
        self.server.add_message(make_message("third", body="nothing\n"))
        rules = self.rules({"rule": [
            {"name": "Invoices", "subject": "invoice", "label": "Invoices"},
            {"name": "Bulk", "body": "unsubscribe", "label": "Bulk"}]})
        report = gc.classify_folder(self.connect(), rules, "INBOX")
        self.assertEqual(report.matched, {"Invoices": 1, "Bulk": 1})
        body_fetches = [e.line for e in self.server.log
                        if e.command == "UID FETCH" and b"BODY.PEEK[]<0." in e.line]
        self.assertEqual(len(body_fetches), 1)
        self.assertIn(b"UID FETCH 2:3 ", body_fetches[0])

    def test_attachments_are_found_from_bodystructure(self):
        with_pdf = (b"From: a@example.com\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
                    b"Content-Type: multipart/mixed; boundary=XYZ\r\n\r\n--XYZ\r\n"
                    b"Content-Type: text/plain\r\n\r\nsee attached\r\n--XYZ\r\n"
                    b"Content-Type: application/pdf; name=r.pdf\r\n"
                    b"Content-Disposition: attachment; filename=r.pdf\r\n"
                    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--XYZ--\r\n")
        self.server.add_message(with_pdf)
        self.server.add_message(make_message("report without"))
        rules = self.rules({"rule": [{"name": "Att", "has_attachment": True, "label": "Att"}]})
        report = gc.classify_folder(self.connect(), rules, "INBOX")
        self.assertEqual(report.matched, {"Att": 1})
        fetches = [e.line for e in self.server.log if e.command == "UID FETCH"]
        self.assertTrue(all(b"BODYSTRUCTURE" in line for line in fetches))
        self.assertFalse(any(b"BODY.PEEK[]<" in line for line in fetches))

    def test_gmail_query_runs_on_the_server(self):
        self.server.add_message(make_message("with pdf", extra="", body="see attached\n"),
                                labels=("\\Inbox", "Projects"))
        self.server.add_message(make_message("plain"))
        rules = self.rules({"rule": [{"name": "Proj", "gmail_query": "label:Projects",
                                      "star": True}]})
        report = gc.classify_folder(self.connect(), rules, "INBOX")
        self.assertEqual(report.matched, {"Proj": 1})
        self.assertTrue(any(b"X-GM-RAW" in e.line for e in self.server.log))

    def test_since_and_limit_narrow_the_run(self):
        old = datetime(2020, 1, 1, tzinfo=timezone.utc)
        self.server.add_message(make_message("receipt old"), date=old)
        for index in range(3):
            self.server.add_message(make_message(f"receipt {index}"))
        conn = self.connect()
        report = gc.classify_folder(conn, self.rules(), "INBOX", since=date(2023, 1, 1))
        self.assertEqual(report.examined, 3)
        self.assertTrue(any(b"SINCE 01-Jan-2023" in e.line for e in self.server.log))
        self.assertEqual(gc.classify_folder(conn, self.rules(), "INBOX", limit=2).examined, 2)

    def test_thousands_of_messages_take_few_commands(self):
        n, batch = 2000, 200
        for index in range(n):
            subject = ["receipt", "news", "hello", "alert"][index % 4]
            extra = "List-Unsubscribe: <x>\n" if subject == "news" else ""
            sender = "Bank <b@mybank.example>" if subject == "alert" else "a@example.com"
            self.server.add_message(make_message(f"{subject} {index}", sender=sender, extra=extra))
        conn = self.connect()
        report = gc.classify_folder(conn, self.rules(), "INBOX", apply=True, batch_size=batch)
        self.assertEqual(report.examined, n)
        self.assertLessEqual(self.server.count("UID FETCH"), n // batch + 1)
        # label Receipts, archive, label Newsletters, mark read, star: one command each per
        # step, and a step per DEFAULT_APPLY_EVERY batches (the step's writes are pipelined)
        steps = -(-n // (batch * gc.DEFAULT_APPLY_EVERY))
        changing = [c for c in self.commands() if c in ("UID STORE", "UID MOVE", "UID COPY")]
        self.assertLessEqual(len(changing), (5 + 2) * steps)
        self.assertLessEqual(len(self.commands()), n // batch + 20 + 7 * steps)
        self.assertEqual(len(self.server.uids("INBOX")), n - n // 4)
        self.assertEqual(len(self.server.uids("Receipts")), n // 4)


class PlainPipelineTest(FakeServerTest):
    server_options = {"gmail": False}

    def test_apply_on_a_plain_server_uses_folders(self):
        self.server.add_message(make_message("receipt 1"))
        self.server.add_message(make_message("news", extra="List-Unsubscribe: <x>\n"))
        self.server.add_message(make_message("junk", sender="spam@spam.example"))
        rules = gc.parse_rules({"rule": [
            {"name": "Receipts", "subject": "receipt", "label": "Receipts", "archive": True},
            {"name": "News", "header": {"List-Unsubscribe": True}, "move": "Lists"},
            {"name": "Spam", "from": "@spam.example", "trash": True}]}, "rules.json")
        conn = self.connect()
        gc.classify_folder(conn, rules, "INBOX", apply=True)
        self.assertEqual(self.server.uids("INBOX"), [])
        self.assertEqual(len(self.server.uids("Receipts")), 1)   # the label: a copy
        self.assertEqual(len(self.server.uids("Archive")), 1)    # archive: \Archive folder
        self.assertEqual(len(self.server.uids("Lists")), 1)
        self.assertEqual(len(self.server.uids("Trash")), 1)
        self.assertNotIn("EXPUNGE", self.commands())
        # a second run copies nothing again
        self.server.add_message(make_message("receipt 2"))
        gc.classify_folder(conn, rules, "INBOX", apply=True)
        self.assertEqual(len(self.server.uids("Receipts")), 2)

    def test_gmail_query_is_decided_by_the_local_conditions_off_gmail(self):
        self.server.add_message(make_message("receipt 1"))
        self.server.add_message(make_message("hello"))
        rules = gc.parse_rules({"rule": [
            {"name": "Query only", "gmail_query": "is:unread", "star": True},
            {"name": "Both", "gmail_query": "category:updates", "subject": "receipt",
             "move": "Receipts"}]}, "r.json")
        conn = self.connect()
        with self.assertLogs("gmail_classify", "WARNING") as logs:
            report = gc.classify_folder(conn, rules, "INBOX", apply=True)
        self.assertEqual(report.matched, {"Both": 1})
        self.assertEqual(len(self.server.uids("Receipts")), 1)
        self.assertEqual(self.server.messages("Receipts")[0].raw, make_message("receipt 1"))
        self.assertNotIn("\\Flagged", self.server.messages("INBOX")[0].flags)
        self.assertFalse(any(b"X-GM-RAW" in e.line for e in self.server.log))
        self.assertEqual(len(logs.output), 2, logs.output)
        self.assertIn('rule 1 ("Query only") has only a gmail_query: skipped', logs.output[0])
        self.assertIn('rule 2 ("Both"): its gmail_query needs Gmail', logs.output[1])


class PipelineEdgeCasesTest(AnyServerTest):
    def test_copy_delete_move_removes_the_originals(self):
        self.serve("uidplus")
        for index in range(3):
            self.server.add_message(make_message(f"m{index}"))
        conn = self.connect()
        conn.select("INBOX")
        result = conn.move([1, 2], "Archive")
        self.assertEqual(result.moved, {1: 1, 2: 2})          # from COPYUID
        self.assertEqual(self.subjects("INBOX"), ["m2"])
        self.assertIn(b"UID EXPUNGE 1:2\r\n", b"".join(self.lines("UID EXPUNGE")))

    def test_uids_already_gone_are_reported_missing(self):
        for kind in ("move", "uidplus", "gmail"):
            with self.subTest(kind=kind):
                self.serve(kind)
                self.server.add_message(make_message("m"))
                conn = self.connect()
                conn.select("INBOX")
                target = "[Gmail]/Trash" if kind == "gmail" else "Archive"
                result = conn.move([1, 99], target)
                self.assertEqual(result.missing, (99,))
                self.assertEqual(sorted(result.moved), [1])

    def test_dry_run_reopens_with_examine_after_a_reconnect(self):
        self.serve("gmail")
        self.server.add_message(make_message("receipt"))
        self.server.add_fault("UID FETCH", action="drop")
        rules = gc.parse_rules({"rule": [{"subject": "receipt", "label": "R"}]}, "r.json")
        report = gc.classify_folder(self.connect(), rules, "INBOX")
        self.assertEqual(report.changes, {"label R": 1})
        self.assertEqual(self.commands().count("EXAMINE"), 2)
        self.assertNotIn("SELECT", self.commands())

    def test_labels_as_copies_are_not_copied_again(self):
        self.serve("move")
        self.server.add_message(make_message("receipt 1"))
        rules = gc.parse_rules({"rule": [{"subject": "receipt", "label": "Receipts"}]}, "r.json")
        conn = self.connect()
        gc.classify_folder(conn, rules, "INBOX", apply=True)
        gc.classify_folder(conn, rules, "INBOX", apply=True)
        self.assertEqual(self.server.count("UID COPY"), 1)
        self.assertEqual(self.subjects("Receipts"), ["receipt 1"])

    def test_archive_is_planned_only_for_messages_in_the_inbox(self):
        rules = gc.parse_rules({"rule": [{"subject": "receipt", "archive": True}]}, "r.json")
        self.serve("gmail")
        self.server.add_message(make_message("receipt 1"), labels=("Receipts",))
        report = gc.classify_folder(self.connect(), rules, "Receipts", apply=True)
        self.assertEqual(report.changes, {})
        self.assertNotIn("UID STORE", self.commands())
        self.serve("move")
        self.server.add_message(make_message("receipt 2"), folder="Lists")
        report = gc.classify_folder(self.connect(), rules, "Lists", apply=True)
        self.assertEqual(report.changes, {})
        self.assertEqual(self.subjects("Lists"), ["receipt 2"])
        self.assertEqual(self.subjects("Archive"), [])

    def test_uidvalidity_change_while_collecting_a_label_folder_stops_before_copying(self):
        self.serve("move")
        self.server.add_message(make_message("receipt 1"))
        self.server.add_message(make_message("old"), folder="Receipts")
        self.server.add_fault("EXAMINE", action="call",
                              callback=lambda: self.server.bump_uidvalidity("INBOX"))
        rules = gc.parse_rules({"rule": [{"subject": "receipt", "label": "Receipts"}]}, "r.json")
        with self.assertRaises(gc.UidValidityError):
            gc.classify_folder(self.connect(), rules, "INBOX", apply=True)
        self.assertNotIn("UID COPY", self.commands())
        self.assertEqual(gc.UidValidityError("x").exit_code, gc.EXIT_INCOMPLETE)


class FailClosedTest(AnyServerTest):
    rules_doc = {"rule": [{"name": "Not from a friend", "not": {"from": "friend@"},
                           "trash": True}]}

    def test_quoted_header_field_names_are_matched_by_meaning(self):
        for kind in ("gmail", "move"):
            with self.subTest(kind=kind):
                self.serve(kind, quirks=["quoted-header-fields"])
                self.server.add_message(make_message("hi", sender="friend@example.com"))
                self.server.add_message(make_message("buy", sender="shop@example.com"))
                raw = RawClient(self.server)
                self.addCleanup(raw.close)
                raw.login()
                raw.command(b"EXAMINE INBOX")
                _, answer = raw.command(b"UID FETCH 1 (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])")
                self.assertIn(b'BODY[header.fields ("subject" "from")]', answer[0])
                code, _, err = self.cli("--apply")
                self.assertEqual((code, err), (0, ""))
                self.assertEqual(self.subjects("INBOX"), ["hi"])

    def test_incomplete_answers_skip_the_message_name_it_and_exit_6(self):
        cases = [(kind, quirk) for kind in SERVER_KINDS
                 for quirk in ("nil-header", "omit-header", "omit-flags")] + [("gmail", "omit-labels")]
        for kind, quirk in cases:
            with self.subTest(kind=kind, quirk=quirk):
                self.serve(kind, quirks=[quirk])
                self.server.add_message(make_message("hi", sender="friend@example.com"))
                self.server.add_message(make_message("buy", sender="shop@example.com"))
                code, out, err = self.cli("--apply", "--allow-expunge")
                self.assertEqual(code, gc.EXIT_INCOMPLETE)
                self.assertIn("INBOX: 2 messages skipped because the server's answer lacked "
                              "its", err)
                self.assertIn("(UID 1:2); nothing was done to them; run again", err)
                self.assertIn("2 messages skipped (the server's answer lacked its", out)
                self.assertEqual(self.subjects("INBOX"), ["buy", "hi"])
                self.assertFalse({"UID MOVE", "UID STORE", "UID COPY"} & set(self.commands()))

    def test_only_the_incomplete_message_is_skipped(self):
        self.serve("move", quirks=["omit-flags"])
        self.server.add_message(make_message("buy 1", sender="shop@example.com"))
        odd = self.server.add_message(make_message("buy 2", sender="shop@example.com"))
        self.server.add_message(make_message("buy 3", sender="shop@example.com"))
        self.server.quirk_msgids = {odd}
        conn = self.connect()
        rules = gc.parse_rules(self.rules_doc, "rules.json")
        report = gc.classify_folder(conn, rules, "INBOX", apply=True)
        self.assertEqual(report.skipped, [2])
        self.assertEqual(report.why_skipped, {2: "the server's answer lacked its flags"})
        self.assertEqual(self.subjects("INBOX"), ["buy 2"])
        self.assertEqual(self.subjects("Trash"), ["buy 1", "buy 3"])

    def test_a_message_deleted_before_its_fetch_is_skipped_not_guessed(self):
        self.serve("move")
        self.server.add_message(make_message("buy 1", sender="shop@example.com"))
        gone = self.server.add_message(make_message("buy 2", sender="shop@example.com"))

        def another_client_expunges() -> None:
            with self.server._cond:
                self.server._expunge(self.server._folders["INBOX"], [gone])

        self.server.add_fault("UID FETCH", action="call", callback=another_client_expunges)
        rules = gc.parse_rules(self.rules_doc, "rules.json")
        report = gc.classify_folder(self.connect(), rules, "INBOX", apply=True)
        self.assertEqual(report.skipped, [2])
        self.assertEqual(report.why_skipped, {2: "the server sent nothing for it (deleted meanwhile?)"})
        self.assertEqual(self.subjects("Trash"), ["buy 1"])

    def test_missing_body_prefix_skips_the_message(self):
        self.serve("move", quirks=["omit-body"])
        self.server.add_message(make_message("a", body="please unsubscribe\n"))
        rules = gc.parse_rules({"rule": [{"name": "No unsubscribe", "not": {"body": "zzz"},
                                          "trash": True}]}, "rules.json")
        report = gc.classify_folder(self.connect(), rules, "INBOX", apply=True)
        self.assertEqual(report.why_skipped, {1: "the server's answer lacked its body prefix"})
        self.assertEqual(self.subjects("Trash"), [])

    def test_fetch_key_normalises_the_section_spec(self):
        cases = [("BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]", 'BODY[header.fields ("Subject" from)]'),
                 ("BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]", "BODY[HEADER.FIELDS (SUBJECT  FROM)]"),
                 ("BODY.PEEK[]<0.16384>", "BODY[]<0>"),
                 ("BODY.PEEK[1.HEADER.FIELDS.NOT (X-A)]", 'BODY[1.HEADER.FIELDS.NOT ("x-a")]')]
        for asked, answered in cases:
            with self.subTest(answered=answered):
                self.assertEqual(gc._fetch_key(asked), gc._fetch_key(answered))
        self.assertNotEqual(gc._fetch_key("BODY.PEEK[HEADER.FIELDS (FROM)]"),
                            gc._fetch_key("BODY[HEADER.FIELDS.NOT (FROM)]"))


class NeverDuplicateTest(AnyServerTest):
    def move_three(self, kind: str, when: str, **options: Any) -> gc.MoveResult:
        self.serve(kind, **options)
        for index in range(3):
            self.server.add_message(make_message(f"receipt {index}"))
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID COPY", action="drop", when=when)
        return conn.move([1, 2, 3], "Archive", allow_expunge=True)

    def test_drop_right_after_copy_never_copies_twice(self):
        for kind in ("uidplus", "neither"):
            with self.subTest(kind=kind):
                result = self.move_three(kind, "after")
                self.assertEqual(self.server.fired, [("UID COPY", "drop", "after")])
                self.assertEqual(self.subjects("Archive"), ["receipt 0", "receipt 1", "receipt 2"])
                self.assertEqual(self.server.uids("INBOX"), [])
                self.assertEqual(self.server.count("UID COPY"), 1)
                self.assertEqual(sorted(result.moved), [1, 2, 3])
                self.assertEqual(sorted(result.moved.values()), [1, 2, 3])   # found by search

    def test_copy_that_never_reached_the_server_is_simply_sent_again(self):
        for kind in ("uidplus", "neither"):
            with self.subTest(kind=kind):
                self.move_three(kind, "before")
                self.assertEqual(self.server.count("UID COPY"), 2)
                self.assertEqual(self.subjects("Archive"), ["receipt 0", "receipt 1", "receipt 2"])
                self.assertEqual(self.server.uids("INBOX"), [])
                # Proven by UIDNEXT alone: the destination was not searched.
                self.assertNotIn("EXAMINE", self.commands())
                self.assertEqual(self.lines("STATUS")[-1].split(b" ", 1)[1],
                                 b"STATUS Archive (UIDNEXT)\r\n")

    def test_a_partly_done_copy_copies_only_the_rest(self):
        self.serve("uidplus")
        for index in range(3):
            self.server.add_message(make_message(f"receipt {index}"))
        first = self.server.messages("INBOX")[0].msgid

        def server_copied_the_first_only() -> None:
            with self.server._cond:
                folders = self.server._folders
                self.server._copy_messages(folders["INBOX"], folders["Archive"],
                                           [self.server._msgs[first]], move=False)

        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID COPY", action="drop")          # the answer never comes
        self.server.add_fault("STATUS", nth=2, action="call", callback=server_copied_the_first_only)
        result = conn.move([1, 2, 3], "Archive")
        self.assertEqual(self.subjects("Archive"), ["receipt 0", "receipt 1", "receipt 2"])
        self.assertEqual(self.server.uids("INBOX"), [])
        self.assertEqual(self.lines("UID COPY")[-1].split(b" ", 1)[1], b"UID COPY 2:3 Archive\r\n")
        self.assertEqual(result.moved[1], 1)

    def test_a_copy_that_keeps_dropping_gives_up_with_the_originals_kept(self):
        self.serve("uidplus")
        self.server.add_message(make_message("receipt 0"))
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID COPY", action="drop", count=10)
        with self.assertRaises(gc.ConnectionLostError) as ctx:
            conn.move([1], "Archive")
        self.assertIn("UID COPY to Archive kept failing", str(ctx.exception))
        self.assertEqual(self.server.count("UID COPY"), 4)     # the first try and 3 retries
        self.assertEqual(self.subjects("INBOX"), ["receipt 0"])
        self.assertEqual(self.subjects("Archive"), [])

    def test_status_for_another_folder_is_not_taken_for_the_destination(self):
        # The fake's other-folder STATUS always says UIDNEXT 1: taken as the destination's,
        # "UIDNEXT did not move" would wrongly prove the dropped COPY never ran.
        self.move_three("uidplus", "after", quirks=["status-other-first"])
        self.assertEqual(self.subjects("Archive"), ["receipt 0", "receipt 1", "receipt 2"])
        self.assertEqual(self.server.count("UID COPY"), 1)

    def test_labels_as_copies_after_a_drop_are_not_copied_twice(self):
        rules = gc.parse_rules({"rule": [{"subject": "receipt", "label": "Receipts"}]}, "r.json")
        for kind in SERVER_KINDS:
            if kind == "gmail":
                continue        # Gmail labels are stored, not copied
            with self.subTest(kind=kind):
                self.serve(kind)
                self.server.add_message(make_message("receipt 1"))
                self.server.add_message(make_message("receipt 2"))
                self.server.add_fault("UID COPY", action="drop", when="after")
                conn = self.connect()
                gc.classify_folder(conn, rules, "INBOX", apply=True)
                self.assertEqual(self.server.fired, [("UID COPY", "drop", "after")])
                target = conn.server_name("Receipts")
                self.assertEqual(self.subjects(target), ["receipt 1", "receipt 2"])
                self.assertEqual(self.subjects("INBOX"), ["receipt 1", "receipt 2"])

    def test_rerun_skips_originals_the_destination_already_holds(self):
        # An earlier run copied and marked the message, then stopped before UID EXPUNGE.
        self.serve("uidplus")
        when = datetime(2024, 3, 4, 10, 0, tzinfo=timezone.utc)
        raw = make_message("receipt 1")
        self.server.add_message(raw, flags=("\\Deleted",), date=when)
        self.server.add_message(raw, flags=("\\Deleted",), date=when, folder="Archive")
        self.server.add_message(make_message("receipt 2"))
        conn = self.connect()
        conn.select("INBOX")
        result = conn.move([1, 2], "Archive")
        self.assertEqual(self.subjects("Archive"), ["receipt 1", "receipt 2"])
        self.assertEqual(self.server.uids("INBOX"), [])
        self.assertEqual(result.moved[1], 1)
        self.assertIn(b"UID COPY 2 Archive", b"".join(self.lines("UID COPY")))
        self.assertEqual(self.server.count("UID COPY"), 1)


class DecisionsAndChangesTest(AnyServerTest):
    """Issue 15, item 5: a *decision* is what the rules choose for a message, a *change*
    what the server still lacks of it; every count the user sees says which one it is."""

    rules_doc = {"rule": [{"name": "Bank", "from": "@mybank.example", "label": "Bank"}]}

    def seed_copies(self, copied: int, new: int) -> None:
        """Off Gmail: ``copied`` bank messages whose copy is already in folder Bank (an
        earlier run, or the user), and ``new`` ones that still need theirs."""
        for n in range(copied + new):
            raw = make_message(f"Statement {n}", sender="Bank <b@mybank.example>")
            self.server.add_message(raw)
            if n < copied:
                self.server.add_message(raw, folder="Bank")

    def test_dry_run_counts_copies_already_there_as_already_done_not_to_change(self):
        self.serve("move")
        self.seed_copies(copied=3, new=1)
        code, out, err = self.cli()
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"\n  rule\s+matched\s+to change\n  Bank\s+4\s+1\n")
        self.assertIn("  would: label Bank (1)\n", out)
        self.assertIn("  already done: label Bank (3)\n", out)

    def test_apply_says_no_change_when_every_copy_is_already_there(self):
        self.serve("move")
        self.seed_copies(copied=3, new=0)
        code, out, err = self.cli("--apply")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"\n  rule\s+matched\s+changed\n  Bank\s+3\s+0\n")
        self.assertNotIn("done: label", out.replace("already done: label", ""))
        self.assertIn("  already done: label Bank (3)\n", out)
        self.assertTrue(out.endswith("0 changes made.\n"), out)
        self.assertNotIn("UID COPY", self.commands())
        self.assertEqual(len(self.server.messages("Bank")), 3)

    def test_json_changes_and_already_done_add_up_to_the_decisions(self):
        self.serve("move")
        self.seed_copies(copied=3, new=1)
        code, out, err = self.cli("--apply", "--json")
        self.assertEqual((code, err), (0, ""))
        summary = json.loads(out.splitlines()[-1])
        report = summary["reports"][0]
        self.assertEqual((report["matched"], report["changed"], report["changes"],
                          report["already_done"]),
                         ({"Bank": 4}, {"Bank": 1}, {"label Bank": 1}, {"label Bank": 3}))
        self.assertEqual((summary["counts"], summary["changes_made"], summary["already_done"]),
                         ({"label Bank": 1}, 1, {"label Bank": 3}))
        self.assertEqual(len(self.server.messages("Bank")), 4)

    def test_total_over_folders_adds_up_changes_and_already_done(self):
        self.serve("move")
        self.seed_copies(copied=2, new=1)
        raw = make_message("Statement in Old", sender="Bank <b@mybank.example>")
        self.server.add_message(raw, folder="Old")
        self.server.add_message(raw, folder="Bank")
        code, out, err = self.cli("--folder", "INBOX", "--folder", "Old")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("All 2 folders: 4 messages examined; would: label Bank (1); "
                      "already done: label Bank (3)\n", out)

    def test_a_move_archive_trash_or_flag_the_server_already_has_is_already_done(self):
        table = (("Lists", {"move": "Lists", "mark_unread": True}, (),
                  {"move to Lists": 1, "mark unread": 1}),
                 ("Archive", {"archive": True, "unstar": True}, (), {"archive": 1, "unstar": 1}),
                 ("Trash", {"trash": True, "mark_read": True}, ("\\Seen",),
                  {"trash": 1, "mark read": 1}))
        for folder, actions, flags, expected in table:
            with self.subTest(folder=folder):
                self.serve("move")
                self.server.add_message(make_message("Digest"), folder=folder, flags=flags)
                rules = gc.parse_rules({"rule": [dict(name="R", subject="Digest", **actions)]},
                                       "rules.json")
                report = gc.classify_folder(self.connect(), rules, folder, apply=True)
                self.assertEqual((report.changes, report.changed, report.already_done),
                                 ({}, {}, expected))
                self.assertEqual(self.writes(), set())

    def test_gmail_labels_and_flags_already_set_are_already_done(self):
        self.serve("gmail")
        self.rules_doc = {"rule": [{"name": "Bank", "from": "@mybank.example", "label": "Bank",
                                    "star": True}]}
        self.server.add_message(make_message("Statement 1", sender="b@mybank.example"),
                                labels=("\\Inbox", "Bank"), flags=("\\Flagged",))
        self.server.add_message(make_message("Statement 2", sender="b@mybank.example"),
                                labels=("\\Inbox", "Bank"))
        code, out, err = self.cli("--json")
        self.assertEqual((code, err), (0, ""))
        report = json.loads(out.splitlines()[-1])["reports"][0]
        self.assertEqual((report["changed"], report["changes"], report["already_done"]),
                         ({"Bank": 1}, {"star": 1}, {"label Bank": 2, "star": 1}))


class TemplatePipelineTest(FakeServerTest):
    RULES = {"rule": [{"name": "Vendors", "subject": "order", "label": "Vendors/{sender_domain}",
                       "move": "Orders/{year}"}]}

    def seed(self) -> Dict[str, int]:
        when = datetime(2022, 7, 1, tzinfo=timezone.utc)
        add = self.server.add_message
        return {"amazon": add(make_message("order 1", sender="A <auto@Amazon.COM>"), date=when),
                "evil": add(make_message("order 2", sender="E <e@evil.example/../INBOX>"), date=when),
                "uni": add(make_message("order 3", sender="U <u@münchen.de>"),
                           date=datetime(2023, 1, 1, tzinfo=timezone.utc))}

    def test_dry_run_lists_the_folders_to_create(self):
        self.seed()
        report = gc.classify_folder(self.connect(), gc.parse_rules(self.RULES), "INBOX")
        self.assertEqual(report.created, ["Orders/2022", "Orders/2023", "Vendors/amazon.com",
                                          "Vendors/evil.example.inbox", "Vendors/xn--mnchen-3ya.de"])
        self.assertEqual(set(self.commands()) & WRITE_COMMANDS, set())
        fetches = [e.line for e in self.server.log if e.command == "UID FETCH"]
        self.assertTrue(all(b"INTERNALDATE" in line for line in fetches))

    def test_apply_creates_and_fills_the_expanded_folders(self):
        ids = self.seed()
        gc.classify_folder(self.connect(), gc.parse_rules(self.RULES), "INBOX", apply=True)
        self.assertEqual(self.server.message(ids["amazon"]).labels, {"Vendors/amazon.com", "Orders/2022"})
        self.assertEqual(self.server.message(ids["evil"]).labels,
                         {"Vendors/evil.example.inbox", "Orders/2022"})
        self.assertEqual(self.server.message(ids["uni"]).labels,
                         {"Vendors/xn--mnchen-3ya.de", "Orders/2023"})

    def test_too_many_new_folders_are_refused_before_any_change(self):
        self.seed()
        before = {m.msgid: (frozenset(m.labels), frozenset(m.flags))
                  for m in self.server.messages("[Gmail]/All Mail")}
        folders = self.server.folder_names()
        with self.assertRaises(gc.FolderLimitError) as ctx:
            gc.classify_folder(self.connect(), gc.parse_rules(self.RULES), "INBOX", apply=True,
                               max_new_folders=4)
        self.assertIn("would create 5 new folders", str(ctx.exception))
        self.assertIn("--max-new-folders 5", str(ctx.exception))
        self.assertEqual(self.server.folder_names(), folders)
        self.assertEqual({c for c in self.commands()} & (WRITE_COMMANDS - {"SELECT"}), set())
        self.assertEqual({m.msgid: (frozenset(m.labels), frozenset(m.flags))
                          for m in self.server.messages("[Gmail]/All Mail")}, before)

    def test_the_limit_holds_across_steps_of_one_run(self):
        ids = self.seed()
        report = gc.FolderReport("INBOX", True)
        with self.assertRaises(gc.FolderLimitError) as ctx:
            gc.classify_folder(self.connect(), gc.parse_rules(self.RULES), "INBOX", apply=True,
                               batch_size=1, apply_every=1, max_new_folders=2, report=report)
        self.assertIn("would create 3 new folders (Vendors/evil.example.inbox)", str(ctx.exception))
        self.assertIn("nothing more was changed after creating 2", str(ctx.exception))
        self.assertEqual(report.created, ["Orders/2022", "Vendors/amazon.com"])
        self.assertEqual(self.server.message(ids["amazon"]).labels, {"Vendors/amazon.com", "Orders/2022"})
        self.assertEqual(self.server.message(ids["evil"]).labels, {"\\Inbox"})
        self.assertNotIn("Vendors/evil.example.inbox", self.server.folder_names())

    def test_cli_limit_option_and_dry_run_warning(self):
        self.seed()
        path = os.path.join(self.tmp, "rules.json")
        with open(path, "w") as handle:
            json.dump(self.RULES, handle)
        argv = ["run", "--rules", path, "--user", USER, "--host", "127.0.0.1", "--port",
                str(self.server.port), "--plaintext", "--retries", "0", "--max-new-folders", "2"]
        env = {"GMAIL_APP_PASSWORD": PASSWORD}
        code, out, err = run_cli(*argv, env=env)
        self.assertEqual(code, 0, err)
        self.assertIn("would create Vendors/amazon.com", out)
        self.assertIn("--apply would refuse: 5 new folders, more than the limit of 2", out)
        code, out, err = run_cli(*argv, "--apply", env=env)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("more than the limit of 2; nothing was changed", err.splitlines()[-1])
        self.assertNotIn("Orders/2022", self.server.folder_names())
        code, out, err = run_cli(*argv[:-1], "5", "--apply", env=env)
        self.assertEqual(code, 0, err)
        self.assertIn("Orders/2022", self.server.folder_names())


class GmailQueryEverywhereTest(FakeServerTest):
    DOC = {"rule": [
        {"name": "Only query", "gmail_query": "label:Projects", "star": True, "continue": True},
        {"name": "Query and subject", "gmail_query": "label:Projects", "subject": "report",
         "label": "Reports"},
        {"name": "Any", "any": [{"gmail_query": "is:starred"}, {"subject": "urgent"}],
         "label": "Urgent"},
        {"name": "Not", "not": {"gmail_query": "label:Projects"}, "label": "Never"},
    ]}

    def test_on_gmail_the_query_is_one_more_condition(self):
        in_project = self.server.add_message(make_message("report"), labels=("\\Inbox", "Projects"))
        outside = self.server.add_message(make_message("report"))
        report = gc.classify_folder(self.connect(), gc.parse_rules(self.DOC), "INBOX", apply=True)
        self.assertEqual(report.matched, {"Only query": 1, "Query and subject": 1, "Not": 1})
        self.assertEqual(self.server.message(in_project).labels, {"\\Inbox", "Projects", "Reports"})
        self.assertIn("\\Flagged", self.server.message(in_project).flags)
        self.assertEqual(self.server.message(outside).labels, {"\\Inbox", "Never"})

    def test_offline_the_local_conditions_decide_with_one_note_per_rule(self):
        local, notes = gc.parse_rules(self.DOC, "r.json").local()
        self.assertEqual([r.name for r in local.rules], ["Query and subject", "Any"])
        self.assertEqual(len(notes), 4)
        self.assertTrue(notes[0].startswith('rule 1 ("Only query") has only a gmail_query'))
        self.assertTrue(notes[3].startswith('rule 4 ("Not") has only a gmail_query'))
        self.assertEqual(local.needs.queries, frozenset())
        decision = local.classify(info("Subject: urgent report"), final=True, now=NOW)
        self.assertEqual([n for n, _ in decision.matches], ["Query and subject"])
        decision = local.classify(info("Subject: urgent"), final=True, now=NOW)
        self.assertEqual([n for n, _ in decision.matches], ["Any"])
        plain = gc.parse_rules({"rule": [{"subject": "x", "star": True},
                                         {"subject": "y", "from": "z", "star": True}]})
        self.assertIs(plain.local()[0], plain)
        self.assertEqual(plain.local()[1], ())

    def test_a_table_of_queries_only_leaves_nothing_to_decide(self):
        doc = {"rule": [{"name": "All", "all": [{"gmail_query": "a"}, {"gmail_query": "b"}],
                         "star": True},
                        {"name": "Any", "any": [{"gmail_query": "a"}, {"gmail_query": "b"}],
                         "star": True}]}
        local, notes = gc.parse_rules(doc).local()
        self.assertEqual(local.rules, ())
        self.assertEqual(len(notes), 2)
        self.assertEqual(local.classify(info("Subject: x"), final=True, now=NOW).matches, ())

    def test_test_command_prints_the_notes(self):
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump(self.DOC, handle)
        eml = os.path.join(self.tmp, "m.eml")
        with open(eml, "wb") as handle:
            handle.write(make_message("weekly report"))
        code, out, err = run_cli("test", rules, eml)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.count("note: "), 4)
        self.assertIn(f"{eml}: Query and subject: subject contains \"report\"", out)


class RuleTestsBeforeRunTest(FakeServerTest):
    def argv(self, path: str, *extra: str) -> List[str]:
        return ["run", "--rules", path, "--user", USER, "--host", "127.0.0.1", "--port",
                str(self.server.port), "--plaintext", "--retries", "0", *extra]

    def test_failing_tests_refuse_apply_before_connecting(self):
        self.server.add_message(make_message("Your receipt"))
        path = os.path.join(self.tmp, "rules.json")
        with open(path, "w") as handle:
            json.dump({"rule": [{"name": "R", "subject": "receipt", "archive": True}],
                       "test": [{"subject": "a receipt", "expect_rules": []}]}, handle)
        code, out, err = run_cli(*self.argv(path, "--apply"), env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_RULE_TESTS)
        self.assertIn("test 1: expected rules [], got [R]", err)
        self.assertIn("refusing --apply", err)
        self.assertEqual(self.commands(), [])
        code, out, err = run_cli(*self.argv(path), env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 0, err)
        self.assertIn("--apply would be refused", err)
        self.assertIn("would archive", out)
        self.assertEqual(self.server.messages("INBOX")[0].labels, {"\\Inbox"})


SPEED_RULES = {"rule": BENCH_RULES["rule"] + [
    {"name": "Domains", "from": "@", "label": "From/{sender_domain}", "continue": True},
    {"name": "Listed", "list_id": "/./", "header": {"X-Custom": "/@/"}, "label": "Lists"},
    {"name": "Copied", "recipient": ["/example\\.(com|de)/", "team"], "star": True},
]}


class FastRunEquivalenceTest(FakeServerTest):
    """A whole run through the fast path (header cache made before the rules read it, the
    step keeping only what its records show) decides, explains and records exactly what
    the same run decides with the email package's header classes doing every decoding."""

    def outcomes(self) -> List[Tuple[Any, ...]]:
        rules = gc.parse_rules(SPEED_RULES, "speed rules")
        seen: List[gc.Outcome] = []
        with self.connect() as conn:
            gc.classify_folder(conn, rules, "INBOX", batch_size=7, apply_every=2,
                               now=datetime(2026, 11, 30, tzinfo=timezone.utc),
                               on_message=seen.append)
        return [(o.uid, o.sender, o.subject, o.message_id, o.decision.matches,
                 o.decision.actions, o.changes) for o in seen]

    def test_decisions_explanations_and_records_match_the_plain_path(self):
        date = datetime(2025, 6, 1, tzinfo=timezone.utc)
        for block in tricky_header_blocks():
            self.server.add_message(block + b"\r\nbody\r\n", date=date)
        for raw, when in bench_corpus(40):
            self.server.add_message(raw, date=when)
        fast = self.outcomes()
        with mock.patch.object(gc, "header_text", gc._plain_header_text), \
                mock.patch.object(gc, "header_addresses", gc._plain_header_addresses), \
                mock.patch.object(gc, "_split_header_block", lambda raw: None):
            plain = self.outcomes()
        self.assertEqual(len(fast), len(tricky_header_blocks()) + 40)
        self.assertGreater(sum(1 for row in fast if row[4]), 40)     # rules did match
        for got, want in zip(fast, plain):
            self.assertEqual(got, want)

    def test_rules_needs_are_worked_out_once_per_folder_run(self):
        for index in range(30):
            self.server.add_message(make_message(f"message {index}"))
        rules = gc.parse_rules(SPEED_RULES, "speed rules")
        asked = []
        needs = gc.Ruleset.needs

        def counted(ruleset: gc.Ruleset) -> gc.Needs:
            asked.append(1)
            return needs.fget(ruleset)
        with mock.patch.object(gc.Ruleset, "needs", property(counted)), self.connect() as conn:
            report = gc.classify_folder(conn, rules, "INBOX", batch_size=10)
        self.assertEqual(report.examined, 30)
        self.assertLessEqual(len(asked), 3)     # not once per message


class PlaceStatusesTest(FakeServerTest):
    """_place_statuses: the destinations' UIDVALIDITY and UIDNEXT for the intent records."""

    server_options = {"gmail": False}

    def test_the_selected_folder_comes_from_select_and_a_refused_one_is_unknown(self):
        self.server.add_message(make_message("list"), folder="Lists")
        self.server.add_message(make_message("inbox"))
        conn = self.connect()
        conn.list_folders()
        selected = conn.select("INBOX")
        lists = conn.status("Lists")
        before = self.server.count("STATUS")
        places = gc._place_statuses(conn, ["INBOX", "Lists", "Nowhere"])
        self.assertEqual(places, {
            "INBOX": {"uidvalidity": selected.uidvalidity, "uidnext": selected.uidnext},
            "Lists": {"uidvalidity": lists["UIDVALIDITY"], "uidnext": lists["UIDNEXT"]},
            "Nowhere": {"uidvalidity": None, "uidnext": None}})
        self.assertEqual(self.server.count("STATUS") - before, 2)   # never the selected one


# A program that reads whole messages: yes when "WANTED" is anywhere in what it reads.
_WHOLE_READER = r'''#!%s -IS
import sys
data = sys.stdin.buffer.read()
with open(sys.argv[1], "a") as log:
    log.write("%%d\n" %% len(data))
sys.exit(0 if b"WANTED" in data else 1)
'''


class WholeMessageOnlyWhenReachedTest(FakeServerTest):
    """program_input = "message": only the messages that reach such a program in its rule
    are fetched whole; the others get the body prefix the rules read, or nothing."""

    def test_only_the_message_that_reaches_the_program_is_fetched_whole(self):
        os.chmod(self.tmp, 0o700)
        probe, log = os.path.join(self.tmp, "whole.py"), os.path.join(self.tmp, "lengths")
        with open(probe, "w") as handle:
            handle.write(_WHOLE_READER % sys.executable)
        os.chmod(probe, 0o700)
        rules = gc.parse_rules({"rule": [
            {"name": "Lists", "header": {"List-Id": True}, "label": "Lists"},
            {"name": "Invoices", "body": "invoice", "label": "Invoices"},
            {"name": "Ask", "program": [probe, log], "program_input": "message",
             "program_max_size": "100K", "label": "Asked"}]}, os.path.join(self.tmp, "r.json"))
        filler = "x" * 70 + "\n"
        add = self.server.add_message
        add(make_message("list", extra="List-Id: <l.example>\n", body=filler * 500))
        add(make_message("bill", body="invoice\n" + filler * 500))
        wanted = make_message("asked", body=filler * 500 + "WANTED\n")
        add(wanted)                                     # UID 3
        add(make_message("huge", body=filler * 3000 + "WANTED\n"))
        conn = self.connect()
        outcomes: Dict[str, Tuple[str, ...]] = {}
        report = gc.classify_folder(conn, rules, "INBOX", jobs=1, on_message=lambda o: outcomes.update(
            {o.subject: tuple(c.get("label", "") for c in o.changes)}))
        self.assertEqual(outcomes, {"list": ("Lists",), "bill": ("Invoices",), "asked": ("Asked",)})
        self.assertEqual(list(report.content_skipped.values()),
                         ["larger than program_max_size (100.0 KB) for program whole.py"])
        with open(log) as handle:
            self.assertEqual(handle.read(), f"{len(wanted)}\n")      # the whole message
        bodies = [e.line for e in self.server.log if b"BODY.PEEK[]<" in e.line]
        self.assertEqual(len(bodies), 2, bodies)
        self.assertIn(b" 2:4 (UID BODY.PEEK[]<0.16384>)", bodies[0])
        self.assertIn(b" 3 (UID BODY.PEEK[]<0.102400>)", bodies[1])
        # 36 KB and 211 KB were fetched up to 100 KB each before, 16 KB each now
        self.assertLess(conn.bytes_received, 110_000)

    def whole_rules(self, program: List[str], **keys: Any) -> gc.Ruleset:
        return gc.parse_rules({"rule": [dict(name="Ask", program=program, program_input="message",
                                             program_max_size="100K", label="Asked", **keys)]},
                              os.path.join(self.tmp, "r.json"))

    def test_a_message_whose_whole_fetch_fails_is_skipped_never_judged_on_its_prefix(self):
        class WithoutWholeMessages(_Session):
            def cmd_UID_FETCH(self, tag: str, args: list) -> str:
                if "102400" in repr(args):
                    return "OK FETCH completed"      # the answer lacks the message
                return super().cmd_UID_FETCH(tag, args)

        os.chmod(self.tmp, 0o700)
        probe, log = os.path.join(self.tmp, "whole.py"), os.path.join(self.tmp, "lengths")
        with open(probe, "w") as handle:
            handle.write(_WHOLE_READER % sys.executable)
        os.chmod(probe, 0o700)
        self.server.use_handler(WithoutWholeMessages)
        self.server.add_message(make_message("asked", body="x" * 30000))
        report = gc.classify_folder(self.connect(), self.whole_rules([probe, log]), "INBOX")
        self.assertEqual(list(report.skipped), [1])
        self.assertEqual(report.matched, {})
        self.assertFalse(os.path.exists(log))        # the program never saw the prefix

    def test_programs_on_whole_messages_run_in_parallel(self):
        os.chmod(self.tmp, 0o700)
        probe, marks = os.path.join(self.tmp, "probe.py"), os.path.join(self.tmp, "marks")
        with open(probe, "w") as handle:
            handle.write(_CONCURRENCY_PROBE % sys.executable)
        os.chmod(probe, 0o700)
        os.mkdir(marks, 0o700)
        for index in range(3):
            self.server.add_message(make_message(f"long {index}", body="x" * 30000))
        report = gc.classify_folder(self.connect(), self.whole_rules([probe, marks, "3", "2"]),
                                    "INBOX", jobs=3)
        self.assertEqual(report.matched, {"Ask": 3})
        with open(os.path.join(marks, "seen")) as handle:
            self.assertEqual(max(int(line) for line in handle), 3)


# --- Demo: a small sample mailbox, classified offline ------------------------------------


class DemoTest(unittest.TestCase):
    def test_demo_classifies_the_sample_offline_like_a_dry_run(self):
        with mock.patch.object(socket, "create_connection", side_effect=AssertionError("network")):
            code, out, err = run_cli("demo")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[1], "Rules: built-in rules (5 rules, labels only); write your "
                                   "own with: python gmail_classify.py init")
        self.assertIn("INBOX 3: would label Receipts  [Receipts]  Stadtwerke Köln  "
                      "Ihre Rechnung für März", lines)   # the name: the address is too long
        self.assertIn("INBOX 9: would label Newsletters  [Newsletters]  株式会社サンプル <sale@"
                      "shop.example.jp>  セール開始 🎉 Spring sale starts now", lines)
        self.assertFalse(any(line.startswith("INBOX 7:") for line in lines))  # a friend: no rule
        self.assertIn("INBOX: 10 messages examined", lines)
        self.assertIn("  Receipts             3          2", lines)  # one already labelled
        self.assertNotIn("--apply", out)

    def test_demo_report_is_the_one_classify_folder_gives_on_a_server(self):
        server = FakeGmail().start()
        self.addCleanup(server.stop)
        now = datetime.now(timezone.utc)
        infos = gc.demo_messages(now)
        for info in infos:
            server.add_message(info.headers.as_bytes().replace(b"\n", b"\r\n") + b"\r\n",
                               labels=info.labels, flags=info.flags)
        conn = gc.GmailConnection(USER, password=PASSWORD, host="127.0.0.1", port=server.port,
                                  security="plaintext", keepalive=None, retries=0)
        with conn:
            live = gc.classify_folder(conn, builtin_rules(), "INBOX", now=now)
        offline = gc.classify_messages(builtin_rules(), infos, "INBOX", now=now)
        self.assertEqual((offline.examined, offline.matched, offline.changed, offline.changes),
                         (live.examined, live.matched, live.changed, live.changes))

    def test_demo_with_your_own_rules_and_summary_only(self):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "rules.toml")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write('[[rule]]\nname = "Old and big"\nlarger_than = "5 MB"\n'
                         'older_than = "1y"\ntrash = true\n')
            code, out, err = run_cli("demo", "--rules", path, "--summary")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"Rules: {path} (1 rule)\n", out)
        self.assertNotIn("INBOX 10:", out)
        self.assertIn("  would: trash (1)\n", out)


# --- State and audit log -----------------------------------------------------------------


class StateStoreTest(TempDirMixin, unittest.TestCase):
    def test_save_writes_a_private_versioned_file_atomically(self):
        directory = os.path.join(self.make_dir(), "deep", "gmail_classify")
        store = gc.StateStore(directory)
        store.load()
        store.set_folder("me on host", "INBOX", gc.FolderState(7, 42, "abc"))
        store.add_download("me on host", 1234)
        store.save()
        path = os.path.join(directory, "state.json")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(directory).st_mode & 0o777, 0o700)
        with open(path) as handle:
            data = json.load(handle)
        self.assertEqual((data["format"], data["version"]), ("gmail_classify state", 1))
        self.assertEqual(data["accounts"]["me on host"]["folders"]["INBOX"]["mark"], 42)
        self.assertEqual(sorted(os.listdir(directory)), ["state.json", "state.lock"])
        again = gc.StateStore(directory)
        again.load()
        self.assertEqual(again.folder("me on host", "INBOX").mark, 42)
        self.assertEqual(again.downloaded("me on host"), 1234)

    def test_a_failed_write_leaves_the_old_file_whole(self):
        directory = self.make_dir()
        store = gc.StateStore(directory)
        store.set_folder("a", "INBOX", gc.FolderState(1, 5))
        store.save()
        store.set_folder("a", "INBOX", gc.FolderState(1, 9))
        with mock.patch("os.replace", side_effect=OSError("disk full")):
            with self.assertRaises(gc.StateError):
                store.save()
        fresh = gc.StateStore(directory)
        fresh.load()
        self.assertEqual(fresh.folder("a", "INBOX").mark, 5)
        self.assertEqual(sorted(os.listdir(directory)), ["state.json", "state.lock"])

    def test_directory_readable_by_others_is_tightened(self):
        directory = self.make_dir()
        os.chmod(directory, 0o755)
        store = gc.StateStore(directory)
        store.add_download("a", 1)
        store.save()
        self.assertEqual(os.stat(directory).st_mode & 0o777, 0o700)

    def test_save_merges_what_other_processes_wrote(self):
        directory = self.make_dir()
        first, second = gc.StateStore(directory), gc.StateStore(directory)
        first.load()
        second.load()
        first.set_folder("a", "INBOX", gc.FolderState(1, 10))
        first.add_download("a", 100)
        first.save()
        second.set_folder("a", "Work", gc.FolderState(2, 20))
        second.add_download("a", 50)
        second.save()
        third = gc.StateStore(directory)
        third.load()
        self.assertEqual(third.folder("a", "INBOX").mark, 10)
        self.assertEqual(third.folder("a", "Work").mark, 20)
        self.assertEqual(third.downloaded("a"), 150)
        # A later save of the first store writes only its new changes, not old ones again,
        # and leaves it seeing what the others wrote.
        third.set_folder("a", "INBOX", gc.FolderState(1, 30))
        third.save()
        first.add_download("a", 1)
        first.save()
        self.assertEqual(first.folder("a", "INBOX").mark, 30)
        self.assertEqual(first.folder("a", "Work").mark, 20)
        self.assertEqual(first.downloaded("a"), 151)

    def test_nothing_to_save_writes_nothing(self):
        directory = os.path.join(self.make_dir(), "state")
        store = gc.StateStore(directory)
        store.load()
        store.save()
        self.assertFalse(os.path.exists(directory))

    def test_download_counts_are_per_day_and_old_days_are_dropped(self):
        clock = Clock()
        store = gc.StateStore(self.make_dir(), now=clock)
        store.add_download("a", 10)
        store.save()
        clock.advance(days=1)
        self.assertEqual(store.downloaded("a"), 0)
        store.add_download("a", 5)
        clock.advance(days=gc.DOWNLOAD_DAYS_KEPT + 1)
        store.add_download("a", 1)
        store.save()
        with open(store.path) as handle:
            days = json.load(handle)["accounts"]["a"]["downloads"]
        self.assertEqual(list(days), [clock().date().isoformat()])

    def test_bad_state_files_give_one_clear_error(self):
        table = [("corrupt", "{not json", "is corrupt"),
                 ("foreign", json.dumps({"some": "thing"}), "not a gmail_classify state file"),
                 ("list", "[1, 2]", "not a gmail_classify state file"),
                 ("newer", json.dumps({"format": "gmail_classify state", "version": 99,
                                       "accounts": {}}), "newer than this program"),
                 ("bad entry", json.dumps({"format": "gmail_classify state", "version": 1,
                                           "accounts": {"a": {"folders": {"INBOX": {
                                               "mark": "x", "uidvalidity": 1}}}}}), "bad entry"),
                 ("binary", b"\xff\xfe\x00garbage", "cannot read")]
        for name, content, expected in table:
            with self.subTest(name=name):
                directory = self.make_dir()
                path = os.path.join(directory, "state.json")
                with open(path, "wb") as handle:
                    handle.write(content if isinstance(content, bytes) else content.encode())
                store = gc.StateStore(directory)
                with self.assertRaises(gc.StateError) as ctx:
                    store.load()
                message = str(ctx.exception)
                self.assertIn(expected, message)
                self.assertIn(path, message)
                self.assertIn("--all", message)
                self.assertEqual(len(message.splitlines()), 1)
                store.load(start_over=True)        # what --all does
                store.set_folder("a", "INBOX", gc.FolderState(1, 3))
                store.save()
                fresh = gc.StateStore(directory)
                fresh.load()
                self.assertEqual(fresh.folder("a", "INBOX").mark, 3)

    def test_account_lock_is_exclusive_and_names_its_holder(self):
        store = gc.StateStore(self.make_dir())
        with store.lock("me on host", "watch"):
            with self.assertRaises(gc.LockedError) as ctx:
                store.lock("me on host").acquire()
            self.assertIn(f"pid {os.getpid()}", str(ctx.exception))
            self.assertIn("watch", str(ctx.exception))
            self.assertIn("me on host", str(ctx.exception))
            with store.lock("someone else on host"):
                pass                                  # other accounts are free
        with store.lock("me on host") as lock:       # released: free again
            self.assertTrue(lock.held)
        self.assertFalse(lock.held)

    def test_account_lock_is_released_when_the_holder_dies(self):
        directory = self.make_dir()
        code = ("import sys, gmail_classify as gc; "
                "gc.StateStore(sys.argv[1]).lock('me').acquire(); print('held', flush=True); "
                "sys.stdin.readline()")
        child = subprocess.Popen([sys.executable, "-c", code, directory], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.abspath(gc.__file__)))
        self.addCleanup(child.wait)
        self.assertEqual(child.stdout.readline().strip(), b"held")
        with self.assertRaises(gc.LockedError) as ctx:
            gc.StateStore(directory).lock("me").acquire()
        self.assertIn(f"pid {child.pid}", str(ctx.exception))
        child.kill()
        child.wait()
        child.stdout.close()
        child.stdin.close()
        gc.StateStore(directory).lock("me").acquire().release()

    def test_audit_log_rotates_by_size_and_reads_both_generations(self):
        directory = self.make_dir()
        audit = gc.AuditLog(Path(directory) / "audit.jsonl")
        with mock.patch.object(gc, "AUDIT_MAX_BYTES", 200):
            for number in range(12):
                audit.append([{"n": number, "pad": "x" * 40}])
        self.assertEqual(os.stat(audit.path).st_mode & 0o777, 0o600)
        self.assertTrue(audit.previous.exists())
        numbers = [record["n"] for record in audit.records()]
        self.assertEqual(numbers, sorted(numbers))
        self.assertEqual(numbers[-1], 11)
        self.assertLess(len(numbers), 12)          # the oldest generation was dropped
        with open(audit.path, "a") as handle:
            handle.write("{torn line\n")
        self.assertEqual([r["n"] for r in audit.records()], numbers)

    def test_rules_hash_follows_what_the_rules_do(self):
        base = gc.parse_rules(SWEEP_DOC, "a.json")
        self.assertEqual(gc.rules_hash(base), gc.rules_hash(gc.parse_rules(SWEEP_DOC, "b.json")))
        changed = json.loads(json.dumps(SWEEP_DOC))
        changed["rule"][0]["label"] = "Bills"
        self.assertNotEqual(gc.rules_hash(base), gc.rules_hash(gc.parse_rules(changed, "a.json")))
        code = ("import gmail_classify as gc, json, sys; "
                "print(gc.rules_hash(gc.parse_rules(json.loads(sys.argv[1]), 'x.json')))")
        other = subprocess.run([sys.executable, "-c", code, json.dumps(SWEEP_DOC)],
                               capture_output=True, text=True, check=True,
                               cwd=os.path.dirname(os.path.abspath(gc.__file__)),
                               env={**os.environ, "PYTHONHASHSEED": "123"})
        self.assertEqual(other.stdout.strip(), gc.rules_hash(base))   # stable across processes


@unittest.skipUnless(os.name == "posix", "file modes")
class LeftoverTemporaryFileTest(unittest.TestCase):
    """A temporary file left by a crashed run (same pid, mode 0644) must not lend its mode."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)

    def leftover(self, path: Path) -> None:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text("old")
        os.chmod(temporary, 0o644)

    def test_state_file(self):
        path = Path(self.tmp) / "state.json"
        self.leftover(path)
        gc._write_atomic(path, "{}")
        self.assertEqual((path.read_text(), os.stat(path).st_mode & 0o777), ("{}", 0o600))

    def test_token_file(self):
        with mock.patch.dict(os.environ, {"XDG_CONFIG_HOME": self.tmp}):
            self.leftover(gc.token_path(USER))
            path = gc.save_refresh_token(USER, gc.OAuthClient(CLIENT_ID, CLIENT_SECRET), "1//r")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(json.loads(path.read_text())["refresh_token"], "1//r")


class IncrementalRunTest(StateTestCase):
    def test_second_run_fetches_only_mail_above_the_mark(self):
        seed_mailbox(self.server, 6)
        first = self.run_once()
        self.assertEqual(self.mark().mark, 6)
        self.assertEqual(first.reports[0].start_uid, 0)
        start = len(self.server.log)
        self.server.add_message(make_message("receipt new"))
        self.server.add_message(make_message("hello new"))
        self.run_once()
        searches = [e.line for e in self.server.log[start:] if e.command == "UID SEARCH"]
        self.assertEqual(searches, [searches[0]])
        self.assertIn(b"UID SEARCH UID 7:*", searches[0])
        fetches = self.fetch_lines(start)
        self.assertEqual(len(fetches), 1)
        self.assertIn(b"UID FETCH 7:8 ", fetches[0])
        self.assertEqual(self.mark().mark, 8)

    def test_no_new_mail_fetches_nothing_although_n_star_returns_the_highest_uid(self):
        seed_mailbox(self.server, 6)
        self.run_once()
        start = len(self.server.log)
        run = self.run_once()
        self.assertEqual(self.fetch_lines(start), [])        # "UID 7:*" answered 6
        self.assertEqual(run.reports[0].examined, 0)
        self.assertEqual(self.mark().mark, 6)

    def test_all_classifies_everything_again_and_keeps_the_mark(self):
        seed_mailbox(self.server, 6)
        self.run_once()
        start = len(self.server.log)
        run = self.run_once(reclassify=True)
        self.assertEqual(run.reports[0].start_uid, 0)
        self.assertEqual(run.reports[0].examined, len(self.server.uids("INBOX")))
        self.assertTrue(any(b"UID SEARCH ALL" in e.line for e in self.server.log[start:]))
        self.assertEqual(run.changes_made, 0)                # all was done already
        self.assertEqual(self.mark().mark, 6)

    def test_dry_run_reads_the_mark_but_never_moves_it(self):
        seed_mailbox(self.server, 4)
        self.run_once()
        for index in range(3):
            self.server.add_message(make_message(f"receipt late {index}"))
        records: list = []
        run = self.run_once(apply=False, records=records)
        self.assertEqual([r["uid"] for r in records], [5, 6, 7])
        self.assertTrue(all(not r["applied"] and r["changes"] for r in records))
        self.assertEqual(self.mark().mark, 4)
        self.assertEqual(run.mark_of("INBOX").mark, 7)         # in memory only (watch)
        self.assertNotIn("SELECT", self.commands()[-8:])

    def test_since_and_limit_never_move_the_mark(self):
        seed_mailbox(self.server, 6)
        self.run_once(limit=2)
        self.assertIsNone(self.mark())
        self.run_once(since=date(2000, 1, 1))
        self.assertIsNone(self.mark())
        self.run_once()
        self.assertEqual(self.mark().mark, 6)

    def test_changed_uidvalidity_resets_the_mark_with_one_log_line(self):
        seed_mailbox(self.server, 6)
        self.run_once()
        self.server.bump_uidvalidity("INBOX")
        start = len(self.server.log)
        with self.assertLogs("gmail_classify", "WARNING") as logs:
            run = self.run_once()
        self.assertEqual(len(logs.output), 1)
        self.assertIn("UIDVALIDITY changed", logs.output[0])
        self.assertTrue(any(b"UID FETCH 1:" in line for line in self.fetch_lines(start)))
        self.assertEqual(run.reports[0].start_uid, 0)
        state = self.mark()
        self.assertEqual(state.uidvalidity, self.server.uidvalidity("INBOX"))
        self.assertEqual(state.mark, max(self.server.uids("INBOX")))

    def test_a_renumbered_folder_is_remembered_even_with_nothing_to_classify(self):
        seed_mailbox(self.server, 3)
        self.run_once()
        conn = self.connect()
        conn.select("INBOX")
        conn.move(conn.search(["ALL"]), "[Gmail]/Trash")
        conn.close()
        self.server.bump_uidvalidity("INBOX")
        with self.assertLogs("gmail_classify", "WARNING"):
            self.run_once()
        self.assertEqual(self.mark(), gc.FolderState(self.server.uidvalidity("INBOX"), 0,
                                                     self.mark().rules, self.mark().updated))
        with self.assertNoLogs("gmail_classify", "WARNING") if hasattr(self, "assertNoLogs") \
                else contextlib.nullcontext():
            self.run_once()                          # said once, not on every run

    def test_new_only_remembers_uidnext_and_classifies_nothing(self):
        seed_mailbox(self.server, 6)
        before = mailbox_snapshot(self.server)
        run = self.run_once(new_only=True)
        self.assertEqual(self.fetch_lines(), [])
        self.assertEqual(run.reports[0].examined, 0)
        self.assertEqual(mailbox_snapshot(self.server), before)
        self.assertEqual(self.mark().mark, 6)
        self.server.add_message(make_message("receipt fresh"))
        run = self.run_once()
        self.assertEqual(run.reports[0].examined, 1)
        self.assertEqual(run.counts, {"label Receipts": 1, "archive": 1})

    def test_changed_rules_are_mentioned_once(self):
        seed_mailbox(self.server, 6)
        self.run_once()
        changed = json.loads(json.dumps(SWEEP_DOC))
        changed["rule"][0]["label"] = "Bills"
        rules = gc.parse_rules(changed, "rules.json")
        with self.assertLogs("gmail_classify", "WARNING") as logs:
            self.run_once(rules)
        self.assertEqual(len(logs.output), 1)
        self.assertIn("rules changed", logs.output[0])
        self.assertIn("--all", logs.output[0])
        with self.assertNoLogs("gmail_classify", "WARNING") if hasattr(self, "assertNoLogs") \
                else contextlib.nullcontext():
            self.run_once(rules)
        self.assertEqual(self.mark().rules, gc.rules_hash(rules))

    def test_the_mark_moves_after_each_confirmed_step(self):
        seed_mailbox(self.server, 12)
        marks = []
        store = self.store()
        original = gc.StateStore.save

        def spy(store_self):
            original(store_self)
            state = store_self.folder(gc.account_key(USER, "127.0.0.1", self.server.port), "INBOX")
            marks.append(state.mark if state else None)

        with mock.patch.object(gc.StateStore, "save", spy):
            self.run_once(batch_size=3, apply_every=1)
        self.assertEqual([m for m in marks if m], [3, 6, 9, 12, 12])

    def test_records_carry_identity_rules_and_before_after_changes(self):
        msgid = self.server.add_message(make_message("receipt 1"), flags=("\\Seen",))
        records: list = []
        run = self.run_once(records=records)
        (record,) = records
        self.assertEqual(record["type"], "message")
        self.assertEqual(record["version"], gc.RECORD_VERSION)
        self.assertEqual(record["run"], run.id)
        self.assertEqual((record["account"], record["host"]), (USER, f"127.0.0.1:{self.server.port}"))
        self.assertEqual((record["folder"], record["uid"]), ("INBOX", 1))
        self.assertEqual(record["uidvalidity"], self.server.uidvalidity("INBOX"))
        self.assertEqual(record["gm_msgid"], msgid)
        self.assertTrue(record["message_id"].startswith("<"))
        self.assertEqual((record["subject"], record["rules"]), ("receipt 1", ["Receipts"]))
        self.assertEqual(record["changes"], [
            {"action": "label", "label": "Receipts", "before": False, "after": True},
            {"action": "archive", "label": "\\Inbox", "before": True, "after": False}])
        audit = [r for r in self.store().audit.records() if r["type"] == "message"]
        self.maxDiff = None
        self.assertEqual(audit, records)
        self.assertEqual(run.reports[0].changed, {"Receipts": 1})

    def test_only_what_still_needs_doing_is_planned_or_shown(self):
        self.server.add_message(make_message("receipt done"), labels=("Receipts",))  # archived
        self.server.add_message(make_message("news read", extra="List-Unsubscribe: <x>\n"),
                                labels=("\\Inbox", "News"), flags=("\\Seen",))
        self.server.add_message(make_message("x", sender="a@spam.example"),
                                labels=("\\Trash",))
        records: list = []
        run = self.run_once(apply=False, folders=("INBOX", "[Gmail]/All Mail", "[Gmail]/Trash"),
                            records=records)
        self.assertEqual([r["changes"] for r in records], [[], [], [], []])
        self.assertEqual(run.counts, {})
        self.assertTrue(all(report.changes == {} for report in run.reports))
        self.assertTrue(all(report.changed == {} for report in run.reports))
        self.assertEqual(run.reports[0].matched, {"News": 1})


class RunOptionsTest(TempDirMixin, unittest.TestCase):
    """One RunOptions holds the settings Run and WatchSession share (issue 16, step 3)."""

    def store(self) -> gc.StateStore:
        store = gc.StateStore(self.make_dir())
        store.load()
        return store

    def test_run_takes_its_settings_as_keywords_or_as_one_options(self):
        rules = gc.Ruleset(())
        by_keyword = gc.Run(self.store(), rules, USER, "127.0.0.1", 993, apply=True,
                            reclassify=True, new_only=True, daily_budget=5)
        given = gc.RunOptions(apply=True, reclassify=True, new_only=True, daily_budget=5)
        by_options = gc.Run(self.store(), rules, USER, "127.0.0.1", 993, options=given)
        self.assertEqual(by_keyword.options, given)
        for run in (by_keyword, by_options):
            self.assertEqual((run.apply, run.reclassify, run.new_only, run.daily_budget),
                             (True, True, True, 5))
        self.assertEqual(gc.Run(self.store(), rules, USER, "h").options, gc.RunOptions())

    def test_watch_session_hands_its_options_to_each_run(self):
        session = gc.WatchSession(self.store(), lambda: gc.Ruleset(()), USER, "127.0.0.1",
                                  993, apply=True, reclassify=True, new_only=True,
                                  daily_budget=7, batch_size=3, allow_expunge=True)
        self.assertEqual(session.options, gc.RunOptions(
            apply=True, reclassify=True, new_only=True, daily_budget=7, batch_size=3,
            allow_expunge=True))
        self.assertTrue(session.apply)
        run = session._run()
        # --all and --new-only are set per folder by the session, not for the whole run.
        self.assertEqual(run.options, gc.RunOptions(apply=True, daily_budget=7, batch_size=3,
                                                    allow_expunge=True))
        self.assertEqual((run.apply, run.reclassify, run.new_only, run.daily_budget),
                         (True, False, False, 7))
        session.daily_budget = 11                       # a new day: the next run has it
        self.assertEqual(session.options.daily_budget, 11)
        self.assertEqual(session._run().daily_budget, 11)


class BudgetTest(StateTestCase):
    def test_stops_cleanly_before_the_daily_budget_and_goes_on_the_next_day(self):
        seed_mailbox(self.server, 30)
        with self.assertRaises(gc.BudgetExceededError) as ctx:
            self.run_once(batch_size=5, apply_every=1, daily_budget=9000)
        message = str(ctx.exception)
        self.assertIn("daily download budget", message)
        self.assertIn("after 00:00 UTC (in 12.0 h)", message)
        mark = self.mark().mark
        self.assertTrue(0 < mark < 30, mark)
        store = self.store()
        used = store.downloaded(gc.account_key(USER, "127.0.0.1", self.server.port))
        self.assertLessEqual(used, 9000)
        self.assertGreater(used, 4500)
        with self.assertRaises(gc.BudgetExceededError):
            self.run_once(batch_size=5, apply_every=1, daily_budget=9000)   # same day
        self.assertEqual(self.mark().mark, mark)
        self.clock.advance(hours=12)
        self.run_once(batch_size=5, apply_every=1, daily_budget=9000 * 3)
        self.assertEqual(self.mark().mark, 30)

    def test_warns_once_at_half_the_budget_and_counts_dry_runs(self):
        seed_mailbox(self.server, 6)
        self.run_once(apply=False)
        key = gc.account_key(USER, "127.0.0.1", self.server.port)
        used = self.store().downloaded(key)
        self.assertGreater(used, 1000)                     # a dry run counts too
        store = self.store()
        store.add_download(key, 1000000 - used)
        store.save()
        with self.assertLogs("gmail_classify", "WARNING") as logs:
            self.run_once(apply=False, batch_size=1, daily_budget=1900000)
        self.assertEqual(sum("half of the daily budget" in line for line in logs.output), 1)
        self.assertRegex(logs.output[0], r"9\d\d\.\d KB downloaded today")

    def test_no_budget_never_stops(self):
        seed_mailbox(self.server, 6)
        store = self.store()
        store.add_download(gc.account_key(USER, "127.0.0.1", self.server.port), 10 ** 12)
        store.save()
        run = self.run_once(batch_size=1, daily_budget=None)
        self.assertEqual(run.reports[0].examined, 6)
        self.server.add_message(make_message("receipt later"))
        with self.assertRaises(gc.BudgetExceededError):
            self.run_once(batch_size=1)                          # the default budget


class InterruptionTest(StateTestCase):
    def test_ctrl_c_mid_run_then_rerun_ends_like_a_clean_run(self):
        clean = FakeGmail().start()
        self.addCleanup(clean.stop)
        seed_mailbox(clean, 24)
        clean_dir = os.path.join(self.tmp, "clean")
        self.run_once(server=clean, state_dir=clean_dir, batch_size=4, apply_every=1)
        seed_mailbox(self.server, 24)
        original = gc._WriteFlight.move      # a step's moves go out as one flight
        calls = []

        def move_then_interrupt(flight, key, uids, destination):
            calls.append(destination)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return original(flight, key, uids, destination)

        with mock.patch.object(gc._WriteFlight, "move", move_then_interrupt):
            with self.assertRaises(KeyboardInterrupt):
                self.run_once(batch_size=4, apply_every=1)
        mark = self.mark().mark
        self.assertTrue(0 < mark < 24, mark)
        summary = [r for r in self.store().audit.records() if r["type"] == "summary"][-1]
        self.assertEqual(summary["status"], "failed")
        self.assertGreater(summary["changes_not_made"], 0)
        self.run_once(batch_size=4, apply_every=1)
        self.assertEqual(mailbox_snapshot(self.server), mailbox_snapshot(clean))
        self.assertEqual(state_snapshot(self.state_dir)["accounts"][
            gc.account_key(USER, "127.0.0.1", self.server.port)],
            state_snapshot(clean_dir)["accounts"][gc.account_key(USER, "127.0.0.1", clean.port)])


class UndoTest(StateTestCase):
    def undo(self, run_id: Optional[str] = None, apply: bool = True,
             records: Optional[list] = None) -> gc.Undo:
        store = self.store()
        undo = gc.Undo(store, USER, "127.0.0.1", self.server.port, run_id=run_id, apply=apply,
                       on_record=None if records is None else records.append)
        conn = self.connect()
        with (store.lock(undo.run.account) if apply else contextlib.nullcontext()):
            undo.execute(conn)
        undo.run.finish()
        return undo

    def test_undo_restores_the_exact_earlier_mailbox(self):
        seed_mailbox(self.server, 18)
        before = mailbox_snapshot(self.server)
        run = self.run_once()
        self.assertNotEqual(mailbox_snapshot(self.server), before)
        after_run = mailbox_snapshot(self.server)
        writes = len([c for c in self.commands() if c in WRITE_COMMANDS - {"SELECT"}])
        dry = self.undo(apply=False)
        self.assertEqual(mailbox_snapshot(self.server), after_run)   # a dry run changes nothing
        self.assertEqual(len([c for c in self.commands() if c in WRITE_COMMANDS - {"SELECT"}]),
                         writes)
        self.assertEqual(dry.reversed, run.changes_made)
        undo = self.undo()
        self.assertEqual(undo.undo_of, run.id)
        self.assertEqual((undo.reversed, undo.left_alone), (run.changes_made, 0))
        self.assertEqual(mailbox_snapshot(self.server), before)
        entries = gc.history(self.store())
        self.assertEqual(entries[0]["undo_of"], run.id)
        self.assertEqual(entries[1]["undone_by"], entries[0]["run"])
        with self.assertRaises(gc.StateError) as ctx:
            self.undo(run.id)
        self.assertIn("already undone", str(ctx.exception))
        with self.assertRaises(gc.StateError):
            self.undo()                                   # nothing left to undo

    def test_a_log_from_before_the_write_ahead_records_is_still_undone(self):
        # Version 1 logs hold message and summary records only: no intent, done or unsent.
        seed_mailbox(self.server, 9)
        before = mailbox_snapshot(self.server)
        run = self.run_once()
        self.assertGreater(run.changes_made, 0)
        path = os.path.join(self.state_dir, "audit.jsonl")
        with open(path, encoding="utf-8") as handle:
            kept = [line for line in handle
                    if json.loads(line)["type"] not in ("intent", "done", "unsent")]
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        records: list = []
        undo = self.undo(records=records)
        self.assertEqual(undo.reversed + undo.left_alone, run.changes_made)
        if self.server.gmail:
            self.assertEqual(undo.left_alone, 0)
            self.assertEqual(mailbox_snapshot(self.server), before)
        else:   # which copy stood for a label, only the intents' UIDVALIDITY can tell
            alone = [why for r in records for why in r["left_alone"]]
            self.assertEqual(len(alone), undo.left_alone)
            self.assertTrue(alone and all("written by an older version" in why
                                          for why in alone), alone)
        self.assertGreater(undo.restored_count, 0)
        again = self.run_once()                 # the same rules leave the restored mail alone
        self.assertEqual(again.changes_made, 0)

    def test_changes_made_since_are_reported_and_left_alone(self):
        receipt = self.server.add_message(make_message("receipt 1"))
        news = self.server.add_message(make_message("news", extra="List-Unsubscribe: <x>\n"))
        spam = self.server.add_message(make_message("buy", sender="x@spam.example"))
        self.run_once()
        # Since the run, the user removed the News label and emptied Trash of the spam.
        conn = self.connect()
        conn.select("[Gmail]/All Mail")
        conn.remove_labels(conn.search(["X-GM-MSGID", news]), ["News"])
        conn.select("[Gmail]/Trash")
        uid = conn.search(["X-GM-MSGID", spam])
        conn.add_flags(uid, ["\\Deleted"])
        conn.uid_expunge(uid)
        conn.close()
        records: list = []
        undo = self.undo(records=records)
        self.assertEqual(undo.left_alone, 2)
        alone = {r["subject"]: r["left_alone"] for r in records if r["left_alone"]}
        self.assertIn("label News: changed since", alone["news"][0])
        self.assertIn("no longer in [Gmail]/Trash", alone["buy"][0])
        self.assertEqual(self.server.message(receipt).labels, {"\\Inbox"})
        self.assertNotIn("\\Seen", self.server.message(news).flags)   # the rest was undone
        self.assertEqual(self.server.message(news).labels, {"\\Inbox"})

    def test_an_undo_cut_short_logs_what_it_did_and_can_be_run_again(self):
        seed_mailbox(self.server, 12)
        before = mailbox_snapshot(self.server)
        run = self.run_once()
        original = gc.GmailConnection.move
        calls = []

        def move_once(conn, uids, destination, **options):
            calls.append(destination)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return original(conn, uids, destination, **options)

        store = self.store()
        undo = gc.Undo(store, USER, "127.0.0.1", self.server.port, apply=True)
        with mock.patch.object(gc.GmailConnection, "move", move_once):
            with self.assertRaises(KeyboardInterrupt):
                undo.execute(self.connect())
        undo.run.finish("interrupted")
        self.assertGreater(undo.reversed, 0)
        logged = [r for r in self.store().audit.records()
                  if r.get("undo_of") == run.id and r["type"] == "message"]
        self.assertEqual(sum(len(r["changes"]) for r in logged), undo.reversed)
        again = self.undo(run.id)                      # not "already undone"
        self.assertEqual((again.reversed + undo.reversed, again.left_alone),
                         (run.changes_made, 0))        # the rest, nothing twice
        self.assertEqual(mailbox_snapshot(self.server), before)

    def test_unknown_or_foreign_run_ids_are_refused(self):
        seed_mailbox(self.server, 3)
        run = self.run_once()
        with self.assertRaises(gc.StateError) as ctx:
            self.undo("20200101T000000-dead")
        self.assertIn("history", str(ctx.exception))
        store = self.store()
        with self.assertRaises(gc.StateError) as ctx:
            gc.Undo(store, "other@example.com", "127.0.0.1", self.server.port, run_id=run.id)
        self.assertIn("pass that account's --user", str(ctx.exception))

    def test_undo_from_the_command_line(self):
        seed_mailbox(self.server, 6)
        before = mailbox_snapshot(self.server)
        env = {"GMAIL_APP_PASSWORD": PASSWORD, "XDG_STATE_HOME": os.path.join(self.tmp, "xdg")}
        argv = ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext"]
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump(SWEEP_DOC, handle)
        self.assertEqual(run_cli("run", "--rules", rules, "--apply", *argv, env=env)[0], 0)
        code, out, err = run_cli("undo", *argv, env=env)
        self.assertEqual(code, 0, err)
        self.assertIn("would untrash", out)
        self.assertIn("Dry run", out)
        code, out, err = run_cli("undo", "--apply", "--json", *argv, env=env)
        self.assertEqual(code, 0, err)
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(lines[-1]["type"], "summary")
        self.assertEqual(lines[-1]["command"], "undo")
        self.assertEqual(mailbox_snapshot(self.server), before)


class PlainUndoTest(UndoTest):
    server_options = {"gmail": False}

    def test_changes_made_since_are_reported_and_left_alone(self):
        self.server.add_message(make_message("receipt 1"))
        self.server.add_message(make_message("news", extra="List-Unsubscribe: <x>\n"))
        self.run_once()
        conn = self.connect()
        conn.select("INBOX")                      # the user marks the newsletter unread again
        conn.remove_flags(conn.search(["ALL"]), ["\\Seen"])
        conn.close()
        records: list = []
        undo = self.undo(records=records)
        self.assertEqual(undo.left_alone, 1)
        (alone,) = [r["left_alone"] for r in records if r["left_alone"]]
        self.assertIn("mark read: changed since", alone[0])
        # the copies are gone, and with them the folders the run had created for them
        self.assertNotIn("Receipts", self.server.folder_names())
        self.assertNotIn("News", self.server.folder_names())
        self.assertEqual(len(self.server.uids("INBOX")), 2)       # back from Archive
        self.assertEqual(self.server.uids("Archive"), [])


class UndoSafetyTest(StateTestCase):
    undo = UndoTest.undo

    def cli(self, *argv: str) -> Tuple[int, str, str]:
        env = {"GMAIL_APP_PASSWORD": PASSWORD, "XDG_STATE_HOME": os.path.join(self.tmp, "xdg")}
        if argv[0] == "history":
            return run_cli(*argv, env=env)
        rules = os.path.join(self.tmp, "rules.json")
        if not os.path.exists(rules):
            with open(rules, "w") as handle:
                json.dump(SWEEP_DOC, handle)
        return run_cli(*argv, "--user", USER, "--host", "127.0.0.1", "--port",
                       str(self.server.port), "--plaintext", "--rules", rules, env=env)

    def audit_path(self) -> str:
        (path,) = pathlib.Path(self.tmp, "xdg").glob("*/audit.jsonl")
        return str(path)

    def use(self, **options: Any) -> FakeGmail:
        self.server = FakeGmail(**options).start()
        self.addCleanup(self.check_fake_had_no_bugs)
        self.addCleanup(self.server.stop)
        return self.server

    def test_undo_on_a_server_without_move_or_uidplus_needs_allow_expunge_dry_run_too(self):
        self.use(kind="neither")
        seed_mailbox(self.server, 6)
        before = mailbox_snapshot(self.server)
        code, out, err = self.cli("run", "--apply", "--allow-expunge")
        self.assertEqual(code, gc.EXIT_OK, err)
        after_run = mailbox_snapshot(self.server)
        self.assertNotEqual(after_run["INBOX"], before["INBOX"])
        # Without --allow-expunge the dry run refuses exactly as --apply does, before any change.
        dry = self.cli("undo")
        applied = self.cli("undo", "--apply")
        self.assertEqual(applied[0], gc.EXIT_SERVER, applied[2])
        self.assertIn("--allow-expunge", applied[2])
        self.assertEqual((dry[0], errors(dry[2])), (applied[0], errors(applied[2])))
        self.assertNotIn("would", dry[1])
        self.assertEqual(mailbox_snapshot(self.server), after_run)
        # With it: the dry run shows the moves back, --apply makes them.
        code, out, err = self.cli("undo", "--allow-expunge")
        self.assertEqual(code, gc.EXIT_OK, err)
        self.assertIn("would move back to INBOX", out)
        self.assertEqual(mailbox_snapshot(self.server), after_run)
        code, out, err = self.cli("undo", "--apply", "--allow-expunge")
        self.assertEqual(code, gc.EXIT_OK, err)
        after_undo = mailbox_snapshot(self.server)
        self.assertEqual(after_undo["INBOX"], before["INBOX"])
        self.assertEqual(after_undo["Trash"], [])
        self.assertEqual(after_undo["Archive"], [])

    def test_undo_refuses_in_dry_run_too_where_another_message_is_marked_deleted(self):
        self.use(kind="neither")
        seed_mailbox(self.server, 6)
        self.assertEqual(self.cli("run", "--apply", "--allow-expunge")[0], gc.EXIT_OK)
        self.server.add_message(make_message("someone else's"), folder="Trash",
                                flags=["\\Deleted"])
        box = mailbox_snapshot(self.server)
        dry = self.cli("undo", "--allow-expunge")
        applied = self.cli("undo", "--apply", "--allow-expunge")
        self.assertEqual(applied[0], gc.EXIT_SERVER, applied[2])
        self.assertIn("marked \\Deleted", applied[2])
        self.assertEqual((dry[0], errors(dry[2])), (applied[0], errors(applied[2])))
        self.assertEqual(mailbox_snapshot(self.server), box)

    def test_watch_takes_allow_expunge_and_passes_it_on(self):
        self.use(kind="neither")
        parsed = gc.build_parser().parse_args(["watch", "--allow-expunge"])
        self.assertTrue(parsed.allow_expunge)
        self.assertTrue(gc.build_parser().parse_args(["undo", "--allow-expunge"]).allow_expunge)
        self.server.add_message(make_message("a digest"))
        rules = gc.parse_rules(SWEEP_DOC, "rules.json")
        for allow in (False, True):
            session = gc.WatchSession(self.store(), lambda: rules, USER, "127.0.0.1",
                                      self.server.port, apply=True, reclassify=True,
                                      allow_expunge=allow)
            session.check_start(["INBOX"])
            conn = self.connect()
            if allow:
                session(conn, ["INBOX"])
            else:
                with self.assertRaises(gc.CapabilityError):
                    session(conn, ["INBOX"])
            conn.close()
        self.assertEqual([_message_id_of(m.raw) for m in self.server.messages("Lists")],
                         [_message_id_of(make_message("a digest"))])
        self.assertEqual(self.server.uids("INBOX"), [])

    def test_malformed_audit_records_are_skipped_with_a_warning_never_undone(self):
        seed_mailbox(self.server, 6)
        before = mailbox_snapshot(self.server)
        self.assertEqual(self.cli("run", "--apply")[0], gc.EXIT_OK)
        path = self.audit_path()
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle]
        message = next(r for r in records if r["type"] == "message")
        summary = records[-1]
        bad = [dict(summary, run="20200101T000000-aaaa", changes_made="abc"),
               dict(message, run="20200101T000000-bbbb", changes=["x"]),
               dict(message, gm_msgid="abc"),        # the real run's: must not be acted on
               dict(message, uid="7")]
        with open(path, "a", encoding="utf-8") as handle:
            for record in bad:
                handle.write(json.dumps(record) + "\n")
        code, out, err = self.cli("history")
        self.assertEqual(code, gc.EXIT_OK, err)
        self.assertIn(summary["run"], out)
        self.assertNotIn("20200101T000000", out)
        self.assertIn(f"{path} line {len(records) + 1}:", err)
        self.assertIn("'changes_made' is not a whole number", err)
        code, out, err = self.cli("undo", "20200101T000000-bbbb")
        self.assertEqual(code, gc.EXIT_USAGE, err)
        code, out, err = self.cli("undo", "--apply")
        self.assertEqual(code, gc.EXIT_OK, err)
        self.assertIn(f"{path} line", err)
        self.assertEqual(mailbox_snapshot(self.server), before)

    def test_undo_never_deletes_a_copy_the_run_did_not_make(self):
        self.use(gmail=False)
        self.server.add_message(make_message("receipt 1"))
        self.run_once()
        (copy,) = self.server.messages("Receipts")
        conn = self.connect()
        conn.select("Receipts")              # the user deletes the run's copy ...
        uids = conn.search(["ALL"])
        conn.add_flags(uids, ["\\Deleted"])
        conn.uid_expunge(uids)
        conn.close()
        self.server.add_message(copy.raw, folder="Receipts")   # ... and files their own
        records: list = []
        undo = self.undo(records=records)
        self.assertEqual([m.raw for m in self.server.messages("Receipts")], [copy.raw])
        self.assertEqual(undo.left_alone, 1)
        (alone,) = [r["left_alone"] for r in records if r["left_alone"]]
        self.assertIn("label Receipts: the copy the run made is no longer in Receipts",
                      alone[0])
        self.assertEqual(len(self.server.uids("INBOX")), 1)       # the rest was undone
        self.assertIn("Receipts", self.server.folder_names())    # it holds mail: it stays

    def test_a_dry_run_undo_predicts_which_created_folders_go(self):
        for options in ({"gmail": False}, {}):
            with self.subTest(**options):
                self.use(**options)
                self.state_dir = os.path.join(self.tmp, f"state-{len(options)}")
                seed_mailbox(self.server, 12)
                run = self.run_once()
                created = [name for report in run.reports for name in report.created]
                self.assertIn("Lists", created)
                with self.assertLogs("gmail_classify", "INFO") as logs:
                    dry = self.undo(apply=False)
                self.assertEqual([line for line in logs.output if "holds mail" in line], [])
                self.assertEqual(sorted(dry.deleted), sorted(created))
                undo = self.undo()
                self.assertEqual(undo.deleted, dry.deleted)
                for name in created:
                    self.assertNotIn(name, self.server.folder_names())


class WriteAheadUndoTest(StateTestCase):
    undo = UndoTest.undo
    use = UndoSafetyTest.use

    def audit_file(self) -> str:
        return os.path.join(self.state_dir, "audit.jsonl")

    def append_records(self, *records: Dict[str, Any]) -> None:
        with open(self.audit_file(), "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")

    def logged(self, since: int = 0) -> List[bytes]:
        return [e.line for e in self.server.log[since:]]

    def test_intents_reach_the_log_before_the_first_write_command(self):
        self.use(gmail=False)
        seed_mailbox(self.server, 6)
        seen = []
        original = gc._WriteFlight.send

        def send(flight):          # the step's copies go out as one flight
            if any(write.command == "UID COPY" for write in flight.writes):
                with open(self.audit_file(), encoding="utf-8") as handle:
                    seen.append([json.loads(line) for line in handle])
            return original(flight)

        with mock.patch.object(gc._WriteFlight, "send", send):
            run = self.run_once()
        intents = [r for r in seen[0] if r["type"] == "intent" and r.get("changes")]
        self.assertEqual({r["version"] for r in intents}, {2})
        labelled = [r for r in intents for c in r["changes"] if c["action"] == "label"]
        self.assertTrue(labelled)
        for record in intents:
            self.assertIsInstance(record["size"], int)
            self.assertRegex(record["internaldate"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        after = next(c["after"] for r in labelled for c in r["changes"] if c["action"] == "label")
        self.assertEqual(after["uidvalidity"], self.server.uidvalidity(after["folder"]))
        self.assertEqual(after["uidnext"], 1)
        self.assertTrue(any(r.get("create") for r in seen[0]))   # CREATE was announced too
        self.assertEqual(gc.history(self.store())[0]["maybe"], 0)
        self.assertEqual(gc.history(self.store())[0]["changes_made"], run.changes_made)

    def test_a_clean_run_has_no_maybe_changes_on_any_server(self):
        for options in ({}, {"gmail": False}, {"kind": "uidplus"}, {"kind": "no-special-use"}):
            with self.subTest(**options):
                self.use(**options)
                self.state_dir = os.path.join(self.tmp, f"clean-{len(self.server.log)}-"
                                                        f"{self.server.port}")
                seed_mailbox(self.server, 12)
                run = self.run_once(batch_size=3, apply_every=2)
                (entry,) = gc.history(self.store())
                self.assertEqual((entry["maybe"], entry["changes_made"]),
                                 (0, run.changes_made))

    def test_undo_writes_its_own_intents_before_its_changes(self):
        self.use(gmail=False)
        seed_mailbox(self.server, 6)
        run = self.run_once()
        undo = self.undo()
        with open(self.audit_file(), encoding="utf-8") as handle:
            mine = [json.loads(line) for line in handle]
        mine = [r for r in mine if r["run"] == undo.run.id]
        kinds = [r["type"] for r in mine]
        self.assertIn("intent", kinds)
        self.assertLess(kinds.index("intent"), kinds.index("message"))
        self.assertTrue(any(r.get("delete") for r in mine if r["type"] == "intent"))
        entry = next(e for e in gc.history(self.store()) if e["run"] == undo.run.id)
        self.assertEqual((entry["command"], entry["maybe"]), ("undo", 0))
        self.assertEqual(entry["changes_made"], run.changes_made)

    def test_a_command_executed_but_never_confirmed_is_maybe_and_undo_reverses_it(self):
        for command, options in (("UID MOVE", {}), ("UID MOVE", {"gmail": False}),
                                 ("UID COPY", {"gmail": False}),      # a label's copy
                                 ("UID EXPUNGE", {"kind": "uidplus"}),
                                 ("UID STORE", {}), ("UID STORE", {"gmail": False})):
            with self.subTest(command=command, **options):
                self.use(**options)
                self.state_dir = os.path.join(self.tmp, f"state-{self.server.port}")
                seed_mailbox(self.server, 6)
                before = mailbox_snapshot(self.server)
                self.server.add_fault(command, action="drop", when="after")
                with self.assertRaises(gc.GmailClassifyError):
                    self.run_once(retries=0)
                self.assertNotEqual(mailbox_snapshot(self.server), before)
                (entry,) = gc.history(self.store())
                self.assertGreater(entry["maybe"], 0)      # the MOVE the server made
                self.assertGreaterEqual(entry["changes_made"], entry["maybe"])
                undo = self.undo()
                self.assertEqual(undo.left_alone, 0)
                self.assertEqual(mailbox_snapshot(self.server), before)

    def test_an_undo_cut_after_a_command_it_sent_finishes_on_the_next_undo(self):
        for command, options in (("UID MOVE", {}), ("UID MOVE", {"gmail": False}),
                                 ("UID STORE", {"gmail": False}),
                                 ("UID EXPUNGE", {"gmail": False})):
            with self.subTest(command=command, **options):
                self.use(**options)
                self.state_dir = os.path.join(self.tmp, f"undo-cut-{self.server.port}")
                seed_mailbox(self.server, 12)
                before = mailbox_snapshot(self.server)
                run = self.run_once()
                store = self.store()
                first = gc.Undo(store, USER, "127.0.0.1", self.server.port, apply=True)
                self.server.add_fault(command, action="drop", when="after")
                with self.assertRaises(gc.GmailClassifyError):
                    first.execute(self.connect(retries=0))
                first.run.finish("failed")
                self.assertTrue(self.server.fired)
                second = self.undo(run.id)
                self.assertEqual(second.left_alone, 0)
                self.assertEqual(mailbox_snapshot(self.server), before)

    def test_a_maybe_change_that_did_not_happen_sends_nothing(self):
        self.use(gmail=False)
        seed_mailbox(self.server, 6)
        before = mailbox_snapshot(self.server)
        self.server.add_fault("UID MOVE", action="drop", when="before")
        with self.assertRaises(gc.GmailClassifyError):
            self.run_once(retries=0)
        entry = gc.history(self.store())[0]
        self.assertGreater(entry["maybe"], 0)
        start = len(self.server.log)
        undo = self.undo()
        self.assertGreater(undo.unmade, 0)
        self.assertEqual(undo.left_alone, 0)
        self.assertEqual(mailbox_snapshot(self.server), before)
        moves = [line for line in self.logged(start) if b" MOVE " in line]
        # Only what the run made went back: nothing was moved out of the folder the
        # unconfirmed MOVE would have filled, since it never was.
        self.assertFalse(any(b"Lists" in line for line in moves), moves)

    def test_undo_without_a_run_id_picks_an_unfinished_run(self):
        self.use(gmail=False)
        seed_mailbox(self.server, 6)
        first = self.run_once()
        self.server.add_message(make_message("weekly digest late"))
        self.server.add_fault("UID MOVE", action="drop", when="after")
        with self.assertRaises(gc.GmailClassifyError):
            self.run_once(retries=0)
        entries = gc.history(self.store())
        self.assertEqual(entries[0]["status"], "failed")
        store = self.store()
        undo = gc.Undo(store, USER, "127.0.0.1", self.server.port)
        self.assertNotEqual(undo.undo_of, first.id)
        self.assertEqual(undo.undo_of, entries[0]["run"])

    def test_an_unfinished_run_with_only_intents_is_picked_by_undo(self):
        # A run killed right after its intents were written: no done record at all.
        self.use(gmail=False)
        seed_mailbox(self.server, 6)
        first = self.run_once()
        self.server.add_message(make_message("weekly digest late"))
        original = gc._WriteFlight.send

        def die(flight):
            original(flight)
            if any(write.command == "UID MOVE" for write in flight.writes):
                raise SystemExit(143)       # killed: no record after the command

        with mock.patch.object(gc._WriteFlight, "send", die):
            with self.assertRaises(SystemExit):
                self.run_once()
        entries = gc.history(self.store())
        self.assertEqual((entries[0]["status"], entries[0]["maybe"]), ("failed", 1))
        undo = self.undo()
        self.assertNotEqual(undo.undo_of, first.id)
        self.assertEqual((undo.reversed, undo.left_alone), (1, 0))
        self.assertNotIn(_message_id_of(make_message("weekly digest late")),
                         [_message_id_of(m.raw) for m in self.server.messages("Lists")])

    @unittest.skipUnless(hasattr(signal, "pthread_sigmask"), "POSIX signal masks")
    def test_a_signal_during_the_audit_write_waits_for_the_whole_write(self):
        # Python's own Ctrl-C handler, even where the suite was started with SIGINT
        # ignored (a shell's background job): that is what raises KeyboardInterrupt.
        self.addCleanup(signal.signal, signal.SIGINT,
                        signal.signal(signal.SIGINT, signal.default_int_handler))
        log = gc.AuditLog(Path(self.tmp) / "audit.jsonl")
        real_write = os.write
        sent = []

        def write(fd, data):
            if not sent:                     # Ctrl-C lands in the middle of the write
                sent.append(True)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return real_write(fd, data)

        with mock.patch("os.write", write):
            with self.assertRaises(KeyboardInterrupt):
                log.append([{"type": "intent", "run": "r", "n": n} for n in range(3)])
        self.assertEqual([r["n"] for r in log.records()], [0, 1, 2])

    def test_without_signal_masks_the_audit_write_still_goes_through(self):
        # Windows has no pthread_sigmask: the hold is then nothing, not an error.
        log = gc.AuditLog(Path(self.tmp) / "audit.jsonl")
        with mock.patch.object(signal, "pthread_sigmask", None, create=True):
            log.append([{"type": "intent", "run": "r", "n": 1}])
        self.assertEqual([r["n"] for r in log.records()], [1])

    @unittest.skipUnless(hasattr(signal, "pthread_sigmask"), "POSIX signal masks")
    def test_a_signal_handled_as_the_mask_is_set_leaves_no_signal_blocked(self):
        # The Python handler of a signal that arrived during the blocking call runs as
        # soon as the call returns: the hold must still give the old mask back.
        real = signal.pthread_sigmask
        before = real(signal.SIG_BLOCK, ())
        self.addCleanup(real, signal.SIG_SETMASK, before)

        def blocking(how, signals):
            old = real(how, signals)
            if how == signal.SIG_BLOCK and signal.SIGINT in set(signals):
                raise KeyboardInterrupt     # Ctrl-C, handled right after the call
            return old

        with mock.patch.object(signal, "pthread_sigmask", blocking):
            with self.assertRaises(KeyboardInterrupt):
                with gc._signals_held():
                    self.fail("the hold was entered")
        self.assertEqual(real(signal.SIG_BLOCK, ()), before)

    def test_a_torn_last_line_never_swallows_the_next_run(self):
        self.use(gmail=False)
        self.state_dir = os.path.join(self.tmp, "gmail_classify")   # where the CLI looks
        seed_mailbox(self.server, 6)
        first = self.run_once()
        with open(self.audit_file(), "rb") as handle:
            data = handle.read()
        with open(self.audit_file(), "wb") as handle:
            handle.write(data[:-40])            # the summary line cut mid-way
        self.server.add_message(make_message("weekly digest late"))
        second = self.run_once()
        entries = {e["run"]: e for e in gc.history(self.store())}
        self.assertEqual(entries[second.id]["changes_made"], second.changes_made)
        self.assertEqual(entries[second.id]["status"], "complete")
        self.assertTrue(entries[first.id]["possibly_incomplete"])
        self.assertFalse(entries[second.id]["possibly_incomplete"])
        code, out, err = run_cli("history", env={"XDG_STATE_HOME": self.tmp,
                                                 "GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 0, err)
        self.assertIn("possibly incomplete", out)

    def test_a_forged_label_record_in_inbox_is_refused(self):
        self.use(gmail=False)
        seed_mailbox(self.server, 6)
        self.server.add_message(make_message("the victim"))
        run = self.run_once()
        (victim,) = [m for m in self.server.messages("INBOX") if b"the victim" in m.raw]
        uid = self.server.uids("INBOX")[[m.raw for m in self.server.messages("INBOX")].index(victim.raw)]
        self.append_records({
            "type": "message", "version": 1, "run": run.id, "applied": True,
            "account": USER, "host": f"127.0.0.1:{self.server.port}", "folder": "INBOX",
            "uid": uid, "uidvalidity": self.server.uidvalidity("INBOX"),
            "message_id": _message_id_of(victim.raw), "subject": "the victim",
            "changes": [{"action": "label", "label": "Receipts", "before": None,
                         "after": {"folder": "INBOX", "uid": uid}}]})
        start = len(self.server.log)
        records: list = []
        self.undo(records=records)
        self.assertIn(victim.raw, [m.raw for m in self.server.messages("INBOX")])
        for line in self.logged(start):
            self.assertNotIn(b"UID EXPUNGE " + str(uid).encode(), line)
        (alone,) = [r["left_alone"] for r in records if r["subject"] == "the victim"]
        self.assertIn("not something the run can have done", alone[0])

    def test_a_forged_gmail_trash_record_is_refused(self):
        seed_mailbox(self.server, 6)
        victim = self.server.add_message(make_message("the victim"))
        run = self.run_once()
        self.assertIn("\\Inbox", self.server.message(victim).labels)
        self.append_records({
            "type": "message", "version": 1, "run": run.id, "applied": True,
            "account": USER, "host": f"127.0.0.1:{self.server.port}",
            "folder": "[Gmail]/Trash", "uid": 1, "gm_msgid": victim,
            "message_id": _message_id_of(make_message("the victim")), "subject": "the victim",
            "changes": [{"action": "trash", "before": {"folder": "[Gmail]/Trash", "uid": 1},
                         "after": {"folder": "INBOX", "uid": 7}}]})
        start = len(self.server.log)
        self.undo()
        self.assertIn("\\Inbox", self.server.message(victim).labels)
        self.assertNotIn("\\Trash", self.server.message(victim).labels)
        self.assertFalse([e.line for e in self.server.log[start:]
                          if e.command in ("UID MOVE", "UID COPY") and b"Trash" in e.line])
        trash = [m for m in self.server.messages("[Gmail]/Trash")
                 if _message_id_of(m.raw) == _message_id_of(make_message("the victim"))]
        self.assertEqual(trash, [])

    def test_a_forged_move_record_into_a_folder_the_run_used_is_refused(self):
        self.use(gmail=False)
        theirs = make_message("kept in Lists long before")
        self.server.add_message(theirs, folder="Lists")
        self.server.add_message(make_message("weekly digest 1"))
        run = self.run_once()
        self.assertEqual(len(self.server.uids("Lists")), 2)
        self.append_records({
            "type": "message", "version": 1, "run": run.id, "applied": True,
            "account": USER, "host": f"127.0.0.1:{self.server.port}", "folder": "INBOX",
            "uid": 77, "uidvalidity": self.server.uidvalidity("INBOX"),
            "message_id": _message_id_of(theirs), "subject": "forged",
            "changes": [{"action": "move", "before": {"folder": "INBOX", "uid": 77},
                         "after": {"folder": "Lists", "uid": self.server.uids("Lists")[0]}}]})
        records: list = []
        undo = self.undo(records=records)
        self.assertEqual([m.raw for m in self.server.messages("Lists")], [theirs])
        self.assertEqual((undo.reversed, undo.left_alone), (1, 1))
        (alone,) = [r["left_alone"] for r in records if r["subject"] == "forged"]
        self.assertIn("the run wrote no intent for it", alone[0])

    def test_a_recreated_label_folder_keeps_its_message(self):
        self.use(gmail=False)
        self.server.add_message(make_message("receipt 1"))
        self.run_once()
        (copy,) = self.server.messages("Receipts")
        conn = self.connect()
        conn.select("Receipts")                  # the folder is emptied, made anew ...
        uids = conn.search(["ALL"])
        conn.add_flags(uids, ["\\Deleted"])
        conn.uid_expunge(uids)
        conn.close()
        self.server.bump_uidvalidity("Receipts")
        self.server.add_message(copy.raw, folder="Receipts")   # ... and holds another copy
        self.assertEqual(self.server.uids("Receipts"), [1])
        start = len(self.server.log)
        records: list = []
        undo = self.undo(records=records)
        self.assertEqual([m.raw for m in self.server.messages("Receipts")], [copy.raw])
        self.assertIn("Receipts", self.server.folder_names())
        self.assertFalse([line for line in self.logged(start) if b"EXPUNGE" in line])
        (alone,) = [r["left_alone"] for r in records if r["left_alone"]]
        self.assertIn("UIDVALIDITY changed", alone[0])
        self.assertEqual(undo.left_alone, 1)

    def test_a_moved_message_gone_is_not_replaced_by_one_sharing_its_message_id(self):
        self.use(gmail=False)
        digest = make_message("weekly digest 1")
        self.server.add_message(digest)
        self.run_once()
        conn = self.connect()
        conn.select("Lists")                     # the user deletes the moved digest ...
        uids = conn.search(["ALL"])
        conn.add_flags(uids, ["\\Deleted"])
        conn.uid_expunge(uids)
        conn.close()
        # ... and a stranger's message claims its Message-ID.
        forged = digest.replace(b"weekly digest 1", b"something else entirely")
        self.assertEqual(_message_id_of(forged), _message_id_of(digest))
        self.server.add_message(forged, folder="Lists")
        records: list = []
        undo = self.undo(records=records)
        self.assertEqual([m.raw for m in self.server.messages("Lists")], [forged])
        self.assertEqual(self.server.uids("INBOX"), [])
        self.assertEqual(undo.left_alone, 1)

    def test_undo_then_run_leaves_the_restored_mail_alone_until_the_rules_change(self):
        for options in ({}, {"gmail": False}):
            with self.subTest(**options):
                self.use(**options)
                self.state_dir = os.path.join(self.tmp, f"undone-{len(options)}")
                seed_mailbox(self.server, 12)
                before = mailbox_snapshot(self.server)
                self.run_once()
                undo = self.undo()
                self.assertGreater(undo.restored_count, 0)
                self.assertEqual(mailbox_snapshot(self.server), before)
                start = len(self.server.log)
                again = self.run_once()                   # same rules: nothing redone
                self.assertEqual(again.changes_made, 0)
                self.assertEqual(mailbox_snapshot(self.server), before)
                self.assertFalse([e.line for e in self.server.log[start:]
                                  if e.command in WRITE_COMMANDS - {"SELECT"}])
                # Changed rules classify them again; so does --all with the same rules.
                changed = dict(SWEEP_DOC, rule=SWEEP_DOC["rule"] + [
                    {"name": "Never", "subject": "no such subject at all", "star": True}])
                redo = self.run_once(gc.parse_rules(changed, "rules.json"))
                self.assertGreater(redo.changes_made, 0)
                self.undo()
                self.assertEqual(mailbox_snapshot(self.server), before)
                self.assertGreater(self.run_once(reclassify=True).changes_made, 0)

    def test_the_undo_dry_run_names_the_folder_and_uid_of_what_it_would_expunge(self):
        self.use(gmail=False)
        self.server.add_message(make_message("receipt 1"))
        self.server.add_message(make_message("weekly digest 1"))
        self.assertEqual(UndoSafetyTest.cli(self, "run", "--apply")[0], gc.EXIT_OK)
        (copy_uid,) = self.server.uids("Receipts")
        (moved_uid,) = self.server.uids("Lists")
        box = mailbox_snapshot(self.server)
        code, out, err = UndoSafetyTest.cli(self, "undo")
        self.assertEqual(code, gc.EXIT_OK, err)
        self.assertIn(f"would remove label Receipts (expunges Receipts UID {copy_uid})", out)
        self.assertIn(f"would move back to INBOX (from Lists UID {moved_uid})", out)
        self.assertIn("fix the rules before restarting a timer or watch", out)
        self.assertEqual(mailbox_snapshot(self.server), box)

    def test_a_message_skipped_for_its_content_is_recorded_and_passed_by_the_mark(self):
        self.use(gmail=False)
        self.state_dir = os.path.join(self.tmp, "gmail_classify")   # where the CLI looks
        for subject in ("receipt 1", "poisoned", "receipt 2"):
            self.server.add_message(make_message(subject))
        original = gc._message_info

        def unreadable(uid, values, *args):
            info = original(uid, values, *args)
            if gc.header_text(info.headers, "subject") == ["poisoned"]:
                raise gc.ContentSkip("its Subject cannot be read in bounded time")
            return info

        with mock.patch.object(gc, "_message_info", unreadable):
            with self.assertLogs("gmail_classify", "WARNING") as logs:
                run = self.run_once(batch_size=1, apply_every=1)   # a step of it alone
        self.assertTrue(any("left alone for its content" in line for line in logs.output))
        (report,) = run.reports
        poisoned = 2                                       # the second message
        self.assertEqual(report.content_skipped, {poisoned: "its Subject cannot be read in "
                                                            "bounded time"})
        self.assertEqual(report.skipped, [])
        self.assertEqual(self.mark().mark, 3)             # the mark passed it
        self.assertEqual(len(self.server.uids("Receipts")), 2)
        skipped = [r for r in self.store().audit.records() if r["type"] == "skipped"]
        self.assertEqual([(r["uid"], r["version"]) for r in skipped], [(poisoned, 2)])
        self.assertEqual(gc.history(self.store())[0]["skipped"], 1)
        code, out, err = run_cli("history", env={"XDG_STATE_HOME": self.tmp,
                                                 "GMAIL_APP_PASSWORD": PASSWORD})
        self.assertIn("1 message skipped for its content", out)

    def test_the_moved_message_is_found_by_message_id_size_and_date(self):
        self.use(gmail=False)
        digest = make_message("weekly digest 1")
        self.server.add_message(digest)
        self.run_once()
        self.server.bump_uidvalidity("Lists")       # renumbered: the recorded UID means nothing
        self.server.add_message(make_message("another list mail"), folder="Lists")
        undo = self.undo()
        self.assertEqual((undo.reversed, undo.left_alone), (1, 0))
        self.assertEqual([m.raw for m in self.server.messages("INBOX")], [digest])


class WholeRecordTest(StateTestCase):
    """Issue 15, finishing the record: done records, undo of folder-only runs, batched
    undo lookups, and undo after a plain EXPUNGE that left a message behind."""
    undo = UndoTest.undo
    use = UndoSafetyTest.use
    LABEL_ONLY = {"rule": [{"name": "Receipts", "subject": "receipt", "label": "Receipts"}]}
    cli = UndoSafetyTest.cli
    subjects = AnyServerTest.subjects

    def audit(self) -> List[Dict[str, Any]]:
        with open(os.path.join(self.state_dir, "audit.jsonl"), encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def test_undo_looks_up_label_copies_with_one_fetch_per_folder(self):
        self.use(gmail=False)
        for n in range(7):
            self.server.add_message(make_message(f"receipt {n}"))
        self.run_once(gc.parse_rules(self.LABEL_ONLY, "rules.json"))
        self.assertEqual(len(self.server.uids("Receipts")), 7)
        start = len(self.server.log)
        undo = self.undo()
        self.assertEqual((undo.reversed, undo.left_alone), (7, 0))
        fetches = [e.line for e in self.server.log[start:] if e.command == "UID FETCH"]
        looks = [line for line in fetches if b"MESSAGE-ID" in line.upper()
                 and b"RFC822.SIZE" in line.upper()]
        self.assertEqual(len(looks), 1, fetches)
        self.assertIn(b" 1:7 ", looks[0])
        self.assertEqual(self.server.uids("Receipts") if "Receipts" in
                         self.server.folder_names() else [], [])
        self.assertEqual(len(self.server.uids("INBOX")), 7)

    def test_undo_reports_a_message_a_plain_expunge_left_and_exits_6(self):
        self.use(kind="neither")
        self.server.add_message(make_message("weekly digest"))
        code, out, err = self.cli("run", "--apply", "--allow-expunge")
        self.assertEqual(code, gc.EXIT_OK, err)
        self.assertEqual(self.subjects("Lists"), ["weekly digest"])
        # Another client clears \Deleted on our message in Lists between the undo's
        # check and its EXPUNGE: it is copied to INBOX but stays in Lists too.
        self.server.add_fault("EXPUNGE", action="unmark_deleted")
        code, out, err = self.cli("undo", "--apply", "--allow-expunge")
        self.assertEqual(code, gc.EXIT_INCOMPLETE, err)
        self.assertEqual([a for a, _, _ in self.server.other_client], ["unmark_deleted"])
        self.assertEqual(self.subjects("INBOX"), ["weekly digest"])
        self.assertEqual(self.subjects("Lists"), ["weekly digest"])
        self.assertIn("left alone: copied back to INBOX, but still in Lists too", out)
        self.assertNotIn("vanished", out)
        self.assertIn("Lists: the plain EXPUNGE did not do what was expected", err)
        self.assertIn("reversed 0 changes; 1 left alone", out)

    def test_undo_with_a_plain_expunge_that_did_what_was_expected_exits_0(self):
        self.use(kind="neither")
        self.server.add_message(make_message("weekly digest"))
        self.assertEqual(self.cli("run", "--apply", "--allow-expunge")[0], gc.EXIT_OK)
        code, out, err = self.cli("undo", "--apply", "--allow-expunge")
        self.assertEqual((code, errors(err)), (gc.EXIT_OK, []), err)
        self.assertEqual(self.subjects("INBOX"), ["weekly digest"])
        self.assertEqual(self.server.uids("Lists") if "Lists" in self.server.folder_names()
                         else [], [])

    def test_history_and_undo_skip_record_types_they_do_not_know(self):
        self.use(gmail=False)
        seed_mailbox(self.server, 6)
        before = mailbox_snapshot(self.server)
        run = self.run_once()
        expected = gc.history(self.store())
        with open(os.path.join(self.state_dir, "audit.jsonl"), "a", encoding="utf-8") as handle:
            for uid in (1, 2):      # what a later version might write, naming this run
                handle.write(json.dumps({"type": "checkpoint", "version": 3, "run": run.id,
                                         "folder": "INBOX", "uid": uid, "uids": [uid],
                                         "changes": [{"action": "trash"}]}) + "\n")
        self.assertEqual(gc.history(self.store()), expected)
        undo = self.undo()
        self.assertEqual((undo.reversed, undo.left_alone), (run.changes_made, 0))
        self.assertEqual(mailbox_snapshot(self.server), before)

    # -- done records: a run killed outright (SIGKILL, a power cut) -----------------------

    def run_killed_at(self, command: str, nth: int) -> subprocess.Popen:
        """`run --apply` in a subprocess, killed with SIGKILL when the fake server receives
        the nth ``command`` (before executing it: the fake then executes it all the same,
        as a server that read the command would)."""
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump(SWEEP_DOC, handle)
        holder: List[subprocess.Popen] = []
        self.server.add_fault(command, nth=nth, action="call",
                              callback=lambda: os.kill(holder[0].pid, signal.SIGKILL))
        env = dict(os.environ, GMAIL_APP_PASSWORD=PASSWORD,
                   XDG_STATE_HOME=os.path.join(self.tmp, "xdg"))
        env.pop("GMAIL_OAUTH_TOKEN", None)
        script = os.path.join(os.path.dirname(os.path.abspath(gc.__file__)), "gmail_classify.py")
        process = subprocess.Popen([sys.executable, script, "run", "--apply", "--user", USER,
                                    "--host", "127.0.0.1", "--port", str(self.server.port),
                                    "--plaintext", "--rules", rules], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        holder.append(process)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        process.communicate(timeout=60)
        self.assertEqual(process.returncode, -signal.SIGKILL)
        return process

    def killed_audit(self) -> List[Dict[str, Any]]:
        with open(UndoSafetyTest.audit_path(self), encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    @unittest.skipUnless(hasattr(signal, "SIGKILL"), "POSIX signals")
    def test_a_run_killed_after_a_confirmed_copy_has_done_records_and_history_counts_it_made(self):
        self.use(gmail=False)
        seed_mailbox(self.server, 12)
        before = mailbox_snapshot(self.server)
        # Killed as the moves go out: the labels and flags went before them, in one flight
        # whose answers were all read (and recorded) before any move was sent.
        self.run_killed_at("UID MOVE", 1)
        records = self.killed_audit()
        self.assertEqual([r for r in records if r["type"] in ("message", "summary")], [])
        done = [r for r in records if r["type"] == "done"]
        copies = [r for r in done if r.get("action") == "label"]
        self.assertEqual(sorted(r["label"] for r in copies), ["News", "Receipts", "Two words",
                                                              "Work"])
        for first in copies:
            self.assertEqual(first["version"], 2)
            self.assertEqual(first["folder"], "INBOX")
            self.assertEqual(first["uidvalidity"], self.server.uidvalidity("INBOX"))
            self.assertEqual(first["destination"], first["label"])
            self.assertEqual(len(first["new_uids"]), len(first["uids"]))
            self.assertEqual(sorted(first["new_uids"]), self.server.uids(first["destination"]))
        self.assertEqual([r for r in done if r.get("action") in ("move", "archive", "trash")], [])
        creates = [r for r in done if r.get("create")]
        self.assertTrue(creates)
        self.assertTrue(all(r["created"] for r in creates))
        intended = sum(len(r["changes"]) for r in records
                       if r["type"] == "intent" and r.get("changes"))
        confirmed = sum(len(r["uids"]) for r in done if r.get("uids"))
        (entry,) = gc.history(self.store(os.path.join(self.tmp, "xdg", "gmail_classify")))
        self.assertEqual(entry["status"], "unfinished")
        self.assertEqual(entry["changes_made"], intended)
        self.assertEqual(entry["maybe"], intended - confirmed)
        for first in copies:
            self.assertEqual(entry["counts"][f"label {first['label']}"], len(first["uids"]))
        self.assertEqual(entry["folders_created"], len(creates))
        # Undo takes back what was made (the confirmed copies by their COPYUID UIDs, the
        # moves, which the server did execute, as maybe changes found on the server).
        code, out, err = UndoSafetyTest.cli(self, "undo", "--apply")
        self.assertEqual(code, gc.EXIT_OK, err)
        self.assertEqual(mailbox_snapshot(self.server), before)

    def test_history_and_undo_of_a_run_that_only_created_folders_before_a_refused_create(self):
        self.use(gmail=False)
        seed_mailbox(self.server, 12)
        before = mailbox_snapshot(self.server)
        self.server.add_fault("CREATE", nth=3, action="no", text="Character not allowed")
        code, out, err = UndoSafetyTest.cli(self, "run", "--apply")
        self.assertEqual(code, gc.EXIT_SERVER, err)
        made = sorted(set(self.server.folder_names()) - set(before))
        # The step's CREATEs go out together (one flight): all but the refused one are made.
        self.assertEqual(len(made), 4)
        self.assertEqual([self.server.uids(name) for name in made], [[], [], [], []])
        code, out, err = UndoSafetyTest.cli(self, "history")
        self.assertEqual(code, gc.EXIT_OK, err)
        self.assertIn("4 folders created", out)
        self.assertNotIn("no changes", out)
        code, out, err = UndoSafetyTest.cli(self, "undo")           # dry run
        self.assertEqual(code, gc.EXIT_OK, err)
        for name in made:
            self.assertIn(f"would delete the empty folder {name}", out)
        self.assertEqual(sorted(set(self.server.folder_names()) - set(before)), made)
        code, out, err = UndoSafetyTest.cli(self, "undo", "--apply")
        self.assertEqual(code, gc.EXIT_OK, err)
        self.assertEqual(mailbox_snapshot(self.server), before)
        self.assertEqual(self.server.count("DELETE"), 4)
        code, out, err = UndoSafetyTest.cli(self, "undo", "--apply")  # nothing left to undo
        self.assertEqual(code, gc.EXIT_USAGE, err)

    @unittest.skipUnless(hasattr(signal, "SIGKILL"), "POSIX signals")
    def test_undo_deletes_a_folder_whose_create_was_never_answered_only_if_it_never_held_mail(self):
        for holds in (False, True):
            with self.subTest(holds=holds):
                self.use(gmail=False)
                self.tmp = tempfile.mkdtemp(dir=self.tmp)
                seed_mailbox(self.server, 12)
                before = mailbox_snapshot(self.server)
                # Killed as the first CREATE of the step's flight arrives, before any
                # answer: every CREATE announced is "maybe" (the fake makes the first all
                # the same, and perhaps the others it had already read).
                self.run_killed_at("CREATE", 1)
                records = self.killed_audit()
                self.assertEqual([r for r in records if r["type"] == "done"], [])
                announced = [r["create"] for r in records if r["type"] == "intent"
                             and r.get("create")]
                self.assertTrue(all(r.get("flight") for r in records if r.get("create")))
                maybe = announced[0]
                self.assertIn(maybe, self.server.folder_names())
                (entry,) = gc.history(self.store(os.path.join(self.tmp, "xdg",
                                                              "gmail_classify")))
                self.assertEqual((entry["folders_created"], entry["folders_created_maybe"]),
                                 (len(announced), len(announced)))
                if holds:   # someone filed mail there and took it out again: it stays
                    uid = self.server.add_message(make_message("mine"), folder=maybe)
                    conn = self.connect()
                    conn.select(maybe)
                    conn.add_flags(conn.search(["ALL"]), ["\\Deleted"])
                    conn.uid_expunge(conn.search(["ALL"]))
                    conn.close()
                code, out, err = UndoSafetyTest.cli(self, "undo", "--apply")
                self.assertEqual(code, gc.EXIT_OK, err)
                for name in announced[1:]:
                    self.assertNotIn(name, self.server.folder_names())
                if holds:
                    self.assertIn(maybe, self.server.folder_names())
                    self.assertIn("holds or has held mail; it stays", err)
                else:
                    self.assertEqual(mailbox_snapshot(self.server), before)


class AuditChunkTest(unittest.TestCase):
    """AuditLog.append writes a step's records in chunks of bytes, whole, in order."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.log = gc.AuditLog(pathlib.Path(self.tmp, "audit.jsonl"))

    def records(self, count: int, width: int = 20) -> List[Dict[str, Any]]:
        return [{"type": "message", "uid": n, "subject": "件名 %d " % n + "é" * width}
                for n in range(count)]

    def test_records_written_in_chunks_read_back_whole_after_a_torn_line(self):
        with open(self.log.path, "w", encoding="utf-8") as fh:
            fh.write('{"type": "message", "uid": -1}\n{"torn')
        records = self.records(40)
        with mock.patch.object(gc, "AUDIT_CHUNK_BYTES", 300):
            self.log.append(records)
            self.log.append([])
        with open(self.log.path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        self.assertEqual(lines[1], '{"torn')
        self.assertEqual([json.loads(line) for line in lines[2:-1]], records)
        self.assertEqual(lines[-1], "")

    def test_a_large_step_is_held_about_once_while_written(self):
        records = self.records(3000, width=300)
        encoded = sum(len((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode())
                      for r in records)
        tracemalloc.start()
        try:
            self.log.append(iter(records))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 1.5 * encoded + 2 ** 20)      # a chunk is 1 MB
        self.assertEqual(os.path.getsize(self.log.path), encoded)


class AuditLockTest(TempDirMixin, unittest.TestCase):
    def setUp(self):
        self.tmp = self.make_dir()

    def test_an_append_waits_for_the_audit_lock(self):
        audit = gc.AuditLog(pathlib.Path(self.tmp) / "audit.jsonl")
        holder = gc._FileLock(pathlib.Path(self.tmp) / "audit.jsonl.lock")
        self.assertTrue(holder.acquire(wait=True))
        writer = threading.Thread(target=audit.append, args=([{"type": "x", "run": "r"}],))
        writer.start()
        writer.join(0.2)
        self.assertTrue(writer.is_alive())
        self.assertFalse(audit.path.exists())
        holder.release()
        writer.join(5)
        self.assertEqual(list(audit.records()), [{"type": "x", "run": "r"}])

    def test_threads_rotating_together_lose_no_record_of_the_current_file(self):
        audit = gc.AuditLog(pathlib.Path(self.tmp) / "audit.jsonl")
        with mock.patch.object(gc, "AUDIT_MAX_BYTES", 400):
            def write(n: int) -> None:
                for i in range(40):
                    audit.append([{"type": "x", "run": f"{n}-{i}"}], sync=False)
            threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(20)
        kept = [r["run"] for r in audit.records()]
        self.assertEqual(len(kept), len(set(kept)))
        # Each rotation happened once its file had passed the size: both files are whole.
        self.assertLessEqual(audit.previous.stat().st_size, 400 + 60)
        self.assertGreater(audit.previous.stat().st_size, 400)


class WriteFlightTest(StateTestCase):
    """Issue 17: a step's writes are pipelined, the record stays whole and written ahead."""

    use = UndoSafetyTest.use
    undo = UndoTest.undo

    def test_a_flights_writes_are_all_on_the_wire_before_the_first_answer_is_read(self):
        seed_mailbox(self.server, 6)
        conn = self.connect()
        conn.select("INBOX")
        flight = gc._WriteFlight(conn)
        flight.store(("flag+", "\\Flagged"), [1, 2], "+FLAGS", [b"\\Flagged"])
        flight.store(("flag-", "\\Seen"), [3], "-FLAGS", [b"\\Seen"])
        flight.store(("label", "Work"), [4, 5], "+X-GM-LABELS", [b"Work"])
        start = len(self.server.log)
        with mock.patch.object(conn._proto, "collect", side_effect=AssertionError("read")):
            flight.send()
        wait_until(lambda: len(self.server.log) == start + 3)
        self.assertEqual([e.line.split(b" ", 1)[1] for e in self.server.log[start:]],
                         [b"UID STORE 1:2 +FLAGS.SILENT (\\Flagged)\r\n",
                          b"UID STORE 3 -FLAGS.SILENT (\\Seen)\r\n",
                          b"UID STORE 4:5 +X-GM-LABELS (Work)\r\n"])
        writes = flight.land()
        self.assertEqual([w.result for w in writes], [{1: None, 2: None}, {3: None},
                                                      {4: None, 5: None}])
        self.assertIn("Work", self.server.messages("INBOX")[3].labels)

    def test_a_refusal_in_a_flight_is_raised_after_every_answer_is_recorded(self):
        self.use(gmail=False)
        seed_mailbox(self.server, 12)
        start = mailbox_snapshot(self.server)
        self.server.add_fault("UID COPY", nth=1, action="no", text="Over quota")
        with self.assertRaisesRegex(gc.ImapError, "refused to copy messages to .*Over quota"):
            self.run_once()
        records = list(self.store().audit.records())
        done = [r for r in records if r["type"] == "done" and r.get("action")]
        copied = {r["label"]: r["uids"] for r in done if r["action"] == "label"}
        self.assertEqual(len(copied), 3)                # the other three label copies
        for label, uids in copied.items():
            self.assertEqual(len(self.server.uids(label)), len(uids))
        # Nothing moved: the moves wait for the labels' flight, which had a refusal.
        self.assertEqual([r for r in done if r["action"] in ("move", "archive", "trash")], [])
        self.assertEqual([c for c in self.server.commands() if c == "UID MOVE"], [])
        intended = sum(len(r["changes"]) for r in records if r["type"] == "intent"
                       and r.get("changes"))
        unsent = sum(len(r["changes"]) for r in records if r["type"] == "unsent")
        confirmed = sum(len(r["uids"]) for r in done)
        # Every answer was read before the refusal: what was not confirmed (the refused
        # copy, and the moves never sent) is recorded as not made, not left as "maybe".
        self.assertEqual(unsent, intended - confirmed)
        self.assertGreater(unsent, 0)
        (entry,) = gc.history(self.store())
        self.assertEqual(entry["maybe"], 0)
        undo = self.undo()                      # takes back exactly what was confirmed
        self.assertEqual((undo.reversed, undo.left_alone), (confirmed, 0))
        self.assertEqual(mailbox_snapshot(self.server), start)

    def test_a_folder_another_client_made_meanwhile_is_used_and_never_claimed(self):
        class Raced(_Session):     # another client creates each folder just before us
            def cmd_CREATE(self, tag: str, args: list) -> str:
                self.fake._ensure_folder(self._mailbox(args[0]).rstrip(self.fake.delimiter))
                return super().cmd_CREATE(tag, args)

        self.use(gmail=False)
        seed_mailbox(self.server, 12)
        self.server.use_handler(Raced)
        self.run_once()                       # ALREADYEXISTS is no refusal: the run goes on
        self.assertIn("CREATE", self.server.commands())
        done = [r for r in self.store().audit.records() if r["type"] == "done"]
        creates = [r for r in done if "create" in r]
        self.assertTrue(creates)
        self.assertEqual({r["created"] for r in creates}, {False})    # "existed", not ours
        self.assertTrue(any(r.get("action") == "label" for r in done))
        (entry,) = gc.history(self.store())
        self.assertEqual(entry["status"], "complete")

    def test_a_refused_create_in_a_flight_names_the_folder_and_the_servers_words(self):
        self.use(gmail=False)
        seed_mailbox(self.server, 12)
        self.server.add_fault("CREATE", nth=1, action="no", text="[NOPERM] Not allowed here")
        with self.assertRaisesRegex(gc.ImapError, "the server refused to create the folder "
                                                  "'[^']+': NO .*Not allowed here"):
            self.run_once()

    def test_a_copy_whose_answer_is_lost_is_never_made_twice(self):
        # Off Gmail a label is a copy: the link drops after the server made the second
        # COPY of the flight; the UIDNEXT the intent holds and the Message-IDs settle it.
        self.use(gmail=False)
        seed_mailbox(self.server, 12)
        expected = FakeGmail(gmail=False).start()
        self.addCleanup(expected.stop)
        seed_mailbox(expected, 12)
        self.run_once(server=expected, state_dir=os.path.join(self.tmp, "clean"))
        self.server.add_fault("UID COPY", nth=2, action="drop", when="after")
        self.run_once()
        self.assertTrue(self.server.fired)
        self.assertEqual(mailbox_snapshot(self.server), mailbox_snapshot(expected))
        (entry,) = gc.history(self.store())
        self.assertEqual((entry["status"], entry["maybe"]), ("complete", 0))

    def test_a_create_lost_to_a_drop_is_made_on_the_new_link_and_recorded(self):
        # The link drops as the first CREATE of the flight arrives, before the server ran
        # it: settling creates the folder again, one at a time, and records it as ours.
        self.use(gmail=False)
        seed_mailbox(self.server, 12)
        expected = FakeGmail(gmail=False).start()
        self.addCleanup(expected.stop)
        seed_mailbox(expected, 12)
        self.run_once(server=expected, state_dir=os.path.join(self.tmp, "clean"))
        self.server.add_fault("CREATE", nth=1, action="drop", when="before")
        self.run_once()
        self.assertTrue(self.server.fired)
        self.assertEqual(mailbox_snapshot(self.server), mailbox_snapshot(expected))
        creates = [r for r in self.store().audit.records() if r["type"] == "done"
                   and "create" in r]
        self.assertTrue(creates)
        self.assertEqual({r["created"] for r in creates}, {True})
        (entry,) = gc.history(self.store())
        self.assertEqual((entry["status"], entry["maybe"]), ("complete", 0))

    def test_a_write_refused_while_settling_is_raised_once_every_write_is_settled(self):
        # The link drops under the labels' flight; on the new link the first STORE sent
        # again is refused: the others are still settled and recorded, then it is raised.
        seed_mailbox(self.server, 12)
        self.server.add_fault("UID STORE", nth=1, action="drop", when="before")
        self.server.add_fault("UID STORE", nth=2, action="no", text="Label limit reached")
        with self.assertRaisesRegex(gc.ImapError, "Label limit reached"):
            self.run_once()
        stores = [c for c in self.server.commands() if c == "UID STORE"]
        records = list(self.store().audit.records())
        done = [r for r in records if r["type"] == "done" and r.get("action")]
        self.assertEqual(len(done), len(stores) - 2)    # all but the lost and the refused
        self.assertGreater(len(done), 0)
        (entry,) = gc.history(self.store())
        self.assertEqual(entry["maybe"], 0)

    def test_gmail_moves_lost_to_a_drop_are_moved_on_the_new_link(self):
        # Gmail's archive and trash are MOVEs: the link drops before the server ran the
        # first, and settling moves what is still in the folder, never copies it.
        seed_mailbox(self.server, 12)
        expected = FakeGmail().start()
        self.addCleanup(expected.stop)
        seed_mailbox(expected, 12)
        self.run_once(server=expected, state_dir=os.path.join(self.tmp, "clean"))
        self.server.add_fault("UID MOVE", nth=1, action="drop", when="before")
        self.run_once()
        self.assertTrue(self.server.fired)
        self.assertEqual(mailbox_snapshot(self.server), mailbox_snapshot(expected))
        self.assertNotIn("UID COPY", self.server.commands())
        (entry,) = gc.history(self.store())
        self.assertEqual((entry["status"], entry["maybe"]), ("complete", 0))

    def test_a_copy_on_gmail_lost_to_a_drop_is_copied_once_and_answered(self):
        # A vendoring script's own flight may copy on Gmail: settled by a plain COPY
        # (Gmail adds a label it already has no second time), its UIDs the answer's.
        seed_mailbox(self.server, 4)
        conn = self.connect()
        conn.select("INBOX")
        conn.create_folder("Work")
        flight = gc._WriteFlight(conn)
        flight.copy(("label", "Work"), [1, 2], "Work", conn.status("Work")["UIDNEXT"])
        self.server.add_fault("UID COPY", nth=1, action="drop", when="before")
        flight.send()
        (write,) = flight.land()
        self.assertTrue(self.server.fired)
        self.assertIsNone(write.error)
        self.assertEqual(sorted(write.result), [1, 2])
        self.assertEqual(self.server.commands().count("UID COPY"), 2)
        self.assertEqual(len(self.server.uids("Work")), 2)

    def test_a_sign_in_refused_while_settling_ends_the_run_at_once(self):
        # Settling reconnects; a refused sign-in is no refusal of the write: it ends the
        # run there, without signing in again for each write still to settle.
        seed_mailbox(self.server, 12)
        self.server.add_fault("UID STORE", nth=1, action="drop", when="before")
        self.server.add_fault("LOGIN", nth=2, action="no", text="[AUTHENTICATIONFAILED] no")
        with self.assertRaises(gc.AuthenticationError):
            self.run_once()
        self.assertEqual(self.server.count("LOGIN"), 2)

    def test_a_stop_while_moves_are_in_flight_reads_their_answers_and_records_them(self):
        seed_mailbox(self.server, 12)
        start = mailbox_snapshot(self.server)
        send = gc._WriteFlight.send

        def then_stop(flight):
            send(flight)
            if any(w.command == "UID MOVE" for w in flight.writes):
                flight.conn.stop.request(signal.SIGTERM)

        with mock.patch.object(gc._WriteFlight, "send", then_stop):
            code, out, err = UndoSafetyTest.cli(self, "run", "--apply", "--batch-size", "6")
        self.assertEqual(code, 143, err)
        moves = [e for e in self.server.log if e.command == "UID MOVE"]
        self.assertTrue(moves)
        last_move = max(i for i, e in enumerate(self.server.log) if e.command == "UID MOVE")
        self.assertEqual([e.command for e in self.server.log[last_move + 1:]
                          if e.command in _WRITE_COMMANDS], [])
        made, not_made = map(int, _INTERRUPTED_RE.search(err).groups())
        self.assertGreater(not_made, 0)
        with open(UndoSafetyTest.audit_path(self), encoding="utf-8") as handle:
            done = [json.loads(line) for line in handle]
        done = [r for r in done if r["type"] == "done" and r.get("action") == "move"]
        self.assertEqual(sum(len(r["uids"]) for r in done),
                         len(self.server.uids("Lists")))       # read after the stop came
        (entry,) = [json.loads(line) for line in UndoSafetyTest.cli(self, "history",
                                                                     "--json")[1].splitlines()]
        self.assertEqual((entry["status"], entry["maybe"]), ("interrupted", 0))
        self.assertEqual(entry["changes_made"], made)
        code, out, err = UndoSafetyTest.cli(self, "undo", "--apply")
        self.assertEqual(code, 0, err)
        self.assertEqual(mailbox_snapshot(self.server), start)

    def test_the_moves_answers_are_read_after_the_next_fetch_went_out(self):
        # The server holds a MOVE's OK until the next command arrives: only a client that
        # sends the next batch's FETCH before waiting for its moves sees it held.
        seed_mailbox(self.server, 12)
        self.server.held = collections.Counter()
        self.server.use_handler(_out_of_order("UID MOVE"))
        records: List[Dict[str, Any]] = []
        self.run_once(batch_size=3, apply_every=1, records=records)
        self.assertGreaterEqual(self.server.held["UID MOVE"], 2)
        log = [e.command for e in self.server.log]
        first_move = log.index("UID MOVE")
        self.assertIn("UID FETCH", log[first_move:])
        (entry,) = gc.history(self.store())
        self.assertEqual((entry["status"], entry["maybe"]), ("complete", 0))

    def test_history_counts_every_unanswered_create_of_a_flight_as_maybe(self):
        ledger = gc._Creates()
        for name in ("A", "B", "C"):
            ledger.read({"type": "intent", "create": name, "flight": True})
        ledger.read({"type": "done", "create": "B", "created": True, "answer": "created"})
        self.assertEqual(ledger.outcome(), {"A": None, "B": True, "C": None})
        old = gc._Creates()         # one at a time (no "flight"): only the first is maybe
        for name in ("A", "B", "C"):
            old.read({"type": "intent", "create": name})
        old.read({"type": "done", "create": "A", "created": True, "answer": "created"})
        self.assertEqual(old.outcome(), {"A": True, "B": None})


# --- Watch: stay connected and classify new mail as it arrives ---------------------------


class WatcherTest(FakeServerTest):
    """The Watcher loop against the fake server, with catch_up = classify everything."""

    rules = parse_rules(EXAMPLE_DOC, "example.json")

    def setUp(self):
        super().setUp()
        patcher = mock.patch.object(gc, "IDLE_POLL", 0.02)   # quicker reaction to stop/reload
        patcher.start()
        self.addCleanup(patcher.stop)

    def start_watcher(self, folders: Sequence[str] = ("INBOX",), keepalive: Optional[float] = None,
                      **options: Any) -> gc.Watcher:
        self.caught_up: List[List[str]] = []
        self.connections: List[gc.GmailConnection] = []

        def connect() -> gc.GmailConnection:
            conn = gc.GmailConnection(USER, password=PASSWORD, host="127.0.0.1",
                                      port=self.server.port, security="plaintext", timeout=5,
                                      keepalive=keepalive, retries=0)
            conn.connect()
            self.connections.append(conn)
            return conn

        def catch_up(conn: gc.GmailConnection, names: List[str]) -> None:
            self.caught_up.append(list(names))
            for name in names:
                gc.classify_folder(conn, self.rules, name, apply=True)

        options.setdefault("backoff", 0.01)
        options.setdefault("rng", lambda: 1.0)
        watcher = gc.Watcher(connect, list(folders), catch_up, **options)
        self.failure: List[BaseException] = []

        def run() -> None:
            try:
                watcher.run()
            except BaseException as exc:   # reported by the test, not lost in the thread
                self.failure.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def finish() -> None:
            watcher.stop()
            thread.join(10)
        self.addCleanup(finish)
        self.watcher_thread = thread
        return watcher

    def stop(self, watcher: gc.Watcher) -> None:
        watcher.stop()
        self.watcher_thread.join(10)
        self.assertFalse(self.watcher_thread.is_alive())
        self.assertEqual(self.failure, [])

    def idling(self, count: int = 1) -> None:
        wait_until(lambda: self.server.count("IDLE") >= count, timeout=15, message="never idled")

    def test_mail_delivered_while_idling_is_classified_within_the_idle(self):
        watcher = self.start_watcher(idle_interval=30)
        self.idling()
        self.server.deliver(make_message("receipt 77"))
        wait_until(lambda: self.server.uids("INBOX") == [], timeout=15, message="not archived")
        self.assertEqual(self.server.messages("[Gmail]/All Mail")[0].labels, {"Receipts"})
        self.assertEqual(self.caught_up, [["INBOX"], ["INBOX"]])
        self.stop(watcher)
        names = self.commands()
        self.assertEqual(names[-2:], ["UNSELECT", "LOGOUT"])
        self.assertEqual(watcher.outages, 0)

    def test_idle_is_reissued_and_the_keepalive_stays_out(self):
        sent_by: List[Tuple[str, str]] = []     # (thread, command) for every command sent
        execute = gc._Protocol.execute

        def recording(proto: Any, command: str, *args: Any, **kwargs: Any) -> Any:
            sent_by.append((threading.current_thread().name, command))
            return execute(proto, command, *args, **kwargs)

        idle = gc._Protocol.idle

        def recording_idle(proto: Any, *args: Any, **kwargs: Any) -> Any:
            sent_by.append((threading.current_thread().name, "IDLE"))
            return idle(proto, *args, **kwargs)

        with mock.patch.object(gc._Protocol, "execute", recording), \
                mock.patch.object(gc._Protocol, "idle", recording_idle):
            watcher = self.start_watcher(idle_interval=0.05, keepalive=0.01)
            self.idling(4)
            self.stop(watcher)
        lines = [line.strip().upper() for line in self.server.raw_lines]
        idles = [i for i, line in enumerate(lines) if line.endswith(b" IDLE")]
        self.assertGreaterEqual(len(idles), 4)
        for start in idles:
            done = lines.index(b"DONE", start)
            self.assertFalse(any(b"NOOP" in line for line in lines[start:done]),
                             "the keepalive spoke during IDLE")
        self.assertEqual(self.caught_up, [["INBOX"]])   # re-issuing is not a wake-up
        names = self.commands()
        # Nothing in between but the keepalive's NOOPs: the connection is not idling from
        # DONE to the next IDLE, and on a busy machine that gap can outlast 10 ms.
        between = names[names.index("IDLE"):-2]
        after = sent_by[sent_by.index((self.watcher_thread.name, "IDLE")):]
        keepalive_noops = [c for t, c in after if t == "gmail_classify-keepalive"]
        self.assertEqual(set(keepalive_noops) | {"NOOP"}, {"NOOP"}, sent_by)
        self.assertEqual(set(between) | {"IDLE", "NOOP"}, {"IDLE", "NOOP"}, between)
        self.assertEqual(between.count("NOOP"), len(keepalive_noops), sent_by)
        self.assertEqual(names[-2:], ["UNSELECT", "LOGOUT"])

    def test_drop_during_idle_is_survived_and_mail_that_came_meanwhile_is_classified(self):
        with self.assertLogs("gmail_classify", "INFO") as logs:
            watcher = self.start_watcher(idle_interval=30)
            self.idling()
            self.server.add_fault("LOGIN", action="drop", count=3)
            self.server.drop_all_connections()
            self.server.deliver(make_message("invoice 9"))
            wait_until(lambda: self.server.uids("INBOX") == [], timeout=15, message="not classified after the drop")
            self.stop(watcher)
        self.assertEqual(watcher.outages, 1)
        self.assertEqual(len(self.connections), 2)
        self.assertEqual(self.server.fired.count(("LOGIN", "drop", "before")), 3)
        warnings = [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]
        self.assertEqual(len(warnings), 2, warnings)        # once when it began, once when it ended
        self.assertIn("lost the connection", warnings[0])
        self.assertIn("connected again", warnings[1])

    def test_backoff_is_capped_and_jittered(self):
        delays: List[float] = []
        watcher = gc.Watcher(lambda: (_ for _ in ()).throw(gc.ConnectionLostError("down")),
                             ["INBOX"], lambda conn, names: None, backoff=1, max_backoff=8,
                             rng=lambda: 0.0)
        watcher._stop.wait = lambda delay: (delays.append(delay), len(delays) >= 7 and watcher.stop())  # type: ignore
        with self.assertLogs("gmail_classify", "WARNING") as logs:
            watcher.run()
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0])
        self.assertEqual(len(logs.records), 2)       # lost, and stopped while still down

    def test_authentication_failure_ends_the_watch(self):
        server_users = self.server.users
        server_users[USER] = "changed-password"
        watcher = self.start_watcher()
        self.watcher_thread.join(5)
        self.assertEqual([type(e) for e in self.failure], [gc.AuthenticationError])
        self.assertEqual(watcher.outages, 0)

    def test_polling_where_idle_is_missing(self):
        server = FakeGmail(idle=False).start()
        self.addCleanup(server.stop)
        self.server = server
        watcher = self.start_watcher(interval=0.05)
        wait_until(lambda: server.count("NOOP") >= 2, timeout=15)
        server.deliver(make_message("receipt 5"))
        wait_until(lambda: server.uids("INBOX") == [], timeout=15, message="not picked up by polling")
        self.stop(watcher)
        self.assertNotIn("IDLE", server.commands())
        self.assertEqual(self.caught_up[-1], ["INBOX"])

    def test_several_folders_idle_on_the_first_and_poll_the_others(self):
        self.server.add_message(make_message("hello"), labels=("Work",))
        watcher = self.start_watcher(["INBOX", "Work"], interval=0.05, idle_interval=30)
        self.idling()
        wait_until(lambda: self.server.count("STATUS") >= 2, timeout=15)
        msgid = self.server.deliver(make_message("receipt for work"), labels=("Work",))
        wait_until(lambda: "Receipts" in self.server.message(msgid).labels, timeout=15, message="Work not caught up")
        self.server.deliver(make_message("invoice 3"))
        wait_until(lambda: self.server.uids("INBOX") == [], timeout=15, message="INBOX not caught up")
        self.stop(watcher)
        self.assertEqual(self.caught_up[0], ["Work", "INBOX"])   # the IDLE folder last
        self.assertIn(["Work"], self.caught_up)
        self.assertIn(["INBOX"], self.caught_up)
        statuses = [e.line for e in self.server.log if e.command == "STATUS"]
        self.assertTrue(all(b'"Work"' in line or b" Work " in line for line in statuses), statuses)

    def test_a_requested_catch_up_wakes_every_folder_without_news(self):
        self.server.add_message(make_message("hello"), labels=("Work",))
        watcher = self.start_watcher(["INBOX", "Work"], idle_interval=30, interval=60)
        self.idling()
        watcher.request_catch_up()          # what the end of a budget pause does
        wait_until(lambda: len(self.caught_up) == 2, timeout=15)
        self.idling(2)
        self.stop(watcher)
        self.assertEqual(self.caught_up, [["Work", "INBOX"], ["Work", "INBOX"]])

    def test_a_jump_of_the_wall_clock_while_idling_checks_the_link(self):
        watcher = self.start_watcher(idle_interval=30)
        self.idling()
        self.assertNotIn("NOOP", self.commands())
        with self.assertLogs("gmail_classify", "INFO") as logs:
            watcher._clocks = (time.time() - 3600, time.monotonic())    # as after a sleep
            wait_until(lambda: "NOOP" in self.commands(), timeout=15)
        self.idling(2)
        self.stop(watcher)
        names = self.commands()
        self.assertEqual(names[names.index("NOOP") - 1:names.index("NOOP") + 2],
                         ["IDLE", "NOOP", "IDLE"])
        self.assertIn("slept", "\n".join(logs.output))

    def test_first_folder_is_not_starved_when_polling_takes_all_the_time(self):
        self.server.add_message(make_message("hello"), labels=("Work",))
        self.server.add_fault("STATUS", action="delay", delay=0.05, count=10 ** 6)
        watcher = self.start_watcher(["INBOX", "Work"], interval=0.01, idle_interval=30)
        wait_until(lambda: self.server.count("STATUS") >= 3, timeout=15)
        self.server.deliver(make_message("receipt 8"))
        wait_until(lambda: self.server.uids("INBOX") == [], timeout=15,
                   message="INBOX starved by the polls")
        self.stop(watcher)
        self.assertIn("NOOP", self.commands())

    def test_session_pauses_at_the_budget_until_midnight_utc(self):
        for n in range(6):
            self.server.add_message(make_message(f"receipt {n}"))
        now = [datetime(2026, 12, 1, 22, 30, tzinfo=timezone.utc).timestamp()]
        paused: List[float] = []
        store = gc.StateStore(os.path.join(self.tmp, "state"))
        store.load()
        session = gc.WatchSession(store, lambda: self.rules, USER, "127.0.0.1", self.server.port,
                                  apply=True, reclassify=True, daily_budget=1024, batch_size=2,
                                  on_pause=paused.append, clock=lambda: now[0])
        session.check_start(["INBOX"])
        conn = self.connect()
        with self.assertLogs("gmail_classify", "WARNING"):
            session(conn, ["INBOX"])
        midnight = datetime(2026, 12, 2, tzinfo=timezone.utc).timestamp()
        self.assertEqual(paused, [midnight])
        left = self.server.uids("INBOX")
        commands = len(self.commands())
        session(conn, ["INBOX"])                       # still paused: not a word to the server
        self.assertEqual(len(self.commands()), commands)
        now[0] = midnight + 1
        session.daily_budget = 10 ** 6                 # a new day, and room for the rest
        session(conn, ["INBOX"])
        self.assertEqual(self.server.uids("INBOX"), [])
        self.assertGreater(len(left), 0)

    def test_a_failing_save_after_a_failed_wake_up_does_not_hide_its_error(self):
        self.server.add_message(make_message("receipt 1"))
        for apply in (False, True):
            with self.subTest(apply=apply):
                store = gc.StateStore(os.path.join(self.tmp, f"state-{apply}"))
                store.load()
                session = gc.WatchSession(store, lambda: self.rules, USER, "127.0.0.1",
                                          self.server.port, apply=apply, reclassify=True)
                session.check_start(["INBOX"])
                conn = self.connect()
                lost = gc.ConnectionLostError("the server closed the connection")
                with mock.patch.object(gc.Run, "classify", side_effect=lost), \
                        mock.patch.object(gc.StateStore, "save",
                                          side_effect=gc.StateError("disk full")), \
                        self.assertLogs("gmail_classify", "ERROR") as logs, \
                        self.assertRaises(gc.ConnectionLostError):
                    session(conn, ["INBOX"])
                self.assertIn("disk full (while stopping", "\n".join(logs.output))
                self.assertEqual(session.runs, 1)

    def test_each_wake_up_counts_only_its_own_bytes_toward_the_budget(self):
        # One connection, many wake-ups (each a Run when applying), traffic between them
        # (NOOP here, IDLE in a real watch), and now and then new mail: the day's count is
        # what the connection received, each byte once, whether the watch applies or not.
        counted: Dict[bool, Tuple[int, int, int]] = {}
        for apply in (False, True):
            with self.subTest(apply=apply):
                store = gc.StateStore(os.path.join(self.tmp, f"state-{apply}"))
                store.load()
                session = gc.WatchSession(store, lambda: self.rules, USER, "127.0.0.1",
                                          self.server.port, apply=apply, reclassify=True,
                                          batch_size=2)
                session.check_start(["INBOX"])
                conn = self.connect()
                for wake in range(40):
                    if wake % 10 == 5:
                        self.server.deliver(make_message(f"hello {apply} {wake}"))
                    session(conn, ["INBOX"])
                    conn.noop()
                session(conn, ["INBOX"])
                used = store.downloaded(session.account)
                self.assertEqual(session.runs, 41)
                self.assertEqual(used, conn.bytes_received)
                counted[apply] = (used, conn.bytes_received, session._last_run.bytes_counted)
        # Each applying wake-up counted its own bytes: the last one, far less than the total.
        self.assertLess(counted[True][2], counted[True][1] // 10)

    def test_reload_is_asked_for_at_a_safe_point(self):
        reloads: List[int] = []
        changed = [False]
        watcher = self.start_watcher(idle_interval=30, reload=lambda: reloads.append(1),
                                     reload_needed=lambda: changed[0] and not changed.__setitem__(0, False))
        self.idling()
        watcher.request_reload()
        wait_until(lambda: len(reloads) == 1, timeout=15)
        self.idling(2)
        changed[0] = True
        wait_until(lambda: len(reloads) == 2, timeout=15)
        self.idling(3)
        self.stop(watcher)
        self.assertEqual(len(self.connections), 1)      # reloading never reconnects


class FloodingWatchTest(FakeServerTest):
    rules = WatcherTest.rules
    start_watcher = WatcherTest.start_watcher
    stop = WatcherTest.stop

    def test_a_server_that_floods_after_sign_in_gets_the_backoff(self):
        self.server.add_fault("SELECT", action="flood", size=5000, count=1000)
        self.server.add_fault("EXAMINE", action="flood", size=5000, count=1000)
        watcher = self.start_watcher(backoff=0.05, max_backoff=10)
        time.sleep(1.2)     # the backoff itself is what is measured
        self.stop(watcher)
        # 0.05 + 0.1 + 0.2 + 0.4 + 0.8 s: at most six sign-ins, never one per 0.05 s.
        self.assertGreaterEqual(self.server.count("LOGIN"), 2)
        self.assertLessEqual(self.server.count("LOGIN"), 6)


# --- OAuth2 sign-in ----------------------------------------------------------------------


CLIENT_ID = "123-test.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-test-secret"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class FakeGoogle:
    """Google's authorisation and token endpoints on loopback.

    ``consent``: what the consent page does: "allow", "deny" (error=access_denied),
    "forge" (a wrong state), "no_scope" (the mail box left unticked).  ``token_fault``:
    None, "invalid_grant", "invalid_client", "503", "garbage" or "redirect" (a 302 to
    /elsewhere, which hands out a token and records the request in ``redirected``) for
    refresh requests.
    Every access token it issues becomes the only one the given FakeGmail accepts, as if
    the previous one had expired.
    """

    def __init__(self, imap: Optional[FakeGmail] = None) -> None:
        self.imap = imap
        self.consent = "allow"
        self.token_fault: Optional[str] = None
        self.auth_requests: List[Dict[str, str]] = []
        self.token_requests: List[Dict[str, str]] = []
        self.codes: Dict[str, Dict[str, str]] = {}
        self.refresh_tokens: List[str] = []
        self.access_tokens: List[str] = []
        self.redirected: List[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/elsewhere"):
                    fake.redirected.append(self.path)
                    body = {"access_token": "ya29.elsewhere", "expires_in": 3599}
                    return fake._reply(self, 200, json.dumps(body).encode())
                fake._authorize(self)

            def do_POST(self) -> None:
                fake._token(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.01}, daemon=True)
        self._thread.start()
        port = self._server.server_address[1]
        self.auth_url = f"http://127.0.0.1:{port}/o/oauth2/v2/auth"
        self.token_url = f"http://127.0.0.1:{port}/token"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def _reply(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes,
               headers: Optional[Dict[str, str]] = None) -> None:
        handler.send_response(status)
        for key, value in (headers or {"Content-Type": "application/json"}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _authorize(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(handler.path).query))
        self.auth_requests.append(query)
        code = "4/code-%d" % len(self.auth_requests)
        self.codes[code] = query
        answer = {"state": query.get("state", ""), "code": code, "scope": query.get("scope", "")}
        if self.consent in ("deny", "server_error"):
            answer = {"state": query.get("state", ""),
                      "error": "access_denied" if self.consent == "deny" else "server_error"}
        elif self.consent == "no_code":
            answer = {"state": query.get("state", "")}
        elif self.consent == "forge":
            answer["state"] = "forged-state"
        elif self.consent == "no_scope":
            self.codes[code] = dict(query, scope="openid")
        location = query["redirect_uri"] + "?" + urllib.parse.urlencode(answer)
        self._reply(handler, 302, b"", {"Location": location})

    def _issue(self) -> str:
        token = "ya29.fresh-%d" % (len(self.access_tokens) + 1)
        self.access_tokens.append(token)
        if self.imap is not None:
            self.imap.tokens[USER] = token
        return token

    def _token(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        form = dict(urllib.parse.parse_qsl(handler.rfile.read(length).decode("ascii")))
        self.token_requests.append(form)

        def error(status: int, name: str) -> None:
            self._reply(handler, status, json.dumps({"error": name, "error_description": "Bad"}).encode())

        if (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
            return error(401, "invalid_client")
        if form.get("grant_type") == "authorization_code":
            request = self.codes.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "").encode("ascii")
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
            if (request is None or request.get("code_challenge") != challenge
                    or request.get("redirect_uri") != form.get("redirect_uri")):
                return error(400, "invalid_grant")
            refresh = "1//refresh-%d" % (len(self.refresh_tokens) + 1)
            self.refresh_tokens.append(refresh)
            body = {"access_token": self._issue(), "expires_in": 3599, "refresh_token": refresh,
                    "scope": request.get("scope", ""), "token_type": "Bearer"}
            return self._reply(handler, 200, json.dumps(body).encode())
        if form.get("grant_type") != "refresh_token":
            return error(400, "unsupported_grant_type")
        if self.token_fault == "redirect":
            port = self._server.server_address[1]
            return self._reply(handler, 302, b"",
                               {"Location": f"http://127.0.0.1:{port}/elsewhere"})
        if self.token_fault == "503":
            return self._reply(handler, 503, b"<html>busy</html>", {"Content-Type": "text/html"})
        if self.token_fault == "garbage":
            return self._reply(handler, 200, b"[1, 2]")
        if self.token_fault == "no_token":
            return self._reply(handler, 200, b'{"expires_in": 3599, "token_type": "Bearer"}')
        if self.token_fault or form.get("refresh_token") not in self.refresh_tokens:
            return error(400 if self.token_fault != "invalid_client" else 401,
                         self.token_fault or "invalid_grant")
        body = {"access_token": self._issue(), "expires_in": 3599, "token_type": "Bearer"}
        self._reply(handler, 200, json.dumps(body).encode())

    def browse(self, url: str) -> None:
        """A browser that follows the consent page back to the loopback redirect."""
        try:
            _NO_PROXY.open(url, timeout=5).close()
        except urllib.error.HTTPError as exc:   # the redirect catcher's 400 page
            exc.close()

    def final_address(self, url: str) -> str:
        """The address a browser on another machine ends on (what the user pastes)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
        try:
            opener.open(url, timeout=5)
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.headers["Location"]
        raise AssertionError("the consent page did not redirect")


class OAuthTest(FakeServerTest):
    def setUp(self):
        super().setUp()
        self.google = FakeGoogle(self.server)
        self.addCleanup(self.google.stop)
        self.client = gc.OAuthClient(CLIENT_ID, CLIENT_SECRET)
        self.env = {"XDG_CONFIG_HOME": os.path.join(self.tmp, "config"), "DISPLAY": ":0"}
        for name, value in (("GOOGLE_AUTH_URL", self.google.auth_url),
                            ("GOOGLE_TOKEN_URL", self.google.token_url), ("OAUTH_WAIT", 5)):
            patcher = mock.patch.object(gc, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)

    def authorize(self, **options: Any) -> Dict[str, Any]:
        options.setdefault("open_browser", self.google.browse)
        options.setdefault("wait", 5)
        return gc.authorize(self.client, USER, auth_url=self.google.auth_url,
                            token_url=self.google.token_url, **options)

    def client_file(self) -> str:
        path = os.path.join(self.tmp, "client_secret_123.json")
        with open(path, "w") as handle:
            json.dump({"installed": {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                                     "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                                     "redirect_uris": ["http://localhost"]}}, handle)
        return path

    def imap_argv(self, *extra: str) -> List[str]:
        return ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--retries", "0", "--auth", "xoauth2", *extra]

    def store_grant(self) -> str:
        answer = self.authorize()
        with mock.patch.dict(os.environ, self.env):
            gc.save_refresh_token(USER, self.client, answer["refresh_token"])
        return answer["refresh_token"]

    # -- the authorisation flow --

    def test_flow_sends_pkce_scope_and_offline_access_and_returns_a_refresh_token(self):
        shown: List[str] = []
        answer = self.authorize(show=shown.append)
        self.assertEqual(answer["refresh_token"], "1//refresh-1")
        (request,) = self.google.auth_requests
        self.assertEqual(shown[0].split("?")[0], self.google.auth_url)
        self.assertEqual(request["client_id"], CLIENT_ID)
        self.assertEqual(request["scope"], "https://mail.google.com/")
        self.assertEqual((request["response_type"], request["access_type"], request["prompt"]),
                         ("code", "offline", "consent"))
        self.assertEqual(request["code_challenge_method"], "S256")
        self.assertEqual(request["login_hint"], USER)
        self.assertRegex(request["redirect_uri"], r"^http://127\.0\.0\.1:\d+/$")
        self.assertNotIn(CLIENT_SECRET, shown[0])
        (exchange,) = self.google.token_requests
        self.assertEqual(exchange["grant_type"], "authorization_code")
        self.assertEqual(exchange["redirect_uri"], request["redirect_uri"])
        verifier = exchange["code_verifier"]
        self.assertTrue(43 <= len(verifier) <= 128)
        self.assertNotIn(verifier, shown[0])     # only its hash travels through the browser
        self.assertGreaterEqual(len(request["state"]), 16)

    def test_fixed_port_is_used_for_the_redirect(self):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        self.authorize(port=port)
        self.assertEqual(self.google.auth_requests[0]["redirect_uri"], f"http://127.0.0.1:{port}/")

    def test_refusal_on_the_consent_page(self):
        self.google.consent = "deny"
        with self.assertRaises(gc.OAuthError) as caught:
            self.authorize()
        self.assertEqual(caught.exception.error, "access_denied")
        self.assertIn("access was denied on Google's consent page", str(caught.exception))
        self.assertEqual(self.google.token_requests, [])

    def test_other_errors_and_an_answer_without_a_code(self):
        for consent, error in (("server_error", "server_error"), ("no_code", "no_code")):
            with self.subTest(consent=consent):
                self.google.consent = consent
                with self.assertRaises(gc.OAuthError) as caught:
                    self.authorize()
                self.assertEqual(caught.exception.error, error)
                self.assertIn("run auth again" if error == "no_code" else "server_error",
                              str(caught.exception))
        self.assertEqual(self.google.token_requests, [])

    def test_bad_state_is_refused_before_any_exchange(self):
        # A redirect with a wrong state is not this sign-in's answer: it gets 400 and the
        # listener keeps waiting (here until the deadline), exchanging nothing.
        self.google.consent = "forge"
        with self.assertRaises(gc.OAuthError) as caught:
            self.authorize(wait=0.3)    # the browser has had its 400 before the wait starts
        self.assertEqual(caught.exception.error, "timeout")
        self.assertEqual(self.google.token_requests, [])

    def test_mail_scope_left_unticked(self):
        self.google.consent = "no_scope"
        with self.assertRaises(gc.OAuthError) as caught:
            self.authorize()
        self.assertEqual(caught.exception.error, "scope")

    def test_pasted_redirect_address_is_accepted(self):
        shown: List[str] = []
        pasted: List[str] = []

        def read_pasted(timeout: float) -> Optional[str]:
            if pasted:
                return None
            pasted.append(self.google.final_address(shown[0]))
            return "  " + pasted[0] + "\n"

        answer = self.authorize(open_browser=None, show=shown.append, read_pasted=read_pasted)
        self.assertEqual(answer["refresh_token"], "1//refresh-1")
        self.assertTrue(pasted[0].startswith("http://127.0.0.1:"))
        self.assertEqual(self.google.token_requests[0]["grant_type"], "authorization_code")

    def test_pasted_garbage_or_a_forged_state_is_refused(self):
        shown: List[str] = []
        for paste, error in [("4/just-the-code", "bad_paste"),
                             ("http://127.0.0.1:1/?state=other&code=4/x", "bad_state")]:
            with self.subTest(paste=paste):
                with self.assertRaises(gc.OAuthError) as caught:
                    self.authorize(open_browser=None, show=shown.append,
                                   read_pasted=lambda timeout, p=paste: p)
                self.assertEqual(caught.exception.error, error)
        self.assertEqual(self.google.token_requests, [])

    def test_no_answer_times_out(self):
        with self.assertRaises(gc.OAuthError) as caught:
            self.authorize(open_browser=None, wait=0.3)
        self.assertEqual(caught.exception.error, "timeout")

    def test_endpoints_must_be_https_unless_loopback(self):
        for url in ("http://oauth2.example.com/token", "ftp://127.0.0.1/token"):
            with self.subTest(url=url):
                with self.assertRaises(gc.OAuthError):
                    gc.OAuthTokenSource(self.client, "1//r", token_url=url)()
        self.assertEqual(gc._endpoint("https://oauth2.googleapis.com/token", "x"),
                         "https://oauth2.googleapis.com/token")

    # -- storing and refreshing --

    def test_token_file_is_private_and_round_trips(self):
        refresh = self.store_grant()
        with mock.patch.dict(os.environ, self.env):
            path = gc.token_path(USER)
            self.assertEqual(gc.load_refresh_token(USER), (self.client, refresh))
            self.assertIsNone(gc.load_refresh_token("other@example.com"))
        self.assertEqual(path.parent, pathlib.Path(self.env["XDG_CONFIG_HOME"], "gmail_classify", "tokens"))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(path.parent).st_mode & 0o777, 0o700)
        self.assertNotIn(CLIENT_SECRET, repr(self.client))
        os.chmod(path, 0o644)
        with mock.patch.dict(os.environ, self.env), self.assertRaises(gc.RulesError) as caught:
            gc.load_refresh_token(USER)
        self.assertIn("chmod 600", str(caught.exception))

    def test_token_file_lives_beside_the_rules_and_records_its_creation(self):
        tokens = pathlib.Path(self.env["XDG_CONFIG_HOME"], "gmail_classify", "tokens")
        tokens.mkdir(parents=True)
        os.chmod(tokens, 0o755)
        before = datetime.now(timezone.utc).replace(microsecond=0)
        self.store_grant()
        with mock.patch.dict(os.environ, self.env):
            self.assertEqual(gc.token_dir(), gc.default_rules_dir() / "tokens")
            path = gc.token_path(USER)
        self.assertEqual(path.parent, tokens)
        if os.name == "posix":
            self.assertEqual(os.stat(tokens).st_mode & 0o777, 0o700)
        created = json.loads(path.read_text(encoding="utf-8"))["created"]
        self.assertRegex(created, r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00\Z")
        self.assertLessEqual(before, datetime.fromisoformat(created))
        self.assertLessEqual(datetime.fromisoformat(created), datetime.now(timezone.utc))

    def test_refresh_reuses_a_fresh_token_and_refreshes_before_expiry(self):
        refresh = self.store_grant()
        now = [1000.0]
        source = gc.OAuthTokenSource(self.client, refresh, token_url=self.google.token_url,
                                     clock=lambda: now[0])
        first = source()
        self.assertEqual(source(), first)                       # a reconnect right away
        now[0] += gc.TOKEN_REUSE + 1
        second = source()                                       # a later reconnect
        self.assertNotEqual(second, first)
        self.assertEqual(source.refreshes, 2)
        grants = [r["grant_type"] for r in self.google.token_requests]
        self.assertEqual(grants, ["authorization_code", "refresh_token", "refresh_token"])
        self.assertEqual(self.google.token_requests[-1]["refresh_token"], refresh)

    def test_reconnect_signs_in_with_a_refreshed_token(self):
        refresh = self.store_grant()
        now = [0.0]

        def clock() -> float:
            now[0] += 120           # every call is "much later"
            return now[0]

        source = gc.OAuthTokenSource(self.client, refresh, token_url=self.google.token_url,
                                     clock=clock)
        conn = self.connect(token=source)
        conn.select("INBOX")
        self.server.drop_all_connections()
        self.assertEqual(conn.search(), [])
        self.assertEqual(conn.reconnects, 1)
        self.assertEqual(self.commands().count("AUTHENTICATE"), 2)
        self.assertEqual(source.refreshes, 2)

    def test_refresh_failures(self):
        refresh = self.store_grant()
        table = [("invalid_grant", gc.OAuthError, "auth"),
                 ("invalid_client", gc.OAuthError, "client id and secret"),
                 ("503", gc.ConnectionLostError, "HTTP 503"),
                 ("garbage", gc.ProtocolError, "not a JSON object"),
                 ("no_token", gc.ProtocolError, "without an access_token")]
        for fault, error, text in table:
            with self.subTest(fault=fault):
                self.google.token_fault = fault
                source = gc.OAuthTokenSource(self.client, refresh, user=USER,
                                             token_url=self.google.token_url)
                with self.assertRaises(error) as caught:
                    source()
                self.assertIn(text, str(caught.exception))
                self.assertNotIn(refresh, str(caught.exception))

    def test_unreachable_token_endpoint_is_a_connection_error(self):
        self.google.stop()
        source = gc.OAuthTokenSource(self.client, "1//r", token_url=self.google.token_url)
        with self.assertRaises(gc.ConnectionLostError):
            source()

    # -- the command line --

    def test_auth_command_then_runs_with_the_stored_token(self):
        with mock.patch.object(gc.webbrowser, "open", self.google.browse):
            code, out, err = run_cli("auth", "--user", USER, "--client-secret-file",
                                     self.client_file(), env=self.env)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(self.google.auth_url + "?", out)
        self.assertIn("Signed in as " + USER, out)
        self.assertNotIn("1//refresh-1", out)
        with mock.patch.dict(os.environ, self.env):
            path = gc.token_path(USER)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.server.add_message(make_message("receipt 1"))
        code, out, err = run_cli(*self.imap_argv("-vv", "run"), env=self.env)
        self.assertEqual(code, 0, err)
        self.assertIn("AUTHENTICATE", self.commands())
        self.assertEqual(self.google.token_requests[-1]["grant_type"], "refresh_token")
        for secret in ["1//refresh-1", CLIENT_SECRET] + self.google.access_tokens:
            self.assertNotIn(secret, out + err)

    def test_auth_client_from_the_rules_file(self):
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump({"account": {"user": USER, "oauth_client_id": CLIENT_ID,
                                   "oauth_client_secret": CLIENT_SECRET},
                       "rule": [{"subject": "x", "star": True}]}, handle)
        os.chmod(rules, 0o600)    # a rules file holding a secret must be its owner's alone
        with mock.patch.object(gc.webbrowser, "open", self.google.browse):
            code, out, err = run_cli("auth", "--rules", rules, env=self.env)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.google.auth_requests[0]["client_id"], CLIENT_ID)

    def test_auth_refused_exits_3_with_one_line_and_stores_nothing(self):
        self.google.consent = "deny"
        with mock.patch.object(gc.webbrowser, "open", self.google.browse):
            code, out, err = run_cli("auth", "--user", USER, "--client-secret-file",
                                     self.client_file(), env=self.env)
        self.assertEqual(code, gc.EXIT_AUTH)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("denied", err)
        self.assertFalse(os.path.exists(os.path.join(self.env["XDG_CONFIG_HOME"], "gmail_classify",
                                                     "tokens")))

    def test_auth_without_a_client_or_with_a_bad_file_is_a_usage_error(self):
        bad = os.path.join(self.tmp, "bad.json")
        with open(bad, "w") as handle:
            handle.write('{"something": "else"}')
        table = [([], "--client-secret-file"), (["--client-secret-file", bad], "Desktop app"),
                 (["--client-secret-file", os.path.join(self.tmp, "nope.json")], "cannot read")]
        for extra, text in table:
            with self.subTest(extra=extra):
                code, out, err = run_cli("auth", "--user", USER, *extra, env=self.env)
                self.assertEqual(code, gc.EXIT_USAGE)
                self.assertIn(text, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertEqual(self.google.auth_requests, [])

    def test_xoauth2_without_any_token_says_run_auth(self):
        code, out, err = run_cli(*self.imap_argv(), env=self.env)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("auth --user " + USER, err)
        self.assertNotIn("AUTHENTICATE", self.commands())

    def test_revoked_grant_exits_3_saying_run_auth_again(self):
        refresh = self.store_grant()
        self.google.refresh_tokens.remove(refresh)              # revoked by the user
        code, out, err = run_cli(*self.imap_argv(), env=self.env)
        self.assertEqual(code, gc.EXIT_AUTH)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("invalid_grant", err)
        self.assertIn("auth --user " + USER + "' again", err)
        self.assertNotIn(refresh, err)
        self.assertNotIn("AUTHENTICATE", self.commands())

    def test_token_endpoint_down_exits_4(self):
        self.store_grant()
        self.google.token_fault = "503"
        code, out, err = run_cli(*self.imap_argv(), env=self.env)
        self.assertEqual(code, gc.EXIT_CONNECTION, err)
        self.assertIn("HTTP 503", err)

    def test_environment_token_beats_the_stored_one(self):
        self.store_grant()
        requests = len(self.google.token_requests)
        self.server.tokens[USER] = TOKEN
        code, out, err = run_cli(*self.imap_argv(), env=dict(self.env, GMAIL_OAUTH_TOKEN=TOKEN))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(self.google.token_requests), requests)


class OAuthListenerTest(FakeServerTest):
    """The loopback redirect listener: anyone local can connect to it, only Google's
    answer to this sign-in (the right state) may end it, and its deadline holds."""

    def setUp(self):
        super().setUp()
        self.google = FakeGoogle(self.server)
        self.addCleanup(self.google.stop)
        self.client = gc.OAuthClient(CLIENT_ID, CLIENT_SECRET)
        self.env = {"XDG_CONFIG_HOME": os.path.join(self.tmp, "config"), "DISPLAY": ":0"}

    authorize = OAuthTest.authorize
    client_file = OAuthTest.client_file

    def start(self, **options: Any) -> Tuple[threading.Thread, Dict[str, Any], List[str]]:
        shown: List[str] = []
        outcome: Dict[str, Any] = {}

        def run() -> None:
            started = time.monotonic()
            try:
                outcome["answer"] = self.authorize(show=shown.append, **options)
            except Exception as exc:     # examined by the test
                outcome["error"] = exc
            outcome["took"] = time.monotonic() - started
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        wait_until(lambda: shown)
        return thread, outcome, shown

    @staticmethod
    def port_of(url: str) -> int:
        redirect = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["redirect_uri"][0]
        return urllib.parse.urlsplit(redirect).port

    @staticmethod
    def get(port: int, path: str) -> Tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" % path.encode())
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return int(data.split(b" ", 2)[1]), data

    def test_a_flood_of_idle_connections_is_closed_past_the_limit_and_then_served(self):
        with mock.patch.object(gc, "OAUTH_CONNECTIONS", 2):
            thread, outcome, shown = self.start(open_browser=None, wait=10)
            port = self.port_of(shown[0])
            idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
            for sock in idle:
                self.addCleanup(sock.close)
            extra = socket.create_connection(("127.0.0.1", port), timeout=5)
            self.addCleanup(extra.close)
            extra.sendall(b"GET /?code=4/x&state=wrong HTTP/1.0\r\n\r\n")
            self.assertEqual(extra.recv(100), b"")      # closed unread: no thread for it
            for sock in idle:
                sock.close()                             # the slots come back

            def served() -> bool:
                try:
                    return self.get(port, "/?state=wrong")[0] == 400
                except (IndexError, OSError):     # closed unread: the slots not back yet
                    return False
            wait_until(served)
            self.google.browse(shown[0])
            thread.join(10)
        self.assertFalse(thread.is_alive())
        self.assertIn("answer", outcome, outcome.get("error"))

    def test_forged_requests_get_400_and_the_real_redirect_still_signs_in(self):
        thread, outcome, shown = self.start(open_browser=None, wait=10)
        port = self.port_of(shown[0])
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)   # held open, silent
        self.addCleanup(idle.close)
        for path in ("/?error=access_denied", "/?error=access_denied&state=wrong",
                     "/?code=4/stolen&state=", "/?code=4/stolen"):
            with self.subTest(path=path):
                status, _ = self.get(port, path)
                self.assertEqual(status, 400)
        self.assertTrue(thread.is_alive())       # still waiting for the real answer
        self.google.browse(shown[0])             # the real redirect, with the idle one still open
        thread.join(10)
        self.assertFalse(thread.is_alive())
        self.assertNotIn("error", outcome)
        self.assertEqual(outcome["answer"]["refresh_token"], "1//refresh-1")
        self.assertEqual([r["code"] for r in self.google.token_requests], ["4/code-1"])

    def test_a_refusal_with_the_right_state_still_ends_the_sign_in(self):
        self.google.consent = "deny"
        thread, outcome, shown = self.start(open_browser=None, wait=10)
        self.get(self.port_of(shown[0]), "/?error=access_denied")     # no state: ignored
        self.assertTrue(thread.is_alive())
        self.google.browse(shown[0])
        thread.join(10)
        self.assertEqual(outcome["error"].error, "access_denied")

    def test_an_idle_connection_neither_blocks_a_pasted_address_nor_the_deadline(self):
        pasted: List[str] = []
        shown_box: List[str] = []

        def read_pasted(timeout: float) -> Optional[str]:
            time.sleep(min(timeout, 0.05))
            if pasted or not shown_box:
                return None
            pasted.append(self.google.final_address(shown_box[0]))
            return pasted[0]

        def show(url: str) -> None:
            shown_box.append(url)
            idle = socket.create_connection(("127.0.0.1", self.port_of(url)), timeout=5)
            self.addCleanup(idle.close)
            idle.sendall(b"GET /?st")            # a request that never ends
        started = time.monotonic()
        answer = self.authorize(open_browser=None, show=show, read_pasted=read_pasted, wait=10)
        self.assertEqual(answer["refresh_token"], "1//refresh-1")
        self.assertLess(time.monotonic() - started, 5)
        thread, outcome, shown = self.start(open_browser=None, wait=0.4)
        idle = socket.create_connection(("127.0.0.1", self.port_of(shown[0])), timeout=5)
        self.addCleanup(idle.close)
        thread.join(8)
        self.assertFalse(thread.is_alive())
        self.assertEqual(outcome["error"].error, "timeout")
        self.assertLess(outcome["took"], 4)

    def test_auth_on_a_busy_port_is_a_usage_error(self):
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, out, err = run_cli("auth", "--user", USER, "--client-secret-file", self.client_file(),
                                 "--no-browser", "--port", str(port), env=self.env)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertEqual(err.strip().count("\n"), 0)
        self.assertIn("port %d is in use" % port, err)


class TokenEndpointSafetyTest(FakeServerTest):
    def setUp(self):
        super().setUp()
        self.google = FakeGoogle(self.server)
        self.addCleanup(self.google.stop)
        self.client = gc.OAuthClient(CLIENT_ID, CLIENT_SECRET)
        self.env = {"XDG_CONFIG_HOME": os.path.join(self.tmp, "config"), "DISPLAY": ":0"}
        for name, value in (("GOOGLE_AUTH_URL", self.google.auth_url),
                            ("GOOGLE_TOKEN_URL", self.google.token_url), ("OAUTH_WAIT", 5)):
            patcher = mock.patch.object(gc, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)

    client_file = OAuthTest.client_file
    authorize = OAuthTest.authorize
    store_grant = OAuthTest.store_grant
    imap_argv = OAuthTest.imap_argv

    def test_a_redirect_from_the_token_endpoint_is_refused(self):
        refresh = self.store_grant()
        self.google.token_fault = "redirect"
        source = gc.OAuthTokenSource(self.client, refresh, user=USER,
                                     token_url=self.google.token_url)
        with self.assertRaises(gc.ProtocolError) as caught:
            source()
        self.assertIn("redirect", str(caught.exception))
        self.assertIn("refusing to follow it", str(caught.exception))
        self.assertEqual(self.google.redirected, [])          # nothing went to the new address
        code, out, err = run_cli(*self.imap_argv(), env=self.env)
        self.assertEqual(code, gc.EXIT_SERVER, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("refusing to follow it", err)
        self.assertNotIn(refresh, err)
        self.assertEqual(self.google.redirected, [])

    def test_auth_with_an_unwritable_config_home_is_one_line_exit_2(self):
        env = dict(self.env, XDG_CONFIG_HOME=UNWRITABLE)
        with mock.patch.object(gc.webbrowser, "open", self.google.browse):
            code, out, err = run_cli("auth", "--user", USER, "--client-secret-file",
                                     self.client_file(), env=env)
        self.assertEqual(code, gc.EXIT_USAGE, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn(UNWRITABLE, err)
        self.assertIn("XDG_CONFIG_HOME", err)
        self.assertNotIn("1//refresh", out + err)
        with mock.patch.dict(os.environ, env):
            with self.assertRaises(gc.RulesError):
                gc.save_refresh_token(USER, self.client, "1//r")


# --- Doctor: what a server can and cannot do, before any change --------------------------


class DoctorTest(unittest.TestCase):
    """`doctor` on every server kind of the fake: one table, read-only, the exit code of
    the first problem."""

    def doctor(self, server: FakeGmail, *extra: str, rules: Any = None,
               env: Optional[dict] = None) -> Tuple[int, str, str]:
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "rules.json")
        with open(path, "w") as handle:
            json.dump(rules or EXAMPLE_DOC, handle)
        return run_cli("doctor", "--user", USER, "--host", "127.0.0.1", "--port",
                       str(server.port), "--plaintext", "--retries", "0", "--rules", path,
                       *extra, env=dict({"GMAIL_APP_PASSWORD": PASSWORD}, **(env or {})))

    def start(self, **options: Any) -> FakeGmail:
        server = FakeGmail(**options).start()
        self.addCleanup(server.stop)
        return server

    def rows(self, out: str) -> Dict[str, str]:
        """check -> its result (several rows of one check joined by ' | ')."""
        found: Dict[str, List[str]] = {}
        for line in out.splitlines():
            if line.startswith("  ") and not line.startswith("   ") and "  " in line[2:]:
                check, result = line[2:].split("  ", 1)
                found.setdefault(check.strip(), []).append(result.strip())
        return {check: " | ".join(results) for check, results in found.items()}

    # What each kind shows (a fragment of the row) and its exit code.
    EXPECTED = {
        "gmail": (0, {"moving": "MOVE: safe", "archive": "takes away the Inbox label",
                      "all mail": "[Gmail]/All Mail (marked \\All)",
                      "trash": "[Gmail]/Trash (marked \\Trash)",
                      "capabilities": "X-GM-EXT-1", "namespace": 'prefix "", separator "/"',
                      "rules": "every action of 5 rules can be done here"}),
        "move": (0, {"moving": "MOVE: safe", "archive": "Archive (marked \\Archive)",
                     "all mail": "none (no folder is marked \\All)",
                     "rules": "labels are copies into folders here (no Gmail labels)"}),
        "uidplus": (0, {"moving": "COPY, then \\Deleted and UID EXPUNGE",
                        "capabilities": "no MOVE; UIDPLUS"}),
        "neither": (5, {"moving": "only with --allow-expunge",
                        "rules": "PROBLEM 127.0.0.1 has neither MOVE nor UIDPLUS"}),
        "no-special-use": (0, {"trash": "Deleted Items (found by its name: no folder is "
                                        "marked \\Trash)",
                               "rules": "trash goes to 'Deleted Items': no folder is marked "
                                        "\\Trash, so it was chosen by its name | archive goes "
                                        "to 'Archives': no folder is marked \\Archive, so it "
                                        "was chosen by its name | labels are copies into "
                                        "folders here (no Gmail labels)",
                               "archive": "Archives (found by its name"}),
        "inbox-prefix": (0, {"namespace": 'prefix "INBOX.", separator "."',
                             "trash": "INBOX.Trash (marked \\Trash)"}),
    }

    def test_every_server_kind_read_only(self):
        self.assertEqual(set(self.EXPECTED), set(SERVER_KINDS))
        for kind, (code, fragments) in self.EXPECTED.items():
            with self.subTest(kind=kind):
                server = self.start(kind=kind)
                server.add_message(make_message("receipt 1"))
                got, out, err = self.doctor(server)
                self.assertEqual((got, err), (code, ""), out)
                rows = self.rows(out)
                for check, fragment in fragments.items():
                    self.assertIn(fragment, rows.get(check, ""), out)
                    if check == "rules" and code == 0:      # the whole row, nothing more
                        self.assertEqual(rows[check], fragment)
                self.assertIn("sign-in", rows)
                self.assertIn("INBOX: no state yet", rows["state"])
                self.assertTrue(out.rstrip().endswith("The rules can run here.") == (code == 0))
                commands = server.commands()
                self.assertFalse(set(commands) & (_WRITE_COMMANDS | {"SELECT", "EXAMINE",
                                                                    "APPEND"}), commands)
                self.assertEqual(commands[-1], "LOGOUT")
                self.assertEqual(server.uids("INBOX"), [1])

    def test_problems_come_with_what_to_do_and_allow_expunge_settles_them(self):
        server = self.start(kind="neither")
        code, out, err = self.doctor(server)
        self.assertEqual(code, gc.EXIT_SERVER)
        self.assertIn("What to do:\n  rules: pass --allow-expunge", out)
        self.assertIn("(a run would exit 5)", out)
        code, out, err = self.doctor(server, "--allow-expunge")
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("a plain EXPUNGE (--allow-expunge)", self.rows(out)["moving"])
        code, out, err = self.doctor(server, "--allow-expunge", "--folder", "Nope")
        self.assertEqual(code, gc.EXIT_SERVER, out)
        self.assertIn("PROBLEM Nope: not on this server", self.rows(out)["folders"])

    def test_a_refused_sign_in_and_no_server_are_rows_too(self):
        server = self.start(kind="move")
        code, out, err = self.doctor(server, env={"GMAIL_APP_PASSWORD": "wrong"})
        self.assertEqual(code, gc.EXIT_AUTH, err)
        self.assertIn("PROBLEM", self.rows(out)["sign-in"])
        self.assertIn("check the password", out)
        port = server.port
        server.stop()
        server.port = port
        code, out, err = self.doctor(server)
        self.assertEqual(code, gc.EXIT_CONNECTION, err)
        self.assertIn("PROBLEM", self.rows(out)["connection"])

    def test_gmail_searches_are_named_off_gmail_only(self):
        rules = {"rule": [{"name": "Promo", "gmail_query": "category:promotions",
                           "subject": "sale", "star": True}]}
        for kind, expected in (("move", 'rule 1 ("Promo"): its gmail_query needs Gmail'),
                               ("gmail", "every action of 1 rule can be done here")):
            with self.subTest(kind=kind):
                code, out, err = self.doctor(self.start(kind=kind), rules=rules)
                self.assertEqual(code, 0, err)
                self.assertTrue(self.rows(out)["rules"].startswith(expected), out)

    def test_json_state_and_budget(self):
        server = self.start(kind="move")
        code, out, err = self.doctor(server, "--json", "--daily-budget", "1K")
        self.assertEqual(code, 0, err)
        record = json.loads(out)
        self.assertEqual(record["type"], "doctor")
        checks = [row["check"] for row in record["rows"]]
        self.assertEqual(checks[:3], ["server", "sign-in", "capabilities"])
        self.assertIn("budget", checks)
        budget = next(row for row in record["rows"] if row["check"] == "budget")
        self.assertIn("of 1.0 KB downloaded today", budget["result"])

    def test_tls_row_names_version_and_certificate(self):
        server = self.start(tls=True)
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        code, out, err = run_cli("doctor", "--user", USER, "--host", "localhost", "--port",
                                 str(server.port), "--cafile", write_ca_file(tmp),
                                 "--retries", "0", env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 0, err + out)
        tls = self.rows(out)["TLS"]
        self.assertRegex(tls, r"^TLSv1\.[23] \(")
        self.assertIn("verified, valid until", tls)
        self.assertIn("certificate for localhost", tls)

    def test_known_providers(self):
        for host, name in (("imap.gmail.com", "Gmail"), ("imap.mail.me.com", "iCloud"),
                           ("outlook.office365.com", "Microsoft 365"),
                           ("imap.mail.yahoo.com", "Yahoo"), ("imap.aol.com", "Yahoo"),
                           ("IMAP.GMAIL.COM.", "Gmail")):
            with self.subTest(host=host):
                self.assertEqual(gc.provider_note(host)[0], name)
        self.assertIn("2,500 MB", gc.provider_note("imap.gmail.com")[1])
        self.assertIn("no MOVE", gc.provider_note("imap.mail.me.com")[1])
        self.assertIn("OAuth2 only", gc.provider_note("outlook.office365.com")[1])
        self.assertIn("10,000 messages per folder", gc.provider_note("imap.mail.yahoo.com")[1])
        self.assertIsNone(gc.provider_note("notgmail.com"))
        self.assertIsNone(gc.provider_note("127.0.0.1"))


# --- Importers and suggestions -----------------------------------------------------------


class ImportFiltersTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def test_every_property_becomes_the_expected_rule_or_note(self):
        imported = gc.import_gmail_filters(SAMPLE_FILTERS)
        self.assertEqual(imported.filters, 9)
        self.assertEqual(imported.doc["rule"], SAMPLE_RULES)
        self.assertEqual(list(imported.notes), SAMPLE_NOTES)
        self.assertEqual(imported.comments[3], (
            "Gmail filter 4: " + SAMPLE_RULES[3]["gmail_query"],
            "Decided by Gmail's search alone: on other servers and in `test` this rule is skipped."))
        self.assertEqual(len(imported.comments), len(SAMPLE_RULES))

    def test_local_conditions_say_what_the_filter_says(self):
        rules, notes = gc.parse_rules(gc.import_gmail_filters(SAMPLE_FILTERS).doc).local()
        self.assertEqual([r.name for r in rules.rules],
                         ["Gmail filter 1", "Gmail filter 3", "Gmail filter 5", "Gmail filter 6"])
        self.assertEqual(len(notes), 7)
        cases = [
            ("From: Bank <alerts@bank.example>", {}, ["Gmail filter 1"]),
            ("From: ALERTS@Bank.Example", {}, ["Gmail filter 1"]),
            ("From: xalerts@bank.example", {}, []),
            ("From: alerts@bank.example.evil", {}, []),
            ("Subject: Your  order 42", {"has_attachment": True}, ["Gmail filter 3"]),
            ("Subject: Your orders", {"has_attachment": True}, []),
            ("Subject: Ihre rechnung", {"has_attachment": True}, ["Gmail filter 3"]),
            ("Subject: Ihre Rechnung", {"has_attachment": False}, []),
            ("From: x@y.example", {"size": 6 * 1024 * 1024}, ["Gmail filter 5"]),
            ("From: n@newsletter.example", {"size": 99 * 1024}, ["Gmail filter 6"]),
            ("From: n@newsletter.example", {"size": 101 * 1024}, []),
            ("From: n@newsletter.examples", {"size": 10}, []),
        ]
        for headers, fields, expected in cases:
            with self.subTest(headers, **fields):
                fields.setdefault("size", 100)
                decision = rules.classify(info(headers, **fields), final=True, now=NOW)
                self.assertEqual([name for name, _ in decision.matches], expected)

    def test_senders_map_locally_only_when_they_are_addresses_or_domains(self):
        imported = gc.import_gmail_filters(filter_export(
            [("from", "amazon"), ("label", "A")],
            [("from", "John Smith"), ("label", "J")],
            [("from", "bank.example"), ("label", "B")]))
        rules = imported.doc["rule"]
        self.assertNotIn("from", rules[0])
        self.assertEqual(rules[1]["gmail_query"], "from:(John Smith)")
        self.assertNotIn("from", rules[1])
        self.assertEqual(rules[2]["from"], "/[@.]bank\\.example(?![\\w.-])/i")
        local, _ = gc.parse_rules(imported.doc).local()
        for sender, expected in [("a@bank.example", True), ("a@mail.bank.example", True),
                                 ("a@notbank.example", False), ("a@bank.example.org", False)]:
            with self.subTest(sender):
                decision = local.classify(info(f"From: {sender}"), final=True, now=NOW)
                self.assertEqual(bool(decision.matches), expected)

    def test_cli_writes_toml_and_json_that_check_accepts(self):
        xml_path = self.write("mailFilters.xml", SAMPLE_FILTERS)
        for fmt in ("toml", "json"):
            with self.subTest(fmt):
                out_path = os.path.join(self.tmp, f"rules.{fmt}")
                code, out, err = run_cli("import-filters", xml_path, "-o", out_path)
                self.assertEqual(code, 0, err)
                self.assertEqual(out, "")
                lines = err.splitlines()
                self.assertEqual(lines[:-1], [f"gmail_classify: {xml_path}: {n}" for n in SAMPLE_NOTES])
                self.assertIn(f"wrote {out_path}: 7 rules", lines[-1])
                self.assertEqual(gc.load_rules(out_path), gc.parse_rules(
                    {"rule": SAMPLE_RULES}, out_path))
                code, out, err = run_cli("check", out_path)
                self.assertEqual((code, err), (0, ""))
                self.assertIn("7 rules, valid", out)
                self.assertIn('note: rule 4 ("Gmail filter 4") has only a gmail_query: skipped', out)
                self.assertIn('note: rule 1 ("Gmail filter 1"): its gmail_query needs Gmail', out)
                code, _, err = run_cli("import-filters", xml_path, "-o", out_path)
                self.assertEqual(code, gc.EXIT_USAGE)
                self.assertIn("--force", err)
                code, _, err = run_cli("import-filters", xml_path, "-o", out_path, "--force", "-q")
                self.assertEqual(code, 0, err)
                self.assertNotIn("wrote", err)          # -q: the notes only
                self.assertEqual(len(err.splitlines()), len(SAMPLE_NOTES))

    def test_cli_prints_toml_to_stdout_by_default(self):
        xml_path = self.write("mailFilters.xml", SAMPLE_FILTERS)
        code, out, err = run_cli("import-filters", xml_path)
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("# Imported from mailFilters.xml"))
        self.assertIn("[[rule]]\nname = \"Gmail filter 1\"\n", out)
        self.assertIn("--new-only", out)
        self.assertEqual(gc.parse_toml(out)["rule"], SAMPLE_RULES)
        if tomllib is not None:
            self.assertEqual(tomllib.loads(out)["rule"], SAMPLE_RULES)
        code, out, err = run_cli("import-filters", "--format", "json", xml_path)
        self.assertEqual(json.loads(out), {"rule": SAMPLE_RULES})

    def test_hostile_or_wrong_files_are_refused_in_one_line(self):
        laughs = (b"<?xml version='1.0'?><!DOCTYPE feed [<!ENTITY a 'aaaaaaaaaa'>"
                  b"<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'><!ENTITY c '&b;&b;&b;&b;&b;&b;'>]>"
                  b"<feed xmlns='http://www.w3.org/2005/Atom'><title>&c;</title></feed>")
        external = (b"<?xml version='1.0'?><!DOCTYPE feed [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>"
                    b"<feed xmlns='http://www.w3.org/2005/Atom'><title>&x;</title></feed>")
        table = [
            ("laughs.xml", laughs, "DOCTYPE"),
            ("external.xml", external, "DOCTYPE"),
            ("broken.xml", b"<feed><entry></feed>", "not valid XML"),
            ("rss.xml", b"<rss version='2.0'></rss>", "not a Gmail filter export"),
            ("big.xml", b" " * (gc.MAX_FILTER_FILE_BYTES + 1), "far more than a filter export"),
        ]
        for name, data, expected in table:
            with self.subTest(name):
                code, out, err = run_cli("import-filters", self.write(name, data))
                self.assertEqual(code, gc.EXIT_USAGE, err)
                self.assertIn(expected, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertEqual(out, "")
        code, _, err = run_cli("import-filters", os.path.join(self.tmp, "missing.xml"))
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("cannot read", err)

    def test_a_property_given_twice_with_different_values_skips_the_filter(self):
        imported = gc.import_gmail_filters(filter_export(
            [("from", "a@x.example"), ("from", "b@x.example"), ("label", "A")],
            [("label", "B"), ("label", "B"), ("subject", "hi")]))
        self.assertEqual([r["name"] for r in imported.doc["rule"]], ["Gmail filter 2"])
        self.assertEqual(imported.notes, ("filter 1: skipped: property from given twice",))

    def test_a_label_with_a_line_break_is_left_out_with_a_note(self):
        imported = gc.import_gmail_filters(filter_export(
            [("from", "a@x.example"), ("label", "Two\nlines"), ("shouldStar", "true")]))
        self.assertEqual(imported.doc["rule"][0]["star"], True)
        self.assertNotIn("label", imported.doc["rule"][0])
        self.assertEqual(imported.notes,
                         ("filter 1: left out label 'Two\\nlines': it holds a line break",))

    def test_output_name_and_format_must_agree(self):
        xml_path = self.write("mailFilters.xml", SAMPLE_FILTERS)
        for extra, expected in [(["-o", os.path.join(self.tmp, "r.yaml")], "*.toml or *.json"),
                                (["-o", os.path.join(self.tmp, "r.toml"), "--format", "json"],
                                 "--format json does not match")]:
            with self.subTest(extra):
                code, out, err = run_cli("import-filters", xml_path, *extra)
                self.assertEqual(code, gc.EXIT_USAGE)
                self.assertIn(expected, err)
                self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertEqual(sorted(os.listdir(self.tmp)), ["mailFilters.xml"])

    def test_a_file_with_nothing_imap_can_do_writes_nothing(self):
        path = self.write("f.xml", filter_export([("from", "a@b.example"), ("forwardTo", "c@d.example")]))
        out_path = os.path.join(self.tmp, "rules.json")
        code, out, err = run_cli("import-filters", path, "-o", out_path)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("none of its 1 filters", err)
        self.assertFalse(os.path.exists(out_path))


class ImportedRulesOnGmailTest(FakeServerTest):
    def test_every_matching_filter_applies_and_the_query_goes_to_the_server(self):
        both = self.server.add_message(make_message("hello there", sender="Alice <alice@example.com>"))
        one = self.server.add_message(make_message("hello", sender="Bob <bob@example.com>"))
        lookalike = self.server.add_message(make_message("x", sender="Al <xalice@example.com>"))
        imported = gc.import_gmail_filters(filter_export(
            [("from", "alice@example.com"), ("label", "From Alice")],
            [("subject", "hello"), ("label", "Hello"), ("shouldStar", "true")]))
        rules = gc.parse_rules(imported.doc, "rules.json")
        report = gc.classify_folder(self.connect(), rules, "INBOX", apply=True)
        self.assertEqual(report.matched, {"Gmail filter 1": 1, "Gmail filter 2": 2})
        self.assertEqual(self.server.message(both).labels, {"\\Inbox", "From Alice", "Hello"})
        self.assertEqual(self.server.message(one).labels, {"\\Inbox", "Hello"})
        self.assertIn("\\Flagged", self.server.message(one).flags)
        self.assertEqual(self.server.message(lookalike).labels, {"\\Inbox"})
        raw = [e.line for e in self.server.log if b"X-GM-RAW" in e.line]
        self.assertEqual(len(raw), 2)
        self.assertTrue(any(b'X-GM-RAW "from:alice@example.com"' in line for line in raw), raw)


class SuggestTest(FakeServerTest):
    def seed(self) -> int:
        add = self.server.add_message
        for i in range(5):
            add(make_message(f"Python 3.{i} released", sender=f"dev{i}@python.org",
                             extra="List-Id: Python announce <python-announce.python.org>\n"))
        for i in range(3):
            add(make_message(f"[dev] thread {i}", sender="x@lists.example",
                             extra="List-Id: <dev.lists.example>\n"))
        add(make_message("alone", extra="List-Id: <lonely.example>\n"))
        for i in range(4):
            add(make_message(f"[repo] PR #{i}", sender="GitHub <noreply@github.com>"))
        for i in range(3):
            add(make_message(f"Sale {i}", sender="Shop <news@shop.example>",
                             extra="List-Unsubscribe: <mailto:u@shop.example>\n"))
        for i in range(3):
            add(make_message(f"Lunch {i}?", sender="Alice <alice@friends.example>"))
        for i in range(2):
            add(make_message(f"Dinner {i}?", sender="Bob <bob@friends.example>"))
        for i in range(2):
            add(make_message(f"Hi {i}", sender="Carol <carol@solo.example>"))
        add(make_message("once", sender="Dave <dave@once.example>"))
        add(make_message("odd", sender='"/x/" </x/@evil.example>'))
        return 25

    def test_proposes_lists_automated_senders_domains_and_senders(self):
        total = self.seed()
        found = gc.suggest_rules(self.connect(), "INBOX", batch_size=5)
        self.assertEqual(found.examined, total)
        self.assertEqual(found.doc["rule"], [
            {"name": "List python-announce.python.org", "list_id": "python-announce.python.org",
             "label": "Lists/python-announce"},
            {"name": "List dev.lists.example", "list_id": "dev.lists.example", "label": "Lists/dev"},
            {"name": "Automated noreply@github.com", "from": "noreply@github.com",
             "label": "Automated/github.com"},
            {"name": "Automated news@shop.example", "from": "news@shop.example",
             "label": "Automated/shop.example"},
            {"name": "Domain friends.example", "from": "@friends.example",
             "label": "Senders/friends.example"},
            {"name": "Sender carol@solo.example", "from": "carol@solo.example",
             "label": "Senders/carol@solo.example"},
        ])
        self.assertEqual(found.comments[0],
                         ("Mailing list 'Python announce': 5 messages, e.g. \"Python 3.0 released\"",))
        self.assertEqual(found.comments[4], ('2 senders at friends.example: 5 messages, e.g. "Lunch 0?"',))
        # read-only, headers only, batched
        self.assertEqual(set(self.commands()) & WRITE_COMMANDS, set())
        self.assertIn("EXAMINE", self.commands())
        fetches = [e.line for e in self.server.log if e.command == "UID FETCH"]
        self.assertEqual(len(fetches), 5)
        for line in fetches:
            self.assertIn(b"BODY.PEEK[HEADER.FIELDS (FROM SUBJECT LIST-ID", line)
            self.assertNotIn(b"BODY[", line)
            self.assertNotIn(b"BODY.PEEK[]", line)
        self.assertTrue(all("\\Seen" not in m.flags for m in self.server.messages("INBOX")))

    def test_cli_writes_a_file_that_check_accepts(self):
        self.seed()
        path = os.path.join(self.tmp, "suggested.toml")
        argv = ["suggest", "--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--top", "1", "-o", path]
        code, out, err = run_cli(*argv, env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 0, err)
        self.assertIn(f"wrote {path}: 4 rules", err)
        code, out, err = run_cli("check", path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("4 rules, valid", out)
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        self.assertIn("# Suggested by gmail_classify from the headers of 25 messages in INBOX", text)
        self.assertIn('# Automated sender: 4 messages, e.g. "[repo] PR #0"\n[[rule]]\n', text)
        code, out, err = run_cli(*argv, env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("--force", err)

    def test_an_empty_folder_suggests_nothing(self):
        code, out, err = run_cli("suggest", "--user", USER, "--host", "127.0.0.1", "--port",
                                 str(self.server.port), "--plaintext",
                                 env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual((code, out), (0, ""))
        self.assertIn("nothing to suggest", err)


# Rules for the export tests, the decisions of each checked on SIEVE_CORPUS: every kind of
# condition Sieve can say, regexes in and out of the ERE subset, labels, moves, archive,
# trash, flags, a {year} folder; CONTINUE_DOC adds `continue` (the variables form).
SIEVE_DOC = {"rule": [
    {"name": "Receipts", "subject": ["receipt", "/order #?[0-9]{5}/i"], "label": "Receipts",
     "mark_read": True},
    {"name": "News", "header": {"List-Unsubscribe": True}, "from": "news", "move": "Newsletters/{year}"},
    {"name": "Big", "larger_than": "20K", "archive": True},
    {"name": "Spam", "any": [{"from": "spam.example"}, {"subject": "/^\\[SPAM\\]/"}],
     "trash": True, "star": True},
    {"name": "Not bulk", "not": {"header": {"Precedence": "bulk"}}, "to": "me@", "label": "Direct"},
]}
CONTINUE_DOC = {"rule": [
    {"name": "Tag shop", "from": "shop", "label": "Shopping", "continue": True},
    {"name": "Starred", "starred": True, "label": "x", "continue": True},
    {"name": "Receipts", "subject": "receipt", "label": ["Receipts", "Shopping"], "archive": True,
     "mark_read": True},
    {"name": "Urgent", "subject": "urgent", "star": True, "continue": True},
    {"name": "Work", "from": "/@work[.]example/", "move": "Work", "mark_unread": True},
]}


def _sieve_corpus() -> List[bytes]:
    today = email.utils.format_datetime(datetime.now(timezone.utc)).encode()  # {year} at delivery
    return [make_message("Your receipt", "Shop <shop@x.example>"),
            make_message("ORDER 12345 confirmed", "a@x.example"),
            make_message("news of the week", "News <news@x.example>", extra="List-Unsubscribe: <mailto:u@x>\n"
                         ).replace(b"Mon, 04 Mar 2024 10:00:00 +0000", today),
            make_message("news without list", "News <news@x.example>"),
            make_message("large", body="x" * 30000),
            make_message("[SPAM] hi", "b@y.example"),
            make_message("[spam] lower case", "b@y.example", to="other@z"),
            make_message("hello", "Deals <a@spam.example>"),
            make_message("hi", "c@z.example", to="me@here.example"),
            make_message("hi", "c@z.example", to="me@here.example", extra="Precedence: bulk\n"),
            make_message("urgent receipt", "shop@work.example"),
            make_message("urgent", "boss@work.example"),
            make_message("nothing", "x@elsewhere.example", to="you@there")]


class SieveExportTest(unittest.TestCase):
    """export --format sieve: compiled by Pigeonhole's sievec, and sieve-test decides every
    message of a corpus as the rules do (folders and flags)."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def write(self, name: str, data: Any) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as handle:
            handle.write(data if isinstance(data, bytes) else json.dumps(data).encode())
        os.chmod(path, 0o644)
        return path

    @staticmethod
    def expected(rules: gc.Ruleset, raw: bytes) -> set:
        """What delivery should do by the rules' own decision: {(folder, flags added)}."""
        decision = rules.classify(gc.message_info_from_bytes(raw), final=True)
        actions = decision.actions.expanded(gc.message_info_from_bytes(raw))
        flags = frozenset(row.flag.lower() for row in actions.flag_actions() if row.add)
        folders = list(actions.labels)
        destination = actions.move or ("Archive" if actions.archive else "Trash" if actions.trash else None)
        folders.append(destination or "INBOX")
        return {(folder, flags) for folder in folders}

    @staticmethod
    def performed(output: str) -> set:
        """sieve-test's account of what it did: {(folder, flags added)}."""
        found, folder, flags = set(), None, set()
        for line in output.splitlines():
            stored = re.match(r"\s*\* store message in folder: (.*)", line)
            if stored or line.startswith("Implicit keep") and folder:
                if folder:
                    found.add((folder, frozenset(flags)))
                folder, flags = (stored.group(1) if stored else None), set()
            added = re.match(r"\s*\+ add IMAP flags: (.*)", line)
            if added and folder:
                flags.update(added.group(1).split())
        if folder:
            found.add((folder, frozenset(flags)))
        return found

    def sieve_test(self, script: str, messages: List[bytes]) -> List[set]:
        if not (shutil.which("sievec") and shutil.which("sieve-test")):
            self.skipTest("Pigeonhole's sievec and sieve-test are not installed")
        os.chmod(self.tmp, 0o755)       # sieve-test, run as root, reads as another user
        done = subprocess.run(["sievec", script], stderr=subprocess.PIPE, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        conf = self.write("sieve-test.conf", (
            f"mail_location = maildir:{self.tmp}/maildir\n" + (
                "mail_uid = nobody\nmail_gid = nogroup\nfirst_valid_uid = 1\nfirst_valid_gid = 1\n"
                if os.geteuid() == 0 else "")).encode())
        results = []
        for index, raw in enumerate(messages):
            mail = self.write(f"m{index}.eml", raw)
            done = subprocess.run(["sieve-test", "-c", conf, script, mail], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
            self.assertEqual(done.returncode, 0, done.stderr)
            results.append(self.performed(done.stdout))
        return results

    def check_agrees(self, doc: dict, warning: str = "", only: Sequence[int] = ()) -> str:
        rules = parse_rules(doc, "rules.json")
        path = self.write("rules.json", doc)
        code, out, err = run_cli("export", path, "--format", "sieve")
        self.assertEqual(code, 0)
        self.assertEqual(err, warning and f"gmail_classify: {path}: {warning}\n")
        self.assertNotIn(":create", out)
        script = self.write("rules.sieve", out.encode())
        corpus = [raw for i, raw in enumerate(_sieve_corpus()) if not only or i in only]
        got = self.sieve_test(script, corpus)
        for raw, performed in zip(corpus, got):
            with self.subTest(message=raw.split(b"\r\n")[2]):
                self.assertEqual(performed, self.expected(rules, raw))
        return out

    def test_sieve_test_decides_as_the_rules_do(self):
        out = self.check_agrees(SIEVE_DOC)
        self.assertIn('require ["date", "fileinto", "imap4flags", "regex", "variables"];', out)
        self.assertIn('header :regex :comparator "i;ascii-casemap" "subject" "order #?[0-9]{5}"', out)
        self.assertIn('header :regex :comparator "i;octet" "subject" "^\\\\[SPAM\\\\]"', out)
        self.assertIn("size :over 20480", out)
        self.assertEqual(out.count("stop;"), 5)

    def test_with_continue_the_merged_actions_are_the_same_too(self):
        # (new mail is never starred: at delivery the rule left out cannot match)
        out = self.check_agrees(CONTINUE_DOC, "rule 2 (Starred) left out: starred has no Sieve "
                                              "test (it has continue, so the rules after it decide "
                                              "as before)", only=(0, 1, 7, 10, 11, 12))
        self.assertIn("# 4. Urgent (continue)", out)
        self.assertNotIn("# 2.", out)

    def test_a_rule_sieve_cannot_say_stops_the_export_unless_partial(self):
        doc = {"rule": [{"name": "A", "subject": "a", "label": "A"},
                        {"name": "Old", "older_than": "1y", "label": "x", "continue": True},
                        {"name": "Body", "body": "invoice", "label": "B"},
                        {"name": "Trash all", "from": "/./", "trash": True}]}
        path = self.write("rules.json", doc)
        code, out, err = run_cli("export", path, "--format", "sieve")
        self.assertEqual((code, out), (2, ""))
        self.assertIn('rule 3 ("Body") cannot be exported to Sieve: body contains "invoice" has no '
                      'Sieve test; later rules would catch its mail', err)
        code, out, err = run_cli("export", path, "--format", "sieve", "--partial")
        self.assertEqual(code, 0, err)
        self.assertIn("# 1. A\n", out)
        self.assertNotIn("Trash", out.split("require")[1])
        self.assertIn("# Stopped before rule 3 (Body)", out)
        self.assertIn("rule 2 (Old) left out: date older than 1y has no Sieve test", err)
        self.assertIn("stopped before rule 3 (Body)", err)
        for condition, why in (({"gmail_query": "x"}, "gmail query"), ({"has_label": "x"}, "has label"),
                               ({"program": ["x"]}, "program x"), ({"subject": "/\\d+/"}, "POSIX ERE"),
                               ({"from": "/^a/"}, "anchored"), ({"subject": "café"}, "not ASCII"),
                               ({"subject": "/x/m"}, "POSIX ERE")):
            with self.subTest(condition=condition):
                with self.assertRaises(gc.RulesError) as caught:
                    gc.export_sieve(parse_rules({"rule": [dict(name="R", label="L", **condition)]}, "r"))
                self.assertIn(why, str(caught.exception))

    def test_posix_ere_subset(self):
        table = [("a.b", "a.b"), ("^\\[x\\]$", "^\\[x\\]$"), ("a{2,3}b+c*d?", "a{2,3}b+c*d?"),
                 ("(ab|cd)[^x-z]", "(ab|cd)[^x-z]"), ("\\/path\\-x", "/path-x"), ("[]a]", "[]a]"),
                 ("\\d", None), ("a*?", None), ("(?:a)", None), ("[\\w]", None), ("\\b", None),
                 ("a{2", None), ("[[:alpha:]]", None), ("\u00e9", None), ("(a)\\1", None), ("*a", None)]
        for source, want in table:
            with self.subTest(source=source):
                self.assertEqual(gc._posix_ere(source), want)

    def test_output_file_is_private_and_kept_unless_force(self):
        path = self.write("rules.json", SIEVE_DOC)
        target = os.path.join(self.tmp, "out.sieve")
        code, out, err = run_cli("export", path, "--format", "sieve", "-o", target)
        self.assertEqual((code, out), (0, ""))
        self.assertIn("wrote", err)
        self.assertEqual(os.stat(target).st_mode & 0o777, 0o600)
        code, out, err = run_cli("export", path, "--format", "json", "-o", target)
        self.assertEqual(code, 2)
        self.assertIn("already exists; pass --force", err)
        code, out, err = run_cli("export", path, "--format", "json", "-o", target, "--force")
        self.assertEqual(code, 0)
        with open(target) as handle:
            data = json.load(handle)
        self.assertEqual(data["rules"][3]["condition"], {
            "type": "AnyOf", "parts": [
                {"type": "HeaderMatch", "key": "from", "headers": ["from"], "matcher": ["spam.example"],
                 "addresses": True},
                {"type": "HeaderMatch", "key": "subject", "headers": ["subject"],
                 "matcher": ["/^\\[SPAM\\]/"], "addresses": False}]})
        self.assertEqual(data["rules"][3]["actions"]["trash"], True)

    def test_closed_pipe_exits_141(self):
        self.state = os.path.join(self.tmp, "state")
        path = self.write("rules.json", SIEVE_DOC)
        ((code, err),) = ClosedOutputTest.closed_stdout(self, ["export", path, "--format", "sieve"])
        self.assertEqual(code, 141, err)


# Rules for the Gmail export round trip: what Gmail's search can say exactly, `continue`,
# first-match order (the later filters carry the earlier searches negated), a move.
GMAIL_EXPORT_DOC = {"rule": [
    {"name": "Invoices", "gmail_query": "subject:invoice", "has_attachment": True,
     "label": ["Finance", "Invoices"], "archive": True},
    {"name": "Big", "larger_than": "20K", "label": "Big", "continue": True},
    {"name": "Old unread", "all": [{"older_than": "1y"}, {"unread": True}],
     "not": {"has_label": "Keep"}, "mark_read": True},
    {"name": "Starred", "starred": True, "move": "Starred mail"},
    {"name": "Catch all", "gmail_query": "subject:hello", "label": "Hello", "star": True},
]}


def _with_attachment(subject: str) -> bytes:
    return (f"From: a@x.example\r\nTo: {USER}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@x>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            "Content-Type: text/plain\r\n\r\nsee attached\r\n--b\r\nContent-Type: application/pdf\r\n"
            "Content-Disposition: attachment; filename=a.pdf\r\n\r\nJVBERi0=\r\n--b--\r\n").encode()


class GmailExportTest(FakeServerTest):
    maxDiff = None
    """export --format gmail: the filter XML, read back by import-filters, decides a corpus
    on (fake) Gmail as the rules do."""

    def effect(self, rules: gc.Ruleset) -> Dict[str, tuple]:
        """Per subject, what a dry run would do, as Gmail shows it: labels added, archived,
        trashed, flags set (a move is a label and an archive)."""
        found: Dict[str, tuple] = {}

        def seen(outcome: gc.Outcome) -> None:
            labels, other = set(), set()
            for change in outcome.changes:
                if change["action"] == "label":
                    labels.add(change["label"])
                elif change["action"] == "move":
                    labels.add(change["after"]["folder"])
                    other.add("archive")
                else:
                    other.add(change["action"])
            found[outcome.subject] = (tuple(sorted(labels)), tuple(sorted(other)))
        gc.classify_folder(self.connect(), rules, "INBOX", on_message=seen)
        return found

    def test_round_trip_through_import_filters_gives_the_same_decisions(self):
        old = datetime(2020, 5, 1, tzinfo=timezone.utc)
        add = self.server.add_message
        add(_with_attachment("invoice 42"))
        add(_with_attachment("invoice big") + b"x" * 30000)
        add(make_message("invoice no attachment", body="y" * 30000))
        add(make_message("old unread"), date=old)
        add(make_message("old unread kept"), date=old, labels=("\\Inbox", "Keep"))
        add(make_message("old read"), date=old, flags=("\\Seen",))
        add(make_message("big old unread", body="z" * 30000), date=old)
        add(make_message("starred"), flags=("\\Flagged", "\\Seen"))
        add(make_message("hello there"), flags=("\\Seen",))
        add(make_message("hello starred"), flags=("\\Flagged", "\\Seen"))
        add(make_message("nothing"), flags=("\\Seen",))
        path = os.path.join(self.tmp, "rules.json")
        with open(path, "w") as handle:
            json.dump(GMAIL_EXPORT_DOC, handle)
        xml_path = os.path.join(self.tmp, "mailFilters.xml")
        code, out, err = run_cli("export", path, "--format", "gmail", "-o", xml_path)
        self.assertEqual(code, 0, err)
        code, imported, err = run_cli("import-filters", xml_path, "--format", "json")
        self.assertEqual((code, err), (0, ""))
        doc = json.loads(imported)
        self.assertEqual(len(doc["rule"]), 6)       # Invoices is two filters: one per label
        self.assertEqual(doc["rule"][2]["gmail_query"], "(larger:20480 -((subject:invoice) has:attachment))")
        before = self.effect(gc.load_rules(path))
        after = self.effect(parse_rules(doc, "imported.json"))
        self.assertEqual(after, before)
        # and the decisions are the ones the rules say (the corpus covers every rule)
        self.assertEqual(before["invoice big"], (("Finance", "Invoices"), ("archive",)))
        self.assertEqual(before["big old unread"], (("Big",), ("mark read",)))
        self.assertEqual(before["old unread kept"], ((), ()))
        self.assertEqual(before["starred"], (("Starred mail",), ("archive",)))
        self.assertEqual(before["hello starred"], (("Starred mail",), ("archive",)))
        self.assertEqual(before["hello there"], (("Hello",), ("star",)))
        self.assertEqual(before["nothing"], ((), ()))

    def test_what_gmail_cannot_say_stops_the_export_unless_partial(self):
        doc = {"rule": [{"name": "Q", "gmail_query": "from:x", "label": "Q"},
                        {"name": "Sub", "subject": "receipt", "label": "R", "continue": True},
                        {"name": "Unstar", "gmail_query": "from:y", "unstar": True},
                        {"name": "After", "gmail_query": "from:z", "trash": True}]}
        path = os.path.join(self.tmp, "rules.json")
        with open(path, "w") as handle:
            json.dump(doc, handle)
        code, out, err = run_cli("export", path, "--format", "gmail")
        self.assertEqual((code, out), (2, ""))
        self.assertIn('rule 3 ("Unstar") cannot be exported to Gmail filters: unstar has no Gmail '
                      'filter action', err)
        code, out, err = run_cli("export", path, "--format", "gmail", "--partial")
        self.assertEqual(code, 0, err)
        self.assertEqual(gc.import_gmail_filters(out.encode()).doc["rule"], [
            {"name": "Gmail filter 1", "gmail_query": "((from:x))", "label": "Q", "continue": True}])
        self.assertIn("rule 2 (Sub) left out: subject contains \"receipt\": Gmail's word-based search", err)
        long = {"rule": [{"name": f"R{i}", "gmail_query": "x" * 200 + str(i), "label": "L"} for i in range(8)]}
        with self.assertRaises(gc.RulesError) as caught:
            gc.export_gmail(parse_rules(long, "r.json"))
        self.assertIn("over Gmail's 1500", str(caught.exception))


# Rules whose folders differ between servers: a nested label, a non-ASCII folder (modified
# UTF-7 on the wire, UTF-8 in Sieve), a templated one, archive and trash.
SERVER_SIEVE_DOC = {"rule": [
    {"name": "Receipts", "subject": "receipt", "label": "Receipts/2024", "mark_read": True},
    {"name": "Drafts", "subject": "entwurf", "move": "Entwürfe/Alt"},
    {"name": "Monthly", "subject": "monthly", "move": "Reports/{year}"},
    {"name": "Big", "larger_than": "20K", "archive": True},
    {"name": "Spam", "from": "spam.example", "trash": True},
]}


def _server_sieve_corpus() -> List[bytes]:
    today = email.utils.format_datetime(datetime.now(timezone.utc)).encode()  # {year} at delivery
    return [make_message("Your receipt"), make_message("Entwurf 3"),
            make_message("monthly report").replace(b"Mon, 04 Mar 2024 10:00:00 +0000", today),
            make_message("large", body="x" * 30000), make_message("hi", "Deals <a@spam.example>"),
            make_message("nothing")]


class SieveExportForServerTest(AnyServerTest):
    """export --format sieve with connection options: the server's namespace, separator and
    special-use folders, read-only; the script compiles and sieve-test files as a run would."""

    write = SieveExportTest.write
    sieve_test = SieveExportTest.sieve_test
    performed = staticmethod(SieveExportTest.performed)

    def export(self, *extra: str, doc: Optional[dict] = None, **env: str) -> Tuple[int, str, str]:
        path = self.write("rules.json", doc or SERVER_SIEVE_DOC)
        return run_cli("export", path, "--format", "sieve", *extra,
                       env=dict({"IMAP_PASSWORD": PASSWORD}, **env))

    def connected(self, *extra: str, **options: Any) -> Tuple[int, str, str]:
        return self.export("--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                           "--plaintext", "--retries", "0", *extra, **options)

    def assert_read_only(self) -> None:
        self.assertLessEqual(set(self.commands()), {"CAPABILITY", "LOGIN", "NAMESPACE", "LIST",
                                                    "LOGOUT", "ID", "ENABLE"})

    def agrees(self, script: str, server_name: Callable[[str], str]) -> None:
        """sieve-test on the corpus files each message where the rules' decision, in the
        server's names, puts it."""
        rules = parse_rules(SERVER_SIEVE_DOC, "rules.json")
        path = self.write("rules.sieve", script.encode())
        corpus = _server_sieve_corpus()
        for raw, performed in zip(corpus, self.sieve_test(path, corpus)):
            with self.subTest(message=raw.split(b"\r\n")[2]):
                want = {(server_name(folder), flags)
                        for folder, flags in SieveExportTest.expected(rules, raw)}
                self.assertEqual(performed, want)

    def test_dovecot_like_server_prefix_separator_and_utf8_names(self):
        self.serve("inbox-prefix", folders=(("INBOX", ""), ("Archiv", "\\Archive"),
                                            ("Gelöschte Elemente", "\\Trash"), ("Sent", "\\Sent")))
        code, offline, err = self.export()
        self.assertEqual((code, err), (0, ""))
        code, out, err = self.connected()
        self.assertEqual((code, err), (0, ""))
        self.assert_read_only()
        names = {"Receipts/2024": "INBOX.Receipts.2024", "Entwürfe/Alt": "INBOX.Entwürfe.Alt",
                 "Reports/${year}": "INBOX.Reports.${year}", "Archive": "INBOX.Archiv",
                 "Trash": "INBOX.Gelöschte Elemente"}
        want = offline.replace("first match wins (as in gmail_classify).\n",
                               "first match wins (as in gmail_classify).\n# Folder names as "
                               f"{USER} at 127.0.0.1 has them (namespace \"INBOX.\", "
                               "separator \".\").\n")
        for rules_name, server_name in names.items():
            want = want.replace(f'fileinto "{rules_name}";', f'fileinto "{server_name}";')
        self.assertEqual(out, want)
        self.assertNotIn("&APY-", out)          # UTF-8, never modified UTF-7
        specials = {"Archive": "INBOX.Archiv", "Trash": "INBOX.Gelöschte Elemente", "INBOX": "INBOX"}
        self.agrees(out, lambda name: specials.get(name) or "INBOX." + name.replace("/", "."))

    def test_slash_server_without_special_use_finds_the_folders_by_name(self):
        self.serve("no-special-use")
        code, offline, err = self.export()
        code, out, err = self.connected()
        self.assertEqual((code, err), (0, ""))
        self.assert_read_only()
        self.assertIn('(namespace "", separator "/").\n', out)
        self.assertEqual(out.replace('fileinto "Archives";', 'fileinto "Archive";')
                         .replace('fileinto "Deleted Items";', 'fileinto "Trash";')
                         .replace(f"# Folder names as {USER} at 127.0.0.1 has them (namespace "
                                  '"", separator "/").\n', ""), offline)
        self.assertIn('fileinto "Entwürfe/Alt";', out)
        specials = {"Archive": "Archives", "Trash": "Deleted Items"}
        self.agrees(out, lambda name: specials.get(name, name))

    def test_what_the_server_lacks_refuses_and_gmail_runs_no_sieve(self):
        self.serve("move", special_use=False, folders=(("INBOX", ""), ("Sent", "")))
        code, out, err = self.connected()
        self.assertEqual((code, out), (gc.EXIT_SERVER, ""))
        self.assertIn("no folder marked \\Archive", err)
        self.assert_read_only()
        # A file whose rules need neither folder exports from that server all the same.
        code, out, err = self.connected(doc={"rule": [{"name": "R", "subject": "x", "move": "A/B"}]})
        self.assertEqual((code, err), (0, ""))
        self.assertIn('fileinto "A/B";', out)
        self.serve("gmail")
        code, out, err = self.connected()
        self.assertEqual((code, out), (gc.EXIT_SERVER, ""))
        self.assertEqual(err, "gmail_classify: Gmail runs no Sieve scripts at delivery; export "
                              "--format gmail writes its filters instead\n")

    def test_connection_options_are_for_sieve_only_and_rules_come_as_the_argument(self):
        self.serve("move")
        for extra, message in ((("--format", "json", "--host", "127.0.0.1"), "--format json does "
                                "not connect"),
                               (("--rules", "other.toml"), "drop --rules")):
            with self.subTest(extra=extra):
                code, out, err = self.export(*extra)
                self.assertEqual((code, out), (gc.EXIT_USAGE, ""))
                self.assertIn(message, err)
                self.assertEqual(len(err.splitlines()), 1)
        self.assertEqual(self.commands(), [])

    def test_account_tables_need_one_account_and_use_its_server_and_rules(self):
        self.serve("inbox-prefix")
        other = FakeGmail(kind="move").start()
        self.addCleanup(other.stop)
        tables = [{"name": "home", "user": USER, "host": "127.0.0.1", "port": self.server.port,
                   "tls": "plaintext", "rules": ["Receipts"]},
                  {"name": "work", "user": USER, "host": "127.0.0.1", "port": other.port,
                   "tls": "plaintext"}]
        doc = accounts_doc(*tables, rules=SERVER_SIEVE_DOC["rule"])
        code, out, err = self.export("--host", "127.0.0.1", doc=doc)
        self.assertEqual((code, out), (gc.EXIT_USAGE, ""))
        self.assertIn("add --account NAME (one of home, work)", err)
        code, out, err = self.export("--account", "home", "--account", "work", doc=doc)
        self.assertEqual((code, out), (gc.EXIT_USAGE, ""))
        self.assertIn("give --account once", err)
        self.assertEqual((self.commands(), other.commands()), ([], []))
        code, out, err = self.export("--account", "home", doc=doc, IMAP_PASSWORD_HOME=PASSWORD)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.count("fileinto \""), 1)     # home runs only the Receipts rule
        self.assertIn('fileinto "INBOX.Receipts.2024";', out)
        self.assertEqual(other.commands(), [])
        self.assert_read_only()

    def test_the_servers_own_names_are_never_read_as_templates(self):
        self.serve("move", folders=(("INBOX", ""), ("Ablage {year}", "\\Archive"),
                                    ("Trash", "\\Trash")))
        code, out, err = self.connected(doc={"rule": [{"name": "Old", "subject": "old",
                                                       "archive": True}]})
        self.assertEqual((code, err), (0, ""))
        self.assertIn('fileinto "Ablage {year}";', out)
        self.assertIn('require "fileinto";', out)       # no variables, no date


# --- Learning, explaining, comparing rules -----------------------------------------------


def assert_read_only(test: unittest.TestCase, server: FakeGmail) -> None:
    """No command that could change the mailbox (WRITE_COMMANDS, SELECT among them)
    reached ``server``; every FETCH peeked."""
    test.assertEqual(set(server.commands()) & WRITE_COMMANDS, set())
    test.assertIn("EXAMINE", server.commands())
    for line in server.raw_lines:
        if b"FETCH" in line.upper():
            test.assertNotRegex(line.upper(), rb"BODY\[(?!HEADER|\])", line)
            test.assertNotIn(b"BODY[", line.upper().replace(b"BODY.PEEK[", b""), line)


def _filed_mail(seed: int, count: int) -> gc.FiledMail:
    """The generator's mail as learn_rules' input, without a server (for the CPU check)."""
    messages = []
    for raw, labels, archived, starred, when, _due in FiledMailGenerator(seed).messages(count):
        headers = gc.parse_headers(raw)
        messages.append(gc.FiledMessage(gc._message_key(headers), when,
                                        MessageInfo(headers=headers), set(labels), set(),
                                        archived, starred))
    messages.sort(key=lambda m: (m.date, m.key))
    return gc.FiledMail(messages, True, "generated")


WHY_DOC = {"rule": [
    {"name": "Receipts", "subject": "receipt", "label": "Receipts", "continue": True},
    {"name": "GitHub", "from": "notifications@github.com", "label": "GitHub"},
    {"name": "Shop", "from": "@shop.example", "label": "Shop", "archive": True},
]}


def _eml(path: str, sender: str, subject: str, message_id: str = "<m1@example.com>",
         extra: str = "") -> str:
    with open(path, "wb") as handle:
        handle.write((f"From: {sender}\r\nTo: me@example.com\r\nSubject: {subject}\r\n"
                      f"Message-ID: {message_id}\r\nDate: Mon, 04 Mar 2024 10:00:00 +0000\r\n"
                      f"{extra}\r\nHello.\r\n").encode("utf-8"))
    return path


class WhyTest(TempDirMixin, unittest.TestCase):
    def setUp(self):
        self.tmp = self.make_dir()

    def rules(self) -> str:
        path = os.path.join(self.tmp, "rules.json")
        with open(path, "w") as handle:
            json.dump(WHY_DOC, handle)
        return path

    def test_every_rule_explains_its_verdict_in_order(self):
        msg = info("From: GitHub <notifications@github.com>\nSubject: Your receipt")
        found = gc.explain_message(parse_rules(WHY_DOC), msg, now=NOW)
        self.assertEqual([(v.name, v.matched, v.reached) for v in found.verdicts],
                         [("Receipts", True, True), ("GitHub", True, True),
                          ("Shop", False, False)])
        self.assertEqual(found.verdicts[0].reason, 'subject: "Your receipt" contains "receipt"')
        self.assertEqual(found.verdicts[1].reason, 'from: "GitHub <notifications@github.com>" '
                                                   'contains "notifications@github.com"')
        self.assertEqual(found.verdicts[2].reason, 'from: "GitHub <notifications@github.com>": '
                                                   'no match for "@shop.example"')
        self.assertEqual(found.decision.actions.labels, ("Receipts", "GitHub"))

    def test_cli_on_an_eml_file_shows_matched_unmatched_and_continue(self):
        path = _eml(os.path.join(self.tmp, "m.eml"), "Shop <orders@shop.example>", "A receipt")
        code, out, err = run_cli("why", path, "--rules", self.rules())
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines()[1:], [
            '  1. Receipts: matched: subject: "A receipt" contains "receipt" -> label Receipts; '
            'continue: passed on to the next rules',
            '  2. GitHub: no: from: "Shop <orders@shop.example>": no match for '
            '"notifications@github.com"',
            '  3. Shop: matched: from: "Shop <orders@shop.example>" contains "@shop.example" -> '
            'label Shop, archive; decides (no continue)',
            '  outcome: label Receipts, label Shop, archive (by Receipts, Shop)'])

    def test_cli_json_and_a_rule_not_reached(self):
        path = _eml(os.path.join(self.tmp, "m.eml"), "notifications@github.com", "Hi",
                    extra="X-Other: 1\r\n")
        doc = {"rule": WHY_DOC["rule"] + [{"name": "All", "subject": "/./", "label": "All"}]}
        rules = os.path.join(self.tmp, "more.json")
        with open(rules, "w") as handle:
            json.dump(doc, handle)
        code, out, err = run_cli("why", path, "--rules", rules, "--json")
        self.assertEqual((code, err), (0, ""))
        record = json.loads(out)
        self.assertEqual([(r["name"], r["matched"], r["reached"]) for r in record["rules"]],
                         [("Receipts", False, True), ("GitHub", True, True),
                          ("Shop", False, False), ("All", True, False)])
        self.assertEqual(record["outcome"]["rules"], ["GitHub"])
        self.assertEqual(record["message_id"], "<m1@example.com>")
        code, out, err = run_cli("why", path, "--rules", rules)
        self.assertIn("(not reached: an earlier rule decided)", out)

    def test_bad_arguments_are_usage_errors(self):
        self.assertEqual(run_cli("why", "--rules", self.rules())[0], 2)
        code, _out, err = run_cli("why", "--uid", "INBOX", "--rules", self.rules())
        self.assertEqual(code, 2)
        self.assertIn("FOLDER:UID", err)


class WhyServerTest(FakeServerTest):
    def cli(self, *argv: str) -> Tuple[int, str, str]:
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump(WHY_DOC, handle)
        return run_cli(*argv, "--rules", rules, "--user", USER, "--host", "127.0.0.1",
                       "--port", str(self.server.port), "--plaintext", "--retries", "0",
                       env={"GMAIL_APP_PASSWORD": PASSWORD})

    def test_message_id_with_or_without_brackets_read_only(self):
        raw = make_message("my receipt", "Shop <a@shop.example>")
        self.server.add_message(raw)
        self.server.add_message(make_message("other", "b@else.example"))
        message_id = re.search(rb"Message-ID: <([^>]+)>", raw).group(1).decode()
        for given in (message_id, f"<{message_id}>"):
            code, out, err = self.cli("why", given)
            self.assertEqual((code, err), (0, ""))
            self.assertTrue(out.startswith("INBOX UID 1: Shop <a@shop.example>  'my receipt'"),
                            out)
            self.assertIn("outcome: label Receipts, label Shop, archive", out)
        assert_read_only(self, self.server)
        self.assertEqual(self.server.messages("INBOX")[0].labels, {"\\Inbox"})
        self.assertEqual(self.server.messages("INBOX")[0].flags, set())

    def test_a_message_id_is_matched_whole(self):
        self.server.add_message(make_message("a", "x@shop.example", extra="Message-ID: <ab@x>\n")
                                .replace(b"Message-ID: <", b"X-Old-Id: <", 1))
        self.server.add_message(make_message("b", "y@shop.example").replace(
            b"Message-ID: <", b"X-Old-Id: <", 1).replace(b"\r\n\r\n", b"\r\nMessage-ID: <AB@X>\r\n\r\n", 1))
        code, out, err = self.cli("why", "ab@x", "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([json.loads(line)["uid"] for line in out.splitlines()], [1])

    def test_uid_and_not_found(self):
        self.server.add_message(make_message("hello", "notifications@github.com"))
        code, out, err = self.cli("why", "--uid", "INBOX:1", "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(out)["outcome"]["rules"], ["GitHub"])
        code, out, err = self.cli("why", "<nobody@example.com>")
        self.assertEqual(code, 2)
        self.assertIn("no message with Message-ID <nobody@example.com> in INBOX", err)
        assert_read_only(self, self.server)


class DiffTest(TempDirMixin, unittest.TestCase):
    def setUp(self):
        self.tmp = self.make_dir()

    OLD = {"rule": [{"name": "Receipts", "subject": "receipt", "label": "Receipts"},
                    {"name": "Shop", "from": "@shop.example", "label": "Shop", "archive": True}]}

    def write(self, name: str, doc: dict) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w") as handle:
            json.dump(doc, handle)
        return path

    def mails(self) -> List[str]:
        return [_eml(os.path.join(self.tmp, "1.eml"), "a@shop.example", "Your receipt", "<1@x>"),
                _eml(os.path.join(self.tmp, "2.eml"), "b@shop.example", "Sale", "<2@x>"),
                _eml(os.path.join(self.tmp, "3.eml"), "c@news.example", "News", "<3@x>")]

    def diff(self, new: dict, *extra: str) -> Tuple[int, str, str]:
        return run_cli("diff", self.write("old.json", self.OLD), self.write("new.json", new),
                       *self.mails(), *extra)

    def test_added_rule(self):
        new = {"rule": self.OLD["rule"] + [{"name": "News", "from": "@news.example",
                                            "label": "News"}]}
        code, out, err = self.diff(new, "--json")
        self.assertEqual((code, err), (0, ""))
        records = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([(r["message_id"], r["before"]["text"], r["after"]["text"])
                          for r in records[:-1]], [("<3@x>", "no action", "label News")])
        self.assertEqual(records[-1], {"type": "summary", "examined": 3, "changed": 1,
                                       "rules": {"News": {"before": 0, "after": 1}}})

    def test_removed_rule(self):
        code, out, err = self.diff({"rule": self.OLD["rule"][1:]})
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), [
            f"{self.tmp}/1.eml: a@shop.example  'Your receipt'",
            "    label Receipts -> label Shop, archive",
            "3 messages: 1 would be decided differently",
            "  Receipts: 1 -> 0 messages", "  Shop: 1 -> 2 messages"])

    def test_reordered_rules_and_same_decisions(self):
        code, out, _err = self.diff({"rule": self.OLD["rule"][::-1]})
        self.assertEqual(out.splitlines()[:2], [
            f"{self.tmp}/1.eml: a@shop.example  'Your receipt'",
            "    label Receipts -> label Shop, archive"])
        both = [dict(rule, **{"continue": True}) for rule in self.OLD["rule"]]
        code, out, _err = run_cli("diff", self.write("a.json", {"rule": both}),
                                  self.write("b.json", {"rule": both[::-1]}), *self.mails())
        self.assertEqual(out.splitlines(), ["3 messages: 0 would be decided differently"])


class DiffServerTest(FakeServerTest):
    server_options = {"kind": "move"}

    def test_diff_against_the_server_changes_nothing(self):
        self.server.add_message(make_message("receipt 1", "a@shop.example"))
        self.server.add_message(make_message("hello", "b@else.example"))
        paths = []
        for name, doc in (("old", DiffTest.OLD), ("new", {"rule": DiffTest.OLD["rule"][::-1]})):
            paths.append(os.path.join(self.tmp, f"{name}.json"))
            with open(paths[-1], "w") as handle:
                json.dump(doc, handle)
        code, out, err = run_cli("diff", *paths, "--json", "--user", USER, "--host",
                                 "127.0.0.1", "--port", str(self.server.port), "--plaintext",
                                 env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual((code, err), (0, ""))
        records = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([(r["uid"], r["before"]["rules"], r["after"]["rules"])
                          for r in records[:-1]], [(1, ["Receipts"], ["Shop"])])
        self.assertEqual(records[-1]["examined"], 2)
        assert_read_only(self, self.server)
        self.assertEqual([m.folder for m in self.server.messages("INBOX")], ["INBOX", "INBOX"])

    def test_a_folder_renumbered_between_the_two_dry_runs_is_not_compared(self):
        self.server.add_message(make_message("receipt 1", "a@shop.example"))
        old, new = parse_rules(DiffTest.OLD), parse_rules({"rule": DiffTest.OLD["rule"][::-1]})
        real, runs = gc.classify_folder, []

        def renumber_after_the_first(*args: Any, **kwargs: Any) -> gc.FolderReport:
            report = real(*args, **kwargs)
            if not runs:
                self.server.bump_uidvalidity("INBOX")
            runs.append(report)
            return report
        with mock.patch.object(gc, "classify_folder", renumber_after_the_first), \
                self.assertRaisesRegex(gc.UidValidityError, "UIDVALIDITY of INBOX changed"):
            gc.diff_folders(self.connect(), old, new)
        self.assertEqual(len(runs), 2)


import email.header as _email_header


class FiledMailGenerator:
    """A person's mail, filed by known rules, as honest as real mail is (issue 18).

    Kinds of mail (senders, lists, receipts, notifications; subjects in several languages,
    some RFC 2047 encoded) each filed under a label by a rule the generator knows; a fifth
    of the labels have no distinctive header (the person files by reading); about 10 % of
    the mail is filed inconsistently (senders whose mail lands under either of two labels
    or stays in the inbox, and plain slips); one sender moves to another label partway
    through.  ``messages(n)`` returns (raw bytes, labels, archived, starred, date, due),
    oldest first, where ``due`` is the label the person's own rule gives the message (None
    for mail filed by reading or inconsistently: no header rule can be right about it);
    the same seed gives the same mail.
    """

    WORDS = {"en": "update report weekly summary meeting notes plan draft invoice photos "
                   "question idea holiday dinner project budget review".split(),
             "de": "Bericht Woche Zusammenfassung Treffen Notizen Plan Entwurf Fotos Frage "
                   "Idee Urlaub Abendessen Projekt".split(),
             "fr": "rapport semaine résumé réunion notes plan brouillon photos question idée "
                   "vacances dîner projet".split(),
             "es": "informe semana resumen reunión notas plan borrador fotos pregunta idea "
                   "vacaciones cena proyecto".split()}
    # label: (senders, subject templates, list id, plus address, archived, starred)
    KINDS = {
        "Receipts": (["receipts@shop-one.example", "orders@bookstore.example",
                      "no-reply@apps-store.example"],
                     ["Your receipt for order {n}", "Ihre Bestellung {n}: Rechnung",
                      "Votre reçu n°{n}", "Recibo de su pedido {n}"], "", "", True, False),
        "Lists/python": (["{person}@python-users.example"], ["Re: [Python] {w} {w2}",
                          "[Python] {w} question"], "python-users.lists.example", "", True,
                         False),
        "Lists/rust": (["{person}@rust-lang.example"], ["[rust] {w} {w2}", "Re: [rust] {w}"],
                       "rust-users.lists.example", "", True, False),
        "GitHub": (["notifications@github.example"],
                   ["[acme/widget] Issue #{n}: {w} {w2}", "[acme/widget] PR #{n} merged"],
                   "widget.acme.github.example", "", False, False),
        "Bank": (["alerts@bank-one.example"], ["Kontoauszug {n}", "Your statement is ready",
                  "Überweisung ausgeführt"], "", "", False, True),
        "Travel": (["booking@airline.example", "stay@hotels.example"],
                   ["Booking confirmation {n}", "Confirmation de réservation {n}",
                    "Reserva confirmada {n}"], "", "", True, False),
        "Family": (["{person}@family-mail.example"], ["{w} {w2}", "Fotos vom {w}", "{w}の写真"], "",
                   "me+family@home.example", False, False),
        "Newsletters": (["news@daily-paper.example", "digest@tech-weekly.example"],
                        ["Today's digest: {w}", "This week in tech: {w} {w2}"], "", "", True,
                        False),
    }
    # Labels the person files by content: the senders and subjects are those of the
    # unfiled personal mail, so no header tells them apart.
    BY_CONTENT = ("ToRead", "Important")
    PEOPLE = "anna ben carla dmitri emma farid grace hugo ines jonas kim lena".split()

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def _subject(self, template: str) -> str:
        rng = self.rng
        words = self.WORDS[rng.choice(sorted(self.WORDS))]
        return template.format(n=rng.randint(1000, 99999), w=rng.choice(words),
                               w2=rng.choice(words), person=rng.choice(self.PEOPLE).title())

    def _raw(self, number: int, sender: str, subject: str, when: _dtm.datetime,
             list_id: str = "", to: str = "me@home.example", unsubscribe: bool = False) -> bytes:
        rng = self.rng
        name = sender.split("@")[0].replace(".", " ").title()
        encoded = (subject if subject.isascii() and rng.random() < 0.8
                   else _email_header.Header(subject, "utf-8").encode())
        lines = [f"From: {name} <{sender}>", f"To: {to}", f"Subject: {encoded}",
                 f"Date: {email.utils.format_datetime(when)}",
                 f"Message-ID: <m{number}.{rng.randint(0, 10 ** 9)}@gen.example>"]
        if list_id:
            lines.append(f"List-Id: Users <{list_id}>")
        if unsubscribe or list_id:
            lines.append(f"List-Unsubscribe: <mailto:leave-{number}@{sender.split('@')[1]}>")
        lines += ["Content-Type: text/plain; charset=utf-8", "", "Hello."]
        return "\r\n".join(lines).encode("utf-8")

    def messages(self, count: int) -> List[Tuple[bytes, set, bool, bool, _dtm.datetime, Optional[str]]]:
        rng = self.rng
        start = _dtm.datetime(2024, 1, 1, tzinfo=_dtm.timezone.utc)
        out = []
        labels = sorted(self.KINDS)
        for number in range(count):
            when = start + _dtm.timedelta(minutes=int(number * 525600 / count) + rng.randint(0, 30))
            late = number > count * 0.7
            roll = rng.random()
            if roll < 0.62:                                        # a kind the rules file
                label = rng.choice(labels)
                senders, subjects, list_id, plus, archived, starred = self.KINDS[label]
                sender = rng.choice(senders).format(person=rng.choice(self.PEOPLE))
                raw = self._raw(number, sender, self._subject(rng.choice(subjects)), when,
                                list_id, plus or "me@home.example",
                                unsubscribe=label == "Newsletters")
                filed = {label}
                if sender == "digest@tech-weekly.example" and late:
                    filed = {"Reading"}                            # moved to another label
                due = min(filed) if filed else None
                if rng.random() < 0.005:
                    filed = set()                                  # a slip: left in the inbox
                out.append((raw, filed, archived and bool(filed), starred, when, due))
            elif roll < 0.72:                                      # filed inconsistently
                sender = rng.choice(["deals@mixed-shop.example", "info@club.example",
                                     "hello@startup.example"])
                raw = self._raw(number, sender, self._subject("{w} {w2}"), when,
                                unsubscribe=True)
                filed = rng.choice([{"Receipts"}, {"Newsletters"}, set(), {"Travel"}])
                out.append((raw, filed, bool(filed), False, when, None))
            else:                                                  # personal mail
                sender = f"{rng.choice(self.PEOPLE)}@mail-{rng.randint(1, 40)}.example"
                raw = self._raw(number, sender, self._subject(rng.choice(
                    ["{w} {w2}", "Re: {w}", "{w}?"])), when)
                filed = {rng.choice(self.BY_CONTENT)} if rng.random() < 0.3 else set()
                out.append((raw, filed, False, rng.random() < 0.05, when, None))
        return out


def _dated(number: int, sender: str, subject: str, extra: str = "") -> Tuple[bytes, _dtm.datetime]:
    """A message of day ``number`` (2024 onwards), with its date."""
    when = _dtm.datetime(2024, 1, 1, tzinfo=_dtm.timezone.utc) + _dtm.timedelta(hours=number)
    raw = (f"From: {sender}\r\nTo: me@example.com\r\nSubject: {subject}\r\n"
           f"Date: {email.utils.format_datetime(when)}\r\nMessage-ID: <n{number}@test.example>\r\n"
           f"{extra}\r\nBody {number}.\r\n").encode("utf-8")
    return raw, when


def _corpus() -> List[Tuple[bytes, _dtm.datetime, str]]:
    """120 messages: 50 receipts from a shop, 40 of a mailing list, 30 from friends
    (left in the inbox), interleaved in time; (raw, date, kind)."""
    out = []
    for number in range(120):
        kind = ("receipt", "list", "friend")[number % 3] if number < 90 else \
            ("receipt", "list", "receipt")[number % 3]
        if kind == "receipt":
            raw, when = _dated(number, "Shop <orders@shop.example>", f"Your order {number}")
        elif kind == "list":
            raw, when = _dated(number, f"user{number % 7}@lists.example", f"Re: topic {number}",
                               "List-Id: Talk <talk.lists.example>\r\n")
        else:
            raw, when = _dated(number, f"friend{number % 5}@mail.example", "Dinner?")
        out.append((raw, when, kind))
    return out


class LearnServerTest(FakeServerTest):
    def argv(self, *extra: str) -> List[str]:
        return ["learn", "--user", USER, "--host", "127.0.0.1", "--port",
                str(self.server.port), "--plaintext", "--retries", "0", *extra]

    def test_gmail_labels_become_rules_with_archive_and_tests(self):
        for raw, when, kind in _corpus():
            labels = {"receipt": ["Receipts"], "list": ["Lists/talk", "\\Important"],
                      "friend": ["\\Inbox"]}[kind]
            self.server.add_message(raw, labels=labels, date=when,
                                    flags=["\\Flagged"] if kind == "list" else [])
        target = os.path.join(self.tmp, "learned.toml")
        code, out, err = run_cli(*self.argv("-o", target), env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "")
        self.assertEqual(os.stat(target).st_mode & 0o777, 0o600)
        rules = gc.load_rules(target)
        self.assertEqual([(r.name, r.actions.labels, r.actions.archive, r.actions.star,
                           r.continue_) for r in rules.rules],
                         [("Receipts", ("Receipts",), True, False, True),
                          ("Lists/talk", ("Lists/talk",), True, True, True)])
        self.assertEqual(gc.run_rule_tests(rules), [])
        self.assertEqual(len(rules.tests), 2)
        with open(target, encoding="utf-8") as handle:
            text = handle.read()
        self.assertIn('# held out: 16 of 16 right (100.0%); finds 16 of 16 "Receipts"', text)
        self.assertIn('list_id = "talk.lists.example"', text)
        self.assertNotIn("friend", text)
        self.assertIn("learn: Receipts: finds 16 of 16 held-out messages (100%), 0 false "
                      "positive(s)", err)
        self.assertIn("next: python gmail_classify.py diff", err)
        assert_read_only(self, self.server)
        code, _out, err = run_cli(*self.argv("-o", target), env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 2)
        self.assertIn("already exists; pass --force", err)

    def test_what_learn_downloads_counts_against_the_daily_budget(self):
        for raw, when, kind in _corpus():
            self.server.add_message(raw, labels=["Receipts"] if kind == "receipt" else [],
                                    date=when)
        env = {"GMAIL_APP_PASSWORD": PASSWORD, "XDG_STATE_HOME": self.tmp}
        code, _out, err = run_cli(*self.argv("-q"), env=env)
        self.assertEqual(code, 0, err)
        store = gc.StateStore(Path(self.tmp) / "gmail_classify")
        store.load()
        account = gc.account_key(USER, "127.0.0.1", self.server.port)
        self.assertGreater(store.downloaded(account), 10_000)   # every header block counted
        store.add_download(account, gc.DEFAULT_DAILY_BUDGET)
        store.save()
        start = len(self.server.log)
        code, _out, err = run_cli(*self.argv("-q"), env=env)
        self.assertEqual(code, gc.EXIT_INCOMPLETE, err)
        self.assertIn("past the daily budget", err)
        self.assertEqual(self.server.log[start:], [])              # refused before signing in
        code, _out, err = run_cli(*self.argv("-q", "--account", "work"), env=env)
        self.assertEqual(code, gc.EXIT_USAGE, err)                 # --account is not ignored
        self.assertIn("--account needs [[account]] tables", err)

    def test_a_stop_keeps_its_exit_code_when_saving_the_count_then_fails(self):
        env = {"GMAIL_APP_PASSWORD": PASSWORD, "XDG_STATE_HOME": self.tmp}
        stop = mock.patch.object(gc, "read_filed_mail",
                                 side_effect=gc.StopRequested("stopped", signal.SIGTERM))
        full = mock.patch.object(gc.StateStore, "save",
                                 side_effect=gc.StateError("cannot write state.json: disk full"))
        with stop, full:
            code, _out, err = run_cli(*self.argv("-q"), env=env)
        self.assertEqual(code, 128 + signal.SIGTERM, err)
        self.assertIn("disk full (while stopping", err)
        with full:                                  # with nothing else wrong, it is the error
            code, _out, err = run_cli(*self.argv("-q"), env=env)
        self.assertEqual(code, gc.EXIT_USAGE, err)
        self.assertIn("disk full", err)

    def test_folders_off_gmail_move_or_label(self):
        self.server = FakeGmail(kind="move").start()
        self.addCleanup(self.server.stop)
        for raw, when, kind in _corpus():
            if kind == "receipt":
                self.server.add_message(raw, folder="Receipts", date=when)
            elif kind == "list":
                self.server.add_message(raw, folder="Talk", date=when)
                self.server.add_message(raw, folder="INBOX", date=when)   # a copy: a label
            else:
                self.server.add_message(raw, folder="INBOX", date=when)
        self.server.add_message(make_message("spam", "x@junk.example"), folder="Junk")
        self.server.add_message(make_message("old", "x@trash.example"), folder="Trash")
        code, out, err = run_cli(*self.argv(), env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 0, err)
        doc = gc.parse_toml(out)
        self.assertEqual([{k: v for k, v in rule.items() if k in ("name", "move", "label",
                                                                 "continue")}
                          for rule in doc["rule"]],
                         [{"name": "Talk", "label": "Talk", "continue": True},
                          {"name": "Receipts", "move": "Receipts"}])
        self.assertIn("# Trash holds 1 message(s); learn never writes a trash rule", out)
        self.assertNotIn("trash =", out)
        assert_read_only(self, self.server)


class LearnOfflineTest(TempDirMixin, unittest.TestCase):
    def setUp(self):
        self.tmp = self.make_dir()

    def learn(self, path: str) -> gc.LearnedRules:
        return gc.learn_rules(gc.read_filed_path(path), now=NOW)

    def test_maildir_tree_folders_are_labels(self):
        root = os.path.join(self.tmp, "Mail")
        for raw, _when, kind in _corpus():
            folder = {"receipt": ".Shopping.Receipts", "list": ".Talk", "friend": ""}[kind]
            where = os.path.join(root, folder, "cur")
            os.makedirs(where, exist_ok=True)
            name = re.search(rb"<(n\d+)@", raw).group(1).decode()
            with open(os.path.join(where, f"{name}:2,S"), "wb") as handle:
                handle.write(raw)
        os.makedirs(os.path.join(root, ".Trash", "cur"))
        filed = gc.read_filed_path(root)
        self.assertEqual(len(filed.messages), 120)
        self.assertEqual(sorted({l for m in filed.messages for l in m.labels}),
                         ["Shopping/Receipts", "Talk"])
        learned = self.learn(root)
        # One condition each: nothing that finds no more mail is added to a rule.
        self.assertEqual(learned.doc["rule"], [
            {"name": "Shopping/Receipts", "from": "orders@shop.example",
             "move": "Shopping/Receipts"},
            {"name": "Talk", "list_id": "talk.lists.example", "move": "Talk"}])

    def test_mbox_per_label_and_takeout(self):
        folder = os.path.join(self.tmp, "export")
        os.makedirs(folder)
        takeout = os.path.join(self.tmp, "All mail Including Spam and Trash.mbox")
        with open(takeout, "wb") as everything:
            for raw, _when, kind in _corpus():
                name = {"receipt": "Receipts", "list": "Talk", "friend": "INBOX"}[kind]
                with open(os.path.join(folder, f"{name}.mbox"), "ab") as handle:
                    handle.write(b"From x@y Mon Mar  4 10:00:00 2024\r\n" + raw + b"\r\n")
                labels = {"receipt": "Archived,Receipts,Opened,Category Purchases",
                          "list": '"Talk, the list",Inbox,Unread', "friend": "Inbox,Important"}[kind]
                everything.write(b"From x@y Mon Mar  4 10:00:00 2024\r\nX-Gmail-Labels: "
                                 + labels.encode() + b"\r\n" + raw + b"\r\n")
            everything.write(b"From x@y Mon Mar  4 10:00:00 2024\r\nX-Gmail-Labels: Trash,"
                             b"Receipts\r\n" + _dated(999, "a@b.example", "x")[0] + b"\r\n")
            everything.write(b"From x@y Mon Mar  4 10:00:00 2024\r\nX-Gmail-Labels: Spam,"
                             b"Talk\r\n" + _dated(998, "a@b.example", "x")[0] + b"\r\n")
        self.assertEqual([r["name"] for r in self.learn(folder).doc["rule"]],
                         ["Receipts", "Talk"])
        filed = gc.read_filed_path(takeout)
        self.assertTrue(filed.gmail)
        self.assertEqual((filed.trash_count, len(filed.messages)), (1, 120))
        self.assertEqual(sorted({l for m in filed.messages for l in m.labels}),
                         ["Receipts", "Talk, the list"])
        rules = self.learn(takeout).doc["rule"]
        self.assertEqual([(r["name"], r.get("archive", False)) for r in rules],
                         [("Receipts", True), ("Talk, the list", False)])

    def test_tests_hide_local_parts_and_subjects_unless_kept(self):
        root = os.path.join(self.tmp, "Mail")
        for raw, _when, kind in _corpus():
            folder = {"receipt": ".Receipts", "list": ".Talk", "friend": ""}[kind]
            os.makedirs(os.path.join(root, folder, "cur"), exist_ok=True)
            name = re.search(rb"<(n\d+)@", raw).group(1).decode()
            with open(os.path.join(root, folder, "cur", name), "wb") as handle:
                handle.write(raw)
        filed = gc.read_filed_path(root)
        hidden = {t["name"]: t for t in gc.learn_rules(filed, now=NOW).doc["test"]}
        kept = {t["name"]: t for t in gc.learn_rules(filed, now=NOW,
                                                     keep_examples=True).doc["test"]}
        self.assertEqual(hidden["Talk: a held-out example"],
                         {"name": "Talk: a held-out example", "from": "someone@lists.example",
                          "subject": "(subject)", "list_id": "<talk.lists.example>",
                          "expect_rules": ["Talk"]})
        self.assertEqual(hidden["Receipts: a held-out example"]["from"], "orders@shop.example")
        self.assertRegex(kept["Talk: a held-out example"]["from"], r"^user\d@lists\.example$")
        self.assertRegex(kept["Talk: a held-out example"]["subject"], r"^Re: topic \d+$")

    def test_mbox_is_read_header_by_header_within_the_wire_cap(self):
        path = os.path.join(self.tmp, "Big.mbox")
        with open(path, "wb") as handle:
            handle.write(b"From x Mon Mar  4 10:00:00 2024\nSubject: one\nX-Long: "
                         + b"a" * 100 + b"\n\nFrom: in the body\n" + b"b" * 5000 + b"\n"
                         b"From x Mon Mar  4 10:00:00 2024\nSubject: two\n\nbody\n")
        with mock.patch.object(gc, "MAX_HEADER_LITERAL", 64):
            blocks = list(gc._stream_header_blocks(path))
        self.assertEqual(blocks, [b"Subject: one\r\n", b"Subject: two\r\n"])

    def test_holdout_by_share_or_by_age(self):
        messages = [gc.FiledMessage(f"<{n}@x>", when, MessageInfo(headers=parse_headers(raw)))
                    for n, (raw, when, _kind) in enumerate(_corpus())]
        self.assertEqual([gc._holdout_start(messages, text) for text in ("25%", "2d", "1w")],
                         [90, 72, 0])
        for bad in ("0%", "100%", "2x", ""):
            with self.subTest(bad=bad), self.assertRaises(gc.LearnError):
                gc._holdout_start(messages, bad)

    def test_not_a_source_is_a_usage_error(self):
        code, _out, err = run_cli("learn", "--from", os.path.join(self.tmp, "none"))
        self.assertEqual(code, 2)
        self.assertIn("no such file or directory", err)
        code, _out, err = run_cli("learn", "--from", self.tmp, "--holdout", "0%")
        self.assertEqual(code, 2)


class LearnQualityTest(FakeServerTest):
    """Learn from one generated mailbox on the fake server, judge on another (issue 18's
    bar): right for at least 97 % of what the rules file, at least 85 % found of what the
    person files consistently; labels filed by content reported, never guessed."""

    def test_learned_rules_on_a_mailbox_never_seen(self):
        for raw, labels, archived, starred, when, _due in FiledMailGenerator(1).messages(2500):
            self.server.add_message(raw, labels=set(labels) | (set() if archived else {"\\Inbox"}),
                                    flags=["\\Flagged"] if starred else [], date=when)
        learned = gc.learn_rules(gc.read_filed_mail(self.connect()), now=NOW)
        assert_read_only(self, self.server)
        rules = parse_rules(gc.parse_toml(gc.format_rules(learned.doc)), "learned.toml")
        self.assertEqual(gc.run_rule_tests(rules, now=NOW), [])
        for label in FiledMailGenerator.BY_CONTENT:
            self.assertNotIn(label, learned.learned)
            self.assertIn("no distinctive header", learned.unlearnable[label])
        right = wrong = missed = 0
        for raw, labels, _archived, _starred, _when, due in FiledMailGenerator(2).messages(1500):
            chosen = set(rules.classify(MessageInfo(headers=parse_headers(raw)), final=True,
                                        now=NOW).actions.labels)
            right += len(chosen & labels)
            wrong += len(chosen - labels)
            missed += due is not None and due not in chosen
        self.assertGreaterEqual(right / (right + wrong), 0.97)
        self.assertGreaterEqual(right / (right + missed), 0.85)


# --- Command line ------------------------------------------------------------------------


class OfflineCommandLineTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def test_check_summarises_valid_rules(self):
        path = self.write("rules.json", json.dumps({"rule": [
            {"name": "Receipts", "subject": "receipt", "label": "Receipts", "archive": True}]}))
        code, out, err = run_cli("check", path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("rules.json: 1 rule, valid", out)
        self.assertIn("1. Receipts: label Receipts, archive", out)

    def test_bad_rules_give_one_line_and_exit_2(self):
        table = [
            ("typo.json", json.dumps({"rule": [{"name": "N", "subject": "x", "lable": "L"}]}),
             "rule 1 (\"N\")", "'lable'"),
            ("regex.json", json.dumps({"rule": [{"name": "R", "subject": "/a(b/", "star": True}]}),
             "bad regex", "subject"),
            ("syntax.json", '{"rule": [', "line 1, column", "JSON"),
            ("unit.json", json.dumps({"rule": [{"name": "U", "larger_than": "5 TB", "trash": True}]}),
             "larger_than", "5M"),
            ("rules.yaml", "rule: []", "rules.yaml", "*.toml or *.json"),
        ]
        for name, text, *expected in table:
            with self.subTest(name=name):
                path = self.write(name, text)
                for argv in (["check", path], ["run", "--rules", path, "--user", "u"]):
                    code, out, err = run_cli(*argv)
                    self.assertEqual(code, gc.EXIT_USAGE, err)
                    self.assertEqual(len(err.strip().splitlines()), 1, err)
                    self.assertNotIn("Traceback", err)
                    for piece in expected:
                        self.assertIn(piece, err)

    def test_usage_errors_exit_2_without_traceback(self):
        table = [
            (["run", "--limit", "0"], "positive"),
            (["run", "--since", "last week"], "YYYY-MM-DD"),
            (["run", "--user", "u", "--host", "imap.example.com", "--plaintext"], "loopback"),
            (["run"], "--user"),
            (["run", "--user", "u"], "GMAIL_APP_PASSWORD"),
            (["--frobnicate"], "unrecognized arguments"),
        ]
        for argv, expected in table:
            with self.subTest(argv=argv):
                code, out, err = run_cli(*argv, env={"XDG_CONFIG_HOME": self.tmp})
                self.assertEqual(code, gc.EXIT_USAGE, err)
                self.assertIn(expected, err)
                self.assertNotIn("Traceback", err)

    def test_version_and_help(self):
        code, out, _ = run_cli("--version")
        self.assertEqual(code, 0)
        self.assertIn(gc.__version__, out)
        code, out, _ = run_cli("run", "--help")
        self.assertEqual(code, 0)
        self.assertIn("exit codes", out)

    def test_init_writes_starter_rules_and_refuses_to_overwrite(self):
        path = os.path.join(self.tmp, "conf", "rules.json")
        code, out, err = run_cli("init", path)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(gc.load_rules(path).rules, gc.builtin_rules().rules)
        code, out, err = run_cli("init", path)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("--force", err)
        code, _, _ = run_cli("init", "--force", path)
        self.assertEqual(code, 0)

    def test_init_default_path_is_under_xdg_config_home(self):
        code, out, err = run_cli("init", env={"XDG_CONFIG_HOME": self.tmp})
        self.assertEqual(code, 0, err)
        expected = os.path.join(self.tmp, "gmail_classify", "rules.toml")
        with open(expected, encoding="utf-8") as fh:
            self.assertEqual(fh.read(), STARTER_RULES_TOML)
        with mock.patch.dict(os.environ, {"XDG_CONFIG_HOME": self.tmp}):
            self.assertEqual(gc.find_rules(None).source, expected)

    def test_test_command_classifies_an_mbox(self):
        rules = self.write("rules.json", json.dumps({"rule": [
            {"name": "Receipts", "subject": ["receipt", "/order #?\\d{5,}/i"], "label": "Receipts"},
            {"name": "Lists", "header": {"List-Id": True}, "label": "Lists"}]}))
        box = mailbox.mbox(os.path.join(self.tmp, "Takeout.mbox"))
        for subject, extra in [("=?UTF-8?B?WW91ciByZWNlaXB0?=", ""),   # "Your receipt"
                               ("Order #123456 shipped", ""),
                               ("Weekly digest", "List-Id: <news.example.com>\n"),
                               ("Lunch?", "")]:
            box.add(f"From: a@example.com\nSubject: {subject}\n{extra}\nbody\n")
        box.flush()
        box.close()
        code, out, err = run_cli("test", rules, os.path.join(self.tmp, "Takeout.mbox"))
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Takeout.mbox#1: Receipts: subject contains \"receipt\"", out)
        self.assertIn("Takeout.mbox#2: Receipts:", out)
        self.assertIn("Takeout.mbox#3: Lists:", out)
        self.assertIn("Takeout.mbox#4: no rule", out)
        self.assertIn("4 messages; Receipts: 2, Lists: 1", out)

    def test_test_command_on_a_file_that_is_not_mail_is_a_usage_error(self):
        rules = self.write("rules.json", json.dumps({"rule": [{"subject": "x", "star": True}]}))
        code, out, err = run_cli("test", rules, self.write("notes.txt", "hello\n"))
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("not an .eml file, mbox or Maildir", err)
        self.assertEqual(len(err.strip().splitlines()), 1)


class CommandLineDescriptionTest(unittest.TestCase):
    """The command line from one description (_COMMANDS), one output object, exit codes."""

    def test_the_subcommands_and_options_with_values_come_from_the_parser(self):
        parser = gc.build_parser()
        commands = next(a for a in parser._actions if isinstance(a, gc.argparse._SubParsersAction))
        self.assertEqual(list(commands.choices), list(gc._COMMANDS))
        flags = {flag: action.nargs != 0 for child in commands.choices.values()
                 for action in child._actions for flag in action.option_strings}
        self.assertEqual(gc._options_with_values(parser), {f for f, v in flags.items() if v})
        for flag, takes_value in sorted(flags.items()):
            if flag in ("-h", "--help", "--version"):
                continue
            with self.subTest(flag=flag):       # a value that looks like a subcommand is a value
                expected = ["run", flag, "labels"] if takes_value else ["labels", flag]
                self.assertEqual(gc._subcommand_first([flag, "labels"], parser), expected)
        self.assertEqual(gc._subcommand_first(["--user", "u", "history", "--json"], parser),
                         ["history", "--user", "u", "--json"])
        self.assertEqual(gc._subcommand_first(["--help"], parser), ["--help"])
        self.assertEqual(gc._subcommand_first(["history", "--help"], parser),
                         ["history", "--help"])

    def test_a_new_subcommand_is_a_function_and_a_row_and_a_new_format_a_class(self):
        def hello(args: Any, out: Any) -> int:
            out.record({"hello": args.name}, lambda: [f"hello {args.name}"])
            return 3 if args.apply else 0

        class Tabs(gc._Output):                 # a new output format is one class
            data, text = True, False

            def record(self, record: Any, text: Any = None) -> None:
                self.write("\t".join(map(str, record.values())) + "\n")

        row = gc._Command(hello, "say hello", options=(
            gc._Opt("--name", default="you"), gc._Opt("--apply"), gc._Opt("--json"),
            gc._Opt("--tabs", action="store_true")))
        with mock.patch.dict(gc._COMMANDS, {"hello": row}), \
                mock.patch.dict(gc._OUTPUT_FORMATS, {"tabs": Tabs}):
            self.assertEqual(run_cli("--name", "hello", "hello"), (0, "hello hello\n", ""))
            self.assertEqual(run_cli("hello", "--json", "--apply"), (3, '{"hello": "you"}\n', ""))
            self.assertEqual(run_cli("hello", "--tabs", "--name", "x"), (0, "x\n", ""))
            code, out, _ = run_cli("--help")
            self.assertRegex(out, r"\n +hello +say hello\n")
            code, out, _ = run_cli("hello", "--help")
            self.assertIn("make the changes (default: only show them)", out)
        self.assertEqual(run_cli("hello")[0], gc.EXIT_USAGE)      # the row is the subcommand

    def test_suggest_refuses_a_folder_name_with_control_characters(self):
        code, out, err = run_cli("suggest", "--folder", "In\x1b[2Jbox", "--user", "u@example.com",
                                 "--host", "127.0.0.1", "--port", "9", "--plaintext")
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("is not a folder name", err)
        self.assertIn("In\\x1b[2Jbox", err)
        self.assertNotIn("\x1b", err)
        self.assertEqual(err.strip().splitlines()[-1], "gmail_classify.py suggest: error: "
                         "argument --folder: 'In\\x1b[2Jbox' is not a folder name: it is "
                         "empty or holds control characters")

    def test_auth_port_is_checked_by_the_parser_and_0_means_any(self):
        parser = gc.build_parser()
        self.assertEqual(parser.parse_args(["auth"]).port, 0)
        self.assertEqual(parser.parse_args(["auth", "--port", "0"]).port, 0)
        self.assertEqual(parser.parse_args(["auth", "--port", "8765"]).port, 8765)
        for bad in ("70000", "-1", "x"):
            with self.subTest(port=bad):
                code, out, err = run_cli("auth", "--port", bad, "--user", "u@example.com")
                self.assertEqual(code, gc.EXIT_USAGE)
                self.assertIn(f"expected a port from 1 to 65535, got '{bad}'", err)

    def test_every_error_class_carries_its_exit_code(self):
        table = [(gc.GmailClassifyError("x"), 1), (gc.ImapError("x"), 5),
                 (gc.ProtocolError("x"), 5), (gc.CapabilityError("x"), 5),
                 (gc.FolderUnavailableError("x"), 5), (gc.AuthenticationError("x"), 3),
                 (gc.OAuthError("x"), 3), (gc.UidValidityError("x"), 6), (gc.TLSError("x"), 4),
                 (gc.ConnectionLostError("x"), 4), (gc.RulesError("x"), 2),
                 (gc.CredentialError("x"), 2), (gc.UsageError("x"), 2),
                 (gc.FolderLimitError("x"), 2), (gc.StateError("x"), 2),
                 (gc.LockedError("x"), 7), (gc.RunStopped("x"), 6),
                 (gc.BudgetExceededError("x"), 6), (gc.ContentSkip("x"), 1),
                 (gc.TOMLError("x", 1, 1), 1)]
        for error, code in table:
            with self.subTest(error=type(error).__name__):
                self.assertEqual(error.exit_code, code)

    def test_the_output_object_writes_each_format_and_knows_who_reads_it(self):
        evil = {"subject": "\u202e\x9b"}
        for fmt, quiet, human, written in [
                ("text", False, True, "line \\u202e\n"), ("text", True, False, "line \\u202e\n"),
                ("json", False, False, '{"subject": "\\u202e\\u009b"}\n'),
                ("json", True, False, '{"subject": "\\u202e\\u009b"}\n')]:
            with self.subTest(fmt=fmt, quiet=quiet):
                stream = io.StringIO()
                out = gc._OUTPUT_FORMATS[fmt](stream, False, quiet=quiet)
                self.assertEqual((out.human, out.data, out.width), (human, fmt == "json", None))
                out.record(evil)
                out.record(evil, lambda: ["line \u202e"])
                self.assertEqual(stream.getvalue(), ("" if fmt == "text" else written) + written)

    def test_the_output_follows_the_arguments(self):
        parser = gc.build_parser()
        table = [(["run"], gc._Output, False, False), (["run", "--json"], gc._JsonOutput, False, True),
                 (["run", "--apply"], gc._Output, True, False),
                 (["undo", "--apply", "--json"], gc._JsonOutput, True, True),
                 (["history", "--json"], gc._JsonOutput, False, True),
                 (["init"], gc._Output, True, False), (["auth"], gc._Output, False, True),
                 (["import-filters", "f.xml"], gc._Output, False, True),
                 (["import-filters", "f.xml", "-o", "r.toml"], gc._Output, False, False),
                 (["suggest"], gc._Output, False, True), (["labels"], gc._Output, False, False)]
        for argv, kind, keep_going, data in table:
            with self.subTest(argv=argv):
                args = parser.parse_args(argv)
                args.quiet = False
                out = gc._open_output(args, io.StringIO())
                self.assertIs(type(out), kind)
                self.assertEqual((out.keep_going, out.data, out.human), (keep_going, data, not data or kind is gc._Output))


class SmallConveniencesTest(unittest.TestCase):
    def test_sizes_accept_the_ways_people_write_them(self):
        table = [("5M", 5 * 1024 ** 2), ("5MB", 5 * 1024 ** 2), ("5 MB", 5 * 1024 ** 2),
                 ("5mb", 5 * 1024 ** 2), ("5MiB", 5 * 1024 ** 2), ("500K", 500 * 1024),
                 ("500 kB", 500 * 1024), ("1G", 1024 ** 3), ("1 GB", 1024 ** 3),
                 ("700", 700), ("700B", 700), (700, 700)]
        for text, size in table:
            with self.subTest(text):
                rule = parse_rules({"rule": [{"larger_than": text, "star": True}]}).rules[0]
                self.assertEqual(rule.condition.limit, size)
        for text in ("5  MB", "5 TB", "MB", "5.5M", "-5M"):
            with self.subTest(text):
                with self.assertRaises(RulesError):
                    parse_rules({"rule": [{"larger_than": text, "star": True}]})

    def test_daily_budget_reads_sizes_with_the_rules_units(self):
        for text, size in [("5M", 5 * 1024 ** 2), ("5 mb", 5 * 1024 ** 2), ("500K", 500 * 1024),
                           ("500 KiB", 500 * 1024), ("2G", 2 * 1024 ** 3), (" 1gb ", 1024 ** 3),
                           ("700", 700), ("700B", 700), ("0", 0)]:
            with self.subTest(text):
                self.assertEqual(gc._budget(text), size)
        for text in ("5  MB", "5 TB", "MB", "5.5M", "-5M", ""):
            with self.subTest(text):
                with self.assertRaises(gc.argparse.ArgumentTypeError) as caught:
                    gc._budget(text)
                self.assertEqual(str(caught.exception), "expected a size such as 2G, 500M or 0 "
                                                         f"(no budget), got {text!r}")

    def test_sizes_are_written_in_one_form_everywhere(self):
        table = [(0, "0 bytes"), (1023, "1023 bytes"), (1024, "1.0 KB"), (1536, "1.5 KB"),
                 (1024 ** 2 - 1, "1024.0 KB"), (5 * 1024 ** 2, "5.0 MB"),
                 (1024 ** 3, "1.0 GB"), (3 * 1024 ** 4, "3072.0 GB"), (1000.4, "1000 bytes"),
                 (2.5 * 1024 ** 2, "2.5 MB")]
        for size, text in table:
            with self.subTest(size):
                self.assertEqual(gc._human_size(size), text)
        message = info(size=3 * 1024 ** 2)
        rule = parse_rules({"rule": [{"larger_than": "2M", "star": True}]}).rules[0]
        self.assertEqual(rule.condition.explain(message, datetime.now(timezone.utc)),
                         (True, "size: 3.0 MB > 2M"))

    def test_timestamps_are_utc_with_the_ending_each_file_has(self):
        moment = datetime(2026, 12, 1, 18, 5, 1, 999999, tzinfo=timezone(timedelta(hours=1)))
        self.assertEqual(gc._iso(moment), "2026-12-01T17:05:01Z")
        self.assertEqual(gc._iso(moment, "+00:00"), "2026-12-01T17:05:01+00:00")

    def test_since_accepts_ages_in_the_rules_units_and_dates(self):
        today = datetime.now(timezone.utc).astimezone().date()
        self.assertEqual(gc._parse_since("7d"), today - timedelta(days=7))
        self.assertEqual(gc._parse_since("2w"), today - timedelta(days=14))
        self.assertEqual(gc._parse_since("2024-01-31"), date(2024, 1, 31))
        back = gc._parse_since("1y")
        self.assertEqual((back.year, back.month), (today.year - 1, today.month))
        code, _, err = run_cli("run", "--since", "7 days")
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("7d, 2w, 6m or 1y", err)

    def test_top_level_help_shows_the_common_run_options(self):
        code, out, _ = run_cli("--help")
        self.assertEqual(code, 0)
        for text in ("run --help", "--apply", "--folder", "--since", "--rules", "demo",
                     "--summary"):
            self.assertIn(text, out)


class CommandLineRunTest(FakeServerTest):
    def argv(self, *extra: str) -> List[str]:
        return ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--retries", "0", *extra]

    def rules_file(self) -> str:
        path = os.path.join(self.tmp, "rules.json")
        with open(path, "w") as handle:
            json.dump(EXAMPLE_DOC, handle)
        return path

    def test_dry_run_prints_what_would_happen(self):
        self.server.add_message(make_message("receipt 42"))
        code, out, err = run_cli(*self.argv("--rules", self.rules_file()),
                                 env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual((code, err), (0, ""))
        self.assertIn("would label Receipts, archive", out)
        self.assertIn("Dry run", out)
        self.assertEqual(self.server.messages("INBOX")[0].labels, {"\\Inbox"})

    def test_apply_and_json(self):
        self.server.add_message(make_message("receipt 42"))
        code, out, err = run_cli(*self.argv("run", "--rules", self.rules_file(), "--apply",
                                            "--json"), env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual((code, err), (0, ""))
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(lines[0]["rules"], ["Receipts"])
        self.assertEqual(lines[0]["subject"], "receipt 42")
        self.assertEqual(lines[-1]["type"], "summary")
        self.assertEqual(self.server.uids("INBOX"), [])

    def test_password_from_command_and_netrc(self):
        script = os.path.join(self.tmp, "secret.sh")
        with open(script, "w") as handle:
            handle.write(f"#!/bin/sh\necho '{PASSWORD}'\n")
        os.chmod(script, 0o700)
        code, _, err = run_cli(*self.argv("--password-command", script))
        self.assertEqual((code, err), (0, ""))
        home = os.path.join(self.tmp, "home")
        os.mkdir(home)
        netrc_path = os.path.join(home, ".netrc")
        with open(netrc_path, "w") as handle:
            handle.write(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
        os.chmod(netrc_path, 0o644)
        code, _, err = run_cli(*self.argv(), env={"HOME": home})
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("chmod 600", err)
        os.chmod(netrc_path, 0o600)
        code, _, err = run_cli(*self.argv(), env={"HOME": home})
        self.assertEqual((code, err), (0, ""))

    def test_password_command_beats_the_environment(self):
        code, _, err = run_cli(*self.argv("--password-command", "false"),
                               env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("--password-command exited with status 1", err)
        self.assertNotIn("LOGIN", self.commands())

    def test_missing_folder_points_at_labels_and_the_others_still_run(self):
        self.server.add_message(make_message("receipt 42"))
        code, out, err = run_cli(*self.argv("--rules", self.rules_file(), "--folder", "Nope",
                                            "--folder", "INBOX", "--apply"),
                                 env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_INCOMPLETE)
        lines = err.strip().splitlines()
        self.assertIn("cannot open folder 'Nope'", lines[0])
        self.assertIn("'labels'", lines[0])
        self.assertIn("skipped that folder", lines[0])
        self.assertEqual(len(lines), 1)
        self.assertEqual(self.server.uids("INBOX"), [])          # INBOX still sorted
        self.assertEqual(len(self.server.uids("Receipts")), 1)

    def test_exit_codes_for_auth_and_connection_failures(self):
        code, out, err = run_cli(*self.argv(), env={"GMAIL_APP_PASSWORD": "wrong"})
        self.assertEqual(code, gc.EXIT_AUTH)
        self.assertIn("Invalid credentials", err)
        self.assertEqual(len(err.strip().splitlines()), 1)
        port = self.server.port
        self.server.stop()
        code, out, err = run_cli("--user", USER, "--host", "127.0.0.1", "--port", str(port),
                                 "--plaintext", "--retries", "0",
                                 env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_CONNECTION)
        self.assertIn("127.0.0.1", err)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertNotIn("Traceback", err)

    def test_labels_lists_folders_whatever_the_option_order(self):
        for argv in (["labels", *self.argv()], [*self.argv(), "folders"]):
            with self.subTest(argv=argv):
                code, out, err = run_cli(*argv, env={"GMAIL_APP_PASSWORD": PASSWORD})
                self.assertEqual((code, err), (0, ""))
                self.assertIn("[Gmail]/Trash  \\Trash", out)

    def test_xoauth2_token_from_environment(self):
        argv = self.argv("--auth", "xoauth2", "-q")
        code, out, err = run_cli(*argv, env={"GMAIL_OAUTH_TOKEN": TOKEN})
        self.assertEqual((code, err), (0, ""))
        code, out, err = run_cli(*argv, env={"GMAIL_OAUTH_TOKEN": "ya29.stale"})
        self.assertEqual(code, gc.EXIT_AUTH)
        self.assertIn("OAuth2 token", err)
        self.assertNotIn("ya29.stale", err)


class RunOutputTest(FakeServerTest):
    def argv(self, *extra: str) -> List[str]:
        return ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--retries", "0", *extra]

    def test_rules_in_force_one_total_and_singular_nouns(self):
        self.server.add_message(make_message("Your receipt"))
        self.server.add_message(make_message("old news"), labels=["Work"])
        code, out, err = run_cli(*self.argv("--folder", "INBOX", "--folder", "Work"),
                                 env={"GMAIL_APP_PASSWORD": PASSWORD, "XDG_CONFIG_HOME": self.tmp})
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines()[0], "Rules: built-in rules (5 rules, labels only); "
                                              "write your own with: python gmail_classify.py init")
        self.assertIn("INBOX: 1 message examined\n  rule      matched  to change\n"
                      "  Receipts        1          1\n", out)
        self.assertIn("Work: 1 message examined\n  no rule matched\n", out)
        self.assertIn("All 2 folders: 2 messages examined; would: label Receipts (1)\n", out)
        self.assertNotIn("Calendar", out)   # no table of zeros

    def test_apply_prints_a_line_per_message_and_summary_only_hides_them(self):
        self.server.add_message(make_message("Your receipt"))
        code, out, err = run_cli(*self.argv("--apply"), env={"GMAIL_APP_PASSWORD": PASSWORD,
                                                             "XDG_CONFIG_HOME": self.tmp})
        self.assertEqual((code, err), (0, ""))
        self.assertIn("INBOX 1: label Receipts  [Receipts]  Alice <alice@example.com>  "
                      "Your receipt\n", out)
        self.assertIn("  done: label Receipts (1)", out)
        self.server.add_message(make_message("Another receipt"))
        code, out, err = run_cli(*self.argv("--apply", "--summary"),
                                 env={"GMAIL_APP_PASSWORD": PASSWORD, "XDG_CONFIG_HOME": self.tmp})
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("INBOX 2:", out)
        self.assertIn("  done: label Receipts (1)", out)

    def test_minus_vv_shows_server_answers_without_secrets(self):
        self.server.add_fault("EXAMINE", action="no", text=f"[TRYCREATE] no {PASSWORD} here")
        code, _, err = run_cli(*self.argv("-vv"), env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_INCOMPLETE)     # the folder could not be opened: skipped
        answers = [line for line in err.splitlines() if line.startswith("DEBUG: S: ")]
        self.assertTrue(any(line.startswith("DEBUG: S: * CAPABILITY ") for line in answers), err)
        self.assertIn("[TRYCREATE] no <redacted> here", "\n".join(answers))
        self.assertNotIn(PASSWORD, "\n".join(line for line in err.splitlines()
                                            if line.startswith("DEBUG:")))


class NewcomerServerTest(FakeServerTest):
    def argv(self, *extra: str) -> List[str]:
        return ["--host", "127.0.0.1", "--port", str(self.server.port), "--plaintext",
                "--retries", "0", *extra]

    def test_imap_user_and_imap_password_work_beside_the_gmail_names(self):
        code, out, err = run_cli(*self.argv(), env={"IMAP_USER": USER, "IMAP_PASSWORD": PASSWORD})
        self.assertEqual((code, err), (0, ""))   # the only user and password given
        # The GMAIL_* names win when both are set.
        code, _, err = run_cli(*self.argv(), env={"GMAIL_USER": USER, "IMAP_USER": "other@x",
                                                  "GMAIL_APP_PASSWORD": PASSWORD,
                                                  "IMAP_PASSWORD": "wrong"})
        self.assertEqual((code, err), (0, ""))
        code, _, err = run_cli(*self.argv())
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("GMAIL_USER (or IMAP_USER)", err)

    def test_misspelt_folder_gets_a_did_you_mean(self):
        code, _, err = run_cli(*self.argv("--user", USER, "--folder", "[Gmail]/Tarsh"),
                               env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_INCOMPLETE)     # skipped; other folders would still run
        self.assertIn("cannot open folder '[Gmail]/Tarsh'", err)
        self.assertIn("did you mean '[Gmail]/Trash'?", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("skipped that folder", err)

    def test_a_bad_answer_to_select_still_names_the_folder(self):
        self.server.add_fault("EXAMINE", action="bad", text="Could not parse command")
        code, _, err = run_cli(*self.argv("--user", USER, "--folder", "INBOX"),
                               env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_INCOMPLETE)
        self.assertIn("cannot open folder 'INBOX': Could not parse command", err)

    def test_wrong_password_on_gmail_says_app_password_and_imap_setting(self):
        for extra in ((), ("--apply",)):   # --apply too: no "0 changes made" beside it
            with self.subTest(extra=extra):
                code, _, err = run_cli(*self.argv("--user", USER, *extra),
                                       env={"GMAIL_APP_PASSWORD": "wrong"})
                self.assertEqual(code, gc.EXIT_AUTH)
                self.assertIn("Invalid credentials", err)
                self.assertIn("app password", err)
                self.assertIn("IMAP must be on in Gmail's settings", err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_connection_retries_are_announced_with_a_count(self):
        self.server.add_fault("LOGIN", action="drop", count=2)
        with self.assertLogs("gmail_classify", "WARNING") as logs:
            conn = self.connect(retries=5)
        self.assertTrue(conn.connected)
        self.assertEqual(len(self.sleep.delays), 2)
        self.assertRegex(logs.output[0], r"retrying \(2/6\) in \d+\.\d s\.\.\.$")
        self.assertRegex(logs.output[1], r"retrying \(3/6\) in \d+\.\d s\.\.\.$")


class CommandLineStateTest(StateTestCase):
    def argv(self, *extra: str) -> List[str]:
        return ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--retries", "0", *extra]

    def cli(self, *argv: str) -> Tuple[int, str, str]:
        rules = os.path.join(self.tmp, "rules.json")
        if not os.path.exists(rules):
            with open(rules, "w") as handle:
                json.dump(SWEEP_DOC, handle)
        if argv and argv[0] in ("run", "undo"):
            argv = (argv[0], "--rules", rules) + tuple(argv[1:])
        return run_cli(*argv, env={"GMAIL_APP_PASSWORD": PASSWORD,
                                   "XDG_STATE_HOME": os.path.join(self.tmp, "xdg")})

    def state_dir_of_cli(self) -> str:
        return os.path.join(self.tmp, "xdg", "gmail_classify")

    def test_json_prints_only_records_on_stdout_summary_last(self):
        seed_mailbox(self.server, 6)
        code, out, err = self.cli("run", *self.argv("--apply", "--json", "-v"))
        self.assertEqual(code, 0, err)
        lines = [json.loads(line) for line in out.splitlines()]      # nothing else on stdout
        self.assertEqual([r["type"] for r in lines], ["message"] * 6 + ["summary"])
        self.assertTrue(all(r["applied"] for r in lines))
        summary = lines[-1]
        self.assertEqual(summary["status"], "complete")
        self.assertEqual(summary["changes_made"], sum(len(r["changes"]) for r in lines[:-1]))
        self.assertIn("signed in", err)                               # people read stderr
        with open(os.path.join(self.state_dir_of_cli(), "audit.jsonl")) as handle:
            audit = [json.loads(line) for line in handle]
        # Write-ahead: every change's intent came before the record of it being made.
        intents = [i for i, r in enumerate(audit) if r["type"] == "intent"]
        first_done = min(i for i, r in enumerate(audit) if r["type"] == "message")
        self.assertTrue(intents and max(intents) < first_done)
        # The server's confirmations (done records) are the audit log's, never stdout's.
        dones = [i for i, r in enumerate(audit) if r["type"] == "done"]
        self.assertTrue(dones and max(dones) < first_done)
        self.assertEqual([r for r in audit if r["type"] not in ("intent", "done")],
                         [r for r in lines if r["type"] == "summary" or r["changes"]])

    def test_apply_lines_at_v_come_after_the_server_confirmed(self):
        self.server.add_message(make_message("receipt 1"))
        positions = []
        original = gc._WriteFlight.land

        def spy(flight):
            original(flight)
            if any("-X-GM-LABELS" in w.args for w in flight.writes):
                positions.append("INBOX 1:" in sys.stdout.getvalue())

        with mock.patch.object(gc._WriteFlight, "land", spy):
            code, out, err = self.cli("run", *self.argv("--apply", "-v"))
        self.assertEqual(code, 0, err)
        line = "INBOX 1: label Receipts, archive  [Receipts]"
        self.assertIn(line, out)
        self.assertEqual(positions, [False])        # no line before the archive's OK
        self.assertIn("2 changes made.", out)

    def test_dry_run_shows_only_what_would_change(self):
        self.server.add_message(make_message("receipt old"), labels=("Receipts",))
        self.server.add_message(make_message("news", extra="List-Unsubscribe: <x>\n"),
                                flags=("\\Seen",))
        code, out, err = self.cli("run", *self.argv())
        self.assertEqual(code, 0, err)
        self.assertIn("INBOX 1: would label News  [News]", out)
        self.assertNotIn("would: mark read", out)
        self.assertIn("would: label News (1)", out)
        self.assertIn("already done: mark read (1)", out)   # decided, but no change

    def test_second_apply_while_one_holds_the_lock_exits_7(self):
        store = gc.StateStore(self.state_dir_of_cli())
        with store.lock(gc.account_key(USER, "127.0.0.1", self.server.port)):
            code, out, err = self.cli("run", *self.argv("--apply"))
            self.assertEqual(code, gc.EXIT_LOCKED)
            self.assertIn(f"pid {os.getpid()}", err)
            self.assertEqual(len(err.strip().splitlines()), 1)
            self.assertNotIn("LOGIN", self.commands())
            code, out, err = self.cli("run", *self.argv())          # a dry run never waits
            self.assertEqual(code, 0, err)
            code, out, err = self.cli("undo", *self.argv("--apply"))
            self.assertEqual(code, gc.EXIT_USAGE)                   # nothing to undo yet...
        code, out, err = self.cli("run", *self.argv("--apply"))
        self.assertEqual(code, 0, err)

    def test_corrupt_state_exits_2_and_all_starts_over(self):
        os.makedirs(self.state_dir_of_cli())
        path = os.path.join(self.state_dir_of_cli(), "state.json")
        with open(path, "w") as handle:
            handle.write("{oops")
        seed_mailbox(self.server, 3)
        code, out, err = self.cli("run", *self.argv("--apply"))
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn(path, err)
        self.assertIn("--all", err)
        self.assertNotIn("Traceback", err)
        self.assertNotIn("LOGIN", self.commands())
        code, out, err = self.cli("run", *self.argv("--apply", "--all"))
        self.assertEqual(code, 0, err)
        with open(path) as handle:
            self.assertEqual(json.load(handle)["version"], 1)

    def test_interrupted_apply_says_what_was_and_was_not_done(self):
        seed_mailbox(self.server, 12)
        with mock.patch.object(gc._WriteFlight, "move", side_effect=KeyboardInterrupt):
            code, out, err = self.cli("run", *self.argv("--apply", "--batch-size", "6"))
        self.assertEqual(code, gc.EXIT_INTERRUPTED)
        made = re.search(r"interrupted: (\d+) changes made, (\d+) not; run again to finish", err)
        self.assertIsNotNone(made, err)
        self.assertGreater(int(made.group(1)), 0)
        self.assertGreater(int(made.group(2)), 0)
        code, out, err = self.cli("run", *self.argv("--apply"))
        self.assertEqual(code, 0, err)
        code, out, err = self.cli("history")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn("[interrupted]", lines[1])                    # newest first
        self.assertNotIn("[interrupted]", lines[0])

    def test_lost_connection_mid_apply_reports_incomplete(self):
        seed_mailbox(self.server, 12)
        self.server.add_fault("UID MOVE", action="drop")
        code, out, err = self.cli("run", *self.argv("--apply"))
        self.assertEqual(code, gc.EXIT_CONNECTION)
        self.assertRegex(err, r"incomplete: \d+ changes made, \d+ not; run again to finish")

    def test_budget_exit_6_says_when_to_go_on(self):
        seed_mailbox(self.server, 12)
        code, out, err = self.cli("run", *self.argv("--apply", "--batch-size", "2",
                                                    "--daily-budget", "3K"))
        self.assertEqual(code, gc.EXIT_INCOMPLETE, err)
        self.assertIn("00:00 UTC", err)
        self.assertIn("--daily-budget", err)
        code, out, err = self.cli("run", *self.argv("--daily-budget", "lots"))
        self.assertEqual(code, gc.EXIT_USAGE)

    def test_exit_codes_of_the_state_layer(self):
        table = [(gc.StateError("x"), gc.EXIT_USAGE), (gc.LockedError("x"), gc.EXIT_LOCKED),
                 (gc.BudgetExceededError("x"), gc.EXIT_INCOMPLETE),
                 (gc.UidValidityError("x"), gc.EXIT_INCOMPLETE)]
        for error, code in table:
            with self.subTest(error=type(error).__name__):
                self.assertEqual(error.exit_code, code)

    def test_history_lists_runs_newest_first_with_counts(self):
        seed_mailbox(self.server, 6)
        self.assertEqual(self.cli("run", *self.argv("--apply"))[0], 0)
        self.server.add_message(make_message("receipt again"))
        self.assertEqual(self.cli("run", *self.argv("--apply"))[0], 0)
        self.assertEqual(self.cli("run", *self.argv("--apply"))[0], 0)    # nothing to do
        code, out, err = self.cli("history")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertRegex(lines[0], r"  INBOX  (archive 1, label Receipts 1|label Receipts 1, "
                                   r"archive 1)$")
        self.assertIn(f"{USER} on 127.0.0.1:{self.server.port}  INBOX", lines[1])
        self.assertIn("trash 1", lines[1])
        code, out, err = self.cli("history", "--json")
        runs = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(runs[0]["counts"], {"label Receipts": 1, "archive": 1})
        self.assertGreater(runs[0]["time"], "") 


class DeepFilesTest(StateTestCase):
    """Files we read nested or numbered beyond reason: exit 2 naming the file, or skipped
    (audit lines), never a RecursionError."""

    argv = CommandLineStateTest.argv
    cli = CommandLineStateTest.cli
    state_dir_of_cli = CommandLineStateTest.state_dir_of_cli

    def state_file(self, text: str) -> str:
        os.makedirs(self.state_dir_of_cli(), exist_ok=True)
        path = os.path.join(self.state_dir_of_cli(), "state.json")
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_a_deep_or_out_of_range_state_file_exits_2_naming_it(self):
        seed_mailbox(self.server, 2)
        key = gc.account_key(USER, "127.0.0.1", self.server.port)

        def state(mark: str, uidvalidity: str = "1") -> str:
            return ('{"format": "%s", "version": 1, "accounts": {"%s": {"folders": {"INBOX": '
                    '{"uidvalidity": %s, "mark": %s}}}}}' % (gc.STATE_FORMAT, key, uidvalidity, mark))
        cases = [("[" * 100000 + "]" * 100000, "nested more than 64 levels"),
                 (state("Infinity"), "Infinity is not a number"),
                 (state("NaN"), "NaN is not a number"),
                 (state("4294967296"), "mark 4294967296 is not a number from 0 to 4294967295"),
                 (state("-1"), "mark -1 is not a number"),
                 (state("1.5"), "mark 1.5 is not a number"),
                 (state("true"), "mark true is not a number"),
                 (state("3", "0"), "uidvalidity 0 is not a number from 1"),
                 (state("3", "9" * 5000), "more than 40 digits")]
        for text, message in cases:
            with self.subTest(message=message):
                path = self.state_file(text)
                code, out, err = self.cli("run", *self.argv("--apply"))
                self.assertEqual(code, gc.EXIT_USAGE, err)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn(path, err)
                self.assertIn(message, err)
                self.assertNotIn("UID FETCH", self.commands())
        self.state_file(state("4294967295"))
        self.assertEqual(self.cli("run", *self.argv("--apply"))[0], 0)

    def test_an_unreadable_audit_line_is_skipped_by_history_and_undo(self):
        seed_mailbox(self.server, 3)
        code, out, err = self.cli("run", *self.argv("--apply"))
        self.assertEqual(code, 0, err)
        path = os.path.join(self.state_dir_of_cli(), "audit.jsonl")
        with open(path, "a") as handle:
            handle.write("[" * 100000 + "]" * 100000 + "\n")
            handle.write('{"type": "run", "n": ' + "7" * 5000 + "}\n")
        code, out, err = self.cli("history")
        self.assertEqual(code, 0, err)
        self.assertNotIn("Traceback", err)
        code, out, err = self.cli("undo", *self.argv("--apply"))
        self.assertEqual(code, 0, err)
        self.assertNotIn("Traceback", err)


class WatchCommandLineTest(FakeServerTest):
    """`watch` as a user runs it: state, signals, rules reload, the lock, history."""

    def argv(self, *extra: str, command: str = "watch") -> List[str]:
        return [command, "--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--rules", self.rules_path, *extra]

    def setUp(self):
        super().setUp()
        patcher = mock.patch.object(gc, "IDLE_POLL", 0.02)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.rules_path = os.path.join(self.tmp, "rules.json")
        self.write_rules(EXAMPLE_DOC)
        self.env = {"GMAIL_APP_PASSWORD": PASSWORD, "XDG_STATE_HOME": os.path.join(self.tmp, "state"),
                    "XDG_CONFIG_HOME": os.path.join(self.tmp, "config")}

    def write_rules(self, doc: Any) -> None:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        temporary = self.rules_path + ".new"
        with open(temporary, "w") as handle:
            handle.write(text)
        os.replace(temporary, self.rules_path)      # a new inode: a change whatever the clock

    def subprocess_cli(self, *argv: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, **self.env)
        env.pop("GMAIL_OAUTH_TOKEN", None)
        return subprocess.run([sys.executable, self.script(), *argv], env=env,
                              capture_output=True, text=True, timeout=60)

    @staticmethod
    def script() -> str:
        return os.path.join(os.path.dirname(os.path.abspath(gc.__file__)), "gmail_classify.py")

    def watch_in_process(self, script: Callable[[], None], *extra: str) -> Tuple[int, str, str]:
        """Run `watch` in this (main) thread while ``script`` drives it from another thread,
        then SIGTERM ends it, as systemd would."""
        return while_driven(script, lambda: run_cli(*self.argv(*extra), env=self.env))

    def idling(self, count: int = 1) -> None:
        wait_until(lambda: self.server.count("IDLE") >= count, timeout=15, message="never idled")

    @unittest.skipUnless(hasattr(signal, "SIGTERM") and os.name == "posix", "POSIX signals")
    def test_sigterm_ends_a_running_watch_with_logout_and_exit_0(self):
        self.server.add_message(make_message("receipt 1"))
        env = dict(os.environ, **self.env)
        env.pop("GMAIL_OAUTH_TOKEN", None)
        process = subprocess.Popen([sys.executable, self.script(), *self.argv("--apply", "--all")],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.idling()
        self.assertEqual(self.server.uids("INBOX"), [])          # caught up before idling
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 0, err)
        self.assertEqual(err, b"")
        names = self.commands()
        self.assertEqual(names[-2:], ["UNSELECT", "LOGOUT"])
        self.assertIn(b"DONE", [line.strip() for line in self.server.raw_lines])

    def test_refuses_to_start_without_state_and_says_what_to_do(self):
        for extra in ([], ["--apply"]):
            with self.subTest(extra=extra):
                code, out, err = run_cli(*self.argv(*extra), env=self.env)
                self.assertEqual(code, gc.EXIT_USAGE, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                for hint in ("no state yet for INBOX", "run --apply", "--all", "--new-only"):
                    self.assertIn(hint, err)
        self.assertNotIn("SELECT", self.commands())

    def test_catches_up_from_the_mark_then_watches(self):
        self.server.add_message(make_message("receipt 1"))
        code, _, err = run_cli(*self.argv("--apply", command="run"), env=self.env)
        self.assertEqual(code, 0, err)
        self.server.add_message(make_message("hello, not for a rule"))   # UID 2, stays
        self.server.add_message(make_message("invoice 3"))               # arrived meanwhile
        searches = self.server.count("UID SEARCH")

        def script() -> None:
            self.idling()
            self.server.deliver(make_message("receipt 4"))
            wait_until(lambda: len(self.server.uids("INBOX")) == 1, timeout=15,
                       message="receipt 4 not classified")

        code, out, err = self.watch_in_process(script, "--apply")
        self.assertEqual(code, 0, err)
        self.assertEqual([m.raw.split(b"Subject: ")[1].split(b"\r")[0]
                          for m in self.server.messages("INBOX")], [b"hello, not for a rule"])
        first_search = [e.line for e in self.server.log if e.command == "UID SEARCH"][searches]
        self.assertIn(b"UID 2:*", first_search)                     # from the mark, not ALL

    def test_new_only_leaves_old_mail_and_takes_new_mail(self):
        self.server.add_message(make_message("receipt old"))

        def script() -> None:
            self.idling()
            self.server.deliver(make_message("receipt new"))
            wait_until(lambda: len(self.server.uids("INBOX")) == 1, timeout=15)

        code, out, err = self.watch_in_process(script, "--apply", "--new-only")
        self.assertEqual(code, 0, err)
        self.assertIn(b"receipt old", self.server.messages("INBOX")[0].raw)

    def test_each_applying_wake_up_is_one_run_and_undo_takes_back_the_last(self):
        def script() -> None:
            self.idling()
            for n, subject in enumerate(("receipt A", "receipt B"), 2):
                idles = self.server.count("IDLE")
                self.server.deliver(make_message(subject))
                wait_until(lambda: self.server.uids("INBOX") == [], timeout=15)
                self.idling(idles + 1)
            self.idling(self.server.count("IDLE") + 1)       # an IDLE re-issue: no run

        code, out, err = self.watch_in_process(script, "--apply", "--new-only",
                                               "--idle-interval", "0.05")
        self.assertEqual((code, err), (0, ""))      # default verbosity: silent while all is well
        self.assertEqual(len(out.splitlines()), 1, out)                   # the rules in force
        self.assertGreaterEqual(self.server.count("IDLE"), 4)     # a re-issue among them
        code, out, err = run_cli("history", "--json", env=self.env)
        runs = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["command"] for r in runs], ["watch", "watch"], out)
        self.assertEqual([r["counts"] for r in runs], [{"label Receipts": 1, "archive": 1}] * 2)
        code, out, err = run_cli("undo", "--apply", *self.argv()[1:-2], env=self.env)
        self.assertEqual(code, 0, err)
        inbox = self.server.messages("INBOX")
        self.assertEqual(len(inbox), 1)
        self.assertIn(b"receipt B", inbox[0].raw)               # the latest batch only

    @unittest.skipUnless(os.name == "posix", "POSIX signals")
    def test_watch_apply_holds_the_lock_so_a_cron_run_exits_7(self):
        results: List[subprocess.CompletedProcess] = []

        def script() -> None:
            self.idling()
            results.append(self.subprocess_cli(*self.argv("--apply", command="run")))
            results.append(self.subprocess_cli(*self.argv(command="run")))   # dry run: fine

        code, out, err = self.watch_in_process(script, "--apply", "--all")
        self.assertEqual(code, 0, err)
        locked, dry = results
        self.assertEqual(locked.returncode, gc.EXIT_LOCKED, locked.stderr)
        self.assertEqual(len(locked.stderr.strip().splitlines()), 1, locked.stderr)
        self.assertIn("watch", locked.stderr)
        self.assertEqual(dry.returncode, 0, dry.stderr)

    def test_rules_reload_on_change_keeps_the_old_rules_when_the_new_file_is_invalid(self):
        greetings = {"rule": [{"name": "Greetings", "subject": "hello", "label": "Greetings"}],
                     "account": {"user": "someone-else@example.com"}}

        def script() -> None:
            self.idling()
            self.write_rules('{"rule": [{"subject": "x", "lable": "typo"}]}')
            idles = self.server.count("IDLE")
            msgid = self.server.deliver(make_message("invoice 1"))
            wait_until(lambda: "Receipts" in self.server.message(msgid).labels,
                       timeout=15, message="the old rules were not kept")
            self.idling(idles + 1)          # that wake-up is over
            self.write_rules(greetings)
            msgid = self.server.deliver(make_message("hello there"))
            wait_until(lambda: "Greetings" in self.server.message(msgid).labels,
                       timeout=15, message="the new rules were not used")

        code, out, err = self.watch_in_process(script, "--apply", "--all")
        self.assertEqual(code, 0, err)
        lines = err.strip().splitlines()
        invalid = [line for line in lines if "not valid" in line]
        self.assertEqual(len(invalid), 1, err)
        self.assertIn("'lable'", invalid[0])
        self.assertEqual(sum("rules reloaded" in line for line in lines), 1, err)
        self.assertEqual(sum("[account]" in line for line in lines), 1, err)
        self.assertEqual(self.server.count("LOGIN"), 1)               # never reconnected
        self.assertEqual(self.commands()[-1], "LOGOUT")

    @unittest.skipUnless(hasattr(signal, "SIGHUP"), "no SIGHUP here")
    def test_sighup_reloads_the_rules(self):
        def script() -> None:
            self.idling()
            os.kill(os.getpid(), signal.SIGHUP)
            self.idling(2)

        code, out, err = self.watch_in_process(script, "--apply", "--all")
        self.assertEqual(code, 0, err)
        self.assertIn("rules reloaded from " + self.rules_path, err)

    def test_dry_run_watch_reports_each_message_once_and_changes_nothing(self):
        self.server.add_message(make_message("receipt 1"))

        def script() -> None:
            for subject in ("invoice 2", "hello 3"):
                self.idling()
                idles = self.server.count("IDLE")
                self.server.deliver(make_message(subject))
                self.idling(idles + 1)              # that wake-up is over

        code, out, err = self.watch_in_process(script, "--all")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(sum(line.startswith("INBOX 1: would label Receipts") for line in lines), 1, out)
        self.assertEqual(sum(line.startswith("INBOX 2: would label Receipts") for line in lines), 1, out)
        self.assertEqual(len(self.server.uids("INBOX")), 3)
        self.assertNotIn("SELECT", self.commands())

    def test_watch_json_escapes_what_a_sender_wrote_like_run_json(self):
        evil = "receipt \u202eXXX\x9b31m\x1b[2K"             # bidi override, C1 CSI, ESC
        header = "=?UTF-8?B?" + base64.b64encode(evil.encode()).decode() + "?="
        self.server.add_message(make_message(header))
        self.server.add_message(make_message("invoice 2"))

        def script() -> None:
            self.idling()
            idles = self.server.count("IDLE")
            self.server.deliver(make_message(header))
            self.idling(idles + 1)

        code, out, err = self.watch_in_process(script, "--all", "--json")
        self.assertEqual((code, err), (0, ""))
        for char in ("\u202e", "\x9b", "\x1b"):
            self.assertNotIn(char, out)
        self.assertIn("receipt \\u202eXXX\\u009b31m\\u001b[2K", out)
        records = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([(r["uid"], r["subject"]) for r in records],
                         [(1, evil), (2, "invoice 2"), (3, evil)])

    @unittest.skipUnless(os.name == "posix", "POSIX signals")
    def test_second_ctrl_c_interrupts_at_once(self):
        delay = 30      # LOGIN's answer; the server's stop at cleanup cuts it short
        self.server.add_fault("LOGIN", action="delay", delay=delay)
        problems: List[BaseException] = []
        first_handled, finished = threading.Event(), threading.Event()
        original_stop = gc.Watcher.stop
        outside: List[int] = []     # SIGINTs that came once the watch gave the handler back

        def stop(watcher: gc.Watcher) -> None:
            original_stop(watcher)
            first_handled.set()

        def drive() -> None:
            try:
                wait_until(lambda: "LOGIN" in self.commands(), timeout=15)
                os.kill(os.getpid(), signal.SIGINT)     # the first waits for a safe point
                # Two signals before the handler runs count as one: wait for it, not a while.
                self.assertTrue(first_handled.wait(15), "the first SIGINT was never handled")
                # Every later one interrupts.  One that lands after the handler returned but
                # before the blocked read resumed waits for that read (CPython re-enters the
                # call without looking again), a moment no test can see: press again, as a
                # user would, until the run ends (long before LOGIN's answer, checked below).
                while not finished.is_set():
                    os.kill(os.getpid(), signal.SIGINT)
                    finished.wait(0.05)
            except BaseException as exc:
                problems.append(exc)

        # Ours, so a press that lands after the watch has put it back harms no one.
        before = signal.signal(signal.SIGINT, lambda signum, _frame: outside.append(signum))
        self.addCleanup(signal.signal, signal.SIGINT, before)
        ours = signal.getsignal(signal.SIGINT)
        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        started = time.monotonic()
        try:
            with mock.patch.object(gc.Watcher, "stop", stop):
                code, out, err = run_cli(*self.argv("--apply", "--all"), env=self.env)
        finally:
            finished.set()
            driver.join(10)
        self.assertEqual(problems, [])
        self.assertEqual(code, gc.EXIT_INTERRUPTED, err)
        self.assertLess(time.monotonic() - started, delay)        # before LOGIN's answer
        self.assertEqual(self.commands()[-1], "LOGIN")
        self.assertIs(signal.getsignal(signal.SIGINT), ours)      # put back as it was

    def test_daily_budget_pauses_the_watch_instead_of_ending_it(self):
        for n in range(6):
            self.server.add_message(make_message(f"receipt {n}"))

        def script() -> None:
            self.idling()

        code, out, err = self.watch_in_process(script, "--apply", "--all", "--batch-size", "2",
                                               "--daily-budget", "1K")
        self.assertEqual(code, 0, err)
        self.assertEqual(err.count("catches up after 00:00 UTC"), 1, err)
        self.assertGreater(len(self.server.uids("INBOX")), 0)        # the rest waits
        code, out, err = run_cli("history", "--json", env=self.env)
        self.assertEqual([json.loads(line)["status"] for line in out.splitlines()], ["stopped"])

    def test_bad_interval_and_auth_failure(self):
        code, out, err = run_cli(*self.argv("--interval", "0"), env=self.env)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("seconds above 0", err)
        code, out, err = run_cli(*self.argv("--all"), env=dict(self.env, GMAIL_APP_PASSWORD="wrong"))
        self.assertEqual(code, gc.EXIT_AUTH)
        self.assertEqual(len(err.strip().splitlines()), 1, err)


class ExitCodeTest(FakeServerTest):
    def argv(self, *extra: str) -> List[str]:
        return ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--retries", "0", *extra]

    def test_usage_mistakes_in_timeout_port_and_folder_exit_2(self):
        for extra in (["--timeout", "0"], ["--timeout", "-1"], ["--timeout", "nan"],
                      ["--timeout", "inf"], ["--timeout", "soon"], ["--port", "0"],
                      ["--port", "65536"], ["--port", "-5"], ["--folder", "IN\x1bBOX"],
                      ["--folder", "a\x7fb"], ["--folder", "a\rb"], ["--folder", ""]):
            with self.subTest(extra=extra):
                argv = ["--user", USER, "--host", "127.0.0.1", "--plaintext",
                        "--retries", "0"] + extra
                if "--port" not in extra:
                    argv += ["--port", str(self.server.port)]
                code, _, err = run_cli(*argv, env={"GMAIL_APP_PASSWORD": PASSWORD})
                self.assertEqual(code, gc.EXIT_USAGE, err)
                self.assert_no_raw_controls(err)
        self.assertEqual(self.server.log, [])
        code, _, err = run_cli(*self.argv("--timeout", "2.5", "--port", str(self.server.port)),
                               env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 0, err)

    def assert_no_raw_controls(self, text: str) -> None:
        self.assertFalse(re.search("[\x1b\x7f\r]", text), text)

    def test_uidvalidity_change_mid_run_skips_that_folder_says_run_again_and_exits_6(self):
        self.server.add_message(make_message("receipt 1"), labels=("\\Inbox", "Work"))
        self.server.add_message(make_message("receipt 2"), labels=("Work",))
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump({"rule": [{"name": "R", "subject": "receipt", "star": True}]}, handle)
        self.server.add_fault("UID FETCH", action="renumber")
        argv = ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--retries", "1", "--rules", rules, "--apply",
                "--folder", "INBOX", "--folder", "Work"]
        code, out, err = run_cli(*argv, env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_INCOMPLETE, err)
        self.assertIn("UIDVALIDITY of INBOX changed", err)
        self.assertIn("run again", err)
        self.assertIn("Work: 2 messages examined", out)
        self.assertEqual([m.flags for m in self.server.messages("Work")],
                         [{"\\Flagged"}, {"\\Flagged"}])

    def test_tls_hint_names_cafile_only_when_none_was_given(self):
        server = FakeGmail(tls=True, cert="wrong_host").start()
        self.addCleanup(server.stop)
        ca_file = write_ca_file(self.tmp)
        for options, hinted in (({}, True), ({"cafile": ca_file}, False)):
            with self.subTest(options=options):
                conn = gc.GmailConnection(USER, password=PASSWORD, host="localhost",
                                          port=server.port, keepalive=None, retries=0,
                                          timeout=5, **options)
                with self.assertRaises(gc.TLSError) as ctx:
                    conn.connect()
                self.assertEqual("--cafile" in str(ctx.exception), hinted)

    def test_tls_refusal_exits_4(self):
        server = FakeGmail(tls=True).start()
        self.addCleanup(server.stop)
        code, _, err = run_cli("--user", USER, "--host", "localhost", "--port", str(server.port),
                               "--retries", "0", env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_CONNECTION, err)
        self.assertIn("cannot trust the TLS certificate", err)
        self.assertNotIn("LOGIN", server.commands())

    def test_ctrl_c_during_the_final_logout_is_not_an_interruption(self):
        self.server.add_message(make_message("receipt 1"))
        original = gc._Protocol.execute

        def interrupt_on(command_name):
            def execute(proto, command, *args, **kwargs):
                if command == command_name:
                    raise KeyboardInterrupt
                return original(proto, command, *args, **kwargs)
            return execute

        with mock.patch.object(gc._Protocol, "execute", interrupt_on("LOGOUT")):
            code, out, err = run_cli(*self.argv(), env={"GMAIL_APP_PASSWORD": PASSWORD})
            self.assertEqual(code, 0, err)
            self.assertIn("Dry run", out)
            code, out, err = run_cli("labels", *self.argv(), env={"GMAIL_APP_PASSWORD": PASSWORD})
            self.assertEqual(code, 0, err)
        with mock.patch.object(gc._Protocol, "execute", interrupt_on("UID SEARCH")):
            code, out, err = run_cli(*self.argv(), env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_INTERRUPTED)
        wait_until(lambda: self.server.sessions == [])   # the interrupted run still closed

    def test_exit_code_table_is_documented(self):
        path = os.path.join(os.path.dirname(os.path.abspath(gc.__file__)), "README.md")
        readme = None   # absent in a bare copy (mutation runs)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                readme = handle.read()
        for code in ("0", "1", "2", "3", "4", "5", "6", "7", "8", "129", "130", "141", "143"):
            with self.subTest(code=code):
                self.assertRegex(gc.EXIT_CODES_HELP, rf"(?m)^\s+{code}\s")
                if readme is not None:
                    self.assertRegex(readme, rf"(?m)^\|\s*{code}\s*\|")


class TerminalSafetyTest(FakeServerTest):
    EVIL = "Invoice paid\r\x1b[2K\u202eXXX\x9b31m\x07"   # CR, ESC, bidi override, C1 CSI, BEL

    def assert_safe(self, text: str) -> None:
        for char in ("\r", "\x1b", "\u202e", "\x9b", "\x07"):
            self.assertNotIn(char, text)

    def test_printable_escapes_controls_and_bidi_and_keeps_text(self):
        table = [("plain", "plain"), ("Café 日本 😀", "Café 日本 😀"), ("a\rb", "a\\u000db"),
                 ("\x1b[2J", "\\u001b[2J"), ("\x7f", "\\u007f"), ("\x85\x9b", "\\u0085\\u009b"),
                 ("\u202ecod.exe", "\\u202ecod.exe"), ("\u2066x\u2069", "\\u2066x\\u2069"),
                 ("a\nb\tc", "a\\u000ab\\u0009c"), ("\x00", "\\u0000")]
        for raw, shown in table:
            with self.subTest(raw=raw):
                self.assertEqual(gc.printable(raw), shown)
        self.assertEqual(gc.printable("a\n\x1b", keep_newlines=True), "a\n\\u001b")

    def subject_header(self) -> str:
        return "=?UTF-8?B?" + base64.b64encode(self.EVIL.encode()).decode() + "?="

    def test_run_and_json_escape_what_a_sender_wrote(self):
        self.server.add_message(make_message(self.subject_header(),
                                             sender="=?UTF-8?Q?Eve=1B[31m?= <eve@example.com>"))
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump({"rule": [{"name": "All", "subject": "invoice", "trash": True}]}, handle)
        argv = ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--rules", rules, "-v"]
        code, out, err = run_cli(*argv, env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 0, err)
        self.assert_safe(out + err)
        self.assertIn("would trash", out)
        self.assertIn("Invoice paid \\u001b[2K\\u202eXXX", out)   # CR folded as whitespace
        self.assertIn("Eve\\u001b[31m", out)
        code, out, err = run_cli(*argv, "--json", env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assert_safe(out)
        self.assertEqual(json.loads(out.splitlines()[0])["subject"], self.EVIL)

    def test_test_labels_errors_and_log_lines_are_escaped(self):
        eml = os.path.join(self.tmp, "evil.eml")
        with open(eml, "wb") as handle:
            handle.write(make_message(self.subject_header()))
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump({"rule": [{"name": "R\u202e", "subject": "invoice", "star": True}]}, handle)
        code, out, err = run_cli("test", rules, eml)
        self.assertEqual(code, 0, err)
        self.assert_safe(out)
        self.assertIn("\\u202e", out)
        code, out, err = run_cli("check", rules)
        self.assertEqual(code, 0, err)
        self.assert_safe(out)
        self.server.add_message(make_message(), labels=("\\Inbox", "evil\x1b]0;pwned\x07"))
        argv = ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--retries", "0"]
        code, out, err = run_cli("labels", *argv, env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 0, err)
        self.assert_safe(out)
        self.assertIn("evil\\u001b]0;pwned\\u0007", out)
        self.server.add_fault("EXAMINE", action="no", text="[ALERT] \x1b[2J\rall fine")
        code, out, err = run_cli(*argv, "-v", env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, gc.EXIT_INCOMPLETE)     # that folder is skipped
        self.assertIn("\\u001b[2J\\u000dall fine", err)
        self.assert_safe(err)


class TerminalSafetyOfPathsTest(FakeServerTest):
    def test_a_rules_file_name_with_controls_is_shown_escaped(self):
        rules = os.path.join(self.tmp, "rules\u202e\x1b[1m.json")
        with open(rules, "w") as handle:
            json.dump({"rule": [{"name": "R", "subject": "x", "star": True}]}, handle)
        code, out, err = run_cli("--user", USER, "--host", "127.0.0.1", "--port",
                                 str(self.server.port), "--plaintext", "--rules", rules,
                                 env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual(code, 0, err)
        self.assertIn("rules\\u202e\\u001b[1m.json", out)
        self.assertFalse(re.search("[\x1b\u202e]", out + err))


class LineFittingTest(unittest.TestCase):
    def outcome(self, sender: str, subject: str) -> gc.Outcome:
        decision = Decision(matches=(("Newsletters", "header List-Id present"),),
                            actions=Actions(labels=("Newsletters",)))
        return gc.Outcome("INBOX", 4021, sender, subject, decision)

    def test_lines_fit_the_terminal_and_cut_at_word_boundaries(self):
        outcome = self.outcome('"Amazon.com Order Updates" <auto-confirm@amazon.com>',
                               "Your Amazon.com order of \"Ultra-Soft Microfiber Sheet Set, "
                               "Queen, Grey\" and 3 more items has shipped")
        head = "INBOX 4021: would label Newsletters  [Newsletters]  "
        for width in (70, 80, 100, 150):
            with self.subTest(width=width):
                line = gc._message_line(outcome, False, width)
                self.assertLessEqual(gc._columns(line), width, line)
                self.assertGreater(gc._columns(line), width - 10, line)
                self.assertTrue(line.startswith(head), line)
                self.assertTrue(line.endswith("..."), line)
                kept = line[len(head):-3].split("  ")[-1]
                self.assertTrue(outcome.subject.startswith(kept), kept)
                self.assertIn(outcome.subject[len(kept)], ' ,"', "cut inside a word")
        self.assertEqual(gc._message_line(outcome, False, 80),
                         head + "Your Amazon.com order of...")
        self.assertEqual(gc._message_line(outcome, False, 120),
                         head + 'Amazon.com Order...  Your Amazon.com order of "Ultra-Soft...')
        self.assertEqual(gc._message_line(outcome, False, 40),
                         "INBOX 4021: would label Newsletters...")

    def test_fit_never_exceeds_the_width_even_when_tiny(self):
        self.assertEqual(gc._fit("Receipts", 8), "Receipts")
        self.assertEqual(gc._fit("Receipts and more", 12), "Receipts...")
        self.assertEqual(gc._fit("Receipts", 2), "Re")
        self.assertEqual(gc._fit("Receipts", 0), "")

    def test_wide_characters_count_as_two_columns(self):
        outcome = self.outcome("株式会社サンプル <sale@shop.example.jp>", "セール開始 " * 20)
        line = gc._message_line(outcome, True, 80)
        self.assertLessEqual(gc._columns(line), 80)
        self.assertGreater(gc._columns(line), 66)   # 40 characters would have been 80 columns
        self.assertLess(len(line), 70)   # counted as characters, it would fill 80

    def test_without_a_terminal_lines_keep_the_fixed_caps(self):
        outcome = self.outcome("Bob <bob@example.net>", "x" * 100)
        self.assertEqual(gc._message_line(outcome, True, None),
                         "INBOX 4021: label Newsletters  [Newsletters]  Bob <bob@example.net>  "
                         + "x" * 57 + "...")


class ProgressTest(unittest.TestCase):
    def run_phase(self, enabled: bool, steps: List[Tuple[float, int]], total: int) -> str:
        stream, clock = io.StringIO(), [0.0]
        progress = gc._Progress(stream, enabled, clock=lambda: clock[0])
        for at, done in steps:
            clock[0] = at
            progress("INBOX: classified", done, total)
        return stream.getvalue()

    def test_long_phase_on_a_terminal_redraws_in_place_and_ends_the_line(self):
        shown = self.run_phase(True, [(0, 0), (0.5, 1000), (1.5, 2000), (1.6, 3000),
                                      (2.0, 4000), (3.0, 5000)], 5000)
        self.assertEqual(shown, "\r\x1b[KINBOX: classified 2,000 of 5,000"
                                "\r\x1b[KINBOX: classified 4,000 of 5,000"
                                "\r\x1b[KINBOX: classified 5,000 of 5,000\n")

    def test_short_phase_or_no_terminal_shows_nothing(self):
        self.assertEqual(self.run_phase(True, [(0, 0), (0.3, 500), (0.5, 1000)], 1000), "")
        self.assertEqual(self.run_phase(False, [(0, 0), (5, 500), (9, 1000)], 1000), "")

    def test_apply_reports_its_progress_to_the_end(self):
        server = FakeGmail().start()
        self.addCleanup(server.stop)
        for n in range(3):
            server.add_message(make_message(f"receipt {n}", extra="List-Id: <x.example>\n"))
        seen: List[Tuple[int, int]] = []
        conn = gc.GmailConnection(USER, password=PASSWORD, host="127.0.0.1", port=server.port,
                                  security="plaintext", keepalive=None, retries=0)
        rules = parse_rules({"rule": [{"subject": "receipt", "label": "R", "star": True,
                                       "archive": True}]})
        with conn:
            gc.classify_folder(conn, rules, "INBOX", apply=True,
                               on_applied=lambda done, total: seen.append((done, total)))
        self.assertEqual(seen, [(3, 9), (6, 9), (9, 9)])


class StopInProcessTest(StateTestCase):
    """main() called from Python (a vendoring script, a test): a stop ends the command at
    its next safe point and main() returns 128 + the signal's number; the process lives."""

    cli = UndoSafetyTest.cli

    def stop_after_first(self, method: str, signum: int) -> Any:
        """Patch GmailConnection.<method> so that a stop is asked for once it returned;
        ``"flight"``: once the first flight of UID STOREs (_WriteFlight.land) returned."""
        if method == "flight":
            land = gc._WriteFlight.land

            def landed(flight: Any) -> Any:
                result = land(flight)
                if any(write.command == "UID STORE" for write in flight.writes):
                    flight.conn.stop.request(signum)
                return result
            return mock.patch.object(gc._WriteFlight, "land", landed)
        real = getattr(gc.GmailConnection, method)

        def then_stop(conn: gc.GmailConnection, *args: Any, **kwargs: Any) -> Any:
            result = real(conn, *args, **kwargs)
            conn.stop.request(signum)
            return result
        return mock.patch.object(gc.GmailConnection, method, then_stop)

    def writes(self, since: int = 0) -> List[str]:
        return [e.command for e in self.server.log[since:] if e.command in _WRITE_COMMANDS]

    def test_a_stop_after_the_first_write_ends_the_run_there_and_says_so(self):
        seed_mailbox(self.server, 12)
        with self.stop_after_first("flight", signal.SIGTERM):
            code, out, err = self.cli("run", "--apply")
        self.assertEqual(code, 143, err)
        # The folders it needs, then the labels and flags (one flight): nothing after it.
        self.assertEqual(self.writes(), ["CREATE"] * 4 + ["UID STORE"] * 6)
        self.assertEqual(self.server.commands()[-1], "LOGOUT")
        made, not_made = map(int, _INTERRUPTED_RE.search(err).groups())
        self.assertEqual(made, 10)              # the labels and flags of the first flight
        self.assertGreater(not_made, 0)
        self.assertNotIn("changes made.", out)
        code, out, err = self.cli("history", "--json")
        (entry,) = [json.loads(line) for line in out.splitlines()]
        self.assertEqual((entry["status"], entry["changes_made"]), ("interrupted", made))

    def test_a_stopped_undo_says_what_it_reversed_and_how_to_finish(self):
        seed_mailbox(self.server, 12)
        start = mailbox_snapshot(self.server)
        code, _, err = self.cli("run", "--apply")
        self.assertEqual(code, 0, err)
        (run,) = [json.loads(line)["run"] for line in self.cli("history", "--json")[1].splitlines()]
        since = len(self.server.log)
        with self.stop_after_first("move", signal.SIGINT):
            code, out, err = self.cli("undo", run, "--apply")
        self.assertEqual(code, 130, err)
        self.assertEqual(self.writes(since), ["UID MOVE"])
        found = re.search(r"interrupted: (\d+) changes reversed, (\d+) not; run 'undo (\S+) "
                          r"--apply' again to finish", err)
        self.assertIsNotNone(found, err)
        self.assertGreater(int(found.group(1)), 0)
        self.assertGreater(int(found.group(2)), 0)
        self.assertEqual(found.group(3), run)
        code, _, err = self.cli("undo", run, "--apply")          # the rest
        self.assertEqual(code, 0, err)
        self.assertEqual(mailbox_snapshot(self.server), start)

    def test_a_signal_before_anything_was_sent_ends_at_once(self):
        # Not yet armed (a password prompt, say): the signal interrupts where it lands.
        stop = gc.Stop()
        signals = gc._Signals(stop)
        with self.assertRaises(KeyboardInterrupt):
            signals._handle(signal.SIGTERM, None)
        self.assertEqual(gc._signal_exit(stop.signum), 143)
        armed = gc._Signals(gc.Stop(), armed=True)
        armed._handle(signal.SIGTERM, None)                       # the first: a request
        self.assertEqual(armed.stop.signum, signal.SIGTERM)
        with self.assertRaises(KeyboardInterrupt):
            armed._handle(signal.SIGINT, None)                    # the second: at once
        hangups: List[int] = []
        watch = gc._Signals(gc.Stop(), armed=True, on_hangup=lambda: hangups.append(1))
        if hasattr(signal, "SIGHUP"):
            watch._handle(signal.SIGHUP, None)
            self.assertEqual((hangups, watch.stop.requested), ([1], False))
            plain = gc._Signals(gc.Stop(), armed=True)
            plain._handle(signal.SIGHUP, None)
            self.assertEqual(plain.stop.signum, signal.SIGHUP)

    def test_the_readme_exit_code_table_and_the_help_list_the_same_codes(self):
        if not os.path.exists(README_PATH):
            self.skipTest("README.md is not beside the tests")
        with open(README_PATH, encoding="utf-8") as handle:
            table = set(re.findall(r"(?m)^\| (\d+) \|", handle.read()))
        listed = set(re.findall(r"(?m)^ {2}(\d+) ", gc.EXIT_CODES_HELP))
        self.assertEqual(table, listed)
        self.assertLessEqual({"129", "130", "141", "143"}, listed)


class NetrcEntriesTest(TempDirMixin, unittest.TestCase):
    """~/.netrc read by us: every entry kept, so two logins on one host both work."""

    TEXT = ("# a comment line\n"
            "machine imap.example.com login one@example.com password first\n"
            "machine imap.example.com\n  login two@example.com\n  password \"sec ond\"\n"
            "macdef init\nmachine evil login one@example.com password macro\n\n"
            "machine other.example.com password nologin # login one@example.com\n"
            "default login one@example.com password fallback\n")

    def setUp(self):
        self.tmp = self.make_dir()
        with open(os.path.join(self.tmp, ".netrc"), "w") as handle:
            handle.write(self.TEXT)
        os.chmod(os.path.join(self.tmp, ".netrc"), 0o600)
        patcher = mock.patch.dict(os.environ, {"HOME": self.tmp})
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_entries_in_order_macros_and_comments_skipped(self):
        self.assertEqual(gc._netrc_entries(self.TEXT), [
            ("imap.example.com", "one@example.com", "first"),
            ("imap.example.com", "two@example.com", "sec ond"),
            ("other.example.com", "", "nologin"),
            (None, "one@example.com", "fallback")])

    def test_an_account_takes_only_the_entry_naming_its_host_and_user(self):
        find = gc._password_from_netrc
        self.assertEqual(find("imap.example.com", "two@example.com", strict=True), "sec ond")
        self.assertEqual(find("IMAP.example.com", "one@example.com", strict=True), "first")
        self.assertIsNone(find("imap.example.com", "three@example.com", strict=True))
        self.assertIsNone(find("other.example.com", "one@example.com", strict=True))
        self.assertIsNone(find("elsewhere", "one@example.com", strict=True))
        # Without an [[account]] too: the netrc module kept one entry per host (the last),
        # so the first login of a host was never found.
        self.assertEqual(find("imap.example.com", "one@example.com"), "first")
        self.assertEqual(find("imap.example.com", "two@example.com"), "sec ond")
        # Else, as before, a host entry without login, or the default.
        self.assertEqual(find("other.example.com", "one@example.com"), "nologin")
        self.assertEqual(find("elsewhere", "one@example.com"), "fallback")
        self.assertIsNone(find("elsewhere", "two@example.com"))
        self.assertIsNone(find("imap.example.com", "three@example.com"))


class ExitSeverityTest(unittest.TestCase):
    def test_the_most_serious_code_wins_in_the_documented_order(self):
        order = [130, 1, 2, 3, 4, 5, 8, 6, 7, 0]
        for i, high in enumerate(order):
            for low in order[i + 1:]:
                with self.subTest(high=high, low=low):
                    self.assertEqual(gc.most_serious_exit([low, high, low]), high)
        for signal_code in (129, 130, 143):
            self.assertEqual(gc.most_serious_exit([1, signal_code, 7]), signal_code)
        self.assertEqual(gc.most_serious_exit([]), 0)
        self.assertEqual(gc.most_serious_exit([0, 141]), 141)
        self.assertEqual(gc.most_serious_exit([7, 141]), 7)

    def test_the_help_states_the_same_order(self):
        found = re.search(r"in the order\s+([\d/, \n]+)", gc.EXIT_CODES_HELP)
        listed = [int(code) for code in re.findall(r"\d+", found.group(1))]
        self.assertEqual(listed, [130, 143, 129, 1, 2, 3, 4, 5, 8, 6, 7, 0])
        self.assertEqual(listed, list(gc._EXIT_SEVERITY))


class TwoAccountsTestCase(FakeServerTest):
    """Two [[account]] tables, each its own fake server (one Gmail, one with MOVE)."""

    def setUp(self):
        super().setUp()
        self.second = FakeGmail(kind="move", users={"two@example.com": "second-pass"}).start()
        self.addCleanup(self.second.stop)
        self.env = {"XDG_STATE_HOME": os.path.join(self.tmp, "state"),
                    "XDG_CONFIG_HOME": os.path.join(self.tmp, "config"),
                    "HOME": self.tmp,
                    "IMAP_PASSWORD_ONE": PASSWORD, "IMAP_PASSWORD_TWO": "second-pass",
                    "IMAP_PASSWORD_RENAMED": PASSWORD}
        self.server.add_message(make_message("receipt 1"))
        self.second.add_message(make_message("receipt 2"))
        self.second.add_message(make_message("invoice 3"))
        self.write_rules()

    def tables(self, one: str = "one", two: str = "two") -> List[Dict[str, Any]]:
        return [{"name": one, "user": USER, "host": "127.0.0.1", "port": self.server.port,
                 "tls": "plaintext"},
                {"name": two, "user": "two@example.com", "host": "127.0.0.1",
                 "port": self.second.port, "tls": "plaintext", "rules": ["Receipts"]}]

    def write_rules(self, *tables: Dict[str, Any]) -> None:
        self.rules_path = os.path.join(self.tmp, "rules.json")
        with open(self.rules_path, "w") as handle:
            json.dump(accounts_doc(*(tables or self.tables())), handle)

    def cli(self, *argv: str, **env: str) -> Tuple[int, str, str]:
        command = argv[0] if argv and argv[0] in ("run", "history", "undo", "watch") else "run"
        rest = argv[1:] if argv and argv[0] == command else argv
        retries = () if command == "history" else ("--retries", "0")
        return run_cli(command, "--rules", self.rules_path, *retries, *rest,
                       env=dict(self.env, **env))

    def audit(self) -> List[Dict[str, Any]]:
        path = os.path.join(self.tmp, "state", "gmail_classify", "audit.jsonl")
        with open(path) as handle:
            return [json.loads(line) for line in handle]


class SeveralAccountsTest(TwoAccountsTestCase):
    """`run` (and history, undo) over two [[account]] tables."""

    def test_apply_runs_every_account_in_turn_each_with_its_own_password(self):
        code, out, err = self.cli("--apply")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.server.uids("INBOX"), [])
        self.assertEqual(self.second.uids("INBOX"), [])
        self.assertEqual(len(self.second.uids("Receipts")), 2)
        self.assertIn(f"Account one: {USER} on 127.0.0.1:{self.server.port}", out)
        self.assertIn("All 2 accounts:", out)
        self.assertIn("  one: 1 message examined, 2 changes made; exit 0", out)
        self.assertIn("  total: 3 messages examined, 6 changes made; exit 0", out)
        # Each server saw only its own account's password.
        first, second = b"".join(self.server.raw_lines), b"".join(self.second.raw_lines)
        self.assertIn(PASSWORD.encode(), first)
        self.assertNotIn(b"second-pass", first)
        self.assertIn(b"second-pass", second)
        self.assertNotIn(PASSWORD.encode(), second)
        # Every record says which table; state and runs stay keyed by user, host and port.
        records = self.audit()
        self.assertEqual({r.get("account_name") for r in records}, {"one", "two"})
        self.assertEqual({(r["account_name"], r["host"]) for r in records if r["type"] == "summary"},
                         {("one", f"127.0.0.1:{self.server.port}"),
                          ("two", f"127.0.0.1:{self.second.port}")})

    def test_json_ends_with_a_total_record(self):
        code, out, err = self.cli("--json")
        self.assertEqual((code, err), (0, ""))
        lines = [json.loads(line) for line in out.splitlines()]
        total = lines[-1]
        self.assertEqual(total["type"], "total")
        self.assertEqual([(a["name"], a["exit"], a["examined"]) for a in total["accounts"]],
                         [("one", 0, 1), ("two", 0, 2)])
        self.assertEqual({l.get("account_name") for l in lines if l["type"] == "message"},
                         {"one", "two"})

    def test_account_option_picks_accounts_and_unknown_names_exit_2(self):
        code, out, err = self.cli("--apply", "--account", "two")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(self.server.uids("INBOX")), 1)          # one not touched
        self.assertNotIn("LOGIN", self.server.commands())
        self.assertEqual(self.second.uids("INBOX"), [])
        code, out, err = self.cli("--account", "three")
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("no [[account]] named 'three'; it has: one, two", err)

    def test_unsuffixed_secrets_and_connection_flags_need_exactly_one_account(self):
        for extra, env in ((["--user", "x"], {}), (["--host", "127.0.0.1"], {}),
                           (["--port", "1143"], {}), (["--password-command", "true"], {}),
                           ([], {"IMAP_PASSWORD": PASSWORD}), ([], {"GMAIL_APP_PASSWORD": "x"}),
                           ([], {"GMAIL_USER": "x"}),
                           (["--account", "one", "--account", "two"], {"IMAP_PASSWORD": "x"})):
            with self.subTest(extra=extra, env=env):
                code, out, err = self.cli(*extra, **env)
                self.assertEqual(code, gc.EXIT_USAGE, err)
                self.assertIn("exactly one --account", err)
                self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertEqual(self.server.commands() + self.second.commands(), [])
        # With exactly one --account the unsuffixed variable is that account's.
        env = dict(self.env, IMAP_PASSWORD_TWO="", IMAP_PASSWORD="second-pass")
        code, out, err = run_cli("--rules", self.rules_path, "--account", "two", env=env)
        self.assertEqual((code, err), (0, ""))

    def test_netrc_entry_must_match_host_and_user(self):
        netrc_path = os.path.join(self.tmp, ".netrc")
        with open(netrc_path, "w") as handle:
            handle.write(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n"
                         f"machine 127.0.0.1 login two@example.com password second-pass\n")
        os.chmod(netrc_path, 0o600)
        code, out, err = self.cli("--apply", IMAP_PASSWORD_ONE="", IMAP_PASSWORD_TWO="")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.second.uids("INBOX"), [])
        with open(netrc_path, "w") as handle:       # the host, but another user: not ours
            handle.write(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
        self.second.add_message(make_message("receipt 9"))
        code, out, err = self.cli("--apply", IMAP_PASSWORD_ONE="", IMAP_PASSWORD_TWO="")
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("gmail_classify: two: no password for account 'two': set "
                      "IMAP_PASSWORD_TWO", err)
        self.assertNotIn(PASSWORD.encode(), b"".join(self.second.raw_lines))

    def test_a_locked_account_does_not_stop_the_other_and_a_refused_sign_in_outranks_it(self):
        store = gc.StateStore(os.path.join(self.tmp, "state", "gmail_classify"))
        lock = store.lock(gc.account_key(USER, "127.0.0.1", self.server.port)).acquire()
        self.addCleanup(lock.release)
        code, out, err = self.cli("--apply")
        self.assertEqual(code, gc.EXIT_LOCKED, err)
        self.assertIn("gmail_classify: one: another --apply", err)
        self.assertEqual(len(self.server.uids("INBOX")), 1)
        self.assertEqual(self.second.uids("INBOX"), [])
        self.second.add_message(make_message("receipt 4"))
        code, out, err = self.cli("--apply", IMAP_PASSWORD_TWO="wrong")
        self.assertEqual(code, gc.EXIT_AUTH, err)
        self.assertIn("  one: 0 messages examined, 0 changes made; exit 7", out)
        self.assertIn("  two: 0 messages examined, 0 changes made; exit 3", out)

    def test_an_unreachable_account_does_not_stop_the_other(self):
        port = self.server.port
        self.server.stop()
        code, out, err = self.cli("--apply")
        self.assertEqual(code, gc.EXIT_CONNECTION, err)
        self.assertIn(f"gmail_classify: one: ", err)
        self.assertEqual(self.second.uids("INBOX"), [])

    def test_a_signal_stops_the_current_account_and_starts_no_other(self):
        self.server.add_message(make_message("receipt 5"))
        real = gc._WriteFlight.land

        def then_stop(flight: Any) -> Any:
            result = real(flight)
            if any(write.command == "UID STORE" for write in flight.writes):
                flight.conn.stop.request(signal.SIGTERM)    # after the labels' flight
            return result
        with mock.patch.object(gc._WriteFlight, "land", then_stop):
            code, out, err = self.cli("--apply")
        self.assertEqual(code, gc.EXIT_TERMINATED, err)
        self.assertRegex(err, r"interrupted: \d+ changes made, \d+ not")
        self.assertEqual(self.server.commands()[-1], "LOGOUT")
        self.assertEqual(self.second.commands(), [])            # two never started
        self.assertIn("  two: not started (stopped by a signal)", out)
        self.assertIn("exit 143", out)

    def test_renaming_a_table_keeps_its_marks_and_its_runs(self):
        code, out, err = self.cli("--apply")
        self.assertEqual((code, err), (0, ""))
        self.write_rules(*self.tables(one="renamed"))
        code, out, err = self.cli("--account", "renamed")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("INBOX: 0 messages examined", out)
        code, out, err = self.cli("history", "--account", "renamed")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(out.splitlines()), 1)
        self.assertIn("[one]", out)
        self.assertIn(f"127.0.0.1:{self.server.port}", out)
        code, out, err = self.cli("undo", "--account", "renamed", "--apply")
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(len(self.server.uids("INBOX")), 1)
        self.assertEqual(self.second.uids("INBOX"), [])           # two's run stays
        undo = [r for r in self.audit() if r.get("command") == "undo"]
        self.assertEqual({r.get("account_name") for r in undo}, {"renamed"})

    def test_undo_needs_one_account_and_history_lists_all(self):
        self.cli("--apply")
        code, out, err = self.cli("undo")
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("add --account NAME (one of one, two)", err)
        code, out, err = self.cli("undo", "--account", "one", "--account", "two")
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("undo works on one account: give --account once", err)
        code, out, err = self.cli("history")
        self.assertEqual(len(out.splitlines()), 2)
        code, out, err = self.cli("history", "--json", "--account", "two", IMAP_PASSWORD="x")
        (entry,) = [json.loads(line) for line in out.splitlines()]     # no secret needed
        self.assertEqual((entry["account_name"], entry["host"]),
                         ("two", f"127.0.0.1:{self.second.port}"))
        logins = (self.server.count("LOGIN"), self.second.count("LOGIN"))
        code, out, err = run_cli("suggest", "--rules", self.rules_path, "--account", "one",
                                 "--retries", "0", env=self.env)
        self.assertEqual(code, 0, err)
        self.assertEqual((self.server.count("LOGIN"), self.second.count("LOGIN")),
                         (logins[0] + 1, logins[1]))

    def test_account_option_without_tables_exits_2(self):
        with open(self.rules_path, "w") as handle:
            json.dump(EXAMPLE_DOC, handle)
        code, out, err = self.cli("--account", "one", "--user", USER)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("--account needs [[account]] tables", err)


@unittest.skipUnless(hasattr(signal, "SIGHUP") and os.name == "posix", "POSIX signals")
class SeveralAccountsWatchTest(TwoAccountsTestCase):
    """`watch` of both accounts at once: a thread and a connection each."""

    def setUp(self):
        super().setUp()
        patcher = mock.patch.object(gc, "IDLE_POLL", 0.02)
        patcher.start()
        self.addCleanup(patcher.stop)

    def watch(self, script: Callable[[], None], *extra: str, **env: str) -> Tuple[int, str, str]:
        """`watch` in this (main) thread while ``script`` drives it; then SIGTERM."""
        return while_driven(script, lambda: self.cli("watch", *extra, **env))

    def test_both_accounts_are_watched_at_once_and_stop_together(self):
        def script() -> None:
            wait_until(lambda: self.server.count("IDLE") and self.second.count("IDLE"),
                       timeout=15, message="not both idling")
            self.assertEqual((self.server.uids("INBOX"), self.second.uids("INBOX")), ([], []))
            self.server.add_message(make_message("receipt 6"))
            self.second.add_message(make_message("receipt 7"))
            wait_until(lambda: not self.server.uids("INBOX") and not self.second.uids("INBOX"),
                       timeout=15, message="new mail not classified in both")
            wait_until(lambda: self.server.count("IDLE") >= 2 and self.second.count("IDLE") >= 2,
                       timeout=15, message="not idling after the new mail")
            os.kill(os.getpid(), signal.SIGHUP)
            wait_until(lambda: self.server.count("IDLE") >= 3 and self.second.count("IDLE") >= 3,
                       timeout=15, message="not idling after SIGHUP")
        code, out, err = self.watch(script, "--apply", "--all")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.second.uids("Receipts")), 3)
        for server in (self.server, self.second):
            self.assertEqual(server.commands()[-1], "LOGOUT")
            self.assertIn(b"DONE", [line.strip() for line in server.raw_lines])
        self.assertIn("Account one:", out)
        self.assertIn("Account two:", out)
        # SIGHUP reloaded both accounts' rules, each line naming its account.
        self.assertIn("WARNING: one: rules reloaded from", err)
        self.assertIn("WARNING: two: rules reloaded from", err)
        runs = [r for r in self.audit() if r["type"] == "summary"]
        self.assertEqual({r["account_name"] for r in runs}, {"one", "two"})
        self.assertEqual({r["command"] for r in runs}, {"watch"})

    def test_a_refused_sign_in_ends_that_watch_only(self):
        def script() -> None:
            wait_until(lambda: self.server.count("IDLE"), timeout=15, message="one not idling")
            self.server.add_message(make_message("receipt 8"))
            wait_until(lambda: not self.server.uids("INBOX"), timeout=15,
                       message="one stopped with two")
        code, out, err = self.watch(script, "--apply", "--all", IMAP_PASSWORD_TWO="wrong")
        self.assertEqual(code, gc.EXIT_AUTH, err)
        self.assertIn("gmail_classify: two: ", err)
        self.assertEqual(len(self.second.uids("INBOX")), 2)

    def test_a_dry_run_names_the_account_of_each_message_line(self):
        # Both watches print into one stream, in whatever order their threads run.
        def script() -> None:
            wait_until(lambda: self.server.count("IDLE") and self.second.count("IDLE"),
                       timeout=15, message="not both idling")
        code, out, err = self.watch(script, "--all")
        self.assertEqual(code, 0, err)
        lines = [line for line in out.splitlines() if ": would " in line]
        self.assertEqual(sorted({line.split(" ", 1)[0] for line in lines}), ["[one]", "[two]"],
                         out)
        two = [line for line in lines if line.startswith("[two] ")]
        self.assertEqual(len(two), len(self.second.uids("INBOX")), out)
        self.assertTrue(all(line.startswith("[two] INBOX ") for line in two), out)
        self.assertEqual(self.second.count("UID MOVE") + self.server.count("UID MOVE"), 0)

    def test_an_account_without_state_is_refused_and_the_other_watched(self):
        code, out, err = self.cli("--apply", "--account", "one")
        self.assertEqual(code, 0, err)

        def script() -> None:
            wait_until(lambda: self.server.count("IDLE"), timeout=15, message="one not idling")
        code, out, err = self.watch(script, "--apply")
        self.assertEqual(code, gc.EXIT_USAGE, err)
        self.assertIn("gmail_classify: two: no state yet for INBOX", err)
        self.assertEqual(self.second.commands(), [])


# A program that reports how many copies of itself it saw running at once: each waits
# (up to argv[3] seconds) until argv[2] copies have started.
_CONCURRENCY_PROBE = r'''#!%s -IS
import os, sys, time
folder, target, patience = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
me = os.path.join(folder, "running-%%d" %% os.getpid())
open(me, "w").close()
deadline, seen = time.time() + patience, 1
while time.time() < deadline and seen < target:
    seen = max(seen, len([n for n in os.listdir(folder) if n.startswith("running-")]))
    time.sleep(0.005)
with open(os.path.join(folder, "seen"), "a") as log:
    log.write("%%d\n" %% seen)
os.remove(me)
'''


def watch_in_process(test: unittest.TestCase, argv: Sequence[str], script: Callable[[], None],
                     env: Optional[dict] = None) -> Tuple[int, str, str]:
    """`watch` in this (main) thread while ``script`` drives it from another; then SIGTERM
    (a watch stopped by it at a safe point exits 0)."""
    return while_driven(script, lambda: run_cli("watch", *argv, env=env))


class WatchJobsTest(FakeServerTest):
    """watch --jobs N: the rules' programs run up to N at once, as for run."""

    def setUp(self):
        super().setUp()
        os.chmod(self.tmp, 0o700)
        self.probe = os.path.join(self.tmp, "probe.py")
        with open(self.probe, "w") as handle:
            handle.write(_CONCURRENCY_PROBE % sys.executable)
        os.chmod(self.probe, 0o700)
        self.marks = os.path.join(self.tmp, "marks")
        os.mkdir(self.marks, 0o700)

    def watch(self, jobs: str, target: int, messages: int, patience: float = 2) -> List[int]:
        """The concurrency each program saw in a dry-run watch's first catch-up."""
        for index in range(messages):
            self.server.add_message(make_message(f"message {index}"))
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump({"rule": [{"name": "Ask", "program": [self.probe, self.marks, str(target),
                                                        str(patience)],
                                 "program_timeout": 10, "label": "Asked"}]}, handle)
        os.chmod(rules, 0o600)
        seen = os.path.join(self.marks, "seen")

        def counts() -> List[int]:
            if not os.path.exists(seen):
                return []
            with open(seen) as handle:
                return [int(line) for line in handle]
        code, out, err = watch_in_process(self, (
            "--rules", rules, "--user", USER, "--host", "127.0.0.1", "--port",
            str(self.server.port), "--plaintext", "--all", "--jobs", jobs),
            lambda: wait_until(lambda: len(counts()) == messages, timeout=15,
                               message="the programs did not all run"),
            env={"GMAIL_APP_PASSWORD": PASSWORD})
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.count("label Asked"), messages)
        return counts()

    def test_jobs_runs_that_many_programs_at_once(self):
        self.assertEqual(max(self.watch("3", target=3, messages=3)), 3)

    def test_one_job_runs_one_program_at_a_time(self):
        self.assertEqual(self.watch("1", target=2, messages=2, patience=0.2), [1, 1])
        self.assertEqual(os.listdir(self.marks), ["seen"])

    def test_jobs_below_one_is_refused_as_on_run(self):
        for command in ("run", "watch"):
            for jobs in ("0", "-2"):
                with self.subTest(command=command, jobs=jobs):
                    code, out, err = run_cli(command, "--user", USER, "--jobs", jobs)
                    self.assertEqual((code, out), (gc.EXIT_USAGE, ""))
                    self.assertIn("--jobs: ", err)
        self.assertEqual(self.commands(), [])


class AuthAccountTablesTest(FakeServerTest):
    """auth with [[account]] tables: --account NAME picks the one to sign in for, with its
    user and OAuth client; none (of several) or several is a usage error."""

    def setUp(self):
        super().setUp()
        self.google = FakeGoogle(self.server)
        self.addCleanup(self.google.stop)
        self.env = {"XDG_CONFIG_HOME": os.path.join(self.tmp, "config"), "DISPLAY": ":0"}
        for name, value in (("GOOGLE_AUTH_URL", self.google.auth_url),
                            ("GOOGLE_TOKEN_URL", self.google.token_url), ("OAUTH_WAIT", 5)):
            patcher = mock.patch.object(gc, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)
        self.rules = os.path.join(self.tmp, "rules.json")
        with open(self.rules, "w") as handle:
            json.dump(accounts_doc(
                {"name": "home", "user": "home@gmail.com", "oauth_client_id": "home-client",
                 "oauth_client_secret": "home-secret"},
                {"name": "work", "user": USER, "auth": "xoauth2", "host": "127.0.0.1",
                 "port": self.server.port, "tls": "plaintext", "oauth_client_id": CLIENT_ID,
                 "oauth_client_secret": CLIENT_SECRET}), handle)
        os.chmod(self.rules, 0o600)

    def auth(self, *extra: str, **env: str) -> Tuple[int, str, str]:
        with mock.patch.object(gc.webbrowser, "open", self.google.browse):
            return run_cli("auth", "--rules", self.rules, *extra, env=dict(self.env, **env))

    def token_files(self) -> List[str]:
        folder = os.path.join(self.tmp, "config", "gmail_classify", "tokens")
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []

    def test_several_tables_need_exactly_one_account(self):
        for extra, text in (((), "has 2 accounts; auth works on one: add --account NAME (one of "
                                 "home, work)"),
                            (("--account", "home", "--account", "work"), "give --account once"),
                            (("--account", "play"), "has no [[account]] named 'play'"),
                            (("--user", "x@gmail.com"), "add --account NAME")):
            with self.subTest(extra=extra):
                code, out, err = self.auth(*extra)
                self.assertEqual((code, out), (gc.EXIT_USAGE, ""))
                self.assertIn(text, err)
                self.assertEqual(len(err.splitlines()), 1, err)
        self.assertEqual((self.google.auth_requests, self.token_files()), ([], []))

    def test_the_account_named_signs_in_with_its_user_and_client_then_runs(self):
        code, out, err = self.auth("--account", "work")
        self.assertEqual((code, err), (0, ""))
        (request,) = self.google.auth_requests
        self.assertEqual((request["client_id"], request["login_hint"]), (CLIENT_ID, USER))
        self.assertIn(f"Signed in as {USER}.", out)
        self.assertIn(f"Try: python gmail_classify.py --rules {self.rules} --account work "
                      f"--auth xoauth2 labels", out)
        self.assertEqual(self.token_files(), [os.path.basename(
            mock.patch.dict(os.environ, self.env)(gc.token_path)(USER))])
        # the token is stored as for a single account: run --account work signs in with it
        self.server.add_message(make_message("receipt 1"))
        code, out, err = run_cli("run", "--rules", self.rules, "--account", "work",
                                 "--retries", "0", env=self.env)
        self.assertEqual(code, 0, err)
        self.assertIn("AUTHENTICATE", self.commands())

    def test_one_table_alone_needs_no_account_and_user_goes_with_account_only(self):
        with open(self.rules, "w") as handle:
            json.dump(accounts_doc({"name": "home", "oauth_client_id": CLIENT_ID,
                                    "oauth_client_secret": CLIENT_SECRET}), handle)
        code, out, err = self.auth(GMAIL_USER="env@gmail.com")
        self.assertEqual((code, out), (gc.EXIT_USAGE, ""))
        self.assertIn("account 'home' of", err)
        self.assertIn("has no user", err)
        code, out, err = self.auth("--user", "me@gmail.com")
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("--user would apply to every account", err)
        code, out, err = self.auth("--account", "home", "--user", "me@gmail.com")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([(r["client_id"], r["login_hint"]) for r in self.google.auth_requests],
                         [(CLIENT_ID, "me@gmail.com")])
        self.assertIn("Try: python gmail_classify.py --rules", out)

    def test_without_tables_or_a_user_it_says_how_to_name_one(self):
        with open(self.rules, "w") as handle:
            json.dump({"rule": [{"name": "R", "subject": "x", "star": True}]}, handle)
        code, out, err = self.auth("--client-secret-file", os.devnull)
        self.assertEqual((code, out), (gc.EXIT_USAGE, ""))
        self.assertEqual(err, "gmail_classify: no account given: pass --user you@gmail.com or "
                              "set GMAIL_USER\n")


class AccountRulesFileReloadTest(TwoAccountsTestCase):
    """watch reloads an [[account]] whose `rules` is a file of its own when that file
    changes, and only that account; a broken new file keeps its old rules."""

    def setUp(self):
        super().setUp()
        patcher = mock.patch.object(gc, "IDLE_POLL", 0.02)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.own = os.path.join(self.tmp, "two.json")
        self.write_own({"rule": [{"name": "Receipts", "subject": "receipt", "move": "Receipts"}]})
        tables = self.tables()
        tables[1]["rules"] = "two.json"
        self.write_rules(*tables)

    def write_own(self, doc: Any) -> None:
        # Whole at once, as an editor saves: a watch that looks between an open("w") and
        # its write would see an empty file and say so once more than the test expects.
        with open(self.own + ".new", "w") as handle:
            handle.write(doc if isinstance(doc, str) else json.dumps(doc))
        os.replace(self.own + ".new", self.own)

    def subjects_in(self, folder: str) -> List[str]:
        if folder not in self.second.folder_names():
            return []
        return sorted(str(email.message_from_bytes(m.raw)["Subject"])
                      for m in self.second.messages(folder))

    def test_the_accounts_own_file_reloads_that_account_and_a_broken_one_keeps_its_rules(self):
        def idling(count: int) -> None:
            wait_until(lambda: self.server.count("IDLE") >= count and
                       self.second.count("IDLE") >= count, timeout=15, message="not idling")

        def script() -> None:
            idling(1)
            self.assertEqual(self.subjects_in("Receipts"), ["receipt 2"])
            idles = self.second.count("IDLE")
            self.write_own({"rule": [{"name": "Invoices", "subject": "invoice", "move": "Invoices"},
                                     {"name": "Hello", "subject": "hello", "move": "Hello"}]})
            self.second.deliver(make_message("invoice 4"))
            wait_until(lambda: self.subjects_in("Invoices") == ["invoice 4"],
                       timeout=15, message="the account's new rules were not used")
            wait_until(lambda: self.second.count("IDLE") > idles, timeout=15,
                       message="that wake-up did not end")
            self.write_own('{"rule": [')          # broken: the rules before it stay
            self.second.deliver(make_message("invoice 5"))
            wait_until(lambda: len(self.subjects_in("Invoices")) == 2, timeout=15,
                       message="the account's old rules were not kept")

        code, out, err = watch_in_process(self, ("--rules", self.rules_path, "--retries", "0",
                                                 "--apply", "--all"), script, env=self.env)
        self.assertEqual(code, 0, err)
        lines = err.splitlines()
        self.assertEqual([line for line in lines if "rules reloaded" in line],
                         [f"WARNING: two: rules reloaded from {self.own}: 2 rules"])
        (invalid,) = [line for line in lines if "not valid" in line]
        self.assertTrue(invalid.startswith("ERROR: two: the rules file changed but is not valid"),
                        invalid)
        self.assertIn(self.own, invalid)
        self.assertEqual(self.subjects_in("Hello"), [])
        self.assertEqual(self.second.count("LOGIN"), 1)        # reloaded, never reconnected
        self.assertEqual(self.server.uids("INBOX"), [])         # the other account as before


class SharedCommandPathsTest(TempDirMixin, unittest.TestCase):
    """Paths several commands now share (_say_error, _emit_rules), checked to the byte."""

    def test_an_error_is_one_line_and_a_traceback_only_with_verbose(self):
        missing = os.path.join(self.make_dir(), "none.toml")
        code, out, err = run_cli("check", missing)
        self.assertEqual((code, out), (gc.EXIT_USAGE, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("gmail_classify: ") and missing in err, err)
        code, out, err = run_cli("-v", "check", missing)
        self.assertEqual(code, gc.EXIT_USAGE)
        self.assertIn("Traceback", err)
        self.assertTrue(err.splitlines()[-1].startswith("gmail_classify: "), err)

    def test_a_bug_is_one_line_that_points_at_verbose(self):
        path = os.path.join(self.make_dir(), "rules.json")
        with open(path, "w") as handle:
            json.dump(SIEVE_DOC, handle)
        with mock.patch.object(gc, "load_rules", side_effect=ValueError("boom")):
            code, out, err = run_cli("check", path)
        self.assertEqual((code, out), (gc.EXIT_ERROR, ""))
        self.assertEqual(err, "gmail_classify: unexpected error: ValueError: boom (run with -v "
                              "for details)\n")

    def test_export_to_a_file_says_how_many_rules_in_which_format(self):
        tmp = self.make_dir()
        path, target = os.path.join(tmp, "rules.json"), os.path.join(tmp, "out.json")
        with open(path, "w") as handle:
            json.dump(SIEVE_DOC, handle)
        code, out, err = run_cli("export", path, "--format", "json", "-o", target)
        self.assertEqual((code, out, err),
                         (0, "", f"wrote {target}: {len(SIEVE_DOC['rule'])} rules as json\n"))
        code, out, err = run_cli("export", path, "--format", "json", "-o", target, "--force",
                                 "-q")
        self.assertEqual((code, out, err), (0, "", ""))
        with open(target) as handle:
            self.assertEqual(len(json.load(handle)["rules"]), len(SIEVE_DOC["rule"]))

    def test_log_level_follows_quiet_and_the_verbose_count(self):
        path = os.path.join(self.make_dir(), "rules.json")
        with open(path, "w") as handle:
            json.dump(SIEVE_DOC, handle)
        logger = logging.getLogger("gmail_classify")
        self.addCleanup(logger.setLevel, logger.level)
        for flags, level in ((["-q"], logging.ERROR), ([], logging.WARNING),
                             (["-v"], logging.INFO), (["-vv"], logging.DEBUG),
                             (["-vvv"], logging.DEBUG), (["-q", "-vv"], logging.ERROR)):
            with self.subTest(flags=flags):
                code, _out, err = run_cli(*flags, "check", path)
                self.assertEqual((code, logger.level), (0, level), err)


# --- Across the sections: every server kind ----------------------------------------------


class ServerKindsTest(AnyServerTest):
    # Where each kind keeps things (server names).
    EXPECTED = {
        "move": ("Receipts/2024", "Archive", "Lists", "Trash"),
        "uidplus": ("Receipts/2024", "Archive", "Lists", "Trash"),
        "neither": ("Receipts/2024", "Archive", "Lists", "Trash"),
        "no-special-use": ("Receipts/2024", "Archives", "Lists", "Deleted Items"),
        "inbox-prefix": ("INBOX.Receipts.2024", "INBOX.Archive", "INBOX.Lists", "INBOX.Trash"),
    }

    def test_every_kind_sorts_the_mailbox_and_a_second_run_changes_nothing(self):
        rules = gc.parse_rules(KIND_RULES, "rules.json")
        for kind in SERVER_KINDS:
            with self.subTest(kind=kind):
                server = self.serve(kind)
                ids = self.seed()
                conn = self.connect()
                allow = kind == "neither"
                dry = gc.classify_folder(conn, rules, "INBOX", allow_expunge=allow)
                self.assertEqual(self.writes(), set())
                report = gc.classify_folder(conn, rules, "INBOX", apply=True, allow_expunge=allow)
                self.assertEqual(report.created, dry.created)
                self.assertEqual(report.skipped, [])
                self.assertEqual(self.subjects("INBOX"), ["Lunch?", "Statement"])
                self.assertIn("\\Flagged", server.message(ids["bank"]).flags)
                if kind == "gmail":
                    self.assertEqual(server.message(ids["receipt"]).labels, {"Receipts/2024"})
                    self.assertEqual(server.message(ids["list"]).labels, {"Lists"})
                    self.assertIn("\\Trash", server.message(ids["spam"]).labels)
                else:
                    label, archive, lists, trash = self.EXPECTED[kind]
                    self.assertEqual(report.created, [lists, label])
                    self.assertEqual(self.subjects(label), ["Your receipt #1"])   # a copy
                    self.assertEqual(self.subjects(archive), ["Your receipt #1"])
                    self.assertEqual(self.subjects(lists), ["Digest"])
                    self.assertEqual(self.subjects(trash), ["Win!"])
                # Never a bare EXPUNGE, except where explicitly allowed and checked first.
                self.assertEqual("EXPUNGE" in self.commands(), kind == "neither")
                start = len(server.log)
                again = gc.classify_folder(conn, rules, "INBOX", apply=True, allow_expunge=allow)
                later = {e.command for e in server.log[start:]}
                self.assertEqual(later & (WRITE_COMMANDS - {"SELECT"}), set())
                self.assertEqual(again.changes, {})

    def test_neither_refuses_before_any_change_and_the_dry_run_says_the_same(self):
        self.serve("neither")
        self.seed()
        before = [(m.msgid, frozenset(m.flags)) for m in self.server.messages("INBOX")]
        code, out, err = self.cli("--apply")
        self.assertEqual(code, gc.EXIT_SERVER)
        self.assertIn("neither MOVE nor UIDPLUS", err)
        self.assertIn("--allow-expunge", err)
        self.assertIn("nothing was changed", err)
        self.assertEqual(self.writes(), set())          # not even the star or the label copy
        self.assertNotIn("SELECT", self.commands())
        self.assertEqual([(m.msgid, frozenset(m.flags)) for m in self.server.messages("INBOX")],
                         before)
        dry_code, dry_out, dry_err = self.cli()
        self.assertEqual((dry_code, errors(dry_err)), (code, errors(err)))
        self.assertNotIn("would", dry_out)

    def test_neither_with_allow_expunge_marks_exactly_those_then_checks_then_expunges(self):
        self.serve("neither")
        for index in range(3):
            self.server.add_message(make_message(f"receipt {index}"))
        conn = self.connect()
        conn.select("INBOX")
        result = conn.move([1, 2], "Archive", allow_expunge=True)
        self.assertEqual(sorted(result.moved), [1, 2])
        self.assertEqual(self.server.uids("INBOX"), [3])
        self.assertEqual(self.subjects("Archive"), ["receipt 0", "receipt 1"])
        wire = b"".join(e.line for e in self.server.log)
        copy_at = wire.index(b"UID COPY 1:2 Archive")
        store_at = wire.index(b"UID STORE 1:2 +FLAGS.SILENT (\\Deleted)")
        check_at = wire.rindex(b"UID SEARCH DELETED")
        expunge_at = wire.index(b" EXPUNGE\r\n")
        self.assertLess(copy_at, store_at)
        self.assertLess(store_at, check_at)
        self.assertLess(check_at, expunge_at)
        self.assertNotIn("UID EXPUNGE", self.commands())

    def test_plain_expunge_after_a_drop_is_checked_again_and_not_repeated_blindly(self):
        for when, expunges in (("after", 1), ("before", 2)):
            with self.subTest(when=when):
                self.serve("neither")
                for index in range(2):
                    self.server.add_message(make_message(f"receipt {index}"))
                conn = self.connect()
                conn.select("INBOX")
                self.server.add_fault("EXPUNGE", action="drop", when=when)
                result = conn.move([1, 2], "Archive", allow_expunge=True)
                self.assertEqual(sorted(result.moved), [1, 2])
                self.assertEqual(self.server.uids("INBOX"), [])
                self.assertEqual(self.subjects("Archive"), ["receipt 0", "receipt 1"])
                self.assertEqual(self.server.count("EXPUNGE"), expunges)
        self.server.add_message(make_message("receipt 2"))
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("EXPUNGE", action="drop", count=10)
        with self.assertRaises(gc.ConnectionLostError) as ctx:
            conn.move(conn.search(), "Archive", allow_expunge=True)
        self.assertIn("EXPUNGE kept failing", str(ctx.exception))

    def test_allow_expunge_refuses_when_another_message_is_marked_deleted(self):
        self.serve("neither")
        self.seed()
        other = self.server.add_message(make_message("someone else's"), flags=("\\Deleted",))
        for extra in ((), ("--apply",)):
            with self.subTest(extra=extra):
                code, _, err = self.cli("--allow-expunge", *extra)
                self.assertEqual(code, gc.EXIT_SERVER)
                self.assertIn("marked \\Deleted", err)
                self.assertIn("nothing was changed", err)
        self.assertEqual(self.writes(), set())
        self.assertIn(other, [m.msgid for m in self.server.messages("INBOX")])
        conn = self.connect()
        conn.select("INBOX")
        with self.assertRaises(gc.CapabilityError):
            conn.move([1], "Archive", allow_expunge=True)
        self.assertNotIn("UID COPY", self.commands())
        self.assertNotIn("EXPUNGE", self.commands())

    def test_a_marked_message_in_any_folder_of_the_run_refuses_before_the_first_change(self):
        self.serve("neither")
        self.seed()
        self.server.add_message(make_message("digest 2"), folder="Lists", flags=("\\Deleted",))
        code, _, err = self.cli("--allow-expunge", "--apply", "--folder", "INBOX", "--folder", "Lists")
        self.assertEqual(code, gc.EXIT_SERVER)
        self.assertIn("refusing to move messages out of Lists", err)
        self.assertEqual(self.writes(), set())
        self.assertNotIn("SELECT", self.commands())

    # Issue 15, item 8: without UIDPLUS nothing closes the gap between UID SEARCH DELETED
    # and EXPUNGE; another client acting in it is seen afterwards and reported.

    def test_plain_expunge_counts_what_it_removed_and_finds_ours_that_stayed(self):
        for action, size in (("mark_deleted", 3), ("unmark_deleted", 0)):
            with self.subTest(action=action):
                self.serve("neither")
                for index in range(3):
                    self.server.add_message(make_message(f"receipt {index}"))
                conn = self.connect()
                conn.select("INBOX")
                self.server.add_fault("EXPUNGE", action=action, size=size)
                with self.assertLogs("gmail_classify", "WARNING") as logs:
                    result = conn.move([1, 2], "Archive", allow_expunge=True)
                self.assertEqual(len(self.server.other_client), 1)
                self.assertEqual(self.subjects("Archive"), ["receipt 0", "receipt 1"])
                if action == "mark_deleted":
                    # UID 3 was not ours: deleted for good, and said so.
                    self.assertEqual((sorted(result.moved), result.stayed,
                                      result.others_expunged), ([1, 2], (), 1))
                    self.assertEqual(self.server.uids("INBOX"), [])
                    self.assertIn("1 other message marked \\Deleted by another client was "
                                  "deleted for good", "\n".join(logs.output))
                else:
                    # Ours at UID 1 lost its flag: it stayed, and is not reported as moved.
                    self.assertEqual((sorted(result.moved), result.stayed,
                                      result.others_expunged), ([2], (1,), 0))
                    self.assertEqual(self.server.uids("INBOX"), [1, 3])
                    self.assertIn("UID 1 stayed in INBOX", "\n".join(logs.output))
                wire = [e.line for e in self.server.log]
                expunge_at = wire.index(next(l for l in wire if l.endswith(b" EXPUNGE\r\n")))
                self.assertTrue(wire[expunge_at + 1].endswith(b" UID SEARCH UID 1:2\r\n"),
                                wire[expunge_at + 1])

    def test_plain_expunge_without_a_race_warns_of_nothing(self):
        self.serve("neither")
        for index in range(3):
            self.server.add_message(make_message(f"receipt {index}"))
        conn = self.connect()
        conn.select("INBOX")
        with mock.patch.object(gc.log, "warning") as warning:
            result = conn.move([1, 2], "Archive", allow_expunge=True)
        self.assertEqual((sorted(result.moved), result.stayed, result.others_expunged),
                         ([1, 2], (), 0))
        warning.assert_not_called()

    def test_a_message_of_ours_left_by_the_expunge_holds_the_mark_back(self):
        self.serve("neither")
        self.seed()
        self.server.add_fault("EXPUNGE", action="unmark_deleted")   # the first move: Lists
        rules = gc.parse_rules(KIND_RULES, "rules.json")
        with self.assertLogs("gmail_classify", "WARNING"):
            report = gc.classify_folder(self.connect(), rules, "INBOX", apply=True,
                                        allow_expunge=True)
        self.assertEqual(self.server.other_client, [("unmark_deleted", "INBOX", 2)])
        self.assertEqual((report.expunge_stayed, report.others_expunged), ([2], 0))
        self.assertEqual(report.mark, 1)            # UID 2 is not done: the next run looks again
        self.assertNotIn("move to Lists", report.changes)
        self.assertEqual(report.changes["trash"], 1)
        self.assertEqual(self.subjects("INBOX"), ["Digest", "Lunch?", "Statement"])

    def test_cli_exits_6_naming_what_the_expunge_did_for_either_race(self):
        for action, size in (("mark_deleted", 6), ("unmark_deleted", 0)):
            with self.subTest(action=action):
                self.serve("neither")
                self.seed()
                other = self.server.add_message(make_message("someone else's"))   # UID 6
                self.server.add_fault("EXPUNGE", action=action, size=size)
                code, out, err = self.cli("--apply", "--allow-expunge")
                self.assertEqual(code, gc.EXIT_INCOMPLETE, err)
                self.assertIn("the plain EXPUNGE did not do what was expected", err)
                self.assertIn("run again", err)
                if action == "mark_deleted":
                    self.assertIn("1 other message marked \\Deleted by another client was "
                                  "deleted for good", err)
                    with self.assertRaises(KeyError):
                        self.server.message(other)
                else:
                    self.assertIn("UID 2 stayed in INBOX", err)
                    self.assertIn("a copy is in Lists too", err)
                    self.assertIn("Digest", self.subjects("INBOX"))

    def test_kind_table_builds_what_it_says(self):
        caps = {}
        for kind in SERVER_KINDS:
            server = self.serve(kind)
            conn = self.connect()
            caps[kind] = conn.capabilities
            names = {f.name for f in conn.list_folders()}
            if kind == "inbox-prefix":
                self.assertEqual(conn.namespace(), ("INBOX.", "."))
                self.assertIn("INBOX.Trash", names)
            if kind == "no-special-use":
                self.assertFalse(any(f.special_use for f in conn.list_folders()))
        self.assertIn("X-GM-EXT-1", caps["gmail"])
        self.assertTrue({"MOVE", "UIDPLUS"} <= caps["move"])
        self.assertEqual(({"MOVE", "UIDPLUS"} & caps["uidplus"]), {"UIDPLUS"})
        self.assertEqual(({"MOVE", "UIDPLUS"} & caps["neither"]), set())
        self.assertNotIn("SPECIAL-USE", caps["no-special-use"])
        with self.assertRaises(ValueError):
            FakeGmail(kind="exchange")
        with self.assertRaises(ValueError):
            FakeGmail(quirks=["made-up"])


# --- Across the sections: a fault, a signal or a closed output at every step -------------


# The fault-injection sweep: an --apply is cut at every command of the run (the default
# suite: a dense sample; GMAIL_CLASSIFY_SWEEP=full: every command, both before and after
# the server executes it, over a larger mailbox), then run again without faults; the final
# mailbox and state must equal those of a run that was never cut.
SWEEP_FULL = os.environ.get("GMAIL_CLASSIFY_SWEEP", "") == "full"


class FaultSweepTest(StateTestCase):
    messages = 240 if SWEEP_FULL else 12
    batch_size = 8 if SWEEP_FULL else 3
    apply_every = 2
    # Full: every command, cut both before and after the server executes it.  Default:
    # every command too, but cut either before or after it, alternating.
    every = 1 if SWEEP_FULL else 2

    def sweep(self, **server_options: Any) -> Tuple[int, int]:
        clean = FakeGmail(**server_options).start()
        self.addCleanup(clean.stop)
        seed_mailbox(clean, self.messages)
        clean_dir = os.path.join(self.tmp, "clean")
        self.run_once(server=clean, state_dir=clean_dir, batch_size=self.batch_size,
                      apply_every=self.apply_every)
        total = len(clean.log)
        expected_box = mailbox_snapshot(clean)
        expected_state = list(state_snapshot(clean_dir)["accounts"].values())
        cuts = 0
        for nth in range(1, total + 1):
            for when in ("before", "after"):
                if (nth + (when == "after")) % self.every:
                    continue
                with self.subTest(nth=nth, when=when, command=clean.log[nth - 1].command):
                    cuts += 1
                    server = FakeGmail(**server_options).start()
                    try:
                        seed_mailbox(server, self.messages)
                        state_dir = os.path.join(self.tmp, f"cut-{nth}-{when}")
                        server.add_fault(None, nth=nth, action="drop", when=when)
                        try:
                            self.run_once(server=server, state_dir=state_dir, retries=0,
                                          batch_size=self.batch_size,
                                          apply_every=self.apply_every)
                        except gc.GmailClassifyError:
                            pass
                        self.assertTrue(server.fired, "the cut never happened")
                        self.run_once(server=server, state_dir=state_dir,
                                      batch_size=self.batch_size, apply_every=self.apply_every)
                        self.assertEqual(mailbox_snapshot(server), expected_box)
                        self.assertEqual(list(state_snapshot(state_dir)["accounts"].values()),
                                         expected_state)
                        self.assertEqual(server.errors, [])
                        # The audit log holds no change twice.
                        seen = collections.Counter(
                            (r["message_id"], gc.describe_change(c))
                            for r in gc.AuditLog(Path(state_dir) / "gmail_classify" / "audit.jsonl").records()
                            if r["type"] == "message" for c in r["changes"])
                        self.assertEqual([k for k, n in seen.items() if n > 1], [])
                    finally:
                        server.stop()
                        shutil.rmtree(os.path.join(self.tmp, f"cut-{nth}-{when}"),
                                      ignore_errors=True)
        if SWEEP_FULL:
            sys.stderr.write(f"[{cuts} cut points over {total} commands, "
                             f"{self.messages} messages] ")
        return cuts, total

    def setUp(self):
        super().setUp()
        # Durability is not what this test is about, and ~300 fsyncs would dominate it.
        patcher = mock.patch("os.fsync")
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_gmail_cut_anywhere_then_rerun_equals_a_clean_run(self):
        cuts, total = self.sweep()
        self.assertEqual(cuts, 2 * total // self.every)
        self.assertGreater(total, 25)

    def test_plain_server_cut_anywhere_then_rerun_equals_a_clean_run(self):
        cuts, total = self.sweep(gmail=False)
        self.assertEqual(cuts, 2 * total // self.every)
        self.assertGreater(total, 25)


# The signal sweep: a real `run --apply` in a subprocess gets SIGINT or SIGTERM when the
# fake server receives one of its commands (before answering it) or has answered it; it
# must end at a safe point, say what it did, leave a run that `history` shows, and die
# by the signal; a rerun must then leave what a run never stopped leaves.  The default
# suite takes a sample of the commands; GMAIL_CLASSIFY_SWEEP=full every one, both sides,
# both signals, over a larger mailbox.  The subprocess applies every 2 batches of 3, as
# the fault sweep does (the command line has no option for it: a two-line shim sets it).
_SIGNAL_SHIM = (
    "import sys; sys.path.insert(0, sys.argv[1]); import gmail_classify as gc\n"
    "classify = gc.Run.classify\n"
    "gc.Run.classify = lambda self, *a, **k: classify(self, *a, **dict(k, apply_every=2))\n"
    "getattr(gc, '_exit_program', sys.exit)(gc.main(sys.argv[2:]))\n")
_WRITE_COMMANDS = {"UID STORE", "UID COPY", "UID MOVE", "UID EXPUNGE", "EXPUNGE", "CREATE",
                   "DELETE", "STORE", "COPY", "MOVE"}
_INTERRUPTED_RE = re.compile(r"interrupted: (\d+) changes made, (\d+) not; run again to finish")


@unittest.skipUnless(os.name == "posix", "POSIX signals")
class SignalSweepTest(StateTestCase):
    messages = 240 if SWEEP_FULL else 12
    batch_size = 8 if SWEEP_FULL else 3

    def setUp(self):
        super().setUp()
        self.rules = os.path.join(self.tmp, "rules.json")
        with open(self.rules, "w") as handle:
            json.dump(SWEEP_DOC, handle)

    def argv(self, server: FakeGmail, *extra: str) -> List[str]:
        return ["run", "--apply", "--batch-size", str(self.batch_size), "--user", USER,
                "--host", "127.0.0.1", "--port", str(server.port), "--plaintext",
                "--rules", self.rules, *extra]

    def env(self, state: str) -> Dict[str, str]:
        return {"GMAIL_APP_PASSWORD": PASSWORD, "XDG_STATE_HOME": state,
                "XDG_CONFIG_HOME": os.path.join(self.tmp, "config")}

    def in_process(self, state: str, *argv: str) -> Tuple[int, str, str]:
        classify = gc.Run.classify

        def every_two(run: gc.Run, *args: Any, **kwargs: Any) -> gc.FolderReport:
            return classify(run, *args, **dict(kwargs, apply_every=2))

        with mock.patch.object(gc.Run, "classify", every_two):
            return run_cli(*argv, env=self.env(state))

    def signalled(self, server: FakeGmail, state: str, nth: int, when: str,
                  signum: int, *extra: str) -> subprocess.CompletedProcess:
        """The subprocess's run, with ``signum`` sent to it at the nth command."""
        pid: List[int] = []
        server.add_fault(None, nth=nth, action="call", when=when,
                         callback=lambda: os.kill(pid[0], signum))
        env = dict(os.environ, **self.env(state))
        env.pop("GMAIL_OAUTH_TOKEN", None)
        here = os.path.dirname(os.path.abspath(gc.__file__))
        process = subprocess.Popen([sys.executable, "-c", _SIGNAL_SHIM, here,
                                    *self.argv(server, *extra)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pid.append(process.pid)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        out, err = process.communicate(timeout=60)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def history(self, state: str) -> List[Dict[str, Any]]:
        code, out, err = run_cli("history", "--json", env=self.env(state))
        self.assertEqual(code, 0, err)
        return [json.loads(line) for line in out.splitlines()]

    def clean(self, **server_options: Any) -> Tuple[FakeGmail, Any, Any, int]:
        """An uninterrupted run: its server, final mailbox and state, and where in its log
        (1-based) the last write command is."""
        clean = FakeGmail(**server_options).start()
        self.addCleanup(clean.stop)
        seed_mailbox(clean, self.messages)
        state = os.path.join(self.tmp, "clean")
        code, _, err = self.in_process(state, *self.argv(clean))
        self.assertEqual(code, 0, err)
        last_write = max(i for i, e in enumerate(clean.log, 1) if e.command in _WRITE_COMMANDS)
        return (clean, mailbox_snapshot(clean),
                list(state_snapshot(os.path.join(state, "gmail_classify"))["accounts"].values()),
                last_write)

    def cut_points(self, total: int, last_write: int) -> List[Tuple[int, str, int]]:
        """(nth, when, signal): full: every command, both sides, both signals; else four
        cuts spread up to the last write command (later ones are the late-signal test's),
        both sides and both signals."""
        signals = (signal.SIGINT, signal.SIGTERM)
        if SWEEP_FULL:
            return [(nth, when, signum) for nth in range(1, total + 1)
                    for when in ("before", "after") for signum in signals]
        picks = sorted({max(1, round(last_write * k / 4)) for k in range(1, 5)})
        return [(nth, ("before", "after")[i % 2], signals[i // 2 % 2])
                for i, nth in enumerate(picks)]

    def check_cut(self, server: FakeGmail, state: str, nth: int, when: str, signum: int,
                  last_write: int, clean_log: Sequence[Any] = ()) -> Dict[str, Any]:
        """One cut: exit status, printed counts, history.  Returns the run's history entry
        (its status says whether the signal found a safe point before the work was done).
        ``clean_log``: the uninterrupted run's commands, where a flight of writes sent
        together (_WriteFlight) is an unbroken stretch of writes (and STATUS)."""
        done = self.signalled(server, state, nth, when, signum)
        self.assertTrue(server.fired, "the signal was never sent")
        self.assertNotIn("Traceback", done.stderr)
        self.assertNotIn("unexpected error", done.stderr)
        entries = self.history(state)
        counted = _INTERRUPTED_RE.search(done.stderr)
        if not entries and counted and counted.groups() == ("0", "0"):
            # Stopped while signing in or looking around: nothing was planned or done,
            # so nothing was applied and history has no run to show.
            entries = [{"run": None, "status": "interrupted", "changes_made": 0}]
        (entry,) = entries
        # After the last write command was sent, no safe point is left: the run ends as
        # if no signal had come.  Before it, one is.  A signal sent after an answer may
        # land a few commands later (the client reads on meanwhile): either, consistently.
        if nth >= last_write:
            expected = [0]
        elif when == "before":
            expected = [-signum]
        else:
            expected = [-signum, 0]
        self.assertIn(done.returncode, expected, done.stderr)
        if done.returncode == 0:
            self.assertIsNone(counted, done.stderr)
            self.assertEqual(entry["status"], "complete")
            self.assertIn("changes made.", done.stdout)
        else:
            self.assertIsNotNone(counted, done.stderr)
            self.assertEqual(entry["status"], "interrupted")
            self.assertEqual(entry["changes_made"], int(counted.group(1)))
            self.assertNotIn("changes made.", done.stdout)   # the report: finished runs
            # Nothing was sent after the signal but what the run needs to end: the
            # command it had in flight, at most a FETCH already on the way, and the end.
            # A flight's writes went out together, before the signal: the rest of the
            # stretch the clean run sent with the nth command, and nothing after it.
            after = [e.command for e in server.log[nth:]]
            stretch = list(itertools.takewhile(lambda c: c in _WRITE_COMMANDS | {"STATUS"},
                                               [e.command for e in clean_log[nth:]]))
            self.assertLessEqual(len([c for c in after if c in _WRITE_COMMANDS]),
                                 max(1, len([c for c in stretch if c in _WRITE_COMMANDS])),
                                 after)
            self.assertEqual(after[-1:], ["LOGOUT"])
        return entry

    def sweep(self, **server_options: Any) -> int:
        clean, expected_box, expected_state, last_write = self.clean(**server_options)
        cuts = self.cut_points(len(clean.log), last_write)
        interrupted = 0
        for nth, when, signum in cuts:
            with self.subTest(nth=nth, when=when, signal=signal.Signals(signum).name,
                              command=clean.log[nth - 1].command):
                server = FakeGmail(**server_options).start()
                self.addCleanup(server.stop)
                seed_mailbox(server, self.messages)
                state = os.path.join(self.tmp, f"cut-{nth}-{when}-{signum}")
                entry = self.check_cut(server, state, nth, when, signum, last_write,
                                       clean.log)
                interrupted += entry["status"] == "interrupted"
                code, _, err = self.in_process(state, *self.argv(server))
                self.assertEqual(code, 0, err)
                self.assertEqual(mailbox_snapshot(server), expected_box)
                self.assertEqual(list(state_snapshot(os.path.join(
                    state, "gmail_classify"))["accounts"].values()), expected_state)
                self.assertEqual(server.errors, [])
                server.stop()
                shutil.rmtree(state, ignore_errors=True)
        if SWEEP_FULL:
            sys.stderr.write(f"[{len(cuts)} signal cuts over {len(clean.log)} commands, "
                             f"{interrupted} interrupted] ")
        return interrupted

    def test_gmail_signal_anywhere_then_rerun_equals_a_clean_run(self):
        self.assertGreater(self.sweep(), 2)

    @unittest.skipUnless(SWEEP_FULL, "GMAIL_CLASSIFY_SWEEP=full")
    def test_plain_server_signal_anywhere_then_rerun_equals_a_clean_run(self):
        self.assertGreater(self.sweep(gmail=False), 2)

    def test_undo_after_a_signal_restores_the_mailbox_exactly(self):
        """Every change an interrupted run made is in the audit log, so undo takes it all
        back (on servers with MOVE or UIDPLUS)."""
        for options in ({}, {"gmail": False}):
            clean, _, _, last_write = self.clean(**options)
            # Default: one cut in the middle of the run on each kind of server.
            picks = range(1, last_write) if SWEEP_FULL else [last_write // 2 + len(options)]
            for nth in picks:
                for when in ("before", "after") if SWEEP_FULL else ("before",):
                    with self.subTest(nth=nth, when=when, **options,
                                      command=clean.log[nth - 1].command):
                        server = FakeGmail(**options).start()
                        self.addCleanup(server.stop)
                        seed_mailbox(server, self.messages)
                        start = mailbox_snapshot(server)
                        state = os.path.join(self.tmp, f"undo-{nth}-{when}-{len(options)}")
                        entry = self.check_cut(server, state, nth, when, signal.SIGTERM,
                                               last_write, clean.log)
                        if entry["run"] is None:
                            self.assertEqual(mailbox_snapshot(server), start)
                            continue
                        code, out, err = self.in_process(
                            state, "undo", entry["run"], "--apply", *self.argv(server)[4:])
                        self.assertEqual(code, 0, err)
                        self.assertEqual(mailbox_snapshot(server), start)
                        server.stop()

    def test_a_signal_after_the_last_change_leaves_the_normal_exit_code(self):
        clean, expected_box, _, last_write = self.clean()
        for nth, when in ((last_write, "after"), (len(clean.log), "before")):
            with self.subTest(nth=nth, when=when, command=clean.log[nth - 1].command):
                server = FakeGmail().start()
                self.addCleanup(server.stop)
                seed_mailbox(server, self.messages)
                state = os.path.join(self.tmp, f"late-{nth}-{when}")
                entry = self.check_cut(server, state, nth, when, signal.SIGINT, last_write)
                self.assertEqual(entry["status"], "complete")
                self.assertEqual(mailbox_snapshot(server), expected_box)

    @unittest.skipUnless(hasattr(signal, "SIGHUP") and os.path.isdir("/proc/self/task"),
                         "no SIGHUP, or no /proc to find the shell's child")
    def test_sighup_stops_a_run_like_sigint_and_the_shell_sees_129(self):
        clean, _, _, last_write = self.clean()
        nth = last_write // 2
        # Through a shell, as a user or a script sees it: 128 + 1.  The shell's child is
        # the program, found when the fault fires.
        server = FakeGmail().start()
        self.addCleanup(server.stop)
        seed_mailbox(server, self.messages)
        shell: List[subprocess.Popen] = []
        server.add_fault(None, nth=nth, action="call", callback=lambda: os.kill(
            self._children(shell[0].pid)[0], signal.SIGHUP))
        here = os.path.dirname(os.path.abspath(gc.__file__))
        state = os.path.join(self.tmp, "hup-shell")
        env = dict(os.environ, **self.env(state))
        shell.append(subprocess.Popen(
            ["sh", "-c", '"$@" 2>/dev/null; echo "exit $?"', "sh", sys.executable, "-c",
             _SIGNAL_SHIM, here, *self.argv(server)], env=env, stdout=subprocess.PIPE,
            text=True))
        self.addCleanup(lambda: shell[0].poll() is None and shell[0].kill())
        out, _ = shell[0].communicate(timeout=60)
        self.assertTrue(server.fired)
        self.assertEqual(out.strip().splitlines()[-1], "exit 129")
        (entry,) = self.history(state)
        self.assertEqual(entry["status"], "interrupted")
        self.assertGreater(entry["changes_made"], 0)

    @staticmethod
    def _children(pid: int) -> List[int]:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as handle:
                return [int(n) for n in handle.read().split()]
        except OSError:
            return []


class ClosedOutputTest(StateTestCase):
    """Every subcommand with a standard output nobody reads (``| head`` that has read
    enough, a terminal that hung up): no traceback, no "unexpected error", nothing on
    stderr; an --apply does all its work and records it; the exit code is what the work
    earned, 141 for data output, 0 for a listing that stopped early."""

    def setUp(self):
        super().setUp()
        seed_mailbox(self.server, 12)
        self.rules = self.write("rules.json", json.dumps(SWEEP_DOC))
        self.state = os.path.join(self.tmp, "state-home")

    def write(self, name: str, text: Any) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as handle:
            handle.write(text.encode() if isinstance(text, str) else text)
        return path

    def connection(self) -> List[str]:
        return ["--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                "--plaintext", "--rules", self.rules]

    def closed_stdout(self, *argvs: List[str], unbuffered: bool = False,
                      stderr_too: bool = False, password: str = PASSWORD) -> List[Tuple[int, str]]:
        """The program run once per argv, side by side, each with a pipe for stdout whose
        read end is already closed, so that even its first line cannot get through.
        Buffered (as usual): the error comes with a flush, up to the one at exit;
        ``unbuffered``: with the first write; ``stderr_too``: stderr is such a pipe as well.
        Returns (exit status, stderr) of each."""
        env = dict(os.environ, GMAIL_APP_PASSWORD=password, XDG_STATE_HOME=self.state,
                   XDG_CONFIG_HOME=os.path.join(self.tmp, "config"))
        env.pop("GMAIL_OAUTH_TOKEN", None)
        env.pop("PYTHONUNBUFFERED", None)
        if unbuffered:
            env["PYTHONUNBUFFERED"] = "1"
        # The module imported (its compiled copy is cached), then the program's own exit.
        here = os.path.dirname(os.path.abspath(gc.__file__))
        shim = ("import sys; sys.path.insert(0, sys.argv[1]); import gmail_classify as gc; "
                "getattr(gc, '_exit_program', sys.exit)(gc.main(sys.argv[2:]))")
        processes = []
        for argv in argvs:
            read, write = os.pipe()
            os.close(read)
            try:
                processes.append(subprocess.Popen(
                    [sys.executable, "-c", shim, here, *argv], stdout=write,
                    stderr=write if stderr_too else subprocess.PIPE,
                    stdin=subprocess.DEVNULL, env=env, text=True))
            finally:
                os.close(write)
        results = []
        for process in processes:
            self.addCleanup(lambda p=process: p.poll() is None and p.kill())
            _, err = process.communicate(timeout=60)
            results.append((process.returncode, err or ""))
        return results

    def cases(self) -> List[Tuple[str, List[str], int]]:
        client = self.write("client.json", json.dumps({"installed": {
            "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}}))
        mail = self.write("one.eml", make_message("receipt 1"))
        filters = self.write("mailFilters.xml", filter_export(
            [("from", "alerts@bank.example"), ("label", "Bank")]))
        conn = self.connection()
        return [
            ("demo", ["demo"], 0),
            ("check", ["check", self.rules], 0),
            ("test", ["test", self.rules, mail], 0),
            ("init", ["init", os.path.join(self.tmp, "new-rules.toml")], 0),
            ("import-filters", ["import-filters", filters], 141),
            ("labels", ["labels", *conn], 0),
            ("folders", ["folders", *conn], 0),
            ("doctor", ["doctor", *conn], 0),
            ("suggest", ["suggest", *conn], 141),
            ("run", ["run", *conn], 0),                                 # a dry run
            ("run", ["run", "--json", *conn], 141),
            ("run", ["run", "--apply", *conn], 0),
            ("history", ["history"], 0),
            ("undo", ["undo", *conn], 0),                               # a dry run
            ("watch", ["watch", "--new-only", *conn], 0),               # a dry run
            ("auth", ["auth", "--user", USER, "--client-secret-file", client,
                      "--no-browser"], 141),
            ("export", ["export", self.rules, "--format", "json"], 141),
            ("why", ["why", mail, "--rules", self.rules], 0),
            ("diff", ["diff", self.rules, self.rules, mail, "--json"], 141),
            ("learn", ["learn", "-q", *conn], 0),   # nothing to learn: no rules written
        ]

    def test_every_command_with_a_closed_stdout_ends_quietly(self):
        cases = self.cases()
        self.assertEqual({name for name, _, _ in cases}, set(gc._COMMANDS))
        before = mailbox_snapshot(self.server)
        # Side by side, but the --apply alone (the others read the mailbox it changes),
        # and what reads the audit log after the --apply that writes it.
        applying = [case for case in cases if "--apply" in case[1]]
        later = [case for case in cases if case[0] in ("history", "undo")]
        first = [case for case in cases if case not in later and case not in applying]
        results = []
        for wave in (first, applying, later):
            results += zip(wave, self.closed_stdout(*[argv for _, argv, _ in wave]))
        for (name, argv, expected), (code, err) in results:
            with self.subTest(argv=argv[:2]):
                self.assertEqual((code, err), (expected, ""))
        # The --apply was made and recorded in full, although nobody saw it.
        self.assertNotEqual(mailbox_snapshot(self.server), before)
        code, out, err = run_cli("history", "--json", env={"XDG_STATE_HOME": self.state})
        (entry,) = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(entry["status"], "complete")
        self.assertGreater(entry["changes_made"], 0)
        self.assertEqual(self.mark().mark, 12)

    def mark(self, folder: str = "INBOX", state_dir: Optional[str] = None) -> Optional[gc.FolderState]:
        return super().mark(folder, os.path.join(self.state, "gmail_classify"))

    def test_a_listing_stops_at_the_first_line_nobody_reads(self):
        # Its first line (the rules in force) fails: a dry run goes no further.
        self.assertEqual(self.closed_stdout(["run", *self.connection()], unbuffered=True),
                         [(0, "")])
        self.assertEqual(self.server.commands(), [])

    def test_a_closed_stderr_too_leaves_the_exit_code_of_the_error(self):
        # A refused password: its line (and -v's traceback) has nowhere to go; the exit
        # code still says what happened, and nothing crashes on the way out.
        results = self.closed_stdout(["run", "-v", *self.connection()], stderr_too=True,
                                     password="wrong" * 4)
        self.assertEqual(results, [(gc.EXIT_AUTH, "")])
        self.assertEqual(self.server.count("LOGIN"), 1)

    def test_output_that_goes_away_mid_run_is_dropped_and_the_apply_goes_on(self):
        out = gc._Output(io.StringIO(), keep_going=True)
        broken = gc._Output(mock.Mock(**{"write.side_effect": BrokenPipeError(errno.EPIPE, "x"),
                                         "fileno.side_effect": OSError}), keep_going=True)
        self.assertEqual(broken.write("abc"), 3)
        self.assertTrue(broken.gone)
        broken.flush()
        self.assertFalse(broken.isatty())
        listing = gc._Output(mock.Mock(**{"flush.side_effect": OSError(errno.EIO, "hung up"),
                                          "fileno.side_effect": OSError}), keep_going=False)
        with self.assertRaises(gc._OutputClosed):
            listing.flush()
        self.assertTrue(listing.gone)
        with self.assertRaises(gc._OutputClosed):
            listing.write("more")
        other = gc._Output(mock.Mock(**{"write.side_effect": OSError(errno.ENOSPC, "full")}),
                           keep_going=True)
        with self.assertRaises(OSError):
            other.write("x")                # a full disk is not a reader that went away
        self.assertFalse(other.gone)
        out.write("kept\n")
        self.assertFalse(out.gone)


# --- Across the sections: what broken copies of the module showed nobody checked ---------


class MutationGapTest(FakeServerTest):
    """Behaviours that hand-made broken copies of the module showed nobody was checking."""

    def run_rules(self, rule: Dict[str, Any], *extra: str) -> Tuple[int, str, str]:
        rules = os.path.join(self.tmp, "rules.json")
        with open(rules, "w") as handle:
            json.dump({"rule": [dict(name="R", **rule)]}, handle)
        return run_cli("--user", USER, "--host", "127.0.0.1", "--port", str(self.server.port),
                       "--plaintext", "--retries", "0", "--rules", rules, *extra,
                       env={"GMAIL_APP_PASSWORD": PASSWORD})

    def test_an_unsolicited_fetch_for_another_uid_never_reaches_the_results(self):
        for n in range(3):
            self.server.add_message(make_message(f"m{n}"))
        conn = self.connect()
        conn.select("INBOX")
        self.server.add_fault("UID FETCH", action="unsolicited",
                              text="* 2 FETCH (UID 2 FLAGS (\\Seen))\r\n* 3 FETCH (UID 3 FLAGS ())")
        result = conn.fetch([1], ["FLAGS"])
        self.assertEqual(sorted(result), [1])
        self.assertEqual(result[1]["FLAGS"], ())

    def test_plaintext_injected_after_starttls_is_refused_before_signing_in(self):
        server = FakeGmail(starttls=True).start()
        self.addCleanup(server.stop)
        server.add_fault("STARTTLS", action="starttls_inject")
        conn = gc.GmailConnection(USER, password=PASSWORD, host="localhost", port=server.port,
                                  security="starttls", cafile=write_ca_file(self.tmp),
                                  keepalive=None, retries=0, timeout=5)
        with self.assertRaises(gc.TLSError) as ctx:
            conn.connect()
        self.assertIn("injection", str(ctx.exception))
        self.assertNotIn("LOGIN", server.commands())
        self.assertFalse(any(PASSWORD.encode() in line for line in server.raw_lines))

    def test_the_real_uid_set_limit_keeps_lines_under_gmails(self):
        conn = self.connect()
        conn.select("INBOX")
        sparse = list(range(1, 40000, 2))   # 20,000 UIDs that compress to nothing
        self.assertEqual(conn.fetch(sparse, ["FLAGS"]), {})
        lines = [e.line for e in self.server.log if e.command == "UID FETCH"]
        self.assertGreaterEqual(len(lines), 14)
        self.assertTrue(all(len(line) <= GMAIL_MAX_LINE for line in lines))
        self.assertTrue(all(len(line) > GMAIL_MAX_LINE // 2 for line in lines[:-1]))
        self.assertEqual(self.server.long_lines, [])

    def test_backoff_has_jitter_and_a_cap(self):
        port = self.server.port
        self.server.add_fault("LOGIN", action="drop", count=100)   # a flaky server: retried
        for rng, first in ((lambda: 0.0, 0.5), (lambda: 1.0, 1.0), (lambda: 0.5, 0.75)):
            with self.subTest(first=first):
                sleep = Recorder()
                conn = gc.GmailConnection(USER, password=PASSWORD, host="127.0.0.1", port=port,
                                          security="plaintext", keepalive=None, retries=1,
                                          backoff=1.0, sleep=sleep, rng=rng)
                with self.assertRaises(gc.ConnectionLostError):
                    conn.connect()
                self.assertEqual(sleep.delays, [first])
        sleep = Recorder()
        conn = gc.GmailConnection(USER, password=PASSWORD, host="127.0.0.1", port=port,
                                  security="plaintext", keepalive=None, retries=4, backoff=20,
                                  sleep=sleep, rng=lambda: 1.0)
        with self.assertRaises(gc.ConnectionLostError):
            conn.connect()
        self.assertEqual(sleep.delays, [20, 40, gc.MAX_BACKOFF, gc.MAX_BACKOFF])
        self.assertEqual(gc.MAX_BACKOFF, 60.0)

    def test_keepalive_waits_its_interval_and_its_default_beats_gmails_idle_drop(self):
        self.assertGreaterEqual(gc.DEFAULT_KEEPALIVE, 60)
        self.assertLessEqual(gc.DEFAULT_KEEPALIVE, 25 * 60)   # Gmail drops idle at ~30 min
        default = gc.GmailConnection(USER, password=PASSWORD, host="127.0.0.1",
                                     security="plaintext")
        self.assertEqual(default.keepalive, gc.DEFAULT_KEEPALIVE)
        conn = self.connect(keepalive=0.6)
        conn.noop()
        sent = time.monotonic()
        wait_until(lambda: self.server.count("NOOP") >= 2)
        self.assertGreaterEqual(time.monotonic() - sent, 0.55)

    def test_regex_flags_combine(self):
        ruleset = one_rule(body="/^total: \\d+$/im")
        self.assertTrue(hit(ruleset, info("Subject: x", body="Hello\nTOTAL: 42\nbye")))
        self.assertFalse(hit(one_rule(body="/^total: \\d+$/i"),
                             info("Subject: x", body="Hello\nTOTAL: 42\nbye")))
        self.assertFalse(hit(one_rule(body="/^total: \\d+$/m"),
                             info("Subject: x", body="Hello\nTOTAL: 42\nbye")))

    def test_plain_matches_normalise_whitespace(self):
        ruleset = one_rule(subject="your   order\tshipped")
        self.assertTrue(hit(ruleset, info("Subject: Your order  shipped today")))
        self.assertTrue(hit(one_rule(subject="order shipped"),
                            info("Subject: Order\t\tSHIPPED")))

    def test_spaces_stay_in_passwords_that_are_not_app_passwords(self):
        self.server.users[USER] = "correct horse battery"
        conn = self.connect(password="correct horse battery")
        self.assertTrue(conn.connected)
        self.assertEqual(gc._clean_password("abcd efgh ijkl mnop"), "abcdefghijklmnop")
        self.assertEqual(gc._clean_password("abc defgh ijkl mnop"), "abc defgh ijkl mnop")
        self.assertIn(b'"correct horse battery"', [e.line for e in self.server.log
                                                   if e.command == "LOGIN"][0])

    def test_password_sources_follow_the_documented_order(self):
        # Checked where the order is decided, without a connection per source: the
        # command line's option, then the environment, then the rules' password_command,
        # then ~/.netrc.
        home = os.path.join(self.tmp, "home")
        os.mkdir(home)
        with open(os.path.join(home, ".netrc"), "w") as handle:
            handle.write(f"machine 127.0.0.1 login {USER} password from-netrc\n")
        os.chmod(os.path.join(home, ".netrc"), 0o600)
        scripts = {}
        for name in ("option", "rules"):
            scripts[name] = os.path.join(self.tmp, f"{name}.sh")
            with open(scripts[name], "w") as handle:
                handle.write(f"#!/bin/sh\necho from-{name}-command\n")
            os.chmod(scripts[name], 0o700)
        # Run through /bin/sh, not exec'd directly: a script just written can be "busy"
        # (ETXTBSY) while another thread of the suite forks.
        account = {"password_command": ["/bin/sh", scripts["rules"]]}
        argv = ["run", "--user", USER, "--host", "127.0.0.1", "--plaintext"]
        cases = [(["--password-command", "/bin/sh " + scripts["option"]],
                  {"GMAIL_APP_PASSWORD": "from-env"},
                  account, "from-option-command"),
                 ([], {"GMAIL_APP_PASSWORD": "from-env"}, account, "from-env"),
                 ([], {}, account, "from-rules-command"),
                 ([], {}, {}, "from-netrc")]
        for extra, env, table, expected in cases:
            with self.subTest(expected=expected):
                args = gc.build_parser().parse_args(argv + extra)
                environ = {"HOME": home, "PATH": os.environ.get("PATH", ""), **env}
                with mock.patch.dict(os.environ, environ, clear=True):
                    settings = gc._connection_settings(args, table)
                self.assertEqual(settings["password"], expected)

    def test_a_group_readable_netrc_is_refused(self):
        home = os.path.join(self.tmp, "home")
        os.mkdir(home)
        path = os.path.join(home, ".netrc")
        with open(path, "w") as handle:
            handle.write(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
        for mode, code in ((0o640, gc.EXIT_USAGE), (0o604, gc.EXIT_USAGE), (0o600, 0)):
            with self.subTest(mode=oct(mode)):
                os.chmod(path, mode)
                result, _, err = run_cli("--user", USER, "--host", "127.0.0.1", "--port",
                                         str(self.server.port), "--plaintext", "--retries", "0",
                                         env={"HOME": home})
                self.assertEqual(result, code, err)

    def test_unstar_and_mark_unread_remove_the_flags(self):
        self.server.add_message(make_message("starred and read"), flags=("\\Flagged", "\\Seen"))
        code, _, err = self.run_rules({"subject": "starred", "unstar": True, "mark_unread": True},
                                      "--apply")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.server.messages("INBOX")[0].flags, set())
        stores = [e.line for e in self.server.log if e.command == "UID STORE"]
        self.assertTrue(any(b"-FLAGS.SILENT (\\Flagged)" in line for line in stores), stores)
        self.assertTrue(any(b"-FLAGS.SILENT (\\Seen)" in line for line in stores), stores)
        self.assertFalse(any(b"+FLAGS" in line for line in stores), stores)

    def test_limit_takes_the_newest_messages(self):
        for n in range(5):
            self.server.add_message(make_message(f"receipt {n}"))
        code, out, err = self.run_rules({"subject": "receipt", "star": True}, "--limit", "2")
        self.assertEqual(code, 0, err)
        fetches = [e.line for e in self.server.log if e.command == "UID FETCH"]
        self.assertEqual(len(fetches), 1)
        self.assertIn(b" UID FETCH 4:5 ", fetches[0])
        self.assertIn("INBOX 5:", out)
        self.assertNotIn("INBOX 1:", out)

    def test_a_literal_shorter_than_announced_is_a_protocol_error(self):
        with self.assertRaisesRegex(gc.ProtocolError, "shorter than announced"):
            gc.parse_response(b"1 FETCH (UID 1 BODY[] {10}\r\nabc)")
        self.assertEqual(gc.parse_response(b"1 FETCH (BODY[] {3}\r\nabc)"),
                         [1, "FETCH", ["BODY[]", b"abc"]])

    def test_a_bracket_inside_a_quoted_response_code_argument(self):
        table = [(b'[BADCHARSET ("a]b" UTF-8)] no', ("BADCHARSET", [["a]b", "UTF-8"]], "no")),
                 (b'[X-NOTE "we]ird" 3] text', ("X-NOTE", ["we]ird", 3], "text")),
                 (b'[PERMANENTFLAGS (\\Seen $a]b \\*)] Flags', ("PERMANENTFLAGS",
                                                               [["\\Seen", "$a]b", "\\*"]], "Flags"))]
        for raw, expected in table:
            with self.subTest(raw=raw):
                self.assertEqual(gc.parse_status_text(raw), expected)

    def test_del_in_folder_names_is_encoded_not_sent_raw(self):
        self.assertEqual(gc.encode_mailbox("a\x7fb"), "a&AH8-b")
        self.assertEqual(gc.mailbox_arg("a\x7fb"), b"a&AH8-b")
        self.assertEqual(gc.decode_mailbox("a&AH8-b"), "a\x7fb")
        self.assertEqual(gc.astring("a\x7fb"), b'"a\x7fb"')


# --- Across the sections: the README's examples, run as written --------------------------


@unittest.skipUnless(os.path.exists(README_PATH), "README.md is not beside the tests")
class ReadmeExamplesTest(unittest.TestCase):
    """The README's Python examples, run as written against the fake Gmail."""

    def blocks(self) -> List[str]:
        with open(README_PATH, encoding="utf-8") as fh:
            return re.findall(r"```python\n(.*?)```", fh.read(), re.S)

    def run_block(self, code: str, server: "FakeGmail") -> str:
        real = gc.GmailConnection

        class ToTheFake(real):   # the example's account, on the fake server
            def __init__(self, user: str, **options: Any) -> None:
                super().__init__(user, host="127.0.0.1", port=server.port,
                                 security="plaintext", keepalive=None, retries=0, **options)

        shim = types.ModuleType("gmail_classify")
        shim.__dict__.update({name: getattr(gc, name) for name in gc.__all__})
        shim.GmailConnection = ToTheFake
        out = io.StringIO()
        state = tempfile.mkdtemp(dir=_STATE_ROOT.name)
        with mock.patch.dict(sys.modules, {"gmail_classify": shim}), \
                mock.patch.dict(os.environ, {"GMAIL_APP_PASSWORD": PASSWORD,
                                             "XDG_STATE_HOME": state}), \
                mock.patch("sys.stdout", out):
            exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
        return out.getvalue()

    def test_every_example_runs_and_only_the_marked_one_changes_mail(self):
        # The watch example runs forever; ReadmeWatchExampleTest runs it.
        blocks = [block for block in self.blocks()
                  if "Watcher(" not in block and "add_condition" not in block]
        self.assertEqual(len(blocks), 3)
        server = FakeGmail(users={"you@gmail.com": PASSWORD}).start()
        self.addCleanup(server.stop)
        server.add_message(make_message("Your receipt 42"))
        server.add_message(make_message("Invoice due", sender="Billing <billing@example.com>"))
        before = [(m.labels, m.flags) for m in server.messages("INBOX")]

        shown = self.run_block(blocks[0], server)
        self.assertEqual(shown, "2 messages; {'label Receipts': 2}\n"
                                "1 unread bills; 0 old messages with attachments\n")
        self.assertEqual([(m.labels, m.flags) for m in server.messages("INBOX")], before)
        self.assertFalse({"SELECT", "UID STORE", "UID MOVE", "UID COPY"} & set(server.commands()))
        self.assertIn("EXAMINE", server.commands())

        shown = self.run_block(blocks[1], server)
        self.assertEqual(shown, "{'label Receipts': 2}\n")
        self.assertEqual(len(server.messages("INBOX")), 1)   # the bill left the Inbox
        bill = [m for m in server.messages("[Gmail]/All Mail") if "Bills" in m.labels]
        self.assertEqual(len(bill), 1)
        self.assertIn("Receipts", bill[0].labels)

        after = [(m.labels, m.flags) for m in server.messages("[Gmail]/All Mail")]
        shown = self.run_block(blocks[2], server)           # a Run, dry: nothing left to do
        self.assertEqual(shown, "1 {}\n")
        self.assertEqual([(m.labels, m.flags) for m in server.messages("[Gmail]/All Mail")],
                         after)

    def test_the_add_condition_example_finds_bulk_mail(self):
        (block,) = [block for block in self.blocks() if "add_condition" in block]
        server = FakeGmail(users={"you@gmail.com": PASSWORD}).start()
        self.addCleanup(server.stop)
        server.add_message(make_message("Weekly digest", extra="Precedence: bulk\n"))
        server.add_message(make_message("Lunch?"))
        with mock.patch.dict(gc._CONDITION_KINDS):
            shown = self.run_block(block, server)
        self.assertEqual(shown, "{'label Bulk': 1}\n")
        self.assertNotIn("is_bulk", gc._CONDITION_KINDS)
        fetches = [e.line for e in server.log if e.command == "UID FETCH"]
        self.assertTrue(any(b"PRECEDENCE" in line for line in fetches), fetches)
        self.assertFalse({"SELECT", "UID STORE"} & set(server.commands()))


class ReadmeWatchExampleTest(FakeServerTest):
    """The README's watch example, run as written against the fake server."""

    def test_watch_example_reports_new_mail(self):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
        if not os.path.exists(path):    # a bare copy (vendored, or a mutation run)
            self.skipTest("README.md is not beside the tests")
        with open(path, encoding="utf-8") as handle:
            (code,) = [block for block in re.findall(r"```python\n(.*?)```", handle.read(), re.S)
                       if "Watcher(" in block]
        server = FakeGmail(users={"you@gmail.com": PASSWORD}).start()
        self.addCleanup(server.stop)
        server.add_message(make_message("Your receipt 1"))          # older: left alone
        real_connection, real_watcher = gc.GmailConnection, gc.Watcher

        class ToTheFake(real_connection):
            def __init__(self, user: str, **options: Any) -> None:
                options.update(host="127.0.0.1", port=server.port, security="plaintext",
                               keepalive=None)
                super().__init__(user, **options)

        class TwoWakeUps(real_watcher):       # new mail after the first, Ctrl-C after the second
            def _wake(self, conn: Any, folders: List[str]) -> None:
                super()._wake(conn, folders)
                if self.wakeups == 1:
                    server.deliver(make_message("Your receipt 2"))
                elif self.wakeups == 2:
                    raise KeyboardInterrupt

        shim = types.ModuleType("gmail_classify")
        shim.__dict__.update({name: getattr(gc, name) for name in gc.__all__})
        shim.GmailConnection, shim.Watcher = ToTheFake, TwoWakeUps
        out = io.StringIO()
        with mock.patch.dict(sys.modules, {"gmail_classify": shim}), \
                mock.patch.dict(os.environ, {"GMAIL_APP_PASSWORD": PASSWORD,
                                             "XDG_STATE_HOME": self.tmp}), \
                mock.patch("sys.stdout", out), mock.patch.object(gc, "IDLE_POLL", 0.02):
            exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
        self.assertEqual(out.getvalue(), "Your receipt 2\n")
        self.assertEqual(server.commands()[-1], "LOGOUT")
        self.assertNotIn("SELECT", server.commands())               # a dry run: EXAMINE only


# --- Live tests against a real server (opt-in) -------------------------------------------


# The fake server is only as faithful as what we know, so the end-to-end behaviour can also
# be run against a real account.  Meant for a DEDICATED TEST ACCOUNT: the tests append,
# flag, copy, move and trash messages, but only in scratch folders (and labels) with a
# unique name, and clean up by the UIDs of the messages they created.  Opt in with:
#
#   GMAIL_CLASSIFY_LIVE=1  GMAIL_CLASSIFY_LIVE_HOST=imap.gmail.com
#   GMAIL_CLASSIFY_LIVE_USER=test@gmail.com
#   GMAIL_CLASSIFY_LIVE_PASSWORD_COMMAND="pass show test-app-password"   (or _PASSWORD_FILE,
#       a file only you can read, or _PASSWORD; never a prompt)
#   optional: GMAIL_CLASSIFY_LIVE_PORT, GMAIL_CLASSIFY_LIVE_SECURITY (tls, starttls, or
#       plaintext to a loopback host), GMAIL_CLASSIFY_LIVE_CAFILE
#
# then run: python -m unittest -v test_gmail_classify.LiveServerTest

LIVE_PREFIX = "GMAIL_CLASSIFY_LIVE"


def _live_settings() -> Dict[str, Any]:
    """Connection settings from the environment; raises unittest.SkipTest saying why not."""
    env = os.environ
    if env.get(LIVE_PREFIX) != "1":
        raise unittest.SkipTest(f"live tests are opt-in: set {LIVE_PREFIX}=1 with "
                                f"{LIVE_PREFIX}_HOST, _USER and a password source, for a "
                                f"dedicated test account (see the README)")
    host, user = env.get(LIVE_PREFIX + "_HOST"), env.get(LIVE_PREFIX + "_USER")
    if not host or not user:
        raise unittest.SkipTest(f"{LIVE_PREFIX}=1 but {LIVE_PREFIX}_HOST or _USER is not set")
    command = env.get(LIVE_PREFIX + "_PASSWORD_COMMAND")
    path = env.get(LIVE_PREFIX + "_PASSWORD_FILE")
    if command:
        result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
        password = result.stdout.splitlines()[0] if result.stdout.strip() else ""
    elif path:
        with open(path, encoding="utf-8") as handle:
            password = handle.readline().rstrip("\r\n")
    else:
        password = env.get(LIVE_PREFIX + "_PASSWORD", "")
    if not password:
        raise unittest.SkipTest(f"no password: set {LIVE_PREFIX}_PASSWORD_COMMAND, "
                                f"_PASSWORD_FILE or _PASSWORD (the tests never prompt)")
    security = env.get(LIVE_PREFIX + "_SECURITY", "tls")
    port = env.get(LIVE_PREFIX + "_PORT")
    return dict(user=user, host=host, password=password, security=security,
                port=int(port) if port else None, cafile=env.get(LIVE_PREFIX + "_CAFILE"))


class LiveServerTest(unittest.TestCase):
    """End-to-end against a real server, in scratch folders; skipped unless opted in."""

    @classmethod
    def setUpClass(cls):
        cls.settings = _live_settings()

    def setUp(self):
        self.token = "gct-" + uuid.uuid4().hex[:10]
        self.conn = gc.GmailConnection(self.settings["user"], password=self.settings["password"],
                                       host=self.settings["host"], port=self.settings["port"],
                                       security=self.settings["security"],
                                       cafile=self.settings["cafile"], timeout=30, keepalive=None)
        self.conn.connect()
        self.addCleanup(self.conn.close)
        self.scratch = self.conn.server_name(f"gmail_classify-test-{self.token}")
        self.created: List[str] = []
        self.addCleanup(self.clean_up)
        self.make_folder(self.scratch)

    # -- helpers (a second, plain imaplib client: independent of the code under test) --

    def side_client(self) -> imaplib.IMAP4:
        s = self.settings
        context = ssl.create_default_context(cafile=s["cafile"]) if s["cafile"] else \
            ssl.create_default_context()
        if s["security"] == "tls":
            client = imaplib.IMAP4_SSL(s["host"], s["port"] or 993, ssl_context=context)
        else:
            client = imaplib.IMAP4(s["host"], s["port"] or 143)
            if s["security"] == "starttls":
                client.starttls(context)
        client.login(s["user"], s["password"])
        return client

    def make_folder(self, name: str) -> str:
        self.conn.create_folder(name)
        self.created.append(name)
        return name

    def append(self, subject: str, sender: str = "Alice <alice@example.com>",
               folder: Optional[str] = None) -> None:
        raw = make_message(subject, sender=sender, extra=f"X-Gmail-Classify-Test: {self.token}\n")
        client = self.side_client()
        try:
            # Scratch names are atoms (ASCII, no spaces), so any imaplib version sends them as is.
            typ, data = client.append(folder or self.scratch, None, None, raw)
            self.assertEqual(typ, "OK", data)
        finally:
            client.logout()

    def ours(self) -> List[str]:
        return ["HEADER", "X-Gmail-Classify-Test", self.token]

    def clean_up(self) -> None:
        """Delete exactly the messages this test created (found by its unique header),
        wherever they went, then the scratch folders."""
        conn = self.conn
        conn.list_folders(refresh=True)
        trash = conn.special_folder("\\Trash")
        places = list(reversed(self.created))
        if conn.is_gmail:
            places = [conn.special_folder("\\All").name]
        for folder in places + ([trash.name] if trash else []):
            try:
                conn.select(folder)
                uids = conn.search(self.ours())
                if not uids:
                    continue
                if conn.is_gmail and folder != (trash.name if trash else None):
                    conn.move(uids, trash.name)       # Gmail: delete = move to Trash first
                    continue
                conn.add_flags(uids, ["\\Deleted"])
                if conn.has("UIDPLUS"):
                    conn.uid_expunge(uids)
                elif set(conn.search(["DELETED"])) == set(uids):
                    conn._call("EXPUNGE")        # only ours are marked: exactly them go
            except gc.ImapError:
                continue
        for folder in sorted(self.created, key=len, reverse=True):
            try:
                conn._call("DELETE", conn._mailbox(folder))
            except gc.ImapError:
                pass

    # -- the tests --

    def test_sign_in_capabilities_and_namespace(self):
        self.assertIn("IMAP4REV1", self.conn.capabilities)
        prefix, delimiter = self.conn.namespace()
        self.assertTrue(delimiter)
        self.assertTrue(self.scratch.startswith(prefix))

    def test_create_and_list_non_ascii_names(self):
        name = self.make_folder(self.conn.server_name(f"gmail_classify-test-{self.token}/Entwürfe 日本"))
        names = {f.name for f in self.conn.list_folders(refresh=True)}
        self.assertIn(name, names)
        self.assertIn("Entwürfe 日本", name)

    def test_append_search_fetch_flags_copy_move_and_trash(self):
        for subject in ("live one", "live two", "live three"):
            self.append(subject)
        conn = self.conn
        conn.select(self.scratch)
        uids = conn.search(self.ours())
        self.assertEqual(len(uids), 3)
        item = "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"
        fetched = conn.fetch(uids, ["FLAGS", item, "RFC822.SIZE"])
        self.assertEqual(sorted(parse_headers(v[item])["Subject"] for v in fetched.values()),
                         ["live one", "live three", "live two"])
        self.assertTrue(all("\\Seen" not in v["FLAGS"] for v in fetched.values()))
        conn.add_flags(uids[:1], ["\\Flagged"])
        self.assertIn("\\Flagged", conn.fetch(uids[:1], ["FLAGS"])[uids[0]]["FLAGS"])
        conn.remove_flags(uids[:1], ["\\Flagged"])
        self.assertNotIn("\\Flagged", conn.fetch(uids[:1], ["FLAGS"])[uids[0]]["FLAGS"])
        other = self.make_folder(conn.server_name(f"gmail_classify-test-{self.token}-copies"))
        if conn.is_gmail:
            conn.add_labels(uids[:1], [other])
        else:
            conn.copy(uids[:1], other)
        allow = not conn.can_move()
        if allow:   # neither MOVE nor UIDPLUS: refused unless allowed (safe in a scratch folder)
            with self.assertRaises(gc.CapabilityError):
                conn.move(uids[1:2], other)
        moved = conn.move(uids[1:2], other, allow_expunge=allow)
        self.assertEqual(list(moved.moved), uids[1:2])
        trash = conn.special_folder("\\Trash")
        self.assertIsNotNone(trash)
        conn.move(uids[2:], trash.name, allow_expunge=allow)
        self.assertEqual(conn.search(self.ours()), uids[:1])
        conn.examine(other)
        self.assertEqual(len(conn.search(self.ours())), 2)

    def test_idle_wakes_up_on_new_mail(self):
        if not self.conn.has("IDLE"):
            self.skipTest("the server has no IDLE")
        self.conn.select(self.scratch)
        worker = threading.Thread(target=lambda: (wait_until(lambda: self.conn._proto.idling, timeout=20),
                                                  self.append("live idle")), daemon=True)
        worker.start()
        events = self.conn.idle(timeout=60)
        worker.join(30)
        self.assertTrue(any(len(e) >= 2 and str(e[1]).upper() == "EXISTS" for e in events), events)

    def test_classify_run_with_apply(self):
        self.append("live receipt 1")
        self.append("live receipt 2")
        self.append("live hello", sender="Bob <bob@example.com>")
        target = f"gmail_classify-test-{self.token}/Receipts"
        self.created.append(self.conn.server_name(target))
        rules = gc.parse_rules({"rule": [
            {"name": "Receipts", "subject": "live receipt", "move": target, "star": True}]},
            "live.json")
        allow = not self.conn.can_move()
        if allow:
            for apply in (False, True):     # the dry run refuses just as --apply does
                with self.assertRaises(gc.CapabilityError):
                    gc.classify_folder(self.conn, rules, self.scratch, apply=apply)
        dry = gc.classify_folder(self.conn, rules, self.scratch, allow_expunge=allow)
        self.assertEqual(dry.changes, {"star": 2, f"move to {target}": 2})
        report = gc.classify_folder(self.conn, rules, self.scratch, apply=True,
                                    allow_expunge=allow)
        self.assertEqual(report.skipped, [])
        self.assertEqual(report.created, [self.conn.server_name(target)])
        self.conn.examine(self.conn.server_name(target))
        moved = self.conn.search(self.ours())
        self.assertEqual(len(moved), 2)
        flags = self.conn.fetch(moved, ["FLAGS"])
        self.assertTrue(all("\\Flagged" in v["FLAGS"] for v in flags.values()))
        again = gc.classify_folder(self.conn, rules, self.scratch, apply=True,
                                   allow_expunge=allow)
        self.assertEqual(again.changes, {})


# --- Benchmark ---------------------------------------------------------------------------

# ``python test_gmail_classify.py bench [--messages N] [--latency-ms MS] [--apply] [--profile]
# [--host H --port P --user U]`` measures the classify pipeline (never part of the unittest
# run).  The mailbox is built in a FakeGmail that runs in its own process; a delay line (its
# own process too) adds the latency to every chunk each way; each size runs in a fresh client
# process, so CPU seconds and peak memory are the client's alone.  Each run shows two
# clients side by side on the same mailbox: the floor (a client that knows every answer,
# see _bench_floor) and ours (the command line's ``run``), each of ours as a ratio to the
# floor of the same run, and whether both left the same mailbox.  Against a real server
# (--host, with --rules, --refill, --maildir and --truth) the --refill command puts the
# corpus back before each client; the password comes from BENCH_PASSWORD.


def _bench_maildir(path: str, count: int) -> None:
    """Write the corpus as a Maildir (for a local Dovecot), all messages unread."""
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    for n, (raw, date) in enumerate(bench_corpus(count), 1):
        name = os.path.join(path, "cur", "%d.bench%d:2," % (int(date.timestamp()), n))
        with open(name, "wb") as fh:
            fh.write(raw)
        os.utime(name, (date.timestamp(), date.timestamp()))


def _bench_serve(argv: List[str]) -> int:
    """Child process: a FakeGmail holding the corpus; prints its port, runs until stdin closes."""
    import argparse
    parser = argparse.ArgumentParser(prog="bench-serve")
    parser.add_argument("--messages", type=int, required=True)
    args = parser.parse_args(argv)
    server = FakeGmail()
    for raw, date in bench_corpus(args.messages):
        server.add_message(raw, date=date)
    server.start()
    print("PORT %d" % server.port, flush=True)
    sys.stdin.read()
    server.stop()
    return 0


def _bench_delay(argv: List[str]) -> int:
    """Child process: a delay line that forwards to --target, adding --latency-ms to every
    chunk in each direction (so pipelined data keeps flowing); prints its port."""
    import argparse
    import queue
    parser = argparse.ArgumentParser(prog="bench-delay")
    parser.add_argument("--target", required=True)
    parser.add_argument("--latency-ms", type=float, required=True)
    args = parser.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    delay = args.latency_ms / 1000.0
    listener = socket.create_server(("127.0.0.1", 0))

    def pump(src: socket.socket, dst: socket.socket) -> None:
        chunks: "queue.Queue[Tuple[float, bytes]]" = queue.Queue()

        def writer() -> None:
            while True:
                due, data = chunks.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return
        threading.Thread(target=writer, daemon=True).start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + delay, data))
            if not data:
                return

    def serve() -> None:
        while True:
            client, _ = listener.accept()
            upstream = socket.create_connection((host, int(port)))
            for a, b in ((client, upstream), (upstream, client)):
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=pump, args=(a, b), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    print("PORT %d" % listener.getsockname()[1], flush=True)
    sys.stdin.read()
    return 0


class _BenchStats:
    def __init__(self) -> None:
        self.sent = self.received = self.turns = 0
        self.last = "recv"


class _CountingSocket:
    """Wraps the client's socket: bytes each way, and round trips (a send after a receive)."""

    def __init__(self, sock: socket.socket, stats: _BenchStats) -> None:
        self._sock, self._stats = sock, stats

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def sendall(self, data: bytes) -> None:
        if self._stats.last == "recv":
            self._stats.turns += 1
        self._stats.last = "send"
        self._stats.sent += len(data)
        self._sock.sendall(data)

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        self._stats.received += len(data)
        self._stats.last = "recv"
        return data


def _bench_client(argv: List[str]) -> int:
    """Child process: one ``run`` (``--apply`` if asked) of the command line, as a user
    runs it (rules file, state, lock, audit log); prints one JSON line of figures."""
    import argparse
    import cProfile
    import pstats
    parser = argparse.ArgumentParser(prog="bench-client")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default=USER)
    parser.add_argument("--folder", default="INBOX")
    parser.add_argument("--rules", required=True)
    parser.add_argument("--state", required=True, help="XDG_STATE_HOME for this run")
    parser.add_argument("--apply", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    stats = _BenchStats()
    commands = [0]

    class CountingWire(gc._PlainWire):
        def _create_socket(self, timeout: Optional[float] = None) -> Any:
            return _CountingSocket(super()._create_socket(timeout), stats)

        def _new_tag(self) -> bytes:
            commands[0] += 1
            return super()._new_tag()  # type: ignore[misc]
    gc._PlainWire = CountingWire  # type: ignore[misc]
    os.environ.update(XDG_STATE_HOME=args.state, XDG_CONFIG_HOME=args.state,
                      IMAP_PASSWORD=os.environ.get("BENCH_PASSWORD", PASSWORD))
    os.environ.pop("GMAIL_APP_PASSWORD", None)
    argv = ["run", "--host", args.host, "--port", str(args.port), "--plaintext", "--user",
            args.user, "--rules", args.rules, "--folder", args.folder, "--summary"]
    argv += ["--apply"] * args.apply
    out = io.StringIO()
    profiler = cProfile.Profile() if args.profile else None
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    code = gc.main(argv, out=out)
    if profiler:
        profiler.disable()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    text = out.getvalue()
    if code != 0:
        sys.stderr.write(text)
        raise SystemExit("bench-client: run exited %d" % code)
    if profiler:
        listing = io.StringIO()
        pstats.Stats(profiler, stream=listing).sort_stats("tottime").print_stats(10)
        sys.stderr.write(listing.getvalue())

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1).replace(",", "")) if found else 0
    print(json.dumps({"examined": number(r"([\d,]+) messages? examined"), "cpu": cpu, "wall": wall,
                      "commands": commands[0], "round_trips": stats.turns, "sent": stats.sent,
                      "received": stats.received, "peak": _bench_peak(),
                      "changes": number(r"([\d,]+) changes? made")}), flush=True)
    return 0


def _bench_seen(host: str, port: int, user: str) -> int:
    """How many messages are marked read, summed over every selectable folder."""
    conn = gc.GmailConnection(user, host=host, port=port, security="plaintext",
                              password=os.environ.get("BENCH_PASSWORD", PASSWORD), keepalive=None,
                              timeout=300)
    seen = 0
    with conn:
        for folder in conn.list_folders():
            if not folder.selectable:
                continue
            response = conn._call("STATUS", gc.mailbox_arg(folder.name), "(MESSAGES UNSEEN)")
            for item in response.untagged:
                if item and str(item[0]).upper() == "STATUS" and isinstance(item[-1], list):
                    attrs = gc._pairs(item[-1])
                    seen += int(attrs.get("MESSAGES", 0)) - int(attrs.get("UNSEEN", 0))
    return seen


def _bench_env() -> Dict[str, str]:
    """The children's environment: bytecode cached (under BENCH_PYCACHE, set by bench) so
    that no client's figures include compiling ~25,000 lines of source."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if env.get("BENCH_PYCACHE"):
        env["PYTHONPYCACHEPREFIX"] = env["BENCH_PYCACHE"]
    return env


def _bench_child(kind: str, args: List[str]) -> Tuple[Any, int]:
    import subprocess
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), kind] + args,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=_bench_env())
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit("%s did not start: %r" % (kind, line))
    return proc, int(line.split()[1])


def _bench_answer_key(conn: Any, corpus: Iterable[Tuple[bytes, _dtm.datetime, frozenset]],
                      rules: Any, now: _dtm.datetime) -> Dict[str, Any]:
    """The floor's answers for ``corpus`` (see _bench_answers), asking the signed-in
    ``conn`` what the server calls folders; nothing is changed there."""
    folders = conn.list_folders()
    separator = next((f.delimiter for f in folders if f.delimiter), "/")
    decided = []
    for raw, date, flags in corpus:
        info = dataclasses.replace(gc.message_info_from_bytes(raw), date=date)
        decided.append((info, flags,
                        rules.classify(info, final=True, now=now).actions.expanded(info, separator)))
    names = {name for *_, actions in decided for name in tuple(actions.labels) + (
        (actions.move,) if actions.move else ())}
    where: Dict[str, Any] = {
        "gmail": conn.is_gmail, "separator": separator,
        "names": {name: conn.server_name(name) for name in names},
        "existing": [f.name for f in folders if f.selectable]}
    for kind, use in (("trash", "\\Trash"), ("archive", "\\Archive")):
        found = conn.special_folder(use)
        where[kind] = found.name if found is not None else None
    return _bench_answers(decided, rules, where, now)


def _bench_connect(host: str, port: int, user: str) -> Any:
    return gc.GmailConnection(user, host=host, port=port, security="plaintext",
                              password=os.environ.get("BENCH_PASSWORD", PASSWORD), keepalive=None,
                              timeout=300)


def _bench_main(argv: List[str]) -> int:
    import argparse
    import subprocess
    parser = argparse.ArgumentParser(prog="test_gmail_classify.py bench",
                                     description="Measure the classify pipeline against the floor "
                                                 "(see README, Performance).")
    parser.add_argument("--messages", type=int, action="append",
                        help="mailbox size; repeat for several (default 1000 and 10000)")
    parser.add_argument("--latency-ms", type=float, action="append",
                        help="delay added each way; repeat for several (default 0)")
    parser.add_argument("--apply", action="store_true", help="apply the changes, not a dry run")
    parser.add_argument("--profile", action="store_true",
                        help="print our run's top ten functions by their own time")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each client per size (alternating which goes first)")
    parser.add_argument("--host", help="measure against this server (plaintext, loopback) instead")
    parser.add_argument("--port", type=int, default=143)
    parser.add_argument("--user", default=USER)
    parser.add_argument("--folder", default="INBOX")
    parser.add_argument("--rules", help="rules file (default: the bench's own rules)")
    parser.add_argument("--refill", metavar="CMD",
                        help="with --host: shell command that puts the corpus back ({n}: messages), "
                             "run before each client")
    parser.add_argument("--maildir", metavar="DIR",
                        help="with --host: the user's Maildir, as --refill leaves it")
    parser.add_argument("--truth", metavar="TSV",
                        help="with --host: the ground truth --refill writes (UID, kind, flags, "
                             "Message-ID, From, Subject per line)")
    parser.add_argument("--make-maildir", metavar="DIR",
                        help="only write the --messages corpus as a Maildir (for a local Dovecot)")
    args = parser.parse_args(argv)
    if args.host and not (args.refill and args.maildir and args.truth):
        parser.error("--host needs --refill CMD, --maildir DIR and --truth TSV: the bench puts "
                     "the same corpus back before each client, and needs to know where each "
                     "message belongs")
    sizes = args.messages or [1000, 10000]
    if args.make_maildir:
        _bench_maildir(args.make_maildir, sizes[0])
        return 0
    if not args.host:
        os.environ.pop("BENCH_PASSWORD", None)     # the fake server's own password
    work = tempfile.mkdtemp(prefix="gc-bench-")
    os.environ["BENCH_PYCACHE"] = os.path.join(work, "pycache")
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); import %s" % (
        os.path.dirname(os.path.abspath(__file__)), __name__ if __name__ != "__main__" else
        "test_gmail_classify")], env=_bench_env(), check=True)     # compile once, untimed
    try:
        return _bench_run(args, sizes, args.latency_ms or [0.0], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench_run(args: Any, sizes: List[int], latencies: List[float], work: str) -> int:
    rules_path = args.rules
    if rules_path is None:
        rules_path = os.path.join(work, "bench-rules.json")
        with open(rules_path, "w", encoding="utf-8") as fh:
            json.dump(BENCH_RULES, fh, ensure_ascii=False)
    rules = gc.load_rules(rules_path)
    load = ", ".join("%.2f" % x for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print("gmail_classify benchmark: Python %s, %d CPUs, load average %s, %s%s, %s" % (
        sys.version.split()[0], os.cpu_count() or 0, load,
        "server %s:%d user %s" % (args.host, args.port, args.user) if args.host
        else "fake Gmail server", ", --apply" if args.apply else ", dry run",
        "rules " + (args.rules or "BENCH_RULES")))
    header = ("client", "messages", "RTT ms", "msgs/s CPU", "msgs/s wall", "CPU s", "wall s",
              "commands", "round trips", "sent KB", "recv KB", "peak MB", "read before/after",
              "x floor wall", "x floor CPU", "MB over floor", "mailbox")
    print(" | ".join(header), flush=True)
    for size in sizes:
        for latency in latencies:
            for turn in range(args.repeat):
                order = ["floor", "ours"] if turn % 2 == 0 else ["ours", "floor"]
                results = {kind: _bench_one(args, kind, size, latency, rules, rules_path, work)
                           for kind in order}
                floor = results["floor"]
                for kind in order:
                    result = results[kind]
                    n = result["examined"]
                    same = "same" if result["mailbox"] == floor["mailbox"] else "%d lines differ" % (
                        len(set(result["mailbox"]) ^ set(floor["mailbox"])))
                    print(" | ".join(str(v) for v in (
                        kind, n, "%g" % (2 * latency), "%.0f" % (n / max(result["cpu"], 1e-9)),
                        "%.0f" % (n / max(result["wall"], 1e-9)), "%.2f" % result["cpu"],
                        "%.2f" % result["wall"], result["commands"], result["round_trips"],
                        "%.0f" % (result["sent"] / 1024), "%.0f" % (result["received"] / 1024),
                        "%.1f" % (result["peak"] / 2 ** 20),
                        "%d/%d" % (result["seen_before"], result["seen_after"]),
                        "%.2f" % (result["wall"] / floor["wall"]), "%.2f" % (result["cpu"] / floor["cpu"]),
                        "%+.1f" % ((result["peak"] - floor["peak"]) / 2 ** 20),
                        "-" if kind == "floor" else same)), flush=True)
                sys.stdout.write(results["ours"].get("profile", ""))
    return 0


def _bench_one(args: Any, kind: str, size: int, latency: float, rules: Any, rules_path: str,
               work: str) -> Dict[str, Any]:
    """One client's run on a fresh copy of the corpus: its figures, and the mailbox after."""
    import subprocess
    children = []
    try:
        if args.host:
            host, port = args.host, args.port
            subprocess.run(args.refill.replace("{n}", str(size)), shell=True, check=True,
                           stdout=subprocess.DEVNULL)
            corpus: Iterable[Tuple[bytes, _dtm.datetime, frozenset]] = _bench_lab_corpus(
                args.maildir, args.truth)
        else:
            server, port = _bench_child("bench-serve", ["--messages", str(size)])
            children.append(server)
            host = "127.0.0.1"
            corpus = ((raw, date, frozenset()) for raw, date in bench_corpus(size))
        now = _dtm.datetime.now(_UTC)
        with _bench_connect(host, port, args.user) as conn:
            answers = _bench_answer_key(conn, corpus, rules, now)
            # Warm the server's caches the same way for both: a dry run reads what ours reads.
            gc.classify_folder(conn, rules, args.folder)
        answers_path = os.path.join(work, "answers.json")
        with open(answers_path, "w", encoding="utf-8") as fh:
            json.dump(answers, fh)
        seen_before = _bench_seen(host, port, args.user)
        client_port = port
        if latency:
            delay, client_port = _bench_child("bench-delay", ["--target", "%s:%d" % (host, port),
                                                              "--latency-ms", str(latency)])
            children.append(delay)
        if kind == "floor":
            cmd = ["bench-floor", "--answers", answers_path]
        else:
            state = os.path.join(work, "state-%d" % len(os.listdir(work)))
            cmd = ["bench-client", "--rules", rules_path, "--state", state, "--folder", args.folder]
            cmd += ["--profile"] * args.profile
        cmd = [sys.executable, os.path.abspath(__file__)] + cmd + [
            "--host", host, "--port", str(client_port), "--user", args.user] + ["--apply"] * args.apply
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_bench_env())
        if done.returncode != 0:
            raise SystemExit("%s failed (exit %d): %s" % (kind, done.returncode, done.stderr[-2000:]))
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if args.profile and kind == "ours":
            result["profile"] = "".join(line + "\n" for line in done.stderr.splitlines()
                                        if line.strip() and "Ordered by" not in line)
        result["seen_before"] = seen_before
        result["seen_after"] = _bench_seen(host, port, args.user)
        result["mailbox"] = _bench_mailbox(host, port, args.user)
        return result
    finally:
        for child in children:
            child.stdin.close()
            child.wait(30)


def _bench_answers(decided: Iterable[Tuple[Any, frozenset, Any]], rules: Any,
                   where: Dict[str, Any], now: _dtm.datetime) -> Dict[str, Any]:
    """The answer key: {"ops": {message_id: [[order, command], ...]}, "create": [...]}, with
    each command a UID command whose UID set is ``{}``; ``decided`` holds (MessageInfo,
    flags, actions with templates filled in).  ``where``: what the server calls things
    (gmail, server names, trash and archive folders, the folders that exist)."""
    gmail, server_name = where["gmail"], where["names"]
    ops: Dict[str, List[List[Any]]] = {}
    targets: List[str] = []
    for info, flags, actions in decided:
        labels = frozenset({"\\Inbox"}) if gmail else None
        plan = gc._Plan(server_name=lambda name: server_name.get(name, name))
        plan.add(1, actions, frozenset(flags), labels, "INBOX")
        commands = []
        for key in plan.per_uid.get(1, []):
            kind = key[0]
            if kind == "label" and gmail:
                command = "UID STORE {} +X-GM-LABELS (%s)" % gc._label_arg(key[1]).decode()
            elif kind == "label":
                command = "UID COPY {} %s" % gc.mailbox_arg(server_name[key[1]]).decode()
            elif kind in ("flag+", "flag-"):
                command = "UID STORE {} %sFLAGS.SILENT (%s)" % (kind[-1], key[1])
            elif kind == "archive" and gmail:
                command = "UID STORE {} -X-GM-LABELS (\\Inbox)"
            else:
                folder = server_name[key[1]] if kind == "move" else where[kind]
                command = "UID MOVE {} %s" % gc.mailbox_arg(folder).decode()
            if kind == "move" or (kind == "label" and not key[1].startswith("\\")):
                targets.append(server_name[key[1]])
            commands.append([_FLOOR_ORDER[kind], command])
        message_id = gc._first(gc.header_text(info.headers, "message-id")).strip()
        if commands:
            ops[message_id] = commands
    return {"ops": ops, "create": sorted(set(targets) - set(where["existing"]))}


def _bench_lab_corpus(maildir: str, truth: str) -> List[Tuple[bytes, _dtm.datetime, frozenset]]:
    """A lab Dovecot's INBOX as it was written (fill.py): each file's bytes, its mtime (the
    INTERNALDATE) and the flags the ground truth lists for its Message-ID."""
    flags_of = {}
    with open(truth, encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            cols = line.rstrip("\n").split("\t")
            flags_of[cols[3]] = frozenset({"S": "\\Seen", "F": "\\Flagged", "R": "\\Answered"}[c]
                                          for c in cols[2])
    found = []
    for sub in ("cur", "new"):
        folder = os.path.join(maildir, sub)
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                raw = fh.read()
            match = re.search(rb"(?im)^message-id:[ \t]*(\S+)", raw)
            key = match.group(1).decode("ascii", "replace") if match else ""
            date = _dtm.datetime.fromtimestamp(os.stat(path).st_mtime, _UTC)
            found.append((raw, date, flags_of.get(key, frozenset())))
    if len(found) != len(flags_of):
        raise SystemExit("%s holds %d messages, %s lists %d: run fill.py again"
                         % (maildir, len(found), truth, len(flags_of)))
    return found


def _bench_mailbox(host: str, port: int, user: str) -> List[str]:
    """Every message of every folder as a sorted line: folder, Message-ID, flags, labels."""
    conn = gc.GmailConnection(user, host=host, port=port, security="plaintext",
                              password=os.environ.get("BENCH_PASSWORD", PASSWORD), keepalive=None,
                              timeout=300)
    lines = []
    item = "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"
    with conn:
        items = ["FLAGS", item] + (["X-GM-LABELS"] if conn.is_gmail else [])
        for folder in conn.list_folders():
            if not folder.selectable:
                continue
            conn.examine(folder.name)
            uids = conn.search(["ALL"])
            for values in (conn.fetch(uids, items).values() if uids else ()):
                msgid = gc._first(gc.header_text(gc.parse_headers(values.get(item) or b""),
                                                 "message-id")).strip()
                flags = sorted(f for f in values.get("FLAGS") or () if f != "\\Recent")
                labels = sorted(values.get("X-GM-LABELS") or ())
                lines.append("\t".join([folder.name, msgid, " ".join(flags), " ".join(labels)]))
    return sorted(lines)


def _bench_floor(argv: List[str]) -> int:
    """Child process: the floor client (see above); prints one JSON line of figures."""
    import argparse
    parser = argparse.ArgumentParser(prog="bench-floor")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default=USER)
    parser.add_argument("--answers", required=True)
    parser.add_argument("--apply", action="store_true")
    args = parser.parse_args(argv)
    stats = _BenchStats()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with open(args.answers, encoding="utf-8") as fh:
        answers = json.load(fh)
    sock = _CountingSocket(socket.create_connection((args.host, args.port), timeout=300), stats)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    commands = 0

    def answer(tag: bytes) -> bytes:
        """Read up to the tagged answer of ``tag``; returns everything before it."""
        nonlocal buffer
        start = 0
        while True:
            at = buffer.find(b"\r\n" + tag + b" ", start)
            if at < 0 and buffer.startswith(tag + b" "):
                at = -2
            if at != -1:
                end = buffer.find(b"\r\n", at + 2)
                if end >= 0:
                    head, line = bytes(buffer[:at + 2]), bytes(buffer[at + 2:end])
                    del buffer[:end + 2]
                    if not line[len(tag) + 1:].startswith(b"OK") and not (
                            tag.startswith(b"C") and b"[ALREADYEXISTS]" in line):
                        raise SystemExit("floor: %r" % line)
                    return head
            start = max(0, len(buffer) - len(tag) - 3)
            data = sock.recv(1 << 20)
            if not data:
                raise SystemExit("floor: the server closed the connection")
            buffer += data

    while b"\r\n" not in buffer:    # the greeting
        buffer += sock.recv(65536)
    del buffer[:buffer.find(b"\r\n") + 2]
    password = os.environ.get("BENCH_PASSWORD", PASSWORD)
    sock.sendall(b"L LOGIN %s %s\r\n" % (gc.quote(args.user), gc.quote(password)))
    answer(b"L")
    sock.sendall(b"S %s INBOX\r\n" % (b"SELECT" if args.apply else b"EXAMINE"))
    answer(b"S")
    sock.sendall(b"F UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])\r\n")
    commands += 3
    fetched = answer(b"F")
    uid_of: Dict[str, int] = {}
    pos = 0
    literal = re.compile(rb"\* \d+ FETCH \(([^\r\n{]*)\{(\d+)\}\r\n")
    while True:
        match = literal.search(fetched, pos)
        if not match:
            break
        body = fetched[match.end():match.end() + int(match.group(2))]
        pos = match.end() + int(match.group(2))
        tail = fetched[pos:fetched.find(b"\r\n", pos)]
        uid = re.search(rb"UID (\d+)", match.group(1) + tail)
        msgid = re.search(rb"(?i)message-id:[ \t]*(\S+)", body)
        if uid and msgid:
            uid_of[msgid.group(1).decode("ascii", "replace")] = int(uid.group(1))
    groups: Dict[Tuple[int, str], List[int]] = {}
    for msgid, ops in answers["ops"].items():
        uid = uid_of.get(msgid)
        if uid is not None:
            for order, command in ops:
                groups.setdefault((order, command), []).append(uid)
    if args.apply:
        lines, tags = [], []
        for name in answers["create"]:
            tags.append(b"C%d" % len(tags))
            lines.append(tags[-1] + b" CREATE " + gc.mailbox_arg(name) + b"\r\n")
        for (order, command), uids in sorted(groups.items()):
            for chunk in gc.chunk_uids(uids):
                tags.append(b"W%d" % len(tags))
                lines.append(tags[-1] + b" " + command.format(gc.compress_uids(chunk)).encode() + b"\r\n")
        sock.sendall(b"".join(lines))   # every write at once: one round trip
        for tag in tags:
            answer(tag)
        commands += len(tags)
    sock.sendall(b"O LOGOUT\r\n")
    commands += 1
    with contextlib.suppress(SystemExit):
        answer(b"O")
    sock.close()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(json.dumps({"examined": len(uid_of), "cpu": cpu, "wall": wall, "commands": commands,
                      "round_trips": stats.turns, "sent": stats.sent, "received": stats.received,
                      "peak": _bench_peak(), "changes": sum(len(u) for u in groups.values())}),
          flush=True)
    return 0


def _bench_peak() -> int:
    """This process's peak resident memory in bytes (Linux: VmHWM; else ru_maxrss)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# --- Issue 16: a shorter file (R2: pipeline ... command line) ----------------------------


class SharedAccountOptionsTest(unittest.TestCase):
    """_chosen_accounts names each option one account's settings would share with the others
    (the flags are derived from the option names, so each is checked here)."""

    ENV = (gc.PASSWORD_ENV, gc.PASSWORD_ENV_ALIAS, gc.TOKEN_ENV, gc.USER_ENV, gc.USER_ENV_ALIAS)

    def setUp(self):
        self.rules = parse_rules(accounts_doc({"name": "a", "user": "a@example.com"},
                                              {"name": "b", "user": "b@example.com"}), "r.json")
        patcher = mock.patch.dict(os.environ)
        patcher.start()
        self.addCleanup(patcher.stop)
        for variable in self.ENV:
            os.environ.pop(variable, None)

    def args(self, **given: Any) -> Any:
        values = dict(account=None, user=None, host=None, port=None, password_command=None,
                      command="run")
        return types.SimpleNamespace(**dict(values, **given))

    def test_each_shared_option_is_refused_by_its_flag_without_one_account(self):
        for name, flag in (("user", "--user"), ("host", "--host"), ("port", "--port"),
                           ("password_command", "--password-command")):
            with self.subTest(flag):
                with self.assertRaises(gc.UsageError) as caught:
                    gc._chosen_accounts(self.args(**{name: "x"}), self.rules)
                self.assertTrue(str(caught.exception).startswith(
                    f"{flag} would apply to every account of r.json: give exactly one "
                    f"--account with it"), caught.exception)
                chosen = gc._chosen_accounts(self.args(**{name: "x"}, account=["b"]),
                                             self.rules)
                self.assertEqual([name for name, _ in chosen], ["b"])

    def test_the_first_shared_option_in_flag_order_is_the_one_named(self):
        with self.assertRaises(gc.UsageError) as caught:
            gc._chosen_accounts(self.args(password_command="pass", port=1143, host="h"),
                                self.rules)
        self.assertTrue(str(caught.exception).startswith("--host would apply"))
        self.assertEqual([name for name, _ in gc._chosen_accounts(self.args(), self.rules)],
                         ["a", "b"])

class GmailFilterActionsTest(unittest.TestCase):
    """_gmail_actions: the filter properties each rule's actions become (one filter per
    label; a move is its folder's label and an archive; trash wins over archive)."""

    def actions(self, **keys: Any) -> gc.Actions:
        rules = parse_rules({"rule": [dict(name="x", subject="s", **keys)]}, "r.json")
        return rules.rules[0].actions

    def test_each_action_sets_its_property_on_every_label_filter(self):
        table = [
            ({"label": "A", "archive": True}, [{"shouldArchive": "true", "label": "A"}]),
            ({"move": "M", "mark_read": True},
             [{"shouldArchive": "true", "shouldMarkAsRead": "true", "label": "M"}]),
            ({"label": ["A", "B"], "move": "M"}, [{"shouldArchive": "true", "label": name}
                                                  for name in ("A", "B", "M")]),
            ({"label": ["A", "B"], "trash": True, "star": True},
             [{"shouldTrash": "true", "shouldStar": "true", "label": name} for name in "AB"]),
            ({"star": True}, [{"shouldStar": "true"}]),
            ({"mark_read": True, "archive": True},
             [{"shouldArchive": "true", "shouldMarkAsRead": "true"}]),
        ]
        for keys, expected in table:
            with self.subTest(keys):
                self.assertEqual(gc._gmail_actions(self.actions(**keys)), expected)

    def test_trash_wins_over_archive_and_a_move(self):
        for keys in ({"archive": True}, {"move": "M"}):
            with self.subTest(keys):
                both = dataclasses.replace(self.actions(**keys), trash=True)
                labels = [{"label": "M"}] if "move" in keys else [{}]
                self.assertEqual(gc._gmail_actions(both),
                                 [dict(each, shouldTrash="true") for each in labels])

class UndoForgedDestinationTest(StateTestCase):
    """Undo leaves alone a trash or archive record whose destination is not the server's
    trash or archive folder (Undo._vet checks each action against its own folder)."""

    undo = UndoTest.undo
    use = UndoSafetyTest.use
    audit_file = WriteAheadUndoTest.audit_file
    append_records = WriteAheadUndoTest.append_records

    def test_trash_and_archive_records_into_another_folder_are_refused(self):
        self.use(gmail=False)
        seed_mailbox(self.server, 6)
        self.server.add_message(make_message("kept elsewhere"), folder="Other")
        run = self.run_once()
        other = self.server.uids("Other")
        self.append_records(*({
            "type": "message", "version": 1, "run": run.id, "applied": True,
            "account": USER, "host": f"127.0.0.1:{self.server.port}", "folder": "INBOX",
            "uid": 90 + n, "uidvalidity": self.server.uidvalidity("INBOX"), "maybe": True,
            "message_id": f"<forged-{action}@example.com>", "subject": f"forged {action}",
            "changes": [{"action": action, "before": {"folder": "INBOX", "uid": 90 + n},
                         "after": {"folder": "Other", "uid": other[0]}}]}
            for n, action in enumerate(("trash", "archive"))))
        records: list = []
        self.undo(records=records)
        self.assertEqual([m.raw for m in self.server.messages("Other")],
                         [make_message("kept elsewhere")])
        for action in ("trash", "archive"):
            with self.subTest(action):
                (alone,) = [r["left_alone"] for r in records
                            if r["subject"] == f"forged {action}"]
                self.assertEqual(alone, [f"{action}: not something the run can have done "
                                         f"(Other is not the {action} folder); left as it is"])

class ClassifyMessagesOfflineTest(unittest.TestCase):
    """classify_messages (demo, test, diff): gmail_query parts drop out offline, and each
    change is recorded as a dry run of the folder would record it."""

    def test_a_rule_decides_on_its_local_conditions_and_a_move_names_its_place(self):
        rules = parse_rules({"rule": [
            {"name": "Q", "gmail_query": "from:x", "subject": "invoice", "label": "L"},
            {"name": "M", "subject": "digest", "move": "Lists"}]}, "r.json")
        messages = [dataclasses.replace(gc.message_info_from_bytes(
            f"From: a@b.example\r\nSubject: {subject}\r\nMessage-ID: <m{uid}@x>\r\n\r\n"
            f"body\r\n".encode()), uid=uid) for uid, subject in ((1, "invoice 1"),
                                                                 (2, "weekly digest"))]
        seen: List[gc.Outcome] = []
        report = gc.classify_messages(rules, messages, on_message=seen.append)
        self.assertEqual(report.matched, {"Q": 1, "M": 1})
        self.assertEqual(report.changes, {"label L": 1, "move to Lists": 1})
        self.assertEqual([outcome.changes for outcome in seen], [
            ({"action": "label", "label": "L", "before": None,
              "after": {"folder": "L", "uid": None}},),
            ({"action": "move", "before": {"folder": "INBOX", "uid": 2, "uidvalidity": 0},
              "after": {"folder": "Lists", "uid": None}},)])
    def test_templates_are_filled_in_per_message(self):
        rules = parse_rules({"rule": [{"name": "V", "subject": "invoice",
                                       "label": "Vendors/{sender_domain}"}]}, "r.json")
        info = dataclasses.replace(gc.message_info_from_bytes(
            b"From: a@shop.example\r\nSubject: invoice 7\r\n\r\nbody\r\n"), uid=1)
        report = gc.classify_messages(rules, [info])
        self.assertEqual(report.changes, {"label Vendors/shop.example": 1})


class RulesReloaderFilesTest(TempDirMixin, unittest.TestCase):
    """The watch's rules reloader: no file at all (built-in rules), and a file that is
    missing for a while (each watched file's signature, or None while it is absent)."""

    def test_without_a_file_nothing_changes_and_a_reload_keeps_the_rules(self):
        rules = gc.builtin_rules()
        reloader = gc._RulesReloader(None, rules)
        self.assertFalse(reloader.changed())
        with self.assertLogs("gmail_classify", "WARNING") as logs:
            reloader.reload()
        self.assertIs(reloader.rules, rules)
        self.assertIn("no rules file to reload", logs.output[0])

    def test_a_file_missing_at_the_start_is_picked_up_when_it_appears(self):
        path = os.path.join(self.make_dir(), "rules.json")
        reloader = gc._RulesReloader(path, gc.builtin_rules())
        self.assertFalse(reloader.changed())
        with open(path, "w") as handle:
            json.dump({"rule": [{"name": "a", "subject": "x", "label": "A"}]}, handle)
        self.assertTrue(reloader.changed())
        with self.assertLogs("gmail_classify", "WARNING"):
            reloader.reload()
        self.assertEqual([rule.name for rule in reloader.rules.rules], ["a"])
        self.assertFalse(reloader.changed())
        os.remove(path)
        self.assertTrue(reloader.changed())

@unittest.skipUnless(os.name == "posix", "select() on a pipe")
class StdinLinesPipeTest(unittest.TestCase):
    """_stdin_lines on a real descriptor (auth's prompt for a pasted address): a line when
    one comes, None when none came in time, and after the end of input only waits."""

    def test_a_pasted_line_then_the_end_of_input(self):
        read_end, write_end = os.pipe()
        stream = os.fdopen(read_end, "r")
        self.addCleanup(stream.close)
        read = gc._stdin_lines(stream)
        self.assertIsNone(read(0))                  # nothing pasted yet
        os.write(write_end, b"http://127.0.0.1:8080/?state=s&code=c\n")
        self.assertEqual(read(5), "http://127.0.0.1:8080/?state=s&code=c\n")
        os.close(write_end)
        self.assertIsNone(read(5))                  # the end of input, noted
        started = time.monotonic()
        self.assertIsNone(read(0.05))               # from then on it only waits
        self.assertGreaterEqual(time.monotonic() - started, 0.04)

class StepsAndProgressTest(FakeServerTest):
    """classify_folder: ``apply_every`` batches make a step, and ``on_progress`` hears of
    every batch classified (neither was checked message by message before)."""

    def test_apply_every_groups_batches_into_steps_and_progress_counts_each(self):
        for n in range(3):
            self.server.add_message(make_message(f"receipt {n}"))
        steps: List[List[int]] = []
        progress: List[Tuple[int, int]] = []

        class Steps(gc.Checkpoint):
            def step_done(self, conn, status, mark, outcomes):
                steps.append([outcome.uid for outcome in outcomes])

        gc.classify_folder(self.connect(), parse_rules(EXAMPLE_DOC, "r.json"), "INBOX",
                           batch_size=1, apply_every=2, checkpoint=Steps(),
                           on_progress=lambda done, total: progress.append((done, total)))
        uids = self.server.uids("INBOX")
        self.assertEqual(steps, [uids[:2], uids[2:]])
        self.assertEqual(progress, [(1, 3), (2, 3), (3, 3)])

class UnfinishedRunHistoryTest(TempDirMixin, unittest.TestCase):
    """history of a run that died before its summary: counted from its message records
    (the folders, the changes, and whether it was an undo)."""

    def test_a_run_without_its_summary_is_counted_from_its_message_records(self):
        store = gc.StateStore(self.make_dir())
        label = {"action": "label", "label": "A", "before": False, "after": True}
        base = {"type": "message", "version": 1, "applied": True, "account": "me",
                "host": "h", "time": "2026-12-01T10:00:00Z"}
        store.audit.append([
            dict(base, run="r1", folder="INBOX", uid=1, changes=[label]),
            dict(base, run="r1", folder="Work", uid=2, changes=[label, {
                "action": "archive", "label": "\\Inbox", "before": True, "after": False}]),
            dict(base, run="r1", folder="INBOX", uid=3, changes=[label]),
            dict(base, run="r2", folder="INBOX", uid=1, undo_of="r1",
                 time="2026-12-01T11:00:00Z", changes=[gc._inverse_change(label)])])
        entries = {entry["run"]: entry for entry in gc.history(store)}
        self.assertEqual({key: entries["r1"][key] for key in (
            "status", "command", "folders", "counts", "changes_made")}, {
            "status": "unfinished", "command": "run", "folders": ["INBOX", "Work"],
            "counts": {"label A": 3, "archive": 1}, "changes_made": 4})
        self.assertEqual({key: entries["r2"][key] for key in (
            "command", "undo_of", "folders", "counts", "changes_made")}, {
            "command": "undo", "undo_of": "r1", "folders": ["INBOX"],
            "counts": {"remove label A": 1}, "changes_made": 1})


if __name__ == "__main__":
    # `python test_gmail_classify.py bench ...` measures (see README, Performance); the
    # bench-* forms are its helper processes. Anything else runs the tests.
    _BENCH_COMMANDS = {"bench": _bench_main, "bench-serve": _bench_serve,
                       "bench-delay": _bench_delay, "bench-client": _bench_client,
                       "bench-floor": _bench_floor}
    if sys.argv[1:2] and sys.argv[1] in _BENCH_COMMANDS:
        sys.exit(_BENCH_COMMANDS[sys.argv[1]](sys.argv[2:]))
    unittest.main()
