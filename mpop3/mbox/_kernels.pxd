# The mbox kernels' declarations, for the extensions that cimport them
# (modules/storage_mbox.pyx) and as the table of contents of _kernels.pyx.
#
# How the pieces relate:
#
#   spool bytes --mbox_scan()--> ScanState --finish--> MboxIndex --> MsgEntry[count]
#   content bytes --dot_write()--> DotState --> RETR/TOP wire bytes
#
# - A scan (Scanner, fed in pieces, or scan_fd() on an open spool) walks the
#   spool once with a ScanState, which keeps the message being read in
#   `cur` (a MsgEntry, its hash running in a HashState) and appends each
#   finished one to a growing C array. finish() numbers the duplicates and
#   hands that array, trimmed, to an MboxIndex: the only thing a scan leaves.
# - An MboxIndex is immutable once made. Other extensions read its entries
#   directly, msgs[0] to msgs[count - 1], or through entry(i), which checks
#   the number (IndexError); mbox_uid() turns an entry into its UIDL string.
#   Python code uses its def methods (start(i), size(i), uid(i), ...).
# - A DotWriter turns one message's content into what RETR and TOP send,
#   keeping in a DotState what it must remember between chunks (the line it
#   is in, header or body, TOP's lines left); dump() drives it from the spool.
#
# The functions that work on ScanState and DotState stay private to
# _kernels.pyx: they are reached through Scanner, scan_fd(), DotWriter and
# dump(). All offsets are absolute byte offsets in the spool file.

from libc.stdint cimport int64_t, uint32_t, uint64_t


# One message of the index: 48 bytes with padding (docs/mbox.md, "Memory
# and speed"). Offsets: start <= data <= end; the record runs from start to
# the next entry's start (or the index's length).
ctypedef struct MsgEntry:
    int64_t start       # the From line (or 0 for a spool's leading junk)
    int64_t data        # the content, after the From line
    int64_t end         # end of the content (the separator excluded)
    int64_t size        # octets RETR sends, before dot-stuffing
    uint64_t hash       # the unique id's hash (docs/mbox.md, "Unique ids")
    uint32_t dup        # earlier messages with the same hash: the uid suffix


# The streaming message hash: the same value whatever the read sizes.
ctypedef struct HashState:
    uint64_t h
    uint64_t carry      # bytes not yet mixed (fewer than 8), little-endian
    int carry_n
    uint64_t length


# A scan in progress; any split of the spool into pieces gives the same index.
ctypedef struct ScanState:
    int64_t offset          # file offset of the next buffer's first byte
    int at_line_start
    int64_t line_start
    int candidate           # this line may be a From line
    int match               # bytes of "From " matched so far
    int in_from_line
    int in_header           # hashing: From line and header, up to the empty line
    int prev_empty          # the last complete line was empty ...
    int prev_empty_len      # ... this long ...
    int prev_bare           # ... and ended in a bare LF
    char last_byte          # the byte before the next buffer
    int have_msg
    int64_t bare_lf         # bare LFs in the current content (each adds a CR)
    HashState hash
    MsgEntry cur            # the message being read
    MsgEntry *msgs          # the finished ones, cap entries allocated
    Py_ssize_t count
    Py_ssize_t cap


# RETR/TOP output in progress, carried from one chunk to the next.
ctypedef struct DotState:
    int at_line_start
    char last               # the last source byte taken
    int64_t line_len        # source bytes of the current line so far
    int in_header
    int64_t body_left       # body lines still to send; -1: all of them
    int done


cdef class MboxIndex:
    cdef MsgEntry *msgs                 # count entries, in spool order; owned
    cdef Py_ssize_t count
    cdef readonly int64_t length        # bytes of the spool the scan covered

    cdef MsgEntry *entry(self, Py_ssize_t i) except NULL


cdef class Scanner:
    cdef ScanState st


cdef class DotWriter:
    cdef DotState st


# "9789a0b23871fb13", or "9789a0b23871fb13-1" for the first duplicate.
cdef str mbox_uid(const MsgEntry *m)
