"""The protocol core (mpop3/protocol/core.py) on its own: no socket, no
event loop, no thread. Each case is a script of (input, expected actions):
an input is a command line, or an event (the outcome of an action), and the
actions are what the core must answer, byte for byte."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import replies_in

from mpop3.errors import BadMailboxName, LoginDelay, MailboxInUse, StoragePermError, StorageTempError
from mpop3.protocol import replies
from mpop3.protocol._parser import TOO_LONG
from mpop3.protocol.commands import AUTHORIZATION, CLOSED, COMMANDS, TRANSACTION, UPDATE
from mpop3.protocol.core import (
    APOP,
    CLOSE,
    CRAM_MD5,
    LOAD_UIDS,
    START_TLS,
    CheckLogin,
    Commit,
    OpenMailbox,
    Policy,
    SendMessage,
    SessionCore,
    Signal,
)

R = replies
SASL_CHALLENGE = re.compile(rb"\+ [A-Za-z0-9+/]*={0,2}\r\n")
SIZES = [100, 200, 300]


def core(**options):
    defaults = dict(cleartext_ok=True, timestamp=b"<1.2@host>")
    return SessionCore(
        Policy(max_bad_commands=4, max_login_failures=2, cram_md5=True), "192.0.2.7", **{**defaults, **options}
    )


def event(name, *args):
    return (name, args)


LOG_IN = [
    (b"USER bob", [R.OK_USER.wire]),
    (b"PASS secret", [CheckLogin(b"bob", b"secret")]),
    (event("login_checked", "bob"), [OpenMailbox("bob")]),
    (event("mailbox_opened", SIZES, True), [b"+OK maildrop has 3 messages (600 octets)\r\n"]),
]


def play(script, session=None):
    session = session or core()
    for step, expected in script:
        if step is TOO_LONG or isinstance(step, bytes):
            got = session.command(step)
        else:
            got = getattr(session, step[0])(*step[1])
        assert got == expected, step
    return session


# --- AUTHORIZATION: each command, and what the core asks for -----------------------

AUTHORIZATION_CASES = {
    "USER": [(b"USER bob", [R.OK_USER.wire]), (b"USER", [R.ERR_USAGE["USER"].wire])],
    "PASS": [
        (b"PASS x", [R.ERR_PASS_FIRST.wire]),
        (b"USER bob", [R.OK_USER.wire]),
        (b"PASS two words", [CheckLogin(b"bob", b"two words")]),
    ],
    "APOP": [(b"APOP bob 0123", [CheckLogin(b"bob", b"0123", APOP, b"<1.2@host>")])],
    "AUTH": [(b"AUTH PLAIN AGJvYgBwdw==", [CheckLogin(b"bob", b"pw")])],
    "STLS": [(b"STLS", [R.ERR_NO_TLS.wire])],
    "CAPA": [(b"CAPA", [R.capabilities(user=True, sasl=["PLAIN", "LOGIN", "CRAM-MD5"])])],
    "QUIT": [(b"QUIT", [R.OK_BYE.wire, CLOSE])],
    "STAT": [(b"STAT", [R.ERR_NOT_NOW.wire])],
    "LIST": [(b"LIST", [R.ERR_NOT_NOW.wire]), (b"LIST x", [R.ERR_USAGE["LIST"].wire])],
    "RETR": [(b"RETR 1", [R.ERR_NOT_NOW.wire])],
    "DELE": [(b"DELE 1", [R.ERR_NOT_NOW.wire])],
    "NOOP": [(b"NOOP", [R.ERR_NOT_NOW.wire])],  # RFC 1939: TRANSACTION only
    "RSET": [(b"RSET", [R.ERR_NOT_NOW.wire])],
    "TOP": [(b"TOP 1 1", [R.ERR_NOT_NOW.wire])],
    "UIDL": [(b"UIDL", [R.ERR_NOT_NOW.wire])],
}

TRANSACTION_CASES = {
    "STAT": [(b"STAT", [b"+OK 3 600\r\n"])],
    "LIST": [
        (b"LIST", [b"+OK 3 messages (600 octets)\r\n1 100\r\n2 200\r\n3 300\r\n.\r\n"]),
        (b"LIST 2", [b"+OK 2 200\r\n"]),
        (b"LIST 4", [R.ERR_NO_SUCH_MESSAGE.wire]),
        (b"LIST 0", [R.ERR_NO_SUCH_MESSAGE.wire]),
    ],
    "RETR": [(b"RETR 2", [SendMessage(1, None, b"+OK 200 octets\r\n")]), (event("message_sent"), [])],
    "TOP": [(b"TOP 3 0", [SendMessage(2, 0, R.OK_TOP)]), (event("message_sent"), [])],
    "DELE": [
        (b"DELE 1", [R.OK_DELETED.wire]),
        (b"DELE 1", [R.ERR_DELETED.wire]),
        (b"RETR 1", [R.ERR_DELETED.wire]),
        (b"STAT", [b"+OK 2 500\r\n"]),
        (b"LIST", [b"+OK 2 messages (500 octets)\r\n2 200\r\n3 300\r\n.\r\n"]),
    ],
    "RSET": [(b"DELE 3", [R.OK_DELETED.wire]), (b"RSET", [b"+OK maildrop has 3 messages (600 octets)\r\n"])],
    "NOOP": [(b"NOOP", [R.OK_NOOP.wire])],
    "UIDL": [
        (b"UIDL", [LOAD_UIDS]),
        (event("uids_loaded", ["a", "b", b"c"]), [b"+OK unique-id listing follows\r\n1 a\r\n2 b\r\n3 c\r\n.\r\n"]),
        (b"UIDL 2", [b"+OK 2 b\r\n"]),
    ],  # loaded once
    "CAPA": [(b"CAPA", [R.capabilities(user=True, sasl=["PLAIN", "LOGIN", "CRAM-MD5"])])],
    "QUIT": [
        (b"DELE 2", [R.OK_DELETED.wire]),
        (b"QUIT", [Commit((1,))]),
        (event("committed", None), [b"+OK mpop3 signing off (1 deleted, 2 left)\r\n", CLOSE]),
    ],
    "USER": [(b"USER bob", [R.ERR_NOT_NOW.wire])],
    "PASS": [(b"PASS x", [R.ERR_NOT_NOW.wire])],
    "APOP": [(b"APOP a b", [R.ERR_NOT_NOW.wire])],
    "AUTH": [(b"AUTH PLAIN", [R.ERR_NOT_NOW.wire])],
    "STLS": [(b"STLS", [R.ERR_NOT_NOW.wire])],
}


def test_every_command_has_its_cases():
    """Adding a command to the table means adding its lines here."""
    verbs = {command.verb for command in COMMANDS}
    assert set(AUTHORIZATION_CASES) == verbs and set(TRANSACTION_CASES) == verbs


@pytest.mark.parametrize("verb", sorted(AUTHORIZATION_CASES))
def test_authorization(verb):
    play(AUTHORIZATION_CASES[verb])


@pytest.mark.parametrize("verb", sorted(TRANSACTION_CASES))
def test_transaction(verb):
    play(LOG_IN + TRANSACTION_CASES[verb])


def test_greeting_carries_the_apop_timestamp():
    assert core().greeting() == b"+OK mpop3 ready <1.2@host>\r\n"
    assert core(timestamp=None).greeting() == b"+OK mpop3 ready\r\n"
    assert play([(b"APOP bob 0123", [R.ERR_NO_APOP.wire])], core(timestamp=None))


def test_busy_while_an_action_is_outstanding():
    session = core()
    play(LOG_IN[:2], session)
    assert session.busy
    play([(event("login_checked", "bob"), [OpenMailbox("bob")])], session)
    assert session.busy and session.state is AUTHORIZATION
    play(LOG_IN[3:], session)
    assert not session.busy and session.state is TRANSACTION
    play([(b"RETR 1", [SendMessage(0, None, b"+OK 100 octets\r\n")])], session)
    assert session.busy
    play([(event("message_sent"), []), (b"QUIT", [Commit(())])], session)
    assert session.busy and session.state is UPDATE


# --- logins that fail or are refused ---------------------------------------------------


def test_failed_logins_answer_after_their_delay_and_the_last_closes():
    session = play(
        [
            (b"USER bob", [R.OK_USER.wire]),
            (b"PASS wrong", [CheckLogin(b"bob", b"wrong")]),
            (event("login_failed"), [R.ERR_AUTH.wire]),
            (b"APOP bob 00", [CheckLogin(b"bob", b"00", APOP, b"<1.2@host>")]),
        ]
    )
    assert session.last_chance()
    play([(event("login_failed"), [R.ERR_TOO_MANY_FAILURES.wire, CLOSE])], session)
    assert session.state is CLOSED


@pytest.mark.parametrize(
    "error, reply",
    [
        (LoginDelay(), R.ERR_LOGIN_DELAY),
        (MailboxInUse("x"), R.ERR_IN_USE),
        (StorageTempError("x"), R.ERR_TEMP),
        (StoragePermError("x"), R.ERR_PERM),
        (BadMailboxName("../x"), R.ERR_BAD_MAILBOX),
        (RuntimeError("a module's bug"), R.ERR_INTERNAL),
    ],
)
def test_refused_logins_leave_the_session_in_authorization(error, reply):
    session = play(LOG_IN[:2] + [(event("login_refused", error), [reply.wire]), (b"USER bob", [R.OK_USER.wire])])
    assert session.state is AUTHORIZATION and not session.busy


def test_a_mailbox_that_does_not_open_is_refused_too():
    play(
        LOG_IN[:3] + [(event("login_refused", MailboxInUse("x")), [R.ERR_IN_USE.wire]), (b"STAT", [R.ERR_NOT_NOW.wire])]
    )


# --- limits -------------------------------------------------------------------------


def test_bad_commands_in_a_row_close_the_session():
    play(
        [
            (b"FOO", [R.ERR_UNKNOWN.wire]),
            (b"STAT", [R.ERR_NOT_NOW.wire]),
            (b"NOOP", [R.ERR_NOT_NOW.wire]),
            (b"USER bob", [R.OK_USER.wire]),  # a good one resets the count
            (b"FOO", [R.ERR_UNKNOWN.wire]),
            (b"", [R.ERR_UNKNOWN.wire]),
            (b"NO\0OP", [R.ERR_UNKNOWN.wire]),
            (b"LIST 4294967297", [R.ERR_TOO_MANY_BAD.wire, CLOSE]),
        ]
    )


def test_a_second_over_long_line_closes_the_session():
    play(
        [
            (TOO_LONG, [R.ERR_TOO_LONG.wire]),
            (b"NOOP", [R.ERR_NOT_NOW.wire]),
            (TOO_LONG, [R.ERR_TOO_LONG_BYE.wire, CLOSE]),
        ]
    )


# --- SASL (RFC 5034) ----------------------------------------------------------------


def test_sasl_plain_without_an_initial_response():
    play([(b"AUTH PLAIN", [b"+ \r\n"]), (b"AGJvYgBwdw==", [CheckLogin(b"bob", b"pw")])])


def test_sasl_login():
    play(
        [
            (b"auth login", [b"+ VXNlcm5hbWU6\r\n"]),
            (b"Ym9i", [b"+ UGFzc3dvcmQ6\r\n"]),
            (b"cHc=", [CheckLogin(b"bob", b"pw")]),
        ]
    )


def test_sasl_cram_md5_and_cancelling():
    session = core()
    [challenge] = session.command(b"AUTH CRAM-MD5")
    assert challenge.startswith(b"+ ") and challenge.endswith(b"\r\n")
    play([(b"*", [b"-ERR authentication cancelled\r\n"]), (b"NOOP", [R.ERR_NOT_NOW.wire])], session)
    session.command(b"AUTH CRAM-MD5")
    [action] = session.command(b"Ym9iIDAxMjM0NTY3ODlhYmNkZWYwMTIzNDU2Nzg5YWJjZGVm")  # bob 0123...def
    assert action.method == CRAM_MD5 and action.user == b"bob" and action.challenge.startswith(b"<")


def test_malformed_sasl_counts_as_a_bad_command():
    play([(b"AUTH PLAIN", [b"+ \r\n"]), (b"!!", [b"-ERR malformed base64 in the SASL exchange\r\n"])])


# --- the cleartext policy and STLS -------------------------------------------------------


def test_without_cleartext_passwords_user_and_plain_are_refused():
    session = play(
        [
            (b"USER bob", [R.ERR_CLEARTEXT.wire]),
            (b"PASS x", [R.ERR_CLEARTEXT.wire]),
            (b"AUTH PLAIN", [R.ERR_CLEARTEXT.wire]),
            (b"CAPA", [R.capabilities(user=False, stls=True, sasl=["CRAM-MD5"])]),
        ],
        core(cleartext_ok=False, tls_available=True),
    )
    play([(b"STLS", [R.OK_STLS.wire, START_TLS])], session)
    assert session.busy
    play(
        [
            (event("tls_started"), []),
            (b"STLS", [R.ERR_TLS_ACTIVE.wire]),
            (b"USER bob", [R.OK_USER.wire]),
            (b"CAPA", [R.capabilities(user=True, sasl=["PLAIN", "LOGIN", "CRAM-MD5"])]),
        ],
        session,
    )
    assert session.secure


def test_stls_forgets_a_user_given_before_it():
    session = core(tls_available=True)
    play(
        [
            (b"USER bob", [R.OK_USER.wire]),
            (b"STLS", [R.OK_STLS.wire, START_TLS]),
            (event("tls_started"), []),
            (b"PASS x", [R.ERR_PASS_FIRST.wire]),
        ],
        session,
    )


# --- storage trouble while serving ---------------------------------------------------------


def test_a_storage_failure_before_sending_is_an_error_a_temporary_one_ends_the_session():
    session = play(
        LOG_IN
        + [
            (b"RETR 1", [SendMessage(0, None, b"+OK 100 octets\r\n")]),
            (event("storage_failed", StoragePermError("x")), [R.ERR_PERM.wire]),
            (b"RETR 1", [SendMessage(0, None, b"+OK 100 octets\r\n")]),
            (event("storage_failed", StorageTempError("x")), [R.ERR_CHANGED.wire, CLOSE]),
        ]
    )
    assert session.state is CLOSED


def test_unique_ids_that_do_not_match_the_messages_end_the_session():
    play(LOG_IN + [(b"UIDL", [LOAD_UIDS]), (event("uids_loaded", ["a"]), [R.ERR_CHANGED.wire, CLOSE])])


def test_no_uidl_when_the_mailbox_has_none():
    play(
        LOG_IN[:3]
        + [
            (event("mailbox_opened", [5], False), [b"+OK maildrop has 1 message (5 octets)\r\n"]),
            (b"UIDL", [R.ERR_NO_UIDL.wire]),
            (b"CAPA", [R.capabilities(uidl=False, user=True, sasl=["PLAIN", "LOGIN", "CRAM-MD5"])]),
        ]
    )


def test_a_failed_commit_is_an_error_and_the_end():
    play(
        LOG_IN
        + [
            (b"DELE 1", [R.OK_DELETED.wire]),
            (b"QUIT", [Commit((0,))]),
            (event("committed", StorageTempError("disk full")), [R.ERR_TEMP.wire, CLOSE]),
        ]
    )


# --- the seam: handing a session over after login ---------------------------------------------


def test_a_session_handed_over_after_login_goes_on_as_if_it_had_not_moved():
    here = play(LOG_IN[:3])
    handover = here.handover()
    assert (handover.user, handover.mailbox, handover.peer, handover.secure) == (b"bob", "bob", "192.0.2.7", False)
    there = SessionCore.resume(Policy(max_bad_commands=4, max_login_failures=2, cram_md5=True), handover)
    stayed = play(LOG_IN)
    rest = LOG_IN[3:] + TRANSACTION_CASES["LIST"] + TRANSACTION_CASES["QUIT"]
    play(rest, there)
    play(rest[1:], stayed)
    assert there.state is stayed.state is CLOSED


def test_a_core_refusing_unknown_events_is_impossible_to_confuse_with_replies():
    """Every action is bytes or one of the core's action types."""
    session = play(LOG_IN)
    for line in (b"STAT", b"LIST", b"UIDL", b"RETR 1", b"QUIT"):
        for action in session.command(line):
            assert isinstance(action, (bytes, Signal, CheckLogin, OpenMailbox, SendMessage, Commit))
        if session.busy:
            break


