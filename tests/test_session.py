"""POP3 conformance over real TCP: every command in every state, argument
edge cases, DELE/RSET/QUIT semantics, pipelining, limits and abuse. The
server is the real one (mpop3/server.py on uvloop) with in-memory tables,
so each test can see exactly what was committed."""

import base64
import hashlib
import hmac
import poplib
import re
import socket
import threading
import time

import pytest
from pop_server import ServerThread, Wire, crlf_size, memory_tables, top_form, wait_for, wire_form

from mpop3.errors import MailboxInUse, StoragePermError, StorageTempError
from mpop3.protocol import replies
from mpop3.server import connection as connection_module

pytestmark = pytest.mark.usefixtures("loop_kind")  # every test on uvloop and on asyncio's loop

MESSAGES = [
    b"From: a@example.org\nSubject: one\n\nfirst body\n.starts with a dot\n..two dots\n",
    b"From: b@example.org\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\nline 3\r\n",
    b"Subject: three\n\n" + b"x" * 3000 + b"\n",
]
USERS = {"bob": "secret", "alice": "wonderland", "carol": "c"}


def boxes():
    return {"bob": list(MESSAGES), "alice": [b"Subject: hi\n\nhello alice\n"], "carol": []}


@pytest.fixture
def tables():
    return memory_tables(dict(USERS), boxes())


@pytest.fixture
def server(server_thread, tables):
    return server_thread(tables)


def wire(server):
    return Wire(server.port)


def logged_in(server, user="bob"):
    w = Wire(server.port)
    w.login(user, USERS[user])
    return w


def is_well_formed(line):
    return re.fullmatch(rb"(\+OK|-ERR) \S.*", line) is not None


# --- greeting and CAPA --------------------------------------------------------------


def test_greeting_has_a_unique_apop_timestamp(server):
    a, b = wire(server), wire(server)
    stamps = [re.fullmatch(rb"\+OK .* (<[^<>@]+@[^<>]+>)", w.greeting).group(1) for w in (a, b)]
    assert stamps[0] != stamps[1]


def test_capa_lists_exactly_what_works_before_and_after_login(server):
    expected = [b"TOP", b"UIDL", b"USER", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"SASL PLAIN LOGIN CRAM-MD5"]
    w = wire(server)
    assert w.cmd("CAPA") == b"+OK capability list follows"
    assert w.multi() == expected
    w.login("bob", "secret")
    assert w.cmd("capa").startswith(b"+OK")
    assert w.multi() == expected


def test_capa_announces_configured_extras(tables):
    extra = {"expire": "never", "login_delay": "900", "implementation": "mpop3-test"}
    with ServerThread(tables, extra) as s:
        w = Wire(s.port)
        w.cmd("CAPA")
        capa = w.multi()
    assert capa[-3:] == [b"EXPIRE NEVER", b"LOGIN-DELAY 900", b"IMPLEMENTATION mpop3-test"]


# --- every command in every state ---------------------------------------------------------

AUTH_STATE = {
    "STAT": replies.ERR_NOT_NOW,
    "LIST": replies.ERR_NOT_NOW,
    "LIST 1": replies.ERR_NOT_NOW,
    "RETR 1": replies.ERR_NOT_NOW,
    "DELE 1": replies.ERR_NOT_NOW,
    "NOOP": replies.ERR_NOT_NOW,
    "RSET": replies.ERR_NOT_NOW,
    "TOP 1 0": replies.ERR_NOT_NOW,
    "UIDL": replies.ERR_NOT_NOW,
    "UIDL 1": replies.ERR_NOT_NOW,
    "PASS secret": replies.ERR_PASS_FIRST,
    "FOO": replies.ERR_UNKNOWN,
    "STLS": replies.ERR_NO_TLS,
    "AUTH X-NONE": replies.ERR_NO_MECHANISM,
    "AUTH": replies.ERR_USAGE["AUTH"],
    "RETR abc": replies.ERR_USAGE["RETR"],
    "USER": replies.ERR_USAGE["USER"],
    "USER nobody": replies.OK_USER,
    "USER bob": replies.OK_USER,
}


