"""Serving a stream of requests with continuous batching over a paged KV cache.

    python examples/continuous_batching.py                        # CPU, float32
    python examples/continuous_batching.py --device cuda          # float16 KV cache + attention
    python examples/continuous_batching.py --requests 40 --seed 3 --block-size 1

A small random-weight decoder-only transformer (RMSNorm, rotary positions, GQA, SwiGLU MLP)
generates greedily for requests that arrive over time, with different prompt lengths and
different numbers of tokens to generate. Every engine step runs ONE mixed batch:

* each running sequence that is decoding contributes its one newest token;
* sequences still prefilling contribute a chunk of their prompt (at most --chunk-size tokens,
  and all chunks together stay within --token-budget tokens per step), so a long prompt is
  prefilled over several steps while the other sequences keep decoding;
* newly arrived requests are admitted while there is budget and a free batch slot.

The keys and values of all sequences live in one `fastattn.PagedKVCache`. Per step:

    slots = cache.reserve(seq_ids, counts)          # once, for all layers
    for each layer:
        q, k, v = projections of the packed new tokens, rotated at their absolute positions
        cache.write(layer, slots, k, v)             # append the new keys/values first ...
        fastattn.flash_attn_varlen_func(q, cache.k_caches[layer], cache.v_caches[layer],
                                        cu_seqlens_q, cu_seqlens_k, ..., causal=True,
                                        block_table=cache.block_table_tensor(seq_ids))
                                                    # ... then attend over context + new tokens

cu_seqlens_q packs each sequence's new tokens; cu_seqlens_k counts each sequence's keys after
the append. The causal mask is aligned bottom-right, so a prefill chunk's last query sees the
sequence's last key and a decode row (one query) sees its whole context: prefill chunks and
decode rows go through a single kernel launch per layer. The step plans that launch once
(`fastattn.BatchAttention().plan(q_lens, k_lens, ...)` from the host-side lengths the scheduler
already has) and every layer passes it as `plan=`.

When the pool runs out of blocks (`fastattn.OutOfBlocks`; `reserve` is all-or-nothing, so
nothing has changed when it raises), the scheduler, in this order:
  1. defers prefill chunks, newest first: the chunk is dropped from this step's batch, and a
     sequence that holds no blocks yet goes back to the front of the waiting queue;
  2. if only decode rows are left, preempts the most recently admitted running sequence:
     its blocks are freed and it is put back at the front of the waiting queue, keeping the
     tokens generated so far; once readmitted it re-prefills prompt + generated tokens
     ("recompute" preemption) and carries on where it stopped.
The oldest running sequence is never preempted while others are running, and every request
fits the pool on its own (checked up front), so the engine always makes progress. The default
pool (--cache-tokens) is deliberately small so that both paths run.

With --system-prompt N every request starts with the same N tokens. They are prefilled once
into a parent sequence; each admitted request forks it (`cache.fork`: the parent's blocks are
shared, copy-on-write), and a step's attention becomes `fastattn.cascade_attention` over
`fastattn.cascade_tables(cache, seq_ids)`: the shared pages once for all of the step's queries,
each sequence's own pages apart, merged by their LSE.

With --kv-cache fp8 the pool holds float8_e4m3fn codes (PagedKVCache(dtype=float8_e4m3fn,
k_scale=..., v_scale=...): appends quantize, decode steps read the codes in the kernel) and the
single-request reference below uses an FP8 contiguous cache with the same scales; the run also
reports how many requests generate the same tokens as with a 16-bit cache (quantization
changes the attention's values, so near-ties may flip).

Finally every request is generated again ALONE, with a contiguous per-request cache
(`fastattn.flash_attn_with_kvcache`: the whole prompt in one call, then one token per call;
or `--reference torch`: plain torch attention over the whole history), and the generated
token sequences must be identical; the logits of every generated token are compared too.
The example exits with status 1 on any mismatch.

Precision: weights, norms, matmuls and logits are float32 on every device; only the KV cache
and the attention run in --dtype (float32 on CPU; on CUDA, whose kernels take float16 or
bfloat16, float16 by default). Batched and single-request runs differ in the order of
floating-point sums (a packed batch vs one row), so their logits differ by rounding; keeping
everything else in float32 keeps that far below the gap between the best and second-best
logit, so greedy argmax picks the same token. A mismatch is reported with that gap, so a
near-tie can be told from a real bug.
"""
from __future__ import annotations

