"""train.micro_batch_size=auto's search and its memory arithmetic (pipeline/train/auto_batch.py),
on the CPU: the probe itself runs on a GPU (tests/test_gpu.py, marked gpu); where no GPU is
present the key is refused in one line (tests/test_validate.py)."""
import random

import pytest

from pipeline.train.auto_batch import largest_fitting, micro_batch_candidates, reserve_bytes


@pytest.mark.parametrize("per_rank", [1, 7, 96, 256, 1000])
def test_the_bisection_finds_what_a_loop_over_every_candidate_finds(per_rank):
    """For every threshold of a monotone fits() (all sizes up to it fit), the bisection's
    answer equals the naive largest fitting candidate, in at most ceil(log2(n)) + 1 probes."""
    candidates = micro_batch_candidates(per_rank, exact_accumulation=True)
    assert candidates == [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    for threshold in range(0, per_rank + 2):
        probed = []

        def fits(size):
            probed.append(size)
            return size <= threshold
        naive = max((c for c in candidates if c <= threshold), default=None)
        assert largest_fitting(candidates, fits) == naive
        assert len(probed) <= len(candidates).bit_length()


def test_an_objective_without_exact_accumulation_has_one_candidate():
    assert micro_batch_candidates(256, exact_accumulation=False) == [256]
    assert largest_fitting([256], lambda size: False) is None


def test_the_engine_reserve_follows_the_zero_stage_and_the_dtype():
    """Adam's two fp32 moments (8 B), plus the fp32 master copy (4 B) of a bf16 engine,
    partitioned over the ranks from ZeRO-1; ZeRO's buckets in the training dtype."""
    params, world = 150_000_000, 8
    plain = {"zero_optimization": {"stage": 0}}
    assert reserve_bytes(params, plain, world) == params * 8
    bf16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}
    assert reserve_bytes(params, bf16, world) == params * 12
    zero2 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "reduce_bucket_size": 1e8,
                                                              "allgather_bucket_size": 2e8}}
    assert reserve_bytes(params, zero2, world) == params * 12 // world + 2 * int(3e8)
    rng = random.Random(0)
    for _ in range(20):  # more ranks never need more memory per rank
        stage, world = rng.randint(0, 3), rng.randint(1, 64)
        config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}
        assert reserve_bytes(params, config, world + 1) <= reserve_bytes(params, config, world)
