"""TRL's dataset formats (https://huggingface.co/docs/trl/dataset_formats), per role.

- prompt/completion: ``{"prompt", "completion"}`` (SFT demonstrations)
- language modeling: ``{"messages"}`` or ``{"text"}`` (SFT)
- preference: ``{"prompt", "chosen", "rejected"}`` (reward model, DPO)
- prompt-only: ``{"prompt"}`` (PPO/GRPO/RLOO prompts, evaluation prompts)

Each text field is standard (a str) or conversational (a list of ``{"role", "content"}``
messages, rendered with the tokenizer's chat template).
"""

from __future__ import annotations

from typing import Any

from dataio.uri import DataError

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def is_conversational(value: Any) -> bool:
    """A list of messages (dicts with a ``role``). TRL's ``is_conversational`` asks the same of
    one field of an example; this asks it of a value, so validation can type every cell."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def render_prompt(prompt: Any, tokenizer) -> str:
    """Prompt text for generation: plain strings as they are, messages via the chat template."""
    if is_conversational(prompt):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return str(prompt)


def preference_rows(records: list[dict[str, Any]], uri: str,
                    with_margin: bool) -> list[dict[str, Any]]:
    """TRL preference columns, plus ``margin`` if asked and known.

    ``margin`` = 2 * chosen_votes / num_votes - 1 (Llama 2, https://arxiv.org/abs/2307.09288,
    Eq. 2), when the data has vote counts.
    """
    if not records:
        raise DataError(uri, "no rows", rule="min_rows")
    missing = {"chosen", "rejected"} - set(records[0])
    if missing:
        raise DataError(uri, f"preference data needs {sorted(missing)}",
                        rule="required_columns", row=1)
    keep = [c for c in PREFERENCE_COLUMNS if c in records[0]]
    votes = with_margin and {"chosen_votes", "num_votes"} <= set(records[0])
    rows = []
    for r in records:
        row = {c: r[c] for c in keep}
        if votes:
            row["margin"] = 2.0 * r["chosen_votes"] / r["num_votes"] - 1.0
        rows.append(row)
    return rows
