"""Static knobs of the Pallas (Triton) attention kernels, and the one split-KV heuristic.

``KernelTuning`` is shared by ``sparse_decode``, ``dense_decode`` and ``sparse_prefill``
(``SparseDecodeTuning`` / ``DenseDecodeTuning`` / ``SparsePrefillTuning`` are the same
class).  It is a frozen dataclass, so it is hashable and part of the jit cache key.

  block_q     query rows per program: heads of one query position (sparse decode,
              prefill) or s_q x heads sharing a KV head (dense decode).  Power of two
              >= 16 (Triton dots need M, N, K >= 16); None = min(64, rows) rounded up.
  block_k     keys per loop step (power of two >= 16).
  num_splits  split-KV factor (decode only); None = ``choose_num_splits``.
  num_warps   None = 8 for 64-row blocks (a 64 x 512 fp32 accumulator is 128 registers
              per thread over 8 warps, as FlashMLA's two warpgroups), else 4.
  num_stages  software pipelining depth of the key loop.
  num_sms     SMs to fill (132 on H100/H200); interpret mode counts 2, since every
              program costs CPU time there.

Defaults as compiled offline for sm_90a (Triton 3.6 + ptxas, no GPU): 64 x 32 blocks, 8
warps, 2 stages -> wgmma, 114-144 KB shared memory, some register spills (more with the
extra cache, whose loop keeps a second state live).  Untimed: tune on the GPU.

The split heuristic (FlashMLA's ``get_mla_metadata`` balances the same trade-off): with P
programs of K key bytes each on ``num_sms`` SMs, s splits put ceil(P s / sms) waves of K/s
bytes on the busiest SM, and cost the fp32 partials (out + lse per row) written by the
kernel and read back by the combine, spread over all SMs, plus the combine's launch
(~4 us, counted as the bytes one SM streams in that time: 4 us x 4.3 TB/s / 132).  The
chosen s minimises
    ceil(P s / sms) * K / s  +  [s > 1] * (2 * P * s * partial_bytes / sms + launch)
over 1 <= s <= min(key blocks, 64); ties go to fewer splits.
"""
from __future__ import annotations

import dataclasses

from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fp8_cache import require

MAX_SPLITS = 64
COMBINE_LAUNCH_BYTES = 4e-6 * 4.3e12 / 132     # one SM's share of H200 HBM for ~4 us


@dataclasses.dataclass(frozen=True)
class KernelTuning:
  """Static kernel knobs; see the module docstring."""
  block_q: int | None = None
  block_k: int = 32
  num_splits: int | None = None
  num_warps: int | None = None
  num_stages: int = 2
  num_sms: int = 132

  def validate(self, *, can_split: bool = True) -> "KernelTuning":
    """ValueError naming the field, its value and what was expected."""
    if self.block_q is not None:
      check_pow2("block_q", self.block_q)
    check_pow2("block_k", self.block_k)
    if self.num_splits is not None:
      require(isinstance(self.num_splits, int) and self.num_splits >= 1,
              f"num_splits={self.num_splits!r}: expected an int >= 1 or None")
      require(can_split or self.num_splits == 1,
              f"num_splits={self.num_splits!r}: sparse prefill does not split (expected None or 1)")
    require(self.num_warps is None or (isinstance(self.num_warps, int) and self.num_warps >= 1
                                       and self.num_warps & (self.num_warps - 1) == 0),
            f"num_warps={self.num_warps!r}: expected None or a power of two")
    require(isinstance(self.num_stages, int) and self.num_stages >= 1,
            f"num_stages={self.num_stages!r}: expected an int >= 1")
    require(isinstance(self.num_sms, int) and self.num_sms >= 1,
            f"num_sms={self.num_sms!r}: expected an int >= 1")
    return self

  def rows_per_program(self, rows: int) -> int:
    """block_q, or min(64, rows) rounded up to a power of two >= 16."""
    return self.block_q or min(64, pow2_at_least(rows))

  def compiler_params(self, block_rows: int):
    """Triton backend, named explicitly (with no params pallas_call targets Mosaic GPU)."""
    warps = self.num_warps or (8 if block_rows >= 64 else 4)
    return plgpu.CompilerParams(num_warps=warps, num_stages=self.num_stages)


SparseDecodeTuning = DenseDecodeTuning = SparsePrefillTuning = KernelTuning


def check_tuning(tuning, *, can_split: bool = True) -> KernelTuning:
  """None -> the defaults; anything but a KernelTuning -> ValueError."""
  if tuning is None:
    return KernelTuning()
  require(isinstance(tuning, KernelTuning),
          f"tuning={tuning!r}: expected a pallas_kernels.tuning.KernelTuning or None")
  return tuning.validate(can_split=can_split)


def choose_num_splits(tuning: KernelTuning, *, programs: int, kv_bytes_per_program: float,
                      partial_bytes_per_split: float, max_key_blocks: int,
                      interpret: bool) -> int:
  """Split-KV factor: ``tuning.num_splits`` if set, else the cost model above."""
  if tuning.num_splits is not None:
    return tuning.num_splits
  sms = 2 if interpret else tuning.num_sms
  best, best_cost = 1, None
  for s in range(1, max(1, min(max_key_blocks, MAX_SPLITS)) + 1):
    waves = -(-programs * s // sms)
    cost = waves * kv_bytes_per_program / s
    if s > 1:
      cost += 2 * programs * s * partial_bytes_per_split / sms + COMBINE_LAUNCH_BYTES
    if best_cost is None or cost < best_cost:
      best, best_cost = s, cost
  return best


def pow2_at_least(n: int, floor: int = 16) -> int:
  """Smallest power of two >= max(n, floor) (Triton dots need M, N, K >= 16)."""
  return max(floor, 1 << max(0, (n - 1).bit_length()))


def check_pow2(name: str, v, floor: int = 16) -> None:
  require(isinstance(v, int) and v >= floor and (v & (v - 1)) == 0,
          f"{name}={v!r}: expected a power of two >= {floor} (Triton block shapes)")
