"""The device the Triton kernels are tested on: the GPU when there is one, else the CPU under
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported).
The same assertions run on both."""

import pytest
import torch


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """cuda when available; cpu when the kernels were built for the interpreter; else skip."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    from attnprog.kernels import iou

    if iou.triton is None or not iou._interpreted():
        pytest.skip("needs Triton with CUDA, or TRITON_INTERPRET=1 set before Triton was imported")
    return torch.device("cpu")


def assert_close_scaled(got: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Equal to ``rel`` of the magnitude compared: elementwise rtol ``rel``, and an absolute
    slack of ``rel`` times the largest |expected| (sums over long texts grow with n²)."""
    expected = expected.to(got.device, torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(got.double(), expected, rtol=rel, atol=rel * max(scale, 1e-30))
