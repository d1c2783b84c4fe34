"""auth_getpw: system accounts (getpwnam, getspnam, crypt(3) via libcrypt).

Like the C module it replaces only auth_attempt_login and auth_timestamp
(None: there are no plaintext passwords, so no APOP). Reading the shadow
file needs root, hence auth_need_root(). Refused: unknown users, accounts
below min_uid (system accounts), locked or disabled passwords ("!", "*",
empty), and expired accounts. A refusal for any reason costs one crypt(3)
call, as a wrong password does, so timing does not tell which users exist.
"""

include "mpop3_module.pxi"

import time

from libc.stdlib cimport free, malloc

from mpop3.passwords import crypt, crypt_matches, gensalt
from mpop3.errors import ModuleInitError

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

DEF LOOKUP_BUFFER = 16384

cdef long min_uid = 1000
cdef bytes dummy_hash = b""


def module_init(settings):
    global min_uid, dummy_hash
    text = settings.get("min_uid", "1000")
    if not text.isdigit():
        raise ModuleInitError(f"min_uid {text!r} is not a whole number")
    min_uid = int(text)
    # what an unknown or refused user's password is hashed against: the
    # system's preferred method, so a miss costs what a hit costs
    dummy_hash = crypt(b"mpop3 dummy", gensalt())


def account_hash(user):
    """(uid, shadow hash, expire day) of a system account, or None."""
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
        uid = pw.pw_uid
        hashed = pw.pw_passwd
        expire = -1
        if getspnam_r(name, &sp, buf, LOOKUP_BUFFER, &sp_result) == 0 and sp_result != NULL:
            hashed = sp.sp_pwdp
            expire = sp.sp_expire
        return uid, hashed, expire
    finally:
        free(buf)


def usable(account):
    uid, hashed, expire = account
    if uid < min_uid:
        return False
    if not hashed.startswith(b"$"):  # "!", "*", "x", "", "!$6$...": locked or disabled
        return False
    if expire >= 0 and time.time() // 86400 >= expire:
        return False
    return True


def auth_attempt_login(user, password):
    account = account_hash(user)
    stored = account[1] if account is not None and usable(account) else None
    if crypt_matches(password.encode("utf-8", "surrogateescape"), stored, dummy_hash):
        return user
    return None


def auth_timestamp():
    return None


def auth_need_root():
    return True
