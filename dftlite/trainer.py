"""`dftlite train`: Discriminative Fine-Tuning (DFT, DFT2) with LoRA/QLoRA, on one GPU or a CPU.

    dftlite train --config configs/smollm2-135m_gsm8k_dft2_cpu.yaml [--field value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml -m dftlite.cli train --config ...  # docs/multi_gpu.md

Each step takes S prompts. Prompt i contributes its data answer y_i (the positive) and B
negatives y'_ij from the offline pool of `dftlite sample` (`dftlite.draws` says which), all
scored under the training prompt x_i in one forward pass; the loss (`dftlite.losses`) contrasts
them, and the per-example moving average u_i (`dftlite.estimators.LogUTable`) is updated after
the step. The (1+B)·S sequences are cut into micro-batches of whole prompt groups under
`token_budget`, with forward + backward per micro-batch. A group's prompt is computed once for
its 1+B answers (`share_prompt`, `dftlite.prefix_sharing`).

`DFTTrainer` is a `transformers.Trainer`; it overrides only what DFT needs: the step
(`training_step`, `prediction_step`), the u table and draw state in checkpoints
(`_save_checkpoint`, `_load_from_checkpoint`) and the logged metrics (`log`). The loop,
optimizer, scheduler, accumulation, RNG state and logging backends are the Trainer's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dftlite.checkpoints import (SaveOnInterrupt, checkpoint_guard, dft_state_meta, incomplete_checkpoint_message,
                                 last_complete_checkpoint, load_dft_state, load_sharded_adapter, resume_checkpoint,
                                 save_dft_state)
from dftlite.config import ConfigError
from dftlite.data import DataConfig, load_data
from dftlite.dft_config import DFTConfig, schedule_problem
from dftlite.draws import (Group, IndexDataset, NegativeDraws, Split, check_whole_batches, collate_indices,
                           epochs_planned, load_split, micro_batches, pad_groups)
from dftlite.estimators import LogUTable
from dftlite.logprobs import scoring_as_forward, sequence_logprobs
from dftlite.losses import method_loss
from dftlite.models import ModelConfig, load_model, sampler_view
from dftlite.outputs import disk_full_guard, output_lock, staged_directory, write_text_atomic
from dftlite.prefix_sharing import pack_groups, shared_prompt_logprobs, sharing_problem

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A NaN or inf in a step's scores, loss or gradients; raised before the optimizer step."""


