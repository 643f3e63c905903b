"""Chain speculative decoding with the draft and the target in this process (transformers).

It mirrors what vLLM does with ``method: "eagle3"`` so the two measurements agree:

* the first answer token comes from the target's prefill, never from the draft;
* each round the draft proposes k tokens from (the target's aux states, the next token),
  feeding its own pre-norm hidden state back for steps 2..k, at rope positions t+i;
* the target verifies the k tokens in one forward: at temperature 0 the longest prefix equal to
  its own greedy choices is kept plus one bonus token. Above 0, by default as vLLM
  (``draft_sample_method="greedy"``): the draft proposes its argmax, treated as a one-hot q, so a
  token is kept with probability p_target(token) and a rejection resamples from p with that token
  removed. ``draft_sampling="probabilistic"`` (vLLM's other option) samples the draft and keeps a
  token with min(1, p/q), resampling from max(p - q, 0). Both keep the output distribution p;
* the draft's cache keeps only entries computed from target states: after verification the
  accepted tokens are re-read with the target's aux states, as vLLM's proposer does.

Acceptance length = 1 + accepted / rounds (vLLM's "mean acceptance length").
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from eagle3.families import decoder_layers, family_of, final_norm_module
from eagle3.modeling import Eagle3Qwen3ForCausalLM


class AuxStateRecorder:
    """Forward hooks that record the OUTPUT of chosen decoder layers (our layer numbering)."""

    def __init__(self, target: PreTrainedModel, layers: list[int]) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self.layers = list(layers)
        layers_of_target = decoder_layers(target)
        self._hooks = [layers_of_target[i].register_forward_hook(self._hook(i)) for i in self.layers]

    def _hook(self, layer: int):
        def record(_module, _inputs, output):
            self.states[layer] = output[0] if isinstance(output, tuple) else output

        return record

    def concatenated(self) -> torch.Tensor:
        return torch.cat([self.states[i] for i in self.layers], dim=-1)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


@dataclass
class SpeculativeResult:
    output_ids: list[int]
    rounds: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def acceptance_length(self) -> float | None:
        return 1.0 + self.accepted / self.rounds if self.rounds else None


DRAFT_SAMPLING = ("greedy", "probabilistic")  # vLLM's SpeculativeConfig.draft_sample_method


def _probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


class SpeculativeDecoder:
    """Draft + target in one process, batch size 1 per prompt (as acceptance is measured)."""

    def __init__(
        self,
        target: PreTrainedModel,
        draft: Eagle3Qwen3ForCausalLM,
        num_speculative_tokens: int = 3,
        temperature: float = 0.0,
        seed: int = 0,
        draft_sampling: str = "greedy",
    ) -> None:
        if draft_sampling not in DRAFT_SAMPLING:
            raise ValueError(f"draft_sampling must be one of {DRAFT_SAMPLING}, got {draft_sampling!r}")
        self.draft_sampling = draft_sampling
        self.target = target.eval()
        self.draft = draft.eval()
        # Inputs go to the models' device; sampling stays on the CPU generator (seeded the same
        # on every device), so only [V] probability vectors ever cross.
        self.device = next(target.parameters()).device
        self.k = num_speculative_tokens
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab_size = target.config.get_text_config().vocab_size
        self.draft_to_target = draft.draft_to_target_ids().cpu()
        eos = target.generation_config.eos_token_id if target.generation_config is not None else None
        eos = eos if eos is not None else target.config.get_text_config().eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.recorder = AuxStateRecorder(target, draft.config.target_layers)
        self.family = family_of(target.config)
        self._projector = None  # built on first teacher_forced_stats

    # ------------------------------------------------------------------ pieces
    def _target_forward(self, ids: list[int], cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Target logits [n, V] and aux states [n, n_aux*H] for ``ids`` appended to ``cache``."""
        input_ids = torch.tensor([ids], device=self.device)
        out = self.target(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.logits[0], self.recorder.concatenated()[0]

    def _pick(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        return int(torch.multinomial(_probabilities(logits.cpu(), self.temperature), 1, generator=self.generator))

    def _draft_distribution(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Draft probabilities over the TARGET vocab (zero outside the draft vocab)."""
        full = torch.zeros(self.vocab_size, device="cpu")
        full[self.draft_to_target] = _probabilities(draft_logits.cpu(), self.temperature)
        return full

    def _draft_token(self, normed: torch.Tensor, distributions: list) -> int:
        """The draft's token (a target id) from its last position; above temperature 0 the draft
        distribution it was sampled from is appended to ``distributions`` for verification."""
        logits = self.draft.compute_logits(normed)[0, -1]
        if self.temperature == 0 or self.draft_sampling == "greedy":
            return int(self.draft_to_target[int(logits.argmax())])
        q = self._draft_distribution(logits)
        distributions.append(q)
        return int(torch.multinomial(q, 1, generator=self.generator))

    def _propose(self, hidden: torch.Tensor, token: int, position: int, cache, count: int, distributions: list):
        """``count`` more draft tokens (target ids), chaining the draft's own pre-norm state."""
        tokens = []
        for step in range(count):
            embeds = self.draft.embed_tokens(torch.tensor([[token]], device=self.device))
            positions = torch.tensor([[position + step]], device=self.device)
            normed, hidden = self.draft.draft_step(hidden, embeds, positions, cache)
            token = self._draft_token(normed, distributions)
            tokens.append(token)
        return tokens

    def _verify(self, proposal: list[int], q: list, target_logits: torch.Tensor) -> list[int]:
        """Accepted draft tokens followed by one token from the target (bonus or correction)."""
        kept: list[int] = []
        for j, token in enumerate(proposal):
            if self.temperature == 0:
                if int(target_logits[j].argmax()) != token:
                    return kept + [int(target_logits[j].argmax())]
            elif self.draft_sampling == "greedy":
                # q is one-hot on the draft's argmax: keep with probability p(token); on rejection
                # resample from max(p - onehot, 0), i.e. p without that token (vLLM's NO_DRAFT_PROBS path).
                p = _probabilities(target_logits[j].cpu(), self.temperature)
                if torch.rand(1, generator=self.generator, device="cpu").item() >= float(p[token]):
                    residual = p.clone()
                    residual[token] = 0
                    residual = residual / residual.sum() if residual.sum() > 0 else p
                    return kept + [int(torch.multinomial(residual, 1, generator=self.generator))]
            else:
                p = _probabilities(target_logits[j].cpu(), self.temperature)
                if torch.rand(1, generator=self.generator, device="cpu").item() >= min(
                    1.0, float(p[token] / q[j][token])
                ):
                    residual = (p - q[j]).clamp(min=0)
                    residual = residual / residual.sum() if residual.sum() > 0 else p
                    return kept + [int(torch.multinomial(residual, 1, generator=self.generator))]
            kept.append(token)
        return kept + [self._pick(target_logits[len(proposal)])]

    def _verify_round(
        self, target_cache: DynamicCache, context: list[int], output: list[int], proposal: list[int], q: list, result
    ) -> tuple[list[int], torch.Tensor, DynamicCache]:
        """The target verifies ``proposal`` after the last output token in one forward; returns the
        new tokens (accepted + the target's own), the aux states of the verified positions and the
        target's cache cut back to them. Counts the round in ``result``."""
        # A hybrid target's linear-attention layers carry a recurrent state that cannot be
        # cropped back (transformers can only crop their conv state): keep the cache as it
        # was before verification and replay the accepted tokens on a rejection.
        before_verify = copy.deepcopy(target_cache) if self.family.hybrid else None
        target_logits, verify_aux = self._target_forward([output[-1], *proposal], target_cache)
        new_tokens = self._verify(proposal, q, target_logits)
        accepted = len(new_tokens) - 1
        result.rounds += 1
        result.accepted += accepted
        for j in range(accepted):
            result.accepted_per_position[j] += 1
        # Drop the rejected proposals from the target's cache (negative = tokens to remove).
        rejected = target_cache.get_seq_length() - (len(context) + accepted)
        if rejected and before_verify is not None:
            target_cache = before_verify
            _, verify_aux = self._target_forward([output[-1], *proposal[:accepted]], target_cache)
        elif rejected:
            target_cache.crop(-rejected)
        return new_tokens, verify_aux, target_cache

    def _finish(self, result: SpeculativeResult, output: list[int], max_new_tokens: int, start: float):
        """The answer up to its first end-of-turn token (or ``max_new_tokens``) and the time taken."""
        eos_at = next((i for i, t in enumerate(output) if t in self.eos_ids), None)
        result.output_ids = output[: eos_at + 1] if eos_at is not None else output[:max_new_tokens]
        result.seconds = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> SpeculativeResult:
        start = time.perf_counter()
        target_cache = DynamicCache(config=self.target.config)
        draft_cache = self.draft.new_cache("append")
        logits, aux = self._target_forward(prompt_ids, target_cache)
        output = [self._pick(logits[-1])]  # the first answer token is never drafted (as in vLLM)
        result = SpeculativeResult(output_ids=output, accepted_per_position=[0] * self.k)
        # The draft reads (target state at t, token t+1) for every position the target has seen.
        context = prompt_ids + output
        pending_aux, pending_tokens, position = aux, context[1:], 0
        finished = output[-1] in self.eos_ids
        while len(output) < max_new_tokens and not finished:
            hidden = self.draft.combine_hidden_states(pending_aux.unsqueeze(0))
            embeds = self.draft.embed_tokens(torch.tensor([pending_tokens], device=self.device))
            positions = torch.arange(position, position + len(pending_tokens), device=self.device).unsqueeze(0)
            normed, prenorm = self.draft.draft_step(hidden, embeds, positions, draft_cache)
            position += len(pending_tokens)
            committed = draft_cache.seq_length()
            # Step 1 comes from the last position just read; steps 2..k continue the chain.
            q: list = []
            first = self._draft_token(normed, q)
            proposal = [first, *self._propose(prenorm[:, -1:], first, position, draft_cache, self.k - 1, q)]
            draft_cache.crop(committed)

            new_tokens, verify_aux, target_cache = self._verify_round(
                target_cache, context, output, proposal, q, result
            )
            accepted = len(new_tokens) - 1
            output += new_tokens
            context += new_tokens
            finished = any(token in self.eos_ids for token in new_tokens)
            # Next round the draft re-reads the target's states at the verified positions.
            pending_aux = verify_aux[: accepted + 1]
            pending_tokens = new_tokens
        return self._finish(result, output, max_new_tokens, start)

    def _teacher_forced_inputs(self, prompt_ids: list[int], output_ids: list[int]):
        """One target forward over prompt + answer (the aux states land in ``self.recorder``);
        returns the ids and the target's side of training's loss, the answer masked as training
        masks answers (from its first token, which the decoding walk leaves to the prefill)."""
        from eagle3.target import TargetHead
        from eagle3.train.loss import TargetProjector

        if self._projector is None:
            head = TargetHead(
                config=self.target.config.get_text_config(),
                embed_tokens=self.target.get_input_embeddings().weight,
                norm=final_norm_module(self.target).weight,
                lm_head=self.target.get_output_embeddings().weight,
                zero_centred_norm=self.family.zero_centred_norm,
            )
            self._projector = TargetProjector(head, self.draft.draft_to_target_ids().cpu(), device=self.device)
        ids = torch.tensor([prompt_ids + output_ids], device=self.device)
        captured: dict[str, torch.Tensor] = {}
        hook = decoder_layers(self.target)[-1].register_forward_hook(
            lambda _m, _a, out: captured.__setitem__("last", out[0] if isinstance(out, tuple) else out)
        )
        try:
            self.target(input_ids=ids)
        finally:
            hook.remove()
        loss_mask = torch.zeros_like(ids, dtype=torch.bool)
        loss_mask[:, len(prompt_ids) :] = True
        return ids, self._projector(captured["last"], loss_mask, ids)

    @torch.no_grad()
    def teacher_forced_stats(self, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
        """Training's acceptance estimate on this answer: the TTT unroll (k steps) exactly as
        training evaluates it (``eagle3.train.loss``). Returns the stats vector; sum it over
        prompts and read ``accept_len_rounds`` of ``metrics_from_stats(stats, stats_steps)``."""
        from eagle3.train.loss import ttt_loss

        ids, target = self._teacher_forced_inputs(prompt_ids, output_ids)
        _, stats = ttt_loss(self.draft, ids, self.recorder.concatenated(), target, self.k, 1.0)
        return stats

    @property
    def stats_steps(self) -> int:
        """The positions ``teacher_forced_stats`` counts (its "steps")."""
        return self.k

    @torch.no_grad()
    def generate_target_only(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        """Plain decoding with the same target and sampling rule (the baseline for speed and losslessness)."""
        start = time.perf_counter()
        cache = DynamicCache(config=self.target.config)
        logits, _ = self._target_forward(prompt_ids, cache)
        output = [self._pick(logits[-1])]
        while len(output) < max_new_tokens and output[-1] not in self.eos_ids:
            logits, _ = self._target_forward(output[-1:], cache)
            output.append(self._pick(logits[-1]))
        return output, time.perf_counter() - start

    def close(self) -> None:
        self.recorder.remove()
