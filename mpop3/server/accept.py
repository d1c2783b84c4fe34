"""Accepting connections ourselves, rather than leaving it to the loop.

Two reasons. A connection counts against max_sessions and
max_sessions_per_ip from accept(), before any TLS handshake: counted only
once its handshake completed, one address could hold a thousand silent
connections to port 995 and use up the process's descriptors. And when
accept() fails because the process or the system is out of descriptors,
the listening socket stays readable: waiting on it again at once would spin
at full CPU, logging each time. An Acceptor stops watching for a while
instead, and says so once.
"""

import errno
import logging

from ..log import RateLimited

log = logging.getLogger("mpop3.server")
limited = RateLimited(log)

OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
BACK_OFF = 0.5  # seconds without accepting after running out of descriptors
BATCH = 64  # connections taken per wake-up, so one busy socket cannot starve the rest


def accept_batch(sock):
    """Up to BATCH (connection, peer address) pairs waiting on `sock`, and
    whether the process ran out of descriptors doing it."""
    accepted = []
    for _ in range(BATCH):
        try:
            conn, peer = sock.accept()
        except (BlockingIOError, InterruptedError):
            return accepted, False
        except ConnectionAbortedError:  # gone before we took it
            continue
        except OSError as e:
            if e.errno in OUT_OF_RESOURCES:
                limited.error("accept", "cannot accept connections: %s; pausing %g s", e.strerror, BACK_OFF)
                return accepted, True
            raise
        accepted.append((conn, peer))
    return accepted, False


class Acceptor:
    """Watch a listening socket on an asyncio loop; hand each connection to
    `accepted(conn, peer)`."""

    def __init__(self, loop, sock, accepted):
        self.loop = loop
        self.sock = sock
        self.accepted = accepted
        self.watching = False
        self.resume_timer = None
        sock.setblocking(False)
        self.watch()

    def watch(self):
        self.resume_timer = None
        self.loop.add_reader(self.sock.fileno(), self.ready)
        self.watching = True

    def ready(self):
        accepted, exhausted = accept_batch(self.sock)
        for conn, peer in accepted:
            self.accepted(conn, peer)
        if exhausted and self.watching:
            self.loop.remove_reader(self.sock.fileno())
            self.watching = False
            self.resume_timer = self.loop.call_later(BACK_OFF, self.watch)

    def close(self):
        if self.watching:
            self.loop.remove_reader(self.sock.fileno())
            self.watching = False
        if self.resume_timer is not None:
            self.resume_timer.cancel()
        self.sock.close()
