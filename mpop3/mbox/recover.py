"""Repair at start-up (docs/mbox.md, "Recovery"): finish every commit a
crash interrupted, before the server accepts anyone.

A spool whose commit was interrupted has a stretch of it twice (or a
message cut) until its journal is replayed; MUAs, MDAs and IMAP servers
read /var/mail too and know nothing of journals. So the server replays
every journal in the state directory when it starts, rather than at each
mailbox's next login.

Each spool is repaired as its owner would repair it at a login: a server
started as root forks a process per owner that becomes that user (and
the spool directory's group, for dot-locks, where that group may write
there) before it opens anything, so root never opens, writes or links a
file a user could have planted. Spools owned by root, and spools that
are not regular files, are left alone and logged.
"""

import logging
import os
import pwd
import stat

from ..errors import MailboxInUse, StoragePermError, StorageTempError
from .spool import JOURNAL, Mailbox, check_mailbox_name

log = logging.getLogger("mpop3.storage")


def pending(settings):
    """The mailboxes with a journal (or a temporary one) in the state directory."""
    names, aside = set(), []
    try:
        entries = os.listdir(settings.state_dir)
    except OSError as e:
        log.error("%s: cannot list the state directory for interrupted commits: %s", settings.state_dir, e.strerror)
        return [], []
    for entry in entries:
        for suffix in (JOURNAL, JOURNAL + ".tmp"):
            if entry.endswith(suffix):
                names.add(entry[: -len(suffix)])
        if JOURNAL + ".orphaned" in entry:
            aside.append(entry)
    return sorted(names), sorted(aside)


def recover(settings):
    """Replay every pending journal, each as its spool's owner; log what was done."""
    names, aside = pending(settings)
    if aside:
        log.warning(
            "journals set aside, not applied, wait for the administrator in %s: %s",
            settings.state_dir,
            ", ".join(aside),
        )
    owners = {}
    for name in names:
        try:
            check_mailbox_name(name)
            st = os.lstat(os.path.join(settings.storage_dir, name))
        except StoragePermError:
            continue
        except FileNotFoundError:
            log.warning("%s: a commit journal waits for a spool that is not there; left alone", name)
            continue
        if not stat.S_ISREG(st.st_mode):
            log.error("%s: the spool is not a regular file; its commit journal is left alone", name)
        elif st.st_uid == 0:
            log.error("%s: the spool belongs to root, which repairs nothing; its commit journal is left alone", name)
        else:
            owners.setdefault(st.st_uid, []).append(name)
    if not owners:
        return
    log.info("repairing %d interrupted commit(s)", sum(len(n) for n in owners.values()))
    for uid, names in sorted(owners.items()):
        if os.geteuid() == 0:
            as_user(settings, uid, names)
        elif uid == os.geteuid():
            repair_all(settings, names)
        else:
            log.error(
                "%s: the spool belongs to uid %d, which this server (uid %d) cannot act as; its next login repairs it",
                ", ".join(names),
                uid,
                os.geteuid(),
            )


def repair_all(settings, names):
    for name in names:
        try:
            Mailbox.repair(settings, name)
        except MailboxInUse:
            log.info("%s: in use by a session, which repairs it", name)
        except (StorageTempError, StoragePermError) as e:
            log.error("%s: an interrupted commit could not be repaired (%s); its next login tries again", name, e)


def as_user(settings, uid, names):
    """repair_all() in a child process that is user `uid`, and nobody else."""
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:  # an owner without an account: the spool's group
        gid = os.lstat(os.path.join(settings.storage_dir, names[0])).st_gid
    mail_gid = spool_directory_group(settings.storage_dir) or gid
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(gid, gid, mail_gid)  # the directory's group: held as mail_group.py says
            os.setresuid(uid, uid, uid)
            repair_all(settings, names)
            code = 0
        except BaseException:
            log.exception("%s: repairing as uid %d failed", ", ".join(names), uid)
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        log.error("%s: the repair process of uid %d ended with status %#x", ", ".join(names), uid, status)


def spool_directory_group(directory):
    """The spool directory's group, if that group may create files there
    (Debian's /var/mail, root:mail 2775): dot-locks are made there; else None."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_gid if st.st_mode & stat.S_IWGRP and st.st_gid != 0 else None
