"""The run config: defaults < suite profile < `--config` preset < command-line flags.

One frozen dataclass, saved in every result file so each number traces back to its config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config that cannot run; the message names the file, key or value and what is valid."""


@dataclass(frozen=True)
class RunConfig:
    method: str = "ncl"
    label: str = ""  # the row name in tables; the method name when empty
    suite: str = "syn6"
    profile: str = "default"
    order: int = 0
    seed: int = 2021
    base_model: str = ""  # a hub id or local path overriding the suite's base model
    # DAP-training
    dap_steps: int = 150
    dap_batch_size: int = 64
    dap_lr: float = 1e-3
    dap_warmup: float = 0.1
    dap_weight_decay: float = 0.0
    mlm_probability: float = 0.15
    max_length: int = 128
    max_grad_norm: float = 1.0
    importance_batches: int = 8  # batches for importance / Fisher statistics
    # train only θ0's MLM head (encoder frozen) this many steps on the first domain's corpus
    # before the sequence: for checkpoints shipped without a head (all-MiniLM-L6-v2)
    head_warmup_steps: int = 0
    head_warmup_lr: float = 1e-3
    mixed_precision: str = "no"  # "no", "fp16" or "bf16": Accelerate autocast (+ loss scaling)
    # end-task fine-tuning
    ft_epochs: int = 15
    ft_lr: float = 5e-4
    ft_batch_size: int = 16
    ft_weight_decay: float = 0.01
    # "full": after domain t fine-tune every seen task (the whole lower triangle of A);
    # "diagonal": only task t, and every task after the last domain. FR, KT and the tables read
    # only A[i][i] and A[T][i], so both give the same numbers; "diagonal" runs T + T-1
    # fine-tunings instead of T(T+1)/2 (11 instead of 21 for six domains)
    eval_matrix: str = "full"
    method_args: dict[str, Any] = field(default_factory=dict)

    @property
    def row(self) -> str:
        return self.label or self.method

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_POSITIVE = {"dap_steps", "dap_batch_size", "max_length", "ft_epochs", "ft_batch_size",
             "importance_batches"}
_NON_NEGATIVE = {"dap_lr", "ft_lr", "dap_weight_decay", "ft_weight_decay", "max_grad_norm",
                 "dap_warmup", "mlm_probability", "seed", "order", "head_warmup_steps",
                 "head_warmup_lr"}
CHOICES = {"mixed_precision": ("no", "fp16", "bf16"), "eval_matrix": ("full", "diagonal")}


def available_configs() -> dict[str, str]:
    """Preset name -> its first comment line (the description)."""
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        out[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return out


def resolve_preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if named.exists():
        return named
    raise ConfigError(
        f"unknown config {name_or_path!r}: no such file, and no preset of that name; "
        f"valid presets: {', '.join(available_configs())}"
    )


def read_preset(name_or_path: str) -> dict[str, Any]:
    """A preset's mapping; a group preset (`runs: [...]`) is returned as is."""
    path = resolve_preset_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "somewhere"
        problem = getattr(err, "problem", err)
        raise ConfigError(f"{path}: malformed YAML at {where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    data.pop("description", None)
    unknown = set(data) - set(_FIELDS) - {"runs"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown config key(s) {sorted(unknown)}; valid keys: {', '.join(_FIELDS)}"
        )
    return data


def _coerce(name: str, value: Any, source: str) -> Any:
    f = _FIELDS[name]
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}.get(
        str(f.type), None)
    if name == "method_args":
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: method_args must be a mapping")
        return dict(value)
    try:
        if kind is int and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = int(value)
        elif kind is float:
            value = float(value)
        elif kind is str:
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {value!r}") from None
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{source}: {name} must be one of {CHOICES[name]}, got {value!r}")
    if name in _POSITIVE and value <= 0:
        raise ConfigError(f"{source}: {name} must be a positive integer, got {value}")
    if name in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{source}: {name} must not be negative, got {value}")
    return value


def build_config(
    suite_defaults: dict[str, Any],
    preset: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
    preset_source: str = "config",
) -> RunConfig:
    """Merge the layers, checking every key and value; unknown keys are errors."""
    values: dict[str, Any] = {}
    layers = [(suite_defaults, "suite profile"), (preset or {}, preset_source),
              (flags or {}, "command line")]
    for layer, source in layers:
        for key, value in layer.items():
            if value is None:
                continue
            if key not in _FIELDS:
                raise ConfigError(
                    f"{source}: unknown config key {key!r}; valid: {', '.join(_FIELDS)}")
            if key == "method_args":
                merged = dict(values.get("method_args", {}))
                merged.update(_coerce(key, value, source))
                values[key] = merged
            else:
                values[key] = _coerce(key, value, source)
    return RunConfig(**values)
