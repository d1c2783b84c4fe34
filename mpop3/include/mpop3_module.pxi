# Included by every mpop3 module (`include "mpop3_module.pxi"`), so the
# module records the ABI version of the mpop3 it was compiled against.
# The loader compares it with its own and refuses a mismatch.
MPOP3_ABI_VERSION = 1

# And the Python it was compiled for, as a string in the file itself: a
# module built for another Python cannot even be imported, and the loader
# reads this to say so instead of repeating a linker's complaint.
cdef extern from *:
    """
    #define MPOP3_STR_(x) #x
    #define MPOP3_STR(x) MPOP3_STR_(x)
    __attribute__((used)) static const char mpop3_built_for_python[] =
        "mpop3-module-built-for-python:" MPOP3_STR(PY_MAJOR_VERSION) "." MPOP3_STR(PY_MINOR_VERSION) ";";
    """
