"""PhyDNet (OpenSTL): a PhyCell branch and a ConvLSTM branch between a shared encoder and decoder, trained with
teacher forcing and a moment constraint on the PhyCell's filters, MODELS.md §13."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from . import _base
from .._dispatch import resolve
from ..nn.phydnet import K2M, PhyCell, PhyDConvLSTM, PhyDEncoderRNN


def moment_targets(n: int = 7, dtype=torch.float32, device=None) -> torch.Tensor:
    """The moment constraint's targets (OpenSTL's PhyDNet method): filter q's moment matrix should be the one-hot
    n x n matrix at (q // n, q % n), i.e. filter q approximates the finite-difference operator of that order."""
    return torch.eye(n * n, dtype=dtype, device=device).view(n * n, n, n)


class PhyDNet(_base.VideoPredictionModel):
    """PhyDNet (OpenSTL PhyDNet_Model).

    PhyDNet(in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, patch_size=4,
            teacher_forcing_decay=0.003, iters_per_epoch=625, openstl_objective=False, backend=None)

    Every size is fixed as in OpenSTL: a 64-channel latent at (H / patch_size, W / patch_size), one PhyCell
    layer with 49 7x7 filters, ConvLSTM 128, 128, 64 (3x3). patch_size must be 2 or 4 (OpenSTL quietly uses
    4 for anything else; this class refuses it instead).

    forward(x: Tensor[B, pre, C, H, W]) -> Tensor[B, aft, C, H, W] in (0, 1): the encoder phase over frames
      0..pre-2, then aft steps from frame pre-1, each fed the previous output (OpenSTL's `inference`).
    training_loss(frames, itr, generator=None, epoch=None) -> (loss, logs): the sum of the per-step MSEs
      (pre-1 reconstructions and aft predictions) plus the moment loss Σ_b MSE(K2M(W[:, b]), targets) over
      the PhyCell's conv1 filters. In the decoder phase the ground truth is fed for the whole batch with
      probability max(0, 1 - teacher_forcing_decay * epoch) (one draw per batch, from `generator`);
      epoch defaults to itr // iters_per_epoch (625: 10,000 Moving-MNIST sequences at batch 16; the original
      code's decay is 0.01).
    backend: "torch" runs OpenSTL's step loop verbatim; the fast backends encode the frames known in advance (the
      observed ones; the targets too under teacher forcing) in one batch and decode the outputs that are not fed
      back in one batch, the recurrence alone running step by step (same arithmetic, batched convolutions).
    openstl_objective: False (default) back-propagates that loss L, as the original PhyDNet does. True
      back-propagates what OpenSTL's training_step does, mean((L - y)^2) over the target frames y: L's
      gradient rescaled by 2 (L - mean(y)) per batch. Either way logs["phydnet_loss"] is L.
    """

    name = "phydnet"

    def __init__(self, in_shape=(10, 1, 64, 64), pre_seq_length=None, aft_seq_length=None, patch_size=4,
                 teacher_forcing_decay=0.003, iters_per_epoch=625, openstl_objective=False,
                 backend: Optional[str] = None):
        super().__init__()
        T, C, H, W = _base.as_shape(in_shape)
        pre = T if pre_seq_length is None else _base.positive_int("pre_seq_length", pre_seq_length)
        aft = pre if aft_seq_length is None else _base.positive_int("aft_seq_length", aft_seq_length)
        if patch_size not in (2, 4):
            raise ValueError(f"patch_size must be 2 or 4 (the encoder's total stride; OpenSTL silently uses 4 for "
                             f"other values), got {patch_size!r}")
        if H % patch_size or W % patch_size:
            raise ValueError(f"in_shape height and width ({H}x{W}) must be divisible by patch_size={patch_size}")
        if float(teacher_forcing_decay) < 0:
            raise ValueError(f"teacher_forcing_decay must be >= 0, got {teacher_forcing_decay!r}")
        _base.positive_int("iters_per_epoch", iters_per_epoch)
        self._init_config(dict(in_shape=[T, C, H, W], pre_seq_length=pre, aft_seq_length=aft, patch_size=patch_size,
                               teacher_forcing_decay=float(teacher_forcing_decay), iters_per_epoch=iters_per_epoch,
                               openstl_objective=bool(openstl_objective)), backend)
        self.patch_size = patch_size
        latent = (H // patch_size, W // patch_size)
        # registration order = OpenSTL's state_dict order: phycell, convcell, encoder (which holds them again), k2m
        self.phycell = PhyCell(latent, 64, [49], 1, (7, 7), backend=self.backend)
        self.convcell = PhyDConvLSTM(latent, 64, [128, 128, 64], 3, (3, 3), backend=self.backend)
        # batched weight gradients (fast backends) in ConvLSTM layers 1 and 2 only. Measured here (small preset,
        # batch 1, 1 thread): deferring layer 0 too was ~3% faster again but its stashed output gradients
        # moved the step's peak memory from early to late in backward, 81.5 -> 86.9 MiB
        self.convcell.cell_list[0].defer_weight_grad = False
        self.encoder = PhyDEncoderRNN(self.phycell, self.convcell, in_channel=C, patch_size=patch_size,
                                      backend=self.backend)
        self.k2m = K2M([7, 7])

    def _spatial_divisor(self):
        return self.patch_size, f"patch_size={self.patch_size}, the encoder's stride"

    @contextlib.contextmanager
    def _unrolled(self):
        if torch.compiler.is_compiling():  # as in _Recurrent._unrolled: the cells' cache is eager-only
            yield
            return
        with contextlib.ExitStack() as stack:
            for cell in self.convcell.cell_list:
                stack.enter_context(cell.unroll())
            yield

    # ---- pieces -------------------------------------------------------------------------------------
    def moment_loss(self) -> torch.Tensor:
        """Σ_b MSE(K2M(W[:, b]), targets) over the input channels b of the PhyCell's conv1 weight W [49, 64, 7, 7];
        the moments are computed in float64 and cast to W's dtype (float32 in OpenSTL)."""
        w = self.phycell.cell_list[0].F.conv1.weight
        cst = moment_targets(7, w.dtype, w.device)
        if self.backend == "torch":  # the reference's loop
            loss = 0
            for b in range(w.shape[1]):
                loss = loss + F.mse_loss(self.k2m(w[:, b]).to(w.dtype), cst)
            return loss
        m = self.k2m(w.transpose(0, 1)).to(w.dtype)  # [64, 49, 7, 7]
        return (m - cst).pow(2).mean(dim=(1, 2, 3)).sum()

    def _batches_steps(self) -> bool:
        """The fast backends encode the frames known in advance in one batch and decode the outputs that are not
        fed back in one batch (same arithmetic; measured here at the small preset, batch 1: the encoder and
        decoder convolutions of 19 steps took 0.56x their per-step time, forward + backward); backend="torch"
        runs the reference's step loop verbatim."""
        return resolve(self.backend) != "torch"

    def _run_batched(self, frames: torch.Tensor, n_known: int, n_steps: int, first_out: int) -> torch.Tensor:
        """The loop of `n_steps` steps whose step t is fed frames[:, t] for t < n_known and the previous output
        afterwards -> the outputs of steps first_out..n_steps-1, Tensor[B, n_steps - first_out, C, H, W].
        Only the recurrence (PhyCell, ConvLSTM) runs step by step, and the decoder for outputs fed back."""
        enc, B = self.encoder, frames.shape[0]
        known = frames[:, :n_known].transpose(0, 1).flatten(0, 1)  # step-major: [n_known * B, C, H, W]
        # unbind: one backward node that stacks the steps' gradients (indexing would zero-fill a full-size
        # gradient per step)
        e_p, e_r = (t.unflatten(0, (n_known, B)).unbind(0) for t in enc.encode(known))
        state, outs, pending, inp = None, {}, [], None
        for t in range(n_steps):
            h_p, h_c, state = enc.recur(*((e_p[t], e_r[t]) if t < n_known else enc.encode(inp)), state)
            if n_known <= t + 1 < n_steps:  # the next step's input: decoded now
                inp, _ = enc.decode(h_p, h_c)
                if t >= first_out:
                    outs[t] = inp
            elif t >= first_out:
                pending.append((t, h_p, h_c))
        if pending:
            dec, _ = enc.decode(torch.cat([p[1] for p in pending]), torch.cat([p[2] for p in pending]))
            outs.update(zip((p[0] for p in pending), dec.split(B)))
        return torch.stack([outs[t] for t in range(first_out, n_steps)], 1)

    def teacher_forcing_ratio(self, epoch: int) -> float:
        return max(0.0, 1.0 - self.config["teacher_forcing_decay"] * epoch)

    # ---- public -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, pre_seq_length, C, H, W] -> Tensor[B, aft_seq_length, C, H, W] (test-time)."""
        self.check_frames(x, self.pre_seq_length, "x")
        pre, aft = self.pre_seq_length, self.aft_seq_length
        if self._batches_steps():  # the encoder phase's outputs are discarded: not decoded
            with self._unrolled():
                return self._run_batched(x, pre, pre - 1 + aft, pre - 1)
        state = None
        preds = []
        with self._unrolled():
            for ei in range(self.pre_seq_length - 1):
                _, state = self.encoder(x[:, ei], state)
            inp = x[:, -1]
            for _ in range(self.aft_seq_length):
                inp, state = self.encoder(inp, state)
                preds.append(inp)
        return torch.stack(preds, dim=1)

    def training_loss(self, frames: torch.Tensor, itr: int = 0, generator: Optional[torch.Generator] = None,
                      epoch: Optional[int] = None):
        """frames: Tensor[B, pre + aft, C, H, W], itr: global training iteration (0-based) -> (loss, logs);
        see the class docstring."""
        pre, aft = self.pre_seq_length, self.aft_seq_length
        self.check_frames(frames, pre + aft, "frames")
        if epoch is None:
            epoch = int(itr) // self.config["iters_per_epoch"]
        ratio = self.teacher_forcing_ratio(epoch)
        u = torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu")
        forced = bool(u.item() < ratio)
        x, y = frames[:, :pre], frames[:, pre:]
        n = pre - 1 + aft
        with self._unrolled():
            if self._batches_steps():  # step t predicts frames[:, t + 1] and is fed frames[:, t] when known
                # the moment loss first: autograd runs later-recorded nodes first, so its backward (float64
                # moments of all filters, ~5 MB) then runs last, after the loop's saved tensors are freed
                moment = self.moment_loss()
                outs = self._run_batched(frames, n if forced else pre, n, 0)
                mse = F.mse_loss(outs, frames[:, 1:], reduction="none").mean(dim=(0, 2, 3, 4)).sum()
            else:  # the reference's loop
                state = None
                mse = 0
                for ei in range(pre - 1):
                    out, state = self.encoder(x[:, ei], state)
                    mse = mse + F.mse_loss(out, x[:, ei + 1])
                inp = x[:, -1]
                for di in range(aft):
                    out, state = self.encoder(inp, state)
                    mse = mse + F.mse_loss(out, y[:, di])
                    inp = y[:, di] if forced else out
                moment = self.moment_loss()
        total = mse + moment
        loss = (total - y).pow(2).mean() if self.config["openstl_objective"] else total
        logs = {"mse": mse.item(), "moment": moment.item(), "phydnet_loss": total.item(),
                "teacher_forcing": float(forced), "tf_ratio": ratio, "loss": loss.item()}
        return loss, logs
