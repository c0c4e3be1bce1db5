"""Benchmark: CPU selective scans (numba kernel, chunked PyTorch) vs the sequential recurrence; Tiny-MUNet vs nnU-Net's
2D PlainConvUNet on CPU.

Prints the machine's load average first (the figures are only comparable on a quiet machine), then, measured side
by side in one run (interleaved repeats, median):
(a) the compiled CPU kernel `selective_scan_numba` and `selective_scan_chunked` vs `selective_scan_sequential`
    (mamba_ssm's selective_scan_ref) at L = 4,096 (Tiny-MUNet's F1 grid, 64x64, both directions, d_inner 128) and
    L = 65,536 (a 256x256 map, both directions, d_inner 64): forward time and speed-ups; forward + backward of all
    three at L = 1,024 (the reference's backward grows as L^2: at L = 4,096 it takes minutes) and of numba vs
    chunked at L = 4,096 and 65,536.
(d) the numba kernel's first-call time in a fresh process with an empty on-disk cache (compilation of forward and
    backward) and in a second process reusing that cache (NUMBA_CACHE_DIR set to a temporary folder for both).
(b) the paper Tiny-MUNet vs the PlainConvUNet that nnU-Net's default ExperimentPlanner plans for a synthetic 256x256
    RGB dataset (both networks built from real plans files written in a temporary nnU-Net folder): inference
    images/s (eval, no_grad, batch 1 and 4; Tiny-MUNet's scan on the default CPU backend, numba), one training step
    (forward + backward, batch 2) and the peak memory of one inference (batch 1) / one training step
    (batch 2), each in a fresh process: the peak of the resident set size sampled during the pass minus the RSS
    before it (activations and workspaces; weights and libraries excluded).
(c) the scan's hand-written backward (`_SelectiveScanFn`) vs autograd through the chunked steps (`_scan_autograd`,
    checkpointed as the previous implementation trained, and plain), forward + backward at Tiny-MUNet's training
    shapes (both directions of 64x64 and 256x256 inputs), and a paper Tiny-MUNet training step (256x256, batch 2)
    with each.

Usage: python benchmarks/bench_tiny_munet.py [--threads 1] [--repeats 5] [--json out.json] [--skip-memory]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time


_CLOCK = time.perf_counter  # --clock process: CPU seconds of this process (all its threads), robust to a loaded machine


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = _CLOCK()
        fn()
        times.append(_CLOCK() - t)
    return statistics.median(times)


def bench_scan(repeats: int, lengths=(1024, 4096, 65536)) -> list[dict]:
    import torch

    from nnunet_semisam.networks.mamba import selective_scan_chunked, selective_scan_numba, selective_scan_sequential

    rows = []
    for L, b, d, with_backward in ((1024, 2, 128, True), (4096, 2, 128, False), (65536, 2, 64, False)):
        if L not in lengths:
            continue
        g = torch.Generator().manual_seed(0)
        n = 16
        x = dict(u=torch.randn(b, d, L, generator=g), delta=torch.randn(b, d, L, generator=g) * 0.5,
                 A=-torch.rand(d, n, generator=g) * 4, B=torch.randn(b, n, L, generator=g),
                 C=torch.randn(b, n, L, generator=g), D=torch.randn(d, generator=g),
                 z=torch.randn(b, d, L, generator=g), delta_bias=torch.randn(d, generator=g) * 0.1)
        with torch.no_grad():
            ref = selective_scan_sequential(**x, delta_softplus=True)
            out = selective_scan_chunked(**x, delta_softplus=True)
            out_nb = selective_scan_numba(**x, delta_softplus=True)  # also compiles (or loads from the cache)
            rel = ((out - ref).abs().max() / ref.abs().max()).item()
            rel_nb = ((out_nb - ref).abs().max() / ref.abs().max()).item()
            t_seq, t_chk, t_nb = [], [], []
            for _ in range(max(1, repeats if L <= 4096 else 2)):  # interleaved
                t_seq.append(_median_time(lambda: selective_scan_sequential(**x, delta_softplus=True), 1))
                t_chk.append(_median_time(lambda: selective_scan_chunked(**x, delta_softplus=True), 1))
                t_nb.append(_median_time(lambda: selective_scan_numba(**x, delta_softplus=True), 1))
        row = dict(L=L, b=b, d_inner=d, d_state=n, seq_fwd_s=statistics.median(t_seq),
                   chunked_fwd_s=statistics.median(t_chk), numba_fwd_s=statistics.median(t_nb), max_rel_err=rel,
                   numba_max_rel_err=rel_nb)
        row["speedup_fwd"] = row["seq_fwd_s"] / row["chunked_fwd_s"]
        row["numba_speedup_fwd"] = row["seq_fwd_s"] / row["numba_fwd_s"]
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}

        def fwd_bwd(fn):
            fn(**leaves, delta_softplus=True).square().sum().backward()

        if with_backward:
            row["seq_fwd_bwd_s"] = _median_time(lambda: fwd_bwd(selective_scan_sequential), 1)
        if L == min(lengths):  # the kernels' first backward (compilation or cache load) outside the timed calls
            fwd_bwd(selective_scan_chunked)
            fwd_bwd(selective_scan_numba)
        t_chk, t_nb = [], []
        for _ in range(max(1, repeats // 2 if L <= 4096 else 1)):  # interleaved
            t_chk.append(_median_time(lambda: fwd_bwd(selective_scan_chunked), 1))
            t_nb.append(_median_time(lambda: fwd_bwd(selective_scan_numba), 1))
        row["chunked_fwd_bwd_s"], row["numba_fwd_bwd_s"] = statistics.median(t_chk), statistics.median(t_nb)
        if with_backward:
            row["speedup_fwd_bwd"] = row["seq_fwd_bwd_s"] / row["chunked_fwd_bwd_s"]
            row["numba_speedup_fwd_bwd"] = row["seq_fwd_bwd_s"] / row["numba_fwd_bwd_s"]
        rows.append(row)
    return rows


class _AutogradScan:
    """Stand-in for `mamba._SelectiveScanFn` in (c): the autograd scan, checkpointed (the previous training path)."""

    @staticmethod
    def apply(*args):
        from torch.utils.checkpoint import checkpoint

        from nnunet_semisam.networks.mamba import chunked as mamba

        return checkpoint(mamba._scan_autograd, *args, use_reentrant=False)


def bench_backward(repeats: int) -> dict:
    import torch
    from torch.utils.checkpoint import checkpoint

    from nnunet_semisam.networks.mamba import chunked as mamba
    from nnunet_semisam.networks.tiny_munet import paper_tiny_munet

    rows = []
    for b, d, L in ((8, 128, 256), (8, 192, 64), (4, 128, 4096), (4, 192, 1024)):
        g = torch.Generator().manual_seed(0)
        args = [torch.rand(b, d, L, generator=g) * 0.5, torch.randn(b, d, L, generator=g),
                -torch.rand(d, 16, generator=g) * 4 - 0.05, torch.randn(b, 16, L, generator=g),
                torch.randn(b, 16, L, generator=g)]
        for a in args:
            a.requires_grad_()
        runs = {"hand": lambda: mamba._SelectiveScanFn.apply(*args, None)[0].sum().backward(),
                "autograd_ckpt": lambda: checkpoint(mamba._scan_autograd, *args, None,
                                                    use_reentrant=False)[0].sum().backward(),
                "autograd": lambda: mamba._scan_autograd(*args, None)[0].sum().backward()}
        times = {k: [] for k in runs}
        for _ in range(repeats):  # interleaved
            for k, fn in runs.items():
                times[k].append(_median_time(fn, 1))
        rows.append(dict(b=b, d_inner=d, L=L, **{f"{k}_s": statistics.median(v) for k, v in times.items()}))
    torch.manual_seed(0)
    net = paper_tiny_munet().train()
    x = torch.randn(2, 3, 256, 256)
    step = lambda: net(x).square().mean().backward()  # noqa: E731
    fn = mamba._SelectiveScanFn
    times = {"hand": [], "autograd_ckpt": []}
    os.environ["NNUNET_SEMISAM_SCAN_BACKEND"] = "pytorch"  # (c) compares the pure-PyTorch scan's two backwards
    try:
        for _ in range(max(1, repeats // 2)):
            for k in times:
                mamba._SelectiveScanFn = fn if k == "hand" else _AutogradScan
                times[k].append(_median_time(step, 1))
    finally:
        mamba._SelectiveScanFn = fn
        del os.environ["NNUNET_SEMISAM_SCAN_BACKEND"]
    return {"scan": rows, "train_step": {f"{k}_s": statistics.median(v) for k, v in times.items()}}


_COMPILE_CHILD = """
import time
t0 = time.perf_counter()
import torch
from nnunet_semisam.networks.mamba import selective_scan_numba
t1 = time.perf_counter()
x = [torch.randn(1, 4, 100), torch.rand(1, 4, 100), -torch.rand(4, 8), torch.randn(1, 8, 100), torch.randn(1, 8, 100)]
for t in x:
    t.requires_grad_()
