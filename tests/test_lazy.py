"""Packages export their names lazily (`quiver.lazy`): each export is the object its module
defines, even after every submodule has been imported (a submodule of the same name as an
export would otherwise shadow it: `quiver.reuse` the function, not a module)."""

import importlib
import pkgutil

import pytest

import quiver

PACKAGES = ["quiver", "quiver.adaptation", "quiver.adapters", "quiver.data",
            "quiver.evaluation", "quiver.serving", "quiver.training", "quiver.transforms"]


def test_every_lazy_export_is_its_module_s_object_after_every_submodule_is_imported():
    for module in pkgutil.walk_packages(quiver.__path__, "quiver."):
        if module.name != "quiver.lm_eval_bridge":  # needs the optional lm-eval
            importlib.import_module(module.name)
    checked = 0
    for name in PACKAGES:
        package = importlib.import_module(name)
        for export, source in package._EXPORTS.items():
            assert getattr(package, export) is getattr(importlib.import_module(source), export), (
                f"{name}.{export}")
            checked += 1
    assert checked > 60


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        quiver.training.nothing_here  # noqa: B018
    assert "TrainConfig" in dir(quiver.training)
