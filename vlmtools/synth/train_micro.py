"""Train the micro CLIP of the offline world (``vlmtools-micro``) on generated image-caption pairs.

    python -m vlmtools.synth.train_micro --steps 2400 --batch-size 128 --threads 1 --seed 0

The architecture is vlmtools/configs/vlmtools-micro.json: a small ModifiedResNet image tower at 64 px (a
ViT of the same cost stayed at chance on shape after 1,100 steps, and learned shape several times slower
in a supervised check), and a small text tower with open_clip's standard tokenizer.

Every batch is freshly rendered (uniform random attributes, some near-duplicate hard negatives) and
captioned in varied templates that name attributes, habitat and domain, never a class name. Contrastive
loss (open_clip's ClipLoss), AdamW, linear warmup then cosine decay. Deterministic for a seed on a given
machine and thread count. Checkpoints (fp16 safetensors, written atomically) every --checkpoint-every
steps, so an interrupted run still leaves usable weights; the JSON record holds the settings, time,
loss curve and the final evaluation, which is also printed on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from vlmtools.console import info
from vlmtools.formats import atomic_path, write_json
from vlmtools.models import CONFIG_DIR, WEIGHTS_DIR, Encoder, ModelSpec
from vlmtools.synth.world import HARD_NEGATIVE_ATTRIBUTES

MODEL_NAME = "vlmtools-micro"
DEFAULT_OUT = WEIGHTS_DIR / f"{MODEL_NAME}.safetensors"
DEFAULT_RECORD = Path(__file__).parent / "micro_training.json"


def build_model(seed: int):
    import logging

    import open_clip
    import torch

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    return model, open_clip.get_tokenizer(MODEL_NAME)


def save_fp16(model, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").half().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        # one metadata key only: safetensors writes several in random order, and the file must be reproducible
        save_file(state, str(tmp), metadata={"model": MODEL_NAME})
        tmp.chmod(0o644)  # mkstemp makes 0600 files; shipped weights are read by everyone


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float):
    """No weight decay on gains, biases, embeddings and the temperature (as CLIP training does)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or "ln" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def evaluate(model, tokenizer, device: str, per_class: int = 30) -> dict:
    from vlmtools.synth.evaluate import evaluate_world

    model.eval()
    encoder = Encoder(ModelSpec(MODEL_NAME, "vlmtools"), model, None, tokenizer, device)
    result = {domain: evaluate_world(encoder, per_class=per_class, domain=domain) for domain in ("photo", "both")}
    model.train()
    return result


def train(args) -> dict:
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(args)
    finally:  # leave the process as we found it (tests call main() in-process)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(args) -> dict:
    import open_clip
    import torch

    from vlmtools.synth.evaluate import images_to_tensor
    from vlmtools.synth.world import caption, sample_batch

    device = args.device
    model, tokenizer = build_model(args.seed)
    previous = None
    if args.init is not None:  # continue from earlier weights (a second cosine cycle, fresh optimizer)
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(str(args.init)).items()})
        previous = json.loads(args.record.read_text()) if args.record.exists() else None
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    rng = np.random.default_rng([args.seed, 3])
    record = {
        "model": MODEL_NAME,
        "command": "python -m vlmtools.synth.train_micro " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "record", "init")),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "record", "init")},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": args.threads, "device": device},
        "steps_done": 0, "seconds": 0.0, "loss_curve": [],
    }
    if args.init is not None:
        record["command"] += f" --init {args.init}"
        record["init"] = {"path": str(args.init), "sha256": _sha256(args.init), "previous_record": previous}
    start = time.time()
    running = None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        images, _, attrs = sample_batch(rng, args.batch_size, 64, "both", args.hard_negatives,
                                        tuple(args.hard_attributes.split(",")))
        texts = tokenizer([caption(rng, a) for a in attrs]).to(device)
        pixels = images_to_tensor(images, model).to(device)
        image_features, text_features, logit_scale = model(pixels, texts)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % args.log_every == 0 or step == 0:
            elapsed = time.time() - start
            record["loss_curve"].append([step + 1, round(loss.item(), 4)])
            info(f"step {step + 1}/{args.steps}  loss {loss.item():.3f} (avg {running:.3f})  "
                 f"lr {optimizer.param_groups[0]['lr']:.2e}  {elapsed / (step + 1):.2f} s/step  {elapsed / 60:.1f} min")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            save_fp16(model, args.out)
            record["steps_done"] = step + 1
            record["seconds"] = round(time.time() - start, 1)
            write_json(args.record, record)
    record["seconds"] = round(time.time() - start, 1)
    info(f"trained {args.steps} steps in {record['seconds'] / 60:.1f} min; evaluating the fp16 weights")
    from safetensors.torch import load_file

    model.load_state_dict({k: v.float() for k, v in load_file(str(args.out)).items()})
    record["eval"] = evaluate(model, tokenizer, device, args.eval_per_class)
    write_json(args.record, record)
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--hard-negatives", type=float, default=0.3)
    p.add_argument("--hard-attributes", default=",".join(HARD_NEGATIVE_ATTRIBUTES),
                   help="comma list the changed attribute of a hard negative is drawn from (repeats weigh more)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--eval-per-class", type=int, default=30, help="held-out images per class in the final eval")
    p.add_argument("--init", type=Path, default=None, help="start from these fp16 weights instead of random "
                   "ones (the previous record, if any, is kept inside the new one)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fp16 safetensors to write")
    p.add_argument("--record", type=Path, default=None, help="JSON training record [default: beside the "
                   "package's training record when --out is the shipped file, else OUT with .json]")
    args = p.parse_args(argv)
    if args.record is None:
        args.record = DEFAULT_RECORD if args.out.resolve() == DEFAULT_OUT.resolve() else args.out.with_suffix(".json")
    record = train(args)
    print(json.dumps(record["eval"]))


if __name__ == "__main__":
    main()
