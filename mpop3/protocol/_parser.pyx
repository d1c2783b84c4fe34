"""POP3 input: split the byte stream into command lines and parse each one.

Two kernels, both plain functions of bytes with no I/O and no logging:

- LineReader splits whatever the socket delivers into lines, at any split
  point, accepting CRLF and bare LF (popa3d's one relaxation), and reports
  an over-long line once (TOO_LONG) instead of growing without bound.
- parse_command() turns one line into (command id, arg1, arg2): the verb is
  matched case-insensitively, the arguments are checked strictly (message
  numbers overflow-checked: `LIST 4294967297` is an error, never message 1;
  a NUL anywhere makes the line invalid).

The verbs, their ids and argument shapes are not written here: they are
read from the command table (commands.py) when this module is imported.
parser_reference.py is the plain-Python twin of this file: the same API and
the same answers, used by the tests as the readable specification.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcpy

from .commands import COMMANDS, MAX_MSG_NUMBER, TOP_ALL, Args


cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX

# parse_command's first item: a command id (> 0), or one of these
UNKNOWN = 0  # not a command we know, or a NUL in the line
BAD_ARGS = -1  # a known command with wrong arguments; arg1 is the command id
TOO_LONG = None  # what LineReader.feed() yields for an over-long line

cdef enum ArgKind:
    ARGS_NONE
    ARGS_WORD
    ARGS_REST
    ARGS_WORD_WORD
    ARGS_WORD_OPT_WORD
    ARGS_NUM
    ARGS_OPT_NUM
    ARGS_NUM_COUNT

cdef enum:
    MAX_COMMANDS = 32

KINDS = {Args.NONE: ARGS_NONE, Args.WORD: ARGS_WORD, Args.REST: ARGS_REST, Args.WORD_WORD: ARGS_WORD_WORD,
         Args.WORD_OPT_WORD: ARGS_WORD_OPT_WORD, Args.NUM: ARGS_NUM, Args.OPT_NUM: ARGS_OPT_NUM,
         Args.NUM_COUNT: ARGS_NUM_COUNT}

# The command table in C: verb i (id i + 1) is verb_keys[i], its letters
# packed big-endian into an int, and takes arguments of shape kinds[i].
cdef unsigned int verb_keys[MAX_COMMANDS]
cdef ArgKind kinds[MAX_COMMANDS]
cdef int command_count = 0


def _load_table():
    global command_count
    assert len(COMMANDS) <= MAX_COMMANDS
    for i, command in enumerate(COMMANDS):
        assert 3 <= len(command.verb) <= 4 and command.verb.isalpha() and command.verb.isupper()
        verb_keys[i] = int.from_bytes(command.verb.encode(), "big")
        kinds[i] = KINDS[command.args]
    command_count = len(COMMANDS)


_load_table()
NAMES = {command.id: command.verb for command in COMMANDS}
globals().update({command.verb: command.id for command in COMMANDS})  # USER, PASS, ...
cdef long long max_msg_number = MAX_MSG_NUMBER
cdef long long top_all = TOP_ALL


cdef int verb_id(const char *p, Py_ssize_t n) noexcept:
    """The command id of a verb, case-insensitively; 0 if none."""
    cdef unsigned int key = 0
    cdef Py_ssize_t i
    cdef unsigned char c
    if n < 3 or n > 4:
        return 0
    for i in range(n):
        c = <unsigned char>p[i]
        if c >= c'a' and c <= c'z':
            c -= 32
        elif c < c'A' or c > c'Z':
            return 0
        key = (key << 8) | c
    for i in range(command_count):
        if verb_keys[i] == key:
            return <int>i + 1
    return 0


cdef long long read_number(const char *p, Py_ssize_t n, long long limit, bint saturate) noexcept:
    """Decimal digits only, no sign; -1 if not a number or above `limit`
    (or `limit` itself when `saturate`)."""
    cdef long long value = 0
    cdef Py_ssize_t i
    if n == 0:
        return -1
    for i in range(n):
        if p[i] < c'0' or p[i] > c'9':
            return -1
        value = value * 10 + (p[i] - c'0')
        if value > limit:
            if not saturate:
                return -1
            value = limit
    return value


cdef Py_ssize_t skip_spaces(const char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    while i < n and p[i] == c' ':
        i += 1
    return i


cdef Py_ssize_t word_end(const char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    while i < n and p[i] != c' ':
        i += 1
    return i


def parse_command(bytes line):
    """(command id, arg1, arg2) for one line without its line end.

    Numbers come back as ints (LIST/UIDL without an argument: None), names
    and passwords as bytes. Arguments are separated by spaces; extra spaces
    between and after them are tolerated, except in PASS, whose argument is
    the rest of the line verbatim.
    """
    cdef const char *p = PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line)
    cdef Py_ssize_t i, j, k, l, m
    cdef long long a, b
    cdef int cmd
    cdef ArgKind kind
    if memchr(p, 0, <size_t>n) != NULL:
        return (UNKNOWN, None, None)
    j = word_end(p, 0, n)
    cmd = verb_id(p, j)
    if cmd == 0:
        return (UNKNOWN, None, None)
    kind = kinds[cmd - 1]
    if kind == ARGS_REST:
        # exactly one space after PASS; the password is the rest, spaces and all
        if j + 1 >= n:
            return (BAD_ARGS, cmd, None)
        return (cmd, line[j + 1:], None)
    # tokens: [i, k) first argument, [l, m) second; nothing after them
    i = skip_spaces(p, j, n)
    k = word_end(p, i, n)
    l = skip_spaces(p, k, n)
    m = word_end(p, l, n)
    if skip_spaces(p, m, n) != n:
        return (BAD_ARGS, cmd, None)  # a third argument
    if kind == ARGS_NONE:
        if i == n:
            return (cmd, None, None)
    elif kind == ARGS_WORD:
        if i < n and l == n:
            return (cmd, line[i:k], None)
    elif kind == ARGS_WORD_WORD:
        if l < n:
            return (cmd, line[i:k], line[l:m])
    elif kind == ARGS_WORD_OPT_WORD:
        if l < n:
            return (cmd, line[i:k], line[l:m])
        if i < n:
            return (cmd, line[i:k], None)
    elif kind == ARGS_OPT_NUM:
        if i == n:
            return (cmd, None, None)
        if l == n:
            a = read_number(p + i, k - i, max_msg_number, False)
            if a >= 0:
                return (cmd, a, None)
    elif kind == ARGS_NUM:
        if i < n and l == n:
            a = read_number(p + i, k - i, max_msg_number, False)
            if a >= 0:
                return (cmd, a, None)
    elif kind == ARGS_NUM_COUNT:
        if l < n:
            a = read_number(p + i, k - i, max_msg_number, False)
            b = read_number(p + l, m - l, top_all, True)
            if a >= 0 and b >= 0:
                return (cmd, a, b)
    return (BAD_ARGS, cmd, None)


cdef class LineReader:
    """Split a byte stream into lines of at most `max_line` octets, line end
    included. feed() returns the complete lines so far, without their line
    ends, but at most `max_lines` of them: the rest of the input is held
    unscanned (`backlog`) until more() asks for it, so one read of tiny
    lines costs bounded memory and time. An over-long line comes out once
    as TOO_LONG (None) and the rest of it, up to the next LF, is dropped
    (nginx resyncs the same way)."""

    cdef char *buf
    cdef Py_ssize_t max_line
    cdef Py_ssize_t used  # octets of the unfinished line in buf
    cdef bint skipping  # inside an over-long line: drop input up to the next LF
    cdef bytes rest  # input not scanned yet (max_lines reached)
    cdef Py_ssize_t rest_at

    def __cinit__(self, Py_ssize_t max_line=255):
        if max_line < 3:
            raise ValueError("max_line must allow at least a 1-octet line")
        self.buf = <char *>malloc(max_line)
        if self.buf == NULL:
            raise MemoryError()
        self.max_line = max_line
        self.used = 0
        self.skipping = False
        self.rest = None
        self.rest_at = 0

    def __dealloc__(self):
        free(self.buf)

    @property
    def pending(self):
        """Octets held of an unfinished line."""
        return self.used

    @property
    def backlog(self):
        """Octets received and not scanned yet."""
        return 0 if self.rest is None else PyBytes_GET_SIZE(self.rest) - self.rest_at

    def feed(self, bytes data, Py_ssize_t max_lines=PY_SSIZE_T_MAX):
        if self.rest is not None:
            data = self.rest[self.rest_at:] + data
            self.rest = None
        return self.scan(data, 0, max_lines)

    def more(self, Py_ssize_t max_lines=PY_SSIZE_T_MAX):
        """The next lines of the backlog, at most `max_lines`."""
        if self.rest is None:
            return []
        data, self.rest = self.rest, None
        return self.scan(data, self.rest_at, max_lines)

    cdef list scan(self, bytes data, Py_ssize_t start, Py_ssize_t max_lines):
        cdef list out = []
        cdef const char *base = PyBytes_AS_STRING(data)
        cdef const char *p = base + start
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data) - start
        cdef const char *lf
        cdef Py_ssize_t k
        while n > 0:
            if PyList_GET_SIZE(out) >= max_lines:
                self.rest = data
                self.rest_at = p - base
                break
            lf = <const char *>memchr(p, c'\n', <size_t>n)
            k = (lf - p) + 1 if lf != NULL else n
            if self.skipping:
                self.skipping = lf == NULL
            elif self.used + k > self.max_line:
                out.append(TOO_LONG)
                self.used = 0
                self.skipping = lf == NULL
            elif lf != NULL and self.used == 0:
                out.append(strip_eol(p, k))  # the common case: no copy into buf
            else:
                memcpy(self.buf + self.used, p, <size_t>k)
                self.used += k
                if lf != NULL:
                    out.append(strip_eol(self.buf, self.used))
                    self.used = 0
            p += k
            n -= k
        return out


cdef inline bytes strip_eol(const char *s, Py_ssize_t n):
    # s[n-1] is the LF; CRLF and a bare LF both end a line
    n -= 1
    if n > 0 and s[n - 1] == c'\r':
        n -= 1
    return PyBytes_FromStringAndSize(s, n)
