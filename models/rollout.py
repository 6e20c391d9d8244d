"""Generation and per-token forward passes for RL on causal LMs.

Batches are left-padded prompts (P tokens) followed by responses (T tokens), so every
prompt ends at column P and response token t sits at column P + t. Masks, never pad ids,
decide what is real: many tokenizers use EOS as their pad token.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from models.ppo import entropy_from_logits, logprobs_from_logits
from models.reward import backbone


@dataclass
class Rollout:
    """One batch of sampled episodes, grouped by meaning."""

    # trajectory
    query_ids: torch.Tensor      # (B, P) left-padded prompt tokens
    query_mask: torch.Tensor     # (B, P) 1 on real prompt tokens
    response_ids: torch.Tensor   # (B, T) sampled tokens, pad after EOS
    response_mask: torch.Tensor  # (B, T) float, 1 up to and including EOS
    ended_with_eos: torch.Tensor  # (B,) bool: False = truncated at max_new_tokens
    # log-probs of the response tokens
    logprobs: torch.Tensor       # (B, T) under the policy that sampled them
    ref_logprobs: torch.Tensor   # (B, T) under the frozen reference (SFT)
    # critic
    values: torch.Tensor         # (B, T) V(s_t) before token t
    # rewards
    scores: torch.Tensor         # (B,) normalised reward-model score (with EOS penalty)
    rewards: torch.Tensor | None = None     # (B, T) KL-penalised per-token rewards
    kl: torch.Tensor | None = None          # (B, T) per-token KL estimate to the reference
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None     # (B, T)

    def episodes(self, width: int | None = None, multiple: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's prompt and response back to back, left-padded: ids and mask (B, L) with
        L the longest episode (``left_pad_episodes``), the layout the forwards read."""
        return left_pad_episodes(self.query_ids, self.query_mask, self.response_ids,
                                 self.response_mask, width, multiple)

    def select(self, idx: torch.Tensor, width: int | None = None) -> "Rollout":
        """Rows ``idx`` of every tensor field (for minibatches), with the response columns
        cut to the longest real response among those rows, or to ``width`` when the caller
        knows it (on a GPU, reading the longest off the device waits for all queued work)."""
        T = width if width is not None else max(int(self.response_mask[idx].sum(1).max()), 1)
        # Columns cut before the rows are taken: every field comes out a fresh, contiguous
        # tensor (a view's strides would make a compiled update compile again).
        return Rollout(**{k: (v[:, :T] if k in PER_TOKEN_FIELDS else v)[idx]
                          if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})


PER_TOKEN_FIELDS = ("response_ids", "response_mask", "logprobs", "ref_logprobs", "values",
                    "rewards", "kl", "advantages", "returns")


