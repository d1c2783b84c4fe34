# A test auth module loaded second: it only supplies what the first lacks.
include "mpop3_module.pxi"

MPOP3_MODULE_CLASS = "auth"


def auth_password(user):
    return "second"


def auth_need_root():
    return True
