"""Compression recipes: a YAML chain of stages run from a trained teacher workdir.

``jaxllm compress RECIPE --teacher DIR --workdir OUT`` runs each stage in order, each
starting from the previous stage's model (or the one named by ``source``):

* ``distill``: a student (the teacher's config with ``student`` overrides, e.g. half
  the layers) trained on the teacher's soft targets inside the same jitted step;
  initialised from every k-th teacher layer. ``hard_label_baseline: true`` also trains
  the same student, from the same init and for the same steps, on hard labels only.
  ``topk: K`` keeps only the teacher's K largest logits as the soft target;
  ``cache_teacher: true`` computes them once before training (the teacher does not run
  in the step; `jaxllm.compress.teacher_cache`).
* ``prune``: magnitude pruning with fine-tuning, unstructured or N:M: ``gradual`` (the
  pruned fraction follows a cubic schedule between ``start`` and ``end``, fractions of
  the steps), ``decay`` (the final masks are re-chosen every step while the pruned
  weights fade out on that schedule, Kao et al. 2022) or ``oneshot``.
* ``qat``: fine-tuning with fake-quantised projections, then conversion to integers.
* ``ptq``: integer weights (and calibrated activations) with no training.
* ``finetune``: the same training with no compression: the control that separates what
  a stage's extra steps gave from what its compression cost.
* ``export``: the deliverable: the source stage's model copied to ``path`` (default
  ``OUT/export``) with a ``manifest.json``, re-measured from that copy.

Sparsity survives later stages: a training stage that starts from a pruned model keeps
its zeros (``keep_masked``), and rounding keeps a zero a zero. Every stage writes a
servable workdir ``OUT/<stage>/model`` (config, tokenizer, parameters-only checkpoint;
``jaxllm eval`` and ``jaxllm generate`` read it) and is measured from that copy on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import optax

from jaxllm.compress import prune as P
from jaxllm.compress.report import (
    count_params,
    decode_tokens_per_sec,
    dir_bytes,
    forward_latency_ms,
    write_report,
)
from jaxllm.config import _build, _read_yaml, from_dict, save_config, to_dict
from jaxllm.data.tokenizer import tokenizer_file_name, workdir_tokenizer
from jaxllm.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("distill", "prune", "qat", "ptq", "finetune", "export")
_COMMON = {"name", "kind", "source", "train"}
# The keys each kind reads: a key from another kind is a mistake worth reporting.
KIND_KEYS = {
    "distill": _COMMON | {"student", "init", "temperature", "alpha", "hidden_weight",
                          "attention_weight", "hard_label_baseline", "topk", "cache_teacher"},
    "prune": _COMMON | {"sparsity", "pattern", "schedule", "start", "end", "every", "scope"},
    "qat": _COMMON | {"weight_bits", "act"},
    "finetune": _COMMON,
    "ptq": {"name", "kind", "source", "weight_bits", "act", "group_size", "calibration",
            "calibration_batches", "percentile"},
    "export": {"name", "kind", "source", "path"},
}  # fmt: skip


@dataclass
class Stage:
    """One step of a recipe (see the module docstring for each kind's keys)."""

    name: str = ""
    kind: str = field(default="", metadata={"choices": KINDS})
    source: str = ""  # the stage (or "teacher") to start from; default: the previous one
    train: list[str] = field(default_factory=list)  # config overrides of the training run
    student: list[str] = field(default_factory=list)
    init: str = field(default="teacher_layers", metadata={"choices": ("teacher_layers", "random")})
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    hard_label_baseline: bool = False
    topk: int = 0  # distill on the teacher's top-k logits only (0: all of them)
    cache_teacher: bool = False  # compute those top-k once, before training
    path: str = ""  # export: where the deliverable goes (default OUT/export)
    sparsity: float = 0.0
    pattern: str = ""  # "2:4": N:M instead of unstructured
    schedule: str = field(default="gradual", metadata={"choices": ("gradual", "decay", "oneshot")})
    start: float = 0.0
    end: float = 0.5
    every: int = 10
    scope: str = field(default="layer", metadata={"choices": ("layer", "global")})
    weight_bits: int = 8
    act: str = field(
        default="dynamic_per_token",
        metadata={"choices": ("dynamic_per_token", "static_per_tensor", "none")},
    )
    group_size: int = 0
    calibration: str = field(
        default="percentile", metadata={"choices": ("absmax", "percentile", "mse")}
    )
    calibration_batches: int = 4
    percentile: float = 99.99


@dataclass
class Latency:
    """How latency is measured (CPU, one device, fp32 unless the config says otherwise)."""

    batch_size: int = 8
    seq_len: int = 0  # 0: data.seq_len
    decode_batch: int = 1
    prompt_len: int = 16
    new_tokens: int = 32
    repeats: int = 5


@dataclass
class Recipe:
    """A compression recipe file."""

    stages: list[Any] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # applied to every model's config
    eval_batches: int = 0  # 0: the whole eval split
    latency: Latency = field(default_factory=Latency)


def load_recipe(path: str) -> tuple[Recipe, list[Stage]]:
    """Reads and checks a recipe; every mistake is one line naming the key and the fix."""
    recipe = _build(Recipe, _read_yaml(path))
    if not recipe.stages:
        raise UserError(f"recipe '{path}' has no stages; add a `stages:` list")
    stages, names = [], {"teacher"}
    for i, raw in enumerate(recipe.stages):
        stage = _build(Stage, raw, f"stages[{i}].")
        if not stage.kind:
            raise UserError(f"stages[{i}] has no kind; use one of {', '.join(KINDS)}")
        extra = sorted(set(raw) - KIND_KEYS[stage.kind])
        if extra:
            raise UserError(
                f"stages[{i}] ({stage.kind}) does not use {', '.join(extra)}; its keys: "
                f"{', '.join(sorted(KIND_KEYS[stage.kind]))}"
            )
        stage.name = stage.name or f"{i}_{stage.kind}"
        if stage.name in names:
            raise UserError(f"stage name '{stage.name}' is used twice; names must be unique")
        if stage.source and stage.source not in names:
            raise UserError(
                f"stages[{i}].source='{stage.source}' is not an earlier stage; choose one of "
                f"{', '.join(sorted(names))}"
            )
        _check_stage(stage, i)
        names.add(stage.name)
        stages.append(stage)
    return recipe, stages


def _check_stage(s: Stage, i: int) -> None:
    if s.kind == "prune":
        if bool(s.pattern) == bool(s.sparsity):
            raise UserError(f"stages[{i}] (prune) needs exactly one of sparsity (0..1) or pattern")
        if s.pattern:
            _pattern(s.pattern, i)
        elif not 0.0 < s.sparsity < 1.0:
            raise UserError(f"stages[{i}].sparsity must be in (0, 1), got {s.sparsity}")
        if not 0.0 <= s.start <= s.end <= 1.0:
            raise UserError(f"stages[{i}]: need 0 <= start <= end <= 1 (fractions of the steps)")
    if s.kind == "distill" and not (s.temperature > 0 and 0.0 <= s.alpha <= 1.0):
        raise UserError(f"stages[{i}]: temperature must be > 0 and alpha in [0, 1]")
    if s.kind == "distill" and s.topk < 0:
        raise UserError(f"stages[{i}].topk must be >= 0 (0: the whole distribution)")
    if s.cache_teacher and not s.topk:
        raise UserError(
            f"stages[{i}]: cache_teacher stores the teacher's top-k logits; set topk (e.g. 16)"
        )
    if s.cache_teacher and (s.hidden_weight or s.attention_weight):
        raise UserError(
            f"stages[{i}]: a cached teacher gives logits only; set hidden_weight and "
            "attention_weight to 0 or cache_teacher to false"
        )
    if s.kind in ("qat", "ptq") and not 2 <= s.weight_bits <= 8:
        raise UserError(f"stages[{i}].weight_bits must be in 2..8, got {s.weight_bits}")


def _pattern(text: str, i: int = 0) -> tuple[int, int]:
    parts = text.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
    raise UserError(f"stages[{i}].pattern must be N:M with 0 < N < M (e.g. 2:4), got {text!r}")


@dataclass
class Model:
    """A model a stage produced: where it lives and how to read it."""

    name: str
    cfg: Any
    dir: str  # a servable workdir (config.yaml, tokenizer.model, checkpoints/)
    session: Any = None
    params: Any = None


def _reconfigure(cfg: Any, overrides: list[str]) -> Any:
    return from_dict(to_dict(cfg), overrides)


RUN_FILE = "compress_run.json"


def claim_workdir(out: str, recipe_path: str, teacher_dir: str, overrides: list[str]) -> None:
    """Makes `out` this run's: new, or holding an earlier run of the same recipe.

    Rerunning the same command resumes (finished stages' training is not repeated: each
    stage's ``train/`` folder resumes like ``jaxllm train``). A folder holding anything
    else -- another recipe, teacher or overrides -- is refused: resuming from it would
    silently reuse models trained for something else.

    Raises:
      UserError: `out` holds other files or another run.
    """
    with open(recipe_path, "rb") as f:
        claim = {"recipe_sha1": hashlib.sha1(f.read()).hexdigest(),
                 "teacher": os.path.abspath(teacher_dir), "overrides": list(overrides)}  # fmt: skip
    path = os.path.join(out, RUN_FILE)
    if os.path.isdir(out) and os.listdir(out):
        try:
            with open(path) as f:
                found = json.load(f)
        except (OSError, ValueError):
            raise UserError(
                f"--workdir '{out}' is not empty and holds no jaxllm compress run; "
                "choose a new folder"
            ) from None
        if found != claim:
            raise UserError(
                f"--workdir '{out}' holds a run of another recipe, teacher or overrides; "
                "choose a new folder (or delete it) to start this one"
            )
        log.info("resuming the compress run in %s", out)
        return
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(claim, f, indent=2)


def export_model(out_dir: str, cfg: Any, params: Any, tokenizer_path: str) -> str:
    """Writes a servable workdir holding only the parameters (int8 stays int8 on disk).

    `out_dir` is always rewritten: it is derived from `params` (a resumed run
    regenerates it from its stage's training checkpoint).
    """
    from jaxllm.checkpoint import Checkpointer
    from jaxllm.step import model_params

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    cfg = _reconfigure(cfg, [])
    cfg.init_from = ""
    # model_params merged any LoRA adapters: the written model is a plain one.
    cfg.finetune = type(cfg.finetune)()
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, tokenizer_file_name(tokenizer_path)))
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=1, async_save=False)
    try:
        ckpt.save(0, {"params": model_params(params)}, {}, force=True)
    finally:
        ckpt.close()
    return out_dir


