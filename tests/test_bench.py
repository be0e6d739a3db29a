"""Tests for the benchmark harness, the report renderer and every registered suite (quick)."""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from slimlm import bench
from slimlm.bench import harness, report

ENV_KEYS = {"gpu", "driver", "cuda", "torch", "triton", "python", "slimlm", "git_commit",
            "date", "command", "quick"}
TRAIN_KEYS = {"suite", "model", "impl", "batch", "seq_len", "tokens_per_s", "mfu",
              "frac_of_measured_ceiling", "peak_mem_gib", "step_ms", "ratio_vs_hf", "loss",
              "baseline"}


def test_list_suites_has_first_suites():
    names = bench.list_suites()
    assert names[:2] == ["ceiling", "train"]
    assert len(names) == len(set(names))


def test_unknown_suite_lists_known(tmp_path):
    with pytest.raises(ValueError, match=r"suite='nope'.*'ceiling'.*'train'"):
        bench.run_suite("nope", quick=True, out_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written before the error


def test_register_rejects_a_second_function_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        harness.register("train")(lambda quick, device: iter(()))
    with pytest.raises(ValueError, match="lower-case identifier"):
        harness.register("Bad Name")


@pytest.mark.parametrize("name", bench.list_suites())
def test_every_suite_runs_quick_on_cpu(name, tmp_path, one_thread, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))  # keep the user's cache clean
    # A smoke test of the suites: CPU tensors take the PyTorch references, as on a user's
    # CPU, even after test_attention switched this process to the Triton interpreter (the
    # kernels have their own interpreter tests; interpreted, the kvcache suite took 70 s)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path = bench.run_suite(name, quick=True, out_dir=tmp_path, device="cpu", echo=False)
    assert path == tmp_path / f"{name}-cpu-quick.json"
    doc = json.loads(path.read_text())
    assert doc["suite"] == name and doc["status"] == "ok"
    assert ENV_KEYS <= set(doc["env"]), ENV_KEYS - set(doc["env"])
    assert doc["env"]["quick"] is True and doc["env"]["torch"] == torch.__version__
    assert "hostname" not in json.dumps(doc["env"]).lower()
    assert doc["rows"], "a suite must yield at least one row"
    for row in doc["rows"]:
        assert row["suite"] == name
        assert not row.get("oom") and "error" not in row, row
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write
    _SUITE_CHECKS.get(name, lambda rows: None)(doc["rows"])


def _check_lora(rows):
    by = {r["method"]: r for r in rows}
    for m in ("slimlm-lora", "slimlm-dora"):  # same outputs as PEFT, and the adapter matters
        assert by[m]["err_vs_peft"] < 1e-4 and by[m]["adapter_effect"] > 1e-3, by[m]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def _check_decode(rows):
    assert {r["mode"] for r in rows} >= {"eager"}
    assert all(r["same_tokens_as_eager"] == 1.0 and r["tokens_per_s"] > 0 for r in rows)


def _check_quant_quality(rows):
    assert rows[0]["bits"] == 32 and all(r["bpb"] > 0 for r in rows)
    rtn = {r["bits"]: r["size_mib"] for r in rows if r["method"] == "rtn"}
    assert rtn and sorted(rtn, key=rtn.get) == sorted(rtn)  # fewer bits, smaller model


def _check_lora_quality(rows):
    full = [r for r in rows if r["method"] == "full fine-tuning"][0]
    assert full["trainable_params"] > max(r["trainable_params"] for r in rows if r["r"])


def _check_train(rows):
    assert all(r["tokens_per_s"] > 0 and r["loss_finite"] for r in rows if "tokens_per_s" in r)


def _check_attention_train(rows):
    final = {r["attention"]: r for r in rows if r["kind"] == "final"}
    assert set(final) == {"sdpa", "flash"} and final["sdpa"]["speedup_vs_sdpa"] == 1.0
    # on the CPU "flash" falls back to SDPA: the same training, step for step
    assert final["flash"]["curve_max_abs_diff"] == final["flash"]["curve_mean_abs_diff"] == 0.0
    assert final["flash"]["val_bpb_diff"] == 0.0
    assert final["flash"]["val_bpb"] == final["sdpa"]["val_bpb"] > 0
    assert len([r for r in rows if r["kind"] == "curve"]) >= 4


_SUITE_CHECKS = {"lora": _check_lora, "decode": _check_decode,
                 "quant_quality": _check_quant_quality, "lora_quality": _check_lora_quality,
                 "train": _check_train, "attention_train": _check_attention_train}


