"""Training loop, checkpoints, resume, CLI and multi-process training, on a tiny stand-in model (tests/standin.py)
so the machinery is tested independently of the real models' speed."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from vpfast import commands, runtime
from vpfast import evaluate as ev

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cpu_by_default(monkeypatch):
    # the runs here compare bit for bit (resume, DDP with gloo): on the CPU also where a GPU is present; the GPU
    # tests pass --device cuda, which overrides this default
    monkeypatch.setenv("VPFAST_DEVICE", "cpu")


TINY = ["--train-size", "16", "--batch-size", "8", "--test-size", "8", "--no-progress"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    rc = commands.train_main(["--model", "standin:create", "--epochs", "2", "--out", out, *TINY])
    assert rc == 0
    return out


def test_run_writes_logs_pictures_and_checkpoint(trained):
    for name in ("last.pt", "log.csv", "log.json", "predictions.png", "predictions.gif", "loss.png",
                 "summary.json"):
        assert os.path.getsize(os.path.join(trained, name)) > 0, name
    rows = open(os.path.join(trained, "log.csv")).read().strip().splitlines()
    assert rows[0].startswith("epoch,step,train_loss,lr,mse,mae,ssim,psnr") and len(rows) == 3
    log = json.load(open(os.path.join(trained, "log.json")))
    assert [e["step"] for e in log["epochs"]] == [2, 4] and len(log["steps"]) == 4
    ck = _state(os.path.join(trained, "last.pt"))
    assert ck["format"] == "vpfast-train" and ck["epoch"] == 2 and ck["global_step"] == 4
    assert ck["scheduler"]["total_steps"] == 4
    assert not [f for f in os.listdir(trained) if ".tmp" in f]  # atomic writes leave no temporaries


def _run(out, *extra, model="standin:create"):
    return commands.train_main(["--model", model, "--epochs", "3", "--dtype", "float64", "--config", '{"noise": 0.05}',
                    "--out", out, *TINY, *extra])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ref = str(tmp_path_factory.mktemp("ref"))
    assert _run(ref) == 0
    return ref


@pytest.mark.parametrize("sigint_at", [1, 2])  # mid-epoch and at an epoch boundary
def test_ctrl_c_saves_and_resume_is_exact(tmp_path, uninterrupted, sigint_at):
    ref = uninterrupted
    part = str(tmp_path / "part")
    cfg = json.dumps({"noise": 0.05, "sigint_at": sigint_at})
    rc = commands.train_main(["--model", "standin:create_interrupting", "--epochs", "3", "--dtype", "float64", "--config",
                  cfg, "--out", part, *TINY])
    assert rc == 130
    ck = _state(os.path.join(part, "last.pt"))
    assert ck["reason"] == "interrupt" and ck["global_step"] == sigint_at + 1
    assert (ck["epoch"], ck["batch_in_epoch"]) == divmod(sigint_at + 1, 2) or ck["batch_in_epoch"] == 2
    assert commands.train_main(["--out", part, "--resume", "--no-progress", "--test-size", "8"]) == 0
    a, b = _state(os.path.join(ref, "last.pt")), _state(os.path.join(part, "last.pt"))
    assert b["global_step"] == a["global_step"] == 6
    for k, v in a["state_dict"].items():
        assert v.dtype == torch.float64
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])


TIMING = ("epoch_time_s", "train_seq_per_s")  # wall-clock columns: the only ones a resume may change


def _log_rows(out):
    import csv
    with open(os.path.join(out, "log.csv")) as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def assert_same_run(ref, part):
    """Two finished runs are the same run: weights, optimizer, scheduler, RNG streams, and every log row and
    logged step loss (all but the wall-clock columns) bit for bit."""
    a, b = _state(os.path.join(ref, "last.pt")), _state(os.path.join(part, "last.pt"))
    assert (b["epoch"], b["batch_in_epoch"], b["global_step"]) == (a["epoch"], a["batch_in_epoch"], a["global_step"])
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert a["scheduler"] == b["scheduler"] and a["train_args"] == b["train_args"]
    ra, rb = a["rng_per_rank"][0], b["rng_per_rank"][0]
    assert torch.equal(ra["torch"], rb["torch"]) and torch.equal(ra["numpy"]["keys"], rb["numpy"]["keys"])
    assert ra["python"] == rb["python"]
    assert _log_rows(part) == _log_rows(ref)
    la, lb = (json.load(open(os.path.join(d, "log.json"))) for d in (ref, part))
    assert lb["steps"] == la["steps"]
    assert [{k: v for k, v in e.items() if k not in TIMING} for e in lb["epochs"]] == \
        [{k: v for k, v in e.items() if k not in TIMING} for e in la["epochs"]]
    assert all(math.isfinite(e["train_loss"]) and e["train_seq_per_s"] > 0 for e in lb["epochs"])


# every stop point of a 3-epoch, 2-steps-per-epoch run: mid-epoch (1, 3, 5), at an epoch boundary (2, 4), and a
# run stopped twice
@pytest.mark.parametrize("stops", [(1,), (2,), (3,), (4,), (5,), (1, 2)])
def test_stop_after_and_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, stops):
    part = str(tmp_path / "part")
    assert _run(part, "--stop-after", str(stops[0])) == 0
    for more in stops[1:]:
        assert commands.train_main(["--out", part, "--resume", "--no-progress", "--stop-after", str(more)]) == 0
    assert _state(os.path.join(part, "last.pt"))["global_step"] == sum(stops)
    # no --test-size: the run's test set (8 sequences) comes from the checkpoint, not the default 1000
    assert commands.train_main(["--out", part, "--resume", "--no-progress"]) == 0
    assert_same_run(uninterrupted, part)


def test_resume_refuses_another_test_set(tmp_path, capsys):
    part = str(tmp_path / "part")
    assert _run(part, "--stop-after", "1") == 0
    assert commands.train_main(["--out", part, "--resume", "--no-progress", "--test-size", "16"]) == 2
    assert "test_size=8" in capsys.readouterr().err


def test_corrupt_or_mismatched_checkpoint_is_refused_and_kept(tmp_path, trained, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    path = os.path.join(out, "last.pt")
    good = open(path, "rb").read()
    # mismatched run arguments
    assert commands.train_main(["--out", out, "--resume", "--batch-size", "4", *TINY[4:]]) == 2
    assert "batch_size=8" in capsys.readouterr().err
    assert commands.train_main(["--out", out, "--resume", "--model", "other:thing", "--no-progress"]) == 2
    assert "model" in capsys.readouterr().err
    # a fresh run may not silently replace the existing checkpoint
    assert commands.train_main(["--model", "standin:create", "--out", out, *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert open(path, "rb").read() == good
    # truncated and garbage files
    for bad in (good[: len(good) // 2], b"not a checkpoint at all"):
        open(path, "wb").write(bad)
        assert commands.train_main(["--out", out, "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "corrupt" in err and "last.pt" in err
        assert open(path, "rb").read() == bad  # untouched: nothing was written over it
    # a plain state_dict is not a training checkpoint
    torch.save({"w": torch.zeros(1)}, path)
    assert commands.train_main(["--out", out, "--resume", "--no-progress"]) == 2
    assert "not a vpfast training checkpoint" in capsys.readouterr().err
    assert commands.train_main(["--out", str(tmp_path / "nothing"), "--resume", "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err


def test_eval_and_predict(tmp_path, trained, capsys):
    ck = os.path.join(trained, "last.pt")
    js = str(tmp_path / "m.json")
    assert commands.cli(["eval", ck, "--test-size", "8", "--no-progress", "--json", js]) == 0
    out = capsys.readouterr().out
    assert "| model |" in out and "zeros (baseline)" in out and "repeat last frame" in out
    res = json.load(open(js))["metrics"]
    assert set(res) == {"model", "zeros", "last"} and res["zeros"]["ssim"] < 1
    # mnist_test_seq.npy layout [T, N, H, W]
    seq = np.stack([ev.load_test_set("mmnist", 3, 5)[i][:, 0].numpy() for i in range(3)], 1)
    f = str(tmp_path / "mnist_test_seq.npy")
    np.save(f, (seq * 255).round().astype(np.uint8))
    assert commands.cli(["eval", ck, "--data", f, "--no-progress"]) == 0
    assert "3 test sequences" in capsys.readouterr().out
    pout = str(tmp_path / "pred")
    assert commands.cli(["predict", ck, "--input", f, "--out", pout]) == 0
    pred = np.load(os.path.join(pout, "predictions.npy"))
    assert pred.shape == (3, 10, 1, 64, 64)
    assert os.path.getsize(os.path.join(pout, "predictions.png")) > 0
    # plain weights need --model
    sd = str(tmp_path / "weights.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in _state(ck)["state_dict"].items()}}, sd)
    assert commands.cli(["eval", sd, "--test-size", "4", "--no-progress"]) == 2
    assert "--model" in capsys.readouterr().err
    assert commands.cli(["eval", sd, "--model", "standin:create", "--test-size", "4", "--no-progress"]) == 0
    assert commands.cli(["eval", sd, "--model", "standin:create", "--config", '{"hidden": 4}', "--no-progress"]) == 2
    assert "does not match" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert commands.cli(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert commands.train_main(["--model", "no_such_model", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "no_such_model" in capsys.readouterr().err
    bad = str(tmp_path / "bad.npy")
    np.save(bad, np.zeros((4, 20, 8), np.float32))
    assert commands.train_main(["--model", "standin:create", "--data", bad, "--out", str(tmp_path / "y"), *TINY]) == 2
    assert "[N, T, C, H, W]" in capsys.readouterr().err
    short = str(tmp_path / "short.npy")
    np.save(short, np.zeros((12, 5, 1, 16, 16), np.float32))
    assert commands.train_main(["--model", "standin:create", "--data", short, "--out", str(tmp_path / "z"), *TINY]) == 2
    assert "T >= 20" in capsys.readouterr().err
    assert commands.train_main(["--model", "standin:create", "--config", "{oops", "--out", str(tmp_path / "w"), *TINY]) == 2
    assert "JSON" in capsys.readouterr().err
    # python -m vpfast.train works and argparse rejects bad values with exit code 2
    r = subprocess.run([sys.executable, "-m", "vpfast.train", "--dtype", "float16"], capture_output=True,
                       text=True, env=_env())
    assert r.returncode == 2 and "float16" in r.stderr


def test_train_on_user_array(tmp_path):
    # any [N, T, C, H, W] array: 2 channels, 12x16 frames, 6 -> 4 frames; last 10% held out for testing
    arr = np.random.default_rng(0).random((20, 10, 2, 12, 16)).astype(np.float32)
    f = str(tmp_path / "seqs.npy")
    np.save(f, arr)
    out = str(tmp_path / "run")
    cfg = json.dumps({"pre_seq_length": 6, "aft_seq_length": 4, "channels": 2})
    assert commands.train_main(["--model", "standin:create", "--config", cfg, "--data", f, "--epochs", "1",
                    "--batch-size", "6", "--out", out, "--no-progress"]) == 0
    log = json.load(open(os.path.join(out, "log.json")))
    assert log["epochs"][0]["step"] == 3  # 18 training sequences // 6


def test_ddp_two_processes_match_single_process(tmp_path):
    args = ["--model", "standin:create", "--epochs", "2", "--dtype", "float64", "--train-size", "16",
            "--batch-size", "8", "--test-size", "8", "--no-progress", "--overwrite"]
    single = str(tmp_path / "single")
    assert commands.train_main(args + ["--out", single]) == 0
    multi = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "vpfast.train", *args, "--out", multi]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(os.path.join(multi, "summary.json")))
    assert summary["ddp_max_param_diff"] == 0.0  # replicas stayed identical
    a, b = _state(os.path.join(single, "last.pt")), _state(os.path.join(multi, "last.pt"))
    assert b["world_size"] == 2 and len(b["rng_per_rank"]) == 2
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-12, atol=1e-14)
    la = json.load(open(os.path.join(single, "log.json")))["epochs"]
    lb = json.load(open(os.path.join(multi, "log.json")))["epochs"]
    for ra, rb in zip(la, lb):
        for key in ("mse", "mae", "ssim", "psnr", "train_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-9), key


def test_demo_reports_model_and_baselines(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert commands.cli(["demo", "--model", "standin:create", "--preset", "small", "--steps", "20",
                   "--batch-size", "8", "--epochs", "2", "--test-size", "8", "--out", out, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "zeros (baseline)" in text and "repeat last frame (baseline)" in text
    res = json.load(open(os.path.join(out, "demo.json")))
    assert res["steps"] == 20 and set(res["metrics"]) == {"model", "zeros", "last"}
    for name in ("demo.md", "predictions.png", "predictions.gif", "loss.png", "last.pt"):
        assert os.path.exists(os.path.join(out, name))


@pytest.mark.parametrize("name,config", [
    ("tau", {"hid_S": 8, "hid_T": 16, "N_S": 2, "N_T": 3, "mlp_ratio": 2.0}),
    ("predrnnv2", {"num_hidden": "8,8", "patch_size": 2, "filter_size": 3}),
])
def test_real_models_train_resume_and_eval(tmp_path, name, config):
    models = pytest.importorskip("vpfast.models")
    try:
        models.create(name, preset="small", **config)
    except (TypeError, ValueError) as e:  # integration of vpfast.models with vpfast.nn, not this file's subject
        pytest.xfail(f"vpfast.models cannot build {name}: {e}")
    arr = np.random.default_rng(0).random((20, 8, 1, 16, 16)).astype(np.float32)
    f = str(tmp_path / "seqs.npy")
    np.save(f, arr)
    cfg = json.dumps(dict(config, in_shape=[4, 1, 16, 16], pre_seq_length=4, aft_seq_length=4))
    common = ["--model", name, "--preset", "small", "--config", cfg, "--data", f, "--epochs", "2",
              "--batch-size", "6", "--dtype", "float64", "--no-progress"]
    ref = str(tmp_path / "ref")
    assert commands.train_main(common + ["--out", ref]) == 0
    part = str(tmp_path / "part")
    assert commands.train_main(common + ["--out", part, "--stop-after", "2"]) == 0  # mid-epoch (3 steps per epoch)
    assert _state(os.path.join(part, "last.pt"))["global_step"] == 2
    assert commands.train_main(["--out", part, "--resume", "--no-progress"]) == 0
    ck, ck2 = _state(os.path.join(ref, "last.pt")), _state(os.path.join(part, "last.pt"))
    assert ck["global_step"] == ck2["global_step"] == 6 and ck["model_name"] == name
    for k, v in ck["state_dict"].items():
        assert torch.equal(v, ck2["state_dict"][k]), k
    assert commands.cli(["eval", os.path.join(ref, "last.pt"), "--data", f, "--no-progress"]) == 0
    # the model rebuilt from the checkpoint predicts exactly what the trained one did
    net, meta = ev.load_model(os.path.join(ref, "last.pt"), dtype=torch.float64)
    assert (meta["pre"], meta["aft"]) == (4, 4)
    x = torch.from_numpy(arr[:2, :4]).double()
    assert net(x).shape == (2, 4, 1, 16, 16)


# ---- --device and --precision ---------------------------------------------------------------------------
def _same_weights(a_dir, b_dir):
    a, b = _state(os.path.join(a_dir, "last.pt")), _state(os.path.join(b_dir, "last.pt"))
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    return a, b


def test_bf16_mixed_on_cpu_trains_saves_resumes_and_evaluates(tmp_path, capsys):
    """--device cpu --precision bf16-mixed: a run, its checkpoint, an exact resume from the middle of an epoch,
    and eval under the same autocast."""
    base = ["--model", "standin:create", "--epochs", "1", "--device", "cpu", "--config", '{"noise": 0.05}', *TINY]
    common = base + ["--precision", "bf16-mixed"]
    ref = str(tmp_path / "ref")
    assert commands.train_main(common + ["--out", ref]) == 0
    assert "precision bf16-mixed" in capsys.readouterr().out
    f32 = str(tmp_path / "f32")
    assert commands.train_main(base + ["--precision", "32", "--out", f32]) == 0
    w16, w32 = (_state(os.path.join(d, "last.pt"))["state_dict"] for d in (ref, f32))
    assert any(not torch.equal(w16[k], w32[k]) for k in w16)  # autocast was on: bf16 rounding shows
    part = str(tmp_path / "part")
    assert commands.train_main(common + ["--out", part, "--stop-after", "1"]) == 0
    assert _state(os.path.join(part, "last.pt"))["global_step"] == 1
    # a resumed run keeps the checkpoint's precision: another one is refused
    assert commands.train_main(["--out", part, "--resume", "--precision", "32", "--no-progress"]) == 2
    assert "precision='bf16-mixed'" in capsys.readouterr().err
    assert commands.train_main(["--out", part, "--resume", "--device", "cpu", "--no-progress", "--test-size", "8"]) == 0
    a, _ = _same_weights(ref, part)
    assert a["train_args"]["precision"] == "bf16-mixed" and a["scaler"] == {}  # no loss scaling in bf16
    for name in ("log.csv", "predictions.png", "predictions.gif", "loss.png"):
        assert os.path.getsize(os.path.join(ref, name)) > 0
    js = str(tmp_path / "m.json")
    assert commands.cli(["eval", os.path.join(ref, "last.pt"), "--device", "cpu", "--precision", "bf16-mixed",
                   "--test-size", "8", "--no-progress", "--json", js]) == 0
    res = json.load(open(js))
    assert res["device"] == "cpu" and res["precision"] == "bf16-mixed" and res["metrics"]["model"]["mse"] > 0


def test_16_mixed_grad_scaler_state_is_saved_and_resumed(tmp_path, monkeypatch):
    """The GradScaler code path (16-mixed), run on the CPU through the test switch: the scaler's state (loss
    scale, growth counter) is checkpointed and restored, so a resumed run ends where an uninterrupted one does."""
    monkeypatch.setattr(runtime, "CPU_FLOAT16_REFUSED", False)
    common = ["--model", "standin:create", "--epochs", "1", "--device", "cpu", "--precision", "16-mixed",
              "--config", '{"noise": 0.05}', *TINY]
    ref = str(tmp_path / "ref")
    assert commands.train_main(common + ["--out", ref]) == 0
    part = str(tmp_path / "part")
    assert commands.train_main(common + ["--out", part, "--stop-after", "1"]) == 0
    saved = _state(os.path.join(part, "last.pt"))["scaler"]
    assert saved["_growth_tracker"] + (saved["scale"] < 65536.0) >= 1  # it counted steps (or backed off)
    assert commands.train_main(["--out", part, "--resume", "--no-progress", "--test-size", "8"]) == 0
    a, b = _same_weights(ref, part)
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0


def test_device_and_precision_errors(tmp_path, capsys, monkeypatch):
    base = ["--model", "standin:create", *TINY]
    assert commands.train_main(base + ["--device", "cpu", "--precision", "16-mixed", "--out", str(tmp_path / "a")]) == 2
    assert "bf16-mixed" in capsys.readouterr().err  # points to what works on the CPU
    assert commands.train_main(base + ["--device", "cpu", "--precision", "bf16-mixed", "--dtype", "float64",
                           "--out", str(tmp_path / "b")]) == 2
    assert "float64" in capsys.readouterr().err
    assert commands.train_main(base + ["--device", "tpu", "--out", str(tmp_path / "c")]) == 2
    assert "cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert commands.train_main(base + ["--device", "cuda", "--out", str(tmp_path / "d")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
        assert commands.cli(["eval", "whatever.pt", "--device", "cuda:0"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert runtime.resolve_device(None).type == "cpu"  # $VPFAST_DEVICE (set by the fixture above)
    monkeypatch.delenv("VPFAST_DEVICE")
    assert runtime.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_real_model_bf16_mixed_on_cpu(tmp_path):
    """A recurrent model (MotionRNN: ST-LSTM highway cells, MotionGRU, warp) trains under CPU bf16 autocast
    through the CLI and resumes exactly."""
    arr = np.random.default_rng(0).random((14, 8, 1, 16, 16)).astype(np.float32)
    f = str(tmp_path / "seqs.npy")
    np.save(f, arr)
    cfg = json.dumps({"num_hidden": "8,8", "patch_size": 2, "filter_size": 3, "in_shape": [4, 1, 16, 16],
                      "pre_seq_length": 4, "aft_seq_length": 4})
    common = ["--model", "motionrnn", "--preset", "small", "--config", cfg, "--data", f, "--epochs", "1",
              "--batch-size", "6", "--device", "cpu", "--precision", "bf16-mixed", "--no-progress"]
    ref = str(tmp_path / "ref")
    assert commands.train_main(common + ["--out", ref]) == 0
    part = str(tmp_path / "part")
    assert commands.train_main(common + ["--out", part, "--stop-after", "1"]) == 0
    assert commands.train_main(["--out", part, "--resume", "--no-progress"]) == 0
    a, _ = _same_weights(ref, part)
    assert a["global_step"] == 2 and all(v.dtype == torch.float32 for v in a["state_dict"].values())
    # the ops' backends as auto chose them, recorded (and printed) for the run
    assert {"stlstm_gates", "stlstm_output", "motion_gru", "deform_warp"} <= set(a["op_backends"])
    assert json.load(open(os.path.join(ref, "summary.json")))["op_backends"] == a["op_backends"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_cli_on_gpu(tmp_path, precision):
    """The whole CLI on the GPU with a real model: training, evaluation, pictures, checkpoint, resume (with the
    GradScaler's state for 16-mixed), and eval of the checkpoint on the GPU."""
    cfg = json.dumps({"num_hidden": "16,16", "in_shape": [10, 1, 64, 64]})
    common = ["--model", "predrnn", "--preset", "small", "--config", cfg, "--epochs", "2", "--train-size", "16",
              "--batch-size", "8", "--test-size", "16", "--device", "cuda", "--precision", precision,
              "--no-progress"]
    ref = str(tmp_path / "ref")
    assert commands.train_main(common + ["--out", ref]) == 0
    for name in ("last.pt", "log.csv", "log.json", "predictions.png", "predictions.gif", "loss.png", "summary.json"):
        assert os.path.getsize(os.path.join(ref, name)) > 0, name
    part = str(tmp_path / "part")
    assert commands.train_main(common + ["--out", part, "--stop-after", "3"]) == 0
    assert commands.train_main(["--out", part, "--resume", "--no-progress", "--test-size", "16"]) == 0
    a, b = _state(os.path.join(ref, "last.pt")), _state(os.path.join(part, "last.pt"))
    assert a["global_step"] == b["global_step"] == 4 and a["train_args"]["precision"] == precision
    assert set(a["scaler"]) == set(b["scaler"]) and (precision != "16-mixed" or b["scaler"]["scale"] > 0)
    for k, v in a["state_dict"].items():  # cuDNN picks algorithms per run: close, not bitwise
        torch.testing.assert_close(b["state_dict"][k], v, rtol=5e-2, atol=1e-3, msg=k)
    log = json.load(open(os.path.join(ref, "log.json")))
    assert all(math.isfinite(e["mse"]) for e in log["epochs"])
    assert commands.cli(["eval", os.path.join(ref, "last.pt"), "--device", "cuda", "--precision", precision,
                   "--test-size", "16", "--no-progress"]) == 0
