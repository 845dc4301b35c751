"""The options of ``megacore train``: one typed schema, checked in one place, and the rules for what a
resumed run may change.

``TrainConfig`` is a pydantic dataclass: every value is converted to its field's type or refused with a
message naming the option, whether it came from the command line (strings), a JSON or YAML ``--config``
file (PyYAML reads ``1e-3`` as a string; ``"no"`` is a boolean false) or Python. Numbers must be finite;
counts are whole numbers; choices are checked against their lists. :func:`parse_config` turns pydantic's
errors into one ``ValueError`` whose message is a single line per problem.

Resuming (:func:`resume_config`): the checkpoint's options are the base, and options given again replace
them, by these rules:

- never: the model, its overrides, the data, the tokenizer and its vocabulary, the sequence length, the
  seed, the dtype, the task, its options, the pretrained checkpoint or Hugging Face model, the decay style and the
  layer-wise decay (the checkpoint would be misread, the data position would mean other samples, or the optimizer's
  groups would differ);
  ``--dtype auto`` is no change: a resumed run continues in the checkpoint's dtype (which records what auto
  chose), and the log says so where auto would choose otherwise on this machine;
- ``--train-steps``: more (or fewer, but still ahead of the checkpoint) steps; the learning-rate schedule
  is re-laid to decay over the new total, and the log says so;
- ``--global-batch-size``: the data position is kept exact in samples (consumed samples come from the
  checkpoint, not from step x batch size);
- ``--lr``, ``--min-lr``, ``--warmup-steps``, ``--weight-decay``: only with ``--override-lr-schedule``
  (Megatron's ``--override-opt_param-scheduler``); otherwise the checkpoint's schedule continues;
- everything else (intervals, micro-batch size, parallel layout, recompute, dropout, clipping, the
  failure guards, where the run and caches live) may change freely.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

_FN = "megacore train"

Count = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]

# ModelConfig fields that megacore train sets from its own options; --model-overrides may not touch them.
RESERVED_MODEL_FIELDS = {
    "vocab_size": "it comes from the tokenizer (--tokenizer / --vocab-size)",
    "params_dtype": "use --dtype",
    "tensor_parallel": "use --tensor-parallel-size",
    "sequence_parallel": "use --sequence-parallel",
    "hidden_dropout": "use --hidden-dropout",
    "attention_dropout": "use --attention-dropout",
    "recompute": "use --recompute",
}


def option(name: str) -> str:
    """``--seq-len`` for the field ``seq_len``: how the user names an option."""
    return "--" + name.replace("_", "-")


@dataclass(config=ConfigDict(extra="forbid"))
class TrainConfig:
    """Every option of ``megacore train`` (the command line's flags are these fields; a JSON or YAML
    ``--config`` file may hold any of them). Construction validates the types and ranges; bad values raise
    pydantic's ValidationError (:func:`parse_config` makes it a one-line ValueError)."""

    model: str = "gpt-tiny"
    data: Optional[str] = None  # prefix of a prepared dataset; None: the embedded corpus
    valid_data: Optional[str] = None  # None: the embedded corpus's validation split (or 1% of --data)
    tokenizer: Optional[str] = None  # None: the one saved next to --data
    vocab_size: Annotated[int, Field(ge=256)] = 8192  # of the tokenizer trained for the embedded corpus
    cache_dir: str = str(Path.home() / ".cache" / "megacore")
    output: str = "runs/gpt-tiny"
    seq_len: Count = 256
    micro_batch_size: Count = 8
    global_batch_size: Count = 8
    train_steps: Count = 1000
    lr: Rate = 2e-3
    min_lr: Finite = 2e-4
    warmup_steps: NonNegative = 50
    weight_decay: Finite = 0.1
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup, to --min-lr
    layer_lr_decay: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0  # < 1: ELECTRA's layer-wise decay
    clip_grad: Finite = 1.0  # 0: no clipping (the norm is still checked and reported)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: megacore._machine.auto_dtype
    recompute: Literal["none", "selective", "full"] = "none"
    hidden_dropout: Probability = 0.0
    attention_dropout: Probability = 0.0
    tensor_parallel_size: Count = 1
    sequence_parallel: bool = False
    pipeline_parallel_size: Count = 1
    virtual_pipeline_parallel_size: Count = 1
    use_distributed_optimizer: bool = False
    distributed_timeout_minutes: Optional[Rate] = None  # None: 10 on NCCL, 5 on gloo (parallel.timeouts)
    seed: NonNegative = 1234
    log_interval: Count = 10
    eval_interval: Count = 250
    eval_batches: Count = 20
    save_interval: Count = 500
    keep_last: Count = 2
    num_workers: NonNegative = 0
    progress: bool = True
    loss_spike_factor: Optional[Annotated[float, Field(gt=1, allow_inf_nan=False)]] = None
    max_skipped_steps: Count = 32
    override_lr_schedule: bool = False
    model_overrides: dict = dataclasses.field(default_factory=dict)
    task: Optional[str] = None  # a registered task (megacore finetune TASK); None: the model's pretraining task
    task_options: dict = dataclasses.field(default_factory=dict)  # the task's own options (checked by the task)
    pretrained: Optional[str] = None  # a megacore train checkpoint to start from: its model, weights, tokenizer
    hf_model: Optional[str] = None  # a Hugging Face model directory to start from: its model, weights, tokenizer

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info) -> Any:
        # pydantic's lax mode reads True as 1; a boolean where a number belongs is a mistake.
        if isinstance(value, bool) and info.field_name in _NUMERIC:
            raise ValueError("expected a number, got a boolean")
        return value

    @field_validator("model_overrides", "task_options", mode="before")
    @classmethod
    def _overrides_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a JSON object ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of names to values, got {type(value).__name__}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.pretrained is not None and self.hf_model is not None:
            raise ValueError("give one of --pretrained (a megacore checkpoint) and --hf-model (a Hugging Face "
                             "directory), not both")
        if self.min_lr > self.lr:
            raise ValueError(f"need --min-lr ({self.min_lr}) <= --lr ({self.lr})")
        try:
            self.model_overrides = _checked_overrides(self.model_overrides)
        except ValueError as e:
            raise ValueError(f"--model-overrides: {e}") from None
        return self


