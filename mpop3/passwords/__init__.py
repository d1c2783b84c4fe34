"""Password checking for auth modules: crypt(3) through libcrypt (_crypt),
what a stored hash is (hash_problem, cost_class), HashCosts, the check
auth_file and auth_getpw share, which makes every login cost the same
whoever the user is, and which names may be asked about at all
(plausible_account_name).
"""

import hmac
import unicodedata

from ._crypt import crypt, gensalt

__all__ = ["crypt", "gensalt", "hash_problem", "cost_class", "HashCosts", "plausible_account_name"]

MAX_NAME = 255  # bytes of an account name, at most

# What the dummy hashes are hashes of (a dummy is only ever hashed against,
# and what that gives is thrown away), and what hash_problem tries. Neither
# may hold a NUL: crypt() refuses those.
DUMMY_PASSWORD = b"mpop3 dummy password"
PROBE_PASSWORD = b"mpop3 probe password"


def hash_problem(stored):
    """Why passwords cannot be checked against `stored` (bytes), or None if
    libcrypt can check them. libcrypt knows more methods than any list of
    prefixes would (DES, BSDI, Sun MD5, NT, scrypt, ...), so it is asked: a
    complete hash gives back, for any password, a hash as long as itself,
    with the same setting (method, cost, salt). An unknown method (argon2)
    gives nothing; a truncated or padded hash gives another length, and no
    password would ever match it."""
    probe = crypt(PROBE_PASSWORD, stored)
    if probe is None:
        return "not a hash libcrypt can check (an unknown method, or malformed)"
    if len(probe) != len(stored) or _setting(probe) != _setting(stored):
        return "not a hash libcrypt can check (malformed: truncated, or more after it)"
    return None


def _setting(stored):
    if stored.startswith(b"$"):
        return stored.rpartition(b"$")[0]
    return stored[:9] if stored.startswith(b"_") else stored[:2]  # BSDI, DES


def cost_class(stored):
    """The part of the hash `stored` (bytes) that decides how long checking
    a password against it takes: its method and cost parameters, without
    salt or checksum. `$6$rounds=5000`, `$y$j9T`, `$2b$10`; DES has one
    cost. Two hashes of one class cost the same to check; splitting a class
    in two only costs a hash more per login, merging two would tell users
    apart."""
    if stored.startswith(b"$2") and stored[3:4] == b"$":  # bcrypt: $2b$10$<salt><checksum>
        return stored[:6]
    if stored.startswith(b"$7$"):  # scrypt: $7$ then N, r, p in 11 characters, then the salt
        return stored[:14]
    if stored.startswith(b"$"):  # $id$[params$...]salt$checksum (Sun MD5: salt$$checksum)
        parts = stored.split(b"$")[:-1]
        while len(parts) > 2 and parts[-1] == b"":
            parts.pop()
        if len(parts) > 2:
            parts.pop()
        return b"$".join(parts)
    if stored.startswith(b"_"):  # BSDI: _, 4 characters of rounds, salt, checksum
        return stored[:5]
    return b"DES"


class HashCosts:
    """The cost classes of the hashes users log in with, each with a dummy
    hash: a hash of the same method, cost and salt, of no one's password.

    What a wrong password must cost, so that the time it takes tells nobody
    which users exist: what real users' hashes cost. With one method and
    cost for everyone, that is one hash. With several (accounts hashed
    before the default changed, a bcrypt user among yescrypt ones), no one
    dummy costs what each of them costs: a yescrypt dummy makes an unknown
    name slower than a SHA-512 user, a SHA-512 one faster than a yescrypt
    user, and padding by sleeping would need a clock to match crypt()'s
    cost under every load. So every check hashes the password once in each
    class: against the user's own hash in its class, against the dummy in
    the others. A login then costs the sum of the classes' costs whoever
    the user (unknown, locked, plaintext, any method), to the microsecond
    and without measuring anything; the price is CPU, one hash per class
    present, which is one hash where users share a method."""

    def __init__(self, hashes=(), reuse=None):
        """The classes of `hashes` (bytes; hashes libcrypt can check), with a
        dummy for each, taken from `reuse` (a HashCosts) where it has the
        class: computing a dummy costs a hash."""
        known = reuse.dummies if reuse is not None else {}
        dummies = {}
        for stored in hashes:
            key = cost_class(stored)
            if key not in dummies:
                dummy = known.get(key) or crypt(DUMMY_PASSWORD, stored)
                if dummy is not None:
                    dummies[key] = dummy
        self.dummies = dummies  # class -> dummy hash; replaced, never changed in place

    def __len__(self):
        return len(self.dummies)

    def cost_note(self):
        """What to log when more than one class makes logins dearer, or None."""
        if len(self.dummies) < 2:
            return None
        return (
            f"hashes of {len(self.dummies)} different methods or costs: every login attempt checks one "
            "of each, so that its time does not tell users apart (rehashing to one method makes logins cheaper)"
        )

    def check(self, given, stored=None):
        """Whether the password `given` (bytes) hashes to `stored` (bytes),
        compared in constant time; `stored` None stands for a user who is
        unknown or may not log in (the answer is False). Either way the cost
        is one hash per class. A hash of a class not seen before (an account
        from a directory, the first time) is learnt: its dummy is made now,
        and later checks include it.

        Runs crypt(), slow on purpose: call it off the event loop."""
        dummies = self.dummies
        own = None
        matched = False
        if stored is not None:
            own = cost_class(stored)
            matched = hmac.compare_digest(crypt(given, stored) or b"*", stored)
        for key, dummy in dummies.items():
            if key != own:
                crypt(given, dummy)
        if own is not None and own not in dummies:
            dummy = crypt(DUMMY_PASSWORD, stored)
            if dummy is not None:  # threads may race here: the last one's copy wins, all are right
                self.dummies = {**self.dummies, own: dummy}
        return matched


def plausible_account_name(user):
    """Whether `user` can be a system account's name (auth_getpw,
    auth_pam), decided before any name service or PAM stack sees it: that
    is code we do not control (a directory across the network, a module
    that may log or build a path from the name), so it gets only names that
    could be real. Refused: the empty name, "." and "..", any "/" (names
    become mailbox, marker and spool file names), control characters (C0,
    DEL, C1: no account has them, and they forge log lines), bytes that are
    not UTF-8 (names from directories are UTF-8; the client's invalid bytes
    arrive here as surrogates), and more than MAX_NAME bytes. Anything else may be a name somewhere (spaces,
    "@", "\\", letters of any script), so it is asked about."""
    if user in ("", ".", ".."):
        return False
    try:
        encoded = user.encode("utf-8")
    except UnicodeEncodeError:
        return False
    if len(encoded) > MAX_NAME or "/" in user:
        return False
    return not any(unicodedata.category(c) == "Cc" for c in user)
