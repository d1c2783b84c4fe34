"""SASL for the POP3 AUTH command (RFC 5034): PLAIN, LOGIN and CRAM-MD5.

This module only speaks the exchanges: it decodes what the client sends and
says what to send back. Checking the credentials it extracts is the job of
whoever carries out the core's login action, so failures count like any
other.

An exchange is driven by `step(line)`, which returns one of
  Challenge(bytes)      send `+ <base64>` and wait for the next line;
  Credentials(...)      the exchange is over: verify these;
  Failure(text)         answer -ERR with this text.
"""

import base64
import binascii
import hmac
import os
import socket
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Challenge:
    data: bytes


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = None  # PLAIN and LOGIN
    challenge: bytes = None  # CRAM-MD5: what we sent ...
    digest: str = None  # ... and the client's keyed digest of it


@dataclass(frozen=True)
class Failure:
    text: str


CANCELLED = Failure("authentication cancelled")
BAD_BASE64 = Failure("malformed base64 in the SASL exchange")

# mechanism name -> whether it sends the password itself over the wire
MECHANISMS = {"PLAIN": True, "LOGIN": True, "CRAM-MD5": False}


def decode(line):
    """The bytes a client line carries, or None if it is not base64.
    A lone "=" is an empty initial response (RFC 4954 convention, RFC 5034)."""
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


def text(data):
    return data.decode("utf-8", "surrogateescape")


class Exchange:
    """One AUTH command in progress."""

    def __init__(self, mechanism, cram_challenge=None):
        self.mechanism = mechanism
        self.cram_challenge = cram_challenge
        self.user = None

    def start(self, initial_response):
        """The AUTH command itself, with or without an initial response."""
        if self.mechanism == "CRAM-MD5":
            if initial_response is not None:
                return Failure("CRAM-MD5 takes no initial response")
            return Challenge(self.cram_challenge)
        if initial_response is None:
            return Challenge(b"" if self.mechanism == "PLAIN" else b"Username:")
        return self.step(initial_response)

    def step(self, line):
        if line == b"*":
            return CANCELLED
        data = decode(line)
        if data is None:
            return BAD_BASE64
        if self.mechanism == "PLAIN":
            return plain(data)
        if self.mechanism == "LOGIN":
            if self.user is None:
                self.user = text(data)
                return Challenge(b"Password:")
            return Credentials(self.user, password=text(data))
        return cram_md5(data, self.cram_challenge)


def plain(data):
    parts = data.split(b"\0")
    if len(parts) != 3:
        return Failure("PLAIN expects authzid NUL authcid NUL password")
    authzid, user, password = parts
    if not user:
        return Failure("PLAIN needs a user name")
    if authzid and authzid != user:
        return Failure("acting as another user is not supported")
    return Credentials(text(user), password=text(password))


def cram_md5(data, challenge):
    user, _, digest = data.rpartition(b" ")
    if not user or len(digest) != 32:
        return Failure("CRAM-MD5 expects `user hexdigest`")
    return Credentials(text(user), challenge=challenge, digest=text(digest).lower())


def cram_md5_matches(credentials, password):
    """Constant-time check of a CRAM-MD5 answer against the plaintext password."""
    key = password.encode("utf-8", "surrogateescape")
    expected = hmac.new(key, credentials.challenge, "md5").hexdigest()
    return hmac.compare_digest(expected.encode(), credentials.digest.encode("ascii", "replace"))


def new_cram_challenge():
    """A fresh CRAM-MD5 challenge, `<random.time@host>` (RFC 2195)."""
    return b"<%s.%d@%s>" % (os.urandom(8).hex().encode(), time.time_ns(), socket.gethostname().encode())
