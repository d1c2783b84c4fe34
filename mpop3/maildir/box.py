"""One session's handle on one Maildir: lock, list, sizes, RETR/TOP, QUIT.

A session's life (docs/maildir.md): Maildir.open finds the directory
(mail_location), takes the session lock (session_lock.py: the mbox
engine's SessionMarker, MAILDIR/mpop3-session, or a PostgreSQL advisory
lock across nodes: [IN-USE] for a second session), opens new/ and cur/
without following links and lists them once: that listing is all the
session sees. Sizes come from `,W=` in a name or from the sizes cache
(MAILDIR/mpop3-sizes), else from the file's bytes, once. RETR and TOP run
the file through the mbox engine's DotWriter kernel. At QUIT remove()
unlinks what was deleted, fsyncs the directories, updates maildirsize and
moves what was retrieved from new/ to cur/. Nothing here holds a lock an
MDA respects: Maildir needs none, every change is one rename or unlink.
"""

import errno
import logging
import os
import re
import stat
import sys
import time
from array import array
from operator import itemgetter

from ..errors import MailboxInUse, MessageGone, StoragePermError, StorageTempError
from ..mbox._kernels import DotWriter
from ..mbox.lock import kind
from ..progress import MESSAGES, Progress
from . import session_lock, uidlist
from ._names import SizeCounter, name_info
from .names import base_of, filename_uidl
from .settings import maildir_path

log = logging.getLogger("mpop3.storage")

SUBDIRS = ("new", "cur")
LOCK_NAME = "mpop3-session"
CACHE_NAME = "mpop3-sizes"
CACHE_MAGIC = b"mpop3-maildir-listing 2 " + sys.byteorder.encode()
CACHE_MAX = 256 * 1024 * 1024
# A directory whose mtime or ctime is younger than this when it is listed
# is not vouched for in the cache: a change in the same timestamp tick
# (coarse clocks, filesystems with seconds) could leave both unchanged.
TRUST_AFTER_NS = 2_000_000_000
READ_SIZE = 256 * 1024
PROGRESS_BATCH = 256  # messages a scan handles between two looks at the clock (mpop3.progress)
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
# control characters, and bytes that are not UTF-8 (surrogateescape)
_ODD = re.compile("[\x00-\x1f\x7f\udc80-\udcff]")
_S = re.compile(r",S=(\d{1,15})(?:,|$)")

# tests: called with a step's name after each change QUIT makes ("unlink",
# "fsync", "rename", "maildirsize", "cache"), to kill the process there
step_hook = None


def _step(name):
    if step_hook is not None:
        step_hook(name)


class Entries:
    """(subdir, file name) of each message, kept as a bytearray of subdir
    numbers (0 new, 1 cur) and a list of names, as the cache stores them."""

    __slots__ = ("subs", "names")

    def __init__(self, subs=None, names=None):
        self.subs = bytearray() if subs is None else subs
        self.names = [] if names is None else names

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return SUBDIRS[self.subs[i]], self.names[i]

    def __setitem__(self, i, entry):
        self.subs[i] = SUBDIRS.index(entry[0])
        self.names[i] = entry[1]

    def __iter__(self):
        return zip(map(SUBDIRS.__getitem__, self.subs), self.names, strict=True)


class Cached:
    """MAILDIR/mpop3-sizes: the listing as the last session made it, in
    delivery order, each name with its size, and the stamps (inode, mtime,
    ctime in ns) of new/ and cur/ it was made from (None: not vouched for).

        mpop3-maildir-listing 2 <byte order>\n
        dirs <6 numbers>|- <count>\n
        <count> sizes, int64 | <count> bytes, the subdir | the names, each ended by \n
    """

    __slots__ = ("stamps", "sizes", "subs", "names")

    def __init__(self, stamps, sizes, subs, names):
        self.stamps, self.sizes, self.subs, self.names = stamps, sizes, subs, names

    def encode(self):
        head = b"dirs -" if self.stamps is None else b"dirs " + b" ".join(b"%d" % n for t in self.stamps for n in t)
        names = "".join(n + "\n" for n in self.names).encode("utf-8", "surrogateescape")
        sizes = array("q", self.sizes).tobytes()
        return b"".join([CACHE_MAGIC, b"\n", head, b" %d\n" % len(self.names), sizes, bytes(self.subs), names])

    @classmethod
    def decode(cls, data):
        """The cache from its bytes; ValueError if it is not one of ours."""
        first = data.index(b"\n")
        second = data.index(b"\n", first + 1)
        if data[:first] != CACHE_MAGIC:
            raise ValueError("not a listing of this version")
        words = data[first + 1 : second].split()
        if words[0] != b"dirs" or len(words) not in (3, 8):
            raise ValueError("bad dirs line")
        count = int(words[-1])
        stamps = None
        if len(words) == 8:
            n = [int(w) for w in words[1:7]]
            stamps = (tuple(n[:3]), tuple(n[3:]))
        at = second + 1
        sizes = array("q")
        sizes.frombytes(data[at : at + 8 * count])
        subs = bytearray(data[at + 8 * count : at + 9 * count])
        names = data[at + 9 * count :].decode("utf-8", "surrogateescape").split("\n")
        if len(sizes) != count or len(subs) != count or len(names) != count + 1 or names[-1] != "":
            raise ValueError("truncated")
        names.pop()
        if count and (min(sizes) < 0 or max(subs) > 1):
            raise ValueError("bad sizes or subdirs")
        return cls(stamps, sizes.tolist(), subs, names)


