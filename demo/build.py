"""Build the demo task's data, tokenizer and tiny base model, deterministically.

    python -m demo.build            # rewrites demo/data/ and demo/base_model/

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


def label_pairs(rng, prompts, n_pairs, judge, votes_per_pair, id_prefix):
    pairs, labels = [], []
    while len(pairs) < n_pairs:
        prompt = rng.choice(prompts)
        a = make_completion(rng, rng.choice(TONES))
        b = make_completion(rng, rng.choice(TONES))
        if a == b:
            continue
        ga, gb = judge([a, b])
        voters = rng.sample(sorted(ANNOTATORS), votes_per_pair)
        votes = [rng.random() < _sigmoid((ga - gb) / ANNOTATORS[v]) for v in voters]
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


def build_data(out: Path, seed: int = 0) -> dict[str, list[dict]]:
    from demo.judge import sentiment_judge

    rng = random.Random(seed)
    prompts = all_prompts()
    rng.shuffle(prompts)
    eval_prompts, train_prompts = prompts[:64], prompts[64:]
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
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    build_data(HERE / "data", args.seed)
    if not args.skip_model:
        build_base_model(HERE / "base_model", args.seed)


if __name__ == "__main__":
    main()
