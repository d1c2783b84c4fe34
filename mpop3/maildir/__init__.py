"""The Maildir engine behind modules/storage_maildir.pyx (docs/maildir.md).

- settings.py: the module's `> name value` lines and where a mailbox's
  Maildir is (mail_location);
- names.py: what a message's file name says (delivery order, `,W=` size,
  the filename UIDL) and the CRLF size of a file counted from its bytes;
- uidlist.py: Dovecot's dovecot-uidlist, read only (uidl_format dovecot);
- box.py: one session's handle: lock, list, sizes cache, RETR/TOP through
  the mbox engine's CRLF and dot-stuffing kernel, and the commit at QUIT.
"""
