"""Checking hand-placed dataset files against the checksums their sources publish.

A mismatch is a :class:`ChecksumMismatchWarning` naming the file and the expected hash, not an error:
several re-packaged copies of the datasets are in use and read correctly. ``verify=True`` (on the
datamodules that have published checksums) turns it into an error.

A file's md5 is computed once and remembered in ``<cache_dir>/file-md5.json`` (the folder of the decoded
store cache), keyed by the file's resolved path, size and modification time, so later runs do not
re-read large files; editing or replacing the file changes its size or mtime and it is hashed again.
"""

from __future__ import annotations

import os
import warnings

from lightning_meta.datamodules.store import remembered_file_hash

__all__ = ["ChecksumMismatchWarning", "check_md5", "file_md5"]

_RECORD = "file-md5.json"


class ChecksumMismatchWarning(UserWarning):
    """A dataset file's md5 differs from the one its source publishes."""


def file_md5(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """The hex md5 of a file, hashed once per (path, size, mtime) and remembered in ``cache_dir``.

    Kept like the sha256s of the store cache (:func:`~lightning_meta.datamodules.store.remembered_file_hash`).

    Args:
        path: the file.
        cache_dir: where the record ``file-md5.json`` lives (default
            :func:`~lightning_meta.datamodules.store.default_cache_dir`); when it
            cannot be written the md5 is still returned, just not remembered.
    """
    return remembered_file_hash(path, "md5", _RECORD, cache_dir)


def check_md5(
    path: str | os.PathLike,
    expected: str,
    *,
    what: str,
    verify: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> bool:
    """Compare a file's md5 (see :func:`file_md5`) with the published one.

    Args:
        path: the file.
        expected: the published hex md5.
        what: what the file should be and where the hash comes from, for the message.
        verify: raise instead of warning on a mismatch.
        cache_dir: see :func:`file_md5`.

    Returns:
        Whether the md5 matches.

    Raises:
        ValueError: on a mismatch when ``verify`` is True, naming the file and both hashes.
    """
    actual = file_md5(path, cache_dir)
    if actual == expected:
        return True
    message = (
        f"{path} has md5 {actual}, but {what} has md5 {expected}: it is a re-packaged or modified copy, or corrupt"
    )
    if verify:
        raise ValueError(f"{message}; verify=True refuses it: download the original file, or pass verify=False")
    warnings.warn(
        f"{message}. It is read anyway (pickles are loaded without running code from them); pass verify=True to "
        "refuse such files",
        ChecksumMismatchWarning,
        stacklevel=2,
    )
    return False
