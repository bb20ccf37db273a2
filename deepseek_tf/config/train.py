"""The optimizer, the training loop and the fine-tuning methods (LoRA, freeze, DPO,
GRPO, distillation)."""

from __future__ import annotations

import dataclasses

from deepseek_tf.autojit import JIT_CHOICES, jit_value
from deepseek_tf.config.base import _Section, _split_list, knob


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int | None:
    """`text` such as "2GiB", "512 MiB", "1.5GB" or "1000000" in bytes; None if it is
    not such a size (or not > 0)."""
    t = text.strip().lower()
    number = t.rstrip("kmgtib ")
    try:
        value = float(number) * _UNITS[t[len(number):].strip()]
    except (ValueError, KeyError):
        return None
    return int(value) if value > 0 else None


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Section):
    """AdamW with linear warmup and cosine decay.

    Example:
        >>> OptimConfig(learning_rate=1e-3, warmup_steps=10).warmup_steps
        10
    """

    SECTION = "optim"

    learning_rate: float = knob(1e-3, "Peak learning rate, reached after warmup.")
    min_lr_ratio: float = knob(0.1, "Final learning rate as a fraction of the peak.")
    warmup_steps: int = knob(100, "Linear warmup steps from 0 to the peak.")
    decay_steps: int = knob(0, "Total schedule length in steps (warmup included); "
                            "0 means train.steps.")
    weight_decay: float = knob(0.1, "Decoupled weight decay (not applied to norms, "
                               "biases and embeddings).")
    beta_1: float = knob(0.9, "Adam beta_1.")
    beta_2: float = knob(0.95, "Adam beta_2.")
    epsilon: float = knob(1e-8, "Adam epsilon.")
    clip_norm: float = knob(1.0, "Clip gradients to this global norm (0 = no clipping).")
    fused: bool = knob(True, "Apply AdamW (decay + moments + update) as one XLA-compiled "
                       "kernel per variable, faster than Keras' op-by-op update (1.75x "
                       "on CPU at 13M weights); false = Keras' update (same math).")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.learning_rate > 0, f"--optim.learning_rate must be > 0, got {self.learning_rate}.")
        r(0 <= self.min_lr_ratio <= 1, "--optim.min_lr_ratio must be in [0, 1].")
        r(self.warmup_steps >= 0, "--optim.warmup_steps must be >= 0.")
        r(self.decay_steps >= 0, "--optim.decay_steps must be >= 0 (0 = train.steps).")
        r(self.weight_decay >= 0, "--optim.weight_decay must be >= 0.")
        r(0 <= self.beta_1 < 1 and 0 <= self.beta_2 < 1, "Adam betas must be in [0, 1).")
        r(self.epsilon > 0, "--optim.epsilon must be > 0.")
        r(self.clip_norm >= 0, "--optim.clip_norm must be >= 0 (0 = off).")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    """The training loop: steps, batch, intervals, checkpoints.

    Example:
        >>> TrainConfig(steps=10, batch_size=2).global_batch(replicas=2)
        4
    """

    SECTION = "train"

    steps: int = knob(1000, "Total optimizer steps; may be raised to continue a run.",
                      resumable=True)
    batch_size: int = knob(16, "Sequences per replica per micro-batch.")
    grad_accum_steps: int = knob(1, "Micro-batches accumulated per optimizer step.")
    seed: int = knob(0, "Seed for initialization and data order.")
    log_every: int = knob(10, "Log train metrics every N steps.", resumable=True)
    eval_every: int = knob(200, "Evaluate on the validation split every N steps "
                           "(0 = only at the end).", resumable=True)
    eval_steps: int = knob(20, "Validation batches per evaluation (dpo: every held-out "
                           "pair, always).", resumable=True)
    checkpoint_every: int = knob(200, "Save a checkpoint every N steps (and at the end).",
                                 resumable=True)
    keep_checkpoints: int = knob(3, "Checkpoints to keep.", resumable=True)
    jit_compile: str = knob("false", "Compile the train step with XLA: true, false, or auto "
                            "= time a few compiled and uncompiled forward+backward passes of "
                            "this model on this machine before training and keep the faster "
                            "(the choice is saved in config.json; a resumed run keeps it).",
                            choices=JIT_CHOICES, resumable=True)
    deterministic: bool = knob(True, "Enable TF op determinism (bitwise reproducible "
                               "runs and resumes on CPU).", resumable=True)
    # scale-out and memory (train/strategy.py, train/precision.py, layers/remat.py)
    strategy: str = knob("auto", "Distribution strategy: auto = multi_worker if TF_CONFIG "
                         "is set, mirrored if several GPUs are visible, else default (one "
                         "device); mirrored = all local GPUs (or all logical CPUs); "
                         "multi_worker = MultiWorkerMirroredStrategy over TF_CONFIG's cluster.",
                         choices=("auto", "default", "mirrored", "multi_worker"),
                         resumable=True)
    collective_timeout: float = knob(600.0, "Seconds a worker waits for its peers in a "
                                     "collective (all-reduce) before failing, so a lone "
                                     "worker never hangs forever; 0 = wait forever.",
                                     resumable=True)
    shard_optimizer: str = knob("none", "ZeRO-style sharding over MultiWorkerMirroredStrategy "
                                "workers (train/sharding.py): zero1 = each of W workers keeps "
                                "the AdamW moments of 1/W of the weights and updates that share, "
                                "then the workers all-gather the weights; zero2 = the same, and "
                                "the gradients are reduce-scattered, so a worker holds only its "
                                "1/W of the summed gradients; none = every worker holds and "
                                "updates everything. With --model.expert_parallel it shards the "
                                "replicated weights (each worker's experts stay its own). A "
                                "no-op with one worker. Resume with the same number of "
                                "workers.", choices=("none", "zero1", "zero2"))
    memory_budget: str = knob("", "Refuse to start if the estimated memory of one worker "
                              "(parameters, gradients, optimizer state, activations; "
                              "train/memory.py, printed at start) exceeds this, e.g. 2GiB, "
                              "512MiB, 1.5GB; the error line says which settings would fit. "
                              "Empty = no check.", resumable=True)
    gpu_memory_growth: bool = knob(True, "Let TensorFlow allocate GPU memory as needed "
                                   "instead of all of it at start (no effect on CPU).",
                                   resumable=True)
    precision: str = knob("float32", "Numerics: float32, or mixed_float16 / mixed_bfloat16 "
                          "(float32 weights, 16-bit compute; norms, softmax and losses stay "
                          "float32). mixed_float16 uses dynamic loss scaling and skips steps "
                          "whose gradients overflow on any replica. auto = mixed_bfloat16 "
                          "where bfloat16 matmuls are fast (CPUs with AMX or AVX512_BF16, "
                          "GPUs of compute capability >= 8.0), else float32; saved in "
                          "config.json, so a resumed run keeps it.",
                          choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"))
    initial_loss_scale: float = knob(2.0 ** 15, "Initial dynamic loss scale of mixed_float16 "
                                     "(halved on overflow, doubled after 2000 good steps).")
    profile_steps: str = knob("", "Profile train steps A,B (1-based, inclusive; e.g. 5,8) "
                              "with the TF profiler into <workdir>/tensorboard (TensorBoard's "
                              "Profile tab); empty = off.", resumable=True)
    auto_decisions: str = knob("", "Written by the trainer: how the auto settings "
                               "(jit_compile, precision) were resolved, and why.",
                               resumable=True)
    remat: str = knob("none", "Gradient checkpointing: recompute activations in the backward "
                      "pass per decoder block (block), or only its MLP (mlp) or attention "
                      "(attention) sub-layer; none keeps all activations.",
                      choices=("none", "block", "mlp", "attention"), resumable=True)
    # recovery from non-finite / exploding steps (train/recovery.py)
    recovery_max_trials: int = knob(3, "On a step with a non-finite loss or gradients (or a "
                                    "loss above --train.loss_upper_bound), restore the last "
                                    "checkpoint, skip the batches since it and go on, at most "
                                    "this many times per run (0 = stop at once).",
                                    resumable=True)
    loss_upper_bound: float = knob(0.0, "A step whose loss exceeds this is treated like a "
                                   "non-finite one (0 = off).", resumable=True)
    # fine-tuning (train/finetune.py, train/dpo.py)
    init_from: str = knob("", "Start from the model weights of this workdir (any deepseek_tf "
                          "workdir, e.g. one made by convert); its model config is used and "
                          "contradicting --model.* flags are refused. Optimizer, data and loop "
                          "start fresh. Empty = random initialization.")
    finetuning_type: str = knob("full", "Which weights train: full (all), freeze (only "
                                "--freeze.*), lora (low-rank adapters on --lora.targets; the "
                                "base stays frozen).", choices=("full", "freeze", "lora"))
    stage: str = knob("auto", "Objective (train/objectives.py): pretrain (next-token loss "
                      "on plain text), sft (the same loss on the answer tokens of chat-format "
                      "data), dpo (preference pairs, --dpo.*), kto (answers labelled desirable or "
                      "not, --dpo.*), grpo (reinforcement learning on prompts with sampled, "
                      "rewarded completions, --grpo.*), distill (the next-token loss plus a KL "
                      "to a frozen teacher's logits on the same data, --distill.*), or auto = "
                      "sft for chat-format data, else pretrain (resolved at the start and "
                      "saved in config.json).",
                      choices=("auto", "pretrain", "sft", "dpo", "kto", "grpo", "distill"))
    dsa_stage: str = knob("sparse", "DeepSeek Sparse Attention training stage (with "
                          "--model.use_dsa, or V4's CSA layers; V3.2 paper): dense_warmup = "
                          "the main model frozen and attending densely (V4: to every "
                          "compressed entry), only the indexers train (KL to the dense "
                          "attention's distribution); sparse = top-k sparse attention, the "
                          "main model trains on the LM loss and the indexer, its input "
                          "detached, on the KL over the selected tokens. Start the sparse "
                          "stage from a warm-up run with --train.init_from.",
                          choices=("sparse", "dense_warmup"))
    early_stopping_patience: int = knob(0, "Stop after this many evaluations without a new "
                                        "best validation loss (0 = off). The best checkpoint "
                                        "is kept in <workdir>/best/ either way.",
                                        resumable=True)

    def __post_init__(self):
        if isinstance(self.jit_compile, bool):  # configs and callers from before "auto"
            object.__setattr__(self, "jit_compile", jit_value(self.jit_compile))
        self._coerce_and_check_types()
        r = self._require
        r(self.recovery_max_trials >= 0, "--train.recovery_max_trials must be >= 0 (0 = off).")
        r(self.loss_upper_bound >= 0, "--train.loss_upper_bound must be >= 0 (0 = off).")
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every",
                     "checkpoint_every", "keep_checkpoints", "eval_steps"):
            r(getattr(self, name) > 0, f"--train.{name} must be > 0, got {getattr(self, name)}.")
        r(self.eval_every >= 0, "--train.eval_every must be >= 0 (0 = only at the end).")
        r(self.seed >= 0, "--train.seed must be >= 0.")
        r(self.collective_timeout >= 0, "--train.collective_timeout must be >= 0 (0 = forever).")
        r(self.initial_loss_scale >= 1, "--train.initial_loss_scale must be >= 1.")
        r(self.early_stopping_patience >= 0,
          "--train.early_stopping_patience must be >= 0 (0 = off).")
        r(not self.memory_budget or parse_bytes(self.memory_budget) is not None,
          f"--train.memory_budget={self.memory_budget!r} must be a size such as 2GiB, "
          f"512MiB or 1.5GB (or empty = no check).")
        prof = [p.strip() for p in self.profile_steps.split(",")] if self.profile_steps else []
        r(not prof or (len(prof) == 2 and all(p.isdigit() for p in prof)
                       and 1 <= int(prof[0]) <= int(prof[1])),
          f"--train.profile_steps={self.profile_steps!r} must be two step numbers A,B with "
          f"1 <= A <= B (e.g. 5,8), or empty.")

    @property
    def xla(self) -> bool:
        """`jit_compile` as a bool; "auto" must be resolved first (train/autotune.py)."""
        if self.jit_compile == "auto":
            raise ValueError("--train.jit_compile=auto is not resolved yet "
                             "(deepseek_tf.train.autotune.resolve_jit_compile).")
        return self.jit_compile == "true"

    def global_batch(self, replicas: int = 1) -> int:
        """Sequences per optimizer step across all replicas."""
        return self.batch_size * replicas * self.grad_accum_steps


