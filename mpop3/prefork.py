"""Several server processes on the same listening sockets (`processes N`).

One CPython process runs Python on one core at a time, and the storage
work in its worker threads competes with its event loop for the GIL; a few
processes accepting from the same sockets use every core (nginx's worker
processes). The parent binds, forks the workers, passes SIGTERM, SIGINT
and SIGHUP on to them, and starts a new one if one dies. Each worker is a
complete server with its own sessions: the session limits, the failed-login
delays and LOGIN-DELAY are counted per process.
"""

import ctypes
import logging
import os
import signal
import time

log = logging.getLogger("mpop3.server")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
RESPAWN_PAUSE = 1.0  # a worker that dies at once is not restarted in a tight loop
PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def supervise(conf, tables, sockets, serve):
    """Run conf.processes workers, each `serve(conf, tables, sockets=...)`,
    until told to stop; the parent's exit code."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    workers = {}  # pid -> start time
    for _ in range(conf.values["processes"]):
        pid, started = spawn(conf, tables, sockets, serve)
        workers[pid] = started
    log.info("started %d server processes: %s", len(workers), " ".join(map(str, workers)))
    stopping = False
    failed = False
    while workers:
        signum = signal.sigwaitinfo(SIGNALS).si_signo
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            stopping = stopping or signum != signal.SIGHUP
            for pid in workers:
                os.kill(pid, signum)
            continue
        for pid, status in reap():
            started = workers.pop(pid, None)
            if started is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                failed = failed or code != 0
                continue
            log.error("server process %d ended unexpectedly (exit code %d); starting another", pid, code)
            if time.monotonic() - started < RESPAWN_PAUSE:
                time.sleep(RESPAWN_PAUSE)
            new_pid, new_started = spawn(conf, tables, sockets, serve)
            workers[new_pid] = new_started
    log.info("all server processes stopped")
    return 1 if failed else 0


def spawn(conf, tables, sockets, serve):
    pid = os.fork()
    if pid == 0:  # the worker: a whole server of its own
        code = 1
        try:
            end_with_parent()
            # serve() unblocks SIGTERM, SIGINT and SIGHUP once it handles them
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            code = serve(conf, tables, sockets=sockets)
        except BaseException:
            log.exception("server process failed")
        finally:
            logging.shutdown()
            os._exit(code)
    return pid, time.monotonic()


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
