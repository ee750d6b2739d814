"""Triton path of large-kernel attention's depthwise pair: the two stages run as the depthwise_conv2d
kernels one after the other (not fused; the fused implementations are the C++ CPU and CUDA ones). The
backward pass recomputes the intermediate map, as the compiled backends do."""
from . import depthwise_conv2d as dw


def _same(w, d):
    return [d[0] * (w.shape[2] // 2), d[1] * (w.shape[3] // 2)]


def forward(x, w0, b0, w1, b1, dilation0, dilation1):
    x = x.contiguous()
    mid = dw.forward(x, w0.contiguous(), None if b0 is None else b0.contiguous(), [1, 1], _same(w0, dilation0),
                     list(dilation0))
    return dw.forward(mid, w1.contiguous(), None if b1 is None else b1.contiguous(), [1, 1], _same(w1, dilation1),
                      list(dilation1))


def backward(grad, x, w0, b0, w1, dilation0, dilation1, output_mask):
    x, w0, w1, grad = x.contiguous(), w0.contiguous(), w1.contiguous(), grad.contiguous()
    mid = dw.forward(x, w0, None if b0 is None else b0.contiguous(), [1, 1], _same(w0, dilation0),
                     list(dilation0))
    need_gmid = bool(output_mask[0] or output_mask[1] or output_mask[2])
    gmid, gw1, gb1 = dw.backward(grad, mid, w1, [1, 1], _same(w1, dilation1), list(dilation1),
                                 [need_gmid, output_mask[3], output_mask[4]])
    if need_gmid:
        gx, gw0, gb0 = dw.backward(gmid, x, w0, [1, 1], _same(w0, dilation0), list(dilation0), list(output_mask[:3]))
    else:
        gx, gw0, gb0 = x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,))
    return gx, gw0, gb0, gw1, gb1
