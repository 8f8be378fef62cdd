"""The block engine against the per-site engine it replaced: SmolLM2-135M and LLaMA-shaped random models.

Every run is a fresh worker process (so its peak RSS is its own): load the
model, then prune with ``prune_transformer`` at 50% of the prunable parameters
(``params=0.5``, heads and FFN) and measure

* wall-clock of the prune, and of its per-site selection + refit + surgery
  (``_prune_site``, timed the same way in both engines) as "solver";
* peak RSS during the prune (VmHWM reset after loading, /proc/self/clear_refs);
* block executions, counted with forward pre-hooks on the model's blocks (the
  engines' block copies inherit them), partial executions included;
* perplexity of the pruned model on the last 32 Wikipedia passages and the first
  32 Lee news articles (never calibration text), and the kept units.

A "dense" worker per (model, passages) times one dense forward of the whole
model over the same calibration set, for the ratio prune / dense forward.
"old" runs execute the commit before the block engine (c4a0384, extracted with
``git archive`` into a temporary directory and put first on PYTHONPATH), with the
new engine's plan handed over as per-site keep ratios (:func:`new_plan`); "new"
runs this checkout. Groups (``--groups``, run in the order given): ``engine``
(SmolLM2 at 32/128 passages, Layer/Seq/Asym, new; old: Layer at 32 and 128, Seq
at 32, Asym at 32 with ``--old-asym``), ``depth`` (random LLaMA at SmolLM2 width
with 8/16/32 blocks, 32 passages, Asym/Layer/Seq), ``grid`` (SmolLM2, 128
passages, Layer/Seq/Asym/Wanda/Wanda-sp/FLAP at 20% and 50% of the prunable
parameters removed; old: Layer at 128, Seq and Wanda at 32), ``engine512`` (512
passages), ``mixed`` (SmolLM2 at 32/128 passages: Asym with the default float64 statistics and Asym
with ``precision="mixed"``, float32 Gram products summed in float64; each run also times one dense
forward in its own process just before the prune, and its ratio is taken against that). Rows go to a
JSON-lines file (resumable); the tables to markdown
(``--table``: cost; ``--grid-table``: old vs new perplexities and kept units).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llm_engine.py --groups engine depth grid engine512 \
        --out results/llm_engine.jsonl --table results/llm_engine.md --grid-table results/llm_engine_grid.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "c4a0384"
HELDOUT = 32
BATCH = 16
BEFORE = "results/llm_engine_4f9c309.jsonl"
SESSION = time.strftime("%Y-%m-%d", time.gmtime())  # a row's session: ratios only against a dense forward of the same
OLD_ROWS = "results/llm_engine_old.jsonl"
RUNS = "--groups engine depth grid engine512 --old-asym"
COMMAND = ("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/llm_engine.py "
           f"{RUNS} --engine new --out results/llm_engine.jsonl; the same with --engine old --out {OLD_ROWS}; "
           f"then the tables: --table-only --out results/llm_engine.jsonl --inputs {OLD_ROWS} --before {BEFORE} "
           "--notes results/llm_engine_notes.md --table results/llm_engine.md --grid-table results/llm_engine_grid.md")
NOTE = ("This table: the runs of those two queues (each its runs one at a time, one process with one thread a run; "
        "the two queues side by side, so at most two of this benchmark's processes at once; selected with "
        "--methods/--passages/--layers/--params), the most needed first, until the session's time ran out; the "
        "old engine's rows in their own file so that the queues never write the same file; a run that is not in "
        "the table did not fit (see the notes below the table). 'before' = the same "
        f"run with the block engine as of commit 4f9c309 (rows in {BEFORE}), before its statistics were made "
        "cheaper (G on its upper block triangle, the dense consumers' outputs reused for the target energies "
        "and for the FFN swap, non-finite checks on the diagonals).")


# ----------------------------------------------------------------------------------------------- worker side
def _status(key: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _cpu() -> float:
    """User + system CPU seconds of this process (all threads): less sensitive than wall-clock to a shared machine."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load(spec: dict):
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["directory"], local_files_only=True)
    if spec["model"] == "smollm2":
        model = transformers.LlamaForCausalLM.from_pretrained(spec["directory"], dtype=torch.float32,
                                                              local_files_only=True)
    else:  # LLaMA-shaped random model at SmolLM2 width
        torch.manual_seed(0)
        base = transformers.AutoConfig.from_pretrained(spec["directory"], local_files_only=True)
        config = transformers.LlamaConfig(
            vocab_size=base.vocab_size, hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
            num_attention_heads=base.num_attention_heads, num_key_value_heads=base.num_key_value_heads,
            num_hidden_layers=spec["layers"], max_position_embeddings=2048, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config)
    return model.eval(), tokenizer


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from subprune.hf import prune as prune_module
    from subprune.hf.architectures import blocks
    from subprune.hf.text import tokenize, wikipedia_passages

    model, tokenizer = _load(spec)
    passages = wikipedia_passages()
    calibration = tokenize(tokenizer, passages[: spec["passages"]])
    row = dict(spec, tokens=int(calibration["attention_mask"].sum()), seq_len=int(calibration["input_ids"].shape[1]),
               load_average=os.getloadavg()[0],  # the machine is shared: its 1-minute load when the run started
               session=spec.get("session") or SESSION)

    def dense_forward() -> tuple[float, float]:
        start, cpu = time.perf_counter(), _cpu()
        with torch.no_grad():
            for i in range(0, spec["passages"], BATCH):
                model(**{k: v[i : i + BATCH] for k, v in calibration.items()})
        return time.perf_counter() - start, _cpu() - cpu

    if spec["method"] == "dense":
        row["dense_forward_s"], row["dense_forward_cpu_s"] = dense_forward()
        if spec.get("evaluate", True):
            row.update(_quality(model, tokenizer, passages))
        return row

    if spec.get("time_dense"):  # the dense forward in this process, just before the prune: the same machine load
        row["own_forward_s"], row["own_forward_cpu_s"] = dense_forward()
    _, layers = blocks(model)
    executions = []
    for block in layers:
        block.register_forward_pre_hook(lambda m, a: executions.append(1))
    solver = [0.0, 0.0]
    original = prune_module._prune_site

    def timed(*args, **kwargs):
        start, cpu = time.perf_counter(), _cpu()
        try:
            return original(*args, **kwargs)
        finally:
            solver[0] += time.perf_counter() - start
            solver[1] += _cpu() - cpu

    prune_module._prune_site = timed
    row["rss_loaded_mb"] = _status("VmRSS") / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    if spec.get("keep"):  # the old engine: the new engine's plan at this target, as per-site keep ratios
        config = prune_module.TransformerPruneConfig(method=spec["method"], keep=spec["keep"], batch_size=BATCH)
    else:
        extra = {"precision": spec["precision"]} if "precision" in spec else {}  # the old tree has no option
        config = prune_module.TransformerPruneConfig(method=spec["method"], heads=0.5, ffn=0.5,
                                                     params=spec["params"], batch_size=BATCH, **extra)
    start, cpu = time.perf_counter(), _cpu()
    result = prune_module.prune_transformer(model, calibration, config)
    row["prune_s"] = time.perf_counter() - start
    row["prune_cpu_s"] = _cpu() - cpu
    row["peak_rss_mb"] = _status("VmHWM") / 2**20
    row["solver_s"], row["solver_cpu_s"] = solver
    row["block_executions"] = len(executions)
    row["batches"] = -(-spec["passages"] // BATCH)
    row["keep"] = {s.name: s.keep for s in result.sites}
    if spec.get("evaluate", True):
        row.update(_quality(result.model, tokenizer, passages))
    return row


def _quality(model, tokenizer, passages: list[str]) -> dict:
    """Held-out perplexities and the parameter count (the old tree has no Lee loader: the file is read here)."""
    from subprune.hf.evaluate import perplexity
    from subprune.hf.text import gensim_test_data, tokenize

    lines = (gensim_test_data() / "lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    lee = [line.strip() for line in lines if line.strip()][:HELDOUT]
    return {"wiki_ppl": perplexity(model, tokenize(tokenizer, passages[-HELDOUT:])),
            "lee_ppl": perplexity(model, tokenize(tokenizer, lee)),
            "params_kept": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------------------------- parent side
def _smol(n: int, method: str, engine: str, params: float | None = 0.5, **extra) -> dict:
    spec = {"model": "smollm2", "layers": 30, "passages": n, "method": method, "engine": engine, **extra}
    return spec if method == "dense" else dict(spec, params=params)


def runs(groups: list[str], old_asym: bool) -> list[dict]:
    """The runs of each group, cheapest and most needed first (a session that stops early keeps those)."""
    out = []
    if "smoke" in groups:  # a few seconds: both engines on a 2-block random model
        out.append({"model": "random", "layers": 2, "passages": 8, "method": "dense", "engine": "new",
                    "evaluate": False})
        for engine in ("new", "old"):
            out.append({"model": "random", "layers": 2, "passages": 8, "method": "asym", "engine": engine,
                        "params": 0.5, "evaluate": False})
    if "engine" in groups:  # SmolLM2 at 32 and 128 passages; the old engine where it is affordable
        for n in (32, 128):
            out.append(_smol(n, "dense", "new", evaluate=True))
            out += [_smol(n, method, "new") for method in ("layer", "seq", "asym")]
        # the old engine passes the calibration set through the model per site: Layer costs one pass, Seq ~30
        # and Asym ~60 full forwards, so on this shared 2-core machine Seq only at 32 passages (Asym: --old-asym)
        out += [_smol(32, "layer", "old"), _smol(128, "layer", "old"), _smol(32, "seq", "old")]
        if old_asym:
            out.append(_smol(32, "asym", "old"))
    if "depth" in groups:  # time linear in blocks: LLaMA-shaped random models at SmolLM2 width
        for layers in (8, 16, 32):
            out.append({"model": "random", "layers": layers, "passages": 32, "method": "dense", "engine": "new",
                        "evaluate": False})
            for method in ("asym", "layer", "seq"):
                out.append({"model": "random", "layers": layers, "passages": 32, "method": method,
                            "engine": "new", "params": 0.5, "evaluate": False})
    if "grid" in groups:  # 20% and 50% of the prunable parameters removed, 128 passages (the 50% Layer/Seq/Asym
        # rows come from the engine group); the old engine: Layer (one pass) at 128, the sequential ones at 32
        out += [_smol(128, method, "new") for method in ("wanda", "wanda-sp", "flap")]
        out += [_smol(128, method, "new", 0.8) for method in ("layer", "seq", "asym", "wanda", "wanda-sp", "flap")]
        out += [_smol(128, "layer", "old", 0.8), _smol(32, "wanda", "new"), _smol(32, "wanda", "old")]
        out += [_smol(32, method, "new", 0.8) for method in ("seq", "asym")]
        out += [_smol(32, method, "old", 0.8) for method in ("seq",)]
    if "mixed" in groups:  # float32 Gram products (summed in float64) beside float64, in one run (its own --out
        for n in (32, 128):  # file); each times a dense forward in its own process for its ratio
            out += [_smol(n, "asym", "new", time_dense=True),
                    _smol(n, "asym", "new", precision="mixed", time_dense=True)]
    if "engine512" in groups:
        out += [_smol(512, "dense", "new", evaluate=False), _smol(512, "layer", "new"), _smol(512, "layer", "old"),
                _smol(512, "asym", "new"), _smol(512, "seq", "new")]
    return out


def key(row: dict) -> tuple:
    return (row["model"], row["layers"], row["passages"], row["method"], row["engine"], row.get("params"),
            row.get("precision", "float64"))


def dense_key(row: dict) -> tuple:
    """The dense forward a row's ratio is taken against: same model and passages, same session (the shared machine's
    speed per CPU second differs between sessions by up to 3x; rows without a session are the earlier ones)."""
    return (row["model"], row["layers"], row["passages"], row.get("session"))


def done_key(row: dict, session: str | None) -> tuple:
    """Resume key: a pruning run once; a dense forward once per session."""
    return key(row) + ((session,) if row["method"] == "dense" else ())


def old_tree() -> Path:
    """The commit before the block engine, extracted once into a temporary directory."""
    target = Path(tempfile.gettempdir()) / f"subprune-{OLD_COMMIT}"
    if not (target / "subprune").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", OLD_COMMIT], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def new_plan(method: str, params: float, directory: Path) -> dict[str, float]:
    """The units per site the new engine's budget gives SmolLM2 at ``params``, as keep ratios.

    The old engine (c4a0384) filled a parameter target differently (1 key/value group and 768 FFN neurons a
    block at params=0.5, against 2 groups and 774 neurons now: the leftover budget is spent one unit at a
    time); handing it the new plan as per-site ratios (round(ratio * n) = the same counts) makes the two
    runs solve the same problems, so their kept units can be compared.
    """
    import transformers

    from subprune.hf import prune as prune_module
    from subprune.hf.architectures import find_transformer_sites

    model = transformers.LlamaForCausalLM.from_pretrained(directory, local_files_only=True)
    config = prune_module.TransformerPruneConfig(method=method, heads=0.5, ffn=0.5, params=params)
    sites = find_transformer_sites(model, config.units)
    plan = prune_module._plan(sites, config)
    sites = [s for s in sites if s.name in plan]
    plan = prune_module.budget_plan(model, sites, plan, config, {})
    channels = {s.name: s.channels for s in sites}
    return {name: k / channels[name] for name, k in plan.items()}


def launch(spec: dict, threads: int, directory: Path) -> dict:
    spec = dict(spec, threads=threads, directory=str(directory))
    if spec["engine"] == "old" and spec["model"] == "smollm2" and spec["method"] != "dense":
        spec["keep"] = new_plan(spec["method"], spec["params"], directory)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(old_tree() if spec["engine"] == "old" else ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "row.json"
        spec_file.write_text(json.dumps(spec))
        subprocess.run([sys.executable, __file__, "--worker", str(spec_file), str(out_file)], env=env, check=True)
        return json.loads(out_file.read_text())


def _method(row: dict) -> str:
    """The method, with the Gram precision where it is not the default float64."""
    precision = row.get("precision", "float64")
    return row["method"] if precision == "float64" else f"{row['method']} ({precision})"


def _fmt(value, digits=1):
    return "" if value is None else f"{value:,.{digits}f}"


def _forward(row: dict, dense: dict) -> dict:
    """The dense forward a row's ratio is taken against: its own (``time_dense``: timed in the same process just
    before the prune, under the same load) or else the dense row of its model and passages in its session."""
    if "own_forward_cpu_s" in row:
        return {"dense_forward_s": row["own_forward_s"], "dense_forward_cpu_s": row["own_forward_cpu_s"]}
    return dense.get(dense_key(row), {})


def _ratio_cpu(row: dict, dense: dict) -> float | None:
    """(prune - solver) / one dense forward, CPU seconds; None without the dense row or CPU times."""
    d = _forward(row, dense)
    if "prune_cpu_s" not in row or not d.get("dense_forward_cpu_s"):
        return None
    return (row["prune_cpu_s"] - row["solver_cpu_s"]) / d["dense_forward_cpu_s"]


def table(rows: list[dict], before: list[dict] | None = None, notes: str = "") -> str:
    dense = {dense_key(r): r for r in rows if r["method"] == "dense"}
    new = {key(r): r for r in rows if r["engine"] == "new" and r["method"] != "dense"}
    before = before or []
    dense_before = {dense_key(r): r for r in before if r["method"] == "dense"}
    earlier = {key(r): r for r in before if r["method"] != "dense"}
    lines = [f"`{COMMAND}`", "", NOTE, "",
             "Pruning SmolLM2-135M-Instruct and LLaMA-shaped random models (SmolLM2 width) with `prune_transformer`, "
             "20% or 50% of the prunable parameters removed (column 'removed': `params=0.8` or `0.5`), "
             f"batches of {BATCH} passages of at most 128 tokens; "
             "each row a fresh process with one thread; old = commit c4a0384 (per-site engine), given the new "
             "engine's plan as per-site keep ratios; new = block engine with the one per-site step. "
             "Solver = selection + refit + surgery of all sites (`_prune_site`, the same code in both engines). "
             "fwd = one dense forward of the whole model (head included) over the same calibration set, measured in "
             "the same session as the row (blank: none in that session). "
             "CPU = user + system seconds of the process: the machine (2 cores) was shared with other jobs "
             "(load = its 1-minute load average when the run started), which inflates wall-clock unevenly; CPU "
             "seconds are the steadier measure. Executions = block forward calls counted with hooks (partial calls "
             "included); per block-batch = executions / (blocks x batches). Peak RSS: during the prune, the loaded "
             f"model included. Perplexities on the last {HELDOUT} Wikipedia passages and the first {HELDOUT} Lee news "
             "articles; 'same units' = the old engine kept exactly the units the new one kept (for a "
             "(mixed) row: the same run with float64 statistics).", "",
             "| model | blocks | passages | removed | method | engine | load | prune s | solver s | fwd s "
             "| (prune - solver) / fwd | prune CPU s | solver CPU s | fwd CPU s | (prune - solver) / fwd, CPU "
             "| peak RSS MB | RSS loaded MB | executions | per block-batch | wiki ppl | lee ppl | same units "
             "| before: prune CPU s | before: (prune - solver) / fwd, CPU | same units as before |",
             "|" + "---|" * 25]
    for r in sorted((r for r in rows if r["method"] != "dense"),
                    key=lambda r: (r["model"], r["layers"], r["passages"], -r["params"], r["method"], r["engine"],
                                   r.get("precision", "float64"))):
        d = _forward(r, dense)
        fwd, fwd_cpu = d.get("dense_forward_s"), d.get("dense_forward_cpu_s")
        rest = r["prune_s"] - r["solver_s"]
        rest_cpu = r["prune_cpu_s"] - r["solver_cpu_s"] if "prune_cpu_s" in r else None
        mixed = r.get("precision", "float64") != "float64"  # compared with the float64 run instead of the old engine
        counterpart = new.get(key(dict(r, engine="new", precision="float64")))
        same = ("" if (r["engine"] == "new" and not mixed) or counterpart is None
                else "yes" if counterpart["keep"] == r["keep"] else "no")
        then = earlier.get(key(r)) if r["engine"] == "new" else None
        then_ratio = None if then is None else _ratio_cpu(then, dense_before)
        then_same = "" if then is None else ("yes" if then.get("keep") == r.get("keep") else "no")
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['passages']} | {1 - r['params']:.0%} | {_method(r)} "
            f"| {r['engine']} "
            f"| {_fmt(r.get('load_average'))} | {_fmt(r['prune_s'])} | {_fmt(r['solver_s'])} | {_fmt(fwd)} "
            f"| {_fmt(fwd and rest / fwd, 2)} | {_fmt(r.get('prune_cpu_s'))} | {_fmt(r.get('solver_cpu_s'))} "
            f"| {_fmt(fwd_cpu)} | {_fmt(fwd_cpu and rest_cpu is not None and rest_cpu / fwd_cpu, 2)} "
            f"| {_fmt(r['peak_rss_mb'], 0)} | {_fmt(r['rss_loaded_mb'], 0)} "
            f"| {r['block_executions']:,} | {r['block_executions'] / (r['layers'] * r['batches']):.2f} "
            f"| {_fmt(r.get('wiki_ppl'), 2)} | {_fmt(r.get('lee_ppl'), 2)} | {same} "
            f"| {_fmt(then and then.get('prune_cpu_s'))} | {_fmt(then_ratio, 2)} | {then_same} |")
    if notes:
        lines += ["", notes.strip()]
    for r in rows:
        if r["method"] == "dense" and "wiki_ppl" in r:
            lines += ["", f"Dense {r['model']}: wiki ppl {r['wiki_ppl']:.2f}, lee ppl {r['lee_ppl']:.2f} "
                          f"({r['params_kept']:,} parameters)."]
            break
    grid = [r for r in rows if r["model"] == "smollm2" and r["passages"] == 128 and r["engine"] == "new"
            and r["method"] != "dense"]
    if grid:
        dense_ppl = [r for r in rows if r["model"] == "smollm2" and r["method"] == "dense" and "wiki_ppl" in r]
        lines += ["", "SmolLM2-135M, 128 calibration passages, new engine: perplexity by method and fraction of the "
                  "prunable (attention + FFN) parameters removed.", "",
                  "| method | removed | params kept | wiki ppl | lee ppl | prune s |", "|---|---|---|---|---|---|"]
        for r in dense_ppl[:1]:
            lines.append(f"| dense | 0 | {r['params_kept']:,} | {r['wiki_ppl']:.2f} | {r['lee_ppl']:.2f} | |")
        for r in sorted(grid, key=lambda r: (-r["params"], r["method"])):
            lines.append(f"| {_method(r)} | {1 - r['params']:.0%} | {r['params_kept']:,} | {r['wiki_ppl']:.2f} "
                         f"| {r['lee_ppl']:.2f} | {r['prune_s']:.0f} |")
    return "\n".join(lines) + "\n"


GRID_COMMAND = COMMAND


def grid_table(rows: list[dict]) -> str:
    """Old vs new engine where the maths is the same: perplexities and kept units by method and fraction removed."""
    smol = [r for r in rows if r["model"] == "smollm2" and r["method"] != "dense" and "wiki_ppl" in r
            and r.get("precision", "float64") == "float64"]
    at = {(r["method"], r["params"], r["passages"], r["engine"]): r for r in smol}
    dense = next((r for r in rows if r["model"] == "smollm2" and r["method"] == "dense" and "wiki_ppl" in r), None)
    lines = [f"`{GRID_COMMAND}`", "",
             "SmolLM2-135M-Instruct, seed 0, batches of 16 passages of at most 128 tokens; perplexity on the last "
             f"{HELDOUT} Wikipedia passages (wiki) and the first {HELDOUT} Lee news articles (lee), never calibration "
             "text. new = the block engine with the one per-site step of this checkout; old = commit c4a0384 (the "
             "per-site engine), handed the new engine's plan as per-site keep ratios (its own parameter-target "
             "fill differs: 1 key/value group and 768 FFN neurons a block at 50% instead of 2 and 774). "
             "'same units' = the old engine kept exactly the units the new one kept on the same "
             "calibration set. The old engine passes the calibration set through the model once per site for the "
             "sequential methods (Seq, Wanda: ~30 full forwards; Asym ~60), so on this shared 2-core machine it ran "
             "those at 32 passages only, beside the new engine at 32; Layer (one pass) at 128. Wanda-sp and FLAP's "
             "adaptive structure do not exist in c4a0384 (its FLAP was sequential with a uniform structure: other "
             "maths), so they have no old column. A blank cell, or a method or fraction without a row: not run "
             "(results/llm_engine_notes.md lists what was not; the 3-seed sweep of every method with the new "
             "engine is results/llm_sweep.md).", "",
             "| method | removed | new 128: wiki | lee | new 32: wiki | lee | old: passages | wiki | lee "
             "| same units |", "|" + "---|" * 10]
    if dense:
        lines.append(f"| dense | 0% | {dense['wiki_ppl']:.2f} | {dense['lee_ppl']:.2f} | | | | | | |")
    methods = ("layer", "seq", "asym", "wanda", "wanda-sp", "flap")
    for params in (0.8, 0.5):
        for method in methods:
            new128, new32 = at.get((method, params, 128, "new")), at.get((method, params, 32, "new"))
            old = at.get((method, params, 128, "old")) or at.get((method, params, 32, "old"))
            if not (new128 or new32 or old):
                continue
            same = ""
            if old is not None:
                twin = at.get((method, params, old["passages"], "new"))
                same = "" if twin is None else ("yes" if twin["keep"] == old["keep"] else "no")

            def ppl(r, k):
                return "" if r is None else f"{r[k]:,.2f}"

            lines.append(f"| {method} | {1 - params:.0%} | {ppl(new128, 'wiki_ppl')} | {ppl(new128, 'lee_ppl')} "
                         f"| {ppl(new32, 'wiki_ppl')} | {ppl(new32, 'lee_ppl')} "
                         f"| {'' if old is None else old['passages']} | {ppl(old, 'wiki_ppl')} | {ppl(old, 'lee_ppl')} "
                         f"| {same} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--groups", nargs="+", default=["engine", "depth", "grid", "engine512"],
                        choices=["engine", "depth", "grid", "engine512", "mixed", "smoke"])
    parser.add_argument("--old-asym", action="store_true", help="also run the old engine's Asym at 32 passages")
    parser.add_argument("--engine", choices=["new", "old"], default=None,
                        help="only the runs of this engine (dense forwards count as new); for parallel parents")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/llm_engine.jsonl")
    parser.add_argument("--table", default=None)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--grid-table", default=None, help="markdown file for the old-vs-new perplexity table")
    parser.add_argument("--inputs", nargs="*", default=[], help="more JSON-lines files for the table (parallel runs)")
    parser.add_argument("--before", default=None,
                        help="JSON-lines rows of an earlier version of this code: its CPU ratio and kept units "
                             "beside each new-engine row")
    parser.add_argument("--notes", default=None, help="a markdown file whose text goes below the table")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (dense included if named)")
    parser.add_argument("--passages", nargs="+", type=int, default=None, help="only these calibration sizes")
    parser.add_argument("--layers", nargs="+", type=int, default=None, help="only models with these block counts")
    parser.add_argument("--params", nargs="+", type=float, default=None, help="only these parameter fractions")
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(worker(spec)))
        return

    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not args.table_only:
        from subprune.hf.smollm2 import smollm2_directory

        directory = smollm2_directory()
        done = {done_key(r, r.get("session")) for r in rows}
        specs = [spec for group in args.groups for spec in runs([group], args.old_asym)
                 if (args.engine is None or spec["engine"] == args.engine)
                 and (args.methods is None or spec["method"] in args.methods)
                 and (args.passages is None or spec["passages"] in args.passages)
                 and (args.layers is None or spec["layers"] in args.layers)
                 and (args.params is None or spec["method"] == "dense" or spec.get("params") in args.params)]
        for spec in specs:
            if done_key(spec, SESSION) in done:
                continue
            print("running", spec, flush=True)
            row = launch(spec, args.threads, directory)
            row.pop("directory", None)  # (a path of this machine)
            rows.append(row)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print({k: v for k, v in row.items() if k != "keep"}, flush=True)
    extra = [json.loads(line) for path in args.inputs for line in Path(path).read_text().splitlines()]
    before = [json.loads(line) for line in Path(args.before).read_text().splitlines()] if args.before else []
    notes = Path(args.notes).read_text() if args.notes else ""
    text = table(rows + extra, before, notes)
    if args.table:
        Path(args.table).write_text(text)
    if args.grid_table:
        Path(args.grid_table).write_text(grid_table(rows + extra))
    print(text)
    times = [r["prune_s"] for r in rows if "prune_s" in r]
    if times:
        print(f"median prune time over {len(times)} runs: {statistics.median(times):.1f} s")


if __name__ == "__main__":
    main()
