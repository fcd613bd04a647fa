"""Decoding presets (configs/decoding/*.yaml) and the ``model.generate`` arguments they stand for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moa_train.errors import MoATrainError
from moa_train.files import config_dir


@dataclass(frozen=True)
class DecodingConfig:
    """One decoding preset (configs/decoding/*.yaml). ``top_k=0`` keeps HF from adding its top-50 filter."""

    name: str = "greedy"
    do_sample: bool = False
    num_beams: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_any(cls, value: str | Mapping[str, Any] | DecodingConfig | None) -> DecodingConfig:
        """Accept a preset name, a (Dict)Config node or a DecodingConfig."""
        if value is None:
            value = "greedy"
        if isinstance(value, DecodingConfig):
            return value
        if isinstance(value, str):
            path = config_dir() / "decoding" / f"{value}.yaml"
            if not path.is_file():
                known = sorted(p.stem for p in path.parent.glob("*.yaml"))
                raise MoATrainError(f"decoding preset {value!r} not found; known presets: {', '.join(known)}")
            value = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        known_fields = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known_fields)
        if unknown:
            raise MoATrainError(
                f"unknown decoding field(s) {', '.join(unknown)}; known: {', '.join(sorted(known_fields))}"
            )
        config = cls(**{k: v for k, v in value.items() if v is not None})
        if config.num_beams < 1:
            raise MoATrainError(f"decoding.num_beams must be >= 1, got {config.num_beams}")
        if config.do_sample and not (config.temperature and config.temperature > 0):
            raise MoATrainError("decoding.do_sample=true needs decoding.temperature > 0")
        return config

    def generation_kwargs(self) -> dict[str, Any]:
        """Arguments for ``model.generate`` (sampling knobs only when sampling, to avoid HF warnings).

        Knobs that would change the protocol are set to neutral values explicitly: HF fills unset
        ones from the model's own generation_config (e.g. a shipped repetition_penalty).
        """
        kwargs: dict[str, Any] = {
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "no_repeat_ngram_size": 0,
            "length_penalty": 1.0,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p or 1.0, top_k=self.top_k)
        return kwargs