@pytest.mark.parametrize("command", sorted(AUTH_STATE))
def test_authorization_state(server, command):
    w = wire(server)
    assert w.cmd(command) == AUTH_STATE[command].wire[:-2]
    assert w.cmd("QUIT") == replies.OK_BYE.wire[:-2]  # still usable, then a clean goodbye
    assert w.closed()


TRANSACTION_STATE = {
    "USER bob": replies.ERR_NOT_NOW.wire,
    "PASS secret": replies.ERR_NOT_NOW.wire,
    "APOP bob 0123456789abcdef0123456789abcdef": replies.ERR_NOT_NOW.wire,
    "STLS": replies.ERR_NOT_NOW.wire,
    "AUTH PLAIN": replies.ERR_NOT_NOW.wire,
    "STAT": b"+OK 3 %d\r\n" % sum(crlf_size(m) for m in MESSAGES),
    "LIST 0": replies.ERR_NO_SUCH_MESSAGE.wire,
    "LIST 4": replies.ERR_NO_SUCH_MESSAGE.wire,
    "LIST 2": b"+OK 2 %d\r\n" % crlf_size(MESSAGES[1]),
    "LIST 4294967297": replies.ERR_USAGE["LIST"].wire,
    "LIST 1 2": replies.ERR_USAGE["LIST"].wire,
    "RETR 99999": replies.ERR_NO_SUCH_MESSAGE.wire,
    "RETR abc": replies.ERR_USAGE["RETR"].wire,
    "RETR 0": replies.ERR_NO_SUCH_MESSAGE.wire,
    "RETR": replies.ERR_USAGE["RETR"].wire,
    "TOP 1 -1": replies.ERR_USAGE["TOP"].wire,
    "TOP 1": replies.ERR_USAGE["TOP"].wire,
    "TOP 9 1": replies.ERR_NO_SUCH_MESSAGE.wire,
    "DELE 0": replies.ERR_NO_SUCH_MESSAGE.wire,
    "DELE x": replies.ERR_USAGE["DELE"].wire,
    "UIDL 3": b"+OK 3 uid-bob-2\r\n",
    "UIDL 7": replies.ERR_NO_SUCH_MESSAGE.wire,
    "NOOP": replies.OK_NOOP.wire,
    "NOOP 1": replies.ERR_USAGE["NOOP"].wire,
    "RSET": b"+OK maildrop has 3 messages (%d octets)\r\n" % sum(crlf_size(m) for m in MESSAGES),
    "XYZZY": replies.ERR_UNKNOWN.wire,
}


@pytest.mark.parametrize("command", sorted(TRANSACTION_STATE))
def test_transaction_state(server, tables, command):
    w = logged_in(server)
    assert w.cmd(command) + b"\r\n" == TRANSACTION_STATE[command]
    assert w.cmd("NOOP") == replies.OK_NOOP.wire[:-2]
    w.cmd("QUIT")
    assert tables.storage.commits == []  # nothing was deleted


def test_multi_line_replies(server):
    w = logged_in(server)
    assert w.cmd("LIST") == b"+OK 3 messages (%d octets)" % sum(crlf_size(m) for m in MESSAGES)
    assert w.multi() == [b"%d %d" % (i + 1, crlf_size(m)) for i, m in enumerate(MESSAGES)]
    assert w.cmd("UIDL") == replies.OK_UIDL[:-2]
    assert w.multi() == [b"1 uid-bob-0", b"2 uid-bob-1", b"3 uid-bob-2"]
    for i, m in enumerate(MESSAGES, 1):
        w.send(b"RETR %d\r\n" % i)
        assert w.line() == b"+OK %d octets" % (crlf_size(m))
        assert w.raw_until(b"\r\n.\r\n") == wire_form(m)
    w.send(b"TOP 2 1\r\n")
    assert w.line() == replies.OK_TOP[:-2]
    assert w.raw_until() == top_form(MESSAGES[1], 1) == b"From: b@example.org\r\nSubject: two\r\n\r\nline 1\r\n.\r\n"
    w.send(b"TOP 2 0\r\n")
    w.line()
    assert w.raw_until() == b"From: b@example.org\r\nSubject: two\r\n\r\n.\r\n"
    w.send(b"TOP 1 99999999\r\n")  # fetchmail's way of reading a whole message
    w.line()
    assert w.raw_until() == wire_form(MESSAGES[0])


