"""Parameter isolation: small named modules (one per domain, or one shared) on a frozen masked LM.

Three kinds: bottleneck adapters (AdapterHub `adapters`) and LoRA (`peft`), each built with its
ecosystem library and checkpointed in that library's own format, and soft prompts appended after
the real tokens (`SoftPrompts`, own code: peft can only prepend them, see its docstring). A
method picks a kind and whether it keeps a module per domain; `IsolationMethod` does the
freezing, the switching between modules, the end-task encoder and the save/reload. The LM itself
never changes during DAP-training. On an end task the companion code freezes it too and trains
the module and the classifier: `train_adapter` (ContinualLM 57e498c `utils/model.py`
l.410-415, which freezes everything else), or the classifier and the prompt (l.373-380); so
`ft_train_lm` defaults to false, and `ft_train_lm: true` fine-tunes the LM with the module.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import adapters
import torch
import torch.nn.functional as F
from adapters import AdapterConfig
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from methods import knob, positive
from methods.base import Method
from methods.modeling import encoder_of

if TYPE_CHECKING:
    from benchmark.context import Context

log = logging.getLogger(__name__)
SHARED = "shared"  # the module name of the `ncl-*` methods: one module for the whole sequence
FINETUNE = "finetune"  # the prompt of `prompt_finetune: companion` (end-task copies only)


@dataclass
class AdapterArgs:
    """The companion code adds one adapter after each FFN block ("no mh_adapter"), i.e. the
    Pfeiffer / seq_bn layout, with the library's default width. End task: the adapter and the
    head train, the LM is frozen (the companion's `train_adapter`, ContinualLM `utils/model.py`
    l.415); `ft_train_lm: true` fine-tunes the LM with the adapter (how the adapter rows
    committed under results/ were made)."""

    adapter_config: str = knob(
        "seq_bn",
        "an `adapters` config name: seq_bn (Pfeiffer), double_seq_bn")
    reduction_factor: int = knob(16, "bottleneck width = hidden size / reduction_factor")
    ft_train_lm: bool = knob(
        False,
        "end task: fine-tune the LM with the module (else the module only)")


@dataclass
class LoraArgs:
    r: int = knob(8, "LoRA rank")
    alpha: int = knob(16, "LoRA scaling α: the update is α/r · BA")
    dropout: float = knob(0.0, "dropout on the input of the LoRA update")
    targets: list[str] = knob(["query", "value"], "names of the modules LoRA wraps (peft's "
                              "target_modules)")
    ft_train_lm: bool = knob(
        False,
        "end task: fine-tune the LM with the module (else the module only, the LM frozen as "
        "for the companion code's adapters; it has no LoRA row)")


@dataclass
class PromptArgs:
    num_virtual_tokens: int = knob(
        100,
        "prompt length: the companion code's 100 (DGA networks/roberta_model.py l.43, ContinualLM "
        "config.py l.286), cut to the positions max_length leaves free (48 on syn6: "
        "64 − 16)", check=positive)
    prompt_init: Literal["uniform", "vocab"] = knob(
        "uniform",
        "\"uniform\": U(−0.5, 0.5) as DGA networks/roberta_model.py l.47–51; \"vocab\": "
        "word embedding rows drawn at random (peft's SAMPLE_VOCAB)")
    ft_train_lm: bool = knob(
        False,
        "end task: the classifier and the prompt train, the LM is frozen (ContinualLM"
        " utils/model.py l.373-380); true fine-tunes the LM too")
    prompt_finetune: Literal["dap", "companion"] = knob(
        "dap",
        "end task: \"dap\" runs the domain's DAP-trained prompt, appended as at DAP. "
        "\"companion\" is what the companion's prompt fine-tuning does: a fresh prompt "
        "copied from the first num_virtual_tokens rows of the word embeddings "
        "(ContinualLM networks/prompt/tuning.py l.8-9, called by utils/model.py "
        "l.379-380 for every `one` baseline) prepended to the real tokens (tuning.py "
        "l.36-37), so the head reads the first prompt token. Not the default: it "
        "never uses the DAP-trained prompt, so the row then measures prompt tuning on"
        " the frozen θ0 whatever DAP did, not DAP-Prompt.")


# -- the three kinds of module -------------------------------------------------------------
class Modules:
    """Named modules inside `model` (the masked LM the loop trains; a wrapper for prompts)."""

    model: nn.Module

    @classmethod
    def build(cls, ctx: Context, args, names: list[str]) -> Modules:
        """The kind's modules on `ctx.model`, one per name."""
        return cls(ctx.model, args, names)

    def describe(self) -> dict[str, int]:
        """Settings the kind chose at build time, for `artifacts/isolation.json`."""
        return {}

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