def _load(name: str, model_dir: str, devices: Any) -> Model:
    from jaxllm.workdir import restore_params, workdir_config

    cfg = workdir_config(model_dir, [])
    session, params, _ = restore_params(model_dir, cfg, devices)
    return Model(name, cfg, model_dir, session, params)


def _is_sparse(params: Any) -> bool:
    rows = P.sparsity_report(params)
    return rows[-1]["sparsity"] > 0.01


def _keep_zeros(src: Model):
    """A pruned source stays pruned while it trains (masks from its zeros, set at init)."""
    if not _is_sparse(src.params):
        return None

    def masks(params):
        keep = P.prunable(params)
        return jax.tree.map(lambda p, k: (p != 0) if k else jax.numpy.ones(p.shape, bool),
                            params, keep)  # fmt: skip

    return lambda tx: optax.chain(tx, P.keep_masked(masks))


def _train(name: str, cfg: Any, out: str, hooks: Any, devices: Any) -> Model:
    from jaxllm.train import train

    summary = train(cfg, os.path.join(out, name, "train"), devices, hooks)
    session = summary["session"]
    model_dir = export_model(
        os.path.join(out, name, "model"), cfg, summary["state"].params, session.tokenizer.path
    )
    return _load(name, model_dir, devices)


def run_distill(st: Stage, src: Model, teacher: Model, out: str, devices: Any) -> list[Model]:
    """Trains the student on the teacher's soft targets (and the hard-label baseline)."""
    from jaxllm.compress import distill
    from jaxllm.compress.distill_step import Teacher, projection_params
    from jaxllm.step import StepHooks

    cfg = _reconfigure(src.cfg, st.student + st.train)
    cfg.init_from = ""
    t_layers, s_layers = teacher.cfg.model.n_layers, cfg.model.n_layers
    layer_map = distill.layer_map(t_layers, s_layers) if t_layers % s_layers == 0 else []
    if st.attention_weight and not layer_map:
        raise UserError(
            f"attention transfer maps every k-th teacher layer: {s_layers} student layers "
            f"do not divide {t_layers}; change the student's model.n_layers"
        )
    t_host = jax.device_get(teacher.params)
    init = None
    if st.init == "teacher_layers":
        if not layer_map:
            raise UserError(
                f"init: teacher_layers needs the student's n_layers ({s_layers}) to divide "
                f"the teacher's ({t_layers}); use init: random or change model.n_layers"
            )

        def init(params):
            return distill.student_from_teacher(t_host, params, t_layers, s_layers)[0]

    n_out = cfg.model.num_classes if cfg.task == "classify" else cfg.model.vocab_size
    if st.topk > n_out:
        raise UserError(f"stage '{st.name}': topk={st.topk} exceeds the {n_out} outputs")
    extras = None
    if st.cache_teacher:
        from jaxllm.compress.teacher_cache import topk_cache_hook

        cache_dir = os.path.join(out, st.name, "teacher_topk")
        extras = topk_cache_hook(
            teacher.session.model, teacher.params, st.topk, st.temperature, cache_dir
        )
    tch = Teacher(
        model=teacher.session.model,
        params=None if st.cache_teacher else teacher.params,
        d_model=teacher.cfg.model.d_model,
        temperature=st.temperature,
        alpha=st.alpha,
        hidden_weight=st.hidden_weight,
        attention_weight=st.attention_weight,
        layer_map=layer_map,
        topk=st.topk,
        cached=st.cache_teacher,
    )
    keep = _keep_zeros(src)
    hooks = StepHooks(
        wrap_tx=keep, teacher=tch, extra_params=projection_params(cfg.model.d_model, tch),
        init_params=init, batch_extras=extras,
    )  # fmt: skip
    models = [_train(st.name, cfg, out, hooks, devices)]
    if st.hard_label_baseline:
        base = StepHooks(wrap_tx=keep, init_params=init)
        models.append(_train(f"{st.name}_hard_labels", cfg, out, base, devices))
    return models