def test_poplib_round_trip(server):
    p = poplib.POP3("127.0.0.1", server.port, timeout=5)
    assert p.user("bob") == replies.OK_USER.wire[:-2]
    assert p.pass_("secret").startswith(b"+OK maildrop has 3 messages")
    for i, m in enumerate(MESSAGES[:2], 1):  # poplib refuses lines over 2048 octets
        _, lines, octets = p.retr(i)
        assert b"\r\n".join(lines) + b"\r\n" == m.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert p.quit() == b"+OK mpop3 signing off (0 deleted, 3 left)"


# --- DELE / RSET / QUIT ------------------------------------------------------------


def test_dele_rset_quit_semantics(server, tables):
    w = logged_in(server)
    size1 = crlf_size(MESSAGES[0])
    total = sum(crlf_size(m) for m in MESSAGES)
    assert w.cmd("DELE 1") == replies.OK_DELETED.wire[:-2]
    assert w.cmd("DELE 1") == replies.ERR_DELETED.wire[:-2]
    assert w.cmd("RETR 1") == replies.ERR_DELETED.wire[:-2]
    assert w.cmd("TOP 1 0") == replies.ERR_DELETED.wire[:-2]
    assert w.cmd("LIST 1") == replies.ERR_DELETED.wire[:-2]
    assert w.cmd("UIDL 1") == replies.ERR_DELETED.wire[:-2]
    assert w.cmd("STAT") == b"+OK 2 %d" % (total - size1)
    w.cmd("LIST")
    assert [line.split()[0] for line in w.multi()] == [b"2", b"3"]  # numbers keep their meaning
    w.cmd("UIDL")
    assert w.multi() == [b"2 uid-bob-1", b"3 uid-bob-2"]
    assert w.cmd("RSET") == b"+OK maildrop has 3 messages (%d octets)" % total
    assert w.cmd("STAT") == b"+OK 3 %d" % total
    assert w.cmd("DELE 2") == replies.OK_DELETED.wire[:-2]
    assert w.cmd("DELE 3") == replies.OK_DELETED.wire[:-2]
    assert tables.storage.commits == []  # nothing before QUIT
    assert w.cmd("QUIT") == b"+OK mpop3 signing off (2 deleted, 1 left)"
    assert w.closed()
    assert tables.storage.commits == [("bob", [1, 2])]
    w = logged_in(server)
    assert w.cmd("STAT") == b"+OK 1 %d" % size1


@pytest.mark.parametrize("how", ["close", "reset", "half-close"])
def test_a_dropped_connection_commits_nothing(server, tables, how):
    w = logged_in(server)
    w.cmd("DELE 1")
    if how == "reset":
        w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    if how == "half-close":
        w.send(b"DELE 2\r\n")
        w.sock.shutdown(socket.SHUT_WR)
        assert w.line() == replies.OK_DELETED.wire[:-2]
        assert w.closed()
    w.close()
    wait_for(lambda: "bob" not in tables.storage.locked, seconds=5, interval=0.01)
    assert tables.storage.commits == []
    w = logged_in(server)  # the mailbox was released, with every message
    assert w.cmd("STAT").startswith(b"+OK 3 ")


def test_quit_commits_even_if_the_client_is_already_gone(server, tables):
    """Outlook closes right after sending QUIT, before reading +OK."""
    w = logged_in(server)
    w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    w.send(b"DELE 1\r\nDELE 3\r\nQUIT\r\n")
    w.close()
    wait_for(lambda: tables.storage.commits, seconds=5, interval=0.01)
    assert tables.storage.commits == [("bob", [0, 2])]


def test_quit_in_authorization_commits_nothing(server, tables):
    w = wire(server)
    w.cmd("USER bob")
    assert w.cmd("QUIT") == replies.OK_BYE.wire[:-2]
    assert w.closed()
    assert tables.storage.commits == []


