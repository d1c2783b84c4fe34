# Included by every mpop3 module (`include "mpop3_module.pxi"`), so the
# module records the ABI version of the mpop3 it was compiled against.
# The loader compares it with its own and refuses a mismatch.
MPOP3_ABI_VERSION = 1
