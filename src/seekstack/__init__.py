"""seekstack: DeepSeek's open infrastructure stack as one Python project.

Each upstream project lives in its own subpackage (see docs/ARCHITECTURE.md):

>>> import torch
>>> from seekstack.eplb import rebalance_experts
>>> phy2log, log2phy, logcnt = rebalance_experts(torch.rand(2, 12), 16, 4, 2, 8)
"""

__version__ = "0.1.0"

from seekstack.triton_env import prepare_triton as _prepare_triton

_prepare_triton(cheap=True)  # before torch can import triton in compiled mode (see seekstack.triton_env)