# --- pipelining --------------------------------------------------------------------


def test_a_hundred_pipelined_commands_in_one_write(server):
    w = wire(server)
    commands = [b"USER bob", b"PASS secret"] + [b"STAT", b"LIST 2", b"NOOP", b"UIDL 1", b"BOGUS"] * 20
    commands += [b"RETR 2", b"QUIT"]
    w.send(b"\r\n".join(commands) + b"\r\n")
    assert w.line() == replies.OK_USER.wire[:-2]
    assert w.line().startswith(b"+OK maildrop has 3 messages")
    for _ in range(20):
        assert w.line().startswith(b"+OK 3 ")
        assert w.line().startswith(b"+OK 2 ")
        assert w.line() == replies.OK_NOOP.wire[:-2]
        assert w.line() == b"+OK 1 uid-bob-0"
        assert w.line() == replies.ERR_UNKNOWN.wire[:-2]  # does not count: good ones in between
    assert w.line().startswith(b"+OK ")
    assert w.raw_until() == wire_form(MESSAGES[1])
    assert w.line() == b"+OK mpop3 signing off (0 deleted, 3 left)"
    assert w.closed()


class CountingTransport:
    """Wraps a transport and counts its write() calls."""

    def __init__(self, transport, writes):
        self.transport = transport
        self.writes = writes

    def write(self, data):
        self.writes.append(data)
        self.transport.write(data)

    def __getattr__(self, name):
        return getattr(self.transport, name)


def test_pipelined_commands_are_answered_in_one_write(tables, monkeypatch):
    writes = []
    made = connection_module.Connection.connection_made
    monkeypatch.setattr(
        connection_module.Connection, "connection_made", lambda self, t: made(self, CountingTransport(t, writes))
    )
    with ServerThread(tables) as s:
        w = Wire(s.port)
        w.login("bob", "secret")
        before = len(writes)
        w.send(b"NOOP\r\n" * 50 + b"STAT\r\nLIST 1\r\nUIDL\r\n")
        assert [w.line() for _ in range(50)] == [replies.OK_NOOP.wire[:-2]] * 50
        assert w.line().startswith(b"+OK 3 ")
        assert w.line().startswith(b"+OK 1 ")
        w.line()
        assert len(w.multi()) == 3
        assert len(writes) - before == 1


def test_nothing_after_a_pipelined_quit_is_answered(server, tables):
    w = wire(server)
    w.send(b"USER bob\r\nPASS secret\r\nDELE 1\r\nQUIT\r\nNOOP\r\nSTAT\r\n")
    assert w.line() == replies.OK_USER.wire[:-2]
    assert w.line().startswith(b"+OK maildrop has 3 messages")
    assert w.line() == replies.OK_DELETED.wire[:-2]
    assert w.line() == b"+OK mpop3 signing off (1 deleted, 2 left)"
    assert w.closed() and w.buf == b""
    assert tables.storage.commits == [("bob", [0])]


def test_pipelined_lines_split_at_every_byte(server):
    w = wire(server)
    for byte in b"USER bob\r\nPASS secret\nSTAT\r\nQUIT\r\n":
        w.send(bytes([byte]))
    assert w.line() == replies.OK_USER.wire[:-2]
    assert w.line().startswith(b"+OK maildrop")
    assert w.line().startswith(b"+OK 3 ")
    assert w.line().startswith(b"+OK mpop3 signing off")


# --- limits and abuse ------------------------------------------------------------------


def test_an_over_long_line_gets_an_error_then_a_second_closes(server):
    w = wire(server)
    assert w.cmd(b"USER " + b"a" * 600) == replies.ERR_TOO_LONG.wire[:-2]
    assert w.cmd("USER bob") == replies.OK_USER.wire[:-2]  # still in business
    w.send(b"NOOP " + b"b" * 100000)  # and without an end: bounded, refused
    assert w.line() == replies.ERR_TOO_LONG_BYE.wire[:-2]
    assert w.closed()


