# distutils: libraries = pam
"""auth_pam: accounts as the system authenticates them, through PAM (libpam).

Setting: `pam_service` (default `mpop3`), the file in /etc/pam.d that holds
the stack; `make install` ships an example (share/mpop3/pam.d/mpop3).

A login runs pam_authenticate, then pam_acct_mgmt (so expired, locked or
otherwise refused accounts do not log in, and one whose password must be
changed first does not either), with PAM_SILENT and
PAM_DISALLOW_NULL_AUTHTOK. The conversation answers one password prompt
(PAM_PROMPT_ECHO_OFF) with the client's password and nothing else: a
second secret prompt or a prompt to echo (a one-time code, a new password)
ends the conversation with PAM_CONV_ERR and the login fails. PAM's own
failure delay (pam_unix's two seconds) is replaced by mpop3's failed-login
delay, which is per (address, user) and does not hold a worker thread.

The mailbox is PAM_USER after the stack ran (a module may canonicalise the
name). There are no plaintext passwords, so no APOP or CRAM-MD5
(auth_timestamp is None). auth_need_root() is true unless every module of
the stack's auth and account lines is known to need no privilege (pam_unix
reads /etc/shadow). PAM's calls block (a directory across the network, a
hash): they run in the worker threads without the GIL, never on the loop.

Unknown users: a stack answers PAM_USER_UNKNOWN sooner than a wrong
password for a known user (pam_unix hashes only for accounts it finds), so
such an answer is held back until it has taken what refusing a known
user's wrong password takes in this process (a moving average of those
refusals; before the first, one hash of the system's preferred method),
so that timing does not tell which users exist.
"""

include "mpop3_module.pxi"

import logging
import os
import threading
import time

from libc.stdlib cimport calloc, free
from libc.string cimport strdup

from mpop3.errors import ModuleInitError
from mpop3.passwords import HashCosts, crypt, gensalt, plausible_account_name

MPOP3_MODULE_CLASS = "auth"
MPOP3_SETTINGS = {
    "pam_service": "the PAM service (a file in /etc/pam.d; default mpop3)",
}


cdef extern from "<security/pam_appl.h>" nogil:
    ctypedef struct pam_handle_t:
        pass
    struct pam_message:
        int msg_style
        const char *msg
    struct pam_response:
        char *resp
        int resp_retcode
    struct pam_conv:
        int (*conv)(int, const pam_message **, pam_response **, void *)
        void *appdata_ptr
    int pam_start(const char *service_name, const char *user, const pam_conv *pam_conversation,
                  pam_handle_t **pamh)
    int pam_end(pam_handle_t *pamh, int pam_status)
    int pam_authenticate(pam_handle_t *pamh, int flags)
    int pam_acct_mgmt(pam_handle_t *pamh, int flags)
    int pam_set_item(pam_handle_t *pamh, int item_type, const void *item)
    int pam_get_item(const pam_handle_t *pamh, int item_type, const void **item)
    const char *pam_strerror(pam_handle_t *pamh, int errnum)
    enum:
        PAM_SUCCESS
        PAM_BUF_ERR
        PAM_CONV_ERR
        PAM_USER_UNKNOWN
        PAM_AUTH_ERR
        PAM_SILENT
        PAM_DISALLOW_NULL_AUTHTOK
        PAM_USER
        PAM_FAIL_DELAY
        PAM_PROMPT_ECHO_OFF
        PAM_PROMPT_ECHO_ON
        PAM_ERROR_MSG
        PAM_TEXT_INFO


cdef struct conversation:
    const char *password
    int answered


cdef int converse(int count, const pam_message **messages, pam_response **responses, void *data) noexcept nogil:
    """Answer the password prompt, once; let messages pass; refuse anything else."""
    cdef conversation *state = <conversation *>data
    cdef pam_response *answers
    cdef int i, style
    if count <= 0:
        return PAM_CONV_ERR
    answers = <pam_response *>calloc(count, sizeof(pam_response))
    if answers == NULL:
        return PAM_BUF_ERR
    for i in range(count):
        # Linux-PAM passes an array of pointers
        style = messages[i].msg_style
        if style == PAM_PROMPT_ECHO_OFF and not state.answered:
            answers[i].resp = strdup(state.password)
            if answers[i].resp == NULL:
                return fail(answers, i, PAM_BUF_ERR)
            state.answered = 1
        elif style == PAM_ERROR_MSG or style == PAM_TEXT_INFO:
            answers[i].resp = NULL
        else:
            return fail(answers, i, PAM_CONV_ERR)
    responses[0] = answers
    return PAM_SUCCESS


cdef int fail(pam_response *answers, int filled, int status) noexcept nogil:
    cdef int i
    for i in range(filled):
        free(answers[i].resp)
    free(answers)
    return status


cdef void no_delay(int status, unsigned int usec_delay, void *data) noexcept nogil:
    """PAM_FAIL_DELAY: mpop3's throttle delays failures, per (address, user)."""
    pass


cdef struct outcome:
    int status  # of the step that decided
    int unknown  # PAM_USER_UNKNOWN was answered
    char *user  # PAM_USER afterwards (strdup), or NULL


