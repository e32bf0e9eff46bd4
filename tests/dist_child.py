"""Child of tests/test_parallel.py, started by torchrun with 2 processes: protect with DDP, then FSDP.

argv: config.json  state_ddp.pt  state_fsdp.pt
"""

import sys

from apdm_core.config import ProtectConfig
from apdm_core.protection import protect

config = ProtectConfig.load(sys.argv[1])
for kind, state in (("ddp", sys.argv[2]), ("fsdp", sys.argv[3])):
    result = protect(config.replace(distributed=kind, state_path=state), keep_state=True)
    assert result.steps_done == config.outer_steps and not result.cancelled and result.processes == 2
    assert result.distributed == kind
