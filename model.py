"""Models: loading the policy, reference and value model, the embedded tiny preset, token log-probs,
checkpoints.

The tiny preset is the real `Qwen2_5_VLForConditionalGeneration` with a small config and random
weights, warm-started by a short supervised pass on the synthetic tasks' worked solutions, a
byte-level BPE tokenizer trained here with Qwen's special tokens and chat template, and Qwen's PIL
image processor (no torchvision). Nothing is downloaded: real weights come from a local
directory or the local hub cache, and a missing model fails fast with a message saying what to do.
"""

import copy
import hashlib
import inspect
import json
import os
import random
import re
import sys
import tempfile
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from omegaconf import OmegaConf
from torch.utils.checkpoint import checkpoint
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from config import ConfigError
from dist import all_max, any_rank, barrier, main_rank, zero3_sharded
from data import LMM_R1_SYSTEM_PROMPT, encode_prompt, prompt_key, synthetic_question_texts, synthetic_samples, synthetic_solution

# Qwen2/2.5-VL's added tokens, in Qwen's order. The tiny tokenizer carries the same strings so that
# the chat template, the stop tokens and the image placeholders behave exactly as with the real model.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Tokens a completion must never contain: a sampled <|image_pad|> would make the training forward
# expect image features that do not exist. Generation suppresses them and the trainer's log-probs
# mask them the same way, so sampler and trainer define the same distribution.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
STOP_TOKENS = ["<|im_end|>", "<|endoftext|>"]

# Qwen2-VL's chat template (the one shipped with Qwen2.5-VL-Instruct), used when a tokenizer has none.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Locating weights
# ---------------------------------------------------------------------------------------------


def resolve_model_path(path: Optional[str]) -> Optional[str]:
    """A local directory for `path` (a directory, or a hub id already in the local hub cache).

    None means the tiny model (model.tiny). Never downloads: a missing model raises FileNotFoundError
    with the commands that fetch the weights and the command that runs the tiny preset instead.
    """
    if path is None:
        return None
    if os.path.isdir(path):
        return path
    if HUB_ID.match(path) and not os.path.exists(path):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return snapshot_download(path, local_files_only=True)
        except LocalEntryNotFoundError:
            pass
        local = os.path.join("models", path.split("/")[1])
        raise FileNotFoundError(
            f"model.path={path}: the weights are not on this machine (looked in the local hub cache; "
            "nothing is downloaded at run time).\n"
            f"  Get them:  huggingface-cli download {path} --local-dir {local}\n"
            f"  then run:  python train.py model.path={local} ...\n"
            "  Or try the embedded tiny model on CPU:  python train.py debug=tiny"
        )
    raise FileNotFoundError(
        f"model.path={path}: no such directory. MGT stages start from the FRE-Text run's final "
        "checkpoint: run `python train.py stage=fre_text` first, or point model.path at a checkpoint.\n"
        "  Or try the embedded tiny model on CPU:  python train.py debug=tiny"
    )


def quiet_progress_bars() -> None:
    """Off a terminal (a log file, a SLURM job) transformers' own tqdm bars (loading and writing
    weights) only flood the log with redraws: turn them off there."""
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()


IDENTITY_FILE = "lmm_r1_model.json"  # beside a checkpoint's weights: what model it is and where it started


def model_identity(mcfg, path: Optional[str]) -> dict:
    """What a run of model config `mcfg` from local dir `path` (None: the tiny preset) trains: its
    preset (model.name), whether its weights descend from the embedded tiny model, and its lineage
    (the model.path of each run in the chain, newest first). Checkpoints carry it (IDENTITY_FILE),
    with the architecture and sizes load_policy adds.

    A checkpoint that says what it is must match: a tiny model's checkpoint (a debug=tiny run) or
    another preset's cannot start a run of this preset. Raises ConfigError saying what it found."""
    if path is None:
        return {"preset": "tiny", "tiny": True, "lineage": ["the embedded tiny model"]}
    parent = {}
    if os.path.isfile(os.path.join(path, IDENTITY_FILE)):
        with open(os.path.join(path, IDENTITY_FILE)) as f:
            parent = json.load(f)
    elif os.path.isfile(os.path.join(path, "config.json")):  # a checkpoint from before identities: the tiny one by its sizes
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        text = config.get("text_config") or config
        if (text.get("hidden_size"), text.get("vocab_size")) == (mcfg.tiny.hidden_size, mcfg.tiny.vocab_size):
            parent = {"preset": "tiny", "tiny": True, "lineage": ["the embedded tiny model (by its sizes)"]}
    found = parent.get("preset", str(mcfg.name))
    if parent.get("tiny", False) and mcfg.name != "tiny" or found != mcfg.name:
        what = "the embedded tiny model (a debug=tiny or model=tiny run)" if parent.get("tiny") else f"the {found} preset"
        raise ConfigError(
            f"model.path={mcfg.path} is a checkpoint of {what}: {parent.get('architecture')} {parent.get('sizes')}, "
            f"lineage {' <- '.join(parent.get('lineage', []))}; "
            f"this run's model is the {mcfg.name} preset and cannot start from it.\n"
            f"  Start from a checkpoint of a {mcfg.name} run (MGT stages: python train.py stage=fre_text first), "
            "or run this stage on the tiny model too: python train.py stage=... debug=tiny"
        )
    return {"preset": found, "tiny": parent.get("tiny", False), "lineage": [str(mcfg.path), *parent.get("lineage", [])]}


# ---------------------------------------------------------------------------------------------
# The embedded tiny preset
# ---------------------------------------------------------------------------------------------


def tokenizer_corpus() -> List[str]:
    """Text the tiny BPE is trained on: the prompts and answer formats the synthetic data uses."""
    lines = [LMM_R1_SYSTEM_PROMPT, "<think> Since $1+1=2$, so the answer is $2$. </think><answer> $\\boxed{2}$ </answer>"]
    lines += synthetic_question_texts()
    lines += [f"{a} + {b} = {a + b}, {a} - {b} = {a - b}, {a} \\times {b} = {a * b}" for a in range(20) for b in range(20)]
    return lines


