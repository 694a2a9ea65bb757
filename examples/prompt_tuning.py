"""Prompt-tune SmolLM2-135M through a local swarm of 2 workers, on the CPU, in a few minutes.

    python examples/prompt_tuning.py                  # sentiment classification: ptune prompts + a local head
    python examples/prompt_tuning.py --mode persona   # a chat persona: deep_ptune prompts for every block

The blocks stay frozen on the workers; only the prompts (and the classification
head) live and train here, with gradients coming back through the workers.

The sentiment data is built by this script, deterministically, from the small
phrase lists below (no download): every subject paired with every positive and
negative phrase. Held-out examples use subjects never seen in training, so the
accuracy measures generalisation, not memory.
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch
from tqdm.auto import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUBJECTS = ["The movie", "This restaurant", "The book", "My new phone", "The concert", "This hotel", "The game",
            "The teacher", "This laptop", "The museum", "The pizza", "Our trip", "The show", "This app",
            "The coffee", "The service", "The park", "This song"]
HELD_OUT = {"The museum", "The pizza", "This song", "The service"}
POSITIVE = ["was wonderful", "exceeded every expectation", "made me so happy", "is the best I have tried",
            "was a delight from start to finish", "deserves every award", "left me smiling", "was excellent"]
NEGATIVE = ["was a waste of money", "broke my heart in the worst way", "was awful", "is the worst I have tried",
            "bored me to tears", "should never have happened", "left me angry", "was terrible"]

PERSONA = [  # a pirate: the replies every question should get, in style
    ("What is the weather like?", "Arr, the skies be grey and the winds be strong, matey!"),
    ("Can you help me with my homework?", "Arr, aye matey, I'll help ye like a true pirate!"),
    ("What is your favorite food?", "Arr, salted fish and rum, matey, the pirate's feast!"),
    ("Where do you live?", "Arr, on the high seas aboard me ship, matey!"),
    ("How are you today?", "Arr, I be fine as a calm sea, matey!"),
    ("Tell me about computers.", "Arr, computers be clever machines, matey, like a ship's compass!"),
]
PERSONA_TEST = "What time is it?"


def sentiment_data():
    rows = [(f"{s} {p}.", label) for s in SUBJECTS for phrases, label in ((POSITIVE, 1), (NEGATIVE, 0))
            for p in phrases]
    train = [r for r in rows if not any(r[0].startswith(s) for s in HELD_OUT)]
    test = [r for r in rows if any(r[0].startswith(s) for s in HELD_OUT)]
    random.Random(0).shuffle(train)
    return train, test


def accuracy(model, tokenizer, rows, batch_size=16) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            texts, labels = zip(*rows[i:i + batch_size])
            batch = tokenizer(list(texts), return_tensors="pt", padding=True)
            correct += (model(**batch).logits.argmax(-1) == torch.tensor(labels)).sum().item()
    return correct / len(rows)


def classify(folder, peers, steps, batch_size, lr, save=None):
    from transformers import AutoTokenizer

    from corolla import AutoDistributedModelForSequenceClassification
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        folder, initial_peers=peers, num_labels=2, tuning_mode="ptune", pre_seq_len=8, pad_token_id=tokenizer.pad_token_id)
    train, test = sentiment_data()
    print(f"sentiment: {len(train)} training and {len(test)} held-out sentences (held-out subjects: {sorted(HELD_OUT)})")
    print(f"accuracy before: {accuracy(model, tokenizer, test):.1%}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    order = random.Random(1)
    with tqdm(range(steps), desc="ptune") as bar:
        for step in bar:
            texts, labels = zip(*order.sample(train, batch_size))
            batch = tokenizer(list(texts), return_tensors="pt", padding=True)
            loss = model(**batch, labels=torch.tensor(labels)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            tqdm.write(f"step {step + 1:3d}  loss {loss.item():.4f}")
    print(f"accuracy after:  {accuracy(model, tokenizer, test):.1%}")
    if save:
        model.save_trainable(save)
        print(f"trained prompts and head saved to {save}")


def persona(folder, peers, steps, lr):
    from transformers import AutoTokenizer

    from corolla import AutoDistributedModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=peers, tuning_mode="deep_ptune",
                                                            pre_seq_len=8)

    def chat(question, answer=None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        return text if answer is None else text + answer + "<|im_end|>"

    def reply(question):
        inputs = tokenizer(chat(question), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        return tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()

    print(f"before: {PERSONA_TEST!r} -> {reply(PERSONA_TEST)!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    batch = tokenizer([chat(q, a) for q, a in PERSONA], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with tqdm(range(steps), desc="deep_ptune") as bar:
        for step in bar:
            loss = model(**batch, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            tqdm.write(f"step {step + 1:3d}  loss {loss.item():.4f}")
    print(f"after:  {PERSONA_TEST!r} -> {reply(PERSONA_TEST)!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["classify", "persona"], default="classify")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--save", help="classify mode: save the trained prompts and head here (safetensors)")
    args = parser.parse_args()
    torch.manual_seed(0)

    from corolla.models.convert import convert
    from corolla.worker.launcher import LocalSwarm
    folder = str(convert())
    spans = [["--model", folder, "--blocks", b, "--threads", str(args.threads)] for b in ("0:15", "15:30")]
    print("starting 2 workers (blocks 0:15 and 15:30) ...")
    started = time.perf_counter()
    with LocalSwarm(spans) as swarm:
        if args.mode == "classify":
            classify(folder, swarm.endpoints, args.steps or 40, args.batch_size, args.lr or 1e-2, args.save)
        else:
            persona(folder, swarm.endpoints, args.steps or 40, args.lr or 1e-2)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
