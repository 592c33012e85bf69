"""Programs of one kernel resident at once on a Hopper SM, from its registers, warps and shared memory.

Limits a SM (H100, sm_90): 64 warps, 32 programs, 64K registers allocated per warp in units of 256,
227 KB of shared memory. Used by the GEMV wave count and to size persistent grids.
"""

from __future__ import annotations

import math

SM = {"warps": 64, "programs": 32, "registers": 65536, "smem": 227 * 1024}


def resident_programs(registers: int, warps: int, smem: int) -> int:
    """Programs a SM holds at once, given a program's registers a thread, warps and shared-memory bytes."""
    per_program = math.ceil(registers * 32 / 256) * 256 * warps
    return min(
        SM["registers"] // per_program,
        SM["warps"] // warps,
        SM["programs"],
        SM["smem"] // smem if smem else SM["programs"],
    )
