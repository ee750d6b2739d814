"""vpfast.bench's device helpers (timer, peak memory, providers) and the benchmarks' --device/--dtype options.

What needs a GPU (CUDA-event timing, torch.cuda peak memory, a suite run with --device cuda) runs where there
is one; without one, the CPU fallbacks and the refusal of --device cuda are checked.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import vpfast
from vpfast import bench
from vpfast.ops.ddr_loss import OP as DDR

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_timer_falls_back_to_cpu_clock():
    assert bench.timer_for("cpu") is time.perf_counter
    bench.synchronize("cpu")  # nothing to wait for
    times = bench.measure(lambda: time.sleep(0.002), "cpu", warmup=1, reps=3)
    assert len(times) == 3 and all(0.0019 < t < 0.05 for t in times)
    # min_time repeats a short call inside one timing: the result stays per call
    times = bench.measure(lambda: time.sleep(0.001), "cpu", warmup=0, reps=2, min_time=0.01)
    assert all(0.0009 < t < 0.01 for t in times)
    with pytest.raises(ValueError, match="reps must be >= 1"):
        bench.measure(lambda: None, "cpu", reps=0)


def test_peak_memory_cpu():
    peak = bench.peak_extra_mb(lambda: torch.empty(4 << 20, dtype=torch.uint8).fill_(1), "cpu")
    assert 3.9 < peak < 8.5


@needs_gpu
def test_cuda_event_timer_and_peak_memory():
    clock = bench.timer_for("cuda")
    assert clock is bench.cuda_event_timer
    a = clock()
    torch.cuda._sleep(5_000_000)  # GPU cycles: about a few ms, queued without blocking the CPU
    b = clock()
    assert b - a > 1e-4 and clock() >= b  # the clock waited for the queued work
    x = torch.ones(1 << 20, device="cuda")
    peak = bench.peak_extra_mb(lambda: x * 2 + 1, "cuda")
    assert 3.9 < peak < 12.5
    times = bench.measure(lambda: x.mul_(1.0), "cuda", warmup=1, reps=3)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_device_and_dtype_parsing():
    assert bench.parse_dtype("bf16") is torch.bfloat16 and bench.parse_dtype("float32") is torch.float32
    assert bench.parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        bench.parse_dtype("int8")
    assert bench.device_error("cpu") is None
    assert "device must be one of" in bench.device_error("tpu")
    if torch.cuda.is_available():
        assert bench.device_error("cuda") is None and bench.device_name("cuda") == torch.cuda.get_device_name()
    else:
        assert "no CUDA device" in bench.device_error("cuda")
    assert "thread" in bench.device_name("cpu")


def test_providers_and_their_devices():
    ids = [p.id for p in bench.providers(DDR, sep=True)]
    assert ids == ["eager", "compile", "cpp", "cpp_sep", "cuda", "cuda_sep", "triton", "triton_sep"]
    assert [bench.backend_of(i) for i in ids] == ["torch", "torch", "cpp", "cpp", "cuda", "cuda", "triton", "triton"]
    assert [bench.provider_device(i) for i in ("eager", "cpp_sep", "cuda", "triton", "torchvision")] == \
        [None, "cpu", "cuda", "cuda", None]
    params = {p.id: p for p in bench.providers(DDR)}
    for b in ("cpp", "cuda", "triton"):
        assert bool(params[b].marks) == bool(DDR.static_reasons(b))


def test_grad_step_on_the_outputs_device_and_dtype():
    x = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    (gx,) = bench.grad_step(lambda a: (a * 2, a.sum()), (x,))()
    assert gx.dtype == torch.float64 and gx.shape == x.shape


def test_run_refuses_missing_device_and_bad_dtype(capsys):
    if not torch.cuda.is_available():
        assert bench.run(["ddr_loss"], device="cuda") == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert bench.run(["ddr_loss"], dtype="int8") == 2
    assert "--dtype" in capsys.readouterr().err


def test_table_header_and_compile_ratio():
    rows = [
        {"group": "g", "name": "a", "stats": {"median": 2.0}, "extra_info": {"provider": "eager"}},
        {"group": "g", "name": "b", "stats": {"median": 1.0}, "extra_info": {"provider": "compile"}},
        {"group": "g", "name": "c", "stats": {"median": 0.5}, "extra_info": {"provider": "cuda", "gbytes": 1.0}},
    ]
    machine = {"vpfast": {"device": "cuda", "device_name": "Some GPU", "dtype": "bfloat16", "torch": "x",
                          "triton": "y"}}
    text = bench.table(rows, machine)
    assert text.splitlines()[0].startswith("device: Some GPU (cuda), dtype bfloat16")
    cuda = next(line for line in text.splitlines() if line.strip().startswith("cuda"))
    assert "4.00x" in cuda and "2.00x" in cuda and "2.0" in cuda
    assert "vs compile" in text and not bench.table(rows).startswith("device")


def _fake_suite(tmp_path):
    shutil.copy(os.path.join(bench.suites_dir(), "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_bench_fake.py").write_text(
        "import os\nimport pytest\nimport torch\n\n"
        "@pytest.mark.parametrize('provider', ['eager', 'cpp', 'cuda', 'triton_sep'])\n"
        "def test_fake(record, benchmark, provider):\n"
        "    benchmark.group = 'fake'\n"
        "    x = record.to(torch.ones(4, 4), grad=True)\n"
        "    assert x.is_leaf and x.requires_grad and x.device.type == record.device\n"
        "    assert x.dtype == getattr(torch, os.environ['EXPECT_DTYPE'])\n"
        "    assert record.to(torch.ones(2, dtype=torch.int64)).dtype == torch.int64\n"
        "    with record.autocast():\n"
        "        assert torch.is_autocast_enabled(record.device) == (record.dtype == torch.bfloat16)\n"
        "    record(provider, lambda: x * 2, gbytes=1e-6)\n")
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={tmp_path}",
            str(tmp_path / "test_bench_fake.py"), "--benchmark-min-rounds=2", "--benchmark-max-time=0.01",
            "--paired-rounds=1"]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(vpfast.__file__)))
    return base, env


def test_suite_device_and_dtype_options(tmp_path):
    """--device keeps the providers of that device (cpp on the CPU, cuda/triton on a GPU) and builds inputs
    there; --dtype casts them; the JSON names the device; --device cuda without a GPU is a usage error."""
    base, env = _fake_suite(tmp_path)
    out = tmp_path / "b.json"
    res = subprocess.run(base + [f"--benchmark-json={out}", "--dtype=bfloat16"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=dict(env, EXPECT_DTYPE="bfloat16"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed, 2 deselected" in res.stdout
    data = json.loads(out.read_text())
    assert sorted(r["extra_info"]["provider"] for r in data["benchmarks"]) == ["cpp", "eager"]
    assert not any(r["options"]["timer"].endswith("cuda_event_timer") for r in data["benchmarks"])
    assert all(r["extra_info"]["dtype"] == "bfloat16" and r["extra_info"]["device"] == "cpu"
               for r in data["benchmarks"])
    assert data["machine_info"]["vpfast"]["device"] == "cpu"
    assert bench.table(data["benchmarks"], data["machine_info"]).startswith("device: ")
    if torch.cuda.is_available():
        res = subprocess.run(base + [f"--benchmark-json={out}", "--device=cuda"], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path, env=dict(env, EXPECT_DTYPE="float32"))
        assert res.returncode == 0, res.stdout + res.stderr
        data = json.loads(out.read_text())
        assert sorted(r["extra_info"]["provider"] for r in data["benchmarks"]) == ["cuda", "eager", "triton_sep"]
        assert data["machine_info"]["vpfast"]["device_name"] == torch.cuda.get_device_name()
        assert all(r["options"]["timer"].endswith("cuda_event_timer") for r in data["benchmarks"])
        assert all(float(r["options"]["min_time"]) >= 0.005 for r in data["benchmarks"])
    else:
        res = subprocess.run(base + ["--device=cuda"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env=dict(env, EXPECT_DTYPE="float32"))
        assert res.returncode == 4 and "no CUDA device" in res.stderr


def _bench_rows(cpp_median, cpp_paired):
    info = {"paired_rounds": 3}
    return [
        {"group": "g", "name": "a", "stats": {"median": 2.0}, "extra_info": {"provider": "eager", **info}},
        {"group": "g", "name": "b", "stats": {"median": cpp_median},
         "extra_info": {"provider": "cpp", "paired_vs_eager": cpp_paired, **info}},
    ]


def test_table_flags_plain_and_paired_ratios_that_disagree():
    # the report of issue 20: "0.92x" vs eager next to "paired 11.89x" in one row, without a word
    text = bench.table(_bench_rows(2.0 / 0.92, 11.89))
    cpp = next(line for line in text.splitlines() if line.strip().startswith("cpp"))
    assert "0.92x" in cpp and "11.89x!" in cpp
    assert text.splitlines()[-1].startswith("! the plain ratio") and "--paired-rounds" in text
    # consistent ratios (within 1.5x of each other): no flag, no note
    text = bench.table(_bench_rows(0.5, 3.1))
    assert "!" not in text and "4.00x" in text and "3.10x" in text


def test_quick_run_says_it_is_a_smoke_run(monkeypatch, capsys):
    """`vpfast bench --quick` prints, above its table, that its numbers come from a smoke run; a full run does
    not. The pytest subprocess is replaced by one that writes a result file with disagreeing ratios."""
    cmds = []

    def fake_pytest(cmd, stdout=None):
        cmds.append(cmd)
        out = next(c.split("=", 1)[1] for c in cmd if c.startswith("--benchmark-json="))
        with open(out, "w") as f:
            json.dump({"benchmarks": _bench_rows(2.0 / 0.92, 11.89)}, f)
        return 0

    monkeypatch.setattr(bench.subprocess, "call", fake_pytest)
    assert bench.run(["ddr_loss"], quick=True) == 0
    assert "--benchmark-min-rounds=3" in cmds[-1] and "--paired-rounds=3" in cmds[-1]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("quick run (--quick): a smoke run") and "without --quick" in lines[1]
    assert lines[-1].startswith("! the plain ratio")
    assert bench.run(["ddr_loss"]) == 0
    assert "quick run" not in capsys.readouterr().out
