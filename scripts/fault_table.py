"""The fault table of the save protocol: kill -9 and Ctrl-C around saves, concurrent saves, full/read-only disks.

    .venv/bin/python scripts/fault_table.py --out results/faults.md [--cli-runs 8] [--random-runs 20]

Every row: how many runs, what the target held after the fault (the old save,
the new one, both complete and loadable; "mid-swap" counts the journal
protocol's runs where the target name itself was briefly absent and the load
found the version in the journal), how many runs left strays right after the
fault and after the next run (a load, or a save), and what was printed.
The children are ``tests/fault_child.py`` (the save protocol without torch) and,
for the CLI rows, ``subprune prune`` itself. Needs root for the tmpfs rows.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from conftest import make_conv_net  # noqa: E402
from fault_child import kill_concurrent_savers, run, start, which  # noqa: E402

from subprune import saving  # noqa: E402
from subprune.pipeline import PruneConfig, prune  # noqa: E402
from subprune.serialization import load_pruned, save_pruned  # noqa: E402

SUBPRUNE = [str(ROOT / ".venv" / "bin" / "subprune")] if (ROOT / ".venv/bin/subprune").exists() else [
    sys.executable, "-m", "subprune.cli"]


class Row:
    def __init__(self, fault: str):
        self.fault, self.runs, self.states = fault, 0, collections.Counter()
        self.strays_after_fault = self.strays_after_next = self.mid_swap = 0
        self.messages: collections.Counter = collections.Counter()
        self.wrong: list[str] = []

    def line(self) -> str:
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.states.items()))
        if self.mid_swap:
            states += f" (mid-swap {self.mid_swap}: found through the journal, completed by the next run)"
        messages = "; ".join(f"{v}x \"{k}\"" for k, v in self.messages.most_common()) or "-"
        verdict = "old or new, complete, no strays" if not self.wrong and not self.strays_after_next else (
            "FAILED: " + "; ".join(self.wrong[:3]))
        return (f"| {self.fault} | {self.runs} | {states} | {self.strays_after_fault} | {self.strays_after_next} | "
                f"{messages} | {verdict} |")


def versions(root: Path) -> list[Path]:
    images = torch.randn(32, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    pruned = prune(make_conv_net(), images, PruneConfig(method="layer", keep=0.5, progress=False)).model
    return [save_pruned(m, root / f"v{i}", extra_json={"report.json": {"version": i}})
            for i, m in enumerate([make_conv_net(0), pruned, make_conv_net(1)])]


def settle(row: Row, target: Path, vs: list[Path], allowed: set[int], said: int | None, next_save: bool) -> None:
    """Record the state after a fault, check it, then run the next run and count strays."""
    row.runs += 1
    if not target.is_dir():
        row.mid_swap += 1
    state = which(saving.current_version(target), vs)
    row.states[{0: "old", 1: "new", 2: "third", None: "NONE"}[state] if len(allowed) < 3 else f"v{state}"] += 1
    if state not in allowed or (said is not None and state != said):
        row.wrong.append(f"run {row.runs}: state {state}, said {said}")
    else:
        load_pruned(saving.current_version(target), model=make_conv_net())
    row.strays_after_fault += bool(saving.strays(target))
    if next_save:
        with saving.atomic_directory(target) as tmp:
            for f in vs[2].iterdir():
                shutil.copyfile(f, tmp / f.name)
    else:
        load_pruned(target, model=make_conv_net())
    row.strays_after_next += bool(saving.strays(target))


def step_rows(work: Path, vs: list[Path], protocol: str) -> list[Row]:
    target = work / f"count-{protocol}" / "out"
    shutil.copytree(vs[0], target)
    code, events, _ = run({"mode": "count", "target": str(target), "versions": [str(vs[1])], "protocol": protocol})
    calls = events[-1]["calls"]
    rows = []
    for sig in ("KILL", "INT"):
        row = Row(f"{'kill -9' if sig == 'KILL' else 'Ctrl-C'} before/after each of the {calls} file-system "
                  f"steps of a save ({protocol})")
        for i, (n, when) in enumerate((n, w) for n in range(1, calls + 1) for w in ("before", "after")):
            target = work / f"{protocol}-{sig}-{i}" / "out"
            shutil.copytree(vs[0], target)
            code, events, err = run({"mode": "step", "target": str(target), "versions": [str(vs[1])],
                                     "protocol": protocol, "n": n, "when": when, "signal": sig})
            said = None
            if events:
                last = events[-1]
                said = 1 if last["event"] == "saved" or last.get("saved") else 0
                row.messages[_message(last)] += 1
            if "Traceback" in err:
                row.wrong.append(f"traceback: {err.strip().splitlines()[-1]}")
            settle(row, target, vs, {0, 1}, said, next_save=i % 2 == 1)
        rows.append(row)
    return rows


def _message(event: dict) -> str:
    if event["event"] == "saved":
        return "(save finished, no interrupt reached it)"
    text = event["message"]
    return text.split(": ", 1)[1].split(",")[0] if ": " in text else text


def random_rows(work: Path, vs: list[Path], protocol: str, runs: int, rng: random.Random) -> list[Row]:
    rows = []
    for sig in (signal.SIGKILL, signal.SIGINT):
        row = Row(f"{'kill -9' if sig == signal.SIGKILL else 'Ctrl-C'} at a random moment (0-30 ms) of a loop of "
                  f"saves ({protocol})")
        for i in range(runs):
            target = work / f"rand-{protocol}-{int(sig)}-{i}" / "out"
            shutil.copytree(vs[0], target)
            child = start({"mode": "loop", "target": str(target), "versions": [str(v) for v in vs[:2]],
                           "protocol": protocol, "first": 1})
            first = child.stdout.readline()
            time.sleep(rng.uniform(0, 0.03))
            child.send_signal(sig)
            out, err = child.communicate(timeout=60)
            events = [json.loads(first)] + [json.loads(x) for x in out.splitlines() if x.strip()]
            last, said = events[-1], None
            if last["event"] == "interrupted":
                row.messages[_message(last)] += 1
                if last["saved"] is not None:
                    said = last["version"] if last["saved"] else 1 - last["version"]
                else:
                    said = 1 - last["version"]
            settle(row, target, vs, {0, 1}, said, next_save=i % 2 == 1)
        rows.append(row)
    return rows


def concurrent_rows(work: Path, vs: list[Path], protocol: str) -> list[Row]:
    row = Row(f"4 processes x 4 saves of one target at once, read meanwhile ({protocol})")
    target = work / f"conc-{protocol}" / "out"
    shutil.copytree(vs[0], target)
    children = [start({"mode": "loop", "target": str(target), "versions": [str(v) for v in vs],
                       "protocol": protocol, "first": k, "saves": 4}) for k in range(4)]
    reads = bad = 0
    while any(c.poll() is None for c in children):
        bad += saving.read_version(target, lambda p: which(p, vs)) is None
        reads += 1
    for c in children:
        c.communicate()
    row.messages[f"{reads} reads during the saves, {bad} of them not one whole version"] += 1
    if bad:
        row.wrong.append(f"{bad} torn reads")
    settle(row, target, vs, {0, 1, 2}, None, next_save=False)
    killed = Row(f"3 processes saving one target at once, all killed -9 ({protocol})")
    for i in range(3):
        target = work / f"conck-{protocol}-{i}" / "out"
        shutil.copytree(vs[0], target)
        kill_concurrent_savers(target, vs, protocol)
        settle(killed, target, vs, {0, 1, 2}, None, next_save=i % 2 == 1)
    return [row, killed]


def _mount(path: Path, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def disk_rows(work: Path) -> list[Row]:
    rows = []
    disk = work / "small"
    if not _mount(disk, "size=512k"):
        return [Row("full disk: SKIPPED (cannot mount a tmpfs)")]
    try:
        row = Row("save_pruned of a 642 KB model into a 512 KB tmpfs holding a save")
        target = disk / "out"
        save_pruned(make_conv_net(), target)
        before = which(target, [target])  # noqa: F841 (the snapshot below is the reference)
        reference = {p.name: p.read_bytes() for p in target.iterdir()}
        try:
            save_pruned(torch.nn.Sequential(torch.nn.Linear(400, 400)), target, overwrite=True)
        except OSError as exc:
            row.messages[str(exc).split(": it")[0].replace(str(disk), "DISK") + ": ..."] += 1
        row.runs += 1
        same = {p.name: p.read_bytes() for p in target.iterdir()} == reference
        row.states["old" if same else "CHANGED"] += 1
        row.strays_after_fault += bool(saving.strays(target))
        rows.append(row)
        row = Row("disk fills up while the files are written (no size known in advance), both protocols")
        for protocol in ("exchange", "journal"):
            try:
                with saving.atomic_directory(target, protocol=protocol) as tmp:
                    (tmp / "model.safetensors").write_bytes(b"x" * (600 << 10))
            except OSError as exc:
                row.messages[exc.strerror or str(exc)] += 1
            row.runs += 1
            same = {p.name: p.read_bytes() for p in target.iterdir()} == reference
            row.states["old" if same else "CHANGED"] += 1
            row.strays_after_fault += bool(saving.strays(target))
            load_pruned(target, model=make_conv_net())
            row.strays_after_next += bool(saving.strays(target))
        rows.append(row)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    return rows


def _cli(*args: str, timeout: float = 600) -> tuple[int, str, float]:
    start_time = time.perf_counter()
    done = subprocess.run([*SUBPRUNE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done.returncode, done.stderr.strip(), time.perf_counter() - start_time


PRUNE = ["prune", "--model", "lenet", "--calib", "64", "--quiet", "--threads", "1"]


def cli_check_rows(work: Path) -> list[Row]:
    rows = []
    ro = work / "ro"
    if _mount(ro, "size=1m", "ro"):
        row = Row("`subprune prune --out` on a read-only filesystem")
        code, err, seconds = _cli(*PRUNE, "--out", str(ro / "pruned"))
        row.runs, row.states[f"refused (exit {code}) after {seconds:.1f} s, before loading data"] = 1, 1
        row.messages[err.replace(str(ro), "RO")] += 1
        subprocess.run(["umount", str(ro)], capture_output=True)
        rows.append(row)
        mount = work / "mnt"
        _mount(mount, "size=1m")
        row = Row("`subprune prune --out` naming a mount point (3 runs)")
        for _ in range(3):
            code, err, seconds = _cli(*PRUNE, "--out", str(mount))
            row.runs += 1
            row.states[f"refused (exit {code}) in {seconds:.1f} s"] += 1
            row.messages[err.replace(str(mount), "MNT")] += 1
            row.strays_after_fault += bool(saving.strays(mount))
        subprocess.run(["umount", str(mount)], capture_output=True)
        rows.append(row)
    return rows


def cli_kill_rows(work: Path, runs: int, rng: random.Random) -> list[Row]:
    """``subprune prune --out T`` over an earlier save, signalled 0-20 ms after its save begins.

    The save has begun when a ``.out.tmp-*`` sibling holds ``model.safetensors``
    (the checks before work create and remove empty ``.out.tmp-*`` probes).
    """
    base = work / "cli-old"
    code, err, _ = _cli(*PRUNE, "--keep", "0.25", "--out", str(base))
    assert code == 0, err
    old_params = json.loads((base / "report.json").read_text())["pruned_params"]
    rows = []
    for sig in (signal.SIGKILL, signal.SIGINT):
        row = Row(f"`subprune prune --out` over a previous save, {'kill -9' if sig == signal.SIGKILL else 'Ctrl-C'} "
                  "0-20 ms after the save begins")
        for i in range(runs):
            target = work / f"cli-{int(sig)}-{i}" / "out"
            shutil.copytree(base, target)
            child = subprocess.Popen([*SUBPRUNE, *PRUNE, "--keep", "0.5", "--out", str(target)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
            delay = rng.uniform(0, 0.02)
            while child.poll() is None and not any(p.name.startswith(".out.tmp-") and (p / "model.safetensors").exists()
                                                   for p in target.parent.iterdir()):
                time.sleep(0.0005)
            time.sleep(delay)
            if child.poll() is None:
                child.send_signal(sig)
            out, err = child.communicate(timeout=120)
            row.runs += 1
            if not target.is_dir():
                row.mid_swap += 1
            params = json.loads(saving.read_version(target, lambda p: (p / "report.json").read_text()))[
                "pruned_params"]
            state = "old" if params == old_params else "new"
            row.states[state] += 1
            load_pruned(target)
            lines = [x for x in err.strip().splitlines() if x.strip() and not x.startswith("WARNING")]
            text = lines[-1] if lines else f"(exit {child.returncode}, nothing printed)"
            if child.returncode == 0 and not lines and "saved the pruned model" in out:
                text = "(exit 0: the run had finished and printed 'saved the pruned model ...'; Ctrl-C came after)"
            if "Traceback" in err:
                row.wrong.append("traceback: " + text)
            if sig == signal.SIGINT:
                row.messages[text.replace(str(target), "OUT")] += 1
                said_new = "holds the" in text or child.returncode == 0
                if said_new != (state == "new"):
                    row.wrong.append(f"said {text!r} but the target holds the {state} save")
            row.strays_after_fault += bool(saving.strays(target))
            row.strays_after_next += bool(saving.strays(target))  # the load above was the next run
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "faults.md")
    parser.add_argument("--random-runs", type=int, default=20)
    parser.add_argument("--cli-runs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    try:
        vs = versions(work / "versions")
        rows: list[Row] = []
        protocols = ["exchange", "journal"] if saving.exchange_available() else ["journal"]
        for protocol in protocols:
            rows += step_rows(work / "steps", vs, protocol)
        for protocol in protocols:
            rows += random_rows(work / "random", vs, protocol, args.random_runs, rng)
        for protocol in protocols:
            rows += concurrent_rows(work / "concurrent", vs, protocol)
        rows += disk_rows(work)
        rows += cli_check_rows(work)
        if args.cli_runs:
            rows += cli_kill_rows(work, args.cli_runs, rng)
    finally:
        for mount in ("small", "ro", "mnt"):
            subprocess.run(["umount", str(work / mount)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    command = " ".join(["python scripts/fault_table.py", *sys.argv[1:]])
    text = "\n".join([
        "# Fault table of the save protocol", "", f"Command: `{command}` (seed {args.seed}; "
        f"{os.cpu_count()} CPUs, {sys.platform}, renameat2 {'available' if saving.exchange_available() else 'absent'})",
        "", "After every fault the target must hold the old or the new save, complete (every file byte-equal to a "
        "version) and loadable (`load_pruned`), and no `.NAME.tmp-*`/`.NAME.old-*` may survive the next run "
        "(a load or a save).", "",
        "| fault | runs | target after | runs with strays right after | strays after the next run | message | "
        "verdict |", "|---|---|---|---|---|---|---|", *[r.line() for r in rows], ""])
    args.out.write_text(text)
    print(text)
    if any(r.wrong or r.strays_after_next for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
