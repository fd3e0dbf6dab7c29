"""The public surface is explicit: every name in `peftlab.__all__` is importable, every
registered method's config class is listed, and names of earlier releases still work once,
with a warning naming the new call."""
from __future__ import annotations

import warnings

import pytest
import torch

import peftlab
from peftlab.registry import method_class


def test_every_public_name_resolves_and_is_listed_once():
    assert len(peftlab.__all__) == len(set(peftlab.__all__))
    for name in peftlab.__all__:
        assert getattr(peftlab, name) is not None, name


def test_every_builtin_method_class_is_exported_by_its_class_name():
    for name in peftlab.methods():
        cls = method_class(name)
        if not cls.__module__.startswith("peftlab.methods."):
            continue  # a method other tests register for themselves
        assert cls.__name__ in peftlab.__all__, f"{cls.__name__} ({name}) is not in peftlab.__all__"
        assert getattr(peftlab, cls.__name__) is cls


def test_methods_is_the_function_not_the_subpackage():
    assert callable(peftlab.methods) and "lora" in peftlab.methods()


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'LoRAConfig'"):
        peftlab.LoRAConfig


@pytest.mark.parametrize("old, new", [("configs", "adapter_configs"), ("export_peft", "save"),
                                      ("import_peft", "load")])
def test_renamed_names_warn_and_still_work(old, new, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["0"]))
    with pytest.warns(DeprecationWarning, match=new):
        old_call = getattr(peftlab, old)
    if old == "configs":
        assert old_call(model) == peftlab.adapter_configs(model)
    elif old == "export_peft":
        old_call(model, tmp_path / "peft")
        assert (tmp_path / "peft" / "adapter_config.json").is_file()
    else:
        peftlab.save(model, tmp_path / "peft", format="peft")
        fresh = torch.nn.Sequential(torch.nn.Linear(6, 5))
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "adapters" not in k})
        old_call(fresh, tmp_path / "peft")
        x = torch.randn(3, 6)
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftlab.adapter_configs(model)  # the new name does not warn