import argparse
import collections
import math
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fastattn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    vocab: int = 256
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2  # GQA: query heads 0-1 share KV head 0, heads 2-3 share KV head 1
    head_dim: int = 32
    ffn: int = 256
    max_positions: int = 4096
    rope_theta: float = 10000.0


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def rotate(x, cos, sin):
    """Rotary embedding (rotate-half form) of x (tokens, heads, head_dim); cos, sin (tokens,
    head_dim / 2) are already gathered at each token's absolute position."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)


class TinyDecoder:
    """Random weights; only `forward`'s `attend` callback knows about KV caches, so the batched
    engine and the single-request reference run exactly the same model code."""

    def __init__(self, cfg: ModelConfig, device, attn_dtype, seed):
        self.cfg, self.attn_dtype = cfg, attn_dtype
        # Weights are drawn on the CPU, so a seed gives the same model on every device.
        g = torch.Generator().manual_seed(seed)

        def linear(n_in, n_out):
            return (torch.randn(n_in, n_out, generator=g) / math.sqrt(n_in)).to(device)

        def norm_weight():
            return (1 + 0.1 * torch.randn(cfg.hidden, generator=g)).to(device)

        H, Hkv, D = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.embed = torch.randn(cfg.vocab, cfg.hidden, generator=g).to(device)
        self.layers = [dict(attn_norm=norm_weight(), wq=linear(cfg.hidden, H * D),
                            wk=linear(cfg.hidden, Hkv * D), wv=linear(cfg.hidden, Hkv * D),
                            wo=linear(H * D, cfg.hidden), mlp_norm=norm_weight(),
                            w_gate=linear(cfg.hidden, cfg.ffn), w_up=linear(cfg.hidden, cfg.ffn),
                            w_down=linear(cfg.ffn, cfg.hidden))
                       for _ in range(cfg.layers)]
        self.final_norm = norm_weight()
        # x4 spreads the logits (std ~4) so they are easy to read; argmax does not care.
        self.lm_head = 4 * linear(cfg.hidden, cfg.vocab)
        inv_freq = cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        angles = torch.outer(torch.arange(cfg.max_positions, dtype=torch.float64), inv_freq)
        self.cos, self.sin = angles.cos().float().to(device), angles.sin().float().to(device)

    def forward(self, tokens, positions, attend):
        """tokens, positions: int64 (T,), the packed new tokens of one or more sequences.
        attend(layer, q, k, v) gets (T, heads or kv_heads, head_dim) tensors in attn_dtype, stores
        k, v and returns the attention output (T, heads, head_dim). Returns hidden states (T, hidden)."""
        cfg, T = self.cfg, tokens.shape[0]
        x = self.embed[tokens]
        cos, sin = self.cos[positions], self.sin[positions]
        for i, p in enumerate(self.layers):
            h = rms_norm(x, p["attn_norm"])
            q = rotate((h @ p["wq"]).view(T, cfg.heads, cfg.head_dim), cos, sin)
            k = rotate((h @ p["wk"]).view(T, cfg.kv_heads, cfg.head_dim), cos, sin)
            v = (h @ p["wv"]).view(T, cfg.kv_heads, cfg.head_dim)
            dt = self.attn_dtype
            o = attend(i, q.to(dt), k.to(dt), v.to(dt)).float()
            x = x + o.reshape(T, -1) @ p["wo"]
            h = rms_norm(x, p["mlp_norm"])
            x = x + (F.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
        return rms_norm(x, self.final_norm)

    def logits(self, hidden):
        return hidden @ self.lm_head


# ------------------------------------------------------------------------------------ requests
@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new_tokens: int
    arrival_step: int


def make_requests(n, vocab, seed, initial=4, max_prompt=200, max_new=40):
    """A few requests at step 0, the rest arriving 0-3 steps apart. About a third have long
    prompts (prefilled in several chunks); the others are short."""
    rng = random.Random(seed)
    requests, step = [], 0
    for rid in range(n):
        if rid >= initial:
            step += rng.randint(0, 3)
        long_prompt = rng.random() < 0.35
        length = rng.randint(40, max_prompt) if long_prompt else rng.randint(1, 40)
        requests.append(Request(rid, [rng.randrange(vocab) for _ in range(length)],
                                rng.randint(1, max_new), step))
    return requests


# -------------------------------------------------------------------------------------- engine
@dataclass
class Sequence:
    """Engine-side state of one request. It survives preemption: only num_computed is reset."""
    req: Request
    output: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # one (vocab,) row per output token
    num_computed: int = 0  # leading tokens of prompt + output whose K/V are in the cache
    prefill_steps: int = 0

    @property
    def rid(self):
        return self.req.rid

    @property
    def num_tokens(self):
        return len(self.req.prompt) + len(self.output)

    @property
    def num_pending(self):
        """Tokens not yet in the cache: > 1 while prefilling, exactly 1 (the newest generated
        token) while decoding."""
        return self.num_tokens - self.num_computed

    def pending_tokens(self, n):
        start = self.num_computed
        tokens = self.req.prompt + self.output
        return tokens[start:start + n]

    @property
    def done(self):
        return len(self.output) == self.req.max_new_tokens


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    max_batch_seqs: int = 0
    max_batch_tokens: int = 0
    mixed_steps: int = 0  # steps with prefill chunks and decode rows in the same launch
    batch_changes: int = 0  # steps whose set of sequences differs from the previous step's
    out_of_blocks: int = 0
    cascade_steps: int = 0  # steps whose attention read a shared prefix once (--system-prompt)
    deferred_chunks: int = 0
    preemptions: int = 0
    peak_cache: dict = field(default_factory=dict)


class Engine:
    """The scheduler: requests go arrivals -> waiting (FCFS) -> running (at most max_seqs, each
    holding cache blocks) -> finished. `step()` runs one mixed batch."""

    SYSTEM = "system"  # the parent sequence of a shared system prompt

    def __init__(self, model, cache, requests, chunk_size, token_budget, max_seqs, system_prompt=()):
        if max_seqs > token_budget:
            raise ValueError("max_seqs must be <= token_budget: every running sequence needs a "
                             "budget token for its decode row")
        self.model, self.cache = model, cache
        self.chunk_size, self.token_budget, self.max_seqs = chunk_size, token_budget, max_seqs
        self.arrivals = collections.deque(sorted(requests, key=lambda r: r.arrival_step))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order: the oldest is running[0]
        self.finished: dict[int, Sequence] = {}
        self.stats = EngineStats()
        self._prev_ids: set[int] = set()
        # Every request's prompt starts with system_prompt: prefilled once, forked by each.
        self.base = len(system_prompt)
        if self.base:
            cache.add_sequence(self.SYSTEM)
            slots = cache.reserve([self.SYSTEM], [self.base])
            system = Sequence(Request(self.SYSTEM, list(system_prompt), 1, 0))
            with torch.inference_mode():
                self._run([(system, self.base)], slots)

    def close(self):
        if self.base:
            self.cache.free(self.SYSTEM)

    def _admit(self, seq):
        """A waiting sequence holds no blocks: it starts from the shared prompt's blocks, if any."""
        if self.base:
            self.cache.fork(self.SYSTEM, seq.rid)
            seq.num_computed = self.base
        else:
            self.cache.add_sequence(seq.rid)

    def has_work(self):
        return bool(self.arrivals or self.waiting or self.running)

    def step(self):
        step = self.stats.steps
        while self.arrivals and self.arrivals[0].arrival_step <= step:
            self.waiting.append(Sequence(self.arrivals.popleft()))
        batch, num_decodes = self._schedule()
        slots = self._reserve(batch, num_decodes)
        if batch:
            self._record(batch, num_decodes)
            self._run(batch, slots)
        for seq in [s for s in self.running if s.done]:
            self.cache.free(seq.rid)  # its blocks are reusable from the next step on
            self.running.remove(seq)
            self.finished[seq.rid] = seq
        self.stats.steps += 1

    def _schedule(self):
        """This step's batch as [(sequence, new tokens)]: decode rows first, then prefill
        chunks of running sequences, then chunks of newly admitted ones."""
        budget = self.token_budget
        decodes = [s for s in self.running if s.num_pending == 1]
        batch = [(s, 1) for s in decodes]
        budget -= len(decodes)
        for s in self.running:
            if s.num_pending > 1 and budget > 0:
                n = min(s.num_pending, self.chunk_size, budget)
                batch.append((s, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            s = self.waiting.popleft()
            self._admit(s)
            self.running.append(s)
            n = min(s.num_pending, self.chunk_size, budget)
            batch.append((s, n))
            budget -= n
        return batch, len(decodes)

    def _reserve(self, batch, num_decodes):
        """cache.reserve for the whole batch; on OutOfBlocks shrinks the batch (in place) and
        retries. See the module docstring for the policy."""
        while True:
            try:
                return self.cache.reserve([s.rid for s, _ in batch], [n for _, n in batch])
            except fastattn.OutOfBlocks:
                self.stats.out_of_blocks += 1
            if len(batch) > num_decodes:  # 1. defer the newest prefill chunk
                seq, _ = batch.pop()
                self.stats.deferred_chunks += 1
                if seq.num_computed == self.base:  # no blocks of its own: no reason to keep it running
                    self.cache.free(seq.rid)
                    self.running.remove(seq)
                    self.waiting.appendleft(seq)
                continue
            victim = self.running[-1]  # 2. preempt the most recently admitted sequence
            self.stats.preemptions += 1
            self.cache.free(victim.rid)
            victim.num_computed = 0
            self.running.remove(victim)
            self.waiting.appendleft(victim)
            if any(s is victim for s, _ in batch):
                batch[:] = [(s, n) for s, n in batch if s is not victim]
                num_decodes -= 1

    def _record(self, batch, num_decodes):
        st, tokens = self.stats, sum(n for _, n in batch)
        st.decode_tokens += num_decodes
        st.prefill_tokens += tokens - num_decodes
        st.max_batch_seqs = max(st.max_batch_seqs, len(batch))
        st.max_batch_tokens = max(st.max_batch_tokens, tokens)
        st.mixed_steps += 0 < num_decodes < len(batch)
        ids = {s.rid for s, _ in batch}
        st.batch_changes += ids != self._prev_ids
        self._prev_ids = ids
        for s, _ in batch[num_decodes:]:
            s.prefill_steps += 1
        if self.cache.num_used_blocks > st.peak_cache.get("num_used_blocks", -1):
            st.peak_cache = self.cache.stats()

    def _run(self, batch, slots):
        """One forward pass over the packed batch; sequences whose pending tokens are now all
        in the cache get their next token from the logits of their last row."""
        device = self.cache.device
        seq_ids = [s.rid for s, _ in batch]
        tokens, positions, q_lens, k_lens = [], [], [], []
        for s, n in batch:
            tokens += s.pending_tokens(n)
            positions += range(s.num_computed, s.num_computed + n)
            q_lens.append(n)
            k_lens.append(s.num_computed + n)  # context + this step's tokens (already reserved)
        cu_seqlens_q = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
        cu_seqlens_k = torch.tensor([0] + k_lens, device=device).cumsum(0).to(torch.int32)
        max_q, max_k = max(q_lens), max(k_lens)
        # One block table for all layers: every layer uses the same block ids for a sequence.
        block_table = self.cache.block_table_tensor(seq_ids)
        cache = self.cache
        # Sequences forked from the system prompt share its full blocks (as long as each keeps
        # max_q tokens of its own for its queries): the prefix is then read once per step.
        shared = (fastattn.cascade_tables(cache, seq_ids, min_suffix_len=max_q)
                  if self.base and len(batch) > 1 else None)
        self.stats.cascade_steps += shared is not None

        # The step's attention plan (prefill chunks and decode rows in one launch), from the
        # host-side lengths the scheduler already has: made once, run by every layer.
        plan = None
        if shared is None:
            cfg = self.model.cfg
            plan = fastattn.BatchAttention(device).plan(
                q_lens, k_lens, num_heads_q=cfg.heads, num_heads_kv=cfg.kv_heads, head_dim=cfg.head_dim,
                page_size=cache.block_size, dtype=self.model.attn_dtype, kv_dtype=cache.dtype, causal=True)

        def attend(layer, q, k, v):
            cache.write(layer, slots, k, v)
            if shared is not None:
                return fastattn.cascade_attention(q, cache.k_caches[layer], cache.v_caches[layer],
                                                  cu_seqlens_q, max_q, shared, k_descale=cache.k_scale,
                                                  v_descale=cache.v_scale)
            return fastattn.flash_attn_varlen_func(
                q, cache.k_caches[layer], cache.v_caches[layer], cu_seqlens_q, cu_seqlens_k,
                max_q, max_k, causal=True, block_table=block_table, k_descale=cache.k_scale,
                v_descale=cache.v_scale, plan=plan)

        hidden = self.model.forward(torch.tensor(tokens, device=device),
                                    torch.tensor(positions, device=device), attend)
        rows, emitting, end = [], [], 0
        for s, n in batch:
            end += n  # the packed row after this sequence's last new token
            s.num_computed += n
            if s.num_pending == 0:
                rows.append(end - 1)
                emitting.append(s)
        if emitting:  # the LM head only for rows that produce a token, not whole prefill chunks
            logits = self.model.logits(hidden[torch.tensor(rows, device=device)])
            for s, token, row in zip(emitting, logits.argmax(-1).tolist(), logits.cpu()):
                s.output.append(token)
                s.logits.append(row)


# ----------------------------------------------------------------------------------- reference
class ContiguousCacheAttention:
    """One request, contiguous (1, S_max, kv_heads, head_dim) caches per layer, written and read
    by flash_attn_with_kvcache (cache_seqlens = length before this call's append)."""

    def __init__(self, cfg, capacity, dtype, device, fp8_scale=None):
        shape = (1, capacity, cfg.kv_heads, cfg.head_dim)
        cache_dtype = dtype if fp8_scale is None else torch.float8_e4m3fn
        zeros = lambda: torch.zeros(shape, dtype=torch.uint8, device=device).view(cache_dtype) \
            if fp8_scale is not None else torch.zeros(shape, dtype=dtype, device=device)
        self.k = [zeros() for _ in range(cfg.layers)]
        self.v = [zeros() for _ in range(cfg.layers)]
        self.scale = fp8_scale
        self.length = 0

    def __call__(self, layer, q, k, v):
        out = fastattn.flash_attn_with_kvcache(q[None], self.k[layer], self.v[layer], k=k[None],
                                               v=v[None], cache_seqlens=self.length, causal=True,
                                               k_descale=self.scale, v_descale=self.scale)
        return out[0]

    def advance(self, n):
        self.length += n


class TorchAttention:
    """One request, plain torch: keeps the whole K/V history and runs SDPA with an explicit
    bottom-right causal mask (query i of n new tokens sees keys 0 .. context + i)."""

    def __init__(self, cfg, capacity, dtype, device, fp8_scale=None):
        if fp8_scale is not None:
            raise SystemExit("--reference torch keeps a 16-bit history; use --reference kvcache with --kv-cache fp8")
        self.k = [None] * cfg.layers
        self.v = [None] * cfg.layers

    def __call__(self, layer, q, k, v):
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k])
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v])
        K, V = self.k[layer], self.v[layer]
        n, total = q.shape[0], K.shape[0]
        mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), K.transpose(0, 1), V.transpose(0, 1),
                                             attn_mask=mask, enable_gqa=True)
        return out.transpose(0, 1)

    def advance(self, n):
        pass


