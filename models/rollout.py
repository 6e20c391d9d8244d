"""Generation and per-token forward passes for RL on causal LMs.

Batches are left-padded prompts (P tokens) followed by responses (T tokens), so every
prompt ends at column P and response token t sits at column P + t. Masks, never pad ids,
decide what is real: many tokenizers use EOS as their pad token.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
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
             with_logprobs: bool = False, static_cache_len: int | None = None,
             graph_decode: bool = False):
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
    loop over the model's dynamic cache, which drops finished rows. ``graph_decode`` (with
    ``static_cache_len``): ``decode_static``, our loop over a static cache, each step a CUDA
    graph on a GPU (eager on CPU), with no compile.
    """
    if static_cache_len is None or graph_decode:
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature,
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        response, logp = (
            decode(model, query_ids, query_mask, **kw) if static_cache_len is None else
            decode_static(model, query_ids, query_mask, **kw,
                          prompt_width=static_cache_len - max_new_tokens,
                          cuda_graph=query_ids.device.type == "cuda"))
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
    cache_arg = _cache_argument(model)
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


def _cache_argument(model) -> str:
    """The forward's name for the KV cache. transformers 5.24 names it ``cache``
    (``past_key_values`` warns, and goes in 5.40); 5.17, the GPU image's, knows only
    ``past_key_values``. peft passes either on to its base model, so ask that one. Drop the
    fallback once no supported version lacks ``cache``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def graph_decodable(model) -> bool:
    """Whether ``decode_static`` can drive ``model``: a model transformers can compile whole
    (no data-dependent host checks in its forward, so a CUDA graph can capture it), whose
    masks it builds with ``create_causal_mask`` (so a 4-D mask passes through unchanged) for
    SDPA or eager attention, and with full attention in every layer (the mask below has no
    sliding window)."""
    config = getattr(model, "config", None)
    return (getattr(model, "_can_compile_fullgraph", False) and config is not None
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
            and getattr(config, "sliding_window", None) is None)


@torch.no_grad()
def decode_static(model, query_ids: torch.Tensor, query_mask: torch.Tensor, *,
                  max_new_tokens: int, temperature: float, eos_token_id: int | None,
                  pad_token_id: int, prompt_width: int | None = None, cuda_graph: bool = False,
                  check_every: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode``'s sampling over a static KV cache: every decode step has the same shapes and
    reads and writes the same tensors, so on a GPU (``cuda_graph``) it is captured once as a
    CUDA graph and replayed, one launch a token instead of a few hundred small kernels, with
    no compiler: capture costs about one eager step (transformers' own static path compiles
    the step with inductor, ~20 s in a run's first batch).

    Prompts are left-padded to ``prompt_width`` columns (the run's longest prompt: one prefill
    shape for the run), followed by ``max_new_tokens`` cache slots. The mask is 4-D and ours:
    key j is visible to a query when j holds a real prompt token or a token sampled so far,
    and every position sees itself (a padding row attending to nothing would turn to NaN and
    spread through its keys). A step samples token k from the last logits, exactly as
    ``decode`` does (one uniform per row: ``decode``'s tokens on CPU, tested), writes it, and runs the forward that gives token k + 1's logits. Rows that
    ended keep computing (a graph has fixed rows); the host checks whether all have ended
    every ``check_every`` steps (default: 8 with a graph, so the host stays ahead of the GPU,
    else 1). Returns ids and log-probs (B, T) as ``decode``, T the longest response.
    """
    from transformers import StaticCache

    B, device = query_ids.shape[0], query_ids.device
    front = max((prompt_width or 0) - query_ids.shape[1], 0)
    query_ids, query_mask = (torch.nn.functional.pad(x, (front, 0)) for x in (query_ids, query_mask))
    P, T = query_ids.shape[1], max_new_tokens
    S = P + T
    # Attention masks in the form the model's attention reads: SDPA takes booleans (True:
    # attend); eager attention adds its mask to the scores.
    sdpa = model.config._attn_implementation == "sdpa"
    seen = torch.cat([query_mask.bool(), torch.zeros(B, T, dtype=torch.bool, device=device)], 1)
    causal = torch.ones(P, S, dtype=torch.bool, device=device).tril()
    diagonal = torch.eye(P, S, dtype=torch.bool, device=device)
    prefill = ((causal & seen[:, None]) | diagonal)[:, None]  # (B, 1, P, S)
    as_mask = (lambda m: m) if sdpa else (
        lambda m: torch.zeros(m.shape, device=device).masked_fill(~m, torch.finfo(torch.float32).min))
    visible = True if sdpa else 0.0
    cache = StaticCache(config=model.config, max_cache_len=S)
    cache_arg = _cache_argument(model)
    position = position_ids_from_mask(query_mask)
    out = model(input_ids=query_ids, attention_mask=as_mask(prefill), position_ids=position,
                use_cache=True, logits_to_keep=1, **{cache_arg: cache})
    # The step's state: device tensors updated in place, so a replayed graph sees them move.
    logits = out.logits[:, -1].clone()  # (B, V) the logits of the next token
    mask = as_mask(seen[:, None, None])  # (B, 1, 1, S)
    position = position[:, -1:].clone()  # (B, 1) the last token's position
    k = torch.zeros(1, dtype=torch.long, device=device)  # the token being sampled
    tokens = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(B, T, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)

    def step():
        logp = torch.log_softmax(logits.float() / temperature, -1)  # (B, V)
        tok = sample_from_probs(logp.exp(), torch.rand(B, device=device))  # (B,)
        live = ~done
        tokens.index_copy_(1, k, torch.where(live, tok, pad_token_id)[:, None])
        logps.index_copy_(1, k, torch.where(live, logp.gather(1, tok[:, None]).squeeze(1),
                                            0.0)[:, None])
        lengths.add_(live.long())
        if eos_token_id is not None:
            done.logical_or_(tok == eos_token_id)
        # Token k enters the cache at slot P + k (the cache counts its own slots).
        mask.index_fill_(3, k + P, visible)
        position.add_(1)
        k.add_(1)
        nxt = model(input_ids=tok[:, None], attention_mask=mask, position_ids=position,
                    use_cache=True, **{cache_arg: cache}).logits
        logits.copy_(nxt[:, -1])

    run = _graphed(step, device) if cuda_graph else step
    check_every = check_every or (8 if cuda_graph else 1)
    for t in range(1 if cuda_graph else 0, T):  # _graphed ran step 0, before its capture
        if t % check_every == 0 and bool(done.all()):
            break
        run()
    width = int(lengths.max())
    return tokens[:, :width], logps[:, :width]


def _graphed(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Run ``step`` once eagerly on a side stream (its first real call, and the warm-up a
    capture needs: cuBLAS workspaces, cuDNN plans), capture its second call as a CUDA graph
    and return the graph's replay. A capture that fails (an op that waits for the device)
    warns and leaves ``step`` to run eagerly.

    Under the trainer's autocast the weights' bf16 casts were cached by the prefill and the
    eager step, so the capture finds every cast cached and the graph reads those tensors
    instead of casting the fp32 weights again at every token. The cache lives until the
    autocast region that holds this call ends, after the graph is gone. (torch's warning
    against autocast's cache in captures is about casts made during a capture: none is.)"""
    import warnings

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as e:
        warnings.warn(f"decode_static: CUDA graph capture failed, decoding eagerly: {e}")
        return step
    return graph.replay


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
