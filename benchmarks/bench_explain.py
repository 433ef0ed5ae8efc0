"""Benchmark: saliency maps per second per method, and RISE batched vs a per-mask loop.

Times the library functions `explain visual` runs per image (vlmtools.explain.saliency), on random
images of the model's input size, after one warm-up map:
  gradcam   one forward + backward (similarity to a class text embedding)
  rollout   one forward with attention recomputed per block (ViT towers only)
  rise      --masks masked images, --batch at a time (probability of the class among --classes)
  rise-loop the same masks one at a time (the per-mask loop RISE's reference code amounts to); timed on
            --loop-masks masks and scaled, to keep the run short
Prints one JSON line per (model, method) and the batched/loop ratio.

    python benchmarks/bench_explain.py                                   # vlmtools-micro on CPU
    python benchmarks/bench_explain.py --model ViT-B-32 --pretrained none --device cuda --masks 4000
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vlmtools-micro")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=3, help="maps timed per method")
    ap.add_argument("--masks", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--loop-masks", type=int, default=100)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)

    import torch

    from vlmtools.explain import saliency as S
    from vlmtools.explain.visual import make_judge
    from vlmtools.models import ModelSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelSpec.parse(args.model, args.pretrained)
    judge = make_judge(spec, [f"class {i}" for i in range(args.classes)], ["a photo of a {}."], args.device)
    size = judge.size
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, size, size, generator=gen).to(judge.encoder.device) for _ in range(args.images)]
    sync = (lambda: torch.cuda.synchronize()) if judge.encoder.device.startswith("cuda") else (lambda: None)
    base = {"model": str(spec), "device": judge.encoder.device, "size": size,
            "threads": torch.get_num_threads()}

    def per_second(fn, n):
        fn(images[0])  # warm-up
        sync()
        t0 = time.perf_counter()
        for x in images[:n]:
            fn(x)
        sync()
        return n / (time.perf_counter() - t0)

    t = judge.class_emb[0]
    rates = {"gradcam": per_second(lambda x: S.gradcam(x, judge.cosine_fn(t), judge.tower.cam_layer,
                                                       judge.tower.to_grid), args.images)}
    if judge.tower.kind == "vit":
        rates["rollout"] = per_second(lambda x: S.rollout(judge.tower.attentions(x), size=(size, size)),
                                      args.images)
    fn = judge.prob_fn(0)
    masks = S.rise_masks(args.masks, 7, 0.5, (size, size), 0, judge.encoder.device)
    rates["rise"] = per_second(lambda x: S.rise(x, fn, args.masks, batch=args.batch, mask_tensor=masks),
                               args.images)
    loop_masks = masks[:args.loop_masks]
    loop = per_second(lambda x: S.rise(x, fn, args.loop_masks, batch=1, mask_tensor=loop_masks), 1)
    rates["rise-loop"] = loop * args.loop_masks / args.masks  # maps/s at --masks masks
    for method, rate in rates.items():
        extra = {"masks": args.masks, "batch": args.batch if method == "rise" else 1} if method.startswith("rise") else {}
        print(json.dumps({**base, "method": method, "maps_per_s": round(rate, 3), **extra}))
    print(json.dumps({**base, "rise_batched_over_loop": round(rates["rise"] / rates["rise-loop"], 2)}))


if __name__ == "__main__":
    main()