def generate_alone(model, req, attention_cls, dtype, device, fp8_scale=None):
    """Greedy generation of one request: the whole prompt in one forward, then one token each."""
    attn = attention_cls(model.cfg, len(req.prompt) + req.max_new_tokens, dtype, device, fp8_scale)
    output, logits = [], []
    new, start = list(req.prompt), 0  # tokens to feed next, and the position of the first one
    while len(output) < req.max_new_tokens:
        positions = torch.arange(start, start + len(new), device=device)
        hidden = model.forward(torch.tensor(new, device=device), positions, attn)
        attn.advance(len(new))
        start += len(new)
        row = model.logits(hidden[-1])
        token = int(row.argmax())
        output.append(token)
        logits.append(row.cpu())
        new = [token]
    return output, logits


# --------------------------------------------------------------------------------------- check
def top2_margin(row):
    top = row.topk(2).values
    return float(top[0] - top[1])


def compare(finished, reference, logits_tol, allow_tie_flips=False):
    """Prints a line per mismatching request. Returns (mismatches, tie flips, max |logit diff|,
    smallest top-2 logit margin of the reference).

    With allow_tie_flips (half-precision attention on the GPU), a request whose tokens diverge
    is a "tie flip", not a mismatch, when every logit up to and including the divergence agrees
    within the tolerance and the reference's top-2 margin there is below that step's logit
    difference: the batched and the single runs use different kernels (paged prefill vs split-KV
    decode), whose roundings may order two near-equal logits differently. In float32 (CPU) the
    sequences must be identical."""
    mismatches, tie_flips, max_diff, min_margin = 0, 0, 0.0, math.inf
    for rid, (ref_tokens, ref_logits) in reference.items():
        seq = finished[rid]
        min_margin = min(min_margin, *(top2_margin(row) for row in ref_logits))
        n = next((i for i, (a, b) in enumerate(zip(seq.output, ref_tokens)) if a != b), len(ref_tokens))
        # Up to the first differing token both runs fed the same tokens: their logits must agree.
        upto = min(n + 1, len(ref_tokens))
        diff = max(float((a - b).abs().max()) for a, b in zip(seq.logits[:upto], ref_logits[:upto]))
        max_diff = max(max_diff, diff)
        if seq.output == ref_tokens and diff <= logits_tol:
            continue
        if allow_tie_flips and seq.output != ref_tokens and diff <= logits_tol:
            step = float((seq.logits[n] - ref_logits[n]).abs().max())
            if top2_margin(ref_logits[n]) < step:
                tie_flips += 1
                print(f"tie flip: request {rid} diverges at output token {n} where the reference's "
                      f"top-2 logit margin {top2_margin(ref_logits[n]):.3g} < the step's logit "
                      f"difference {step:.3g}")
                continue
        mismatches += 1
        what = "tokens identical"
        if seq.output != ref_tokens:
            what = (f"first difference at output token {n}: batched {seq.output[n]}, alone "
                    f"{ref_tokens[n]}, where the reference's top-2 logit margin is "
                    f"{top2_margin(ref_logits[n]):.3g}")
        print(f"MISMATCH request {rid} (prompt {len(seq.req.prompt)} tokens, {len(ref_tokens)} "
              f"generated): {what}; max |logit diff| {diff:.3g} (tolerance {logits_tol:g})")
    return mismatches, tie_flips, max_diff, min_margin


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="KV cache / attention dtype; auto: float32 on cpu, float16 on cuda")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cache-tokens", type=int, default=512,
                   help="KV pool size in tokens (num_blocks = ceil(cache_tokens / block_size)); "
                        "small on purpose so that OutOfBlocks happens")
    p.add_argument("--chunk-size", type=int, default=32, help="max prefill tokens of one sequence per step")
    p.add_argument("--token-budget", type=int, default=64, help="max tokens in one step's batch")
    p.add_argument("--max-seqs", type=int, default=8, help="max sequences running at once")
    p.add_argument("--max-prompt", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--system-prompt", type=int, default=0,
                   help="tokens of a system prompt all requests share (prefilled once, forked, "
                        "attended with cascade_attention)")
    p.add_argument("--kv-cache", choices=["same", "fp8"], default="same",
                   help="KV cache element type: the attention dtype, or float8_e4m3fn codes")
    p.add_argument("--fp8-scale", type=float, default=1 / 16,
                   help="k_scale = v_scale of the FP8 cache (stored code = value / scale)")
    p.add_argument("--reference", choices=["kvcache", "torch"], default="kvcache",
                   help="single-request reference: fastattn.flash_attn_with_kvcache over a "
                        "contiguous cache, or plain torch attention")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0: torch's default). The model is so small that "
                        "splitting its ops over threads costs more than it saves")
    p.add_argument("--quiet", action="store_true", help="print only the final verdict")
    return p.parse_args(argv)