@dataclasses.dataclass(frozen=True)
class LoraConfig(_Section):
    """LoRA adapters (`--train.finetuning_type=lora`), through Keras' `Dense.enable_lora`.

    Example:
        >>> LoraConfig(rank=8, targets="q_proj,v_proj").target_list
        ('q_proj', 'v_proj')
    """

    SECTION = "lora"

    rank: int = knob(8, "Rank r of each adapter (A: in x r, B: r x out; B starts at zero).")
    alpha: float = knob(16.0, "Scale: the adapter adds (alpha / rank) * x A B.")
    dropout: float = knob(0.0, "Dropout on the adapter's input during training.")
    targets: str = knob("all", "Comma-separated projection names to adapt (q_proj, k_proj, "
                        "v_proj, o_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, "
                        "V4's kv_proj and o_b_proj, gate_proj, up_proj, down_proj; shared "
                        "experts included), or all.")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.rank > 0, f"--lora.rank must be > 0, got {self.rank}.")
        r(self.alpha > 0, f"--lora.alpha must be > 0, got {self.alpha}.")
        r(0 <= self.dropout < 1, f"--lora.dropout must be in [0, 1), got {self.dropout}.")
        r(bool(self.target_list), "--lora.targets is empty: name projections or use all.")

    @property
    def target_list(self) -> tuple[str, ...]:
        return _split_list(self.targets)


