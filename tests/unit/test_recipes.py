"""Recipes: YAML is the JSON mapping of JobSpec; --set overrides reach any field."""

from __future__ import annotations

import pytest
from stillroom.services.recipes import RecipeError, apply_set, load


def test_recipe_with_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("display_name: x\nstages:\n  - audit: {min_rows: 5}\nlabels: {team: search}\n")
    spec, labels = load(path, ["stages[0].audit.min_rows=10", "stages[1].audit.warn_only=true", "teacher.path=/m"])
    assert spec.stages[0].audit.min_rows == 10 and spec.stages[1].audit.warn_only
    assert spec.teacher.path == "/m" and labels == {"team": "search"}


def test_bad_recipes_are_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - audit: {min_rowz: 5}\n")
    with pytest.raises(RecipeError, match=r"r.yaml: .*min_rowz"):
        load(path)
    with pytest.raises(RecipeError, match="index 3 is past the end"):
        apply_set({"stages": []}, "stages[3].audit.min_rows=1")
    with pytest.raises(RecipeError, match="expected path=value"):
        apply_set({}, "novalue")


def test_a_recipe_extends_another_with_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "display_name: full\nstages:\n  - audit: {min_rows: 100}\n  - sft: {optim: {max_steps: 40}}\nlabels: {a: b}\n"
    )
    (tmp_path / "quick.yaml").write_text(
        "extends: base.yaml\ndisplay_name: quick\nset:\n  - stages[1].sft.optim.max_steps=4\n"
    )
    spec, labels = load(tmp_path / "quick.yaml", ["stages[0].audit.min_rows=5"])
    assert spec.display_name == "quick" and labels == {"a": "b"}
    assert spec.stages[0].audit.min_rows == 5 and spec.stages[1].sft.optim.max_steps == 4
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(RecipeError, match="extends itself"):
        load(tmp_path / "loop.yaml")
