"""The split model: processes by role, so that no root process reads what a
client sends (rules 1 and 2 with `login_user` set; docs/architecture.md).

    master (root)    binds, starts and supervises the others, keeps the
                     counts and delays every process shares (Supervisor);
                     reads no client byte, only records of its children
    login processes  `processes` of them, exec'd fresh (login_process.py):
                     as login_user in an empty root directory, many
                     sessions each, up to the login
    auth process     checks credentials (auth_service.py): root if the auth
                     module needs it, else safe_user
    spawner          forked once, root: forks the mail processes for the
                     master, so that the master forks none (spawner.py)
    mail processes   one per mailbox user (uid), forked by the spawner, which
                     become that user (the privilege rules) at once, and
                     serve the rest of that user's sessions

A login process hands a logged-in session to the master with the auth
process's ticket; the master redeems the ticket, so the mailbox served is
the one the credentials were for, whatever the login process says.
"""

import errno
import json
import logging
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass

from .. import config
from .. import log as logs
from ..protocol import replies
from . import privs, records, scoreboard, spawner, tls
from .auth_service import AuthServer
from .limits import Admission
from .per_session import prepare_for_forks, refuse
from .shared_counts import SharedCounts
from .supervisor import HANDLED, ChildReports, Supervisor, become_subreaper

log = logging.getLogger("mpop3.server")

RESTART_DELAY = 1.0  # a login or auth process that died is started again after this
TRIES = 2  # mail processes a session is sent to, while they end before taking it


