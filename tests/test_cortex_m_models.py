"""Cortex-M for real small models, in QEMU on mps2-an500 (Cortex-M7).

A tiny Hugging Face GPT-2 (token ids in, logits and the key/value cache out), the same
without cache (a constant ``cumsum`` of position ids folded at build time), torchvision's
MobileNetV3-small, and a model of three inputs (float32, int64 ids, an int32 mask whose
``cumsum`` runs on the board) and four outputs (one of them an input returned as is):
parity with the rewritten graph (scaled error <= 1e-4, integers exact), the entry point's
documented signature, bad inputs, ids out of range (given, and computed on the board),
save/load and the exported C project. Skipped without the Arm toolchain and QEMU.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import tbn_compiler as tbn
from tbn_compiler.backends.cortex_m import KernelError, ToolchainError, toolchain
from tbn_compiler.backends.protocol import InputError

try:
    toolchain.require_toolchain(qemu=True)
    _MISSING = None
except ToolchainError as exc:
    _MISSING = str(exc)

pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"Arm toolchain: {_MISSING}")

BOARD = "mps2-an500"
ROOT = Path(__file__).resolve().parent.parent


def scaled_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (floats), computed in float64."""
    g, r = got.double(), ref.double()
    return float((g - r).abs().max()) / max(float(r.abs().max()), 1e-12)


def assert_parity(got: object, ref: object) -> None:
    """Same output structure; every float tensor within 1e-4 scaled error of the
    reference, every integer tensor equal, same shapes and dtypes."""
    leaves = torch.utils._pytree.tree_leaves
    got_leaves, ref_leaves = leaves(got), leaves(ref)
    assert len(got_leaves) == len(ref_leaves)
    for g, r in zip(got_leaves, ref_leaves, strict=True):
        assert isinstance(g, torch.Tensor) and g.shape == r.shape and g.dtype == r.dtype
        if r.dtype.is_floating_point:
            assert scaled_error(g, r) <= 1e-4, scaled_error(g, r)
        else:
            assert torch.equal(g, r)


def _header(cm: object) -> str:
    return cm.sources["include/tbn_model.h"]


# --------------------------------------------------------------------------- GPT-2


def _gpt2(use_cache: bool | None = None) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    extra = {} if use_cache is None else {"use_cache": use_cache}
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=500, n_positions=64, **extra
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2():
    """GPT2LMHeadModel with its default config (use_cache on), compiled once."""
    model = _gpt2()
    ids = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(1))
    gm = tbn.rewrite(model, (ids,))
    cm = tbn.compile(model, (ids,), target=BOARD)
    yield gm, cm, ids
    cm.close()


def test_gpt2_token_ids_in_logits_and_cache_out(gpt2) -> None:
    gm, cm, ids = gpt2
    assert cm.validation.status == "passed"
    assert [(s.dtype, s.shape) for s in cm.input_specs] == [("int64", (1, 8))]
    with torch.no_grad():
        ref = gm(ids)
    out = cm(ids)
    assert type(out) is type(ref)
    assert out.logits.shape == (1, 8, 500)
    cache = out.past_key_values
    assert type(cache) is type(ref.past_key_values) and len(cache.layers) == 2
    assert cache.layers[1].keys.shape == (1, 2, 8, 16)
    assert_parity(out, ref)
    assert cm.last_run["instructions"] > 0
    fresh = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_parity(cm(fresh), gm(fresh))


def test_gpt2_entry_point_signature_and_memory(gpt2) -> None:
    _, cm, _ = gpt2
    header = _header(cm)
    outs = ", ".join(f"float *output{k}" for k in range(5))
    assert f"int tbn_model_run(const int64_t *input, {outs});" in header
    for line in (
        "#define TBN_NUM_INPUTS 1",
        "#define TBN_NUM_OUTPUTS 5",
        '#define TBN_INPUT0_NAME "input_ids"',
        "#define TBN_INPUT0_TYPE int64_t",
        "#define TBN_INPUT0_SHAPE {1, 8}",
        "#define TBN_OUTPUT0_SHAPE {1, 8, 500}",
        "#define TBN_OUTPUT4_BYTES 1024",
    ):
        assert line in header
    mem = cm.memory
    assert mem["weights_bytes"] < mem["flash_bytes"] <= mem["board_flash_bytes"]
    assert mem["arena_bytes"] <= mem["ram_bytes"] <= mem["board_ram_bytes"]


