"""torch.nn.Module and .pt2 imports, and the error for an op amxc cannot convert."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.export import Dim

import amxc.ir as ir
from amxc.frontend.errors import FrontendError, UnsupportedOpError
from amxc.frontend.torch_module import import_module, import_pt2
from support.checks import check_roundtrip


class Block(torch.nn.Module):
    """A pre-norm block with GELU MLP and softmax attention written out by hand."""

    def __init__(self, d=16):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.qkv(h).split(h.shape[-1], dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        x = x + att @ v
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_module_with_dynamic_dims_matches_eager():
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(2, 5, 16)
    module = import_module(block, (x,), dynamic_shapes={"x": {0: Dim("batch"), 1: Dim("seq", min=2)}})
    ir.verify(module)
    check_roundtrip(module)
    assert str(module.main.args[0].type) == "f32[batch, seq, 16]"
    x2 = torch.randn(3, 7, 16)          # other sizes than traced
    ours = ir.run(module, [x2.numpy()])[0]
    with torch.no_grad():
        ref = block(x2).numpy()
    assert np.abs(ours - ref).max() <= 1e-5


def test_pt2_file_roundtrip(tmp_path):
    torch.manual_seed(1)
    block = Block()
    x = torch.randn(1, 4, 16)
    ep = torch.export.export(block.eval(), (x,))
    torch.export.save(ep, tmp_path / "block.pt2")
    module = import_pt2(tmp_path / "block.pt2")
    ours = ir.run(module, [x.numpy()])[0]
    with torch.no_grad():
        assert np.abs(ours - block(x).numpy()).max() <= 1e-5


def test_bad_pt2_is_named(tmp_path):
    bad = tmp_path / "broken.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(FrontendError, match="broken.pt2"):
        import_pt2(bad)


class UsesCummax(torch.nn.Module):
    def forward(self, x):
        return torch.cummax(x, dim=-1).values * 2


def test_unsupported_op_names_op_line_and_model():
    with pytest.raises(UnsupportedOpError) as e:
        import_module(UsesCummax(), (torch.randn(2, 3),), name="cummax-model")
    msg = str(e.value)
    assert "aten.cummax" in msg and "cummax-model" in msg
    assert "test_torch_module.py:" in msg       # the model source line that called it
