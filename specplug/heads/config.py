"""``HeadConfig``: everything needed to rebuild a trained head (saved as ``config.json``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["HeadConfig", "HEAD_KINDS"]

HEAD_KINDS = ("medusa", "clover", "clover2", "eagle", "msd")


class HeadConfig(BaseModel):
    """Shape and wiring of a trained head.

    Attributes:
        kind: ``medusa`` | ``clover`` | ``clover2`` | ``eagle`` | ``msd``.
        hidden_size: the target's hidden size ``H``.
        vocab_size: the target's vocabulary ``V`` (checked against the target at load).
        draft_vocab_size: ``Vd``, the number of token ids the head can propose (the ids are in
            the checkpoint as ``draft_vocab``; ``Vd == V`` means the full vocabulary).
        num_heads: depth heads (Medusa, Clover): head ``d`` proposes the ``d``-th draft token.
        num_layers: residual blocks per Medusa head.
        num_attention_heads: attention heads of the Clover attention decoder / augmenting block
            and of EAGLE's decoder layer; ``num_key_value_heads`` (default: the same) and
            ``head_dim`` (default: ``hidden_size / num_attention_heads``) as in Llama configs.
        fc_bias: EAGLE's input projection has a bias (published EAGLE-1 Vicuna/LLaMA-2 heads).
        own_lm_heads: Medusa heads each have their own LM head over the full vocabulary (the
            FasterDecoding/Medusa layout) instead of borrowing the target's.
        intermediate_size: MLP width of the augmenting block / EAGLE's decoder layer.
        hidden_layers: the target's ``hidden_states`` entries the head reads (``-1``: what the
            LM head reads).
        rope_theta: rotary base of the head's own attention.
        target: the target model's name, for messages.
        media_tokens: the target's image placeholder ids (``msd``: where its visual adapter
            replaces the token embedding; checked against the target at load).
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["specplug-head"] = "specplug-head"
    version: int = 1
    kind: Literal["medusa", "clover", "clover2", "eagle", "msd"]
    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    draft_vocab_size: int = Field(gt=0)
    num_heads: int = Field(4, ge=1, le=16)
    num_layers: int = Field(1, ge=1, le=4)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    head_dim: int | None = Field(None, ge=1)
    fc_bias: bool = False
    own_lm_heads: bool = False
    intermediate_size: int = Field(0, ge=0)
    hidden_layers: list[int] = Field(default_factory=lambda: [-1])
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    target: str | None = None
    media_tokens: list[int] = Field(default_factory=list)

    @property
    def feature_size(self) -> int:
        """``F``: size of the hidden features read from the target."""
        return self.hidden_size * len(self.hidden_layers)
