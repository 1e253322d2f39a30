"""A plain compile + save + load + call writes nothing on stderr.

Run in a fresh Python process with the default warning filters, as a user's script runs:
a Hugging Face BERT (token ids in, attention with a boolean mask, ``select`` of the CLS
token) and a residual CNN (BatchNorm, many constants), each compiled for the host CPU
(validation included), saved, loaded back and called. Before, such a run printed torch's
pytree ``LeafSpec`` FutureWarning, TVM's "Fast mode segfaults when there are
out-of-bounds indices" (``select``), "Detected pow(x, y) where y >= 3" (GELU's ``x**3``)
and one "Scope Saving:" / "Scope Loaded:" line per constant of a module called before
it was saved.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers
    import tbn_compiler as tbn
    sys.path.insert(0, {tests!r})
    from models import ResidualCNN

    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=500, max_position_embeddings=64, hidden_act="gelu_new")).eval()
    ids = torch.randint(0, 500, (1, 8))
    cnn, image = ResidualCNN().eval(), torch.randn(1, 3, 16, 16)
    for name, model, x in (("bert", bert, ids), ("cnn", cnn, image)):
        cm = tbn.compile(model, (x,), config=tbn.TBNConfig(p=4, min_numel=0))
        cm(x)  # a call before saving: the saved module must not carry the VM's state
        loaded = tbn.load(cm.save({tmp!r} + "/" + name + ".tbn"))
        loaded(x)
    print("done")
    """
)


def run_script(script: str, timeout: int) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python process with the default warning filters, as a
    user's script runs; it must exit with 0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_compile_save_load_call_is_silent_on_stderr(tmp_path: Path) -> None:
    proc = run_script(SCRIPT.format(tests=str(TESTS), tmp=str(tmp_path)), timeout=600)
    assert proc.stdout.strip().endswith("done")
    assert proc.stderr == ""


FAILING_IMPORT = textwrap.dedent(
    """
    import gc, torch, torch.nn.functional as F
    import tbn_compiler as tbn

    class Dropped(torch.nn.Module):  # a converter refuses dropout_p > 0
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)

    try:
        tbn.compile(Dropped(), torch.randn(1, 2, 4, 8))
    except tbn.backends.relax_import.UnsupportedOpError as exc:
        print(type(exc).__name__)
    gc.collect()  # frees TVM's block builders: they used to print a warning then
    print("done")
    """
)


def test_failed_import_prints_only_its_error() -> None:
    """An import a converter refuses raises its error and leaves nothing on stderr (TVM's
    "BlockBuilder destroyed with remaining blocks!" came twice)."""
    proc = run_script(FAILING_IMPORT, timeout=300)
    assert proc.stdout.split() == ["UnsupportedOpError", "done"]
    assert proc.stderr == ""
