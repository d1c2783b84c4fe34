# cython: cdivision=True
"""mbox kernels: find the messages of a spool, size and name them, and write
them out the way POP3 wants them (docs/mbox.md, "What a client sees").

The rules, shared word for word with the plain-Python twin in
mpop3/mbox/kernels_reference.py (the tests hold the two to the same bytes):

- A message starts at a line beginning "From " at offset 0 or right after an
  empty line ("\\n" or "\\r\\n"). Bytes before the first such line (a spool
  that does not start with "From ") form a message without a From line.
- A line ends at "\\n"; a "\\r" right before it is part of the line end, any
  other "\\r" and every NUL is data.
- A message's content runs from after its From line up to the next message,
  minus one trailing empty line: the separator the mbox format adds (at the
  end of the file too, so a message's content does not change when mail is
  appended after it).
- Its size is what RETR sends before dot-stuffing: every line end as CRLF,
  a last line without "\\n" ended by CRLF too.
- Its hash covers the From line and the header up to and including the first
  empty line (the whole message if there is none), plus the size. The unique
  id is the hash in hex, suffixed "-N" for the N-th earlier message of the
  mailbox with the same hash (byte-identical duplicates).

Kernels (cdef ... nogil) touch no Python objects and raise nothing; the def
shells around them own buffers, build bytes and raise. The structs and
classes are declared in _kernels.pxd, which says how they relate.
"""

import os

from cpython.bytes cimport PyBytes_AS_STRING
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memchr, memcpy, memset
from posix.unistd cimport pread

cdef extern from "Python.h":
    PyObject *PyBytes_FromStringAndSize_raw "PyBytes_FromStringAndSize"(const char *, Py_ssize_t)
    int _PyBytes_Resize(PyObject **, Py_ssize_t) except -1

cdef extern from "errno.h":
    int errno
    int EINTR

