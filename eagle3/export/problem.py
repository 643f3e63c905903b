"""One problem ``eagle3 check`` reports: what is wrong and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Problem:
    what: str
    fix: str
    # "error": vLLM would serve a broken or mismatched draft. "warning": legal but suspicious.
    severity: str = "error"

    def __str__(self) -> str:
        return f"[{self.severity}] {self.what}\n    fix: {self.fix}"
