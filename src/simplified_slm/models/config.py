"""The base of every model family's config.

Each family subclasses `ModelConfig` as a dataclass with its own fields and presets; the
`family` class attribute is what `config.json` records so a saved model reloads as the
right class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from simplified_slm.configbase import ConfigBase
from simplified_slm.errors import SLMError


@dataclasses.dataclass
class ModelConfig(ConfigBase):
    family: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    vocab_size: int = 256

    def validate(self) -> None:
        if self.vocab_size < 2:
            self._fail("vocab_size", f"must be at least 2, got {self.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None) -> "ModelConfig":
        data = dict(data)
        family = data.pop("family", cls.family)
        if family != cls.family:
            raise SLMError(f"{where or cls.__name__}: config is for family '{family}', "
                           f"not '{cls.family}'; load it with the '{family}' family")
        return super().from_dict(data, where)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (e.g. 'small'), with fields overridden by keyword."""
        if name not in cls.presets:
            raise SLMError(f"unknown {cls.family} preset '{name}'; choose one of {sorted(cls.presets)}")
        return cls.from_dict({**cls.presets[name], **overrides})

    @classmethod
    def small(cls, **overrides: Any) -> "ModelConfig":
        return cls.preset("small", **overrides)

    @classmethod
    def base(cls, **overrides: Any) -> "ModelConfig":
        return cls.preset("base", **overrides)

    @classmethod
    def large(cls, **overrides: Any) -> "ModelConfig":
        return cls.preset("large", **overrides)
