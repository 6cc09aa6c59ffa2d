"""The SGLang route without SGLang: specplug's trees in SGLang's verify layout, a toy engine
that verifies trees the way SGLang's NGRAM path does (from the ancestor mask alone, rows keyed
by request id), the options in ``SPECPLUG_SGLANG_CONFIG`` and the server-args hooks. The same
code against the real SGLang package is ``integration_tests/test_sglang_package.py``."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from tiny_models import admit, reference_greedy, repetitive_prompts, tiny_llama

from specplug.adapters.sglang import (
    CONFIG_ENV,
    config_from_env,
    handle_server_args,
    supported,
    validate_server_args,
)
from specplug.adapters.sglang_format import sglang_verify_tree
from specplug.adapters.sglang_worker import verify_width, widen_draft_input
from specplug.config import SpecConfig
from specplug.serving import ServingProposer, accepted_path
from specplug.types import DraftTree


def sglang_links(mask: torch.Tensor, seq_lens: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """What SGLang's ``reconstruct_indices_from_tree_mask`` derives from a flat
    ``[B * W * W]`` ancestor mask, written from its documented contract: per slot its
    position, parent, first child and next sibling (-1: none)."""
    rows = seq_lens.numel()
    m = mask.view(rows, width, width)
    idx = torch.arange(width)
    strict = m & (idx[None, None, :] < idx[None, :, None])  # [b, i, j]: j < i, j ancestor of i
    depth = strict.sum(-1)
    parent = torch.where(strict.any(-1), torch.where(strict, idx, -1).max(-1).values, -1)
    first_child = torch.full((rows, width), -1, dtype=torch.long)
    sibling = torch.full((rows, width), -1, dtype=torch.long)
    for b in range(rows):
        for t in range(width):
            kids = [k for k in range(t + 1, width) if strict[b, k, t]]
            first_child[b, t] = kids[0] if kids else -1
            if parent[b, t] >= 0:
                later = [k for k in range(t + 1, width) if parent[b, k] == parent[b, t]]
                sibling[b, t] = later[0] if later else -1
    return {"positions": depth + seq_lens[:, None], "parent": parent,
            "next_token": first_child, "next_sibling": sibling}


def random_trees(rows: int, nodes: int, seed: int) -> DraftTree:
    g = random.Random(seed)
    tokens = torch.zeros(rows, nodes, dtype=torch.long)
    parents = torch.full((rows, nodes), -1, dtype=torch.long)
    counts = []
    for b in range(rows):
        n = g.randint(0, nodes)
        counts.append(n)
        for i in range(n):
            parents[b, i] = g.randint(-1, i - 1)
            tokens[b, i] = g.randint(1, 90)
    return DraftTree(tokens=tokens, parents=parents, num_nodes=torch.tensor(counts))


@pytest.mark.parametrize("rows,nodes,width", [(1, 1, 2), (3, 4, 5), (4, 7, 12), (2, 11, 12),
                                              (5, 0, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trees_in_sglang_layout_keep_every_parent_and_depth(rows, nodes, width, seed):
    tree = random_trees(rows, nodes, seed)
    roots = [100 + b for b in range(rows)]
    tokens, mask = sglang_verify_tree(roots, tree, width)
    assert tokens.shape == (rows * width,) and mask.shape == (rows * width * width,)
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    seq_lens = torch.tensor([7 + 3 * b for b in range(rows)])
    links = sglang_links(mask, seq_lens, width)
    tokens = tokens.view(rows, width)
    for b in range(rows):
        n = int(tree.num_nodes[b])
        assert tokens[b, 0] == roots[b] and links["parent"][b, 0] == -1
        assert links["positions"][b, 0] == seq_lens[b]
        for i in range(n):  # node i is slot i + 1, under its own parent's slot
            assert tokens[b, i + 1] == tree.tokens[b, i]
            assert links["parent"][b, i + 1] == tree.parents[b, i] + 1
            depth, at = 1, int(tree.parents[b, i])
            while at >= 0:
                depth, at = depth + 1, int(tree.parents[b, at])
            assert links["positions"][b, i + 1] == seq_lens[b] + depth
        for s in range(n + 1, width):  # unused slots: the root's token, under the root
            assert tokens[b, s] == roots[b] and links["parent"][b, s] == 0


def test_a_tree_wider_than_sglangs_slots_is_refused():
    tree = random_trees(1, 6, 0)
    with pytest.raises(ValueError, match="speculative-num-draft-tokens to 7"):
        sglang_verify_tree([1], tree, 6)


@torch.no_grad()
def serve_trees(target, proposer: ServingProposer, prompts: list[list[int]], max_new: list[int],
                width: int, slots: int = 3, narrow: bool = False) -> list[list[int]]:
    """A toy SGLang: requests with ids join as slots free up and are reordered; each step
    the proposer drafts by request id alone (as the SGLang worker asks), its trees are laid
    out in SGLang's slots, every slot is scored after its path from the root (read off the
    ancestor mask, as SGLang's attention reads it), and the tree is walked greedily through
    first children and next siblings (``verify_tree_greedy``). ``narrow``: each step verifies
    only as many slots as its widest tree needs, as specplug's worker has SGLang do."""
    tokens = {i: list(p) for i, p in enumerate(prompts)}
    new: dict[int, list[int]] = {i: [] for i in tokens}
    waiting, running, step = list(range(len(prompts))), [], 0
    serve_trees.accepted = serve_trees.branched = 0
    serve_trees.widths = []
    while waiting or running:
        admit(target, waiting, running, slots, tokens, new)
        if step % 4 == 3:
            running.reverse()
        histories = [list(tokens[i]) for i in running]
        tree = proposer.draft(histories, rids=[f"req-{i}" for i in running])
        step_width = verify_width(tree.num_nodes, width) if narrow else width
        serve_trees.widths.append(step_width)
        flat, mask = sglang_verify_tree([h[-1] for h in histories], tree, step_width)
        links = sglang_links(mask, torch.tensor([len(h) - 1 for h in histories]), step_width)
        flat = flat.view(-1, step_width)
        for b in range(len(running)):
            parents = tree.parents[b, :int(tree.num_nodes[b])].tolist()
            serve_trees.branched += len(set(parents)) < len(parents)
        for b, i in enumerate(running):
            best = []
            for slot in range(step_width):  # the target's token after the slot's path
                path, at = [], slot
                while at >= 0:
                    path.insert(0, int(flat[b, at]))
                    at = int(links["parent"][b, at])
                ids = torch.tensor([tokens[i][:-1] + path])
                best.append(int(target(ids).logits[0, -1].argmax()))
            out, at = [], 0
            while True:  # the child whose token is the target's choice at ``at``
                child = int(links["next_token"][b, at])
                while child >= 0 and int(flat[b, child]) != best[at]:
                    child = int(links["next_sibling"][b, child])
                if child < 0:
                    break
                out.append(best[at])
                at = child
            serve_trees.accepted += len(out)
            out = (out + [best[at]])[: max_new[i] - len(new[i])]
            tokens[i] += out
            new[i] += out
        running = [i for i in running if len(new[i]) < max_new[i]]
        step += 1
    return [new[i] for i in range(len(prompts))]