def run(args):
    """Serves the requests, regenerates each alone, compares. Returns a dict of results."""
    threads = torch.get_num_threads()
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and fastattn.has_cuda_kernels()):
        raise SystemExit("--device cuda needs a CUDA GPU and a fastattn build with CUDA kernels")
    dtype = DTYPES[args.dtype if args.dtype != "auto" else
                   "float16" if device.type == "cuda" else "float32"]
    if device.type == "cuda" and dtype == torch.float32:
        raise SystemExit("fastattn's CUDA kernels take float16 or bfloat16; use --dtype float16/bfloat16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    say = (lambda *a: None) if args.quiet else print

    cfg = ModelConfig()
    model = TinyDecoder(cfg, device, dtype, seed=args.seed)
    requests = make_requests(args.requests, cfg.vocab, args.seed, max_prompt=args.max_prompt,
                             max_new=args.max_new_tokens)
    rng = random.Random(args.seed + 1)
    system_prompt = [rng.randrange(cfg.vocab) for _ in range(args.system_prompt)]
    for r in requests:
        r.prompt = system_prompt + r.prompt
    num_blocks = -(-args.cache_tokens // args.block_size)
    # A request never has its last generated token in the cache: it is output, not input.
    longest = max(len(r.prompt) + r.max_new_tokens - 1 for r in requests)
    held = -(-len(system_prompt) // args.block_size)  # the system prompt's parent keeps its blocks
    if -(-longest // args.block_size) + held > num_blocks:
        raise SystemExit(f"a request needs {longest} cache tokens but the pool holds only "
                         f"{num_blocks * args.block_size}: raise --cache-tokens")
    if longest > cfg.max_positions:
        raise SystemExit(f"a request reaches position {longest} > {cfg.max_positions}")
    fp8_scale = args.fp8_scale if args.kv_cache == "fp8" else None
    cache = fastattn.PagedKVCache(num_blocks, args.block_size, cfg.kv_heads, cfg.head_dim,
                                  num_layers=cfg.layers, device=device,
                                  dtype=dtype if fp8_scale is None else torch.float8_e4m3fn,
                                  k_scale=fp8_scale, v_scale=fp8_scale)
    say(f"{len(requests)} requests (prompts {min(len(r.prompt) for r in requests)}-"
        f"{max(len(r.prompt) for r in requests)} tokens, generating "
        f"{min(r.max_new_tokens for r in requests)}-{max(r.max_new_tokens for r in requests)}, "
        f"arriving over steps 0-{max(r.arrival_step for r in requests)}) on {device}, "
        f"KV/attention {str(cache.dtype).replace('torch.', '')}/{str(dtype).replace('torch.', '')}; "
        f"pool {num_blocks} blocks x {args.block_size}")

    engine = Engine(model, cache, requests, args.chunk_size, args.token_budget, args.max_seqs,
                    system_prompt)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        while engine.has_work():
            engine.step()
            if engine.stats.steps > 100_000:
                raise RuntimeError("the engine made no progress")
    sync()
    engine_s = time.perf_counter() - t0
    engine.close()
    cache.check_invariants()
    assert cache.num_used_blocks == 0 and cache.num_sequences == 0, "blocks leaked"

    attention_cls = ContiguousCacheAttention if args.reference == "kvcache" else TorchAttention
    t0 = time.perf_counter()
    with torch.inference_mode():
        reference = {r.rid: generate_alone(model, r, attention_cls, dtype, device, fp8_scale)
                     for r in requests}
    sync()
    reference_s = time.perf_counter() - t0
    same_as_16bit = None
    if fp8_scale is not None:  # greedy-token agreement of the FP8 cache with a 16-bit one
        with torch.inference_mode():
            wide = {r.rid: generate_alone(model, r, attention_cls, dtype, device)[0] for r in requests}
        same_as_16bit = sum(engine.finished[rid].output == toks for rid, toks in wide.items())

    # logits have std ~4. An FP8 cache rounds each key/value to 3 mantissa bits: a batched and
    # a single run whose float32 keys differ in the last bit can store neighbouring codes, so
    # FP8 runs get the half-precision tolerance and may flip near-ties.
    exact = dtype == torch.float32 and fp8_scale is None
    logits_tol = 1e-3 if exact else 0.1
    bad, tie_flips, max_diff, min_margin = compare(engine.finished, reference, logits_tol,
                                                    allow_tie_flips=not exact)

    st = engine.stats
    generated = sum(len(s.output) for s in engine.finished.values())
    chunked = sum(1 for s in engine.finished.values() if s.prefill_steps > 1)
    peak = st.peak_cache
    say(f"served {len(engine.finished)} requests in {st.steps} steps: {st.prefill_tokens} prefill + "
        f"{st.decode_tokens} decode tokens, {generated} generated")
    say(f"batches: max {st.max_batch_seqs} sequences / {st.max_batch_tokens} tokens, "
        f"{st.mixed_steps} mixed prefill+decode steps, membership changed on {st.batch_changes} steps; "
        f"{chunked} prompts prefilled in several chunks")
    say(f"cache at peak: {peak['num_used_blocks']}/{peak['num_blocks']} blocks used by "
        f"{peak['num_sequences']} sequences, {peak['stored_tokens']} tokens, utilization "
        f"{peak['utilization']:.1%}, internal fragmentation {peak['internal_fragmentation']} slots")
    say(f"OutOfBlocks: {st.out_of_blocks} events -> {st.deferred_chunks} prefill chunks deferred, "
        f"{st.preemptions} sequences preempted (recomputed later)")
    if system_prompt:
        say(f"shared system prompt of {len(system_prompt)} tokens: {st.cascade_steps} steps read it "
            f"once for the whole batch (cascade_attention)")
    say(f"throughput (informational): batched {(st.prefill_tokens + st.decode_tokens) / engine_s:.0f} "
        f"tokens/s, {generated / engine_s:.0f} generated/s ({engine_s:.2f} s); one request at a time "
        f"({args.reference}) {generated / reference_s:.0f} generated/s ({reference_s:.2f} s)")
    say(f"max |logit diff| vs single-request generation {max_diff:.2e} (tolerance {logits_tol:g}); "
        f"smallest reference top-2 logit margin {min_margin:.3g}")
    if same_as_16bit is not None:
        say(f"FP8 cache: {same_as_16bit} of {len(requests)} requests generate the same tokens as "
            f"with a 16-bit cache")
    if bad:
        print(f"FAIL: {bad} of {len(requests)} sequences differ from single-request generation")
    elif tie_flips:
        print(f"OK: {len(requests) - tie_flips} of {len(requests)} sequences identical to single-request "
              f"generation, {tie_flips} diverged only at a near-tie (see above)")
    else:
        print(f"OK: all {len(requests)} sequences identical to single-request generation")
    return dict(ok=bad == 0, mismatches=bad, tie_flips=tie_flips, stats=st, generated=generated, chunked_prompts=chunked,
                max_logit_diff=max_diff, engine_s=engine_s, reference_s=reference_s,
                same_as_16bit=same_as_16bit)


def main(argv=None):
    return 0 if run(parse_args(argv))["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
