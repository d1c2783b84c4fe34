"""The progress line of long work (mpop3/progress.py): the reporter on a
fake clock, then real commits of real spools through storage_mbox (and a
replay of one a crash interrupted) and a real first scan of a Maildir
through storage_maildir, with the thresholds made zero so that work of a
fraction of a second logs its lines, and left as they are so that it logs
none."""

import glob
import logging
import os
import re

import pytest
from mbox_helpers import TREE, commit_with_hook, spool_of, storage

from mpop3 import progress
from mpop3.loader import import_module_file
from mpop3.maildir import box as maildir_box
from mpop3.mbox import commit as mbox_commit
from mpop3.progress import BYTES, MESSAGES, MIB, Progress

MAILDIR_MODULE = glob.glob(os.path.join(TREE, "modules", "storage_maildir.*.so"))[0]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Lines:
    """A logger that keeps what it was told at info level."""

    def __init__(self):
        self.lines = []

    def info(self, message, *args):
        self.lines.append(message % args)


def reporter(what="mailbox alice: commit", unit=BYTES, **kw):
    clock, lines = Clock(), Lines()
    return Progress(lines, what, unit, clock=clock, **kw), clock, lines.lines


# ---- the reporter, on a fake clock ------------------------------------------------


def test_work_done_within_the_first_seconds_logs_nothing():
    p, clock, lines = reporter()
    for t in range(50):
        clock.now = 100 + t / 10  # up to 4.9 s
        p(t << 20, 50 << 20)
    p(50 << 20, 50 << 20)
    assert lines == []


