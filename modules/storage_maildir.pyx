"""storage_maildir: Maildir mailboxes (docs/maildir.md).

The storage function table (mpop3/storage_functions.py) over the Maildir
engine, mpop3/maildir: a handle is an mpop3.maildir.box.Maildir, which
locks, lists, streams messages through the mbox engine's kernel and
commits at QUIT. Nothing here needs more from the core than storage_mbox
gets: the table is unchanged (ABI version as it was).
"""

include "mpop3_module.pxi"

from mpop3.maildir.box import Maildir
from mpop3.maildir.settings import Settings
from mpop3.storage_functions import WU_ANY, WU_MAILBOX

MPOP3_MODULE_CLASS = "storage"
MPOP3_SETTINGS = {
    "mail_location": "where mailbox M's Maildir is: %u is M, a leading ~/ the home of the system user M (default ~/Maildir)",
    "uidl_format": "'filename' (default: the name up to ':', or its digest) or 'dovecot' (Dovecot's %08Xu%08Xv from dovecot-uidlist, read only)",
    "maildir_move_to_cur": "yes (default) or no: whether QUIT moves retrieved messages from new/ to cur/ with the S flag",
    "mailbox_user": "who opens a Maildir: 'mailbox' (its user, default) or 'any' (the server's user)",
    "session_lock": "'file' (default: a marker file in the Maildir, one node) or 'postgresql' (an advisory lock, one [IN-USE] across nodes)",
    "session_lock_connection": "with session_lock postgresql: the libpq connection string of the database holding the locks",
}

cdef object settings = Settings()


def module_init(conf):
    global settings
    settings = Settings.parse(conf)


def storage_need_user():
    # a Maildir is its user's: open it as that user, as storage_mbox does,
    # unless every Maildir belongs to the server's own user
    return WU_MAILBOX if settings.mailbox_user == "mailbox" else WU_ANY


def storage_lock_mailbox(mailbox):
    return Maildir.open(settings, mailbox)


def storage_message_count(box):
    return len(box.entries)


def storage_message_sizes(box):
    return box.sizes


def storage_uidl_supported(box):
    return True


def storage_unique_ids(box):
    return box.unique_ids()


def storage_dump_fragment(box, index, body_lines):
    return box.dump(index, body_lines)


def storage_synch(box, deleted):
    box.remove(deleted)


def storage_unlock_mailbox(box):
    box.close()
