"""The one reader of `.pth` files: `load_pth`. It runs no code from the file.

A `.pth` file is a pickle, and a pickle names functions and classes that are called while it is
read: `torch.load(..., weights_only=False)` would run `os.system` if a downloaded file asked it
to. This reader rebuilds only data:

* tensors, parameters and storages, `torch.Size`, dtypes and devices;
* plain containers and scalars (dict, OrderedDict, defaultdict, Counter, list, tuple, set,
  frozenset, str, bytes, numbers, bool, None), numpy arrays and scalars, `argparse.Namespace`,
  `pathlib` paths and `datetime` values;
* any other class becomes an inert `Placeholder` that keeps the object's stored state (upstream
  checkpoints carry `stats = defaultdict(AverageMeter)` from upstream's `lib.utils`, a module
  this project does not have);
* any other function, and any class of the standard library, torch or numpy not listed above
  (`os.system`, `builtins.exec`, `subprocess.Popen`, `importlib.import_module`, ...), is refused:
  `UnsafePickleError` names the file and the global, and nothing has been executed.

Our own checkpoints hold only types that `torch.load(weights_only=True)` also accepts.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import copyreg
import datetime
import os
import pathlib
import pickle
import sys
from typing import Any, Union

import numpy as np
import torch

from lib.errors import UsageError

__all__ = ["load_pth", "Placeholder", "UnsafePickleError", "Unpickler", "load"]


class UnsafePickleError(UsageError):
    """A pickle names a global that reading it would call and that is not data."""

    def __init__(self, global_name: str, path: Union[str, None] = None):
        self.global_name = global_name
        self.path = path
        where = path if path is not None else "the pickle"
        super().__init__(f"{where} was not loaded: it would call {global_name}, and .pth files are read without "
                         f"running code from them (nothing from the file was executed); if you made the file "
                         f"yourself, save its state dicts and plain values only")


class Placeholder:
    """Inert stand-in for an object whose class is not one this reader rebuilds. It keeps what
    the pickle stored: the constructor arguments (`placeholder_args`), the state
    (`placeholder_state`; a dict state also becomes attributes, e.g. `meter.avg`), and the items
    of a dict or list subclass (`placeholder[key]`, `placeholder_list`), and runs none of the
    class's code. `placeholder_of` is the pickled class's `module.name`."""

    placeholder_of = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        obj = object.__new__(cls)
        obj.__dict__["placeholder_args"] = args + ((kwargs,) if kwargs else ())
        obj.__dict__["placeholder_state"] = None
        obj.__dict__["placeholder_items"] = {}
        obj.__dict__["placeholder_list"] = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Reached when the pickle calls the class (REDUCE); __new__ kept the arguments.
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["placeholder_state"] = state
        # (dict, slots) for classes with __slots__, else the instance dict
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        for part in parts:
            if isinstance(part, dict):
                self.__dict__.update({k: v for k, v in part.items() if isinstance(k, str)})

    # A dict subclass is pickled with its items set (SETITEMS), a list subclass with APPENDS.
    def __setitem__(self, key: Any, value: Any) -> None:
        self.placeholder_items[key] = value

    def __getitem__(self, key: Any) -> Any:
        return self.placeholder_items[key]

    def get(self, key: Any, default: Any = None) -> Any:
        return self.placeholder_items.get(key, default)

    def __contains__(self, key: Any) -> bool:
        return key in self.placeholder_items

    def append(self, value: Any) -> None:
        self.placeholder_list.append(value)

    def extend(self, values: Any) -> None:
        self.placeholder_list.extend(values)

    def __repr__(self) -> str:
        stored = self.placeholder_state if self.placeholder_state is not None else \
            (self.placeholder_items or self.placeholder_list or self.placeholder_args)
        return f"<placeholder for {self.placeholder_of}: {stored!r}>"


_placeholders: dict[str, type] = {}


def _placeholder_class(global_name: str) -> type:
    if global_name not in _placeholders:
        name = global_name.rsplit(".", 1)[-1]
        _placeholders[global_name] = type(name, (Placeholder,), {"placeholder_of": global_name,
                                                                 "__module__": __name__})
    return _placeholders[global_name]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); no other codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin-1")


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """copyreg._reconstructor (protocol 0/1 pickles of plain objects), for placeholders and
    argparse.Namespace only."""
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        obj = cls.__new__(cls)
        if state is not None:
            obj.__dict__["placeholder_args"] = (state,)
        return obj
    if cls is argparse.Namespace and base is object and state is None:
        return object.__new__(cls)
    raise UnsafePickleError(f"copyreg._reconstructor({getattr(cls, '__qualname__', cls)!r}, "
                            f"{getattr(base, '__qualname__', base)!r})")


def _numpy_core(name: str) -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return getattr(core.multiarray, name)


# module -> {name: object}. Everything a .pth file of tensors and plain values names.
_TORCH_REBUILD = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                  "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
                  "_rebuild_nested_tensor", "_rebuild_device_tensor_from_numpy",
                  "_rebuild_device_tensor_from_cpu_tensor", "_rebuild_meta_tensor_no_storage")
_ALLOWED: dict[str, dict[str, Any]] = {
    "builtins": {t.__name__: t for t in (set, frozenset, list, dict, tuple, slice, complex, bytearray, bytes, str,
                                         int, float, bool, range)},
    "collections": {t.__name__: t for t in (collections.OrderedDict, collections.defaultdict,
                                            collections.Counter, collections.deque)},
    "_codecs": {"encode": _latin1_encode},
    "copyreg": {"_reconstructor": _reconstructor},
    "argparse": {"Namespace": argparse.Namespace},
    "pathlib": {t.__name__: t for t in (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath,
                                        pathlib.PurePosixPath, pathlib.PureWindowsPath)},
    "datetime": {t.__name__: t for t in (datetime.datetime, datetime.date, datetime.time, datetime.timedelta,
                                         datetime.timezone)},
    "numpy": {"ndarray": np.ndarray, "dtype": np.dtype},
    "numpy.core.multiarray": {"_reconstruct": _numpy_core("_reconstruct"), "scalar": _numpy_core("scalar")},
    "numpy._core.multiarray": {"_reconstruct": _numpy_core("_reconstruct"), "scalar": _numpy_core("scalar")},
    "torch": {"Size": torch.Size, "Tensor": torch.Tensor, "device": torch.device},
    "torch.torch_version": {"TorchVersion": torch.torch_version.TorchVersion},  # a str
    "torch._utils": {name: getattr(torch._utils, name) for name in _TORCH_REBUILD if hasattr(torch._utils, name)},
    "torch._tensor": {"_rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2},
    "torch.nn.parameter": {"Parameter": torch.nn.Parameter},
    "torch.serialization": {"_get_layout": torch.serialization._get_layout},
}
# numpy's DType classes (numpy.dtypes.Float32DType, ...), which newer numpy may name.
_ALLOWED["numpy.dtypes"] = {name: getattr(np.dtypes, name) for name in dir(getattr(np, "dtypes", object()))
                            if name.endswith("DType")}
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)
# Modules whose unlisted globals are refused rather than made placeholders: a pickle has no
# reason to name them except to call them.
_REFUSED_ROOTS = frozenset(sys.stdlib_module_names) | {"__builtin__", "torch", "numpy", "torchvision", "pip",
                                                      "setuptools", "pkg_resources", "_pytest", "pytest"}


def resolve_global(module: str, name: str) -> Any:
    """What the global `module.name` of a pickle becomes (see the module docstring); raises
    UnsafePickleError for one that would run code."""
    if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names in protocol <= 2 pickles
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    allowed = _ALLOWED.get(module, {})
    if name in allowed:
        return allowed[name]
    if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUE_TYPES):
        return getattr(torch, name)  # torch.float16, torch.strided, torch.channels_last, ...
    global_name = f"{module}.{name}"
    if module.split(".")[0] in _REFUSED_ROOTS or not name[:1].isupper() or "." in name:
        # The standard library, torch and numpy are known: what is not listed is code. Elsewhere
        # a lower-case name is a function (classes are CapWords), and only calling it matters.
        raise UnsafePickleError(global_name)
    return _placeholder_class(global_name)


class Unpickler(pickle.Unpickler):
    """pickle.Unpickler that rebuilds data only (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name)


def load(file, **kwargs: Any) -> Any:
    """pickle.load with `Unpickler` (torch.load calls this for the legacy file format)."""
    return Unpickler(file, **kwargs).load()


_THIS_MODULE = sys.modules[__name__]


def load_pth(path: Union[str, os.PathLike], map_location: Union[str, torch.device, None] = "cpu",
             what: str = "file") -> Any:
    """Read a `.pth` file (torch.save's zip or legacy format) without running code from it.
    `what` names the file in messages (e.g. "checkpoint").

    Raises FileNotFoundError for a missing file, UnsafePickleError (a UsageError) for a pickle
    that would call code, and UsageError for a file torch cannot read (truncated, not a pickle).
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        # The only weights_only=False in the project: pickle_module restricts every global the
        # file names, so nothing in it is executed.
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_THIS_MODULE)
    except UnsafePickleError as exc:
        raise UnsafePickleError(exc.global_name, f"{what} {path}") from None
    except Exception as exc:
        raise UsageError(f"{what} {path} could not be read ({type(exc).__name__}: {exc}); is the download complete?") from exc
