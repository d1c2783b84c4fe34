"""The spawner of the split model (split.py): the parent of its mail
processes, so that the master forks none of them.

Forking the master for each mail process cost it about 3 ms a login (the
copy of its page tables, and copies of the pages it went on writing while
the child still shared them), and left the master waiting on each fork
while logins queued. The spawner is forked once, at start-up, before the
master has served anything; it runs no event loop and holds nothing of
the master's but the configuration and the module tables, frozen for the
garbage collector (gc.freeze), so its children copy only what they touch,
and its loop is in C (_forks.pyx), so that it writes few pages between
two forks. It stays root, to give each mail process its user, and reads
only what the master sends it, in the child it starts for it.

From the master, one record per mail process to start: {"who": the
identity (privs.Identity), "one_user": whether it serves one user's
mailbox alone (mail_service.py)} with three descriptors beside it: the mail
process's socket to the master (mail_service.py), its channel for the
shared limits (supervisor.Channel) and its scoreboard segment (a memfd).
To the master, in that order: {"started": pid} or {"failed": reason} for
each, and {"ended": pid, "status": status} when one has been reaped.
SIGTERM: no more starts; it ends once its mail processes have. With the
master gone, it ends at once (the mail processes serve on).
"""

import json
import logging
import os
import signal
import socket

from . import _forks, privs, records, scoreboard
from .supervisor import HANDLED, Channel, end_with_parent, name_process, stop_waking, wake_on_signals

log = logging.getLogger("mpop3.server")


class Spawner:
    def __init__(self, requests, throttle, clock, prepare, serve, reload):
        self.requests = requests  # our socket to the master
        self.throttle = throttle  # the master's, as its children's channels fall back on them
        self.clock = clock
        self.prepare = prepare  # imports, and what else every mail process would do first, then gc.freeze
        self.serve = serve  # serve(who, one_user, sock, channel): a mail process's life, as that user
        self.reload = reload  # SIGHUP: re-read the configuration
        self.taking = True
        self.wake = None

    def run(self):
        """Fork what the master asks for until it is gone, or until told to
        stop and every mail process has ended (reaped, and said)."""
        end_with_parent()
        self.wake = wake_on_signals()
        self.prepare()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        while True:
            outcome = _forks.serve(self.requests.fileno(), self.wake[0], self.taking, list(HANDLED), signal.SIGCHLD)
            if outcome[0] == "child":
                self.be_mail(*outcome[1:])  # does not return
            if outcome[0] != "signals":  # idle, or the master is gone (our children end on their own)
                return 0
            if signal.SIGTERM in outcome[1] or signal.SIGINT in outcome[1]:
                self.taking = False
            if signal.SIGHUP in outcome[1]:
                self.reload()

    def be_mail(self, data, fds):
        """In a new child: serve the request as a mail process, then exit."""
        code = 1
        try:
            self.requests.close()
            stop_waking(self.wake)
            name_process("mail")
            who, one_user = judge(data, fds)
            sock_fd, channel_fd, segment_fd = fds
            scoreboard.own = scoreboard.Segment.attach(segment_fd)
            channel = Channel(socket.socket(fileno=channel_fd), self.throttle, self.clock)
            code = self.serve(who, one_user, socket.socket(fileno=sock_fd), channel)
        except records.BadRecord as e:
            log.error("spawner: bad request from the master (%s)", e)
        except BaseException:
            log.exception("mail process failed")
        finally:
            logging.shutdown()
            os._exit(code)


def judge(data, fds):
    """(identity, one_user) of a request; BadRecord if it is not one."""
    try:
        record = json.loads(data)
    except ValueError:
        raise records.BadRecord("not JSON") from None
    if not isinstance(record, dict) or len(fds) != 3:
        raise records.BadRecord("a request is an object with three descriptors")
    return identity_from(record), records.flag(record, "one_user")


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
