"""Generation engines behind one small interface; the only file that knows vLLM.

An engine has two methods:
    generate(prompts, group_size, seeds) -> Rollout  # group_size samples per prompt, grouped; a seed per prompt
    sync_weights(model)                               # make the engine sample from `model`'s weights
    with_sampling(**overrides) -> engine              # the same engine, other sampling knobs (greedy eval)
HFEngine samples with transformers' `generate` on the policy module itself (CPU, tests, debugging),
so its sync is free. VLLMEngine runs an in-process vLLM `LLM` colocated with training: it sleeps
while the policy trains and receives the new weights bucket by bucket after every update.
"""

import copy
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import GenerationConfig

from data import image_items, load_image
from model import STOP_TOKENS, VISION_TOKENS, image_token_id, vision_inputs


@dataclass
class Rollout:
    """Completions for a list of prompts, `group_size` consecutive entries per prompt."""

    prompt_index: List[int]  # (N,) index into the prompts list, each repeated group_size times
    completion_ids: List[List[int]]  # (N, T_i) sampled tokens, the stop token included when one was sampled
    texts: List[str]  # (N,) decoded completions without the stop token
    truncated: List[bool]  # (N,) True when max_new_tokens ran out before a stop token
    logprobs: Optional[List[List[float]]] = None  # (N, T_i) the sampler's log-prob of each sampled token


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
            if rollout.logprobs is not None:
                rollout.logprobs[i] = rollout.logprobs[i][:first]
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

    def with_sampling(self, **overrides) -> "HFEngine":
        """The same engine with other sampling settings (greedy evaluation: temperature=0.0)."""
        return HFEngine(self.model, self.tokenizer, OmegaConf.merge(self.cfg, overrides))

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
            output_scores=c.logprobs,
            return_dict_in_generate=True,
        )

    @torch.no_grad()
    def generate(self, prompts, group_size: int, seeds: List[int]) -> Rollout:
        """A group per prompt, each sampled from its own seed: a prompt's samples do not depend on
        which other prompts share the call (or the rank), so data-parallel runs sample what one
        process would."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        gen_cfg = self.generation_config()
        out = Rollout([], [], [], [], [] if self.cfg.logprobs else None)
        for k, (prompt, seed) in enumerate(zip(prompts, seeds)):
            torch.manual_seed(seed)
            for s in range(0, group_size, self.cfg.micro_batch_size):
                rows = min(self.cfg.micro_batch_size, group_size - s)
                inputs = generation_inputs(self.model, [prompt] * rows, self.pad_id, device)
                generated = self.model.generate(**inputs, generation_config=gen_cfg)
                new_tokens = generated.sequences[:, inputs["input_ids"].shape[1] :]  # (rows, T)
                completions = [self.trim(row) for row in new_tokens.tolist()]
                if self.cfg.logprobs:
                    # the scores are the processed logits generate sampled from (temperature, top-k/p,
                    # suppressed tokens): these are the sampler's log-probs, as vLLM's processed_logprobs
                    scores = torch.stack(generated.scores, dim=1).float()  # (rows, T, V)
                    lp = F.log_softmax(scores, dim=-1).gather(2, new_tokens[..., None]).squeeze(-1)  # (rows, T)
                    out.logprobs += [row[: len(c)] for row, c in zip(lp.tolist(), completions)]
                out.prompt_index += [k] * rows
                out.completion_ids += completions
        self.model.train(was_training)
        for c in out.completion_ids:
            out.texts.append(self.tokenizer.decode(c[:-1] if self.stopped(c) else c, skip_special_tokens=False))
            out.truncated.append(not self.stopped(c))
        return out

    def stopped(self, ids: List[int]) -> bool:
        return bool(ids) and ids[-1] in self.stop_ids

    def trim(self, row: List[int]) -> List[int]:
        """Tokens up to and including the first stop token (the rest is padding)."""
        for j, t in enumerate(row):
            if t in self.stop_ids:
                return row[: j + 1]
        return row


# ---------------------------------------------------------------------------------------------
# vLLM, colocated: sleeps while the policy trains, receives new weights after each update
# ---------------------------------------------------------------------------------------------


def weight_buckets(model, bucket_bytes: int, dtype: torch.dtype) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """The policy's trainable parameters as (HF name, tensor in `dtype`) lists of about `bucket_bytes`
    each, so a sync never holds a second full copy of the model. Frozen parameters (a frozen vision
    tower) are skipped: the engine still holds them from its start. Under DeepSpeed ZeRO-3 each
    bucket's shards are gathered only while the bucket is being sent."""
    bucket, size = [], 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bucket.append((name, param))
        size += param.numel() * dtype.itemsize
        if size >= bucket_bytes:
            yield from gathered(bucket, dtype)
            bucket, size = [], 0
    if bucket:
        yield from gathered(bucket, dtype)


def gathered(bucket, dtype: torch.dtype) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """One bucket with its ZeRO-3 shards gathered (a no-op for ordinary parameters)."""
    params = [p for _, p in bucket]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            yield [(name, p.detach().to(dtype)) for name, p in bucket]
    else:
        yield [(name, p.detach().to(dtype)) for name, p in bucket]


def check_vllm() -> Optional[str]:
    """Why rollout.engine=vllm cannot run here, or None."""
    if not torch.cuda.is_available():
        return "rollout.engine=vllm needs a CUDA GPU (use rollout.engine=hf on CPU)"
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return f"rollout.engine=vllm needs vllm ({e}): pip install -r requirements-gpu.txt, or rollout.engine=hf"
    return None


