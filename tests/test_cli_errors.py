"""What a newcomer gets wrong reaches them as one line on stderr and exit code 2, through the real command line
(a subprocess, as a user runs it), not as a traceback; and wrong input is refused rather than silently taken."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vpfast import commands

HERE = os.path.dirname(os.path.abspath(__file__))
# TAU at 16x16, tiny: the real models check their input; plain weights + --model like a user's file
CFG = {"hid_S": 8, "hid_T": 16, "N_S": 2, "N_T": 2, "mlp_ratio": 2.0, "in_shape": [10, 1, 16, 16]}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from vpfast import models
    torch.manual_seed(0)
    net = models.create("tau", preset="small", **CFG)
    path = str(tmp_path_factory.mktemp("w") / "tau.pt")
    torch.save(net.state_dict(), path)
    return path


def _cli(*args, cwd=None):
    # VPFAST_QUIET: a tree without the compiled extension adds its one import warning; the error is what is tested
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               VPFAST_DEVICE="cpu", VPFAST_QUIET="1")
    return subprocess.run([sys.executable, "-m", "vpfast", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _one_line_error(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _model_args(weights):
    return [weights, "--model", "tau", "--preset", "small", "--config", json.dumps(CFG)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend can run here")
def test_eval_with_a_backend_that_cannot_run(weights):
    _one_line_error(_cli("eval", *_model_args(weights), "--backend", "cuda", "--test-size", "2"),
                    "vpfast eval: error:", "backend='cuda' cannot run here")


@pytest.mark.parametrize("shape,dtype,scale,needle", [
    ((2, 10, 3, 16, 16), np.float32, 1.0, "3 channels"),         # a colour video for a one-channel model
    ((2, 10, 1, 8, 8), np.float32, 1.0, "8x8 pixels"),           # frames of another size than trained for
    ((2, 10, 1, 16, 16), np.float32, 255.0, "values in [0, 1]"),  # 0..255 floats (documented: [0, 1])
])
def test_predict_refuses_input_the_model_was_not_built_for(tmp_path, weights, shape, dtype, scale, needle):
    f = str(tmp_path / "in.npy")
    np.save(f, (np.random.default_rng(0).random(shape) * scale).astype(dtype))
    out = tmp_path / "pred"
    _one_line_error(_cli("predict", *_model_args(weights), "--input", f, "--out", str(out)),
                    "vpfast predict: error:", "--input", needle)
    assert not out.exists()  # nothing written


def test_demo_does_not_replace_another_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"another run's checkpoint")
    _one_line_error(_cli("demo", "--out", str(out), "--steps", "1"), "vpfast demo: error:", "--overwrite")
    assert (out / "last.pt").read_bytes() == b"another run's checkpoint"


def test_train_refuses_0_to_255_float_data(tmp_path):
    f = str(tmp_path / "seqs.npy")
    np.save(f, (np.random.default_rng(0).random((12, 20, 1, 16, 16)) * 255).astype(np.float32))
    _one_line_error(_cli("train", "--model", "standin:create", "--data", f, "--out", str(tmp_path / "r"),
                         "--no-progress"), "vpfast train: error:", "values in [0, 1]", "divide by 255")


def test_four_dimensional_input_says_how_it_was_read(tmp_path, weights, capsys):
    # [N, T, H, W] files are taken (one channel added), and the command says which layout it assumed
    f = str(tmp_path / "seqs.npy")
    np.save(f, np.random.default_rng(0).random((3, 10, 16, 16)).astype(np.float32))
    assert commands.cli(["predict", *_model_args(weights), "--input", f, "--out", str(tmp_path / "p"),
                         "--num", "3"]) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "read as [N, T, H, W]: 3 sequences of 10 one-channel frames" in err
    assert np.load(str(tmp_path / "p" / "predictions.npy")).shape == (3, 10, 1, 16, 16)