class SoftPrompts(nn.Module):
    """One trainable prompt per name, appended after the real tokens of a stock encoder.

    The companion code appends the prompt after the real tokens at DAP ("add at the end, I
    don't want to affect the classification token": DGA `networks/prompt.py` l.64, ContinualLM
    `networks/prompt/prompt.py` l.64), so the real tokens keep the positions 0…L−1 the base
    model was trained on. peft's prompt tuning prepends the prompt and ignores `position_ids`,
    which moves every real token p positions to the right (on syn6 the DAP loss then starts at
    5.6 instead of 2.6); hence this small module instead of peft.

    It works by forward hooks on the encoder (a stock `BertModel`, `RobertaModel`, ...), of
    which it is a submodule, so the encoder stays the stock class: the MLM head, the end-task
    head and `copy.deepcopy` see an ordinary encoder whose parameters include the prompts. On
    each call the real tokens are padded to `width` (= `max_length`) and embedded by the word
    embeddings, the active prompt is appended, the stock embedding layer adds positions (real
    tokens 0…L−1, prompt `width`…`width`+p−1, as in the companion code where every sequence
    is `max_length` long), and the output is cut back to the L real tokens. The real tokens
    enter as word embeddings, as in ContinualLM `networks/prompt/tuning.py` l.26 and peft;
    DGA's `cat_learned_embedding_to_input` (l.55) runs them through the whole embedding layer
    before the model embeds them again (positions and LayerNorm twice), which is not kept.

    With `prepend` set (only on the end-task copies of `prompt_finetune: companion`) the
    active prompt goes in front instead, the mask extended with ones in front, no padding, and
    every state is returned, prompt first: ContinualLM's fine-tuning prompt (`networks/prompt/
    tuning.py` l.25-40, l.54-63), whose classification head reads the first prompt token.
    """

    def __init__(self, encoder: nn.Module, names: list[str], length: int, width: int,
                 init: str) -> None:
        super().__init__()
        words = encoder.get_input_embeddings().weight
        prompts = {}
        for name in names:
            if init == "uniform":  # DGA networks/roberta_model.py l.47–51
                value = torch.empty(length, words.shape[1]).uniform_(-0.5, 0.5)
            else:  # rows of the word embeddings drawn at random (peft's SAMPLE_VOCAB)
                value = words[torch.randint(words.shape[0], (length,))].detach().clone()
            prompts[name] = nn.Parameter(value.to(words.device))
        self.prompts = nn.ParameterDict(prompts)
        self.active = names[0]
        self.width = width
        self.pad_id = encoder.config.pad_token_id or 0
        self.prepend = False  # the companion's fine-tuning form (`PromptArgs.prompt_finetune`)
        self._length = 0
        encoder.soft_prompts = self  # a submodule: saved, copied and fine-tuned with the encoder
        encoder.register_forward_pre_hook(self._append, with_kwargs=True)
        encoder.register_forward_hook(self._cut)

    def _append(self, encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            raise TypeError("an encoder with soft prompts takes keyword arguments only")
        ids = kwargs.get("input_ids")
        if ids is None:
            raise TypeError("an encoder with soft prompts needs input_ids")
        batch, length = ids.shape
        if length > self.width:
            raise ValueError(f"{length} tokens exceed the {self.width} positions kept for real "
                             "tokens before the prompt (max_length)")
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        kwargs["input_ids"] = None
        if self.prepend:  # [P; X], mask extended with ones in front (tuning.py l.36, l.63)
            words = encoder.get_input_embeddings()(ids)
            prompt = self.prompts[self.active].to(words.dtype).expand(batch, -1, -1)
            kwargs["inputs_embeds"] = torch.cat([prompt, words], dim=1)
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, prompt.shape[1]), mask], 1)
            return args, kwargs
        ids = F.pad(ids, (0, self.width - length), value=self.pad_id)
        mask = F.pad(mask, (0, self.width - length), value=0)
        words = encoder.get_input_embeddings()(ids)
        prompt = self.prompts[self.active].to(words.dtype).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([words, prompt], dim=1)
        kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(batch, prompt.shape[1])], 1)
        self._length = length
        return args, kwargs

    def _cut(self, encoder: nn.Module, args: tuple, output):
        if self.prepend:  # every state, the prompt's first: the companion's head reads it
            return output
        if isinstance(output, tuple):
            return (output[0][:, : self._length], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, : self._length]
        return output


def usable_positions(encoder: nn.Module) -> int:
    """How many positions the encoder's position embeddings cover (RoBERTa skips 0…pad)."""
    offset = getattr(encoder.embeddings, "padding_idx", None)
    return encoder.config.max_position_embeddings - (0 if offset is None else offset + 1)


