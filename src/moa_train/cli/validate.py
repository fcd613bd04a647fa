"""One validation layer for every value a user can pass, run before anything is written.

``validate(cfg, "train")`` (moa-train, in the launching process, before the run dir is claimed, the
model loads or workers start) and ``validate(cfg, "eval")`` (moa-eval) check every value against the
tables below and raise one :class:`MoATrainError` naming the key, the bad value and the fix.

How to add a check for a new key: add a row to the group's tuple in ``RULES[<root>]`` (one of
``Int``, ``Float``, ``Bool``, ``Choice``, ``Str``, ``Floats``, ``Strs``), e.g. in ``RULES["train"]["trainer"]``::

    Int("my_new_steps", lo=1, null=True),

Keys absent from the composed config are skipped, so a row may name an optional key. Checks that
involve several keys go into ``CHECKS[<root>]`` as ``def _check_x(cfg: DictConfig) -> None``. The
``moa`` node is checked generically against the field types of :class:`moa_train.core.config.MoAConfig`
and then by ``MoAConfig`` itself, so new MoA options need no row here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from moa_train.cli.keys import check_keys
from moa_train.cli.rules import ABSENT as _ABSENT
from moa_train.cli.rules import Bool, Choice, Float, Floats, Int, Rule, Str, Strs
from moa_train.cli.rules import get as _get
from moa_train.core.compile import COMPILE_MODES, check_compilable
from moa_train.core.config import MoAConfig, check_moa_config
from moa_train.errors import MoATrainError
from moa_train.models.options import ATTN_IMPLEMENTATIONS, DTYPE_NAMES, QUANTIZATIONS, SOURCES
from moa_train.rundir import show_value as _show
from moa_train.train.options import LAUNCHERS, LOGGERS, OPTIMIZERS, PRECISION_NAMES, SCHEDULES

# ----------------------------------------------------------------------------------------------------
# The tables: root config -> group -> rules ("" = top-level keys of the root config)
# ----------------------------------------------------------------------------------------------------

_MODEL = (
    Choice("source", *SOURCES),
    Choice("dtype", *DTYPE_NAMES),
    Choice("attn_implementation", *ATTN_IMPLEMENTATIONS),
    Int("init_seed", lo=0),
    Bool("trust_remote_code"),
    Bool("meta_device"),
    Int("arch.vocab_size", lo=1),
    Int("arch.hidden_size", lo=1),
    Int("arch.intermediate_size", lo=1),
    Int("arch.num_hidden_layers", lo=1),
    Int("arch.num_attention_heads", lo=1),
    Int("arch.num_key_value_heads", lo=1),
    Int("arch.max_position_embeddings", lo=1),
    Float("arch.rms_norm_eps", above=0),
    Choice("quantization", *QUANTIZATIONS, null=True),
)

_LOGGER = (
    Choice("name", *LOGGERS),
    Choice("mode", "auto", "online", "offline", "disabled"),
    Str("tracking_uri", null=True),  # mlflow
    Str("experiment", null=True),  # mlflow
)

RULES: dict[str, dict[str, tuple[Rule, ...]]] = {
    "train": {
        "": (
            Int("seed", lo=0),
            Str("name"),
            Bool("dry_run"),
            Bool("full_traceback"),
            Bool("overwrite"),
            Str("resume", null=True),
        ),
        "trainer": (
            Float("epochs", above=0),
            Int("max_steps", lo=1, null=True),
            Int("micro_batch_size", lo=1),
            Int("effective_batch_size", lo=1),
            Choice("precision", *PRECISION_NAMES),
            Float("grad_clip", above=0, null=True),
            Bool("gradient_checkpointing"),
            Bool("compile"),
            Choice("compile_mode", *COMPILE_MODES),
            Bool("compile_dynamic", null=True),
            Choice("device", "auto", "cpu", "cuda"),
            Int("cpu_threads", lo=1, null=True),
            Int("log_every_steps", lo=1),
            Int("save_every_steps", lo=1, null=True),
            Int("keep_last", lo=1, null=True),
            Int("heatmap_every_steps", lo=1, null=True),
            Float("dead_expert_threshold", lo=0, hi=1),
            Int("dead_expert_intervals", lo=1),
            Choice("progress_bar", "auto", True, False),
            Int("eval_every_steps", lo=1, null=True),  # validation (train/validation.py checks the pairings)
            Int("val_accuracy_records", lo=0, null=True),
            Choice("best_metric", "val/loss", "val/accuracy"),
            Choice("best_mode", "min", "max"),
            Int("early_stopping.patience", lo=1, null=True),
            Float("early_stopping.min_delta", lo=0),
        ),
        "optimizer": (
            Choice("name", *OPTIMIZERS),
            Float("lr", above=0, null=True),
            Float("blr", above=0, null=True),
            Floats("betas", length=2, lo=0, below=1),
            Float("eps", above=0),
            Float("weight_decay", lo=0),
        ),
        "scheduler": (
            Choice("name", *SCHEDULES),
            Float("warmup_epochs", lo=0, null=True),
            Int("warmup_steps", lo=0, null=True),
            Float("min_lr", lo=0, null=True),
        ),
        "data": (
            Str("name"),
            Int("max_len", lo=2),
            Bool("train_on_inputs"),
            Choice("template", "alpaca", "chat"),
            Bool("group_by_length"),
            Int("seed", lo=0),
            Int("num_train", lo=1, null=True),
            Int("num_test", lo=0, null=True),
            Int("eval_max_new_tokens", lo=1, null=True),
            Int("test_per_task", lo=0),
            Int("split_seed", lo=0),
            Choice("arith_format", "equation", "number", "sentence"),
            Choice("answer_type", "numeric", "label", "letter", null=True),
            Bool("packing"),
            Bool("streaming"),
        ),
        "model": _MODEL,
        "logger": _LOGGER,
        "launcher": (
            Choice("name", *LAUNCHERS),
            Int("num_processes", lo=1),
            Int("num_machines", lo=1),
            Int("machine_rank", lo=0),
            Str("main_process_ip", null=True),
            Int("main_process_port", lo=1, hi=65535, null=True),
            Bool("find_unused_parameters", null=True),
            Bool("reshard_after_forward"),
            Bool("rank0_loading"),
            Bool("cpu_offload"),
            Strs("extra_args"),
        ),
        "final_eval": (
            Bool("enabled"),
            Str("split"),
            Int("max_records", lo=1, null=True),
            Int("batch_size", lo=1),
            Int("max_new_tokens", lo=1, null=True),
            Str("decoding"),
            Bool("base"),
        ),
    },
    "export": {
        "": (
            Str("checkpoint", null=True),
            Choice("format", "peft", "merged", null=True),
            Str("out", null=True),
            Choice("dtype", "auto", "float32", "bfloat16", "float16"),
        ),
    },
    "eval": {
        "": (
            Str("checkpoint", null=True),
            Str("output_dir", null=True),
            Int("batch_size", lo=1, also=("auto",)),
            Choice("precision", "auto", "fp32", "bf16", "fp16"),
            Int("max_new_tokens", lo=1, null=True),
            Int("max_new_tokens_cap", lo=1),
            Str("wandb_run"),
            Bool("router_stats"),
            Int("router_case", lo=0),
            Int("cpu_threads", lo=1, null=True),
            Choice("template", "auto", "alpaca", "chat"),
            Bool("compile"),
            Choice("compile_mode", *COMPILE_MODES),
        ),
        # limit=auto: the heldout preset's record count = the training run's final_eval.max_records
        "eval": (Bool("skip_missing"),),  # eval.limit: _check_eval_limit
        "model": _MODEL,
        "logger": _LOGGER,
        "decoding": (
            Bool("do_sample"),
            Int("num_beams", lo=1),
            Float("temperature", lo=0, null=True),
            Float("top_p", above=0, hi=1, null=True),
            Int("top_k", lo=0),
            Int("seed", lo=0, null=True),
            Float("repetition_penalty", above=0, null=True),
        ),
    },
}


# ----------------------------------------------------------------------------------------------------
# Checks over several keys
# ----------------------------------------------------------------------------------------------------


def _check_batch_split(cfg: DictConfig) -> None:
    """The launching process checks the split over all processes, so workers never start on a bad one."""
    tc = cfg.trainer
    micro, effective = int(tc.micro_batch_size), int(tc.effective_batch_size)
    processes = (
        int(_get(cfg, "launcher.num_processes", 1) or 1) if _get(cfg, "launcher.name") != "local" else 1
    )
    if effective % (micro * processes):
        fit = micro * processes
        raise MoATrainError(
            f"trainer.effective_batch_size={effective} must be a multiple of trainer.micro_batch_size x processes "
            f"= {micro} x {processes} = {fit}; e.g. trainer.effective_batch_size={max(fit, effective // fit * fit)} "
            f"or trainer.micro_batch_size={_largest_divisor(effective // processes if effective % processes == 0 else 1, micro)}"
        )


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def _check_lr(cfg: DictConfig) -> None:
    if _get(cfg, "optimizer.lr") is None and _get(cfg, "optimizer.blr") is None:
        raise MoATrainError("set optimizer.lr (absolute) or optimizer.blr (scaled by effective_batch/256)")


def _check_warmup(cfg: DictConfig) -> None:
    if _get(cfg, "scheduler.warmup_steps") is not None and _get(cfg, "scheduler.warmup_epochs") is not None:
        raise MoATrainError(
            "set scheduler.warmup_steps or scheduler.warmup_epochs, not both (the other =null)"
        )


def _check_name(cfg: DictConfig) -> None:
    name = str(cfg.name)
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise MoATrainError(
            f"name={name!r} names the run folder runs/<name>/; use a plain name without / or leading ."
        )


def _check_arch(cfg: DictConfig) -> None:
    arch = _get(cfg, "model.arch")
    if not isinstance(arch, DictConfig):
        return
    hidden, heads, kv = (
        arch.get("hidden_size"),
        arch.get("num_attention_heads"),
        arch.get("num_key_value_heads"),
    )
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise MoATrainError(
            f"model.arch.hidden_size={hidden} must be divisible by model.arch.num_attention_heads={heads}"
        )
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise MoATrainError(
            f"model.arch.num_attention_heads={heads} must be divisible by model.arch.num_key_value_heads={kv}"
        )


def _check_launcher(cfg: DictConfig) -> None:
    """Several machines and FSDP options: checked before any process starts (launcher.num_processes is
    the total over all machines)."""
    name = _get(cfg, "launcher.name")
    machines = int(_get(cfg, "launcher.num_machines", 1) or 1)
    rank = int(_get(cfg, "launcher.machine_rank", 0) or 0)
    processes = int(_get(cfg, "launcher.num_processes", 1) or 1)
    if machines > 1 or rank > 0:
        if name == "local":
            raise MoATrainError("launcher.num_machines > 1 needs launcher=accelerate or launcher=fsdp")
        if rank >= machines:
            raise MoATrainError(
                f"launcher.machine_rank={rank} must be below launcher.num_machines={machines} (0 .. {machines - 1})"
            )
        if processes % machines:
            raise MoATrainError(
                f"launcher.num_processes={processes} (the total over all machines) must be a multiple of "
                f"launcher.num_machines={machines}"
            )
        if not _get(cfg, "launcher.main_process_ip", None):
            raise MoATrainError(
                "launcher.num_machines > 1 needs launcher.main_process_ip=<address of machine_rank 0>"
            )
    if name == "fsdp" and _get(cfg, "launcher.cpu_offload", False) and _get(cfg, "trainer.device") == "cpu":
        raise MoATrainError(
            "launcher.cpu_offload=true offloads GPU memory; with trainer.device=cpu set it to false"
        )
    if name == "fsdp" and _get(cfg, "model.quantization", None) == "int8":
        raise MoATrainError(
            "model.quantization=int8 cannot be sharded by FSDP; use model.quantization=nf4 (or fp4) with launcher=fsdp"
        )


def _check_quantization(cfg: DictConfig) -> None:
    kind = _get(cfg, "model.quantization", None)
    if kind in (None, _ABSENT):
        return

    if importlib.util.find_spec("bitsandbytes") is None:
        raise MoATrainError(
            f"model.quantization={kind} needs bitsandbytes: pip install bitsandbytes (or make setup)"
        )
    if _get(cfg, "model.meta_device", False):
        raise MoATrainError(f"model.quantization={kind} needs real weights; set model.meta_device=false")


def _check_final_eval(cfg: DictConfig) -> None:
    """A decoding preset that does not exist would only fail after training."""
    decoding = _get(cfg, "final_eval.decoding", None)
    if _get(cfg, "final_eval.enabled", False) is True and isinstance(decoding, str):
        # deferred: moa_train.eval loads torch; validation stays torch-free otherwise
        from moa_train.eval.decoding import DecodingConfig

        try:
            DecodingConfig.from_any(decoding)
        except MoATrainError as exc:
            raise MoATrainError(f"final_eval.decoding: {exc}") from None


def _check_moa(cfg: DictConfig) -> None:
    """Types against MoAConfig's fields (so new options are covered), then MoAConfig's own checks."""

    moa = _get(cfg, "moa")
    if not isinstance(moa, DictConfig):
        return
    check_moa_config(OmegaConf.to_container(moa, resolve=True), "moa")
    # deferred: moa_train.data loads torch; only a task-typed MoA config needs it
    from moa_train.data import task_types

    task_types.check_config(cfg)  # LoRAMoE's LBC needs per-example task types from the data


def _check_compile(cfg: DictConfig) -> None:
    """trainer.compile=true: the MoA configuration must compile as one graph (not the gather path)."""
    moa = _get(cfg, "moa")
    if _get(cfg, "trainer.compile", False) is True and isinstance(moa, DictConfig):
        check_compilable(MoAConfig.from_dict(OmegaConf.to_container(moa, resolve=True)), "trainer.compile")


def _check_eval_logger(cfg: DictConfig) -> None:
    name = _get(cfg, "logger.name")
    if name in ("tensorboard", "mlflow"):  # moa-eval would ignore them: refuse rather than drop silently
        raise MoATrainError(
            f"moa-eval reports to logger=wandb or logger=none; logger={name} is for training runs only "
            "(the results are in <checkpoint>/eval/<preset>/)"
        )


def _check_eval_limit(cfg: DictConfig) -> None:
    """``eval.limit``: null, auto (heldout), N >= 1 items, or a fraction in (0, 1] (lm_eval)."""
    limit = _get(cfg, "eval.limit", None)
    ok = (
        limit is None
        or limit == "auto"
        or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1)
        or (isinstance(limit, float) and 0 < limit <= 1)
    )
    if not ok:
        raise MoATrainError(
            f"eval.limit={_show(limit)} is invalid: expected null, auto, a count >= 1 or a fraction in (0, 1]"
        )


def _check_logger(cfg: DictConfig) -> None:
    """logger=mlflow needs the optional mlflow client; without it the logger would only warn at start."""
    if _get(cfg, "logger.name", None) == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise MoATrainError(
            'logger=mlflow needs the MLflow client: pip install "moa_train[mlflow]" (or pick logger=wandb|tensorboard|none)'
        )


CHECKS: dict[str, tuple[Callable[[DictConfig], None], ...]] = {
    "train": (
        _check_name,
        _check_batch_split,
        _check_lr,
        _check_warmup,
        _check_arch,
        _check_moa,
        _check_compile,
        _check_launcher,
        _check_quantization,
        _check_final_eval,
        _check_logger,
    ),  # fmt: skip
    "eval": (_check_arch, _check_quantization, _check_eval_limit, _check_eval_logger),
    "export": (),
}


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def validate(cfg: DictConfig, root: str = "train") -> None:
    """Check every key and value of ``cfg`` (a composed ``train``, ``eval`` or ``export`` config); raise
    one MoATrainError. Keys first: a key no config of the command defines (``+trainer.max_step=10``)
    would otherwise go unread."""
    check_keys(cfg, root)
    for group, rules in RULES[root].items():
        node = cfg if group == "" else _get(cfg, group)
        if group and not isinstance(node, DictConfig):
            continue
        for rule in rules:
            value = _get(node, rule.key)
            if value is _ABSENT:
                continue
            rule.check(value, f"{group}.{rule.key}" if group else rule.key)
    for check in CHECKS[root]:
        check(cfg)
