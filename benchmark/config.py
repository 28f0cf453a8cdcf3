"""The run plan: defaults < suite profile < `--config` preset < command-line flags.

Each knob is declared once, as a field of the frozen dataclass `RunConfig`: its type (a
`Literal` for a fixed set of choices), its default, its help text (the `--flag` of `run` is
generated from it) and, where a type is not enough, a check. `validate` applies the same
declaration-driven checks to any dataclass, so a method's `Args` are checked exactly like the
run config (see `methods.build_method`). The resolved config is saved in every result file.

Why plain dataclasses and a 40-line checker rather than a library: `HfArgumentParser` builds
flags from dataclasses but puts every default into the parsed namespace (a flag left out would
override the suite profile and the preset, breaking the layering) and checks no values;
pydantic would validate, but turns `RunConfig` and the methods' `Args` (which other code reads
through `dataclasses.fields`/`asdict`) into pydantic types and reports errors over several lines,
where a bad value here must be one line naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config that cannot run; the message names the file, key or value and what is valid."""


# -- checks (return a complaint, or None when the value is fine) -----------------------------
def positive(value: float) -> str | None:
    if value > 0:
        return None
    return "must be a positive integer" if isinstance(value, int) else "must be positive"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be a fraction in [0, 1]"


def probability(value: float) -> str | None:
    return None if 0 < value < 1 else "must be a probability strictly between 0 and 1"