class Split(Supervisor):
    def __init__(self, conf, tables, socket_sets, plan, debug=False):
        super().__init__(conf)
        self.tables = tables
        self.socket_sets = socket_sets  # a set per login slot (SO_REUSEPORT: the kernel spreads clients)
        self.sockets = [sock for sockets in socket_sets for sock in sockets]
        self.plan = plan
        self.debug = debug
        values = conf.values
        # the sessions of every process that admits clients: a column for the
        # master's (logged in), one for each login process's, old and new
        columns = 1 + 2 * values["processes"] + 2
        self.counts = SharedCounts.create(columns, self.throttle.key, keep_fd=True)
        self.free_columns = list(range(columns - 1, 0, -1))
        limits = values["max_sessions"], values["max_sessions_per_ip"]
        self.admission = Admission(*limits, self.counts, values["ipv6_prefix"], judge_shared=False)
        self.jail = None
        self.auth = None  # (pid, control socket)
        self.spawner = None  # its SpawnerProcess, while it runs
        self.logins = {}  # slot -> its LoginProcess (the one taking new clients)
        self.due = {}  # slot (or "auth") -> monotonic time of a restart
        self.mail = {}  # uid -> its MailProcess, while it takes sessions
        self.identities = privs.SessionIdentities(plan, conf.values)
        self.apop = tables.auth.auth_timestamp() is not None
        from .service import plaintext_passwords

        self.cram_md5 = plaintext_passwords(tables.auth)

    # --- start-up ------------------------------------------------------------

    def started(self):
        self.jail = tempfile.mkdtemp(prefix="mpop3-login-root-")  # empty, root's, 0700
        os.chmod(self.jail, 0o555)
        become_subreaper()  # a mail process whose spawner died is still ours to reap
        self.start_auth()
        self.start_spawner()
        for slot in range(self.conf.values["processes"]):
            self.start_login(slot)
        log.info(
            "privilege separation: %d login process%s as %s, checks in auth process %d",
            len(self.logins),
            "" if len(self.logins) == 1 else "es",
            self.conf.values["login_user"],
            self.auth[0],
        )

    def start_auth(self):
        ours, theirs = records.pair()
        pid, _ = self.fork()
        if pid == 0:
            ours.close()
            self.child_main("auth process", lambda: self.be_auth(theirs))
        theirs.close()
        self.children[pid] = ("auth",)
        self.auth = (pid, ours)

    def leave(self, segment=None):
        """A forked child (auth, spawner, metrics) keeps no way to the counts."""
        super().leave(segment)
        self.counts.close()

    def be_auth(self, control):
        for sock in self.sockets:
            sock.close()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # no loop: they end it
        if not self.tables.auth.auth_need_root() and not privs.switch_or_log(privs.safe_identity(self.conf)):
            return 1
        return AuthServer(self.tables.auth, control).run()

    def auth_sockets(self):
        """A socket pair per worker thread of a login process: the login
        ends, returned; the others, served by the auth process from now on."""
        if self.auth is None:
            raise OSError(errno.EAGAIN, "the auth process is being restarted")
        count = self.conf.values["worker_threads"]
        pairs = [records.pair() for _ in range(count)]
        try:
            records.send(self.auth[1], {"serve": count}, [theirs.fileno() for _, theirs in pairs])
        finally:
            for _, theirs in pairs:
                theirs.close()
        return [ours for ours, _ in pairs]

    def start_login(self, slot):
        values = self.conf.values
        channel, channel_theirs = socket.socketpair()
        handoff, handoff_theirs = records.pair()
        auth = self.auth_sockets()
        segment = scoreboard.Segment.create(values["max_sessions"], keep_fd=True)
        listening = self.socket_sets[slot % len(self.socket_sets)]
        column = self.free_columns.pop() if self.free_columns else None
        if column is None:
            log.warning("login process for slot %s: no column left in the shared session counts; it counts alone", slot)
        setup_r, setup_w = os.pipe()
        given = [channel_theirs, handoff_theirs, *auth]
        setup = {
            "config": self.conf.path,
            "debug": self.debug,
            "key": self.throttle.key.hex(),
            "channel": channel_theirs.fileno(),
            "handoff": handoff_theirs.fileno(),
            "auth": [s.fileno() for s in auth],
            "listen": [s.fileno() for s in listening],
            "apop": self.apop,
            "cram_md5": self.cram_md5,
            "login_delay": int(self.tables.auth.auth_default_login_delay() or 0),
            "user": values["login_user"],
            "root": self.jail,
            "scoreboard": segment.fd,
            "counts": None if column is None else [self.counts.fd, self.counts.columns, column],
        }
        with os.fdopen(setup_w, "wb") as f:
            f.write(json.dumps(setup).encode())
        fds = [setup_r, segment.fd, self.counts.fd, *(s.fileno() for s in given), *(s.fileno() for s in listening)]
        # it starts with our signals held, until its loop handles them
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mpop3.server.login_process", str(setup_r)],
                pass_fds=fds,
                env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
            )
        except OSError:
            segment.close()
            if column is not None:
                self.free_columns.append(column)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
            os.close(setup_r)
            for s in given:
                s.close()
        segment.close_fd()
        self.board.add(proc.pid, "login", segment)
        proc.returncode = 0  # reaped by the supervisor, not by Popen
        channel.setblocking(False)
        self.selector.register(channel, selectors.EVENT_READ, ChildReports(self, channel, None).read)
        handoff.setblocking(False)
        login = LoginProcess(proc.pid, slot, channel, handoff, column)
        self.selector.register(handoff, selectors.EVENT_READ, lambda sock: self.handed(login, sock))
        self.children[proc.pid] = ("login", login)
        self.logins[slot] = login

    # --- hand-offs -------------------------------------------------------------

    def handed(self, login, sock):
        try:
            record, fds = records.receive(sock)
        except BlockingIOError:
            return
        except (OSError, records.BadRecord) as e:
            log.error("login process %d sent a bad hand-off (%s)", login.pid, e)
            return
        if record is None:
            self.selector.unregister(sock)
            return
        if len(fds) != 1:
            records.close_all(fds)
            log.error("login process %d sent a hand-off without its client", login.pid)
            return
        client = socket.socket(fileno=fds[0])
        try:
            handover, lines = self.check_hand_off(record)
        except records.BadRecord as e:
            log.error("login process %d: hand-off refused: %s", login.pid, e)
            refuse(client, replies.ERR_NO_SESSION_PROCESS)
            return
        self.start_mail(client, handover, lines)

    def check_hand_off(self, record):
        """The session a login process hands over, if its ticket says so."""
        ticket = records.text(record, "ticket", 64)
        mailbox = records.text(record, "mailbox", 255)
        user = records.text(record, "user", 2048)
        redeemed = self.redeem(ticket)
        if redeemed.get("mailbox") != mailbox or redeemed.get("user") != user:
            raise records.BadRecord(f"ticket not good for mailbox {mailbox!r}")
        return records.session_from(record)

    def redeem(self, ticket):
        if self.auth is None:  # being restarted: its tickets died with it
            return {}
        control = self.auth[1]
        control.settimeout(5)
        try:
            records.send(control, {"redeem": ticket})
            answer, fds = records.receive(control)
        except (OSError, records.BadRecord):
            return {}
        records.close_all(fds)
        return answer or {}

    def start_mail(self, client, handover, lines):
        """Give the session to the mail process of its mailbox's user,
        started now if there is none."""
        address = handover.peer
        try:
            who = self.identities.for_mailbox(handover.mailbox)
        except (privs.PrivilegeError, KeyError) as e:
            log.error("mailbox %s: cannot tell whom to serve it as: %s", handover.mailbox, e)
            refuse(client, replies.ERR_NO_SESSION_PROCESS)
            return
        refusal = self.admission.admit(address)
        if refusal is not None:
            refuse(client, refusal)
            return
        self.hand_to_mail(InFlight(who, records.session(handover, lines), client, address))

    def hand_to_mail(self, flight):
        """Send a session to its mail process, and keep our copy of the
        client until that process says it took it: a process that dies
        first (its first act on a session is to say so) leaves it to be
        sent to another."""
        try:
            mail = self.send_to_mail_process(flight.who, flight.record, flight.client)
        except OSError as e:
            log.error("%s: refused, cannot start or reach a mail process: %s", flight.address, e.strerror or e)
            self.admission.release(flight.address)
            refuse(flight.client, replies.ERR_NO_SESSION_PROCESS)
            return
        mail.in_flight.append(flight)
        mail.sessions.append(flight.address)
        mail.idle_since = None

    def send_to_mail_process(self, who, record, client):
        """Send the session to `who`'s mail process, started if there is
        none, or if the one there has just died (its end of the socket is
        closed before we are told it ended): that process."""
        try:
            return self.send_to(self.mail_process_for(who), record, client)
        except OSError:  # it died between our look and our send
            return self.send_to(self.mail_process_for(who), record, client)

    def mail_process_for(self, who):
        mail = self.mail.get(who.uid)
        while mail is not None and select.select([mail.sock], [], [], 0)[0]:
            self.mail_said(mail)  # news first: an end, maybe
            mail = self.mail.get(who.uid)
        if mail is None:
            mail = self.mail[who.uid] = self.start_mail_process(who)
        return mail

    def send_to(self, mail, record, client):
        try:
            records.send(mail.sock, record, [client.fileno()])
        except OSError:
            self.let_go(mail)
            raise
        return mail

    def start_spawner(self):
        ours, theirs = records.pair()
        pid, channel = self.fork()
        if pid == 0:
            ours.close()
            channel.sock.close()
            for sock in self.sockets:
                sock.close()
            if self.auth is not None:
                self.auth[1].close()
            serving = spawner.Spawner(
                theirs, self.throttle, self.clock, self.prepare_mail_processes, self.serve_mail_as, self.reload_spawned
            )
            self.child_main("spawner process", serving.run)
        theirs.close()
        ours.setblocking(False)
        self.spawner = SpawnerProcess(pid, ours)
        self.selector.register(ours, selectors.EVENT_READ, self.spawner_said)
        self.children[pid] = ("spawner",)

    def start_mail_process(self, who):
        """A mail process for `who`, asked of the spawner: sessions sent to
        it wait in its socket until it runs; its pid comes later."""
        if self.spawner is None:
            raise OSError(errno.EAGAIN, "the spawner is being restarted")
        ours, theirs = records.pair()
        channel, channel_theirs = socket.socketpair()
        segment = None
        try:
            segment = scoreboard.Segment.create(self.conf.values["max_sessions"], keep_fd=True)
            given = [theirs.fileno(), channel_theirs.fileno(), segment.fd]
            # a system user's own mailbox has one session at a time ([IN-USE])
            one_user = who != self.identities.fixed
            records.send(self.spawner.sock, spawner.request(who, one_user), given)
        except OSError:
            for sock in (ours, channel):
                sock.close()
            if segment is not None:
                segment.close()
            raise
        finally:
            theirs.close()
            channel_theirs.close()
        segment.close_fd()
        ours.setblocking(False)
        channel.setblocking(False)
        mail = MailProcess(None, who.uid, ours, segment)
        self.spawner.asked.append(mail)
        self.selector.register(ours, selectors.EVENT_READ, lambda sock: self.mail_said(mail))
        self.selector.register(channel, selectors.EVENT_READ, ChildReports(self, channel, None).read)
        return mail

    @staticmethod
    def prepare_mail_processes():
        """In the spawner: what each mail process would import and set up
        first, done once, so that they share it (copies of the pages it
        makes would be each one's own)."""
        from .mail_service import serve_mail  # noqa: F401

        prepare_for_forks()

    def serve_mail_as(self, who, one_user, sock, channel):
        """A mail process's life, in the spawner's child: become `who`, then
        serve what the master sends."""
        from .mail_service import serve_mail
        from .service import new_loop

        if not privs.switch_or_log(who):
            return 1
        loop = new_loop()
        try:
            return serve_mail(self.conf, self.tables, loop, sock, channel, one_user)
        finally:
            loop.close()

    def reload_spawned(self):
        """SIGHUP, in the spawner: mail processes started from now on get
        the configuration as it is now (the master logs the reload)."""
        new = config.reload(self.conf)
        if new is not None:
            logs.reload_level(self.conf, new)
            self.conf = new

    def spawner_said(self, sock):
        """The spawner's answers, in the order it was asked, and the ends
        of the mail processes it reaped."""
        while True:
            try:
                record, fds = records.take(sock)
            except BlockingIOError:
                return
            records.close_all(fds)
            if record is None:  # it died: child_ended does the rest
                if sock in self.selector.get_map():
                    self.selector.unregister(sock)
                return
            if "ended" in record:
                pid, status = record.get("ended"), record.get("status")
                if type(pid) is int and type(status) is int and self.children.get(pid, ("",))[0] == "mail":
                    self.board.retire(pid)
                    self.child_ended(pid, status)
            elif self.spawner.asked:
                self.spawner_answered(self.spawner.asked.popleft(), record)

    def spawner_answered(self, mail, record):
        pid = record.get("started")
        if type(pid) is int and pid > 0 and pid not in self.children:
            mail.pid = pid
            self.children[pid] = ("mail", mail)
            self.board.add(pid, "mail", mail.segment)
            return
        log.error("cannot start a mail process: %s", record.get("failed", "no pid"))
        self.not_started(mail)

    def not_started(self, mail):
        """A mail process that will never run: its sessions are refused."""
        self.let_go(mail)
        mail.segment.close()
        for flight in mail.in_flight:
            self.admission.release(flight.address)
            refuse(flight.client, replies.ERR_NO_SESSION_PROCESS)
        mail.in_flight.clear()
        mail.sessions = []

    def mail_said(self, mail):
        """One record of a mail process; False once there is none to read."""
        try:
            record, fds = records.take(mail.sock)
        except (BlockingIOError, OSError):
            return False
        records.close_all(fds)
        if record is None:
            self.mail_gone(mail)
            return False
        if record.get("took") is True and mail.in_flight:  # in the order they were sent
            mail.in_flight.popleft().client.close()
            return True
        address = record.get("ended")
        if address in mail.sessions:
            mail.sessions.remove(address)
            self.admission.release(address)
            if not mail.sessions:
                mail.idle_since = time.monotonic()
        return True

    def mail_gone(self, mail):
        """Its end of the socket is closed (it ended, or died): sessions it
        had not taken go to another."""
        self.let_go(mail)
        flights, mail.in_flight = list(mail.in_flight), deque()
        for flight in flights:
            mail.sessions.remove(flight.address)
            flight.tries += 1
            if flight.tries < TRIES:
                self.hand_to_mail(flight)
                continue
            # mail processes of this user die before they take a session: no loop of forks
            log.error("%s: refused, %d mail processes ended before taking the session", flight.address, TRIES)
            self.admission.release(flight.address)
            refuse(flight.client, replies.ERR_NO_SESSION_PROCESS)

    def let_go(self, mail):
        """No more sessions for this mail process: it ends once its own have."""
        if self.mail.get(mail.uid) is mail:
            del self.mail[mail.uid]
        if mail.sock.fileno() >= 0:
            self.selector.unregister(mail.sock)
            mail.sock.close()

    # --- children ending ----------------------------------------------------------

    def child_ended(self, pid, status):
        kind = self.children.pop(pid)
        if os.WIFSIGNALED(status):
            log.error("%s process %d killed by signal %d", kind[0], pid, os.WTERMSIG(status))
        if kind[0] == "spawner":
            self.spawner_ended()
        elif kind[0] == "mail":
            mail = kind[1]
            if mail.sock.fileno() >= 0:
                while self.mail_said(mail):  # what it said before it died, then its end
                    pass
            self.mail_gone(mail)
            for address in mail.sessions:  # they died with it
                self.admission.release(address)
            mail.sessions = []
        elif kind[0] == "login":
            login = kind[1]
            if login.column is not None:  # its sessions ended with it
                self.counts.clear(login.column)
                self.free_columns.append(login.column)
            registered = {key.fileobj for key in self.selector.get_map().values()}
            for sock in (login.channel, login.handoff):
                if sock in registered:
                    self.selector.unregister(sock)
                sock.close()
            if self.logins.get(login.slot) is login:  # not one a reload replaced
                del self.logins[login.slot]
                if not self.stopping:
                    self.due[login.slot] = time.monotonic() + RESTART_DELAY
        elif not self.stopping:  # the auth process
            self.auth[1].close()
            self.auth = None
            self.due["auth"] = time.monotonic() + RESTART_DELAY

    def spawner_ended(self):
        """Mail processes it started run on (ours to reap now); those it
        was asked for and did not say it started may never run: their
        sockets tell (mail_gone)."""
        ended = self.spawner
        if ended.sock.fileno() >= 0:
            self.spawner_said(ended.sock)  # what it said before it died, to its end
            ended.sock.close()
        self.spawner = None
        for mail in ended.asked:
            mail.segment.close()
        if not self.stopping:
            self.due["spawner"] = time.monotonic() + RESTART_DELAY

    def timeout(self):
        times = list(self.due.values())
        idle = self.conf.values["mail_process_idle"]
        times += [m.idle_since + idle for m in self.mail.values() if m.idle_since is not None]
        if not times:
            return None
        return max(0.0, min(times) - time.monotonic())

    def tick(self):
        now = time.monotonic()
        idle = self.conf.values["mail_process_idle"]
        for mail in list(self.mail.values()):
            if mail.idle_since is not None and now - mail.idle_since >= idle:
                self.let_go(mail)
        for what, when in list(self.due.items()):
            if when > now or self.stopping:
                continue
            del self.due[what]
            try:
                if what == "auth":
                    self.start_auth()
                    self.new_auth_sockets()
                elif what == "spawner":
                    self.start_spawner()
                else:
                    self.start_login(what)
            except OSError as e:
                kind = what if what in ("auth", "spawner") else "login"
                log.error("cannot start the %s process: %s", kind, e.strerror or e)
                self.due[what] = now + RESTART_DELAY

    def new_auth_sockets(self):
        """Every login process gets sockets to the new auth process."""
        for login in self.logins.values():
            auth = self.auth_sockets()
            try:
                records.send(login.handoff, {"auth": True}, [s.fileno() for s in auth])
            except OSError as e:
                log.error("login process %d: cannot pass it the new auth process: %s", login.pid, e.strerror)
            finally:
                for s in auth:
                    s.close()

    def reloaded(self, new):
        """SIGHUP (the configuration and certificate re-read here, as root,
        and found good): new login processes take new clients; the old ones
        stop taking them and end once their sessions have (shutdown_grace)."""
        self.admission.max_sessions = new.values["max_sessions"]
        self.admission.max_per_address = new.values["max_sessions_per_ip"]
        if new.values["tls_cert"] is not None:
            try:
                tls.context_from_config(new)
            except tls.TLSSetupError:
                log.error("reload: the login processes keep running with the certificate they have")
                return
        old = list(self.logins.values())
        for login in old:
            del self.logins[login.slot]
            try:
                self.start_login(login.slot)
            except OSError as e:
                log.error("reload: cannot start a login process: %s; keeping the old one", e.strerror or e)
                self.logins[login.slot] = login
                continue
            try:
                records.send(login.handoff, {"retire": True})
            except OSError:
                pass
        log.info("reload: %d login process%s replaced", len(old), "" if len(old) == 1 else "es")

    def forward(self, signum):
        """A SIGHUP reaches the mail processes only: login processes are
        replaced instead (reloaded), the auth process keeps its tables."""
        if signum != signal.SIGHUP:
            super().forward(signum)
            return
        for pid, kind in self.children.items():
            if kind[0] in ("mail", "spawner"):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    def stop_accepting(self):
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def finished(self):
        if self.jail is not None:
            shutil.rmtree(self.jail, ignore_errors=True)
        return super().finished()


class MailProcess:
    """The master's record of a mail process."""

    def __init__(self, pid, uid, sock, segment):
        self.pid = pid  # None until the spawner says it started
        self.uid = uid
        self.sock = sock
        self.segment = segment  # its scoreboard segment
        self.sessions = []  # client addresses, one per session it serves
        self.in_flight = deque()  # InFlight sessions sent to it, not yet taken
        self.idle_since = None  # monotonic time it last had no session


class SpawnerProcess:
    """The master's record of the spawner."""

    def __init__(self, pid, sock):
        self.pid = pid
        self.sock = sock
        self.asked = deque()  # MailProcesses asked for, not yet answered, in order


@dataclass
class InFlight:
    """A session on its way to a mail process: our copy of its client
    stays open until the process has taken it."""

    who: object  # privs identity the session is served as
    record: dict
    client: socket.socket
    address: str
    tries: int = 0  # mail processes that ended before taking it


class LoginProcess:
    """The master's record of a login process."""

    def __init__(self, pid, slot, channel, handoff, column):
        self.pid = pid
        self.slot = slot
        self.column = column  # its column of the shared session counts
        self.channel = channel  # its reports: delays, LOGIN-DELAY (supervisor.ChildReports)
        self.handoff = handoff  # its logged-in sessions