@dataclasses.dataclass(frozen=True)
class FreezeConfig(_Section):
    """Partial fine-tuning (`--train.finetuning_type=freeze`).

    Example:
        >>> FreezeConfig(trainable_layers=2, modules="lm_head").module_list
        ('lm_head',)
    """

    SECTION = "freeze"

    trainable_layers: int = knob(2, "Train the last N decoder blocks (0 = none).")
    modules: str = knob("", "Comma-separated module names also trained wherever they occur "
                        "(e.g. lm_head, norm, embed_tokens, mlp, self_attn, q_proj).")

    def __post_init__(self):
        self._coerce_and_check_types()
        self._require(self.trainable_layers >= 0, "--freeze.trainable_layers must be >= 0.")

    @property
    def module_list(self) -> tuple[str, ...]:
        return _split_list(self.modules)


@dataclasses.dataclass(frozen=True)
class DPOConfig(_Section):
    """Preference optimization: DPO, IPO, ORPO, SimPO (`--train.stage=dpo`) and KTO
    (`--train.stage=kto`, which uses beta, reference and the two weights).

    Example:
        >>> DPOConfig(beta=0.1, loss="ipo").loss
        'ipo'
    """

    SECTION = "dpo"

    beta: float = knob(0.1, "DPO temperature beta (IPO: the regularization 1/(2 tau); ORPO: "
                       "the odds-ratio weight lambda; SimPO: the reward scale).")
    loss: str = knob("sigmoid", "sigmoid = -log sigmoid(beta * margin) (DPO); ipo = (margin - "
                     "1/(2 beta))^2 with length-averaged log-ratios; orpo = chosen NLL - beta "
                     "log sigmoid(log odds ratio) (no reference); simpo = -log sigmoid(beta * "
                     "difference of length-averaged log-probs - gamma) (no reference).",
                     choices=("sigmoid", "ipo", "orpo", "simpo"))
    label_smoothing: float = knob(0.0, "sigmoid: conservative DPO label smoothing in [0, 0.5).")
    gamma: float = knob(0.5, "simpo: the target reward margin gamma.")
    desirable_weight: float = knob(1.0, "kto (--train.stage=kto): weight of the desirable "
                                   "answers' loss (lambda_D).")
    undesirable_weight: float = knob(1.0, "kto: weight of the undesirable answers' loss "
                                     "(lambda_U).")
    reference: str = knob("model", "Reference log-probs: model = a frozen copy of the "
                          "init_from weights scores each batch beside the policy, in the same "
                          "step (margin exactly 0 at the start); precomputed = scored once for "
                          "every pair before training (one forward fewer per step; equal to "
                          "rounding); orpo and simpo use none.",
                          choices=("model", "precomputed"))

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.beta > 0, f"--dpo.beta must be > 0, got {self.beta}.")
        r(0 <= self.label_smoothing < 0.5, "--dpo.label_smoothing must be in [0, 0.5).")
        r(self.label_smoothing == 0 or self.loss == "sigmoid",
          f"--dpo.label_smoothing applies to --dpo.loss=sigmoid only, not {self.loss}.")
        r(self.gamma >= 0, f"--dpo.gamma must be >= 0, got {self.gamma}.")
        r(self.desirable_weight > 0 and self.undesirable_weight > 0,
          "--dpo.desirable_weight and --dpo.undesirable_weight must be > 0.")

    @property
    def reference_free(self) -> bool:
        """ORPO and SimPO need no reference model."""
        return self.loss in ("orpo", "simpo")


