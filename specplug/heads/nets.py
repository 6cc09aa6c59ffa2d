"""The head networks. Each has a training form (teacher-forced over whole sequences) and a
drafting form (one tree depth at a time, batched over the frontier of one row).

Notation: committed tokens ``x_0 .. x_{n-1}`` (``x_{n-1}`` is the root of this step's tree),
target features ``f_i`` at each committed position but the root (``f_{n-2}`` produced the root).
A head at tree depth ``d`` proposes the ``d``-th draft token, ``x_{n-1+d}``.

Drafting protocol (what ``specplug.drafters.trained_heads`` drives):
- ``new_row()`` -> a per-request row cache;
- ``commit(row, feats [m, F], tokens [m])``: positions whose feature and next token are both
  known (every committed token but the root);
- ``root_state(row, feat [F])``: the state that expands the root (``feat`` is ``f_{n-2}``);
- ``expand(row, states, tokens [N], depth) -> (logits [N, Vd], child states)``: the tree nodes
  at ``depth - 1`` (their tokens and their parents' states) -> the distribution of their
  children at ``depth``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from specplug.heads.config import HeadConfig
from specplug.heads.layers import Attention, DecoderLayer, ResAttention, ResBlock, RMSNorm

__all__ = ["DraftNet", "MedusaNet", "EagleNet", "CloverNet", "Clover2Net", "MsdNet", "build_net"]


class DraftNet(nn.Module):
    """Base: the draft vocabulary, and the target's embedding and LM head (borrowed, frozen,
    never in ``state_dict``)."""

    kind = ""

    def __init__(self, config: HeadConfig, draft_vocab: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        if draft_vocab is None:
            draft_vocab = torch.arange(config.vocab_size)
        if draft_vocab.numel() != config.draft_vocab_size:
            raise ValueError(f"draft_vocab has {draft_vocab.numel()} ids but the config says "
                             f"draft_vocab_size={config.draft_vocab_size}")
        self.register_buffer("draft_vocab", draft_vocab.long().clone())
        self._target: dict[str, Any] = {}

    # --- the target's pieces ---------------------------------------------------------------
    def bind(self, embed: nn.Module, lm_head_weight: torch.Tensor) -> DraftNet:
        """Borrow the target's token embedding module and LM head weight ``[V, H]``."""
        V, H = lm_head_weight.shape
        cfg = self.config
        if cfg.vocab_size != V or cfg.hidden_size != H:
            from specplug.errors import SpecplugError

            raise SpecplugError(
                f"head/target mismatch: the {cfg.kind} head was trained for vocabulary "
                f"{cfg.vocab_size} and hidden size {cfg.hidden_size}"
                f"{f' ({cfg.target})' if cfg.target else ''}, the target has {V} and {H}; "
                "train a head for this target (specplug train --model ...)")
        self._target = {"embed": embed,
                        "lm": lm_head_weight.detach()[self.draft_vocab].float().contiguous()}
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._target["embed"](tokens).float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., H]`` -> draft-vocabulary logits ``[..., Vd]`` (through the test-time
        adapter first, when one is set)."""
        return self.adapt(h) @ self._target["lm"].T

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., H]`` through the test-time adapter, when one is set (before any LM
        head: the target's, or a head's own)."""
        adapter = self._target.get("adapter")
        return h if adapter is None else adapter(h)

    def set_output_adapter(self, adapter: nn.Module | None) -> None:
        """Apply ``adapter`` (``specplug.online.lowrank.OutputAdapter``) to the LM head's input;
        it is not a submodule: never in ``state_dict`` nor in ``parameters()``."""
        self._target["adapter"] = adapter

    def feature_in(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    #: True when ``commit`` also wants the features of the positions of ``tokens``
    #: (``next_feats``), not only those before them
    reads_next_features = False

    def regression_target(self, feats: torch.Tensor) -> torch.Tensor:
        """What predicted features regress onto, from the target features ``[..., F]``."""
        return feats

    # --- training ---------------------------------------------------------------------------
    def train_forward(self, feats: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor
                      ) -> dict[str, Any]:
        """``feats [B, T, F]``, ``tokens [B, T]``, ``valid [B, T]`` -> ``{"logits": [K] x
        [B, T, Vd]}`` where ``logits[d-1][:, t]`` predicts ``tokens[:, t + 1 + d]`` (plus
        head-specific extras)."""
        raise NotImplementedError

    # --- drafting ---------------------------------------------------------------------------
    def new_row(self) -> Any:
        return None

    def commit(self, row: Any, feats: torch.Tensor, tokens: torch.Tensor) -> Any:
        return row

    def root_state(self, row: Any, feat: torch.Tensor) -> Any:
        raise NotImplementedError

    def expand(self, row: Any, states: list[Any], tokens: torch.Tensor, depth: int
               ) -> tuple[torch.Tensor, list[Any]]:
        raise NotImplementedError

    @property
    def max_depth(self) -> int:
        return self.config.num_heads


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], 1)