selective_scan_numba(*x, delta_softplus=True).sum().backward()
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def bench_compile() -> dict:
    """First call of the numba kernel (forward + backward) in a fresh process: empty cache, then cached."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="bench_numba_cache_") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", _COMPILE_CHILD], env=env, check=True, capture_output=True,
                                 text=True).stdout.split()
            runs.append((float(out[-2]), float(out[-1])))
    return dict(import_s=runs[0][0], first_call_compile_s=runs[0][1], cached_import_s=runs[1][0],
                first_call_cached_s=runs[1][1])


def plan_networks(workdir: str) -> dict:
    """Synthetic 256x256 RGB dataset -> fingerprint -> nnU-Net's ExperimentPlanner and TinyMUNetPlanner (2d)."""
    for k in ("raw", "preprocessed", "results"):
        os.makedirs(os.path.join(workdir, k), exist_ok=True)
    os.environ.update(nnUNet_raw=os.path.join(workdir, "raw"),
                      nnUNet_preprocessed=os.path.join(workdir, "preprocessed"),
                      nnUNet_results=os.path.join(workdir, "results"), nnUNet_n_proc_DA="1")
    from nnunet_semisam.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(os.environ["nnUNet_raw"], 990, kind="2d-rgb", num_labeled=4, num_unlabeled=0, num_test=0,
                           shape=(256, 256), seed=0, progress=False)
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset)

    from nnunet_semisam.planners.tiny_munet import TinyMUNetPlanner

    specs = {}
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's planners print the whole plan
        extract_fingerprint_dataset(990, num_processes=1, verbose=False, show_progress_bar=False)
        planned = {key: plan_experiment_dataset(990, planner)[0]
                   for key, planner in (("PlainConvUNet", ExperimentPlanner), ("TinyMUNet", TinyMUNetPlanner))}
    for key, plans in planned.items():
        arch = plans["configurations"]["2d"]["architecture"]
        specs[key] = dict(cls=arch["network_class_name"], kwargs=arch["arch_kwargs"],
                          imports=list(arch["_kw_requires_import"]), patch=plans["configurations"]["2d"]["patch_size"])
    return specs


