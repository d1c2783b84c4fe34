"""Exceptions shared by the core and the modules.

Modules raise these to tell the core what to answer; replies.error_reply()
maps them to POP3 response codes (RFC 2449, RFC 3206) in one place.
"""


class ConfigError(Exception):
    """An administrator's mistake, reported as one line `WHERE: what is wrong`."""

    def __init__(self, where, message):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


class ModuleInitError(Exception):
    """Raised by a module's module_init() when its settings cannot work."""


class StorageError(Exception):
    """Base of the storage failures a client is told about."""


class StorageTempError(StorageError):
    """A failure that may go away: answer -ERR [SYS/TEMP]."""


class StoragePermError(StorageError):
    """A failure that will not go away by retrying: answer -ERR [SYS/PERM]."""


class MessageGone(StorageTempError):
    """One message is no longer there (another client expunged it): answer
    -ERR [SYS/TEMP] for that message only; the session goes on. Raised by
    storage_dump_* before the message's first chunk. Anywhere else it is
    what it derives from, a temporary failure."""


class MailboxInUse(StorageError):
    """Another session holds the mailbox: answer -ERR [IN-USE]."""


class LoginDelay(Exception):
    """The user logged in too recently: answer -ERR [LOGIN-DELAY]."""


class LoginFailed(Exception):
    """Credentials did not check out (unknown user or wrong password)."""


class LoginsBusy(Exception):
    """Too many logins wait to be checked: answer -ERR [SYS/TEMP] at once."""


class BadMailboxName(Exception):
    """An auth module gave a mailbox name that is not safe as a file name."""