# The message hash: 64-bit, word at a time, streaming (the same value
# whatever the read sizes), little-endian whatever the host.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint64_t mbox_load_le64(const char *p) {
        uint64_t w;
        memcpy(&w, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
    #endif
        return w;
    }
    static inline uint64_t mbox_rotl64(uint64_t x, int r) {
        return (x << r) | (x >> (64 - r));
    }
    static inline uint64_t mbox_fmix64(uint64_t k) {
        k ^= k >> 33; k *= 0xff51afd7ed558ccdULL;
        k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53ULL;
        k ^= k >> 33;
        return k;
    }
    static inline uint64_t mbox_mix(uint64_t h, uint64_t w) {
        w *= 0x87c37b91114253d5ULL; w = mbox_rotl64(w, 31); w *= 0x4cf5ad432745937fULL;
        h ^= w;
        return mbox_rotl64(h, 27) * 5 + 0x52dce729ULL;
    }
    """
    uint64_t mbox_load_le64(const char *p) noexcept nogil
    uint64_t mbox_fmix64(uint64_t k) noexcept nogil
    uint64_t mbox_mix(uint64_t h, uint64_t w) noexcept nogil

# RETR's body, the bulk of the bytes: LF to CRLF and dot-stuffing only (no
# line counting). SSE2 copies 16 bytes at a time and stops only at a LF; the
# portable version does the same a line at a time with memchr. dst holds
# 2 * n + 16 bytes (blocks are stored whole, then overwritten).
cdef extern from *:
    """
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    static Py_ssize_t mbox_stuff_body(const char *src, Py_ssize_t n, char *dst, char *last_io) {
        Py_ssize_t i = 0, o = 0;
        const char last0 = *last_io;
        const char *lf;
    #define MBOX_PREV(i) ((i) > 0 ? src[(i) - 1] : last0)
        while (i < n) {
            if (MBOX_PREV(i) == '\\n' && src[i] == '.')    /* a line starts with "." */
                dst[o++] = '.';
    #if defined(__SSE2__)
            while (i + 16 <= n) {
                __m128i v = _mm_loadu_si128((const __m128i *)(src + i));
                int mask = _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8('\\n')));
                _mm_storeu_si128((__m128i *)(dst + o), v);
                if (mask) {
                    int b = __builtin_ctz((unsigned)mask);
                    i += b;
                    o += b;
                    goto at_lf;
                }
                i += 16;
                o += 16;
            }
    #endif
            lf = (const char *)memchr(src + i, '\\n', (size_t)(n - i));
            if (lf == NULL) {                             /* the line goes on */
                memcpy(dst + o, src + i, (size_t)(n - i));
                o += n - i;
                break;
            }
            memcpy(dst + o, src + i, (size_t)(lf - (src + i)));
            o += lf - (src + i);
            i = lf - src;
    #if defined(__SSE2__)
        at_lf:
    #endif
            if (MBOX_PREV(i) != '\\r')                     /* a bare LF */
                dst[o++] = '\\r';
            dst[o++] = '\\n';
            i++;
        }
        *last_io = n > 0 ? src[n - 1] : last0;
        return o;
    #undef MBOX_PREV
    }

    /* memchr(p, '\\n', n) for the short lines of mail: inline, no call. */
    static inline const char *mbox_find_lf(const char *p, Py_ssize_t n) {
    #if defined(__SSE2__)
        const char *end = p + n;
        while (end - p >= 16) {
            int mask = _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)p),
                                                         _mm_set1_epi8('\\n')));
            if (mask)
                return p + __builtin_ctz((unsigned)mask);
            p += 16;
        }
        n = end - p;
    #endif
        return (const char *)memchr(p, '\\n', (size_t)n);
    }
    """
    const char *mbox_find_lf(const char *p, Py_ssize_t n) noexcept nogil
    Py_ssize_t mbox_stuff_body(const char *src, Py_ssize_t n, char *dst, char *last_io) noexcept nogil

cdef enum:
    HASH_SEED = 0x6d706f7033   # "mpop3"
    READ_SIZE = 1 << 18        # scanning reads; memory stays bounded
    DUMP_READ = 64 * 1024      # RETR/TOP reads: one chunk per next()


cdef inline void hash_init(HashState *hs) noexcept nogil:
    hs.h = HASH_SEED
    hs.carry = 0
    hs.carry_n = 0
    hs.length = 0


cdef void hash_update(HashState *hs, const char *p, Py_ssize_t n) noexcept nogil:
    hs.length += <uint64_t>n
    while n > 0 and hs.carry_n > 0:          # finish the word a short read left
        hs.carry |= (<uint64_t>(<unsigned char>p[0])) << (8 * hs.carry_n)
        hs.carry_n += 1
        p += 1
        n -= 1
        if hs.carry_n == 8:
            hs.h = mbox_mix(hs.h, hs.carry)
            hs.carry = 0
            hs.carry_n = 0
    while n >= 8:
        hs.h = mbox_mix(hs.h, mbox_load_le64(p))
        p += 8
        n -= 8
    while n > 0:
        hs.carry |= (<uint64_t>(<unsigned char>p[0])) << (8 * hs.carry_n)
        hs.carry_n += 1
        p += 1
        n -= 1


cdef uint64_t hash_final(HashState *hs, uint64_t size) noexcept nogil:
    cdef uint64_t h = hs.h
    if hs.carry_n > 0:
        h = mbox_mix(h, hs.carry)
    h ^= hs.length
    h = mbox_mix(h, size)
    return mbox_fmix64(h)


# ---- the scan: one MsgEntry per message (the structs: _kernels.pxd) --------

cdef const char *FROM_ = b"From "


cdef int scan_push(ScanState *st) noexcept nogil:
    # Append st.cur to the index; -1 when out of memory.
    cdef Py_ssize_t cap
    cdef MsgEntry *grown
    if st.count == st.cap:
        cap = st.cap * 2 if st.cap else 1024
        grown = <MsgEntry *>PyMem_RawRealloc(st.msgs, cap * sizeof(MsgEntry))
        if grown is NULL:
            return -1
        st.msgs = grown
        st.cap = cap
    st.msgs[st.count] = st.cur
    st.count += 1
    return 0


cdef int scan_close(ScanState *st, int64_t end, bint trim, bint partial) noexcept nogil:
    # End the current message at `end`; `trim` drops a trailing empty line
    # (the mbox separator), `partial` says the last line has no LF.
    cdef int64_t bare = st.bare_lf
    if st.in_from_line:                    # the spool ends inside a From line
        st.cur.data = end
        bare = 0
        partial = False
    elif trim and st.prev_empty:
        end -= st.prev_empty_len
        bare -= st.prev_bare
    st.cur.end = end
    st.cur.size = (end - st.cur.data) + bare + (2 if partial else 0)
    st.cur.hash = hash_final(&st.hash, <uint64_t>st.cur.size)
    st.cur.dup = 0
    st.have_msg = 0
    return scan_push(st)


cdef int scan_begin(ScanState *st, bint has_from_line) noexcept nogil:
    # A message starts at st.line_start; close the one before it.
    if st.have_msg and scan_close(st, st.line_start, True, False) < 0:
        return -1
    st.have_msg = 1
    st.cur.start = st.line_start
    st.cur.data = st.line_start
    st.in_from_line = has_from_line
    st.in_header = 1
    st.bare_lf = 0
    st.prev_empty = 0
    hash_init(&st.hash)
    hash_update(&st.hash, FROM_, st.match)   # the bytes already matched
    return 0


cdef inline void scan_line_end(ScanState *st, int64_t after_lf, char before_lf) noexcept nogil:
    cdef int64_t line_len = after_lf - st.line_start
    cdef bint crlf = line_len >= 2 and before_lf == c'\r'
    cdef bint empty = line_len == 1 or (line_len == 2 and crlf)
    st.at_line_start = 1
    if st.in_from_line:
        st.in_from_line = 0
        st.cur.data = after_lf
        st.prev_empty = 0
        return
    if not crlf:
        st.bare_lf += 1
    if empty and st.in_header:
        st.in_header = 0
    st.prev_empty = empty
    st.prev_empty_len = <int>line_len
    st.prev_bare = not crlf


cdef int mbox_scan(ScanState *st, const char *buf, Py_ssize_t n) noexcept nogil:
    # Feed n bytes of the spool; any split works. -1 when out of memory.
    cdef Py_ssize_t i = 0, j
    cdef const char *lf
    while i < n:
        if st.at_line_start:
            st.at_line_start = 0
            st.line_start = st.offset + i
            st.candidate = st.line_start == 0 or st.prev_empty
            st.match = 0
        if st.candidate:
            while i < n and st.match < 5 and buf[i] == FROM_[st.match]:
                st.match += 1
                i += 1
            if st.match == 5:
                st.candidate = 0
                if scan_begin(st, True) < 0:
                    return -1
            elif i < n:                    # not a From line after all
                st.candidate = 0
                if not st.have_msg and scan_begin(st, False) < 0:
                    return -1
            else:
                break                      # undecided: wait for more bytes
        lf = mbox_find_lf(buf + i, n - i)
        j = n if lf is NULL else (lf - buf) + 1
        if st.in_header:
            hash_update(&st.hash, buf + i, j - i)
        if lf is NULL:
            break
        scan_line_end(st, st.offset + j, buf[j - 2] if j >= 2 else st.last_byte)
        i = j
    if n > 0:
        st.last_byte = buf[n - 1]
    st.offset += n
    return 0


cdef int mbox_scan_finish(ScanState *st) noexcept nogil:
    if st.candidate and not st.have_msg:   # a spool of a few bytes, no From line
        if scan_begin(st, False) < 0:
            return -1
    if st.have_msg:
        return scan_close(st, st.offset, st.at_line_start, not st.at_line_start)
    return 0


cdef int mbox_number_duplicates(MsgEntry *msgs, Py_ssize_t count) noexcept nogil:
    # msgs[i].dup = how many earlier messages share msgs[i].hash. An open
    # addressing table of (hash, seen) pairs, freed before returning.
    cdef Py_ssize_t cap = 16, i, slot
    cdef uint64_t *keys
    cdef uint32_t *seen
    while cap < 2 * count:
        cap *= 2
    keys = <uint64_t *>PyMem_RawMalloc(cap * sizeof(uint64_t))
    seen = <uint32_t *>PyMem_RawMalloc(cap * sizeof(uint32_t))
    if keys is NULL or seen is NULL:
        PyMem_RawFree(keys)
        PyMem_RawFree(seen)
        return -1
    memset(seen, 0, cap * sizeof(uint32_t))
    for i in range(count):
        slot = <Py_ssize_t>(msgs[i].hash & <uint64_t>(cap - 1))
        while seen[slot] and keys[slot] != msgs[i].hash:
            slot = (slot + 1) & (cap - 1)
        keys[slot] = msgs[i].hash
        msgs[i].dup = seen[slot]
        seen[slot] += 1
    PyMem_RawFree(keys)
    PyMem_RawFree(seen)
    return 0


# ---- the Python face of the index ------------------------------------------

cdef class MboxIndex:
    """The messages of one scanned spool: offsets, sizes, unique ids.

    48 bytes a message (with padding), in one C array; the per-message Python objects
    (sizes, ids) are made only when asked for.
    """

    def __dealloc__(self):
        PyMem_RawFree(self.msgs)

    def __len__(self):
        return self.count

    cdef MsgEntry *entry(self, Py_ssize_t i) except NULL:
        if i < 0 or i >= self.count:
            raise IndexError("no such message")
        return &self.msgs[i]

    def start(self, Py_ssize_t i):
        """Offset of the message's From line: where its record begins."""
        return self.entry(i).start

    def data(self, Py_ssize_t i):
        """Offset of the content (after the From line)."""
        return self.entry(i).data

    def end(self, Py_ssize_t i):
        """Offset just past the content (before the separator)."""
        return self.entry(i).end

    def record_end(self, Py_ssize_t i):
        """Offset where the next record begins (or the scanned length)."""
        self.entry(i)
        return self.msgs[i + 1].start if i + 1 < self.count else self.length

    def size(self, Py_ssize_t i):
        return self.entry(i).size

    def uid(self, Py_ssize_t i):
        return mbox_uid(self.entry(i))

    @property
    def nbytes(self):
        """Memory the index holds, for the per-message budget."""
        return self.count * sizeof(MsgEntry)

    @property
    def uids(self):
        """Every message's unique id, in order."""
        cdef Py_ssize_t i
        return [mbox_uid(&self.msgs[i]) for i in range(self.count)]


