# A test auth module that plays a session process gone bad: logging in as
# "liar-N", it writes lie N to the listener's end of the session's socket
# pair (found as the socket whose peer is our parent) and fails the login.
# "vera" with "pw" logs in to the mailbox "vera".
include "mpop3_module.pxi"

import os
import socket

MPOP3_MODULE_CLASS = "auth"

LIES = [
    b"failed 127.0.0.1 zz\n",  # not hex (and an address of its choosing)
    b"succeeded 10.9.9.9\n",
    b"f" * 5000,  # no end of line, and far longer than any report
    b"wait 0123\n",  # a mailbox mark too short
    b"logged-in %s\nlogged-in %s\n" % (b"ab" * 16, b"cd" * 16),  # a session logs in once
]


def listener_channel():
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if sock.family == socket.AF_UNIX:
                peer_pid = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[:4], "little")
                if peer_pid == os.getppid():
                    return sock
        except OSError:
            pass
        sock.close()
    raise RuntimeError("no socket pair to the listener")


def auth_attempt_login(user, password):
    if user.startswith("liar-"):
        listener_channel().sendall(LIES[int(user[5:])])
        return None
    if (user, password) == ("vera", "pw"):
        return "vera"
    return None
