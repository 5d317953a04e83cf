"""attnprog: explain attention heads with executable programs."""

from attnprog.errors import AttnProgError

__version__ = "0.1.0"
__all__ = ["AttnProgError", "Surrogate", "__version__"]


def __getattr__(name: str):
    # imported on first use: ``import attnprog`` (and every sandbox worker) stays free of torch
    if name == "Surrogate":
        from attnprog.engine.surrogate import Surrogate

        return Surrogate
    raise AttributeError(f"module 'attnprog' has no attribute {name!r}")