def test_a_flood_of_garbage_closes_the_session(server, tables):
    w = logged_in(server)
    w.cmd("DELE 1")
    w.send(b"\x00\xff garbage\r\n" * 1000)
    got = [w.line() for _ in range(19)]
    assert got == [replies.ERR_UNKNOWN.wire[:-2]] * 19
    assert w.line() == replies.ERR_TOO_MANY_BAD.wire[:-2]
    assert w.closed()
    assert tables.storage.commits == []


def test_twenty_thousand_pipelined_commands_are_all_answered_in_order(server):
    """Lines are taken from a read a few at a time (a flood costs bounded
    memory), but none is lost or reordered."""
    w = logged_in(server)
    w.send(b"".join(b"LIST %d\r\n" % (1 + n % 3) for n in range(20000)) + b"STAT\r\n")
    sizes = [w.line() for _ in range(20000)]
    assert sizes == [b"+OK %d %d" % (1 + n % 3, crlf_size(MESSAGES[n % 3])) for n in range(20000)]
    assert w.line().startswith(b"+OK 3 ")


@pytest.mark.slow
def test_a_pipelining_flood_does_not_hold_up_other_sessions(server):
    """One client sends NOOPs as fast as it can and reads the answers;
    another client's login and STAT are still answered at once."""
    flooder = logged_in(server)
    stop = time.monotonic() + 1.5

    def flood():
        sock = flooder.sock
        sock.settimeout(2)
        while time.monotonic() < stop:
            sock.sendall(b"NOOP\r\n" * 4000)
            got = 0
            while got < 4000 * len(replies.OK_NOOP.wire):
                got += len(sock.recv(1 << 20))

    t = threading.Thread(target=flood)
    t.start()
    time.sleep(0.2)
    start = time.monotonic()
    w = logged_in(server, "alice")
    assert w.cmd("STAT").startswith(b"+OK 1 ")
    took = time.monotonic() - start
    t.join(5)
    assert took < 0.5, took


def test_a_client_that_hangs_up_without_a_word_is_let_go_at_once(tables):
    with ServerThread(tables, {"max_sessions_per_ip": "1"}) as s:
        w = Wire(s.port)
        w.sock.shutdown(socket.SHUT_WR)
        assert w.closed()  # the server closes its side too
        assert wait_for(lambda: Wire(s.port).greeting.startswith(b"+OK"), seconds=2)  # and frees the slot


def test_nul_bytes_make_a_command_invalid(server):
    w = logged_in(server)
    assert w.cmd(b"NO\0OP") == replies.ERR_UNKNOWN.wire[:-2]
    assert w.cmd(b"LIST 1\0") == replies.ERR_UNKNOWN.wire[:-2]
    assert w.cmd(b"RETR \0" + b"1") == replies.ERR_UNKNOWN.wire[:-2]
    assert w.cmd("NOOP") == replies.OK_NOOP.wire[:-2]


@pytest.mark.parametrize("name", ["../bob", "/bob", "bob/../bob", "..", "../../etc/passwd"])
def test_user_names_with_path_tricks_are_just_unknown_users(server, tables, name):
    w = wire(server)
    assert w.cmd(f"USER {name}") == replies.OK_USER.wire[:-2]
    assert w.cmd("PASS secret") == replies.ERR_AUTH.wire[:-2]
    assert tables.storage.locked == set()


@pytest.mark.parametrize("mailbox", ["../bob", "a/b", "..", ".hidden", "bob\x01", "x\x7f"])
def test_unsafe_mailbox_names_from_a_module_never_reach_storage(mailbox):
    tables = memory_tables({"eve": "pw"}, {}, mailboxes={"eve": mailbox})
    opened = []
    lock = tables.storage.storage_lock_mailbox
    tables.storage.storage_lock_mailbox = lambda m: (opened.append(m), lock(m))[1]
    with ServerThread(tables) as s:
        w = Wire(s.port)
        w.cmd("USER eve")
        assert w.cmd("PASS pw") == replies.ERR_BAD_MAILBOX.wire[:-2]
    assert opened == []


def test_unknown_and_known_users_look_the_same(server):
    answers = []
    for user in ("bob", "nosuchuser"):
        w = wire(server)
        answers.append((w.cmd(f"USER {user}"), w.cmd("PASS wrong")))
    assert answers[0] == answers[1] == (replies.OK_USER.wire[:-2], replies.ERR_AUTH.wire[:-2])


