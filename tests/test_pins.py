"""Pinned results: kept units and pruned outputs of small fixed models, recorded before the two pipelines
(fx graphs and transformer blocks) were merged into one per-site step; any change of the maths shows here.

Regenerate (only when a change of the results is intended, and say why in the commit):
``OMP_NUM_THREADS=1 .venv/bin/python tests/test_pins.py --write``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_conv_net  # noqa: E402

from subprune import PruneConfig, prune  # noqa: E402

PINS = Path(__file__).parent / "data" / "pins.json"

CNN_CASES = {
    "conv-layer": dict(method="layer", keep=0.5),
    "conv-seq": dict(method="seq", keep=0.5),
    "conv-asym": dict(method="asym", keep=0.5),
    "conv-asym-curve": dict(method="asym", compression=2.0, budget="curve"),
    "conv-asym-noreweight": dict(method="asym", keep=0.4, reweight=False),
    "conv-layer-weightnorm": dict(method="layer-weightnorm", keep=0.5),
    "conv-weightnorm-global": dict(method="weightnorm", keep=0.5),
    "residual-asym-coupled": dict(method="asym", keep=0.5, coupled=True),
}
LLM_CASES = {
    "llama-layer": dict(method="layer"),
    "llama-seq": dict(method="seq"),
    "llama-asym": dict(method="asym"),
    "llama-asym-qheads": dict(method="asym", units="qheads", heads=2 / 3),
    "llama-seq-intercept": dict(method="seq", intercept=True),
    "llama-asym-curve": dict(method="asym", budget="curve", params=0.6),
    "llama-wanda": dict(method="wanda"),
    "llama-wanda-sp": dict(method="wanda-sp", params=0.6),
    "llama-flap-noreweight": dict(method="flap", params=0.6, reweight=False),
    "llama-layer-swap": dict(method="layer-swap"),
    "opt-asym-intercept": dict(method="asym", intercept=True),
}


class Residual(nn.Module):
    """Two residual blocks on one stream: coupled sites with several producers and consumers."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.a1, self.a2 = nn.Linear(12, 16), nn.Linear(16, 12)
        self.b1, self.b2 = nn.Linear(12, 16), nn.Linear(16, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.a2(torch.relu(self.a1(h)))
        h = h + self.b2(torch.relu(self.b1(h)))
        return self.out(h)


def _digest(out: torch.Tensor) -> dict:
    """A few entries and the sums of an output tensor (enough to see any change of the pruned model)."""
    flat = out.detach().double().flatten()
    step = max(1, flat.numel() // 40)
    return {"sample": flat[::step][:40].tolist(), "sum": float(flat.sum()), "abs": float(flat.abs().sum())}


def _cnn(name: str) -> dict:
    if name.startswith("residual"):
        torch.manual_seed(0)
        model = Residual().eval()
        data = torch.randn(128, 6, generator=torch.Generator().manual_seed(1))
    else:
        model = make_conv_net()
        data = torch.randn(96, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    result = prune(model, data, PruneConfig(progress=False, **CNN_CASES[name]))
    with torch.no_grad():
        out = result.model(data[:8])
    return {"keep": {s.name: s.keep for s in result.sites}, "out": _digest(out)}


def _tokens() -> dict:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (40, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[:5, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _llm(name: str) -> dict:
    from test_hf import llama, opt

    from subprune.hf import TransformerPruneConfig, prune_transformer

    model = opt() if name.startswith("opt") else llama()
    tokens = _tokens()
    result = prune_transformer(model, tokens, TransformerPruneConfig(batch_size=8, **LLM_CASES[name]))
    with torch.no_grad():
        logits = result.model(input_ids=tokens["input_ids"][:2]).logits
    return {"keep": {s.name: s.keep for s in result.sites}, "out": _digest(logits)}


def _compute(name: str) -> dict:
    return _cnn(name) if name in CNN_CASES else _llm(name)


def _check(name: str) -> None:
    pinned = json.loads(PINS.read_text())[name]
    now = _compute(name)
    assert now["keep"] == pinned["keep"]
    # outputs to float32 rounding: the thread count may change the order of a matmul's sums
    for key in ("sum", "abs"):
        assert now["out"][key] == pytest.approx(pinned["out"][key], rel=1e-5, abs=1e-4)
    torch.testing.assert_close(torch.tensor(now["out"]["sample"]), torch.tensor(pinned["out"]["sample"]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CNN_CASES))
def test_cnn_results_are_pinned(name):
    _check(name)


@pytest.mark.parametrize("name", list(LLM_CASES))
def test_transformer_results_are_pinned(name):
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _check(name)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/test_pins.py --write")
    PINS.parent.mkdir(exist_ok=True)
    PINS.write_text(json.dumps({name: _compute(name) for name in [*CNN_CASES, *LLM_CASES]}, indent=0) + "\n")
    print(f"wrote {PINS}")
