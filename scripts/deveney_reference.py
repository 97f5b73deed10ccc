"""Deveney et al. (2025), teojd/ODESDEGap, on the PyTorch side: convert the released
checkpoints to safetensors, and train the paper's own loop to compare with the crate.

    python scripts/deveney_reference.py convert CHECKPOINTS_DIR OUT_DIR
        Every `{data}/w{w}/{data}_net__FP_weight_{w}__iteration_100000` under
        CHECKPOINTS_DIR (the repository's `checkpoints/`, pickled `models.Net` modules)
        becomes OUT_DIR/released_{data}_w{w}.safetensors in the paper's layout:
        `input|hidden1|hidden2|output.{weight,bias}`, f32, torch Linear [out, in],
        input [t, x]. `MlpPotential` reads it with `scoresde::train::deveney_names()`.

    python scripts/deveney_reference.py train --data checker --w 0 --steps 100000 \
            --out out/torch_ref/checker_w0.0 [--recipe oupinn|loop] [--scale 0.1] [--seed 0]
        The paper's joint training, copied line for line except for numpy (torch draws
        the same distributions): DSM of diffusion_utils.denoising_loss + w *
        pinn_utils.pinn_loss. `--recipe oupinn` (default) is OUPINN.py: Adam at lr 1e-3
        throughout, 19,980 * scale DSM samples, boundary weight 1. `--recipe loop` is
        OUPINN_loop.py, which trained the released networks: 200,000 * scale DSM samples,
        boundary weight 0, and a fresh Adam at lr 1e-3 for 25,000 steps, 1e-4 for 65,000
        and 1e-5 for 10,000. `--scale 0.1` is the paper's CPU setting (interior points
        5,000, boundary points 1,000 per face); 1.0 its GPU setting. Writes
        OUT.step{N}.safetensors every --save-every steps.

Needs torch and safetensors (`pip install torch safetensors numpy`).
"""

import argparse
import math
import os
import sys
import types

import torch
import torch.nn as nn
from torch.autograd import grad


class Net(nn.Module):
    """models.Net of the paper's repository (potential=True, n_nodes=80)."""

    def __init__(self, potential=True, n_nodes=80):
        super().__init__()
        self.n_out = 1 if potential else 2
        self.input = nn.Linear(3, n_nodes)
        self.hidden1 = nn.Linear(n_nodes, n_nodes)
        self.hidden2 = nn.Linear(n_nodes, n_nodes)
        self.output = nn.Linear(n_nodes, self.n_out)
        self.activation = nn.Softplus(100)

    def score(self, x, t=None):
        x = x.requires_grad_()
        out = self.forward_log(x, t)
        return grad(out, x, grad_outputs=torch.ones_like(out), create_graph=True)[0]

    def forward_log(self, x, t=None):
        if t is None:
            t = x[:, 0].reshape([-1, 1])
            x = x[:, 1:].reshape([-1, 2])
        h = torch.cat([t, x], 1)
        h = self.activation(self.input(h))
        h = self.activation(self.hidden1(h))
        h = self.activation(self.hidden2(h))
        return self.output(h)


LAYERS = ["input", "hidden1", "hidden2", "output"]


def save(net, path):
    from safetensors.torch import save_file

    tensors = {
        f"{layer}.{part}": getattr(getattr(net, layer), part).detach().float().contiguous()
        for layer in LAYERS
        for part in ["weight", "bias"]
    }
    save_file(tensors, path)


def convert(src, dst):
    # The pickles name the class `models.Net`: serve it from here.
    models = types.ModuleType("models")
    models.Net = Net
    sys.modules["models"] = models
    os.makedirs(dst, exist_ok=True)
    for data in ["checker", "circles2", "blob"]:
        for w in ["0.0", "0.1", "1.0", "10.0"]:
            path = os.path.join(src, data, f"w{w}", f"{data}_net__FP_weight_{w}__iteration_100000")
            if not os.path.exists(path):
                print(f"missing {path}", file=sys.stderr)
                continue
            net = torch.load(path, map_location="cpu", weights_only=False)
            out = os.path.join(dst, f"released_{data}_w{w}.safetensors")
            save(net, out)
            print(out)


# data_dists.py, with torch's generator instead of numpy's.
BLOB_MEANS = torch.tensor(
    [[2.0, -2.0], [-2.0, 2.0], [2.0, 2.0], [-2.0, -2.0], [0.0, 0.0], [4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]]
)


def sample_data(name, n):
    if name == "checker":
        m = n // 8
        xy0 = torch.rand(m, 2) * 0.25 - 0.5
        shifts = [[0.0, 0.0], [0.5, 0], [0.25, 0.25], [0.75, 0.25], [0, 0.5], [0.5, 0.5], [0.25, 0.75], [0.75, 0.75]]
        return torch.cat([xy0 + torch.tensor(s) for s in shifts]) * 6
    if name == "circles2":
        n = round(n / 2)
        r1 = torch.randn(n, 1) * 0.1 + 0.65
        r2 = torch.randn(n, 1) * 0.1 + 1.4
        theta = torch.rand(n, 1) * 2 * math.pi
        inner = torch.cat([r1 * torch.cos(theta), r1 * torch.sin(theta)], 1)
        outer = torch.cat([r2 * torch.cos(theta), r2 * torch.sin(theta)], 1)
        return 2 * torch.cat([inner, outer])
    if name == "blob":
        per = n // 9 + 1
        x = torch.cat([m + math.sqrt(0.2) * torch.randn(per, 2) for m in BLOB_MEANS]) * 0.65
        return x[torch.randperm(x.shape[0])][:n]
    raise ValueError(name)


