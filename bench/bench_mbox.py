"""storage_mbox speed and memory, as issue 3 asks, each against a baseline
timed in the same run: opening a page-cached 1 GB spool of 100,000 messages
vs bytes.count(b"\\n"); the RETR transform vs bytes.replace; a commit that
deletes the first message vs cp; RSS during a 500 MB RETR; index bytes per
message. Spools are generated once into $MPOP3_BENCH_DIR (/tmp/mpop3-bench)."""

import glob
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
import tracemalloc

import pytest

from mpop3.loader import import_module_file
from mpop3.mbox import _kernels

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("MPOP3_BENCH_DIR", "/tmp/mpop3-bench")
MODULE = glob.glob(os.path.join(TREE, "modules", "storage_mbox.*.so"))[0]
MESSAGES = 100_000
WORDS = (
    b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    b"incididunt ut labore et dolore magna aliqua From"
).split()


def text_lines(seed=1, count=5000):
    rng = random.Random(seed)
    lines = [b" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + b"\n" for _ in range(count)]
    return [b">" + line if line.startswith(b"From") else line for line in lines]


def cached(name, write):
    """CACHE/name, made by write(path) the first time."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, name)
    if not os.path.exists(path):
        write(path + ".tmp")
        os.rename(path + ".tmp", path)
    return path


def write_1g(path):
    lines = text_lines()
    with open(path, "wb") as f:
        for n in range(MESSAGES):
            head = (
                b"From sender%d@example.org Thu Nov 19 10:%02d:%02d 2026\n"
                b"Received: from mx.example.org by mail.example.net; Thu, 19 Nov 2026 10:00:00 +0000\n"
                b"From: Sender <sender%d@example.org>\nTo: bob@example.net\nSubject: message %d\n"
                b"Message-ID: <%d@example.org>\nDate: Thu, 19 Nov 2026 10:00:00 +0000\n\n"
                % (n % 97, n % 60, n % 60, n % 97, n, n)
            )
            body, size, k = [], len(head), n * 7
            while size < 10_300:
                line = lines[k % len(lines)]
                body.append(line)
                size += len(line)
                k += 13
            f.write(head + b"".join(body) + b"\n")


def write_500m_message(path):
    block = b"".join(text_lines(2))
    with open(path, "wb") as f:
        f.write(b"From big@example.org Thu Nov 19 10:00:00 2026\nSubject: a 500 MB message\n\n")
        for _ in range(500 * 2**20 // len(block) + 1):
            f.write(block)
        f.write(b"\n")


@pytest.fixture(scope="module")
def spool_1g():
    return cached("spool-1g", write_1g)


@pytest.fixture(scope="module")
def storage():
    module = import_module_file(MODULE, "bench")
    module.module_init({"storage_dir": CACHE})
    return module


def best_of(rounds, fn, *args):
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return min(times)


def test_open_1g_spool_vs_bytes_count(benchmark, storage, spool_1g, report):
    with open(spool_1g, "rb") as f:
        data = f.read()  # also puts the spool in the page cache
    count_s = best_of(3, data.count, b"\n")
    size = len(data)
    del data  # a GB we no longer need while the spool is opened

    def open_session():
        box = storage.storage_lock_mailbox("spool-1g")
        sizes, uids = list(storage.storage_message_sizes(box)), list(storage.storage_unique_ids(box))
        storage.storage_unlock_mailbox(box)
        return len(sizes), len(uids)

    assert benchmark.pedantic(open_session, rounds=3, iterations=1) == (MESSAGES, MESSAGES)
    open_s = benchmark.stats.stats.min
    report(
        "open 1 GB spool (scan, sizes, uids)",
        f"{open_s:.3f} s ({size / open_s / 1e9:.2f} GB/s); bytes.count {count_s:.3f} s; "
        f"speed ratio {count_s / open_s:.2f}x (goal >= 1.0)",
    )


def test_index_bytes_per_message(storage, spool_1g, report):
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    box = storage.storage_lock_mailbox("spool-1g")
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    count = storage.storage_message_count(box)
    nbytes = box.index.nbytes
    storage.storage_unlock_mailbox(box)
    report(
        "index memory",
        f"{nbytes / count:.1f} bytes/message in the C index; "
        f"{held / count:.1f} bytes/message for the whole open session (goal <= 64)",
    )


def test_retr_transform_vs_bytes_replace(benchmark, report):
    content = b"Subject: x\n\n" + b"".join(text_lines(3)) * 40  # ~12 MB of mail lines
    replace_s = best_of(10, lambda: content.replace(b"\n", b"\r\n"))
    pieces = [content[k : k + 65536] for k in range(0, len(content), 65536)]

    def transform():
        writer = _kernels.DotWriter()
        for piece in pieces:  # as RETR does it: 64 KiB reads
            writer.feed(piece)
        return writer.finish()

    benchmark.pedantic(transform, rounds=10, iterations=1)
    ours = benchmark.stats.stats.min
    report(
        "RETR transform (64 KiB chunks)",
        f"{len(content) / ours / 1e9:.2f} GB/s; replace {len(content) / replace_s / 1e9:.2f} GB/s; "
        f"speed ratio {replace_s / ours:.2f}x (goal >= 1.5)",
    )


def test_commit_deleting_the_first_message_vs_cp(benchmark, storage, spool_1g, report):
    work = os.path.join(CACHE, "commit")
    os.makedirs(work, exist_ok=True)
    target = os.path.join(work, "bob")
    cp_times, sync_times = [], []
    box = {}

    def setup():
        # cp's dirty pages are written back before the commit starts, so the
        # commit's fsyncs do not pay for them; cp + that sync is reported too
        os.sync()
        started = time.perf_counter()
        subprocess.run(["cp", spool_1g, target], check=True)
        cp_times.append(time.perf_counter() - started)
        os.sync()
        sync_times.append(time.perf_counter() - started)
        storage.module_init({"storage_dir": work})
        box["h"] = storage.storage_lock_mailbox("bob")

    def commit():
        storage.storage_synch(box["h"], {0})
        storage.storage_unlock_mailbox(box["h"])

    try:
        benchmark.pedantic(commit, setup=setup, rounds=3, iterations=1)
    finally:
        storage.module_init({"storage_dir": CACHE})
    ours, cp_s, cp_sync_s = benchmark.stats.stats.min, min(cp_times), min(sync_times)
    report(
        "commit of 1 GB deleting message 1",
        f"{ours:.2f} s (in place, a journaled window at a time); cp {cp_s:.2f} s, time ratio "
        f"{ours / cp_s:.2f}x (goal <= 2.5); cp + sync {cp_sync_s:.2f} s, ratio {ours / cp_sync_s:.2f}x",
    )
    shutil.rmtree(work)


RETR_RSS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tree!r})
    from mpop3.loader import import_module_file
    mod = import_module_file({module!r}, "bench")
    mod.module_init({{"storage_dir": {cache!r}}})
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    box = mod.storage_lock_mailbox("message-500m")
    base = status("VmRSS:")
    sent = sum(len(chunk) for chunk in mod.storage_dump_fragment(box, 0, None))
    print(sent, status("VmHWM:") - base)
""")


def test_rss_during_a_500_mb_retr(report):
    cached("message-500m", write_500m_message)
    script = RETR_RSS.format(tree=TREE, module=MODULE, cache=CACHE)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    took = time.perf_counter() - started
    sent, growth = map(int, out.split())
    assert sent > 500 * 10**6
    report(
        "RETR of a 500 MB message",
        f"peak RSS growth {growth / 2**20:.1f} MB (goal < 32 MB); {sent / 1e6:.0f} MB sent in {took:.1f} s",
    )
