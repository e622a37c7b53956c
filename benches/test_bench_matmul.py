"""The chapter's matmul, (10000 x 200) @ (200 x 10000), timed properly.

The chapter stops its clock right after ``torch.matmul`` returns, which on CUDA is when the
kernel was queued, not when it finished; here every round synchronises inside the timed
call. Variants: ``fp32`` (CPU and CUDA; TF32 off), and on CUDA ``tf32`` (TF32 tensor cores)
and ``bf16`` (bfloat16 inputs). ``extra_info["throughput"]`` is GFLOP/s (2 m^2 k flops).
"""

import pytest

from fnnet.bench import workloads as W


@pytest.mark.parametrize("variant", W.MATMUL_VARIANTS)
def test_matmul(benchmark, device, build_case, run_case, variant):
    case = build_case("matmul", variant, device)
    if device.type == "cuda":
        run_case(benchmark, case, rounds=20, warmup_rounds=3)
    else:
        run_case(benchmark, case, rounds=5, warmup_rounds=1)