class PromptModules(Modules):
    """Soft prompts appended after the real tokens (`SoftPrompts`), one per name.

    The length is `num_virtual_tokens` (the companion code's 100) where `max_length` leaves
    room for it in the model's positions, else the largest that fits; `describe` reports it.
    """

    def __init__(self, model: nn.Module, args: PromptArgs, names: list[str],
                 max_length: int) -> None:
        encoder = encoder_of(model)
        room = usable_positions(encoder) - max_length
        if room < 1:
            raise ValueError(f"prompt: max_length {max_length} leaves no position for a prompt "
                             f"(the model has {usable_positions(encoder)})")
        self.requested = args.num_virtual_tokens
        self.length = min(args.num_virtual_tokens, room)
        if self.length < self.requested:
            log.info("prompt: %d virtual tokens instead of %d (%d positions, max_length %d)",
                     self.length, self.requested, usable_positions(encoder), max_length)
        self.prompts = SoftPrompts(encoder, names, self.length, max_length, args.prompt_init)
        self.model = model

    @classmethod
    def build(cls, ctx: Context, args: PromptArgs, names: list[str]) -> Modules:
        return cls(ctx.model, args, names, ctx.config.max_length)

    def describe(self) -> dict[str, int]:
        return {"num_virtual_tokens": self.length, "requested_virtual_tokens": self.requested,
                "real_token_positions": self.prompts.width}

    def activate(self, name: str) -> None:
        self.prompts.active = name

    def parameters(self, name: str) -> list[nn.Parameter]:
        return [self.prompts.prompts[name]]

    def companion_encoder(self) -> nn.Module:
        """A copy of the encoder running the companion's fine-tuning prompt (`prompt_finetune:
        companion`): a new prompt, the first `length` rows of the word embeddings (ContinualLM
        `networks/prompt/tuning.py` l.8-9), prepended to the real tokens (l.36-37); the copy's
        DAP prompts stay in it, unused and frozen."""
        encoder = copy.deepcopy(self.encoder())
        prompts = encoder.soft_prompts
        words = encoder.get_input_embeddings().weight
        for p in prompts.prompts.values():
            p.requires_grad_(False)
        prompts.prompts[FINETUNE] = nn.Parameter(words[: self.length].detach().clone())
        prompts.active, prompts.prepend = FINETUNE, True
        return encoder

    def save(self, directory: Path, names: list[str]) -> None:
        for name in names:
            save_file({"prompt": self.prompts.prompts[name].detach().cpu().contiguous()},
                      str(directory / f"{name}.safetensors"))

    def load(self, directory: Path, names: list[str]) -> None:
        with torch.no_grad():
            for name in names:
                value = load_file(str(directory / f"{name}.safetensors"))["prompt"]
                self.prompts.prompts[name].copy_(value)


KINDS: dict[str, type[Modules]] = {
    "adapter": AdapterModules, "lora": LoraModules, "prompt": PromptModules}


def _is_prompt(encoder: nn.Module, p: nn.Parameter) -> bool:
    return any(p is q for q in encoder.soft_prompts.prompts.values())


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
        if getattr(self.args, "prompt_finetune", "dap") == "companion" \
                and ctx.config.eval == "probe":
            raise ValueError("prompt_finetune: companion fine-tunes a fresh prompt; the probe "
                             "(eval: probe) trains none, use eval: finetune")
        self.names = list(ctx.domains) if self.per_domain else [SHARED]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed_for("module_init"))
            self.modules = KINDS[self.kind].build(ctx, self.args, self.names)
        ctx.model = self.modules.model
        module = count(self.modules.parameters(self.names[0]))
        lm = count([p for p in ctx.model.parameters()]) - module * len(self.names)
        log.info("%s: %d trainable parameters per DAP domain (%d modules, LM %d frozen)",
                 self.name, module, len(self.names), lm)
        info = {"kind": self.kind, "modules": self.names, "module_parameters": module,
                "lm_parameters": lm, **self.modules.describe()}
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
        """The encoder with task i's module active; the LM trains too when `ft_train_lm`.

        With `prompt_finetune: companion`, a copy whose fresh prepended prompt trains instead
        (`PromptModules.companion_encoder`)."""
        if getattr(self.args, "prompt_finetune", "dap") == "companion":
            encoder = self.modules.companion_encoder()
            fresh = encoder.soft_prompts.prompts[FINETUNE]
            for p in encoder.parameters():  # the LM as `ft_train_lm` says, the DAP prompts not
                p.requires_grad_(self.args.ft_train_lm and not _is_prompt(encoder, p))
            fresh.requires_grad_(True)
            return encoder
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
