"""auth_getpw: system accounts (getpwnam, getspnam, crypt(3) via libcrypt).

Like the C module it replaces only auth_attempt_login and auth_timestamp
(None: there are no plaintext passwords, so no APOP). Reading the shadow
file needs root, hence auth_need_root(). Refused: names no account can
have (checked before any name service is asked: plausible_account_name
in mpop3.passwords), unknown users, accounts below min_uid (system
accounts), locked or disabled passwords ("!", "*", empty), expired accounts, and an empty password
(even where the account's hash is a hash of it). A login answers with the
account's own name as the name service spells it, so that with a service
that ignores case (sssd, LDAP) ALICE and alice are one mailbox.

Every attempt, refused for any reason or not, costs one crypt(3) per cost
class among the accounts' hashes (mpop3.passwords.HashCosts): the classes
of the local shadow file's accounts that may log in, read at start and
again when the file changes, and any other class an account from a
directory turns out to have. So timing does not tell which users exist.
"""

include "mpop3_module.pxi"

import logging
import os
import threading
import time

from libc.stdlib cimport free, malloc

from mpop3.errors import ModuleInitError
from mpop3.passwords import HashCosts, cost_class, crypt, gensalt, plausible_account_name

MPOP3_MODULE_CLASS = "auth"
MPOP3_SETTINGS = {
    "min_uid": "the lowest uid that may log in (default 1000: no system accounts)",
}


cdef extern from "<pwd.h>" nogil:
    ctypedef unsigned int uid_t
    ctypedef unsigned int gid_t
    struct passwd:
        char *pw_name
        char *pw_passwd
        uid_t pw_uid
        gid_t pw_gid
        char *pw_dir
        char *pw_shell
    int getpwnam_r(const char *name, passwd *pwd, char *buf, size_t buflen, passwd **result)

cdef extern from "<shadow.h>" nogil:
    struct spwd:
        char *sp_namp
        char *sp_pwdp
        long sp_lstchg
        long sp_expire
    int getspnam_r(const char *name, spwd *spbuf, char *buf, size_t buflen, spwd **spbufp)
    void setspent()
    int getspent_r(spwd *spbuf, char *buf, size_t buflen, spwd **spbufp)
    void endspent()

DEF LOOKUP_BUFFER = 16384

log = logging.getLogger("mpop3.auth")

# The longest name looked up, in bytes: the system's own limit for login
# names (LOGIN_NAME_MAX, 256 with the NUL). Long enough for the names of
# directories (alice@corp.example.org, DOMAIN\alice).
SHADOW = "/etc/shadow"  # rescanned for hash cost classes when it changes

cdef long min_uid = 1000
cdef object costs = HashCosts()
cdef object shadow_stamp = None
scan_lock = threading.Lock()


def module_init(settings):
    global min_uid, costs, shadow_stamp
    text = settings.get("min_uid", "1000")
    if not text.isdigit():
        raise ModuleInitError(f"min_uid {text!r} is not a whole number")
    min_uid = int(text)
    costs = HashCosts()
    shadow_stamp = None
    rescan_if_changed()
    if not len(costs):
        # no local account may log in (they all come from a directory, say):
        # the system's preferred method, until accounts show theirs
        costs = HashCosts([crypt(b"mpop3 dummy", gensalt())])


def account_hash(user):
    """(canonical name, uid, shadow hash, expire day) of a system account, or None."""
    cdef bytes name = user.encode("utf-8", "surrogateescape")
    if b"\0" in name:
        return None
    cdef passwd pw
    cdef passwd *pw_result = NULL
    cdef spwd sp
    cdef spwd *sp_result = NULL
    cdef char *buf = <char *>malloc(LOOKUP_BUFFER)
    if buf == NULL:
        raise MemoryError()
    try:
        if getpwnam_r(name, &pw, buf, LOOKUP_BUFFER, &pw_result) != 0 or pw_result == NULL:
            return None
        canonical = <bytes>pw.pw_name
        uid = pw.pw_uid
        hashed = <bytes>pw.pw_passwd
        expire = -1
        if getspnam_r(canonical, &sp, buf, LOOKUP_BUFFER, &sp_result) == 0 and sp_result != NULL:
            hashed = sp.sp_pwdp
            expire = sp.sp_expire
        return canonical.decode("utf-8", "surrogateescape"), uid, hashed, expire
    finally:
        free(buf)


def usable(account):
    _, uid, hashed, expire = account
    if uid < min_uid:
        return False
    if not hashed.startswith(b"$"):  # "!", "*", "x", "", "!$6$...": locked or disabled
        return False
    if expire >= 0 and time.time() // 86400 >= expire:
        return False
    return True


def shadow_hashes():
    """The names and hashes of the shadow database's entries that hold a
    hash ("$..."): for files, the lines of /etc/shadow. Needs root."""
    cdef spwd sp
    cdef spwd *result = NULL
    cdef char *buf = <char *>malloc(LOOKUP_BUFFER)
    if buf == NULL:
        raise MemoryError()
    entries = []
    setspent()
    try:
        while getspent_r(&sp, buf, LOOKUP_BUFFER, &result) == 0 and result != NULL:
            if sp.sp_pwdp != NULL and sp.sp_pwdp[0] == b"$":
                entries.append(((<bytes>sp.sp_namp).decode("utf-8", "surrogateescape"), <bytes>sp.sp_pwdp))
    finally:
        endspent()
        free(buf)
    return entries


def rescan_if_changed():
    """Add the cost classes of the local accounts that may log in, if the
    shadow file changed since the last look (a password changed to another
    method; a new account). Only classes not known yet are looked into, one
    account at a time until one may log in; classes are only added, never
    dropped, until a restart."""
    global costs, shadow_stamp
    try:
        st = os.stat(SHADOW)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = "missing"
    if stamp == shadow_stamp:
        return
    with scan_lock:
        if stamp == shadow_stamp:
            return
        current = costs
        try:
            found = shadow_hashes()
        except OSError:
            found = []
        by_class = {}
        for name, hashed in found:
            by_class.setdefault(cost_class(hashed), []).append((name, hashed))
        added = []
        for key, members in by_class.items():
            if key in current.dummies:
                continue
            for name, hashed in members:  # the first that may log in stands for the class
                account = account_hash(name)
                if account is not None and usable(account) and account[2] == hashed:
                    added.append(hashed)
                    break
        if added:
            costs = HashCosts([*current.dummies.values(), *added], reuse=current)
            if costs.cost_note():
                log.info("system accounts: %s", costs.cost_note())
        shadow_stamp = stamp


def auth_attempt_login(user, password):
    rescan_if_changed()
    given = password.encode("utf-8", "surrogateescape")
    account = account_hash(user) if plausible_account_name(user) else None
    if account is None or not usable(account) or not given:  # an empty password never logs in
        costs.check(given)
        return None
    if costs.check(given, account[2]):
        return account[0]
    return None


def auth_timestamp():
    return None


def auth_need_root():
    return True
