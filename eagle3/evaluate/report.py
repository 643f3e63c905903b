"""Acceptance report: one JSON shape for both backends, a PNG plot and a short table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class AcceptanceReport:
    backend: str
    model: str
    draft: str
    num_speculative_tokens: int
    temperature: float
    num_prompts: int
    rounds: int  # target verification steps that had a proposal ("drafts" in vLLM's counters)
    accepted_tokens: int
    accepted_per_position: list[int]
    generated_tokens: int
    seconds_speculative: float
    seconds_baseline: float | None = None
    lossless: bool | None = None  # temperature 0: output identical to target-only decoding
    # training's teacher-forced estimate (accept_len_rounds, k steps) on the same prompts and answers (hf)
    teacher_forced_acceptance_length: float | None = None
    notes: list[str] = field(default_factory=list)
    device: str | None = None  # where the models ran (hf: the torch device; vllm: the platform)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    draft_sampling: str = "greedy"  # vLLM's draft_sample_method (or the hf backend's equivalent)
    # vllm backend: the speculative config the engine ran with, read back from it
    speculative_config: dict | None = None

    @property
    def acceptance_length(self) -> float:
        """Mean tokens per target step = 1 + accepted / rounds (vLLM's definition)."""
        return 1.0 + self.accepted_tokens / self.rounds if self.rounds else 1.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [count / self.rounds if self.rounds else 0.0 for count in self.accepted_per_position]

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds_speculative if self.seconds_speculative else 0.0

    @property
    def speedup(self) -> float | None:
        if not self.seconds_baseline or not self.seconds_speculative:
            return None
        return self.seconds_baseline / self.seconds_speculative

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "acceptance_length": self.acceptance_length,
            "per_position_acceptance": self.per_position_acceptance,
            "tokens_per_second": self.tokens_per_second,
            "baseline_tokens_per_second": (
                self.generated_tokens / self.seconds_baseline if self.seconds_baseline else None
            ),
            "speedup": self.speedup,
        }

    def table(self) -> str:
        rows = [
            ("backend", self.backend if self.device is None else f"{self.backend} ({self.device})"),
            ("k (num_speculative_tokens)", str(self.num_speculative_tokens)),
            ("temperature", f"{self.temperature:g}"),
        ]
        if self.temperature > 0:
            sampling = f"top-p {self.top_p:g}, top-k {self.top_k or 'off'}, draft {self.draft_sampling}"
            rows.append(("sampling", sampling))
        rows += [
            ("prompts / target steps", f"{self.num_prompts} / {self.rounds}"),
            ("acceptance length", f"{self.acceptance_length:.3f}"),
            ("per-position acceptance", " ".join(f"{rate:.2f}" for rate in self.per_position_acceptance)),
        ]
        if self.teacher_forced_acceptance_length is not None:
            rows.append(("training estimate (teacher-forced)", f"{self.teacher_forced_acceptance_length:.3f}"))
        rows.append(("tokens/s speculative", f"{self.tokens_per_second:.1f}"))
        if self.seconds_baseline:
            rows.append(("tokens/s target only", f"{self.generated_tokens / self.seconds_baseline:.1f}"))
            rows.append(("speedup", f"{self.speedup:.2f}x"))
        if self.lossless is not None:
            rows.append(("identical to target-only output", "yes" if self.lossless else "NO"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def plot(self, path: str | Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.5))
        positions = list(range(1, len(self.per_position_acceptance) + 1))
        axis.bar(positions, self.per_position_acceptance, color="#4c72b0")
        axis.set_xticks(positions)
        axis.set_ylim(0, 1)
        axis.set_xlabel("draft position")
        axis.set_ylabel("acceptance rate")
        axis.set_title(
            f"{self.backend}: acceptance length {self.acceptance_length:.2f} "
            f"(k={self.num_speculative_tokens}, T={self.temperature:g})"
        )
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
