"""`vlmtools demo`: the offline world end to end (no network, no GPU), as a shell pipeline."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmtools.cli.common import DeviceOpt, handle_errors


def _run_step(app: typer.Typer, step, out: Path) -> None:
    """Run one `vlmtools ...` step in this process, from OUT, with its stdout sent to its file."""
    import contextlib
    import os

    from vlmtools import formats
    from vlmtools.errors import VlmError

    cwd = os.getcwd()
    os.chdir(out)
    try:
        with contextlib.ExitStack() as stack:
            if step.stdout:
                fh = stack.enter_context(formats.open_output(step.stdout))
                stack.enter_context(contextlib.redirect_stdout(fh))
            code = app(step.argv, standalone_mode=False, prog_name="vlmtools")
        if code not in (None, 0):
            raise VlmError(f"demo step failed (exit {code}): {step.shell()}")
    finally:
        os.chdir(cwd)


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @handle_errors
    def demo_cmd(
        out: Path = typer.Argument(Path("vlmtools-demo"), help="Directory for everything the demo writes."),
        classes: int = typer.Option(20, "--classes", min=2, help="Classes in the world."),
        per_class: int = typer.Option(50, "--per-class", min=1, help="Images per class (both domains)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the world (and of everything drawn after it)."),
        device: str = DeviceOpt,
        force: bool = typer.Option(False, "--force", hidden=True, help="Deprecated: no longer needed (an "
                                   "earlier demo in OUT is replaced anyway)."),
    ) -> None:
        """Run the offline pipeline end to end with the micro CLIP and print the results table.

        No network or GPU needed. Every step is a real `vlmtools` command, written to OUT/pipeline.sh.
        Run again into the same OUT, it replaces its own earlier files (and leaves any others)."""
        import time

        from rich.markup import escape

        from vlmtools import console, demo, formats

        if force:
            console.warn("demo --force is deprecated here, no longer needed: an earlier demo in OUT is "
                         "replaced anyway; the flag goes in vlmtools 0.2")
        demo.prepare_out(out, classes, per_class)
        steps = demo.pipeline(classes, per_class, seed, device)
        script = demo.write_script(out, steps)
        console.info(f"[bold]vlmtools demo[/bold]: the pipeline below is also in {escape(str(script))}", markup=True)
        start = time.perf_counter()
        for n, step in enumerate(steps, 1):
            console.info(f"[bold cyan]{n}/{len(steps)} {escape(step.title)}[/bold cyan]\n  $ {escape(step.shell())}",
                         markup=True)
            for d in ("predictions", "eval", "explanations", "descriptors"):
                (out / d).mkdir(exist_ok=True)
            _run_step(app, step, out)
        rows, table = demo.results_table(out)
        formats.write_json(out / "results.json", {"rows": rows, "seconds": round(time.perf_counter() - start, 1)})
        (out / "results.txt").write_text(table + "\n")
        console.info(f"explanations of wrong answers: {out / 'explanations'}/ (wrong.txt and PNG figures)")
        typer.echo(table)
        console.info(f"done in {time.perf_counter() - start:.0f}s; files in {out}/ (results.txt, predictions/, "
                     f"eval/, explanations/, pipeline.sh)")