def pad_sequences(seqs: list[list[int]], pad_id: int, left: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> ids (B, L) and mask (B, L), padded on the left (prompts, so each ends
    at column L) or on the right (responses, so each starts at column 0)."""
    width = max(max((len(s) for s in seqs), default=0), 1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def round_width(width: int, multiple: int, cap: int | None = None) -> int:
    """``width`` rounded up to a multiple of ``multiple``, but not past ``cap`` (the columns
    there are) unless ``width`` itself is."""
    up = -(-width // multiple) * multiple
    return up if cap is None else max(width, min(up, cap))


def pad_columns(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    """(B, T) -> (B, width), ``value`` in the new columns on the right (``x`` itself when
    it is that wide)."""
    if width == x.shape[1]:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def left_pad_episodes(query_ids: torch.Tensor, query_mask: torch.Tensor,
                      response_ids: torch.Tensor, response_mask: torch.Tensor,
                      width: int | None = None, multiple: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt (B, P) and response (B, T) -> each row's real tokens back to back, left-padded:
    ids and mask (B, L), every episode ending at column L - 1.

    [left-padded prompt | right-padded response] is max(prompt) + max(response) wide; this is
    max(prompt + response) wide (at least T + 1, so a response always has a column before it):
    on the demo ~8 % fewer token rows in every forward. Response token t of row i (length r_i)
    sits at column L - r_i + t. A stable sort of the mask moves the padding to the front and
    keeps the real tokens in order. ``width``: the longest episode when the caller knows it
    (on a GPU, reading it off the device waits for all queued work). ``multiple``: L rounded
    up to a multiple of it, with more padding in front (id 0, masked), even past P + T
    columns, so that batches of nearby widths give the forwards one shape.
    """
    ids = torch.cat([query_ids, response_ids], 1)  # (B, P+T)
    mask = torch.cat([query_mask, response_mask.to(query_mask.dtype)], 1)
    if width is None:
        width = int(mask.sum(1).max())
    width = round_width(max(width, response_ids.shape[1] + 1), multiple)
    front = width - ids.shape[1]
    if front > 0:
        ids, mask = (torch.nn.functional.pad(x, (front, 0)) for x in (ids, mask))
    order = torch.sort(mask, dim=1, stable=True).indices  # padding (0) first, then real tokens
    # Gather only the kept columns: fresh tensors, not views at an offset into wider ones
    # (a compiled update, PPOConfig.compile_update, would compile again for offsets 0 and 1).
    order = order[:, -width:]
    return ids.gather(1, order), mask.gather(1, order)


def left_align_responses(x: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token values whose row i holds response token t at column T - r_i + t (the
    last T columns of ``left_pad_episodes``' layout) -> token t at column t, the rollout's
    layout. r_i = response_mask[i].sum(); columns t >= r_i (padding) repeat column T - 1."""
    T = x.shape[1]
    r = response_mask.sum(1).long()  # (B,)
    cols = (T - r)[:, None] + torch.arange(T, device=x.device)  # (B, T)
    return x.gather(1, cols.clamp(max=T - 1))


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids -> mask 1 up to and including the first EOS, and whether EOS occurred."""
    if eos_token_id is None:
        B, T = response_ids.shape
        return torch.ones(B, T), torch.zeros(B, dtype=torch.bool)
    is_eos = response_ids == eos_token_id
    # Tokens strictly after the first EOS: cumulative count of EOS before this position > 0.
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return (~after).float(), is_eos.any(1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs (B, V), u (B,) uniform in [0, 1) -> token ids (B,).

    Row b gets the first token whose cumulative probability exceeds u_b * total, so token v
    is drawn with probability probs[b, v] / total, and a zero-probability token never.
    One uniform per row, where ``torch.multinomial`` draws an exponential per vocabulary
    entry (its Gumbel-max fast path): 64 x 720 logs a step, ~20 % of a decode step on CPU.
    """
    cdf = probs.float().cumsum(-1)  # (B, V)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # (B, 1), below the row's total
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def generate(model, query_ids: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int,
             temperature: float, eos_token_id: int | None, pad_token_id: int,
             with_logprobs: bool = False, static_cache_len: int | None = None):
    """Pure sampling (no top-k/top-p), so the sampled tokens' log-probs under the policy are
    exactly what PPO's ratio needs; uses the KV cache.

    Returns response ids (B, T), mask (B, T), ended with EOS (B,), and with ``with_logprobs``
    the log-probs (B, T) of the sampled tokens, read off the logits generation computed
    anyway (as TRL's PPOTrainer does): one policy forward per rollout saved. T <= max_new_tokens:
    sampling stops once every row has its EOS, so nothing downstream spends compute on
    columns that are padding in every row.

    ``static_cache_len``: decode through ``model.generate`` with transformers' static KV cache
    of at least that many positions (prompt + response). Sized for the longest prompt the
    run allows, every batch's decode step has the same shapes, so the step transformers
    compiles on a GPU is compiled once, not once per prompt width. None: ``decode``, our
    loop over the model's dynamic cache, which drops finished rows.
    """
    if static_cache_len is None:
        response, logp = decode(model, query_ids, query_mask, max_new_tokens=max_new_tokens,
                                temperature=temperature, eos_token_id=eos_token_id,
                                pad_token_id=pad_token_id)
        mask, ended = response_mask_from_ids(response, eos_token_id)
        mask = mask.to(query_mask.device)
        return (response, mask, ended, logp * mask) if with_logprobs else (response, mask, ended)
    cache = {"cache_implementation": "static"}
    # generation_config.max_cache_len (transformers >= 5.2x) sizes the cache for the
    # worst case; older versions size it per call (max of this and earlier calls).
    if hasattr(model.generation_config, "max_cache_len"):
        cache["max_cache_len"] = static_cache_len
    out = model.generate(
        input_ids=query_ids, attention_mask=query_mask, do_sample=True, top_k=0, top_p=1.0,
        temperature=temperature, max_new_tokens=max_new_tokens, min_new_tokens=0,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
        return_dict_in_generate=True, output_logits=with_logprobs, **cache,
    )
    response = out.sequences[:, query_ids.shape[1]:]
    mask, ended = response_mask_from_ids(response, eos_token_id)
    response = response.masked_fill(mask == 0, pad_token_id)
    mask = mask.to(query_mask.device)
    if not with_logprobs:
        return response, mask, ended
    logits = torch.stack(out.logits, 1) / temperature  # (B, T, V) raw logits, not processed
    return response, mask, ended, logprobs_from_logits(logits, response) * mask


@torch.no_grad()
def decode(model, query_ids: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float, eos_token_id: int | None, pad_token_id: int,
           drop_finished: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample responses token by token with the KV cache: (B, P) prompts -> ids (B, T), pad
    after each row's EOS, and their log-probs (B, T) (0 there).

    Rows that have sampled their EOS leave the batch (``Cache.batch_select_indices``), where
    ``model.generate`` keeps computing all B rows until the last one ends: on the demo a
    response is ~11 tokens and a batch runs ~17 steps. Every step draws one uniform per
    batch row, finished or not, so a row's tokens do not depend on which rows are still in
    the batch (``drop_finished=False`` samples the same tokens; a cache without
    ``batch_select_indices`` keeps every row).
    """
    from transformers import DynamicCache

    B, device = query_ids.shape[0], query_ids.device
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(B, max_new_tokens, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)  # batch rows in the cache, in its order
    mask, positions = query_mask, position_ids_from_mask(query_mask)
    cache = DynamicCache(config=model.config)
    # transformers 5.24 names the argument ``cache`` (``past_key_values`` warns, and goes in
    # 5.40); 5.17, the GPU image's, knows only ``past_key_values``. peft passes either on
    # to its base model, so ask that one. Drop the fallback once no supported version lacks it.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache_arg = ("cache" if "cache" in inspect.signature(base.forward).parameters
                 else "past_key_values")
    out = model(input_ids=query_ids, attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{cache_arg: cache})
    positions = positions[:, -1:]  # (n, 1)
    steps = 0
    for t in range(max_new_tokens):
        logp = torch.log_softmax(out.logits[:, -1].float() / temperature, -1)  # (n, V)
        u = torch.rand(B, device=device)[rows]  # (n,) one draw per batch row
        tok = sample_from_probs(logp.exp(), u)  # (n,)
        live = ~done[rows]  # rows kept without batch_select_indices may have ended
        tokens[rows, t] = torch.where(live, tok, pad_token_id)
        logps[rows, t] = torch.where(live, logp.gather(1, tok[:, None]).squeeze(1), 0.0)
        steps = t + 1
        if eos_token_id is not None:
            done[rows] |= tok == eos_token_id
        if steps == max_new_tokens or bool(done.all()):
            break
        if drop_finished and hasattr(cache, "batch_select_indices") and bool(done[rows].any()):
            keep = (~done[rows]).nonzero().squeeze(1)  # (n',)
            cache.batch_select_indices(keep)
            rows, mask, positions, tok = rows[keep], mask[keep], positions[keep], tok[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)  # (n, P + t + 1)
        positions = positions + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_arg: cache})
    return tokens[:, :steps], logps[:, :steps]


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   response_len: int, temperature: float = 1.0) -> torch.Tensor:
    """Logits at the T = ``response_len`` columns before the last: (B, L) -> (B, T, V).

    Both layouts end every longest response at column L - 1, so these are the logits that
    predict the last T columns. [prompt | response] (response token t at column P + t): the
    logits predicting token t. ``left_pad_episodes``' layout: the same, T - r_i columns
    further right (``left_align_responses`` moves them). Divided by the sampling temperature
    so that log-probs match the distribution the tokens were drawn from (Huang et al. 2024).
    """
    # The last column only predicts past the response: it never enters the forward (the
    # model is causal, so no other position changes). logits_to_keep: project only the kept
    # positions onto the vocabulary; the vocab projection dominates small models' cost.
    ids, mask = input_ids[:, :-1], attention_mask[:, :-1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=False, logits_to_keep=response_len)
    return out.logits[:, -response_len:] / temperature


def response_logprobs(model, input_ids, attention_mask, response_ids, temperature: float = 1.0,
                      with_entropy: bool = False, entropy_grad: bool = True,
                      response_mask: torch.Tensor | None = None):
    """log pi(response_t | prefix) (B, T), and optionally the per-token entropy (B, T).

    ``input_ids`` (B, L): [left-padded prompt | response_ids], or with ``response_mask`` the
    ``left_pad_episodes`` layout of the same episodes (fewer columns); either way the result
    is in the response's layout, token t at column t.
    ``entropy_grad=False`` computes the entropy outside autograd: it is then only a metric,
    and keeping it out of the graph saves its backward (entropy bonus 0, the default).
    """
    T = response_ids.shape[1]
    logits = forward_logits(model, input_ids, attention_mask, T, temperature)
    # Left-padded episodes: the tokens these logits predict are the last T columns.
    targets = response_ids if response_mask is None else input_ids[:, -T:]
    logp = logprobs_from_logits(logits, targets)
    if not with_entropy:
        return _left_aligned(logp, response_mask)
    if entropy_grad:
        ent = entropy_from_logits(logits)
    else:
        with torch.no_grad():
            ent = entropy_from_logits(logits.detach())
    return _left_aligned(logp, response_mask), _left_aligned(ent, response_mask)


def _left_aligned(x: torch.Tensor, response_mask: torch.Tensor | None) -> torch.Tensor:
    return x if response_mask is None else left_align_responses(x, response_mask)


def scalar_head_per_token(model, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> torch.Tensor:
    """Apply a sequence-classification model's scalar head at every position: (B, L).

    Used for the critic: ``AutoModelForSequenceClassification`` (num_labels=1) only scores the
    last token, but PPO needs V(s_t) for every t. Same pattern as TRL's ``get_reward``.
    """
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask),
                      use_cache=False).last_hidden_state
    return model.score(hidden).squeeze(-1)


