"""Trained-head drafters (medusa, clover, clover2, eagle) on tiny models: the drafting form
agrees with the training form, output is identical to greedy for every tree shape and batch,
sampling keeps the target's distribution, checkpoints round-trip, bad inputs fail clearly."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, chisquare_pvalue, reference_greedy, repetitive_prompts, tiny_llama

from specplug import SpecConfig
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate
from specplug.errors import InputFileError
from specplug.heads.checkpoint import load_head, save_head
from specplug.heads.config import HEAD_KINDS, HeadConfig
from specplug.heads.nets import build_net
from specplug.sampling import SamplingParams

H = 32


def make_net(kind: str, target, seed: int = 0, draft_vocab: int = 64, heads: int = 4):
    """A head with random (not identity-like) weights, bound to ``target``."""
    torch.manual_seed(seed)
    target_vocab = int(target.get_output_embeddings().weight.shape[0])
    cfg = HeadConfig(kind=kind, hidden_size=H, vocab_size=target_vocab,
                     draft_vocab_size=draft_vocab, num_heads=heads, num_attention_heads=4,
                     hidden_layers=layers_of(kind))
    vocab = torch.randperm(target_vocab)[:draft_vocab].sort().values
    net = build_net(cfg, vocab)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.bind(target.get_input_embeddings(), target.get_output_embeddings().weight)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(0)


def layers_of(kind: str) -> list[int]:
    """The target layers a head reads (msd: the last features and the input embeddings)."""
    return [-1, 0] if kind == "msd" else [-1]


def features(model, ids, kind: str = "eagle"):
    with torch.no_grad():
        hs = model(ids[None], output_hidden_states=True).hidden_states
        return torch.cat([hs[i][0] for i in layers_of(kind)], -1)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_drafting_form_matches_training_form(llama, kind):
    """Committing a prefix (in two pieces), then expanding a chain along the true tokens gives
    the logits the teacher-forced training form gives at that position."""
    net = make_net(kind, llama)
    ids = torch.randint(1, VOCAB, (14,), generator=torch.Generator().manual_seed(3))
    f = features(llama, ids, kind)
    with torch.no_grad():
        train = net.train_forward(f[None], ids[None], torch.ones(1, 14, dtype=torch.bool))
    depths = 1 if kind in ("eagle", "msd") else 4  # EAGLE feeds back its own features
    t = 8  # the root is ids[t + 1], produced by f[t]
    with torch.no_grad():
        row = net.new_row()
        row = net.commit(row, f[:3], ids[1:4])
        row = net.commit(row, f[3:t], ids[4:t + 1])
        states = [net.root_state(row, f[t])]
        for d in range(1, depths + 1):
            logits, states = net.expand(row, states, ids[t + d:t + d + 1], d)
            torch.testing.assert_close(logits[0], train["logits"][d - 1][0, t],
                                       rtol=1e-4, atol=1e-4)


TREES = {
    "chain": {"tree": "chain", "num_speculative_tokens": 4},
    "static": {"tree": "static", "tree_paths": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]},
    "dynamic": {"tree": "dynamic", "tree_budget": 10, "tree_topk": 3,
                "num_speculative_tokens": 4},
}


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("lengths", [[9], [5, 13, 2]], ids=["batch1", "batch3"])
def test_identical_to_generate(llama, kind, tree, lengths):
    ids, mask = repetitive_prompts(lengths, seed=len(lengths))
    want = reference_greedy(llama, ids, mask, 20)
    spec = Speculator.from_config(SpecConfig(method=kind, checkpoint=make_net(kind, llama),
                                             adaptive=False, **TREES[tree]), llama)
    runner = ModelTargetRunner(llama, hidden_layers=spec.drafter.hidden_layers)
    got = speculative_generate(runner, spec, ids, mask, max_new_tokens=20)
    assert got.sequences == want


def trained_net(llama, kind: str):
    """A head trained briefly on the tiny target's own outputs."""
    from specplug.train.data import Sequence, extract_features
    from specplug.train.trainer import Example, TrainSettings, train_head

    ids, mask = repetitive_prompts([6 + i % 7 for i in range(24)], seed=11)
    responses = reference_greedy(llama, ids, mask, 40)
    seqs = [Sequence(ids[b][mask[b].bool()].tolist(), r) for b, r in enumerate(responses)]
    examples = [Example(torch.tensor(q.ids), f["features"], f["top_ids"], f["top_probs"])
                for q, f in zip(seqs, extract_features(llama, seqs, layers_of(kind), topk=8))]
    net = make_net(kind, llama, draft_vocab=VOCAB, heads=3)
    train_head(net, examples, [], TrainSettings.for_kind(kind, epochs=8, batch_size=4,
                                                         lr=3e-3, warmup=2))
    return net


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_trained_heads_get_drafts_accepted_and_stay_identical(llama, kind):
    """Heads trained briefly on the tiny target's own outputs get drafts accepted (so the
    multi-token commit paths run) on new prompts; the output stays identical."""
    net = trained_net(llama, kind)
    ids, mask = repetitive_prompts([9, 12, 7], seed=5)
    want = reference_greedy(llama, ids, mask, 24)
    # adaptive=False: a tiny target is cheaper than drafting, so an adaptive tree stays empty
    spec = Speculator.from_config(SpecConfig(method=kind, checkpoint=net, adaptive=False,
                                             tree="dynamic", tree_budget=8,
                                             num_speculative_tokens=3), llama)
    runner = ModelTargetRunner(llama, hidden_layers=spec.drafter.hidden_layers)
    got = speculative_generate(runner, spec, ids, mask, max_new_tokens=24)
    assert got.sequences == want
    assert max(max(a) for a in got.stats.accepted_per_step) >= 2


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_a_row_that_rested_drafts_what_it_would_have(llama, kind):
    """A row the tree builder lets rest (the head does not run for it) keeps its features;
    when it drafts again the head catches up over every position since, and proposes exactly
    what a head that never rested proposes on the same history."""
    from specplug.drafters.base import FrontierItem
    from specplug.types import DraftContext

    net = trained_net(llama, kind)
    ids = torch.randint(1, VOCAB, (40,), generator=torch.Generator().manual_seed(7))
    f = features(llama, ids, kind)
    rests = [False, True, True, True, False, True, False, False, True, True, False]
    lazy, eager = (Speculator.from_config(SpecConfig(method=kind, checkpoint=net,
                                                     num_speculative_tokens=3), llama).drafter
                   for _ in range(2))
    for d in (lazy, eager):
        d.start([ids[:9].tolist()])
    seen = 0  # tokens whose features the drafters have
    for step, rest in enumerate(rests):
        n = 10 + step * 2  # two tokens committed per step
        hist = ids[:n].tolist()
        new = [f[(0 if step == 0 else seen):n - 1]]  # features of the tokens since
        seen = n - 1
        ctx = dict(tokens=[hist], active=[True], sampling=SamplingParams(), target_hidden=new)
        root_lazy = lazy.begin(DraftContext(**ctx, resting=[rest]))[0]
        root_eager = eager.begin(DraftContext(**ctx))[0]
        if rest:
            assert root_lazy is None
            continue
        got, want = (d.expand([[FrontierItem(r, hist[-1])]], 4)[0][0]
                     for d, r in ((lazy, root_lazy), (eager, root_eager)))
        assert got.tokens == want.tokens
        torch.testing.assert_close(torch.tensor(got.probs), torch.tensor(want.probs),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("slope, expect_full", [(0.0, True), (5.0, False)])
def test_adaptive_chain_depth_follows_the_cost_curve(llama, slope, expect_full):
    """With free scoring every step drafts the full chain; with steep scoring costs and an
    unsure (random) head, steps draft nothing. The output is identical either way."""
    from specplug.cost import CostModel

    cost = CostModel(prior_slope=slope, calibrated=True)  # no calibration run
    cost.observe(1, 1.0)  # one width timed: the prior slope stays in force
    ids, mask = repetitive_prompts([9], seed=1)
    spec = Speculator.from_config(SpecConfig(method="eagle", num_speculative_tokens=4,
                                             checkpoint=make_net("eagle", llama)), llama)
    spec.cost = cost
    spec.cost.observe = lambda n, s: None  # keep the planted curve
    runner = ModelTargetRunner(llama, hidden_layers=spec.drafter.hidden_layers)
    got = speculative_generate(runner, spec, ids, mask, max_new_tokens=12)
    assert got.sequences == reference_greedy(llama, ids, mask, 12)
    depths = got.stats.draft_depth_per_step[0][:4]  # later steps may be cut by max_new
    assert all(d == 4 for d in depths) if expect_full else all(d == 0 for d in depths)


def _chisquare_ok(observed: torch.Tensor, expected: torch.Tensor) -> bool:
    """Pearson's chi-square at alpha 1e-4, cells expected below 5 merged."""
    return chisquare_pvalue(observed, expected) > 1e-4


@pytest.mark.parametrize("kind, tree", [("clover2", "chain"), ("eagle", "dynamic"),
                                        ("medusa", "static")])
def test_sampling_keeps_the_target_distribution(llama, kind, tree):
    """N identical prompts in one batch at temperature 0.7: the first token (sampled after the
    prefill) follows the target's p(x1), the second (drafted at depth 1 and verified, as the
    third token is the step's bonus) its p(x2) = sum_x1 p(x1) p(x2 | x1) (chi-square, alpha
    1e-4), while drafts do get accepted."""
    N, T = 3000, 0.7
    prompt = torch.tensor([[5, 17, 33, 5, 17]])
    with torch.no_grad():
        p1 = (llama(prompt).logits[0, -1].float() / T).softmax(-1)
        both = torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)
        p2 = (llama(both).logits[:, -1].float() / T).softmax(-1)  # [V(x1), V(x2)]
    net = make_net(kind, llama, draft_vocab=VOCAB)
    spec = Speculator.from_config(SpecConfig(method=kind, checkpoint=net, adaptive=False,
                                             **TREES[tree]), llama)
    runner = ModelTargetRunner(llama, hidden_layers=spec.drafter.hidden_layers)
    out = speculative_generate(runner, spec, prompt.expand(N, -1).contiguous(),
                               max_new_tokens=3, sampling=SamplingParams(temperature=T),
                               generator=torch.Generator().manual_seed(7))
    first = torch.bincount(torch.tensor([s[0] for s in out.sequences]), minlength=VOCAB)
    second = torch.bincount(torch.tensor([s[1] for s in out.sequences]), minlength=VOCAB)
    assert _chisquare_ok(first.float(), p1 * N)
    assert _chisquare_ok(second.float(), (p1[:, None] * p2).sum(0) * N)
    assert sum(sum(a) for a in out.stats.accepted_per_step) > 0  # drafts did get accepted


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_checkpoint_round_trip(tmp_path, llama, kind):
    net = make_net(kind, llama)
    save_head(net, tmp_path, dtype=torch.float32)
    back = load_head(tmp_path).bind(llama.get_input_embeddings(),
                                    llama.get_output_embeddings().weight)
    assert torch.equal(back.draft_vocab, net.draft_vocab)
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in tmp_path.iterdir())


