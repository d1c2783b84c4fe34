"""Several server processes on the same addresses (`processes N`).

One CPython process runs Python on one core at a time, and the storage
work in its worker threads competes with its event loop for the GIL; a few
processes, each with its own SO_REUSEPORT sockets, use every core (nginx's worker
processes). The parent binds, forks the workers, passes SIGTERM, SIGINT
and SIGHUP on to them, and starts a new one if one dies (if the system
will not let it fork, it tries again every RESPAWN_PAUSE). Each worker is
a complete server with its own sessions; max_sessions counts the sessions
of all of them (SessionTally), while max_sessions_per_ip, the failed-login
delays and LOGIN-DELAY are counted per process.
"""

import ctypes
import logging
import mmap
import os
import signal
import struct
import time

log = logging.getLogger("mpop3.server")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
RESPAWN_PAUSE = 1.0  # a worker that dies at once is not restarted in a tight loop
PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


class SessionTally:
    """The sessions all server processes hold, in memory they share, so
    that max_sessions counts them all. Each process writes only its own
    slot (no lock); processes admitting at the very same instant may let
    in one session each beyond the limit."""

    def __init__(self, slots):
        self.memory = mmap.mmap(-1, 8 * slots)  # anonymous and shared: survives fork
        self.slots = slots
        self.slot = 0

    def set(self, count):
        struct.pack_into("q", self.memory, 8 * self.slot, count)

    def total(self):
        return sum(struct.unpack_from(f"{self.slots}q", self.memory))

    def clear(self, slot):
        struct.pack_into("q", self.memory, 8 * slot, 0)


def supervise(conf, tables, socket_sets, serve):
    """Run a worker per set of listening sockets (bound with SO_REUSEPORT),
    each `serve(conf, tables, sockets=...)`, until told to stop; the
    parent's exit code. The parent keeps every set open, so connections
    queued for a worker that dies wait for its replacement."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    tally = SessionTally(len(socket_sets))
    workers = {}  # pid -> (start time, slot: its sockets and tally entry)
    unstarted = list(range(len(socket_sets)))  # slots whose worker is to be (re)started

    def start_workers():
        for slot in list(unstarted):
            try:
                pid = spawn(conf, tables, socket_sets[slot], serve, tally, slot)
            except OSError as e:  # EAGAIN (a process limit), ENOMEM: later
                log.error("cannot start a server process: %s; trying again in %g s", e.strerror, RESPAWN_PAUSE)
                return
            workers[pid] = (time.monotonic(), slot)
            unstarted.remove(slot)

    start_workers()
    log.info("started %d server processes: %s", len(workers), " ".join(map(str, workers)))
    stopping = False
    failed = False
    while workers or (unstarted and not stopping):
        if unstarted and not stopping:
            info = signal.sigtimedwait(SIGNALS, RESPAWN_PAUSE)
            if info is None:  # the pause is over: try again
                start_workers()
                continue
        else:
            info = signal.sigwaitinfo(SIGNALS)
        signum = info.si_signo
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            stopping = stopping or signum != signal.SIGHUP
            for pid in workers:
                os.kill(pid, signum)
            continue
        for pid, status in reap():
            started, slot = workers.pop(pid, (None, None))
            if started is None:
                continue
            tally.clear(slot)  # its sessions died with it
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                failed = failed or code != 0
                continue
            log.error("server process %d ended unexpectedly (exit code %d); starting another", pid, code)
            if time.monotonic() - started < RESPAWN_PAUSE:
                time.sleep(RESPAWN_PAUSE)
            unstarted.append(slot)
            start_workers()
    log.info("all server processes stopped")
    return 1 if failed else 0


def spawn(conf, tables, sockets, serve, tally, slot):
    pid = os.fork()
    if pid == 0:  # the worker: a whole server of its own
        code = 1
        try:
            end_with_parent()
            # serve() unblocks SIGTERM, SIGINT and SIGHUP once it handles them
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            tally.slot = slot
            code = serve(conf, tables, sockets=sockets, tally=tally)
        except BaseException:
            log.exception("server process failed")
        finally:
            logging.shutdown()
            os._exit(code)
    return pid


def end_with_parent():
    """Linux: get SIGTERM if the parent dies (even by SIGKILL), so that no
    worker is left serving on its own; the check after it covers a parent
    that died before the request was made."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's SIGTERM must do
        return
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)


def reap():
    """(pid, status) of every child that has ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status
