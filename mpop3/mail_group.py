"""The mail group, held only while state files are made or removed.

On Debian /var/mail is root:mail 2775 and every spool is 0660 user:mail:
an MDA's dot-lock (and mpop3's markers and journals, kept beside the
spools by default) can only be created there through group `mail`, and
that same group reads every spool. So a process that gave up root keeps
`mail_group` as its saved gid only (mpop3/server/privs.py), never as a
supplementary group, and makes it its effective gid just while it opens,
commits or closes a mailbox, and only where the directory refuses it
without the group (Dovecot's mail_privileged_group works the same way).
Reading mail and parsing a client's commands happen without it.

What it does not do: code that can call setegid() (a process taken over
by an attacker) can still take the saved group back.
"""

import contextlib
import os
import threading

_lock = threading.Lock()  # the effective gid is the whole process's
_holders = 0


def needed(directories):
    """Whether any of `directories` refuses to let us create files in it
    as we are (os.access judges by the real ids: without the group)."""
    return any(not os.access(d, os.W_OK | os.X_OK) for d in directories)


@contextlib.contextmanager
def held_for(*directories):
    """The saved gid as effective gid for the duration, if there is one
    and these directories need it; else nothing changes."""
    global _holders
    real, _, saved = os.getresgid()
    if saved == real or os.geteuid() == 0 or not needed(directories):
        yield
        return
    with _lock:
        if _holders == 0:
            os.setegid(saved)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                os.setegid(real)
