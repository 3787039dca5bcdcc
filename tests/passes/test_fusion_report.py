"""The fusion report names the layer where an expected fusion did not fire and why."""
import amxc.ir as ir
from amxc.passes import REGISTRY
from amxc.passes.report import fusion_report, kinds, layer_of

SOURCE = """module @m attributes {num_layers = 2, family = "gpt2"} {
  param @bias : f32[1, 1, 6, 6]
  func @forward(%q: f32[1, 2, 6, 4], %k: f32[1, 2, 6, 4], %v: f32[1, 2, 6, 4]) -> (f32[1, 2, 6, 4]) {
    %a = sdpa(%q, %k, %v) {causal = true} : f32[1, 2, 6, 4] loc("model.layers.0.self_attn (m.py:1)")
    %y = sdpa(%a, %k, %v, @bias) : f32[1, 2, 6, 4] loc("model.layers.1.self_attn (m.py:1)")
    return %y
  }
}"""


def test_missing_fusion_is_reported_with_its_reason():
    module = ir.parse_module(SOURCE)
    p = REGISTRY.get("fuse-attention")()
    p.run(module)
    report = fusion_report(module, [p])
    assert report.counts["attention"] == {0: 1}
    (warning,) = [w for w in report.warnings() if "'attention'" in w]
    assert "layer(s) 1 of 2" in warning and "mask depends on model weights" in warning
    assert "attention    1/2 layers" in report.render()


def test_layer_of_reads_module_paths():
    assert layer_of("model.layers.12.mlp (modeling_llama.py:3)") == 12
    assert layer_of("transformer.h.3.attn (modeling_gpt2.py:9)") == 3
    assert layer_of("model.norm (x.py:1)") is None


def test_kinds_come_from_the_ops():
    """Which op counts as which fusion is the op's `kind` in the registry, listed in layer order;
    attention_cached names its layer in an attribute rather than in its location."""
    assert kinds() == ("attention", "norm", "rope", "mlp", "lf")
    module = ir.parse_module("""module @m attributes {num_layers = 2} {
  param @w : f32[4]
  func @forward(%x: f32[1, 3, 4]) -> (f32[1, 3, 4]) {
    %a = rms_norm(%x, @w) {eps = 1e-05} : f32[1, 3, 4] loc("model.layers.0.input_layernorm (m.py:1)")
    %b = layer_norm(%a, @w) : f32[1, 3, 4] loc("model.layers.1.input_layernorm (m.py:1)")
    return %b
  }
}""")
    report = fusion_report(module)
    assert report.expected == ("attention", "norm", "rope", "mlp")
    assert report.counts == {"norm": {0: 1, 1: 1}} and report.layers_with("norm") == 2
