"""Running it: `/metrics` for Prometheus, and the control socket of
`mpop3 who` and `mpop3 kick`.

Both read the scoreboard (scoreboard.py): in a server of one process, that
process; where a parent forks the servers, the parent. The sockets are
made at start-up, as root if the server starts as root, before anything
else runs:

- the control socket is a Unix socket only root and `control_group` can
  connect to (its mode, then the peer's credentials). A request is one
  line: `who`, or `kick USER|ADDRESS`; the answer is lines, then the
  connection closes. Only local administrators reach it, but it is
  bounded all the same (one line of at most 512 bytes, one second).
- `/metrics` is HTTP from the network: a parent that is root never reads
  it. It is served by a process of its own as safe_user (forked by the
  parent, `serve_metrics_process`), which asks the parent for the text
  over a socket pair; a single server process as safe_user serves it on
  its own loop.
"""

import asyncio
import errno
import grp
import ipaddress
import logging
import os
import socket
import stat
import struct
import time

from . import metrics

log = logging.getLogger("mpop3.server")

LONGEST_REQUEST = 512  # a control request line
HTTP_HEAD_LIMIT = 8192  # a scrape's request line and headers
HTTP_TIMEOUT = 5.0
LENGTH = struct.Struct("!I")


class Operations:
    """The sockets of `metrics_listen` and `control_socket`, bound at start-up."""

    def __init__(self, metrics_socket=None, control_socket=None, control_gid=None, path=None):
        self.metrics_socket = metrics_socket
        self.control_socket = control_socket
        self.control_gid = control_gid
        self.path = path

    @classmethod
    def bind(cls, conf):
        """What the configuration asks for. A control socket that cannot be
        made is a warning (the server runs without one); a metrics address
        that cannot be bound is an error, as a listen address is (OSError)."""
        values = conf.values
        metrics_socket = None
        if values["metrics_listen"] is not None:
            from .service import bind

            host, port = values["metrics_listen"]
            metrics_socket = bind(host, port)
        gid = grp.getgrnam(values["control_group"]).gr_gid if values["control_group"] else None
        control = None
        if values["control_socket"] is not None:
            try:
                control = bind_control(values["control_socket"], gid)
            except OSError as e:
                log.warning("no control socket at %s (mpop3 who/kick): %s", values["control_socket"], e.strerror or e)
        return cls(metrics_socket, control, gid, values["control_socket"] if control else None)

    def close(self, unlink=True):
        """Close both (in a child: our copies only, unlink=False)."""
        for sock in (self.metrics_socket, self.control_socket):
            if sock is not None:
                sock.close()
        if unlink and self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None

    def answer_control(self, board):
        """Accept and answer one control connection (the listening socket
        was readable)."""
        try:
            conn, _ = self.control_socket.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        with conn:
            conn.settimeout(1.0)
            try:
                line = read_line(conn)  # first, so that a refusal is read, not reset
                if not self.may_control(conn):
                    conn.sendall(b"-ERR not allowed\n")
                    return
                conn.sendall(control_answer(board, line))
            except (OSError, ValueError) as e:
                log.info("control socket: request dropped: %s", e)

    def may_control(self, conn):
        """Root, or a member of control_group (its mode let it connect;
        this is the check that does not depend on the file)."""
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid == 0:
            return True
        if self.control_gid is None:
            return False
        if gid == self.control_gid:
            return True
        try:
            import pwd

            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            return False
        return name in grp.getgrgid(self.control_gid).gr_mem


