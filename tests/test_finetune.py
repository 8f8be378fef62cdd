"""Fine-tuning after pruning (paper Sec. 5; docs/results.md), GreedyFS on a large labelled set, and their CLI flags."""

import json

import pytest
import torch
from conftest import make_conv_net, make_mlp
from torch import nn

from subprune.baselines import ScoreContext, default_loss, greedy_fs_full_scores, greedy_fs_scores
from subprune.cli import main
from subprune.data import calibration_indices, load_mnist
from subprune.evaluate import accuracy
from subprune.finetune import FinetuneSchedule, NonFiniteLossError, finetune, paper_schedule
from subprune.models import load_model
from subprune.pipeline import PruneConfig, prune
from subprune.sites import find_sites


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_limited_data_finetuning_raises_held_out_accuracy_of_pruned_lenet():
    torch.set_num_threads(1)
    train_x, train_y = load_mnist("train")
    held_x, held_y = load_mnist("val")
    held_x, held_y = held_x[:2000], held_y[:2000]  # training images never used for pruning or fine-tuning
    idx = calibration_indices(train_x.shape[0], 512, 0)
    pruned = prune(load_model("lenet"), train_x[idx],
                   PruneConfig(method="weightnorm", compression=16, progress=False)).model
    before, state = accuracy(pruned, held_x, held_y), _state(pruned)
    result = finetune(pruned, train_x[idx], train_y[idx], paper_schedule("lenet"), seed=0, progress=False)
    after = accuracy(result.model, held_x, held_y)
    assert before < 0.6 and after > before + 0.2  # about 45% -> 80% on MNIST
    assert len(result.losses) == 10 and result.losses[-1] < 0.5 * result.losses[0]
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in state.items())  # the input model is unchanged
    assert [p.shape for p in result.model.parameters()] == [p.shape for p in pruned.parameters()]  # still pruned
    assert not result.model.training


def test_schedule_steps_the_learning_rate_at_the_milestones():
    assert paper_schedule("lenet") == FinetuneSchedule(epochs=10, lr=1e-3)
    others = paper_schedule("advertorch-lenet5")
    assert (others.epochs, others.weight_decay, others.milestones, others.gamma) == (20, 5e-4, (10, 15), 0.1)
    assert [others.lr_at(e) for e in (0, 9, 10, 14, 15, 19)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    model, x = make_mlp(), torch.randn(40, 10, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    schedule = FinetuneSchedule(epochs=5, lr=0.01, milestones=(2, 4), gamma=0.5, batch_size=16)
    result = finetune(model, x, y, schedule, progress=False)
    assert result.lrs == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])
    assert finetune(model, x, y, schedule, progress=False).losses == result.losses  # seeded: reproducible
    assert finetune(model, x, y, schedule, seed=1, progress=False).losses != result.losses


