"""engine.bench: the hardware bound is read from the device; the override table has its columns."""

import pytest
import torch

from attnprog.kernels.bench import hardware_bound, run_override_bench


def test_cpu_has_no_gpu_bound():
    assert hardware_bound("cpu") == (None, "")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_bound_comes_from_the_devices_sms_and_clock():
    bound, note = hardware_bound("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert f"{sms} SMs" in note and bound > sms * 64 * 0.5e9 / 2


def test_override_bench_times_four_variants_per_layer():
    rows = run_override_bench("cpu", dtype=torch.float32, shapes=((1, 4, 2, 16, 8),),
                              verbose=False)
    assert len(rows) == 1
    row = rows[0]
    assert {"sdpa_us", "fused_0_us", "fused_us", "eager_us"} <= set(row)
    assert all(row[k] > 0 for k in ("sdpa_us", "fused_0_us", "fused_us", "eager_us"))
