"""Load benchmarks (`make bench`): mpop3 against a canned uvloop responder
measured in the same run, driven by bench/loadgen (C, one thread).

- logins: connect, USER, PASS, STAT, QUIT at 1, 8 and 32 concurrent
  clients, a distinct user (and mailbox) per client;
- RETR: 1 and 4 clients (separate users), each fetching a 30 MB mailbox of
  mixed message sizes again and again, every message checked against LIST;
- memory: PSS of the server process per idle logged-in session, at 1,000;
- TLS: logins at 32 clients and RETR at 1 and 4 clients over implicit TLS
  (a full handshake per session, ECDSA P-256 certificate), as ratios to
  the same figures in cleartext, measured on the same server in the same run.

Results are printed as a table with ratios to the canned responder (and
appended to bench/results.txt). The load generator's own CPU share is
reported so one can see it is not the bottleneck.
"""

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import dovecot
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from pop_server import make_certificate, served_as_safe_user  # noqa: E402
from process_limits import cpu_seconds  # noqa: E402,F401  (bench_auth takes it from here too)
from system_users import system_user  # noqa: E402  (the spools, as the tests give them to safe_user)

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
LOADGEN = os.path.join(HERE, "loadgen")
SECONDS = float(os.environ.get("BENCH_SECONDS", "2"))
# The spools live in RAM (/dev/shm) when it exists, so that the numbers are
# the server's and not this machine's disk; BENCH_DIR=/some/disk/dir measures
# a disk-backed spool instead.
BENCH_DIR = os.environ.get("BENCH_DIR") or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
IDLE_SESSIONS = 1000
# the multi-process setting measured next to the single process
PROCESSES = int(os.environ.get("BENCH_PROCESSES", "3"))
RETR_MAILBOX_BYTES = 30 * 1000 * 1000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def message(rng, number, size):
    head = (
        b"From: sender%d@example.org\nTo: bench@example.org\nSubject: message %d\n"
        b"Message-ID: <%d.bench@example.org>\n\n" % (number, number, number)
    )
    lines = []
    total = len(head)
    while total < size:
        n = rng.randint(20, 120)
        line = b". dotted line\n" if rng.random() < 0.02 else b"x" * n + b"\n"
        lines.append(line)
        total += len(line)
    return head + b"".join(lines)


def retr_mailbox():
    """About 30 MB of mixed sizes: mostly small, some medium, a few large."""
    rng = random.Random(1939)
    out, number = [], 0
    total = 0
    while total < RETR_MAILBOX_BYTES:
        pick = rng.random()
        size = (
            rng.randint(1000, 8000)
            if pick < 0.80
            else rng.randint(50000, 200000)
            if pick < 0.97
            else rng.randint(1000000, 3000000)
        )
        m = message(rng, number, size)
        out.append(b"From bench@example.org Thu Nov 19 10:00:00 2026\n" + m + b"\n")
        total += len(m)
        number += 1
    return b"".join(out)


def small_mailbox(i):
    rng = random.Random(i)
    return b"".join(
        b"From bench@example.org Thu Nov 19 10:00:00 2026\n" + message(rng, n, 3000) + b"\n" for n in range(3)
    )


