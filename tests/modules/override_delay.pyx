# The out-of-tree module of the module.mk test: overrides one auth function.
include "mpop3_module.pxi"

MPOP3_MODULE_CLASS = "auth"


def auth_login_delay_needed(user):
    return 42
