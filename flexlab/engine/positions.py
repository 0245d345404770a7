"""Where each token of a block sits: per GPU batch, which cache slots hold tokens, the positions of
the tokens computed at each step, and their attention mask (with a family's per-head bias, as
ALiBi's), each built once per token and shared by every layer."""

from __future__ import annotations

import torch

from flexlab.models.attention import SplitBias, attention_bias
from flexlab.models.config import ModelConfig
from flexlab.models.family import ModelFamily
from flexlab.models.generation import positions_from_mask


class TokenPlaces:
    """``valid[k]``: batch ``k``'s left-padded prefill slots that hold tokens (``[b, width]``)."""

    def __init__(self, valid: list[torch.Tensor], config: ModelConfig, family: ModelFamily) -> None:
        self.valid, self.config, self.family = valid, config, family
        # per batch: (token, value) of the last token asked for
        self._grown: dict[int, tuple[int, torch.Tensor]] = {}
        self._pos: dict[int, tuple[int, torch.Tensor]] = {}
        self._masks: dict[int, tuple[int, torch.Tensor | SplitBias]] = {}

    def slots(self, t: int, k: int) -> torch.Tensor:
        """Which cache slots of batch ``k`` hold tokens once token ``t`` is in: the prefill's,
        then one more per token (built once per token, for the positions and the mask)."""
        if self._grown.get(k, (None,))[0] != t:
            valid = self.valid[k]
            grown = valid if t == 0 else torch.cat([valid, torch.ones_like(valid[:, :1]).expand(-1, t)], dim=1)
            self._grown[k] = (t, grown)
        return self._grown[k][1]

    def positions(self, t: int, k: int) -> torch.Tensor:
        """Batch ``k``'s positions of the tokens computed at token ``t`` (``[b, s]``)."""
        if self._pos.get(k, (None,))[0] != t:
            positions = positions_from_mask(self.slots(t, k))
            self._pos[k] = (t, positions if t == 0 else positions[:, -1:])
        return self._pos[k][1]

    def length(self, t: int) -> int:
        """The cache slots every sequence spans once token ``t`` is in (the family's ``length``):
        the block's width, then one more per token."""
        return self.valid[0].shape[1] + t

    def bias(self, t: int, k: int) -> torch.Tensor | SplitBias:
        """Batch ``k``'s attention mask for token ``t`` (see :func:`attention_bias`)."""
        if self._masks.get(k, (None,))[0] != t:
            valid = self.slots(t, k)
            cfg, per_head = self.config, self.family.position_bias
            keys_bias = None if per_head is None else (lambda positions: per_head(cfg, positions))
            self._masks[k] = (t, attention_bias(valid, valid.shape[1] if t == 0 else 1, cfg.sliding_window, keys_bias))
        return self._masks[k][1]

    def decode_bias(self, t: int, k: int) -> torch.Tensor:
        """The mask of one new token (``t`` > 0): always one summed tensor."""
        bias = self.bias(t, k)
        assert isinstance(bias, torch.Tensor) and t > 0, "a decode bias asked for the prefill"
        return bias
