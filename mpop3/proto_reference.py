"""The plain-Python twin of mpop3/_proto.pyx: same API, same answers.

This is the readable specification of POP3 line splitting and command
parsing; the tests check the Cython kernels against it byte for byte.
"""

USER, PASS, APOP, STAT, LIST, RETR, DELE, NOOP, RSET, QUIT, TOP, UIDL, CAPA, STLS, AUTH = range(1, 16)
UNKNOWN = 0
BAD_ARGS = -1

NAMES = {USER: "USER", PASS: "PASS", APOP: "APOP", STAT: "STAT", LIST: "LIST", RETR: "RETR",
         DELE: "DELE", NOOP: "NOOP", RSET: "RSET", QUIT: "QUIT", TOP: "TOP", UIDL: "UIDL",
         CAPA: "CAPA", STLS: "STLS", AUTH: "AUTH"}
VERBS = {name.encode(): cmd for cmd, name in NAMES.items()}

MAX_MSG_NUMBER = 2**31 - 1
TOP_ALL = 2**31 - 1
TOO_LONG = None

# how many arguments each command takes, and of what kind
NONE, WORD, REST, WORD_WORD, NUM, OPT_NUM, NUM_COUNT, WORD_OPT_WORD = range(8)
ARGS = {USER: WORD, PASS: REST, APOP: WORD_WORD, RETR: NUM, DELE: NUM, LIST: OPT_NUM,
        UIDL: OPT_NUM, TOP: NUM_COUNT, AUTH: WORD_OPT_WORD}


def read_number(text, limit, saturate=False):
    """Decimal digits only (no sign, no spaces); -1 if not, or if above
    `limit` (unless `saturate`, which caps the value at `limit`)."""
    if not text or any(c not in b"0123456789" for c in text):
        return -1
    value = int(text)
    if value > limit:
        return limit if saturate else -1
    return value


def parse_command(line):
    if b"\0" in line:
        return (UNKNOWN, None, None)
    verb, space, rest = line.partition(b" ")
    cmd = VERBS.get(verb.upper()) if verb.isalpha() and verb.isascii() else None
    if cmd is None:
        return (UNKNOWN, None, None)
    kind = ARGS.get(cmd, NONE)
    if kind == REST:
        return (cmd, rest, None) if rest else (BAD_ARGS, cmd, None)
    words = rest.split(b" ")
    words = [w for w in words if w]
    if kind == NONE and not words:
        return (cmd, None, None)
    if kind == WORD and len(words) == 1:
        return (cmd, words[0], None)
    if kind == WORD_WORD and len(words) == 2:
        return (cmd, words[0], words[1])
    if kind == WORD_OPT_WORD and len(words) in (1, 2):
        return (cmd, words[0], words[1] if len(words) == 2 else None)
    if kind == OPT_NUM and not words:
        return (cmd, None, None)
    if kind in (OPT_NUM, NUM) and len(words) == 1:
        n = read_number(words[0], MAX_MSG_NUMBER)
        if n >= 0:
            return (cmd, n, None)
    if kind == NUM_COUNT and len(words) == 2:
        n = read_number(words[0], MAX_MSG_NUMBER)
        lines = read_number(words[1], TOP_ALL, saturate=True)
        if n >= 0 and lines >= 0:
            return (cmd, n, lines)
    return (BAD_ARGS, cmd, None)


class LineReader:
    def __init__(self, max_line=255):
        if max_line < 3:
            raise ValueError("max_line must allow at least a 1-octet line")
        self.max_line = max_line
        self.partial = b""
        self.skipping = False

    @property
    def pending(self):
        return len(self.partial)

    def feed(self, data):
        out = []
        while data:
            lf = data.find(b"\n")
            piece, data = (data, b"") if lf < 0 else (data[: lf + 1], data[lf + 1:])
            if self.skipping:
                self.skipping = lf < 0
            elif len(self.partial) + len(piece) > self.max_line:
                out.append(TOO_LONG)
                self.partial = b""
                self.skipping = lf < 0
            else:
                self.partial += piece
                if lf >= 0:
                    line = self.partial[:-1]
                    out.append(line[:-1] if line.endswith(b"\r") else line)
                    self.partial = b""
        return out
