"""TrainState and the compiled train/eval steps.

The step is a composition of pure pieces -- `model.apply`, the task loss, the
precision policy's loss scaling, the optax chain -- compiled once by `jax.jit` with
`NamedSharding` in/out shardings and the state donated. Later issues plug in here
without touching devices: pruning masks live in the optimizer chain (`extra`
transforms), fake-quant in the model's `dot_general_cls`, a teacher in `loss_fn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jaxllm import adversarial, finetune, lora, precision, privacy, sharding, tasks, vocab_parallel
from jaxllm.config import Config
from jaxllm.errors import UserError
from jaxllm.tasks import model_kwargs


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator state."""

    step: jax.Array
    params: Any
    opt_state: Any
    loss_scale: Any
    # Non-finite steps (NaN/Inf loss or gradients) are skipped, not applied: these count
    # the current run of them and all of them, so the loop can stop a diverged run.
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array


@dataclasses.dataclass
class StepHooks:
    """What compression stages plug into training (every field optional).

    Attributes:
      wrap_tx: optimizer -> optimizer; pruning chains its mask transform last.
      teacher: a `jaxllm.compress.distill.Teacher`: its forward runs inside the train
        step (no gradients) and its loss replaces the task loss.
      extra_params: rng -> dict of extra trainable parameters stored beside the model's
        (e.g. the distillation projection); boxed leaves are sharded by their names.
      init_params: params -> params for a fresh run, after init_from (a student taken
        from the teacher's layers). The optimizer state is re-initialised from them.
      batch_extras: session -> ((step, host batch) -> extra host arrays), called once
        when training starts; the arrays join the step's batch (a cached teacher's
        top-k logits, `jaxllm.compress.teacher_cache`).
    """

    wrap_tx: Callable[[optax.GradientTransformation], optax.GradientTransformation] | None = None
    teacher: Any = None
    extra_params: Callable[[jax.Array], dict] | None = None
    init_params: Callable[[Any], Any] | None = None
    batch_extras: Callable[[Any], Callable[[int, dict], dict]] | None = None


@dataclasses.dataclass
class CompiledSteps:
    """The jitted steps plus the shardings they were compiled with."""

    mesh: Mesh
    rules: sharding.Rules
    state_shardings: Any
    init: Callable[[], TrainState]
    train: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval: Callable[[Any, dict], dict]
    abstract_state: Any
    # Optimizer state for given params (a run that starts from loaded parameters).
    init_opt: Callable[[Any], Any] | None = None
    # finetune.param_labels of the parameters ("train" / "frozen"); None = all train.
    labels: Any = None
    # (abstract state, abstract batch) -> jax.stages.Lowered of the train step, for AOT
    # compilation without devices (`jaxllm plan`); None when a teacher is attached.
    lower_train: Callable[[Any, dict], Any] | None = None


