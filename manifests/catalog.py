"""The model catalog: which public checkpoints wanpack knows, where they live on the Hub, and what each file is.

The entries are data (catalog.json next to this file); this module only loads and checks them. Each entry names a
Hub repo and revision, the file patterns of every component (dit, t5, clip, vae, tokenizer, lora), the DiT
architecture (a key of ``manifests.arch.DIT_ARCHS``: the user never has to guess it from file names) and the preset
``wanpack run`` starts from (a file in manifests/presets/). ``verified: false`` marks entries whose layout was not confirmed from a primary source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from wanpack.errors import UsageError
from wanpack.manifests.arch import DIT_ARCHS
from wanpack.manifests.run_config import preset_names

CATALOG_PATH = Path(__file__).with_name("catalog.json")
COMPONENTS = ("dit", "t5", "clip", "vae", "tokenizer", "lora")
_REQUIRED = ("repo_id", "revision", "arch", "preset", "verified", "description", "components")
_OPTIONAL = ("encoders_from", "approx_gb")


@dataclass(frozen=True)
class CatalogEntry:
    """One downloadable checkpoint."""

    name: str
    repo_id: str
    revision: str
    arch: str
    preset: str
    verified: bool
    description: str
    components: dict[str, tuple[str, ...]]  # component -> allow patterns (fnmatch, as huggingface_hub uses them)
    encoders_from: str | None = None  # entry holding the T5/CLIP/VAE/tokenizer this DiT or LoRA runs with
    approx_gb: float | None = None

    def patterns(self, components: tuple[str, ...] | None = None) -> list[str]:
        """Allow patterns for the chosen components (all of them when ``components`` is None)."""
        chosen = components or tuple(self.components)
        missing = [c for c in chosen if c not in self.components]
        if missing:
            raise UsageError(
                f"{self.name} has no component {', '.join(missing)} - choose from {', '.join(self.components)}"
            )
        return [p for c in chosen for p in self.components[c]]


def _entry(name: str, raw: dict) -> CatalogEntry:
    where = f"catalog entry {name!r}"
    missing = [k for k in _REQUIRED if k not in raw]
    unknown = set(raw) - set(_REQUIRED) - set(_OPTIONAL)
    if missing or unknown:
        raise UsageError(f"{where} lacks {missing} or has unknown keys {sorted(unknown)} - fix {CATALOG_PATH.name}")
    if raw["arch"] not in DIT_ARCHS:
        raise UsageError(f"{where} names arch {raw['arch']!r} - use one of {', '.join(DIT_ARCHS)}")
    if raw["preset"] not in preset_names():
        raise UsageError(f"{where} names preset {raw['preset']!r} - use one of {', '.join(preset_names())}")
    comps = raw["components"]
    bad = [c for c in comps if c not in COMPONENTS]
    if not comps or bad:
        raise UsageError(f"{where} has components {bad or 'none'} - use some of {', '.join(COMPONENTS)}")
    for comp, pats in comps.items():
        if not isinstance(pats, list) or not pats or not all(isinstance(p, str) and p for p in pats):
            raise UsageError(f"{where} component {comp!r} needs a non-empty list of file patterns")
    if not isinstance(raw["verified"], bool) or "/" not in raw["repo_id"] or not raw["revision"]:
        raise UsageError(f"{where} needs repo_id 'owner/name', a revision and verified true/false")
    return CatalogEntry(
        name=name,
        repo_id=raw["repo_id"],
        revision=raw["revision"],
        arch=raw["arch"],
        preset=raw["preset"],
        verified=raw["verified"],
        description=raw["description"],
        components={c: tuple(p) for c, p in comps.items()},
        encoders_from=raw.get("encoders_from"),
        approx_gb=raw.get("approx_gb"),
    )


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, CatalogEntry]:
    """Every catalog entry by name, checked against the schema and the known architectures."""
    data = json.loads(CATALOG_PATH.read_text())
    if data.get("schema") != 1:
        raise UsageError(f"{CATALOG_PATH} has schema {data.get('schema')!r} - this wanpack reads schema 1")
    entries = {name: _entry(name, raw) for name, raw in data["entries"].items()}
    for entry in entries.values():
        if entry.encoders_from is not None and entry.encoders_from not in entries:
            raise UsageError(f"catalog entry {entry.name!r} takes encoders from unknown entry {entry.encoders_from!r}")
    return entries


def find_entry(name_or_repo: str) -> CatalogEntry | None:
    """The entry called ``name_or_repo``, or the only entry for that repo id; None when neither matches."""
    entries = load_catalog()
    if name_or_repo in entries:
        return entries[name_or_repo]
    by_repo = [e for e in entries.values() if e.repo_id.lower() == name_or_repo.lower()]
    return by_repo[0] if len(by_repo) == 1 else None
