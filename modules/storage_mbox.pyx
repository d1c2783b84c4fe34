"""storage_mbox: mbox spools, the default storage (docs/mbox.md).

The storage function table (mpop3/storage_functions.py) over the mbox
engine, mpop3/mbox: a handle is an mpop3.mbox.spool.Mailbox, which opens,
locks, checks and commits; the per-message answers (sizes, unique ids,
where RETR reads) come straight from its index's C array.
"""

include "mpop3_module.pxi"

from mpop3.mbox._kernels cimport MboxIndex, MsgEntry, mbox_uid

from mpop3.mbox._kernels import dump
from mpop3.mbox.recover import recover
from mpop3.mbox.spool import Mailbox, Settings
from mpop3.storage_functions import WU_ANY, WU_MAILBOX

MPOP3_MODULE_CLASS = "storage"
MPOP3_SETTINGS = {
    "storage_dir": "the spool directory, the C program's MBOX_ROOT (default /var/mail)",
    "mbox_locks": "how MDAs lock spools here: dotlock, fcntl, both (default 'dotlock fcntl') or none",
    "mbox_lock_timeout": "seconds to wait for an MDA's lock before -ERR [SYS/TEMP] (default 20)",
    "mbox_dotlock_stale": "age in seconds after which a dot-lock is broken, procmail's LOCKTIMEOUT (default 1024)",
    "mbox_state_dir": "where session markers and commit journals live (default: storage_dir)",
    "mailbox_user": "who opens a spool: 'mailbox' (its user, default) or 'any' (the server's user)",
}

cdef object settings = Settings()


def module_init(conf):
    global settings
    settings = Settings.parse(conf)


def storage_need_user():
    # a spool is its user's file: open it as that user (the C module's
    # wuMailbox), unless every spool belongs to the server's own user
    return WU_MAILBOX if settings.mailbox_user == "mailbox" else WU_ANY


def storage_lock_mailbox(mailbox):
    return Mailbox.open(settings, mailbox)


def storage_message_count(box):
    return len(box.index)


def storage_message_sizes(box):
    cdef MboxIndex index = box.index
    cdef Py_ssize_t i
    return [index.msgs[i].size for i in range(index.count)]


def storage_uidl_supported(box):
    return True


def storage_unique_ids(box):
    cdef MboxIndex index = box.index
    cdef Py_ssize_t i
    return [mbox_uid(&index.msgs[i]) for i in range(index.count)]


def storage_dump_fragment(box, index, body_lines):
    cdef MboxIndex messages = box.index
    cdef const MsgEntry *m
    box.check_unchanged("RETR/TOP")
    box.check_from_lines((index,), "RETR/TOP")
    m = messages.entry(index)
    return box.reading(dump(box.fd, m.data, m.end, body_lines))


def storage_synch(box, deleted):
    box.remove_messages(deleted)


def storage_unlock_mailbox(box):
    box.close()


def storage_recover():
    # every journal a crash left, replayed now, each as its spool's owner
    recover(settings)
