"""The SASL exchanges (RFC 5034) as the session drives them."""

import base64

import pytest

from mpop3.protocol import sasl


def b64(data):
    return base64.b64encode(data)


def test_plain_with_initial_response():
    ex = sasl.Exchange("PLAIN")
    assert ex.start(b64(b"\0alice\0secret")) == sasl.Credentials("alice", password="secret")


def test_plain_without_initial_response():
    ex = sasl.Exchange("PLAIN")
    assert ex.start(None) == sasl.Challenge(b"")
    assert ex.step(b64(b"alice\0alice\0pw")) == sasl.Credentials("alice", password="pw")


@pytest.mark.parametrize(
    "payload, why",
    [
        (b"alice\0secret", "PLAIN expects"),
        (b"\0\0secret", "needs a user name"),
        (b"bob\0alice\0secret", "another user"),
    ],
)
def test_plain_refusals(payload, why):
    result = sasl.Exchange("PLAIN").start(b64(payload))
    assert isinstance(result, sasl.Failure) and why in result.text


def test_login_two_challenges():
    ex = sasl.Exchange("LOGIN")
    assert ex.start(None) == sasl.Challenge(b"Username:")
    assert ex.step(b64(b"alice")) == sasl.Challenge(b"Password:")
    assert ex.step(b64(b"s3cret")) == sasl.Credentials("alice", password="s3cret")


def test_login_initial_response_is_the_user():
    ex = sasl.Exchange("LOGIN")
    assert ex.start(b64(b"alice")) == sasl.Challenge(b"Password:")


def test_empty_initial_response():
    assert sasl.Exchange("LOGIN").start(b"=") == sasl.Challenge(b"Password:")


def test_cancel_and_bad_base64():
    ex = sasl.Exchange("LOGIN")
    ex.start(None)
    assert ex.step(b"*") == sasl.CANCELLED
    assert sasl.Exchange("PLAIN").start(b"not base64!!") == sasl.BAD_BASE64
    assert sasl.Exchange("PLAIN").start(b"YWJj=garbage") == sasl.BAD_BASE64


def test_cram_md5():
    # the example exchange of RFC 2195
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    ex = sasl.Exchange("CRAM-MD5", cram_challenge=challenge)
    assert ex.start(None) == sasl.Challenge(challenge)
    creds = ex.step(b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw")
    assert creds.user == "tim"
    assert sasl.cram_md5_matches(creds, "tanstaaftanstaaf")
    assert not sasl.cram_md5_matches(creds, "wrong")
    assert isinstance(sasl.Exchange("CRAM-MD5", challenge).start(b64(b"x")), sasl.Failure)
    assert isinstance(ex.step(b64(b"tim short")), sasl.Failure)