# --- any input, no loop ----------------------------------------------------------------------

LINES = st.sampled_from(
    [
        b"USER bob",
        b"PASS secret",
        b"PASS wrong",
        b"STAT",
        b"LIST",
        b"LIST 1",
        b"LIST 0",
        b"RETR 1",
        b"RETR 9",
        b"TOP 1 0",
        b"TOP 2 1",
        b"DELE 1",
        b"DELE 3",
        b"RSET",
        b"NOOP",
        b"UIDL",
        b"UIDL 2",
        b"CAPA",
        b"QUIT",
        b"STLS",
        b"AUTH PLAIN",
        b"AUTH LOGIN",
        b"AUTH CRAM-MD5",
        b"*",
        b"AGJvYgBzZWNyZXQ=",
        b"Ym9i",
        b"APOP bob 00000000000000000000000000000000",
        b"LIST 4294967297",
        b"",
        b"\0",
        b"x" * 70,
        TOO_LONG,
    ]
)


def run_actions(session, actions, out):
    """Answer every action at once, as a runner with a mailbox of three
    messages would; returns False once the session is closed."""
    pending = list(actions)
    while pending:
        action = pending.pop(0)
        if isinstance(action, bytes):
            out.append(action)
        elif action is CLOSE:
            assert session.state is CLOSED
            return False
        elif isinstance(action, CheckLogin):
            ok = action.secret == b"secret"
            pending += session.login_checked("bob") if ok else session.login_failed()
        elif isinstance(action, OpenMailbox):
            pending += session.mailbox_opened(SIZES, True)
        elif action is LOAD_UIDS:
            pending += session.uids_loaded(["a", "b", "c"])
        elif isinstance(action, SendMessage):
            assert 0 <= action.index < len(SIZES)
            out.append(action.head + b"body\r\n.\r\n")
            pending += session.message_sent()
        elif action is START_TLS:
            pending += session.tls_started()
        elif isinstance(action, Commit):
            assert all(0 <= i < len(SIZES) for i in action.deleted)
            pending += session.committed(None)
        else:
            raise AssertionError(action)
    assert not session.busy
    return True


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINES, max_size=30), st.booleans())
def test_any_lines_in_any_order(lines, tls):
    session = core(tls_available=tls, cleartext_ok=False)
    out = [session.greeting()]
    for line in lines:
        if not run_actions(session, session.command(line), out):
            break
        assert session.state in (AUTHORIZATION, TRANSACTION)
    challenges = [reply for reply in out if reply.startswith(b"+ ")]  # SASL (RFC 5034 section 4)
    assert all(SASL_CHALLENGE.fullmatch(reply) for reply in challenges), challenges
    replies_in(b"".join(reply for reply in out if not reply.startswith(b"+ ")))
