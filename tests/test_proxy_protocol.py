"""The PROXY protocol header reader (mpop3/server/proxy_protocol.py), without
I/O: valid version 1 and 2 headers; a table of malformed ones, each with the
reason and the very byte it must fail at; every header fed whole, byte by
byte and at random splits with the same answer; the client's first command
in the same segment; a hypothesis fuzz; the trusted-networks reader. The
version 2 headers are built here, with a bitwise CRC-32C of the tests' own."""

import dataclasses
import ipaddress
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpop3.server.proxy_protocol import (
    MAX_V1_LINE,
    MAX_V2_HEADER,
    BadProxyHeader,
    ProxyHeader,
    ProxyHeaderReader,
    is_trusted,
    read_networks,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
LOCAL, PROXY = 0x0, 0x1
INET, INET6, UNSPEC = 0x11, 0x21, 0x00
ALPN, AUTHORITY, CRC32C, NOOP, UNIQUE_ID, SSL, NETNS = 0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0x30
SSL_VERSION, SSL_CN, SSL_CIPHER = 0x21, 0x22, 0x23
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- building headers ----------------------------------------------------------


def crc32c(data):
    """Bit by bit, unlike the module's table: the two must agree."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def tlv(kind, value=b""):
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def ssl_tlv(client=0x01, verify=0, subs=b""):
    return tlv(SSL, bytes([client]) + verify.to_bytes(4, "big") + subs)


def addresses(src="192.0.2.1", dst="198.51.100.7", sport=4242, dport=110):
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    return socket.inet_pton(family, src) + socket.inet_pton(family, dst) + struct.pack(">HH", sport, dport)


def v2(command=PROXY, family=INET, body=None, tlvs=b"", length=None, version=2, crc_at=None):
    """A version 2 header; with crc_at, a CRC32C TLV goes at that index of
    the TLVs (given as a list) and gets the right checksum."""
    if body is None:
        body = {INET: addresses(), INET6: addresses("2001:db8::1", "2001:db8::2")}.get(family, b"")
    if crc_at is not None:
        tlvs = list(tlvs)
        tlvs.insert(crc_at, tlv(CRC32C, b"\0\0\0\0"))
        offset = 16 + len(body) + sum(len(t) for t in tlvs[:crc_at]) + 3
        tlvs = b"".join(tlvs)
    body += tlvs if isinstance(tlvs, bytes) else b"".join(tlvs)
    n = len(body) if length is None else length
    header = SIG + bytes([version << 4 | command, family]) + n.to_bytes(2, "big") + body
    if crc_at is not None:
        header = header[:offset] + crc32c(header).to_bytes(4, "big") + header[offset + 4 :]
    return header


def run(chunks):
    """Feeds the chunks in turn: ("ok", header with all bytes after it as rest),
    ("bad", reason, bytes fed when it failed) or ("more",)."""
    reader = ProxyHeaderReader()
    fed = 0
    for n, chunk in enumerate(chunks):
        fed += len(chunk)
        try:
            header = reader.feed(chunk)
        except BadProxyHeader as error:
            assert str(error) == error.reason
            return ("bad", error.reason, fed)
        if header is not None:
            return ("ok", dataclasses.replace(header, rest=header.rest + b"".join(chunks[n + 1 :])))
    return ("more",)


def whole(data):
    return run([data])


def byte_by_byte(data):
    return run([data[i : i + 1] for i in range(len(data))])


def header(source=None, destination=None, tls=False, tls_version=None, rest=b"", version=2):
    return ProxyHeader(source is None, source, destination, tls, tls_version, rest, version)


# -- valid headers ---------------------------------------------------------------

FFFF = ":".join(["ffff"] * 8)
V1_MAX_UNKNOWN = b"PROXY UNKNOWN " + b"x" * (MAX_V1_LINE - 16) + b"\r\n"
PLAIN4 = header(("192.0.2.1", 4242), ("198.51.100.7", 110))
PLAIN6 = header(("2001:db8::1", 4242), ("2001:db8::2", 110))

VALID = [
    # version 1
    ("v1 tcp4", b"PROXY TCP4 192.0.2.1 198.51.100.7 4242 110\r\n", dataclasses.replace(PLAIN4, version=1)),
    (
        "v1 tcp4 longest",
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        header(("255.255.255.255", 65535), ("255.255.255.255", 65535), version=1),
    ),
    ("v1 tcp4 zeros", b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", header(("0.0.0.0", 0), ("10.0.0.1", 0), version=1)),
    ("v1 tcp6", b"PROXY TCP6 2001:db8::1 2001:db8::2 4242 110\r\n", dataclasses.replace(PLAIN6, version=1)),
    (
        "v1 tcp6 upper case and long form",
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 2001:DB8::2 4242 110\r\n",
        dataclasses.replace(PLAIN6, version=1),
    ),
    (
        "v1 tcp6 IPv4-mapped, as inet_ntop writes it",
        b"PROXY TCP6 ::ffff:192.0.2.1 ::FFFF:C633:6407 4242 110\r\n",
        header(("::ffff:192.0.2.1", 4242), ("::ffff:198.51.100.7", 110), version=1),
    ),
    (
        "v1 tcp6 longest (104 bytes)",
        f"PROXY TCP6 {FFFF} {FFFF} 65535 65535\r\n".encode(),
        header((FFFF, 65535), (FFFF, 65535), version=1),
    ),
    ("v1 unknown", b"PROXY UNKNOWN\r\n", header(version=1)),
    ("v1 unknown with addresses", b"PROXY UNKNOWN 192.0.2.1 198.51.100.7 4242 110\r\n", header(version=1)),
    ("v1 unknown anything", b"PROXY UNKNOWN  what ever~ \r\n", header(version=1)),
    ("v1 unknown 107 bytes", V1_MAX_UNKNOWN, header(version=1)),
    # version 2
    ("v2 proxy inet", v2(), PLAIN4),
    ("v2 proxy inet6", v2(family=INET6), PLAIN6),
    (
        "v2 proxy inet6 IPv4-mapped",
        v2(family=INET6, body=addresses("::ffff:192.0.2.1", "::1", 1, 65535)),
        header(("::ffff:192.0.2.1", 1), ("::1", 65535)),
    ),
    ("v2 local", v2(LOCAL, UNSPEC), header()),
    ("v2 local with addresses", v2(LOCAL, INET), header()),
    ("v2 local, family ignored (unix)", v2(LOCAL, 0x31, body=b"/run/a".ljust(216, b"\0")), header()),
    ("v2 local, family ignored (udp)", v2(LOCAL, 0x12, body=addresses()), header()),
    ("v2 local, block skipped unread", v2(LOCAL, UNSPEC, body=b"\x20\x00\x09garbage"), header()),
    (
        "v2 ssl",
        v2(tlvs=ssl_tlv(subs=tlv(SSL_VERSION, b"TLSv1.3"))),
        dataclasses.replace(PLAIN4, tls=True, tls_version="TLSv1.3"),
    ),
    ("v2 ssl without version", v2(tlvs=ssl_tlv()), dataclasses.replace(PLAIN4, tls=True)),
    (
        "v2 ssl with certificate",
        v2(
            family=INET6,
            tlvs=ssl_tlv(
                0x07,
                1,
                tlv(SSL_CN, b"alice") + tlv(SSL_VERSION, b"TLSv1.2") + tlv(SSL_CIPHER, b"ECDHE-RSA-AES128-GCM-SHA256"),
            ),
        ),
        dataclasses.replace(PLAIN6, tls=True, tls_version="TLSv1.2"),
    ),
    ("v2 ssl TLV saying no TLS", v2(tlvs=ssl_tlv(0x00)), PLAIN4),
    ("v2 ssl TLV saying no TLS, with a version", v2(tlvs=ssl_tlv(0x06, subs=tlv(SSL_VERSION, b"TLSv1.3"))), PLAIN4),
    (
        "v2 other TLVs ignored",
        v2(
            tlvs=tlv(ALPN, b"pop3")
            + tlv(AUTHORITY, b"pop.example.org")
            + tlv(NOOP)
            + tlv(NOOP, b"\0" * 5)
            + tlv(UNIQUE_ID, b"u" * 128)
            + tlv(NETNS, b"blue")
            + tlv(0xE0, b"custom")
            + tlv(0xEA, b"\x01vpce-0123456789abcdef")
        ),
        PLAIN4,
    ),
    (
        "v2 crc32c",
        v2(tlvs=[tlv(ALPN, b"pop3"), ssl_tlv(subs=tlv(SSL_VERSION, b"TLSv1.3"))], crc_at=1),
        dataclasses.replace(PLAIN4, tls=True, tls_version="TLSv1.3"),
    ),
    ("v2 crc32c alone", v2(family=INET6, tlvs=[], crc_at=0), PLAIN6),
    ("v2 longest", v2(tlvs=tlv(NOOP, b"\0" * (MAX_V2_HEADER - 16 - 12 - 3))), PLAIN4),
    ("v2 local longest", v2(LOCAL, UNSPEC, body=b"\xff" * (MAX_V2_HEADER - 16)), header()),
]


@pytest.mark.parametrize("data, expected", [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid(data, expected):
    assert whole(data) == ("ok", expected)
    assert byte_by_byte(data) == ("ok", expected)
    for cut in range(len(data) + 1):
        assert run([data[:cut], data[cut:]]) == ("ok", expected)


def test_lengths_at_the_bounds():
    assert len(V1_MAX_UNKNOWN) == MAX_V1_LINE
    assert len(f"PROXY TCP6 {FFFF} {FFFF} 65535 65535\r\n") == 104
    assert len(VALID[-1][1]) == len(VALID[-2][1]) == MAX_V2_HEADER


@pytest.mark.parametrize("data", [v[1] for v in VALID], ids=[v[0] for v in VALID])
def test_command_in_the_same_segment(data):
    reader = ProxyHeaderReader()
    result = reader.feed(data + b"USER alice\r\n")
    assert result.rest == b"USER alice\r\n"
    # and in the last of several segments
    reader = ProxyHeaderReader()
    assert reader.feed(data[:7]) is None
    assert reader.feed(data[7:] + b"USER alice\r\nPASS x\r\n").rest == b"USER alice\r\nPASS x\r\n"


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_any_bytes_like_and_a_large_rest(kind):
    tail = bytes(range(256)) * 256  # 64 KiB: the reader keeps only the header, and hands all of this back
    for data in (b"PROXY TCP4 192.0.2.1 198.51.100.7 4242 110\r\n", v2()):
        result = ProxyHeaderReader().feed(kind(data + tail))
        assert result.source == ("192.0.2.1", 4242)
        assert type(result.rest) is bytes and result.rest == tail


def test_empty_feeds_and_one_answer_only():
    reader = ProxyHeaderReader()
    assert reader.feed(b"") is None
    assert reader.feed(b"PROXY UNKNOWN") is None
    assert reader.feed(b"") is None
    assert reader.feed(b"\r\n").local
    with pytest.raises(RuntimeError):
        reader.feed(b"USER alice\r\n")
    reader = ProxyHeaderReader()
    with pytest.raises(BadProxyHeader):
        reader.feed(b"USER alice\r\n")
    with pytest.raises(RuntimeError):
        reader.feed(b"PROXY UNKNOWN\r\n")


def test_header_is_a_value():
    result = whole(v2())[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.tls = True
    assert result == PLAIN4 and hash(result) == hash(PLAIN4)


def test_max_v2_header_is_a_parameter():
    data = v2(tlvs=tlv(NOOP, b"\0" * 100))
    assert ProxyHeaderReader(max_v2_header=len(data)).feed(data) == PLAIN4
    with pytest.raises(BadProxyHeader, match=f"v2: header longer than {len(data) - 1} bytes"):
        ProxyHeaderReader(max_v2_header=len(data) - 1).feed(data)
    for bad in (15, 16 + 65536):
        with pytest.raises(ValueError):
            ProxyHeaderReader(max_v2_header=bad)


def test_crc32c_of_the_tests_is_right():
    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C


# -- malformed headers -------------------------------------------------------------
#
# (name, head, tail, reason): head alone needs more bytes; the first byte of
# tail is the one that proves the header wrong. Fed whole, byte by byte or at
# any split, the reader fails at that byte with that reason.

V1 = b"PROXY TCP4 192.0.2.1 198.51.100.7 4242 110"
INET_BLOCK = addresses()
SSL_OK = tlv(SSL_VERSION, b"TLSv1.3")


def last_byte(data):
    """For headers that are judged whole: the failing byte is the last one."""
    return data[:-1], data[-1:]


MALFORMED = [
    # signature
    ("http", b"", b"GET / HTTP/1.0\r\n", "bad signature"),
    ("tls client hello", b"", b"\x16\x03\x01\x02\x00", "bad signature"),
    ("pop3 command", b"", b"USER alice\r\n", "bad signature"),
    ("lowercase proxy", b"", b"proxy TCP4 192.0.2.1 198.51.100.7 4242 110\r\n", "bad signature"),
    ("PROXX", b"PROX", b"X TCP4", "bad signature"),
    ("PROXY without space", b"PROXY", b"\r\n", "bad signature"),
    ("PROXY and a tab", b"PROXY", b"\tTCP4 192.0.2.1 198.51.100.7 4242 110\r\n", "bad signature"),
    ("v2 signature broken at byte 5", SIG[:4], b"\x01" + SIG[5:] + b"\x21\x11\x00\x0c" + INET_BLOCK, "bad signature"),
    ("v2 signature broken at byte 12", SIG[:11], b"\x0d\x21\x11\x00\x0c" + INET_BLOCK, "bad signature"),
    ("CRLF", b"\r\n\r", b"\r", "bad signature"),
    # version 2: version, command, family, length
    ("v2 version 1", SIG, b"\x11\x11\x00\x0c" + INET_BLOCK, "v2: bad version 1"),
    ("v2 version 3", SIG, b"\x31\x11\x00\x0c" + INET_BLOCK, "v2: bad version 3"),
    ("v2 version 0", SIG, b"\x01\x11\x00\x0c" + INET_BLOCK, "v2: bad version 0"),
    ("v2 command 2", SIG, b"\x22\x11\x00\x0c" + INET_BLOCK, "v2: bad command 2"),
    ("v2 command 15", SIG, b"\x2f\x11\x00\x0c" + INET_BLOCK, "v2: bad command 15"),
    ("v2 family 4", SIG + b"\x21", b"\x41\x00\x0c" + INET_BLOCK, "v2: bad family/transport 0x41"),
    ("v2 transport 3", SIG + b"\x21", b"\x13\x00\x0c" + INET_BLOCK, "v2: bad family/transport 0x13"),
    ("v2 inet, transport unspec", SIG + b"\x21", b"\x10\x00\x0c" + INET_BLOCK, "v2: bad family/transport 0x10"),
    ("v2 unspec, stream", SIG + b"\x21", b"\x01\x00\x00", "v2: bad family/transport 0x01"),
    ("v2 local, bad family", SIG + b"\x20", b"\xff\x00\x00", "v2: bad family/transport 0xff"),
    ("v2 proxy unspec", SIG + b"\x21", b"\x00\x00\x00", "v2: PROXY command with an unspecified family"),
    (
        "v2 proxy unix",
        SIG + b"\x21",
        b"\x31\x00\xd8" + b"\0" * 216,
        "v2: UNIX socket family, not served by a POP3 listener",
    ),
    (
        "v2 proxy unix dgram",
        SIG + b"\x21",
        b"\x32\x00\xd8" + b"\0" * 216,
        "v2: UNIX socket family, not served by a POP3 listener",
    ),
    (
        "v2 proxy udp4",
        SIG + b"\x21",
        b"\x12\x00\x0c" + INET_BLOCK,
        "v2: datagram transport, not served by a POP3 listener",
    ),
    (
        "v2 proxy udp6",
        SIG + b"\x21",
        b"\x22\x00\x24" + b"\0" * 36,
        "v2: datagram transport, not served by a POP3 listener",
    ),
    ("v2 length 0 for inet", SIG + b"\x21\x11\x00", b"\x00", "v2: length shorter than the address block"),
    ("v2 length 11 for inet", SIG + b"\x21\x11\x00", b"\x0b" + INET_BLOCK, "v2: length shorter than the address block"),
    (
        "v2 length 35 for inet6",
        SIG + b"\x21\x21\x00",
        b"\x23" + b"\0" * 36,
        "v2: length shorter than the address block",
    ),
    (
        "v2 inet length for inet6",
        SIG + b"\x21\x21\x00",
        b"\x0c" + INET_BLOCK,
        "v2: length shorter than the address block",
    ),
    ("v2 longer than the bound", SIG + b"\x21\x11\x03", b"\xf1", f"v2: header longer than {MAX_V2_HEADER} bytes"),
    ("v2 length 65535", SIG + b"\x21\x11\xff", b"\xff", f"v2: header longer than {MAX_V2_HEADER} bytes"),
    ("v2 local longer than the bound", SIG + b"\x20\x00\xff", b"\xff", f"v2: header longer than {MAX_V2_HEADER} bytes"),
    # version 2: TLVs
    ("v2 TLV of 1 byte", *last_byte(v2(tlvs=b"\x04")), "v2: truncated TLV"),
    ("v2 TLV of 2 bytes", *last_byte(v2(tlvs=b"\x04\x00")), "v2: truncated TLV"),
    ("v2 TLV value cut", *last_byte(v2(tlvs=b"\x04\x00\x03ab")), "v2: truncated TLV"),
    ("v2 TLV past the end", *last_byte(v2(tlvs=tlv(NOOP) + b"\x01\xff\xffpop3")), "v2: truncated TLV"),
    ("v2 TLV after a good one cut", *last_byte(v2(tlvs=tlv(ALPN, b"pop3") + b"\x02")), "v2: truncated TLV"),
    ("v2 SSL TLV empty", *last_byte(v2(tlvs=tlv(SSL))), "v2: truncated SSL TLV"),
    ("v2 SSL TLV of 4 bytes", *last_byte(v2(tlvs=tlv(SSL, b"\x01\0\0\0"))), "v2: truncated SSL TLV"),
    ("v2 SSL TLV value cut", *last_byte(v2(tlvs=b"\x20\x00\x0f" + b"\x01\0\0\0\0" + SSL_OK[:-1])), "v2: truncated TLV"),
    ("v2 SSL sub-TLV of 2 bytes", *last_byte(v2(tlvs=ssl_tlv(subs=b"\x21\x00"))), "v2: truncated SSL sub-TLV"),
    ("v2 SSL sub-TLV cut", *last_byte(v2(tlvs=ssl_tlv(subs=b"\x21\x00\x07TLSv1."))), "v2: truncated SSL sub-TLV"),
    (
        "v2 SSL sub-TLV past the end",
        *last_byte(v2(tlvs=ssl_tlv(subs=SSL_OK + b"\x22\x00\x09alice"))),
        "v2: truncated SSL sub-TLV",
    ),
    ("v2 two SSL TLVs", *last_byte(v2(tlvs=ssl_tlv() + ssl_tlv())), "v2: more than one SSL TLV"),
    (
        "v2 two SSL versions",
        *last_byte(v2(tlvs=ssl_tlv(subs=SSL_OK + SSL_OK))),
        "v2: more than one SSL version sub-TLV",
    ),
    ("v2 empty SSL version", *last_byte(v2(tlvs=ssl_tlv(subs=tlv(SSL_VERSION)))), "v2: bad SSL version sub-TLV"),
    (
        "v2 SSL version with NUL",
        *last_byte(v2(tlvs=ssl_tlv(subs=tlv(SSL_VERSION, b"TLS\0")))),
        "v2: bad SSL version sub-TLV",
    ),
    (
        "v2 SSL version not ASCII",
        *last_byte(v2(tlvs=ssl_tlv(subs=tlv(SSL_VERSION, "TLSé".encode())))),
        "v2: bad SSL version sub-TLV",
    ),
    ("v2 CRC32C wrong", *last_byte(v2(tlvs=tlv(CRC32C, b"\0\0\0\0"))), "v2: CRC32C mismatch"),
    ("v2 CRC32C of 3 bytes", *last_byte(v2(tlvs=tlv(CRC32C, b"\0\0\0"))), "v2: CRC32C TLV not 4 bytes long"),
    ("v2 CRC32C twice", *last_byte(v2(tlvs=[tlv(CRC32C, b"\0" * 4)], crc_at=0)), "v2: more than one CRC32C TLV"),
    # version 1: length and line ends
    ("v1 unknown, 108 bytes", V1_MAX_UNKNOWN[:-2] + b"x", b"\r\n", f"v1: line longer than {MAX_V1_LINE} bytes"),
    ("v1 no CRLF in 107 bytes", V1_MAX_UNKNOWN[:-2] + b"x", b"x" * 100, f"v1: line longer than {MAX_V1_LINE} bytes"),
    ("v1 LF without CR", V1, b"\n", "v1: LF without CR"),
    ("v1 unknown LF without CR", b"PROXY UNKNOWN", b"\n", "v1: LF without CR"),
    ("v1 LF inside", b"PROXY TCP4 192.0.2.1", b"\n", "v1: LF without CR"),
    ("v1 CR without LF", V1 + b"\r", b"USER alice\r\n", "v1: CR without LF"),
    ("v1 CR CR LF", V1 + b"\r", b"\r\n", "v1: CR without LF"),
    ("v1 CR inside", b"PROXY TCP4 192.0.2.1", b"\r 198.51.100.7 4242 110\r\n", "v1: missing fields"),
    ("v1 unknown, NUL", b"PROXY UNKNOWN a", b"\0\r\n", "v1: bad character after UNKNOWN"),
    ("v1 unknown, tab", b"PROXY UNKNOWN a", b"\t\r\n", "v1: bad character after UNKNOWN"),
    ("v1 unknown, 8-bit", b"PROXY UNKNOWN a", b"\xe9\r\n", "v1: bad character after UNKNOWN"),
    # version 1: the protocol word
    ("v1 lowercase tcp4", b"PROXY ", b"tcp4 192.0.2.1 198.51.100.7 4242 110\r\n", "v1: unknown protocol"),
    ("v1 TCP5", b"PROXY TCP", b"5 192.0.2.1 198.51.100.7 4242 110\r\n", "v1: unknown protocol"),
    ("v1 UDP4", b"PROXY U", b"DP4 192.0.2.1 198.51.100.7 4242 110\r\n", "v1: unknown protocol"),
    ("v1 TCP", b"PROXY TCP", b" 192.0.2.1 198.51.100.7 4242 110\r\n", "v1: unknown protocol"),
    ("v1 UNKNOWNX", b"PROXY UNKNOWN", b"X\r\n", "v1: unknown protocol"),
    ("v1 tab after protocol", b"PROXY TCP4", b"\t192.0.2.1 198.51.100.7 4242 110\r\n", "v1: unknown protocol"),
    # version 1: missing fields, spaces
    ("v1 nothing", b"PROXY ", b"\r\n", "v1: missing fields"),
    ("v1 protocol only", b"PROXY TCP4", b"\r\n", "v1: missing fields"),
    ("v1 no ports", b"PROXY TCP4 192.0.2.1 198.51.100.7", b"\r\n", "v1: missing fields"),
    ("v1 one port", b"PROXY TCP4 192.0.2.1 198.51.100.7 4242", b"\r\n", "v1: missing fields"),
    ("v1 two spaces after PROXY", b"PROXY ", b" TCP4 192.0.2.1 198.51.100.7 4242 110\r\n", "v1: extra space"),
    ("v1 two spaces", b"PROXY TCP4 ", b" 192.0.2.1 198.51.100.7 4242 110\r\n", "v1: extra space"),
    ("v1 two spaces later", b"PROXY TCP4 192.0.2.1 198.51.100.7 4242 ", b" 110\r\n", "v1: extra space"),
    ("v1 space before CRLF", V1, b" \r\n", "v1: too many fields"),
    ("v1 extra field", V1, b" 1\r\n", "v1: too many fields"),
    # version 1: addresses
    ("v1 octet 256", b"PROXY TCP4 192.0.2.256", b" 198.51.100.7 4242 110\r\n", "v1: bad source address"),
    ("v1 leading zero", b"PROXY TCP4 192.0.2.01", b" 198.51.100.7 4242 110\r\n", "v1: bad source address"),
    ("v1 three octets", b"PROXY TCP4 192.0.2", b" 198.51.100.7 4242 110\r\n", "v1: bad source address"),
    ("v1 five octets", b"PROXY TCP4 192.0.2.1.5", b" 198.51.100.7 4242 110\r\n", "v1: bad source address"),
    ("v1 empty octet", b"PROXY TCP4 192..2.1", b" 198.51.100.7 4242 110\r\n", "v1: bad source address"),
    ("v1 16 characters", b"PROXY TCP4 " + b"1" * 15, b"1 198.51.100.7 4242 110\r\n", "v1: bad source address"),
    ("v1 name", b"PROXY TCP4 ", b"localhost 198.51.100.7 4242 110\r\n", "v1: bad source address"),
    ("v1 IPv6 for TCP4", b"PROXY TCP4 ", b"::1 198.51.100.7 4242 110\r\n", "v1: bad source address"),
    ("v1 IPv4 for TCP6", b"PROXY TCP6 192.0.2.1", b" 2001:db8::2 4242 110\r\n", "v1: bad source address"),
    ("v1 scoped IPv6", b"PROXY TCP6 fe80::1", b"%eth0 2001:db8::2 4242 110\r\n", "v1: bad source address"),
    ("v1 hex past f", b"PROXY TCP6 2001:db8::", b"g 2001:db8::2 4242 110\r\n", "v1: bad source address"),
    ("v1 two double colons", b"PROXY TCP6 2001::db8::1", b" 2001:db8::2 4242 110\r\n", "v1: bad source address"),
    ("v1 five hex digits", b"PROXY TCP6 2001:db8::12345", b" 2001:db8::2 4242 110\r\n", "v1: bad source address"),
    ("v1 46 characters", b"PROXY TCP6 " + b"0:" * 22 + b"0", b"0 ::1 4242 110\r\n", "v1: bad source address"),
    ("v1 bad destination", b"PROXY TCP4 192.0.2.1 198.51.100.7.1", b" 4242 110\r\n", "v1: bad destination address"),
    ("v1 bad destination v6", b"PROXY TCP6 ::1 ::1::", b" 4242 110\r\n", "v1: bad destination address"),
    ("v1 8-bit address", b"PROXY TCP6 ", "é::1 ::1 4242 110\r\n".encode(), "v1: bad source address"),
    # version 1: ports
    ("v1 port 65536", b"PROXY TCP4 192.0.2.1 198.51.100.7 65536", b" 110\r\n", "v1: bad source port"),
    ("v1 port 99999", b"PROXY TCP4 192.0.2.1 198.51.100.7 99999", b" 110\r\n", "v1: bad source port"),
    ("v1 port of 6 digits", b"PROXY TCP4 192.0.2.1 198.51.100.7 12345", b"6 110\r\n", "v1: bad source port"),
    ("v1 port +1", b"PROXY TCP4 192.0.2.1 198.51.100.7 ", b"+1 110\r\n", "v1: bad source port"),
    ("v1 port -1", b"PROXY TCP4 192.0.2.1 198.51.100.7 ", b"-1 110\r\n", "v1: bad source port"),
    ("v1 port 0110", b"PROXY TCP4 192.0.2.1 198.51.100.7 0110", b" 110\r\n", "v1: bad source port"),
    ("v1 port 00", b"PROXY TCP4 192.0.2.1 198.51.100.7 00", b" 110\r\n", "v1: bad source port"),
    ("v1 port hex", b"PROXY TCP4 192.0.2.1 198.51.100.7 0", b"x10 110\r\n", "v1: bad source port"),
    ("v1 destination port 65536", b"PROXY TCP4 192.0.2.1 198.51.100.7 4242 65536", b"\r\n", "v1: bad destination port"),
    ("v1 destination port 01", b"PROXY TCP4 192.0.2.1 198.51.100.7 4242 01", b"\r\n", "v1: bad destination port"),
    ("v1 destination port a", b"PROXY TCP4 192.0.2.1 198.51.100.7 4242 ", b"a\r\n", "v1: bad destination port"),
]


@pytest.mark.parametrize("head, tail, reason", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed(head, tail, reason):
    data = head + tail
    at = len(head) + 1  # the bytes fed when it fails
    assert whole(data) == ("bad", reason, len(data))
    assert byte_by_byte(data) == ("bad", reason, at)
    assert whole(head) == ("more",)
    assert whole(head + tail[:1]) == ("bad", reason, at)
    for cut in range(len(data) + 1):
        outcome = run([data[:cut], data[cut:]])
        assert outcome == ("bad", reason, cut if cut >= at else len(data))


def test_malformed_names_are_distinct():
    assert len({m[0] for m in MALFORMED}) == len(MALFORMED)
    assert len({v[0] for v in VALID}) == len(VALID)


def test_reasons_carry_no_client_bytes():
    for *_, reason in MALFORMED:
        assert reason.isascii() and reason.isprintable()
        assert "alice" not in reason and "localhost" not in reason


# -- fuzz -----------------------------------------------------------------------------

PREFIXES = [
    b"",
    b"P",
    b"PROXY ",
    b"PROXY TCP4 ",
    b"PROXY TCP6 ",
    b"PROXY UNKNOWN",
    b"PROXY TCP4 192.0.2.1 198.51.100.7 ",
    SIG,
    SIG + b"\x21\x11\x00\x0c",
    SIG + b"\x21\x21\x00",
    SIG + b"\x20\x00\x00",
]


def splits(data, cuts):
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@FUZZ
@given(
    prefix=st.sampled_from(PREFIXES),
    data=st.binary(max_size=1200),
    cuts=st.lists(st.integers(0, 1300), max_size=6),
)
def test_fuzz_arbitrary_bytes(prefix, data, cuts):
    data = prefix + data
    outcome = whole(data)  # anything but BadProxyHeader would escape here
    assert outcome[0] in ("ok", "bad", "more")
    # the same answer at any split, and failing at the same byte
    split = run(splits(data, cuts))
    if outcome[0] == "bad":
        at = byte_by_byte(data)
        assert at[:2] == outcome[:2]
        assert split[:2] == outcome[:2] and at[2] <= split[2]
        assert whole(data[: at[2] - 1]) == ("more",)
    else:
        assert split == outcome
    # never stalls: once the longest header could have arrived, there is an answer
    if outcome[0] == "more":
        assert len(data) < MAX_V2_HEADER
        padded = data + b"\0" * (MAX_V2_HEADER - len(data))
        assert whole(padded)[0] in ("ok", "bad")


@FUZZ
@given(data=st.data(), position=st.integers(0, 10**6), byte=st.integers(0, 255), mode=st.sampled_from("rid"))
def test_fuzz_mutated_headers(data, position, byte, mode):
    good = data.draw(st.sampled_from([v[1] for v in VALID]))
    i = position % len(good)
    mutated = {
        "r": good[:i] + bytes([byte]) + good[i + 1 :],
        "i": good[:i] + bytes([byte]) + good[i:],
        "d": good[:i] + good[i + 1 :],
    }[mode]
    outcome = whole(mutated)
    assert outcome[0] in ("ok", "bad", "more")
    assert byte_by_byte(mutated)[:2] == outcome[:2]


def v1_address_text(ip, style):
    if ip.version == 4:
        return str(ip)
    text = {"short": str(ip), "long": ip.exploded, "ntop": socket.inet_ntop(socket.AF_INET6, ip.packed)}[style]
    return text.upper() if style == "long" else text


def ntop(ip):
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return socket.inet_ntop(family, ip.packed)


OTHER_TLVS = st.lists(
    st.tuples(st.sampled_from([t for t in range(256) if t not in (CRC32C, SSL)]), st.binary(max_size=40)), max_size=6
)
OTHER_SUBS = st.lists(st.tuples(st.sampled_from([0x22, 0x23, 0x24, 0x25, 0x99]), st.binary(max_size=20)), max_size=3)
VERSION_TEXTS = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=12)


@st.composite
def valid_headers(draw):
    """(bytes, expected ProxyHeader with rest b"")."""
    version = draw(st.sampled_from([4, 6]))
    src = draw(st.ip_addresses(v=version))
    dst = draw(st.ip_addresses(v=version))
    sport, dport = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    expected = header((ntop(src), sport), (ntop(dst), dport))
    if draw(st.booleans()):  # version 1
        style = draw(st.sampled_from(["short", "long", "ntop"]))
        line = f"PROXY TCP{version} {v1_address_text(src, style)} {v1_address_text(dst, style)} {sport} {dport}\r\n"
        return line.encode(), dataclasses.replace(expected, version=1)
    body = (src.packed + dst.packed) + struct.pack(">HH", sport, dport)
    tlvs = [tlv(kind, value) for kind, value in draw(OTHER_TLVS)]
    if draw(st.booleans()):
        client = draw(st.integers(0, 255))
        version_text = draw(st.none() | VERSION_TEXTS)
        subs = [tlv(kind, value) for kind, value in draw(OTHER_SUBS)]
        if version_text is not None:
            subs.insert(draw(st.integers(0, len(subs))), tlv(SSL_VERSION, version_text.encode()))
        tlvs.insert(draw(st.integers(0, len(tlvs))), ssl_tlv(client, draw(st.integers(0, 2**32 - 1)), b"".join(subs)))
        if client & 0x01:
            expected = dataclasses.replace(expected, tls=True, tls_version=version_text)
    crc_at = draw(st.none() | st.integers(0, len(tlvs)))
    family = INET if version == 4 else INET6
    return v2(PROXY, family, body, tlvs, crc_at=crc_at), expected


@FUZZ
@given(valid_headers(), st.binary(max_size=40), st.lists(st.integers(0, 700), max_size=8))
def test_fuzz_valid_headers_round_trip(generated, tail, cuts):
    data, expected = generated
    assert len(data) <= MAX_V2_HEADER
    assert whole(data) == ("ok", expected)
    assert whole(data + tail) == ("ok", dataclasses.replace(expected, rest=tail))
    assert run(splits(data + tail, cuts)) == ("ok", dataclasses.replace(expected, rest=tail))


@FUZZ
@given(st.integers(16, 2000), st.sampled_from([PROXY, LOCAL]), st.sampled_from([INET, INET6, UNSPEC]))
def test_fuzz_v2_length_bound(total, command, family):
    """Any declared length: accepted up to the bound (given the bytes), refused
    at the 16th byte beyond it."""
    if command == PROXY and family == UNSPEC:
        return
    block = {INET: 12, INET6: 36, UNSPEC: 0}[family]
    length = total - 16
    head = SIG + bytes([0x20 | command, family]) + length.to_bytes(2, "big")
    if total > MAX_V2_HEADER:
        assert whole(head) == ("bad", f"v2: header longer than {MAX_V2_HEADER} bytes", 16)
    elif command == PROXY and length < block:
        assert whole(head) == ("bad", "v2: length shorter than the address block", 16)
    else:
        if command == LOCAL:
            body = b"\xff" * length  # skipped unread, whatever the family
        else:
            pad = length - block
            if pad in (1, 2):
                return  # no TLV is shorter than 3 bytes
            body = addresses() if family == INET else bytes(block)
            body += tlv(NOOP, b"\0" * (pad - 3)) if pad else b""
        assert whole(head) == (("more",) if length else ("ok", header()))
        assert whole(head + body)[0] == "ok"


# -- trusted networks --------------------------------------------------------------


def test_read_networks():
    assert read_networks("") == ()
    assert read_networks("  \n ") == ()
    net = ipaddress.ip_network
    assert read_networks("10.0.0.0/8, 192.168.1.0/24\n2001:db8::/32,,192.0.2.7") == (
        net("10.0.0.0/8"),
        net("192.168.1.0/24"),
        net("2001:db8::/32"),
        net("192.0.2.7/32"),
    )
    assert read_networks("::1 10.0.0.0/8 10.0.0.0/8") == (net("::1/128"), net("10.0.0.0/8"))
    # IPv4-mapped networks are kept as the IPv4 networks they are
    assert read_networks("::ffff:10.0.0.0/104 ::ffff:192.0.2.1") == (net("10.0.0.0/8"), net("192.0.2.1/32"))
    assert read_networks("::ffff:0:0/96") == (net("0.0.0.0/0"),)


@pytest.mark.parametrize(
    "text, message",
    [
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set: did you mean 10.0.0.0/8?"),
        ("10.0.0.0/8 bogus", "'bogus' is not an IP network"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not an IP network"),
        ("10.0.0.0/-1", "'10.0.0.0/-1' is not an IP network"),
        ("010.0.0.0/8", "'010.0.0.0/8' is not an IP network"),
        ("pop.example.org", "'pop.example.org' is not an IP network"),
        ("10.0.0.0/8;192.168.0.0/16", "'10.0.0.0/8;192.168.0.0/16' is not an IP network"),
        ("fe80::1%eth0", "'fe80::1%eth0': a scoped address (with %) cannot be a trusted network"),
        ("fe80::/10%eth0", "'fe80::/10%eth0': a scoped address"),
    ],
)
def test_read_networks_refuses(text, message):
    with pytest.raises(ValueError) as caught:
        read_networks(text)
    assert str(caught.value).startswith(message)


def test_is_trusted():
    networks = read_networks("10.0.0.0/8 192.0.2.7 2001:db8::/32 fe80::/10")
    for peer in ("10.1.2.3", "192.0.2.7", "::ffff:10.1.2.3", "::FFFF:192.0.2.7", "2001:db8::5", "fe80::1%eth0"):
        assert is_trusted(peer, networks), peer
    for peer in ("11.0.0.1", "192.0.2.8", "::ffff:11.0.0.1", "2001:db9::1", "::1", "", "stdin", "/run/mpop3.sock"):
        assert not is_trusted(peer, networks), peer
    # the default, no network, trusts no one
    assert not is_trusted("127.0.0.1", read_networks(""))
    assert not is_trusted("127.0.0.1", ())
    # a mapped peer is its IPv4 address: in IPv4 networks and not in IPv6 ones
    assert not is_trusted("::ffff:10.1.2.3", read_networks("::/0"))
    assert is_trusted("::ffff:10.1.2.3", read_networks("0.0.0.0/0"))
    assert is_trusted("10.1.2.3", read_networks("::ffff:10.0.0.0/104"))
    assert is_trusted("::ffff:10.1.2.3", read_networks("::ffff:10.0.0.0/104"))
    assert not is_trusted("10.1.2.3", read_networks("::/0"))
    assert not is_trusted("2001:db8::1", read_networks("0.0.0.0/0"))