class Maildir:
    """The handle. `entries[i]` is (subdir, file name) of message i,
    `sizes[i]` its size as RETR sends it."""

    def __init__(self, settings, name, path):
        self.settings = settings
        self.name = name
        self.path = path
        self.root_fd = None
        self.dir_fds = {}
        self.marker = None
        self.entries = Entries()
        self.sizes = []
        self.uids = None
        self.uidlist = None
        self.retrieved = set()
        self.deleted = set()
        self.stamps = None  # new/'s and cur/'s as listed, if old enough to vouch for
        self.cache_dirty = False

    # ---- open ------------------------------------------------------------------

    @classmethod
    def open(cls, settings, name):
        box = cls(settings, name, maildir_path(settings.mail_location, name))
        try:
            box.open_dirs()
            box.marker = session_lock.acquire(settings, name, os.path.join(box.path, LOCK_NAME))
            box.load()
        except (StoragePermError, StorageTempError, MailboxInUse):
            box.close()
            raise
        except OSError as e:
            box.close()
            raise _os_failure(name, "opening", e) from None
        except BaseException:
            box.close()
            raise
        return box

    def open_dirs(self):
        """The Maildir (its path may go through links: the administrator's),
        then new/ and cur/ inside it, never through a link; all owned by us."""
        try:
            self.root_fd = os.open(self.path, OPEN_DIR)
        except (FileNotFoundError, NotADirectoryError):
            log.error("%s: no Maildir at %s (never created by the server)", self.name, self.path)
            raise StoragePermError("no such mailbox") from None
        self.check_owner(self.root_fd, self.path)
        for sub in SUBDIRS:
            try:
                fd = os.open(sub, OPEN_DIR | os.O_NOFOLLOW, dir_fd=self.root_fd)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    raise
                try:
                    what = kind(os.lstat(sub, dir_fd=self.root_fd).st_mode)
                except OSError:
                    what = "missing"
                log.error("%s: %s/%s is %s, not a directory; refused", self.name, self.path, sub, what)
                raise StoragePermError("not a Maildir") from None
            self.dir_fds[sub] = fd
            self.check_owner(fd, f"{self.path}/{sub}")

    def check_owner(self, fd, where):
        st = os.fstat(fd)
        if os.geteuid() != 0 and st.st_uid != os.geteuid():
            # the mailbox's user opens it (wuMailbox), or the server's own
            # user serves every Maildir (mailbox_user any): not ours, not served
            log.error(
                "%s: %s belongs to uid %d, not to uid %d serving it; refused", self.name, where, st.st_uid, os.geteuid()
            )
            raise StoragePermError("the mailbox belongs to another user")

    def load(self):
        """The messages in new/ and cur/, each with its size, in delivery
        order. If neither directory changed since the cached listing was
        made (inode, mtime and ctime to the nanosecond, as Dovecot skips its
        scan on unchanged mtimes) it is the cached listing, read whole
        without a scan; else both are listed again, sizes from the names or
        the cache, counted only for names new to it."""
        cached = self.read_cache()
        stamps = self.dir_stamps()  # before listing: a change during it shows next time
        if cached is not None and cached.stamps is not None and cached.stamps == stamps:
            self.entries = Entries(cached.subs, cached.names)
            self.sizes = cached.sizes
            self.stamps = stamps
        else:
            self.scan(cached)
            self.stamps = stamps if self.vouched(stamps) else None
            if cached is None or self.stamps != cached.stamps or self.cache_dirty:
                self.write_cache()
        if self.settings.uidl_format == "dovecot":
            self.uidlist = uidlist.read(self.root_fd, self.path)
            if self.uidlist is not None:
                self.dovecot_order()

    def dir_stamps(self):
        out = []
        for sub in SUBDIRS:
            st = os.fstat(self.dir_fds[sub])
            out.append((st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(out)

    @staticmethod
    def vouched(stamps):
        """Whether both directories last changed long enough ago that a
        change now must give them other stamps (see TRUST_AFTER_NS)."""
        limit = time.time_ns() - TRUST_AFTER_NS
        return all(mtime <= limit and ctime <= limit for _, mtime, ctime in stamps)

    def scan(self, cached):
        what = "first scan" if cached is None else "scan"
        progress = Progress(log, f"mailbox {self.name}: {what}", MESSAGES)
        known = dict(zip(map(base_of, cached.names), cached.sizes, strict=True)) if cached is not None else {}
        found = []
        listed = self.listing()
        total = len(listed)
        for i, (sub, name) in enumerate(listed):
            if i % PROGRESS_BATCH == 0:
                progress(i, total)
            key, base, size = name_info(name)
            if size < 0:
                size = known.get(base)
                if size is None:
                    size = self.compute_size(sub, name)
                    if size is None:
                        continue  # gone meanwhile
            found.append((key, SUBDIRS.index(sub), name, size))
        progress(total, total)
        found.sort(key=itemgetter(0))
        self.entries = Entries(bytearray(f[1] for f in found), [f[2] for f in found])
        self.sizes = [f[3] for f in found]
        if cached is None or self.entries.names != cached.names or self.sizes != cached.sizes:
            self.cache_dirty = True

    def dovecot_order(self):
        """Messages Dovecot listed first, in its UID order; the others after
        them in delivery order."""
        lookup = self.uidlist.lookup
        names = self.entries.names

        def key(i):
            rec = lookup(base_of(names[i]))
            return (0, rec[0], i) if rec else (1, 0, i)

        order = sorted(range(len(names)), key=key)
        self.entries = Entries(bytearray(self.entries.subs[i] for i in order), [names[i] for i in order])
        self.sizes = [self.sizes[i] for i in order]

    def listing(self):
        """(subdir, name) of every regular file of new/ and cur/ whose name
        is not odd; what is skipped is logged."""
        out = []
        odd = _ODD.search
        for sub in SUBDIRS:
            with os.scandir(self.dir_fds[sub]) as it:
                for e in it:
                    n = e.name
                    if n[0] == "." or odd(n):
                        if n[0] != ".":
                            where = f"{self.path}/{sub}/{n!r}"
                            log.warning("%s: %s: odd characters in the name; skipped", self.name, where)
                        continue
                    if not e.is_file(follow_symlinks=False):
                        try:
                            what = kind(e.stat(follow_symlinks=False).st_mode)
                        except OSError:
                            continue
                        log.warning("%s: %s/%s/%s is %s, not a message; skipped", self.name, self.path, sub, n, what)
                        continue
                    out.append((sub, n))
        return out

    def compute_size(self, sub, name):
        """The size RETR will send, from the file's bytes; None if it vanished."""
        try:
            fd = os.open(name, OPEN_FILE, dir_fd=self.dir_fds[sub])
        except FileNotFoundError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            counter = SizeCounter()
            while data := os.read(fd, READ_SIZE):
                counter.feed(data)
            return counter.result()
        finally:
            os.close(fd)

    # ---- the sizes cache -----------------------------------------------------------

    def read_cache(self):
        """The cached listing (Cached), or None (logged) if it is missing,
        not ours, or not what we write."""
        try:
            fd = os.open(CACHE_NAME, OPEN_FILE, dir_fd=self.root_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("%s: %s/%s: %s; listed again", self.name, self.path, CACHE_NAME, e.strerror)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > CACHE_MAX:
                log.warning("%s: %s/%s is not a cache of ours; listed again", self.name, self.path, CACHE_NAME)
                return None
            chunks = []
            while chunk := os.read(fd, 1 << 22):
                chunks.append(chunk)
        finally:
            os.close(fd)
        try:
            return Cached.decode(b"".join(chunks))
        except (ValueError, IndexError, OverflowError):
            log.warning("%s: %s/%s is damaged or old; listed again", self.name, self.path, CACHE_NAME)
            return None

    def write_cache(self):
        """Replace the cache atomically (a new file renamed over it): the
        listing less what QUIT deleted, vouched for by the directories'
        stamps only if nothing changed them since they were listed. A
        cache: a failure is logged, and the next session lists again."""
        keep = [i for i in range(len(self.entries)) if i not in self.deleted]
        if len(keep) == len(self.entries):
            cached = Cached(self.stamps, self.sizes, self.entries.subs, self.entries.names)
        else:
            subs, names = self.entries.subs, self.entries.names
            cached = Cached(
                self.stamps, [self.sizes[i] for i in keep], bytearray(subs[i] for i in keep), [names[i] for i in keep]
            )
        if self.uidlist is not None:  # the cache is in delivery order
            order = sorted(range(len(cached.names)), key=lambda i: name_info(cached.names[i])[0])
            cached = Cached(
                cached.stamps,
                [cached.sizes[i] for i in order],
                bytearray(cached.subs[i] for i in order),
                [cached.names[i] for i in order],
            )
        tmp = CACHE_NAME + ".tmp"
        root = self.root_fd
        try:
            try:
                os.unlink(tmp, dir_fd=root)  # a crash's leftover; only a session (we) writes it
            except FileNotFoundError:
                pass
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=root)
            try:
                view = memoryview(cached.encode())
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, CACHE_NAME, src_dir_fd=root, dst_dir_fd=root)
            self.cache_dirty = False
        except OSError as e:
            log.warning("%s: cannot write %s/%s: %s", self.name, self.path, CACHE_NAME, e.strerror)

    # ---- unique ids --------------------------------------------------------------------

    def unique_ids(self):
        if self.uids is None:
            uids = []
            seen = set()
            lookup = self.uidlist.lookup if self.uidlist is not None else None
            for sub, name in self.entries:
                base = base_of(name)
                rec = lookup(base) if lookup else None
                uid = rec[1] if rec else filename_uidl(base)
                if uid in seen:  # the same base in new/ and cur/: a copy gone wrong
                    log.warning("%s: %s found twice in %s", self.name, base, self.path)
                    uid = filename_uidl(f"{sub}/{name}\0")
                seen.add(uid)
                uids.append(uid)
            self.uids = uids
        return self.uids

    # ---- RETR and TOP ----------------------------------------------------------------

    def relocate(self, index):
        """Message `index` by its base name again (another client may have
        renamed it, new/ to cur/ or its flags): the new (subdir, name), or None."""
        base = base_of(self.entries[index][1])
        for sub in reversed(SUBDIRS):
            with os.scandir(self.dir_fds[sub]) as it:
                for e in it:
                    if base_of(e.name) == base and e.is_file(follow_symlinks=False):
                        self.entries[index] = (sub, e.name)
                        return sub, e.name
        return None

    def open_message(self, index):
        for _ in range(2):
            sub, name = self.entries[index]
            try:
                fd = os.open(name, OPEN_FILE, dir_fd=self.dir_fds[sub])
            except FileNotFoundError:
                if self.relocate(index) is None:
                    break
                continue
            except OSError as e:
                log.error("%s: message %d (%s/%s): %s; refused", self.name, index + 1, sub, name, e.strerror)
                raise StoragePermError("message unreadable") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                log.error("%s: message %d (%s/%s) is no longer a regular file", self.name, index + 1, sub, name)
                raise StoragePermError("message unreadable")
            return fd
        log.warning("%s: message %d (%s) vanished during the session", self.name, index + 1, base_of(name))
        raise MessageGone("message gone")

    def dump(self, index, body_lines):
        """The message's wire form in bounded chunks (RETR: body_lines None)."""
        fd = self.open_message(index)
        try:
            writer = DotWriter(body_lines)
            counter = SizeCounter() if body_lines is None else None
            while not writer.done:
                try:
                    data = os.read(fd, READ_SIZE)
                except OSError as e:
                    log.error("%s: reading message %d failed: %s", self.name, index + 1, e.strerror)
                    raise StorageTempError("cannot read the mailbox") from None
                if not data:
                    break
                if counter is not None:
                    counter.feed(data)
                out = writer.feed(data)
                if out:
                    yield out
            yield writer.finish()
            if counter is not None:
                self.retrieved.add(index)
                self.check_size(index, counter)
        finally:
            os.close(fd)

    def check_size(self, index, counter):
        """A size LIST told that RETR did not keep: logged, and the cache
        forgets it, so the next session has it right. A `,W=` that leaves
        out the CRLF RETR adds to a last line without one is Dovecot's
        count (its LDA's names, its LIST): kept, as Dovecot keeps it."""
        sent = counter.result()
        if sent == self.sizes[index]:
            return
        sub, name = self.entries[index]
        base = base_of(name)
        named = name_info(name)[2] >= 0  # the size is the name's ,W=, not the cache's
        if named and counter.last != 0x0A and sent == self.sizes[index] + 2:
            return
        log.warning(
            "%s: message %d (%s) is %d octets, not the %d listed; %s",
            self.name,
            index + 1,
            base,
            sent,
            self.sizes[index],
            "its ,W= is wrong" if named else "the sizes cache is corrected",
        )
        if not named:
            self.sizes[index] = sent
            self.cache_dirty = True

    # ---- QUIT ---------------------------------------------------------------------

    def remove(self, deleted):
        """QUIT: unlink what was deleted (a file already gone counts as
        done), fsync the directories, update maildirsize. Each change is one
        unlink: a crash at any instant leaves every kept message whole and
        each deleted one present or gone."""
        self.marker.check()  # the session lock may have gone with its database connection
        deleted = sorted({i for i in deleted if 0 <= i < len(self.entries)})
        self.deleted.update(deleted)
        quota_fd = self.open_maildirsize() if deleted else None
        freed_bytes = freed = 0
        touched = set()
        try:
            for i in deleted:
                for attempt in range(2):
                    sub, name = self.entries[i]
                    size = self.file_size(sub, name) if quota_fd is not None else 0
                    try:
                        os.unlink(name, dir_fd=self.dir_fds[sub])
                    except FileNotFoundError:
                        if attempt == 0 and self.relocate(i) is not None:
                            continue
                        break  # gone already: done
                    freed += 1
                    freed_bytes += size or 0
                    touched.add(sub)
                    _step("unlink")
                    break
            for sub in touched:
                os.fsync(self.dir_fds[sub])
                _step("fsync")
            if quota_fd is not None and freed:
                os.write(quota_fd, b"%d %d\n" % (-freed_bytes, -freed))
                _step("maildirsize")
        except OSError as e:
            raise _os_failure(self.name, "committing deletions", e) from None
        finally:
            if quota_fd is not None:
                os.close(quota_fd)
        if deleted:
            self.stamps = None  # changed by us, and maybe by others meanwhile
            self.cache_dirty = True
        if self.cache_dirty:
            self.write_cache()
            _step("cache")
        if deleted:
            log.info("%s: %d message(s) deleted", self.name, freed)

    def move_to_cur(self, indexes):
        """new/NAME -> cur/NAME:2,S for each retrieved message still in new/.

        At the end of every session, QUIT or not, as Dovecot saves \\Seen
        (the core releases a mailbox whose QUIT deleted nothing without
        calling storage_synch). Not fsynced: a move a crash loses leaves
        the message in new/, unread again, and nothing else."""
        for i in sorted(indexes):
            sub, name = self.entries[i]
            if sub != "new":
                continue
            base, _, info = name.partition(":")
            flags = set(info[2:]) if info.startswith("2,") else set()
            target = f"{base}:2,{''.join(sorted(flags | {'S'}))}"
            try:
                os.rename(name, target, src_dir_fd=self.dir_fds["new"], dst_dir_fd=self.dir_fds["cur"])
            except FileNotFoundError:
                continue  # moved or removed by someone else meanwhile
            self.entries[i] = ("cur", target)
            self.stamps = None
            self.cache_dirty = True
            _step("rename")

    def open_maildirsize(self):
        """MAILDIR/maildirsize (Maildir++ quota) open for appending, if it is there."""
        try:
            flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open("maildirsize", flags, dir_fd=self.root_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("%s: %s/maildirsize: %s; not updated", self.name, self.path, e.strerror)
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd

    def file_size(self, sub, name):
        """Bytes the quota counts: `,S=` in the name, else the file's size."""
        m = _S.search(base_of(name))
        if m:
            return int(m.group(1))
        try:
            return os.stat(name, dir_fd=self.dir_fds[sub], follow_symlinks=False).st_size
        except FileNotFoundError:
            return None

    # ---- close ------------------------------------------------------------------------

    def close(self):
        if self.marker is not None and self.dir_fds:
            if self.settings.maildir_move_to_cur and self.retrieved - self.deleted:
                try:
                    self.move_to_cur(self.retrieved - self.deleted)
                except OSError as e:
                    log.warning("%s: moving retrieved mail to cur/ failed: %s", self.name, e)
            if self.cache_dirty:
                self.write_cache()  # a size RETR corrected
        for fd in self.dir_fds.values():
            os.close(fd)
        self.dir_fds = {}
        if self.marker is not None:
            self.marker.release()
            self.marker = None
        if self.root_fd is not None:
            os.close(self.root_fd)
            self.root_fd = None


def _os_failure(name, doing, e):
    log.error("%s: %s failed: %s", name, doing, e)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoragePermError("permission denied")
    return StorageTempError("temporary storage failure")
