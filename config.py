"""Typed schema of every config key, registered with Hydra's ConfigStore.

Each field carries its default and a one-line meaning. Because the schema is the base of
conf/config.yaml, a misspelt key (`trainer.lrr=1`) or a wrong type (`trainer.lr=abc`) fails at
start-up, before any model is loaded; a key added with `+` (`+trainer.lrr=1`, which Hydra accepts)
fails in `validate`, naming the nearest valid key. Cross-field rules that types cannot express live in
`validate(cfg)`, also called at start-up.
"""

import difflib
import os
import typing
from dataclasses import dataclass, field, is_dataclass
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which keys and why."""


class Choice(str, Enum):
    """A string-valued enum: compares equal to its string, prints as its value."""

    def __str__(self) -> str:
        return self.value


class Estimator(Choice):
    grpo = "grpo"  # group mean / std
    dr_grpo = "dr_grpo"  # group mean only (Dr. GRPO; pair with loss_agg=seq_mean_token_sum_norm)
    rloo = "rloo"  # leave-one-out group mean
    reinforce_baseline = "reinforce_baseline"  # group mean, then whitening over the batch (REINFORCE++-baseline)
    gae = "gae"  # PPO: a learned value model and generalised advantage estimation


class Shuffle(Choice):
    sample = "sample"  # mini-batches of samples drawn at random: a group's samples spread over the mini-batches
    group = "group"  # of whole groups: each mini-batch holds group_size samples of each of its prompts


# online: MageBench's, one action a turn from a frame of the game (the only setting it has for Football);
# global: ours, not MageBench's, one plan from the start frame (rows from football.py build). (The functional
# form: `global` is a keyword, and OmegaConf reads an enum by its member's name.)
FootballSetting = Choice("FootballSetting", {"online": "online", "global": "global"})


class FootballSubset(Choice):
    mini = "mini"  # MageBench's Football_mini.json: 20 scenarios, as its official runs
    all = "all"  # the 108


class Render(Choice):
    seen = "seen"  # only the frames the model sees (the pixels of rendering every step, far fewer renders)
    every = "every"  # every engine step, as MageBench does (slow on CPU: 0.3-1.8 s a step)


class LossAgg(Choice):
    token_mean = "token_mean"  # every completion token of the mini-batch weighs the same
    seq_mean_token_mean = "seq_mean_token_mean"  # mean over each sequence's tokens, then over sequences
    seq_mean_token_sum_norm = "seq_mean_token_sum_norm"  # token sum / max_new_tokens, mean over sequences (Dr. GRPO)
    # token mean within chunks of algo.loss_chunk consecutive sequences, mean over the chunks: LMM-R1's
    # loss (a masked mean per micro-batch of micro_train_batch_size, averaged by gradient accumulation)
    chunk_token_mean = "chunk_token_mean"


class KLEstimator(Choice):
    k1 = "k1"  # logp - ref_logp
    k2 = "k2"  # (logp - ref_logp)^2 / 2
    k3 = "k3"  # exp(ref_logp - logp) - (ref_logp - logp) - 1, unbiased and >= 0


class DataSource(Choice):
    files = "files"  # data.train_files in LMM-R1's row format
    synthetic = "synthetic"  # generated on the fly (tiny preset, tests)


class Synthetic(Choice):
    arithmetic = "arithmetic"  # text-only: "What is 12 + 7?"
    shapes = "shapes"  # image of shapes: "How many circles are there?"
    geometry = "geometry"  # image of a rectangle on a unit grid: "What is its area?"
    sokoban = "sokoban"  # image of a small Sokoban level: answer the move list


class Dtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"


class Engine(Choice):
    hf = "hf"  # transformers generate: CPU, tests, debugging
    vllm = "vllm"  # vLLM, colocated on the training GPU(s): production


class WandbMode(Choice):
    offline = "offline"  # write to the run dir; `wandb sync` later
    online = "online"
    disabled = "disabled"


@dataclass
class TinyModelConfig:
    """Sizes of the Qwen2.5-VL that model=tiny builds (real classes, tiny widths), and its warm start."""

    vocab_size: int = 512  # byte-level BPE vocabulary trained locally, Qwen's special tokens included
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # heads 32 wide: the narrowest vLLM's CPU attention takes (debug=tiny on vllm)
    num_key_value_heads: int = 1
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_num_heads: int = 2
    # a short supervised pass on the synthetic tasks' worked solutions before RL (model.warm_start),
    # cached per machine: the random model never answers in LMM-R1's format, the warm-started one
    # sometimes does, so the real verifiers' rewards have something to rise from. 0 = random weights.
    warm_start_steps: int = 300
    warm_start_lr: float = 3e-3
    # the warm start's own seed (its init, data and batches), not trainer.seed: like a pretrained
    # checkpoint it is one model per machine, whatever the run's seed, and is built once
    warm_start_seed: int = 0


@dataclass
class ModelConfig:
    name: str = "qwen2_5_vl_3b"  # which model/ preset this is
    # local dir, or hub id looked up in the local hub cache; null = the tiny model (model.tiny)
    path: Optional[str] = "Qwen/Qwen2.5-VL-3B-Instruct"
    dtype: Dtype = Dtype.bfloat16  # parameter dtype for training and generation
    # the vision tower's transformers attention: sdpa | eager | flash_attention_2. The language model
    # always runs model.varlen_attention (flash-attn's varlen kernel where installed, exact SDPA otherwise)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    freeze_vision: bool = False  # keep the vision tower and merger fixed
    trust_remote_code: bool = False  # let a checkpoint run its own Python code (off: only transformers' classes)
    min_pixels: int = 3136  # images are resized so that min_pixels <= H*W <= max_pixels (multiples of 28)
    max_pixels: int = 1003520
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class TrainerConfig:
    seed: int = 42  # every RNG (data order, sampling, init) is derived from (seed, step, index)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    # rank processes `python train.py` starts itself (torch's elastic launcher, as torchrun --standalone):
    # auto = one per visible GPU (1 on a CPU), or a number; under torchrun or SLURM their ranks rule
    devices: str = "auto"
    threads: int = 0  # torch's intra-op CPU threads in this process; 0: torch's own (OMP_NUM_THREADS, else a core each)
    lr: float = 1e-6  # actor learning rate
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03  # linear warmup over this fraction of optimizer steps
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm (0 = no clipping)
    zero_stage: int = 0  # 0: plain PyTorch (data parallel by gradient all-reduce) | 1, 2, 3: DeepSpeed ZeRO
    memory_check: bool = True  # on GPUs: stop at start-up a run whose memory plan exceeds a GPU's free memory
    offload: str = "none"  # DeepSpeed: none | optimizer (states to CPU; ZeRO-2/3) | all (ZeRO-3: parameters too)
    episodes: int = 1  # passes over the prompt set (when max_steps <= 0)
    max_steps: int = -1  # RL steps (rollout + update); <= 0 means derived from episodes
    mini_batch_size: int = 256  # samples (completions) per optimizer step
    packing: bool = True  # pack sequences into padding-free micro-batches of max_tokens_per_micro tokens
    max_tokens_per_micro: int = 16384  # token budget (prompt + completion) of a packed micro-batch
    # a packed micro-batch holds each prompt once, followed by its samples' completions, each attending
    # to the prompt and itself (model.pack): the prompt's tokens and images go through each pass once
    # per group instead of group_size times; exact (tests/test_packing.py). false: a prompt per sample
    share_prompts: bool = True
    # how the step's samples are dealt into mini-batches each PPO epoch (with share_prompts the
    # forward-only passes share every group whole; the update shares a prompt only within a mini-batch).
    # sample: LMM-R1's (and OpenRLHF's) per-sample shuffle, the default; group: whole groups per
    # mini-batch, the update 1.26-1.33x faster at debug=tiny with the same rewards within seed noise.
    # sample stays the default because the stage-learning runs (4 seeds each, bench/RESULTS.md) put
    # group's smallest verifier gaps below sample's: fre_multi's math 0.064 vs 0.118, fre_text's 0.037
    # vs 0.058 (other seeds higher, so not a shown loss either). Try group where the update dominates.
    shuffle: Shuffle = Shuffle.sample
    micro_batch_size: int = 2  # samples per padded micro-batch (packing=false)
    logp_chunk_size: int = 1024  # tokens per lm_head chunk when computing log-probs
    save_every: int = 20  # save the full training state every N steps (0 = only at the end)
    keep_last: int = 2  # step checkpoints kept in the run dir (older ones are deleted)
    resume_from: Optional[str] = None  # a checkpoints/step_N dir (or a run dir) to continue; a run dir's own is used by default
    max_bad_steps: int = 3  # stop after this many steps in a row whose updates had non-finite loss or gradients


@dataclass
class RolloutConfig:
    engine: Engine = Engine.hf  # generation engine
    prompts_per_step: int = 256  # prompts sampled per RL step
    group_size: int = 16  # completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    max_new_tokens: int = 4096  # completion budget; longer completions are truncated
    micro_batch_size: int = 64  # sequences per batched decode (hf)
    logprobs: bool = True  # engines return the sampled tokens' log-probs (rollout/logp_diff, algo.tis_clip)
    gpu_memory_utilization: float = 0.5  # vllm: share of GPU memory (on CPU: of RAM) for its weights and KV cache
    kv_cache_gb: Optional[float] = None  # vllm: KV cache size in GiB; null = what gpu_memory_utilization leaves
    enforce_eager: bool = False  # vllm: no torch.compile / CUDA graphs (faster start-up, slower decoding)
    tensor_parallel_size: int = 1  # vllm: GPUs per engine; only 1 (validate says why): one engine per rank
    enable_sleep: bool = True  # vllm: free its memory while training, wake it to sample
    enable_prefix_caching: bool = True  # vllm: a group's G samples share the prompt's KV cache
    # each logit minus this x the times its token is already in the completion (as vLLM); evaluation sets it
    # (eval.football); in training the sampler's log-probs would include it, the trainer's not
    frequency_penalty: float = 0.0
    sync_bucket_mb: int = 512  # vllm: weights are pushed in buckets of about this many MB


@dataclass
class AlgoConfig:
    estimator: Estimator = Estimator.grpo
    whiten_advantages: Optional[bool] = None  # null = the estimator's own rule (on for reinforce_baseline and gae)
    ppo_epochs: int = 1  # passes over each rollout batch
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # > clip_low = clip-higher (DAPO)
    dual_clip: Optional[float] = None  # c > 1: bound the loss of negative-advantage tokens by c * |A|
    loss_agg: LossAgg = LossAgg.token_mean
    loss_chunk: int = 2  # chunk_token_mean: sequences per chunk (1 = seq_mean_token_mean; the mini-batch = token_mean)
    kl_coef: float = 0.001  # 0 = no reference model is loaded
    kl_estimator: KLEstimator = KLEstimator.k3
    kl_in_reward: bool = False  # true: -kl_coef * KL per token is added to the reward; false: to the loss
    gamma: float = 1.0  # discount (gae)
    lam: float = 1.0  # GAE lambda
    value_clip: float = 0.2  # value-loss clipping around the rollout-time values (gae)
    critic_lr: float = 9e-6  # value model learning rate (gae; same warmup and cosine as the actor)
    eps: float = 1e-6  # added to std before dividing
    # truncated importance sampling: weight each token's loss by min(exp(logp_trainer - logp_sampler),
    # tis_clip), correcting for the sampler (vLLM) and trainer disagreeing; null = off
    tis_clip: Optional[float] = None
    std_normalize: bool = True  # grpo: divide by the group's std (false: centring only, as Dr. GRPO)
    kl_target: Optional[float] = None  # adaptive KL: steer kl_coef toward this KL per token (PPO's controller); null = fixed
    kl_horizon: int = 10000  # adaptive KL: samples over which the coefficient may change by ~e
    entropy_coef: float = 0.0  # > 0: an entropy bonus, - entropy_coef * entropy in the loss
    mask_truncated: bool = False  # DAPO: completions cut at rollout.max_new_tokens take no part in the loss
    overlong_buffer: int = 0  # DAPO's soft overlong punishment over the last N tokens before max_new_tokens (0 = off)
    overlong_penalty: float = 1.0  # ... reaching -overlong_penalty at max_new_tokens
    dynamic_sampling: bool = False  # DAPO: replace groups whose rewards all agree with freshly sampled ones
    max_sampling_rounds: int = 3  # dynamic sampling: rollout rounds per step at most (then all-equal groups stay)
    critic_path: Optional[str] = None  # gae: the value model's backbone from this checkpoint (default: a copy of the policy's)


@dataclass
class RewardConfig:
    # reward name -> weight (set by the stage); names from rewards.REWARDS or module:function
    weights: Dict[str, float] = field(default_factory=dict)
    # wall-clock limit of one verification; past it the worker is killed and the completion scores 0
    timeout_s: float = 2.0
    workers: int = 0  # verifier processes; 0: one per CPU core (at most 8)


@dataclass
class DataConfig:
    source: DataSource = DataSource.files
    train_files: List[str] = field(default_factory=list)  # LMM-R1-format rows: .jsonl/.json/.parquet files, save_to_disk dirs
    # where image archives were extracted (a directory or a list): a row's image path that does not
    # exist is looked up under it by its trailing components, so LMM-R1's files load as downloaded
    image_root: Optional[Any] = None
    synthetic: Synthetic = Synthetic.arithmetic  # generator used when source=synthetic
    num_synthetic: int = 256  # synthetic rows generated
    image_size: int = 112  # synthetic image side in pixels
    system_prompt: Optional[str] = None  # prepended when a row has no system message; null = LMM-R1's math prompt
    max_prompt_len: int = 4096  # prompt tokens after image-token expansion; longer rows are bad rows
    max_samples: int = -1  # use at most this many rows (-1 = all)
    on_error: str = "raise"  # raise: stop at the first bad row, naming file and line | skip: skip, count and report
    shuffle: bool = True


@dataclass
class LogConfig:
    wandb: WandbMode = WandbMode.offline
    project: str = "lmm-r1"
    samples_every: int = 1  # write samples.jsonl every N steps (0 = never)
    samples_per_step: int = 4  # completions written each time
    progress: bool = True  # tqdm progress bar on a terminal; elsewhere (a log file, SLURM) a line every print_every steps
    print_every: int = 10


@dataclass
class ClusterConfig:
    """Where runs go. cluster=local: this machine. cluster=slurm: Hydra's submitit launcher renders
    these into sbatch options (one task, a training rank, per GPU unless tasks_per_node says
    otherwise; SIGUSR2 before the time limit for a checkpoint and a requeue)."""

    name: str = "local"
    partition: Optional[str] = None  # sbatch --partition
    account: Optional[str] = None  # sbatch --account
    qos: Optional[str] = None  # sbatch --qos
    nodes: int = 1  # sbatch --nodes
    gpus_per_node: int = 8  # sbatch --gpus-per-node (0 on a partition without GPUs)
    tasks_per_node: Optional[int] = None  # sbatch --ntasks-per-node, training ranks; null = gpus_per_node, or 1 without GPUs
    cpus_per_task: int = 10  # sbatch --cpus-per-task
    mem_gb: Optional[int] = None  # sbatch --mem, per node
    timeout_min: int = 2880  # sbatch --time
    max_requeues: int = 20  # requeues after preemption or the time limit (each resumes from the run dir)
    signal_delay_s: int = 600  # SIGUSR2 this long before the limit: time to finish a step and checkpoint


@dataclass
class JudgeConfig:
    """An LLM that only extracts each response's final answer (any OpenAI-compatible endpoint); the
    rules still decide right or wrong. Off unless url is set; results say which scoring was used."""

    url: Optional[str] = None  # e.g. http://localhost:8000/v1 (vLLM serve) or https://api.openai.com/v1
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (if the endpoint needs one)
    timeout_s: float = 60.0


@dataclass
class FootballEvalConfig:
    """eval.py's `football` benchmark. The Online defaults are MageBench's official run
    (scripts/experiments/Football/*.sh: --resolution 1280 --temperature 0.1 --max_image 1 --repeat 10
    --max_tokens 1000 --max_memory 5 --max_loop 400; its defaults top_p 0.95, frequency_penalty 1.0)."""

    setting: FootballSetting = FootballSetting.online
    subset: FootballSubset = FootballSubset.mini  # online; eval.max_items takes its first N scenarios
    repeats: int = 10  # online: episodes per scenario, repeat r's engine seeded from eval.seed (football.scenario_seed)
    workers: int = 4  # online: gfootball processes, each playing one episode at a time; their turns share one generate
    render: Render = Render.seen
    max_turns: int = 400  # online: turns per episode, a parse error's included
    max_memory: int = 5  # online: exchanges of history kept (the last 2 * max_memory messages)
    max_images: int = 1  # online: images kept in the history (the newest)
    resolution: int = 1280  # online: frames resized to this longest side before the model's processor (1280: as rendered)
    temperature: float = 0.1  # online sampling
    top_p: float = 0.95
    max_tokens: int = 1000
    frequency_penalty: float = 1.0  # MageBench's default, sent to the vLLM server with every request


@dataclass
class EvalConfig:
    benchmarks: List[str] = field(
        default_factory=lambda: ["mathvista", "mathverse", "mathvision", "olympiadbench", "mmstar", "math500", "gpqa", "sokoban"]
    )
    data_dir: str = "data/eval"  # <data_dir>/<benchmark>/<public file>: see eval.py and scripts/get_benchmarks.md
    predictions: Optional[str] = None  # a dir of <benchmark>.jsonl ({"id", "prediction"}) to score instead of generating
    max_new_tokens: int = 4096  # greedy generation budget
    max_items: int = -1  # first N items of each benchmark (-1 = all)
    seed: int = 0  # GPQA's option shuffle; Football's engine seeds and sampling
    football: FootballEvalConfig = field(default_factory=FootballEvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    every: int = 0  # train.py: evaluate every N steps on eval.benchmarks (eval.max_items each), log eval/*; 0 = never


@dataclass
class StageConfig:
    name: str = "fre_text"  # fre_text | fre_multi | mgt_geo | mgt_percereason | mgt_sokoban


@dataclass
class Config:
    stage: StageConfig = field(default_factory=StageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)


ConfigStore.instance().store(name="schema", node=Config)
# conf/cluster/slurm.yaml: cluster.tasks_per_node, else one rank per GPU, else one task (CPU-only jobs)
OmegaConf.register_new_resolver("tasks_per_node", lambda tasks, gpus: tasks if tasks is not None else max(gpus, 1), replace=True)
# and this code's dir, which a SLURM job needs on its path to unpickle the task (submitted from anywhere)
OmegaConf.register_new_resolver("code_dir", lambda: os.path.dirname(os.path.abspath(__file__)), replace=True)


def unknown_keys(node: DictConfig, schema: type = Config, prefix: str = "") -> List[str]:
    """Keys of `node` that `schema` does not define, each with the nearest one it does. Hydra lets
    `+trainer.lrr=1` add a key to the typed schema (its own hint for a typo); nothing would read it.
    Dict-typed fields (reward.weights) are the extension points: any key."""
    fields = typing.get_type_hints(schema)
    out = []
    for key in node.keys():
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            out.append(f"{prefix}{key}" + (f" (did you mean {prefix}{near[0]}?)" if near else ""))
        elif is_dataclass(fields[key]) and isinstance(node[key], DictConfig):
            out += unknown_keys(node[key], fields[key], f"{prefix}{key}.")
    return out


def reject_unknown_keys(cfg: DictConfig) -> None:
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError("unknown config keys, nothing would read them:\n  " + "\n  ".join(unknown))


def validate(cfg: Any) -> None:
    """Rules across keys that the types cannot state; raises ConfigError naming the keys."""
    reject_unknown_keys(cfg)
    errors = []
    r, t, a = cfg.rollout, cfg.trainer, cfg.algo
    if r.group_size < 2 and a.estimator != Estimator.gae:
        errors.append(f"rollout.group_size={r.group_size}: group baselines need at least 2 completions per prompt")
    samples = r.prompts_per_step * r.group_size
    if samples % t.mini_batch_size:
        errors.append(
            f"trainer.mini_batch_size={t.mini_batch_size} must divide rollout.prompts_per_step * rollout.group_size = {samples}"
        )
    if t.shuffle == Shuffle.group and t.mini_batch_size % r.group_size:
        errors.append(
            f"trainer.shuffle=group: trainer.mini_batch_size={t.mini_batch_size} must be a multiple of rollout.group_size={r.group_size}"
        )
    if t.zero_stage not in (0, 1, 2, 3) or t.offload not in ("none", "optimizer", "all"):
        errors.append(f"trainer.zero_stage={t.zero_stage} must be 0-3 and trainer.offload={t.offload} none|optimizer|all")
    elif t.offload != "none" and t.zero_stage < 2 or t.offload == "all" and t.zero_stage != 3:
        # (ZeRO-1 keeps whole gradients: with offload, their whole fp32 sums stay on the GPU, which
        # ZeRO-2 shards at no cost, so one layout fewer for the memory plan to count)
        errors.append(
            f"trainer.offload={t.offload} needs trainer.zero_stage=2 or 3 ('all': 3); ZeRO-2 shards what ZeRO-1 keeps whole"
        )
    if cfg.eval.max_new_tokens < 1:
        errors.append(f"eval.max_new_tokens={cfg.eval.max_new_tokens} must be >= 1")
    f = cfg.eval.football
    if min(f.repeats, f.workers, f.max_turns, f.max_memory, f.max_images, f.resolution, f.max_tokens) < 1:
        errors.append(
            "eval.football: repeats, workers, max_turns, max_memory, max_images, resolution and max_tokens must be >= 1"
        )
    if t.keep_last < 1 or t.max_bad_steps < 1:
        errors.append(f"trainer.keep_last={t.keep_last} and trainer.max_bad_steps={t.max_bad_steps} must be >= 1")
    if t.max_tokens_per_micro < 1:
        errors.append(f"trainer.max_tokens_per_micro={t.max_tokens_per_micro} must be >= 1")
    if t.micro_batch_size > t.mini_batch_size:
        errors.append(f"trainer.micro_batch_size={t.micro_batch_size} > trainer.mini_batch_size={t.mini_batch_size}")
    if not 0 <= a.clip_low < 1 or a.clip_high < 0:
        errors.append(f"algo.clip_low={a.clip_low} must be in [0, 1) and algo.clip_high={a.clip_high} >= 0")
    if a.dual_clip is not None and a.dual_clip <= 1:
        errors.append(f"algo.dual_clip={a.dual_clip} must be > 1 (or null)")
    if a.kl_target is not None and (a.kl_target <= 0 or a.kl_coef <= 0):
        errors.append(f"algo.kl_target={a.kl_target} needs a positive target and algo.kl_coef > 0 to adapt")
    if a.overlong_buffer < 0 or a.overlong_buffer >= r.max_new_tokens or a.max_sampling_rounds < 1:
        errors.append("algo.overlong_buffer must be in [0, rollout.max_new_tokens) and algo.max_sampling_rounds >= 1")
    if a.kl_coef < 0:
        errors.append(f"algo.kl_coef={a.kl_coef} must be >= 0")
    if a.loss_chunk < 1:
        errors.append(f"algo.loss_chunk={a.loss_chunk} must be >= 1 (sequences per chunk of chunk_token_mean)")
    if cfg.data.on_error not in ("raise", "skip"):
        errors.append(f"data.on_error={cfg.data.on_error}: expected raise or skip")
    if not cfg.reward.weights:
        errors.append("reward.weights is empty: name at least one reward")
    if cfg.reward.timeout_s <= 0 or cfg.reward.workers < 0:
        errors.append(f"reward.timeout_s must be > 0 and reward.workers >= 0 (got {cfg.reward.timeout_s}, {cfg.reward.workers})")
    if cfg.data.source == DataSource.files and not cfg.data.train_files:
        errors.append("data.train_files is empty: give LMM-R1 rows (jsonl, parquet, save_to_disk) or data.source=synthetic")
    if a.tis_clip is not None and (a.tis_clip <= 0 or not r.logprobs):
        errors.append(f"algo.tis_clip={a.tis_clip} needs a positive value and rollout.logprobs=true")
    if not 0 < r.gpu_memory_utilization <= 1:
        errors.append(f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} must be in (0, 1]")
    if not (t.devices == "auto" or t.devices.isdigit() and int(t.devices) >= 1):
        errors.append(f"trainer.devices={t.devices}: expected auto or a number of processes >= 1")
    if r.tensor_parallel_size != 1:  # refused, not half-done: no configuration would sample what it says
        errors.append(
            f"rollout.tensor_parallel_size={r.tensor_parallel_size}: only 1 is supported. Each rank samples its own "
            "prompts with its own colocated engine, whose weights the trainer updates in place; vLLM's tensor "
            "parallelism needs the same prompts on every rank of a group (its external launcher) or engine workers "
            "in other processes, out of the weight sync's reach. A 3B (7.5 GB in bf16) fits one GPU: use "
            "rollout.tensor_parallel_size=1 with one rank per GPU (trainer.devices, torchrun)"
        )
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
