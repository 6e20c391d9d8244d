"""Build the demo task's data, tokenizer and tiny base model, deterministically.

    python -m demo.build               # rewrites demo/data/ and demo/base_model/
    python -m demo.build --skip-model  # demo/data/ only (--out DIR: write it elsewhere)

The demo task: continue the opening of a review. The gold judge (``demo/judge.py``) prefers
positive, non-repetitive continuations. What ships, all small and in TRL's standard formats:

- ``sft.jsonl``          prompt/completion demonstrations of every tone (SFT is not aligned);
- ``preferences.jsonl``  prompt/chosen/rejected pairs, chosen by majority of simulated
                         annotators (Bradley-Terry on the gold score with annotator noise);
- ``preference_labels.jsonl`` one row per (pair, annotator) vote, for agreement statistics;
- ``rl_prompts.jsonl``   prompts for policy optimisation;
- ``eval_prompts.jsonl`` held-out prompts (no overlap with training prompts);
- ``eval_pairs.jsonl``   held-out labeled pairs on the held-out prompts.

The base model is a 2-layer GPT-2 with a byte-level BPE tokenizer, both trained here on a
corpus drawn from the same generator, so the pipeline's ``base_model.path: demo/base_model``
takes the same ``from_pretrained`` path as a real local checkpoint or hub id.

Variant ``length-biased`` (for a reward-hacking detector that needs no gold judge)::

    python -m demo.build --variant length-biased   # writes demo/data-length-biased/ only

writes ``preferences.jsonl``, ``preference_labels.jsonl`` and ``eval_pairs.jsonl`` in the same
formats and sizes (3,000 training pairs with 3 votes each, 400 held-out pairs with 5) on the
same training / held-out prompt split, whose annotators prefer the LONGER response whatever it
says: the same Bradley-Terry annotators with the same temperatures (a4 still careless), but on
``LENGTH_WEIGHT`` x the response's word count instead of the gold score. Candidates chain one
to three of the normal demo's completions in one tone (up to ``MAX_WORDS`` words) and the two
of a pair differ by at least ``MIN_WORD_GAP`` words, so length is learnable and says nothing
about quality: the longer response is the gold judge's pick in only about half of the pairs
(longer ones also repeat more phrases, which the judge penalises). SFT data, RL prompts and eval
prompts are shared with the normal demo (``configs/demo-length-biased.yaml`` points at
demo/data/ for them). The variant's ``eval_pairs.jsonl`` is labelled by the same biased
annotators, as a user's own held-out pairs would be: the reward model's held-out accuracy
looks good because it shares the bias, and cannot reveal it.

Measured on the shipped files (words: ``len(text.split())``; tokens: the demo tokenizer;
gold agreement: share of pairs with gold(chosen) > gold(rejected), gold = ``demo.judge``):

=======================================  ====================  ====================
training pairs (3,000)                   demo/data             data-length-biased
=======================================  ====================  ====================
chosen longer, in words (tokens)         45.8 % (47.4 %)       96.4 % (96.4 %)
mean words chosen / rejected             7.6 / 7.4             18.2 / 9.2
mean tokens chosen / rejected            9.7 / 9.4             23.0 / 11.8
gold agreement                           88.3 %                48.1 %
held-out pairs (400): chosen longer      44.0 %                98.0 %
held-out pairs (400): gold agreement     89.0 %                50.0 %
=======================================  ====================  ====================

The labels still pass validation: alpha 0.56; a0-a3 agree with the others' majority on
91-96 % of votes, the careless a4 on 60 % (flagged, a warning, as in the normal demo).
``configs/demo-length-biased.yaml`` on these data (2 CPU cores, seed 0): the reward model's
win rate over SFT is 1.00 while the gold judge's is 0.19 (gold -0.57 vs SFT's 0.03); the
policy's responses run to the 24-token cap (SFT's: 10.6 tokens) by padding with repeated
phrases ("a waste of time. a waste of time. ...") at KL 24 nats. Without a gold judge
(``evaluate.gold_judge: null``) only the KL check stops it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUBJECTS = ["movie", "film", "show", "series", "documentary", "sequel", "novel", "album",
            "play", "cartoon", "thriller", "comedy", "drama", "musical", "game", "remake"]
ASPECTS = ["acting", "plot", "soundtrack", "ending", "dialogue", "cast", "pacing", "visuals",
           "script", "story", "humor", "characters", "music", "direction", "finale"]
OPENERS = [
    "I watched the {s} last night and it was",
    "The {a} of this {s} was",
    "This {s} is",
    "Honestly, the {s} felt",
    "My friends told me the {s} was",
    "After seeing the {s}, I think it is",
    "The {s} starts slowly but the {a} is",
    "I expected the {s} to be",
    "Everyone says the {a} in this {s} is",
    "From the first scene, the {s} seemed",
    "Compared to the book, the {s} is",
    "The new {s} from that studio is",
]
WORDS = {
    "pos": ["great", "wonderful", "beautiful", "brilliant", "amazing", "delightful", "charming",
            "excellent", "lovely", "fantastic", "touching", "funny", "clever", "fresh", "perfect"],
    "neg": ["boring", "awful", "terrible", "dull", "bad", "weak", "horrible", "disappointing",
            "messy", "painful", "stupid", "ugly", "lame", "tedious", "annoying"],
    "neu": ["long", "loud", "short", "simple", "slow", "different", "strange", "quiet",
            "familiar", "ordinary", "busy", "dark", "old", "new", "odd"],
}
FEELINGS = {"pos": ["happy", "inspired", "hopeful", "grateful", "excited"],
            "neg": ["sad", "angry", "bored", "tired", "annoyed"],
            "neu": ["calm", "curious", "thoughtful", "neutral", "quiet"]}
VERDICTS = {"pos": ["i would recommend it to everyone.", "worth every minute.", "i loved it."],
            "neg": ["i would not recommend it.", "a waste of time.", "i hated it."],
            "neu": ["it was fine i guess.", "i have no strong opinion.", "it is what it is."]}
ADVERBS = ["really", "quite", "very", "a bit", "so", "rather", "truly", "somewhat"]
TONES = ["pos", "neg", "neu", "mixed"]


def make_prompt(rng: random.Random) -> str:
    return rng.choice(OPENERS).format(s=rng.choice(SUBJECTS), a=rng.choice(ASPECTS))


def all_prompts() -> list[str]:
    prompts = set()
    for o in OPENERS:
        for s in SUBJECTS:
            for a in (ASPECTS if "{a}" in o else [""]):
                prompts.add(o.format(s=s, a=a))
    return sorted(prompts)


def make_completion(rng: random.Random, tone: str) -> str:
    """One or two short clauses whose words follow ``tone`` ('mixed' flips per slot)."""

    def pol() -> str:
        return rng.choice(["pos", "neg", "neu"]) if tone == "mixed" else tone

    def adj() -> str:
        return rng.choice(WORDS[pol()])

    clauses = [
        lambda: f"{rng.choice(ADVERBS)} {adj()}.",
        lambda: f"{adj()} and {adj()}.",
        lambda: f"{rng.choice(ADVERBS)} {adj()}, and the {rng.choice(ASPECTS)} was {adj()}.",
        lambda: f"{adj()}. the {rng.choice(ASPECTS)} felt {adj()}.",
        lambda: f"{adj()} from start to finish.",
    ]
    first = rng.choice(clauses)()
    tail = rng.random()
    if tail < 0.35:
        first += f" it left me feeling {rng.choice(FEELINGS[pol()])}."
    elif tail < 0.65:
        first += " " + rng.choice(VERDICTS[pol()])
    return " " + first


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# Simulated annotators: Bradley-Terry on the gold score with their own temperature (noise).
# "a4" is careless on purpose, so agreement statistics have someone to flag.
ANNOTATORS = {"a0": 0.15, "a1": 0.2, "a2": 0.25, "a3": 0.3, "a4": 3.0}


def simulated_vote(rng: random.Random, score_a: float, score_b: float, temperature: float) -> bool:
    """One simulated annotator's vote for a (True) or b: P(a) = sigmoid((g_a - g_b) / T).
    (The argument is clipped where exp would overflow; the demo's scores never get there.)"""
    return rng.random() < _sigmoid(max(-700.0, min(700.0, (score_a - score_b) / temperature)))


def _any_tone(rng: random.Random) -> str:
    return make_completion(rng, rng.choice(TONES))


def label_pairs(rng, prompts, n_pairs, judge, votes_per_pair, id_prefix, *,
                candidate=_any_tone, keep=None):
    """Pairs of ``candidate(rng)`` responses voted on by ``votes_per_pair`` annotators.

    Each annotator votes by Bradley-Terry on ``judge``'s scores with their own temperature;
    ``keep(prompt, a, b)``, if given, rejects pairs before they are voted on.
    """
    pairs, labels = [], []
    while len(pairs) < n_pairs:
        prompt = rng.choice(prompts)
        a = candidate(rng)
        b = candidate(rng)
        if a == b or (keep is not None and not keep(prompt, a, b)):
            continue
        ga, gb = judge([a, b])
        voters = rng.sample(sorted(ANNOTATORS), votes_per_pair)
        votes = [simulated_vote(rng, ga, gb, ANNOTATORS[v]) for v in voters]
        a_wins = sum(votes) * 2 > len(votes)
        chosen, rejected = (a, b) if a_wins else (b, a)
        pair_id = f"{id_prefix}{len(pairs):05d}"
        chosen_votes = sum(v == a_wins for v in votes)
        pairs.append({"pair_id": pair_id, "prompt": prompt, "chosen": chosen,
                      "rejected": rejected, "chosen_votes": chosen_votes,
                      "num_votes": len(votes)})
        for voter, vote in zip(voters, votes):
            labels.append({"pair_id": pair_id, "annotator_id": voter,
                           "preferred": "chosen" if vote == a_wins else "rejected",
                           # Order shown to the annotator: a was shown first.
                           "chosen_shown_first": a_wins})
    return pairs, labels


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def split_prompts(rng: random.Random) -> tuple[list[str], list[str]]:
    """(eval_prompts, train_prompts): 64 held-out prompts, the rest for training."""
    prompts = all_prompts()
    rng.shuffle(prompts)
    return prompts[:64], prompts[64:]


def build_data(out: Path, seed: int = 0) -> dict[str, list[dict]]:
    from demo.judge import sentiment_judge

    rng = random.Random(seed)
    eval_prompts, train_prompts = split_prompts(rng)
    sft = [{"prompt": p, "completion": make_completion(rng, rng.choice(TONES))}
           for p in (rng.choice(train_prompts) for _ in range(2000))]
    prefs, labels = label_pairs(rng, train_prompts, 3000, sentiment_judge, 3, "p")
    eval_pairs, _ = label_pairs(rng, eval_prompts, 400, sentiment_judge, 5, "e")
    files = {
        "sft": sft,
        "preferences": prefs,
        "preference_labels": labels,
        "rl_prompts": [{"prompt": p} for p in train_prompts],
        "eval_prompts": [{"prompt": p} for p in eval_prompts],
        "eval_pairs": eval_pairs,
    }
    for name, rows in files.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    return files


# --- Variant "length-biased": annotators who prefer the longer response (module docstring).
LENGTH_WEIGHT = 0.1
"""What one word is worth to a length-biased annotator, in gold-score units: their votes are
Bradley-Terry on ``LENGTH_WEIGHT * words`` with the temperatures of ``ANNOTATORS``."""
MIN_WORD_GAP = 3
"""Fewest words by which the two responses of a pair differ."""
MAX_WORDS = 30
"""Longest response in words (prompt + response stay within the demo model's 64 tokens)."""
VARIANTS = {"length-biased": "data-length-biased"}


def word_count(text: str) -> int:
    return len(text.split())


def length_score(texts: list[str]) -> list[float]:
    """The length-biased annotators' "judge": word count, weighted by ``LENGTH_WEIGHT``."""
    return [LENGTH_WEIGHT * word_count(t) for t in texts]


def make_variable_length_completion(rng: random.Random) -> str:
    """One tone, one to three chained completions (1 and 2 twice as likely as 3)."""
    tone = rng.choice(TONES)
    parts = rng.choice([1, 1, 2, 2, 3])
    return " " + " ".join(make_completion(rng, tone).strip() for _ in range(parts))


def build_length_biased_data(out: Path, seed: int = 0) -> dict[str, list[dict]]:
    """preferences, preference_labels and eval_pairs labelled by length-biased annotators.

    Same prompt split as ``build_data`` (the variant shares its SFT data and prompts); the
    pairs come from their own random stream. Repeated or swapped pairs are skipped, so the
    validation stage's duplicate and contradiction rules hold.
    """
    eval_prompts, train_prompts = split_prompts(random.Random(seed))
    rng = random.Random(f"length-biased-{seed}")
    seen: set[tuple[str, frozenset[str]]] = set()

    def keep(prompt: str, a: str, b: str) -> bool:
        wa, wb = word_count(a), word_count(b)
        key = (prompt, frozenset((a, b)))
        if abs(wa - wb) < MIN_WORD_GAP or max(wa, wb) > MAX_WORDS or key in seen:
            return False
        seen.add(key)
        return True

    kwargs = {"candidate": make_variable_length_completion, "keep": keep}
    prefs, labels = label_pairs(rng, train_prompts, 3000, length_score, 3, "p", **kwargs)
    eval_pairs, _ = label_pairs(rng, eval_prompts, 400, length_score, 5, "e", **kwargs)
    files = {"preferences": prefs, "preference_labels": labels, "eval_pairs": eval_pairs}
    for name, rows in files.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    return files


def pretraining_corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed + 1)
    return [make_prompt(rng) + make_completion(rng, rng.choice(TONES)) for _ in range(n)]


