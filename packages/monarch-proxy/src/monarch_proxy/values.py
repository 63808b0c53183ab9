"""Shapes and results of mesh calls, behaving as Monarch's ``Extent``, ``Point`` and ``ValueMesh``.

Pure Python (the laptop has no torchmonarch). :class:`ShapeOps` is Monarch's ``MeshTrait``
(``slice``, ``split``, ``flatten``, ``rename``, ``size``, ``sizes``, ``extent``) over a
:class:`Shape`, with the same exception types; mesh proxies and :class:`ValueMesh` share it. The
shape arithmetic follows ``monarch/_src/actor/shape.py`` (BSD licence, Meta Platforms).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from pprint import pformat
from textwrap import indent
from typing import Any, Generic, Self, TypeVar

T = TypeVar("T")


class UnknownLabelError(KeyError, ValueError):
    """A label a mesh does not have. Monarch raises ``ValueError`` here; being a ``KeyError``
    too keeps ``Point``/``Extent`` proper mappings (``in`` and ``.get(label, default)`` work)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Extent(Mapping[str, int]):
    """Named dimension sizes, e.g. ``Extent(["hosts", "gpus"], [2, 4])``: a mapping label -> size."""

    __slots__ = ("_labels", "_sizes")

    def __init__(self, labels: Sequence[str], sizes: Sequence[int]) -> None:
        if len(labels) != len(sizes):
            raise ValueError(f"label/sizes dimension mismatch: {len(labels)} != {len(sizes)}")
        self._labels = tuple(labels)
        self._sizes = tuple(int(s) for s in sizes)

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    @property
    def sizes(self) -> list[int]:
        return list(self._sizes)

    @property
    def nelements(self) -> int:
        return math.prod(self._sizes)

    def keys(self) -> list[str]:  # type: ignore[override]  # Monarch returns a list
        return list(self._labels)

    def __getitem__(self, label: str) -> int:
        try:
            return self._sizes[self._labels.index(label)]
        except ValueError:
            raise UnknownLabelError(f"Dimension {label!r} not found") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Extent):
            return False
        return self._labels == other._labels and self._sizes == other._sizes

    def __hash__(self) -> int:
        return hash((self._labels, self._sizes))

    def __reduce__(self) -> tuple[Any, ...]:
        return Extent, (self._labels, self._sizes)

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self._labels, self._sizes, strict=True))

    def points(self) -> Iterator[Point]:
        """Every coordinate in row-major order (the last label varies fastest)."""
        return (Point(rank, self) for rank in range(self.nelements))

    def __repr__(self) -> str:
        return (
            "{"
            + ", ".join(f"{lb}: {s}" for lb, s in zip(self._labels, self._sizes, strict=True))
            + "}"
        )


class Point(Mapping[str, int]):
    """A coordinate in a mesh: a mapping label -> index, at row-major ``rank`` of ``extent``."""

    __slots__ = ("_coords", "extent", "rank")

    def __init__(self, rank: int, extent: Extent) -> None:
        self.rank = rank
        self.extent = extent
        coords: list[int] = []
        for size in reversed(extent.sizes):
            rank, index = divmod(rank, size) if size else (rank, 0)
            coords.append(index)
        self._coords = tuple(reversed(coords))

    @property
    def coords(self) -> dict[str, int]:
        return dict(zip(self.extent.labels, self._coords, strict=True))

    def size(self, label: str) -> int:
        """The size of dimension ``label`` of the mesh this point is in."""
        return self.extent[label]

    def keys(self) -> list[str]:  # type: ignore[override]  # Monarch returns a list
        return self.extent.labels

    def __getitem__(self, label: str) -> int:
        try:
            return self._coords[self.extent.labels.index(label)]
        except ValueError:
            raise UnknownLabelError(f"Dimension {label!r} not found") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.extent.labels)

    def __len__(self) -> int:
        return len(self._coords)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (other.rank, other.extent) == (self.rank, self.extent)

    def __hash__(self) -> int:
        return hash((self.rank, self.extent))

    def __reduce__(self) -> tuple[Any, ...]:
        return Point, (self.rank, self.extent)

    def __repr__(self) -> str:
        body = zip(self.extent.labels, self._coords, self.extent.sizes, strict=True)
        return "{" + ", ".join(f"{lb!r}: {c}/{s}" for lb, c, s in body) + "}"


