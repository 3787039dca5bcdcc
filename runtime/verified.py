"""Files already verified against their sha256, remembered by identity, so that loading an
artifact hashes its weights once, not on every start (issue 20: cold start).

A record is the sha256 of (real path, device, inode, size, mtime, ctime, expected digest), an
empty file in $AMXC_CACHE/verified (private to this user, like the kernel cache).  A write to
the file, a rename over it or a copy in its place changes its inode or its ctime, and ctime
cannot be set back by a user (utime sets mtime and atime only), so a changed file never matches
a record and is hashed again before its bytes are used.  Coarse timestamps: a write in the same
clock tick as the verification would keep the ctime, so a file changed less than RACY_SECONDS
before it was verified is not remembered (the "racily clean" rule of git's index).  Records
are also never written when the file changed while it was hashed.

AMXC_VERIFY=always hashes every time (and writes no records); any problem with the records
directory means hashing every time too, never trusting a file unhashed.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

RACY_SECONDS = 2.0


def _records() -> Path | None:
    from amxc.backends import env
    from amxc.backends.toolchain import CacheError, cache_dir

    if env.choice("AMXC_VERIFY") == "always":
        return None
    try:
        return cache_dir("verified")
    except CacheError:
        return None


def _key(path: Path, st: os.stat_result, digest: str) -> str:
    ident = "\0".join(map(str, (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                st.st_ctime_ns, digest)))
    return hashlib.sha256(ident.encode()).hexdigest()


def check(path: Path, digest: str, hash_file) -> bool:
    """Whether `path` has sha256 `digest`: from a record of this very file, else by
    `hash_file(path)` (remembered when it matches)."""
    records = _records()
    st = os.stat(path)
    key = _key(path, st, digest)
    if records is not None and (records / key).is_file():
        return True
    if hash_file(path) != digest:
        return False
    if records is not None and time.time() - st.st_ctime > RACY_SECONDS:
        after = os.stat(path)
        if (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) == \
                (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            try:
                fd = os.open(records / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
            except OSError:              # there already, or unwritable: the next load hashes again
                pass
    return True
