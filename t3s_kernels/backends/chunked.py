"""The chunked engine: token chunks x vocab chunks, matmuls by PyTorch, an epilogue per chunk.

For each chunk of rows, the logits of one vocabulary chunk at a time are made by one
matmul, into a float32 buffer or (``logits_dtype="input"``, on an epilogue that reads them) in
the inputs' dtype; the *epilogue* folds them into the rows' online softmax state and, once the
logsumexp is known, turns them into dL/dlogits (over the same buffer where the dtypes allow),
which two more matmuls carry to dX and dW. When a whole vocabulary row fits the memory budget the
logits are made once and the gradient is written over them (3 matmuls); otherwise the
gradient pass recomputes them (4 matmuls), never holding more than the budget.

The driver is shared: ``TorchEpilogue`` (backends/torch_epilogue.py) and the native CPU
epilogue (backends/cpu_epilogue.py) make it the torch backend, and the Triton epilogue kernel
(``ops/chunk_epilogue.py``) the Triton one.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from ..options import DEFAULT_CHUNK_BUDGET_BYTES, GradRequest, HeadOptions
from .base import HeadGrads, OnlineState, RowStats
from .matmul import addmm_f32_, mm_f32, mm_into_


class Epilogue(Protocol):
    # Bytes of chunk memory one logit costs (its fp32 buffer plus the epilogue's temporaries),
    # and one logit of both heads with a teacher.
    bytes_per_logit: int
    distill_bytes_per_logit: int
    # Whether it reads logits in the inputs' half dtype (and writes dL/dz over them), needing no
    # memory beyond them.
    reads_half_logits: bool

    def accumulate(self, logits: torch.Tensor, labels: torch.Tensor, col0: int,
                   state: OnlineState, opts: HeadOptions) -> None: ...

    def gradient(self, logits: torch.Tensor, labels: torch.Tensor, col0: int, lse: torch.Tensor,
                 row_scale: torch.Tensor, opts: HeadOptions, out_dtype: torch.dtype) -> torch.Tensor: ...

    def accumulate_and_gradient(self, logits: torch.Tensor, labels: torch.Tensor, state: OnlineState,
                                row_scale: torch.Tensor, opts: HeadOptions,
                                out_dtype: torch.dtype) -> torch.Tensor: ...

    def distill(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor], teacher,
                row_scale: Optional[torch.Tensor], opts: HeadOptions,
                out_dtype: torch.dtype) -> "tuple[RowStats, Optional[torch.Tensor]]":
        """Statistics with the per-row KD, and dL/dz when ``row_scale`` is given, of a chunk of whole
        vocabulary rows of both heads (``teacher_logits`` None for a sparse teacher)."""


def plan_chunks(n_rows: int, vocab: int, bytes_per_logit: int, budget_bytes: int,
                chunk_rows: Optional[int] = None, vocab_chunk: Optional[int] = None) -> tuple[int, int]:
    """(rows per chunk, vocabulary columns per chunk) that keep one chunk within the budget.

    Whole vocabulary rows are preferred (3 matmuls instead of 4) as long as at least
    ``min_rows`` rows fit, enough to keep the matmuls efficient. The rows are split evenly over
    the fewest chunks the budget allows, since a small last chunk runs its matmuls slowly
    (benchmarks/RESULTS.md, 'Chunk shapes on a CPU'), in multiples of 64 where the budget leaves room.
    """
    min_rows = 128
    if vocab_chunk is None:
        vocab_chunk = vocab if vocab * bytes_per_logit * min(min_rows, n_rows) <= budget_bytes \
            else max(1024, budget_bytes // (bytes_per_logit * min_rows))
    vocab_chunk = max(1, min(vocab_chunk, vocab))
    if chunk_rows is None:
        fit = max(1, budget_bytes // (bytes_per_logit * vocab_chunk))
        chunks = -(-n_rows // fit)
        chunk_rows = -(-n_rows // max(chunks, 1))
        rounded = -(-chunk_rows // 64) * 64  # matmul-friendly row counts
        if chunk_rows >= 64 and rounded <= fit:
            chunk_rows = rounded
    return max(1, min(chunk_rows, n_rows)), vocab_chunk


# The forward-only block on a CPU: 512 rows x 4096 columns of float32 (8 MiB, a quarter of a 32 MiB
# L3), so that the matmul's output stays in the last-level cache for the epilogue that reads it
# instead of going to memory (benchmarks/RESULTS.md, 'Chunk shapes on a CPU').
CPU_FORWARD_ROWS = 512
CPU_FORWARD_BLOCK_BYTES = 8 << 20


class ChunkedEngine:
    fuses_backward = True

    def __init__(self, epilogue: Epilogue, budget_bytes: Optional[int] = None,
                 chunk_rows: Optional[int] = None, vocab_chunk: Optional[int] = None,
                 grad_accum_dtype: str = "float32", logits_dtype: str = "float32"):
        self.epilogue = epilogue
        self.budget_bytes = budget_bytes
        self.chunk_rows = chunk_rows
        self.vocab_chunk = vocab_chunk
        self.grad_accum_dtype = grad_accum_dtype
        self.logits_dtype = logits_dtype

    def _logits_dtype(self, x: torch.Tensor, teacher=None) -> torch.dtype:
        """The dtype the chunks' logits are made in: the inputs' where asked and the epilogue reads it
        (not with a sparse teacher, whose chunk function runs in PyTorch on float32 logits)."""
        half = self.logits_dtype == "input" and self.epilogue.reads_half_logits and x.dtype != torch.float32 \
            and (teacher is None or teacher.dense)
        return x.dtype if half else torch.float32

    def _budget(self, device: torch.device) -> int:
        return self.budget_bytes or DEFAULT_CHUNK_BUDGET_BYTES.get(device.type, DEFAULT_CHUNK_BUDGET_BYTES["cuda"])

    def _plan(self, x: torch.Tensor, vocab: int, dtype: torch.dtype, gradient: bool = True) -> tuple[int, int]:
        """(rows, vocabulary columns) of a chunk whose logits are of ``dtype`` (``_logits_dtype``)."""
        n, device = x.shape[0], x.device
        if not gradient and device.type == "cpu" and self.chunk_rows is None and self.vocab_chunk is None:
            # Forward only, nothing to keep for a gradient sweep: blocks that stay in the CPU's last-level
            # cache between the matmul that writes them and the epilogue that reads them.
            rows = min(n, CPU_FORWARD_ROWS)
            return rows, min(vocab, max(1024, CPU_FORWARD_BLOCK_BYTES // (4 * rows)))
        half = dtype != torch.float32
        per_logit = x.element_size() if half else self.epilogue.bytes_per_logit  # half: dL/dz over the logits
        return plan_chunks(n, vocab, per_logit, self._budget(device), self.chunk_rows, self.vocab_chunk)

    @staticmethod
    def _logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], v0: int, v1: int,
                dtype: torch.dtype, buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of rows ``x`` and columns [v0, v1) in ``dtype``, float32 or the inputs' (float32: in
        ``buffer`` where one is given)."""
        if dtype != torch.float32:  # one rounding, the bias added in the matmul as nn.Linear does
            w = weight[v0:v1].t()
            return torch.mm(x, w) if bias is None else torch.addmm(bias[v0:v1], x, w)
        logits = mm_f32(x, weight[v0:v1].t(), out=None if buffer is None else buffer[:x.shape[0], :v1 - v0])
        if bias is not None:
            logits += bias[v0:v1].float()
        return logits

    @staticmethod
    def _buffer(x: torch.Tensor, rows: int, vocab_chunk: int) -> Optional[torch.Tensor]:
        """One logits buffer for every chunk, where mm can write into it (fp32 operands): on a CPU
        a fresh buffer per chunk costs page faults; on a GPU the caching allocator does this."""
        if x.dtype != torch.float32:
            return None
        return torch.empty(rows, vocab_chunk, device=x.device, dtype=torch.float32)

    def _alloc_grads(self, x, weight, bias, grads: GradRequest) -> HeadGrads:
        """dX, and the dW and db accumulators (float32 or the weight's dtype, ``grad_accum_dtype``),
        left unfilled: the first token chunk writes them (``_backprop``), unless there is none."""
        f32 = self.grad_accum_dtype == "float32"
        new = torch.empty if x.shape[0] else torch.zeros
        return HeadGrads(
            hidden=torch.empty_like(x, memory_format=torch.contiguous_format) if grads.hidden else None,
            weight=new(weight.shape, device=weight.device, dtype=torch.float32 if f32 else weight.dtype)
            if grads.weight else None,
            bias=new(weight.shape[0], device=weight.device, dtype=torch.float32 if f32 else bias.dtype)
            if grads.bias and bias is not None else None,
        )

    @staticmethod
    def _backprop(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, v0: int, v1: int,
                  out: HeadGrads, dx_acc: Optional[torch.Tensor], rows: Optional[slice] = None,
                  first: bool = False) -> None:
        """dX, dW and db of one [rows x vocab chunk] gradient. dX goes into ``dx_acc`` (float32,
        summed over vocabulary chunks), or, for whole vocabulary rows, straight into ``out.hidden[rows]``.
        The first token chunk (``first``) writes dW and db; the others add to them."""
        if dx_acc is not None:
            addmm_f32_(dx_acc, dz, weight[v0:v1])
        elif rows is not None and out.hidden is not None:
            torch.mm(dz, weight, out=out.hidden[rows])
        if out.weight is not None:
            mm_into_(out.weight[v0:v1], dz.t(), x, accumulate=not first)
        if out.bias is not None:
            db = dz.sum(0, dtype=torch.float32)
            if first:
                out.bias[v0:v1] = db
            else:
                out.bias[v0:v1] += db

    def _gradient_pass(self, x, weight, bias, labels, lse, row_scale, opts, out: HeadGrads,
                       r0: int, r1: int, vocab_chunk: int, dtype: torch.dtype, buffer: Optional[torch.Tensor]) -> None:
        vocab = weight.shape[0]
        dx_acc = torch.zeros(r1 - r0, x.shape[1], device=x.device, dtype=torch.float32) \
            if out.hidden is not None else None
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            logits = self._logits(x[r0:r1], weight, bias, v0, v1, dtype, buffer)
            dz = self.epilogue.gradient(logits, labels[r0:r1], v0, lse, row_scale, opts, x.dtype)
            del logits
            self._backprop(dz, x[r0:r1], weight, v0, v1, out, dx_acc, first=r0 == 0)
            del dz  # freed before the next chunk's logits are made
        if dx_acc is not None:
            out.hidden[r0:r1] = dx_acc

    def _distill_pass(self, x, weight, bias, labels, teacher, row_scale, opts: HeadOptions,
                      out: Optional[HeadGrads]) -> RowStats:
        """Whole vocabulary rows of both heads per token chunk (backends/distill.py). A sparse teacher's
        chunk function runs in PyTorch on float32 logits."""
        n, vocab = x.shape[0], weight.shape[0]
        dtype = self._logits_dtype(x, teacher)
        per_logit = 2 * x.element_size() if dtype != torch.float32 else self.epilogue.distill_bytes_per_logit
        rows, _ = plan_chunks(n, vocab, per_logit, self._budget(x.device), self.chunk_rows, vocab_chunk=vocab)
        parts = []
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            xc = x[r0:r1]
            t_rows = teacher.rows(slice(r0, r1))
            t_logits = None
            if t_rows.dense:
                t_logits = self._logits(t_rows.hidden, teacher.weight, teacher.bias, 0, vocab, dtype)
            logits = self._logits(xc, weight, bias, 0, vocab, dtype)
            st, dz = self.epilogue.distill(logits, labels[r0:r1], t_logits, t_rows,
                                           None if row_scale is None else row_scale[r0:r1], opts, x.dtype)
            del logits
            parts.append(st)
            if dz is not None:
                self._backprop(dz, xc, weight, 0, vocab, out, None, rows=slice(r0, r1), first=r0 == 0)
            del dz, t_logits
        return RowStats.cat(parts)

    def forward(self, x, weight, bias, labels, opts: HeadOptions, row_scale=None,
                grads: GradRequest = GradRequest(), teacher=None):
        n, vocab = x.shape[0], weight.shape[0]
        want_grad = row_scale is not None and grads.any
        if teacher is not None:
            out = self._alloc_grads(x, weight, bias, grads) if want_grad else None
            return self._distill_pass(x, weight, bias, labels, teacher, row_scale if want_grad else None, opts,
                                      out), out
        dtype = self._logits_dtype(x)
        rows, vocab_chunk = self._plan(x, vocab, dtype, gradient=want_grad)
        buffer = self._buffer(x, rows, vocab_chunk)
        out = self._alloc_grads(x, weight, bias, grads) if want_grad else None
        parts = []
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            xc, yc = x[r0:r1], labels[r0:r1]
            state = OnlineState(r1 - r0, x.device)
            if want_grad and vocab_chunk >= vocab:
                # Whole rows fit: one matmul for the logits, gradient written over them.
                logits = self._logits(xc, weight, bias, 0, vocab, dtype, buffer)
                dz = self.epilogue.accumulate_and_gradient(logits, yc, state, row_scale[r0:r1], opts, x.dtype)
                del logits
                self._backprop(dz, xc, weight, 0, vocab, out, None, rows=slice(r0, r1), first=r0 == 0)
                del dz  # freed before the next chunk's logits are made
            else:
                for v0 in range(0, vocab, vocab_chunk):
                    v1 = min(v0 + vocab_chunk, vocab)
                    self.epilogue.accumulate(self._logits(xc, weight, bias, v0, v1, dtype, buffer), yc, v0, state,
                                             opts)
                if want_grad:
                    self._gradient_pass(x, weight, bias, labels, state.lse(), row_scale[r0:r1], opts, out,
                                        r0, r1, vocab_chunk, dtype, buffer)
            parts.append(state.finish())
        return RowStats.cat(parts), out

    def backward(self, x, weight, bias, labels, lse, row_scale, opts: HeadOptions,
                 grads: GradRequest, teacher=None) -> HeadGrads:
        n, vocab = x.shape[0], weight.shape[0]
        if teacher is not None:
            out = self._alloc_grads(x, weight, bias, grads)
            self._distill_pass(x, weight, bias, labels, teacher, row_scale, opts, out)
            return out
        dtype = self._logits_dtype(x)
        rows, vocab_chunk = self._plan(x, vocab, dtype)
        buffer = self._buffer(x, rows, vocab_chunk)
        out = self._alloc_grads(x, weight, bias, grads)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            self._gradient_pass(x, weight, bias, labels, lse[r0:r1], row_scale[r0:r1], opts, out,
                                r0, r1, vocab_chunk, dtype, buffer)
        return out
