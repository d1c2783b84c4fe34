"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2)
that a load balancer puts before the client's first byte, read without I/O:
a `ProxyHeaderReader` is fed the bytes as they arrive and answers None (more
are needed), a `ProxyHeader`, or raises `BadProxyHeader`. The listener owns
the socket, the timeout and the trusted networks (`read_networks`,
`is_trusted`); this module only judges bytes.

Version 1 is one US-ASCII line, "PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n"
or "PROXY UNKNOWN ...\\r\\n", at most 107 bytes with its CRLF. Version 2 is a
16-byte binary block (signature, version and command, family, length), the
addresses (12 bytes for TCP over IPv4, 36 over IPv6), then TLVs; of those,
PP2_TYPE_SSL says whether the client spoke TLS to the proxy (and which
version, in its PP2_SUBTYPE_SSL_VERSION sub-TLV) and PP2_TYPE_CRC32C, when
present, is checked as the specification requires of a receiver that knows
it. Other TLVs are skipped, but they must tile the block exactly.

Bounds: a version 1 line is never held beyond 107 bytes, a version 2 header
beyond MAX_V2_HEADER (1024) bytes, a little less than twice what a full
header from HAProxy takes (addresses, SSL with its CN and cipher, SNI as
AUTHORITY, UNIQUE_ID, CRC32C: roughly 600 bytes); it is a parameter of the
reader. The reader holds no more of the feeds than those bounds, whatever
their size, and its work is linear in the header's length. Bytes after the header that came in the same feed are
handed back as `ProxyHeader.rest`: they are the client's.

Why strict: the header decides the address that logs, per-address limits,
failed-login delays and the cleartext policy go by, and whether the session
counts as TLS. A sender we trust never emits a malformed header, so one
that is malformed is a misconfigured proxy or a forgery, and guessing at
its meaning is how a forgery gets through. So every field is checked
(dotted IPv4 without leading zeros, IPv6, decimal ports without sign or
leading zeros, single spaces, CRLF and nothing else; version 2, command
LOCAL or PROXY, TCP over IPv4 or IPv6, a length that holds the addresses,
TLVs and SSL sub-TLVs that tile their space) and a header fails as soon as
its bytes prove it wrong. A first byte that starts neither signature fails
at once, a signature at its first wrong byte. A version 1 line fails at the first byte that no valid line has
there (a character a field cannot hold, a field grown too long, a second
space, a lone CR or LF, byte 107 that is not the LF of the CRLF); a field
judged whole (an address, a port, the protocol word) fails at the space or
CR that ends it. A version 2 header fails at its 13th to 16th byte when
version, command, family or length is wrong; its address block and TLVs
are judged when the whole declared length is in (the specification forbids
parsing them earlier). Whatever way the bytes are split across feeds, the
answer and its reason are the same, and so is the byte it fails at.