def test_train_quick_rows(tmp_path, one_thread):
    path = bench.run_suite("train", quick=True, out_dir=tmp_path, device="cpu", echo=False)
    rows = json.loads(path.read_text())["rows"]
    impls = [r["impl"] for r in rows]
    assert impls == ["hf-sdpa", "slimlm-eager-mode"]
    for r in rows:
        assert TRAIN_KEYS <= set(r), TRAIN_KEYS - set(r)
        assert (r["model"], r["batch"], r["seq_len"]) == ("tiny", 2, 64)
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 64 / (r["step_ms"] / 1e3))
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU: no datasheet, no stats
        assert 0 < r["frac_of_measured_ceiling"]
        # random tokens over a 2048-token vocabulary: loss near ln(2048) = 7.6
        assert 5.0 < r["loss"] < 9.0
    assert rows[0]["ratio_vs_hf"] == 1.0
    assert rows[1]["ratio_vs_hf"] == pytest.approx(
        rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])


def test_train_options_are_validated_before_work(tmp_path):
    with pytest.raises(ValueError, match="models: 'gpt-9'"):
        bench.run_suite("train", quick=True, out_dir=tmp_path, echo=False,
                        options={"models": ["gpt-9"]})
    with pytest.raises(ValueError, match="seq_len=4096"):
        bench.run_suite("train", quick=True, out_dir=tmp_path, echo=False,
                        options={"seq_len": 4096})
    with pytest.raises(ValueError, match="sdpa_backends"):
        bench.run_suite("train", quick=True, out_dir=tmp_path, echo=False,
                        options={"sdpa_backends": ["fastest"]})


def test_attention_train_seeds_give_paired_summaries(tmp_path, one_thread, monkeypatch):
    # test_attention.py switches the Triton interpreter on for the process: "flash" must
    # fall back to SDPA here, as on any CPU without it
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path = bench.run_suite("attention_train", quick=True, out_dir=tmp_path, device="cpu",
                           echo=False, options={"seeds": [0, 1], "steps": 3})
    rows = json.loads(path.read_text())["rows"]
    finals = [r for r in rows if r["kind"] == "final"]
    assert sorted((r["seed"], r["attention"]) for r in finals) == [
        (0, "flash"), (0, "sdpa"), (1, "flash"), (1, "sdpa")]
    by = {(r["seed"], r["attention"]): r for r in finals}
    assert by[(0, "sdpa")]["val_bpb"] != by[(1, "sdpa")]["val_bpb"]  # seeds differ
    summary = {r["attention"]: r for r in rows if r["kind"] == "summary"}
    assert set(summary) == {"sdpa", "flash"}
    sdpa = summary["sdpa"]
    vals = [by[(s, "sdpa")]["val_bpb"] for s in (0, 1)]
    assert sdpa["seeds"] == 2 and sdpa["val_bpb"] == pytest.approx(sum(vals) / 2)
    assert sdpa["val_bpb_sd"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
    # CPU flash falls back to SDPA: the same run per seed, zero difference and spread
    assert summary["flash"]["paired_seeds"] == 2
    assert summary["flash"]["val_bpb_diff"] == 0.0 == summary["flash"]["val_bpb_diff_se"]
    assert {r["seed"] for r in rows if r["kind"] == "curve"} == {0, 1}


def test_attention_train_options_are_validated_before_work(tmp_path):
    for opts, match in (({"model": "gpt-9"}, "model='gpt-9'"),
                        ({"seq_lens": [48]}, "do not divide"),
                        ({"seq_lens": [0]}, "seq_lens=\\[0\\]"),
                        ({"attentions": ["flash", "sdpa"]}, "starting with 'sdpa'"),
                        ({"attentions": ["sdpa", "xformers"]}, "attentions="),
                        ({"attentions": ["sdpa", "sdpa-efficient"]}, "CUDA-only"),
                        ({"seeds": [1, 1]}, "distinct seeds"),
                        ({"seeds": [-1]}, "seeds >= 0"),
                        ({"seeds": [0], "seed": 1}, "one of the two"),
                        ({"attentions": ["sdpa", "flash", "sdpa"]}, "each once")):
        with pytest.raises(ValueError, match=match):
            bench.run_suite("attention_train", quick=True, out_dir=tmp_path, echo=False,
                            options=opts)


def test_failing_suite_keeps_partial_rows(tmp_path, monkeypatch):
    def broken(quick, device):
        yield {"x": 1}
        raise RuntimeError("boom")

    monkeypatch.setitem(harness._REGISTRY, "broken", broken)
    with pytest.raises(RuntimeError, match="boom"):
        harness.run_suite("broken", quick=True, out_dir=tmp_path, echo=False)
    doc = json.loads((tmp_path / "broken-cpu-quick.json").read_text())
    assert doc["status"] == "error" and "boom" in doc["error"]
    assert doc["rows"] == [{"suite": "broken", "x": 1}]


def test_quant_decode_rows_quick(tmp_path, one_thread):
    """The quant suite's decode=True rows: one per (format, mode, batch); on the CPU only
    eager (CUDA graphs need a GPU), each format against the bf16 row of its mode and batch."""
    path = bench.run_suite("quant", quick=True, out_dir=tmp_path, device="cpu", echo=False,
                           options={"decode": True, "shapes": [(64, 128)], "ms": [1]})
    rows = [r for r in json.loads(path.read_text())["rows"] if r.get("kind") == "decode"]
    assert {(r["format"], r["mode"], r["batch"]) for r in rows} == {
        (f, "eager", b) for f in ("bf16", "int8-g128", "int4-g128", "int2-g64") for b in (1, 16)}
    for r in rows:
        assert "error" not in r and r["tokens_per_s"] > 0, r
        assert r["same_tokens_as_eager"] == 1.0
        if r["format"] == "bf16":
            assert r["speedup_vs_bf16"] == 1.0


def test_decode_suite_refuses_cuda_graph_modes_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="cuda-graph.*device=cpu"):
        bench.run_suite("decode", quick=True, out_dir=tmp_path, device="cpu", echo=False,
                        options={"modes": ["eager", "cuda-graph"]})
    with pytest.raises(ValueError, match="reduce-overhead\\+torch.*device=cpu"):
        bench.run_suite("decode", quick=True, out_dir=tmp_path, device="cpu", echo=False,
                        options={"modes": ["eager", "reduce-overhead+torch"]})
    with pytest.raises(ValueError, match="modes="):
        bench.run_suite("decode", quick=True, out_dir=tmp_path, device="cpu", echo=False,
                        options={"modes": ["eager", "aot_eager+cublas"]})