class Shape:
    """Labels over a strided slice of ranks (Monarch's ``Shape``/``Slice``), immutable."""

    __slots__ = ("labels", "offset", "sizes", "strides")

    def __init__(
        self,
        labels: Sequence[str],
        sizes: Sequence[int],
        strides: Sequence[int] | None = None,
        offset: int = 0,
    ) -> None:
        self.labels = tuple(labels)
        self.sizes = tuple(sizes)
        if strides is None:
            dense = itertools.accumulate(reversed(self.sizes[1:]), operator.mul, initial=1)
            strides = tuple(reversed(tuple(dense)))
        self.strides = tuple(strides)
        self.offset = offset

    @classmethod
    def dense(cls, extent: Extent) -> Shape:
        return cls(extent.labels, extent.sizes)

    @property
    def extent(self) -> Extent:
        return Extent(self.labels, self.sizes)

    def ranks(self) -> Iterator[int]:
        """The global rank of every point, in row-major order."""
        for coords in itertools.product(*(range(s) for s in self.sizes)):
            yield self.offset + sum(c * s for c, s in zip(coords, self.strides, strict=True))

    def index(self, label: str) -> int:
        if label not in self.labels:
            raise TypeError(f"Shape does not have dimension labeled {label!r}")
        return self.labels.index(label)

    def select(self, **selection: int | slice) -> Shape:
        """Monarch's ``slice``: an int drops a dimension, a ``slice`` keeps and narrows it."""
        labels, sizes, strides = list(self.labels), list(self.sizes), list(self.strides)
        offset = self.offset
        for label, sel in selection.items():
            if label not in labels:
                raise TypeError(f"Shape does not have dimension labeled {label!r}")
            i = labels.index(label)
            size, stride = sizes[i], strides[i]
            if isinstance(sel, slice):
                step = 1 if sel.step is None else sel.step
                if step <= 0:
                    raise ValueError("nonrectangular shape")
                start, stop, _ = sel.indices(size)
                picked = range(start, stop, step)
                if len(picked) == 0:
                    raise ValueError(
                        f"out of range {start}:{stop}:{step} for dimension {label} of size {size}"
                    )
                offset += start * stride
                sizes[i], strides[i] = len(picked), stride * step
            elif isinstance(sel, int) and not isinstance(sel, bool):
                if not 0 <= sel < size:
                    raise IndexError(
                        f"index out of range: {label}={sel}, but dimension {label!r} has size "
                        f"{size} (0..{size - 1})"
                    )
                offset += sel * stride
                del labels[i], sizes[i], strides[i]
            else:
                raise TypeError(
                    f"slice({label}=...) takes an int or a slice, not {type(sel).__name__}"
                )
        return Shape(labels, sizes, strides, offset)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Shape) and all(
            getattr(self, a) == getattr(other, a) for a in self.__slots__
        )

    def __hash__(self) -> int:
        return hash((self.labels, self.sizes, self.strides, self.offset))

    def __reduce__(self) -> tuple[Any, ...]:
        return Shape, (self.labels, self.sizes, self.strides, self.offset)

    def __repr__(self) -> str:
        return f"Shape({self.extent!r}, offset={self.offset}, strides={list(self.strides)})"


class ShapeOps:
    """Monarch's ``MeshTrait``: shape methods over ``_shape`` and ``_new_with_shape``."""

    @property
    def _shape(self) -> Shape:
        raise NotImplementedError

    def _new_with_shape(self, shape: Shape, view: tuple[str, dict[str, Any]]) -> Self:
        """The same thing over ``shape``; ``view`` is the call that made it, e.g.
        ``("slice", {"hosts": 0})`` (a mesh proxy repeats it on the gateway)."""
        raise NotImplementedError

    def slice(self, **kwargs: int | slice) -> Self:
        """Select along named dimensions: ``mesh.slice(hosts=0, gpus=slice(0, 4))``. An int
        removes the dimension, a ``slice`` keeps it restricted."""
        return self._new_with_shape(self._shape.select(**kwargs), ("slice", kwargs))

    def split(self, **kwargs: Any) -> Self:
        """Split dimensions: ``mesh.split(hosts=("dp", "pp"), gpus=("tp", "cp"), pp=16, cp=2)``;
        the size of one new dimension per split may be left to be inferred."""
        shape = self._shape
        splits: dict[str, Sequence[str]] = {}
        constraints: dict[str, int] = {}
        for key, value in kwargs.items():
            if key in shape.labels:
                if isinstance(value, str):
                    raise ValueError(f"expected a sequence of dimensions, but got '{value}'")
                splits[key] = value
            else:
                if not isinstance(value, int):
                    raise ValueError(
                        f"'{key}' is not an existing dim. Expected an integer size constraint "
                        "on a new dim."
                    )
                constraints[key] = value
        names: list[str] = []
        sizes: list[int] = []
        strides: list[int] = []
        for name, size, stride in zip(shape.labels, shape.sizes, shape.strides, strict=True):
            to_names = tuple(splits.get(name, (name,)))
            total, unknown = 1, None
            for to_name in to_names:
                if to_name in constraints:
                    total *= constraints[to_name]
                elif unknown is None:
                    unknown = to_name
                else:
                    raise ValueError(
                        f"Cannot infer size of {to_names} because both {to_name} and {unknown} "
                        f"have unknown size. Specify at least one as argument, e.g. {to_name}=4"
                    )
            if unknown is not None:
                inferred, rest = divmod(size, total)
                if rest:
                    to_sizes = tuple(constraints.get(n, "?") for n in to_names)
                    raise ValueError(
                        f"Dimension '{name}' of size {size} is not evenly divided by "
                        f"{to_names!r} with sizes {to_sizes!r}"
                    )
                constraints[unknown] = inferred
            elif total != size:
                to_sizes = tuple(constraints[n] for n in to_names)
                raise ValueError(
                    f"Dimension '{name}' of size {size} is not evenly divided by {to_names!r} "
                    f"with sizes {to_sizes!r}"
                )
            new_sizes = [constraints.pop(n) for n in to_names]
            acc = tuple(itertools.accumulate(reversed(new_sizes), operator.mul, initial=stride))
            sizes.extend(new_sizes)
            strides.extend(reversed(acc[:-1]))
            for n in to_names:
                if n in names:
                    raise ValueError(f"Duplicate dimension name '{n}'")
            names.extend(to_names)
        if constraints:
            raise ValueError(f"unused size constraints: {tuple(constraints)}")
        view = ("split", {k: list(v) if not isinstance(v, int) else v for k, v in kwargs.items()})
        return self._new_with_shape(Shape(names, sizes, strides, shape.offset), view)

    def flatten(self, name: str) -> Self:
        """One dimension called ``name`` over every point (dense meshes only)."""
        shape = self._shape
        dense = tuple(itertools.accumulate(reversed(shape.sizes), operator.mul, initial=1))
        dense_strides, total = list(reversed(dense[:-1])), dense[-1]
        if dense_strides != list(shape.strides):
            raise ValueError(
                f"cannot flatten sparse mesh: ndslice.strides={list(shape.strides)} != "
                f"dense_strides={dense_strides}"
            )
        return self._new_with_shape(
            Shape([name], [total], [1], shape.offset), ("flatten", {"name": name})
        )

    def rename(self, **kwargs: str) -> Self:
        """Rename dimensions: ``mesh.rename(hosts="dp", gpus="tp")``."""
        return self.split(**{k: (v,) for k, v in kwargs.items()})

    def size(self, dim: str | Sequence[str] | None = None) -> int:
        """Number of points along ``dim`` (a label or several); all of them when ``None``."""
        labels = self._shape.labels
        if dim is None:
            dim = labels
        if isinstance(dim, str):
            if dim not in labels:
                raise KeyError(f"{self} does not have dimension {dim!r}")
            return self._shape.sizes[labels.index(dim)]
        return math.prod(self.size(d) for d in dim)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(self._shape.labels, self._shape.sizes, strict=True))

    @property
    def extent(self) -> Extent:
        return self._shape.extent

    def __len__(self) -> int:
        return self._shape.extent.nelements


