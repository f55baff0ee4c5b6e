"""MLA attention in FlashMLA's two head geometries (docs/design.md §1, §8).

**v32** (DeepSeek-V3.2, "576 heads"): q = wq_b(RMSNorm(wq_a x)) -> [B,T,N,128+64];
the cache vector is c = [RMSNorm(latent) (512) | RoPE(k_pe) (64)] = 576 dims, from
``wkv_a``. Training/prefill expands c per head through ``wkv_b`` (k_nope 128, v 128);
decode *absorbs* ``wkv_b`` into the query and the output so every head attends over the
shared 576-dim vector with value = its first 512 dims (``absorbed=True``). Scale
192^-0.5 (x mscale^2 with YaRN).

**model1** (DeepSeek-V4, "512 heads"): qr = RMSNorm(wq_a x); q = wq_b qr -> [B,T,N,512],
weightless per-head RMSNorm (``q_norm``), RoPE on the last 64. kv = RMSNorm(wkv x)
[B,T,512] with RoPE on its last 64 is key *and* value for every head. Softmax with a
learned per-head sink logit (``sink``). VVPA (``vvpa``): the output's last 64 dims are
rotated back by the query position, so o_i = sum_j a_ij R(j-i) v_j depends only on
relative position; off = those dims are zeroed. Output: grouped low-rank ``wo_a``
[G, (N/G)*512, O] then ``wo_b`` [G*O, D] (``grouped_output``), or a plain ``wo``.

Both forms expose ``cache_vector`` (what a KV cache stores per token, [B,T,d_qk]),
``decode_queries`` (queries against that vector, [B,T,N,d_qk]) and ``decode_output``
(attention over the cache -> [B,T,D]) so the decode path can run FlashMLA-style kernels.

**Sparse attention** (``AttentionConfig.sparse``, docs/design.md §2/§8) runs the MQA form (queries
against the cache vector) over a subset of keys, in query chunks (``attention_core``):
  * ``"dsa"`` (V3.2): a lightning indexer (``indexer.DSAIndexer``) picks the top-k tokens
    per query; its KL loss to the main attention is sown as ``AuxLoss`` "indexer_kl".
    ``dsa_stage="warmup"`` keeps the attention dense and only trains the indexer.
  * ``"compressed"`` (V4): the sliding window of W tokens plus, by layer
    (``compress_ratios[layer_id]``), HCA entries (all complete blocks of r tokens) or CSA
    entries (ratio 4, overlapping, top-k by ``indexer.CSAIndexer``), one softmax with the
    sink. Layers with compression use ``compress_rope`` (YaRN) for all their RoPE.
Decode runs ``pallas_kernels.sparse_decode`` over the caches of ``kv_cache``: DSA over
the paged token cache with top-k indices; V4 over a ring of W window slots (main cache)
plus the compressed entries (extra cache). Inference prefill of the sparse layers can run
``pallas_kernels.sparse_prefill`` instead of the training form (``prefill_kernels(impl)``):
every query of the batch is one row, the key rows are the batch's tokens (DSA) or its
tokens followed by its compressed entries (V4), and the indices pick the top-k tokens
(DSA) or the window rows plus the HCA / CSA entries (V4).
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx

from model1 import qat, sharding
from model1.attention_core import (attend, attend_sources, band_keys, band_slice,
                                   causal_segment_mask, gather_rows, over_query_chunks,
                                   visible)
from model1.compressor import Compressor
from model1.config import AttentionConfig
from model1.indexer import CSAIndexer, DSAIndexer, index_scores, kl_loss, select_topk
from model1.layers import AuxLoss, Dense, RMSNorm, apply_rope, rms_norm, yarn_mscale

_HEADS = ("batch", "activation_length", "activation_heads", None)

# The sparse layers' full-sequence attention: None = the training form (differentiable,
# sows the indexer KL); "xla" / "pallas" = pallas_kernels.sparse_prefill (inference only).
_PREFILL_IMPL = contextvars.ContextVar("model1_prefill_impl", default=None)


@contextlib.contextmanager
def prefill_kernels(impl: str | None):
  """Within this context (read when the forward is traced), DSA and V4 compressed layers
  attend with ``pallas_kernels.sparse_prefill(..., impl=impl)``: for inference (no
  gradients through the attention, no indexer KL). None: the training form."""
  token = _PREFILL_IMPL.set(impl)
  try:
    yield
  finally:
    _PREFILL_IMPL.reset(token)


class MLA(nnx.Module):

  def __init__(self, cfg: AttentionConfig, d_model: int, rngs: nnx.Rngs,
               out_std: float | None = None, layer_id: int = 0):
    cfg.validate()
    self.cfg = cfg
    self.layer_id = layer_id
    self.ratio = cfg.compress_ratio(layer_id)     # V4: 0 window only, 4 CSA, else HCA
    self.rope = cfg.layer_rope(layer_id)
    N, r = cfg.n_heads, cfg.rope.dim
    self.wq_a = Dense(d_model, cfg.q_lora_rank, ("embed", "q_lora"), rngs)
    self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
    if cfg.geometry == "v32":
      qk = cfg.qk_nope_head_dim + r
      self.wq_b = Dense(cfg.q_lora_rank, (N, qk), ("q_lora", "heads", "head_dim"), rngs)
      self.wkv_a = Dense(d_model, cfg.kv_lora_rank + r, ("embed", "kv_lora"), rngs)
      self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
      self.wkv_b = Dense(cfg.kv_lora_rank, (N, cfg.qk_nope_head_dim + cfg.v_head_dim),
                         ("kv_lora", "heads", "head_dim"), rngs)
      self.wo = Dense(N * cfg.v_head_dim, d_model, ("heads", "embed"), rngs, std=out_std)
      self.scale = qk ** -0.5 * yarn_mscale(self.rope)
    else:
      H = cfg.head_dim
      self.wq_b = Dense(cfg.q_lora_rank, (N, H), ("q_lora", "heads", "head_dim"), rngs)
      self.wkv = Dense(d_model, H, ("embed", "kv_lora"), rngs)
      self.kv_norm = RMSNorm(H, cfg.norm_eps)
      if cfg.sink:
        self.attn_sink = nnx.Param(jnp.zeros((N,), jnp.float32), logical_axes=("heads",))
      if cfg.grouped_output:
        G = cfg.o_groups
        self.wo_a = sharding.param(
            jax.nn.initializers.truncated_normal(1.0 / math.sqrt(N // G * H)), rngs.params(),
            (G, N // G * H, cfg.o_lora_rank), ("o_groups", None, "o_lora"))
        self.wo_b = Dense(G * cfg.o_lora_rank, d_model, ("o_lora", "embed"), rngs,
                          std=out_std)
      else:
        self.wo = Dense(N * H, d_model, ("heads", "embed"), rngs, std=out_std)
      self.scale = H ** -0.5 * yarn_mscale(self.rope)
    if cfg.sparse == "dsa":
      self.indexer = DSAIndexer(cfg, d_model, rngs)
    if self.ratio:
      self.compressor = Compressor(d_model, cfg.head_dim, self.ratio, self.rope, cfg.norm_eps,
                                   rngs, quant="fp8_nope" if cfg.qat else None)
      if self.ratio == 4:
        self.indexer = CSAIndexer(cfg, d_model, self.rope, self.ratio, rngs)

  # ----------------------------------------------------------------- projections
  def _qr(self, x_BTD):
    """The query low-rank state qr = RMSNorm(wq_a x) (the indexers read it too)."""
    return self.q_norm(self.wq_a(x_BTD))

  def _q(self, x_BTD, positions_BT, qr_BTQ=None):
    q_BTNH = self.wq_b(self._qr(x_BTD) if qr_BTQ is None else qr_BTQ)
    if self.cfg.geometry == "model1" and self.cfg.q_norm:
      q_BTNH = rms_norm(q_BTNH, self.cfg.norm_eps)
    q_BTNH = apply_rope(q_BTNH, positions_BT, self.rope)
    return sharding.constrain(q_BTNH, _HEADS)

  def cache_vector(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
    """The per-token vector a KV cache stores: [B,T,576] (v32) or [B,T,512] (model1)."""
    c = self.cfg
    if c.geometry == "v32":
      kv = self.wkv_a(x_BTD)
      latent = self.kv_norm(kv[..., :c.kv_lora_rank])
      kpe = apply_rope(kv[..., c.kv_lora_rank:], positions_BT, self.rope)
      kv_BTH = jnp.concatenate([latent, kpe], axis=-1)
    else:
      kv_BTH = apply_rope(self.kv_norm(self.wkv(x_BTD)), positions_BT, self.rope)
    if c.qat:  # V4 (and V3.2's cache simulation): FP8-round the NoPE dims, pow2 scales
      kv_BTH = qat.fake_quant_nope(kv_BTH, self.rope.dim, 128 if c.geometry == "v32" else 64)
    return kv_BTH

  def sink(self) -> jax.Array | None:
    return self.attn_sink[...] if self.cfg.geometry == "model1" and self.cfg.sink else None

  # ----------------------------------------------------------------- output side
  def _model1_output(self, o_BTNH: jax.Array, positions_BT: jax.Array) -> jax.Array:
    c = self.cfg
    if c.vvpa:
      o_BTNH = apply_rope(o_BTNH, positions_BT, self.rope, inverse=True)
    else:
      o_BTNH = o_BTNH.at[..., -c.rope.dim:].set(0)
    B, T, N, H = o_BTNH.shape
    if c.grouped_output:
      G = c.o_groups
      o_BTGK = o_BTNH.reshape(B, T, G, N // G * H)
      z_BTGO = jnp.einsum("btgk,gko->btgo", o_BTGK, self.wo_a[...].astype(o_BTNH.dtype))
      return self.wo_b(z_BTGO.reshape(B, T, G * c.o_lora_rank))
    return self.wo(o_BTNH.reshape(B, T, N * H))

  def _v32_wkv_b(self, dtype):
    c = self.cfg
    w_LNX = self.wkv_b.weight[...].astype(dtype)
    return w_LNX[..., :c.qk_nope_head_dim], w_LNX[..., c.qk_nope_head_dim:]

  def decode_queries(self, x_BTD: jax.Array, positions_BT: jax.Array,
                     qr_BTQ: jax.Array | None = None) -> jax.Array:
    """Queries against the cache vector: [B,T,N,d_qk] (v32: wkv_b absorbed)."""
    q_BTNH = self._q(x_BTD, positions_BT, qr_BTQ)
    if self.cfg.geometry == "model1":
      return q_BTNH
    wk_LNP, _ = self._v32_wkv_b(q_BTNH.dtype)
    P = self.cfg.qk_nope_head_dim
    q_BTNL = jnp.einsum("btnp,lnp->btnl", q_BTNH[..., :P], wk_LNP)
    return jnp.concatenate([q_BTNL, q_BTNH[..., P:]], axis=-1)

  def decode_output(self, o_BTNV: jax.Array, positions_BT: jax.Array) -> jax.Array:
    """Attention output over cache vectors (value = first 512 dims (v32) or the whole
    512-dim vector (model1)) -> [B,T,D]."""
    if self.cfg.geometry == "model1":
      return self._model1_output(o_BTNV, positions_BT)
    _, wv_LNV = self._v32_wkv_b(o_BTNV.dtype)
    o_BTNV = jnp.einsum("btnl,lnv->btnv", o_BTNV, wv_LNV)
    B, T = o_BTNV.shape[:2]
    return self.wo(o_BTNV.reshape(B, T, -1))

  # ----------------------------------------------------------------- training form
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
               absorbed: bool = False, return_kv: bool = False):
    """Full-sequence causal attention within segments. ``absorbed`` runs the decode
    (MQA over the cache vector) form; both forms give the same result. ``return_kv``
    also returns the cache vectors [B,T,d_qk] (prefill writes them to the KV cache)."""
    y, kv = self._forward(x_BTD, positions_BT, segment_ids_BT, absorbed)
    return (y, kv) if return_kv else y

  def _forward(self, x_BTD, positions_BT, segment_ids_BT, absorbed):
    c = self.cfg
    if c.sparse == "dsa":
      return self._forward_dsa(x_BTD, positions_BT, segment_ids_BT)
    if c.sparse == "compressed":
      return self._forward_compressed(x_BTD, positions_BT, segment_ids_BT)
    mask_BTS = causal_segment_mask(segment_ids_BT)
    kv_BSH = self.cache_vector(x_BTD, positions_BT)
    if absorbed or c.geometry == "model1":
      q_BTNH = self.decode_queries(x_BTD, positions_BT)
      d_v = c.kv_lora_rank if c.geometry == "v32" else c.head_dim
      o = attend(q_BTNH, kv_BSH[:, :, None], kv_BSH[:, :, None, :d_v], mask_BTS,
                 self.scale, self.sink())
      o = sharding.constrain(o, _HEADS)
      return self.decode_output(o, positions_BT), kv_BSH
    # v32 expanded form: per-head keys/values from the latent through wkv_b
    q_BTNH = self._q(x_BTD, positions_BT)
    wk_LNP, wv_LNV = self._v32_wkv_b(x_BTD.dtype)
    latent_BSL, kpe_BSR = kv_BSH[..., :c.kv_lora_rank], kv_BSH[..., c.kv_lora_rank:]
    k_nope_BSNP = jnp.einsum("bsl,lnp->bsnp", latent_BSL, wk_LNP)
    v_BSNV = jnp.einsum("bsl,lnv->bsnv", latent_BSL, wv_LNV)
    kpe_BSNR = jnp.broadcast_to(kpe_BSR[:, :, None], kpe_BSR.shape[:2] + (c.n_heads, c.rope.dim))
    k_BSNH = jnp.concatenate([k_nope_BSNP, kpe_BSNR], axis=-1)
    k_BSNH = sharding.constrain(k_BSNH, _HEADS)
    o_BTNV = attend(q_BTNH, k_BSNH, v_BSNV, mask_BTS, self.scale)
    o_BTNV = sharding.constrain(o_BTNV, _HEADS)
    B, T = o_BTNV.shape[:2]
    return self.wo(o_BTNV.reshape(B, T, -1)), kv_BSH

  @property
  def d_v(self) -> int:
    return self.cfg.kv_lora_rank if self.cfg.geometry == "v32" else self.cfg.head_dim

  def _sow_kl(self, p_BTU, scores_BTU, valid_BTU):
    if self.cfg.index_kl_weight > 0:
      self.sow(AuxLoss, "indexer_kl",
               self.cfg.index_kl_weight * kl_loss(p_BTU, scores_BTU, valid_BTU))

  def _forward_dsa(self, x_BTD, positions_BT, seg_BT):
    """V3.2 DSA: MQA-form attention over the indexer's top-k tokens (dense in warm-up)."""
    c = self.cfg
    T = x_BTD.shape[1]
    qr_BTQ = self._qr(x_BTD)
    q_BTNH = self.decode_queries(x_BTD, positions_BT, qr_BTQ)
    kv_BSH = self.cache_vector(x_BTD, positions_BT)
    x_in, qr_in = jax.lax.stop_gradient((x_BTD, qr_BTQ))  # L_I never reaches the model
    k_BSJ = self.indexer.keys(x_in, positions_BT)
    qi_BTIJ, wi_BTI = self.indexer.queries(x_in, qr_in, positions_BT)
    rows_S = jnp.arange(T)
    vis = lambda c0, C, seg_BA: visible(c0 + jnp.arange(C), seg_BA, rows_S, seg_BT)
    sink = self.sink()
    if c.dsa_stage == "warmup":  # dense attention; the KL sees every visible key (T^2)
      def chunk_fn(c0, qs):
        m_BAS = vis(c0, qs["q"].shape[1], qs["seg"])
        o, (p_BAS,) = attend_sources(qs["q"], [(kv_BSH, m_BAS)], self.scale, sink, self.d_v)
        return o, p_BAS, index_scores(qs["qi"], k_BSJ, qs["wi"]), m_BAS
      o_BTNV, p_BTU, s_BTU, valid_BTU = over_query_chunks(
          chunk_fn, {"q": q_BTNH, "seg": seg_BT, "qi": qi_BTIJ, "wi": wi_BTI}, T, c.attn_chunk)
    else:
      idx_BTX, valid_BTU = select_topk(qi_BTIJ, k_BSJ, wi_BTI, seg_BT, vis, c.index_topk,
                                       c.attn_chunk)
      impl = _PREFILL_IMPL.get()
      if impl is not None:  # inference: the kernel over the batch's tokens as key rows
        b_B11 = jnp.arange(x_BTD.shape[0])[:, None, None]
        o_BTNV = self._prefill_kernel(q_BTNH, [kv_BSH],
                                      jnp.where(valid_BTU, b_B11 * T + idx_BTX, -1), impl)
        return self.decode_output(o_BTNV, positions_BT), {"kv": kv_BSH, "index_k": k_BSJ}
      def chunk_fn(c0, qs):
        k_BAXH = gather_rows(kv_BSH, qs["idx"])
        o, (p_BAX,) = attend_sources(qs["q"], [(k_BAXH, qs["ok"])], self.scale, sink,
                                     self.d_v)
        return o, p_BAX, index_scores(qs["qi"], gather_rows(k_BSJ, qs["idx"]), qs["wi"])
      o_BTNV, p_BTU, s_BTU = over_query_chunks(
          chunk_fn, {"q": q_BTNH, "idx": idx_BTX, "ok": valid_BTU, "qi": qi_BTIJ,
                     "wi": wi_BTI}, T, c.attn_chunk)
    self._sow_kl(p_BTU, s_BTU, valid_BTU)
    o_BTNV = sharding.constrain(o_BTNV, _HEADS)
    return self.decode_output(o_BTNV, positions_BT), {"kv": kv_BSH, "index_k": k_BSJ}

  def _forward_compressed(self, x_BTD, positions_BT, seg_BT):
    """V4: window (band) + HCA entries (dense) or CSA entries (top-k), one softmax."""
    c, r, W = self.cfg, self.ratio, self.cfg.window_size
    B, T, _ = x_BTD.shape
    qr_BTQ = self._qr(x_BTD)
    q_BTNH = self._q(x_BTD, positions_BT, qr_BTQ)
    kv_BSH = self.cache_vector(x_BTD, positions_BT)
    out = {"kv": kv_BSH}
    C = min(c.attn_chunk, T)
    band = band_keys(kv_BSH, seg_BT, W, -(-T // C) * C)
    qs = {"q": q_BTNH, "seg": seg_BT}
    M = T // r if r else 0                            # complete blocks (may be 0)
    csa, sparse = r == 4 and M > 0, c.dsa_stage == "sparse"
    if r:
      comp_BMH, cseg_BM, (ckv, csc) = self.compressor(x_BTD, positions_BT, seg_BT)
      crow_M = (jnp.arange(M) + 1) * r - 1          # an entry is complete at its last row
      out.update(comp=comp_BMH, ckv=ckv, cscore=csc)
    if r == 4:
      x_in, qr_in = jax.lax.stop_gradient((x_BTD, qr_BTQ))
      ik_BMJ, iseg_BM, (ikv, isc) = self.indexer.compressor(x_in, positions_BT, seg_BT)
      out.update(icomp=ik_BMJ, ickv=ikv, icscore=isc)
    if csa:
      qs["qi"], qs["wi"] = self.indexer.queries(x_in, qr_in, positions_BT)
      if sparse:
        vis = lambda c0, Cq, seg_BA: visible(c0 + jnp.arange(Cq), seg_BA, crow_M, iseg_BM)
        qs["idx"], qs["ok"] = select_topk(qs["qi"], ik_BMJ, qs["wi"], seg_BT, vis,
                                          c.index_topk, c.attn_chunk)

    impl = _PREFILL_IMPL.get()
    if impl is not None:  # inference: the kernel over [tokens; entries] as key rows
      rows_T, b_B11 = jnp.arange(T), jnp.arange(B)[:, None, None]
      j_BTW = jnp.broadcast_to(rows_T[:, None] - W + 1 + jnp.arange(W), (B, T, W))
      seg_j = jnp.take_along_axis(seg_BT, jnp.clip(j_BTW, 0).reshape(B, -1), 1).reshape(j_BTW.shape)
      ok_BTW = (j_BTW >= 0) & (seg_j == seg_BT[..., None]) & (seg_BT[..., None] != 0)
      idx = [jnp.where(ok_BTW, b_B11 * T + j_BTW, -1)]
      rows = [kv_BSH]
      if M:
        if csa and sparse:
          e_BTX, ok_BTX = qs["idx"], qs["ok"]
        else:
          e_BTX = jnp.broadcast_to(jnp.arange(M), (B, T, M))
          ok_BTX = visible(rows_T, seg_BT, crow_M, cseg_BM)
        idx.append(jnp.where(ok_BTX, B * T + b_B11 * M + e_BTX, -1))
        rows.append(comp_BMH)
      o_BTNH = self._prefill_kernel(q_BTNH, rows, jnp.concatenate(idx, -1), impl)
      return self._model1_output(o_BTNH, positions_BT), out

    def chunk_fn(c0, qc):
      Cq = qc["q"].shape[1]
      qrow_A = c0 + jnp.arange(Cq)
      k_BUH, seg_BU, row_U = band_slice(band, W, c0, Cq)
      srcs = [(k_BUH, visible(qrow_A, qc["seg"], row_U, seg_BU, W))]
      if M and csa and sparse:
        srcs.append((gather_rows(comp_BMH, qc["idx"]), qc["ok"]))
      elif M:
        srcs.append((comp_BMH, visible(qrow_A, qc["seg"], crow_M, cseg_BM)))
      o, probs = attend_sources(qc["q"], srcs, self.scale, self.sink(), c.head_dim)
      if not csa:
        return (o,)
      if sparse:  # the KL over the selected entries only
        ik_BAXJ = gather_rows(ik_BMJ, qc["idx"])
        return o, probs[1], index_scores(qc["qi"], ik_BAXJ, qc["wi"]), qc["ok"]
      return o, probs[1], index_scores(qc["qi"], ik_BMJ, qc["wi"]), srcs[1][1]

    res = over_query_chunks(chunk_fn, qs, T, c.attn_chunk)
    if csa:
      self._sow_kl(*res[1:])
    o_BTNH = sharding.constrain(res[0], _HEADS)
    return self._model1_output(o_BTNH, positions_BT), out

  def _prefill_kernel(self, q_BTNH, rows, idx_BTX, impl):
    """``sparse_prefill`` with every query of the batch as one row: ``rows`` ([B, S_i, H]
    each) are flattened and concatenated into the key rows that ``idx_BTX`` (-1 invalid)
    index. Returns [B,T,N,V] in q's dtype."""
    from pallas_kernels import mosaic_sparse_prefill
    from pallas_kernels.dispatch import model_kernel_impl
    from pallas_kernels.sparse_prefill import sparse_prefill
    B, T, N, H = q_BTNH.shape
    kv_S1H = jnp.concatenate([r.reshape(-1, H) for r in rows])[:, None].astype(jnp.bfloat16)
    impl = model_kernel_impl(impl, lambda: mosaic_sparse_prefill.supports(
        {"q": q_BTNH.reshape(B * T, N, H), "kv": kv_S1H}, self.d_v))
    sink = self.sink()
    o_RNV, _, _ = sparse_prefill(
        q_BTNH.reshape(B * T, N, H).astype(jnp.bfloat16), kv_S1H,
        idx_BTX.reshape(B * T, 1, -1).astype(jnp.int32), sm_scale=self.scale, d_v=self.d_v,
        attn_sink=None if sink is None else sink.astype(jnp.float32), impl=impl)
    return o_RNV.reshape(B, T, N, -1).astype(q_BTNH.dtype)

  # ----------------------------------------------------------------- decode form
  def decode(self, x_BTD: jax.Array, positions_BT: jax.Array, cache, block_table_BZ,
             seqlens_B, valid_BT, impl: str = "xla"):
    """Write this step's cache vectors into the paged ``cache`` and attend over it with
    FlashMLA semantics (``pallas_kernels.dense_decode``): queries are the new tokens at
    the end of each sequence (causal when T > 1). Returns (y [B,T,D], new cache)."""
    from model1.kv_cache import dense_decode, slots_for, write_layer
    from pallas_kernels import combine
    from pallas_kernels.dispatch import resolve_impl
    c = self.cfg
    impl = resolve_impl(impl)  # "auto" -> the backend's fastest
    if c.sparse == "dsa":
      return self._decode_dsa(x_BTD, positions_BT, cache, block_table_BZ, valid_BT, impl)
    if c.sparse == "compressed":  # one token at a time: the compressor state is sequential
      ys = []
      for t in range(x_BTD.shape[1]):
        y, cache = self._decode_compressed(x_BTD[:, t:t + 1], positions_BT[:, t], cache,
                                           valid_BT[:, t], impl)
        ys.append(y)
      return jnp.concatenate(ys, axis=1), cache
    kv_BTH = self.cache_vector(x_BTD, positions_BT)
    cache = write_layer(cache, kv_BTH, slots_for(block_table_BZ, positions_BT,
                                                 cache.block_size, valid_BT))
    q_BTNH = self.decode_queries(x_BTD, positions_BT)  # bf16 for the kernels, f32 cache: f32
    d_v = c.kv_lora_rank if c.geometry == "v32" else c.head_dim
    o_BTNV, lse_BNT = dense_decode(q_BTNH, cache, block_table_BZ, seqlens_B, head_dim_v=d_v,
                                   softmax_scale=self.scale, causal=x_BTD.shape[1] > 1,
                                   impl=impl)
    sink = self.sink()
    if sink is not None:  # FlashMLA's lse excludes the sink: out *= 1/(1+exp(sink-lse))
      f_BTN = combine.sink_factor(jnp.swapaxes(lse_BNT, 1, 2), sink)
      o_BTNV = o_BTNV.astype(jnp.float32) * f_BTN[..., None]
    return self.decode_output(o_BTNV.astype(x_BTD.dtype), positions_BT), cache

  def _decode_dsa(self, x_BTD, positions_BT, cache, block_table_BZ, valid_BT, impl):
    """DSA decode: index keys of every cached token (paged like the KV cache), top-k by
    the indexer, then ``sparse_decode`` over the FP8/bf16 token cache."""
    from model1.kv_cache import DSALayerCache, slots_for, sparse_decode, write_layer
    c = self.cfg
    B = x_BTD.shape[0]
    slots_BT = slots_for(block_table_BZ, positions_BT, cache.kv.block_size, valid_BT)
    kv_cache = write_layer(cache.kv, self.cache_vector(x_BTD, positions_BT), slots_BT)
    ik_NJ = cache.index_k.reshape(-1, cache.index_k.shape[-1])
    new_k_BTJ = self.indexer.keys(x_BTD, positions_BT).astype(ik_NJ.dtype)
    ik_NJ = ik_NJ.at[slots_BT.reshape(-1)].set(new_k_BTJ.reshape(-1, ik_NJ.shape[-1]),
                                                mode="drop")
    Y = cache.kv.block_size
    tok_BS = (block_table_BZ[:, :, None] * Y + jnp.arange(Y)).reshape(B, -1)  # pos -> slot
    qr_BTQ = self._qr(x_BTD)
    qi_BTIJ, wi_BTI = self.indexer.queries(x_BTD, qr_BTQ, positions_BT)
    s_BTS = index_scores(qi_BTIJ, ik_NJ[tok_BS], wi_BTI)
    s_BTS = jnp.where(jnp.arange(tok_BS.shape[1]) <= positions_BT[..., None], s_BTS, -jnp.inf)
    val_BTX, pick_BTX = jax.lax.top_k(s_BTS, min(c.index_topk, tok_BS.shape[1]))
    idx_BTX = jnp.where(val_BTX > -jnp.inf,
                        jnp.take_along_axis(tok_BS[:, None], pick_BTX, axis=2), -1)
    q_BTNH = self.decode_queries(x_BTD, positions_BT, qr_BTQ)
    o_BTNV, _ = sparse_decode(q_BTNH, kv_cache, idx_BTX.astype(jnp.int32), head_dim_v=self.d_v,
                              softmax_scale=self.scale, attn_sink=self.sink(), impl=impl)
    y = self.decode_output(o_BTNV.astype(x_BTD.dtype), positions_BT)
    return y, DSALayerCache(kv_cache, ik_NJ.reshape(cache.index_k.shape))

  def _decode_compressed(self, x_B1D, pos_B, cache, valid_B, impl):
    """V4 decode of one token per sequence: the window is a ring of W slots (sequence b
    owns block b of ``cache.window``), the compressed entries the extra cache (block b of
    ``cache.comp``); the compressor state emits entry pos//r when (pos+1) % r == 0."""
    import dataclasses
    from model1.kv_cache import sparse_decode, write_layer
    c, r, W = self.cfg, self.ratio, self.cfg.window_size
    B = x_B1D.shape[0]
    b_B = jnp.arange(B)
    kv_B1H = self.cache_vector(x_B1D, pos_B[:, None])
    window = write_layer(cache.window, kv_B1H, jnp.where(valid_B, b_B * W + pos_B % W, -1)[:, None])
    wpos_BW = pos_B[:, None] - W + 1 + jnp.arange(W)
    widx_BW = jnp.where(wpos_BW >= 0, b_B[:, None] * W + wpos_BW % W, -1)
    new, extra = {"window": window}, {}
    keep = lambda old, upd: jax.tree.map(
        lambda o, u: jnp.where(valid_B.reshape((B,) + (1,) * (o.ndim - 1)), u, o), old, upd)
    if r:
      Mx = cache.comp.block_size
      entry_BH, emit_B, state = self.compressor.step(x_B1D, pos_B, cache.state, x_B1D.dtype)
      slot_B = jnp.where(emit_B & valid_B, b_B * Mx + pos_B // r, -1)
      new.update(comp=write_layer(cache.comp, entry_BH[:, None], slot_B[:, None]),
                 state=keep(cache.state, state))
      visible_BM = jnp.arange(Mx)[None] < ((pos_B + 1) // r)[:, None]
      if r == 4:  # CSA: the indexer picks top-k among the visible entries
        ie_BJ, _, istate = self.indexer.compressor.step(x_B1D, pos_B, cache.istate,
                                                        x_B1D.dtype)
        j_B = jnp.where(emit_B & valid_B, pos_B // r, Mx)            # Mx: dropped
        icomp = cache.icomp.at[b_B, j_B].set(ie_BJ.astype(cache.icomp.dtype), mode="drop")
        new.update(icomp=icomp, istate=keep(cache.istate, istate))
        qi_B1IJ, wi_B1I = self.indexer.queries(x_B1D, self._qr(x_B1D), pos_B[:, None])
        s_BM = index_scores(qi_B1IJ, icomp, wi_B1I)[:, 0]
        val_BX, j_BX = jax.lax.top_k(jnp.where(visible_BM, s_BM, -jnp.inf),
                                     min(c.index_topk, Mx))
        eidx_BX = jnp.where(val_BX > -jnp.inf, b_B[:, None] * Mx + j_BX, -1)
      else:  # HCA: every complete entry
        eidx_BX = jnp.where(visible_BM, b_B[:, None] * Mx + jnp.arange(Mx), -1)
      extra = dict(extra_k_cache=new["comp"],
                   extra_indices_in_kvcache=eidx_BX[:, None].astype(jnp.int32))
    q_B1NH = self.decode_queries(x_B1D, pos_B[:, None])
    o_B1NV, _ = sparse_decode(q_B1NH, window, widx_BW[:, None].astype(jnp.int32),
                              head_dim_v=c.head_dim, softmax_scale=self.scale,
                              attn_sink=self.sink(), impl=impl, **extra)
    y = self._model1_output(o_B1NV.astype(x_B1D.dtype), pos_B[:, None])
    return y, dataclasses.replace(cache, **new)