def below_one(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be a share in [0, 1)"


def knob(default: Any, help: str = "", check: Callable[[Any], str | None] | None = None,
         flag: bool = False) -> Any:
    """A config field: its default, help text, optional check, and whether `run` gets a flag."""
    meta = {"help": help, "check": check, "flag": flag}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    method: str = knob("ncl", "registered method name (see `list methods`)", flag=True)
    label: str = knob("", "row name in tables (default: the method name)", flag=True)
    suite: str = knob("syn6", "suite name or a suite YAML file", flag=True)
    profile: str = knob("default", "suite profile: tiny | default | ...", flag=True)
    order: int = knob(0, "domain order index (0..4)", non_negative, flag=True)
    seed: int = knob(2021, "one seed", non_negative, flag=True)
    # the companion code DAP-trains once (ContinualLM config.py l.114: --seed default 111;
    # scripts/posttrain_das.sh passes none) and varies the seed in fine-tuning only
    # (scripts/finetune_das.sh: --seed ${seed[$round]}); the default re-runs DAP per seed
    dap_seed: int | None = knob(
        None, "a fixed seed for DAP-training and the method's DAP-time draws (importance, "
        "replay, module init), shared by every seed, which then varies fine-tuning only (the "
        "companion's protocol: 111); unset: DAP with the run's own seed", non_negative,
        flag=True)
    base_model: str = knob("", "a hub id or local folder overriding the suite's base model",
                           flag=True)
    # DAP-training
    dap_steps: int = knob(150, "DAP steps per domain", positive, flag=True)
    dap_batch_size: int = knob(64, "DAP batch size (global)", positive, flag=True)
    dap_lr: float = knob(1e-3, "DAP learning rate", positive, flag=True)
    dap_warmup: float = knob(0.1, "share of DAP steps with a linear warm-up", fraction)
    dap_schedule: Literal["linear", "cosine", "constant", "wsd"] = knob(
        "linear", "DAP learning-rate shape after the warm-up (benchmark/schedule.py): linear "
        "or cosine decay to 0, constant, or wsd (stable, then a linear decay over dap_decay)",
        flag=True)
    dap_rewarm: bool = knob(True, "re-warm and re-decay the DAP learning rate for every domain "
                            "(false: one schedule over the whole sequence)", flag=True)
    dap_decay: float = knob(0.1, "wsd: share of a domain's DAP steps in the final decay",
                            fraction)
    dap_weight_decay: float = knob(0.0, "DAP weight decay", non_negative)
    mlm_probability: float = knob(0.15, "share of tokens masked", probability)
    corpus_skip: float = knob(
        0.0, "share of each domain corpus left out at its start (the companion keeps "
        "train[5%:] of every corpus as its validation split, ContinualLM dataloader/data.py "
        "l.41-47 with --validation_split_percentage 5: 0.05)", below_one)
    adam_eps: float = knob(
        1e-8, "AdamW epsilon of DAP-training and fine-tuning (torch's default; the companion's "
        "transformers.AdamW, v4.33 optimization.py, defaults to 1e-6)", positive)
    max_length: int = knob(128, "tokens per sequence", positive)
    group_texts: bool = knob(
        False, "DAP sequences: the corpus concatenated and cut into chunks of max_length tokens "
        "(the companion code's group_texts, ContinualLM utils/data.py l.110-123) instead of one "
        "text per sequence", flag=True)
    # the companion code never clips: ContinualLM approaches/update_model.py l.15-19 steps right
    # after backward and soft-masking (approaches/compute_gradient.py l.49-81)
    max_grad_norm: float = knob(0.0, "DAP gradient clipping norm (0: no clipping, the "
                                "reference's)", non_negative)
    importance_batches: int = knob(8, "batches for importance / Fisher statistics", positive)
    # the companion code's importance loader: 100 sequences a batch (ContinualLM posttrain.py
    # l.204-209), 100 batches covering its 10,000-chunk subset
    importance_batch_size: int = knob(100, "sequences per batch of the DAS/DGA unit-importance "
                                      "passes (the reference's: 100)", positive)
    head_warmup_steps: int = knob(
        0, "train only the base model's MLM head (encoder frozen) this many steps before the "
        "first domain (for checkpoints shipped without a head, so that θ0's MLM-loss row reads "
        "a trained head)", non_negative, flag=True)
    head_warmup_corpus: Literal["general", "first"] = knob(
        "general", "text of the MLM head warm-up: the suite's general replay corpus (the same "
        "for every order, and no domain's text), or the first domain's corpus", flag=True)
    head_warmup_lr: float = knob(1e-3, "learning rate of the MLM head warm-up", positive)
    mixed_precision: Literal["no", "fp16", "bf16"] = knob(
        "no", "autocast DAP-training and fine-tuning (das6 default: fp16, the paper's)",
        flag=True)
    # end-task fine-tuning
    ft_epochs: int = knob(15, "end-task epochs", positive, flag=True)
    ft_lr: float = knob(5e-4, "end-task learning rate", positive, flag=True)
    ft_batch_size: int = knob(16, "end-task batch size", positive)
    ft_weight_decay: float = knob(0.01, "end-task weight decay", non_negative)
    ft_decay_params: Literal["weights", "all"] = knob(
        "weights", "end-task parameters weight decay applies to: weights (biases and "
        "LayerNorm weights left out) or all (the companion's AdamW over every trainable "
        "parameter, ContinualLM approaches/finetune.py l.44-45)")
    pair_input: Literal["pair", "companion"] = knob(
        "pair", "two-text end-task inputs (aspect, sentence): the tokenizer's text pair, or "
        "companion: one text `aspect + ' ' + sep_token + sentence` (ContinualLM "
        "dataloader/data.py l.180-181)")
    # the companion code fine-tunes with no warm-up and a linear decay (ContinualLM config.py
    # l.288–296, parseing_finetune: --num_warmup_steps 0, --lr_scheduler_type linear; used by
    # approaches/finetune.py l.53–58); a short fine-tuning
    # at a high lr (real6's profiles: 45 steps) starts from a random head at full lr and may
    # settle on the majority class, which a warm-up share damps
    ft_warmup: float = knob(0.0, "share of end-task fine-tuning steps with a linear warm-up "
                            "(0: none, the paper's)", fraction, flag=True)
    # how A[t][i] is measured: the paper's fine-tuning, or a frozen-encoder linear probe
    # (benchmark/probe.py: seconds per cell, no collapse, but not the paper's protocol)
    eval: Literal["finetune", "probe"] = knob(
        "finetune", "end-task protocol: fine-tune the encoder with the stock head (the paper's), "
        "or probe: freeze it, embed every example once, fit a logistic regression", flag=True)
    probe_pooling: Literal["mean", "first"] = knob(
        "mean", "probe readout: masked mean of the last hidden states, or the first token's "
        "([CLS]/<s>, what the stock head reads)", flag=True)
    # "diagonal" runs T + T-1 fine-tunings instead of T(T+1)/2; FR, KT and the tables read only
    # A[i][i] and A[T][i], which both schedules fill alike
    eval_matrix: Literal["full", "diagonal"] = knob(
        "full", "fine-tune every seen task after each domain (full), or only the newest one and "
        "all at the end (diagonal: same FR/KT/tables, fewer runs)", flag=True)
    method_args: dict[str, Any] = knob({}, "the method's own arguments (see its Args)")

    @property
    def row(self) -> str:
        return self.label or self.method

    def for_dap(self) -> RunConfig:
        """The config DAP-time code sees: `seed` is `dap_seed` where that is set."""
        return self if self.dap_seed is None else dataclasses.replace(self, seed=self.dap_seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the checker ------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    import sys

    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple) and typing.get_args(hint):
        return "a list, each " + _describe(typing.get_args(hint)[0])
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
    return names.get(hint) or str(hint).replace("typing.", "")


def convert(value: Any, hint: Any) -> Any:
    """`value` as type `hint`, or `TypeError`. Strings are parsed (they come from the command
    line); a bool is never a number; floats must be finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is not type(None):
                try:
                    return convert(value, option)
                except TypeError:
                    pass
        raise TypeError
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise TypeError
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [convert(v, args[0]) for v in value] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise TypeError
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if isinstance(value, bool):
        raise TypeError
    try:
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if hint is float:
            number = float(value)
            if not math.isfinite(number):
                raise TypeError
            return number
        if hint is str:
            if isinstance(value, (str, int, float)):
                return str(value)
            raise TypeError
    except ValueError:
        raise TypeError from None
    return value


# method options whose default changed to the reference's form: what a record made before
# them (a record without `kernels`, a field added with them) ran
EARLIER_METHOD_ARGS: dict[str, dict[str, Any]] = {
    "hat": {"form": "binary", "anneal": "domain"}, "derpp": {"replay_batches": "two"},
    **{name: {"ft_train_lm": True} for name in (
        "adapter-one", "ncl-adapter", "lora-one", "ncl-lora", "prompt-one", "demix")},
}


def recorded_config(config: dict[str, Any], earlier: bool = False) -> dict[str, Any]:
    """A config as a result recorded it, completed with the options added since whose class
    default is not what the code that made it did: `importance_batch_size` (before it, the
    importance batches were DAP batches) and `head_warmup_corpus` (before it, the warm-up read
    the first domain's corpus) and, for a record made before the reference forms
    became the defaults (`earlier`), the method options of `EARLIER_METHOD_ARGS`."""
    added = {"importance_batch_size": config.get("dap_batch_size"),
             "head_warmup_corpus": "first" if config.get("head_warmup_steps") else None}
    config = {**{k: v for k, v in added.items() if v is not None and k not in config}, **config}
    if earlier and config.get("method") in EARLIER_METHOD_ARGS:
        method_args = {**EARLIER_METHOD_ARGS[config["method"]], **config.get("method_args", {})}
        config = {**config, "method_args": method_args}
    return config


def validate(cls: type, values: dict[str, Any], source: str, what: str = "") -> Any:
    """An instance of the dataclass `cls` from `values`, each converted to its declared type and
    checked; a bad key or value raises `ConfigError` naming `source` and the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    prefix = f"{source}: {what}" if what else f"{source}: "
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "(none)"
        raise ConfigError(f"{prefix}unknown key(s) {unknown}; valid: {valid}")
    clean = {}
    for name, value in values.items():
        try:
            value = convert(value, hints[name])
        except TypeError:
            raise ConfigError(
                f"{prefix}{name} must be {_describe(hints[name])}, got {value!r}") from None
        check = fields[name].metadata.get("check")
        complaint = check(value) if check and value is not None else None
        if complaint:
            raise ConfigError(f"{prefix}{name} {complaint}, got {value!r}")
        clean[name] = value
    try:
        return cls(**clean)
    except (TypeError, ValueError) as err:  # a __post_init__ check across fields
        raise ConfigError(f"{prefix}{err}") from None


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
CHOICES = {name: typing.get_args(hint) for name, hint in _hints(RunConfig).items()
           if typing.get_origin(hint) is Literal}
FLAGS = [f for f in dataclasses.fields(RunConfig) if f.metadata.get("flag")]


def add_flags(parser: Any) -> None:
    """One `--flag` per flagged knob; left out it is None, so lower layers keep their value."""
    hints = _hints(RunConfig)
    for f in FLAGS:
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        elif hint in (int, float):
            kwargs["type"] = hint
        elif hint is bool:  # --group-texts / --no-group-texts
            kwargs["action"] = argparse.BooleanOptionalAction
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


# -- where things are kept -------------------------------------------------------------------
def cache_root(override: str | None = None) -> Path:
    """The user cache (cached base models, and `data/` for real suites): `--cache-dir`, else
    `$CDAP_CACHE`, else `$XDG_CACHE_HOME/cdap-bench` (default `~/.cache/cdap-bench`)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("CDAP_CACHE"):
        return Path(os.environ["CDAP_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cdap-bench"


def check_writable(path: Path, what: str) -> None:
    """`path` is a folder we can write into, or can be created: else one line naming it.

    Checked before a run starts (nothing is created here): the nearest existing ancestor must be
    a writable folder. `os.access` also sees a read-only file system for root."""
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {probe} is not writable")


# -- presets ----------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping naming one key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, error: type[Exception] = ConfigError) -> Any:
    """A YAML file's content: the one reader of every YAML file of the project (run configs,
    method presets, suites, grids). Undecodable bytes, bad YAML and a key given twice in one
    mapping raise `error` naming the file and line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise error(f"{path}: line {line} is not valid UTF-8 (byte {err.start})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "somewhere"
        problem = getattr(err, "problem", None) or err
        raise error(f"{path}: malformed YAML at {where}: {problem}") from None


def described_yamls(folder: Path) -> dict[str, str]:
    """Name -> first comment line (the description) of every YAML in `folder`."""
    out = {}
    for path in sorted(folder.glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        out[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return out


def available_configs() -> dict[str, str]:
    """Preset name -> its first comment line (the description)."""
    return described_yamls(CONFIG_DIR)


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
    data = read_yaml(path)
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


def expand_preset(name_or_path: str) -> tuple[list[tuple[dict[str, Any], str]], dict | None]:
    """([(mapping, source)], shared): a group preset's members in order, each member's mapping
    over the group's own keys (`shared`), or, for a plain preset, itself alone (`shared`: None).
    A group's `runs` must be a non-empty list of presets none of which is itself a group."""
    preset = read_preset(name_or_path)
    members = preset.pop("runs", None)
    if members is None:
        return [(preset, name_or_path)], None
    if not isinstance(members, list) or not members:
        raise ConfigError(f"{name_or_path}: `runs` must be a non-empty list of preset names")
    out = []
    for member in members:
        sub = read_preset(member)
        if "runs" in sub:
            raise ConfigError(f"{name_or_path}: member {member!r} is itself a group")
        out.append(({**preset, **sub}, member))
    return out, preset


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
        given = {k: v for k, v in layer.items() if v is not None}
        for key in given:
            if key not in _FIELDS:
                raise ConfigError(
                    f"{source}: unknown config key {key!r}; valid: {', '.join(_FIELDS)}")
        checked = validate(RunConfig, given, source)  # each layer is checked on its own
        for key in given:
            value = getattr(checked, key)
            values[key] = {**values.get(key, {}), **value} if key == "method_args" else value
    return RunConfig(**values)
