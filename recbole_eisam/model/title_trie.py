"""A prefix trie of the items' title tokens, and constrained beam search over it.

:class:`TitleTrie` holds every item's target tokens (the rendered title, then the
end-of-item token). Node 0 is the root; following the tokens of an item from the root ends
at a *leaf*, the node reached by its end-of-item token, and a leaf lists every item whose
tokens are the same (duplicate titles). Because the end-of-item token is a token of its own,
a title that is a prefix of another ends at its own leaf. Children are stored flat (CSR), so
the children of a batch of nodes come out as one padded ``[N, C]`` tensor.

The prior of a child given its node, ``pi(child | node) = mass(child) / mass(node)`` with
``mass`` the summed training counts of the items under a node, factorises the item prior:
the product along an item's path is ``pi(item's title)``. Logit adjustment uses it per node
(``docs/EISAM.md``, "The generative model").

:func:`constrained_beam_search` runs the beams of a batch of prompts through the trie with
one KV-cached decoder step per token: every beam stays on a path of the trie, so every
finished beam is a real title.
"""

import torch


class TitleTrie:
    """Prefix trie of ``sequences`` (``sequences[i]``: item ``i``'s token ids, ``[]`` for an
    item that cannot be generated, such as the padding id 0)."""

    def __init__(self, sequences, counts=None):
        children = [{}]  # node -> {token: child}
        depth_of = [0]
        leaf_items = {}
        paths = []
        for item, seq in enumerate(sequences):
            node, path = 0, []
            for token in seq:
                path.append(node)
                nxt = children[node].get(int(token))
                if nxt is None:
                    nxt = len(children)
                    children[node][int(token)] = nxt
                    children.append({})
                    depth_of.append(depth_of[node] + 1)
                node = nxt
            paths.append(path)
            if seq:
                leaf_items.setdefault(node, []).append(item)
        self.num_nodes = len(children)
        self.n_items = len(sequences)
        degree = torch.tensor([len(c) for c in children], dtype=torch.long)
        self.offsets = torch.zeros(self.num_nodes + 1, dtype=torch.long)
        self.offsets[1:] = torch.cumsum(degree, 0)
        self.degree = degree
        flat = [(t, c) for node_children in children for t, c in sorted(node_children.items())]
        self.child_token = torch.tensor([t for t, _ in flat] or [0], dtype=torch.long)
        self.child_node = torch.tensor([c for _, c in flat] or [0], dtype=torch.long)
        # leaves: node -> items (flat), and each item's leaf
        self.is_leaf = torch.zeros(self.num_nodes, dtype=torch.bool)
        self.leaf_of_item = torch.full((self.n_items,), -1, dtype=torch.long)
        self.leaf_items = {}
        for node, items in leaf_items.items():
            self.is_leaf[node] = True
            self.leaf_items[node] = torch.tensor(items, dtype=torch.long)
            self.leaf_of_item[items] = node
        # every item's path: the node before each of its tokens ([n_items, T], -1 padded)
        width = max((len(p) for p in paths), default=1) or 1
        self.path_nodes = torch.full((self.n_items, width), -1, dtype=torch.long)
        for item, path in enumerate(paths):
            if path:
                self.path_nodes[item, : len(path)] = torch.tensor(path, dtype=torch.long)
        self.max_depth = width
        # every (item, node on its path, leaf included) pair, and the items under each node
        pairs = [(item, node) for item, path in enumerate(paths) if path
                 for node in path + [int(self.leaf_of_item[item])]]
        self.pair_item = torch.tensor([i for i, _ in pairs] or [0], dtype=torch.long)
        self.pair_node = torch.tensor([n for _, n in pairs] or [0], dtype=torch.long)
        if not pairs:
            self.pair_item, self.pair_node = self.pair_item[:0], self.pair_node[:0]
        self.items_under = torch.zeros(self.num_nodes).index_add_(0, self.pair_node, torch.ones(len(self.pair_node)))
        self.set_counts(counts)

    # ------------------------------------------------------------------ structure
    def children(self, nodes):
        """``(tokens, child_nodes, valid)``, each ``[N, C]``: the children of ``nodes`` padded to
        the largest degree among them (``valid`` marks real children)."""
        nodes = nodes.to(self.offsets.device)
        deg = self.degree[nodes]
        width = max(int(deg.max()) if deg.numel() else 0, 1)
        idx = self.offsets[nodes].unsqueeze(1) + torch.arange(width).unsqueeze(0)
        valid = torch.arange(width).unsqueeze(0) < deg.unsqueeze(1)
        idx = idx.clamp(max=self.child_token.numel() - 1)
        return self.child_token[idx], self.child_node[idx], valid

    def step(self, nodes, tokens):
        """The node reached from each of ``nodes`` by the matching token (``-1`` off the trie)."""
        child_tokens, child_nodes, valid = self.children(nodes)
        hit = valid & (child_tokens == tokens.to(child_tokens.device).unsqueeze(1))
        return torch.where(hit.any(1), (child_nodes * hit).sum(1), torch.full_like(nodes, -1))

    def items_of(self, leaf):
        """The items whose title ends at ``leaf``."""
        return self.leaf_items.get(int(leaf), torch.zeros(0, dtype=torch.long))

    def sequences(self):
        """Every root-to-leaf token path with its items (for checks and tests)."""
        out, stack = [], [(0, [])]
        while stack:
            node, prefix = stack.pop()
            if self.is_leaf[node]:
                out.append((prefix, self.items_of(node).tolist()))
            start, end = int(self.offsets[node]), int(self.offsets[node + 1])
            for k in range(start, end):
                stack.append((int(self.child_node[k]), prefix + [int(self.child_token[k])]))
        return out

    # ------------------------------------------------------------------ prior
    def set_counts(self, counts):
        """Node masses from item counts (each generable item counts at least once, as the
        trainer's log prior does); ``log_child_prior[k]`` is ``log pi(child_k | its node)``."""
        n = torch.zeros(self.n_items, dtype=torch.float64)
        if counts is not None:
            n[: len(counts)] = torch.as_tensor(counts, dtype=torch.float64)[: self.n_items]
        n = n.clamp(min=1.0) * (self.leaf_of_item >= 0)
        mass = torch.zeros(self.num_nodes, dtype=torch.float64).index_add_(0, self.pair_node, n[self.pair_item])
        parent = torch.repeat_interleave(torch.arange(self.num_nodes), self.degree)
        ratio = mass[self.child_node[: parent.numel()]] / mass[parent].clamp(min=1e-300)
        self.log_child_prior = torch.log(ratio.clamp(min=1e-300)).float()
        if not parent.numel():
            self.log_child_prior = torch.zeros(1)
        self.mass = mass

    def children_prior(self, nodes):
        """``log pi(child | node)`` of :meth:`children`'s layout, ``[N, C]`` (0 where padded)."""
        nodes = nodes.to(self.offsets.device)
        deg = self.degree[nodes]
        width = max(int(deg.max()) if deg.numel() else 0, 1)
        idx = (self.offsets[nodes].unsqueeze(1) + torch.arange(width).unsqueeze(0)).clamp(
            max=self.log_child_prior.numel() - 1)
        valid = torch.arange(width).unsqueeze(0) < deg.unsqueeze(1)
        return torch.where(valid, self.log_child_prior[idx], torch.zeros(()))


