"""The cluster (issue 15, "Speed"): logins/s at 32 clients through HAProxy
with one node and with three (tests/cluster_lab.py: PostgreSQL with the
users table and the advisory session locks, one Maildir tree, nodes on
127.0.0.11-13 with `processes 1`, HAProxy in front), and the CPU each
component used per login: HAProxy, PostgreSQL (postmaster and every
backend, the ended ones included), the mpop3 nodes, the load generator.

bench/loadgen's `login` mode: connect, USER, PASS, STAT, QUIT, a user per
client, each user's Maildir on disk with three messages (its listing
cached after the first login, as on a site). The same lab serves both
figures in one run: for "one node" HAProxy has nodes 2 and 3 in
maintenance (`set server ... state maint`), so they take nothing. Rounds
alternate between one and three nodes; each round logs in a set of users
of its own (a session the load generator hung up on at the end of a round
may still hold its lock when the next begins); the median of ROUNDS is
reported, printed and appended to bench/results.txt.

On this 2-core machine everything shares two CPUs, so three nodes cannot
be three times one: the figures that carry over to real machines are the
CPU per login of each component (docs/cluster.md has the model)."""

import os
import statistics
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TREE, "tests"))
from cluster_lab import Lab  # noqa: E402
from postgres_helpers import available  # noqa: E402
from process_limits import cpu_seconds  # noqa: E402
from test_load import LOADGEN, loadgen  # noqa: E402

CLIENTS = 32
SECONDS = float(os.environ.get("BENCH_SECONDS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PASSWORD = "pw"
MESSAGES = [
    b"From: bench@example.org\nSubject: message %d\nMessage-ID: <%d.bench@example.org>\n\n" % (i, i)
    + b"x" * 2000
    + b"\n"
    for i in range(3)
]

pytestmark = [
    pytest.mark.skipif(not available(), reason="PostgreSQL's server package (initdb, pg_ctl) is missing"),
    pytest.mark.skipif(not os.path.exists(LOADGEN), reason="bench/loadgen is not built (make bench/loadgen)"),
]


def user_set(n):
    return [(f"s{n}u{i}", PASSWORD, None) for i in range(CLIENTS)]


@pytest.fixture(scope="module")
def lab():
    # health checks every 2 s, as a site would have them (the tests' 200 ms is for killing nodes)
    with Lab(check_interval="2s", node_settings={"log_level": "warning"}) as lab:
        for n in range(2 * ROUNDS):
            lab.add_users(user_set(n), MESSAGES)
        yield lab


def use_nodes(lab, count):
    for node in lab.nodes:
        lab.set_state(node.number, "ready" if node.number <= count else "maint")
    for node in lab.nodes:
        lab.wait_state(node.number, "UP" if node.number <= count else "MAINT")


def run(lab, count, users):
    """One measurement: (logins/s, CPU per login in us by component)."""
    use_nodes(lab, count)
    time.sleep(0.3)  # the sessions the last run hung up on end first
    nodes = [node.pid for node in lab.nodes]
    before = {
        "HAProxy": cpu_seconds(lab.haproxy.pid),
        "PostgreSQL": lab.database_cpu(),
        "mpop3 nodes": sum(cpu_seconds(pid) for pid in nodes),
    }
    r = loadgen("login", lab.port, CLIENTS, SECONDS, f"s{users}u%d")
    after = {
        "HAProxy": cpu_seconds(lab.haproxy.pid),
        "PostgreSQL": lab.database_cpu(),
        "mpop3 nodes": sum(cpu_seconds(pid) for pid in nodes),
    }
    assert r["errors"] == 0, (count, r)
    logins = r["sessions"]
    cost = {what: 1e6 * (after[what] - before[what]) / logins for what in before}
    cost["loadgen"] = 1e6 * r["cpu"] / logins
    return logins / r["seconds"], cost


def measure(lab):
    """ROUNDS of one node and three, alternated: {count: [(rate, cost)]}."""
    # warm: every pool open, every user's listing cached, PostgreSQL's catalogs read
    use_nodes(lab, 3)
    for n in range(2 * ROUNDS):
        loadgen("login", lab.port, CLIENTS, 0.5, f"s{n}u%d")
    results = {1: [], 3: []}
    for i in range(ROUNDS):
        for count in (1, 3):
            results[count].append(run(lab, count, 2 * i + (count == 3)))
    use_nodes(lab, 3)
    return results


def summary(results, count):
    """(median logins/s, the line)."""
    rate = statistics.median(rate for rate, _ in results[count])
    costs = {what: statistics.median(cost[what] for _, cost in results[count]) for what in results[count][0][1]}
    line = (
        f"{count} node{'s' if count > 1 else ' '}: {rate:6.0f} logins/s "
        f"(rounds {', '.join(f'{r:.0f}' for r, _ in results[count])}); CPU per login, us: "
        + ", ".join(f"{what} {cost:.0f}" for what, cost in costs.items())
        + f"; all {sum(costs.values()):.0f}"
    )
    return rate, line


def test_logins_through_haproxy_one_node_and_three(lab, report, capsys):
    measured = {"postgresql": measure(lab)}
    # the reference: the same with the marker-file lock (on this one machine's
    # filesystem it holds across the nodes too): what the advisory lock costs
    lab.use_session_lock("file")
    measured["file"] = measure(lab)
    lines = [
        f"cluster login {CLIENTS} clients through HAProxy, {os.cpu_count()} CPUs "
        f"(load average {os.getloadavg()[0]:.1f} at the end):"
    ]
    rates = {}
    for kind, title in (("postgresql", "session_lock postgresql"), ("file", "session_lock file (reference)")):
        for count in (1, 3):
            rates[kind, count], line = summary(measured[kind], count)
            lines.append(f"  {title}, {line}")
    lines.append(
        f"  3 nodes / 1 node: {rates['postgresql', 3] / rates['postgresql', 1]:.2f}; "
        f"advisory lock / file lock at 3 nodes: {rates['postgresql', 3] / rates['file', 3]:.2f}"
    )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    with open(os.path.join(HERE, "results.txt"), "a") as f:
        f.write("\n".join(lines) + "\n")
    report(
        f"cluster login {CLIENTS} clients",
        f"1 node {rates['postgresql', 1]:.0f}/s, 3 nodes {rates['postgresql', 3]:.0f}/s, "
        f"ratio {rates['postgresql', 3] / rates['postgresql', 1]:.2f}",
    )
    assert all(rate > 0 for rate in rates.values())
