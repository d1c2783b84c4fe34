# distutils: libraries = crypt
"""crypt(3) and crypt_gensalt through libcrypt (libxcrypt): yescrypt, SHA-512, bcrypt, ...

Hashing is slow on purpose, so it runs without the GIL.
"""

from libc.stdlib cimport calloc, free


cdef extern from "<crypt.h>" nogil:
    struct crypt_data:
        pass
    char *crypt_r(const char *phrase, const char *setting, crypt_data *data)


def crypt(password, setting):
    """Hash `password` (bytes) with `setting` (bytes: a hash or a salt string).

    Returns the hash as bytes, or None if libcrypt refuses the setting (an
    unknown or malformed hash).
    """
    cdef bytes phrase = bytes(password)
    cdef bytes salt = bytes(setting)
    if b"\0" in phrase or b"\0" in salt:
        return None
    cdef const char *c_phrase = phrase
    cdef const char *c_salt = salt
    cdef char *out
    cdef bytes result = None
    cdef crypt_data *data = <crypt_data *>calloc(1, sizeof(crypt_data))
    if data == NULL:
        raise MemoryError()
    try:
        with nogil:
            out = crypt_r(c_phrase, c_salt, data)
        # libxcrypt answers a failure with NULL or with a string starting "*"
        if out != NULL and out[0] != b'*':
            result = out
    finally:
        free(data)
    return result


cdef extern from "<crypt.h>" nogil:
    char *crypt_gensalt_rn(const char *prefix, unsigned long count,
                           const char *rbytes, int nrbytes, char *output, int output_size)
    enum: CRYPT_GENSALT_OUTPUT_SIZE


def gensalt(prefix=None):
    """A fresh setting for crypt(): the system's preferred method (yescrypt
    on Debian) when `prefix` is None, else that method (b"$6$", ...)."""
    cdef char output[CRYPT_GENSALT_OUTPUT_SIZE]
    cdef bytes p
    cdef const char *c_prefix = NULL
    if prefix is not None:
        p = bytes(prefix)
        c_prefix = p
    if crypt_gensalt_rn(c_prefix, 0, NULL, 0, output, CRYPT_GENSALT_OUTPUT_SIZE) == NULL:
        raise ValueError(f"libcrypt does not know the hash method {prefix!r}")
    return <bytes>output
