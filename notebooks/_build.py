"""Build ``chapter_6_3_gpu_training.ipynb`` from the cells below: edit here, then run

    python notebooks/_build.py

The notebook is written without outputs (``tests/test_notebooks.py`` runs it and checks that
the committed file is what this script writes).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from textwrap import dedent

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "chapter_6_3_gpu_training.ipynb"


def _jax_section() -> list:
    """The "Coming from JAX" cells, kept in their own file (``_jax_section.py``)."""
    spec = importlib.util.spec_from_file_location("_jax_section", HERE / "_jax_section.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [new_markdown_cell(text.strip("\n")) if kind == "md" else new_code_cell(text.strip("\n"))
            for kind, text in module.CELLS]


def md(text: str):
    return new_markdown_cell(dedent(text).strip("\n"))


def code(text: str):
    return new_code_cell(dedent(text).strip("\n"))


JAX_SECTION = _jax_section()

CELLS = [
    md("""
    # 6-3, use GPU to train model — with fnnet

    This is the tutorial chapter *"6-3, use GPU to train model"* done again with **fnnet**, section by
    section: GPU information, moving tensors and models between CPU and GPU, multiple GPUs, clearing
    the cache, a CPU-vs-GPU matrix multiplication, a linear regression trained on CPU and GPU, and the
    chapter's CNN trained with a Keras-like `fit`, checkpoints included.

    It runs top to bottom on a CPU-only machine (under a minute on 2 cores) and uses the GPU when there
    is one (about 20 seconds on an H200). Three things differ from the chapter throughout:

    * **No hidden state.** A model is a pure function of a parameter dict; training state
      (`fnnet.TrainState`: params, optimizer state, step, key) is data that each step returns anew.
      Nothing is moved "in place" with `module.to(device)` (the one exception is deliberate: a
      `Trainer` given a plain `nn.Module` trains that module, as Keras and Lightning do).
    * **Explicit random keys.** Initialisation, shuffling and dropout take an `fnnet.random.key(seed)`;
      nothing draws from torch's global RNG behind your back, so a run is reproducible from its keys
      (on a GPU, up to the nondeterministic kernels cuDNN may pick for convolutions).
    * **Synchronised timings.** CUDA runs asynchronously: every time measured here waits for the GPU
      (`fnnet.synchronize`) before the clock is read, after a warm-up, as the median of several runs.
    """),
    code("""
    %matplotlib inline
    import statistics
    import time

    import torch
    import torch.nn.functional as F
    from torch import nn

    import tempfile
    from pathlib import Path

    import fnnet
    from fnnet import optim

    DEVICE = fnnet.default_device()  # cuda:0 when there is a GPU, else cpu
    ON_GPU = DEVICE.type == "cuda"
    work_dir = tempfile.TemporaryDirectory(prefix="fnnet-chapter-")  # removed by the last cell
    WORK = Path(work_dir.name)  # files this notebook writes go here
    print(f"fnnet {fnnet.__version__}, torch {torch.__version__}; computing on {DEVICE}; files in {WORK}")
    """),
    md("""
    ## 0. View GPU information

    The chapter asks `torch.cuda.is_available()` and `torch.cuda.device_count()`.
    `fnnet.device_info()` gathers that and more in one dict (the command line `fnnet info` prints it);
    `fnnet.devices()` lists the accelerators (or `[cpu]` when there is none) and
    `fnnet.default_device()` is the one `"auto"` means everywhere in fnnet.
    """),
    code("""
    info = fnnet.device_info()
    print("if_cuda =", info["cuda_available"])
    print("gpu_count =", info["device_count"])
    print("devices():", fnnet.devices())
    print("default_device():", fnnet.default_device())
    for d in info["devices"]:
        print(f"  cuda:{d['index']}: {d['name']}, {d['total_memory_bytes'] / 2**30:.1f} GiB, "
              f"compute capability {d['capability']}, {d['multiprocessors']} SMs")
    print(f"torch {info['torch']}, CUDA {info['cuda_version']}, "
          f"{info['cpu_threads']} CPU threads for torch ({info['cpu_count']} cores)")
    """),
    md("""
    ## 1. Move tensors between CPU and GPU

    `fnnet.place(tree, device)` is the one way fnnet moves data. It takes a tensor or any *tree* of
    them (a dict of parameters, an `(x, y)` batch, an optimizer state) and returns the same structure
    with every tensor on `device`; other leaves pass through. A tensor already there is returned as
    is, so placing twice costs nothing.

    The chapter guards its GPU lines with `if torch.cuda.is_available()` (or hard-codes `"cuda:0"`,
    which fails on a CPU machine). With `"auto"` the same line runs everywhere: it means the GPU when
    there is one, else the CPU.
    """),
    code("""
    tensor = torch.rand((100, 100))
    tensor_dev = fnnet.place(tensor, "auto")  # chapter: tensor.to("cuda:0") / tensor.cuda()
    print(tensor_dev.device, tensor_dev.is_cuda)

    tensor_cpu = fnnet.place(tensor_dev, "cpu")  # chapter: tensor_gpu.to("cpu") / .cpu()
    print(tensor_cpu.device)
    print("already there, so no copy:", fnnet.place(tensor_cpu, "cpu") is tensor_cpu)
    """),
    md("""
    Whole trees move in one call: a parameter dict and a batch, together. The chapter moves
    `features` and `labels` one by one.
    """),
    code("""
    params = {"w": torch.randn(1, 2), "b": torch.zeros(1, 1)}
    batch = (torch.rand(8, 2), torch.rand(8, 1))  # (features, labels)

    params_dev, (features, labels) = fnnet.place((params, batch), "auto")
    print({name: str(p.device) for name, p in params_dev.items()})
    print(features.device, labels.device)
    """),
    md("""
    Asking for a device that this machine does not have is a `ValueError` that lists the devices
    that exist (here: one GPU more than there are, so it fails on every machine).
    """),
    code("""
    missing = f"cuda:{fnnet.device_count()}"
    try:
        fnnet.place(tensor, missing)
    except ValueError as exc:
        print(f"place(tensor, {missing!r}) -> ValueError: {exc}")
    """),
    md("""
    ## 2. A model as a pure function; moving its parameters

    The chapter calls `net.to("cuda:0")`, which moves the module's parameters *in place*.
    `fnnet.functional(module)` splits a module into data, `model.params` (a dict keyed exactly like
    `module.state_dict()`), and a weight-free function, `model.apply(params, x)`. Moving the model is
    moving its params dict with `place`; `net` itself is never touched.
    """),
    code("""
    net = nn.Linear(2, 1)
    model = fnnet.functional(net)
    print(model)
    print({name: tuple(p.shape) for name, p in model.params.items()})

    params = fnnet.place(model.params, "auto")  # chapter: net.to("cuda:0")
    print({name: str(p.device) for name, p in params.items()})
    print("net's own weight stays on", net.weight.device)

    x = fnnet.place(torch.rand(4, 2), "auto")
    print(model.apply(params, x))
    """),
    md("""
    Fresh parameters come from a key, not from torch's global RNG: `model.init(key)` re-runs each
    layer's `reset_parameters()` under it, so the same key gives the same parameters.
    """),
    code("""
    p1 = model.init(fnnet.random.key(0))
    p2 = model.init(fnnet.random.key(0))
    p3 = model.init(fnnet.random.key(1))
    print("same key, same params:", all(torch.equal(p1[k], p2[k]) for k in p1))
    print("another key, other params:", not torch.equal(p1["weight"], p3["weight"]))
    """),
    md("""
    **`state_dict` interop.** The chapter saves `model.module.state_dict()` with `torch.save` and loads
    it into a fresh `nn.Linear`. fnnet's params *are* a state dict: `fnnet.save` writes them (from any
    device, atomically, as safetensors) and `nn.Module.load_state_dict` takes what `fnnet.load` reads.
    There is no `.module` to remember, because fnnet never wraps the model.
    """),
    code("""
    fnnet.save(WORK / "model_parameter.safetensors", params)

    linear = nn.Linear(2, 1)
    linear.load_state_dict(fnnet.load(WORK / "model_parameter.safetensors"))
    print("loaded into nn.Linear:", torch.equal(linear.weight, params["weight"].cpu()))

    # and back: a module's state_dict is a params dict for model.apply
    print(model.apply(linear.state_dict(), torch.ones(1, 2)), linear(torch.ones(1, 2)))
    """),
    md("""
    ## 3. Multiple GPUs: data parallelism by hand

    The chapter wraps the model in `nn.DataParallel`, which copies the module to every GPU at each
    call, splits each batch between them, piles the outputs and the loss onto GPU 0 and prefixes
    every saved key with `module.`. fnnet does the same job in the open, as another way to *build*
    the step `step(state, batch) -> (state, metrics)`: `fnnet.parallel.scatter` splits the batch into
    contiguous shards (sizes differ by at most one), the gradient function runs on every shard
    against the params' copy on that device, the gradients are averaged **weighted by shard size**
    on the first device, and the update runs there once. For a mean-reduced loss that is exactly
    the single-device step on the whole batch.

    The devices are the chapter's Lightning `gpus=` forms (`fnnet.parse_devices`: `0` is the CPU, `n`
    the first `n` GPUs, `-1` all, `[0, 1]` those indices) or explicit names, which may repeat: on a
    machine with one GPU (or none) the cell below runs two shards on one device, which exercises
    everything but the copies between devices.
    """),
    code("""
    missing = [fnnet.device_count()]  # a GPU index one past the last: never exists
    for request in ["auto", "cpu", 0, 1, 2, -1, [0, 1], "cuda:0", missing]:
        try:
            print(f"devices={request!r:<8} -> {fnnet.parse_devices(request)}")
        except ValueError as exc:
            print(f"devices={request!r:<8} -> ValueError: {exc}")
    """),
    code("""
    shard_devices = ([f"cuda:{i}" for i in range(fnnet.device_count())] if fnnet.device_count() >= 2
                     else [str(DEVICE)] * 2)
    print("data parallel over", shard_devices)
    print("a batch of 7 splits as", fnnet.parallel.shard_sizes(7, len(shard_devices)))

    dp_net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    dp_model = fnnet.functional(dp_net)
    dp_loss = lambda params, batch: F.mse_loss(dp_model.apply(params, batch[0]), batch[1])
    dp_opt = optim.adam(0.05)
    gen = torch.Generator().manual_seed(0)
    dp_batches = [fnnet.place((torch.randn(n, 2, generator=gen, dtype=torch.float64),
                               torch.randn(n, 1, generator=gen, dtype=torch.float64)), shard_devices[0])
                  for n in (7, 32, 15)]  # uneven batches on purpose

    start = fnnet.place(dp_model.params, shard_devices[0])
    one, many = fnnet.TrainState.create(start, dp_opt), fnnet.TrainState.create(start, dp_opt)
    one_step = fnnet.make_train_step(dp_loss, dp_opt)
    many_step = fnnet.make_train_step(dp_loss, dp_opt, devices=shard_devices)
    for batch in dp_batches * 3:
        one, _ = one_step(one, batch)
        many, _ = many_step(many, batch)
    gap = max(float((one.params[k] - many.params[k]).abs().max()) for k in one.params)
    print(f"largest difference from single-device training after {one.step} steps: {gap:.1e}")
    """),
    md("""
    The `Trainer` takes the same lists: `fnnet.Trainer(..., devices=-1)` trains on every GPU, and its
    checkpoints are ordinary ones (no `module.` prefix), which load into a run on any number of
    devices. A `state_dict` saved by the chapter's `nn.DataParallel` model loads too:
    `fnnet.load_state_dict` strips the `module.` prefix, with a warning.
    """),
    md("""
    ## 4. Clear the CUDA cache

    PyTorch keeps freed GPU memory *reserved* for reuse; `fnnet.empty_cache()` hands it back to the
    driver (the chapter's `torch.cuda.empty_cache()`), and `fnnet.memory_stats()` shows the effect.
    Both are safe on a CPU-only machine: the cache call does nothing and the statistics are zeros,
    since torch keeps none for the CPU.
    """),
    code("""
    def show(when):
        stats = fnnet.memory_stats(DEVICE)
        print(f"{when:<22}" + "  ".join(f"{k}={v / 2**20:.0f} MiB" for k, v in stats.items()))

    show("before")
    big = torch.empty(64, 1024, 1024, device=DEVICE)  # 256 MiB
    show("with a 256 MiB tensor")
    del big
    show("after del")
    fnnet.empty_cache()
    show("after empty_cache()")
    """),
    md("""
    ## 5. Matrix multiplication: CPU vs GPU, timed right

    The chapter times `torch.matmul(a, b)` with `time.time()` around a single call and reports
    0.645 s on the CPU against 0.0145 s on the GPU. The GPU number is not the multiplication: CUDA
    calls are **asynchronous**, `matmul` returns as soon as the kernel is queued, so the clock
    measured the kernel launch, plus, on a first call, one-time set-up (loading the GPU kernel,
    allocating memory for the result).
    Timing it right takes four things:

    1. **warm-up** runs first (library initialisation, memory allocation, kernel selection);
    2. **`fnnet.synchronize(device)`** before starting and before stopping the clock, so the GPU has
       finished the work being timed (on the CPU it does nothing);
    3. **several repeats**;
    4. the **median**, which one slow outlier does not move.

    The chapter's sizes are `(10000, 200) @ (200, 10000)`: 40 GFLOP and a 400 MB result. On a
    CPU-only machine this notebook uses `(2000, 200) @ (200, 2000)` instead (1.6 GFLOP) to stay
    fast; with a GPU it uses the chapter's sizes on both devices.
    """),
    code("""
    def benchmark(fn, device, *, repeats=5, warmup=2):
        \"\"\"Median wall-clock seconds of fn() on device, after warm-up, waiting for the device.\"\"\"
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            fnnet.synchronize(device)  # nothing queued from before
            tic = time.perf_counter()
            fn()
            fnnet.synchronize(device)  # the work has finished, not just been queued
            times.append(time.perf_counter() - tic)
        return statistics.median(times)


    m, k = (10_000, 200) if ON_GPU else (2_000, 200)
    print(f"({m}, {k}) @ ({k}, {m}){'' if ON_GPU else '  (smaller than the chapter: CPU-only machine)'}")
    flops = 2 * m * m * k
    gen = fnnet.random.generator(fnnet.random.key(0))

    a = torch.rand((m, k), generator=gen)
    b = torch.rand((k, m), generator=gen)
    t_cpu = benchmark(lambda: torch.matmul(a, b), "cpu")
    print(f"cpu : median {t_cpu * 1e3:8.2f} ms  ({flops / t_cpu / 1e9:7.1f} GFLOP/s)  {a.device} {b.device}")
    """),
    md("""
    On the GPU: `a` is created there directly, `b` is made on the CPU and placed, as in the chapter.
    The first two timings repeat the chapter's mistake (one call, no synchronisation): the first
    call mostly measures one-time set-up, a later one only the launch, while the kernel is still
    running. The last one is measured right.
    """),
    code("""
    def unsynchronised(fn):
        \"\"\"The chapter's way: the clock around one call, without waiting for the GPU.\"\"\"
        tic = time.perf_counter()
        fn()
        return time.perf_counter() - tic


    if ON_GPU:
        a_gpu = torch.rand((m, k), device=DEVICE)  # created on the GPU
        b_gpu = fnnet.place(torch.rand((k, m)), DEVICE)  # created on the CPU, then placed
        fnnet.synchronize(DEVICE)
        first = unsynchronised(lambda: torch.matmul(a_gpu, b_gpu))
        fnnet.synchronize(DEVICE)
        later = unsynchronised(lambda: torch.matmul(a_gpu, b_gpu))
        fnnet.synchronize(DEVICE)
        print(f"gpu, one call, no sync, first : {first * 1e3:8.3f} ms  (mostly one-time set-up)")
        print(f"gpu, one call, no sync, later : {later * 1e3:8.3f} ms  (the launch; the kernel still runs)")

        t_gpu = benchmark(lambda: torch.matmul(a_gpu, b_gpu), DEVICE)
        print(f"gpu, synchronised median      : {t_gpu * 1e3:8.3f} ms  ({flops / t_gpu / 1e9:7.1f} GFLOP/s)  "
              f"{a_gpu.device} {b_gpu.device}")
        print(f"speed-up over the CPU         : {t_cpu / t_gpu:.0f}x")
        del a_gpu, b_gpu
    else:
        print("no GPU here: only the CPU timing above")
    """),
    md("""
    ## 6. Linear regression on CPU and GPU

    The chapter writes the same training code twice, once for the CPU and once with `.cuda()` calls.
    Here it is written once, as a function of the device, with fnnet's pieces:

    * the chapter's data, `fnnet.models.linreg_data(n)`: `y = x @ [2, -3]^T + 10 + noise` (std 2, so the
      best possible MSE is about 4), placed on the device with one `place`;
    * the chapter's `LinearRegression` module as a pure function, initialised from a key
      (`init_fn`: `w ~ N(0, 1)`, `b = 0`, as in the chapter, but drawn from the key);
    * `fnnet.optim.adam(0.1)` (the chapter's `torch.optim.Adam(lr=0.1)`, same numbers) and
      `fnnet.make_train_step`, which returns `step(state, batch) -> (state, metrics)`: one call
      computes the gradient, runs Adam, applies the update and returns a *new* state. There is no
      `zero_grad()`, no `backward()`, no optimizer object holding state.

    `metrics["loss"]` stays on the device: reading it with `float(...)` waits for the device, so the
    loop reads it only every 50 steps, and the time is taken after a final `synchronize`.
    """),
    code("""
    def init_linreg(key, params):
        return {"w": fnnet.random.normal(key, (1, 2)), "b": torch.zeros(1, 1)}


    linreg = fnnet.functional(fnnet.models.LinearRegression(), init_fn=init_linreg)


    def mse(params, batch):
        x, y = batch
        return F.mse_loss(linreg.apply(params, x), y)


    def train_linreg(device, n, steps, *, lr=0.1, log_every=50):
        X, Y = fnnet.place(fnnet.models.linreg_data(n, seed=0), device)
        print(f"{n:,} samples on {X.device}, {steps} full-batch Adam steps")
        opt = optim.adam(lr)
        params = fnnet.place(linreg.init(fnnet.random.key(0)), device)
        state = fnnet.TrainState.create(params, opt)
        train_step = fnnet.make_train_step(mse, opt)

        fnnet.synchronize(device)
        tic = time.perf_counter()
        for step in range(steps):
            state, metrics = train_step(state, (X, Y))
            if step % log_every == 0:
                print({"step": step, "loss": float(metrics["loss"])})  # float() waits for the device
        fnnet.synchronize(device)
        elapsed = time.perf_counter() - tic

        w = state.params["w"].flatten().tolist()
        b = state.params["b"].item()
        print(f"w = [{w[0]:.4f}, {w[1]:.4f}] (true [2, -3]), b = {b:.4f} (true 10), "
              f"loss = {float(metrics['loss']):.4f}")
        print(f"time used: {elapsed:.2f} s ({elapsed / steps * 1e3:.2f} ms per step)")
        return state, elapsed
    """),
    md("""
    **1, use CPU.** The chapter uses `n = 1,000,000` samples and 500 steps; on the CPU this notebook
    uses `n = 200,000` and 300 steps to stay fast (Adam has converged by then).
    """),
    code("""
    state_cpu, time_cpu = train_linreg("cpu", n=200_000, steps=300)
    """),
    md("""
    **2, use GPU.** The same function, on the GPU, with the chapter's `n = 1,000,000` and 500 steps.
    """),
    code("""
    if ON_GPU:
        state_gpu, time_gpu = train_linreg(DEVICE, n=1_000_000, steps=500)
        print(f"samples x steps per second: cpu {200_000 * 300 / time_cpu:.3g}, gpu {1_000_000 * 500 / time_gpu:.3g}")
    else:
        print("no GPU here: skipped")
    """),
    md("""
    ## 7. The chapter's CNN with `fnnet.Trainer`

    The chapter trains its CNN on MNIST with torchkeras (`model.compile(..., device=device)`,
    `model.fit`) and with PyTorch Lightning (`pl.Trainer(gpus=...)`, `ModelCheckpoint`).
    `fnnet.Trainer` offers the same `fit` / `evaluate` / `predict` with checkpoints, as a thin loop
    around the same pure step as above; its state is `trainer.state`, a `TrainState`.

    **1, prepare data.** To run anywhere without a download, this notebook uses the 1,797 handwritten
    digits that ship with scikit-learn, resized to MNIST's 1 x 28 x 28 by `fnnet.load_digits()`
    (1,500 for training, 297 for testing). `fnnet.ArrayLoader` keeps the whole dataset on the device
    and batches it by slicing; shuffling needs a key, so the order is reproducible. The batches hold
    32 images rather than the chapter's 128, so that 3 epochs of this small set are 141 steps.
    (For the real MNIST: `fnnet.load_mnist(root)` reads the IDX files.)
    """),
    code("""
    (X_train, y_train), (X_test, y_test) = fnnet.load_digits()
    print(len(X_train), len(X_test), tuple(X_train.shape[1:]))

    train_loader = fnnet.ArrayLoader((X_train, y_train), 32, shuffle=True, key=fnnet.random.key(2), device="auto")
    val_loader = fnnet.ArrayLoader((X_test, y_test), 256, device="auto")
    print(train_loader)
    """),
    code("""
    fnnet.plot_samples(X_train, y_train, n=9);
    """),
    md("""
    **2, define the model.** The chapter's `CnnModel` is `fnnet.models.CnnModel`; `fnnet.summary`
    prints torchkeras' table (for 28 x 28 inputs; the chapter's table used 32 x 32, the parameter
    count is the same, 53,994).
    """),
    code("""
    cnn = fnnet.functional(fnnet.models.CnnModel())
    cnn_params = cnn.init(fnnet.random.key(1))
    table = fnnet.summary(cnn, input_shape=(1, 28, 28))
    """),
    md("""
    **3, train the model.** Where torchkeras takes `device=` in `compile` and Lightning `gpus=`, the
    `Trainer` takes `devices="auto"`. The optimizer is Adam, with lr 0.01 for the smaller batches
    (the chapter: 0.02); nothing is clipped or scheduled unless the optimizer says so (e.g.
    `optim.chain(optim.clip_by_global_norm(1.0), optim.adam(0.01))`). Dropout draws from the key
    `key=`. `ModelCheckpoint(monitor="val_loss")` keeps the best epoch's whole `TrainState` as an
    atomic safetensors file.
    """),
    code("""
    trainer = fnnet.Trainer(cnn, F.cross_entropy, optim.adam(0.01),
                            metrics={"accuracy": fnnet.metrics.accuracy},
                            devices="auto", key=fnnet.random.key(3), params=cnn_params)
    checkpoint = fnnet.callbacks.ModelCheckpoint(WORK / "cnn", monitor="val_loss")
    history = trainer.fit(train_loader, val_loader, epochs=3, callbacks=[checkpoint])
    """),
    md("""
    **4, evaluate the model.** `history` is a dict of per-epoch lists; `to_pandas()` gives the chapter's
    `dfhistory` and `fnnet.plot_history` its `plot_metric`.
    """),
    code("""
    dfhistory = history.to_pandas()
    dfhistory
    """),
    code("""
    fnnet.plot_history(history, "loss");
    """),
    code("""
    fnnet.plot_history(history, "accuracy");
    """),
    code("""
    trainer.evaluate(val_loader, prefix="val_")
    """),
    md("""
    **5, use the model.** `predict` returns the logits for every input, on the CPU by default.
    """),
    code("""
    logits = trainer.predict(X_test)
    print(logits[:3])
    print("predicted:", logits.argmax(dim=1)[:20].tolist())
    print("labels:   ", y_test[:20].tolist())
    """),
    code("""
    fnnet.plot_samples(X_test, y_test, n=9, predictions=logits);
    """),
    md("""
    **6, save and reload the model.** The checkpoint callback already saved the best epoch. A fresh
    `Trainer` loads it (the file is checked against the new trainer's state: key paths, shapes,
    dtypes) and evaluates to the same validation loss. And since the params inside are keyed like a
    `state_dict`, plain PyTorch reads them too: `fnnet.load_state_dict(path, prefix="state.params.")`
    goes straight into a fresh `nn.Module`.
    """),
    code("""
    print("best checkpoint:", checkpoint.best_model_path)
    print(f"best val_loss : {checkpoint.best_model_score:.6f}")

    trainer_clone = fnnet.Trainer(fnnet.models.CnnModel(), F.cross_entropy, optim.adam(0.01),
                                  metrics={"accuracy": fnnet.metrics.accuracy}, devices="auto")
    trainer_clone.load(checkpoint.best_model_path)
    reloaded = trainer_clone.evaluate(val_loader, prefix="val_")
    print(f"reloaded      : val_loss {reloaded['val_loss']:.6f}, val_accuracy {reloaded['val_accuracy']:.4f}")
    """),
    code("""
    net_clone = fnnet.models.CnnModel()
    net_clone.load_state_dict(fnnet.load_state_dict(checkpoint.best_model_path, prefix="state.params."))
    net_clone.eval()
    with torch.no_grad():
        accuracy = (net_clone(X_test).argmax(dim=1) == y_test).float().mean().item()
    print(f"plain nn.Module with the best checkpoint's params: accuracy {accuracy:.4f}")
    """),
    md("""
    ## 8. Beyond the chapter: a character-level GPT, trained by steps

    Today's models are transformers trained for a number of optimizer *steps*, not epochs.
    `fnnet.models.GPT` is GPT-2's architecture (nanoGPT's layout: pre-LayerNorm blocks in an
    `nn.ModuleList`, causal attention through `F.scaled_dot_product_attention`, the output layer tied
    to the token embedding). The text needs no download: `fnnet.datasets.load_text()` reads the Python
    standard library's own sources and encodes them character by character. `WindowLoader` draws random
    windows of `block_size + 1` characters under a key; `fit(max_steps=..., val_check_interval=...)`
    trains by steps and measures the held-out loss every few steps (a history row each, with the
    tokens per second). A small GPT and 200 steps here, a few seconds on a CPU; `fnnet train
    charlm` runs nanoGPT's configuration for 2,000 steps.
    """),
    code("""
    from fnnet.data import WindowLoader
    from fnnet.recipes import charlm_optimizer

    text = fnnet.datasets.load_text(max_chars=300_000)
    print(f"{len(text.train):,} training and {len(text.val):,} held-out characters, {len(text.vocab)} symbols")
    gpt = fnnet.models.GPT(len(text.vocab), block_size=32, n_layer=2, n_head=2, n_embd=48)
    gpt_params = fnnet.functional(gpt).init(fnnet.random.key(0))
    lm_trainer = fnnet.Trainer(gpt, fnnet.loss.cross_entropy, charlm_optimizer(gpt_params, lr=3e-3, warmup=30,
                                                                                decay_steps=200),
                               params=gpt_params, devices="auto")
    windows = WindowLoader(text.train, 32, 12, key=fnnet.random.key(1), device=lm_trainer.device)
    held_out = next(iter(WindowLoader(text.val, 32, 160, key=fnnet.random.key(2), windows_per_epoch=160)))
    lm_history = lm_trainer.fit(windows, fnnet.ArrayLoader(held_out, 32, device=lm_trainer.device),
                                max_steps=200, val_check_interval=50, verbose=0)
    for step, loss, val, tps in zip(lm_history["step"], lm_history["loss"], lm_history["val_loss"],
                                    lm_history["tokens_per_sec"]):
        print(f"step {step:3d}  train loss {loss:.3f}  held-out loss {val:.3f}  {tps:,.0f} tokens/s")
    """),
    code("""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(lm_history["step"], lm_history["loss"], "b--", label="train (since the previous check)")
    ax.plot(lm_history["step"], lm_history["val_loss"], "r-", label="held out")
    ax.set_xlabel("optimizer step"); ax.set_ylabel("cross-entropy (nats per character)"); ax.legend()
    plt.show()
    """),
    md("""
    **Sampling under a key.** `fnnet.generate` continues a prompt one character at a time, drawing with
    `fnnet.random.categorical` (JAX's) under `fold_in(key, i)`: the same key gives the same text, and
    torch's global RNG is never touched. After 200 steps it has learned the look of Python code, not yet its words.
    """),
    code("""
    prompt = text.vocab.encode("def ").reshape(1, -1).to(lm_trainer.device)
    ids = fnnet.generate(lm_trainer.model, lm_trainer.state.params, prompt, 200, key=fnnet.random.key(3),
                         temperature=0.8)
    again = fnnet.generate(lm_trainer.model, lm_trainer.state.params, prompt, 200, key=fnnet.random.key(3),
                           temperature=0.8)
    print(text.vocab.decode(ids[0]))
    print("same key, same text:", torch.equal(ids, again))
    """),
    *JAX_SECTION,
    md("""
    ## What changed from the chapter, in short

    | chapter | fnnet |
    | --- | --- |
    | `torch.cuda.is_available()`, `device_count()` | `fnnet.device_info()`, `devices()`, `default_device()` |
    | `x.to("cuda:0")`, `x.cuda()`, guarded by `if torch.cuda.is_available()` | `fnnet.place(tree, "auto")`, for tensors, params and batches alike |
    | `net.to(device)` moves weights in place | `params = fnnet.place(model.params, device)`; the module is untouched |
    | `nn.DataParallel`, `model.module.state_dict()` | `make_train_step(..., devices=[...])`, `Trainer(devices=-1)`: shards weighted exactly; params are always a plain state dict |
    | `torch.cuda.empty_cache()` | `fnnet.empty_cache()`, `fnnet.memory_stats()`, no-ops on CPU |
    | `time.time()` around one asynchronous call | warm-up, `fnnet.synchronize`, repeats, median |
    | `optimizer.zero_grad(); loss.backward(); optimizer.step()` | `state, metrics = train_step(state, batch)` |
    | global RNG, `pl.seed_everything` | explicit keys for init, shuffling and dropout |
    | torchkeras `compile(device=)` / Lightning `gpus=` | `fnnet.Trainer(..., devices="auto")`, `ModelCheckpoint`, `History` |
    """),
    md("""
    ## Clean up

    The files this notebook wrote (the saved `nn.Linear`, the CNN's checkpoints) were in a temporary
    folder: remove it. (Were a cell to fail first, the folder goes when the kernel stops.)
    """),
    code("""
    work_dir.cleanup()
    print(f"removed {WORK}: {not WORK.exists()}")
    """),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook(cells=copy.deepcopy(CELLS))
    # stable cell ids, so that rebuilding without changes writes the same file
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    return nb


def main(argv: list[str] | None = None) -> int:
    nb = build()
    nbformat.validate(nb)
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK} ({len(nb.cells)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
