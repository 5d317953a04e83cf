"""A Triton kernel's switch to its torch path after it failed to compile or launch on this GPU.

Used by ``impl="auto"`` only: a forced ``impl="triton"`` still raises, so failures stay visible.
"""

from __future__ import annotations

import warnings


class TritonFallback:
    """Remembers the first failure of one Triton kernel and warns about it once."""

    def __init__(self, kernel: str):
        self.kernel = kernel
        self.failure: str | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def record(self, err: Exception) -> None:
        self.failure = f"{type(err).__name__}: {err}"
        warnings.warn(f"the Triton {self.kernel} kernel failed on this GPU ({self.failure}); using "
                      "the torch path from now on. Please report this with your GPU and Triton "
                      "version.", RuntimeWarning, stacklevel=3)
