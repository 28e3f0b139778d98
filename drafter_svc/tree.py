"""Tree drafter: a small causal LM grows a token tree per request, best-first by cumulative draft
probability, for the verifier to check in one forward (it accepts the longest path the target agrees
with, so several guesses per position cost one step).

The children of a node are its b most likely next tokens under the draft model (``--branching``); a
node's cumulative probability is the product of the draft probabilities on the path to it. The
proposal is the k nodes (k: the router's node budget) of highest cumulative probability in the tree
of top-b children (ties: the node found first). A child is never more likely than its parent and is
found after it, so that set contains every selected node's parent; it is returned in best-first
order, so parents precede children and any first n nodes are the best tree of n nodes.

Growth runs in rounds, each one batched forward over every request of the batch. Round 0 feeds the
committed tokens not in the KV yet (the last one's logits give the root's children). Each next round
expands the nodes that are among the current best k and could still have a child that enters them
(more likely than the k-th best), feeding per request those nodes with their ancestors as one token
tree (tree attention mask: each sees the context, its ancestors and itself). The draft KV keeps the
committed context only: a round's tree tokens are cut from the row right after it, and the next round
recomputes the ancestors it needs (at most k tokens per request) instead of tracking tree nodes in the
cache. Growth stops when no node can improve the tree, which is then exactly the best-first tree. A
chain of k needs k forwards, as the draft_model drafter does; a bushy tree of k nodes needs fewer.

Greedy requests only, since trees are verified greedily: a sampling request keeps its state in sync
but gets no proposal (the router never asks this drafter for one).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from drafter_svc.base import Proposal, SyncedRequest
from drafter_svc.model_drafter import ModelDrafter, at_least_one
from smartspec.config import add_flag
from smartspec.runtime.runner import StepRow
from smartspec.tree import ROOT


@dataclass
class _Node:
    """A candidate node: a child of an expanded node (or of the root)."""

    token: int
    parent: int  # index of the parent candidate, or ROOT
    prob: float  # draft probability of the token after the path to its parent
    cum: float  # product of the draft probabilities on the path to this node
    depth: int
    expanded: bool = False


def top_children(logits: torch.Tensor, branching: int) -> list[tuple[list[float], list[int]]]:
    """Per row of logits ([rows, vocab]): the `branching` most likely tokens and their draft
    probabilities, most likely first. One batched top-b and one transfer for a whole round."""
    logits = logits.float()
    values, ids = torch.topk(logits, min(branching, logits.shape[-1]), dim=-1)  # [rows, b]
    probs = torch.exp(values - torch.logsumexp(logits, dim=-1, keepdim=True))  # [rows, b]
    return list(zip(probs.tolist(), ids.tolist()))


class _Growth:
    """One request's tree while it grows: every candidate found so far, in the order found."""

    def __init__(self, budget: int, branching: int, max_depth: int) -> None:
        self.budget = budget
        self.branching = branching
        self.max_depth = max_depth  # deeper nodes would pass the draft model's context limit
        self.nodes: list[_Node] = []

    def add_children(self, parent: int, probs: list[float], tokens: list[int]) -> None:
        """Adds the top-b next tokens after `parent` (ROOT: after the context), most likely first."""
        above = self.nodes[parent] if parent != ROOT else None
        cum, depth = (above.cum, above.depth + 1) if above is not None else (1.0, 1)
        for prob, token in zip(probs, tokens):
            self.nodes.append(_Node(token, parent, prob, cum * prob, depth))
        if above is not None:
            above.expanded = True

    def best(self) -> list[int]:
        """The `budget` best candidates, best first (ties: the one found first)."""
        return sorted(range(len(self.nodes)), key=lambda i: (-self.nodes[i].cum, i))[: self.budget]

    def to_expand(self) -> list[int]:
        """Selected nodes whose children could still enter the selection: not expanded yet, more likely
        than the k-th best (a child is at most as likely as its parent and found later), not too deep."""
        best = self.best()
        threshold = self.nodes[best[-1]].cum if len(best) == self.budget else -1.0
        return [i for i in best if not self.nodes[i].expanded and self.nodes[i].cum > threshold and self.nodes[i].depth < self.max_depth]

    def feed(self, seq_id: str, expand: list[int]) -> StepRow:
        """The token tree to feed request `seq_id` to expand `expand`: those nodes and their ancestors, in the order found
        (so parents come first), with row-local parents; logits are taken at `expand`."""
        keep: set[int] = set()
        for node in expand:
            while node != ROOT and node not in keep:
                keep.add(node)
                node = self.nodes[node].parent
        order = sorted(keep)
        at = {node: j for j, node in enumerate(order)}
        return StepRow(
            seq_id=seq_id,
            tokens=[self.nodes[n].token for n in order],
            parents=[at[self.nodes[n].parent] if self.nodes[n].parent != ROOT else ROOT for n in order],
            logits_at=[at[n] for n in expand],
        )

    def tree(self) -> tuple[list[int], list[int], list[float]]:
        """The selected nodes in best-first order: tokens, parents (indices in that order, or -1) and
        draft probabilities."""
        best = self.best()
        at = {node: j for j, node in enumerate(best)}
        parents = [at[self.nodes[n].parent] if self.nodes[n].parent != ROOT else ROOT for n in best]
        return [self.nodes[n].token for n in best], parents, [self.nodes[n].prob for n in best]


class TreeDrafter(ModelDrafter):
    """Token trees from a local causal LM sharing the target's tokenizer; k is the node budget."""

    kind = "tree"

    def __init__(self, draft_model: str = "embedded", *, branching: int = 4, **model: Any) -> None:
        """`model`: ModelDrafter's other arguments (device, dtype, max_sequences, max_context)."""
        self.branching = at_least_one("branching", branching)
        super().__init__(draft_model, **model)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        add_flag(parser, "--branching", type=int, default=4, help="children per node: the draft model's B most likely next tokens")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TreeDrafter":
        return cls(**cls.model_options(args), branching=args.branching)

    def propose(self, batch: Sequence[SyncedRequest]) -> Proposal:
        result = Proposal(drafts=[[] for _ in batch], parents=[[] for _ in batch], token_probs=[[] for _ in batch])
        depth_limits = self._budgets(batch)  # batch index -> deepest node within the context limit
        growing = {i: _Growth(batch[i].k, self.branching, depth) for i, depth in depth_limits.items() if batch[i].sampling.greedy}
        if not growing:
            return result
        # Round 0: the committed tokens not in the KV yet; the last one's logits give the root's children.
        logits = self._forward([StepRow(batch[i].request_id, self._unfed(batch[i]), all_logits=False) for i in growing], result)
        children = top_children(torch.stack([out[-1] for out in logits]), self.branching)
        for (i, growth), (probs, tokens) in zip(growing.items(), children):
            self._rows[batch[i].request_id].synced = len(batch[i].context)
            growth.add_children(ROOT, probs, tokens)
        while True:
            expand = {i: nodes for i, growth in growing.items() if (nodes := growth.to_expand())}
            if not expand:
                break
            rows = [growing[i].feed(batch[i].request_id, nodes) for i, nodes in expand.items()]
            outs = self._forward(rows, result)  # per request: [len(nodes), vocab]
            children = iter(top_children(torch.cat(outs), self.branching))  # one top-b for the whole round
            for i, nodes in expand.items():
                self.runner.truncate(batch[i].request_id, len(batch[i].context))  # tree nodes are not kept
                for node in nodes:
                    growing[i].add_children(node, *next(children))
        for i, growth in growing.items():
            result.drafts[i], result.parents[i], result.token_probs[i] = growth.tree()
        return result
