"""Sharded parameters: each parameter knows how to cut its shard out of the checkpoint tensor.

A weight loader gets the full checkpoint tensor and returns this rank's shard using `narrow`,
`chunk`, `torch.cat`, `torch.stack` and `new_zeros`. The checkpoint loader hands it a
`LazyTensor` instead of a real tensor: the same calls then only describe the shard, and
`load_param` reads just those bytes from the checkpoint, straight into the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

WeightLoader = Callable[[Any], Any]  # full tensor (real or LazyTensor) -> this rank's shard

# Open file handles of one read (see TensorSource.read), dropped when the read is done.
ReadContext = dict[Any, Any]


def shard(full: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    size = full.shape[dim]
    if size % parts:
        raise ValueError(f"cannot split dim {dim} of size {size} into {parts} shards")
    step = size // parts
    return full.narrow(dim, index * step, step)


def param(
    shape: tuple[int, ...], dtype: torch.dtype, loader: WeightLoader | None = None
) -> nn.Parameter:
    """An uninitialised parameter; `loader` turns the checkpoint's full tensor into our shard."""
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader or (lambda full: full)  # type: ignore[attr-defined]
    return p


def load_param(p: nn.Parameter, full: torch.Tensor | LazyTensor) -> None:
    """Cut this rank's shard out of `full` and copy it into `p` (converting the dtype).

    With a LazyTensor only the shard is read from the checkpoint, without a full-size copy.
    """
    local = p.weight_loader(full)  # type: ignore[attr-defined]
    if tuple(local.shape) != tuple(p.shape):
        raise ValueError(
            f"checkpoint shard {tuple(local.shape)} does not fit parameter {tuple(p.shape)}"
        )
    if isinstance(local, LazyTensor):
        local.read_into(p.data)
    else:
        p.data.copy_(local)


# ---- lazy checkpoint tensors ----


