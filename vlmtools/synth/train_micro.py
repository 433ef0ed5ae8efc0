"""Train a micro CLIP of the offline world (the packaged ``vlmtools-micro*`` models) on generated pairs.

    python -m vlmtools.synth.train_micro --model vlmtools-micro-photo --domains photo \\
        --steps 2400 --batch-size 128 --threads 1 --resume --max-minutes 50

The architecture is the packaged config of ``--model`` (vlmtools/configs/NAME.json). ``vlmtools-micro``
and ``vlmtools-micro-photo`` have a small ModifiedResNet image tower at 64 px (a plain ViT of the same cost
stayed at chance on shape after 1,100 steps, and learned shape several times slower in a supervised
check); ``vlmtools-micro-vit`` is a 6-layer ViT whose patch embedding is a small convolutional stem
(8x8 tokens at 64 px), which learns shape at the ResNet's pace. All use open_clip's standard tokenizer.

Every batch is freshly rendered (uniform random attributes, some near-duplicate hard negatives, some
nuisances: occluders, clutter, smaller objects, noise) and captioned in varied templates that name
attributes, habitat and domain, never a class name. ``--domains photo`` leaves painting images and
painting captions out (the photo-only models, for a real out-of-domain shift). Contrastive loss
(open_clip's ClipLoss), AdamW, linear warmup then cosine decay.

Resumable: every --checkpoint-every steps the full training state (fp32 weights, AdamW moments, the
generator's state, the record so far) goes atomically to the checkpoint file, and the fp16 weights to
OUT, so an interrupted run leaves usable weights; ``--resume`` continues from the checkpoint, and
``--max-minutes`` stops at the first checkpoint after that long, so a run can span sessions. A resumed run
gives the same bytes as an uninterrupted one (same machine and thread count). The JSON record holds the
settings, each run's time, the loss curve and the final evaluation (zero-shot per attribute, per domain),
which is also printed on stdout.
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
from vlmtools.models import (WEIGHTS_DIR, Encoder, ModelSpec, compact_state, create_packaged_model,
                             packaged_configs, packaged_extras)
from vlmtools.synth.world import HARD_NEGATIVE_ATTRIBUTES

DEFAULT_MODEL = "vlmtools-micro"
RECORD_DIR = Path(__file__).parent / "records"
DOMAIN_CHOICES = {"photo": "photo", "photo,painting": "both", "painting,photo": "both"}
EVAL_DOMAINS = ("photo", "painting")
# settings a resumed run must share with the checkpoint (the rest: logging, limits, paths)
RESUME_KEYS = ("model", "domains", "steps", "batch_size", "seed", "lr", "warmup", "weight_decay",
               "hard_negatives", "hard_attributes", "nuisance")


def default_record(out: Path, model: str) -> Path:
    """The package's record for shipped weights; OUT with .json otherwise."""
    if out.resolve() == (WEIGHTS_DIR / f"{model}.safetensors").resolve():
        return RECORD_DIR / f"{model}.json"
    return out.with_suffix(".json")


def default_checkpoint(out: Path, model: str) -> Path:
    """Beside OUT, except for shipped weights: the checkpoint (fp32 + optimizer, ~3x the weights) must not
    land inside the package, so it goes to the user's cache."""
    if out.resolve().parent == WEIGHTS_DIR.resolve():
        import os

        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlmtools" / "train_micro"
        return cache / f"{model}.ckpt.safetensors"
    return out.with_suffix(".ckpt.safetensors")


def save_fp16(model, path: Path, name: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").half().contiguous() for k, v in model.state_dict().items()}
    if packaged_extras(name).get("compact_tokens"):
        state = compact_state(state)
    with atomic_path(path) as tmp:
        # one metadata key only: safetensors writes several in random order, and the file must be reproducible
        save_file(state, str(tmp), metadata={"model": name})
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


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, model, optimizer, step: int, rng: np.random.Generator, record: dict) -> None:
    """Everything a resumed run needs, as safetensors (never a pickle): fp32 weights, AdamW moments, and
    in the metadata the step, the generator's state and the record so far."""
    from safetensors.torch import save_file

    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    adam_steps = {}
    for i, state in optimizer.state_dict()["state"].items():
        tensors[f"adam/{i}/exp_avg"] = state["exp_avg"].contiguous()
        tensors[f"adam/{i}/exp_avg_sq"] = state["exp_avg_sq"].contiguous()
        adam_steps[str(i)] = float(state["step"])
    meta = {"step": step, "rng": rng.bit_generator.state, "adam_steps": adam_steps, "record": record}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})