def build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `tokenizer_corpus()`; deterministic, offline, Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        chat_template=QWEN_CHAT_TEMPLATE,
    )


# config.json of Qwen/Qwen2.5-VL-3B-Instruct (the published values)
QWEN2_5_VL_3B_TEXT = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    max_position_embeddings=128000,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)
QWEN2_5_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                            window_size=112, fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip


def build_tiny_model(tokenizer, tiny, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    """A real Qwen2.5-VL with tiny widths and random weights, deterministic from `seed`."""
    half = tiny.hidden_size // tiny.num_attention_heads // 2
    # mrope splits the rotary half-dim into (temporal, height, width) sections in Qwen's proportions
    # (Qwen2.5-VL-3B: [16, 24, 24] of 64)
    spatial = 3 * half // 8
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [half - 2 * spatial, spatial, spatial]},
    )
    vision = dict(
        depth=tiny.vision_depth,
        hidden_size=tiny.vision_hidden_size,
        intermediate_size=2 * tiny.vision_hidden_size,
        num_heads=tiny.vision_num_heads,
        out_hidden_size=tiny.hidden_size,
        window_size=112,
        fullatt_block_indexes=[tiny.vision_depth - 1],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tokenizer, text, vision))


# The warm start's recipe. Bump WARM_START_VERSION when `fit_worked_solutions` changes (the cache
# key hashes the training items, so changes to the data, prompts or solutions need no bump).
WARM_START_VERSION = 1
# Worked solutions per synthetic task, from their own seed (not the RL rows, not a held-out split).
# Arithmetic gets the most: its answers must be computed, where the others' are mostly the format.
WARM_START_SAMPLES = {"arithmetic": 1024, "shapes": 256, "geometry": 256, "sokoban": 256}
WARM_START_BATCH = 32
WARM_START_IMAGE_SIZE = 112  # data.image_size's default


def warm_start_samples(seed: int) -> list:
    """The warm start's (sample, worked solution text) pairs: WARM_START_SAMPLES of each synthetic
    task from their own seed, every other one in LMM-R1's format."""
    pairs = []
    for kind, n in WARM_START_SAMPLES.items():
        for i, s in enumerate(synthetic_samples(kind, n, f"warm-start-{seed}", WARM_START_IMAGE_SIZE, LMM_R1_SYSTEM_PROMPT)):
            pairs.append((s, synthetic_solution(s, formatted=i % 2 == 0)))
    return pairs


def worked_solution_items(pairs, tokenizer, image_processor) -> list:
    """`warm_start_samples`' pairs encoded for training: (prompt, solution token ids + <|im_end|>)."""
    eos = tokenizer.convert_tokens_to_ids(STOP_TOKENS[0])
    return [(encode_prompt(s, tokenizer, image_processor), tokenizer(text, add_special_tokens=False).input_ids + [eos])
            for s, text in pairs]  # fmt: skip


