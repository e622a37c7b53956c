"""The notebook section "Coming from JAX": a flax model's weights in the chapter's CNN, and back.

``CELLS`` is a list of ``("md", text)`` / ``("code", text)`` in order, already dedented (for
``notebooks/_build.py``: ``[md(t) if kind == "md" else code(t) for kind, t in CELLS]``). The code
cells run top to bottom in a fresh kernel with only torch, fnnet (and its ``CnnModel``), jax and
flax; without JAX or flax the first code cell prints why and every later cell does nothing.
Everything runs on the CPU (about 5 s on 2 cores, most of it JAX compiling) and writes no file.

Lines a notebook test can check (regular expressions):
    r"flax -> torch: largest difference of the logits (\\S+)"        value < 1e-5
    r"torch -> flax: largest difference of the logits (\\S+)"        value < 1e-5
    r"test predictions agree on (\\d+) of (\\d+) images"             the two numbers equal
    r"round trip torch -> flax -> torch exact: True"
or, without JAX: r'needs JAX and flax: pip install "fnnet\\[jax\\]"'.
"""

CELLS = [
    ("md", """\
## Coming from JAX: a flax model's weights in the chapter's CNN, and back

`fnnet.interop` moves arrays, weights and checkpoints between fnnet and JAX, flax and optax
(`pip install "fnnet[jax]"`; without it this section says so and skips). Here a flax linen twin
of the chapter's `CnnModel` is initialised by flax, its weights go into the torch CNN with
`from_flax`, the torch CNN trains one epoch with fnnet, and the trained weights go back to flax
with `to_flax`. Both sides compute the same logits throughout.

What the conversion does: `Linear.weight (out, in)` becomes `Dense.kernel (in, out)`, and
`Conv2d.weight` (out, in, h, w) becomes `Conv.kernel` (h, w, in, out), because flax computes on
NHWC images where torch uses NCHW. The k-th torch layer of a kind is flax's automatic name
`<Kind>_k` (`Conv_0`, `Dense_1`), as flax names the layers of one `@nn.compact` method; a
`names=` mapping handles any other layout.
"""),
    ("code", """\
import torch
import fnnet
from fnnet.models import CnnModel

try:
    import jax
    import jax.numpy as jnp
    import flax
    import flax.linen as fnn
    HAVE_JAX = True
except ImportError as exc:
    HAVE_JAX = False
    print(f'This section needs JAX and flax: pip install "fnnet[jax]" (here: {exc}). Skipping it.')
else:
    from fnnet.interop import flax_names, from_flax, from_jax, to_flax, to_jax
    print(f"jax {jax.__version__}, flax {flax.__version__}; JAX computes on {jax.devices()}")
"""),
    ("md", """\
The chapter's CNN in flax: the same layers in forward order, one per line (flax numbers a layer
when it is built, so in `Dense(10)(relu(Dense(32)(x)))` the outer `Dense(10)` would be `Dense_0`).
`padding="VALID"` is torch's default `padding=0`; `Dropout2d` drops whole channels, which is
flax's `Dropout` broadcast over H and W; `AdaptiveMaxPool2d((1, 1))` and `Flatten` are a max over
H and W. `flax_names` shows which flax layer each torch layer meets.
"""),
    ("code", """\
if HAVE_JAX:
    class FlaxCnn(fnn.Module):
        \"\"\"The chapter's CnnModel in flax linen, on N x H x W x C images.\"\"\"

        @fnn.compact
        def __call__(self, x, train: bool = False):
            x = fnn.Conv(32, (3, 3), padding="VALID")(x)
            x = fnn.max_pool(x, (2, 2), strides=(2, 2))
            x = fnn.Conv(64, (5, 5), padding="VALID")(x)
            x = fnn.max_pool(x, (2, 2), strides=(2, 2))
            x = fnn.Dropout(0.1, broadcast_dims=(1, 2), deterministic=not train)(x)
            x = jnp.max(x, axis=(1, 2))
            x = fnn.relu(fnn.Dense(32)(x))
            return fnn.Dense(10)(x)

    flax_cnn = FlaxCnn()
    net = CnnModel()
    for torch_layer, flax_layer in flax_names(net).items():
        print(f"{torch_layer:<9} {type(net.get_submodule(torch_layer)).__name__:<7} <-> {flax_layer}")
"""),
    ("md", """\
**flax -> torch.** flax initialises the variables; `from_flax` returns fnnet `(params, buffers)`
keyed like `net.state_dict()`. `to_jax` / `from_jax` move arrays through DLPack (no copy where the
layout allows: `x.permute(0, 2, 3, 1)` is a view, so `to_jax` copies it into NHWC order).
Matching shapes are not matching models: a flax `x.reshape((n, -1))` flattens NHWC arrays, so its
torch twin must flatten as `einops.rearrange(x, "n c h w -> n (h w c)")`, not `x.flatten(1)` (the
chapter's CNN max-pools to 1x1 before flattening, so its order does not matter).
`check=(flax_model, sample)` runs both models and names the first layer whose output differs.
"""),
    ("code", """\
if HAVE_JAX:
    (X, y), (X_test, y_test) = fnnet.load_digits()
    model = fnnet.functional(net)

    def nhwc(images):
        return to_jax(images.permute(0, 2, 3, 1))  # N C H W -> N H W C

    variables = jax.jit(flax_cnn.init)(jax.random.key(0), nhwc(X[:16]))
    params, buffers = from_flax(variables, net, check=(flax_cnn, nhwc(X[:16])))
    print({k: tuple(v.shape) for k, v in params.items()})

    logits_torch = model.apply(params, X[:16])                      # eval mode: dropout off
    logits_flax = from_jax(flax_cnn.apply(variables, nhwc(X[:16])))  # deterministic
    gap = float((logits_torch - logits_flax).abs().max())
    print(f"flax -> torch: largest difference of the logits {gap:.1e}")
"""),
    ("md", """\
**Train in torch, serve in flax.** One epoch of Adam on the digits, starting from flax's weights,
then `to_flax` hands the trained params to the flax model. The same logits come out, so the two
models predict the same classes.
"""),
    ("code", """\
if HAVE_JAX:
    def loss_fn(params, batch, *, key):
        images, labels = batch
        return torch.nn.functional.cross_entropy(model.apply(params, images, train=True, key=key), labels)

    optimizer = fnnet.optim.adam(1e-2)
    state = fnnet.TrainState.create(params, optimizer, key=fnnet.random.key(1))
    train_step = fnnet.make_train_step(loss_fn, optimizer)
    for batch in fnnet.ArrayLoader((X, y), 128, shuffle=True, key=fnnet.random.key(2)):
        state, metrics = train_step(state, batch)
    print(f"{int(state.step)} steps, last loss {float(metrics['loss']):.3f}")

    trained = to_flax(state.params, net)
    logits_torch = model.apply(state.params, X_test)
    logits_flax = from_jax(jax.jit(flax_cnn.apply)(trained, nhwc(X_test)))
    gap = float((logits_torch - logits_flax).abs().max())
    same = int((logits_torch.argmax(1) == logits_flax.argmax(1)).sum())
    accuracy = float((logits_torch.argmax(1) == y_test).float().mean())
    print(f"torch -> flax: largest difference of the logits {gap:.1e}")
    print(f"test predictions agree on {same} of {len(y_test)} images (test accuracy after one epoch {accuracy:.1%})")

    back, _ = from_flax(trained, net)
    exact = all(torch.equal(back[k], state.params[k]) for k in state.params)
    print(f"round trip torch -> flax -> torch exact: {exact}")
"""),
    ("md", """\
Two rules to keep in mind. **Aliasing:** `to_jax` and `from_jax` share memory where they can, and
JAX arrays are immutable, so never write in place into a tensor that shares memory with a JAX
array (no `add_()`, no donated step, no `Trainer` on it); copy first with `copy=True` or `clone()`.
`to_flax` and `from_flax` always return new arrays. **Checkpoints:** `fnnet.save` writes
safetensors with flat key paths that `safetensors.flax.load_file` reads in JAX; `fnnet.load` reads
what `safetensors.flax.save_file` wrote, and `from_flax` also takes that flat dict or the bytes of
`flax.serialization.to_bytes(variables)`. The README's "Coming from JAX" section has the
side-by-side table of names and which optax call equals which `fnnet.optim` optimizer.
"""),
]
