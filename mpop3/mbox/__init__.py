"""The mbox engine behind the storage_mbox module: the Cython kernels that
index a spool and write its messages out for RETR/TOP (_kernels, with its
plain-Python twin kernels_reference), the locks MDAs and other sessions
respect (lock), the crash-safe in-place commit (commit), and one session's
handle on a spool (spool). docs/mbox.md gives the rules, the unique-id
scheme, the locking and the crash-safety argument, and maps them to these
files.
"""
