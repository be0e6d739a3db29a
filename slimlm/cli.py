"""The ``slimlm`` command: train, eval, generate, bench and demo.

Every sub-command validates its arguments before doing any work and explains every
option in ``--help``. Run folders hold everything needed to reload a model::

    RUN/checkpoint/      model.safetensors, config.json, tokenizer.json, trainer state
    RUN/history.jsonl    one JSON row per logged step / evaluation
    RUN/data/            the tokenized corpus (memory-mapped), reused between runs
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

#: ``slimlm generate --compile`` choices (see :func:`slimlm.generate.generate`'s compile=).
GENERATE_COMPILE = ("none", "auto", "cuda-graph", "inductor-graph", "default", "reduce-overhead",
                    "max-autotune")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: no CUDA GPU is available on this machine; "
                         "use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise SystemExit(f"error: --device {name!r}: expected auto, cpu or cuda[:N]")
    return name


def _checkpoint_dir(run: str | os.PathLike) -> Path:
    """Accept either a run folder (holding checkpoint/) or a checkpoint folder itself."""
    strain = importlib.import_module("slimlm.train")
    try:
        return strain.checkpoint_dir(run)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# ---------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------


def _add_train_args(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    from slimlm.model import PRESETS

    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="model shape (see slimlm.model.PRESETS); default: tiny (~1M params)")
    p.add_argument("--data", default=None,
                   help="text file, folder of text files, or JSONL with a 'text' field; "
                        "default: the Python standard library sources of this interpreter")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="use at most this many bytes of the corpus (a deterministic subset)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="BPE vocabulary size (default: the preset's)")
    p.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe",
                   help="byte-level BPE trained on the corpus, or plain bytes")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps")
    p.add_argument("--precision", default="fp32",
                   help="fp32 | tf32 | bf16-mixed (autocast, fp32 master weights) | bf16-pure "
                        "(bf16 weights, stochastic rounding) | fp16-mixed (dynamic loss "
                        "scaling) | fp8 (float8 linears, per-layer bf16 fallback)")
    p.add_argument("--checkpointing", default="none",
                   help="activation checkpointing: none | full | every:N | selective | "
                        "budget:F (planner within fraction F of the activation memory) | "
                        "offload, optionally +offload")
    p.add_argument("--attention", default=None, choices=("eager", "sdpa", "flash"),
                   help="attention implementation (default: sdpa)")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="torch.compile the model (GPU); optionally a mode: default | "
                        "reduce-overhead (CUDA graphs: for host-bound steps, e.g. fp8 at "
                        "small batches) | max-autotune | max-autotune-no-cudagraphs")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each step's forward+backward as a CUDA graph (GPU; see "
                        "slimlm.CapturedStep)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, batches)")
    if not demo:
        p.add_argument("--out", default=None, help="run folder (default: runs/<preset>-<time>)")
        p.add_argument("--resume", default=None,
                       help="resume from a run folder or checkpoint (same model config)")
        p.add_argument("--overwrite", action="store_true",
                       help="start afresh in an --out that already holds a run (its history "
                            "and checkpoint are replaced)")


def _train_defaults(preset: str) -> dict[str, Any]:
    if preset in ("tiny", "small"):
        return dict(steps=300, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30, eval_every=100)
    return dict(steps=2000, batch_size=8, seq_len=1024, lr=6e-4, warmup_steps=100, eval_every=250)


def _run_training(args: argparse.Namespace, out: Path, *, progress: bool = True):
    import torch

    sdata = importlib.import_module("slimlm.data")
    strain = importlib.import_module("slimlm.train")
    from slimlm.model import ModelConfig, Transformer

    device = _device(args.device)
    defaults = _train_defaults(args.preset)
    overrides: dict[str, Any] = {}
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    if args.attention is not None:
        overrides["attention"] = args.attention
    try:
        model_cfg = ModelConfig.from_preset(args.preset, **overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    def given(value: Any, default: Any) -> Any:  # 0 is a value to check, not "unset"
        return default if value is None else value

    seq_len = given(args.seq_len, min(defaults["seq_len"], model_cfg.max_seq_len))
    try:
        tcfg = strain.TrainConfig(
            batch_size=given(args.batch_size, defaults["batch_size"]), seq_len=seq_len,
            steps=args.steps if args.steps is not None else defaults["steps"],
            lr=given(args.lr, defaults["lr"]),
            warmup_steps=(args.warmup_steps if args.warmup_steps is not None
                          else defaults["warmup_steps"]),
            grad_accum=args.grad_accum,
            eval_every=given(args.eval_every, defaults["eval_every"]),
            precision=args.precision, checkpointing=args.checkpointing, device=device,
            compile=args.compile, cuda_graph=args.cuda_graph, seed=args.seed,
            out_dir=str(out))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    tokenizer_folder = None
    if getattr(args, "resume", None):
        tokenizer_folder = _checkpoint_dir(args.resume)
    bundle = sdata.prepare_data(
        args.data, out / "data", vocab_size=model_cfg.vocab_size, tokenizer=args.tokenizer,
        max_bytes=args.max_bytes, tokenizer_folder=tokenizer_folder)
    if bundle.tokenizer.vocab_size != model_cfg.vocab_size:
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(),
                                           "vocab_size": bundle.tokenizer.vocab_size})
    torch.manual_seed(args.seed)
    model = Transformer(model_cfg)
    resume = _checkpoint_dir(args.resume) if getattr(args, "resume", None) else None
    result = strain.train(model, bundle, tcfg, resume_from=resume, progress=progress)
    return model, bundle, result


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    held = [n for n in ("checkpoint", "history.jsonl") if (out / n).exists()]
    resuming_here = args.resume is not None and (
        Path(args.resume).resolve() in (out.resolve(), (out / "checkpoint").resolve()))
    if held and not args.overwrite and not resuming_here:
        raise SystemExit(f"error: --out {str(out)!r} already holds a run ({', '.join(held)}); "
                         f"continue it with --resume {str(out)!r}, pass --overwrite to start "
                         "afresh there, or choose another folder")
    model, bundle, result = _run_training(args, out)
    print(json.dumps({"out": str(out), **{k: v for k, v in result.final_eval.items()}}, indent=2))
    return 0


# ---------------------------------------------------------------------------------------
# eval / generate
# ---------------------------------------------------------------------------------------


def _load_run(run: str, device: str, adapter: str | None = None):
    """Model, tokenizer and checkpoint folder of a run: a trained checkpoint, or one
    written by ``slimlm compress`` (quantized), optionally with a LoRA adapter on top."""
    sdata = importlib.import_module("slimlm.data")
    strain = importlib.import_module("slimlm.train")

    ckpt = _checkpoint_dir(run)
    try:
        model = strain.load_run(ckpt, device=device)
        if adapter:
            from slimlm import lora

            if not (Path(adapter) / "adapter_config.json").exists():
                raise ValueError(f"--adapter {adapter!r}: no adapter_config.json there; "
                                 "expected a folder written by `slimlm finetune`")
            lora.load(model, adapter, trainable=False)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    tokenizer = sdata.load_tokenizer(ckpt)
    return model, tokenizer, ckpt


def cmd_eval(args: argparse.Namespace) -> int:
    sdata = importlib.import_module("slimlm.data")
    strain = importlib.import_module("slimlm.train")

    device = _device(args.device)
    model, tokenizer, ckpt = _load_run(args.run, device, args.adapter)
    folder = _data_folder(args.run) if args.data is None else Path(args.cache or
                                                                   Path(args.run) / "data-eval")
    bundle = sdata.prepare_data(args.data, folder, vocab_size=tokenizer.vocab_size,
                                tokenizer_folder=ckpt, max_bytes=args.max_bytes)
    seq_len = args.seq_len if args.seq_len is not None else min(256, model.cfg.max_seq_len)
    res = strain.evaluate(model, bundle.val, batch_size=args.batch_size, seq_len=seq_len,
                          max_batches=args.batches, device=device)
    print(json.dumps(res, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    sgen = importlib.import_module("slimlm.generate")

    device = _device(args.device)
    compile_arg: bool | str = {"none": False, "auto": True}.get(args.compile, args.compile)
    if compile_arg is not False and args.kv != "static":
        raise SystemExit(f"error: --compile {args.compile} with --kv {args.kv}: compiled "
                         "decoding runs over the static cache; use --kv static")
    if args.compile in ("cuda-graph", "inductor-graph", "reduce-overhead", "max-autotune") and \
            not str(device).startswith("cuda"):
        raise SystemExit(f"error: --compile {args.compile} records CUDA graphs, but the device "
                         f"is {device}; use --compile auto or default off the GPU")
    model, tokenizer, _ = _load_run(args.run, device, args.adapter)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise SystemExit("error: --prompt is empty after tokenization; give some text")
    if len(ids) >= model.cfg.max_seq_len:
        raise SystemExit(f"error: --prompt is {len(ids)} tokens long; the model's context is "
                         f"{model.cfg.max_seq_len} tokens (max_seq_len)")
    max_new = min(args.max_new_tokens, model.cfg.max_seq_len - len(ids))
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    printed = [args.prompt]

    def stream(step: int, toks: list[int]) -> None:
        if args.stream:
            print(tokenizer.decode([toks[0]]), end="", flush=True)

    if args.stream:
        print(args.prompt, end="", flush=True)
    res = sgen.generate(model, [ids], max_new, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, stop_tokens=[tokenizer.eos_id], cache=args.kv,
                        stream=stream, generator=gen, compile=compile_arg)
    if args.stream:
        print()
    else:
        printed.append(tokenizer.decode(res.tokens[0]))
        print("".join(printed))
    print(f"[{res.num_new_tokens} tokens, {res.tokens_per_second:.1f} tok/s, "
          f"KV cache {res.cache_bytes / 2**20:.2f} MiB]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------
# compress / finetune
# ---------------------------------------------------------------------------------------


def _data_folder(run: str | os.PathLike) -> Path:
    """The tokenized corpus of a run; a compressed run uses the one it was made from."""
    run = Path(run)
    if not (run / "data").exists() and (run / "compress.json").exists():
        source = json.loads((run / "compress.json").read_text()).get("source_run")
        if source and (Path(source) / "data").exists():
            return Path(source) / "data"
    return run / "data"


def _calibration_tokens(run: str, ckpt: Path, data: str | None, n: int, seq_len: int,
                        max_bytes: int | None):
    import torch

    sdata = importlib.import_module("slimlm.data")
    folder = _data_folder(run) if data is None and _data_folder(run).exists() \
        else Path(run) / "data-calib"
    tok = sdata.load_tokenizer(ckpt)
    bundle = sdata.prepare_data(data, folder, vocab_size=tok.vocab_size, tokenizer_folder=ckpt,
                                max_bytes=max_bytes)
    g = torch.Generator().manual_seed(0)
    return bundle.train.get_batch(n, seq_len, generator=g)[0]


def cmd_compress(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from slimlm import quant
    from slimlm._io import atomic_write_text, replace_dir

    w8a8 = args.quant == "w8a8"
    bits = {"int8": 8, "int4": 4, "int3": 3, "int2": 2, "w8a8": 8}.get(args.quant)
    if bits is None:
        raise SystemExit(f"error: --quant {args.quant!r}: expected int8, int4, int3, int2 or "
                         "w8a8")
    # GPTQ by default for weight-only formats; W8A8 rounds its per-channel weights (RTN)
    method = args.method or ("rtn" if w8a8 else "gptq")
    try:
        kw: dict[str, Any] = {}
        if args.group_size is not None:  # else QuantConfig's default
            kw["group_size"] = args.group_size or None  # 0: per channel
        if args.symmetric:
            kw["symmetric"] = True
        qcfg = quant.QuantConfig(bits=bits, method=method, awq=args.awq, w8a8=w8a8,
                                 act_order=args.act_order, include_lm_head=args.lm_head,
                                 include_embeddings=args.embeddings, **kw)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out)
    src = _checkpoint_dir(args.run).resolve()
    if src in (out.resolve(), (out / "checkpoint").resolve()):
        raise SystemExit(f"error: --out {str(out)!r} is the run being compressed; the "
                         "quantized checkpoint would replace the trained one: choose another "
                         "folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: --out {str(out)!r} exists and is not empty; "
                         "pass --overwrite or choose another folder")
    device = _device(args.device)
    model, tokenizer, ckpt = _load_run(args.run, device)
    calib = None
    if method == "gptq" or args.awq:
        seq = min(args.calib_seq_len, model.cfg.max_seq_len)
        calib = _calibration_tokens(args.run, ckpt, args.data, args.calib_samples, seq,
                                    args.max_bytes).to(device)
    before = quant.model_size_bytes(model)
    t0 = time.time()
    try:
        quant.quantize_(model, qcfg, calib=calib)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    # Build the whole checkpoint in a temporary folder, then rename it into place: a crash
    # never leaves --out holding half of a model.
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "checkpoint"
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=out))
    try:
        quant.save_quantized(model, staging)
        shutil.copy2(ckpt / "config.json", staging / "config.json")
        tokenizer.save(staging)
        replace_dir(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    stats = quant.quant_stats(model)
    atomic_write_text(out / "compress.json", json.dumps(
        {"source_run": str(Path(args.run).resolve()), "quant_config": qcfg.to_dict()
         if hasattr(qcfg, "to_dict") else str(qcfg)}, indent=2))
    print(json.dumps({"out": str(out), "seconds": round(time.time() - t0, 1),
                      "bytes_before": before, "bytes_after": quant.model_size_bytes(model),
                      **{k: v for k, v in stats.items() if not isinstance(v, (dict, list))}},
                     indent=2))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch

    from slimlm import lora, quant

    sdata = importlib.import_module("slimlm.data")
    strain = importlib.import_module("slimlm.train")
    try:
        lcfg = lora.LoRAConfig.from_string(args.lora)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: --lora {args.lora!r}: {e}") from None
    if args.qlora not in (None, "int8", "int4"):
        raise SystemExit(f"error: --qlora {args.qlora!r}: expected int4 or int8")
    if args.data is not None and not Path(args.data).exists():
        raise SystemExit(f"error: --data {args.data!r}: no such file or folder")
    device = _device(args.device)
    out = Path(args.out)

    def train_config(seq_len: int) -> Any:
        steps = args.steps if isinstance(args.steps, int) else 0
        return strain.TrainConfig(
            batch_size=args.batch_size, seq_len=seq_len, steps=args.steps, lr=args.lr,
            warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 4),
            eval_batches=args.eval_batches, precision=args.precision,
            cuda_graph=args.cuda_graph, device=device, seed=args.seed,
            out_dir=str(out / "train"))

    try:  # every training option checked before the model loads and the data is tokenized
        train_config(args.seq_len)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    model, tokenizer, ckpt = _load_run(args.run, device)
    bundle = sdata.prepare_data(args.data, out / "data", vocab_size=tokenizer.vocab_size,
                                tokenizer_folder=ckpt, max_bytes=args.max_bytes)
    seq_len = min(args.seq_len, model.cfg.max_seq_len)
    if args.qlora:
        quant.quantize_(model, quant.QuantConfig(bits=8 if args.qlora == "int8" else 4,
                                                 group_size=32, method="hqq"))
    before = strain.evaluate(model, bundle.val, batch_size=8, seq_len=seq_len,
                             max_batches=args.eval_batches, device=device)
    try:
        lora.apply_(model, lcfg)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    trainable, total = lora.trainable_parameters(model)
    try:
        tcfg = train_config(seq_len)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    torch.manual_seed(args.seed)
    strain.train(model, bundle, tcfg)
    after = strain.evaluate(model, bundle.val, batch_size=8, seq_len=seq_len,
                            max_batches=args.eval_batches, device=device)
    lora.save(model, out / "adapter")
    print(json.dumps({"adapter": str(out / "adapter"), "trainable_params": trainable,
                      "total_params": total, "bpb_before": before["bpb"],
                      "bpb_after": after["bpb"]}, indent=2))
    return 0


# ---------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    bench = importlib.import_module("slimlm.bench")

    if args.list:
        print("\n".join(bench.list_suites()))
        return 0
    if args.report:
        path = bench.render_report(args.results, args.report_out)
        print(f"wrote {path}")
        return 0
    if not args.suite:
        raise SystemExit("error: give a suite name (or `all`), --list or --report")
    names = bench.list_suites() if args.suite == "all" else [args.suite]
    for name in names:
        if name not in bench.list_suites():
            raise SystemExit(f"error: suite={name!r}: unknown; expected one of "
                             f"{bench.list_suites()} or all")
    options: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError as e:
            if value and value[:1] in "[{\"":
                # meant as JSON but malformed: a plain string would be iterated char by char
                raise SystemExit(f"error: --option {item!r}: the value is not valid JSON "
                                 f"({e.msg} at column {e.pos + 1}); quote strings as "
                                 "'\"text\"' and close lists") from e
            options[key] = value
    if args.run:
        if names != ["decode"]:
            raise SystemExit(f"error: --run {args.run[0]!r} with suite {args.suite!r}: runs are "
                             "timed by the decode suite (`slimlm bench decode --run RUN`)")
        if "run" in options:
            raise SystemExit("error: --run and --option run=...: give the runs once")
        strain = importlib.import_module("slimlm.train")
        for r in args.run:  # before any work: every folder must hold a checkpoint
            try:
                strain.checkpoint_dir(r)
            except ValueError as e:
                raise SystemExit(f"error: --run: {e}") from None
        options["run"] = list(args.run)
    for name in names:
        path = bench.run_suite(name, quick=args.quick, out_dir=args.out, options=options or None)
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    demo = importlib.import_module("slimlm.demo")

    demo.run_demo(Path(args.out), quick=args.quick, device=_device(args.device), steps=args.steps)
    return 0


# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimlm", description="Make language models smaller, cheaper and faster.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from scratch on a corpus",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run folder (or its checkpoint folder)")
    p.add_argument("--data", default=None,
                   help="evaluate on this text/folder/JSONL (its validation split) instead of "
                        "the run's own validation data")
    p.add_argument("--cache", default=None, help="folder for the tokenized --data")
    p.add_argument("--max-bytes", type=int, default=None, help="cap the corpus size")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--batches", type=int, default=None, help="at most this many batches")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT format) to "
                                                    "apply on top of the model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text from a trained run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run folder (or its checkpoint folder)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--kv", default="static",
                   help="KV cache kind: static | dense | kivi8 | kivi4 | kivi2 | sink | "
                        "sink-kivi4 | sink-kivi2 | h2o | snapkv (see slimlm.kvcache)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to apply")
    p.add_argument("--compile", default="none", choices=GENERATE_COMPILE,
                   help="decode step: none (eager) | auto (torch.compile; with CUDA graphs "
                        "on a GPU) | cuda-graph (eager step replayed from a CUDA graph, no "
                        "compile) | a torch.compile mode; needs --kv static")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compress", help="quantize a trained run's weights (int8/int4/int3/"
                                        "int2; RTN, GPTQ or HQQ) or weights and activations "
                                        "(w8a8) into a new run folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run folder (or its checkpoint folder)")
    p.add_argument("--quant", required=True,
                   help="int8 | int4 | int3 | int2 (weights) | w8a8 (int8 per-channel "
                        "weights and dynamic int8 per-token activations)")
    p.add_argument("--group-size", type=int, default=None,
                   help="weights per scale along the input dim (32, 64, 128; default 128); "
                        "0 = per channel")
    p.add_argument("--method", default=None, choices=("rtn", "gptq", "hqq"),
                   help="round-to-nearest, GPTQ (calibrated) or HQQ (calibration-free); "
                        "default gptq (rtn for w8a8, its only method)")
    p.add_argument("--symmetric", action="store_true", help="no zero points")
    p.add_argument("--awq", action="store_true", help="activation-aware input scaling")
    p.add_argument("--act-order", action="store_true", help="GPTQ activation ordering")
    p.add_argument("--lm-head", action="store_true", help="also quantize the LM head")
    p.add_argument("--embeddings", action="store_true",
                   help="also quantize the token embedding (RTN, or HQQ with --method hqq; "
                        "a tied embedding needs --lm-head and then reads the head's codes, "
                        "made by the head's method)")
    p.add_argument("--data", default=None, help="calibration text (default: the run's data)")
    p.add_argument("--max-bytes", type=int, default=None, help="cap the calibration corpus")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--calib-seq-len", type=int, default=256, help="calibration length")
    p.add_argument("--out", required=True, help="new run folder for the quantized model")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("finetune", help="train a LoRA (or QLoRA) adapter on new text",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="base run folder (or its checkpoint folder)")
    p.add_argument("--lora", default="r=16,alpha=32,targets=all-linear",
                   help="adapter settings: r, alpha, dropout, targets (all-linear, names, "
                        "globs, re:regex joined by +), dora=true, rslora=true, init")
    p.add_argument("--qlora", default=None, help="quantize the base first: int4 | int8")
    p.add_argument("--data", default=None, help="fine-tuning text/folder/JSONL "
                                                "(default: the stdlib corpus)")
    p.add_argument("--max-bytes", type=int, default=None, help="cap the corpus size")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--precision", default="fp32", help="precision policy (see train)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each step's forward+backward as a CUDA graph (GPU; the "
                        "LoRA step is otherwise bound by kernel launches)")
    p.add_argument("--eval-batches", type=int, default=20, help="evaluation batches")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", required=True, help="folder for the adapter and logs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("bench", help="run benchmark suites (see shared MEASURING protocol)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("suite", nargs="?", default=None, help="suite name, or `all`")
    p.add_argument("--quick", action="store_true", help="tiny shapes, seconds, CPU-friendly")
    p.add_argument("--out", default=None,
                   help="folder for the JSON results (default: benchmarks/results; "
                        "--quick runs go to a temporary folder)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="suite option, repeatable; VALUE is parsed as JSON when it can be "
                        "(e.g. --option models='[\"llama-1b\"]' --option batch=4)")
    p.add_argument("--run", action="append", default=[], metavar="RUN",
                   help="decode suite: time this run folder's model (trained, or written by "
                        "`slimlm compress`, then against its source run), repeatable")
    p.add_argument("--list", action="store_true", help="list the suites")
    p.add_argument("--report", action="store_true",
                   help="render benchmarks/RESULTS.md (tables, plots) from the results")
    p.add_argument("--results", default="benchmarks/results", help="results folder for --report")
    p.add_argument("--report-out", default="benchmarks/RESULTS.md", help="report path")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="train, evaluate, compress and compare a small model "
                                    "on this machine (about 5 minutes on 2 CPU cores)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run folder to write")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: auto)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as e:
        # The library's argument checks name the argument and the value: print that, not a
        # traceback (SLIMLM_TRACEBACK=1 shows where it came from).
        if os.environ.get("SLIMLM_TRACEBACK") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
