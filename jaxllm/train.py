"""The training loop: build everything from a Config, train, evaluate, checkpoint, log.

`train(cfg, workdir)` is what `jaxllm train` runs. Rerunning the same command on the
same workdir resumes from the latest checkpoint (state *and* data iterator), so an
interrupted run ends at the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxllm import data, finetune, flops, guards, optim, privacy, sharding, tasks, transfer
from jaxllm.checkpoint import Checkpointer
from jaxllm.config import Config, DistributedConfig, save_config
from jaxllm.data.tokenizer import tokenizer_file_name
from jaxllm.errors import UserError
from jaxllm.evaluation import batch_iterator, evaluate
from jaxllm.logger import MetricsLogger, StepProfiler
from jaxllm.model import build_model
from jaxllm.precision import get_policy
from jaxllm.step import CompiledSteps, StepHooks, compile_steps

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Session:
    """Everything built from a config: mesh, model, tokenizer, compiled steps."""

    cfg: Config
    model: Any
    tokenizer: Any
    steps: CompiledSteps
    checkpointer: Checkpointer | None
    # classify only: class names, the training labels (majority baseline, balanced
    # weights) and the class weights the loss uses (None = unweighted).
    label_names: list[str] | None = None
    train_labels: Any = None
    class_weights: Any = None
    hooks: StepHooks | None = None
    privacy: Any = None  # a jaxllm.privacy.DpPlan when privacy.dp is on


def _classify_setup(cfg: Config) -> tuple[list[str] | None, np.ndarray, Any]:
    records = data.load_records(cfg.data, cfg.data.train_split, "classify")
    labels = np.asarray([records[i]["label"] for i in range(len(records))], np.int64)
    n = cfg.model.num_classes
    if labels.size and labels.max() >= n:
        raise UserError(
            f"the training labels go up to {labels.max()} but model.num_classes={n}; "
            f"set model.num_classes={int(labels.max()) + 1}"
        )
    names = records.label_names
    if names is not None and len(names) != n:
        log.warning("the source has %d label names but model.num_classes=%d", len(names), n)
        names = names[:n] + [str(c) for c in range(len(names), n)]
    weights = tasks.resolve_class_weights(cfg.train.class_weights, labels, n)
    if weights is not None:
        log.info("class weights: %s", np.round(weights, 3).tolist())
    return names, labels, weights


def build_session(
    cfg: Config, workdir: str | None, devices: Any = None, hooks: StepHooks | None = None
) -> Session:
    """Initialises the runtime and compiles the steps for `cfg` on its mesh.

    `hooks` plug compression into the step (pruning masks, a distillation teacher).
    """
    sharding.init_distributed(cfg.distributed)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_batch_divides(cfg.train.batch_size, mesh, sharding.logical_rules(cfg.mesh))
    if cfg.init_from and not cfg.data.tokenizer:
        # A fine-tuned model must read text exactly as its pretrained backbone did.
        cfg.data.tokenizer = transfer.pretrained_tokenizer(cfg.init_from)
    tokenizer = data.get_tokenizer(cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}; raise model.vocab_size"
        )
    model = build_model(cfg.model, get_policy(cfg.precision))
    schedule = optim.make_schedule(cfg.optim, cfg.train.steps)
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
    if hooks is not None and hooks.wrap_tx is not None:
        tx = hooks.wrap_tx(tx)
    names, labels, weights = None, None, None
    if cfg.task == "classify":
        names, labels, weights = _classify_setup(cfg)
    plan = None
    if cfg.privacy.dp:
        plan = privacy.make_plan(cfg, privacy.count_examples(cfg, tokenizer))
    steps = compile_steps(model, tx, cfg, schedule, mesh, weights, hooks, dp_plan=plan)
    ckpt = None
    if workdir is not None:
        ckpt = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=cfg.train.keep_checkpoints,
            async_save=cfg.train.async_checkpoint,
        )
    return Session(cfg, model, tokenizer, steps, ckpt, names, labels, weights, hooks, plan)


def _restore_or_init(session: Session) -> tuple[Any, dict, int]:
    cfg, cs, ckpt = session.cfg, session.steps, session.checkpointer
    if ckpt is not None and ckpt.latest_step() is not None:
        state, data_state, step = ckpt.restore_latest_valid(cs.abstract_state)
        log.info("resumed from step %d", step)
        return state, data_state, step
    state = cs.init()
    if cfg.init_from:
        params, _ = transfer.load_pretrained(
            cfg.init_from, state.params, cs.abstract_state.params, cfg, cs.mesh, cs.rules
        )
        state = state.replace(params=params)
    hooks = session.hooks
    if hooks is not None and hooks.init_params is not None:
        params = jax.device_put(hooks.init_params(state.params), cs.state_shardings.params)
        state = state.replace(params=params)
    if cfg.init_from or (hooks is not None and hooks.init_params is not None):
        # Optimizer state that depends on the parameters (pruning masks) must see the
        # loaded ones, not the random initialisation.
        state = state.replace(opt_state=cs.init_opt(state.params))
    return state, {}, 0


class _Throughput:
    """Tokens/s and MFU over the steps since the last log line (the compile excluded)."""

    def __init__(self, cfg: Config):
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.flops_per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len)
        dtype = "fp32" if cfg.precision == "fp32" else "bf16"
        self.peak = flops.peak_flops_per_second(jax.devices(), dtype)
        self.start, self.steps = None, 0

    def step_done(self, metrics: Any) -> None:
        if self.start is None:
            # The first call compiles: start the clock once it has finished.
            jax.block_until_ready(metrics)
            self.start = time.perf_counter()
        else:
            self.steps += 1

    def read_and_reset(self) -> tuple[float, float]:
        elapsed = time.perf_counter() - self.start
        tps = self.steps * self.tokens_per_step / elapsed if self.steps else float("nan")
        mfu = flops.mfu(tps, self.flops_per_token, self.peak) if self.steps else float("nan")
        self.start, self.steps = time.perf_counter(), 0
        return tps, mfu


def _log_record(cfg: Config, metrics: Any, throughput: _Throughput) -> dict[str, float]:
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    tps, mfu = throughput.read_and_reset()
    record = {"loss": host["loss"]}
    if cfg.task != "classify":
        record["perplexity"] = math.exp(min(host["loss"], 50.0))
    record.update(
        {
            "lr": host["lr"],
            "grad_norm": host["grad_norm"],
            "accuracy": host["accuracy"],
            "tokens_per_sec": tps,
            "mfu": mfu,
            "nonfinite_steps": host["nonfinite_total"],
        }
    )
    if cfg.precision == "fp16":
        record.update(loss_scale=host["loss_scale"], skipped=host["skipped"])
    record.update({k: host[k] for k in ("dp_clipped_fraction", "adv_loss") if k in host})
    return record


def _prepare_workdir(cfg: Config, session: Session, workdir: str) -> None:
    if jax.process_index() == 0:
        # distributed.* describe one launch (a coordinator port, this process's id), not
        # the experiment: kept, they would make `jaxllm eval/generate` on the workdir
        # wait for a coordinator that is gone. A rerun gets them from its launcher again.
        saved = dataclasses.replace(cfg, distributed=DistributedConfig())
        save_config(saved, os.path.join(workdir, "config.yaml"))
        if session.privacy is not None:
            session.privacy.save(workdir)
        # The workdir carries its tokenizer, so eval/generate never depend on the data cache.
        copy = os.path.join(workdir, tokenizer_file_name(session.tokenizer.path))
        if os.path.abspath(session.tokenizer.path) != os.path.abspath(copy):
            shutil.copyfile(session.tokenizer.path, copy)


@contextlib.contextmanager
def _finish_saves_on_error(ckpt: Checkpointer | None, logger: MetricsLogger):
    # A run that stops on an error still lets a checkpoint already being written commit,
    # and releases its log files (a full disk must be unmountable afterwards).
    try:
        yield
    except BaseException:
        if ckpt is not None:
            with contextlib.suppress(Exception):
                ckpt.wait()
        with contextlib.suppress(Exception):
            logger.close()
        raise


def train(
    cfg: Config, workdir: str, devices: Any = None, hooks: StepHooks | None = None
) -> dict[str, Any]:
    """Trains `cfg` in `workdir` (resuming if it holds checkpoints); returns a summary.

    `hooks` (compression stages) plug pruning, a teacher or a custom init into the step.

    The summary has `preempted: True` when a SIGTERM stopped the run early (after a
    checkpoint was saved); rerunning the same command then resumes.
    """
    guards.preflight_workdir(workdir)
    session = build_session(cfg, workdir, devices, hooks)
    cs, ckpt, tc = session.steps, session.checkpointer, cfg.train
    log.info(
        "finetune.mode=%s: %s parameters",
        cfg.finetune.mode,
        finetune.describe(cs.abstract_state.params, cs.labels),
    )
    if tc.preflight_disk:
        guards.preflight_disk(workdir, cs.abstract_state, tc.keep_checkpoints)
    _prepare_workdir(cfg, session, workdir)
    if session.privacy is not None:
        privacy.log_plan(session.privacy)
    state, data_state, start = _restore_or_init(session)
    it = batch_iterator(session, cfg.data.train_split, train=True)
    if data_state:
        it.set_state(data_state)
    extras = None
    if hooks is not None and hooks.batch_extras is not None:
        extras = hooks.batch_extras(session)

    logger = MetricsLogger(workdir, tensorboard=tc.tensorboard)
    profiler = StepProfiler(workdir, tc.profile_start, tc.profile_steps)
    throughput = _Throughput(cfg)
    bar = tqdm(
        total=tc.steps,
        initial=start,
        disable=not (tc.progress_bar and jax.process_index() == 0),
        dynamic_ncols=True,
    )
    summary: dict[str, Any] = {"start_step": start, "preempted": False}
    first_loss, previous = None, None
    done = start
    with (
        guards.PreemptionWatcher() as preemption,
        _finish_saves_on_error(ckpt, logger),
        profiler,  # a trace still open when the loop ends (or fails) is closed
    ):
        for step in range(start, tc.steps):
            host = next(it)
            if extras is not None:
                host = {**host, **extras(step, host)}
            batch = sharding.make_global_batch(host, cs.mesh, cs.rules)
            if step == start:
                _compile_together(cs, state, batch)
            profiler.before_step(step)
            state, metrics = cs.train(state, batch)
            done = step + 1
            profiler.after_step(done, metrics)
            throughput.step_done(metrics)
            bar.update(1)
            if previous is not None:  # one step late: the device keeps working meanwhile
                guards.check_divergence(
                    *previous, tc.max_nonfinite_steps, ckpt and ckpt.latest_step()
                )
            previous = (metrics, done)
            if done % tc.log_every == 0 or done == tc.steps:
                record = _log_record(cfg, metrics, throughput)
                if session.privacy is not None:
                    record["dp_epsilon"] = session.privacy.epsilon(done)
                first_loss = record["loss"] if first_loss is None else first_loss
                if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
                    evals = _scalars(evaluate(session, state.params))
                    record.update({f"eval_{k}": v for k, v in evals.items()})
                logger.write(done, record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}"
                )
                summary.update(record)
            if tc.histogram_every and (done % tc.histogram_every == 0 or done == tc.steps):
                logger.write_params(done, state.params, cfg.model)
            if ckpt is not None and tc.checkpoint_every and done % tc.checkpoint_every == 0:
                ckpt.save(done, state, it.get_state())
            if preemption.requested:
                break
        if previous is not None:
            guards.check_divergence(*previous, tc.max_nonfinite_steps, ckpt and ckpt.latest_step())
    bar.close()

    if ckpt is not None and ckpt.latest_step() != done:
        ckpt.save(done, state, it.get_state(), force=True)
    if preemption.requested:
        if ckpt is not None:
            ckpt.close()
        logger.close()
        log.warning(
            "preempted: checkpoint of step %d saved; rerun the same command to resume", done
        )
        summary.update(preempted=True, steps=done, state=state, session=session)
        return summary
    # The final eval also decodes (translate, dialogue): BLEU/chrF/ROUGE of the run.
    full_eval = evaluate(session, state.params, generate=True)
    final_eval = _scalars(full_eval)
    dp_report = session.privacy.report() if session.privacy is not None else {}
    logger.write(tc.steps, {**{f"eval_{k}": v for k, v in final_eval.items()}, **dp_report})
    logger.close()
    if ckpt is not None:
        ckpt.close()
    summary.update(
        steps=tc.steps,
        first_logged_loss=first_loss,
        final_loss=summary.get("loss"),
        **{f"eval_{k}": v for k, v in final_eval.items()},
        **dp_report,
    )
    summary["state"], summary["session"] = state, session
    if "details" in full_eval:
        summary["eval_details"] = full_eval["details"]
    return summary


def _compile_together(cs: CompiledSteps, state: Any, batch: dict) -> None:
    """Several processes: compiles the train step, then waits until every process has.

    XLA:CPU's gloo collectives give the other processes 30 s to join the first
    collective of a device group ("Gloo context initialization failed: ... timed
    out"); one process compiling that much slower (a loaded machine) made multi-process
    CPU runs fail or hang. The compiled step is cached, so the first call reuses it.
    """
    if jax.process_count() == 1 or cs.lower_train is None:
        return
    cs.lower_train(state, batch).compile()
    from jax._src import distributed  # the coordination service's barrier (no collective)

    distributed.global_state.client.wait_at_barrier("jaxllm_train_compiled", 600_000)


def _scalars(result: dict[str, Any]) -> dict[str, float]:
    """The flat numeric metrics of an eval result (details and outputs left out)."""
    return {k: v for k, v in result.items() if isinstance(v, int | float)}


def host_params(state: Any) -> Any:
    """Gathers parameters to host numpy arrays (tests and conversions)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state.params)
