"""Hugging Face models built from configs with their DEFAULT flags compile with parity.

Small sizes (one or two layers, hidden size 32-64, a vocabulary of 500), but every flag
left as the library sets it: decoders keep ``use_cache=True`` (they return a
``DynamicCache`` of keys and values), attention implementations and ``return_dict`` are
the defaults. One compile per family on the host CPU. Each output leaf (``DynamicCache``
tensors included) is checked against the torch model itself, in eval mode: dense builds
against the float model, tiled builds against the tiled weights put back into the model
(the rewritten graph, which runs in torch).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import tbn_compiler as tbn

transformers = pytest.importorskip("transformers")

VOCAB = 500
DENSE = tbn.TBNConfig(exclude=["*"])
TILED = tbn.TBNConfig(p=4, min_numel=0)


def _ids(length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))


def _decoder_sizes() -> dict:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
    }


def _special_ids() -> dict[str, int]:
    """bos/eos ids inside the small vocabulary (the defaults, 50256 and 32000, lie outside
    it and transformers logs a line for each); they do not change the forward pass."""
    return {"bos_token_id": 1, "eos_token_id": 2}


def gpt2(lm_head: bool) -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, **_special_ids()
    )
    cls = transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model
    return cls(cfg), (_ids(),)


def llama() -> tuple[torch.nn.Module, tuple]:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_decoder_sizes())), (_ids(),)


def qwen2() -> tuple[torch.nn.Module, tuple]:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_decoder_sizes())), (_ids(),)


def mistral() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.MistralConfig(**_decoder_sizes())
    return transformers.MistralForCausalLM(cfg), (_ids(),)


def phi3() -> tuple[torch.nn.Module, tuple]:
    # the default pad id (32000) must lie inside this small vocabulary
    cfg = transformers.Phi3Config(**_decoder_sizes(), pad_token_id=0, **_special_ids())
    return transformers.Phi3ForCausalLM(cfg), (_ids(),)


def bert() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg), (_ids(),)


def distilbert() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.DistilBertConfig(
        dim=32, hidden_dim=64, n_layers=2, n_heads=2, vocab_size=VOCAB, max_position_embeddings=64
    )
    return transformers.DistilBertModel(cfg), (_ids(),)


def t5_encoder() -> tuple[torch.nn.Module, tuple]:
    """The T5 encoder whose attention (SDPA with ``scale=1``) was 25% off once."""
    cfg = transformers.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=2, vocab_size=VOCAB)
    return transformers.T5EncoderModel(cfg), (_ids(),)


def whisper_encoder() -> tuple[torch.nn.Module, tuple]:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = transformers.WhisperConfig(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=16,
    )
    return WhisperEncoder(cfg), (torch.randn(1, 16, 32),)


def vit() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return transformers.ViTModel(cfg), (torch.randn(1, 3, 32, 32),)


def clip_vision() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return transformers.CLIPVisionModel(cfg), (torch.randn(1, 3, 32, 32),)


def wav2vec2() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    return transformers.Wav2Vec2Model(cfg), (torch.randn(1, 400),)


# family -> (model factory, config): tiled where the family has tiles worth checking
FAMILIES: dict[str, tuple[Callable[[], tuple], tbn.TBNConfig]] = {
    "gpt2": (lambda: gpt2(lm_head=False), DENSE),
    "gpt2-lm-head": (lambda: gpt2(lm_head=True), TILED),
    "llama": (llama, TILED),
    "qwen2": (qwen2, DENSE),
    "mistral": (mistral, TILED),
    "phi3": (phi3, DENSE),
    "bert": (bert, TILED),
    "distilbert": (distilbert, DENSE),
    "t5-encoder": (t5_encoder, DENSE),
    "whisper-encoder": (whisper_encoder, TILED),
    "vit": (vit, DENSE),
    "clip-vision": (clip_vision, TILED),
    "wav2vec2": (wav2vec2, DENSE),
}
DECODERS = {"gpt2", "gpt2-lm-head", "llama", "qwen2", "mistral", "phi3"}


SLOW = {"qwen2", "mistral", "phi3"}  # Llama's structure again: opt-in (pytest -m slow)


@functools.cache
def _compiled(family: str) -> tuple[torch.nn.Module, tuple, tbn.TBNConfig, torch.nn.Module, object]:
    """(model, inputs, config, rewritten graph, compiled module) of one family."""
    factory, cfg = FAMILIES[family]
    torch.manual_seed(0)
    model, inputs = factory()
    model = model.eval()
    gm = tbn.rewrite(model, inputs, cfg)
    return model, inputs, cfg, gm, tbn.compile_graph(gm, inputs)


def _leaves(value) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(value)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _assert_same_leaves(got, expected) -> None:
    got_leaves, expected_leaves = _leaves(got), _leaves(expected)
    assert len(got_leaves) == len(expected_leaves)
    for g, e in zip(got_leaves, expected_leaves, strict=True):
        scale = float(e.abs().max()) if e.numel() else 1.0
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES]
)
def test_default_config_compiles_with_parity(family: str) -> None:
    model, inputs, cfg, gm, cm = _compiled(family)
    assert cm.validation.status == "passed"
    with torch.no_grad():
        reference = model(*inputs) if cfg is DENSE else gm(*inputs)
        got = cm(*inputs)
    if cfg is not DENSE:  # the reference is then the tiled weights in torch
        assert any("tiled" in str(n.target) for n in gm.graph.nodes)
    assert type(got) is type(reference)
    assert list(got.keys()) == list(reference.keys())
    _assert_same_leaves(got, reference)
    if family in DECODERS:
        cache = got.past_key_values
        assert type(cache) is transformers.DynamicCache
        assert len(cache.layers) == len(reference.past_key_values.layers) == 2


def test_a_saved_decoder_returns_its_dynamic_cache_in_a_fresh_process(tmp_path: Path) -> None:
    model, inputs, _, _, cm = _compiled("gpt2")
    path = cm.save(tmp_path / "gpt2.tbn")
    torch.save(inputs[0], tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(*inputs)
    script = textwrap.dedent(
        f"""
        import json, torch, tbn_compiler as tbn
        out = tbn.load({str(path)!r})(torch.load({str(tmp_path / "ids.pt")!r}))
        cache = out.past_key_values
        torch.save([out.last_hidden_state, *(t for c in cache.layers for t in (c.keys, c.values))],
                   {str(tmp_path / "out.pt")!r})
        print(json.dumps([type(out).__name__, type(cache).__name__]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "default"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [
        "BaseModelOutputWithPastAndCrossAttentions",
        "DynamicCache",
    ]
    cache = expected.past_key_values
    want = [expected.last_hidden_state, *(t for c in cache.layers for t in (c.keys, c.values))]
    for g, e in zip(torch.load(tmp_path / "out.pt"), want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def _at_batch(inputs: tuple, batch: int, seed: int) -> tuple:
    """Fresh inputs like ``inputs`` with ``batch`` rows (ids stay in the vocabulary)."""
    gen = torch.Generator().manual_seed(seed)
    fresh = []
    for t in inputs:
        shape = (batch, *t.shape[1:])
        if t.dtype.is_floating_point:
            fresh.append(torch.randn(shape, generator=gen, dtype=t.dtype))
        else:
            fresh.append(torch.randint(0, VOCAB, shape, generator=gen, dtype=t.dtype))
    return tuple(fresh)


@pytest.mark.parametrize("family", ["bert", "clip-vision"])
def test_one_compile_runs_batches_1_3_17_and_keeps_them_after_load(family, tmp_path):
    _, inputs, _, gm, cm = _compiled(family)
    loaded = tbn.load(cm.save(tmp_path / f"{family}.tbn"))
    for batch in (1, 3, 17):
        fresh = _at_batch(inputs, batch, seed=batch)
        with torch.no_grad():
            expected = gm(*fresh)
        _assert_same_leaves(cm(*fresh), expected)
        _assert_same_leaves(loaded(*fresh), expected)
