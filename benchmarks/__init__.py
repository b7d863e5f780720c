"""Benchmarks of anchor_kernels against eager PyTorch, ``torch.compile`` and a roofline
neighbour: the command-line runner (``python -m benchmarks --help``) and the pytest-benchmark
suites (``bench_<op>.py``). See README "Benchmarks"."""
