"""What mpop3 counts, where each count lives, and the Prometheus text for it.

Every metric is a run of int64 cells in a process's scoreboard segment
(scoreboard.py): a cell per label value (a counter or a gauge), or per
bucket plus one for the sum (a histogram, its sum in microseconds). A
process adds to its own cells with plain `cells[i] += n`: no lock, no
system call, one writer per segment (the event loop's thread). Reading
sums the cells of every live process and what the dead ones left
(Scoreboard.retire), so the numbers cover the whole server whatever the
process model.

No label carries a user name or a client address: a label value is one of
a few fixed words (cardinality, privacy). Names and units follow the
Prometheus conventions: `_total` counters, seconds, bytes.
"""

from bisect import bisect_left
from dataclasses import dataclass

LOGIN_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMMIT_SECONDS = (0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter, gauge or histogram
    help: str
    labels: tuple = ()  # (label name, (its values...)), at most one label
    buckets: tuple = ()  # a histogram's upper bounds, in seconds
    first: int = 0  # its first cell

    def cells(self):
        if self.kind == "histogram":
            return len(self.buckets) + 2  # each bucket, +Inf, the sum
        return len(self.labels[1]) if self.labels else 1


STATES = ("authorization", "transaction", "update")

DEFINED = [
    Metric(
        "mpop3_sessions",
        "gauge",
        "Sessions open now, by state and by whether TLS protects them.",
        ("state_tls", tuple(f"{s},{t}" for s in STATES for t in ("no", "yes"))),
    ),
    Metric("mpop3_sessions_total", "counter", "Sessions accepted."),
    Metric(
        "mpop3_connections_refused_total",
        "counter",
        "Connections refused at once: too many sessions, or shutting down.",
    ),
    Metric(
        "mpop3_logins_total",
        "counter",
        "Logins by outcome (an unknown user counts as bad_credentials).",
        ("outcome", ("ok", "bad_credentials", "temporary_failure", "refused")),
    ),
    Metric("mpop3_sent_bytes_total", "counter", "Bytes written to clients."),
    Metric(
        "mpop3_commands_total",
        "counter",
        "RETR, TOP and DELE commands served.",
        ("command", ("RETR", "TOP", "DELE")),
    ),
    Metric("mpop3_deleted_messages_total", "counter", "Messages deleted by committed QUITs."),
    Metric("mpop3_tls_handshakes_failed_total", "counter", "TLS handshakes that failed (implicit TLS and STLS)."),
    Metric(
        "mpop3_module_errors_total",
        "counter",
        "Failures of an auth or storage module (exceptions, storage errors).",
        ("module", ("auth", "storage")),
    ),
    Metric(
        "mpop3_kicked_sessions_total",
        "counter",
        "Sessions ended by `mpop3 kick`.",
    ),
    Metric(
        "mpop3_login_duration_seconds",
        "histogram",
        "From a login command to its answer.",
        buckets=LOGIN_SECONDS,
    ),
    Metric("mpop3_mailbox_open_duration_seconds", "histogram", "Opening a mailbox.", buckets=LOGIN_SECONDS),
    Metric("mpop3_commit_duration_seconds", "histogram", "A QUIT's commit of deletions.", buckets=COMMIT_SECONDS),
]


def lay_out(metrics):
    placed, cell = {}, 0
    for metric in metrics:
        placed[metric.name] = Metric(**{**metric.__dict__, "first": cell})
        cell += metric.cells()
    return placed, cell


METRICS, CELLS = lay_out(DEFINED)
# counters and histograms outlive their process (retired into the totals);
# a gauge's cells count what the process has now, and die with it
GAUGE_CELLS = frozenset(i for m in METRICS.values() if m.kind == "gauge" for i in range(m.first, m.first + m.cells()))


def cell(name, value=None):
    metric = METRICS[name]
    if value is None:
        return metric.first
    return metric.first + metric.labels[1].index(value)


SESSION_CELLS = {
    (state, secure): cell("mpop3_sessions", f"{name},{'yes' if secure else 'no'}")
    for state, name in enumerate(STATES)
    for secure in (False, True)
}


def session_cell(state, secure):
    return SESSION_CELLS[state, bool(secure)]


SESSIONS_TOTAL = cell("mpop3_sessions_total")
REFUSED = cell("mpop3_connections_refused_total")
LOGIN_OK = cell("mpop3_logins_total", "ok")
LOGIN_BAD = cell("mpop3_logins_total", "bad_credentials")
LOGIN_TEMPORARY = cell("mpop3_logins_total", "temporary_failure")
LOGIN_REFUSED = cell("mpop3_logins_total", "refused")
SENT_BYTES = cell("mpop3_sent_bytes_total")
RETR = cell("mpop3_commands_total", "RETR")
TOP = cell("mpop3_commands_total", "TOP")
DELE = cell("mpop3_commands_total", "DELE")
DELETED = cell("mpop3_deleted_messages_total")
TLS_FAILED = cell("mpop3_tls_handshakes_failed_total")
AUTH_ERRORS = cell("mpop3_module_errors_total", "auth")
STORAGE_ERRORS = cell("mpop3_module_errors_total", "storage")
KICKED = cell("mpop3_kicked_sessions_total")
LOGIN_TIME = METRICS["mpop3_login_duration_seconds"]
OPEN_TIME = METRICS["mpop3_mailbox_open_duration_seconds"]
COMMIT_TIME = METRICS["mpop3_commit_duration_seconds"]


def observe(cells, histogram, seconds):
    """Count one duration into `histogram`'s cells."""
    first = histogram.first
    cells[first + bisect_left(histogram.buckets, seconds)] += 1
    cells[first + len(histogram.buckets) + 1] += int(seconds * 1_000_000)


# --- the text format ---------------------------------------------------------------

PROCESS_ROLES = ("master", "server", "session", "login", "auth", "spawner", "mail", "metrics")


def exposition(totals, processes):
    """The Prometheus text format (version 0.0.4) of `totals` (the summed
    cells) and `processes` (role -> how many run now)."""
    out = []
    for metric in METRICS.values():
        out.append(f"# HELP {metric.name} {metric.help}")
        out.append(f"# TYPE {metric.name} {metric.kind}")
        first = metric.first
        if metric.kind == "histogram":
            histogram_lines(out, metric, totals[first : first + metric.cells()])
        elif not metric.labels:
            out.append(f"{metric.name} {max(0, totals[first])}")
        else:
            label, values = metric.labels
            for i, value in enumerate(values):
                out.append(f"{metric.name}{{{label_text(label, value)}}} {max(0, totals[first + i])}")
    out.append("# HELP mpop3_processes Server processes running now, by role.")
    out.append("# TYPE mpop3_processes gauge")
    for role in PROCESS_ROLES:
        out.append(f'mpop3_processes{{role="{role}"}} {processes.get(role, 0)}')
    return ("\n".join(out) + "\n").encode()


def label_text(label, value):
    if label == "state_tls":  # one cell per pair, two labels in the text
        state, secure = value.split(",")
        return f'state="{state}",tls="{secure}"'
    return f'{label}="{value}"'


def histogram_lines(out, metric, cells):
    counts, total_us = cells[:-1], cells[-1]
    running = 0
    for bound, count in zip((*metric.buckets, "+Inf"), counts, strict=True):
        running += max(0, count)
        out.append(f'{metric.name}_bucket{{le="{bound}"}} {running}')
    out.append(f"{metric.name}_sum {max(0, total_us) / 1_000_000}")
    out.append(f"{metric.name}_count {running}")
