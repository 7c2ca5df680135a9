"""S/2 256 (random weights) per denoiser call: AOTInductor .pt2 compiled without and with inductor ``freezing`` vs
ONNX Runtime fp32, interleaved on the same inputs (5 calls each after one warm-up; medians).

The experiment behind ``export/aoti.py``'s ``inductor_options`` (freezing on for CPU packages). Run as it was:
``OMP_WAIT_POLICY=PASSIVE python -m experiments.aoti_freezing`` (writes its packages to /tmp/aoti; output as recorded in
``bench/results/aoti_freezing_s2.txt``, with the machine and load noted there).
"""
# ruff: noqa  (the experiment script verbatim, as it ran)
import time, sys, numpy as np, torch, pathlib
from ditdeploy.export.randomize import random_model
from ditdeploy.export.aoti import compile_package
from ditdeploy.runtimes.onnxruntime import load_denoiser
net = random_model("S/2", image_size=256, seed=0).eval()
P = pathlib.Path("/tmp/aoti")
import torch._inductor.config as ic
for name, fr in (("s2-plain.pt2", False), ("s2-frozen.pt2", True)):
    if not (P/name).exists():
        ic.freezing = fr
        t0=time.time(); compile_package(net, net.config, P/name, "cpu", (1, None)); print(name, "compile", time.time()-t0, flush=True)
if not (P/"s2.onnx").exists():
    from ditdeploy.export.onnx import export_denoiser_onnx
    export_denoiser_onnx(net, P/"s2.onnx", precision="fp32", verify=False)
L = lambda p: torch._C._aoti.AOTIModelPackageLoader(str(p),"model",False,1,-1)
a, b = L(P/"s2-plain.pt2"), L(P/"s2-frozen.pt2")
ort = load_denoiser(P/"s2.onnx", verify=False)
for n in (2, 8):
    x = torch.randn(n,4,32,32); t = torch.arange(n)*100; y = torch.arange(n)%1000
    with torch.no_grad(): ref = net(x,t,y)
    xs = [x.numpy(), t.numpy(), y.numpy()]
    for _ in range(1): a.run([x,t,y]); b.run([x,t,y]); ort(*xs)
    ra, rb, ro = [], [], []
    for _ in range(5):
        s=time.perf_counter(); oa=a.run([x,t,y])[0]; ra.append(time.perf_counter()-s)
        s=time.perf_counter(); ob=b.run([x,t,y])[0]; rb.append(time.perf_counter()-s)
        s=time.perf_counter(); oo=ort(*xs); ro.append(time.perf_counter()-s)
    print(n, "ort ms %.0f plain ms %.0f frozen ms %.0f" % (np.median(ro)*1e3, np.median(ra)*1e3, np.median(rb)*1e3), "frozen rel", float((ob-ref).norm()/ref.norm()), "plain rel", float((oa-ref).norm()/ref.norm()), flush=True)