def run_prune(st: Stage, src: Model, teacher: Model, out: str, devices: Any) -> list[Model]:
    """Magnitude pruning with fine-tuning (gradual or one-shot, unstructured or N:M)."""
    from jaxllm.step import StepHooks

    _need_float(st, src)
    cfg = _reconfigure(src.cfg, st.train)
    cfg.init_from = src.dir
    steps = cfg.train.steps
    start, end = int(st.start * steps), int(st.end * steps)
    if st.schedule == "oneshot":
        start = end = 0  # everything pruned at the first update, then fine-tuned
    pattern = _pattern(st.pattern) if st.pattern else None
    pruner = P.gradual_magnitude_pruning(
        None if pattern else st.sparsity, start, end, st.every, pattern, scope=st.scope,
        decay=st.schedule == "decay",
    )  # fmt: skip
    hooks = StepHooks(wrap_tx=lambda tx: optax.chain(tx, pruner))
    return [_train(st.name, cfg, out, hooks, devices)]


def run_finetune(st: Stage, src: Model, teacher: Model, out: str, devices: Any) -> list[Model]:
    """Trains the source further, uncompressed (sparsity kept): the fair dense control."""
    from jaxllm.step import StepHooks

    _need_float(st, src)
    cfg = _reconfigure(src.cfg, st.train)
    cfg.init_from = src.dir
    return [_train(st.name, cfg, out, StepHooks(wrap_tx=_keep_zeros(src)), devices)]


