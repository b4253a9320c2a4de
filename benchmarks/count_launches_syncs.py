"""Launches and host syncs per optimizer step on the CIFAR-10 net, counted on the CPU with the
tests' guarded namespace (a stand-in for a GPU run).  Run: PYTHONPATH=. python benchmarks/count_launches_syncs.py"""
import sys; sys.path.insert(0,'tests')
import numpy as np
from guarded_xp import asguarded, counting
from kfc_ref.nn.models import cifar10_convnet
from kfc_ref.optim import make_optimizer
net = cifar10_convnet()
params = [None if p is None else asguarded(p) for p in net.init(0, "float32")]
rng = np.random.default_rng(0)
x = asguarded(rng.normal(size=(8, 3, 32, 32)).astype(np.float32)); y = asguarded(rng.integers(0, 10, 8))
for name, kw in [("sgd", {"lr": 0.01}), ("kfc-pre", {"lr": 0.001}), ("kfac", {})]:
    opt = make_optimizer(name, **kw)
    st = opt.init_state(net, params)
    p = params
    res=[]
    for k in range(12):
        with counting() as c:
            p, st, info = opt.step(st, net, p, (x, y), rng)
        res.append((c.launches, c.syncs))
    print(name, res)
