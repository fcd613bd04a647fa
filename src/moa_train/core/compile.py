"""torch.compile for a MoAModel: the one place that sets the compiler up (moa-train, moa-eval, moa-bench).

A MoA forward is one graph under ``torch.compile(fullgraph=True)`` (routers, gates, experts, prompt
attention, aux losses and telemetry; tests/test_compile.py pins it per method). Two things make that so:

* Telemetry and aux losses are recorded only by the forward, not by the replay non-reentrant activation
  checkpointing runs in backward (``telemetry.in_backward``; the replay still computes the aux losses,
  so it saves the same tensors). A compiled forward never re-runs Python in backward (AOTAutograd
  recomputes inside the compiled backward graph, without side effects), so while tracing that check is
  False, and dynamo is told the same for the checkpointed layers: their side effects (telemetry
  sums, aux losses, the layer's gate columns) are not replayed in backward
  (``skip_fwd_side_effects_in_bwd_under_checkpoint``) — exactly what eager does.
* ``sparse_impl=gather`` runs each expert on a data-dependent number of tokens (nonzero(), a host sync
  and a new shape per step): it cannot be one graph and is rejected up front with a one-line error.
  The default (``auto``) is the dense masked path, which computes the same outputs.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from moa_train.errors import MoATrainError

if TYPE_CHECKING:  # torch is imported where it is used: validate.py reads COMPILE_MODES without it
    import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Dynamo settings every MoA compile uses (see the module docstring); tests trace under the same ones.
DYNAMO_SETTINGS = {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}


def check_compilable(cfg: Any, option: str = "trainer.compile") -> None:
    """Raise a one-line MoATrainError when a MoAConfig (None: a plain model) cannot be compiled as one
    graph. moa-train calls it while validating the config, before anything is written or loaded."""
    if cfg is None or cfg.sparse_impl != "gather":
        return
    routers = [cfg.router, *([cfg.site_router] if cfg.has_site_routers() else [])]
    if any(r.kind != "none" and r.selection != "dense" for r in routers):  # the gather path is in use
        raise MoATrainError(
            f"{option}=true cannot compile moa.sparse_impl=gather (each expert runs on a data-dependent "
            "number of tokens, a host sync per step); set moa.sparse_impl=auto (dense masked, same outputs) "
            f"or {option}=false"
        )


def _prepare(model: Any, mode: str | None, option: str) -> str:
    """Check the mode and the configuration; set the dynamo settings (read when the first call traces, so
    for the process). Returns the mode."""
    mode = mode or "default"
    if mode not in COMPILE_MODES:
        raise MoATrainError(f"{option}_mode={mode!r} is not known; choose one of {', '.join(COMPILE_MODES)}")
    # deferred: cli.validate imports this module and must not load torch
    import torch

    check_compilable(getattr(model, "moa_config", None), option)
    for key, value in DYNAMO_SETTINGS.items():
        setattr(torch._dynamo.config, key, value)
    return mode


def compile_model(
    model: torch.nn.Module,
    mode: str | None = "default",
    dynamic: bool | None = None,
    option: str = "trainer.compile",
    backend: str = "inductor",
) -> torch.nn.Module:
    """Compile ``model``'s forward in place (``nn.Module.compile``) as one graph and return it.

    ``mode``: torch.compile mode (default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs);
    ``dynamic``: None lets torch mark a dimension dynamic after it first changes (one recompile), True
    traces dynamic shapes from the start, False specialises on every new shape (a recompile each).
    A forward that still breaks the graph stops with a one-line error naming the cause. ``backend``:
    a torch.compile backend (tests use "aot_eager": the same graphs and autograd, no code generation).
    """
    # deferred: cli.validate imports this module and must not load torch
    import torch

    mode = _prepare(model, mode, option)
    options = {"mode": mode} if backend == "inductor" else {}
    compiled = torch.compile(model._call_impl, backend=backend, dynamic=dynamic, fullgraph=True, **options)

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.Unsupported as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MoATrainError(
                f"{option}=true: this model cannot be compiled as one graph ({first}); set {option}=false"
            ) from exc

    # What nn.Module.compile does (the module keeps its identity: hooks, state dict, telemetry), plus the
    # one-line error above.
    model._compiled_call_impl = call
    return model


def compile_decoding(
    model: torch.nn.Module, mode: str | None = "default", backend: str = "inductor", option: str = "compile"
) -> torch.nn.Module:
    """Make ``model.generate`` compile its decoding steps (transformers' own path: a static KV cache and a
    compiled forward per new token; the prefill stays eager). Greedy outputs equal eager decoding's.

    Instance-level routers are refused: they cache one gate vector per sequence at prefill and reuse it
    while decoding, and with a static cache "is this the prefill" is a tensor test, not a Python one.
    """
    # deferred: transformers is heavy; cli.validate imports this module
    from transformers.generation.configuration_utils import CompileConfig

    mode = _prepare(model, mode, option)
    cfg = getattr(model, "moa_config", None)
    if cfg is not None and cfg.router.kind != "none" and cfg.router.granularity == "instance":
        raise MoATrainError(
            f"{option}=true cannot compile decoding with moa.router.granularity=instance (its per-sequence gate "
            f"cache needs an eager prefill test); set {option}=false"
        )
    options = {"mode": mode} if backend == "inductor" else {"mode": None}
    compile_config = CompileConfig(fullgraph=True, backend=backend, **options)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA-like devices only otherwise
    generation = model.generation_config
    generation.cache_implementation, generation.compile_config = "static", compile_config
    return model


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (dynamo tracing and Inductor, forward and backward).

    Training logs it apart from step time: the first steps of a compiled run include it.
    """
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:  # nothing compiled yet (and importing dynamo costs seconds)
        return 0.0
    compilation_time_metrics = utils.compilation_time_metrics
    # the forward compile (dynamo entry, which includes its Inductor forward) and the lazily compiled backward
    names = ("_compile.compile_inner", "backward._backward_impl")
    return float(sum(sum(compilation_time_metrics.get(name, [])) for name in names))
