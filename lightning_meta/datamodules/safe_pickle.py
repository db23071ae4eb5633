"""Loading pickled dataset files without running code from them.

miniImageNet's ``mini-imagenet-cache-*.pkl``, tieredImageNet's ``*_images_png.pkl`` / ``*_labels.pkl``,
CIFAR-100's python files and LEO's ``*_embeddings.pkl`` are pickles that users download by hand, often
from re-packaged copies. Unpickling with :func:`pickle.load` calls any importable function the file names
(``os.system``, ``builtins.eval``, ...), so a tampered copy runs code on the machine that reads it.

:func:`load_dataset_pickle` is the one reader of all these files. It is a :class:`pickle.Unpickler`
whose :meth:`~pickle.Unpickler.find_class` resolves only the few globals that these formats contain
and refuses every other one with :class:`UnsafePickleError`, naming the file and the global. That is
the mechanism the Python documentation gives for restricting globals ("Restricting Globals" in the
:mod:`pickle` docs): the pickle virtual machine can only call what ``find_class`` returned (plain
containers, strings, bytes and numbers are built by opcodes that call nothing), and the C unpickler
also routes the ``INST``/``OBJ`` and extension-registry opcodes through ``find_class``; persistent ids
are refused. It was chosen over ``torch.load(weights_only=True)``'s unpickler because that one is a
private torch module (``torch._weights_only_unpickler``) reimplementing the pickle machine in Python
(slow on tieredImageNet's half-million-item lists) and ``torch.load`` itself only accepts torch's own
file formats; numpy's ``allow_pickle=False`` formats (``.npy``/``.npz``) do not apply because the
released files are pickles.

What the formats contain, hence what is allowed:

* dicts, lists, tuples, ``str``, ``bytes``, ints, floats, bools, ``None`` (opcodes only);
* numpy arrays, dtypes and scalars: ``numpy.ndarray``, ``numpy.dtype``, ``_reconstruct`` and ``scalar``
  from ``numpy.core.multiarray`` (numpy 1.x, also what Python 2 wrote) or ``numpy._core.multiarray``
  (numpy 2), and ``_frombuffer`` from ``numpy.core.numeric`` / ``numpy._core.numeric`` (pickle protocol 5);
* ``bytes`` / ``bytearray`` (``builtins`` or Python 2's ``__builtin__``) and ``_codecs.encode`` restricted
  to the ``latin1`` codec: how Python 3 writes ``bytes`` at protocols 0-2.

Python 2 pickles (CIFAR-100, LEO's release) are read with ``encoding="latin1"`` by default: their
``str`` become Python 3 ``str`` and numpy reads its array buffers from them unchanged.
"""

from __future__ import annotations

import functools
import os
import pickle
from typing import IO, Any, cast

import numpy as np

__all__ = ["ALLOWED_GLOBALS", "DatasetUnpickler", "UnsafePickleError", "load_dataset_pickle"]


class UnsafePickleError(pickle.UnpicklingError):
    """A dataset pickle asks for a global (function or class) that no dataset format contains.

    Attributes:
        source: the file (or ``archive:member``) that was refused.
        global_name: the refused ``module.name`` (empty for a persistent id).
    """

    def __init__(self, message: str, source: str = "", global_name: str = "") -> None:
        super().__init__(message)
        self.source, self.global_name = source, global_name


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict", *, source: str = "") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle ``bytes`` (latin1 only: no other codec is loaded)."""
    if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower().replace("_", "-") not in _LATIN1:
        raise UnsafePickleError(
            f"{source}: refused _codecs.encode({type(obj).__name__}, {encoding!r}): Python writes bytes into pickles "
            "as _codecs.encode(str, 'latin1') only; the file is not an original dataset file, download it again",
            source,
            "_codecs.encode",
        )
    return obj.encode("latin1", errors)


_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


class _Ndarray:
    """What ``numpy.ndarray`` resolves to: a token that only :func:`_reconstruct` accepts.

    numpy pickles name ``numpy.ndarray`` solely as the first argument of ``_reconstruct``. Calling the real
    class from a pickle could build an object array over raw bytes (pointers chosen by the file), so a direct
    call is refused.
    """

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(
            f"{self.source}: refused a direct call of numpy.ndarray (numpy pickles only pass it to _reconstruct); "
            "the file is not an original dataset file, download it again",
            self.source,
            "numpy.ndarray",
        )


