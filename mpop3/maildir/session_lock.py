"""A session's hold on its mailbox: `[IN-USE]` for any other session.

`session_lock file` (the default) is the marker file in the Maildir
(mpop3/mbox/lock.py's SessionMarker): one node, or nodes that share the
filesystem and never die holding it. `session_lock postgresql` is one lock
across a cluster of nodes: a PostgreSQL advisory lock, keyed by a 64-bit
hash of the mailbox's name, held on a connection that serves that session
alone while it lasts (never a shared pool's), so that the lock ends with
the session, and with the node if the node dies: PostgreSQL drops a dead
client's locks as soon as its connection goes. Before QUIT commits, the
hold is checked: a connection that is gone (the database restarted, the
backend ended) may mean another session has the mailbox now, and nothing
is committed.

A session's end sends the unlock without waiting for the answer; the
process keeps the connection idle (a few at most), and the next session
to take it reads that answer first: only a confirmed unlock lets it be
used again. A login then costs the database a lock and an unlock, not a
new backend (about 4 ms of its CPU each, measured in the cluster lab).
"""

import hashlib
import logging
import os
import threading

import psycopg
from psycopg import pq

from ..errors import MailboxInUse, StorageTempError
from ..mbox.lock import SessionMarker

log = logging.getLogger("mpop3.storage")

LOCK_WAIT = "1s"  # a lock held by a session that is just ending is waited for this long
QUERY_TIMEOUT = "5s"
CONNECT_TIMEOUT = 5
MOST_IDLE = 64  # idle lock connections a process keeps (a backend each, on the database)
INT8 = 20  # the bigint type's oid
LOCK_NOT_AVAILABLE = b"55P03"  # SQLSTATE: lock_timeout passed


class FileLock:
    """The marker file (a single node's lock)."""

    def __init__(self, marker):
        self.marker = marker

    @classmethod
    def acquire(cls, path):
        return cls(SessionMarker.acquire(path))

    def check(self):
        """Held since acquire: a marker file cannot be taken from us."""

    def release(self):
        self.marker.release()


class DatabaseLock:
    """A PostgreSQL advisory lock on a connection that serves this session
    alone while it lasts (libpq's own calls, through psycopg.pq)."""

    def __init__(self, connection, key, name, conninfo):
        self.connection = connection
        self.key = key
        self.name = name
        self.conninfo = conninfo

    @classmethod
    def acquire(cls, conninfo, name):
        key = lock_key(name)
        for reused in (True, False):
            connection = LOCK_CONNECTIONS.take(conninfo) if reused else LOCK_CONNECTIONS.new(conninfo, name)
            if connection is None:
                continue
            outcome = lock(connection, key)
            if outcome == "locked":
                return cls(connection, key, name, conninfo)
            if outcome == "in use":
                LOCK_CONNECTIONS.give_back(conninfo, connection)
                raise MailboxInUse("mailbox in use by another session")
            connection.finish()  # a connection that failed: a new one, once
            if not reused:
                log.error("%s: taking the session lock failed: %s", name, outcome)
        raise StorageTempError("session lock unavailable")

    def check(self):
        """Still ours? The lock lives as long as our connection: if that is
        gone, another session may hold the mailbox now."""
        result = self.connection.exec_(b"SELECT 1")
        if result.status != pq.ExecStatus.TUPLES_OK:
            log.error("%s: the session lock was lost (%s); not committing", self.name, problem(self.connection))
            raise StorageTempError("session lock lost")

    def release(self):
        """Ask for the unlock without waiting for its answer (this may run on
        the event loop); the next session to take the connection reads it.
        A connection that cannot even send that is closed: PostgreSQL then
        drops its locks itself."""
        connection, self.connection = self.connection, None
        if connection is None:
            return
        try:
            connection.send_query_params(b"SELECT pg_advisory_unlock($1)", [b"%d" % self.key], [INT8])
            sent = connection.flush() == 0
        except psycopg.Error:
            sent = False
        if sent:
            LOCK_CONNECTIONS.give_back(self.conninfo, connection, unlocking=True)
        else:
            connection.finish()


class LockConnections:
    """Each process's idle lock connections, by connection string: a
    session's lock costs PostgreSQL a backend's start only when none is
    idle. Never carried across a fork (a child would share the socket)."""

    def __init__(self):
        self.idle = {}  # conninfo -> [(connection, an unlock's answer still to read)]
        self.pid = os.getpid()
        # a parent's, after a fork: kept, never used nor closed (closing would
        # end the parent's connection, whose socket we share)
        self.inherited = []
        self.lock = threading.Lock()

    def new(self, conninfo, name):
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        given = conninfo_to_dict(conninfo)
        named = make_conninfo(
            conninfo,
            connect_timeout=given.get("connect_timeout", CONNECT_TIMEOUT),
            application_name=given.get("application_name", f"mpop3 lock {os.getpid()}"),
        )
        connection = pq.PGconn.connect(named.encode())
        if connection.status != pq.ConnStatus.OK:
            log.error("%s: cannot reach the session lock's database: %s", name, problem(connection))
            connection.finish()
            return None
        setup = connection.exec_(
            f"SET lock_timeout = '{LOCK_WAIT}'; SET statement_timeout = '{QUERY_TIMEOUT}'".encode()
        )
        if setup.status != pq.ExecStatus.COMMAND_OK:
            log.error("%s: cannot set up the session lock's connection: %s", name, problem(connection))
            connection.finish()
            return None
        return connection

    def take(self, conninfo):
        """An idle connection whose last unlock went through, or None."""
        while True:
            with self.lock:
                if self.pid != os.getpid():
                    self.inherited.append(self.idle)
                    self.idle, self.pid = {}, os.getpid()
                idle = self.idle.get(conninfo)
                if not idle:
                    return None
                connection, unlocking = idle.pop()
            if not unlocking or unlocked(connection):
                return connection
            connection.finish()

    def give_back(self, conninfo, connection, unlocking=False):
        with self.lock:
            idle = self.idle.setdefault(conninfo, [])
            if len(idle) < MOST_IDLE and self.pid == os.getpid():
                idle.append((connection, unlocking))
                return
        connection.finish()


LOCK_CONNECTIONS = LockConnections()


def lock(connection, key):
    """'locked', 'in use' (waited LOCK_WAIT), or what went wrong."""
    result = connection.exec_params(b"SELECT pg_advisory_lock($1)", [b"%d" % key], [INT8])
    if result.status == pq.ExecStatus.TUPLES_OK:
        return "locked"
    if result.error_field(pq.DiagnosticField.SQLSTATE) == LOCK_NOT_AVAILABLE:
        return "in use"
    return problem(connection, result)


def unlocked(connection):
    """Read the answer to the unlock a session sent as it ended."""
    answered = None
    while (result := connection.get_result()) is not None:
        answered = result.status == pq.ExecStatus.TUPLES_OK and result.get_value(0, 0) == b"t"
    return bool(answered) and connection.status == pq.ConnStatus.OK


def problem(connection, result=None):
    text = (result.error_message if result is not None else b"") or connection.error_message
    return text.decode("utf-8", "replace").strip().split("\n", 1)[0] or "no answer"


def acquire(settings, name, marker_path):
    if settings.session_lock == "postgresql":
        return DatabaseLock.acquire(settings.session_lock_connection, name)
    return FileLock.acquire(marker_path)


def lock_key(name):
    """A 64-bit signed key for the mailbox: PostgreSQL advisory locks take a bigint."""
    digest = hashlib.blake2b(b"mpop3 session " + name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
