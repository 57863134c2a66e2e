"""Run a test's function on real gloo ranks in spawned processes."""

import os
import tempfile

import torch.multiprocessing as mp


def run_on_gloo_ranks(target, world: int, *args) -> dict:
    """``target(rank, world, init_file, results, *args)`` on ``world`` processes (each joins the
    process group through ``init_file`` and writes into the shared dict ``results``); returns
    what they wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(target, args=(world, os.path.join(tmp, "init"), results, *args), nprocs=world, join=True)
        return dict(results)