def constrained_beam_search(step_fn, state, trie, batch_size, num_beams, banned=None, prior_tau=0.0,
                            max_steps=None):
    """Beam search over ``trie`` for ``batch_size`` prompts; returns ``(leaves [B, W], scores [B, W])``.

    Args:
        step_fn: ``fn(state, tokens [B*W] or None, beam_origin [B*W] or None) -> (log_probs [B*W, V], state)``:
            the first call (``tokens=None``) reads the prompts and returns the next-token
            log-probabilities of each prompt repeated for its ``W`` beams; later calls first
            reorder the state's rows by ``beam_origin``, then feed one token per beam.
        trie: the :class:`TitleTrie`.
        banned: optional ``[B, n_items]`` boolean mask of items no beam of that prompt may end on
            (``eval_mask_history``); a node all of whose items are banned is closed.
        prior_tau: post-hoc logit adjustment: each token's score also gets
            ``- prior_tau * log pi(child | node)``, so a finished beam's score is
            ``log p(title) - prior_tau * log pi(title)``.

    A beam's score is the sum of its tokens' log-probabilities under the model's softmax (plus
    the adjustment), so a finished beam scores its title's log-likelihood. Tokens are the
    indices the trie was built with (the model's output vocabulary).
    Finished beams keep their score and stay in the beam set; the search stops when every
    beam of every prompt has finished. Rows of ``leaves`` hold ``-1`` where fewer than ``W``
    titles exist.
    """
    B, W = batch_size, num_beams
    neg = -float("inf")
    nodes = torch.zeros(B * W, dtype=torch.long)
    scores = torch.full((B, W), neg)
    scores[:, 0] = 0.0  # the W copies of the root: only one is live at the start
    finished = torch.zeros(B * W, dtype=torch.bool)
    closed = None if banned is None else closed_nodes(trie, banned)
    prompt_of_row = torch.arange(B).repeat_interleave(W)
    log_probs, state = step_fn(state, None, None)
    steps = 0
    limit = max_steps or trie.max_depth
    while True:
        tokens, child, valid = trie.children(nodes)  # [BW, C]
        valid = valid & ~finished.unsqueeze(1)
        cand = log_probs.float().gather(1, tokens.to(log_probs.device)).cpu()  # [BW, C]
        if prior_tau:
            cand = cand - prior_tau * trie.children_prior(nodes)
        if closed is not None:
            valid = valid & ~closed[prompt_of_row.unsqueeze(1), child]
        cand = torch.where(valid, cand, torch.full_like(cand, neg))
        total = scores.view(-1, 1) + cand  # [BW, C]
        # a finished beam carries itself on as one candidate with its own score
        C = total.size(1)
        keep = torch.full((B * W, 1), neg)
        keep[finished, 0] = scores.view(-1)[finished]
        total = torch.cat([total, keep], dim=1).view(B, W * (C + 1))
        best, pick = total.topk(W, dim=1)  # [B, W]
        origin = pick // (C + 1)  # beam index within the prompt
        slot = pick % (C + 1)
        rows = (origin + torch.arange(B).unsqueeze(1) * W).view(-1)  # [BW]
        slot = slot.view(-1)
        carried = slot == C
        safe = slot.clamp(max=C - 1)
        new_nodes = torch.where(carried, nodes[rows], child[rows, safe])
        new_tokens = torch.where(carried, torch.zeros_like(safe), tokens[rows, safe])
        alive = torch.isfinite(best.view(-1))
        nodes = torch.where(alive, new_nodes, torch.zeros_like(new_nodes))
        finished = (carried & finished[rows]) | trie.is_leaf[nodes] | ~alive
        scores = best
        steps += 1
        if bool(finished.all()) or steps > limit:
            break
        log_probs, state = step_fn(state, new_tokens, rows)
    leaves = torch.where(torch.isfinite(scores.view(-1)) & trie.is_leaf[nodes], nodes, torch.full_like(nodes, -1))
    return leaves.view(B, W), scores


def closed_nodes(trie, banned):
    """``[B, num_nodes]`` boolean: the nodes all of whose items are in ``banned`` ``[B, n_items]``
    (no beam enters them, so no beam is spent on a subtree it could only leave closed)."""
    hit = torch.zeros(banned.size(0), trie.num_nodes)
    hit.index_add_(1, trie.pair_node, banned[:, trie.pair_item].float().cpu())
    return (hit >= trie.items_under.unsqueeze(0)) & (trie.items_under > 0).unsqueeze(0)


def leaves_to_scores(trie, leaves, scores, n_items):
    """A ``[B, n_items]`` score matrix from the beams: each finished title's score on every item
    that shares it, ``-inf`` on the items no beam reached."""
    out = torch.full((leaves.size(0), n_items), -float("inf"))
    for b, w in torch.nonzero(leaves >= 0).tolist():
        items = trie.items_of(leaves[b, w])
        out[b, items] = torch.maximum(out[b, items], scores[b, w].expand(len(items)))
    return out
