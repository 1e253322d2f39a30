"""Regression tests for the compiled host module: concurrent calls, saving, output
structure and bad models. References: the rewritten graph run in PyTorch."""

import collections
import json
import threading
import zipfile

import pytest
import torch
import torch.nn as nn

import tbn_compiler as tbn

pytest.importorskip("tvm")

CFG = tbn.TBNConfig(p=4, min_numel=0)
Pair = collections.namedtuple("Pair", "scaled shifted")


class _Structured(nn.Module):
    """Returns a dict holding a tensor, a nested tuple and a named tuple with a list."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        y = self.head(h)
        return {"logits": y, "extra": (h, Pair(2 * y, [y - 1, None]))}


@pytest.fixture(scope="module")
def structured():
    torch.manual_seed(0)
    model, x = _Structured().eval(), torch.randn(4, 16)
    gm = tbn.rewrite(model, x, CFG)
    return tbn.compile_graph(gm, x, "llvm"), gm, x


def _assert_same_tree(got, want):
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _assert_same_tree(got[k], want[k])
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _assert_same_tree(a, b)
    else:
        assert got == want


def test_output_structure_is_kept(structured, tmp_path):
    cm, gm, x = structured
    want = gm(x)
    _assert_same_tree(cm(x), want)
    loaded = tbn.load(cm.save(tmp_path / "m.tbn"))
    _assert_same_tree(loaded(x), want)


def test_single_tensor_and_one_tuple_outputs():
    x = torch.randn(2, 16)
    for model in (nn.Linear(16, 8), _OneTuple()):
        gm = tbn.rewrite(model.eval(), x, CFG)
        _assert_same_tree(tbn.compile_graph(gm, x, "llvm")(x), gm(x))


class _OneTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return (self.fc(x),)


def test_concurrent_calls_from_threads(structured):
    cm, gm, _ = structured
    inputs = [torch.randn(4, 16) for _ in range(8)]
    expected = [gm(x)["logits"] for x in inputs]
    failures: list[str] = []

    def work(i: int) -> None:
        try:
            for _ in range(200):
                got = cm(inputs[i])["logits"]
                if not torch.allclose(got, expected[i], rtol=1e-4, atol=1e-5):
                    failures.append(f"thread {i}: wrong result")
                    return
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(f"thread {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def test_save_refuses_a_directory_and_leaves_nothing(structured, tmp_path):
    cm, _, _ = structured
    with pytest.raises(
        tbn.ArtifactWriteError, match=f"cannot save to {tmp_path}: it is a directory"
    ):
        cm.save(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=f"cannot save to {blocker / 'm.tbn'}"):
        cm.save(blocker / "m.tbn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_failed_save_keeps_the_previous_file(structured, tmp_path, monkeypatch):
    cm, _, x = structured
    path = cm.save(tmp_path / "m.tbn")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", broken)
    with pytest.raises(OSError, match=f"cannot save to {path}: No space left"):
        cm.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tbn"]
    _assert_same_tree(tbn.load(path)(x), cm(x))


def test_edited_metadata_is_refused_at_load(structured, tmp_path):
    cm, _, _ = structured
    path = cm.save(tmp_path / "m.tbn")
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(members["metadata.json"])
    meta["outputs"] = meta["outputs"][:1]
    members["metadata.json"] = json.dumps(meta).encode()
    edited = tmp_path / "edited.tbn"
    with zipfile.ZipFile(edited, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(tbn.ArtifactError, match="checksum mismatch for 'metadata.json'"):
        tbn.load(edited)


def test_compile_refuses_a_plain_function():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got function"):
        tbn.compile(lambda x: x + 1, torch.randn(2, 3))