@pytest.mark.parametrize("narrow", [False, True], ids=["all-slots", "narrowed"])
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.parametrize("tree", ["chain", "dynamic"])
def test_trees_verified_the_sglang_way_keep_outputs_identical(method, tree, narrow):
    """Every output is the target's own greedy one, with requests keyed by id joining,
    leaving and being reordered. With the target as its own draft model most drafts are
    accepted, which needs the drafter's state to follow each request, and dynamic trees
    branch: SGLang's walk through siblings is exercised, not only chains. Narrowed, each
    step verifies only the slots its widest tree needs (the worker's way), with the proposer
    pricing drafts for an engine that pads rows."""
    target = tiny_llama(0)
    extra = {"tree_budget": 6} if tree == "dynamic" else {"num_speculative_tokens": 4}
    if method == "draft_model":  # the whole tree every step: the toy's timing is no CPU's
        extra.update(model=tiny_llama(0), adaptive=False)
    config = SpecConfig(method=method, tree=tree, **extra)
    width = 8
    ids, mask = repetitive_prompts([9, 14, 6, 11, 12], seed=4)
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
    lengths = [14, 6, 9, 12, 10]
    proposer = ServingProposer(config, vocab_size=96, max_context=256, engine="SGLang",
                               trees=True, max_nodes=width - 1, scores_every_slot=not narrow,
                               pads_rows=narrow)
    got = serve_trees(target, proposer, prompts, lengths, width, narrow=narrow)
    want = reference_greedy(target, ids, mask, max(lengths))
    assert got == [w[:n] for w, n in zip(want, lengths)]
    assert proposer.regroups >= 2
    assert (min(serve_trees.widths) < width) == narrow
    if method == "draft_model":
        assert serve_trees.accepted > sum(lengths) // 2, serve_trees.accepted
        assert (serve_trees.branched > 0) == (tree == "dynamic")


