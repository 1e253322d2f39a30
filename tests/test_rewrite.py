"""rewrite/prepare/capture against plain PyTorch with the numpy reconstruction."""

import copy

import pytest
import torch
import torch.nn as nn
from models import DataDependent, zoo
from reference import reference_model

import tbn_compiler as tbn
from tbn_compiler import ops

# Every weight a test model uses through a linear/conv, listed by hand.
ELIGIBLE = {
    "mlp": ["layers.0.weight", "layers.1.weight", "layers.2.weight"],
    "cnn": ["stem.weight", "conv1.weight", "conv2.weight", "down.weight", "fc.weight"],
    "grouped": ["dw.weight", "pw.weight", "grouped.weight", "head.weight"],
    "conv1d": ["c1.weight", "c2.weight", "c3.weight", "fc.weight"],
    "transformer": [
        f"layers.{i}.{n}"
        for i in range(2)
        for n in (
            "self_attn.in_proj_weight",
            "self_attn.out_proj.weight",
            "linear1.weight",
            "linear2.weight",
        )
    ],
    "functional": ["w1", "kernel", "w2"],
    "tied": ["shared.weight", "enc.weight"],
    "gpt2": ["c_attn.weight", "c_proj.weight", "c_fc.weight", "c_out.weight"],
}
ZOO = zoo()


def _expected_tiled(model, names, p):
    params = dict(model.named_parameters(remove_duplicate=False))
    return {n: p for n in names if params[n].numel() % p == 0}


def _tile_ops(gm):
    return [n for n in gm.graph.nodes if ops.tile_op_name(n.target)]


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("p", [2, 4, 3])
def test_float_model_matches_reconstruction(name, p):
    model, x = ZOO[name]
    before = copy.deepcopy(model.state_dict())
    gm = tbn.rewrite(model, x, tbn.TBNConfig(p=p, min_numel=0))
    expected = _expected_tiled(model, ELIGIBLE[name], p)
    ref = reference_model(model, expected)
    torch.testing.assert_close(gm(*x), ref(*x), rtol=1e-5, atol=1e-5)
    # the user's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # float weights of tiled layers are gone; tiles and alphas are there
    report = tbn.inspect(gm).to_dict()
    tiled = {r["name"] for r in report["layers"] if r["status"] == "tiled"}
    skipped = {r["name"] for r in report["layers"] if r["status"] == "skipped"}
    keys = set(gm.state_dict())
    params = dict(model.named_parameters(remove_duplicate=False))
    for pname in expected:
        assert pname not in keys, f"{pname} still in state_dict"
    n_tiled = len({id(params[n]) for n in expected})
    assert len(tiled) == n_tiled
    assert len(skipped) == len({id(params[n]) for n in ELIGIBLE[name]}) - n_tiled
    assert sum(1 for k in keys if k.endswith("tile")) == len(tiled)
    # no float weight tensor of a tiled layer survives anywhere in the module
    for pname in expected:
        shape = params[pname].shape
        assert not any(
            v.shape == shape and torch.equal(v, params[pname].detach())
            for v in gm.state_dict().values()
        )


def test_unaligned_layers_are_covered():
    # p=4 leaves fc (10x32) of the MLP unaligned; p=2 leaves conv1d's fc (3x8) unaligned
    for name, p, layer in [("mlp", 4, "layers.2"), ("conv1d", 2, "fc")]:
        model, x = ZOO[name]
        rows = tbn.inspect(tbn.rewrite(model, x, tbn.TBNConfig(p=p, min_numel=0))).to_dict()[
            "layers"
        ]
        assert next(r for r in rows if r["name"] == layer)["aligned"] is False