def test_long_work_logs_after_five_seconds_then_every_five_and_a_last_line():
    p, clock, lines = reporter()
    total = 1025 * MIB
    for t in range(24):  # one call a second, as windows go by
        clock.now = 100 + t
        p(total * t // 25, total)
    clock.now = 123.4
    p(total, total)
    assert lines == [
        "mailbox alice: commit 205 of 1,025 MiB (20%) after 5.0 s",
        "mailbox alice: commit 410 of 1,025 MiB (40%) after 10 s",
        "mailbox alice: commit 615 of 1,025 MiB (60%) after 15 s",
        "mailbox alice: commit 820 of 1,025 MiB (80%) after 20 s",
        "mailbox alice: commit done, 1,025 MiB in 23 s",
    ]


def test_a_line_waits_for_the_next_call_and_the_interval_counts_from_it():
    p, clock, lines = reporter()
    clock.now = 107  # a slow window: nothing could be said at 5 s
    p(1, 10)
    clock.now = 111  # 4 s after the last line: not yet
    p(2, 10)
    clock.now = 112
    p(3, 10)
    assert [re.search(r"after (\S+)", x).group(1) for x in lines] == ["7.0", "12"]


def test_messages_and_small_amounts_are_written_to_be_read():
    p, clock, lines = reporter("mailbox alice: first scan", MESSAGES)
    clock.now = 105
    p(40_000, 100_000)
    p(100_000, 100_000)
    assert lines == [
        "mailbox alice: first scan 40,000 of 100,000 messages (40%) after 5.0 s",
        "mailbox alice: first scan done, 100,000 messages in 5.0 s",
    ]
    assert progress._amount(MIB * 99_999 // 1000, 100 * MIB, BYTES, down=True) == ("99", "MiB")  # never the total early
    assert progress._amount(int(3.46 * MIB), int(3.5 * MIB), BYTES, down=True) == ("3.4", "MiB")
    assert progress._amount(int(3.5 * MIB), int(3.5 * MIB), BYTES) == ("3.5", "MiB")
    assert progress._amount(12 << 10, 200 << 10, BYTES) == ("12", "KiB")


def test_the_last_line_is_said_once_and_only_after_a_progress_line():
    p, clock, lines = reporter()
    clock.now = 106
    p(10, 10)  # done past the threshold, but nothing said on the way: nothing to close
    assert lines == []
    p, clock, lines = reporter()
    clock.now = 106
    p(5, 10)
    p(10, 10)
    p(10, 10)
    assert len(lines) == 2 and lines[1].startswith("mailbox alice: commit done,")


def test_the_thresholds_are_the_module_constants_when_the_work_starts(monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_AFTER", 1.0)
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 2.0)
    p, clock, lines = reporter()
    for t in (0.5, 1, 2, 3, 4):
        clock.now = 100 + t
        p(int(t), 10)
    assert [re.search(r"after (\S+)", x).group(1) for x in lines] == ["1.0", "3.0"]


# ---- real work -------------------------------------------------------------------------

LINE = re.compile(r"^mailbox (\S+): (.+?) ([\d.,]+) of ([\d.,]+) (MiB|KiB|messages) \((\d+)%\) after ")
DONE = re.compile(r"^mailbox (\S+): (.+?) done, ([\d.,]+) (MiB|KiB|messages) in ")


@pytest.fixture
def logged(caplog, monkeypatch):
    """The progress lines mpop3.storage logs, as (what, done, total, percent)
    and the last line as (what, "done", total); a server's log set-up
    would keep them from caplog."""
    monkeypatch.setattr(logging.getLogger("mpop3"), "propagate", True)
    caplog.set_level(logging.INFO, logger="mpop3.storage")

    def lines():
        out = []
        for r in caplog.records:
            text = r.getMessage()
            if m := LINE.match(text):
                out.append((m.group(2), _number(m.group(3)), _number(m.group(4)), int(m.group(6))))
            elif m := DONE.match(text):
                out.append((m.group(2), "done", _number(m.group(3))))
        return out

    return lines


@pytest.fixture
def eager(monkeypatch):
    """Thresholds of zero: every call of the reporter logs."""
    monkeypatch.setattr(progress, "PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0.0)


def _number(text):
    return float(text.replace(",", ""))


def assert_rising_to_the_total(lines, what, total):
    """Lines of `what` whose counts and percentages rise, then the last
    line with the total."""
    assert len(lines) >= 3, lines
    assert all(x[0] == what for x in lines), lines
    *going, last = lines
    assert last == (what, "done", total)
    counts, percents = [x[1] for x in going], [x[3] for x in going]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), counts
    assert percents == sorted(percents) and percents[-1] < 100
    assert all(x[2] == total for x in going)


@pytest.fixture
def spool_dir(tmp_path):
    d = tmp_path / "spool"
    d.mkdir()
    return d


SPOOL = spool_of(700, body_lines=300)  # 4 MiB or so


def test_a_commit_logs_its_bytes_window_by_window(spool_dir, monkeypatch, logged, eager):
    monkeypatch.setattr(mbox_commit, "WINDOW_MAX", 256 << 10)
    (spool_dir / "bob").write_bytes(SPOOL)
    first = len(spool_of(1, body_lines=300))
    mod = storage(spool_dir)
    box = mod.storage_lock_mailbox("bob")
    mod.storage_synch(box, {0})
    mod.storage_unlock_mailbox(box)
    assert (spool_dir / "bob").read_bytes() == SPOOL[first:]
    moved = len(SPOOL) - first
    lines = logged()
    assert_rising_to_the_total(lines, "commit", round(moved / MIB, 1))
    assert len(lines) == -(-moved // (256 << 10))  # a line per window but the last, then the end


def test_a_fast_commit_logs_no_progress(spool_dir, caplog, logged):
    (spool_dir / "bob").write_bytes(SPOOL)
    mod = storage(spool_dir)
    box = mod.storage_lock_mailbox("bob")
    mod.storage_synch(box, {0, 5})
    mod.storage_unlock_mailbox(box)
    assert logged() == []
    assert "bob: 2 message(s) deleted" in caplog.text  # the logger was heard


def test_a_replay_logs_its_progress_from_where_the_crash_left_it(spool_dir, monkeypatch, logged, eager):
    monkeypatch.setattr(mbox_commit, "WINDOW_MAX", 256 << 10)
    (spool_dir / "bob").write_bytes(SPOOL)
    first = len(spool_of(1, body_lines=300))
    mod = storage(spool_dir)
    windows = []

    class Crash(Exception):
        pass

    def hook(step):
        if step == "window":
            windows.append(step)
            if len(windows) == 5:
                raise Crash

    commit_with_hook(mod, "bob", {0}, hook, raises=Crash)
    crashed = len(logged())
    assert crashed == 5
    box = mod.storage_lock_mailbox("bob")  # the replay
    mod.storage_unlock_mailbox(box)
    assert (spool_dir / "bob").read_bytes() == SPOOL[first:]
    replayed = logged()[crashed:]
    moved = len(SPOOL) - first
    assert_rising_to_the_total(replayed, "replaying an interrupted commit", round(moved / MIB, 1))
    assert replayed[0][1] > 1.0  # on from the fifth window, not from the start


def maildir_module(tmp_path, count):
    """storage_maildir over tmp_path/bob/Maildir, with `count` messages in
    new/ whose names carry no size (each one is read at a first scan)."""
    md = tmp_path / "bob" / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    for i in range(count):
        (md / "new" / f"{1700000000 + i}.M{i}P1.test").write_bytes(b"Subject: %d\n\nbody\n" % i)
    mod = import_module_file(MAILDIR_MODULE, "t")
    mod.module_init({"mail_location": f"{tmp_path}/%u/Maildir", "mailbox_user": "any"})
    return mod, md


def test_a_first_maildir_scan_logs_messages_batch_by_batch(tmp_path, logged, eager):
    mod, md = maildir_module(tmp_path, 3000)
    box = mod.storage_lock_mailbox("bob")
    assert mod.storage_message_count(box) == 3000
    mod.storage_unlock_mailbox(box)
    lines = logged()
    assert_rising_to_the_total(lines, "first scan", 3000)
    assert len(lines) == -(-3000 // maildir_box.PROGRESS_BATCH) + 1
    assert (md / maildir_box.CACHE_NAME).exists()


def test_a_fast_first_maildir_scan_logs_no_progress(tmp_path, logged):
    mod, _ = maildir_module(tmp_path, 3000)
    box = mod.storage_lock_mailbox("bob")
    assert mod.storage_message_count(box) == 3000
    mod.storage_unlock_mailbox(box)
    assert logged() == []
