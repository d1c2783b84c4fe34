"""The Cython input kernels (mpop3/protocol/_parser.pyx) against their plain-Python
twin (parser_reference.py): the same lines, the same parses, at every
split point."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpop3.protocol import _parser as _proto
from mpop3.protocol import parser_reference as proto_reference
from mpop3.protocol.commands import COMMANDS, Args

IMPLS = pytest.mark.parametrize("proto", [_proto, proto_reference], ids=["c", "py"])

P = proto_reference
PARSES = [
    (b"USER bob", (P.USER, b"bob", None)),
    (b"user bob", (P.USER, b"bob", None)),
    (b"uSeR  bob  ", (P.USER, b"bob", None)),
    (b"USER ../etc/passwd", (P.USER, b"../etc/passwd", None)),
    (b"USER", (P.BAD_ARGS, P.USER, None)),
    (b"USER a b", (P.BAD_ARGS, P.USER, None)),
    (b"PASS two words ", (P.PASS, b"two words ", None)),  # the rest of the line, verbatim
    (b"PASS", (P.BAD_ARGS, P.PASS, None)),
    (b"APOP bob c4c9334bac560ecc979e58001b3e22fb", (P.APOP, b"bob", b"c4c9334bac560ecc979e58001b3e22fb")),
    (b"APOP bob", (P.BAD_ARGS, P.APOP, None)),
    (b"STAT", (P.STAT, None, None)),
    (b"STAT 1", (P.BAD_ARGS, P.STAT, None)),
    (b"LIST", (P.LIST, None, None)),
    (b"LIST 0", (P.LIST, 0, None)),  # syntactically fine; "no such message" later
    (b"LIST 2", (P.LIST, 2, None)),
    (b"LIST 2147483647", (P.LIST, 2147483647, None)),
    (b"LIST 2147483648", (P.BAD_ARGS, P.LIST, None)),
    (b"LIST 4294967297", (P.BAD_ARGS, P.LIST, None)),  # never wraps to message 1
    (b"LIST 99999999999999999999999", (P.BAD_ARGS, P.LIST, None)),
    (b"LIST -1", (P.BAD_ARGS, P.LIST, None)),
    (b"LIST +1", (P.BAD_ARGS, P.LIST, None)),
    (b"LIST 1 2", (P.BAD_ARGS, P.LIST, None)),
    (b"RETR abc", (P.BAD_ARGS, P.RETR, None)),
    (b"RETR", (P.BAD_ARGS, P.RETR, None)),
    (b"RETR 99999", (P.RETR, 99999, None)),
    (b"retr 007", (P.RETR, 7, None)),
    (b"DELE 1", (P.DELE, 1, None)),
    (b"TOP 1 -1", (P.BAD_ARGS, P.TOP, None)),
    (b"TOP 1", (P.BAD_ARGS, P.TOP, None)),
    (b"TOP 1 0", (P.TOP, 1, 0)),
    (b"TOP 1 99999999", (P.TOP, 1, 99999999)),
    (b"TOP 1 999999999999999999999999", (P.TOP, 1, P.TOP_ALL)),  # saturates: the whole message
    (b"UIDL", (P.UIDL, None, None)),
    (b"UIDL 3", (P.UIDL, 3, None)),
    (b"NOOP", (P.NOOP, None, None)),
    (b"RSET", (P.RSET, None, None)),
    (b"QUIT", (P.QUIT, None, None)),
    (b"CAPA", (P.CAPA, None, None)),
    (b"NO\0OP", (P.UNKNOWN, None, None)),
    (b"USER bob\0", (P.UNKNOWN, None, None)),  # a NUL makes the line invalid
    (b"", (P.UNKNOWN, None, None)),
    (b" STAT", (P.UNKNOWN, None, None)),
    (b"STATS", (P.UNKNOWN, None, None)),
    (b"STLS", (P.STLS, None, None)),
    (b"stls x", (P.BAD_ARGS, P.STLS, None)),
    (b"AUTH", (P.BAD_ARGS, P.AUTH, None)),
    (b"AUTH PLAIN", (P.AUTH, b"PLAIN", None)),
    (b"auth plain AGJvYgBwdw==", (P.AUTH, b"plain", b"AGJvYgBwdw==")),
    (b"AUTH PLAIN = ", (P.AUTH, b"PLAIN", b"=")),
    (b"AUTH PLAIN a b", (P.BAD_ARGS, P.AUTH, None)),
    (b"XTND XLST", (P.UNKNOWN, None, None)),
    (b"\xc3\xa9TAT", (P.UNKNOWN, None, None)),
    (b"ST\tAT", (P.UNKNOWN, None, None)),
]


@IMPLS
@pytest.mark.parametrize("line, expected", PARSES)
def test_parse_command(proto, line, expected):
    assert proto.parse_command(line) == expected


def test_command_ids_agree():
    for name in (
        "USER",
        "PASS",
        "APOP",
        "STAT",
        "LIST",
        "RETR",
        "DELE",
        "NOOP",
        "RSET",
        "QUIT",
        "TOP",
        "UIDL",
        "CAPA",
        "STLS",
        "AUTH",
        "UNKNOWN",
        "BAD_ARGS",
        "TOO_LONG",
        "MAX_MSG_NUMBER",
        "TOP_ALL",
    ):
        assert getattr(_proto, name) == getattr(proto_reference, name), name
    assert _proto.NAMES == proto_reference.NAMES


SPLITS = [
    (b"USER bob\r\n", [b"USER bob"]),
    (b"USER bob\n", [b"USER bob"]),  # bare LF accepted (popa3d)
    (b"NOOP\r\nSTAT\r\n", [b"NOOP", b"STAT"]),  # pipelining
    (b"A\rB\r\n", [b"A\rB"]),  # a lone CR is data
    (b"\r\n\n", [b"", b""]),
    (b"x" * 20 + b"\r\nSTAT\r\n", [None, b"STAT"]),  # over-long: reported once, then resync
    (b"x" * 15 + b"\r\n", [b"x" * 15]),  # exactly the limit (17 with CRLF)... fits
    (b"x" * 16 + b"\r\n", [None]),  # one octet more does not
    (b"y" * 40, []),  # an unfinished over-long line: reported when it passes the limit
]


@IMPLS
@pytest.mark.parametrize("data, expected", SPLITS)
def test_line_reader_every_split(proto, data, expected):
    for i, j in itertools.combinations_with_replacement(range(len(data) + 1), 2):
        reader = proto.LineReader(17)
        got = reader.feed(data[:i]) + reader.feed(data[i:j]) + reader.feed(data[j:])
        if data == b"y" * 40:
            assert got == [None], (i, j)
        else:
            assert got == expected, (i, j)


@IMPLS
def test_line_reader_bounds_what_it_holds(proto):
    reader = proto.LineReader(255)
    assert reader.feed(b"z" * 10000) == [None]
    assert reader.pending == 0
    assert reader.feed(b"more\nQUIT\n") == [b"QUIT"]  # the rest of the long line is dropped


lines = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"USER",
                b"PASS",
                b"APOP",
                b"STAT",
                b"LIST",
                b"RETR",
                b"DELE",
                b"NOOP",
                b"RSET",
                b"QUIT",
                b"TOP",
                b"UIDL",
                b"CAPA",
                b"list",
                b"tOp",
            ]
        ),
        st.sampled_from(
            [
                b" ",
                b"  ",
                b"0",
                b"1",
                b"-1",
                b"4294967297",
                b"99999999999",
                b"\0",
                b"a",
                b"\t",
                b"\r",
                b"\xff",
                b"2147483647",
                b"2147483648",
            ]
        ),
        st.binary(max_size=6),
    ),
    max_size=8,
).map(b"".join)


@settings(max_examples=3000, deadline=None)
@given(lines)
def test_parse_command_matches_reference(line):
    assert _proto.parse_command(line) == proto_reference.parse_command(line)


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=300).filter(lambda b: True),
    st.lists(st.integers(0, 300), max_size=6),
    st.integers(3, 64),
    st.integers(1, 8),
)
def test_line_reader_matches_reference(data, cuts, max_line, max_lines):
    c, py = _proto.LineReader(max_line), proto_reference.LineReader(max_line)
    points = sorted({min(x, len(data)) for x in cuts})
    previous = 0
    for point in points + [len(data)]:
        piece = data[previous:point]
        assert c.feed(piece, max_lines) == py.feed(piece, max_lines)
        assert c.pending == py.pending and c.backlog == py.backlog
        assert c.more(max_lines) == py.more(max_lines)
        previous = point
    assert c.more() == py.more() and c.backlog == py.backlog == 0


def test_line_reader_takes_a_bounded_number_of_lines_at_a_time():
    """A read of 85,000 tiny lines is split off 64 at a time; nothing is
    lost or reordered."""
    for reader in (_proto.LineReader(255), proto_reference.LineReader(255)):
        data = b"".join(b"%d\n" % n for n in range(85000))
        got = reader.feed(data, 64)
        assert len(got) == 64 and reader.backlog == len(data) - len(b"".join(b"%d\n" % n for n in range(64)))
        while reader.backlog:
            batch = reader.more(64)
            assert 0 < len(batch) <= 64
            got += batch
        assert got == [b"%d" % n for n in range(85000)]


# What each argument shape accepts, and a line it refuses.
SHAPES = {
    Args.NONE: (b"", b" x"),
    Args.WORD: (b" w", b""),
    Args.REST: (b" a b ", b""),
    Args.WORD_WORD: (b" a b", b" a"),
    Args.WORD_OPT_WORD: (b" a", b" a b c"),
    Args.NUM: (b" 1", b" x"),
    Args.OPT_NUM: (b"", b" x"),
    Args.NUM_COUNT: (b" 1 2", b" 1"),
}


def test_every_argument_shape_is_known_to_the_parsers():
    assert set(SHAPES) == set(Args)
    assert set(_proto.KINDS) == set(Args)


@IMPLS
@pytest.mark.parametrize("command", COMMANDS, ids=[c.verb for c in COMMANDS])
def test_the_parsers_follow_the_command_table(proto, command):
    """Ids and argument shapes come from commands.COMMANDS, in both parsers."""
    accepted, refused = SHAPES[command.args]
    assert proto.parse_command(command.verb.lower().encode() + accepted)[0] == command.id
    assert proto.parse_command(command.verb.encode() + refused) == (proto.BAD_ARGS, command.id, None)
    assert proto.NAMES[command.id] == command.verb