def _quant_overrides(st: Stage, mode: str) -> list[str]:
    keys = [f"model.quant={mode}", f"model.quant_weight_bits={st.weight_bits}",
            f"model.quant_act={st.act}"]  # fmt: skip
    return keys + ([f"model.quant_group_size={st.group_size}"] if st.kind == "ptq" else [])


def _need_float(st: Stage, src: Model) -> None:
    if src.cfg.model.quant == "int":
        raise UserError(
            f"stage '{st.name}' starts from '{src.name}', an integer model; put ptq/qat "
            "last or set `source:` to a float stage"
        )


def _to_int(name: str, cfg: Any, src: Model, out: str, devices: Any, scales=None) -> Model:
    """Quantises `src`'s parameters for the ``quant=int`` config `cfg` and stores them."""
    from jaxllm.compress.qmodel import attach_act_scales, quantize_model_params

    qparams = quantize_model_params(jax.device_get(src.params), cfg.model)
    if scales is not None:
        qparams = attach_act_scales(qparams, scales)
    tokenizer = workdir_tokenizer(src.dir)
    model_dir = export_model(os.path.join(out, name, "model"), cfg, qparams, tokenizer)
    return _load(name, model_dir, devices)


def run_qat(st: Stage, src: Model, teacher: Model, out: str, devices: Any) -> list[Model]:
    """Fine-tunes with fake-quantised projections, then stores integer kernels."""
    from jaxllm.step import StepHooks

    _need_float(st, src)
    cfg = _reconfigure(src.cfg, _quant_overrides(st, "fake") + st.train)
    cfg.init_from = src.dir
    trained = _train(f"{st.name}_fake", cfg, out, StepHooks(wrap_tx=_keep_zeros(src)), devices)
    int_cfg = _reconfigure(trained.cfg, ["model.quant=int"])
    return [_to_int(st.name, int_cfg, trained, out, devices)]


