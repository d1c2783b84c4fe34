"""Several server processes on the same addresses (`processes N`).

One CPython process runs Python on one core at a time; a few processes,
each with its own SO_REUSEPORT sockets, use every core (nginx's worker
processes). The parent binds, forks the workers, passes SIGTERM, SIGINT
and SIGHUP on to them, and starts a new one if one dies (if the system
will not let it fork, it tries again every RESPAWN_PAUSE). Each worker is
a complete server with its own sessions. max_sessions and
max_sessions_per_ip count the sessions of all of them (shared_counts.py,
a column per worker); the failed-login delays and LOGIN-DELAY are the
parent's (mpop3/server/supervisor.py), so they too hold whichever worker
a client reaches.
"""

import logging
import os
import signal
import time

from .shared_counts import SharedCounts
from .supervisor import Supervisor, end_with_parent

log = logging.getLogger("mpop3.server")

RESPAWN_PAUSE = 1.0  # a worker that dies at once is not restarted in a tight loop


class Prefork(Supervisor):
    """Run a worker per set of listening sockets, each
    `serve_worker(conf, sockets, counts, channel)`, until told to stop. The
    parent keeps every set open, so connections queued for a worker that
    dies wait for its replacement."""

    def __init__(self, conf, socket_sets, serve_worker):
        super().__init__(conf)
        self.socket_sets = socket_sets
        self.serve_worker = serve_worker
        self.counts = SharedCounts.create(len(socket_sets), self.throttle.key)
        self.unstarted = list(range(len(socket_sets)))  # slots whose worker is to be (re)started
        self.next_start = 0.0  # monotonic time of the next attempt
        self.failed = False

    def started(self):
        self.start_workers()
        log.info("started %d server processes: %s", len(self.children), " ".join(map(str, self.children)))

    def timeout(self):
        if self.unstarted and not self.stopping:
            return max(0.0, self.next_start - time.monotonic())
        return None

    def tick(self):
        if self.unstarted and not self.stopping and time.monotonic() >= self.next_start:
            self.start_workers()

    def start_workers(self):
        for slot in list(self.unstarted):
            try:
                pid, channel = self.fork(role="server", slots=self.conf.values["max_sessions"])
            except OSError as e:  # EAGAIN (a process limit), ENOMEM: later
                log.error("cannot start a server process: %s; trying again in %g s", e.strerror, RESPAWN_PAUSE)
                self.next_start = time.monotonic() + RESPAWN_PAUSE
                return
            if pid == 0:
                self.become_worker(slot, channel)
            self.children[pid] = (time.monotonic(), slot)
            self.unstarted.remove(slot)

    def become_worker(self, slot, channel):
        """In the child: a whole server of its own, until it exits."""

        def serve():
            end_with_parent()
            # the worker unblocks SIGTERM, SIGINT and SIGHUP once it handles them
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            self.counts.column = slot
            return self.serve_worker(self.conf, self.socket_sets[slot], self.counts, channel)

        self.child_main("server process", serve)

    def child_ended(self, pid, status):
        started, slot = self.children.pop(pid)
        self.counts.clear(slot)  # its sessions died with it
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            self.failed = self.failed or code != 0
            return
        log.error("server process %d ended unexpectedly (exit code %d); starting another", pid, code)
        self.unstarted.append(slot)
        self.next_start = max(self.next_start, started + RESPAWN_PAUSE)

    def finished(self):
        log.info("all server processes stopped")
        return 1 if self.failed else 0
