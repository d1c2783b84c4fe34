# A module whose initialisation refuses its settings.
include "mpop3_module.pxi"

from mpop3.errors import ModuleInitError

MPOP3_MODULE_CLASS = "storage"
MPOP3_SETTINGS = {"needed": "must be given"}


def module_init(settings):
    if "needed" not in settings:
        raise ModuleInitError("setting 'needed' is required")
