"""Unknown config keys: refused with the nearest valid key, in every command that composes a config.

Hydra refuses ``key=value`` for a key the composed config lacks, but ``+key=value`` (and a user's own
config file) adds any key, which then goes unread: ``+trainer.max_step=10`` would train for the default
number of steps. So after composition every key of the config must be one that a shipped config file of
that command defines (any option of any of its config groups, under the group's package) or a field of
the adapter dataclasses (``moa.*``). Only the documented free-form maps (:data:`FREE_FORM`) take new
keys. The valid keys are read from the YAML files themselves, so a new option or key in ``configs/`` is
known without a second list to keep in step.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from moa_train.core.config import MoAConfig, RouterConfig
from moa_train.errors import MoATrainError

__all__ = ["FREE_FORM", "check_keys", "nearest_key", "override_error", "unknown_override", "valid_keys"]

# Maps whose keys are the user's own (documented in docs/training.md, docs/data.md, docs/evaluation.md).
FREE_FORM = (
    "model.arch",  # transformers config fields of a randomly initialised architecture
    "data.task_types",  # dataset name -> LoRAMoE task type
    "moa.lora_rank_pattern",  # site -> rank
    "eval.gen_kwargs",  # lm-eval generation arguments
    "eval.data",  # name -> a data config (configs/eval/bigbench.yaml)
    "leaderboard_rates",  # experiment preset -> chosen learning rate (configs/sweep/leaderboard_seeds.yaml)
)
_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)", re.MULTILINE)


def _configs() -> Path:
    return Path(str(importlib.resources.files("moa_train.configs")))


def _leaf_paths(node: Any, prefix: str, out: set[str], top: bool = True) -> None:
    """Every dotted path of ``node`` (dict keys recursively; lists and scalars are leaves). A file's
    top-level ``defaults`` list is Hydra's, not a key."""
    if prefix:
        out.add(prefix)
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "defaults" and top:
                continue
            _leaf_paths(value, f"{prefix}.{key}" if prefix else str(key), out, top=False)


def _file_keys(path: Path, group: str) -> set[str]:
    text = path.read_text(encoding="utf-8")
    match = _PACKAGE.search(text)
    package = match.group(1) if match else group.replace("/", ".")
    package = "" if package == "_global_" else package.replace("_group_", group.replace("/", "."))
    keys: set[str] = set()
    _leaf_paths(yaml.safe_load(text) or {}, package, keys)
    return keys


def _groups(root: str) -> tuple[list[str], list[str]]:
    """(config groups, plain config files) named in the root config's defaults list (hydra's own excluded)."""
    data = yaml.safe_load((_configs() / f"{root}.yaml").read_text(encoding="utf-8")) or {}
    groups, files = [], []
    for entry in data.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":  # another primary config merged in (serving)
            files.append(entry)
        elif isinstance(entry, dict):
            for key in entry:
                name = key.split()[-1].lstrip("/")  # "override hydra/help", "optional x"
                if not name.startswith("hydra"):
                    groups.append(name)
    return groups, files


@functools.cache
def valid_keys(root: str) -> frozenset[str]:
    """Every key a config composed from ``configs/<root>.yaml`` may hold."""
    configs = _configs()
    keys = _file_keys(configs / f"{root}.yaml", "")
    groups, files = _groups(root)
    for name in files:
        keys |= _file_keys(configs / f"{name}.yaml", "")
    for group in groups:
        for path in sorted((configs / group).glob("*.yaml")):
            keys |= _file_keys(path, group)
    if "moa" in keys:  # the adapter config: every dataclass field, also those no preset sets
        keys |= {f"moa.{f.name}" for f in dataclasses.fields(MoAConfig)}
        for node in ("router", "site_router"):
            keys |= {f"moa.{node}.{f.name}" for f in dataclasses.fields(RouterConfig)}
    return frozenset(keys)


def _free(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in FREE_FORM)


# Names users bring from other trainers that no spelling distance finds (optimizer.learning_rate -> .lr).
_SYNONYMS = {"learning_rate": "lr"}


