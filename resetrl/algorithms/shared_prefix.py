"""Shared-prefix packing: sequences that share prefixes computed as one packed row (docs/algorithms.md,
"Shared-prefix training"; AReaL's tree training, arXiv 2505.24298).

A GRPO group's G samples share their prompt; an RRPO/SRPO G2 group shares prompt + the parent's steps 1..k-1. Run
one by one, a transformer recomputes that prefix for every sample. Packed, the sequences become one prefix tree
(trie) whose nodes are runs of tokens: every distinct prefix appears once, each sequence's own tokens once. Token i
of the row attends to token j iff j lies on i's path from the root and is not after it, and its position id is its
index in its sequences. Every token then sees exactly the tokens, at exactly the positions, it sees when its
sequence runs alone, so its hidden states (and logits) are the same, and the gradient reaching a shared prefix token
is the sum over the sequences that read it: the unshared computation's, with the prefix computed once.

The order of nodes in the row is free (visibility comes from the mask, order from the position ids): nodes whose
logits are wanted go last, so that rows left-padded to one length keep their wanted positions in a common tail and
the LM head runs on few positions beyond the wanted ones (`logits_to_keep`).

Pure numpy and torch: no model, no DeepSpeed (learner/packing.py builds micro-batches from these rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedRow:
    """A prefix tree of sequences laid out as one row of N tokens."""

    token_ids: np.ndarray  # int64 [N]
    position_ids: np.ndarray  # int64 [N]: the token's index in each sequence that holds it
    node_of_token: np.ndarray  # int64 [N]: the trie node a row position belongs to
    on_path: np.ndarray  # bool [nodes, nodes]: on_path[a, b] = node b is node a or one of its ancestors
    index: list[np.ndarray]  # per sequence: the row position of each of its tokens (int64 [len])
    wanted: np.ndarray  # bool [N]: row positions whose next-token logits some sequence needs

    @property
    def length(self) -> int:
        return len(self.token_ids)

    def visibility(self) -> np.ndarray:
        """bool [N, N]: visibility[i, j] = token i attends to token j (j on i's path, not after i)."""
        nodes = self.node_of_token
        return self.on_path[nodes[:, None], nodes[None, :]] & (self.position_ids[None, :] <= self.position_ids[:, None])


def trie_length(sequences: list[np.ndarray]) -> int:
    """Tokens of the packed row of `sequences` (without building it): sorted, each sequence adds its tokens past
    its longest common prefix with the one before it."""
    ordered = sorted((np.asarray(s) for s in sequences), key=lambda s: s.tolist())
    total, previous = 0, None
    for sequence in ordered:
        total += len(sequence) - (0 if previous is None else common_prefix_length(previous, sequence))
        previous = sequence
    return total


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def pack_sequences(sequences: list[np.ndarray], wanted: list[np.ndarray] | None = None) -> PackedRow:
    """Pack `sequences` (1-D token arrays, each non-empty) into one row of their prefix tree.

    wanted[s] (bool, one per token of sequence s) marks the tokens whose next-token logits are needed; the nodes
    holding any go to the end of the row (module docstring). None: every token is wanted.
    """
    sequences = [np.asarray(s, dtype=np.int64) for s in sequences]
    if not sequences:
        raise ValueError("cannot pack an empty list of sequences")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot pack an empty sequence: every sequence needs at least one token")
    if wanted is None:
        wanted = [np.ones(len(s), dtype=bool) for s in sequences]
    nodes, paths = _build_trie(sequences)  # nodes: (parent, start, end, a sequence holding it)

    node_wanted = np.zeros(len(nodes), dtype=bool)
    for s, path in enumerate(paths):
        for node in path:
            _, start, end, _ = nodes[node]
            node_wanted[node] |= bool(np.asarray(wanted[s][start:end]).any())
    # Unwanted nodes first, each group in creation order (a parent before its children: easier to read).
    order = [n for n in range(len(nodes)) if not node_wanted[n]] + [n for n in range(len(nodes)) if node_wanted[n]]

    offset = np.zeros(len(nodes), dtype=np.int64)  # row position of each node's first token
    token_ids, position_ids, node_of_token = [], [], []
    cursor = 0
    for node in order:
        _, start, end, holder = nodes[node]
        offset[node] = cursor
        token_ids.append(sequences[holder][start:end])
        position_ids.append(np.arange(start, end, dtype=np.int64))
        node_of_token.append(np.full(end - start, node, dtype=np.int64))
        cursor += end - start

    on_path = np.eye(len(nodes), dtype=bool)
    for node in range(len(nodes)):
        parent = nodes[node][0]
        while parent >= 0:
            on_path[node, parent] = True
            parent = nodes[parent][0]

    index, row_wanted = [], np.zeros(cursor, dtype=bool)
    for s, path in enumerate(paths):
        positions = np.concatenate([offset[n] + np.arange(nodes[n][2] - nodes[n][1]) for n in path])
        index.append(positions)
        row_wanted[positions[np.asarray(wanted[s], dtype=bool)]] = True
    return PackedRow(
        token_ids=np.concatenate(token_ids), position_ids=np.concatenate(position_ids),
        node_of_token=np.concatenate(node_of_token), on_path=on_path, index=index, wanted=row_wanted,
    )


def _build_trie(sequences: list[np.ndarray]) -> tuple[list[tuple[int, int, int, int]], list[list[int]]]:
    """Nodes (parent, start, end, holder) of the compressed prefix tree, and each sequence's path of nodes.

    A node is the run of tokens [start, end) that one set of sequences shares after their parent node; it ends
    where they diverge or the shortest of them ends. `holder` is a sequence that holds the run."""
    nodes: list[tuple[int, int, int, int]] = []
    paths: list[list[int]] = [[] for _ in sequences]
    pending = [(list(range(len(sequences))), 0, -1)]  # (members, depth they share up to, parent node)
    while pending:
        members, depth, parent = pending.pop()
        by_token: dict[int, list[int]] = {}
        for member in members:
            by_token.setdefault(int(sequences[member][depth]), []).append(member)
        for group in by_token.values():
            shortest = min(len(sequences[m]) for m in group)
            block = np.stack([sequences[m][depth:shortest] for m in group])
            differ = np.flatnonzero((block != block[0]).any(axis=0))
            end = depth + (int(differ[0]) if differ.size else shortest - depth)
            node = len(nodes)
            nodes.append((parent, depth, end, group[0]))
            for member in group:
                paths[member].append(node)
            longer = [m for m in group if len(sequences[m]) > end]
            if longer:
                pending.append((longer, end, node))
    return nodes, paths


def gathered_logprobs(logits: Tensor, targets: Tensor, temperatures: Tensor) -> Tensor:
    """log softmax(logits / T)[target] per row: logits [M, V], targets [M], temperatures [M] -> [M] float32.

    The same quantity as losses.token_logprobs, for logits already gathered at the wanted positions (one row per
    trained token; the temperature is that of the token's sequence)."""
    logits = logits.float() / temperatures.to(device=logits.device, dtype=torch.float32).unsqueeze(-1)
    return logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
