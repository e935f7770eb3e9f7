"""PoolOracle: an Oracle over a model's answers to the thief pool, computed once."""
from __future__ import annotations

import hashlib

import torch

from honeypotnet.oracles import Oracle, OutputMode


class PoolOracle(Oracle):
    """An Oracle whose answers to the thief pool were computed once, by the very model behind it.

    `_answer` looks every queried image up by its bytes (images come in as uint8/255 floats, so the
    round trip is exact). The base class counts queries and applies the output mode, so a thief
    sees exactly what ModelOracle(model, output) would answer and pays one query per image."""

    def __init__(self, probs: torch.Tensor, pool: torch.Tensor, output: OutputMode | None = None) -> None:
        super().__init__(output)
        if len(probs) != len(pool):
            raise ValueError("one answer per pool image expected")
        self.probs = probs
        self.num_classes = probs.shape[1]
        self.index = {self._digest(img): i for i, img in enumerate(pool)}

    @staticmethod
    def _digest(img_u8: torch.Tensor) -> bytes:
        return hashlib.blake2b(img_u8.contiguous().numpy().tobytes(), digest_size=16).digest()

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        u8 = (x.detach().cpu() * 255).round().to(torch.uint8)
        try:
            idx = [self.index[self._digest(img)] for img in u8]
        except KeyError:
            raise KeyError("PoolOracle was queried with an image outside the pool it was built for") from None
        return self.probs[idx]
