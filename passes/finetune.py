"""`finetune`: knowledge distillation from the dense model with masks fixed, time-bounded (causal LMs and
encoders).

Causal LMs: the sparse model (student) learns the dense model's (teacher's) next-token distributions on
the calibration windows: loss = KL(teacher ‖ student) at temperature `temperature`, averaged over tokens.
Encoders (what they are used for is their hidden states — sentence embeddings pool them): loss = mean over
the valid tokens of 1 − cos(student hidden state, teacher hidden state), the token-level form of the
embedding cosine `sparsec eval` scores (`temperature` does not apply).
Only the weights of pruned layers train (embeddings, norms and dense layers stay frozen, which also
keeps a tied lm_head intact); their gradients are masked and the masks re-applied after every AdamW
step, so zeros stay zeros. A held-out split of the calibration samples is scored every `eval_every`
steps and the best state is kept (early stopping); training stops at `steps` or after `seconds`.
CPU-feasible for ~100M-parameter models in minutes; the teacher runs forward-only, one sample at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from compiler.errors import SpecError
from compiler.ir import ModelIR
from compiler.pass_infra import Pass, PassContext, PassResult, option
from passes.paired_grams import dense_reference, split_samples
from passes.reconstruct import pruned_targets


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) on temperature-softened distributions (× T²)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1).reshape(-1, student_logits.shape[-1])
    p = F.log_softmax(teacher_logits.float() / t, dim=-1).reshape(-1, teacher_logits.shape[-1])
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


@dataclass(frozen=True)
class Finetune(Pass):
    """Logits distillation from the dense model, masks fixed, time-bounded, held-out early stopping."""

    name = "finetune"
    needs_calibration = True
    needs_dense = True
    seconds: float = option(120.0, "wall-clock budget of the training loop")
    steps: int = option(200, "most optimizer steps")
    lr: float = option(2e-5, "AdamW learning rate")
    batch: int = option(2, "calibration samples per step")
    temperature: float = option(1.0, "distillation temperature")
    holdout: float = option(0.25, "share of calibration samples held out for early stopping")
    eval_every: int = option(10, "steps between held-out checks")

    def validate(self) -> None:
        for key in ("seconds", "lr", "temperature"):
            if not getattr(self, key) > 0:
                raise SpecError(f"finetune: {key} must be > 0, got {getattr(self, key)}")
        for key in ("steps", "batch", "eval_every"):
            if getattr(self, key) < 1:
                raise SpecError(f"finetune: {key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.holdout < 1.0:
            raise SpecError(f"finetune: holdout must be in (0, 1), got {self.holdout}")

    def requires(self, ir: ModelIR) -> None:
        if ir.model_type not in ("causal-lm", "encoder"):
            raise SpecError(f"finetune: distillation needs a causal LM or an encoder, got model type '{ir.model_type}'")
        pruned_targets(ir, self.name)

    def call(self, ir: ModelIR, ctx: PassContext) -> PassResult:
        names = pruned_targets(ir, self.name)
        teacher = dense_reference(ctx, self.name).module
        samples = ctx.require_calibration(self.name).samples
        is_held = split_samples(len(samples), self.holdout, self.name)
        train = [s for s, h in zip(samples, is_held) if not h]
        held = [s for s, h in zip(samples, is_held) if h]
        student = ir.module
        causal = ir.model_type == "causal-lm"
        params = {n: ir.get_module(n).weight for n in names}
        keep = {n: (ir.weight(n) != 0) for n in names}
        # masks in the parameter's own layout (Conv1D stores the transpose)
        keep_param = {n: (p.detach() != 0) for n, p in params.items()}
        frozen = [p for p in student.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(list(params.values()), lr=self.lr, weight_decay=0.0)
        teacher_held = [self._logits(teacher, s, causal) for s in held]
        best_loss = self._held_loss(student, held, teacher_held, causal)
        start_loss = best_loss
        best_state = {n: p.detach().clone() for n, p in params.items()}
        history: list[dict[str, Any]] = [{"step": 0, "held_kd": start_loss}]
        started, step, gen = time.perf_counter(), 0, torch.Generator().manual_seed(ctx.seed)
        stop = "steps"
        student.train(False)  # no dropout: the student is trained in eval mode, as distillation of a fixed net
        try:
            while step < self.steps:
                if time.perf_counter() - started > self.seconds:
                    stop = "seconds"
                    break
                pick = torch.randint(0, len(train), (self.batch,), generator=gen).tolist()
                opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for i in pick:
                    t_logits = self._logits(teacher, train[i], causal)
                    with torch.enable_grad():
                        loss = self._loss(self._forward(student, train[i], causal), t_logits, train[i], causal) / self.batch
                        loss.backward()
                    loss_sum += float(loss.detach())
                for n, p in params.items():
                    if p.grad is not None:
                        p.grad.mul_(keep_param[n])
                opt.step()
                with torch.no_grad():
                    for n, p in params.items():
                        p.mul_(keep_param[n])
                step += 1
                ctx.progress(self.name, step, self.steps)
                if step % self.eval_every == 0 or step == self.steps:
                    held_loss = self._held_loss(student, held, teacher_held, causal)
                    history.append({"step": step, "train_kd": loss_sum, "held_kd": held_loss})
                    if held_loss < best_loss:
                        best_loss = held_loss
                        best_state = {n: p.detach().clone() for n, p in params.items()}
                    elif held_loss > best_loss * 1.02:
                        stop = "held-out loss rose"
                        break
        finally:
            for p in params.values():
                p.requires_grad_(False)
                p.grad = None
            for p in frozen:
                p.requires_grad_(True)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best_state[n])
        for n in names:
            if not bool(((ir.weight(n) != 0) <= keep[n]).all()):
                raise SpecError(f"finetune: layer '{n}' gained non-zeros outside its mask (bug)")
        improved = best_loss < start_loss
        metrics = {"steps": step, "stopped_by": stop, "seconds": round(time.perf_counter() - started, 2),
                   "held_kd_before": start_loss, "held_kd_after": best_loss, "train_samples": len(train),
                   "holdout_samples": len(held), "history": history}
        return PassResult(ir, modified=improved, metrics=metrics)

    @staticmethod
    def _forward(model: torch.nn.Module, sample: dict[str, torch.Tensor], causal: bool) -> torch.Tensor:
        """What is distilled: next-token logits (causal LMs) or the last hidden states (encoders)."""
        if causal:
            return model(**_inputs(sample, ("input_ids", "attention_mask")), use_cache=False).logits
        return model(**_inputs(sample, ("input_ids", "attention_mask", "token_type_ids"))).last_hidden_state

    def _loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, sample: dict[str, torch.Tensor],
              causal: bool) -> torch.Tensor:
        if causal:
            return kd_loss(student_out, teacher_out, self.temperature)
        return hidden_loss(student_out, teacher_out, sample.get("attention_mask"))

    def _logits(self, model: torch.nn.Module, sample: dict[str, torch.Tensor], causal: bool) -> torch.Tensor:
        with torch.no_grad():
            return self._forward(model, sample, causal).detach()

    def _held_loss(self, student: torch.nn.Module, held: list[dict[str, torch.Tensor]], teacher_logits: list[torch.Tensor],
                   causal: bool) -> float:
        with torch.no_grad():
            losses = [float(self._loss(self._logits(student, s, causal), t, s, causal)) for s, t in zip(held, teacher_logits)]
        return sum(losses) / len(losses)


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid tokens of 1 − cos(student, teacher) on (batch, tokens, hidden) states."""
    per_token = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    if mask is None:
        return per_token.mean()
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)


def _inputs(sample: dict[str, torch.Tensor], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sample.items() if k in keys}
