"""The POP3 commands: each declared once, here.

An entry says everything the server knows about a command: its verb, the
states it is valid in, the shape of its arguments, its usage text, what it
adds to CAPA and which method of the protocol core handles it. The rest is
derived from this table and never written again:

- the parser's command ids and argument kinds (mpop3/protocol/_parser.pyx
  and its twin parser_reference.py read the table when they are imported);
- the dispatch per state in the core (mpop3/protocol/core.py);
- the `-ERR usage: ...` replies (replies.ERR_USAGE);
- the lines of CAPA that belong to commands (CAPABILITIES below).

Adding a command: add an entry (and an argument shape the parser knows, see
Args), write its handler `cmd_<verb>` in core.py, and a line in the tables
of tests/test_core.py.
"""

import enum
from typing import NamedTuple


class State(enum.Flag):
    """RFC 1939 section 3. CLOSED: the session is over, nothing is valid."""

    AUTHORIZATION = enum.auto()
    TRANSACTION = enum.auto()
    UPDATE = enum.auto()
    CLOSED = enum.auto()


AUTHORIZATION = State.AUTHORIZATION
TRANSACTION = State.TRANSACTION
UPDATE = State.UPDATE
CLOSED = State.CLOSED


class Args(enum.Enum):
    """Argument shapes. The parser has one rule per shape; arguments are
    separated by spaces, and extra spaces between and after them are
    tolerated except in REST."""

    NONE = "no arguments"
    WORD = "one word"
    REST = "the rest of the line, verbatim"  # PASS: passwords may hold spaces
    WORD_WORD = "two words"
    WORD_OPT_WORD = "a word and an optional second one"
    NUM = "a message number"
    OPT_NUM = "an optional message number"
    NUM_COUNT = "a message number and a line count"


class Command(NamedTuple):
    verb: str  # upper case, as on the wire
    states: State
    args: Args
    usage: bytes  # for `-ERR usage: ...`
    capa: str | None  # the CAPA line this command's availability decides
    handler: str  # the core's method; bound once at import, never from input
    rfc: str

    @property
    def id(self):
        """The parser's id: position in COMMANDS, from 1 (0 is UNKNOWN)."""
        return COMMANDS.index(self) + 1


COMMANDS = (
    Command("USER", AUTHORIZATION, Args.WORD, b"USER name", "USER", "cmd_user", "RFC 1939 section 7"),
    Command("PASS", AUTHORIZATION, Args.REST, b"PASS password", None, "cmd_pass", "RFC 1939 section 7"),
    Command("APOP", AUTHORIZATION, Args.WORD_WORD, b"APOP name digest", None, "cmd_apop", "RFC 1939 section 7"),
    Command(
        "AUTH", AUTHORIZATION, Args.WORD_OPT_WORD, b"AUTH mechanism [initial-response]", "SASL", "cmd_auth", "RFC 5034"
    ),
    Command("STLS", AUTHORIZATION, Args.NONE, b"STLS", "STLS", "cmd_stls", "RFC 2595 section 4"),
    Command("STAT", TRANSACTION, Args.NONE, b"STAT", None, "cmd_stat", "RFC 1939 section 5"),
    Command("LIST", TRANSACTION, Args.OPT_NUM, b"LIST [message]", None, "cmd_list", "RFC 1939 section 5"),
    Command("RETR", TRANSACTION, Args.NUM, b"RETR message", None, "cmd_retr", "RFC 1939 section 5"),
    Command("DELE", TRANSACTION, Args.NUM, b"DELE message", None, "cmd_dele", "RFC 1939 section 5"),
    Command("NOOP", TRANSACTION, Args.NONE, b"NOOP", None, "cmd_noop", "RFC 1939 section 5"),
    Command("RSET", TRANSACTION, Args.NONE, b"RSET", None, "cmd_rset", "RFC 1939 section 5"),
    Command("TOP", TRANSACTION, Args.NUM_COUNT, b"TOP message lines", "TOP", "cmd_top", "RFC 1939 section 7"),
    Command("UIDL", TRANSACTION, Args.OPT_NUM, b"UIDL [message]", "UIDL", "cmd_uidl", "RFC 1939 section 7"),
    Command("CAPA", AUTHORIZATION | TRANSACTION, Args.NONE, b"CAPA", None, "cmd_capa", "RFC 2449 section 5"),
    Command("QUIT", AUTHORIZATION | TRANSACTION, Args.NONE, b"QUIT", None, "cmd_quit", "RFC 1939 sections 4, 6"),
)

# The lines CAPA may list (RFC 2449 section 6), in the order it lists them.
# Those named by a command's `capa` appear when that command works for the
# session; the others describe the server (replies.capabilities decides).
CAPABILITIES = (
    "TOP",
    "UIDL",
    "USER",
    "RESP-CODES",
    "AUTH-RESP-CODE",
    "PIPELINING",
    "STLS",
    "SASL",
    "EXPIRE",
    "LOGIN-DELAY",
    "IMPLEMENTATION",
)

# The largest message number accepted; anything longer is a syntax error
# rather than wrapping around to a small number.
MAX_MSG_NUMBER = 2**31 - 1
# TOP's line count saturates here: `TOP n 99999999...` means the whole message.
TOP_ALL = 2**31 - 1