class ValueMesh(ShapeOps, Generic[T]):
    """One value per point of the mesh a call went to, in row-major order (Monarch's)."""

    def __init__(self, shape: Shape | Extent, values: Sequence[T]) -> None:
        shape = shape if isinstance(shape, Shape) else Shape.dense(shape)
        if len(values) != shape.extent.nelements:
            raise ValueError(f"{len(values)} values for a mesh of {shape.extent.nelements} points")
        self.__shape = shape
        self._values = list(values)

    @property
    def _shape(self) -> Shape:
        return self.__shape

    def _new_with_shape(self, shape: Shape, view: tuple[str, dict[str, Any]]) -> ValueMesh[T]:
        position = {rank: i for i, rank in enumerate(self.__shape.ranks())}
        return ValueMesh(shape, [self._values[position[rank]] for rank in shape.ranks()])

    def get(self, rank: int) -> T:
        """The value at row-major position ``rank``."""
        if not 0 <= rank < len(self._values):
            raise ValueError(f"index {rank} out of range (len={len(self._values)})")
        return self._values[rank]

    def item(self, **coords: int) -> T:
        """The value at ``coords``; ``.item()`` on a single-point mesh. Unlike Monarch, labels of
        size 1 may be left out (see DIFFERENCES in the README)."""
        shape = self.__shape
        missing = [
            label
            for label, size in zip(shape.labels, shape.sizes, strict=True)
            if label not in coords and size != 1
        ]
        if missing:
            raise KeyError(missing[0])
        extra = [label for label in coords if label not in shape.labels]
        if extra:
            raise KeyError(f"item has extra dimensions: {extra}")
        position = 0
        for label, size in zip(shape.labels, shape.sizes, strict=True):
            index = coords.get(label, 0)
            if not 0 <= index < size:
                raise IndexError(
                    f"{label}={index} is out of range for a dimension of size {size} "
                    f"(0..{size - 1})"
                )
            position = position * size + index
        return self._values[position]

    def items(self) -> Iterator[tuple[Point, T]]:
        extent = self.__shape.extent
        return ((Point(i, extent), v) for i, v in enumerate(self._values))

    def values(self) -> list[T]:
        return list(self._values)

    def __iter__(self) -> Iterator[tuple[Point, T]]:
        return self.items()

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ValueMesh)
            and other.extent == self.extent
            and other._values == self._values
        )

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return ValueMesh, (self.__shape, self._values)

    def __repr__(self) -> str:
        body = indent(pformat(tuple(self.items())), "  ")
        return f"ValueMesh({self.extent}):\n{body}"
