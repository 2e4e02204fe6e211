import os
import sys

import torch

# Two threads match the target machine; more only adds contention on shared CI runners.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers such as hf_reference
# The demo and the benchmarks' shared pieces live beside their scripts, outside the library.
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