def _reconstruct(subtype: Any, shape: Any, dtype: Any, *, source: str = "") -> np.ndarray:
    """numpy's ``_reconstruct`` for plain ``ndarray`` only (the state is then set by numpy's ``__setstate__``)."""
    if not isinstance(subtype, _Ndarray):
        raise UnsafePickleError(
            f"{source}: refused numpy _reconstruct of {type(subtype).__name__} (only numpy.ndarray is rebuilt); "
            "the file is not an original dataset file, download it again",
            source,
            "numpy.core.multiarray._reconstruct",
        )
    return cast(np.ndarray, _multiarray._reconstruct(np.ndarray, shape, dtype))


def _numpy_globals() -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): _Ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):  # numpy 1.x (and Python 2) spelling, numpy 2 spelling
        out[(f"{package}.multiarray", "_reconstruct")] = _reconstruct
        out[(f"{package}.multiarray", "scalar")] = _multiarray.scalar
        out[(f"{package}.numeric", "_frombuffer")] = _numeric._frombuffer  # type: ignore[attr-defined]
    return out


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_numpy_globals(),
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "bytes"): bytes,  # Python 2 module names, as protocols 0-2 write them
    ("__builtin__", "bytearray"): bytearray,
    ("_codecs", "encode"): _latin1_encode,
}
"""``(module, name)`` as written in the pickle -> what it resolves to; nothing else is resolved.

``numpy.ndarray``, ``_reconstruct`` and ``_codecs.encode`` resolve to guarded stand-ins (see :func:`_reconstruct`);
numpy's own ``ndarray.__setstate__``, ``scalar`` and ``_frombuffer`` refuse object arrays built from raw bytes.
"""


class DatasetUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only :data:`ALLOWED_GLOBALS`.

    Args:
        file: a binary stream.
        name: how errors name the source (a path, or ``archive:member``).
        encoding: how Python 2 ``str`` are decoded: ``"latin1"`` (default) or ``"bytes"`` (keep them bytes).
    """

    def __init__(self, file: IO[bytes], name: str, *, encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is _Ndarray:
            return _Ndarray(self.name)
        if obj is _latin1_encode or obj is _reconstruct:
            return functools.partial(obj, source=self.name)
        if obj is None:
            raise UnsafePickleError(
                f"{self.name}: refused to unpickle the global '{module}.{name}': dataset pickles hold only numpy "
                "arrays, dtypes, scalars and plain lists/dicts/strings/bytes/numbers, and loading this one would "
                "import and possibly call that object (pickles can run code). The file is not an original dataset "
                "file: delete it and download the data again from the official source",
                self.name,
                f"{module}.{name}",
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.name}: refused a persistent id ({pid!r}); dataset pickles have none", self.name)


def load_dataset_pickle(
    source: str | os.PathLike | IO[bytes], name: str | None = None, *, encoding: str = "latin1"
) -> Any:
    """Unpickle a dataset file with :class:`DatasetUnpickler` (no code from the file runs).

    Args:
        source: a path or a binary stream (e.g. a member of a tar archive).
        name: how errors name the source (default: the path).
        encoding: see :class:`DatasetUnpickler`.

    Raises:
        UnsafePickleError: the file names a global outside :data:`ALLOWED_GLOBALS`, naming the file and
            ``module.name``.
        pickle.UnpicklingError, EOFError, ValueError, ...: as :func:`pickle.load` on a corrupt file; callers
            turn those into their own "download it again" messages.

    Example:
        >>> import io, os
        >>> class Evil:
        ...     def __reduce__(self):
        ...         return os.system, ("echo pwned",)
        >>> try:
        ...     load_dataset_pickle(io.BytesIO(pickle.dumps(Evil())), "evil.pkl")
        ... except UnsafePickleError as e:
        ...     print(e.source, e.global_name)
        evil.pkl posix.system
        >>> load_dataset_pickle(io.BytesIO(pickle.dumps({"x": np.arange(3)}, protocol=2)), "ok.pkl")["x"].tolist()
        [0, 1, 2]
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            return DatasetUnpickler(fh, str(source) if name is None else name, encoding=encoding).load()
    return DatasetUnpickler(source, name or "<stream>", encoding=encoding).load()
