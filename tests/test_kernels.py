"""``kernels.run_warm_ups``: the first step's warm-ups (threads on CUDA, in line elsewhere; tests/test_cuda.py
exercises the threaded path with every optimizer it builds)."""

import pytest
import torch

from hf_q4shampoo.kernels import run_warm_ups


def test_warm_ups_without_cuda_run_in_line_in_order():
    done = []
    run_warm_ups([(None, lambda: done.append(1)), (torch.device("cpu"), lambda: done.append(2))])
    assert done == [1, 2]


def test_a_failing_warm_up_raises_its_error():
    def fail():
        raise ValueError("no kernel")

    with pytest.raises(ValueError, match="no kernel"):
        run_warm_ups([(None, lambda: None), (None, fail)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_warm_ups_run_every_task_with_its_device_current():
    seen = []
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    run_warm_ups(
        [(device, lambda: seen.append(torch.cuda.current_device())) for _ in range(4)] + [(None, lambda: None)]
    )
    assert seen == [device.index] * 4