cdef const char *HEX_DIGITS = b"0123456789abcdef"


cdef str mbox_uid(const MsgEntry *m):
    # The hash in 16 lowercase hex digits, "-N" for the N-th earlier message
    # with the same hash: at most 27 characters. Written out by hand, which
    # costs less than snprintf() or a Python format.
    cdef char buf[32]
    cdef char *p = buf + 32
    cdef uint64_t h = m.hash
    cdef uint32_t dup = m.dup
    cdef int k
    while dup:
        p -= 1
        p[0] = <char>(c'0' + dup % 10)
        dup //= 10
    if m.dup:
        p -= 1
        p[0] = c'-'
    for k in range(16):
        p -= 1
        p[0] = HEX_DIGITS[h & 15]
        h >>= 4
    return PyUnicode_DecodeASCII(p, buf + 32 - p, NULL)


cdef MboxIndex _index_from(ScanState *st):
    # Move the scan's array into an index, trimmed to size (the budget is
    # per message, so no doubling slack stays behind).
    cdef MboxIndex index = MboxIndex.__new__(MboxIndex)
    cdef MsgEntry *fitted
    if mbox_number_duplicates(st.msgs, st.count) < 0:
        raise MemoryError()
    if st.count and st.count < st.cap:
        fitted = <MsgEntry *>PyMem_RawRealloc(st.msgs, st.count * sizeof(MsgEntry))
        if fitted is not NULL:
            st.msgs = fitted
    index.msgs = st.msgs
    index.count = st.count
    index.length = st.offset
    st.msgs = NULL
    st.count = st.cap = 0
    return index