class DFTTrainer(Trainer):
    """Trainer for DFT/DFT2 and the baselines; see the module docstring for what it overrides."""

    def __init__(self, model, args: DFTConfig, tokenizer, train_split: Split, eval_split: Split | None = None, callbacks=None):
        self.interrupt = SaveOnInterrupt()
        super().__init__(
            model=model, args=args, data_collator=collate_indices, train_dataset=IndexDataset(len(train_split), "example_index"),
            eval_dataset=IndexDataset(len(eval_split), "eval_index") if eval_split is not None else None,
            processing_class=tokenizer, callbacks=[self.interrupt, *(callbacks or [])],
        )
        self.train_split, self.eval_split = train_split, eval_split
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.uses_u = args.method in ("dft", "dft2")
        per_draw = 0 if args.method == "sft" else args.num_negatives_per_step
        check_whole_batches(len(train_split), args)
        if self.is_deepspeed_enabled and args.token_budget:
            # accelerate's DeepSpeed backward steps the optimizer at every backward of a synced step
            raise ConfigError("DeepSpeed needs token_budget: 0 (one backward per step); to save memory lower "
                              "per_device_train_batch_size and raise gradient_accumulation_steps instead")
        if self.is_fsdp_enabled and args.token_budget:
            # every FSDP forward is a collective (all-gathers), so all processes must run as many micro-batches;
            # cut by token_budget, their counts depend on each process's sequence lengths and differ
            raise ConfigError("FSDP needs token_budget: 0 (one forward per step on every process); to save memory "
                              "lower per_device_train_batch_size and raise gradient_accumulation_steps instead")
        if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            # the Trainer saves the adapter (adapter_model.safetensors) from a whole state dict only; sharded, no
            # checkpoint or final adapter would hold the trained weights
            raise ConfigError("FSDP needs fsdp_state_dict_type: FULL_STATE_DICT (as configs/accelerate/fsdp_qlora.yaml); "
                              "with sharded state dicts no checkpoint would hold the adapter")
        if self.is_fsdp_enabled and args.method == "dpo":  # its reference pass calls the model's trunk, not the FSDP root
            raise ConfigError("method: dpo does not run under FSDP (its reference pass bypasses FSDP's all-gathers); use DDP")
        # DeepSpeed would divide by the accumulation steps a second time; transformers' own step passes the same
        self._backward_kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}
        self.log_u = LogUTable(len(train_split), init=args.u_init)
        self.draws = self._draws(train_split, per_draw)
        if per_draw:
            self.draws.check_capacity(epochs_planned(len(train_split), args))
        self.eval_draws = None
        if eval_split is not None:  # evaluation scores held-out negatives whenever there is a pool, SFT included
            eval_per_draw = args.num_negatives_per_step if any(eval_split.negatives) else 0
            self.eval_draws = self._draws(eval_split, eval_per_draw)
            if eval_per_draw:
                self.eval_draws.check_capacity(1, what="evaluation")
        self._metric_sums = {"train": {}, "eval": {}}  # name -> Σ value × prompts, and "_prompts", "_tokens"
        self._last_log_time = None
        self._failure = None  # several processes: a NonFiniteLossError held until all processes know (see _fail)
        problem = sharing_problem(model) if args.share_prompt else None
        self.share_prompt = args.share_prompt and problem is None
        if args.should_log:
            logger.info("prompt scoring: %s", "shared, each prompt computed once for its 1+B answers (share_prompt)"
                        if self.share_prompt else f"unshared, each answer with its own copy of the prompt ({problem})"
                        if problem else "unshared, each answer with its own copy of the prompt (share_prompt: false)")

    def _draws(self, split: Split, per_draw: int) -> NegativeDraws:
        counts = [len(negatives) for negatives in split.negatives]
        return NegativeDraws(split.ids, counts, per_draw, self.args.seed, self.args.allow_negative_reuse)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's scheduler, and a warning when it leaves the run without a real update."""
        problem = schedule_problem(self.args, num_training_steps)
        if problem and self.args.should_log:
            logger.warning("warning: %s", problem)
        return super().create_scheduler(num_training_steps, optimizer)

    def train(self, *args, **kwargs):
        """Trainer.train, with Ctrl-C turned into: save a checkpoint at the next step boundary, then stop."""
        with self.interrupt:
            self._last_log_time = time.perf_counter()
            return super().train(*args, **kwargs)

    # ---- the step -------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._train_mode(model)
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        indices = inputs["example_index"].cpu()  # (S,)
        groups = self._groups(self.train_split, indices, [self.draws.positions(i) for i in indices.tolist()])
        # the Trainer sums what training_step returns over accumulation steps: scale like its own step
        scale = 1.0 / self.current_gradient_accumulation_steps
        loss, new_log_u = self._forward(model, groups, indices, train=True, scale=scale)
        if self.accelerator.sync_gradients and self.accelerator.scaler is None:
            self._check_gradients(model)
        self._sync_state(indices, new_log_u)
        return loss * scale

    def _train_mode(self, model):
        model.train()
        if not self.args.scoring_dropout:  # as the official trainer: dropout would add noise to the weights exp(s/τ - log u)
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.eval()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the same loss and metrics on held-out prompts; never touches the u table or draws.

        Several processes: accelerate pads the last batch with repeats, which `gather_for_metrics`
        drops from the Trainer's eval_loss; they are left out here too (the loss returned is the mean
        over the real prompts). A batch of repeats only is still scored (an FSDP forward is collective),
        and counted as zero prompts."""
        indices = inputs["eval_index"].cpu()
        real = indices[~self._padding(len(indices))]
        counted = len(real) > 0
        indices = real if counted else indices[:1]
        groups = self._groups(self.eval_split, indices, [self.eval_draws.positions(i, draw=0) for i in indices.tolist()])
        with torch.no_grad():
            loss, _ = self._forward(model, groups, indices, train=False, counted=counted)
        return loss.detach(), None, None

    def _padding(self, batch_size: int) -> torch.Tensor:
        """(batch_size,) bool: the items of this process's last batch that accelerate added as padding.

        The gathered last batch is [process 0's items, process 1's, ...]; its first `remainder` are real."""
        state, padding = self.accelerator.gradient_state, torch.zeros(batch_size, dtype=torch.bool)
        if self.accelerator.num_processes > 1 and state.end_of_dataloader and state.remainder > 0:
            padding = self.accelerator.process_index * batch_size + torch.arange(batch_size) >= state.remainder
        return padding

    def _groups(self, split: Split, indices: torch.Tensor, positions: list[list[int]]) -> list[Group]:
        key = "logp_train_prompt" if self.args.reference == "train_prompt" else "logp_sampler"
        groups = []
        for index, chosen in zip(indices.tolist(), positions):
            pair, records = split.pairs[index], [split.negatives[index][p] for p in chosen]
            groups.append(Group(split.ids[index], pair.prompt_ids, [pair.answer_ids] + [r["token_ids"] for r in records],
                                [r[key] for r in records if self.args.method == "dft"]))
        return groups

    def _forward(self, model, groups: list[Group], indices: torch.Tensor, train: bool, scale: float = 1.0,
                 counted: bool = True):
        """Score the groups micro-batch by micro-batch; backward each when training.

        Returns (the step's loss, detached; (S,) float64 new log u or None). The micro-batch
        losses are weighted so that their sum is the loss of the whole step (mean over prompts;
        SFT terms: over positive tokens). counted=False: the metrics count zero prompts."""
        args, num_prompts = self.args, len(groups)
        device = self.args.device
        if self.uses_u and train:
            log_u_prev, gamma = self.log_u.lookup(indices, args.gamma)  # (S,), (S,)
        else:  # evaluation: the plug-in estimate u = ĝ (γ = 1); the table stays as it is
            log_u_prev, gamma = torch.zeros(num_prompts, dtype=torch.float64), torch.ones(num_prompts, dtype=torch.float64)
        new_log_u = torch.zeros(num_prompts, dtype=torch.float64) if self.uses_u else None
        positive_tokens = sum(len(g.completions[0]) for g in groups)
        step_loss = torch.zeros((), device=device)
        rows = len(groups[0].completions)  # 1 + B
        shared = self.share_prompt and rows > 1  # SFT's groups are one row: nothing to share
        batches = micro_batches(groups, args.token_budget, packed=shared)
        for number, members in enumerate(batches):
            mb_groups = [groups[g] for g in members]
            # shared: (G, T) packed rows and their index tensors; else (N, T) input_ids, attention_mask, completion_mask
            inputs = pack_groups(mb_groups, self.pad_id, device).tensors() if shared else pad_groups(mb_groups, self.pad_id, device)
            scorer = shared_prompt_logprobs if shared else sequence_logprobs
            ref_logps = None
            if args.method == "dpo":  # π_ref = the frozen base: adapters off, no grad
                unwrapped = self.accelerator.unwrap_model(model)
                with torch.no_grad(), sampler_view(unwrapped):
                    ref_logps = scorer(unwrapped, *inputs)[0].view(-1, rows)
                if train:  # sampler_view restored train mode on every module, dropout included
                    self._train_mode(model)
            last = number == len(batches) - 1
            sync = contextlib.nullcontext() if last or not train else self.accelerator.no_sync(model)
            with sync:
                logps, lengths = self._sequence_logprobs(model, scorer, inputs)
                logps, lengths = logps.view(-1, rows), lengths.view(-1, rows).to(logps.dtype)  # (S_mb, 1+B)
                loss, mb_log_u, metrics = self.micro_batch_loss(
                    logps, lengths, ref_logps=ref_logps, log_u_prev=log_u_prev[members], gamma=gamma[members],
                    neg_ref_logps=torch.tensor([g.neg_ref_logps for g in mb_groups], dtype=torch.float64, device=device),
                    group_share=len(members) / num_prompts,
                    token_share=sum(len(g.completions[0]) for g in mb_groups) / positive_tokens,
                )
                self._check_finite(mb_groups, logps, loss, mb_log_u, train)
                if train:
                    self.accelerator.backward(loss * scale, **self._backward_kwargs)
            step_loss = step_loss + loss.detach()
            if mb_log_u is not None:
                new_log_u[members] = mb_log_u.detach().cpu()
            per_token = logps.detach() / lengths  # (S_mb, 1+B) mean log-prob per token of each sequence
            metrics["pos_logp_per_token"] = per_token[:, 0].mean()
            if rows > 1:
                metrics["neg_logp_per_token"] = per_token[:, 1:].mean()
            tokens = sum(len(g.prompt_ids) + len(c) for g in mb_groups for c in g.completions)
            self._record("train" if train else "eval", metrics, len(members) if counted else 0, tokens if counted else 0)
        return step_loss, new_log_u

    def _sequence_logprobs(self, model, scorer, inputs):
        """(N,) summed completion log-probs and (N,) lengths, with grad; chunked, no full-vocab log_softmax.
        scorer: `sequence_logprobs` or `shared_prompt_logprobs`, inputs: its tensors after the model."""
        unwrapped = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            # through the wrapper's forward under DDP and FSDP (its hooks gather the root's shards, even on 1 process)
            if self.accelerator.num_processes == 1 and not self.is_fsdp_enabled:
                return scorer(model, *inputs)
            with scoring_as_forward(unwrapped, scorer):
                return model(*inputs)

    def micro_batch_loss(self, logps, lengths, *, ref_logps, log_u_prev, gamma, neg_ref_logps, group_share, token_share):
        """One micro-batch's share of the step loss: `losses.method_loss` with this run's settings.

        logps, lengths: (S_mb, 1+B) summed log-probs and token counts, the positive first; ref_logps: the
        same under the frozen reference (DPO), else None. Returns (loss, (S_mb,) new log u or None, metrics).
        benchmarks/step_cost.py overrides it to time another objective on the same sequences."""
        args = self.args
        ref_pos, ref_neg = (None, None) if ref_logps is None else (ref_logps[:, 0], ref_logps[:, 1:])  # (S_mb,), (S_mb, B)
        return method_loss(args.method, logps[:, 0], lengths[:, 0], logps[:, 1:], lengths[:, 1:],
                           tau=args.tau, beta=args.beta, simpo_gamma_beta_ratio=args.simpo_gamma_beta_ratio,
                           sft_weight=args.sft_weight, log_u_prev=log_u_prev, gamma=gamma, neg_ref_logps=neg_ref_logps,
                           ref_pos_logps=ref_pos, ref_neg_logps=ref_neg, group_share=group_share, token_share=token_share)

    def _check_finite(self, groups: list[Group], logps, loss, new_log_u, train: bool):
        checks = [logps.detach().flatten(), loss.detach().flatten().to(logps.dtype)]
        if new_log_u is not None:
            checks.append(new_log_u.detach().to(logps.dtype))
        if bool(torch.isfinite(torch.cat(checks)).all()):  # one device sync for the common case
            return
        parts = [("positive log-probs", logps[:, 0]), ("negative log-probs", logps[:, 1:]), ("loss", loss),
                 ("log u estimate", new_log_u)]
        part = next(name for name, value in parts if value is not None and not bool(torch.isfinite(value.detach()).all()))
        self._fail(f"non-finite {part} (example ids {[g.example_id for g in groups]})", train)

    def _check_gradients(self, model):
        grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack([g.float().norm() for g in grads])).all()):
            self._fail("non-finite gradients (finite loss)", train=True)

    def _fail(self, what: str, train: bool):
        """Raise NonFiniteLossError; with several processes, hold it until the step's (or the
        evaluation's) all-gather, where every process raises: one raising alone would leave the
        others waiting in a collective."""
        where = f"step {self.state.global_step + 1}" if train else f"evaluation after step {self.state.global_step}"
        last = last_complete_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        error = NonFiniteLossError(
            f"{where}: {what}. Training stopped before the optimizer step; nothing was saved for this step. "
            f"Last good checkpoint: {last or 'none'}. Lower learning_rate, or check the data and the pool."
        )
        if self.accelerator.num_processes == 1:
            raise error
        self._failure = self._failure or error

    def _raise_held_failure(self, failed_anywhere: bool, train: bool):
        """Several processes: raise on every process once the all-gather shows that one failed."""
        if not failed_anywhere:
            return
        error, self._failure = self._failure, None
        where = f"step {self.state.global_step + 1}" if train else f"evaluation after step {self.state.global_step}"
        raise error or NonFiniteLossError(
            f"{where}: another process found non-finite values (its error says which). "
            "Training stopped before the optimizer step; nothing was saved for this step."
        )

    def _sync_state(self, indices: torch.Tensor, new_log_u: torch.Tensor | None):
        """Write the step's new log u and draw counts on every process.

        Each process all-gathers (example index, new log u) so all hold the complete, identical u
        table and draw state; checkpoints then resume with any number of processes. The same
        gather tells every process whether any hit a non-finite value (all raise) or got Ctrl-C
        (all stop after this step)."""
        values = new_log_u if new_log_u is not None else torch.full((len(indices),), float("nan"), dtype=torch.float64)
        flags = torch.tensor([float(self._failure is not None), float(self.interrupt.requested)], dtype=torch.float64)
        rows = torch.cat([indices.double()[:, None], values[:, None], flags.expand(len(indices), 2)], dim=1)  # (S, 4)
        if self.accelerator.num_processes > 1:
            rows = self.accelerator.pad_across_processes(rows.to(self.accelerator.device), dim=0, pad_index=-1)
            rows = self.accelerator.gather(rows).cpu()
            rows = rows[rows[:, 0] >= 0]
            self._raise_held_failure(bool((rows[:, 2] > 0).any()), train=True)
            self.interrupt.agreed = bool((rows[:, 3] > 0).any())
            # distinct examples: draws.check_whole_batches rules out accelerate's repeats in an epoch's last batch
        index = rows[:, 0].long()
        if new_log_u is not None:
            self.log_u.update(index, rows[:, 1])
        self.draws.advance(index)

    # ---- metrics --------------------------------------------------------------------------

    def _record(self, mode: str, metrics: dict, prompts: int, tokens: int):
        names = sorted(metrics)
        values = torch.stack([metrics[n].detach().double().cpu() for n in names]).tolist()  # one sync
        sums = self._metric_sums[mode]
        for name, value in zip(names, values):
            sums[name] = sums.get(name, 0.0) + value * prompts
        sums["_prompts"] = sums.get("_prompts", 0.0) + prompts
        sums["_tokens"] = sums.get("_tokens", 0.0) + tokens

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Add the averaged step metrics since the last log (train) or of this evaluation (eval_*)."""
        mode = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        sums = self._metric_sums.get(mode) or {}
        if sums:
            names = sorted(sums)
            totals = torch.tensor([sums[n] for n in names], dtype=torch.float64)
            if self.accelerator.num_processes > 1:  # + whether this process held a non-finite evaluation
                totals = torch.cat([totals, torch.tensor([float(self._failure is not None)], dtype=torch.float64)])
                totals = self.accelerator.gather(totals.to(self.accelerator.device)).view(-1, len(names) + 1).sum(0).cpu()
                self._raise_held_failure(totals[-1].item() > 0, train=False)
            total = dict(zip(names, totals.tolist()))
            prefix = "" if mode == "train" else "eval_"
            logs.update({prefix + n: v / total["_prompts"] for n, v in total.items() if not n.startswith("_")})
            if mode == "train":
                now = time.perf_counter()
                logs["tokens_per_second"] = total["_tokens"] / max(now - self._last_log_time, 1e-9)
                self._last_log_time = now
            self._metric_sums[mode] = {}
        super().log(logs, start_time)

    # ---- checkpoints ----------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None):
        """The Trainer's save, without training_args.bin: a pickle of the arguments, which loads only with
        weights_only=False (dftlite_config.yaml holds them as text)."""
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            Path(output_dir or self.args.output_dir, TRAINING_ARGS_NAME).unlink(missing_ok=True)

    def _save_checkpoint(self, model, trial):
        checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with checkpoint_guard(checkpoint, owner=self.args.should_save):  # a failed save leaves nothing resumable
            if self.args.should_save:  # our state first: the Trainer's trainer_state.json, last, marks it complete
                self.save_dft_state(checkpoint)
            super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir: str):
        """Under FSDP, the Trainer's save without accelerate's `save_fsdp_model`, which pickles the adapter
        (pytorch_model_fsdp.bin, torch.save) beside adapter_model.safetensors, which holds the same tensors
        (FULL_STATE_DICT). Weights are written only as safetensors; `_load_from_checkpoint` reads them back."""
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        incomplete = incomplete_checkpoint_message(resume_from_checkpoint)
        if incomplete:
            raise ConfigError(incomplete)
        model = model if model is not None else self.model
        if self.is_fsdp_enabled:
            load_sharded_adapter(self.accelerator.unwrap_model(model), resume_from_checkpoint)
        else:  # one process or DDP: the Trainer loads adapter_model.safetensors, whichever launch wrote it
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.load_dft_state(resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None):
        """The Trainer's, and an FSDP checkpoint resumed without FSDP (one process, or DDP).

        Under FSDP the Trainer writes the whole optimizer state keyed by parameter name (optimizer.bin); without
        FSDP it reads optimizer.pt, keyed by position, and would stop at the missing file. torch's
        `set_optimizer_state_dict` maps the names onto this optimizer's parameters."""
        if (checkpoint is None or self.is_fsdp_enabled or os.path.isfile(os.path.join(checkpoint, "optimizer.pt"))
                or not os.path.isfile(os.path.join(checkpoint, "optimizer.bin"))):
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(os.path.join(checkpoint, "optimizer.bin"), map_location="cpu", weights_only=True)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper -> torch's optimizer
        set_optimizer_state_dict(self.accelerator.unwrap_model(self.model_wrapped), optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    def _state_meta(self) -> dict:
        return dft_state_meta(self.args.method, self.train_split.ids, self.args.seed, self.draws.per_draw)

    def save_dft_state(self, directory: str | os.PathLike):
        """dft_state.safetensors (the u table and draw counts; complete on every process) + dft_state.json."""
        save_dft_state(directory, self.log_u, self.draws, self._state_meta())

    def load_dft_state(self, directory: str | os.PathLike):
        load_dft_state(directory, self.log_u, self.draws, self._state_meta())


# ---- the job ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output_dir: str
    adapter_path: str
    metrics: dict  # the Trainer's train metrics, the last step's logged metrics, the final evaluation


def build_trainer(model_config: ModelConfig, data_config: DataConfig, dft_config: DFTConfig, model=None, tokenizer=None,
                  callbacks=None) -> DFTTrainer:
    """Load data, model and pools, and check them; return a ready DFTTrainer."""
    from rich.console import Console
    from transformers import set_seed

    console = Console(stderr=True)
    set_seed(dft_config.seed)  # the LoRA initialisation
    examples = load_data(data_config)
    if model is None:
        model, tokenizer = load_model(model_config, gradient_checkpointing=bool(dft_config.gradient_checkpointing))
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    needs_pool = dft_config.method != "sft"
    reference = dft_config.reference if dft_config.method == "dft" else None
    train_split, summary = load_split(examples, tokenizer, data_config, model, dft_config.pool_dir if needs_pool else None,
                                      reference, model_config.model_name_or_path)
    console.print(f"training data: {summary}")
    eval_split = None
    if dft_config.eval_data_path:
        eval_data = dataclasses.replace(data_config, data_path=dft_config.eval_data_path, max_examples=None)
        eval_split, summary = load_split(load_data(eval_data), tokenizer, eval_data, model, dft_config.eval_pool_dir,
                                         reference, model_config.model_name_or_path, what="evaluation")
        console.print(f"evaluation data: {summary}")
    return DFTTrainer(model, dft_config, tokenizer, train_split, eval_split, callbacks)


def train(model_config: ModelConfig, data_config: DataConfig, dft_config: DFTConfig, model=None, tokenizer=None) -> TrainResult:
    """Train, then write <output_dir>/adapter, dft_state.*, log_history.jsonl, the config and the curves.

    output_dir is locked for the run (`dftlite.outputs.output_lock`): a second run on it stops at once."""
    from rich.console import Console
    from rich.table import Table

    from dftlite.config import save_resolved_config
    from dftlite.plots import plot_training_curves

    console = Console()
    output_dir = Path(dft_config.output_dir)
    writer = int(os.environ.get("RANK", "0")) == 0  # before the Trainer (and its accelerator) exists: the launcher's rank
    with output_lock(output_dir, "output_dir") if writer else contextlib.nullcontext():
        trainer = build_trainer(model_config, data_config, dft_config, model, tokenizer)
        if trainer.args.should_save:
            save_resolved_config(output_dir, model_config, data_config, dft_config)
        output = trainer.train(resume_from_checkpoint=resume_checkpoint(dft_config.resume_from_checkpoint, output_dir))
        if trainer.interrupt.stopped_at is not None:
            checkpoint = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{trainer.interrupt.stopped_at}"
            console.print(f"[bold yellow]Interrupted[/]: checkpoint saved at step {trainer.interrupt.stopped_at} in {checkpoint}. "
                          f"Resume with: dftlite train ... --resume_from_checkpoint {checkpoint}")
            raise SystemExit(130)
        metrics = dict(output.metrics)
        step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        metrics.update(step_logs[-1] if step_logs else {})
        evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
        if evals and evals[-1]["step"] == trainer.state.global_step:  # eval_strategy already evaluated the end
            metrics.update(evals[-1])
        elif trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())
        adapter_path, should_save = output_dir / "adapter", trainer.args.should_save
        with disk_full_guard(output_dir, "the trained adapter"):
            with staged_directory(adapter_path, owner=should_save) as staging:  # the adapter appears whole, or not at all
                trainer.save_model(str(staging))  # PEFT adapter (safetensors) + tokenizer; every process takes part
                if should_save:  # PEFT's boilerplate card names the base by this machine's path: a broken repo if
                    (staging / "README.md").unlink(missing_ok=True)  # pushed as is; `dftlite export` writes the card
            if should_save:
                trainer.save_dft_state(output_dir)
                write_text_atomic(output_dir / "log_history.jsonl",
                                  "".join(json.dumps(entry) + "\n" for entry in trainer.state.log_history))
                plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    if should_save:
        table = Table(title=f"dftlite train ({dft_config.method}) → {output_dir}", show_header=False)
        for key in sorted(metrics):
            value = metrics[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)
    return TrainResult(str(output_dir), str(adapter_path), metrics)