class TensorSource(Protocol):
    """One stored tensor that can be read in parts (e.g. a safetensors key)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self, index: tuple[slice, ...], ctx: ReadContext) -> torch.Tensor:
        """The sub-tensor `index` (one slice per dim); `ctx` may cache open files."""
        ...


def _dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < max(ndim, 1):
        raise IndexError(f"dimension {dim} out of range for a {ndim}-d tensor")
    return dim % ndim if ndim else 0


class LazyTensor:
    """A checkpoint tensor, or a view / cat / stack of some, read only when materialised.

    Supports what weight loaders use: `shape`, `narrow`, `chunk`, `[a:b, ...]`, `new_zeros`,
    `torch.cat` / `torch.stack` (through `__torch_function__`). Any other torch function
    materialises its lazy arguments first (reading only their selected ranges).
    """

    shape: torch.Size
    dtype: torch.dtype

    # -- what subclasses implement --

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        dim = _dim(dim, self.ndim)
        size = self.shape[dim]
        if start < 0:
            start += size
        if not (0 <= start <= size and 0 <= length <= size - start):
            raise IndexError(f"narrow({dim}, {start}, {length}) out of range for size {size}")
        if start == 0 and length == size:
            return self
        return self._narrow(dim, start, length)

    def _narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        raise NotImplementedError

    def _read(self, ctx: ReadContext) -> torch.Tensor:
        raise NotImplementedError

    def _read_into(self, out: torch.Tensor, ctx: ReadContext) -> None:
        out.copy_(self._read(ctx))

    # -- tensor-like API --

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def chunk(self, chunks: int, dim: int = 0) -> tuple[LazyTensor, ...]:
        """Same pieces as torch.chunk."""
        if chunks <= 0:
            raise ValueError(f"chunk expects `chunks` to be greater than 0, got: {chunks}")
        dim = _dim(dim, self.ndim)
        size = self.shape[dim]
        if size == 0:
            return tuple(self for _ in range(chunks))
        step = -(-size // chunks)
        return tuple(
            self.narrow(dim, start, min(step, size - start)) for start in range(0, size, step)
        )

    def __getitem__(self, index: Any) -> LazyTensor:
        """Basic slicing with step 1 (`t[a:b]`, `t[:, a:b]`, `t[..., a:b]`)."""
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index):
            at = index.index(Ellipsis)
            fill = (slice(None),) * (self.ndim - len(index) + 1)
            index = index[:at] + fill + index[at + 1 :]
        if len(index) > self.ndim:
            raise IndexError(f"too many indices for a {self.ndim}-d tensor")
        out: LazyTensor = self
        for d, s in enumerate(index):
            if not isinstance(s, slice) or s.step not in (None, 1):
                raise TypeError(f"LazyTensor supports only step-1 slices, got {s!r}")
            start, stop, _ = s.indices(self.shape[d])
            out = out.narrow(d, start, max(0, stop - start))
        return out

    def new_zeros(self, size: Sequence[int], dtype: torch.dtype | None = None) -> LazyTensor:
        return _Zeros(torch.Size(size), dtype or self.dtype)

    def materialize(self) -> torch.Tensor:
        """Read the selected ranges (and only those) into a tensor."""
        return self._read({})

    def read_into(self, out: torch.Tensor) -> None:
        """Read the selected ranges straight into `out` (same shape; converts the dtype)."""
        if tuple(out.shape) != tuple(self.shape):
            raise ValueError(f"cannot read {tuple(self.shape)} into {tuple(out.shape)}")
        self._read_into(out, {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in (torch.cat, torch.concat, torch.concatenate, torch.stack):
            tensors = args[0] if args else kwargs.pop("tensors")
            dim = args[1] if len(args) > 1 else kwargs.pop("dim", kwargs.pop("axis", 0))
            if kwargs:
                raise TypeError(f"LazyTensor: unsupported arguments {sorted(kwargs)} to {func}")
            return (stack if func is torch.stack else cat)(tensors, dim)
        if func in (torch.narrow, torch.Tensor.narrow):
            return args[0].narrow(*args[1:], **kwargs)
        if func in (torch.chunk, torch.Tensor.chunk):
            return args[0].chunk(*args[1:], **kwargs)

        def real(x: Any) -> Any:
            if isinstance(x, LazyTensor):
                return x.materialize()
            if isinstance(x, (list, tuple)):
                return type(x)(real(y) for y in x)
            return x

        return func(*real(tuple(args)), **{k: real(v) for k, v in kwargs.items()})

    @staticmethod
    def from_source(source: TensorSource) -> LazyTensor:
        return _Leaf(source, tuple((0, n) for n in source.shape))

    @staticmethod
    def from_tensor(t: torch.Tensor) -> LazyTensor:
        return LazyTensor.from_source(_TensorSource(t))


def cat(tensors: Sequence[torch.Tensor | LazyTensor], dim: int = 0) -> Any:
    """torch.cat that stays lazy when any part is lazy."""
    if not any(isinstance(t, LazyTensor) for t in tensors):
        return torch.cat(list(tensors), dim)  # type: ignore[arg-type]
    parts = [_lazy(t) for t in tensors]
    ndim = parts[0].ndim
    dim = _dim(dim, ndim)
    for p in parts:
        if p.ndim != ndim or any(
            a != b for d, (a, b) in enumerate(zip(p.shape, parts[0].shape)) if d != dim
        ):
            raise ValueError(f"cat: shapes {[tuple(q.shape) for q in parts]} differ off dim {dim}")
    parts = [p for p in parts if p.shape[dim]] or parts[:1]
    return parts[0] if len(parts) == 1 else _Cat(parts, dim)


def stack(tensors: Sequence[torch.Tensor | LazyTensor], dim: int = 0) -> Any:
    """torch.stack that stays lazy when any part is lazy."""
    if not any(isinstance(t, LazyTensor) for t in tensors):
        return torch.stack(list(tensors), dim)  # type: ignore[arg-type]
    parts = [_lazy(t) for t in tensors]
    if any(p.shape != parts[0].shape for p in parts):
        raise ValueError(f"stack: shapes differ: {[tuple(p.shape) for p in parts]}")
    return _Stack(parts, _dim(dim, parts[0].ndim + 1))


def _lazy(t: torch.Tensor | LazyTensor) -> LazyTensor:
    return t if isinstance(t, LazyTensor) else LazyTensor.from_tensor(t)


def _dtype(parts: Sequence[LazyTensor]) -> torch.dtype:
    dtype = parts[0].dtype
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


class _TensorSource:
    """An in-memory tensor as a source (cat / stack of real and lazy parts)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.shape, self.dtype = t, tuple(t.shape), t.dtype

    def read(self, index: tuple[slice, ...], ctx: ReadContext) -> torch.Tensor:
        return self.t[index]


