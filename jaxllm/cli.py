"""`jaxllm` command line: train, eval, generate (see DESIGN.md, "CLI contract").

Every user mistake surfaces as one line on stderr, `jaxllm: error: ...`, and exit
status 2; a traceback means a bug in jaxllm.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from jaxllm.errors import UserError
from jaxllm.workdir import restore_params, workdir_config

EXAMPLES = {
    "train": "jaxllm train configs/lm_tiny.yaml train.steps=100 optim.lr=1e-3 --workdir runs/tiny",
    "eval": "jaxllm eval --workdir runs/tiny train.eval_batches=0\n  "
    "jaxllm eval --compare runs/mt_scratch runs/mt_pretrained eval.main_metric=bleu",
    "compress": "jaxllm compress configs/compress/lm_tiny_full.yaml --teacher runs/tiny "
    "--workdir runs/tiny_compressed",
    "convert": "jaxllm convert hf-to-jaxllm hf_models/gpt2 runs/gpt2\n  "
    "jaxllm convert jaxllm-to-hf runs/gpt2_finetuned hf_models/gpt2_finetuned",
    "generate": 'jaxllm generate --workdir runs/tiny --prompt "The list type" strategy=sample '
    "temperature=0.8 top_k=40 max_new_tokens=40",
    "plan": "jaxllm plan configs/gpt2_124m.yaml model.remat=full train.grad_accum=4 "
    "--topology v5e-8",
    "export": "jaxllm export --workdir runs/tiny --format stablehlo --out exports/tiny.stablehlo",
    "bench": "jaxllm bench decode --configs tiny --batches 1,16\n  "
    "jaxllm bench train --configs gpt15m --skip-hf",
}
GENERATE_OPTIONS = {
    "strategy": str,
    "max_new_tokens": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
    "beam_size": int,
    "length_penalty": float,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxllm",
        description="Train, fine-tune, evaluate, sample, compress, convert, export, plan and "
        "benchmark transformer language models (JAX/Flax, TPU-first). `jaxllm COMMAND --help` "
        "shows a "
        "command's options and an example.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add(
        "train", "Train a model from a YAML config; rerunning resumes from the latest checkpoint."
    )
    p.add_argument("config", help="YAML config, e.g. configs/lm_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    p.add_argument("--workdir", required=True, help="output directory (config, logs, checkpoints)")

    p = add(
        "eval",
        "Evaluate a trained workdir with its task's metrics -> DIR/eval.json and a table; "
        "or compare two workdirs (paired bootstrap) with --compare A B.",
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--workdir", help="a trained workdir")
    group.add_argument(
        "--compare",
        nargs=2,
        metavar=("DIR_A", "DIR_B"),
        help="baseline A and model B: delta = B - A of the main metric, 95%% CI, p-value",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides (train.eval_batches=0: every batch; eval.main_metric=chrf)",
    )

    p = add("generate", "Continue a prompt with a trained model (KV-cache decoding).")
    p.add_argument("--workdir", required=True, help="a trained workdir (jaxllm train ...)")
    p.add_argument(
        "--prompt",
        required=True,
        help="text to continue (lm), the source to translate, or the conversation so far "
        "with turns separated by newlines (dialogue); classify prints the top labels",
    )
    p.add_argument(
        "options",
        nargs="*",
        help="strategy=greedy|sample|beam max_new_tokens=N temperature=T top_k=K top_p=P "
        "seed=S beam_size=B length_penalty=A; input_filter.KEY=VALUE overrides the "
        "workdir's input filter (a rejected prompt exits with status 2)",
    )

    p = add(
        "compress",
        "Run a compression recipe (distill -> prune -> QAT/PTQ -> export) from a trained "
        "teacher; writes each stage's model and WORKDIR/report.{json,md} plus a "
        "quality-vs-size plot.",
    )
    p.add_argument("recipe", help="recipe YAML, e.g. configs/compress/lm_tiny_full.yaml")
    p.add_argument("--teacher", required=True, help="a trained workdir (jaxllm train ...)")
    p.add_argument("--workdir", required=True, help="output directory for stages and report")
    p.add_argument("overrides", nargs="*", help="config overrides for every model")

    p = add(
        "convert",
        "Convert checkpoints: a Hugging Face folder (safetensors; GPT-2, Llama, Mistral, "
        "Qwen2) into a jaxllm workdir, or a workdir back into a Hugging Face folder.",
    )
    p.add_argument(
        "direction",
        choices=("hf-to-jaxllm", "jaxllm-to-hf"),
        help="hf-to-jaxllm: Hugging Face folder -> workdir; jaxllm-to-hf: the reverse",
    )
    p.add_argument("src", help="HF folder (hf-to-jaxllm) or jaxllm workdir (jaxllm-to-hf)")
    p.add_argument("dst", help="new jaxllm workdir or HF folder")
    p.add_argument(
        "overrides", nargs="*", help="hf-to-jaxllm: config overrides for the workdir (mesh.fsdp=8)"
    )
    p = add(
        "plan",
        "Compile the train step ahead of time for a TPU slice (or this machine's CPU) "
        "without allocating anything: parameters, memory per chip against HBM, FLOPs per "
        "step, and XLA's cost-model step time and implied MFU (estimates, not "
        "measurements). Exits with an error naming the overflow if the step won't fit.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/gpt2_124m.yaml")
    p.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.fsdp=8 model.remat=full"
    )
    p.add_argument(
        "--topology",
        default="cpu",
        help="v4-8 ... v4-1024, v5e-1 ... v5e-256, v5p-8 ... v5p-1024, v6e-1 ... v6e-256 "
        "(v4/v5p count TensorCores, 2 per chip; v5e/v6e count chips) or cpu (default)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument(
        "--no-fixes",
        action="store_true",
        help="when the step won't fit, skip compiling the candidate fixes (faster)",
    )
    p = add(
        "export",
        "Export a workdir's forward pass (tokens -> logits, parameters baked in) as "
        "serialised StableHLO (jax.export) or ONNX (jax2onnx), with a PATH.json manifest.",
    )
    p.add_argument("--workdir", required=True, help="a trained, converted or compressed workdir")
    p.add_argument("--format", required=True, help="stablehlo or onnx")
    p.add_argument("--out", required=True, help="artifact path (PATH.json is written beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    from jaxllm.bench import BENCHMARKS, describe

    p = add(
        "bench",
        "Run one of the benchmarks/ scripts of a source checkout; it prints one JSON object "
        "on stdout (BENCHMARKS.md quotes them). `jaxllm bench NAME --help` lists a "
        "benchmark's own options. Benchmarks:\n" + describe(),
    )
    p.add_argument("name", choices=list(BENCHMARKS), metavar="NAME", help="benchmark to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    from jaxllm.export import export_workdir

    manifest = export_workdir(args.workdir, args.format, args.out, overwrite=args.overwrite)
    print(
        json.dumps(
            {
                "out": args.out,
                "manifest": args.out + ".json",
                **{k: manifest[k] for k in ("format", "step", "bytes", "inputs", "outputs")},
            }
        )
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from jaxllm.bench import run_benchmark

    return run_benchmark(args.name, args.args)


def cmd_plan(args: argparse.Namespace) -> int:
    from jaxllm import plan

    plan.use_cpu_backend()
    from jaxllm.config import load_config

    cfg = load_config(args.config, args.overrides)
    report = plan.plan(cfg, args.topology, check_fixes=not args.no_fixes)
    print(json.dumps(report, indent=2) if args.json else plan.format_report(report))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    plan.check_fits(report)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jaxllm.convert import hf

    if args.direction == "hf-to-jaxllm":
        hf.hf_to_jaxllm(args.src, args.dst, args.overrides)
    else:
        if args.overrides:
            raise UserError("jaxllm-to-hf takes no overrides; the workdir's config is exported")
        hf.jaxllm_to_hf(args.src, args.dst)
    print(args.dst)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from jaxllm.compress.recipe import run_recipe

    result = run_recipe(args.recipe, args.teacher, args.workdir, overrides=args.overrides)
    with open(result["paths"]["md"], encoding="utf-8") as f:
        print(f.read())
    print("report: " + ", ".join(result["paths"].values()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from jaxllm.config import load_config
    from jaxllm.train import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.workdir)
    print(
        json.dumps(
            {k: v for k, v in summary.items() if isinstance(v, int | float | str | type(None))}
        )
    )
    return 0


def _print_table(result: dict[str, Any]) -> None:
    flat = {k: v for k, v in result.items() if isinstance(v, int | float | str | list)}
    width = max(len(k) for k in flat)
    for k, v in flat.items():
        if isinstance(v, float):
            # Four decimals, but small values (privacy's delta) keep their digits.
            v = f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.3g}"
        elif isinstance(v, list):
            v = "[" + ", ".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in v) + "]"
        print(f"{k:<{width}}  {v}")


def _write_json(path: str, obj: dict) -> None:
    import jax

    if jax.process_index() == 0:  # every host computed the same result; one writes it
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)


def cmd_eval(args: argparse.Namespace) -> int:
    from jaxllm.evaluation import evaluate

    if args.compare:
        from jaxllm.compare import compare_workdirs

        dir_a, dir_b = args.compare
        result = compare_workdirs(dir_a, dir_b, args.overrides)
        _write_json(os.path.join(dir_b, "compare.json"), result)
        _print_table({k: v for k, v in result.items() if not k.startswith("metrics_")})
        return 0
    cfg = workdir_config(args.workdir, args.overrides)
    session, params, step = restore_params(args.workdir, cfg)
    from jaxllm.privacy import load_plan

    plan = load_plan(args.workdir)  # what training used, whatever the mesh here
    result = {
        "step": step,
        "task": cfg.task,
        "split": cfg.data.eval_split,
        **evaluate(session, params, generate=True),
        **(plan.report(step) if plan is not None else {}),
    }
    _write_json(os.path.join(args.workdir, "eval.json"), result)
    _print_table(result)
    return 0


def parse_generate_options(options: list[str]) -> dict[str, Any]:
    """Parses `key=value` decoding options with their types; unknown keys are errors.

    `input_filter.*` options are config overrides, not decoding options: see
    :func:`split_filter_options`.
    """
    from jaxllm.config import parse_override

    parsed: dict[str, Any] = {}
    for text in options:
        key, value = parse_override(text)
        if key not in GENERATE_OPTIONS:
            raise UserError(
                f"unknown generate option '{key}'; valid: {', '.join(GENERATE_OPTIONS)} "
                "or input_filter.*"
            )
        try:
            parsed[key] = GENERATE_OPTIONS[key](value)
        except (TypeError, ValueError) as e:
            raise UserError(
                f"generate option {key}={value!r} must be {GENERATE_OPTIONS[key].__name__}"
            ) from e
    return parsed


def split_filter_options(options: list[str]) -> tuple[list[str], list[str]]:
    """(decoding options, `input_filter.*` config overrides) of `jaxllm generate`."""
    filters = [o for o in options if o.startswith("input_filter.")]
    return [o for o in options if o not in filters], filters


def _check_prompt(cfg: Any, prompt: str) -> None:
    """Refuses a prompt the workdir's (or the command line's) input_filter rejects."""
    from jaxllm import data
    from jaxllm.input_filter import InputFilter

    tokenizer = data.get_tokenizer(cfg) if cfg.input_filter.max_tokens else None
    InputFilter(cfg.input_filter, tokenizer).check_prompt(prompt)


def _classify_prompt(session: Any, params: Any, text: str) -> str:
    """The predicted label of `text` and the top class probabilities, one per line."""
    import jax
    import numpy as np

    tok = session.tokenizer
    ids = np.asarray([[tok.bos_id, *tok.encode(text)][: session.cfg.data.seq_len]], np.int32)
    logits = session.model.apply({"params": params}, ids)
    probs = np.asarray(jax.nn.softmax(logits[0]))
    names = session.label_names or [str(c) for c in range(len(probs))]
    top = np.argsort(-probs)[:5]
    return "\n".join(f"{names[c]}\t{probs[c]:.4f}" for c in top)


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from jaxllm.decode import generate
    from jaxllm.precision import get_policy
    from jaxllm.tasks import SEQ2SEQ_TASKS

    decode_options, filter_overrides = split_filter_options(args.options)
    options = parse_generate_options(decode_options)
    cfg = workdir_config(args.workdir, filter_overrides)
    _check_prompt(cfg, args.prompt)
    session, params, _ = restore_params(args.workdir, cfg)
    if cfg.task == "classify":
        print(_classify_prompt(session, params, args.prompt))
        return 0
    tok = session.tokenizer
    seq2seq = cfg.task in SEQ2SEQ_TASKS
    if seq2seq:
        from jaxllm.data.formats import format_records

        # The prompt is the source (translate) or the conversation so far, one turn a line
        # (dialogue), formatted as in training: [BOS] source SEP, decoded as a prefix-LM.
        record = (
            {"source": args.prompt, "target": ""}
            if cfg.task == "translate"
            else {"history": args.prompt.split("\n"), "response": ""}
        )
        (example,) = format_records(cfg.task, [record], tok, history_turns=cfg.data.history_turns)
        prompt = [tok.bos_id, *example.prefix]
    else:
        # Training streams put EOS between documents, so EOS + prompt reads as a new document.
        prompt = [tok.eos_id, *tok.encode(args.prompt)]
    new = generate(
        cfg.model,
        params,
        np.asarray([prompt]),
        eos_id=tok.eos_id,
        policy=get_policy(cfg.precision),
        prefix_lm=seq2seq,
        **options,
    )[0].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    if seq2seq:
        print(tok.decode(new))
        return 0
    # Decode prompt and continuation together: SentencePiece drops a leading space when a
    # piece is decoded on its own, which would glue the first new word to the prompt.
    print(tok.decode(prompt[1:] + new))
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "compress": cmd_compress,
    "convert": cmd_convert,
    "plan": cmd_plan,
    "export": cmd_export,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `jaxllm` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        # One line, always: a message that quotes user input may carry a newline.
        print(f"jaxllm: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