def warm_start_path(tiny, tokenizer, image_processor, pairs) -> str:
    """Where this warm start is cached: $LMM_R1_CACHE or ~/.cache/lmm-r1, under a hash of all that
    decides its weights: the recipe (version, tiny config with its seed, batch), the tokenizer and image
    processor, the training pairs themselves (`data.prompt_key` and the solution: the data
    generators, prompts and drawing), the library versions. Nothing is encoded to compute it."""
    digest = hashlib.sha256()
    recipe = {"version": WARM_START_VERSION, "tiny": OmegaConf.to_container(tiny) if OmegaConf.is_config(tiny) else dict(tiny),
              "batch": WARM_START_BATCH, "pixels": [image_processor.size.shortest_edge, image_processor.size.longest_edge],
              "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}  # fmt: skip
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    for sample, solution in pairs:
        digest.update(json.dumps([prompt_key(sample), solution]).encode())
    root = os.environ.get("LMM_R1_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmm-r1")
    return os.path.join(root, "tiny_warm_start", digest.hexdigest()[:16], "model.safetensors")


def warm_start(model, tokenizer, image_processor, tiny) -> None:
    """Give the random tiny model a head start, in place (`fit_worked_solutions`), so that RL with the
    real verifiers has rewards to raise. Built once per machine and cached (`warm_start_path`): rank 0
    builds it, every rank loads the same file. Where the cache cannot be written (or a rank cannot
    see rank 0's), the warm start is built in memory, and the run says so."""
    from safetensors.torch import load_model

    seed = tiny.warm_start_seed
    pairs = warm_start_samples(seed)
    path = warm_start_path(tiny, tokenizer, image_processor, pairs)
    fitted = False
    if any_rank(not os.path.isfile(path)):  # one decision on every rank
        if main_rank():
            print(f"[model] warm-starting the tiny model: {tiny.warm_start_steps} supervised steps on the synthetic tasks' "
                  f"worked solutions (once; cached in {os.path.dirname(path)})", flush=True)  # fmt: skip
            fit_worked_solutions(model, tokenizer, worked_solution_items(pairs, tokenizer, image_processor), tiny, seed)
            cache_weights(model, path)
            fitted = True
        barrier()
    if os.path.isfile(path):
        load_model(model, path)
    elif not fitted:
        print(f"[model] {path} is not on this rank's file system: building the warm start here", flush=True)
        fit_worked_solutions(model, tokenizer, worked_solution_items(pairs, tokenizer, image_processor), tiny, seed)


def cache_weights(model, path: str) -> None:
    """`model`'s weights to `path` atomically (a concurrent reader sees the whole file or none); a
    failure to write is reported, not raised: the run goes on with the weights it has."""
    from safetensors.torch import save_model

    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        save_model(model, tmp)
        os.replace(tmp, path)
    except OSError as e:
        print(f"[model] warning: could not cache {path} ({e}); the next run builds it again", flush=True)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def fit_worked_solutions(model, tokenizer, items, tiny, seed: int) -> None:
    """`tiny.warm_start_steps` supervised steps (token-mean NLL, AdamW, batches of WARM_START_BATCH)
    on `items` (`worked_solution_items`): half in LMM-R1's format, half outside it, so that the model
    answers in the format part of the time and sometimes right. Deterministic from `seed`."""
    rng, was_training = random.Random(seed), model.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=tiny.warm_start_lr, weight_decay=0.0)
    model.train()
    for step in range(1, tiny.warm_start_steps + 1):
        batch = collate(rng.sample(items, WARM_START_BATCH), tokenizer.pad_token_id, model.config.image_token_id, "cpu")
        mask = batch["completion_mask"]  # (B, Tc)
        loss = -(sequence_logps(model, batch, 1.0, chunk_size=mask.numel()) * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == tiny.warm_start_steps:  # it takes minutes on a busy CPU: say how far
            print(f"[model] warm start step {step}/{tiny.warm_start_steps}: loss {loss.item():.3f}", flush=True)
    # A built model must equal a loaded one in everything a run reads: left on the parameters, the
    # last step's gradients would be summed into the first RL update (a cached start has none)
    optimizer.zero_grad(set_to_none=True)
    model.train(was_training)


def qwen2_5_vl_config(tokenizer, text: dict, vision: dict) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the given text and vision sizes, with `tokenizer`'s special-token ids
    and Qwen's patching (14-pixel patches, 2x2 merge, 2 frames per temporal patch)."""
    ids = tokenizer.convert_tokens_to_ids
    special = dict(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    return Qwen2_5_VLConfig(
        text_config=text | special,
        vision_config=vision | dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=text.get("tie_word_embeddings", False),
    )


def build_image_processor(min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    """Qwen's PIL image processor: same resize/patching as the torchvision one, no torchvision needed."""
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


# ---------------------------------------------------------------------------------------------
# Loading policy, reference and value model
# ---------------------------------------------------------------------------------------------


def load_policy(mcfg, seed: int, device: torch.device):
    """(model, tokenizer, image_processor) for `mcfg` (the `model` config section).

    Qwen2.5-VL checkpoints load as Qwen2_5_VLForConditionalGeneration, text-only Qwen2 ones as
    Qwen2ForCausalLM (image_processor is then None). model.path=null builds the tiny preset.
    """
    dtype = getattr(torch, str(mcfg.dtype))
    path = resolve_model_path(mcfg.path)
    identity = model_identity(mcfg, path)
    if path is None:
        tokenizer = build_tiny_tokenizer(mcfg.tiny.vocab_size)
        if mcfg.tiny.warm_start_steps > 0:  # the warm start starts from its own seed's init
            model = build_tiny_model(tokenizer, mcfg.tiny, mcfg.tiny.warm_start_seed)
            warm_start(model, tokenizer, build_image_processor(mcfg.min_pixels, mcfg.max_pixels), mcfg.tiny)
        else:
            model = build_tiny_model(tokenizer, mcfg.tiny, seed)
        model.to(dtype)
    else:
        remote = bool(mcfg.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = QWEN_CHAT_TEMPLATE
        model = model_class(AutoConfig.from_pretrained(path, trust_remote_code=remote), path).from_pretrained(
            path, dtype=dtype, attn_implementation=str(mcfg.attn_implementation), trust_remote_code=remote
        )
    use_varlen_attention(model, str(mcfg.attn_implementation))
    processor = build_image_processor(mcfg.min_pixels, mcfg.max_pixels) if is_multimodal(model) else None
    model.to(device)
    if mcfg.freeze_vision and is_multimodal(model):
        model.model.visual.requires_grad_(False)
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    text = model.config.get_text_config()
    sizes = {k: getattr(text, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    model.lmm_r1_identity = identity | {"architecture": type(model).__name__, "sizes": sizes}  # beside its checkpoints
    return model, tokenizer, processor


def model_class(config, path: str):
    """The transformers class of a checkpoint's config: Qwen2.5-VL or text-only Qwen2."""
    cls = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2": Qwen2ForCausalLM}.get(config.model_type)
    if cls is None:
        raise ValueError(f"model.path={path}: model_type {config.model_type!r} is not supported (qwen2_5_vl, qwen2)")
    return cls


def meta_model(mcfg, path: Optional[str]):
    """The policy's architecture on the meta device (shapes, no weights, no memory), for the memory
    plan: the checkpoint's config at `path`, or the tiny preset's (path None)."""
    with torch.device("meta"):
        if path is None:
            return build_tiny_model(build_tiny_tokenizer(mcfg.tiny.vocab_size), mcfg.tiny, seed=0)
        config = AutoConfig.from_pretrained(path, trust_remote_code=bool(mcfg.trust_remote_code))
        return model_class(config, path)(config)


def is_multimodal(model) -> bool:
    return isinstance(model, Qwen2_5_VLForConditionalGeneration)


def image_token_id(model) -> Optional[int]:
    """The <|image_pad|> id of a multimodal model; None for a text-only one."""
    return model.config.image_token_id if is_multimodal(model) else None


def frozen_copy(model, dtype: Optional[torch.dtype] = None):
    """The reference model: a frozen copy of the policy as it starts, its parameters in `dtype`
    (model.dtype, the compute dtype: a bf16 reference of the 3B holds 7.5 GB where an fp32 copy of
    the master weights holds 15) or as they are with None. Each parameter is cast as it is copied
    (the deepcopy memo), so no second full-precision copy ever exists, and tied weights stay one."""
    memo = {id(p): nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


class Critic(nn.Module):
    """Value model for PPO/GAE: the policy's transformer (a copy) with a scalar head instead of lm_head."""

    def __init__(self, policy):
        super().__init__()
        self.backbone = copy.deepcopy(policy.model)
        hidden = policy.config.get_text_config().hidden_size
        p = next(policy.parameters())
        # Zero init: every state starts with value 0, so the first advantages equal the returns.
        self.value_head = nn.Linear(hidden, 1, device=p.device, dtype=p.dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)


# ---------------------------------------------------------------------------------------------
# Attention: varlen for packed sequences, SDPA otherwise
# ---------------------------------------------------------------------------------------------

try:  # GPU-only (requirements-gpu.txt), optional: torch's own varlen kernel below does the same job
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

try:  # PyTorch's FlashAttention varlen kernel (torch >= 2.10, CUDA only)
    from torch.nn.attention.varlen import varlen_attn

    VARLEN_PARAMS = inspect.signature(varlen_attn).parameters  # read once: it is called per layer
except ImportError:
    varlen_attn, VARLEN_PARAMS = None, {}


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seqlens=None, max_seqlen=None, prefix=None, **kwargs):  # fmt: skip
    """The language model's attention (registered with transformers as "varlen").

    query (1, H, S, D), key / value (1, H_kv, S, D) -> (1, S, H, D). With `cu_seqlens` (n + 1,) the
    S tokens are n packed query segments, each attending causally within itself: a whole sequence,
    or, where `pack` shares a prompt among its samples (`prefix`), the prompt, or one completion that
    also attends to all of its prompt (causal aligned to the bottom right: the completion's keys are
    the prompt's followed by its own). On a GPU flash-attn's varlen kernel where it is installed,
    else PyTorch's own (`torch.nn.attention.varlen.varlen_attn`), over keys gathered per segment
    (`prefix["kv_index"]`); elsewhere (CPU) SDPA per sequence, or per prompt group under its mask
    (`blockwise_attention`). Without `cu_seqlens` (padded batches, the HF engine's decode) it is transformers'
    SDPA with the usual padding mask.
    """
    if cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if uses_varlen_kernels(query.device):
        return varlen_kernel_attention(query, key, value, cu_seqlens, max_seqlen, prefix, scaling, dropout), None
    if prefix is None:
        spans, plans = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist(), None
    else:
        spans, plans = prefix["spans"], prefix["plans"]
    return blockwise_attention(query, key, value, spans, plans, scaling), None


def uses_varlen_kernels(device) -> bool:
    """Whether packed attention on `device` runs a GPU varlen kernel (else `blockwise_attention`)."""
    return torch.device(device).type == "cuda" and (flash_attn_varlen_func is not None or varlen_attn is not None)


def varlen_kernel_attention(query, key, value, cu_seqlens, max_seqlen: int, prefix, scale, dropout) -> torch.Tensor:
    """`varlen_attention` on the GPU kernels: flash-attn's where installed, else torch's. query
    (1, H, S, D), key / value (1, H_kv, S, D) -> (1, S, H, D), in `kernel_dtype`'s dtype."""
    dtype = kernel_dtype(query, value)
    q, k, v = (x[0].transpose(0, 1).to(dtype) for x in (query, key, value))  # (S, heads, D)
    cu_k, max_k = cu_seqlens, max_seqlen
    if prefix is not None:  # (sum of key lengths, H_kv, D): each completion's prompt keys, then its own;
        # gathered in fp32 so that the backward sums a prompt's gradients from its group_size
        # completions (index_add) in fp32, rounding once to bf16, not once per completion
        k, v = (x.float().index_select(0, prefix["kv_index"]).to(x.dtype) for x in (k, v))
        cu_k, max_k = prefix["cu_seqlens_k"], prefix["max_seqlen_k"]
    if flash_attn_varlen_func is not None:  # causal is bottom-right aligned since flash-attn 2.1
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, dropout, scale, causal=True)
    else:
        out = torch_varlen_causal(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, scale)
    return out[None]


def kernel_dtype(query, value) -> torch.dtype:
    """The one dtype of q, k and v at the GPU kernels' entry: both take only fp16 / bf16, all three
    alike. Under autocast it is autocast's (fp32 weights: q and k leave the rotary embedding in fp32,
    whose cos / sin transformers keeps fp32, while v is bf16; torch's varlen op has no autocast rule),
    else the inputs' own; fp32 without autocast is refused rather than silently rounded."""
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"packed attention on {device} runs a FlashAttention varlen kernel, which takes fp16 / bf16, not "
            f"{dtype}: train with model.dtype=bfloat16 (fp32 master weights, bf16 autocast) or trainer.packing=false"
        )
    return dtype


def torch_varlen_causal(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale) -> torch.Tensor:
    """torch's varlen_attn, causal, q (S, H, D) and k / v (S_k, H_kv, D) -> (S, H, D). It runs
    torch's FlashAttention-2 kernel (its cuDNN path is off in 2.13), whose causal mask is aligned to
    the bottom right where a segment has more keys than queries. Its signature moved (read from each
    release's wheel): 2.10 takes `is_causal=` and no `scale` (its kernel scales by 1 / sqrt(D));
    2.11 a causal window (-1, 0), and `scale`: it sets its kernel's `is_causal` from
    `window_size == (-1, 0)`, true for a tuple only, so a tuple is passed; 2.12 and 2.13 add
    `enable_gqa`. Without it the key/value heads are repeated for the query heads, as its docs ask
    for keys of H heads."""
    kwargs = {"is_causal": True} if "is_causal" in VARLEN_PARAMS else {"window_size": (-1, 0)}
    if "scale" in VARLEN_PARAMS:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale * q.shape[-1] ** 0.5 - 1) > 1e-6:
        raise ValueError(
            f"this torch's varlen_attn takes no scale and uses 1/sqrt({q.shape[-1]}), not {scale}: use torch >= 2.11"
        )
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def blockwise_attention(query, key, value, spans: List[int], plans, scale) -> torch.Tensor:
    """Attention within consecutive blocks of `spans` tokens, without an S x S mask, over `split`
    views: a block is a packed sequence (its plan None: one causal SDPA call) or a shared prompt with
    its completions (`cpu_group_plan`: one call under its (L, L) mask, or `prompt_completions_attention`).
    `plans` None: every block a sequence. Chosen by measurement on CPU (bench/attention.py): slicing
    a view per block costs a full-size zero gradient buffer per slice in the backward pass
    (1.6-2.7x slower), and one call over the sequences laid out padded computes the padding
    (3.4-4.5x slower at RL's skewed lengths). query (1, H, S, D), key / value (1, H_kv, S, D)
    -> (1, S, H, D)."""
    out = []
    for q, k, v, plan in zip(
        query.split(spans, dim=2), key.split(spans, dim=2), value.split(spans, dim=2), plans or [None] * len(spans)
    ):
        if plan is None or isinstance(plan, torch.Tensor):
            out.append(
                F.scaled_dot_product_attention(q, k, v, attn_mask=plan, is_causal=plan is None, scale=scale, enable_gqa=True)
            )
        else:
            out.append(prompt_completions_attention(q, k, v, *plan, scale))
    return torch.cat(out, dim=2).transpose(1, 2)


def prompt_completions_attention(q, k, v, prompt_len: int, completion_lens: List[int], masks, scale) -> torch.Tensor:
    """A prompt followed by its completions, q (1, H, L, D), k / v (1, H_kv, L, D) -> (1, H, L, D):
    the prompt causal, then each completion over the prompt's keys and its own, causal aligned to the
    bottom right, as the GPU kernels run it: under its mask, or (mask None) as the last T of P + T
    queries, the first P zero (their outputs are dropped, so they pass no gradient), top-left causal."""
    qs, ks, vs = (x.split([prompt_len, *completion_lens], dim=2) for x in (q, k, v))
    out = [F.scaled_dot_product_attention(qs[0], ks[0], vs[0], is_causal=True, scale=scale, enable_gqa=True)]
    for qc, kc, vc, m in zip(qs[1:], ks[1:], vs[1:], masks):
        kk, vv = torch.cat([ks[0], kc], dim=2), torch.cat([vs[0], vc], dim=2)
        if m is None:
            padded = torch.cat([qc.new_zeros(*qc.shape[:2], prompt_len, qc.shape[3]), qc], dim=2)
            out.append(
                F.scaled_dot_product_attention(padded, kk, vv, is_causal=True, scale=scale, enable_gqa=True)[:, :, prompt_len:]
            )
        else:
            out.append(F.scaled_dot_product_attention(qc, kk, vv, attn_mask=m, scale=scale, enable_gqa=True))
    return torch.cat(out, dim=2)


AttentionInterface.register("varlen", varlen_attention)
AttentionMaskInterface.register("varlen", sdpa_mask)  # padded calls get SDPA's mask; packed calls pass none
NO_MASK = {"full_attention": None, "sliding_attention": None}  # "already prepared": transformers builds no mask


def use_varlen_attention(model, vision_attention: str) -> None:
    """The language model attends with `varlen_attention`; the vision tower keeps `vision_attention`
    (its own per-image cu_seqlens are unaffected by packing)."""
    if is_multimodal(model):
        model.set_attn_implementation({"text_config": "varlen", "vision_config": vision_attention})
    else:
        model.set_attn_implementation("varlen")


# ---------------------------------------------------------------------------------------------
# Micro-batches of (prompt + completion) sequences: padded (B, L) or packed (1, S)
# ---------------------------------------------------------------------------------------------


def completion_layout(items, pad_id: int, device) -> dict:
    """The completion side of a micro-batch, the same in both layouts: completion_ids and
    completion_mask (B, Tc), right-padded, and prompt_lens (B,)."""
    Tc = max(max(len(c) for _, c in items), 1)
    completion_ids = torch.full((len(items), Tc), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(items), Tc), dtype=torch.bool)
    for i, (_, c) in enumerate(items):
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, : len(c)] = True
    return {
        "completion_ids": completion_ids.to(device),
        "completion_mask": completion_mask.to(device),
        "prompt_lens": torch.tensor([len(p.input_ids) for p, _ in items], device=device),
    }


def collate(items, pad_id: int, image_token_id: Optional[int], device, pad_to: int = 0):
    """Right-padded model inputs (B, L) for a list of (prompt, completion_ids) pairs: input_ids,
    attention_mask, the `vision_inputs`, the `completion_layout`, and where each sequence starts
    (seq_row (B,) = its row, prompt_last (B,) and completion_start (B,) its columns, as `pack`'s).
    Transformers derives the positions itself.
    L is the longest sequence, or `pad_to` if longer (fixed shapes, as TRL pads a whole batch)."""
    seqs = [list(p.input_ids) + list(c) for p, c in items]
    L, B = max(max(map(len, seqs)), pad_to), len(items)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    batch |= completion_layout(items, pad_id, device)
    P = batch["prompt_lens"]
    batch |= {"seq_row": torch.arange(B, device=device), "prompt_last": P - 1, "completion_start": P}
    prompt_part = torch.arange(L, device=device)[None, :] < batch["prompt_lens"][:, None]  # (B, L)
    return batch | vision_inputs([p for p, _ in items], batch["input_ids"], image_token_id, device, prompt_part)


def vision_inputs(prompts, input_ids: torch.Tensor, image_token_id: Optional[int], device, prompt_part=None) -> dict:
    """The image side of a batch of `prompts` laid out as `input_ids` (B, L): mm_token_type_ids
    (B, L) (1 on the prompts' image tokens: an image token *sampled* in a completion is not an image
    and must not ask for features), pixel_values and image_grid_thw of all images in prompt order.
    Empty for a text-only model."""
    if image_token_id is None:
        return {}
    image_tokens = input_ids == image_token_id
    if prompt_part is not None:
        image_tokens &= prompt_part
    out = {"mm_token_type_ids": image_tokens.int()}
    images = [p for p in prompts if p.image_grid_thw is not None]
    if images:
        out["pixel_values"] = torch.cat([p.pixel_values for p in images]).to(device)
        out["image_grid_thw"] = torch.cat([p.image_grid_thw for p in images]).to(device)
    return out


def rotary_ids(model, positions: torch.Tensor) -> torch.Tensor:
    """(3, B, T) mrope positions as the model takes them: all three rows for Qwen2.5-VL, (B, T) for a
    text model (whose three rows are equal)."""
    return positions if is_multimodal(model) else positions[0]


def prompt_positions(prompt, model) -> torch.Tensor:
    """Rotary positions (3, P) of a prompt: Qwen2.5-VL's 3D mrope (an image advances the position by
    its merged grid, not by its token count) or, for a text-only model, 0..P-1 on every row.
    Cached on the prompt: every completion of its group reuses it."""
    if getattr(prompt, "positions", None) is None:
        ids = torch.tensor(prompt.input_ids)[None]  # (1, P)
        if is_multimodal(model) and prompt.image_grid_thw is not None:
            types = (ids == model.config.image_token_id).int()
            prompt.positions = model.model.get_rope_index(ids, types, image_grid_thw=prompt.image_grid_thw)[0][:, 0]
        else:
            prompt.positions = torch.arange(ids.shape[1]).expand(3, -1)
    return prompt.positions


def prompt_groups(items, share: bool) -> List[List[int]]:
    """Positions into `items` grouped by prompt, in order of first appearance (a rollout group's
    samples hold one Prompt object); each alone when not sharing."""
    if not share:
        return [[i] for i in range(len(items))]
    groups: Dict[int, List[int]] = {}
    for i, (prompt, _) in enumerate(items):
        groups.setdefault(id(prompt), []).append(i)
    return list(groups.values())


def shared_prefix_mask(prompt_len: int, completion_lens: List[int], device="cpu") -> torch.Tensor:
    """(L, L) bool, L = prompt_len + sum(completion_lens): a prompt followed by its completions,
    the prompt causal, each completion attending to the whole prompt and causally to itself, never
    to a sibling."""
    segment = torch.repeat_interleave(torch.arange(len(completion_lens) + 1), torch.tensor([prompt_len, *completion_lens])).to(
        device
    )
    L = len(segment)
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    return causal & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))


