"""fp8.backend=te (triton_kernels/te_backend.py): selection and every refusal on CPU, with a stub
``transformer_engine`` that records what dsv3 asks of it (TE does not install on these machines; the real
numerics run in launch/gpu_check.sh where TE is present)."""
import contextlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import load_config
from dsv3.errors import UserError
from dsv3.model.transformer import Transformer
from dsv3.training.precision import apply_fp8
from tests.conftest import config_path


def _stub_te(log):
    te = types.ModuleType("transformer_engine")
    pt = types.ModuleType("transformer_engine.pytorch")
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")

    class Float8BlockScaling:
        pass

    class Linear(nn.Module):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__()
            assert bias is False
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
            log.append(("Linear", in_features, out_features))

        def forward(self, x):
            assert log[-1][0] == "autocast" and isinstance(log[-1][1], Float8BlockScaling)
            return F.linear(x, self.weight)

    @contextlib.contextmanager
    def fp8_autocast(enabled=False, fp8_recipe=None):
        log.append(("autocast", fp8_recipe))
        yield

    pt.Linear, pt.fp8_autocast, recipe.Float8BlockScaling = Linear, fp8_autocast, Float8BlockScaling
    te.pytorch, te.common, common.recipe = pt, common, recipe
    return {"transformer_engine": te, "transformer_engine.pytorch": pt, "transformer_engine.common": common,
            "transformer_engine.common.recipe": recipe}


def _model_and_cfg(*ov):
    cfg = load_config(config_path("debug.yaml"), ["fp8.enabled=true", "fp8.backend=te", *ov])
    return Transformer(cfg.model, seed=0), cfg


def _hopper(monkeypatch, cap=(9, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)


def test_missing_te_is_one_line(monkeypatch):
    for k in [k for k in sys.modules if k.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, k)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)   # import fails as when not installed
    model, cfg = _model_and_cfg()
    with pytest.raises(UserError, match=r"Transformer Engine 2.x .*pip install") as e:
        apply_fp8(model, cfg.fp8, torch.device("cuda", 0))
    assert "\n" not in str(e.value)


def test_refusals_cpu_old_gpu_and_caches(monkeypatch):
    log = []
    for k, v in _stub_te(log).items():
        monkeypatch.setitem(sys.modules, k, v)
    model, cfg = _model_and_cfg()
    with pytest.raises(UserError, match="CUDA only"):
        apply_fp8(model, cfg.fp8, torch.device("cpu"))
    _hopper(monkeypatch, (8, 9))
    with pytest.raises(UserError, match=r"compute capability >= 9.0 .* 8.9"):
        apply_fp8(model, cfg.fp8, torch.device("cuda", 0))
    _hopper(monkeypatch)
    with pytest.raises(UserError, match="fp8.cache_wo_e5m6=false fp8.cache_swiglu_fp8=false"):
        apply_fp8(model, cfg.fp8, torch.device("cuda", 0))
    assert log == []   # nothing was built before the refusal


def test_te_runs_every_non_exempt_linear_on_the_models_own_weight(monkeypatch):
    log = []
    for k, v in _stub_te(log).items():
        monkeypatch.setitem(sys.modules, k, v)
    _hopper(monkeypatch)
    model, cfg = _model_and_cfg("fp8.cache_wo_e5m6=false", "fp8.cache_swiglu_fp8=false")
    ref_model, _ = _model_and_cfg()
    counts = apply_fp8(model, cfg.fp8, torch.device("cuda", 0))
    ref = apply_fp8(ref_model, load_config(config_path("debug.yaml"), ["fp8.enabled=true"]).fp8)
    assert counts == ref   # the same precision policy as every backend: same layers FP8, same exempt
    lin = model.layers[0].attn.wq_a
    x = torch.randn(3, 5, lin.weight.shape[1], requires_grad=True)
    y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight))
    assert log[0] == ("Linear", lin.weight.shape[1], lin.weight.shape[0]) and log[1][0] == "autocast"
    y.sum().backward()
    assert lin.weight.grad is not None   # gradients land on the model's Parameter (optimizer, ZeRO, checkpoints)
    import copy
    twin = copy.deepcopy(lin)            # a pipeline copy builds its own TE module around its own weight
    twin(x)
    assert twin.impl.module.weight is twin.weight and lin.impl.module.weight is lin.weight
