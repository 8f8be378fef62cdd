"""Calibration over two processes (gloo on localhost) equals one process on all samples."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_conv_net

from subprune.distributed import all_reduce_statistics, check_same_selection, shard
from subprune.models.cnn import ARCHITECTURES
from subprune.pipeline import PruneConfig, prune
from subprune.statistics import GramStatistics

METHODS = ("layer", "seq", "asym")
WORLD = 2


def _calibration() -> torch.Tensor:
    return torch.randn(96, 1, 14, 14, generator=torch.Generator().manual_seed(1))


def _images() -> torch.Tensor:
    return torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _config(method: str, **extra) -> PruneConfig:
    return PruneConfig(method=method, keep=0.5, batch_size=20, progress=False, **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        part = shard(_calibration())
        results = {}
        for method in METHODS:
            result = prune(make_conv_net(), part, _config(method, distributed=True))
            results[method] = {
                "keep": [s.keep for s in result.sites],
                "rows": [s.rows for s in result.sites],
                "objective": [s.objective for s in result.sites],
                "state": result.model.state_dict(),
                "samples": part.shape[0],
            }
        # A consumer fed by three concatenated branches is refit jointly from all-reduced sums.
        result = prune(ARCHITECTURES["inception"](0), shard(_images()), _config("seq", distributed=True))
        results["joint"] = {"refits": result.joint_refits, "state": result.model.state_dict()}
        # Ranks that disagree are caught, on every rank.
        try:
            check_same_selection("probe", torch.tensor([0, 1 + rank]))
            results["mismatch_caught"] = False
        except RuntimeError:
            results["mismatch_caught"] = True
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_select_the_same_channels_as_one(two_process_results, method):
    reference = prune(make_conv_net(), _calibration(), _config(method))
    assert [r[method]["samples"] for r in two_process_results] == [48, 48]
    for ranked in two_process_results:
        got = ranked[method]
        assert got["keep"] == [s.keep for s in reference.sites]  # identical selections
        assert got["rows"] == [s.rows for s in reference.sites]  # the all-reduce saw every sample
        assert got["objective"] == pytest.approx([s.objective for s in reference.sites], rel=1e-9, abs=1e-12)
        expected = reference.model.state_dict()
        assert got["state"].keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got["state"][name], tensor, rtol=1e-5, atol=1e-6)
    # Both ranks hold exactly the same pruned model.
    first, second = (r[method]["state"] for r in two_process_results)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_joint_refit_over_two_processes_equals_one(two_process_results):
    reference = prune(ARCHITECTURES["inception"](0), _images(), _config("seq"))
    assert list(reference.joint_refits) == ["mix"]
    for ranked in two_process_results:
        assert ranked["joint"]["refits"] == pytest.approx(reference.joint_refits, rel=1e-9)
        torch.testing.assert_close(ranked["joint"]["state"]["mix.weight"], reference.model.mix.weight,
                                   rtol=1e-5, atol=1e-6)


def test_disagreeing_ranks_are_detected(two_process_results):
    assert [r["mismatch_caught"] for r in two_process_results] == [True, True]


def test_shard_partitions_the_samples():
    samples = torch.arange(10)
    contiguous = [shard(samples, r, 3).tolist() for r in range(3)]
    assert contiguous == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    strided = [shard(samples, r, 3, strided=True).tolist() for r in range(3)]
    assert strided == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert shard(samples).tolist() == samples.tolist()  # no process group: everything
    with pytest.raises(ValueError, match="rank"):
        shard(samples, 3, 3)
    with pytest.raises(ValueError, match="cannot be split"):
        shard(samples[:2], 0, 3)


def test_without_a_process_group_reduction_is_a_no_op_and_distributed_is_refused():
    stats = GramStatistics(3)
    stats.update(torch.ones(4, 3, dtype=torch.float64))
    all_reduce_statistics(stats)
    assert stats.n_rows_ == 4 and float(stats.gram_[0, 0]) == 4.0
    with pytest.raises(ValueError, match="init_process_group"):
        prune(make_conv_net(), _calibration(), _config("asym", distributed=True))
