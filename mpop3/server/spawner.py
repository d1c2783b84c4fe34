"""The spawner of the split model (split.py): the parent of its mail
processes, so that the master forks none of them.

Forking the master for each mail process cost it about 3 ms a login (the
copy of its page tables, and copies of the pages it went on writing while
the child still shared them), and left the master waiting on each fork
while logins queued. The spawner is forked once, at start-up, before the
master has served anything; it runs no event loop and holds nothing of
the master's but the configuration and the module tables, frozen for the
garbage collector (gc.freeze), so its children copy only what they touch.
It stays root, to give each mail process its user, and reads only what
the master sends it.

From the master, one record per mail process to start: {"who": the
identity (privs.Identity), "one_user": whether it serves one user's
mailbox alone (mail_service.py)} with three descriptors beside it: the mail
process's socket to the master (mail_service.py), its channel for the
shared limits (supervisor.Channel) and its scoreboard segment (a memfd).
To the master, in that order: {"started": pid} or {"failed": reason} for
each, and {"ended": pid, "status": status} when one has been reaped.
SIGTERM: no more starts; it ends once its mail processes have.
"""

import gc
import logging
import os
import selectors
import signal
import socket

from . import privs, records, scoreboard
from .supervisor import HANDLED, Channel, end_with_parent, name_process, stop_waking, wake_on_signals

log = logging.getLogger("mpop3.server")


class Spawner:
    def __init__(self, requests, throttle, clock, prepare, serve, reload):
        self.requests = requests  # our socket to the master
        self.throttle = throttle  # the master's, as its children's channels fall back on them
        self.clock = clock
        self.prepare = prepare  # imports, and what else every mail process would do first
        self.serve = serve  # serve(who, one_user, sock, channel): a mail process's life, as that user
        self.reload = reload  # SIGHUP: re-read the configuration
        self.children = set()
        self.taking = True
        self.selector = selectors.DefaultSelector()
        self.wake = None

    def run(self):
        end_with_parent()
        self.wake = wake_on_signals()
        self.selector.register(self.wake[0], selectors.EVENT_READ, self.signalled)
        self.selector.register(self.requests, selectors.EVENT_READ, self.asked)
        self.prepare()
        gc.collect()
        gc.freeze()  # what is here now is never scanned again, here or in a child
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        while self.taking or self.children:
            for key, _ in self.selector.select():
                key.data()
        return 0

    def asked(self):
        try:
            record, fds = records.receive(self.requests)
        except BlockingIOError:
            return
        except (OSError, records.BadRecord) as e:
            log.error("spawner: bad request from the master (%s)", e)
            return
        if record is None:  # the master is gone or done with us
            self.stop_taking()
            return
        try:
            who = identity_from(record)
            one_user = records.flag(record, "one_user")
            if len(fds) != 3:
                raise records.BadRecord("a mail process needs three descriptors")
        except records.BadRecord as e:
            records.close_all(fds)
            self.answer({"failed": str(e)})
            return
        try:
            pid = self.fork(who, one_user, *fds)
        except OSError as e:
            self.answer({"failed": e.strerror or str(e)})
        else:
            self.children.add(pid)
            self.answer({"started": pid})
        finally:
            records.close_all(fds)

    def fork(self, who, one_user, sock_fd, channel_fd, segment_fd):
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)  # the child's loop unblocks them
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
            return pid
        code = 1
        try:
            self.leave()
            name_process("mail")
            scoreboard.own = scoreboard.Segment.attach(segment_fd)
            channel = Channel(socket.socket(fileno=channel_fd), self.throttle, self.clock)
            code = self.serve(who, one_user, socket.socket(fileno=sock_fd), channel)
        except BaseException:
            log.exception("mail process failed")
        finally:
            logging.shutdown()
            os._exit(code)

    def leave(self):
        """In a new mail process: nothing of the spawner's but the request's descriptors."""
        self.selector.close()
        self.requests.close()
        stop_waking(self.wake)

    def answer(self, record):
        try:
            records.send(self.requests, record)
        except OSError:  # the master is gone: our children end on their own
            self.stop_taking()

    def signalled(self):
        try:
            signums = os.read(self.wake[0], 512)
        except BlockingIOError:
            return
        if signal.SIGTERM in signums or signal.SIGINT in signums:
            self.stop_taking()
        if signal.SIGHUP in signums:
            self.reload()
        self.reap()

    def reap(self):
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.answer({"ended": pid, "status": status})

    def stop_taking(self):
        if self.taking:
            self.taking = False
            self.selector.unregister(self.requests)


def request(who, one_user):
    return {"who": [who.name, who.uid, who.gid, who.mail_gid], "one_user": one_user}


def identity_from(record):
    """The privs.Identity of a request; BadRecord if it is not one."""
    who = record.get("who")
    if not isinstance(who, list) or len(who) != 4:
        raise records.BadRecord("bad identity")
    name, uid, gid, mail_gid = who
    numbers = [uid, gid] + ([] if mail_gid is None else [mail_gid])
    if not isinstance(name, str) or not all(type(n) is int and 0 <= n < 2**32 for n in numbers):
        raise records.BadRecord("bad identity")
    return privs.Identity(name, uid, gid, mail_gid)
