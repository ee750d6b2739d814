"""The autograd helpers of the recurrent cells' fast paths: cat_conv (with bias), permute_blocks, the deferred
weight gradients of vpfast.nn._weight_grad and PhyDNet's DCGAN chains (vpfast.nn.phydnet.dcgan_chain)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vpfast.nn import phydnet as P
from vpfast.nn._recurrent import cat_conv, cat_conv_many, permute_blocks
from vpfast.nn._weight_grad import defer_weight_grad, stash_conv

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0, grad=True):
    t = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return t.requires_grad_(grad)


@pytest.mark.parametrize("bias", [False, True])
def test_cat_conv_bias_and_pair_padding(bias):
    a, b = _rand(2, 3, 7, 5, seed=1), _rand(2, 2, 7, 5, seed=2)
    w, bi = _rand(4, 5, 3, 1, seed=3), (_rand(4, seed=4) if bias else None)
    out = cat_conv(a, b, w, (2, 1), (1, 0), bi)
    want = F.conv2d(torch.cat((a, b), 1), w, bi, (2, 1), (1, 0))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    ins = (a, b, w) + ((bi,) if bias else ())
    assert torch.autograd.gradcheck(lambda *t: cat_conv(t[0], t[1], t[2], (2, 1), (1, 0), t[3] if bias else None),
                                    ins)



@pytest.mark.parametrize("needs", [(False, True, True), (True, False, True), (False, True, False)],
                         ids=["frame-first", "middle-frozen", "middle-only"])
def test_cat_conv_many_bias_partial_input_grads(needs):
    """Three inputs, a bias and pair stride/padding with only some inputs needing a gradient (the narrowed
    input-gradient call): outputs and gradients equal F.conv2d over the concatenation."""
    xs = [_rand(3, c, 6, 5, seed=10 + i, grad=g) for i, (c, g) in enumerate(zip((2, 3, 1), needs))]
    w, bi = _rand(4, 6, 3, 2, seed=20), _rand(4, seed=21)
    out = cat_conv_many(xs, w, (1, 2), (1, 1), bi)
    want = F.conv2d(torch.cat(xs, 1), w, bi, (1, 2), (1, 1))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = _rand(*out.shape, seed=22, grad=False)
    leaves = [t for t in xs if t.requires_grad] + [w, bi]
    got = torch.autograd.grad(out, leaves, g)
    torch.testing.assert_close(got, torch.autograd.grad(want, leaves, g))
    assert torch.autograd.gradcheck(lambda *t: cat_conv_many(list(t[:3]), t[3], (1, 2), (1, 1), t[4]),
                                    tuple(xs) + (w, bi))

def test_permute_blocks():
    t = _rand(8, 3, 2)
    out = permute_blocks(t, (0, 1, 3, 2), 2)
    torch.testing.assert_close(out, torch.cat((t[:4], t[6:], t[4:6])), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda x: permute_blocks(x, (2, 0, 3, 1), 2), (t,))
    # its backward allocates no zero-filled gradient: one cat, a single node
    assert type(out.grad_fn).__name__ == "_PermuteBlocksBackward"
    with pytest.raises(ValueError, match="permute"):
        permute_blocks(t, (0, 1, 1, 2), 2)
    with pytest.raises(ValueError, match="permute"):
        permute_blocks(t, (0, 1, 2), 2)


def _loop(w, b, x0, steps, two_inputs, deferred):
    """A recurrent loop h <- tanh(conv([x_t, h])) (or conv(h)) sharing one weight; returns the loss."""
    if deferred:
        w, b = defer_weight_grad(w, b)
    h, loss = x0, 0
    for t in range(steps):
        x = torch.sin(x0 * (t + 1))
        h = torch.tanh(stash_conv(x, h, w, b, 1, 1) if two_inputs else stash_conv(h, None, w, b, 1, 1))
        loss = loss + (h * h).sum()
    return loss


@pytest.mark.parametrize("two_inputs", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_deferred_weight_grad_matches_per_step(two_inputs, bias):
    """Loss and gradients (weight, bias, initial state) equal the plain per-step convolution's, in float64; a
    retained graph's second backward stashes afresh (same gradients again)."""
    C = 3
    w = _rand(C, 2 * C if two_inputs else C, 3, 3, seed=1)
    b = _rand(C, seed=2) if bias else None
    x0 = _rand(2, C, 5, 4, seed=3)
    params = [w, x0] + ([b] if bias else [])
    want = torch.autograd.grad(_loop(w, b, x0, 4, two_inputs, False), params)
    loss = _loop(w, b, x0, 4, two_inputs, True)
    for _ in range(2):
        got = torch.autograd.grad(loss, params, retain_graph=True)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_deferred_weight_grad_partial_backward_leaves_nothing_behind():
    """A backward that does not reach the weight stashes nothing, so a later full backward of the same
    (retained) graph is still right; without grad recording the plain convolution runs."""
    w, x0 = _rand(3, 6, 3, 3, seed=1), _rand(2, 3, 5, 4, seed=3)
    want = torch.autograd.grad(_loop(w, None, x0, 3, True, False), (w,))[0]
    loss = _loop(w, None, x0, 3, True, True)
    torch.autograd.grad(loss, (x0,), retain_graph=True)  # does not need w's gradient
    torch.testing.assert_close(torch.autograd.grad(loss, (w,))[0], want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        wd, bd = defer_weight_grad(w, None)
        assert wd is w and bd is None
        torch.testing.assert_close(_loop(w, None, x0, 3, True, True), _loop(w, None, x0, 3, True, False))


def test_deferred_weight_grad_refuses_a_second_geometry():
    w, _ = defer_weight_grad(_rand(3, 3, 3, 3))
    x = _rand(1, 3, 5, 5)
    stash_conv(x, None, w, None, 1, 1)
    with pytest.raises(ValueError, match="strides/paddings"):
        stash_conv(x, None, w, None, 1, 0)


def _chains():
    torch.manual_seed(0)
    enc, dec = P.EncoderE(nc=1, nf=16, patch_size=4).double(), P.DecoderD(nc=1, nf=16, patch_size=4).double()
    spec = P.EncoderSpecific(32, 32).double()
    with torch.no_grad():  # affine parameters away from their initial 1 / 0
        for p in (*enc.parameters(), *dec.parameters(), *spec.parameters()):
            p.add_(torch.randn_like(p) * 0.3)
    return enc, dec, spec


def test_dcgan_chain_matches_the_modules():
    """Encoder (stride-2 convs), encoder_E -> EncoderSpecific continued with pre= from the raw output, decoder
    (transposed convs, bare tail): outputs and every gradient equal calling the modules (float64)."""
    enc, dec, spec = _chains()
    frame, lat = _rand(2, 1, 16, 16, seed=5), _rand(2, 32, 4, 4, seed=6)

    def run(fast):
        if fast:
            raw = P.dcgan_chain([enc.c1, enc.c2, enc.c3], frame, raw=True)
            e = P.dcgan_chain([spec.c1, spec.c2], raw, pre=enc.c3)
            y = P.dcgan_chain([dec.upc1, dec.upc2], lat, tail=dec.upc3)
        else:
            e, y = spec(enc(frame)), dec(lat)
        loss = (e * e.cos()).sum() + (y * y.sin()).sum()
        params = [frame, lat, *enc.parameters(), *spec.parameters(), *dec.parameters()]
        return (e, y) + torch.autograd.grad(loss, params)

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_dcgan_chain_gradcheck_and_autocast_fallback():
    enc, dec, _ = _chains()
    x = _rand(1, 32, 3, 3, seed=7)
    assert torch.autograd.gradcheck(lambda t: P.dcgan_chain([dec.upc1, dec.upc2], t, tail=dec.upc3), (x,))
    # under autocast the modules run as they are (autocast casts their convolutions): same result as theirs
    m = P.EncoderE(nc=1, nf=16, patch_size=4)
    f = torch.rand(1, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = P.dcgan_chain([m.c1, m.c2, m.c3], f), m(f)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
