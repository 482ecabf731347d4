"""The engines that evaluate the LM head and its loss. Four words, each with one meaning:

- **backend**: the implementation a user picks, ``"torch"`` (PyTorch ops) or ``"triton"`` (our kernels);
- **strategy**: how the Triton backend walks the ``[tokens x vocabulary]`` logits: ``"chunked"``
  (cuBLAS logits of a token chunk, then an epilogue) or ``"tile"`` (tile kernels that never store them);
- **engine**: the object that runs one backend and strategy (``ChunkedEngine``, ``TileEngine``);
  ``select.make_engine`` picks it;
- **epilogue**: what the chunked engine runs on each chunk's logits (statistics, loss, dL/dz):
  ``TorchEpilogue`` for the torch backend, ``TritonEpilogue`` (one kernel) for the Triton one.
"""