def nearest_key(path: str, root: str) -> str | None:
    """The valid key a mistyped or misplaced ``path`` most likely meant: one that ends with it (a missing
    prefix such as moa.), else the closest spelling. Hydra's own keys are suggested only for hydra.*."""
    keys = {k for k in valid_keys(root) if path.startswith("hydra") or not k.startswith("hydra")}
    head, dot, leaf = path.rpartition(".")
    if leaf in _SYNONYMS:
        return nearest_key(f"{head}{dot}{_SYNONYMS[leaf]}", root)
    tails = sorted((k for k in keys if k.endswith("." + path)), key=len)
    if tails:
        return tails[0]
    close = difflib.get_close_matches(path, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    close = difflib.get_close_matches(leaf, {k.rpartition(".")[2] for k in keys}, n=1, cutoff=0.75)
    if close:
        return min((k for k in keys if k.rpartition(".")[2] == close[0]), key=len)
    return None


def _message(path: str, root: str) -> str:
    params = "hydra.sweeper.params."
    if path.startswith(params):  # Hydra cannot set a dotted parameter name through key=value
        key = path[len(params) :]
        return (
            f"'{path}' cannot be set with key=value: give the search space of {key} as a sweep override, "
            f"e.g. {key}='tag(log, interval(1e-4, 1e-2))' or {key}='choice(4, 8, 16)'"
        )
    nearest = nearest_key(path, root)
    # the key itself: another option of its group has it (hydra.sweeper.n_trials, basic sweeper)
    if nearest == path:
        group = "/".join(path.split(".")[:2]) if path.startswith("hydra.") else path.split(".")[0]
        if not path.startswith("hydra.") and group not in _groups(root)[0]:  # valid, merely unset here
            return f"'{path}' is not set in this config; add it with +{path}=<value>"
        return (
            f"'{path}' is not a key of the {group} option chosen here: another option of {group} has it; "
            f"choose that one first ({group}=<option>), or drop the key"
        )
    hint = f"did you mean {nearest}?" if nearest else f"`moa-{root} --cfg job` lists every key"
    keys = valid_keys(root)
    free = [p for p in FREE_FORM if p in keys]
    verb = "takes" if len(free) == 1 else "take"
    maps = f" (of the maps, only {', '.join(free)} {verb} new keys)" if free else ""
    return f"unknown config key '{path}': {hint}{maps}"


def check_keys(cfg: DictConfig, root: str) -> None:
    """Raise one MoATrainError naming the first key of ``cfg`` that no config of ``root`` defines."""
    found: set[str] = set()
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    _leaf_paths(container, "", found)
    keys = valid_keys(root)
    unknown = sorted(p for p in found if p not in keys and not _free(p))
    # name the deepest path (+router.load_balance_coef=... adds 'router' and 'router.load_balance_coef')
    leaves = [p for p in unknown if not any(q.startswith(p + ".") for q in unknown)]
    if leaves:
        raise MoATrainError(_message(leaves[0], root))


_EXPECTED = {
    "Integer": "an integer",
    "Float": "a number",
    "Boolean": "true or false",
}  # OmegaConf's type names


def override_error(exc: BaseException, root: str) -> MoATrainError | None:
    """Hydra's refusal of a command-line override as one line naming the override and the fix, or None
    when ``exc`` is not one: a key the config lacks, a value of the wrong type for a typed key (a
    plugin's ``hydra.launcher.n_jobs=abc``), a dotted search-space key under ``hydra.sweeper.params``."""
    message = str(exc)
    unknown = unknown_override(message, root)
    if unknown is not None:
        return unknown
    match = re.match(r"Sweeping over Hydra's configuration is not supported : '([^'=]+)=", message)
    if match and match.group(1).startswith("hydra.sweeper.params."):
        return MoATrainError(_message(match.group(1), root))
    match = re.match(r"Error merging override (\S+)", message)
    if match and exc.__cause__ is not None:
        lines = [s.strip() for s in str(exc.__cause__).splitlines() if s.strip()]
        reason = lines[0] if lines else type(exc.__cause__).__name__
        kind = re.search(r"could not be converted to (\w+)", reason)
        expected = _EXPECTED.get(kind.group(1), "a value of that type") if kind else "a value of that type"
        return MoATrainError(f"{match.group(1)} is invalid: {reason}; give {expected}")
    return None


def unknown_override(message: str, root: str) -> MoATrainError | None:
    """Hydra's "Could not override 'x'" (a key=value for a key the config lacks) as our one line naming
    the nearest valid key, instead of Hydra's advice to add it with +."""
    match = re.match(r"Could not override '([^']+)'", message)
    if not match or _free(match.group(1)):
        return None
    return MoATrainError(_message(match.group(1), root))
