"""The chapter's CNN: one epoch, batch 128, over random MNIST-shaped data.

12,800 samples on CPU, 60,000 (the MNIST training set's size) on CUDA. One round is one
epoch; ``extra_info["throughput"]`` is samples/s. Variants:

* ``chapter-workers4``: the chapter's set-up, ``DataLoader(TensorDataset, batch_size=128,
  shuffle=True, num_workers=4)``, ``.to(device)`` per batch, nn.Module + torch.optim.Adam
  (lr 0.02) + nn.CrossEntropyLoss.
* ``chapter-workers0``: the same loop with ``num_workers=0``.
* ``fnnet-trainer``: ``fnnet.Trainer.fit`` over ``ArrayLoader(..., device=device)``: the whole
  dataset lives on the device and batches are index gathers there.
* ``fnnet-trainer-jit``: the same with ``Trainer(jit=True)``; the first epoch (which compiles)
  is ``extra_info["first_call_s"]``, not a round.
* The eager Trainer's options, measured as options: on CPU ``fnnet-trainer-contiguous``
  (``memory_format="contiguous"``: NCHW as the chapter, where the CPU default is channels-last);
  on CUDA ``fnnet-trainer-channels-last`` and ``fnnet-trainer-bf16`` (``precision="bf16"``).

Targets (issue 6): on CPU fnnet-trainer >= 1.0x chapter-workers0 and >= 1.2x
chapter-workers4 in samples/s; on an H100/H200 a 60,000-sample epoch in <= 1.0 s.
"""

import pytest

from fnnet.bench import workloads as W


@pytest.mark.parametrize("variant", W.CNN_VARIANTS)
def test_cnn(benchmark, device, build_case, run_case, variant):
    case = build_case("cnn", variant, device)
    run_case(benchmark, case, rounds=3, warmup_rounds=1)
