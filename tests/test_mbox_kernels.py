"""The Cython mbox kernels (mpop3/mbox/_kernels.pyx) against the plain-Python
reference (mpop3/mbox/kernels_reference.py): same messages, sizes, ids and RETR/TOP
bytes, on hand-made and hundreds of generated spools, cut at any point."""

import itertools
import os
import poplib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mbox_helpers import PIECES, random_spool, seeded, spool_of

from mpop3.mbox import _kernels
from mpop3.mbox import kernels_reference as ref

# (spool, [(size, RETR bytes)]) -- what a client sees, written out by hand.
HAND_MADE = [
    (b"", []),
    (b"From a\nS: 1\n\nbody\n\n", [(14, b"S: 1\r\n\r\nbody\r\n.\r\n")]),
    # CRLF spool; the separator is dropped, lines starting "." are stuffed
    (b"From a\r\nS: 1\r\n\r\n.\r\n..\r\n\r\n", [(15, b"S: 1\r\n\r\n..\r\n...\r\n.\r\n")]),
    # no final newline: the last line is ended properly
    (b"From a\nS: 1\n\nlast", [(14, b"S: 1\r\n\r\nlast\r\n.\r\n")]),
    # "From " in a body line not after an empty line is data; >From stays
    (b"From a\nS\n\nx\nFrom b\n>From c\n", [(25, b"S\r\n\r\nx\r\nFrom b\r\n>From c\r\n.\r\n")]),
    # a lone CR and NULs are data
    (b"From a\nS\n\na\rb\0\n", [(11, b"S\r\n\r\na\rb\0\r\n.\r\n")]),
    # two messages, the second with an empty body
    (b"From a\nS: 1\n\nx\n\nFrom b\nS: 2\n\n", [(11, b"S: 1\r\n\r\nx\r\n.\r\n"), (6, b"S: 2\r\n.\r\n")]),
    # a spool not starting with "From ": the leading bytes are a message
    (b"junk\n\nFrom a\nS\n\n", [(6, b"junk\r\n.\r\n"), (3, b"S\r\n.\r\n")]),
    # ends inside a From line
    (b"From a", [(0, b".\r\n")]),
    # a 100 KB line
    (b"From a\nS\n\n" + b"x" * 100_000 + b"\n", [(100_007, b"S\r\n\r\n" + b"x" * 100_000 + b"\r\n.\r\n")]),
]


def index_of(data, cuts=None):
    scanner = _kernels.Scanner()
    pos = 0
    for cut in cuts or [len(data)]:
        scanner.feed(data[pos : pos + cut])
        pos += cut
    scanner.feed(data[pos:])
    return scanner.finish()


def view_of(index):
    return [
        (index.start(i), index.data(i), index.end(i), index.record_end(i), index.size(i), index.uid(i))
        for i in range(len(index))
    ]


def reference_rows(data):
    return [(m.start, m.data, m.end, m.record_end, m.size, m.uid) for m in ref.parse(data)]


def retr(data, index, i, body_lines=None, piece=65536):
    content = data[index.data(i) : index.end(i)]
    writer = _kernels.DotWriter(body_lines)
    out = b"".join(writer.feed(content[k : k + piece]) for k in range(0, len(content), piece))
    return out + writer.finish()


@pytest.mark.parametrize("data, expected", HAND_MADE)
def test_hand_made_spools_give_what_a_client_expects(data, expected):
    index = index_of(data)
    assert [(index.size(i), retr(data, index, i)) for i in range(len(index))] == expected
    assert view_of(index) == reference_rows(data)


def test_hundreds_of_random_spools_agree_with_the_reference_at_random_cuts():
    rng = seeded(3)
    for _ in range(600):
        data = random_spool(rng)
        cuts = [rng.randint(1, 9) for _ in range(len(data))]
        index = index_of(data, cuts)
        assert view_of(index) == reference_rows(data), data
        for i, m in enumerate(ref.parse(data)):
            content = data[m.data : m.end]
            for body_lines in (None, 0, 1, 2):
                expected = ref.render(content, body_lines)
                assert retr(data, index, i, body_lines, piece=rng.randint(1, 7)) == expected, (data, i)


