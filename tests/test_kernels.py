import os

# Must precede the first Triton kernel build (triton reads the flag when a kernel is jitted; vlmeff builds
# its kernel lazily on first use, so an earlier `import vlmeff.kernels` elsewhere in the session is fine).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vlmeff.kernels import CompactIndex, _triton, compact, compact_tokens, gather_tokens  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Same-width integer view, so equality is bitwise (NaN == NaN, -0.0 != 0.0)."""
    return t.contiguous().view(_INT[t.element_size()])


def _assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(_bits(a), _bits(b))


def _rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=g, dtype=dtype)


def _rand_index(b, k, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (b, k), generator=g)
    return idx.masked_fill(torch.rand(b, k, generator=g) < 0.3, -1)


def _loop_gather(x, index, fill):
    b, k = index.shape
    out = torch.full((b, k, *x.shape[2:]), fill, dtype=x.dtype)
    for i in range(b):
        for j in range(k):
            if index[i, j] >= 0:
                out[i, j] = x[i, index[i, j]]
    return out


@pytest.fixture
def triton_cpu():
    pytest.importorskip("triton")
    reason = _triton.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"Triton interpreter not active for CPU tensors: {reason}")


# --- torch backend -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_torch_matches_loop_reference(dtype):
    x, index = _rand((3, 6, 5), dtype), _rand_index(3, 8, 6)
    assert (index == -1).any()
    out = gather_tokens(x, index, fill_value=7, backend="torch")
    _assert_bit_equal(out, _loop_gather(x, index, 7))
    out2d = gather_tokens(x[..., 0], index, fill_value=7, backend="torch")
    _assert_bit_equal(out2d, _loop_gather(x[..., 0], index, 7))


def test_gather_noncontiguous_and_grad():
    base = torch.randn(5, 3, 8, requires_grad=True)
    x = base.transpose(0, 1)[:, :, ::2]  # [3, 5, 4], non-contiguous
    index = torch.tensor([[4, -1, 0], [1, 1, -1], [-1, -1, -1]])
    out = gather_tokens(x, index, fill_value=-1.5)  # auto on CPU -> torch, differentiable
    _assert_bit_equal(out.detach(), _loop_gather(x.detach(), index, -1.5))
    out.sum().backward()
    g = base.grad  # x[b, n, d] = base[n, b, 2d]
    assert g is not None and g[1, 1, ::2].eq(2).all() and g[:, :, 1::2].eq(0).all() and g[:, 2].eq(0).all()


@pytest.mark.parametrize("bad", [6, 100, -2])
def test_gather_bad_index_raises(bad):
    index = torch.tensor([[0, bad], [-1, 5]])
    with pytest.raises(ValueError, match=f"index value {bad} "):
        gather_tokens(torch.zeros(2, 6, 3), index)


def test_gather_empty_source_all_padding():
    out = gather_tokens(torch.zeros(2, 0, 3), torch.full((2, 4), -1), fill_value=2.0)
    assert out.shape == (2, 4, 3) and out.eq(2).all()


def test_auto_uses_torch_on_cpu(monkeypatch):
    def boom(*args):
        raise AssertionError("auto dispatched a CPU tensor to Triton")

    monkeypatch.setattr(_triton, "gather_tokens", boom)
    gather_tokens(torch.randn(2, 3, 4), torch.zeros(2, 2, dtype=torch.long))


# --- compact ---------------------------------------------------------------------------------------------

