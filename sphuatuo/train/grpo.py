"""RL with the HuatuoGPT-o1 reward, one Ray Train worker's view: TRL's GRPOTrainer or RLOOTrainer.

Each worker samples a group of completions per prompt (transformers `generate`, or vLLM colocated on
the worker's GPU when the recipe asks), scores them with `sphuatuo.train.reward.O1Reward` through the
recipe's verifier, and takes a policy-gradient step with a KL penalty to the frozen starting model.
"""

from __future__ import annotations

from typing import Any


def rl_arguments(base: dict[str, Any], stage: Any) -> dict[str, Any]:
    """Trainer arguments for GRPOConfig / RLOOConfig from the recipe's RL stage."""
    arguments = {key: value for key, value in base.items() if key != "max_length"}  # SFT/DPO only
    return {
        **arguments,
        "remove_unused_columns": False,  # the reward needs the ground-truth columns
        "beta": stage.kl_coef,
        "num_generations": stage.group_size,
        "max_completion_length": stage.max_response_length,
        "temperature": stage.temperature,
        "num_iterations": stage.iterations,
        "use_vllm": stage.generates_with_vllm,
        "vllm_mode": "colocate",
    }


def grpo_worker(config: dict[str, Any]) -> None:
    from sphuatuo.recipe import RlStage
    from sphuatuo.train.launcher import prepare_worker

    setup = prepare_worker(config, RlStage)
    # Imported after prepare_worker, which runs in this worker's environment (DS_ACCELERATOR on CPU).
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from sphuatuo.train.reward import O1Reward, build_verifier

    stage = setup.stage
    config_type, trainer_type = (GRPOConfig, GRPOTrainer) if stage.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    device = f"cuda:{torch.cuda.current_device()}" if stage.scaling.use_gpu else "cpu"
    reward = O1Reward(build_verifier(stage.verifier, device))
    dataset = setup.dataset(["prompt", "ground_truth", "options", "answer"])
    args = config_type(**rl_arguments(setup.arguments, stage))
    # Not `setup.trainer`: its sample-order record assumes one collated batch per training step, while
    # GRPO/RLOO collate one generation batch for several steps.
    trainer = trainer_type(model=setup.load_model(), reward_funcs=[reward], args=args, train_dataset=dataset,
                           processing_class=setup.tokenizer, peft_config=setup.peft_config,
                           callbacks=[RayTrainReportCallback()])
    setup.train_and_export(trainer)
