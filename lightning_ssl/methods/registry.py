"""The registry entry of a method: what the CLI, the contract tests and the benchmarks need to know."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_ssl.methods.base import SSLMethod

__all__ = ["MethodEntry"]


@dataclass(frozen=True)
class MethodEntry:
    """A method of the library.

    Attributes:
        cls: the ``SSLMethod`` subclass.
        small: arguments that shrink the method's heads, buffers and grids for smoke runs on 16-32
            pixel images with a small backbone (the contract tests and the benchmarks' smoke modes);
            the paper defaults stay the class's defaults.
        cifar: arguments the method needs on 32x32 images beyond ``small_image=True`` (e.g. CPC's
            patch grid), used by the CIFAR-10 benchmarks.
    """

    cls: type[SSLMethod]
    small: Mapping[str, Any] = field(default_factory=dict)
    cifar: Mapping[str, Any] = field(default_factory=dict)

    def build(self, *, size: str = "paper", **kwargs) -> SSLMethod:
        """An instance with the paper defaults (``size="paper"``), the ``small`` or the ``cifar`` arguments,
        and ``kwargs`` on top."""
        extra = {"paper": {}, "small": self.small, "cifar": self.cifar}[size]
        return self.cls(**{**extra, **kwargs})