# A shared group runs on CPU as one SDPA call under a (L, L) mask while that costs at most this many
# times the attention of one call per completion over its prompt's keys and its own (plus one for the
# prompt): fewer, larger calls win where completions are short (bench/prefix.py --model small, the
# tiny stages); long completions would make the mask's sibling blocks dominate.
DENSE_GROUP_COST = 2.0


def cpu_group_plan(prompt_len: int, completion_lens: List[int], device="cpu"):
    """How blockwise_attention runs a shared group on CPU: its (L, L) `shared_prefix_mask` (one
    call), or (prompt_len, completion_lens, per completion a (T, P + T) bottom-right causal mask, or
    None where the prompt is shorter than twice the completion: there SDPA's causal kernel over the
    queries padded by P zero rows beats a masked call, 26 vs 39 ms at P=150, T=1,000, where at
    P=1,084, T=400 the mask wins, 18 vs 40 ms: 8 query heads of 32, forward and backward)."""
    P, L = prompt_len, prompt_len + sum(completion_lens)
    if L * L <= DENSE_GROUP_COST * (P * P + sum(T * (P + T) for T in completion_lens)):
        return shared_prefix_mask(P, completion_lens, device)
    masks = [
        None if P < 2 * T else torch.ones(T, P + T, dtype=torch.bool, device=device).tril(diagonal=P) for T in completion_lens
    ]
    return P, completion_lens, masks


