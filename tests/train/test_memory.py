"""`--train.memory_budget` and the estimate's arithmetic (train/memory.py), without
training; the estimate against the variables of real runs is tested in
tests/train/test_sharding.py and tests/train/test_expert_parallel.py."""

import re

import pytest

from deepseek_tf.config import TrainConfig
from deepseek_tf.config.train import parse_bytes
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.params import count_parameters
from deepseek_tf.train import memory
from tests.helpers import tiny
from tests.helpers.workdirs import FAMILIES


def test_budget_sizes():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("100") == 100
    assert parse_bytes("2 bananas") is None and parse_bytes("0MiB") is None
    with pytest.raises(ConfigError, match=r"--train.memory_budget='2 bananas' must be a size "
                       r"such as 2GiB"):
        TrainConfig(memory_budget="2 bananas")


def _exp(**train):
    return tiny.experiment("/nonexistent", model=FAMILIES["mla_moe"],
                           train={"batch_size": 2, **train})


def test_sharding_and_expert_parallel_divide_what_they_split():
    """zero2 on 4 workers: a quarter of the gradients and moments (the padded shard);
    LoRA-style trainable counts: only those have gradients and moments, the adapters add
    weights."""
    exp = _exp()
    plain, zero2 = memory.estimate(exp, 1), memory.estimate(
        _exp(shard_optimizer="zero2"), 4)
    n = count_parameters(exp.model)["total"]
    assert plain.parameters == zero2.parameters == 4 * n
    trainable = plain.gradients // 4
    assert zero2.gradients == 4 * -(-trainable // 4)
    assert zero2.optimizer == 8 * -(-trainable // 4) and plain.optimizer == 8 * trainable
    lora = memory.estimate(_exp(finetuning_type="lora"), 1, trainable=(100, 0))
    assert (lora.parameters, lora.gradients, lora.optimizer) == (4 * (n + 100), 400, 800)


def test_budget_says_what_fits_and_else_everything_together():
    with pytest.raises(UserError) as err:
        memory.check_budget(_exp(memory_budget="1.2MiB"), 1)
    line = str(err.value)
    assert "\n" not in line and re.search(r"what would fit: --model.expert_parallel=2 on 2 "
                                          r"workers \(1.17 MiB\);", line), line
    with pytest.raises(UserError, match=r"no single change fits; together: "
                       r"--model.expert_parallel=8 --train.remat=block --train.batch_size=1 "
                       r"--train.grad_accum_steps=2 --train.shard_optimizer=zero2 on 8 workers "
                       r"\([\d.]+ MiB\)"):
        memory.check_budget(_exp(memory_budget="0.9MiB", batch_size=2), 1)
    with pytest.raises(UserError, match=r"not even .* fits: use a smaller model or more "
                       r"workers"):
        memory.check_budget(_exp(memory_budget="0.1MiB"), 1)
    assert memory.check_budget(_exp(memory_budget="2MiB"), 1).total < 2 * 2**20


def test_lora_counts_the_adapters_and_trains_only_them():
    """LoRA on the tiny MoE, built: parameters = every variable of the model (base and
    adapters); gradients and moments only for the trainable adapters."""
    from deepseek_tf.lora import apply_lora
    from deepseek_tf.model import DeepSeekCausalLM

    exp = _exp(finetuning_type="lora")
    model = DeepSeekCausalLM(exp.model)
    apply_lora(model, exp.lora)
    est = memory.estimate(exp, 1, memory.trainable_counts(model, exp))
    held = [v for v in model.weights if "seed_generator" not in v.path]
    trainable = sum(v.shape.num_elements() for v in model.trainable_weights)
    assert est.parameters == sum(v.numpy().nbytes for v in held)
    assert (est.gradients, est.optimizer) == (4 * trainable, 8 * trainable)
    assert 0 < trainable < count_parameters(exp.model)["total"] // 4


def test_expert_parallel_groups_hold_one_shard_each():
    """expert_parallel=2 on 4 workers (two groups, each shard on 2 workers): a worker holds
    what it holds on 2 workers; a budget names the run's own 4 workers when 2 divides them."""
    exp = tiny.experiment("/nonexistent", model={**FAMILIES["mla_moe"], "expert_parallel": 2},
                          train={"batch_size": 2})
    assert memory.estimate(exp, 4).total == memory.estimate(exp, 2).total
    with pytest.raises(UserError, match=r"what would fit: --model.expert_parallel=2 on 4 "
                       r"workers \(1.17 MiB\);"):
        memory.check_budget(_exp(memory_budget="1.2MiB"), 4)
