"""Generation engines behind one small interface.

An engine has two methods:
    generate(prompts, group_size, seed) -> Rollout   # group_size samples per prompt, grouped
    sync_weights(model)                               # make the engine sample from `model`'s weights
The HF engine below samples with transformers' `generate` on the policy module itself (CPU, tests,
debugging), so its sync is free. A production engine (vLLM) implements the same two methods.
"""

from dataclasses import dataclass
from typing import List

import torch
from transformers import GenerationConfig

from model import STOP_TOKENS, VISION_TOKENS, image_token_id, vision_inputs


@dataclass
class Rollout:
    """Completions for a list of prompts, `group_size` consecutive entries per prompt."""

    prompt_index: List[int]  # (N,) index into the prompts list, each repeated group_size times
    completion_ids: List[List[int]]  # (N, T_i) sampled tokens, the stop token included when one was sampled
    texts: List[str]  # (N,) decoded completions without the stop token
    truncated: List[bool]  # (N,) True when max_new_tokens ran out before a stop token


def cut_vision_tokens(rollout: Rollout, vision_ids: List[int]) -> int:
    """Cut each completion before its first vision token (<|image_pad|>, ...); returns how many were cut.

    Engines suppress these tokens, but one that slipped through (another engine, a bad sampling
    setting) would make the trainer's forward expect image features that do not exist, or give a
    -inf log-prob: the completion is kept up to that token, marked truncated and counted.
    """
    banned, cut = set(vision_ids), 0
    for i, ids in enumerate(rollout.completion_ids):
        first = next((j for j, t in enumerate(ids) if t in banned), None)
        if first is not None:
            rollout.completion_ids[i] = ids[:first]
            rollout.truncated[i] = True
            cut += 1
    return cut


def left_pad(seqs: List[List[int]], pad_id: int):
    """(input_ids, attention_mask), both (B, L), padded on the left as generation needs."""
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = torch.tensor(s)
        mask[i, L - len(s) :] = 1
    return ids, mask


def generation_inputs(model, prompts, pad_id: int, device) -> dict:
    """Left-padded `generate` inputs for a list of prompts (images of all prompts in order)."""
    input_ids, attention_mask = left_pad([p.input_ids for p in prompts], pad_id)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    return inputs | vision_inputs(prompts, inputs["input_ids"], image_token_id(model), device)  # padding is type 0


class HFEngine:
    def __init__(self, model, tokenizer, rcfg):
        self.model, self.tokenizer, self.cfg = model, tokenizer, rcfg
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
        self.banned_ids = tokenizer.convert_tokens_to_ids(VISION_TOKENS)

    def sync_weights(self, model) -> None:
        self.model = model  # samples from the training module itself: nothing to copy

    def generation_config(self) -> GenerationConfig:
        c = self.cfg
        # Every sampling knob is set here: a checkpoint's generation_config.json (Qwen ships
        # repetition_penalty=1.05, top_k=1, ...) must not change the policy being trained.
        return GenerationConfig(
            do_sample=c.temperature > 0,
            temperature=c.temperature if c.temperature > 0 else 1.0,
            top_p=c.top_p,
            top_k=c.top_k,
            min_p=None,
            repetition_penalty=1.0,
            max_new_tokens=c.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            suppress_tokens=self.banned_ids,
        )

    @torch.no_grad()
    def generate(self, prompts, group_size: int, seed: int) -> Rollout:
        expanded = [i for i in range(len(prompts)) for _ in range(group_size)]  # grouped: p0 x G, p1 x G, ...
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        gen_cfg = self.generation_config()
        completions: List[List[int]] = []
        torch.manual_seed(seed)  # sampling RNG derived from (seed, step) by the caller
        for s in range(0, len(expanded), self.cfg.micro_batch_size):
            chunk = [prompts[i] for i in expanded[s : s + self.cfg.micro_batch_size]]
            inputs = generation_inputs(self.model, chunk, self.pad_id, device)
            out = self.model.generate(**inputs, generation_config=gen_cfg)  # (b, L + T)
            completions += [self.trim(row) for row in out[:, inputs["input_ids"].shape[1] :].tolist()]
        self.model.train(was_training)
        texts = [self.tokenizer.decode(c[:-1] if self.stopped(c) else c, skip_special_tokens=False) for c in completions]
        return Rollout(
            prompt_index=expanded,
            completion_ids=completions,
            texts=texts,
            truncated=[not self.stopped(c) for c in completions],
        )

    def stopped(self, ids: List[int]) -> bool:
        return bool(ids) and ids[-1] in self.stop_ids

    def trim(self, row: List[int]) -> List[int]:
        """Tokens up to and including the first stop token (the rest is padding)."""
        for j, t in enumerate(row):
            if t in self.stop_ids:
                return row[: j + 1]
        return row
