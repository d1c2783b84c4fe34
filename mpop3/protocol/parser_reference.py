"""The plain-Python twin of _parser.pyx: same API, same answers.

This is the readable specification of POP3 line splitting and command
parsing; the tests check the Cython kernels against it byte for byte. Like
the kernels, it takes the verbs, ids and argument shapes from the command
table (commands.py).
"""

import sys

from .commands import COMMANDS, MAX_MSG_NUMBER, TOP_ALL, Args

UNKNOWN = 0
BAD_ARGS = -1
TOO_LONG = None

NAMES = {command.id: command.verb for command in COMMANDS}
globals().update({command.verb: command.id for command in COMMANDS})  # USER, PASS, ...
VERBS = {command.verb.encode(): command.id for command in COMMANDS}
ARGS = {command.id: command.args for command in COMMANDS}


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
    verb, _, rest = line.partition(b" ")
    cmd = VERBS.get(verb.upper()) if verb.isalpha() and verb.isascii() else None
    if cmd is None:
        return (UNKNOWN, None, None)
    kind = ARGS[cmd]
    if kind is Args.REST:
        return (cmd, rest, None) if rest else (BAD_ARGS, cmd, None)
    words = rest.split(b" ")
    words = [w for w in words if w]
    if kind is Args.NONE and not words:
        return (cmd, None, None)
    if kind is Args.WORD and len(words) == 1:
        return (cmd, words[0], None)
    if kind is Args.WORD_WORD and len(words) == 2:
        return (cmd, words[0], words[1])
    if kind is Args.WORD_OPT_WORD and len(words) in (1, 2):
        return (cmd, words[0], words[1] if len(words) == 2 else None)
    if kind is Args.OPT_NUM and not words:
        return (cmd, None, None)
    if kind in (Args.OPT_NUM, Args.NUM) and len(words) == 1:
        n = read_number(words[0], MAX_MSG_NUMBER)
        if n >= 0:
            return (cmd, n, None)
    if kind is Args.NUM_COUNT and len(words) == 2:
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
        self.rest = b""  # input not scanned yet (max_lines reached)

    @property
    def pending(self):
        return len(self.partial)

    @property
    def backlog(self):
        return len(self.rest)

    def feed(self, data, max_lines=sys.maxsize):
        data, self.rest = self.rest + data, b""
        return self.scan(data, max_lines)

    def more(self, max_lines=sys.maxsize):
        data, self.rest = self.rest, b""
        return self.scan(data, max_lines)

    def scan(self, data, max_lines):
        out = []
        while data:
            if len(out) >= max_lines:
                self.rest = data
                break
            lf = data.find(b"\n")
            piece, data = (data, b"") if lf < 0 else (data[: lf + 1], data[lf + 1 :])
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
