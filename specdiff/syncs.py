"""Count the host <-> device synchronisations of a piece of code, with or without a GPU.

A CUDA (or MPS) device runs its work queued behind the host; the host waits for it (a
*synchronisation*: the queue drains, the GPU idles until the host queues more) whenever it needs
a device value or a blocking copy:

* device -> host: ``item()``, ``int()``/``float()``/``bool()``/``__index__`` of a device tensor,
  ``tolist()``, ``cpu()``/``to("cpu")``, ``torch.equal``; and every op whose output *shape* depends
  on device values: ``nonzero`` (``torch.where(c)`` with one argument, ``argwhere``), a boolean
  mask as an index, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``,
  ``bincount``;
* host -> device: a blocking copy from (pageable) host memory, ``t.to("cuda")`` of a CPU tensor,
  and a CPU index tensor used to index a device tensor (torch copies it to the device first).

:func:`count_syncs` counts them by kind and by call site (the first frame outside torch and this
module). On a machine with a GPU it counts the real ones. On a CPU-only machine,
``count_syncs(simulate="cuda")`` runs the code on a *simulated* CUDA device: tensors created
with ``device="cuda"`` or moved there with ``.to("cuda")`` are CPU tensors that report
``device == cuda:0`` (a wrapper subclass), so the code takes its CUDA path (its own ``.to(device)``
moves, ``device.type == "cuda"`` branches) with values computed on the CPU, bit for bit. The
simulation also refuses what CUDA refuses, so a device bug shows on a CPU machine: an op mixing a
device tensor with a host tensor that is not a 0-dim scalar raises ``RuntimeError``, as CUDA does.
``torch.cuda``'s memory queries answer zeros (no memory is measured) while simulating::

    with count_syncs(simulate="cuda") as syncs:
        x = x_init.to("cuda")
        out = speculative_sample(chain, x, window=8)
    print(syncs.table())           # per call site: kind, count
    syncs.total, syncs.by_kind()   # totals

Deliberately host-side bookkeeping (the sampler keeps its step counters and index tensors on the
CPU) is not counted: only a tensor on the device can make the host wait.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_SIMULATED = torch.device("cuda", 0)

#: Ops whose output shape depends on device values: the host must read them (kind "shape").
_DATA_DEPENDENT = {
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.bincount.default: "bincount",
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}
_WATCHED = {aten._local_scalar_dense.default, aten.equal.default, aten.allclose.default, aten.is_nonzero.default,
            aten.repeat_interleave.Tensor, *_DATA_DEPENDENT, *_INDEXING, *_COPIES}


@dataclass(frozen=True)
class Sync:
    """One synchronisation: ``kind`` (``"d2h"``: the host reads a device value; ``"shape"``: a
    data-dependent output shape; ``"h2d"``: a blocking copy to the device), the op, and where."""

    kind: str
    op: str
    site: str


@dataclass
class SyncCount:
    """What :func:`count_syncs` saw: every :class:`Sync` in order, and ``marks`` (see :meth:`mark`)."""

    events: list[Sync] = field(default_factory=list)
    marks: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.events)

    def mark(self) -> int:
        """Remember the count now (e.g. at a round's start); returns it."""
        self.marks.append(len(self.events))
        return len(self.events)

    def by_kind(self) -> Counter:
        return Counter(e.kind for e in self.events)

    def by_site(self, events: list[Sync] | None = None) -> Counter:
        """``{(site, kind, op): count}``."""
        return Counter((e.site, e.kind, e.op) for e in (self.events if events is None else events))

    def table(self, per: float = 1.0, events: list[Sync] | None = None) -> str:
        """One line per call site (counts divided by ``per``, e.g. the number of rounds)."""
        rows = sorted(self.by_site(events).items(), key=lambda item: (-item[1], item[0]))
        lines = [f"{'count':>8}  {'kind':<5}  {'op':<18}  site"]
        lines += [f"{count / per:8.2f}  {kind:<5}  {op:<18}  {site}" for (site, kind, op), count in rows]
        return "\n".join(lines)


_COUNTERS: list[SyncCount] = []
_SIMULATING: list[bool] = []


def _leaves(*trees):
    """The leaves of (nested) tuples, lists and dicts: an op's arguments (faster than pytree's)."""
    for tree in trees:
        if isinstance(tree, (tuple, list)):
            yield from _leaves(*tree)
        elif isinstance(tree, dict):
            yield from _leaves(*tree.values())
        else:
            yield tree


def _map(fn, tree):
    """``fn`` on every leaf of (nested) tuples, lists and dicts."""
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map(fn, t) for t in tree)
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _site() -> str:
    """Where a synchronisation happens: the innermost frame outside torch and this module, and
    its caller (``file:line (function) <- :line (caller)``; the caller's file shown when it differs)."""
    frames, frame = [], sys._getframe(2)
    while frame is not None and len(frames) < 2:
        name = os.path.abspath(frame.f_code.co_filename)
        if name != _HERE and not name.startswith(_TORCH) and "/torch/" not in name:
            frames.append((_shown(name), frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    if not frames:
        return "?"
    (path, line, fn), *rest = frames
    site = f"{path}:{line} ({fn})"
    if rest:
        caller_path, caller_line, caller_fn = rest[0]
        site += f" <- {'' if caller_path == path else caller_path}:{caller_line} ({caller_fn})"
    return site


def _shown(path: str) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if relative.startswith("..") else relative


def _record(kind: str, op: str, counters: list[SyncCount] | None = None) -> None:
    """One synchronisation, into ``counters`` (default: every active one: an event the simulated
    device's Python layer sees, once, whoever counts)."""
    counters = _COUNTERS if counters is None else counters
    if counters:
        sync = Sync(kind, op, _site())
        for counter in counters:
            counter.events.append(sync)


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta")


def _host_array(t) -> bool:
    """A host tensor a device op cannot take (CUDA takes 0-dim CPU tensors as scalars)."""
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0


def _asynchronous(source: torch.Tensor, kwargs) -> bool:
    """A copy to the device that does not wait: ``non_blocking=True`` from pinned host memory."""
    return bool(kwargs.get("non_blocking")) and source.is_pinned()


def _classify(func, args, kwargs) -> list[tuple[str, str]]:
    """The synchronisations one aten call makes (on real or simulated device tensors)."""
    if func not in _WATCHED:
        return []
    name = func.overloadpacket.__name__
    on_device = [t for t in _leaves(args, kwargs) if _on_device(t)]
    if func is aten._local_scalar_dense.default:
        return [("d2h", "item")] if on_device else []
    if func in (aten.equal.default, aten.allclose.default, aten.is_nonzero.default):
        return [("d2h", name)] if on_device else []
    if func in _DATA_DEPENDENT:
        return [("shape", _DATA_DEPENDENT[func])] if on_device else []
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return [("shape", "repeat_interleave")] if on_device else []
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        if device is None:
            return []
        if _on_device(args[0]) and torch.device(device).type == "cpu":
            return [("d2h", "to(cpu)")]
        if not _on_device(args[0]) and torch.device(device).type != "cpu" and not _asynchronous(args[0], kwargs):
            return [("h2d", "to(device)")]
        return []
    if func in _COPIES:
        if len(args) < 2 or not isinstance(args[1], torch.Tensor):
            return []
        dst, src = args[0], args[1]
        if _on_device(src) and not _on_device(dst):
            return [("d2h", "copy_")]
        if _on_device(dst) and _host_array(src) and not _asynchronous(src, kwargs):
            return [("h2d", "copy_")]
        return []
    if func in _INDEXING and _on_device(args[0]):
        out = []
        for index in args[1] if len(args) > 1 else []:
            if index is None:
                continue
            if _host_array(index):
                out.append(("h2d", "host index"))
            elif index.dtype in (torch.bool, torch.uint8):
                out.append(("shape", "boolean index"))
        return out
    return []


class _Counting(TorchDispatchMode):
    """Counts the synchronisations of every aten call (see :func:`_classify`) into its counter
    (nested counters each see a call once)."""

    def __init__(self, count: SyncCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for kind, op in _classify(func, args, kwargs):
            _record(kind, op, [self.count])
        return func(*args, **kwargs)


# -- the simulated device ---------------------------------------------------------------------


class SimulatedDeviceError(RuntimeError):
    """What CUDA would refuse (tensors on two devices in one op), seen on the simulated device."""


def _is_simulated(device) -> bool:
    if device is None:
        return False
    if isinstance(device, str):
        if not device.startswith("cuda"):  # e.g. norm's p="fro": not a device
            return False
        device = torch.device(device)
    return isinstance(device, torch.device) and device.type == "cuda"


class SimulatedTensor(torch.Tensor):
    """A CPU tensor that reports ``device == cuda:0`` (see the module docstring). To torch's C++
    side it is a storage-less CPU wrapper (no CUDA device guard, no CUDA call); every op on it
    runs on the wrapped CPU tensor ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            device="cpu", requires_grad=elem.requires_grad,
        )
        out.elem = elem
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:
        return _SIMULATED

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def is_cpu(self) -> bool:
        return False

    def get_device(self) -> int:
        return 0

    def __repr__(self):
        return f"SimulatedTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cpu":
            plain = {k: v for k, v in kwargs.items() if k != "device"}
            return aten._to_copy.default(args[0].elem, **plain)  # to the host: a plain CPU tensor
        if func is aten.copy_.default and not isinstance(args[0], SimulatedTensor):
            args[0].copy_(args[1].elem)  # a host destination
            return args[0]
        _check_devices(func, args, kwargs)
        originals = {}

        def unwrap(t):
            if isinstance(t, SimulatedTensor):
                originals[id(t.elem)] = t
                return t.elem
            if isinstance(t, torch.device) and t.type == "cuda":
                return torch.device("cpu")
            return t

        out = func(*_map(unwrap, args), **_map(unwrap, kwargs))
        return _map(lambda t: _wrap(t, originals), out)


def _wrap(t, originals):
    if not isinstance(t, torch.Tensor) or isinstance(t, SimulatedTensor):
        return t
    original = originals.get(id(t))
    return SimulatedTensor(t) if original is None else original


def _check_devices(func, args, kwargs) -> None:
    """Refuse a host array next to a device tensor where CUDA refuses it."""
    if func in _INDEXING or func in _COPIES:
        if func in _INDEXING and not isinstance(args[0], SimulatedTensor):
            indices = [i for i in args[1] if isinstance(i, SimulatedTensor)]
            values = args[2:3] if func is not aten.index.Tensor else []
            if indices or any(isinstance(v, SimulatedTensor) and v.dim() > 0 for v in values):
                raise SimulatedDeviceError(f"{func}: a host tensor indexed with device indices/values "
                                           f"(CUDA refuses it) at {_site()}")
        return
    flat = list(_leaves(args, kwargs))
    host = [t for t in flat if _host_array(t) and not isinstance(t, SimulatedTensor)]
    if host and any(isinstance(t, SimulatedTensor) for t in flat):
        raise SimulatedDeviceError(
            f"{func}: expected all tensors on the same device, got cuda:0 and a cpu tensor of shape "
            f"{tuple(host[0].shape)} (CUDA refuses it) at {_site()}"
        )


class _SimulatedFactories(TorchFunctionMode):
    """Python-level calls naming the simulated device (factories, ``.to("cuda")``, ``.cuda()``):
    made on the CPU and wrapped, before torch would initialise a CUDA it does not have."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(func, args, kwargs)
        if func is torch.Tensor.tolist and isinstance(args[0], SimulatedTensor):
            _record("d2h", "tolist")
            return args[0].elem.tolist()
        if func is torch.Tensor.numpy and isinstance(args[0], SimulatedTensor):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first (the simulated device refuses it, as CUDA does)")
        if func is torch.nn.functional.one_hot and isinstance(args[0], SimulatedTensor):
            # torch's C++ one_hot builds its tensors on the input's C++ device (the host, here); CUDA
            # reads the input's max only when num_classes is not given.
            num_classes = kwargs.get("num_classes", args[1] if len(args) > 1 else -1)
            if num_classes == -1:
                _record("d2h", "one_hot")
            return SimulatedTensor(func(args[0].elem, num_classes))
        if func is torch.as_tensor and isinstance(args[0], SimulatedTensor):
            dtype = kwargs.get("dtype") or (args[1] if len(args) > 1 else None)
            device = kwargs.get("device")
            if device is None or _is_simulated(device):
                return args[0] if dtype in (None, args[0].dtype) else args[0].to(dtype)
        if func is torch.device or not any(
                _is_simulated(a) for a in _leaves(args, kwargs) if isinstance(a, (str, torch.device))):
            return func(*args, **kwargs)
        if "generator" in kwargs and kwargs["generator"] is not None and kwargs["generator"].device.type == "cpu":
            raise SimulatedDeviceError(f"{func.__name__}: a CPU generator cannot draw on cuda (CUDA refuses it)")
        host_data = func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], SimulatedTensor)

        def to_cpu(a):
            return torch.device("cpu") if isinstance(a, (str, torch.device)) and _is_simulated(a) else a

        out = func(*_map(to_cpu, args), **_map(to_cpu, kwargs))
        if host_data:
            _record("h2d", func.__name__)
        return _map(lambda t: t if not isinstance(t, torch.Tensor) or isinstance(t, SimulatedTensor)
                    else SimulatedTensor(t), out)

    @staticmethod
    def _move(func, args, kwargs):
        self = args[0]
        non_blocking = bool(kwargs.get("non_blocking"))
        if func is torch.Tensor.cuda:
            device, dtype = _SIMULATED, None
        elif func is torch.Tensor.cpu:
            device, dtype = torch.device("cpu"), None
        else:
            if args[1:] and isinstance(args[1], torch.Tensor):
                device, dtype = args[1].device, args[1].dtype
            else:
                device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        if not _is_simulated(device):
            if device is None or not isinstance(self, SimulatedTensor):
                return func(*args, **kwargs)  # a dtype change (the dispatch level sees it), or host to host
            _record("d2h", "to(cpu)")  # torch's C++ side sees a CPU tensor and would not copy
            return self.elem.to(dtype=self.dtype if dtype is None else dtype, copy=True)
        dtype = self.dtype if dtype is None else dtype
        if isinstance(self, SimulatedTensor):
            return self if dtype == self.dtype else self.to(dtype)
        if not (non_blocking and self.is_pinned()):
            _record("h2d", "to(device)")
        moved = self.to(dtype=dtype, copy=True)
        return SimulatedTensor(moved)


class _SimulatedProperties:
    name, total_memory, major, minor, multi_processor_count = "simulated CUDA device", 80 * 2**30, 9, 0, 132


def _simulated_cuda_api():
    """``torch.cuda``'s queries the library makes, answered without a GPU (no memory measured)."""
    free = _SimulatedProperties.total_memory
    return [
        mock.patch.object(torch.cuda, "get_device_name", lambda device=None: _SimulatedProperties.name),
        mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: _SimulatedProperties()),
        mock.patch.object(torch.cuda, "synchronize", lambda device=None: None),
        mock.patch.object(torch.cuda, "reset_peak_memory_stats", lambda device=None: None),
        mock.patch.object(torch.cuda, "max_memory_allocated", lambda device=None: 0),
        mock.patch.object(torch.cuda, "memory_allocated", lambda device=None: 0),
        mock.patch.object(torch.cuda, "mem_get_info", lambda device=None: (free, free)),
    ]


@contextmanager
def count_syncs(simulate: str | None = None):
    """Count synchronisations in the block (a :class:`SyncCount`); ``simulate="cuda"``: on the
    simulated CUDA device (module docstring), for a machine without one."""
    if simulate not in (None, "cuda"):
        raise ValueError(f"simulate must be None (count on the real device) or 'cuda'; got {simulate!r}")
    count = SyncCount()
    with ExitStack() as stack:
        if simulate and not _SIMULATING:  # nested in a simulation: the outer one serves
            for patch in _simulated_cuda_api():
                stack.enter_context(patch)
            stack.enter_context(_SimulatedFactories())
            _SIMULATING.append(True)
            stack.callback(_SIMULATING.pop)
        stack.enter_context(_Counting(count))
        _COUNTERS.append(count)
        stack.callback(_COUNTERS.remove, count)
        yield count
