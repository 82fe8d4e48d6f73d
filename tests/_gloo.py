"""Runs module-level functions on several gloo (CPU) processes, for the distributed tests.

run_ranks("test_fsdp", ["_body_a", "_body_b"], tmp_path) starts WORLD processes once (spawn, a
free port), runs every body on each rank in order, body(rank, work_dir), and returns
{body: [result of rank 0, result of rank 1, ...]}. A body that raises on any rank is reported
with its traceback; a hung rank is killed after `timeout_s`.
"""

import datetime
import importlib
import os
import socket
import time
import traceback

import torch


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, module, bodies, out_dir, collective_timeout_s):
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
        functions = importlib.import_module(module)
        results = {}
        for body in bodies:
            try:
                results[body] = ("ok", getattr(functions, body)(rank, out_dir))
            except Exception:  # the others still run; the parent reports this one
                results[body] = ("error", traceback.format_exc())
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(module, bodies, tmp_path, world_size=2, timeout_s=150, collective_timeout_s=30):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, module, list(bodies), str(tmp_path),
                                               collective_timeout_s)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, proc in enumerate(procs) if proc.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    errors = [(tmp_path / f"{r}.err").read_text() for r in range(world_size) if (tmp_path / f"{r}.err").exists()]
    if errors:
        raise AssertionError("\n".join(f"a rank failed:\n{e}" for e in errors))
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout_s} s")
    per_rank = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(world_size)]
    return {body: [results[body] for results in per_rank] for body in bodies}


def result_of(results, body):
    """The body's per-rank results; fails with the first rank's traceback if it raised."""
    outcomes = results[body]
    for rank, (status, value) in enumerate(outcomes):
        if status == "error":
            raise AssertionError(f"{body} failed on rank {rank}:\n{value}")
    return [value for _, value in outcomes]
