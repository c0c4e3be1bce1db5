"""Every case has one role: labeled training, unlabeled, or test (issue 14, no label leaks).

A semi-supervised run mixes case pools; an identifier in two of them silently gives one case the other's label,
pseudo-label or preprocessed copy, or trains and validates on held-out cases. `check_disjoint` refuses that with one
line naming the colliding identifiers; `check_splits_disjoint` checks nnU-Net's `splits_final.json` (its train and
val cases are labeled cases) against the unlabeled pool. Library functions: the raw-folder checks
(`nnunet_semisam.data.unlabeled`), `split-labels` and the trainers call them where they meet the pools.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from nnunet_semisam.errors import SemiSAMError

MAX_NAMED = 5  # identifiers listed in a message before "... (N in all)"


def _named(ids: Iterable[str]) -> str:
    ids = sorted(set(ids))
    shown = ", ".join(ids[:MAX_NAMED])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > MAX_NAMED else "")


def collisions(a: Iterable[str], b: Iterable[str]) -> list[str]:
    """Sorted identifiers present in both `a` and `b`."""
    return sorted(set(a) & set(b))


def check_disjoint(labeled_ids: Iterable[str], unlabeled_ids: Iterable[str], *,
                   labeled_source: str = "labeled training cases (imagesTr)",
                   unlabeled_source: str = "unlabeled cases (imagesUnlabeled)",
                   test_ids: Iterable[str] | None = None, test_source: str = "test cases (imagesTs)",
                   allow_unlabeled_test_overlap: bool = False,
                   fix: str = "rename or remove them so that every case has one role") -> None:
    """Raise a one-line SemiSAMError when a case identifier is in two pools.

    labeled_ids / unlabeled_ids / test_ids: case identifiers of each pool (test_ids None: not checked).
    allow_unlabeled_test_overlap: transductive use (the unlabeled pool is the test images, as some official code
    does) lets unlabeled and test identifiers coincide; labeled vs. test is always refused. The message names the
    two pools, the colliding identifiers (the first `MAX_NAMED`, and how many) and `fix`.
    """
    labeled, unlabeled = set(labeled_ids), set(unlabeled_ids)
    pairs = [(labeled, labeled_source, unlabeled, unlabeled_source)]
    if test_ids is not None:
        test = set(test_ids)
        pairs.append((labeled, labeled_source, test, test_source))
        if not allow_unlabeled_test_overlap:
            pairs.append((unlabeled, unlabeled_source, test, test_source))
    for a, a_name, b, b_name in pairs:
        both = collisions(a, b)
        if both:
            raise SemiSAMError(f"{len(both)} case identifier{'s are' if len(both) > 1 else ' is'} both {a_name} "
                               f"and {b_name}: {_named(both)}; {fix}")


def splits_cases(splits_file: str | os.PathLike) -> dict[str, set[str]]:
    """{"train": ids, "val": ids} over all folds of an nnU-Net `splits_final.json`."""
    path = Path(splits_file)
    try:
        folds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SemiSAMError(f"{path} cannot be read as nnU-Net splits ({type(e).__name__}: {e})") from None
    if not isinstance(folds, list) or not all(isinstance(f, dict) for f in folds):
        raise SemiSAMError(f"{path} is not an nnU-Net splits file (a list of {{'train': [...], 'val': [...]}})")
    return {k: {str(c) for f in folds for c in f.get(k, [])} for k in ("train", "val")}


def check_splits_disjoint(splits_file: str | os.PathLike, unlabeled_ids: Iterable[str],
                          unlabeled_source: str = "unlabeled cases",
                          fix: str | None = None) -> None:
    """Raise a one-line SemiSAMError when nnU-Net's splits train or validate on an unlabeled case (a label leak:
    typically a `splits_final.json` that predates `split-labels`)."""
    path = Path(splits_file)
    unl = set(unlabeled_ids)
    for role, ids in splits_cases(path).items():
        both = collisions(ids, unl)
        if both:
            raise SemiSAMError(f"{path} lists {len(both)} of the {unlabeled_source} as {role} cases: {_named(both)}; "
                               + (fix or f"delete {path.name} (nnU-Net writes a new one) and rerun "
                                         "nnUNetv2_plan_and_preprocess if the dataset was split after preprocessing"))
