"""Session-wide test settings.

The models in these tests are tiny: one torch thread runs them fastest, and on a shared
2-core machine a full thread pool per process makes every step many times slower.
Servers started as subprocesses set their own threads.
"""
import torch

torch.set_num_threads(1)
