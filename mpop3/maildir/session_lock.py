"""A session's hold on its mailbox: `[IN-USE]` for any other session.

`session_lock file` (the default) is the marker file in the Maildir
(mpop3/mbox/lock.py's SessionMarker): one node, or nodes that share the
filesystem and never die holding it. `session_lock postgresql` is one lock
across a cluster of nodes: a PostgreSQL advisory lock, keyed by a 64-bit
hash of the mailbox's name, held on a connection of the session's own (not
a pooled one: the lock lives exactly as long as the connection), so that
it ends with the session, and with the node if the node dies: PostgreSQL
drops a dead client's locks as soon as its connection goes. Before QUIT
commits, the hold is checked: a connection that is gone (the database
restarted, the backend ended) may mean another session has the mailbox
now, and nothing is committed.
"""

import hashlib
import logging

from ..errors import MailboxInUse, StorageTempError
from ..mbox.lock import SessionMarker

log = logging.getLogger("mpop3.storage")

LOCK_WAIT = "1s"  # a lock held by a session that is just ending is waited for this long
QUERY_TIMEOUT = "5s"
CONNECT_TIMEOUT = 5


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
    """A PostgreSQL advisory lock on a connection of this session's own."""

    def __init__(self, connection, key, name):
        self.connection = connection
        self.key = key
        self.name = name

    @classmethod
    def acquire(cls, conninfo, name):
        import psycopg
        from psycopg import errors

        key = lock_key(name)
        try:
            connection = psycopg.connect(conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error as e:
            log.error("%s: cannot reach the session lock's database: %s", name, first_line(e))
            raise StorageTempError("session lock unavailable") from None
        try:
            connection.execute(f"SET lock_timeout = '{LOCK_WAIT}'; SET statement_timeout = '{QUERY_TIMEOUT}'")
            connection.execute("SELECT pg_advisory_lock(%s)", (key,))
        except errors.LockNotAvailable:
            connection.close()
            raise MailboxInUse("mailbox in use by another session") from None
        except psycopg.Error as e:
            connection.close()
            log.error("%s: taking the session lock failed: %s", name, first_line(e))
            raise StorageTempError("session lock unavailable") from None
        return cls(connection, key, name)

    def check(self):
        """Still ours? The lock lives as long as our connection: if that is
        gone, another session may hold the mailbox now."""
        import psycopg

        try:
            self.connection.execute("SELECT pg_backend_pid()").fetchone()
        except psycopg.Error as e:
            log.error("%s: the session lock was lost (%s); not committing", self.name, first_line(e))
            raise StorageTempError("session lock lost") from None

    def release(self):
        """Closing the connection ends the lock (no round trip on the way out)."""
        try:
            self.connection.close()
        except Exception as e:  # closing a broken connection: nothing left to release
            log.debug("%s: closing the session lock's connection: %s", self.name, e)


def acquire(settings, name, marker_path):
    if settings.session_lock == "postgresql":
        return DatabaseLock.acquire(settings.session_lock_connection, name)
    return FileLock.acquire(marker_path)


def lock_key(name):
    """A 64-bit signed key for the mailbox: PostgreSQL advisory locks take a bigint."""
    digest = hashlib.blake2b(b"mpop3 session " + name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def first_line(error):
    return str(error).strip().split("\n", 1)[0] or type(error).__name__