def run_ptq(st: Stage, src: Model, teacher: Model, out: str, devices: Any) -> list[Model]:
    """Integer weights (and calibrated static activation scales) without training."""
    from jaxllm.compress.qmodel import calibrate_activations
    from jaxllm.evaluation import batch_iterator
    from jaxllm.model import build_model

    _need_float(st, src)
    cfg = _reconfigure(src.cfg, _quant_overrides(st, "int"))
    scales = None
    if st.act == "static_per_tensor":
        float_cfg = dataclasses.replace(src.cfg.model, quant="none")
        it = batch_iterator(src.session, src.cfg.data.train_split, train=False)
        batches = [next(it) for _ in range(st.calibration_batches)]
        scales = calibrate_activations(
            build_model(float_cfg),
            jax.device_get(src.params),
            batches,
            st.calibration,
            st.percentile,
            scanned=float_cfg.scan_layers,
        )
    return [_to_int(st.name, cfg, src, out, devices, scales)]


def run_export(st: Stage, src: Model, teacher: Model, out: str, devices: Any) -> list[Model]:
    """Copies the source stage's servable model to the deliverable folder.

    The copy is what a user ships: ``config.yaml``, ``tokenizer.model`` and the
    parameters-only checkpoint in its compressed form (int8 + scales; pruned zeros),
    plus ``manifest.json`` naming where it came from. It is loaded back and measured
    like every stage, so the report shows that the shipped files give the numbers.
    """
    dest = st.path or os.path.join(out, "export")
    if os.path.exists(dest):
        # Only an earlier export is replaced: never a folder of the user's.
        if not os.path.exists(os.path.join(dest, "manifest.json")):
            raise UserError(
                f"stage '{st.name}': path '{dest}' exists and is not a jaxllm export; "
                "choose a new path"
            )
        shutil.rmtree(dest)
    shutil.copytree(src.dir, dest)
    total, nonzero = count_params(src.params)
    manifest = {
        "source_stage": src.name,
        "quant": src.cfg.model.quant,
        "quant_weight_bits": src.cfg.model.quant_weight_bits,
        "quant_act": src.cfg.model.quant_act,
        "params": total,
        "nonzero": nonzero,
        "bytes_on_disk": dir_bytes(os.path.join(dest, "checkpoints")),
    }
    with open(os.path.join(dest, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return [_load(st.name, dest, devices)]


RUNNERS = {
    "distill": run_distill,
    "prune": run_prune,
    "qat": run_qat,
    "ptq": run_ptq,
    "finetune": run_finetune,
    "export": run_export,
}


def measure(m: Model, recipe: Recipe) -> dict[str, Any]:
    """One report row: size, sparsity, eval metrics and CPU latency of a stored model."""
    from jaxllm.evaluation import SEQ2SEQ_TASKS, evaluate
    from jaxllm.model import build_model

    cfg, lat = m.cfg, recipe.latency
    result = evaluate(m.session, m.params, recipe.eval_batches,
                      generate=cfg.task in SEQ2SEQ_TASKS)  # fmt: skip
    total, nonzero = count_params(m.params)
    host = jax.device_get(m.params)
    row: dict[str, Any] = {
        "stage": m.name,
        "params": total,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / total,
        "bytes_on_disk": dir_bytes(os.path.join(m.dir, "checkpoints")),
        "quant": cfg.model.quant if cfg.model.quant == "none" else
        f"int{cfg.model.quant_weight_bits}/{cfg.model.quant_act}",
        **{f"eval_{k}": v for k, v in result.items() if isinstance(v, int | float)},
    }  # fmt: skip
    length = lat.seq_len or cfg.data.seq_len
    row["forward_ms"] = forward_latency_ms(
        build_model(cfg.model), host, lat.batch_size, length, lat.repeats
    )
    row["decode_tok_s"] = None
    if cfg.task != "classify":
        row["decode_tok_s"] = decode_tokens_per_sec(
            cfg.model, host, lat.decode_batch, lat.prompt_len, lat.new_tokens, lat.repeats
        )
    log.info("%s: %s", m.name, {k: v for k, v in row.items() if k != "stage"})
    return row


def run_recipe(
    recipe_path: str,
    teacher_dir: str,
    out: str,
    devices: Any = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Runs every stage of a recipe from the teacher workdir; writes the report.

    Args:
      recipe_path: the recipe YAML.
      teacher_dir: a trained workdir (``jaxllm train ... --workdir``).
      out: where each stage's workdir and the report go.
      devices: devices of the mesh (default: all).
      overrides: extra config overrides for every model (after the recipe's).

    Returns:
      ``{"rows": [...], "paths": {json, md, png}, "metric": main metric}``.
    """
    from jaxllm.evaluation import main_metric
    from jaxllm.workdir import workdir_config

    recipe, stages = load_recipe(recipe_path)
    extra = recipe.overrides + list(overrides or [])
    if not os.path.isdir(teacher_dir):
        raise UserError(f"--teacher '{teacher_dir}' is not a directory; pass a trained workdir")
    claim_workdir(out, recipe_path, teacher_dir, extra)
    started = time.time()
    t_cfg = workdir_config(teacher_dir, extra)
    src_tok = workdir_tokenizer(teacher_dir)
    from jaxllm.workdir import restore_params

    t_session, t_params, _ = restore_params(teacher_dir, t_cfg, devices)
    # The teacher is re-stored as parameters only, so every row's size is measured alike.
    tok = src_tok or t_session.tokenizer.path
    t_dir = export_model(os.path.join(out, "teacher", "model"), t_cfg, t_params, tok)
    teacher = _load("teacher", t_dir, devices)
    models = {"teacher": teacher}
    rows = [measure(teacher, recipe)]
    previous = "teacher"
    for st in stages:
        log.info("stage %s (%s) from %s", st.name, st.kind, st.source or previous)
        produced = RUNNERS[st.kind](st, models[st.source or previous], teacher, out, devices)
        for m in produced:
            models[m.name] = m
            rows.append(measure(m, recipe))
        previous = st.name
    metric = main_metric(t_cfg)
    info = {
        "recipe": recipe_path,
        "teacher": teacher_dir,
        "machine": f"{jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), {os.cpu_count()} CPU cores",
        "latency": f"forward batch {recipe.latency.batch_size} x "
        f"{recipe.latency.seq_len or t_cfg.data.seq_len}; greedy decode batch "
        f"{recipe.latency.decode_batch}, {recipe.latency.new_tokens} new tokens; median "
        f"of {recipe.latency.repeats}, one device",
        "wall_seconds": round(time.time() - started, 1),
    }  # fmt: skip
    paths = write_report(rows, out, metric, info)
    return {"rows": rows, "paths": paths, "metric": metric}