def load_checkpoint(path: Path, model, optimizer, rng: np.random.Generator) -> tuple[int, dict]:
    """Restore what save_checkpoint wrote into model, optimizer and rng; returns (step, record)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["state"])
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    state = optimizer.state_dict()
    state["state"] = {int(i): {"step": torch.tensor(s), "exp_avg": tensors[f"adam/{i}/exp_avg"],
                               "exp_avg_sq": tensors[f"adam/{i}/exp_avg_sq"]}
                      for i, s in meta["adam_steps"].items()}
    optimizer.load_state_dict(state)
    rng.bit_generator.state = meta["rng"]
    return int(meta["step"]), meta["record"]


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, tokenizer, name: str, device: str, per_class: int = 30) -> dict:
    """Zero-shot on a held-out world, per domain (attributes, class names, oracle descriptors)."""
    from vlmtools.synth.evaluate import evaluate_world

    model.eval()
    encoder = Encoder(ModelSpec(name, "vlmtools"), model, None, tokenizer, device)
    result = {domain: evaluate_world(encoder, per_class=per_class, domain=domain) for domain in EVAL_DOMAINS}
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


def _settings(args) -> dict:
    skip = ("out", "record", "init", "checkpoint", "resume", "max_minutes", "stop_at", "eval_only")
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}


def _machine(args) -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": args.threads, "device": args.device}


def _train(args) -> dict:
    import open_clip
    import torch

    from vlmtools.synth.evaluate import images_to_tensor
    from vlmtools.synth.world import caption, sample_batch

    device = args.device
    model = create_packaged_model(args.model, args.seed)
    tokenizer = open_clip.get_tokenizer(args.model)
    if args.eval_only:
        return _evaluate_only(args, model, tokenizer)
    previous = None
    if args.init is not None:  # continue from earlier weights (a second cosine cycle, fresh optimizer)
        from safetensors.torch import load_file

        from vlmtools.models import expand_state

        state = expand_state(load_file(str(args.init)), model.token_embedding.weight.shape[0])
        model.load_state_dict({k: v.float() for k, v in state.items()})
        previous = json.loads(args.record.read_text()) if args.record.exists() else None
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    rng = np.random.default_rng([args.seed, 3])
    settings = _settings(args)
    first = 0
    if args.resume and args.checkpoint.exists():
        first, record = load_checkpoint(args.checkpoint, model, optimizer, rng)
        before = record["settings"]
        changed = ", ".join(f"{k} {before.get(k)!r}" for k in RESUME_KEYS if before.get(k) != settings.get(k))
        if changed:
            raise SystemExit(f"train_micro: --resume: {args.checkpoint} was trained with other settings "
                             f"({changed}); pass the same ones or another --checkpoint")
        info(f"resuming {args.model} at step {first}/{args.steps} from {args.checkpoint}")
    else:
        record = {
            "model": args.model,
            "command": "python -m vlmtools.synth.train_micro " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in settings.items()),
            "settings": settings,
            "domains": args.domains.split(","),
            "machine": _machine(args),
            "steps_done": 0, "seconds": 0.0, "runs": [], "loss_curve": [],
        }
        if args.init is not None:
            record["command"] += f" --init {args.init}"
            record["init"] = {"path": str(args.init), "sha256": _sha256(args.init), "previous_record": previous}
    run = {"from_step": first, "to_step": first, "seconds": 0.0, "machine": _machine(args)}
    record["runs"].append(run)
    spent = record["seconds"]
    start = time.time()
    running = None
    hard_attributes = tuple(args.hard_attributes.split(","))
    domain = DOMAIN_CHOICES[args.domains]
    step = first
    for step in range(first, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        images, _, attrs = sample_batch(rng, args.batch_size, 64, domain, args.hard_negatives, hard_attributes,
                                        nuisance=args.nuisance)
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
        done = step + 1
        if done % args.log_every == 0 or done == 1:
            elapsed = time.time() - start
            record["loss_curve"].append([done, round(loss.item(), 4)])
            info(f"{args.model} step {done}/{args.steps}  loss {loss.item():.3f} (avg {running:.3f})  "
                 f"lr {optimizer.param_groups[0]['lr']:.2e}  {elapsed / (done - first):.2f} s/step  "
                 f"{elapsed / 60:.1f} min")
        out_of_time = args.max_minutes is not None and time.time() - start > 60 * args.max_minutes
        stop = out_of_time or (args.stop_at is not None and done >= args.stop_at)
        if done % args.checkpoint_every == 0 or done == args.steps or stop:
            run["to_step"], run["seconds"] = done, round(time.time() - start, 1)
            record["steps_done"], record["seconds"] = done, round(spent + time.time() - start, 1)
            save_fp16(model, args.out, args.model)
            save_checkpoint(args.checkpoint, model, optimizer, done, rng, record)
            write_json(args.record, record)
            if stop and done < args.steps:
                info(f"stopped at step {done}/{args.steps} after {(time.time() - start) / 60:.1f} min; "
                     f"rerun with --resume to continue from {args.checkpoint}")
                return record
    info(f"trained {args.steps} steps in {record['seconds'] / 60:.1f} min in all; evaluating the fp16 weights")
    return _finish(args, model, tokenizer, record)


def _finish(args, model, tokenizer, record: dict) -> dict:
    """Evaluate the fp16 weights as shipped (not the fp32 ones), and complete the record."""
    from safetensors.torch import load_file

    from vlmtools.models import expand_state

    state = expand_state(load_file(str(args.out)), model.token_embedding.weight.shape[0])
    model.load_state_dict({k: v.float() for k, v in state.items()})
    if args.eval_per_class > 0:
        record["eval"] = evaluate(model, tokenizer, args.model, args.device, args.eval_per_class)
    record["weights"] = {"bytes": args.out.stat().st_size, "sha256": _sha256(args.out)}
    write_json(args.record, record)
    return record


def _evaluate_only(args, model, tokenizer) -> dict:
    if not args.out.exists():
        raise SystemExit(f"train_micro: --eval-only: {args.out} does not exist")
    record = json.loads(args.record.read_text()) if args.record.exists() else {"model": args.model}
    record["eval_command"] = (f"python -m vlmtools.synth.train_micro --model {args.model} --eval-only "
                              f"--eval-per-class {args.eval_per_class}")
    return _finish(args, model, tokenizer, record)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="packaged config to train (vlmtools/configs/NAME.json)")
    p.add_argument("--domains", default="photo,painting", choices=sorted(DOMAIN_CHOICES),
                   help="domains of the training images and captions (photo: the photo-only models)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--hard-negatives", type=float, default=0.3)
    p.add_argument("--hard-attributes", default=",".join(HARD_NEGATIVE_ATTRIBUTES),
                   help="comma list the changed attribute of a hard negative is drawn from (repeats weigh more)")
    p.add_argument("--nuisance", type=float, default=0.0,
                   help="share of training images given a random nuisance (occluder, clutter, smaller "
                        "object, noise), so the model meets the harder worlds' images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--eval-per-class", type=int, default=30, help="held-out images per class in the final eval (0: no eval)")
    p.add_argument("--init", type=Path, default=None, help="start from these fp16 weights instead of random "
                   "ones (the previous record, if any, is kept inside the new one)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop (checkpointed, resumable) at the first step after this many minutes")
    p.add_argument("--stop-at", type=int, default=None, help="stop (checkpointed, resumable) after this step")
    p.add_argument("--eval-only", action="store_true", help="evaluate OUT and write the eval into the record")
    p.add_argument("--out", type=Path, default=None,
                   help="fp16 safetensors to write [default: the package's weights of --model]")
    p.add_argument("--record", type=Path, default=None, help="JSON training record [default: the package's "
                   "record (vlmtools/synth/records/MODEL.json) when OUT is the shipped file, else OUT with .json]")
    p.add_argument("--checkpoint", type=Path, default=None, help="resumable training state [default: OUT with "
                   ".ckpt.safetensors, or ~/.cache/vlmtools/train_micro/MODEL.ckpt.safetensors for shipped weights]")
    args = p.parse_args(argv)
    if args.model not in packaged_configs():
        p.error(f"--model {args.model}: not a packaged config ({', '.join(packaged_configs())})")
    if args.out is None:
        args.out = WEIGHTS_DIR / f"{args.model}.safetensors"
    if args.record is None:
        args.record = default_record(args.out, args.model)
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint(args.out, args.model)
    record = train(args)
    if "eval" in record:
        print(json.dumps(record["eval"]))


if __name__ == "__main__":
    main()