def test_every_split_point_of_a_tricky_spool():
    data = b"From a\r\nS: x\r\n\r\n.\r\nFrom b\r\n\r\nFrom c\n..\n\nFrom d\r\n\rq\0\n\n"
    expected = reference_rows(data)
    for i, j in itertools.combinations_with_replacement(range(len(data) + 1), 2):
        scanner = _kernels.Scanner()
        for piece in (data[:i], data[i:j], data[j:]):
            scanner.feed(piece)
        assert view_of(scanner.finish()) == expected, (i, j)


def test_every_retr_sends_exactly_the_octets_list_announced():
    rng = seeded(5)
    for _ in range(300):
        data = random_spool(rng, 60)
        index = index_of(data)
        for i in range(len(index)):
            wire = retr(data, index, i)
            lines = wire[:-3].split(b"\r\n")[:-1]  # undo the terminator, then stuffing
            unstuffed = sum(len(line[1:] if line.startswith(b".") else line) + 2 for line in lines)
            assert unstuffed == index.size(i), (data, i)


def test_poplib_reads_back_each_message_line_for_line(tmp_path):
    # poplib undoes the stuffing: the lines it returns are the content's lines
    data = b"From a\nS: 1\n\n.hidden\n..two\nplain\r\nlast"
    index = index_of(data)
    wire = retr(data, index, 0)
    client = poplib.POP3.__new__(poplib.POP3)
    client.file = _Lines(wire)
    client._debugging = 0
    lines = []
    line, _ = client._getline()
    while line != b".":
        lines.append(line[1:] if line.startswith(b"..") else line)
        line, _ = client._getline()
    assert lines == [b"S: 1", b"", b".hidden", b"..two", b"plain", b"last"]


class _Lines:
    def __init__(self, data):
        self.lines = data.splitlines(keepends=True)

    def readline(self, limit=-1):
        return self.lines.pop(0) if self.lines else b""


def test_top_gives_the_header_the_empty_line_and_k_body_lines():
    data = b"From a\nA: 1\nB: 2\n\nb1\nb2\nb3\n\n"
    index = index_of(data)
    assert retr(data, index, 0, 0) == b"A: 1\r\nB: 2\r\n\r\n.\r\n"
    assert retr(data, index, 0, 2) == b"A: 1\r\nB: 2\r\n\r\nb1\r\nb2\r\n.\r\n"
    assert retr(data, index, 0, 99) == retr(data, index, 0)


def test_unique_ids_are_printable_short_unique_and_independent_of_position():
    duplicate = b"From a Mon\nSubject: same\n\nsame body\n\n"
    data = spool_of(50) + duplicate + spool_of(50, 50) + duplicate + duplicate
    index = index_of(data)
    uids = list(index.uids)
    assert len(set(uids)) == len(uids) == 103
    assert all(1 <= len(u) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in u) for u in uids)
    # delete the first 30 messages: the other ids stay
    kept = b"".join(data[index.start(i) : index.record_end(i)] for i in range(30, 103))
    assert list(index_of(kept).uids) == uids[30:]
    # delete one of three byte-identical copies: nothing tells the copies
    # apart, so the later ones are renumbered; every other id stays
    kept = b"".join(data[index.start(i) : index.record_end(i)] for i in range(103) if i != 50)
    after = list(index_of(kept).uids)
    assert after[:100] == uids[:50] + uids[51:101]
    assert after[100:] == [uids[50], uids[50] + "-1"]


def test_the_last_message_keeps_its_size_and_id_when_mail_is_appended():
    first = b"From a\nS: 1\n\nbody\n\n"
    alone = index_of(first)
    followed = index_of(first + b"From b\nS: 2\n\nnew\n\n")
    assert (alone.size(0), alone.uid(0)) == (followed.size(0), followed.uid(0))


