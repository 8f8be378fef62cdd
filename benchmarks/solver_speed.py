"""Speed of the Gram-form greedy solver against the paper-style naive greedy.

What it measures
----------------
Part 1 -- same selection, two algorithms, on realistic conv sites.
    For each site a calibration matrix B (rows x d, d = C * 9) is built the way a
    pruning run sees it: smooth random "images" go through a random stem conv +
    ReLU and a random producer conv + ReLU (a few producer channels are dead),
    and the producer's output is unfolded into 3x3 patches (padding 1), so column
    group c = columns c*9 .. c*9+8 is producer channel c (channel-major, as
    ``torch.nn.functional.unfold`` lays it out). The consumer is a random 3x3 conv
    with m output channels, W = weight.reshape(m, -1).T of shape (d, m).

    * naive  -- :func:`subprune.reference.naive_greedy`: at every step, for every
      remaining channel, re-solve the least-squares refit on B itself (what the
      paper's code does). Run once.
    * Gram   -- :func:`subprune.solver.greedy_select`. "end-to-end" starts from the
      same B and includes forming G = B^T B and ||B W||_F^2 in float64; "solver"
      is the greedy alone, given G. Median of several repeats.

    Both run for the same k, printed per site. Full mode: k = 32, 32, 4 and m = 64,
    64, 512. ``--quick`` (m = 64 everywhere) runs against a wall-time budget
    (``--budget``, default 240 s): site (a) first with k = 32, then (b), part 2 and
    (c), each with its share of the time left; (b) and (c) take the largest k (up to
    32 and 2) that a cost model, calibrated on a few timed single refits, fits, so
    their k depends on the machine's load and is in the JSON (``k_65536``); on an
    overloaded machine a site whose smallest k would end more than 45 s past the
    budget is skipped (null speed-up and k in the JSON). The script asserts that
    they choose the same channels in the same order and that the objective curves
    f(S_1..S_k) agree to 1e-8. The ratio column is naive seconds / Gram end-to-end seconds. The
    naive cost grows roughly like k^3 (k steps, each with up to k groups per
    solve) and linearly in the rows; the Gram cost is one d x d product over the
    rows plus k steps that never touch the rows again.

Part 2 -- the Gram greedy alone as d grows (1k .. 16k features, groups of 16,
    m = 256, G = random rank-64 + diagonal PSD built directly, no B). Each size
    runs in a fresh subprocess so that its peak resident memory (VmHWM, which
    unlike ru_maxrss is not inherited from the parent) is its own. The full run
    is k = n/2 steps; when fewer steps are run (``--quick``; or, in full mode, when
    a 16-step probe predicts more than 600 s) the table says so and gives the
    measured time per step, (t(steps) - t(1)) / (steps - 1), and the extrapolated
    total setup + (n/2) x per-step; in ``--quick`` the largest sizes are skipped
    when their predicted time does not fit the budget. "G bytes" is the
    theoretical size of one d x d float64 matrix; "peak-base" is the measured
    growth of the process's peak RSS over its post-import baseline, and "x G"
    expresses it in units of that matrix (G itself, plus the solver's residual
    copy and temporaries).

How to read it
--------------
Everything runs on one torch thread by default (``--threads``): on a shared
2-core machine, multi-threaded OpenMP/MKL timings are dominated by
oversubscription (20x slower naive and ~90x slower Gram steps were measured with
2 threads while another process was busy). Absolute seconds still move with the
machine's load (printed at the start and end); the ratios, the identical
selections and the orders of magnitude are the result. The last line printed is
one JSON object with the headline numbers (``speedup_4096``, ``speedup_65536``,
``speedup_512ch``, ``k_4096``/``k_65536``/``k_512ch``, ``identical_selections``,
per-site details under ``sites`` and the per-d timings under ``scaling``). The
exit status is 1 when any selection or objective curve differs.

Usage::

    .venv/bin/python benchmarks/solver_speed.py --quick   # ~4 min on 2 shared cores
    .venv/bin/python benchmarks/solver_speed.py           # full: about an hour
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from subprune.reference import kept_energy, naive_greedy  # noqa: E402
from subprune.solver import greedy_select  # noqa: E402

OBJECTIVE_ATOL = 1e-8
GROUP = 9  # 3x3 kernel: one group of 9 columns per producer channel


# --------------------------------------------------------------------------- Part 1


@dataclass(frozen=True)
class Site:
    key: str  # JSON suffix
    label: str
    channels: int  # producer channels C (n groups)
    images: int
    size: int  # spatial side; rows = images * size^2
    m_full: int  # consumer output channels
    m_quick: int
    k_full: int
    k_quick: int
    repeats_full: int  # Gram timing repeats (median)
    repeats_quick: int

    @property
    def rows(self) -> int:
        return self.images * self.size**2

    @property
    def d(self) -> int:
        return self.channels * GROUP


# --quick on 2 shared cores, one thread, load average ~3: naive (a) k=32 ~40 s;
# (c) with m=64 ~18 s per naive step, and the Gram side's G = B^T B alone is ~9 s, so
# it is timed once; (b) costs ~0.15 s + 0.04 s per kept group per candidate (k=6
# ~90 s, k=32 ~25 min). --quick uses m = 64 (not 512) for the 512-channel site: with
# m = 512 the naive solver needs ~0.5 s per candidate, i.e. ~4 min per step.
# The machine's load moves all of this by 3x, so --quick runs against a time budget:
# (a) first with its fixed k, then each item of QUICK_PLAN gets its share of the
# time left at its turn; a site gets the largest k in k_min..k_quick that its
# calibrated cost model fits (k_min when nothing fits; skipped past HARD_GRACE);
# part 2 drops the largest sizes whose predicted time does not fit.
SITES = (
    Site("4096", "(a) 64ch 3x3", 64, 4, 32, 64, 64, 32, 32, repeats_full=7, repeats_quick=5),
    Site("65536", "(b) 64ch 3x3", 64, 64, 32, 64, 64, 32, 32, repeats_full=5, repeats_quick=3),
    Site("512ch", "(c) 512ch 3x3", 512, 64, 16, 512, 64, 4, 2, repeats_full=3, repeats_quick=1),
)
FULL_PLAN = ("4096", "65536", "512ch", "part2")
# --quick: (item, share of the time left at its turn, smallest k); None = fixed k.
QUICK_PLAN = (
    ("4096", None, 32),
    ("65536", 0.75, 2),
    ("part2", 0.5, 0),
    ("512ch", 1.0, 1),
)
SAFETY = 1.2  # margin on the calibrated naive-time prediction
# --quick: a budgeted site is skipped (speed-up null in the JSON) when even its
# smallest k is predicted to end later than budget + HARD_GRACE seconds.
HARD_GRACE = 45.0


def image_batch(images: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth, spatially correlated random RGB images, shape (images, 3, size, size)."""
    coarse = torch.randn(images, 3, max(size // 8, 2), max(size // 8, 2), generator=gen)
    medium = torch.randn(images, 3, max(size // 2, 2), max(size // 2, 2), generator=gen)
    img = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    img = img + 0.5 * F.interpolate(medium, size=(size, size), mode="bilinear", align_corners=False)
    img = img + 0.1 * torch.randn(images, 3, size, size, generator=gen)
    # shared luminance component: the colour channels are correlated, as in real photos
    img = 0.6 * img + 0.4 * img.mean(dim=1, keepdim=True)
    return img + 0.3 * torch.randn(images, 3, 1, 1, generator=gen)  # per-image colour cast


def conv_weight(c_out: int, c_in: int, gen: torch.Generator) -> torch.Tensor:
    """Kaiming-normal 3x3 conv weight, shape (c_out, c_in, 3, 3)."""
    return torch.randn(c_out, c_in, 3, 3, generator=gen) * math.sqrt(2.0 / (c_in * 9))


def site_inputs(site: Site, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """B (rows, d) float32 of unfolded ReLU activations, W (d, m) float64, number of dead channels.

    image -> conv(3 -> 32) + ReLU -> conv(32 -> C) + ReLU -> unfold 3x3, padding 1.
    About 5% of the producer channels get a large negative bias (dead ReLU).
    """
    gen = torch.Generator().manual_seed(seed)
    img = image_batch(site.images, site.size, gen)
    stem = F.relu(
        F.conv2d(img, conv_weight(32, 3, gen), 0.1 * torch.randn(32, generator=gen), padding=1)
    )
    bias = 0.2 * torch.randn(site.channels, generator=gen)
    dead = torch.randperm(site.channels, generator=gen)[: max(1, site.channels // 20)]
    bias[dead] = -1e3
    act = F.relu(
        F.conv2d(stem, conv_weight(site.channels, 32, gen), bias, padding=1)
    )  # (N, C, H, W)
    patches = F.unfold(act, kernel_size=3, padding=1)  # (N, C*9, H*W), channel-major
    b = patches.transpose(1, 2).reshape(-1, site.d).contiguous()  # (rows, d)
    consumer = conv_weight(m, site.channels, gen)  # (m, C, 3, 3)
    w = consumer.reshape(m, -1).T.to(torch.float64).contiguous()  # (d, m)
    return b, w, int(dead.numel())


def gram_end_to_end(b: torch.Tensor, w: torch.Tensor, k: int):
    """(result, end-to-end seconds, solver-only seconds) from B."""
    t0 = time.perf_counter()
    b64 = b.to(torch.float64)
    gram = b64.T @ b64  # (d, d)
    energy = float(((b64 @ w) ** 2).sum())
    del b64
    t1 = time.perf_counter()
    result = greedy_select(gram, w, energy, GROUP, k)
    t2 = time.perf_counter()
    return result, t2 - t0, t2 - t1


def naive_cost_model(b: torch.Tensor, w: torch.Tensor, k_max: int) -> list[float]:
    """Predicted naive_greedy seconds for k = 1..k_max, from timed single refits.

    One candidate's refit at a step with p kept groups costs ~ t0 + t1 (p - 1)
    (measured at p = 1 and 8); step j scores n - j candidates with p = j + 1.
    """
    b64 = b.to(torch.float64)
    target = b64 @ w
    n = b.shape[1] // GROUP

    def refit_seconds(p: int) -> float:
        kept_energy(b64, target, list(range(p)), GROUP)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            kept_energy(b64, target, list(range(p)), GROUP)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_one, t_eight = refit_seconds(1), refit_seconds(8)
    slope = max(t_eight - t_one, 0.0) / 7
    total, out = 0.0, []
    for step in range(k_max):
        total += (n - step) * (t_one + slope * step)
        out.append(total)
    return out


def budget_k(
    b: torch.Tensor, w: torch.Tensor, k_min: int, k_max: int, seconds: float
) -> tuple[int, float]:
    """Largest k in k_min..k_max whose predicted naive time (x SAFETY) fits in ``seconds``."""
    predicted = naive_cost_model(b, w, k_max)
    k = min(k_min, k_max)
    for kk in range(k, k_max + 1):
        if SAFETY * predicted[kk - 1] <= seconds:
            k = kk
    return k, predicted[k - 1]


def gram_seconds_estimate(b: torch.Tensor, w: torch.Tensor) -> float:
    """Predicted Gram end-to-end seconds, from forming G on 1/16 of the rows."""
    rows = max(b.shape[0] // 16, 1)
    t0 = time.perf_counter()
    b64 = b[:rows].to(torch.float64)
    _ = b64.T @ b64, ((b64 @ w) ** 2).sum()
    return (time.perf_counter() - t0) * b.shape[0] / rows


def run_site(
    site: Site,
    m: int,
    k: int,
    seed: int,
    repeats: int,
    deadline: float | None = None,
    k_min: int = 1,
    hard_deadline: float | None = None,
) -> dict:
    """Time both solvers on one site. With ``deadline`` (perf_counter seconds), k is the
    largest value in k_min..k that the calibrated cost model fits before it; the site
    is skipped when even k_min is predicted to end after ``hard_deadline``."""
    b, w, n_dead = site_inputs(site, m, seed)
    if deadline is not None:
        reserve = 2.0 + repeats * gram_seconds_estimate(b, w)  # Gram timing, tables
        now = time.perf_counter()
        left = deadline - now - reserve
        k, predicted = budget_k(b, w, k_min, k, left)
        fits = SAFETY * predicted <= left
        if not fits and hard_deadline is not None:
            if now + reserve + SAFETY * predicted > hard_deadline:
                print(
                    f"{site.label}: skipped; even k={k} (predicted naive {predicted:.0f} s, "
                    f"Gram {reserve:.0f} s) would end past the hard time limit",
                    flush=True,
                )
                return {
                    "label": site.label,
                    "rows": site.rows,
                    "d": site.d,
                    "m": m,
                    "k": None,
                    "skipped": True,
                }
        print(
            f"{site.label}: k={k} {'fits' if fits else 'is the minimum; it does not fit'} "
            f"the budget left ({left:.0f} s; predicted naive {predicted:.0f} s)",
            flush=True,
        )
    alive = float((b.reshape(-1, site.channels, GROUP) > 0).float().mean())
    print(
        f"{site.label}: rows={site.rows:,} d={site.d:,} m={m} k={k} "
        f"(dead channels {n_dead}, non-zero entries {alive:.0%})",
        flush=True,
    )
    ends, solves, result = [], [], None
    for _ in range(repeats):
        result, end, solve = gram_end_to_end(b, w, k)
        ends.append(end)
        solves.append(solve)
    gram_end, gram_solver = statistics.median(ends), statistics.median(solves)
    how = f"median of {repeats}" if repeats > 1 else "single run"
    print(f"  Gram : end-to-end {gram_end:.3f} s, solver {gram_solver:.3f} s ({how})", flush=True)

    t0 = time.perf_counter()
    naive_order, naive_objective = naive_greedy(b, w, GROUP, k)
    naive_s = time.perf_counter() - t0
    print(f"  naive: {naive_s:.1f} s", flush=True)

    same_order = torch.equal(naive_order.cpu(), result.order.cpu())
    max_diff = float((naive_objective - result.objective).abs().max())
    identical = same_order and max_diff <= OBJECTIVE_ATOL
    if not identical:
        print(f"  MISMATCH on {site.label} (max |f_naive - f_gram| = {max_diff:.3e})")
        print(f"    naive order {naive_order.tolist()}")
        print(f"    Gram  order {result.order.tolist()}")
        print(f"    naive f {[f'{v:.12f}' for v in naive_objective.tolist()]}")
        print(f"    Gram  f {[f'{v:.12f}' for v in result.objective.tolist()]}")
    return {
        "label": site.label,
        "rows": site.rows,
        "d": site.d,
        "m": m,
        "k": k,
        "naive_s": naive_s,
        "gram_e2e_s": gram_end,
        "gram_solver_s": gram_solver,
        "speedup": naive_s / gram_end,
        "identical": identical,
        "max_objective_diff": max_diff,
        "f_k": float(result.objective[-1]),
    }


def print_part1(rows: list[dict]) -> None:
    head = (
        f"{'site':<14} {'rows':>7} {'d':>6} {'m':>4} {'k':>3} {'naive s':>9} "
        f"{'Gram e2e s':>11} {'solver s':>9} {'ratio':>8} {'same':>5} {'max|df|':>9} {'f(S_k)':>7}"
    )
    print("\nPart 1: naive greedy vs Gram greedy (ratio = naive / Gram end-to-end)")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("skipped"):
            print(
                f"{r['label']:<14} {r['rows']:>7,} {r['d']:>6,} {r['m']:>4}   skipped (time limit)"
            )
            continue
        print(
            f"{r['label']:<14} {r['rows']:>7,} {r['d']:>6,} {r['m']:>4} {r['k']:>3} "
            f"{r['naive_s']:>9.2f} {r['gram_e2e_s']:>11.3f} {r['gram_solver_s']:>9.3f} "
            f"{ratio_text(r['speedup']):>8} {'yes' if r['identical'] else 'NO':>5} "
            f"{r['max_objective_diff']:>9.1e} {r['f_k']:>7.4f}"
        )
    print(
        "  Gram e2e - solver = forming G = B^T B and ||B W||^2 in float64 (one pass over the\n"
        "  rows, O(rows d^2)). The naive cost grows ~k^3 x rows, so the ratio grows with k;\n"
        "  same = identical order and |f_naive - f_gram| <= 1e-8 at every step."
    )


def ratio_text(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"


# --------------------------------------------------------------------------- Part 2

SCALING_DIMS = (1024, 2048, 4096, 8192, 16384)
SCALING_GROUP = 16
SCALING_M = 256
SCALING_RANK = 64


def maxrss_bytes() -> int:
    """Peak resident memory of this process, in bytes.

    VmHWM from /proc (Linux) belongs to the address space created by exec, so a
    worker does not inherit its parent's peak; ru_maxrss does inherit it across
    fork + exec and is only the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def scaling_worker(spec: dict) -> dict:
    """One size of Part 2, run in its own process; returns timings and peak memory."""
    entered = time.perf_counter()
    d, g, m, steps = spec["d"], spec["g"], spec["m"], spec["steps"]
    torch.set_num_threads(spec["threads"])
    gen = torch.Generator().manual_seed(spec["seed"])
    base = maxrss_bytes()
    u = torch.randn(d, SCALING_RANK, generator=gen, dtype=torch.float64) / math.sqrt(SCALING_RANK)
    diag = 0.05 + torch.rand(d, generator=gen, dtype=torch.float64)
    t0 = time.perf_counter()
    gram = u @ u.T
    gram.diagonal().add_(diag)
    build_s = time.perf_counter() - t0
    w = torch.randn(d, m, generator=gen, dtype=torch.float64) / math.sqrt(d)
    energy = float(((u.T @ w) ** 2).sum() + (diag.unsqueeze(1) * w**2).sum())  # tr(W^T G W)
    built = maxrss_bytes()

    # Split fixed setup (copy of G, H = G W, block traces) from per-step cost with a
    # one-step run: per step = (t(steps) - t(1)) / (steps - 1). Small sizes are
    # repeated (median) because they are quick and noisy.
    repeats = 3 if d <= 4096 else 1
    full_times, one_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = greedy_select(gram, w, energy, g, steps)
        full_times.append(time.perf_counter() - t0)
        if steps > 1:
            t0 = time.perf_counter()
            greedy_select(gram, w, energy, g, 1)
            one_times.append(time.perf_counter() - t0)
    solve_s = statistics.median(full_times)
    if steps > 1:
        per_step_s = max(solve_s - statistics.median(one_times), 0.0) / (steps - 1)
    else:
        per_step_s = solve_s
    return {
        "d": d,
        "steps": steps,
        "build_s": build_s,
        "setup_s": max(solve_s - steps * per_step_s, 0.0),
        "solve_s": solve_s,
        "per_step_s": per_step_s,
        "f_steps": float(result.objective[-1]),
        "rss_base": base,
        "rss_built": built,
        "rss_peak": maxrss_bytes(),
        "worker_s": time.perf_counter() - entered,
    }


def run_worker(d: int, steps: int, seed: int, threads: int, timeout: float) -> dict | None:
    spec = {
        "d": d,
        "g": SCALING_GROUP,
        "m": SCALING_M,
        "steps": steps,
        "seed": seed,
        "threads": threads,
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  d={d}: worker exceeded {timeout:.0f} s", flush=True)
        return None
    if proc.returncode != 0:
        print(
            f"  d={d}: worker failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}",
            flush=True,
        )
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_scaling(
    dims: tuple[int, ...],
    quick_steps: int | None,
    seed: int,
    threads: int,
    budget_s: float,
    deadline: float | None = None,
) -> list[dict]:
    """Part 2. quick_steps=None: full k = n/2 when the probe says it fits in budget_s.

    With ``deadline``, a size whose predicted wall time (process start-up + 5x the
    previous size's work, which grows 4x per doubling of d) does not fit before it
    is skipped, and so are larger ones.
    """
    rows: list[dict] = []
    predicted = 0.0
    for d in dims:
        n = d // SCALING_GROUP
        k_full = n // 2
        if deadline is not None and time.perf_counter() + predicted > deadline:
            print(f"  d={d:>6,}: skipped, predicted ~{predicted:.0f} s does not fit", flush=True)
            rows.append({"d": d, "n": n, "k_full": k_full, "skipped": True})
            continue
        probe_steps = min(quick_steps or 16, k_full)
        t0 = time.perf_counter()
        rec = run_worker(d, probe_steps, seed, threads, timeout=max(budget_s, 600.0))
        if rec is None:
            rows.append({"d": d, "n": n, "k_full": k_full, "skipped": True, "failed": True})
            continue
        wall = time.perf_counter() - t0
        predicted = (wall - rec["worker_s"]) + 5 * rec["worker_s"]
        estimate = rec["setup_s"] + k_full * rec["per_step_s"]
        if quick_steps is None and probe_steps < k_full and estimate <= budget_s:
            full = run_worker(d, k_full, seed, threads, timeout=3 * budget_s)
            if full is not None:
                rec = full
        rec.update(
            n=n,
            k_full=k_full,
            complete=rec["steps"] == k_full,
            total_s=rec["solve_s"] if rec["steps"] == k_full else None,
            extrapolated_s=rec["setup_s"] + k_full * rec["per_step_s"],
            gram_bytes=d * d * 8,
        )
        rows.append(rec)
        status = "full run" if rec["complete"] else f"{rec['steps']} of {k_full} steps"
        print(
            f"  d={d:>6,}: {status}, {rec['solve_s']:.2f} s, "
            f"{rec['per_step_s'] * 1e3:.1f} ms/step, peak RSS {rec['rss_peak'] / 2**30:.2f} GiB",
            flush=True,
        )
    return rows


def print_part2(rows: list[dict]) -> None:
    head = (
        f"{'d':>6} {'n':>5} {'k=n/2':>6} {'steps run':>9} {'setup s':>8} {'ms/step':>8} "
        f"{'k=n/2 total s':>16} {'G bytes':>9} {'peak-base':>10} {'x G':>5}"
    )
    print(
        f"\nPart 2: Gram greedy alone, groups of {SCALING_GROUP}, m = {SCALING_M}, "
        f"G = rank-{SCALING_RANK} + diagonal"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("skipped"):
            why = "failed" if r.get("failed") else "skipped (time budget)"
            print(f"{r['d']:>6,} {r['n']:>5} {r['k_full']:>6}   {why}")
            continue
        total = f"{r['total_s']:.1f}" if r["complete"] else f"~{r['extrapolated_s']:.1f} (extrap.)"
        grow = r["rss_peak"] - r["rss_base"]
        print(
            f"{r['d']:>6,} {r['n']:>5} {r['k_full']:>6} {r['steps']:>9} {r['setup_s']:>8.2f} "
            f"{r['per_step_s'] * 1e3:>8.1f} {total:>16} {gib(r['gram_bytes']):>9} "
            f"{gib(grow):>10} {grow / r['gram_bytes']:>5.1f}"
        )
    if any(not r.get("skipped") and not r["complete"] for r in rows):
        print(
            "  (rows with fewer steps than k = n/2: total = setup + (n/2) x measured per-step\n"
            "   time; a step's cost is set by the d x d deflation, which does not shrink as\n"
            "   channels are chosen, so the extrapolation is close.)"
        )


def gib(x: float) -> str:
    return f"{x / 2**30:.2f}G" if x >= 2**30 else f"{x / 2**20:.0f}M"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller k (fits in < 5 min on 2 cores)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for all data (default 0)")
    parser.add_argument(
        "--k",
        type=int,
        nargs=3,
        metavar=("KA", "KB", "KC"),
        help="override the naive k of sites a, b, c",
    )
    parser.add_argument("--skip-part1", action="store_true", help="only run the d-scaling part")
    parser.add_argument("--skip-part2", action="store_true", help="only run the naive-vs-Gram part")
    parser.add_argument(
        "--max-d", type=int, default=max(SCALING_DIMS), help="largest d in part 2 (default 16384)"
    )
    parser.add_argument(
        "--scaling-steps",
        type=int,
        default=8,
        help="steps per d in part 2 with --quick (default 8)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both solvers (default 1: on a shared machine, multi-threaded "
        "OpenMP/MKL timings are dominated by oversubscription -- 20x slower was measured)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=240.0,
        help="--quick only: seconds the whole run aims for; the k of sites (b), (c) and the "
        "largest part-2 sizes are fitted to it (default 240)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(scaling_worker(json.loads(args.worker))))
        return 0

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mode = "quick" if args.quick else "full"
    print(
        f"solver_speed ({mode}, seed {args.seed}): torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    summary: dict = {"mode": mode, "seed": args.seed, "threads": args.threads}
    deadline = start + args.budget if args.quick and not args.k else None
    ks = {
        site.key: args.k[i] if args.k else (site.k_quick if args.quick else site.k_full)
        for i, site in enumerate(SITES)
    }
    results: dict[str, dict] = {}
    part2: list[dict] = []
    sites = {site.key: site for site in SITES}

    def share_deadline(share: float | None) -> float | None:
        if share is None or deadline is None:
            return None
        now = time.perf_counter()
        return now + share * (deadline - now)

    def run_item(key: str, share: float | None, k_min: int) -> None:
        nonlocal part2
        if key == "part2":
            if args.skip_part2:
                return
            dims = tuple(d for d in SCALING_DIMS if d <= args.max_d)
            if args.quick:
                print(
                    f"\nPart 2 (--quick: {args.scaling_steps} steps per d, k = n/2 extrapolated)",
                    flush=True,
                )
            else:
                print(
                    "\nPart 2 (full k = n/2 where a probe predicts <= 600 s, else extrapolated)",
                    flush=True,
                )
            steps = args.scaling_steps if args.quick else None
            limit = share_deadline(share)
            part2 = run_scaling(dims, steps, args.seed, args.threads, 600.0, limit)
            return
        if args.skip_part1:
            return
        site = sites[key]
        m = site.m_quick if args.quick else site.m_full
        repeats = site.repeats_quick if args.quick else site.repeats_full
        limit = share_deadline(share)
        print(flush=True)
        hard = None if deadline is None else deadline + HARD_GRACE
        results[key] = run_site(site, m, ks[key], args.seed, repeats, limit, k_min, hard)

    plan = QUICK_PLAN if deadline is not None else tuple((key, None, 1) for key in FULL_PLAN)
    if not args.skip_part1:
        budgeted = {key: k_min for key, share, k_min in plan if share is not None}
        ks_text = ", ".join(
            f"{site.label.split()[0]} "
            + (
                f"{budgeted[site.key]}..{ks[site.key]}"
                if site.key in budgeted
                else f"{ks[site.key]}"
            )
            for site in SITES
        )
        print(f"\nPart 1 (naive runs once; Gram timing is a median). k: {ks_text}", flush=True)
        if deadline is not None:
            print(
                f"  --quick: order {' -> '.join(key for key, _, _ in plan)}; a range of k is fitted"
                f" to the {args.budget:.0f} s budget (full mode: k = "
                f"{', '.join(str(s.k_full) for s in SITES)})",
                flush=True,
            )
    for key, share, k_min in plan:
        run_item(key, share, k_min)

    if not args.skip_part1:
        part1 = [results[s.key] for s in SITES]
        print_part1(part1)
        for site, r in zip(SITES, part1, strict=True):
            summary[f"speedup_{site.key}"] = None if r.get("skipped") else round(r["speedup"], 1)
            summary[f"k_{site.key}"] = r["k"]
        summary["identical_selections"] = all(r.get("identical", True) for r in part1)
        keys = ("rows", "d", "m", "k", "naive_s", "gram_e2e_s", "gram_solver_s")
        summary["sites"] = {
            s.key: None
            if r.get("skipped")
            else {key: r[key] for key in (*keys, "max_objective_diff")}
            for s, r in zip(SITES, part1, strict=True)
        }

    if part2:
        print_part2(part2)
        summary["scaling"] = {
            str(r["d"]): None
            if r.get("skipped")
            else {
                "steps": r["steps"],
                "k_full": r["k_full"],
                "complete": r["complete"],
                "setup_s": round(r["setup_s"], 3),
                "per_step_s": round(r["per_step_s"], 5),
                "total_s": None if r["total_s"] is None else round(r["total_s"], 2),
                "extrapolated_s": round(r["extrapolated_s"], 2),
                "gram_bytes": r["gram_bytes"],
                "peak_rss_bytes": r["rss_peak"],
                "rss_growth_bytes": r["rss_peak"] - r["rss_base"],
            }
            for r in part2
        }

    wall = time.perf_counter() - start
    summary["wall_s"] = round(wall, 1)
    print(f"\nwall time {wall:.1f} s, load average {os.getloadavg()[0]:.2f}")
    print(json.dumps(summary))
    return 0 if summary.get("identical_selections", True) else 1


if __name__ == "__main__":
    sys.exit(main())
