"""Saves run under injected faults, and the checks of what they leave (tests/test_faults.py, scripts/fault_table.py).

Run as a program, this file is the child process: it loads ``subprune/saving.py``
by path (the standard library only, no torch: a child starts in a few tens of
milliseconds) and copies the files of prepared save directories ("versions")
into a target with :func:`subprune.saving.atomic_directory`, under one fault:

* ``{"mode": "step", "n": N, "when": "before"|"after", "signal": "KILL"|"INT"}``:
  the child sends itself the signal just before or just after the N-th
  file-system call of the save (rename, renameat2, fsync, mkdir, rmdir, unlink,
  copyfile, rmtree: every step of the protocol, the recovery of strays included);
* ``{"mode": "count"}``: no fault; prints how many such calls the save made;
* ``{"mode": "loop"}``: saves the versions in turn until it is killed from outside.

It prints one JSON line per event: ``{"event": "saved", "version": i}`` after a
save, ``{"event": "interrupted", "saved": bool, "version": i, "message": ...}``
when Ctrl-C (SIGINT) reached a save. The functions below are the parent's side.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAVING = ROOT / "subprune" / "saving.py"


def _load_saving():
    spec = importlib.util.spec_from_file_location("subprune_saving_child", SAVING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child(job: dict) -> int:
    saving = _load_saving()
    target, versions, protocol = Path(job["target"]), [Path(v) for v in job["versions"]], job.get("protocol")
    state = {"count": 0, "active": False}
    n, when = job.get("n"), job.get("when")
    sig = {"KILL": signal.SIGKILL, "INT": signal.SIGINT}.get(job.get("signal"))

    def wrap(owner, name):
        real = getattr(owner, name)

        def call(*args, **kwargs):
            if not state["active"]:
                return real(*args, **kwargs)
            state["count"] += 1
            index = state["count"]
            if index == n and when == "before":
                os.kill(os.getpid(), sig)
            try:
                return real(*args, **kwargs)
            finally:  # also after a call that raised (e.g. mkdir of a directory that exists)
                if index == n and when == "after":
                    os.kill(os.getpid(), sig)

        setattr(owner, name, call)

    for owner, name in [(os, "rename"), (os, "replace"), (os, "fsync"), (os, "mkdir"), (os, "rmdir"),
                        (os, "unlink"), (saving, "_renameat2"), (shutil, "copyfile"), (shutil, "rmtree")]:
        wrap(owner, name)

    def save(version: Path) -> None:
        with saving.atomic_directory(target, protocol=protocol) as tmp:
            for file in sorted(version.iterdir()):
                shutil.copyfile(file, tmp / file.name)

    def say(**event) -> None:
        print(json.dumps(event), flush=True)

    index = job.get("first", 0)
    try:
        while True:
            state["active"] = True
            try:
                save(versions[index % len(versions)])
            finally:
                state["active"] = False
            say(event="saved", version=index % len(versions), calls=state["count"])
            if job["mode"] != "loop" or index + 1 - job.get("first", 0) >= job.get("saves", float("inf")):
                return 0
            index += 1
    except saving.SaveInterrupted as exc:
        say(event="interrupted", saved=exc.saved, version=index % len(versions), message=str(exc))
        return 130
    except KeyboardInterrupt:
        say(event="interrupted", saved=None, version=index % len(versions), message="outside the save")
        return 130


# --- the parent's side ----------------------------------------------------------------------------------------------


def default_sigint() -> None:
    """In a child before exec: Ctrl-C back to its default, so Python installs its KeyboardInterrupt handler.

    A shell starts background jobs (``make test &``) with SIGINT ignored, and children inherit that: their
    Ctrl-C would then do nothing and every Ctrl-C test would wait for its timeout.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(job: dict, **popen) -> subprocess.Popen:
    """Start a child running ``job``; stdout is a pipe of JSON lines."""
    return subprocess.Popen([sys.executable, __file__, json.dumps(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint, **popen)


# A child saves a tiny model in well under a second; the margin is for a CI machine loaded by other jobs
# (on 2 cores at load average 15-20 a child took over 60 s to answer its signal).
CHILD_TIMEOUT_S = 300


def run(job: dict, timeout: float = CHILD_TIMEOUT_S) -> tuple[int, list[dict], str]:
    """Run a child to its end: exit status, events, stderr."""
    child = start(job)
    out, err = child.communicate(timeout=timeout)
    return child.returncode, [json.loads(line) for line in out.splitlines() if line.strip()], err


def kill_concurrent_savers(target: Path, versions: list[Path], protocol: str, timeout: float = CHILD_TIMEOUT_S) -> None:
    """Start three children saving ``versions`` to ``target`` in a loop at once, then kill -9 all three mid-save."""
    children = [start({"mode": "loop", "target": str(target), "versions": [str(v) for v in versions],
                       "protocol": protocol, "first": k}) for k in range(3)]
    for c in children:
        c.stdout.readline()  # each has begun saving
    for c in children:
        c.kill()
        c.communicate(timeout=timeout)


def snapshot(directory: Path) -> dict[str, bytes] | None:
    """Every file of ``directory`` by name (None if it is not a directory)."""
    if not directory.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def which(directory: Path, versions: list[Path]) -> int | None:
    """Index of the version whose files ``directory`` holds exactly (None: none, or incomplete)."""
    held = snapshot(directory)
    for i, version in enumerate(versions):
        if held is not None and held == snapshot(version):
            return i
    return None


if __name__ == "__main__":
    sys.exit(_child(json.loads(sys.argv[1])))