def bind_control(path, gid):
    """A listening Unix socket at `path`, mode 0660 (0600 without a
    group), its directory made if missing. A socket left by a server that
    died is replaced; one a running server answers on is not."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody answers there
        else:
            raise OSError(errno.EADDRINUSE, "another server answers there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_mask)
    if gid is not None:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def read_line(conn):
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(LONGEST_REQUEST + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > LONGEST_REQUEST:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0].rstrip(b"\r")


# --- who and kick -----------------------------------------------------------------


def control_answer(board, line):
    verb, _, argument = line.decode("utf-8", "replace").strip().partition(" ")
    argument = argument.strip()
    if verb == "who" and not argument:
        return who_text(board.sessions()).encode("utf-8", "replace")
    if verb == "kick" and argument:
        count = board.kick(kick_filter(argument))
        return f"+OK {count} session{'' if count == 1 else 's'} kicked\n".encode()
    return b"-ERR unknown request (who, kick USER|ADDRESS)\n"


def kick_filter(argument):
    """USER, or ADDRESS (any form of one: ::1 and 0:0::1 are one address)."""
    try:
        wanted = ipaddress.ip_address(argument)
    except ValueError:
        name = argument.encode("utf-8", "surrogateescape")
        return lambda address, user: user == name
    return lambda address, user: same_address(address, wanted)


def same_address(text, wanted):
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if wanted.version == 6 and wanted.ipv4_mapped is not None:
        wanted = wanted.ipv4_mapped
    return address == wanted


WHO_HEADINGS = ("USER", "ADDRESS", "TLS", "SINCE", "STATE", "PID")


def who_text(sessions):
    """A table: one session a line, logged-in users first, by user."""
    rows = []
    for pid, _, _, _, state, secure, since, address, user in sessions:
        rows.append(
            (
                printable(user) or "-",
                printable(address),
                "yes" if secure else "no",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)),
                metrics.STATES[state],
                str(pid),
            )
        )
    rows.sort(key=lambda r: (r[0] == "-", r[0], r[3]))
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(WHO_HEADINGS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [WHO_HEADINGS, *rows]]
    return "\n".join(lines) + "\n"


def printable(raw):
    """A user name or address from a process's slot: shown, never trusted
    to be clean text."""
    return "".join(c if c.isprintable() and c != " " else "?" for c in raw.decode("utf-8", "replace"))


def ask(path, request, timeout=5.0):
    """The client side (`mpop3 who`, `mpop3 kick`): the answer's text."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request.encode("utf-8", "surrogateescape") + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


# --- /metrics ----------------------------------------------------------------------


def render(board, processes):
    return metrics.exposition(board.totals(), {**board.roles(), **processes})


async def serve_metrics(listener, text):
    """Answer scrapes on `listener` with `text()` (the exposition bytes)."""

    async def scrape(reader, writer):
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_TIMEOUT)
            writer.write(http_answer(head, text))
            await asyncio.wait_for(writer.drain(), HTTP_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(scrape, sock=listener, limit=HTTP_HEAD_LIMIT)


def http_answer(head, text):
    request = head.split(b"\r\n", 1)[0].split(b" ")
    if len(request) != 3 or not request[2].startswith(b"HTTP/1."):
        return http_reply(b"400 Bad Request", b"bad request\n")
    method, target = request[0], request[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return http_reply(b"405 Method Not Allowed", b"GET /metrics\n")
    if target != b"/metrics":
        return http_reply(b"404 Not Found", b"see /metrics\n")
    body = text()
    if body is None:
        return http_reply(b"503 Service Unavailable", b"the server is not answering\n")
    reply = http_reply(b"200 OK", body, b"text/plain; version=0.0.4; charset=utf-8")
    return reply if method == b"GET" else reply[: len(reply) - len(body)]


def http_reply(status, body, content_type=b"text/plain; charset=utf-8"):
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
        b"%d\r\nConnection: close\r\n\r\n" % len(body) + body
    )


# --- the metrics process and its parent --------------------------------------------


def answer_render(sock, board, processes):
    """The parent: the metrics process asked (one byte) for the text."""
    try:
        if not sock.recv(1):
            return False
        body = render(board, processes())
        sock.setblocking(True)
        sock.settimeout(2.0)
        sock.sendall(LENGTH.pack(len(body)) + body)
    except OSError:
        return False
    finally:
        if sock.fileno() >= 0:
            sock.setblocking(False)
    return True


def serve_metrics_process(listener, parent):
    """The metrics process: scrapes answered with what the parent renders."""
    from .service import new_loop

    parent.settimeout(5.0)

    def text():
        try:
            parent.sendall(b"?")
            size = LENGTH.unpack(receive_exactly(parent, LENGTH.size))[0]
            return receive_exactly(parent, size)
        except (OSError, ValueError):
            return None

    loop = new_loop()
    try:
        loop.run_until_complete(serve_metrics(listener, text))
        loop.run_forever()
    finally:
        loop.close()
    return 0


def receive_exactly(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(1 << 20, size - len(data)))
        if not chunk:
            raise ValueError("the parent went away")
        data += chunk
    return bytes(data)
