"""ModelRunner: tree attention and KV compaction give the same logits as a plain forward."""

from __future__ import annotations

import torch
from tiny_models import tiny_gemma, tiny_llama

from specplug.runner import ModelRunner


def full_logits(model, seq):
    with torch.inference_mode():
        return model(torch.tensor([seq])).logits[0].float()


def test_ragged_commits_leave_holes_that_stay_invisible():
    for model in (tiny_llama(0), tiny_gemma(0, window=4)):
        runner = ModelRunner(model, capacity=8)  # small: forces the buffers to grow
        prompts = [[5, 6, 7, 8, 9], [11, 12]]
        ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 11, 12]])
        mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
        runner.prefill(ids, mask)
        seqs = [list(p) for p in prompts]
        # step: root + a 3-node tree per row; row 0 keeps root + 2 nodes, row 1 keeps the root
        trees = [[20, 21, 22, 23], [30, 31, 32, 33]]
        parents = torch.tensor([[-1, 0, 1, 0], [-1, 0, 0, 1]])
        out = runner.append(torch.tensor(trees), parents, torch.ones(2, 4, dtype=torch.bool))
        # node 2 of row 0 follows root -> 21 -> 22: check its logits against a plain forward
        want = full_logits(model, seqs[0] + [20, 21, 22])[-1]
        assert torch.allclose(out.logits[0, 2], want, atol=1e-5)
        # node 3 of row 0 is a sibling of node 1: sees root only
        want = full_logits(model, seqs[0] + [20, 23])[-1]
        assert torch.allclose(out.logits[0, 3], want, atol=1e-5)
        runner.commit(torch.tensor([[0, 1, 2], [0, 0, 0]]), torch.tensor([3, 1]))
        seqs[0] += [20, 21, 22]
        seqs[1] += [30]
        # row 1 now has two holes; several more steps over them, then compare
        for step in range(4):
            toks = torch.tensor([[40 + step, 41 + step], [50 + step, 51 + step]])
            out = runner.append(toks, torch.tensor([[-1, 0], [-1, 0]]),
                                torch.ones(2, 2, dtype=torch.bool))
            for b in range(2):
                want = full_logits(model, seqs[b] + toks[b].tolist())[-2:]
                assert torch.allclose(out.logits[b], want, atol=1e-5), (type(model), step, b)
            keep = torch.tensor([[0, 1], [0, 1]])
            n = torch.tensor([2, 1]) if step % 2 else torch.tensor([1, 2])
            runner.commit(keep, n)
            for b in range(2):
                seqs[b] += toks[b, : int(n[b])].tolist()


def test_extend_commits_ragged_blocks():
    model = tiny_llama(0)
    runner = ModelRunner(model)
    runner.prefill(torch.tensor([[1, 2, 3], [0, 4, 5]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    out = runner.extend([[7, 8, 9], [6]])
    assert torch.allclose(out.logits[0, 2], full_logits(model, [1, 2, 3, 7, 8, 9])[-1],
                          atol=1e-5)
    assert torch.allclose(out.logits[1, 0], full_logits(model, [4, 5, 6])[-1], atol=1e-5)
    assert runner.vlen.tolist() == [6, 4]


def test_a_kept_path_in_place_is_not_copied_and_a_branch_is(monkeypatch):
    model = tiny_llama(0)
    runner = ModelRunner(model)
    seq = [5, 6, 7, 8]
    runner.prefill(torch.tensor([seq]), torch.ones(1, 4, dtype=torch.long))
    moves = []
    real_move = runner.cache.move
    monkeypatch.setattr(runner.cache, "move", lambda *a: (moves.append(a), real_move(*a)))
    parents = torch.tensor([[-1, 0, 1, 0]])  # 20 -> 21 -> 22, and 20 -> 23
    runner.append(torch.tensor([[20, 21, 22, 23]]), parents, torch.ones(1, 4, dtype=torch.bool))
    runner.commit(torch.tensor([[0, 1]]), torch.tensor([2]))  # a chain prefix: in place
    assert moves == []
    seq += [20, 21]
    runner.append(torch.tensor([[30, 31, 32, 33]]), parents, torch.ones(1, 4, dtype=torch.bool))
    runner.commit(torch.tensor([[0, 3]]), torch.tensor([2]))  # the side branch: moved
    assert len(moves) == 1
    seq += [30, 33]
    out = runner.append(torch.tensor([[40, 41]]), torch.tensor([[-1, 0]]),
                        torch.ones(1, 2, dtype=torch.bool))
    assert torch.allclose(out.logits[0], full_logits(model, seq + [40, 41])[-2:], atol=1e-5)