def test_too_many_failed_logins_close_the_session(server):
    w = wire(server)
    for _ in range(2):
        w.cmd("USER bob")
        assert w.cmd("PASS nope") == replies.ERR_AUTH.wire[:-2]
    w.cmd("USER bob")
    assert w.cmd("PASS nope") == replies.ERR_TOO_MANY_FAILURES.wire[:-2]
    assert w.closed()


def timed_failure(port, password, user="bob"):
    w = Wire(port)
    w.cmd(f"USER {user}")
    start = time.monotonic()
    assert w.cmd(f"PASS {password}") == replies.ERR_AUTH.wire[:-2]
    took = time.monotonic() - start
    w.close()
    return took


@pytest.mark.slow
def test_failed_logins_are_delayed_more_per_address_but_not_for_a_repeat(tables):
    with ServerThread(tables, {"login_fail_delay": "0.1", "login_fail_delay_max": "0.4"}) as s:
        first = timed_failure(s.port, "guess1")
        second = timed_failure(s.port, "guess2")
        third = timed_failure(s.port, "guess3")
        fourth = timed_failure(s.port, "guess4")
        repeat = timed_failure(s.port, "guess4")  # the same wrong password again: no growth
        assert 0.1 <= first < 0.18
        assert 0.2 <= second < 0.3
        assert 0.4 <= third < 0.5
        assert 0.4 <= fourth < 0.5  # capped at the maximum
        assert 0.4 <= repeat < 0.5
        w = Wire(s.port)
        start = time.monotonic()
        w.login("bob", "secret")  # the delay has passed: answered at once, and the record cleared
        assert time.monotonic() - start < 0.1
        assert 0.1 <= timed_failure(s.port, "guess5") < 0.18


def test_a_repeated_wrong_password_does_not_escalate(tables):
    with ServerThread(tables, {"login_fail_delay": "0.1", "login_fail_delay_max": "0.8"}) as s:
        times = [timed_failure(s.port, "old-password") for _ in range(4)]
        assert all(0.1 <= t < 0.18 for t in times), times


def test_an_empty_password_never_logs_in_whatever_the_module_says():
    """A module that hands over "" as a user's password (or says yes to an
    empty one) logs nobody in: not by PASS, AUTH PLAIN, APOP or CRAM-MD5."""
    tables = memory_tables({"eve": ""}, {"eve": []})
    tables.auth.auth_attempt_login = lambda user, password: "eve"  # a module that says yes to anything
    with ServerThread(tables, {"login_fail_delay": "0", "max_login_failures": "10"}) as s:
        w = Wire(s.port)
        stamp = re.search(rb"<.*>", w.greeting).group(0)
        assert w.cmd(f"APOP eve {hashlib.md5(stamp).hexdigest()}") == replies.ERR_AUTH.wire[:-2]
        assert w.cmd("AUTH PLAIN " + base64.b64encode(b"\0eve\0").decode()) == replies.ERR_AUTH.wire[:-2]
        reply = w.cmd("AUTH CRAM-MD5")
        challenge = base64.b64decode(reply[2:])
        digest = hmac.new(b"", challenge, "md5").hexdigest()
        assert w.cmd(base64.b64encode(f"eve {digest}".encode()).decode()) == replies.ERR_AUTH.wire[:-2]
        assert w.cmd("USER eve") == replies.OK_USER.wire[:-2]
        assert w.cmd("PASS ").startswith(b"-ERR")
        assert w.cmd("NOOP").startswith(b"-ERR")  # still not logged in


def test_apop(server):
    w = wire(server)
    stamp = re.search(rb"<.*>", w.greeting).group(0)
    good = hashlib.md5(stamp + b"secret").hexdigest()
    assert w.cmd(f"APOP bob {'0' * 32}") == replies.ERR_AUTH.wire[:-2]
    assert w.cmd(f"APOP bob {good}").startswith(b"+OK maildrop has 3 messages")
    w2 = wire(server)
    stale = hashlib.md5(stamp + b"wonderland").hexdigest()  # another connection's timestamp
    assert w2.cmd(f"APOP alice {stale}") == replies.ERR_AUTH.wire[:-2]