def test_gpt2_bad_inputs(gpt2) -> None:
    _, cm, ids = gpt2
    cm.last_run = None
    bad = ids.clone()
    bad[0, 3] = 500
    with pytest.raises(IndexError, match=r"every id must be in \[0, 499\]"):
        cm(bad)
    bad[0, 3] = -1
    with pytest.raises(IndexError, match=r"every id must be in \[0, 499\]"):
        cm(bad)
    assert cm.last_run is None  # refused before any run
    with pytest.raises(InputError, match=r"input 'input_ids': expected dtype int64, got int32"):
        cm(ids.int())
    with pytest.raises(InputError, match=r"input 'input_ids': expected shape \(1, 8\)"):
        cm(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(InputError, match=r"expected 1 input"):
        cm(ids, ids)


def test_gpt2_without_cache_folds_the_constant_cumsum() -> None:
    """use_cache=False: Hugging Face's mask code takes a ``cumsum`` of the (constant)
    position ids; it is computed at build time, and no kernel of the program scans."""
    from tbn_compiler.backends.cortex_m import generate_sources
    from tbn_compiler.backends.relax_import import import_graph

    model = _gpt2(use_cache=False)
    ids = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(3))
    gm = tbn.rewrite(model, (ids,))
    imported = import_graph(gm, [ids])
    assert "R.cumsum" in str(imported.mod["main"])  # what there is to fold
    program = generate_sources(imported.mod, "gpt2")
    assert not any("cumsum" in step.func for step in program.plan.steps)
    cm = tbn.compile(model, (ids,), target=BOARD)
    try:
        with torch.no_grad():
            ref = gm(ids)
        assert_parity(cm(ids), ref)
    finally:
        cm.close()


class _Padded(nn.Module):
    """GPT-2 called as for a padded batch: ids and an attention mask in, logits out."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, attention_mask=mask, use_cache=False).logits


def test_gpt2_with_a_left_padding_mask() -> None:
    """Two int64 inputs; the first rows attend nowhere (torch gives them zeros)."""
    model = _Padded(_gpt2())
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 500, (1, 8), generator=gen)
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, :3] = 0
    gm = tbn.rewrite(model, (ids, mask))
    cm = tbn.compile(model, (ids, mask), target=BOARD)
    try:
        assert "const int64_t *input0, const int64_t *input1, float *output" in _header(cm)
        for m in (mask, torch.ones_like(mask)):
            with torch.no_grad():
                assert_parity(cm(ids, m), gm(ids, m))
    finally:
        cm.close()


# --------------------------------------------------------------------------- MobileNetV3


def test_mobilenet_v3_small_in_qemu() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import zoo

    try:
        models = zoo.import_torchvision_models()
    except zoo.LibraryMissing as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    model = models.mobilenet_v3_small(width_mult=0.25, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = tbn.rewrite(model, (x,))
    cm = tbn.compile(model, (x,), target=BOARD)
    try:
        assert cm.report.totals["tiled"] > 0
        with torch.no_grad():
            assert_parity(cm(x), gm(x))
            fresh = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
            assert_parity(cm(fresh), gm(fresh))
        assert "int tbn_model_run(const float *input, float *output);" in _header(cm)
        mem = cm.memory
        assert mem["flash_bytes"] <= mem["board_flash_bytes"]
        assert mem["ram_bytes"] <= mem["board_ram_bytes"]
    finally:
        cm.close()


# --------------------------------------------------------------------------- several inputs


class Tokens(nn.Module):
    """Three inputs (float32 features, int64 token ids, an int32 mask whose running sum,
    in int64 as torch sums it, gives the position ids, computed on the board) and four outputs in a dict: logits,
    hidden states, an int64 count and the features returned as they came."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(40, 16)
        self.pos = nn.Embedding(8, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        positions = (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 1)
        h = torch.relu(self.fc(self.tok(ids) + self.pos(positions) + x))
        return {"logits": self.head(h), "hidden": h, "count": mask.sum(-1), "x": x}


def _tokens_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 6, 16, generator=gen)
    ids = torch.randint(0, 40, (1, 6), generator=gen)
    mask = torch.randint(0, 2, (1, 6), generator=gen, dtype=torch.int32)
    mask[0, 0] = 1
    return x, ids, mask


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(0)
    model = Tokens().eval()
    inputs = _tokens_inputs(5)
    cfg = tbn.TBNConfig(p=4, min_numel=0)
    gm = tbn.rewrite(model, inputs, cfg)
    cm = tbn.compile(model, inputs, target=BOARD, config=cfg)
    yield gm, cm, inputs
    cm.close()


