"""The noise chosen for each input, saved beside the results log so every certificate can be checked later.

``<results>.noise/<dataset index>.safetensors`` holds the tensors of :meth:`~smoothcert.noise.Noise.parameters`,
with the noise kind, the index and the method in the metadata; each file is written through a temporary file
and renamed, so a crash never leaves a torn one.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from smoothcert.noise.base import Noise, noise_from_parameters

__all__ = ["NoiseStore"]


class NoiseStore:
    """The per-input noise folder of one results log, written by one method."""

    def __init__(self, results: str | Path, method: str):
        self.folder = self.path(results)
        self.method = method

    @staticmethod
    def path(results: str | Path) -> Path:
        """The folder of the per-input noise parameters of a results log."""
        results = Path(results)
        return results.with_name(results.name + ".noise")

    def create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, index: int, noise: Noise) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in noise.parameters().items()}
        path = self.folder / f"{index}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"kind": noise.kind, "index": str(index), "method": self.method})
        tmp.replace(path)

    def holds(self, index: int) -> bool:
        """Is there a noise file for ``index`` written by this method?"""
        path = self.folder / f"{index}.safetensors"
        if not path.exists():
            return False
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return (meta.get("method") == self.method and meta.get("index") == str(index)
                and meta.get("kind") in Noise.registry)

    @classmethod
    def load(cls, results: str | Path, index: int) -> Noise:
        """The noise certified for dataset index ``index`` of a results log."""
        path = cls.path(results) / f"{int(index)}.safetensors"
        if not path.exists():
            raise ValueError(f"no saved noise for index {index}: {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            kind = f.metadata().get("kind")
            params = {k: f.get_tensor(k) for k in f.keys()}
        return noise_from_parameters(kind, params)