cdef class Scanner:
    """Index a spool fed in pieces of any size (tests cut at every point)."""

    def __cinit__(self):
        memset(&self.st, 0, sizeof(ScanState))
        self.st.at_line_start = 1

    def __dealloc__(self):
        PyMem_RawFree(self.st.msgs)

    def feed(self, data):
        cdef const char *p = data
        cdef Py_ssize_t n = len(data)
        cdef int rc
        with nogil:
            rc = mbox_scan(&self.st, p, n)
        if rc < 0:
            raise MemoryError()

    def finish(self):
        if mbox_scan_finish(&self.st) < 0:
            raise MemoryError()
        return _index_from(&self.st)


def scan_fd(int fd, int64_t length):
    """Index the first `length` bytes of the open spool `fd` (pread: the file
    offset is untouched). Raises OSError on a read error, EOFError if the
    file is shorter than `length`."""
    cdef ScanState st
    cdef char *buf = <char *>PyMem_RawMalloc(READ_SIZE)
    cdef Py_ssize_t got = 0
    cdef int64_t pos = 0
    cdef int err = 0, rc = 0
    if buf is NULL:
        raise MemoryError()
    memset(&st, 0, sizeof(ScanState))
    st.at_line_start = 1
    try:
        with nogil:
            while pos < length:
                got = pread(fd, buf, <size_t>min(<int64_t>READ_SIZE, length - pos), pos)
                if got < 0:
                    if errno == EINTR:
                        continue
                    err = errno
                    break
                if got == 0:
                    break
                if mbox_scan(&st, buf, got) < 0:
                    rc = -1
                    break
                pos += got
            if err == 0 and rc == 0 and pos == length:
                rc = mbox_scan_finish(&st)
        if err:
            raise OSError(err, "reading the spool")
        if rc < 0:
            raise MemoryError()
        if pos != length:
            raise EOFError("the spool shrank while it was being read")
        return _index_from(&st)
    finally:
        PyMem_RawFree(buf)
        PyMem_RawFree(st.msgs)


