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