def _append_pairs(row: dict, layer: DecoderLayer, x: torch.Tensor) -> dict:
    """Cache ``layer``'s keys/values ``[1, m, nkv, hd]`` for committed inputs ``x [m, H]`` at
    the row's next positions (a trunk's committed context)."""
    n = row["n"]
    k, v = layer.keys_values(x[None], torch.arange(n, n + x.shape[0])[None])
    row["k"], row["v"], row["n"] = _cat(row["k"], k), _cat(row["v"], v), n + x.shape[0]
    return row


class MedusaNet(DraftNet):
    """Medusa (Cai et al. 2024): head ``d`` is ``num_layers`` residual blocks on ``f_t``, then
    the target's LM head, and predicts ``x_{t+1+d}``. Heads see no draft token, so every node at
    a depth gets the same distribution."""

    kind = "medusa"

    def __init__(self, config: HeadConfig, draft_vocab: torch.Tensor | None = None):
        super().__init__(config, draft_vocab)
        H = config.hidden_size
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResBlock(H) for _ in range(config.num_layers)])
            for _ in range(config.num_heads))
        self.lm_heads = (nn.ModuleList(nn.Linear(H, config.draft_vocab_size, bias=False)
                                       for _ in range(config.num_heads))
                         if config.own_lm_heads else None)

    def _head(self, d: int, f: torch.Tensor) -> torch.Tensor:
        h = self.heads[d](f)
        return self.lm_heads[d](self.adapt(h)) if self.lm_heads is not None else self.logits(h)

    def train_forward(self, feats, tokens, valid):
        return {"logits": [self._head(d, feats) for d in range(len(self.heads))]}

    def root_state(self, row, feat):
        return feat

    def expand(self, row, states, tokens, depth):
        f = states[0]  # all nodes share the row's feature
        logits = self._head(depth - 1, f)
        return logits.expand(len(states), -1), [f] * len(states)


class EagleNet(DraftNet):
    """EAGLE (Li et al. 2024): one decoder layer that predicts the next feature from the current
    feature and the next token's embedding: ``g_t = Layer(fc([e(x_{t+1}); f_t]))`` ~ ``f_{t+1}``,
    causal over the sequence; tokens come from the target's LM head on ``g``. Drafting feeds its
    own predictions back (``f`` <- ``g``) with tree attention over the committed context plus
    each node's path."""

    kind = "eagle"

    def __init__(self, config: HeadConfig, draft_vocab: torch.Tensor | None = None):
        super().__init__(config, draft_vocab)
        H = config.hidden_size
        self.fc = nn.Linear(H + config.feature_size, H, bias=config.fc_bias)
        self.layer = DecoderLayer(H, config.num_attention_heads,
                                  config.intermediate_size or 2 * H, config.rope_theta,
                                  config.rms_norm_eps, input_norm=False,
                                  kv_heads=config.num_key_value_heads,
                                  head_dim=config.head_dim)

    def _z(self, tokens: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.embed(tokens), feats], -1))

    def train_forward(self, feats, tokens, valid):
        B, T, _ = feats.shape
        z = self._z(tokens[:, 1:], feats[:, :-1])  # pairs (f_t, x_{t+1}), t < T - 1
        pos = torch.arange(T - 1, device=feats.device).expand(B, -1)
        g = self.layer.causal(z, pos, valid[:, 1:])
        return {"logits": [self.logits(g)], "features": g}

    # drafting: row = committed keys/values [1, T, nh, hd]; state = (f, path k, path v, pos)
    def new_row(self):
        return {"k": None, "v": None, "n": 0}

    def commit(self, row, feats, tokens):
        return _append_pairs(row, self.layer, self._z(tokens, feats)) if len(feats) else row

    def root_state(self, row, feat):
        attn = self.layer.self_attn
        empty = torch.zeros(0, attn.kv_heads, attn.head_dim)
        return (feat, empty, empty, row["n"])

    def expand(self, row, states, tokens, depth):
        N = len(states)
        f = torch.stack([s[0] for s in states])
        pk = torch.stack([s[1] for s in states])  # [N, depth-1, nh, hd]
        pv = torch.stack([s[2] for s in states])
        pos = torch.tensor([[states[0][3]]])
        z = self._z(tokens, f)[:, None]  # [N, 1, H]
        k, v = self.layer.keys_values(z, pos.expand(N, 1))
        keys = [pk, k] if row["k"] is None else [row["k"].expand(N, -1, -1, -1), pk, k]
        vals = [pv, v] if row["v"] is None else [row["v"].expand(N, -1, -1, -1), pv, v]
        g = self.layer(z, pos.expand(N, 1), torch.cat(keys, 1), torch.cat(vals, 1))[:, 0]
        children = [(g[i], torch.cat([pk[i], k[i]], 0), torch.cat([pv[i], v[i]], 0),
                     states[0][3] + 1) for i in range(N)]
        return self.logits(g), children

    @property
    def max_depth(self) -> int:
        return 64