class VLLMEngine:
    """An in-process vLLM `LLM` per training rank (per tensor-parallel group under torchrun).

    Prompts go in as the trainer's own token ids, one <|image_pad|> per image, with the images:
    vLLM's Qwen2.5-VL processor expands each to its grid with the same min/max pixels as training,
    and every prompt is checked to come back with exactly the trainer's expanded ids. Log-probs are
    vLLM's processed ones (after temperature and the vision-token ban), comparable with the trainer's.
    """

    def __init__(self, model_path: str, tokenizer, rcfg, mcfg, max_model_len: int, seed: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights load by reference
        from vllm import LLM

        self.tokenizer, self.cfg = tokenizer, rcfg
        self.stop_ids = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
        self.banned_ids = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
        self.image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.llm = LLM(
            model=model_path,
            dtype=str(mcfg.dtype),
            seed=seed,
            gpu_memory_utilization=rcfg.gpu_memory_utilization,
            tensor_parallel_size=rcfg.tensor_parallel_size,
            distributed_executor_backend="external_launcher" if distributed else None,
            enable_sleep_mode=rcfg.enable_sleep,
            enable_prefix_caching=rcfg.enable_prefix_caching,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            mm_processor_kwargs={"min_pixels": mcfg.min_pixels, "max_pixels": mcfg.max_pixels},
            limit_mm_per_prompt={"image": 8},
        )
        self.asleep: set = set()  # which of "weights", "kv_cache" are offloaded or discarded
        self.stale_prefix_cache = False

    def sleep(self) -> None:
        """Give the GPU memory back to training. Level 1 offloads the weights (so frozen ones, which
        a sync does not resend, survive) and discards the KV cache."""
        if self.cfg.enable_sleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def wake(self, part: str) -> None:
        if part in self.asleep:
            self.llm.wake_up(tags=[part])
            self.asleep.discard(part)

    def vllm_prompt(self, prompt) -> dict:
        """The trainer's ids with each image's run of <|image_pad|> collapsed to one, and its images."""
        ids, previous = [], None
        for t in prompt.input_ids:
            if not (t == self.image_pad and previous == self.image_pad):
                ids.append(t)
            previous = t
        images = [load_image(item["image"]) for item in image_items(prompt.sample.messages)]
        return {"prompt_token_ids": ids} | ({"multi_modal_data": {"image": images}} if images else {})

    def generate(self, prompts, group_size: int, seeds: List[int]) -> Rollout:
        from vllm import SamplingParams

        c = self.cfg
        self.wake("weights")
        self.wake("kv_cache")
        if self.stale_prefix_cache:  # its KV entries were computed with the old weights
            self.llm.reset_prefix_cache()
            self.stale_prefix_cache = False
        params = [
            SamplingParams(
                n=group_size,
                temperature=c.temperature,
                top_p=c.top_p,
                top_k=c.top_k,
                max_tokens=c.max_new_tokens,
                stop_token_ids=self.stop_ids,
                logit_bias={t: -1e9 for t in self.banned_ids},  # never sample a vision token
                logprobs=0 if c.logprobs else None,  # the sampled token's log-prob only
                seed=seed,  # per prompt: its group does not depend on the batch it is in
                skip_special_tokens=False,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([self.vllm_prompt(p) for p in prompts], params, use_tqdm=False)
        self.sleep()
        rollout = Rollout([], [], [], [], [] if c.logprobs else None)
        for k, (prompt, out) in enumerate(zip(prompts, outputs)):
            if list(out.prompt_token_ids) != list(prompt.input_ids):
                raise RuntimeError(
                    f"vLLM expanded prompt {k} to {len(out.prompt_token_ids)} tokens, the trainer to "
                    f"{len(prompt.input_ids)}: image resizing differs (check model.min_pixels / max_pixels)"
                )
            for sample in out.outputs:
                ids = list(sample.token_ids)
                stopped = bool(ids) and ids[-1] in self.stop_ids
                rollout.prompt_index.append(k)
                rollout.completion_ids.append(ids)
                rollout.texts.append(self.tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=False))
                rollout.truncated.append(not stopped)
                if c.logprobs:
                    rollout.logprobs.append([step[t].logprob for step, t in zip(sample.logprobs, ids)])
        return rollout

    def with_sampling(self, **overrides) -> "VLLMEngine":
        """The same engine (the same vLLM instance and its state) with other sampling settings."""
        other = copy.copy(self)
        other.cfg = OmegaConf.merge(self.cfg, overrides)
        return other

    def sync_weights(self, model) -> None:
        """Push the policy's trainable weights into vLLM bucket by bucket (only the weights wake up;
        the KV cache stays released until the next generate), and mark the prefix cache stale."""
        self.wake("weights")
        vllm_model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        dtype = next(vllm_model.parameters()).dtype
        for bucket in weight_buckets(model, self.cfg.sync_bucket_mb << 20, dtype):
            vllm_model.load_weights(bucket)
        self.stale_prefix_cache = True


def make_engine(cfg, policy, tokenizer, model_path: Optional[str]):
    """The engine `rollout.engine` names. vLLM loads the weights at `model_path` itself (they equal
    the policy's at the start); the HF engine samples from the policy module."""
    if cfg.rollout.engine == "hf":
        return HFEngine(policy, tokenizer, cfg.rollout)
    return VLLMEngine(
        model_path,
        tokenizer,
        cfg.rollout,
        cfg.model,
        max_model_len=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
        seed=cfg.trainer.seed,
    )
