"""Cost per iteration of M&N (METHODS.md §7) against a supervised 3D step, on CPU or GPU.

Times forward + backward + AdamW step of: `supervised` (g alone on B labeled crops, L_l), `stage1` (g and f both on the
labeled crops), `stage2_f` (g in eval gives P on b_u rows without gradient, f learns on b_l + b_u rows) and
`stage2_g` (f in eval gives P, g learns), with b_u = B/2 (mid stage 2). g is a PlainConvUNet like nnU-Net's 3D plans
network for the patch (4 stages, 32..256 channels, deep supervision off); f is the default LoRA-TinyViT with
LiteMedSAM's weights at the slice side. Prints median seconds per iteration over `--steps` after 2 warm-up steps and
each case's ratio to `supervised` (same run). `--clock process` times the process's CPU time instead of the wall
clock (with `--threads 1`, a measure that other jobs on a shared machine do not inflate).

    python benchmarks/bench_mn_iteration.py --patch 16 32 32 --batch 2 --steps 5
    python benchmarks/bench_mn_iteration.py --patch 24 48 48 --threads 1 --clock process   # synthetic-3d-mn's plans
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_semisam.losses.mn import mn_labeled_loss, mn_unlabeled_loss
from nnunet_semisam.networks.mn_lora2d import build_mn_2d_model
from nnunet_semisam.networks.slices import apply_slicewise


def build_g(channels: int, classes: int) -> torch.nn.Module:
    return PlainConvUNet(channels, 4, (32, 64, 128, 256), torch.nn.Conv3d, 3, (1, 2, 2, 2), (2, 2, 2, 2), classes,
                         (2, 2, 2), conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5,
                         "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                         deep_supervision=False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, nargs=3, default=(16, 32, 32))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.manual_seed(0)
    dev = torch.device(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = build_mn_2d_model(2, args.patch[1:], None, dev)
    g = build_g(args.channels, 2).to(dev)
    opt_f = torch.optim.AdamW([p for p in f.parameters() if p.requires_grad], 1e-3, weight_decay=0.01)
    opt_g = torch.optim.AdamW(g.parameters(), 1e-4, weight_decay=0.01)
    B, b_u = args.batch, args.batch // 2
    x = torch.randn(B, args.channels, *args.patch, device=dev)
    xu = torch.randn(B, args.channels, *args.patch, device=dev)
    y = (torch.rand(B, 1, *args.patch, device=dev) > 0.7).long()

    def teacher(model, inp, two_d):
        model.eval()
        with torch.no_grad():
            p = torch.softmax(apply_slicewise(model, inp) if two_d else model(inp), 1)
        model.train()
        return p

    def supervised():
        opt_g.zero_grad()
        mn_labeled_loss(g(x), y).backward()
        opt_g.step()

    def stage1():
        opt_g.zero_grad(), opt_f.zero_grad()
        (mn_labeled_loss(g(x), y) + mn_labeled_loss(apply_slicewise(f, x), y)).backward()
        opt_g.step(), opt_f.step()

    def stage2(learner: str):
        b_l = B - b_u
        inp = torch.cat([x[:b_l], xu[:b_u]])
        p = teacher(g, xu[:b_u], False) if learner == "f" else teacher(f, xu[:b_u], True)
        opt = opt_f if learner == "f" else opt_g
        opt.zero_grad()
        z = apply_slicewise(f, inp) if learner == "f" else g(inp)
        (b_l / B * mn_labeled_loss(z[:b_l], y[:b_l]) + b_u / B * mn_unlabeled_loss(z[b_l:], p)).backward()
        opt.step()

    cases = {"supervised": supervised, "stage1": stage1, "stage2_f": lambda: stage2("f"),
             "stage2_g": lambda: stage2("g")}
    print(f"patch {tuple(args.patch)}, B {B}, b_u {b_u}, device {dev}, torch threads {torch.get_num_threads()}, "
          f"{args.clock} clock, load {os.getloadavg()[0]:.1f}")
    medians = {}
    for name, fn in cases.items():
        times = []
        for i in range(args.steps + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(clock() - t0)
        medians[name] = statistics.median(times)
        print(f"{name:10s} {medians[name]:.3f} s/iteration (median of {len(times)}), "
              f"x{medians[name] / medians['supervised']:.2f} the supervised step", flush=True)


if __name__ == "__main__":
    main()
