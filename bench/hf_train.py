"""The transformers side of bench/compare_hf.py: DeepseekV3ForCausalLM train steps, timed.

    python bench/hf_train.py --spec=SPEC.json     # prints `RESULT <json>`

SPEC (written by compare_hf.py, which prints this command) holds the HF config, the
path of the batch (.npz: inputs, targets), the step counts and the settings to run (all
of `SETTINGS` if absent). One model and torch AdamW; per setting (float32, bfloat16
autocast, each also with the model under `torch.compile`, inductor's defaults: its first
warm-up step compiles): warm-up steps, then timed steps of forward, cross entropy,
backward, clipping and the update. torch runs with its defaults (threads, OpenMP
waiting): run it alone, by hand, to check what the bench reports. Never imports
TensorFlow.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import reference_spec, report, time_calls  # noqa: E402

# name -> (bfloat16 autocast, torch.compile)
SETTINGS = {"float32": (False, False), "bf16 autocast": (True, False),
            "float32 + torch.compile": (False, True),
            "bf16 autocast + torch.compile": (True, True)}


def main(argv=None):
    spec = reference_spec(__doc__, argv, SETTINGS)

    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    hf = {k: v for k, v in spec["hf_config"].items() if k != "architectures"}
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    batch = np.load(spec["batch"])
    inputs = torch.from_numpy(batch["inputs"]).long()
    targets = torch.from_numpy(batch["targets"]).long()

    compiled = torch.compile(model)  # compiles at its first call (per autocast state)

    def step(bf16: bool, compile_: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = (compiled if compile_ else model)(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().reshape(-1, hf["vocab_size"]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    names = spec.get("settings") or list(SETTINGS)
    seconds = {name: time_calls(lambda: step(*SETTINGS[name]), spec["steps"], spec["warmup"])
               for name in names}
    report({"seconds": seconds, "threads": torch.get_num_threads(),
            "version": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"{sum(p.numel() for p in model.parameters()):,} parameters"})


if __name__ == "__main__":
    main()
