"""Packed documents: positions and attention masks from per-position document ids.

`doc_ids` [B, T] (int) name the document of every position; a document is a maximal run of equal
ids along T (ids are non-decreasing in packed data; -1 padding is a run like any other), as in
`kernels.feedback_solve`. Position t sees position j iff start(t) <= j <= t, start(t) the first
position of t's document (forward attention; the feedback solve uses the strict past, j < t).
"""
import torch


def check_doc_ids(doc_ids: torch.Tensor, batch: int, length: int, name: str = "doc_ids") -> None:
    """A clear error unless `doc_ids` is an integer [batch, length] tensor."""
    if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (document index per position), got {doc_ids.dtype}")
    if tuple(doc_ids.shape) != (batch, length):
        raise ValueError(f"{name} must have shape [batch, seq_len] = [{batch}, {length}] (full length on every "
                         f"tensor-parallel and pipeline rank), got {list(doc_ids.shape)}")


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T] int64 positions restarting at 0 at each document start (RoPE positions)."""
    T = doc_ids.shape[-1]
    index = torch.arange(T, device=doc_ids.device).expand(doc_ids.shape)
    starts = torch.ones(doc_ids.shape, dtype=torch.bool, device=doc_ids.device)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    start_index = torch.where(starts, index, 0).cummax(dim=-1).values
    return index - start_index


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> boolean [B, 1, T, T]: query t sees key j iff start(t) <= j <= t (SDPA's `attn_mask`;
    every row keeps its diagonal, so no softmax is empty)."""
    T = doc_ids.shape[-1]
    index = torch.arange(T, device=doc_ids.device)
    starts = index - positions_from_doc_ids(doc_ids)  # [B, T]
    causal = index[None, :] <= index[:, None]  # [T, T]
    return (causal & (index[None, None, :] >= starts[:, :, None]))[:, None]


_flex_cache: dict = {}


def _flex():
    """(compiled flex_attention, create_block_mask), or None when this torch has no flex attention."""
    if "fns" not in _flex_cache:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            _flex_cache["fns"] = None
        else:
            _flex_cache["fns"] = (torch.compile(flex_attention, dynamic=False), create_block_mask)
    return _flex_cache["fns"]


def flex_document_block_mask(doc_ids: torch.Tensor, block_size: int = 128):
    """flex_attention's BlockMask of `block_causal_mask(doc_ids)`, built from the document starts
    block by block (O(B (T / block)^2) integers, never a T x T mask): tiles with no visible pair
    are skipped, tiles inside one document's causal past run unmasked. Built once per doc_ids
    tensor and reused by every layer of a forward pass."""
    cached = _flex_cache.get("mask")
    if cached is not None and cached[0] is doc_ids and cached[1] == (doc_ids._version, block_size):
        return cached[2]
    from torch.nn.attention.flex_attention import BlockMask

    B, T = doc_ids.shape
    starts = torch.arange(T, device=doc_ids.device) - positions_from_doc_ids(doc_ids)  # [B, T], non-decreasing
    blocks = -(-T // block_size)
    first_row = torch.arange(blocks, device=doc_ids.device) * block_size
    last_row = (first_row + block_size).clamp(max=T) - 1
    q_block = torch.arange(blocks, device=doc_ids.device)[:, None]  # [Q, 1]
    kv_block = torch.arange(blocks, device=doc_ids.device)[None, :]  # [1, K]
    # Query tile i sees key tile j iff some row's document reaches into j: from its first row's start.
    seen = (kv_block <= q_block) & (kv_block >= (starts[:, first_row] // block_size)[:, :, None])  # [B, Q, K]
    # Every pair of (i, j) is visible iff j is strictly earlier and starts at or after the last row's
    # start; a query tile cut short by T stays partial (as create_block_mask pads it with masked rows).
    full = ((kv_block < q_block) & (kv_block * block_size >= starts[:, last_row][:, :, None])
            & (last_row - first_row + 1 == block_size)[:, None])
    partial = seen & ~full

    def as_indices(tiles):  # [B, Q, K] bool -> counts [B, 1, Q], indices [B, 1, Q, K] (visible first)
        order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)
        return tiles.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    def document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx >= starts[b, q_idx])

    mask = BlockMask.from_kv_blocks(*as_indices(partial), *as_indices(full), BLOCK_SIZE=block_size,
                                    mask_mod=document_causal, seq_lengths=(T, T))
    _flex_cache["mask"] = (doc_ids, (doc_ids._version, block_size), mask)  # holds doc_ids: its storage is not reused
    return mask


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor,
                       use_flex: bool | None = None, tile: int = 256, scale: float | None = None) -> torch.Tensor:
    """Causal attention within documents. q [B, H, T, d], k/v [B, H_kv, T, d] -> [B, H, T, d];
    `scale` multiplies the logits (None: 1 / sqrt(d)).

    `use_flex` None: flex_attention (compiled, block-sparse) on CUDA when this torch has it.
    Otherwise SDPA per tile of `tile` queries against only the keys its documents can see (from
    the tile's earliest document start), with the block-causal boolean mask of that rectangle:
    no T x T mask, and fewer visible pairs cost less.
    """
    if use_flex is None:
        use_flex = q.is_cuda and _flex() is not None
    if use_flex:
        flex_attention, _ = _flex()
        return flex_attention(q, k, v, block_mask=flex_document_block_mask(doc_ids), scale=scale,
                              enable_gqa=q.shape[1] != k.shape[1])
    T = q.shape[2]
    index = torch.arange(T, device=q.device)
    starts = index - positions_from_doc_ids(doc_ids)  # [B, T], non-decreasing along T
    outputs = []
    for q0 in range(0, T, tile):
        q1 = min(q0 + tile, T)
        k0 = int(starts[:, q0].min())  # documents are contiguous: no query of the tile sees before this
        keys, queries = index[k0:q1], index[q0:q1]
        visible = (keys[None, None, :] <= queries[None, :, None]) & (keys[None, None, :] >= starts[:, q0:q1, None])
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], attn_mask=visible[:, None], enable_gqa=True, scale=scale))
    return torch.cat(outputs, dim=2)


def visible_pairs(doc_ids: torch.Tensor) -> int:
    """(query, key) pairs with key <= query in the same document, summed over the batch [B, T]."""
    starts = torch.ones(doc_ids.shape, dtype=torch.bool, device=doc_ids.device)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    lengths = torch.diff(torch.nonzero(torch.cat([starts.reshape(-1), starts.new_ones(1)])).flatten())
    return int((lengths * (lengths + 1) // 2).sum())
