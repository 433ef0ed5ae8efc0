"""`vlmtools explain visual` (saliency maps) and `vlmtools eval explanations` (mIoU, insertion, deletion)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from vlmtools.cli.common import DeviceOpt, ModelOpt, PretrainedOpt, handle_errors, subgroup


class Method(str, Enum):
    gradcam = "gradcam"
    rollout = "rollout"
    rise = "rise"
    ala = "ala"


def register(app: typer.Typer) -> None:
    explain_app = subgroup(app, "explain", "Explain predictions.")

    @explain_app.command("visual")
    @handle_errors
    def visual_cmd(
        input: str = typer.Argument(..., help="Predictions JSONL (maps for each \"pred\") or a manifest "
                                    "(maps for the model's own top class)."),
        output: Path = typer.Option(..., "--output", "-o", metavar="DIR", help="Directory for NAME.npy, NAME.png, "
                                    "maps.jsonl and info.json."),
        method: Method = typer.Option(Method.gradcam, "--method", help="gradcam: Grad-CAM of the similarity "
                                      "to the class text; rollout: attention rollout (ViT); rise: random "
                                      "masks; ala: a `train ala` head's attention map"),
        head: Optional[Path] = typer.Option(None, "--head", help="ala: the head from `vlmtools train ala`."),
        cls: Optional[str] = typer.Option(None, "--class", help="Explain this class for every image "
                                          "(default: the predicted class)."),
        classes: Optional[str] = typer.Option(None, "--classes", help="Class list (one per line, a manifest "
                                              "or descriptor JSONL) (default: the input's labels and "
                                              "predictions)"),
        templates: str = typer.Option("photo", "--templates", help="Class prompts: bare | photo | openai80 | "
                                      "FILE"),
        descriptors: Optional[str] = typer.Option(None, "--descriptors", help="Descriptor JSONL: one map per "
                                                  "descriptor of the class (gradcam or rise)"),
        layer: Optional[int] = typer.Option(None, "--layer", help="gradcam: the ViT block (0-based) or ResNet "
                                            "stage (1-4) to hook (default: the last)"),
        cbd: Optional[str] = typer.Option(None, "--cbd", help="Descriptor JSONL: score classes by description "
                                          "(mean similarity to the class's descriptor sentences) instead of "
                                          "class-name prompts, for the maps and for eval's insertion/deletion"),
        masks: int = typer.Option(4000, "--masks", help="rise: number of random masks."),
        cell: int = typer.Option(7, "--cell", help="rise: mask grid cells per side."),
        p: float = typer.Option(0.5, "--p", help="rise: probability that a cell is kept."),
        seed: int = typer.Option(0, "--seed", help="rise: seed of the masks."),
        batch_size: int = typer.Option(64, "--batch-size", help="rise: masked images per forward pass."),
        where: List[str] = typer.Option([], "--where", help="Only images whose KEY=VALUE (repeatable)."),
        limit: int = typer.Option(0, "--limit", help="At most this many images (0: all)."),
        png: bool = typer.Option(True, "--overlays/--no-overlays", help="Also write the overlay PNGs (NAME.png beside NAME.npy)."),
        force: bool = typer.Option(False, "--force", help="Replace the maps of an earlier run in -o (its own "
                                   "files only; default: -o must be new or empty)."),
        model: Optional[str] = ModelOpt,
        pretrained: Optional[str] = PretrainedOpt,
        device: str = DeviceOpt,
    ) -> None:
        """Saliency maps: where the model looked for the class (NAME.npy float16 in [0, 1] + NAME.png)."""
        from vlmtools.console import info
        from vlmtools.explain.visual import VisualOptions, explain_visual

        opts = VisualOptions(method=method.value, masks=masks, cell=cell, p=p, seed=seed, batch=batch_size,
                             layer=layer)
        res = explain_visual(input, output, opts=opts, model=model, pretrained=pretrained, classes=classes,
                             templates=templates, cls=cls, descriptors=descriptors,
                             head=str(head) if head else None, cbd=cbd, where=where, limit=limit or None, png=png,
                             device=device, force=force)
        info(f"wrote {res['maps']} map(s) for {res['images'] - res['failed']} image(s) to {res['out']}")
        if res["failed"]:
            info(f"{res['failed']} image(s) could not be read: see {res['out']}/errors.jsonl")
            raise typer.Exit(2 if res["failed"] == res["images"] else 1)  # 2: none could be read

    eval_app = subgroup(app, "eval", "Evaluate predictions.", default_command="predictions")

    @eval_app.command("explanations")
    @handle_errors
    def eval_explanations_cmd(
        maps_dirs: List[Path] = typer.Argument(..., metavar="MAPS_DIR", help="Maps directories from `vlmtools explain visual` "
                                               "(several: e.g. one per RISE seed; mean ± std over them)."),
        manifest: str = typer.Option(..., "--manifest", help="Manifest with a \"mask\" per image."),
        threshold: str = typer.Option("0.5", "--threshold", metavar="0.5|T|mean+std", help="mIoU: salient pixels. 0.5: the map as an "
                                      "8-bit grey image > 127 (the ALA authors' compute_miou.py); T: grey > "
                                      "floor(255·T); mean+std: above the map's mean + one std."),
        step: Optional[int] = typer.Option(None, "--step", metavar="PIXELS", help="Insertion/deletion: pixels changed per step "
                                           "(default ceil(H·W/224) of the model's input: RISE's 224 at 224²)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Coarser: about N steps instead of --step "
                                            "(faster; not the study's protocol)."),
        causal: bool = typer.Option(True, "--causal/--no-causal", help="Insertion, deletion and ID score "
                                    "(needs the model); --no-causal: mIoU only."),
        scorer: str = typer.Option("own", "--scorer", metavar="own|clip", help="Who scores insertion/deletion: own (each map's "
                                   "model: an ALA head for ala maps, the CLIP classifier it explained for the "
                                   "others) or clip (every map by the CLIP classifier of its info.json)."),
        blur: str = typer.Option("11,5", "--blur", metavar="KLEN,SIGMA|0", help="Insertion canvas: KLEN,SIGMA of RISE's gkern, zero "
                                 "padded (default 11,5: RISE's), or 0 for none."),
        descriptors: bool = typer.Option(False, "--descriptors", help="Grounding: score the per-descriptor "
                                         "maps (explain visual --descriptors) against the region each names: "
                                         "object descriptors the mask, background ones its complement."),
        output: str = typer.Option("-", "--output", "-o", help="Per-map JSONL (default stdout)."),
        summary: Optional[str] = typer.Option(None, "--summary", help="Also write the summary JSON here."),
        batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
        device: str = DeviceOpt,
    ) -> None:
        """Saliency maps against object masks (mIoU) and by insertion/deletion (ID score).

        mIoU binarises each map as the ALA authors do (8-bit grey > 127); insertion and deletion are RISE's
        CausalMetric, scored by the model that made the map; ID score = insertion - deletion. With
        --descriptors: how often each descriptor's map lands on the region it names. Per-map JSONL on
        stdout (or -o), the table on stderr."""
        from vlmtools.explain.visual import EvalOptions, evaluate_maps, summary_table

        opts = EvalOptions(threshold=threshold, step=step, steps=steps, blur=blur, scorer=scorer, causal=causal,
                           descriptors=descriptors, batch=batch_size)
        res = evaluate_maps([str(d) for d in maps_dirs], manifest, opts=opts, output=output, summary_out=summary,
                            device=device)
        summary_table(res)

    from vlmtools.cli.train import (JsonOpt, PatienceOpt, PlotsOpt, SeedOpt,
                                    ValFractionOpt, ValWhereOpt, WeightDecayOpt, WhereOpt, emit, fit_options)

    train_app = subgroup(app, "train", "Train heads.")

    @train_app.command("ala")
    @handle_errors
    def train_ala_cmd(
        manifest: str = typer.Argument(..., help="Manifest of labelled images (`vlmtools data`, `synth make`)."),
        output: str = typer.Option(..., "--output", "-o", metavar="HEAD", help="The head to write: NAME (NAME.json + "
                                   "NAME.safetensors)."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Tower layers the side branch reads, "
                                             "e.g. 0,2,4 (ResNet: 0 = stem, 1-4 = stages; ViT: blocks) "
                                             "(default: every layer, as the study; the last always)"),
        cache: Optional[Path] = typer.Option(None, "--cache", help="Feature cache directory (default: "
                                             "NAME.features beside the head); reused and resumed."),
        d_model: int = typer.Option(64, "--d-model", help="Side branch width."),
        heads: int = typer.Option(4, "--heads", help="Attention heads per side branch layer."),
        grid: Optional[int] = typer.Option(None, "--grid", help="Side of the attention lattice (default: "
                                           "the tower's token grid, e.g. 7 for ViT-B/32 at 224; ResNet: the "
                                           "finest chosen stage's)."),
        lam: float = typer.Option(1.0, "--lam", help="Weight λ of the attention branch's loss."),
        aea: bool = typer.Option(True, "--aea/--no-aea", help="Alternative Epoch Architect: freeze the "
                                 "side and attention branches every other epoch."),
        where: List[str] = WhereOpt,
        val_where: List[str] = ValWhereOpt,
        val_fraction: Optional[float] = ValFractionOpt,
        epochs: int = typer.Option(20, "--epochs", help="Most epochs to train (early stopping may end sooner)."),
        lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
        weight_decay: float = WeightDecayOpt,
        batch_size: int = typer.Option(32, "--batch-size", help="Images per step (0: full batch)."),
        seed: int = SeedOpt,
        patience: int = PatienceOpt,
        device: str = DeviceOpt,
        model: Optional[str] = ModelOpt,
        pretrained: Optional[str] = PretrainedOpt,
        json_: bool = JsonOpt,
        plots: Optional[Path] = PlotsOpt,
    ) -> None:
        """Attention Lattice Adapter (study 003) on the frozen image tower.

        A side branch over every tower layer at its token grid, an attention branch (the map α′ of `explain visual
        --method ala`) and a perception branch; loss CE(PB) + λ·CE(AB), the Alternative Epoch Architect.
        The tower's features are cached once (--cache), so epochs do not rerun it."""
        from vlmtools.errors import BadInput
        from vlmtools.heads.ala import train_ala

        chosen = None
        if layers is not None:
            try:
                chosen = [int(v) for v in layers.split(",") if v.strip()]
            except ValueError:
                raise BadInput(f"--layers {layers!r}: expected comma-separated layer numbers") from None
        options = fit_options(epochs, lr, weight_decay, batch_size, seed, patience, device)
        summary = train_ala(manifest, output, options=options, layers=chosen, cache=cache, where=where,
                            val_where=val_where, val_fraction=val_fraction, d_model=d_model, heads=heads, grid=grid,
                            lam=lam, aea=aea, model=model, pretrained=pretrained)
        emit(summary, json_, plots)
        if summary["unreadable_images"]:  # as explain visual: some images failed, the rest were used
            from vlmtools.console import error

            error(f"{summary['unreadable_images']} image(s) could not be read and were left out of training "
                  f"(see the feature cache's errors.jsonl)")
            raise typer.Exit(1)