def _train_a_little(model, x, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out = model(*x)
        out = out[0] if isinstance(out, tuple) else out
        (out.square().mean()).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", list(ZOO))
def test_prepared_model_rewrite_equals_eval(name):
    model, x = ZOO[name]
    cfg = tbn.TBNConfig(p=2, min_numel=300)
    qat = _train_a_little(tbn.prepare(model, cfg), x)
    gm = tbn.rewrite(qat, x, cfg)
    torch.testing.assert_close(gm(*x), qat.eval()(*x), rtol=1e-5, atol=1e-5)
    tiled_modules = [
        m
        for m in qat.modules()
        if isinstance(m, (tbn.TiledLinear, tbn.TiledConv1d, tbn.TiledConv2d))
    ]
    rows = tbn.inspect(gm).to_dict()["layers"]
    tiled_rows = [r for r in rows if r["status"] == "tiled"]
    assert len(tiled_rows) == len({id(m.scores) for m in tiled_modules})
    assert {r["p"] for r in tiled_rows} <= {1, 2}
    # weights used outside Linear/Conv modules (functional, GPT-2 Conv1D) stay float
    for r in rows:
        if r["status"] == "skipped":
            assert "prepare" in r["reason"]


def test_prepared_dense_layers_stay_dense_whatever_rewrite_config():
    model, x = ZOO["mlp"]
    qat = tbn.prepare(model, tbn.TBNConfig(p=2, min_numel=0, exclude=["layers.2"]))
    gm = tbn.rewrite(qat, x)  # default config would tile layers.2 at p=1
    rows = {r["name"]: r for r in tbn.inspect(gm).to_dict()["layers"]}
    assert rows["layers.2"]["status"] == "skipped" and "excluded" in rows["layers.2"]["reason"]
    torch.testing.assert_close(gm(*x), qat.eval()(*x), rtol=1e-5, atol=1e-5)


def test_rewritten_graph_runs_other_batch_sizes():
    model, x = ZOO["cnn"]
    gm = tbn.rewrite(model, x, tbn.TBNConfig(p=2, min_numel=0))
    x5 = torch.randn(5, *x[0].shape[1:])
    ref = reference_model(model, _expected_tiled(model, ELIGIBLE["cnn"], 2))
    torch.testing.assert_close(gm(x5), ref(x5), rtol=1e-5, atol=1e-5)


def test_rewritten_graph_reexports():
    model, x = ZOO["gpt2"]
    gm = tbn.rewrite(model, x, tbn.TBNConfig(p=2, min_numel=0))
    ep = torch.export.export(gm, x)
    n = sum(1 for node in ep.graph.nodes if ops.tile_op_name(node.target))
    assert n == 4


def test_tied_weights_are_tiled_once():
    model, x = ZOO["tied"]
    gm = tbn.rewrite(model, x, tbn.TBNConfig(p=2, min_numel=0))
    tiles = {n.args[1].target for n in _tile_ops(gm)}
    assert len(_tile_ops(gm)) == 4 and len(tiles) == 2


def test_weight_shared_with_embedding_is_kept_dense():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.head = nn.Linear(16, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    model = TiedLM().eval()
    ids = torch.randint(0, 20, (2, 5))
    gm = tbn.rewrite(model, ids, tbn.TBNConfig(p=2, min_numel=0))
    rows = tbn.inspect(gm).to_dict()["layers"]
    assert rows[0]["status"] == "skipped" and "not a linear/conv" in rows[0]["reason"]
    torch.testing.assert_close(gm(ids), model(ids))


def test_config_rules_in_rewrite():
    model, x = ZOO["mlp"]
    cfg = tbn.TBNConfig(p=4, min_numel=5000, layers={"layers.1": 8}, keep_last=True)
    rows = {r["name"]: r for r in tbn.inspect(tbn.rewrite(model, x, cfg)).to_dict()["layers"]}
    assert rows["layers.0"]["p"] == 4  # 8192 weights >= min_numel
    assert rows["layers.1"]["p"] == 8  # explicit rule
    assert rows["layers.2"]["status"] == "skipped" and "keep_last" in rows["layers.2"]["reason"]
    cfg = tbn.TBNConfig(p=4, min_numel=10_000, keep_first=True)
    rows = {r["name"]: r for r in tbn.inspect(tbn.rewrite(model, x, cfg)).to_dict()["layers"]}
    assert rows["layers.0"]["status"] == "skipped"
    assert rows["layers.1"]["p"] == 1 and rows["layers.2"]["p"] == 1  # below min_numel: binary


def test_strict_mode_raises_on_indivisible_layer():
    model, x = ZOO["mlp"]
    with pytest.raises(ValueError, match=r"layers.0.*8192 weights not divisible by p=3"):
        tbn.rewrite(model, x, tbn.TBNConfig(p=3, min_numel=0, strict=True))
    with pytest.raises(ValueError, match="match no eligible layer"):
        tbn.rewrite(model, x, tbn.TBNConfig(p=2, min_numel=0, strict=True, exclude=["nope.*"]))


def test_capture_data_dependent_control_flow_error():
    model = DataDependent().eval()
    with pytest.raises(tbn.CaptureError) as info:
        tbn.capture(model, (torch.randn(2, 4),))
    msg = str(info.value)
    assert "torch.export failed" in msg and "symbolic_trace failed" in msg
    assert "What you can do" in msg


def test_capture_falls_back_to_symbolic_trace(monkeypatch):
    model, x = ZOO["mlp"]

    def broken_export(*args, **kwargs):
        raise RuntimeError("export unavailable")

    monkeypatch.setattr(torch.export, "export", broken_export)
    gm = tbn.rewrite(model, x, tbn.TBNConfig(p=2, min_numel=0))
    assert gm.meta["tbn_capture"] == "symbolic_trace"
    ref = reference_model(model, _expected_tiled(model, ELIGIBLE["mlp"], 2))
    torch.testing.assert_close(gm(*x), ref(*x), rtol=1e-5, atol=1e-5)


def test_symbolic_trace_fallback_handles_functional_and_addmm(monkeypatch):
    monkeypatch.setattr(
        torch.export, "export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x"))
    )
    for name in ("functional", "gpt2", "conv1d"):
        model, x = ZOO[name]
        gm = tbn.rewrite(model, x, tbn.TBNConfig(p=2, min_numel=0))
        ref = reference_model(model, _expected_tiled(model, ELIGIBLE[name], 2))
        torch.testing.assert_close(gm(*x), ref(*x), rtol=1e-5, atol=1e-5)
        assert len(_tile_ops(gm)) == len(ELIGIBLE[name])


