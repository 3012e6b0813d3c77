"""Train a character-level language model in float32, the usual mixed-precision recipes,
plain bfloat16/float16, and with scalify (float16, float8).

    python benchmarks/train_gpt.py                        # default: small GPT, a few minutes on 2 CPU cores
    python benchmarks/train_gpt.py --model llama          # gpt (default), gpt2, llama or equinox
    python benchmarks/train_gpt.py --preset gpt2-small    # GPT-2 small shapes, for a GPU
    python benchmarks/train_gpt.py --quick                # a few steps of a tiny model (tests)
    python benchmarks/train_gpt.py --data FILE            # any text file instead of the stdlib corpus

Scaling out (benchmarks/mesh.py; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8
gives 8 devices):

    python benchmarks/train_gpt.py --mesh data=4,model=2  # FSDP over data x tensor parallel over model
    python benchmarks/train_gpt.py --mesh data=4,model=2 --processes 2   # 2 processes x 4 devices
    python benchmarks/train_gpt.py --ckpt-dir DIR --ckpt-every 50 [--resume]  # async orbax checkpoints

With ``--processes N`` the script starts N copies of itself on this machine, joined by
`jax.distributed` (CPU collectives); on a cluster, run one copy per host with
``--coordinator HOST0:PORT --num-processes N --process-id I`` (the mesh spans every
host's devices). ``--ckpt-dir`` saves the params and optimizer state of every
configuration every ``--ckpt-every`` steps without stopping training
(`scalify.checkpoint.CheckpointManager`); ``--resume`` continues a run from its newest
complete checkpoint, with the same losses as a run never interrupted.

Models (benchmarks/models.py, all with the same shape options):

  gpt      benchmarks/gpt.py in plain JAX (pre-LN blocks scanned with `lax.scan`, causal
           multi-head attention, GELU MLP, token/position embeddings), trained with
           `optax.adam`
  gpt2     GPT-2 in Flax linen (tied embedding, learned positions, nn.LayerNorm,
           nn.MultiHeadDotProductAttention, gelu_new MLP, 0.02-std init)
  llama    Llama in Flax NNX (nnx.RMSNorm, rotary embeddings, SwiGLU, untied head, no biases)
  equinox  an Equinox transformer of eqx.nn layers
           gpt2, llama and equinox train with the usual LLM optimizer:
           `optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95,
           weight_decay=0.1))`.

The corpus is the Python standard library's own source (benchmarks/data.py), split into
train and held-out validation text. Every configuration starts from the same float32
initialisation, sees the same batches in the same order (learning rate: linear warmup from
0, cosine decay) and is evaluated on the same fixed validation batches:

  float32            plain JAX, float32 everything (the reference)
  bfloat16           plain JAX, params, activations, gradients and optimizer state in
                     bfloat16 (no master weights): a failure case
  float16            plain JAX, the same in float16, no loss scaling: it fails (shown)
  bf16-mixed         the usual mixed precision: float32 master weights and float32
                     optimizer state, the loss computed on a bfloat16 copy of the weights
  fp16-loss-scaling  float16 compute with dynamic loss scaling and float32 master weights
                     and optimizer state (the `jmp` recipe: scale 2^15, halved and the
                     update skipped on a non-finite gradient, doubled after 2000 good steps)
  scalify-fp16       scalify: float16 ScaledArray params/activations/gradients, optimizer
                     state stored as float16 ScaledArrays (`scalify.optim.scaled_state`)
  scalify-fp8        scalify-fp16 with every matmul in float8 (`scalify.fp8.autocast`:
                     E4M3 forward, E5M2 gradients)

No recipe: the scalify configurations are `jax.jit(sfy.scalify(step))` of the same step as
float32, with the optimizer wrapped in `sfy.optim.scaled_state` (and, for scalify-fp8, the
loss in `sfy.fp8.autocast`); nothing else -- no loss scaling, no hand-placed rescaling of
weights or gradients. Whatever rescaling a model needs is the library's job.

The configurations step in lockstep (step i of each, then step i+1), so a load change on
a shared machine hits them alike and step-time ratios stay meaningful. The script prints
a progress bar, then a table (final train and validation loss, ratios to float32,
optimizer-state and weights + optimizer-state bytes) and writes
benchmarks/results/train_gpt.json (train_gpt_<model>.json for the other models), a
loss-curve PNG and, from `scalify.telemetry` on the scalify-fp8 run, a PNG of per-tensor
scales over training.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import signal
import sys
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scalify as sfy  # noqa: E402
import scalify.fp8  # noqa: E402,F401
import scalify.optim  # noqa: E402,F401
import scalify.telemetry  # noqa: E402,F401

import data  # noqa: E402
import gpt  # noqa: E402
import mesh as mesh_lib  # noqa: E402
import models  # noqa: E402
import readme_tables  # noqa: E402

CONFIGS = ("float32", "bfloat16", "float16", "bf16-mixed", "fp16-loss-scaling", "scalify-fp16", "scalify-fp8")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Defaults per preset: model shape and training schedule. "default" was sized so that the
# five original configurations finish in <= 5 minutes of CPU time on 2 cores (compilation included).
PRESETS = {
    "default": dict(model=gpt.GPTConfig(seq_len=64, d_model=96, n_heads=4, n_layers=2),
                    steps=300, batch=16, lr=3e-3, eval_every=50, eval_batches=4, eval_batch=32,
                    tap_steps=0),
    "quick": dict(model=gpt.GPTConfig(seq_len=16, d_model=32, n_heads=2, n_layers=1),
                  steps=6, batch=4, lr=3e-3, eval_every=3, eval_batches=1, eval_batch=4, tap_steps=0),
    "gpt2-small": dict(model=dataclasses.replace(gpt.PRESETS["gpt2-small"]),
                       steps=2000, batch=16, lr=6e-4, eval_every=200, eval_batches=8, eval_batch=16,
                       tap_steps=3),
}


# --------------------------------------------------------------------------------------
# Machine and sizes


def machine_name() -> str:
    """The accelerator, or the CPU model and core count."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.device_kind} ({dev.platform}, jax {jax.__version__})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        cores = os.cpu_count()
    return f"CPU: {model}, {cores} cores (jax {jax.__version__})"


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf (a ScaledArray counts its data and its scale)."""
    leaves = jax.tree.leaves(tree)
    return int(sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes for x in leaves))


def as_float(x: Any) -> float:
    """A scalar (ScaledArray or array, replicated over a mesh or processes) as a float."""
    return float(mesh_lib.host_value(sfy.asarray(x, dtype=jnp.float32)))


# --------------------------------------------------------------------------------------
# One configuration: params, optimizer state, jitted train step and eval


@dataclasses.dataclass
class Trainer:
    name: str
    params: Any
    state: Any
    step: Callable  # (params, state, tokens) -> (params, state, loss[, grads]), jitted
    evaluate: Callable  # (params, tokens) -> loss, jitted
    returns_grads: bool = False
    traced_step: Optional[Callable] = None  # builds a fresh jitted step (telemetry taps)
    info: Optional[Callable] = None  # state -> extra JSON fields of the run (loss scale)
    shardings: Any = None  # (params, state) NamedShardings on a mesh run, else None


def _cast_tree(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class LossScale(NamedTuple):
    """Dynamic loss scaling state (the `jmp.DynamicLossScale` recipe, in a few lines)."""

    scale: Any  # float32 scalar, the loss is multiplied by it before the backward pass
    good_steps: Any  # int32: finite steps since the last change of scale
    skipped: Any  # int32: updates skipped so far (non-finite gradients)


LOSS_SCALE_INIT, LOSS_SCALE_PERIOD, LOSS_SCALE_FACTOR = 2.0 ** 15, 2000, 2.0


def _all_finite(tree: Any) -> Any:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_trainer(name: str, model: "models.Model", inner: Any, mesh: Any = None) -> Trainer:
    """The jitted training step of one configuration (see the module docstring) for a model
    family (`models.build`: float32 params, ``loss_fn``, ``apply``) and its optax optimizer.

    With a ``mesh`` (benchmarks/mesh.py), params and optimizer state are placed with
    their `NamedSharding`s (FSDP over ``data``, tensor parallel over ``model``, scales
    replicated) and the step hands them back with the same shardings."""
    t = _make_step(name, model, inner)
    raw_step, raw_eval = t.step, t.evaluate
    out_shardings = None
    if mesh is not None:
        specs = mesh_lib.specs_by_path(model.family, model.params, mesh)
        shardings = (mesh_lib.tree_shardings(t.params, specs, mesh),
                     mesh_lib.tree_shardings(t.state, specs, mesh))
        t.params, t.state = mesh_lib.place(t.params, shardings[0]), mesh_lib.place(t.state, shardings[1])
        t.shardings = shardings
        out_shardings = (*shardings, mesh_lib.NamedSharding(mesh, mesh_lib.P()), None)
        if not t.returns_grads:
            out_shardings = out_shardings[:3]
    t.step = jax.jit(raw_step, out_shardings=out_shardings)
    t.evaluate = jax.jit(raw_eval)
    if t.returns_grads:
        t.traced_step = lambda: jax.jit(raw_step, out_shardings=out_shardings)
    return t


def _make_step(name: str, model: "models.Model", inner: Any) -> Trainer:
    """`make_trainer` before jit and placement: the Trainer holds the plain step function."""
    loss_fn, params32 = model.loss_fn, model.params

    def mixed_loss(p32, x, y, dtype):
        # Mixed precision as `jmp` does it (compute dtype `dtype`, output dtype float32): the
        # model runs on a `dtype` copy of the float32 master weights, its logits come back
        # in float32 for the loss; gradients reach the float32 weights through the cast.
        logits = model.apply(_cast_tree(p32, dtype), x)
        return models.cross_entropy(logits.astype(jnp.float32), y)

    def split(tokens: Any):
        return tokens[:, :-1], tokens[:, 1:]

    def optax_step(loss: Callable) -> Callable:
        """``(params, state, tokens) -> (params, state, loss)``: the plain optax step."""

        def step(params, state, tokens):
            value, grads = jax.value_and_grad(loss)(params, *split(tokens))
            updates, state = inner.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        return step

    if name in ("float32", "bfloat16", "float16"):
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
        params = _cast_tree(params32, dtype)

        return Trainer(name, params, inner.init(params), optax_step(loss_fn),
                       lambda p, t: loss_fn(p, *split(t)))

    if name == "bf16-mixed":
        # float32 master weights and optimizer state; the forward and backward passes run
        # on a bfloat16 copy of the weights, gradients come back to float32 through the cast.
        loss16 = functools.partial(mixed_loss, dtype=jnp.bfloat16)
        return Trainer(name, params32, inner.init(params32), optax_step(loss16),
                       lambda p, t: loss16(p, *split(t)))

    if name == "fp16-loss-scaling":
        # float16 compute on a copy of float32 master weights; the loss is multiplied by a
        # dynamic scale so the float16 gradients stay above float16's subnormals, the float32
        # gradients are divided by it; a non-finite gradient skips the update and halves
        # the scale, LOSS_SCALE_PERIOD finite steps in a row double it.
        def scaled_loss(p32, scale, x, y):
            loss = mixed_loss(p32, x, y, jnp.float16)
            return loss * scale, loss

        def step(params, state, tokens):
            opt_state, ls = state
            (_, loss), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params, ls.scale, *split(tokens))
            grads = jax.tree.map(lambda g: g / ls.scale, grads)
            finite = _all_finite(grads)
            updates, new_opt_state = inner.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            grown = ls.good_steps + 1 >= LOSS_SCALE_PERIOD
            ls = LossScale(
                scale=jnp.where(finite, jnp.where(grown, ls.scale * LOSS_SCALE_FACTOR, ls.scale),
                                jnp.maximum(1.0, ls.scale / LOSS_SCALE_FACTOR)),
                good_steps=jnp.where(finite & ~grown, ls.good_steps + 1, 0),
                skipped=ls.skipped + jnp.where(finite, 0, 1))
            return keep(new_params, params), (keep(new_opt_state, opt_state), ls), loss

        ls0 = LossScale(jnp.float32(LOSS_SCALE_INIT), jnp.int32(0), jnp.int32(0))
        return Trainer(name, params32, (inner.init(params32), ls0), step,
                       lambda p, t: scaled_loss(p, 1.0, *split(t))[1],
                       info=lambda state: {"loss_scale": float(state[1].scale),
                                           "skipped_steps": int(state[1].skipped)})

    # scalify: float16 ScaledArray weights (`as_scaled_array` gives each leaf a power-of-two
    # scale near its RMS, so the data starts near unit RMS) and optimizer state stored as
    # float16 ScaledArrays. No recipe: the step is the float32 one, scalified.
    if name == "scalify-fp16":
        loss = loss_fn
    elif name == "scalify-fp8":
        loss = sfy.fp8.autocast(loss_fn)  # every matmul in float8: E4M3 fwd, E5M2 grads
    else:
        raise ValueError(f"unknown configuration {name!r}; choose from {CONFIGS}")
    params = sfy.as_scaled_array(params32, dtype=jnp.float16)
    opt = sfy.optim.scaled_state(inner, dtype=jnp.float16)

    def step(params, state, tokens):
        value, grads = jax.value_and_grad(loss)(params, *split(tokens))
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value, grads

    return Trainer(name, params, opt.init(params), sfy.scalify(step),
                   sfy.scalify(lambda p, t: loss(p, *split(t))), returns_grads=True)


# --------------------------------------------------------------------------------------
# Progress bar


class Progress:
    """One status line, redrawn in place on a terminal, printed every 10% otherwise."""

    def __init__(self, total: int, width: int = 28, stream: Any = sys.stderr):
        self.total, self.width, self.stream = total, width, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.perf_counter()
        self.last_decile = -1

    def update(self, done: int, text: str) -> None:
        frac = done / max(self.total, 1)
        decile = int(frac * 10)
        if not self.tty and decile == self.last_decile and done != self.total:
            return
        self.last_decile = decile
        fill = int(round(frac * self.width))
        bar = "#" * fill + "-" * (self.width - fill)
        line = f"[{bar}] {done}/{self.total} {time.perf_counter() - self.t0:6.0f}s  {text}"
        if self.tty:
            self.stream.write("\r" + line[: 150].ljust(150))
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------------------
# Training


def run(args: argparse.Namespace) -> Dict[str, Any]:
    preset = dict(PRESETS[args.preset])
    for k in ("steps", "batch", "lr", "eval_every", "eval_batches", "eval_batch", "tap_steps"):
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
    cfg = dataclasses.replace(preset["model"], vocab=len(data.VOCAB))
    if args.seq_len:
        cfg = dataclasses.replace(cfg, seq_len=args.seq_len)
    steps, batch, lr = int(preset["steps"]), int(preset["batch"]), float(preset["lr"])
    configs = list(args.configs)
    telemetry_config = next((c for c in ("scalify-fp8", "scalify-fp16") if c in configs), None)
    if args.no_telemetry:
        telemetry_config = None

    mesh = None
    if args.mesh:
        sizes = mesh_lib.parse_mesh(args.mesh)
        mesh = mesh_lib.make_mesh(sizes)
        for k in ("batch", "eval_batch"):
            if int(preset[k]) % sizes["data"]:
                raise SystemExit(f"--mesh {args.mesh}: the {k.replace('_', ' ')} size {preset[k]} must divide "
                                 f"by data={sizes['data']}")

    def put(tokens: np.ndarray) -> Any:
        """A host batch on the devices: split over the mesh's ``data`` axis on a mesh run."""
        return jnp.asarray(tokens) if mesh is None else mesh_lib.place(tokens, mesh_lib.batch_sharding(mesh))

    cpu0, wall0 = time.process_time(), time.perf_counter()
    train_ids, val_ids = data.load_corpus(args.data, max_chars=args.max_chars)
    val_batches = [put(b) for b in itertools.islice(
        data.batches(val_ids, int(preset["eval_batch"]), cfg.seq_len, seed=args.seed + 1),
        int(preset["eval_batches"]))]
    warmup = max(1, steps // 20)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr / 10)
    model = models.build(args.model, cfg, seed=args.seed,
                         batch_sharding=None if mesh is None else mesh_lib.NamedSharding(mesh, mesh_lib.P("data")))
    params32 = model.params
    n_params = int(sum(x.size for x in jax.tree.leaves(params32)))
    print(f"machine: {machine_name()}")
    print(f"model: {args.model} d_model={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} seq={cfg.seq_len} "
          f"vocab={cfg.vocab} ({n_params / 1e6:.2f}M params); batch {batch}, {steps} steps, "
          f"{models.optimizer_name(args.model)} lr {lr:g} (warmup {warmup}, cosine); corpus {len(train_ids):,} train / "
          f"{len(val_ids):,} validation chars ({args.data or 'Python stdlib source'})")

    inner = models.optimizer(args.model, schedule)
    if mesh is not None:
        print(f"mesh: data={mesh.shape['data']} model={mesh.shape['model']} over {jax.device_count()} devices, "
              f"{jax.process_count()} process(es); FSDP over data, tensor parallel over model")
    trainers = {c: make_trainer(c, model, inner, mesh) for c in configs}
    rec: Dict[str, Dict[str, Any]] = {
        c: {"train": [], "val": [], "step_s": [], "compile_s": None, "nonfinite_step": None,
            "state_bytes": tree_bytes(t.state), "params_bytes": tree_bytes(t.params)}
        for c, t in trainers.items()
    }

    # Telemetry on the scalify run: weights, gradients and optimizer state every few steps
    # (cheap, eager), and every op's output (activations and gradients inside the step,
    # tapped with host callbacks: a separate compiled step, used for a few steps only).
    cap = sfy.telemetry.Capture() if telemetry_config else None
    tap_steps = set()
    tapped_step = None
    if cap is not None and int(preset["tap_steps"]) > 0:
        tap_steps = {int(x) for x in np.linspace(0, steps - 1, int(preset["tap_steps"])).round()}
    record_every = max(1, steps // 50)

    def evaluate(name: str) -> float:
        t = trainers[name]
        return float(np.mean([as_float(t.evaluate(t.params, b)) for b in val_batches]))

    batches = data.batches(train_ids, batch, cfg.seq_len, seed=args.seed)
    active = list(configs)
    ckpt, start = None, 0
    if args.ckpt_dir:
        # Every --ckpt-every steps, the params and optimizer state of every configuration
        # are saved asynchronously (scalify.checkpoint, orbax); the losses so far go beside
        # them. --resume continues from the newest complete checkpoint.
        ckpt = sfy.checkpoint.CheckpointManager(args.ckpt_dir, max_to_keep=2)
        if args.resume and ckpt.latest_step() is None:
            print(f"no complete checkpoint in {args.ckpt_dir}: starting from step 0")
        if args.resume and ckpt.latest_step() is not None:
            start = ckpt.latest_step()
            restored = ckpt.restore({n: {"params": t.params, "state": t.state} for n, t in trainers.items()},
                                    step=start)
            for n, t in trainers.items():
                t.params, t.state = restored[n]["params"], restored[n]["state"]
            with open(_record_path(args.ckpt_dir, start)) as f:
                saved = json.load(f)
            rec, active = saved["rec"], saved["active"]
            for _ in range(start):  # the batches the checkpointed steps consumed
                next(batches)
            print(f"resumed from {args.ckpt_dir} at step {start}")
    bar = Progress(steps)
    for i in range(start, steps):
        tokens = put(next(batches))
        for name in list(active):
            t = trainers[name]
            fn = t.step
            if name == telemetry_config and i in tap_steps:
                if tapped_step is None:
                    tapped_step = t.traced_step()
                    with cap.tracing():  # trace (and compile) the tapped step
                        tapped_step = tapped_step.lower(t.params, t.state, tokens).compile()
                fn = tapped_step
                cap.step = i
            t0 = time.perf_counter()
            out = fn(t.params, t.state, tokens)
            jax.block_until_ready(out)
            dt = time.perf_counter() - t0
            if i == start:
                rec[name]["compile_s"] = dt
            elif fn is t.step:
                rec[name]["step_s"].append(dt)
            t.params, t.state, loss = out[0], out[1], out[2]
            loss = as_float(loss)
            rec[name]["train"].append(loss)
            if name == telemetry_config and (i % record_every == 0 or i in tap_steps or i == steps - 1):
                cap.step = i
                cap.record_tree("weights", t.params)
                cap.record_tree("gradients", out[3])
                cap.record_tree("optimizer state", t.state)
                cap.end_step(loss)
            if not math.isfinite(loss):
                # Plain float16 blows up (non-finite loss): stop this configuration there.
                rec[name]["nonfinite_step"] = i
                rec[name]["val"].append((i, float("nan")))
                active.remove(name)
        if (i + 1) % int(preset["eval_every"]) == 0 or i == steps - 1:
            for name in active:
                rec[name]["val"].append((i + 1, evaluate(name)))
        shown = " ".join(f"{n.replace('scalify-', 's-')} {rec[n]['train'][-1]:.3f}" for n in configs)
        bar.update(i + 1, shown)
        if ckpt is not None and (i + 1) % args.ckpt_every == 0:
            if jax.process_index() == 0:
                _write_json(_record_path(args.ckpt_dir, i + 1), {"rec": rec, "active": active})
            ckpt.save(i + 1, {n: {"params": t.params, "state": t.state} for n, t in trainers.items()})
            if jax.process_index() == 0:  # the loss records of checkpoints orbax has dropped
                kept = set(ckpt.all_steps()) | {i + 1}
                for f in os.listdir(args.ckpt_dir):
                    if f.startswith("losses_") and f.endswith(".json") and int(f[7:-5]) not in kept:
                        os.remove(os.path.join(args.ckpt_dir, f))
            if args.crash_during_save == i + 1:  # tests: die while the save is being written
                os.kill(os.getpid(), signal.SIGKILL)
    if ckpt is not None:
        ckpt.close()  # waits for the last save

    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    for name, t in trainers.items():
        if t.info is not None:
            rec[name]["info"] = t.info(t.state)
    results = summarise(args, cfg, preset, rec, configs, n_params, cpu_s, wall_s, cap, telemetry_config, warmup,
                        model.description)
    results["telemetry"]["first_nonfinite_plain_float16"] = rec.get("float16", {}).get("nonfinite_step")
    print_table(results)
    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if not args.no_plots:
        write_plots(args, results, cap, telemetry_config)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    print(f"time: {results['cpu_s']:.0f} s CPU, {results['wall_s']:.0f} s wall")
    return results


def _record_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"losses_{step}.json")


def _write_json(path: str, value: Any) -> None:
    """Write ``value`` to ``path`` atomically (a temporary file renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def summarise(args, cfg, preset, rec, configs, n_params, cpu_s, wall_s, cap, telemetry_config, warmup,
              description=""):
    steps = int(preset["steps"])
    tail = max(1, steps // 10)
    runs: Dict[str, Any] = {}
    for name in configs:
        r = rec[name]
        train = np.asarray(r["train"], np.float64)
        finite = r["nonfinite_step"] is None
        final_val = r["val"][-1][1] if r["val"] else float("nan")
        runs[name] = {
            "final_train_loss": float(np.mean(train[-tail:])) if finite else float("nan"),
            "final_val_loss": final_val if finite else float("nan"),
            "nonfinite_step": r["nonfinite_step"],
            "step_ms": 1e3 * float(np.median(r["step_s"])) if r["step_s"] else float("nan"),
            "first_step_s": r["compile_s"],
            "state_bytes": r["state_bytes"],
            "params_bytes": r["params_bytes"],
            **r.get("info", {}),
            "train_curve": [float(x) for x in train],
            "val_curve": [[int(s), float(v)] for s, v in r["val"]],
        }
    ref = runs.get("float32")
    for name, r in runs.items():
        for key, rkey in (("val_ratio", "final_val_loss"), ("train_ratio", "final_train_loss"),
                          ("step_time_ratio", "step_ms"), ("state_bytes_ratio", "state_bytes")):
            r[key] = (r[rkey] / ref[rkey]) if ref and ref[rkey] else float("nan")
        total = r["params_bytes"] + r["state_bytes"]
        r["total_bytes_ratio"] = total / (ref["params_bytes"] + ref["state_bytes"]) if ref else float("nan")
    telemetry: Dict[str, Any] = {"config": telemetry_config}
    if cap is not None:
        # Non-finite values among the recorded weights, gradients and optimizer state (the
        # trees the step hands back), and which ops' outputs held any: the causal mask's
        # -inf (a `select_n`) is there by design, softmax turns it into 0.
        first = cap.first_nonfinite(exclude_kinds=("activation",))
        telemetry["first_nonfinite_weight_grad_state"] = (
            None if first is None else {"step": first["step"], "kind": first["kind"],
                                        "name": first["where"], "count": first["count"]})
        telemetry["recorded_steps"] = len({x.step for x in cap.records})
        acts = [x for x in cap.records if x.kind == "activation"]
        telemetry["ops_with_nonfinite_outputs"] = sorted({x.name.split(" @ ")[0] for x in acts if x.nonfinite > 0})
        if acts:
            telemetry["tapped_tensors_per_step"] = len(acts) // max(1, len({x.step for x in acts}))
            telemetry["activation_log2_scale_range"] = [min(x.log2_scale for x in acts), max(x.log2_scale for x in acts)]
            rms = np.array([x.data_rms for x in acts if x.data_rms > 0])
            if rms.size:
                telemetry["activation_data_rms_percentiles_1_50_99"] = np.percentile(rms, [1, 50, 99]).tolist()
    return {
        "benchmark": "train_gpt",
        "device": machine_name(),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "preset": args.preset,
        "model": {**dataclasses.asdict(cfg), "n_params": n_params, "family": args.model,
                  "description": description},
        "training": {"steps": steps, "batch": int(preset["batch"]), "lr": float(preset["lr"]),
                     "warmup": warmup, "schedule": "linear warmup from 0, cosine decay to lr/10",
                     "optimizer": models.optimizer_name(args.model), "seed": args.seed,
                     "final_train_loss": f"mean of the last {tail} steps",
                     "validation": f"{preset['eval_batches']} fixed batches of {preset['eval_batch']} "
                                   f"x {cfg.seq_len} held-out tokens",
                     "data": args.data or "Python standard library source (benchmarks/data.py)"},
        "runs": runs,
        "telemetry": telemetry,
        "cpu_s": cpu_s,
        "wall_s": wall_s,
    }


def print_table(results: Dict[str, Any]) -> None:
    rows = [readme_tables.TRAIN_GPT_HEADER] + readme_tables.train_gpt_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    tel = results["telemetry"]
    if tel.get("config"):
        fn = tel.get("first_nonfinite_weight_grad_state")
        print(f"telemetry ({tel['config']}, {tel.get('recorded_steps')} recorded steps): first non-finite "
              f"weight/gradient/optimizer-state value: {'none' if fn is None else fn}")
        if tel.get("tapped_tensors_per_step"):
            lo, hi = tel["activation_log2_scale_range"]
            print(f"  tapped op outputs: {tel['tapped_tensors_per_step']} a step, log2 scales in "
                  f"[{lo:.0f}, {hi:.0f}], ops with non-finite outputs: "
                  f"{', '.join(tel['ops_with_nonfinite_outputs']) or 'none'} (the mask's -inf is expected)")
    if "float16" in results["runs"]:
        s = results["runs"]["float16"]["nonfinite_step"]
        print("plain float16: " + ("loss stayed finite" if s is None else f"loss non-finite from step {s}"))
    if "fp16-loss-scaling" in results["runs"]:
        r = results["runs"]["fp16-loss-scaling"]
        print(f"fp16-loss-scaling: final loss scale {r.get('loss_scale', float('nan')):g}, "
              f"{r.get('skipped_steps', 0)} updates skipped")


# --------------------------------------------------------------------------------------
# Plots


COLORS = {"float32": "black", "bfloat16": "tab:orange", "float16": "tab:red",
          "bf16-mixed": "tab:brown", "fp16-loss-scaling": "tab:purple",
          "scalify-fp16": "tab:blue", "scalify-fp8": "tab:green"}


def _smooth(x: np.ndarray, k: int) -> np.ndarray:
    if len(x) < 2 or k <= 1:
        return x
    k = min(k, len(x))
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = (c[k:] - c[:-k]) / k
    head = c[1:k] / np.arange(1, k)
    return np.concatenate([head, out])


def write_plots(args, results, cap, telemetry_config) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return
    runs = results["runs"]
    m = results["model"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = results["training"]["steps"]
    k = max(1, steps // 30)
    hi = 0.0
    for name, r in runs.items():
        y = np.asarray(r["train_curve"], np.float64)
        ok = np.isfinite(y)
        n = int(np.argmin(ok)) if not ok.all() else len(y)
        color = COLORS.get(name)
        style = dict(color=color, label=name, lw=1.6)
        if name == "float32":  # the reference, drawn dashed on top so it stays visible
            style.update(ls="--", lw=1.4, zorder=5)
        if n:
            ax1.plot(np.arange(n), _smooth(y[:n], k), **style)
            hi = max(hi, float(np.max(y[:n])))
        if r["nonfinite_step"] is not None:
            s = r["nonfinite_step"]
            last = float(_smooth(y[:n], k)[-1]) if n else float(y[0]) if np.isfinite(y[0]) else 4.6
            ax1.plot([s], [last], "x", color=color, ms=10, mew=2)
            ax1.annotate(f"{name}: non-finite loss at step {s}", (s, last), textcoords="offset points",
                         xytext=(8, 6), color=color, fontsize=9)
        v = [(s, l) for s, l in r["val_curve"] if math.isfinite(l)]
        if v:
            ax2.plot([s for s, _ in v], [l for _, l in v], marker="o", ms=3, **style)
    ax1.set_title(f"training loss (moving average of {k} steps)")
    ax2.set_title("validation loss (held-out text, fixed batches)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / char)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # Zoom the validation panel onto the end of training, where the configurations differ.
    finals = [r["final_val_loss"] for r in runs.values() if math.isfinite(r["final_val_loss"])]
    if finals:
        lo, top = min(finals), max(finals)
        span = max(top - lo, 0.02 * lo)
        ax2.set_ylim(lo - 0.5 * span, top + 4 * span)
    fig.suptitle(f"char-LM {m.get('family', 'gpt')} d={m['d_model']} L={m['n_layers']} ({m['n_params'] / 1e6:.2f}M params), "
                 f"{steps} steps — {results['device']}", fontsize=10)
    fig.tight_layout()
    stem = os.path.splitext(os.path.abspath(args.out))[0]
    loss_png = stem + "_loss.png"
    fig.savefig(loss_png, dpi=100)
    plt.close(fig)
    print(f"wrote {loss_png}")
    if cap is not None and cap.records:
        scales_png = stem + "_scales.png"
        taps = any(r.kind == "activation" for r in cap.records)
        sfy.telemetry.plot_scales(cap, scales_png, title=(
            f"{telemetry_config}: distribution over tensors of log2(scale), every "
            f"{max(1, results['training']['steps'] // 50)} steps"
            + (" (activation: every op's output inside the step, at the tapped steps)" if taps else "")))
        print(f"wrote {scales_png}")


# --------------------------------------------------------------------------------------


def parse_args(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", choices=models.FAMILIES, default="gpt",
                   help="model family (benchmarks/models.py); default: gpt, benchmarks/gpt.py")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--quick", action="store_true", help="a few steps of a tiny model (for tests)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--eval-batch", type=int)
    p.add_argument("--data", help="a text file to train on (default: the Python stdlib's source)")
    p.add_argument("--max-chars", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tap-steps", type=int,
                   help="number of steps of the telemetry run at which every op's output is tapped "
                        "(activations and gradients inside the step; a separately compiled step with "
                        "host callbacks, which takes 1-2 min to compile on CPU; default: 0 on CPU "
                        "presets, 3 for gpt2-small)")
    p.add_argument("--no-telemetry", action="store_true")
    p.add_argument("--mesh", help="shard over a device mesh, e.g. data=4,model=2: FSDP over data, tensor "
                                  "parallel over model (benchmarks/mesh.py); on CPU, get N devices with "
                                  "XLA_FLAGS=--xla_force_host_platform_device_count=N")
    p.add_argument("--processes", type=int, default=1,
                   help="run as this many processes on this machine (jax.distributed, CPU collectives), "
                        "each with an equal share of the --mesh devices")
    p.add_argument("--coordinator", help="host:port of process 0 for jax.distributed.initialize (one "
                                         "process per host on a cluster; with --num-processes, --process-id)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--ckpt-dir", help="save params and optimizer state here (scalify.checkpoint, orbax, "
                                      "asynchronous) every --ckpt-every steps")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --ckpt-dir (same arguments)")
    p.add_argument("--crash-during-save", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL at that save
    p.add_argument("--process-id", type=int)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", help="JSON path (default benchmarks/results/train_gpt.json, "
                                 "train_gpt_<model>.json for --model other than gpt, "
                                 "with _mesh before .json for --mesh; "
                                 "--quick: a temporary directory's)")
    args = p.parse_args(argv)
    if (args.resume or args.crash_during_save) and not args.ckpt_dir:
        p.error("--resume needs --ckpt-dir")
    if args.ckpt_every < 1:
        p.error("--ckpt-every must be >= 1")
    if args.quick:
        args.preset = "quick"
        args.max_chars = min(args.max_chars, 200_000)
    if args.out is None:
        fname = "train_gpt.json" if args.model == "gpt" else f"train_gpt_{args.model}.json"
        if args.mesh:  # a sharded run does not overwrite the single-device results
            fname = fname[:-5] + "_mesh.json"
        if args.quick:
            import tempfile

            args.out = os.path.join(tempfile.mkdtemp(prefix="train_gpt_"), fname)
        else:
            args.out = os.path.join(RESULTS, fname)
    return args


def launch(args: argparse.Namespace, argv: list) -> Dict[str, Any]:
    """``--processes N``: start N copies of this script on this machine, process i with
    ``--coordinator 127.0.0.1:PORT --num-processes N --process-id i`` and an Nth of the
    mesh's devices (CPU devices, via XLA_FLAGS); wait for all; process 0 prints and writes
    the results."""
    import socket
    import subprocess

    n = args.processes
    if not args.mesh:
        raise SystemExit("--processes needs --mesh (the global device mesh the processes share)")
    sizes = mesh_lib.parse_mesh(args.mesh)
    total = sizes["data"] * sizes["model"]
    if total % n:
        raise SystemExit(f"--processes {n}: the mesh's {total} devices do not split into {n} equal shares")
    with socket.socket() as sock:  # a free port for the coordinator
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rest, skip = [], False
    for a in argv:  # the same arguments, without --processes
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            rest.append(a)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env = dict(os.environ, XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={total // n}"]))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *rest, "--out", args.out,
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                               "--process-id", str(i)], env=env) for i in range(n)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"--processes {n}: exit codes {codes}")
    with open(args.out) as f:
        return json.load(f)


def main(argv: Any = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.processes > 1:
        return launch(args, argv)
    if args.coordinator or args.num_processes:
        # Before anything touches a device: join the other processes (jax.distributed).
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        if jax.process_index() != 0:  # one process speaks and writes
            sys.stdout = open(os.devnull, "w")
            args.no_plots, args.no_telemetry = True, True
            args.out = os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                    f".process{jax.process_index()}.json")
        args.no_telemetry = True  # telemetry reads arrays on the host: single-process only
    return run(args)


if __name__ == "__main__":
    main()
