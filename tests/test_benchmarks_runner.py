"""The benchmark runner (``python -m benchmarks``): a tiny run writes a valid JSON, CSV and
PNG; limits (time budget, memory cap, largest-batch search) stop where they say; the timing
and memory helpers measure what they claim; bad arguments fail naming the argument."""

import copy
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import cli, results, timing
from benchmarks import ops as ops_registry

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--ops", "supcon", "--dim", "8", "--warmup-ms", "1", "--rep-ms", "5", "--min-reps", "2",
        "--no-progress"]


def run_cli(*args) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One small run of eager and torch.compile: the JSON document and the output path.

    The compiled baseline goes through AOTAutograd (whose compiled backward refuses
    ``retain_graph``) with the ``aot_eager`` backend: the same graphs as inductor without its
    minute of C++ code generation on a cold cache.
    """
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    assert run_cli("--sizes", 32, 64, "--candidates", "eager", "compile", "--fit-max-n", 256,
                   "--fit-max-call-s", 30, "--compile-backend", "aot_eager", "--out", out,
                   *FAST) == 0
    return json.loads(out.read_text()), out


def test_tiny_run_writes_valid_json_csv_and_png(tiny):
    doc, out = tiny
    results.validate(doc)
    meta = doc["meta"]
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__ and meta["date"]
    assert doc["config"]["float32_matmul_precision"] == "highest"  # torch's default
    assert meta["command"].startswith("python -m benchmarks --sizes 32 64 --candidates eager")
    rows = {(r["candidate"], r["pass"], r["n"]): r for r in doc["results"]}
    for cand in ("eager", "compile"):
        for pass_ in ("fwd", "bwd", "fwd+bwd"):
            for n in (32, 64):
                r = rows[(cand, pass_, n)]
                assert r["status"] == "ok", r
                assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"]
                assert r["reps"] >= 2 and r["peak_mem_bytes"] > 0
                flops = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[pass_] * n * n * 8
                assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12)
    # Only the chosen candidates ran; the unchosen backends are absent, not faked.
    assert {r["candidate"] for r in doc["results"]} == {"eager", "compile"}
    fits = {f["candidate"]: f for f in doc["largest_fit"]}
    assert fits["eager"]["largest_n"] == 256 and fits["eager"]["stopped"] == "max-n"
    assert [p["n"] for p in fits["eager"]["probes"]] == [32, 64, 128, 256]

    with open(out.with_suffix(".csv")) as fh:
        lines = list(csv.DictReader(fh))
    assert set(lines[0]) == set(results.CSV_COLUMNS)
    times = [x for x in lines if x["metric"] == "time"]
    assert len(times) == 2 * 3 * 2
    assert {x["metric"] for x in lines} == {"time", "throughput", "peak_memory", "largest_n"}

    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("op", sorted(ops_registry.OPS))
def test_every_registered_op_runs_its_eager_baseline(op, tmp_path):
    out = tmp_path / f"{op}.json"
    assert run_cli("--ops", op, "--sizes", 8, 16, "--dim", 8, "--candidates", "eager",
                   "--no-fit", "--no-plot", "--warmup-ms", 1, "--rep-ms", 5, "--min-reps", 2,
                   "--no-progress", "--out", out) == 0
    doc = json.loads(out.read_text())
    results.validate(doc)
    assert {r["op"] for r in doc["results"]} == {op}
    assert doc["results"] and all(r["status"] == "ok" for r in doc["results"])
    assert all((r["tflops"] or 0) > 0 or (r["gbps"] or 0) > 0 for r in doc["results"])


def test_float32_matmul_precision_is_set_for_the_run_and_recorded(tmp_path, matmul_precision):
    """--float32-matmul-precision high: every candidate's float32 products may run in TF32 (on
    a GPU), and the JSON says so."""
    out = tmp_path / "tf32.json"
    assert run_cli("--sizes", 32, "--candidates", "eager", "--passes", "fwd", "--no-fit", "--no-plot",
                   "--float32-matmul-precision", "high", "--out", out, *FAST) == 0
    assert torch.get_float32_matmul_precision() == "high"  # (the fixture restores it)
    doc = json.loads(out.read_text())
    results.validate(doc)
    assert doc["config"]["float32_matmul_precision"] == "high"


def test_supcon_two_sets_time_m_anchors_against_n_rows(tmp_path):
    """--set supcon.anchors=0.25: the first N/4 rows against all N (two sets, the distributed
    loss's shape per process), counted as 6 M N D flops, on the C++ backend and the eager
    and compiled references."""
    out = tmp_path / "two.json"
    assert run_cli("--sizes", 32, 64, "--candidates", "cpu", "eager", "--set", "supcon.anchors=0.25",
                   "--no-fit", "--no-plot", "--out", out, *FAST) == 0
    doc = json.loads(out.read_text())
    results.validate(doc)
    ran = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["candidate"] for r in ran} >= {"eager"}
    for r in ran:
        assert r["m"] == r["n"] // 4
        flops = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[r["pass"]] * r["m"] * r["n"] * 8
        assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12)


def test_an_op_with_no_backward_is_timed_forward_only_in_gb_per_s(tmp_path):
    out = tmp_path / "pgd.json"
    assert run_cli("--ops", "pgd", "--sizes", 8, 16, "--candidates", "eager", "--warmup-ms", 1,
                   "--rep-ms", 5, "--min-reps", 2, "--no-progress", "--out", out) == 0
    doc = json.loads(out.read_text())
    results.validate(doc)
    assert {(r["pass"], r["status"]) for r in doc["results"]} == {("fwd", "ok")}
    for r in doc["results"]:
        moved = 4 * r["n"] * 3 * 32 * 32 * 4  # read x_adv, grad, x; write x_adv (float32)
        assert r["gbps"] == pytest.approx(moved / (r["ms"] * 1e-3) / 1e9) and r["tflops"] is None
    assert doc["largest_fit"] == []  # nothing to search: its memory is its inputs


def test_eager_memory_is_at_least_its_n_by_n_logits(tiny):
    doc, _ = tiny
    for r in doc["results"]:
        if r["candidate"] == "eager" and r["pass"] == "fwd":
            assert r["peak_mem_bytes"] >= r["n"] * r["n"] * 4  # one float32 N x N matrix


def test_unavailable_backends_are_recorded_with_their_reason(tmp_path):
    # --out a folder: the default name, with the device in it, inside that folder.
    assert run_cli("--sizes", 16, "--candidates", "eager", "triton", "cpu", "--no-fit",
                   "--no-plot", "--out", f"{tmp_path}/", *FAST) == 0
    (out,) = tmp_path.glob("supcon-run-*.json")
    assert results.slug(results.device_name(torch.device("cpu"))) in out.name
    doc = json.loads(out.read_text())
    results.validate(doc)
    by = {r["candidate"]: r for r in doc["results"] if r["pass"] == "fwd"}
    assert by["eager"]["status"] == "ok"
    assert by["triton"]["status"] == "unsupported" and "interpreter" in by["triton"]["reason"]
    if by["cpu"]["status"] == "unsupported":
        assert by["cpu"]["reason"]


def test_the_triton_interpreter_is_timed_only_when_asked_and_labelled(tmp_path):
    out = tmp_path / "r.json"
    assert run_cli("--sizes", 16, "--include-interpreter", "--candidates", "triton[interpreter]",
                   "--passes", "fwd", "--no-fit", "--no-plot", "--out", out, *FAST) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert (row["candidate"], row["kind"], row["status"]) == ("triton[interpreter]",
                                                              "interpreter", "ok")


def test_time_budget_skips_the_rest_and_still_writes(tmp_path):
    out = tmp_path / "r.json"
    assert run_cli("--sizes", 16, 32, "--candidates", "eager", "--time-budget", 1e-9,
                   "--fit-budget", 1e-9, "--no-plot", "--out", out, *FAST) == 0
    doc = json.loads(out.read_text())
    results.validate(doc)
    assert doc["results"] and all(r["status"] == "skipped" and "--time-budget" in r["reason"]
                                  for r in doc["results"])
    assert "--fit-budget" in doc["largest_fit"][0]["detail"]
    assert [f["stopped"] for f in doc["largest_fit"]] == ["budget"]


def test_memory_cap_stops_eager_before_running_over_it(tmp_path):
    out = tmp_path / "r.json"
    # 64 KiB: n=16 needs a few KiB, n=256's N x N logits alone 256 KiB.
    assert run_cli("--sizes", 16, 256, "--candidates", "eager", "--mem-cap-gb", 2**-14,
                   "--no-plot", "--out", out, *FAST) == 0
    doc = json.loads(out.read_text())
    status = {(r["n"], r["pass"]): r for r in doc["results"]}
    assert status[(16, "fwd+bwd")]["status"] == "ok"
    assert status[(256, "fwd+bwd")]["status"] == "skipped"
    assert "--mem-cap-gb" in status[(256, "fwd+bwd")]["reason"]
    fit = doc["largest_fit"][0]
    assert fit["stopped"] == "mem-cap" and fit["largest_n"] is not None
    assert fit["peak_mem_bytes"] <= 2**16


def test_validate_names_what_is_wrong(tiny):
    doc, _ = tiny
    broken = copy.deepcopy(doc)
    del broken["meta"]["device_name"]
    with pytest.raises(ValueError, match="device_name"):
        results.validate(broken)
    broken = copy.deepcopy(doc)
    broken["results"][0]["status"] = "fast"
    with pytest.raises(ValueError, match="status"):
        results.validate(broken)
    broken = copy.deepcopy(doc)
    broken["results"][0]["ms_p20"] = broken["results"][0]["ms"] * 2
    with pytest.raises(ValueError, match="quantiles"):
        results.validate(broken)


def test_replot_and_table(tiny, tmp_path, capsys):
    doc, out = tiny
    copied = tmp_path / "copy.json"
    copied.write_text(json.dumps(doc))
    assert run_cli("--replot", copied) == 0
    assert copied.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "fwd+bwd ms" in text and "compile" in text and "largest batch" in text


def test_cpu_peak_memory_counts_allocations():
    peak, _ = timing.peak_memory(lambda: torch.empty(1 << 20), torch.device("cpu"))
    assert 4 * 2**20 <= peak < 4 * 2**20 + 2**16
    x = torch.randn(256, 256)
    peak, _ = timing.peak_memory(lambda: (x @ x).exp().sum(), torch.device("cpu"))
    assert 2 * 256 * 256 * 4 <= peak  # the product and its exp are alive together


def test_cpu_timer_leaves_the_setup_out():
    t = timing.bench(lambda state: time.sleep(0.002), torch.device("cpu"), warmup_ms=1,
                     rep_ms=10, min_reps=3, setup=lambda: time.sleep(0.05))
    assert 2.0 <= t.p20 <= t.ms <= t.p80 and t.ms < 40.0


def test_candidates_are_timed_interleaved_and_one_failure_stops_only_itself():
    calls = []

    def contender(name, fail_after=None):
        def run():
            calls.append(name)
            if fail_after is not None and calls.count(name) > fail_after:
                raise RuntimeError(f"{name} broke")
        return timing.Contender(run)

    out = timing.bench_interleaved(
        {"a": contender("a"), "b": contender("b"), "c": contender("c", fail_after=10)},
        torch.device("cpu"), warmup_ms=0.0, rep_ms=0.0, min_reps=20, rounds=5)
    assert isinstance(out["a"], timing.Timing) and out["a"].reps == 20 and out["b"].reps == 20
    assert isinstance(out["c"], RuntimeError)
    # After each one's estimate and warm-up (4 calls), rounds of 4 timed calls each in turn.
    timed = [name for name in calls[12:] if name != "c"]
    assert timed[:8] == ["a"] * 4 + ["b"] * 4 and timed[8:16] == ["a"] * 4 + ["b"] * 4


def test_growth_extrapolation():
    assert timing.grow([(100, 1.0), (200, 4.0)], 400) == pytest.approx(16.0)  # quadratic
    assert timing.grow([(100, 1.0), (200, 2.0)], 400) == pytest.approx(4.0)  # linear
    assert timing.grow([(100, 1.0)], 200) == pytest.approx(4.0)  # assume quadratic
    assert timing.grow([], 200) is None


@pytest.mark.parametrize("args, name", [
    (["--sizes", "0"], "--sizes"),
    (["--sizes", "many"], "--sizes"),
    (["--dtypes", "fp8"], "--dtypes"),
    (["--ops", "nope"], "--ops"),
    (["--passes", "sideways"], "--passes"),
    (["--candidates", "nope"], "--candidates"),
    (["--set", "supcon.nope=1"], "--set"),
    (["--set", "supcon.beta=abc"], "--set"),
    (["--set", "beta"], "--set"),
    (["--out", "results.txt"], "--out"),
    (["--rep-ms", "-5"], "--rep-ms"),
    (["--quick", "--gpu-sweep"], "--gpu-sweep"),
])
def test_bad_arguments_name_the_argument(args, name, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(args + ["--no-progress"])
    assert err.value.code == 2
    assert name in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine with no GPU")
@pytest.mark.parametrize("args, name", [(["--device", "cuda"], "--device"),
                                        (["--gpu-sweep"], "--gpu-sweep")])
def test_cuda_without_a_gpu_is_a_clear_error(args, name, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(args)
    assert err.value.code == 2
    err_text = capsys.readouterr().err
    assert name in err_text and "no CUDA device" in err_text


def test_module_entry_point_reports_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--sizes", "-3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "argument --sizes: must be a positive int, got '-3'" in proc.stderr


def _fake_op():
    """An op whose candidates fail on purpose: out of memory from n = 64, or always broken."""
    from types import SimpleNamespace

    from benchmarks.records import Candidate, Problem, Work

    def make_problem(n, dtype, device, options):
        x = torch.randn(n, 4, dtype=dtype, requires_grad=True)
        return Problem("fake", n, n, 4, dtype, device, {"x": x}, (x,))

    def build(limit):
        def b(p):
            def forward():
                if p.n >= limit:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
                return (p.inputs["x"] ** 2).sum()
            return forward, p.grad_inputs
        return b

    def broken(p):
        def forward():
            raise ValueError("kernel exploded")
        return forward, p.grad_inputs

    cands = [Candidate("fits", "backend", build(10**9)), Candidate("oom64", "backend", build(64)),
             Candidate("broken", "backend", broken)]
    return SimpleNamespace(NAME="fake", SIZE_LABEL="n", OPTIONS={}, make_problem=make_problem,
                           work=lambda p, pass_: Work(flops=float(p.n)),
                           candidates=lambda *a: cands), cands


def test_out_of_memory_and_errors_are_recorded_and_bounded():
    from benchmarks import runner

    op, cands = _fake_op()
    cfg = runner.RunConfig(ops=((op, {}, (16, 32, 64, 128)),), device=torch.device("cpu"),
                           dtypes=(torch.float32,), warmup_ms=1, rep_ms=2, min_reps=2,
                           fit_max_n=1024)
    sweep = runner.Sweep(cfg)
    sweep.run_sweep({"fake": cands})
    sweep.run_fit({"fake": cands})
    status = {(r.candidate, r.n): (r.status, r.reason) for r in sweep.rows if r.pass_ == "bwd"}
    assert [status[("oom64", n)][0] for n in (16, 32, 64, 128)] == ["ok", "ok", "oom", "skipped"]
    assert "out of memory at n=64" in status[("oom64", 128)][1]
    assert all(status[("fits", n)][0] == "ok" for n in (16, 32, 64, 128))
    # A broken candidate is tried at every size (an error is not a size limit) and says why.
    assert all(status[("broken", n)] == ("error", "ValueError: kernel exploded")
               for n in (16, 32, 64, 128))
    fits = {f.candidate: f for f in sweep.fits}
    assert (fits["oom64"].largest_n, fits["oom64"].stopped) == (32, "oom")
    assert (fits["fits"].largest_n, fits["fits"].stopped) == (1024, "max-n")
    assert (fits["broken"].largest_n, fits["broken"].stopped) == (None, "error")


@pytest.mark.gpu
def test_gpu_run_times_fused_eager_and_flash_attention(tmp_path):
    """Tier 2: the CUDA paths (do_bench, the CUDA-event timer of the backward, CUDA memory)."""
    out = tmp_path / "gpu.json"
    assert run_cli("--device", "cuda", "--ops", "supcon", "--sizes", 1024, 2048, "--dim", 128,
                   "--dtypes", "bf16", "fp32", "--candidates", "triton", "eager", "sdpa-flash",
                   "--fit-max-n", 8192, "--warmup-ms", 5, "--rep-ms", 20, "--no-progress",
                   "--out", out) == 0
    doc = json.loads(out.read_text())
    results.validate(doc)
    assert doc["meta"]["device"] == "cuda" and doc["meta"]["cuda"]
    rows = {(r["candidate"], r["dtype"], r["pass"], r["n"]): r for r in doc["results"]}
    for dtype in ("bfloat16", "float32"):
        for pass_ in ("fwd", "bwd", "fwd+bwd"):
            for n in (1024, 2048):
                for cand in ("triton", "eager"):
                    assert rows[(cand, dtype, pass_, n)]["status"] == "ok", rows[(cand, dtype, pass_, n)]
        fused = rows[("triton", dtype, "fwd+bwd", 2048)]["peak_mem_bytes"]
        eager = rows[("eager", dtype, "fwd+bwd", 2048)]["peak_mem_bytes"]
        assert fused < eager  # O(N) against the eager N x N temporaries
    assert rows[("sdpa-flash", "bfloat16", "fwd+bwd", 2048)]["status"] == "ok"
    flash_fp32 = rows[("sdpa-flash", "float32", "fwd", 1024)]
    assert flash_fp32["status"] == "unsupported" and "bfloat16" in flash_fp32["reason"]
    for fit in doc["largest_fit"]:
        assert fit["stopped"] == "max-n" and fit["largest_n"] == 8192, fit


def test_sigterm_keeps_what_was_measured(tmp_path):
    out = tmp_path / "stopped.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "--ops", "supcon", "--sizes", "32", "64", "128", "256",
         "--candidates", "eager", "--dim", "8", "--rep-ms", "1000", "--no-fit", "--no-plot",
         "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        seen = ""
        while "benchmarks:" not in seen and time.monotonic() < deadline:  # the bar has started
            seen += proc.stderr.read(1)
        time.sleep(4)
        proc.terminate()
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout
    doc = json.loads(out.read_text())
    results.validate(doc)
    assert doc["meta"]["interrupted"] is True
    assert len(doc["results"]) < 4 * 3  # stopped before the end, what was measured is kept
    assert "interrupted" in stdout


def test_host_cost_benchmarks_run_and_write_their_json(tmp_path):
    """The two host-cost scripts (the loss with its launches stubbed; each way of wrapping a
    kernel pair), a few rounds each."""
    from benchmarks import bench_dispatch, bench_host_cost

    for module, extra in ((bench_dispatch, []), (bench_host_cost, ["--betas", "0"])):
        out = tmp_path / f"{module.__name__.rsplit('.', 1)[1]}.json"
        assert module.main(["--n", "16", "--d", "8", "--rounds", "10", "--warmup", "1",
                            "--out", str(out), *extra]) == 0
        doc = json.loads(out.read_text())
        assert doc["meta"]["rounds"] == 10
        timings = list(doc["results"].values())
        if module is bench_host_cost:
            assert {"triton (launches stubbed)", "autograd floor", "cpu, N=16"} <= timings[0].keys()
            timings = list(timings[0].values())
        assert timings and all(0 < t["p20_us"] <= t["median_us"] <= t["p80_us"] for t in timings)


def test_pgd_host_benchmark_runs_and_writes_its_json(tmp_path):
    from benchmarks import bench_pgd_host

    out = tmp_path / "pgd_host.json"
    assert bench_pgd_host.main(["--batch", "2", "--rounds", "10", "--warmup", "1",
                                "--out", str(out)]) == 0
    timings = json.loads(out.read_text())["results"]
    assert len(timings) == 3 and all(0 < t["p20_us"] <= t["median_us"] <= t["p80_us"]
                                     for t in timings.values())


def test_similarity_host_benchmark_runs_and_restores_the_kernels(tmp_path):
    from anchor_kernels.ops import rows_triton, similarity_triton
    from benchmarks import bench_similarity_host

    kernels = (rows_triton._row_pass_kernel, similarity_triton._similarity_fwd_kernel)
    out = tmp_path / "similarity_host.json"
    assert bench_similarity_host.main(["--n", "8", "--d", "8", "--rounds", "10", "--warmup", "1",
                                       "--out", str(out)]) == 0
    timings = json.loads(out.read_text())["results"]
    assert {"similarity fwd+bwd (launches stubbed)", "selection (launches stubbed)",
            "autograd floor", "eager selection"} <= timings.keys()
    assert all(0 < t["p20_us"] <= t["median_us"] <= t["p80_us"] for t in timings.values())
    assert (rows_triton._row_pass_kernel, similarity_triton._similarity_fwd_kernel) == kernels


def test_launch_benchmark_runs_without_a_gpu(tmp_path):
    """bench_launch times the GPU launch path with Triton's launch stubbed: it needs the real
    JIT kernels (no TRITON_INTERPRET), not a GPU."""
    import os
    import subprocess
    import sys

    out = tmp_path / "launch.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/bench_launch.py", "--rounds", "10",
                           "--warmup", "1", "--out", str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    for kernel in ("fwd", "bwd"):
        assert set(doc["results"][kernel]) == {"autotuner", "plan's direct call"}
