"""attnprog: explain attention heads with executable programs."""

from attnprog.errors import AttnProgError

__version__ = "0.1.0"
__all__ = ["AttnProgError", "__version__"]