def test_decode_suite_run_options_are_checked(tmp_path):
    def suite(**options):
        return bench.run_suite("decode", quick=True, out_dir=tmp_path, device="cpu",
                               echo=False, options=options)

    with pytest.raises(ValueError, match="model='tiny' and run="):
        suite(model="tiny", run=str(tmp_path))
    with pytest.raises(ValueError, match="dtype='int8'"):
        suite(run=str(tmp_path), dtype="int8")
    with pytest.raises(ValueError, match="dtype='bfloat16': applies to run= models only"):
        suite(dtype="bfloat16")
    with pytest.raises(ValueError, match="no checkpoint found"):
        suite(run=str(tmp_path / "missing"))


def test_decode_suite_compares_with_torch_compile_alone(tmp_path, one_thread):
    """A "+torch" mode runs the same compiled step with slimlm's decode kernels off; the
    slimlm row of that mode carries ratio_vs_torch from the same run."""
    path = bench.run_suite("decode", quick=True, out_dir=tmp_path, device="cpu", echo=False,
                           options={"modes": ["eager", "aot_eager+torch", "aot_eager"],
                                    "new_tokens": 3})
    rows = {r["mode"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["aot_eager+torch"]["decode_kernels"] == "torch"
    assert rows["aot_eager"]["decode_kernels"] == "slimlm"
    assert rows["aot_eager"]["ratio_vs_torch"] > 0
    assert rows["aot_eager+torch"]["ratio_vs_torch"] is None
    assert rows["aot_eager"]["same_tokens_as_eager"] == 1.0


def test_quick_default_out_dir_is_not_the_committed_results():
    assert harness.default_out_dir(True) != harness.default_out_dir(False)
    assert str(harness.default_out_dir(False)) == "benchmarks/results"


def test_guarded_records_oom_and_errors():
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    row = harness.guarded({"model": "m"}, oom)
    assert row == {"model": "m", "oom": True,
                   "error": "CUDA out of memory. Tried to allocate 80 GiB"}
    assert harness.guarded({"a": 1}, lambda: {"b": 2}) == {"a": 1, "b": 2}

    def bad():
        raise RuntimeError("no kernel")

    with pytest.raises(RuntimeError):
        harness.guarded({}, bad)
    assert harness.guarded({}, bad, errors=True) == {"error": "RuntimeError: no kernel"}


def test_cpu_timer_medians_are_sane():
    calls = []

    def sleep_2ms():
        calls.append(1)
        time.sleep(0.002)

    t = harness.time_cuda(sleep_2ms, warmup=2, rep=10, device="cpu")  # CPU fallback
    assert len(calls) == 12 and t["n"] == 10
    assert 1.9 <= t["median_ms"] < 50
    assert t["min_ms"] <= t["p10"] <= t["median_ms"] <= t["p90"]
    assert harness.time_cpu(lambda: None, warmup=0, rep=3)["n"] == 3
    with pytest.raises(ValueError, match="rep=0"):
        harness.time_cpu(lambda: None, rep=0)
    with pytest.raises(ValueError, match="warmup=-1"):
        harness.time_fn(lambda: None, "cpu", warmup=-1)
    with pytest.raises(ValueError, match="spin_s=-1"):
        harness.time_cuda(lambda: None, device="cpu", spin_s=-1)
    with pytest.raises(ValueError, match="flush_l2='clean'"):
        harness.time_cuda(lambda: None, device="cpu", flush_l2="clean")


def test_units_and_slugs():
    assert harness.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert harness.gbps(4e9, 1.0) == pytest.approx(4000.0)
    assert harness.fraction(1.0, 4.0) == 0.25 and harness.fraction(None, 4.0) is None
    assert harness.peak_memory(lambda: None, "cpu") is None
    assert harness.slugify_gpu_name("NVIDIA H200") == "h200"
    assert harness.slugify_gpu_name("NVIDIA H100 80GB HBM3") == "h100"
    assert harness.slugify_gpu_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert harness.slugify_gpu_name("NVIDIA GeForce RTX 4090") == "rtx-4090"
    assert harness.gpu_slug("cpu") == "cpu"


def test_json_is_strict(tmp_path):
    p = harness.write_json_atomic(tmp_path / "x.json",
                                  {"a": float("nan"), "t": torch.tensor(2.5), "p": tmp_path})
    text = p.read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"a": "nan", "t": 2.5, "p": str(tmp_path)}


def _synthetic(results, suite, gpu, rows, quick=False):
    env = harness.environment("cpu", quick=quick)
    env.update(gpu=gpu, driver="570.1", cuda="12.8", command="slimlm bench " + suite)
    doc = {"suite": suite, "status": "ok", "env": env, "rows": rows}
    harness.write_json_atomic(results / f"{suite}-h200{'-quick' if quick else ''}.json", doc)


def test_render_report_tables_and_plot(tmp_path):
    results = tmp_path / "results"
    rows = []
    for model in ("llama-160m", "llama-1b"):
        for impl, tps in (("hf-sdpa", 1e5), ("slimlm-compiled", 1.5e5)):
            rows.append({"suite": "train", "model": model, "impl": impl,
                         "sdpa_backend": "default", "batch": 4, "seq_len": 2048,
                         "tokens_per_s": tps, "mfu": 0.41234, "peak_mem_gib": 12.3456,
                         "ratio_vs_hf": tps / 1e5, "oom": None})
    rows.append({"suite": "train", "model": "llama-8b", "impl": "hf-sdpa", "batch": 4,
                 "seq_len": 2048, "oom": True, "error": "CUDA out of memory | 80 GiB"})
    _synthetic(results, "train", "NVIDIA H200", rows)
    _synthetic(results, "ceiling", "NVIDIA H200",
               [{"suite": "ceiling", "op": "matmul", "tflops": 791.23}])
    _synthetic(results, "train", "cpu", [{"suite": "train", "x": 1}], quick=True)
    out = bench.render_report(results, tmp_path / "RESULTS.md")
    md = out.read_text()
    assert md.index("## ceiling") < md.index("## train")  # suite order
    assert "quick" not in md.split("\n## ", 1)[1]  # quick results left out by default
    assert "NVIDIA H200" in md and "driver 570.1" in md and "`slimlm bench train`" in md
    assert "| model | impl | sdpa_backend | batch | seq_len | tokens_per_s |" in md
    assert "| llama-1b | slimlm-compiled | default | 4 | 2048 | 150,000 | 0.412 | 12.35 | 1.50 | - | - |" in md
    assert "| llama-8b | hf-sdpa | - | 4 | 2048 | - | - | - | - | yes |" in md
    assert "CUDA out of memory \\| 80 GiB" in md  # pipes escaped inside cells
    png = tmp_path / "train-h200.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![train on NVIDIA H200](train-h200.png)" in md
    assert not (tmp_path / "ceiling-h200.png").exists()  # no plot for ceiling
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_render_report_plots_curve_points_instead_of_tabling_them(tmp_path):
    results = tmp_path / "results"
    rows = [{"suite": "precision", "part": "run", "policy": "fp32", "val_bpb": 1.68}]
    rows += [{"suite": "precision", "part": "run", "kind": "curve", "policy": "fp32",
              "step": s, "loss": 8.0 - s / 10} for s in range(0, 50, 10)]
    _synthetic(results, "precision", "NVIDIA H200", rows)
    md = bench.render_report(results, tmp_path / "RESULTS.md").read_text()
    assert "| run | fp32 |" in md and md.count("| run |") == 1  # the summary row only
    assert "5 curve points (kind `curve`) are in the JSON and the plot below." in md


def test_render_report_rejects_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="results_dir"):
        bench.render_report(tmp_path / "none", tmp_path / "R.md")