def start_mpop3(root, conf_text):
    port = free_port()
    conf = root / f"mpop3-{port}.conf"
    conf.write_text(
        f"listen 127.0.0.1:{port}\nmodule_dir {TREE}/modules\nlog_level warning\n"
        f"max_sessions 5000\nmax_sessions_per_ip 5000\n" + conf_text
    )
    server = subprocess.Popen([sys.executable, "-m", "mpop3", "-c", str(conf)], cwd=TREE, stderr=subprocess.PIPE)
    wait_listening(port)
    return server, port


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    if BENCH_DIR:
        import pathlib
        import tempfile

        root = pathlib.Path(tempfile.mkdtemp(prefix="mpop3-bench-", dir=BENCH_DIR))
    spool = root / "spool"
    spool.mkdir()
    with open(root / "passwd", "w") as f:
        for i in range(IDLE_SESSIONS):
            f.write(f"user{i}:pw\n")
        for i in range(4):
            f.write(f"r{i}:pw\n")
    for i in range(IDLE_SESSIONS):
        (spool / f"user{i}").write_bytes(small_mailbox(i))
    big = retr_mailbox()
    for i in range(4):  # separate copies: a hard link is the same mailbox
        (spool / f"r{i}").write_bytes(big)
    served_as_safe_user(spool)
    tls_port = free_port()
    cert, key = make_certificate(root, "localhost")
    # spools opened by the server's own user (`mailbox_user any`): as root,
    # the whole server becomes safe_user after bind and serves many
    # sessions per process (privilege rule 3)
    shared = f"storage_module storage_mbox\n> storage_dir {spool}\n> mailbox_user any\n"
    server, port = start_mpop3(
        root,
        f"processes 1\nauth_module auth_file\n> passwd_file {root}/passwd\n"
        + shared
        + f"tls_cert {cert}\ntls_key {key}\nlisten_tls 127.0.0.1:{tls_port}\n",
    )
    multi, multi_port = start_mpop3(
        root, f"processes {PROCESSES}\nauth_module auth_file\n> passwd_file {root}/passwd\n" + shared
    )
    # the single process again, serving /metrics (scraped during the run)
    metrics_port = free_port()
    with_metrics, with_metrics_port = start_mpop3(
        root,
        f"processes 1\nauth_module auth_file\n> passwd_file {root}/passwd\n"
        + shared
        + f"metrics_listen 127.0.0.1:{metrics_port}\n",
    )
    # each spool opened by its mailbox's user (the default): as root, a
    # process per session, switching users after login (rule 1)
    per_session, per_session_port = start_mpop3(
        root,
        f"auth_module auth_file\n> passwd_file {root}/passwd\nstorage_module storage_mbox\n> storage_dir {spool}\n"
        "login_user none\n",
    )
    # the same with processes by role (login_user): login processes, an auth
    # process, mail processes (the virtual users here share one: reuse)
    split = {}
    stack = contextlib.ExitStack()
    split_tls_port = free_port()
    if os.geteuid() == 0:
        split_user = stack.enter_context(system_user("mpop3bench-login", system=True))
        split["split"] = start_mpop3(
            root,
            f"auth_module auth_file\n> passwd_file {root}/passwd\nstorage_module storage_mbox\n"
            f"> storage_dir {spool}\nlogin_user {split_user.pw_name}\nprocesses {PROCESSES}\n"
            f"tls_cert {cert}\ntls_key {key}\nlisten_tls 127.0.0.1:{split_tls_port}\n",
        )
        split["split-tls"] = (split["split"][0], split_tls_port)
    # the same server without a storage module (every mailbox empty): what
    # the core costs, apart from the mbox engine
    core_tls_port = free_port()
    core, core_port = start_mpop3(
        root,
        f"processes 1\nauth_module auth_file\n> passwd_file {root}/passwd\n"
        f"tls_cert {cert}\ntls_key {key}\nlisten_tls 127.0.0.1:{core_tls_port}\n",
    )
    canned_port = free_port()
    canned = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "canned.py"), str(canned_port), str(spool / "r0")], stdout=subprocess.PIPE
    )
    assert canned.stdout.readline() == b"ready\n"
    extra = {}
    if dovecot.available():  # the same load against Dovecot, in the same run
        dovecot_port = free_port()
        users = [f"user{i}" for i in range(IDLE_SESSIONS)] + [f"r{i}" for i in range(4)]
        extra["dovecot"] = (dovecot.start(str(root), str(spool), dovecot_port, users), dovecot_port)
        wait_listening(dovecot_port)
        dovecot_port = free_port()
        extra["dovecot-per-session"] = (
            dovecot.start(str(root), str(spool), dovecot_port, users, per_session=True),
            dovecot_port,
        )
        wait_listening(dovecot_port)
    yield {
        **extra,
        **split,
        "mpop3": (server, port),
        "mpop3-tls": (server, tls_port),
        "multi": (multi, multi_port),
        "metrics": (with_metrics, with_metrics_port),
        "metrics_port": metrics_port,
        "per-session": (per_session, per_session_port),
        "core": (core, core_port),
        "core-tls": (core, core_tls_port),
        "canned": (canned, canned_port),
        "results": [],
        "where": str(root),
    }
    procs = [server, multi, with_metrics, per_session, core, canned] + [proc for proc, _ in extra.values()]
    procs += [split["split"][0]] if split else []
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:  # every one is stopped, even if one of them hangs
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stack.close()
    shutil.rmtree(root, ignore_errors=True)


