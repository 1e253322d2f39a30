"""Every compiled module kind follows one protocol (backends.protocol)."""

import shutil

import pytest
import torch
import torch.nn as nn

import tbn_compiler as tbn

pytest.importorskip("tvm")
from tbn_compiler.backends.protocol import CompiledProgram, InputError, backend_for  # noqa: E402

TARGETS = ["llvm", "mps2-an386"]


@pytest.mark.parametrize("target", TARGETS)
def test_compiled_modules_share_one_protocol(target, tmp_path):
    if target != "llvm" and shutil.which("arm-none-eabi-gcc") is None:
        pytest.skip("arm-none-eabi-gcc not found")
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 16), nn.ReLU()).eval(), torch.randn(2, 16)
    cfg = tbn.TBNConfig(p=4, min_numel=0)
    cm = tbn.compile(model, x, target=target, config=cfg)
    assert isinstance(cm, CompiledProgram)
    assert cm.target.kind == backend_for(cm.target.kind).kind
    assert [s.shape for s in cm.input_specs] == [(2, 16)]
    assert [s.shape for s in cm.output_specs] == [(2, 16)]
    want = tbn.rewrite(model, x, cfg)(x)
    torch.testing.assert_close(cm(x), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError):
        cm(torch.randn(2, 17))
    loaded = tbn.load(cm.save(tmp_path / "m.tbn"))
    assert type(loaded) is type(cm) and isinstance(loaded, CompiledProgram)
    torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-5)
