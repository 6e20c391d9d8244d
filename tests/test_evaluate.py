"""Evaluation pieces against plain computations: held-out perplexity, demonstration texts."""

from __future__ import annotations

import math

import torch

from tasks.evaluate import demonstration_text, heldout_perplexity

BASE = "demo/base_model"
ROWS = [{"prompt": "The acting of this film was", "completion": " lovely and warm."},
        {"prompt": "This show is", "completion": " boring."},
        {"text": "I loved it."}]


def test_heldout_perplexity_is_exp_mean_nll_per_answer_token():
    from models.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(BASE), load_causal_lm(BASE).eval()
    # Plain computation, one row at a time: -log p(answer tokens and EOS | prompt).
    nll, count = 0.0, 0
    for row in ROWS:
        prompt, answer = demonstration_text(row, tok)
        p = tok(prompt, add_special_tokens=False)["input_ids"] or [tok.bos_token_id]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([p + a])).logits[0].log_softmax(-1)
        for j, token in enumerate(a):
            nll -= float(logits[len(p) + j - 1, token])
            count += 1
    expected = math.exp(nll / count)
    # Batched with left-padded prompts and right-padded answers: the same number.
    assert heldout_perplexity(model, tok, ROWS, batch_size=3) == pytest_approx(expected)
    assert heldout_perplexity(model, tok, ROWS, batch_size=1) == pytest_approx(expected)


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-4)


def test_demonstration_text_in_each_format():
    from models.loading import load_tokenizer

    tok = load_tokenizer(BASE)
    assert demonstration_text(ROWS[0], tok) == ("The acting of this film was", " lovely and warm.")
    assert demonstration_text(ROWS[2], tok) == ("", "I loved it.")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    assert demonstration_text(chat, tok) == ("<user>Hi<assistant>", "Yo")
