"""DFlash speculative decoding in this process, mirroring vLLM's ``method: "dflash"`` proposer.

Each round (vLLM's ``DFlashProposer``):

* the context: the target's aux states of every verified position, projected once per layer
  to keys/values (``precompute_and_store_context_kv``); positions verified this round are added;
* the query block: the last verified token followed by k mask tokens at the next k positions,
  one non-causal pass; the outputs at the k mask positions are the k proposals (argmax, or
  sampled with ``draft_sampling="probabilistic"``);
* verification, cache cropping and the acceptance count are the EAGLE-3 decoder's
  (``SpeculativeDecoder._verify_round``), so the two drafts are measured the same way.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from eagle3.dflash import DFlashQwen3ForCausalLM
from eagle3.evaluate.speculative import SpeculativeDecoder, SpeculativeResult


class DFlashSpeculativeDecoder(SpeculativeDecoder):
    draft: DFlashQwen3ForCausalLM

    def _extend_context(self, kv: list | None, aux: torch.Tensor, start: int) -> list:
        """Per layer context keys/values with the positions ``start..`` of ``aux`` [n, n_aux*H] appended."""
        positions = torch.arange(start, start + aux.shape[0], device=self.device).unsqueeze(0)
        new = self.draft.context_kv(self.draft.context_states(aux.unsqueeze(0)), positions)
        if kv is None:
            return new
        return [
            (torch.cat([k, nk], dim=-2), torch.cat([v, nv], dim=-2)) for (k, v), (nk, nv) in zip(kv, new, strict=True)
        ]

    def _propose_block(self, kv: list, token: int, position: int, q: list) -> list[int]:
        """k proposals from one block: ``token`` at ``position``, then k masks."""
        ids = torch.tensor([[token] + [self.draft.config.mask_token_id] * self.k], device=self.device)
        positions = torch.arange(position, position + self.k + 1, device=self.device).unsqueeze(0)
        normed = self.draft.blocks(ids, positions, kv, None)
        return [self._draft_token(normed[:, j : j + 1], q) for j in range(1, self.k + 1)]

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> SpeculativeResult:
        start = time.perf_counter()
        target_cache = DynamicCache(config=self.target.config)
        logits, aux = self._target_forward(prompt_ids, target_cache)
        output = [self._pick(logits[-1])]  # the first answer token comes from the prefill (as in vLLM)
        result = SpeculativeResult(output_ids=output, accepted_per_position=[0] * self.k)
        context = prompt_ids + output
        kv, verified = None, 0  # draft context: keys/values of positions 0..verified-1
        pending_aux = aux
        finished = output[-1] in self.eos_ids
        while len(output) < max_new_tokens and not finished:
            kv = self._extend_context(kv, pending_aux, verified)
            verified += pending_aux.shape[0]
            q: list = []
            proposal = self._propose_block(kv, output[-1], verified, q)  # output[-1] sits at `verified`
            new_tokens, verify_aux, target_cache = self._verify_round(
                target_cache, context, output, proposal, q, result
            )
            output += new_tokens
            context += new_tokens
            finished = any(token in self.eos_ids for token in new_tokens)
            pending_aux = verify_aux[: len(new_tokens)]  # the last token and the accepted proposals
        return self._finish(result, output, max_new_tokens, start)

    @torch.no_grad()
    def teacher_forced_stats(self, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
        """Training's block-wise estimate on this answer (every block of the decoding walk drafted)."""
        from eagle3.train.dflash_loss import block_loss

        ids, target = self._teacher_forced_inputs(prompt_ids, output_ids)
        _, stats = block_loss(self.draft, ids, self.recorder.concatenated(), target, num_anchors=ids.shape[1])
        return stats

    @property
    def stats_steps(self) -> int:
        return self.draft.config.block_size - 1
