"""Parameter isolation: small named modules (one per domain, or one shared) on a frozen masked LM.

Three kinds, each built with its ecosystem library and checkpointed in that library's own format:
bottleneck adapters (AdapterHub `adapters`), LoRA and soft prompts (`peft`). A method picks a kind
and whether it keeps a module per domain; `IsolationMethod` does the freezing, the switching
between modules, the end-task encoder and the save/reload. The LM itself never changes during
DAP-training; whether it is fine-tuned with the module on an end task is `ft_train_lm`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import adapters
import torch
from adapters import AdapterConfig
from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutput

from methods.base import Method
from methods.modeling import encoder_of, mlm_head_of

if TYPE_CHECKING:
    from benchmark.context import Context

log = logging.getLogger(__name__)
SHARED = "shared"  # the module name of the `ncl-*` methods: one module for the whole sequence


@dataclass
class AdapterArgs:
    """The companion code adds one adapter after each FFN block ("no mh_adapter"), i.e. the
    Pfeiffer / seq_bn layout, with the library's default width. End task: the LM is fine-tuned
    with the adapter (the paper's DAP-Adapter description, as we read it); `ft_train_lm: false`
    trains the adapter and head only (the companion code's `train_adapter` call)."""

    adapter_config: str = "seq_bn"  # an `adapters` config name: seq_bn (Pfeiffer), double_seq_bn
    reduction_factor: int = 16  # bottleneck width = hidden size / reduction_factor
    ft_train_lm: bool = True  # end task: fine-tune the LM with the module (else the module only)


@dataclass
class LoraArgs:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    ft_train_lm: bool = True


@dataclass
class PromptArgs:
    """syn6 texts are short (max_length 16), so a short prompt keeps inside syn-base's 64
    positions."""

    num_virtual_tokens: int = 10
    prompt_init: str = "SAMPLE_VOCAB"  # peft PromptTuningInit: RANDOM | SAMPLE_VOCAB
    ft_train_lm: bool = True


# -- the three kinds of module -------------------------------------------------------------
class Modules:
    """Named modules inside `model` (the masked LM the loop trains; a wrapper for prompts)."""

    model: nn.Module

    def activate(self, name: str) -> None:
        raise NotImplementedError

    def parameters(self, name: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def encoder(self) -> nn.Module:
        """The body an end task is fine-tuned on (its output has one state per real token)."""
        return encoder_of(self.model)

    def save(self, directory: Path, names: list[str]) -> None:
        raise NotImplementedError

    def load(self, directory: Path, names: list[str]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def copy(self, source: str, target: str) -> None:
        """Overwrite module `target` with module `source` (same shapes by construction)."""
        for dst, src in zip(self.parameters(target), self.parameters(source), strict=True):
            dst.copy_(src)


class AdapterModules(Modules):
    """Bottleneck adapters from AdapterHub's `adapters` library."""

    def __init__(self, model: nn.Module, args: AdapterArgs, names: list[str]) -> None:
        adapters.init(model)
        config = AdapterConfig.load(args.adapter_config, reduction_factor=args.reduction_factor)
        for name in names:
            model.add_adapter(name, config=config)
        self.model = model

    def activate(self, name: str) -> None:
        self.model.set_active_adapters(name)

    def parameters(self, name: str) -> list[nn.Parameter]:
        layers = self.model.get_adapter(name).values()
        return [p for layer in layers for module in layer.values() for p in module.parameters()]

    def save(self, directory: Path, names: list[str]) -> None:
        for name in names:
            self.model.save_adapter(str(directory / name), name, with_head=False,
                                    use_safetensors=True)

    def load(self, directory: Path, names: list[str]) -> None:
        for name in names:
            self.model.load_adapter(str(directory / name), load_as=name, with_head=False,
                                    use_safetensors=True, set_active=False)


class PeftModules(Modules):
    """Common part of the `peft` kinds: `self.peft` holds the PeftModel and its named adapters."""

    def _build(self, model: nn.Module, config, names: list[str]) -> None:
        self.peft = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            self.peft.add_adapter(name, config)

    def activate(self, name: str) -> None:
        self.peft.set_adapter(name)

    def save(self, directory: Path, names: list[str]) -> None:
        self.peft.save_pretrained(str(directory), selected_adapters=names)

    def load(self, directory: Path, names: list[str]) -> None:
        for name in names:
            self.peft.load_adapter(str(directory / name), adapter_name=name)


class LoraModules(PeftModules):
    """LoRA on the attention projections, injected into the masked LM in place by `peft`."""

    def __init__(self, model: nn.Module, args: LoraArgs, names: list[str]) -> None:
        config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                            target_modules=list(args.targets))
        # The PeftModel is kept aside: the loop keeps training the stock masked LM, whose
        # layers now hold the LoRA weights, so the masked-only LM head path is unchanged.
        self._build(model, config, names)
        self.model = model

    def parameters(self, name: str) -> list[nn.Parameter]:
        keys = (f"lora_A.{name}.", f"lora_B.{name}.")
        return [p for n, p in self.model.named_parameters() if any(k in n for k in keys)]


class PromptedEncoder(nn.Module):
    """The encoder body run by peft prompt tuning, its output cut back to the real tokens.

    Position 0 of `last_hidden_state` is then the real first token ([CLS]), as the end-task head
    and the masked-only MLM loss expect.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft = peft_model
        self.config = peft_model.base_model.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                **_: object) -> BaseModelOutput:
        config = self.peft.peft_config[self.peft.active_adapter]
        prefix = config.num_virtual_tokens * config.num_transformer_submodules
        limit = self.config.max_position_embeddings
        if input_ids.shape[1] + prefix > limit:
            raise ValueError(f"{input_ids.shape[1]} tokens + {prefix} virtual tokens exceed the "
                             f"model's {limit} positions; lower max_length or num_virtual_tokens")
        out = self.peft(input_ids=input_ids, attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state[:, prefix:])


class PromptedMaskedLM(nn.Module):
    """A masked LM whose body is a `PromptedEncoder`: `base_model` and the LM head as usual."""

    def __init__(self, encoder: PromptedEncoder, head: nn.Module, head_name: str, config) -> None:
        super().__init__()
        self.encoder = encoder
        self.head_name = head_name
        setattr(self, head_name, head)
        self.config = config

    @property
    def base_model(self) -> PromptedEncoder:
        return self.encoder


class PromptModules(PeftModules):
    """Soft prompts (peft prompt tuning, feature extraction on the encoder body)."""

    def __init__(self, model: nn.Module, args: PromptArgs, names: list[str]) -> None:
        config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                    num_virtual_tokens=args.num_virtual_tokens,
                                    prompt_tuning_init=PromptTuningInit(args.prompt_init))
        self._build(encoder_of(model), config, names)
        head = mlm_head_of(model)
        head_name = next(n for n, m in model.named_children() if m is head)
        self.model = PromptedMaskedLM(PromptedEncoder(self.peft), head, head_name, model.config)

    def parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.peft.prompt_encoder[name].parameters())


KINDS: dict[str, type[Modules]] = {
    "adapter": AdapterModules, "lora": LoraModules, "prompt": PromptModules}


def count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


# -- the method ----------------------------------------------------------------------------
class IsolationMethod(Method):
    """A frozen LM plus one module per domain (`per_domain`) or one shared module.

    All modules are created in `setup` (seeded by the run's seed), so a resumed run rebuilds the
    same structure before the loop reloads its checkpoint.
    """

    kind: ClassVar[str] = "adapter"
    per_domain: ClassVar[bool] = True
    modules: Modules

    def module_name(self, t: int) -> str:
        return self.names[t] if self.per_domain else SHARED

    def setup(self, ctx: Context) -> None:
        self.names = list(ctx.domains) if self.per_domain else [SHARED]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.config.seed)
            self.modules = KINDS[self.kind](ctx.model, self.args, self.names)
        ctx.model = self.modules.model
        module = count(self.modules.parameters(self.names[0]))
        lm = count([p for p in ctx.model.parameters()]) - module * len(self.names)
        log.info("%s: %d trainable parameters per DAP domain (%d modules, LM %d frozen)",
                 self.name, module, len(self.names), lm)
        info = {"kind": self.kind, "modules": self.names, "module_parameters": module,
                "lm_parameters": lm}
        ctx.save_artifact("isolation.json", info)

    def train_only(self, ctx: Context, name: str) -> None:
        """Freeze everything but module `name`, and make it the active one."""
        for p in ctx.model.parameters():
            p.requires_grad_(False)
        self.modules.activate(name)
        for p in self.modules.parameters(name):
            p.requires_grad_(True)

    def before_domain(self, ctx: Context, t: int) -> None:
        self.train_only(ctx, self.module_name(t))

    def model_for_task(self, ctx: Context, i: int) -> nn.Module:
        """The encoder with task i's module active; the LM trains too when `ft_train_lm`."""
        name = self.module_name(i)
        self.modules.activate(name)
        modules = {id(p) for n in self.names for p in self.modules.parameters(n)}
        encoder = self.modules.encoder()
        for p in encoder.parameters():
            p.requires_grad_(self.args.ft_train_lm and id(p) not in modules)
        for p in self.modules.parameters(name):
            p.requires_grad_(True)
        return encoder

    def save_state(self, directory: Path) -> None:
        path = directory / self.kind
        path.mkdir(parents=True, exist_ok=True)
        self.modules.save(path, self.names)

    def load_state(self, directory: Path) -> None:
        path = directory / self.kind
        if not path.is_dir():
            raise FileNotFoundError(f"{directory} has no saved {self.kind} modules ({path})")
        self.modules.load(path, self.names)
