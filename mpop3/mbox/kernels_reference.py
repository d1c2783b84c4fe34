"""The mbox rules in plain Python: the readable spec of _kernels.pyx.

Slow and whole-file at a time on purpose; the tests check the Cython
kernels against it byte for byte. The rules are listed at the top of
_kernels.pyx and in docs/mbox.md.
"""

from dataclasses import dataclass

MASK = (1 << 64) - 1
SEED = 0x6D706F7033


@dataclass
class Message:
    start: int  # the From line (0 for leading junk without one)
    data: int  # the content
    end: int  # end of the content
    record_end: int  # the next message's start, or the end of the spool
    size: int
    hash: int
    uid: str = ""


def split_lines(data):
    out, pos = [], 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        stop = len(data) if nl < 0 else nl + 1
        out.append((pos, data[pos:stop]))
        pos = stop
    return out


def is_empty(line):
    return line in (b"\n", b"\r\n")


def wire_len(line):
    """Octets of one content line as RETR sends it, before stuffing."""
    if line.endswith(b"\r\n"):
        return len(line)
    if line.endswith(b"\n"):
        return len(line) + 1
    return len(line) + 2  # the last line, without a line end


def parse(data):
    lines = split_lines(data)
    starts = []  # (line index, has From line)
    for k, (_, line) in enumerate(lines):
        if line.startswith(b"From ") and (k == 0 or is_empty(lines[k - 1][1])):
            starts.append((k, True))
    if lines and (not starts or starts[0][0] != 0):
        starts.insert(0, (0, False))
    messages = []
    for n, (k, has_from) in enumerate(starts):
        stop = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        record = lines[k:stop]
        start = record[0][0]
        record_end = lines[stop][0] if stop < len(lines) else len(data)
        body = record[1:] if has_from else record
        if has_from and not record[0][1].endswith(b"\n"):
            body = []  # the spool ends inside the From line
        data_off = body[0][0] if body else record_end
        if body and is_empty(body[-1][1]):
            body = body[:-1]  # the separator
        end = body[-1][0] + len(body[-1][1]) if body else data_off
        size = sum(wire_len(line) for _, line in body)
        hashed = b""
        for _, line in record:  # From line and header, through the first empty line
            hashed += line
            if is_empty(line):
                break
        messages.append(Message(start, data_off, end, record_end, size, message_hash(hashed, size)))
    number_duplicates(messages)
    return messages


def number_duplicates(messages):
    seen = {}
    for m in messages:
        dup = seen.get(m.hash, 0)
        seen[m.hash] = dup + 1
        m.uid = f"{m.hash:016x}-{dup}" if dup else f"{m.hash:016x}"


def rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & MASK


def mix(h, w):
    w = (w * 0x87C37B91114253D5) & MASK
    w = rotl(w, 31)
    w = (w * 0x4CF5AD432745937F) & MASK
    h ^= w
    return (rotl(h, 27) * 5 + 0x52DCE729) & MASK


def fmix(k):
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & MASK
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & MASK
    return k ^ (k >> 33)


def message_hash(hashed, size):
    h = SEED
    full = len(hashed) // 8 * 8
    for pos in range(0, full, 8):
        h = mix(h, int.from_bytes(hashed[pos : pos + 8], "little"))
    if full < len(hashed):
        h = mix(h, int.from_bytes(hashed[full:], "little"))
    h ^= len(hashed)
    return fmix(mix(h, size))


def render(content, body_lines=None):
    """RETR (body_lines None) or TOP n body_lines of one message's content."""
    out = []
    in_header = True
    left = body_lines
    for _, line in split_lines(content):
        if left == 0 and not in_header:
            break
        text = line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line
        if text.startswith(b"."):
            text = b"." + text
        out.append(text + b"\r\n")
        if in_header:
            in_header = not is_empty(line)
        elif left is not None:
            left -= 1
    out.append(b".\r\n")
    return b"".join(out)


def content(data, message):
    return data[message.data : message.end]