def test_no_apop_without_a_timestamp(tables):
    tables.auth.auth_timestamp = lambda: None
    with ServerThread(tables) as s:
        w = Wire(s.port)
        assert b"<" not in w.greeting
        assert w.cmd(f"APOP bob {'0' * 32}") == replies.ERR_NO_APOP.wire[:-2]


def test_a_locked_mailbox_is_in_use(server):
    first = logged_in(server)
    w = wire(server)
    w.cmd("USER bob")
    assert w.cmd("PASS secret") == replies.ERR_IN_USE.wire[:-2]
    assert w.cmd("USER alice") == replies.OK_USER.wire[:-2]  # the session goes on
    first.cmd("QUIT")
    assert w.cmd("PASS wonderland").startswith(b"+OK")


def test_login_delay_is_enforced(tables):
    with ServerThread(tables, {"login_delay": "60"}) as s:
        w = Wire(s.port)
        w.login("bob", "secret")
        w.cmd("QUIT")
        w = Wire(s.port)
        w.cmd("USER bob")
        assert w.cmd("PASS secret") == replies.ERR_LOGIN_DELAY.wire[:-2]
        Wire(s.port).login("alice", "wonderland")  # another mailbox is not affected


def test_session_limits_answer_at_the_greeting(tables):
    with ServerThread(tables, {"max_sessions_per_ip": "2", "max_sessions": "3"}) as s:
        keep = [Wire(s.port), Wire(s.port)]
        third = Wire(s.port)
        assert third.greeting == replies.ERR_TOO_MANY_FROM_YOU.wire[:-2]
        assert third.closed()
        keep[0].cmd("QUIT")
        keep[0].closed()
        time.sleep(0.05)
        assert Wire(s.port).greeting.startswith(b"+OK")


def test_max_sessions(tables):
    with ServerThread(tables, {"max_sessions": "2"}) as s:
        keep = [Wire(s.port), Wire(s.port)]
        assert Wire(s.port).greeting == replies.ERR_TOO_MANY_SESSIONS.wire[:-2]
        assert keep[1].cmd("NOOP") == replies.ERR_NOT_NOW.wire[:-2]


def test_an_idle_session_is_closed_without_committing(tables):
    with ServerThread(tables, {"idle_timeout": "0.3"}) as s:
        w = Wire(s.port)
        w.login("bob", "secret")
        w.cmd("DELE 1")
        time.sleep(0.15)
        assert w.cmd("NOOP") == replies.OK_NOOP.wire[:-2]  # activity keeps it alive
        start = time.monotonic()
        assert w.line() == replies.ERR_IDLE.wire[:-2]
        assert 0.25 < time.monotonic() - start < 1.0
        assert w.closed()
    assert tables.storage.commits == []


def test_every_reply_line_is_well_formed(server):
    w = wire(server)
    assert is_well_formed(w.greeting)
    for command in [
        "CAPA",
        "USER x",
        "PASS y",
        "NOOP",
        "FOO",
        "USER bob",
        "PASS secret",
        "STAT",
        "LIST",
        "UIDL",
        "LIST 9",
        "RETR 0",
        "DELE 2",
        "RSET",
        "TOP 3 0",
        "QUIT",
    ]:
        first = w.cmd(command)
        assert is_well_formed(first), (command, first)
        if first.startswith(b"+OK") and command in ("CAPA", "LIST", "UIDL", "TOP 3 0"):
            w.multi()


def test_storage_failure_while_sending_ends_the_session_uncommitted(server, tables):
    tables.storage.fail_dump.add(("bob", 1))
    w = logged_in(server)
    w.cmd("DELE 1")
    assert w.cmd("RETR 2") == replies.ERR_CHANGED.wire[:-2]
    assert w.closed()
    assert tables.storage.commits == []
    assert tables.storage.locked == set()