KEEP = torch.tensor(
    [
        [1, 0, 1, 1, 0],  # keeps 3
        [0, 0, 0, 0, 0],  # keeps nothing
        [1, 1, 1, 1, 1],  # keeps everything
        [0, 0, 0, 0, 1],  # keeps the last token only
    ],
    dtype=torch.bool,
)
EXPECTED = {
    "right": (
        [[0, 2, 3, -1, -1], [-1, -1, -1, -1, -1], [0, 1, 2, 3, 4], [4, -1, -1, -1, -1]],
        [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
        [[0, 1, 2, 0, 0], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]],
    ),
    "left": (
        [[-1, -1, 0, 2, 3], [-1, -1, -1, -1, -1], [0, 1, 2, 3, 4], [-1, -1, -1, -1, 4]],
        [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]],
        [[0, 0, 0, 1, 2], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]],
    ),
}


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_compact_hand_written(pad_side):
    idx = compact(KEEP, pad_side=pad_side)
    assert isinstance(idx, CompactIndex)
    index, mask, pos = (torch.tensor(t) for t in EXPECTED[pad_side])
    for got, want in [(idx.index, index), (idx.attention_mask, mask), (idx.position_ids, pos)]:
        assert got.dtype == torch.long and torch.equal(got, want)
    assert torch.equal(idx.lengths, torch.tensor([3, 0, 5, 1]))


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_compact_keeps_nothing(pad_side):
    idx = compact(torch.zeros(3, 4, dtype=torch.bool), pad_side=pad_side)
    assert idx.index.shape == idx.attention_mask.shape == idx.position_ids.shape == (3, 0)
    assert idx.lengths.tolist() == [0, 0, 0]
    out, _ = compact_tokens(torch.randn(3, 4, 2), torch.zeros(3, 4, dtype=torch.bool), pad_side=pad_side)
    assert out.shape == (3, 0, 2)
    assert compact(torch.zeros(0, 4, dtype=torch.bool)).index.shape == (0, 0)


@pytest.mark.parametrize("pad_side", ["right", "left"])
@pytest.mark.parametrize("feature_dim", [True, False])
def test_compact_tokens_matches_per_row_reference(pad_side, feature_dim):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 17, 6, generator=g) if feature_dim else torch.randn(5, 17, generator=g)
    keep = torch.rand(5, 17, generator=g) < torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])[:, None]
    out, idx = compact_tokens(x, keep, pad_side=pad_side, fill_value=-9.0)
    kmax = int(keep.sum(1).max())
    assert out.shape[:2] == (5, kmax)
    for b in range(5):
        rows, n = x[b][keep[b]], int(keep[b].sum())
        pad = torch.full((kmax - n, *x.shape[2:]), -9.0)
        want = torch.cat([rows, pad] if pad_side == "right" else [pad, rows])
        assert torch.equal(out[b], want)
        real = idx.attention_mask[b].bool()
        assert torch.equal(idx.position_ids[b][real], torch.arange(n))
        assert torch.equal(idx.index[b][real], keep[b].nonzero().flatten())


# --- Triton backend (interpreter on CPU) ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_bit_exact_with_torch(triton_cpu, dtype):
    x, index = _rand((2, 9, 33), dtype, seed=4), _rand_index(2, 7, 9, seed=5)
    index[1, 0] = -1
    fills = [0, -3] + ([float("nan"), -0.0] if dtype.is_floating_point else [])
    for fill in fills:
        want = gather_tokens(x, index, fill_value=fill, backend="torch")
        _assert_bit_equal(gather_tokens(x, index, fill_value=fill, backend="triton"), want)


def test_triton_noncontiguous_2d_and_compact(triton_cpu):
    x = _rand((33, 3, 10), torch.bfloat16, seed=6).permute(1, 2, 0)  # [3, 10, 33], D stride != 1
    keep = torch.rand(3, 10, generator=torch.Generator().manual_seed(7)) < 0.5
    keep[0] = False
    for pad_side in ("right", "left"):
        want, _ = compact_tokens(x, keep, pad_side=pad_side, backend="torch")
        got, _ = compact_tokens(x, keep, pad_side=pad_side, backend="triton")
        _assert_bit_equal(got, want)
        want2, _ = compact_tokens(x[..., 5], keep, pad_side=pad_side, fill_value=1, backend="torch")
        got2, _ = compact_tokens(x[..., 5], keep, pad_side=pad_side, fill_value=1, backend="triton")
        _assert_bit_equal(got2, want2)
    with pytest.raises(ValueError, match="index value 10 "):
        gather_tokens(x, torch.tensor([[10]] * 3), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_cuda_matches_torch(dtype):
    pytest.importorskip("triton")
    x, index = _rand((3, 300, 1000), dtype, seed=8).cuda(), _rand_index(3, 257, 300, seed=9).cuda()
    want = gather_tokens(x, index, fill_value=5, backend="torch")
    _assert_bit_equal(gather_tokens(x, index, fill_value=5), want)  # auto -> Triton on CUDA