def test_scan_fd_reads_exactly_the_given_length(tmp_path):
    path = tmp_path / "spool"
    data = spool_of(2000, body_lines=40)
    path.write_bytes(data + b"From late\n\nappended after the scan\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        index = _kernels.scan_fd(fd, len(data))
        assert view_of(index) == reference_rows(data)
        assert index.length == len(data)
        chunks = list(_kernels.dump(fd, index.data(7), index.end(7)))
        assert b"".join(chunks) == ref.render(data[index.data(7) : index.end(7)])
    finally:
        os.close(fd)


def test_dump_reads_a_large_message_in_bounded_chunks(tmp_path):
    path = tmp_path / "spool"
    body = b"".join(b"%07d some text of a long message body\n" % k for k in range(60_000))
    path.write_bytes(b"From a\nS: big\n\n" + body + b"\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        index = _kernels.scan_fd(fd, os.fstat(fd).st_size)
        chunks = list(_kernels.dump(fd, index.data(0), index.end(0)))
        assert max(len(c) for c in chunks) <= 2 * 65536
        assert len(chunks) > 30
        assert b"".join(chunks) == b"S: big\r\n\r\n" + body.replace(b"\n", b"\r\n") + b".\r\n"
    finally:
        os.close(fd)


def test_index_costs_under_64_bytes_a_message():
    index = index_of(spool_of(10_000, body_lines=1))
    assert len(index) == 10_000
    assert index.nbytes / len(index) <= 64


def test_hundreds_of_mail_shaped_spools_agree_with_the_reference():
    from mbox_helpers import random_mailbox

    rng = seeded(11)
    for n in range(300):
        data = random_mailbox(rng)
        index = index_of(data, [rng.randint(1, 70_000) for _ in range(len(data) // 1000 + 1)])
        assert view_of(index) == reference_rows(data), n
        uids = list(index.uids)
        assert len(set(uids)) == len(uids)
        for i, m in enumerate(ref.parse(data)):
            content = data[m.data : m.end]
            wire = retr(data, index, i, piece=rng.choice([1000, 65536]))
            assert wire == ref.render(content)
            lines = rng.randint(0, 4)
            assert retr(data, index, i, body_lines=lines) == ref.render(content, lines)
            unstuffed = sum(
                len(line[1:] if line.startswith(b".") else line) + 2 for line in wire[:-3].split(b"\r\n")[:-1]
            )
            assert unstuffed == index.size(i)


def test_a_scan_in_a_worker_thread_lets_other_threads_run(tmp_path):
    # the kernels run without the GIL: a scan in a worker thread must not
    # stall the event loop's thread for its whole duration
    import threading
    import time

    path = tmp_path / "spool"
    path.write_bytes(spool_of(3000, body_lines=300) * 10)  # ~220 MB: a scan takes tens of ms
    fd = os.open(path, os.O_RDONLY)
    one_scan = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        _kernels.scan_fd(fd, os.fstat(fd).st_size)
        one_scan = min(one_scan, time.perf_counter() - started)
    done = threading.Event()

    def work():
        for _ in range(3):
            _kernels.scan_fd(fd, os.fstat(fd).st_size)
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    longest, last = 0.0, time.perf_counter()
    while not done.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    worker.join()
    os.close(fd)
    assert longest < one_scan / 2, (longest, one_scan)


PIECE_LISTS = st.lists(st.sampled_from(PIECES), max_size=30)


@settings(max_examples=300, deadline=None)
@given(PIECE_LISTS, st.integers(1, 40), st.integers(0, 3))
def test_any_spool_of_awkward_pieces_matches_the_reference(pieces, cut, lines):
    data = b"".join(pieces)
    index = index_of(data, [cut] * (len(data) // cut))
    assert view_of(index) == reference_rows(data)
    for i, m in enumerate(ref.parse(data)):
        assert retr(data, index, i, lines, piece=cut) == ref.render(data[m.data : m.end], lines)
