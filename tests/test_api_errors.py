"""The Python API refuses what cannot work when it is given, naming the argument or file: a backend that cannot
run on this machine (at models.create / accelerate, not at the first forward pass), a corrupt checkpoint file
(not the unpickler's bare IndexError), frames of another size than the model was built for (not a silently
worse prediction)."""
import pytest
import torch

import vpfast
from vpfast import _ext, accelerate
from vpfast import models as M
from vpfast.models import CheckpointError

SMALL = dict(in_shape=(3, 1, 16, 16), pre_seq_length=3, aft_seq_length=2)


@pytest.fixture
def no_extension(monkeypatch):
    # the state of a clone where vpfast._C was never built, on any machine: cpp and cuda cannot run
    monkeypatch.setattr(_ext, "LOAD_ERROR", "vpfast._C is not built (simulated)")


@pytest.mark.parametrize("name", ["tau", "predrnn"])
def test_create_refuses_a_backend_that_cannot_run(name, no_extension):
    with pytest.raises(vpfast.BackendUnavailable, match=r"backend='cpp' cannot run here: vpfast._C is not built"):
        M.create(name, preset="small", backend="cpp", **SMALL)
    M.create(name, preset="small", backend="torch", **SMALL)  # the reference arithmetic runs everywhere


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend can run here")
def test_create_refuses_cuda_without_a_gpu():
    with pytest.raises(vpfast.BackendUnavailable, match=r"backend='cuda' cannot run here"):
        M.create("tau", preset="small", backend="cuda", **SMALL)


def test_accelerate_refuses_a_backend_that_cannot_run(no_extension):
    net = M.create("tau", preset="small", backend="torch", **SMALL)
    with pytest.raises(vpfast.BackendUnavailable, match=r"backend='cpp' cannot run here"):
        accelerate(net, backend="cpp")


def _corrupt(kind, path):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    else:  # a real checkpoint cut short, as by a full disk or an interrupted copy
        torch.save(M.create("tau", preset="small", **SMALL).state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["empty", "text", "truncated"])
def test_load_checkpoint_names_a_corrupt_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    _corrupt(kind, path)
    net = M.create("tau", preset="small", **SMALL)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
        M.load_checkpoint(net, str(path))
    assert str(path) in str(info.value)


def test_load_checkpoint_tells_a_pickled_object_from_a_corrupt_file(tmp_path):
    # a readable checkpoint that pickles a class: weights_only refuses it, and the message says how to proceed
    path = tmp_path / "objects.pt"
    torch.save({"state_dict": M.create("tau", preset="small", **SMALL).state_dict(), "cls": torch.nn.Conv2d}, path)
    net = M.create("tau", preset="small", **SMALL)
    with pytest.raises(CheckpointError, match="refused this file .*pass weights_only=False"):
        M.load_checkpoint(net, str(path))
    assert M.load_checkpoint(net, str(path), weights_only=False).loaded


def test_load_checkpoint_missing_file_is_the_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        M.load_checkpoint(M.create("tau", preset="small", **SMALL), str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("name", M.NAMES)
def test_forward_refuses_frames_of_another_size(name):
    # built for 64x64 (the mmnist preset); 32x32 frames pass every layer's divisibility but are not what the
    # weights were trained on. On the meta device: the check comes before any arithmetic.
    with torch.device("meta"):
        net = M.create(name, preset="mmnist", backend="torch")
        T, C, H, W = net.config["in_shape"]
        x = torch.empty(1, net.pre_seq_length, C, H // 2, W // 2)
        frames = torch.empty(1, net.pre_seq_length + net.aft_seq_length, C, H // 2, W // 2)
        with pytest.raises(ValueError, match=rf"x must have {H}x{W} frames .*got {H // 2}x{W // 2}"):
            net(x)
        net.train()
        with pytest.raises(ValueError, match=rf"frames must have {H}x{W} frames"):
            net.training_loss(frames, 0)
