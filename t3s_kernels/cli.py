"""The ``t3s`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {value}")
    return value


def _device(requested: str) -> str:
    """The device to run on; under torchrun a bare "cuda" is this process's LOCAL_RANK GPU."""
    import torch

    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
        if requested == "cuda" and "LOCAL_RANK" in os.environ:
            return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return requested


def _pad_id(model) -> int:
    """The model's padding id (0 where its config names none)."""
    pad = getattr(model.config, "pad_token_id", None)
    return pad if pad is not None else 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import CPU_DEFAULT, GPU_DEFAULT, format_report, report_json, run_bench

    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    defaults = GPU_DEFAULT if on_gpu else CPU_DEFAULT
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    if not 0.0 < args.select <= 1.0:
        raise SystemExit(f"--select must be in (0, 1]; got {args.select}")
    if args.sweep:
        return _sweep(args, on_gpu)
    report = run_bench(**shape, select=args.select, providers=args.providers, device=args.device,
                       repeat=args.repeat, check_error=not args.no_error, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        text = report_json(report)
        if args.json == "-":
            print(text)
        else:
            # write then rename: an interrupted run never leaves a truncated results file
            folder = os.path.dirname(os.path.abspath(args.json))
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
                f.write(text)
            os.replace(f.name, args.json)
    return 0


def _sweep(args: argparse.Namespace, on_gpu: bool) -> int:
    from .bench.sweep import CPU_SWEEP, GPU_SWEEP, run_sweep

    grid = GPU_SWEEP if on_gpu else CPU_SWEEP
    reports, written = run_sweep(tokens=args.sweep_tokens or grid["tokens"], vocab=args.sweep_vocab or grid["vocab"],
                                 hidden=args.hidden or grid["hidden"], dtype=args.dtype or grid["dtype"],
                                 out=args.out, providers=args.providers, device=args.device, repeat=args.repeat,
                                 check_error=not args.no_error, progress=not args.quiet)
    from .bench import format_report

    for report in reports:
        print(format_report(report), end="\n\n")
    print("wrote " + ", ".join(written))
    if not any(path.endswith(".png") for path in written):
        print("(no plots: install matplotlib, the 'plot' extra, to draw them)")
    return 0


def _compile_report(args: argparse.Namespace) -> int:
    from .extras import require

    require("triton", "t3s compile-report")
    from .ops.aot import main as aot_main

    aot_main(["--arch", *map(str, args.arch)] + (["--json"] if args.json else []))
    return 0


def _score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .pipeline.data import load_examples
    from .pipeline.scoring import load_local_model, score_dataset
    from .pipeline.store import ScoreStore, natural_key, writable_folder

    if args.name is not None and len(args.model) > 1:
        raise ValueError("--name names one score set; with several --model folders each set takes its folder's "
                         "name (checkpoint-20, ...)")
    models = sorted(args.model, key=lambda p: natural_key(Path(p).name))
    names = [args.name] if args.name is not None else [Path(p).resolve().name for p in models]
    if len(set(names)) != len(names):
        raise ValueError(f"--model folders must have distinct names to name their score sets; got {names}")
    store = ScoreStore(writable_folder(args.store, "--store"))
    # text examples: the (first) model's tokenizer; loaded once for every checkpoint
    examples = load_examples(args.data, args.tokenizer or models[0], split=args.split)
    device = _device(args.device)
    for path, name in zip(models, names):
        model = load_local_model(path, args.dtype, device, args.trust_remote_code)
        n = score_dataset(model, examples, store, name, protocol=args.protocol, max_tokens=args.max_tokens,
                          max_batch=args.max_batch, mask_token_id=args.mask_token_id, rounds=args.rounds,
                          seed=args.seed, pad_id=_pad_id(model), progress=not args.quiet, packed=args.packed,
                          block_size=args.block_size)
        print(f"scored {n} examples into '{name}' of {args.store}")
        del model
    return 0


def _select(args: argparse.Namespace) -> int:
    import json

    from .pipeline.selection import plot_selection, save_selection, select
    from .pipeline.store import ScoreStore, writable_folder

    store = ScoreStore(args.store)
    writable_folder(args.out, "--out")
    base = store.load(args.base)
    bottleneck = store.load(args.bottleneck) if args.bottleneck else None
    sel = select(args.rule, base, bottleneck, tau=args.tau, budget=args.budget, seed=args.seed, use=args.use)
    summary = save_selection(sel, args.out, base.values["scored"])
    print(json.dumps({k: v for k, v in summary.items() if k != "per_example"}, indent=2))
    if args.plot and bottleneck is not None:
        names = args.checkpoints or store.names()
        anchors = base.values["scored"] & (bottleneck.values["logprob"] > base.values["logprob"])
        sets = [store.load(n) for n in names]
        for path in plot_selection(base, bottleneck, sets, anchors, args.out, selection=sel):
            print(f"wrote {path}")
    return 0


def _accuracy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .pipeline.accuracy import eos_token_ids, make_text_verifier, reference_answer
    from .pipeline.answers import judge, read_answers, reference_text, write_table
    from .pipeline.data import load_examples, load_tokenizer
    from .pipeline.sampling import SamplingSettings, cache_key, cached_answers, sample_answers, write_answers
    from .pipeline.scoring import load_local_model, weights_fingerprint
    from .pipeline.store import atomic_write_bytes, natural_key, writable_folder

    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a folder; it must be the CSV file to write")
    writable_folder(Path(args.out).resolve().parent, "the folder of --out")
    if args.answers is None and not args.checkpoints:
        raise ValueError("give --checkpoints (folders to generate answers with) or --answers (a file of answers "
                         "generated elsewhere)")
    examples = load_examples(args.data, args.tokenizer, split=args.split)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    check = make_text_verifier(args.verifier)
    eos = tuple(args.eos_token_id or ())
    names = sorted((Path(c).name for c in args.checkpoints or ()), key=natural_key)
    rows = []
    if args.answers is not None:  # judged, not generated
        if args.samples != 1 or args.temperature != 0.0:
            raise ValueError("--answers judges answers generated elsewhere; --samples and --temperature are for "
                             "answers generated here")
        answers = read_answers(args.answers, examples, names or None)
        references = {e.id: reference_text(e, tokenizer, eos) for e in examples}
        for name in names or sorted(answers, key=natural_key):
            rows.append(judge(answers[name], examples, check, references, name))
    else:
        cache = Path(str(args.out) + ".answers")
        for path in sorted(args.checkpoints, key=lambda p: natural_key(Path(p).name)):
            model = load_local_model(path, args.dtype, _device(args.device), args.trust_remote_code)
            ids = eos or eos_token_ids(model)
            references = {e.id: reference_text(e, tokenizer, ids) for e in examples}
            longest = max(len(reference_answer(e, ids)) for e in examples)
            settings = SamplingSettings(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                                        seed=args.seed, max_new_tokens=args.max_new_tokens or longest + args.slack)
            name, key = Path(path).name, cache_key(weights_fingerprint(model), settings, ids, examples)
            answers = cached_answers(cache, name, key)
            if answers is None:
                answers = sample_answers(model, examples, settings, tokenizer=tokenizer, eos_ids=ids,
                                         pad_id=_pad_id(model), max_batch=args.batch_size, progress=not args.quiet,
                                         desc=f"answers of {name}")
                write_answers(cache, name, key, answers)
            else:
                print(f"{name}: answers from {cache} (same weights, settings and data)")
            rows.append(judge(answers, examples, check, references, name))
            del model
    for r in rows:
        print(f"{r.checkpoint}: accuracy {r.accuracy:.4f} +- {r.stderr:.4f} ({len(examples)} problems x {r.samples})")
    write_table(rows, args.out, atomic_write_bytes)
    print(f"wrote {args.out}; next: t3s bottleneck {args.out}")
    return 0


def _bottleneck(args: argparse.Namespace) -> int:
    from .pipeline.bottleneck import (
        find_bottleneck,
        plot_accuracy,
        read_accuracy_errors,
        read_accuracy_table,
        trough_beyond_noise,
    )

    table = read_accuracy_table(args.table)
    errors = read_accuracy_errors(args.table)
    name, acc = find_bottleneck(table)
    declared, why = (True, "") if errors is None else trough_beyond_noise(table, errors)
    if args.plot:
        print(f"wrote {plot_accuracy(table, args.plot, name if declared else None, errors)}")
    if not declared:
        print(why)
        return 1
    print(f"bottleneck: {name} (training accuracy {acc:.4f})" + (f"; {why}" if why else ""))
    return 0


def _demo(args: argparse.Namespace) -> int:
    size = "full" if args.full else "quick" if args.quick else "default"
    if args.student == "masked_diffusion":
        from .demo_diffusion import run_diffusion_demo

        if args.task != "style":
            raise ValueError("--student masked_diffusion runs the style task only (its answer canvas is sized for "
                             "the base's problems); drop --task or use --student causal")
        run_diffusion_demo(args.out, size=size, seeds=args.seeds, tau=args.tau)
        return 0
    if args.tau is not None:
        raise ValueError("--tau is the dLLM rule's threshold: it goes with --student masked_diffusion (the causal "
                         "student's AR rule is the sign of dc)")
    from .demo import run_demo

    run_demo(args.out, size=size, seeds=args.seeds, task=args.task)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t3s", description="t3s-kernels: fused LM head + loss for T3S.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time, memory and error of the fused loss against eager and peers",
                           description="Defaults: on a GPU, Qwen3-8B's head (N=16384, H=4096, V=151936, bf16); "
                                       "on a CPU, N=2048, H=256, V=65536, fp32.")
    bench.add_argument("--tokens", type=_positive_int, help="N, the number of tokens")
    bench.add_argument("--hidden", type=_positive_int, help="H, the hidden size")
    bench.add_argument("--vocab", type=_positive_int, help="V, the vocabulary size")
    bench.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    bench.add_argument("--select", type=float, default=1.0,
                       help="fraction of tokens in the loss (the rest get weight 0 / an ignored label)")
    bench.add_argument("--providers", nargs="+", metavar="NAME",
                       help="subset of: eager compile torch-lce torch-lce-chunked torch-lce-chunked-256 liger "
                            "liger-cute liger-stats cce quack t3s-torch t3s-torch-stats t3s-torch-pytorch-epilogue "
                            "t3s-triton-chunked t3s-triton-chunked-weight-accum "
                            "t3s-triton-chunked-float32-logits t3s-triton-chunked-lean t3s-triton-stats "
                            "t3s-token-stats")
    bench.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    bench.add_argument("--repeat", type=_positive_int, default=3, help="timed runs per measurement (median)")
    bench.add_argument("--no-error", action="store_true", help="skip the float64 reference")
    bench.add_argument("--json", metavar="PATH", help="also write the report as JSON (- for stdout)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_argument("--sweep", action="store_true",
                       help="run over a grid of N and V instead of one shape; write JSON and plots (time and peak "
                            "memory against N, one figure per V) into OUT/<date>-<card>/")
    bench.add_argument("--sweep-tokens", type=_positive_int, nargs="+", metavar="N",
                       help="the sweep's token counts (GPU: 2048 to 32768; CPU: 256 to 2048)")
    bench.add_argument("--sweep-vocab", type=_positive_int, nargs="+", metavar="V",
                       help="the sweep's vocabulary sizes (GPU: 32768 151936 262144; CPU: 8192 32768)")
    bench.add_argument("--out", default="benchmarks/results", help="the sweep's results folder")
    bench.set_defaults(func=_bench)

    score = sub.add_parser("score", help="store every token's confidence under a checkpoint (forward only)")
    score.add_argument("--model", required=True, nargs="+",
                       help="local model folder(s), never downloaded; several are scored in one process, "
                            "in natural order, each into the score set named by its folder")
    score.add_argument("--data", required=True, help="traces: JSONL, Parquet, a datasets folder or a folder of "
                                                     "Parquet/JSONL files (see pipeline/data.py)")
    score.add_argument("--split", help="the split of a dataset folder with several")
    score.add_argument("--store", required=True, help="the dataset's score store folder")
    score.add_argument("--name", help="score set name, e.g. base or step-50 (default: the model folder's name)")
    score.add_argument("--tokenizer", help="local tokenizer folder, for text examples (default: the model folder)")
    score.add_argument("--protocol", choices=["causal", "masked_diffusion", "block_diffusion"], default="causal")
    score.add_argument("--mask-token-id", type=int, help="for --protocol masked_diffusion / block_diffusion")
    score.add_argument("--block-size", type=_positive_int,
                       help="for --protocol block_diffusion: the student's training block size (LLaDA 2.0: 32)")
    score.add_argument("--rounds", type=_positive_int, default=2,
                       help="masking rounds of the masked-diffusion protocol")
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    score.add_argument("--device", default="cuda" if _cuda() else "cpu")
    score.add_argument("--max-tokens", type=_positive_int, default=16384, help="padded tokens per batch")
    score.add_argument("--max-batch", type=_positive_int, default=64)
    score.add_argument("--packed", action="store_true",
                       help="run each batch as one padding-free row (causal protocol; flash-attn varlen on GPU)")
    score.add_argument("--trust-remote-code", action="store_true")
    score.add_argument("--quiet", action="store_true")
    score.set_defaults(func=_score)

    sel = sub.add_parser("select", help="token masks from score sets: T3S rules and baselines")
    sel.add_argument("--store", required=True)
    sel.add_argument("--rule", required=True,
                     choices=["ar", "dllm", "inverse", "confidence_high", "confidence_low", "entropy", "random"])
    sel.add_argument("--base", default="base", help="score set of the starting student")
    sel.add_argument("--bottleneck", help="score set of the bottleneck checkpoint (ar, dllm, inverse)")
    sel.add_argument("--tau", type=float, default=0.2, help="dllm threshold: select dc < -tau")
    sel.add_argument("--budget", type=float, help="fraction of tokens, for the budget rules")
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument("--use", choices=["keep", "force_mask"],
                     help="how trainers use the mask: keep (AR: t3s_weights) or force_mask (dLLM: t3s_force_mask); "
                          "fixed by ar/inverse/dllm, default keep for the baselines")
    sel.add_argument("--out", required=True, help="folder for mask.safetensors, summary.json, plots")
    sel.add_argument("--plot", action="store_true", help="dc histogram and the bifurcation picture")
    sel.add_argument("--checkpoints", nargs="+", help="score sets, in training order, for the bifurcation plot")
    sel.set_defaults(func=_select)

    acc = sub.add_parser("accuracy", help="training accuracy of the model's own answers at each checkpoint")
    acc.add_argument("--checkpoints", nargs="+",
                     help="local checkpoint folders to generate with (ordered naturally: checkpoint-20 before "
                          "checkpoint-100); with --answers, the checkpoint names to judge (default: the file's)")
    acc.add_argument("--answers", help="answers generated elsewhere (vLLM, SGLang): JSONL / Parquet records "
                                       "{checkpoint, id, sample, text} (pipeline/answers.py, docs/answers.md)")
    acc.add_argument("--data", required=True, help="the training traces (prompt, then the reference answer)")
    acc.add_argument("--split", help="the split of a dataset folder with several")
    acc.add_argument("--tokenizer", help="local tokenizer folder (text examples; verifiers compare text)")
    acc.add_argument("--verifier", default="exact", help="exact | math | regex:PATTERN | python:FILE.py:FUNCTION")
    acc.add_argument("--out", required=True, help="the table to write: CSV 'checkpoint,accuracy,stderr,samples'")
    acc.add_argument("--samples", type=_positive_int, default=1, help="answers a prompt (K; > 1 needs --temperature)")
    acc.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    acc.add_argument("--top-p", type=float, default=1.0)
    acc.add_argument("--seed", type=int, default=0, help="of the sampling")
    acc.add_argument("--max-new-tokens", type=_positive_int,
                     help="default: the longest reference answer plus --slack")
    acc.add_argument("--batch-size", type=_positive_int, default=16, help="prompts a batch at most")
    acc.add_argument("--slack", type=int, default=8, help="new tokens beyond the reference answer's length")
    acc.add_argument("--eos-token-id", type=int, nargs="+",
                     help="one or more ids that end an answer; default: every one the model's config and "
                          "generation config name")
    acc.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    acc.add_argument("--device", default="cuda" if _cuda() else "cpu")
    acc.add_argument("--trust-remote-code", action="store_true")
    acc.add_argument("--quiet", action="store_true")
    acc.set_defaults(func=_accuracy)

    bott = sub.add_parser("bottleneck", help="the checkpoint of lowest training accuracy, from a table")
    bott.add_argument("table", help="CSV 'checkpoint,accuracy[,stderr]' or JSON {checkpoint: accuracy}; with "
                                    "standard errors a trough is declared only beyond the noise (exit 1 if none)")
    bott.add_argument("--plot", help="write the accuracy curve to this PNG")
    bott.set_defaults(func=_bottleneck)

    demo = sub.add_parser("demo", help="the whole T3S pipeline on a toy where imitation shock can appear: five "
                          "arms over seeds, on CPU (about a minute; --full longer)")
    demo.add_argument("--out", default="t3s-demo", help="folder for the report, plots and score stores")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="10 seeds, longer pilot runs (several minutes)")
    size.add_argument("--quick", action="store_true", help="a smoke run: 2 seeds, few steps (seconds)")
    demo.add_argument("--seeds", type=_positive_int, help="the number of seeds (default: 5; 10 with --full)")
    demo.add_argument("--task", choices=["style", "new_skill"], default="style",
                      help="style: the traces add only a style; new_skill: half the problems are longer than any "
                           "the base saw (t3s_kernels/demo.py)")
    demo.add_argument("--student", choices=["causal", "masked_diffusion"], default="causal",
                      help="causal: the AR rule, five arms; masked_diffusion: a dLLM student, the dLLM rule (an AR "
                           "selector's dc < -tau forced into the mask) against plain masked-diffusion training and "
                           "random forcing (t3s_kernels/demo_diffusion.py; under two minutes)")
    demo.add_argument("--tau", type=float, help="with --student masked_diffusion: the dLLM rule's threshold, "
                                                "dc < -tau forced into the mask (default 0.2)")
    demo.set_defaults(func=_demo)

    report = sub.add_parser("compile-report", help="compile every kernel for sm_90/sm_80; smem, registers, spills")
    report.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    report.add_argument("--json", action="store_true")
    report.set_defaults(func=_compile_report)
    return parser


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input the library named: one line, not a traceback
        print(f"t3s {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder that is missing, unreadable or of the wrong kind
        where = f": {e.filename}" if e.filename else ""
        print(f"t3s {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
