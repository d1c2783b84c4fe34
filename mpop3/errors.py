"""Exceptions shared by the core and the modules.

Modules raise these to tell the core what to answer; the session maps them
to POP3 response codes (RFC 2449, RFC 3206) in one place.
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

    code = "SYS/PERM"


class StorageTempError(StorageError):
    """A failure that may go away: answer -ERR [SYS/TEMP]."""

    code = "SYS/TEMP"


class StoragePermError(StorageError):
    """A failure that will not go away by retrying: answer -ERR [SYS/PERM]."""

    code = "SYS/PERM"


class MailboxInUse(StorageError):
    """Another session holds the mailbox: answer -ERR [IN-USE]."""

    code = "IN-USE"


class LoginDelay(Exception):
    """The user logged in too recently: answer -ERR [LOGIN-DELAY]."""
