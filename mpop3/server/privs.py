"""Giving up root: the C program's four rules (docs/architecture.md,
"Privileges").

Started as root, mpop3 switches to an unprivileged user as early as its
modules allow:
  1. storage needs a user (not WU_ANY): after authentication, to safe_user
     (WU_DEFAULT) or to the system user named like the mailbox (WU_MAILBOX);
  2. else auth needs root: after authentication, to safe_user;
  3. else, listening on TCP: right after bind(), to safe_user;
  4. else (stdin mode): at once, to safe_user.
Rules 1 and 2 switch per session, so they need a process per session.
The process models (mpop3/server/models.py) ask plan_for() which rule
applies, and switch with switch_or_log() or a session's before_open hook.
"""

import grp
import logging
import os
import pwd
import sys
from dataclasses import dataclass

from ..errors import StoragePermError
from ..storage_functions import WU_ANY, WU_MAILBOX

log = logging.getLogger("mpop3.server")

AFTER_AUTH = "after authentication"
AFTER_BIND = "after bind"
AT_ONCE = "at once"


class PrivilegeError(Exception):
    """Switching users failed: the process must not go on serving."""


@dataclass(frozen=True)
class Plan:
    when: str  # AFTER_AUTH, AFTER_BIND or AT_ONCE
    to_mailbox_user: bool  # rule 1 with WU_MAILBOX: the user named like the mailbox

    @property
    def process_per_session(self):
        return self.when == AFTER_AUTH


def plan(storage_need_user, auth_need_root, stdin_mode):
    if storage_need_user != WU_ANY:
        return Plan(AFTER_AUTH, storage_need_user == WU_MAILBOX)
    if auth_need_root:
        return Plan(AFTER_AUTH, False)
    return Plan(AT_ONCE if stdin_mode else AFTER_BIND, False)


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gid: int
    mail_gid: int | None = None  # kept as the saved gid only (mpop3/mail_group.py)


def identity(user_name, mail_group=None):
    """The identity to switch to; KeyError if the user does not exist."""
    pw = pwd.getpwnam(user_name)
    mail_gid = None
    if mail_group:
        try:
            mail_gid = grp.getgrnam(mail_group).gr_gid
        except KeyError:
            mail_gid = None
    return Identity(pw.pw_name, pw.pw_uid, pw.pw_gid, mail_gid)


class SessionIdentities:
    """Who serves a mailbox after login (rules 1 and 2).

    WU_MAILBOX: the system user named like the mailbox; a mailbox without a
    system account (a virtual user of auth_file, say) is served as
    `mail_owner`, which defaults to safe_user. Everything else: safe_user.

    The fixed identity is looked up once, where this is made (the listener,
    before any session process exists): that also loads the name service's
    modules there, which each session process would otherwise load again.
    """

    def __init__(self, plan, values):
        self.to_mailbox_user = plan.to_mailbox_user
        fixed = (values["mail_owner"] or values["safe_user"]) if plan.to_mailbox_user else values["safe_user"]
        self.fixed = identity(fixed, values["mail_group"])

    def for_mailbox(self, mailbox):
        if not self.to_mailbox_user:
            return self.fixed
        try:
            pw = pwd.getpwnam(mailbox)
        except KeyError:
            return self.fixed
        if pw.pw_uid == 0 or pw.pw_gid == 0:
            raise PrivilegeError(f"mailbox {mailbox!r} belongs to a root account; refusing to serve it")
        return Identity(pw.pw_name, pw.pw_uid, pw.pw_gid, self.fixed.mail_gid)


def check_safe_user(user_name):
    """A string saying what is wrong with safe_user, or None if it is usable."""
    try:
        pw = pwd.getpwnam(user_name)
    except KeyError:
        return f"safe_user {user_name!r} does not exist"
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        return f"safe_user {user_name!r} has uid or gid 0: it must not be root"
    return None


def python_closed_at():
    """The first directory on the way to this Python's own files that other
    users may not enter, or None. After giving up root, mpop3 still runs
    Python, which may still import from there."""
    path = "/"
    for part in os.path.realpath(sys.base_prefix).strip("/").split("/"):
        path = os.path.join(path, part)
        if not os.stat(path).st_mode & 0o001:
            return path
    return None


def open_way_to_python():
    """Let other users through the directories to this Python's files
    (search only, no listing), as a system Python's are: what a root-started
    server needs on a machine whose Python lives under /root (pyenv)."""
    while (closed := python_closed_at()) is not None:
        os.chmod(closed, os.stat(closed).st_mode | 0o001)


def running_as_root():
    return os.geteuid() == 0


def switch_to(who):
    """Become `who` for good: no supplementary groups, then gid, then uid,
    all three of real, effective and saved ids, so nothing can bring root
    back; the mail group, if any, stays as the saved gid alone."""
    if who.uid == 0:
        raise PrivilegeError(f"refusing to switch to {who.name!r}: uid 0")
    saved_gid = who.gid if who.mail_gid is None else who.mail_gid
    try:
        os.setgroups([])
        os.setresgid(who.gid, who.gid, saved_gid)
        os.setresuid(who.uid, who.uid, who.uid)
    except OSError as e:
        raise PrivilegeError(f"cannot switch to user {who.name!r}: {e.strerror}") from None
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("switched users but could regain root; stopping")
    if os.getresuid() != (who.uid,) * 3 or os.getresgid() != (who.gid, who.gid, saved_gid) or os.getgroups():
        raise PrivilegeError(f"switching to {who.name!r} left ids {os.getresuid()} {os.getresgid()} {os.getgroups()}")
    log.debug("now running as %s (uid %d, gid %d, mail gid %s)", who.name, who.uid, who.gid, who.mail_gid)


# --- what the process models ask ---------------------------------------------


def plan_for(tables, stdin_mode):
    """The privilege rules' plan for these modules, or None when not started as root."""
    if not running_as_root():
        log.info("not started as root: running as uid %d, no user switching", os.geteuid())
        return None
    chosen = plan(tables.storage.storage_need_user(), tables.auth.auth_need_root(), stdin_mode)
    log.info(
        "started as root: switching users %s%s",
        chosen.when,
        " to each mailbox's user" if chosen.to_mailbox_user else " to safe_user",
    )
    closed = python_closed_at()
    if closed is not None:
        log.warning(
            "%s is closed to other users, and Python runs from under it: after giving up "
            "root, mpop3 may fail to import (chmod o+x %s, or use a system Python)",
            closed,
            closed,
        )
    return chosen


def safe_identity(conf):
    return identity(conf.values["safe_user"], conf.values["mail_group"])


def switch_or_log(who):
    """switch_to(who); False (logged) if it failed."""
    try:
        switch_to(who)
    except PrivilegeError as e:
        log.error("%s", e)
        return False
    return True


def after_login_switch(chosen, conf):
    """The session's before_open hook for rules 1 and 2: become the
    mailbox's user (or safe_user) before the mailbox is opened. None when
    no switch happens after login. The configuration has checked that
    safe_user and mail_owner exist."""
    if chosen is None or chosen.when != AFTER_AUTH:
        return None
    identities = SessionIdentities(chosen, conf.values)

    def before_open(mailbox):
        try:
            who = identities.for_mailbox(mailbox)
        except (PrivilegeError, KeyError) as e:  # nothing has changed yet
            log.error("mailbox %s: cannot tell whom to serve it as: %s", mailbox, e)
            raise StoragePermError() from None
        if not switch_or_log(who):
            # half switched is worse than not serving: end the process now
            logging.shutdown()
            os._exit(1)

    return before_open