def strip_boxes(tree: Any) -> Any:
    """Removes logical-axis boxes without applying sharding constraints (safe outside jit)."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def init_params(model: nn.Module, cfg: Config, rng: jax.Array) -> Any:
    """Boxed (logically annotated) parameters; `nn.unbox` gives the plain pytree."""
    tokens = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    return model.init({"params": rng}, tokens)["params"]


def init_checkpoint_params(model: nn.Module, cfg: Config, rng: jax.Array) -> Any:
    """`init_params` plus what `cfg.finetune` stores beside them (LoRA adapters), boxed.

    This is the structure of the parameters in a checkpoint trained with `cfg`.
    """
    params = init_params(model, cfg, rng)
    return finetune.add_adapters(params, cfg.finetune, jax.random.fold_in(rng, 0x10AA))


def make_loss_fn(
    model: nn.Module, cfg: Config, class_weights: Any = None, teacher: Any = None
) -> Callable:
    """loss(params, micro_batch, dropout_rng, total_weight, teacher_params) -> (scalar, sums)."""
    deterministic = cfg.model.dropout == 0.0
    if teacher is not None and cfg.adversarial.method != "none":
        raise UserError(
            "adversarial training does not combine with distillation; set adversarial.method=none"
        )
    if teacher is not None and cfg.train.loss_impl != "plain":
        raise UserError(
            "train.loss_impl=vocab_parallel does not combine with distillation (its loss "
            "reads the full logits); set train.loss_impl=plain"
        )
    if teacher is not None:
        from jaxllm.compress.distill_step import make_distill_loss_fn

        return _finetuned(make_distill_loss_fn(model, cfg, teacher, class_weights), cfg)

    def loss_fn(params, batch, rng, total_weight, teacher_params=None):
        del teacher_params

        def sums_at(p, perturbation=None):
            extra = {} if perturbation is None else {"embed_perturbation": perturbation}
            fused = _use_vocab_parallel(cfg)
            out = model.apply(
                {"params": p},
                batch["inputs"],
                deterministic=deterministic,
                rngs={"dropout": rng},
                return_hidden=fused,
                **model_kwargs(batch),
                **extra,
            )
            if fused:
                # The model's own logits are unused here, so XLA drops them: only the
                # shard_map's [tokens, vocab / n] slice exists per device.
                return vocab_parallel.vocab_parallel_lm_sums(
                    out[1],
                    vocab_parallel.head_of(p, cfg.model.tied),
                    batch["targets"],
                    batch["weights"],
                    tied=cfg.model.tied,
                    z_loss=cfg.train.z_loss,
                    label_smoothing=cfg.train.label_smoothing,
                    dtype=model.dtype,
                )
            return tasks.loss_sums(cfg.task, out, batch, cfg.train, class_weights)

        if cfg.adversarial.method == "none":
            sums = sums_at(params)
        else:
            shape = (*batch["inputs"].shape, cfg.model.d_model)
            sums = adversarial.with_adversarial_loss(sums_at, params, shape, cfg.adversarial)
        # Divide by the *global* token count so micro-batches and shards add up exactly.
        return sums["loss_sum"] / total_weight, sums

    return _finetuned(loss_fn, cfg)


def _use_vocab_parallel(cfg: Config) -> bool:
    """train.loss_impl=vocab_parallel, and the mesh in context splits the vocab (> 1 way).

    On one vocab shard (a single device, or mesh.tensor=1) the fused loss would only
    add collectives over one device, so the plain loss runs: same numbers.
    """
    if cfg.train.loss_impl != "vocab_parallel":
        return False
    vocab_axes = nn.logical_to_mesh_axes(("vocab",))[0]
    names = () if vocab_axes is None else vocab_axes
    names = (names,) if isinstance(names, str) else tuple(names)
    return vocab_parallel.vocab_axis_size(jax.sharding.get_abstract_mesh(), names) > 1


def _finetuned(loss_fn: Callable, cfg: Config) -> Callable:
    """Applies the loss to `finetune.train_view` of the parameters (modes frozen, lora)."""
    if cfg.finetune.mode == "full":
        return loss_fn

    def view_loss(params, batch, rng, total_weight, teacher_params=None):
        labels = finetune.param_labels(params, cfg.finetune, extra_prefix=EXTRA_PARAM_PREFIX)
        view = finetune.train_view(params, labels, cfg.finetune, rng)
        return loss_fn(view, batch, rng, total_weight, teacher_params)

    return view_loss


def _split_micro(batch: dict, n: int) -> dict:
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def _first_micro(batch: dict, n: int) -> dict:
    # The sums' structure depends on the loss (distillation adds kd_sum): shape it once.
    return jax.tree.map(lambda x: x[: x.shape[0] // n], batch)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    cfg: Config,
    schedule: Callable,
    class_weights: Any = None,
    teacher: Any = None,
    noise_multiplier: float | None = None,
) -> Callable:
    """Builds the (unjitted) train step: grads over micro-batches, loss scale, update.

    With `privacy.dp` the gradient is DP-SGD's (`jaxllm.privacy`): clipped per-example
    gradients summed over rows and micro-batches, noised once with `noise_multiplier`
    (default `privacy.noise_multiplier`), divided by the global batch.
    """
    loss_fn = make_loss_fn(model, cfg, class_weights, teacher)
    n_micro = cfg.train.grad_accum
    ls_cfg = cfg.loss_scale
    base_rng = jax.random.PRNGKey(cfg.train.seed + 1)
    dp = cfg.privacy.dp
    if noise_multiplier is None:
        noise_multiplier = cfg.privacy.noise_multiplier

    def scaled_grads(params, micro, rng, total_weight, scale, teacher_params):
        def scaled_loss(p, b, r, w):
            loss, sums = loss_fn(p, b, r, w, teacher_params)
            return precision.scale_loss(scale, loss), sums

        (_, sums), grads = jax.value_and_grad(scaled_loss, has_aux=True)(
            params, micro, rng, total_weight
        )
        return grads, sums

    grad_fn = privacy.make_clipped_grad_sum(loss_fn, cfg) if dp else scaled_grads

    def train_step(
        state: TrainState, batch: dict, teacher_params: Any = None
    ) -> tuple[TrainState, dict]:
        # Dropout keys depend only on (seed, step): a resumed run draws the same masks.
        rng = jax.random.fold_in(base_rng, state.step)
        total_weight = jnp.maximum(tasks.total_weight(cfg.task, batch, class_weights), 1e-6)
        if n_micro == 1:
            grads, sums = grad_fn(
                state.params, batch, rng, total_weight, state.loss_scale, teacher_params
            )
        else:

            def body(acc, xs):
                micro, i = xs
                g, s = grad_fn(
                    state.params,
                    micro,
                    jax.random.fold_in(rng, i),
                    total_weight,
                    state.loss_scale,
                    teacher_params,
                )
                return jax.tree.map(jnp.add, acc, (g, s)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zero_sums = jax.eval_shape(
                lambda: grad_fn(
                    state.params, _first_micro(batch, n_micro), rng, total_weight,
                    state.loss_scale, teacher_params,
                )[1]
            )  # fmt: skip
            zero_sums = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zero_sums)
            (grads, sums), _ = jax.lax.scan(
                body, (zeros, zero_sums), (_split_micro(batch, n_micro), jnp.arange(n_micro))
            )
        if dp:  # unscaled per example before clipping; noised once for the whole batch
            stddev = noise_multiplier * cfg.privacy.clip_norm
            key = privacy.noise_key(cfg.train.seed, state.step)
            grads = privacy.noised_mean(grads, key, stddev, cfg.train.batch_size)
        else:
            grads = precision.unscale(state.loss_scale, grads)
        finite = precision.all_finite(grads) & jnp.isfinite(sums["loss_sum"])
        # An fp16 overflow is the loss scale's business (lowered, step retried); only a
        # non-finite step that scaling cannot explain counts toward divergence.
        scale_can_fall = state.loss_scale.enabled & (state.loss_scale.scale > 1.0)
        diverged = ~finite & (~jnp.isfinite(sums["loss_sum"]) | ~scale_can_fall)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # An overflowing fp16 step changes nothing but the loss scale.
        new_params = precision.select_tree(finite, new_params, state.params)
        new_opt = precision.select_tree(finite, new_opt, state.opt_state)
        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt,
            loss_scale=precision.update_loss_scale(state.loss_scale, finite, ls_cfg),
            nonfinite_streak=jnp.where(diverged, state.nonfinite_streak + 1, 0),
            nonfinite_total=state.nonfinite_total + diverged.astype(jnp.int32),
        )
        metrics = {
            "loss": sums["ce_sum"] / total_weight,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": sums["count_sum"],
            "accuracy": sums["correct_sum"] / jnp.maximum(sums["count_sum"], 1.0),
            "loss_scale": new_state.loss_scale.scale,
            "skipped": 1.0 - finite.astype(jnp.float32),
            "nonfinite_streak": new_state.nonfinite_streak,
            "nonfinite_total": new_state.nonfinite_total,
        }
        if dp:
            metrics["dp_clipped_fraction"] = sums["dp_clipped_sum"] / cfg.train.batch_size
        if "adv_ce_sum" in sums:
            metrics["adv_loss"] = sums["adv_ce_sum"] / total_weight
        return new_state, metrics

    return train_step


# Top-level parameter names that are not the model's (StepHooks.extra_params).
EXTRA_PARAM_PREFIX = "distill_"


def model_params(params: Any) -> Any:
    """The model's own parameters: extra training-only ones dropped, LoRA adapters merged.

    What eval, decoding and export apply the model to (`jaxllm.lora.merge`, no dropout).
    """
    return lora.merge({k: v for k, v in params.items() if not k.startswith(EXTRA_PARAM_PREFIX)})


def make_eval_step(model: nn.Module, cfg: Config, class_weights: Any = None) -> Callable:
    """eval(params, batch) -> sums of cross-entropy, correct tokens and weights.

    classify also returns the per-row `predictions` and `labels` (for F1 and the
    confusion matrix); they come back replicated, so every host sees all rows.
    """

    def eval_step(params, batch):
        params = model_params(params)
        logits = model.apply({"params": params}, batch["inputs"], **model_kwargs(batch))
        return tasks.eval_sums(cfg.task, logits, batch, class_weights)

    return eval_step


# LLVM level 1 for the init program on CPU (see init_compiler_options).
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_compiler_options(mesh: Mesh) -> dict[str, Any] | None:
    """XLA options for the one-off program that draws the initial parameters.

    On CPU, LLVM's default optimisation of the random-initialisation program (threefry,
    unrolled per parameter shape) costs more than the program ever runs: measured with
    jax 0.10.2 on 2 AMD EPYC cores, the init of lm_tiny compiled and ran in 9-12 s at
    the default level and 6.4 s at level 1, and gpt2_124m's in 17.5 s against 13.5 s
    (its run alone 5.6 s against 6.7 s). The values drawn are the same bits (threefry
    is integer arithmetic; tests/test_train.py checks it). Other backends keep their
    defaults.
    """
    if mesh.devices.flat[0].platform == "cpu":
        return CPU_INIT_COMPILER_OPTIONS
    return None


def compile_steps(
    model: nn.Module,
    tx: optax.GradientTransformation,
    cfg: Config,
    schedule: Callable,
    mesh: Mesh,
    class_weights: Any = None,
    hooks: StepHooks | None = None,
    dp_plan: Any = None,
) -> CompiledSteps:
    """Derives state shardings from the logical annotations and jits init/train/eval.

    `dp_plan` (a `jaxllm.privacy.DpPlan`) gives DP-SGD its noise multiplier.
    """
    rules = sharding.logical_rules(cfg.mesh)
    use_loss_scale = cfg.precision == "fp16"
    hooks = hooks or StepHooks()

    def create_boxed():
        params = init_checkpoint_params(model, cfg, jax.random.PRNGKey(cfg.train.seed))
        if hooks.extra_params is not None:
            params = {**params, **hooks.extra_params(jax.random.PRNGKey(cfg.train.seed + 7))}
        return params

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed_shapes = jax.eval_shape(create_boxed)
        param_shapes = strip_boxes(boxed_shapes)
        param_sh = sharding.tree_shardings(boxed_shapes, mesh, rules)
        labels = None
        if cfg.finetune.mode != "full":
            # Frozen parameters get no updates and no optimizer state.
            labels = finetune.param_labels(
                param_shapes, cfg.finetune, check=True, extra_prefix=EXTRA_PARAM_PREFIX
            )
            tx = finetune.wrap_optimizer(tx, labels)
        opt_shapes = jax.eval_shape(tx.init, param_shapes)
        opt_sh = sharding.opt_state_shardings(tx, opt_shapes, param_shapes, param_sh, mesh)
        repl = sharding.replicated(mesh)
        ls_shapes = jax.eval_shape(
            lambda: precision.init_loss_scale(cfg.loss_scale, use_loss_scale)
        )
        state_sh = TrainState(
            step=repl,
            params=param_sh,
            opt_state=opt_sh,
            loss_scale=jax.tree.map(lambda _: repl, ls_shapes),
            nonfinite_streak=repl,
            nonfinite_total=repl,
        )

    def create_state():
        params = nn.unbox(create_boxed())
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            loss_scale=precision.init_loss_scale(cfg.loss_scale, use_loss_scale),
            nonfinite_streak=jnp.zeros((), jnp.int32),
            nonfinite_total=jnp.zeros((), jnp.int32),
        )

    # The abstract state from the shapes above, not a third trace of the model's init
    # (a trace of a few layers costs about a second on 2 CPU cores, at every start).
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(
        step=scalar,
        params=param_shapes,
        opt_state=opt_shapes,
        loss_scale=ls_shapes,
        nonfinite_streak=scalar,
        nonfinite_total=scalar,
    )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh
    )
    # Split the leading (batch) dim of every batch array, whatever its rank ([B] labels too).
    batch_sh = sharding.batch_sharding(mesh, rules, ndim=1)
    teacher = hooks.teacher
    sigma = dp_plan.noise_multiplier if dp_plan is not None else None
    train_fn = make_train_step(model, tx, cfg, schedule, class_weights, teacher, sigma)
    if teacher is None:
        train_jit = jax.jit(
            train_fn,
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, repl),
            donate_argnums=0,
        )
    else:
        # The teacher's parameters are an argument (not constants baked into the program)
        # placed as they were restored; the step closes over nothing large.
        teacher_jit = jax.jit(
            train_fn,
            in_shardings=(state_sh, batch_sh, jax.tree.map(lambda x: x.sharding, teacher.params)),
            out_shardings=(state_sh, repl),
            donate_argnums=0,
        )

        def train_jit(state, batch):
            return teacher_jit(state, batch, teacher.params)

    eval_jit = jax.jit(
        make_eval_step(model, cfg, class_weights),
        in_shardings=(param_sh, batch_sh),
        out_shardings=repl,
    )
    init_jit = jax.jit(
        create_state, out_shardings=state_sh, compiler_options=init_compiler_options(mesh)
    )
    init_opt_jit = jax.jit(tx.init, in_shardings=(param_sh,), out_shardings=opt_sh)

    def in_context(fn):
        # Logical constraints inside the model resolve against this mesh and rules table.
        def wrapped(*args):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                return fn(*args)

        return wrapped

    return CompiledSteps(
        mesh=mesh,
        rules=rules,
        state_shardings=state_sh,
        init=in_context(init_jit),
        train=in_context(train_jit),
        eval=in_context(eval_jit),
        abstract_state=abstract,
        init_opt=in_context(init_opt_jit),
        labels=labels,
        lower_train=in_context(train_jit.lower) if teacher is None else None,
    )