class _Leaf(LazyTensor):
    """A box (start, length per dim) of one source tensor."""

    def __init__(self, source: TensorSource, box: tuple[tuple[int, int], ...]) -> None:
        self.source, self.box = source, box
        self.shape = torch.Size(n for _, n in box)
        self.dtype = source.dtype

    def _narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        box = list(self.box)
        box[dim] = (box[dim][0] + start, length)
        return _Leaf(self.source, tuple(box))

    def _read(self, ctx: ReadContext) -> torch.Tensor:
        if self.numel() == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        t = self.source.read(tuple(slice(s, s + n) for s, n in self.box), ctx)
        if t.shape != self.shape:
            raise RuntimeError(f"{self.source!r} read {tuple(t.shape)}, expected {self.shape}")
        return t


class _Zeros(LazyTensor):
    def __init__(self, shape: torch.Size, dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype

    def _narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        shape = list(self.shape)
        shape[dim] = length
        return _Zeros(torch.Size(shape), self.dtype)

    def _read(self, ctx: ReadContext) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype)

    def _read_into(self, out: torch.Tensor, ctx: ReadContext) -> None:
        out.zero_()


class _Cat(LazyTensor):
    """Parts joined along `dim`: a narrow along `dim` keeps only the parts it overlaps."""

    def __init__(self, parts: Sequence[LazyTensor], dim: int) -> None:
        self.parts, self.cat_dim = list(parts), dim
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        self.shape, self.dtype = torch.Size(shape), _dtype(parts)

    def _narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        if dim != self.cat_dim:
            return cat([p.narrow(dim, start, length) for p in self.parts], self.cat_dim)
        picked, offset, stop = [], 0, start + length
        for p in self.parts:
            n = p.shape[dim]
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                picked.append(p.narrow(dim, lo - offset, hi - lo))
            offset += n
        return cat(picked, dim) if picked else self.parts[0].narrow(dim, 0, 0)

    def _read(self, ctx: ReadContext) -> torch.Tensor:
        return torch.cat([p._read(ctx).to(self.dtype) for p in self.parts], self.cat_dim)

    def _read_into(self, out: torch.Tensor, ctx: ReadContext) -> None:
        offset = 0
        for p in self.parts:
            n = p.shape[self.cat_dim]
            p._read_into(out.narrow(self.cat_dim, offset, n), ctx)
            offset += n


class _Stack(LazyTensor):
    """Parts stacked along a new `dim`: a narrow along `dim` keeps only the parts it selects."""

    def __init__(self, parts: Sequence[LazyTensor], dim: int) -> None:
        self.parts, self.stack_dim = list(parts), dim
        shape = list(parts[0].shape)
        shape.insert(dim, len(parts))
        self.shape, self.dtype = torch.Size(shape), _dtype(parts)

    def _narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        if dim == self.stack_dim:
            if length == 0:
                return self.new_zeros(self._with(dim, 0))
            return _Stack(self.parts[start : start + length], dim)
        inner = dim if dim < self.stack_dim else dim - 1
        return _Stack([p.narrow(inner, start, length) for p in self.parts], self.stack_dim)

    def _with(self, dim: int, n: int) -> list[int]:
        shape = list(self.shape)
        shape[dim] = n
        return shape

    def _read(self, ctx: ReadContext) -> torch.Tensor:
        return torch.stack([p._read(ctx).to(self.dtype) for p in self.parts], self.stack_dim)

    def _read_into(self, out: torch.Tensor, ctx: ReadContext) -> None:
        for i, p in enumerate(self.parts):
            p._read_into(out.select(self.stack_dim, i), ctx)