def test_several_inputs_and_outputs(tokens) -> None:
    gm, cm, inputs = tokens
    assert cm.validation.status == "passed"
    assert [s.dtype for s in cm.input_specs] == ["float32", "int64", "int32"]
    for seed in (5, 6):
        xs = _tokens_inputs(seed)
        with torch.no_grad():
            ref = gm(*xs)
        out = cm(*xs)
        assert list(out) == ["logits", "hidden", "count", "x"]
        assert_parity(out, ref)
        assert torch.equal(out["count"], xs[2].sum(-1))  # independent of the graph
        assert torch.equal(out["x"], xs[0])


def test_several_inputs_signature(tokens) -> None:
    _, cm, _ = tokens
    header = _header(cm)
    assert (
        "int tbn_model_run(const float *input0, const int64_t *input1, const int32_t *input2, "
        "float *output0, float *output1, int64_t *output2, float *output3);"
    ) in header
    assert "#define TBN_INPUT2_TYPE int32_t" in header
    assert "#define TBN_OUTPUT2_BYTES 8" in header
    assert "TBN_INPUT_SIZE" not in header  # the unnumbered names only for one input
    source = cm.sources["src/tbn_model.c"]
    assert re.search(r"memcpy\(output3, input0, 384\);", source)  # x returned as is
    assert "cumsum" in " ".join(row["func"] for row in cm.info.steps)  # on the board


def test_several_inputs_bad_inputs(tokens) -> None:
    _, cm, inputs = tokens
    x, ids, mask = inputs
    with pytest.raises(InputError, match=r"expected 3 input\(s\) \(x, ids, mask\), got 2"):
        cm(x, ids)
    with pytest.raises(InputError, match=r"input 'mask': expected dtype int32, got int64"):
        cm(x, ids, mask.long())
    with pytest.raises(InputError, match=r"input 'x': expected dtype float32, got float64"):
        cm(x.double(), ids, mask)
    with pytest.raises(InputError, match=r"input 'ids': expected shape \(1, 6\)"):
        cm(x, ids[:, :5], mask)
    with pytest.raises(InputError, match=r"input 'ids': expected a torch.Tensor, got list"):
        cm(x, ids.tolist(), mask)
    bad = ids.clone()
    bad[0, 2] = 40
    with pytest.raises(IndexError, match=r"has 40 rows, every id must be in \[0, 39\]"):
        cm(x, bad, mask)
    # position ids computed on the board from the mask: out of the 8 rows, the kernel
    # stops the run and the error names the step
    stopped = r"stopped at step \d+: .* layer 'pos'.* has 8 rows, every id must be in \[0, 7\]"
    with pytest.raises(KernelError, match=stopped):
        cm(x, ids, torch.full_like(mask, 3))


def test_several_inputs_save_load_and_export(tokens, tmp_path) -> None:
    _, cm, inputs = tokens
    out = cm(*inputs)
    loaded = tbn.load(cm.save(tmp_path / "tokens.tbn"))
    try:
        assert loaded.input_specs == cm.input_specs and loaded.output_specs == cm.output_specs
        again = loaded(*inputs)
        assert list(again) == list(out)
        assert all(torch.equal(again[k], out[k]) for k in out)  # the same program, bit-exact
        bad = inputs[1].clone()
        bad[0, 0] = -3
        with pytest.raises(IndexError, match=r"every id must be in \[0, 39\]"):
            loaded(inputs[0], bad, inputs[2])
    finally:
        loaded.close()
    # the exported project builds and runs on its own (no input.bin: zero inputs)
    project = cm.export(tmp_path / "project")
    run = subprocess.run(
        ["make", "-s", "run"], cwd=project, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    words = [line for line in run.stdout.splitlines() if line.startswith("TBN_OUT ")]
    # logits 24 floats, hidden 96, count one int64 (2 words), x 96 floats
    assert len(words) == 24 + 96 + 2 + 96
    assert "TBN_RC 0" in run.stdout


class TiedHead(nn.Module):
    """A token embedding whose table is also the output layer (as in GPT-2's LM head)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def test_a_table_shared_by_embedding_and_head_is_stored_once() -> None:
    """The head reads the embedding's table as stored; flash holds it once (the
    transposed copy a folded ``permute_dims`` made doubled it)."""
    torch.manual_seed(0)
    model, ids = TiedHead().eval(), torch.randint(0, 50, (1, 6))
    dense = tbn.TBNConfig(exclude=["*"])
    cm = tbn.compile(model, (ids,), target=BOARD, config=dense)
    table, mix = model.emb.weight, model.mix
    expected = 4 * (table.numel() + mix.weight.numel() + mix.bias.numel())
    assert cm.memory["weights_bytes"] == expected
    with torch.no_grad():
        assert_parity(cm(ids), model(ids))
