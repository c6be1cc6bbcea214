"""Helpers for checking losses against naive references: value and input gradients on one
process, the per-rank results of a gathered loss against one big batch (and the
two-process harness that computes them), and that every parameter learns."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def grads_of(fn, *tensors):
    """(loss, [gradient of each input]) of fn at copies of the inputs."""
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_same(ours, ref):
    """Same loss and gradients; an input without gradient (a stop-gradient target) must
    have none on both sides."""
    torch.testing.assert_close(ours[0], ref[0])
    for x, y in zip(ours[1], ref[1]):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y)


def assert_ranks_make_one_big_batch(results: list[dict], big: dict, batch: int):
    """Each rank scores its `batch` rows against every rank's columns, so: the mean of the
    per-rank losses is the big-batch loss; each rank's gradient for its rows is world x
    the big-batch gradient of those rows (the gather's backward sums every rank's share);
    a gradient that is not per row (the logit scale) averages over ranks to the big one."""
    world = len(results)
    for name, (big_loss, big_grads) in big.items():
        torch.testing.assert_close(sum(r[name][0] for r in results) / world, big_loss, msg=name)
        for index, g_big in enumerate(big_grads):
            if g_big.shape[0] == world * batch:
                for rank, res in enumerate(results):
                    rows = slice(rank * batch, (rank + 1) * batch)
                    torch.testing.assert_close(res[name][1][index] / world, g_big[rows], msg=name)
            else:
                torch.testing.assert_close(sum(r[name][1][index] for r in results) / world, g_big, msg=name)


def assert_every_parameter_learns(module):
    """Every parameter of `module` (encoder, shared blocks and objective heads) got a
    non-zero gradient from the last backward."""
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [], missing


def on_ranks(fn, world: int, tmp_path, *args) -> list:
    """fn(rank, *args) on `world` processes of one gloo group (fn: a module-level function,
    its result tensors and containers of them); the results in rank order."""
    from conftest import free_port
    out = str(tmp_path / "rank_results")
    mp.spawn(_rank_entry, args=(fn, world, free_port(), out, args), nprocs=world, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(world)]


def _rank_entry(rank: int, fn, world: int, port: int, out: str, args: tuple):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, *args), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