def attention_segments(blocks, plan_device="cpu") -> dict:
    """What `varlen_attention` needs for the `pack` layout of `blocks`, [(row start, prompt_len,
    completion_lens)] (one completion and no sharing: a plain sequence). cu_seqlens (n + 1,) int32
    and max_seqlen: the query segments (a plain sequence; or a shared prompt, then each of its
    completions); and, when some block shares, `prefix`: the CUDA kernels' keys per segment (kv_index
    (sum of key lengths,), the prompt's then the segment's own; cu_seqlens_k, max_seqlen_k) and the
    CPU path's blocks (spans, and a `cpu_group_plan` each on `plan_device`, None for a plain
    sequence; none at all with plan_device None, where the GPU kernels run)."""
    q_lens, k_lens, kv_index, spans, plans = [], [], [], [], []
    for start, P, lens in blocks:
        spans.append(P + sum(lens))
        if len(lens) == 1:
            q_lens.append(spans[-1])
            k_lens.append(spans[-1])
            kv_index.append(torch.arange(start, start + spans[-1]))
            plans.append(None)
            continue
        q_lens += [P, *lens]
        k_lens += [P, *(P + T for T in lens)]
        kv_index.append(torch.arange(start, start + P))
        offset = start + P
        for T in lens:
            kv_index += [torch.arange(start, start + P), torch.arange(offset, offset + T)]
            offset += T
        plans.append(cpu_group_plan(P, lens, plan_device) if plan_device is not None else None)
    out = {"cu_seqlens": torch.tensor([0] + q_lens).cumsum(0, dtype=torch.int32), "max_seqlen": max(q_lens)}
    if all(len(lens) == 1 for _, _, lens in blocks):
        return out
    prefix = {
        "kv_index": torch.cat(kv_index),
        "cu_seqlens_k": torch.tensor([0] + k_lens).cumsum(0, dtype=torch.int32),
        "max_seqlen_k": max(k_lens),
    }
    return out | {"prefix": prefix if plan_device is None else prefix | {"spans": spans, "plans": plans}}


