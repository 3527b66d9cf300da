"""The kernels and what they share. ``registry`` (the Kernel protocol and the one choice), ``call`` (the frozen
Call), ``lowering`` (codes, tables and parameters the compiled kernels read), ``op`` (the compiled kernels as
torch.library ops); the kernels: ``native`` (C++, csrc/), ``triton`` (GPU), ``decode``, ``reference``, ``tiled``."""