LOCAL (version 2, a proxy's health check) and UNKNOWN (version 1) headers
are valid: the connection is served with its real addresses. For LOCAL the
specification says the family and address block are ignored, so only the
fixed 16 bytes are checked and the rest is skipped. A PROXY command for a
UNIX socket, a datagram transport or an unspecified family is refused: a
POP3 listener serves TCP clients, and falling back to the proxy's own
address would put every client behind it under one address.
"""

import ipaddress
import re
import socket
from dataclasses import dataclass

__all__ = [
    "MAX_V1_LINE",
    "MAX_V2_HEADER",
    "BadProxyHeader",
    "ProxyHeader",
    "ProxyHeaderReader",
    "is_trusted",
    "read_networks",
]

MAX_V1_LINE = 107  # the longest version 1 line, CRLF included (the specification's bound)
MAX_V2_HEADER = 1024  # the longest version 2 header accepted, its 16 fixed bytes included

V1_MAGIC = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family, length

# version 2 commands, families (high nibble) and transports (low nibble)
LOCAL, PROXY = 0x0, 0x1
TCP_OVER_IPV4, TCP_OVER_IPV6 = 0x11, 0x21
FAMILIES = {0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32}  # the combinations the specification defines
ADDRESS_BLOCK = {TCP_OVER_IPV4: 12, TCP_OVER_IPV6: 36}

PP2_TYPE_CRC32C = 0x03
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_CLIENT_SSL = 0x01

SP, CR, LF = 0x20, 0x0D, 0x0A

# version 1 fields: index in the line (0 is the protocol word), reason when it is wrong
V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
V1_REASONS = (
    "v1: unknown protocol",
    "v1: bad source address",
    "v1: bad destination address",
    "v1: bad source port",
    "v1: bad destination port",
)
V1_LAST = 4  # the destination port
V1_SKIP = 5  # UNKNOWN's remainder, ignored up to the CRLF

DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
# what a field may hold, and how long it may be (IPv6: 45, as inet_ntop may end in dotted IPv4)
V1_IPV4 = (DIGITS | frozenset(b"."), 15)
V1_IPV6 = (HEX | frozenset(b":."), 45)
V1_PORT = (DIGITS, 5)
V1_FIELDS = {b"TCP4": (None, V1_IPV4, V1_IPV4, V1_PORT, V1_PORT), b"TCP6": (None, V1_IPV6, V1_IPV6, V1_PORT, V1_PORT)}

OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_TEXT = re.compile(rb"(?:%s\.){3}%s" % (OCTET, OCTET))
PORT_TEXT = re.compile(rb"0|[1-9][0-9]{0,4}")


class BadProxyHeader(Exception):
    """The bytes are not a valid PROXY protocol header; `reason` says why,
    in a few words fit for a log line (never bytes of the header itself)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a complete header says.

    local: a LOCAL command (version 2) or UNKNOWN protocol (version 1): serve
        the connection with its real addresses; source and destination are None.
    source, destination: (host, port), the host in the form getpeername()
        gives (socket.inet_ntop), or None when local.
    tls: the version 2 SSL TLV says the client connected over TLS (never for
        version 1, nor for LOCAL).
    tls_version: the SSL TLV's version string ("TLSv1.3") when tls, else None.
    rest: the bytes after the header in the feed that completed it: the
        client's own, for the POP3 parser.
    version: 1 or 2, for the log.
    """

    local: bool
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tls: bool
    tls_version: str | None
    rest: bytes
    version: int


class ProxyHeaderReader:
    """Reads one PROXY header from bytes fed as they arrive.

    feed(data) returns None while more bytes are needed, the ProxyHeader once
    it is complete, or raises BadProxyHeader as soon as the bytes seen prove
    it malformed. A reader reads one header: feeding it again after an answer
    or an error is a programming error (RuntimeError)."""

    __slots__ = ("_buf", "_pos", "_version", "_over", "_max_v2", "_field", "_start", "_protocol", "_cr", "_values")

    def __init__(self, max_v2_header=MAX_V2_HEADER):
        if not V2_FIXED <= max_v2_header <= V2_FIXED + 0xFFFF:
            raise ValueError(f"max_v2_header must be {V2_FIXED}-{V2_FIXED + 0xFFFF}")
        self._max_v2 = max_v2_header
        self._buf = bytearray()  # the header's bytes so far, never more
        self._pos = 0  # the first byte of _buf not yet judged
        self._version = 0  # 0 until the first byte says 1 or 2
        self._over = False
        # version 1: the field being read, where it started, the protocol word,
        # a CR seen (the LF must follow), the fields read
        self._field = 0
        self._start = len(V1_MAGIC)
        self._protocol = None
        self._cr = False
        self._values = []

    def feed(self, data):
        if self._over:
            raise RuntimeError("this reader has already given its answer")
        if not data:
            return None
        try:
            if self._version == 0:
                first = data[0]
                if first == V1_MAGIC[0]:
                    self._version = 1
                elif first == V2_SIGNATURE[0]:
                    self._version = 2
                else:
                    raise BadProxyHeader("bad signature")
            header = self._feed_v1(data) if self._version == 1 else self._feed_v2(data)
        except BadProxyHeader:
            self._over = True
            raise
        if header is not None:
            self._over = True
        return header

    # -- version 1 ---------------------------------------------------------

    def _feed_v1(self, data):
        buf = self._buf
        before = len(buf)
        buf += data[: MAX_V1_LINE - before]
        for i in range(self._pos, len(buf)):
            if self._v1_byte(i, buf[i]):
                self._pos = i + 1
                return self._v1_header(bytes(data[i + 1 - before :]))
        # A line that has not ended by byte MAX_V1_LINE has failed there, so
        # a full buffer always ends in an answer: the reader cannot stall.
        self._pos = len(buf)
        return None

    def _v1_byte(self, i, c):
        """Judges byte i of a version 1 line; True when it ends the line."""
        if i < len(V1_MAGIC):
            if c != V1_MAGIC[i]:
                raise BadProxyHeader("bad signature")
            return False
        if self._cr:
            if c != LF:
                raise BadProxyHeader("v1: CR without LF")
            return True
        if c == LF:
            raise BadProxyHeader("v1: LF without CR")
        if i >= MAX_V1_LINE - 1:  # only the LF of the CRLF fits in the last byte
            raise BadProxyHeader(f"v1: line longer than {MAX_V1_LINE} bytes")
        field = self._field
        if field == V1_SKIP:
            if c == CR:
                self._cr = True
            elif not 0x20 <= c <= 0x7E:
                raise BadProxyHeader("v1: bad character after UNKNOWN")
            return False
        if c == SP or c == CR:
            self._end_field(i, c == CR)
            return False
        if field == 0:
            word = self._buf[self._start : i + 1]
            if not any(p.startswith(word) for p in V1_PROTOCOLS):
                raise BadProxyHeader(V1_REASONS[0])
            return False
        allowed, longest = V1_FIELDS[self._protocol][field]
        if c not in allowed or i - self._start >= longest:
            raise BadProxyHeader(V1_REASONS[field])
        return False

    def _end_field(self, i, at_cr):
        """The field that started at self._start ends at byte i (a space or the CR)."""
        field = self._field
        token = bytes(self._buf[self._start : i])
        if not token:
            raise BadProxyHeader("v1: missing fields" if at_cr and field == 0 else "v1: extra space")
        if field == 0:
            if token not in V1_PROTOCOLS:
                raise BadProxyHeader(V1_REASONS[0])
            self._protocol = token
            if token == b"UNKNOWN":
                self._field = V1_SKIP
                self._cr = at_cr
                return
        elif field <= 2:
            self._values.append(self._v1_address(token, field))
        else:
            if not PORT_TEXT.fullmatch(token) or int(token) > 0xFFFF:
                raise BadProxyHeader(V1_REASONS[field])
            self._values.append(int(token))
        if at_cr:
            if field != V1_LAST:
                raise BadProxyHeader("v1: missing fields")
            self._cr = True
        elif field == V1_LAST:
            raise BadProxyHeader("v1: too many fields")
        else:
            self._field = field + 1
            self._start = i + 1

    def _v1_address(self, token, field):
        if self._protocol == b"TCP4":
            if not IPV4_TEXT.fullmatch(token):
                raise BadProxyHeader(V1_REASONS[field])
            return token.decode("ascii")
        try:
            address = ipaddress.IPv6Address(token.decode("ascii"))
        except ValueError:
            raise BadProxyHeader(V1_REASONS[field]) from None
        return socket.inet_ntop(socket.AF_INET6, address.packed)

    def _v1_header(self, rest):
        if self._protocol == b"UNKNOWN":
            return ProxyHeader(True, None, None, False, None, rest, 1)
        src, dst, sport, dport = self._values
        return ProxyHeader(False, (src, sport), (dst, dport), False, None, rest, 1)

    # -- version 2 ---------------------------------------------------------

    def _feed_v2(self, data):
        buf = self._buf
        taken = 0
        while True:
            total = V2_FIXED if len(buf) < V2_FIXED else V2_FIXED + (buf[14] << 8 | buf[15])
            chunk = data[taken : taken + total - len(buf)]
            buf += chunk
            taken += len(chunk)
            if self._pos < V2_FIXED:
                for i in range(self._pos, len(buf)):
                    self._v2_byte(i, buf[i])
                self._pos = len(buf)
                if len(buf) < V2_FIXED:
                    return None
                continue  # the length is known now: take the rest of the header
            if len(buf) < total:
                return None
            return self._v2_header(bytes(data[taken:]))

    def _v2_byte(self, i, c):
        """Judges byte i of the 16 fixed bytes of a version 2 header."""
        if i < len(V2_SIGNATURE):
            if c != V2_SIGNATURE[i]:
                raise BadProxyHeader("bad signature")
        elif i == 12:
            if c >> 4 != 2:
                raise BadProxyHeader(f"v2: bad version {c >> 4}")
            if c & 0xF not in (LOCAL, PROXY):
                raise BadProxyHeader(f"v2: bad command {c & 0xF}")
        elif i == 13:
            if c not in FAMILIES:
                raise BadProxyHeader(f"v2: bad family/transport 0x{c:02x}")
            if self._buf[12] & 0xF == PROXY:
                if c == 0x00:
                    raise BadProxyHeader("v2: PROXY command with an unspecified family")
                if c >> 4 == 0x3:
                    raise BadProxyHeader("v2: UNIX socket family, not served by a POP3 listener")
                if c & 0xF == 0x2:
                    raise BadProxyHeader("v2: datagram transport, not served by a POP3 listener")
        elif i == 15:
            length = self._buf[14] << 8 | c
            if V2_FIXED + length > self._max_v2:
                raise BadProxyHeader(f"v2: header longer than {self._max_v2} bytes")
            if self._buf[12] & 0xF == PROXY and length < ADDRESS_BLOCK[self._buf[13]]:
                raise BadProxyHeader("v2: length shorter than the address block")

    def _v2_header(self, rest):
        buf = self._buf
        if buf[12] & 0xF == LOCAL:
            return ProxyHeader(True, None, None, False, None, rest, 2)
        if buf[13] == TCP_OVER_IPV4:
            family, size = socket.AF_INET, 4
        else:
            family, size = socket.AF_INET6, 16
        ports = V2_FIXED + 2 * size
        src = socket.inet_ntop(family, bytes(buf[V2_FIXED : V2_FIXED + size]))
        dst = socket.inet_ntop(family, bytes(buf[V2_FIXED + size : ports]))
        sport = buf[ports] << 8 | buf[ports + 1]
        dport = buf[ports + 2] << 8 | buf[ports + 3]
        tls, tls_version = self._tlvs(ports + 4)
        return ProxyHeader(False, (src, sport), (dst, dport), tls, tls_version, rest, 2)

    def _tlvs(self, start):
        """Walks the TLVs from `start` to the end of the header: (tls, tls_version)."""
        buf = self._buf
        end = len(buf)
        ssl = crc = None
        for kind, first, stop in _tiles(buf, start, end, "v2: truncated TLV"):
            if kind == PP2_TYPE_SSL:
                if ssl is not None:
                    raise BadProxyHeader("v2: more than one SSL TLV")
                ssl = (first, stop)
            elif kind == PP2_TYPE_CRC32C:
                if crc is not None:
                    raise BadProxyHeader("v2: more than one CRC32C TLV")
                if stop - first != 4:
                    raise BadProxyHeader("v2: CRC32C TLV not 4 bytes long")
                crc = first
        if crc is not None:
            expected = int.from_bytes(buf[crc : crc + 4], "big")
            if _crc32c(buf[:crc] + b"\0\0\0\0" + buf[crc + 4 :]) != expected:
                raise BadProxyHeader("v2: CRC32C mismatch")
        if ssl is None:
            return False, None
        first, stop = ssl
        if stop - first < 5:  # client (1 byte), verify (4 bytes)
            raise BadProxyHeader("v2: truncated SSL TLV")
        version = None
        for kind, vfirst, vstop in _tiles(buf, first + 5, stop, "v2: truncated SSL sub-TLV"):
            if kind == PP2_SUBTYPE_SSL_VERSION:
                value = buf[vfirst:vstop]
                if version is not None:
                    raise BadProxyHeader("v2: more than one SSL version sub-TLV")
                if not value or not all(0x20 <= c <= 0x7E for c in value):
                    raise BadProxyHeader("v2: bad SSL version sub-TLV")
                version = value.decode("ascii")
        if not buf[first] & PP2_CLIENT_SSL:
            return False, None
        return True, version


def _tiles(buf, start, end, reason):
    """(type, first, stop) of each TLV in buf[start:end], which they must
    fill exactly (3 bytes of type and big-endian length, then the value)."""
    pos = start
    while pos < end:
        if end - pos < 3:
            raise BadProxyHeader(reason)
        first = pos + 3
        stop = first + (buf[pos + 1] << 8 | buf[pos + 2])
        if stop > end:
            raise BadProxyHeader(reason)
        yield buf[pos], first, stop
        pos = stop


def _crc32c_table():
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)
    return tuple(table)


CRC32C_TABLE = _crc32c_table()


def _crc32c(data):
    """CRC-32C (Castagnoli, RFC 4960 appendix B), as PP2_TYPE_CRC32C carries it."""
    crc = 0xFFFFFFFF
    table = CRC32C_TABLE
    for c in data:
        crc = table[(crc ^ c) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- who may send a header -----------------------------------------------------

MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def read_networks(text):
    """proxy_trusted_networks: CIDRs (or single addresses) separated by
    whitespace or commas, as a tuple of ip_network; empty text is no network
    at all. A network written in IPv4-mapped IPv6 (::ffff:10.0.0.0/104) is
    kept as the IPv4 network it maps, so it matches the same peers.
    Raises ValueError with a readable message."""
    networks = []
    for word in re.split(r"[\s,]+", text.strip()):
        if not word:
            continue
        if "%" in word:
            raise ValueError(f"{word!r}: a scoped address (with %) cannot be a trusted network")
        try:
            network = ipaddress.ip_network(word, strict=True)
        except ValueError as error:
            try:
                loose = ipaddress.ip_network(word, strict=False)
            except ValueError:
                raise ValueError(f"{word!r} is not an IP network (ADDRESS or ADDRESS/PREFIX): {error}") from None
            raise ValueError(f"{word!r} has host bits set: did you mean {loose}?") from None
        if network.version == 6 and network.subnet_of(MAPPED):
            mapped = network.network_address.ipv4_mapped
            network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def is_trusted(peer_host, networks):
    """Whether the peer (a host as getpeername() gives it) is in one of
    `networks` (from read_networks). An IPv4-mapped IPv6 peer, as a
    dual-stack socket reports IPv4 clients, is judged as its IPv4 address;
    an IPv6 scope (%eth0) is ignored; a peer that is no IP address (a UNIX
    socket) is never trusted."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(peer_host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)
