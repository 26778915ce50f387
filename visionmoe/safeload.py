"""Unpickling that runs no code: a pickle may name only the globals its format needs.

``pickle.load`` calls whatever a file names (``os.system`` included), so a pickle from a run
directory or a data folder is code. The files visionmoe reads that are not ``torch.save`` archives
(which load with ``weights_only=True``) are pickles of a known, small vocabulary: DCP's checkpoint
metadata (dataclasses of ``torch.distributed.checkpoint``, ``torch.Size``, dtypes) and the CIFAR
batches (dicts of bytes, lists and numpy arrays). :func:`restricted_load` finds only the globals a
format admits and refuses the file at its first other global, before anything is called: the
"Restricting Globals" recipe of the ``pickle`` documentation.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import IO, Any

Admits = Callable[[str, str], bool]


class RefusedPickle(pickle.UnpicklingError):
    """A pickle names a global its format never holds (and which could run code)."""


def restricted_load(file: IO[bytes], admits: Admits, *, source: str, what: str, encoding: str = "ASCII") -> Any:
    """``pickle.load(file)`` that finds only the globals ``admits(module, name)`` accepts.

    ``source`` (the file) and ``what`` (its format) name the file in the :class:`RefusedPickle` raised
    for any other global; nothing named in the file is called before it is admitted.
    """

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if admits(module, name):
                return super().find_class(module, name)
            raise RefusedPickle(f"{source} names {module}.{name}, which no {what} holds; refused (it could run code)")

    return _Unpickler(file, encoding=encoding).load()


# The numpy globals of a pickled array: the reconstructor, the array type and the dtype.
NUMPY_ARRAY = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


def admits_numpy_arrays(module: str, name: str) -> bool:
    """Plain containers (which need no global) and numpy arrays: what the CIFAR batches hold."""
    return (module, name) in NUMPY_ARRAY
