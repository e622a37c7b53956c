"""Data-parallel and distributed benchmarks: reserved for the issue that adds them.

Nothing is measured here yet, on purpose: fnnet's data parallelism (``fnnet/parallel.py``)
and distributed training (``fnnet/distributed.py``) have not landed, and a benchmark of
something that does not exist would only report a skip.

When they land, each benchmark here takes the ``device_group`` fixture from
``benches/conftest.py`` (``[cpu]``, ``[cuda:0]``, two GPUs, all GPUs; groups this machine
cannot form skip with the reason) and times the chapter's CNN epoch through the
data-parallel step, with the one-device group as its baseline::

    @pytest.mark.parametrize("variant", ["fnnet-trainer", "fnnet-trainer-jit"])
    def test_cnn_data_parallel(benchmark, device_group, run_case, variant):
        case = ...  # a shared case from fnnet._workloads, built for the device group
        run_case(benchmark, case, rounds=3, warmup_rounds=1)

Add the workload to ``fnnet/_workloads.py`` first, so ``fnnet bench`` and this module time
the same code, and report samples/s and the scaling efficiency (samples/s on N devices over
N times samples/s on one) in ``extra_info``.
"""
