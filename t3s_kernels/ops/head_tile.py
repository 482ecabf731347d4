"""One [token block x vocab block] tile of the LM head's logits, and the forward tile grid's coordinates."""

import triton
import triton.language as tl


@triton.jit
def tile_dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST is set only under TRITON_INTERPRET=1, whose NumPy dot multiplies
    bf16 operands as raw 16-bit integers (Triton 3.6 to 3.9); compiled kernels never upcast."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def head_tile_offsets(row0, col0, N, V, stride_xn, stride_xh, stride_wv, stride_wh, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 offsets of a tile's first K slice in X ([BLOCK_M, BLOCK_K]) and W ([BLOCK_K, BLOCK_N]):
    half the registers of 64-bit pointer tensors (the launcher checks sizes). Out-of-range rows and
    columns are clamped to the last valid one (the matmul tutorial's trick: no row/column masks in the
    K loop); callers mask them out of every result."""
    rows = tl.minimum(row0 + tl.arange(0, BLOCK_M), N - 1)
    cols = tl.minimum(col0 + tl.arange(0, BLOCK_N), V - 1)
    ks = tl.arange(0, BLOCK_K)
    return rows[:, None] * stride_xn + ks[None, :] * stride_xh, cols[None, :] * stride_wv + ks[:, None] * stride_wh


@triton.jit
def head_logits_k_step(X, W, x_offs, w_offs, k0, acc, H, stride_xh, stride_wh, DOT_PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + the product of the tile's K slice at k0 (``head_tile_offsets``)."""
    k_valid = tl.arange(0, BLOCK_K) < H - k0
    x = tl.load(X + k0 * stride_xh + x_offs, mask=k_valid[None, :], other=0.0)
    w_t = tl.load(W + k0 * stride_wh + w_offs, mask=k_valid[:, None], other=0.0)
    return tile_dot(x, w_t, acc, DOT_PRECISION, UPCAST)


@triton.jit
def head_logits_k_step_tma(x_desc, w_desc, row0, col0, k0, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``head_logits_k_step`` through tensor descriptors (TMA on sm_90): the copy engine fetches the
    tiles, out-of-range rows, columns and K zero-filled, with no address arithmetic in registers."""
    return tile_dot(x_desc.load([row0, k0]), w_desc.load([col0, k0]).T, acc, DOT_PRECISION, UPCAST)


@triton.jit
def add_bias(acc, B, col0, V, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """z + b over a tile's (clamped) columns."""
    if HAS_BIAS:
        acc += tl.load(B + tl.minimum(col0 + tl.arange(0, BLOCK_N), V - 1)).to(tl.float32)[None, :]
    return acc


@triton.jit
def head_logits_tile(X, W, B, row0, col0, N, V, H, stride_xn, stride_xh, stride_wv, stride_wh,
                     HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = X[row0:row0+BLOCK_M] @ W[col0:col0+BLOCK_N].T (+ b) as a float32 tile: its own K loop."""
    x_offs, w_offs = head_tile_offsets(row0, col0, N, V, stride_xn, stride_xh, stride_wv, stride_wh, BLOCK_M,
                                       BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        acc = head_logits_k_step(X, W, x_offs, w_offs, k0, acc, H, stride_xh, stride_wh, DOT_PRECISION, UPCAST,
                                 BLOCK_K)
    return add_bias(acc, B, col0, V, HAS_BIAS, BLOCK_N)


@triton.jit
def forward_tile_coords(N, n_splits, GROUP_ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """This forward program's vocabulary split and row block (first row, rows, which of them are < N).

    The 1-D grid runs in groups of GROUP_ROWS row blocks, the row block varying fastest within a
    group: the programs resident at once share a few row blocks of X (kept in L2, though each
    program reads its X tile again for every vocabulary block) and a few splits' W blocks. With the
    row block varying fastest over the whole grid, every resident program had its own X tile and X
    came from memory again at each vocabulary block: at Qwen3-8B's head with 128 x 128 tiles, 128 x
    1187 tiles of 1 MiB, about 160 GB, more than the matmul's time at the card's bandwidth."""
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_M)
    per_group = GROUP_ROWS * n_splits
    first = (pid // per_group) * GROUP_ROWS
    group_rows = tl.minimum(n_row_blocks - first, GROUP_ROWS)
    in_group = pid % per_group
    row0 = (first + in_group % group_rows) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    return in_group // group_rows, row0, rows, rows < N


@triton.jit
def split_vocab_block(split, i, blocks_per_split, V, BLOCK_N: tl.constexpr):
    """The i-th vocabulary block of a split: whether it exists, its first column, its columns and
    which of them are < V (as a [1, BLOCK_N] mask). The last split may hold fewer blocks; a scalar
    guard, not a tensor loop bound, keeps the loop valid in every Triton's interpreter."""
    col0 = (split * blocks_per_split + i) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    return col0 < V, col0, cols, (cols < V)[None, :]
