"""Single-thread CPU time (time.process_time, min over reps) of each provider for deform_warp, flow_warp and
motion_gru: robust when the machine is shared, unlike wall-clock medians.

Run: python benchmarks/single_thread_warp.py [dw] [fw] [mg]
"""
import time, sys
import torch, torchvision
import vpfast
from vpfast.ops import deform_warp, deform_warp_reference, flow_warp, flow_warp_reference, motion_gru, motion_gru_reference
torch.set_num_threads(1)

def tm(f, reps):
    f()
    ts = []
    for _ in range(reps):
        t = time.process_time(); f(); ts.append(time.process_time() - t)
    return min(ts) * 1e3

def inter(off, k):
    N = k * k; B, _, H, W = off.shape
    return torch.stack([off[:, :N], off[:, N:]], 2).reshape(B, 2 * N, H, W)

which = sys.argv[1:] or ["dw", "fw", "mg"]
if "dw" in which:
  for name, (B, C, H, W), reps in [("mmnist", (16, 32, 8, 8), 30), ("large", (8, 64, 64, 64), 2)]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g); off = torch.randn(B, 18, H, W, generator=g) * 1.5
    m = torch.rand(B, 9, H, W, generator=g); w = torch.randn(C, C, 3, 3, generator=g) / (3 * C)
    provs = {"eager": deform_warp_reference,
             "torchvision": lambda x, o, m, w: torchvision.ops.deform_conv2d(x, inter(o, 3), w, padding=1, mask=m),
             "cpp": lambda *a: deform_warp(*a, backend="cpp")}
    res = {}
    for p, f in provs.items():
        with torch.no_grad():
            tf = tm(lambda: f(x, off, m, w), reps)
        ins = [t.clone().requires_grad_() for t in (x, off, m, w)]
        go = torch.ones(B, C, H, W)
        tb = tm(lambda: f(*ins).backward(go), reps)
        res[p] = (tf, tb)
        print(f"deform_warp {name} {p:12s} fwd {tf:9.2f} ms  fwd+bwd {tb:9.2f} ms", flush=True)
    for p in ("eager", "torchvision"):
        print(f"  cpp speed-up vs {p}: fwd {res[p][0]/res['cpp'][0]:.2f}x  fwd+bwd {res[p][1]/res['cpp'][1]:.2f}x")
if "fw" in which:
  B, C, H, W = 16, 64, 64, 64
  g = torch.Generator().manual_seed(0)
  x = torch.randn(B, C, H, W, generator=g); fl = torch.randn(B, 2, H, W, generator=g) * 3
  for pm in ("zeros", "border"):
    res = {}
    for p, f in {"eager": lambda x, f: flow_warp_reference(x, f, pm), "cpp": lambda x, f: flow_warp(x, f, pm, backend="cpp")}.items():
        with torch.no_grad():
            tf = tm(lambda: f(x, fl), 5)
        xi, fi = x.clone().requires_grad_(), fl.clone().requires_grad_()
        go = torch.ones(B, C, H, W)
        tb = tm(lambda: f(xi, fi).backward(go), 5)
        res[p] = (tf, tb)
        gb = (2 * x.numel() + fl.numel()) * 4 / 1e9
        print(f"flow_warp {pm} {p:6s} fwd {tf:8.2f} ms ({gb/tf*1e3:5.1f} GB/s)  fwd+bwd {tb:8.2f} ms", flush=True)
    print(f"  cpp speed-up vs grid+grid_sample: fwd {res['eager'][0]/res['cpp'][0]:.2f}x  fwd+bwd {res['eager'][1]/res['cpp'][1]:.2f}x")
if "mg" in which:
  for name, (B, Cin, M, H, W), reps in [("mmnist", (16, 16, 18, 8, 8), 30), ("large", (8, 16, 18, 32, 32), 5)]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s, sc=1.0: torch.randn(*s, generator=g) * sc
    ins = [r(B, Cin, H, W), r(B, M, H, W), r(B, M, H, W)]
    for _ in range(3):
        ins += [r(M, Cin + M, 3, 3, sc=0.05), r(M, sc=0.1)]
    res = {}
    for p, f in {"eager": motion_gru_reference, "cpp": lambda *a: motion_gru(*a, backend="cpp")}.items():
        with torch.no_grad():
            tf = tm(lambda: f(*ins), reps)
        gi = [t.clone().requires_grad_() for t in ins]
        def fb():
            a, b = f(*gi); (a.sum() + b.sum()).backward()
        tb = tm(fb, reps)
        res[p] = (tf, tb)
        print(f"motion_gru {name} {p:6s} fwd {tf:8.3f} ms  fwd+bwd {tb:8.3f} ms", flush=True)
    print(f"  cpp speed-up: fwd {res['eager'][0]/res['cpp'][0]:.2f}x  fwd+bwd {res['eager'][1]/res['cpp'][1]:.2f}x")
