"""Kernels and their launchers: one module per op and implementation (``<stem>_triton.py``,
``<stem>_cpp.py``), each registering ``torch.library`` custom ops in the ``anchor_kernels``
namespace."""