def test_a_step_verifies_as_many_slots_as_its_widest_tree():
    assert verify_width(torch.tensor([0, 3, 1]), 12) == 4
    assert verify_width(torch.tensor([0, 0]), 12) == 1  # nothing drafted: a plain decode step
    assert verify_width(torch.tensor([11, 2]), 12) == 12
    assert verify_width(torch.tensor([], dtype=torch.long), 12) == 1


def test_a_narrowed_steps_draft_input_is_padded_back_to_the_full_width():
    """SGLang concatenates the draft inputs of batches it merges: a narrowed one must have the
    full stride again, its accepted tokens first in each row."""
    draft = SimpleNamespace(draft_token_num=2, num_tokens_per_req=2,
                            num_tokens_for_logprob_per_req=2,
                            accept_tokens=torch.tensor([7, 8, 9, 0], dtype=torch.int32))
    widen_draft_input(draft, rows=2, slots=4)
    assert draft.accept_tokens.tolist() == [7, 8, 0, 0, 9, 0, 0, 0]
    assert draft.accept_tokens.dtype == torch.int32
    assert draft.draft_token_num == draft.num_tokens_per_req == 4
    full = SimpleNamespace(draft_token_num=4, accept_tokens=torch.arange(8))
    widen_draft_input(full, rows=2, slots=4)
    assert full.accept_tokens.tolist() == list(range(8))


def test_a_padded_engine_books_every_row_at_the_widest_draft():
    """With ``pads_rows`` the step's timing is booked against rows x (widest + 1) tokens,
    and a drafting row is priced as if the whole batch scored its width."""
    proposer = ServingProposer(SpecConfig(method="ngram", num_speculative_tokens=4),
                               vocab_size=96, trees=True, max_nodes=7, pads_rows=True)
    rows = [[1, 2, 3, 1, 2, 3, 1, 2], [5, 6, 7, 8]]
    tree = proposer.draft(rows, rids=["a", "b"])
    widest = int(tree.num_nodes.max())
    assert widest > 0  # the repeated row drafts
    assert proposer._scored == 2 * (widest + 1)
    plain = ServingProposer(SpecConfig(method="ngram", num_speculative_tokens=4),
                            vocab_size=96, trees=True, max_nodes=7)
    tree = plain.draft(rows, rids=["a", "b"])
    assert plain._scored == sum(int(n) + 1 for n in tree.num_nodes)


def test_rows_are_matched_by_request_id():
    proposer = ServingProposer(SpecConfig(method="ngram"), vocab_size=96, trees=True)
    a, b = [1, 2, 3, 4], [5, 6, 7]
    proposer.draft([a, b], [[4], [7]], rids=["a", "b"])
    # the same histories under swapped ids are other requests; ids that go on are matched
    assert proposer._sources([b + [1], a + [2]], [[1], [2]], ["b", "a"]) == [1, 0]
    assert proposer._sources([b + [1], a + [2]], [[1], [2]], ["x", "a"]) == [None, 0]
    # an id whose history does not go on from where it was is a new request
    assert proposer._sources([a + [9, 9]], [[9]], ["a"]) == [None]
    with pytest.raises(ValueError, match="request ids"):
        proposer.draft([a], None)


def test_accepted_path_follows_the_tokens_from_the_root():
    tree = DraftTree(tokens=torch.tensor([[5, 6, 7, 8]]), parents=torch.tensor([[-1, -1, 0, 2]]),
                     num_nodes=torch.tensor([4]))
    assert accepted_path(tree, 0, [5, 7, 8]) == [0, 2, 3]
    assert accepted_path(tree, 0, [6]) == [1]
    assert accepted_path(tree, 0, [5, 9]) == [0]  # a token the tree did not hold: stop
    assert accepted_path(tree, 0, []) == []


def test_a_tree_larger_than_the_engines_slots_is_refused():
    with pytest.raises(ValueError, match="verifies 4 draft tokens a row"):
        ServingProposer(SpecConfig(method="ngram", tree="dynamic", tree_budget=8),
                        vocab_size=96, engine="SGLang", trees=True, max_nodes=4)


# ---------------------------------------------------------------- options and server args