# ---- RETR and TOP output ----------------------------------------------------

cdef Py_ssize_t dot_write(DotState *st, const char *src, Py_ssize_t n, char *dst) noexcept nogil:
    # Content bytes in, wire bytes out: line ends to CRLF, "." stuffed at a
    # line start. dst holds 2 * n + 16 bytes. Stops once TOP has its lines.
    cdef Py_ssize_t i = 0, o = 0, j, k
    cdef const char *lf
    cdef bint crlf, empty
    while i < n and not st.done:
        if not st.in_header and st.body_left < 0:   # RETR's body: the fast path
            o += mbox_stuff_body(src + i, n - i, dst + o, &st.last)
            st.at_line_start = st.last == c'\n'
            break
        if st.at_line_start:
            st.at_line_start = 0
            st.line_len = 0
            if src[i] == c'.':
                dst[o] = c'.'
                o += 1
        lf = <const char *>memchr(src + i, c'\n', <size_t>(n - i))
        j = n if lf is NULL else lf - src
        k = j - i
        memcpy(dst + o, src + i, <size_t>k)
        o += k
        st.line_len += k
        if k:
            st.last = src[j - 1]
        if lf is NULL:
            break
        st.line_len += 1
        crlf = st.line_len >= 2 and st.last == c'\r'
        if not crlf:
            dst[o] = c'\r'
            o += 1
        dst[o] = c'\n'
        o += 1
        st.last = c'\n'
        st.at_line_start = 1
        i = j + 1
        empty = st.line_len == 1 or (st.line_len == 2 and crlf)
        if st.in_header:
            if empty:
                st.in_header = 0
                st.done = st.body_left == 0
        elif st.body_left > 0:
            st.body_left -= 1
            st.done = st.body_left == 0
    return o


cdef class DotWriter:
    """One message's content in, its RETR/TOP wire form out, in chunks."""

    def __cinit__(self, body_lines=None):
        self.st.at_line_start = 1
        self.st.last = c'\n'
        self.st.line_len = 0
        self.st.in_header = 1
        self.st.body_left = -1 if body_lines is None else max(0, body_lines)
        self.st.done = 0

    @property
    def done(self):
        """True once TOP has sent its lines: read no further."""
        return bool(self.st.done)

    def feed(self, data):
        cdef const char *src = data
        cdef Py_ssize_t n = len(data)
        cdef PyObject *raw = PyBytes_FromStringAndSize_raw(NULL, 2 * n + 16)
        cdef Py_ssize_t used
        cdef char *dst
        if raw is NULL:
            raise MemoryError()
        dst = PyBytes_AS_STRING(<object>raw)
        with nogil:
            used = dot_write(&self.st, src, n, dst)
        _PyBytes_Resize(&raw, used)        # frees raw and raises on failure
        out = <object>raw
        Py_DECREF(out)
        return out

    def finish(self):
        if not self.st.done and not self.st.at_line_start:
            return b"\r\n.\r\n"            # the last line had no line end
        return b".\r\n"


def dump(int fd, int64_t start, int64_t end, body_lines=None):
    """Yield the wire form of the content at [start, end) of `fd`: one pread
    and one transform per next(), so a huge message never sits in memory."""
    writer = DotWriter(body_lines)
    pos = start
    while pos < end and not writer.done:
        chunk = os.pread(fd, min(DUMP_READ, end - pos), pos)
        if not chunk:
            raise EOFError("the spool shrank under a RETR")
        pos += len(chunk)
        out = writer.feed(chunk)
        if out:
            yield out
    yield writer.finish()


# ---- commit helpers -----------------------------------------------------------

cdef extern from "fcntl.h" nogil:
    int sync_file_range(int fd, int64_t offset, int64_t nbytes, unsigned int flags)
    unsigned int SYNC_FILE_RANGE_WRITE


def start_writeback(int fd, int64_t offset, int64_t length):
    """Ask the kernel to start writing these dirty pages now (no waiting), so
    the fsync that follows a long copy has little left to do. A hint: errors
    are ignored, the fsync is what counts."""
    with nogil:
        sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)
