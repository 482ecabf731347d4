"""The engines that evaluate the LM head and its loss. Four words, each with one meaning:

- **backend**: the implementation a user picks, ``"torch"`` (PyTorch ops) or ``"triton"`` (our kernels);
- **strategy**: how the ``[tokens x vocabulary]`` logits are walked; one remains, ``"chunked"``
  (cuBLAS logits of a token chunk, then an epilogue); forward-only statistics on Triton take the
  forward tile kernel, which never stores them;
- **engine**: the object that runs a backend's strategy (``ChunkedEngine``; ``TileForwardEngine`` for
  statistics); ``select.make_engine`` and ``select.stats_engine`` pick it;
- **epilogue**: what the chunked engine runs on each chunk's logits (statistics, loss, dL/dz):
  ``TorchEpilogue`` for the torch backend, ``TritonEpilogue`` (one kernel) for the Triton one.
"""
