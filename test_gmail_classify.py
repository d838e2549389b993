"""Tests for gmail_classify: the wire format, the connection against a fake Gmail IMAP
server on loopback (no network, no Google account), the rule engine, the pipeline and the
command line.  Run with ``python -m unittest -v test_gmail_classify``.

The fake server (FakeGmail, first section) models Gmail's folders as views over labels,
and can also act as a plain RFC 3501 server; it records every command it receives and
injects faults (BYE, drops, resets, delays, NO/BAD, garbage) at a named or n-th command.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import mailbox
import os
import shutil
import tempfile
import unittest
from datetime import date, datetime, timedelta, timezone
from typing import Optional, Tuple
from unittest import mock

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


# --- Messages and the rule engine ---------------------------------------------------------

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


# --- Validation --------------------------------------------------------------------------

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
             'rules.toml: rule 2 ("Newsletters"): unknown key \'lable\'; did you mean \'label\'? '
             "(known keys: " + ", ".join(gc.RULE_KEYS) + ")"),
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
            ("size with a space and unit",
             {"rule": [{"name": "R", "subject": "a", "label": "x"}] * 4
              + [{"name": "Old and big", "larger_than": "5 MB", "trash": True}]},
             'rules.toml: rule 5 ("Old and big"): larger_than: expected a size like 500K, '
             '5M or 1G, got "5 MB"'),
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
             "rules.toml: unknown key 'rules'; did you mean 'rule'? (known keys: rule, account)"),
            ("continue not bool",
             {"rule": [{"name": "Bank", "from": "a", "star": True, "continue": "yes"}]},
             'rules.toml: rule 1 ("Bank"): continue: expected true or false, got "yes"'),
            ("nested wrong type",
             {"rule": [{"name": "Bank", "any": [{"subject": "a"}, {"from": 5}], "star": True}]},
             'rules.toml: rule 1 ("Bank"): any[2].from: expected a string or a list of '
             "strings, got 5"),
            ("nested unknown key",
             {"rule": [{"name": "Bank", "all": [{"subject": "a"}, {"form": "x"}], "star": True}]},
             'rules.toml: rule 1 ("Bank"): all[2]: unknown key \'form\'; did you mean \'from\'? '
             "(known conditions: " + ", ".join(gc.CONDITION_KEYS) + ")"),
            ("action inside not",
             {"rule": [{"name": "R", "subject": "a", "not": {"label": "x"}, "star": True}]},
             'rules.toml: rule 1 ("R"): not: \'label\' is not a condition; put it at the top '
             "level of the rule (only conditions go inside any / all / not)"),
            ("deeply nested bad size",
             {"rule": [{"name": "R", "not": {"any": [{"larger_than": "big"}]}, "star": True}]},
             'rules.toml: rule 1 ("R"): not.any[1].larger_than: expected a size like 500K, '
             '5M or 1G, got "big"'),
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
             "(printable ASCII without spaces or ':')"),
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
            ({"usr": "me"}, "rules.json: account: unknown key 'usr'; did you mean 'user'? "
                            "(known keys: " + ", ".join(gc.ACCOUNT_KEYS) + ")"),
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


class LoadRulesTest(TempDirMixin, unittest.TestCase):
    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.make_dir(), name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path

    @unittest.skipIf(tomllib is None, "tomllib needs Python 3.11+")
    def test_error_gives_line_and_column_for_invalid_toml(self):
        path = self.write("rules.toml", '[[rule]]\nname = "x"\nsubject = \n')
        with self.assertRaises(RulesError) as caught:
            load_rules(path)
        self.assertEqual(str(caught.exception), f"{path}: line 3, column 11: invalid TOML: Invalid value")

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

    def test_error_asks_for_json_when_tomllib_missing(self):
        path = self.write("rules.toml", EXAMPLE_TOML)
        with mock.patch.object(gc, "tomllib", None):
            with self.assertRaises(RulesError) as caught:
                load_rules(path)
        self.assertEqual(str(caught.exception),
                         f"{path}: reading TOML needs Python 3.11 or newer (tomllib); "
                         "write the rules as JSON (rules.json) instead")

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

    @unittest.skipIf(tomllib is None, "tomllib needs Python 3.11+")
    def test_example_rules_same_from_toml_and_json(self):
        path = self.write("rules.toml", EXAMPLE_TOML)
        self.assertEqual(load_rules(path).rules, parse_rules(EXAMPLE_DOC).rules)


# --- Matching ----------------------------------------------------------------------------

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

    @unittest.skipIf(tomllib is None, "tomllib needs Python 3.11+")
    def test_example_rules_classify_from_toml(self):
        self.check(parse_rules(tomllib.loads(EXAMPLE_TOML), "rules.toml"))

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
    @unittest.skipIf(tomllib is None, "tomllib needs Python 3.11+")
    def test_starter_toml_equals_builtin_rules(self):
        parsed = parse_rules(tomllib.loads(STARTER_RULES_TOML), "built-in rules")
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


# --- Messages ----------------------------------------------------------------------------

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


if __name__ == "__main__":
    unittest.main()


# --- Wire format ---------------------------------------------------------------------------

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


# --- Command line, offline -----------------------------------------------------------------

def run_cli(*argv: str, env: Optional[dict] = None) -> Tuple[int, str, str]:
    """Run gc.main in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    environ = {k: v for k, v in os.environ.items()
               if k not in ("GMAIL_APP_PASSWORD", "GMAIL_USER", "GMAIL_OAUTH_TOKEN")}
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
        self.assertIn("1 rules, valid", out)
        self.assertIn("1. Receipts: label Receipts, archive", out)

    def test_bad_rules_give_one_line_and_exit_2(self):
        table = [
            ("typo.json", json.dumps({"rule": [{"name": "N", "subject": "x", "lable": "L"}]}),
             "rule 1 (\"N\")", "'lable'"),
            ("regex.json", json.dumps({"rule": [{"name": "R", "subject": "/a(b/", "star": True}]}),
             "bad regex", "subject"),
            ("syntax.json", '{"rule": [', "line 1, column", "JSON"),
            ("unit.json", json.dumps({"rule": [{"name": "U", "larger_than": "5 MB", "trash": True}]}),
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
        name = "rules.toml" if gc.tomllib is not None else "rules.json"
        expected = os.path.join(self.tmp, "gmail_classify", name)
        self.assertTrue(os.path.exists(expected))
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
