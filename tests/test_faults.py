"""Fault injection around the save: kill -9 and Ctrl-C at every step, at random moments, concurrent saves, a full disk.

After each fault the target holds the old or the new save, complete and
loadable, and the next run (a load or a save) leaves no ``.NAME.tmp-*`` /
``.NAME.old-*`` stray. The children are small processes without torch
(``fault_child.py``); the default run samples the fault points (seeded), the
slow run takes them all.
"""

import json
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import make_conv_net
from fault_child import CHILD_TIMEOUT_S, ROOT, default_sigint, kill_concurrent_savers, run, start, which

from subprune import saving
from subprune.pipeline import PruneConfig, prune
from subprune.serialization import load_pruned, save_pruned

PROTOCOLS = ["exchange", "journal"] if saving.exchange_available() else ["journal"]


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Three real saves: the dense net, a pruned one, another dense one (each with its own report.json)."""
    root = tmp_path_factory.mktemp("versions")
    images = torch.randn(32, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    pruned = prune(make_conv_net(), images, PruneConfig(method="layer", keep=0.5, progress=False)).model
    models = [make_conv_net(0), pruned, make_conv_net(1)]
    return [save_pruned(m, root / f"v{i}", extra_json={"report.json": {"version": i}}) for i, m in enumerate(models)]


def _prepare(tmp_path: Path, versions, first: int = 0) -> Path:
    target = tmp_path / "out"
    shutil.copytree(versions[first], target)
    return target


def _next_run(target: Path, versions, state: int, by_save: bool) -> None:
    """The next run cleans up: a load (which completes a pending swap) or a save; no stray survives it."""
    if by_save:
        with saving.atomic_directory(target) as tmp:
            for file in versions[2].iterdir():
                shutil.copyfile(file, tmp / file.name)
        assert which(target, versions) == 2
    else:
        reloaded = load_pruned(target, model=make_conv_net())
        assert which(target, versions) == state
        assert sum(p.numel() for p in reloaded.parameters()) == sum(
            p.numel() for p in load_pruned(versions[state], model=make_conv_net()).parameters())
    assert saving.strays(target) == []


def _outcome(target: Path, versions, code: int, events: list[dict]) -> int:
    """The version the target holds after a faulted save of version 1 over version 0, checked against what was said."""
    state = which(saving.current_version(target), versions)
    assert state in (0, 1), f"target holds no complete version (exit {code}, events {events})"
    load_pruned(saving.current_version(target), model=make_conv_net())  # complete and loadable as it is
    if events and events[-1]["event"] == "saved":
        assert state == 1
    elif events and events[-1]["event"] == "interrupted":
        assert code == 130 and events[-1]["saved"] is not None
        assert state == (1 if events[-1]["saved"] else 0), events[-1]["message"]
    else:
        assert code == -signal.SIGKILL, (code, events)
    return state


def _step_points(protocol: str, tmp_path: Path, versions) -> list[tuple[int, str, str]]:
    target = _prepare(tmp_path / "count", versions)
    code, events, err = run({"mode": "count", "target": str(target), "versions": [str(versions[1])],
                             "protocol": protocol})
    assert code == 0, err
    calls = events[-1]["calls"]
    assert calls > 10  # the save is many steps: recovery, mkdtemp, copies, fsyncs, swap, cleanup
    return [(n, when, sig) for n in range(1, calls + 1) for when in ("before", "after") for sig in ("KILL", "INT")]


def _kill_at_steps(protocol, tmp_path, versions, sample):
    points = _step_points(protocol, tmp_path, versions)
    if sample is not None:
        points = random.Random(12).sample(points, min(sample, len(points)))
    seen = set()
    for i, (n, when, sig) in enumerate(points):
        target = _prepare(tmp_path / f"run{i}", versions)
        code, events, err = run({"mode": "step", "target": str(target), "versions": [str(versions[1])],
                                 "protocol": protocol, "n": n, "when": when, "signal": sig})
        assert "Traceback" not in err, err
        seen.add(_outcome(target, versions, code, events))
        _next_run(target, versions, which(saving.current_version(target), versions), by_save=i % 2 == 1)
    return seen


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_kill_and_ctrl_c_at_sampled_steps(protocol, tmp_path, versions):
    seen = _kill_at_steps(protocol, tmp_path, versions, sample=14)
    assert seen == {0, 1}  # the sample hits both sides of the swap


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_kill_and_ctrl_c_at_every_step(protocol, tmp_path, versions):
    assert _kill_at_steps(protocol, tmp_path, versions, sample=None) == {0, 1}


def _kill_loop(target: Path, protocol: str, sig: int, delay: float, versions) -> tuple[int, list[dict]]:
    """A child saving versions 1, 0, 1, ... over ``target`` is sent ``sig`` ``delay`` s after its first save."""
    child = start({"mode": "loop", "target": str(target), "versions": [str(v) for v in versions[:2]],
                   "protocol": protocol, "first": 1})
    first = child.stdout.readline()
    assert first, child.stderr.read()
    time.sleep(delay)
    child.send_signal(sig)
    out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert "Traceback" not in err, err
    return child.returncode, [json.loads(first)] + [json.loads(x) for x in out.splitlines() if x.strip()]


def _check_loop(target, versions, code, events):
    state = which(saving.current_version(target), versions)
    assert state in (0, 1)
    last = events[-1]
    if last["event"] == "interrupted" and last["saved"] is not None:
        assert code == 130
        assert state == (last["version"] if last["saved"] else 1 - last["version"]), last
    elif last["event"] == "interrupted":  # outside the protected part of a save: a complete version is in place
        # Between two saves the last finished one is in place; but the signal can also land after the swap of
        # the save being made (the lock release, the child's own code before it prints "saved"), when that new
        # version is. Either is a whole save (state in (0, 1) above); which one the child cannot know.
        assert state in (1 - last["version"], last["version"])
    else:  # killed: the last finished save, or the one it was writing
        assert code == -signal.SIGKILL
    return state


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_kill_at_random_moments(protocol, sig, tmp_path, versions):
    rng = random.Random(int(sig) * 7 + len(protocol))
    for i in range(4):
        target = _prepare(tmp_path / f"run{i}", versions)
        code, events = _kill_loop(target, protocol, sig, rng.uniform(0, 0.03), versions)
        state = _check_loop(target, versions, code, events)
        _next_run(target, versions, state, by_save=i % 2 == 1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_saves_and_reads(protocol, tmp_path, versions):
    """Four processes save four times each over one target while it is read: every read sees one whole version."""
    target = _prepare(tmp_path, versions)
    children = [start({"mode": "loop", "target": str(target), "versions": [str(v) for v in versions],
                       "protocol": protocol, "first": k, "saves": 4}) for k in range(4)]
    reads = 0
    while any(c.poll() is None for c in children):
        held = saving.read_version(target, lambda path: which(path, versions))
        assert held in (0, 1, 2)
        reads += 1
    for c in children:
        out, err = c.communicate(timeout=CHILD_TIMEOUT_S)
        assert c.returncode == 0, err
        assert len(out.splitlines()) == 4
    assert reads > 0 and which(target, versions) in (0, 1, 2)
    assert saving.strays(target) == []  # each save cleaned up after itself
    # and killed while saving concurrently: still one whole version, and the next run cleans up
    kill_concurrent_savers(target, versions, protocol)
    state = which(saving.current_version(target), versions)
    assert state in (0, 1, 2)
    _next_run(target, versions, state, by_save=False)


def _tmpfs(path: Path, size: str, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KB tmpfs (needs root and mount rights; skipped otherwise)."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "512k"):
        pytest.skip("cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN)")
    yield disk
    _umount(disk)


def test_full_disk_is_refused_before_writing_and_rolled_back_while_writing(small_disk, versions):
    target = small_disk / "out"
    save_pruned(make_conv_net(), target)  # a few KB: fits
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    big = torch.nn.Sequential(torch.nn.Linear(400, 400))  # 642 KB of weights: more than the disk
    with pytest.raises(OSError, match="not enough free space .* needs about 0.7 MB .* 0.5 MB free"):
        save_pruned(big, target, overwrite=True)
    # the disk fills up while the files are written: rolled back, the previous save intact, no stray
    for protocol in PROTOCOLS:
        with pytest.raises(OSError, match="No space left"), saving.atomic_directory(target, protocol=protocol) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * (600 << 10))
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
        assert saving.strays(target) == []
    load_pruned(target, model=make_conv_net())


def test_read_only_and_mount_point_are_refused_before_any_work(tmp_path):
    disk = tmp_path / "ro"
    if not _tmpfs(disk, "1m", "ro"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        with pytest.raises(PermissionError, match="is not writable .*Read-only file system"):
            save_pruned(make_conv_net(), disk / "out")
        with pytest.raises(ValueError, match="is a mount point"):
            save_pruned(make_conv_net(), disk)
        start_time = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "subprune.cli", "prune", "--model", "lenet", "--calib", "64",
                               "--out", str(disk / "out")], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 2 and "Read-only file system" in done.stderr, done.stderr
        assert time.perf_counter() - start_time < 30  # refused before loading data or calibrating
        assert ".tmp-" not in done.stderr
    finally:
        _umount(disk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"]  # nothing left beside the mount point


TORCH_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    from conftest import make_conv_net
    from subprune.saving import SaveInterrupted
    from subprune.serialization import save_pruned
    models = [make_conv_net(0), make_conv_net(1)]
    i = 1
    try:
        while True:
            save_pruned(models[i % 2], sys.argv[1], extra_json={"report.json": {"version": i % 2}})
            print(json.dumps({"event": "saved", "version": i % 2}), flush=True)
            i += 1
    except SaveInterrupted as exc:
        print(json.dumps({"event": "interrupted", "saved": exc.saved, "version": i % 2, "message": str(exc)}))
    except KeyboardInterrupt:
        print(json.dumps({"event": "interrupted", "saved": None, "version": i % 2, "message": "outside"}))
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_save_pruned_killed_in_a_real_process(sig, tmp_path):
    """The whole save_pruned (state dict, safetensors, JSON) in a process with torch, stopped at a random moment."""
    target = tmp_path / "out"
    save_pruned(make_conv_net(0), target, extra_json={"report.json": {"version": 0}})
    child = subprocess.Popen([sys.executable, "-c", TORCH_CHILD, str(target)], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    assert child.stdout.readline(), child.stderr.read()
    time.sleep(random.Random(int(sig)).uniform(0, 0.05))
    child.send_signal(sig)
    out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert "Traceback" not in err, err
    version = json.loads(saving.read_version(target, lambda p: (p / "report.json").read_text()))["version"]
    reloaded = load_pruned(target, model=make_conv_net())
    torch.testing.assert_close(reloaded.state_dict(), make_conv_net(version).state_dict(), rtol=0, atol=0)
    if out.strip():
        last = json.loads(out.splitlines()[-1])
        if last["event"] == "interrupted" and last["saved"] is not None:
            assert version == (last["version"] if last["saved"] else 1 - last["version"])
    assert saving.strays(target) == []  # the load was the next run


def test_strays_of_the_earlier_protocol_are_recovered(tmp_path, versions):
    """Before this protocol a kill between the two renames left no target, the old save in .NAME.old-*/previous."""
    target = tmp_path / "out"
    shutil.copytree(versions[0], tmp_path / ".out.old-abc123" / "previous")
    shutil.copytree(versions[1], tmp_path / ".out.tmp-def456")  # the new save, no journal to say it is complete
    assert which(saving.current_version(target), versions) == 0  # the load finds the old save meanwhile
    load_pruned(target, model=make_conv_net())
    assert which(target, versions) == 0 and saving.strays(target) == []  # rolled back, strays gone
    shutil.copytree(versions[1], tmp_path / ".out.old-x" / "previous")  # a finished swap's leftover
    (tmp_path / ".out.tmp-y").mkdir()  # an empty unfinished sibling
    assert any("finished" in line for line in saving.recover(target))
    assert which(target, versions) == 0 and saving.strays(target) == []


def test_a_finished_swap_half_removed_beside_a_swap_killed_between_its_renames(tmp_path, versions):
    """Saver B swapped and was killed removing its previous save; saver A then moved B's save aside and was killed.

    The regression behind a flaky concurrent-savers run: B's journal (sorted first) names a new version that no
    longer exists, and its half-removed previous save must not be taken for the save in place; A's swap is the one
    to finish.
    """
    target = tmp_path / "out"
    journal = {"format": saving.JOURNAL_FORMAT, "target": "out"}
    b, a = tmp_path / ".out.old-0b", tmp_path / ".out.old-1a"
    shutil.copytree(versions[0], b / saving.PREVIOUS)
    next(iter(sorted((b / saving.PREVIOUS).iterdir()))).unlink()  # half removed
    (b / saving.JOURNAL_FILE).write_text(json.dumps({**journal, "new": ".out.tmp-b"}))  # became the target, moved on
    shutil.copytree(versions[1], a / saving.PREVIOUS)  # B's save, moved aside by A's first rename
    shutil.copytree(versions[2], tmp_path / ".out.tmp-a")  # A's new save, complete
    (a / saving.JOURNAL_FILE).write_text(json.dumps({**journal, "new": ".out.tmp-a"}))
    assert which(saving.current_version(target), versions) == 2  # readers meanwhile see A's save
    assert saving.read_version(target, lambda path: which(path, versions)) == 2
    assert which(target, versions) == 2 and saving.strays(target) == []  # the read recovered it
