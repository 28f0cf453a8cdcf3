"""KD: MLM plus KL distillation of the last hidden states towards a frozen teacher.

Two forms (`form`):

`sequence` (default, the companion code's distillation): the teacher and the student each
encode the **unmasked** input (`clean_input_ids`); their last hidden states [B, L, H] are
turned into distributions by a softmax over dimension 1, the sequence axis, and the loss is
`KL(student ‖ teacher)` summed over the batch and divided by B, at temperature T (scaled by
T²). Taken from the companion code (UIC-Liu-Lab/ContinualLM, commit 57e498c):
- `networks/posttrain/model.py` l.89–95: the student and the teacher run on
  `inputs_ori_ids`, the unmasked ids, and `kd_loss(teacher.hidden_states[-1],
  student.hidden_states[-1])` is computed beside the MLM pass on the masked ids;
- `utils/model.py` l.210–222 (`DistillKL`): `log_softmax(y_s / T, dim=1)`,
  `softmax(y_t / T, dim=1)`, `kl_div(..., size_average=False) · T² / y_s.shape[0]`. Since the
  call passes the teacher's states as `y_s` and the student's as `y_t`, the sum is
  `Σ p_student · (log p_student − log p_teacher)`, i.e. KL(student ‖ teacher);
- `networks/posttrain/model.py` l.26 (`DistillKL(1)`), `approaches/compute_gradient.py`
  l.33–35: T = 1, the term added with weight 1;
- `utils/model.py` l.286–289 and l.450–457: the teacher is loaded from the same checkpoint
  as the student, i.e. θ0 (roberta-base) for the first domain and the previous domain's model
  after, with `requires_grad = False`; as a submodule of the model it follows the model's
  `train()`, so its dropout is on (`approaches/posttrain.py` l.137).
The companion code trains on fixed-length chunks without padding; here padded positions are
left out of the softmax over the sequence, so a padded batch gives the mean over its
sequences of the loss each would get alone, unpadded.

`token`: a per-token KL(teacher ‖ student) over the hidden
dimension (`target: hidden`) or over the vocabulary at the masked positions (`target: logits`)
on the masked input the student just saw, averaged over tokens; no teacher for the first
domain; the teacher in eval mode. On the same hidden states it is 80–100 times smaller than
the sequence form, so at weight 1 it barely regularises.

The teacher is a copy of the model as domain t begins, so it needs no state of its own:
`before_domain` re-copies it, also after `--resume`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods import Method, MethodError, knob, positive, register
from methods.modeling import encoder_of, mlm_head_of

if TYPE_CHECKING:
    from methods.base import Context


@dataclass
class Args:
    weight: float = knob(1.0, "λ in L_mlm + λ · KL (companion: 1)")
    temperature: float = knob(1.0, "T (companion: DistillKL(1))", check=positive)
    form: Literal["sequence", "token"] = knob(
        "sequence",
        "\"sequence\" (companion code) or \"token\" (per-token KL)")
    target: Literal["hidden", "logits"] = knob(
        "hidden",
        "token form only: \"hidden\" (last hidden states) or \"logits\" (MLM)")


@register("kd")
class Distillation(Method):
    """MLM + KL between the student's and a frozen teacher's last hidden states."""
    table_rank = 110

    Args = Args

    def __init__(self, args: Args | None = None) -> None:
        super().__init__(args)
        if self.args.form == "sequence" and self.args.target != "hidden":
            raise MethodError("kd: form 'sequence' distils the last hidden states; "
                              "target 'logits' needs form 'token'")
        self.teacher: nn.Module | None = None

    def before_domain(self, ctx: Context, t: int) -> None:
        if self.args.form == "sequence":
            # θ0 for the first domain (ctx.model is still θ0 then), the previous domain's model
            # after; dropout on, as the companion code's teacher follows the model's train()
            self.teacher = frozen_copy(ctx.model, dropout=True)
        elif t > 0:
            self.teacher = frozen_copy(ctx.model, dropout=False)

    def loss(self, ctx: Context, batch: dict[str, Tensor], outputs) -> Tensor:
        if self.teacher is None:
            return outputs.loss
        if self.args.form == "sequence":
            term = self.sequence_distillation(ctx.model, batch)
        else:
            term = self.distillation(ctx.model, batch, outputs.hidden)
        return outputs.loss + self.args.weight * term

    def sequence_distillation(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The companion code's KD term on the unmasked input (see the module docstring)."""
        ids, mask = batch["clean_input_ids"], batch["attention_mask"]
        student = encoder_of(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        with torch.no_grad():
            teacher = encoder_of(self.teacher)(input_ids=ids, attention_mask=mask)
        return sequence_kl(student, teacher.last_hidden_state, mask, self.args.temperature)

    def distillation(self, model: nn.Module, batch: dict[str, Tensor], hidden: Tensor) -> Tensor:
        """The token form: per-token KL on the masked input the student just saw."""
        logits = self.args.target == "logits"
        picked = batch["labels"] != -100 if logits else batch["attention_mask"].bool()
        with torch.no_grad():
            teacher = encoder_of(self.teacher)(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state[picked]
            if logits:
                teacher = mlm_head_of(self.teacher)(teacher)
        student = mlm_head_of(model)(hidden[picked]) if logits else hidden[picked]
        return kl_divergence(student, teacher, self.args.temperature)

    def after_domain(self, ctx: Context, t: int) -> None:
        self.teacher = None  # free the copy while the end tasks are fine-tuned


def frozen_copy(model: nn.Module, dropout: bool) -> nn.Module:
    """A copy of `model` without gradients, in train mode (dropout on) or eval mode."""
    teacher = copy.deepcopy(model).train(dropout)
    teacher.requires_grad_(False)
    return teacher


def sequence_kl(student: Tensor, teacher: Tensor, attention_mask: Tensor,
                temperature: float = 1.0) -> Tensor:
    """Σ_b KL(softmax_L(student_b / T) ‖ softmax_L(teacher_b / T)) · T² / B.

    The softmax runs over dimension 1 (the sequence) of [B, L, H], over real tokens only.
    """
    real = attention_mask.bool().unsqueeze(-1)
    floor = torch.finfo(torch.float32).min
    s = (student.float() / temperature).masked_fill(~real, floor)
    t = (teacher.float() / temperature).masked_fill(~real, floor)
    log_s, log_t = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
    kl = (log_s.exp() * (log_s - log_t)).masked_fill(~real, 0.0).sum()
    return kl * temperature**2 / student.shape[0]


def kl_divergence(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Mean over rows of KL(softmax(teacher / T) ‖ softmax(student / T)) · T²."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2
