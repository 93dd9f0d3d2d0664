"""The benchmark scripts run and print every figure they promise (their numbers are never asserted here)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_step_benchmark_prints_every_method_and_pgl_level():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/pretrain_step.py"), "--device", "cpu", "--steps", "1", "--batch", "2",
         "--patch", "16", "16", "16", "--channels", "4", "8", "16", "--feature-channels", "4"],
        capture_output=True, text=True, check=True, timeout=300).stdout
    flops_vs_byol = {m.group(1): float(m.group(2))
                     for m in re.finditer(r"^(\w+(?: \w+)?).*GFLOP/step +([\d.]+)x BYOL", out, re.M)}
    assert set(flops_vs_byol) == {"byol", "pgl output", "pgl decoder0", "hssl", "genesis", "mae"}
    assert flops_vs_byol["byol"] == 1.0
    assert 1.0 < flops_vs_byol["pgl decoder0"] < flops_vs_byol["pgl output"]  # decoder0 skips the full-res up layer
    assert "backbone alone up to output" in out and "pairs/s" in out
    assert re.search(r"PGL \(output\) / BYOL per step: time [\d.]+x, FLOPs [\d.]+x", out)
    assert re.search(r"MAE / PGL \(output\) per step: time [\d.]+x, FLOPs [\d.]+x", out)


def test_preprocess_speed_benchmark_prints_both_tables():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/preprocess_speed.py"), "--quick"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert re.search(r"^demo liver \(synthetic\) +2 +[\d.]+ +[\d.]+$", out, re.M), out
    row = re.search(r"^synthetic 96x96x12 @0.63x0.63x5 +((?:[\d.]+ +){5})([\d.]+)x$", out, re.M)
    assert row and len(row.group(1).split()) == 5, out


def test_pretrain_scaling_benchmark_prints_rates_and_efficiency_per_world_size():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/pretrain_scaling.py"), "--device", "cpu",
                          "--configfile", str(ROOT / "tests/configs/tiny.yaml"),
                          "--steps", "8", "--batch", "2", "--patch", "16", "16", "16", "--cases", "2", "--spacing",
                          "3", "3", "4"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rows = re.findall(r"^ +(\d) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"], out
    assert float(rows[0][3]) == 1.0 and all(float(r[2]) > 0 for r in rows), out
    assert "device cpu" in out


def test_gpu_check_quick_on_cpu_prints_every_method_variant_loader_and_dag(tmp_path):
    """The CI mode of benchmarks/gpu_check.py: every row it promises, the loader table and the DAG's dry run."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--device", "cpu", "--quick",
                          "--threads", "2", "--json", str(tmp_path / "check.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"measured float32 matmul peak: [\d.e+-]+ TFLOP/s", out), out
    rows = re.findall(r"^(\w+) +(eager|eager_fp16|channels_last_3d|compile|compile_fp16|nnunet) +(fp32|fp16) +"
                      r"([\d.]+) +([\d.]+) +nan +([\d.]+) +([\d.]+)%(?:  \(first step, compiling: [\d.]+ s\))?$", out, re.M)
    methods = ("pgl", "byol", "hssl", "genesis", "mae", "supervised", "finetune")
    assert {(r[0], r[1], r[2]) for r in rows} == {(m, v, "fp32") for m in methods for v in ("eager", "channels_last_3d")} | {
        ("finetune", "compile", "fp32"), ("finetune", "eager_fp16", "fp16"), ("finetune", "compile_fp16", "fp16"),
        ("pgl", "compile", "fp32"), ("hssl", "compile", "fp32"), ("nnunet", "nnunet", "fp32")}, out  # nnU-Net's trainer: float32 and not compiled on a CPU, as nnU-Net decides
    assert len(re.findall(r"^\w+ +compile(?:_fp16)? +skipped \(not in --compile-methods\)$", out, re.M)) == 8, out
    assert len(re.findall(r"^\w+ +(?:eager|compile)_fp16 +skipped \(not in --fp16-methods\)$", out, re.M)) == 8, out
    compiled = re.findall(r"^(\w+) +compile +fp32 .*\(first step, compiling: ([\d.]+) s\)$", out, re.M)
    assert {m for m, _ in compiled} == {"finetune", "pgl", "hssl"}, out
    assert all(float(r[3]) > 0 and float(r[5]) > 0 for r in rows)
    # the anchor: every fine-tuning variant as a ratio to nnU-Net's own trainer step
    assert re.search(r"^fine-tuning step / nnU-Net's trainer step \(fp32, [\d.]+ ms;", out, re.M), out
    ratios = dict(re.findall(r"^  (eager|eager_fp16|channels_last_3d|compile|compile_fp16) +fp\d\d +([\d.]+)x", out, re.M))
    assert set(ratios) == {"eager", "eager_fp16", "channels_last_3d", "compile", "compile_fp16"} and all(
        float(v) > 0 for v in ratios.values()), out
    assert set(re.findall(r"^  (\w+) +[+-][\d.]+ % \([\d.]+ vs [\d.]+ ms/step\)$", out, re.M)) == set(methods), out
    e2e = re.findall(r"^  ([\w@]+) +([\d.]+) samples/s +[\d.]+ ms/step +loader wait +([\d.]+) %$", out, re.M)
    runs = set(methods) - {"finetune"} | {"pgl@device", "byol@device", "hssl@device"}  # both view paths
    assert {m for m, _, _ in e2e} == runs and all(float(r) > 0 for _, r, _ in e2e), out
    assert re.search(r"^views.augment_on: device .* a batch in [\d.]+ ms", out, re.M), out
    assert re.search(r"^ +2 workers: +[\d.]+ pairs/s \( *[\d.]+x the step\) \(device path\)$", out, re.M), out
    assert re.search(r"^ +1 workers: +[\d.]+ pairs/s", out, re.M) and re.search(r"^ +2 workers:", out, re.M)
    assert "the configured pretrain.num_workers is 8" in out
    assert re.search(r"tiny DAG on cpu .*dry run: OK in \d+ s, \d+ jobs", out), out
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["dag"]["ok"] and report["dag"]["jobs"] > 10 and len(report["rows"]) == 7 * 5 + 1
    assert set(report["nnunet_ratio"]) == {"eager (fp32)", "eager_fp16 (fp16)", "channels_last_3d (fp32)",
                                           "compile (fp32)", "compile_fp16 (fp16)"}
    assert set(report["end_to_end"]) == runs and set(report["readback"]) == set(methods)
    assert all(0 <= r["loader_wait_fraction"] < 1 for r in report["end_to_end"].values())


def test_gpu_check_stops_a_slow_dag_and_keeps_the_figures_it_measured(tmp_path):
    """A DAG that outruns --dag-timeout is stopped and reported (exit 1), and the JSON still holds every row, the
    loader rates and the stopped DAG: a GPU lease that ends early keeps what was measured."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--device", "cpu", "--quick",
                          "--threads", "2", "--methods", "finetune", "--variants", "eager", "--workers", "1",
                          "--e2e-methods", "--dag", "run", "--dag-timeout", "2", "--json", str(tmp_path / "check.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"tiny DAG on cpu \(.*\), run: TIMED OUT in \d+ s", run.stdout), run.stdout
    report = json.loads((tmp_path / "check.json").read_text())
    assert [(r["method"], r["variant"]) for r in report["rows"]] == [("finetune", "eager")]
    assert list(report["loader"]["rates"]) == ["1"] and math.isnan(report["loader"]["step_consumes"])
    assert report["dag"]["timed_out"] and not report["dag"]["ok"] and "stopped after --dag-timeout 2 s" in report["dag"]["tail"]
    assert "no PGL step (not measured)" in run.stdout


def test_pool_scale_benchmark_prints_time_disk_and_memory():
    """benchmarks/pool_scale.py at a tiny size: the pool's generation time, disk footprint, per-rule times and the
    pretraining job's peak RSS (the 2,000-volume figures are in docs/benchmarks.md)."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/pool_scale.py"), "--cases", "6", "--shards", "2",
                          "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"pool of 6 volumes generated \+ preprocessed in [\d.]+ min .*preprocessed [\d.]+ GB", out), out
    assert re.search(r"^  synthesize: 3 jobs", out, re.M) and re.search(r"^  preprocess: 2 jobs", out, re.M), out
    assert re.search(r"pretraining pgl on the pool, 2 steps: \d+ s wall, peak RSS \d+ MB", out), out


def test_checkpoint_cost_benchmark_prints_size_time_and_overhead():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/checkpoint_cost.py"), "--configfile",
                          str(ROOT / "tests/configs/tiny.yaml"), "--repeats", "1"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert re.search(r"tiny.yaml: [\d.]+ M parameters, checkpoint \d+ MB, write [\d.]+ s", out), out
    assert re.search(r"checkpoint_minutes 10: overhead [\d.]+ % of a cell's time", out), out