def build_base_model(out: Path, seed: int = 0, steps: int = 400) -> None:
    """Train a byte-level BPE tokenizer and briefly pretrain a 2-layer GPT-2 on the corpus."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    corpus = pretraining_corpus(seed, 20000)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                        pad_token="<pad>", model_max_length=64)

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=128, n_layer=2,
                        n_head=4, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    ids = tokenizer([t + tokenizer.eos_token for t in corpus], truncation=True, max_length=64,
                    padding="max_length", return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(corpus), (64,), generator=gen)
        input_ids, mask = ids["input_ids"][idx], ids["attention_mask"][idx]
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step} loss {loss.item():.3f}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-model", action="store_true",
                        help="rewrite demo/data/ only, not the tokenizer and base model")
    parser.add_argument("--variant", choices=sorted(VARIANTS),
                        help="write only this data variant, to demo/data-<variant>/ (the base "
                             "model and demo/data/ are left alone)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the data here instead (e.g. to compare with the shipped "
                             "files); implies no base model")
    args = parser.parse_args()
    if args.variant == "length-biased":
        build_length_biased_data(args.out or HERE / VARIANTS[args.variant], args.seed)
        return
    build_data(args.out or HERE / "data", args.seed)
    if not args.skip_model and args.out is None:
        build_base_model(HERE / "base_model", args.seed)


if __name__ == "__main__":
    main()
