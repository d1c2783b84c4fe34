# A test auth module loaded first: its functions must win.
include "mpop3_module.pxi"

MPOP3_MODULE_CLASS = "auth"
MPOP3_SETTINGS = {"greeting": "a value handed back by auth_password"}

settings_seen = {}


def module_init(settings):
    settings_seen.clear()
    settings_seen.update(settings)


def auth_password(user):
    return "first:" + settings_seen.get("greeting", "")


def auth_login(user):
    return "first-mailbox"