@pytest.mark.slow
def test_retr_streams_with_back_pressure(tables):
    """A client that stops reading costs the server bounded memory: the
    storage is asked for more chunks only as the client takes them."""
    big = b"Subject: big\n\n" + (b"y" * 1000 + b"\n") * 16000  # 16 MB
    tables.storage.boxes["bob"] = [big]
    with ServerThread(tables) as s:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.port))
        sock.sendall(b"USER bob\r\nPASS secret\r\nRETR 1\r\n")
        time.sleep(1.0)
        produced = tables.storage.dumped * 64 * 1024
        assert produced < 8 * 1024 * 1024, produced
        sock.settimeout(10)
        data = b""
        end = wire_form(big)
        while not data.endswith(end):
            chunk = sock.recv(1 << 20)
            assert chunk
            data += chunk
        assert data.endswith(b"+OK %d octets\r\n" % crlf_size(big) + end)


def test_sessions_use_tcp_nodelay(server):
    """Without TCP_NODELAY a reply written in two pieces stalls ~40 ms."""
    w = logged_in(server)
    sessions = server.call(lambda: list(server.server.connections))
    options = server.call(
        lambda: [
            s.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sessions
        ]
    )
    assert options == [1]
    w.cmd("QUIT")


@pytest.mark.slow
def test_a_client_that_pipelines_and_never_reads_costs_bounded_memory(tables):
    tables.storage.boxes["bob"] = [b"Subject: %d\n\nx\n" % i for i in range(2000)]  # LIST: ~20 KB
    with ServerThread(tables) as s:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.port))
        sock.sendall(b"USER bob\r\nPASS secret\r\n")
        time.sleep(0.2)
        sock.setblocking(False)
        sent = 0
        try:
            for _ in range(3000):  # 3000 LISTs would be 60 MB of replies
                sent += sock.send(b"LIST\r\n")
        except BlockingIOError:
            pass
        time.sleep(0.5)
        buffered = s.call(lambda: [x.transport.get_write_buffer_size() for x in s.server.connections])
        assert buffered and max(buffered) < 512 * 1024, buffered
        sock.setblocking(True)
        sock.settimeout(10)
        answered, tail = 0, b""
        while answered < sent // 6:  # every LIST is answered in the end
            chunk = sock.recv(1 << 20)
            assert chunk
            window = tail + chunk
            answered += window.count(b"+OK 2000 messages")
            tail = window[-20:].rpartition(b"\r\n")[2]  # a header cut in two is counted once


@pytest.mark.parametrize(
    "error, reply",
    [
        (StorageTempError("disk trouble"), replies.ERR_TEMP),
        (StoragePermError("permission denied"), replies.ERR_PERM),
        (MailboxInUse("another process"), replies.ERR_IN_USE),
        (RuntimeError("a bug in a module"), replies.ERR_INTERNAL),
    ],
)
def test_storage_errors_at_login_map_to_response_codes(tables, error, reply):
    def refuse(mailbox):
        raise error

    tables.storage.storage_lock_mailbox = refuse
    with ServerThread(tables) as s:
        w = Wire(s.port)
        w.cmd("USER bob")
        answer = w.cmd("PASS secret")
        assert answer == reply.wire[:-2]
        assert b"disk trouble" not in answer and b"RuntimeError" not in answer  # no internals leak
        assert w.cmd("USER bob") == replies.OK_USER.wire[:-2]  # the session goes on


@pytest.mark.parametrize(
    "error, reply",
    [
        (StorageTempError("disk full"), replies.ERR_TEMP),
        (StoragePermError("read-only spool"), replies.ERR_PERM),
    ],
)
def test_a_failed_commit_is_an_error_at_quit_and_unlocks(tables, error, reply):
    def fail(handle, deleted):
        raise error

    tables.storage.storage_synch = fail
    with ServerThread(tables) as s:
        w = Wire(s.port)
        w.login("bob", "secret")
        w.cmd("DELE 1")
        assert w.cmd("QUIT") == reply.wire[:-2]
        assert w.closed()
        w = Wire(s.port)
        w.login("bob", "secret")  # released all the same
        assert w.cmd("STAT").startswith(b"+OK 3 ")