def test_options_default_to_ngram_and_parse_from_json():
    default = config_from_env({})
    assert (default.method, default.tree, default.num_speculative_tokens) == ("ngram", "chain", 11)
    # a chain not sized takes SGLang's NGRAM width, not ngram's own 32
    assert config_from_env({CONFIG_ENV: '{"drafter": "ngram"}'}).num_speculative_tokens == 11
    sized = config_from_env({CONFIG_ENV: '{"drafter": "ngram", "num_speculative_tokens": 4}'})
    assert sized.num_speculative_tokens == 4
    config = config_from_env({CONFIG_ENV: json.dumps({"drafter": "ngram", "tree": "dynamic",
                                                     "tree_budget": 6})})
    assert (config.method, config.tree, config.tree_budget) == ("ngram", "dynamic", 6)


@pytest.mark.parametrize("raw,names", [
    ('{"drafter": "ngram", "bogus": 1}', "bogus"),
    ('{"drafter": "nope"}', "nope"),
    ('{"tree": "dynamic"}', "'drafter' is required"),
    ('{"drafter": "ngram"', "is not JSON"),
    ('["ngram"]', "JSON object"),
    ('{"drafter": "layer_skip"}', "reads the target model"),
])
def test_bad_options_name_the_problem(raw, names):
    with pytest.raises(ValueError, match=names) as err:
        config_from_env({CONFIG_ENV: raw})
    assert CONFIG_ENV in str(err.value)


def test_server_args_get_what_the_tree_needs(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, '{"drafter": "ngram", "tree": "dynamic", "tree_budget": 6}')
    args = SimpleNamespace(speculative_num_draft_tokens=None, speculative_num_steps=None,
                           speculative_eagle_topk=None, disable_overlap_schedule=False,
                           enable_mixed_chunk=True)
    handle_server_args(args)
    assert args.speculative_num_draft_tokens == 7 and args.speculative_num_steps == 6
    assert args.disable_overlap_schedule and not args.enable_mixed_chunk
    validate_server_args(args)
    args.speculative_num_draft_tokens = 5
    with pytest.raises(ValueError, match="--speculative-num-draft-tokens 7"):
        validate_server_args(args)


@pytest.mark.parametrize("version,ok", [("0.5.23", True), ("0.5.12", True), ("0.5.11", False),
                                        ("0.6.0", False), ("0.5.23.post1", True),
                                        ("0.5.15+dev", True)])
def test_supported_versions(version, ok):
    assert supported(version) is ok


# ---------------------------------------------------------------- bench methods (sglang:...)


def test_bench_methods_name_their_engine_jobs():
    from specplug.bench.sglang_methods import sglang_engine_job

    assert sglang_engine_job("none", "M") == ({"model": "M", "algorithm": None, "engine": {}},
                                               None)
    assert sglang_engine_job("ngram", "M")[0]["algorithm"] == "NGRAM"
    job, options = sglang_engine_job("specplug:ngram:tree=dynamic,tree_budget=6", "M")
    assert job["algorithm"] == "SPECPLUG"
    assert options == {"drafter": "ngram", "tree": "dynamic", "tree_budget": 6}


@pytest.mark.parametrize("rest,names", [
    ("bogus", "unknown SGLang method 'sglang:bogus'"),
    ("specplug", "unknown SGLang method"),
    ("specplug:ngram:bogus=1", "bogus"),
    ("specplug:eagle", "reads the target"),
])
def test_bad_bench_methods_are_refused_before_any_engine_starts(rest, names):
    from specplug.bench.sglang_methods import sglang_engine_job

    with pytest.raises(ValueError, match=names):
        sglang_engine_job(rest, "M")


def test_an_engine_method_without_an_engine_python_says_what_to_set(monkeypatch):
    from specplug.bench.sglang_methods import ENGINE_PYTHON_ENV, SglangEngine

    monkeypatch.delenv(ENGINE_PYTHON_ENV, raising=False)
    with pytest.raises(ValueError, match=ENGINE_PYTHON_ENV):
        SglangEngine({"model": "M", "algorithm": None, "engine": {}})


@pytest.mark.parametrize("n,steps,correct,expected", [
    (10, 0, 0, [0] * 9),            # no speculation: a step per token after the first
    (10, 4, 5, [2, 1, 1, 1]),       # 1 + 4 steps + 5 accepted = 10 emitted
    (10, 4, 9, [2, 1, 1, 1]),       # the last step counted drafts past max_new_tokens
])
def test_sglang_counters_become_steps_that_add_up_to_the_output(n, steps, correct, expected):
    from specplug.bench.sglang_methods import accepted_per_step

    got = accepted_per_step({"output_ids": list(range(n)), "spec_verify_ct": steps,
                             "spec_num_correct_drafts": correct})
    assert got == expected and 1 + len(got) + sum(got) == n