def test_format_value():
    f = report.format_value
    assert [f(None), f(True), f(12345), f(7), f(1234.5), f(123.45), f(1.2345), f(0.012345)] == \
        ["-", "yes", "12,345", "7", "1,234", "123.5", "1.23", "0.0123"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ceiling_and_timer_on_gpu():
    from slimlm.bench.ceiling import measured_ceilings

    c = measured_ceilings("cuda")
    assert 50 < c["matmul_tflops"] < 2000 and 100 < c["copy_gbps"] < 10000
    assert measured_ceilings(torch.device("cuda")) == c  # cached per process
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t = harness.time_cuda(lambda: x @ x, warmup=3, rep=10)
    assert t["n"] == 10 and 0 < t["p10"] <= t["median_ms"] <= t["p90"]
    # graph replays time the same kernel: a 4096^3 GEMM is device-bound, so both agree
    tg = harness.time_cuda(lambda: x @ x, warmup=3, rep=10, graph=True, flush_l2=True)
    assert tg["n"] == 10 and 0.5 < tg["median_ms"] / t["median_ms"] < 2.0
    tr = harness.time_cuda(lambda: x @ x, warmup=3, rep=10, graph=True, flush_l2="read")
    assert 0.5 < tr["median_ms"] / t["median_ms"] < 2.0
    # ... and a host-bound call of tiny kernels gets faster under a graph
    y = torch.randn(16, device="cuda")

    def many() -> None:
        for _ in range(50):
            y.add_(1.0)

    assert harness.time_cuda(many, graph=True)["median_ms"] < \
        harness.time_cuda(many)["median_ms"]
    peak = harness.peak_memory(lambda: torch.empty(2**28, dtype=torch.uint8, device="cuda"))
    assert peak >= 2**28


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_suite_small_on_gpu(tmp_path):
    path = bench.run_suite("train", out_dir=tmp_path, echo=False,
                           options={"models": ["llama-50m"], "seq_len": 512, "batch": 2,
                                    "steps": 10, "compile": [False, True],
                                    "sdpa_backends": ["cudnn", "flash"]})
    rows = json.loads(path.read_text())["rows"]
    assert [(r["impl"], r["sdpa_backend"]) for r in rows] == [
        ("hf-sdpa", "default"), ("slimlm-eager-mode", "default"),
        ("slimlm-compiled", "default"), ("slimlm-compiled", "cudnn"),
        ("slimlm-compiled", "flash")]
    for r in rows:
        if "skipped" in r:
            continue
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_gib"] > 0
        assert 8.0 < r["loss"] < 10.0  # ~ln(8192) = 9.0 on random tokens


def test_quant_quality_plot_and_reference_cache(tmp_path, monkeypatch):
    """The reference model is trained once and then loaded from the cache; the quality
    suite's plot draws from its rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimlm.bench import quant_quality, reference

    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path))
    torch.set_num_threads(1)
    rows = list(quant_quality.quant_quality_suite(True, torch.device("cpu"), steps=3,
                                                  bits=[4], methods=["rtn", "gptq"],
                                                  eval_batches=2, max_bytes=100_000))
    assert [r["method"] for r in rows] == ["none (fp32)", "rtn", "gptq"]
    assert all(r["bpb"] > 0 for r in rows) and rows[1]["size_mib"] < rows[0]["size_mib"]
    ckpt = next(tmp_path.glob("reference/tiny-3-*/run/checkpoint/model.safetensors"))
    mtime = ckpt.stat().st_mtime
    model, _ = reference.reference_model("tiny", steps=3, progress=False, max_bytes=100_000)
    assert ckpt.stat().st_mtime == mtime and not model.training
    # lm_head=True quantizes the head too, marked in the rows; tiny ties its head to the
    # embedding, which keeps its fp32 weight, so the int4 head adds bytes here
    head = list(quant_quality.quant_quality_suite(True, torch.device("cpu"), steps=3, bits=[4],
                                                  methods=["rtn"], eval_batches=2,
                                                  max_bytes=100_000, lm_head=True))
    assert head[1]["lm_head"] is True and rows[1]["lm_head"] is False
    assert head[1]["size_mib"] > rows[1]["size_mib"] and head[1]["bpb"] > 0
    with pytest.raises(ValueError, match="lm_head='yes'"):
        list(quant_quality.quant_quality_suite(True, torch.device("cpu"), lm_head="yes"))
    fig, ax = plt.subplots()
    assert quant_quality.plot(rows, ax)
    plt.close(fig)
    with pytest.raises(ValueError, match="preset='llama-8b'"):
        reference.reference_model("llama-8b")


def test_lora_quality_rejects_bad_learning_rates():
    from slimlm.bench.lora_quality import lora_quality_suite

    for bad in ([], [0.01, -1.0], "fast"):
        with pytest.raises(ValueError, match="lr_lora"):
            next(lora_quality_suite(True, torch.device("cpu"), lr_lora=bad))


def test_captured_step_rows_quick(tmp_path, one_thread):
    """precision step part under CapturedStep (eager on the CPU): rows say graph, fp16-mixed
    is skipped with the reason; lora -graph methods run and name their PEFT baseline."""
    path = bench.run_suite("precision", quick=True, out_dir=tmp_path, device="cpu", echo=False,
                           options={"parts": ["step"], "graph": True,
                                    "step_policies": ["bf16-mixed", "fp16-mixed"]})
    rows = json.loads(path.read_text())["rows"]
    assert [r["policy"] for r in rows] == ["bf16-mixed", "fp16-mixed"]
    assert rows[0]["graph"] is True and rows[0]["step_ms"] > 0
    assert "loss scale" in rows[1]["skipped"]
    with pytest.raises(ValueError, match="graph=True with compile=True"):
        bench.run_suite("precision", quick=True, out_dir=tmp_path, device="cpu", echo=False,
                        options={"parts": ["step"], "graph": True, "compile": True})
    pytest.importorskip("transformers")
    path = bench.run_suite("lora", quick=True, out_dir=tmp_path, device="cpu", echo=False,
                           options={"methods": ["slimlm-lora-graph"]})
    (row,) = json.loads(path.read_text())["rows"]
    assert row["baseline"] == "peft-lora-graph" and row["step_ms"] > 0 and row["loss_finite"]


def test_compile_option_takes_modes_and_labels_rows():
    assert harness.check_compile(True) is True and harness.check_compile(False) is False
    assert harness.check_compile("reduce-overhead") == "reduce-overhead"
    with pytest.raises(ValueError, match="compile='fast'"):
        harness.check_compile("fast")
    assert harness.uses_cudagraphs("reduce-overhead") and harness.uses_cudagraphs("max-autotune")
    assert not harness.uses_cudagraphs(True) and not harness.uses_cudagraphs(
        "max-autotune-no-cudagraphs")
    assert [harness.compile_label(c) for c in (False, True, "default", "reduce-overhead")] == [
        "", "-compiled", "-compiled", "-compiled-reduce-overhead"]


def test_time_steps_counts_memory_from_a_chosen_warmup_step():
    calls = []
    t = harness.time_steps(lambda: calls.append(1) or len(calls), torch.device("cpu"),
                           warmup=2, steps=3, mem_after=1)
    assert len(calls) == 5 and t["last"] == 5 and t["peak_bytes"] is None
    for bad in (3, True, -1):
        with pytest.raises(ValueError, match=f"time_steps: mem_after={bad!r}"):
            harness.time_steps(lambda: None, torch.device("cpu"), warmup=2, steps=1,
                               mem_after=bad)


def test_checkpointing_steps_offer_a_forward_for_the_saved_bytes():
    """The grid's steps carry ``forward_only`` (its result keeps the saved activations
    alive, which the GPU run measures as saved_act_gib)."""
    from slimlm.bench import checkpointing as bc
    from slimlm.model import ModelConfig

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64,
                      max_seq_len=16)
    x, y = bc._tokens(cfg, 2, 16, torch.device("cpu"), 0)
    step, keep = bc._slimlm_step(cfg, "bf16-mixed", "full", x, y, torch.device("cpu"), False,
                                 0, {})()
    loss = step.forward_only()
    assert loss.requires_grad and loss.dim() == 0
    out = bc._measure(lambda: (step, keep), torch.device("cpu"), warmup=1, steps=1)
    assert "saved_act_gib" not in out and out["step_ms"] > 0  # no allocator stats on a CPU


def test_checkpointing_plot_prefers_saved_bytes():
    """The planner curve's x axis: bytes kept for backward when every point has them, else
    the peak-based activation memory; rows of other parts draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimlm.bench.checkpointing import plot

    rows = [{"part": "planner", "policy": p, "time_vs_none": t, "act_mem_vs_none": a,
             "saved_act_vs_none": s, "model": "llama-1b", "seq_len": 4096, "impl": "slimlm"}
            for p, t, a, s in (("none", 1.0, 1.0, 1.0), ("full", 1.24, 0.6, 0.11),
                               ("budget:0.5", 1.06, 0.58, 0.49))]
    fig, ax = plt.subplots()
    try:
        assert not plot([{"part": "grid", "time_vs_none": 1.0, "act_mem_vs_none": 1.0}], ax)
        assert plot(rows, ax)
        assert list(ax.lines[0].get_xdata()) == [0.11, 0.49, 1.0]
        assert "kept for backward" in ax.get_xlabel()
        ax.clear()
        rows[1].pop("saved_act_vs_none")
        assert plot(rows, ax)
        assert list(ax.lines[0].get_xdata()) == [0.58, 0.6, 1.0]
    finally:
        plt.close(fig)