class State:
    def __init__(self, data, scale, recipe):
        self.eps = 0.00001
        self.tlim = [self.eps, 10.0]
        half = 5.5 if data == "blob" else 3.5
        self.xlim = [-half, half]
        self.ylim = [-half, half]
        self.n_x = int(50000 * scale)
        self.n_b = int(10000 * scale)
        self.n_denoise = int((200000 if recipe == "loop" else 19980) * scale)
        self.w_b = 0.0 if recipe == "loop" else 1.0
        self.data = data
        self.net = Net()


def denoising_loss(s):
    x0 = sample_data(s.data, s.n_denoise)
    t = torch.distributions.Beta(1.0, 2.0).sample([x0.shape[0], 1]) * s.tlim[1] + s.tlim[0]
    mean = x0 * torch.exp(-t)
    var = 0.5 * (1 - torch.exp(-2 * t))
    xt = (mean + var.sqrt() * torch.randn_like(mean)).requires_grad_()
    kernel_score = -(xt - mean) / var  # grad of MultivariateNormal.log_prob, as the paper takes it
    score = s.net.score(xt, t)
    return torch.mean((score - kernel_score) ** 2)


def pinn_loss(s):
    def uniform(lim, n):
        return torch.rand(n, 1) * (lim[1] - lim[0]) + lim[0]

    tt = uniform(s.tlim, s.n_x).requires_grad_()
    xx = uniform(s.xlim, s.n_x).requires_grad_()
    yy = uniform(s.ylim, s.n_x).requires_grad_()
    faces = []
    for axis, value in [(1, s.ylim[0]), (1, s.ylim[1]), (0, s.xlim[0]), (0, s.xlim[1])]:
        free = uniform(s.xlim, s.n_b)
        fixed = value * torch.ones_like(free)
        xy = [free, fixed] if axis == 1 else [fixed, free]
        faces.append(torch.cat([uniform(s.tlim, s.n_b)] + xy, 1))
    u = s.net.forward_log(torch.cat([tt, xx, yy], 1))
    ub = s.net.forward_log(torch.cat(faces, 0))
    ones = torch.ones_like(u)
    u_t = grad(u, tt, ones, create_graph=True)[0]
    u_x = grad(u, xx, ones, create_graph=True)[0]
    u_xx = grad(u_x, xx, ones, create_graph=True)[0]
    u_y = grad(u, yy, ones, create_graph=True)[0]
    u_yy = grad(u_y, yy, ones, create_graph=True)[0]
    res = torch.mean((u_t - 2 - xx * u_x - yy * u_y - 0.5 * u_x**2 - 0.5 * u_y**2 - 0.5 * (u_xx + u_yy)) ** 2)
    bc = torch.mean(torch.exp(ub) ** 2)
    return res + s.w_b * bc, res, bc


def train(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    s = State(args.data, args.scale, args.recipe)
    # OUPINN_loop.py's phases (a fresh Adam each), or OUPINN.py's one rate.
    phases = {1e-3: 25000, 1e-4: 65000, 1e-5: 10000} if args.recipe == "loop" else {1e-3: args.steps}
    starts = {}
    first = 1
    for lr, n in phases.items():
        starts[first] = lr
        first += n
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for i in range(1, args.steps + 1):
        if i in starts:
            opt = torch.optim.Adam(s.net.parameters(), lr=starts[i])
        opt.zero_grad()
        loss_dsm = denoising_loss(s)
        loss = loss_dsm
        if args.w > 0:
            pinn, res, bc = pinn_loss(s)
            loss = loss + args.w * pinn
        loss.backward()
        opt.step()
        if i % 1000 == 0:
            print(f"step {i} dsm {loss_dsm.item():.4f} loss {loss.item():.4f}", flush=True)
        if i % args.save_every == 0 or i == args.steps:
            save(s.net, f"{args.out}.step{i}.safetensors")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("src")
    c.add_argument("dst")
    t = sub.add_parser("train")
    t.add_argument("--data", default="checker")
    t.add_argument("--w", type=float, default=0.0)
    t.add_argument("--steps", type=int, default=100000)
    t.add_argument("--scale", type=float, default=0.1)
    t.add_argument("--recipe", choices=["oupinn", "loop"], default="oupinn")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--save-every", type=int, default=10000)
    t.add_argument("--out", required=True)
    args = p.parse_args()
    if args.cmd == "convert":
        convert(args.src, args.dst)
    else:
        train(args)


if __name__ == "__main__":
    main()