#: The built-in GRPO rewards (train/rewards.py BUILTIN).
GRPO_REWARDS = ("exact_match", "format", "length_penalty", "numeric")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(_Section):
    """Group Relative Policy Optimization (`--train.stage=grpo`, train/grpo.py).

    Example:
        >>> GRPOConfig(group_size=4, reward="exact_match,format*0.5").reward_list
        ('exact_match', 'format*0.5')
    """

    SECTION = "grpo"

    group_size: int = knob(8, "Completions sampled per prompt (the group whose rewards are "
                           "normalised into advantages); >= 2.")
    dynamic_sampling: int = knob(0, "Dynamic sampling (DAPO): groups whose rewards all agree "
                                 "(no advantage) are set aside and up to N more batches of "
                                 "prompts are sampled to fill the batch with groups whose "
                                 "rewards differ (set-aside groups fill what is left); 0 = "
                                 "off.")
    inner_steps: int = knob(1, "Optimizer steps on each sampled batch (the first scores the "
                            "batch's old log-probs: ratio 1); a new batch is sampled every N "
                            "steps.")
    clip_eps: float = knob(0.2, "PPO clip: the ratio pi/pi_old is clipped to [1-eps, 1+eps].")
    kl_coef: float = knob(0.04, "Weight of the k3 KL estimate to the frozen reference "
                          "(0 = no reference).")
    temperature: float = knob(1.0, "Sampling temperature of the rollouts (> 0).")
    top_p: float = knob(1.0, "Nucleus sampling of the rollouts (1 = off).")
    max_new_tokens: int = knob(32, "Tokens a completion may have (prompt + this <= "
                               "--data.seq_len).")
    reward: str = knob("exact_match", "Comma-separated rewards, summed, each NAME or "
                       "NAME*WEIGHT: exact_match (1 if the answer after --grpo.answer_marker "
                       "equals the reference), format (1 if the completion matches "
                       "--grpo.format_regex), length_penalty (-tokens/max_new_tokens), numeric "
                       "(1 / (1 + |answer - reference|) when both are numbers, else 0), or a "
                       "plug-in module:function called with (prompt, completion, reference) "
                       "that returns a number.")
    answer_marker: str = knob("", "exact_match compares the text after the last occurrence of "
                              "this marker (e.g. <answer>; up to a following </answer>); "
                              "empty = the whole completion.")
    format_regex: str = knob(r"(?s)\s*<think>.*</think>\s*<answer>.*</answer>\s*",
                             "The format reward's pattern (Python re, full match).")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.group_size >= 2, f"--grpo.group_size must be >= 2 (advantages compare the "
          f"completions of a group), got {self.group_size}.")
        r(self.inner_steps >= 1, f"--grpo.inner_steps must be >= 1, got {self.inner_steps}.")
        r(self.dynamic_sampling >= 0, f"--grpo.dynamic_sampling must be >= 0, got "
          f"{self.dynamic_sampling}.")
        r(0 < self.clip_eps < 1, f"--grpo.clip_eps must be in (0, 1), got {self.clip_eps}.")
        r(self.kl_coef >= 0, f"--grpo.kl_coef must be >= 0, got {self.kl_coef}.")
        r(self.temperature > 0, f"--grpo.temperature must be > 0 (rollouts sample), got "
          f"{self.temperature}.")
        r(0 < self.top_p <= 1, f"--grpo.top_p must be in (0, 1], got {self.top_p}.")
        r(self.max_new_tokens >= 1, "--grpo.max_new_tokens must be >= 1.")
        r(bool(self.reward_list), "--grpo.reward is empty: name at least one reward.")
        for part in self.reward_list:
            name, _, weight = part.partition("*")
            r(name.strip() in GRPO_REWARDS or (name.count(":") == 1 and all(name.split(":"))),
              f"--grpo.reward: {name!r} is neither {', '.join(GRPO_REWARDS)} nor a plug-in "
              f"module:function.")
            try:
                float(weight or 1)
            except ValueError:
                r(False, f"--grpo.reward: the weight of {part!r} is not a number.")
        import re
        try:
            re.compile(self.format_regex)
        except re.error as e:
            r(False, f"--grpo.format_regex is not a valid regular expression: {e}.")

    @property
    def reward_list(self) -> tuple[str, ...]:
        return _split_list(self.reward)


