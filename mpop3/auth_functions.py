"""The auth function table: what an auth module may define.

This file is the auth module writer's reference, as `auth_functions.h` was
for the C program. An auth module is a compiled extension that sets

    MPOP3_MODULE_CLASS = "auth"
    MPOP3_ABI_VERSION  (from `include "mpop3_module.pxi"`)
    MPOP3_SETTINGS = {"name": "what it means", ...}   # the `> name value` lines it accepts
    def module_init(settings): ...                    # optional; gets {name: value}

and defines any of the functions below under the same names, with the same
arguments (minus `self`). The first auth module in mpop3.conf that defines a
name supplies it; names no module defines use the defaults written here.

User names and passwords are `str`: the bytes the client sent, decoded as
UTF-8 with errors="surrogateescape" (encode them back the same way to get
the exact bytes). A mailbox name is a `str` too; the core validates it (no
"/", no "..", no NUL or control characters) before storage sees it.

Privileges: unless an entry says otherwise, it runs with whatever identity
the process has at that point of the session. If an entry needs root
(reading /etc/shadow, say), the module must define auth_need_root() -> True.
"""

import hmac
import itertools
import os
import socket
import time

from .function_table import FunctionTable

_apop_serial = itertools.count(1)


class AuthFunctions(FunctionTable):
    CLASS = "auth"

    def auth_attempt_login(self, user, password):
        """USER/PASS (and SASL PLAIN/LOGIN): check the pair.

        Returns the mailbox name on success, None on failure. Called once per
        PASS, before any privilege switch after login.
        Default: compare `password` with auth_password(user) in constant time
        (an unknown user costs the same comparison), then auth_login(user).
        """
        expected = self.auth_password(user)
        known = bool(expected)  # an empty password never logs in
        candidate = (expected if known else "\0unknown user\0").encode("utf-8", "surrogateescape")
        given = password.encode("utf-8", "surrogateescape")
        if hmac.compare_digest(candidate, given) and known:
            return self.auth_login(user)
        return None

    def auth_timestamp(self):
        """The APOP timestamp for the greeting, `<...>` included, or None.

        Called once per connection, before the greeting. None means the
        server offers no APOP at all (for modules that have no plaintext
        passwords). Default: `<pid.serial.time@hostname>`, unique per
        connection as RFC 1939 requires.
        """
        return f"<{os.getpid()}.{next(_apop_serial)}.{time.time_ns()}@{socket.gethostname()}>"

    def auth_password(self, user):
        """The plaintext password of `user`, or None if unknown or not kept.

        Used by the default auth_attempt_login, by APOP and by CRAM-MD5.
        Default: None (nobody can log in).
        """
        return None

    def auth_login(self, user):
        """The mailbox name of `user`, whose credentials are already verified.

        Called after a successful APOP (and by the default
        auth_attempt_login). Returns None to refuse the login.
        Default: the mailbox is named like the user.
        """
        return user

    def auth_login_delay_needed(self, user):
        """Seconds `user` must still wait before logging in again (0: none).

        Checked after authentication, just before the mailbox is opened;
        a positive value is answered with -ERR [LOGIN-DELAY].
        Default: 0.
        """
        return 0

    def auth_default_login_delay(self):
        """The LOGIN-DELAY value (seconds) that CAPA announces; 0 announces none.

        Default: 0.
        """
        return 0

    def auth_need_root(self):
        """Whether authenticating needs root (e.g. to read /etc/shadow).

        Decides when the server gives up root (README.md, "Privileges"): if true,
        a session keeps root until it has authenticated.
        Default: False.
        """
        return False