def response_values(critic, input_ids, attention_mask, response_len: int,
                    response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """V(s_t) for each response token t, the head at the column before it: (B, T).

    Layouts as in ``response_logprobs`` (with ``response_mask``: ``left_pad_episodes``').
    The last column (the state after the whole episode) is never computed.
    """
    values = scalar_head_per_token(critic, input_ids[:, :-1], attention_mask[:, :-1])
    return _left_aligned(values[:, -response_len:], response_mask)


class SharedTrunkCritic(torch.nn.Module):
    """A value head on the policy's own transformer: one trunk, two heads (Ziegler et al.
    2019 used this layout; it saves a whole critic's weights and optimizer state).

    Shaped like a sequence-classification model (``base_model_prefix`` naming the trunk and a
    ``score`` head) so ``scalar_head_per_token`` serves it unchanged. The value loss trains the
    trunk too, so ``vf_coef`` also weighs how much the critic may move the policy.
    """

    base_model_prefix = "trunk"

    def __init__(self, policy):
        super().__init__()
        self.trunk = backbone(policy)  # shared module, not a copy
        self.config = policy.config
        self.score = torch.nn.Linear(policy.config.hidden_size, 1, bias=False)
        torch.nn.init.zeros_(self.score.weight)  # V = 0 before training: no random baseline