def test_probe_log_keeps_every_row_on_disk(tmp_path, capsys):
    """ProbeLog prints each row as a JSON line and rewrites the whole list after each, so a
    probe stopped at its time limit keeps what it measured; graph_us times on the CPU too."""
    import json

    from slimlm.bench.harness import ProbeLog, graph_us

    log = ProbeLog(tmp_path / "probe.json")
    log({"impl": "a", "us": 1.5})
    assert json.loads((tmp_path / "probe.json").read_text()) == [{"impl": "a", "us": 1.5}]
    log({"impl": "b", "us": torch.tensor(2.0)})  # tensors become numbers
    assert [r["impl"] for r in json.loads((tmp_path / "probe.json").read_text())] == ["a", "b"]
    assert [json.loads(line)["impl"] for line in capsys.readouterr().out.splitlines()] == ["a", "b"]
    assert graph_us(lambda: torch.ones(4).sum(), rep=2) > 0


def test_time_decode_steps_pairs_out_the_prefill(monkeypatch):
    """A fake generation on a fake clock: 1 ms per decode step after a prefill that drifts
    by up to 50 ms between pairs of calls (a slow host). Each pair's difference holds the
    steps alone, so the estimate is exact; bad n is refused before any call."""
    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    drift = [0.030, 0.080, 0.010, 0.055, 0.020]  # prefill seconds, one per pair of calls
    calls = []

    def run(k):
        pair = max(len(calls) - 2, 0) // 2  # the two untimed calls come first
        calls.append(k)
        clock[0] += drift[pair % len(drift)] + 0.001 * (k - 1)

    t = harness.time_decode_steps(run, 9, "cpu", rep=5)
    assert calls[:2] == [9, 1] and len(calls) == 2 + 2 * 5
    assert calls[2:6] == [9, 1, 1, 9]  # order alternates within pairs
    assert t["n"] == 5
    assert t["step_ms"] == pytest.approx(1.0) == t["step_p10"] == pytest.approx(t["step_p90"])
    assert t["full_ms"] == pytest.approx(30 + 8) and t["first_ms"] == pytest.approx(30)
    with pytest.raises(ValueError, match="n=1"):
        harness.time_decode_steps(run, 1, "cpu")
