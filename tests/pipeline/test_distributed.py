"""Data-parallel calibration with torch.distributed (gloo, two processes on the CPU): every
rank ends with the same model, equal to one process over the whole set -- bit for bit for
calibrators, SmoothQuant and AWQ; GPTQ within float32 rounding of the summed Hessians."""

import os
import socket
import warnings

import pytest
import torch

import lowbit
from lowbit.errors import CalibrationError
from lowbit.pipeline import distributed as D
from tests.tiny_models import calib_ids, group_over

WORLD = 2
PRESETS = ["int8-percentile", "int8-smoothquant-search", "int4-awq", "int4-gptq"]


def recipe(name):
    from lowbit import recipes

    if name == "int8-percentile":  # static activations, histogram calibrator, fp8 KV cache
        d = recipes.load("int8").to_dict()
        d["targets"][0]["input"] = {"format": "int8", "calibrator": "percentile"}
        d["kv_cache"] = "fp8"
        return recipes.load(d)
    if name == "int8-smoothquant-search":  # alpha searched: losses summed over ranks
        d = recipes.load("int8-smoothquant").to_dict()
        d["algorithms"][0].setdefault("args", {}).update(search=True, grid=4)
        return recipes.load(d)
    return recipes.load(name, **group_over(name, 32))


def data():
    return calib_ids(16, 32)  # 512 tokens: well-conditioned Hessians for the tiny widths


def quantized_state(name, comm=None):
    from tests.pipeline.test_stream import tiny

    m = tiny(layers=2)
    lowbit.quantize(m, recipe(name), calib_data=data(), chunk_size=4, blockwise=True,
                    comm=comm)
    return {k: v.detach().contiguous().clone() for k, v in m.state_dict().items()}


def worker(rank, port, out):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    from safetensors.torch import save_file

    from lowbit.pipeline import quantize_checkpoint

    comm = D.init_from_env(backend="gloo")
    assert comm.enabled and comm.rank == rank and comm.world_size == WORLD
    for name in PRESETS:  # every rank saves its model: they must all be equal
        save_file(quantized_state(name), os.path.join(out, f"{name}-rank{rank}.safetensors"))
    quantize_checkpoint(os.path.join(out, "src"), "int4-awq", data(),
                        os.path.join(out, "stream"), group_size=32, chunk_size=4)
    D.shutdown()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    from tests.pipeline.test_stream import save_src, tiny

    out = tmp_path_factory.mktemp("dist")
    save_src(tiny(layers=2), out / "src")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_two_ranks_equal_one_process(two_ranks, name):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    ranks = [load_file(str(two_ranks / f"{name}-rank{r}.safetensors")) for r in range(WORLD)]
    for k in ranks[0]:  # every rank holds the same model
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    single = quantized_state(name, comm=D.LOCAL)
    assert set(single) == set(ranks[0])
    if name != "int4-gptq":
        for k in single:
            assert torch.equal(single[k], ranks[0][k]), k
        return
    # GPTQ: Hessians summed in float32 over ranks vs one running average (relative ~1e-7):
    # scales and weights agree to float32 rounding but for the rare weight whose value lay
    # on a rounding boundary (a neighbouring code, then compensated by the next columns)
    flipped = total = 0
    for k in single:
        a, b = single[k].float(), ranks[0][k].float()
        assert float((a - b).norm()) <= 1e-2 * float(a.norm()) + 1e-6, k
        if k.endswith("proj.weight"):
            s = single[k.replace("weight", "weight_quantizer.scale")]
            s2 = ranks[0][k.replace("weight", "weight_quantizer.scale")]
            codes = (a.reshape(*s.shape, -1) / s[..., None]).round()
            codes2 = (b.reshape(*s.shape, -1) / s2[..., None]).round()
            flipped += int((codes != codes2).sum())
            total += codes.numel()
    assert flipped <= 1e-3 * total, (flipped, total)


def test_streaming_two_ranks_equals_one_process(two_ranks, tmp_path):
    from lowbit.pipeline import quantize_checkpoint
    from tests.pipeline.test_stream import assert_same_checkpoint

    torch.set_num_threads(1)
    quantize_checkpoint(two_ranks / "src", "int4-awq", data(), tmp_path / "one",
                        group_size=32, chunk_size=4, comm=D.LOCAL)
    assert_same_checkpoint(two_ranks / "stream", tmp_path / "one")


class FakeComm:
    enabled = True

    def __init__(self, rank, world):
        self.rank, self.world_size = rank, world


def test_shard_batches_whole_chunks_in_rank_order():
    ids = torch.arange(11 * 3).reshape(11, 3)  # 11 samples, chunks of 4: 4 + 4 + 3
    parts = [D.shard_batches(ids, 4, FakeComm(r, 2)) for r in range(2)]
    assert [p.shape[0] for p in parts] == [4, 7]  # 3 chunks: 1 | 2
    assert torch.equal(torch.cat(parts), ids)
    parts = [D.shard_batches(list(ids), 2, FakeComm(r, 3)) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]  # 6 chunks of 2 (the last of 1): 2 | 2 | 2
    assert D.shard_batches(ids, 4, D.LOCAL) is ids
    with pytest.raises(CalibrationError, match="fewer than the 4 ranks"):
        D.shard_batches(ids, 4, FakeComm(0, 4))


def test_single_process_collectives_are_no_ops():
    comm = D.current()
    assert comm is D.LOCAL and comm.is_main and not comm.enabled
    t = torch.arange(3.0)
    assert comm.sum_(t) is t and comm.gather_cat(t) is t and comm.sum_float(1.5) == 1.5
    assert D.init_from_env() is D.LOCAL  # no WORLD_SIZE > 1 in the environment


def resume_worker(rank, port, d, kill):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    os.environ.pop("LOWBIT_TEST_KILL_AT", None)
    if kill:
        os.environ["LOWBIT_TEST_KILL_AT"] = kill
    from lowbit.pipeline import quantize_checkpoint

    D.init_from_env(backend="gloo")
    r = quantize_checkpoint(os.path.join(d, "src"), "int4-gptq", data(),
                            os.path.join(d, "out"), group_size=32, chunk_size=4)
    with open(os.path.join(d, f"resumed-{rank}.txt"), "w") as f:
        f.write(str(r.resumed_from))
    D.shutdown()


@pytest.mark.slow
def test_two_ranks_killed_then_resumed(tmp_path):
    """Both ranks die with SIGKILL after block 1; the same torchrun job started again
    continues at block 2 (each rank loads its own saved inputs) and writes what an
    uninterrupted two-rank run writes."""
    import torch.multiprocessing as mp

    from tests.pipeline.test_stream import assert_same_checkpoint, save_src, tiny

    save_src(tiny(layers=4), tmp_path / "src")
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(resume_worker, args=(free_port(), str(tmp_path), "done:1"), nprocs=WORLD)
    assert not (tmp_path / "out").exists()
    mp.spawn(resume_worker, args=(free_port(), str(tmp_path), None), nprocs=WORLD)
    assert (tmp_path / "resumed-0.txt").read_text() == "2"
    (tmp_path / "out").rename(tmp_path / "resumed")
    mp.spawn(resume_worker, args=(free_port(), str(tmp_path), None), nprocs=WORLD)
    assert (tmp_path / "resumed-0.txt").read_text() == "0"
    assert_same_checkpoint(tmp_path / "resumed", tmp_path / "out")