def _numeric_fields() -> set:
    from typing import get_type_hints

    numbers = (int, float, Optional[int], Optional[float])
    return {name for name, hint in get_type_hints(TrainConfig).items() if hint in numbers}


_NUMERIC = _numeric_fields()


def _checked_overrides(overrides: dict) -> dict:
    """The overrides with values converted to their ModelConfig field types; ValueError naming an unknown,
    reserved or ill-typed field."""
    from typing import get_type_hints

    from megacore.models import ModelConfig

    hints = get_type_hints(ModelConfig)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    out = {}
    for key, value in overrides.items():
        if key in RESERVED_MODEL_FIELDS:
            raise ValueError(f"{key!r} cannot be overridden here: {RESERVED_MODEL_FIELDS[key]}")
        if key not in known:
            raise ValueError(f"{key!r} is not a ModelConfig field; known: "
                             f"{', '.join(sorted(known - set(RESERVED_MODEL_FIELDS)))}")
        try:
            out[key] = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as e:
            raise ValueError(f"{key}={value!r}: {e.errors()[0]['msg']}") from None
    return out


def _describe(error: dict, source: str) -> str:
    loc = error.get("loc") or ()
    msg = error["msg"].removeprefix("Value error, ")
    if not loc:
        return f"{_FN}: {msg}"
    name = str(loc[0])
    if error["type"] == "unexpected_keyword_argument":
        known = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
        return f"{_FN}: unknown option {name!r}{source}; known: {known}"
    value = error.get("input")
    shown = value if isinstance(value, str) and value and not value.isspace() else repr(value)
    return f"{_FN}: {option(name)}={shown}{source}: {msg}"


def parse_config(options: dict, source: str = "") -> TrainConfig:
    """A validated ``TrainConfig`` from a mapping of option names to values (strings are converted).
    ``source`` (e.g. ``" in run.yaml"``) is added to messages. Raises ValueError, one line per problem."""
    try:
        return TrainConfig(**options)
    except ValidationError as e:
        raise ValueError("\n".join(_describe(err, source) for err in e.errors())) from None


