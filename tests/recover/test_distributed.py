"""Data-parallel recovery: 2 CPU processes (gloo) match the single-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import netpress as npr
from netpress.recover.distributed import Shard, shard, world
from netpress.testing import toy_batches, varied_teacher

WORKER = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    import netpress as npr
    from netpress.recover.distributed import init_from_env, is_main
    from netpress.testing import toy_batches, varied_teacher
    assert init_from_env()
    torch.set_num_threads(1)
    model = varied_teacher(0)
    data = toy_batches(n=64, batch=8, model=model, seed=2)
    recipe = [npr.GlobalMagnitudePrune(sparsity=0.6),
              npr.Distill(max_steps=4, lr=0.05, optimizer="sgd", lr_schedule="constant")]
    res = npr.compress(model, recipe, train=data, measure=False)
    state = {k: v.clone() for k, v in res.model.state_dict().items()}
    gathered = [None, None]
    dist.all_gather_object(gathered, state)
    if is_main():
        torch.save(gathered, sys.argv[1])
    dist.barrier()  # no rank tears gloo down while another still uses it (an abort seen once)
    dist.destroy_process_group()
''')


def test_shards_are_disjoint_equal_and_cover_full_rounds():
    data = list(range(7))
    parts = [list(Shard(data, r, 3)) for r in range(3)]
    assert parts == [[0, 3], [1, 4], [2, 5]] and len(Shard(data, 0, 3)) == 2
    assert world() == (0, 1) and shard(data) is data


@pytest.mark.slow
def test_two_cpu_processes_match_the_single_process_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "states.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", str(script), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = torch.load(out, weights_only=True)
    for k in rank0:  # every rank holds the same weights and the same masks
        torch.testing.assert_close(rank0[k], rank1[k], rtol=0, atol=0)
    model = varied_teacher(0)
    small = toy_batches(n=64, batch=8, model=model, seed=2)
    merged = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
              for a, b in zip(small[0::2], small[1::2])]
    recipe = [npr.GlobalMagnitudePrune(sparsity=0.6),
              npr.Distill(max_steps=4, lr=0.05, optimizer="sgd", lr_schedule="constant")]
    single = npr.compress(model, recipe, train=merged, measure=False).model.state_dict()
    for k, v in single.items():
        torch.testing.assert_close(rank0[k], v, rtol=1e-4, atol=1e-5)
        assert torch.equal(rank0[k] == 0, v == 0) or not k.endswith("weight")
    moved = sum(float((single[k] - varied_teacher(0).state_dict()[k]).abs().sum())
                for k in single)
    assert moved > 0
