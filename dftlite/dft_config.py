"""DFTConfig: the settings of `dftlite train`, a `transformers.TrainingArguments` with DFT's fields.

Each field is documented once, in its `help`; `dftlite train --help` lists them. YAML keys are
the field names:

    dftlite train --config configs/smollm2-135m_gsm8k_dft2_cpu.yaml --learning_rate 2e-4
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

# Method -> the loss settings it reads -> their default for that method (None: the field's own default).
# DFTConfig fills an unset tau, gamma, beta or sft_weight from here, and refuses an sft_weight for a method
# that does not read it; the model card shows a method's settings and leaves out the others.
METHOD_SETTINGS = {
    "dft2": {"tau": 0.3, "gamma": 0.9, "u_init": None, "sft_weight": 2.5},
    "dft": {"tau": 1.0, "gamma": 0.85, "u_init": None, "reference": None, "sft_weight": 0.0},
    "sft": {},
    "simpo": {"beta": 10.0, "simpo_gamma_beta_ratio": None},
    "simpo_sft": {"beta": 10.0, "simpo_gamma_beta_ratio": None, "sft_weight": 1.0},
    "dpo": {"beta": 0.1},
}
METHODS = tuple(METHOD_SETTINGS)
# What an unset tau, gamma, beta or sft_weight becomes for a method that does not read it.
UNREAD_DEFAULTS = {"tau": 1.0, "gamma": 0.9, "beta": 10.0, "sft_weight": 0.0}
# A linear warmup's first step runs at learning rate 0 (transformers: lr = step / warmup at step 0), so a
# fractional warmup costs a short run a real share of its updates: 1 of the demo's 8. Below this many
# optimizer steps a fractional warmup is skipped; from 20 on it wastes at most 1 step in 20.
MIN_STEPS_FOR_WARMUP = 20


@dataclass
class DFTConfig(TrainingArguments):
    method: Literal["dft2", "dft", "sft", "simpo", "simpo_sft", "dpo"] = field(
        default="dft2",
        metadata={"help": "dft2 (s = mean token log-prob; the paper's DFT2), dft (s = summed log-prob, importance "
                  "weight 1/P_g0), or a baseline on the same data and pool: sft, simpo, simpo_sft, dpo (= SPIN)."},
    )
    tau: float | None = field(
        default=None,
        metadata={"help": "Temperature τ > 0 of the negatives' term. None = DFT 1.0, DFT2 0.3: the paper's "
                  "UltraFeedback values (Table 6); its MetaMathQA setting (Table 5) uses DFT 1.0, DFT2 0.1."},
    )
    gamma: float | None = field(
        default=None,
        metadata={"help": "Moving-average rate γ in (0, 1] of u (eq. 10); 1 = plain mini-batch estimate. "
                  "None = DFT 0.85, DFT2 0.9: the paper's UltraFeedback values (Table 6); its MetaMathQA "
                  "setting (Table 5) uses 0.95 for both."},
    )
    u_init: Literal["one", "first_batch"] = field(
        default="first_batch",
        metadata={"help": "u_0: first_batch = each u_i starts at its first mini-batch estimate ĝ_i (γ = 1 on the first "
                  "visit): the negatives' term works from the first step, which short LoRA runs need (docs/results.md, "
                  "sweep); one = log u = 0, as Algorithm 1 and the official code (the paper's recipes set it)."},
    )
    scoring_dropout: bool = field(
        default=False,
        metadata={"help": "Keep dropout (e.g. LoRA dropout) active while the trainee is scored. Off by default, as the "
                  "official trainer (disable_dropout: True): the noise would enter the detached weights exp(s/τ - log u)."},
    )
    reference: Literal["sampler_prompt", "train_prompt"] = field(
        default="sampler_prompt",
        metadata={"help": "DFT's P_g0 weight: sampler_prompt = log P_g0(y'|x̄), the pool's logp_sampler (as the paper "
                  "writes); train_prompt = log P_g0(y'|x), the official code's convention (the pool needs "
                  "score_train_prompt: true)."},
    )
    num_negatives_per_step: int = field(
        default=2,
        metadata={"help": "B, negatives per prompt per step (default 2, as the paper's UltraFeedback setting, "
                  "Table 6; its MetaMathQA setting, Table 5, uses 4). The pool needs B × epochs per prompt."},
    )
    pool_dir: str = field(default="", metadata={"help": "Negative pool of the training data, made by `dftlite sample`."})
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "Held-out prompts + answers (format and template as data_path), scored with "
                  "eval_pool_dir's negatives: losses and per-token log-likelihoods, never updating u."},
    )
    eval_pool_dir: str | None = field(
        default=None, metadata={"help": "Negative pool of eval_data_path (its own `dftlite sample` run)."}
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "β of simpo/simpo_sft (None = 10.0; the paper searches 6-12) and dpo (None = 0.1; "
                  "searched 0.01-0.1), paper App. A.2."},
    )
    simpo_gamma_beta_ratio: float = field(default=0.5, metadata={"help": "SimPO margin γ/β (paper App. A.2: 0.5)."})
    sft_weight: float | None = field(
        default=None,
        metadata={"help": "λ ≥ 0: adds λ·(token-level NLL of the gold answers) to the loss of dft, dft2 and simpo_sft "
                  "(an SFT anchor; the official DFT trainer computes this NLL but leaves it unused, TRL's DPO offers it "
                  "as loss_type [sigmoid, sft]). None = dft2 2.5, simpo_sft 1.0, dft 0.0 (the paper has no such term). "
                  "dft2's 2.5 comes from one sweep (docs/results.md, 'Sweep': SmolLM2-135M, 32 LoRA steps at lr 2e-3), "
                  "chosen on the problems it was scored on; other models, learning rates and run lengths may need another λ."},
    )
    token_budget: int = field(
        default=0,
        metadata={"help": "Micro-batch size in padded tokens (rows × longest row; with share_prompt, one row per "
                  "group: the prompt plus all its answers), whole prompt groups only; "
                  "0 = the whole step in one micro-batch. Lower it when memory runs out (e.g. 8192)."},
    )
    share_prompt: bool = field(
        default=True,
        metadata={"help": "Score each prompt once for its 1+B answers: one packed row per group under a block "
                  "attention mask (dftlite/prefix_sharing.py); the same scores and gradients up to rounding, fewer "
                  "tokens computed. false = every answer carries its own copy of the prompt. Models that take no "
                  "custom 4D mask (e.g. flash_attention_2) fall back to false, with a line in the log."},
    )
    allow_negative_reuse: bool = field(
        default=False,
        metadata={"help": "When a prompt has fewer than B × epochs negatives, cycle through them again instead of failing."},
    )
    # TrainingArguments fields, with defaults for LoRA training:
    output_dir: str | None = field(
        default="runs/dftlite", metadata={"help": "Where checkpoints, the adapter, logs and curves go."}
    )
    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "Peak learning rate; 1e-4 suits LoRA (the paper's full fine-tuning used a far lower one)."},
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (transformers' names)."})
    warmup_steps: float = field(
        default=0.1,
        metadata={"help": "Linear warmup: steps if >= 1, else a fraction of all steps, applied only to runs of at "
                  f"least {MIN_STEPS_FOR_WARMUP} steps (a warmup's first step runs at learning rate 0)."},
    )
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "S, prompts per step per device (each brings 1 + B sequences)."}
    )
    num_train_epochs: float = field(
        default=2.0, metadata={"help": "Epochs; each needs B fresh negatives per prompt (pool: m = B × epochs)."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N optimizer steps."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Checkpoint directory to resume from, or 'last': the newest complete checkpoint in output_dir."},
    )
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Logging integrations (none, tensorboard, wandb, ...)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay false: batches hold example indices, not model inputs."}
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Activation checkpointing (in transformers 5 an alias of activation_checkpointing). "
                  "Unset = on: LoRA training is activation-bound.", "nargs": "?", "const": True},
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        settings = METHOD_SETTINGS[self.method]
        for name, unread in UNREAD_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, settings.get(name, unread))
        if self.sft_weight and "sft_weight" not in settings:
            readers = sorted(method for method, read in METHOD_SETTINGS.items() if "sft_weight" in read)
            raise ValueError(f"sft_weight applies to {', '.join(readers[:-1])} and {readers[-1]}, "
                             f"not to method {self.method!r}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {self.gamma}")
        if self.u_init not in ("one", "first_batch"):
            raise ValueError(f"u_init must be 'one' or 'first_batch', got {self.u_init!r}")
        if self.reference not in ("sampler_prompt", "train_prompt"):
            raise ValueError(f"reference must be 'sampler_prompt' or 'train_prompt', got {self.reference!r}")
        if self.num_negatives_per_step < 1:
            raise ValueError(f"num_negatives_per_step must be >= 1, got {self.num_negatives_per_step}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.sft_weight < 0 or self.simpo_gamma_beta_ratio < 0:
            raise ValueError(
                f"sft_weight and simpo_gamma_beta_ratio must be >= 0, got {self.sft_weight}, {self.simpo_gamma_beta_ratio}"
            )
        if self.token_budget < 0:
            raise ValueError(f"token_budget must be >= 0 (0 = one micro-batch), got {self.token_budget}")
        if self.hub_token:  # TrainingArguments would pickle it into every checkpoint (training_args.bin)
            raise ValueError("hub_token is not accepted: it would be saved with the run. Put the Hub token in the "
                             "environment variable HF_TOKEN instead")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be false for dftlite train (batches hold example indices)")
        if self.eval_data_path and not self.eval_pool_dir and self.method != "sft":
            raise ValueError("eval_data_path needs eval_pool_dir: the held-out prompts' own negative pool (`dftlite sample`)")
        if self.gradient_checkpointing is None and getattr(self, "activation_checkpointing", None) is None:
            # on by default; transformers 5 renamed the field (gradient_checkpointing is its alias), 4.x lacks the new name
            name = "activation_checkpointing" if hasattr(self, "activation_checkpointing") else "gradient_checkpointing"
            setattr(self, name, True)
        super().__post_init__()

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup steps of a run of `num_training_steps` optimizer steps (TrainingArguments asks this).

        Whole steps (>= 1) are kept as given; a fraction applies only from MIN_STEPS_FOR_WARMUP steps on."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        if num_training_steps < MIN_STEPS_FOR_WARMUP:
            return 0
        return math.ceil(num_training_steps * self.warmup_steps)


def schedule_problem(args: TrainingArguments, num_training_steps: int, max_simulated: int = 10_000) -> str | None:
    """What is wrong with a run's learning-rate schedule, in one sentence for the user, or None.

    Catches a run in which no optimizer step has a learning rate above 0 (the adapter cannot change)
    and a warmup that covers the whole run. The schedule is transformers' own (`get_scheduler`), stepped
    on a one-parameter optimizer, so every scheduler type is judged the same way."""
    import torch
    from transformers import get_scheduler

    warmup = args.get_warmup_steps(num_training_steps)
    how = (f"learning_rate {args.learning_rate:g}, {args.lr_scheduler_type} schedule, warmup_steps {args.warmup_steps:g} "
           f"→ {warmup} warmup step(s)")
    fix = ("Raise learning_rate or lower warmup_steps, or train more steps (more examples, num_train_epochs, "
           "or a smaller per_device_train_batch_size).")
    try:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=warmup,
                                  num_training_steps=num_training_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        rates = []
        for _ in range(min(num_training_steps, max_simulated)):  # (steps,): the rate each optimizer step uses
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    except (TypeError, ValueError):  # a scheduler that needs more than steps (reduce_lr_on_plateau): not judged
        return None
    if not any(rate > 0 for rate in rates):
        return (f"this run's {num_training_steps} optimizer step(s) all have learning rate 0 ({how}): training "
                f"will not change the model. {fix}")
    if warmup >= num_training_steps:
        return (f"the warmup covers all {num_training_steps} optimizer step(s) of this run ({how}): the learning rate "
                f"never reaches its peak and the first step is at 0. {fix}")
    return None
