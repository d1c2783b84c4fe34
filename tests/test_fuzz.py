"""Fuzzing a whole connection (hypothesis): arbitrary byte streams, split
at arbitrary points, fed to a real Connection and its core on a real event
loop, uvloop and asyncio's own (a recording transport instead of a
socket), with real worker jobs. Nothing may escape, every reply must be well-formed, the state must stay
consistent and the mailbox must be released in the end. (The core alone,
without a loop, is fuzzed in tests/test_core.py.)"""

import asyncio
import logging
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pop_server import LOOPS, make_conf, memory_tables

from mpop3.protocol import parser_reference as proto_reference
from mpop3.protocol.commands import AUTHORIZATION, CLOSED, TRANSACTION, UPDATE
from mpop3.server.connection import Connection
from mpop3.server.service import Service

MESSAGES = [b"Subject: a\n\n.dot\nbody\n", b"Subject: b\r\n\r\nline\r\n", b"Subject: c"]

# first lines that a multi-line body follows
MULTI = re.compile(
    rb"\+OK (capability list follows|unique-id listing follows|top of message follows"
    rb"|\d+ octets|\d+ messages? \(\d+ octets\))$"
)
STATUS = re.compile(rb"(\+OK|-ERR) \S[^\r\n]*")


class RecordingTransport:
    def __init__(self, loop):
        self.loop = loop
        self.data = bytearray()
        self.closed = False
        self.session = None

    def write(self, data):
        assert not self.closed, "write after close"
        self.data += data

    def close(self):
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.session.connection_lost, None)

    def get_extra_info(self, name, default=None):
        return ("192.0.2.1", 4242) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def replies_in(data):
    """Split the output into replies; fails on anything malformed."""
    lines = bytes(data).split(b"\r\n")
    assert lines[-1] == b"", "output does not end with CRLF"
    lines.pop()
    statuses, i = [], 0
    while i < len(lines):
        assert STATUS.fullmatch(lines[i]), lines[i]
        statuses.append(lines[i])
        if MULTI.match(lines[i]):
            i += 1
            while lines[i] != b".":
                assert not lines[i].startswith(b".") or lines[i].startswith(b".."), lines[i]
                i += 1
        i += 1
    return statuses


class Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module", params=sorted(LOOPS))
def harness(request):
    loop = LOOPS[request.param]()
    tables = memory_tables({"bob": "secret"}, {"bob": MESSAGES})
    conf = make_conf(
        {
            "login_fail_delay": "0",
            "login_fail_delay_max": "0",
            "max_login_failures": "2",
            "max_bad_commands": "5",
            "max_line_length": "64",
        }
    )
    server = Service(conf, tables, loop)
    errors = Errors()
    logging.getLogger("mpop3").addHandler(errors)
    loop.set_exception_handler(lambda loop, context: errors.records.append(context))
    yield loop, server, tables, errors
    logging.getLogger("mpop3").removeHandler(errors)
    server.workers.shutdown()
    loop.close()


def state(session):
    return CLOSED if session.closed else session.core.state


def settle(loop, session):
    for _ in range(2000):
        loop.run_until_complete(asyncio.sleep(0))
        if state(session) is CLOSED or not session.core.busy:
            return
        loop.run_until_complete(asyncio.sleep(0.001))
    raise AssertionError("the session stayed busy")


TOKENS = st.sampled_from(
    [
        b"USER bob\r\n",
        b"PASS secret\r\n",
        b"PASS wrong\r\n",
        b"STAT\r\n",
        b"LIST\r\n",
        b"LIST 1\r\n",
        b"LIST 0\r\n",
        b"RETR 1\r\n",
        b"RETR 2\n",
        b"RETR 9\r\n",
        b"TOP 1 0\r\n",
        b"TOP 2 1\r\n",
        b"DELE 1\r\n",
        b"DELE 3\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"UIDL\r\n",
        b"UIDL 2\r\n",
        b"CAPA\r\n",
        b"QUIT\r\n",
        b"APOP bob 00000000000000000000000000000000\r\n",
        b"LIST 4294967297\r\n",
        b"\r\n",
        b"\n",
        b"\0",
        b" ",
        b"x" * 70,
        b"\xff\xfe",
        b"user BOB\r\n",
        b"pass secret\n",
    ]
)
STREAMS = st.lists(st.one_of(TOKENS, st.binary(max_size=12)), max_size=25).map(b"".join)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=STREAMS, cuts=st.lists(st.integers(0, 400), max_size=8), hang_up=st.booleans(), login=st.booleans())
def test_any_input_split_anywhere(harness, data, cuts, hang_up, login):
    loop, server, tables, errors = harness
    if login:  # most random streams never log in; half of them start logged in
        data = b"USER bob\r\nPASS secret\r\n" + data
    transport = RecordingTransport(loop)
    session = Connection(server)
    transport.session = session
    session.connection_made(transport)
    points = sorted({min(c, len(data)) for c in cuts}) + [len(data)]
    previous = 0
    for point in points:
        if state(session) is CLOSED:
            break
        session.data_received(data[previous:point])
        previous = point
        settle(loop, session)
        assert state(session) in (AUTHORIZATION, TRANSACTION, UPDATE, CLOSED)
        if state(session) is TRANSACTION:
            event("reached TRANSACTION")
            assert session.handle is not None and "bob" in tables.storage.locked
            assert all(0 <= i < len(session.core.sizes) for i in session.core.deleted)
    if state(session) is not CLOSED:
        if hang_up:
            transport.close()
        else:
            session.eof_received()  # the client's input ends: finish, then close
        settle(loop, session)
    for _ in range(5):
        loop.run_until_complete(asyncio.sleep(0))
    assert state(session) is CLOSED and transport.closed
    assert tables.storage.locked == set(), "the mailbox was not released"
    statuses = replies_in(transport.data)
    reader = proto_reference.LineReader(64)
    assert len(statuses) - 1 <= len(reader.feed(data))  # one reply per line at most (+ greeting)
    assert not errors.records, errors.records
    tables.storage.boxes["bob"] = list(MESSAGES)  # undo any commit for the next example
