# A storage module with two mistakes a module writer makes: a misspelt
# table entry (storage_synk for storage_synch) and an auth function in a
# storage module. Neither would ever be called; the loader says so.
include "mpop3_module.pxi"

MPOP3_MODULE_CLASS = "storage"


def storage_message_count(handle):
    return 0


def storage_synk(handle, deleted):
    pass


def auth_password(user):
    return None