def test_bad_checkpoints_fail_clearly(tmp_path, llama):
    net = make_net("medusa", llama)
    save_head(net, tmp_path / "ok")
    other = tiny_llama(0, vocab=VOCAB + 8)
    with pytest.raises(ValueError, match="vocabulary 96 and hidden size 32.*target has 104"):
        Speculator.from_config(SpecConfig(method="medusa", checkpoint=str(tmp_path / "ok")),
                               other)
    with pytest.raises(ValueError, match="holds a 'medusa' head, not 'eagle'"):
        Speculator.from_config(SpecConfig(method="eagle", checkpoint=str(tmp_path / "ok")),
                               llama)
    with pytest.raises(ValueError, match="cannot draft 6 tokens deep.*at most 4"):
        Speculator.from_config(SpecConfig(method="medusa", checkpoint=str(tmp_path / "ok"),
                                          num_speculative_tokens=6), llama)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((tmp_path / "ok" / "config.json")
                                                      .read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InputFileError, match="pickle checkpoints are never loaded"):
        load_head(tmp_path / "pickled")
    with pytest.raises(ValueError, match="no shipped 'medusa' head for this target"):
        Speculator.from_config(SpecConfig(method="medusa"), llama)


def test_loads_a_fasterdecoding_medusa_folder(tmp_path, llama):
    """Heads with their own LM heads, in FasterDecoding/Medusa's keys, drive the same
    drafts once loaded (and the output stays identical)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    heads, layers = 3, 1
    state = {}
    for h in range(heads):
        state[f"{h}.0.linear.weight"] = 0.1 * torch.randn(H, H)
        state[f"{h}.0.linear.bias"] = 0.1 * torch.randn(H)
        state[f"{h}.{layers}.weight"] = torch.randn(VOCAB, H)
    save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    (tmp_path / "config.json").write_text('{"medusa_num_heads": 3, "medusa_num_layers": 1, '
                                          '"base_model_name_or_path": "tiny"}')
    net = load_head(tmp_path).bind(llama.get_input_embeddings(),
                                   llama.get_output_embeddings().weight)
    f = torch.randn(H)
    for h in range(heads):
        block = f + torch.nn.functional.silu(state[f"{h}.0.linear.weight"] @ f
                                             + state[f"{h}.0.linear.bias"])
        want = state[f"{h}.1.weight"] @ block
        logits, _ = net.expand(None, [f], torch.tensor([0]), h + 1)
        torch.testing.assert_close(logits[0], want, rtol=1e-5, atol=1e-5)
    ids, mask = repetitive_prompts([9], seed=1)
    spec = Speculator.from_config(SpecConfig(method="medusa", checkpoint=net,
                                             num_speculative_tokens=3), llama)
    runner = ModelTargetRunner(llama, hidden_layers=spec.drafter.hidden_layers)
    got = speculative_generate(runner, spec, ids, mask, max_new_tokens=12)
    assert got.sequences == reference_greedy(llama, ids, mask, 12)


def test_loads_a_safeailab_eagle_folder(tmp_path, llama):
    """An EAGLE-1 draft in SafeAILab's layout (Llama config, grouped KV heads, fc bias,
    embed_tokens present but unused) loads to the same network as ours."""
    from safetensors.torch import save_file

    cfg = HeadConfig(kind="eagle", hidden_size=H, vocab_size=VOCAB, draft_vocab_size=VOCAB,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                     fc_bias=True)
    torch.manual_seed(1)
    ours = build_net(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    state = {"fc.weight": ours.fc.weight, "fc.bias": ours.fc.bias,
             "embed_tokens.weight": torch.randn(VOCAB, H)}
    for k, v in ours.layer.state_dict().items():
        state[f"layers.0.{k}"] = v
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,'
        ' "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,'
        ' "rms_norm_eps": 1e-06, "vocab_size": 96, "max_position_embeddings": 256}')
    net = load_head(tmp_path)
    assert net.config.fc_bias and net.config.num_key_value_heads == 2
    ours.bind(llama.get_input_embeddings(), llama.get_output_embeddings().weight)
    net.bind(llama.get_input_embeddings(), llama.get_output_embeddings().weight)
    ids = torch.randint(1, VOCAB, (10,), generator=torch.Generator().manual_seed(2))
    f = features(llama, ids)
    with torch.no_grad():
        a = ours.train_forward(f[None], ids[None], torch.ones(1, 10, dtype=torch.bool))
        b = net.train_forward(f[None], ids[None], torch.ones(1, 10, dtype=torch.bool))
    torch.testing.assert_close(a["logits"][0], b["logits"][0])
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(InputFileError, match="pickle checkpoints are never loaded"):
        load_head(tmp_path)