cdef outcome run_stack(const char *service, const char *user, const char *password) noexcept nogil:
    cdef conversation state
    cdef pam_conv conv
    cdef pam_handle_t *pamh = NULL
    cdef const void *item = NULL
    cdef outcome result
    result.status = PAM_CONV_ERR
    result.unknown = 0
    result.user = NULL
    state.password = password
    state.answered = 0
    conv.conv = converse
    conv.appdata_ptr = &state
    cdef int status = pam_start(service, user, &conv, &pamh)
    if status != PAM_SUCCESS:
        result.status = status
        return result
    pam_set_item(pamh, PAM_FAIL_DELAY, <const void *>no_delay)
    status = pam_authenticate(pamh, PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK)
    if status == PAM_USER_UNKNOWN:
        result.unknown = 1
    if status == PAM_SUCCESS:
        status = pam_acct_mgmt(pamh, PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK)
    if status == PAM_SUCCESS and pam_get_item(pamh, PAM_USER, &item) == PAM_SUCCESS and item != NULL:
        result.user = strdup(<const char *>item)
    result.status = status
    pam_end(pamh, status)
    return result


log = logging.getLogger("mpop3.auth")

PAM_DIRS = ("/etc/pam.d", "/usr/lib/pam.d", "/lib/pam.d")
# Modules that need no privilege for auth and account: the rest (pam_unix
# reading /etc/shadow, pam_userdb's database, pam_faillock's tally) may
ROOTLESS = {
    "pam_permit.so", "pam_deny.so", "pam_warn.so", "pam_succeed_if.so", "pam_env.so", "pam_echo.so",
    "pam_faildelay.so", "pam_nologin.so", "pam_localuser.so", "pam_cap.so",
}


class WrongPasswordCost:
    """What the stack takes to refuse a known user's wrong password (a
    moving average), which a refusal of an unknown user is made to take
    too: a stack answers PAM_USER_UNKNOWN without hashing anything, and
    how much a known user's check costs depends on the stack (pam_unix
    with yescrypt hashes twice). Until a known user has been refused,
    an unknown one costs a hash of the system's preferred method."""

    WEIGHT = 0.1  # of the newest refusal

    def __init__(self):
        self.average = None
        self.lock = threading.Lock()

    def add(self, spent):
        with self.lock:
            self.average = spent if self.average is None else self.average + self.WEIGHT * (spent - self.average)

    def pad(self, spent, given):
        average = self.average
        if average is None:
            costs.check(given)
        elif average > spent:
            time.sleep(average - spent)


wrong_password = WrongPasswordCost()

cdef bytes service = b"mpop3"
cdef object need_root = True
cdef object costs = HashCosts()


def service_file(name):
    for directory in PAM_DIRS:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def stack_modules(name, seen=None):
    """The modules of the service's auth and account lines, includes
    followed; None if a file cannot be read."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    path = service_file(name)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = set()
    for line in lines:
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "@include" and len(words) > 1:
            included = stack_modules(words[1], seen)
        elif words[0].lstrip("-") in ("auth", "account") and len(words) > 2:
            control = words[1]
            if control.startswith("["):  # [value=action ...] may hold spaces
                while not words[1].endswith("]") and len(words) > 3:
                    words[1:3] = [words[1] + " " + words[2]]
            if words[1] in ("include", "substack"):
                included = stack_modules(words[2], seen)
            else:
                included = {os.path.basename(words[2])}
        else:
            continue
        if included is None:
            return None
        found |= included
    return found


def setting_error(message):
    """A ModuleInitError the loader reports at the `> pam_service` line, if
    the file has one (mpop3.loader.setting_where)."""
    error = ModuleInitError(message)
    error.setting = "pam_service"
    return error


def module_init(settings):
    global service, need_root, costs, wrong_password
    wrong_password = WrongPasswordCost()
    name = settings.get("pam_service", "mpop3")
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise setting_error(f"pam_service {name!r} is not a service name")
    if service_file(name) is None:
        raise setting_error(
            f"pam_service {name!r}: no such service (no {name} in {', '.join(PAM_DIRS)}; "
            "PAM would use its 'other' stack)"
        )
    service = name.encode()
    modules = stack_modules(name)
    need_root = modules is None or not modules <= ROOTLESS
    # what checking a password costs here: the system's preferred method
    costs = HashCosts([crypt(b"mpop3 dummy", gensalt())])


def auth_attempt_login(user, password):
    """USER/PASS (and AUTH PLAIN, LOGIN). Runs in a worker thread; the
    stack runs without the GIL."""
    given = password.encode("utf-8", "surrogateescape")
    if not plausible_account_name(user) or not given or b"\0" in given:
        costs.check(given)
        return None
    cdef bytes name = user.encode("utf-8")
    cdef bytes secret = given
    cdef const char *c_service = service
    cdef const char *c_name = name
    cdef const char *c_secret = secret
    cdef outcome result
    start = time.perf_counter()
    with nogil:
        result = run_stack(c_service, c_name, c_secret)
    spent = time.perf_counter() - start
    canonical = None
    if result.user != NULL:
        canonical = (<bytes>result.user).decode("utf-8", "surrogateescape")
        free(result.user)
    if result.status == PAM_AUTH_ERR and not result.unknown:
        wrong_password.add(spent)
    elif result.unknown:
        wrong_password.pad(spent, given)
    if result.status != PAM_SUCCESS:
        if result.status not in (PAM_USER_UNKNOWN, PAM_AUTH_ERR):  # expired, locked, a broken stack
            log.info("PAM (%s): %r: %s", service.decode(), user, (<bytes>pam_strerror(NULL, result.status)).decode())
        return None
    return canonical or user


def auth_timestamp():
    return None


def auth_need_root():
    return need_root
