"""Password checking for auth modules: crypt(3) through libcrypt (_crypt),
and the one comparison auth_file and auth_getpw share.
"""

import hmac

from ._crypt import crypt, gensalt

__all__ = ["crypt", "gensalt", "crypt_matches"]


def crypt_matches(given, stored, dummy=None):
    """Whether the password `given` (bytes) hashes to the crypt(3) hash
    `stored` (bytes), compared in constant time.

    `stored` None stands for a user who is unknown or may not log in: the
    answer is False, but `given` is hashed against `dummy` all the same (if
    there is one), so that a miss costs what a hit costs and the time a
    wrong password takes does not tell which users exist (popa3d's
    AUTH_DUMMY_SALT). Runs crypt(), slow on purpose: call it off the event
    loop."""
    if stored is None:
        if dummy is not None:
            crypt(given, dummy)
        return False
    return hmac.compare_digest(crypt(given, stored) or b"*", stored)
