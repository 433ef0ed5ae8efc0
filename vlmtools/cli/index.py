"""`vlmtools index STORE`: build the store's FAISS inner-product index (index.faiss + index.json)."""

from __future__ import annotations

from typing import Optional

import typer

from vlmtools.cli.common import handle_errors, store_argument


def register(app: typer.Typer) -> None:
    @app.command("index")
    @handle_errors
    def index_cmd(
        store: str = store_argument("Store directory (from `vlmtools embed`)."),
        index_key: str = typer.Option("auto", "--index-key", help="faiss factory key (Flat, HNSW32, "
                                      "IVF4096,PQ64x4fs, IVF16384_HNSW32,PQ64, ...) or auto: chosen by row "
                                      "count and --max-memory."),
        max_memory: str = typer.Option("4G", "--max-memory", help="Memory budget for the index (auto)."),
        nprobe: Optional[int] = typer.Option(None, "--nprobe", help="IVF lists searched per query "
                                             "(default: max(16, nlist/16); PQ indexes max(16, nlist/128))."),
        ef_search: Optional[int] = typer.Option(None, "--ef-search", help="HNSW search depth (default: 64; "
                                                "at least 2k at search time)."),
        rerank: Optional[int] = typer.Option(None, "--rerank", help="Saved search parameter: fetch N*k "
                                             "candidates and rescore them exactly from the store (default: "
                                             "10 for PQ indexes, else off; 0 = off)."),
        target_recall: Optional[float] = typer.Option(None, "--target-recall", metavar="R", help="Tune nprobe, "
                                                      "efSearch and rerank to the cheapest setting whose recall@k "
                                                      "on held-out store rows reaches R, measured against exact "
                                                      "search while building; saved in index.json (default 0.95; "
                                                      "0 = no tuning; on an up-to-date index: tune it again)."),
        recall_k: int = typer.Option(10, "--recall-k", metavar="K", help="The k of --target-recall's recall@k."),
        seed: int = typer.Option(0, "--seed", help="Seed of the training sample (IVF/PQ) and of the held-out "
                                 "rows."),
        gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Build on the GPU (default: when "
                                           "faiss has GPU support and sees a CUDA device; HNSW and 4-bit "
                                           "fast-scan PQ, auto's choice from 1M rows, stay on the CPU)."),
        force: bool = typer.Option(False, "--force", help="Rebuild even if an up-to-date index exists."),
    ) -> None:
        """Index a store for fast `vlmtools search` (an up-to-date index is kept; a stale one is rebuilt)."""
        from vlmtools.index import build_index

        build_index(store, index_key=index_key, max_memory=max_memory, nprobe=nprobe, ef_search=ef_search,
                    force=force, seed=seed, gpu=gpu, rerank=rerank, target_recall=target_recall, recall_k=recall_k)
