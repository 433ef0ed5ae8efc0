"""`vlmtools embed images|text`: inputs -> open_clip embeddings in a sharded store."""

from __future__ import annotations

from typing import Literal, Optional

import typer

from vlmtools.cli.common import DeviceOpt, ModelOpt, Precision, PrecisionOpt, PretrainedOpt, handle_errors

embed_app = typer.Typer(help="Embed images or texts into a store (sharded NPY + JSONL meta + info.json).",
                        no_args_is_help=True)

OutOpt = typer.Option(..., "--output", "-o", metavar="STORE", help="Store directory to write (resumed if it exists).")
ShardOpt = typer.Option(10000, "--shard-size", help="Rows per shard (the unit of resume).")
DtypeOpt = typer.Option("float16", "--dtype", help="Stored as float16 (half the disk) or float32 (as "
                        "computed; what the reproduction scripts use).")
RankOpt = typer.Option(None, "--rank", help="This worker's rank (default: $RANK or $SLURM_PROCID or 0).")
WorldOpt = typer.Option(None, "--world-size", help="Number of workers (default: $WORLD_SIZE or $SLURM_NTASKS or 1).")
ForceOpt = typer.Option(False, "--force", help="Rebuild an existing store from scratch (e.g. after the input "
                        "changed); only a store's own files are removed.")
JsonOpt = typer.Option(False, "--json", help="Also print the run summary as one JSON line on stdout.")


def _emit(summary, as_json: bool) -> None:
    if as_json:
        from vlmtools.formats import dumps_line

        typer.echo(dumps_line(summary.as_dict()), nl=False)


@embed_app.command("images")
@handle_errors
def images_cmd(
    manifest: str = typer.Argument(..., help="Manifest JSONL, or bare image paths one per line; '-' for stdin; "
                                   "or webdataset tars, brace-expanded: 'shards/{00000..00099}.tar'."),
    output: str = OutOpt,
    model: Optional[str] = ModelOpt,
    pretrained: Optional[str] = PretrainedOpt,
    device: str = DeviceOpt,
    precision: Precision = PrecisionOpt,
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0,
                                          help="DataLoader worker processes that read and decode images "
                                          "(default: from the core count; 0 = in the main process)."),
    decode: Literal["auto", "cpu", "gpu"] = typer.Option("auto", "--decode", help="Where JPEGs are decoded: gpu = batched "
                                  "nvJPEG + tensor preprocessing on the device (other formats per file on the "
                                  "CPU); cpu = PIL in the workers; auto = gpu on a CUDA device."),
    shard_size: int = ShardOpt,
    dtype: Literal["float16", "float32"] = DtypeOpt,
    rank: Optional[int] = RankOpt,
    world_size: Optional[int] = WorldOpt,
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Try the inputs that failed before again "
                                      "(after fixing them); their shards are redone."),
    force: bool = ForceOpt,
    json_: bool = JsonOpt,
) -> None:
    """Embed the images of a manifest or of webdataset tars (one store shard per tar; a tar sample's .json
    is merged into its row). Unreadable images go to STORE/errors.jsonl; the run goes on (exit 1 if none
    could be read). Rerunning resumes; without --model an existing store keeps its own."""
    from vlmtools.embed import check_options, embed_image_input, output_spec

    check_options(dtype=dtype, shard_size=shard_size, rank=rank, world_size=world_size)
    spec = output_spec(output, model, pretrained, force)
    summary = embed_image_input(manifest, output, spec, device=device, precision=precision,
                                batch_size=batch_size, workers=workers, shard_size=shard_size, dtype=dtype,
                                rank=rank, world_size=world_size, retry_errors=retry_errors, force=force,
                                decode=decode)
    _emit(summary, json_)


@embed_app.command("text")
@handle_errors
def text_cmd(
    source: str = typer.Argument(..., help="Text lines, {\"text\"} JSONL, or descriptor JSONL "
                                 "({\"class\", \"descriptors\"}: one row per descriptor); '-' for stdin."),
    output: str = OutOpt,
    model: Optional[str] = ModelOpt,
    pretrained: Optional[str] = PretrainedOpt,
    device: str = DeviceOpt,
    precision: Precision = PrecisionOpt,
    wrap: Literal["cbd", "waffle", "none"] = typer.Option("cbd", "--wrap", help="For descriptors: 'cbd' embeds "
                                                          "\"{class}, which has {descriptor}\" (the CBD paper's "
                                                          "rule); 'waffle' \"A photo of a {class}, which has "
                                                          "{descriptor}.\" (WaffleCLIP's); 'none' embeds the "
                                                          "descriptor as written."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", min=1, help="Texts per forward pass."),
    shard_size: int = ShardOpt,
    dtype: Literal["float16", "float32"] = DtypeOpt,
    rank: Optional[int] = RankOpt,
    world_size: Optional[int] = WorldOpt,
    force: bool = ForceOpt,
    json_: bool = JsonOpt,
) -> None:
    """Embed texts. Descriptor JSONL keeps class, descriptor and kind in each row's meta."""
    from vlmtools.embed import check_options, embed_text_input, output_spec, text_records

    rows, extras = text_records(source, wrap)
    check_options(dtype=dtype, shard_size=shard_size, rank=rank, world_size=world_size)
    summary = embed_text_input(rows, extras, output, output_spec(output, model, pretrained, force), device=device,
                               precision=precision, batch_size=batch_size, shard_size=shard_size, dtype=dtype,
                               rank=rank, world_size=world_size, force=force)
    _emit(summary, json_)


def register(app: typer.Typer) -> None:
    app.add_typer(embed_app, name="embed")
