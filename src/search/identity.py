"""What a study's trials depend on, and so what its stored name stands for.

A study is one recipe (every param a trial reads), one training data set (the patch store's content)
and one version of the code a trial runs. The stored name is ``NAME-<hash of the three>``: a changed
param, a replaced data file or edited trial code starts a fresh study instead of resuming one whose
trials were measured on something else, and going back resumes the old one. Params that only say how
a run goes (trial count, storage, workers, batch size of inference, compilation, cache folder) are
left out, so workers with other settings of those share the study.

The code digest covers the ``src`` modules the objective imports, directly or not, compared by syntax
tree without docstrings: editing a comment or a docstring keeps the study, editing code starts a new
one. The data stages' modules (normalization, registration, extraction) are not among them: they reach
the trials only through the patch store's content, which the data digest covers.
Library versions are recorded on the study (``versions``) but not part of its name.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from src.core.provenance import SRC, imported_modules, modules_digest, versions

# Keys that do not change what a trial computes.
RUN_ONLY = {
    "tune": {"trials", "study", "storage", "timeout_s", "heartbeat_s", "ensemble_size"},  # selection reads trials
    "train": {"cache_dir", "num_workers", "compile"},
    "infer": {"batch_size"},
}
# Sections upstream of the patch store: the data digest covers their effect (data.truth has none).
UPSTREAM = ("data", "simulate", "stain", "patches")
TRIAL_ROOTS = ("src.search.objective",)  # what it imports (training, model, loss, ...) follows
# Where a trial is stored and the pictures it uploads: they change no score.
NOT_TRIAL_CODE = {"src.search.storage", "src.report.plots"}
LIBRARIES = ("torch", "timm", "torchsort", "numpy", "optuna")


def recipe_fingerprint(base_raw: dict) -> dict:
    """Every param a trial reads: all but the upstream sections and the run-only keys."""
    recipe = {section: ({k: v for k, v in values.items() if k not in RUN_ONLY.get(section, ())}
                        if isinstance(values, dict) else values)
              for section, values in base_raw.items() if section not in UPSTREAM}
    return json.loads(json.dumps(recipe, sort_keys=True, default=str))


def trial_modules(root: Path = SRC) -> dict[str, str]:
    """Module name -> normalized syntax tree of every module a trial runs."""
    return imported_modules(TRIAL_ROOTS, root, exclude=NOT_TRIAL_CODE)


def code_digest(root: Path = SRC) -> str:
    return modules_digest(trial_modules(root))


def library_versions() -> dict[str, str]:
    return versions(LIBRARIES)


def study_identity(base_raw: dict, data_digest: str, code: str | None = None) -> dict:
    """The three things a study's trials depend on."""
    return {"recipe": recipe_fingerprint(base_raw), "data": data_digest, "code": code or code_digest()}


def study_name_for(name: str, identity: dict) -> str:
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{name}-{digest[:8]}"


def is_version_of(stored_name: str, name: str) -> bool:
    """``default-1a2b3c4d`` is a version of study ``default``; ``default-foo-1a2b3c4d`` is not."""
    return re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{8}}", stored_name) is not None


def earlier_versions(storage, name: str, current: str) -> list:
    """The other stored versions of study ``name`` (frozen studies), newest first."""
    others = [s for s in storage.get_all_studies()
              if is_version_of(s.study_name, name) and s.study_name != current and "data" in s.user_attrs]
    return sorted(others, key=lambda s: storage.get_study_id_from_name(s.study_name), reverse=True)


def what_changed(old: dict, new: dict) -> list[str]:
    """Which of recipe / data / code differ between two identities (for telling the user why)."""
    labels = {"recipe": "the recipe (params)", "data": "the training data (patch store)",
              "code": "the trial code (src/)"}
    return [labels[k] for k in ("recipe", "data", "code") if old.get(k) != new.get(k)]