@dataclasses.dataclass(frozen=True)
class DistillConfig(_Section):
    """Logit distillation from a frozen teacher (`--train.stage=distill`, train/distill.py).

    Per loss token, with p = softmax(teacher logits / T) and q = softmax(student logits / T):
    loss = alpha T^2 D(p, q) + (1 - alpha) cross-entropy(student, next token), D the
    forward KL(p || q), the reverse KL(q || p), or mix = mix_weight forward + (1 -
    mix_weight) reverse.

    Example:
        >>> DistillConfig(teacher="runs/big", loss="mix", temperature=2.0).alpha
        0.5
    """

    SECTION = "distill"

    teacher: str = knob("", "The teacher's workdir (any supported model family; it must use "
                        "the student's tokenizer). It runs frozen, in inference mode, beside "
                        "the student in every step.")
    loss: str = knob("forward_kl", "forward_kl = KL(teacher || student) (mass-covering, "
                     "Hinton et al.); reverse_kl = KL(student || teacher) (mode-seeking, as "
                     "MiniLLM); mix = --distill.mix_weight x forward + (1 - mix_weight) x "
                     "reverse.", choices=("forward_kl", "reverse_kl", "mix"))
    temperature: float = knob(1.0, "Softmax temperature T of both distributions (> 0); the "
                              "KL term is multiplied by T^2 so that its gradients keep their "
                              "scale.")
    alpha: float = knob(0.5, "Weight of the KL term in [0, 1]; the next-token cross-entropy "
                        "on the data gets 1 - alpha (1 = pure distillation).")
    mix_weight: float = knob(0.5, "--distill.loss=mix: weight of the forward KL in [0, 1]; "
                             "the reverse KL gets the rest.")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.temperature > 0, f"--distill.temperature must be > 0, got {self.temperature}.")
        r(0 <= self.alpha <= 1, f"--distill.alpha must be in [0, 1], got {self.alpha}.")
        r(0 <= self.mix_weight <= 1,
          f"--distill.mix_weight must be in [0, 1], got {self.mix_weight}.")
        r(self.mix_weight == 0.5 or self.loss == "mix",
          f"--distill.mix_weight applies to --distill.loss=mix only, not {self.loss}.")
