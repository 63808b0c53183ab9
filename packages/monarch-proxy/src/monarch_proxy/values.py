"""Results of mesh calls: a ValueMesh with coordinates, shaped like Monarch's ``ValueMesh``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Extent:
    """Named dimensions of a mesh, e.g. ``Extent(("hosts", "gpus"), (2, 4))``."""

    labels: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def nelements(self) -> int:
        n = 1
        for size in self.sizes:
            n *= size
        return n

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.labels, self.sizes, strict=True))

    def points(self) -> Iterator[Point]:
        """Every coordinate in row-major order (the last label varies fastest)."""
        for rank, coords in enumerate(itertools.product(*(range(s) for s in self.sizes))):
            yield Point(rank, dict(zip(self.labels, coords, strict=True)), self)

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{label}: {size}" for label, size in zip(self.labels, self.sizes, strict=True)
        )
        return "{" + inner + "}"


@dataclass(frozen=True, slots=True)
class Point:
    """A coordinate in a mesh: its row-major rank and its value along each label."""

    rank: int
    coords: dict[str, int]
    extent: Extent

    def __getitem__(self, label: str) -> int:
        return self.coords[label]

    def __repr__(self) -> str:
        return repr(self.coords)


class ValueMesh(Generic[T]):
    """One value per point of the mesh a call went to, in row-major order."""

    def __init__(self, extent: Extent, values: Sequence[T]) -> None:
        if len(values) != extent.nelements:
            raise ValueError(f"{len(values)} values for a mesh of {extent.nelements} points")
        self.extent = extent
        self._values = list(values)

    def items(self) -> Iterator[tuple[Point, T]]:
        return zip(self.extent.points(), self._values, strict=True)

    def values(self) -> Iterator[T]:
        return iter(self._values)

    def item(self, **coords: int) -> T:
        """The value at ``coords``; labels of size 1 may be left out."""
        unknown = set(coords) - set(self.extent.labels)
        if unknown:
            raise KeyError(f"item() got labels {sorted(unknown)} not in {self.extent!r}")
        needed = {
            lb for lb, size in zip(self.extent.labels, self.extent.sizes, strict=True) if size > 1
        }
        if needed - set(coords):
            raise KeyError(f"item() needs a coordinate for {sorted(needed - set(coords))}")
        rank = 0
        for label, size in zip(self.extent.labels, self.extent.sizes, strict=True):
            index = coords.get(label, 0)
            if not 0 <= index < size:
                raise IndexError(f"{label}={index} is outside 0..{size - 1}")
            rank = rank * size + index
        return self._values[rank]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[tuple[Point, T]]:
        return self.items()

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ValueMesh)
            and other.extent == self.extent
            and other._values == self._values
        )

    def __repr__(self) -> str:
        body = ", ".join(f"({p!r}, {v!r})" for p, v in self.items())
        return f"ValueMesh({self.extent!r}: {body})"