class _Bias(nn.Module):
    """Logits (b, 0) for every input: with label 0 the loss gradient on b is always negative."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.stack([self.b.expand(x.shape[0]), torch.zeros(x.shape[0])], dim=1)  # (N, 2)


def test_the_optimizer_applies_the_scheduled_learning_rates():
    # One Adam step per epoch (one batch); with a gradient of constant sign and nearly constant size each step
    # moves b by about the epoch's learning rate, so b ends near the sum of the scheduled rates.
    x, y = torch.zeros(8, 1), torch.zeros(8, dtype=torch.long)
    schedule = FinetuneSchedule(epochs=5, lr=0.01, milestones=(2, 4), gamma=0.5, batch_size=8)
    result = finetune(_Bias(), x, y, schedule, progress=False)
    assert float(result.model.b.detach()) == pytest.approx(sum(result.lrs), rel=0.02)  # 0.0325; without steps 0.05
    assert result.losses[0] > result.losses[-1]


def test_batchnorm_trains_on_the_copy_and_ends_in_eval_mode(conv_net, images):
    state = _state(conv_net)
    labels = torch.randint(0, 4, (images.shape[0],), generator=torch.Generator().manual_seed(2))
    result = finetune(conv_net, images, labels, FinetuneSchedule(epochs=2, batch_size=32), progress=False)
    assert not result.model.training and not result.model.bn1.training
    assert not torch.equal(result.model.bn1.running_mean, conv_net.bn1.running_mean)  # BN saw training batches
    assert all(torch.equal(v, conv_net.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize(
    "labels,error,message",
    [
        (None, ValueError, "needs labels"),
        (torch.zeros(95, dtype=torch.long), ValueError, "do not match the 96 images"),
        (torch.zeros(96), TypeError, "integer class indices"),
    ],
)
def test_bad_labels_are_refused(conv_net, images, labels, error, message):
    with pytest.raises(error, match=message):
        finetune(conv_net, images, labels, FinetuneSchedule(epochs=1), progress=False)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"epochs": 0}, "epochs=0"),
        ({"epochs": 5, "lr": 0.0}, "lr=0.0"),
        ({"epochs": 5, "milestones": (3, 2)}, "strictly increasing"),
        ({"epochs": 5, "milestones": (5,)}, "in 1..4"),
        ({"epochs": 5, "gamma": 2.0}, "gamma=2.0"),
        ({"epochs": 5, "weight_decay": -1.0}, "weight_decay=-1.0"),
    ],
)
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinetuneSchedule(**kwargs)


def test_nan_loss_names_the_epoch(conv_net, images):
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    bad = images.clone()
    bad[-1] = float("nan")  # whichever shuffled batch holds it fails in the first epoch
    with pytest.raises(NonFiniteLossError, match="in epoch 1 of 3"):
        finetune(conv_net, bad, labels, FinetuneSchedule(epochs=3), progress=False)


def test_greedy_fs_full_equals_greedy_fs_when_the_large_set_is_one_batch():
    model, x = make_mlp(), torch.randn(16, 10, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(4))
    sites, _ = find_sites(model, x[:2])
    kept = {"0": 5, "2": 4}
    common = (model, sites, x, labels, default_loss, 16)
    cyclic = greedy_fs_scores(ScoreContext(*common, torch.Generator(), kept))
    full = greedy_fs_full_scores(ScoreContext(*common, torch.Generator().manual_seed(0), kept, (x, labels)))
    for name, k in kept.items():  # every step sees the same 16 samples (in another order): the same choices
        assert torch.equal(full[name], cyclic[name]) and int((full[name] > 0).sum()) == k
    big_x = torch.randn(400, 10, generator=torch.Generator().manual_seed(5))
    big_y = torch.randint(0, 3, (400,), generator=torch.Generator().manual_seed(6))
    first = greedy_fs_full_scores(ScoreContext(*common, torch.Generator().manual_seed(1), kept, (big_x, big_y)))
    second = greedy_fs_full_scores(ScoreContext(*common, torch.Generator().manual_seed(1), kept, (big_x, big_y)))
    assert all(torch.equal(first[n], second[n]) and int((first[n] > 0).sum()) == k for n, k in kept.items())
    with pytest.raises(ValueError, match="labels must be a Tensor of shape"):
        greedy_fs_full_scores(ScoreContext(*common, torch.Generator(), kept, (big_x, big_y[:10])))


def test_greedy_fs_full_needs_labels_and_a_large_labelled_set():
    model, x = make_conv_net(), torch.randn(32, 1, 14, 14, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(1))
    config = PruneConfig(method="layer-greedyfs-full", keep=0.5, progress=False)
    with pytest.raises(ValueError, match="needs labelled"):
        prune(model, x, config)
    with pytest.raises(ValueError, match="score_data=\\(inputs, labels\\)"):
        prune(model, x, config, labels=labels)
    big = torch.randn(300, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    result = prune(model, x, config, labels=labels, score_data=(big, torch.randint(0, 4, (300,))))
    assert [s.kept for s in result.sites] == [3, 4, 10, 6]


def test_cli_reports_accuracy_before_and_after_finetuning(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--model", "lenet", "--method", "weightnorm", "--compression", "16", "--calib", "256",
                 "--finetune", "limited", "--finetune-epochs", "3", "--quiet", "--json", "--out", str(out)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["finetune"] == "limited" and report["finetune_samples"] == 256
    assert report["finetune_schedule"]["epochs"] == 3 and len(report["finetune_losses"]) == 3
    assert report["finetuned_accuracy"] > report["pruned_accuracy"] + 0.05
    assert main(["evaluate", str(out)]) == 0  # the saved model is the fine-tuned one
    assert f"test accuracy {report['finetuned_accuracy']:.2%}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["prune", "--model", "hf:minilm", "--finetune", "limited"], "--finetune not supported for hf: models"),
        (["prune", "--finetune-epochs", "3", "--calib", "16", "--quiet"], "needs --finetune limited"),
    ],
)
def test_finetune_flags_are_refused_where_they_do_not_apply(argv, message, capsys):
    assert main(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())