def _build(spec: dict):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(spec["cls"], spec["kwargs"], spec["imports"], 3, 2, allow_init=True,
                                  deep_supervision=False)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_memory_child(spec: dict, mode: str, threads: int, queue) -> None:
    import threading

    import torch

    try:
        torch.set_num_threads(threads)
        net = _build(spec)
        x = torch.randn(1 if mode == "inference" else 2, 3, 256, 256)
        warm = x[:, :, :128, :128]  # load kernels / allocate workspace outside the measured pass
        if mode == "inference":
            net.eval()
            torch.set_grad_enabled(False)
            run = lambda: net(x)  # noqa: E731
        else:
            net.train()
            run = lambda: net(x).square().mean().backward()  # noqa: E731
        (net(warm).sum().backward() if mode == "train" else net(warm))
        net.zero_grad(set_to_none=False)
        before, peak, done = _rss_mb(), [0.0], threading.Event()

        def sample() -> None:  # RSS sampled every ~0.5 ms during the measured pass only
            while not done.is_set():
                peak[0] = max(peak[0], _rss_mb())
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        run()
        done.set()
        sampler.join()
        queue.put(max(peak[0], _rss_mb()) - before)
    except BaseException as e:  # report instead of leaving the parent waiting
        queue.put(f"{type(e).__name__}: {e}")


