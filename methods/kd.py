"""KD: MLM plus KL distillation towards a frozen copy of the model from the previous domain.

The teacher is the model as it stood when domain t began, i.e. the weights of the previous
domain's checkpoint, so it needs no state of its own: `before_domain` re-copies it, also after
`--resume`. The KL is taken per token on the masked input the student just saw, over the hidden
dimension (`target: hidden`, as the companion code distils the last hidden states) or over the
vocabulary at the masked positions (`target: logits`), at temperature T and scaled by T².
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods import Method, knob, positive, register
from methods.modeling import encoder_of, mlm_head_of


@dataclass
class Args:
    """L_mlm + 1 · KL on the last hidden states at T = 1 (the companion code's DistillKL(1))."""

    weight: float = 1.0  # λ in L_mlm + λ · KL
    temperature: float = knob(1.0, check=positive)
    # "hidden" (last hidden states) or "logits" (MLM logits)
    target: Literal["hidden", "logits"] = "hidden"


@register("kd")
class Distillation(Method):
    """MLM + KL(teacher ‖ student), the teacher frozen at the end of the previous domain."""

    Args = Args

    def __init__(self, args: Args | None = None) -> None:
        super().__init__(args)
        self.teacher: nn.Module | None = None

    def before_domain(self, ctx, t: int) -> None:
        if t > 0:
            self.teacher = frozen_copy(ctx.model)

    def loss(self, ctx, batch: dict[str, Tensor], outputs) -> Tensor:
        if self.teacher is None:
            return outputs.loss
        return outputs.loss + self.args.weight * self.distillation(ctx.model, batch, outputs.hidden)

    def distillation(self, model: nn.Module, batch: dict[str, Tensor], hidden: Tensor) -> Tensor:
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

    def after_domain(self, ctx, t: int) -> None:
        self.teacher = None  # free the copy while the end tasks are fine-tuned


def frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def kl_divergence(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Mean over rows of KL(softmax(teacher / T) ‖ softmax(student / T)) · T²."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2
