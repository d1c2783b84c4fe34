"""The storage function table: what a storage module may define.

This file is the storage module writer's reference, as
`storage_functions.h` was for the C program. A storage module is a compiled
extension that sets

    MPOP3_MODULE_CLASS = "storage"
    MPOP3_ABI_VERSION  (from `include "mpop3_module.pxi"`)
    MPOP3_SETTINGS = {"name": "what it means", ...}   # the `> name value` lines it accepts
    def module_init(settings): ...                    # optional; gets {name: value}

and defines any of the functions below under the same names, with the same
arguments (minus `self`). The first storage module in mpop3.conf that
defines a name supplies it; names no module defines use the defaults here.

In C one process served one session and the mailbox was global state; here
one process may serve many sessions, so storage_lock_mailbox() returns a
handle (any object the module likes) and every other entry takes it first.
Messages are numbered from 0 here; the core translates POP3's numbers.

Failures are reported by raising mpop3.errors.MailboxInUse (-ERR [IN-USE]),
StorageTempError (-ERR [SYS/TEMP]) or StoragePermError (-ERR [SYS/PERM]).
A StorageTempError from RETR or TOP ends the session (the mailbox changed
under it), except MessageGone: one message is no longer there (a Maildir
file another client expunged), and the core answers -ERR [SYS/TEMP] for
that message alone while the session goes on. Raise it from
storage_dump_* before the first chunk.
Entries may block (disk I/O): the server calls the slow ones, lock and
synch, off its event loop.

Privileges: every entry runs after the switch away from root (README.md,
"Privileges"), as the user storage_need_user() asked for.

The defaults describe an empty mailbox, so a configuration without a
storage module serves nothing rather than failing.
"""

from .function_table import FunctionTable

# storage_need_user() answers (the C program's wuAny, wuDefault, wuMailbox)
WU_ANY = 0  # any identity will do: no switch is needed for storage
WU_DEFAULT = 1  # switch to safe_user before opening the mailbox
WU_MAILBOX = 2  # switch to the system user named like the mailbox


class StorageFunctions(FunctionTable):
    CLASS = "storage"

    def storage_need_user(self):
        """Which identity opening mailboxes needs: WU_ANY, WU_DEFAULT or WU_MAILBOX.

        Asked once at start-up; decides the privilege rules. Default: WU_ANY.
        """
        return WU_ANY

    def storage_lock_mailbox(self, mailbox):
        """Open and index `mailbox` for one session; return its handle.

        Called once per session after a successful login. Raise MailboxInUse
        if another session has it. The messages the session sees are fixed
        here: mail arriving later waits for the next session.
        Default: an empty mailbox (handle None).
        """
        return None

    def storage_message_count(self, handle):
        """How many messages the session sees. Default: 0."""
        return 0

    def storage_message_sizes(self, handle):
        """A sequence of each message's size in octets, as RETR sends it
        (CRLF line ends, before dot-stuffing). Default: empty."""
        return ()

    def storage_uidl_supported(self, handle):
        """Whether storage_unique_ids() works. Default: False (no UIDL)."""
        return False

    def storage_unique_ids(self, handle):
        """A sequence of each message's unique id: 1-70 characters in
        0x21-0x7E, stable across sessions, unique within the mailbox.
        Called only if storage_uidl_supported(). Default: empty."""
        return ()

    def storage_dump_fragment(self, handle, index, body_lines):
        """The building block of RETR and TOP: an iterable of bytes chunks.

        The chunks together are message `index` as it goes on the wire:
        every line ended by CRLF, lines starting with "." stuffed, the
        header, and then `body_lines` lines of the body (all of it if
        None), terminated by ".\\r\\n". Chunks should be bounded (64 KiB
        or so) so a large message never sits in memory.
        Default: an empty message.
        """
        return (b".\r\n",)

    def storage_dump_message(self, handle, index):
        """RETR: the whole message. Default: storage_dump_fragment(handle, index, None)."""
        return self.storage_dump_fragment(handle, index, None)

    def storage_dump_headers(self, handle, index):
        """TOP n 0: the header only. Default: storage_dump_fragment(handle, index, 0)."""
        return self.storage_dump_fragment(handle, index, 0)

    def storage_dump_message_lines(self, handle, index, lines):
        """TOP n k: the header and `lines` body lines.
        Default: storage_dump_fragment(handle, index, lines)."""
        return self.storage_dump_fragment(handle, index, lines)

    def storage_synch(self, handle, deleted):
        """Commit the session: remove the messages whose indexes are in `deleted`.

        Called at QUIT in the UPDATE state, never for a session that ended
        otherwise. Must lose nothing: mail that arrived during the session
        stays, and a failure leaves the mailbox as it was (raise
        StorageTempError or StoragePermError). Default: nothing to do.
        """

    def storage_unlock_mailbox(self, handle):
        """Release the mailbox; called exactly once per successful
        storage_lock_mailbox(), after storage_synch() if there was one.
        Default: nothing to do."""

    def storage_recover(self):
        """Finish what a crash left half done, before any session starts.

        Called once when a server starts listening (not in stdin mode, where
        each session's process starts on its own), before it accepts a
        connection: as root if the server was started as root, and before
        it gives root up, so a module must itself act as each mailbox's
        owner (and must not trust what less privileged users could have
        planted). Errors are the module's to log; it should raise nothing.
        Default: nothing to do.
        """