def pack(items, model, pad_id: int, device, share_prompts: bool = True) -> dict:
    """One packed row (1, S) for a list of (prompt, completion_ids) pairs, no padding: each sample
    as its prompt followed by its completion, or with `share_prompts` each group of samples of one
    prompt (`prompt_groups`) as that prompt once followed by their completions, each of which attends
    to the prompt and to itself, never to a sibling (prefix sharing: the prompt's tokens and images
    go through the model once per group, not once per sample).

    input_ids (1, S); position_ids (3, 1, S) (completion tokens continue after their prompt's last
    position), or (1, S) for a text-only model; the `attention_segments` (never inferred from the
    positions); image_mask (1, S), the prompts' image tokens; pixel_values / image_grid_thw of all
    images, in order; the `completion_layout`; seq_row (B,) = 0, and per sample the columns of its
    prompt's last token (prompt_last (B,)) and its completion's first (completion_start (B,)).
    """
    ids, positions, image_mask, blocks, images = [], [], [], [], []
    prompt_last, completion_start = [0] * len(items), [0] * len(items)
    for members in prompt_groups(items, share_prompts):
        prompt = items[members[0]][0]
        P, pos = len(prompt.input_ids), prompt_positions(prompt, model)  # (3, P)
        blocks.append((len(ids), P, [len(items[i][1]) for i in members]))
        ids += list(prompt.input_ids)
        positions.append(pos)
        image_mask.append(
            torch.tensor(prompt.input_ids) == image_token_id(model) if is_multimodal(model) else torch.zeros(P, dtype=torch.bool)
        )
        images += [prompt] if prompt.image_grid_thw is not None else []
        for i in members:
            T = len(items[i][1])
            prompt_last[i], completion_start[i] = blocks[-1][0] + P - 1, len(ids)
            ids += list(items[i][1])
            positions.append((pos.max() + 1 + torch.arange(T)).expand(3, -1))  # text: one position each, all rows
            image_mask.append(torch.zeros(T, dtype=torch.bool))
    position_ids = torch.cat(positions, dim=1)[:, None]  # (3, 1, S)
    segments = attention_segments(blocks, None if uses_varlen_kernels(device) else device)  # CPU plans only where they run
    batch = {
        "input_ids": torch.tensor([ids], device=device),
        "position_ids": rotary_ids(model, position_ids).to(device),
        "cu_seqlens": segments["cu_seqlens"].to(device),
        "max_seqlen": segments["max_seqlen"],
        "image_mask": torch.cat(image_mask)[None].to(device),
        "seq_row": torch.zeros(len(items), dtype=torch.long, device=device),
        "prompt_last": torch.tensor(prompt_last, device=device),
        "completion_start": torch.tensor(completion_start, device=device),
    }
    if "prefix" in segments:
        p = segments["prefix"]
        batch["prefix"] = p | {k: p[k].to(device) for k in ("kv_index", "cu_seqlens_k")}
    if images:
        batch["pixel_values"] = torch.cat([p.pixel_values for p in images]).to(device)
        batch["image_grid_thw"] = torch.cat([p.image_grid_thw for p in images]).to(device)
    return batch | completion_layout(items, pad_id, device)


