"""The engines that evaluate the LM head and its loss. Three words, each with one meaning:

- **backend**: the implementation a user picks, ``"torch"`` (PyTorch ops) or ``"triton"`` (our kernels);
- **engine**: the object that walks the ``[tokens x vocabulary]`` logits for a backend: ``ChunkedEngine``
  (cuBLAS logits of a token chunk, then an epilogue; the loss's only engine) or, for forward-only
  statistics on Triton, ``TileForwardEngine`` (the forward tile kernel, which never stores them);
  ``select.make_engine`` and ``select.stats_engine`` pick it;
- **epilogue**: what the chunked engine runs on each chunk's logits (statistics, loss, dL/dz):
  ``TorchEpilogue`` for the torch backend, ``TritonEpilogue`` (one kernel) for the Triton one.
"""