def peak_memory_mb(spec: dict, mode: str, threads: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_peak_memory_child, args=(spec, mode, threads, queue))
    p.start()
    value = queue.get(timeout=1800)
    p.join()
    if isinstance(value, str):
        raise RuntimeError(f"peak-memory child ({mode}) failed: {value}")
    return value


def bench_networks(specs: dict, repeats: int, threads: int, memory: bool = True) -> dict:
    import torch

    from nnunet_semisam.networks.complexity import network_complexity

    nets = {k: _build(s).eval() for k, s in specs.items()}
    result = {}
    for key, net in nets.items():
        c = network_complexity(net, 3, (256, 256))
        result[key] = dict(parameters=c["parameters"], gmacs=c["gmacs"], gmacs_scan=c["gmacs_scan"],
                           planned_patch=specs[key]["patch"])
    with torch.no_grad():
        for batch in (1, 4):
            x = torch.randn(batch, 3, 256, 256)
            for net in nets.values():
                net(x)  # warm-up
            times = {k: [] for k in nets}
            for _ in range(repeats):  # interleaved, so both see the same machine load
                for key, net in nets.items():
                    times[key].append(_median_time(lambda: net(x), 1))
            for key in nets:
                result[key][f"images_per_s_batch{batch}"] = batch / statistics.median(times[key])
    x = torch.randn(2, 3, 256, 256)
    steps = {k: [] for k in nets}
    for net in nets.values():
        net.train()
        net(x[:, :, :128, :128]).square().mean().backward()  # warm-up
    for _ in range(max(1, repeats // 2)):  # interleaved
        for key, net in nets.items():
            steps[key].append(_median_time(lambda: net(x).square().mean().backward(), 1))
    for key in nets:
        result[key]["train_step_b2_s"] = statistics.median(steps[key])
    for key, spec in specs.items():
        if not memory:
            break
        result[key]["peak_mem_inference_mb"] = peak_memory_mb(spec, "inference", threads)
        result[key]["peak_mem_train_step_b2_mb"] = peak_memory_mb(spec, "train", threads)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--skip-scan", action="store_true", help="skip part (a)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 65536], choices=[1024, 4096, 65536],
                        help="part (a): sequence lengths to measure (default: all)")
    parser.add_argument("--skip-networks", action="store_true", help="skip part (b)")
    parser.add_argument("--skip-backward", action="store_true", help="skip part (c)")
    parser.add_argument("--skip-compile", action="store_true", help="skip part (d)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall-clock time, or the process's CPU time (with --threads 1 a measure of the work that "
                             "other jobs on a shared machine do not inflate; part (d) is always wall time)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory processes of part (b)")
    args = parser.parse_args(argv)

    import torch

    global _CLOCK
    _CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(args.threads)
    results = {"clock": args.clock, "threads": args.threads, "torch": torch.__version__, "cpus": os.cpu_count(),
               "load_average_start": os.getloadavg()}
    print(f"clock: {args.clock} time; threads {args.threads}, {os.cpu_count()} CPUs, load average at start "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} (1, 5, 15 min)", flush=True)
    if not args.skip_scan:
        results["scan"] = bench_scan(args.repeats, args.lengths)
        print("(a) selective scan, float32, CPU: sequential reference vs chunked PyTorch vs numba kernel")
        for r in results["scan"]:
            line = (f"  L={r['L']:>6} b={r['b']} d_inner={r['d_inner']} N={r['d_state']}: forward sequential "
                    f"{r['seq_fwd_s'] * 1e3:8.1f} ms, chunked {r['chunked_fwd_s'] * 1e3:7.1f} ms "
                    f"({r['speedup_fwd']:.1f}x), numba {r['numba_fwd_s'] * 1e3:7.1f} ms "
                    f"({r['numba_speedup_fwd']:.1f}x; "
                    f"x{r['chunked_fwd_s'] / r['numba_fwd_s']:.1f} vs chunked) (max rel. err chunked "
                    f"{r['max_rel_err']:.1e}, numba {r['numba_max_rel_err']:.1e})")
            line += (f"\n{'':10}fwd+bwd: chunked {r['chunked_fwd_bwd_s'] * 1e3:.0f} ms, numba "
                     f"{r['numba_fwd_bwd_s'] * 1e3:.0f} ms (x{r['chunked_fwd_bwd_s'] / r['numba_fwd_bwd_s']:.1f})")
            if "speedup_fwd_bwd" in r:
                line += (f", sequential {r['seq_fwd_bwd_s'] * 1e3:.0f} ms -> chunked {r['speedup_fwd_bwd']:.1f}x, "
                         f"numba {r['numba_speedup_fwd_bwd']:.1f}x")
            print(line, flush=True)
    if not args.skip_networks:
        with tempfile.TemporaryDirectory(prefix="bench_tiny_munet_") as workdir:
            specs = plan_networks(workdir)
            nets = bench_networks(specs, args.repeats, args.threads, memory=not args.skip_memory)
        results["networks"] = nets
        t, p = nets["TinyMUNet"], nets["PlainConvUNet"]
        from nnunet_semisam.networks.mamba import mamba_backend

        print(f"(b) 256x256 RGB, 2 classes, CPU inference (eval, no_grad) and training step (batch 2); Tiny-MUNet's "
              f"scan backend: {mamba_backend(torch.zeros(1))}")
        for key, r in nets.items():
            mem = (f" | peak +{r['peak_mem_inference_mb']:.0f} MB inference, +{r['peak_mem_train_step_b2_mb']:.0f} MB "
                   f"train step (b=2)" if "peak_mem_inference_mb" in r else "")
            print(f"  {key:14s} {r['parameters'] / 1e6:7.2f} M params {r['gmacs']:7.2f} GMACs | "
                  f"{r['images_per_s_batch1']:6.2f} img/s (batch 1) {r['images_per_s_batch4']:6.2f} img/s (batch 4) | "
                  f"train step {r['train_step_b2_s'] * 1e3:.0f} ms{mem}")
        line = (f"  ratio TinyMUNet / PlainConvUNet: speed x{t['images_per_s_batch1'] / p['images_per_s_batch1']:.2f} "
                f"(batch 1), x{t['images_per_s_batch4'] / p['images_per_s_batch4']:.2f} (batch 4), training step "
                f"x{p['train_step_b2_s'] / t['train_step_b2_s']:.2f}")
        if "peak_mem_inference_mb" in t:
            line += (f"; peak memory x{t['peak_mem_inference_mb'] / p['peak_mem_inference_mb']:.2f} (inference), "
                     f"x{t['peak_mem_train_step_b2_mb'] / p['peak_mem_train_step_b2_mb']:.2f} (train step)")
        print(line, flush=True)
    if not args.skip_backward:
        results["backward"] = bw = bench_backward(args.repeats)
        print("(c) scan forward + backward: hand-written backward vs autograd through the chunked steps")
        for r in bw["scan"]:
            print(f"  b={r['b']} d_inner={r['d_inner']} L={r['L']:>5}: hand-written {r['hand_s'] * 1e3:7.1f} ms, "
                  f"autograd + checkpoint {r['autograd_ckpt_s'] * 1e3:7.1f} ms "
                  f"(x{r['autograd_ckpt_s'] / r['hand_s']:.2f}), "
                  f"autograd {r['autograd_s'] * 1e3:7.1f} ms (x{r['autograd_s'] / r['hand_s']:.2f})")
        ts = bw["train_step"]
        print(f"  paper Tiny-MUNet training step (256x256, batch 2): hand-written {ts['hand_s'] * 1e3:.0f} ms, "
              f"autograd + checkpoint {ts['autograd_ckpt_s'] * 1e3:.0f} ms "
              f"(x{ts['autograd_ckpt_s'] / ts['hand_s']:.2f})",
              flush=True)
    if not args.skip_compile:
        results["compile"] = c = bench_compile()
        print(f"(d) numba kernel, first call (forward + backward) in a new process: {c['first_call_compile_s']:.1f} s "
              f"with an empty cache (compilation), {c['first_call_cached_s']:.2f} s from the on-disk cache "
              f"(package import {c['import_s']:.1f} s / {c['cached_import_s']:.1f} s)", flush=True)
    results["load_average_end"] = os.getloadavg()
    print(f"load average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