def test_huggingface_gpt2_from_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=50, use_cache=False
    )
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 50, (2, 8))
    with pytest.raises(Exception):  # noqa: B017 - plain symbolic_trace cannot handle it
        torch.fx.symbolic_trace(model)
    gm = tbn.rewrite(model, (ids,), tbn.TBNConfig(p=2, min_numel=0))
    names = [
        f"h.{i}.{n}.weight"
        for i in range(2)
        for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    ref = reference_model(model, {n: 2 for n in names})
    out, expected = gm(ids), ref(ids)
    torch.testing.assert_close(
        out["last_hidden_state"], expected.last_hidden_state, rtol=1e-4, atol=1e-4
    )
    assert len(_tile_ops(gm)) == 8


def test_huggingface_bert_from_config_float_and_prepared():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=60,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 60, (2, 8))
    cfg = tbn.TBNConfig(p=2, min_numel=0)
    gm = tbn.rewrite(model, (ids,), cfg)
    linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ref = reference_model(model, {n: 2 for n in linears})
    torch.testing.assert_close(
        gm(ids)["last_hidden_state"], ref(ids).last_hidden_state, rtol=1e-4, atol=1e-4
    )
    assert len(_tile_ops(gm)) == len(linears) == 13
    qat = tbn.prepare(model, cfg).eval()
    gq = tbn.rewrite(qat, (ids,), cfg)
    torch.testing.assert_close(
        gq(ids)["last_hidden_state"], qat(ids).last_hidden_state, rtol=1e-5, atol=1e-5
    )