class CloverNet(DraftNet):
    """Clover (Xiao et al. 2024): Medusa heads plus the three Clover pieces.

    - Augmenting Block: one decoder layer over the target's features, causal over the
      sequence: ``a_t = Aug(f_{<=t})``; ``s_0 = a_t``.
    - Regressive Connection: depth ``d`` starts from the previous state and the token
      speculated before it (the root at depth 1): ``u_d = W_r [e(x_{t+d}); s_{d-1}]``.
    - Attention Decoder: ``u_d`` attends over the augmented states of the whole sequence,
      ``s_d = u_d + Attn(q = u_d, k, v = a_{<=t})``.
    - Head ``d``: a residual block, then the target's LM head: ``logits_d = LM(R_d(s_d))``.
    """

    kind = "clover"

    def __init__(self, config: HeadConfig, draft_vocab: torch.Tensor | None = None):
        super().__init__(config, draft_vocab)
        H, nh = config.hidden_size, config.num_attention_heads
        self.proj_in = (nn.Linear(config.feature_size, H, bias=False)
                        if config.feature_size != H else nn.Identity())
        self.augment = DecoderLayer(H, nh, config.intermediate_size or 2 * H,
                                    config.rope_theta, config.rms_norm_eps)
        self.regressive = nn.Linear(2 * H, H, bias=False)
        with torch.no_grad():  # starts as e + s
            self.regressive.weight.copy_(torch.cat([torch.eye(H), torch.eye(H)], 1))
        self.decoder_norm = RMSNorm(H, config.rms_norm_eps)
        self.decoder = Attention(H, nh, config.rope_theta)
        self.heads = nn.ModuleList(ResBlock(H) for _ in range(config.num_heads))

    def _step(self, s: torch.Tensor, tok_emb: torch.Tensor, pos: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, depth: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.regressive(torch.cat([tok_emb, s], -1))
        s = u + self.decoder(self.decoder_norm(u), pos, k, v, mask)
        return self.logits(self.heads[depth - 1](s)), s

    def train_forward(self, feats, tokens, valid):
        B, T, _ = feats.shape
        pos = torch.arange(T, device=feats.device).expand(B, -1)
        a = self.augment.causal(self.proj_in(feats), pos, valid)
        k, v = self.decoder.keys_values(a, pos)
        mask = torch.ones(T, T, dtype=torch.bool, device=feats.device).tril()[None]
        mask = (mask & valid[:, None, :]) | torch.eye(T, dtype=torch.bool)
        s, logits = a, []
        for d in range(1, self.config.num_heads + 1):
            nxt = torch.zeros_like(tokens)
            nxt[:, : T - d] = tokens[:, d:]  # x_{t+d}
            out, s = self._step(s, self.embed(nxt), pos + d, k, v, mask, d)
            logits.append(out)
        return {"logits": logits}

    # drafting: row caches the augmenting layer's and the decoder's keys/values
    def new_row(self):
        return {"ak": None, "av": None, "dk": None, "dv": None, "n": 0}

    def _augment(self, row: dict, x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment new features ``x [1, m, F]`` after the cached ones (not cached yet)."""
        n, m = row["n"], x.shape[1]
        pos = torch.arange(n, n + m)[None]
        h = self.proj_in(x)
        ak, av = self.augment.keys_values(h, pos)
        keys, vals = _cat(row["ak"], ak), _cat(row["av"], av)
        mask = torch.ones(m, n + m, dtype=torch.bool).tril(n)[None]
        a = self.augment(h, pos, keys, vals, mask)
        dk, dv = self.decoder.keys_values(a, pos)
        return a, ak, av, dk, dv

    def commit(self, row, feats, tokens):
        if feats.shape[0] == 0:
            return row
        _, ak, av, dk, dv = self._augment(row, feats[None])
        for key, val in (("ak", ak), ("av", av), ("dk", dk), ("dv", dv)):
            row[key] = _cat(row[key], val)
        row["n"] += feats.shape[0]
        return row

    def root_state(self, row, feat):
        a, _, _, dk, dv = self._augment(row, feat[None, None])
        return (a[0, 0], dk, dv, row["n"])  # s_0, the root position's decoder keys/values

    def expand(self, row, states, tokens, depth):
        N = len(states)
        s = torch.stack([st[0] for st in states])[:, None]
        _, dk, dv, t = states[0]
        k = _cat(row["dk"], dk).expand(N, -1, -1, -1)
        v = _cat(row["dv"], dv).expand(N, -1, -1, -1)
        pos = torch.full((N, 1), t + depth)
        logits, s = self._step(s, self.embed(tokens)[:, None], pos, k, v, None, depth)
        return logits[:, 0], [(s[i, 0], dk, dv, t) for i in range(N)]


class Clover2Net(DraftNet):
    """Clover-2 (Xiao et al. 2024b), as its authors' code does it, with the target's frozen
    input embedding (not a trained copy of the LM head: it would not fit a small checkpoint):

    - trunk, causal over the sequence, run on committed pairs ``(f_t, x_{t+1})``:
      ``g_t = Aug(C_1(f_t, e(x_{t+1})))``, ``s_0 = norm(g_t)`` (``C``: the cosine-gated
      ``ResAttention`` cell, the hidden state querying the token; ``Aug``: a decoder layer);
    - depth 1: ``o_1 = norm_h(W_0 s_0)``;
    - depth ``d > 1`` (one cell shared by all depths, an RNN over the speculated tokens):
      ``s_{d-1} = C_2(s_{d-2}, e(y_{d-1}))``, ``o_d = norm_h(W_2 [s_{d-1}; e(y_{d-1})])``
      (the output projection after the attention decoder);
    - ``logits_d = LM(o_d)``, trained by distillation from the target's distribution plus a
      regression of ``o_d`` on the target's feature (``specplug.train``).
    """

    kind = "clover2"

    def __init__(self, config: HeadConfig, draft_vocab: torch.Tensor | None = None):
        super().__init__(config, draft_vocab)
        H, nh, eps = config.hidden_size, config.num_attention_heads, config.rms_norm_eps
        self.proj_in = (nn.Linear(config.feature_size, H, bias=False)
                        if config.feature_size != H else nn.Identity())
        self.cell_in = ResAttention(H, nh, eps)
        self.augment = DecoderLayer(H, nh, config.intermediate_size or 2 * H,
                                    config.rope_theta, eps)
        self.norm = RMSNorm(H, eps)
        self.head_norm = RMSNorm(H, eps)
        self.first = nn.Linear(H, H)
        self.cell = ResAttention(H, nh, eps)
        self.out_proj = nn.Linear(2 * H, H)
        with torch.no_grad():
            for lin, eye in ((self.first, torch.eye(H)),
                             (self.out_proj, torch.cat([torch.eye(H), torch.zeros(H, H)], 1))):
                nn.init.uniform_(lin.weight, 0.0, 0.01)
                lin.weight += eye
                nn.init.zeros_(lin.bias)

    def _trunk_in(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.cell_in(self.proj_in(feats), self.embed(tokens))

    def _deeper(self, s: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.cell(s, e)
        return self.head_norm(self.out_proj(torch.cat([s, e], -1))), s

    def train_forward(self, feats, tokens, valid):
        B, T, _ = feats.shape
        pos = torch.arange(T - 1, device=feats.device).expand(B, -1)
        g = self.augment.causal(self._trunk_in(feats[:, :-1], tokens[:, 1:]), pos, valid[:, 1:])
        s = self.norm(g)
        outs = [self.head_norm(self.first(s))]
        for d in range(2, self.config.num_heads + 1):
            nxt = torch.zeros_like(tokens[:, 1:])
            nxt[:, : T - d] = tokens[:, d:]  # y_{d-1} = x_{t+d}
            o, s = self._deeper(s, self.embed(nxt))
            outs.append(o)
        return {"logits": [self.logits(o) for o in outs], "outputs": outs}

    def new_row(self):
        return {"k": None, "v": None, "n": 0}

    def commit(self, row, feats, tokens):
        return (_append_pairs(row, self.augment, self._trunk_in(feats, tokens)) if len(feats)
                else row)

    def root_state(self, row, feat):
        return ("trunk", feat, row["n"])

    def expand(self, row, states, tokens, depth):
        if depth == 1:  # the root: (f_{n-2}, root token) through the trunk
            _, feat, n = states[0]
            x = self._trunk_in(feat[None, None], tokens[:1, None])
            pos = torch.tensor([[n]])
            k, v = self.augment.keys_values(x, pos)
            g = self.augment(x, pos, _cat(row["k"], k), _cat(row["v"], v))
            s = self.norm(g)[:, 0]
            return self.logits(self.head_norm(self.first(s))), [s[0]]
        s = torch.stack(states)
        o, s = self._deeper(s, self.embed(tokens))
        return self.logits(o), list(s)


class MsdNet(EagleNet):
    """MSD (Lin et al. 2025, "Speculative Decoding Reimagined for Multimodal LLMs"): an EAGLE
    layer that handles text and visual tokens apart. It reads two target layers
    (``hidden_layers = [-1, 0]``): the last features ``f`` and the input embeddings ``v``, which
    at image placeholders are the target's *projected visual features*. A text token enters as
    ``fc([e(x_{t+1}); f_t])`` (EAGLE); an image token as ``fc([visual(v_{t+1}); f_t])``, with
    ``visual`` a small adapter of its own, so the head processes text as a language model and
    sees the image through its own adapter. Training is two-stage (``specplug train
    --drafter msd``): text-only data first, then multimodal data (adapter included)."""

    kind = "msd"
    reads_next_features = True

    def __init__(self, config: HeadConfig, draft_vocab: torch.Tensor | None = None):
        super().__init__(config, draft_vocab)
        H = config.hidden_size
        if list(config.hidden_layers) != [-1, 0]:
            raise ValueError(f"an msd head reads hidden_layers [-1, 0] (the last features and "
                             f"the input embeddings), not {config.hidden_layers}")
        self.fc = nn.Linear(2 * H, H, bias=config.fc_bias)
        self.visual = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, H))
        self.register_buffer("media", torch.tensor(sorted(config.media_tokens), dtype=torch.long))

    def regression_target(self, feats: torch.Tensor) -> torch.Tensor:
        return feats[..., : self.config.hidden_size]

    def _inputs(self, tokens: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings ``[..., H]``: the token's, or the adapted visual feature
        (``visual [..., H]``: the target's input embeddings there) at image placeholders."""
        e = self.embed(tokens)
        if visual is None or self.media.numel() == 0:
            return e
        is_media = torch.isin(tokens, self.media)
        if not bool(is_media.any()):
            return e
        return torch.where(is_media[..., None], self.visual(visual.float()), e)

    def _z(self, tokens: torch.Tensor, feats: torch.Tensor,
           visual: torch.Tensor | None = None) -> torch.Tensor:
        H = self.config.hidden_size
        return self.fc(torch.cat([self._inputs(tokens, visual), feats[..., :H]], -1))

    def train_forward(self, feats, tokens, valid):
        B, T, _ = feats.shape
        H = self.config.hidden_size
        z = self._z(tokens[:, 1:], feats[:, :-1], feats[:, 1:, H:])
        pos = torch.arange(T - 1, device=feats.device).expand(B, -1)
        g = self.layer.causal(z, pos, valid[:, 1:])
        return {"logits": [self.logits(g)], "features": g}

    def commit(self, row, feats, tokens, next_feats=None):
        if not len(feats):
            return row
        visual = None if next_feats is None else next_feats[:, self.config.hidden_size:]
        return _append_pairs(row, self.layer, self._z(tokens, feats, visual))

    def root_state(self, row, feat):
        return super().root_state(row, feat[: self.config.hidden_size])


def build_net(config: HeadConfig, draft_vocab: torch.Tensor | None = None) -> DraftNet:
    nets = {"medusa": MedusaNet, "eagle": EagleNet, "clover": CloverNet,
            "clover2": Clover2Net, "msd": MsdNet}
    return nets[config.kind](config, draft_vocab)
