"""TRL's dataset formats (https://huggingface.co/docs/trl/dataset_formats), per role.

- prompt/completion: ``{"prompt", "completion"}`` (SFT demonstrations)
- language modeling: ``{"messages"}`` or ``{"text"}`` (SFT)
- preference, explicit prompt: ``{"prompt", "chosen", "rejected"}`` (reward model, DPO)
- preference, implicit prompt: ``{"chosen", "rejected"}``, the prompt being their shared
  start (Anthropic HH: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``)
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


def split_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any] | None:
    """(prompt, chosen, rejected) of an implicit-prompt pair: the shared start becomes the prompt.

    The split of TRL 1.16's ``extract_prompt`` (trl/data_utils.py), characters for text and
    whole messages for conversations, so the stages see the pairs DPOTrainer would build:
    a space just before the first difference stays with the answers, and when one side is a
    prefix of the other the last shared character (or message) stays with the answers too.
    Two departures, where TRL fails: an empty side gives an empty prompt (TRL raises
    UnboundLocalError), and a difference at the very first character leaves the prompt empty
    (TRL's ``idx - 1`` wraps to the last character when that is a space).

    None when the two are not both text or both messages (validation reports those rows).
    """
    if not ((isinstance(chosen, str) and isinstance(rejected, str))
            or (is_conversational(chosen) and is_conversational(rejected))):
        return None
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":  # keep the space with the answers
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def explicit_prompts(records: list[dict[str, Any]], uri: str) -> list[dict[str, Any]]:
    """Preference rows with a ``prompt``: rows without one get it split off (``split_prompt``).

    Implicit means the row has no ``prompt`` key, as TRL's DPOTrainer decides it; other
    columns are kept. Raises ``DataError`` at the first row whose chosen and rejected cannot
    be split (the validation stage refuses those rows first, by rule ``consistent_format``).
    """
    out = []
    for i, r in enumerate(records, start=1):
        if "prompt" in r:
            out.append(r)
            continue
        parts = split_prompt(r.get("chosen"), r.get("rejected"))
        if parts is None:
            raise DataError(uri, "implicit prompt: chosen and rejected must both be text or "
                                 "both be messages", rule="consistent_format", row=i)
        out.append({**r, **dict(zip(PREFERENCE_COLUMNS, parts))})
    return out


def preference_rows(records: list[dict[str, Any]], uri: str,
                    with_margin: bool) -> list[dict[str, Any]]:
    """TRL preference columns with an explicit prompt, plus ``margin`` if asked and known.

    ``margin`` = 2 * chosen_votes / num_votes - 1 (Llama 2, https://arxiv.org/abs/2307.09288,
    Eq. 2), when the data has vote counts.
    """
    if not records:
        raise DataError(uri, "no rows", rule="min_rows")
    missing = {"chosen", "rejected"} - set(records[0])
    if missing:
        raise DataError(uri, f"preference data needs {sorted(missing)}",
                        rule="required_columns", row=1)
    votes = with_margin and {"chosen_votes", "num_votes"} <= set(records[0])
    rows = []
    for r in explicit_prompts(records, uri):
        row = {c: r[c] for c in PREFERENCE_COLUMNS}
        if votes:
            row["margin"] = 2.0 * r["chosen_votes"] / r["num_votes"] - 1.0
        rows.append(row)
    return rows
