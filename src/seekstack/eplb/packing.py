"""Greedy cardinality-constrained packing, vectorised over rows (layers, or layers × nodes).

Items are visited heaviest first; each goes to the lightest pack that still has room (ties: the lowest pack
index). Every pack ends with exactly `num_items / num_packs` items. This is EPLB's `balanced_packing`, but one
step handles all rows at once, so the Python loop runs `num_items` times instead of `rows × num_items` times.

With `labels`, items that share a label (replicas of one logical expert) are never put in the same pack
(deepseek-ai/EPLB#22). The greedy choice then skips packs that already hold the label; in the rare row where every
pack with room holds it, one earlier item is swapped out of the way (see `_unstick`).

Shape legend: R rows, N items per row, P packs, L labels.
"""

from __future__ import annotations

import torch


def balanced_packing(
    weight_RN: torch.Tensor, num_packs: int, labels_RN: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack N weighted items of every row into `num_packs` packs of N / num_packs items each.

    Returns `(pack_index_RN, rank_in_pack_RN)`, int64.

    >>> w = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    >>> balanced_packing(w, 2)[0].tolist()
    [[0, 1, 1, 0]]
    """
    num_rows, num_items = weight_RN.shape
    items_per_pack = num_items // num_packs
    assert items_per_pack * num_packs == num_items
    if items_per_pack == 1 and labels_RN is None:
        pack_index = torch.arange(num_items, dtype=torch.int64).expand(num_rows, -1).clone()
        return pack_index, torch.zeros_like(pack_index)

    rows = torch.arange(num_rows)
    # Stable sort: among equal weights the lower item index is placed first.
    order_RN = torch.sort(weight_RN, dim=-1, descending=True, stable=True).indices
    pack_load_RP = torch.zeros(num_rows, num_packs, dtype=weight_RN.dtype)
    pack_size_RP = torch.zeros(num_rows, num_packs, dtype=torch.int64)
    pack_index = torch.empty(num_rows, num_items, dtype=torch.int64)
    rank_in_pack = torch.empty(num_rows, num_items, dtype=torch.int64)
    if labels_RN is not None:
        num_labels = int(labels_RN.max()) + 1
        holds_RPL = torch.zeros(num_rows, num_packs, num_labels, dtype=torch.bool)

    for step in range(num_items):
        item_R = order_RN[:, step]
        w_R = weight_RN[rows, item_R]
        blocked_RP = pack_size_RP >= items_per_pack
        if labels_RN is not None:
            label_R = labels_RN[rows, item_R]
            blocked_RP = blocked_RP | holds_RPL[rows, :, label_R]
            stuck_R = blocked_RP.all(dim=1)
            if bool(stuck_R.any()):
                for r in stuck_R.nonzero().flatten().tolist():
                    _unstick(r, int(label_R[r]), weight_RN, labels_RN, pack_index, rank_in_pack, order_RN[r, :step],
                             pack_load_RP, pack_size_RP, holds_RPL, items_per_pack)  # fmt: skip
                blocked_RP = (pack_size_RP >= items_per_pack) | holds_RPL[rows, :, label_R]
        pack_R = torch.where(blocked_RP, torch.inf, pack_load_RP).argmin(dim=1)
        pack_index[rows, item_R] = pack_R
        rank_in_pack[rows, item_R] = pack_size_RP[rows, pack_R]
        pack_load_RP[rows, pack_R] += w_R
        pack_size_RP[rows, pack_R] += 1
        if labels_RN is not None:
            holds_RPL[rows, pack_R, label_R] = True
    return pack_index, rank_in_pack


def _unstick(r, label, weight_RN, labels_RN, pack_index, rank_in_pack, placed, load_RP, size_RP, holds_RPL, cap):
    """Row r must place an item with `label`, but every pack with room already holds that label.

    Move one placed item x from a pack q that lacks `label` into a pack p that has room and lacks x's label; q then
    has room for the new item. Among the possible moves, pick the one that keeps the heaviest pack lightest.
    """
    open_packs = (size_RP[r] < cap).nonzero().flatten().tolist()
    best = None
    for x in placed.tolist():
        q = int(pack_index[r, x])
        x_label = int(labels_RN[r, x])
        if holds_RPL[r, q, label]:
            continue
        w = float(weight_RN[r, x])
        for p in open_packs:
            if holds_RPL[r, p, x_label]:
                continue
            cost = max(float(load_RP[r, p]) + w, float(load_RP[r, q]) - w)
            if best is None or cost < best[0]:
                best = (cost, x, p, q)
    if best is None:
        raise ValueError("cannot place replicas of one expert on distinct GPUs; add GPUs or reduce num_replicas")
    _, x, p, q = best
    x_label = int(labels_RN[r, x])
    w = weight_RN[r, x]
    # x leaves q (its rank slot is reused by whatever lands in q next) and joins p.
    vacated_rank = int(rank_in_pack[r, x])
    last = ((pack_index[r] == q) & (rank_in_pack[r] == size_RP[r, q] - 1)).nonzero().flatten()
    rank_in_pack[r, last] = vacated_rank  # keep ranks in q contiguous: the last one fills the hole
    pack_index[r, x] = p
    rank_in_pack[r, x] = size_RP[r, p]
    size_RP[r, p] += 1
    size_RP[r, q] -= 1
    load_RP[r, p] += w
    load_RP[r, q] -= w
    holds_RPL[r, q, x_label] = False
    holds_RPL[r, p, x_label] = True
