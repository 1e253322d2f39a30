"""The host module's call path: inputs passed in place or converted, outputs handed
back without copies. Reference: the rewritten graph run in PyTorch."""

import pytest
import torch
import torch.nn as nn

import tbn_compiler as tbn

pytest.importorskip("tvm")

from tbn_compiler.backends.artifact import InputError  # noqa: E402

CFG = tbn.TBNConfig(p=4, min_numel=0)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    x = torch.randn(2, 64)
    gm = tbn.rewrite(model, x, CFG)
    return tbn.compile_graph(gm, x, "llvm"), gm


def _reference(gm, x):
    with torch.no_grad():
        return gm(x.detach().clone())


def test_unaligned_and_strided_inputs_are_copied_not_refused(mlp):
    cm, gm = mlp
    flat = torch.randn(2 * 64 + 1)
    unaligned = flat[1:].view(2, 64)  # compact, 4 bytes past a 64-byte boundary
    assert unaligned.is_contiguous() and unaligned.data_ptr() % 64 != 0
    strided = torch.randn(64, 2).t()
    grad = torch.randn(2, 64, requires_grad=True)
    for x in (unaligned, strided, grad):
        torch.testing.assert_close(cm(x), _reference(gm, x), rtol=1e-4, atol=1e-5)
    assert grad.grad is None and flat[1:].view(2, 64).equal(unaligned)


def test_results_are_fresh_tensors_that_later_calls_leave_alone(mlp):
    cm, gm = mlp
    x1, x2 = torch.randn(2, 64), torch.randn(2, 64)
    y1 = cm(x1)
    y2 = cm(x2)
    assert isinstance(y1, torch.Tensor) and y1.shape == (2, 32)
    assert y1.data_ptr() != y2.data_ptr()
    torch.testing.assert_close(y1, _reference(gm, x1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y2, _reference(gm, x2), rtol=1e-4, atol=1e-5)
    y1.zero_()  # the caller owns the result: writing it changes nothing else
    torch.testing.assert_close(cm(x1), _reference(gm, x1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: torch.randn(2, 64, dtype=torch.float64), r"dtype float32.*float64"),
        (lambda: torch.randn(2, 63), r"expected shape \(\w+, 64\), got \(2, 63\)"),
        (lambda: torch.randn(2, 64).numpy(), r"expected a torch.Tensor"),
        (lambda: torch.randn(2, 64, device="meta"), r"expected a tensor on cpu"),
    ],
)
def test_inputs_off_the_fast_path_still_get_every_check(mlp, bad, message):
    cm, _ = mlp
    with pytest.raises(InputError, match=message):
        cm(bad())
    with pytest.raises(InputError, match=r"expected 1 inputs"):
        cm(torch.randn(2, 64), torch.randn(2, 64))


def test_host_threads_default_to_physical_cores_and_leave_user_settings_alone():
    """configure_host_threads fills in TVM's pool settings only where the user set none;
    TBN_THREADS picks the thread count or turns the defaults off."""
    import os

    from tbn_compiler.backends import artifact

    cores = artifact.physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    env: dict[str, str] = {}
    assert artifact.configure_host_threads(env) == {
        "TVM_NUM_THREADS": str(cores),
        "TVM_THREAD_POOL_SPIN_COUNT": str(artifact.POOL_SPIN_COUNT),
    }
    assert env["TVM_NUM_THREADS"] == str(cores)
    env = {"TVM_NUM_THREADS": "7", "TBN_THREADS": "3"}
    assert artifact.configure_host_threads(env) == {
        "TVM_THREAD_POOL_SPIN_COUNT": str(artifact.POOL_SPIN_COUNT)
    }
    assert env["TVM_NUM_THREADS"] == "7"
    env = {"TBN_THREADS": "3"}
    artifact.configure_host_threads(env)
    assert env["TVM_NUM_THREADS"] == "3"
    env = {"TBN_THREADS": "off"}
    assert artifact.configure_host_threads(env) == {} and env == {"TBN_THREADS": "off"}
    with pytest.raises(ValueError, match="TBN_THREADS"):
        artifact.configure_host_threads({"TBN_THREADS": "two"})


def test_this_process_runs_with_the_configured_pool():
    """Importing tbn_compiler set TVM's thread count before its pool started (unless the
    environment had one): TVM's runtime reports that many threads."""
    import os

    import tvm

    if "TVM_NUM_THREADS" not in os.environ:
        pytest.skip("TBN_THREADS=off and no TVM_NUM_THREADS: TVM's own default")
    expected = min(int(os.environ["TVM_NUM_THREADS"]), os.cpu_count() or 1)
    assert tvm.get_global_func("runtime.NumThreads")() == expected
