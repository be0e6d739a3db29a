"""The `slimlm` command end to end on a tiny corpus: train, eval, generate, compress,
finetune, bench, demo; and its refusals of bad input before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from slimlm.cli import build_parser, main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # see conftest.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json/decoder.py", "json/encoder.py", "json/scanner.py", "json/__init__.py",
                 "textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py",
                 "heapq.py", "colorsys.py", "keyword.py", "copy.py", "abc.py", "queue.py"):
        src = stdlib / name
        (folder / name.replace("/", "_")).write_text(src.read_text())
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--preset", "tiny", "--data", str(corpus), "--vocab-size", "300",
                 "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-every", "3",
                 "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_help_explains_every_option(capsys):
    parser = build_parser()
    for command in ("train", "eval", "generate", "compress", "finetune", "bench", "demo"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings} has no help"
        assert "usage: slimlm " + command in text


def test_train_writes_checkpoint_and_history(run):
    ckpt = run / "checkpoint"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"):
        assert (ckpt / f).exists(), f
    rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert any("val_bpb" in r for r in rows)


def test_eval_and_generate(run, capsys):
    assert main(["eval", str(run), "--batches", "2", "--seq-len", "32", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"loss", "ppl", "bpb"} and res["bpb"] > 0
    assert main(["generate", str(run), "--prompt", "def f(x):", "--max-new-tokens", "5",
                 "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def f(x):") and "tok/s" in out.err


def test_generate_compiled_equals_eager_and_refuses_bad_combinations(run, capsys):
    argv = ["generate", str(run), "--prompt", "def f(x):", "--max-new-tokens", "6",
            "--temperature", "0", "--device", "cpu"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    assert main([*argv, "--compile", "auto"]) == 0  # torch.compile (inductor on the CPU)
    out = capsys.readouterr()
    # Same text unless a greedy near-tie flips (inductor's vectorised RoPE math differs
    # from ATen's by an ulp: test_generate checks compiled logits with a tolerance); the
    # first new token comes from the eager prefill either way.
    assert out.out.startswith("def f(x):") and len(out.out) > len("def f(x):\n")
    assert "tok/s" in out.err and eager.startswith("def f(x):")
    with pytest.raises(SystemExit, match="--kv kivi4"):
        main([*argv, "--compile", "auto", "--kv", "kivi4"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="records CUDA graphs"):
            main([*argv, "--compile", "cuda-graph"])


@pytest.mark.parametrize("quant", [
    ["--quant", "int4", "--group-size", "32", "--method", "gptq", "--calib-samples", "4",
     "--calib-seq-len", "32", "--lm-head", "--embeddings"],
    # int8 per-channel weights, int8 per-token activations (RTN, no calibration)
    ["--quant", "w8a8"],
], ids=["int4-gptq", "w8a8"])
def test_compress_then_eval_and_generate(run, tmp_path, capsys, quant):
    out = tmp_path / quant[1]
    assert main(["compress", str(run), *quant, "--out", str(out), "--device", "cpu"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["bytes_after"] < stats["bytes_before"]
    assert main(["eval", str(out), "--batches", "2", "--seq-len", "32", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["bpb"] > 0
    assert main(["generate", str(out), "--prompt", "import", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0


def test_bench_decode_times_a_compressed_run_against_its_source(run, tmp_path, capsys):
    out = tmp_path / "tiny-int4"
    assert main(["compress", str(run), "--quant", "int4", "--group-size", "32", "--method",
                 "rtn", "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["bench", "decode", "--run", str(out), "--quick", "--out", str(tmp_path / "res"),
                 "--option", 'modes=["eager"]', "--option", "new_tokens=4",
                 "--option", "prompt_len=8"]) == 0
    rows = json.loads(next((tmp_path / "res").glob("decode-*.json")).read_text())["rows"]
    by_run = {Path(r["run"]).resolve(): r for r in rows}
    src, comp = by_run[run.resolve()], by_run[out.resolve()]
    assert rows[0] is not comp  # the source is timed first, as the baseline
    assert comp["weight_bytes"] < 0.5 * src["weight_bytes"]  # int4 codes + scales vs fp32
    assert comp["bytes_per_step"] < src["bytes_per_step"]
    assert comp["speedup_vs_source"] == pytest.approx(src["step_ms"] / comp["step_ms"])
    assert src["speedup_vs_source"] is None and comp["step_ms"] > 0
    # the source named too, another way (its checkpoint folder): timed once; only the
    # unspecified length shrinks to the context (256): 250 + 6
    assert main(["bench", "decode", "--run", str(out), "--run", str(run / "checkpoint"),
                 "--quick", "--out", str(tmp_path / "res2"), "--option", 'modes=["eager"]',
                 "--option", "prompt_len=250"]) == 0
    rows = json.loads(next((tmp_path / "res2").glob("decode-*.json")).read_text())["rows"]
    assert len(rows) == 2 and {r["new_tokens"] for r in rows} == {6}
    assert [r.get("speedup_vs_source") is None for r in rows] == [True, False]
    with pytest.raises(SystemExit, match="--run .* with suite 'quant'"):
        main(["bench", "quant", "--run", str(out), "--quick"])
    with pytest.raises(SystemExit, match="--run: RUN='/nonexistent/run'"):
        main(["bench", "decode", "--run", "/nonexistent/run", "--quick"])


def test_compress_w8a8_refuses_other_methods(run, tmp_path):
    with pytest.raises(SystemExit, match="w8a8=True with method='gptq'"):
        main(["compress", str(run), "--quant", "w8a8", "--method", "gptq", "--out",
              str(tmp_path / "bad"), "--device", "cpu"])


def test_finetune_lowers_loss_and_adapter_loads(run, corpus, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", str(run), "--data", str(corpus), "--lora", "r=4,alpha=8",
                 "--steps", "25", "--batch-size", "8", "--seq-len", "32", "--lr", "1e-2",
                 "--eval-batches", "2", "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bpb_after"] < res["bpb_before"]
    assert 0 < res["trainable_params"] < 0.2 * res["total_params"]
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert main(["eval", str(run), "--adapter", str(out / "adapter"), "--batches", "2",
                 "--seq-len", "32", "--device", "cpu"]) == 0


def test_bench_list_and_quick(tmp_path, capsys):
    assert main(["bench", "--list"]) == 0
    suites = capsys.readouterr().out.split()
    assert "train" in suites and "ceiling" in suites
    assert main(["bench", "ceiling", "--quick", "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("ceiling-*quick.json"))


@pytest.mark.parametrize("argv, msg", [
    (["train", "--preset", "nope"], "invalid choice"),
    (["train", "--device", "cuda"], "no CUDA GPU"),
    (["eval", "/nonexistent/run"], "no checkpoint found"),
    (["compress", "/nonexistent/run", "--quant", "int5", "--out", "x"], "--quant 'int5'"),
    (["compress", "/nonexistent/run", "--quant", "w8a8", "--group-size", "64", "--out", "x"],
     "group_size=64 with w8a8=True"),
    (["bench", "nope"], "suite='nope'"),
    (["train", "--preset", "tiny", "--compile", "fastest"], "compile='fastest'"),
])
def test_bad_input_is_refused(argv, msg, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        main(argv)
    text = str(e.value) + capsys.readouterr().err
    assert msg in text


def test_prompt_longer_than_context_is_refused(run):
    with pytest.raises(SystemExit, match="context is 256 tokens"):
        main(["generate", str(run), "--prompt", "x = 1\n" * 400, "--device", "cpu"])


def test_demo_quick(tmp_path, monkeypatch):
    # as a user runs it: CPU tensors on the PyTorch references, even after test_attention
    # set TRITON_INTERPRET=1 for the process (interpreted kernels made this test 78 s)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from slimlm.demo import run_demo

    figures = run_demo(tmp_path / "demo", quick=True, device="cpu", steps=4)
    for f in ("results.md", "results.json", "loss.png", "checkpoint/model.safetensors"):
        assert (tmp_path / "demo" / f).exists(), f
    names = [r["name"] for r in figures["rows"]]
    assert names[0] == "base" and len(names) > 1
    assert all(r["bpb"] > 0 for r in figures["rows"])


def test_train_compile_takes_an_optional_mode():
    from slimlm.cli import build_parser

    p = build_parser()
    assert p.parse_args(["train", "--compile"]).compile is True
    assert p.parse_args(["train", "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert p.parse_args(["train"]).compile is False


@pytest.mark.parametrize("argv, msg", [
    (["train", "--preset", "tiny", "--batch-size", "0", "--steps", "1"], "batch_size=0"),
    (["bench", "ceiling", "--quick", "--option", "bits=[4"], "not valid JSON"),
    (["bench", "ceiling", "--quick", "--option", "bogus=1"], "unknown option(s) ['bogus']"),
])
def test_library_errors_print_one_line_not_a_traceback(argv, msg, capsys, tmp_path):
    """A ValueError from the library's checks ends the command with its message and exit
    status 2 (an argparse-style error), not a traceback."""
    try:
        rc = main(argv + ["--out", str(tmp_path / "o")] if argv[0] == "bench" else argv)
    except SystemExit as e:
        text, rc = str(e), 2
    else:
        text = capsys.readouterr().err
    assert rc == 2 and msg in text and "Traceback" not in text


def test_train_refuses_to_wipe_an_existing_run(run, capsys):
    before = (run / "history.jsonl").read_text()
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "--preset", "tiny", "--steps", "1", "--device", "cpu", "--out", str(run)])
    assert (run / "history.jsonl").read_text() == before


def test_compress_refuses_to_replace_its_own_run(run):
    with pytest.raises(SystemExit, match="is the run being compressed"):
        main(["compress", str(run), "--quant", "int8", "--out", str(run), "--overwrite"])
    assert (run / "checkpoint" / "config.json").exists()


def test_a_failed_bench_start_keeps_the_earlier_results(tmp_path):
    from slimlm import bench

    good = tmp_path / "ceiling-cpu-quick.json"
    good.write_text('{"suite": "ceiling", "rows": [{"x": 1}]}')
    with pytest.raises(ValueError, match="unknown option"):
        bench.run_suite("ceiling", quick=True, out_dir=tmp_path, options={"bogus": 1},
                        echo=False)
    assert good.read_text() == '{"suite": "ceiling", "rows": [{"x": 1}]}'
