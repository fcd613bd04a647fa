"""What ``moa-train --help`` and ``moa-eval --help`` list: the choices of the groups each command uses.

The help texts are Hydra help templates (configs/hydra/help/{train,eval}.yaml). Hydra's own
``$APP_CONFIG_GROUPS`` lists every group of the config tree, also those the command never reads (the
evaluation groups in moa-train's help), so each template names its groups through the ``moa_choices``
resolver registered here (cli.py imports this module before Hydra composes).
"""

from __future__ import annotations

import textwrap

from omegaconf import OmegaConf

from moa_train.files import config_dir


def group_choices(*groups: str) -> str:
    """One ``group: option, option, ...`` line per group (options = the packaged yaml files), wrapped.

    ``group-option`` leaves out an option the command does not use (moa-eval: ``logger-tensorboard``)."""
    root = config_dir()
    lines = []
    for entry in groups:
        group, *left_out = entry.split("-")
        options = ", ".join(sorted(p.stem for p in (root / group).glob("*.yaml") if p.stem not in left_out))
        lines.append(textwrap.fill(f"{group}: {options}", width=110, subsequent_indent="    "))
    return "\n".join(lines)


OmegaConf.register_new_resolver("moa_choices", group_choices, replace=True)
