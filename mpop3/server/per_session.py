"""A process per session, for the privilege rules that switch users after
login (rules 1 and 2, mpop3/server/privs.py): a uid belongs to a process.

The listener keeps root only for this: it accepts, counts, and forks. It
runs no event loop and no session code, so the child starts clean: it
serves its one connection on a loop of its own and gives up root for good
once the user has authenticated. A session process that crashes takes
nothing else with it. What must outlive one session lives in the listener
(a Supervisor): the session counts, the failed-login delays per client
address and the LOGIN-DELAY clock, which a session process asks over its
socket pair.
"""

import asyncio
import gc
import logging
import os
import selectors
import time

from ..protocol import replies
from .accept import BACK_OFF, accept_batch
from .limits import Admission
from .service import new_loop
from .supervisor import Supervisor

log = logging.getLogger("mpop3.server")


class SessionProcesses(Supervisor):
    """Accept on `sockets`; serve each connection in a child with
    `serve_session(conf, sock, channel)`."""

    def __init__(self, conf, sockets, serve_session):
        super().__init__(conf)
        self.sockets = sockets
        self.serve_session = serve_session
        values = conf.values
        self.admission = Admission(values["max_sessions"], values["max_sessions_per_ip"], None, values["ipv6_prefix"])
        self.resume_at = None  # accepting paused until then (out of descriptors)

    def started(self):
        for sock in self.sockets:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, self.accept)
        log.info("serving each session in a process of its own")
        prepare_for_forks()

    def accept(self, listening):
        accepted, exhausted = accept_batch(listening)
        for conn, peer in accepted:
            self.start_session(conn, peer[0])
        if exhausted and self.resume_at is None:  # out of descriptors: wait for children to end
            for sock in self.sockets:
                self.selector.unregister(sock)
            self.resume_at = time.monotonic() + BACK_OFF

    def timeout(self):
        return None if self.resume_at is None else max(0.0, self.resume_at - time.monotonic())

    def tick(self):
        if self.resume_at is not None and time.monotonic() >= self.resume_at and not self.stopping:
            self.resume_at = None
            for sock in self.sockets:
                self.selector.register(sock, selectors.EVENT_READ, self.accept)

    def start_session(self, conn, address):
        refusal = self.admission.admit(address)
        if refusal is not None:
            refuse(conn, refusal)
            return
        try:
            pid, channel = self.fork(address, role="session", slots=1)
        except OSError as e:  # EAGAIN (a process limit), ENOMEM, no socket pair
            log.error("%s: refused, cannot start a session process: %s", address, e.strerror)
            self.admission.release(address)
            refuse(conn, replies.ERR_NO_SESSION_PROCESS)
            return
        if pid == 0:
            self.become_session(conn, channel)
        conn.close()
        self.children[pid] = address

    def become_session(self, conn, channel):
        """In the child: serve, then exit."""

        def serve():
            conn.setblocking(False)
            return self.serve_session(self.conf, conn, channel)

        self.child_main("session process", serve)

    def child_ended(self, pid, status):
        address = self.children.pop(pid)
        self.admission.release(address)
        if os.WIFSIGNALED(status):
            log.error("session process %d (%s) killed by signal %d", pid, address, os.WTERMSIG(status))

    def stop_accepting(self):
        log.info("stopping: %d session%s open", len(self.children), "" if len(self.children) == 1 else "s")
        for sock in self.sockets:
            if self.resume_at is None:
                self.selector.unregister(sock)
            sock.close()

    def reloaded(self, new):
        self.admission.max_sessions = new.values["max_sessions"]
        self.admission.max_per_address = new.values["max_sessions_per_ip"]


def prepare_for_forks():
    """Do once here what every session process would otherwise do on its
    own: an event loop's first creation imports and caches a good deal.
    Then freeze what is loaded, so that the collector in a session process
    does not touch (and so copy) the pages it shares with us."""
    loop = new_loop()
    asyncio.set_event_loop(loop)
    loop.close()
    asyncio.set_event_loop(None)
    gc.collect()
    gc.freeze()


def refuse(conn, reply):
    try:
        conn.setblocking(False)
        conn.send(reply.wire)
    except OSError:
        pass
    finally:
        conn.close()
