"""The engines, side by side: ``numpy_ops`` (NumPy, everywhere) and ``cuda_ops`` (the hand-written kernels of
``kernels/*.cu``, launched through ``cuda_loader``). The two op modules define the same functions with the same
names, arguments and order; ``gpucnn.backend`` is the one place that picks one of them.
"""
