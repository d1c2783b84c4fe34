"""A login process of the split model (split.py): `python -m
mpop3.server.login_process FD`, started by the master with a setup record
on descriptor FD.

A fresh interpreter, not a fork of the master: it has loaded no module,
so no password database and no spool was ever in its memory. While still
root it reads the configuration and the TLS key; then it locks itself in
(an empty root directory, `login_user`, no supplementary group, no
capability) before the first client byte, and serves the AUTHORIZATION
state of many sessions on uvloop: greeting, CAPA, STLS and implicit TLS,
USER/PASS/APOP/AUTH, whose credentials the auth process checks
(auth_service.py). A session that logs in is handed to the master with
the auth process's ticket: a cleartext client's own socket, or, for TLS,
one end of a socket pair this process then relays to in clear (the TLS
state cannot leave the process that made it).
"""

import json
import logging
import os
import socket
import sys

from .. import config
from .. import log as logs
from ..loader import Tables
from ..storage_functions import StorageFunctions
from . import scoreboard, tls
from .auth_service import AuthClient
from .limits import LoginDelayClock, LoginThrottle
from .shared_counts import SharedCounts
from .supervisor import Channel, name_process

log = logging.getLogger("mpop3.server")


def main(setup_fd):
    name_process("login")
    with os.fdopen(setup_fd, "rb") as f:
        setup = json.loads(f.read())
    conf = config.load(setup["config"])
    logs.setup(conf, debug=setup["debug"])
    conf.tls_context = tls.context_from_config(conf)  # as root: the key may be root's alone
    throttle = LoginThrottle(conf.values["login_fail_delay"], conf.values["login_fail_delay_max"])
    throttle.key = bytes.fromhex(setup["key"])  # the master's: the records it keeps are keyed with it
    channel = Channel(socket.socket(fileno=setup["channel"]), throttle, LoginDelayClock())
    handoffs = socket.socket(fileno=setup["handoff"])
    auth = AuthClient(setup["auth"], setup["apop"], setup["cram_md5"], setup["login_delay"])
    tables = Tables(auth, StorageFunctions(), [])
    listening = [socket.socket(fileno=fd) for fd in setup["listen"]]
    scoreboard.own = scoreboard.Segment.attach(setup["scoreboard"])
    counts = None
    if setup["counts"] is not None:
        fd, columns, column = setup["counts"]
        counts = SharedCounts.attach(fd, columns, throttle.key, column)
    prepare_for_the_jail()
    lock_in(setup["root"], setup["user"])
    from .login_service import serve_logins

    return serve_logins(conf, tables, listening, channel, handoffs, counts)


def prepare_for_the_jail():
    """Import now what would be imported later, from files the jail hides."""
    import asyncio  # noqa: F401
    import encodings.idna  # noqa: F401
    import ssl  # noqa: F401

    import uvloop  # noqa: F401

    from . import login_service  # noqa: F401


def lock_in(root, user):
    """chroot into `root`, then become `user` for good, with no
    supplementary group and no capability (a uid change from root clears
    them all)."""
    import pwd

    who = pwd.getpwnam(user)
    os.chroot(root)
    os.chdir("/")
    os.setgroups([])
    os.setresgid(who.pw_gid, who.pw_gid, who.pw_gid)
    os.setresuid(who.pw_uid, who.pw_uid, who.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise SystemExit("a login process could become root again; stopping")


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
