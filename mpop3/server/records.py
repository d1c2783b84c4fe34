"""Records between mpop3's own processes (privilege separation, split.py):
one JSON object per SOCK_SEQPACKET message, with descriptors beside it
(SCM_RIGHTS). A record is bounded, and a peer that sends anything else is
treated as lying: the receiver drops what came and says so."""

import array
import json
import socket

LONGEST = 64 * 1024  # a record's JSON; a hand-off carries a few pipelined lines at most
MOST_FDS = 16


class BadRecord(Exception):
    """What came is not a record of ours."""


def pair():
    """Two connected ends, message by message."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock, record, fds=()):
    data = json.dumps(record, separators=(",", ":")).encode()
    if len(data) > LONGEST:
        raise ValueError("record too long")
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def receive(sock):
    """(record, fds); (None, []) at the end of the connection. BadRecord
    for anything malformed (its descriptors are closed)."""
    fds = array.array("i")
    data, ancillary, flags, _ = sock.recvmsg(LONGEST + 1, socket.CMSG_SPACE(MOST_FDS * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    received = list(fds)
    if not data and not received:
        return None, []
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > LONGEST:
            raise BadRecord("record too long")
        try:
            record = json.loads(data)
        except ValueError:
            raise BadRecord("not JSON") from None
        if not isinstance(record, dict):
            raise BadRecord("not an object")
    except BadRecord:
        close_all(received)
        raise
    return record, received


def take(sock):
    """receive() for a reader of a non-blocking socket that ends on
    garbage: (record, fds), or (None, []) at the end or on anything
    malformed. BlockingIOError if nothing is there yet."""
    try:
        return receive(sock)
    except BlockingIOError:
        raise
    except (OSError, BadRecord):
        return None, []


MOST_LINES = 64  # pipelined lines a session may bring along


def session(handover, lines, **more):
    """The record of a logged-in session on its way to a mail process
    (a core.Handover, and the lines its client had already sent)."""
    return {
        "peer": handover.peer,
        "user": handover.user.hex(),
        "mailbox": handover.mailbox,
        "secure": handover.secure,
        "cleartext_ok": handover.cleartext_ok,
        "failures": handover.failures,
        "lines": [None if line is None else line.hex() for line in lines],
        **more,
    }


def session_from(record):
    """(core.Handover, lines) from a session(); BadRecord if it is not one."""
    from ..protocol.core import Handover

    lines = record.get("lines")
    if not isinstance(lines, list) or len(lines) > MOST_LINES:
        raise BadRecord("bad lines")
    try:
        lines = [None if line is None else bytes.fromhex(line) for line in lines]
        user = bytes.fromhex(text(record, "user", 2048))
    except (TypeError, ValueError):
        raise BadRecord("bad hex") from None
    handover = Handover(
        text(record, "peer", 64),
        user,
        text(record, "mailbox", 255),
        flag(record, "secure"),
        flag(record, "cleartext_ok"),
        number(record, "failures", 1000),
    )
    return handover, lines


def close_all(fds):
    for fd in fds:
        try:
            socket.close(fd)
        except OSError:
            pass


def text(record, key, longest=1024):
    """record[key] as a bounded str, or BadRecord."""
    value = record.get(key)
    if not isinstance(value, str) or len(value) > longest:
        raise BadRecord(f"bad {key}")
    return value


def flag(record, key):
    value = record.get(key)
    if not isinstance(value, bool):
        raise BadRecord(f"bad {key}")
    return value


def number(record, key, most):
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
        raise BadRecord(f"bad {key}")
    return value
