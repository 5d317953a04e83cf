"""The package's own exception types: every error a user can cause is one of these."""


class AttnProgError(Exception):
    """Base class; the CLI prints the message without a traceback and exits non-zero."""


class ModelError(AttnProgError):
    """A model could not be found or loaded."""


class DeviceError(AttnProgError):
    """The device asked for is not one torch knows, or this machine does not have it."""


class CorpusError(AttnProgError):
    """A corpus file or data set is missing, empty or malformed."""


class StoreError(AttnProgError):
    """A saved attention store, table or output file is missing or does not match."""


class ProgramError(AttnProgError):
    """A program is malformed or fails validation."""


class SandboxError(AttnProgError):
    """The sandbox could not run programs (not a single program's failure)."""


class LLMError(AttnProgError):
    """The LLM endpoint is unreachable or answered with something unusable."""


class ClusterError(AttnProgError):
    """Ray is missing, the cluster is unreachable, or it lost more workers than a run can retry."""
