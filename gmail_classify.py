#!/usr/bin/env python3
"""gmail_classify: keep a Gmail (or any IMAP) mailbox sorted by keyword and regex rules.

One file, standard library only, CPython 3.9 or newer. Copy it anywhere and run::

    GMAIL_APP_PASSWORD=... python gmail_classify.py --user you@gmail.com          # dry run
    GMAIL_APP_PASSWORD=... python gmail_classify.py --user you@gmail.com --apply  # do it

or import it from your own scripts::

    from gmail_classify import GmailConnection, builtin_rules, classify_folder
    with GmailConnection("you@gmail.com", password=os.environ["GMAIL_APP_PASSWORD"]) as conn:
        report = classify_folder(conn, builtin_rules(), "INBOX")   # a dry run: read-only
        print(report.changes)          # {'label Receipts': 12, 'label Newsletters': 40}

Reading guide.  Sections in dependency order, each using only those above it
(``grep -n '^# ---'`` prints them with their line numbers):

 1. Errors: the exception family (each class carries its ``exit_code``), ``printable``,
    and ``Stop``, the one stop mechanism every loop asks at its safe points.
 2. Wire format: quoting, modified UTF-7, UID sets, dates; then the response parser and
    the helpers that read FETCH, SEARCH, STATUS and COPYUID answers.  Skip on a first read.
 3. Connection: ``_Protocol`` (send, pipeline, read within bounds, sign in, IDLE) under
    ``GmailConnection`` (reconnect with backoff, one retry helper ``_retrying``, keepalive,
    the public operations), ``_SafeCopy`` (a COPY never repeated blindly, and moving
    without MOVE), and ``_WriteFlight`` (a step's writes sent back to back, their answers
    read afterwards, a lost one settled, never resent blindly).
 4. Messages: what the rule engine sees (``MessageInfo``), header decoding bounded in
    time, the fast path that must agree with the plain one, bodies and attachments, and
    ``_MESSAGE_DATA`` (what is fetched beside the headers).  Skip on a first read.
 5. Rule engine: conditions, actions, ``Ruleset``.
 6. Rules files: validation, a small TOML reader (so TOML works without tomllib),
    loading, the built-in rules, writing.
 7. Classify pipeline: ``classify_folder`` (plan, write-ahead intents, apply, confirm);
    message data a row of ``_MESSAGE_DATA`` marks ``later`` is fetched only for the
    messages whose rules reach it (``_data_later``).
 8. Demo: a sample mailbox classified offline.
 9. State and audit log: marks, the lock, ``audit.jsonl`` (intent, done, unsent,
    message, skipped and summary records), ``Run``, ``history``, ``Undo``; in the state
    file beside the marks, counts per day (``_DAILY_COUNTS``) and what a step keeps for
    the run after it should it not end (``_UNFINISHED``: flags as found, copies made).
10. Watch: stay connected, IDLE or poll, classify new mail.
11. OAuth2 sign-in.
12. Doctor: what a server can and cannot do for the rules, read-only (``diagnose``).
13. Importers and suggestions: Gmail's filter export, suggested rules; ``export`` of the
    rules to Sieve, Gmail's filters and JSON.
14. Learning, explaining, comparing rules: ``learn_rules`` (rules from how mail is already
    filed, judged on the newest mail), ``explain_message`` (every rule's verdict, for
    ``why``), ``diff_messages`` / ``diff_folders`` (decisions two rule sets differ on).
15. Command line: the output object, one row per subcommand, ``main``; several
    [[account]] tables run in turn (``_each_account``) or watched at once.

Where to add things (each is one place):
  a rule condition   a ``Condition`` subclass and its row in ``_CONDITION_KINDS`` (5);
                     from a vendoring script, ``Ruleset.add_condition``; if it reads
                     new message data: a ``MessageInfo`` field, a ``Needs`` flag and a
                     row in ``_MESSAGE_DATA`` (4)
  a flag action      a row in ``_FLAG_ACTION_ROWS`` (5, above ``Actions``)
  a daily count      a row in ``_DAILY_COUNTS`` (9); StateStore.add_daily / daily
  a step's leftover  a row in ``_UNFINISHED`` (9): keep_unfinished / unfinished
  a subcommand       its ``_cmd_*`` function and its row in ``_COMMANDS`` (15)
  an output format   an ``_Output`` subclass and its row in ``_OUTPUT_FORMATS`` (15)
  an exit code       ``exit_code`` on the error class (1)
  a server quirk     folder names without SPECIAL-USE: ``FALLBACK_FOLDER_NAMES`` (3); what an
                     answer may hold: ``_UNTAGGED_NEEDED`` (3); a capability check: the
                     ``GmailConnection`` method that asks it (``can_move``)
Each also wants its line in the README, and a server behaviour its model in the test
file's fake IMAP server (``SERVER_KINDS``, ``FAKE_QUIRKS``, its fault actions).

Safety: dry run unless asked to apply; ``BODY.PEEK`` so classifying never marks mail read;
never a bare ``EXPUNGE``; TLS certificates and host names always verified; passwords and
tokens never logged.
"""

from __future__ import annotations

__all__ = [
    # errors
    "GmailClassifyError", "ImapError", "ProtocolError", "AuthenticationError",
    "CapabilityError", "UidValidityError", "FolderUnavailableError", "TLSError",
    "ConnectionLostError", "RulesError", "CredentialError", "StopRequested", "Stop",
    "ContentSkip",
    "printable",
    # wire format
    "encode_mailbox", "decode_mailbox", "quote", "astring", "compress_uids",
    "parse_uid_set", "chunk_uids", "imap_date", "parse_response", "Literal",
    # connection
    "GmailConnection", "Folder", "FolderStatus", "MoveResult",
    # messages
    "MessageInfo", "parse_headers", "header_text", "header_addresses", "body_text",
    "message_info_from_bytes", "iter_message_files", "offline_read_limit",
    # rule engine
    "Actions", "Rule", "Decision", "Needs", "Ruleset", "parse_rules", "load_rules",
    "builtin_rules", "STARTER_RULES_TOML", "STARTER_RULES_JSON", "parse_toml", "TOMLError",
    "RuleTest", "run_rule_tests", "format_rules", "write_rules_file",
    "TEMPLATE_FIELDS", "split_template", "expand_template", "clean_component",
    "ProgramCondition", "ProgramError", "clean_label", "rule_programs", "program_trust_problem",
    "check_programs_trusted",
    "account_variable_suffix",
    # pipeline
    "classify_folder", "check_run", "classify_messages", "demo_messages", "Outcome",
    "FolderReport",
    "Checkpoint", "RunStopped", "describe_change", "FolderLimitError", "DEFAULT_MAX_NEW_FOLDERS",
    "RunOptions", "run_programs",
    # state and audit log
    "StateStore", "FolderState", "AccountLock", "AuditLog", "Run", "Undo", "history",
    "StateError", "LockedError", "BudgetExceededError", "account_key", "rules_hash",
    "default_state_dir",
    # watch
    "Watcher", "WatchSession",
    # OAuth2 sign-in
    "OAuthError", "OAuthClient", "OAuthTokenSource", "authorize", "load_client_secret_file",
    "save_refresh_token", "load_refresh_token", "token_path",
    # doctor
    "diagnose", "diagnose_failure", "Diagnosis", "DoctorRow", "provider_note",
    "PROVIDER_NOTES", "DOCTOR_CAPABILITIES",
    # importers and suggestions
    "import_gmail_filters", "ImportedFilters", "suggest_rules", "Suggestions",
    "export_sieve", "export_gmail", "export_json", "Exported", "EXPORT_FORMATS",
    # learning, explaining, comparing rules
    "explain_message", "Explanation", "RuleVerdict", "find_messages", "diff_messages",
    "diff_folders", "same_decision", "RulesDiff", "DecisionChange", "learn_rules",
    "LearnedRules", "LearnError", "read_filed_mail", "read_filed_path", "FiledMail",
    "FiledMessage",
    # command line
    "main", "most_serious_exit",
]

__version__ = "0.1.0"
__license__ = "MIT"

import argparse
import base64
import binascii
import bisect
import calendar
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as _dt
import difflib
import email
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import errno
import functools
import gc
import getpass
import hashlib
import html
import html.parser
import http.client
import http.server
import imaplib
import ipaddress
import json
import logging
import mailbox
import operator
import os
import pathlib
import random
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
import xml.etree.ElementTree
import xml.parsers.expat
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Set, TextIO, Tuple, Union)

try:
    import fcntl
except ImportError:  # Windows: the account lock uses msvcrt instead
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # everywhere but Windows
    msvcrt = None  # type: ignore[assignment]

log = logging.getLogger("gmail_classify")
log.addHandler(logging.NullHandler())   # the library never prints; the CLI adds a handler


# --- Errors ------------------------------------------------------------------------------
#
# Organised around the caller's real question, "should I retry?".  ImapError and its
# children: the server refused, or sent something we cannot use; retrying the same thing
# will not help.  ConnectionLostError: the network or the server went away and our own
# reconnect attempts ran out; trying again later may well work.  imaplib's exceptions never
# escape: they are translated and chained with ``from``.
#
# Each error class carries the command line's exit code for it (``exit_code``): a new
# error class that needs its own code says so in one line.

EXIT_OK = 0
EXIT_ERROR = 1          # an unexpected failure (a bug: please report it with -v)
EXIT_USAGE = 2          # bad arguments or rules file
EXIT_AUTH = 3           # the server rejected the credentials
EXIT_CONNECTION = 4     # could not connect, or lost the connection after retries; TLS refused
EXIT_SERVER = 5         # the server refused an operation or lacks a needed feature
EXIT_INCOMPLETE = 6     # incomplete (skipped messages or folders, daily budget, UIDVALIDITY changed): run again
EXIT_LOCKED = 7         # another --apply holds the account lock
EXIT_RULE_TESTS = 8     # the rules file's own [[test]] tables failed
# A signal ends a command at its next safe point, then the program ends by that signal
# (see _exit_program), so that a shell sees 128 + its number and systemd a clean stop.
EXIT_HANGUP = 129       # SIGHUP: the terminal went away
EXIT_INTERRUPTED = 130  # SIGINT: Ctrl-C
EXIT_TERMINATED = 143   # SIGTERM: kill, systemctl stop, shutdown
EXIT_OUTPUT_CUT = 141   # data output (--json, rules on standard output) cut by a closed pipe


class GmailClassifyError(Exception):
    """Base of every error this module raises."""
    exit_code = EXIT_ERROR


class ImapError(GmailClassifyError):
    """The server answered NO or BAD, or we refuse to send something; do not retry.

    ``command`` is the IMAP command (``"UID MOVE"``), ``status`` ``"NO"`` or ``"BAD"``
    (empty when we refused before sending), ``code`` the response code (``"TRYCREATE"``)
    or empty, and ``text`` the server's human-readable text.
    """
    exit_code = EXIT_SERVER

    def __init__(self, message: str, *, command: str = "", status: str = "",
                 code: str = "", text: str = "") -> None:
        super().__init__(message)
        self.command, self.status, self.code, self.text = command, status, code, text


class ProtocolError(ImapError):
    """The server sent something that is not valid IMAP; the message quotes it."""


class AuthenticationError(ImapError):
    """The server rejected the credentials; ``text`` holds its decoded explanation."""
    exit_code = EXIT_AUTH


class CapabilityError(ImapError):
    """The server lacks an extension an operation needs (MOVE without UIDPLUS, X-GM-RAW...)."""


class UidValidityError(ImapError):
    """A folder's UIDVALIDITY changed, so every UID remembered for it is stale."""
    exit_code = EXIT_INCOMPLETE


class FolderUnavailableError(ImapError):
    """A folder to classify could not be opened (missing, or refused with NO or BAD)."""


class TLSError(GmailClassifyError):
    """TLS could not be set up safely: untrusted certificate, wrong host, no STARTTLS."""
    exit_code = EXIT_CONNECTION


class ConnectionLostError(GmailClassifyError):
    """The server could not be reached or kept, even after reconnecting with backoff."""
    exit_code = EXIT_CONNECTION


class RulesError(GmailClassifyError):
    """The rules file is wrong; the message names the file, rule and key, and the fix."""
    exit_code = EXIT_USAGE


class ContentSkip(GmailClassifyError):
    """A message cannot be classified for what it contains (a header no parser reads in
    bounded time, a classifier that always fails on it): running again would not help.

    Raise it (with the reason as its message) anywhere between a message's FETCH answer and
    its decision; _FolderRun.classify then leaves that message alone, warns, has the audit log
    record it as ``skipped``, and lets the mark pass it (so scheduled runs do not exit 6
    for ever).  ``raise ContentSkip("its Subject header has 40,000 encoded words")``.
    """


class CredentialError(GmailClassifyError, ValueError):
    """A user name, password or token holds CR, LF or NUL: sent to a server it could end
    the command line and smuggle in another command, so it is refused before connecting.
    The message never repeats the secret."""
    exit_code = EXIT_USAGE


class StopRequested(GmailClassifyError):
    """A stop was asked for (a signal, or ``Stop.request`` from a vendoring program) and the
    work ended at the next safe point: no new command was sent after it.  ``signum`` is the
    signal's number, or None when a program asked.  ``between_commands`` is True when it was
    raised between two commands (Stop.check), so every command sent had its answer; False
    when a read was cut short and the command in flight may or may not have been carried out.
    """

    def __init__(self, message: str = "stopped", signum: Optional[int] = None,
                 between_commands: bool = False) -> None:
        super().__init__(message)
        self.signum, self.between_commands = signum, between_commands


class Stop:
    """The one stop mechanism: whoever wants the work to end calls ``request()``; every loop
    that waits or sends asks ``requested`` (or calls ``check()``) at its safe points.

    Safe to call from a signal handler or another thread: it only sets an Event.  The first
    signal number asked with is kept in ``signum``; ``count`` says how often it was asked
    (a second Ctrl-C means "now").
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: Optional[int] = None
        self.count = 0

    def request(self, signum: Optional[int] = None) -> None:
        if self.signum is None:
            self.signum = signum
        self.count += 1
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def check(self, where: str = "") -> None:
        """Raise StopRequested if a stop was asked for (``where`` names the safe point)."""
        if self._event.is_set():
            raise StopRequested(f"stopped {where}".strip(), self.signum, between_commands=True)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking early when a stop is asked for; returns requested."""
        return self._event.wait(seconds)


def _cleanup(action: Callable[[], Any]) -> None:
    """Run ``action`` (saving the state, closing the record) from a ``finally``.

    When an error is already on its way out (a signal's StopRequested, a dropped link), a
    failure of the cleanup itself is logged and the first error goes on: the exit code
    tells what ended the command, not what failed while tidying up after it."""
    if sys.exc_info()[0] is None:
        action()
        return
    try:
        action()
    except GmailClassifyError as exc:
        log.error("%s (while stopping: the error that ended the command follows)", exc)


class _Dropped(Exception):
    """Internal: the connection died (EOF, reset, timeout, BYE); reconnect and maybe retry."""


class _Unreachable(_Dropped):
    """Internal: a connect failed in a way waiting will not fix (refused, no such host, TLS
    spoken to a plain port). The first connect of a run gives up at once; a reconnect
    mid-run still retries, since a restarting server refuses for a moment."""


# What reaches a terminal.  A subject, an address, a folder name or a server's text can
# carry CR (which returns the cursor and lets the rest of the line overwrite what came
# before), ESC (terminal control sequences), other C0 and C1 controls, and the Unicode
# bidirectional overrides that reorder what is displayed (CVE-2021-42574, "Trojan
# Source").  Every human-readable line the program writes goes through printable().
_UNSAFE_FOR_TERMINAL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
    "\ufeff\ufff9-\ufffb\udc80-\udcff]")


def _escape_char(match: "re.Match[str]") -> str:
    return f"\\u{ord(match.group(0)):04x}"


def printable(text: Any, keep_newlines: bool = False) -> str:
    """``text`` made safe to show on a terminal: controls and bidi overrides escaped.

    ``printable("Invoice\\r\\x1b[2Kpaid") == "Invoice\\\\u000d\\\\u001b[2Kpaid"``; with
    ``keep_newlines`` a LF stays a line break (for multi-line text such as a traceback).
    The escapes are JSON's, so a JSON line passed through stays valid JSON.
    """
    text = str(text)
    if keep_newlines:
        return "\n".join(_UNSAFE_FOR_TERMINAL.sub(_escape_char, line)
                         for line in text.split("\n"))
    return _UNSAFE_FOR_TERMINAL.sub(_escape_char, text)


# --- Wire format: quoting, modified UTF-7, UID sets, dates -------------------------------

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
    return b'"' + text.encode("ascii").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def astring(text: str) -> bytes:
    """Return ``text`` as an atom when it is one, else quoted (RFC 3501 astring)."""
    _refuse_controls(text, "the string")
    if _ATOM_RE.match(text) and text.upper() != "NIL":
        return text.encode("ascii")
    return quote(text)


def encode_mailbox(name: str) -> str:
    """Encode a folder or label name in modified UTF-7 (RFC 3501 §5.1.3).

    ``encode_mailbox("Entwürfe") == "Entw&APw-rfe"``; ``"Tom & Jerry"`` -> ``"Tom &- Jerry"``.
    """
    def run(match: "re.Match[str]") -> str:     # a run of anything but printable ASCII
        raw = match.group(0).encode("utf-16-be")
        return "&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-"

    return re.sub(r"[^\x20-\x7e]+", run, name.replace("&", "&-"))


def decode_mailbox(name: Union[str, bytes]) -> str:
    """Decode a modified UTF-7 folder or label name; malformed runs are kept as sent.

    ``decode_mailbox("&ZeVnLIqe-") == "日本語"``.
    """
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if "&" not in name:
        return name

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
    _refuse_controls(name, "the folder name")
    return b"INBOX" if name.upper() == "INBOX" else astring(encode_mailbox(name))


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


def _uid_ranges(text: str, highest: Optional[int], shown: str) -> Iterator[Tuple[int, int]]:
    """(low, high) of each part of ``"1:3,7"``: (1, 3), (7, 7); ``*`` needs ``highest``.
    Raises ValueError quoting ``shown`` (the set, or its start)."""
    for part in text.split(","):
        if part.isdigit():          # most parts are one UID (a COPYUID of scattered ones)
            value = int(part)
            yield value, value
            continue
        ends = part.split(":")
        if len(ends) > 2 or not all(ends):
            raise ValueError(f"bad UID set {shown!r}")
        values = []
        for end in ends:
            if end == "*" and highest is None:
                raise ValueError(f"UID set {shown!r} uses * without a highest UID")
            values.append(highest if end == "*" else int(end))
        yield min(values), max(values)  # type: ignore[type-var, misc]


def parse_uid_set(text: str, highest: Optional[int] = None,
                  limit: Optional[int] = None) -> List[int]:
    """Expand ``"1:3,7"`` into ``[1, 2, 3, 7]``; ``*`` needs ``highest``. Raises ValueError,
    also when the set names more than ``limit`` UIDs (checked before anything is expanded:
    ``"1:4294967295"`` is 40 bytes from a server and would be 4 billion integers here)."""
    ranges = list(_uid_ranges(text, highest, text if limit is None else text[:40]))
    if limit is not None and sum(high - low + 1 for low, high in ranges) > limit:
        raise ValueError(f"UID set {text[:40]!r} names more than {limit} UIDs")
    result: List[int] = []
    for low, high in ranges:
        result.extend(range(low, high + 1))
    return result


# RFC 2683 §3.2.1.5 asks servers to accept lines of 8,000 octets and RFC 7162 §4 repeats
# it; Gmail rejects longer ones.  Leave room for the tag, the command and its arguments.
MAX_UID_SET_CHARS = 7000


def chunk_uids(uids: Iterable[int], max_chars: Optional[int] = None) -> Iterator[List[int]]:
    """Split UIDs (sorted, deduplicated) into groups whose compressed set fits ``max_chars``
    (default MAX_UID_SET_CHARS).

    ``list(chunk_uids([1, 3, 5, 7], max_chars=3)) == [[1, 3], [5, 7]]``
    """
    max_chars = MAX_UID_SET_CHARS if max_chars is None else max_chars
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


_INTERNALDATE = re.compile(r"\s*(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) "
                           r"([-+])(\d\d)(\d\d)")
_MONTH_NUMBERS = {name.lower(): number for number, name in enumerate(_MONTHS, 1)}
# Every message of a FETCH has an INTERNALDATE, and a mailbox's few zones recur: each
# zone is made once (bounded, as a sender's server chooses them).
_ZONES: Dict[str, _dt.timezone] = {}


def parse_internaldate(text: str) -> Optional[_dt.datetime]:
    """Parse an INTERNALDATE such as ``"17-Jul-1996 02:44:25 -0700"``; None if malformed."""
    match = _INTERNALDATE.match(text)
    if not match:
        return None
    day, mon, year, hh, mm, ss, sign, zh, zm = match.groups()
    month = _MONTH_NUMBERS.get(mon.lower())
    if month is None:
        return None
    try:
        zone = _ZONES.get(sign + zh + zm)
        if zone is None:
            offset = _dt.timedelta(hours=int(zh), minutes=int(zm))
            zone = _dt.timezone(-offset if sign == "-" else offset)
            if len(_ZONES) < 256:
                _ZONES[sign + zh + zm] = zone
        return _dt.datetime(int(year), month, int(day), int(hh), int(mm), int(ss), tzinfo=zone)
    except ValueError:
        return None


# --- Wire format: the response parser ----------------------------------------------------
#
# Responses are parsed by a small recursive-descent reader over the raw bytes, literals
# included inline as ``{n}\r\n`` followed by n octets.  Values come back as Python values:
# atoms as str, numbers as int, NIL as None, quoted strings as str, literals as bytes,
# parenthesised lists as lists.  A fetch item such as ``BODY[HEADER.FIELDS (FROM)]<0>``
# stays one atom even though it holds spaces and parentheses (RFC 3501 §7.4.2).

_ATOM_STOP = b" ()\"{\r\n"
_ATOM_RUN = re.compile(rb"[^ ()\"{\r\n\[]+")           # an atom without a [section]
_PLAIN_QUOTED = re.compile(rb'"([^"\\\\\r\n]*)"')      # a quoted string without escapes
_SECTION_RUN = re.compile(rb"[^\[\]\r\n]+")              # inside a [section]
_LITERAL_HEAD = re.compile(rb"~?\{(\d+)\+?\}\r\n")

# The deepest real structure is a BODYSTRUCTURE of nested multiparts, a few levels per
# part; a server that nests further is broken or hostile (and would exhaust the stack).
MAX_NESTING = 100


class Number(int):
    """An all-digit atom: an int where the grammar says ``number``, its exact text where it
    says atom or astring.  A folder ``0123``, a label ``007`` or a keyword ``0123`` are
    names, not numbers, so ``str()`` gives back what the server sent, leading zeros and all.

    ``str(parse_response(b'LIST () "/" 0123')[3]) == "0123"``; ``Number("0123") + 1 == 124``.

    Only a text that is not the number's own decimal form (leading zeros) is kept, so the
    parser makes the others as plain ints of this class (_digits_number()): a FETCH answer
    holds several numbers a message, and a __new__ call and a dict each cost twice the int.
    """

    def __new__(cls, text: str) -> "Number":
        self = int.__new__(cls, text)
        if text != int.__repr__(self):
            self.__dict__["text"] = text
        return self

    @property
    def text(self) -> str:
        return self.__dict__.get("text") or int.__repr__(self)

    def __str__(self) -> str:
        return self.text

    def __getnewargs__(self) -> Tuple[str]:
        return (self.text,)     # copies and pickles are made again from the text


def _digits_number(digits: bytes) -> Number:
    """``Number(digits.decode())``, without __new__ where the digits have no leading zero."""
    if digits[0] == 0x30:   # "0"
        return Number(digits.decode("ascii"))
    return int.__new__(Number, digits)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.depth = 0

    def fail(self, why: str) -> ProtocolError:
        start = max(0, self.pos - 20)
        fragment = self.data[start:self.pos + 40]
        return ProtocolError(f"malformed server response ({why}) near {fragment!r}")

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def skip_spaces(self) -> None:
        data, pos = self.data, self.pos
        while pos < len(data) and data[pos] == 0x20:
            pos += 1
        self.pos = pos

    def value(self) -> Any:
        """value = list / quoted / literal / number / NIL / atom"""
        if self.pos >= len(self.data):
            raise self.fail("unexpected end")
        ch = self.data[self.pos]
        if ch == 0x28:  # "("
            return self.list_()
        if ch == 0x22:  # '"'
            return self.quoted()
        if ch == 0x7B or (ch == 0x7E and self.data.startswith(b"~{", self.pos)):
            return self.literal()
        if ch in (0x29, 0x20):
            raise self.fail(f"unexpected {chr(ch)!r}")
        return self.atom()

    def list_(self) -> List[Any]:
        """list = "(" [value *(SP value)] ")" """
        if self.depth >= MAX_NESTING:
            raise self.fail(f"lists nested deeper than {MAX_NESTING} levels")
        self.depth += 1
        self.pos += 1
        items: List[Any] = []
        data = self.data
        while True:
            while self.pos < len(data) and data[self.pos] == 0x20:
                self.pos += 1
            if self.pos >= len(data):
                raise self.fail("unterminated list")
            if data[self.pos] == 0x29:  # ")"
                self.pos += 1
                self.depth -= 1
                return items
            items.append(self.value())

    def quoted(self) -> str:
        """quoted = DQUOTE *(QUOTED-CHAR / "\\" quoted-specials) DQUOTE"""
        plain = _PLAIN_QUOTED.match(self.data, self.pos)
        if plain is not None:
            self.pos = plain.end()
            return plain.group(1).decode("utf-8", "surrogateescape")
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
        match = _LITERAL_HEAD.match(self.data, self.pos)
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
            run = (_SECTION_RUN if depth else _ATOM_RUN).match(self.data, self.pos)
            if run is not None:
                self.pos = run.end()
                continue
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
        if start == self.pos:
            raise self.fail("empty atom")
        return _atom_value(self.data[start:self.pos])


# FETCH, UID, NIL, \\Seen...: the same few words.  Numbers are never kept (UIDs are many
# and differ: a SEARCH answer would fill the table before the first FETCH came).
_ATOM_VALUES: Dict[bytes, Any] = {}


def _atom_value(word: bytes) -> Any:
    """An atom's value: NIL as None, a number as int, anything else as str."""
    try:
        return _ATOM_VALUES[word]
    except KeyError:
        pass
    value = _convert_atom(word)
    if len(word) < 24 and len(_ATOM_VALUES) < 4096 and not isinstance(value, int):
        _ATOM_VALUES[word] = value
    return value


def _convert_atom(word: bytes) -> Any:
    text = word.decode("utf-8", "surrogateescape")
    if text.isdigit() and text.isascii():
        return Number(text)
    if text.upper() == "NIL":
        return None
    return text


# The fast tokenizer: one compiled pattern finds every token of a run of text in one
# findall() call, and a stack builds the lists.  A run ends at the first CRLF, which only
# a literal's header holds (an atom never does; a quoted string with an escaped CR is cut
# short and given up), so a run's last token is the literal whose bytes follow.  It knows
# the common shapes only (atoms with one level of [section], quoted strings, literals); at
# anything else (the last alternative) it gives up and _Reader parses the response again,
# so both accept and reject exactly the same input.  Its repeats are written unrolled
# (a run of one character class, then each escape or [section] followed by another run)
# rather than as a repeat of alternatives, which the regex engine tries byte by byte: the
# same strings, matched in a fifth less work.  An atom that opens a [section] it never
# closes is matched empty, and a quoted string that never closes is taken whole without
# its closing quote: the tokenizer gives up at either as at the last alternative.  (Were an
# unclosed string left to that alternative, findall() would scan the rest of the run again
# from each quote inside it: a server's line of escaped quotes cost quadratic time.)
_TOKEN = re.compile(rb"""[ ]*(?:
    (\()                                               # 1: a list opens
  | (\))                                               # 2: a list closes
  | "([^"\\\r\n]*(?:\\[\x00-\xff][^"\\\r\n]*)*)("?)    # 3, 4: a quoted string, closed?
  | ~?\{(\d+)\+?\}\r\n                                 # 5: a literal's size
  | ([0-9]+)(?![^ ()"{\r\n])                           # 6: a number (all digits)
  | ((?=[^ ()"{\r\n])[^ ()"{\r\n\[]*(?:\[[^\[\]\r\n]*\][^ ()"{\r\n\[]*)*)  # 7: an atom
  | [\x00-\xff]                                       # 8 (no group): anything else
)""", re.VERBOSE)
_MISSING = object()


_QUOTED_PAIR = re.compile(rb"\\([\x00-\xff])")


# "TEXT", "PLAIN", "utf-8", "\\Inbox"...: a BODYSTRUCTURE's and Gmail's labels' quoted
# strings are the same few, so short ones are decoded once.
_QUOTED_VALUES: Dict[bytes, str] = {}


def _quoted_value(text: bytes) -> str:
    """A quoted string's value (``text``: what is between its quotes, escapes and all)."""
    value = _QUOTED_VALUES.get(text)
    if value is None:
        unescaped = _QUOTED_PAIR.sub(lambda pair: pair.group(1), text) if b"\\" in text else text
        value = unescaped.decode("utf-8", "surrogateescape")
        if len(text) < 32 and len(_QUOTED_VALUES) < 1024:
            _QUOTED_VALUES[text] = value
    return value


class _NotSimple(Exception):
    pass


def _parse_fast(data: bytes, depth: int = 0) -> Tuple[List[Any], int]:
    """The tokenizer's parse_response(), and the _weight() of the values read (as one
    list), worked out token by token rather than by walking them again; ``depth``: lists
    already open around ``data``.  The weight is exact where ``depth`` is 1 or more, as for
    the rest of a FETCH line (at 0, _weight() would count a list nested 100 deep as 8)."""
    values: List[Any] = []
    current = values
    stack: List[List[Any]] = []
    pos, end = 0, len(data)
    findall = _TOKEN.findall
    atoms = _ATOM_VALUES    # looked up here: a call per token is most of the cost
    quoted = _QUOTED_VALUES
    weight = 16     # as _weight(): 16 a list, 8 + its length a str or bytes, else 8; so 8 a
                    # token (a list's two parentheses its 16), plus each text's length
    while pos < end:
        stop = data.find(b"\r\n", pos)
        if stop >= 0:
            stop += 2
        elif data.endswith(b" "):       # spaces after the last token are no token
            stop = len(data.rstrip(b" "))
            if stop <= pos:
                break
        else:
            stop = end
        size = b""
        tokens = findall(data, pos, stop)
        weight += 8 * len(tokens)   # the lists balance (or the run is given up)
        for opened, closed, text, quote, size, number, word in tokens:
            if word:
                value = atoms.get(word, _MISSING)
                if value is _MISSING:
                    value = _atom_value(word)
                current.append(value)
                if value.__class__ is str:
                    weight += len(value)
            elif quote:
                value = quoted.get(text)
                if value is None:
                    value = _quoted_value(text)
                current.append(value)
                weight += len(value)
            elif number:
                current.append(_digits_number(number))
            elif opened:
                if len(stack) + depth >= MAX_NESTING:
                    raise _NotSimple()   # the plain reader says so, as a ProtocolError
                stack.append(current)
                current.append([])
                current = current[-1]
            elif closed:
                if not stack:
                    raise _NotSimple()
                current = stack.pop()
            elif not size:
                raise _NotSimple()
        pos = stop
        if size:                        # the run ended with a literal: its bytes follow
            count = int(size)
            if pos + count > end:
                raise _NotSimple()
            current.append(data[pos:pos + count])
            weight += count         # and 8 as its size's token
            pos += count
    if stack:
        raise _NotSimple()
    return values, weight


def _weight(value: Any, depth: int = 0) -> int:
    """Roughly the bytes a parsed value holds: its text, plus a little per list and atom.

    A FETCH answer is mostly a flat list of atoms, numbers and literals: those are
    weighed in the loop, and only nested lists cost a call."""
    if isinstance(value, (bytes, str)):
        return len(value) + 8
    if not isinstance(value, list) or depth >= MAX_NESTING:
        return 8
    total = 16
    for item in value:
        if isinstance(item, (bytes, str)):
            total += len(item) + 8
        elif isinstance(item, list):
            total += _weight(item, depth + 1)
        else:
            total += 8
    return total


# The fetch-line fast path: the answer to a headers-only FETCH is the same few items per
# message (``1 FETCH (UID 1 FLAGS (\\Seen) BODY[HEADER.FIELDS (FROM)] {24}`` + literal +
# ``)``), so one pattern reads a whole item (its name, and a number, a list of plain atoms,
# a quoted string without escapes or a literal's size) where the tokenizer takes several
# tokens, and the literal is sliced out of the line.  Its name alternative is the
# tokenizer's atom (group 7 of _TOKEN) and each value one the tokenizer reads as one token
# (or one list of them), so the values are the same.  At the first item it does not know
# (BODYSTRUCTURE, labels in quotes, odd spacing...) the tokenizer reads the rest of the
# line; anything either one cannot read goes back to parse_response's own paths, which
# keep every limit and refuse exactly what they refuse.
_FETCH_HEAD = re.compile(rb"([0-9]+) FETCH \(")
_FETCH_ITEM = re.compile(rb"""
    ([A-Z][A-Z0-9.-]*(?:\[[^\[\]\r\n]*\](?:<[0-9]+>)?)?)[ ](?:  # 1: the item's name (an atom)
      ([0-9]+)(?=[ )])                                     # 2: a number
    | \((?=[^()]*\))                                          # 3: a list of plain atoms and
        ((?:(?:[^ ()"{\r\n\[\]]+|"(?:[^"\\\r\n]|\\["\\])*")               # quoted strings (none
          (?:[ ](?:[^ ()"{\r\n\[\]]+|"(?:[^"\\\r\n]|\\["\\])*"))*)?)\)(?=[ )])  # nested: looked at first)
    | "([^"\\\r\n]*)"(?=[ )])                                # 4: a quoted string, no escapes
    | ~?\{([0-9]+)\+?\}\r\n                                 # 5: a literal's size
    )""", re.VERBOSE)


_LIST_WORD = re.compile(rb'"((?:[^"\\\r\n]|\\["\\])*)"|([^ ()"{\r\n\[\]]+)')   # in group 3


# The commonest answer of all, to a headers-only FETCH, has one shape per server: a few
# items whose value is a number, a list of plain atoms or a plain quoted string, the header
# literal, perhaps more such items (Dovecot sends the literal last, the fake Gmail server
# items after it), and ")".  One match reads the line up to the literal, checking that its
# items follow one another one space apart, and findall() then splits them in one call: no
# pattern call per item.  The values and the weight are those the item loop below works
# out; any other shape (quoted labels, escapes, NIL where a list belongs, a literal's
# "+" or "~", odd spacing) is left to that loop, which reads it as before.  Where only
# what follows the literal is otherwise (Gmail's BODYSTRUCTURE and quoted labels come
# there), the loop reads on from the literal, not again from the start.
_SHAPE_NAME = rb"[A-Z][A-Z0-9.-]*"
_SHAPE_VALUE = rb'(?:[0-9]+|\((?:[^ ()"{\r\n\[\]]+(?: [^ ()"{\r\n\[\]]+)*)?\)|"[^"\\\r\n]*")'
_FETCH_SHAPE = re.compile(rb"([0-9]+) FETCH \(((?:" + _SHAPE_NAME + rb" " + _SHAPE_VALUE
                          + rb" )*)(BODY\[[^\[\]\r\n]*\](?:<[0-9]+>)?) \{([0-9]+)\}\r\n")
_SHAPE_AFTER = re.compile(rb"(?: " + _SHAPE_NAME + rb" " + _SHAPE_VALUE + rb")*\)")
_SHAPE_ITEM = re.compile(rb"(" + _SHAPE_NAME + rb') (?:([0-9]+)|(\([^()]*\))|"([^"]*)")')
_SECTIONS: Dict[bytes, str] = {}    # BODY[HEADER.FIELDS (...)]: too long for _ATOM_VALUES


def _parse_fetch_shape(data: bytes) -> Optional[Tuple[List[Any], int, int]]:
    """A line in the common shape (see above), read as far as the shape goes:
    ``(parsed, weight, pos)`` as _parse_fetch() returns them, with ``pos == len(data)`` when
    the whole line was in the shape, else the end of the literal, where the item loop goes
    on (Gmail's BODYSTRUCTURE and quoted labels come after it); None when the line does not
    begin in the shape."""
    line = _FETCH_SHAPE.match(data)
    if line is None:
        return None
    seq, before, name, size = line.groups()
    start = line.end()
    stop = start + int(size)
    if stop >= len(data):
        return None
    items: List[Any] = []
    weight = 16 + _shape_items(_SHAPE_ITEM.findall(before), items)
    section = _SECTIONS.get(name)
    if section is None:
        section = _atom_value(name)
        if len(_SECTIONS) < 64:     # a run asks for a few sections, each the same way
            _SECTIONS[name] = section
    items.append(section)
    items.append(data[start:stop])
    weight += len(section) + 16 + stop - start
    parsed = [_digits_number(seq), "FETCH", items]
    if _SHAPE_AFTER.fullmatch(data, stop) is None:
        return parsed, weight, stop
    if stop + 1 < len(data):
        weight += _shape_items(_SHAPE_ITEM.findall(data, stop, len(data) - 1), items)
    return parsed, weight, len(data)


def _atom_list(words: bytes) -> Tuple[List[Any], int]:
    """The values of a list of plain atoms (``words``: what is between its parentheses,
    one space apart) and their weight, as the item loop reads and weighs them."""
    atoms = _ATOM_VALUES
    values: List[Any] = []
    weight = 0
    for word in words.split(b" ") if words else ():
        value = atoms.get(word, _MISSING)
        if value is _MISSING:
            value = _atom_value(word)
        values.append(value)
        weight += len(value) + 8 if value.__class__ is str else 8
    return values, weight


def _shape_items(found: List[Tuple[bytes, bytes, bytes, bytes]], items: List[Any]) -> int:
    """Append the items findall() found (name, number, list, quoted text) to ``items`` as
    the item loop reads them; returns their weight."""
    atoms = _ATOM_VALUES
    weight = 0
    for name, number, listed, text in found:
        value = atoms.get(name, _MISSING)
        if value is _MISSING:
            value = _atom_value(name)
        items.append(value)
        weight += len(value) + 16 if value.__class__ is str else 16    # and 8 for its value
        if number:      # as _digits_number(), which it calls where that one must look
            items.append(int.__new__(Number, number) if number[0] != 0x30 or len(number) == 1
                         else _digits_number(number))
        elif listed == b"()":       # FLAGS (), X-GM-LABELS (): most messages' lists
            items.append([])
            weight += 8
        elif listed:
            words, listed_weight = _atom_list(listed[1:-1])
            items.append(words)
            weight += 8 + listed_weight
        else:
            items.append(text.decode("utf-8", "surrogateescape"))
            weight += len(items[-1])
    return weight


def _parse_fetch(data: bytes) -> Optional[Tuple[List[Any], int]]:
    """parse_response() of a FETCH line by whole items (see above), with the _weight() of
    its attribute list worked out on the way; None when ``data`` does not start as a FETCH
    line; raises _NotSimple where the other paths must decide."""
    end = len(data)
    shaped = _parse_fetch_shape(data)
    if shaped is not None:
        parsed, weight, pos = shaped
        if pos == end:
            return parsed, weight
        if data.startswith(b" ", pos):      # as the loop steps past the literal's item
            pos += 1
    else:
        head = _FETCH_HEAD.match(data)
        if head is None:
            return None
        parsed = [_digits_number(head.group(1)), "FETCH", []]
        pos = head.end()
        weight = 16             # as _weight(items): 16 a list, 8 + its length a str or bytes
    items: List[Any] = parsed[2]
    atoms = _ATOM_VALUES
    match = _FETCH_ITEM.match
    while True:
        item = match(data, pos)
        if item is None:
            break
        name, number, words, text, size = item.groups()
        value = atoms.get(name, _MISSING)
        if value is _MISSING:
            value = _atom_value(name)
        items.append(value)
        weight += len(value) + 16 if value.__class__ is str else 16    # and 8 for its value
        pos = item.end()
        if number is not None:
            items.append(_digits_number(number))
        elif words is not None:
            listed: List[Any] = []
            weight += 8
            if b'"' in words:       # Gmail's labels: "\\Inbox" "two words" Receipts
                for text, word in _LIST_WORD.findall(words):
                    if word:
                        value = atoms.get(word, _MISSING)
                        if value is _MISSING:
                            value = _atom_value(word)
                    else:
                        value = _quoted_value(text)
                    listed.append(value)
                    weight += len(value) + 8 if value.__class__ is str else 8
            else:
                listed, listed_weight = _atom_list(words)
                weight += listed_weight
            items.append(listed)
        elif text is not None:
            items.append(text.decode("utf-8", "surrogateescape"))
            weight += len(items[-1])
        else:
            count = int(size)
            if pos + count > end:
                raise _NotSimple()
            items.append(data[pos:pos + count])
            weight += count
            pos += count
        if data.startswith(b" ", pos):
            pos += 1
    if pos != end - 1 or data[pos] != 0x29:    # more than the closing ")": the tokenizer's
        if pos >= end or data[end - 1] != 0x29:
            raise _NotSimple()
        rest, rest_weight = _parse_fast(data[pos:end - 1], depth=1)
        items += rest
        weight += rest_weight - 16
    return parsed, weight


# A UID SEARCH answer names every message of a folder; read as Number objects, 100,000
# UIDs take 40 MB at once, as plain ints a tenth of that (without leading zeros, a
# Number's text is its str(), so nothing can tell the two apart but the type).
_SEARCH_LINE = re.compile(rb"SEARCH(?: [1-9][0-9]*)*")


# A step's moves are answered with an EXPUNGE line per message moved: thousands of one
# shape, read here without the tokenizer (the number as the plain parser reads it).
_EXPUNGE_LINE = re.compile(rb"([0-9]+) EXPUNGE")


def _parse_weighed(data: bytes) -> Tuple[List[Any], Optional[int]]:
    """parse_response(), and the _weight() of a FETCH line's attribute list when the
    fetch-line fast path read it (None otherwise: the caller weighs it if it must)."""
    if data.startswith(b"SEARCH") and _SEARCH_LINE.fullmatch(data):
        return ["SEARCH", *map(int, data[7:].split())], None
    if data.endswith(b" EXPUNGE"):
        expunged = _EXPUNGE_LINE.fullmatch(data)
        if expunged is not None:
            return [Number(expunged.group(1).decode("ascii")), "EXPUNGE"], None
    try:
        fetched = _parse_fetch(data)
        if fetched is not None:
            return fetched
        return _parse_fast(data)[0], None
    except _NotSimple:
        pass
    return _parse_plain(data), None


def parse_response(data: bytes) -> List[Any]:
    """Parse one untagged response (without the leading ``* ``) into Python values.

    ``parse_response(b'3 FETCH (UID 7 FLAGS (\\\\Seen) BODY[HEADER.FIELDS (FROM)] {4}\\r\\nab\\r\\n)')``
    returns ``[3, "FETCH", ["UID", 7, "FLAGS", ["\\\\Seen"], "BODY[HEADER.FIELDS (FROM)]", b"ab\\r\\n"]]``.
    Raises ProtocolError, quoting the fragment, for malformed input.
    """
    return _parse_weighed(data)[0]


def _parse_plain(data: bytes) -> List[Any]:
    """parse_response() by recursive descent: the reference, and the path for the rare
    shapes the fast tokenizer leaves alone."""
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
            values.append(Number(word) if word.isascii() and word.isdigit() else word)
    code = str(values[0]).upper() if values else ""
    return code, values[1:], text[reader.pos:].decode("utf-8", "replace").strip()


def _pairs(items: Sequence[Any]) -> Dict[str, Any]:
    """Turn a FETCH attribute list ``["UID", 7, "FLAGS", [...]]`` into a dict (keys upper)."""
    if len(items) % 2:
        raise ProtocolError(f"FETCH attributes do not pair up: {items!r:.200}")
    keys = items[::2]
    try:
        joined = "\0".join(keys)
    except TypeError:           # a name that is no str (a number, NIL): the item way
        joined = None
    if joined is not None and joined == joined.upper():     # names in capitals: as they are
        return dict(zip(keys, items[1::2]))
    return {str(key).upper(): value for key, value in zip(keys, items[1::2])}


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


# What an answer means: the tagged status and the untagged lines kept for one command,
# and the helpers that read FETCH, SEARCH and COPYUID answers out of them.


@dataclass
class _Response:
    status: str
    code: str
    code_args: List[Any]
    text: str
    untagged: List[List[Any]]
    oversized: List[List[Any]] = field(default_factory=list)  # lines whose literal was dropped


# The kinds most answers are, as servers spell them (asked of every line a run reads).
_COMMON_KINDS = ("FETCH", "EXPUNGE", "EXISTS")


def _untagged_kind(item: Sequence[Any]) -> str:
    """``"EXISTS"`` for ``[12, "EXISTS"]``, ``"LIST"`` for ``["LIST", [...], "/", "x"]``."""
    if not item:
        return ""
    if isinstance(item[0], int) and len(item) > 1:
        kind = item[1]
        return kind if kind in _COMMON_KINDS else str(kind).upper()
    return str(item[0]).upper()


def _server_number(value: Any, what: str, command: str, nonzero: bool = False) -> int:
    """``value`` as the server sent it where IMAP's grammar wants a number (RFC 3501 §9:
    unsigned 32-bit; nz-number when ``nonzero``); anything else is a ProtocolError."""
    if isinstance(value, int) and not isinstance(value, bool) \
            and (1 if nonzero else 0) <= value <= 0xFFFFFFFF:
        return value
    shown = value if isinstance(value, (int, str, bytes)) else "(...)"
    raise ProtocolError(f"the server answered {command} with {what} {str(shown)[:40]!r}, "
                        f"which is not a valid {'non-zero ' if nonzero else ''}32-bit "
                        f"number; that answer is unusable", command=command)


def _fetch_uid(item: Sequence[Any]) -> Optional[int]:
    """The UID inside an untagged ``[seq, "FETCH", [... "UID", 7 ...]]``, or None."""
    if len(item) < 3 or not isinstance(item[2], list):
        return None
    attrs = item[2]
    if len(attrs) > 1 and attrs[0] == "UID" and isinstance(attrs[1], int):
        return attrs[1]         # where servers put it: first
    for i in range(0, len(attrs) - 1, 2):
        if str(attrs[i]).upper() == "UID" and isinstance(attrs[i + 1], int):
            return attrs[i + 1]
    return None


_FETCH_KEYS: Dict[str, str] = {}


def _fetch_key(item: str) -> str:
    """Canonical name of a fetch item, so that an answer is matched to its request by
    meaning: ``BODY.PEEK[TEXT]<0.100>`` and its answer ``BODY[TEXT]<0>`` both become
    ``BODY[TEXT]<0>``.  Header field names are astrings (RFC 3501 ``header-fld-name``), so
    a server may echo them quoted, in another case or order:
    ``body[header.fields ("Subject" FROM)]`` becomes ``BODY[HEADER.FIELDS (FROM SUBJECT)]``.
    """
    key = _FETCH_KEYS.get(item)
    if key is None:
        key = _canonical_fetch_key(item)
        if len(_FETCH_KEYS) < 1000:   # the items of a run are few; answers echo them
            _FETCH_KEYS[item] = key
    return key


def _canonical_fetch_key(item: str) -> str:
    key = re.sub(r"\s+", " ", item.strip()).upper().replace("BODY.PEEK[", "BODY[")
    key = re.sub(r"<(\d+)\.\d+>$", r"<\1>", key)
    match = re.fullmatch(r"(BODY\[(?:[\d.]*\.)?HEADER\.FIELDS(?:\.NOT)?) ?\((.*)\)\](<\d+>)?",
                         key, re.S)
    if match:
        try:
            names = parse_response(match.group(2).encode("utf-8", "surrogateescape"))
        except ProtocolError:
            return key
        fields = sorted({str(name.decode("ascii", "replace") if isinstance(name, bytes)
                             else name).upper() for name in names})
        key = f"{match.group(1)} ({' '.join(fields)})]{match.group(3) or ''}"
    return key


def _listed_flags(value: Any) -> Optional[Tuple[str, ...]]:
    return tuple(map(str, value)) if isinstance(value, list) else None


def _listed_labels(value: Any) -> Optional[Tuple[str, ...]]:
    if not isinstance(value, list):
        return None     # NIL or an atom where a list belongs: unknown, not "none"
    return tuple(decode_mailbox(_as_text(label)) for label in value)


def _fetched_date(value: Any) -> Optional[_dt.datetime]:
    return parse_internaldate(value if value.__class__ is str else _as_text(value))


def _fetched_number(value: Any) -> Optional[int]:
    if isinstance(value, list) and value:
        value = value[0]
    return int(value) if isinstance(value, int) or str(value).isdigit() else None


# How the value of each fetch item is read (see fetch()); a body section or RFC822 item
# not named here is bytes, anything else stays as parsed.
_FETCH_VALUES: Dict[str, Callable[[Any], Any]] = {
    "FLAGS": _listed_flags, "X-GM-LABELS": _listed_labels,
    "INTERNALDATE": _fetched_date,
    "RFC822.SIZE": _fetched_number, "X-GM-MSGID": _fetched_number,
    "X-GM-THRID": _fetched_number, "MODSEQ": _fetched_number,
}


def _fetched_section(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return value    # NIL stays None: the section is missing, not empty


def _fetched_as_parsed(value: Any) -> Any:
    return value


def _fetch_converter(key: str) -> Callable[[Any], Any]:
    """How the value of fetch item ``key`` (upper case) is read: chosen once per answer."""
    convert = _FETCH_VALUES.get(key)
    if convert is not None:
        return convert
    if key.startswith("BODY[") or key.startswith("RFC822"):
        return _fetched_section
    return _fetched_as_parsed


def _fetch_keep(wanted: set) -> Callable[[List[Any]], bool]:
    """keep() for a FETCH: its own answers, never an unsolicited FETCH for another UID."""
    def keep(item: List[Any]) -> bool:
        return _untagged_kind(item) == "FETCH" and _fetch_uid(item) in wanted
    return keep


def _fetch_answer(response: _Response, wanted: set, by_key: Mapping[str, str],
                  result: Dict[int, Dict[str, Any]], limit: int,
                  skipped: Optional[List[int]]) -> None:
    """Add the FETCH lines of an answer to ``result``, keyed by UID (the answer's keep()
    let in only the wanted UIDs).  A message with a literal dropped as oversized is left
    out whole, and its UID appended to ``skipped``."""
    dropped = {_fetch_uid(item) for item in response.oversized} & wanted
    for uid in sorted(dropped):   # type: ignore[type-var]
        log.warning("UID %d: the server sent far more than was asked for (at most %d "
                    "bytes); skipped that message", uid, limit)
        if skipped is not None and uid not in skipped:
            skipped.append(uid)
    names: Dict[str, str] = {}      # an answer's item names, as asked for
    converters: Dict[str, Callable[[Any], Any]] = {}
    for item in response.untagged:
        if len(item) < 3 or str(item[1]).upper() != "FETCH" or not isinstance(item[2], list):
            continue
        attrs = _pairs(item[2])
        uid = attrs.get("UID")
        if uid in dropped:
            continue
        values = result.setdefault(int(uid), {})
        for key, value in attrs.items():
            if key == "UID":
                continue
            convert = converters.get(key)
            if convert is None:
                convert = converters[key] = _fetch_converter(key)
                names[key] = by_key.get(_fetch_key(key), key)
            values[names[key]] = convert(value)


class _FetchOnWay:
    """One batch's UID FETCH (in chunks of UIDs) sent ahead of reading its answer
    (GmailConnection.fetch_batches and fetch_ahead): sent again when the connection it went
    out on is gone, and read into ``{uid: {item: value}}`` as fetch() returns it."""

    def __init__(self, proto: "_Protocol", uids: Iterable[int], items: Sequence[str],
                 skipped: Optional[List[int]], limit: Optional[int] = None) -> None:
        for item in items:
            _check_fetch_item(item)
        self.proto, self.skipped = proto, skipped
        self.uids = [int(uid) for uid in uids]
        self.by_key = {_fetch_key(item): item for item in items}
        self.line = "(UID " + " ".join(items) + ")"
        self.limit = _fetch_literal_limit(items) if limit is None else limit
        self.pendings: Optional[List[_Pending]] = None     # None: not sent yet
        self.answer: Optional[Dict[int, Dict[str, Any]]] = None

    @property
    def sent(self) -> bool:
        return self.pendings is not None

    def send(self) -> None:
        keep = _fetch_keep(set(self.uids))
        self.pendings = [self.proto.send_ahead("UID FETCH", compress_uids(chunk), self.line,
                                               keep=keep, max_literal=self.limit)
                         for chunk in chunk_uids(self.uids)]

    def lost(self, imap: Any) -> bool:
        """Whether part of it was sent on a connection other than ``imap`` and not read."""
        return any(p.response is None and p.imap is not imap for p in self.pendings or ())

    def read(self) -> Dict[int, Dict[str, Any]]:
        """The answer, read once: a drop found after it (sending the next FETCH, in the
        same attempt) leaves it read, not lost."""
        if self.answer is None:
            result: Dict[int, Dict[str, Any]] = {}
            wanted = set(self.uids)
            for pending in self.pendings or ():
                _fetch_answer(self.proto.collect(pending), wanted, self.by_key, result,
                              self.limit, self.skipped)
            self.answer, self.pendings = result, []
        return self.answer


def _copyuid_map(response: _Response, sent: Sequence[int]) -> Dict[int, int]:
    """Source UID -> destination UID from a COPYUID code (RFC 4315), tagged or untagged.

    The answer can only concern the ``sent`` UIDs; one naming more (``1:4294967295`` is
    40 bytes) is ignored as unusable, never expanded.
    """
    codes = [(response.code, response.code_args)]
    codes += [(item[1], item[2]) for item in response.untagged
              if item and item[0] == "OK" and len(item) >= 3]
    for code, args in codes:
        if code == "COPYUID" and len(args) >= 3:
            return _copyuid_pairs(args, sent)
    return {}


def _copyuid_pairs(args: Sequence[Any], sent: Iterable[int],
                   source: Optional[List[int]] = None) -> Dict[int, int]:
    """_copyuid_map() of one COPYUID code's arguments; ``source``: its source UIDs
    (``args[1]``) when the caller has read them already."""
    sent = set(sent)
    try:
        if source is None:
            source = parse_uid_set(str(args[1]), limit=len(sent))
        target = parse_uid_set(str(args[2]), limit=len(sent))
    except ValueError:
        log.warning("ignoring an unusable COPYUID answer from the server")
        return {}
    if len(source) != len(target) or not set(source) <= sent:
        return {}
    return dict(zip(source, target))


def _search_uids(response: _Response) -> List[int]:
    """The UIDs a UID SEARCH answer names, in the order sent: ``[4, 9, 10]`` (a CONDSTORE
    server's ``(MODSEQ n)`` is not one)."""
    found: List[int] = []
    for item in response.untagged:
        if item and str(item[0]).upper() == "SEARCH":
            found.extend(_server_number(v, "UID", "UID SEARCH", nonzero=True)
                         for v in item[1:] if not isinstance(v, list))
    return found


# --- Connection --------------------------------------------------------------------------
#
# Two layers over imaplib, which only opens the socket and does TLS, STARTTLS and the
# greeting.  _Protocol, the engine, sends every command itself, sign-in included (so quoting
# is ours and consistent on every Python version), pipelines FETCHes, and reads each
# answer in order, literals inline, for the parser above; it never retries.
# GmailConnection is the policy around it: reconnecting with backoff, one retry helper
# (_retrying) that knows what may be sent again, the keepalive, the public methods.
# Reading goes through our own buffer rather than imaplib's ``file``: on Python <= 3.13 a
# socket timeout leaves ``socket.makefile`` objects unusable, and IDLE needs "wait up to N
# seconds for a line", which a buffered file cannot answer without blocking.

IMAP_PORT = 143
IMAPS_PORT = 993
GMAIL_HOST = "imap.gmail.com"
DEFAULT_TIMEOUT = 60.0          # seconds a read or write may stall before we reconnect
DEFAULT_KEEPALIVE = 600.0       # NOOP after this many idle seconds; Gmail drops at ~30 min
DEFAULT_RETRIES = 5             # reconnect attempts for one command before giving up
DEFAULT_BACKOFF = 1.0           # first backoff delay in seconds, doubled per attempt
MAX_BACKOFF = 60.0
IDLE_MAX_SECONDS = 29 * 60      # RFC 2177: re-issue IDLE at least every 29 minutes
IDLE_POLL = 0.5                 # seconds between checks of an idle() interrupt callback
# One response line, literals excluded.  Only a SEARCH answer is ever longer (about 9
# bytes per UID): its limit follows the folder's size (see search_line_limit).
MAX_RESPONSE_LINE = 4 * 1024 * 1024
# Literals are limited by what was asked for: a FETCH of a 16 KiB prefix may bring 16 KiB,
# a header block a few hundred; anything far beyond is read, thrown away and that message
# skipped (see _fetch_literal_limit).  Gmail's own message limit is 35 MB (APPENDLIMIT).
MAX_MESSAGE_LITERAL = 64 * 1024 * 1024  # a whole message or a body part
MAX_HEADER_LITERAL = 2 * 1024 * 1024    # a header block (HEADER, HEADER.FIELDS, MIME)
MAX_SMALL_LITERAL = 64 * 1024           # anything else: a folder name, a label, a flag
MAX_KEPT_UNTAGGED = 200_000             # untagged answers kept for one command
# What one command's answer may cost, whatever the server sends (issue 20).  Untagged
# answers it did not ask for ("* OK still thinking", junk, an unsolicited SEARCH): at most
# MAX_UNREQUESTED_ANSWERS; state updates (EXISTS, EXPUNGE, FETCH FLAGS) are legitimate in
# any number, but every unasked answer counts against MAX_UNREQUESTED_BYTES.  What is kept
# for the caller: at most MAX_KEPT_BYTES (a FETCH keeps one entry per UID, latest wins).
# Past either: a ProtocolError naming the command and the limit.  Time is never a limit
# while data flows: an honest X-GM-RAW search over years of mail can take minutes.
MAX_UNREQUESTED_ANSWERS = 1000
MAX_UNREQUESTED_BYTES = 16 * 1024 * 1024
MAX_KEPT_BYTES = 256 * 1024 * 1024
# A folder's size as far as a SEARCH answer's limit believes EXISTS: a server that claims
# 4,294,967,295 messages must not lift the limit to gigabytes (Gmail's largest real folders
# hold a few hundred thousand).
MAX_FOLDER_MESSAGES = 2_000_000
# A MOVE's COPYUID read within another flight's answer is kept for its own flight; at most
# this many (two steps' moves are on the wire at once, a destination a command).
MAX_KEPT_COPYUIDS = 256
# Once a stop is asked for, the answer being read may take this much longer (bounded by
# the timeout) so that DONE or LOGOUT can end cleanly; then StopRequested.  A blocking
# read looks at the stop every STOP_POLL seconds.
STOP_GRACE = 2.0
STOP_POLL = 0.2
# A connection is stalled when an answer brings fewer than this many bytes in a whole
# ``timeout`` window; a slow but working link sends far more (IDLE is exempt).
STALL_MIN_BYTES = 1024
IMAPLIB_MAX_LINES = 1000                # lines imaplib may read while it connects
NONSYNC_LITERAL_MAX = 4096      # RFC 7888: LITERAL- allows {n+} up to 4096 octets

# Special-use attributes (RFC 6154) plus Gmail's \Important, in the order we look for them.
SPECIAL_USES = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Important",
                "\\Junk", "\\Sent", "\\Trash")

# Gmail system labels travel as atoms such as \Inbox; anything else is a user label.
GMAIL_SYSTEM_LABELS = ("\\Inbox", "\\Important", "\\Starred", "\\Sent", "\\Draft",
                       "\\Drafts", "\\Trash", "\\Spam")

# Where no folder carries a special-use attribute (servers without SPECIAL-USE), trash and
# archive go to the first folder found by one of these names, compared case-insensitively,
# with or without the personal namespace prefix.  English names first, then the names of
# common servers and clients (Exchange, Apple Mail, Thunderbird, Gmail) and localised ones.
FALLBACK_FOLDER_NAMES = {
    "\\Trash": ("Trash", "Deleted Items", "Deleted Messages", "Deleted", "Bin",
               "[Gmail]/Trash", "[Gmail]/Bin", "[Google Mail]/Trash", "[Google Mail]/Bin",
               "[Gmail]/Papierkorb", "[Google Mail]/Papierkorb", "Papierkorb",
               "Gelöschte Elemente", "Corbeille", "Éléments supprimés", "Papelera",
               "Elementos eliminados", "Cestino", "Posta eliminata", "Prullenbak",
               "Verwijderde items", "Lixeira", "Kosz", "Корзина"),
    "\\Archive": ("Archive", "Archives", "Archiv", "Archivio", "Archivo", "Archief", "Arquivo"),
}

_DROPPED_ERRORS = (OSError, imaplib.IMAP4.abort, EOFError)
_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r?\n\Z")

# A write's echo: an untagged FETCH of one message's labels or flags (and MODSEQ) around
# its UID, each list of plain atoms (a flag's backslash allowed) and quoted strings with
# only the two escapes, one space apart: a shape the parser reads one way only (see
# _Protocol._passed_over).
_ECHO_VALUE = rb'\\?[^\x00-\x20\x7f-\xff(){}%*"\\\[\]]+|"(?:[^"\\\r\n]|\\["\\])*"'
_ECHO_ITEM = rb"(?:X-GM-LABELS|FLAGS) \((?:(?:%s)(?: (?:%s))*)?\)|MODSEQ \(\d{1,19}\)" % (
    _ECHO_VALUE, _ECHO_VALUE)
_ECHO_LINE = re.compile(rb"(\d{1,19}) FETCH \((?:(?:%s) )*UID (\d{1,19})(?: (?:%s))*\)"
                        % (_ECHO_ITEM, _ECHO_ITEM))


# The answer to a FETCH is thousands of lines of one shape, most of them buffered whole
# when they are read: ``* 7 FETCH (UID 9 ... {24}`` CRLF, the literal's 24 octets, and the
# rest of the answer ending in ")" CRLF (or one line ending so, without a literal).  Such an
# answer is taken out of the buffer as the line-by-line reader (_Protocol._read_line) would
# join it, byte for byte: a literal's size in the plain form that reader writes back (no
# "+", no leading zero), a line ending in ")" that its rstrip leaves alone.  Anything else
# (another kind of line, a literal still arriving, a second literal, NIL for a literal too
# big) ends the run, and that reader takes the rest with all its checks.
_FRAMED_FETCH = re.compile(rb"\* [0-9]+ FETCH \(")
_PLAIN_LITERAL_END = re.compile(rb"\{(0|[1-9][0-9]*)\}\r\n")


class _BufferedWire:
    """Mixin for imaplib.IMAP4 classes: our own read buffer with timeouts that recover."""

    _rbuf: bytearray
    max_line = MAX_RESPONSE_LINE        # set per command by GmailConnection
    _window: Optional[float] = None     # seconds per progress window; None: not watched
    _window_start = 0.0
    _window_bytes = 0
    _lines_left: Optional[int] = None
    stop: Optional[Stop] = None         # the connection's Stop, set by GmailConnection
    _stop_deadline: Optional[float] = None

    def open(self, host: str, port: int, timeout: Optional[float] = None) -> None:
        self._rbuf = bytearray()
        self.watch_progress(timeout, lines=IMAPLIB_MAX_LINES)    # the greeting, CAPABILITY
        super().open(host, port, timeout)  # type: ignore[misc]

    def _create_socket(self, timeout: Optional[float] = None) -> socket.socket:
        sock = super()._create_socket(timeout)  # type: ignore[misc]
        # Pipelined commands go out as several small writes: with Nagle's algorithm the
        # second waits for the server's (delayed) ACK of the first, some 40 ms a time.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _check_stop(self) -> None:
        """Raise StopRequested once a stop was asked for and its grace has run out."""
        stop = self.stop
        if stop is None or not stop.requested:
            return
        now = time.monotonic()
        if self._stop_deadline is None:
            timeout = self.sock.gettimeout()  # type: ignore[attr-defined]
            self._stop_deadline = now + min(STOP_GRACE, timeout or STOP_GRACE)
        elif now >= self._stop_deadline:
            raise StopRequested("stopped while reading the server's answer", stop.signum)

    def _wait_for_data(self, sock: socket.socket) -> None:
        """Block until ``sock`` is readable, as recv would, but look at the stop every
        STOP_POLL seconds; raises socket.timeout after the socket's own timeout."""
        if self.stop is None or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return
        timeout = sock.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_stop()
            wait = STOP_POLL if deadline is None else min(STOP_POLL, deadline - time.monotonic())
            if wait <= 0:
                raise socket.timeout("timed out")
            try:
                if select.select([sock], [], [], wait)[0]:
                    return
            except (OSError, ValueError) as exc:     # closed under us: as recv would say
                raise OSError(f"cannot wait for the server: {exc}") from exc

    def watch_progress(self, window: Optional[float], lines: Optional[int] = None) -> None:
        """From now on, an answer must bring STALL_MIN_BYTES per ``window`` seconds, or the
        next read raises TimeoutError; None stops watching (IDLE waits for as long as it
        likes).  A socket timeout alone cannot see a server that sends one byte a second.

        ``lines`` bounds the lines read until the next call: imaplib itself reads the
        greeting and the answers to its CAPABILITY and STARTTLS, and keeps every untagged
        line it sees, so there a flood must end the connection instead."""
        self._window = window if window and window > 0 else None
        self._window_start = time.monotonic()
        self._window_bytes = 0
        self._lines_left = lines

    def _fill(self) -> bool:
        sock = self.sock  # type: ignore[attr-defined]
        if self._window is not None:
            now = time.monotonic()
            if now - self._window_start >= self._window:
                if self._window_bytes < STALL_MIN_BYTES:
                    raise TimeoutError(f"the server sent only {self._window_bytes} bytes in "
                                       f"{self._window:g} s; the connection is stalled")
                self._window_start, self._window_bytes = now, 0
        self._wait_for_data(sock)
        chunk = sock.recv(65536)
        if not chunk:
            return False
        self._window_bytes += len(chunk)
        self._rbuf += chunk
        self._rbuf_sock = sock
        return True

    def _check_buffer(self) -> None:
        """Bytes buffered from the plaintext socket must never be read as if TLS had
        protected them: a server (or a man in the middle) that sends data right after the
        STARTTLS OK would otherwise inject responses (CVE-2011-0411 style)."""
        if self._rbuf and getattr(self, "_rbuf_sock", None) is not self.sock:  # type: ignore[attr-defined]
            raise imaplib.IMAP4.error("the server sent plaintext data after agreeing to "
                                      "STARTTLS; refusing it as a possible injection")

    def read(self, size: int) -> bytes:
        self._check_buffer()
        while len(self._rbuf) < size:
            if not self._fill():
                raise EOFError("connection closed by the server in the middle of a literal")
        data = bytes(self._rbuf[:size])
        del self._rbuf[:size]
        return data

    def framed_fetches(self, limit: int) -> List[bytes]:
        """The untagged FETCH answers buffered whole, taken out of the buffer in one pass
        (see _FRAMED_FETCH), each as _Protocol._read_line would return it.  They end where
        that reader must look: at the first line not in the plain shape, a literal over
        ``limit``, a line over ``max_line``, the end of the buffer; none at all while a stop
        is asked for, lines are counted or the bytes came from a socket STARTTLS replaced."""
        rbuf = self._rbuf
        stop = self.stop
        if not rbuf or self._lines_left is not None or (stop is not None and stop.requested) \
                or getattr(self, "_rbuf_sock", None) is not self.sock:  # type: ignore[attr-defined]
            return []
        lines: List[bytes] = []
        pos, max_line = 0, self.max_line
        starts, literal_end = _FRAMED_FETCH.match, _PLAIN_LITERAL_END.fullmatch
        while starts(rbuf, pos):
            end = rbuf.find(b"\n", pos)
            if end < 0 or end - pos > max_line:
                break
            if rbuf[end - 2] == 0x29 and rbuf[end - 1] == 0x0D:     # ")" CRLF: no literal
                lines.append(bytes(rbuf[pos:end - 1]))
                pos = end + 1
                continue
            brace = rbuf.rfind(b"{", pos, end)
            literal = literal_end(rbuf, brace, end + 1) if brace >= 0 else None
            if literal is None:
                break
            size = int(literal.group(1))
            close = end + 1 + size      # where the line after the literal begins
            if size > limit or close > len(rbuf):
                break
            tail = rbuf.find(b"\n", close)
            if tail - 2 < close or tail - close > max_line or rbuf[tail - 2] != 0x29 \
                    or rbuf[tail - 1] != 0x0D:
                break
            lines.append(bytes(rbuf[pos:tail - 1]))
            pos = tail + 1
        if pos:
            del rbuf[:pos]
        return lines

    def readline(self) -> bytes:
        self._check_buffer()
        self._check_stop()
        if self._lines_left is not None:
            if self._lines_left <= 0:
                raise ProtocolError("the server sent far more lines than the greeting, "
                                    "CAPABILITY, STARTTLS or signing in can need")
            self._lines_left -= 1
        scanned = 0
        while True:
            end = self._rbuf.find(b"\n", scanned)
            if end > self.max_line or (end < 0 and len(self._rbuf) > self.max_line):
                raise ProtocolError(f"server sent a line longer than {self.max_line} bytes")
            if end >= 0:
                line = bytes(self._rbuf[:end + 1])
                del self._rbuf[:end + 1]
                return line
            scanned = len(self._rbuf)
            if not self._fill():
                line = bytes(self._rbuf)
                self._rbuf.clear()
                return line

    def _get_capabilities(self) -> None:
        """imaplib's, without its trap: it decodes the pre-login CAPABILITY as strict ASCII,
        so one 8-bit byte there (or in a greeting's [CAPABILITY] code it falls back to) was
        a UnicodeDecodeError.  An atom with 8-bit bytes names no capability we could use:
        it is ignored."""
        typ, dat = self.capability()  # type: ignore[attr-defined]
        if dat == [None]:
            raise imaplib.IMAP4.error("no CAPABILITY response from server")
        last = dat[-1] if isinstance(dat[-1], bytes) else b""
        self.capabilities = tuple(word.decode("ascii").upper()
                                  for word in last.split() if word.isascii())

    def wait_readable(self, timeout: float) -> bool:
        """True when a read would not block: data buffered here or in TLS, or on the socket."""
        sock = self.sock  # type: ignore[attr-defined]
        if getattr(self, "_rbuf", None) or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return True
        return bool(select.select([sock], [], [], max(0.0, timeout))[0])


class _GreetingTimeout(socket.timeout):
    """The port took the connection but sent no greeting: what a TLS-only port does to a
    client that speaks plain IMAP (the server waits for a TLS hello that never comes)."""


class _PlainWire(_BufferedWire, imaplib.IMAP4):
    def _connect(self) -> None:   # imaplib: read the greeting, then CAPABILITY
        try:
            super()._connect()  # type: ignore[misc]
        except socket.timeout as exc:
            if getattr(self, "welcome", None):   # greeted, then went quiet: an ordinary timeout
                raise
            raise _GreetingTimeout("no greeting from the server") from exc


class _TLSWire(_BufferedWire, imaplib.IMAP4_SSL):
    """_PlainWire's twin over implicit TLS (port 993)."""


@dataclass(frozen=True)
class Folder:
    """One folder (or Gmail label) as LIST reports it.

    ``Folder(name="[Gmail]/Trash", delimiter="/", flags=frozenset({"\\\\HasNoChildren", "\\\\Trash"}))``
    """

    name: str
    delimiter: Optional[str]
    flags: frozenset
    # The name exactly as LIST sent it (modified UTF-7, or the raw octets of a server that
    # sends UTF-8 or worse); this, not a re-encoding of ``name``, is what goes back.
    wire: Optional[bytes] = field(default=None, compare=False, repr=False)

    @property
    def special_use(self) -> Optional[str]:
        """The RFC 6154 attribute such as ``"\\\\Trash"``, or None."""
        return next((use for use in SPECIAL_USES
                     if any(flag.lower() == use.lower() for flag in self.flags)), None)

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
    Only a checked plain EXPUNGE (no UIDPLUS, see GmailConnection.move) fills the other
    two: ``stayed``, ours still in the source folder after it (copied, but another client
    cleared their \\Deleted flag: not moved), and ``others_expunged``, how many messages
    that were not ours it removed (another client marked them \\Deleted meanwhile).
    """

    moved: Mapping[int, Optional[int]]
    missing: Tuple[int, ...] = ()
    stayed: Tuple[int, ...] = ()
    others_expunged: int = 0


@dataclass
class _ExpungeCheck:
    """What a checked plain EXPUNGE did that was not asked for (see _SafeCopy.expunge_only)."""

    stayed: List[int] = field(default_factory=list)   # ours, still in the folder
    others: int = 0                                   # messages not ours it removed

    def add(self, other: "_ExpungeCheck") -> None:
        self.stayed.extend(other.stayed)
        self.others += other.others

    def describe(self, folder: str, destination: str) -> str:
        """``"1 other message was deleted for good; UID 7 stayed in INBOX (...)"``."""
        parts = []
        if self.others:
            one = self.others == 1
            parts.append(f"{self.others} other message{'' if one else 's'} marked \\Deleted "
                         f"by another client {'was' if one else 'were'} deleted for good")
        if self.stayed:
            parts.append(f"UID {compress_uids(self.stayed)} stayed in {folder} (their "
                         f"\\Deleted flag was cleared; a copy is in {destination} too), so "
                         f"{'it was' if len(self.stayed) == 1 else 'they were'} not moved")
        return "; ".join(parts)


# Untagged answers a command's caller reads.  Everything else that arrives meanwhile
# (EXISTS, EXPUNGE, RECENT, FLAGS, unsolicited FETCH: RFC 3501 §7) updates the connection's
# state and is dropped, so a server that floods them cannot fill memory.
_STATE_UPDATES = ("EXISTS", "EXPUNGE", "RECENT", "FETCH", "FLAGS")
_UNTAGGED_NEEDED: Dict[str, Tuple[str, ...]] = {
    "SELECT": ("OK", "EXISTS", "FLAGS"), "EXAMINE": ("OK", "EXISTS", "FLAGS"),
    "FETCH": ("FETCH",), "UID FETCH": ("FETCH",),
    "SEARCH": ("SEARCH", "ESEARCH"), "UID SEARCH": ("SEARCH", "ESEARCH"),
    "NOOP": _STATE_UPDATES, "IDLE": _STATE_UPDATES,
}


def _needed_by(command: str) -> Callable[[List[Any]], bool]:
    """The default ``keep`` test of a command's untagged answers (see _UNTAGGED_NEEDED)."""
    wanted = _UNTAGGED_NEEDED.get(command.upper())

    def keep(item: List[Any]) -> bool:
        kind = _untagged_kind(item)
        if kind in ("OK", "NO", "BAD", "PREAUTH"):   # only those with a response code
            return len(item) > 1 and bool(item[1]) and (wanted is None or kind in wanted)
        return kind in wanted if wanted is not None else kind not in _STATE_UPDATES
    return keep


# Commands send_ahead may pipeline: reads, and the writes of a _WriteFlight.
_PIPELINED = ("UID FETCH", "STATUS", "CREATE", "UID STORE", "UID COPY", "UID MOVE")


@dataclass
class _Pending:
    """A pipelined command: sent on ``imap``, its answer not read yet (or read early)."""

    imap: Any
    tag: bytes
    command: str
    response: Optional[_Response] = None
    keep: Optional[Callable[[List[Any]], bool]] = None    # as for _Protocol.execute
    max_literal: Optional[int] = None
    early: List[List[Any]] = field(default_factory=list)  # its untagged answers read early
    budget: Optional["_AnswerBudget"] = None    # what those cost (see _Protocol._early)


class _AnswerBudget:
    """What one command's answer has cost so far, against MAX_UNREQUESTED_ANSWERS,
    MAX_UNREQUESTED_BYTES and MAX_KEPT_BYTES; ``kept`` also merges a FETCH's answers per
    UID (latest item wins: servers send FLAGS updates in the middle of a FETCH)."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.unrequested = 0
        self.unrequested_bytes = 0
        self.kept_bytes = 0
        self.warnings = 0
        self._by_uid: Dict[int, Tuple[List[Any], int]] = {}   # uid -> (item, its weight)

    def _refuse(self, what: str) -> ProtocolError:
        return ProtocolError(f"the server sent {what} in its answer to {self.command}; "
                             f"refusing the answer as a flood", command=self.command)

    def unasked(self, size: int, update: bool) -> None:
        """Count an untagged answer that is not kept; ``update`` for EXISTS, EXPUNGE,
        RECENT, FLAGS and FETCH, which are legitimate in any number but not in any size."""
        self.unrequested_bytes += size
        if not update:
            self.unrequested += 1
            if self.unrequested > MAX_UNREQUESTED_ANSWERS:
                raise self._refuse(f"more than {MAX_UNREQUESTED_ANSWERS} untagged answers "
                                   f"it did not ask for")
        if self.unrequested_bytes > MAX_UNREQUESTED_BYTES:
            raise self._refuse(f"more than {MAX_UNREQUESTED_BYTES} bytes of untagged answers "
                               f"it did not ask for")

    def kept(self, untagged: List[List[Any]], item: List[Any], size: int,
             weight: Optional[int] = None) -> None:
        """Keep ``item`` (``size`` bytes on the wire) in ``untagged``, or merge it into the
        FETCH already kept for the same UID; ``weight``: _weight(item[2]) if known."""
        uid = _fetch_uid(item) if _untagged_kind(item) == "FETCH" else None
        if uid is not None and uid in self._by_uid:
            earlier, weight = self._by_uid[uid]
            merged = _pairs(earlier[2])
            merged.update(_pairs(item[2]))
            earlier[2] = [part for pair in merged.items() for part in pair]
            size = _weight(earlier[2])
            self.kept_bytes += size - weight
            self._by_uid[uid] = (earlier, size)
        else:
            if len(untagged) >= MAX_KEPT_UNTAGGED:
                raise self._refuse(f"more than {MAX_KEPT_UNTAGGED} answers")
            if uid is not None:
                size = _weight(item[2]) if weight is None else weight
                self._by_uid[uid] = (item, size)
            self.kept_bytes += size
            untagged.append(item)
        if self.kept_bytes > MAX_KEPT_BYTES:
            raise self._refuse(f"more than {MAX_KEPT_BYTES} bytes worth keeping (the most "
                               f"one command may keep)")

    def warn(self, message: str, *args: Any) -> None:
        """A warning about the server, said at most three times per command."""
        self.warnings += 1
        if self.warnings <= 3:
            log.warning(message, *args)
        else:
            log.debug(message, *args)


CredentialSource = Union[str, Callable[[], str], None]


def _credential(source: CredentialSource) -> Optional[str]:
    return source() if callable(source) else source


def _loopback_addresses(host: str, port: int = IMAP_PORT) -> List[str]:
    """Every address ``host`` resolves to, if all are loopback; else []. A name proves
    nothing ("localhost" can be mapped anywhere in /etc/hosts), so plaintext is allowed
    by address, and the connection then goes to the address that was checked."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        return []
    addresses = list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))
    with contextlib.suppress(ValueError):   # not an address at all
        if all(ipaddress.ip_address(address).is_loopback for address in addresses):
            return addresses
    return []


def _is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    return bool(_loopback_addresses(host))


def _check_credential(value: Any, what: str) -> None:
    """Refuse a user name, password or token that could end the command line."""
    if isinstance(value, str) and any(c in value for c in "\r\n\x00"):
        raise CredentialError(f"the {what} contains a line break or NUL character, which "
                              f"could inject commands; remove it (check where the {what} "
                              f"comes from: option, environment, netrc, command or rules file)")


_APP_PASSWORD_RE = re.compile(r"[a-zA-Z]{4}( ?[a-zA-Z]{4}){3}\Z")


def _clean_password(password: str) -> str:
    """Strip the spaces Google shows inside a 16-letter app password; leave others alone."""
    stripped = password.strip()
    return stripped.replace(" ", "") if _APP_PASSWORD_RE.match(stripped) else password


def _scrubbed(method: Callable[..., Any]) -> Callable[..., Any]:
    """For the methods that read server text: an error leaving them has every credential
    blanked out of its message and ``text`` (see _Protocol.redact)."""
    def scrubbing(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (GmailClassifyError, _Dropped) as exc:
            if exc.args and isinstance(exc.args[0], str):
                exc.args = (self.redact(exc.args[0]),) + exc.args[1:]
            if isinstance(exc, ImapError):
                exc.text = self.redact(exc.text)
            raise
    scrubbing.__name__ = method.__name__
    scrubbing.__doc__ = method.__doc__
    return scrubbing


def _forwarded(name: str) -> property:
    """An attribute of GmailConnection that lives in its protocol engine (``_proto``)."""
    return property(lambda self: getattr(self._proto, name),
                    lambda self, value: setattr(self._proto, name, value))


def _decode_server_text(error: BaseException) -> str:
    """imaplib raises with bytes inside (``"b'[AUTHENTICATIONFAILED] ...'"``); decode it."""
    if isinstance(error, OSError):
        return str(error) or type(error).__name__
    text = error.args[0] if error.args else str(error)
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    match = re.fullmatch(r"b(['\"])(.*)\1", text, re.S)
    return match.group(2) if match else text


class _Protocol:
    """The protocol engine under GmailConnection: sends commands (quoting, literals,
    pipelining), reads and parses their answers through the bounded reader, and keeps
    every credential it sent out of what it says.  It owns one imaplib object at a time
    (``imap``; None when there is no connection) and never retries: a drop raises
    _Dropped, and GmailConnection decides what happens next.

    Counters and the selected folder outlive each imaplib object; GmailConnection shows
    them as its own attributes (``commands_sent``, ``exists_seen`` ...).
    """

    def __init__(self, host: str, user: str, timeout: float, stop: Stop) -> None:
        self.host, self.user, self.timeout, self.stop = host, user, timeout, stop
        self.imap: Optional[imaplib.IMAP4] = None
        self.capabilities: frozenset = frozenset()
        self.selected: Optional[FolderStatus] = None
        self.idling = False
        self.last_activity = time.monotonic()
        self.commands_sent = 0
        self.bytes_received = 0
        # EXISTS responses seen, with any command or in IDLE: new mail in the selected
        # folder is announced once, to whichever command comes next (RFC 3501 §7.3.1).
        self.exists_seen = 0
        self._inflight: List[_Pending] = []   # pipelined commands, oldest first
        self._secrets: List[str] = []   # credentials sent, kept out of -vv logs

    def live(self) -> imaplib.IMAP4:
        if self.imap is None:
            raise _Dropped("not connected")
        return self.imap

    def drop(self) -> None:
        """Forget the imaplib object and close its socket, without a word; never raises."""
        imap, self.imap = self.imap, None
        if imap is not None:
            with contextlib.suppress(OSError, AttributeError, ValueError):
                imap.shutdown()

    # -- signing in --------------------------------------------------------------------

    def remember_secret(self, secret: str) -> None:
        """Keep ``secret`` (and its base64 and quoted forms) out of every text that leaves
        the connection: a server may repeat what we sent (see redact)."""
        forms = [secret, base64.b64encode(secret.encode("utf-8")).decode("ascii"),
                 secret.replace("\\", "\\\\").replace('"', '\\"')]
        # And each as repr() shows it, of text or of bytes (a message quoting a server line
        # or a parser's fragment that way doubles backslashes and escapes quotes).
        forms += [shown for form in forms[::2] for shown in (
            repr(form)[1:-1], repr(form.encode("utf-8"))[2:-1])]
        kept = dict.fromkeys(self._secrets + [form for form in forms if len(form) >= 4])
        self._secrets = sorted(kept, key=len, reverse=True)   # longer forms before their parts

    def redact(self, text: str) -> str:
        """``text`` from the server with every credential we sent blanked out.

        A server may quote the command it refuses (``NO your command was LOGIN "user"
        "secret"``), put it in an untagged NO or ALERT, or echo a SASL string in a
        challenge; such text reaches messages, warnings, logs and the audit log, so every
        piece of server text passes through here first.
        """
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    def login(self, password: str) -> None:
        """LOGIN with both arguments quoted; non-ASCII goes as AUTHENTICATE PLAIN (UTF-8,
        RFC 4616) when offered, else as literals."""
        if not (self.user.isascii() and password.isascii()) and \
                "AUTH=PLAIN" in self.imap.capabilities:
            initial = b"\x00" + self.user.encode("utf-8") + b"\x00" + password.encode("utf-8")
            self.remember_secret(base64.b64encode(initial).decode("ascii"))
            self.sasl("PLAIN", initial, "the sign-in")
            return
        try:
            self.execute("LOGIN", _string_arg(self.user), _string_arg(password), redact=True)
        except ProtocolError:
            raise
        except ImapError as exc:
            text = (f"[{exc.code}] " if exc.code else "") + exc.text
            # Gmail refuses the account's normal password over IMAP: say what works instead.
            gmail = "X-GM-EXT-1" in self.imap.capabilities or \
                self.host.lower().rstrip(".").endswith((".gmail.com", ".googlemail.com"))
            hint = (" (Gmail needs an app password, not your Google password: Google Account "
                    "-> Security -> App passwords, which needs 2-Step Verification; and IMAP "
                    "must be on in Gmail's settings, under Forwarding and POP/IMAP)"
                    if gmail else "")
            raise AuthenticationError(f"{self.host} rejected the sign-in for {self.user}: "
                                      f"{text}{hint}", command="LOGIN",
                                      status=exc.status, code=exc.code, text=text) from exc

    def sasl(self, mechanism: str, initial: bytes, what: str) -> None:
        """AUTHENTICATE ``mechanism`` (RFC 3501 §6.2.2), the initial response on the first
        line when the server has SASL-IR (RFC 4959), else after the first ``+``.

        Gmail answers a bad XOAUTH2 token with a JSON challenge and waits for an empty
        response before it sends the tagged NO; resending the token there gets a BAD.
        """
        imap = self.live()
        tag = imap._new_tag()  # type: ignore[attr-defined]
        encoded = base64.b64encode(initial) or b"="
        line = tag + b" AUTHENTICATE " + mechanism.encode("ascii")
        pending: Optional[bytes] = encoded
        if "SASL-IR" in imap.capabilities:
            line += b" " + encoded
            pending = None
        log.debug("C: %s AUTHENTICATE %s%s", tag.decode(), mechanism,
                  "" if pending else " <redacted>")
        challenges: List[str] = []
        try:
            # Untagged lines mean nothing here: a few are harmless, a flood is not.
            imap.watch_progress(self.timeout, lines=MAX_UNREQUESTED_ANSWERS)  # type: ignore[attr-defined]
            imap.send(line + b"\r\n")
            while True:
                raw = self._read_line()
                if raw.startswith(b"+"):
                    if pending is not None and not challenges:
                        imap.send(pending + b"\r\n")
                        pending = None
                        challenges.append("")
                        continue
                    if len(challenges) > 3:
                        raise ProtocolError(f"{self.host} keeps challenging AUTHENTICATE "
                                            f"{mechanism}", command="AUTHENTICATE")
                    try:
                        challenges.append(base64.b64decode(raw[1:].strip()).decode("utf-8", "replace"))
                    except (binascii.Error, ValueError):
                        challenges.append(raw[1:].strip().decode("utf-8", "replace"))
                    imap.send(b"\r\n")
                elif raw.startswith(tag + b" "):
                    status, _, rest = raw[len(tag) + 1:].partition(b" ")
                    if status.upper() == b"OK":
                        return
                    code = parse_status_text(rest)[0]
                    text = rest.decode("utf-8", "replace")
                    detail = "".join(f" ({c})" for c in challenges if c)
                    raise AuthenticationError(
                        f"{self.host} rejected {what} for {self.user}: {text}{detail}",
                        command="AUTHENTICATE", status=status.decode("ascii", "replace").upper(),
                        code=code, text=text + detail)
                elif raw.startswith(b"* BYE"):
                    raise _Dropped("server said BYE while signing in: "
                                   + raw[6:].decode("utf-8", "replace"))
                elif not raw.startswith(b"* "):
                    raise ProtocolError(f"unexpected line while signing in: {self._shown(raw)}",
                                        command="AUTHENTICATE")
        except _DROPPED_ERRORS as exc:
            raise _Dropped(f"connection lost while signing in: "
                           f"{_decode_server_text(exc) or type(exc).__name__}") from exc

    # -- sending commands and reading answers ----------------------------------------

    @_scrubbed
    def execute(self, command: str, *args: Any, expect_bye: bool = False,
                on_untagged: Optional[Callable[[List[Any]], None]] = None,
                keep: Optional[Callable[[List[Any]], bool]] = None,
                max_literal: Optional[int] = None, redact: bool = False) -> _Response:
        """Send one command and read its whole answer; the caller holds the lock.

        ``args`` are bytes (sent as they are), str (sent as they are: callers build them
        with quote/astring/compress_uids), int, or Literal.  ``keep`` chooses the untagged
        answers worth keeping (default: what _needed_by says the command needs);
        ``max_literal`` bounds each literal (larger ones in a FETCH are dropped and listed
        in ``oversized``; elsewhere they are a ProtocolError); ``redact`` keeps the
        arguments out of the debug log.  Raises _Dropped when the connection dies,
        ImapError on NO/BAD, ProtocolError on garbage (and the connection is then closed).
        """
        imap = self.live()
        if self._inflight:
            self.drain()   # pipelined answers come first on the wire
        tag = _new_tag(imap)
        parts = self._command_parts(tag, command, args)
        self._log_command(tag, command, ["<redacted>"] if redact else args)
        self._watch(command)
        try:
            with self._reading(command):
                self._send(tag, parts)
                response = self._read_response(tag, command, expect_bye, on_untagged,
                                               keep=keep, max_literal=max_literal)
        finally:
            self.commands_sent += 1
            self.last_activity = time.monotonic()
        return self._checked(response, command, expect_bye)

    @contextlib.contextmanager
    def _reading(self, command: str) -> Iterator[None]:
        """Around sending a command or reading its answer: a stop, or an answer that makes
        no sense (a UIDVALIDITY that is no number too: nothing a server sends may crash
        us), leaves the rest unread and the stream out of step, so the connection (and any
        pipelined answer) is dropped rather than misread.  A lost link is _Dropped."""
        try:
            yield
        except (StopRequested, ProtocolError, ValueError, TypeError, IndexError,
                RecursionError) as exc:
            self._inflight.clear()
            self.drop()
            if isinstance(exc, (StopRequested, ProtocolError)):
                raise
            raise ProtocolError(f"the server's answer to {command} makes no sense: "
                                f"{type(exc).__name__}: {str(exc)[:200]}",
                                command=command) from exc
        except _DROPPED_ERRORS as exc:
            self._inflight.clear()   # their answers are lost: the callers send again
            raise _Dropped(f"{command} failed: "
                           f"{_decode_server_text(exc) or type(exc).__name__}") from exc

    @staticmethod
    def _checked(response: _Response, command: str, expect_bye: bool = False) -> _Response:
        """``response`` when it is OK (or the BYE expected), else ImapError quoting it."""
        if response.status == "OK" or (expect_bye and response.status == "BYE"):
            return response
        raise ImapError(f"the server answered {response.status} to {command}: "
                        f"{response.text}", command=command, status=response.status,
                        code=response.code, text=response.text)

    def _watch(self, command: str) -> None:
        """Before reading an answer: restart the progress window, set the line limit."""
        if hasattr(self.imap, "watch_progress"):
            self.imap.watch_progress(self.timeout)  # type: ignore[attr-defined]
            self.imap.max_line = (self.search_line_limit()  # type: ignore[attr-defined]
                             if command.endswith("SEARCH") else MAX_RESPONSE_LINE)

    @staticmethod
    def _command_parts(tag: bytes, command: str, args: Sequence[Any]) -> List[Union[bytes, Literal]]:
        parts: List[Union[bytes, Literal]] = [tag + b" " + command.encode("ascii")]
        for arg in args:
            if isinstance(arg, (Literal, bytes)):
                parts.append(arg)
            else:
                text = str(arg)
                _refuse_controls(text, "the argument")
                parts.append(text.encode("utf-8"))
        return parts

    # -- pipelining (RFC 3501 §5.5) ---------------------------------------------------
    #
    # Read-only UID FETCHes may be sent before the answer to the previous one has come
    # back, so that the server and the network work while we parse and classify.  Each
    # stays in _inflight until its answer is read; any other command first reads those
    # answers (and keeps them), so the wire never interleaves.  STATUS of several folders
    # goes the same way (it only reads).  Writes are pipelined only by _WriteFlight, for a
    # step whose write-ahead intents are on disk, and never sent again blindly.  After a
    # drop, every FETCH whose answer had not completed is sent again.

    def send_ahead(self, command: str, *args: Any,
                   keep: Optional[Callable[[List[Any]], bool]] = None,
                   max_literal: Optional[int] = None) -> _Pending:
        """Send a read-only command without waiting for its answer; the caller holds the
        lock.  ``keep`` and ``max_literal`` apply when the answer is read, as in execute."""
        if command not in _PIPELINED:
            raise AssertionError(f"only {', '.join(_PIPELINED)} may be pipelined, not {command}")
        imap = self.live()
        tag = _new_tag(imap)
        parts = self._command_parts(tag, command, args)
        self._log_command(tag, command, args)
        try:
            with self._reading(command):
                self._send(tag, parts)
        finally:
            self.commands_sent += 1
            self.last_activity = time.monotonic()
        pending = _Pending(imap, tag, command, keep=keep, max_literal=max_literal)
        self._inflight.append(pending)
        return pending

    @_scrubbed
    def collect(self, pending: _Pending) -> _Response:
        """Read answers in the order sent up to ``pending``'s; raises as execute does."""
        while pending.response is None or any(p is pending for p in self._inflight):
            imap = self.imap
            if imap is None or pending.imap is not imap or pending not in self._inflight:
                raise _Dropped(f"{pending.command} was sent on a connection that is gone")
            first = self._inflight[0]
            if first.response is None:      # else its tagged answer came early
                try:
                    with self._reading(first.command):
                        self._watch(first.command)
                        first.response = self._read_response(
                            first.tag, first.command, False, None, keep=first.keep,
                            max_literal=first.max_literal, early=first.early)
                finally:
                    self.last_activity = time.monotonic()
            self._inflight.pop(0)
        return self._checked(pending.response, pending.command)

    def drain(self) -> None:
        """Read every pipelined answer still on the wire (kept for whoever sent it)."""
        self._inflight = [p for p in self._inflight if p.imap is self.imap]
        while self._inflight:
            with contextlib.suppress(ImapError):    # kept in the answer; its sender raises it
                self.collect(self._inflight[-1])

    # -- the wire: lines, literals, answers ---------------------------------------------

    @staticmethod
    def _log_command(tag: bytes, command: str, args: Sequence[Any]) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        shown = (f"{{{len(arg.data)} bytes}}" if isinstance(arg, Literal) else
                 arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
                 for arg in args)
        log.debug("C: %s %s %s", tag.decode(), command,
                  " ".join(text if len(text) < 200 else text[:200] + "..." for text in shown))

    def _said(self, raw: bytes, width: int) -> str:
        """One server line as we show it: every credential of ours blanked out first, then
        cut to ``width`` characters (blanked out after the cut, a password cut in two
        went through)."""
        text = self.redact(raw.decode("utf-8", "replace").rstrip("\r\n"))
        return text if len(text) <= width else text[:width] + "..."

    def _shown(self, raw: bytes) -> str:
        """A server line quoted in an error message (_said, then quoted)."""
        return repr(self._said(raw, 80))

    def _log_answer(self, raw: bytes) -> None:
        """-vv: one server line, shortened, with any credential of ours blanked out."""
        log.debug("S: %s", self._said(raw, 200))

    def _send(self, tag: bytes, parts: List[Union[bytes, Literal]]) -> None:
        imap = self.live()
        nonsync = bool({"LITERAL+", "LITERAL-"} & self.capabilities)
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
            budget = _AnswerBudget("a literal's continuation")
            raw = self._read_line()
            while not raw.startswith(b"+"):     # the server's go-ahead for the literal
                if raw.startswith(tag + b" "):
                    code, _, text = parse_status_text(raw[len(tag) + 1:].split(b" ", 1)[-1])
                    raise ImapError(f"the server refused a literal: {text}", status="NO",
                                    code=code, text=text)
                if raw.startswith(b"* BYE"):
                    raise _Dropped("server said BYE: " + raw[6:].decode("utf-8", "replace"))
                budget.unasked(len(raw), update=False)
                raw = self._read_line()
            line = part.data
        imap.send(line + b"\r\n")

    def _read_line(self, max_literal: Optional[int] = None,
                   dropped: Optional[List[int]] = None) -> bytes:
        """One response line with any literals it announces inlined, CRLF stripped.

        A literal larger than ``max_literal`` (default MAX_SMALL_LITERAL) is never kept:
        with a ``dropped`` list it is read in small pieces, thrown away, replaced by NIL
        and its size appended to ``dropped``; without one it is a ProtocolError.
        """
        limit = MAX_SMALL_LITERAL if max_literal is None else max_literal
        imap = self.live()
        line = imap.readline()
        if not line:
            raise EOFError("connection closed by the server")
        data = bytearray()
        while True:
            self.bytes_received += len(line)
            if not line.endswith(b"\r\n"):
                if not line.endswith(b"\n"):
                    raise EOFError("connection closed in the middle of a line")
            match = _LITERAL_AT_END.search(line) if line.endswith((b"}\r\n", b"}\n")) else None
            if not match:
                if not data:            # most lines: no literal, nothing to join
                    return line.rstrip(b"\r\n")
                data += line.rstrip(b"\r\n")
                return bytes(data)
            size = int(match.group(1))
            if size > limit:
                if dropped is None:
                    raise ProtocolError(f"the server announced a literal of {size} bytes where "
                                        f"at most {limit} make sense")
                left = size
                while left:
                    left -= len(imap.read(min(left, 65536)))
                self.bytes_received += size
                dropped.append(size)
                data += line[:match.start()] + b"NIL"
            else:
                data += line[:match.start()] + b"{%d}\r\n" % size
                data += imap.read(size)
                self.bytes_received += size
            line = imap.readline()
            if not line:
                raise EOFError("connection closed after a literal")

    def _read_response(self, tag: bytes, command: str, expect_bye: bool,
                       on_untagged: Optional[Callable[[List[Any]], None]],
                       keep: Optional[Callable[[List[Any]], bool]] = None,
                       max_literal: Optional[int] = None,
                       early: Optional[List[List[Any]]] = None) -> _Response:
        untagged: List[List[Any]] = list(early or ())
        oversized: List[List[Any]] = []
        keep = keep or _needed_by(command)
        budget = _AnswerBudget(command)
        debug = log.isEnabledFor(logging.DEBUG)
        # A FETCH's own answer lines are what it keeps: no write's echo to pass over.
        fetching = command.endswith("FETCH")
        # Untagged FETCH answers buffered whole are taken in one pass, each as _read_line
        # would have read it (see _BufferedWire.framed_fetches), and looked at in turn.  A
        # FETCH's own are parsed and kept at once: an untagged FETCH has no status to look
        # at, no count to note (note_untagged), no size to check (_plausible).
        framed = getattr(self.imap, "framed_fetches", None)
        limit = MAX_SMALL_LITERAL if max_literal is None else max_literal
        run: List[bytes] = []       # those not looked at yet, the next one last
        while True:
            dropped: List[int] = []
            if not run and framed is not None:
                run = framed(limit)
                run.reverse()
            own = False         # a framed line of a FETCH's own answer
            if run:
                raw = run.pop()
                self.bytes_received += len(raw) + 2
                own = fetching and on_untagged is None
            else:
                raw = self._read_line(max_literal, dropped if fetching else None)
            if debug:
                self._log_answer(raw)
            if own:
                parsed, weight = _parse_weighed(raw[2:])
            elif raw.startswith(b"* "):
                body = raw[2:]
                space = body.find(b" ")     # the first word, without copying the rest
                kind = (body if space < 0 else body[:space]).upper()
                if kind in (b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"):
                    rest = body[space + 1:] if space >= 0 else b""
                    code, args, text = parse_status_text(rest)
                    text = self.redact(text)
                    if kind == b"BYE":
                        if expect_bye:
                            continue
                        raise _Dropped(f"server said BYE: {text}")
                    if kind in (b"NO", b"BAD") or code == "ALERT":
                        budget.warn("server: %s %s", kind.decode(), text)
                    status_line = [kind.decode(), code, args, text]
                    if keep(status_line):
                        budget.kept(untagged, status_line, len(raw))
                    else:
                        budget.unasked(len(raw), update=False)
                    continue
                if not self._plausible(body, command):
                    budget.unasked(len(raw), update=False)
                    continue
                if on_untagged is None and not fetching and self._passed_over(body, keep, tag):
                    budget.unasked(len(raw), update=True)
                    continue
                parsed, weight = _parse_weighed(body)
                self.note_untagged(parsed)
                if on_untagged is not None:
                    on_untagged(parsed)
            elif raw.startswith(tag + b" "):
                response = self._tagged(raw[len(tag) + 1:], untagged, oversized)
                if "THROTTLED" in response.text.upper() or response.code == "THROTTLED":
                    log.warning("the server is throttling this account (%s)", response.text)
                return response
            elif self._answered_early(raw, tag):
                continue
            elif raw.startswith(b"+"):
                raise ProtocolError(f"unexpected continuation request to {command}: {self._shown(raw)}")
            else:
                raise ProtocolError(f"unexpected line in the answer to {command}: {self._shown(raw)}")
            if dropped:
                # Read and thrown away; the same message's again counts as a flood.
                if any(_fetch_uid(item) == _fetch_uid(parsed) for item in oversized):
                    budget.unasked(len(raw) + sum(dropped), update=True)
                else:
                    budget.kept(oversized, parsed, len(raw), weight)
            elif keep(parsed):
                budget.kept(untagged, parsed, len(raw), weight)
            elif not self._early(parsed, tag, len(raw), weight):
                budget.unasked(len(raw), update=_untagged_kind(parsed) in _STATE_UPDATES)

    # A server may run pipelined commands side by side and answer them out of order (RFC
    # 3501 §5.5; Dovecot does: a FETCH's data can come before the OK of a COPY sent ahead
    # of it).  So while one command's answer is read, what belongs to a command sent after
    # it is kept for that one: an untagged answer its keep() wants, and its tagged line.

    def _later(self, tag: bytes) -> Iterator[_Pending]:
        """The pipelined commands sent after the one tagged ``tag``, still unanswered."""
        seen = False
        for pending in self._inflight:
            if seen and pending.response is None and pending.imap is self.imap:
                yield pending
            seen = seen or pending.tag == tag

    def _wanted_later(self, parsed: List[Any], tag: bytes) -> Optional[_Pending]:
        """The first command sent after the one tagged ``tag`` that wants ``parsed``."""
        for pending in self._later(tag):
            if pending.keep is None:    # its default, made once (a step's writes see each line)
                pending.keep = _needed_by(pending.command)
            if pending.keep(parsed):
                return pending
        return None

    def _early(self, parsed: List[Any], tag: bytes, size: int,
               weight: Optional[int] = None) -> bool:
        """Keep ``parsed`` (``size`` bytes; ``weight`` as for _AnswerBudget.kept) for a
        later command that wants it, within that command's own answer budget; True if one
        did."""
        pending = self._wanted_later(parsed, tag)
        if pending is None:
            return False
        if pending.budget is None:
            pending.budget = _AnswerBudget(pending.command)
        pending.budget.kept(pending.early, parsed, size, weight)
        return True

    def _passed_over(self, body: bytes, keep: Callable[[List[Any]], bool], tag: bytes
                     ) -> bool:
        """Whether the untagged ``body`` is a write's echo (_ECHO_LINE: the labels or flags
        of one UID, as Gmail sends for each message a label STORE changes) that neither the
        command being read (``keep``) nor one sent after it wants: read past unparsed.
        What those decide by is a FETCH's kind, sequence number and UID, which the
        pattern reads exactly as the parser would."""
        match = _ECHO_LINE.fullmatch(body)
        if match is None:
            return False
        seen = [int(match.group(1)), "FETCH", ["UID", int(match.group(2))]]
        return not keep(seen) and self._wanted_later(seen, tag) is None

    def _answered_early(self, raw: bytes, tag: bytes) -> bool:
        """A later command's tagged line: its answer is complete; True if ``raw`` was one."""
        for pending in self._later(tag):
            if raw.startswith(pending.tag + b" "):
                pending.response = self._tagged(raw[len(pending.tag) + 1:], pending.early)
                pending.early = []
                return True
        return False

    def _tagged(self, line: bytes, untagged: Optional[List[List[Any]]] = None,
                oversized: Optional[List[List[Any]]] = None) -> _Response:
        """A tagged status line (its tag cut off) as the command's _Response."""
        status, _, text = line.partition(b" ")
        code, args, message = parse_status_text(text)
        return _Response(status.decode("ascii", "replace").upper(), code, args,
                         self.redact(message), untagged or [], oversized or [])

    def search_line_limit(self) -> int:
        """A SEARCH answer names at most the folder's messages: 11 bytes per possible UID."""
        return max(MAX_RESPONSE_LINE, self._search_ceiling() * 11)

    def _search_ceiling(self) -> int:
        """The most UIDs a SEARCH answer may name: twice the folder's size (it may grow
        meanwhile) plus some, the size as EXISTS says but never above MAX_FOLDER_MESSAGES."""
        selected = self.selected
        return min(selected.exists if selected else 0, MAX_FOLDER_MESSAGES) * 2 + 10000

    def _plausible(self, body: bytes, command: str) -> bool:
        """Check a SEARCH answer's size before parsing it: it cannot name more UIDs than
        the folder holds, and one that does would cost gigabytes once expanded.  Raises
        ProtocolError for the SEARCH we asked for; False (ignore) for an unsolicited one."""
        if not body[:7].upper().startswith(b"SEARCH"):
            return True
        if not command.endswith("SEARCH"):
            return False
        ceiling = self._search_ceiling()
        if body.count(b" ") > ceiling:
            raise ProtocolError(f"the server answered {command} with more than {ceiling} "
                                f"UIDs, far more than the folder holds; that answer is "
                                f"unusable", command=command)
        return True

    def note_untagged(self, parsed: List[Any]) -> None:
        """Keep the selected folder's message count current from EXISTS."""
        if len(parsed) < 2 or str(parsed[1]).upper() != "EXISTS":
            return
        self.exists_seen += 1
        if self.selected and isinstance(parsed[0], int):
            self.selected = dataclasses.replace(self.selected, exists=int(parsed[0]))

    # -- IDLE ------------------------------------------------------------------------

    @_scrubbed
    def idle(self, timeout: float,
             interrupt: Optional[Callable[[], bool]] = None) -> List[List[Any]]:
        """IDLE once (see GmailConnection.idle); a drop raises _Dropped."""
        imap = self.live()
        if self._inflight:
            self.drain()
        tag = _new_tag(imap)
        deadline = time.monotonic() + timeout
        self.idling = True
        try:
            # A stop or garbage drops the connection: the server may still be idling.
            with self._reading("IDLE"):
                log.debug("C: %s IDLE", tag.decode())
                imap.watch_progress(None)   # type: ignore[attr-defined]  # IDLE waits at will
                imap.send(tag + b" IDLE\r\n")
                self.commands_sent += 1
                events, ended = self._idle_wait(tag, deadline, interrupt)
                if ended is None:
                    imap.watch_progress(self.timeout)  # type: ignore[attr-defined]
                    imap.send(b"DONE\r\n")
                    response = self._read_response(tag, "IDLE", False, None)
                else:           # a tagged answer before DONE: IDLE refused or ended
                    response = self._tagged(ended[len(tag) + 1:])
        finally:
            self.idling = False
            self.last_activity = time.monotonic()
        events.extend(item for item in response.untagged if item and item[0] != "OK")
        self._checked(response, "IDLE")
        return events

    def _idle_wait(self, tag: bytes, deadline: float, interrupt: Optional[Callable[[], bool]]
                   ) -> Tuple[List[List[Any]], Optional[bytes]]:
        """Read what comes in IDLE until an update arrives, the deadline passes, a stop is
        asked for or ``interrupt()`` says so: returns ``(updates, None)``, or ``(updates,
        tagged line)`` when the server ended (or refused) IDLE first."""
        imap = self.live()
        events: List[List[Any]] = []
        idling = False
        while True:
            if idling:
                left = deadline - time.monotonic()
                if events or self.stop.requested or (interrupt is not None and interrupt()) \
                        or left <= 0:
                    return events, None
                if not imap.wait_readable(min(left, IDLE_POLL)):  # type: ignore[attr-defined]
                    continue
            raw = self._read_line()
            if raw.startswith(b"+"):
                idling = True
            elif raw.startswith(tag + b" "):
                return events, raw
            elif raw.startswith(b"* BYE"):
                raise _Dropped("server said BYE during IDLE")
            elif raw.startswith(b"* "):
                parsed = parse_response(raw[2:])
                if parsed and str(parsed[0]).upper() not in ("OK", "NO", "BAD"):
                    self.note_untagged(parsed)
                    events.append(parsed)
            else:
                raise ProtocolError(f"unexpected line during IDLE: {self._shown(raw)}")


class GmailConnection:
    """One IMAP connection that survives drops: ``with GmailConnection(user, ...) as conn:``.

    Credentials: ``password`` (an app password; spaces are stripped) or ``token`` (an OAuth2
    access token for XOAUTH2).  Either may be a callable returning the current value; it is
    called on every (re)connect, so a token provider can refresh an expired token.

    ``security`` is ``"tls"`` (implicit TLS, port 993), ``"starttls"`` (port 143, refused if
    the server does not offer it) or ``"plaintext"`` (loopback hosts only, for tests and
    local servers: every address the host resolves to must be loopback).  ``cafile`` adds a
    trusted CA.  ``timeout`` bounds every socket read and write, and an answer that brings
    less than STALL_MIN_BYTES in any ``timeout`` seconds is a stall (IDLE waits at will).
    ``keepalive`` is the idle time after which a background thread sends NOOP.
    On a dropped connection the command is retried after reconnecting, up to ``retries``
    times with exponential backoff and jitter; ``sleep`` and ``rng`` are injectable.
    ``stop`` is the caller's Stop: once requested, no new command is sent and waits end.

    Raises AuthenticationError, TLSError, ConnectionLostError, ImapError and subclasses.
    """

    def __init__(self, user: str, *, password: CredentialSource = None,
                 token: CredentialSource = None, host: str = GMAIL_HOST,
                 port: Optional[int] = None, security: str = "tls",
                 cafile: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                 keepalive: Optional[float] = DEFAULT_KEEPALIVE,
                 retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: Callable[[], float] = random.random,
                 stop: Optional[Stop] = None) -> None:
        if security not in ("tls", "starttls", "plaintext"):
            raise ValueError(f"security must be 'tls', 'starttls' or 'plaintext', not {security!r}")
        if security == "plaintext" and not _is_loopback(host):
            raise TLSError(f"refusing to connect to {host} without TLS: plaintext is only "
                           f"allowed to a loopback address; use TLS or STARTTLS")
        if (password is None) == (token is None):
            raise ValueError("give exactly one of password= or token=")
        _check_credential(user, "user name")
        _check_credential(password, "password")
        _check_credential(token, "token")
        # The caller's stop mechanism: read loops and retries look at it (see Stop).
        self._proto = _Protocol(host, user, timeout, stop if stop is not None else Stop())
        self.port = port or (IMAPS_PORT if security == "tls" else IMAP_PORT)
        self.security, self.cafile, self.keepalive = security, cafile, keepalive
        self.retries, self.backoff, self._sleep, self._rng = retries, backoff, sleep, rng
        self._password, self._token = password, token
        self._lock = threading.RLock()
        self._background_error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._keepalive_thread: Optional[threading.Thread] = None
        self._folders: Optional[List[Folder]] = None
        self._unlisted: set = set()     # parents the server may have made: see _created
        # COPYUIDs read within a flight's answer that named none of its commands, kept for
        # a flight sent after it (see _WriteFlight.land): (folder, UIDVALIDITY), code, args.
        self._copyuids_kept: List[Tuple[Optional[Tuple[str, int]], Any, Any]] = []
        self._namespace: Optional[Tuple[str, str]] = None
        self.reconnects = 0
        self.backoff_delays: List[float] = []

    # What the protocol engine keeps, shown as this object's own (see _Protocol).
    user = _forwarded("user")
    host = _forwarded("host")
    stop = _forwarded("stop")
    timeout = _forwarded("timeout")
    capabilities = _forwarded("capabilities")
    commands_sent = _forwarded("commands_sent")
    bytes_received = _forwarded("bytes_received")
    exists_seen = _forwarded("exists_seen")
    _selected = _forwarded("selected")

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
        if self.keepalive and self._keepalive_thread is None:
            self._stop.clear()
            self._keepalive_thread = threading.Thread(
                target=self._keepalive_loop, name="gmail_classify-keepalive", daemon=True)
            self._keepalive_thread.start()

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
            if self._proto.imap is None:
                return
            try:
                if self._selected is not None:
                    if self.has("UNSELECT"):
                        self._proto.execute("UNSELECT")
                    elif self._selected.readonly:
                        self._proto.execute("CLOSE")
                self._proto.execute("LOGOUT", expect_bye=True)
            except (_Dropped, ImapError, ProtocolError, StopRequested):
                pass
            finally:
                self._selected = None
                self._proto.drop()

    def redact(self, text: str) -> str:
        """Server text with every credential we sent blanked out (see _Protocol.redact)."""
        return self._proto.redact(text)

    @property
    def connected(self) -> bool:
        return self._proto.imap is not None

    def has(self, capability: str) -> bool:
        """True if the server announced ``capability`` (after login), e.g. ``has("MOVE")``."""
        return capability.upper() in self.capabilities

    @property
    def is_gmail(self) -> bool:
        """True for servers with Gmail's extensions (labels, X-GM-RAW, message ids)."""
        return self.has("X-GM-EXT-1")

    def tls_info(self) -> Optional[Dict[str, str]]:
        """The connection's TLS session, None without one: ``{"version": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384", "subject": "imap.gmail.com", "issuer":
        "WR2", "expires": "Feb 24 08:36:33 2027 GMT"}`` (the certificate was verified)."""
        with self._lock:
            sock = getattr(self._proto.imap, "sock", None)
            if not isinstance(sock, ssl.SSLSocket):
                return None
            cert = sock.getpeercert() or {}
            cipher = sock.cipher()

        def name(part: str) -> str:
            fields = dict(pair[0] for pair in cert.get(part, ()) if pair)
            return str(fields.get("commonName") or fields.get("organizationName") or "?")
        return {"version": str(sock.version()), "cipher": cipher[0] if cipher else "?",
                "subject": name("subject"), "issuer": name("issuer"),
                "expires": str(cert.get("notAfter", "?"))}

    @property
    def selected(self) -> Optional[FolderStatus]:
        return self._selected

    # -- connecting and authenticating -------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.cafile:
            try:
                context.load_verify_locations(cafile=self.cafile)
            except (OSError, ssl.SSLError) as exc:
                raise TLSError(f"cannot load the CA file {self.cafile}: {exc}") from exc
        return context

    def _untrusted(self, where: str, exc: ssl.SSLCertVerificationError) -> TLSError:
        hint = ("" if self.cafile else "; if the server uses a private CA, pass its "
                "certificate with --cafile")
        return TLSError(f"cannot trust the TLS certificate of {where}: "
                        f"{exc.verify_message or exc.reason}{hint}")

    @_scrubbed
    def _open(self) -> None:
        """One attempt: TCP, TLS, greeting, authentication, capabilities."""
        where = f"{self.host}:{self.port}"
        try:
            if self.security == "tls":
                imap: imaplib.IMAP4 = _TLSWire(self.host, self.port,
                                               ssl_context=self._ssl_context(),
                                               timeout=self.timeout)
            elif self.security == "plaintext":
                # Resolve once, check every address, connect to the one checked: no second
                # lookup that a hosts file or DNS could answer differently.
                addresses = _loopback_addresses(self.host, self.port)
                if not addresses:
                    raise TLSError(f"refusing to connect to {self.host} without TLS: it does "
                                   f"not resolve to loopback addresses only; use TLS or "
                                   f"STARTTLS")
                imap = _PlainWire(addresses[0], self.port, timeout=self.timeout)
            else:
                imap = _PlainWire(self.host, self.port, timeout=self.timeout)
        except ssl.SSLCertVerificationError as exc:
            raise self._untrusted(where, exc) from exc
        except (ssl.SSLError, imaplib.IMAP4.error, OSError) as exc:
            hint = self._hopeless(exc)
            if hint:
                raise _Unreachable(f"cannot connect to {where}: {hint}") from exc
            raise _Dropped(f"cannot connect to {where}: {_decode_server_text(exc)}") from exc
        imap.stop = self.stop  # type: ignore[attr-defined]
        self._proto.drop()
        self._proto.imap = imap
        try:
            if self.security == "starttls":
                self._starttls(imap, where)
            self._authenticate()
            # imaplib read the capabilities once, before login; Gmail adds MOVE, UIDPLUS
            # and more only afterwards, so ask again (an 8-bit word names nothing we use).
            caps = {str(word).upper() for response in self._proto.execute("CAPABILITY").untagged
                    if response and str(response[0]).upper() == "CAPABILITY"
                    for word in response[1:] if str(word).isascii()}
            self._proto.capabilities = frozenset(caps or imap.capabilities)
        except BaseException:
            self._proto.drop()
            raise

    # OpenSSL's reasons when the other side does not speak TLS at all (it sent an IMAP
    # greeting in plain text), and when the two sides share no TLS version.
    _NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                "UNKNOWN_PROTOCOL", "HTTP_REQUEST")
    _OLD_TLS = ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE")

    def _hopeless(self, exc: BaseException) -> str:
        """What to do about a connect error that a retry cannot fix; "" if one might."""
        if isinstance(exc, ConnectionRefusedError):
            return ("connection refused: nothing listens on that port; check --host and "
                    f"--port (IMAP uses {IMAPS_PORT} with TLS, {IMAP_PORT} with --starttls)")
        if isinstance(exc, socket.gaierror) and exc.errno in (
                getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None)):
            return f"no such host {self.host!r} ({exc.strerror}); check --host"
        if isinstance(exc, _GreetingTimeout) and self.security != "tls":
            return (f"no IMAP greeting within {self.timeout:g} s: is {self.port} a TLS port? "
                    f"connect without --starttls or --plaintext (TLS from the first byte, "
                    f"port {IMAPS_PORT}), or use --starttls on port {IMAP_PORT}")
        reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
        if reason in self._NOT_TLS:
            return (f"the server did not answer in TLS ({reason.lower().replace('_', ' ')}): "
                    f"is {self.port} a plain IMAP port? try --starttls, or port {IMAPS_PORT}")
        if reason in self._OLD_TLS:
            return (f"no TLS version in common ({reason.lower().replace('_', ' ')}): the "
                    "server offers only versions that are no longer safe")
        return ""

    def _starttls(self, imap: imaplib.IMAP4, where: str) -> None:
        if "STARTTLS" not in imap.capabilities:
            raise TLSError(f"{where} does not offer STARTTLS; refusing to continue in "
                           f"plaintext. Use implicit TLS (port 993) if the server has it")
        try:
            imap.watch_progress(self.timeout, lines=IMAPLIB_MAX_LINES)  # type: ignore[attr-defined]
            imap.starttls(self._ssl_context())
        except ssl.SSLCertVerificationError as exc:
            raise self._untrusted(where, exc) from exc
        except imaplib.IMAP4.abort as exc:
            raise _Dropped(f"STARTTLS failed: {_decode_server_text(exc)}") from exc
        except imaplib.IMAP4.error as exc:
            raise TLSError(f"{where} refused STARTTLS: {_decode_server_text(exc)}") from exc
        except (ssl.SSLError, OSError) as exc:
            raise _Dropped(f"STARTTLS failed: {exc}") from exc

    def _authenticate(self) -> None:
        """LOGIN with the password, or AUTHENTICATE XOAUTH2 with the token; never logged.

        We build these commands ourselves rather than through imaplib, which sends the
        user name raw (a space or a quote in it changes who signs in) and cannot send
        non-ASCII credentials or a SASL initial response (RFC 4959).
        """
        if getattr(self._proto.imap, "state", "NONAUTH") != "NONAUTH":
            raise AuthenticationError(f"{self.host} claims the session is signed in already "
                                      f"(PREAUTH) without our credentials; refusing it",
                                      command="LOGIN")
        try:
            if self._token is not None:
                token = _credential(self._token) or ""
                _check_credential(token, "token")
                initial = f"user={self.user}\x01auth=Bearer {token}\x01\x01".encode("utf-8")
                self._proto.remember_secret(token)
                self._proto.remember_secret(base64.b64encode(initial).decode("ascii"))
                self._proto.sasl("XOAUTH2", initial, "the OAuth2 token")
            else:
                password = _clean_password(_credential(self._password) or "")
                _check_credential(password, "password")
                self._proto.remember_secret(password)
                self._proto.login(password)
        except ConnectionLostError as exc:
            # A token provider that cannot reach its issuer: as retryable as a lost link.
            raise _Dropped(str(exc)) from exc
        except OSError as exc:
            raise _Dropped(f"connection lost while signing in: {exc}") from exc
        log.info("signed in to %s as %s", self.host, self.user)

    def _connect_with_retries(self, first_error: Optional[BaseException]) -> None:
        """Open a connection, sleeping with backoff between failed attempts."""
        error = first_error
        attempt = 0 if first_error is None else 1
        first_connect = first_error is None
        while True:
            if error is not None:
                if first_connect and isinstance(error, _Unreachable):
                    raise ConnectionLostError(str(error)) from error
                if attempt > self.retries:
                    tries = self.retries + first_connect
                    what = (f"{error} (gave up after {tries} attempts)" if first_connect else
                            f"lost the connection to {self.host}:{self.port} and could not get "
                            f"it back after {tries} attempts: {error}")
                    raise ConnectionLostError(f"{what}; check the host, port and network, "
                                              f"then try again") from error
                delay = min(MAX_BACKOFF, self.backoff * 2 ** (attempt - 1))
                delay *= 0.5 + 0.5 * self._rng()
                self.backoff_delays.append(delay)
                self.stop.check("instead of reconnecting")
                # Said on every retry, so a slow start never looks like a hang.
                log.warning("%s; retrying (%d/%d) in %.1f s...", error, attempt + 1,
                            self.retries + 1, delay)
                # The default sleep waits on the Stop, so that a stop ends it at once.
                (self.stop.wait if self._sleep is time.sleep else self._sleep)(delay)
                self.stop.check("instead of reconnecting")
            try:
                self._open()
                if error is not None:
                    self.reconnects += 1
                self._background_error = None
                self._proto.last_activity = time.monotonic()
                return
            except _Dropped as exc:
                error = exc
                attempt += 1

    def _reconnect(self, cause: BaseException) -> None:
        """Replace a dead connection and restore the selected folder; raises if impossible."""
        previous = self._selected
        self._selected = None
        error: BaseException = cause
        for _ in range(self.retries + 1):
            self._proto.drop()
            self._connect_with_retries(first_error=error)
            if previous is None:
                return
            try:
                status = self._select_now(previous.name, previous.readonly)
            except _Dropped as exc:
                error = exc
                continue
            if status.uidvalidity != previous.uidvalidity:
                raise UidValidityError(
                    f"UIDVALIDITY of {previous.name} changed from {previous.uidvalidity} "
                    f"to {status.uidvalidity} while reconnecting: the server renumbered the "
                    f"folder, so the UIDs in hand are stale; run again",
                    command="SELECT")
            return
        self._proto.drop()
        raise ConnectionLostError(f"reconnected to {self.host} but could not reopen "
                                  f"{previous.name}: {error}") from error

    # -- retrying ----------------------------------------------------------------------

    def _call(self, command: str, *args: Any, **reading: Any) -> _Response:
        """Run a command that is safe to repeat (reads, +/- STOREs, CREATE, UID EXPUNGE of
        a fixed set, COPY on Gmail), sent again after a drop; ``reading`` passes keep= and
        max_literal= on to _Protocol.execute.  The lock is held across the retries."""
        with self._lock:
            return self._retrying(command, lambda: self._proto.execute(command, *args,
                                                                       **reading))

    def _retrying(self, what: str, attempt: Callable[[], Any],
                  settle: Optional[Callable[[], bool]] = None) -> Any:
        """``attempt()`` under the lock; after a drop, reconnect (the selected folder is
        reopened) and try again, up to ``retries`` times: the one retry loop.

        A write that must never be sent twice (MOVE, a COPY off Gmail) passes ``settle``:
        after every drop, the last one included, once reconnected, ``settle()`` finds out
        what the lost attempt did and narrows what is left (a drop in it counts as a
        failed attempt); True means nothing is left, and None is returned (the caller's
        own record holds the outcome).  Without ``settle`` the connection is left marked
        dead when the retries are spent.  Each attempt holds the lock; a caller that must
        keep it across the retries holds it around this call.  Raises ConnectionLostError
        naming ``what``; errors other than a drop pass through.
        """
        cause: Optional[BaseException] = None
        tries = self.retries + 1
        for number in range(tries + (settle is not None)):   # a write settles its last drop
            with self._lock:
                try:
                    if number == 0:
                        self._check_background()
                    else:
                        self._reconnect(cause or _Dropped("not connected"))
                        if settle is not None and settle():
                            return None
                    if number < tries:
                        return attempt()
                except _Dropped as exc:
                    cause = exc
        if settle is None:
            self._proto.drop()
        raise ConnectionLostError(f"{what} kept failing after {self.retries} reconnects: "
                                  f"{cause}") from cause

    def _check_background(self) -> None:
        """Turn a failure the keepalive thread recorded into a reconnect, here and now."""
        error, self._background_error = self._background_error, None
        if error is not None or self._proto.imap is None:
            self._reconnect(error or _Dropped("not connected"))

    # -- keepalive ---------------------------------------------------------------------

    def _keepalive_loop(self) -> None:
        """Send NOOP after ``keepalive`` idle seconds; record failures for the foreground."""
        interval = float(self.keepalive or 0)
        while not self._stop.is_set():
            wait = self._proto.last_activity + interval - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            # Never wait behind a foreground command: it resets the idle clock anyway.
            if not self._lock.acquire(timeout=min(interval, 0.5)):
                continue
            try:
                if self._stop.is_set() or self._proto.idling or self._proto.imap is None:
                    self._proto.last_activity = time.monotonic()
                    continue
                if time.monotonic() - self._proto.last_activity < interval:
                    continue
                try:
                    self._proto.execute("NOOP")
                except (_Dropped, ImapError, StopRequested) as exc:
                    log.info("keepalive NOOP failed (%s); will reconnect on the next command", exc)
                    self._background_error = exc
                    self._proto.drop()
                    self._proto.last_activity = time.monotonic()
            finally:
                self._lock.release()

    # -- operations: folders -----------------------------------------------------------

    def noop(self) -> List[List[Any]]:
        """Send NOOP; returns the pending updates it collected, e.g. ``[[13, "EXISTS"]]``."""
        response = self._call("NOOP")
        return [item for item in response.untagged if item and item[0] not in ("OK", "NO", "BAD")]

    def status(self, folder: str) -> Dict[str, int]:
        """STATUS of a folder that need not be selected: ``{"MESSAGES": 812, "UIDNEXT": 9001,
        "UIDVALIDITY": 11}``.  RFC 3501 §6.3.10: not for the selected folder (use noop)."""
        return self._status_numbers(self._status(folder, "(MESSAGES UIDNEXT UIDVALIDITY)"))

    def statuses(self, folders: Sequence[str]) -> Dict[str, Union[Dict[str, int], ImapError]]:
        """status() of several folders in one round trip (pipelined; STATUS only reads):
        ``{"Lists": {"MESSAGES": 3, ...}, "Gone": ImapError(...)}``, a folder the server
        refused (NO or BAD) mapped to its error.  A name that must go as a literal is
        asked on its own.  After a drop, all are asked again."""
        found: Dict[str, Union[Dict[str, int], ImapError]] = {}

        def ask(name: str, answer: Callable[[], _Response]) -> None:
            try:
                response = answer()
            except ImapError as exc:
                if exc.status not in ("NO", "BAD"):
                    raise
                found[name] = exc
                return
            found[name] = self._status_numbers(self._status_of(response, name))

        def attempt() -> None:
            found.clear()
            items = "(MESSAGES UIDNEXT UIDVALIDITY)"
            # Each keeps only its own folder's answer: a server may answer them out of order.
            pending = [(name, self._proto.send_ahead("STATUS", self._mailbox(name), items,
                                                     keep=self._status_keep(name)))
                       for name in folders if not isinstance(self._mailbox(name), Literal)]
            for name, sent in pending:
                ask(name, lambda: self._proto.collect(sent))
            for name in folders:
                if name not in found:
                    ask(name, lambda: self._proto.execute("STATUS", self._mailbox(name), items))

        if folders:
            with self._lock:
                self._retrying("STATUS", attempt)
        return found

    def _status_keep(self, folder: str) -> Callable[[List[Any]], bool]:
        """keep() for STATUS ``folder``: its own STATUS line, and status lines with a code."""
        default = _needed_by("STATUS")

        def keep(item: List[Any]) -> bool:
            if item and str(item[0]).upper() == "STATUS":
                return len(item) >= 3 and self._names(item[1], folder)
            return default(item)
        return keep

    @staticmethod
    def _status_numbers(attrs: Mapping[Any, Any]) -> Dict[str, int]:
        return {key: _server_number(value, key, "STATUS",
                                    nonzero=key in ("UIDNEXT", "UIDVALIDITY"))
                for key, value in ((str(key).upper(), value) for key, value in attrs.items())}

    def _status_of(self, response: _Response, folder: str) -> Dict[str, Any]:
        """The attributes of ``folder``'s STATUS answer in ``response`` ({} for none).  Only
        the folder's own answer counts, by its octets as listed (a raw UTF-8 name stays
        raw): any untagged response may arrive with any command (RFC 3501 §7)."""
        attrs = next((item[2] for item in response.untagged
                      if item and str(item[0]).upper() == "STATUS" and len(item) >= 3
                      and self._names(item[1], folder)), None)
        return _pairs(attrs) if isinstance(attrs, list) else {}

    def _status(self, folder: str, items: str) -> Dict[str, Any]:
        """The attributes STATUS ``folder`` ``items`` answered (see _status_of)."""
        return self._status_of(self._call("STATUS", self._mailbox(folder), items), folder)

    def list_folders(self, refresh: bool = False, sure_of: Iterable[str] = ()) -> List[Folder]:
        """Every folder (and Gmail label), names decoded from modified UTF-7.

        Each Folder keeps its name as LIST sent it (``wire``); commands that name a listed
        folder send exactly that back, so a server that lists raw UTF-8 (or invalid UTF-8)
        gets its own octets, never a re-encoding that could name another mailbox.

        The list is held once read, and the folders this connection creates join it.  A
        parent of one, which the server may have made with it (selectable or not), is not
        in it until the list is read again: which happens when the caller names one in
        ``sure_of``, the names whose presence it relies on.
        """
        if self._folders is not None and not refresh and \
                not (self._unlisted and self._unlisted.intersection(sure_of)):
            return list(self._folders)
        response = self._call("LIST", quote(""), quote("*"))
        folders = []
        for item in response.untagged:
            if len(item) >= 4 and str(item[0]).upper() == "LIST":
                flags, delimiter, name = item[1], item[2], item[3]
                wire = name if isinstance(name, bytes) else \
                    str(name).encode("utf-8", "surrogateescape")
                # Modified UTF-7 is ASCII; anything else is a non-compliant server's raw
                # octets, shown as UTF-8 (invalid bytes replaced) but sent back as they came.
                shown = (decode_mailbox(wire.decode("ascii")) if wire.isascii()
                         else wire.decode("utf-8", "replace"))
                folders.append(Folder(shown, None if delimiter is None else _as_text(delimiter),
                                      frozenset(str(f) for f in (flags or [])), wire))
        self._folders, self._unlisted = folders, set()
        return list(folders)

    def namespace(self) -> Tuple[str, str]:
        """The personal namespace as ``(prefix, delimiter)``: ``("", "/")`` on Gmail and most
        Dovecots, ``("INBOX.", ".")`` on Courier, classic Cyrus and many hosted servers.

        From NAMESPACE (RFC 2342) where the server has it; the delimiter otherwise from
        LIST.  Asked once per connection object.
        """
        if self._namespace is not None:
            return self._namespace
        prefix, delimiter = "", None
        if self.is_gmail:
            delimiter = "/"
        elif self.has("NAMESPACE"):
            for item in self._call("NAMESPACE").untagged:
                if item and str(item[0]).upper() == "NAMESPACE" and len(item) >= 2:
                    personal = item[1]
                    if isinstance(personal, list) and personal and isinstance(personal[0], list):
                        first = personal[0]
                        prefix = decode_mailbox(_as_text(first[0])) if first else ""
                        if len(first) > 1 and first[1] is not None:
                            delimiter = _as_text(first[1])
        if delimiter is None:
            delimiter = next((f.delimiter for f in self.list_folders() if f.delimiter), "/")
        self._namespace = (prefix, delimiter)
        return self._namespace

    def server_name(self, name: str) -> str:
        """The server's name for a folder written with ``/`` as separator (as rules are).

        ``"Receipts/2024"`` is ``"INBOX.Receipts.2024"`` on a server whose personal
        namespace is ``INBOX.`` with ``.``; a name that already carries the prefix, INBOX,
        and every name on a ``("", "/")`` server stay as they are.
        """
        if name.upper() == "INBOX":
            return "INBOX"
        prefix, delimiter = self.namespace()
        mapped = name.replace("/", delimiter) if delimiter != "/" else name
        if not prefix or mapped.startswith(prefix):
            return mapped
        if prefix.upper().startswith("INBOX") and mapped.upper().startswith(prefix.upper()):
            return mapped      # INBOX is case-insensitive, so is a prefix that starts with it
        if any(f.name == name for f in self.list_folders()):
            return name        # a folder listed outside the personal namespace
        return prefix + mapped

    def _listed_wire(self, name: str) -> Optional[bytes]:
        """The octets LIST sent for the folder ``name``, or None when it was not listed."""
        return next((folder.wire for folder in self._folders or ()
                     if folder.name == name and folder.wire is not None), None)

    def _mailbox(self, name: str) -> Union[bytes, Literal]:
        """A folder name for the wire: a listed folder's own octets, else modified UTF-7."""
        wire = self._listed_wire(name)
        if wire is None or name.upper() == "INBOX":
            return mailbox_arg(name)
        return astring(wire.decode("ascii")) if wire.isascii() else Literal(wire)

    def special_folder(self, use: str) -> Optional[Folder]:
        """The folder with special-use ``use`` (``"\\\\Trash"``, ``"\\\\All"`` ...), or None.

        Gmail localises folder names ("[Google Mail]/Papierkorb"), so find them by
        attribute (RFC 6154).  Only when no folder carries the attribute (a server without
        SPECIAL-USE) are ``\\Trash`` and ``\\Archive`` looked up by the names in
        FALLBACK_FOLDER_NAMES, case-insensitively, under the namespace prefix or not.
        """
        folders = self.list_folders()
        for folder in folders:
            if folder.special_use and folder.special_use.lower() == use.lower():
                return folder
        names = next((names for key, names in FALLBACK_FOLDER_NAMES.items()
                      if key.lower() == use.lower()), ())
        if not names:
            return None
        prefix, delimiter = self.namespace()
        by_name: Dict[str, Folder] = {}
        for folder in folders:
            if not folder.selectable:
                continue
            short = folder.name
            if prefix and short.upper().startswith(prefix.upper()):
                short = short[len(prefix):]
            if delimiter != "/":
                short = short.replace(delimiter, "/")
            by_name.setdefault(short.casefold(), folder)
            by_name.setdefault(folder.name.casefold(), folder)
        found = next(filter(None, (by_name.get(name.casefold()) for name in names)), None)
        if found is not None:
            log.info("no folder is marked %s; using %r, found by its name", use, found.name)
        return found

    def create_folder(self, name: str) -> bool:
        """Create a folder (a label on Gmail). Returns False if it already existed.

        ``name`` is the server's name (see server_name).  Raises ImapError naming the folder
        and quoting the server's answer when it refuses.
        """
        try:
            self._call("CREATE", self._mailbox(name))
        except ImapError as exc:
            if not _already_exists(exc):
                raise _refused(exc, "create the folder", name) from exc
            self._created(name)
            return False
        self._created(name)
        return True

    def _created(self, name: str) -> None:
        """Add a folder this connection created (or found there already) to the folder
        list it holds, as LIST would name it, rather than ask for the whole list again (a
        round trip that also waits for every command still on the wire).  Its parents that
        the list lacks, which a server may have made with it (selectable or not), are
        noted as unlisted: see list_folders."""
        if self._folders is None:
            return
        names = {folder.name for folder in self._folders}
        delimiter = next((folder.delimiter for folder in self._folders if folder.delimiter),
                         None)
        parts = name.split(delimiter) if delimiter else [name]
        self._unlisted.update(parent for parent in (delimiter.join(parts[:end])
                                                    for end in range(1, len(parts)))
                              if parent not in names)
        if name not in names:
            self._folders.append(Folder(name, delimiter, frozenset(),
                                        encode_mailbox(name).encode("ascii")))

    def delete_folder(self, name: str) -> None:
        """Delete a folder (on Gmail a label, which then comes off every message)."""
        self._call("DELETE", self._mailbox(name))
        self._folders = None

    def message_count(self, folder: str) -> int:
        """How many messages ``folder`` holds (STATUS MESSAGES), without opening it."""
        attrs = self._status(folder, "(MESSAGES)")
        if "MESSAGES" not in attrs:
            raise ProtocolError(f"the server did not say how many messages {folder} holds",
                                command="STATUS")
        return _server_number(attrs["MESSAGES"], "MESSAGES", "STATUS")

    def select(self, folder: str, readonly: bool = False) -> FolderStatus:
        """SELECT (or EXAMINE when ``readonly``) a folder and return its status."""
        with self._lock:
            return self._retrying(f"{'EXAMINE' if readonly else 'SELECT'} {folder}",
                                  lambda: self._select_now(folder, readonly))

    def examine(self, folder: str) -> FolderStatus:
        """Open a folder read-only: nothing, not even \\Seen, can change."""
        return self.select(folder, readonly=True)

    def _select_now(self, folder: str, readonly: bool) -> FolderStatus:
        # Whatever this SELECT's answer, the folder open before it is gone (RFC 3501
        # §6.3.1): forget it first, so close() never takes a read-write folder the server
        # accepted but we could not parse for the read-only one before, and CLOSEs it.
        self._selected = None
        command = "EXAMINE" if readonly else "SELECT"
        response = self._proto.execute(command, self._mailbox(folder))
        uidvalidity = uidnext = None
        exists = 0
        for item in response.untagged:
            if item and item[0] == "OK":
                if item[1] == "UIDVALIDITY" and item[2]:
                    uidvalidity = _server_number(item[2][0], "UIDVALIDITY", command,
                                                 nonzero=True)
                elif item[1] == "UIDNEXT" and item[2]:
                    uidnext = _server_number(item[2][0], "UIDNEXT", command, nonzero=True)
            elif len(item) >= 2 and str(item[1]).upper() == "EXISTS":
                exists = _server_number(item[0], "EXISTS", command)
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
        return sorted(set(_search_uids(self._call("UID SEARCH", *args))))

    def fetch(self, uids: Iterable[int], items: Sequence[str], *,
              skipped: Optional[List[int]] = None) -> Dict[int, Dict[str, Any]]:
        """UID FETCH ``items`` for ``uids``; returns ``{uid: {item: value}}`` keyed by UID.

        Keys are the items as requested (``"BODY.PEEK[HEADER]"`` returns under that name);
        values: FLAGS -> tuple of str, X-GM-LABELS -> tuple of decoded str, INTERNALDATE ->
        aware datetime, RFC822.SIZE / X-GM-MSGID / X-GM-THRID -> int, body sections ->
        bytes, BODYSTRUCTURE -> nested lists.  UIDs the server no longer has are absent.
        Unsolicited FETCHes for other messages are ignored.  A message whose answer holds a
        literal far larger than the items can need (see _fetch_literal_limit) is absent
        too, its bytes read and thrown away; its UID is appended to ``skipped``.
        """
        return next(self.fetch_batches([list(uids)], items, skipped=skipped))[1]

    def fetch_batches(self, batches: Iterable[Sequence[int]], items: Sequence[str], *,
                      ahead: int = 1,
                      before_each: Optional[Callable[["GmailConnection"], None]] = None,
                      skipped: Optional[List[int]] = None
                      ) -> Iterator[Tuple[List[int], Dict[int, Dict[str, Any]]]]:
        """fetch() for each batch of UIDs in turn, pipelined: yields ``(batch, {uid: {item:
        value}})`` while the FETCH of the next ``ahead`` batches is already on its way.

        ``before_each(conn)`` is called before a batch's FETCH is first sent (after the
        previous answer is in); what it raises comes out when that batch is asked for.
        Between two yields the connection may be used for anything else (the answers in
        flight are read first and kept).  A dropped connection is restored as in fetch(),
        and every FETCH whose answer had not completed is sent again.  Oversized answers
        are handled as in fetch(): the message is left out and its UID added to ``skipped``.
        """
        todo: List[Optional[_FetchOnWay]] = [_FetchOnWay(self._proto, batch, items, skipped)
                                             for batch in batches]
        refused: Optional[BaseException] = None   # what before_each raised for a later batch
        for index, fetch in enumerate(todo):
            if refused is not None:
                raise refused
            if not fetch.sent and before_each is not None:
                before_each(self)

            def receive() -> Dict[int, Dict[str, Any]]:
                nonlocal refused
                imap = self._proto.live()
                later = [other for other in todo[index + 1:index + 1 + ahead] if other]
                for number, other in enumerate((fetch, *later)):
                    # not sent yet, or lost with the old connection
                    if (number == 0 and not other.sent) or other.lost(imap):
                        other.send()
                result = fetch.read()
                for other in later:
                    if other.sent or refused is not None:
                        continue
                    if before_each is not None:
                        try:
                            before_each(self)
                        except Exception as exc:
                            refused = exc
                            break
                    other.send()
                return result

            with self._lock:    # held across the retries, as in _call
                result = self._retrying("UID FETCH", receive)
            todo[index] = None      # the answer is the caller's: not held for the run
            yield fetch.uids, result

    def fetch_ahead(self, uids: Iterable[int], items: Sequence[str], *,
                    skipped: Optional[List[int]] = None, limit_as: Sequence[str] = ()
                    ) -> Callable[[], Dict[int, Dict[str, Any]]]:
        """fetch() sent now and read later: returns the function that reads its answer
        (those of the commands sent before it first, kept for their senders), so the
        caller goes on while the server answers, and may use the connection meanwhile.  A
        dropped connection is restored as in fetch(), the FETCH sent again if its answer
        was lost.  ``limit_as``: items whose literals the answer may hold as large as
        (see _fetch_literal_limit), beside ``items``' own."""
        fetch = _FetchOnWay(self._proto, uids, items, skipped,
                            _fetch_literal_limit(list(items) + list(limit_as)))
        self._retrying("UID FETCH", fetch.send)

        def receive() -> Dict[int, Dict[str, Any]]:
            if fetch.lost(self._proto.live()):
                fetch.send()
            return fetch.read()

        def read() -> Dict[int, Dict[str, Any]]:
            with self._lock:
                return self._retrying("UID FETCH", receive)
        return read

    # -- operations: changing messages ---------------------------------------------------

    def _store(self, uids: Iterable[int], item: str, values: Sequence[bytes]) -> None:
        for chunk in chunk_uids(uids):
            self._call("UID STORE", *_store_args(chunk, item, values))

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

    def can_move(self, allow_expunge: bool = False) -> bool:
        """True if move() can work here: MOVE, or UIDPLUS, or a plain EXPUNGE allowed."""
        return self.has("MOVE") or self.has("UIDPLUS") or allow_expunge

    def refuse_moves(self) -> CapabilityError:
        """The error for a server where moving would need a plain EXPUNGE (see move())."""
        return CapabilityError(
            f"{self.host} has neither MOVE nor UIDPLUS, so removing moved messages from "
            f"their folder needs a plain EXPUNGE, which also deletes every other message "
            f"marked \\Deleted there (another mail client's too); nothing was changed. "
            f"Pass --allow-expunge (allow_expunge=True) to allow it, or drop move, archive "
            f"and trash from the rules for this server", command="MOVE")

    def move(self, uids: Iterable[int], destination: str, *,
             allow_expunge: bool = False,
             copied_since: Optional[Mapping[int, Optional[int]]] = None) -> MoveResult:
        """Move messages from the selected folder to ``destination``.

        Uses UID MOVE (RFC 6851) where the server has it, else UID COPY, +FLAGS \\Deleted
        and UID EXPUNGE of exactly those UIDs (UIDPLUS).  With neither, this refuses with
        CapabilityError unless ``allow_expunge``: then the originals go with a plain
        EXPUNGE, sent only while UID SEARCH DELETED shows no other message marked.  If the
        connection drops mid-way, the source folder is searched after reconnecting, and only
        the messages still there are moved again, and a COPY is never repeated blindly
        (see _SafeCopy.copy_once): nothing moves twice and every UID is accounted for.
        ``copied_since`` (without MOVE): UIDs an earlier process may have copied there
        before it ended, each with the destination's UIDNEXT before that COPY (None:
        unknown): their copies are looked for first, and they are not copied again.
        """
        if not self.can_move(allow_expunge):
            raise self.refuse_moves()
        moved: Dict[int, Optional[int]] = {}
        missing: List[int] = []
        surprises = _ExpungeCheck()
        with _naming(destination, "move messages to"):
            for chunk in chunk_uids(uids):
                if self.has("MOVE"):
                    self._move_chunk(chunk, destination, moved, missing)
                else:
                    _SafeCopy(self).copy_then_delete(chunk, destination, moved, missing,
                                                     surprises, copied_since or {})
        if surprises.stayed or surprises.others:
            folder = self._selected.name if self._selected else "the folder"
            log.warning("%s: the plain EXPUNGE did not do what was expected (another mail "
                        "client changed \\Deleted flags between the check and the "
                        "EXPUNGE): %s", folder, surprises.describe(folder, destination))
        return MoveResult(moved, tuple(missing), tuple(surprises.stayed), surprises.others)

    def _move_chunk(self, chunk: List[int], destination: str,
                    moved: Dict[int, Optional[int]], missing: List[int]) -> None:
        pending = list(chunk)

        def settle() -> bool:
            # Did the lost attempt happen before the link died?  What is still in the
            # source folder was not moved; what is gone was.
            nonlocal pending
            still_here = set(self._search_now(pending))
            for uid in pending:
                if uid not in still_here:
                    moved.setdefault(uid, None)
            pending = [uid for uid in pending if uid in still_here]
            return not pending

        def attempt() -> None:
            response = self._proto.execute("UID MOVE", compress_uids(pending),
                                        self._mailbox(destination))
            mapping = _copyuid_map(response, pending)
            for uid in pending:
                if mapping and uid not in mapping:
                    missing.append(uid)   # gone before we asked: someone else moved it
                else:
                    moved[uid] = mapping.get(uid)

        self._retrying(f"UID MOVE to {destination}", attempt, settle)

    def _search_now(self, uids: Sequence[int]) -> List[int]:
        return _search_uids(self._proto.execute("UID SEARCH", "UID", compress_uids(uids)))

    def _names(self, named: Any, folder: str) -> bool:
        """True if ``named`` (a mailbox name as an answer gave it) is ``folder``."""
        wire = named if isinstance(named, bytes) else str(named).encode("utf-8", "surrogateescape")
        wanted = self._listed_wire(folder) or (
            b"INBOX" if folder.upper() == "INBOX" else encode_mailbox(folder).encode("ascii"))
        return wire == wanted or wire.upper() == wanted.upper() == b"INBOX"

    def copy(self, uids: Iterable[int], destination: str) -> Dict[int, Optional[int]]:
        """Copy messages to ``destination`` (on Gmail: add that label); returns the COPYUID map.

        Off Gmail a copy is a new message, so a dropped COPY is never blindly repeated
        (see _SafeCopy.copy_once).
        """
        result: Dict[int, Optional[int]] = {}
        with _naming(destination, "copy messages to"):
            for chunk in chunk_uids(uids):
                if not self.is_gmail:
                    result.update(_SafeCopy(self).copy_once(chunk, destination))
                    continue
                response = self._call("UID COPY", compress_uids(chunk), self._mailbox(destination))
                mapping = _copyuid_map(response, chunk)
                result.update({uid: mapping.get(uid) for uid in chunk})
        return result

    # -- IDLE ------------------------------------------------------------------------

    def idle(self, timeout: float,
             interrupt: Optional[Callable[[], bool]] = None) -> List[List[Any]]:
        """Wait in IDLE (RFC 2177) up to ``timeout`` seconds for the selected folder to change.

        Returns the untagged updates that arrived, e.g. ``[[12, "EXISTS"]]``, as soon as
        there is at least one, or ``[]`` on timeout, or when ``interrupt()`` (asked about
        every IDLE_POLL seconds) returns True.  IDLE is left (DONE) before returning, so
        other commands may follow.  The keepalive stays away meanwhile: IDLE holds the
        connection's lock.  Works the same on every Python version: imaplib's own
        ``idle()`` exists only from 3.14.
        """
        if not self.has("IDLE"):
            raise CapabilityError(f"{self.host} does not support IDLE")
        timeout = min(timeout, IDLE_MAX_SECONDS)
        return self._retrying("IDLE", lambda: self._proto.idle(timeout, interrupt))


class _SafeCopy:
    """COPY that is never repeated blindly, and MOVE built from it where a server lacks MOVE.

    Off Gmail a copy is a new message, so a COPY whose answer was lost to a dropped link
    must not simply be sent again; and moving without MOVE is COPY, \\Deleted and an
    expunge that must remove only our messages.  GmailConnection.move() and copy() hand
    both jobs here, to a helper that drives the connection's commands under its retry
    policy (_retrying) and keeps no state of its own beyond the connection.
    """

    def __init__(self, conn: "GmailConnection") -> None:
        self.conn = conn

    def copy_then_delete(self, chunk: List[int], destination: str,
                         moved: Dict[int, Optional[int]], missing: List[int],
                         surprises: "_ExpungeCheck",
                         copied_since: Mapping[int, Optional[int]]) -> None:
        """MOVE without MOVE: COPY (never twice, see copy_once), then \\Deleted on exactly
        these UIDs and UID EXPUNGE of them, or without UIDPLUS a checked plain EXPUNGE.

        Messages already marked \\Deleted here may be the originals of an earlier run that
        stopped between COPY and EXPUNGE, and those in ``copied_since`` of one that may
        have stopped between COPY and STORE (the caller kept them, see GmailConnection.move):
        either is copied only if the destination does not already hold it, looked for
        among the destination's messages since that COPY where it is known.
        """
        present = set(self.conn.search(uids=chunk))
        missing.extend(uid for uid in chunk if uid not in present)
        if not present:
            return
        if not self.conn.has("UIDPLUS"):
            self.check_no_other_deleted(present, destination, copied=False)
        mapping: Dict[int, Optional[int]] = {}
        marked = sorted(self.conn.search(["DELETED"], uids=present))
        if marked:
            mapping.update(self.copies_in(destination, marked, None))
        earlier = [uid for uid in sorted(present) if uid in copied_since and uid not in marked]
        if earlier:
            since = [copied_since[uid] for uid in earlier]
            oldest = None if None in since else min(since)  # type: ignore[type-var]
            mapping.update(self.copies_in(destination, earlier, oldest))
        todo = sorted(uid for uid in present if uid not in mapping)
        if todo:
            mapping.update(self.copy_once(todo, destination))
        self.conn.add_flags(present, ["\\Deleted"])
        stayed: set = set()
        if self.conn.has("UIDPLUS"):
            self.conn.uid_expunge(present)
        else:
            check = self.expunge_only(present, destination)
            stayed = set(check.stayed)
            surprises.add(check)
        for uid in present:
            if uid not in stayed:
                moved[uid] = mapping.get(uid)

    def check_no_other_deleted(self, ours: set, destination: str, copied: bool) -> set:
        """Refuse (CapabilityError) if a message other than ``ours`` is marked \\Deleted in
        the selected folder; returns those of ``ours`` that are marked."""
        marked = set(self.conn.search(["DELETED"]))
        others = marked - ours
        if others:
            folder = self.conn._selected.name if self.conn._selected else "the folder"
            done = (f"the messages were copied to {destination} and left in {folder} as well"
                    if copied else "nothing was moved")
            raise CapabilityError(
                f"refusing a plain EXPUNGE in {folder}: {len(others)} other message(s) there "
                f"are marked \\Deleted (perhaps by another mail client) and would be deleted "
                f"too; {done}. Expunge or unmark them, then run again", command="EXPUNGE")
        return marked & ours

    def expunge_only(self, uids: set, destination: str) -> "_ExpungeCheck":
        """A plain EXPUNGE (no UIDPLUS) that removes exactly ``uids``: sent only right after
        UID SEARCH DELETED showed no other message marked, and checked again after a drop.

        Without UIDPLUS nothing closes the gap between that SEARCH and the EXPUNGE, where
        another client may mark a message of its own \\Deleted (our EXPUNGE deletes it for
        good) or clear the flag on one of ours (it stays).  Both can be seen afterwards:
        each message removed is one untagged EXPUNGE (RFC 3501 §7.4.1), and ours that
        stayed are still found by UID.  Returns what was seen (an _ExpungeCheck)."""
        def attempt() -> _ExpungeCheck:
            try:
                ours = self.check_no_other_deleted(uids, destination, copied=True)
            except CapabilityError:
                self.conn.remove_flags(uids, ["\\Deleted"])
                raise
            if not ours:
                return _ExpungeCheck()   # the last EXPUNGE got through before the link dropped
            expunged = [0]

            def count(item: List[Any]) -> None:
                if len(item) >= 2 and str(item[1]).upper() == "EXPUNGE":
                    expunged[0] += 1

            self.conn._proto.execute("EXPUNGE", on_untagged=count)
            stayed = sorted(set(self.conn._search_now(sorted(uids))) & uids)
            return _ExpungeCheck(stayed, max(0, expunged[0] - (len(uids) - len(stayed))))

        return self.conn._retrying("EXPUNGE", attempt)

    def copy_once(self, uids: List[int], destination: str) -> Dict[int, Optional[int]]:
        """UID COPY that never leaves a message copied twice, even if the link drops.

        COPY is not idempotent, and a drop before its answer loses the COPYUID too.  So the
        destination's UIDNEXT is noted first: after reconnecting, a UIDNEXT that has not
        moved proves the COPY never ran (send it again); otherwise the messages that arrived
        since are compared with ours by Message-ID, size and INTERNALDATE (COPY keeps all
        three) and only those not there are copied again.  Returns {source UID: new UID or
        None where the server did not say}.
        """
        pending = list(uids)
        result: Dict[int, Optional[int]] = {}
        before: Optional[int] = None

        def attempt() -> None:
            nonlocal before
            before = self.uidnext(destination)
            response = self.conn._proto.execute("UID COPY", compress_uids(pending),
                                                self.conn._mailbox(destination))
            mapping = _copyuid_map(response, pending)
            result.update({uid: mapping.get(uid) for uid in pending})

        def settle() -> bool:
            nonlocal pending
            found = self.arrived(pending, destination, before)
            if found is None:
                log.info("the connection dropped before UID COPY to %s reached the server; "
                         "sending it again", destination)
                return False
            log.info("the connection dropped during UID COPY to %s; %d of %d messages had "
                     "been copied", destination, len(found), len(pending))
            result.update(found)
            pending = [uid for uid in pending if uid not in found]
            return not pending

        self.conn._retrying(f"UID COPY to {destination}", attempt, settle)
        return result

    def arrived(self, uids: List[int], destination: str,
                before: Optional[int]) -> Optional[Dict[int, Optional[int]]]:
        """After a COPY to ``destination`` whose answer was lost: None when its UIDNEXT is
        still ``before`` (the COPY never ran), else the copies of ``uids`` that arrived
        since (see copies_in)."""
        if before is not None and self.uidnext(destination) == before:
            return None
        return self.copies_in(destination, uids, before)

    def copies_in(self, destination: str, uids: List[int],
                  since: Optional[int]) -> Dict[int, Optional[int]]:
        """Which of ``uids`` (selected folder) ``destination`` holds a copy of, among its
        messages from UID ``since`` on (all if None): {source UID: destination UID}.

        Opens ``destination`` read-only, then the source folder again; raises
        UidValidityError if the source was renumbered meanwhile.
        """
        source = self.conn._selected
        if source is None:
            raise ImapError("no folder is selected", command="UID COPY")
        fields = "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"
        items = [fields, "RFC822.SIZE", "INTERNALDATE"]

        def key(values: Mapping[str, Any]) -> Tuple[bytes, Any, Any]:
            message_id = b" ".join((values.get(fields) or b"").split()).lower()
            return message_id, values.get("RFC822.SIZE"), values.get("INTERNALDATE")

        ours = self.conn.fetch(uids, items)
        self.conn.examine(destination)
        try:
            there = self.conn.search(["UID", f"{since}:*"] if since else ["ALL"])
            there = [uid for uid in there if since is None or uid >= since]
            theirs = self.conn.fetch(there, items) if there else {}
        finally:
            status = self.conn.select(source.name, readonly=source.readonly)
        if status.uidvalidity != source.uidvalidity:
            raise UidValidityError(f"UIDVALIDITY of {source.name} changed while checking "
                                   f"{destination}; nothing more was done, run again",
                                   command="SELECT")
        pool: Dict[Tuple[bytes, Any, Any], List[int]] = {}
        for uid in sorted(theirs):
            pool.setdefault(key(theirs[uid]), []).append(uid)
        found: Dict[int, Optional[int]] = {}
        for uid in uids:
            bucket = pool.get(key(ours[uid])) if uid in ours else None
            if bucket:
                found[uid] = bucket.pop(0)
        return found

    def uidnext(self, folder: str) -> Optional[int]:
        """UIDNEXT of ``folder`` by STATUS (see _status), or None if it did not say."""
        value = self.conn._status(folder, "(UIDNEXT)").get("UIDNEXT")
        return None if value is None else _server_number(value, "UIDNEXT", "STATUS", nonzero=True)


@dataclass
class _Write:
    """One command of a _WriteFlight: what it is for (``key``, the caller's), the UIDs it
    names and, once landed, what the server confirmed or the refusal."""

    key: Any
    command: str                        # CREATE, UID STORE, UID COPY or UID MOVE
    args: Tuple[Any, ...]
    uids: List[int]
    destination: Optional[str] = None   # the server name a CREATE, COPY or MOVE names
    uidnext: Optional[int] = None       # a COPY's destination's UIDNEXT before the flight
    pending: Optional[_Pending] = None
    response: Optional[_Response] = None
    error: Optional[ImapError] = None
    result: Optional[Dict[int, Optional[int]]] = None    # {uid: new UID or None}, confirmed
    missing: List[int] = field(default_factory=list)     # MOVE: gone before we asked
    created: Optional[bool] = None      # CREATE: made (True) or there already (False)


class _WriteFlight:
    """Write commands sent back to back, their answers read afterwards (RFC 3501 §5.5):
    one wait for the server instead of one per command.

    Only for writes whose write-ahead intent is on disk.  ``create/store/copy/move`` queue
    commands, ``send()`` puts them on the wire and ``land()`` reads the answers (a server
    may finish them out of order: _Protocol keeps each answer for its own command, and a
    COPYUID goes to the command whose UIDs it names).  Nothing is sent twice blindly:
    after a drop, land() settles each command whose answer was lost as the one-at-a-time
    methods do (a STORE or CREATE again: both idempotent; a MOVE by what is still in the
    source folder; a COPY off Gmail by the destination's UIDNEXT from before the flight,
    then by Message-ID, size and date, see _SafeCopy).  A refusal (NO, BAD) is kept on its
    command (``error``); the commands after it were sent and are answered all the same.
    """

    def __init__(self, conn: "GmailConnection") -> None:
        self.conn = conn
        self.writes: List[_Write] = []

    def create(self, name: str, key: Any) -> None:
        self.writes.append(_Write(key, "CREATE", (self.conn._mailbox(name),), [],
                                  destination=name))

    def store(self, key: Any, uids: Iterable[int], item: str, values: Sequence[bytes]) -> None:
        for chunk in chunk_uids(uids):
            self.writes.append(_Write(key, "UID STORE", _store_args(chunk, item, values), chunk))

    def copy(self, key: Any, uids: Iterable[int], destination: str,
             uidnext: Optional[int] = None) -> None:
        """Queue a UID COPY; ``uidnext``: the destination's UIDNEXT before the flight (or
        lower; None if unknown), what a lost answer is settled by off Gmail."""
        for chunk in chunk_uids(uids):
            self.writes.append(_Write(key, "UID COPY", (compress_uids(chunk),
                                                        self.conn._mailbox(destination)),
                                      chunk, destination, uidnext))

    def move(self, key: Any, uids: Iterable[int], destination: str) -> None:
        for chunk in chunk_uids(uids):
            self.writes.append(_Write(key, "UID MOVE", (compress_uids(chunk),
                                                        self.conn._mailbox(destination)),
                                      chunk, destination))

    def send(self) -> None:
        """Every queued command onto the wire, without reading an answer; one that needs a
        literal's continuation (not a small one with LITERAL+/LITERAL-) is run on its own in
        its place.  A drop here leaves the rest for land() to settle."""
        conn, proto = self.conn, self.conn._proto
        with conn._lock:
            conn._check_background()
            nonsync = bool({"LITERAL+", "LITERAL-"} & proto.capabilities)
            with contextlib.suppress(_Dropped):     # what was not answered is settled by land()
                for write in self.writes:
                    if all(not isinstance(arg, Literal) or (nonsync and len(arg.data) <=
                                                            NONSYNC_LITERAL_MAX)
                           for arg in write.args):
                        write.pending = proto.send_ahead(write.command, *write.args)
                        continue
                    try:
                        write.response = proto.execute(write.command, *write.args)
                    except ImapError as exc:
                        if exc.status not in ("NO", "BAD"):
                            raise
                        write.error = exc

    def land(self) -> List[_Write]:
        """Read every answer (each write's ``result``, ``created`` or ``error``), settling
        those lost to a drop; returns the writes.  What was answered before an error
        passes on (a stop that could not wait, a garbled answer) is filled in still."""
        conn, proto = self.conn, self.conn._proto
        lost: List[_Write] = []
        try:
            with conn._lock:
                for write in self.writes:
                    if lost or (write.pending is None and write.response is None and
                                write.error is None):
                        lost.append(write)      # dropped before it was sent, or after
                        continue
                    if write.pending is None:
                        continue
                    try:
                        write.response = proto.collect(write.pending)
                    except ImapError as exc:
                        if exc.status not in ("NO", "BAD"):
                            raise
                        write.error = exc
                    except _Dropped:
                        lost.append(write)
                if lost and lost[0].pending is not None and \
                        proto.imap is lost[0].pending.imap:
                    proto.drop()    # the rest of this link's answers are lost with it
        finally:
            # A MOVE's COPYUID comes untagged, perhaps while another answer was read: one of
            # this flight's, or of a flight still unanswered that was sent after it (two
            # steps' moves on the wire), which is kept on the connection for that one.
            codes = [(item[1], item[2]) for w in self.writes if w.response is not None
                     for item in w.response.untagged
                     if item and item[0] == "OK" and len(item) >= 3]
            where = self._where()
            codes += [(code, args) for place, code, args in conn._copyuids_kept
                      if place == where]
            for write in self.writes:
                if write.response is not None:
                    self._answered(write, [(write.response.code, write.response.code_args)]
                                   + codes)
                elif write.error is not None:
                    self._answered(write, [])
            conn._copyuids_kept = [(where, code, args) for code, args in codes
                                   if code == "COPYUID" and not self._names(args)
                                   ][-MAX_KEPT_COPYUIDS:]
        for write in lost:
            self._settle(write)
        return self.writes

    def _where(self) -> Optional[Tuple[str, int]]:
        """The folder the UIDs of a COPYUID's source are of: the one selected."""
        selected = self.conn.selected
        return None if selected is None else (selected.name, selected.uidvalidity)

    def _names(self, args: Sequence[Any]) -> bool:
        """Whether a COPYUID (``args``) names UIDs of one of this flight's copies or moves
        (see _answered: it is then that command's, whether or not it used it)."""
        for write in self.writes:
            if write.command not in ("UID COPY", "UID MOVE") or len(args) < 3:
                continue
            try:
                source = parse_uid_set(str(args[1]), limit=len(write.uids))
            except ValueError:
                continue
            if source and set(source) <= set(write.uids):
                return True
        return False

    def _answered(self, write: _Write, codes: List[Tuple[Any, Any]]) -> None:
        """Fill in ``write``'s outcome from its answer; ``codes``: the response codes its
        COPYUID may be among, its own first (a flight's moves name disjoint UIDs)."""
        if write.command == "CREATE" and write.error is not None:
            if _already_exists(write.error):
                write.error, write.created = None, False     # as create_folder says
                self.conn._created(str(write.destination))
            else:
                write.error = _refused(write.error, "create the folder", str(write.destination))
            return
        if write.error is not None:
            if write.command in ("UID COPY", "UID MOVE") and type(write.error) is ImapError:
                what = "copy" if write.command == "UID COPY" else "move"
                write.error = _refused(write.error, f"{what} messages to",
                                       str(write.destination))
            return
        if write.command == "CREATE":
            write.created = True
            self.conn._created(str(write.destination))
            return
        if write.command == "UID STORE":
            write.result = dict.fromkeys(write.uids)
            return
        mapping: Dict[int, int] = {}
        mine = set(write.uids)
        for code, args in codes:     # the COPYUID that names this command's UIDs
            if code != "COPYUID" or len(args) < 3:
                continue
            try:    # one naming more UIDs than this command's is another's: not expanded
                source = parse_uid_set(str(args[1]), limit=len(mine))
            except ValueError:
                continue
            if source and set(source) <= mine:
                mapping = _copyuid_pairs(args, mine, source)
                break
        write.result = {}
        for uid in write.uids:
            if write.command == "UID MOVE" and mapping and uid not in mapping:
                write.missing.append(uid)   # gone before we asked: someone else moved it
            else:
                write.result[uid] = mapping.get(uid)

    def _settle(self, write: _Write) -> None:
        """A write whose answer was lost (or that was never sent): find out what it did
        and finish it with the one-at-a-time method, which reconnects first."""
        conn = self.conn
        log.info("the connection dropped with %s in flight; settling it", write.command)
        try:
            if write.command == "CREATE":
                write.created = conn.create_folder(str(write.destination))
            elif write.command == "UID STORE":
                conn._call("UID STORE", *write.args)
                write.result = dict.fromkeys(write.uids)
            elif write.command == "UID COPY" and conn.is_gmail:
                write.result = conn.copy(write.uids, str(write.destination))
            elif write.command == "UID COPY":
                # Off Gmail: by the UIDNEXT from before the flight, as the class docstring says
                safe, destination = _SafeCopy(conn), str(write.destination)
                found = safe.arrived(write.uids, destination, write.uidnext) or {}
                rest = [uid for uid in write.uids if uid not in found]
                if rest:
                    found.update(safe.copy_once(rest, destination))
                write.result = found
            else:
                still_here = set(conn.search(uids=write.uids))
                write.result = {uid: None for uid in write.uids if uid not in still_here}
                rest = [uid for uid in write.uids if uid in still_here]
                if rest:
                    moved = conn.move(rest, str(write.destination))
                    write.result.update(moved.moved)
                    write.missing.extend(moved.missing)
        except ImapError as exc:
            if type(exc) is not ImapError or exc.status not in ("NO", "BAD"):
                raise
            write.error = exc


def _new_tag(imap: imaplib.IMAP4) -> bytes:
    """The next command tag.  imaplib's ``_new_tag`` also files the tag in
    ``tagged_commands`` for its own reader, which we never use after sign-in: drop it
    there, or a connection that lives for days (``watch``) grows by one entry a command."""
    tag = imap._new_tag()  # type: ignore[attr-defined]
    imap.tagged_commands.pop(tag, None)  # type: ignore[attr-defined]
    return tag


@contextlib.contextmanager
def _naming(folder: str, what: str) -> Iterator[None]:
    """Turn the server's plain NO or BAD into an error that names the folder."""
    try:
        yield
    except ImapError as exc:
        if type(exc) is not ImapError or exc.status not in ("NO", "BAD"):
            raise
        raise _refused(exc, what, folder) from exc


def _refused(exc: ImapError, what: str, folder: str) -> ImapError:
    """The server's refusal ``exc`` as an error that names the folder and quotes it."""
    return ImapError(f"the server refused to {what} {folder!r}: {exc.status} {exc.text}",
                     command=exc.command, status=exc.status, code=exc.code, text=exc.text)


def _already_exists(exc: ImapError) -> bool:
    """Whether a CREATE's refusal says the folder is there already (not every server
    sends [ALREADYEXISTS]; their words say so)."""
    return exc.code == "ALREADYEXISTS" or "exist" in exc.text.lower()


def _store_args(uids: Sequence[int], item: str, values: Sequence[bytes]) -> Tuple[Any, ...]:
    """The arguments of one UID STORE.  +FLAGS.SILENT spares the echo of every message's
    flags (RFC 3501 §6.4.6); Gmail documents no .SILENT form of X-GM-LABELS, so labels
    are stored loudly."""
    if item.endswith("FLAGS"):
        item += ".SILENT"
    return compress_uids(uids), item, b"(" + b" ".join(values) + b")"


def _fetch_literal_limit(items: Sequence[str]) -> int:
    """The largest literal a FETCH of ``items`` can honestly bring: the length of a partial
    fetch (``<0.16384>``), a header block's limit for header sections, a whole message's
    for other sections, a small one for anything else."""
    limit = 0
    for item in items:
        if not re.match(r"(?i)(BODY|BINARY)\.PEEK\[|RFC822(?!\.SIZE)", item):  # SIZE: a number
            limit = max(limit, MAX_SMALL_LITERAL)
            continue
        partial = re.search(r"<\d+\.(\d+)>$", item)
        if partial:
            limit = max(limit, int(partial.group(1)))
        elif re.search(r"(?i)\[(\d+\.)*(HEADER|MIME)", item) or item.upper() == "RFC822.HEADER":
            limit = max(limit, MAX_HEADER_LITERAL)
        else:
            limit = max(limit, MAX_MESSAGE_LITERAL)
    return limit


def _check_fetch_item(item: str) -> None:
    """Refuse fetch items that would set \\Seen (BODY[...], BINARY[...], RFC822, RFC822.TEXT)
    or that smuggle in more than one item."""
    _refuse_controls(item, "the fetch item")
    peek = re.fullmatch(r"(?i)(BODY|BINARY)\.PEEK\[[^\]]*\](<\d+(\.\d+)?>)?", item)
    plain = re.fullmatch(r"(?i)[A-Z0-9.-]+", item)
    if peek or (plain and item.upper() not in ("RFC822", "RFC822.TEXT")):
        return
    raise ImapError(f"refusing to FETCH {item!r}: only single items are allowed, and body "
                    f"sections only as BODY.PEEK[...], which leaves messages unread")


def _string_arg(text: str) -> Union[bytes, Literal]:
    """A string argument: quoted when it is printable ASCII, otherwise a UTF-8 literal."""
    _refuse_controls(text, "the string")
    return quote(text) if text.isascii() else Literal(text.encode("utf-8"))


def _flag_arg(flag: str) -> bytes:
    _refuse_controls(flag, "the flag")
    if not re.fullmatch(r"\\?[^(){ \x00-\x1f\x7f%*\"\\\]]+", flag):
        raise ImapError(f"{flag!r} is not a valid IMAP flag or keyword")
    return flag.encode("ascii")


def _label_arg(label: str) -> bytes:
    """A Gmail label on the wire: system labels as atoms, others modified UTF-7 astrings."""
    _refuse_controls(label, "the label")
    system = next((name for name in GMAIL_SYSTEM_LABELS if name.lower() == label.lower()), None)
    # Gmail misreads some unquoted label atoms (those with * or brackets); quote always.
    return system.encode("ascii") if system else quote(encode_mailbox(label))


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
    out: List[Any] = []
    items = iter([criteria] if isinstance(criteria, str) else criteria)
    missing = object()      # what next() gives when no argument is left
    for item in items:
        key = str(item).upper()
        if key not in _SEARCH_KEYS:
            raise ImapError(f"unknown search key {item!r}; known keys: "
                            f"{', '.join(sorted(k for k in _SEARCH_KEYS if k.isalpha()))}")
        out.append(key)
        for kind in _SEARCH_KEYS[key]:
            value = next(items, missing)
            if value is missing:
                raise ImapError(f"search key {key} needs a {kind} argument")
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
    return out


# --- Messages: what the rule engine sees -------------------------------------------------

# How much of each body the IMAP pipeline fetches (BODY.PEEK[]<0.N>) for messages
# that header-only rules cannot decide. 16 KiB holds the headers of a typical
# message plus the start of its first text part; a keyword rule rarely needs
# more, and 16 KiB x thousands of messages stays far below Gmail's 2,500 MB/day
# IMAP download limit. The prefix includes the header block, so body_text()
# must cope with a message cut anywhere.
BODY_PREFIX_BYTES = 16384
# Bytes a FETCH answer may take per message beside the literals whose sizes are known (its
# flags, dates, sizes, labels), and the guess for a batch's headers before any has come:
# the daily download budget is checked against it (see Checkpoint.may_download).
FETCH_GUESS = 1024


@dataclass(frozen=True)
class MessageInfo:
    """What the rule engine knows of one message; None means "not fetched / unknown"."""

    headers: email.message.EmailMessage  # parsed header block (policy=email.policy.default)
    uid: int = 0  # IMAP UID (0 offline)
    flags: Optional[frozenset] = frozenset()  # e.g. {"\\Seen", "\\Flagged"}; None if unknown
    labels: Optional[frozenset] = None  # decoded Gmail labels, e.g. {"\\Inbox", "Receipts"}
    size: Optional[int] = None  # RFC822.SIZE in bytes
    date: Optional[datetime] = None  # aware: INTERNALDATE, or the Date header offline
    has_attachment: Optional[bool] = None
    body: Optional[str] = None  # decoded text prefix (plain, or HTML stripped to text)
    queries: Optional[frozenset] = None  # gmail_query strings this message matched; None = cannot know
    source: Optional[bytes] = None  # the bytes fetched for the body (header block included)
    folder: str = ""  # the folder it was read from, as the rules name it
    # The answers of the rules' programs (ProgramCondition -> its answer), kept across
    # dataclasses.replace(): each program runs once per message.
    programs: Dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def _made(cls, **values: Any) -> "MessageInfo":
        """``MessageInfo(**values)`` for the pipeline, which makes one per message fetched:
        the fields go into the new instance's dict at once, where the frozen __init__
        sets each through object.__setattr__ (three times the cost).  ``values`` names
        every field, ``programs`` a new dict; there is no __post_init__ to run."""
        info = object.__new__(cls)
        info.__dict__.update(values)
        return info


# A header block made only of well-formed fields (name, colon, value, folded lines) and
# ending at its blank line can be split without the feed parser, with the same result
# (email.policy.EmailPolicy.header_source_parse); anything else goes to the parser.  The
# value starts at its first character that is not a blank: were blanks allowed on both
# sides of that point, a sender's field of blanks that then fails to match would be tried
# at every split of them (a 20 KB field took 13 s), where now there is one.
_SIMPLE_FIELD = re.compile(r"([!-9;-~]+):[ \t]*((?:[^ \t\r\n][^\r\n]*)?(?:\r\n[ \t][^\r\n]*)*)\r\n")


def _split_header_block(raw: bytes) -> Optional[email.message.EmailMessage]:
    """The header block as an EmailMessage, or None when it is not simple."""
    text = raw.decode("ascii", "surrogateescape")
    end = text.find("\r\n\r\n")
    if end >= 0:
        if end + 4 != len(text):
            return None    # a body follows: let the parser keep it
        text = text[:end + 2]
    elif not text.endswith("\r\n"):
        text += "\r\n"
    msg = email.message.EmailMessage(policy=email.policy.default)
    pos, end = 0, len(text)
    match = _SIMPLE_FIELD.match
    keep = msg._headers.append      # as msg.set_raw(name, value) does, a call less a field
    while pos < end:
        field = match(text, pos)
        if field is None:
            return None
        keep(field.group(1, 2))
        pos = field.end()
    return msg


def parse_headers(raw: bytes) -> email.message.EmailMessage:
    """Parse a header block (or a whole message, body ignored); never raises.

    Returns an EmailMessage whose headers decode RFC 2047 on access; an empty
    message when the bytes cannot be parsed at all.
    """
    try:
        msg = _split_header_block(raw)
        if msg is not None:
            return msg
        # compat32 splits the fields exactly as policy.default does, but never hands a
        # value to the header classes while parsing (the parser asks for Content-Type,
        # whose crafted values cost quadratic time there; see _MIME_POLICY).
        parser = email.parser.BytesParser(policy=email.policy.compat32)
        plain = parser.parsebytes(raw, headersonly=True)
        msg = email.message.EmailMessage(policy=email.policy.default)
        for name, value in plain.raw_items():
            msg.set_raw(name, value)
        return msg
    except Exception:  # the parser is lenient, but older patch releases had crashes
        log.debug("cannot parse header block", exc_info=True)
        return email.message.EmailMessage(policy=email.policy.default)


_SURROGATE = re.compile("[\udc80-\udcff]")


def _has_surrogates(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _repair_surrogates(text: str) -> str:
    """Turn raw 8-bit bytes smuggled in as lone surrogates back into text.

    The email package reads raw 8-bit headers as ASCII with surrogateescape; the
    bytes are mostly UTF-8 and otherwise usually Latin-1 / cp1252.
    """
    if not _has_surrogates(text):
        return text
    data = text.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


# A run of RFC 2047 encoded words; the whitespace between two of them is not
# part of the text (RFC 2047 section 6.2), which decode_header handles per run.
# It joins the bytes of a run by repeated concatenation (quadratic), so a
# run is taken 64 words at a time: a sender's endless run costs linear time.
_ENCODED_WORDS = re.compile(r"=\?[^?\s]+\?[BbQq]\?[^?\s]*\?=(?:\s+=\?[^?\s]+\?[BbQq]\?[^?\s]*\?=){0,63}")


def _decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words in a raw header value, run by run; never raises."""
    def decode(run: re.Match) -> str:
        try:
            return str(email.header.make_header(email.header.decode_header(run.group(0))))
        except Exception:  # unknown charset, broken base64
            return run.group(0)
    return _ENCODED_WORDS.sub(decode, text)


# How much of one header (all its values together) is decoded: far more than any
# honest header holds (500 recipients fit in 20 KB), and a bound on the time a sender
# can make each reading of it cost, whatever the shape (every reader below is linear).
HEADER_VALUE_LIMIT = 32768


def _bounded(raws: List[str]) -> List[str]:
    """The values of one header cut to HEADER_VALUE_LIMIT characters in all."""
    if sum(map(len, raws)) <= HEADER_VALUE_LIMIT:
        return raws
    kept: List[str] = []
    room = HEADER_VALUE_LIMIT
    for raw in raws:
        if room <= 0:
            break
        kept.append(raw[:room])
        room -= len(raw)
    return kept


def _raw_values(msg: email.message.EmailMessage, name: str) -> List[str]:
    """The unparsed, unfolded values of one header (8-bit bytes as lone surrogates)."""
    wanted = name.lower()
    try:
        items = [value for key, value in msg.raw_items() if key.lower() == wanted]
    except Exception:
        return []
    return _bounded([re.sub(r"\r?\n(?=[ \t])", "", str(value)) for value in items])


# The header classes of email.policy.default (email._header_value_parser) take time
# that grows with the square of some values: a From of '"\\"' repeated 20,000 times
# (60 KB, an obsolete local part) costs 30 seconds, one near the 2 MiB header limit
# hours, while watch holds the account lock.  A sender chooses these bytes, so values
# longer than this never reach those classes; _address_pairs() below reads them in
# linear time instead.  Common shapes never get there (the fast path reads them), so
# the limit only decides how exotic long headers are read.
HEADER_PARSE_LIMIT = 2048


def _plain_reading(msg: email.message.EmailMessage, name: str,
                   read: Callable[[Any], Any]) -> Iterator[Tuple[str, Any]]:
    """(raw value, ``read`` of its header object) for each value of one header; None where
    the header classes could not be used or ``read`` failed (the caller reads ``raw``).

    policy.default turns raw 8-bit bytes into U+FFFD; such values are left to
    the caller, who repairs the raw value instead and keeps the characters.
    Values longer than HEADER_PARSE_LIMIT in all are not parsed (all None).
    """
    raws = _raw_values(msg, name)
    parsed: list = []
    if sum(map(len, raws)) <= HEADER_PARSE_LIMIT:    # else too long for the header classes
        try:
            parsed = msg.get_all(name) or []
        except Exception:
            log.debug("header %s does not parse", name, exc_info=True)
    for raw, value in zip(raws, parsed if len(parsed) == len(raws) else [None] * len(raws)):
        try:
            value = None if value is None or _has_surrogates(raw) else read(value)
        except Exception:
            value = None
        yield raw, value


def _plain_header_text(msg: email.message.EmailMessage, name: str) -> List[str]:
    """header_text() through the email package's header classes: slow, the reference."""
    return [_decode_words(_repair_surrogates(raw)) if text is None else text
            for raw, text in _plain_reading(msg, name, str)]


def _format_address(display_name: str, addr_spec: str) -> str:
    display_name = " ".join(display_name.split())
    if display_name and addr_spec:
        return f"{display_name} <{addr_spec}>"
    return display_name or addr_spec


# Tokens of an address list outside comments: white space, a quoted string (its closing
# quote optional, so that the pattern never backtracks), a quoted pair, a special, or a
# run of anything else (atoms, dots and "@" stay together).  Inside a comment only
# parentheses and quoted pairs count.
_ADDRESS_TOKEN = re.compile(r'[ \t\r\n]+|"((?:[^"\\]|\\[\s\S]?)*)"?|\\[\s\S]?|[()<>,:;]'
                            r'|[^ \t\r\n"()<>,:;\\]+')
_COMMENT_TOKEN = re.compile(r'[^()\\]+|\\[\s\S]?|[()]')


def _address_pairs(raw: str) -> List[Tuple[str, str]]:
    """(display name, addr-spec) of each mailbox in an address-list value, read in
    linear time whatever its length or shape (RFC 5322 section 3.4, leniently).

    Returns e.g. [("support@paypal.com", "phisher@evil.example")] for
    '"support@paypal.com" <phisher@evil.example>': the address comes from the
    angle brackets, never from the display name; comments are dropped, group names
    skipped, an obsolete route (<@a,@b:x@y>) removed; the address is "" where
    there is none. Display names are not decoded.
    """
    pairs: List[Tuple[str, str]] = []
    words: List[str] = []          # display-name words, quotes removed
    bare: List[str] = []           # the same tokens as written, for a bare addr-spec
    angle: Optional[List[str]] = None
    addr: Optional[str] = None
    pos, end = 0, len(raw)

    def flush() -> None:
        nonlocal addr
        display = " ".join(words)
        if addr is not None:
            pairs.append((display, addr))
        elif any("@" in token for token in bare if token[0] != '"'):
            pairs.append(("", "".join(bare)))
        elif words:
            pairs.append((display, ""))
        words.clear()
        bare.clear()
        addr = None

    while pos < end:
        if raw[pos] == "(":
            depth, pos = 1, pos + 1
            while depth and pos < end:
                token = _COMMENT_TOKEN.match(raw, pos)
                depth += {"(": 1, ")": -1}.get(token.group(), 0)
                pos = token.end()
            continue
        token = _ADDRESS_TOKEN.match(raw, pos)
        text, pos = token.group(), token.end()
        first = text[0]
        if angle is not None:
            if text == ">":
                addr = _angle_address(angle)
                angle = None
            elif first not in " \t\r\n":
                angle.append(text)
        elif text == "<":
            angle = []
        elif text in (",", ";"):
            flush()
        elif text == ":":
            words.clear()      # a group's name
            bare.clear()
        elif first in " \t\r\n" or text in (")", ">") or addr is not None:
            continue
        elif first == '"':
            words.append(re.sub(r"\\([\s\S])", r"\1", token.group(1)))
            bare.append(text)
        else:
            words.append(text)
            bare.append(text)
    if angle is not None:
        addr = _angle_address(angle)
    flush()
    return pairs


def _angle_address(tokens: List[str]) -> str:
    """The addr-spec between angle brackets, its obsolete route dropped; "" unless it
    has an "@" outside quotes (<"x@paypal.com"> names no domain)."""
    if tokens and tokens[0].startswith("@") and ":" in tokens:
        tokens = tokens[len(tokens) - tokens[::-1].index(":"):]
    if not any("@" in token for token in tokens if token[0] != '"'):
        return ""
    return "".join(tokens)


def _addresses_without_parse(raw: str) -> List[str]:
    """What header_addresses() makes of a value the header classes found no address in:
    the mailboxes with an address, read without those classes, else the decoded text."""
    raw = _repair_surrogates(raw)
    pairs: List[Tuple[str, str]] = []
    if len(raw) <= HEADER_PARSE_LIMIT:
        try:
            pairs = [pair for pair in email.utils.getaddresses([raw]) if "@" in pair[1]]
        except Exception:
            pairs = []
    if not pairs:    # long, or too odd for getaddresses (which is strict on newer Pythons)
        pairs = [pair for pair in _address_pairs(raw) if "@" in pair[1]]
    found = [_format_address(_decode_words(display), addr) for display, addr in pairs]
    if not found:
        text = _decode_words(raw).strip()
        found = [text] if text else []
    return found


def _plain_header_addresses(msg: email.message.EmailMessage, name: str) -> List[str]:
    """header_addresses() through the email package's header classes: slow, the reference."""
    def addresses(parsed: Any) -> List[str]:
        return [_format_address(a.display_name, a.addr_spec)
                for a in getattr(parsed, "addresses", ())
                if "@" in a.addr_spec or a.display_name]

    return [address for raw, found in _plain_reading(msg, name, addresses)
            for address in (found or _addresses_without_parse(raw))]


# --- Messages: the fast path -----------------------------------------------------------
#
# email.policy.default parses a header through headerregistry each time it is read
# (about 0.3 ms for an address), and the rules read From, To and Subject many times per
# message.  So each message keeps its decoded headers in a cache, filled on first use,
# and the common shapes of values are decoded here directly: plain text, RFC 2047 words
# that decode cleanly, and lists of "Name <user@domain>", "user@domain" and groups.  A
# header holding any other shape (comments, quoted pairs, broken or unknown encodings,
# 8-bit bytes...) goes through the reference path above for all its values, so the
# results are the same either way; a test compares the two over a varied corpus.

_HEADER_KINDS: Dict[str, str] = {}


def _header_kind(name: str) -> str:
    """"address", "text" (unstructured), "msgid" or "other", as email.policy.default
    parses it."""
    kind = _HEADER_KINDS.get(name)
    if kind is None:
        import email.headerregistry as registry
        cls = email.policy.default.header_factory[name]
        kind = ("address" if issubclass(cls, registry.AddressHeader) else
                "text" if issubclass(cls, registry.UnstructuredHeader) else
                "msgid" if issubclass(cls, registry.MessageIDHeader) else "other")
        _HEADER_KINDS[name] = kind
    return kind


_CLEAN_WORD = re.compile(r"=\?([A-Za-z0-9_.:-]+)\?(?:[Qq]\?((?:[!-<>@-~]|=[0-9A-Fa-f]{2})*)"
                         r"|[Bb]\?((?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?))\?=\Z")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")


def _clean_word(word: str) -> Optional[str]:
    """An RFC 2047 encoded word decoded, or None unless it is well formed and its bytes
    are valid in its charset (then headerregistry reads it the same way)."""
    match = _CLEAN_WORD.match(word)
    if match is None:
        return None
    charset, q_text, b_text = match.groups()
    try:
        if q_text is not None:
            data = _Q_ESCAPE.sub(lambda m: bytes.fromhex(m.group(1).decode()),
                                 q_text.encode("ascii").replace(b"_", b" "))
        else:
            data = base64.b64decode(b_text, validate=True)
        return data.decode(charset)
    except (LookupError, UnicodeError, ValueError, TypeError):
        return None


_SPACES = re.compile(r"([ \t]+)")


def _fast_text(raw: str) -> Optional[str]:
    """An unstructured value decoded as headerregistry decodes it, or None if unsure."""
    if "=?" not in raw:
        return raw
    out: List[str] = []
    after_word = False
    space = ""
    for index, part in enumerate(_SPACES.split(raw)):
        if index % 2:
            space = part
            continue
        if "=?" in part:
            decoded = _clean_word(part)
            if decoded is None:
                return None
            if not after_word:    # white space between two encoded words is dropped
                out.append(space)
            out.append(decoded)
            after_word = True
        elif part:
            out += (space, part)
            after_word = False
        else:
            out.append(space)
        space = ""
    return "".join(out)


_ATOMS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR_SPEC = _ATOMS + r"(?:\." + _ATOMS + r")*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# Between angle brackets the email package also reads an obsolete local part with dots at
# its ends or doubled (<.name@host>: 3 % of one real corpus's senders) as it is written.
_ANGLE_SPEC = (r"\.*" + _ATOMS + r"(?:\.+" + _ATOMS + r")*\.*"
               r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_MAILBOX = re.compile(r"[ \t]*(?:(" + _ADDR_SPEC + r")|"
                      r"(\"[^\"\\]*\"|[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+(?:[ \t]+[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+)*)?"
                      r"[ \t]*<(" + _ANGLE_SPEC + r")>)[ \t]*(?:\([^()\\\r\n]*\)[ \t]*)?")
_PLAIN_MSGID = re.compile("<" + _ATOMS + r"(?:\." + _ATOMS + ")*@" + _ATOMS + r"(?:\." + _ATOMS + r")*>\Z")
_GROUP = re.compile(r"[ \t]*[A-Za-z0-9!#$%&'*+/^_`{|}~-]+(?:[ \t]+[A-Za-z0-9!#$%&'*+/^_`{|}~-]+)*"
                    r"[ \t]*:[ \t]*")


def _fast_display_name(phrase: str) -> Optional[str]:
    if phrase.startswith('"'):   # headerregistry decodes words inside quotes too
        return _fast_text(phrase[1:-1])
    if phrase.startswith("."):
        return None
    words = []
    for word in phrase.split():
        if "=?" in word:
            decoded = _clean_word(word)
            if decoded is None:
                return None
            word = decoded
        words.append(word)
    return " ".join(words)


def _fast_addresses(raw: str) -> Optional[List[str]]:
    """The addresses of a value in a common shape, as headerregistry finds them, or None."""
    pairs = _fast_mailboxes(raw)
    return None if pairs is None else [_format_address(*pair) for pair in pairs]


def _fast_mailboxes(raw: str) -> Optional[List[Tuple[str, str]]]:
    """(display name, addr-spec) pairs of a value in a common shape, or None.

    address-list = item *("," item); item = mailbox / phrase ":" [mailbox *("," mailbox)] ";"
    """
    found: List[Tuple[str, str]] = []
    pos, end = 0, len(raw)

    def mailbox(at: int) -> int:
        match = _MAILBOX.match(raw, at)
        if match is None or "=?" in (match.group(1) or match.group(3)):
            return -1
        if match.group(1):
            found.append(("", match.group(1)))
            return match.end()
        display = _fast_display_name(match.group(2)) if match.group(2) else ""
        if display is None:
            return -1
        found.append((" ".join(display.split()), match.group(3)))
        return match.end()

    while True:
        group = _GROUP.match(raw, pos)
        if group is None:
            pos = mailbox(pos)
        elif raw.startswith(";", group.end()):
            pos = group.end() + 1
        else:
            pos = group.end()
            while pos >= 0:
                pos = mailbox(pos)
                if pos >= 0 and raw.startswith(";", pos):
                    pos += 1
                    break
                if pos < 0 or not raw.startswith(",", pos):
                    return None
                pos += 1
        if pos < 0:
            return None
        while pos < end and raw[pos] in " \t":
            pos += 1
        if pos == end:
            return found
        if raw[pos] != ",":
            return None
        pos += 1


_CACHE = "_gmail_classify_cache"


_FOLDING = re.compile(r"\r?\n(?=[ \t])")     # a line break that folds a value (RFC 5322 2.2.3)


def _unfolded(value: Any) -> str:
    value = str(value)
    return _FOLDING.sub("", value) if "\n" in value else value


def _header_cache(msg: email.message.EmailMessage,
                  create: bool = True) -> Optional[Dict[Any, List[str]]]:
    """The cache of decoded values kept on a message while rules read it (emptied when
    its headers change), or None: not created, or the message was not parsed with
    email.policy.default (the fast path would then differ)."""
    cached = msg.__dict__.get(_CACHE)
    if cached is not None and cached[0] == msg._headers and msg.policy is email.policy.default:
        return cached[1]
    if not create or getattr(msg, "policy", None) is not email.policy.default:
        return None
    headers = getattr(msg, "_headers", None)
    if not isinstance(headers, list):
        return None
    index: Dict[Any, List[str]] = {}
    for key, value in headers:
        index.setdefault(("raw", key.lower()), []).append(
            value if value.__class__ is str and "\n" not in value else _unfolded(value))
    msg.__dict__[_CACHE] = (list(headers), index)
    return index


def _drop_header_cache(msg: email.message.EmailMessage) -> None:
    """Forget what rules decoded (a run keeps many messages between applies)."""
    msg.__dict__.pop(_CACHE, None)


def _cached(msg: email.message.EmailMessage, kind: str, name: str) -> List[str]:
    name = name.lower()
    cache = _header_cache(msg, create=False)
    if cache is None:
        if getattr(msg, "policy", None) is not email.policy.default \
                or not isinstance(getattr(msg, "_headers", None), list):
            return (_plain_header_addresses if kind == "addresses" else _plain_header_text)(msg, name)
        raws = [_unfolded(value) for key, value in msg._headers if key.lower() == name]
        return _decode_header(msg, raws, kind, name)
    values = cache.get((kind, name))
    if values is None:
        values = _decode_header(msg, cache.get(("raw", name), []), kind, name)
        cache[(kind, name)] = values
    return list(values)


# Decoded values by (kind, header name, raw values): a mailbox holds the same senders,
# recipients, lists and many of the same subjects again and again, and what a header
# decodes to depends on those alone (the reference path reads the same values from the
# message), so each is decoded once per run.  Bounded: emptied when full; long or
# numerous values (rare, and each would take much room: a value counts its length and one
# more, so 250,000 empty fields are as long as a 250,000-character one) and message IDs
# (each unique, and cheap to read) are decoded every time.
_DECODED: Dict[Tuple[str, str, Tuple[str, ...]], Tuple[str, ...]] = {}
_DECODED_MAX = 4096
_DECODED_LONGEST = 1024


def _decode_header(msg: email.message.EmailMessage, raws: List[str], kind: str,
                   name: str) -> List[str]:
    """The values ``raws`` of header ``name`` (lower case) of ``msg``, decoded as
    header_text() (``kind`` "text") or header_addresses() ("addresses") return them."""
    if not raws:
        return []
    registry_kind = _header_kind(name)
    if kind == "text" and len(raws) == 1 and len(raws[0]) <= _DECODED_LONGEST:
        # One plain text (ASCII, no encoded word: most subjects) or plain <left@right>
        # (every message has one) reads as it is, as _decode_values() finds: nothing to
        # repair or cut, and nothing worth keeping in the table.
        raw = raws[0]
        if (registry_kind == "text" and "=?" not in raw and raw.isascii()) or \
                (registry_kind == "msgid" and _PLAIN_MSGID.match(raw)):
            return [raw]
    if sum(map(len, raws)) + len(raws) > _DECODED_LONGEST or registry_kind == "msgid":
        return _decode_values(msg, raws, kind, name)
    key = (kind, name, tuple(raws))
    found = _DECODED.get(key)
    if found is None:
        found = tuple(_decode_values(msg, raws, kind, name))
        if len(_DECODED) >= _DECODED_MAX:
            _DECODED.clear()
        _DECODED[key] = found
    return list(found)


def _decode_values(msg: email.message.EmailMessage, raws: List[str], kind: str,
                   name: str) -> List[str]:
    raws = _bounded(raws)
    registry_kind = _header_kind(name)
    if any(_has_surrogates(raw) for raw in raws):
        registry_kind = "reference"
    if kind == "text" and registry_kind == "text":
        texts = [_fast_text(raw) for raw in raws]
        if None not in texts:
            return texts  # type: ignore[return-value]
    elif kind == "text" and registry_kind == "msgid":    # <left@right> reads as it is
        if all(_PLAIN_MSGID.match(raw) for raw in raws):
            return list(raws)
    elif kind == "addresses" and registry_kind == "other":   # no address classes: no parse
        return [a for raw in raws for a in _addresses_without_parse(raw)]
    elif kind == "addresses" and registry_kind == "address":
        lists = [_fast_addresses(raw) for raw in raws]
        if None not in lists:
            return [a for raw, found in zip(raws, lists)
                    for a in (found or _addresses_without_parse(raw))]
    return (_plain_header_addresses if kind == "addresses" else _plain_header_text)(msg, name)


def header_text(msg: email.message.EmailMessage, name: str) -> List[str]:
    """All values of header `name`, decoded to str; never raises.

    Returns e.g. ["Your receipt from Café Olé"]; [] when the header is absent.
    While rules classify the message, each header is decoded once and cached.
    """
    return _cached(msg, "text", name)


def header_addresses(msg: email.message.EmailMessage, name: str) -> List[str]:
    """Each address in header `name` as 'Display Name <user@domain>' (or 'user@domain').

    Returns e.g. ["Amazon.com <auto-confirm@amazon.com>"]; display names are
    RFC 2047 decoded. A value that holds no parseable address is returned as
    its decoded text, so that rules can still match it. Never raises.
    While rules classify the message, each header is decoded once and cached.
    """
    return _cached(msg, "addresses", name)


def _shown_headers(msg: email.message.EmailMessage) -> Tuple[str, str, str]:
    """The first address of From, the first Subject and the first Message-ID (stripped),
    as header_addresses() and header_text() read them: what each record shows, read
    with the header cache in hand (the pipeline decodes them for every message)."""
    cache = _header_cache(msg, create=False)
    if cache is None:
        found = (header_addresses(msg, "from"), header_text(msg, "subject"),
                 header_text(msg, "message-id"))
    else:
        found = []
        for kind, name in (("addresses", "from"), ("text", "subject"), ("text", "message-id")):
            values = cache.get((kind, name))
            if values is None:
                values = cache[(kind, name)] = _decode_header(msg, cache.get(("raw", name), []),
                                                              kind, name)
            found.append(values)
    senders, subjects, message_ids = found
    return (senders[0] if senders else "", subjects[0] if subjects else "",
            message_ids[0].strip() if message_ids else "")


def _header_mailboxes(msg: email.message.EmailMessage, name: str) -> List[Tuple[str, str]]:
    """(display name, addr-spec) of each address in header `name`; never raises.

    Returns e.g. [("support@paypal.com", "phisher@evil.example")]: what a sender
    domain or a suggested rule is taken from. The address is always the parsed
    addr-spec, never text of the display name; ("text", "") stands for a value
    with no address in it.
    """
    cache = _header_cache(msg, create=False)
    raws = _bounded(cache.get(("raw", name.lower()), [])) if cache is not None else _raw_values(msg, name)
    pairs: List[Tuple[str, str]] = []
    for raw in raws:
        found = None if _has_surrogates(raw) else _fast_mailboxes(raw)
        if found is None:
            raw = _repair_surrogates(raw)
            found = [(_decode_words(display), addr) for display, addr in _address_pairs(raw) if addr]
        if not found:
            text = _decode_words(_repair_surrogates(raw)).strip()
            found = [(text, "")] if text else []
        pairs.extend(found)
    return pairs


def _header_present(msg: email.message.EmailMessage, name: str) -> bool:
    cache = _header_cache(msg, create=False)
    if cache is None:
        return bool(_raw_values(msg, name))
    return bool(cache.get(("raw", name.lower())))


# --- Messages: bodies, attachments and the data fetched beside the headers ---------------
#
# The body prefix and attachments, read from a message's bytes (offline, or a prefix the
# pipeline fetched in a second round), and one table (_MESSAGE_DATA) of the data a rule
# may need beside the headers: the FETCH item that brings each, and how it is read from
# the server's answer or worked out from a whole message.  New message data is a
# MessageInfo field, the Needs flag that asks for it, and one row there.


class _HTMLText(html.parser.HTMLParser):
    """Collects the visible text of an HTML document (script and style skipped)."""

    _SKIP = {"script", "style", "title", "noscript", "template"}
    _BLOCK = {"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6",
              "table", "ul", "ol", "blockquote", "pre", "hr", "section", "article"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: List[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def _html_to_text(markup: str) -> str:
    parser = _HTMLText()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # html.parser is lenient; a truncated document still yields text
        log.debug("HTML parser gave up", exc_info=True)
    return "".join(parser.parts)


def _tidy_text(text: str) -> str:
    lines = (" ".join(line.split()) for line in text.replace("\r", "\n").split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _part_bytes(part: email.message.Message) -> bytes:
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64":
        payload = part.get_payload(decode=False)
        if isinstance(payload, str):
            # Base64 that may be cut off mid-line or mid-quantum (a fetched prefix).
            data = payload.encode("ascii", "ignore").split(b"=", 1)[0]
            data = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
            whole = len(data) - len(data) % 4
            rest = data[whole:]
            try:
                decoded = base64.b64decode(data[:whole])
                if len(rest) >= 2:  # 2 or 3 chars still carry 1 or 2 whole bytes
                    decoded += base64.b64decode(rest + b"=" * (4 - len(rest)))
                return decoded
            except (binascii.Error, ValueError):
                return b""
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _is_attachment(part: email.message.Message) -> bool:
    try:
        return part.get_content_disposition() == "attachment"
    except Exception:
        return False


# The MIME structure (Content-Type, Content-Disposition, their parameters) is read with
# the compat32 policy: its headers are plain strings, which get_content_type() and
# get_param() parse by text anyway.  policy.default would first hand each one to its
# header classes, which take time growing with the square of a crafted value (a
# Content-Type of '"\\"' repeated, 12 KB, cost over 40 seconds) while parsing the parts.
_MIME_POLICY = email.policy.compat32


def body_text(raw: bytes, limit: int = BODY_PREFIX_BYTES) -> str:
    """The readable text of a message or of a prefix of one; never raises.

    Picks the first text/plain part with text, else the first text/html part
    stripped to text. Returns at most `limit` characters ("" when there is none).
    """
    try:
        msg = email.message_from_bytes(raw, policy=_MIME_POLICY)
        html_text = None
        for part in msg.walk():
            if part.is_multipart() or _is_attachment(part):
                continue
            kind = part.get_content_type()
            if kind not in ("text/plain", "text/html"):
                continue
            data, charset = _part_bytes(part), part.get_content_charset()
            try:    # the declared charset when Python knows it as a text codec, else UTF-8
                text = data.decode(charset or "utf-8", errors="replace")
            except (LookupError, UnicodeError, ValueError, TypeError):
                log.debug("unknown charset %r, decoding as UTF-8", charset)
                text = data.decode("utf-8", errors="replace")
            if kind == "text/plain" and text.strip():
                return _tidy_text(text)[:limit]
            if kind == "text/html" and html_text is None:
                html_text = text
        return "" if html_text is None else _tidy_text(_html_to_text(html_text))[:limit]
    except Exception:
        log.debug("cannot extract body text", exc_info=True)
        return ""


def attachment_in(msg: email.message.EmailMessage) -> bool:
    """Whether a whole parsed message carries an attachment.

    Returns True for any part with Content-Disposition: attachment, or a
    non-text leaf part with a file name (e.g. an inline image).
    """
    try:
        return any(_is_attachment(part) or (part.get_content_maintype() != "text"
                                            and bool(part.get_filename()))
                   for part in msg.walk() if not part.is_multipart())
    except Exception:
        log.debug("cannot walk message parts", exc_info=True)
    return False


def _header_date(headers: email.message.EmailMessage) -> Optional[datetime]:
    for value in header_text(headers, "date")[:1]:
        with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
            when = email.utils.parsedate_to_datetime(value)
            if when is not None:
                return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return None


def _structure_has_attachment(structure: Any) -> Optional[bool]:
    """Walk a BODYSTRUCTURE: True if any part is an attachment (by disposition or name)."""
    if not isinstance(structure, list) or not structure:
        return None
    if isinstance(structure[0], list):  # multipart: parts..., subtype, extensions
        return any(_structure_has_attachment(part) for part in structure
                   if isinstance(part, list) and part and isinstance(part[0], (list, str)))
    for item in structure[7:]:      # the extension data, a disposition among it
        if isinstance(item, list) and item and isinstance(item[0], str) \
                and item[0].lower() == "attachment":
            return True
    if str(structure[0]).lower() in ("text", "multipart"):
        return False        # a named text part is no attachment: its names go unread
    params = structure[2] if len(structure) > 2 and isinstance(structure[2], list) else []
    return any(str(params[i]).lower() == "name" for i in range(0, len(params) - 1, 2))


def _attachment_in_bytes(raw: bytes, headers: email.message.EmailMessage) -> bool:
    try:
        return attachment_in(email.message_from_bytes(raw, policy=_MIME_POLICY))
    except Exception:
        return False


@dataclass(frozen=True)
class _MessageDatum:
    """One piece of message data a rule may need beside the headers (a row of _MESSAGE_DATA).

    ``field`` is the MessageInfo field it fills and ``need`` the Needs flag that asks for
    it; ``item`` the FETCH item that brings it, fetched on every --apply too when
    ``recorded`` (the intent records carry it); ``read`` turns the item's value into the
    field's, ``offline`` works it out from a whole message and its parsed headers;
    ``lacked`` names it when a server's answer left it out.  ``later``: a run may fetch it
    only for the messages whose rules come to it (see _data_later).
    """

    field: str
    need: str
    item: str
    read: Callable[[Any], Any]
    offline: Callable[[bytes, email.message.EmailMessage], Any]
    lacked: str
    recorded: bool = False
    later: bool = False


def _as_is(value: Any) -> Any:
    return value


_MESSAGE_DATA: Tuple[_MessageDatum, ...] = (
    _MessageDatum("size", "size", "RFC822.SIZE", _as_is, lambda raw, headers: len(raw),
                  "size", recorded=True),
    _MessageDatum("date", "date", "INTERNALDATE", _as_is,
                  lambda raw, headers: _header_date(headers), "date", recorded=True),
    _MessageDatum("has_attachment", "attachment", "BODYSTRUCTURE",
                  lambda structure: bool(_structure_has_attachment(structure)),
                  _attachment_in_bytes, "structure", later=True),
)


def message_info_from_bytes(raw: bytes) -> MessageInfo:
    """Build a MessageInfo from a whole message (offline); never raises.

    Returns headers, body and every _MESSAGE_DATA field (size, the Date header's date,
    attachment) filled in; flags empty, labels and queries None.
    """
    headers = parse_headers(raw)
    data = {datum.field: datum.offline(raw, headers) for datum in _MESSAGE_DATA}
    return MessageInfo(headers=headers, body=body_text(raw), source=raw, **data)


# Google Takeout writes the labels of each message into one header,
# `X-Gmail-Labels: Inbox,Important,Opened,Receipts`, comma-separated, with
# system labels spelled as words and labels holding a comma in double quotes.
# "Opened" and "Unread" are not labels but the \Seen state.
_TAKEOUT_SYSTEM_LABELS = {
    "inbox": "\\Inbox", "important": "\\Important", "starred": "\\Starred",
    "sent": "\\Sent", "spam": "\\Spam", "trash": "\\Trash", "drafts": "\\Draft",
    "draft": "\\Draft",
}

# Maildir keeps flags in the file name after ":2," (https://cr.yp.to/proto/maildir.html).
_MAILDIR_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen",
                  "T": "\\Deleted"}
_MBOX_FLAGS = {"R": "\\Seen", "F": "\\Flagged", "A": "\\Answered", "D": "\\Deleted"}


def _split_takeout_labels(value: str) -> List[str]:
    """The labels of ``a,"b,c", d`` (a quote runs to the next one, or to the end)."""
    parts = re.findall(r'(?:"[^"]*(?:"|$)|[^,"])+', value)
    return [label for label in (part.replace('"', "").strip() for part in parts) if label]


def _mbox_info(raw: bytes, size: int) -> MessageInfo:
    headers = parse_headers(raw)
    # The flags an mbox keeps in its Status and X-Status fields (as mailbox.mboxMessage
    # reads them: the first of each), taken from the header block alone.
    letters = "".join(value for name in ("status", "x-status")
                      for value in header_text(headers, name)[:1])
    flags = {_MBOX_FLAGS[f] for f in letters if f in _MBOX_FLAGS}
    labels = None
    values = header_text(headers, "x-gmail-labels")
    if values:
        labels = set()
        for name in _split_takeout_labels(",".join(values)):
            key = name.casefold()
            if key == "opened":
                flags.add("\\Seen")
            elif key == "unread":
                flags.discard("\\Seen")
            else:
                labels.add(_TAKEOUT_SYSTEM_LABELS.get(key, name))
        if "\\Starred" in labels:
            flags.add("\\Flagged")
        labels = frozenset(labels)
    return dataclasses.replace(message_info_from_bytes(raw), flags=frozenset(flags),
                               labels=labels, size=size)


def _iter_mbox(path: str, limit: int) -> Iterator[Tuple[str, MessageInfo]]:
    box = mailbox.mbox(path, create=False)
    try:
        for number, key in enumerate(box.iterkeys(), 1):
            part = box.get_file(key)            # the message without its "From " line
            raw = part.read(limit).replace(mailbox.linesep, b"\n")    # as get_bytes() does
            part.seek(0, 2)
            yield f"{path}#{number}", _mbox_info(raw, part.tell())
    finally:
        box.close()


def _maildir_files(path: str) -> Iterator[Tuple[str, str]]:
    """(file name, path) of each message of the Maildir folder ``path``: new/, then cur/."""
    for sub in ("new", "cur"):
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            file_path = os.path.join(folder, name)
            if not name.startswith(".") and os.path.isfile(file_path):
                yield name, file_path


def _iter_maildir(path: str, limit: int) -> Iterator[Tuple[str, MessageInfo]]:
    for name, file_path in _maildir_files(path):
        letters = name.split(":2,", 1)[1] if ":2," in name else ""
        flags = frozenset(_MAILDIR_FLAGS[f] for f in letters if f in _MAILDIR_FLAGS)
        with open(file_path, "rb") as fh:
            raw = fh.read(limit)
            size = os.fstat(fh.fileno()).st_size
        yield file_path, dataclasses.replace(message_info_from_bytes(raw), flags=flags,
                                             size=max(size, len(raw)))


# An .eml file is read whole (headers, body, attachments), and the email package needs
# about 14 times its size in memory: a sample message is far smaller than this ceiling,
# which bounds that (a 100 MB file cost 1.38 GB), and only regular files are read
# (/dev/zero is endless; a FIFO would block).
MAX_EML_BYTES = 10 * 1024 * 1024

# A message of an mbox or a Maildir is read up to this many bytes (a program that reads
# whole messages raises it to its program_max_size, see offline_read_limit): its headers,
# body prefix and attachments come from them and its size from the file, as the server
# gives them from its own records.  Without a bound a single huge message (a 2 GB mbox
# entry) would cost fourteen times its size in memory.
MAX_OFFLINE_BYTES = 10 * 1024 * 1024


def read_message_file(path: str) -> bytes:
    """The bytes of one .eml file; raises ValueError (not a regular file, larger than
    MAX_EML_BYTES) or OSError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = fh.read(MAX_EML_BYTES + 1)
    if len(data) > MAX_EML_BYTES:
        raise ValueError(f"larger than {MAX_EML_BYTES // (1024 * 1024)} MiB, more than a "
                         f"sample message needs; trim its attachments")
    return data


def offline_read_limit(rules: Ruleset) -> int:
    """How much of each mbox or Maildir message to read for ``rules``: MAX_OFFLINE_BYTES,
    or more when a program reads whole messages (up to its program_max_size)."""
    return max({MAX_OFFLINE_BYTES} | rules.needs.whole)


def iter_message_files(paths: Iterable[Any], *,
                       limit: Optional[int] = None) -> Iterator[Tuple[str, MessageInfo]]:
    """Read messages from .eml files, mbox files (Google Takeout) and Maildir folders.

    Yields (display name, MessageInfo) pairs, e.g. ("Takeout.mbox#17", info).  Of a
    message in an mbox or Maildir at most ``limit`` bytes are read (default
    MAX_OFFLINE_BYTES; ``size`` is still the whole message's); an .eml file is refused
    past MAX_EML_BYTES.  Raises GmailClassifyError for a path that is missing,
    unreadable, or none of these kinds.
    """
    limit = MAX_OFFLINE_BYTES if limit is None else limit
    for path in paths:
        path = os.fspath(path)
        try:
            if os.path.isdir(path):
                if not (os.path.isdir(os.path.join(path, "cur"))
                        or os.path.isdir(os.path.join(path, "new"))):
                    raise GmailClassifyError(f"{path}: not an .eml file, mbox or Maildir")
                yield from _iter_maildir(path, limit)
                continue
            if not stat.S_ISREG(os.stat(path).st_mode):    # a FIFO would block, /dev/zero never end
                raise GmailClassifyError(f"{path}: not a regular file")
            with open(path, "rb") as fh:
                start = fh.read(5)
            if start == b"From " or path.lower().endswith(".mbox"):
                yield from _iter_mbox(path, limit)
            elif path.lower().endswith(".eml"):
                try:
                    raw = read_message_file(path)
                except ValueError as exc:
                    raise GmailClassifyError(f"{path}: {exc}") from None
                yield path, message_info_from_bytes(raw)
            else:
                raise GmailClassifyError(f"{path}: not an .eml file, mbox or Maildir")
        except FileNotFoundError as exc:
            raise GmailClassifyError(f"{path}: no such file or directory") from exc
        except (OSError, mailbox.Error) as exc:
            raise GmailClassifyError(f"{path}: cannot read: {exc}") from exc


# --- Rule engine -------------------------------------------------------------------------

def _normalise(text: str) -> str:
    """Caseless, compatibility-normalised, whitespace-collapsed text for plain matching.

    Returns e.g. "hauptstrasse 5" for "HAUPTSTRAẞE\t5" (casefold maps ß to ss;
    NFKC maps ligatures and full-width forms to plain letters).
    """
    if text.isascii():  # the common case: NFKC changes no ASCII, casefold is lower
        return " ".join(text.lower().split())
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(folded.split())


def _quote(value: Any) -> str:
    """A value as the user wrote it, for error messages: "5 MB", 3, true."""
    try:
        shown = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


@dataclass(frozen=True)
class Pattern:
    """One matcher item: plain text (caseless substring) or a /regex/flags."""

    text: str  # as written in the rules file
    needle: str = ""  # normalised plain text; "" for a regex
    regex: Optional[re.Pattern] = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        return self.text if self.regex is not None else json.dumps(self.text, ensure_ascii=False)

    def verb(self) -> str:
        return "matches" if self.regex is not None else "contains"


@dataclass(frozen=True)
class Matcher:
    """Any of several patterns; matches when one pattern matches one value."""

    patterns: Tuple[Pattern, ...]

    def find(self, values: Iterable[str], normalised: Optional[List[str]] = None) -> Optional[str]:
        """Returns 'contains "receipt"' / 'matches /x/i' for the first hit, else None.

        ``normalised`` may give _normalise() of each value, when the caller has it."""
        values = list(values)
        # Most values match nothing: one search for all the plain texts (precompiled on
        # first use) and one per regex say so; only a hit walks the patterns in order, and
        # what each pattern's hit says is worked out once.
        quick = self.__dict__.get("_quick")
        if quick is None:
            needles = [re.escape(p.needle) for p in self.patterns if p.regex is None]
            quick = self.__dict__["_quick"] = (
                re.compile("|".join(needles)) if needles else None,
                tuple(p.regex for p in self.patterns if p.regex is not None),
                tuple((p, f"{p.verb()} {p.describe()}") for p in self.patterns))
        plain, regexes, hits = quick
        hit = False
        if plain is not None:
            if normalised is None:
                normalised = [_normalise(value) for value in values]
            for value in normalised:        # a loop, not any(): most calls see one value
                if plain.search(value):
                    hit = True
                    break
        if not hit and not (regexes and any(r.search(v) for r in regexes for v in values)):
            return None
        for pattern, said in hits:
            if pattern.regex is not None:
                hit = any(pattern.regex.search(value) for value in values)
            else:
                if normalised is None:
                    normalised = [_normalise(value) for value in values]
                hit = any(pattern.needle in value for value in normalised)
            if hit:
                return said
        return None

    def describe(self) -> str:
        if len(self.patterns) == 1:
            return f"{self.patterns[0].verb()} {self.patterns[0].describe()}"
        return "matches any of " + ", ".join(p.describe() for p in self.patterns)


def _label_key(label: str) -> str:
    """'\\Inbox', 'Inbox' and 'INBOX' compare equal; so do \\Draft and Drafts."""
    key = _normalise(label[1:] if label.startswith("\\") else label)
    return "draft" if key == "drafts" else key


Verdict = Tuple[Optional[bool], str]  # (True / False / None = unknown, explanation)


@dataclass(frozen=True)
class Needs:
    """What the IMAP pipeline must fetch for these rules."""

    headers: frozenset  # lower-case header names
    body: bool = False
    attachment: bool = False
    labels: bool = False
    flags: bool = False
    size: bool = False
    date: bool = False
    queries: frozenset = frozenset()  # gmail_query strings, to run with X-GM-RAW
    whole: frozenset = frozenset()  # program_max_size of programs that read whole messages

    @classmethod
    def merge(cls, parts: Iterable[Needs]) -> Needs:
        """Everything any of ``parts`` needs: sets joined, yes/no fields or-ed."""
        values: Dict[str, Any] = {"headers": frozenset()}
        for part in parts:
            for item in dataclasses.fields(part):
                have, more = values.get(item.name), getattr(part, item.name)
                values[item.name] = more if have is None else have | more
        return cls(**values)


NO_NEEDS = Needs(headers=frozenset())


def _header_values(headers: email.message.EmailMessage, addresses: bool,
                   names: Tuple[str, ...]) -> Tuple[List[str], List[str]]:
    """The decoded values of these headers and their _normalise() forms, kept in the
    message's header cache: several rules read the same headers of each message."""
    cache = _header_cache(headers)
    if cache is None:
        read = header_addresses if addresses else header_text
        values = [v for name in names for v in read(headers, name)]
        return values, [_normalise(value) for value in values]
    return _cached_values(cache, headers, addresses, names)


def _cached_values(cache: Dict[Any, Any], headers: email.message.EmailMessage, addresses: bool,
                   names: Tuple[str, ...]) -> Tuple[List[str], List[str]]:
    """_header_values() with the message's header cache in hand."""
    key = ("rule", addresses, names)
    found = cache.get(key)
    if found is None:
        kind = "addresses" if addresses else "text"
        values = []
        for name in names:      # as _cached() does, with the cache already in hand
            name = name.lower()
            decoded = cache.get((kind, name))
            if decoded is None:
                decoded = cache[(kind, name)] = _decode_header(
                    headers, cache.get(("raw", name), []), kind, name)
            values.extend(decoded)
        found = cache[key] = (values, [_normalise(value) for value in values])
    return found


class _HeaderGroup:
    """The plain texts of every `HeaderMatch` of a ruleset that reads the same headers the
    same way (as addresses or as text), in one pattern: one search per message says
    whether any of them is in some value, so N conditions on one header cost one search
    when none matches (most messages, for most conditions), and only then does each
    condition's matcher look.  Ruleset.classify builds the groups (_group_headers) and
    keeps each on its conditions as ``_group``; explain() never uses them."""

    __slots__ = ("addresses", "names", "plain", "raw_keys")

    def __init__(self, addresses: bool, names: Tuple[str, ...], needles: Iterable[str]) -> None:
        self.addresses, self.names = addresses, names
        self.raw_keys = tuple(("raw", name.lower()) for name in names)   # in the header cache
        # Normalised text holds no line break, so a needle found in the values joined by
        # "\n" is in one of them (an empty needle is found anywhere: the matchers decide).
        self.plain = re.compile("|".join(map(re.escape, dict.fromkeys(needles))))

    def read(self, headers: email.message.EmailMessage) -> Tuple[List[str], List[str], bool]:
        """(values, their _normalise() forms, whether a plain text of the group may be in
        one of them), worked out once per message."""
        cache = _header_cache(headers)
        if cache is None:
            return _header_values(headers, self.addresses, self.names) + (True,)
        return cache.get(self) or self.fill(headers, cache)

    def fill(self, headers: email.message.EmailMessage,
             cache: Dict[Any, Any]) -> Tuple[List[str], List[str], bool]:
        """read() the first time, with the message's header cache in hand: what the same
        raw values gave another message, if they are in _GROUP_READINGS."""
        keys = self.raw_keys
        if len(keys) == 1:      # most groups: one header (the same key as below, sooner)
            raws = cache.get(keys[0], ())
            key: Tuple[Any, ...] = (self, tuple(raws))
        else:
            key = (self, *[tuple(cache.get(raw, ())) for raw in keys])
            raws = [raw for values in key[1:] for raw in values]
        # Kept only when short and few, raw values (in the key) and decoded alike, as
        # _DECODED keeps them: a long raw value may decode to a short one.
        keep = sum(map(len, raws)) + len(raws) <= _DECODED_LONGEST
        found = _GROUP_READINGS.get(key) if keep else None
        if found is None:
            values, normalised = _cached_values(cache, headers, self.addresses, self.names)
            found = (values, normalised, self.plain.search("\n".join(normalised)) is not None)
            if keep and sum(map(len, values)) + len(values) <= _DECODED_LONGEST:
                if len(_GROUP_READINGS) >= _DECODED_MAX:
                    _GROUP_READINGS.clear()
                _GROUP_READINGS[key] = found
        cache[self] = found
        return found


# What a group found (_HeaderGroup.fill) by the group and the raw values of its headers:
# a mailbox holds the same senders, lists and subjects again and again, and the decoded
# values, their _normalise() forms and the search depend on those alone (as _DECODED's
# do), so each is worked out once per run.  A found tuple is shared by the messages with
# those values: its lists are read, never changed.  Bounded as _DECODED is, by the number
# of entries and by the length and number of the raw and decoded values of each.
_GROUP_READINGS: Dict[Tuple[Any, ...], Tuple[List[str], List[str], bool]] = {}


def _group_headers(conditions: Iterable[Condition]) -> None:
    """Give each HeaderMatch among ``conditions`` its _HeaderGroup (see there): whether
    its plain texts can match, and whether it has regexes (always searched)."""
    members: Dict[Tuple[bool, Tuple[str, ...]], List[HeaderMatch]] = {}
    for condition in conditions:
        if type(condition) is HeaderMatch:
            members.setdefault((condition.addresses, condition.headers), []).append(condition)
    for (addresses, names), found in members.items():
        group = _HeaderGroup(addresses, names, (pattern.needle for condition in found
                                                for pattern in condition.matcher.patterns
                                                if pattern.regex is None))
        for condition in found:
            regexes = any(p.regex is not None for p in condition.matcher.patterns)
            condition.__dict__["_group"] = (group, regexes)


class Condition:
    """A test on a MessageInfo with three-valued (Kleene) results: one kind of rule condition.

    A kind is one subclass and one row in the table below (_CONDITION_KINDS); it says how
    to read its value from a rules file (``from_rules``), what must be fetched for it
    (``needs``), how dear it is (``cost``), and how it decides (``evaluate``, the fast path
    the pipeline runs) and explains (``explain``, the plain path that shows what it saw).
    """

    cost = 0   # flags, sizes and dates are free; a header decode 1-2; the body a second fetch 3
    options: Tuple[str, ...] = ()   # keys beside it in the same table that tune it (program_*)
    fetch = NO_NEEDS    # what needs() says, where it is the same for every value of the kind

    # Rules are immutable, so each description is built once (a message that does not
    # match returns one, and classify() sees thousands of those) and kept on the rule.
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        build = cls.__dict__.get("describe")
        if build is None:
            return

        def describe(self: "Condition") -> str:
            text = self.__dict__.get("_description")
            if text is None:
                text = self.__dict__["_description"] = build(self)
            return text
        describe.__doc__ = build.__doc__
        cls.describe = describe  # type: ignore[assignment]

    @classmethod
    def from_rules(cls, key: str, value: Any, read: Any) -> Union["Condition", List["Condition"]]:
        """The condition(s) for ``key = value`` in a rule; ``read`` (a _ConditionReader)
        checks values and raises RulesError naming the file, rule and key."""
        raise NotImplementedError

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        """Returns (True, what matched), (False, description) or (None, description)."""
        raise NotImplementedError

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        """The same verdict as evaluate(), with the value seen and why it decided so, e.g.
        (True, 'from: "GitHub <notifications@github.com>" contains "notifications@github.com"')
        or (False, 'subject: "Hello": no match for /invoice/i')."""
        return self.evaluate(msg, now)

    def needs(self) -> Needs:
        """The message data this condition reads (its own, not its children's)."""
        return self.fetch

    def reads_changed(self, flags: frozenset, labels: frozenset) -> Optional[str]:
        """What this condition reads (its own part) of the message state that rules
        change, given the IMAP ``flags`` and the ``labels`` their actions set or clear:
        e.g. "starred"; None when it reads none of it (see Ruleset.state_loops)."""
        return None

    def describe(self) -> str:
        raise NotImplementedError

    def children(self) -> Tuple["Condition", ...]:
        return ()


def _shown(values: Sequence[str], most: int = 3) -> str:
    """Values for an explanation: '"a", "b" and 2 more'; '(none)' when there are none."""
    if not values:
        return "(none)"
    text = ", ".join(_quote(value) for value in values[:most])
    return text + (f" and {len(values) - most} more" if len(values) > most else "")


def _no_match(matcher: Matcher) -> str:
    return "no match for " + ", ".join(p.describe() for p in matcher.patterns)


@dataclass(frozen=True)
class HeaderMatch(Condition):
    """A matcher over decoded header text: `subject`, `list_id`, `header.NAME`; with
    ``addresses``, over each parsed 'Name <user@domain>' of `from`, `to`, `cc`, `recipient`."""

    key: str  # shown in explanations, e.g. "subject", "header X-Mailer"
    headers: Tuple[str, ...]  # lower-case header names
    matcher: Matcher
    addresses: bool = False

    cost = 2
    ADDRESS_KEYS = {"from": ("from",), "to": ("to",), "cc": ("cc",),
                    "recipient": ("to", "cc", "delivered-to", "bcc")}
    TEXT_KEYS = {"subject": ("subject",), "list_id": ("list-id",)}

    @classmethod
    def from_rules(cls, key: str, value: Any, read: Any) -> Union[Condition, List[Condition]]:
        if key in cls.ADDRESS_KEYS:
            return cls(key, cls.ADDRESS_KEYS[key], read.matcher(value), addresses=True)
        if key in cls.TEXT_KEYS:
            return cls(key, cls.TEXT_KEYS[key], read.matcher(value))
        # `header = { "List-Unsubscribe" = true, "X-Mailer" = "/bulk/i" }`: one part each
        if not isinstance(value, dict) or not value:
            raise read.error("expected a table of header names, e.g. "
                             f"{{ \"List-Unsubscribe\" = true }}, got {_quote(value)}")
        parts: List[Condition] = []
        for name, test in value.items():
            sub = read.at(name)
            if not _HEADER_NAME_RE.fullmatch(name):
                raise sub.error(f"{_quote(name)} is not a header name (letters, digits "
                                "and - _ . and the like; no spaces, ':' or brackets)")
            if isinstance(test, bool):
                parts.append(HeaderPresent(name, test))
            elif isinstance(test, (str, list)):
                parts.append(cls(f"header {name}", (name.lower(),), sub.matcher(test)))
            else:
                raise sub.error("expected true (present), false (absent), a string or a list "
                                f"of strings, got {_quote(test)}")
        return parts

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        grouped = self.__dict__.get("_group")
        if grouped is None:
            values, normalised = _header_values(msg.headers, self.addresses, self.headers)
            hit = self.matcher.find(values, normalised)
        else:
            values, normalised, maybe = grouped[0].read(msg.headers)
            hit = self.matcher.find(values, normalised) if maybe or grouped[1] else None
        return (True, f"{self.key} {hit}") if hit else (False, self.describe())

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        values, normalised = _header_values(msg.headers, self.addresses, self.headers)
        # The plain walk Matcher.find() short-cuts: the first pattern (in order) that
        # matches some value, and that value.
        for pattern in self.matcher.patterns:
            for value, folded in zip(values, normalised):
                if pattern.regex.search(value) if pattern.regex is not None \
                        else pattern.needle in folded:
                    return True, (f"{self.key}: {_quote(value)} {pattern.verb()} "
                                  f"{pattern.describe()}")
        return False, f"{self.key}: {_shown(values)}: {_no_match(self.matcher)}"

    def needs(self) -> Needs:
        return Needs(headers=frozenset(self.headers))

    def describe(self) -> str:
        return f"{self.key} {self.matcher.describe()}"


@dataclass(frozen=True)
class HeaderPresent(Condition):
    """`header = {NAME = true/false}`: the header is present / absent."""

    name: str
    present: bool

    cost = 1

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        found = _header_present(msg.headers, self.name)
        return (found == self.present), self.describe()

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        found = _header_present(msg.headers, self.name)
        text = f"header {self.name}: {'present' if found else 'absent'}"
        if found != self.present:
            text += f", wanted {'present' if self.present else 'absent'}"
        return found == self.present, text

    def needs(self) -> Needs:
        return Needs(headers=frozenset({self.name.lower()}))

    def describe(self) -> str:
        return f"header {self.name} {'present' if self.present else 'absent'}"


@dataclass(frozen=True)
class BodyMatch(Condition):
    """`body`: a matcher over the decoded body prefix; unknown until it is fetched."""

    matcher: Matcher

    cost = 3
    fetch = Needs(headers=frozenset(), body=True)

    @classmethod
    def from_rules(cls, key: str, value: Any, read: Any) -> Condition:
        return cls(read.matcher(value))

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        if msg.body is None:
            return None, self.describe()
        hit = self.matcher.find([msg.body])
        return (True, f"body {hit}") if hit else (False, self.describe())

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        if msg.body is None:
            return None, "body: not fetched yet"
        folded = _normalise(msg.body)
        for pattern in self.matcher.patterns:
            if pattern.regex is not None:
                text, found = msg.body, pattern.regex.search(msg.body)
                span = found.span() if found else None
            else:
                text, start = folded, folded.find(pattern.needle)
                span = (start, start + len(pattern.needle)) if start >= 0 else None
            if span is not None:
                seen = text[max(0, span[0] - 20):span[1] + 20]
                return True, f"body: {_quote(seen)} {pattern.verb()} {pattern.describe()}"
        return False, f"body ({len(msg.body)} characters read): {_no_match(self.matcher)}"

    def describe(self) -> str:
        return f"body {self.matcher.describe()}"


def _human_size(size: float) -> str:
    """``"500 bytes"``, ``"1.5 MB"``; GB is the largest unit (``"2048.0 GB"``)."""
    step = 0
    while size >= 1024 and step < 3:
        size, step = size / 1024, step + 1
    return f"{size:.0f} bytes" if step == 0 else f"{size:.1f} {('KB', 'MB', 'GB')[step - 1]}"


@dataclass(frozen=True)
class SizeCompare(Condition):
    """`larger_than` / `smaller_than` against RFC822.SIZE."""

    larger: bool
    limit: int  # bytes
    text: str  # as written, e.g. "5M"

    fetch = Needs(headers=frozenset(), size=True)

    @classmethod
    def from_rules(cls, key: str, value: Any, read: Any) -> Condition:
        limit, text = read.size(value)
        return cls(key == "larger_than", limit, text)

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        if msg.size is None:
            return None, self.describe()
        hit = msg.size > self.limit if self.larger else msg.size < self.limit
        op = ">" if self.larger else "<"
        return (True, f"size {_human_size(msg.size)} {op} {self.text}") if hit else (False, self.describe())

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        if msg.size is None:
            return None, "size: unknown"
        hit = msg.size > self.limit if self.larger else msg.size < self.limit
        op = ">" if self.larger else "<"
        return hit, f"size: {_human_size(msg.size)}{' ' if hit else ', not '}{op} {self.text}"

    def describe(self) -> str:
        return f"size {'>' if self.larger else '<'} {self.text}"


def _months_back(now: datetime, months: int) -> datetime:
    """`now` moved back by calendar months, the day clamped to the month's length."""
    year, month = divmod(now.year * 12 + (now.month - 1) - months, 12)
    month += 1
    day = min(now.day, calendar.monthrange(year, month)[1])
    return now.replace(year=year, month=month, day=day)


def _cutoff(now: datetime, amount: int, unit: str) -> datetime:
    """The moment `amount` Gmail units (d, w, m, y) before `now`; datetime.min when out of range."""
    try:
        if unit == "d":
            return now - timedelta(days=amount)
        if unit == "w":
            return now - timedelta(weeks=amount)
        return _months_back(now, amount * (12 if unit == "y" else 1))
    except (OverflowError, ValueError):
        return datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class AgeCompare(Condition):
    """`older_than` / `newer_than` in Gmail's units, against the message date."""

    older: bool
    amount: int
    unit: str  # d, w, m or y
    text: str

    fetch = Needs(headers=frozenset(), date=True)

    @classmethod
    def from_rules(cls, key: str, value: Any, read: Any) -> Condition:
        amount, unit = read.age(value)
        return cls(key == "older_than", amount, unit, value)

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        if msg.date is None:
            return None, self.describe()
        date = msg.date if msg.date.tzinfo else msg.date.replace(tzinfo=timezone.utc)
        cutoff = _cutoff(now, self.amount, self.unit)
        hit = date < cutoff if self.older else date > cutoff
        if not hit:
            return False, self.describe()
        return True, f"date {date.date().isoformat()} {self._relation()}"

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        if msg.date is None:
            return None, "date: unknown"
        date = msg.date if msg.date.tzinfo else msg.date.replace(tzinfo=timezone.utc)
        cutoff = _cutoff(now, self.amount, self.unit)
        hit = date < cutoff if self.older else date > cutoff
        return hit, (f"date: {date.date().isoformat()}{' ' if hit else ', not '}"
                     f"{self._relation()} (cutoff {cutoff.date().isoformat()})")

    def _relation(self) -> str:
        return f"{'older' if self.older else 'newer'} than {self.text}"

    def describe(self) -> str:
        return f"date {self._relation()}"


@dataclass(frozen=True)
class StateIs(Condition):
    """`has_attachment`, `unread`, `starred`: a yes/no property of the message."""

    key: str
    want: bool

    _WORDS = {"has_attachment": ("has attachment", "no attachment"),
              "unread": ("unread", "read"), "starred": ("starred", "not starred")}

    @classmethod
    def from_rules(cls, key: str, value: Any, read: Any) -> Condition:
        return cls(key, read.boolean(value))

    def _actual(self, msg: MessageInfo) -> Optional[bool]:
        if self.key == "has_attachment":
            return msg.has_attachment
        if msg.flags is None:
            return None
        flags = {f.casefold() for f in msg.flags}
        return ("\\seen" not in flags) if self.key == "unread" else ("\\flagged" in flags)

    def reads_changed(self, flags: frozenset, labels: frozenset) -> Optional[str]:
        flag = {"unread": "\\Seen", "starred": "\\Flagged"}.get(self.key)
        return self.key if flag in flags else None

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        actual = self._actual(msg)
        if actual is None:
            return None, self.describe()
        return (actual == self.want), self.describe()

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        actual = self._actual(msg)
        if actual is None:
            return None, f"{self.key}: unknown"
        yes, no = self._WORDS[self.key]
        text = f"{self.key}: {yes if actual else no}"
        return actual == self.want, text + ("" if actual == self.want else f", wanted {self.describe()}")

    def needs(self) -> Needs:
        if self.key == "has_attachment":
            return Needs(headers=frozenset(), attachment=True)
        return Needs(headers=frozenset(), flags=True)

    def describe(self) -> str:
        yes, no = self._WORDS[self.key]
        return yes if self.want else no


@dataclass(frozen=True)
class HasLabel(Condition):
    """`has_label`: plain names match a whole label (caselessly); regexes search each label."""

    matcher: Matcher

    fetch = Needs(headers=frozenset(), labels=True)

    @classmethod
    def from_rules(cls, key: str, value: Any, read: Any) -> Condition:
        return cls(read.matcher(value))

    def _hit(self, labels: frozenset) -> Optional[str]:
        keys = {_label_key(label) for label in labels}
        for pattern in self.matcher.patterns:
            if pattern.regex is not None:
                if any(pattern.regex.search(label) for label in labels):
                    return f"has label matching {pattern.text}"
            elif _label_key(pattern.text) in keys:
                return f"has label {pattern.describe()}"
        return None

    def reads_changed(self, flags: frozenset, labels: frozenset) -> Optional[str]:
        # On Gmail a star (\\Flagged) shows as the label \\Starred: has_label "Starred"
        # reads what `star` changes.
        hit = self._hit(labels | ({"\\Starred"} if "\\Flagged" in flags else set()))
        for label in labels:        # a templated label ("Vendors/{sender_domain}") as a pattern
            filled = _template_regex(label)
            if hit is None and filled is not None and any(
                    filled.fullmatch(p.text) if p.regex is None else p.regex.search(label)
                    for p in self.matcher.patterns):
                hit = f"has label like {label}"
        return hit.replace("has label", "label", 1) if hit else None

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        if msg.labels is None:
            return None, self.describe()
        hit = self._hit(msg.labels)
        return (True, hit) if hit else (False, self.describe())

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        if msg.labels is None:
            return None, "labels: unknown"
        hit = self._hit(msg.labels)
        seen = _shown(sorted(msg.labels), most=8)
        if hit:
            return True, f"labels: {seen}: {hit}"
        return False, f"labels: {seen}: none is {' or '.join(p.describe() for p in self.matcher.patterns)}"

    def describe(self) -> str:
        return "has label " + " or ".join(p.describe() for p in self.matcher.patterns)


@dataclass(frozen=True)
class GmailQuery(Condition):
    """`gmail_query`: the message is among the server's X-GM-RAW search results."""

    query: str

    @classmethod
    def from_rules(cls, key: str, value: Any, read: Any) -> Condition:
        query = read.text(value, "a Gmail search string")
        problem = _unbalanced_query(query)
        if problem:
            # Put beside other terms (an export's, a trash filter's), "a) OR (b" would
            # widen them: -(a) OR (b) trashes what the rule itself spares.
            raise read.error(f"{problem}; a Gmail search's quotes, parentheses and braces "
                             f"must pair up")
        return cls(query)

    # Search operators that read what rules change: flags (is:unread, is:starred), labels
    # (label:, l:, in:, has:userlabels).
    _READS_STATE = re.compile(r'(?i)(?:^|[\s(){}-])(is|label|in|has|l):("[^"]*"|[^\s(){}]+)')
    _IS_FLAG = {"unread": "\\Seen", "read": "\\Seen", "starred": "\\Flagged",
                "important": "\\Important"}

    def _reads(self) -> frozenset:
        """What the search reads that rules can change: IMAP flags and Gmail's system
        labels (\\Seen, \\Inbox...), label names as Gmail compares them (_search_label),
        and "*" for any label of the user's (has:userlabels, has:nouserlabels)."""
        found = set()
        for operator, value in self._READS_STATE.findall(self.query):
            operator, value = operator.lower(), value.strip('"')
            if operator == "is":
                found.add(self._IS_FLAG.get(value.lower(), ""))
            elif operator == "has":
                found.add("*" if value.lower() in ("userlabels", "nouserlabels") else "")
            elif operator == "in" and value.lower() == "inbox":
                found.add("\\Inbox")
            else:
                found.add(_search_label(value))
        return frozenset(found - {""})

    def reads_changed(self, flags: frozenset, labels: frozenset) -> Optional[str]:
        reads = self._reads()
        named = [name for name in reads if not name.startswith("\\") and name != "*"]
        for label in labels:
            if label == "*":        # any label a program prints: any the search names
                hit = bool(named)
            else:                   # one label, or the labels a template is filled in as
                filled = _template_regex(_search_label(label))
                hit = label in reads or _search_label(label) in reads or bool(
                    filled and any(filled.fullmatch(name) for name in named))
            if hit:
                return self.describe()
        if any(flag in reads for flag in flags) or ("*" in reads and labels):
            return self.describe()
        return None

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        if msg.queries is None:
            return None, self.describe()
        return (self.query in msg.queries), self.describe()

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        if msg.queries is None:
            return None, f"{self.describe()}: cannot be asked here (Gmail only)"
        found = self.query in msg.queries
        return found, f"{self.describe()}: {'found' if found else 'not found'} by the server"

    def needs(self) -> Needs:
        return Needs(headers=frozenset(), queries=frozenset({self.query}))

    def describe(self) -> str:
        return f"gmail query {json.dumps(self.query, ensure_ascii=False)}"


def _template_regex(label: str) -> Optional[re.Pattern]:
    """The labels a templated label ("Vendors/{sender_domain}") can be filled in as, as a
    caseless regex; None for a plain label."""
    try:
        parts = split_template(label) if "{" in label else ()
    except ValueError:      # a name as filled in ("Budget {2024}"), not a template
        return None
    if not any(is_field for is_field, _ in parts):
        return None
    return re.compile("".join(".+" if is_field else re.escape(text) for is_field, text in parts),
                      re.IGNORECASE | re.DOTALL)


def _filled(label: str) -> str:
    """A label without fields as it is filled in ("{{" and "}}" are braces)."""
    return "".join(text for _, text in split_template(label)) if "{" in label or "}" in label \
        else label


def _search_label(name: str) -> str:
    """A label name as Gmail's search compares it: caseless, '/', ' ' and '-' alike."""
    return re.sub(r"[/\s-]+", "-", name.strip().lower())


def _unbalanced_query(query: str) -> Optional[str]:
    """What does not pair up in a Gmail search (a quote left open, a ')' or '}' closing
    nothing or the wrong bracket, one never closed), or None."""
    opened: List[str] = []
    quoted = False
    for char in query:
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char in "({":
            opened.append(char)
        elif char in ")}":
            if not opened or opened.pop() != "({"[")}".index(char)]:
                return f"a '{char}' that closes nothing"
    if quoted:
        return "a '\"' never closed"
    return f"a '{opened[-1]}' never closed" if opened else None


def _cost(condition: Condition) -> int:
    """How dear a condition is to evaluate (Condition.cost): a compound costs its dearest part."""
    return max([condition.cost] + [_cost(child) for child in condition.children()])


def _kleene(values: Iterable[Optional[bool]], every: bool) -> Optional[bool]:
    """AND (``every``) or OR of three-valued results: False (AND) / True (OR) settles it."""
    unknown = False
    for value in values:
        if value is None:
            unknown = True
        elif value is not every:
            return value
    return None if unknown else every


@dataclass(frozen=True)
class _Compound(Condition):
    """What `all` and `any` share: a list of condition tables, read and walked alike."""

    parts: Tuple[Condition, ...]

    @classmethod
    def from_rules(cls, key: str, value: Any, read: Any) -> Condition:
        return cls(read.conditions(value))

    def children(self) -> Tuple[Condition, ...]:
        return self.parts


@dataclass(frozen=True)
class AllOf(_Compound):
    """`all` (or the keys of one table): every part holds. Kleene: False beats unknown."""

    explicit: bool = True  # False for the implicit "and" of a table's keys

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        # Cheap parts first: any False settles it, whatever the order, and the reasons
        # of a match are put back in the order the rule gives them.
        order = self.__dict__.get("_order")
        if order is None:
            order = self.__dict__["_order"] = sorted(range(len(self.parts)),
                                                     key=lambda i: _cost(self.parts[i]))
        reasons, unknown = [""] * len(self.parts), False
        for index in order:
            value, reason = self.parts[index].evaluate(msg, now)
            if value is False:
                return False, self.describe()
            if value is None:
                unknown = True
            reasons[index] = reason
        if unknown:
            return None, self.describe()
        return True, self._wrap(reasons)

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        verdicts = [part.explain(msg, now) for part in self.parts]
        return _kleene((v for v, _ in verdicts), True), self._wrap([t for _, t in verdicts])

    def _wrap(self, texts: List[str]) -> str:
        return f"all of ({'; '.join(texts)})" if self.explicit else " and ".join(texts)

    def describe(self) -> str:
        return self._wrap([p.describe() for p in self.parts])


@dataclass(frozen=True)
class AnyOf(_Compound):
    """`any`: some part holds. Kleene: True beats unknown."""

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        unknown = False
        for part in self.parts:
            value, reason = part.evaluate(msg, now)
            if value is True:
                return True, f"any of ({reason})"
            if value is None:
                unknown = True
        return (None if unknown else False), self.describe()

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        verdicts = [part.explain(msg, now) for part in self.parts]
        return _kleene((v for v, _ in verdicts), False), f"any of ({'; '.join(t for _, t in verdicts)})"

    def describe(self) -> str:
        return f"any of ({'; '.join(p.describe() for p in self.parts)})"


@dataclass(frozen=True)
class Not(Condition):
    """`not`: the part does not hold; not unknown is unknown."""

    part: Condition

    @classmethod
    def from_rules(cls, key: str, value: Any, read: Any) -> Condition:
        return cls(read.table(value))

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        value, _ = self.part.evaluate(msg, now)
        return (None if value is None else not value), self.describe()

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        value, text = self.part.explain(msg, now)
        return (None if value is None else not value), f"not ({text})"

    def describe(self) -> str:
        return f"not ({self.part.describe()})"

    def children(self) -> Tuple[Condition, ...]:
        return (self.part,)


class _RuleGate:
    """What settles a rule as not matching before its condition is evaluated, from the
    message's header cache and size: a HeaderMatch none of whose texts its _HeaderGroup
    found and none of whose regexes finds a value, a HeaderPresent or a size limit that
    does not hold.  Most messages match few rules, so most rules then cost a look-up or
    two instead of a walk of evaluate(), read(), find() and describe() calls.  A rule gets
    a gate (_rule_gate) only where its condition is such a test, or an `all` of parts that
    decide without side effects (no program, no Python function): any false part makes
    it false whatever the others say.  A gate that does not shut decides nothing: the
    condition is evaluated as ever, so decisions and reasons are the same either way.

    A gate runs no regex that evaluating the rule would not run: it checks sizes and
    presence first (free), then the plain texts of each HeaderMatch, and searches the
    regexes of one only where evaluate() surely comes to it (see _rule_gate), so a size,
    date, flag or label that is false still stops a rule before a hostile regex does."""

    __slots__ = ("headers", "present", "sizes")

    def __init__(self, headers: Tuple[Tuple[_HeaderGroup, Tuple[re.Pattern, ...]], ...],
                 present: Tuple[Tuple[Tuple[str, str], bool], ...],
                 sizes: Tuple[Tuple[bool, int], ...]) -> None:
        self.headers = headers      # ((group, the matcher's regexes), ...)
        self.present = present      # ((the cache's raw key, wanted present), ...)
        self.sizes = sizes          # ((larger, limit), ...) as SizeCompare has them

    def shuts(self, msg: MessageInfo, cache: Dict[Any, Any]) -> bool:
        """True when the rule's condition is certainly false for ``msg``, whose header
        cache is ``cache``."""
        size = msg.size
        if size is not None:
            for larger, limit in self.sizes:
                if not (size > limit if larger else size < limit):
                    return True
        for key, wanted in self.present:
            if bool(cache.get(key)) is not wanted:
                return True
        for group, regexes in self.headers:
            values, _, maybe = cache.get(group) or group.fill(msg.headers, cache)
            if not maybe and not (regexes and any(r.search(v) for r in regexes
                                                  for v in values)):
                return True
        return False


class _AnyGate:
    """The gate of an `any` that only reads the message and whose every part has a gate
    (see _RuleGate): it shuts when each part's gate shuts.  They are asked in the order
    AnyOf.evaluate() runs the parts and the first that does not shut ends it, so a part's
    regexes are searched only where evaluate() would come to them (every part before it
    false).  Most messages are in no list and from no bank: such rules then cost a look-up
    or two per part, as a rule on one header does."""

    __slots__ = ("parts",)

    def __init__(self, parts: Tuple[Union[_RuleGate, "_AnyGate"], ...]) -> None:
        self.parts = parts

    def shuts(self, msg: MessageInfo, cache: Dict[Any, Any]) -> bool:
        """True when every part of the `any` is certainly false for ``msg``."""
        for part in self.parts:
            if not part.shuts(msg, cache):
                return False
        return True


def _rule_gate(condition: Condition) -> Union[_RuleGate, _AnyGate, None]:
    """The gate of a rule whose condition is ``condition`` (see _RuleGate and _AnyGate),
    or None.

    The parts of an `all` are read in the order AllOf.evaluate() runs them, cheapest
    first.  The regexes of a HeaderMatch are the gate's only while every part before it
    is a size or a presence (which the gate checks first): evaluate() would then surely
    search them.  After any other part (a date, a flag, another header, which may be false
    and stop evaluate()) a HeaderMatch with regexes is left to evaluate() whole."""
    if type(condition) is AnyOf and _decides_quietly(condition):
        gates = tuple(map(_rule_gate, condition.parts))
        return _AnyGate(gates) if gates and None not in gates else None
    parts: Sequence[Condition] = (condition,)
    if type(condition) is AllOf and all(_decides_quietly(part) for part in condition.parts):
        parts = sorted(condition.parts, key=_cost)      # stable, as AllOf._order is
    headers, present, sizes = [], [], []
    reached = True      # whether evaluate() surely comes to this part
    for part in parts:
        if type(part) is SizeCompare:
            sizes.append((part.larger, part.limit))
        elif type(part) is HeaderPresent:
            present.append((("raw", part.name.lower()), part.present))
        else:
            if type(part) is HeaderMatch and "_group" in part.__dict__:
                regexes = tuple(p.regex for p in part.matcher.patterns if p.regex is not None)
                if reached or not regexes:
                    headers.append((part._group[0], regexes))
            reached = False
    if not (headers or present or sizes):
        return None
    return _RuleGate(tuple(headers), tuple(present), tuple(sizes))


def _decides_quietly(condition: Condition) -> bool:
    """Whether evaluate() of ``condition`` only reads the message: never runs a program
    or a vendoring script's function, never raises (a kind added later is not trusted)."""
    return type(condition) in _QUIET_KINDS and all(map(_decides_quietly, condition.children()))


# The kinds whose evaluate() only reads the message (see _decides_quietly).  A kind left
# out (a new one, until it is added here) keeps any `all` that holds it from a gate: no
# rule is then passed over that should not be, it is only evaluated.
_QUIET_KINDS = frozenset({HeaderMatch, HeaderPresent, BodyMatch, SizeCompare, AgeCompare,
                          StateIs, HasLabel, GmailQuery, AllOf, AnyOf, Not})


@dataclass(frozen=True)
class PythonCondition(Condition):
    """A condition written in Python by a vendoring script (Ruleset.add_condition):
    `key = true` holds when ``function(msg)`` is true, `key = false` when it is false;
    a function that returns None cannot tell yet (e.g. the body is not fetched)."""

    key: str
    function: Callable[[MessageInfo], Optional[bool]] = field(compare=False, repr=False)
    want: bool = True
    fetch: Needs = NO_NEEDS     # type: ignore[misc]
    cost: int = 2    # type: ignore[misc]   # a header decode, most likely

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        return self.explain(msg, now)[0], self.describe()

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        result = self.function(msg)
        if result is None:
            return None, f"{self.key}: cannot tell yet"
        return bool(result) == self.want, f"{self.key}: {'true' if result else 'false'}" + (
            "" if bool(result) == self.want else f", wanted {'true' if self.want else 'false'}")

    def describe(self) -> str:
        return self.key if self.want else f"not {self.key}"


class _PythonKind:
    """The table entry for a PythonCondition: reads `key = true/false`."""

    def __init__(self, function: Callable[[MessageInfo], Optional[bool]], needs: Needs,
                 cost: int) -> None:
        self.function, self.fetch, self.cost = function, needs, cost

    def from_rules(self, key: str, value: Any, read: Any) -> Condition:
        return PythonCondition(key, self.function, read.boolean(value), self.fetch, self.cost)


# A program as a condition (`program = ["bogofilter", "-e"]`): the message goes to its
# standard input; exit 0 is a match, 1 no match, and anything else (another status, a
# signal, no answer within program_timeout, no such program) fails closed: the message is
# skipped for this run (incomplete, exit 6), never taken for a match or a non-match.  The
# keys beside it in the same table tune it (Condition.options).  Programs run only after the
# trust check (program_trust_problem): a file someone else can change must not choose what
# runs.  The pipeline runs them ahead of classify(), across a batch's messages at once
# (run_programs); anything else (test, a vendoring script) runs them one at a time.
PROGRAM_INPUTS = ("headers", "message")   # the header block and body prefix / the whole message
DEFAULT_PROGRAM_MAX_SIZE = 1024 * 1024    # bytes: a larger message is skipped for its content
DEFAULT_PROGRAM_TIMEOUT = 10.0            # seconds
DEFAULT_PROGRAM_PATH = "/usr/bin:/bin"    # the programs' PATH
_PROGRAM_ENV_MAX = 1024                   # bytes per GMAIL_CLASSIFY_* variable (a sender's text)
_PROGRAM_LABEL_MAX = 255                  # characters of the first line read as a label
_program_planning = threading.local()     # .on: evaluate() asks (raises _ProgramWanted) not runs


class ProgramError(GmailClassifyError):
    """A rule's program failed on a message (a status other than 0 or 1, a signal, a
    timeout, cannot be started): the message is skipped for this run, never classified."""
    exit_code = EXIT_INCOMPLETE


class _ProgramWanted(Exception):
    """Raised by ProgramCondition.evaluate while run_programs plans: this program's answer
    on this message is what the rules need next."""

    def __init__(self, condition: "ProgramCondition") -> None:
        super().__init__(condition.describe())
        self.condition = condition


@dataclass(frozen=True)
class _ProgramAnswer:
    """What one program said of one message: ``matched`` None when it failed (``why``);
    ``too_large`` when the message was never given to it."""

    matched: Optional[bool]
    label: Optional[str] = None
    why: str = ""
    too_large: bool = False
    not_run: bool = False       # check and demo without --run-programs: unknown, no match


_NOT_RUN = _ProgramAnswer(None, why="not run", not_run=True)


def _env_value(values: Sequence[str]) -> str:
    """A header's text for a program's environment: printable, at most 1 KiB of UTF-8."""
    data = printable(" ".join(values)).replace("\0", "").encode("utf-8")[:_PROGRAM_ENV_MAX]
    return data.decode("utf-8", "ignore")


def clean_label(text: str, separator: Optional[str] = ".") -> str:
    """A label a program printed, made safe: each ``/``-separated part cleaned as a
    templated destination's part (clean_component) but keeping its case, with no
    ``separator`` in it: by default '.', many servers' hierarchy separator; "" when
    nothing is left.  ``clean_label("Spam/../Evil Corp v1.2") == "Spam/EvilCorpv1-2"``."""
    cleaned = (clean_component(part, separator, keep_case=True)
               for part in text.split("/") if part.strip())
    return "/".join(part for part in cleaned if part != "unknown")


# What a program's label may not be (any case): the INBOX, which Gmail reserves, and the
# usual special folders, into which a label off Gmail would copy the message; and at most
# so many levels, each of which may be a new folder.
_RESERVED_LABELS = frozenset({
    "inbox", "trash", "bin", "deleted", "deleteditems", "deletedmessages", "junk", "spam",
    "junkemail", "bulk", "sent", "sentitems", "sentmail", "sentmessages", "drafts", "outbox",
    "archive", "archives", "allmail", "starred", "important", "chats", "gmail",
    "googlemail"})
_PROGRAM_LABEL_DEPTH = 4


def _program_label_problem(label: str) -> Optional[str]:
    """Why a cleaned program label may not be used, or None.  Under the INBOX is no
    better: where the personal namespace is "INBOX." (Courier, Cyrus), INBOX/Trash is
    the server's own Trash."""
    name = label
    while name.lower().startswith("inbox/"):
        name = name[len("inbox/"):]
    if name.lower() in _RESERVED_LABELS:
        return f"printed a special folder's name ({label})"
    if label.count("/") >= _PROGRAM_LABEL_DEPTH:
        return f"printed a label over {_PROGRAM_LABEL_DEPTH} levels deep"
    return None


@dataclass(frozen=True)
class ProgramCondition(Condition):
    """`program = ["cmd", "arg", ...]`: the message on the program's stdin; exit 0 holds.

    ``input`` "headers" gives the header block and the body prefix the rules fetch,
    "message" the whole message (at most ``max_size`` bytes: a larger one is skipped for
    its content).  With ``label_from`` the first line of the program's output, cleaned
    (clean_label), is added as a label when the rule matches.  ``source`` is the rules
    file (a relative program path is read from its directory)."""

    argv: Tuple[str, ...]
    input: str = "headers"
    max_size: int = DEFAULT_PROGRAM_MAX_SIZE
    timeout: float = DEFAULT_PROGRAM_TIMEOUT
    path: str = DEFAULT_PROGRAM_PATH
    label_from: bool = False
    source: str = ""

    cost = 5        # a process per message: after everything else
    options = ("program_input", "program_max_size", "program_timeout", "program_path",
               "label_from")

    @classmethod
    def from_rules(cls, key: str, value: Any, read: Any) -> Condition:
        if not isinstance(value, list) or not value:
            raise read.error('expected a list of strings, the program and its arguments '
                             f'(never a shell line), e.g. ["bogofilter", "-e"], got {_quote(value)}')
        argv = tuple(read.at(f"[{i}]").text(item) for i, item in enumerate(value, 1))
        settings: Dict[str, Any] = {}
        where, found = read.option("program_input")
        if where is not None and found not in PROGRAM_INPUTS:
            raise where.error(f"expected {' or '.join(map(_quote, PROGRAM_INPUTS))}, got {_quote(found)}")
        settings["input"] = found or "headers"
        where, found = read.option("program_max_size")
        if where is not None:
            settings["max_size"] = where.size(found)[0]
        where, found = read.option("program_timeout")
        if where is not None:
            if isinstance(found, bool) or not isinstance(found, (int, float)) \
                    or not 0 < found <= 3600:
                raise where.error(f"expected seconds, more than 0 and at most 3600, got {_quote(found)}")
            settings["timeout"] = float(found)
        where, found = read.option("program_path")
        if where is not None:
            settings["path"] = where.text(found, "a PATH such as \"/usr/local/bin:/usr/bin:/bin\"")
        where, found = read.option("label_from")
        if where is not None:
            if found != "program":
                raise where.error(f'expected "program" (the first line the program prints is '
                                  f'the label), got {_quote(found)}')
            settings["label_from"] = True
        return cls(argv, source=read.where.source, **settings)

    def name(self) -> str:
        return os.path.basename(self.argv[0])

    def evaluate(self, msg: MessageInfo, now: datetime) -> Verdict:
        answer = msg.programs.get(self)
        if answer is None:
            if msg.source is None and msg.body is None:
                return None, self.describe()      # its input is not fetched yet
            if getattr(_program_planning, "on", False):
                raise _ProgramWanted(self)
            answer = msg.programs[self] = self.run(msg)
        if answer.not_run:
            return None, f"{self.describe()}: not run (--run-programs runs it)"
        if answer.too_large:
            raise ContentSkip(f"larger than program_max_size ({_human_size(self.max_size)}) "
                              f"for program {self.name()}")
        if answer.matched is None:
            raise ProgramError(f"program {self.name()} {answer.why}")
        if answer.matched:
            said = f" (label {_quote(answer.label)})" if answer.label else ""
            return True, f"program {self.name()} said yes{said}"
        return False, self.describe()

    def explain(self, msg: MessageInfo, now: datetime) -> Verdict:
        value, reason = self.evaluate(msg, now)
        return value, reason if value else f"program {self.name()}: said no"

    def needs(self) -> Needs:
        if self.input == "message":
            return Needs(headers=frozenset(), body=True, size=True, whole=frozenset({self.max_size}))
        return Needs(headers=frozenset(), body=True)

    def describe(self) -> str:
        return "program " + " ".join(shlex.quote(arg) for arg in self.argv)

    def directory(self) -> str:
        """Where the program runs and its relative paths are read (its own, a script's it
        is handed): the rules file's directory, whatever directory the command was
        started in, so that the trust check looks at the files that will run."""
        return os.path.dirname(os.path.abspath(self.source)) if self.source else os.getcwd()

    def executable(self) -> Optional[str]:
        """The program's file: a name is looked up in ``path``; a relative path is read
        from directory().  None when there is no such program."""
        name, here = self.argv[0], self.directory()
        if os.sep not in name:      # a relative PATH entry is read from here too
            found = shutil.which(name, path=os.pathsep.join(
                os.path.join(here, entry) for entry in self.path.split(os.pathsep)))
            return os.path.abspath(found) if found else None
        name = os.path.join(here, name)
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None

    def input_bytes(self, msg: MessageInfo) -> bytes:
        """What the program reads: the bytes fetched (offline: the message, or one made
        of its headers and body)."""
        data = msg.source
        if data is None:
            try:
                head = bytes(msg.headers)
            except Exception:   # a header the generator refuses: the body alone, then
                head = b"\n"
            data = head + (msg.body or "").encode("utf-8")
        return data if self.input == "message" else data[:BODY_PREFIX_BYTES]

    def environment(self, msg: MessageInfo) -> Dict[str, str]:
        """The program's whole environment: small and fixed, no credentials."""
        env = {"PATH": self.path, "HOME": os.path.expanduser("~"), "LANG": "C.UTF-8"}
        for name, header in (("FROM", "from"), ("SUBJECT", "subject"),
                             ("MESSAGE_ID", "message-id")):
            env[f"GMAIL_CLASSIFY_{name}"] = _env_value(header_text(msg.headers, header))
        env["GMAIL_CLASSIFY_FOLDER"] = _env_value([msg.folder])
        env["GMAIL_CLASSIFY_UID"] = str(msg.uid)
        return env

    def run(self, msg: MessageInfo) -> _ProgramAnswer:
        """Run the program on ``msg`` (after the trust check, once per condition); never
        raises for the program's own failures (they are in the answer)."""
        problem = self.__dict__.get("_trust")
        if problem is None:
            # (program_trust_problem is in Rules files: loading, beside trust_problem)
            problem = self.__dict__["_trust"] = program_trust_problem(self) or ""
        if problem:
            raise RulesError(problem)
        size = msg.size if msg.size is not None else len(msg.source or b"")
        if self.input == "message" and (size > self.max_size or
                                        len(msg.source or b"") > self.max_size):
            return _ProgramAnswer(None, too_large=True)
        program = self.executable()
        if program is None:
            return _ProgramAnswer(None, why=f"cannot be started: no such program in "
                                            f"{self.path if os.sep not in self.argv[0] else 'that place'}")
        try:
            status, output = _run_program((program,) + self.argv[1:], self.input_bytes(msg),
                                          env=self.environment(msg), cwd=self.directory(),
                                          timeout=self.timeout)
        except OSError as exc:
            return _ProgramAnswer(None, why=f"cannot be started: {exc.strerror or exc}")
        if status is None:
            return _ProgramAnswer(None, why=f"gave no answer within {self.timeout:g} s")
        if status < 0:
            return _ProgramAnswer(None, why=f"was killed by signal {-status}")
        if status not in (0, 1):
            return _ProgramAnswer(None, why=f"exited with status {status}")
        if status == 1:
            return _ProgramAnswer(False)
        label = None
        if self.label_from:
            first = output.decode("utf-8", "replace").split("\n", 1)[0]
            label = clean_label(first[:_PROGRAM_LABEL_MAX].strip()) or None
            if label is None:
                return _ProgramAnswer(None, why="said yes but printed no label")
            problem = _program_label_problem(label)
            if problem:
                return _ProgramAnswer(None, why=f"said yes but {problem}")
        return _ProgramAnswer(True, label)


_PROGRAM_OUTPUT_KEPT = 4096    # bytes of a program's output kept: its first line is read


def _run_program(argv: Sequence[str], data: bytes, *, env: Mapping[str, str], cwd: str,
                 timeout: float) -> Tuple[Optional[int], bytes]:
    """Run a program on ``data``: (its exit status, or None when it did not exit within
    ``timeout``; the first _PROGRAM_OUTPUT_KEPT bytes it wrote).  What it writes past that
    is read and dropped, never held.  On POSIX it runs in a process group of its own, and
    the group is killed once the program has exited or been given up on, so nothing it
    started outlives the answer (a background child holding the output open would
    otherwise keep the answer waiting, then stay behind)."""
    posix = os.name == "posix"
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=dict(env), cwd=cwd, close_fds=True,
                            start_new_session=posix)
    kept = bytearray()

    def feed() -> None:
        with contextlib.suppress(OSError):      # it may stop reading, or exit, at any time
            proc.stdin.write(data)
        with contextlib.suppress(OSError):
            proc.stdin.close()

    def read() -> None:
        try:
            with contextlib.suppress(OSError, ValueError):
                for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                    if len(kept) < _PROGRAM_OUTPUT_KEPT:
                        kept.extend(chunk[:_PROGRAM_OUTPUT_KEPT - len(kept)])
        finally:    # a thread left behind (see below) closes its pipe when it ends
            with contextlib.suppress(OSError):
                proc.stdout.close()
    threads = [threading.Thread(target=job, daemon=True, name=f"program-{job.__name__}")
               for job in (feed, read)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    try:
        # The end of its output is the usual sign that it is done (waiting for the exit
        # itself would poll); a background child may keep the output open after it exits.
        while threads[1].is_alive() and proc.poll() is None and time.monotonic() < deadline:
            threads[1].join(min(0.05, max(0.0, deadline - time.monotonic())))
        proc.wait(max(0.0, deadline - time.monotonic()))
        status: Optional[int] = proc.returncode
    except subprocess.TimeoutExpired:
        status = None
    finally:
        if posix:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    # The program and its group are gone: what is left to read is at most a pipe's
    # buffer.  A process that left the group (setsid, or any child off POSIX) may still
    # hold the output open: its thread is left to end with it, its pipe open, rather
    # than wait for it (closing a stream a thread is reading waits for that thread).
    for thread, stream in zip(threads, (proc.stdin, proc.stdout)):
        thread.join(1.0)
        if not thread.is_alive():
            with contextlib.suppress(OSError):
                stream.close()
    return status, bytes(kept)


def _program_labels(condition: Condition, msg: MessageInfo) -> Tuple[str, ...]:
    """The labels the label_from programs of a matching rule printed for ``msg``."""
    answers = [msg.programs.get(cond) for cond in _walk(condition)
               if isinstance(cond, ProgramCondition) and cond.label_from]
    return tuple(answer.label for answer in answers
                 if answer is not None and answer.matched and answer.label)


# The condition kinds: rules-file key -> the class that reads it (Condition.from_rules).
# A new kind is one Condition subclass above and one row here (from outside the file:
# Ruleset.add_condition); validation, CONDITION_KEYS, Ruleset.needs and the cost order
# all read this table, and the order of its keys is the order error messages list them.
_CONDITION_KINDS: Dict[str, Any] = {
    "from": HeaderMatch, "to": HeaderMatch, "cc": HeaderMatch, "recipient": HeaderMatch,
    "subject": HeaderMatch, "body": BodyMatch, "list_id": HeaderMatch, "header": HeaderMatch,
    "any": AnyOf, "all": AllOf, "not": Not,
    "larger_than": SizeCompare, "smaller_than": SizeCompare,
    "older_than": AgeCompare, "newer_than": AgeCompare,
    "has_attachment": StateIs, "unread": StateIs, "starred": StateIs,
    "has_label": HasLabel, "gmail_query": GmailQuery, "program": ProgramCondition,
}


def _without_queries(condition: Condition) -> Optional[Condition]:
    """The condition with every gmail_query taken out; None when nothing is left.

    Where no server can run Gmail searches (offline tests, other servers) a rule is
    decided by its local conditions alone: a query inside all / any / not simply
    drops out of it, and a rule made of queries only has nothing left to decide.
    """
    if isinstance(condition, GmailQuery):
        return None
    if isinstance(condition, (AllOf, AnyOf)):
        parts = [p for p in (_without_queries(c) for c in condition.parts) if p is not None]
        if not parts:
            return None
        if len(parts) == len(condition.parts):
            return condition
        if len(parts) == 1 and isinstance(condition, AllOf) and not condition.explicit:
            return parts[0]
        return dataclasses.replace(condition, parts=tuple(parts))
    if isinstance(condition, Not):
        inner = _without_queries(condition.part)
        return None if inner is None else (condition if inner is condition.part else Not(inner))
    return condition


# Destination templates: `move = "Archive/{year}"`, `label = "Vendors/{sender_domain}"`.
# {{ and }} stand for literal braces. Each expansion is one clean name component.
TEMPLATE_FIELDS = ("year", "month", "sender_domain")
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_COMPONENT_MAX = 63   # like a DNS label: long enough for any real domain, short in a folder list


@functools.lru_cache(maxsize=256)     # a run splits its few templates once per message
def split_template(text: str) -> Tuple[Tuple[bool, str], ...]:
    """Split a destination into (is_field, text) pieces.

    Returns e.g. ((False, "Archive/"), (True, "year")); raises ValueError naming
    the unknown field or the stray brace.
    """
    pieces: List[Tuple[bool, str]] = []
    literal, pos = [], 0
    for found in _TEMPLATE_TOKEN.finditer(text):
        literal.append(text[pos:found.start()])
        pos = found.end()
        token = found.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
        elif found.group(1) is None:
            raise ValueError(f"a lone '{token}' in {text!r}; write '{token * 2}' for a "
                             f"literal brace, or use {{year}}, {{month}}, {{sender_domain}}")
        elif found.group(1) not in TEMPLATE_FIELDS:
            close = difflib.get_close_matches(found.group(1), TEMPLATE_FIELDS, n=1)
            hint = f"; did you mean {{{close[0]}}}?" if close else ""
            raise ValueError(f"unknown field {{{found.group(1)}}} in {text!r}{hint} "
                             f"(known: {{year}}, {{month}}, {{sender_domain}})")
        else:
            if literal:
                pieces.append((False, "".join(literal)))
                literal = []
            pieces.append((True, found.group(1)))
    literal.append(text[pos:])
    if "".join(literal):
        pieces.append((False, "".join(literal)))
    return tuple(pieces)


def clean_component(value: str, separator: Optional[str] = "/", keep_case: bool = False) -> str:
    """One folder-name component made safe from text a sender chose.

    Returns lower case with only a-z, 0-9, '-' and '.', no leading/trailing dot or
    dash, no '..', at most 63 characters, never the hierarchy ``separator``;
    "unknown" when nothing is left. Example: "EVIL.com/../INBOX" -> "evil.com.inbox".
    International domains become their xn-- (IDNA) form.  ``keep_case``: letters keep
    their case (A-Z too), for a label a program chose.
    """
    text = unicodedata.normalize("NFKC", value).strip()
    text = text if keep_case else text.lower()
    with contextlib.suppress(UnicodeError, ValueError):
        text = text.encode("idna").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9.-]+" if keep_case else r"[^a-z0-9.-]+", "", text)
    if separator and separator not in ("-",):
        text = text.replace(separator, "-")
    text = re.sub(r"\.{2,}", ".", text)
    text = text.strip(".-")[:_COMPONENT_MAX].strip(".-")
    return text or "unknown"


def expand_template(text: str, msg: MessageInfo, separator: Optional[str] = "/") -> str:
    """A destination with {year}, {month} (of the message's date) and {sender_domain} filled in.

    Returns e.g. "Vendors/amazon.com" for "Vendors/{sender_domain}". Raises
    ValueError for a malformed template (validation catches those earlier).
    """
    pieces = split_template(text)
    if not any(is_field for is_field, _ in pieces):
        return "".join(piece for _, piece in pieces)
    # The sender's domain is the first From address's, of its addr-spec, never of its
    # display name ('"support@paypal.com" <phisher@evil.example>' is evil.example); read
    # only for a template that shows it (a run fills in {year} for thousands of messages).
    domain = next((address.rpartition("@")[2] for _, address in
                   _header_mailboxes(msg.headers, "from")[:1] if "@" in address), "") \
        if (True, "sender_domain") in pieces else ""
    date = msg.date
    values = {"year": f"{date.year:04d}" if date else "unknown",
              "month": f"{date.month:02d}" if date else "unknown",
              "sender_domain": clean_component(domain, separator)}
    return "".join(values[piece] if is_field else piece for is_field, piece in pieces)


def _is_template(text: Optional[str]) -> bool:
    return bool(text) and ("{" in text or "}" in text)


@dataclass(frozen=True)
class FlagAction:
    """One row of the flag-action table: a rules-file key that sets or clears an IMAP flag."""

    key: str        # the rules-file key (and Actions field), e.g. "mark_read"
    flag: str       # the IMAP flag it changes, e.g. "\\Seen"
    add: bool       # True: +FLAGS; False: -FLAGS
    opposite: str   # the key that does the reverse, which undo uses: "mark_unread"
    words: str      # in reports, the audit log and history: "mark read"


# The flag actions, in the order error messages list them.  A new one is one row (and a
# line of README): parsing, conflicts, merging, the plan, its counts, the audit record's
# words and undo all read this table.  The first four are also fields of Actions (their
# JSON shape is kept); a row added later is stored in Actions.more_flags.
_FLAG_ACTION_ROWS: Dict[str, FlagAction] = {row.key: row for row in (
    FlagAction("mark_read", "\\Seen", True, "mark_unread", "mark read"),
    FlagAction("mark_unread", "\\Seen", False, "mark_read", "mark unread"),
    FlagAction("star", "\\Flagged", True, "unstar", "star"),
    FlagAction("unstar", "\\Flagged", False, "star", "unstar"),
)}


def _flag_action(change: str, flag: str) -> Optional[FlagAction]:
    """The row for a planned ("flag+" / "flag-", flag) change; None when none has it."""
    return next((row for row in _FLAG_ACTION_ROWS.values()
                 if row.flag == flag and row.add == (change == "flag+")), None)


def _remembered(table: Dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """``table[key]``, made by ``make()`` the first time: what a run works out once per
    distinct Actions (a few rules' actions, shared by thousands of messages).  Templated
    destinations make more of them, so a table holding 4,096 starts afresh."""
    known = table.get(key)
    if known is None:
        if len(table) >= 4096:
            table.clear()
        known = table[key] = make()
    return known


@dataclass(frozen=True)
class Actions:
    """What to do with a message; merged across `continue` rules by merged().

    The flag actions are read through the table above: ``actions.flag_actions()``."""

    labels: Tuple[str, ...] = ()
    move: Optional[str] = None
    archive: bool = False
    mark_read: bool = False
    mark_unread: bool = False
    star: bool = False
    unstar: bool = False
    trash: bool = False
    # Keys of flag-action rows added to the table (not fields); left out of rules_hash
    # when empty, so the hash of every rules file written before stays the same.
    more_flags: Tuple[str, ...] = field(default=(), repr=False, metadata={"omit_empty": True})

    @classmethod
    def make(cls, **values: Any) -> Actions:
        """Actions from rules-file keys: flag keys without a field go to ``more_flags``."""
        names = {f.name for f in dataclasses.fields(cls)}
        more = tuple(key for key in _FLAG_ACTION_ROWS if key not in names and values.pop(key, False))
        return cls(**values, more_flags=more) if more else cls(**values)

    def flag(self, key: str) -> bool:
        """Whether the flag action ``key`` (a row of the table) is asked for."""
        return key in self.more_flags or bool(self.__dict__.get(key, False))

    def flag_actions(self) -> Tuple[FlagAction, ...]:
        """The rows of the flag-action table these actions ask for, in table order."""
        # Asked once per message planned, of the few Actions a ruleset makes: kept on them
        # (for the table as it was: a row added since is looked for again).
        known = self.__dict__.get("_rows")
        if known is None or known[0] != len(_FLAG_ACTION_ROWS):
            known = self.__dict__["_rows"] = (len(_FLAG_ACTION_ROWS), tuple(
                row for row in _FLAG_ACTION_ROWS.values() if self.flag(row.key)))
        return known[1]

    def as_record(self) -> Dict[str, Any]:
        """The audit record's "actions": the fields as JSON, rows added to the table as
        `key: true` (the shape a field would have had)."""
        # Read field by field, not through dataclasses.asdict: this runs once per message
        # record, and asdict's deep copy of these plain values cost a run ~5% of its CPU.
        record = {name: getattr(self, name) for name in _ACTION_RECORD_FIELDS}
        record.update(dict.fromkeys(self.more_flags, True))
        record["labels"] = list(self.labels)
        return record

    def has_destination(self) -> bool:
        return bool(self.move or self.archive or self.trash)

    def merged(self, later: Actions) -> Actions:
        """These actions followed by a later matching rule's.

        Returns labels accumulated (no duplicates); the first destination (move,
        archive, trash) and the first choice of read/unread and star/unstar win.
        """
        dest = self if self.has_destination() else later
        mine = {row.flag for row in self.flag_actions()}     # per flag, the first choice wins
        labels = self.labels + tuple(x for x in later.labels if x not in self.labels)
        return Actions.make(labels=labels, move=dest.move, archive=dest.archive, trash=dest.trash,
                            **{key: (self if row.flag in mine else later).flag(key)
                               for key, row in _FLAG_ACTION_ROWS.items()})

    def describe(self) -> str:
        """Returns e.g. 'label Receipts, archive'; 'no action' when empty."""
        words = [f"label {label}" for label in self.labels]
        if self.move:
            words.append(f"move to {self.move}")
        words += [name for name in ("archive", "trash") if getattr(self, name)]
        words += [row.words for row in self.flag_actions()]
        return ", ".join(words) or "no action"

    def is_empty(self) -> bool:
        return self == Actions()

    def templates(self) -> Tuple[str, ...]:
        """The destinations that hold {fields}, e.g. ("Archive/{year}",)."""
        return tuple(t for t in self.labels + (self.move or "",) if _is_template(t))

    def expanded(self, msg: MessageInfo, separator: Optional[str] = "/") -> Actions:
        """These actions with templated destinations filled in for ``msg``.  The same
        destinations give the same object, kept on this one: the tables a run keeps per
        distinct Actions then hold one per folder a template makes, not one per message."""
        templated = self.__dict__.get("_templated")
        if templated is None:
            templated = self.__dict__["_templated"] = bool(self.templates())
        if not templated:
            return self
        labels = tuple(dict.fromkeys(expand_template(label, msg, separator)
                                     for label in self.labels))
        move = expand_template(self.move, msg, separator) if self.move else None
        return _remembered(self.__dict__.setdefault("_expansions", {}), (labels, move),
                           lambda: dataclasses.replace(self, labels=labels, move=move))


# The fields an audit record's "actions" holds (Actions.as_record), in field order.
_ACTION_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Actions)
                              if f.name != "more_flags")


@dataclass(frozen=True)
class Rule:
    """One validated rule: a condition and what to do when it holds."""

    name: str
    position: int  # 1-based, in file order
    condition: Condition
    actions: Actions
    continue_: bool = False


def _frozen(cls: type, fields: Dict[str, Any]) -> Any:
    """``cls(**fields)`` for a frozen dataclass the pipeline makes once or twice a message
    (Decision, Outcome): ``fields``, naming every field, go into the new instance's dict
    at once, where the frozen __init__ sets each through object.__setattr__, at twice the
    cost.  No __post_init__ runs, and none may be needed."""
    made = object.__new__(cls)
    made.__dict__.update(fields)
    return made


@dataclass(frozen=True)
class Decision:
    """The outcome for one message.

    matches: ((rule name, reason), ...) in rule order, e.g.
    (("Receipts", 'subject contains "receipt"'),); empty when no rule matched.
    """

    matches: Tuple[Tuple[str, str], ...]
    actions: Actions


# Headers always fetched so that messages can be shown and logged.
DISPLAY_HEADERS = frozenset({"from", "subject", "message-id", "date"})


def _walk(condition: Condition) -> Iterator[Condition]:
    yield condition
    for child in condition.children():
        yield from _walk(child)


@dataclass(frozen=True)
class RuleTest:
    """One `[[test]]` table: a sample message and the outcome the rules must give it.

    ``expect_rules`` names every rule that must match, in order (empty: none);
    ``expect_actions`` is None when the test does not check the actions.
    """

    name: str
    position: int  # 1-based among the [[test]] tables
    message: MessageInfo = field(compare=False)
    expect_rules: Tuple[str, ...] = ()
    expect_actions: Optional[Actions] = None
    sample: str = ""  # the table's message keys as canonical JSON, for comparing tests


_NO_ACTIONS = Actions()
# (id(earlier), id(later)) -> (earlier, later, earlier.merged(later)): the rules of a run
# merge the same few pairs for every message.  Both are kept, so their ids stay theirs.
_MERGES: Dict[Tuple[int, int], Tuple[Actions, Actions, Actions]] = {}


def _merged(earlier: Actions, later: Actions) -> Actions:
    """``earlier.merged(later)``, worked out once per pair of Actions."""
    known = _MERGES.get((id(earlier), id(later)))
    if known is None:
        known = (earlier, later, earlier.merged(later))
        if len(_MERGES) < 4096:
            _MERGES[(id(earlier), id(later))] = known
    return known[2]


@dataclass(frozen=True)
class Ruleset:
    """Validated rules in order, where they came from, the [account] table and [[test]]s."""

    rules: Tuple[Rule, ...]
    source: str = "built-in rules"
    account: Dict[str, Any] = field(default_factory=dict)
    tests: Tuple[RuleTest, ...] = ()
    # [[account]] tables (several accounts in one file), each a dict like ``account`` with
    # its "name", and the rules files some of them name, loaded (see load_rules).
    accounts: Tuple[Dict[str, Any], ...] = ()
    account_files: Dict[str, "Ruleset"] = field(default_factory=dict)

    def for_account(self, name: str) -> "Ruleset":
        """The rules one [[account]] table runs, with that table as ``account``.

        Its ``rules`` key picks rules of this file by name (in the file's order) or names
        another rules file (loaded by load_rules); without it, every rule of this file.
        This file's [[test]] tables are left out (they test the whole file: run them once);
        another file's come along.  Raises RulesError for a name the file does not have.
        """
        table = next((t for t in self.accounts if t["name"] == name), None)
        if table is None:
            known = ", ".join(t["name"] for t in self.accounts) or "none"
            raise RulesError(f"{self.source} has no [[account]] named {name!r} (it has: "
                             f"{known})")
        chosen = table.get("rules")
        if isinstance(chosen, str):
            loaded = self.account_files.get(name)
            if loaded is None:
                raise RulesError(f"{self.source}: account {name!r} names the rules file "
                                 f"{chosen}, which only load_rules reads")
            return dataclasses.replace(loaded, account=table, accounts=(), account_files={})
        rules = self.rules if chosen is None else tuple(r for r in self.rules if r.name in chosen)
        return dataclasses.replace(self, rules=rules, account=table, accounts=(),
                                   account_files={}, tests=())

    def local(self) -> Tuple[Ruleset, Tuple[str, ...]]:
        """These rules as decided where Gmail searches cannot run, with one note per change.

        Returns (ruleset, notes): a rule with a gmail_query and other conditions is
        decided by those alone; a rule with only gmail_query is left out. The same
        ruleset and no notes when no rule uses gmail_query.
        """
        rules, notes = [], []
        for rule in self.rules:
            condition = _without_queries(rule.condition)
            label = f"rule {rule.position} ({json.dumps(rule.name, ensure_ascii=False)})"
            if condition is None:
                notes.append(f"{label} has only a gmail_query: skipped where Gmail searches "
                             f"cannot run (offline tests, other servers)")
                continue
            if condition is not rule.condition:
                notes.append(f"{label}: its gmail_query needs Gmail; elsewhere the rule is "
                             f"decided by its other conditions alone")
                rule = dataclasses.replace(rule, condition=condition)
            rules.append(rule)
        if not notes:
            return self, ()
        return dataclasses.replace(self, rules=tuple(rules)), tuple(notes)

    def state_loops(self) -> Tuple[str, ...]:
        """Notes on rules that test a flag or label that rules set or clear (``check``
        shows them).  A step sets flags and labels before it moves mail, so a run stopped
        between the two leaves them changed; with such rules the pipeline keeps what each
        step's messages were judged by (Checkpoint.keep_unfinished), and the next run
        judges them by that (unfinished), or a message marked read by `unread = true,
        mark_read, move` would never be moved."""
        changers = self._changers()
        flags, labels = self.changed()
        notes = []
        for rule in self.rules:
            for cond in _walk(rule.condition):
                read = cond.reads_changed(flags, labels)
                if read is None:
                    continue
                by = sorted({name for (kind, what), names in changers.items()
                             if cond.reads_changed(
                                 frozenset({what}) if kind == "flag" else frozenset(),
                                 frozenset({what}) if kind == "label" else frozenset())
                             for name in names})
                notes.append(f"rule {rule.name!r} tests {read}, which "
                             f"{'rules' if len(by) > 1 else 'rule'} "
                             f"{', '.join(repr(name) for name in by)} set or clear: every "
                             f"rule sees a message as the run found it, not as rules before it "
                             f"change it, and so does a run after one that stopped half way")
        return tuple(dict.fromkeys(notes))

    def _changers(self) -> Dict[Tuple[str, str], List[str]]:
        """Each flag and label the rules' actions set or clear, as ("flag", name) or
        ("label", name) -> the rules that do; a label as it is filled in where it has no
        field ("Budget {{2024}}" is "Budget {2024}"), a system label (\\Important) a label
        still, and Gmail's label \\Starred as the star it is (\\Flagged) too; ("label",
        "*") where a program prints labels."""
        changers: Dict[Tuple[str, str], List[str]] = {}
        for rule in self.rules:
            changed = [("flag", row.flag) for row in rule.actions.flag_actions()]
            for label in rule.actions.labels:
                changed.append(("label", _template_regex(label) and label or _filled(label)))
                if _label_key(label) == "starred":
                    changed.append(("flag", "\\Flagged"))
            if _labels_from_program([rule.condition]):
                changed.append(("label", "*"))
            for what in changed:
                changers.setdefault(what, []).append(rule.name)
        return changers

    def changed(self) -> Tuple[frozenset, frozenset]:
        """(flags, labels) the rules' actions change (see _changers)."""
        changers = self._changers()
        return (frozenset(name for kind, name in changers if kind == "flag"),
                frozenset(name for kind, name in changers if kind == "label"))

    def state_read(self) -> frozenset:
        """The flags and labels the rules change that a condition of theirs tests (empty:
        the rules test nothing they change; see state_loops): what a step keeps as found.
        "*" stands for labels only known as a message is classified (filled in from a
        template, or printed by a program) where a condition reads labels at all: each is
        then asked of the conditions by name (_FolderRun.read_label)."""
        conditions = [cond for rule in self.rules for cond in _walk(rule.condition)]
        read = set()
        for kind, what in self._changers():
            one = frozenset({what})
            if any(cond.reads_changed(one if kind == "flag" else frozenset(),
                                      one if kind == "label" else frozenset())
                   for cond in conditions):
                read.add(what)
        unknown = any(_template_regex(label) for rule in self.rules
                      for label in rule.actions.labels) or \
            any(_labels_from_program([rule.condition]) for rule in self.rules)
        if unknown and any(isinstance(cond, (HasLabel, GmailQuery)) for cond in conditions):
            read.add("*")
        return frozenset(read)

    def state_queries(self) -> List[str]:
        """The Gmail searches among the rules that name a flag or label the rules change
        (see GmailQuery.reads_changed): a step keeps whether each found its messages."""
        flags, labels = self.changed()
        return sorted({cond.query for rule in self.rules for cond in _walk(rule.condition)
                       if isinstance(cond, GmailQuery) and cond.reads_changed(flags, labels)})

    def reads_label(self, name: str) -> bool:
        """Whether a condition of these rules reads the label ``name`` (as filled in)."""
        one = frozenset({name})
        return any(cond.reads_changed(frozenset(), one) for rule in self.rules
                   for cond in _walk(rule.condition))

    @property
    def needs(self) -> Needs:
        """Returns the message data these rules read (see Needs)."""
        parts = [Needs(headers=DISPLAY_HEADERS)]
        for rule in self.rules:
            if any(is_field and name != "sender_domain" for text in rule.actions.templates()
                   for is_field, name in split_template(text)):
                parts.append(Needs(headers=frozenset(), date=True))
            parts.extend(cond.needs() for cond in _walk(rule.condition))
        return Needs.merge(parts)

    @classmethod
    def add_condition(cls, key: str, kind: Any, *, needs: Optional[Needs] = None,
                      cost: int = 2) -> None:
        """Teach every rules file a new condition key (for scripts that vendor this file).

        ``kind`` is a Condition subclass (its ``from_rules`` reads the value), or a plain
        function of a MessageInfo returning True / False (None: cannot tell yet), used as
        `key = true` (or false) in a rule; for a function, ``needs`` says what to fetch
        beyond the display headers (From, Subject, Date, Message-ID) and ``cost`` orders
        it among a rule's conditions.  The key then works in every rule, inside any /
        all / not, and in `check`.  Raises ValueError for a key taken or not a bare name.
        Example: ``Ruleset.add_condition("is_bulk", lambda m: "precedence" in m.headers)``.
        """
        if not re.fullmatch(r"[a-z][a-z0-9_]*", key or "") or key in _CONDITION_KINDS \
                or key in ("name", "continue", "label", "move", "archive", "trash") \
                or key in _FLAG_ACTION_ROWS:
            raise ValueError(f"cannot add condition {key!r}: the key is taken or not a "
                             f"lower-case name")
        if isinstance(kind, type) and issubclass(kind, Condition):
            if kind.from_rules.__func__ is Condition.from_rules.__func__:  # type: ignore[attr-defined]
                raise ValueError(f"cannot add condition {key!r}: {kind.__name__} has no "
                                 f"from_rules() to read its value")
            _CONDITION_KINDS[key] = kind
        elif callable(kind):
            _CONDITION_KINDS[key] = _PythonKind(kind, needs or NO_NEEDS, cost)
        else:
            raise ValueError(f"cannot add condition {key!r}: give a Condition subclass or "
                             f"a function of the message")

    def classify(self, msg: MessageInfo, final: bool = False,
                 now: Optional[datetime] = None) -> Optional[Decision]:
        """Apply the rules in order: the first match wins unless it says `continue`.

        `now` (aware; default: the current UTC time) is the reference for
        older_than / newer_than. Returns a Decision, or None when a rule needed
        data that `msg` lacks (e.g. the body) before the outcome was settled;
        with final=True unknown conditions count as false and None never comes back.
        """
        if now is None:
            now = datetime.now(timezone.utc)
        elif now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        gates = self.__dict__.get("_gates")
        if gates is None:     # once per ruleset (see _HeaderGroup and _RuleGate)
            _group_headers(cond for rule in self.rules for cond in _walk(rule.condition))
            gates = self.__dict__["_gates"] = tuple(_rule_gate(rule.condition)
                                                    for rule in self.rules)
            # The rules whose condition may change the message (a program, a vendoring
            # script's function): the gates after one read the headers as it left them.
            self.__dict__["_stirring"] = tuple(not _decides_quietly(rule.condition)
                                               for rule in self.rules)
        matches: List[Tuple[str, str]] = []
        actions = _NO_ACTIONS
        headers = msg.headers
        cache = _header_cache(headers) if any(gates) else None
        try:
            for rule, gate, stirring in zip(self.rules, gates, self.__dict__["_stirring"]):
                if gate is not None and cache is not None and gate.shuts(msg, cache):
                    continue        # false: nothing to add, and no reason is kept
                value, reason = rule.condition.evaluate(msg, now)
                if stirring and cache is not None:
                    cache = _header_cache(headers)      # rebuilt if the headers changed
                if value is None:
                    if not final:
                        return None
                    continue
                if value:
                    matches.append((rule.name, reason))
                    actions = _merged(actions, rule.actions)
                    printed = _program_labels(rule.condition, msg) if msg.programs else ()
                    if printed:
                        actions = actions.merged(Actions(labels=printed))
                    if not rule.continue_:
                        break
        finally:
            _drop_header_cache(headers)   # decoded for these rules only: free it
        return _frozen(Decision, {"matches": tuple(matches), "actions": actions})


# --- Rules files: validation -------------------------------------------------------------

def _action_keys() -> Tuple[str, ...]:
    return ("label", "move", "archive") + tuple(_FLAG_ACTION_ROWS) + ("trash",)


def _option_keys() -> Tuple[str, ...]:
    """The keys that tune a condition beside it (Condition.options), e.g. program_timeout."""
    return tuple(dict.fromkeys(key for kind in _CONDITION_KINDS.values()
                               for key in getattr(kind, "options", ())))


def _rule_keys() -> Tuple[str, ...]:
    return ("name", "continue") + tuple(_CONDITION_KINDS) + _action_keys() + _option_keys()


# The built-in keys, from the tables in the Rule engine (validation reads the tables
# themselves, so a key added by Ruleset.add_condition or a new flag-action row counts too).
CONDITION_KEYS = tuple(_CONDITION_KINDS)
ACTION_KEYS = _action_keys()
RULE_KEYS = _rule_keys()
TOP_LEVEL_KEYS = ("rule", "account", "test")
ACCOUNT_KEYS = ("user", "host", "port", "tls", "auth", "password_command", "cafile", "folders",
                "oauth_client_id", "oauth_client_secret", "oauth_client_file")
# [account] keys whose value is a secret: a rules file holding one must be its owner's alone.
SECRET_ACCOUNT_KEYS = ("oauth_client_secret",)
TLS_MODES = ("implicit", "starttls", "plaintext")
AUTH_METHODS = ("password", "xoauth2")

_SIZE_RE = re.compile(r"(\d+) ?([KMG]?)(?:i?B)?", re.IGNORECASE)  # 500K, 5M, 5MB, 5 MB, 1GiB
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
_AGE_RE = re.compile(r"(\d+)([dwmy])")


def _size_bytes(text: str) -> Optional[int]:
    """Bytes for ``"500K"``, ``"5 MB"``, ``"1GiB"`` or ``"300"`` (units of 1024); else None."""
    found = _SIZE_RE.fullmatch(text)
    return int(found.group(1)) * _SIZE_UNITS[found.group(2).lower()] if found else None


# RFC 5322 ftext (printable ASCII but ':') that is also an IMAP atom, since header names
# go on the wire inside BODY.PEEK[HEADER.FIELDS (...)]: no ( ) { } [ ] % * " \\.
_HEADER_NAME_RE = re.compile(r"[!#$&'+\-./0-9;<=>?@A-Z^_`a-z|~]+")
_FORBIDDEN_CHARS = re.compile(r"[\r\n\0]")


def _unknown_key(key: str, known: Iterable[str], what: str = "known keys") -> str:
    """'unknown key 'lable'; did you mean 'label'?', or the list of keys when none is close."""
    known = list(known)
    close = difflib.get_close_matches(str(key), known, n=1)
    if close:
        return f"unknown key '{key}'; did you mean '{close[0]}'?"
    return f"unknown key '{key}' ({what}: {', '.join(known)})"


class _Problems:
    """Collects every RulesError of a rules file, so one `check` reports them all.

    ``with problems.catch():`` around each independent part (a key, a rule) records its
    error and carries on; ``raise_any()`` then raises one RulesError, one line per problem.
    """

    def __init__(self) -> None:
        self.lines: List[str] = []

    @contextlib.contextmanager
    def catch(self) -> Iterator[None]:
        try:
            yield
        except RulesError as error:
            self.add(error)

    def add(self, error: RulesError) -> None:
        self.lines.extend(str(error).splitlines())

    def raise_any(self) -> None:
        if self.lines:
            raise RulesError("\n".join(self.lines))


class _Where:
    """Builds one-line RulesError messages: 'rules.toml: rule 2 ("News"): label: ...'."""

    def __init__(self, source: str, position: int = 0, name: Optional[str] = None,
                 kind: str = "rule") -> None:
        self.source, self.position, self.name, self.kind = source, position, name, kind

    def prefix(self) -> str:
        if not self.position:
            return f"{self.source}: "
        named = f" ({json.dumps(self.name, ensure_ascii=False)})" if self.name else ""
        return f"{self.source}: {self.kind} {self.position}{named}: "

    def error(self, path: str, message: str) -> RulesError:
        return RulesError(f"{self.prefix()}{path + ': ' if path else ''}{message}")


def _check_bool(where: _Where, path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise where.error(path, f"expected true or false, got {_quote(value)}")
    return value


def _check_text(where: _Where, path: str, value: Any, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise where.error(path, f"expected {what}, got {_quote(value)}")
    if not value.strip():
        raise where.error(path, f"expected {what}, got an empty string")
    if _FORBIDDEN_CHARS.search(value):
        raise where.error(path, f"{_quote(value)} contains a line break or NUL character")
    return value


def _parse_pattern(where: _Where, path: str, text: Any) -> Pattern:
    text = _check_text(where, path, text, "a string or a list of strings")
    found = re.fullmatch(r"/(.*)/([A-Za-z]*)", text, re.DOTALL)
    if not found:
        return Pattern(text=text, needle=_normalise(text))
    body, letters = found.groups()
    if not body:
        raise where.error(path, "empty regex // would match everything")
    flags = 0
    for letter in letters:
        if letter not in _REGEX_FLAGS:
            raise where.error(path, f"unknown regex flag '{letter}' in {text}; use i, m, s or x "
                                    f"(to match a slash literally, write it inside a regex as \\/)")
        flags |= _REGEX_FLAGS[letter]
    try:
        compiled = re.compile(body, flags)
    except re.error as exc:
        raise where.error(path, f"bad regex {text}: {exc}") from None
    return Pattern(text=text, regex=compiled)


def _parse_size(where: _Where, path: str, value: Any) -> Tuple[int, str]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, str(value)
    size = _size_bytes(value) if isinstance(value, str) else None
    if size is None:
        raise where.error(path, f"expected a size like 500K, 5M, 5 MB or 1G, got {_quote(value)}")
    return size, value


class _ConditionReader:
    """What Condition.from_rules reads a value with: the checks every key shares, each
    raising RulesError that names the file, the rule and the key (``path``)."""

    def __init__(self, where: _Where, path: str, table: Optional[Mapping[str, Any]] = None) -> None:
        self.where, self.path, self.siblings = where, path, table or {}

    def option(self, name: str) -> Tuple[Optional[_ConditionReader], Any]:
        """(a reader for it, its value) for the key ``name`` beside this one in the same
        table (one of the kind's ``options``); (None, None) when it is not there."""
        if name not in self.siblings:
            return None, None
        parent = self.path.rpartition(".")[0]
        return _ConditionReader(self.where, f"{parent}.{name}" if parent else name), self.siblings[name]

    def at(self, name: str) -> _ConditionReader:
        """A reader for a part of the value: `header.X-Mailer`."""
        return _ConditionReader(self.where, f"{self.path}.{name}")

    def error(self, message: str) -> RulesError:
        return self.where.error(self.path, message)

    def text(self, value: Any, what: str = "a string") -> str:
        return _check_text(self.where, self.path, value, what)

    def boolean(self, value: Any) -> bool:
        return _check_bool(self.where, self.path, value)

    def matcher(self, value: Any) -> Matcher:
        """A string or list of strings, each plain text or a /regex/flags."""
        if isinstance(value, list):
            if not value:
                raise self.error("expected a string or a list of strings, got an empty list")
            return Matcher(tuple(_parse_pattern(self.where, f"{self.path}[{i}]", item)
                                 for i, item in enumerate(value, 1)))
        return Matcher((_parse_pattern(self.where, self.path, value),))

    def size(self, value: Any) -> Tuple[int, str]:
        """(bytes, as written) for 500K, 5M, 5 MB, 1G or a number of bytes."""
        return _parse_size(self.where, self.path, value)

    def age(self, value: Any) -> Tuple[int, str]:
        """(amount, unit) for "30d", "2w", "6m", "1y"."""
        found = _AGE_RE.fullmatch(value) if isinstance(value, str) else None
        if not found:
            raise self.error("expected a number and unit d, w, m or y (e.g. \"1y\"), "
                             f"got {_quote(value)}")
        return int(found.group(1)), found.group(2)

    def conditions(self, value: Any) -> Tuple[Condition, ...]:
        """A non-empty list of condition tables (`any`, `all`)."""
        if not isinstance(value, list) or not value:
            raise self.error(f"expected a non-empty list of condition tables, "
                             f"got {_quote(value)}")
        return tuple(_parse_condition_table(self.where, f"{self.path}[{i}]", item)
                     for i, item in enumerate(value, 1))

    def table(self, value: Any) -> Condition:
        """One table of conditions, all of which must hold (`not`)."""
        return _parse_condition_table(self.where, self.path, value)


def _parse_one_condition(where: _Where, path: str, key: str, value: Any,
                         table: Optional[Mapping[str, Any]] = None) -> List[Condition]:
    made = _CONDITION_KINDS[key].from_rules(key, value, _ConditionReader(where, path, table))
    return list(made) if isinstance(made, (list, tuple)) else [made]


def _check_options(where: _Where, path: str, table: Mapping[str, Any]) -> None:
    """Each option key in ``table`` has its condition beside it: 'program_timeout' alone
    would tune nothing."""
    for key in table:
        if key in _option_keys() and not any(
                key in getattr(_CONDITION_KINDS[other], "options", ())
                for other in table if other in _CONDITION_KINDS):
            owners = [k for k, kind in _CONDITION_KINDS.items() if key in getattr(kind, "options", ())]
            raise where.error(f"{path + '.' if path else ''}{key}",
                              f"goes with {' or '.join(map(repr, owners))} in the same table; "
                              f"add it there or drop this key")


def _combine(parts: List[Condition]) -> Condition:
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts), explicit=False)


def _parse_condition_table(where: _Where, path: str, value: Any) -> Condition:
    """A table of conditions (all must hold), as used inside any / all / not."""
    if not isinstance(value, dict):
        raise where.error(path, f"expected a table of conditions, got {_quote(value)}")
    if not value:
        raise where.error(path, "empty table; add at least one condition")
    parts: List[Condition] = []
    _check_options(where, path, value)
    for key, item in value.items():
        if key in _option_keys():
            continue
        if key in _action_keys() or key in ("name", "continue"):
            raise where.error(path, f"'{key}' is not a condition; put it at the top level of "
                                    "the rule (only conditions go inside any / all / not)")
        if key not in _CONDITION_KINDS:
            raise where.error(path, _unknown_key(key, _CONDITION_KINDS, "known conditions"))
        parts.extend(_parse_one_condition(where, f"{path}.{key}", key, item, value))
    return _combine(parts)


def _parse_actions(where: _Where, rule: dict, problems: _Problems, required: bool = True) -> Actions:
    values: Dict[str, Any] = {}
    bad = len(problems.lines)
    if "label" in rule:
        with problems.catch():
            value, what = rule["label"], "a string or a list of strings"
            listed = isinstance(value, list)
            if listed and not value:
                raise where.error("label", f"expected {what}, got an empty list")
            values["labels"] = tuple(dict.fromkeys(    # each label once, in order
                _check_text(where, f"label[{i}]" if listed else "label", item, what)
                for i, item in enumerate(value if listed else [value], 1)))
    if "move" in rule:
        with problems.catch():
            values["move"] = _check_text(where, "move", rule["move"], "a folder name")
    for key in ("archive",) + tuple(_FLAG_ACTION_ROWS) + ("trash",):
        if key in rule:
            with problems.catch():
                values[key] = _check_bool(where, key, rule[key])
    destinations = [("label", label) for label in values.get("labels", ())]
    destinations += [("move", values["move"])] if "move" in values else []
    for path, text in destinations:
        if _is_template(text):
            with problems.catch():
                try:
                    split_template(text)
                except ValueError as exc:
                    raise where.error(path, str(exc)) from None
    actions = Actions.make(**values)
    if len(problems.lines) > bad:
        return actions
    if actions.is_empty() and required:
        raise where.error("", "no action; add at least one of " + ", ".join(_action_keys())
                              + " (set to a label, a folder or true)")
    conflicts = [("move", "trash"), ("move", "archive"), ("archive", "trash")]
    conflicts += [(row.key, row.opposite) for row in _FLAG_ACTION_ROWS.values()
                  if row.add and row.opposite in _FLAG_ACTION_ROWS]
    for first, second in conflicts:
        if actions.flag(first) and actions.flag(second):
            raise where.error("", f"'{first}' and '{second}' contradict each other; keep one, "
                                  "or split them into two rules")
    return actions


def _labels_from_program(parts: Sequence[Condition]) -> bool:
    return any(getattr(cond, "label_from", False) for part in parts for cond in _walk(part))


def _parse_rule(source: str, position: int, rule: Any, problems: _Problems) -> Optional[Rule]:
    """One rule; each bad key is added to `problems` (and None returned), not raised."""
    where = _Where(source, position)
    if not isinstance(rule, dict):
        problems.add(where.error("", f"expected a table, got {_quote(rule)}"))
        return None
    bad = len(problems.lines)
    name = rule.get("name")
    if name is not None:
        with problems.catch():
            where.name = name = _check_text(where, "name", name)
    unknown = [key for key in rule if key not in _rule_keys()]
    for key in unknown:
        problems.add(where.error("", _unknown_key(key, _rule_keys())))
    parts: List[Condition] = []
    with problems.catch():
        _check_options(where, "", rule)
    for key, value in rule.items():  # file order: explanations read as written
        if key in _CONDITION_KINDS:
            with problems.catch():
                parts.extend(_parse_one_condition(where, key, key, value, rule))
    # A misspelt key is most likely the missing condition or action: say it once.
    if not unknown and not any(key in _CONDITION_KINDS for key in rule):
        problems.add(where.error("", "no condition; add at least one of "
                                     + ", ".join(_CONDITION_KINDS)))
    actions = Actions()
    with problems.catch():
        # a label a program prints (label_from) is an action of its own
        actions = _parse_actions(where, rule, problems,
                                 required=not unknown and not _labels_from_program(parts))
    keep_going = False
    with problems.catch():
        keep_going = _check_bool(where, "continue", rule.get("continue", False))
    if len(problems.lines) > bad:
        return None
    return Rule(name=name or f"rule {position}", position=position,
                condition=_combine(parts), actions=actions, continue_=keep_going)


def _parse_account_key(where: _Where, key: str, item: Any, account: Dict[str, Any]) -> None:
    """One key of [account] into `account`; raises RulesError when it is wrong."""
    path = f"account.{key}"
    if key not in ACCOUNT_KEYS:
        raise where.error("account", _unknown_key(key, ACCOUNT_KEYS))
    if key in ("user", "host", "cafile", "oauth_client_id", "oauth_client_secret",
               "oauth_client_file"):
        account[key] = _check_text(where, path, item)
    elif key == "port":
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 65535:
            raise where.error(path, f"expected a whole number from 1 to 65535, got {_quote(item)}")
        account[key] = item
    elif key in ("tls", "auth"):
        choices = TLS_MODES if key == "tls" else AUTH_METHODS
        if item not in choices:
            raise where.error(path, f"expected one of {', '.join(map(_quote, choices))}, "
                                    f"got {_quote(item)}")
        account[key] = item
    elif key == "password_command":
        if isinstance(item, list):
            if not item:
                raise where.error(path, "expected a command string or a list of strings, "
                                        "got an empty list")
            account[key] = [_check_text(where, f"{path}[{i}]", part, "a string")
                            for i, part in enumerate(item, 1)]
        else:
            account[key] = _check_text(where, path, item, "a command string or a list of strings")
    elif key == "folders":
        if not isinstance(item, list) or not item:
            raise where.error(path, f"expected a non-empty list of folder names, got {_quote(item)}")
        account[key] = [_check_text(where, f"{path}[{i}]", part, "a folder name")
                        for i, part in enumerate(item, 1)]


def account_variable_suffix(name: str) -> str:
    """The suffix of an [[account]]'s own variables: ``"Work mail"`` -> ``"WORK_MAIL"``
    (so ``IMAP_PASSWORD_WORK_MAIL``): upper-cased, anything but A-Z and 0-9 as ``_``."""
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


def _parse_accounts(source: str, value: List[Any], problems: _Problems,
                    rule_names: Optional[List[str]]) -> Tuple[Dict[str, Any], ...]:
    """[[account]] tables: each a ``name``, the [account] keys, and optionally ``rules``
    (names of this file's rules, or the path of another rules file).  Two tables with one
    name, with names that fold to one variable suffix, or for one mailbox (user, host and
    port) are errors: each would hand one account's marks or password to another."""
    where = _Where(source)
    tables: List[Dict[str, Any]] = []
    for i, item in enumerate(value, 1):
        here = _Where(source, i, item.get("name") if isinstance(item, dict) and
                      isinstance(item.get("name"), str) else None, kind="account")
        if not isinstance(item, dict):
            problems.add(here.error("", f"expected a table, got {_quote(item)}"))
            continue
        table: Dict[str, Any] = {}
        bad = len(problems.lines)
        with problems.catch():
            if "name" not in item:
                raise here.error("", "no name; give each [[account]] a name = \"...\"")
            table["name"] = _check_text(here, "name", item["name"])
        for key, entry in item.items():
            if key == "name":
                continue
            with problems.catch():
                if key == "rules":
                    table[key] = _parse_account_rules(here, entry, rule_names)
                elif key not in ACCOUNT_KEYS:
                    raise here.error("", _unknown_key(key, ACCOUNT_KEYS + ("name", "rules")))
                else:
                    _parse_account_key(here, key, entry, table)
        if len(problems.lines) == bad:
            tables.append(table)
    seen: Dict[Any, str] = {}
    for table in tables:
        name = table["name"]
        for key, what in ((("name", name), "name"),
                          (("suffix", account_variable_suffix(name)), "variable suffix"),
                          (("mailbox", table.get("user", "").casefold(),
                            table.get("host", GMAIL_HOST).lower(),
                            None if table.get("port") in (IMAPS_PORT, IMAP_PORT) else
                            table.get("port")) if table.get("user") else None,
                           "mailbox")):
            if key is None:
                continue
            if key in seen:
                detail = {"name": "two tables with one name",
                          "variable suffix": f"both read IMAP_PASSWORD_{key[1]}",
                          "mailbox": f"both are {table['user']} on "
                                     f"{table.get('host', GMAIL_HOST)}"}[what]
                problems.add(where.error("account", f"{_quote(seen[key])} and {_quote(name)}: "
                                                    f"{detail}; each [[account]] needs its own "
                                                    f"{what}"))
            seen[key] = name
    return tuple(tables)


def _parse_account_rules(where: _Where, value: Any, rule_names: Optional[List[str]]) -> Any:
    """An [[account]]'s ``rules``: a list of this file's rule names, or a rules file path."""
    if isinstance(value, str):
        path = _check_text(where, "rules", value, "a rules file or a list of rule names")
        if Path(path).suffix.lower() not in (".toml", ".json"):
            raise where.error("rules", f"{_quote(path)} is not a rules file (*.toml or *.json); "
                                       f"give a path, or a list of rule names")
        return path
    if not isinstance(value, list) or not value:
        raise where.error("rules", f"expected a rules file or a non-empty list of rule names, "
                                   f"got {_quote(value)}")
    names = [_check_text(where, f"rules[{i}]", name, "a rule name")
             for i, name in enumerate(value, 1)]
    unknown = [name for name in names if rule_names is not None and name not in rule_names]
    if unknown:
        raise where.error("rules", f"no rule named {_quote(unknown[0])} in this file")
    return names


# [[test]] tables: each message key -> how it shapes the sample message. Header keys
# become header lines; the rest set what IMAP would report (size, labels, flags).
_TEST_HEADER_KEYS = {"from": "From", "to": "To", "cc": "Cc", "subject": "Subject",
                     "list_id": "List-Id"}
_TEST_STATE_KEYS = ("has_attachment", "unread", "starred")
TEST_MESSAGE_KEYS = tuple(_TEST_HEADER_KEYS) + ("headers", "body", "size", "date", "labels",
                                                "eml") + _TEST_STATE_KEYS
TEST_KEYS = ("name",) + TEST_MESSAGE_KEYS + ("expect_rules", "expect_actions")
_EML_COMPATIBLE = ("eml", "labels") + _TEST_STATE_KEYS


# The ISO 8601 forms accepted wherever a date is written out: 2024-03-04, and where a time
# may follow, 2024-03-04T10:00, 2024-03-04T10:00:00.5, each with an optional Z or +01:00.
# Parsed here rather than by fromisoformat, which accepts more forms on newer Pythons
# (3.11 takes 20240304 and a trailing Z), so a rules file valid on one is valid on all.
_ISO_DATE_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})"
                          r"(?:\.(\d{1,6}))?)?(Z|[+-]\d{2}:\d{2})?)?", re.ASCII)


def _parse_iso_date(text: str, with_time: bool = False) -> Optional[datetime]:
    """``text`` as a datetime (naive unless it names an offset), or None if it is not
    YYYY-MM-DD (followed, when ``with_time``, by an optional time and offset)."""
    match = _ISO_DATE_RE.fullmatch(text.strip())
    if match is None or (match.group(4) is not None and not with_time):
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        tzinfo = None
        if offset is not None:
            if offset == "Z":
                offset = "+00:00"
            delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
            tzinfo = timezone(-delta if offset[0] == "-" else delta)
        return datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                        int(second or 0), int((fraction or "0").ljust(6, "0")), tzinfo)
    except ValueError:
        return None


def _parse_test_date(where: _Where, value: Any) -> datetime:
    text = _check_text(where, "date", value, "a date as text")
    when: Optional[datetime] = None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        when = _parse_iso_date(text, with_time=True)
    if when is None:
        raise where.error("date", f"expected a date like \"2024-03-04\", \"2024-03-04T10:00:00+01:00\" "
                                  f"or \"Mon, 04 Mar 2024 10:00:00 +0000\", got {_quote(value)}")
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _test_message(where: _Where, table: Dict[str, Any], source: str) -> MessageInfo:
    """Build the sample message of one [[test]] table (read the .eml file when given)."""
    if "eml" in table:
        extra = [key for key in table if key in TEST_MESSAGE_KEYS and key not in _EML_COMPATIBLE]
        if extra:
            raise where.error("eml", f"the .eml file is the whole message; drop "
                                     f"{', '.join(extra)} (or drop eml)")
        path = _check_text(where, "eml", table["eml"], "a path to an .eml file")
        full = path if os.path.isabs(path) else os.path.join(os.path.dirname(source), path)
        try:
            msg = message_info_from_bytes(read_message_file(full))
        except ValueError as exc:
            raise where.error("eml", f"{full}: {exc}") from None
        except OSError as exc:
            raise where.error("eml", f"cannot read {full}: {exc.strerror or exc}") from None
    else:
        lines: List[str] = []
        for key, header in _TEST_HEADER_KEYS.items():
            if key in table:
                values = table[key] if isinstance(table[key], list) else [table[key]]
                text = ", ".join(_check_text(where, key, v, "a string") for v in values)
                lines.append(f"{header}: {text}")
        headers = table.get("headers", {})
        if not isinstance(headers, dict):
            raise where.error("headers", f"expected a table of header names and values, "
                                         f"got {_quote(headers)}")
        for name, value in headers.items():
            if not _HEADER_NAME_RE.fullmatch(name):
                raise where.error(f"headers.{name}", f"{_quote(name)} is not a header name")
            lines.append(f"{name}: {_check_text(where, f'headers.{name}', value)}")
        if "date" in table:
            lines.append("Date: " + email.utils.format_datetime(_parse_test_date(where, table["date"])))
        body = table.get("body", "")
        if not isinstance(body, str):
            raise where.error("body", f"expected text, got {_quote(body)}")
        lines.append("Content-Type: text/plain; charset=utf-8")
        msg = message_info_from_bytes(("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8"))
    if "size" in table:
        msg = dataclasses.replace(msg, size=_parse_size(where, "size", table["size"])[0])
    labels = table.get("labels", [])
    labels = [labels] if isinstance(labels, str) else labels
    if not isinstance(labels, list):
        raise where.error("labels", f"expected a list of label names, got {_quote(labels)}")
    state = {key: _check_bool(where, key, table[key]) for key in _TEST_STATE_KEYS if key in table}
    flags = set() if state.get("unread") else {"\\Seen"}
    if state.get("starred"):
        flags.add("\\Flagged")
    return dataclasses.replace(
        msg, flags=frozenset(flags),
        labels=frozenset(_check_text(where, "labels", label) for label in labels),
        has_attachment=state.get("has_attachment", msg.has_attachment))


def _parse_test(source: str, position: int, table: Any,
                rule_names: Optional[Sequence[str]]) -> RuleTest:
    where = _Where(source, position, kind="test")
    if not isinstance(table, dict):
        raise where.error("", f"expected a table, got {_quote(table)}")
    name = table.get("name")
    if name is not None:
        where.name = name = _check_text(where, "name", name)
    for key in table:
        if key not in TEST_KEYS:
            raise where.error("", _unknown_key(key, TEST_KEYS))
    if "expect_rules" not in table:
        raise where.error("", "no expect_rules; list the names of the rules that must match, "
                              "in order ([] for none)")
    expected = table["expect_rules"]
    if not isinstance(expected, list):
        raise where.error("expect_rules", f"expected a list of rule names, got {_quote(expected)}")
    for i, rule_name in enumerate(expected, 1):
        _check_text(where, f"expect_rules[{i}]", rule_name, "a rule name")
        if rule_names is not None and rule_name not in rule_names:
            raise where.error(f"expect_rules[{i}]", _unknown_key(rule_name, rule_names, "rules")
                              .replace("unknown key", "no rule named"))
    actions = None
    if "expect_actions" in table:
        value = table["expect_actions"]
        if not isinstance(value, dict):
            raise where.error("expect_actions", f"expected a table of actions, e.g. "
                                                f"{{ label = \"Receipts\", archive = true }}, got {_quote(value)}")
        for key in value:
            if key not in _action_keys():
                raise where.error("expect_actions", _unknown_key(key, _action_keys(), "actions"))
        problems = _Problems()
        actions = _parse_actions(where, value, problems, required=False)
        problems.raise_any()
    sample = {key: table[key] for key in TEST_MESSAGE_KEYS if key in table}
    return RuleTest(name=name or f"test {position}", position=position,
                    message=_test_message(where, table, source), expect_rules=tuple(expected),
                    expect_actions=actions,
                    sample=json.dumps(sample, sort_keys=True, ensure_ascii=False))


def parse_rules(doc: Any, source: str = "<rules>") -> Ruleset:
    """Validate a rules document (parsed TOML or JSON) and build a Ruleset.

    Returns the Ruleset; raises RulesError listing every problem of the file, one
    line each, naming the source, the rule (position and name), the key and what was
    expected, e.g. 'rules.toml: rule 2 ("News"): unknown key 'lable'; did you mean 'label'?'.
    """
    where = _Where(source)
    problems = _Problems()
    if not isinstance(doc, dict):
        raise where.error("", "expected a table with a 'rule' list at the top level, "
                              f"got {_quote(doc)}")
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            problems.add(where.error("", _unknown_key(key, TOP_LEVEL_KEYS)))
    if "rule" not in doc:
        problems.raise_any()
        raise where.error("", "no rules; add at least one [[rule]] table (TOML) "
                              "or a \"rule\" list (JSON)")
    rules = doc["rule"]
    if isinstance(rules, dict):
        raise where.error("rule", "expected a list of rule tables; in TOML write [[rule]] "
                                  "with double brackets")
    if not isinstance(rules, list):
        raise where.error("rule", f"expected a list of rule tables, got {_quote(rules)}")
    if not rules:
        raise where.error("rule", "the list is empty; add at least one rule")
    parsed = tuple(_parse_rule(source, i, rule, problems) for i, rule in enumerate(rules, 1))
    # Rule names are checked only when every rule parsed; a broken rule is reported already.
    names = None if None in parsed else list(dict.fromkeys(r.name for r in parsed))
    account: Dict[str, Any] = {}
    accounts: Tuple[Dict[str, Any], ...] = ()
    if isinstance(doc.get("account"), list):      # [[account]] tables: several accounts
        accounts = _parse_accounts(source, doc["account"], problems, names)
    elif isinstance(doc.get("account"), dict):
        for key, item in doc["account"].items():
            with problems.catch():
                _parse_account_key(where, key, item, account)
    elif "account" in doc:
        problems.add(where.error("account", f"expected a table, got {_quote(doc['account'])}"))
    tests: List[RuleTest] = []
    tables = doc.get("test", [])
    if not isinstance(tables, list):
        problems.add(where.error("test", "expected a list of test tables; in TOML write "
                                         "[[test]] with double brackets"))
    else:
        for i, table in enumerate(tables, 1):
            with problems.catch():
                tests.append(_parse_test(source, i, table, names))
    problems.raise_any()
    return Ruleset(rules=parsed, source=source, account=account, tests=tuple(tests),
                   accounts=accounts)


# --- Rules files: a small TOML reader, the same on every Python --------------------------

#
# tomllib arrived in Python 3.11, but the locked-down machines this file is copied onto
# often run the distribution's 3.9 or 3.10. So the module carries a small reader for the
# part of TOML 1.0 that rules files use: tables, arrays of tables, inline tables; bare,
# quoted and dotted keys; basic and literal strings, single- and multi-line; integers,
# booleans, arrays and comments. It refuses the rest by name (floats, dates and times:
# rules write sizes as "5M" and dates as strings) rather than guess. It keeps TOML's
# rules on what may be defined twice, so a file it accepts means the same under tomllib;
# the tests compare the two on one corpus wherever tomllib exists.
#
# load_rules uses this reader on every Python, tomllib or not. One code path means a rules
# file that passes `check` on a laptop's 3.13 passes on the server's 3.9 with the same
# messages, and every test exercises the reader that 3.9 users depend on. Its errors are
# also better for a hand-edited file: tomllib reports a duplicate key "at end of
# document", this reader names its line and column, and it says "text needs quotes" or
# "write dates as strings" where tomllib says "Invalid value".

# Files we read (rules, state, audit lines, tokens, the OAuth client file) may have
# been written by anyone who could write them, or be damaged: both readers recurse
# (100,000 nested brackets crashed with RecursionError), int() of a very long number
# is quadratic (and refused past 4,300 digits on newer Pythons), and JSON's Infinity
# and NaN are no numbers we use.  Nothing we write comes near these bounds.
MAX_NESTING = 64          # arrays and tables (objects) inside one another
MAX_NUMBER_DIGITS = 40    # digits of one number

_JSON_SCAN = re.compile(r'"(?:[^"\\]|\\[\s\S])*"?|[\[{]|[\]}]|-?\d{%d,}|-?Infinity|NaN'
                        % (MAX_NUMBER_DIGITS + 1))


def load_json(text: str) -> Any:
    """json.loads() with bounds: at most MAX_NESTING levels, MAX_NUMBER_DIGITS digits
    per number, no Infinity or NaN.

    Raises json.JSONDecodeError (a ValueError with lineno and colno) for anything
    beyond them, as for any invalid JSON; never RecursionError.
    """
    depth = 0
    for token in _JSON_SCAN.finditer(text):
        first = token.group()[0]
        if first in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise json.JSONDecodeError(f"nested more than {MAX_NESTING} levels deep",
                                           text, token.start())
        elif first in "]}":
            depth -= 1
        elif first != '"':
            what = (f"a number of more than {MAX_NUMBER_DIGITS} digits"
                    if token.group()[-1].isdigit() else f"{token.group()} is not a number here")
            raise json.JSONDecodeError(what, text, token.start())
    return json.loads(text)


class TOMLError(GmailClassifyError, ValueError):
    """Text that parse_toml cannot read; ``msg``, ``lineno`` and ``colno`` (1-based) say
    what and where. str() reads like tomllib's: "Expected '=' ... (at line 3, column 7)".
    """

    def __init__(self, msg: str, lineno: int, colno: int) -> None:
        super().__init__(f"{msg} (at line {lineno}, column {colno})")
        self.msg, self.lineno, self.colno = msg, lineno, colno


_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_WS = " \t"
_TOML_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TOML_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_TOML_DATE_OR_TIME = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}")
_TOML_INTEGER = re.compile(r"[+-]?(?:0|[1-9](?:_?\d)*)|0x[0-9A-Fa-f](?:_?[0-9A-Fa-f])*"
                           r"|0o[0-7](?:_?[0-7])*|0b[01](?:_?[01])*")
_TOML_FLOAT = re.compile(r"[+-]?(?:[\d_]+(?:\.[\d_]+)?[eE][+-]?[\d_]+|[\d_]+\.[\d_]+|inf|nan)")
_TOML_LINE_CONTINUATION = re.compile(r"\\[ \t]*\r?\n")
_TOML_WORD = re.compile(r"[^\s,\]\}#]+")


class _TomlReader:
    """Recursive descent over one document; see parse_toml."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0
        self.explicit: set = set()  # ids of tables that may not be defined again
        self.pending: set = set()   # tables made by dotted keys in the current section
        self.frozen: set = set()    # ids of inline tables and arrays: complete as written
        self.table_arrays: set = set()  # ids of lists made by [[header]]
        self.depth = 0              # tables and arrays open around the value being read
        self.base = 0               # the current [header]'s depth

    # Positions and errors

    def fail(self, message: str, pos: Optional[int] = None) -> TOMLError:
        pos = self.pos if pos is None else pos
        line = self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return TOMLError(message, line, column)

    def peek(self, length: int = 1) -> str:
        return self.text[self.pos:self.pos + length]

    def enter(self, levels: int, pos: int) -> None:
        """Go ``levels`` tables or arrays deeper; fail past MAX_NESTING (the reader and
        everything after it recurse, and a sender of a rules file may not crash them)."""
        self.depth += levels
        if self.depth > MAX_NESTING:
            raise self.fail(f"nested more than {MAX_NESTING} levels deep; rules never need that", pos)

    def found(self) -> str:
        """The next character, for error messages: "'x'", "the end of the line"."""
        char = self.peek()
        if not char:
            return "the end of the file"
        if char == "\n" or self.peek(2) == "\r\n":
            return "the end of the line"
        return repr(char)

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _TOML_WS:
            self.pos += 1

    def skip_comment(self) -> None:
        if self.peek() != "#":
            return
        end = self.text.find("\n", self.pos)
        end = len(self.text) if end < 0 else end
        if end > self.pos and self.text[end - 1] == "\r":
            end -= 1
        bad = _TOML_CONTROL.search(self.text, self.pos, end)
        if bad:
            raise self.fail("control character in a comment", bad.start())
        self.pos = end

    def newline(self) -> bool:
        """Consumes one line break; False at the end of the text."""
        size = 1 if self.peek() == "\n" else 2 if self.peek(2) == "\r\n" else 0
        self.pos += size
        return size > 0

    def end_of_line(self, after: str) -> None:
        self.skip_ws()
        self.skip_comment()
        if self.pos < len(self.text) and not self.newline():
            raise self.fail(f"expected the end of the line after {after}, found {self.found()}")

    def skip_blank(self) -> None:
        """Whitespace, comments and line breaks, as allowed inside arrays."""
        while True:
            self.skip_ws()
            self.skip_comment()
            if not self.newline():
                return

    # Document structure

    def document(self) -> Dict[str, Any]:
        root: Dict[str, Any] = {}
        current = root
        while True:
            self.skip_blank()
            if self.pos >= len(self.text):
                return root
            if self.peek() == "[":
                self.explicit |= self.pending
                self.pending = set()
                current = self.header(root)
            else:
                self.key_value(current, self.pending, "a value")

    def header(self, root: Dict[str, Any]) -> Dict[str, Any]:
        start = self.pos
        array = self.peek(2) == "[["
        self.pos += 2 if array else 1
        self.skip_ws()
        keys = self.key()
        self.skip_ws()
        close = "]]" if array else "]"
        if self.peek(len(close)) != close:
            raise self.fail(f"expected {close!r} to close the table header, found {self.found()}")
        self.pos += len(close)
        shown = "[" * len(close) + ".".join(keys) + "]" * len(close)
        self.depth = 0
        self.enter(len(keys), start)
        self.base = len(keys)
        table = root
        for key in keys[:-1]:       # the tables on the way, created when missing
            table = table.setdefault(key, {})
            if isinstance(table, list) and id(table) in self.table_arrays:
                table = table[-1]
            elif not isinstance(table, dict) or id(table) in self.frozen:
                raise self.fail(f"{shown}: '{key}' is already defined as a value", start)
        last = keys[-1]
        existing = table.get(last)
        if array:
            if last not in table:
                table[last] = existing = []
                self.table_arrays.add(id(existing))
            elif not (isinstance(existing, list) and id(existing) in self.table_arrays):
                raise self.fail(f"{shown}: '{last}' is already defined as something other "
                                "than an array of tables", start)
            existing.append({})
            existing = existing[-1]
        elif last not in table:
            table[last] = existing = {}
        elif not isinstance(existing, dict) or id(existing) in self.explicit \
                or id(existing) in self.frozen:
            raise self.fail(f"{shown}: this table is already defined", start)
        self.explicit.add(id(existing))
        self.end_of_line("a table header")
        return existing

    def key_value(self, table: Dict[str, Any], made: set, after: str) -> None:
        """`key = value` into `table`; `made` collects tables that dotted keys create."""
        start = self.pos
        keys = self.key()
        self.skip_ws()
        if self.peek() != "=":
            raise self.fail(f"expected '=' after the key {'.'.join(keys)!r}, found {self.found()}")
        self.pos += 1
        self.skip_ws()
        bare = self.pos
        levels = len(keys) - 1 + (self.base if after else 0)
        self.enter(levels, start)
        value = self.value()
        self.depth -= levels
        if after and self.text[bare] not in "\"'[{":
            self.unquoted_words(self.text[bare:self.pos])
        for key in keys[:-1]:
            if key not in table:
                table[key] = {}
                made.add(id(table[key]))
            inner = table[key]
            if not isinstance(inner, dict) or id(inner) in self.frozen or id(inner) in self.explicit:
                raise self.fail(f"'{key}' is already defined; a dotted key cannot add to it", start)
            table = inner
        if keys[-1] in table:
            raise self.fail(f"duplicate key {'.'.join(keys)!r}", start)
        table[keys[-1]] = value
        if after:
            self.end_of_line(after)

    def unquoted_words(self, first: str) -> None:
        """`larger_than = 5 MB`: a bare value followed by more words wanted quotes."""
        self.skip_ws()
        found = re.compile(r"[^#\r\n]*").match(self.text, self.pos)   # to a comment or the end
        rest = found.group().rstrip() if found else ""
        if rest:
            raise self.fail(f"expected the end of the line after a value, found {self.found()}; "
                            f"text with spaces needs quotes: \"{first} {rest}\"")

    def key(self) -> List[str]:
        keys = [self.simple_key()]
        while True:
            self.skip_ws()
            if self.peek() != ".":
                return keys
            self.pos += 1
            self.skip_ws()
            keys.append(self.simple_key())

    def simple_key(self) -> str:
        char = self.peek()
        if char in ('"', "'") and self.peek(3) != char * 3:
            return self.string(char)
        bare = _TOML_BARE_KEY.match(self.text, self.pos)
        if not bare:
            raise self.fail(f"expected a key (letters, digits, '_' and '-', or a quoted "
                            f"string), found {self.found()}")
        self.pos = bare.end()
        return bare.group()

    # Values

    def value(self) -> Any:
        char = self.peek()
        if char in ('"', "'"):
            return (self.multiline_string if self.peek(3) == char * 3 else self.string)(char)
        if char == "[":
            return self.array()
        if char == "{":
            return self.inline_table()
        start = self.pos
        word = _TOML_WORD.match(self.text, self.pos)
        if not word:
            raise self.fail(f"expected a value, found {self.found()}")
        text = word.group()
        if text in ("true", "false"):
            self.pos = word.end()
            return text == "true"
        if _TOML_DATE_OR_TIME.match(text):
            raise self.fail(f"dates and times are not supported here; write {text} as a "
                            f"string: \"{text}\"", start)
        if _TOML_INTEGER.fullmatch(text):
            if len(text) > MAX_NUMBER_DIGITS:
                raise self.fail(f"a number of more than {MAX_NUMBER_DIGITS} digits; rules "
                                f"never need one", start)
            self.pos = word.end()
            return int(text.replace("_", ""), 0 if text[:2] in ("0x", "0o", "0b") else 10)
        if _TOML_FLOAT.fullmatch(text):
            raise self.fail(f"floating-point numbers are not supported here; use a whole "
                            f"number, or a string such as \"{text}\"", start)
        if re.fullmatch(r"[+-]?[\d_]+", text):
            raise self.fail(f"invalid integer {text} (no leading zeros; '_' only between "
                            "digits)", start)
        if text in ("True", "False", "TRUE", "FALSE"):
            raise self.fail(f"expected a value, found {text}; TOML writes {text.lower()} "
                            "in lower case", start)
        raise self.fail(f"expected a value, found {text}; text needs quotes: \"{text}\"", start)

    def array(self) -> List[Any]:
        self.enter(1, self.pos)
        self.pos += 1
        items: List[Any] = []
        self.skip_blank()
        while self.peek() != "]":       # a comma after the last item is allowed
            items.append(self.value())
            self.skip_blank()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "]":
                raise self.fail(f"expected ',' or ']' in the array, found {self.found()}")
            self.skip_blank()
        self.pos += 1
        self.frozen.add(id(items))
        self.depth -= 1
        return items

    def inline_table(self) -> Dict[str, Any]:
        """`{ key = value, ... }` on one line, no trailing comma (TOML 1.0)."""
        self.enter(1, self.pos)
        self.pos += 1
        table: Dict[str, Any] = {}
        made: set = set()
        self.skip_ws()
        if self.peek() != "}":
            while True:
                self.key_value(table, made, "")
                self.skip_ws()
                if self.peek() == "}":
                    break
                if self.peek() != ",":
                    raise self.fail("expected ',' or '}' in the inline table (which must fit "
                                    f"on one line), found {self.found()}")
                self.pos += 1
                self.skip_ws()
        self.pos += 1   # the closing brace
        self.frozen |= made | {id(table)}
        self.depth -= 1
        return table

    def string(self, quote: str) -> str:
        """A one-line basic (quote ``"``) or literal (``'``) string; only basic has escapes."""
        start = self.pos
        self.pos += 1
        parts: List[str] = []
        while True:
            char = self.peek()
            if not char or char in "\r\n":    # a literal string points at the line break
                raise self.fail("unterminated string",
                                self.pos if char and quote == "'" else start)
            if char == quote:
                self.pos += 1
                return "".join(parts)
            if char == "\\" and quote == '"':
                parts.append(self.escape())
            elif _TOML_CONTROL.match(char):
                raise self.fail("control character in a string" + (
                    "; write it as an escape such as \\t or \\u0001" if quote == '"' else ""))
            else:
                parts.append(char)
                self.pos += 1

    def escape(self) -> str:
        start = self.pos
        code = self.text[self.pos + 1:self.pos + 2]
        if code in _TOML_ESCAPES:
            self.pos += 2
            return _TOML_ESCAPES[code]
        if code in ("u", "U"):
            size = 4 if code == "u" else 8
            digits = self.text[self.pos + 2:self.pos + 2 + size]
            if re.fullmatch(r"[0-9A-Fa-f]{%d}" % size, digits):
                value = int(digits, 16)
                if value <= 0x10FFFF and not 0xD800 <= value <= 0xDFFF:
                    self.pos += 2 + size
                    return chr(value)
            raise self.fail(f"\\{code} must be followed by {size} hex digits of a Unicode "
                            "scalar value", start)
        raise self.fail(f"unknown escape \\{code}; in a regex write the string in 'single "
                        "quotes' so backslashes stay as typed", start)

    def multiline_string(self, quote: str) -> str:
        """A multi-line basic (quote ``"``) or literal (``'``) string; only basic has escapes."""
        start = self.pos
        self.pos += 3
        self.newline()  # a line break right after the opening quotes is dropped
        parts: List[str] = []
        while True:
            char = self.peek()
            if not char:
                raise self.fail("unterminated multi-line string", start)
            if char == quote and self.peek(3) == quote * 3:
                # A run of 3 to 5 quotes: the last three close; up to two belong to the text.
                run = 3
                while self.text[self.pos + run:self.pos + run + 1] == quote:
                    run += 1
                if run > 5:
                    raise self.fail("too many quotes at the end of a multi-line string")
                self.pos += run
                return "".join(parts) + quote * (run - 3)
            if char == "\\" and quote == '"':
                after = _TOML_LINE_CONTINUATION.match(self.text, self.pos)
                if after:  # line-ending backslash: drop it and all whitespace after it
                    self.pos = after.end()
                    while self.peek() in (" ", "\t", "\n") or self.peek(2) == "\r\n":
                        self.pos += 1
                    continue
                parts.append(self.escape())
            elif char == "\n" or self.peek(2) == "\r\n":
                self.newline()
                parts.append("\n")
            elif _TOML_CONTROL.match(char):
                raise self.fail("control character in a string")
            else:
                parts.append(char)
                self.pos += 1


def parse_toml(text: str) -> Dict[str, Any]:
    """Parse the TOML that rules files use, on any Python (see the banner above).

    Returns plain dicts, lists, strings, ints and bools, the same as tomllib.loads
    would; raises TOMLError with line and column for bad or unsupported input.
    """
    return _TomlReader(text).document()


# --- Rules files: loading and the built-in rules -----------------------------------------

# One trust question for every file whose contents we act on: a rules file that names a
# program to run (password_command; the coming plug-in conditions add their programs and
# the directories they live in), or one that holds a secret.  Another user who can write
# the file, or any directory above it (and so rename or replace what is in it), could
# make us run their program as the user.  A directory others can write is acceptable
# only with the sticky bit (like /tmp): then nobody but an entry's owner may rename or
# remove that entry, and the entry below it is checked in its turn (owned by the user or
# root).  Owners other than the user and root are refused for the same reason.  A secret
# must, on top of that, be readable by its owner alone.

def trust_problem(path: Any, *, private: bool = False, directories: bool = True,
                  status: Optional[os.stat_result] = None) -> Optional[str]:
    """Why ``path`` cannot be trusted, or None (always None off POSIX).

    Returns e.g. "/tmp/x/rules.toml can be changed by other users (group or
    others may write it); run 'chmod go-w /tmp/x/rules.toml'". ``private``: the
    file holds a secret, so others may not read it either; ``directories``: check
    every directory above it too (the real path and the path as given); ``status``:
    the file's own status (from the open file, so that it cannot be swapped after).
    """
    if os.name != "posix":
        return None
    me = os.geteuid()
    name = os.fspath(path)
    try:
        info = status or os.stat(name)
    except OSError as exc:
        return f"cannot check {name}: {exc.strerror or exc}"
    if info.st_uid not in (me, 0):
        return (f"{name} belongs to another user (uid {info.st_uid}); use a file of your "
                f"own ('chown {me} {name}' as root)")
    if private and info.st_mode & 0o077:
        return f"{name} is readable by other users; run 'chmod 600 {name}'"
    if info.st_mode & 0o022:
        return (f"{name} can be changed by other users (group or others may write it); "
                f"run 'chmod go-w {name}'")
    if not directories:
        return None
    seen = set()
    for start in (os.path.abspath(name), os.path.realpath(name)):
        directory = os.path.dirname(start)
        while directory not in seen:
            seen.add(directory)
            try:
                here = os.stat(directory)
            except OSError as exc:
                return f"cannot check {directory}: {exc.strerror or exc}"
            if here.st_uid not in (me, 0):
                return (f"{name} lies in {directory}, which belongs to another user (uid "
                        f"{here.st_uid}), who could replace the file; move it into a "
                        f"directory of your own")
            if here.st_mode & 0o022 and not here.st_mode & 0o1000:
                return (f"{name} lies in {directory}, which other users can write (and so "
                        f"replace the file); run 'chmod go-w {directory}' or move the file")
            directory = os.path.dirname(directory)     # the root is its own parent: seen
    return None


def program_trust_problem(condition: ProgramCondition) -> Optional[str]:
    """Why this program may not run, or None: its rules file and its executable, and every
    directory above them, must be owned by the user or root and writable by nobody else
    (trust_problem).  Returns e.g. "/tmp/x/rules.toml can be changed by other users ..."."""
    files = [condition.source] if condition.source and os.path.exists(condition.source) else []
    program = condition.executable()
    if program is None:
        return None             # nothing will run: the rule fails closed when it is reached
    files.append(program)
    # A script handed to an interpreter is code as well: any argument naming a file or a
    # directory where the program runs (ProgramCondition.directory), as a whole or after
    # an '=' (--script=filter.py), and a module (-m filter, -mfilter: filter.py, the
    # package filter/ and its __main__.py).
    base = condition.directory()
    names: List[str] = []
    for before, arg in zip(("",) + condition.argv[1:], condition.argv[1:]):
        names += [arg, arg.partition("=")[2]]
        module = arg if before == "-m" else arg[2:] if arg.startswith("-m") else ""
        if module:
            path = module.replace(".", os.sep)
            names += [path + ".py", path]
    for name in filter(None, dict.fromkeys(names)):
        path = os.path.join(base, name)
        if os.path.exists(path):
            files.append(path)
            main = os.path.join(path, "__main__.py")
            if os.path.isdir(path) and os.path.isfile(main):
                files.append(main)
    problem = next(filter(None, map(trust_problem, files)), None)
    return f"{problem}; refusing to run program {condition.name()}" if problem else None


def rule_programs(rules: Ruleset) -> List[Tuple[Rule, ProgramCondition]]:
    """The programs these rules may run, with their rules, in rule order."""
    return [(rule, cond) for rule in rules.rules for cond in _walk(rule.condition)
            if isinstance(cond, ProgramCondition)]


def check_programs_trusted(rules: Ruleset, files: Sequence[str] = ()) -> None:
    """The trust check before any program runs: raises RulesError (exit 2) naming the first
    file or directory someone else could change (the rules file, ``files`` it includes,
    each program).  Does nothing when the rules run no program."""
    found = rule_programs(rules)
    if not found:
        return
    problem = next(filter(None, map(trust_problem, files)), None)
    if problem:
        raise RulesError(f"{problem}; refusing to run the rules' programs")
    problem = next(filter(None, (program_trust_problem(cond) for _rule, cond in found)), None)
    if problem:
        raise RulesError(problem)


def default_rules_dir() -> pathlib.Path:
    """``$XDG_CONFIG_HOME/gmail_classify`` (``~/.config/gmail_classify`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return pathlib.Path(base) / "gmail_classify"


def load_rules(path: Any) -> Ruleset:
    """Read, parse and validate a .toml or .json rules file.

    Returns the Ruleset (source = the path as given); raises RulesError when
    the file is missing, unreadable, not valid TOML/JSON, or the rules are wrong.
    """
    source = os.fspath(path)
    suffix = Path(source).suffix.lower()
    if suffix not in (".toml", ".json"):
        raise RulesError(f"{source}: unknown rules file type; name it *.toml or *.json")
    try:
        with open(source, "rb") as fh:
            status = os.fstat(fh.fileno())
            data = fh.read()
    except FileNotFoundError:
        raise RulesError(f"{source}: no such file") from None
    except OSError as exc:
        raise RulesError(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RulesError(f"{source}: not UTF-8 text (bad byte at offset {exc.start}); "
                         "save the file as UTF-8") from None
    # Both errors carry msg, lineno and colno.
    read, kind, invalid = ((parse_toml, "TOML", TOMLError) if suffix == ".toml"
                           else (load_json, "JSON", json.JSONDecodeError))
    try:
        doc = read(text)
    except invalid as exc:
        raise RulesError(f"{source}: line {exc.lineno}, column {exc.colno}: "
                         f"invalid {kind}: {exc.msg}") from None
    rules = parse_rules(doc, source)
    tables = [rules.account, *rules.accounts]
    secrets_held = [key for key in SECRET_ACCOUNT_KEYS for table in tables if key in table]
    if secrets_held and os.name == "posix" and status.st_mode & 0o077:
        raise RulesError(f"{source} holds {secrets_held[0]} and is readable by other users; "
                         f"run 'chmod 600 {source}'")
    acts = secrets_held + [key for key in ("password_command",) for table in tables
                           if key in table]
    problem = trust_problem(source, status=status) if acts else None
    if problem:
        raise RulesError(f"{problem}; refusing a rules file that holds {acts[0]}")
    # The rules files [[account]] tables name, relative to this file's directory.
    loaded: Dict[str, Ruleset] = {}
    for table in rules.accounts:
        if not isinstance(table.get("rules"), str):
            continue
        path = os.path.join(os.path.dirname(rules.source), os.path.expanduser(table["rules"]))
        other = load_rules(path)
        if other.accounts:
            raise RulesError(f"{path}: the rules of account {table['name']!r} may not hold "
                             f"[[account]] tables of their own")
        loaded[table["name"]] = other
    return dataclasses.replace(rules, account_files=loaded) if rules.accounts else rules


def run_rule_tests(rules: Ruleset, now: Optional[datetime] = None) -> List[str]:
    """Run the rules file's [[test]] tables offline, as `test` would classify them.

    gmail_query is decided as everywhere off Gmail (Ruleset.local). Returns one
    line per failed test, e.g. 'rules.toml: test 2 ("Shop"): expected rules
    [Receipts], got [Receipts, Newsletters]'; [] when every test passes.
    """
    local, _notes = rules.local()
    failures = []
    for test in rules.tests:
        where = _Where(rules.source, test.position, None if test.name == f"test {test.position}"
                       else test.name, kind="test").prefix()
        try:
            decision = local.classify(test.message, final=True, now=now)
        except (ProgramError, ContentSkip) as exc:
            failures.append(f"{where}could not be decided: {exc}")
            continue
        got = tuple(name for name, _ in decision.matches)
        if got != test.expect_rules:
            failures.append(f"{where}expected rules [{', '.join(test.expect_rules)}], "
                            f"got [{', '.join(got)}]")
            continue
        actions = decision.actions.expanded(test.message)
        if test.expect_actions is not None and actions != test.expect_actions:
            failures.append(f"{where}expected actions: {test.expect_actions.describe()}; "
                            f"got: {actions.describe()}")
    return failures


# The built-in rules only add labels: nothing is archived, trashed or marked
# read until the user writes a rules file that says so. STARTER_RULES_TOML is
# the one copy; the built-in rules and STARTER_RULES_JSON are read from it.
STARTER_RULES_TOML = r'''# gmail_classify rules. These are the built-in rules; edit them to taste.
#
# How rules work
#   Rules are tried in order; the first rule whose conditions all hold decides
#   what happens to a message. `continue = true` lets later rules apply as well:
#   their labels and flags are added, but the first move / archive / trash and
#   the first mark_read-or-unread / star-or-unstar choice win.
#
# Text matching (used by from, to, cc, recipient, subject, body, list_id, header)
#   "receipt"          contains "receipt", ignoring case ("STRASSE" finds "straße")
#   '/order #?\d{5}/i' a regular expression (searched anywhere); flags i m s x.
#                      Write regexes in 'single quotes' so backslashes stay as typed.
#   ["a", "b"]         any of these
#   Addresses are matched as `Display Name <user@domain>`, so both "@amazon.com"
#   and "Amazon" match "Amazon.com" <auto-confirm@amazon.com>.
#
# Conditions (every condition in a rule must hold)
#   from, to, cc         the address headers
#   recipient            To, Cc, Delivered-To or Bcc
#   subject              the Subject header
#   body                 the start of the text body (fetched only when needed)
#   list_id              the List-Id header of mailing lists
#   header               a table: { "X-Spam-Flag" = "yes", "List-Unsubscribe" = true }
#                        true = header present, false = absent, text = matches
#   larger_than          size: 500K, 5M, 1G (1K = 1024 bytes) or plain bytes
#   smaller_than         as larger_than
#   older_than           age in Gmail's units: 3d, 2w, 6m, 1y (months and years
#   newer_than             are calendar months and years back from today)
#   has_attachment       true or false
#   unread, starred      true or false
#   has_label            a label name ("Receipts", "Inbox", "Starred") or a regex
#   gmail_query          a Gmail search run by the server, e.g. "category:promotions"
#   program              a classifier: ["/usr/bin/bogofilter", "-e"] reads the message;
#                        exit 0 = match, 1 = no match, else skipped (see the README);
#                        beside it: program_input ("headers" or "message"),
#                        program_max_size ("1M"), program_timeout (10), program_path
#                        ("/usr/bin:/bin"), label_from = "program" (the label it prints)
#   any = [ {...}, {...} ]   at least one of these tables of conditions holds
#   all = [ {...}, {...} ]   every one of them holds
#   not = { ... }            this table of conditions does not hold
#
# Actions (at least one per rule)
#   label = "Name" or ["A", "B/Sub"]   add Gmail labels (created when missing)
#   move = "Folder"                    move the message to this folder / label
#   move = "Archive/{year}", label = "Vendors/{sender_domain}"
#                                      fields: {year}, {month} (received), {sender_domain}
#   archive = true                     remove it from the Inbox
#   trash = true                       move it to Trash
#   mark_read, mark_unread = true      set or clear the read state
#   star, unstar = true                set or clear the star
#   name = "..."                       shown in logs and `test` output
#   continue = true                    keep applying later rules too
#
# Connection settings may live here too (all optional):
# [account]
# user = "you@gmail.com"
# host = "imap.gmail.com"
# port = 993
# tls = "implicit"              # "implicit", "starttls" or "plaintext"
# auth = "password"             # "password" (an app password) or "xoauth2"
# password_command = ["pass", "show", "gmail-app-password"]
# cafile = "/etc/ssl/certs/ca-certificates.crt"
# folders = ["INBOX"]
# oauth_client_file = "~/client_secret.json"   # your OAuth client, for `auth`, or:
# oauth_client_id = "123-abc.apps.googleusercontent.com"
# oauth_client_secret = "GOCSPX-..."

# Google Calendar invitations and replies, by their subject prefixes.
[[rule]]
name = "Calendar"
subject = [
  '/^(new |updated )?invitation( with note)?:/i',
  '/^(accepted|declined|tentatively accepted)( with note)?:/i',
  '/^(canceled|cancelled) (event|invitation)( with note)?:/i',
]
label = "Calendar"

# Sign-in and password alerts. Phishing mail uses the same words: the label
# only groups them, it does not make them genuine.
[[rule]]
name = "Security"
subject = [
  "security alert", "new sign-in", "sign-in attempt", "new login",
  '/password (was |has been )?(changed|reset)/i', "verification code",
  "Sicherheitswarnung", "alerte de sécurité", "alerta de seguridad",
]
label = "Security"

# Receipts, invoices and order confirmations, in English, German, French,
# Spanish, Italian and Dutch. Placed before Newsletters because shops add
# List-Unsubscribe headers to their receipts.
[[rule]]
name = "Receipts"
subject = [
  "receipt", "invoice", "order confirmation", "your order", "order #",
  "payment received", "payment confirmation", "thanks for your purchase",
  "thank you for your purchase", "thank you for your order",
  "Rechnung", "Bestellbestätigung", "Ihre Bestellung", "Zahlungsbestätigung",
  "facture", "votre commande", "confirmation de commande",
  "factura", "recibo", "tu pedido", "su pedido", "confirmación de pedido",
  "ricevuta", "fattura", "il tuo ordine", "factuur", "bestelling",
]
label = "Receipts"

# Automated mail from no-reply and notification senders (GitHub, banks, apps).
[[rule]]
name = "Notifications"
from = '/no-?reply|do-?not-?reply|notifications?@/i'
label = "Notifications"

# Bulk mail: anything that carries an unsubscribe link or a mailing-list id.
[[rule]]
name = "Newsletters"
any = [
  { header = { "List-Unsubscribe" = true } },
  { header = { "List-Id" = true } },
]
label = "Newsletters"

# More examples (remove the # to use them):
#
# [[rule]]
# name = "Old and big"
# larger_than = "5M"
# older_than = "1y"
# not = { has_label = "Keep" }
# trash = true

# Tests: a sample message and the names of every rule that must match it, in
# order (expect_rules = [] for none). `check` runs them; `run --apply` refuses to
# start while one fails. A sample has from, to, cc, subject, list_id,
# headers = { "X-Mailer" = "..." }, body, size = "2M", date = "2024-03-04",
# labels = ["Receipts"], unread, starred, has_attachment = true, or instead
# eml = "sample.eml". expect_actions = { ... } checks the resulting actions too.
[[test]]
name = "A shop's receipt"
from = "Shop <orders@shop.example>"
subject = "Your receipt for order 1234"
headers = { "List-Unsubscribe" = "<mailto:unsubscribe@shop.example>" }
expect_rules = ["Receipts"]       # not Newsletters: the first match wins
expect_actions = { label = "Receipts" }
'''

_BUILTIN_DOC: Dict[str, Any] = parse_toml(STARTER_RULES_TOML)

STARTER_RULES_JSON = json.dumps(_BUILTIN_DOC, indent=2, ensure_ascii=False) + "\n"


def builtin_rules() -> Ruleset:
    """Returns the rules used when the user has no rules file (labels only)."""
    return parse_rules(_BUILTIN_DOC, "built-in rules")


# --- Rules files: writing ----------------------------------------------------------------
#
# One small writer for the files import-filters, suggest and init produce: plain data
# (str, int, bool, lists, tables) out, the same data back through load_rules. TOML gets
# comments (a header, and lines above each rule); JSON has no comments.

_TOML_WRITE_ESCAPES = {char: "\\" + code for code, char in _TOML_ESCAPES.items()}  # inverted


# What a written TOML string escapes: controls (TOML allows none raw), the quote and the
# backslash, and the characters that make a line display otherwise than it reads (as
# _UNSAFE_FOR_TERMINAL, but lone surrogates, which no TOML escape can hold).
_TOML_UNSAFE = ('\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069'
                '\ufeff\ufff9-\ufffb')
_TOML_ESCAPED = re.compile(f'[{_TOML_UNSAFE}"\\\\]')


def _toml_string(text: str) -> str:
    """A TOML string: 'literal' when that keeps backslashes readable, else "escaped"."""
    if "\\" in text and "'" not in text and not re.search(f"[{_TOML_UNSAFE}]", text):
        return f"'{text}'"
    return '"' + _TOML_ESCAPED.sub(lambda found: _TOML_WRITE_ESCAPES.get(
        found.group(), f"\\u{ord(found.group()):04x}"), text) + '"'


def _toml_key(key: str) -> str:
    return key if _TOML_BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any, indent: str = "") -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        items = [_toml_value(item, indent + "  ") for item in value]
        one_line = "[" + ", ".join(items) + "]"
        if len(one_line) <= 80 or not items:
            return one_line
        return "[\n" + "".join(f"{indent}  {item},\n" for item in items) + indent + "]"
    if isinstance(value, dict):
        return ("{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v, indent)}"
                                 for k, v in value.items()) + " }") if value else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to a rules file")


def _comment_lines(lines: Iterable[str]) -> str:
    """Comment lines for a rules file.  What they quote may come from mail (a sample
    subject, a label's name): its controls and bidi overrides are escaped (printable), so
    the file stays valid TOML and reads on a terminal as it means."""
    return "".join(f"# {printable(part)}".rstrip() + "\n"
                   for line in lines for part in str(line).splitlines() or [""])


def format_rules(doc: Mapping[str, Any], fmt: str = "toml", header: Sequence[str] = (),
                 comments: Optional[Sequence[Sequence[str]]] = None) -> str:
    """Write a rules document ({"rule": [...], "test": [...], "account": {...}}) as text.

    ``fmt`` is "toml" or "json". TOML carries ``header`` as comment lines at the top
    and ``comments[i]`` above rule i; JSON cannot hold comments and leaves them out.
    Returns text that load_rules reads back to the same document.
    """
    if fmt == "json":
        return json.dumps(dict(doc), indent=2, ensure_ascii=False) + "\n"
    if fmt != "toml":
        raise ValueError(f"unknown rules file format {fmt!r}; use toml or json")
    parts = [_comment_lines(header)] if header else []
    if doc.get("account"):
        parts.append("[account]\n" + "".join(f"{_toml_key(k)} = {_toml_value(v)}\n"
                                             for k, v in doc["account"].items()))
    for table in ("rule", "test"):
        for index, entry in enumerate(doc.get(table, ())):
            notes = comments[index] if table == "rule" and index < len(comments or ()) else ()
            parts.append(_comment_lines(notes) + f"[[{table}]]\n" + "".join(
                f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in entry.items()))
    return "\n".join(parts)


def _replace_privately(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file (0600), fsync it, rename it over ``path``, and
    fsync the directory, so a crash leaves the old file or the new one, never half of one.
    Raises OSError (the temporary file is removed).  The temporary file is a new one
    with a name no one can guess (mkstemp: O_EXCL), so a file or link planted beside
    ``path`` (``-o /tmp/rules.toml --force``) is never written through."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    try:
        try:
            data = memoryview(text.encode("utf-8"))
            while data:     # os.write may write less than it was given
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        if os.name == "posix":
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_rules_file(path: Any, text: str, force: bool = False) -> None:
    """Write a rules file created by this program; never over an existing file unless ``force``.

    The file is readable by its owner only (0600 on POSIX): a rules file may come to hold
    ``oauth_client_secret``.  Raises RulesError when the file exists (without ``force``)
    or cannot be written.
    """
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if force:
            # Replaced whole or not at all: a failed write must not cost the old rules.
            _replace_privately(path, text)
            return
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)     # ours alone (O_EXCL): leave no half-written file behind
            raise
    except FileExistsError:
        raise RulesError(f"{path} already exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise RulesError(f"cannot write {path}: {exc.strerror or exc}; choose another "
                         f"place") from None


# --- Classify pipeline -------------------------------------------------------------------
#
# For one folder: open it (EXAMINE in a dry run, so nothing can change), find the UIDs,
# fetch in batches only what the rules read, classify in memory, and act in steps (a few
# batches each, see _batches_per_step): one command per action per chunk of a compressed
# UID set, flags and labels before moves, each kind in one flight of pipelined commands
# (_WriteFlight), each flight's answers read once the next batch is classified (the moves
# sent when the labels are confirmed; the next step's labels sent behind them, so that two
# steps are under way, done in their order).  Round trips grow with N / batch size, never
# with N alone; after a step is applied only its UIDs' outcomes are kept.
#
# A Checkpoint (the state layer below supplies one that lives on disk) says where to start
# and hears, after each step the server confirmed, how far the run got: the mark, the
# highest UID below which everything is done.  Every step only plans what a message still
# needs (a label it lacks, a flag not yet set, a move while it is still here), so a run cut
# anywhere is finished by the next one without doing anything twice.

DEFAULT_BATCH = 1000     # messages per FETCH: ~0.5 MB of headers, one round trip
# Batches classified per step (changes are applied after each step); None: it grows with
# the folder (_batches_per_step).
DEFAULT_APPLY_EVERY: Optional[int] = None
# A folder's steps, when the step grows with it: about this many, of at most so many batches.
STEPS_PER_FOLDER = 8
MAX_BATCHES_PER_STEP = 4
# At most this many new folders (labels) per run unless the caller raises it: a template
# such as "Vendors/{sender_domain}" over years of mail could otherwise create hundreds.
DEFAULT_MAX_NEW_FOLDERS = 20
DEFAULT_DAILY_BUDGET = 2 * 1024 ** 3   # bytes per account per day; Gmail's limit is ~2.5 GB


def _batches_per_step(messages: int, batch_size: int) -> int:
    """How many batches a step takes when the caller leaves it to us: enough for about
    STEPS_PER_FOLDER steps, at least one, at most MAX_BATCHES_PER_STEP (what a step holds
    until it is applied is the run's memory).

    Why not a step per batch: each step moves its mail with one MOVE per destination, and a
    server pays for a MOVE in proportion to the folder it leaves (Dovecot rewrites the
    folder's index: 17 ms a MOVE at 10,000 messages, 80 ms at 40,000, see README ›
    Performance), so steps of a fixed size made a large folder's run quadratic."""
    batches = -(-messages // max(1, batch_size))
    return max(1, min(MAX_BATCHES_PER_STEP, -(-batches // STEPS_PER_FOLDER)))


class FolderLimitError(GmailClassifyError):
    """A run would create more new folders than allowed; nothing was changed."""
    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Outcome:
    """What the rules decided for one message and what changed, for reports and ``--json``.

    ``changes`` lists what the server confirmed (``applied``) or, in a dry run, what would
    change; only what the message still needed, each with its before and after::

        ({"action": "label", "label": "Receipts", "before": False, "after": True},
         {"action": "archive", "label": "\\Inbox", "before": True, "after": False})

    Moves and trash have ``before``/``after`` ``{"folder": ..., "uid": ...}`` (the new UID
    from COPYUID where the server gives one, else None); a label off Gmail is a copy with
    ``before`` None.  ``pending`` counts changes that were planned but not confirmed.
    """

    folder: str
    uid: int
    sender: str
    subject: str
    decision: Decision
    msgid: Optional[int] = None          # X-GM-MSGID, Gmail only
    uidvalidity: Optional[int] = None
    message_id: str = ""
    changes: Tuple[Dict[str, Any], ...] = ()
    applied: bool = False
    pending: int = 0


@dataclass
class FolderReport:
    """Counts for one folder run: what matched, what was (or would be) done.

    A *decision* is what the rules chose for a message ("label Bank"); a *change* is
    what the server still lacked of it.  ``changes`` counts changes only; decisions the
    server already had (the label, the flag, a copy in the label's folder off Gmail) are
    counted in ``already_done``, so the two always add up to what the rules decided.
    """

    folder: str
    applied: bool
    examined: int = 0
    matched: Dict[str, int] = field(default_factory=dict)       # rule name -> messages
    changed: Dict[str, int] = field(default_factory=dict)       # rule name -> messages changed
    changes: Dict[str, int] = field(default_factory=dict)       # "label Receipts" -> messages
    already_done: Dict[str, int] = field(default_factory=dict)  # "label Receipts" -> messages
    created: List[str] = field(default_factory=list)            # folders/labels (to be) created
    moved_missing: int = 0                                      # gone before we moved them
    expunge_stayed: List[int] = field(default_factory=list)     # copied, but a plain EXPUNGE
                                                                # left them here: not moved
    others_expunged: int = 0        # messages not ours that a plain EXPUNGE deleted for good
    skipped: List[int] = field(default_factory=list)            # UIDs left alone (run again):
    why_skipped: Dict[int, str] = field(default_factory=dict)   # the server sent far more than
                                                                # asked, or left items out
    notes: List[str] = field(default_factory=list)              # e.g. where trash goes
    content_skipped: Dict[int, str] = field(default_factory=dict)  # UID -> why: left alone
                                                                # for its content (the mark
                                                                # passes it; see ContentSkip)
    changes_made: int = 0           # changes the server confirmed (0 in a dry run)
    changes_not_made: int = 0       # planned but not confirmed when the run stopped
    start_uid: int = 0              # classified only UIDs above this (the mark)
    mark: Optional[int] = None      # highest UID below which all is done, if it moved


@dataclass
class _Plan:
    """UIDs grouped by the change they need; built while classifying, applied per step.

    ``per_uid`` lists each message's changes as keys: ``("label", name)``,
    ``("flag+", flag)``, ``("flag-", flag)``, ``("archive",)``, ``("move", folder)``,
    ``("trash",)``.
    """

    add_labels: Dict[str, List[int]] = field(default_factory=dict)
    add_flags: Dict[str, List[int]] = field(default_factory=dict)
    remove_flags: Dict[str, List[int]] = field(default_factory=dict)
    archive: List[int] = field(default_factory=list)
    move: Dict[str, List[int]] = field(default_factory=dict)
    trash: List[int] = field(default_factory=list)
    message_ids: Dict[int, str] = field(default_factory=dict)   # _message_key, off Gmail
    per_uid: Dict[int, List[Tuple[str, ...]]] = field(default_factory=dict)
    server_name: Callable[[str], str] = str                     # rule name -> server's name
    # A move destination's server name, worked out once per step, not per message.
    server_names: Dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def add(self, uid: int, actions: Actions, flags: frozenset,
            labels: Optional[frozenset], folder: str, *, in_trash: bool = False,
            in_archive: bool = False) -> bool:
        """Record only changes the message still needs, so a second run sends nothing.

        ``in_trash``/``in_archive``: the message already is where trash/archive would put
        it.  Returns True if the message needs any change at all.
        """
        keys: List[Tuple[str, ...]] = []
        for label in actions.labels:
            # Only a system label (\\Inbox) can be carried under another case (_same_label).
            if labels is None or not (label in labels or (label.startswith("\\") and any(
                    _same_label(label, have) for have in labels))):
                self.add_labels.setdefault(label, []).append(uid)
                keys.append(("label", label))
        for row in actions.flag_actions():
            if row.add and row.flag not in flags:
                self.add_flags.setdefault(row.flag, []).append(uid)
                keys.append(("flag+", row.flag))
            elif not row.add and row.flag in flags:
                self.remove_flags.setdefault(row.flag, []).append(uid)
                keys.append(("flag-", row.flag))
        if actions.trash:
            if not in_trash and not (labels is not None and
                                     any(l.lower() == "\\trash" for l in labels)):
                self.trash.append(uid)
                keys.append(("trash",))
        elif actions.move and not _same_folder(self._server_name(actions.move), folder):
            self.move.setdefault(actions.move, []).append(uid)
            keys.append(("move", actions.move))
        elif actions.archive and not in_archive and _in_inbox(folder, labels):
            self.archive.append(uid)
            keys.append(("archive",))
        if keys:
            self.per_uid[uid] = keys
        return bool(keys)

    def _server_name(self, name: str) -> str:
        known = self.server_names.get(name)
        if known is None:
            known = self.server_names[name] = self.server_name(name)
        return known

    @staticmethod
    def decided(actions: Actions) -> List[Tuple[str, ...]]:
        """The keys of everything ``actions`` ask for, needed or not (see add): the
        decision, of which the plan keeps only the changes."""
        keys: List[Tuple[str, ...]] = [("label", label) for label in actions.labels]
        keys += [("flag+" if row.add else "flag-", row.flag) for row in actions.flag_actions()]
        if actions.trash:
            keys.append(("trash",))
        elif actions.move:
            keys.append(("move", actions.move))
        elif actions.archive:
            keys.append(("archive",))
        return keys

    def drop_label(self, label: str, uids: Iterable[int]) -> None:
        """Forget a planned label for ``uids`` (off Gmail: that folder already holds them)."""
        gone = set(uids)
        self.add_labels[label] = [uid for uid in self.add_labels.get(label, []) if uid not in gone]
        if not self.add_labels[label]:
            del self.add_labels[label]
        for uid in gone:
            self.per_uid[uid] = [k for k in self.per_uid.get(uid, []) if k != ("label", label)]
            if not self.per_uid[uid]:
                del self.per_uid[uid]

    def drop_uids(self, uids: Iterable[int]) -> None:
        """Forget every change planned for ``uids``: they are left alone this step."""
        gone = set(uids)
        if not gone:
            return
        for table in (self.add_labels, self.add_flags, self.remove_flags, self.move):
            for name in list(table):
                table[name] = [uid for uid in table[name] if uid not in gone]
                if not table[name]:
                    del table[name]
        self.archive[:] = [uid for uid in self.archive if uid not in gone]
        self.trash[:] = [uid for uid in self.trash if uid not in gone]
        for uid in gone:
            self.per_uid.pop(uid, None)

    def size(self) -> int:
        """How many single changes (one message, one label or flag or move) are planned."""
        return sum(len(keys) for keys in self.per_uid.values())

    def changes(self) -> Dict[str, int]:
        counts = {f"label {label}": len(uids) for label, uids in self.add_labels.items()}
        for kind, flags in (("flag+", self.add_flags), ("flag-", self.remove_flags)):
            for flag, uids in flags.items():
                counts[_flag_action(kind, flag).words] = len(uids)
        if self.archive:
            counts["archive"] = len(self.archive)
        for folder, uids in self.move.items():
            counts[f"move to {folder}"] = len(uids)
        if self.trash:
            counts["trash"] = len(self.trash)
        return counts


def _in_inbox(folder: str, labels: Optional[frozenset]) -> bool:
    """Whether archive would take a message out of the Inbox: on Gmail, a message carrying
    \\Inbox (whatever folder view it was found in); elsewhere, a message in INBOX itself."""
    return (_same_folder(folder, "INBOX") if labels is None
            else any(label.lower() == "\\inbox" for label in labels))


def _same_folder(a: str, b: str) -> bool:
    return a == b or (a.upper() == "INBOX" and b.upper() == "INBOX")


def _same_label(wanted: str, have: str) -> bool:
    if wanted.startswith("\\") or have.startswith("\\"):
        return wanted.lower() == have.lower()
    return wanted == have


def _fetch_items(needs: Needs, gmail: bool, apply: bool = False) -> List[str]:
    """What one batch's FETCH asks for: what the rules read, and with ``apply`` the size
    and INTERNALDATE the intent records carry (undo tells the run's own copy by them)."""
    fields = " ".join(sorted(h.upper() for h in needs.headers))
    items = ["FLAGS", f"BODY.PEEK[HEADER.FIELDS ({fields})]"]
    items += [datum.item for datum in _MESSAGE_DATA
              if getattr(needs, datum.need) or (apply and datum.recorded)]
    if gmail:
        items += ["X-GM-LABELS", "X-GM-MSGID"]
    return items


def _data_later(rules: Ruleset, needs: Needs, gmail: bool) -> Tuple[_MessageDatum, ...]:
    """The message data (rows of _MESSAGE_DATA marked ``later``) a run fetches only for the
    messages whose rules come to it, once the batch's other messages are decided on what
    its FETCH brought: a BODYSTRUCTURE costs the server, the wire and the reader more than
    the headers, and `has_attachment` mostly stands in an `all` beside a size, an age or
    a sender that most mail fails.

    Only where the decisions and their reasons cannot differ from fetching it up front:
    every condition that reads it stands in an `all` beside other parts and under no `any`
    (an `all` with a part false is false, with the same reason, whatever the datum says; an
    `any` would give the reason of another part), every rule only reads the message (a
    program would run twice), nothing else may be unknown at first (no body rule; off
    Gmail, no label rule: the labels are unknown there), so a message is decided at once
    exactly when no rule reached the missing datum.  ``needs``: the rules' own."""
    conditions = [rule.condition for rule in rules.rules]
    if needs.body or needs.whole or (needs.labels and not gmail) or \
            not all(map(_decides_quietly, conditions)):
        return ()
    return tuple(datum for datum in _MESSAGE_DATA
                 if datum.later and getattr(needs, datum.need)
                 and all(_can_wait(condition, datum.need) for condition in conditions))


def _can_wait(condition: Condition, need: str, beside: bool = False) -> bool:
    """Whether every part of ``condition`` that reads ``need`` (a Needs field) stands in an
    `all` beside other parts (``beside``: its parent is one), under no `any` (_data_later)."""
    if not any(getattr(part.needs(), need) for part in _walk(condition)):
        return True
    if isinstance(condition, AnyOf):
        return False
    if isinstance(condition, AllOf):
        return all(_can_wait(part, need, len(condition.parts) > 1) for part in condition.parts)
    if isinstance(condition, Not):
        return _can_wait(condition.part, need, beside)
    return beside and not condition.children()


def _folder_label(folder: str) -> Optional[str]:
    """The Gmail label a folder view stands for: INBOX is \\Inbox, [Gmail]/... are none."""
    if folder.upper() == "INBOX":
        return "\\Inbox"
    return None if folder.startswith("[") else folder


def _message_info(uid: int, values: Mapping[str, Any], header_item: str,
                  queries: Optional[Dict[str, set]], folder: str) -> MessageInfo:
    labels = values.get("X-GM-LABELS")
    # Gmail has been seen to leave the selected folder's own label out of X-GM-LABELS;
    # a message listed in a folder view certainly carries that folder's label.
    own = _folder_label(folder)
    if labels is not None and own is not None:
        labels = tuple(labels) + (own,)
    data = {datum.field: None if values.get(datum.item) is None else datum.read(values[datum.item])
            for datum in _MESSAGE_DATA}
    return MessageInfo._made(
        headers=parse_headers(values.get(header_item) or b""),
        uid=uid,
        flags=frozenset(values.get("FLAGS") or ()),
        labels=None if labels is None else frozenset(labels),
        queries=None if queries is None else frozenset(q for q, hits in queries.items() if uid in hits),
        folder=folder, body=None, source=None, programs={},
        **data,
    )


def run_programs(rules: Ruleset, messages: Iterable[MessageInfo], *, jobs: Optional[int] = None,
                 now: Optional[datetime] = None,
                 hold: Optional[Callable[[MessageInfo, ProgramCondition], bool]] = None,
                 ) -> List[MessageInfo]:
    """Run the programs the rules will ask about these messages, up to ``jobs`` at once
    (default: the CPU count) across messages, so that classify() then finds their answers.

    Rounds: each message is classified as far as it goes without a program's answer; the
    program it waits for (one per message, in the first rule not yet decided: never one
    past a rule that decided) runs; again until none waits.  A program's failure is kept
    and raised by classify() only when its rule is reached.  A message whose next program
    ``hold(message, condition)`` holds back (it wants the whole message, say) is left
    there and returned, for a caller that fetches more and calls again."""
    waiting = list(messages) if rule_programs(rules) else []
    held: List[MessageInfo] = []
    now = now or datetime.now(timezone.utc)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        while waiting:
            asks: List[Tuple[MessageInfo, ProgramCondition]] = []
            _program_planning.on = True
            try:
                for msg in waiting:
                    try:
                        rules.classify(msg, final=True, now=now)
                    except _ProgramWanted as wanted:
                        if hold is not None and hold(msg, wanted.condition):
                            held.append(msg)
                        else:
                            asks.append((msg, wanted.condition))
                    except GmailClassifyError:
                        pass            # classify() raises it again, where it is called
            finally:
                _program_planning.on = False
            futures = [(msg, cond, pool.submit(cond.run, msg)) for msg, cond in asks]
            for msg, cond, future in futures:
                msg.programs[cond] = future.result()   # a RulesError (trust) goes up
            waiting = [msg for msg, _ in asks]
    return held


def _wants_whole(msg: MessageInfo, condition: ProgramCondition) -> bool:
    """Whether ``condition`` reads the whole message and ``msg`` came only in part (its
    body prefix), while not so large that the program would skip it anyway."""
    size = msg.size
    return (condition.input == "message" and (size is None or len(msg.source or b"") < size)
            and (size is None or size <= condition.max_size))


class RunStopped(GmailClassifyError):
    """A Checkpoint ended the run at a safe point: the daily download budget, a signal.

    Raised once the changes already planned were applied and confirmed, so the next run
    carries on from the mark; the command line exits 6 (incomplete, run again).
    """
    exit_code = EXIT_INCOMPLETE


class Checkpoint:
    """The hooks classify_folder calls to learn where to start and to report its progress.

    This base keeps nothing, so every run classifies the whole folder.  The state layer's
    Run keeps a mark per account, host and folder on disk; a long-running loop may pass the
    same object to classify_folder again and again.
    """

    writes_ahead = False    # True: wants intend() before each step's write commands
    # How many FETCH answers may still be on their way when before_fetch() approves the
    # next one (so many are pipelined; classify_folder sets it), and what the first may
    # bring before any has come (a batch's worth of FETCH_GUESS).
    fetches_ahead = 1
    first_fetch_guess = 0

    def start(self, conn: GmailConnection, status: FolderStatus) -> int:
        """Returns the mark for the folder just opened: only UIDs above it are classified."""
        return 0

    def leave_alone(self, status: FolderStatus) -> Tuple[frozenset, frozenset]:
        """(UIDs, X-GM-MSGIDs) of the folder just opened not to classify: messages an undo
        restored while the rules are still those of the undone run."""
        return frozenset(), frozenset()

    def unfinished(self, status: FolderStatus, kind: str) -> Mapping[int, Any]:
        """UID -> what a step that did not end kept of the folder's message (keep_unfinished)
        under ``kind``, a row of _UNFINISHED: the flags and labels the rules judged it by
        ("found"), the COPY of a move without MOVE that may have been made ("copies")."""
        return {}

    def keep_unfinished(self, conn: GmailConnection, status: FolderStatus, kind: str,
                        entries: Mapping[int, Any]) -> None:
        """With ``apply``, before the changes they are about: what the next run must know of
        these messages should the step not end (see unfinished).  Must make it durable
        before returning; kept until a run's mark passes the messages (finished) or an
        undo takes the run back."""

    def finished(self, status: FolderStatus, mark: int, start: int = 0) -> None:
        """With ``apply``, before step_done: every message this run classified, above
        ``start`` (where it began: 0 with --all) and up to ``mark``, is settled, so what
        keep_unfinished kept of them can go; what lies below ``start`` waits for the run
        that classifies it again (a stopped --all run's, for the next --all).  A --since
        or --limit run reaches no mark: what it kept stays for the next full run."""

    def before_fetch(self, conn: GmailConnection) -> None:
        """Called before each FETCH batch; raise RunStopped to end the run here."""

    def may_download(self, conn: GmailConnection, expected: int) -> bool:
        """Whether a FETCH of at most ``expected`` bytes within a batch (message bodies)
        may go out; if not, its messages are skipped and the run ends at the next
        before_fetch."""
        return True

    def content_skipped(self, status: FolderStatus, skips: Mapping[int, str]) -> None:
        """Messages (UID -> why) left alone for their content this step (see ContentSkip);
        called before ``step_done`` lets the mark pass them."""

    def intend(self, conn: GmailConnection, entries: Sequence[Dict[str, Any]]) -> None:
        """With ``apply``, before a step's write commands go out (see _FolderRun._intents):
        what they may change.  Must make it durable before returning (write-ahead)."""

    def not_sent(self, conn: GmailConnection, entries: Sequence[Dict[str, Any]]) -> None:
        """A stop between commands ended the step: these intended changes (the same shape
        as ``intend``'s) were never sent, so they are known not made."""

    def confirmed(self, conn: GmailConnection, entry: Dict[str, Any]) -> None:
        """With ``apply``, as the server answers each write command the step's intents
        announced: what it confirmed (see _done_entry).  Need not be durable at once."""

    def step_done(self, conn: GmailConnection, status: FolderStatus, mark: Optional[int],
                  outcomes: Sequence[Outcome]) -> None:
        """A step ended; ``outcomes`` carry what the server confirmed (in a dry run: what
        would change).  Every selected UID up to ``mark`` is done; ``mark`` is None when
        the mark must not move (a ``since``/``limit`` run, or a step cut short)."""


def describe_change(change: Mapping[str, Any]) -> str:
    """One change record as words: ``"label Receipts"``, ``"move to Lists"``, ``"trash"``."""
    action = change.get("action", "")
    if action == "label":
        return f"label {change.get('label')}"
    if action == "unlabel":
        return f"remove label {change.get('label')}"
    if action in ("move", "move back"):
        return f"{action} to {(change.get('after') or {}).get('folder')}"
    return str(action)


def _change_entry(key: Tuple[str, ...], uid: int, status: FolderStatus, gmail: bool,
                  destinations: Mapping[str, Optional[str]], extra: Any) -> Dict[str, Any]:
    """The record of one change (see Outcome), from a plan key and what the server said."""
    kind = key[0]
    if kind == "label":
        if gmail:
            return {"action": "label", "label": key[1], "before": False, "after": True}
        return {"action": "label", "label": key[1], "before": None,
                "after": extra or {"folder": key[1], "uid": None}}
    if kind in ("flag+", "flag-"):
        on = kind == "flag+"
        return {"action": _flag_action(kind, key[1]).words, "flag": key[1], "before": not on,
                "after": on}
    if kind == "archive" and gmail:
        return {"action": "archive", "label": "\\Inbox", "before": True, "after": False}
    destination = key[1] if kind == "move" else destinations.get(kind)
    return {"action": kind,
            "before": {"folder": status.name, "uid": uid, "uidvalidity": status.uidvalidity},
            "after": extra or {"folder": destination, "uid": None}}


class _Shown:
    """What a step keeps of a classified message for its records, instead of the whole
    MessageInfo (whose parsed headers are most of a run's memory): From, Subject and
    Message-ID decoded once, the size and INTERNALDATE."""

    __slots__ = ("sender", "subject", "message_id", "size", "date")

    def __init__(self, info: MessageInfo) -> None:
        self.sender, self.subject, self.message_id = _shown_headers(info.headers)
        self.size, self.date = info.size, info.date


@dataclass
class _Step:
    """The batches classified since the last apply: their plan and what to report."""

    plan: _Plan = field(default_factory=_Plan)
    infos: Dict[int, _Shown] = field(default_factory=dict)
    decisions: Dict[int, Decision] = field(default_factory=dict)
    msgids: Dict[int, Optional[int]] = field(default_factory=dict)
    last_uid: Optional[int] = None
    finished: bool = False
    content_skips: Dict[int, str] = field(default_factory=dict)   # UID -> why (ContentSkip)
    # The lowest UID still waiting for data asked later (_Waiting) when the step ended:
    # the step's mark stays below it.
    waiting_from: Optional[int] = None
    # What the server confirmed of the step's changes: (UID, _Plan key) -> the answer.
    confirmed: Dict[Tuple[int, Tuple[str, ...]], Any] = field(default_factory=dict)
    # With rules that test what they change: UID -> (flags, labels, searches found by)
    # each message was judged by, of which _FolderRun.intend keeps what its changes touch.
    found: Dict[int, Tuple[Any, ...]] = field(default_factory=dict)


class _Waiting:
    """Messages of a batch that the rules could not decide without data asked for later
    (_data_later): the FETCH of that data is on its way (``read`` reads its answer), and
    ``due`` is the batch after whose answer it comes (see _FolderRun.classify_all)."""

    __slots__ = ("infos", "shown", "msgids", "read", "due")

    def __init__(self, infos: Dict[int, MessageInfo], shown: Dict[int, _Shown],
                 msgids: Dict[int, Any], read: Callable[[], Dict[int, Dict[str, Any]]],
                 due: int) -> None:
        self.infos, self.shown, self.msgids, self.read, self.due = infos, shown, msgids, read, due


class _StepWrites:
    """A step whose changes are under way (see _FolderRun.finish): the generator carrying
    them out (_apply_plan), whether the flight it last sent is the step's last, and how
    they ended (None while under way, else whether every change was made).  As
    _apply_plan's ``hooks`` it is the run's, told which step they are for."""

    __slots__ = ("run", "step", "writes", "last", "ended", "flight")

    def __init__(self, run: "_FolderRun", step: _Step) -> None:
        self.run, self.step = run, step
        self.writes = run._apply_step(self)
        self.last = False
        self.ended: Optional[bool] = None
        self.flight: Optional[_WriteFlight] = None      # on the wire (see _on_the_wire)

    def copies_into(self, labels: Iterable[str]) -> bool:
        """Whether the flight on the wire copies mail (off Gmail, a label is a copy) into
        the folder of one of ``labels``."""
        wanted = set(labels)
        return self.flight is not None and any(
            write.command == "UID COPY" and write.key[1] in wanted
            for write in self.flight.writes)

    def intend(self, phase: str, folders: Sequence[str]) -> None:
        self.run.intend(self.step, phase, folders)

    def done(self, key: Tuple[str, ...], result: Mapping[int, Any]) -> None:
        self.run.done(self.step, key, result)

    def uidnext(self, folder: str) -> Optional[int]:
        return self.run.uidnext(folder)

    def copying(self, destination: str, uids: Sequence[int]) -> Dict[int, Optional[int]]:
        return self.run.copying(destination, uids)

    def refused(self) -> None:
        self.run.refused(self.step)


def _folder_hint(conn: GmailConnection, folder: str) -> str:
    """"did you mean 'Receipts'?" for a misspelt folder, else where to find the names."""
    names: List[str] = []
    with contextlib.suppress(GmailClassifyError):
        names = [f.name for f in conn.list_folders() if f.selectable]
    by_key = {name.casefold(): name for name in names}
    close = [] if folder in names else difflib.get_close_matches(folder.casefold(),
                                                                 list(by_key), n=1, cutoff=0.6)
    if close:
        return f"did you mean {by_key[close[0]]!r}? (the 'labels' command lists them all)"
    return "the 'labels' command lists the folder names"


# What each fetched item is called when a message is skipped for lacking it.
_ITEM_NAMES = {"FLAGS": "flags", "X-GM-LABELS": "labels", "X-GM-MSGID": "message id",
               **{datum.item: datum.lacked for datum in _MESSAGE_DATA}}


def _lacking(items: Sequence[str], values: Optional[Mapping[str, Any]]) -> str:
    """Why a message cannot be classified, or "" when every requested item came back."""
    if values is None:
        return "the server sent nothing for it (deleted meanwhile?)"
    absent = [item for item in items if values.get(item) is None]
    if not absent:
        return ""
    names = [_ITEM_NAMES.get(item.upper(), "headers" if "HEADER" in item.upper()
                             else "body prefix") for item in absent]
    return "the server's answer lacked its " + ", ".join(names)


def _unusable(uid: int, items: Sequence[str], fetched: Mapping[int, Mapping[str, Any]],
              oversized: set) -> str:
    """Why the FETCH answer ``fetched`` gives nothing to judge message ``uid`` on (a
    literal dropped as oversized, or one of ``items`` lacking: see _lacking), or ""."""
    if uid in oversized:
        return "the server sent far more than was asked for"
    return _lacking(items, fetched.get(uid))


@dataclass(frozen=True)
class _Destinations:
    """What the rules need from the server, settled before anything changes."""

    trash: Optional[Folder] = None
    archive: Optional[Folder] = None      # off Gmail only: Gmail archives by label
    plain_expunge: bool = False           # moving off this server needs a checked EXPUNGE
    notes: Tuple[str, ...] = ()


def _settle(conn: GmailConnection, rules: Ruleset, allow_expunge: bool) -> _Destinations:
    """Check, before the first change and the same way in a dry run, everything the rules'
    actions need from this server: a way to move (MOVE, UIDPLUS or an allowed plain
    EXPUNGE) and the trash and archive folders.  Raises CapabilityError naming what is
    missing and what to do; nothing has been changed then."""
    actions = [rule.actions for rule in rules.rules]
    trash = any(a.trash for a in actions)
    archive = any(a.archive for a in actions) and not conn.is_gmail
    moves = trash or archive or any(a.move for a in actions)
    if moves and not conn.can_move(allow_expunge):
        raise conn.refuse_moves()
    found: Dict[str, Folder] = {}
    notes: List[str] = []
    for use, action, wanted in (("\\Trash", "trash", trash), ("\\Archive", "archive", archive)):
        if not wanted:
            continue
        folder = _special_destination(conn, use, action)
        if (folder.special_use or "").lower() != use.lower():
            notes.append(f"{action} goes to {folder.name!r}: no folder is marked {use}, so it "
                         f"was chosen by its name")
        found[action] = folder
    plain = moves and not conn.can_move()
    return _Destinations(found.get("trash"), found.get("archive"), plain, tuple(notes))


def check_run(conn: GmailConnection, rules: Ruleset, folders: Sequence[str], *,
              allow_expunge: bool = False) -> None:
    """Before a run over several folders changes anything: what classify_folder checks
    for each folder before its first change (a way to move, trash and archive folders,
    and, where moves need a plain EXPUNGE, no other message marked \\Deleted), checked
    for all of them.  Folders that cannot be opened are left for classify_folder to report.
    Raises CapabilityError."""
    if _settle(conn, rules, allow_expunge).plain_expunge:
        _check_plain_expunges(conn, (conn.server_name(folder) for folder in folders))


@dataclass(frozen=True)
class RunOptions:
    """The settings a run or a watch keeps from start to end (Run, WatchSession): dry run
    unless ``apply``; ``reclassify`` (``--all``) and ``new_only`` (``--new-only``);
    ``since``/``limit`` narrow a folder's messages; ``batch_size`` messages per FETCH,
    ``apply_every`` batches per step (None: _batches_per_step); ``max_new_folders`` (None:
    no limit), and past it ``hold`` the messages that need more (a watch) rather than stop;
    ``allow_expunge`` (a checked plain EXPUNGE where moves need one); ``daily_budget``
    bytes downloaded per account and day (None: no limit); ``account_name``, see below."""
    apply: bool = False
    reclassify: bool = False
    new_only: bool = False
    since: Optional[_dt.date] = None
    limit: Optional[int] = None
    batch_size: int = DEFAULT_BATCH
    apply_every: Optional[int] = DEFAULT_APPLY_EVERY
    max_new_folders: Optional[int] = DEFAULT_MAX_NEW_FOLDERS
    hold: bool = False
    allow_expunge: bool = False
    daily_budget: Optional[int] = DEFAULT_DAILY_BUDGET
    jobs: Optional[int] = None      # programs run at once (run_programs); None: the CPU count
    # The [[account]] table's name, kept in every record as "account_name" (records stay
    # keyed by user, host and port: renaming a table hides none of its runs).
    account_name: Optional[str] = None


def classify_folder(conn: GmailConnection, rules: Ruleset, folder: str = "INBOX", *,
                    apply: bool = False, since: Optional[_dt.date] = None,
                    limit: Optional[int] = None, batch_size: int = DEFAULT_BATCH,
                    on_message: Optional[Callable[[Outcome], None]] = None,
                    on_progress: Optional[Callable[[int, int], None]] = None,
                    now: Optional[_dt.datetime] = None,
                    on_applied: Optional[Callable[[int, int], None]] = None,
                    checkpoint: Optional[Checkpoint] = None,
                    apply_every: Optional[int] = DEFAULT_APPLY_EVERY,
                    report: Optional[FolderReport] = None,
                    max_new_folders: Optional[int] = DEFAULT_MAX_NEW_FOLDERS,
                    allow_expunge: bool = False, jobs: Optional[int] = None,
                    hold: bool = False) -> FolderReport:
    """Classify the messages of ``folder`` above the checkpoint's mark (without a
    checkpoint: all of them), or only those since ``since``; the newest ``limit``.

    Dry run unless ``apply``: the folder is opened with EXAMINE and nothing is written.
    With ``apply`` the changes are made after every ``apply_every`` batches (None: a number
    that grows with the folder, _batches_per_step), and the checkpoint hears of each step
    the server confirmed.  ``on_message`` receives an Outcome
    per message when its step is done (with ``apply``: after the server confirmed its
    changes); ``on_progress(done, total)`` is called per batch classified; with ``apply``,
    ``on_applied(done, total)`` counts changes as they are made (``total``: those planned
    so far).  Pass your own ``report`` to keep the counts of a run that raises.  Returns
    the FolderReport.  Off Gmail, gmail_query conditions drop out (see Ruleset.local; a
    warning per rule).  Templated destinations are filled in per message; with ``apply``,
    a step that would take the folders created past ``max_new_folders`` (None: no limit)
    raises FolderLimitError before any of its changes; with ``hold`` (a watch, which must
    not end for what senders write) it leaves alone the messages that need the folders
    past the limit (``report.skipped``: run again) and makes the others' changes.  Raises
    RunStopped when the
    checkpoint ends the run, and the connection's errors.

    Any server: every check ``apply`` makes before its first change (a way to move, trash
    and archive folders) is made in a dry run too, with the same CapabilityError.  Folder
    names are written with ``/`` and mapped to the server's namespace
    (GmailConnection.server_name).  ``allow_expunge`` lets moves use a checked plain
    EXPUNGE on servers with neither MOVE nor UIDPLUS (see GmailConnection.move).  A message
    whose FETCH answer lacks anything the rules read is never acted on: it is listed in
    ``report.skipped`` with the reason in ``report.why_skipped`` (run again).  A folder
    that cannot be opened raises FolderUnavailableError.  The rules' programs run up to
    ``jobs`` at once (run_programs); one that fails on a message skips it (run again).
    """
    options = RunOptions(apply=apply, since=since, limit=limit, batch_size=batch_size,
                         apply_every=apply_every, max_new_folders=max_new_folders,
                         hold=hold, allow_expunge=allow_expunge, jobs=jobs)
    run = _FolderRun(conn, rules, folder, options,
                     checkpoint if checkpoint is not None else Checkpoint(),
                     report if report is not None else FolderReport(folder, apply),
                     now, _Listeners(on_message, on_progress, on_applied))
    run.open()
    run.classify_all()
    return run.report


@dataclass(frozen=True)
class _Listeners:
    """classify_folder's callers' ears: see its docstring."""
    on_message: Optional[Callable[[Outcome], None]] = None
    on_progress: Optional[Callable[[int, int], None]] = None
    on_applied: Optional[Callable[[int, int], None]] = None


class _FolderRun:
    """One classify_folder call: ``open()`` the folder and find its messages, then
    ``classify_all()``: batches fetched and classified (``classify``), their changes made
    in steps (``finish``) that tell the checkpoint what the server confirmed.  As the
    ``hooks`` of _apply_plan for a step under way (``intend``, ``done``, ``uidnext``,
    ``refused``: see there, reached through the step's _StepWrites) it writes the intents
    and counts the confirmations."""

    def __init__(self, conn: GmailConnection, rules: Ruleset, folder: str, options: RunOptions,
                 checkpoint: Checkpoint, report: FolderReport, now: Optional[_dt.datetime],
                 listeners: _Listeners) -> None:
        self.conn, self.rules, self.folder, self.options = conn, rules, folder, options
        self.checkpoint, self.report, self.now, self.listeners = checkpoint, report, now, listeners
        self.apply = options.apply
        self.copies: Dict[str, set] = {}    # off Gmail: label folder -> _message_key of its mail
        # Destinations' UIDVALIDITY and UIDNEXT for the intent records: one STATUS per folder
        # run, UIDNEXT then moved past the UIDs the server reported (an older UIDNEXT only
        # widens the range undo searches, where Message-ID, size and date must still agree).
        self.places: Dict[str, Dict[str, Optional[int]]] = {}
        self.applied = self.planned = 0     # changes made, changes planned: for on_applied
        self.step = self.new_step()         # the step in hand
        # Batches read so far, and how many FETCHes are sent ahead (see classify_all).
        self.batches, self.ahead = 0, 1
        # The steps whose writes are under way, or ended and waiting for one before them to
        # end (see finish), oldest first; whether one ended with changes not made, which
        # holds the mark where it was for the rest of the run.
        self.writing: List[_StepWrites] = []
        self.behind = False
        # _Plan.decided() of each distinct Actions of the run, by identity (_decided_keys);
        # the names of decided changes already made (_decided_name).
        self.decided_keys: Dict[int, Tuple[Actions, Tuple[Tuple[str, ...], ...]]] = {}
        self.decided_names: Dict[Tuple[str, ...], str] = {}

    # -- opening the folder ---------------------------------------------------------------

    def open(self) -> None:
        """Settle the destinations, open the folder, find the messages to classify."""
        conn, folder = self.conn, self.folder
        if self.rules.needs.queries and not conn.is_gmail:
            self.rules, notes = self.rules.local()
            for note in notes:
                log.warning("%s: %s (%s is not Gmail)", self.rules.source, note, conn.host)
        self.separator = next((f.delimiter for f in conn.list_folders() if f.delimiter), "/") \
            if any(rule.actions.templates() for rule in self.rules.rules) else None
        conn.stop.check(f"before opening {folder}")     # a safe point: nothing sent yet
        self.settled = settled = _settle(conn, self.rules, self.options.allow_expunge)
        self.report.notes.extend(note for note in settled.notes if note not in self.report.notes)
        self.source = source = conn.server_name(folder)
        try:
            self.status = conn.select(source) if self.apply else conn.examine(source)
        except ImapError as exc:
            if exc.status not in ("NO", "BAD"):
                raise
            raise FolderUnavailableError(
                f"cannot open folder {folder!r}: {exc.text or exc}; {_folder_hint(conn, source)}",
                command=exc.command, status=exc.status, code=exc.code, text=exc.text) from exc
        log.info("%s: %d messages (UIDVALIDITY %d)", source, self.status.exists,
                 self.status.uidvalidity)
        self.uids, above = self._search()
        self.queries = {query: set(conn.search(above or ["ALL"], gmail_raw=query))
                        for query in self.rules.needs.queries} if conn.is_gmail else None
        found = {"trash": settled.trash, "archive": settled.archive}
        self.destinations = {action: f.name for action, f in found.items() if f is not None}
        self.in_trash, self.in_archive = (f is not None and _same_folder(f.name, source)
                                          for f in found.values())
        needs = self.rules.needs        # worked out once: it walks every rule's conditions
        # Data fetched only for the messages whose rules reach it (_data_later): they wait
        # for it (see classify_all), so the rules' first look leaves them undecided.
        self.later = _data_later(self.rules, needs, conn.is_gmail)
        self.waiting: List[_Waiting] = []
        # No body prefix or later data to wait for: decide on the headers.
        self.final = not needs.body and not self.later
        later = {datum.item for datum in self.later}
        self.items = [item for item in _fetch_items(needs, conn.is_gmail,
                                                    self.apply and self.checkpoint.writes_ahead)
                      if item not in later]
        self.header_item = self.items[1]

    def _search(self) -> Tuple[List[int], List[Any]]:
        """The UIDs to classify, and the SEARCH key for those above the mark."""
        conn, options = self.conn, self.options
        start = max(0, self.checkpoint.start(conn, self.status))
        self.report.start_uid = start
        above: List[Any] = ["UID", f"{start + 1}:*"] if start else []
        criteria = above + (["SINCE", options.since] if options.since else [] if above
                            else ["ALL"])
        # "UID N:*" always matches the highest UID, even when it is below N (RFC 3501 §6.4.8).
        uids = [uid for uid in conn.search(criteria) if uid > start]
        # Restored by an undo of a run with these same rules: classifying them again would
        # only redo what was undone (change the rules, or --all, to have them classified).
        undone_uids, self.undone_msgids = self.checkpoint.leave_alone(self.status)
        if undone_uids:
            kept = [uid for uid in uids if uid not in undone_uids]
            if len(kept) < len(uids):
                log.info("%s: %d message(s) an undo restored are left alone (same rules as "
                         "the undone run)", self.source, len(uids) - len(kept))
            uids = kept
        self._read_unfinished()
        self.narrowed = options.since is not None or options.limit is not None
        if options.limit is not None:
            uids = uids[-options.limit:] if options.limit > 0 else []
        return uids, above

    def _read_unfinished(self) -> None:
        """What runs that did not end kept for this one (Checkpoint.unfinished).  Rules
        that test a flag or label they change judge the messages a stopped run changed
        part way as that run found them (``as_found``), so that a rerun decides as the
        uncut run did, and keep the same for a run after this one (``keeps_found``); moves
        without MOVE look first for the copies a stopped run may have made (copying)."""
        self.state_read = self.rules.state_read()
        self.labels_read: Dict[str, bool] = {}              # see read_label
        self.state_queries = self.rules.state_queries()
        loops = bool(self.state_read)
        self.as_found = self.checkpoint.unfinished(self.status, "found") if loops else {}
        self.keeps_found = loops and self.apply and self.checkpoint.writes_ahead
        self.current: Dict[int, Tuple[Optional[frozenset], Optional[frozenset]]] = {}
        self.earlier_copies = self.checkpoint.unfinished(self.status, "copies")
        # A stopped --all leaves them below the mark (a run's own mark stops below what it
        # left part done; --new-only passes it): a run that starts above them does not
        # reach them, so it says so.
        start = self.report.start_uid
        below = {uid for kind in _UNFINISHED for uid in self.checkpoint.unfinished(
            self.status, kind) if uid <= start} if start else ()
        if below:
            self.report.notes.append(
                f"a stopped run left {_plural(len(below), 'message')} part done "
                f"below where this run starts (UID {compress_uids(sorted(below))}): run "
                f"with --all to finish them")
        if self.earlier_copies and self.conn.has("MOVE"):   # a server upgraded meanwhile
            places = sorted({str(kept.get("to")) for kept in self.earlier_copies.values()})
            log.warning("%s: a run that stopped may have copied %d message(s) to %s without "
                        "finishing their move; this server now moves with MOVE, so such "
                        "copies stay there: look for them", self.source,
                        len(self.earlier_copies), ", ".join(places))
            self.earlier_copies = {}

    # -- the batches ----------------------------------------------------------------------

    def new_step(self) -> _Step:
        return _Step(plan=_Plan(server_name=self.conn.server_name))

    def before_fetch(self, conn: GmailConnection) -> None:
        conn.stop.check("before the next FETCH")       # a safe point (see Stop)
        self.checkpoint.before_fetch(conn)

    def classify_all(self) -> None:
        """Every batch, a step after every ``apply_every`` of them, and the last step."""
        uids, size, report = self.uids, self.options.batch_size, self.report
        every = self.options.apply_every or _batches_per_step(len(uids), size)
        # The FETCHes of a step's worth of batches are on the wire while one is classified
        # (pipelining): the server has answered them before the step's writes, which it
        # then carries out while that many batches are classified.  The checkpoint still
        # approves each FETCH before it goes out, knowing how many may be unanswered.
        self.checkpoint.fetches_ahead = self.ahead = max(1, every)
        self.checkpoint.first_fetch_guess = min(size, len(uids)) * FETCH_GUESS
        fetches = self.conn.fetch_batches([uids[i:i + size] for i in range(0, len(uids), size)],
                                          self.items, ahead=self.ahead,
                                          before_each=self.before_fetch, skipped=report.skipped)
        starts = range(0, len(uids), size)
        try:
            for batches, start_index in enumerate(starts, 1):
                try:
                    batch, fetched = next(fetches)
                except RunStopped:
                    self.finish(self.step)
                    self.land()
                    raise
                self.batches = batches
                self.decide_waiting(batches)
                self.classify(batch, fetched)
                if batches == len(starts):  # nothing comes after: the last step decides all
                    self.decide_waiting(None)
                    # A UID below the folder's UIDNEXT that the search did not return is
                    # gone (new mail comes above it): the mark may pass it, so a run whose
                    # last message left meanwhile (moved by a run cut before its answer)
                    # ends where a run that moved it itself ends.
                    uidnext = self.status.uidnext
                    if uidnext and self.step.last_uid is not None:
                        self.step.last_uid = max(self.step.last_uid, uidnext - 1)
                if self.listeners.on_progress is not None:
                    self.listeners.on_progress(min(start_index + size, len(uids)), len(uids))
                if batches % max(1, every) == 0:
                    self.finish(self.step)
                    self.step = self.new_step()
                else:
                    self.advance()      # the server has had a batch's time for its flight
            self.finish(self.step)
            self.land()
        except BaseException:
            if not self.step.finished and self.apply:
                report.changes_not_made += self.step.plan.size()
            # Writes on the wire: the server carries them out whatever happens here, so
            # their answers are read and recorded before the error goes on.
            try:
                self.abandon()
            except GmailClassifyError as exc:
                log.info("%s: the answers to the last changes sent were lost (%s); "
                         "the next run finds out what was done", self.source, exc)
            raise

    def classify(self, batch: List[int], fetched: Optional[Dict[int, Dict[str, Any]]] = None
                 ) -> None:
        """Fetch one batch (unless given), classify it, and add what its messages still
        need to the step in hand; with a separator, templated destinations are filled in.
        Messages an undo restored (``undone_msgids``) are passed over."""
        conn, report, step, items = self.conn, self.report, self.step, self.items
        if fetched is None:
            fetched = conn.fetch(batch, items, skipped=report.skipped)
        # Fail closed: a message the server answered only in part (an item missing, NIL,
        # unreadable) would look like one with no headers or flags, and a `not` rule would
        # match it.  It is skipped as a whole, before any rule runs.
        infos: Dict[int, MessageInfo] = {}
        leave = self.undone_msgids
        oversized = set(report.skipped)     # a set: a run may skip thousands
        for uid in batch:
            if leave and _is_msgid((fetched.get(uid) or {}).get("X-GM-MSGID")) and \
                    int(fetched[uid]["X-GM-MSGID"]) in leave:
                continue
            why = _unusable(uid, items, fetched, oversized)
            if why:
                _skip(report, uid, why)
                continue
            try:
                infos[uid] = info = _message_info(uid, fetched[uid], self.header_item,
                                                  self.queries, self.folder)
            except ContentSkip as exc:
                _skip_content(report, step, uid, str(exc))
                continue
            found = self.as_found.get(uid)
            if found is not None:       # judged as found, planned against what is there
                self.current[uid] = (info.flags, info.labels)
                flags, labels = found["flags"], found["labels"]
                starred = [had for name, had in labels.items() if _label_key(name) == "starred"]
                if "\\Flagged" in flags:     # Gmail's \\Starred is the star, both ways
                    labels = dict({"\\Starred": flags["\\Flagged"]}, **labels)
                elif starred:
                    flags = dict(flags, **{"\\Flagged": starred[0]})
                infos[uid] = dataclasses.replace(
                    info, flags=_as_found(info.flags, flags),
                    labels=_as_found(info.labels, labels),
                    queries=_as_found(info.queries, found.get("queries") or {}))
        shown: Dict[int, _Shown] = {}
        decisions = self._decide(infos, shown)
        for uid in sorted(decisions):
            self._add(uid, decisions[uid], infos[uid], shown[uid], fetched[uid].get("X-GM-MSGID"))
        # Undecided without the data asked later (see _decide and classify_all); without
        # any, a message missing here was skipped (its body did not come, a program failed).
        waiting = [uid for uid in infos if uid not in decisions] if self.later else []
        if waiting:
            self.waiting.append(_Waiting(
                {uid: infos[uid] for uid in waiting}, {uid: shown[uid] for uid in waiting},
                {uid: fetched[uid].get("X-GM-MSGID") for uid in waiting},
                # Read with the literal limit of the batch's FETCH, which asked for them
                # with the headers before (_data_later).
                conn.fetch_ahead(waiting, [datum.item for datum in self.later],
                                 skipped=report.skipped, limit_as=self.items),
                self.batches + self.ahead))
        # Skipped messages (gone between SEARCH and FETCH too) keep the mark below them.
        step.last_uid = batch[-1] if batch else step.last_uid

    def _add(self, uid: int, decision: Decision, info: MessageInfo, shown: _Shown,
             msgid: Any) -> None:
        """Add a decided message to the step in hand: what it still needs to the plan (with
        a separator, templated destinations filled in), and what its records show."""
        report, step = self.report, self.step
        if self.separator is not None:
            actions = decision.actions.expanded(info, self.separator)
            if actions is not decision.actions:     # a templated destination
                decision = dataclasses.replace(decision, actions=actions)
        report.examined += 1
        # report.changed is counted when the step is done: off Gmail the plan may still
        # lose label copies the label's folder already holds (_drop_copies_already_there).
        flags, labels = self.current.pop(uid, (info.flags, info.labels))
        if step.plan.add(uid, decision.actions, flags, labels, self.source,
                         in_trash=self.in_trash, in_archive=self.in_archive) and self.keeps_found:
            step.found[uid] = (info.flags, info.labels, info.queries)
        if decision.actions.labels and info.labels is None:
            step.plan.message_ids[uid] = shown.message_id or _message_key(info.headers)
        for name, _reason in decision.matches:
            report.matched[name] = report.matched.get(name, 0) + 1
        step.infos[uid] = shown
        step.decisions[uid] = decision
        step.msgids[uid] = msgid

    def decide_waiting(self, batches: Optional[int]) -> None:
        """Decide the messages waiting for data asked later (_Waiting) whose answer is next
        on the wire, the answers to the FETCHes sent before it having been read: once the
        ``batches``-th batch is in (None: all of them, the batches being done).  They join
        the step in hand; a step that ended while they waited holds its mark below them."""
        items = [datum.item for datum in self.later]
        while self.waiting and (batches is None or self.waiting[0].due <= batches):
            waiting = self.waiting.pop(0)
            fetched = waiting.read()
            oversized = set(self.report.skipped)
            for uid, info in waiting.infos.items():
                why = _unusable(uid, items, fetched, oversized)
                if why:
                    _skip(self.report, uid, why)
                    continue
                info = dataclasses.replace(info, **{
                    datum.field: datum.read(fetched[uid][datum.item]) for datum in self.later})
                try:
                    decision = self.rules.classify(info, final=True, now=self.now)
                except ContentSkip as exc:
                    _skip_content(self.report, self.step, uid, str(exc))
                    continue
                self._add(uid, decision, info, waiting.shown[uid], waiting.msgids[uid])

    def _decide(self, infos: Dict[int, MessageInfo], shown: Dict[int, _Shown]
                ) -> Dict[int, Decision]:
        """The rules' decisions on a batch's messages (``infos`` loses those skipped for
        their content), and in ``shown`` what their records show; only those the headers
        could not settle pay for a body prefix."""
        report, step, now = self.report, self.step, self.now
        decisions: Dict[int, Decision] = {}
        undecided: List[int] = []
        for uid, info in list(infos.items()):
            # What the record shows is decoded into the header cache the rules then read
            # (From and Subject once, not once for the rules and again for the record),
            # just before them: the rules drop the cache, so one message's is held at once.
            _header_cache(info.headers)
            shown[uid] = _Shown(info)
            try:
                decision = self.rules.classify(info, final=self.final, now=now)
            except ContentSkip as exc:
                _skip_content(report, step, uid, str(exc))
                del infos[uid]
                continue
            if decision is None:
                undecided.append(uid)
            else:
                decisions[uid] = decision
        if undecided and not self.later:     # with later data: they wait (see classify)
            ready = self._with_body(undecided, infos, BODY_PREFIX_BYTES)
            # Programs that read whole messages get up to their program_max_size (a larger
            # message is skipped for its content, by its RFC822.SIZE, before any program),
            # fetched only for the messages that reach such a program in its rule.
            whole = max(self.rules.needs.whole, default=0)
            held = run_programs(self.rules, ready.values(), jobs=self.options.jobs, now=now,
                                hold=_wants_whole if whole > BODY_PREFIX_BYTES else None)
            if held:
                held_ids = {id(msg) for msg in held}
                uids = [uid for uid, info in ready.items() if id(info) in held_ids]
                fetched = self._with_body(uids, ready, whole)
                for uid in uids:        # never judged on the prefix alone
                    del ready[uid]
                ready.update(fetched)
                run_programs(self.rules, list(fetched.values()), jobs=self.options.jobs, now=now)
            for uid, info in ready.items():
                try:
                    decisions[uid] = self.rules.classify(info, final=True, now=now)
                except ContentSkip as exc:
                    _skip_content(report, step, uid, str(exc))
                except ProgramError as exc:
                    _skip(report, uid, str(exc))     # fail closed: never a match, run again
        return decisions

    def _with_body(self, uids: List[int], infos: Dict[int, MessageInfo], limit: int
                   ) -> Dict[int, MessageInfo]:
        """FETCH the first ``limit`` bytes (a body prefix, or as much of the whole message
        as programs read) of ``uids``: their infos with body and source; a message not
        answered in full is skipped (never judged on a body we did not get), one whose body
        cannot be read is skipped for its content; neither is in the result.  So are all
        of them when their bodies would pass the daily download budget (their sizes
        known: the FETCH brings no more than each one's, up to ``limit``)."""
        report, step = self.report, self.step
        expected = sum(min(limit, infos[uid].size if infos[uid].size is not None else limit)
                       + FETCH_GUESS for uid in uids)
        if not self.checkpoint.may_download(self.conn, expected):
            for uid in uids:
                _skip(report, uid, "not read: its body would pass the daily download budget")
            return {}
        item = f"BODY.PEEK[]<0.{limit}>"
        bodies = self.conn.fetch(uids, [item], skipped=report.skipped)
        ready: Dict[int, MessageInfo] = {}
        oversized = set(report.skipped)
        for uid in uids:
            why = _unusable(uid, [item], bodies, oversized)
            if why:
                _skip(report, uid, why)
                continue
            raw = bodies[uid][item]
            try:
                ready[uid] = dataclasses.replace(
                    infos[uid], body=body_text(raw[:BODY_PREFIX_BYTES]), source=raw)
            except ContentSkip as exc:
                _skip_content(report, step, uid, str(exc))
        return ready

    # -- the steps ------------------------------------------------------------------------

    def finish(self, step: _Step) -> None:
        """Start the step's changes (with ``apply``): once every change is made and
        answered, the checkpoint and the listeners hear what was done, and where the mark
        is (_step_done); a stop between commands writes the changes never sent as
        ``unsent`` first.

        The writes go in flights (_apply_plan), and a flight's answers are not waited for:
        the server works on it while the next batch is fetched and classified, and
        advance() then reads them and sends the step's next flight.  The step before has
        sent its last flight first (its moves, mostly), and goes on the wire ahead of this
        step's first: the server makes the one step's moves and the next step's labels
        while a batch is classified.  So one step sends at a time, at most two are under
        way, and the checkpoint hears of them in their order."""
        newest = self._newest()
        # Off Gmail the step's plan is checked against the copies made before it
        # (_drop_copies_already_there): those it copies into too are read first.
        while newest is not None and newest.ended is None and (
                not newest.last or newest.copies_into(step.plan.add_labels)):
            self._go_on(newest)
        step.finished = True
        if self.waiting:
            step.waiting_from = min(min(waiting.infos) for waiting in self.waiting)
        if not step.decisions and not step.content_skips:
            return
        writes = _StepWrites(self, step)
        self.writing.append(writes)
        self._go_on(writes)

    def advance(self) -> None:
        """Go on with the steps under way: read the answers of an older step's last flight
        (the step ends), then those of the newest step's flight on the wire, and send its
        next (which stays on the wire), or end it once nothing is left."""
        newest = self._newest()
        if newest is not None:
            self._go_on(newest)

    def land(self) -> None:
        """Carry every step under way through to its end (see finish)."""
        for writes in self._going():
            self._through(writes)

    def abandon(self) -> None:
        """When an error ends the run: read the answers of the flights on the wire (the
        server carries them out whatever happens here), record them, and send nothing more;
        what was never sent is recorded as such.  Raises what reading the answers raised
        (the first such error, once every step is ended)."""
        error: Optional[Exception] = None
        going = self._going()
        try:
            for writes in going:
                answered = False
                try:
                    writes.writes.close()   # reads the flight on the wire (see _apply_plan)
                    answered = True
                except Exception as exc:    # raised below, once every step is ended
                    error = error or exc
                if answered and not writes.last and self.apply and \
                        self.checkpoint.writes_ahead:
                    self._not_sent(writes.step)
                writes.ended = answered and writes.last
        finally:
            for writes in going:
                if writes.ended is None:    # the rest, after a KeyboardInterrupt or such
                    writes.ended = False
            self._steps_ended()
        if error is not None:
            raise error

    def _going(self) -> List[_StepWrites]:
        """The steps whose writes are under way, oldest first."""
        return [writes for writes in self.writing if writes.ended is None]

    def _newest(self) -> Optional[_StepWrites]:
        """Carry the steps under way but the newest through to their end (their last
        flights are on the wire), and return the newest if it is still under way."""
        going = self._going()
        for older in going[:-1]:
            self._through(older)
        return going[-1] if going and going[-1].ended is None else None

    def _through(self, writes: _StepWrites) -> None:
        while writes.ended is None:
            self._go_on(writes)

    def _go_on(self, writes: _StepWrites) -> None:
        """Resume a step's writes: read the answers of its flight on the wire and send its
        next, or end the step.  Steps are done in their order (_steps_ended): one that ends
        before an older step is under way still waits for it."""
        try:
            writes.last = next(writes.writes)
        except StopIteration:
            writes.ended = True
        except StopRequested as exc:
            writes.ended = False
            if self.apply and exc.between_commands and self.checkpoint.writes_ahead:
                self._not_sent(writes.step)
            raise
        except BaseException:
            writes.ended = False
            raise
        finally:
            self._steps_ended()

    def _steps_ended(self) -> None:
        """_step_done for the steps that ended, oldest first, up to one still under way."""
        while self.writing and self.writing[0].ended is not None:
            writes = self.writing.pop(0)
            self._step_done(writes.step, bool(writes.ended))

    def _apply_step(self, writes: _StepWrites) -> Iterator[bool]:
        """The step's changes, as _apply_plan carries them out (a generator: see there);
        a dry run only notes the folders it would create."""
        conn, plan = self.conn, writes.step.plan
        conn.stop.check("before the step's changes")    # a safe point (see Stop)
        if self.settled.plain_expunge and (plan.move or plan.trash or plan.archive):
            _check_plain_expunge(conn, self.source)
        if not conn.is_gmail and plan.add_labels:
            _drop_copies_already_there(conn, plan, self.copies)
        if self.apply and self.options.hold:
            self._hold_past_folder_limit(writes.step)
        self.planned += plan.size()
        if self.apply:
            yield from _apply_plan(conn, plan, self.report, writes,
                                   self.options.max_new_folders, self.settled,
                                   self.options.allow_expunge)
            return
        self.report.created.extend(name for name in _missing_folders(conn, plan)
                                   if name not in self.report.created)

    def _hold_past_folder_limit(self, step: _Step) -> None:
        """With ``hold``: where the step would create folders past the limit, let in the
        messages in UID order while all the new folders each needs still fit, and leave
        alone the others (skipped, so the mark stays below them: a later catch-up looks
        again).  A message is let in whole or not at all, so no folder is made for a
        message that then waits, and the oldest go first, every time."""
        limit, conn, plan = self.options.max_new_folders, self.conn, step.plan
        if limit is None:
            return
        missing = _missing_folders(conn, plan)
        room = max(0, limit - len(self.report.created))
        if len(missing) <= room:
            return
        unmade = set(missing)
        made: set = set()
        held: List[int] = []
        wanted: set = set()             # the folders the held messages wait for
        for uid in sorted(plan.per_uid):
            needs = {conn.server_name(key[1]) for key in plan.per_uid[uid]
                     if key[0] in ("label", "move") and not key[1].startswith("\\")}
            new = (needs & unmade) - made
            if len(made) + len(new) <= room:
                made |= new
            else:
                held.append(uid)
                wanted |= new
        plan.drop_uids(held)
        why = (f"it needs a new folder past the limit of {limit} "
               f"(--max-new-folders); left for a later catch-up")
        for uid in held:            # neither examined nor matched: as if never decided
            decision = step.decisions.pop(uid, None)
            if decision is not None:
                self.report.examined -= 1
                for name, _reason in decision.matches:
                    self.report.matched[name] -= 1
                    if not self.report.matched[name]:
                        del self.report.matched[name]
            _skip(self.report, uid, why)
        log.warning("%s: %d message(s) need %d new folder(s) past the limit of %d "
                    "(--max-new-folders), such as %s; left alone for now", self.folder,
                    len(held), len(wanted), limit, printable(sorted(wanted)[0]))

    def _intents(self, step: _Step) -> List[Dict[str, Any]]:
        """One entry per message the step may change: where it is, what tells it apart
        (size, INTERNALDATE, Message-ID) and the changes planned, each destination with the
        UIDVALIDITY and UIDNEXT it had before the step (``places``, by server name).  A
        change that names no UID (a label, a flag, archive on Gmail) is one dict, shared by
        the entries that make it, and a destination's "after" one dict: read-only."""
        status, places, conn = self.status, self.places, self.conn
        gmail, destinations, per_uid = conn.is_gmail, self.destinations, step.plan.per_uid
        afters: Dict[Tuple[str, ...], Dict[str, Any]] = {}     # a key's "after", filled in
        shared: Dict[Tuple[str, ...], Dict[str, Any]] = {}     # a change naming no UID

        def change_of(key: Tuple[str, ...], uid: int) -> Dict[str, Any]:
            change = shared.get(key)
            if change is not None:
                return change
            change = _change_entry(key, uid, status, gmail, destinations, None)
            after = change["after"]
            if isinstance(after, dict):     # a fresh dict: filled in where it stands
                known = afters.get(key)
                if known is None:
                    folder = after["folder"]
                    name = folder if folder in places else conn.server_name(str(folder))
                    if name in places:
                        after["folder"] = name
                        after.update(places[name])
                    known = afters[key] = after
                change["after"] = known
            if not isinstance(change["before"], dict):      # no UID in it
                shared[key] = change
            return change

        entries = []
        for uid in sorted(per_uid):
            info = step.infos.get(uid)
            if info is None:
                continue
            entries.append({
                "folder": self.folder, "uid": uid, "uidvalidity": status.uidvalidity,
                "gm_msgid": step.msgids.get(uid), "message_id": info.message_id,
                "size": info.size, "internaldate": _iso(info.date) if info.date else None,
                "subject": info.subject, "changes": [change_of(key, uid)
                                                     for key in per_uid[uid]]})
        return entries

    # _apply_plan's hooks, for the step ``step`` (through its _StepWrites: see there).

    def intend(self, step: _Step, phase: str, folders: Sequence[str]) -> None:
        if not self.checkpoint.writes_ahead:
            return                  # nothing keeps a record: no STATUS spent
        if phase == "create":
            self.checkpoint.intend(self.conn, [{"create": name, "folder": self.folder,
                                                "flight": True} for name in folders])
            return
        self.places.update(_place_statuses(self.conn, [name for name in folders
                                                       if name not in self.places]))
        # A copy an earlier run made and this step's move will take as made (copying) is
        # older than the destination's UIDNEXT now: the records name the earlier one, so
        # that undo looks among the messages from there on.
        for uid, kept in self.earlier_copies.items():
            place = self.places.get(kept.get("to"))
            if uid in step.plan.per_uid and place and place.get("uidnext"):
                since = kept.get("since")
                place["uidnext"] = min(place["uidnext"], since) if since else None
        found = {}
        for uid, keys in step.plan.per_uid.items():
            if uid in step.found:       # what the step changes, as the rules found it
                flags, labels, queries = step.found[uid]
                read = self.read_label      # what no rule tests need not be kept
                touched = {"flags": {key[1]: key[1] in (flags or ()) for key in keys
                                     if key[0] in ("flag+", "flag-") and read(key[1])},
                           "labels": {key[1]: key[1] in labels for key in keys
                                      if key[0] == "label" and labels is not None
                                      and read(key[1])}}
                if touched["flags"] or touched["labels"]:
                    if queries is not None and self.state_queries:   # the server's answers
                        touched["queries"] = {q: q in queries for q in self.state_queries}
                    # What a run before this one kept stays: it saw the message before
                    # that run changed it, which this step's plan no longer shows.
                    earlier = self.as_found.get(uid) or {}
                    for part in ("flags", "labels", "queries"):
                        if isinstance(earlier.get(part), dict):
                            touched[part] = dict(touched.get(part) or {}, **earlier[part])
                    found[uid] = touched
        if found:
            self.checkpoint.keep_unfinished(self.conn, self.status, "found", found)
        self.checkpoint.intend(self.conn, self._intents(step))

    def done(self, step: _Step, key: Tuple[str, ...], result: Mapping[int, Any]) -> None:
        if self.apply and self.checkpoint.writes_ahead:
            self.checkpoint.confirmed(self.conn, _done_entry(
                key, result, self.status, self.conn.is_gmail, self.destinations, self.folder))
        if key[0] == "create":
            return
        copies = self.copies.get(key[1]) if key[0] == "label" else None
        for uid, extra in result.items():
            step.confirmed[(uid, key)] = extra
            if copies is not None:      # known before the step's records (see finish)
                copies.add(step.plan.message_ids.get(uid))
            place = self.places.get(extra.get("folder")) if isinstance(extra, dict) else None
            if place is not None and extra.get("uid") and place.get("uidnext"):
                place["uidnext"] = max(place["uidnext"], extra["uid"] + 1)
        self.applied += len(result)
        if self.listeners.on_applied is not None:
            self.listeners.on_applied(min(self.applied, self.planned), self.planned)

    def read_label(self, name: str) -> bool:
        """Whether a rule tests the flag or label ``name`` that a step changes: one of
        state_read, or (state_read holding "*") a label filled in or printed that a
        condition reads by name; Gmail's \\Starred is the star."""
        known = self.labels_read.get(name)
        if known is None:
            known = self.labels_read[name] = name in self.state_read or (
                _label_key(name) == "starred" and "\\Flagged" in self.state_read) or (
                "*" in self.state_read and self.rules.reads_label(name))
        return known

    def copying(self, destination: str, uids: Sequence[int]) -> Dict[int, Optional[int]]:
        """Before a move without MOVE (COPY, \\Deleted, EXPUNGE) of ``uids`` to
        ``destination``: which of them a run that did not end may have copied there (UID ->
        the destination's UIDNEXT before, None if unknown), for conn.move's copied_since;
        and kept, for a run after this one should it not end between its COPY and STORE
        (the originals would show nothing of it, and be copied twice)."""
        known = self.earlier_copies
        earlier = {uid: known[uid].get("since") for uid in uids
                   if uid in known and known[uid].get("to") == destination}
        elsewhere = sorted({known[uid].get("to") for uid in uids
                            if uid in known and known[uid].get("to") != destination})
        if elsewhere:       # the rules changed since: that copy is not this move's
            log.warning("%s: a run that stopped may have copied some of these messages to %s "
                        "before its move was done; now they go to %s, and such a copy stays "
                        "there: look for it", self.source, ", ".join(map(str, elsewhere)),
                        destination)
        if self.apply and self.checkpoint.writes_ahead:
            since = self.uidnext(destination)
            self.checkpoint.keep_unfinished(self.conn, self.status, "copies", {
                uid: {"to": destination, "since": earlier[uid] if uid in earlier else since}
                for uid in uids})
        return earlier

    def uidnext(self, folder: str) -> Optional[int]:
        """``folder``'s UIDNEXT from before this step's writes, or lower; None if unknown."""
        place = self.places.get(folder)     # as intend() found it, moved past our copies
        return place.get("uidnext") if place else None

    def refused(self, step: _Step) -> None:
        # A flight's refusal comes once all its answers are read, and the step sends
        # nothing after it: what is not confirmed was not made (refused, or never sent).
        if self.apply and self.checkpoint.writes_ahead:
            self._not_sent(step)

    def _not_sent(self, step: _Step) -> None:
        # Every command sent was answered: what is not confirmed was never sent, and the
        # log says so, so that history and undo do not take it for "maybe".
        unsent = [dict(entry, changes=[
            change for key, change in zip(step.plan.per_uid[entry["uid"]], entry["changes"])
            if (entry["uid"], key) not in step.confirmed]) for entry in self._intents(step)]
        self.checkpoint.not_sent(self.conn, [entry for entry in unsent if entry["changes"]])

    def _step_done(self, step: _Step, ok: bool) -> None:
        report, checkpoint = self.report, self.checkpoint
        gmail = self.conn.is_gmail
        same: Dict[Tuple[str, ...], Tuple[Dict[str, Any], str]] = {}    # see _outcome
        outcomes = [self._outcome(step, uid, ok, gmail, same) for uid in sorted(step.decisions)]
        # A step that ended with changes not made holds the mark below it, also when a step
        # after it (under way at the same time) ends with all its changes made.
        mark = step.last_uid if ok and not self.narrowed and not self.behind else None
        self.behind = self.behind or not ok
        if mark is not None and report.skipped:
            mark = min(mark, min(report.skipped) - 1)   # the next run looks again
        if mark is not None and report.expunge_stayed:
            mark = min(mark, min(report.expunge_stayed) - 1)    # not moved: not done
        if mark is not None and step.waiting_from is not None:
            mark = min(mark, step.waiting_from - 1)     # not decided yet: the next run looks
        if mark is not None:
            report.mark = mark
        if step.content_skips:
            checkpoint.content_skipped(self.status, step.content_skips)  # before the mark
        if self.apply and mark is not None:     # settled up to the mark: nothing to finish
            checkpoint.finished(self.status, mark, report.start_uid)
        checkpoint.step_done(self.conn, self.status, mark, outcomes)
        if self.listeners.on_message is not None:
            for outcome in outcomes:
                if ok or outcome.changes:
                    self.listeners.on_message(outcome)

    def _outcome(self, step: _Step, uid: int, ok: bool, gmail: bool,
                 same: Dict[Tuple[str, ...], Tuple[Dict[str, Any], str]]) -> Outcome:
        """One message's Outcome, counted into the report.  A change that names no UID and
        no answer of the server's (a flag, a label on Gmail) is one dict of ``same``,
        shared by the step's outcomes that make it (read-only), named once beside it."""
        report, status = self.report, self.status
        decision, info = step.decisions[uid], step.infos[uid]
        keys = step.plan.per_uid.get(uid, ())
        made = keys
        changes: Tuple[Dict[str, Any], ...] = ()
        if keys:            # most messages of a folder already run over need nothing
            confirmed = step.confirmed
            if self.apply:
                made = [key for key in keys if (uid, key) in confirmed]
            made_changes = []
            counts = report.changes
            for key in made:
                # A dry run's copies, as if made (those made are known to done()).
                if not self.apply and key[0] == "label" and key[1] in self.copies:
                    self.copies[key[1]].add(step.plan.message_ids.get(uid))
                known = same.get(key)
                if known is None:
                    change = _change_entry(key, uid, status, gmail, self.destinations,
                                           confirmed.get((uid, key)))
                    known = (change, describe_change(change))
                    kind = key[0]   # _change_entry reads neither UID nor answer for these:
                    if kind in ("flag+", "flag-") or (gmail and kind in ("label", "archive")):
                        same[key] = known
                made_changes.append(known[0])
                counts[known[1]] = counts.get(known[1], 0) + 1
            changes = tuple(made_changes)
        _count_decision(report, decision, keys, made, self._decided_name,
                        self._decided_keys(decision.actions))
        if self.apply:
            report.changes_made += len(made)
            if not ok:
                report.changes_not_made += len(keys) - len(made)
        return _frozen(Outcome, {
            "folder": self.folder, "uid": uid, "sender": info.sender, "subject": info.subject,
            "decision": decision, "msgid": step.msgids.get(uid),
            "uidvalidity": status.uidvalidity, "message_id": info.message_id,
            "changes": changes, "applied": self.apply, "pending": len(keys) - len(made)})

    def _decided_keys(self, actions: Actions) -> Tuple[Tuple[str, ...], ...]:
        """_Plan.decided(actions), worked out once per distinct Actions of the run (a few
        rules' actions, shared by thousands of messages), known by identity: an Actions
        hashes all its fields, every time."""
        known = self.decided_keys.get(id(actions))
        if known is None:       # kept with its Actions, so that its id stays its own
            known = _remembered(self.decided_keys, id(actions),
                                lambda: (actions, tuple(_Plan.decided(actions))))
        return known[1]

    def _decided_name(self, key: Tuple[str, ...]) -> str:
        """The name of a decided change the server already had (see _count_decision): its
        change's, which reads no UID and no answer: one for all the folder's messages."""
        return _remembered(self.decided_names, key, lambda: describe_change(_change_entry(
            key, 0, self.status, self.conn.is_gmail, self.destinations, None)))


def _place_statuses(conn: GmailConnection, names: Sequence[str]
                    ) -> Dict[str, Dict[str, Optional[int]]]:
    """Each destination's UIDVALIDITY and UIDNEXT before a step writes to it: every copy
    with a UID at or above that UIDNEXT, under that UIDVALIDITY, came after the step began.
    The open folder's as it was opened, the others' by STATUS commands pipelined (one
    round trip); a refused one's unknown (the write that follows says what is wrong; undo
    leaves it alone)."""
    selected = conn.selected
    answers = conn.statuses([name for name in names
                             if selected is None or not _same_folder(selected.name, name)])
    places = {}
    for name in names:
        values = answers.get(name)
        if name not in answers:     # the selected folder
            values = {"UIDVALIDITY": selected.uidvalidity, "UIDNEXT": selected.uidnext}
        elif isinstance(values, ImapError):
            values = {}
        places[name] = {"uidvalidity": values.get("UIDVALIDITY"),
                        "uidnext": values.get("UIDNEXT")}
    return places


def _done_entry(key: Tuple[str, ...], result: Mapping[int, Any], status: FolderStatus,
                gmail: bool, destinations: Mapping[str, Optional[str]],
                folder: str) -> Dict[str, Any]:
    """The audit log's ``done`` record of one confirmed write command (without the run's
    stamp): the folder, the change as _change_identity names it (action, label, flag,
    destination), the UIDs confirmed and their new UIDs (COPYUID; None where unknown).
    A CREATE's names the folder and what the server said: created, existed or refused.

    ``{"folder": "INBOX", "uidvalidity": 7, "action": "move", "label": None, "flag": None,
    "destination": "Lists", "uids": [3, 4], "new_uids": [1, 2]}``
    """
    if key[0] == "create":
        return {"folder": folder, "create": key[1], "created": key[2] == "created",
                "answer": key[2]}
    uids = sorted(result)
    first = result[uids[0]] if uids else None
    change = _change_entry(key, uids[0] if uids else 0, status, gmail, destinations,
                           first if isinstance(first, dict) else None)
    after = change.get("after")
    return {"folder": folder, "uidvalidity": status.uidvalidity, "action": change["action"],
            "label": change.get("label"), "flag": change.get("flag"),
            "destination": after.get("folder") if isinstance(after, dict) else None,
            "uids": uids, "new_uids": [result[uid].get("uid") if isinstance(result[uid], dict)
                                       else None for uid in uids]}


def _count_decision(report: FolderReport, decision: Decision, planned: Sequence[Tuple[str, ...]],
                    made: Sequence[Tuple[str, ...]],
                    name: Callable[[Tuple[str, ...]], str],
                    decided: Optional[Sequence[Tuple[str, ...]]] = None) -> None:
    """Count one message's decision into the report: its rules in ``changed`` when some
    change was ``made`` (or would be), and what the server already had (decided, not
    ``planned``) in ``already_done``, named by ``name(key)`` as changes are.  ``decided``:
    _Plan.decided(decision.actions), if the caller has it already."""
    if made:
        for rule, _reason in decision.matches:
            report.changed[rule] = report.changed.get(rule, 0) + 1
    for key in _Plan.decided(decision.actions) if decided is None else decided:
        if key not in planned:
            done = name(key)
            report.already_done[done] = report.already_done.get(done, 0) + 1


def _skip(report: FolderReport, uid: int, why: str) -> None:
    """Leave one message alone for this run, saying why (the run ends incomplete)."""
    if uid not in report.skipped:
        report.skipped.append(uid)
    report.why_skipped.setdefault(uid, why)
    log.info("%s: skipped UID %d: %s; it was left as it is", report.folder, uid, why)


def _skip_content(report: FolderReport, step: _Step, uid: int, why: str) -> None:
    """Leave one message alone for its content (ContentSkip): warned about, recorded in the
    audit log as ``skipped``, and passed by the mark, since a rerun would fail the same."""
    report.content_skipped[uid] = why
    step.content_skips[uid] = why
    log.warning("%s: UID %d left alone for its content: %s; it is recorded as skipped and "
                "not tried again", report.folder, uid, why)


def _first(values: Sequence[str]) -> str:
    return values[0] if values else ""


def _message_key(headers: email.message.EmailMessage) -> str:
    """Message-ID, or for mail without one, From + Date + Subject: "the same message"."""
    message_id = _first(header_text(headers, "message-id")).strip()
    return message_id or "\n".join(_first(header_text(headers, name))
                                   for name in ("from", "date", "subject"))


def _message_ids_in(conn: GmailConnection, folder: str) -> set:
    """The _message_key of each message in ``folder`` (EXAMINE, SEARCH, FETCH), then back."""
    source = conn.selected
    conn.examine(folder)
    uids = conn.search(["ALL"])
    item = "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID FROM DATE SUBJECT)]"
    found = {_message_key(parse_headers(values.get(item) or b""))
             for values in (conn.fetch(uids, [item]) if uids else {}).values()}
    if source is not None:
        status = conn.select(source.name, readonly=source.readonly)
        if status.uidvalidity != source.uidvalidity:
            raise UidValidityError(f"UIDVALIDITY of {source.name} changed during the run; "
                                   f"nothing more was done there, run again", command="SELECT")
    return found


def _special_destination(conn: GmailConnection, use: str, action: str) -> Folder:
    folder = conn.special_folder(use)
    if folder is None:
        names = ", ".join(FALLBACK_FOLDER_NAMES.get(use, ())[:4])
        raise CapabilityError(f"{conn.host} has no folder marked {use} and none named "
                              f"{names} or the like, so '{action}' has nowhere to go; "
                              f"nothing was changed. Use move = \"<folder>\" in the rule "
                              f"instead", command="LIST")
    return folder


def _check_plain_expunge(conn: GmailConnection, source: str) -> None:
    """Before the first change (and in a dry run) where moves need a plain EXPUNGE: refuse
    if a message in the open folder is already marked \\Deleted, as EXPUNGE would take it."""
    marked = conn.search(["DELETED"])
    if marked:
        raise CapabilityError(
            f"refusing to move messages out of {source}: moving needs a plain EXPUNGE here, "
            f"and {len(marked)} other message(s) in {source} are marked \\Deleted (perhaps "
            f"by another mail client) and would be deleted too; nothing was changed. "
            f"Expunge or unmark them, then run again", command="EXPUNGE")


def _check_plain_expunges(conn: GmailConnection, folders: Iterable[str]) -> None:
    """_check_plain_expunge in each folder (server names), opened read-only; one that
    cannot be opened (NO or BAD) is skipped, left for the run or the undo to report."""
    for folder in folders:
        try:
            conn.examine(folder)
        except ImapError as exc:
            if exc.status in ("NO", "BAD"):
                continue
            raise
        _check_plain_expunge(conn, folder)


def _missing_folders(conn: GmailConnection, plan: _Plan) -> List[str]:
    """Folders (labels, on Gmail) the plan writes to that do not exist yet: server names."""
    targets = list(plan.move) + [label for label in plan.add_labels
                                 if not (conn.is_gmail and label.startswith("\\"))]
    names = [conn.server_name(name) for name in targets]
    existing = {f.name for f in conn.list_folders(sure_of=names) if f.selectable}
    return [name for name in dict.fromkeys(names)
            if name not in existing and name.upper() != "INBOX"]


def _drop_copies_already_there(conn: GmailConnection, plan: _Plan,
                               known: Dict[str, set]) -> None:
    """Off Gmail a label is a copy in a folder of that name, and a copy is not idempotent:
    forget planned copies of messages that folder already holds (by _message_key), and all
    but the first of the step's messages that share a key, which the folder would hold
    after the first: so a folder gets one copy of such messages whichever steps they fall
    in (a step's bounds are the run's affair, see _data_later).

    ``known`` caches each folder's keys for the rest of the folder run; the caller adds
    the keys of the copies it makes.
    """
    existing = {f.name for f in conn.list_folders(sure_of=map(conn.server_name,
                                                              plan.add_labels))
                if f.selectable}
    for label in list(plan.add_labels):
        if label not in known:
            target = conn.server_name(label)
            known[label] = _message_ids_in(conn, target) if target in existing else set()
        held = set(known[label])
        dropped = []
        for uid in plan.add_labels[label]:
            key = plan.message_ids.get(uid)
            if key in held:
                dropped.append(uid)
            held.add(key)
        plan.drop_label(label, dropped)


def _check_folder_limit(report: FolderReport, missing: Sequence[str],
                        max_new_folders: Optional[int]) -> None:
    """Raise FolderLimitError if creating ``missing`` takes the run past the limit."""
    wanted = len(report.created) + len(missing)    # a step may follow steps that created some
    if max_new_folders is not None and wanted > max_new_folders:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        before = "nothing was changed" if not report.created else \
            f"nothing more was changed after creating {len(report.created)}"
        raise FolderLimitError(f"{report.folder}: this run would create {wanted} new "
                               f"folders ({shown}), more than the limit of {max_new_folders}; "
                               f"{before}. Check the rules' templates, or raise the "
                               f"limit with --max-new-folders {wanted}")


def _create_folders(conn: GmailConnection, missing: Sequence[str], report: FolderReport,
                    hooks: _StepWrites) -> None:
    """Create the folders a step needs, the intent first, the CREATEs in one flight (each
    is safe to send again); each answer goes to hooks.done before a refusal is raised."""
    if not missing:
        return
    conn.stop.check("before creating folders")
    hooks.intend("create", missing)
    flight = _WriteFlight(conn)
    for name in missing:
        flight.create(name, ("create", name))
    flight.send()
    _land_flight(flight, report, hooks)


def _land_flight(flight: _WriteFlight, report: FolderReport, hooks: _StepWrites) -> None:
    """Read a sent flight's answers and tell ``hooks.done`` what the server confirmed (see
    _apply_plan), in the order sent, a key's chunks together; every answer read is
    reported before the first refusal is raised, or before any other error passes on."""
    try:
        flight.land()
    except BaseException:
        _confirm_flight(flight, report, hooks)
        raise
    refused = _confirm_flight(flight, report, hooks)
    if refused is not None:
        hooks.refused()
        raise refused


def _confirm_flight(flight: _WriteFlight, report: FolderReport,
                    hooks: _StepWrites) -> Optional[ImapError]:
    """hooks.done for each answered command of ``flight``; returns the first refusal."""
    refused: Optional[ImapError] = None
    confirmed: Dict[Any, Dict[int, Any]] = {}
    for write in flight.writes:
        if write.command == "CREATE":
            name = str(write.destination)
            if write.error is not None:
                hooks.done(("create", name, "refused"), {})     # answered: nothing was made
            elif write.created is not None:
                hooks.done(("create", name, "created" if write.created else "existed"), {})
                if write.created:
                    report.created.append(name)
        if write.error is not None:
            refused = refused or write.error
        if write.command == "CREATE" or write.result is None:
            continue
        report.moved_missing += len(write.missing)
        if write.command == "UID STORE":
            confirmed.setdefault(write.key, {}).update(write.result)
        else:
            confirmed.setdefault(write.key, {}).update(
                (uid, {"folder": write.destination, "uid": new})
                for uid, new in write.result.items())
    for key, result in confirmed.items():
        hooks.done(key, result)
    return refused


def _labels_and_flags(conn: GmailConnection, plan: _Plan, hooks: _StepWrites) -> _WriteFlight:
    """A step's first flight: its labels (Gmail) or label copies (elsewhere), and flags."""
    flight = _WriteFlight(conn)
    for label, uids in plan.add_labels.items():
        if conn.is_gmail:
            flight.store(("label", label), uids, "+X-GM-LABELS", [_label_arg(label)])
        else:
            # No labels here: a label is a copy in a folder of that name (copies it already
            # holds were dropped from the plan by _drop_copies_already_there).
            target = conn.server_name(label)
            flight.copy(("label", label), uids, target, hooks.uidnext(target))
    for sign, flags in (("+", plan.add_flags), ("-", plan.remove_flags)):
        for flag, uids in flags.items():
            flight.store((f"flag{sign}", flag), uids, f"{sign}FLAGS", [_flag_arg(flag)])
    return flight


_OneMove = Tuple[List[int], str, Tuple[str, ...]]    # UIDs, the server's name, the _Plan key


def _step_moves(conn: GmailConnection, plan: _Plan, source: str, archive: Optional[Folder],
                trash: Optional[Folder]) -> List[_OneMove]:
    """A step's moves, archive (off Gmail) and trash: [(uids, server name, _Plan key)]."""
    moves: List[_OneMove] = [
        (uids, conn.server_name(dest), ("move", dest)) for dest, uids in plan.move.items()]
    if plan.archive and not conn.is_gmail and archive is not None \
            and not _same_folder(archive.name, source):
        moves.append((plan.archive, archive.name, ("archive",)))
    if plan.trash and trash is not None and not _same_folder(trash.name, source):
        moves.append((plan.trash, trash.name, ("trash",)))
    return moves


def _moves_flight(conn: GmailConnection, plan: _Plan, moves: List[_OneMove]
                  ) -> Tuple[_WriteFlight, List[_OneMove]]:
    """A step's last flight (its ``moves``, and Gmail's archive), and the moves left to make
    one at a time on a server without MOVE."""
    flight = _WriteFlight(conn)
    if plan.archive and conn.is_gmail:
        # Gmail's archive is "remove the \Inbox label"; the message stays in All Mail.
        flight.store(("archive",), plan.archive, "-X-GM-LABELS", [_label_arg("\\Inbox")])
    if conn.has("MOVE"):
        for uids, destination, key in moves:
            flight.move(key, uids, destination)
        moves = []
    return flight, moves


def _apply_plan(conn: GmailConnection, plan: _Plan, report: FolderReport, hooks: _StepWrites,
                max_new_folders: Optional[int], settled: _Destinations,
                allow_expunge: bool) -> Iterator[bool]:
    """Carry out a plan: check destinations, create what is missing, then labels and flags,
    then moves (so a message is labelled where it stands, then leaves).  Each of the three
    goes as one flight of pipelined commands (_WriteFlight), the next sent once the one
    before is confirmed.

    A generator, so that the caller works while the server does: it yields each time a
    flight is on the wire whose answers are not needed yet (the labels and flags, and the
    moves when they went as one flight), yielding True when that flight is the plan's last.
    Resuming it reads that flight's answers and goes on.  Nothing else may write until it
    has yielded True; then another plan's writes may go out, the messages being others,
    and this one's must still be resumed, to its end.  Closed at a yield (an error
    elsewhere), it reads the answers of the flight on the wire and sends nothing more.

    ``hooks.intend(phase, folders)`` is called before any write command goes out:
    ``"create"`` with the folders about to be created, then ``"change"`` with the folders
    the step copies or moves mail into (server names), before the first STORE, COPY or MOVE.

    ``hooks.done(key, {uid: extra})`` hears of each command the server confirmed (a _Plan
    key; ``extra`` is None, or ``{"folder": ..., "uid": ...}`` for copies and moves), and of
    each CREATE answered, as ``done(("create", name, outcome), {})`` with ``outcome``
    "created", "existed" or "refused".  ``hooks.refused()`` hears that a flight had a
    refusal: every command sent was answered, and nothing more of the step will be sent.
    ``hooks.uidnext(folder)`` gives a label copy's COPY the destination's UIDNEXT.
    ``settled``: the trash and archive folders _settle found.  Names go to the server
    mapped to its namespace (server_name).
    """
    # Everything that can refuse is settled before the first change.
    missing = _missing_folders(conn, plan)
    _check_folder_limit(report, missing, max_new_folders)
    trash, archive = settled.trash, settled.archive
    source = conn.server_name(report.folder)
    # Safe points (see Stop): once a stop is asked for, no further write command is sent
    # and no intent is written for one; the command in flight has finished, and what it did
    # was reported through done().
    stop = conn.stop
    _create_folders(conn, missing, report, hooks)
    targets = [] if conn.is_gmail else [conn.server_name(label) for label in plan.add_labels]
    targets += [conn.server_name(dest) for dest in plan.move]
    targets += [folder.name for folder, uids in ((archive, plan.archive), (trash, plan.trash))
                if folder is not None and uids and not _same_folder(folder.name, source)]
    stop.check("before changing messages")
    hooks.intend("change", list(dict.fromkeys(targets)))
    # The labels and flags go in one flight, and once all are confirmed, the moves (and
    # Gmail's archive) in another: a message refused a label is never moved without it.
    flight = _labels_and_flags(conn, plan, hooks)
    moves = _step_moves(conn, plan, source, archive, trash)
    if flight.writes:
        flight.send()
        last = not moves and not (plan.archive and conn.is_gmail)   # nothing to move after
        yield from _on_the_wire(flight, report, hooks, last=last)
    flight, moves = _moves_flight(conn, plan, moves)
    if flight.writes:
        stop.check("before moving messages")
        flight.send()
        if moves:
            _land_flight(flight, report, hooks)
        else:
            yield from _on_the_wire(flight, report, hooks, last=True)
    for uids, destination, key in moves:     # no MOVE: copy, \Deleted, expunge, in turn
        stop.check(f"before moving to {destination}")
        result = conn.move(uids, destination, allow_expunge=allow_expunge,
                           copied_since=hooks.copying(destination, uids))
        report.moved_missing += len(result.missing)
        report.expunge_stayed.extend(result.stayed)     # not in result.moved: not confirmed
        report.others_expunged += result.others_expunged
        hooks.done(key, {uid: {"folder": destination, "uid": new}
                         for uid, new in result.moved.items()})


def _on_the_wire(flight: _WriteFlight, report: FolderReport, hooks: _StepWrites,
                 last: bool) -> Iterator[bool]:
    """Yield ``last`` while ``flight`` is on the wire (``hooks.flight``), then read its
    answers (_land_flight); closed at the yield, it reads them all the same."""
    hooks.flight = flight
    try:
        yield last
    finally:
        hooks.flight = None
        _land_flight(flight, report, hooks)


# --- Demo: a small sample mailbox, classified offline ------------------------------------
#
# `python gmail_classify.py demo` lets a newcomer watch the rules work before setting up
# an account. The sample is what a real inbox holds: newsletters, receipts (one in German
# with an encoded subject), notifications, an invitation, a security alert, mail from
# friends, one message already labelled and one in Japanese. Dates are relative to now,
# so age conditions (older_than = "1y") behave as they would on a live mailbox.

_DEMO_MESSAGES = (
    # (days ago, flags, labels, size padding, headers, body)
    (1, "", "", 0, "From: The Weekly Byte <news@weeklybyte.example>\n"
                   "Subject: This week: Python 3.14, faster CI, and a tiny web server\n"
                   "List-Id: The Weekly Byte <weekly.weeklybyte.example>\n"
                   "List-Unsubscribe: <https://weeklybyte.example/unsubscribe?u=4821>",
     "Five links worth your time this week."),
    (2, "\\Seen", "", 0, 'From: "Example Shop" <orders@shop.example>\n'
                         "Subject: Your order #40211 has shipped\n"
                         "List-Unsubscribe: <mailto:unsubscribe@shop.example>",
     "Your parcel is on its way."),
    (3, "", "", 0, "From: =?utf-8?q?Stadtwerke_K=C3=B6ln?= <rechnung@stadtwerke.example>\n"
                   "Subject: =?utf-8?q?Ihre_Rechnung_f=C3=BCr_M=C3=A4rz?=",
     "Ihre Rechnung liegt als PDF bei."),
    (0, "", "", 0, "From: GitHub <notifications@github.com>\n"
                   "Subject: Re: [octo/widget] Fix crash on empty input (#128)\n"
                   "List-Id: octo/widget <widget.octo.github.com>",
     "@alice approved these changes."),
    (0, "", "", 0, "From: Carol Diaz <carol@example.org>\n"
                   "Subject: Invitation: Team lunch @ Thu 12:30 - 13:30 (CET)",
     "You have been invited to the following event."),
    (1, "", "", 0, "From: Google <no-reply@accounts.google.com>\n"
                   "Subject: Security alert: new sign-in on Linux",
     "We noticed a new sign-in to your Google Account."),
    (0, "", "", 0, "From: Alice Martin <alice@example.org>\nSubject: Dinner on Saturday?",
     "Are you free on Saturday? We could try the new place."),
    (40, "\\Seen", "Receipts", 0, "From: Payments <receipts@pay.example>\n"
                                  "Subject: Receipt for your payment to Example Hosting",
     "Amount: 12.00 EUR."),
    (5, "", "", 0, "From: =?utf-8?b?5qCq5byP5Lya56S+44K144Oz44OX44Or?= <sale@shop.example.jp>\n"
                   "Subject: =?utf-8?b?44K744O844Or6ZaL5aeLIPCfjokgU3ByaW5nIHNhbGUgc3RhcnRzIG5vdw==?=\n"
                   "List-Unsubscribe: <https://shop.example.jp/u/77>",
     "Spring sale: up to 50% off."),
    (420, "\\Seen", "", 6 * 1024 * 1024, "From: Bob Stone <bob@example.net>\n"
                                         "Subject: Holiday photos (all of them)",
     "Here they are!"),
)


def demo_messages(now: Optional[datetime] = None) -> List[MessageInfo]:
    """The demo's sample inbox as MessageInfo values (UIDs 1..10, labelled like Gmail)."""
    now = now or datetime.now(timezone.utc)
    infos = []
    for uid, (days, flags, labels, padding, headers, body) in enumerate(_DEMO_MESSAGES, 1):
        date = email.utils.format_datetime(now - timedelta(days=days, hours=uid))
        raw = (f"{headers}\nTo: you@example.com\nDate: {date}\n"
               f"Message-ID: <demo-{uid}@gmail-classify.example>\nMIME-Version: 1.0\n"
               f"Content-Type: text/plain; charset=utf-8\n\n{body}\n").replace("\n", "\r\n")
        info = message_info_from_bytes(raw.encode("utf-8"))
        infos.append(dataclasses.replace(
            info, uid=uid, size=info.size + padding, flags=frozenset(flags.split()),
            labels=frozenset(["\\Inbox"] + labels.split())))
    return infos


def classify_messages(rules: Ruleset, messages: Iterable[MessageInfo], folder: str = "INBOX",
                      *, on_message: Optional[Callable[[Outcome], None]] = None,
                      now: Optional[datetime] = None) -> FolderReport:
    """Classify messages already in hand, offline, as a dry run of ``folder`` would.

    Returns the same FolderReport classify_folder would for a dry run (without the
    folders to create, which only the server knows); ``gmail_query`` conditions drop out
    as everywhere off Gmail (Ruleset.local), and templates are filled in as on Gmail.
    ``on_message`` receives an Outcome per message.
    """
    report, plan = FolderReport(folder, applied=False), _Plan()
    rules = rules.local()[0]
    status = FolderStatus(folder, 0, None, 0, True)
    for info in messages:
        decision = rules.classify(info, final=True, now=now)
        decision = dataclasses.replace(decision, actions=decision.actions.expanded(info))
        report.examined += 1
        plan.add(info.uid, decision.actions, info.flags, info.labels, folder)
        if decision.actions.labels and info.labels is None:
            plan.message_ids[info.uid] = _message_key(info.headers)
        for name, _reason in decision.matches:
            report.matched[name] = report.matched.get(name, 0) + 1
        keys = plan.per_uid.get(info.uid, [])
        changes = tuple(_change_entry(key, info.uid, status, info.labels is not None, {}, None)
                        for key in keys)
        _count_decision(report, decision, keys, keys, lambda key: describe_change(
            _change_entry(key, info.uid, status, info.labels is not None, {}, None)))
        shown = _Shown(info)
        if on_message is not None:
            on_message(Outcome(folder, info.uid, shown.sender, shown.subject, decision,
                               message_id=shown.message_id, changes=changes))
    report.changes = plan.changes()
    return report


# --- State and audit log -----------------------------------------------------------------
#
# What makes runs incremental and explainable.  The state file remembers, per account, host
# and folder, the folder's UIDVALIDITY and a mark: the highest UID below which every message
# was classified and had its changes confirmed by the server.  It also remembers a hash of
# the rules each mark was reached with, and the bytes downloaded per account per day (Gmail
# suspends IMAP for a day past about 2.5 GB).  It lives in $XDG_STATE_HOME/gmail_classify/
# (~/.local/state/gmail_classify/), mode 0600 in a 0700 directory, and every write is a
# temporary file, fsync and rename, merged under a short lock with what other processes
# wrote meanwhile.  Next to it, audit.jsonl holds one record per message per applied step
# (the same records ``run --json`` prints), which `history` and `undo` read.  An `--apply`
# holds a per-account lock for its whole length so two never interleave.

STATE_FORMAT = "gmail_classify state"
STATE_VERSION = 1              # bumped when the state file's layout changes incompatibly
RECORD_VERSION = 1             # of the records in --json output and audit.jsonl
INTENT_VERSION = 2             # of the audit log's write-ahead "intent" and "skipped" records
AUDIT_MAX_BYTES = 16 * 1024 ** 2       # past this, a run's first write rotates audit.jsonl
AUDIT_CHUNK_BYTES = 1024 ** 2        # records are encoded and written in chunks of this size
DOWNLOAD_DAYS_KEPT = 8                 # days of daily counts kept in the state file
# The counts the state file keeps per account and day (UTC): its key in the account's
# entry -> what it counts, for the message that names a bad entry.  StateStore.add_daily()
# and daily() read and write them; save() merges each with what other processes saved.
_DAILY_COUNTS = {"downloads": "download count",
                 "watch_folders": "count of folders a watch created"}


def _stored_number(value: Any, what: str, low: int, high: int = 2 ** 32 - 1) -> int:
    """A number from the state file, checked: UIDs and UIDVALIDITY are 32-bit and
    non-zero (RFC 3501 section 2.3.1.1), a mark is a UID or 0. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} {_quote(value)} is not a number from {low} to {high}")
    return value


class StateError(GmailClassifyError):
    """The state file is corrupt, unreadable or not ours; the message names it and the way
    out (``--all`` starts afresh, or delete the file)."""
    exit_code = EXIT_USAGE


class LockedError(GmailClassifyError):
    """Another ``--apply`` holds this account's lock; the message says which process."""
    exit_code = EXIT_LOCKED


class BudgetExceededError(RunStopped):
    """The account's daily download budget is (nearly) used up; the message says when the
    run can go on.  Raised at a safe point, after the pending changes were applied."""


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/gmail_classify`` (``~/.local/state/gmail_classify`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "gmail_classify"


def account_key(user: str, host: str, port: Optional[int] = None) -> str:
    """How the state names an account: ``"you@gmail.com on imap.gmail.com"``; a port other
    than 993 or 143 is kept (``"me on 127.0.0.1:1143"``), since it is another server."""
    return f"{user} on {_where(host, port)}"


def _where(host: str, port: Optional[int]) -> str:
    return host if port in (None, IMAPS_PORT, IMAP_PORT) else f"{host}:{port}"


def _canonical(value: Any) -> Any:
    """A JSON-able form of rules that does not depend on set order or memory addresses."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [type(value).__name__] + [[f.name, _canonical(getattr(value, f.name))]
                                         for f in dataclasses.fields(value)
                                         if getattr(value, f.name) or not f.metadata.get("omit_empty")]
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, re.Pattern):
        return ["re", value.pattern, value.flags]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(value) and hasattr(value, "__qualname__"):   # an added Python condition
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)


def rules_hash(rules: Ruleset) -> str:
    """A short fingerprint of what the rules do (not of the file's comments or layout)."""
    text = json.dumps(_canonical(rules.rules), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime, utc: str = "Z") -> str:
    """``"2026-12-01T17:05:01Z"`` (state and audit log); the token file has ``utc="+00:00"``."""
    # isoformat costs a quarter less than strftime (a record per message has one or two),
    # and pads a year below 1000 where strftime's %Y may not: those keep strftime's text.
    moment = moment.astimezone(timezone.utc)
    if moment.year < 1000:
        return moment.strftime("%Y-%m-%dT%H:%M:%S") + utc
    return moment.isoformat(timespec="seconds")[:19] + utc


def _make_private_dir(directory: Path) -> None:
    """Create ``directory`` (mode 0700), and each missing folder above it 0700 too (mkdir's
    parents=True gives those the umask's mode: under umask 000 a ~/.local/state others
    may write, where they could swap our folder for theirs), and tighten ``directory`` if
    others could read it; OSError."""
    missing = [directory] + [parent for parent in directory.parents if not parent.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    if os.name == "posix" and directory.stat().st_mode & 0o077:
        os.chmod(directory, 0o700)


def _ensure_private_dir(directory: Path) -> None:
    """_make_private_dir for the state directory, failures as StateError."""
    try:
        _make_private_dir(directory)
    except OSError as exc:
        raise StateError(f"cannot create the state directory {directory}: {exc}; set "
                         f"XDG_STATE_HOME to a writable place") from exc


def _write_atomic(path: Path, text: str) -> None:
    """The state file's write: _replace_privately, failures as StateError."""
    try:
        _replace_privately(path, text)
    except OSError as exc:
        raise StateError(f"cannot write the state file {path}: {exc}") from exc


class _FileLock:
    """An exclusive lock on an open file: fcntl.flock on POSIX, msvcrt.locking on Windows.

    Held by the open file, so it goes away with the process, however it ends.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: Optional[int] = None

    def acquire(self, wait: bool) -> bool:
        """Take the lock; returns False when another holds it and ``wait`` is False."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            elif msvcrt is not None:
                msvcrt.locking(fd, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            if wait:
                raise
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                elif msvcrt is not None:
                    os.lseek(fd, 0, os.SEEK_SET)
                    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)


def _lock_stem(account: str) -> str:
    """The name of ``account``'s lock file, less ``.lock``: the same for every spelling of
    it (see StateStore.lock), and for the name an older version gave the file."""
    stem = re.sub(r"[^A-Za-z0-9@._-]+", "_", account).lower()
    stem = re.sub(r"(@|_on_imap\.)googlemail\.com(?=_|\.?$)", r"\1gmail.com", stem)
    return re.sub(r"\.(_\d+)?$", r"\1", stem)


class AccountLock:
    """The per-account lock every ``--apply`` holds for its whole length.

    ``with store.lock(key, "run"):`` ...; a second holder gets LockedError naming the
    process that has it.  A long-running loop (watch) simply keeps it.  Dry runs never
    take it.
    """

    def __init__(self, path: Path, account: str, command: str = "run",
                 also: Sequence[Path] = ()) -> None:
        self.path = path
        self.account = account
        self.command = command
        self._lock = _FileLock(path)
        # Lock files of other spellings of the account (see StateStore.lock): taken too.
        self._also = [_FileLock(other) for other in also]

    @property
    def held(self) -> bool:
        return self._lock.fd is not None

    def acquire(self) -> "AccountLock":
        """Take the lock now or raise LockedError; never waits."""
        _ensure_private_dir(self.path.parent)
        held: Set[Tuple[int, int]] = set()     # (device, inode) of the files locked so far
        for lock in [self._lock] + self._also:
            try:
                # A second name of a file already held (a case-insensitive file system, a
                # link): flock would wait for ourselves.
                if lock is not self._lock:
                    found = os.stat(lock.path)
                    if (found.st_dev, found.st_ino) in held:
                        continue
                got = lock.acquire(wait=False)
            except OSError as exc:
                if lock is not self._lock and isinstance(exc, FileNotFoundError):
                    continue            # an older name gone meanwhile: no lock to take
                self.release()
                raise StateError(f"cannot open the lock file {lock.path}: {exc}") from exc
            if not got:
                self.release()
                holder = ""
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    info = load_json(lock.path.read_text(encoding="utf-8") or "{}")
                    holder = (f" (pid {info.get('pid')}, {info.get('command')}, since "
                              f"{info.get('since')})")
                raise LockedError(f"another --apply{holder} holds the lock for "
                                  f"{self.account}; wait for it to finish, or stop it, then "
                                  f"try again")
            assert lock.fd is not None
            opened = os.fstat(lock.fd)
            held.add((opened.st_dev, opened.st_ino))
        assert self._lock.fd is not None
        note = json.dumps({"pid": os.getpid(), "command": self.command,
                           "since": _iso(_utcnow())}).encode()
        os.ftruncate(self._lock.fd, 0)
        os.lseek(self._lock.fd, 0, os.SEEK_SET)
        os.write(self._lock.fd, note)
        return self

    def release(self) -> None:
        if self._lock.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock.fd, 0)
        for lock in [self._lock] + self._also:
            lock.release()

    def __enter__(self) -> "AccountLock":
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


@dataclass(frozen=True)
class FolderState:
    """What the state remembers of one folder: ``FolderState(uidvalidity=11, mark=812,
    rules="3f2a9c0e5b7d1a64", updated="2026-12-01T17:03:00Z")``.

    Every message with a UID up to ``mark`` was classified (with the rules whose hash is
    ``rules``) and its changes were confirmed by the server.
    """

    uidvalidity: int
    mark: int
    rules: str = ""
    updated: str = ""


# What a step keeps in the state file of messages it is about to change, for the next run
# should it not end (StateStore.add_unfinished, Checkpoint.unfinished): the key -> a check
# of one message's value, as the file is read.  "found": whether it had each flag and
# label the step changes that a rule tests, as the rules judged it, and on Gmail whether
# each search that reads them found it (rules that test what they change, see
# Ruleset.state_loops); "copies": the folder a move without MOVE copies it into, and
# that folder's UIDNEXT before the COPY (see _SafeCopy.copy_then_delete).
_UNFINISHED: Dict[str, Callable[[Any], bool]] = {
    "found": lambda kept: isinstance(kept, dict) and all(
        isinstance(kept.get(key), dict) and all(isinstance(name, str) and type(had) is bool
                                                 for name, had in kept[key].items())
        for key in ("flags", "labels")) and (
        "queries" not in kept or (isinstance(kept["queries"], dict) and all(
            isinstance(query, str) and type(hit) is bool
            for query, hit in kept["queries"].items()))),
    "copies": lambda kept: isinstance(kept, dict) and isinstance(kept.get("to"), str) and (
        kept.get("since") is None or (type(kept["since"]) is int and kept["since"] > 0)),
}


def _as_found(now: Optional[frozenset], found: Mapping[str, bool]) -> Optional[frozenset]:
    """Flags, labels or the searches that found it, as a message has them ``now``, but
    those a stopped step changed (``found``: each one's presence before it) as they were:
    what the user changed since counts, what the step did does not."""
    if now is None or not found:
        return now
    return frozenset(name for name in set(now) | set(found) if found.get(name, name in now))


def _drop_unfinished_renumbered(account: Dict[str, Any]) -> None:
    """Forget what steps kept (StateStore.add_unfinished) for folders renumbered since,
    and the empty tables.  What is settled goes by finish_unfinished, not by the stored
    mark: a run with --all works below it."""
    places = account.get("unfinished")
    if not places:
        return
    folders = account.get("folders", {})
    for name, place in list(places.items()):
        state = folders.get(name)
        if state is not None and state["uidvalidity"] != place["uidvalidity"]:
            del places[name]
            continue
        for kind in _UNFINISHED:
            if not place.get(kind):
                place.pop(kind, None)
        if not any(kind in place for kind in _UNFINISHED):
            del places[name]
    if not places:
        del account["unfinished"]


class StateStore:
    """The state file (``state.json``) and the audit log (``audit.jsonl``) in ``directory``.

    ``load()`` reads the file (missing: empty state); ``folder()``/``set_folder()`` and
    ``add_daily()``/``daily()`` (the counts per day of _DAILY_COUNTS; ``add_download()``/
    ``downloaded()`` for the bytes downloaded) work in memory; ``save()`` merges these
    changes into whatever is on disk now and writes it atomically.  ``lock(account)`` gives the
    AccountLock.  ``now`` (a callable returning an aware datetime) is injectable for tests.
    Raises StateError for a corrupt, unreadable or foreign file.
    """

    def __init__(self, directory: Union[str, Path, None] = None, *,
                 now: Callable[[], datetime] = _utcnow) -> None:
        self.directory = Path(directory) if directory else default_state_dir()
        self.path = self.directory / "state.json"
        self.audit = AuditLog(self.directory / "audit.jsonl")
        self.now = now
        self._data: Dict[str, Any] = self._empty()
        self._folders: Dict[Tuple[str, str], FolderState] = {}
        self._daily: Dict[Tuple[str, str, str], int] = {}   # (key, account, day) -> count
        self._undone: Dict[Tuple[str, str], Dict[str, Any]] = {}
        # (account, folder, kind) -> (UIDVALIDITY, {UID: value}): see add_unfinished; a
        # value None: the entry goes (finish_unfinished).
        self._unfinished: Dict[Tuple[str, str, str], Tuple[int, Dict[int, Any]]] = {}
        self._replace_bad_file = False

    @staticmethod
    def _empty() -> Dict[str, Any]:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "accounts": {}}

    def load(self, *, start_over: bool = False) -> None:
        """Read the state file.  ``start_over``: a bad file is not an error but is replaced
        at the next save (what ``--all`` does)."""
        try:
            self._data = self._read()
        except StateError:
            if not start_over:
                raise
            log.warning("ignoring the unusable state file %s; it will be replaced", self.path)
            self._data = self._empty()
            self._replace_bad_file = True

    def _read(self) -> Dict[str, Any]:
        fix = f"run with --all to start over, or delete {self.path}"
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return self._empty()
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"cannot read the state file {self.path}: {exc}; {fix}") from exc
        try:
            data = load_json(text)
        except ValueError as exc:
            raise StateError(f"the state file {self.path} is corrupt ({exc}); {fix}") from exc
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise StateError(f"{self.path} is not a gmail_classify state file; {fix}")
        version = data.get("version")
        if not isinstance(version, int) or version > STATE_VERSION:
            raise StateError(f"the state file {self.path} has format version {version!r}, "
                             f"newer than this program's ({STATE_VERSION}); use a newer "
                             f"gmail_classify.py, or {fix}")
        accounts = data.get("accounts")
        try:
            if not isinstance(accounts, dict):
                raise TypeError("accounts")
            for account in accounts.values():
                for entry in account.get("folders", {}).values():
                    _stored_number(entry["uidvalidity"], "uidvalidity", 1)
                    _stored_number(entry["mark"], "mark", 0)
                for key, what in _DAILY_COUNTS.items():
                    for count in account.get(key, {}).values():
                        _stored_number(count, what, 0, 2 ** 63 - 1)
                for entry in account.get("unfinished", {}).values():
                    _stored_number(entry["uidvalidity"], "uidvalidity", 1)
                    for kind, valid in _UNFINISHED.items():
                        for uid, kept in entry.get(kind, {}).items():
                            _stored_number(int(uid), "uid", 1)
                            if not valid(kept):
                                raise TypeError(f"what a step kept of UID {uid} ({kind})")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise StateError(f"the state file {self.path} is corrupt (bad entry: {exc}); "
                             f"{fix}") from exc
        return data

    def folder(self, account: str, name: str) -> Optional[FolderState]:
        """The remembered state of a folder, or None when there is none yet."""
        if (account, name) in self._folders:
            return self._folders[(account, name)]
        entry = self._data["accounts"].get(account, {}).get("folders", {}).get(name)
        if entry is None:
            return None
        return FolderState(int(entry["uidvalidity"]), int(entry["mark"]),
                           str(entry.get("rules", "")), str(entry.get("updated", "")))

    def set_folder(self, account: str, name: str, state: FolderState) -> None:
        """Remember a folder's state (written by the next save())."""
        self._folders[(account, name)] = state

    def add_undone(self, account: str, rules: str, folder: Optional[str],
                   uidvalidity: Optional[int], uid: Optional[int], msgid: Any = None) -> None:
        """Remember a message an undo restored, so that runs with the same ``rules`` (the
        undone run's hash) leave it alone: by ``folder``/``uidvalidity``/``uid`` where it
        now is, and on Gmail by X-GM-MSGID.  Written by the next save()."""
        entry = self._undone.setdefault((account, rules), {"folders": {}, "gm_msgids": []})
        if folder and uidvalidity and uid:
            place = entry["folders"].setdefault(folder, {"uidvalidity": uidvalidity, "uids": []})
            if place["uidvalidity"] == uidvalidity:
                place["uids"].append(int(uid))
        if msgid is not None and _is_msgid(msgid):
            entry["gm_msgids"].append(int(msgid))

    def undone(self, account: str, rules: str, folder: str,
               uidvalidity: int) -> Tuple[frozenset, frozenset]:
        """(UIDs in ``folder`` under ``uidvalidity``, X-GM-MSGIDs) that an undo of a run
        with these ``rules`` restored: runs with the same rules leave them alone."""
        uids: set = set()
        msgids: set = set()
        saved = self._data["accounts"].get(account, {}).get("undone", {})
        for entry in (saved.get(rules) if isinstance(saved, dict) else None,
                      self._undone.get((account, rules))):
            if not isinstance(entry, dict):
                continue
            place = (entry.get("folders") or {}).get(folder)
            try:
                if isinstance(place, dict) and int(place.get("uidvalidity")) == uidvalidity:
                    uids.update(int(uid) for uid in place.get("uids") or ())
                msgids.update(int(m) for m in entry.get("gm_msgids") or ())
            except (TypeError, ValueError):
                log.warning("ignoring a damaged 'undone' entry in %s", self.path)
        return frozenset(uids), frozenset(msgids)

    def unfinished(self, account: str, folder: str, uidvalidity: int, kind: str
                   ) -> Dict[int, Any]:
        """UID -> what add_unfinished() kept under ``kind`` for ``folder`` as numbered by
        ``uidvalidity`` and has not forgotten since (finish_unfinished)."""
        saved = self._data["accounts"].get(account, {}).get("unfinished", {}).get(folder)
        found = {int(uid): value for uid, value in saved.get(kind, {}).items()} \
            if isinstance(saved, dict) and saved.get("uidvalidity") == uidvalidity else {}
        pending = self._unfinished.get((account, folder, kind))
        if pending is not None and pending[0] == uidvalidity:
            found.update(pending[1])
        return {uid: value for uid, value in found.items() if value is not None}

    def add_unfinished(self, account: str, folder: str, uidvalidity: int, kind: str,
                       entries: Mapping[int, Any]) -> None:
        """Keep, under ``kind`` (a row of _UNFINISHED), what a step about to change these
        messages of ``folder`` (UID -> a JSON value) wants the next run to know should the
        step not end.  Written by the next save(); forgotten by finish_unfinished()."""
        kept = self._unfinished.get((account, folder, kind))
        if kept is None or kept[0] != uidvalidity:
            kept = self._unfinished[(account, folder, kind)] = (uidvalidity, {})
        kept[1].update(entries)

    def finish_unfinished(self, account: str, folder: str, uidvalidity: int,
                          uids: Iterable[int] = (), *, up_to: int = 0, above: int = 0) -> None:
        """Forget, at the next save(), what add_unfinished() kept of these messages (and
        of every one above UID ``above`` up to ``up_to``): nothing is left to finish."""
        wanted = set(uids)
        for kind in _UNFINISHED:
            kept = self.unfinished(account, folder, uidvalidity, kind)   # mostly none
            gone = dict.fromkeys(uid for uid in kept if uid in wanted or above < uid <= up_to)
            if gone:
                self.add_unfinished(account, folder, uidvalidity, kind, gone)

    def today(self) -> str:
        return self.now().astimezone(timezone.utc).date().isoformat()

    def add_daily(self, key: str, account: str, amount: int, day: Optional[str] = None) -> None:
        """Add ``amount`` to ``account``'s count ``key`` (a _DAILY_COUNTS key) for ``day``
        (ISO date; default today, UTC).  Written by the next save(), which adds it to the
        count on disk then, so processes that count at once lose nothing."""
        if amount > 0:
            entry = (key, account, day or self.today())
            self._daily[entry] = self._daily.get(entry, 0) + amount

    def daily(self, key: str, account: str, day: Optional[str] = None) -> int:
        """``account``'s count ``key`` for ``day`` (default today, UTC): what the file held
        when read or last saved, and this process's unsaved additions."""
        day = day or self.today()
        saved = self._data["accounts"].get(account, {}).get(key, {}).get(day, 0)
        return int(saved) + self._daily.get((key, account, day), 0)

    def add_download(self, account: str, nbytes: int) -> None:
        """Count ``nbytes`` downloaded today (UTC) for ``account``."""
        self.add_daily("downloads", account, nbytes)

    def downloaded(self, account: str) -> int:
        """Bytes downloaded today (UTC) for ``account``, this process's unsaved ones included."""
        return self.daily("downloads", account)

    def save(self) -> None:
        """Merge this process's changes into the file on disk and write it atomically."""
        if not self._folders and not self._daily and not self._undone and not self._unfinished \
                and not self._replace_bad_file:
            return
        _ensure_private_dir(self.directory)
        guard = _FileLock(self.directory / "state.lock")
        try:
            guard.acquire(wait=True)
        except OSError as exc:
            raise StateError(f"cannot lock {self.directory / 'state.lock'}: {exc}") from exc
        try:
            try:
                data = self._read()
            except StateError:
                if not self._replace_bad_file:
                    raise
                data = self._empty()
            data["version"] = STATE_VERSION
            horizon = (self.now().astimezone(timezone.utc).date()
                       - timedelta(days=DOWNLOAD_DAYS_KEPT)).isoformat()
            for (account, name), state in self._folders.items():
                folders = data["accounts"].setdefault(account, {}).setdefault("folders", {})
                folders[name] = dataclasses.asdict(state)
            for (key, account, day), amount in self._daily.items():
                counts = data["accounts"].setdefault(account, {}).setdefault(key, {})
                counts[day] = int(counts.get(day, 0)) + amount
            for (account, rules), entry in self._undone.items():
                undone = data["accounts"].setdefault(account, {}).setdefault("undone", {})
                if not isinstance(undone, dict):
                    undone = data["accounts"][account]["undone"] = {}
                kept = undone.get(rules)
                if not isinstance(kept, dict):
                    kept = undone[rules] = {"folders": {}, "gm_msgids": []}
                for name, place in entry["folders"].items():
                    old = kept.setdefault("folders", {}).get(name)
                    if not isinstance(old, dict) or old.get("uidvalidity") != place["uidvalidity"]:
                        old = kept["folders"][name] = {"uidvalidity": place["uidvalidity"],
                                                       "uids": []}
                    old["uids"] = sorted(set(old.get("uids") or []) | set(place["uids"]))
                kept["gm_msgids"] = sorted(set(kept.get("gm_msgids") or [])
                                           | set(entry["gm_msgids"]))
            for (account, name, kind), (uidvalidity, entries) in self._unfinished.items():
                places = data["accounts"].setdefault(account, {}).setdefault("unfinished", {})
                place = places.get(name)
                if not isinstance(place, dict) or place.get("uidvalidity") != uidvalidity:
                    place = places[name] = {"uidvalidity": uidvalidity}
                kept = place.setdefault(kind, {})
                for uid, value in entries.items():
                    if value is None:
                        kept.pop(str(uid), None)
                    else:
                        kept[str(uid)] = value
            for account in data["accounts"].values():
                for key in _DAILY_COUNTS:
                    counts = account.get(key, {})
                    for day in [d for d in counts if d < horizon]:
                        del counts[day]
                _drop_unfinished_renumbered(account)
            # A name the server sent in 8-bit bytes holds lone surrogates (surrogateescape):
            # JSON's \\u escapes keep them, where UTF-8 cannot (as the audit log does).
            text = json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
            _write_atomic(self.path, _LONE_SURROGATE.sub(_escape_char, text))
            self._data = data
            self._folders.clear()
            self._daily.clear()
            self._undone.clear()
            self._unfinished.clear()
            self._replace_bad_file = False
        finally:
            guard.release()

    def lock(self, account: str, command: str = "run") -> AccountLock:
        """The lock for ``account``; use it as ``with store.lock(key):``.  One file for
        every spelling of one account: the server reads the user name and DNS the host
        name without regard to case (Gmail as well its googlemail alias and a host's
        trailing dot), so ``Me@Gmail.com on IMAP.gmail.com`` is locked out by a watch as
        ``me@gmail.com on imap.gmail.com``.  (Two users whose names differ only in case
        share the lock: the safe way round.)"""
        stem = _lock_stem(account)
        path = self.directory / f"{stem}.lock"
        # Lock files named after another spelling (by versions before this one, which a
        # watch that runs for days may still be): held too, as long as they are there.
        older = [other for other in sorted(self.directory.glob("*.lock"))
                 if other != path and _lock_stem(other.stem) == stem]
        return AccountLock(path, account, command, also=older)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold off SIGINT, SIGTERM and SIGHUP for a moment (one write of audit records), so a
    signal handler never runs half way through it.  Main thread and POSIX only; elsewhere
    a no-op."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
              if hasattr(signal, name)}
    # The mask as it is, read before anything is blocked: a handler may run (and raise)
    # the moment the blocking call returns, and the finally must still undo it.
    old = mask(signal.SIG_BLOCK, ())
    try:
        mask(signal.SIG_BLOCK, wanted)
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


# What json.dumps(record, ensure_ascii=False, sort_keys=True) builds on every call, built
# once: the audit log writes a record per message changed.
_RECORD_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True)


def _record_encoder() -> Callable[[Any], str]:
    """``_RECORD_JSON.encode``, the same text, with CPython's C encoder set up once for all
    the values it is given rather than once a value (as encode() does: a tenth of the
    encoding's CPU, at two records per message changed).  Elsewhere, or should that
    encoder's signature change, encode() itself."""
    encode = _c_record_encoder()
    if encode is None:
        return _RECORD_JSON.encode
    return lambda value: "".join(encode(value, 0))


def _c_record_encoder() -> Optional[Callable[[Any, int], Sequence[str]]]:
    """CPython's C encoder made as _RECORD_JSON.iterencode makes it: ``encode(value, 0)``
    gives the chunks of ``_RECORD_JSON.encode(value)``.  None where there is none."""
    make = getattr(json.encoder, "c_make_encoder", None)
    encoder = _RECORD_JSON
    try:    # the arguments JSONEncoder.iterencode passes it; {}: circular records refused
        return make({}, encoder.default, json.encoder.encode_basestring, encoder.indent,
                    encoder.key_separator, encoder.item_separator, encoder.sort_keys,
                    encoder.skipkeys, encoder.allow_nan) if make is not None else None
    except TypeError:
        return None


def _record_lines(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """Each record as its line of the audit log: ``_RECORD_JSON.encode(record) + "\n"``."""
    encode = _record_encoder()
    for record in records:
        yield encode(record) + "\n"


def _value_texts() -> Tuple[Callable[[Any], str], Callable[[Iterable[Any]], Tuple[str, ...]]]:
    """``(text, texts)``: functions giving a value's text as _RECORD_JSON writes it within
    a record (``texts``: of each value of a record's fields, in one call): a string, a
    whole number, true, false and null here, at the cost of a call (the C encoder's set-up
    costs several), or in ``texts`` a string or whole number without one (most fields
    are); a list's items one by one; anything else the encoder's text.  A dict or other
    container met again (a change or "actions" that a step's records share) is encoded
    once: it is known by its identity and kept (so that identity is never another's),
    which is why the functions live only as long as one write's records (a
    _RecordShape's), and their shared parts must not change meanwhile."""
    chunks = _c_record_encoder()
    if chunks is None:
        chunks = lambda value, _: (_RECORD_JSON.encode(value),)  # noqa: E731
    join, string = "".join, json.encoder.encode_basestring
    number = repr       # int.__repr__, for an int itself (not a subclass), at less cost
    separator = _RECORD_JSON.item_separator
    known: Dict[int, Tuple[Any, str]] = {}

    def item(value: Any) -> str:
        kind = type(value)
        if kind is str:
            return string(value)
        if kind is int:
            return number(value)
        if value is None:
            return "null"
        if value is True:
            return "true"
        if value is False:
            return "false"
        seen = known.get(id(value))
        if seen is None:
            seen = known[id(value)] = (value, join(chunks(value, 0)))
        return seen[1]

    def text(value: Any) -> str:
        kind = type(value)
        if kind is list or kind is tuple:       # its own, of values maybe shared
            return "[" + separator.join(map(item, value)) + "]"
        return item(value)

    def texts(values: Iterable[Any]) -> Tuple[str, ...]:
        return tuple([string(value) if type(value) is str else
                      number(value) if type(value) is int else text(value)
                      for value in values])

    return text, texts


class _RecordShape:
    """The audit lines of records that share a stamp: a step's intents (or its unsent
    changes), each ``dict(stamp, **entry)``.  The stamp's fields (type, run, time,
    account, command...) are encoded once, into a format with a slot for each of an
    entry's own fields (``own``), so a line costs the encoding of those alone and no
    merged dict.  Every line is the text ``_RECORD_JSON.encode(dict(stamp, **entry)) +
    "\n"`` gives: its keys sorted, with the encoder's spacing, and each value as the
    encoder writes it (its text alone is its text within a record: ``text``, see
    _value_texts; a shape serves one write).  An entry of another shape (a key more or
    less) is encoded whole.  A step's message records take the same format, their
    values written by Run._message_lines."""

    def __init__(self, stamp: Mapping[str, Any], own: Iterable[str]) -> None:
        self.stamp = dict(stamp)
        own = tuple(sorted(own))
        self.own_of = operator.itemgetter(*own) if len(own) > 1 else None
        self.size = len(own)
        self.encode = _record_encoder()
        keys = set(self.stamp) | set(own)
        self.usable = (self.own_of is not None and not set(self.stamp) & set(own) and
                       all(type(key) is str for key in keys))
        if not self.usable:
            return
        fields = []
        for key in sorted(keys):
            value = "%s" if key in own else self.encode(self.stamp[key]).replace("%", "%%")
            fields.append(json.encoder.encode_basestring(key).replace("%", "%%") +
                          _RECORD_JSON.key_separator + value)
        self.format = "{" + _RECORD_JSON.item_separator.join(fields) + "}\n"
        self.text, self.texts = _value_texts()

    def line(self, entry: Mapping[str, Any]) -> str:
        """The line of ``dict(stamp, **entry)``, without making that dict."""
        if self.usable and type(entry) is dict and len(entry) == self.size:
            try:
                values = self.own_of(entry)
            except KeyError:
                pass
            else:
                return self.format % self.texts(values)
        return self.encode(dict(self.stamp, **entry)) + "\n"


# The fields of an intent (or unsent) record besides the run's stamp, as
# _FolderRun._intents makes them: their shape's own fields.
_ENTRY_FIELDS = ("folder", "uid", "uidvalidity", "gm_msgid", "message_id", "size",
                 "internaldate", "subject", "changes")


# The fields of a message record besides the run's stamp (see Run.record), sorted: the
# order of Run._message_lines's values.
_MESSAGE_FIELDS = ("actions", "applied", "changes", "folder", "from", "gm_msgid",
                   "message_id", "reasons", "rules", "subject", "uid", "uidvalidity")


def _entry_lines(stamp: Mapping[str, Any], entries: Iterable[Mapping[str, Any]]
                 ) -> Iterator[str]:
    """The lines of ``dict(stamp, **entry)`` for each of a step's intent entries."""
    shape = _RecordShape(stamp, _ENTRY_FIELDS)
    for entry in entries:
        yield shape.line(entry)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8_line(line: str) -> bytes:
    """A record's line in UTF-8.  A header's bytes that were not the UTF-8 they claimed are
    kept as lone surrogates (surrogateescape), which UTF-8 cannot hold; in a record's JSON
    they stand only within strings, so each is written as its JSON escape (as the C
    encoder's ASCII mode writes them), which reads back as the same string; but for a high
    and a low surrogate side by side (a UTF-7 word can decode so), which read back as the
    one character they encode."""
    try:
        return line.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub(lambda found: "\\u%04x" % ord(found.group()),
                                   line).encode("utf-8")


class AuditLog:
    """``audit.jsonl``: one JSON record per line, appended once the server confirmed.

    Policy: a run's first write (``rotate``) finds the file past AUDIT_MAX_BYTES (16 MB,
    some 20,000 records) and makes it ``audit.jsonl.1``, replacing the one before;
    ``records()`` reads both, oldest first.  Only a run's first write rotates, and only
    while no other run is writing (each holds ``writing()`` from its first write to its
    end), so no run's records are moved out of reach while it runs: the last run is kept
    whole however large it grew (a first run over years of mail may write more than the
    limit), with whatever the two files hold before it.  Where there are no shared locks
    (Windows) another account's run may rotate once meanwhile: the large run's first
    records are then in ``audit.jsonl.1``, until a second rotation.  An undo never
    rotates: the run it takes back may be in ``audit.jsonl.1``, and an undo stopped half
    way must find it again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.previous = path.with_name(path.name + ".1")
        self.writers = path.with_name(path.name + ".writers")     # see writing()

    def append(self, records: Iterable[Mapping[str, Any]], *, sync: bool = True,
               rotate: bool = False) -> None:
        """Append records, written while signals are held off, then fsync (unless
        ``sync`` is False: records the next synced append or the run's end makes durable);
        with ``rotate`` (a run's first write), rotate first if the file is past its size
        and no other run is writing.  A torn last line (a crash mid-write) gets its newline
        first, so it can never swallow the records that follow."""
        self.write(_record_lines(records), sync=sync, rotate=rotate)

    def write(self, texts: Iterable[str], *, sync: bool = True, rotate: bool = False) -> bool:
        """append() for records already encoded: each text a line (see _record_lines).
        Returns whether there was anything to write."""
        # Encoded record by record into chunks of bytes: one str of a whole step's records
        # (10,000 of them) would take up to four bytes a character, and its copy again.
        chunks: List[bytes] = []
        lines: List[bytes] = []
        held = 0
        for line in texts:
            lines.append(_utf8_line(line))
            held += len(lines[-1])
            if held >= AUDIT_CHUNK_BYTES:
                chunks.append(b"".join(lines))
                lines, held = [], 0
        if lines:
            chunks.append(b"".join(lines))
        del lines
        if not chunks:
            return False
        guard = _FileLock(self.path.with_name(self.path.name + ".lock"))
        # One writer at a time, threads (a watch of several accounts) and processes (runs
        # of other accounts) alike: two that both found the file past its size would
        # otherwise both rotate it, the second replacing audit.jsonl.1 with a file of a
        # few records; and a torn line's newline must be added by the writer who saw it.
        with self._threads:
            try:
                try:
                    guard.acquire(wait=True)
                except FileNotFoundError:
                    # The state directory is made (private) when missing, not before every
                    # write (a run writes here some eighty times; the lock and the state
                    # file's saves keep it private).
                    _ensure_private_dir(self.path.parent)
                    guard.acquire(wait=True)
                try:
                    self._append_locked(chunks, sync, rotate)
                finally:
                    guard.release()
            except OSError as exc:
                raise StateError(f"cannot write the audit log {self.path}: {exc}") from exc
        return True

    def writing(self) -> Optional[int]:
        """A run that has written says so until it ends (pass the result to
        ``done_writing``): a shared lock on ``audit.jsonl.writers`` (flock: each holder's
        own open file, so threads of one process count apart), so that no other run's first
        write rotates the log from under it.  None where there are no shared locks."""
        if fcntl is None:
            return None
        try:
            fd = os.open(self.writers, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def done_writing(fd: Optional[int]) -> None:
        if fd is not None:
            os.close(fd)        # the lock goes with it

    def _others_writing(self) -> bool:
        """Whether a run holds writing() (asked under the write lock, before a rotation)."""
        if fcntl is None:
            return False
        try:
            fd = os.open(self.writers, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return True         # cannot tell: keep every record, rotate another time
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    _threads = threading.Lock()      # every AuditLog of this process: see append

    def _append_locked(self, chunks: List[bytes], sync: bool, rotate: bool) -> None:
        if rotate and self.path.exists() and self.path.stat().st_size > AUDIT_MAX_BYTES \
                and not self._others_writing():
            os.replace(self.path, self.previous)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size:
                os.lseek(fd, size - 1, os.SEEK_SET)    # O_APPEND writes at the end anyway
                if os.read(fd, 1) != b"\n":
                    chunks[0] = b"\n" + chunks[0]
            with _signals_held():       # every chunk written, or (SIGKILL) a torn line
                for chunk in chunks:
                    os.write(fd, chunk)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def records(self, *, unreadable: bool = False) -> Iterator[Dict[str, Any]]:
        """Every record still held, oldest first; unreadable lines, and records whose fields
        have the wrong types (see _audit_record_problem), are skipped with a warning:
        history and undo never act on them.  With ``unreadable``, each unreadable line
        yields ``{"type": "unreadable", "run": ...}`` naming the run it most likely
        belonged to (its own "run" field if legible, else the record before it)."""
        bad = 0
        malformed: List[str] = []
        last_run: Optional[str] = None
        for path in (self.previous, self.path):
            try:
                handle = open(path, encoding="utf-8", errors="replace")
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StateError(f"cannot read the audit log {path}: {exc}") from exc
            with handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = load_json(line)
                    except ValueError:
                        bad += 1
                        # A torn or damaged line: whose it was, as far as can be told, so
                        # history can call that run possibly incomplete.
                        named = re.search(r'"run":\s*"([^"\\]{1,64})"', line)
                        owner = named.group(1) if named else last_run
                        if unreadable and owner:
                            yield {"type": "unreadable", "run": owner}
                        continue
                    if not isinstance(record, dict):
                        continue
                    problem = _audit_record_problem(record)
                    if problem:
                        malformed.append(f"{path} line {number}: {problem}")
                        continue
                    if isinstance(record.get("run"), str):
                        last_run = record["run"]
                    yield record
        if bad:
            log.warning("skipped %d unreadable lines of %s", bad, self.path)
        if malformed:
            more = f" (and {len(malformed) - 3} more)" if len(malformed) > 3 else ""
            log.warning("skipped %d malformed audit records, left out of history and undo: "
                        "%s%s", len(malformed), "; ".join(malformed[:3]), more)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_place(value: Any) -> bool:
    """A change's before/after: a flag or label state, nothing, or where the message was."""
    if value is None or isinstance(value, bool):
        return True
    return isinstance(value, dict) and _is_str(value.get("folder")) and \
        _optional(_is_int)(value.get("uid")) and _optional(_is_int)(value.get("uidvalidity")) \
        and _optional(_is_int)(value.get("uidnext"))


def _is_change(value: Any) -> bool:
    return isinstance(value, dict) and _is_str(value.get("action")) and \
        _optional(_is_str)(value.get("label")) and _optional(_is_str)(value.get("flag")) and \
        _is_place(value.get("before")) and _is_place(value.get("after"))


def _is_msgid(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, str) and value.isdigit())


# The audit record fields history and undo read, and the type each must have when present.
_AUDIT_FIELDS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "type": (_is_str, "a string"), "run": (_is_str, "a string"),
    "undo_of": (_optional(_is_str), "a run id"), "time": (_optional(_is_str), "a string"),
    "account": (_optional(_is_str), "a string"), "host": (_optional(_is_str), "a string"),
    "account_name": (_optional(_is_str), "a string"),
    "command": (_optional(_is_str), "a string"), "status": (_optional(_is_str), "a string"),
    "applied": (lambda v: isinstance(v, bool), "true or false"),
    "changes_made": (_is_int, "a whole number"),
    "folders": (_list_of(_is_str), "a list of folder names"),
    "counts": (lambda v: isinstance(v, dict) and all(_is_int(n) for n in v.values()),
               "an object of whole numbers"),
    "reports": (_list_of(lambda r: isinstance(r, dict) and
                         _optional(_list_of(_is_str))(r.get("created"))),
                "a list of folder reports"),
    "folder": (_is_str, "a folder name"), "uid": (_optional(_is_int), "a UID"),
    "uidvalidity": (_optional(_is_int), "a whole number"),
    "gm_msgid": (_optional(_is_msgid), "a message id number"),
    "message_id": (_optional(_is_str), "a string"), "subject": (_optional(_is_str), "a string"),
    "changes": (_list_of(_is_change), "a list of changes"),
    "left_alone": (_list_of(_is_str), "a list of strings"),
    "version": (_is_int, "a whole number"), "create": (_optional(_is_str), "a folder name"),
    "delete": (_optional(_is_str), "a folder name"),
    "size": (_optional(_is_int), "a size in bytes"),
    "internaldate": (_optional(_is_str), "a date"), "rules_hash": (_optional(_is_str), "a string"),
    "reason": (_optional(_is_str), "a string"),
    "uids": (_list_of(_is_int), "a list of UIDs"),
    "new_uids": (_list_of(_optional(_is_int)), "a list of UIDs"),
    "destination": (_optional(_is_str), "a folder name"),
    "action": (_optional(_is_str), "a string"), "label": (_optional(_is_str), "a string"),
    "flag": (_optional(_is_str), "a string"),
    "created": (lambda v: isinstance(v, bool), "true or false"),
    "flight": (lambda v: isinstance(v, bool), "true or false"),
}


def _audit_record_problem(record: Mapping[str, Any]) -> str:
    """What is wrong with one audit record's field types ("" when nothing is)."""
    for name, (check, wanted) in _AUDIT_FIELDS.items():
        if name in record and not check(record[name]):
            return f"{name!r} is not {wanted}"
    return ""


def _added_counts(parts: Iterable[Mapping[str, int]]) -> Dict[str, int]:
    """The counts of ``parts`` added up by key: ``{"label Bank": 237, "archive": 12}``."""
    total: Dict[str, int] = {}
    for part in parts:
        for key, count in part.items():
            total[key] = total.get(key, 0) + count
    return total


class Run(Checkpoint):
    """One run over one account: classify folders, keep the marks, write the records.

    A thin loop is all a caller needs (the command line and ``watch`` do this)::

        store = StateStore(); store.load()
        run = Run(store, rules, "you@gmail.com", "imap.gmail.com", apply=True)
        with store.lock(run.account), GmailConnection(...) as conn:
            for folder in ("INBOX", "Work"):
                run.classify(conn, folder)
            summary = run.finish()          # the summary record; run.finish("interrupted")

    With ``apply`` each step the server confirmed moves the folder's mark, is saved to the
    state file, and its records go to the audit log; a dry run reads the marks, keeps moved
    marks only in memory (``mark_of``), and saves only the download count.
    ``reclassify`` (``--all``) starts every folder from its first message; ``new_only``
    (``--new-only``) sets each folder's mark to its newest message and classifies nothing.
    ``on_record(record)`` receives every message record (with ``changes``) once its step is
    done, and ``on_message(outcome)`` the same as an Outcome.  Raises BudgetExceededError (from classify) when today's downloads would pass
    ``daily_budget`` bytes.
    """

    def __init__(self, store: StateStore, rules: Ruleset, user: str, host: str,
                 port: Optional[int] = None, *, apply: bool = False, reclassify: bool = False,
                 new_only: bool = False, daily_budget: Optional[int] = DEFAULT_DAILY_BUDGET,
                 command: str = "run", undo_of: Optional[str] = None,
                 on_record: Optional[Callable[[Dict[str, Any]], None]] = None,
                 on_message: Optional[Callable[[Outcome], None]] = None,
                 options: Optional[RunOptions] = None) -> None:
        if options is None:         # the keyword settings, unless given as one RunOptions
            options = RunOptions(apply=apply, reclassify=reclassify, new_only=new_only,
                                 daily_budget=daily_budget)
        self.options = options
        self.account_name = options.account_name
        self.store = store
        self.rules = rules
        self.user = user
        self.host = _where(host, port)
        self.account = account_key(user, host, port)
        self.apply = options.apply
        self.reclassify = options.reclassify
        self.new_only = options.new_only
        self.daily_budget = options.daily_budget
        self.command = command
        self.undo_of = undo_of
        self.on_record = on_record
        self.on_message = on_message
        self.started = store.now()
        # "20261201T170501-3fa2": sortable by time, unique enough to type into undo.
        self.id = self.started.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + \
            os.urandom(2).hex()
        self.rules_hash = rules_hash(rules)
        self.reports: List[FolderReport] = []
        self.counts: Dict[str, int] = {}
        self.changes_made = 0
        self.narrowed = False
        self._memory_marks: Dict[str, FolderState] = {}
        self._conn: Optional[GmailConnection] = None
        self._bytes_seen = 0            # the connection's bytes_received when last counted
        self.bytes_counted = 0          # what this run added to the day's download count
        self._audit_began = False       # written to the audit log yet (see _audit_write)
        self._audit_writing: Optional[int] = None
        self._largest_fetch = 0
        self._last_fetch_bytes: Optional[int] = None
        self._warned_half = False
        # The UTC day may_download said no: the next FETCH that day stops the run (a dry
        # watch keeps one Run for days, so a refusal must not outlive its day).
        self._budget_spent: Optional[_dt.date] = None
        self._actions_records: Dict[Actions, Dict[str, Any]] = {}     # see _actions_record
        self._step_actions: Dict[Actions, Dict[str, Any]] = {}     # see _actions_record

    # -- driving it ----------------------------------------------------------------------

    def classify(self, conn: GmailConnection, folder: str, *, since: Optional[_dt.date] = None,
                 limit: Optional[int] = None, batch_size: int = DEFAULT_BATCH,
                 apply_every: Optional[int] = DEFAULT_APPLY_EVERY,
                 on_progress: Optional[Callable[[int, int], None]] = None,
                 on_applied: Optional[Callable[[int, int], None]] = None,
                 now: Optional[_dt.datetime] = None,
                 max_new_folders: Optional[int] = DEFAULT_MAX_NEW_FOLDERS,
                 allow_expunge: bool = False) -> FolderReport:
        """classify_folder with this run as the checkpoint; ``since``/``limit`` never move
        the mark.  Returns the folder's report (also kept in ``reports``, unless the folder
        could not be opened)."""
        report = FolderReport(folder, self.apply)
        self.reports.append(report)
        self.narrowed = since is not None or limit is not None
        try:
            return classify_folder(conn, self.rules, folder, apply=self.apply, since=since,
                                   limit=limit, batch_size=batch_size, on_progress=on_progress,
                                   on_applied=on_applied, now=now, checkpoint=self,
                                   apply_every=apply_every, report=report,
                                   max_new_folders=max_new_folders, allow_expunge=allow_expunge,
                                   jobs=self.options.jobs, hold=self.options.hold)
        except FolderUnavailableError:
            self.reports.remove(report)     # never opened: nothing to report
            raise
        finally:
            self._count_bytes(conn)

    def mark_of(self, folder: str) -> Optional[FolderState]:
        """The folder's state as this run sees it (a dry run's moved marks included)."""
        return self._memory_marks.get(folder) or self.store.folder(self.account, folder)

    @property
    def changes_not_made(self) -> int:
        return sum(report.changes_not_made for report in self.reports)

    def already_done(self) -> Dict[str, int]:
        """Decisions the server already had, over all folders: ``{"label Bank": 237}``."""
        return _added_counts(report.already_done for report in self.reports)

    def finish(self, status: str = "complete", error: str = "") -> Dict[str, Any]:
        """End the run: save the state, and for an ``--apply`` that changed something or
        did not complete, append the summary record to the audit log.  ``status`` is
        ``complete``, ``interrupted``, ``stopped`` (budget) or ``failed``.  Returns the
        summary record (what ``--json`` prints last)."""
        if self._conn is not None:
            self._count_bytes(self._conn)
        self.store.save()
        summary: Dict[str, Any] = {
            "type": "summary", "version": RECORD_VERSION, "run": self.id,
            "time": _iso(self.started), "ended": _iso(self.store.now()),
            "account": self.user, "host": self.host, "command": self.command,
            "applied": self.apply, "status": status, "error": error,
            "folders": [report.folder for report in self.reports],
            "counts": dict(self.counts), "changes_made": self.changes_made,
            "changes_not_made": self.changes_not_made, "already_done": self.already_done(),
            "reports": [dataclasses.asdict(report) for report in self.reports],
        }
        summary.update(self._undoing(), **self._named())
        if self._conn is not None:
            summary.update(imap_commands=self._conn.commands_sent,
                           bytes_received=self.bytes_counted,
                           reconnects=self._conn.reconnects)
        try:
            if self.apply and (self.changes_made or self.changes_not_made or self.undo_of or
                               (status != "complete" and self.reports)):
                self._audit_write(_record_lines([summary]))
        finally:
            self.store.audit.done_writing(self._audit_writing)
            self._audit_writing = None
        return summary

    # -- the Checkpoint hooks ------------------------------------------------------------

    def start(self, conn: GmailConnection, status: FolderStatus) -> int:
        self._count_bytes(conn)
        known = self.mark_of(status.name)
        if known is not None and known.uidvalidity != status.uidvalidity:
            log.warning("%s: UIDVALIDITY changed from %d to %d (the server renumbered the "
                        "folder); its mark is reset and it is classified from the start",
                        status.name, known.uidvalidity, status.uidvalidity)
            known = None
            self._remember(status.name, FolderState(status.uidvalidity, 0, self.rules_hash))
        if self.new_only:
            newest = (status.uidnext - 1) if status.uidnext else max(
                conn.search(["UID", "*"]) or [0])
            log.info("%s: --new-only: only mail above UID %d will be classified",
                     status.name, newest)
            self._remember(status.name, FolderState(status.uidvalidity, newest,
                                                    self.rules_hash))
            return newest
        if known is not None and known.mark and known.rules != self.rules_hash \
                and not self.reclassify:
            log.warning("%s: the rules changed since it was last classified; mail up to UID "
                        "%d was classified with the old rules (run with --all to classify it "
                        "again)", status.name, known.mark)
            self._remember(status.name, dataclasses.replace(known, rules=self.rules_hash))
        if self.reclassify:
            if known is not None:
                self._remember(status.name, dataclasses.replace(known, rules=self.rules_hash))
            return 0
        return known.mark if known is not None else 0

    def leave_alone(self, status: FolderStatus) -> Tuple[frozenset, frozenset]:
        if self.reclassify:
            return frozenset(), frozenset()
        return self.store.undone(self.account, self.rules_hash, status.name, status.uidvalidity)

    def unfinished(self, status: FolderStatus, kind: str) -> Mapping[int, Any]:
        return self.store.unfinished(self.account, status.name, status.uidvalidity, kind)

    def keep_unfinished(self, conn: GmailConnection, status: FolderStatus, kind: str,
                        entries: Mapping[int, Any]) -> None:
        if self.apply:
            self.store.add_unfinished(self.account, status.name, status.uidvalidity, kind,
                                      entries)
            self._count_bytes(conn)
            self.store.save()

    def finished(self, status: FolderStatus, mark: int, start: int = 0) -> None:
        if self.apply:
            self.store.finish_unfinished(self.account, status.name, status.uidvalidity,
                                         up_to=mark, above=start)

    def before_fetch(self, conn: GmailConnection) -> None:
        self._count_bytes(conn)
        first = self._last_fetch_bytes is None
        if not first:
            self._largest_fetch = max(self._largest_fetch,
                                      conn.bytes_received - self._last_fetch_bytes)
        self._last_fetch_bytes = conn.bytes_received
        if not self.daily_budget:
            return
        used = self.store.downloaded(self.account)
        if used >= self.daily_budget / 2 and not self._warned_half:
            self._warned_half = True
            log.warning("%s downloaded today for %s: half of the daily budget of %s (best "
                        "effort: phones and mail apps share Gmail's quota)", _human_size(used),
                        self.account, _human_size(self.daily_budget))
        # What the FETCHes on the wire may bring: as much each as the largest so far (with
        # the bodies fetched between); the first goes out alone, its size guessed.
        ahead = self.first_fetch_guess if first else self._largest_fetch * self.fetches_ahead
        now = self.store.now().astimezone(timezone.utc)
        if self._budget_spent == now.date() or used + ahead > self.daily_budget:
            tomorrow = datetime.combine(now.date() + timedelta(days=1), _dt.time(),
                                        tzinfo=timezone.utc)
            hours = (tomorrow - now).total_seconds() / 3600
            raise BudgetExceededError(
                f"stopped before passing the daily download budget of "
                f"{_human_size(self.daily_budget)} for {self.account} ({_human_size(used)} "
                f"today); run again after 00:00 UTC (in {hours:.1f} h), or raise "
                f"--daily-budget")

    def may_download(self, conn: GmailConnection, expected: int) -> bool:
        self._count_bytes(conn)
        # Beside the bodies: the header FETCHes on the wire, whose answers are still to come.
        expected += self._largest_fetch * self.fetches_ahead
        if not self.daily_budget or self.store.downloaded(self.account) + expected \
                <= self.daily_budget:
            return True
        self._budget_spent = self.store.now().astimezone(timezone.utc).date()
        return False

    writes_ahead = True

    def content_skipped(self, status: FolderStatus, skips: Mapping[int, str]) -> None:
        if self.apply:
            self._audit_write(_record_lines([
                self._stamp("skipped", folder=status.name, uid=uid,
                            uidvalidity=status.uidvalidity, reason=why)
                for uid, why in sorted(skips.items())]))

    def intend(self, conn: GmailConnection, entries: Sequence[Dict[str, Any]]) -> None:
        """Write-ahead: the step's intent records, in one write and one fsync, before any
        of its write commands goes on the wire (see README, "Audit log")."""
        if not self.apply or not entries:
            return
        self._count_bytes(conn)
        stamp = self._stamp("intent", rules_hash=self.rules_hash, **self._undoing())
        self._audit_write(_entry_lines(stamp, entries))

    def not_sent(self, conn: GmailConnection, entries: Sequence[Dict[str, Any]]) -> None:
        """Record that these intended changes were never sent (a stop between commands):
        history does not count them and undo does not look for them."""
        if self.apply and entries:
            self._audit_write(_entry_lines(self._stamp("unsent"), entries))

    def confirmed(self, conn: GmailConnection, entry: Dict[str, Any]) -> None:
        """A ``done`` record as each write command is confirmed: one write, no fsync (the
        step's records end with one; the intents before it were made durable)."""
        if self.apply:
            self._audit_write(_record_lines([self._stamp("done", **self._undoing(), **entry)]),
                              sync=False)

    def step_done(self, conn: GmailConnection, status: FolderStatus, mark: Optional[int],
                  outcomes: Sequence[Outcome]) -> None:
        time = _iso(self.store.now())      # one for the step's records (see record)
        self._step_actions = {}
        if self.apply:
            self._audit_write(self._message_lines(outcomes, time))
        names: Dict[int, Tuple[Mapping[str, Any], str]] = {}     # see _count
        for outcome in outcomes:
            if outcome.changes:
                self._count(outcome.changes, outcome.applied, names)
        if mark is not None and not self.narrowed:
            known = self.mark_of(status.name)
            if known is not None and known.uidvalidity == status.uidvalidity:
                mark = max(mark, known.mark)
            self._remember(status.name, FolderState(status.uidvalidity, mark, self.rules_hash))
        self._count_bytes(conn)
        self.store.save()
        if self.on_record is not None:      # the records a text output would not read
            for outcome in outcomes:        # are never made (see _run_account)
                self.on_record(self.record(outcome, time))
        if self.on_message is not None:
            for outcome in outcomes:
                self.on_message(outcome)

    def add_records(self, records: Sequence[Dict[str, Any]], announce: bool = True) -> None:
        """Count message records; with ``apply``, append those with changes to the audit
        log (the server has confirmed them); then pass them to ``on_record``."""
        if self.apply:
            self._audit_write(_record_lines(record for record in records if record["changes"]))
        names: Dict[int, Tuple[Mapping[str, Any], str]] = {}     # see _count
        for record in records:
            self._count(record["changes"], record["applied"], names)
        if announce and self.on_record is not None:
            for record in records:
                self.on_record(record)

    # -- helpers -------------------------------------------------------------------------

    def _audit_write(self, texts: Iterable[str], sync: bool = True) -> None:
        """Append encoded records (_record_lines) to the audit log.  The run's first write
        may rotate it, no later one, nor an undo's; from then on until finish() the run
        holds the log's writing() mark, so no other run rotates it (see AuditLog)."""
        audit, first = self.store.audit, not self._audit_began
        if audit.write(texts, sync=sync, rotate=first and self.undo_of is None) and first:
            self._audit_began = True
            self._audit_writing = audit.writing()

    def _count(self, changes: Sequence[Mapping[str, Any]], applied: bool,
               names: Dict[int, Tuple[Mapping[str, Any], str]]) -> None:
        """Count one message's changes by name (``counts``), and as made when applied.
        ``names``: the name of each change counted with it, by identity: a change the
        messages of a step share (a label on Gmail, a flag) is one dict, named once; kept
        there, so that its id is its own while ``names`` lives."""
        counts = self.counts
        for change in changes:
            known = names.get(id(change))
            if known is None:
                known = names[id(change)] = (change, describe_change(change))
            counts[known[1]] = counts.get(known[1], 0) + 1
        if applied:
            self.changes_made += len(changes)

    def record(self, outcome: Outcome, time: Optional[str] = None) -> Dict[str, Any]:
        """The JSON record of one message (see README, "Records"); ``time``: its "time"
        (a step's records share the step's), else now."""
        matches = outcome.decision.matches
        return {"type": "message", "version": RECORD_VERSION, "run": self.id,
                "time": _iso(self.store.now()) if time is None else time,
                "account": self.user, "host": self.host,
                "folder": outcome.folder, "uid": outcome.uid, "uidvalidity": outcome.uidvalidity,
                "gm_msgid": outcome.msgid, "message_id": outcome.message_id,
                "subject": outcome.subject, "from": outcome.sender,
                "rules": [name for name, _ in matches],
                "reasons": [reason for _, reason in matches],
                "actions": self._actions_record(outcome.decision.actions),
                "applied": outcome.applied, "changes": list(outcome.changes), **self._named()}

    def _message_lines(self, outcomes: Sequence[Outcome], time: str) -> Iterator[str]:
        """The audit lines of a step's messages with changes: each the line of
        ``record(outcome, time)`` (_record_lines), its fields' texts written into the
        step's format (_RecordShape) without the record being made, and what messages
        share (their "actions", their rules and reasons) written once."""
        stamp = {"type": "message", "version": RECORD_VERSION, "run": self.id, "time": time,
                 "account": self.user, "host": self.host, **self._named()}
        shape = _RecordShape(stamp, _MESSAGE_FIELDS)       # usable: its keys are ours
        text, texts, form = shape.text, shape.texts, shape.format
        actions_texts: Dict[int, Tuple[Actions, str]] = {}    # by identity, kept alive
        matches_texts: Dict[Tuple[Tuple[str, str], ...], Tuple[str, str]] = {}
        for outcome in outcomes:
            if not outcome.changes:
                continue
            decision = outcome.decision
            actions = actions_texts.get(id(decision.actions))
            if actions is None:
                actions = actions_texts[id(decision.actions)] = (
                    decision.actions, text(self._actions_record(decision.actions)))
            matches = matches_texts.get(decision.matches)
            if matches is None:
                matches = matches_texts[decision.matches] = (
                    text([reason for _, reason in decision.matches]),
                    text([name for name, _ in decision.matches]))
            applied, changes, folder, sender, msgid, message_id, subject, uid, uidvalidity = \
                texts((outcome.applied, outcome.changes, outcome.folder, outcome.sender,
                       outcome.msgid, outcome.message_id, outcome.subject, outcome.uid,
                       outcome.uidvalidity))
            # The order of _MESSAGE_FIELDS, sorted.
            yield form % (actions[1], applied, changes, folder, sender, msgid, message_id,
                          matches[0], matches[1], subject, uid, uidvalidity)

    def _actions_record(self, actions: Actions) -> Dict[str, Any]:
        """A message record's "actions" (``{}`` when none): Actions.as_record, worked out
        once per distinct Actions (_remembered); the records of a step share a copy (one
        dict per Actions a step, not one a record), each step its own."""
        shared = self._step_actions.get(actions)
        if shared is None:
            known = _remembered(self._actions_records, actions,
                                lambda: {} if actions.is_empty() else actions.as_record())
            shared = self._step_actions[actions] = (
                {**known, "labels": list(actions.labels)} if known else {})
        return shared

    def _stamp(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """A write-ahead record of this run (INTENT_VERSION): its type ``kind``, the run,
        time, account and command, then ``fields``."""
        return {"type": kind, "version": INTENT_VERSION, "run": self.id,
                "time": _iso(self.store.now()), "account": self.user, "host": self.host,
                "command": self.command, **self._named(), **fields}

    def _undoing(self) -> Dict[str, str]:
        """``{"undo_of": ...}`` in an undo's records, else nothing."""
        return {"undo_of": self.undo_of} if self.undo_of else {}

    def _named(self) -> Dict[str, str]:
        """``{"account_name": ...}`` for a run of an [[account]] table, else nothing (an
        optional field: readers take a record without it as today's)."""
        return {"account_name": self.account_name} if self.account_name else {}

    def _remember(self, folder: str, state: FolderState) -> None:
        state = dataclasses.replace(state, updated=_iso(self.store.now()))
        self._memory_marks[folder] = state
        if self.apply and not self.narrowed:
            self.store.set_folder(self.account, folder, state)

    def count_after(self, previous: "Run") -> None:
        """Go on counting downloaded bytes where ``previous`` stopped, on the connection
        they share (a watch's wake-ups): without this, a run that meets a connection
        counts all it received since it connected, as it must for a new one, and every
        wake-up on a long-lived connection would count the whole watch again."""
        if previous._conn is not None:
            self._conn, self._bytes_seen = previous._conn, previous._bytes_seen

    def _count_bytes(self, conn: GmailConnection) -> None:
        if conn is not self._conn:
            self._conn, self._bytes_seen = conn, 0
            self._last_fetch_bytes = None
        received = conn.bytes_received - self._bytes_seen
        self.store.add_download(self.account, received)
        self.bytes_counted += received
        self._bytes_seen = conn.bytes_received


class _Creates:
    """What became of the CREATEs one run announced, read from its records in log order.

    A step announces all its new folders in one intent, then sends their CREATEs, each
    answer recorded by a ``done`` record (created, existed or refused).  Intents marked
    ``flight`` had their CREATEs sent back to back (_WriteFlight): every one announced and
    unanswered at the end of the log may have been made, and is "maybe".  Older runs sent
    them one by one: there only the first announced and unanswered folder can have been
    sent (the process ended while it was in flight), a refusal ended the step, and nothing
    announced after the command in flight was ever sent.
    """

    def __init__(self) -> None:
        self.made: Dict[str, Optional[bool]] = {}
        self._pending: List[str] = []
        self._flight: List[str] = []     # announced as one flight, not answered yet

    def read(self, record: Mapping[str, Any]) -> None:
        """Take in one record of the run (others are ignored)."""
        name = record.get("create")
        if record.get("type") == "intent" and name:
            (self._flight if record.get("flight") else self._pending).append(name)
        elif record.get("type") == "done" and name:
            self.made[name] = bool(record.get("created"))
            if name in self._flight:
                self._flight.remove(name)
            elif record.get("answer") == "refused":
                self._pending = []
            elif name in self._pending:
                self._pending = self._pending[self._pending.index(name) + 1:]
        elif record.get("type") == "summary":
            for report in record.get("reports") or []:
                for created in report.get("created") or []:
                    self.made[created] = True

    def outcome(self) -> Dict[str, Optional[bool]]:
        """folder -> True (the run made it), False (it did not), None (maybe)."""
        result = dict(self.made)
        if self._pending and self._pending[0] not in result:
            result[self._pending[0]] = None
        for name in self._flight:
            result.setdefault(name, None)
        return result


def history(store: StateStore) -> List[Dict[str, Any]]:
    """The runs the audit log still holds, newest first.

    Each is a dict: ``run``, ``time``, ``account``, ``host``, ``command`` (run, undo),
    ``folders``, ``counts`` (``{"label Receipts": 12, "archive": 12}``), ``changes_made``,
    ``status`` (complete, interrupted, stopped, failed; ``unfinished`` when the process
    died before writing its summary), ``undo_of`` and ``undone_by`` (run ids or None).
    ``maybe`` counts changes whose intent was written but whose confirmation was not (the
    command was sent, or was about to be, when the run ended): they count as made, in
    ``counts`` and ``changes_made`` too.  ``skipped``: messages left alone for their
    content.  ``possibly_incomplete``: a line of the log that seems to be this run's
    could not be read.  A change a ``done`` record confirmed is made, not maybe, even
    when the process died before writing its message record.  ``folders_created``: the
    folders the run created (undo deletes them when empty), ``folders_created_maybe`` of
    them whose CREATE was announced but never answered.
    """
    ledger = _HistoryLedger()
    for record in store.audit.records(unreadable=True):
        ledger.read(record)
    return ledger.runs_newest_first()


class _HistoryLedger:
    """What ``history`` gathers from the audit log, one record at a time."""

    def __init__(self) -> None:
        self.runs: Dict[str, Dict[str, Any]] = {}
        self.order: Dict[str, int] = {}   # runs that started in the same second: log order
        self.summarised: set = set()
        self.intended: Dict[str, Dict[Tuple[Any, ...], Dict[str, Any]]] = {}  # run -> change
        self.confirmed: Dict[str, set] = {}  # by a message record (counted there), or unsent
        self.done: Dict[str, set] = {}       # by a done record only, so far
        self.creates: Dict[str, _Creates] = {}

    def read(self, record: Mapping[str, Any]) -> None:
        run_id = record.get("run")
        if not isinstance(run_id, str):
            return
        kind = record.get("type")
        if kind == "unreadable":
            if run_id in self.runs:
                self.runs[run_id]["possibly_incomplete"] = True
            return
        self.order.setdefault(run_id, len(self.order))
        entry = self.runs.setdefault(run_id, {
            "run": run_id, "time": str(record.get("time", "")),
            "account": str(record.get("account", "")), "host": str(record.get("host", "")),
            "command": "run", "folders": [], "counts": {}, "changes_made": 0, "maybe": 0,
            "skipped": 0, "status": "unfinished", "undo_of": None, "undone_by": None,
            "possibly_incomplete": False})
        entry.update((name, record[name]) for name in ("undo_of", "account_name")
                     if record.get(name))
        self.creates.setdefault(run_id, _Creates()).read(record)
        if kind == "done":
            for uid in record.get("uids") or []:
                self.done.setdefault(run_id, set()).add(_done_identity(record, uid))
        elif kind == "intent":
            if record.get("undo_of") or record.get("command") == "undo":
                entry["command"] = "undo"
            for change in record.get("changes") or []:
                self.intended.setdefault(run_id, {})[_change_identity(record, change)] = change
        elif kind == "skipped":
            entry["skipped"] += 1
        elif kind == "unsent" or (kind == "message" and record.get("applied")):
            # unsent: a stop came between commands, so not made
            for change in record.get("changes") or []:
                self.confirmed.setdefault(run_id, set()).add(_change_identity(record, change))
            if kind == "message" and run_id not in self.summarised:
                if record.get("undo_of"):
                    entry["command"] = "undo"
                if record.get("folder") not in entry["folders"]:
                    entry["folders"].append(record.get("folder"))
                for change in record.get("changes") or []:
                    self._count(entry, change)
        elif kind == "summary":
            self.summarised.add(run_id)
            entry.update(time=str(record.get("time", entry["time"])),
                         command=str(record.get("command", "run")),
                         folders=list(record.get("folders") or entry["folders"]),
                         counts=dict(record.get("counts") or {}),
                         changes_made=int(record.get("changes_made") or 0),
                         status=str(record.get("status", "complete")))

    @staticmethod
    def _count(entry: Dict[str, Any], change: Mapping[str, Any]) -> None:
        name = describe_change(change)
        entry["counts"][name] = entry["counts"].get(name, 0) + 1
        entry["changes_made"] += 1

    def runs_newest_first(self) -> List[Dict[str, Any]]:
        for run_id, changes in self.intended.items():
            # Sent (or about to be) but never confirmed: maybe made, so counted as made.  A
            # done record without its message record (the process died before the step's
            # end): made, counted here unless the run's summary counted it.
            entry = self.runs[run_id]
            for key, change in changes.items():
                if key in self.confirmed.get(run_id, ()):
                    continue
                if key in self.done.get(run_id, ()):
                    if run_id in self.summarised:
                        continue
                    if key[0] not in entry["folders"]:
                        entry["folders"].append(key[0])
                else:
                    entry["maybe"] += 1
                self._count(entry, change)
        for entry in self.runs.values():
            made = self.creates[entry["run"]].outcome() if entry["run"] in self.creates else {}
            entry["folders_created"] = sum(1 for value in made.values() if value is not False)
            entry["folders_created_maybe"] = sum(1 for value in made.values() if value is None)
            target = self.runs.get(entry["undo_of"] or "")
            if target is not None and entry["status"] == "complete":
                target["undone_by"] = entry["run"]     # an undo cut short may be run again
        return sorted(self.runs.values(), key=lambda e: (e["time"], self.order[e["run"]]),
                      reverse=True)


def _done_identity(record: Mapping[str, Any], uid: Any) -> Tuple[Any, ...]:
    """_change_identity of the change a ``done`` record confirmed for ``uid``."""
    return (record.get("folder"), uid, record.get("action"), record.get("label"),
            record.get("flag"), record.get("destination"))


def _change_identity(record: Mapping[str, Any], change: Mapping[str, Any]) -> Tuple[Any, ...]:
    """What names one change of one message across its intent and its confirmation (the
    destination UID, known only once confirmed, left out)."""
    after = change.get("after")
    return (record.get("folder"), record.get("uid"), change.get("action"), change.get("label"),
            change.get("flag"), after.get("folder") if isinstance(after, dict) else None)


_UNDO_ACTIONS = {"label": "unlabel", "archive": "unarchive", "move": "move back", "trash": "untrash"}
_MOVE_BACKS = frozenset(back for action, back in _UNDO_ACTIONS.items() if action != "label")
_UNDO_ACTIONS.update({after: before for before, after in list(_UNDO_ACTIONS.items())})


def _inverse_change(change: Mapping[str, Any]) -> Dict[str, Any]:
    inverse = dict(change, before=change.get("after"), after=change.get("before"))
    action = str(change.get("action", ""))
    rows = {row.words: row for row in _FLAG_ACTION_ROWS.values()}
    if action in rows and rows[action].opposite in _FLAG_ACTION_ROWS:
        inverse["action"] = _FLAG_ACTION_ROWS[rows[action].opposite].words
    else:
        inverse["action"] = _UNDO_ACTIONS.get(action, f"undo {action}")
    return inverse


class Undo:
    """Reverse one applied run from its audit records (dry run unless ``apply``).

    ``Undo(store, user, host, run_id=None)`` picks the run (default: the newest applied
    run of this account not undone yet; StateError if there is none, or if ``run_id`` is
    unknown, of another account, or already undone).  ``execute(conn)`` then, for each
    message: brings moved and trashed mail back (found by X-GM-MSGID on Gmail, elsewhere
    by the destination UID checked against the Message-ID, or by Message-ID), restores
    labels and flags, and off Gmail deletes the copies that stood for labels.  A change
    the user has undone or altered since is left alone and reported, and a message that
    is no longer where the run put it is left alone as a whole.  The undo is itself a run
    (``self.run``) whose records reach the audit log; call ``self.run.finish()`` after.
    """

    def __init__(self, store: StateStore, user: str, host: str, port: Optional[int] = None,
                 *, run_id: Optional[str] = None, apply: bool = False,
                 allow_expunge: bool = False,
                 on_record: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        key = account_key(user, host, port)
        self.undo_of = run_id = self._choose(store, key, run_id)
        self.apply = apply
        self.allow_expunge = allow_expunge
        self._read(store, run_id)
        self.deleted: List[str] = []
        self.run = Run(store, Ruleset(()), user, host, port, apply=apply, command="undo",
                       undo_of=run_id, daily_budget=None, on_record=on_record)
        self.reversed = 0
        self.left_alone = 0
        self.unmade = 0                     # maybe changes found never made: nothing to do
        # (folder, UID, X-GM-MSGID, UIDVALIDITY) of each message moved back
        self.restored: List[Tuple[str, Optional[int], Any, Optional[int]]] = []
        self.restored_count = 0             # messages runs with the same rules leave alone
        self.expunge_surprises: List[str] = []   # folders a plain EXPUNGE surprised in

    @staticmethod
    def _choose(store: StateStore, key: str, run_id: Optional[str]) -> str:
        """The run to undo: ``run_id``, or the newest applied run of ``key`` not undone."""
        runs = history(store)
        where = f"the audit log {store.audit.path}"
        if run_id is None:
            mine = [r for r in runs if f"{r['account']} on {r['host']}" == key
                    and r["command"] in ("run", "watch")
                    and (r["changes_made"] or r.get("folders_created"))
                    and not r["undone_by"]]     # a watch's wake-ups are runs too
            if not mine:
                raise StateError(f"no applied run of {key} left to undo in {where}; "
                                 f"'history' lists the runs")
            run_id = mine[0]["run"]
        entry = next((r for r in runs if r["run"] == run_id), None)
        if entry is None:
            raise StateError(f"no run {run_id} in {where}; 'history' lists the runs")
        if f"{entry['account']} on {entry['host']}" != key:
            raise StateError(f"run {run_id} was on {entry['account']} on {entry['host']}, "
                             f"not {key}; pass that account's --user and --host")
        if entry["undone_by"]:
            raise StateError(f"run {run_id} was already undone by {entry['undone_by']}")
        return run_id

    def _read(self, store: StateStore, run_id: str) -> None:
        """Gather the undone run's records: the messages it changed, its intents, what its
        done and unsent records say, the folders it created and wrote to, and what an
        earlier undo of it, cut short, already reversed or tried."""
        self.messages = []
        creates = _Creates()                # the folders the run created (or maybe did)
        done: Dict[Tuple[Any, ...], Optional[int]] = {}   # confirmed change -> new UID
        self.used: set = set()              # folders the run wrote to, by its own records
        self.intents: Dict[Tuple[Any, Any], Dict[str, Any]] = {}   # (folder, uid) -> intent
        self.rules_hash = ""                # the undone run's rules (see StateStore.undone)
        reversed_before = set()             # by an earlier undo of this run, cut short
        intents: List[Dict[str, Any]] = []
        unsent: set = set()                 # intended, but a stop came before it was sent
        self.tried_before: set = set()      # changes an earlier undo, cut short, sent
        for record in store.audit.records():
            if record.get("undo_of") == run_id and record.get("type") == "message" \
                    and record.get("applied"):
                for change in record.get("changes") or []:
                    reversed_before.add(self._change_key(record, _inverse_change(change)))
            if record.get("undo_of") == run_id and record.get("type") == "intent":
                for change in record.get("changes") or []:
                    self.tried_before.add(_change_identity(record, _inverse_change(change)))
            if record.get("run") != run_id:
                continue
            creates.read(record)
            if record.get("type") == "message" and record.get("applied") \
                    and record.get("changes"):
                self.messages.append(record)
            elif record.get("type") == "unsent":
                unsent.update(_change_identity(record, c) for c in record.get("changes") or [])
            elif record.get("type") == "done":
                new_uids = record.get("new_uids") or []
                for n, uid in enumerate(record.get("uids") or []):
                    done[_done_identity(record, uid)] = \
                        new_uids[n] if n < len(new_uids) else None
            elif record.get("type") == "intent":
                self.rules_hash = record.get("rules_hash") or self.rules_hash
                if record.get("changes"):
                    intents.append(record)
                    key = (record.get("folder"), record.get("uid"))
                    if key in self.intents:     # the same message in two steps: both count
                        record = dict(record, changes=self.intents[key]["changes"] +
                                      record["changes"])
                    self.intents[key] = record
            elif record.get("type") == "summary":     # its folders: see _Creates
                for name in record.get("counts") or {}:
                    if name.startswith("move to "):
                        self.used.add(name[len("move to "):])
        self._settle(intents, unsent, done)
        # Folders: made by the run when a done record or the summary says so; announced
        # but never answered (the process ended in between): maybe, deleted only when the
        # server shows the folder never held a message (see _delete_created_folders).
        made = creates.outcome()            # those it created are deleted if empty
        self.created: List[str] = [name for name, value in made.items() if value]
        self.maybe_created: List[str] = [name for name, value in made.items() if value is None]
        if reversed_before:
            left = [dict(record, changes=[c for c in record["changes"] if self._change_key(
                        record, c) not in reversed_before]) for record in self.messages]
            self.messages = [record for record in left if record["changes"]]

    def _settle(self, intents: List[Dict[str, Any]], unsent: set,
                done: Dict[Tuple[Any, ...], Optional[int]]) -> None:
        # Intents never confirmed are "maybe" changes: each is checked on the server and
        # reversed only if it happened.  Those a done record confirmed (the process ended
        # before the step's message records) are made, with the new UID COPYUID gave.
        confirmed = {_change_identity(r, c) for r in self.messages for c in r["changes"]}
        confirmed |= unsent                 # known never sent: nothing to look for
        for record in intents:
            for change in record["changes"]:
                if isinstance(change.get("after"), dict):
                    self.used.add(change["after"]["folder"])
            left = [c for c in record["changes"] if _change_identity(record, c) not in confirmed]
            made = [dict(c, after=dict(c["after"], uid=done[_change_identity(record, c)]))
                    if isinstance(c.get("after"), dict) else c
                    for c in left if _change_identity(record, c) in done]
            maybe = [c for c in left if _change_identity(record, c) not in done]
            for changes, more in ((made, {}), (maybe, {"maybe": True})):
                if changes:
                    self.messages.append(dict(record, type="message", version=RECORD_VERSION,
                                              applied=True, changes=changes, **more))

    # Each message's undo is worked out in ``work``: index -> {"done": [...], "alone": [...]}.

    def execute(self, conn: GmailConnection) -> None:
        """Reverse the run over ``conn`` (the account it was made on)."""
        self.run._count_bytes(conn)
        work: Dict[int, Dict[str, List[Any]]] = {
            i: {"done": [], "alone": [], "unmade": []} for i in range(len(self.messages))}
        self._vet(conn, work)
        self._check(conn)
        try:
            self._reverse(conn, work)
        finally:
            self._report(work)     # what was done, also when stopped half way
            self._remember_restored(conn, work)
        self._forget_unfinished(conn)
        self._delete_created_folders(conn, {} if self.apply else self._leaving(work))

    def _forget_unfinished(self, conn: GmailConnection) -> None:
        """What the undone run's steps kept for a run after them (flags as found, copies
        maybe made) is moot once its changes are taken back: a later run must judge the
        mail as it is now, the user's changes included."""
        if not self.apply:
            return
        places: Dict[Tuple[str, int], List[int]] = {}
        for record in self.messages:
            folder, uidvalidity, uid = (record.get("folder"), record.get("uidvalidity"),
                                        record.get("uid"))
            if isinstance(folder, str) and type(uidvalidity) is int and type(uid) is int:
                places.setdefault((conn.server_name(folder), uidvalidity), []).append(uid)
        for (folder, uidvalidity), uids in places.items():
            self.run.store.finish_unfinished(self.run.account, folder, uidvalidity, uids)

    def _vet(self, conn: GmailConnection, work: Dict[int, Dict[str, List[Any]]]) -> None:
        """Take out of the undo every change no run can have made (a forged or damaged
        record, however well typed): a label's copy lives in that label's folder, never in
        the message's own; a move leaves the message's own folder for one the run itself
        wrote to (its intents and summary say which), trash for the trash folder, archive
        for the archive folder.  Such changes are reported and left alone."""
        special = {"trash": conn.special_folder("\\Trash"),
                   "archive": None if conn.is_gmail else conn.special_folder("\\Archive")}
        used = self.used | {conn.server_name(name) for name in self.used}
        for i, record in enumerate(self.messages):
            own = str(record.get("folder", ""))
            homes = (own, conn.server_name(own))
            kept = []
            for change in record["changes"]:
                before, after = change.get("before"), change.get("after")
                action = change.get("action")
                problem = ""
                if isinstance(after, dict):
                    there = str(after.get("folder"))
                    if any(_same_folder(there, home) for home in homes):
                        problem = f"it says the message went to its own folder {there}"
                    elif before is None:
                        label = str(change.get("label") or "")
                        if action != "label" or there not in (label, conn.server_name(label)):
                            problem = f"a copy for {action} {label} cannot be in {there}"
                    elif not isinstance(before, dict) or \
                            not any(_same_folder(str(before.get("folder")), h) for h in homes):
                        problem = "it does not start from the message's own folder"
                    elif action in special and getattr(special[action], "name", None) != there:
                        problem = f"{there} is not the {action} folder"
                    elif action == "move" and there not in used:
                        problem = f"the run never moved mail to {there}"
                    elif action not in ("move", "trash", "archive"):
                        problem = f"{action!r} does not move mail"
                elif isinstance(before, dict):
                    problem = "it has a place before but none after"
                if not problem and self.intents and not record.get("maybe") and \
                        not self._announced(i, change):
                    problem = "the run wrote no intent for it"
                if problem:
                    work[i]["alone"].append(f"{describe_change(change)}: not something the "
                                            f"run can have done ({problem}); left as it is")
                else:
                    kept.append(change)
            self.messages[i] = dict(record, changes=kept)

    def _remember_restored(self, conn: GmailConnection,
                           work: Mapping[int, Mapping[str, List[Any]]]) -> None:
        """Keep in the state what this undo restored, so runs with the undone run's rules
        do not classify it again (see StateStore.undone); saved by ``run.finish()``."""
        if not self.apply:
            return
        store, account = self.run.store, self.run.account
        for folder, uid, msgid, uidvalidity in self.restored:
            rules = self.rules_hash or (store.folder(account, folder) or FolderState(0, 0)).rules
            store.add_undone(account, rules, folder, uidvalidity, uid,
                             msgid if conn.is_gmail else None)
            self.restored_count += 1
        if conn.is_gmail:
            for i, outcome in work.items():
                record = self.messages[i]
                if outcome["done"] and not self._moved(record):
                    rules = self.rules_hash or (store.folder(account, str(record.get(
                        "folder"))) or FolderState(0, 0)).rules
                    store.add_undone(account, rules, None, None, None, record.get("gm_msgid"))
                    self.restored_count += 1

    def _tried(self, i: int, change: Mapping[str, Any]) -> bool:
        """Whether an earlier undo of this run, cut short, sent the reversal of ``change``
        (its intent is in the log, its confirmation is not)."""
        return _change_identity(self.messages[i], change) in self.tried_before

    def _intend(self, conn: GmailConnection, pairs: Sequence[Tuple[int, Dict[str, Any]]]) -> None:
        """Write-ahead for the undo's own writes: the changes about to be made, per message.
        A stop asked for before it ends the undo here: no intent for a write never sent."""
        if not self.apply or not pairs:
            return
        conn.stop.check("before undoing more")
        grouped: Dict[int, List[Dict[str, Any]]] = {}
        for i, change in pairs:
            grouped.setdefault(i, []).append(change)
        fields = ("folder", "uid", "uidvalidity", "gm_msgid", "message_id", "subject")
        self.run.intend(conn, [dict({name: self.messages[i].get(name) for name in fields},
                                    changes=changes) for i, changes in grouped.items()])

    def _place_of(self, i: int, change: Mapping[str, Any]) -> Dict[str, Any]:
        """The destination as the run's intent recorded it before the step: ``folder``,
        ``uidvalidity``, ``uidnext`` (empty when the run wrote no intent for it)."""
        record = self.messages[i]
        intent = record if record.get("maybe") else \
            self.intents.get((record.get("folder"), record.get("uid")))
        for planned in (intent or {}).get("changes") or []:
            if _change_identity(record, planned) == _change_identity(record, change) and \
                    isinstance(planned.get("after"), dict):
                return planned["after"]
        return {}

    def _announced(self, i: int, change: Mapping[str, Any]) -> bool:
        """Whether the run's intents (write-ahead) announced ``change`` of message ``i``."""
        record = self.messages[i]
        intent = self.intents.get((record.get("folder"), record.get("uid"))) or {}
        wanted = _change_identity(record, change)
        return any(_change_identity(record, planned) == wanted
                   for planned in intent.get("changes") or [])

    def _looks(self, i: int) -> Tuple[str, Optional[int], Optional[str]]:
        """Message-ID, size and INTERNALDATE of message ``i`` as the run saw it."""
        record = self.messages[i]
        intent = record if record.get("maybe") else \
            self.intents.get((record.get("folder"), record.get("uid"))) or {}
        return (record.get("message_id") or "", intent.get("size"), intent.get("internaldate"))

    def _check(self, conn: GmailConnection) -> None:
        """Before the first change, and the same in a dry run (as check_run does for a
        run): a way to move the moved mail back, and where that needs a plain EXPUNGE, no
        other message marked \\Deleted in the folders it leaves.  Raises CapabilityError."""
        places = [self._moved(record)[1]["folder"] for record in self.messages
                  if self._moved(record) is not None]
        if not places:
            return
        if not conn.can_move(self.allow_expunge):
            raise conn.refuse_moves()
        homes = {self._moved(record)[0]["folder"] for record in self.messages
                 if self._moved(record) is not None}
        listed = [folder.name for folder in conn.list_folders() if folder.selectable]
        gone = sorted(home for home in homes if home and home.upper() != "INBOX"
                      and not any(_same_folder(home, name) for name in listed))
        if gone:
            raise FolderUnavailableError(
                f"cannot move mail back to {', '.join(repr(name) for name in gone)}: the "
                f"folder no longer exists; create it again (the same name), then run undo "
                f"again", command="LIST")
        if not conn.can_move():      # moving back needs a plain EXPUNGE ("no longer in": _reverse)
            _check_plain_expunges(conn, dict.fromkeys(places))

    def _reverse(self, conn: GmailConnection, work: Dict[int, Dict[str, List[Any]]]) -> None:
        gone: set = set()
        unmoved: set = set()       # maybe moves that never happened, or already moved back
        # 1. Mail the run moved (or trashed, or archived off Gmail) goes back first.
        by_place: Dict[str, List[int]] = {}
        for i, record in enumerate(self.messages):
            place = self._moved(record)
            if place is not None:
                by_place.setdefault(place[1]["folder"], []).append(i)
        for folder, indexes in by_place.items():
            self._move_back(conn, folder, indexes, work, gone, unmoved)
        # 2. Labels and flags where the message is now (on Gmail, All Mail); off Gmail, the
        # copies made for labels.
        rest = [i for i in range(len(self.messages)) if i not in gone]
        # Messages this undo found where the run left them, or moved back: a copy made for
        # a label is deleted only while its original is known to be there (see
        # _delete_copies), never when it may be the only one left.
        present = {i for i in range(len(self.messages)) if i not in gone and any(
            isinstance(change.get("before"), dict) and change.get("action") in _MOVE_BACKS
            for change in work[i]["done"])}
        groups: Dict[str, List[int]] = {}
        if conn.is_gmail:
            everywhere = conn.special_folder("\\All")
            for i in rest:
                groups.setdefault(everywhere.name if everywhere else self.messages[i]["folder"],
                                  []).append(i)
        else:
            for i in rest:
                if (self._moved(self.messages[i]) is None or i in unmoved) and \
                        any(c.get("flag") for c in self.messages[i]["changes"]):
                    groups.setdefault(self.messages[i]["folder"], []).append(i)
        for folder, indexes in groups.items():
            conn.stop.check(f"before looking in {folder}")
            found = self._locate(conn, folder, indexes, lambda record: record.get("uid"))
            present.update(found)
            for i in indexes:      # on Gmail, said only of a message with a flag or label
                if i not in found and (not conn.is_gmail or any(
                        isinstance(c.get("after"), bool) for c in self.messages[i]["changes"])):
                    work[i]["alone"].append(f"not found in {folder}; left as it is")
            self._restore_flags(conn, found, work)
        if not conn.is_gmail:
            self._delete_copies(conn, rest, work, present)

    def _move_back(self, conn: GmailConnection, folder: str, indexes: List[int],
                   work: Dict[int, Dict[str, List[Any]]], gone: set, unmoved: set) -> None:
        """Find in ``folder`` the messages the run moved there, and move each back."""
        conn.stop.check(f"before looking in {folder}")     # safe points: see Stop
        found = self._locate(conn, folder, indexes, lambda r: self._moved(r)[1].get("uid"),
                             lambda i: self._place_of(i, self._moved(self.messages[i])[2]))
        # Only a move made without MOVE can be half made (a MOVE is whole or not at all):
        # one the run kept as copied (_FolderRun.copying), or any where the server has no
        # MOVE now (a run from before such records were kept).
        half = [i for i in found if self.messages[i].get("maybe")
                and (not conn.has("MOVE") or self._copied_by_run(i))] \
            if not conn.is_gmail else []
        if half:
            self._drop_half_moves(conn, folder, half, found, work, unmoved)
        for i in indexes:
            if i in unmoved:
                continue
            if i not in found:
                if self.messages[i].get("maybe"):
                    # Never moved: it is still where it was, with its other changes.
                    unmoved.add(i)
                    work[i]["unmade"].append(f"not in {folder}: the run ended before "
                                             f"moving it, so there is nothing to undo")
                elif self._tried(i, self._moved(self.messages[i])[2]):
                    unmoved.add(i)          # back home: its other changes go on there
                    work[i]["unmade"].append(f"not in {folder}: an earlier undo, cut "
                                             f"short, moved it back already")
                else:
                    gone.add(i)
                    work[i]["alone"].append(f"no longer in {folder} (nor found there by "
                                            f"Message-ID, size and date); left as it is")
        if not conn.is_gmail:
            self._restore_flags(conn, found, work)
        back: Dict[str, List[int]] = {}
        for i in found:
            back.setdefault(self._moved(self.messages[i])[0]["folder"], []).append(i)
        for destination, items in back.items():
            self._move_back_to(conn, folder, destination, {i: found[i] for i in items},
                               work, gone)

    def _copied_by_run(self, i: int) -> bool:
        """Whether the run kept message ``i``'s move as a COPY it made (see copying)."""
        before = self._moved(self.messages[i])[0]
        if type(before.get("uidvalidity")) is not int or \
                not isinstance(before.get("folder"), str):
            return False
        kept = self.run.store.unfinished(self.run.account, before["folder"],
                                         before["uidvalidity"], "copies")
        return before.get("uid") in kept

    def _drop_half_moves(self, conn: GmailConnection, folder: str, half: List[int],
                         found: Dict[int, int], work: Dict[int, Dict[str, List[Any]]],
                         unmoved: set) -> None:
        """Of the ``half`` messages found in ``folder`` whose move the run may not have
        finished, those whose original is still where the run found it: a move without
        MOVE cut between its COPY and its EXPUNGE.  Moving the copy back would make two, so
        the run's copy is deleted (UIDPLUS: exactly it) and the original's \\Deleted, if the
        run set it, cleared; the rest of the undo then treats the message as never moved
        (``unmoved``).  They leave ``found``.  Ends with ``folder`` open again."""
        homes: Dict[str, List[int]] = {}
        for i in half:
            homes.setdefault(self._moved(self.messages[i])[0]["folder"], []).append(i)
        originals: Dict[int, Tuple[str, int]] = {}
        for home, items in homes.items():
            conn.stop.check(f"before looking in {home}")
            # The original itself: at the UID the run found it, the folder not renumbered,
            # its Message-ID still agreeing; never a look-alike found by Message-ID, size
            # and date (an identical twin staying home is not the message moved).
            status = self._open(conn, home)
            at = {i: self._moved(self.messages[i])[0] for i in items}
            at = {i: before["uid"] for i, before in at.items() if before.get("uid")
                  and before.get("uidvalidity") == status.uidvalidity}
            looks = self._looks_at(conn, list(at.values()))
            there = {i: uid for i, uid in at.items() if self._same_looks(i, looks.get(uid))}
            originals.update({i: (home, uid) for i, uid in there.items()})
        if not originals:
            self._open(conn, folder)
            return
        copies = {i: found.pop(i) for i in originals}
        unmoved.update(copies)
        pairs = [(i, _inverse_change(self._moved(self.messages[i])[2])) for i in copies]
        exact = conn.has("UIDPLUS")     # a UID EXPUNGE of exactly the copies
        self._intend(conn, pairs if exact else [])      # before the first write
        if self.apply:      # the originals' \\Deleted, if the run set it, goes first
            for home in homes:
                mine = sorted(uid for place, uid in originals.values() if place == home)
                if mine:
                    self._open(conn, home)
                    conn.remove_flags(mine, ["\\Deleted"])
        self._open(conn, folder)
        if not exact:
            for i in copies:
                work[i]["alone"].append(f"copied to {folder} but never removed from "
                                        f"{originals[i][0]} (the run stopped between the two): "
                                        f"{conn.host} lacks UIDPLUS, so the copy in {folder} "
                                        f"(UID {copies[i]}) stays; delete it by hand")
            return
        if self.apply:
            conn.stop.check(f"before deleting copies in {folder}")
            conn.add_flags(sorted(copies.values()), ["\\Deleted"])
            conn.uid_expunge(sorted(copies.values()))
        for i, inverse in pairs:
            home, uid = originals[i]
            work[i]["done"].append(dict(inverse, before={"folder": folder, "uid": copies[i]},
                                        after={"folder": home, "uid": uid}))
            self.restored.append((home, uid, self.messages[i].get("gm_msgid"),
                                  self._moved(self.messages[i])[0].get("uidvalidity")))

    def _move_back_to(self, conn: GmailConnection, folder: str, destination: str,
                      found: Dict[int, int], work: Dict[int, Dict[str, List[Any]]],
                      gone: set) -> None:
        """Move the ``found`` messages (index -> UID in ``folder``) back to ``destination``."""
        self._intend(conn, [(i, _inverse_change(self._moved(self.messages[i])[2]))
                            for i in found])
        stayed: Tuple[int, ...] = ()
        if self.apply:
            conn.stop.check(f"before moving mail back to {destination}")
            result = conn.move(list(found.values()), destination,
                               allow_expunge=self.allow_expunge)
            moved = dict(result.moved)
            stayed = result.stayed
            if result.stayed or result.others_expunged:
                self.expunge_surprises.append(folder)
        else:
            moved = {uid: None for uid in found.values()}
        for i, uid in found.items():
            if uid in stayed:
                # A checked plain EXPUNGE (no UIDPLUS) left it: another client
                # cleared its \Deleted flag, so it is in both folders now.
                work[i]["alone"].append(
                    f"copied back to {destination}, but still in {folder} too: "
                    f"another mail client cleared its \\Deleted flag before the "
                    f"plain EXPUNGE; remove one of the two by hand")
                continue
            if uid not in moved:
                gone.add(i)
                work[i]["alone"].append(f"vanished from {folder} while moving it back")
                continue
            inverse = _inverse_change(self._moved(self.messages[i])[2])
            inverse["before"] = dict(inverse["before"], folder=folder, uid=uid)
            work[i]["done"].append(inverse)
            self.restored.append((destination, moved[uid], self.messages[i].get("gm_msgid"),
                                  self._moved(self.messages[i])[0].get("uidvalidity")))

    @staticmethod
    def _leaving(work: Mapping[int, Mapping[str, List[Any]]]) -> Dict[str, int]:
        """How many messages the undo takes out of each folder (a dry run's prediction):
        mail moved back, copies deleted, and on Gmail labels removed."""
        out: Dict[str, set] = {}
        for i, outcome in work.items():
            for change in outcome["done"]:
                before = change.get("before")
                if isinstance(before, dict) and before.get("folder"):
                    out.setdefault(before["folder"], set()).add(i)
                elif before is True and change.get("after") is False and change.get("label"):
                    out.setdefault(change["label"], set()).add(i)
        return {folder: len(indexes) for folder, indexes in out.items()}

    def _delete_created_folders(self, conn: GmailConnection,
                                leaving: Mapping[str, int]) -> None:
        """Last, the folders (labels) the run created, if nothing is left in them (in a
        dry run: if nothing would be, once ``leaving`` messages had left).

        A folder whose CREATE the run announced but whose answer it never recorded (it
        ended in between) is deleted only if it is empty and its UIDNEXT is still 1: the
        intent was written after LIST showed no such folder, and a folder that never held
        a message loses nothing when it goes.  Any other stays, with a warning."""
        for name in list(dict.fromkeys(self.created)) + self.maybe_created:
            if not any(f.name == name for f in conn.list_folders(refresh=True)):
                continue
            going = sum(n for folder, n in leaving.items() if _same_folder(folder, name))
            if name in self.maybe_created:
                values = conn.status(name)
                if values.get("MESSAGES", 0) > 0 or values.get("UIDNEXT", 1) > 1:
                    log.warning("%s may have been created by run %s (it ended before the "
                                "server answered), but it holds or has held mail; it stays",
                                name, self.undo_of)
                    continue
            elif conn.message_count(name) > going:
                log.warning("%s was created by run %s but holds mail now; it stays",
                            name, self.undo_of)
                continue
            if self.apply:
                conn.stop.check(f"before deleting the folder {name}")
                if conn.selected is not None and _same_folder(conn.selected.name, name):
                    conn.examine("INBOX")        # never delete the folder that is open
                self.run.intend(conn, [{"delete": name, "folder": name}])
                conn.delete_folder(name)
            self.deleted.append(name)
            label = f"delete folder {name}"
            self.run.counts[label] = self.run.counts.get(label, 0) + 1

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _change_key(record: Mapping[str, Any], change: Mapping[str, Any]) -> Tuple[Any, ...]:
        return (record.get("folder"), record.get("uid"), json.dumps(change, sort_keys=True))

    @staticmethod
    def _moved(record: Mapping[str, Any]) -> Optional[Tuple[Dict[str, Any], Dict[str, Any],
                                                            Dict[str, Any]]]:
        """(before, after, change) of the record's change of place, if it has one."""
        for change in record.get("changes") or []:
            before, after = change.get("before"), change.get("after")
            if isinstance(before, dict) and isinstance(after, dict) and after.get("folder"):
                return before, after, change
        return None

    def _open(self, conn: GmailConnection, folder: str) -> FolderStatus:
        """Open ``folder``: a message record names its folder as the rules did ("Lists"),
        the server may call it "INBOX.Lists" (server_name leaves a server's name as it is)."""
        name = conn.server_name(folder)
        return conn.select(name) if self.apply else conn.examine(name)

    def _locate(self, conn: GmailConnection, folder: str, indexes: List[int],
                uid_of: Callable[[Mapping[str, Any]], Optional[int]],
                place_of: Callable[[int], Mapping[str, Any]] = lambda i: {}) -> Dict[int, int]:
        """Find each message in ``folder``: its UID there, or absent when it is not there.

        Off Gmail: the UID the run recorded, if the folder was not renumbered since and
        the Message-ID there still agrees; else the one message with that Message-ID, size
        and INTERNALDATE (at or above the UIDNEXT ``place_of(i)`` recorded, when it
        recorded one), since Message-IDs are the sender's to choose and may be shared."""
        status = self._open(conn, folder)
        found: Dict[int, int] = {}
        if conn.is_gmail:
            for i in indexes:
                msgid = self.messages[i].get("gm_msgid")
                if msgid:
                    hits = conn.search(["X-GM-MSGID", int(msgid)])
                    if len(hits) == 1:
                        found[i] = hits[0]
            return found
        guesses = {}
        for i in indexes:
            place = place_of(i)
            renumbered = place.get("uidvalidity") not in (None, status.uidvalidity)
            guess = None if renumbered else uid_of(self.messages[i])
            if guess and place.get("uidnext") and guess < place["uidnext"]:
                guess = None        # there before the run wrote: not the message it moved
            guesses[i] = guess
        item = "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"
        known = [uid for uid in guesses.values() if uid]
        there = conn.fetch(known, [item]) if known else {}
        for i, uid in guesses.items():
            wanted = self.messages[i].get("message_id") or ""
            if uid and uid in there and wanted and _first(header_text(
                    parse_headers(there[uid].get(item) or b""), "message-id")).strip() == wanted:
                found[i] = uid
            else:
                place = place_of(i)
                since = place.get("uidnext") \
                    if place.get("uidvalidity") == status.uidvalidity else None
                match = self._find_by_looks(conn, i, since)
                if match is not None:
                    found[i] = match
        return found

    def _find_by_looks(self, conn: GmailConnection, i: int,
                       since: Optional[int]) -> Optional[int]:
        """The one message in the open folder (from UID ``since`` on) with message ``i``'s
        Message-ID, size and INTERNALDATE, or None (none, several, or not known)."""
        wanted, size, date = self._looks(i)
        if not wanted or size is None or date is None:
            return None
        hits = [uid for uid in conn.search(["HEADER", "Message-ID", wanted])
                if since is None or uid >= since]
        if not hits:
            return None
        values = conn.fetch(hits, ["RFC822.SIZE", "INTERNALDATE"])
        same = [uid for uid in hits if uid in values
                and values[uid].get("RFC822.SIZE") == size
                and values[uid].get("INTERNALDATE") is not None
                and _iso(values[uid]["INTERNALDATE"]) == date]
        return same[0] if len(same) == 1 else None

    def _restore_flags(self, conn: GmailConnection, found: Mapping[int, int],
                       work: Dict[int, Dict[str, List[Any]]]) -> None:
        """Put back labels and flags (in the folder just located in) that still read as
        the run left them."""
        if not found:
            return
        items = ["FLAGS"] + (["X-GM-LABELS"] if conn.is_gmail else [])
        now = conn.fetch(list(found.values()), items)
        stores: Dict[Tuple[str, str, bool], List[int]] = {}
        owners: Dict[Tuple[str, str, bool], List[Tuple[int, Dict[str, Any]]]] = {}
        for i, uid in found.items():
            values = now.get(uid)
            if values is None:
                work[i]["alone"].append("vanished while undoing")
                continue
            flags = set(values.get("FLAGS") or ())
            labels = set(values.get("X-GM-LABELS") or ())
            for change in self.messages[i]["changes"]:
                if not isinstance(change.get("after"), bool):
                    continue
                if change.get("flag"):
                    kind, name, have = "flag", change["flag"], change["flag"] in flags
                elif change.get("label") and conn.is_gmail:
                    kind, name = "label", change["label"]
                    have = any(_same_label(name, label) for label in labels)
                else:
                    continue
                if have != change["after"]:
                    state = "set" if have else "not set"
                    if self.messages[i].get("maybe"):
                        work[i]["unmade"].append(f"{describe_change(change)}: never made "
                                                 f"({name} is {state}); nothing to undo")
                        continue
                    if self._tried(i, change):
                        work[i]["unmade"].append(f"{describe_change(change)}: reversed "
                                                 f"already by an earlier undo, cut short")
                        continue
                    work[i]["alone"].append(f"{describe_change(change)}: changed since "
                                            f"({name} is {state} now); left as it is")
                    continue
                key = (kind, name, bool(change["before"]))
                stores.setdefault(key, []).append(uid)
                owners.setdefault(key, []).append((i, change))
        self._intend(conn, [(i, _inverse_change(change)) for pairs in owners.values()
                            for i, change in pairs])
        for (kind, name, on), uids in stores.items():
            if self.apply:
                conn.stop.check(f"before restoring {name}")
                if kind == "flag":
                    (conn.add_flags if on else conn.remove_flags)(uids, [name])
                else:
                    (conn.add_labels if on else conn.remove_labels)(uids, [name])
            for i, change in owners[(kind, name, on)]:
                work[i]["done"].append(_inverse_change(change))

    def _delete_copies(self, conn: GmailConnection, indexes: List[int],
                       work: Dict[int, Dict[str, List[Any]]], present: set) -> None:
        """Off Gmail a label was a copy: remove exactly that copy (UIDPLUS needed), and
        only while its original is there: in ``present`` (moved back, or found where the
        run left it), or found now in the folder the run read it from.  A message deleted
        or moved by the user since would otherwise lose its last copy."""
        by_folder: Dict[str, List[Tuple[int, Dict[str, Any]]]] = {}
        for i in indexes:
            for change in self.messages[i]["changes"]:
                if change.get("before") is None and isinstance(change.get("after"), dict):
                    by_folder.setdefault(change["after"]["folder"], []).append((i, change))
        self._find_originals(conn, sorted({i for pairs in by_folder.values() for i, _ in pairs
                                           if i not in present}), present)
        for folder, pairs in by_folder.items():
            conn.stop.check(f"before looking in {folder}")
            if not conn.has("UIDPLUS"):
                for i, change in pairs:
                    work[i]["alone"].append(f"{describe_change(change)}: {conn.host} lacks "
                                            f"UIDPLUS, so the copy in {folder} stays")
                continue
            # Only the copy the run made: in the folder as it was when the run wrote its
            # intent (same UIDVALIDITY), at or above the UIDNEXT it had then, with the
            # Message-ID, size and INTERNALDATE agreeing.  Anything else stays: another
            # message with that Message-ID (the user's own copy), a folder deleted and
            # made again, a record from before intents carried the folder's UIDVALIDITY.
            status = self._open(conn, folder)
            uids: List[Tuple[int, int, Dict[str, Any]]] = []
            looks = self._looks_at(conn, [change["after"].get("uid") for i, change in pairs
                                          if self._recorded_copy(i, change, status)])
            for i, change in pairs:
                place = self._place_of(i, change)
                what = describe_change(change)
                if i not in present:
                    work[i]["alone"].append(f"{what}: the message is no longer in "
                                            f"{self.messages[i]['folder']} (deleted or moved "
                                            f"since the run), so the copy in {folder} may be "
                                            f"the only one left; it stays")
                    continue
                if place.get("uidvalidity") is None:
                    work[i]["alone"].append(f"{what}: the run's records do not say which "
                                            f"{folder} it copied into (written by an older "
                                            f"version); the copy stays")
                    continue
                if place["uidvalidity"] != status.uidvalidity:
                    work[i]["alone"].append(f"{what}: {folder} was deleted and made again "
                                            f"since the run (its UIDVALIDITY changed); "
                                            f"the copy stays")
                    continue
                uid = change["after"].get("uid")
                if self._recorded_copy(i, change, status):
                    target = uid if self._same_looks(i, looks.get(uid)) else None
                else:   # a UID from before the run's UIDNEXT is not its copy
                    target = None if uid else self._find_by_looks(conn, i, place.get("uidnext"))
                if target is None:
                    if self.messages[i].get("maybe") or self._tried(i, change):
                        work[i]["unmade"].append(f"{what}: no copy in {folder}; never made, "
                                                 f"or removed by an earlier undo cut short")
                        continue
                    work[i]["alone"].append(f"{what}: the copy the run made is no longer in "
                                            f"{folder} (or its UID is unknown); left as it is")
                    continue
                uids.append((i, target, change))
            self._intend(conn, [(i, _inverse_change(change)) for i, _, change in uids])
            if uids and self.apply:
                conn.stop.check(f"before deleting copies in {folder}")
                conn.add_flags([uid for _, uid, _ in uids], ["\\Deleted"])
                conn.uid_expunge([uid for _, uid, _ in uids])
            for i, uid, change in uids:
                work[i]["done"].append(dict(_inverse_change(change), before={
                    "folder": folder, "uid": uid, "uidvalidity": status.uidvalidity}))

    def _find_originals(self, conn: GmailConnection, indexes: List[int], present: set) -> None:
        """Add to ``present`` the messages (of ``indexes``) found where the run read them;
        a folder that cannot be opened holds none that is known to be there."""
        homes: Dict[str, List[int]] = {}
        for i in indexes:
            homes.setdefault(self.messages[i]["folder"], []).append(i)
        record = lambda i: {"uidvalidity": self.messages[i].get("uidvalidity")}  # noqa: E731
        for home, waiting in homes.items():
            conn.stop.check(f"before looking in {home}")
            try:
                present.update(self._locate(conn, home, waiting, lambda r: r.get("uid"), record))
            except ImapError as exc:
                if exc.status not in ("NO", "BAD"):
                    raise
                log.info("cannot open %s (%s): its mail is not known to be there", home, exc)

    def _recorded_copy(self, i: int, change: Mapping[str, Any], status: FolderStatus) -> bool:
        """Whether the label copy ``change`` of message ``i`` is to be looked for at the
        UID its record names, in the folder now open as ``status`` (the checks
        _delete_copies makes before it looks)."""
        place = self._place_of(i, change)
        uid = change["after"].get("uid")
        since = place.get("uidnext")
        return bool(uid) and place.get("uidvalidity") == status.uidvalidity and \
            not (since is not None and uid < since)

    _LOOKS = ("BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]", "RFC822.SIZE", "INTERNALDATE")

    def _looks_at(self, conn: GmailConnection, uids: Sequence[Optional[int]]
                  ) -> Dict[int, Dict[str, Any]]:
        """Message-ID, size and INTERNALDATE of the messages at ``uids`` in the open folder,
        with one UID FETCH for them all (conn.fetch chunks long sets), not one per copy:
        an undo of 900 label copies would otherwise wait 900 round trips."""
        wanted = sorted({uid for uid in uids if uid})
        return conn.fetch(wanted, list(self._LOOKS)) if wanted else {}

    def _same_looks(self, i: int, values: Optional[Mapping[str, Any]]) -> bool:
        """Whether ``values`` (from _looks_at) have message ``i``'s Message-ID and, where the
        run recorded them, its size and INTERNALDATE."""
        wanted, size, date = self._looks(i)
        if not values or not wanted or _first(header_text(
                parse_headers(values.get(self._LOOKS[0]) or b""), "message-id")).strip() \
                != wanted:
            return False
        return (size is None or values.get("RFC822.SIZE") == size) and (
            date is None or (values.get("INTERNALDATE") is not None
                             and _iso(values["INTERNALDATE"]) == date))

    def _report(self, work: Dict[int, Dict[str, List[Any]]]) -> None:
        records = []
        for i, outcome in sorted(work.items()):
            self.unmade += len(outcome.get("unmade", ()))
            if not outcome["done"] and not outcome["alone"]:
                continue
            record = dict(self.messages[i], run=self.run.id, time=_iso(self.run.store.now()),
                          undo_of=self.undo_of, applied=self.apply, rules=[], reasons=[],
                          actions={}, changes=outcome["done"], left_alone=outcome["alone"])
            self.reversed += len(outcome["done"])
            self.left_alone += len(outcome["alone"])
            records.append(record)
        self.run.add_records(records)


# --- Watch: stay connected and classify new mail as it arrives --------------------------
#
# One connection, one owner at a time: the Watcher's thread runs IDLE on the first folder
# (RFC 2177) and, between IDLEs, everything else; the connection's lock keeps the
# keepalive thread out while IDLE runs, and IDLE itself is traffic, so the keepalive has
# nothing to do.  Other folders, and every folder on a server without IDLE, are polled
# every ``interval`` seconds: STATUS (UIDNEXT, UIDVALIDITY) for folders that are not
# selected, NOOP for the one that is (RFC 3501 §6.3.10 advises against STATUS on it).
# IDLE is re-issued every ``idle_interval`` seconds, well inside the 29 minutes after which
# a server may drop an idle client.
#
# A lost connection starts an outage: logged once, retried forever with capped, jittered
# exponential backoff, logged once more when it is over, then everything is caught up.
# Only a refused sign-in (AuthenticationError, OAuthError) or a TLS failure ends the watch.
# What "catch up" means is the caller's: a callable given the connection and the folders
# that may have new mail (the command line runs the incremental classification there).

DEFAULT_POLL_INTERVAL = 300.0   # seconds between STATUS/NOOP polls of folders without IDLE
IDLE_REISSUE = 25 * 60.0        # seconds one IDLE lasts before it is re-issued (< 29 min)
WATCH_BACKOFF = 2.0             # first delay after a lost connection, doubled per attempt
WATCH_MAX_BACKOFF = 300.0       # the delay never grows beyond this (before jitter)
SLEEP_JUMP = 60.0               # wall clock ahead of the monotonic one by this: we slept


class Watcher:
    """Keep ``folders`` classified as mail arrives, until ``stop()``.

    ``connect()`` returns a new, connected GmailConnection (called at the start and after
    every loss); ``catch_up(conn, folders)`` classifies what arrived in those folders.  It
    is called for every folder after each (re)connect, then for the folders with news.
    ``reload()`` is called at a safe point after ``request_reload()`` (SIGHUP) or whenever
    ``reload_needed()`` says so (the rules file changed).  ``rng`` jitters the backoff
    (injectable for tests).  The connections should have ``retries=0``: the Watcher does
    the retrying, forever, and logs an outage only when it begins and when it ends.
    ``stop`` is the Stop that ends the watch (``stop()`` asks it); give the connections
    the same one, so that a stop also ends their waits and sends no further change.

    ``run()`` returns after ``stop()``, having logged out; it raises AuthenticationError,
    TLSError, and ImapError other than the connection's own troubles.
    """

    def __init__(self, connect: Callable[[], GmailConnection], folders: Sequence[str],
                 catch_up: Callable[[GmailConnection, List[str]], Any], *,
                 interval: float = DEFAULT_POLL_INTERVAL, idle_interval: float = IDLE_REISSUE,
                 backoff: float = WATCH_BACKOFF, max_backoff: float = WATCH_MAX_BACKOFF,
                 reload: Optional[Callable[[], Any]] = None,
                 reload_needed: Optional[Callable[[], bool]] = None,
                 rng: Callable[[], float] = random.random,
                 stop: Optional[Stop] = None) -> None:
        if not folders:
            raise ValueError("watch needs at least one folder")
        self.folders = list(dict.fromkeys(folders))
        self.interval = max(0.01, float(interval))
        self.idle_interval = min(max(0.01, float(idle_interval)), IDLE_MAX_SECONDS)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._connect = connect
        self._catch_up = catch_up
        self._reload = reload
        self._reload_needed = reload_needed
        self._rng = rng
        # The one stop mechanism: the command line hands in the Stop its signal handlers
        # and the connections share, so a stop ends IDLE, waits and the next step alike.
        self._stop = stop if stop is not None else Stop()
        self._reload_requested = threading.Event()
        self._catch_up_requested = threading.Event()
        self._check_link = False
        self._clocks = (time.time(), time.monotonic())
        self._seen: Dict[str, Tuple[int, int]] = {}     # folder -> (UIDVALIDITY, UIDNEXT)
        self._first_key: Optional[Tuple[int, Optional[int]]] = None   # the same, first folder
        self._first_exists = 0      # conn.exists_seen when the first folder was last caught up
        self._next_poll = 0.0
        self.conn: Optional[GmailConnection] = None
        # Counters for tests and the curious; they only ever hold numbers.
        self.idles = 0
        self.polls = 0
        self.idle_refused = False   # the server answered IDLE with NO or BAD: poll instead
        self.wakeups = 0
        self.outages = 0

    # -- control, safe to call from a signal handler or another thread -------------------

    def stop(self, signum: Optional[int] = None) -> None:
        """End the watch at the next safe point (no new command is sent), then log out."""
        self._stop.request(signum)

    @property
    def stopping(self) -> bool:
        return self._stop.requested

    def request_reload(self) -> None:
        """Reload the rules at the next safe point (what SIGHUP does)."""
        self._reload_requested.set()

    def request_catch_up(self) -> None:
        """Catch up on every folder at the next safe point, news or not."""
        self._catch_up_requested.set()

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        outage_since: Optional[float] = None
        attempt = 0
        try:
            while not self._stop.requested:
                try:
                    if self.conn is None:
                        self.conn = self._connect()
                        if outage_since is not None:
                            log.warning("connected again after %s; catching up",
                                        _duration(time.monotonic() - outage_since))
                            outage_since = None
                        self._seen.clear()
                        self._first_key = None
                        self.idle_refused = False   # a new session may take IDLE again
                        # The others' STATUS before their catch-up, not after it: mail that
                        # comes meanwhile then wakes its folder at the first poll.  A folder
                        # the server refuses is left to the catch-up, which says why.
                        try:
                            self._remember_others(self.conn)
                        except ImapError as exc:
                            if exc.status not in ("NO", "BAD"):
                                raise
                        self._wake(self.conn, self.folders)
                        self._next_poll = time.monotonic() + self.interval
                    self._maybe_reload()
                    if not self._stop.requested:
                        self._wait_and_wake(self.conn)
                    # Only a connection that did its work ends the backoff: a server that
                    # signs us in and then floods must not get a reconnect a second.
                    attempt = 0
                except (ConnectionLostError, ProtocolError, UidValidityError) as exc:
                    if self._stop.requested:
                        break
                    self._drop()
                    attempt += 1
                    if outage_since is None:
                        outage_since = time.monotonic()
                        self.outages += 1
                        log.warning("lost the connection (%s); reconnecting in the background "
                                    "until it is back", exc)
                    else:
                        log.debug("still no connection: %s", exc)
                    delay = min(self.max_backoff, self.backoff * 2 ** min(attempt - 1, 30))
                    self._stop.wait(delay * (0.5 + 0.5 * self._rng()))
        finally:
            if outage_since is not None:
                log.warning("stopped while the connection was still down (for %s)",
                            _duration(time.monotonic() - outage_since))
            self._drop()

    def _drop(self) -> None:
        """Close the connection in hand (UNSELECT, never CLOSE: no expunge; LOGOUT)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def _wake(self, conn: GmailConnection, folders: List[str]) -> None:
        """Catch up on ``folders``, the first (IDLE) folder last, so that it stays selected
        and what arrives there from now on is announced to the next IDLE."""
        first = self.folders[0]
        order = [f for f in folders if f != first] + [f for f in folders if f == first]
        self._maybe_reload()        # new mail is classified with the rules saved before it came
        if order and not self._stop.requested:
            self.wakeups += 1
            log.debug("catching up on %s", ", ".join(order))
            self._catch_up(conn, order)
        selected = conn.selected
        if selected is not None and _same_folder(selected.name, first):
            self._first_key = (selected.uidvalidity, selected.uidnext)
            self._first_exists = conn.exists_seen

    def _maybe_reload(self) -> None:
        if self._reload_requested.is_set() or (self._reload_needed is not None
                                               and self._reload_needed()):
            self._reload_requested.clear()
            if self._reload is not None:
                self._reload()

    def _interrupted(self) -> bool:
        """Asked by IDLE about twice a second: stop, reload, or a jump of the wall clock."""
        wall, mono = time.time(), time.monotonic()
        last_wall, last_mono = self._clocks
        self._clocks = (wall, mono)
        if (wall - last_wall) - (mono - last_mono) > SLEEP_JUMP:
            # The monotonic clock stands still while a laptop sleeps; the wall clock does
            # not.  A connection that slept is often dead without knowing it: check it.
            log.info("the machine seems to have slept; checking the connection")
            self._check_link = True
            return True
        if self._reload_needed is not None and self._reload_needed():
            self._reload_requested.set()
        return (self._stop.requested or self._reload_requested.is_set()
                or self._catch_up_requested.is_set())

    def _remember_others(self, conn: GmailConnection) -> List[str]:
        """STATUS of every folder but the first; returns those whose UIDNEXT or UIDVALIDITY
        moved since the last look."""
        changed = []
        for folder in self.folders[1:]:
            status = conn.status(folder)
            key = (status.get("UIDVALIDITY", 0), status.get("UIDNEXT", 0))
            if self._seen.get(folder) not in (None, key):
                changed.append(folder)
            self._seen[folder] = key
        return changed

    def _wait_and_wake(self, conn: GmailConnection) -> None:
        first = self.folders[0]
        idle = conn.has("IDLE") and not self.idle_refused
        selected = conn.selected
        if selected is None or not _same_folder(selected.name, first):
            # Mail that reached the first folder while another was selected was never
            # announced to this session: compare UIDNEXT with the last time we were here.
            before = self._first_key
            status = conn.examine(first)
            self._first_key = (status.uidvalidity, status.uidnext)
            self._first_exists = conn.exists_seen
            if before is not None and (self._first_key != before or status.uidnext is None):
                self._wake(conn, [first])
                return
        changed: List[str] = []
        left = self._next_poll - time.monotonic()
        idled = False
        if left > 0:
            if idle:
                idled = True
                self.idles += 1
                timeout = min(self.idle_interval, left) if (len(self.folders) > 1) else self.idle_interval
                try:
                    conn.idle(timeout, interrupt=self._interrupted)
                except ImapError as exc:
                    if exc.status not in ("NO", "BAD"):
                        raise
                    # A server may list IDLE and still refuse it (a proxy, a limit on
                    # sessions): the watch goes on, polling, rather than end for good.
                    self.idle_refused, idled = True, False
                    log.warning("%s refused IDLE (%s %s); watching by polling every %s "
                                "instead", conn.host, exc.status, printable(exc.text or exc),
                                _duration(self.interval))
            else:
                deadline = time.monotonic() + left
                while not self._interrupted() and time.monotonic() < deadline:
                    self._stop.wait(min(IDLE_POLL, max(0.0, deadline - time.monotonic())))
            if self._check_link:
                self._check_link = False
                conn.noop()
        if self._catch_up_requested.is_set():
            self._catch_up_requested.clear()
            changed = list(self.folders)
        if time.monotonic() >= self._next_poll and not self._stop.requested:
            self.polls += 1
            self._next_poll = time.monotonic() + self.interval
            if not idled:
                conn.noop()     # no IDLE here, or the polls left no time for it
            changed += self._remember_others(conn)
        # New mail in the first folder shows as EXISTS, in IDLE or with any command since
        # its last catch-up (a STATUS of another folder included).
        if conn.exists_seen != self._first_exists:
            changed.append(first)
        self._wake(conn, [folder for folder in self.folders if folder in changed])


class _WatchRun(Run):
    """A Run that a stopping watch ends before its next FETCH, at a safe point."""

    def __init__(self, *args: Any, stopping: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stopping = stopping

    def before_fetch(self, conn: GmailConnection) -> None:
        if self._stopping():
            raise RunStopped("stopped by a signal before the next batch")
        super().before_fetch(conn)


class WatchSession:
    """The catch-up of a watch over the incremental state: ``Watcher(connect, folders,
    WatchSession(store, ...))``.

    Each wake-up is one Run, so each one that applies something is one run in
    ``history`` (and the latest batch is what ``undo`` reverses).  A dry run keeps one Run
    for the whole watch, whose marks move only in memory: each message is reported once.
    ``reclassify`` (``--all``) and ``new_only`` (``--new-only``) apply to each folder until
    its first catch-up completes.  ``rules()`` gives the rules in force (they may be
    reloaded); ``stopping()`` ends a catch-up before its next FETCH.  When the daily
    download budget is reached, catching up pauses until 00:00 UTC (``paused_until``, a
    ``time.time()`` value; ``on_pause(paused_until)`` is told, so that it can ask the
    Watcher to catch up then) and the watch stays connected.  ``max_new_folders`` is per
    day (UTC) too, over all catch-ups and all watches of the account, counted in the state
    file (``folders_made()``): past it a catch-up leaves alone the messages that need more
    (until the next day, or a watch started with a higher limit), and makes the others'
    changes, never ending the watch for what senders write.
    """

    def __init__(self, store: StateStore, rules: Callable[[], Ruleset], user: str, host: str,
                 port: Optional[int] = None, *, apply: bool = False, reclassify: bool = False,
                 new_only: bool = False, daily_budget: Optional[int] = DEFAULT_DAILY_BUDGET,
                 max_new_folders: Optional[int] = DEFAULT_MAX_NEW_FOLDERS,
                 batch_size: int = DEFAULT_BATCH, allow_expunge: bool = False,
                 on_record: Optional[Callable[[Dict[str, Any]], None]] = None,
                 on_message: Optional[Callable[[Outcome], None]] = None,
                 stopping: Callable[[], bool] = lambda: False,
                 on_pause: Optional[Callable[[float], None]] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.rules = rules
        self.user, self.host, self.port = user, host, port
        self.account = account_key(user, host, port)
        self.options = RunOptions(apply=apply, reclassify=reclassify, new_only=new_only,
                                  daily_budget=daily_budget, batch_size=batch_size,
                                  allow_expunge=allow_expunge, max_new_folders=max_new_folders,
                                  hold=True)
        self.on_record = on_record
        self.on_message = on_message
        self.stopping = stopping
        self.on_pause = on_pause
        self.clock = clock
        self.paused_until = 0.0
        self._reclassify: set = set()
        self._new_only: set = set()
        self._dry_run: Optional[Run] = None
        self._last_run: Optional[Run] = None
        self.runs = 0               # wake-ups that ran (applied or not)

    @property
    def apply(self) -> bool:
        return self.options.apply

    @property
    def daily_budget(self) -> Optional[int]:
        return self.options.daily_budget

    @daily_budget.setter
    def daily_budget(self, value: Optional[int]) -> None:
        self.options = dataclasses.replace(self.options, daily_budget=value)

    def check_start(self, folders: Sequence[str]) -> None:
        """Refuse to watch a folder the state knows nothing about, unless told what to do.

        Raises StateError (exit 2) naming the folders and the three ways forward."""
        self._reclassify = set(folders) if self.options.reclassify else set()
        self._new_only = set(folders) if self.options.new_only else set()
        if self.options.reclassify or self.options.new_only:
            return
        unknown = [f for f in folders if self.store.folder(self.account, f) is None]
        if unknown:
            raise StateError(f"no state yet for {', '.join(unknown)} of {self.account}: do a "
                             f"'run --apply' first, or start watch with --all (classify "
                             f"everything, then watch) or --new-only (only mail that "
                             f"arrives from now on)")

    def _run(self) -> Run:
        if not self.apply and self._dry_run is not None:
            self._dry_run.rules = self.rules()
            self._dry_run.rules_hash = rules_hash(self._dry_run.rules)
            return self._dry_run
        # --all and --new-only are set per folder, until its first catch-up completes.
        options = dataclasses.replace(self.options, reclassify=False, new_only=False)
        run = _WatchRun(self.store, self.rules(), self.user, self.host, self.port,
                        options=options, command="watch", on_record=self.on_record,
                        on_message=self.on_message, stopping=self.stopping)
        if self._last_run is not None:
            run.count_after(self._last_run)     # one connection, many runs: count each byte once
        self._last_run = run
        if not self.apply:
            self._dry_run = run
        return run

    def _today(self) -> str:
        return datetime.fromtimestamp(self.clock(), timezone.utc).date().isoformat()

    def folders_made(self, day: Optional[str] = None) -> int:
        """The folders watches of this account created on ``day`` (ISO date, default today,
        UTC), as the state file counts them: a restarted or second watch counts on."""
        return self.store.daily("watch_folders", self.account, day or self._today())

    def __call__(self, conn: GmailConnection, folders: Sequence[str]) -> None:
        if self.clock() < self.paused_until:
            return
        run = self._run()
        status, error = "complete", ""
        try:
            for folder in folders:
                run.reclassify = folder in self._reclassify
                run.new_only = folder in self._new_only
                day, limit = self._today(), self.options.max_new_folders
                before = sum(len(report.created) for report in run.reports)
                try:
                    run.classify(conn, folder, batch_size=self.options.batch_size,
                                 allow_expunge=self.options.allow_expunge,
                                 max_new_folders=None if limit is None else
                                 max(0, limit - self.folders_made(day)))
                finally:
                    if self.apply:      # a dry run's are only those it would create
                        made = sum(len(report.created) for report in run.reports) - before
                        self.store.add_daily("watch_folders", self.account, made, day)
                self._reclassify.discard(folder)
                self._new_only.discard(folder)
        except BudgetExceededError as exc:
            status, error = "stopped", str(exc)
            now = datetime.fromtimestamp(self.clock(), timezone.utc)
            midnight = datetime.combine(now.date() + timedelta(days=1), _dt.time(),
                                        tzinfo=timezone.utc)
            self.paused_until = midnight.timestamp()
            log.warning("%s; watch stays connected and catches up after 00:00 UTC", exc)
            if self.on_pause is not None:
                self.on_pause(self.paused_until)
        except (RunStopped, StopRequested) as exc:
            status, error = "interrupted", str(exc)
        except BaseException as exc:
            status, error = "failed", str(exc)
            raise
        finally:
            self.runs += 1
            if self.apply:
                _cleanup(lambda: run.finish(status, error))
            else:
                run.reports.clear()             # a dry run lives for days: keep it small
                _cleanup(self.store.save)       # the download count, nothing else


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


# --- OAuth2 sign-in ----------------------------------------------------------------------
#
# Google's installed-app flow (RFC 8252, OAuth 2.0 for native apps) with PKCE (RFC 7636),
# standard library only.  ``authorize`` opens the consent page in a browser; Google sends
# the browser back to a one-shot HTTP server on 127.0.0.1 with a code, which we exchange,
# with the PKCE verifier, for a refresh token.  A machine with no browser either forwards
# the port (``ssh -L``) or pastes the final address from the browser back into the prompt.
# The refresh token is stored per user, mode 0600; ``OAuthTokenSource`` turns it into
# short-lived access tokens for XOAUTH2.  Tokens never reach a log line, argv or an
# error message: errors quote only the endpoint's ``error`` and ``error_description``.
#
# Both endpoint URLs are parameters (module constants by default, read at call time), so
# tests can run the whole flow against loopback servers.  Anything but https is refused
# unless the host is a loopback address.

GOOGLE_AUTH_URL = "https://accounts.google.com/o/oauth2/v2/auth"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
OAUTH_SCOPE = "https://mail.google.com/"     # the only scope Gmail IMAP accepts
OAUTH_TIMEOUT = 30.0            # seconds for one request to the token endpoint
OAUTH_WAIT = 300.0              # seconds `auth` waits for the browser to come back
OAUTH_CONNECTION_TIMEOUT = 10.0  # seconds one connection to the redirect listener may idle
OAUTH_CONNECTIONS = 16          # connections the redirect listener serves at once; more are closed
TOKEN_REFRESH_MARGIN = 300.0    # refresh an access token this long before it expires
TOKEN_REUSE = 60.0              # a token fetched this recently serves a reconnect as is
TOKEN_FILE_VERSION = 1


class OAuthError(AuthenticationError):
    """Google refused the sign-in or the refresh (``error`` holds its code, e.g. ``"invalid_grant"``)."""

    def __init__(self, message: str, *, error: str = "") -> None:
        super().__init__(message, command="OAUTH", status="NO", code=error, text=message)
        self.error = error


@dataclass(frozen=True)
class OAuthClient:
    """The user's own OAuth client (type "Desktop app"): ``OAuthClient("123-abc.apps.googleusercontent.com", "GOCSPX-...")``."""

    client_id: str
    client_secret: str = ""

    def __repr__(self) -> str:      # never show the secret, not even in a traceback
        return f"OAuthClient(client_id={self.client_id!r}, client_secret=<hidden>)"


def load_client_secret_file(path: str) -> OAuthClient:
    """Read the client JSON that Google Cloud Console downloads (``{"installed": {...}}``).

    Raises RulesError (exit 2) when the file is missing or is not such a file.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            doc = load_json(handle.read())
    except OSError as exc:
        raise RulesError(f"cannot read the OAuth client file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise RulesError(f"the OAuth client file {path} is not JSON ({exc}); download it "
                         f"again from Google Cloud Console → Credentials") from exc
    section = (doc.get("installed") or doc.get("web") or (doc if "client_id" in doc else None)
               if isinstance(doc, dict) else None)
    if not isinstance(section, dict) or not isinstance(section.get("client_id"), str):
        raise RulesError(f"{path} is not a Google OAuth client file (no installed.client_id); "
                         f"create a client of type 'Desktop app' and download its JSON")
    secret = section.get("client_secret", "")
    return OAuthClient(section["client_id"], secret if isinstance(secret, str) else "")


def _endpoint(url: str, what: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(parts.hostname or "")):
        return url
    raise OAuthError(f"refusing the {what} {url!r}: only https (or http to a loopback "
                     f"address, for tests) is allowed")


class _RefuseRedirect(urllib.request.HTTPRedirectHandler):
    """The token endpoint answers itself: a redirect would take the client secret and the
    grant to an address the https-or-loopback check never saw."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        fp.close()
        raise ProtocolError(f"the token endpoint {req.full_url} answered HTTP {code}, a redirect "
                            f"to {newurl!r}; refusing to follow it: check the token URL")


def _token_request(token_url: str, form: Mapping[str, str]) -> Dict[str, Any]:
    """POST a form to the token endpoint; the JSON answer, or OAuthError / ConnectionLostError."""
    url = _endpoint(token_url, "token endpoint")
    request = urllib.request.Request(
        url, data=urllib.parse.urlencode(form).encode("ascii"), method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded",
                 "Accept": "application/json", "User-Agent": f"gmail_classify/{__version__}"})
    handlers: List[Any] = [_RefuseRedirect()]
    if _is_loopback(urllib.parse.urlsplit(url).hostname or ""):
        handlers.append(urllib.request.ProxyHandler({}))    # never send loopback to a proxy
    else:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context()))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=OAUTH_TIMEOUT) as response:
            body = response.read(1024 * 1024)
            status = response.status
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(1024 * 1024)
        exc.close()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionLostError(f"cannot reach the token endpoint {url}: {reason}; check "
                                  f"the network, then try again") from exc
    doc = None
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        doc = load_json(body.decode("utf-8"))
    if status >= 500:
        raise ConnectionLostError(f"the token endpoint {url} answered HTTP {status}; try again later")
    if not isinstance(doc, dict):
        raise ProtocolError(f"the token endpoint {url} answered HTTP {status} with something "
                            f"that is not a JSON object")
    if status != 200 or "error" in doc:
        error = str(doc.get("error", f"HTTP {status}"))[:80]
        detail = str(doc.get("error_description", ""))[:200]
        raise OAuthError(f"Google refused: {error}" + (f" ({detail})" if detail else ""),
                         error=error)
    return doc


@dataclass(frozen=True)
class _Redirect:
    code: str = ""
    error: str = ""


def _read_redirect(query: str, state: str) -> _Redirect:
    """Check the query of the address Google sent the browser back to; raise if it is wrong."""
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    got_state = (params.get("state") or [""])[0]
    error = (params.get("error") or [""])[0]
    # The state first: only an answer carrying this sign-in's state comes from Google.
    # Anything else (another local user, a web page fetching 127.0.0.1, an old tab) may
    # not end the sign-in, not even with error=access_denied.
    if not got_state or not secrets.compare_digest(got_state.encode("utf-8", "replace"),
                                                   state.encode("utf-8")):
        raise OAuthError("sign-in failed: the answer's state parameter does not match this "
                         "sign-in (an old browser tab, or a forged request); run auth again",
                         error="bad_state")
    if error:
        if error == "access_denied":
            raise OAuthError("sign-in refused: access was denied on Google's consent page; run "
                             "auth again and allow access to mail", error=error)
        raise OAuthError(f"sign-in failed: Google answered {error[:80]}", error=error)
    code = (params.get("code") or [""])[0]
    if not code:
        raise OAuthError("sign-in failed: the answer carries no authorisation code; run auth again",
                         error="no_code")
    return _Redirect(code=code)


def _parse_pasted(line: str, state: str) -> Optional[_Redirect]:
    """A pasted redirect address (``http://127.0.0.1:PORT/?state=...&code=...``); None if blank."""
    text = line.strip()
    if not text:
        return None
    query = urllib.parse.urlsplit(text).query if "://" in text else text.lstrip("/?")
    if "state=" not in query:
        raise OAuthError("that is not the address Google redirected to; paste the whole "
                         "address from the browser's address bar (it starts with "
                         "http://127.0.0.1)", error="bad_paste")
    return _read_redirect(query, state)


_DONE_PAGE = ("<!doctype html><meta charset=utf-8><title>gmail_classify</title>"
              "<p>{}</p><p>You can close this tab.</p>")


class _RedirectCatcher(http.server.ThreadingHTTPServer):
    """A one-shot loopback server that waits for the browser's redirect.

    Any local program can connect to it, so one thread per connection (an idle one
    blocks only itself, and gives up after OAUTH_CONNECTION_TIMEOUT), at most
    OAUTH_CONNECTIONS at once (a flood of connections is closed unread, it cannot grow
    threads without end; pasting the address still works), and only a request carrying
    this sign-in's state ends the wait; anything else gets 400.
    """

    daemon_threads = True
    block_on_close = False     # shutting down never waits for an idle connection

    def __init__(self, port: int, state: str) -> None:
        super().__init__(("127.0.0.1", port), _RedirectHandler)
        self.state = state
        self.result: Optional[_Redirect] = None
        self.error: Optional[OAuthError] = None
        self.done = threading.Event()
        self.slots = threading.BoundedSemaphore(OAUTH_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)      # too many at once: closed, no thread
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _RedirectHandler(http.server.BaseHTTPRequestHandler):
    server: _RedirectCatcher
    timeout = OAUTH_CONNECTION_TIMEOUT     # per connection: a silent client is dropped

    def setup(self) -> None:
        super().setup()
        # The whole connection, not only each read, within the limit: a client sending a
        # byte now and then would otherwise keep its slot, and with all of them the
        # browser's redirect out.
        self.cut = threading.Timer(OAUTH_CONNECTION_TIMEOUT, self.hang_up)
        self.cut.daemon = True
        self.cut.start()

    def hang_up(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self.cut.cancel()
        super().finish()

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        if parts.path not in ("", "/") or self.server.done.is_set():
            self.send_error(404)
            return
        try:
            result = _read_redirect(parts.query, self.server.state)
            message, status = "Signed in: gmail_classify has its token.", 200
        except OAuthError as exc:
            if exc.error == "bad_state":     # not this sign-in's answer: keep waiting
                self.send_error(400, "not the answer to this sign-in")
                return
            result, message, status = None, html.escape(str(exc)), 400
            self.server.error = exc
        self.server.result = result
        self.server.done.set()
        body = _DONE_PAGE.format(message).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:   # the query holds the code
        return


def _stdin_lines(stream: TextIO = sys.stdin) -> Callable[[float], Optional[str]]:
    """A reader for pasted lines: ``read(timeout)`` returns a line, or None after timeout."""
    try:
        stream.fileno()
    except (OSError, ValueError, AttributeError):      # in memory: never blocks
        def read_memory(timeout: float) -> Optional[str]:
            line = stream.readline()
            if not line:
                time.sleep(timeout)
            return line or None
        return read_memory
    if os.name != "posix":
        pasted: List[str] = []

        def reader() -> None:
            with contextlib.suppress(OSError, ValueError):
                pasted.append(stream.readline())

        threading.Thread(target=reader, daemon=True).start()

        def read_threaded(timeout: float) -> Optional[str]:
            time.sleep(timeout)
            return pasted.pop() if pasted else None
        return read_threaded
    closed = [False]

    def read(timeout: float) -> Optional[str]:
        if closed[0]:
            time.sleep(timeout)
            return None
        try:
            ready, _, _ = select.select([stream], [], [], timeout)
        except (OSError, ValueError):
            closed[0] = True
            return None
        if not ready:
            return None
        line = stream.readline()
        closed[0] = not line            # end of input: nothing more will come
        return line or None
    return read


def _await_redirect(catcher: _RedirectCatcher, state: str, wait: float,
                    read_pasted: Optional[Callable[[float], Optional[str]]]) -> _Redirect:
    """The browser's redirect, caught by ``catcher`` or pasted, within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        if catcher.done.wait(0 if read_pasted else min(0.2, max(0.0, deadline - time.monotonic()))):
            if catcher.error is not None:
                raise catcher.error
            return catcher.result
        if time.monotonic() >= deadline:
            raise OAuthError(f"no answer from the browser within {wait:.0f} s; run auth "
                             f"again (on a machine without a browser, paste the address "
                             f"the browser ends on)", error="timeout")
        if read_pasted is not None:
            line = read_pasted(min(0.2, max(0.0, deadline - time.monotonic())))
            redirect = None if line is None else _parse_pasted(line, state)
            if redirect is not None:
                return redirect


def authorize(client: OAuthClient, user: str, *, port: int = 0,
              open_browser: Optional[Callable[[str], Any]] = webbrowser.open,
              read_pasted: Optional[Callable[[float], Optional[str]]] = None,
              show: Callable[[str], None] = lambda text: None,
              wait: Optional[float] = None, auth_url: Optional[str] = None,
              token_url: Optional[str] = None) -> Dict[str, Any]:
    """Run Google's installed-app flow for ``user``; returns the token endpoint's answer.

    Listens on 127.0.0.1:``port`` (0: any free port), passes the consent address to
    ``show`` and ``open_browser``, then waits up to ``wait`` seconds for the browser's
    redirect (default OAUTH_WAIT), or for a pasted redirect address from
    ``read_pasted(timeout)``.  The answer
    is ``{"access_token": "ya29...", "refresh_token": "1//...", "expires_in": 3599, ...}``.
    Raises OAuthError (refused, wrong state, timeout, no refresh token, mail access not
    granted) and ConnectionLostError (the token endpoint is unreachable).
    """
    wait = OAUTH_WAIT if wait is None else wait
    auth_endpoint = _endpoint(auth_url or GOOGLE_AUTH_URL, "authorisation endpoint")
    token_endpoint = _endpoint(token_url or GOOGLE_TOKEN_URL, "token endpoint")
    # PKCE (RFC 7636 §4): a verifier of 86 URL-safe characters and its S256 challenge.
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    state = secrets.token_urlsafe(24)
    try:
        catcher = _RedirectCatcher(port, state)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OAuthError(f"port {port} is in use; choose another --port (or 0 for any "
                             f"free port)", error="port") from exc
        raise OAuthError(f"cannot listen on 127.0.0.1:{port} for Google's redirect: "
                         f"{exc.strerror or exc}; choose another --port", error="port") from exc
    redirect_uri = f"http://127.0.0.1:{catcher.server_address[1]}/"
    query = urllib.parse.urlencode({
        "client_id": client.client_id, "redirect_uri": redirect_uri, "response_type": "code",
        "scope": OAUTH_SCOPE, "state": state, "code_challenge": challenge,
        "code_challenge_method": "S256", "access_type": "offline", "prompt": "consent",
        "login_hint": user})
    url = auth_endpoint + ("&" if "?" in auth_endpoint else "?") + query
    thread = threading.Thread(target=catcher.serve_forever, kwargs={"poll_interval": 0.05},
                              name="gmail_classify-oauth-redirect", daemon=True)
    thread.start()
    try:
        show(url)
        if open_browser is not None:
            try:
                open_browser(url)
            except Exception as exc:  # a broken browser setup must not end the sign-in
                log.info("could not open a browser (%s); use the address shown", exc)
        redirect = _await_redirect(catcher, state, wait, read_pasted)
    finally:
        catcher.shutdown()
        catcher.server_close()
        thread.join(5)
    answer = _token_request(token_endpoint, {
        "grant_type": "authorization_code", "code": redirect.code,
        "code_verifier": verifier, "redirect_uri": redirect_uri,
        "client_id": client.client_id, "client_secret": client.client_secret})
    granted = str(answer.get("scope", OAUTH_SCOPE)).split()
    if OAUTH_SCOPE not in granted:
        raise OAuthError("sign-in incomplete: access to mail was not granted (the box for "
                         "'Read, compose, send and permanently delete all your email' was "
                         "left unticked); run auth again and allow it", error="scope")
    if not answer.get("refresh_token"):
        raise OAuthError("Google returned no refresh token; remove the app's access at "
                         "https://myaccount.google.com/permissions and run auth again",
                         error="no_refresh_token")
    return answer


def token_dir() -> pathlib.Path:
    """``$XDG_CONFIG_HOME/gmail_classify/tokens`` (``~/.config/...`` by default)."""
    return default_rules_dir() / "tokens"


def token_path(user: str) -> pathlib.Path:
    """Where the refresh token of ``user`` lives; the name is the address, made file-safe."""
    safe = re.sub(r"[^A-Za-z0-9@._+-]", "_", user.strip().lower()) or "_"
    return token_dir() / f"{safe.lstrip('.')}.json"


def save_refresh_token(user: str, client: OAuthClient, refresh_token: str) -> pathlib.Path:
    """Store the refresh token (and the client it belongs to) atomically, mode 0600 in 0700."""
    path = token_path(user)
    doc = {"version": TOKEN_FILE_VERSION, "user": user, "client_id": client.client_id,
           "client_secret": client.client_secret, "refresh_token": refresh_token,
           "scope": OAUTH_SCOPE, "created": _iso(_utcnow(), "+00:00")}
    try:
        _make_private_dir(path.parent)
        _replace_privately(path, json.dumps(doc, indent=1))
    except OSError as exc:
        raise RulesError(f"cannot store the token in {path}: {exc.strerror or exc}; set "
                         f"XDG_CONFIG_HOME to a writable place") from None
    return path


def load_refresh_token(user: str) -> Optional[Tuple[OAuthClient, str]]:
    """The stored (client, refresh token) of ``user``, or None if ``auth`` never ran.

    Raises RulesError for a file others can read or one that is not ours.
    """
    path = token_path(user)
    try:
        problem = trust_problem(path, private=True, directories=False)
        if problem and not problem.startswith("cannot check"):
            raise RulesError(f"{problem} (or 'auth' again)")
        with open(path, encoding="utf-8") as handle:
            doc = load_json(handle.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RulesError(f"cannot read the stored token {path}: {exc}; run auth again") from None
    if not (isinstance(doc, dict) and doc.get("version") == TOKEN_FILE_VERSION
            and isinstance(doc.get("refresh_token"), str) and isinstance(doc.get("client_id"), str)):
        raise RulesError(f"{path} is not a gmail_classify token file; delete it and run auth again")
    stored = doc.get("user")
    if isinstance(stored, str) and stored.strip().lower() != user.strip().lower():
        # Two addresses can make the same file name (token_path): never sign one in with
        # the other's grant.
        raise RulesError(f"{path} holds the token of {printable(stored)}, not of "
                         f"{printable(user)}; run auth again for {printable(user)}")
    return OAuthClient(doc["client_id"], str(doc.get("client_secret") or "")), doc["refresh_token"]


class OAuthTokenSource:
    """A callable giving a current access token from a refresh token (for ``token=``).

    ``GmailConnection(user, token=OAuthTokenSource(client, refresh_token))`` calls it on
    every (re)connect; it refreshes over HTTPS unless the token in hand is fresh (fetched
    within ``TOKEN_REUSE`` seconds and not within ``TOKEN_REFRESH_MARGIN`` of expiry).
    Raises OAuthError (``invalid_grant``: the grant was revoked or expired; sign in again)
    and ConnectionLostError (the token endpoint is unreachable; a retry may work).
    """

    def __init__(self, client: OAuthClient, refresh_token: str, *, user: str = "",
                 token_url: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.user = user
        self.token_url = token_url
        self._refresh_token = refresh_token
        self._clock = clock
        self._access: Optional[str] = None
        self._fetched = 0.0
        self._expires = 0.0
        self.refreshes = 0

    def __repr__(self) -> str:
        return f"OAuthTokenSource(client_id={self.client.client_id!r}, user={self.user!r})"

    def __call__(self) -> str:
        now = self._clock()
        if (self._access is not None and now - self._fetched < TOKEN_REUSE
                and now < self._expires - TOKEN_REFRESH_MARGIN):
            return self._access
        return self.refresh()

    def refresh(self) -> str:
        """Ask the token endpoint for a new access token now."""
        try:
            answer = _token_request(self.token_url or GOOGLE_TOKEN_URL, {
                "grant_type": "refresh_token", "refresh_token": self._refresh_token,
                "client_id": self.client.client_id, "client_secret": self.client.client_secret})
        except OAuthError as exc:
            who = f" for {self.user}" if self.user else ""
            if exc.error == "invalid_grant":
                raise OAuthError(f"the Google sign-in{who} was revoked or has expired "
                                 f"(invalid_grant); run 'gmail_classify.py auth"
                                 f"{' --user ' + self.user if self.user else ''}' again",
                                 error=exc.error) from None
            if exc.error in ("invalid_client", "unauthorized_client"):
                raise OAuthError(f"Google refused the OAuth client ({exc.error}); check the "
                                 f"client id and secret, then run auth again",
                                 error=exc.error) from None
            raise
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("the token endpoint answered without an access_token")
        lifetime = 3600.0
        with contextlib.suppress(TypeError, ValueError):
            lifetime = float(answer.get("expires_in", 3600))
        now = self._clock()
        self._access, self._fetched, self._expires = token, now, now + lifetime
        self.refreshes += 1
        log.info("refreshed the OAuth2 access token (valid for %d s)", int(lifetime))
        return token


# --- Doctor: what a server can and cannot do, before any change --------------------------
#
# ``doctor`` signs in, asks (LIST, NAMESPACE, CAPABILITY; never SELECT, never a write) and
# tells in one table what a run would meet there: TLS, the capabilities that matter, the
# folders trash, archive, All Mail and junk would use and why, how a move would be made,
# what of the rules this server cannot do, the account's state and budget.  Every problem
# carries the exit code a run would end with and what to do about it.

# The capabilities that change what a run does, in the order the table lists them.
DOCTOR_CAPABILITIES = ("MOVE", "UIDPLUS", "SPECIAL-USE", "IDLE", "CONDSTORE", "NAMESPACE",
                       "X-GM-EXT-1", "APPENDLIMIT", "LITERAL+", "LITERAL-", "UTF8=ACCEPT")

# Known providers, by the end of the server's host name: (host suffixes, name, quirks).
PROVIDER_NOTES: Tuple[Tuple[Tuple[str, ...], str, str], ...] = (
    (("gmail.com", "googlemail.com"), "Gmail",
     "labels, not folders: a label is added, archive takes away Inbox, a move is a label "
     "change; IMAP downloads are limited to about 2,500 MB a day (see --daily-budget)"),
    (("mail.me.com", "icloud.com"), "iCloud",
     "no MOVE (moves are COPY, \\Deleted and UID EXPUNGE) and no SPECIAL-USE (trash found "
     "by name); an app-specific password is needed"),
    (("office365.com", "outlook.com", "hotmail.com", "live.com"), "Microsoft 365",
     "OAuth2 only: passwords are refused for IMAP (--auth xoauth2 with a token from "
     "--password-command)"),
    (("yahoo.com", "aol.com"), "Yahoo",
     "IMAP shows at most 10,000 messages per folder; an app password is needed"),
)


@dataclass(frozen=True)
class DoctorRow:
    """One line of the doctor's table: ``DoctorRow("moving", "MOVE")``; a problem has
    ``exit_code`` (what a run would exit with) and ``advice`` (what to do)."""

    check: str
    result: str
    exit_code: int = 0
    advice: str = ""

    @property
    def ok(self) -> bool:
        return not self.exit_code


@dataclass(frozen=True)
class Diagnosis:
    """The doctor's table for one account; ``exit_code``: the first problem's, or 0."""

    account: str
    rows: Tuple[DoctorRow, ...]

    @property
    def problems(self) -> Tuple[DoctorRow, ...]:
        return tuple(row for row in self.rows if not row.ok)

    @property
    def exit_code(self) -> int:
        return self.problems[0].exit_code if self.problems else EXIT_OK


def provider_note(host: str) -> Optional[Tuple[str, str]]:
    """(provider, its quirks) for a known provider's host name, else None."""
    host = host.lower().rstrip(".")
    for suffixes, name, note in PROVIDER_NOTES:
        if any(host == s or host.endswith("." + s) for s in suffixes):
            return name, note
    return None


def _provider_rows(host: str) -> List[DoctorRow]:
    known = provider_note(host)
    return [DoctorRow("provider", f"{known[0]}: {known[1]}")] if known else []


def diagnose_failure(user: str, host: str, port: int, exc: GmailClassifyError) -> Diagnosis:
    """The table for an account the doctor could not sign in to: the error is the problem."""
    what = {EXIT_AUTH: ("sign-in", "check the password (an app password where the provider "
                        "wants one) or run auth again for OAuth2"),
            EXIT_CONNECTION: ("connection", "check the host, port and network; for a TLS "
                              "error, the certificate (--cafile) or --starttls")}
    check, advice = what.get(exc.exit_code, ("server", "see the error"))
    rows = [DoctorRow("server", f"{host}:{port}"),
            DoctorRow(check, str(exc).split("\n")[0], exc.exit_code, advice)]
    return Diagnosis(account_key(user, host, port), tuple(rows + _provider_rows(host)))


def diagnose(conn: GmailConnection, rules: Ruleset, folders: Sequence[str] = ("INBOX",), *,
             allow_expunge: bool = False, store: Optional[StateStore] = None,
             daily_budget: Optional[int] = DEFAULT_DAILY_BUDGET,
             oauth: bool = False) -> Diagnosis:
    """What this signed-in server can and cannot do for ``rules`` on ``folders``, read-only
    (CAPABILITY, LIST, NAMESPACE; no folder is opened, nothing is written).

    Returns the Diagnosis; its first problem's ``exit_code`` is what a run would exit with
    (5 for a capability or folder the rules need).  ``store`` adds the account's marks and
    today's downloads; ``oauth``: the sign-in used a stored OAuth2 token (now shown valid)."""
    rows: List[DoctorRow] = []
    plain = {"tls": "TLS", "starttls": "STARTTLS", "plaintext": "no TLS (loopback only)"}
    rows.append(DoctorRow("server", f"{conn.host}:{conn.port}, "
                                    f"{plain.get(conn.security, conn.security)}"))
    tls = conn.tls_info()
    if tls is not None:
        rows.append(DoctorRow("TLS", f"{tls['version']} ({tls['cipher']}); certificate for "
                                     f"{tls['subject']} by {tls['issuer']}, verified, valid "
                                     f"until {tls['expires']}"))
    rows.append(DoctorRow("sign-in", f"ok as {conn.user}" +
                          (" with the stored OAuth2 token (still valid)" if oauth else "")))
    have = [", ".join(c for c in conn.capabilities if c == name or c.startswith(name + "="))
            or f"no {name}" for name in DOCTOR_CAPABILITIES]
    rows.append(DoctorRow("capabilities", "; ".join(have)))
    prefix, delimiter = conn.namespace()
    rows.append(DoctorRow("namespace", f"prefix {json.dumps(prefix)}, separator "
                                       f"{json.dumps(delimiter)}"))
    listed = conn.list_folders()
    for use, role in (("\\Trash", "trash"), ("\\Archive", "archive"), ("\\All", "all mail"),
                      ("\\Junk", "junk")):
        if role == "archive" and conn.is_gmail:
            rows.append(DoctorRow(role, "takes away the Inbox label (Gmail)"))
            continue
        folder = conn.special_folder(use)
        if folder is None:
            rows.append(DoctorRow(role, f"none (no folder is marked {use})"))
        elif (folder.special_use or "").lower() == use.lower():
            rows.append(DoctorRow(role, f"{folder.name} (marked {use})"))
        else:
            rows.append(DoctorRow(role, f"{folder.name} (found by its name: no folder is "
                                        f"marked {use})"))
    if conn.has("MOVE"):
        moving = "MOVE: safe"
    elif conn.has("UIDPLUS"):
        moving = "COPY, then \\Deleted and UID EXPUNGE of exactly those messages: safe"
    elif allow_expunge:
        moving = ("COPY, then a plain EXPUNGE (--allow-expunge): it would also expunge any "
                  "other message marked \\Deleted in the folder")
    else:
        moving = "only with --allow-expunge (a plain EXPUNGE; no MOVE, no UIDPLUS)"
    rows.append(DoctorRow("moving", moving))
    rows.extend(_doctor_rules(conn, rules, folders, listed, allow_expunge))
    if store is not None:
        rows.extend(_doctor_state(conn, rules, folders, store, daily_budget))
    return Diagnosis(account_key(conn.user, conn.host, conn.port),
                     tuple(rows + _provider_rows(conn.host)))


def _doctor_rules(conn: GmailConnection, rules: Ruleset, folders: Sequence[str],
                  listed: Sequence[Folder], allow_expunge: bool) -> List[DoctorRow]:
    """The rows about the rules: what this server cannot do of them, and the folders."""
    rows: List[DoctorRow] = []
    try:
        settled = _settle(conn, rules, allow_expunge)
    except CapabilityError as exc:
        rows.append(DoctorRow("rules", str(exc).split("\n")[0], exc.exit_code,
                              "pass --allow-expunge, or drop move, archive and trash from "
                              "the rules for this server" if "EXPUNGE" in str(exc) else
                              "create the folder, or drop the actions that need it"))
    else:
        rows.extend(DoctorRow("rules", note) for note in settled.notes)
    notes = list(rules.local()[1]) if not conn.is_gmail else []
    if not conn.is_gmail and any(rule.actions.labels for rule in rules.rules):
        notes.append("labels are copies into folders here (no Gmail labels)")
    rows.extend(DoctorRow("rules", note) for note in notes)
    if not rows:
        count = len(rules.rules)
        rows.append(DoctorRow("rules", f"every action of {count} rule"
                                       f"{'' if count == 1 else 's'} can be done here"))
    names = {folder.name.casefold() for folder in listed}
    for folder in folders:
        name = conn.server_name(folder)
        if name.upper() != "INBOX" and name.casefold() not in names:
            rows.append(DoctorRow("folders", f"{folder}: not on this server", EXIT_SERVER,
                                  "check the name with 'labels', or fix folders / --folder"))
    return rows


def _doctor_state(conn: GmailConnection, rules: Ruleset, folders: Sequence[str],
                  store: StateStore, daily_budget: Optional[int]) -> List[DoctorRow]:
    """The rows about the account's state: each folder's mark, today's downloads."""
    account = account_key(conn.user, conn.host, conn.port)
    marks = []
    for folder in folders:
        state = store.folder(account, folder)
        if state is None:
            marks.append(f"{folder}: no state yet (the first run classifies everything)")
        else:
            changed = "" if state.rules == rules_hash(rules) else ", rules changed since"
            marks.append(f"{folder}: classified up to UID {state.mark} (UIDVALIDITY "
                         f"{state.uidvalidity}{changed})")
    rows = [DoctorRow("state", "; ".join(marks))]
    used = store.downloaded(account)
    if daily_budget:
        full = used >= daily_budget
        rows.append(DoctorRow("budget", f"{_human_size(used)} of {_human_size(daily_budget)} "
                                        f"downloaded today (UTC)", EXIT_INCOMPLETE if full else 0,
                              "wait for 00:00 UTC, or raise --daily-budget" if full else ""))
    else:
        rows.append(DoctorRow("budget", f"{_human_size(used)} downloaded today; no budget"))
    return rows


# --- Importers and suggestions -----------------------------------------------------------
#
# Meet users where their rules already are: Gmail's own filters (Settings -> Filters ->
# Export writes mailFilters.xml), or no rules at all (suggest reads a folder's headers and
# proposes some). Both return plain rules documents that format_rules writes out.

# Gmail's filter export is an Atom feed; each <entry> is one filter, each criterion and
# action an <apps:property name='...' value='...'/> (see IMAP-NOTES.md, "filter export").
_ATOM = "{http://www.w3.org/2005/Atom}"
_APPS = "{http://schemas.google.com/apps/2006}"
MAX_FILTER_FILE_BYTES = 16 * 1024 * 1024   # a real export is a few hundred KB at most

# Filter actions -> the rule key they become; Gmail writes the value 'true'.
_FILTER_ACTIONS = {"shouldArchive": "archive", "shouldMarkAsRead": "mark_read",
                   "shouldStar": "star", "shouldTrash": "trash"}
# Filter actions IMAP cannot carry out -> why, as reported per filter.
_FILTER_UNMAPPED = {
    "forwardTo": "forwarding; keep it as a filter in Gmail",
    "smartLabelToApply": "a category; Gmail's tabs are not visible over IMAP",
    "shouldAlwaysMarkAsImportant": "mark as important",
    "shouldNeverMarkAsImportant": "never mark as important",
    "shouldNeverSpam": "never send to spam",
}
_FILTER_CRITERIA = ("from", "to", "subject", "hasTheWord", "doesNotHaveTheWord",
                    "hasAttachment", "excludeChats", "size", "sizeOperator", "sizeUnit")
_SIZE_OPERATORS = {"s_sl": "larger", "s_ss": "smaller"}
_SIZE_SUFFIXES = {"s_sb": "", "s_skb": "K", "s_smb": "M"}
_QUERY_TOKEN = re.compile(r'"[^"]*"|[^\s"]+')
# A term with a leading '-' is Gmail's "not" (subject:(-invoice)): never a plain term.
_ADDRESS_TERM = re.compile(r"(?!-)(?:[\w.+-]*@[\w-]+(\.[\w-]+)+|[\w-]+(\.[\w-]+)+)")
_WORD_TERM = re.compile(r"(?!-)[\w'-]+|\"[^\"{}()]+\"")


@dataclass(frozen=True)
class ImportedFilters:
    """What import_gmail_filters made of an export.

    doc: {"rule": [...]} ready for format_rules; comments: comment lines per rule;
    notes: one line per property left out, e.g. 'filter 3: left out forwardTo
    (forwarding ...)'; filters: how many filters the file held.
    """

    doc: Dict[str, Any]
    comments: Tuple[Tuple[str, ...], ...]
    notes: Tuple[str, ...]
    filters: int


def _check_plain_xml(data: bytes, source: str) -> None:
    """Refuse a DOCTYPE (and so every entity) before ElementTree sees the bytes.

    Gmail's export never has one; a file that does could expand entities without
    end ("billion laughs") or point at external files. Raises RulesError.
    """
    def refuse(*_args: Any) -> None:    # raised through expat, out of Parse()
        raise RulesError(f"{source}: has a DOCTYPE or entity declarations, which Gmail's "
                         f"export never has; refusing to read it")

    parser = xml.parsers.expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as exc:
        raise RulesError(f"{source}: not valid XML ({exc}); export the filters from Gmail "
                         f"again") from None


def _query_group(value: str) -> str:
    """A criterion as one Gmail query term: bare when it is one simple token, else (kept whole)."""
    if re.fullmatch(r'[^\s(){}"]+', value) and not value.startswith("-") and ":" not in value:
        return value
    return f"({value})"


def _or_terms(value: str) -> Optional[List[str]]:
    """'a', 'a OR b', '{a b}' or '(a OR b)' as the list of alternatives; None for anything else."""
    text = value.strip()
    if re.fullmatch(r"\{[^{}()]*\}", text):
        return _QUERY_TOKEN.findall(text[1:-1]) or None
    if re.fullmatch(r"\([^{}()]*\)", text):
        text = text[1:-1].strip()
    tokens = _QUERY_TOKEN.findall(text)
    if not tokens or len(tokens) % 2 == 0 or any(tok != "OR" for tok in tokens[1::2]):
        return None
    return tokens[0::2]


def _address_patterns(value: str) -> Optional[List[str]]:
    """from:(...) as address regexes, when every alternative is an address or a domain."""
    terms = _or_terms(value)
    if not terms or not all(_ADDRESS_TERM.fullmatch(t) for t in terms):
        return None
    patterns = []
    for term in terms:
        escaped = re.escape(term.lower())
        if term.startswith("@"):
            patterns.append(f"/{escaped}(?![\\w.-])/i")
        elif "@" in term:
            patterns.append(f"/(?<![\\w.+-]){escaped}(?![\\w.-])/i")
        else:
            patterns.append(f"/[@.]{escaped}(?![\\w.-])/i")
    return patterns


def _word_patterns(value: str) -> Optional[List[str]]:
    """subject:(...) as whole-word regexes, when every alternative is a word or a "phrase"."""
    terms = _or_terms(value)
    if not terms or not all(_WORD_TERM.fullmatch(t) for t in terms) or "OR" in terms:
        return None
    return ["/(?<!\\w)" + r"\s+".join(re.escape(w) for w in t.strip('"').split()) + "(?!\\w)/i"
            for t in terms]


def _one_or_list(items: List[str]) -> Any:
    return items[0] if len(items) == 1 else items


def _filter_criteria(number: int, values: Mapping[str, str], notes: List[str]
                     ) -> Optional[Tuple[List[str], Dict[str, Any], bool]]:
    """A filter's criteria -> (Gmail query terms, the same as local conditions, whether
    those say exactly what the query does), or None (noted) when it cannot be used."""
    def text(name: str) -> str:   # a line break in a query is only whitespace
        return " ".join(values.get(name, "").split())

    query: List[str] = []
    local: Dict[str, Any] = {}
    exact = True
    # Gmail's to: also covers Cc and Bcc as Gmail saw them: no local condition says it.
    for name, patterns_of in (("from", _address_patterns), ("to", None),
                              ("subject", _word_patterns)):
        if text(name):
            query.append(f"{name}:" + _query_group(text(name)))
            patterns = patterns_of(text(name)) if patterns_of else None
            exact = exact and patterns is not None
            if patterns:
                local[name] = _one_or_list(patterns)
    if text("hasTheWord"):
        query.append(_query_group(text("hasTheWord")))
        exact = False
    if text("doesNotHaveTheWord"):
        words = text("doesNotHaveTheWord")
        single = re.fullmatch(r'[^\s(){}"-][^\s(){}"]*', words) and ":" not in words
        query.append(f"-{words}" if single else f"-{{{words}}}")
        exact = False
    if values.get("hasAttachment") == "true":
        query.append("has:attachment")
        local["has_attachment"] = True
    if values.get("excludeChats") == "true":
        query.append("-in:chats")   # IMAP folders hold no chats: nothing to add locally
    if values.get("size", "").strip():
        size = values["size"].strip()
        operator = _SIZE_OPERATORS.get(values.get("sizeOperator", "s_sl"))
        suffix = _SIZE_SUFFIXES.get(values.get("sizeUnit", "s_sb"))
        if not size.isdigit() or operator is None or suffix is None:
            notes.append(f"filter {number}: skipped: size {size!r} with sizeOperator "
                         f"{values.get('sizeOperator')!r}, sizeUnit {values.get('sizeUnit')!r} "
                         f"is not understood")
            return None
        query.append(f"{operator}:{size}{suffix}")
        local["larger_than" if operator == "larger" else "smaller_than"] = f"{size}{suffix}"
    if not query:
        notes.append(f"filter {number}: skipped: no criteria")
        return None
    return query, local, exact


def _filter_actions(number: int, values: Mapping[str, str], notes: List[str]
                    ) -> Optional[Dict[str, Any]]:
    """A filter's actions as rule keys, or None (noted) when none can be done."""
    actions: Dict[str, Any] = {}
    label = values.get("label", "")
    if label.strip():
        if _FORBIDDEN_CHARS.search(label):
            notes.append(f"filter {number}: left out label {label!r}: it holds a line break")
        else:   # braces in a label are literal, not template fields
            actions["label"] = label.replace("{", "{{").replace("}", "}}")
    for name, key in _FILTER_ACTIONS.items():
        if values.get(name) == "true":
            actions[key] = True
    if actions.get("trash") and actions.pop("archive", False):
        notes.append(f"filter {number}: archive left out: it also trashes, which wins")
    for name, why in _FILTER_UNMAPPED.items():
        if values.get(name, "").strip() and values[name] != "false":
            notes.append(f"filter {number}: left out {name} ({why})")
    if not actions:
        notes.append(f"filter {number}: skipped: none of its actions can be done over IMAP")
        return None
    return actions


def _convert_filter(number: int, props: List[Tuple[str, str]]
                    ) -> Tuple[Optional[Dict[str, Any]], List[str], List[str]]:
    """One filter's properties -> (rule or None, comment lines, notes)."""
    notes: List[str] = []
    values: Dict[str, str] = {}
    for name, value in props:
        if name in values and values[name] != value:
            notes.append(f"filter {number}: skipped: property {name} given twice")
            return None, [], notes
        values[name] = value
    unknown = [n for n in values if n not in _FILTER_CRITERIA and n not in _FILTER_ACTIONS
               and n not in _FILTER_UNMAPPED and n != "label"]
    if unknown:
        notes.append(f"filter {number}: skipped: unknown property {', '.join(unknown)}; left out "
                     f"whole so that it never acts on more mail than it does in Gmail")
        return None, [], notes

    criteria = _filter_criteria(number, values, notes)
    actions = _filter_actions(number, values, notes) if criteria else None
    if not criteria or not actions:
        return None, [], notes
    query, local, exact = criteria
    search = " ".join(query)
    problem = _unbalanced_query(search)
    if problem:     # as a rule it would be refused, and the whole file with it
        notes.append(f"filter {number}: skipped: its search has {problem}; left out whole "
                     f"so that the other filters still import")
        return None, [], notes
    rule: Dict[str, Any] = {"name": f"Gmail filter {number}", "gmail_query": search}
    if exact and local:
        rule.update(local)
    rule.update(actions)
    rule["continue"] = True
    comment = [f"Gmail filter {number}: {search}"]
    if not (exact and local):
        comment.append("Decided by Gmail's search alone: on other servers and in `test` "
                       "this rule is skipped.")
    return rule, comment, notes


def import_gmail_filters(data: bytes, source: str = "mailFilters.xml") -> ImportedFilters:
    """Convert Gmail's filter export (Atom XML) into a rules document.

    Each filter becomes one rule, in order, with continue = true (Gmail applies
    every matching filter). Its criteria become a gmail_query in Gmail's own
    syntax; local conditions are added too where they say exactly the same.
    Raises RulesError for a file that is not a safe, well-formed export.
    """
    if len(data) > MAX_FILTER_FILE_BYTES:
        raise RulesError(f"{source}: {len(data)} bytes is far more than a filter export; "
                         f"is it the right file?")
    _check_plain_xml(data, source)
    try:
        root = xml.etree.ElementTree.fromstring(data)
    except xml.etree.ElementTree.ParseError as exc:
        raise RulesError(f"{source}: not valid XML ({exc})") from None
    if root.tag != f"{_ATOM}feed":
        raise RulesError(f"{source}: not a Gmail filter export (expected an Atom <feed>, "
                         f"found <{root.tag}>); export it from Gmail's Settings -> Filters")
    rules: List[Dict[str, Any]] = []
    comments: List[Tuple[str, ...]] = []
    notes: List[str] = []
    entries = root.findall(f"{_ATOM}entry")
    for number, entry in enumerate(entries, 1):
        props = [(p.get("name", ""), p.get("value", "")) for p in entry.iter(f"{_APPS}property")]
        rule, comment, found = _convert_filter(number, props)
        notes.extend(found)
        if rule is not None:
            rules.append(rule)
            comments.append(tuple(comment))
    return ImportedFilters({"rule": rules}, tuple(comments), tuple(notes), len(entries))


# suggest: what a folder's headers say about the rules its owner needs.
_AUTOMATED_LOCAL = re.compile(r"no-?reply|do-?not-?reply|notifications?|alerts?|mailer-daemon|"
                              r"bounces?|updates?|news(letter)?|info|support|auto", re.IGNORECASE)
_PLAIN_ADDRESS = re.compile(r"[\w.+=-]+@[\w-]+(\.[\w-]+)+")
_PLAIN_LIST_ID = re.compile(r"[\w.+=-]+")
SUGGEST_HEADERS = ("FROM", "SUBJECT", "LIST-ID", "LIST-UNSUBSCRIBE", "AUTO-SUBMITTED",
                   "PRECEDENCE")


@dataclass(frozen=True)
class Suggestions:
    """What suggest_rules proposes: doc and comments for format_rules, and how much it read."""

    doc: Dict[str, Any]
    comments: Tuple[Tuple[str, ...], ...]
    examined: int
    folder: str


@dataclass
class _Tally:
    count: int = 0
    sample: str = ""
    name: str = ""
    members: set = field(default_factory=set)

    def add(self, subject: str, name: str = "", member: str = "") -> None:
        self.count += 1
        self.sample = self.sample or " ".join(subject.split())[:70]   # the first with one
        self.name = self.name or name
        if member:
            self.members.add(member)


def _top(tallies: Dict[str, _Tally], top: int, min_count: int,
         skip: Iterable[str] = ()) -> List[Tuple[str, _Tally]]:
    skip = set(skip)
    ranked = sorted(tallies.items(), key=lambda kv: (-kv[1].count, kv[0]))
    return [(key, t) for key, t in ranked if t.count >= min_count and key not in skip][:top]


def suggest_rules(conn: GmailConnection, folder: str = "INBOX", *, top: int = 10,
                  min_count: int = 2, batch_size: int = DEFAULT_BATCH,
                  limit: Optional[int] = None) -> Suggestions:
    """Read a folder's headers (EXAMINE: nothing can change) and propose label rules.

    Proposes, biggest first: mailing lists (List-Id), automated senders (no-reply
    style addresses, List-Unsubscribe or Auto-Submitted without a list), domains
    with several senders, and single senders; at most ``top`` of each, each seen
    at least ``min_count`` times, with its count and a sample subject as comments.
    Labels nest with the server's hierarchy separator ("Lists/python-announce").
    """
    conn.examine(folder)
    uids = conn.search(["ALL"])
    if limit is not None:
        uids = uids[-limit:] if limit > 0 else []
    item = f"BODY.PEEK[HEADER.FIELDS ({' '.join(SUGGEST_HEADERS)})]"
    lists: Dict[str, _Tally] = {}
    automated: Dict[str, _Tally] = {}
    senders: Dict[str, _Tally] = {}
    domains: Dict[str, _Tally] = {}
    examined = 0
    for start in range(0, len(uids), batch_size):
        conn.stop.check("before the next FETCH")       # a safe point (see Stop)
        fetched = conn.fetch(uids[start:start + batch_size], [item])
        for values in fetched.values():
            examined += 1
            headers = parse_headers(values.get(item) or b"")
            subject = _first(header_text(headers, "subject"))
            list_id = _first(header_text(headers, "list-id")).strip()
            name, address = (_header_mailboxes(headers, "from") or [("", "")])[0]
            address = address.lower()
            if list_id:
                found = re.search(r"<([^<>]+)>", list_id)
                key = (found.group(1) if found else list_id).strip().lower()
                description = list_id[:found.start()].strip().strip('"') if found else ""
                if _PLAIN_LIST_ID.fullmatch(key):
                    lists.setdefault(key, _Tally()).add(subject, description)
                continue
            if not _PLAIN_ADDRESS.fullmatch(address):
                continue   # nothing a rule could name plainly (a sender chose it: be wary)
            local_part, _, domain = address.rpartition("@")
            bulk = bool(header_text(headers, "list-unsubscribe")) \
                or _first(header_text(headers, "auto-submitted")).strip().lower() not in ("", "no") \
                or _first(header_text(headers, "precedence")).strip().lower() in ("bulk", "list", "junk")
            if bulk or _AUTOMATED_LOCAL.search(local_part):
                automated.setdefault(address, _Tally()).add(subject, name)
                continue
            senders.setdefault(address, _Tally()).add(subject, name)
            domains.setdefault(domain, _Tally()).add(subject, member=address)
    rules: List[Dict[str, Any]] = []
    comments: List[Tuple[str, ...]] = []
    sep = next((f.delimiter for f in conn.list_folders() if f.delimiter), "/")

    def propose(rule: Dict[str, Any], tally: _Tally, what: str) -> None:
        rules.append(rule)
        sample = f', e.g. "{tally.sample}"' if tally.sample else ""
        comments.append((f"{what}: {tally.count} messages{sample}",))

    for key, tally in _top(lists, top, min_count):
        short = clean_component(key.split(".")[0], sep)
        propose({"name": f"List {key}", "list_id": _whole_pattern(key),
                 "label": f"Lists{sep}{short}"}, tally,
                "Mailing list" + (f" {tally.name!r}" if tally.name else ""))
    for address, tally in _top(automated, top, min_count):
        domain = clean_component(address.rpartition("@")[2], sep)
        propose({"name": f"Automated {address}", "from": _whole_pattern(address),
                 "label": f"Automated{sep}{domain}"}, tally, "Automated sender")
    shared = {d: t for d, t in domains.items() if len(t.members) > 1}
    covered = set()
    for domain, tally in _top(shared, top, min_count):
        covered.update(tally.members)
        propose({"name": f"Domain {domain}", "from": _whole_pattern(f"@{domain}", ""),
                 "label": f"Senders{sep}{clean_component(domain, sep)}"}, tally,
                 f"{len(tally.members)} senders at {domain}")
    for address, tally in _top(senders, top, min_count, skip=covered):
        propose({"name": f"Sender {address}", "from": _whole_pattern(address),
                 "label": f"Senders{sep}" + re.sub(r"[^\w.@+-]", "", address).replace(
                     sep, "-")[:_COMPONENT_MAX]},
                tally, "Sender" + (f" {tally.name!r}" if tally.name else ""))
    return Suggestions({"rule": rules}, tuple(comments), examined, folder)


# Export: the rules compiled to the server's own engines.  Sieve (RFC 5228) runs them at
# delivery; a rule it cannot say exactly (a Gmail search, a program, the message's state or
# age, its body, a regex outside POSIX ERE) and that has no `continue` stops the export, since
# leaving it out would hand its mail to the rules after it.  JSON gives the rules as data.
EXPORT_FORMATS = ("sieve", "gmail", "json")


class _Inexpressible(Exception):
    """This condition or action has no exact equivalent in the target (the message says why)."""


@dataclass
class Exported:
    """An export: ``text`` to write; ``rules`` exported, ``left_out`` (rule, why) for
    `continue` rules dropped, ``stopped`` (rule, why) where an export with ``partial``
    stopped (None when every rule went in)."""

    text: str
    rules: int = 0
    left_out: List[Tuple[Rule, str]] = field(default_factory=list)
    stopped: Optional[Tuple[Rule, str]] = None


def _left_out(done: Exported, rules: Ruleset, rule: Rule, why: str, partial: bool, engine: str,
              consequence: str) -> bool:
    """A rule an export cannot say exactly: left out (True: the export goes on) when its
    ``continue`` passes its mail on; otherwise the export ends before it (False) with
    ``partial``, and without it refuses, since ``consequence``."""
    if rule.continue_:
        done.left_out.append((rule, why))
        return True
    if not partial:
        raise RulesError(f"{rules.source}: rule {rule.position} "
                         f"({json.dumps(rule.name, ensure_ascii=False)}) cannot be exported "
                         f"to {engine}: {why}; {consequence}, so nothing is written "
                         f"(--partial writes the rules before it)") from None
    done.stopped = (rule, why)
    return False


def _sieve_string(text: str) -> str:
    """A Sieve quoted string (RFC 5228 §2.4.2): backslash and double quote escaped.  A
    text holding '${' has none: in a script that requires "variables" (RFC 5229) the
    server expands it in every string, tests' keys included, and no escape prevents that
    ("${x}" would become "" and match every message)."""
    if "${" in text:
        raise _Inexpressible(f"the text {_quote(text)} holds '${{', which Sieve's "
                             f"variables would expand")
    return _sieve_quoted(text)


def _sieve_quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sieve_list(items: Sequence[str]) -> str:
    return _sieve_string(items[0]) if len(items) == 1 else \
        "[" + ", ".join(_sieve_string(item) for item in items) + "]"


_ERE_LITERAL_ESCAPES = set(".[]()*+?{}|^$\\/-")


def _posix_ere(source: str) -> Optional[str]:
    """``source`` (a Python regex) as a POSIX extended regex that matches the same text, or
    None when it uses anything outside the common subset: classes like \\d \\w \\s \\b,
    lazy or possessive quantifiers, groups with ``(?``, back-references, escapes inside a
    bracket, a ``{`` that is not a bound, or any non-ASCII character."""
    if not source.isascii():
        return None
    out: List[str] = []
    i, quantifiable = 0, False
    while i < len(source):
        char = source[i]
        if char == "\\":
            if i + 1 >= len(source) or source[i + 1] not in _ERE_LITERAL_ESCAPES:
                return None
            nxt = source[i + 1]
            out.append(nxt if nxt in "/-" else "\\" + nxt)
            i, quantifiable = i + 2, True
        elif char == "[":
            end = i + 1
            if end < len(source) and source[end] == "^":
                end += 1
            if end < len(source) and source[end] == "]":
                end += 1
            while end < len(source) and source[end] != "]":
                if source[end] in "\\[":
                    return None         # escapes and [: :] classes differ between the two
                end += 1
            if end >= len(source):
                return None
            out.append(source[i:end + 1])
            i, quantifiable = end + 1, True
        elif char in "*+?":
            if not quantifiable or source[i + 1:i + 2] in ("?", "+"):
                return None             # lazy or possessive
            out.append(char)
            i, quantifiable = i + 1, False
        elif char == "{":
            bound = re.match(r"\{(\d+)(,(\d*))?\}", source[i:])
            if not bound or not quantifiable or source[i + bound.end():i + bound.end() + 1] in ("?", "+"):
                return None
            out.append(bound.group(0))
            i, quantifiable = i + bound.end(), False
        elif char == "}" or not (" " <= char <= "~") or \
                (char == "(" and source[i + 1:i + 2] in ("?", ")")):
            return None
        else:       # a literal or ) $ . (a quantifier may follow), or ( | ^ (none may)
            out.append(char)
            i, quantifiable = i + 1, char not in "(|^"
    return "".join(out)


def _sieve_matcher(headers: Sequence[str], matcher: Matcher, addresses: bool,
                   require: set) -> str:
    """Tests for 'one of these headers matches one of these patterns'."""
    tests: List[str] = []
    plain = [p.needle for p in matcher.patterns if p.regex is None]
    for needle in plain:
        if not needle.isascii():
            raise _Inexpressible(f"the text {_quote(needle)} is not ASCII (Sieve's caseless "
                                 f"comparison folds ASCII only)")
    if plain:
        tests.append(f"header :contains {_sieve_list(headers)} {_sieve_list(plain)}")
    for pattern in matcher.patterns:
        if pattern.regex is None:
            continue
        whole = _whole_text(pattern.text)
        if addresses and whole != pattern.text and whole.isascii() and "@" in whole and \
                pattern.text == _whole_pattern(whole, "" if whole.startswith("@") else "(^|<)"):
            # What suggest and learn write (_whole_pattern): one address, or the domain of
            # one, compared whole, as Sieve's address test does for each address.
            part, value = (":domain", whole[1:]) if whole.startswith("@") else (":all", whole)
            tests.append(f"address {part} :is {_sieve_list(headers)} {_sieve_string(value)}")
            continue
        flags = pattern.regex.flags & (re.IGNORECASE | re.MULTILINE | re.DOTALL | re.VERBOSE)
        ere = _posix_ere(pattern.regex.pattern)
        if ere is None or flags & ~re.IGNORECASE:
            raise _Inexpressible(f"the regex {pattern.text} is outside the POSIX ERE subset "
                                 f"Sieve engines implement")
        if addresses and ("^" in ere or "$" in ere):
            raise _Inexpressible(f"the regex {pattern.text} is anchored, and Sieve matches a "
                                 f"whole address header, not each address")
        require.add("regex")
        comparator = "i;ascii-casemap" if flags & re.IGNORECASE else "i;octet"
        tests.append(f"header :regex :comparator {_sieve_string(comparator)} "
                     f"{_sieve_list(headers)} {_sieve_string(ere)}")
    return tests[0] if len(tests) == 1 else f"anyof ({', '.join(tests)})"


def _sieve_test(condition: Condition, require: set) -> str:
    """The Sieve test for a condition; raises _Inexpressible naming what has none."""
    if isinstance(condition, HeaderMatch):
        return _sieve_matcher(condition.headers, condition.matcher, condition.addresses, require)
    if isinstance(condition, HeaderPresent):
        test = f"exists {_sieve_string(condition.name)}"
        return test if condition.present else f"not {test}"
    if isinstance(condition, SizeCompare):
        return f"size {':over' if condition.larger else ':under'} {condition.limit}"
    if isinstance(condition, (AllOf, AnyOf)):
        parts = [_sieve_test(part, require) for part in condition.parts]
        joiner = "allof" if isinstance(condition, AllOf) else "anyof"
        return parts[0] if len(parts) == 1 else f"{joiner} ({', '.join(parts)})"
    if isinstance(condition, Not):
        return f"not {_sieve_test(condition.part, require)}"
    raise _Inexpressible(f"{condition.describe()} has no Sieve test")


def _sieve_folder(name: str, require: set, literal: bool = False) -> str:
    """A destination as a Sieve string: {year} and {month} become variables set from the
    delivery date (the INTERNALDATE a server gives new mail); ``literal``: a server's own
    folder name, braces and all."""
    pieces = [(False, name)] if literal else split_template(name)
    text: List[str] = []
    for is_field, piece in pieces:
        if is_field:
            if piece == "sender_domain":
                raise _Inexpressible("{sender_domain} is cleaned in ways Sieve cannot repeat")
            require.update(("variables", "date"))
            text.append("${" + piece + "}")
        else:
            if "${" in piece:
                raise _Inexpressible(f"the folder name {_quote(name)} holds '${{'")
            text.append(piece)
    return _sieve_quoted("".join(text))       # its own ${year} and ${month} only


class _SieveFolders:
    """The folders a Sieve script files into.  Without ``server``: names as in the rules
    (with ``/``), the archive and trash actions to ``archive`` and ``trash``.  With a
    signed-in ``server``: its own names (namespace prefix and separator, see
    GmailConnection.server_name) and, for archive and trash, the folders a run would use
    there (its special-use folders, else the ones found by name), looked up when a rule
    first needs them.  Names stay Unicode: a Sieve script is UTF-8 (RFC 5228 §2.4.2) and
    the server turns them into its own mailbox names (Pigeonhole: modified UTF-7 for IMAP),
    so modified UTF-7 is never written into the script.

    Raises CapabilityError for Gmail, which runs no Sieve (export --format gmail), and
    for an archive or trash folder the server does not have (as a run would)."""

    def __init__(self, server: Optional[GmailConnection] = None, archive: Optional[str] = None,
                 trash: Optional[str] = None) -> None:
        if server is not None and server.is_gmail:
            raise CapabilityError("Gmail runs no Sieve scripts at delivery; export "
                                  "--format gmail writes its filters instead")
        self.server = server
        self._special = {"archive": archive, "trash": trash}
        if server is None:
            self._special = {"archive": archive or "Archive", "trash": trash or "Trash"}

    def name(self, folder: str) -> str:
        """A rule's folder (or label) as the script names it."""
        return folder if self.server is None else self.server.server_name(folder)

    def special(self, action: str) -> str:
        """Where ``archive`` or ``trash`` files a message."""
        if self._special[action] is None:
            use = {"archive": "\\Archive", "trash": "\\Trash"}[action]
            self._special[action] = _special_destination(self.server, use, action).name
        return self._special[action]

    def destination(self, actions: Actions) -> Optional[Tuple[str, bool]]:
        """The rule's one destination as (name, literal), or None: a move is a rule's
        name (templates allowed), archive and trash are the server's own names."""
        if actions.move:
            return self.name(actions.move), False
        if actions.archive or actions.trash:
            return self.special("archive" if actions.archive else "trash"), self.server is not None
        return None

    def describe(self) -> Optional[str]:
        """The script's comment line on whose names it uses (None without a server)."""
        if self.server is None:
            return None
        prefix, delimiter = self.server.namespace()
        return (f"# Folder names as {self.server.user} at {self.server.host} has them "
                f"(namespace {json.dumps(prefix, ensure_ascii=False)}, separator "
                f"{json.dumps(delimiter, ensure_ascii=False)}).")


def _sieve_actions(actions: Actions, require: set, folders: _SieveFolders) -> List[str]:
    """The commands for one rule's actions, flags first so that the copies carry them;
    ``keep`` when the message has no other destination (a fileinto cancels the implicit keep)."""
    lines: List[str] = []
    for row in actions.flag_actions():
        require.add("imap4flags")
        lines.append(f"{'addflag' if row.add else 'removeflag'} {_sieve_string(row.flag)};")
    for label in actions.labels:
        require.add("fileinto")
        lines.append(f"fileinto {_sieve_folder(folders.name(label), require)};")
    destination = folders.destination(actions)
    if destination:
        require.add("fileinto")
        lines.append(f"fileinto {_sieve_folder(destination[0], require, destination[1])};")
    else:
        lines.append("keep;")
    return lines


def export_sieve(rules: Ruleset, *, partial: bool = False, archive: Optional[str] = None,
                 trash: Optional[str] = None,
                 server: Optional[GmailConnection] = None) -> Exported:
    """The rules as one Sieve script (RFC 5228, with fileinto, imap4flags, regex, variables
    and date where needed; never ``:create``, so a missing folder keeps the message in INBOX
    rather than letting senders make folders).

    Folder names are as in the rules, archive and trash go to ``archive`` and ``trash``
    ("Archive" and "Trash" by default); with ``server``, a signed-in GmailConnection, they
    are that server's names and folders (see _SieveFolders; only LIST and NAMESPACE are
    sent, never a change).

    Rules stop at the first match: a rule without `continue` whose match Sieve cannot say
    exactly raises RulesError naming it (``partial``: the rules before it are exported and
    ``stopped`` says where); such a rule with `continue` is left out (``left_out``).  Rules
    with `continue` are compiled with variables: every matching rule records what it asks,
    and one block at the end acts as the merged actions would (labels added, the first
    destination and the first choice of each flag winning)."""
    require: set = set()
    done = Exported("")
    compiled: List[Tuple[Rule, str]] = []
    folders = _SieveFolders(server, archive, trash)
    for rule in rules.rules:
        try:
            test = _sieve_test(rule.condition, require)
            _sieve_actions(rule.actions, set(), folders)     # its folders are sayable
        except _Inexpressible as exc:
            if _left_out(done, rules, rule, str(exc), partial, "Sieve",
                         "later rules would catch its mail at delivery"):
                continue
            break
        compiled.append((rule, test))
    body = (_sieve_merged(compiled, require, folders) if any(r.continue_ for r, _ in compiled)
            else _sieve_plain(compiled, require, folders))
    head = [f"# Sieve script exported by gmail_classify {__version__} from {rules.source}:",
            f"# {_plural(len(compiled), 'rule')}, first match wins (as in gmail_classify)."]
    head += filter(None, [folders.describe()])
    if done.stopped:
        rule, why = done.stopped
        head.append(f"# Stopped before rule {rule.position} ({rule.name}): {why}.")
    for rule, why in done.left_out:
        head.append(f"# Left out rule {rule.position} ({rule.name}, continue): {why}.")
    if require:
        head.append(f"require {_sieve_list(sorted(require))};")
    done.text = "\n".join(printable(line) if line.startswith("#") else line
                          for line in head) + "\n\n" + body
    done.rules = len(compiled)
    return done


def _sieve_dates(require: set) -> List[str]:
    if "date" not in require:
        return []
    return ['if currentdate :matches "year" "*" { set "year" "${1}"; }',
            'if currentdate :matches "month" "*" { set "month" "${1}"; }', ""]


def _sieve_plain(compiled: List[Tuple[Rule, str]], require: set, folders: _SieveFolders) -> str:
    """No `continue`: one ``if`` per rule, its actions, then ``stop``."""
    blocks: List[str] = []
    for rule, test in compiled:
        actions = _sieve_actions(rule.actions, require, folders)
        blocks.append(f"# {rule.position}. {printable(rule.name)}\nif {test} {{\n"
                      + "".join(f"    {line}\n" for line in actions) + "    stop;\n}\n")
    return "\n".join(_sieve_dates(require)) + "\n".join(blocks)


def _sieve_merged(compiled: List[Tuple[Rule, str]], require: set, folders: _SieveFolders) -> str:
    """With `continue`: variables record what each matching rule asks; one block at the
    end acts as Actions.merged would."""
    require.update(("variables", "fileinto"))
    labels: List[str] = []
    destinations: List[Tuple[str, bool]] = []
    blocks: List[str] = []
    decided = False
    for rule, test in compiled:
        body: List[str] = []
        actions = rule.actions
        for label in map(folders.name, actions.labels):
            if label not in labels:
                labels.append(label)
            body.append(f'set "label{labels.index(label) + 1}" "1";')
        destination = folders.destination(actions)
        if destination:
            if destination not in destinations:
                destinations.append(destination)
            body.append(f'if string :is "${{dest}}" "" {{ set "dest" '
                        f'"{destinations.index(destination) + 1}"; }}')
        for row in actions.flag_actions():
            name = "flag" + re.sub(r"[^a-z]", "", row.flag.lower())
            body.append(f'if string :is "${{{name}}}" "" {{ set "{name}" '
                        f'"{"add" if row.add else "remove"}"; }}')
        if not rule.continue_:
            body.append('set "decided" "1";')
        guard = f'allof (string :is "${{decided}}" "", {test})' if decided else test
        blocks.append(f"# {rule.position}. {printable(rule.name)}"
                      f"{' (continue)' if rule.continue_ else ''}\nif {guard} {{\n"
                      + "".join(f"    {line}\n" for line in body) + "}\n")
        decided = decided or not rule.continue_
    end = ["# What the matching rules asked for, merged: flags first, so the copies carry them."]
    flags = {row.flag for rule, _ in compiled for row in rule.actions.flag_actions()}
    for flag in sorted(flags):
        require.add("imap4flags")
        name = "flag" + re.sub(r"[^a-z]", "", flag.lower())
        end.append(f'if string :is "${{{name}}}" "add" {{ addflag {_sieve_string(flag)}; }}')
        end.append(f'if string :is "${{{name}}}" "remove" {{ removeflag {_sieve_string(flag)}; }}')
    for index, label in enumerate(labels, 1):
        end.append(f'if string :is "${{label{index}}}" "1" {{ fileinto {_sieve_folder(label, require)}; }}')
    keyword = "if"
    for index, (destination, literal) in enumerate(destinations, 1):
        end.append(f'{keyword} string :is "${{dest}}" "{index}" {{ fileinto '
                   f'{_sieve_folder(destination, require, literal)}; }}')
        keyword = "elsif"
    end.append("else { keep; }" if destinations else "keep;")
    return "\n".join(_sieve_dates(require)) + "\n".join(blocks) + "\n" + "\n".join(end) + "\n"


# Gmail's filters: one filter per rule (per label: a filter has one), its criteria one search
# in `hasTheWord`.  Gmail's search is word-based, so only conditions it can say exactly go in
# (gmail_query itself, attachments, sizes, ages, unread, starred, simple labels); substring
# matches on headers do not.  Gmail applies every matching filter, ours stop at the first:
# each filter carries the negated searches of the rules before it that stop.
GMAIL_FILTER_QUERY_MAX = 1500     # characters Gmail takes in one filter's search
GMAIL_FILTERS_MAX = 1000          # filters per account
_GMAIL_LABEL_TERM = re.compile(r"[A-Za-z0-9_-]+")


def _gmail_query(condition: Condition) -> str:
    """The Gmail search for a condition; raises _Inexpressible naming what has none."""
    if isinstance(condition, GmailQuery):
        return f"({condition.query})"
    if isinstance(condition, SizeCompare):
        return f"{'larger' if condition.larger else 'smaller'}:{condition.limit}"
    if isinstance(condition, AgeCompare):
        return f"{'older_than' if condition.older else 'newer_than'}:{condition.amount}{condition.unit}"
    if isinstance(condition, StateIs):
        term = {"has_attachment": "has:attachment", "unread": "is:unread",
                "starred": "is:starred"}[condition.key]
        return term if condition.want else f"-{term}"
    if isinstance(condition, HasLabel):
        terms = []
        for pattern in condition.matcher.patterns:
            if pattern.regex is not None or not _GMAIL_LABEL_TERM.fullmatch(pattern.text):
                raise _Inexpressible(f"has label {pattern.describe()} is not a plain label "
                                     f"name Gmail's label: search finds exactly")
            terms.append(f"label:{pattern.text}")
        return terms[0] if len(terms) == 1 else f"({' OR '.join(terms)})"
    if isinstance(condition, (AllOf, AnyOf)):
        parts = [_gmail_query(part) for part in condition.parts]
        joiner = " " if isinstance(condition, AllOf) else " OR "
        return parts[0] if len(parts) == 1 else f"({joiner.join(parts)})"
    if isinstance(condition, Not):
        return f"-({_gmail_query(condition.part)})" if not isinstance(condition.part, StateIs) \
            else _gmail_query(dataclasses.replace(condition.part, want=not condition.part.want))
    raise _Inexpressible(f"{condition.describe()}: Gmail's word-based search cannot say it "
                         f"exactly")


def _gmail_actions(actions: Actions) -> List[Dict[str, str]]:
    """The filters' actions for one rule: one dict of properties per label (a Gmail filter
    sets one label), the other actions on the first."""
    if actions.templates():
        raise _Inexpressible(f"{actions.templates()[0]} is a templated label")
    extra = [row.key for row in actions.flag_actions() if row.key not in ("mark_read", "star")]
    if extra:
        raise _Inexpressible(f"{extra[0]} has no Gmail filter action")
    labels = list(actions.labels) + ([actions.move] if actions.move else [])
    # A move is its folder's label and archive; trash wins over both.
    asked = {"shouldArchive": bool(actions.move or actions.archive) and not actions.trash,
             "shouldTrash": bool(actions.trash), "shouldMarkAsRead": actions.flag("mark_read"),
             "shouldStar": actions.flag("star")}
    common = {name: "true" for name, on in asked.items() if on}
    return [dict(common, label=label) for label in labels] or [common]


def export_gmail(rules: Ruleset, *, partial: bool = False) -> Exported:
    """The rules as Gmail's filter XML (what Settings -> Filters -> Import reads, and
    import_gmail_filters).  A rule without `continue` that Gmail cannot say exactly (or
    whose filters' searches, with the earlier rules negated, pass 1,500 characters)
    raises RulesError naming it (``partial``: the rules before it are exported); such a
    rule with `continue` is left out.  A `continue` rule with a destination or a flag is
    left out too: Gmail would let a later filter's destination win over it."""
    done = Exported("")
    stoppers: List[str] = []        # searches of earlier rules that stop: negated in later ones
    entries: List[Dict[str, str]] = []
    for rule in rules.rules:
        try:
            query = _gmail_query(rule.condition)
            filters = _gmail_actions(rule.actions)
            if rule.continue_ and (rule.actions.has_destination() or rule.actions.flag_actions()):
                raise _Inexpressible("a continue rule's destination or flags would not stay "
                                     "the first choice in Gmail")
            search = " ".join([query] + [f"-{q}" for q in stoppers])
            if len(search) > GMAIL_FILTER_QUERY_MAX:
                raise _Inexpressible(f"its search with the {len(stoppers)} earlier rules negated "
                                     f"takes {len(search)} characters, over Gmail's "
                                     f"{GMAIL_FILTER_QUERY_MAX}")
            if len(entries) + len(filters) > GMAIL_FILTERS_MAX:
                raise _Inexpressible(f"Gmail takes at most {GMAIL_FILTERS_MAX} filters")
        except _Inexpressible as exc:
            if _left_out(done, rules, rule, str(exc), partial, "Gmail filters",
                         "later filters would act on its mail"):
                continue
            break
        entries.extend(dict(item, hasTheWord=search) for item in filters)
        done.rules += 1
        if not rule.continue_:
            stoppers.append(query if query.startswith("(") else f"({query})")
    done.text = _gmail_feed(entries)
    return done


def _gmail_feed(entries: List[Dict[str, str]]) -> str:
    """The Atom feed Gmail exports and imports, one <entry> per filter."""
    tree = xml.etree.ElementTree
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    feed = tree.Element("feed", {"xmlns": _ATOM[1:-1], "xmlns:apps": _APPS[1:-1]})
    tree.SubElement(feed, "title").text = "Mail Filters"
    tree.SubElement(feed, "id").text = "tag:mail.google.com,2008:filters:"
    tree.SubElement(feed, "updated").text = now
    tree.SubElement(tree.SubElement(feed, "author"), "name").text = "gmail_classify"
    order = ("hasTheWord", "label", "shouldArchive", "shouldTrash", "shouldMarkAsRead", "shouldStar")
    for number, props in enumerate(entries, 1):
        entry = tree.SubElement(feed, "entry")
        tree.SubElement(entry, "category", {"term": "filter"})
        tree.SubElement(entry, "title").text = "Mail Filter"
        tree.SubElement(entry, "id").text = f"tag:mail.google.com,2008:filter:{number}"
        tree.SubElement(entry, "updated").text = now
        tree.SubElement(entry, "content")
        for name in order:
            if name in props:
                tree.SubElement(entry, "apps:property", {"name": name, "value": props[name]})
    return "<?xml version='1.0' encoding='UTF-8'?>" + tree.tostring(feed, encoding="unicode") + "\n"


def _as_data(value: Any) -> Any:
    """A rule's parts as JSON data: dataclasses as objects with their ``type``, patterns as
    written, tuples as lists; functions (a vendoring script's conditions) left out."""
    if isinstance(value, Pattern):
        return value.text
    if isinstance(value, Matcher):
        return [p.text for p in value.patterns]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {"type": type(value).__name__} if isinstance(value, Condition) else {}
        for item in dataclasses.fields(value):
            if item.compare and not callable(getattr(value, item.name)):
                data[item.name] = _as_data(getattr(value, item.name))
        return data
    if isinstance(value, (tuple, list)):
        return [_as_data(item) for item in value]
    if isinstance(value, (frozenset, set)):
        return sorted(_as_data(item) for item in value)
    return value


def export_json(rules: Ruleset) -> Exported:
    """The rules as data for other tools: each rule's name, position, `continue`, its
    condition as a tree of typed objects and its actions (as in the audit log)."""
    doc = {"format": "gmail_classify rules", "version": 1, "generator": f"gmail_classify {__version__}",
           "source": rules.source,
           "rules": [{"name": rule.name, "position": rule.position, "continue": rule.continue_,
                      "condition": _as_data(rule.condition), "actions": rule.actions.as_record()}
                     for rule in rules.rules]}
    return Exported(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", rules=len(rules.rules))


# --- Learning, explaining, comparing rules ----------------------------------------------
#
# Three read-only tools over the rule engine, for the questions people ask of any sorter.
# "Why did this happen?": explain_message asks each rule's condition to explain its verdict
# (Condition.explain), in order, and says which rule decided.  "What would this change
# change?": diff_messages / diff_folders classify the same mail with two rule sets, through
# classify_messages and dry runs of classify_folder, and keep the messages whose decision
# differs.  "Which rules would sort my mail as I do?": learn_rules reads how mail is already
# filed (read_filed_mail on a server, read_filed_path offline) and proposes rules a person
# can read, each with how often it was right on the newest mail, which it never learned on.


@dataclass(frozen=True)
class RuleVerdict:
    """One rule's verdict on one message, as ``why`` shows it.

    ``matched`` is True, False or None (the rule reads data the message lacks);
    ``reason`` is the condition's own explanation, e.g. 'subject: "Your receipt"
    contains "receipt"'; ``reached`` is False when an earlier matching rule without
    ``continue`` had already decided (the verdict is shown, but it changes nothing).
    """

    position: int
    name: str
    matched: Optional[bool]
    reason: str
    actions: Actions
    continue_: bool
    reached: bool


@dataclass(frozen=True)
class Explanation:
    """Every rule's verdict on one message, and the outcome (what the rules choose)."""

    verdicts: Tuple[RuleVerdict, ...]
    decision: Decision


def explain_message(rules: Ruleset, msg: MessageInfo, now: Optional[datetime] = None
                    ) -> Explanation:
    """Each rule's verdict on ``msg`` in order, through Condition.explain, and the Decision
    Ruleset.classify makes of it (final: what cannot be known counts as no match)."""
    now = now or datetime.now(timezone.utc)
    verdicts: List[RuleVerdict] = []
    reached = True
    try:
        for rule in rules.rules:
            value, reason = rule.condition.explain(msg, now)
            verdicts.append(RuleVerdict(rule.position, rule.name, value, reason, rule.actions,
                                        rule.continue_, reached))
            if reached and value and not rule.continue_:
                reached = False
    finally:
        _drop_header_cache(msg.headers)
    decision = rules.classify(msg, final=True, now=now)
    decision = dataclasses.replace(decision, actions=decision.actions.expanded(msg))
    return Explanation(tuple(verdicts), decision)


def _infos_for_rules(conn: GmailConnection, rules: Ruleset, folder: str,
                     uids: Sequence[int]) -> Dict[int, MessageInfo]:
    """What classify_folder would fetch of ``uids`` in the folder open (read-only) now:
    headers the rules read, flags, labels on Gmail, the body prefix if a rule reads it."""
    items = _fetch_items(rules.needs, conn.is_gmail)
    fetched = conn.fetch(uids, items)
    queries = {query: set(conn.search(["ALL"], gmail_raw=query, uids=uids))
               for query in sorted(rules.needs.queries)} if conn.is_gmail else None
    infos = {uid: _message_info(uid, fetched[uid], items[1], queries, folder)
             for uid in uids if uid in fetched and not _lacking(items, fetched[uid])}
    if rules.needs.body and infos:
        body_item = f"BODY.PEEK[]<0.{BODY_PREFIX_BYTES}>"
        bodies = conn.fetch(sorted(infos), [body_item])
        for uid in list(infos):
            if body_item in bodies.get(uid, {}):
                infos[uid] = dataclasses.replace(infos[uid],
                                                 body=body_text(bodies[uid][body_item] or b""))
    return infos


def find_messages(conn: GmailConnection, rules: Ruleset, folder: str = "INBOX", *,
                  message_id: Optional[str] = None, uid: Optional[int] = None
                  ) -> Dict[int, MessageInfo]:
    """The messages of ``folder`` with this Message-ID (angle brackets optional), or the
    one with this UID, as the rules see them: ``{uid: MessageInfo}``, empty when none.
    Read-only: the folder is opened with EXAMINE and fetched with BODY.PEEK.  Off Gmail
    pass ``rules.local()[0]``."""
    conn.examine(conn.server_name(folder))
    if uid is not None:
        uids = conn.search(["ALL"], uids=[uid])
    else:
        wanted = (message_id or "").strip()
        if wanted and not wanted.startswith("<"):
            wanted = f"<{wanted}>"
        uids = conn.search(["HEADER", "Message-ID", wanted])
    found = _infos_for_rules(conn, rules, folder, uids) if uids else {}
    if uid is None:     # SEARCH HEADER finds substrings, caselessly: keep the exact one
        found = {number: info for number, info in found.items()
                 if _first(header_text(info.headers, "message-id")).strip() == wanted}
    return found


@dataclass(frozen=True)
class DecisionChange:
    """One message whose decision differs between two rule sets: where it is (a file name,
    or "INBOX" and its UID), how to recognise it, and the two Decisions."""

    where: str
    uid: Optional[int]
    message_id: str
    sender: str
    subject: str
    before: Decision
    after: Decision


@dataclass
class RulesDiff:
    """What diff found: messages examined, those whose decision changed, and per rule
    name how many messages it matched before and after (``matched``: name -> [old, new])."""

    examined: int = 0
    changes: List[DecisionChange] = field(default_factory=list)
    matched: Dict[str, List[int]] = field(default_factory=dict)

    def count(self, before: Decision, after: Decision) -> None:
        self.examined += 1
        for side, decision in enumerate((before, after)):
            for name in dict.fromkeys(name for name, _reason in decision.matches):
                self.matched.setdefault(name, [0, 0])[side] += 1


def _choice(actions: Actions) -> Actions:
    """What the rules choose, whatever order the labels were collected in."""
    return dataclasses.replace(actions, labels=tuple(sorted(actions.labels)))


def same_decision(before: Decision, after: Decision) -> bool:
    """True when both decisions do the same to the message (the rules that chose it aside)."""
    return _choice(before.actions) == _choice(after.actions)


def _compare(result: RulesDiff, where: str, uid: Optional[int], first: Outcome,
             second: Outcome) -> None:
    """Count one message's two outcomes into ``result``; keep it if the decisions differ."""
    result.count(first.decision, second.decision)
    if not same_decision(first.decision, second.decision):
        result.changes.append(DecisionChange(where, uid, first.message_id, first.sender,
                                             first.subject, first.decision, second.decision))


def diff_messages(old: Ruleset, new: Ruleset, messages: Iterable[Tuple[str, MessageInfo]],
                  now: Optional[datetime] = None) -> RulesDiff:
    """Classify each (name, message) offline with both rule sets (classify_messages, as a
    dry run would) and collect the messages whose decision differs.  Streams: one message
    in hand at a time."""
    result = RulesDiff()
    for name, info in messages:
        found: List[Outcome] = []
        for rules in (old, new):
            classify_messages(rules, [info], on_message=found.append, now=now)
        _compare(result, name, None, found[0], found[1])
    return result


def diff_folders(conn: GmailConnection, old: Ruleset, new: Ruleset,
                 folders: Sequence[str] = ("INBOX",), *, since: Optional[_dt.date] = None,
                 batch_size: int = DEFAULT_BATCH, now: Optional[datetime] = None) -> RulesDiff:
    """Two dry runs of classify_folder per folder (EXAMINE, BODY.PEEK: nothing changes),
    one per rule set, compared message by message (by UID; mail that arrived between the
    two is left out).  Raises UidValidityError if a folder's UIDs were renumbered between
    them, and what classify_folder raises."""
    result = RulesDiff()
    now = now or datetime.now(timezone.utc)
    for folder in folders:
        seen: List[Dict[int, Outcome]] = [{}, {}]
        for side, rules in enumerate((old, new)):
            classify_folder(conn, rules, folder, since=since, batch_size=batch_size, now=now,
                            on_message=lambda outcome, side=side: seen[side].__setitem__(
                                outcome.uid, outcome))
        validity = {o.uidvalidity for side in seen for o in side.values()}
        if len(validity) > 1:
            raise UidValidityError(f"UIDVALIDITY of {folder} changed during the diff; run "
                                   f"it again", command="EXAMINE")
        for uid in sorted(set(seen[0]) & set(seen[1])):
            _compare(result, folder, uid, seen[0][uid], seen[1][uid])
    return result


# learn: examples (how each message is filed), candidate conditions, a chronological
# holdout, and rules chosen greedily among the candidates that are precise on both parts.

LEARN_HEADERS = ("FROM", "TO", "CC", "DELIVERED-TO", "SUBJECT", "LIST-ID", "LIST-UNSUBSCRIBE",
                 "MESSAGE-ID", "DATE")
DEFAULT_LEARN_LIMIT = 50_000
LEARN_MIN_WILSON = 0.9       # the Wilson 95 % lower bound on a rule's held-out precision
_LEARN_SLACK = 0.03          # the older part may be this much less precise (filing slips)
_LEARN_MAX_PARTS = 12        # conditions in one label's rule, at most
_LEARN_ACTION_SHARE = 0.9    # archive / star / move when this share of the examples was so
_LEARN_MOVED = 0.8           # a condition whose newer mail is less often the label's has moved
# Takeout's names for what is a state or a system place, not a label the user chose.
_TAKEOUT_NOT_TARGETS = {"opened", "unread", "archived", "inbox", "important", "starred", "sent",
                        "spam", "trash", "drafts", "draft", "chat", "chats"}
_SUBJECT_TOKEN = re.compile(r"[^\W\d_][\w'-]*[^\W_]|[^\W\d_]{2,}")
_KIND_ORDER = {"list_id": 0, "from": 1, "recipient": 2, "domain": 3, "subject": 4, "pair": 5,
               "header": 6}


@dataclass
class FiledMessage:
    """One example: a message, where its owner put it, and whether it is archived/starred.

    ``labels`` are the targets (user labels on Gmail, folders elsewhere, "\\Archive" for
    a folder marked \\Archive); ``places`` every folder it sits in (off Gmail)."""

    key: str
    date: datetime
    info: MessageInfo
    labels: set = field(default_factory=set)
    places: set = field(default_factory=set)
    archived: bool = False
    starred: bool = False


@dataclass
class FiledMail:
    """What read_filed_mail / read_filed_path found: the examples, oldest first, the kind
    of actions that fit (``gmail``: labels; else folders), the name of the folder marked
    \\Archive if any, and how many messages Trash holds."""

    messages: List[FiledMessage]
    gmail: bool
    source: str
    archive_folder: Optional[str] = None
    trash_count: int = 0


def _wilson_lower(right: int, total: int, z: float = 1.96) -> float:
    """The Wilson score interval's lower bound for ``right`` of ``total`` (0 for none):
    5 of 5 gives 0.57, 50 of 50 gives 0.93."""
    if total <= 0:
        return 0.0
    p = right / total
    centre = p + z * z / (2 * total)
    spread = z * ((p * (1 - p) + z * z / (4 * total)) / total) ** 0.5
    return (centre - spread) / (1 + z * z / total)


def _plain_list_id(headers: email.message.EmailMessage) -> str:
    value = _first(header_text(headers, "list-id")).strip()
    found = re.search(r"<([^<>]+)>", value)
    key = (found.group(1) if found else value).strip().lower()
    return key if key and _PLAIN_LIST_ID.fullmatch(key) else ""


def _learn_features(info: MessageInfo) -> frozenset:
    """The candidate conditions one message satisfies, as (kind, value) pairs: its sender,
    the sender's domain, its List-Id, each recipient, each subject word and pair of words,
    List-Unsubscribe present, and (domain, subject word) pairs."""
    headers = info.headers
    found = set()
    domain = ""
    senders = _header_mailboxes(headers, "from")
    if senders:
        address = senders[0][1].lower()
        if _PLAIN_ADDRESS.fullmatch(address):
            found.add(("from", address))
            domain = "@" + address.rpartition("@")[2]
            found.add(("domain", domain))
    list_id = _plain_list_id(headers)
    if list_id:
        found.add(("list_id", list_id))
    for name in ("to", "cc", "delivered-to"):
        for _display, address in _header_mailboxes(headers, name):
            if _PLAIN_ADDRESS.fullmatch(address.lower()):
                found.add(("recipient", address.lower()))
    words = _SUBJECT_TOKEN.findall(_normalise(_first(header_text(headers, "subject"))))
    words = [word for word in words if len(word) >= 3]
    phrases = set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}
    for phrase in phrases:
        found.add(("subject", phrase))
        if domain and " " not in phrase:
            found.add(("pair", domain, phrase))
    if _header_present(headers, "list-unsubscribe"):
        found.add(("header", "List-Unsubscribe"))
    return frozenset(found)


def _whole_pattern(text: str, start: str = "(^|<)") -> str:
    """An address, "@domain" or list id that a sender chose, as a regex that finds it
    only as the whole value or its closing <...> part: '/(^|<)a@b\\.example>?$/i' (at the
    end, so not in a display name before the address).  As plain text,
    "a@b.example" would also be found in a display name that holds it ("a@b.example"
    <x@evil.example>), "@b.example" in x@b.example.evil.net, and a list id "e" in every
    List-Id with an e in it."""
    escaped = re.sub(r"[.^$*+?{}()\[\]\\|/]", lambda c: "\\" + c.group(), text)
    return "/" + start + escaped + ">?$/i"


def _whole_text(value: Any) -> Any:
    """The text a _whole_pattern() regex was made from (else ``value`` as it is)."""
    found = re.fullmatch(r"/(?:\(\^\|<\))?(.*)>\?\$/i", value) \
        if isinstance(value, str) else None
    return re.sub(r"\\(.)", r"\1", found.group(1)) if found else value


def _word_pattern(phrase: str) -> str:
    """A subject phrase as a whole-word regex: '/\\breceipt\\b/i' (a plain "receipt"
    would also find "receipts", and "for" would find "information")."""
    return "/\\b" + r"\s+".join(re.escape(word) for word in phrase.split()) + "\\b/i"


def _condition_of(features: Sequence[tuple]) -> Dict[str, Any]:
    """A rule's condition keys for its chosen features: one key per kind (a list when
    several), pairs as `{ from = "@domain", subject = "word" }` tables, and `any = [...]`
    around them when there is more than one kind."""
    by_kind: Dict[str, List[str]] = {}
    tables: List[Dict[str, Any]] = []
    for feature in features:
        kind = feature[0]
        if kind == "pair":
            tables.append({"from": _whole_pattern(feature[1], ""),
                           "subject": _word_pattern(feature[2])})
        elif kind == "header":
            tables.append({"header": {feature[1]: True}})
        elif kind == "subject":
            by_kind.setdefault(kind, []).append(_word_pattern(feature[1]))
        else:       # from, recipient, list_id: the whole value; a domain: its end
            key = "from" if kind == "domain" else kind
            by_kind.setdefault(key, []).append(
                _whole_pattern(feature[1], "" if kind == "domain" else "(^|<)"))
    parts = [{key: _one_or_list(values)} for key, values in by_kind.items()] + tables
    return parts[0] if len(parts) == 1 else {"any": parts}


@dataclass(frozen=True)
class LearnedRules:
    """What learn_rules made: ``doc`` and ``comments`` for format_rules, ``header`` lines
    for the top of the file, and ``report``: one line per label for standard error."""

    doc: Dict[str, Any]
    comments: Tuple[Tuple[str, ...], ...]
    header: Tuple[str, ...]
    report: Tuple[str, ...]
    learned: Tuple[str, ...]                # labels with a rule
    unlearnable: Dict[str, str]             # label -> why not


class LearnError(GmailClassifyError):
    """learn was given nothing to learn from, or a --holdout it cannot read."""
    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class _LearnedLabel:
    """One label's accepted rule: its condition keys, held-out figures and examples."""

    label: str
    name: str                   # the rule's name (the label; the archive folder's name)
    condition: Dict[str, Any]
    precision: float
    right: Tuple[int, ...]      # held-out messages it rightly found
    figures: str


def _holdout_start(messages: List[FiledMessage], holdout: str) -> int:
    """Index of the first held-out message: the newest N % (``"20%"``) or those of the
    last N days, weeks, months, years (``"30d"``) before the newest message."""
    text = holdout.strip().lower()
    share = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
    if share:
        fraction = float(share.group(1)) / 100
        if not 0 < fraction < 1:
            raise LearnError(f"--holdout {holdout}: a share between 1% and 99%, e.g. 20%")
        return len(messages) - max(1, round(len(messages) * fraction))
    age = _AGE_RE.fullmatch(text)
    if age is None:
        raise LearnError(f"--holdout {holdout}: give a share (20%) or an age (30d, 8w, 3m, 1y)")
    newest = messages[-1].date if messages else datetime.now(timezone.utc)
    cutoff = _cutoff(newest, int(age.group(1)), age.group(2))
    return next((i for i, m in enumerate(messages) if m.date > cutoff), len(messages))


class _Learner:
    """learn_rules' working state: the examples split in two, each message's features and
    an index from feature to the messages that have it."""

    def __init__(self, filed: FiledMail, start: int, min_precision: float,
                 min_support: int) -> None:
        self.filed, self.start = filed, start
        self.min_precision, self.min_support = min_precision, min_support
        self.messages = filed.messages
        self.features = [_learn_features(m.info) for m in self.messages]
        self.index: Dict[tuple, List[int]] = {}
        self.by_label: Optional[Dict[str, List[tuple]]] = None    # label -> precise features
        for number, features in enumerate(self.features):
            for feature in features:
                self.index.setdefault(feature, []).append(number)

    def split(self, numbers: List[int]) -> Tuple[List[int], List[int]]:
        cut = bisect.bisect_left(numbers, self.start)
        return numbers[:cut], numbers[cut:]

    def candidates(self, label: str) -> List[Tuple[tuple, set]]:
        """(feature, older messages of ``label`` it finds) for the features precise enough
        on the older part and not contradicted by the newer one (a sender who moved)."""
        if self.by_label is None:
            self.by_label = {}
            for feature, numbers in self.index.items():
                older, newer = self.split(numbers)
                if len(older) < self.min_support:
                    continue
                seen = collections.Counter(name for n in older
                                           for name in self.messages[n].labels)
                for name, hits in seen.items():
                    if hits >= self.min_support and hits >= (self.min_precision
                                                             - _LEARN_SLACK) * len(older):
                        self.by_label.setdefault(name, []).append(feature)
        found = []
        for feature in self.by_label.get(label, ()):
            older, newer = self.split(self.index[feature])
            newer_hits = sum(1 for n in newer if label in self.messages[n].labels)
            if len(newer) >= 3 and newer_hits < _LEARN_MOVED * len(newer):
                continue        # most of its newer mail went elsewhere: the sender moved
            found.append((feature, {n for n in older if label in self.messages[n].labels}))
        found.sort(key=lambda item: (_KIND_ORDER[item[0][0]], item[0]))
        return found

    def choose(self, label: str) -> List[tuple]:
        """Greedy cover of the older messages of ``label``: each pick finds the most not
        yet found (ties: the plainer kind of condition, then by name)."""
        candidates = self.candidates(label)
        covered: set = set()
        chosen: List[tuple] = []
        while candidates and len(chosen) < _LEARN_MAX_PARTS:
            best = max(candidates, key=lambda item: (len(item[1] - covered),
                                                     -_KIND_ORDER[item[0][0]]))
            if len(best[1] - covered) < 2:     # it would find fewer than two more
                break
            chosen.append(best[0])
            covered |= best[1]
            candidates.remove(best)
        return sorted(chosen, key=lambda f: (_KIND_ORDER[f[0]], f))

    def evaluate(self, label: str, features: List[tuple], now: datetime
                 ) -> Tuple[Dict[str, Any], List[int], List[int], Tuple[int, ...]]:
        """The condition keys for ``features``, the messages (all of them) the rule engine
        finds with them, those of them held out, and those held out filed under ``label``."""
        condition = _condition_of(features)
        rule = parse_rules({"rule": [dict(name="learned", label="x", **condition)]},
                           self.filed.source).rules[0]
        test = rule.condition.evaluate
        every = [n for n, message in enumerate(self.messages) if test(message.info, now)[0]]
        hits = [n for n in every if n >= self.start]
        return condition, every, hits, tuple(n for n in hits
                                             if label in self.messages[n].labels)

    def judge(self, label: str, count: int, now: datetime
              ) -> Union[str, Tuple[_LearnedLabel, str]]:
        """The label's rule and its report line, or why it has none."""
        messages, held = self.messages, range(self.start, len(self.messages))
        wanted = sum(1 for n in held if label in messages[n].labels)
        if count - wanted < 2 * self.min_support or wanted < self.min_support:
            return f"too few examples ({count}, {wanted} of them among the newest)"
        features = self.choose(label)
        if not features:
            return ("no distinctive header: no sender, list, recipient or subject words "
                    "mostly its own")
        condition, every, hits, right = self.evaluate(label, features, now)
        if len(right) < self.min_precision * len(hits):
            # Parts wrong on the newer mail (a sender who moved, a word that stopped being
            # the label's) are dropped once; the rest is judged again.
            kept = [f for f in features if all(label in messages[n].labels
                                               for n in self.split(self.index[f])[1])]
            if kept and len(kept) < len(features):
                features = kept
                condition, every, hits, right = self.evaluate(label, features, now)
        if len(hits) < self.min_support:
            return (f"too few of the newest messages to judge its rule ({len(hits)} found, "
                    f"need {self.min_support})")
        precision = len(right) / len(hits)
        shown = f"{len(right)} of {len(hits)} right"
        if precision < self.min_precision:
            return (f"no distinctive header: the best rule was {shown} on the newest mail "
                    f"({precision:.1%})")
        all_right = sum(1 for n in every if label in messages[n].labels)
        lower = _wilson_lower(all_right, len(every))
        if lower < LEARN_MIN_WILSON:
            return (f"too few examples to trust its rule: {all_right} of {len(every)} right "
                    f"in all, a lower bound of {lower:.2f}")
        name = (self.filed.archive_folder or "Archive") if label == "\\Archive" else label
        figures = (f"held out: {shown} ({precision:.1%}); finds {len(right)} of {wanted} "
                   f"{json.dumps(name, ensure_ascii=False)}")
        line = (f"{name}: finds {len(right)} of {wanted} held-out messages "
                f"({len(right) / wanted:.0%}), {len(hits) - len(right)} false positive(s)")
        return _LearnedLabel(label, name, condition, precision, right, figures), line


def learn_rules(filed: FiledMail, *, min_precision: float = 0.97, min_support: int = 5,
                holdout: str = "20%", max_rules: int = 50, keep_examples: bool = False,
                now: Optional[datetime] = None) -> LearnedRules:
    """Propose one rule per label from how ``filed`` is filed, judged on the newest mail.

    The examples are split by date (``holdout``: the newest 20 %, or e.g. "30d"); each
    label's rule is a greedy cover of its older messages by conditions precise there
    (sender, domain, List-Id, recipient, subject words, domain + word, List-Unsubscribe),
    then judged, through the rule engine, on the held-out part: it is kept when it files
    at least ``min_support`` of them, ``min_precision`` of those rightly, and when the
    Wilson 95 % lower bound of its precision over all the mail it files (older and newer)
    is at least LEARN_MIN_WILSON (5 of 5 is not evidence).  Its actions are then
    fitted on all the mail (archive, star; off Gmail move or label).  At most ``max_rules``
    rules, those finding most first.  Deterministic.  Raises LearnError for a bad
    ``holdout`` or no examples.
    """
    messages = filed.messages
    if not messages:
        raise LearnError(f"{filed.source}: no messages to learn from")
    now = now or datetime.now(timezone.utc)
    start = _holdout_start(messages, holdout)
    learner = _Learner(filed, start, min_precision, min_support)
    counts = collections.Counter(label for message in messages for label in message.labels)
    made: List[_LearnedLabel] = []
    found: Dict[str, str] = {}
    unlearnable: Dict[str, str] = {}
    for label in sorted(counts, key=lambda name: (-counts[name], name)):
        result = learner.judge(label, counts[label], now)
        if isinstance(result, str):
            unlearnable[label] = result
        else:
            made.append(result[0])
            found[label] = result[1]
    for message in messages:       # decoded once for every label's rule (see evaluate)
        _drop_header_cache(message.info.headers)
    made.sort(key=lambda item: (-len(item.right), item.label))
    for item in made[max_rules:]:
        unlearnable[item.label] = f"beyond --max-rules {max_rules}"
        del found[item.label]
    made = made[:max_rules]
    rules, comments = _learned_rule_tables(filed, made)
    doc: Dict[str, Any] = {"rule": rules}
    tests = _learned_tests(filed, rules, made, keep_examples, now)
    if tests:
        doc["test"] = tests
    report = [found[label] for label in sorted(found)]
    report += [f"{label}: not learnable ({why})" for label, why in sorted(unlearnable.items())]
    header = _learned_header(filed, start, len(made), unlearnable, min_precision, min_support)
    return LearnedRules(doc, tuple(comments), tuple(header), tuple(report),
                        tuple(sorted(item.label for item in made)),
                        dict(sorted(unlearnable.items())))


def _learned_actions(filed: FiledMail, label: str) -> Tuple[Dict[str, Any], bool]:
    """A label's actions fitted on all its examples, and whether they move the message
    (off Gmail: out of INBOX into one folder, after which no other rule should act)."""
    mine = [m for m in filed.messages if label in m.labels]
    share = _LEARN_ACTION_SHARE * len(mine)
    if not filed.gmail:
        if label == "\\Archive":
            return {"archive": True}, True
        alone = sum(1 for m in mine if m.places <= {label})
        return ({"move": label}, True) if alone >= share else ({"label": label}, False)
    actions: Dict[str, Any] = {"label": label}
    if sum(1 for m in mine if m.archived) >= share:
        actions["archive"] = True
    if sum(1 for m in mine if m.starred) >= share:
        actions["star"] = True
    return actions, False   # on Gmail archiving keeps every label: every rule continues


def _learned_rule_tables(filed: FiledMail, made: List[_LearnedLabel]
                         ) -> Tuple[List[Dict[str, Any]], List[Tuple[str, ...]]]:
    """The rules in evaluation order: those that only label first (continue = true), then
    those that move or archive, most precise first (the first destination wins)."""
    entries = []
    for item in made:
        actions, moves = _learned_actions(filed, item.label)
        rule = {"name": item.name, **item.condition, **actions}
        if not moves:
            rule["continue"] = True
        entries.append(((moves, -item.precision, -len(item.right), item.name), rule,
                        (item.figures,)))
    entries.sort(key=lambda entry: entry[0])
    return [entry[1] for entry in entries], [entry[2] for entry in entries]


def _learned_tests(filed: FiledMail, rules: List[Dict[str, Any]], made: List[_LearnedLabel],
                   keep_examples: bool, now: datetime) -> List[Dict[str, Any]]:
    """One [[test]] per rule, from a held-out message it rightly found: only the headers the
    rules read, local parts and subjects replaced unless ``keep_examples``; kept only when
    the whole file gives it the rule it stands for (expect_rules says every rule matching)."""
    if not rules:
        return []
    ruleset = parse_rules({"rule": rules}, filed.source)
    by_name = {item.name: item for item in made}
    tests = []
    for rule in rules:
        named = _learn_chosen(rule)
        for number in by_name[rule["name"]].right[:5]:
            table = _test_table(filed.messages[number].info, named, keep_examples)
            message = _test_message(_Where(filed.source, 0, kind="test"), table, filed.source)
            decision = ruleset.classify(message, final=True, now=now)
            names = [name for name, _reason in decision.matches]
            if rule["name"] in names:
                tests.append({"name": f"{rule['name']}: a held-out example", **table,
                              "expect_rules": names})
                break
    return tests


def _learn_chosen(rule: Dict[str, Any]) -> Dict[str, set]:
    """What a learned rule names, per key: addresses and domains, list ids, recipients,
    subject words, headers."""
    parts = rule["any"] if "any" in rule else [rule]
    named: Dict[str, set] = {"from": set(), "list_id": set(), "recipient": set(),
                             "subject": set(), "header": set()}
    for part in parts:
        for key in named:
            value = part.get(key)
            values = [] if value is None else value if isinstance(value, list) else [value]
            for item in values:
                named[key].update(item if isinstance(item, dict) else [_whole_text(item)])
    return named


def _test_table(info: MessageInfo, named: Dict[str, set], keep: bool) -> Dict[str, Any]:
    """A [[test]] message of the headers a learned rule reads (see _learned_tests)."""
    headers = info.headers
    table: Dict[str, Any] = {}
    senders = _header_mailboxes(headers, "from")
    if senders and senders[0][1]:
        address = senders[0][1]
        table["from"] = address if keep or address.lower() in named["from"] else \
            "someone@" + address.rpartition("@")[2]
    recipients = [a for name in ("to", "cc", "delivered-to")
                  for _d, a in _header_mailboxes(headers, name) if a]
    shown = [a for a in recipients if keep or a.lower() in named["recipient"]]
    if shown:
        table["to"] = shown[0]
    subject = _first(header_text(headers, "subject"))
    if keep:
        table["subject"] = subject
    else:
        folded = _normalise(subject)
        words = [w for w in sorted(named["subject"], key=lambda w: (-len(w), w)) if w in folded]
        table["subject"] = f"{words[0]} (example)" if words else "(subject)"
    list_id = _plain_list_id(headers)
    if list_id and (keep or list_id in named["list_id"]):
        table["list_id"] = f"<{list_id}>"
    if _header_present(headers, "list-unsubscribe") and named["header"]:
        table["headers"] = {"List-Unsubscribe": "<mailto:unsubscribe@example.invalid>"}
    _drop_header_cache(headers)
    return table


def _learned_header(filed: FiledMail, start: int, rules: int, unlearnable: Dict[str, str],
                    min_precision: float, min_support: int) -> List[str]:
    total = len(filed.messages)
    lines = [f"Learned by gmail_classify {__version__} from {total} messages of "
             f"{filed.source}: {rules} rule(s).",
             f"Learned on the older {start} messages, judged on the newest {total - start} "
             f"(never seen while learning):",
             f"each rule files at least {min_support} of them, {min_precision:.0%} rightly, "
             f"and over all the mail it files its precision has a Wilson 95 % lower bound "
             f"of at least {LEARN_MIN_WILSON}.",
             "The [[test]] tables are held-out examples (addresses and subjects replaced): "
             "`check` runs them."]
    if unlearnable:
        lines.append("Not learnable: " + ", ".join(sorted(unlearnable)) + " (see the "
                     "report on standard error).")
    if filed.trash_count:
        lines.append(f"Trash holds {filed.trash_count} message(s); learn never writes a "
                     f"trash rule (Trash holds mistakes, and empties itself).")
    lines.append("Next: check this file, compare it with your rules (diff), do a dry run, "
                 "then --apply.")
    return lines


def _filed_from_headers(raw: bytes, date: Optional[datetime]
                        ) -> Tuple[str, MessageInfo, datetime]:
    """A header block as (its _message_key, a MessageInfo, its date: ``date``, else the
    Date header, else 1970)."""
    info = MessageInfo(headers=parse_headers(raw))
    when = date or _header_date(info.headers) or datetime(1970, 1, 1, tzinfo=timezone.utc)
    return _message_key(info.headers), info, when


def _add_filed(found: Dict[str, FiledMessage], values: Mapping[str, Any], item: str,
               label: Optional[str], gmail: bool) -> None:
    """One fetched message into ``found`` (by Message-ID): where it is filed, and whether
    it is starred and (on Gmail) archived."""
    key, info, when = _filed_from_headers(values.get(item) or b"", values.get("INTERNALDATE"))
    flags = frozenset(values.get("FLAGS") or ())
    entry = found.setdefault(key, FiledMessage(key, when, info))
    entry.starred = entry.starred or any(f.lower() == "\\flagged" for f in flags)
    if gmail:
        labels = set(values.get("X-GM-LABELS") or ())
        entry.archived = not any(_label_key(x) == "inbox" for x in labels)
        entry.labels |= {x for x in labels if not x.startswith("\\") and not x.startswith("[")}
    else:
        entry.places.add(label or "INBOX")
        if label:
            entry.labels.add(label)


def read_filed_mail(conn: GmailConnection, *, folders: Sequence[str] = (),
                    exclude: Sequence[str] = (), limit: Optional[int] = DEFAULT_LEARN_LIMIT,
                    since: Optional[_dt.date] = None, batch_size: int = DEFAULT_BATCH,
                    on_progress: Optional[Callable[[str, int, int], None]] = None) -> FiledMail:
    """How the mail on the server is filed, read-only (EXAMINE, BODY.PEEK, headers only).

    Gmail: All Mail's newest ``limit`` messages with their user labels (X-GM-LABELS),
    archived (no \\Inbox) and starred.  Elsewhere: the folders of the personal namespace
    (only ``folders`` when given) except Sent, Drafts, Junk, All, Trash and ``exclude``;
    INBOX is "left alone", a message in several folders (by Message-ID) one example.
    Trash is only counted.  Raises what the connection raises.
    """
    item = f"BODY.PEEK[HEADER.FIELDS ({' '.join(LEARN_HEADERS)})]"
    items = ["FLAGS", "INTERNALDATE", item] + (["X-GM-LABELS"] if conn.is_gmail else [])
    found: Dict[str, FiledMessage] = {}

    def read(folder: Folder, label: Optional[str]) -> None:
        conn.examine(folder.name)
        uids = conn.search(["SINCE", since] if since else ["ALL"])
        uids = uids[-limit:] if limit else uids
        batches = [uids[i:i + batch_size] for i in range(0, len(uids), batch_size)]
        done = 0
        for batch, fetched in conn.fetch_batches(
                batches, items, before_each=lambda c: c.stop.check("before the next FETCH")):
            for uid in batch:
                values = fetched.get(uid)
                if values and not _lacking(items, values):
                    _add_filed(found, values, item, label, conn.is_gmail)
            done += len(batch)
            if on_progress is not None:
                on_progress(f"{folder.name}: read", done, len(uids))

    trash = conn.special_folder("\\Trash")
    archive_name = None
    if conn.is_gmail:
        every = conn.special_folder("\\All")
        if every is None:
            raise CapabilityError(f"{conn.host} lists no folder marked \\All (All Mail); "
                                  f"learn needs it on Gmail")
        read(every, None)
    else:
        prefix, delimiter = conn.namespace()
        skip = {"\\sent", "\\drafts", "\\junk", "\\all", "\\trash", "\\flagged", "\\important"}
        archive = conn.special_folder("\\Archive")
        chosen = {conn.server_name(f) for f in folders}
        left_out = {conn.server_name(f) for f in exclude}
        for folder in sorted(conn.list_folders(), key=lambda f: f.name):
            name = folder.name
            if not folder.selectable or name in left_out:
                continue
            if chosen and name not in chosen and name.upper() != "INBOX":
                continue
            if (folder.special_use or "").lower() in skip or (
                    trash is not None and name == trash.name):
                continue
            if name.upper() != "INBOX" and prefix and not name.startswith(prefix):
                continue        # outside the personal namespace: shared or other users'
            short = name[len(prefix):] if prefix and name.startswith(prefix) else name
            short = short.replace(delimiter, "/") if delimiter and delimiter != "/" else short
            is_archive = archive is not None and name == archive.name
            if is_archive:
                archive_name = short
            read(folder, None if name.upper() == "INBOX" else
                 "\\Archive" if is_archive else short)
    count = 0
    if trash is not None:
        with contextlib.suppress(ImapError):
            count = conn.status(trash.name).get("MESSAGES", 0)
    messages = sorted(found.values(), key=lambda m: (m.date, m.key))
    if limit and len(messages) > limit:
        messages = messages[-limit:]
    return FiledMail(messages, conn.is_gmail, conn.user, archive_name, count)


def _stream_header_blocks(path: str) -> Iterator[bytes]:
    """The header block of each message of an mbox file, read line by line: the body is skipped, a header block is cut at MAX_HEADER_LITERAL
    like a header fetched over the wire, so a file of many GB costs one message's headers
    of memory."""
    with open(path, "rb") as fh:
        block: Optional[List[bytes]] = None
        size = 0
        in_headers = False
        for line in fh:
            if line.startswith(b"From "):
                if block is not None:
                    yield b"".join(block)
                block, size, in_headers = [], 0, True
                continue
            if block is None or not in_headers:
                continue
            if line in (b"\n", b"\r\n"):
                in_headers = False
                continue
            if size + len(line) <= MAX_HEADER_LITERAL:
                block.append(line.rstrip(b"\r\n") + b"\r\n")
                size += len(line)
        if block is not None:
            yield b"".join(block)


def _read_header_file(path: str) -> bytes:
    """The header block of one message file, at most MAX_HEADER_LITERAL of it; the file
    must be a regular one (see read_message_file)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    data = b""
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        while len(data) < MAX_HEADER_LITERAL:     # the body is never read
            chunk = fh.read(min(65536, MAX_HEADER_LITERAL - len(data)))
            data += chunk
            end = re.search(rb"\r?\n\r?\n", data)
            if end:
                return data[:end.start()] + b"\r\n"
            if not chunk:
                break
    return data


def _maildir_folders(root: str) -> List[Tuple[str, Optional[str]]]:
    """(path, label) of each Maildir under ``root``: the root itself is INBOX (None);
    Maildir++ ".Receipts.2024" is "Receipts/2024"; a nested Receipts/2024 the same."""
    found: List[Tuple[str, Optional[str]]] = []
    for here, dirs, _files in os.walk(root):
        dirs.sort()
        if not (os.path.isdir(os.path.join(here, "cur")) or os.path.isdir(os.path.join(here, "new"))):
            continue
        relative = os.path.relpath(here, root)
        if relative == ".":
            found.append((here, None))
            continue
        parts = relative.split(os.sep)
        maildir_plus = len(parts) == 1 and parts[0].startswith(".")    # ".Receipts.2024"
        found.append((here, parts[0][1:].replace(".", "/") if maildir_plus else "/".join(parts)))
        dirs[:] = [d for d in dirs if d not in ("cur", "new", "tmp")]
    return found


_NOT_TARGETS = {"inbox", "sent", "drafts", "draft", "junk", "spam", "trash", "deleted items",
                "sent items", "sent mail", "all mail", "deleted messages", "archive",
                "archives"}


def _read_maildir_tree(folders: Sequence[Tuple[str, Optional[str]]],
                       add: Callable[[bytes, Optional[str], str], None]
                       ) -> Tuple[Optional[str], int]:
    """Each message of a Maildir tree's ``folders`` ((path, label) pairs) to ``add``, header
    only; returns the archive folder's name, if any, and how many messages Trash holds."""
    archive_name, trash = None, 0
    for folder, label in folders:
        key = (label or "").casefold()
        if key in ("trash", "deleted items", "deleted messages"):
            trash += sum(len(os.listdir(os.path.join(folder, sub))) for sub in ("cur", "new")
                         if os.path.isdir(os.path.join(folder, sub)))
            continue
        if key in _NOT_TARGETS - {"inbox", "archive", "archives"}:
            continue
        if key in ("archive", "archives"):
            archive_name = label
            label = "\\Archive"
        for _name, file_path in _maildir_files(folder):
            with contextlib.suppress(ValueError):       # not a regular file: passed over
                add(_read_header_file(file_path), label, label or "INBOX")
    return archive_name, trash


def read_filed_path(path: Any, *, limit: Optional[int] = DEFAULT_LEARN_LIMIT,
                    since: Optional[_dt.date] = None) -> FiledMail:
    """How mail in files is filed, offline: a Maildir tree (each folder a label), an mbox
    (one label per file, named after it; a directory of them), or a Google Takeout mbox
    (each message's X-Gmail-Labels).  Headers only, streamed.  Raises LearnError for a
    path that is none of these."""
    path = os.fspath(path)
    found: Dict[str, FiledMessage] = {}
    gmail = False
    archive_name = None
    trash = 0

    def add(raw: bytes, label: Optional[str], place: str) -> None:
        nonlocal gmail, trash
        key, info, when = _filed_from_headers(raw, None)
        if since is not None and when.date() < since:
            return
        takeout = header_text(info.headers, "x-gmail-labels")
        entry = found.setdefault(key, FiledMessage(key, when, info))
        if takeout:
            gmail = True
            names = _split_takeout_labels(",".join(takeout))
            folded = {n.casefold() for n in names}
            if "trash" in folded or "spam" in folded:
                trash += "trash" in folded
                del found[key]
                return
            entry.archived = "inbox" not in folded
            entry.starred = entry.starred or "starred" in folded
            entry.labels |= {n for n in names if n.casefold() not in _TAKEOUT_NOT_TARGETS
                             and not n.casefold().startswith("category")}
            return
        entry.places.add(place)
        if label:
            entry.labels.add(label)

    try:
        files: List[str] = []       # mbox files, one label each (named after it)
        if os.path.isdir(path):
            folders = _maildir_folders(path)
            if folders:
                archive_name, trash = _read_maildir_tree(folders, add)
            else:
                files = sorted(os.path.join(path, n) for n in os.listdir(path)
                               if n.lower().endswith(".mbox"))
                if not files:
                    raise LearnError(f"{path}: neither a Maildir tree nor a folder of .mbox files")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise LearnError(f"{path}: no such file or directory")
        for file_path in files:
            label = os.path.splitext(os.path.basename(file_path))[0]
            label = None if label.casefold() in _NOT_TARGETS else label
            for raw in _stream_header_blocks(file_path):
                add(raw, label, label or "INBOX")
    except OSError as exc:
        raise LearnError(f"{path}: cannot read: {exc.strerror or exc}") from None
    messages = sorted(found.values(), key=lambda m: (m.date, m.key))
    if limit and len(messages) > limit:
        messages = messages[-limit:]
    return FiledMail(messages, gmail, os.path.basename(os.path.normpath(path)) or path,
                     archive_name, trash)


# --- Command line ------------------------------------------------------------------------
#
# A thin layer over the library: parse arguments, find the rules and the password, call
# classify_folder, print.  Every failure a user can cause ends in one line on stderr and a
# documented exit code; -v adds the traceback.

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  unexpected error (run again with -v and report it)
  2  bad usage, an invalid rules file, or an unusable state file
  3  authentication failed (wrong password, app password needed, bad token;
     an OAuth2 sign-in refused or revoked: run auth again)
  4  connection failed, or was lost and could not be restored; TLS refused
  5  the server refused an operation or lacks a feature the rules need, or sent
     something that is not IMAP
  6  incomplete: stopped at the daily download budget, or some messages or folders
     were skipped (UIDVALIDITY changed mid-run, an oversized answer); run again
  7  another --apply holds the lock for this account
  8  the rules file's own tests ([[test]] tables) failed
  129 stopped by SIGHUP (the terminal closed) at a safe point: stderr says how
      many changes were made and how many not; run again to finish
  130 stopped by SIGINT (Ctrl-C), the same way; a second Ctrl-C stops at once
  141 data output (--json, rules or the sign-in address on standard output) was
      cut short by a closed pipe; the work itself was done
  143 stopped by SIGTERM (kill, systemctl stop, shutdown), the same way
  a watch stopped by SIGINT or SIGTERM exits 0; a signal that comes once every
  change is made (during the report or sign-out) leaves the usual code
  several [[account]]s: the most serious of their codes, in the order
  130/143/129, 1, 2, 3, 4, 5, 8, 6, 7, 0
"""

PASSWORD_ENV = "GMAIL_APP_PASSWORD"
TOKEN_ENV = "GMAIL_OAUTH_TOKEN"
USER_ENV = "GMAIL_USER"
# Generic names that other IMAP tools use; the GMAIL_* name wins when both are set.
USER_ENV_ALIAS = "IMAP_USER"
PASSWORD_ENV_ALIAS = "IMAP_PASSWORD"

QUICK_HELP = """\
common use (every option of a run: gmail_classify.py run --help):
  gmail_classify.py demo                          watch the rules work on sample mail, offline
  gmail_classify.py --user you@gmail.com          dry run on INBOX: shows, changes nothing
  gmail_classify.py --user you@gmail.com --apply  make the changes
  run options: --folder NAME (repeatable)  --rules FILE  --since 7d|YYYY-MM-DD  --limit N
               --summary (totals only)  --json  --apply  --all  --new-only  -v / -vv / -q
  gmail_classify.py history                       what each --apply did
  gmail_classify.py undo [RUN_ID] [--apply]       take one back (the last by default)
  the password comes from $GMAIL_APP_PASSWORD (or $IMAP_PASSWORD), ~/.netrc,
  --password-command, or a prompt; never from the command line

"""


class UsageError(GmailClassifyError):
    """A command-line mistake; the message says what to do instead."""
    exit_code = EXIT_USAGE


def find_rules(path: Optional[str]) -> Ruleset:
    """Load ``path``; else the default rules file if there is one; else the built-in rules."""
    if path:
        return load_rules(path)
    for name in ("rules.toml", "rules.json"):
        candidate = default_rules_dir() / name
        if candidate.exists():
            return load_rules(str(candidate))
    return builtin_rules()


def _parse_since(text: str) -> _dt.date:
    """``2024-01-31``, or an age in the rules' units: ``7d``, ``2w``, ``6m``, ``1y`` back from today."""
    age = _AGE_RE.fullmatch(text.strip())
    if age:
        now = datetime.now(timezone.utc).astimezone()
        return _cutoff(now, int(age.group(1)), age.group(2)).date()
    when = _parse_iso_date(text)
    if when is None:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD or an age such as 7d, "
                                         f"2w, 6m or 1y, got {text!r}")
    return when.date()


def _number(text: str, kind: Callable[[str], Any], low: float, high: float,
            expected: str) -> Any:
    """``kind(text)`` if it lies strictly between ``low`` and ``high``, else an
    ArgumentTypeError saying what was ``expected``."""
    try:
        value = kind(text)
    except ValueError:
        value = low
    if not low < value < high:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive(text: str) -> int:
    return _number(text, int, 0, float("inf"), "a positive whole number")


def _timeout_seconds(text: str) -> float:
    return _number(text, float, 0, float("inf"), "a number of seconds above 0")


def _port_number(text: str) -> int:
    return _number(text, int, 0, 65536, "a port from 1 to 65535")


def _folder_name(text: str) -> str:
    if _UNSAFE_FOR_TERMINAL.search(text) or not text.strip():
        raise argparse.ArgumentTypeError(f"{printable(repr(text))} is not a folder name: it is "
                                         f"empty or holds control characters")
    return text


def _budget(text: str) -> int:
    size = _size_bytes(text.strip())
    if size is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 2G, 500M or 0 (no budget), "
                                         f"got {text!r}")
    return size


def _any_port(text: str) -> int:
    """A loopback port to listen on, or 0 for any free one."""
    return 0 if text.strip() == "0" else _port_number(text)


class _Opt:
    """A subcommand's option or argument, as add_argument takes it; one named in
    _SHARED_OPTIONS starts from its definition there (a row may give its own help)."""

    def __init__(self, *flags: str, **settings: Any) -> None:
        self.flags, self.settings = flags, settings


_EXPUNGE_RISK = ("with a plain EXPUNGE (only while no other message in the folder is marked "
                 "\\Deleted); see the README for the risk")

# Options several subcommands take, defined once (the rows in _COMMANDS name them).
_SHARED_OPTIONS: Dict[str, Dict[str, Any]] = {
    "--apply": dict(action="store_true", help="make the changes (default: only show them)"),
    "--json": dict(action="store_true", help="one JSON object per message, then a summary "
                   "object"),
    "--batch-size": dict(type=_positive, default=DEFAULT_BATCH,
                         help="messages per FETCH (default: %(default)s)"),
    "--allow-expunge": dict(action="store_true", help="on servers with neither MOVE nor "
                            "UIDPLUS, let moves remove the originals " + _EXPUNGE_RISK),
    "--daily-budget": dict(type=_budget, default=DEFAULT_DAILY_BUDGET, metavar="SIZE"),
    "--max-new-folders": dict(type=_positive, default=DEFAULT_MAX_NEW_FOLDERS, metavar="N"),
    "--run-programs": dict(action="store_true", help="run the rules' programs (after the "
                           "trust check); without it they are only listed"),
    "--since": dict(type=_parse_since, help="only mail received since a date (YYYY-MM-DD) "
                    "or an age: 7d, 2w, 6m, 1y"),
    "--jobs": dict(type=_positive, metavar="N", help="rules' programs run at once, across "
                   "messages (default: the number of CPUs)"),
}


def _parent_parsers() -> Dict[str, argparse.ArgumentParser]:
    """The option sets whole groups of subcommands share: ``common`` (every one: -v, -q),
    ``connection`` (the server and the password) and ``output`` (where rules are written)."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's defaults must not undo a -v given before the subcommand.
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more detail (-vv: the IMAP conversation, secrets redacted)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only errors")

    conn = argparse.ArgumentParser(add_help=False)
    group = conn.add_argument_group("connection")
    group.add_argument("--user", help=f"account name (default: ${USER_ENV} or ${USER_ENV_ALIAS}, "
                                      "or the rules' [account])")
    group.add_argument("--host", help=f"IMAP server (default: {GMAIL_HOST})")
    group.add_argument("--port", type=_port_number, help="port (default: 993, or 143 with --starttls)")
    group.add_argument("--starttls", action="store_true", help="port 143 with STARTTLS")
    group.add_argument("--plaintext", action="store_true",
                       help="no TLS at all; only allowed to a loopback address (tests)")
    group.add_argument("--cafile", help="extra CA certificate to trust (PEM)")
    group.add_argument("--auth", choices=("password", "xoauth2"),
                       help=f"password (app password from ${PASSWORD_ENV} or "
                            f"${PASSWORD_ENV_ALIAS}, ~/.netrc, "
                            f"--password-command or a prompt) or xoauth2 (token from "
                            f"--password-command, ${TOKEN_ENV}, or the refresh token "
                            f"stored by 'auth')")
    group.add_argument("--password-command", metavar="CMD",
                       help="command whose first output line is the password or token")
    group.add_argument("--timeout", type=_timeout_seconds, default=DEFAULT_TIMEOUT,
                       help="seconds before a stalled connection is retried (default: %(default)s)")
    group.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                       help="reconnect attempts before giving up (default: %(default)s)")
    group.add_argument("--rules", help="rules file (.toml or .json); default: "
                       "$XDG_CONFIG_HOME/gmail_classify/rules.toml or .json, else built-in rules")
    group.add_argument("--account", action="append", metavar="NAME",
                       help="only the [[account]] of this name in the rules file (repeatable; "
                            "default: every account, one after another)")

    writer = argparse.ArgumentParser(add_help=False)
    group = writer.add_argument_group("output")
    group.add_argument("-o", "--output", metavar="RULES", help="write the rules file here "
                       "(.toml or .json; default: TOML on standard output)")
    group.add_argument("--force", action="store_true", help="overwrite an existing RULES file")
    group.add_argument("--format", choices=("toml", "json"), help="file format (default: "
                       "from the -o file name, else toml)")
    return {"common": common, "connection": conn, "output": writer}


@dataclass(frozen=True)
class _Command:
    """A subcommand: its function, --help line, option sets besides ``common`` (see
    _parent_parsers), own options, whether its --help ends with the exit codes, whether its
    output is data (see _Output) and whether its work goes on when nobody reads the output
    any more (``keep_going``; an --apply always does)."""

    run: Callable[[argparse.Namespace, Any], int]
    help: str
    parents: Tuple[str, ...] = ()
    options: Tuple[Any, ...] = ()
    exit_codes: bool = False
    data: bool = False
    keep_going: bool = False


class _PrintableFormatter(logging.Formatter):
    """Log lines quote servers and messages: pass them through printable()."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep_newlines=True)


@contextlib.contextmanager
def _signed_in(settings: Mapping[str, Any]) -> Iterator[GmailConnection]:
    """A connection for one command.  Ctrl-C while signing out, after the work is done,
    does not turn a finished run into an interrupted one."""
    conn = GmailConnection(**settings)
    conn.connect()
    try:
        yield conn
    except BaseException:
        conn.close()
        raise
    try:
        conn.close()
    except KeyboardInterrupt:
        log.info("interrupted while signing out; the work was already done")


@contextlib.contextmanager
def _signed_in_counted(settings: Mapping[str, Any], command: str) -> Iterator[GmailConnection]:
    """_signed_in for a command that reads mail outside a Run (``learn``, ``suggest``,
    ``why``, ``diff``): refused once the account's daily download budget (the default's)
    is used up, and what it downloads counted in the state, as a run's is."""
    account = account_key(settings["user"], settings["host"], settings.get("port"))
    store: Optional[StateStore] = StateStore()
    try:
        store.load()
    except StateError as exc:       # the command reads mail only: it need not stop for it
        _warn(f"{exc}; what this {command} downloads is not counted")
        store = None
    used = store.downloaded(account) if store is not None else 0
    if used >= DEFAULT_DAILY_BUDGET:
        raise BudgetExceededError(
            f"{_human_size(used)} downloaded today for {account}, past the daily budget "
            f"of {_human_size(DEFAULT_DAILY_BUDGET)}; {command} again after 00:00 UTC")
    with _signed_in(settings) as conn:
        try:
            yield conn
        finally:
            if store is not None:
                store.add_download(account, conn.bytes_received)
                _cleanup(store.save)


@dataclass(eq=False)
class _Signals:
    """SIGINT, SIGTERM and SIGHUP for one command, all through one Stop (a context manager).

    Once ``armed`` (the command is about to talk to a server, where ending between two
    commands keeps the record whole) the first signal only asks ``stop`` to stop: the work
    ends at its next safe point and says what was done, and main() returns 128 + the
    signal's number.  Before that (nothing to record yet: a password prompt, say), and on
    a second signal (the user is not waiting any longer), KeyboardInterrupt is raised at
    once.  ``on_stop()`` replaces the first signal's ``stop.request`` (watch: Watcher.stop)
    and ``on_hangup()`` SIGHUP's (watch: reload the rules).  The handlers do no I/O, since a
    signal may arrive anywhere; they are installed only in the main thread (Python allows
    no other) and put back as they were on exit.  Windows has no SIGHUP.

    A signal that would stop the command and was ignored when it started stays ignored:
    ``nohup`` ignores SIGHUP so that a run outlives the terminal, and a shell ignores
    SIGINT in a background job so that Ctrl-C at the prompt does not reach it; each asked
    for the run to go on.  SIGHUP still reloads a watch's rules (``on_hangup``): that
    does not stop it.
    """

    stop: Stop
    armed: bool = False
    on_stop: Optional[Callable[[], Any]] = None
    on_hangup: Optional[Callable[[], Any]] = None
    _previous: Dict[int, Any] = field(default_factory=dict, init=False, repr=False)

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == getattr(signal, "SIGHUP", None) and self.on_hangup is not None:
            self.on_hangup()
            return
        if self.stop.requested or not self.armed:
            self.stop.request(signum)
            raise KeyboardInterrupt
        if self.on_stop is not None:
            self.on_stop()
        self.stop.request(signum)

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            names = ("SIGINT", "SIGTERM", "SIGHUP")
            hangup = getattr(signal, "SIGHUP", None) if self.on_hangup is not None else None
            for signum in [getattr(signal, name) for name in names if hasattr(signal, name)]:
                if signum == hangup or signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        while self._previous:
            signum, handler = self._previous.popitem()
            signal.signal(signum, handler)


def _signal_exit(signum: Optional[int]) -> int:
    """The exit code of a command a signal ended: 128 + its number (130 for Ctrl-C)."""
    return 128 + int(signum or signal.SIGINT)


class _OutputClosed(BaseException):
    """Internal: nobody reads standard output any more, and the command only lists; end it.
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it."""


def _warn(text: str) -> None:
    """One line on standard error, ``gmail_classify: text``, escaped (see printable)."""
    sys.stderr.write(printable(f"gmail_classify: {text}") + "\n")


def _secret_from_command(command: str) -> str:
    try:
        argv = shlex.split(command)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise UsageError(f"--password-command could not run: {exc}") from exc
    if result.returncode != 0:
        raise UsageError(f"--password-command exited with status {result.returncode}; "
                         f"run it by hand to see why")
    line = result.stdout.splitlines()[0] if result.stdout.strip() else ""
    if not line:
        raise UsageError("--password-command printed nothing; it must print the secret")
    return line


# A netrc word, as Python's netrc reads one (curl and ftp alike): a double-quoted string,
# or anything up to the next space, tab or line end (not any Unicode space: a password may
# hold a no-break space); in both a backslash escapes the character after it, and a single
# quote is a character like any other (a password may hold one).
_NETRC_WORD = re.compile(r'"((?:[^"\\]|\\.)*)"|((?:[^ \t\r\n"\\]|\\.?)(?:[^ \t\r\n\\]|\\.?)*)'
                         r'|(")')


def _netrc_entries(text: str) -> List[Tuple[Optional[str], str, str]]:
    """(machine, login, password) per entry of a netrc file, in order; machine None for
    ``default``.  Read here rather than by the netrc module, which keeps one entry per host
    (two logins on one server, one per account, would hide each other).  Lines starting
    with ``#`` are comments; a ``macdef`` runs to the next empty line."""
    words: List[str] = []
    in_macro = False
    for number, line in enumerate(text.splitlines(), 1):
        if in_macro:
            in_macro = bool(line.strip())
            continue
        if line.lstrip().startswith("#"):
            continue
        found = []
        for word in _NETRC_WORD.finditer(line):
            if word.group(3):           # never the line itself: it may hold a password
                raise UsageError(f"~/.netrc, line {number}: a word opened with a double "
                                 f"quote is not closed; close it, or write a \\ before "
                                 f"a quote that belongs to the word")
            if word.group(2) == "#":    # a lone '#' starts a comment; "#" and \# are words
                break
            found.append(re.sub(r"\\(.)", r"\1", word.group(1) if word.group(2) is None
                                else word.group(2)))
        words += found
        if "macdef" in found:
            in_macro = True
    entries: List[List[Any]] = []      # [machine, login, password], the last one current
    pairs = iter(words)
    for word in pairs:
        if word in ("machine", "default"):
            entries.append([next(pairs, "") if word == "machine" else None, "", ""])
        elif word in ("login", "password", "account", "macdef") and entries:
            value = next(pairs, "")
            if word in ("login", "password"):
                entries[-1][1 if word == "login" else 2] = value
    return [(machine, login, password) for machine, login, password in entries]


def _password_from_netrc(host: str, user: str, strict: bool = False) -> Optional[str]:
    """The ~/.netrc password for ``user`` at ``host``: the entry naming both; unless
    ``strict`` (an [[account]]: only that), else one for the host with no login, else a
    ``default`` entry with this login or none."""
    path = os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.exists(path):
        return None
    try:
        problem = trust_problem(path, private=True, directories=False)
        if problem:
            raise UsageError(problem)
        with open(path, encoding="utf-8", errors="replace") as handle:
            entries = _netrc_entries(handle.read())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}; make it a file you "
                         f"can read, or move it away") from exc
    host = host.lower()

    def match(kind: str, machine: Optional[str], login: str) -> bool:
        if kind == "default":
            return machine is None and login in ("", user)
        return machine is not None and machine.lower() == host and \
            (login == user if kind == "both" else not login)

    kinds = ("both",) if strict else ("both", "host", "default")
    return next((password for kind in kinds for machine, login, password in entries
                 if password and match(kind, machine, login)), None)


def _connection_settings(args: argparse.Namespace, account: Mapping[str, Any],
                         name: Optional[str] = None) -> Dict[str, Any]:
    """Combine flags, environment and the rules' [account] table (flags win).

    ``name``: the table is the [[account]] of that name (see _chosen_accounts, which
    allows the flags and unsuffixed variables only with exactly one --account): its secret
    comes from them, its own ``IMAP_PASSWORD_<NAME>`` variables, its password_command, or
    a ~/.netrc entry naming both its host and its user; never another account's."""
    user = (args.user or os.environ.get(USER_ENV) or os.environ.get(USER_ENV_ALIAS)
            or account.get("user"))
    if not user:
        raise UsageError(f"no account given: pass --user you@gmail.com or set {USER_ENV} "
                         f"(or {USER_ENV_ALIAS})")
    host = args.host or account.get("host") or GMAIL_HOST
    security = ("plaintext" if args.plaintext else "starttls" if args.starttls
                else account.get("tls", "implicit"))
    security = {"implicit": "tls"}.get(security, security)
    if security == "plaintext" and not _is_loopback(host):
        raise UsageError(f"--plaintext is only allowed to a loopback address, not {host}; "
                         f"drop it to use TLS")
    auth = args.auth or account.get("auth") or "password"
    # Where the secret comes from, first found wins: --password-command, the environment,
    # the rules file's password_command, ~/.netrc, a prompt on a terminal.
    names = (TOKEN_ENV,) if auth == "xoauth2" else (PASSWORD_ENV, PASSWORD_ENV_ALIAS)
    if name is not None:
        names += tuple(f"{variable}_{account_variable_suffix(name)}" for variable in names)
    env_secret = next((os.environ[v] for v in names if os.environ.get(v)), None)
    command = args.password_command or (None if env_secret else account.get("password_command"))
    if isinstance(command, list):
        command = " ".join(shlex.quote(part) for part in command)
    settings: Dict[str, Any] = dict(user=user, host=host, port=args.port or account.get("port"),
                                    security=security, cafile=args.cafile or account.get("cafile"),
                                    timeout=args.timeout, retries=max(0, args.retries))
    if auth == "xoauth2":
        if command:
            # Access tokens expire within the hour: ask the command again on each reconnect.
            first = [_secret_from_command(command)]
            settings["token"] = lambda: first.pop() if first else _secret_from_command(command)
        elif env_secret:
            settings["token"] = env_secret
        else:
            stored = load_refresh_token(user)
            if stored is None:
                raise UsageError(f"--auth xoauth2 has no token for {user}: run "
                                 f"'gmail_classify.py auth --user {user}' once to sign in, or "
                                 f"give an access token in {TOKEN_ENV} or via --password-command")
            client, refresh_token = stored
            settings["token"] = OAuthTokenSource(client, refresh_token, user=user)
        return _armed(args, settings)
    password = ((_secret_from_command(command) if command else env_secret)
                or _password_from_netrc(host, user, strict=name is not None))
    if not password and sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user} at {host}: ")
    if not password and name is not None:
        suffix = account_variable_suffix(name)
        raise UsageError(f"no password for account {name!r}: set {PASSWORD_ENV_ALIAS}_{suffix} "
                         f"(or {PASSWORD_ENV}_{suffix}), give its [[account]] a "
                         f"password_command, or add 'machine {host} login {user}' to ~/.netrc")
    if not password:
        raise UsageError(f"no password: set {PASSWORD_ENV} (or {PASSWORD_ENV_ALIAS}), add "
                         f"{host} to ~/.netrc, use "
                         f"--password-command, or run in a terminal to be asked")
    settings["password"] = password
    return _armed(args, settings)


def _armed(args: argparse.Namespace, settings: Dict[str, Any]) -> Dict[str, Any]:
    """The settings with the command's Stop for the connection; from now on a signal
    stops at the next safe point instead of at once (see _Signals)."""
    signals = getattr(args, "signals", None)
    if signals is not None:
        settings["stop"] = signals.stop
        signals.armed = True
    return settings


def _rule_tests_allow(rules: Ruleset, apply: bool) -> bool:
    """Run the rules' [[test]] tables before connecting; False when --apply must be refused.

    Each failure is one line on stderr; a dry run goes on after a warning.
    """
    failures = run_rule_tests(rules)
    for line in failures:
        _warn(line)
    if failures and apply:
        _warn(f"refusing --apply: {len(failures)} of {len(rules.tests)} rule tests failed; "
              f"fix the rules or the tests (see 'check {rules.source}')")
        return False
    if failures:
        _warn(f"{len(failures)} of {len(rules.tests)} rule tests failed; this dry run goes on, "
              f"--apply would be refused")
    return True


def _plural(count: int, noun: str) -> str:
    """'1 message', '1,204 messages'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _rules_line(rules: Ruleset) -> str:
    """Which rules are in force: 'Rules: built-in rules (5 rules; ...)' or the file."""
    if rules.source == builtin_rules().source:
        return (f"Rules: built-in rules ({_plural(len(rules.rules), 'rule')}, labels only); "
                f"write your own with: python gmail_classify.py init\n")
    return printable(f"Rules: {rules.source} ({_plural(len(rules.rules), 'rule')})") + "\n"


def _columns(text: str) -> int:
    """Terminal columns `text` takes: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` columns at a word boundary where one is near, with '...'."""
    if _columns(text) <= width:
        return text
    if width < 4:
        return text[:max(0, width)]
    cut, used = [], 0
    for char in text:
        used += _columns(char)
        if used > width - 3:
            break
        cut.append(char)
    shown = "".join(cut)
    if text[len(shown)] not in " ,;:":   # cut inside a word: back up to the word's start
        space = shown.rfind(" ")
        shown = shown[:space] if space > 0 else shown
    return shown.rstrip(" ,;:-") + "..."


def _sender(address: str, width: int) -> str:
    """'Name <user@domain>' when it fits in `width`, else the name, else cut."""
    if _columns(address) <= width:
        return address
    name, addr = email.utils.parseaddr(address)
    return _fit(name or addr, width)


def _message_line(outcome: Outcome, applied: bool, width: Optional[int] = None,
                  account: Optional[str] = None) -> str:
    """One line per matched message; fitted to `width` columns (a terminal) when given;
    ``[account]`` first for an [[account]] watched beside others."""
    rules_text = ", ".join(name for name, _ in outcome.decision.matches)
    verb = "" if applied else "would "
    # What changes (or would): only what the message still needs, once the run knows it.
    what = (", ".join(describe_change(change) for change in outcome.changes)
            if outcome.changes else outcome.decision.actions.describe())
    where = f"[{account}] {outcome.folder}" if account else outcome.folder
    head = printable(f"{where} {outcome.uid}: {verb}{what}  [{rules_text}]")
    subject = printable(" ".join(outcome.subject.split()))
    sender = printable(outcome.sender)
    if width is None:
        return f"{head}  {_sender(sender, 40)}  {_fit(subject, 60)}"
    room = width - _columns(head) - 2
    if room < 10:
        return _fit(head, width)
    if room < 40:   # too narrow for both: the subject says more than the sender
        return f"{head}  {_fit(subject, room)}"
    who = _sender(sender, min(40, room // 3))
    return f"{head}  {who}  {_fit(subject, room - 2 - _columns(who))}"


class _Progress:
    """'INBOX: classified 3,000 of 12,000' redrawn in place on a terminal's stderr, once a
    phase has run for a second; silent when stderr is not a terminal."""

    def __init__(self, stream: TextIO, enabled: bool, clock: Callable[[], float] = time.monotonic,
                 after: float = 1.0, every: float = 0.2) -> None:
        self.stream, self.enabled, self.clock = stream, enabled, clock
        self.after, self.every = after, every
        self.started: Dict[str, float] = {}
        self.drawn = 0.0
        self.shown = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        start = self.started.setdefault(phase, now)
        if done < total and (now - start < self.after or now - self.drawn < self.every):
            return
        if done >= total and not self.shown:
            return   # a phase that ended quickly needs no progress line
        self.drawn, self.shown = now, True
        self.stream.write(f"\r\x1b[K{printable(phase)} {done:,} of {total:,}")
        if done >= total:
            self.stream.write("\n")
            self.shown = False
        self.stream.flush()


class _Output:
    """A command's standard output as its arguments ask (built by _open_output): the one
    place that knows the format (text here; a new format is one subclass, see _JsonOutput,
    and its row in _OUTPUT_FORMATS), -q, the terminal's ``width`` (None if no terminal) and
    printable escaping.  ``human``: a person reads text here (text, not -q); ``data``: a
    program reads it (cut by a closed pipe, the command exits 141).

    It outlives its reader (stderr is wrapped too): when the reader goes away (EPIPE:
    ``| head`` has read enough; EIO: the terminal hung up), nothing more is written.  With ``keep_going`` (an --apply, whose work must
    finish and be recorded) writes are then dropped and the work goes on; without it the
    next write raises _OutputClosed (a listing nobody reads ends early).  ``gone`` says
    whether it happened.  The file descriptor is pointed at /dev/null, so that Python's
    own flush at exit has nowhere to fail ("Exception ignored ... BrokenPipeError").
    """

    data, text = False, True

    def __init__(self, stream: Optional[TextIO], keep_going: bool, *, quiet: bool = False) -> None:
        self._stream = stream
        self.keep_going = keep_going
        self.gone = stream is None            # started without one (``>&-``)
        self.human = self.text and not quiet
        self.width = shutil.get_terminal_size().columns if self.isatty() else None

    def record(self, record: Mapping[str, Any],
               text: Optional[Callable[[], Iterable[str]]] = None) -> None:
        """One result (a message, a run, a summary): as JSON in a JSON output; here, the
        lines ``text()`` gives for a person, if any."""
        for line in text() if text is not None else ():
            self.line(line)

    def line(self, text: str) -> None:
        """One line of text, escaped (see printable)."""
        self.write(printable(text) + "\n")

    def message(self, outcome: Outcome, applied: bool, account: Optional[str] = None) -> None:
        """A message that changes (or would): one line, fitted to the terminal; ``account``
        names it where several accounts' lines mix (a watch of several)."""
        if self.human:
            self.write(_message_line(outcome, applied, self.width, account) + "\n")

    def write(self, text: str) -> int:
        return self._through(lambda stream: stream.write(text), len(text))

    def flush(self) -> None:
        self._through(lambda stream: stream.flush(), None)

    def _through(self, call: Callable[[TextIO], Any], dropped: Any) -> Any:
        """``call(stream)`` while the reader is there; after, ``dropped`` (keep_going)."""
        if not self.gone:
            try:
                return call(self._stream)
            except OSError as exc:
                self._lost(exc)
        if not self.keep_going:
            raise _OutputClosed()
        return dropped

    def isatty(self) -> bool:
        try:
            return not self.gone and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _lost(self, exc: OSError) -> None:
        if exc.errno not in (errno.EPIPE, errno.EIO):
            raise exc
        self.gone = True
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, AttributeError):
            return                          # not a file (a test's StringIO)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


class _JsonOutput(_Output):
    """--json: one JSON object a line (escaped like text: a bidi override or a C1 control
    in a subject reaches a terminal as ``\\u202e``, never raw); nothing for a person."""

    data, text = True, False

    def record(self, record: Mapping[str, Any],
               text: Optional[Callable[[], Iterable[str]]] = None) -> None:
        self.write(printable(json.dumps(record, ensure_ascii=False)) + "\n")


def _cmd_run(args: argparse.Namespace, out: _Output) -> int:
    rules = find_rules(args.rules)
    check_programs_trusted(rules)       # before any program runs, the rules' tests' too
    chosen = _chosen_accounts(args, rules)
    if not rules.accounts:
        return _run_account(args, out, rules)
    if not _rule_tests_allow(rules, args.apply):
        return EXIT_RULE_TESTS
    return _each_account(args, out, chosen, lambda name, account_rules, runs: _run_account(
        args, out, account_rules, name, runs))


def _left_to_do(reports: Sequence[FolderReport]) -> List[str]:
    """What a run left undone, a line per reason and folder: skipped messages, and a plain
    EXPUNGE that did not do what was expected."""
    lines = []
    for report in reports:
        for why, uids in _skipped_by_reason(report).items():
            lines.append(f"{report.folder}: {_plural(len(uids), 'message')} skipped "
                         f"because {why} (UID {compress_uids(uids)}); nothing was done "
                         f"to them; run again")
        if report.expunge_stayed or report.others_expunged:
            lines.append(f"{report.folder}: the plain EXPUNGE did not do what was "
                         f"expected (see the warning above); run again when no other "
                         f"mail client is at work there")
    return lines


def _write_run_reports(args: argparse.Namespace, out: _Output, run: Run,
                       rules: Ruleset) -> None:
    """A run's folder reports and footer, for people."""
    footer = _DRY_RUN_FOOTER
    new_folders = len({name for r in run.reports for name in r.created})
    if not args.apply and new_folders > args.max_new_folders:
        footer = (f"--apply would refuse: {new_folders} new folders, more than the limit "
                  f"of {args.max_new_folders}; check the templates or pass "
                  f"--max-new-folders {new_folders}\n") + footer
    _write_reports(out, run.reports, rules, footer)
    if args.apply:
        out.write(f"{_plural(run.changes_made, 'change')} made.\n")


def _account_state(args: argparse.Namespace, out: _Output, rules: Ruleset,
                   settings: Mapping[str, Any], name: Optional[str]) -> StateStore:
    """The state a run or watch starts from (--all: a bad file is replaced), once a
    person was told the account (an [[account]] ``name``) and the rules in force."""
    store = StateStore()
    store.load(start_over=args.all)
    if out.human:
        if name is not None:
            out.line(f"Account {name}: "
                     f"{account_key(settings['user'], settings['host'], settings.get('port'))}")
        out.write(_rules_line(rules))
    return store


def _run_account(args: argparse.Namespace, out: _Output, rules: Ruleset,
                 name: Optional[str] = None, runs: Optional[List[Run]] = None) -> int:
    """``run`` over one account: the [account] table's, or the [[account]] ``name``'s
    (``rules`` then are its own, see Ruleset.for_account; its Run goes into ``runs``)."""
    check_programs_trusted(rules)       # an account's rules may come from a file of its own
    if not _rule_tests_allow(rules, args.apply):
        return EXIT_RULE_TESTS
    settings = _connection_settings(args, rules.account, name)
    folders = args.folder or list(rules.account.get("folders") or ["INBOX"])
    progress = _Progress(sys.stderr, sys.stderr.isatty() and out.human)
    store = _account_state(args, out, rules, settings, name)

    def on_message(outcome: Outcome) -> None:
        # Only what changes (or would); with --apply, after the server confirmed it.
        if outcome.changes and not args.summary:
            out.message(outcome, args.apply)

    # Message records only for a program to read: text shows messages (on_message).
    run = Run(store, rules, settings["user"], settings["host"], settings.get("port"),
              apply=args.apply, reclassify=args.all, new_only=args.new_only,
              daily_budget=args.daily_budget or None,
              on_record=out.record if out.data else None, on_message=on_message)
    run.options = dataclasses.replace(run.options, jobs=args.jobs)
    run.account_name = name
    if runs is not None:
        runs.append(run)
    lock = store.lock(run.account).acquire() if args.apply else None
    incomplete: List[str] = []
    try:
        with _signed_in(settings) as conn:
            # Every folder's checks before the first change in any of them.
            check_run(conn, rules, folders, allow_expunge=args.allow_expunge)
            for folder in folders:
                conn.stop.check(f"before {folder}")     # a safe point (see _Signals)
                budget = args.max_new_folders - sum(len(r.created) for r in run.reports)
                try:
                    run.classify(
                        conn, folder, since=args.since, limit=args.limit,
                        batch_size=args.batch_size, allow_expunge=args.allow_expunge,
                        on_progress=lambda done, total: progress(f"{folder}: classified", done, total),
                        on_applied=lambda done, total: progress(f"{folder}: applied", done, total),
                        max_new_folders=max(0, budget))
                except FolderUnavailableError as exc:
                    # One folder that cannot be opened does not stop the others.
                    incomplete.append(f"{exc}; skipped that folder")
                except UidValidityError as exc:
                    # The folder was renumbered under us: every UID in hand is stale, so
                    # stop there (nothing more is done to it) and let the other folders run.
                    incomplete.append(f"{folder}: {exc}")
    except (StopRequested, KeyboardInterrupt) as exc:
        # A signal before every message was classified and every change confirmed (one
        # after that finds no safe point left, and the run ends as it would have).
        _finish_run(run, args, out, "interrupted")
        return _signal_exit(getattr(exc, "signum", None) or args.stop.signum)
    except GmailClassifyError as exc:
        _finish_run(run, args, out, "stopped" if isinstance(exc, RunStopped) else "failed",
                    str(exc))
        raise
    finally:
        if lock is not None:
            lock.release()
    incomplete += _left_to_do(run.reports)
    out.record(run.finish("incomplete" if incomplete else "complete", "; ".join(incomplete)))
    if out.human:
        _write_run_reports(args, out, run, rules)
    for line in incomplete:
        _warn(f"{name + ': ' if name else ''}{line}")
    return EXIT_INCOMPLETE if incomplete else EXIT_OK


# Several accounts in one command end with the most serious of their exit codes, most
# serious first: a signal (the user's say), a bug, a usage error, a refused sign-in, no
# connection, a refusing server, failed rule tests, an incomplete run, a locked account.
# So one locked account never hides another's refused sign-in.
_EXIT_SEVERITY = (EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_HANGUP, EXIT_ERROR, EXIT_USAGE,
                  EXIT_AUTH, EXIT_CONNECTION, EXIT_SERVER, EXIT_RULE_TESTS, EXIT_INCOMPLETE,
                  EXIT_LOCKED, EXIT_OK)


def most_serious_exit(codes: Iterable[int]) -> int:
    """The exit code of several accounts' results: ``most_serious_exit([7, 3, 0]) == 3``;
    0 for none; a code outside the table (141) ranks just above 0."""
    rank = {code: i for i, code in enumerate(_EXIT_SEVERITY)}
    return min(codes, key=lambda code: rank.get(code, len(_EXIT_SEVERITY) - 1.5),
               default=EXIT_OK)


def _chosen_accounts(args: argparse.Namespace, rules: Ruleset, one: bool = False,
                     connecting: bool = True) -> List[Tuple[Optional[str], Ruleset]]:
    """The accounts a command works on: ``[(None, rules)]`` for a file without [[account]]
    tables; else (name, its rules) for each --account, or every table (``one``: a command
    for one account, which needs --account when there are several).

    Raises UsageError for --account without tables or with an unknown name, for a command
    for one account given several, and for --user, --host, --port, --password-command or
    an unsuffixed password or user variable with anything but exactly one --account: with
    several accounts those would send one account's name or password to the others."""
    given = list(dict.fromkeys(getattr(args, "account", None) or []))
    if not rules.accounts:
        if given:
            raise UsageError(f"--account needs [[account]] tables in the rules file, and "
                             f"{rules.source} has none; drop --account")
        return [(None, rules)]
    known = [table["name"] for table in rules.accounts]
    for name in given:
        if name not in known:
            raise UsageError(f"{rules.source} has no [[account]] named {printable(repr(name))}; "
                             f"it has: {', '.join(known)}")
    if one and len(given) > 1:
        raise UsageError(f"{args.command} works on one account: give --account once")
    names = given or known
    if one and len(names) > 1:
        raise UsageError(f"{rules.source} has {len(known)} accounts; {args.command} works on "
                         f"one: add --account NAME (one of {', '.join(known)})")
    shared = [f"--{name.replace('_', '-')}" for name in ("user", "host", "port",
                                                         "password_command")
              if getattr(args, name, None)]
    shared += [f"${variable}" for variable in (PASSWORD_ENV, PASSWORD_ENV_ALIAS, TOKEN_ENV,
                                               USER_ENV, USER_ENV_ALIAS)
               if os.environ.get(variable)]
    if shared and len(given) != 1 and connecting:
        raise UsageError(f"{shared[0]} would apply to every account of {rules.source}: give "
                         f"exactly one --account with it, or put each account's settings in "
                         f"its [[account]] table (passwords: its password_command, "
                         f"${PASSWORD_ENV_ALIAS}_<NAME>, or ~/.netrc)")
    return [(name, rules.for_account(name)) for name in names]


def _say_error(exc: BaseException, verbose: int, who: str = "",
               hint: str = " (run with -v for details)") -> int:
    """Tell an error on stderr, after ``who`` (an account's name): a GmailClassifyError as
    one line per problem (a RulesError lists each; only LF separates them, so a CR from a
    server's text is shown escaped, never obeyed), anything else as a bug, followed by
    ``hint``; the traceback under -v.  Returns the exit code: the error class's (see the
    Errors section), or EXIT_ERROR for a bug."""
    if verbose:
        log.exception("details:")
    if isinstance(exc, GmailClassifyError):
        for line in str(exc).split("\n") if str(exc) else [type(exc).__name__]:
            _warn(f"{who}{line}")
        return exc.exit_code
    _warn(f"{who}unexpected error: {type(exc).__name__}: {exc}{hint}")
    return EXIT_ERROR


def _each_account(args: argparse.Namespace, out: _Output,
                  chosen: List[Tuple[Optional[str], Ruleset]],
                  work: Callable[[Optional[str], Ruleset, List[Run]], int],
                  total: bool = True) -> int:
    """``work(name, rules, runs)`` for each account in turn, then one total; returns the
    most serious exit code.  A failure in one (locked, unreachable, refused) is reported,
    with the account's name, and the next goes on; a signal ends the account at its safe
    point and starts no other."""
    results: List[Tuple[str, int, List[Run]]] = []
    for name, rules in chosen:
        if args.stop.requested:
            break
        runs: List[Run] = []
        try:
            code = work(name, rules, runs)
        except (StopRequested, KeyboardInterrupt) as exc:
            sys.stderr.write("interrupted\n")
            code = _signal_exit(getattr(exc, "signum", None) or args.stop.signum)
        except Exception as exc:  # this account's (a bug too); the others may still go on
            code = _say_error(exc, args.verbose, f"{name}: ")
        results.append((str(name), code, runs))
        if code in (EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_HANGUP):
            break
    code = most_serious_exit(code for _, code, _ in results)
    skipped = [str(name) for name, _ in chosen[len(results):]]
    if total:
        _accounts_total(out, results, skipped, code)
    return code


def _accounts_total(out: _Output, results: List[Tuple[str, int, List[Run]]],
                    skipped: List[str], code: int) -> None:
    """The total of several accounts: one line each and one for all (a "total" record
    in JSON)."""
    accounts = []
    for name, each, runs in results:
        reports = [report for run in runs for report in run.reports]
        accounts.append({"name": name, "account": runs[0].account if runs else None,
                         "exit": each, "examined": sum(r.examined for r in reports),
                         "changes_made": sum(run.changes_made for run in runs),
                         "changes": _added_counts(r.changes for r in reports)})
    record = {"type": "total", "accounts": accounts, "not_started": skipped, "exit": code,
              "examined": sum(a["examined"] for a in accounts),
              "changes_made": sum(a["changes_made"] for a in accounts),
              "changes": _added_counts(a["changes"] for a in accounts)}

    applied = any(run.apply for _, _, runs in results for run in runs)

    def changes(each: Mapping[str, Any]) -> str:
        if applied:
            return f"{_plural(each['changes_made'], 'change')} made"
        return f"{_plural(sum(each['changes'].values()), 'change')} to make"

    def lines() -> Iterator[str]:
        yield f"All {_plural(len(results) + len(skipped), 'account')}:"
        for each in accounts:
            yield (f"  {each['name']}: {_plural(each['examined'], 'message')} examined, "
                   f"{changes(each)}; exit {each['exit']}")
        for name in skipped:
            yield f"  {name}: not started (stopped by a signal)"
        yield (f"  total: {_plural(record['examined'], 'message')} examined, "
               f"{changes(record)}; exit {code}")

    out.record(record, lines)


def _finish_run(run: Run, args: argparse.Namespace, out: _Output, status: str,
                error: str = "", *, not_made: Optional[int] = None, made: str = "made",
                again: str = "run again to finish") -> None:
    """A run that stopped early: save and log it, then say what was and was not done
    (an undo passes its own ``not_made`` count and words)."""
    out.record(run.finish(status, error))
    not_made = run.changes_not_made if not_made is None else not_made
    # A run stopped before it planned any change (a refused sign-in, say) has no counts
    # to give: its error line says it all.  An interrupted --apply always gives them.
    if args.apply and (run.changes_made or not_made or status == "interrupted"):
        word = "interrupted" if status == "interrupted" else "incomplete"
        sys.stderr.write(f"{word}: {run.changes_made:,} changes {made}, "
                         f"{not_made:,} not; {again}\n")
    elif status == "interrupted":
        sys.stderr.write("interrupted\n")


_DRY_RUN_FOOTER = "Dry run: nothing was changed. Run again with --apply to do it.\n"


def _write_reports(out: TextIO, reports: List[FolderReport], rules: Ruleset,
                   footer: str = _DRY_RUN_FOOTER) -> None:
    for report in reports:
        out.write(_report_table(report, rules))
    if len(reports) > 1:
        out.write(_total_line(reports))
    if reports and not reports[0].applied:
        out.write(footer)


def _total_line(reports: List[FolderReport]) -> str:
    """One total across folders: 'All 3 folders: 1,204 messages examined; would: ...'."""
    changes = _added_counts(report.changes for report in reports)
    examined = sum(report.examined for report in reports)
    line = f"All {len(reports)} folders: {_plural(examined, 'message')} examined"
    if changes:
        verb = "done" if reports[0].applied else "would"
        line += f"; {verb}: " + ", ".join(f"{change} ({count:,})" for change, count in changes.items())
    else:
        line += "; nothing to change"
    already = _added_counts(report.already_done for report in reports)
    if already:
        line += "; already done: " + ", ".join(f"{decision} ({count:,})"
                                               for decision, count in already.items())
    return line + "\n"


class _RulesReloader:
    """The rules in force for a watch, reloaded when the file changes or on SIGHUP.

    An [[account]] whose ``rules`` names another file is reloaded when that file changes
    too (each account watches its own).  An invalid new file is reported and the old rules
    stay; the [account] table is read only at the start (the connection is not rebuilt)."""

    def __init__(self, path: Optional[str], rules: Ruleset, name: Optional[str] = None) -> None:
        self.path = path
        self.rules = rules
        self.name = name            # an [[account]]: its rules from the reloaded file
        self._signature = self._stat()

    def _stat(self) -> Optional[Tuple[Optional[Tuple[int, int, int]], ...]]:
        if not self.path:
            return None
        signature = []
        # The rules file, and the account's own rules file (its Ruleset's source) if any.
        for path in dict.fromkeys([self.path, self.rules.source]):
            try:
                info = os.stat(path)
                signature.append((info.st_mtime_ns, info.st_size, info.st_ino))
            except OSError:
                signature.append(None)
        return tuple(signature)

    def changed(self) -> bool:
        return self.path is not None and self._stat() != self._signature

    def reload(self) -> None:
        self._signature = self._stat()
        if not self.path:
            log.warning("using the built-in rules: there is no rules file to reload")
            return
        try:
            new = load_rules(self.path)
            if self.name is not None:
                new = new.for_account(self.name)
        except RulesError as exc:
            log.error("the rules file changed but is not valid, so the old rules stay in "
                      "force: %s", exc)
            return
        if new.account != self.rules.account:
            log.warning("[account] changes in %s take effect when watch is restarted", self.path)
        self.rules = dataclasses.replace(new, account=self.rules.account)
        self._signature = self._stat()      # the account's own file may be another now
        log.warning("rules reloaded from %s: %d rules", new.source, len(new.rules))


def _cmd_watch(args: argparse.Namespace, out: _Output) -> int:
    rules = find_rules(args.rules)
    check_programs_trusted(rules)
    chosen = _chosen_accounts(args, rules)
    source = args.rules or (rules.source if os.path.isfile(rules.source) else None)
    if rules.accounts:
        return _watch_accounts(args, out, chosen, source)
    watcher, session, lock, folders = _prepare_watch(args, out, rules, source)
    try:
        log.info("watching %s%s", ", ".join(folders), "" if args.apply else " (dry run)")
        # SIGINT and SIGTERM end the watch at a safe point (exit 0), a second one at once
        # (130); SIGHUP reloads the rules.
        with _Signals(args.stop, armed=True, on_stop=watcher.stop,
                      on_hangup=watcher.request_reload):
            # A wait that ended at the stop (StopRequested): the watch ends as asked.
            with contextlib.suppress(StopRequested):
                watcher.run()
    finally:
        if lock is not None:
            lock.release()
    log.info("watch stopped after %d wake-ups", session.runs)
    return EXIT_OK


def _prepare_watch(args: argparse.Namespace, out: _Output, rules: Ruleset,
                   source: Optional[str], name: Optional[str] = None,
                   ) -> Tuple[Watcher, WatchSession, Optional[AccountLock], List[str]]:
    """One account's watch, ready to run: its Watcher, WatchSession, lock (--apply) and
    folders.  ``name``: an [[account]] (``rules`` are its own)."""
    check_programs_trusted(rules)
    settings = _connection_settings(args, rules.account, name)
    # The watch retries forever itself, logging an outage once; the connection must not.
    settings["retries"] = 0
    folders = list(dict.fromkeys(args.folder or rules.account.get("folders") or ["INBOX"]))
    reloader = _RulesReloader(source, rules, name)
    store = _account_state(args, out, rules, settings, name)

    def on_message(outcome: Outcome) -> None:
        # A dry run shows each message it would change once; --apply is quiet unless -v.
        if outcome.changes and (not args.apply or args.verbose):
            out.message(outcome, args.apply, name)

    def connect() -> GmailConnection:
        conn = GmailConnection(**settings)
        conn.connect()
        return conn

    def catch_up(conn: GmailConnection, names: List[str]) -> None:
        session(conn, names)
        out.flush()

    def resume_at(when: float) -> None:
        timer = threading.Timer(max(0.0, when - time.time()), watcher.request_catch_up)
        timer.daemon = True
        timer.start()

    session = WatchSession(store, lambda: reloader.rules, settings["user"], settings["host"],
                           settings.get("port"), apply=args.apply, reclassify=args.all,
                           new_only=args.new_only, daily_budget=args.daily_budget or None,
                           max_new_folders=args.max_new_folders,
                           batch_size=args.batch_size, allow_expunge=args.allow_expunge,
                           on_record=out.record,
                           on_message=on_message, stopping=lambda: watcher.stopping,
                           on_pause=resume_at)
    session.options = dataclasses.replace(session.options, account_name=name, jobs=args.jobs)
    session.check_start(folders)
    watcher = Watcher(connect, folders, catch_up, interval=args.interval,
                      idle_interval=args.idle_interval, reload=reloader.reload,
                      reload_needed=reloader.changed, stop=args.stop)
    # Held for as long as the watch runs: a cron 'run --apply' meanwhile exits 7.
    lock = store.lock(session.account, "watch").acquire() if args.apply else None
    return watcher, session, lock, folders


class _AccountLogPrefix(logging.Filter):
    """Log lines of a watch thread start with its account's name (``work: lost the
    connection ...``): several accounts log into one stream."""

    def filter(self, record: logging.LogRecord) -> bool:
        thread = threading.current_thread().name
        if thread.startswith("watch:"):
            record.msg, record.args = f"{thread[6:]}: {record.getMessage()}", None
        return True


def _watch_accounts(args: argparse.Namespace, out: _Output,
                    chosen: List[Tuple[Optional[str], Ruleset]], source: Optional[str]) -> int:
    """``watch`` of several [[account]]s at once: a thread, connection, lock and state
    each, one Stop for all (SIGINT/SIGTERM stop every one at its safe point), SIGHUP
    reloads every one's rules.  An account that cannot start (locked, no state, no
    password) or whose watch ends with an error (a refused sign-in) does not stop the
    others; the exit code is the most serious of theirs (see most_serious_exit)."""
    codes: Dict[str, int] = {}
    started: List[Tuple[str, Watcher, Optional[AccountLock], threading.Thread]] = []

    def watch(name: str, watcher: Watcher) -> None:
        try:
            with contextlib.suppress(StopRequested):    # a wait that ended at the stop
                watcher.run()
            codes[name] = EXIT_OK
        except BaseException as exc:  # this account's end; the others watch on
            codes[name] = _say_error(exc, args.verbose, f"{name}: ", hint="")

    prefix = _AccountLogPrefix()
    log.addFilter(prefix)
    try:
        with _Signals(args.stop, armed=True,
                      on_hangup=lambda: [w.request_reload() for _, w, _, _ in started]):
            for name, rules in chosen:
                name = str(name)
                try:
                    watcher, session, lock, folders = _prepare_watch(args, out, rules,
                                                                     source, name)
                except GmailClassifyError as exc:
                    codes[name] = _say_error(exc, 0, f"{name}: ")
                    continue
                log.info("%s: watching %s%s", name, ", ".join(folders),
                         "" if args.apply else " (dry run)")
                thread = threading.Thread(target=watch, args=(name, watcher),
                                          name=f"watch:{name}", daemon=True)
                started.append((name, watcher, lock, thread))
                thread.start()
            for _, _, _, thread in started:
                while thread.is_alive():
                    thread.join(0.2)        # the main thread stays free for the signals
    finally:
        log.removeFilter(prefix)
        for name, watcher, lock, thread in started:
            watcher.stop()
            thread.join(5)
            if lock is not None:
                lock.release()
    return most_serious_exit(codes.values())


def _history_line(entry: Mapping[str, Any]) -> str:
    """One applied run as ``history`` lists it for a person."""
    counts = ", ".join(f"{name} {count:,}" for name, count in entry["counts"].items())
    status = "" if entry["status"] == "complete" else f"  [{entry['status']}]"
    if entry.get("maybe"):
        status += f"  [{entry['maybe']:,} maybe made: the run ended before the server " \
                  f"confirmed them; undo checks each]"
    if entry.get("skipped"):
        status += f"  [{_plural(entry['skipped'], 'message')} skipped for its content]"
    if entry.get("possibly_incomplete"):
        status += "  [possibly incomplete: a line of its audit log is unreadable]"
    if entry.get("folders_created"):
        maybe = entry.get("folders_created_maybe")
        counts = ", ".join(filter(None, [counts, _plural(
            entry["folders_created"], "folder") + " created" +
            (f" ({maybe:,} maybe)" if maybe else "")]))
    undone = f"  [undone by {entry['undone_by']}]" if entry.get("undone_by") else ""
    what = f"undo of {entry['undo_of']}: " if entry.get("undo_of") else ""
    if entry.get("account_name"):
        what = f"[{entry['account_name']}] {what}"
    return (f"{entry['run']}  {entry['time']}  {entry['account']} on {entry['host']}  "
            f"{', '.join(entry['folders'])}  {what}{counts or 'no changes'}{status}{undone}")


def _cmd_history(args: argparse.Namespace, out: _Output) -> int:
    store = StateStore()
    runs = history(store)
    if args.account:
        # The runs of these accounts' mailboxes (user, host, port), whatever the table was
        # called when they ran: renaming a table hides none of its runs.
        keys = set()
        for name, rules in _chosen_accounts(args, find_rules(args.rules), connecting=False):
            table = rules.account
            if not table.get("user"):
                raise UsageError(f"account {name!r} has no user in {rules.source}")
            keys.add(account_key(table["user"], table.get("host", GMAIL_HOST), table.get("port")))
        runs = [entry for entry in runs if f"{entry['account']} on {entry['host']}" in keys]
    for entry in runs:
        out.record(entry, lambda: [_history_line(entry)])
    if not runs and out.human:
        out.line(f"no applied runs in {store.audit.path}")
    return EXIT_OK


def _cmd_undo(args: argparse.Namespace, out: _Output) -> int:
    [(name, rules)] = _chosen_accounts(args, find_rules(args.rules), one=True)
    settings = _connection_settings(args, rules.account, name)
    store = StateStore()
    store.load()

    def lines(record: Dict[str, Any]) -> Iterator[str]:
        subject = str(record.get("subject") or "")[:60]
        for change in record["changes"]:
            # Name what leaves a folder (an expunged copy, mail moved back): folder and UID.
            before, after = change.get("before"), change.get("after")
            place = ""
            if isinstance(before, dict) and before.get("uid"):
                what = "expunges" if after is None else "from"
                place = f" ({what} {before.get('folder')} UID {before.get('uid')})"
            yield (f"{record['folder']} {record['uid']}: {'' if args.apply else 'would '}"
                   f"{describe_change(change)}{place}  {subject}")
        for reason in record.get("left_alone", []):
            yield f"{record['folder']} {record['uid']}: left alone: {reason}  {subject}"

    def on_record(record: Dict[str, Any]) -> None:
        out.record(record, lambda: lines(record) if out.human else ())

    undo = Undo(store, settings["user"], settings["host"], settings.get("port"),
                run_id=args.run_id, apply=args.apply, allow_expunge=args.allow_expunge,
                on_record=on_record)
    undo.run.account_name = name
    with store.lock(undo.run.account, "undo") if args.apply else contextlib.nullcontext():
        try:
            with _signed_in(settings) as conn:
                undo.execute(conn)
        except (StopRequested, KeyboardInterrupt) as exc:
            planned = sum(len(record["changes"]) for record in undo.messages)
            _finish_run(undo.run, args, out, "interrupted", made="reversed",
                        not_made=max(0, planned - undo.reversed - undo.left_alone),
                        again=f"run 'undo {undo.undo_of} --apply' again to finish")
            return _signal_exit(getattr(exc, "signum", None) or args.stop.signum)
        except GmailClassifyError as exc:
            _finish_run(undo.run, args, out, "failed", str(exc))
            raise
    out.record(undo.run.finish())
    if out.human:
        verb = "reversed" if args.apply else "would reverse"
        for name in undo.deleted:
            out.line(f"{'deleted' if args.apply else 'would delete'} the empty "
                     f"folder {name}, which run {undo.undo_of} created")
        unmade = f"; {undo.unmade:,} never made (the run ended first)" if undo.unmade else ""
        out.write(f"undo of {undo.undo_of}: {verb} {undo.reversed:,} changes; "
                  f"{undo.left_alone:,} left alone{unmade}\n")
        if undo.reversed:
            out.write(f"The mail {'this undo restored' if args.apply else 'it would restore'} "
                      f"is not classified again while the rules stay as they were for run "
                      f"{undo.undo_of} (changed rules, or run --all, classify it again): fix "
                      f"the rules before restarting a timer or watch.\n")
        if not args.apply:
            out.write(_DRY_RUN_FOOTER)
    for folder in undo.expunge_surprises:
        _warn(f"{folder}: the plain EXPUNGE did not do what was expected (see the warning "
              f"above); check that folder when no other mail client is at work there")
    return EXIT_INCOMPLETE if undo.expunge_surprises else EXIT_OK


def _cmd_doctor(args: argparse.Namespace, out: _Output) -> int:
    rules = find_rules(args.rules)
    chosen = _chosen_accounts(args, rules)
    if not rules.accounts:
        return _doctor_account(args, out, rules)
    return _each_account(args, out, chosen, lambda name, account_rules, _runs: _doctor_account(
        args, out, account_rules, name), total=False)


def _doctor_account(args: argparse.Namespace, out: _Output, rules: Ruleset,
                    name: Optional[str] = None) -> int:
    """``doctor`` for one account: sign in, diagnose (read-only), print the table."""
    settings = _connection_settings(args, rules.account, name)
    folders = args.folder or list(rules.account.get("folders") or ["INBOX"])
    store = StateStore()
    store.load()
    conn = GmailConnection(**settings)
    try:
        conn.connect()
    except (AuthenticationError, OAuthError, TLSError, ConnectionLostError) as exc:
        diagnosis = diagnose_failure(conn.user, conn.host, conn.port, exc)
    else:
        try:
            diagnosis = diagnose(conn, rules, folders, allow_expunge=args.allow_expunge,
                                 store=store, daily_budget=args.daily_budget or None,
                                 oauth=isinstance(settings.get("token"), OAuthTokenSource))
        finally:
            conn.close()
    width = max(len(row.check) for row in diagnosis.rows)

    def lines() -> Iterator[str]:
        yield f"Doctor: {diagnosis.account}{f' (account {name})' if name else ''}"
        for row in diagnosis.rows:
            mark = "PROBLEM " if not row.ok else ""
            yield f"  {row.check.ljust(width)}  {mark}{row.result}"
        if diagnosis.problems:
            yield "What to do:"
            for row in diagnosis.problems:
                yield f"  {row.check}: {row.advice} (a run would exit {row.exit_code})"
        else:
            yield "The rules can run here."
    out.record({"type": "doctor", "account": diagnosis.account, "account_name": name,
                "rows": [dataclasses.asdict(row) for row in diagnosis.rows],
                "exit": diagnosis.exit_code}, lines)
    return diagnosis.exit_code


def _report_table(report: FolderReport, rules: Ruleset) -> str:
    verb = "changed" if report.applied else "to change"
    rows = [(rule.name, report.matched.get(rule.name, 0), report.changed.get(rule.name, 0))
            for rule in rules.rules]
    rows = [row for row in rows if row[1]]   # a rule that matched nothing is not news
    width = max([len("rule")] + [len(name) for name, _, _ in rows])
    lines = [f"{report.folder}: {_plural(report.examined, 'message')} examined"]
    if rows:
        lines.append(f"  {'rule'.ljust(width)}  {'matched':>7}  {verb:>9}")
        lines += [f"  {name.ljust(width)}  {matched:>7,}  {changed:>9,}"
                  for name, matched, changed in rows]
    elif report.examined:
        lines.append("  no rule matched")
    for change, count in report.changes.items():
        lines.append(f"  {'done' if report.applied else 'would'}: {change} ({count})")
    for decision, count in report.already_done.items():
        lines.append(f"  already done: {decision} ({count})")
    for name in report.created:
        lines.append(f"  {'created' if report.applied else 'would create'} {name}")
    if report.moved_missing:
        lines.append(f"  {_plural(report.moved_missing, 'message')} had gone before they could "
                     "be moved")
    content: Dict[str, List[int]] = {}
    for uid, why in sorted(report.content_skipped.items()):
        content.setdefault(why, []).append(uid)
    for why, uids in content.items():
        lines.append(f"  {_plural(len(uids), 'message')} left alone for their content ({why}): "
                     f"UID {compress_uids(uids)}; a rerun would not help, see 'history'")
    for why, uids in _skipped_by_reason(report).items():
        lines.append(f"  {_plural(len(uids), 'message')} skipped ({why}): UID "
                     f"{compress_uids(uids)}; run again")
    for note in report.notes:
        lines.append(f"  note: {note}")
    return "\n".join(printable(line) for line in lines) + "\n"


def _skipped_by_reason(report: FolderReport) -> Dict[str, List[int]]:
    """The skipped UIDs grouped by why: ``{"the server's answer lacked its flags": [4, 9]}``."""
    groups: Dict[str, List[int]] = {}
    for uid in sorted(report.skipped):
        why = report.why_skipped.get(uid, "the server sent far more than was asked for")
        groups.setdefault(why, []).append(uid)
    return groups


def _list_programs(rules: Ruleset, out: TextIO, run: bool, show: bool = True) -> bool:
    """Print the programs the rules would run (``check`` and ``demo`` are how people look
    at a file they were given: they run none unless ``run``, after the trust check).
    Returns True when the file runs programs and ``run`` is not given."""
    found = rule_programs(rules)
    for rule, condition in found if show else ():
        program = condition.executable() or "(not found)"
        out.line(f"  program: rule {rule.position} ({rule.name}): {printable(condition.describe())}"
                 f"  [{printable(program)}]")
    if found and run:
        check_programs_trusted(rules)
    return bool(found) and not run


def _cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    rules = load_rules(args.rules_file)
    out.line(f"{rules.source}: {_plural(len(rules.rules), 'rule')}, valid")
    for rule in rules.rules:
        more = " (continue)" if rule.continue_ else ""
        what = rule.actions.describe()
        if _labels_from_program([rule.condition]):
            what = "label from program" if rule.actions.is_empty() else what + ", label from program"
        out.line(f"  {rule.position}. {rule.name}: {what}{more}")
    programs_not_run = _list_programs(rules, out, args.run_programs)
    needs = rules.needs
    fetched = ["headers " + ", ".join(sorted(needs.headers))]
    if needs.body:
        fetched.append(f"a body prefix ({BODY_PREFIX_BYTES} bytes) for undecided messages")
    if needs.queries:
        fetched.append(f"{len(needs.queries)} Gmail search(es)")
    out.line("  fetches: " + "; ".join(fetched))
    for note in rules.local()[1] + rules.state_loops():
        out.line(f"  note: {note}")
    if programs_not_run:
        if rules.tests:
            out.line(f"  tests: {len(rules.tests)} not run: they would run the programs "
                     f"above; check --run-programs runs them")
        return EXIT_OK
    failures = run_rule_tests(rules)
    if rules.tests:
        out.write(f"  tests: {len(rules.tests) - len(failures)} of {len(rules.tests)} passed\n")
    for line in failures:
        _warn(line)
    return EXIT_RULE_TESTS if failures else EXIT_OK


def _cmd_test(args: argparse.Namespace, out: TextIO) -> int:
    rules, notes = load_rules(args.rules_file).local()
    check_programs_trusted(rules)
    for note in notes:
        out.line(f"note: {note}")
    counts: Dict[str, int] = {}
    total = skipped = 0
    try:
        for name, info in iter_message_files(args.files, limit=offline_read_limit(rules)):
            total += 1
            try:
                decision = rules.classify(info, final=True)
            except (ProgramError, ContentSkip) as exc:
                skipped += 1
                out.line(f"{name}: skipped: {exc}")
                continue
            subject = _first(header_text(info.headers, "subject"))
            if not decision.matches:
                out.line(f"{name}: no rule  ({subject[:60]})")
                continue
            for rule_name, reason in decision.matches:
                counts[rule_name] = counts.get(rule_name, 0) + 1
                out.line(f"{name}: {rule_name}: {reason}")
            out.line(f"    -> {decision.actions.expanded(info).describe()}  ({subject[:60]})")
    except GmailClassifyError as exc:
        if type(exc) is not GmailClassifyError:
            raise
        raise UsageError(str(exc)) from exc    # a FILE that is not mail: the user's input
    noun = "message" if total == 1 else "messages"
    out.line(f"{total} {noun}; " + ", ".join(f"{k}: {v}" for k, v in counts.items())
             + ("" if counts else "no rule matched")
             + (f"; {skipped} skipped (a program failed on them)" if skipped else ""))
    return EXIT_INCOMPLETE if skipped else EXIT_OK


def _cmd_labels(args: argparse.Namespace, out: TextIO) -> int:
    [(name, rules)] = _chosen_accounts(args, find_rules(args.rules), one=True)
    with _signed_in(_connection_settings(args, rules.account, name)) as conn:
        for folder in sorted(conn.list_folders(), key=lambda f: f.name.casefold()):
            use = f"  {folder.special_use}" if folder.special_use else ""
            flags = " ".join(sorted(f for f in folder.flags if f != folder.special_use))
            out.line(f"{folder.name}{use}  {flags}".rstrip())
    return EXIT_OK


def _oauth_client(args: argparse.Namespace, account: Mapping[str, Any]) -> OAuthClient:
    """The OAuth client for ``auth``: --client-secret-file, else the rules' [account]."""
    path = args.client_secret_file or account.get("oauth_client_file")
    if path:
        return load_client_secret_file(os.path.expanduser(path))
    if account.get("oauth_client_id"):
        return OAuthClient(account["oauth_client_id"], account.get("oauth_client_secret", ""))
    raise UsageError("auth needs your own OAuth client: pass --client-secret-file with the JSON "
                     "of a 'Desktop app' client from Google Cloud Console (see the README, "
                     "'Signing in with OAuth2'), or set oauth_client_file in the rules' [account]")


def _can_open_browser() -> bool:
    """False on a Unix console with no display, where webbrowser would start lynx or w3m
    in this very terminal instead of a browser the user can sign in with."""
    if sys.platform in ("darwin", "win32") or os.name != "posix":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _auth_account(args: argparse.Namespace, rules: Ruleset) -> Tuple[Optional[str], str,
                                                                     Mapping[str, Any]]:
    """The account ``auth`` signs in for, as (its [[account]] name or None, user, table):
    the [account] table, or the one [[account]] (``--account NAME``, needed when there are
    several).  --user and $GMAIL_USER apply to an [[account]] only with --account, as
    everywhere (see _chosen_accounts).  Raises UsageError."""
    ((name, account_rules),) = _chosen_accounts(args, rules, one=True, connecting=False)
    account = account_rules.account
    if name is not None and not args.account and args.user:
        raise UsageError(f"--user would apply to every account of {rules.source}: give "
                         f"--account {name} with it, or set user in its [[account]] table")
    user = (args.user or (os.environ.get(USER_ENV) if name is None or args.account else None)
            or account.get("user"))
    if not user and name is not None:
        raise UsageError(f"account {name!r} of {rules.source} has no user: add user = "
                         f"\"you@gmail.com\" to its [[account]] table, or pass --user with "
                         f"--account {name}")
    if not user:
        raise UsageError(f"no account given: pass --user you@gmail.com or set {USER_ENV}")
    return name, user, account


def _cmd_auth(args: argparse.Namespace, out: TextIO) -> int:
    rules = find_rules(args.rules)
    name, user, account = _auth_account(args, rules)
    client = _oauth_client(args, account)
    interactive = sys.stdin is not None and not getattr(sys.stdin, "closed", False)

    def show(url: str) -> None:
        port = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["redirect_uri"][0]
        out.write(f"Sign in as {user} by opening this address in a browser:\n\n  {url}\n\n"
                  f"Waiting for the browser to come back to {port} ...\n")
        if interactive:
            out.write("No browser on this machine? Open the address elsewhere, then paste "
                      "here the address the browser ends on (it starts with "
                      "http://127.0.0.1) and press Enter.\n")
        out.flush()

    browser = None if args.no_browser or not _can_open_browser() else webbrowser.open
    try:
        answer = authorize(client, user, port=args.port, open_browser=browser, show=show,
                           read_pasted=_stdin_lines(sys.stdin) if interactive else None)
    except OAuthError as exc:
        if exc.error == "port":      # the user's --port: a usage error, not a refusal
            raise UsageError(str(exc)) from exc
        raise
    path = save_refresh_token(user, client, answer["refresh_token"])
    again = f"--account {shlex.quote(name)}" if name is not None else f"--user {user}"
    if name is not None and args.rules:
        again = f"--rules {shlex.quote(args.rules)} {again}"
    out.write(f"Signed in as {user}. The refresh token is stored in {path} (readable only "
              f"by you).\nTry: python gmail_classify.py {again} --auth xoauth2 labels\n")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, out: _Output) -> int:
    """Classify the built-in sample offline and print what a dry run would."""
    rules = load_rules(args.rules) if args.rules else builtin_rules()
    if out.human:
        out.write("Demo: 10 sample messages in an offline INBOX; no account, nothing sent.\n")
        out.write(_rules_line(rules))
    messages = demo_messages()
    if _list_programs(rules, out, args.run_programs, show=out.human):
        for msg in messages:    # rules that need a program's answer do not match
            msg.programs.update(dict.fromkeys((c for _, c in rule_programs(rules)), _NOT_RUN))
        if out.human:
            out.write("Programs not run: rules that ask them match nothing here "
                      "(--run-programs runs them).\n")

    def on_message(outcome: Outcome) -> None:
        if outcome.changes and not args.summary:
            out.message(outcome, False)

    report = classify_messages(rules, messages, "INBOX", on_message=on_message)
    if out.human:
        _write_reports(out, [report], rules, footer="Next: a dry run on your own INBOX, "
                       "which changes nothing either:\n  python gmail_classify.py --user "
                       "you@gmail.com\n")
    return EXIT_OK


def _cmd_init(args: argparse.Namespace, out: TextIO) -> int:
    path = pathlib.Path(args.path) if args.path else default_rules_dir() / "rules.toml"
    if path.exists() and not args.force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it")
    text = STARTER_RULES_TOML if path.suffix == ".toml" else STARTER_RULES_JSON
    write_rules_file(path, text, force=args.force)
    out.line(f"wrote {path}; edit it, then try: python gmail_classify.py check {path}")
    return EXIT_OK


def _output_format(args: argparse.Namespace, refuse_existing: bool = False) -> str:
    """The rules format of -o or --format; ``refuse_existing``: an -o file needs --force."""
    if args.output:
        suffix = pathlib.Path(args.output).suffix.lower()
        if suffix not in (".toml", ".json"):
            raise UsageError(f"{args.output}: name the rules file *.toml or *.json")
        if args.format and args.format != suffix[1:]:
            raise UsageError(f"--format {args.format} does not match {args.output}; drop one")
        if refuse_existing and os.path.exists(args.output) and not args.force:
            raise UsageError(f"{args.output} already exists; pass --force to overwrite it")
        return suffix[1:]
    return args.format or "toml"


def _emit_rules(args: argparse.Namespace, out: TextIO, text: str, count: int,
                then: str = "; next: python gmail_classify.py check {}") -> None:
    """Rules to standard output, or to -o (then said on stderr, ``then`` naming the file)."""
    if not args.output:
        out.write(text)
        return
    write_rules_file(args.output, text, force=args.force)
    if not args.quiet:
        sys.stderr.write(printable(f"wrote {args.output}: {_plural(count, 'rule')}"
                                   + then.format(args.output)) + "\n")


def _cmd_import_filters(args: argparse.Namespace, out: TextIO) -> int:
    fmt = _output_format(args)
    try:
        with open(args.filters_file, "rb") as fh:
            data = fh.read(MAX_FILTER_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{args.filters_file}: cannot read: {exc.strerror or exc}") from None
    imported = import_gmail_filters(data, args.filters_file)
    for note in imported.notes:
        _warn(f"{args.filters_file}: {note}")
    if not imported.doc["rule"]:
        raise UsageError(f"{args.filters_file}: none of its {imported.filters} filters can be "
                         f"done over IMAP; nothing written")
    header = [f"Imported from {os.path.basename(args.filters_file)} by gmail_classify "
              f"{__version__}: {len(imported.doc['rule'])} rules from {imported.filters} filters.",
              "Each Gmail filter is one rule with continue = true, so every matching filter",
              "applies, as in Gmail. gmail_query keeps Gmail's own search; rules that also have",
              "local conditions work in `test` and on other servers too.",
              "Next: check this file, do a dry run, then --apply (or --new-only for new mail)."]
    text = format_rules(imported.doc, fmt, header, imported.comments)
    _emit_rules(args, out, text, len(imported.doc["rule"]))
    return EXIT_OK


# The options that make `export --format sieve` sign in for the server's folder names;
# without any of them it stays offline.
_EXPORT_SERVER_OPTIONS = ("user", "host", "port", "starttls", "plaintext", "cafile", "auth",
                          "password_command", "account")


def _cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    rules = load_rules(args.rules_file)
    if args.rules or any(getattr(args, option) for option in _EXPORT_SERVER_OPTIONS):
        # Sieve with the server's folder names: sign in (the rules' [account], or the one
        # [[account]] --account names, as elsewhere), read LIST and NAMESPACE, change nothing.
        if args.rules:
            raise UsageError("export reads the rules file given as RULES; drop --rules")
        if args.format != "sieve":
            raise UsageError(f"connection options only name the server's folders for --format "
                             f"sieve; --format {args.format} does not connect, so drop them")
        ((name, account_rules),) = _chosen_accounts(args, rules, one=True)
        with _signed_in(_connection_settings(args, account_rules.account, name)) as conn:
            done = export_sieve(account_rules, partial=args.partial, server=conn)
    elif args.format == "sieve":
        done = export_sieve(rules, partial=args.partial)
    elif args.format == "gmail":
        done = export_gmail(rules, partial=args.partial)
    else:
        done = export_json(rules)
    for rule, why in done.left_out:
        _warn(f"{rules.source}: rule {rule.position} ({rule.name}) left out: {why} (it has "
              f"continue, so the rules after it decide as before)")
    if done.stopped:
        rule, why = done.stopped
        _warn(f"{rules.source}: stopped before rule {rule.position} ({rule.name}): {why}; "
              f"exported the {_plural(done.rules, 'rule')} before it")
    _emit_rules(args, out, done.text, done.rules, f" as {args.format}")
    return EXIT_OK


def _cmd_suggest(args: argparse.Namespace, out: TextIO) -> int:
    fmt = _output_format(args, refuse_existing=True)
    [(name, rules)] = _chosen_accounts(args, find_rules(args.rules), one=True)
    with _signed_in_counted(_connection_settings(args, rules.account, name), "suggest") as conn:
        found = suggest_rules(conn, args.folder, top=args.top, batch_size=args.batch_size,
                              limit=args.limit)
    if not found.doc["rule"]:
        _warn(f"{found.folder}: no sender, list or domain with at least 2 of its "
              f"{found.examined} messages; nothing to suggest")
        return EXIT_OK
    header = [f"Suggested by gmail_classify from the headers of {found.examined} messages "
              f"in {found.folder}.",
              "Every rule only adds a label. Rename the labels, merge or delete rules, then",
              "check this file, do a dry run, and --apply."]
    text = format_rules(found.doc, fmt, header, found.comments)
    _emit_rules(args, out, text, len(found.doc["rule"]))
    return EXIT_OK


def _decision_record(decision: Decision) -> Dict[str, Any]:
    """A decision as ``why`` and ``diff`` record it: its rules, its actions and their text."""
    return {"rules": [name for name, _reason in decision.matches],
            "actions": decision.actions.as_record(), "text": decision.actions.describe()}


def _write_why(out: _Output, rules: Ruleset, where: str, uid: Optional[int],
               info: MessageInfo) -> None:
    """``why`` of one message: its record, or its lines for a person."""
    explanation = explain_message(rules, info)
    shown = _Shown(info)
    record = {"where": where, "uid": uid, "message_id": shown.message_id, "from": shown.sender,
              "subject": shown.subject,
              "rules": [{"position": v.position, "name": v.name, "matched": v.matched,
                         "reason": v.reason, "actions": v.actions.describe(),
                         "continue": v.continue_, "reached": v.reached}
                        for v in explanation.verdicts],
              "outcome": _decision_record(explanation.decision)}

    def text() -> Iterator[str]:
        place = record["where"] + (f" UID {record['uid']}" if record["uid"] is not None else "")
        yield f"{place}: {record['from']}  {record['subject']!r}"
        # Each rule's verdict: '2. Receipts: matched: subject: "Your receipt" contains
        # "receipt" -> label Receipts; continue: passed on to the next rules' and the like.
        for verdict in explanation.verdicts:
            state = {True: "matched", False: "no", None: "unknown"}[verdict.matched]
            line = f"  {verdict.position}. {verdict.name}: {state}: {verdict.reason}"
            if verdict.matched:
                line += f" -> {verdict.actions.describe()}"
                if not verdict.reached:
                    line += " (not reached: an earlier rule decided)"
                elif verdict.continue_:
                    line += "; continue: passed on to the next rules"
                else:
                    line += "; decides (no continue)"
            yield line
        decided = ", ".join(record["outcome"]["rules"]) or "no rule"
        yield f"  outcome: {record['outcome']['text']} (by {decided})"
    out.record(record, text)


def _cmd_why(args: argparse.Namespace, out: _Output) -> int:
    rules = find_rules(args.rules)
    if (args.message is None) == (args.uid is None):
        raise UsageError("give a Message-ID, an .eml file or --uid FOLDER:UID (one of them)")
    if args.message is not None and os.path.isfile(args.message):
        try:
            info = message_info_from_bytes(read_message_file(args.message))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{args.message}: cannot read: {exc}") from None
        _write_why(out, rules.local()[0], args.message, None, info)
        return EXIT_OK
    folder, uid = args.folder, None
    if args.uid is not None:
        folder, _, number = args.uid.rpartition(":")
        if not folder or not number.isdigit() or int(number) == 0:
            raise UsageError(f"--uid {args.uid}: write FOLDER:UID, e.g. INBOX:4711")
        uid = int(number)
    with _signed_in_counted(_connection_settings(args, rules.account), "why") as conn:
        if not conn.is_gmail:
            rules = rules.local()[0]
        found = find_messages(conn, rules, folder, message_id=args.message, uid=uid)
    if not found:
        what = f"UID {uid}" if uid is not None else f"Message-ID {args.message}"
        raise UsageError(f"no message with {what} in {folder}; try another --folder")
    for number in sorted(found):
        _write_why(out, rules, folder, number, found[number])
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace, out: _Output) -> int:
    old, new = load_rules(args.old_rules), load_rules(args.new_rules)
    if args.files:
        try:
            limit = max(offline_read_limit(old), offline_read_limit(new))
            found = diff_messages(old, new, iter_message_files(args.files, limit=limit))
        except GmailClassifyError as exc:
            if type(exc) is not GmailClassifyError:
                raise
            raise UsageError(str(exc)) from exc    # a FILE that is not mail
    else:
        with _signed_in_counted(_connection_settings(args, new.account or old.account),
                                "diff") as conn:
            found = diff_folders(conn, old, new, args.folder or ["INBOX"], since=args.since,
                                 batch_size=args.batch_size)
    for change in found.changes:
        record = {"where": change.where, "uid": change.uid, "message_id": change.message_id,
                  "from": change.sender, "subject": change.subject,
                  "before": _decision_record(change.before),
                  "after": _decision_record(change.after)}
        place = change.where + (f" UID {change.uid}" if change.uid is not None else "")
        out.record(dict(record, type="message"), lambda record=record, place=place: [
            f"{place}: {record['from']}  {record['subject']!r}",
            f"    {record['before']['text']} -> {record['after']['text']}"])
    per_rule = {name: counts for name, counts in found.matched.items() if counts[0] != counts[1]}
    summary = {"type": "summary", "examined": found.examined, "changed": len(found.changes),
               "rules": {name: {"before": c[0], "after": c[1]} for name, c in per_rule.items()}}

    def text() -> Iterator[str]:
        yield (f"{found.examined} messages: {len(found.changes)} would be decided "
               f"differently")
        for name, counts in sorted(per_rule.items()):
            yield f"  {name}: {counts[0]} -> {counts[1]} messages"
    out.record(summary, text)
    return EXIT_OK


def _cmd_learn(args: argparse.Namespace, out: TextIO) -> int:
    fmt = _output_format(args, refuse_existing=True)
    if not 0 < args.min_precision <= 1:
        raise UsageError(f"--min-precision {args.min_precision}: give a share like 0.97")
    if args.from_path:
        filed = read_filed_path(args.from_path, limit=args.limit, since=args.since)
    else:
        [(name, rules)] = _chosen_accounts(args, find_rules(args.rules), one=True)
        settings = _connection_settings(args, rules.account, name)
        progress = _Progress(sys.stderr, not args.quiet and sys.stderr.isatty())
        with _signed_in_counted(settings, "learn") as conn:
            filed = read_filed_mail(conn, folders=args.folder or (), exclude=args.exclude or (),
                                    limit=args.limit, since=args.since,
                                    batch_size=args.batch_size, on_progress=progress)
    learned = learn_rules(filed, min_precision=args.min_precision,
                          min_support=args.min_support, holdout=args.holdout,
                          max_rules=args.max_rules, keep_examples=args.keep_examples)
    if not args.quiet:
        for line in learned.report:
            _warn(f"learn: {line}")
    if not learned.doc["rule"]:
        if not args.quiet:
            _warn(f"{filed.source}: no label could be learned precisely from its "
                  f"{len(filed.messages)} messages; nothing written")
        return EXIT_OK
    text = format_rules(learned.doc, fmt, learned.header, learned.comments)
    _emit_rules(args, out, text, len(learned.doc["rule"]))
    if not args.quiet:
        target = args.output or "learned.toml"
        _warn(f"next: python gmail_classify.py diff YOUR-RULES.toml {target} (what would "
              f"change), then check and a dry run")
    return EXIT_OK


# The subcommands, in the order --help lists them.  A new subcommand is its function and
# its row here; build_parser, main() and the option scan in _subcommand_first read this.
_COMMANDS: Dict[str, _Command] = {
    "run": _Command(_cmd_run, "classify a folder (dry run unless --apply)", ("connection",), (
        _Opt("--folder", action="append", type=_folder_name, help="folder to classify "
             "(repeatable; default INBOX)"),
        _Opt("--since"),
        _Opt("--limit", type=_positive, help="only the newest N messages per folder"),
        _Opt("--apply"), _Opt("--json"),
        _Opt("--summary", action="store_true", help="only the totals, no line per message"),
        _Opt("--batch-size"), _Opt("--allow-expunge"),
        _Opt("--max-new-folders", help="refuse, before any change, a run that would "
             "create more than N folders or labels (default: %(default)s)"),
        (_Opt("--all", action="store_true", help="classify every message again, not "
                    "only those above the folder's mark (also starts over after a bad "
                    "state file)"),
               _Opt("--new-only", action="store_true", help="classify nothing now; "
                    "remember each folder's newest message so later runs act on new mail "
                    "only")),
        _Opt("--daily-budget", help="stop before downloading more than SIZE a day for this "
             "account (default: 2G; Gmail allows about 2.5G; 0: no limit)"),
        _Opt("--jobs")), exit_codes=True),
    "history": _Command(_cmd_history, "list the applied runs, newest first, from the audit "
                        "log", options=(_Opt("--json", help="one JSON object per run"),
                                        _Opt("--account", action="append", metavar="NAME",
                                             help="only the runs of this [[account]] of the "
                                             "rules file (repeatable)"),
                                        _Opt("--rules", help="the rules file that names the "
                                             "accounts"))),
    "undo": _Command(_cmd_undo, "reverse one applied run (dry run unless --apply)",
                     ("connection",), (
        _Opt("run_id", metavar="RUN_ID", nargs="?", help="the run to reverse (default: the "
             "last applied run of this account; see 'history')"),
        _Opt("--apply", help="reverse it (default: only show what would be reversed)"),
        _Opt("--json"),
        _Opt("--allow-expunge", help="on servers with neither MOVE nor UIDPLUS, let moving "
             "mail back remove it " + _EXPUNGE_RISK)), exit_codes=True),
    "watch": _Command(_cmd_watch, "stay connected and classify new mail as it arrives (dry "
                      "run unless --apply)", ("connection",), (
        _Opt("--folder", action="append", type=_folder_name, help="folder to watch "
             "(repeatable; default INBOX); the first waits with IDLE, the others are polled"),
        _Opt("--apply"), _Opt("--json", help="one JSON object per message"),
        _Opt("--batch-size"), _Opt("--allow-expunge"),
        (_Opt("--all", action="store_true", help="classify every message again "
                    "first, then watch (also starts a folder that has no state yet)"),
               _Opt("--new-only", action="store_true", help="classify only mail that "
                    "arrives from now on (also starts a folder that has no state yet)")),
        _Opt("--daily-budget", help="pause catching up until 00:00 UTC before downloading "
             "more than SIZE a day for this account (default: 2G; 0: no limit)"),
        _Opt("--max-new-folders", help="create at most N folders or labels a day (UTC); "
             "mail that needs more waits for the next day (default: %(default)s)"),
        _Opt("--interval", type=_timeout_seconds, default=DEFAULT_POLL_INTERVAL,
             help="seconds between polls of the other folders, and of every folder when the "
             "server lacks IDLE (default: %(default)s)"),
        _Opt("--idle-interval", type=_timeout_seconds, default=IDLE_REISSUE,
             help=f"seconds before IDLE is re-issued (default: %(default)s; at most "
             f"{IDLE_MAX_SECONDS})"), _Opt("--jobs")), exit_codes=True),
    "check": _Command(_cmd_check, "validate and summarise a rules file, offline",
                      options=(_Opt("rules_file", metavar="RULES"), _Opt("--run-programs"))),
    "test": _Command(_cmd_test, "classify .eml files, an mbox or a Maildir offline", options=(
        _Opt("rules_file", metavar="RULES"), _Opt("files", metavar="FILE", nargs="+"))),
    "doctor": _Command(_cmd_doctor, "check what the server can and cannot do for the rules "
                       "(read-only)", ("connection",), (
        _Opt("--folder", action="append", type=_folder_name, help="folder the rules would "
             "classify (repeatable; default: the rules' folders, else INBOX)"),
        _Opt("--json", help="the table as one JSON object"), _Opt("--allow-expunge"),
        _Opt("--daily-budget", help="the daily download budget to check against (default: "
             "2G; 0: none)")), exit_codes=True),
    "labels": _Command(_cmd_labels, "list folders and labels with their special-use "
                       "attributes", ("connection",)),
    "folders": _Command(_cmd_labels, "list folders and labels with their special-use "
                        "attributes", ("connection",)),
    "auth": _Command(_cmd_auth, "sign in to Google with OAuth2 in a browser and store a "
                     "refresh token for --auth xoauth2", options=(
        _Opt("--user", help=f"the Google account (default: ${USER_ENV} or the rules' "
             f"[account])"),
        _Opt("--client-secret-file", metavar="JSON", help="your OAuth client (type 'Desktop "
             "app') as downloaded from Google Cloud Console; default: the rules' "
             "oauth_client_file or oauth_client_id/oauth_client_secret"),
        _Opt("--port", type=_any_port, default=0, help="loopback port for Google's redirect, "
             "e.g. one forwarded with ssh -L (default: any free port)"),
        _Opt("--no-browser", action="store_true", help="only print the address to open; do "
             "not start a browser"),
        _Opt("--rules", help="rules file whose [account] (or [[account]]) names the user and "
             "client"),
        _Opt("--account", action="append", metavar="NAME", help="the [[account]] of the rules "
             "file to sign in for (needed when it has several)")),
        exit_codes=True, data=True),
    "demo": _Command(_cmd_demo, "classify a built-in sample of mail offline, as a dry run "
                     "would show it", options=(
        _Opt("--rules", help="rules file (default: the built-in rules)"),
        _Opt("--summary", action="store_true", help="only the totals"), _Opt("--run-programs"))),
    "init": _Command(_cmd_init, "write the starter rules file", options=(
        _Opt("path", nargs="?", help="where (default: the default rules path)"),
        _Opt("--force", action="store_true", help="overwrite an existing file")),
        keep_going=True),
    "import-filters": _Command(_cmd_import_filters, "turn Gmail's filter export "
                               "(mailFilters.xml) into rules", ("output",), (
        _Opt("filters_file", metavar="FILE", help="mailFilters.xml from Gmail's Settings -> "
             "Filters and Blocked Addresses -> Export"),)),
    "export": _Command(_cmd_export, "compile a rules file to Sieve, Gmail filters or JSON; "
                       "with connection options, Sieve with the server's folder names "
                       "(read-only)", ("connection",), (
        _Opt("rules_file", metavar="RULES"),
        _Opt("--format", choices=EXPORT_FORMATS, required=True, help="sieve (RFC 5228, for the "
             "server to run at delivery), gmail (filter XML for Gmail's Import filters) or "
             "json (the rules as data)"),
        _Opt("-o", "--output", metavar="FILE", help="write here, readable by you only "
             "(default: standard output)"),
        _Opt("--force", action="store_true", help="overwrite an existing FILE"),
        _Opt("--partial", action="store_true", help="when a rule cannot be exported exactly, "
             "write the rules before it instead of refusing")), exit_codes=True),
    "suggest": _Command(_cmd_suggest, "read a folder's headers (read-only) and propose rules",
                        ("connection", "output"), (
        _Opt("--folder", default="INBOX", type=_folder_name, help="folder to read (default: "
             "INBOX)"),
        _Opt("--top", type=_positive, default=10, help="at most N rules of each kind "
             "(default: %(default)s)"),
        _Opt("--limit", type=_positive, help="only the newest N messages"),
        _Opt("--batch-size"))),
    "why": _Command(_cmd_why, "show every rule's verdict on one message, and the outcome "
                    "(read-only)", ("connection",), (
        _Opt("message", metavar="MESSAGE", nargs="?", help="a Message-ID (angle brackets "
             "optional), or an .eml file (offline; an existing file wins)"),
        _Opt("--uid", metavar="FOLDER:UID", help="the message with this UID instead"),
        _Opt("--folder", default="INBOX", type=_folder_name, help="where to look for the "
             "Message-ID (default: INBOX)"),
        _Opt("--json", help="one JSON object per message"))),
    "diff": _Command(_cmd_diff, "show which messages two rules files decide differently "
                     "(read-only)", ("connection",), (
        _Opt("old_rules", metavar="OLD"), _Opt("new_rules", metavar="NEW"),
        _Opt("files", metavar="FILE", nargs="*", help=".eml files, mbox or Maildir (offline); "
             "none: the server's folders"),
        _Opt("--folder", action="append", type=_folder_name, help="folder to compare on "
             "(repeatable; default INBOX)"),
        _Opt("--since"),
        _Opt("--batch-size"),
        _Opt("--json", help="one JSON object per changed message, then a summary"))),
    "learn": _Command(_cmd_learn, "learn rules from how your mail is already filed, with "
                      "how often each was right (read-only)", ("connection", "output"), (
        _Opt("--folder", action="append", type=_folder_name, help="only these folders "
             "(repeatable; not Gmail, where All Mail's labels are read)"),
        _Opt("--exclude", action="append", type=_folder_name, help="leave this folder out "
             "(repeatable)"),
        _Opt("--from", dest="from_path", metavar="PATH", help="learn offline from a Maildir "
             "tree, an mbox per label, or a Google Takeout mbox"),
        _Opt("--min-precision", type=float, default=0.97, help="keep rules at least this "
             "right on the newest mail (default: %(default)s)"),
        _Opt("--min-support", type=_positive, default=5, help="keep rules that file at "
             "least N of the newest messages (default: %(default)s)"),
        _Opt("--holdout", default="20%", help="judge on the newest share (20%%) or age (30d) "
             "of the mail (default: %(default)s)"),
        _Opt("--max-rules", type=_positive, default=50, help="at most N rules (default: "
             "%(default)s)"),
        _Opt("--limit", type=_positive, default=DEFAULT_LEARN_LIMIT, help="only the newest N "
             "messages (default: %(default)s)"),
        _Opt("--since", help="only mail since a date (YYYY-MM-DD) or an age: 7d, 2w, 6m, 1y"),
        _Opt("--keep-examples", action="store_true", help="keep real addresses and "
             "subjects in the [[test]] tables"),
        _Opt("--batch-size"))),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, from _COMMANDS; ``python gmail_classify.py`` alone means ``run``."""
    parents = _parent_parsers()
    parser = argparse.ArgumentParser(
        prog="gmail_classify.py", parents=[parents["common"]],
        description="Sort a Gmail (or any IMAP) mailbox with keyword and regex rules. "
                    "Without a subcommand, 'run' is meant. Dry run unless --apply.",
        epilog=QUICK_HELP + EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in _COMMANDS.items():
        extra: Dict[str, Any] = {}
        if command.exit_codes:
            extra = dict(epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        child = sub.add_parser(name, help=command.help, **extra,
                               parents=[parents[p] for p in ("common",) + command.parents])
        for option in command.options:   # a tuple: options that exclude each other
            together = isinstance(option, tuple)
            target = child.add_mutually_exclusive_group() if together else child
            for each in option if together else (option,):
                target.add_argument(*each.flags, **{**_SHARED_OPTIONS.get(each.flags[0], {}),
                                                    **each.settings})
    return parser


# main()'s parser, built once per process (a build costs some 6 ms, and a script or a
# test may call main() thousands of times), and again only when _COMMANDS gains or loses
# a row.  Parsing does not change a parser, so threads may share it.
_MAIN_PARSER: Optional[Tuple[List[Tuple[str, int]], argparse.ArgumentParser]] = None


def _main_parser() -> argparse.ArgumentParser:
    global _MAIN_PARSER
    key = [(name, id(command)) for name, command in _COMMANDS.items()]
    built = _MAIN_PARSER
    if built is None or built[0] != key:
        built = _MAIN_PARSER = (key, build_parser())
    return built[1]


def _options_with_values(parser: argparse.ArgumentParser) -> set[str]:
    """Every option of any subcommand that takes a value (``--folder``, ``-o``)."""
    commands = next(action for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction))
    return {flag for child in commands.choices.values() for action in child._actions
            if action.nargs != 0 for flag in action.option_strings}


# The output formats, chosen by the option of the same name (--json); text by default.
_OUTPUT_FORMATS = {"text": _Output, "json": _JsonOutput}


def _open_output(args: argparse.Namespace, stream: Optional[TextIO]) -> _Output:
    """The command's standard output.  An --apply (and init) must finish and record its
    work even when nobody reads any more (``keep_going``); rules written to standard output
    and the sign-in address are data, like JSON."""
    command = _COMMANDS[args.command]
    keep_going = command.keep_going or bool(getattr(args, "apply", False))
    fmt = next((name for name in _OUTPUT_FORMATS if getattr(args, name, False)), "text")
    out = _OUTPUT_FORMATS[fmt](stream, keep_going, quiet=args.quiet)
    # Rules written to standard output (no -o) are data too.
    out.data = out.data or command.data or (hasattr(args, "output") and not args.output)
    return out


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None) -> int:
    """Run the command line; returns the exit code (see EXIT_CODES_HELP).

    Signals (see _Signals): a command ended by one returns 128 + its number and leaves the
    signal to the program's own exit (_exit_program), never to a caller of main(): a
    vendoring script or a test keeps its process.  A closed standard output (see _Output):
    an --apply finishes its work and records; a listing ends early; the exit code is what
    the work earned, or 141 when the output was data (--json, rules, the auth address)
    and nothing else went wrong.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _main_parser()
    argv = _subcommand_first(argv, parser)
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", 0)
    args.quiet = getattr(args, "quiet", False)
    guarded = _open_output(args, out or sys.stdout)
    errors, sys.stderr = sys.stderr, _Output(sys.stderr, keep_going=True)
    args.stop = Stop()
    args.signals = _Signals(args.stop)
    try:
        levels = (logging.WARNING, logging.INFO, logging.DEBUG)     # by -v count
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PrintableFormatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.ERROR if args.quiet else levels[max(0, min(args.verbose, 2))])
        log.propagate = False
        with args.signals, _collecting_less():
            code = _dispatch(args, guarded)
            with contextlib.suppress(_OutputClosed):    # the last flush: it never raises
                guarded.flush()
    finally:
        sys.stderr = errors
    return EXIT_OUTPUT_CUT if guarded.gone and guarded.data and code == EXIT_OK else code


# The young generation's collection threshold while a command runs (Python's own: 700).
GC_YOUNG_THRESHOLD = 10000


@contextlib.contextmanager
def _collecting_less() -> Iterator[None]:
    """A run makes tens of thousands of short-lived objects a batch, nearly all freed by
    reference counting, and Python's cycle collector walked them some 600 times in a
    10,000-message run (0.15 s, a tenth of its CPU).  While a command runs, the young
    generation is collected after GC_YOUNG_THRESHOLD new objects, and what exists before
    it (modules, compiled patterns) is left out of every collection (gc.freeze).  These
    are the process's settings: put back afterwards, for a program that calls main()."""
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    if not frozen:          # a caller's own frozen objects stay as the caller left them
        gc.freeze()
    if before[0]:           # 0: the caller turned automatic collection off
        gc.set_threshold(max(before[0], GC_YOUNG_THRESHOLD), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        if not frozen:
            gc.unfreeze()


def _dispatch(args: argparse.Namespace, out: TextIO) -> int:
    """The command, its errors as one line each on stderr, and its exit code."""
    try:
        return _COMMANDS[args.command].run(args, out)
    except _OutputClosed:
        return EXIT_OK                  # a listing nobody reads any more
    except (StopRequested, KeyboardInterrupt) as exc:
        sys.stderr.write("interrupted\n")
        return _signal_exit(getattr(exc, "signum", None) or args.stop.signum)
    except Exception as exc:  # a bug too: said briefly, with the traceback under -v
        return _say_error(exc, args.verbose)


def _subcommand_first(argv: List[str], parser: argparse.ArgumentParser) -> List[str]:
    """Put the subcommand first (``--user x labels`` -> ``labels --user x``); none means run.

    Every subcommand accepts the options, so their order does not matter to the user.
    """
    with_values = _options_with_values(parser)
    skip = False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in ("-h", "--help", "--version") and not any(a in _COMMANDS for a in argv):
            return argv
        elif arg.startswith("-"):
            skip = arg in with_values
        elif arg in _COMMANDS:
            return [arg] + argv[:index] + argv[index + 1:]
        else:
            break
    return ["run"] + argv


def _exit_program(code: int) -> None:
    """The program's own exit.  After a command a signal ended (129, 130, 143) the signal
    is raised again with its default action, once the output is flushed, so that the shell
    sees 128 + its number and systemd a stop by the signal it sent.  Only the program
    itself does this: main() returns the code to whoever called it."""
    signum = {EXIT_INTERRUPTED: "SIGINT", EXIT_TERMINATED: "SIGTERM",
              EXIT_HANGUP: "SIGHUP"}.get(code)
    if signum and hasattr(signal, signum) and os.name == "posix":
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.flush()
        number = getattr(signal, signum)
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    sys.exit(code)


if __name__ == "__main__":
    _exit_program(main())