def load_config_file(path: str) -> dict:
    """The options in a JSON or YAML file, checked by :func:`parse_config` (its values are validated when
    combined with the command line's). Raises FileNotFoundError / ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_FN}: config file {path} does not exist")
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{_FN}: {path} is not valid YAML: {' '.join(str(e).split())}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{_FN}: {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{_FN}: {path} must hold a mapping of option names to values")
    parse_config(data, f" in {path}")  # names the file in any error
    return data


# ---- resuming ----------------------------------------------------------------------------------------------

NEVER_ON_RESUME = ("model", "model_overrides", "data", "tokenizer", "vocab_size", "seq_len", "seed", "dtype", "task",
                   "task_options", "pretrained", "hf_model", "lr_decay_style", "layer_lr_decay")
SCHEDULE_OPTIONS = ("lr", "min_lr", "warmup_steps", "weight_decay")


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def resume_config(saved: dict, config: TrainConfig, explicit: Optional[set], step: int,
                  auto: Optional[tuple[str, str]] = None) -> tuple[TrainConfig, list[str]]:
    """The configuration a run resumed at ``step`` continues with, and the lines to log about it.

    ``saved`` is the checkpoint's configuration (a dict of options), ``config`` this invocation's, and
    ``explicit`` the options given in this invocation (None: every field of ``config`` counts as given).
    Options not given take the checkpoint's values. ``auto`` is what ``--dtype auto`` resolves to on this
    machine, ``(dtype, why)`` (megacore._machine.auto_dtype): with ``--dtype auto`` the checkpoint's dtype
    continues, and a note says so when ``auto`` differs from it. Raises ValueError naming the option for a
    change a resume may not make (see the module docstring)."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    given = set(fields) if explicit is None else set(explicit)
    merged = {name: saved[name] if (name not in given and name in saved) else getattr(config, name) for name in fields}
    merged["override_lr_schedule"] = config.override_lr_schedule  # a one-time instruction, never inherited
    notes = []
    if config.dtype == "auto" and saved.get("dtype", "auto") != "auto":
        # The checkpoint holds the dtype auto chose where it was trained; a plain rerun is never refused.
        merged["dtype"] = saved["dtype"]
        if auto is not None and auto[0] != saved["dtype"]:
            notes.append(f"--dtype auto: the checkpoint's {saved['dtype']} continues (auto would choose {auto[0]} "
                         f"here: {auto[1]}; a new --output trains in {auto[0]})")
    for name in fields:
        if name not in saved or _same(saved[name], merged[name]):
            continue
        old, new = saved[name], merged[name]
        if name in NEVER_ON_RESUME:
            raise ValueError(f"{_FN}: {option(name)} is {new!r} but the checkpoint at step {step} was trained with "
                             f"{old!r}; a resumed run cannot change it (start a new --output instead)")
        if name in SCHEDULE_OPTIONS and not config.override_lr_schedule:
            raise ValueError(f"{_FN}: {option(name)} is {new!r} but the checkpoint at step {step} has {old!r}; pass "
                             "--override-lr-schedule to apply the new schedule settings from this step on, or leave "
                             "the option out to continue the checkpoint's schedule")
        if name == "train_steps":
            if new <= step:
                raise ValueError(f"{_FN}: --train-steps {new} is not beyond the checkpoint's step {step}")
            notes.append(f"--train-steps {old} -> {new}: the learning-rate schedule now decays over {new} steps")
        elif name == "global_batch_size":
            notes.append(f"--global-batch-size {old} -> {new}: the data continues at the checkpoint's sample "
                         f"position, {new} samples per step from here")
        elif name not in ("output", "override_lr_schedule"):
            notes.append(f"{option(name)} {old!r} -> {new!r}")
    return parse_config(merged), notes


__all__ = ["NEVER_ON_RESUME", "RESERVED_MODEL_FIELDS", "SCHEDULE_OPTIONS", "TrainConfig", "load_config_file",
           "option", "parse_config", "resume_config"]