def hidden_states(backbone, batch) -> torch.Tensor:
    """Last hidden states of the transformer body (Qwen2_5_VLModel or Qwen2Model): (B, L, H) for a
    padded batch, (1, S, H) for a packed one.

    Padded: transformers computes Qwen2.5-VL's 3D mrope positions from the image grids. Packed: the
    positions and boundaries come from `pack`, the images of every packed sequence go through the
    vision tower in one call and their features replace the prompts' image tokens. With
    `dummy_vision` (under torch.distributed) a micro-batch without images still runs the vision tower
    on a blank image weighted 0: ZeRO-3 gathers its weights collectively, so every rank calls it alike.
    """
    language_model = getattr(backbone, "language_model", backbone)  # Qwen2_5_VLModel's text part, or Qwen2Model
    dummy_vision = batch.get("dummy_vision") and "pixel_values" not in batch and language_model is not backbone
    if "cu_seqlens" not in batch:
        keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
        with vision_on_every_rank(backbone, dummy_vision):
            return backbone(**{k: batch[k] for k in keys if k in batch}, use_cache=False).last_hidden_state
    embeds = backbone.get_input_embeddings()(batch["input_ids"])  # (1, S, H)
    if "pixel_values" in batch:
        features = torch.cat(backbone.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        n_tokens = int(batch["image_mask"].sum())
        if features.shape[0] != n_tokens:  # a guard, not an expected path: pack() derives both from the prompts
            raise ValueError(f"image features ({features.shape[0]}) and image tokens ({n_tokens}) do not match")
        embeds = embeds.masked_scatter(batch["image_mask"][..., None], features.to(embeds.dtype))
    elif dummy_vision:
        embeds = embeds + 0.0 * dummy_vision_features(backbone).sum()
    out = language_model(
        inputs_embeds=embeds,
        position_ids=batch["position_ids"],
        attention_mask=NO_MASK,
        cu_seqlens=batch["cu_seqlens"],
        max_seqlen=batch["max_seqlen"],
        prefix=batch.get("prefix"),
        use_cache=False,
    )
    return out.last_hidden_state


@contextmanager
def vision_on_every_rank(backbone, needed: bool):
    """While `needed` (a padded forward without images, under ZeRO-3 across ranks): the forward runs
    the vision tower on the dummy image where transformers runs a real one (after the embeddings,
    before the text model), so every rank gathers its weights alike. A text-only model: nothing."""
    language_model = getattr(backbone, "language_model", backbone)
    if not needed or language_model is backbone:
        yield
        return
    hook = language_model.register_forward_pre_hook(with_dummy_vision(backbone), with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        hook.remove()


def with_dummy_vision(backbone):
    """A forward pre-hook for the language model of a padded forward without images: it adds the
    dummy image's features, weighted 0, to the input embeddings, in the order transformers runs a
    real image (embeddings, vision tower, text model), so it goes first among the text model's
    pre-hooks (prepend: before ZeRO-3's own, which gathers the text model's weights)."""

    def hook(module, args, kwargs):
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"] + 0.0 * dummy_vision_features(backbone).sum()
        return args, kwargs

    return hook


def dummy_vision_features(backbone) -> torch.Tensor:
    """The vision tower's output for one blank 28x28 image (a 1 x 2 x 2 patch grid)."""
    visual = backbone.visual
    patch_dim = 3 * visual.config.temporal_patch_size * visual.config.patch_size**2
    p = next(visual.parameters())
    pixels = torch.zeros(4, patch_dim, device=p.device, dtype=p.dtype)
    grid = torch.tensor([[1, 2, 2]], device=p.device)
    return torch.cat(backbone.get_image_features(pixels, grid).pooler_output)


def completion_positions(batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) into the hidden states of the positions that predict each completion token,
    flattened over completion_mask in (B, Tc) row-major order: token 0 of sample i is predicted at
    its prompt's last token (column prompt_last_i of row seq_row_i), token j > 0 at its own token
    j - 1 (column completion_start_i + j - 1): the same code for every layout."""
    i, j = batch["completion_mask"].nonzero(as_tuple=True)
    cols = torch.where(j == 0, batch["prompt_last"][i], batch["completion_start"][i] + j - 1)
    return batch["seq_row"][i], cols


def _token_logp(h, targets, lm_head, temperature: float, banned_ids, with_entropy: bool, entropy_grad: bool = False):
    # h: (n, H), targets: (n,) -> logp (n,), entropy (n,) or None. fp32 logits live for one chunk only.
    # lm_head is called as a module: under ZeRO-3 its hooks gather the sharded weight.
    logits = lm_head(h).float() / temperature  # (n, V)
    if banned_ids is not None:
        logits[:, banned_ids] = float("-inf")
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(1, targets[:, None]).squeeze(1) - lse
    entropy = None
    if with_entropy:  # a metric (no graph), or with entropy_grad a loss term (an entropy bonus)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            p = torch.softmax(logits, dim=-1)
            entropy = lse - (p * logits.masked_fill(p == 0, 0)).sum(-1)
    return logp, entropy


def sequence_logps(model, batch, temperature: float, chunk_size: int, banned_ids=None, with_entropy=False, entropy_grad=False):
    """Log-probs (B, Tc) of the completion tokens under `model`, logits divided by the sampling
    temperature; optionally also the entropy (B, Tc). Padding positions hold 0.

    lm_head runs over completion positions only, `chunk_size` tokens at a time; under autograd each
    chunk is checkpointed when there are several, so the fp32 (tokens, vocab) logits never exist for
    the whole micro-batch. A single chunk is not: its logits would be recomputed for the same peak.
    Under ZeRO-3 each lm_head call (and its recomputation) gathers the weight collectively, so every
    rank runs the busiest rank's number of chunks, the surplus ones empty.
    """
    h = hidden_states(model.model, batch)  # (B, L, H)
    rows, cols = completion_positions(batch)
    h = h[rows, cols]  # (N, H)
    targets = batch["completion_ids"][batch["completion_mask"]]  # (N,)
    n_chunks = -(-h.shape[0] // chunk_size)
    if zero3_sharded(model.lm_head.parameters()):
        n_chunks = all_max(n_chunks)
    logps, ents = [], []
    for s in range(0, n_chunks * chunk_size, chunk_size):
        args = (
            h[s : s + chunk_size],
            targets[s : s + chunk_size],
            model.lm_head,
            temperature,
            banned_ids,
            with_entropy,
            entropy_grad,
        )
        if torch.is_grad_enabled() and n_chunks > 1:
            lp, ent = checkpoint(_token_logp, *args, use_reentrant=False)
        else:
            lp, ent = _token_logp(*args)
        logps.append(lp)
        ents.append(ent)
    mask = batch["completion_mask"]
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, torch.cat(logps))
    if not with_entropy:
        return logp
    entropy = torch.zeros_like(logp).masked_scatter(mask, torch.cat(ents))
    return logp, entropy


def sequence_values(critic: Critic, batch) -> torch.Tensor:
    """Values (B, Tc) of the states in which each completion token is chosen; padding holds 0."""
    h = hidden_states(critic.backbone, batch)
    rows, cols = completion_positions(batch)
    v = critic.value_head(h[rows, cols]).squeeze(-1).float()  # (N,)
    mask = batch["completion_mask"]
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, v)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


MASTER_FILE = "master_weights.safetensors"  # exact weights beside an HF copy written in a narrower dtype


def load_weights(path: str, model, critic: Optional[Critic] = None) -> None:
    """Load a `save_checkpoint` dir's weights (safetensors only) into `model` (and `critic`) in place:
    its MASTER_FILE where there is one (resume stays exact when the HF copy is bf16), else the HF
    weights, whose names transformers maps back to the module's; every one must fit."""
    from safetensors.torch import load_file, load_model

    if os.path.isfile(os.path.join(path, MASTER_FILE)):
        load_model(model, os.path.join(path, MASTER_FILE))  # strict; restores the tied alias save_model dropped
    else:
        loaded = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype, use_safetensors=True)
        model.load_state_dict(loaded.state_dict())
    if critic is not None:
        critic.load_state_dict(load_file(os.path.join(path, "critic.safetensors")))


def cpu_state_dict(model, dtype: Optional[torch.dtype] = None) -> dict:
    """`model`'s state dict on the CPU, floating tensors in `dtype` (None: as they are). One copy per
    storage, so tied weights (the 3B's lm_head and embeddings) stay one tensor that save_pretrained
    writes once."""
    copies, out = {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key not in copies:
            cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
            copies[key] = t.detach().to("cpu", cast).contiguous()
        out[name] = copies[key]
    return out


def save_checkpoint(path: str, model, tokenizer, image_processor, critic: Optional[Critic] = None,
                    dtype: Optional[torch.dtype] = None) -> None:  # fmt: skip
    """A directory `from_pretrained` loads: safetensors weights, config, tokenizer, image processor,
    and the model's identity (`model_identity`) where load_policy gave it one.
    Weights are written in `dtype` (model.dtype, the compute dtype: a 3B is ~7 GB in bf16 where its
    fp32 master weights are ~14 GB), or as they are with None; config.json says which."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, state_dict=cpu_state_dict(model, dtype))
    if dtype is not None:  # save_pretrained recorded the parameters' dtype, not the file's
        config = copy.deepcopy(model.config)
        config.dtype = dtype
        config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if image_processor is not None:
        image_processor.save_pretrained(path)
    if critic is not None:
        from safetensors.torch import save_file

        save_file(cpu_state_dict(critic), os.path.join(path, "critic.safetensors"))
    if getattr(model, "lmm_r1_identity", None) is not None:
        with open(os.path.join(path, IDENTITY_FILE), "w") as f:
            json.dump(model.lmm_r1_identity, f, indent=1)


def save_master_weights(path: str, model, dtype: Optional[torch.dtype]) -> None:
    """The training state's copy of `model`'s weights (MASTER_FILE in a save_checkpoint dir), where
    they are wider than the HF copy in `dtype`: the fp32 master weights of a run without DeepSpeed,
    which resume loads. Under DeepSpeed with bf16 the module is bf16 and DeepSpeed's own checkpoint
    holds the fp32 masters, so nothing is written."""
    if dtype is None or all(p.dtype == dtype for p in model.parameters()):
        return
    from safetensors.torch import save_model

    save_model(model, os.path.join(path, MASTER_FILE))  # tied weights once
