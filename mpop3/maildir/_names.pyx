# cython: language_level=3
"""The listing's hot path: what one Maildir file name says, in one pass.

name_info(name) -> (sort key, base, ,W= size or -1): the same answers as
names.delivery_key / base_of / size_in_name (the plain-Python reference,
held to them by tests/test_storage_maildir.py), for 100,000 names at once.
The sort key is (seconds, microseconds, counter, base): seconds, then
`M<usec>`, then `Q<n>` or `_<n>` in the unique part; a name without a time
sorts last.
"""

from libc.stdint cimport uint64_t

from .names import LAST

cdef inline bint digit(Py_UCS4 c) noexcept:
    return c >= u'0' and c <= u'9'


cdef uint64_t read_number(str s, Py_ssize_t i, Py_ssize_t end, int max_digits, Py_ssize_t *stop) noexcept:
    cdef uint64_t v = 0
    cdef int k = 0
    while i < end and digit(s[i]) and k < max_digits:
        v = v * 10 + (<uint64_t>s[i] - 48)
        i += 1
        k += 1
    stop[0] = i
    return v


def name_info(str name):
    cdef Py_ssize_t n = len(name), i, j, colon = -1, dot, stop
    cdef uint64_t secs = 0, usec = 0, seq = 0
    cdef int nd = 0
    cdef bint have_usec = False, have_seq = False
    cdef Py_UCS4 c
    cdef long long w = -1
    for i in range(n):
        if name[i] == u':':
            colon = i
            break
    if colon < 0:
        colon = n
    base = name if colon == n else name[:colon]
    # ,W=digits followed by ',' or the end of the base
    i = 0
    while i + 3 <= colon:
        if name[i] == u',' and name[i + 1] == u'W' and name[i + 2] == u'=':
            j = i + 3
            if j < colon and digit(name[j]):
                w = <long long>read_number(name, j, colon, 15, &stop)
                if stop == colon or name[stop] == u',':
                    break
                w = -1
        i += 1
    # seconds: 1-18 digits then '.'
    i = 0
    while i < colon and digit(name[i]) and nd < 19:
        secs = secs * 10 + (<uint64_t>name[i] - 48)
        i += 1
        nd += 1
    if nd == 0 or nd > 18 or i >= colon or name[i] != u'.':
        return ((LAST, 0, 0, base), base, w)
    dot = i + 1
    j = dot
    while j < colon and name[j] != u'.':
        j += 1
    # the unique part is [dot, j): the first M<digits>, the first Q<digits> or _<digits>
    i = dot
    while i < j:
        c = name[i]
        if not have_usec and c == u'M' and i + 1 < j and digit(name[i + 1]):
            usec = read_number(name, i + 1, j, 6, &stop)
            have_usec = True
        if not have_seq and (c == u'Q' or c == u'_') and i + 1 < j and digit(name[i + 1]):
            seq = read_number(name, i + 1, j, 12, &stop)
            have_seq = True
        i += 1
    return ((secs, usec, seq, base), base, w)


cdef extern from "string.h" nogil:
    const void *memchr(const void *s, int c, size_t n)


cdef class SizeCounter:
    """names.SizeCounter (its reference, held to the same answers at every
    split point by the tests) in one pass without the GIL: the size RETR
    sends for bytes fed in pieces, every line end CRLF, and a final line
    without one given one."""

    cdef public long long total
    cdef public long long bare_lf
    cdef public int last

    def __cinit__(self):
        self.total = 0
        self.bare_lf = 0
        self.last = 0x0A  # as if after a line end: an empty file is empty

    def feed(self, const unsigned char[:] data):
        cdef Py_ssize_t n = data.shape[0]
        cdef const unsigned char *p
        cdef const unsigned char *end
        cdef const unsigned char *q
        cdef long long bare = 0
        cdef int prev = self.last
        if n == 0:
            return
        p = &data[0]
        end = p + n
        with nogil:
            q = <const unsigned char *>memchr(p, 0x0A, n)
            while q != NULL:
                if q == p:
                    if prev != 0x0D:
                        bare += 1
                elif (q - 1)[0] != 0x0D:
                    bare += 1
                q = <const unsigned char *>memchr(q + 1, 0x0A, end - q - 1)
        self.bare_lf += bare
        self.total += n
        self.last = data[n - 1]

    def result(self):
        return self.total + self.bare_lf + (0 if self.last == 0x0A else 2)
