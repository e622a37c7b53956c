"""The chapter's linear regression: n = 1,000,000, full-batch Adam with lr 0.1.

One round is a block of 20 training steps (the chapter trains 500; convergence over all 500
is the job of the training-core tests). Variants, all on the same data and initial weights:

* ``chapter``: the chapter's loop, nn.Module + torch.optim.Adam + nn.MSELoss.
* ``fnnet-eager`` / ``fnnet-eager-donate``: ``make_train_step`` with ``donate`` off / on; the
  loss is the one a user writes, ``F.mse_loss(model.apply(params, x), y)``.
* ``fnnet-jit-donate``: ``make_train_step(jit=True, donate=True)``; the compilation is the
  first call, reported as ``extra_info["first_call_s"]`` and never part of the rounds.
* ``fnnet-jit-cudagraphs`` (CUDA): the same with ``compile_options={"mode": "reduce-overhead"}``.

Targets (issue 6): on CPU eager <= 1.0x and jit <= 0.6x the chapter's time per step; on a
GPU jit <= 0.3x the chapter's eager GPU loop.
"""

import pytest

from fnnet.bench import workloads as W


@pytest.mark.parametrize("variant", W.LINREG_VARIANTS)
def test_linreg(benchmark, device, build_case, run_case, variant):
    case = build_case("linreg", variant, device, steps=20)
    run_case(benchmark, case, rounds=10, warmup_rounds=2)