def wait_listening(port):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def minor_faults(pid):
    """Page faults (minor) of a process and of the children it has waited
    for: with a process per session, mostly pages copied on write."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[7]) + int(fields[8])


def pss_kib(pid):
    """PSS of a process and all its descendants (whatever the process model)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(pss_kib(int(child)) for child in f.read().split())
    except (FileNotFoundError, ProcessLookupError):  # a child that just ended
        pass
    return total


def loadgen(mode, port, clients, seconds, userfmt, tls=False):
    result = subprocess.run(
        [LOADGEN, mode, str(port), str(clients), str(seconds), userfmt, "pw", *(["tls"] if tls else [])],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    assert result.returncode == 0, result.stderr
    return dict((k, float(v)) for k, v in (item.split("=") for item in result.stdout.split()))


def measure(site, target, mode, clients, userfmt):
    proc, port = site[target]
    before, faults = cpu_seconds(proc.pid), minor_faults(proc.pid)
    r = loadgen(mode, port, clients, SECONDS, userfmt, tls=target.endswith("-tls"))
    r["server_cpu"] = (cpu_seconds(proc.pid) - before) / r["seconds"]
    r["faults"] = minor_faults(proc.pid) - faults
    r["loadgen_cpu"] = r["cpu"] / r["seconds"]
    assert r["errors"] == 0, (target, mode, r)
    return r


def report(site, capsys, line):
    site["results"].append(line)
    with capsys.disabled():
        print(line)
    with open(os.path.join(HERE, "results.txt"), "a") as f:
        f.write(line + "\n")


@pytest.mark.parametrize("clients", [1, 8, 32])
def test_logins_per_second(site, capsys, clients):
    ours = measure(site, "mpop3", "login", clients, "user%d")
    # other users than the single process's: a session the last run left
    # behind may still be closing there (the load generator just hangs up)
    multi = measure(site, "multi", "login", clients, "user5%02d")
    core = measure(site, "core", "login", clients, "user%d")
    canned = measure(site, "canned", "login", clients, "user%d")
    rate, base = ours["sessions"] / ours["seconds"], canned["sessions"] / canned["seconds"]
    multi_rate = multi["sessions"] / multi["seconds"]
    core_rate = core["sessions"] / core["seconds"]
    if clients == 1:
        report(site, capsys, f"spools in {site['where']}")
    report(
        site,
        capsys,
        f"login {clients:>2} clients: canned {base:6.0f}/s; mpop3 {rate:6.0f} sessions/s "
        f"(ratio {rate / base:.2f}), {PROCESSES} processes {multi_rate:6.0f}/s (ratio {multi_rate / base:.2f}), "
        f"no storage module {core_rate:6.0f}/s (ratio {core_rate / base:.2f}); CPU: server "
        f"{ours['server_cpu']:.2f} / {multi['server_cpu']:.2f} cores, loadgen {ours['loadgen_cpu']:.2f} / "
        f"{multi['loadgen_cpu']:.2f} cores; CPU per login {cpu_per_session(ours):.0f} / "
        f"{cpu_per_session(multi):.0f} us; machine {busy(multi):.0%} busy with {PROCESSES} processes",
    )
    assert ours["sessions"] > 0 and multi["sessions"] > 0 and core["sessions"] > 0
    compare_with_dovecot(site, capsys, "login", clients, "user7%02d", multi_rate, lambda r: r["sessions"], "sessions/s")


def test_metrics_cost(site, capsys):
    """Logins at 32 clients with /metrics served and scraped every second,
    next to the same server without it, alternated three times."""
    import threading
    import urllib.request

    stop = threading.Event()

    def scrape():
        while not stop.wait(1.0):
            with urllib.request.urlopen(f"http://127.0.0.1:{site['metrics_port']}/metrics", timeout=5) as answer:
                answer.read()

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    ratios = []
    try:
        for run in range(3):
            off = measure(site, "mpop3", "login", 32, f"user{run + 1}%02d")
            on = measure(site, "metrics", "login", 32, f"user{run + 4}%02d")
            ratios.append((on["sessions"] / on["seconds"]) / (off["sessions"] / off["seconds"]))
    finally:
        stop.set()
        scraper.join()
    report(
        site,
        capsys,
        "login 32 clients, /metrics served and scraped each second / not served: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + " (target >= 0.95)",
    )


def cpu_per_session(r):
    """Server CPU per session, in microseconds."""
    return 1e6 * r["server_cpu"] / (r["sessions"] / r["seconds"])


def busy(r):
    """The share of this machine's cores the server and the load generator kept busy."""
    return (r["server_cpu"] + r["loadgen_cpu"]) / os.cpu_count()


def compare_with_dovecot(site, capsys, mode, clients, userfmt, ours, amount, unit):
    """The same load against Dovecot, if installed; ours / Dovecot's."""
    if "dovecot" not in site:
        if clients == 1 and mode == "login":
            report(site, capsys, "Dovecot is not installed (Debian: dovecot-pop3d): no comparison")
        return
    theirs = measure(site, "dovecot", mode, clients, userfmt)
    rate = amount(theirs) / theirs["seconds"]
    cost = f", CPU per login {cpu_per_session(theirs):.0f} us" if mode == "login" else ""
    report(site, capsys, f"      vs Dovecot: {rate:7.0f} {unit}{cost}, mpop3 / Dovecot = {ours / rate:.2f}")


@pytest.mark.parametrize("clients", [1, 4])
def test_retr_throughput(site, capsys, clients):
    ours = measure(site, "mpop3", "retr", clients, "r%d")
    canned = measure(site, "canned", "retr", clients, "r%d")
    rate, base = ours["bytes"] / ours["seconds"] / 1e6, canned["bytes"] / canned["seconds"] / 1e6
    report(
        site,
        capsys,
        f"RETR  {clients} client{'s' if clients > 1 else ' '}: mpop3 {rate:7.0f} MB/s, "
        f"canned {base:7.0f} MB/s, ratio {rate / base:.2f}; {ours['messages']:.0f} messages checked; "
        f"CPU: server {ours['server_cpu']:.2f} cores, loadgen {ours['loadgen_cpu']:.2f} cores",
    )
    assert ours["messages"] > 0
    compare_with_dovecot(site, capsys, "retr", clients, "r%d", rate, lambda r: r["bytes"] / 1e6, "MB/s")


def test_tls_cost(site, capsys):
    """TLS against cleartext on the same server, in the same run."""
    clear = measure(site, "mpop3", "login", 32, "user6%02d")
    time.sleep(0.3)  # the hung-up sessions of one run end before the next
    tls = measure(site, "mpop3-tls", "login", 32, "user8%02d")
    rate, tls_rate = clear["sessions"] / clear["seconds"], tls["sessions"] / tls["seconds"]
    report(
        site,
        capsys,
        f"TLS login 32 clients: cleartext {rate:6.0f} sessions/s, TLS {tls_rate:6.0f}/s, "
        f"ratio {tls_rate / rate:.2f}; CPU: server {clear['server_cpu']:.2f} / {tls['server_cpu']:.2f} "
        f"cores, loadgen {clear['loadgen_cpu']:.2f} / {tls['loadgen_cpu']:.2f} cores",
    )
    assert tls["sessions"] > 0
    # the login cost without the mbox engine (and, as root, without a process per session)
    clear = measure(site, "core", "login", 32, "user6%02d")
    tls = measure(site, "core-tls", "login", 32, "user8%02d")
    rate, tls_rate = clear["sessions"] / clear["seconds"], tls["sessions"] / tls["seconds"]
    report(
        site,
        capsys,
        f"TLS login 32 clients, no storage module: cleartext {rate:6.0f} sessions/s, "
        f"TLS {tls_rate:6.0f}/s, ratio {tls_rate / rate:.2f}; CPU: server {clear['server_cpu']:.2f} / "
        f"{tls['server_cpu']:.2f} cores, loadgen {clear['loadgen_cpu']:.2f} / {tls['loadgen_cpu']:.2f} cores",
    )
    for clients in (1, 4):
        time.sleep(0.3)
        clear = measure(site, "mpop3", "retr", clients, "r%d")
        time.sleep(0.3)
        tls = measure(site, "mpop3-tls", "retr", clients, "r%d")
        rate, tls_rate = clear["bytes"] / clear["seconds"] / 1e6, tls["bytes"] / tls["seconds"] / 1e6
        report(
            site,
            capsys,
            f"TLS RETR {clients} client{'s' if clients > 1 else ' '}: cleartext {rate:5.0f} MB/s, "
            f"TLS {tls_rate:5.0f} MB/s, ratio {tls_rate / rate:.2f}; {tls['messages']:.0f} messages checked; "
            f"CPU: server {clear['server_cpu']:.2f} / {tls['server_cpu']:.2f} cores, loadgen "
            f"{clear['loadgen_cpu']:.2f} / {tls['loadgen_cpu']:.2f} cores",
        )
        assert tls["messages"] > 0


def idle_pss(site, target, sessions=IDLE_SESSIONS, userfmt="user%d"):
    proc, port = site[target]
    measure(site, target, "login", 4, "user%d")  # warm up allocators and caches
    time.sleep(0.5)
    before = pss_kib(proc.pid)
    hold = subprocess.Popen(
        [LOADGEN, "idle", str(port), str(sessions), "0", userfmt, "pw"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ready = hold.stdout.readline()
    assert ready.startswith("ready") and "errors=0" in ready, ready
    time.sleep(0.5)
    after = pss_kib(proc.pid)
    hold.stdin.close()
    hold.wait(30)
    time.sleep(0.5)
    return (after - before) / sessions


def test_memory_per_idle_session(site, capsys):
    ours = idle_pss(site, "mpop3")
    canned = idle_pss(site, "canned")
    # the canned responder's connections cost next to nothing (a ratio to
    # ~0 means nothing): both are shown as absolute figures
    report(
        site,
        capsys,
        f"idle {IDLE_SESSIONS} sessions: mpop3 {ours:.1f} KiB PSS per logged-in session "
        f"(target <= 30 KB), canned {canned:.1f} KiB per connection",
    )
    assert ours < 30


def test_process_per_session(site, capsys):
    """Started as root with spools opened by their users: a process per
    session, forked from a prepared listener, switching users after login.
    Logins at 32 clients and PSS per idle session, next to the shared
    process figures of the same run."""
    model = "a process per session" if os.geteuid() == 0 else "NOT root: one process (no switching)"
    shared = measure(site, "mpop3", "login", 32, "user3%02d")
    time.sleep(0.3)
    ours = measure(site, "per-session", "login", 32, "user4%02d")
    rate, shared_rate = ours["sessions"] / ours["seconds"], shared["sessions"] / shared["seconds"]
    report(
        site,
        capsys,
        f"login 32 clients, {model}: {rate:6.0f} sessions/s (target >= 1,000); "
        f"shared process {shared_rate:6.0f}/s, ratio {rate / shared_rate:.2f}; CPU: server "
        f"{ours['server_cpu']:.2f} cores, loadgen {ours['loadgen_cpu']:.2f} cores; server CPU per session "
        f"{1e3 * ours['server_cpu'] / rate:.2f} ms, shared {1e3 * shared['server_cpu'] / shared_rate:.2f} ms; "
        f"page faults per session {ours['faults'] / ours['sessions']:.0f}, "
        f"shared {shared['faults'] / shared['sessions']:.1f}",
    )
    if "dovecot-per-session" in site:  # its default: a login and a mail process per session
        time.sleep(0.3)
        theirs = measure(site, "dovecot-per-session", "login", 32, "user4%02d")
        theirs_rate = theirs["sessions"] / theirs["seconds"]
        report(
            site,
            capsys,
            f"      vs Dovecot, a process per session: {theirs_rate:6.0f} sessions/s, "
            f"mpop3 / Dovecot = {rate / theirs_rate:.2f}",
        )
    time.sleep(0.5)
    per_session = idle_pss(site, "per-session")
    shared_pss = idle_pss(site, "mpop3")
    report(
        site,
        capsys,
        f"idle {IDLE_SESSIONS} sessions, {model}: {per_session:.0f} KiB PSS per "
        f"logged-in session; shared process {shared_pss:.1f} KiB, ratio {per_session / shared_pss:.0f}",
    )
    assert ours["sessions"] > 0


def test_processes_by_role(site, capsys):
    """The split model (login_user): logins at 32 clients where the users
    come back to their mail process (virtual users: one uid), RETR over TLS
    through the login process's relay, PSS per idle logged-in session,
    next to the shared process and a process per session in the same run."""
    if "split" not in site:
        report(site, capsys, "processes by role: NOT root, not measured")
        return
    shared = measure(site, "mpop3", "login", 32, "user3%02d")
    time.sleep(0.3)
    ours = measure(site, "split", "login", 32, "user5%02d")
    time.sleep(0.3)
    per_session = measure(site, "per-session", "login", 32, "user4%02d")
    rate = ours["sessions"] / ours["seconds"]
    shared_rate = shared["sessions"] / shared["seconds"]
    per_session_rate = per_session["sessions"] / per_session["seconds"]
    report(
        site,
        capsys,
        f"login 32 clients, processes by role (mail process reused): {rate:6.0f} sessions/s (target >= 1,000); "
        f"shared process {shared_rate:6.0f}/s, ratio {rate / shared_rate:.2f} (target >= 0.6); "
        f"a process per session {per_session_rate:6.0f}/s, ratio {rate / per_session_rate:.2f}; "
        f"server CPU per session {1e3 * ours['server_cpu'] / rate:.2f} ms",
    )
    compare_with_dovecot(site, capsys, "login", 32, "user6%02d", rate, lambda r: r["sessions"], "sessions/s")
    tls_shared = measure(site, "mpop3-tls", "retr", 4, "r%d")
    tls_split = measure(site, "split-tls", "retr", 4, "r%d")
    mb = tls_split["bytes"] / tls_split["seconds"] / 1e6
    mb_shared = tls_shared["bytes"] / tls_shared["seconds"] / 1e6
    report(
        site,
        capsys,
        f"RETR over TLS 4 clients, processes by role (relay): {mb:.0f} MB/s; shared process {mb_shared:.0f} MB/s, "
        f"ratio {mb / mb_shared:.2f} (target >= 0.7)",
    )
    time.sleep(0.5)
    split_pss = idle_pss(site, "split")
    report(
        site,
        capsys,
        f"idle {IDLE_SESSIONS} sessions, processes by role (one mail process, shared uid): "
        f"{split_pss:.1f} KiB PSS per logged-in session (login and mail processes together)",
    )
    assert ours["sessions"] > 0
