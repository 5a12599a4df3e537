"""A tiny random-weight Llama on fastattn's kernels through transformers.

    python examples/transformers_llama.py [--device cuda] [--steps 5]

Trains a few steps on a padded batch (attn_implementation="fastattn": padded
rows are unpadded to a ragged batch inside every attention call), then
greedily generates from a left-padded batch and checks it against the same
weights under transformers' "sdpa" attention.
"""
import argparse
import copy

import torch
import transformers

import fastattn.integrations.transformers  # noqa: F401  (registers "fastattn")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                   max_position_embeddings=512, initializer_range=0.2)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fastattn")
    model.to(args.device, dtype)

    # Training on a right-padded batch: labels of padding are ignored (-100).
    ids = torch.randint(0, cfg.vocab_size, (4, 64), device=args.device)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    mask[3, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")

    # Greedy generation of a left-padded batch, against transformers' own SDPA path.
    model.eval()
    reference = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    reference.load_state_dict(model.state_dict())
    reference.to(args.device, dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (3, 12), device=args.device)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :5] = 0
    prompt_mask[2, :10] = 0
    with torch.no_grad():
        ours = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=16, do_sample=False,
                              pad_token_id=0)
        theirs = reference.generate(prompt, attention_mask=prompt_mask, max_new_tokens=16,
                                    do_sample=False, pad_token_id=0)
    print("generated:", ours[:, prompt.shape[1]:].tolist())
    print("same tokens as sdpa:", bool(torch.equal(ours, theirs)))


if __name__ == "__main__":
    main()
