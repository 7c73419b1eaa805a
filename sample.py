"""
Sample from a train.py checkpoint, in the dtype it trained in.

    python sample.py                                   # continue "\n" from out/ckpt.pt
    python sample.py --prompt='def fib(n):' --max_new_tokens=500 --out_dir=out/study/v3

Any checkpoint loads in one process: DDP, FSDP2 and expert-parallel runs save full tensors.
"""
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's optional numpy
import torch

from data import load_checkpoint
from model import GPT
from startup import default_settings, parse_overrides, resolve_device

out_dir = "out"
prompt = "\n"
max_new_tokens = 300
temperature = 0.8            # 0: greedy
top_k = 40
device = "auto"
seed = 1337


@torch.no_grad()
def sample_text(model, text, n_tokens, ctx, temperature=0.8, top_k=40):
    """Continue `text` (bytes vocab) or token 0 (other vocabs: shown as token ids) under the
    autocast ctx of the training run, so that it samples the model that was trained and
    evaluated; eagerly, since every new length would be a new shape for compiled blocks."""
    vocab, dev = model.cfg.vocab_size, model.head.weight.device
    idx = torch.tensor([list(text.encode()) if vocab == 256 else [0]], device=dev)
    with ctx, torch.compiler.set_stance("force_eager"):
        ids = model.generate(idx, n_tokens, temperature, top_k)[0].tolist()
    return bytes(ids).decode("utf-8", errors="replace") if vocab == 256 else str(ids)


def main():
    globals().update(parse_overrides(sys.argv[1:], default_settings(globals())))
    dev = resolve_device(device)
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    model = GPT.from_checkpoint(ckpt).to(dev)
    bf16 = ckpt["config"].get("dtype") == "bfloat16"  # what ran (train.py resolves "auto")
    torch.manual_seed(seed)
    ctx = torch.autocast(dev.split(":")[0], torch.bfloat16, enabled=bf16)
    print(sample_text(model, prompt, max_new_tokens, ctx, temperature, top_k))


if __name__ == "__main__":
    main()
