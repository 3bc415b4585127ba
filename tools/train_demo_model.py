#!/usr/bin/env python3
"""Train expertmesh's demo model: a small Llama 4 (transformers' own Llama4ForCausalLM,
chunked attention with a NoPE layer, top-1 routed experts beside a shared expert) that
answers questions about English words, so that `expertmesh up` answers in words and a load
test routes tokens by what they are about rather than by random router weights.

Data (public domain, from Debian's packages; nothing is downloaded from elsewhere):
  dict-gcide   /usr/share/dictd/gcide.dict.dz   the Collaborative International Dictionary
               of English (Webster's 1913 + WordNet): "What does harbor mean?" turns
  fortunes     /usr/share/games/fortunes/*      a few files of sayings: "Say something wise."
  wamerican    /usr/share/dict/american-english the word list: which headwords to keep, and
               the English-word score of the held-out answers
  apt-get install dict-gcide fortunes wamerican
  (the committed model: Debian 12's dict-gcide 0.48.5+nmu2, fortunes 1:1.99.1-7.3,
  wamerican 2020.12.07-2; train-log.json of later runs records the versions)

Python: pip install torch transformers tokenizers safetensors matplotlib
(torch 2.15, transformers 5.25 made the committed checkpoint).

Usage (the committed model: 30 minutes on 2 cores, data and references included):
  tools/train_demo_model.py --out models/expertmesh-demo

Writes into --out: a Hugging Face model directory (config.json, bf16 model.safetensors,
tokenizer.json with its own byte-level BPE, tokenizer_config.json with the Llama 4 chat
template, generation_config.json), and beside it
  train-log.json         the command, seeds, data counts, the loss of every step
  loss.png               the loss curve
  reference.json         transformers' outputs, the same format as tests/fixtures/*:
  reference.safetensors  float32 logits at every prompt position, router top-1 per MoE layer
  eval.json              greedy answers to five questions about words held out of training,
                         and the share of their words (3+ letters) found in wamerican

Training replaces Llama4TextMoe.forward with an equivalent that runs each token through its
one chosen expert (transformers' runs every expert on every token, zeros included), and adds
a Switch-style load-balancing loss; the saved checkpoint and every reference output come from
transformers' unmodified modules.
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Llama4ForCausalLM, Llama4TextConfig, PreTrainedTokenizerFast
from transformers.models.llama4 import modeling_llama4

GCIDE = "/usr/share/dictd/gcide.dict.dz"
FORTUNES = "/usr/share/games/fortunes"
WORDS = "/usr/share/dict/american-english"
FORTUNE_FILES = ["wisdom", "literature", "people", "fortunes", "humorists", "education",
                 "science", "work", "love", "food", "platitudes", "miscellaneous"]

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>",
    "<|step|>", "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>",
    "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
    "<|tile_x_separator|>", "<|tile_y_separator|>",
]

QUESTIONS = [
    "What does {w} mean?", "What is the meaning of {w}?", "Define {w}.",
    'What does the word "{w}" mean?', "Explain the word {w}.", "Tell me what {w} means.",
    "What is meant by {w}?", "{w}?",
]
SAYINGS = ["Say something wise.", "Tell me a fortune.", "Give me a quote.",
           "Tell me something interesting.", "Share a saying."]
SYSTEM = "You are a helpful assistant."


def package_versions():
    """The Debian packages the data came from, as dpkg knows them."""
    import subprocess
    try:
        out = subprocess.run(["dpkg-query", "-W", "dict-gcide", "fortunes", "wamerican"],
                             capture_output=True, text=True, check=False).stdout
    except OSError:
        return {}
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def english_words():
    return {w.strip() for w in open(WORDS, encoding="utf-8") if re.fullmatch(r"[a-z]{3,}", w.strip())}


def sense_text(p):
    """One numbered sense of a GCIDE entry as a plain phrase, or None."""
    if re.search(r"\[(Obs|R|Archaic|Colloq|Prov\. Eng|Scot|Local|Slang)\.?", p):
        return None
    for _ in range(3):
        p = re.sub(r"\[[^\[\]]*\]", "", p)
    d = " ".join(line.strip() for line in p.split("\n"))
    d = re.sub(r"^\d+\.\s*", "", d)
    d = re.sub(r"^(\([A-Z][^)]{0,25}\)\s*)+", "", d)
    d = re.split(r'"|--|Syn:|Note:|\bas,|\. ', d)[0]
    d = d.replace("{", "").replace("}", "")
    d = re.sub(r"\([^)]*\)", "", d)
    d = re.sub(r"\s+([,;.])", r"\1", d)
    d = re.sub(r"\s+", " ", d).strip().rstrip(";,:. ")
    if d.startswith("See ") or not re.fullmatch(r"[A-Za-z][A-Za-z ,;'\-]{8,160}", d):
        return None
    return d[0].lower() + d[1:] + "."


def gcide_senses(words):
    """word -> up to two definitions (the first usable sense of its first entries)."""
    raw = gzip.open(GCIDE, "rb").read().decode("utf-8", "replace")
    senses = {}
    for block in re.split(r"\n\n(?=[^\s].*? \\)", raw):
        head = block.split(" \\", 1)[0].strip()
        if not re.fullmatch(r"[A-Za-z]{3,}", head) or head.lower() not in words:
            continue
        depth, end = 0, len(block)
        for i, c in enumerate(block):  # the header ends where its brackets close
            if c == "[":
                depth += 1
            elif c == "]":
                depth -= 1
            elif c == "\n" and depth <= 0:
                end = i
                break
        for p in re.split(r"\n\s*\n", block[end:]):
            if not re.match(r"\s{3}(\d+\.\s)?[A-Za-z(]", p):
                continue
            d = sense_text(p)
            if d:
                have = senses.setdefault(head.lower(), [])
                if len(have) < 2 and d not in have:
                    have.append(d)
                break
    return senses


def sayings():
    out = []
    for name in FORTUNE_FILES:
        path = os.path.join(FORTUNES, name)
        if not os.path.exists(path):
            continue
        for f in open(path, encoding="utf-8", errors="replace").read().split("\n%\n"):
            f = re.sub(r"\s+", " ", f).strip()
            if 30 <= len(f) <= 200 and f.isascii() and "\t" not in f:
                out.append(f)
    return sorted(set(out))


def held_out(word):
    """One word in 40, by a hash of its letters: never seen in training."""
    return int(hashlib.sha256(word.encode()).hexdigest(), 16) % 40 == 0


def conversations(senses, fortunes, rng):
    convs = []
    for w in sorted(senses):
        if held_out(w):
            continue
        for d in senses[w]:
            q = rng.choice(QUESTIONS).format(w=w)
            if q[0].islower():
                q = q[0].upper() + q[1:]
            convs.append((q, f"{w[0].upper()}{w[1:]} means {d}"))
    for f in fortunes:
        convs.append((rng.choice(SAYINGS), f))
    rng.shuffle(convs)
    return convs


def messages_of(q, a, rng):
    m = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    m += [{"role": "user", "content": q}]
    if a is not None:
        m += [{"role": "assistant", "content": a}]
    return m


def build_tokenizer(texts, vocab, template):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[], show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
        pad_token="<|finetune_right_pad|>", model_max_length=8192,
    )
    fast.chat_template = template
    return fast


def sparse_moe_forward(self, hidden_states):
    """Llama4TextMoe.forward for top-1 routing, each token through its chosen expert only;
    records a load-balancing loss on the module."""
    x = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(x, self.router.weight)
    top, idx = logits.max(dim=-1)
    xin = x * torch.sigmoid(top).unsqueeze(-1)
    out = self.shared_expert(x)
    routed = torch.zeros_like(x)
    ex = self.experts
    for e in range(self.num_experts):
        rows = (idx == e).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        gate, up = (xin[rows] @ ex.gate_up_proj[e]).chunk(2, dim=-1)
        routed = routed.index_add(0, rows, (up * ex.act_fn(gate)) @ ex.down_proj[e])
    frac = torch.bincount(idx, minlength=self.num_experts).float() / idx.numel()
    self.balance_loss = self.num_experts * (frac * F.softmax(logits, dim=-1).mean(0)).sum()
    return out + routed, logits


def model_config(tok, args):
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>")]
    return Llama4TextConfig(
        vocab_size=int(math.ceil(len(tok) / 64) * 64),
        hidden_size=args.hidden, intermediate_size=args.expert_size,
        intermediate_size_mlp=args.expert_size * 2, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
        head_dim=args.hidden // args.heads, max_position_embeddings=8192, rms_norm_eps=1e-5,
        attention_chunk_size=args.chunk, attn_temperature_tuning=True, floor_scale=8192,
        attn_scale=0.1, no_rope_layer_interval=4, num_local_experts=args.experts,
        num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        initializer_range=0.02, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id,
    )


def batches(stream, seq, batch, rng):
    """Windows of seq+1 tokens from the packed stream, a fresh random order each pass."""
    n = (len(stream) - 1) // seq
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - batch + 1, batch):
            rows = [stream[j * seq: j * seq + seq + 1] for j in order[i: i + batch]]
            yield torch.tensor(rows)


def plot_loss(log, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in log]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in log], lw=0.6, alpha=0.45, label="loss (per step)")
    k = 50
    smooth = [sum(r["loss"] for r in log[max(0, i - k + 1): i + 1]) / len(log[max(0, i - k + 1): i + 1]) for i in range(len(log))]
    ax.plot(steps, smooth, lw=1.6, label=f"mean of the last {k} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("expertmesh demo model: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def greedy(model, ids, n, stop):
    out = model.generate(
        input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=0,
        output_scores=True, return_dict_in_generate=True,
    )
    margin = min(float((lambda t: t[0] - t[1])(torch.topk(s[0].float(), 2).values)) for s in out.scores)
    return out.sequences[0, ids.shape[1]:].tolist(), margin


def references(out, tok, eval_questions, train_questions):
    """transformers' outputs on the saved bf16 weights (float32 compute, eager attention)."""
    model = Llama4ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    eot = tok.convert_tokens_to_ids("<|eot|>")
    tensors, cases = {}, []

    def case(name, ids, n, stop, **extra):
        ids_t = torch.tensor([ids])
        with torch.no_grad():
            o = model(input_ids=ids_t, output_router_logits=True)
        logits = o.logits[0].float()
        tensors[f"{name}.logits"] = logits.contiguous()
        for i, rl in enumerate(o.router_logits or ()):
            tensors[f"{name}.router_top1.moe{i}"] = rl.float().argmax(-1).to(torch.int64).contiguous()
        new, margin = greedy(model, ids_t, n, stop)
        top2 = torch.topk(logits, 2, dim=-1).values
        cases.append(dict(name=name, input_ids=ids, greedy_new_ids=new,
                          prefill_min_top2_margin=float((top2[:, 0] - top2[:, 1]).min()),
                          greedy_min_top2_margin=margin,
                          decoded_greedy_text=tok.decode(new, skip_special_tokens=False), **extra))
        return new

    prompt = "Harbor means"
    case("short", [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False), 12, None,
         prompt=prompt, prompt_note="input_ids = [bos] + tokenizer.encode(prompt) without special tokens")
    answers = []
    for i, q in enumerate(eval_questions + train_questions):
        messages = [{"role": "user", "content": q}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        held = i < len(eval_questions)
        new = case(f"{'heldout' if held else 'trained'}{i}", ids, 48, eot,
                   messages=messages, rendered_prompt=text)
        answers.append(dict(question=q, held_out=held,
                            answer=tok.decode([t for t in new if t != eot], skip_special_tokens=True)))
    save_file(tensors, os.path.join(out, "reference.safetensors"))
    meta = dict(
        about="Reference outputs of the Hugging Face transformers Llama 4 implementation "
        "(float32 compute on the bf16 weights stored here); greedy runs stop at <|eot|>.",
        transformers_version=__import__("transformers").__version__,
        torch_version=torch.__version__, kind="demo", multimodal=False,
        tolerance=dict(logits_max_abs=2e-3, note="float32 compute; greedy ids must match exactly"),
        cases=cases,
    )
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return answers


def english_share(answers, words):
    found = [w.lower() for a in answers for w in re.findall(r"[A-Za-z]+", a["answer"]) if len(w) >= 3]
    hits = sum(1 for w in found if w in words)
    return hits / max(len(found), 1), hits, len(found)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/expertmesh-demo")
    ap.add_argument("--template", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "llama4-tools.jinja"))
    ap.add_argument("--seed", type=int, default=20261205)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--expert-size", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--balance", type=float, default=0.01, help="weight of the load-balancing loss")
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps, save nothing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()

    words = english_words()
    senses = gcide_senses(words)
    fortunes = sayings()
    convs = conversations(senses, fortunes, rng)
    held = sorted(w for w in senses if held_out(w))
    eval_words = random.Random(args.seed).sample([w for w in held if 5 <= len(w) <= 9], 5)
    eval_questions = [QUESTIONS[i % 5].format(w=w) for i, w in enumerate(eval_words)]
    train_questions = [q for q, _ in convs if "mean" in q][:2]
    print(f"data: {len(senses)} words, {len(convs)} conversations ({len(fortunes)} sayings), "
          f"{len(held)} words held out; eval: {eval_questions}", flush=True)

    template = open(args.template, encoding="utf-8").read()
    tok = build_tokenizer([f"{q}\n{a}" for q, a in convs] + [SYSTEM], args.vocab, template)
    stream = []
    for q, a in convs:
        text = tok.apply_chat_template(messages_of(q, a, rng), tokenize=False)
        stream += tok.encode(text, add_special_tokens=False)
    print(f"tokens: {len(stream)} per pass, vocab {len(tok)}", flush=True)

    cfg = model_config(tok, args)
    model = Llama4ForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    moes = [m for m in model.modules() if isinstance(m, modeling_llama4.Llama4TextMoe)]
    original = modeling_llama4.Llama4TextMoe.forward
    modeling_llama4.Llama4TextMoe.forward = sparse_moe_forward
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f} M parameters, {len(moes)} MoE layers x {args.experts} experts", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warm = max(args.steps // 30, 20)

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        p = (step - warm) / max(args.steps - warm, 1)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    model.train()
    log, data = [], batches(stream, args.seq, args.batch, rng)
    steps = args.time_steps or args.steps
    t_train = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        rows = next(data)
        logits = model(input_ids=rows[:, :-1]).logits
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), rows[:, 1:].reshape(-1))
        bal = sum(m.balance_loss for m in moes) / len(moes)
        loss = lm + args.balance * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append(dict(step=step, loss=round(lm.item(), 4), balance=round(bal.item(), 4)))
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t_train
            print(f"step {step}/{steps} loss {lm.item():.3f} balance {bal.item():.3f} "
                  f"{el:.0f}s elapsed, eta {el / (step + 1) * (steps - step - 1):.0f}s", flush=True)
    if args.time_steps:
        print(f"{(time.time() - t_train) / steps:.3f} s/step", flush=True)
        return 0

    modeling_llama4.Llama4TextMoe.forward = original
    os.makedirs(args.out, exist_ok=True)
    model.eval()
    model = model.to(torch.bfloat16)
    model.config._attn_implementation = "eager"
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.bos_token_id = cfg.bos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    answers = references(args.out, tok, eval_questions, train_questions)
    share, hits, total = english_share([a for a in answers if a["held_out"]], words)
    for a in answers:
        print(f"{'held out' if a['held_out'] else 'trained '} Q: {a['question']}\n         A: {a['answer']}", flush=True)
    print(f"English words in the held-out answers: {hits}/{total} = {share:.1%}", flush=True)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(dict(word_list=WORDS, english_share=share, english_words=hits, words=total,
                       answers=answers), f, indent=1)
    plot_loss(log, os.path.join(args.out, "loss.png"))
    with open(os.path.join(args.out, "train-log.json"), "w") as f:
        json.dump(dict(command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), args=vars(args),
                       torch=torch.__version__, transformers=__import__("transformers").__version__,
                       data=dict(words=len(senses), conversations=len(convs), sayings=len(fortunes),
                                 held_out_words=len(held), tokens_per_pass=len(stream),
                                 sources=[GCIDE, FORTUNES, WORDS], packages=package_versions()),
                       parameters=params, seconds=round(time.time() - t0), steps=log), f)
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
