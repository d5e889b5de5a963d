"""Build the tiny model's warm start into the cache ($LMM_R1_CACHE or ~/.cache/lmm-r1), as the first
`python train.py debug=tiny` on a machine would; a no-op where it is cached already:

    python scripts/warm_start.py [overrides...]        # default: debug=tiny

.ci/run calls it once, up front, so that every test that runs debug=tiny loads the same file.
"""

import os
import sys

import torch
from hydra import compose, initialize_config_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402,F401  (registers the schema)
from dist import set_cpu_threads  # noqa: E402
from model import load_policy, warm_start_path, warm_start_samples  # noqa: E402

if __name__ == "__main__":
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("config", overrides=sys.argv[1:] or ["debug=tiny"])
    m = cfg.model
    if m.path is not None or m.tiny.warm_start_steps <= 0:
        sys.exit(
            f"error: this config has no warm start (model.path={m.path}, model.tiny.warm_start_steps={m.tiny.warm_start_steps})"
        )
    set_cpu_threads(cfg.trainer.threads)  # as the run would build it: the threads change its rounding
    _, tokenizer, processor = load_policy(m, cfg.trainer.seed, torch.device("cpu"))
    path = warm_start_path(m.tiny, tokenizer, processor, warm_start_samples(m.tiny.warm_start_seed))
    if not os.path.isfile(path):
        sys.exit(f"error: the warm start was built but could not be cached at {path} (see the warning above)")
    print(f"[warm start] {path}")
