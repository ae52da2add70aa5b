"""The DeepSpeed configs the training stages hand to the Trainer."""

from __future__ import annotations

import pytest

from sphuatuo.recipe import TrainScaling
from sphuatuo.train.deepspeed import CPU_REDUCE_BUCKET_ELEMENTS, deepspeed_config


@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_reductions_use_buckets_the_allocator_reuses_and_gpus_keep_deepspeeds_own(stage: int) -> None:
    cpu = deepspeed_config(TrainScaling(zero_stage=stage), on_gpu=False)["zero_optimization"]
    gpu = deepspeed_config(TrainScaling(zero_stage=stage, use_gpu=True), on_gpu=True)["zero_optimization"]
    # 20 MB of fp32 gradients per bucket: under glibc's 32 MiB ceiling for buffers it keeps in the heap.
    assert cpu["reduce_bucket_size"] == CPU_REDUCE_BUCKET_ELEMENTS and CPU_REDUCE_BUCKET_ELEMENTS * 4 < 32 * 2**20
    assert "reduce_bucket_size" not in gpu and gpu["overlap_comm"] and gpu["contiguous_gradients"]
    assert not cpu["overlap_comm"] and not cpu["contiguous_gradients"]


def test_stage_0_is_plain_ddp_without_a_deepspeed_config() -> None:
    assert deepspeed_config(TrainScaling(zero_stage=0), on_gpu=False) is None
