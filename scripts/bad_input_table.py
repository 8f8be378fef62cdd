"""The bad-input table: every bad argument of issue 12, what subprune answers, and how long it took to answer.

    .venv/bin/python scripts/bad_input_table.py --out results/bad_input.md

Library calls run in this process; CLI lines run ``subprune.cli.main`` here
with its stderr captured. The read-only, mount-point and full-disk rows need
root (tmpfs mounts) and are marked skipped otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import make_conv_net  # noqa: E402

from subprune import cli  # noqa: E402
from subprune.hf.prune import TransformerPruneConfig  # noqa: E402
from subprune.pipeline import PruneConfig, prune  # noqa: E402
from subprune.serialization import load_pruned, save_pruned  # noqa: E402

IMAGES = torch.randn(96, 1, 14, 14, generator=torch.Generator().manual_seed(1))


def outcome(call) -> tuple[str, str, float]:
    """(answer, message, seconds) of ``call()``: the exception and its message, or what it returned."""
    start = time.perf_counter()
    try:
        value = call()
    except SystemExit as exc:
        return f"exit {exc.code}", "", time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 (the table records whatever is raised)
        return type(exc).__name__, str(exc), time.perf_counter() - start
    return "accepted", "" if value is None else str(value), time.perf_counter() - start


def cli_outcome(argv: list[str]) -> tuple[str, str, float]:
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    lines = [x for x in err.getvalue().splitlines() if x.strip() and not x.startswith(("usage:", " "))]
    return f"exit {code}", lines[-1] if lines else "", time.perf_counter() - start


def damaged(tmp: Path, name: str, **changes) -> Path:
    out = save_pruned(make_conv_net(), tmp / f"damaged-{name}-{'-'.join(changes)}")
    spec = json.loads((out / "architecture.json").read_text())
    spec["modules"][name]["config"].update(changes)
    (out / "architecture.json").write_text(json.dumps(spec))
    return out


def hf_directories(tmp: Path) -> tuple[Path, Path, Path]:
    """A tiny BERT directory whose config.json says 3 layers (the weights have 2), and a pruned save edited."""
    import transformers

    from subprune.hf import save_pruned as hf_save

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    mismatch = tmp / "hf-mismatch"
    transformers.BertModel(config).save_pretrained(mismatch)
    (mismatch / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    transformers.BertTokenizer(str(mismatch / "vocab.txt")).save_pretrained(mismatch)
    spec = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**spec, "num_hidden_layers": 3}))
    widths, huge = hf_save(transformers.BertModel(config), tmp / "hf-w"), hf_save(transformers.BertModel(config),
                                                                                   tmp / "hf-huge")
    saved = json.loads((widths / "config.json").read_text())
    saved["subprune_widths"][0]["ffn"] = 10**6
    (widths / "config.json").write_text(json.dumps(saved))
    saved = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**saved, "intermediate_size": 10**10}))
    return mismatch, widths, huge


def _mount(path: Path, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def interpolation_warning() -> str:
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("subprune").addHandler(handler)
    try:
        prune(make_conv_net(), IMAGES[:12], PruneConfig(method="layer", keep=0.5, ridge=0.1, progress=False))
    finally:
        logging.getLogger("subprune").removeHandler(handler)
    return next(r.getMessage() for r in records if "interpolates" in r.getMessage())


def rows(tmp: Path) -> list[tuple[str, tuple[str, str, float]]]:
    model = make_conv_net()
    table = [
        ('PruneConfig(keep="0.5")', outcome(lambda: PruneConfig(keep="0.5"))),
        ("PruneConfig(keep=np.float32(0.5))", outcome(lambda: f"keep={PruneConfig(keep=np.float32(0.5)).keep!r}")),
        ("PruneConfig(keep=torch.tensor(0.5))", outcome(lambda: f"keep={PruneConfig(keep=torch.tensor(0.5)).keep!r}")),
        ("PruneConfig(keep=torch.tensor([0.5, 0.5]))", outcome(lambda: PruneConfig(keep=torch.tensor([0.5, 0.5])))),
        ("PruneConfig(batch_size=1.5)", outcome(lambda: PruneConfig(batch_size=1.5))),
        ("PruneConfig(batch_size=np.int64(64))",
         outcome(lambda: f"batch_size={PruneConfig(batch_size=np.int64(64)).batch_size!r}")),
        ('PruneConfig(reweight="no")', outcome(lambda: PruneConfig(reweight="no"))),
        ('PruneConfig(device="gpu")', outcome(lambda: PruneConfig(device="gpu"))),
        ('TransformerPruneConfig(heads="0.5")', outcome(lambda: TransformerPruneConfig(heads="0.5"))),
        ("TransformerPruneConfig(params=np.float32(0))", outcome(lambda: TransformerPruneConfig(params=np.float32(0)))),
        ("prune(model, x, config={})", outcome(lambda: prune(model, IMAGES, {}))),
        ("prune(None, x)", outcome(lambda: prune(None, IMAGES))),
        ("prune(model on the meta device, x)", outcome(lambda: prune(make_conv_net().to("meta"), IMAGES))),
        ("prune(model, x on the meta device)", outcome(lambda: prune(model, IMAGES.to("meta")))),
        ("save_pruned(None, dir)", outcome(lambda: save_pruned(None, tmp / "x"))),
        ("save_pruned(model, 3)", outcome(lambda: save_pruned(model, 3))),
        ("save_pruned(model, dir, extra_json={'r.json': {'x': object()}})",
         outcome(lambda: save_pruned(model, tmp / "x", extra_json={"r.json": {"x": object()}}))),
        ("load_pruned(dir, model='lenet')", outcome(lambda: load_pruned(tmp, model="lenet"))),
    ]
    for name, changes in [("conv1", {"kernel_size": [20000, 20000]}), ("conv2", {"stride": [0, 0]}),
                          ("conv2", {"padding": [10**6, 10**6]}), ("conv2", {"groups": 5}),
                          ("bn1", {"eps": -1.0}), ("fc1", {"out_features": 10**7})]:
        out = damaged(tmp, name, **changes)
        table.append((f"load_pruned of an architecture.json edited to {name} {changes}",
                      outcome(lambda out=out: load_pruned(out, model=make_conv_net()))))
    table.append(("interpolation warning with PruneConfig(ridge=0.1) and 12 samples",
                  ("warning", interpolation_warning(), 0.0)))
    for argv in (["--threads", "x"], ["--threads", "0"], ["--calib", "1.5"], ["--calib", "1"], ["--seed", "-3"],
                 ["--finetune-epochs", "0"]):
        table.append((f"subprune prune {' '.join(argv)}", cli_outcome(["prune", *argv])))
    try:
        mismatch, widths, huge = hf_directories(tmp)
    except ImportError:
        table.append(("hf rows", ("skipped", "transformers is not installed", 0.0)))
    else:
        from subprune.hf import load_pruned as hf_load

        table.append(("subprune evaluate --model hf:DIR (config.json says 3 layers, weights have 2)",
                      cli_outcome(["evaluate", "--model", f"hf:{mismatch}"])))
        table.append(("subprune prune --model hf:DIR (the same directory)",
                      cli_outcome(["prune", "--model", f"hf:{mismatch}", "--calib", "8", "--quiet"])))
        table.append(("subprune.hf.load_pruned, subprune_widths ffn=10^6", outcome(lambda: hf_load(widths))))
        table.append(("subprune.hf.load_pruned, config.json intermediate_size=10^10", outcome(lambda: hf_load(huge))))
    ro, mnt, small, tiny = tmp / "ro", tmp / "mnt", tmp / "small", tmp / "tiny"
    if _mount(ro, "size=1m", "ro") and _mount(mnt, "size=1m") and _mount(small, "size=512k") and _mount(
            tiny, "size=128k"):
        try:
            table.append(("subprune prune --out on a read-only filesystem",
                          cli_outcome(["prune", "--calib", "64", "--quiet", "--out", str(ro / "pruned")])))
            table.append(("subprune prune --out naming a mount point",
                          cli_outcome(["prune", "--calib", "64", "--quiet", "--out", str(mnt)])))
            table.append(("save_pruned of a 642 KB model into a 512 KB filesystem",
                          outcome(lambda: save_pruned(torch.nn.Sequential(torch.nn.Linear(400, 400)),
                                                      small / "out"))))
            table.append(("subprune prune --model lenet --out on a 128 KB filesystem (LeNet: 246 KB)",
                          cli_outcome(["prune", "--calib", "64", "--quiet", "--out", str(tiny / "pruned")])))
        finally:
            for path in (ro, mnt, small, tiny):
                subprocess.run(["umount", str(path)], capture_output=True)
    else:
        table.append(("read-only / mount point / full disk", ("skipped", "cannot mount a tmpfs here", 0.0)))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bad_input.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bad-input-"))
    try:
        table = rows(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["# Bad input: what subprune answers", "",
             f"Command: `{' '.join(['python scripts/bad_input_table.py', *sys.argv[1:]])}`", "",
             "Temporary paths are shown as TMP.", "", "| input | answer | message | seconds |", "|---|---|---|---|"]
    for what, (answer, message, seconds) in table:
        message = message.replace(str(tmp), "TMP").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{what}` | {answer} | {message} | {seconds:.2f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
