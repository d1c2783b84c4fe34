"""What a process per session costs before it does any work: fork and exit
of a prepared listener (mpop3, uvloop and ssl imported, an event loop made
once, gc frozen) against the same for a bare interpreter, and the price of
one page the child writes and so copies. With the CPU of a login session in
a shared process (bench/test_load.py), these give the floor under the
per-session login rate on this machine. Each measurement runs in a
subprocess of its own, so that what one imports does not weigh on another."""

import json
import subprocess
import sys

PROBE = r"""
import gc, json, os, resource, sys, time
if sys.argv[1] == "prepared":
    import asyncio, ssl, uvloop
    import mpop3.server.models
    mpop3.server.service.new_loop().close()
gc.collect()
gc.freeze()
scratch = bytearray(8 << 20)
for i in range(0, len(scratch), 4096):  # resident in the parent, as a heap is
    scratch[i] = 1

def cpu():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

def per_fork(child, n=300):
    before = cpu()
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            child()
            os._exit(0)
        os.waitpid(pid, 0)
    return (cpu() - before) / n

def write_pages(count):
    def child():
        for i in range(0, count * 4096, 4096):
            scratch[i] = 2
    return child

idle = per_fork(lambda: None)
pages = per_fork(write_pages(1000))
anon = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("Anonymous:"))
print(json.dumps({"fork_exit_ms": idle * 1e3, "page_us": (pages - idle) / 1000 * 1e6,
                  "anon_mib": (anon - 8 * 1024) / 1024}))
"""


def probe(kind):
    result = subprocess.run([sys.executable, "-c", PROBE, kind], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_fork_floor(report):
    bare, prepared = probe("bare"), probe("prepared")
    report(
        "fork + exit, a child that does nothing",
        f"prepared listener {prepared['fork_exit_ms']:.2f} ms CPU ({prepared['anon_mib']:.0f} MiB anonymous), "
        f"bare interpreter {bare['fork_exit_ms']:.2f} ms ({bare['anon_mib']:.0f} MiB), "
        f"ratio {prepared['fork_exit_ms'] / bare['fork_exit_ms']:.1f}",
    )
    report("a page the child writes (copy on write)", f"{prepared['page_us']:.1f} us")
    assert prepared["fork_exit_ms"] > 0 and prepared["page_us"] > 0
