"""storage_mbox: mbox spools (placeholder until the mbox engine lands)."""

include "mpop3_module.pxi"

MPOP3_MODULE_CLASS = "storage"
MPOP3_SETTINGS = {
    "storage_dir": "the spool directory, the C program's MBOX_ROOT (default /var/mail)",
}
