"""storage_maildir's settings, and where mailbox M's Maildir is."""

import logging
import os
import pwd
from dataclasses import dataclass

from ..errors import ModuleInitError, StoragePermError

log = logging.getLogger("mpop3.storage")

UIDL_FORMATS = ("filename", "dovecot")


@dataclass(frozen=True)
class Settings:
    """The `> name value` lines, parsed (their meanings: the module's MPOP3_SETTINGS)."""

    mail_location: str = "~/Maildir"
    uidl_format: str = "filename"
    maildir_move_to_cur: bool = True
    mailbox_user: str = "mailbox"
    session_lock: str = "file"
    session_lock_connection: str = None

    @classmethod
    def parse(cls, conf):
        values = {}
        for name, value in conf.items():
            if name == "mail_location":
                check_pattern(value)
                values[name] = value
            elif name == "uidl_format":
                if value not in UIDL_FORMATS:
                    raise ModuleInitError(f"uidl_format: {value!r} is neither 'filename' nor 'dovecot'")
                values[name] = value
            elif name == "maildir_move_to_cur":
                if value not in ("yes", "no"):
                    raise ModuleInitError(f"maildir_move_to_cur: {value!r} is neither 'yes' nor 'no'")
                values[name] = value == "yes"
            elif name == "mailbox_user":
                if value not in ("mailbox", "any"):
                    raise ModuleInitError(f"mailbox_user: {value!r} is neither 'mailbox' nor 'any'")
                values[name] = value
            elif name == "session_lock":
                if value not in ("file", "postgresql"):
                    raise ModuleInitError(f"session_lock: {value!r} is neither 'file' nor 'postgresql'")
                values[name] = value
            elif name == "session_lock_connection":
                values[name] = value
            else:
                raise ModuleInitError(f"{name}: not a storage_maildir setting")
        if values.get("session_lock") == "postgresql" and not values.get("session_lock_connection"):
            raise ModuleInitError("session_lock postgresql needs session_lock_connection (a libpq string)")
        if values.get("session_lock_connection") and values.get("session_lock") != "postgresql":
            raise ModuleInitError("session_lock_connection is for session_lock postgresql")
        return cls(**values)


def check_pattern(pattern):
    """An absolute path or one under `~/`; `%u` and `%%` are the only escapes."""
    if not (pattern.startswith("/") or pattern.startswith("~/")):
        raise ModuleInitError(f"mail_location: {pattern!r} is neither absolute nor under ~/")
    rest = pattern.replace("%%", "").replace("%u", "")
    if "%" in rest:
        raise ModuleInitError(f"mail_location: {pattern!r}: only %u (the mailbox) and %% are known")


def check_mailbox_name(name):
    """The core validates names already; a path is built from this one, so again."""
    if (
        not name
        or "/" in name
        or name.startswith(".")
        or "\0" in name
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
        or len(os.fsencode(name)) > 255
    ):
        log.error("%r: refused as a mailbox name (not a file name)", name)
        raise StoragePermError("invalid mailbox name")


def maildir_path(pattern, name):
    """mail_location for mailbox `name`: %u replaced, a leading ~/ the home
    directory of the system user named like the mailbox."""
    check_mailbox_name(name)
    path = pattern.replace("%%", "\0").replace("%u", name).replace("\0", "%")
    if path.startswith("~/"):
        try:
            home = pwd.getpwnam(name).pw_dir
        except KeyError:
            log.error("%s: no system user of that name, so no ~/ for mail_location %s", name, pattern)
            raise StoragePermError("no such mailbox") from None
        path = os.path.join(home, path[2:])
    return path
