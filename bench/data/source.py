"""The base of every data config: validated settings that know how to load themselves."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from bench.data.datasets import Dataset


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # bump when the generated tokens or the batches drawn from them change for the same settings
    # (2: training batches drawn in epochs, a seeded order with no repeat before every example is seen)
    version: ClassVar[int] = 2

    def load(self) -> Dataset:
        raise NotImplementedError

    def known_vocab_size(self) -> int | None:
        """The vocabulary size, when the settings state it (no reading, downloading or tokenizing)."""
        return getattr(self, "vocab_size", None)

    def preparation(self) -> list[str]:
        """What loading this data will do beyond reading settings (downloads, tokenizing), in words;
        empty when it is generated or read locally at no notable cost."""
        return []

    def identity(self) -> dict[str, Any]:
        """What identifies this data in a run's hash: the settings, the code version, the content hash."""
        return {**self.model_dump(), "data_version": self.version}
